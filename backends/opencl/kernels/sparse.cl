/*
 * Sparse attention (sequence pruning), OpenCL C 1.2: the structured masks as
 * the flash kernel's SPARSE variant computes them, and (with SPARSE_KERNELS)
 * the kernels that run before it:
 *   sparse_pool     per Q block and K block: the mean and the smallest cosine
 *                   of a token to it (src/sparse.c, pool_block)
 *   sparse_select   per layout row (b, hkv, q block): the predicted key
 *                   blocks (qattn_sparse_select_host), in fixed-stride rows
 *   sparse_density  per (b, hkv): kept / visible blocks
 *   sparse_lists    a layout (the user's block CSR or the predicted rows) to
 *                   the flash kernel's own tiles: per (b, hkv, query tile of
 *                   BQ rows) the ascending key steps (BK = 64 keys) holding a
 *                   kept (query block, key block) pair, each with a 16x16
 *                   cell mask (bit 4a + c: rows [16a, 16a + 16) of the tile
 *                   and keys [16c, 16c + 16) of the step are in a kept block)
 * Host macros: common.cl's, HEAD_DIM (for sparse_pool, sparse_select).
 */
#define SP_BK 64 /* flash.cl's BK: keys per step */

/* qattn_sparse_row_keys (src/internal.h): the keys [lo, hi) and the sinks
 * [0, sink_end) that query row i sees under causal + window, clamped to [0, nk].
 * left/right arrive as -1 where unbounded (the host folds bounds past nk + nq into -1). */
static inline void sp_row_keys(long i, long nq, long nk, int causal, int window, long left, long right,
                               long sink_tokens, int *lo, int *hi, int *sink_end)
{
    const long place = i + nk - nq;
    long end = nk, begin = 0, sinks = 0;
    if (causal && place + 1 < end)
        end = place + 1;
    if (window) {
        if (right >= 0 && place + right + 1 < end)
            end = place + right + 1;
        if (left >= 0 && place - left > 0)
            begin = place - left;
        sinks = sink_tokens;
        const long causal_end = causal && place + 1 < nk ? place + 1 : nk;
        if (sinks > causal_end)
            sinks = causal_end;
    }
    if (end < begin)
        end = begin;
    if (sinks >= begin) { /* the sinks reach the window: one interval */
        begin = 0;
        end = sinks > end ? sinks : end;
        sinks = 0;
    }
    *lo = (int)clamp(begin, 0L, nk);
    *hi = (int)clamp(end, 0L, nk);
    *sink_end = (int)clamp(sinks, 0L, nk);
}

/* Rows [row0, row0 + rows) of a tile: the union of their keys (the sinks
 * [0, *u_sink) and [*u_lo, *u_hi)) and the keys every one of them sees
 * ([*x_lo, *x_hi), or [0, *x_sink)). */
static inline void sp_tile_keys(int row0, int rows, int nq, int nk, int causal, int window, long left, long right,
                                long sink_tokens, int *u_lo, int *u_hi, int *u_sink, int *x_lo, int *x_hi, int *x_sink)
{
    int ulo = INT_MAX, uhi = 0, usink = 0, xlo = 0, xhi = nk, xsink = nk;
    for (int r = 0; r < rows; r++) {
        int lo, hi, sk;
        sp_row_keys(row0 + r, nq, nk, causal, window, left, right, sink_tokens, &lo, &hi, &sk);
        if (hi > lo) {
            ulo = min(ulo, lo);
            uhi = max(uhi, hi);
        }
        usink = max(usink, sk);
        xlo = max(xlo, lo);
        xhi = min(xhi, hi);
        xsink = min(xsink, sk);
    }
    if (uhi <= ulo)
        ulo = uhi = 0;
    if (rows <= 0)
        xhi = xsink = 0;
    *u_lo = ulo;
    *u_hi = uhi;
    *u_sink = usink;
    *x_lo = xlo;
    *x_hi = xhi;
    *x_sink = xsink;
}

/* The key steps a tile visits: the sink steps [0, *ns), then the window's
 * [*w0, w1) past them; *count in all. Step e is e < ns ? e : w0 + e - ns. */
