/*
 * Sparse attention on the CUDA backend: what both kernel families (the
 * mma.sync kernels of cuda_kernels.cuh and the sm_90a TMA kernels of
 * hopper/) share, so that they skip exactly alike:
 *   - sparse_row_keys: a query row's visible keys under causal + window +
 *     sinks (the device copy of src/internal.h's qattn_sparse_row_keys).
 *   - sparse_tile_keys: their unions and intersections over a query tile,
 *     computed by one warp (every warp that needs them computes them alone:
 *     no shared memory, no barrier, so a TMA producer warp can too).
 *   - StepWalk: the key steps a query tile visits, in ascending order:
 *     analytic for structured masks (sink steps, then window steps), or the
 *     list the layout pre-pass wrote for block layouts. Producer and
 *     consumers of a warp-specialized kernel walk the same list.
 *   - sparse_layout_kernel: the pre-pass, block layout (a user's CSR or a
 *     predicted fixed-stride layout) to per-tile step lists with a 16 x 16
 *     cell mask per listed step (bit a * 8 + c: rows [16a, 16a + 16) of the
 *     tile, keys [16c, 16c + 16) of the step are in a kept block).
 *   - the PREDICT kernels (pool, select) that fill the core's layout regions.
 */
#ifndef QA_CUDA_SPARSE_CUH
#define QA_CUDA_SPARSE_CUH

#include "cuda_device.cuh"
#include "cuda_internal.h"

QA_NAMESPACE_BEGIN

/* Bit 31 of a listed step: the step needs per-element masking (a cell of
 * the tile not kept, or the structured masks or Nk cut it). */
constexpr uint32_t kStepMasked = 0x80000000u;

/* The sparse part of a launch (zero for dense plans). */
struct SparseParams {
    int window;                /* window and sinks apply */
    int wl, wr, sinks;         /* window_left / window_right (-1: unbounded), sink tokens */
    int bn;                    /* keys per step of the attention kernel */
    const int32_t *list_count; /* layout plans: steps per tile [B * Hkv * q_tiles], or NULL */
    const uint32_t *list_steps; /* [tiles][ksteps]: step index | kStepMasked */
    const uint64_t *list_cells; /* [tiles][ksteps]: cell masks */
    int ksteps;                 /* list stride: ceil(Nk / bn) */
    float pv_threshold;         /* 0: off */
};

struct RowKeys {
    int lo, hi, sink; /* [lo, hi) and [0, sink) */
};

/* qattn_sparse_row_keys (src/internal.h) for query row i. */
QA_HOSTDEV RowKeys sparse_row_keys(const SparseParams &sp, int seq_q, int seq_k, bool causal, int i)
{
    const int64_t place = (int64_t)i + seq_k - seq_q;
    int64_t end = seq_k, begin = 0, sinks = 0;
    if (causal && place + 1 < end)
        end = place + 1;
    if (sp.window) {
        if (sp.wr >= 0 && place + sp.wr + 1 < end)
            end = place + sp.wr + 1;
        if (sp.wl >= 0 && place - sp.wl > 0)
            begin = place - sp.wl;
        sinks = sp.sinks;
        const int64_t causal_end = causal && place + 1 < seq_k ? place + 1 : seq_k;
        if (sinks > causal_end)
            sinks = causal_end;
    }
    if (end < begin)
        end = begin;
    if (sinks >= begin) {
        begin = 0;
        end = sinks > end ? sinks : end;
        sinks = 0;
    }
    if (sinks < 0)
        sinks = 0;
    RowKeys r;
    r.lo = (int)begin;
    r.hi = (int)end;
    r.sink = (int)sinks;
    return r;
}

/* Over the valid rows of a tile: the keys some row sees (window union
 * [lo_min, hi_max) over rows with a non-empty window, sinks [0, sink_max)),
 * and the keys every row sees ([lo_max, hi_min) or [0, sink_min)). */
struct TileKeys {
    int lo_min, hi_max, sink_max;
    int lo_max, hi_min, sink_min;
};

QA_DEV uint32_t warp_min_u32(uint32_t v)
{
QA_UNROLL
    for (int s = 1; s < 32; s <<= 1) {
        const uint32_t o = shfl_xor(v, s);
        v = o < v ? o : v;
    }
    return v;
}
QA_DEV uint32_t warp_max_u32(uint32_t v)
{
QA_UNROLL
    for (int s = 1; s < 32; s <<= 1) {
        const uint32_t o = shfl_xor(v, s);
        v = o > v ? o : v;
    }
    return v;
}

