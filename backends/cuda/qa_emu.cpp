/* CPU emulation of the CUDA primitives in qa_arch.cuh; see qa_emu.hpp. */
#include "qa_emu.hpp"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <memory>
#include <vector>

namespace emu {

namespace {

struct Copy {
    void *dst;
    const void *src;
    bool valid;
    long group; /* 0: not committed yet */
};

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    ThreadState state;
    bool done = false;
    std::vector<Copy> copies;
    long committed = 0;
};

struct Barrier {
    int count = 0;
    unsigned generation = 0;
};

constexpr size_t kStack = 256 * 1024;
constexpr size_t kSlot = 64; /* bytes per lane in a warp exchange */

ucontext_t scheduler;
std::vector<Fiber> *fibers;
Fiber *running;
const std::function<void()> *kernel_body;
int live_threads;
Barrier block_bar;
std::vector<Barrier> warp_bars;
std::vector<unsigned char> warp_slots;

void yield() { swapcontext(&running->ctx, &scheduler); }

void wait_barrier(Barrier &b, int expected)
{
    unsigned gen = b.generation;
    if (++b.count == expected) {
        b.count = 0;
        b.generation++;
        return;
    }
    while (b.generation == gen)
        yield();
}

void fiber_main()
{
    (*kernel_body)();
    running->done = true;
    live_threads--;
    /* Threads that exit no longer hold a block barrier back. */
    if (block_bar.count > 0 && block_bar.count == live_threads) {
        block_bar.count = 0;
        block_bar.generation++;
    }
}

int lane() { return running->state.thread & 31; }
int warp() { return running->state.thread >> 5; }

/* Every lane of the warp contributes `bytes` and receives all 32 contributions. */
void exchange(const void *mine, size_t bytes, void *all)
{
    unsigned char *slots = &warp_slots[(size_t)warp() * 32 * kSlot];
    memcpy(slots + (size_t)lane() * kSlot, mine, bytes);
    wait_barrier(warp_bars[(size_t)warp()], 32);
    for (int l = 0; l < 32; l++)
        memcpy((unsigned char *)all + (size_t)l * bytes, slots + (size_t)l * kSlot, bytes);
    wait_barrier(warp_bars[(size_t)warp()], 32);
}

void complete_copies(long up_to_group)
{
    std::vector<Copy> keep;
    for (const Copy &c : running->copies) {
        if (c.group != 0 && c.group <= up_to_group) {
            if (c.valid)
                memcpy(c.dst, c.src, 16);
            else
                memset(c.dst, 0, 16);
        } else {
            keep.push_back(c);
        }
    }
    running->copies.swap(keep);
}

float f16(uint32_t reg, int half) { return qattn_f16_to_f32((uint16_t)(reg >> (16 * half))); }
float bf16(uint32_t reg, int half) { return qattn_bf16_to_f32((uint16_t)(reg >> (16 * half))); }
float e4m3(uint32_t reg, int byte) { return qattn_e4m3_to_f32((uint8_t)(reg >> (8 * byte))); }

struct Operands {
    uint32_t a[4], b[2];
};

/* A[16][K] and B[K][8] of one mma from the 32 lanes' fragments (PTX ISA layouts). */
void unpack(const Operands *all, Kind kind, bool eight_bit, double A[16][32], double B[32][8])
{
    const int K = eight_bit ? 32 : 16;
    for (int row = 0; row < 16; row++)
        for (int k = 0; k < K; k++) {
            int lane_of, reg, part;
            if (eight_bit) {
                lane_of = (row % 8) * 4 + (k % 16) / 4;
                reg = row / 8 + 2 * (k / 16);
                part = k % 4;
            } else {
                lane_of = (row % 8) * 4 + (k % 8) / 2;
                reg = row / 8 + 2 * (k / 8);
                part = k % 2;
            }
            uint32_t r = all[lane_of].a[reg];
            A[row][k] = kind == F16 ? f16(r, part) : kind == BF16 ? bf16(r, part) : e4m3(r, part);
        }
    for (int k = 0; k < K; k++)
        for (int n = 0; n < 8; n++) {
            int lane_of, reg, part;
            if (eight_bit) {
                lane_of = n * 4 + (k % 16) / 4;
                reg = k / 16;
                part = k % 4;
            } else {
                lane_of = n * 4 + (k % 8) / 2;
                reg = k / 8;
                part = k % 2;
            }
            uint32_t r = all[lane_of].b[reg];
            B[k][n] = kind == F16 ? f16(r, part) : kind == BF16 ? bf16(r, part) : e4m3(r, part);
        }
}

/* The (row, col) of accumulator element i of this lane. */
void acc_pos(int i, int *row, int *col)
{
    *row = lane() / 4 + 8 * (i / 2);
    *col = 2 * (lane() % 4) + (i % 2);
}

/* Runs one block: a fiber per thread, round robin until all have exited. */
__attribute__((noinline)) void run_block(std::vector<Fiber> &local, std::vector<unsigned char> &shared, int b,
                                         int grid, int block)
{

        memset(shared.data(), 0xff, shared.size());
        block_bar = Barrier{};
        live_threads = block;
        for (int t = 0; t < block; t++) {
            Fiber &f = local[(size_t)t];
            f.done = false;
            f.copies.clear();
            f.committed = 0;
            f.state = ThreadState{t, b, grid, shared.data()};
            if (!f.stack)
                f.stack.reset(new char[kStack]);
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.get();
            f.ctx.uc_stack.ss_size = kStack;
            f.ctx.uc_link = &scheduler;
            makecontext(&f.ctx, fiber_main, 0);
        }
        int remaining = block;
        while (remaining > 0) {
            remaining = 0;
            for (Fiber &f : local) {
                if (f.done)
                    continue;
                running = &f;
                swapcontext(&scheduler, &f.ctx);
                if (!f.done)
                    remaining++;
            }
        }
        for (Fiber &f : local)
            if (!f.copies.empty()) {
                fprintf(stderr, "emu: thread %d of block %d exited with cp.async copies never waited for\n",
                        f.state.thread, b);
                abort();
            }
    }

} // namespace