static inline void sp_tile_steps(int u_lo, int u_hi, int u_sink, int *ns, int *w0, int *count)
{
    const int n_sink = (u_sink + SP_BK - 1) / SP_BK;
    const int w1 = u_hi > u_lo ? (u_hi + SP_BK - 1) / SP_BK : 0;
    const int first = max(n_sink, u_lo / SP_BK);
    *ns = n_sink;
    *w0 = first;
    *count = n_sink + max(0, w1 - first);
}

/* Whether a step [j0, j0 + BK) lies wholly inside the keys every row of the tile sees. */
static inline bool sp_step_full(int j0, int nk, int x_lo, int x_hi, int x_sink)
{
    return j0 + SP_BK <= nk && ((j0 >= x_lo && j0 + SP_BK <= x_hi) || j0 + SP_BK <= x_sink);
}

#ifdef SPARSE_KERNELS

#define SEL_WG 128
#define POOL_WG 64

#if HAS_FP64
typedef double acc_t;
#else
typedef float acc_t;
#endif

/* qattn_sparse_layout_row: a user's CSR (stride 0) or fixed-stride rows with counts, clamped. */
static inline void sp_layout_row(global const int *ptr, long stride, long count, long r, long *begin, long *end)
{
    if (stride > 0) {
        *begin = r * stride;
        *end = *begin + clamp((long)ptr[r], 0L, stride);
    } else {
        long b0 = clamp((long)ptr[r], 0L, count);
        long e0 = ptr[r + 1];
        *begin = b0;
        *end = e0 < b0 ? b0 : e0 > count ? count : e0;
    }
}

kernel void sparse_lists(global const uchar *ptr_buf, long ptr_at, global const uchar *idx_buf, long idx_at,
                         long stride, long count, int q_block, int k_block, int q_blocks, int nq, int nk, int causal,
                         int window, long left, long right, long sink_tokens, int bq, int nqb, int tiles, int nsteps,
                         global uchar *ws, long counts_at, long list_at, long status_at)
{
    const int gid = get_global_id(0);
    if (gid >= tiles || stopped(ws, status_at))
        return;
    global const int *ptr = (global const int *)(ptr_buf + ptr_at);
    global const int *idx = (global const int *)(idx_buf + idx_at);
    const int bhk = gid / nqb, t = gid % nqb;
    const int row0 = t * bq, rows = min(bq, nq - row0);
    int u_lo, u_hi, u_sink, x_lo, x_hi, x_sink, ns, w0, steps;
    sp_tile_keys(row0, rows, nq, nk, causal, window, left, right, sink_tokens, &u_lo, &u_hi, &u_sink, &x_lo, &x_hi,
                 &x_sink);
    sp_tile_steps(u_lo, u_hi, u_sink, &ns, &w0, &steps);
    const int ng = (rows + 15) / 16; /* 16-row groups, each inside one query block */
    long cur[4], end[4];
    for (int a = 0; a < 4; a++) {
        cur[a] = end[a] = 0;
        if (a < ng)
            sp_layout_row(ptr, stride, count, (long)bhk * q_blocks + (row0 + 16 * a) / q_block, &cur[a], &end[a]);
    }
    global uint2 *out = (global uint2 *)(ws + list_at) + (long)gid * nsteps;
    int n = 0;
    for (int e = 0; e < steps; e++) {
        const int s = e < ns ? e : w0 + e - ns;
        const long j0 = (long)s * SP_BK, j1 = min(j0 + SP_BK, (long)nk);
        uint mask = 0u;
        for (int a = 0; a < ng; a++) {
            while (cur[a] < end[a] && ((long)idx[cur[a]] + 1) * k_block <= j0)
                cur[a]++;
            for (long x = cur[a]; x < end[a]; x++) {
                const long k0 = (long)idx[x] * k_block, k1 = k0 + k_block;
                if (k0 >= j1)
                    break;
                for (int c = 0; c < 4; c++) {
                    const long c0 = j0 + 16 * c;
                    if (c0 < j1 && c0 < k1 && c0 + 16 > k0)
                        mask |= 1u << (4 * a + c);
                }
            }
        }
        if (mask && n < nsteps)
            out[n++] = (uint2)((uint)s, mask);
    }
    ((global int *)(ws + counts_at))[gid] = n;
}

