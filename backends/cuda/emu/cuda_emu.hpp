/*
 * A CPU emulator of the CUDA execution model, enough for the backend's
 * kernels (cuda_device.cuh builds on it under QA_EMULATE): blocks run one
 * after another; the threads of a block are fibers on one OS thread that
 * switch only at barriers and warp-collective operations, so __syncthreads,
 * shuffles, ldmatrix and mma.sync behave as the PTX ISA specifies (fragment
 * layouts included). cp.async copies land when their group is waited for,
 * the latest moment the hardware allows, so a missing wait reads the poison
 * that fills shared memory at block start (0xff: NaN in f16, f32 and e4m3).
 * Misaligned or out-of-shared-memory addresses, copies never waited for and
 * a warp whose lanes disagree on a collective (a deadlock) abort with a
 * message. One launch at a time: launches from several threads serialize.
 */
#ifndef QA_CUDA_EMU_HPP
#define QA_CUDA_EMU_HPP

#include <stddef.h>
#include <stdint.h>

#include <functional>

namespace emu {

int thread_index();
int block_index();
int block_count();
uint8_t *shared_base();

void sync_block();
uint32_t shfl_xor(uint32_t v, int mask);
uint32_t shfl_idx(uint32_t v, int src_lane);
/* cp.async of `bytes` (4 or 16) with src_bytes (0 or bytes) read: the rest is zero-filled. */
void cp_async(void *dst, const void *src, int bytes, int src_bytes);
void cp_commit();
void cp_wait(int pending_groups);
void ldmatrix_x4(uint32_t r[4], const void *row_address, bool trans);

enum Kind { F16, BF16, E4M3 };
/* D = A * B + C: m16n8k16 (f16, bf16) or m16n8k32 (e4m3) with fp32 accumulators. */
void mma(float c[4], const uint32_t a[4], const uint32_t b[2], Kind kind);
/* m16n8k32 s8 x s8 with s32 accumulators. */
void mma_s8(int32_t c[4], const uint32_t a[4], const uint32_t b[2]);
/* fp16-accumulating forms (e4m3 k32, f16 k16): the exact products summed, then
 * one rounding to fp16 together with the accumulator. */
void mma_e4m3_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]);
void mma_f16_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]);

/* Runs body on `grid` blocks of `block` threads with `smem` bytes of dynamic shared memory. */
void launch(long long grid, int block, size_t smem, const std::function<void()> &body);

} // namespace emu

#endif