/* All 32 lanes of the calling warp must call it (rows lane, lane + 32, ...). */
QA_DEV TileKeys sparse_tile_keys(const SparseParams &sp, int seq_q, int seq_k, bool causal, int i0, int rows_valid)
{
    uint32_t lo_min = 0x7fffffffu, hi_max = 0, sink_max = 0, lo_max = 0, hi_min = 0x7fffffffu,
             sink_min = 0x7fffffffu;
    for (int r = lane_id(); r < rows_valid; r += 32) {
        const RowKeys k = sparse_row_keys(sp, seq_q, seq_k, causal, i0 + r);
        if (k.hi > k.lo) {
            lo_min = min(lo_min, (uint32_t)k.lo);
            hi_max = max(hi_max, (uint32_t)k.hi);
        }
        sink_max = max(sink_max, (uint32_t)k.sink);
        lo_max = max(lo_max, (uint32_t)k.lo);
        hi_min = min(hi_min, (uint32_t)k.hi);
        sink_min = min(sink_min, (uint32_t)k.sink);
    }
    TileKeys t;
    t.lo_min = (int)warp_min_u32(lo_min);
    t.hi_max = (int)warp_max_u32(hi_max);
    t.sink_max = (int)warp_max_u32(sink_max);
    t.lo_max = (int)warp_max_u32(lo_max);
    t.hi_min = (int)warp_min_u32(hi_min);
    t.sink_min = (int)warp_min_u32(sink_min);
    return t;
}

/* Whether every valid row of the tile sees every key of [j0, j0 + bn). */
QA_HOSTDEV bool sparse_step_full(const TileKeys &t, int seq_k, int j0, int bn)
{
    const int j1 = j0 + bn;
    return j1 <= seq_k && ((j0 >= t.lo_max && j1 <= t.hi_min) || j1 <= t.sink_min);
}

/*
 * The key steps (of bn keys) one query tile visits, ascending. Structured
 * masks: the sink steps [0, n_sink), then the window steps [w_begin, w_end)
 * past them. Layouts: the pre-pass's list for the tile.
 */
struct StepWalk {
    int n, n_sink, w_begin, bn, seq_k;
    TileKeys tk;
    const uint32_t *steps; /* NULL: analytic */
    const uint64_t *cells;

    QA_DEV int count() const { return n; }
    /* Key step index of walk position w (< count()). */
    QA_DEV int step(int w) const
    {
        if (steps)
            return (int)(steps[w] & ~kStepMasked);
        return w < n_sink ? w : w_begin + (w - n_sink);
    }
    /* Whether step w needs per-element masking, and its cell mask. */
    QA_DEV bool masked(int w) const
    {
        if (steps)
            return (steps[w] & kStepMasked) != 0;
        return !sparse_step_full(tk, seq_k, step(w) * bn, bn);
    }
    QA_DEV uint64_t cell_mask(int w) const { return steps ? cells[w] : ~(uint64_t)0; }
};

/* The walk of query tile `tile` (rows from i0) of KV head row bhk = b * Hkv + hk.
 * All 32 lanes of the calling warp must call it. */
QA_DEV StepWalk sparse_walk(const SparseParams &sp, int seq_q, int seq_k, bool causal, int q_tiles, int64_t bhk,
                            int tile, int i0, int rows_valid)
{
    StepWalk w;
    w.bn = sp.bn;
    w.seq_k = seq_k;
    w.tk = sparse_tile_keys(sp, seq_q, seq_k, causal, i0, rows_valid);
    if (sp.list_count) {
        const int64_t t = bhk * q_tiles + tile;
        const int c = sp.list_count[t];
        w.n = c < 0 ? 0 : c > sp.ksteps ? sp.ksteps : c;
        w.steps = sp.list_steps + t * sp.ksteps;
        w.cells = sp.list_cells + t * sp.ksteps;
        w.n_sink = w.w_begin = 0;
        return w;
    }
    w.steps = nullptr;
    w.cells = nullptr;
    w.n_sink = (w.tk.sink_max + sp.bn - 1) / sp.bn;
    const int w_end = (w.tk.hi_max + sp.bn - 1) / sp.bn;
    w.w_begin = max(w.n_sink, w.tk.lo_min / sp.bn);
    w.n = w.n_sink + max(0, w_end - w.w_begin);
    return w;
}

/* Whether a (row, key) element is visible in a masked step: key inside
 * the row's intervals and below Nk, and its 16 x 16 cell kept. */
QA_DEV bool sparse_visible(const RowKeys &rk, int key, int seq_k, uint64_t cells, int cell_bit)
{
    return key < seq_k && ((key >= rk.lo && key < rk.hi) || key < rk.sink) && ((cells >> cell_bit) & 1u);
}