/* The pooled mean of one Q or K block and the smallest cosine of its tokens to it (pool_block). */
kernel __attribute__((reqd_work_group_size(POOL_WG, 1, 1))) void sparse_pool(
    global const in_bits *q, global const in_bits *k, long q_off, long q_sb, long q_sh, long q_sn, long k_off,
    long k_sb, long k_sh, long k_sn, int heads_q, int heads_kv, int nq, int nk, int q_block, int k_block, int q_blocks,
    int k_blocks, long q_items, global uchar *ws, long q_pool_at, long k_pool_at, long q_sim_at, long k_sim_at,
    long status_at)
{
    local acc_t mean[HEAD_DIM];
    local acc_t red[POOL_WG];
    if (stopped(ws, status_at))
        return;
    const int lid = get_local_id(0);
    const long item = get_group_id(0);
    const bool is_q = item < q_items;
    const long idx = is_q ? item : item - q_items;
    const long nb = is_q ? q_blocks : k_blocks, heads = is_q ? heads_q : heads_kv;
    const long blk = idx % nb, h = idx / nb % heads, b = idx / nb / heads;
    const long size = is_q ? q_block : k_block, n = is_q ? nq : nk;
    const long t0 = blk * size, t1 = min(n, t0 + size);
    global const in_bits *base = is_q ? q + q_off + b * q_sb + h * q_sh : k + k_off + b * k_sb + h * k_sh;
    const long sn = is_q ? q_sn : k_sn;
    global float *pool = (global float *)(ws + (is_q ? q_pool_at : k_pool_at)) + idx * HEAD_DIM;
    for (int d = lid; d < HEAD_DIM; d += POOL_WG) {
        acc_t a = 0;
        for (long t = t0; t < t1; t++)
            a += (acc_t)load_in(base, t * sn + d);
        a /= (acc_t)(t1 - t0);
        mean[d] = a;
        pool[d] = (float)a;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    acc_t mm = 0;
    for (int d = 0; d < HEAD_DIM; d++)
        mm += mean[d] * mean[d];
    acc_t least = 1;
    for (long t = t0 + lid; t < t1 && mm > 0; t += POOL_WG) {
        acc_t dot = 0, xx = 0;
        for (int d = 0; d < HEAD_DIM; d++) {
            const acc_t x = (acc_t)load_in(base, t * sn + d);
            dot += x * mean[d];
            xx += x * x;
        }
        if (xx > 0 && dot / sqrt(xx * mm) < least)
            least = dot / sqrt(xx * mm);
    }
    red[lid] = least;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid == 0) {
        acc_t x = red[0];
        for (int i = 1; i < POOL_WG; i++)
            x = min(x, red[i]);
        ((global float *)(ws + (is_q ? q_sim_at : k_sim_at)))[idx] = (float)x;
    }
}

/* src/sparse.c's block_keys: the keys query block qb's rows see, [lo, hi) and the sinks [0, sinks). */
static inline void sp_block_keys(long qb, long q_block, long nq, long nk, int causal, int window, long left, long right,
                                 long sink_tokens, long *lo, long *hi, long *sinks)
{
    const long i0 = qb * q_block, i1 = min(nq, i0 + q_block) - 1;
    const long place0 = i0 + nk - nq, place1 = i1 + nk - nq;
    const long cend = causal ? clamp(place1 + 1, 0L, nk) : nk;
    *lo = 0;
    *hi = cend;
    *sinks = 0;
    if (window) {
        if (left >= 0)
            *lo = clamp(place0 - left, 0L, nk);
        if (right >= 0)
            *hi = clamp(place1 + right + 1, 0L, cend);
        *sinks = min(sink_tokens, cend);
    }
}

static inline bool sp_block_visible(long kb, long k_block, long nk, long lo, long hi, long sinks)
{
    const long k0 = kb * k_block, k1 = min(nk, k0 + k_block);
    return k0 < sinks || (k0 < hi && k1 > lo);
}

