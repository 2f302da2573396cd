/*
 * A CPU emulator of the few CUDA primitives the paged kernels use, so their
 * exact source runs (slowly) on a machine without a GPU: blocks run one after
 * another; the threads of a block are fibers on one OS thread that switch only
 * at barriers and warp-collective operations. Fragment layouts of ldmatrix and
 * mma.sync follow the PTX ISA. cp.async copies land when their group is
 * waited for (the latest moment the hardware allows), so a missing wait reads
 * the poison that fills shared memory at block start (0xff: NaN in f16, f32
 * and e4m3). A warp whose lanes disagree on a collective deadlocks the block;
 * the emulator reports it and aborts.
 */
#ifndef QATTN_PAGED_EMU_HPP
#define QATTN_PAGED_EMU_HPP

#include <stddef.h>
#include <stdint.h>

#include <functional>

namespace pa_emu {

int thread_index();
long long block_index();
long long block_count();
uint8_t *shared_base();

void sync_block();
uint32_t shfl_xor(uint32_t v, int mask);
uint32_t shfl_idx(uint32_t v, int src_lane);
/* cp.async of `bytes` (4 or 16) with src_bytes (0 or bytes) read: the rest is zero-filled. */
void cp_async(void *dst, const void *src, int bytes, int src_bytes);
void cp_commit();
void cp_wait(int pending_groups);
void ldmatrix_x4(uint32_t r[4], const void *row_address, bool trans);
/* D = A * B + C for m16n8k16 with f16 (bf16 when `bf16`) operands and fp32 accumulators. */
void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, bool bf16);

/* Runs body on `grid` blocks of `block` threads with `smem` bytes of shared memory. */
void launch(long long grid, int block, size_t smem, const std::function<void()> &body);

} // namespace pa_emu

#endif
