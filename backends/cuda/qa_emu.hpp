/*
 * A small CPU emulator of the CUDA execution model, enough for qattn's
 * kernels: blocks run one after another; a block's threads are fibers on one
 * OS thread that switch at barriers and warp-collective operations, so
 * __syncthreads, shuffles, ldmatrix and mma.sync behave as the PTX ISA
 * specifies (fragment layouts included). cp.async copies land when the
 * thread waits for their group, the latest moment the hardware allows, so a
 * missing wait shows up as stale data. Shared memory starts filled with 0xff
 * (NaN in fp16/fp32) so reads of unwritten shared memory poison results.
 */
#ifndef QA_EMU_HPP
#define QA_EMU_HPP

#include <stddef.h>
#include <stdint.h>

#include <functional>

extern "C" {
#include "numeric.h"
}

namespace emu {

struct ThreadState {
    int thread, block, grid;
    uint8_t *smem;
};

const ThreadState &current();
void block_barrier();
float shfl_xor(float v, int mask);
void cp_async16(void *smem, const void *gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int pending_groups);
void ldmatrix_x4(uint32_t r[4], const void *row, bool trans);
enum Kind { F16, BF16, E4M3 };
void mma(float c[4], const uint32_t a[4], const uint32_t b[2], Kind kind);
void mma_s8(int32_t c[4], const uint32_t a[4], const uint32_t b[2]);
void mma_e4m3_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]);
/* m16n8k16 fp16 x fp16 with fp16 accumulation: exact products summed, then
 * one rounding to fp16 with the accumulator (as mma_e4m3_f16). */
void mma_f16_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]);

/* Runs body on grid blocks of block threads with smem bytes of shared memory. */
void launch(int grid, int block, size_t smem, const std::function<void()> &body);

} // namespace emu

#endif
