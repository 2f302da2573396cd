/*
 * Decode-time pruning kernels (namespace qa::prune; one source for the nvcc
 * build and the CPU emulator). Their semantics are src/prune.c's
 * (qattn_kv_meta_update_host, qattn_select_pages_host, adaptive_ok):
 *
 *  - meta_body: after kv_append's write, one warp per (token, KV head) whose
 *    token starts a run of slots in its page recomputes the page's channel-wise
 *    min/max of the dequantized keys (NaN skipped) from all its slots.
 *  - score_body<FMT, D>: one block per (b, hk, chunk of 16-64 pages). Each page's
 *    metadata is read once, 16 bytes per thread (a page's min and max rows
 *    spread over D / (16 / elem) threads), and scored against every query row
 *    of the sequence and every head of the group held in shared memory:
 *    score = max over rows of sum_d max(qs_d lo_d, qs_d hi_d), qs = q * sm_scale.
 *    Scores are written as order-preserving uint32 keys (NaN lowest, -0 as +0).
 *  - topk_body: one block per (b, hk). The unforced pages [sinks, recent_begin)
 *    are ranked by an MSB-first radix select, 2 bits a step (at most 16 steps,
 *    from the highest bit the candidates do not all share, each one packed
 *    64-bit block sum of three counts over the keys the threads hold in
 *    registers as contiguous slices of up to 16), for the threshold key T of
 *    the k-th best; one block scan finds the lowest pages among those equal to
 *    T, another places the selected logical pages ascending (and their
 *    physical pages, which the attention kernel reads directly). Adaptive plans
 *    check adaptive_ok on the device and double the budget in the same block.
 *  - mass_body: one block per (b, hk, logical page): the page's attention mass
 *    exp(sm_scale q.k - lse) summed over its visible keys, the group's heads and
 *    the sequence's queries.
 */
#ifndef QA_CUDA_PRUNE_CUH
#define QA_CUDA_PRUNE_CUH

#include "cuda_device.cuh"
#include "cuda_internal.h"
#include "cuda_paged_kernels.cuh"