/*
 * pv_threshold for a warp that holds 16 query rows (one row group), each
 * thread rows g and g + 8 with NT n8 column groups of P in x (x holds P
 * scaled by `scale`: 448 for FP8 P, else 1): whether every P of the 16 rows
 * lies below 2^-lambda. If so, x becomes 0 (the caller's P V adds nothing)
 * and row_sum gets each row's sum of x (the whole row: every thread of it),
 * for kernels whose P V also computes the row sums. Rows past Nq count as small.
 */
template <int NT>
QA_DEV bool pv_group_skip(float (&x)[NT][4], float lambda, float scale, bool valid0, bool valid1, float (&row_sum)[2])
{
    const float limit = ex2(-lambda) * scale;
    bool small = true;
QA_UNROLL
    for (int hh = 0; hh < 2; hh++) {
        float mx = 0.f, sum = 0.f;
QA_UNROLL
        for (int j = 0; j < NT; j++) {
            mx = fmax_(mx, fmax_(x[j][2 * hh], x[j][2 * hh + 1]));
            sum += x[j][2 * hh] + x[j][2 * hh + 1];
        }
        mx = fmax_(mx, shfl_xor(mx, 1));
        mx = fmax_(mx, shfl_xor(mx, 2));
        sum += shfl_xor(sum, 1);
        sum += shfl_xor(sum, 2);
        row_sum[hh] = sum;
        small = small && (mx < limit || !(hh ? valid1 : valid0));
    }
    const bool skip = !warp_any(!small);
    if (skip) {
QA_UNROLL
        for (int j = 0; j < NT; j++)
QA_UNROLL
            for (int i = 0; i < 4; i++)
                x[j][i] = 0.f;
    } else {
        row_sum[0] = row_sum[1] = 0.f;
    }
    return skip;
}

/* ---------------------------------------------------- the layout pre-pass */

/* One block layout as the pre-pass reads it (see qattn_sparse_layout_row). */
struct LayoutParams {
    SparseParams sp;          /* window, bn, and the list to write */
    const int32_t *ptr;       /* indptr (user CSR) or counts (predicted rows) */
    const int32_t *indices;
    int64_t count, stride;    /* stride 0: CSR with count entries; else fixed rows of stride */
    int q_block, k_block, q_blocks;
    int seq_q, seq_k, causal, heads_kv, q_tiles;
};

constexpr int kLayoutThreads = 128; /* one thread per row of a 128-row tile */

QA_DEV void layout_row(const LayoutParams &p, int64_t r, int64_t &begin, int64_t &end)
{
    if (p.stride > 0) {
        const int32_t c = p.ptr[r];
        begin = r * p.stride;
        end = begin + (c < 0 ? 0 : c > p.stride ? p.stride : c);
    } else {
        const int32_t a = p.ptr[r], b = p.ptr[r + 1];
        begin = a < 0 ? 0 : a > p.count ? p.count : a;
        end = b < begin ? begin : b > p.count ? p.count : b;
    }
}

/*
 * One CTA per (b, hkv, 128-row query tile): every candidate step of the
 * structured range whose cells hold a kept (query block, key block) pair
 * that the structured masks do not wholly hide, in ascending order, with
 * kStepMasked unless every cell of the valid rows is kept and the step is
 * wholly visible to every row. Shared memory: 3 x 8 ints of row-group
 * ranges and kLayoutThreads + 1 ints for the scan.
 */
/* A template only so that every translation unit including this header may
 * hold it (a plain __global__ function would be defined once per object). */
