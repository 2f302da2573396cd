/* The CPU emulator of the CUDA execution model; see cuda_emu.hpp. */
#include "cuda_emu.hpp"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <memory>
#include <mutex>
#include <vector>

extern "C" {
#include "numeric.h"
}

namespace emu {

namespace {

struct Copy {
    void *dst;
    const void *src;
    int bytes, src_bytes;
    long group; /* 0 until committed */
};

/* Context switches. On x86-64 a switch saves the callee-saved registers and
 * swaps stack pointers (the emulator switches at every barrier and warp
 * collective; swapcontext's signal-mask system call made it several times
 * slower); AddressSanitizer is told of each switch (below). Elsewhere, ucontext. */
#if defined(__x86_64__)
#define EMU_FAST_SWITCH 1
extern "C" void qa_emu_switch(void **save_sp, void *load_sp);
asm(".text\n"
    ".p2align 4\n"
    ".globl qa_emu_switch\n"
    ".hidden qa_emu_switch\n"
    ".type qa_emu_switch, @function\n"
    "qa_emu_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size qa_emu_switch, .-qa_emu_switch\n");
#else
#define EMU_FAST_SWITCH 0
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
/* AddressSanitizer follows a switch of stacks when it is announced before and
 * confirmed after; a fiber's stack is unpoisoned before it is reused, since
 * the frames of the last block's threads were abandoned, not returned from. */
#define EMU_ASAN_START(save, bottom, size) __sanitizer_start_switch_fiber((save), (bottom), (size))
#define EMU_ASAN_FINISH(save, bottom, size) __sanitizer_finish_switch_fiber((save), (bottom), (size))
#define EMU_ASAN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define EMU_ASAN_START(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define EMU_ASAN_FINISH(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define EMU_ASAN_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

struct Fiber {
#if EMU_FAST_SWITCH
    void *sp; /* saved stack pointer while switched out */
#else
    ucontext_t ctx;
#endif
    std::unique_ptr<char[]> stack;
    int thread = 0;
    bool done = false;
    std::vector<Copy> copies;
    long committed = 0;
    void *asan_fake_stack = nullptr;
};

struct Barrier {
    int count = 0;
    unsigned long generation = 0;
};

constexpr size_t kStack = 512 * 1024;
constexpr size_t kSlot = 64; /* bytes per lane in a warp exchange */

/* A warp's exchange area. Two sets of slots, alternating by the barrier's
 * generation, so one barrier per collective suffices: a lane cannot reach the
 * collective after next (which reuses these slots) before every lane has
 * arrived at the next one, that is, has finished reading this one. The
 * results of a collective that one lane computes for all (an mma) live beside
 * the slots, tagged with the generation they belong to. */
struct Warp {
    Barrier bar;
    unsigned char slots[2][32 * kSlot];
    unsigned long computed[2] = {~0ul, ~0ul};
    uint32_t results[2][32][4];
};

std::mutex launch_lock; /* the state below belongs to one launch at a time */
#if EMU_FAST_SWITCH
void *scheduler_sp;
#else
ucontext_t scheduler;
#endif
const void *scheduler_stack_bottom; /* for AddressSanitizer: the scheduler's stack */
size_t scheduler_stack_size;
void *scheduler_fake_stack;
Fiber *running;
const std::function<void()> *kernel_body;
int current_block, grid_blocks;
int live_threads;
unsigned long progress; /* bumps on every barrier arrival, release and thread exit */
Barrier block_bar;
std::vector<Warp> warps;
std::vector<uint8_t> shared;

[[noreturn]] void fail(const char *what, const void *a = nullptr, const void *b = nullptr)
{
    fprintf(stderr, "cuda emulator: block %d thread %d: %s (%p, %p)\n", current_block, running ? running->thread : -1,
            what, a, b);
    abort();
}

void yield()
{
    Fiber *self = running;
    EMU_ASAN_START(&self->asan_fake_stack, scheduler_stack_bottom, scheduler_stack_size);
#if EMU_FAST_SWITCH
    qa_emu_switch(&self->sp, scheduler_sp);
#else
    swapcontext(&self->ctx, &scheduler);
#endif
    EMU_ASAN_FINISH(self->asan_fake_stack, nullptr, nullptr);
}

void wait_barrier(Barrier &b, int expected)
{
    unsigned long gen = b.generation;
    progress++;
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
    EMU_ASAN_FINISH(nullptr, &scheduler_stack_bottom, &scheduler_stack_size);
    (*kernel_body)();
    running->done = true;
    live_threads--;
    progress++;
    /* A thread that exits no longer holds the block barrier back (as on the GPU). */
    if (block_bar.count > 0 && block_bar.count == live_threads) {
        block_bar.count = 0;
        block_bar.generation++;
    }
    EMU_ASAN_START(nullptr, scheduler_stack_bottom, scheduler_stack_size); /* this fiber ends */
#if EMU_FAST_SWITCH
    void *dead;
    qa_emu_switch(&dead, scheduler_sp); /* never resumed: the stack is reused for the next block */
    abort();
#endif
}

int lane() { return running->thread & 31; }
int warp() { return running->thread >> 5; }

/* Every lane of the warp contributes `bytes`; returns the warp's slots, which
 * hold all 32 contributions (lane l's at l * kSlot) until the collective after
 * next, and sets *parity to the slot set and *key to this collective's tag. */
const unsigned char *exchange(const void *mine, size_t bytes, int *parity, unsigned long *key)
{
    Warp &w = warps[(size_t)warp()];
    *key = w.bar.generation;
    *parity = (int)(*key & 1);
    memcpy(w.slots[*parity] + (size_t)lane() * kSlot, mine, bytes);
    wait_barrier(w.bar, 32);
    return w.slots[*parity];
}

/* Lane src's contribution of 4 bytes. */
uint32_t exchange_u32(uint32_t mine, int src_lane)
{
    int parity;
    unsigned long key;
    const unsigned char *slots = exchange(&mine, 4, &parity, &key);
    uint32_t v;
    memcpy(&v, slots + (size_t)(src_lane & 31) * kSlot, 4);
    return v;
}

void land_copies(long up_to_group)
{
    std::vector<Copy> keep;
    for (const Copy &c : running->copies) {
        if (c.group != 0 && c.group <= up_to_group) {
            memset(c.dst, 0, (size_t)c.bytes);
            if (c.src_bytes)
                memcpy(c.dst, c.src, (size_t)c.src_bytes);
        } else {
            keep.push_back(c);
        }
    }
    running->copies.swap(keep);
}

bool in_shared(const void *p, size_t bytes)
{
    const uintptr_t s = (uintptr_t)shared.data(), a = (uintptr_t)p;
    return a >= s && a + bytes <= s + shared.size();
}

float f16(uint32_t reg, int half) { return qattn_f16_to_f32((uint16_t)(reg >> (16 * half))); }
float bf16(uint32_t reg, int half) { return qattn_bf16_to_f32((uint16_t)(reg >> (16 * half))); }
float e4m3(uint32_t reg, int byte) { return qattn_e4m3_to_f32((uint8_t)(reg >> (8 * byte))); }

/* One lane's part of an mma: its A and B fragments and its accumulators. */
struct MmaLane {
    uint32_t a[4], b[2];
    uint32_t c[4]; /* fp32 bits, s32, or (fp16 forms) two words of fp16 pairs */
};
static_assert(sizeof(MmaLane) <= kSlot, "an mma lane fits its exchange slot");

enum class Acc { F32, S32, F16 };

/* A[16][K] and B[K][8] of one mma from the 32 lanes' fragments (PTX ISA layouts). */
void unpack(const MmaLane *all, Kind kind, double A[16][32], double B[32][8])
{
    const bool eight_bit = kind == E4M3;
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

/* D = A B + C for the whole warp, into out[lane][4] (the lanes' new accumulators). */
void mma_warp(const MmaLane *all, Kind kind, Acc acc, uint32_t out[32][4])
{
    static double A[16][32], B[32][8];
    const int K = kind == E4M3 ? 32 : 16;
    if (acc == Acc::S32) {
        for (int l = 0; l < 32; l++)
            for (int i = 0; i < 4; i++) {
                const int row = l / 4 + 8 * (i / 2), col = 2 * (l % 4) + (i % 2);
                int32_t s = 0;
                for (int k = 0; k < 32; k++) {
                    int8_t x = (int8_t)(all[(row % 8) * 4 + (k % 16) / 4].a[row / 8 + 2 * (k / 16)] >> (8 * (k % 4)));
                    int8_t y = (int8_t)(all[col * 4 + (k % 16) / 4].b[k / 16] >> (8 * (k % 4)));
                    s += (int32_t)x * (int32_t)y;
                }
                out[l][i] = (uint32_t)((int32_t)all[l].c[i] + s);
            }
        return;
    }
    unpack(all, kind, A, B);
    for (int l = 0; l < 32; l++) {
        uint32_t half_words[2] = {0, 0};
        for (int i = 0; i < 4; i++) {
            const int row = l / 4 + 8 * (i / 2), col = 2 * (l % 4) + (i % 2);
            double s = 0;
            for (int k = 0; k < K; k++)
                s += A[row][k] * B[k][col];
            if (acc == Acc::F32) {
                float c;
                memcpy(&c, &all[l].c[i], 4);
                c = c + (float)s;
                memcpy(&out[l][i], &c, 4);
            } else { /* the exact product plus the accumulator, rounded once to fp16 */
                const float prev = f16(all[l].c[i / 2], i % 2);
                half_words[i / 2] |= (uint32_t)qattn_f32_to_f16((float)(s + prev)) << (16 * (i % 2));
            }
        }
        if (acc == Acc::F16) {
            out[l][0] = half_words[0];
            out[l][1] = half_words[1];
        }
    }
}

/* One mma: the lanes exchange fragments, the first lane past the barrier
 * computes every lane's result once, and each takes its own `words` words. */
void mma_collective(const uint32_t a[4], const uint32_t b[2], uint32_t *c, int words, Kind kind, Acc acc)
{
    MmaLane mine;
    memcpy(mine.a, a, sizeof(mine.a));
    memcpy(mine.b, b, sizeof(mine.b));
    memset(mine.c, 0, sizeof(mine.c));
    memcpy(mine.c, c, (size_t)words * 4);
    int parity;
    unsigned long key;
    const unsigned char *slots = exchange(&mine, sizeof(mine), &parity, &key);
    Warp &w = warps[(size_t)warp()];
    if (w.computed[parity] != key) {
        MmaLane all[32];
        for (int l = 0; l < 32; l++)
            memcpy(&all[l], slots + (size_t)l * kSlot, sizeof(MmaLane));
        mma_warp(all, kind, acc, w.results[parity]);
        w.computed[parity] = key;
    }
    memcpy(c, w.results[parity][lane()], (size_t)words * 4);
}

/* Switches to fiber f until it yields or exits. Kept out of line so that no
 * caller's locals live across the context switch (-Wclobbered). */
__attribute__((noinline)) void resume(Fiber &f)
{
    running = &f;
    EMU_ASAN_START(&scheduler_fake_stack, f.stack.get(), kStack);
#if EMU_FAST_SWITCH
    qa_emu_switch(&scheduler_sp, f.sp);
#else
    swapcontext(&scheduler, &f.ctx);
#endif
    EMU_ASAN_FINISH(scheduler_fake_stack, nullptr, nullptr);
    running = nullptr;
}

/* Sets fiber f up to run the kernel body as thread t (out of line for the
 * same reason as resume: getcontext returns twice). */
__attribute__((noinline)) void start_fiber(Fiber &f, int t)
{
    f.done = false;
    f.copies.clear();
    f.committed = 0;
    f.thread = t;
    if (!f.stack)
        f.stack.reset(new char[kStack]);
    EMU_ASAN_UNPOISON(f.stack.get(), kStack);
    f.asan_fake_stack = nullptr;
#if EMU_FAST_SWITCH
    /* What qa_emu_switch pops: six callee-saved registers, then fiber_main as
     * the return address, above it a zero "return address" of fiber_main, so
     * that its stack is aligned as after a call. */
    uintptr_t top = ((uintptr_t)f.stack.get() + kStack) & ~(uintptr_t)15;
    void **sp = (void **)top - 8;
    for (int i = 0; i < 6; i++)
        sp[i] = nullptr;
    sp[6] = (void *)&fiber_main;
    sp[7] = nullptr;
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, fiber_main, 0);
#endif
}

/* Runs one block: a fiber per thread, round robin until all have exited. */
void run_block(std::vector<Fiber> &fibers, int b, int block)
{
    memset(shared.data(), 0xff, shared.size());
    block_bar = Barrier{};
    for (Warp &w : warps)
        w = Warp{};
    live_threads = block;
    current_block = b;
    for (int t = 0; t < block; t++)
        start_fiber(fibers[(size_t)t], t);
    for (;;) {
        int remaining = 0;
        unsigned long before = progress;
        for (Fiber &f : fibers) {
            if (f.done)
                continue;
            resume(f);
            remaining += !f.done;
        }
        if (!remaining)
            break;
        if (progress == before) {
            fprintf(stderr, "cuda emulator: block %d deadlocked (a barrier or warp collective some threads never "
                            "reach)\n",
                    b);
            abort();
        }
    }
    for (Fiber &f : fibers)
        if (!f.copies.empty()) {
            fprintf(stderr, "cuda emulator: thread %d of block %d exited with cp.async copies never waited for\n",
                    f.thread, b);
            abort();
        }
}

} // namespace

int thread_index() { return running->thread; }
int block_index() { return current_block; }
int block_count() { return grid_blocks; }
uint8_t *shared_base() { return shared.data(); }

void sync_block() { wait_barrier(block_bar, live_threads); }

uint32_t shfl_xor(uint32_t v, int mask) { return exchange_u32(v, lane() ^ mask); }

uint32_t shfl_idx(uint32_t v, int src_lane) { return exchange_u32(v, src_lane); }

void cp_async(void *dst, const void *src, int bytes, int src_bytes)
{
    if (!in_shared(dst, (size_t)bytes))
        fail("cp.async destination outside shared memory", dst);
    if ((uintptr_t)dst % (uintptr_t)bytes || (src_bytes && (uintptr_t)src % (uintptr_t)bytes))
        fail("cp.async with a misaligned address", dst, src);
    running->copies.push_back(Copy{dst, src, bytes, src_bytes, 0});
}

void cp_commit()
{
    running->committed++;
    for (Copy &c : running->copies)
        if (c.group == 0)
            c.group = running->committed;
}

void cp_wait(int pending_groups) { land_copies(running->committed - pending_groups); }

void ldmatrix_x4(uint32_t r[4], const void *row_address, bool trans)
{
    if ((uintptr_t)row_address % 16 || !in_shared(row_address, 16))
        fail("ldmatrix row address misaligned or outside shared memory", row_address);
    int parity;
    unsigned long key;
    const unsigned char *slots = exchange(&row_address, sizeof(row_address), &parity, &key);
    const unsigned char *rows[32];
    for (int l = 0; l < 32; l++)
        memcpy(&rows[l], slots + (size_t)l * kSlot, sizeof(rows[l]));
    const int l = lane();
    for (int m = 0; m < 4; m++) {
        if (!trans) { /* thread l: row l/4, 16-bit elements 2(l%4), 2(l%4)+1 */
            memcpy(&r[m], rows[m * 8 + l / 4] + 4 * (l % 4), 4);
        } else {      /* thread l: rows 2(l%4) and 2(l%4)+1, 16-bit element l/4 */
            uint16_t lo, hi;
            memcpy(&lo, rows[m * 8 + 2 * (l % 4)] + 2 * (l / 4), 2);
            memcpy(&hi, rows[m * 8 + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
            r[m] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}

void mma(float c[4], const uint32_t a[4], const uint32_t b[2], Kind kind)
{
    mma_collective(a, b, (uint32_t *)c, 4, kind, Acc::F32);
}

void mma_s8(int32_t c[4], const uint32_t a[4], const uint32_t b[2])
{
    mma_collective(a, b, (uint32_t *)c, 4, E4M3 /* k32 operands; unused for s8 */, Acc::S32);
}

void mma_e4m3_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]) { mma_collective(a, b, c, 2, E4M3, Acc::F16); }

void mma_f16_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]) { mma_collective(a, b, c, 2, F16, Acc::F16); }

void launch(long long grid, int block, size_t smem, const std::function<void()> &body)
{
    if (grid <= 0)
        return;
    std::lock_guard<std::mutex> guard(launch_lock);
    shared.assign(smem ? smem : 16, 0xff);
    std::vector<Fiber> fibers((size_t)block);
    kernel_body = &body;
    grid_blocks = (int)grid;
    warps.assign((size_t)(block + 31) / 32, Warp{});
    for (int b = 0; b < (int)grid; b++)
        run_block(fibers, b, block);
    kernel_body = nullptr;
}

} // namespace emu