QA_NAMESPACE_BEGIN
namespace prune {

using paged::imax;
using paged::imin;
using paged::load_elem;
using paged::min64;

constexpr int kThreads = QA_PAGED_THREADS;
constexpr int kWarps = kThreads / 32;

#if defined(QA_EMULATE)
QA_DEV void atomic_add(uint32_t *p, uint32_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
QA_DEV void load16(const void *p, uint32_t w[4]) { memcpy(w, p, 16); }
#else
QA_DEV void atomic_add(uint32_t *p, uint32_t v) { atomicAdd((unsigned int *)p, v); }
QA_DEV void load16(const void *p, uint32_t w[4])
{
    const uint4 v = __ldg((const uint4 *)p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}
#endif

QA_DEV float e4m3_value(uint32_t code) { return f16_lo(e4m3x2_to_f16x2(code & 0xffu)); }

/* The dequantized value of element `at` of a cache (or metadata) of format fmt. */
QA_DEV float cache_value(int fmt, const uint8_t *base, long long at, float scale)
{
    switch (fmt) {
    case QATTN_KV_FMT_F16: return f16_to_f32(((const uint16_t *)base)[at]);
    case QATTN_KV_FMT_BF16: return bf16_to_f32(((const uint16_t *)base)[at]);
    case QATTN_KV_FMT_FP8: return e4m3_value(base[at]) * scale;
    default: return (float)(int8_t)base[at] * scale;
    }
}

/* The sequence b of checked (or clamped) tables, as the attention kernel reads it. */
struct Seq {
    int q0, q_len, kv_len;
    const int32_t *pages; /* logical page -> physical page */
};
QA_DEV Seq seq_of(const qa_paged_tables &tb, int b)
{
    Seq s;
    const int P = tb.page_size;
    s.q0 = clamp<int>(tb.qo_indptr[b], 0, tb.total_q);
    const int q1 = clamp<int>(tb.qo_indptr[b + 1], s.q0, tb.total_q);
    s.q_len = imin(q1 - s.q0, tb.max_q_len);
    if (tb.dense) {
        s.kv_len = clamp<int>(tb.seq_lens[b], 0, tb.max_pages * P);
        s.pages = tb.block_table + (long long)b * tb.max_pages;
    } else {
        const long long p0 = clamp<long long>(tb.indptr[b], 0, tb.indices_count);
        const long long p1 = clamp<long long>(tb.indptr[b + 1], p0, tb.indices_count);
        const int pages = (int)min64(p1 - p0, tb.max_pages);
        s.kv_len = pages ? (pages - 1) * P + clamp<int>(tb.last_page_len[b], 1, P) : 0;
        s.pages = tb.indices + p0;
    }
    return s;
}
QA_DEV int phys_page(const qa_paged_tables &tb, const Seq &s, int logical)
{
    return clamp<int>(s.pages[logical], 0, tb.num_pages - 1);
}

/* qattn_select_geometry (src/internal.h), the same formula. */
struct Geo {
    int n, sinks, rb, budget, cap;
};
QA_DEV Geo geometry(const qa_select_params &p, int page_size, int kv_len, int q_len)
{
    Geo g;
    const long long n = ((long long)kv_len + page_size - 1) / page_size;
    long long s = p.sink_pages < n ? p.sink_pages : n;
    const long long recent = p.recent_pages > 1 ? p.recent_pages : 1;
    long long rb = n - recent;
    long long first_q = (long long)kv_len - (q_len > 0 ? q_len : 0);
    first_q = first_q > 0 ? first_q / page_size : 0;
    if (first_q < rb)
        rb = first_q;
    if (rb < 0)
        rb = 0;
    if (rb < s)
        s = rb;
    const long long forced = s + (n - rb);
    long long k = p.budget_pages;
    if (k <= 0) {
        const double want = (double)p.budget_fraction * (double)n;
        k = (long long)want;
        k += (double)k < want;
    }
    k = k < forced ? forced : k > n ? n : k;
    long long c = p.adaptive && p.max_budget_pages > 0 ? p.max_budget_pages : n;
    c = c < k ? k : c > n ? n : c;
    g.n = (int)n;
    g.sinks = (int)s;
    g.rb = (int)rb;
    g.budget = (int)k;
    g.cap = p.adaptive ? (int)c : (int)k;
    return g;
}

/* Float to a key whose unsigned order is the score order: NaN lowest, -0 and +0 equal. */
QA_DEV uint32_t score_key(float x)
{
    if (x != x)
        return 0u;
    if (x == 0.f)
        x = 0.f;
    const uint32_t u = float_bits(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* ---------------------------------------------------------- block helpers */

/* Exclusive prefix sum over the block (every thread calls it); *total: the sum. sm: 8 ints of shared memory. */
QA_DEV int block_scan(int v, int *sm, int *total)
{
    const int lane = tid() & 31, warp = tid() >> 5;
    int x = v;
    for (int d = 1; d < 32; d <<= 1) {
        const int y = (int)shfl_idx((uint32_t)x, lane >= d ? lane - d : lane);
        if (lane >= d)
            x += y;
    }
    if (lane == 31)
        sm[warp] = x;
    sync_block();
    int before = 0, all = 0;
    for (int w = 0; w < kWarps; w++) {
        before += w < warp ? sm[w] : 0;
        all += sm[w];
    }
    sync_block();
    *total = all;
    return before + x - v;
}

QA_DEV float block_max(float v, float *sm)
{
    for (int m = 16; m; m >>= 1)
        v = fmaxf(v, shfl_xor(v, m));
    if ((tid() & 31) == 0)
        sm[tid() >> 5] = v;
    sync_block();
    float r = sm[0];
    for (int w = 1; w < kWarps; w++)
        r = fmaxf(r, sm[w]);
    sync_block();
    return r;
}

QA_DEV double shfl_xor_d(double v, int m)
{
    uint64_t u;
    memcpy(&u, &v, 8);
    const uint32_t lo = shfl_xor((uint32_t)u, m), hi = shfl_xor((uint32_t)(u >> 32), m);
    u = (uint64_t)lo | ((uint64_t)hi << 32);
    memcpy(&v, &u, 8);
    return v;
}

QA_DEV double block_sum_d(double v, double *sm)
{
    for (int m = 16; m; m >>= 1)
        v += shfl_xor_d(v, m);
    if ((tid() & 31) == 0)
        sm[tid() >> 5] = v;
    sync_block();
    double r = 0.0;
    for (int w = 0; w < kWarps; w++)
        r += sm[w];
    sync_block();
    return r;
}

QA_DEV float block_sum_f(float v, float *sm)
{
    for (int m = 16; m; m >>= 1)
        v += shfl_xor(v, m);
    if ((tid() & 31) == 0)
        sm[tid() >> 5] = v;
    sync_block();
    float r = 0.f;
    for (int w = 0; w < kWarps; w++)
        r += sm[w];
    sync_block();
    return r;
}

/* The best (value, page) over the block: higher value, then lower page; page -1: none. */
QA_DEV void block_argmax(float &v, int &page, float *smv, int *smp)
{
    for (int m = 16; m; m >>= 1) {
        const float ov = shfl_xor(v, m);
        const int op = (int)shfl_xor((uint32_t)page, m);
        if (op >= 0 && (page < 0 || ov > v || (ov == v && op < page)))
            v = ov, page = op;
    }
    if ((tid() & 31) == 0) {
        smv[tid() >> 5] = v;
        smp[tid() >> 5] = page;
    }
    sync_block();
    v = smv[0];
    page = smp[0];
    for (int w = 1; w < kWarps; w++)
        if (smp[w] >= 0 && (page < 0 || smv[w] > v || (smv[w] == v && smp[w] < page)))
            v = smv[w], page = smp[w];
    sync_block();
}

/* ------------------------------------------------------------- metadata */

QA_DEV void meta_body(const qa_meta_params &p)
{
    const int lane = tid() & 31, H = p.heads_kv, D = p.head_dim, P = p.page_size, fmt = p.cache_format;
    const float inf = inf_f32();
    const long long total = p.num_tokens * H, warps = (long long)grid_x() * kWarps;
    for (long long w = (long long)block_x() * kWarps + (tid() >> 5); w < total; w += warps) {
        const long long t = w / H;
        const int h = (int)(w - t * H);
        const long long slot = p.slots[t];
        if (slot < 0 || slot >= p.capacity)
            continue;
        const long long page = slot / P;
        if (t > 0) { /* the first token of a run of slots in one page recomputes it */
            const long long prev = p.slots[t - 1];
            if (prev >= 0 && prev < p.capacity && prev / P == page)
                continue;
        }
        const long long base = page * p.page_stride + (long long)h * p.head_stride;
        const long long row = (page * H + h) * 2 * D;
        float row_scale_max = 0.f;
        if (fmt == QATTN_KV_FMT_I8_ROW) {
            for (int tt = lane; tt < P; tt += 32) {
                const float sc = p.k_scale[(page * P + tt) * H + h];
                if (sc > row_scale_max)
                    row_scale_max = sc;
            }
            for (int m = 16; m; m >>= 1)
                row_scale_max = fmaxf(row_scale_max, shfl_xor(row_scale_max, m));
        }
        const float head_scale = (fmt == QATTN_KV_FMT_FP8 || fmt == QATTN_KV_FMT_I8) ? p.k_scale[h] : 1.f;
        for (int d = lane; d < D; d += 32) {
            float lo = inf, hi = -inf;
            long long lo_at = base + d, hi_at = base + d;
            for (int tt = 0; tt < P; tt++) {
                const long long at = base + (long long)tt * p.tok_stride + d;
                const float sc = fmt == QATTN_KV_FMT_I8_ROW ? p.k_scale[(page * P + tt) * H + h] : head_scale;
                const float x = cache_value(fmt, p.k, at, sc);
                if (x < lo) {
                    lo = x;
                    lo_at = at;
                }
                if (x > hi) {
                    hi = x;
                    hi_at = at;
                }
            }
            switch (fmt) {
            case QATTN_KV_FMT_F16:
            case QATTN_KV_FMT_BF16:
                ((uint16_t *)p.meta)[row + d] = ((const uint16_t *)p.k)[lo_at];
                ((uint16_t *)p.meta)[row + D + d] = ((const uint16_t *)p.k)[hi_at];
                break;
            case QATTN_KV_FMT_FP8:
            case QATTN_KV_FMT_I8:
                p.meta[row + d] = p.k[lo_at];
                p.meta[row + D + d] = p.k[hi_at];
                break;
            default: {
                const float inv = row_scale_max > 0.f ? 1.f / row_scale_max : 0.f;
                const float l = lo == inf ? 0.f : floorf(lo * inv), u = hi == -inf ? 0.f : ceilf(hi * inv);
                p.meta[row + d] = (uint8_t)(int8_t)fminf(fmaxf(l, -127.f), 127.f);
                p.meta[row + D + d] = (uint8_t)(int8_t)fminf(fmaxf(u, -127.f), 127.f);
                break;
            }
            }
        }
        if (fmt == QATTN_KV_FMT_I8_ROW && lane == 0)
            ((float *)(p.meta + p.scale_offset))[page * H + h] = row_scale_max;
    }
}

/* --------------------------------------------------------------- scoring */

/* The scale of the metadata of (physical page, head). */
QA_DEV float meta_scale(const qa_select_params &p, int fmt, int page, int hk)
{
    if (fmt == QATTN_KV_FMT_FP8 || fmt == QATTN_KV_FMT_I8)
        return p.k_scale[hk];
    if (fmt == QATTN_KV_FMT_I8_ROW)
        return ((const float *)(p.meta + p.meta_scale_offset))[(long long)page * p.heads_kv + hk];
    return 1.f;
}

/* Dequantizes the 16 bytes w of metadata into CH = 16 / elem values. */
template <int FMT> QA_DEV void decode16(const uint32_t w[4], float scale, float *out)
{
    if (FMT == QATTN_KV_FMT_F16) {
        for (int i = 0; i < 4; i++) {
            out[2 * i] = f16_lo(w[i]);
            out[2 * i + 1] = f16_hi(w[i]);
        }
    } else if (FMT == QATTN_KV_FMT_BF16) {
        for (int i = 0; i < 4; i++) {
            out[2 * i] = bits_float(w[i] << 16);
            out[2 * i + 1] = bits_float(w[i] & 0xffff0000u);
        }
    } else if (FMT == QATTN_KV_FMT_FP8) {
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 2; j++) {
                const uint32_t two = e4m3x2_to_f16x2((w[i] >> (16 * j)) & 0xffffu);
                out[4 * i + 2 * j] = f16_lo(two) * scale;
                out[4 * i + 2 * j + 1] = f16_hi(two) * scale;
            }
    } else {
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++)
                out[4 * i + j] = (float)(int8_t)(uint8_t)(w[i] >> (8 * j)) * scale;
    }
}

/* Loads the group's scaled query rows [r0, r0 + n) into qs[n][D]. */
QA_DEV void load_rows(const qa_select_params &p, const Seq &s, int hk, int r0, int n, int D, float *qs)
{
    const int G = p.group;
    for (int idx = tid(); idx < n * D; idx += kThreads) {
        const int r = idx / D, d = idx - r * D, row = r0 + r, i = row / G, g = row - i * G;
        qs[r * D + d] = load_elem(p.q, p.q_elem,
                                  (long long)(s.q0 + i) * p.q_stride0 + (long long)(hk * G + g) * p.q_stride1 + d) *
                        p.sm_scale;
    }
}

template <int FMT, int D> QA_DEV void score_body(const qa_select_params &p)
{
    constexpr int ES = (FMT == QATTN_KV_FMT_F16 || FMT == QATTN_KV_FMT_BF16) ? 2 : 1;
    constexpr int CH = 16 / ES, TP = D / CH, PPI = kThreads / TP; /* channels per thread, threads per page */
    static_assert(TP >= 2 && TP <= 32 && (TP & (TP - 1)) == 0, "page group within a warp");
    if (p.status && (p.status[QATTN_STATUS_NONFINITE] | p.status[QATTN_STATUS_BOUNDS]))
        return;
    const qa_paged_tables &tb = p.tab;
    const long long blk = block_x();
    const int chunk = (int)(blk % p.chunks);
    const long long item = blk / p.chunks;
    const int hk = (int)(item % p.heads_kv), b = (int)(item / p.heads_kv);
    const Seq s = seq_of(tb, b);
    if (s.kv_len == 0)
        return;
    const Geo g = geometry(p, tb.page_size, s.kv_len, s.q_len);
    const int begin = imax(g.sinks, chunk * p.chunk_pages), end = imin(g.rb, (chunk + 1) * p.chunk_pages);
    if (begin >= end)
        return;
    float *qs = (float *)dynamic_smem();
    const int rows = s.q_len * p.group, slot = tid() / TP, part = tid() % TP;
    float *score = (float *)p.keys + item * tb.max_pages; /* running maxima as floats, keys at the end */
    for (int r0 = 0; r0 < rows; r0 += p.score_rows) {
        const int nr = imin(p.score_rows, rows - r0);
        sync_block();
        load_rows(p, s, hk, r0, nr, D, qs);
        sync_block();
        /* each thread's next page's metadata is loaded while it scores this one */
        int page = phys_page(tb, s, imin(begin + slot, end - 1));
        uint32_t wl[4], wh[4];
        long long at = (((long long)page * p.heads_kv + hk) * 2 * D + part * CH) * ES;
        load16(p.meta + at, wl);
        load16(p.meta + at + D * ES, wh);
        for (int base = begin; base < end; base += PPI) {
            const int lp = base + slot;
            const bool valid = lp < end;
            const float sc = meta_scale(p, FMT, page, hk);
            uint32_t cl[4], chh[4];
            for (int i = 0; i < 4; i++)
                cl[i] = wl[i], chh[i] = wh[i];
            if (base + PPI < end) { /* issued before this page's data is used: two pages in flight */
                page = phys_page(tb, s, imin(lp + PPI, end - 1));
                at = (((long long)page * p.heads_kv + hk) * 2 * D + part * CH) * ES;
                load16(p.meta + at, wl);
                load16(p.meta + at + D * ES, wh);
            }
            float lo[CH], hi[CH];
            decode16<FMT>(cl, sc, lo);
            decode16<FMT>(chh, sc, hi);
            float best = -inf_f32();
            for (int r = 0; r < nr; r++) {
                const float *q = qs + r * D + part * CH;
                float u = 0.f;
                QA_UNROLL
                for (int c = 0; c < CH; c++) {
                    const float a = q[c] * lo[c], bb = q[c] * hi[c];
                    u += a > bb ? a : bb;
                }
                QA_UNROLL
                for (int m = 1; m < TP; m <<= 1)
                    u += shfl_xor(u, m);
                best = u > best ? u : best;
            }
            if (valid && part == 0) {
                if (r0 > 0) {
                    const float prev = score[lp];
                    best = prev > best ? prev : best;
                }
                score[lp] = best;
            }
        }
    }
    /* the same thread wrote each page's score: turn it into its key */
    for (int base = begin; base < end; base += PPI) {
        const int lp = base + slot;
        if (lp < end && part == 0) /* no query rows: every score is -inf, as the reference's */
            p.keys[item * tb.max_pages + lp] = score_key(rows > 0 ? score[lp] : -inf_f32());
    }
}

/* ----------------------------------------------------------------- top-k */

/* Shared memory of the top-k block. */
struct TopkSmem {
    int scan[8];
    float fv[8];
    int fi[8];
    double dv[8];
    uint64_t uv[8];
    int picks[QATTN_SELECT_EXACT_PAGES];
};
QA_HOSTDEV int topk_smem_bytes(int head_dim)
{
    return (int)sizeof(TopkSmem) + head_dim * 4 + QA_SELECT_SMEM_KEYS * 4;
}

QA_DEV uint64_t block_sum_u64(uint64_t v, uint64_t *sm)
{
    for (int m = 16; m; m >>= 1) {
        const uint32_t lo = shfl_xor((uint32_t)v, m), hi = shfl_xor((uint32_t)(v >> 32), m);
        v += (uint64_t)lo | ((uint64_t)hi << 32);
    }
    if ((tid() & 31) == 0)
        sm[tid() >> 5] = v;
    sync_block();
    uint64_t r = 0;
    for (int w = 0; w < kWarps; w++)
        r += sm[w];
    sync_block();
    return r;
}

constexpr int kRegKeys = 16; /* candidates a thread holds in registers: 2048 per block */

/* A thread's contiguous slice [first, first + len) of the candidates' keys: the first kRegKeys in
 * registers (indexed by constants only, so they stay registers), the rest (more than 2048 candidates)
 * read from memory. */
struct Slice {
    uint32_t r[kRegKeys];
    const uint32_t *mem;
    int first, len;
};
QA_DEV void slice_load(Slice &sl, const uint32_t *keys, int n)
{
    const int per = (n + kThreads - 1) / kThreads;
    sl.mem = keys;
    sl.first = imin(tid() * per, n);
    sl.len = imin(per, n - sl.first);
    QA_UNROLL
    for (int j = 0; j < kRegKeys; j++)
        sl.r[j] = j < sl.len ? keys[sl.first + j] : 0u;
}
/* f(j, key) for the slice's keys in order. */
template <typename F> QA_DEV void slice_each(const Slice &sl, F &&f)
{
    QA_UNROLL
    for (int j = 0; j < kRegKeys; j++)
        if (j < sl.len)
            f(j, sl.r[j]);
    for (int j = kRegKeys; j < sl.len; j++)
        f(j, sl.mem[sl.first + j]);
}

/* The threshold key T of the k-th best candidate (k >= 1) by an MSB-first radix select of 2 bits a step
 * (the three counts of a step packed in one 64-bit block sum), and how many of those equal to T are taken. */
QA_DEV void radix_select(const Slice &sl, int k, TopkSmem &sm, uint32_t *T, int *need)
{
    /* the bits every candidate shares (scores of one magnitude share sign and exponent) need no step */
    uint32_t all_and = ~0u, all_or = 0u;
    slice_each(sl, [&](int, uint32_t key) {
        all_and &= key;
        all_or |= key;
    });
    for (int m = 16; m; m >>= 1) {
        all_and &= shfl_xor(all_and, m);
        all_or |= shfl_xor(all_or, m);
    }
    if ((tid() & 31) == 0) {
        sm.scan[tid() >> 5] = (int)all_and;
        sm.fi[tid() >> 5] = (int)all_or;
    }
    sync_block();
    all_and = ~0u, all_or = 0u;
    for (int w = 0; w < kWarps; w++) {
        all_and &= (uint32_t)sm.scan[w];
        all_or |= (uint32_t)sm.fi[w];
    }
    sync_block();
    const uint32_t diff = all_and ^ all_or;
    if (diff == 0) { /* every candidate has the same key */
        *T = all_and;
        *need = k;
        return;
    }
    int top = 31;
    while (!(diff >> top))
        top--;
    const int start = top & ~1; /* the step holding the highest differing bit */
    uint32_t mask = start + 2 >= 32 ? 0u : ~((1u << (start + 2)) - 1u), prefix = all_and & mask;
    uint64_t rem = (uint64_t)k;
    for (int shift = start; shift >= 0; shift -= 2) {
        uint64_t c = 0;
        slice_each(sl, [&](int, uint32_t key) {
            if ((key & mask) == prefix) {
                const uint32_t d = (key >> shift) & 3u;
                c += (uint64_t)(d >= 1) | ((uint64_t)(d >= 2) << 21) | ((uint64_t)(d >= 3) << 42);
            }
        });
        c = block_sum_u64(c, sm.uv);
        const uint64_t c1 = c & 0x1fffffu, c2 = (c >> 21) & 0x1fffffu, c3 = c >> 42;
        uint32_t digit;
        if (rem <= c3) {
            digit = 3;
        } else if (rem <= c2) {
            digit = 2;
            rem -= c3;
        } else if (rem <= c1) {
            digit = 1;
            rem -= c2;
        } else {
            digit = 0;
            rem -= c1;
        }
        prefix |= digit << shift;
        mask |= 3u << shift;
    }
    *T = prefix;
    *need = (int)rem;
}

/* The candidate index of the need-th (from 1) key equal to T, in index order. */
QA_DEV int nth_equal(const Slice &sl, uint32_t T, int need, TopkSmem &sm)
{
    int mine = 0;
    slice_each(sl, [&](int, uint32_t key) { mine += key == T; });
    int total;
    const int before = block_scan(mine, sm.scan, &total);
    if (tid() == 0)
        sm.fi[0] = -1;
    sync_block();
    if (before < need && need <= before + mine) {
        int seen = before;
        slice_each(sl, [&](int j, uint32_t key) {
            if (key == T && ++seen == need)
                sm.fi[0] = sl.first + j;
        });
    }
    sync_block();
    const int r = sm.fi[0];
    sync_block();
    return r;
}

/* The selection of one (b, hk) for a number of ranked pages taken: page lp is selected when forced, or
 * ranked with key > T, or key == T and lp <= last_eq. */
struct Choice {
    int sinks, rb, taken;
    uint32_t T;
    int last_eq; /* absolute logical page */
};
QA_DEV bool chosen(const Choice &c, const uint32_t *keys, int lp)
{
    if (lp < c.sinks || lp >= c.rb)
        return true;
    if (c.taken <= 0)
        return false;
    const uint32_t key = keys[lp - c.sinks];
    return key > c.T || (key == c.T && lp <= c.last_eq);
}

/* adaptive_ok (src/prune.c) for one (b, hk) and the choice c. */
QA_DEV bool adaptive_ok(const qa_select_params &p, const Seq &s, int hk, int n, const Choice &c, const uint32_t *keys,
                        float *ub, float *lb, float *qs, TopkSmem &sm)
{
    const qa_paged_tables &tb = p.tab;
    const int D = p.head_dim, P = tb.page_size, fmt = p.format, G = p.group, rows = s.q_len * G;
    const float inf = inf_f32();
    const long long head_off = (long long)hk * p.head_stride;
    for (int r = 0; r < rows; r++) {
        sync_block();
        load_rows(p, s, hk, r, 1, D, qs);
        sync_block();
        float m = -inf;
        for (int lp = tid(); lp + 1 < n; lp += kThreads) {
            const int page = phys_page(tb, s, lp);
            const float sc = meta_scale(p, fmt, page, hk);
            const long long row = ((long long)page * p.heads_kv + hk) * 2 * D;
            float u = 0.f, l = 0.f;
            for (int d = 0; d < D; d++) {
                const float a = qs[d] * cache_value(fmt, p.meta, row + d, sc);
                const float bb = qs[d] * cache_value(fmt, p.meta, row + D + d, sc);
                u += a > bb ? a : bb;
                l += a < bb ? a : bb;
            }
            ub[lp] = u;
            lb[lp] = l;
            m = u > m ? u : m;
        }
        m = block_max(m, sm.fv);
        if (m == -inf)
            continue; /* one page: nothing left out */
        /* the best selected full pages by ub (ties: the lower page), one at a time */
        int n_exact = 0;
        for (int e = 0; e < QATTN_SELECT_EXACT_PAGES; e++) {
            float v = -inf;
            int best = -1;
            for (int lp = tid(); lp + 1 < n; lp += kThreads) {
                bool taken = !chosen(c, keys, lp);
                for (int x = 0; x < e; x++)
                    taken |= sm.picks[x] == lp;
                if (!taken && (best < 0 || ub[lp] > v)) /* ascending lp: ties keep the lower */
                    v = ub[lp], best = lp;
            }
            block_argmax(v, best, sm.fv, sm.fi);
            if (best < 0)
                break;
            if (tid() == 0)
                sm.picks[e] = best;
            sync_block();
            n_exact++;
        }
        double U = 0.0, L = 0.0;
        for (int lp = tid(); lp + 1 < n; lp += kThreads) {
            if (!chosen(c, keys, lp)) {
                U += (double)P * exp((double)ub[lp] - (double)m);
                continue;
            }
            bool is_exact = false;
            for (int x = 0; x < n_exact; x++)
                is_exact |= sm.picks[x] == lp;
            if (!is_exact)
                L += (double)P * exp((double)lb[lp] - (double)m);
        }
        for (int idx = tid(); idx < n_exact * P; idx += kThreads) { /* the exact pages' keys */
            const int e = idx / P, t = idx - e * P;
            const int page = phys_page(tb, s, sm.picks[e]);
            const long long at = (long long)page * p.page_stride + (long long)t * p.tok_stride + head_off;
            const float sc = fmt == QATTN_KV_FMT_I8_ROW ? p.k_scale[((long long)page * P + t) * p.heads_kv + hk]
                             : (fmt == QATTN_KV_FMT_FP8 || fmt == QATTN_KV_FMT_I8) ? p.k_scale[hk]
                                                                                    : 1.f;
            float dot = 0.f;
            for (int d = 0; d < D; d++)
                dot += qs[d] * cache_value(fmt, p.k, at + d, sc);
            L += exp((double)dot - (double)m);
        }
        U = block_sum_d(U, sm.dv);
        L = block_sum_d(L, sm.dv);
        if (U > (double)p.epsilon * (L + U))
            return false;
    }
    return true;
}

QA_DEV void topk_body(const qa_select_params &p)
{
    if (p.status && (p.status[QATTN_STATUS_NONFINITE] | p.status[QATTN_STATUS_BOUNDS]))
        return;
    const qa_paged_tables &tb = p.tab;
    const long long item = block_x();
    const int hk = (int)(item % p.heads_kv), b = (int)(item / p.heads_kv);
    const Seq s = seq_of(tb, b);
    const long long M = tb.max_pages;
    if (s.kv_len == 0) {
        if (tid() == 0)
            p.counts[item] = 0;
        return;
    }
    TopkSmem &sm = *(TopkSmem *)dynamic_smem();
    float *qs = (float *)(dynamic_smem() + sizeof(TopkSmem));
    uint32_t *cache = (uint32_t *)(dynamic_smem() + sizeof(TopkSmem) + p.head_dim * 4);
    const Geo g = geometry(p, tb.page_size, s.kv_len, s.q_len);
    const int ranked = g.rb - g.sinks, forced = g.sinks + (g.n - g.rb);
    /* the candidates' keys: in shared memory when they fit (the adaptive check reads them by page) */
    const uint32_t *keys = p.keys + item * M + g.sinks;
    if (ranked <= QA_SELECT_SMEM_KEYS) {
        for (int i = tid(); i < ranked; i += kThreads)
            cache[i] = keys[i];
        sync_block();
        keys = cache;
    }
    Slice sl;
    slice_load(sl, keys, ranked);
    Choice c;
    c.sinks = g.sinks;
    c.rb = g.rb;
    int want = g.budget;
    for (;;) {
        c.taken = imin(want - forced, ranked);
        c.T = 0;
        c.last_eq = -1;
        if (c.taken > 0) {
            int need;
            radix_select(sl, c.taken, sm, &c.T, &need);
            c.last_eq = g.sinks + nth_equal(sl, c.T, need, sm);
        }
        if (!p.adaptive || want >= g.cap ||
            adaptive_ok(p, s, hk, g.n, c, keys, p.ub + item * M, p.lb + item * M, qs, sm))
            break;
        want = want * 2 < g.cap ? want * 2 : g.cap;
    }
    /* the selection, ascending: the sinks, the taken candidates (exactly c.taken of them, placed by a
     * scan of the threads' slices), the recent pages; and their physical pages */
    int32_t *out = p.pages + item * M, *phys = p.phys + item * M;
    for (int lp = tid(); lp < g.n; lp += kThreads)
        if (lp < g.sinks || lp >= g.rb) {
            const int at = lp < g.sinks ? lp : g.sinks + imax(c.taken, 0) + (lp - g.rb);
            out[at] = lp;
            phys[at] = s.pages[lp];
        }
    if (c.taken > 0) {
        auto take = [&](int j, uint32_t key) { return key > c.T || (key == c.T && g.sinks + sl.first + j <= c.last_eq); };
        int mine = 0;
        slice_each(sl, [&](int j, uint32_t key) { mine += take(j, key); });
        int total;
        int at = g.sinks + block_scan(mine, sm.scan, &total);
        slice_each(sl, [&](int j, uint32_t key) {
            if (take(j, key)) {
                const int lp = g.sinks + sl.first + j;
                out[at] = lp;
                phys[at] = s.pages[lp];
                at++;
            }
        });
    }
    if (tid() == 0)
        p.counts[item] = forced + imax(c.taken, 0);
}

/* ------------------------------------------------------------ page mass */

constexpr int kMassTile = 32; /* keys and query rows per shared-memory tile */

QA_DEV void mass_body(const qa_mass_params &p)
{
    const qa_paged_tables &tb = p.tab;
    const long long M = tb.max_pages, blk = block_x();
    const int lp = (int)(blk % M);
    const long long item = blk / M;
    const int hk = (int)(item % p.heads_kv), b = (int)(item / p.heads_kv);
    const Seq s = seq_of(tb, b);
    const int P = tb.page_size, D = p.head_dim, G = p.group, fmt = p.format;
    const int n = (s.kv_len + P - 1) / P, rows = s.q_len * G;
    float *out = p.mass + item * M + lp;
    if (lp >= n) {
        if (tid() == 0)
            *out = 0.f;
        return;
    }
    float *ks = (float *)dynamic_smem(), *qs = ks + kMassTile * D, *ls = qs + kMassTile * D, *red = ls + kMassTile;
    const int page = phys_page(tb, s, lp);
    const long long head_off = (long long)hk * p.head_stride;
    const float inf = inf_f32();
    float acc = 0.f;
    for (int t0 = 0; t0 < P; t0 += kMassTile) {
        const int ntok = imin(imin(kMassTile, P - t0), s.kv_len - lp * P - t0);
        if (ntok <= 0)
            break;
        sync_block();
        for (int idx = tid(); idx < kMassTile * D; idx += kThreads) {
            const int t = idx / D, d = idx - t * D;
            float x = 0.f;
            if (t < ntok) {
                const long long at = (long long)page * p.page_stride + (long long)(t0 + t) * p.tok_stride + head_off + d;
                const float sc = fmt == QATTN_KV_FMT_I8_ROW
                                     ? p.k_scale[((long long)page * P + t0 + t) * p.heads_kv + hk]
                                 : (fmt == QATTN_KV_FMT_FP8 || fmt == QATTN_KV_FMT_I8) ? p.k_scale[hk]
                                                                                        : 1.f;
                x = cache_value(fmt, p.k, at, sc);
            }
            ks[idx] = x;
        }
        for (int r0 = 0; r0 < rows; r0 += kMassTile) {
            const int nr = imin(kMassTile, rows - r0);
            sync_block();
            for (int idx = tid(); idx < kMassTile * D; idx += kThreads) {
                const int r = idx / D, d = idx - r * D, row = r0 + r, i = row / G, g = row - i * G;
                qs[idx] = r < nr ? load_elem(p.q, p.q_elem,
                                             (long long)(s.q0 + i) * p.q_stride0 +
                                                 (long long)(hk * G + g) * p.q_stride1 + d)
                                 : 0.f;
            }
            for (int r = tid(); r < kMassTile; r += kThreads) {
                const int row = r0 + r, i = row / G, g = row - i * G;
                ls[r] = r < nr ? p.lse[(long long)(s.q0 + i) * p.heads_q + hk * G + g] : -inf;
            }
            sync_block();
            for (int pair = tid(); pair < kMassTile * kMassTile; pair += kThreads) {
                const int t = pair % kMassTile, r = pair / kMassTile;
                if (t >= ntok || r >= nr || ls[r] == -inf)
                    continue;
                const int i = (r0 + r) / G, j = lp * P + t0 + t;
                if (p.causal && j > i + s.kv_len - s.q_len)
                    continue;
                float dot = 0.f;
                for (int d = 0; d < D; d++)
                    dot += qs[r * D + d] * ks[t * D + d];
                acc += expf(p.sm_scale * dot - ls[r]);
            }
        }
    }
    acc = block_sum_f(acc, red);
    if (tid() == 0)
        *out = acc;
}

QA_HOSTDEV int mass_smem_bytes(int head_dim) { return (2 * kMassTile * head_dim + kMassTile + kWarps) * 4; }

/* ---------------------------------------------------------------- kernels */

QA_KERNEL(QA_PAGED_THREADS) meta_kernel(const QA_GRID_CONSTANT qa_meta_params p) { meta_body(p); }

template <int FMT, int D> QA_KERNEL(QA_PAGED_THREADS) score_kernel(const QA_GRID_CONSTANT qa_select_params p)
{
    score_body<FMT, D>(p);
}

QA_KERNEL(QA_PAGED_THREADS) topk_kernel(const QA_GRID_CONSTANT qa_select_params p) { topk_body(p); }

QA_KERNEL(QA_PAGED_THREADS) mass_kernel(const QA_GRID_CONSTANT qa_mass_params p) { mass_body(p); }

} // namespace prune
QA_NAMESPACE_END

#endif