const ThreadState &current() { return running->state; }

void block_barrier() { wait_barrier(block_bar, live_threads); }

float shfl_xor(float v, int mask)
{
    float all[32];
    exchange(&v, sizeof(v), all);
    return all[lane() ^ mask];
}

void cp_async16(void *smem, const void *gmem, bool valid)
{
    if (((uintptr_t)smem | (valid ? (uintptr_t)gmem : 0)) % 16) {
        fprintf(stderr, "emu: cp.async with a misaligned address (smem %p, gmem %p)\n", smem, gmem);
        abort();
    }
    running->copies.push_back(Copy{smem, gmem, valid, 0});
}

void cp_async_commit()
{
    running->committed++;
    for (Copy &c : running->copies)
        if (c.group == 0)
            c.group = running->committed;
}

void cp_async_wait(int pending_groups) { complete_copies(running->committed - pending_groups); }

void ldmatrix_x4(uint32_t r[4], const void *row, bool trans)
{
    if ((uintptr_t)row % 16) {
        fprintf(stderr, "emu: ldmatrix row address %p is not 16-byte aligned\n", row);
        abort();
    }
    const unsigned char *rows[32];
    const unsigned char *mine = (const unsigned char *)row;
    exchange(&mine, sizeof(mine), rows);
    int l = lane();
    for (int m = 0; m < 4; m++) {
        if (!trans) {
            memcpy(&r[m], rows[m * 8 + l / 4] + 4 * (l % 4), 4);
        } else {
            uint16_t lo, hi;
            memcpy(&lo, rows[m * 8 + 2 * (l % 4)] + 2 * (l / 4), 2);
            memcpy(&hi, rows[m * 8 + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
            r[m] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}

void mma(float c[4], const uint32_t a[4], const uint32_t b[2], Kind kind)
{
    Operands mine, all[32];
    memcpy(mine.a, a, sizeof(mine.a));
    memcpy(mine.b, b, sizeof(mine.b));
    exchange(&mine, sizeof(mine), all);
    static double A[16][32], B[32][8];
    bool eight_bit = kind == E4M3;
    unpack(all, kind, eight_bit, A, B);
    for (int i = 0; i < 4; i++) {
        int row, col;
        acc_pos(i, &row, &col);
        double s = 0;
        for (int k = 0; k < (eight_bit ? 32 : 16); k++)
            s += A[row][k] * B[k][col];
        c[i] = c[i] + (float)s;
    }
}

void mma_s8(int32_t c[4], const uint32_t a[4], const uint32_t b[2])
{
    Operands mine, all[32];
    memcpy(mine.a, a, sizeof(mine.a));
    memcpy(mine.b, b, sizeof(mine.b));
    exchange(&mine, sizeof(mine), all);
    for (int i = 0; i < 4; i++) {
        int row, col;
        acc_pos(i, &row, &col);
        int32_t s = 0;
        for (int k = 0; k < 32; k++) {
            int8_t x = (int8_t)(all[(row % 8) * 4 + (k % 16) / 4].a[row / 8 + 2 * (k / 16)] >> (8 * (k % 4)));
            int8_t y = (int8_t)(all[col * 4 + (k % 16) / 4].b[k / 16] >> (8 * (k % 4)));
            s += (int32_t)x * (int32_t)y;
        }
        c[i] += s;
    }
}

/* An fp16-accumulating mma: the exact product of the fragment (e4m3 k32 or
 * f16 k16) plus the accumulator, rounded once to fp16. */
static void mma_f16_acc(uint32_t c[2], const uint32_t a[4], const uint32_t b[2], Kind kind)
{
    Operands mine, all[32];
    memcpy(mine.a, a, sizeof(mine.a));
    memcpy(mine.b, b, sizeof(mine.b));
    exchange(&mine, sizeof(mine), all);
    static double A[16][32], B[32][8];
    const bool eight_bit = kind == E4M3;
    unpack(all, kind, eight_bit, A, B);
    uint32_t out[2] = {0, 0};
    for (int i = 0; i < 4; i++) {
        int row, col;
        acc_pos(i, &row, &col);
        double s = 0;
        for (int k = 0; k < (eight_bit ? 32 : 16); k++)
            s += A[row][k] * B[k][col];
        float prev = f16(c[i / 2], i % 2);
        uint16_t h = qattn_f32_to_f16((float)(s + prev));
        out[i / 2] |= (uint32_t)h << (16 * (i % 2));
    }
    c[0] = out[0];
    c[1] = out[1];
}

void mma_e4m3_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]) { mma_f16_acc(c, a, b, E4M3); }

void mma_f16_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]) { mma_f16_acc(c, a, b, F16); }

void launch(int grid, int block, size_t smem, const std::function<void()> &body)
{
    std::vector<unsigned char> shared(smem ? smem : 16);
    std::vector<Fiber> local((size_t)block);
    fibers = &local;
    kernel_body = &body;
    warp_bars.assign((size_t)(block + 31) / 32, Barrier{});
    warp_slots.assign((size_t)(block + 31) / 32 * 32 * kSlot, 0);
    for (int b = 0; b < grid; b++)
        run_block(local, shared, b, grid, block);
    fibers = nullptr;
}

} // namespace emu