template <int kRows> QA_KERNEL(kLayoutThreads) sparse_layout_kernel(const LayoutParams p)
{
    static_assert(kRows == kLayoutThreads, "one thread per row");
    constexpr int kGroups = kRows / 16;
    int *g_lo = (int *)dynamic_smem(), *g_hi = g_lo + kGroups, *g_sink = g_hi + kGroups;
    int *scan = g_sink + kGroups; /* [kLayoutThreads + 1] */
    const int bx = block_x();
    const int tile = bx % p.q_tiles;
    const int64_t bhk = bx / p.q_tiles;
    const int i0 = tile * kRows, rows_valid = min(kRows, p.seq_q - i0);
    const int bn = p.sp.bn, cpb = bn / 16; /* cells per step row */
    const SparseParams &sp = p.sp;

    /* Row-group unions: 16 lanes per group, all 128 threads (rows) at once. */
    {
        const int r = tid();
        uint32_t lo = 0x7fffffffu, hi = 0, sk = 0;
        if (r < rows_valid) {
            const RowKeys k = sparse_row_keys(sp, p.seq_q, p.seq_k, p.causal != 0, i0 + r);
            if (k.hi > k.lo) {
                lo = (uint32_t)k.lo;
                hi = (uint32_t)k.hi;
            }
            sk = (uint32_t)k.sink;
        }
QA_UNROLL
        for (int s = 1; s < 16; s <<= 1) {
            uint32_t o = shfl_xor(lo, s);
            lo = o < lo ? o : lo;
            o = shfl_xor(hi, s);
            hi = o > hi ? o : hi;
            o = shfl_xor(sk, s);
            sk = o > sk ? o : sk;
        }
        if (r % 16 == 0) {
            g_lo[r / 16] = (int)lo;
            g_hi[r / 16] = (int)hi;
            g_sink[r / 16] = (int)sk;
        }
    }
    const TileKeys tk = sparse_tile_keys(sp, p.seq_q, p.seq_k, p.causal != 0, i0, rows_valid);
    sync_block();

    const int n_sink = (tk.sink_max + bn - 1) / bn;
    const int w_begin = max(n_sink, tk.lo_min / bn), w_end = (tk.hi_max + bn - 1) / bn;
    const int n_cand = n_sink + max(0, w_end - w_begin);
    const int groups = (rows_valid + 15) / 16;
    const uint64_t row_cells = cpb == 8 ? 0xffull : (1ull << cpb) - 1;
    uint64_t all_cells = 0;
    for (int a = 0; a < groups; a++)
        all_cells |= row_cells << (8 * a);
    const int64_t t_index = bhk * p.q_tiles + tile;
    uint32_t *out_steps = sp.list_steps ? (uint32_t *)sp.list_steps + t_index * sp.ksteps : nullptr;
    uint64_t *out_cells = (uint64_t *)sp.list_cells + t_index * sp.ksteps;

    int base = 0;
    for (int c0 = 0; c0 < n_cand; c0 += kLayoutThreads) {
        const int ci = c0 + tid();
        uint64_t cells = 0;
        int step = 0;
        if (ci < n_cand) {
            step = ci < n_sink ? ci : w_begin + (ci - n_sink);
            const int64_t j0 = (int64_t)step * bn;
            const int64_t kb_lo = j0 / p.k_block, kb_hi = (j0 + bn - 1) / p.k_block;
            int64_t prev_row = -1;
            uint64_t prev_bits = 0;
            for (int a = 0; a < groups; a++) {
                const int64_t row = bhk * p.q_blocks + (i0 + 16 * a) / p.q_block;
                uint64_t bits = 0;
                if (row == prev_row) {
                    bits = prev_bits;
                } else {
                    int64_t begin, end;
                    layout_row(p, row, begin, end);
                    /* first entry >= kb_lo (the row is ascending) */
                    int64_t lo = begin, hi = end;
                    while (lo < hi) {
                        const int64_t mid = lo + (hi - lo) / 2;
                        if (p.indices[mid] < kb_lo)
                            lo = mid + 1;
                        else
                            hi = mid;
                    }
                    for (int64_t e = lo; e < end && p.indices[e] <= kb_hi; e++) {
                        const int64_t kb = p.indices[e];
                        if (kb < kb_lo)
                            continue; /* an unchecked layout out of order */
                        const int64_t k0 = kb * p.k_block - j0, k1 = k0 + p.k_block;
                        const int c_lo = (int)max((int64_t)0, k0 / 16), c_hi = (int)min((int64_t)cpb, (k1 + 15) / 16);
                        for (int c = c_lo; c < c_hi; c++)
                            bits |= 1ull << c;
                    }
                    prev_row = row;
                    prev_bits = bits;
                }
                /* Cells the structured masks hide from every row of the group. */
                for (int c = 0; c < cpb; c++) {
                    const int64_t k0 = j0 + 16 * c, k1 = k0 + 16;
                    const bool seen = k0 < p.seq_k && ((k0 < g_hi[a] && k1 > g_lo[a]) || k0 < g_sink[a]);
                    if (!seen)
                        bits &= ~(1ull << c);
                }
                cells |= bits << (8 * a);
            }
        }
        const int keep = cells != 0;
        /* Exclusive scan of keep over the CTA (Hillis-Steele in shared memory). */
        scan[tid()] = keep;
        sync_block();
        for (int s = 1; s < kLayoutThreads; s <<= 1) {
            const int v = tid() >= s ? scan[tid() - s] : 0;
            sync_block();
            scan[tid()] += v;
            sync_block();
        }
        const int pos = base + scan[tid()] - keep, total = scan[kLayoutThreads - 1];
        if (keep) {
            const bool full = cells == all_cells && sparse_step_full(tk, p.seq_k, step * bn, bn);
            out_steps[pos] = (uint32_t)step | (full ? 0u : kStepMasked);
            out_cells[pos] = cells;
        }
        base += total;
        sync_block(); /* scan is reused */
    }
    if (tid() == 0)
        ((int32_t *)sp.list_count)[t_index] = base;
}

QA_NAMESPACE_END

#endif
