/* The CPU emulator of the paged kernels' CUDA primitives; see paged_emu.hpp. */
#include "paged_emu.hpp"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <memory>
#include <vector>

extern "C" {
#include "numeric.h"
}

namespace pa_emu {

namespace {

struct Copy {
    void *dst;
    const void *src;
    int bytes, src_bytes;
    long group; /* 0 until committed */
};

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    int thread = 0;
    bool done = false;
    std::vector<Copy> copies;
    long committed = 0;
};

struct Barrier {
    int count = 0;
    unsigned long generation = 0;
};

constexpr size_t kStack = 512 * 1024;
constexpr size_t kSlot = 64; /* bytes per lane in a warp exchange */

ucontext_t scheduler;
Fiber *running;
const std::function<void()> *kernel_body;
long long current_block, grid_blocks;
int live_threads;
unsigned long progress; /* bumps on every barrier arrival, release and thread exit */
Barrier block_bar;
std::vector<Barrier> warp_bars;
std::vector<unsigned char> warp_slots;
std::vector<uint8_t> shared;

void yield() { swapcontext(&running->ctx, &scheduler); }

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
    (*kernel_body)();
    running->done = true;
    live_threads--;
    progress++;
    /* A thread that exits no longer holds the block barrier back (as on the GPU). */
    if (block_bar.count > 0 && block_bar.count == live_threads) {
        block_bar.count = 0;
        block_bar.generation++;
    }
}

int lane() { return running->thread & 31; }
int warp() { return running->thread >> 5; }

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

double half_value(uint32_t reg, int part, bool bf16)
{
    uint16_t h = (uint16_t)(reg >> (16 * part));
    return bf16 ? qattn_bf16_to_f32(h) : qattn_f16_to_f32(h);
}

void run_block(std::vector<Fiber> &fibers, long long b, int block)
{
    memset(shared.data(), 0xff, shared.size());
    block_bar = Barrier{};
    for (Barrier &w : warp_bars)
        w = Barrier{};
    live_threads = block;
    current_block = b;
    for (int t = 0; t < block; t++) {
        Fiber &f = fibers[(size_t)t];
        f.done = false;
        f.copies.clear();
        f.committed = 0;
        f.thread = t;
        if (!f.stack)
            f.stack.reset(new char[kStack]);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        int remaining = 0;
        unsigned long before = progress;
        for (Fiber &f : fibers) {
            if (f.done)
                continue;
            running = &f;
            swapcontext(&scheduler, &f.ctx);
            remaining += !f.done;
        }
        if (!remaining)
            break;
        if (progress == before) {
            fprintf(stderr, "pa_emu: block %lld deadlocked (a barrier or warp collective some threads never reach)\n",
                    b);
            abort();
        }
    }
    for (Fiber &f : fibers)
        if (!f.copies.empty()) {
            fprintf(stderr, "pa_emu: thread %d of block %lld exited with cp.async copies never waited for\n",
                    f.thread, b);
            abort();
        }
}

} // namespace

int thread_index() { return running->thread; }
long long block_index() { return current_block; }
long long block_count() { return grid_blocks; }
uint8_t *shared_base() { return shared.data(); }

void sync_block() { wait_barrier(block_bar, live_threads); }

uint32_t shfl_xor(uint32_t v, int mask)
{
    uint32_t all[32];
    exchange(&v, sizeof(v), all);
    return all[lane() ^ mask];
}

uint32_t shfl_idx(uint32_t v, int src_lane)
{
    uint32_t all[32];
    exchange(&v, sizeof(v), all);
    return all[src_lane & 31];
}

void cp_async(void *dst, const void *src, int bytes, int src_bytes)
{
    uintptr_t s = shared.empty() ? 0 : (uintptr_t)shared.data();
    if ((uintptr_t)dst < s || (uintptr_t)dst + (uintptr_t)bytes > s + shared.size()) {
        fprintf(stderr, "pa_emu: cp.async destination %p is outside shared memory\n", dst);
        abort();
    }
    if ((uintptr_t)dst % (uintptr_t)bytes || (src_bytes && (uintptr_t)src % (uintptr_t)bytes)) {
        fprintf(stderr, "pa_emu: cp.async of %d bytes with a misaligned address (dst %p, src %p)\n", bytes, dst, src);
        abort();
    }
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
    uintptr_t s = (uintptr_t)shared.data();
    if ((uintptr_t)row_address % 16 || (uintptr_t)row_address < s || (uintptr_t)row_address + 16 > s + shared.size()) {
        fprintf(stderr, "pa_emu: ldmatrix row address %p is misaligned or outside shared memory\n", row_address);
        abort();
    }
    const unsigned char *rows[32];
    const unsigned char *mine = (const unsigned char *)row_address;
    exchange(&mine, sizeof(mine), rows);
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

void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, bool bf16)
{
    struct Operands {
        uint32_t a[4], b[2];
    } mine, all[32];
    memcpy(mine.a, a, sizeof(mine.a));
    mine.b[0] = b0;
    mine.b[1] = b1;
    exchange(&mine, sizeof(mine), all);
    /* PTX m16n8k16 (16-bit): A row r, column k sits in lane (r%8)*4 + (k%8)/2, register r/8 + 2*(k/8),
     * half k%2; B column n, row k in lane n*4 + (k%8)/2, register k/8, half k%2; C element i of lane l
     * is row l/4 + 8*(i/2), column 2*(l%4) + i%2. */
    const int l = lane();
    for (int i = 0; i < 4; i++) {
        int row = l / 4 + 8 * (i / 2), col = 2 * (l % 4) + i % 2;
        double s = 0;
        for (int k = 0; k < 16; k++) {
            double x = half_value(all[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k % 2, bf16);
            double y = half_value(all[col * 4 + (k % 8) / 2].b[k / 8], k % 2, bf16);
            s += x * y;
        }
        c[i] = c[i] + (float)s;
    }
}

void launch(long long grid, int block, size_t smem, const std::function<void()> &body)
{
    if (grid <= 0)
        return;
    shared.assign(smem ? smem : 16, 0xff);
    std::vector<Fiber> fibers((size_t)block);
    kernel_body = &body;
    grid_blocks = grid;
    warp_bars.assign((size_t)(block + 31) / 32, Barrier{});
    warp_slots.assign((size_t)(block + 31) / 32 * 32 * kSlot, 0);
    for (long long b = 0; b < grid; b++)
        run_block(fibers, b, block);
    kernel_body = nullptr;
}

} // namespace pa_emu