/* Local reductions over SEL_WG work-items, in place: every work-item gets the result in var. */
#define SEL_ADD(x, y) ((x) + (y))
#define SEL_REDUCE(red, var, OP)                                                                                      \
    do {                                                                                                               \
        barrier(CLK_LOCAL_MEM_FENCE);                                                                                  \
        red[lid] = (var);                                                                                              \
        barrier(CLK_LOCAL_MEM_FENCE);                                                                                  \
        for (int s_ = SEL_WG / 2; s_ > 0; s_ >>= 1) {                                                                  \
            if (lid < s_)                                                                                              \
                red[lid] = OP(red[lid], red[lid + s_]);                                                                \
            barrier(CLK_LOCAL_MEM_FENCE);                                                                              \
        }                                                                                                              \
        (var) = red[0];                                                                                                \
    } while (0)

/*
 * One layout row (b, hkv, q block) per work-group: qattn_sparse_select_host.
 * The weights (uint bits of floats) and keep flags live in the backend's
 * scratch, rows of `scratch_stride` words padded past k_blocks so that no
 * row's work-items store next to another row's; one work-item writes the
 * kept blocks to the row's fixed-stride slots of the indices region, its
 * count, and the visible count (vis).
 */
kernel __attribute__((reqd_work_group_size(SEL_WG, 1, 1))) void sparse_select(
    global uchar *ws, long q_pool_at, long k_pool_at, long q_sim_at, long k_sim_at, long counts_at, long indices_at,
    long keep_at, long vis_at, long weight_at, long scratch_stride, int heads_q, int heads_kv, int group, int nq, int nk, int causal, int window, long left,
    long right, long sink_tokens, int q_block, int k_block, int q_blocks, int k_blocks, float sm_scale,
    float sim_threshold, float cdf_threshold, float topk, long sink_blocks, long recent_blocks, long last_q_blocks,
    long status_at)
{
    local int redi[SEL_WG];
    local acc_t reda[SEL_WG];
    if (stopped(ws, status_at))
        return;
    const int lid = get_local_id(0);
    const long row = get_group_id(0);
    const long qb = row % q_blocks, bhk = row / q_blocks, b = bhk / heads_kv, hk = bhk % heads_kv;
    const long KB = k_blocks;
    long lo, hi, sinks;
    sp_block_keys(qb, q_block, nq, nk, causal, window, left, right, sink_tokens, &lo, &hi, &sinks);
    global uint *out = (global uint *)(ws + indices_at) + row * KB;
    global uint *slot = (global uint *)(ws + weight_at) + row * scratch_stride;
    global uint *keep = (global uint *)(ws + keep_at) + row * scratch_stride;
    global const float *q_pool = (global const float *)(ws + q_pool_at);
    global const float *k_pool = (global const float *)(ws + k_pool_at);
    global const float *q_sim = (global const float *)(ws + q_sim_at);
    global const float *k_sim = (global const float *)(ws + k_sim_at);

    int nvis = 0, first = INT_MAX, last_neg = INT_MAX; /* last as -max */
    for (long kb = lid; kb < KB; kb += SEL_WG) {
        const bool v = sp_block_visible(kb, k_block, nk, lo, hi, sinks);
        keep[kb] = 0;
        if (v) {
            nvis++;
            first = min(first, (int)kb);
            last_neg = min(last_neg, -(int)kb);
        }
    }
    /* Inline on the kernel's own local arrays, and never under a condition. As static inline
     * helpers taking a `local int *` (one of them inside `nvis ? ... : -1`), PoCL 3.1 returned
     * minima over stale entries whenever two or more of its threads ran work-groups at once
     * (every work-item's operand right, red[0] wrong): `last` fell short and rows were pruned to
     * their sink block. One PoCL thread, or this form: no failure. */
    SEL_REDUCE(redi, nvis, SEL_ADD);
    SEL_REDUCE(redi, first, min);
    SEL_REDUCE(redi, last_neg, min);
    const int last = nvis ? -last_neg : -1;
    if (!nvis)
        first = 0;
    const bool whole = qb >= q_blocks - last_q_blocks;
    if (whole) {
        for (long kb = lid; kb < KB; kb += SEL_WG)
            if (sp_block_visible(kb, k_block, nk, lo, hi, sinks))
                keep[kb] = 1;
    }
    for (int g = 0; g < group && nvis && !whole; g++) {
        const long bhq = b * heads_q + hk * group + g;
        global const float *qp = q_pool + (bhq * q_blocks + qb) * HEAD_DIM;
        const bool q_unlike = q_sim[bhq * q_blocks + qb] < sim_threshold;
        acc_t mx = -INFINITY;
        for (long kb = first + lid; kb <= last; kb += SEL_WG) {
            if (!sp_block_visible(kb, k_block, nk, lo, hi, sinks))
                continue;
            const long bk = bhk * KB + kb;
            if (q_unlike || k_sim[bk] < sim_threshold)
                keep[kb] = 1; /* the pooled token does not represent the block */
            global const float *kp = k_pool + bk * HEAD_DIM;
            acc_t dot = 0;
            for (int d = 0; d < HEAD_DIM; d++)
                dot += (acc_t)qp[d] * (acc_t)kp[d];
            const acc_t w = dot * (acc_t)sm_scale;
            slot[kb] = as_uint((float)w);
            mx = max(mx, (acc_t)(float)w);
        }
        SEL_REDUCE(reda, mx, max);
        acc_t sum = 0;
        for (long kb = first + lid; kb <= last; kb += SEL_WG) {
            if (!sp_block_visible(kb, k_block, nk, lo, hi, sinks))
                continue;
            const float e = (float)exp((acc_t)as_float(slot[kb]) - mx);
            slot[kb] = as_uint(e);
            sum += (acc_t)e;
        }
        SEL_REDUCE(reda, sum, SEL_ADD);
        barrier(CLK_GLOBAL_MEM_FENCE); /* every weight written */
        const long want = topk > 0.0f ? (long)ceil((acc_t)topk * (acc_t)nvis) : 0;
        const acc_t bar = (acc_t)cdf_threshold * sum;
        for (long kb = first + lid; kb <= last; kb += SEL_WG) {
            if (!sp_block_visible(kb, k_block, nk, lo, hi, sinks))
                continue;
            const float wk = as_float(slot[kb]);
            acc_t mass = 0;
            long rank = 0;
            for (long e = first; e <= last; e++) {
                if (e == kb || !sp_block_visible(e, k_block, nk, lo, hi, sinks))
                    continue;
                const float we = as_float(slot[e]);
                if (we > wk || (we == wk && e < kb)) {
                    mass += (acc_t)we;
                    rank++;
                }
            }
            if (topk > 0.0f ? rank < want : mass < bar)
                keep[kb] = 1;
        }
        barrier(CLK_GLOBAL_MEM_FENCE); /* the weights are read before the next head's */
    }
    /* Forced blocks: the first sink_blocks key blocks and the last recent_blocks visible ones. */
    for (long kb = lid; kb < KB && kb < sink_blocks; kb += SEL_WG)
        if (sp_block_visible(kb, k_block, nk, lo, hi, sinks))
            keep[kb] = 1;
    barrier(CLK_GLOBAL_MEM_FENCE);
    if (lid == 0) {
        for (long kb = last, c = 0; kb >= 0 && c < recent_blocks; kb--)
            if (sp_block_visible(kb, k_block, nk, lo, hi, sinks)) {
                keep[kb] = 1;
                c++;
            }
        int c = 0;
        for (long kb = 0; kb < KB; kb++)
            if (keep[kb])
                out[c++] = (uint)kb;
        ((global int *)(ws + counts_at))[row] = c;
        ((global int *)(ws + vis_at))[row] = nvis;
    }
}

/* Per (b, hkv): the fraction of visible blocks the prediction kept. */
kernel void sparse_density(global uchar *ws, long counts_at, long vis_at, long density_at, int bhk_count, int q_blocks,
                           int k_blocks, long status_at)
{
    const int gid = get_global_id(0);
    if (gid >= bhk_count || stopped(ws, status_at))
        return;
    global const int *counts = (global const int *)(ws + counts_at) + (long)gid * q_blocks;
    global const int *vis = (global const int *)(ws + vis_at) + (long)gid * q_blocks;
    long kept = 0, visible = 0;
    for (int qb = 0; qb < q_blocks; qb++) {
        kept += clamp(counts[qb], 0, k_blocks);
        visible += vis[qb];
    }
    ((global float *)(ws + density_at))[gid] = visible ? (float)((acc_t)kept / (acc_t)visible) : 0.0f;
}

#endif /* SPARSE_KERNELS */
