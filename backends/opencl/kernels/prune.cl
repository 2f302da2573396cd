/*
 * Decode-time pruning over the paged KV cache, OpenCL C 1.2: query-aware page
 * selection (select_scores, select_topk; attention then reads the selected
 * pages through paged.cl's selection indirection) and the attention mass per
 * page (page_mass). The semantics are src/prune.c's (qattn_select_pages_host,
 * adaptive_ok) and backends/cpu/cpu_paged.c's (cpu_paged_page_mass).
 *
 *   select_scores  work-group per (sequence b, KV head hk, chunk of SEL_WG
 *                  pages), a work-item per page: score = the largest bound
 *                  ub = sum_d max(qs_d lo_d, qs_d hi_d) over the group's query
 *                  rows (qs = q * sm_scale in fp32, staged RQ rows at a time
 *                  in local memory; d in order, so the scores equal the
 *                  host's bit for bit); fp32 scores to the workspace scratch.
 *   select_topk    work-group per (b, hk): the forced pages (sinks, recent,
 *                  the query tokens' pages) and the budget's best unforced
 *                  pages, score descending then lower page index first, by a
 *                  radix select of the take-th largest score key (32 counting
 *                  passes) and a scan over the pages equal to it in page
 *                  order; with ADAPTIVE, the budget doubles up to its cap until
 *                  adaptive_ok holds. Writes the chosen flags (scratch), then
 *                  the ascending page list and count (the core's regions).
 *   page_mass      work-group per (b, hk, logical page): sum over the page's
 *                  visible (key, query row, head) triples of
 *                  exp(sm_scale q.k - lse), rows with lse = -inf skipped;
 *                  0 past the sequence's pages.
 * All reductions go through local memory with a barrier at every step; no
 * sub-group operations, no atomics.
 *
 * Host macros: HEAD_DIM, CACHE_FMT (paged.cl's codes), IN_DTYPE (Q), ADAPTIVE,
 * HAS_FP16, HAS_FP64.
 */
#pragma OPENCL FP_CONTRACT OFF

#define FMT_F16 0
#define FMT_BF16 1
#define FMT_FP8 2
#define FMT_I8 3
#define FMT_I8_ROW 4

#define SEL_WG 64
#define RQ 8 /* select_scores: query rows staged per pass */
#define EXACT_PAGES 4 /* QATTN_SELECT_EXACT_PAGES */

#if HAS_FP64
typedef double acc_t;
#else
typedef float acc_t;
#endif

/* The cached element at `at` (element index), dequantized without its scale. */
static inline float raw_value(global const uchar *c, long at)
{
#if CACHE_FMT == FMT_F16
    return vload_half(at, (global const half *)c);
#elif CACHE_FMT == FMT_BF16
    return bf16_bits_to_float(((global const ushort *)c)[at]);
#elif CACHE_FMT == FMT_FP8
    return e4m3_to_float(c[at]);
#else
    return (float)(char)c[at];
#endif
}

/* The scale of the page's metadata codes (1 for f16/bf16). */
static inline float meta_scale(global const uchar *meta, long scale_off, global const float *ks, long page, int hk,
                               int heads)
{
#if CACHE_FMT == FMT_FP8 || CACHE_FMT == FMT_I8
    return ks[hk];
#elif CACHE_FMT == FMT_I8_ROW
    return ((global const float *)(meta + scale_off))[page * heads + hk];
#else
    return 1.0f;
#endif
}

/* Channel d of (page, hk)'s dequantized min and max rows (qattn_kv_meta_read_host). */
static inline void meta_bounds(global const uchar *meta, float msc, long page, int hk, int heads, int d, float *lo,
                               float *hi)
{
    const long row = (page * heads + hk) * 2 * HEAD_DIM;
#if CACHE_FMT == FMT_F16 || CACHE_FMT == FMT_BF16
    *lo = raw_value(meta, row + d);
    *hi = raw_value(meta, row + HEAD_DIM + d);
#else
    *lo = raw_value(meta, row + d) * msc;
    *hi = raw_value(meta, row + HEAD_DIM + d) * msc;
#endif
}

/* A sequence as the kernels see it: clamped like paged_attention's, so unchecked tables never lead outside. */
typedef struct seq_view {
    int q0, q_len, kv_len, n;
    long p0;
} seq_view;

static inline seq_view seq_of(int b, global const int *qo_indptr, global const int *seq_lens,
                              global const int *indptr, global const int *last_page_len, int dense, int max_pages,
                              int page_size, int total_q, int max_q_len, long indices_count)
{
    seq_view s;
    s.q0 = clamp(qo_indptr[b], 0, total_q);
    const int q1 = clamp(qo_indptr[b + 1], s.q0, total_q);
    s.q_len = min(q1 - s.q0, max_q_len);
    s.p0 = 0;
    if (dense) {
        s.kv_len = clamp(seq_lens[b], 0, max_pages * page_size);
    } else {
        s.p0 = clamp((long)indptr[b], 0L, indices_count);
        long p1 = clamp((long)indptr[b + 1], s.p0, indices_count);
        int pages = (int)min(p1 - s.p0, (long)max_pages);
        s.kv_len = pages ? (pages - 1) * page_size + clamp(last_page_len[b], 1, page_size) : 0;
    }
    s.n = (s.kv_len + page_size - 1) / page_size;
    return s;
}

/* Physical page of logical page lp of b (clamped). */
static inline long phys_page(global const int *block_table, global const int *indices, int dense, int b,
                             int max_pages, long p0, int lp, int num_pages)
{
    int e = dense ? block_table[(long)b * max_pages + lp] : indices[p0 + lp];
    return (long)clamp(e, 0, num_pages - 1);
}

/* ------------------------------------------------------------ reductions */

/* The work-group's sum of v (every work-item calls it). */
static inline int wg_sum_int(local int *buf, int v)
{
    const int lid = get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE); /* earlier reads of buf are done */
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = SEL_WG / 2; s > 0; s >>= 1) {
        if (lid < s)
            buf[lid] += buf[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return buf[0];
}

/* The exclusive prefix sum of v over the work-items in order; *total: the sum. buf: SEL_WG + 1 ints. */
static inline int wg_scan_int(local int *buf, int v, int *total)
{
    const int lid = get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE);
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid == 0) {
        int run = 0;
        for (int i = 0; i < SEL_WG; i++) {
            int x = buf[i];
            buf[i] = run;
            run += x;
        }
        buf[SEL_WG] = run;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    *total = buf[SEL_WG];
    return buf[lid];
}

/* The order of scores as unsigned keys: higher score, higher key; -0 = +0; NaN lowest (0). */
static inline uint score_key(float s)
{
    if (isnan(s))
        return 0u;
    uint u = as_uint(s == 0.0f ? 0.0f : s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* ---------------------------------------------------------- select_scores */

kernel __attribute__((reqd_work_group_size(SEL_WG, 1, 1))) void select_scores(
    global const in_bits *q, long q_off, long q_s0, long q_s1, global const uchar *meta, long meta_scale_off,
    global const float *ks, global const int *qo_indptr, global const int *block_table, global const int *seq_lens,
    global const int *indptr, global const int *indices, global const int *last_page_len, int dense,
    int max_pages, int page_size, int num_pages, int total_q, int max_q_len, long indices_count, int heads_kv,
    int group, float sm_scale, int chunks, global uchar *ws, long status_at, long scores_at)
{
    local float qs[RQ * HEAD_DIM];
    if (stopped(ws, status_at))
        return;
    const int lid = get_local_id(0);
    const int chunk = get_group_id(0) % chunks, row = get_group_id(0) / chunks;
    const int b = row / heads_kv, hk = row - b * heads_kv, G = group;
    const seq_view s = seq_of(b, qo_indptr, seq_lens, indptr, last_page_len, dense, max_pages, page_size, total_q,
                              max_q_len, indices_count);
    if (chunk * SEL_WG >= s.n)
        return; /* the whole work-group: past the sequence's pages */
    const int p = chunk * SEL_WG + lid;
    const bool valid = p < s.n;
    const long page = valid ? phys_page(block_table, indices, dense, b, max_pages, s.p0, p, num_pages) : 0;
    const float msc = meta_scale(meta, meta_scale_off, ks, page, hk, heads_kv);
    const int rows = s.q_len * G;
    float best = -INFINITY;
    for (int r0 = 0; r0 < rows; r0 += RQ) {
        barrier(CLK_LOCAL_MEM_FENCE); /* the previous rows are no longer read */
        for (int e = lid; e < RQ * HEAD_DIM; e += SEL_WG) {
            const int r = e / HEAD_DIM, d = e - r * HEAD_DIM;
            float x = 0.0f;
            if (r0 + r < rows) {
                const int i = (r0 + r) / G, g = (r0 + r) - i * G;
                x = load_in(q, q_off + (long)(s.q0 + i) * q_s0 + (long)(hk * G + g) * q_s1 + d) * sm_scale;
            }
            qs[e] = x;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        float u[RQ];
        for (int k = 0; k < RQ; k++)
            u[k] = 0.0f;
        for (int d = 0; d < HEAD_DIM; d++) {
            float lo, hi;
            meta_bounds(meta, msc, page, hk, heads_kv, d, &lo, &hi);
            for (int k = 0; k < RQ; k++) {
                const float a = qs[k * HEAD_DIM + d] * lo, c = qs[k * HEAD_DIM + d] * hi;
                u[k] += a > c ? a : c;
            }
        }
        for (int k = 0; k < RQ; k++)
            if (r0 + k < rows)
                best = u[k] > best ? u[k] : best;
    }
    if (valid)
        ((global float *)(ws + scores_at))[(long)row * max_pages + p] = best;
}

/* ------------------------------------------------------------ select_topk */

/* ceil(fraction * n) for fraction = frac_m * 2^-frac_shift (exact, integer arithmetic). */
static inline long ceil_fraction(long n, long frac_m, int frac_shift)
{
    if (n <= 0 || frac_m <= 0)
        return 0;
    if (frac_shift >= 62)
        return 1;
    const ulong prod = (ulong)frac_m * (ulong)n, r = prod >> frac_shift;
    return (long)(r + ((r << frac_shift) != prod ? 1ul : 0ul));
}

/*
 * chosen[p] (p < n) for a selection taking `take` of the unforced pages
 * [sinks, rb): forced pages, then the take best by score key, the equal keys
 * at the threshold by lower page index. Page p is work-item p % SEL_WG's.
 */
static void select_pass(global const float *scores, global int *chosen, int n, int sinks, int rb, int take,
                        local int *buf)
{
    const int lid = get_local_id(0);
    uint T = 0u;
    int need = 0;
    if (take > 0) {
        for (int bit = 31; bit >= 0; bit--) { /* the largest T with at least `take` keys >= T */
            const uint cand = T | (1u << bit);
            int cnt = 0;
            for (int p = sinks + lid; p < rb; p += SEL_WG)
                cnt += score_key(scores[p]) >= cand;
            if (wg_sum_int(buf, cnt) >= take)
                T = cand;
        }
        int above = 0;
        for (int p = sinks + lid; p < rb; p += SEL_WG)
            above += score_key(scores[p]) > T;
        need = take - wg_sum_int(buf, above);
    }
    int eq_seen = 0;
    for (int base = 0; base < n; base += SEL_WG) {
        const int p = base + lid;
        const bool in = p < n, cand = in && p >= sinks && p < rb;
        const uint key = cand ? score_key(scores[p]) : 0u;
        const bool eq = cand && take > 0 && key == T;
        int eq_total;
        const int eq_rank = eq_seen + wg_scan_int(buf, eq ? 1 : 0, &eq_total);
        eq_seen += eq_total;
        if (in)
            chosen[p] = !cand || (take > 0 && (key > T || (eq && eq_rank < need)));
    }
}

#if ADAPTIVE
/* The work-group's maximum of v (fmax: NaN never wins; every work-item calls it). */
static inline float wg_max_float(local float *buf, float v)
{
    const int lid = get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE);
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = SEL_WG / 2; s > 0; s >>= 1) {
        if (lid < s)
            buf[lid] = fmax(buf[lid], buf[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return buf[0];
}

static inline acc_t wg_sum_acc(local acc_t *buf, acc_t v)
{
    const int lid = get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE);
    buf[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = SEL_WG / 2; s > 0; s >>= 1) {
        if (lid < s)
            buf[lid] += buf[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return buf[0];
}

/* The best (key, page) of the work-group: higher key, then lower page; page -1 is none. */
static inline int wg_argmax(local uint *keys, local int *idx, uint key, int page)
{
    const int lid = get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE);
    keys[lid] = key;
    idx[lid] = page;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = SEL_WG / 2; s > 0; s >>= 1) {
        if (lid < s) {
            const int a = idx[lid], b = idx[lid + s];
            const uint ka = keys[lid], kb = keys[lid + s];
            if (b >= 0 && (a < 0 || kb > ka || (kb == ka && b < a))) {
                keys[lid] = kb;
                idx[lid] = b;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return idx[0];
}

/*
 * src/prune.c's adaptive_ok for (b, hk) under the chosen flags: for every
 * query row and head, U = sum of n_p exp(ub - m) over the unchosen full pages
 * and L = the exact weight of the EXACT_PAGES best chosen full pages by ub
 * (their keys read) + n_p exp(lb - m) of the other chosen full pages, m the
 * largest ub; false as soon as U > epsilon (L + U). The sequence's last page
 * counts in neither. Page p is work-item p % SEL_WG's in every loop, as in
 * select_pass, so each reads back only its own scratch (ubs, lbs, chosen).
 */
static bool adaptive_ok(const seq_view s, int b, int hk, global const in_bits *q, long q_off, long q_s0, long q_s1,
                        global const uchar *meta, long meta_scale_off, global const float *ks,
                        global const uchar *kc, global const int *block_table, global const int *indices, int dense,
                        int max_pages, int page_size, int num_pages, int heads_kv, int group, long page_stride,
                        long tok_stride, long head_stride, float sm_scale, float epsilon,
                        global const int *chosen, global float *ubs, global float *lbs, local float *qrow,
                        local float *fbuf, local acc_t *abuf, local uint *kbuf, local int *ibuf)
{
    const int lid = get_local_id(0), G = group, P = page_size, full = s.n - 1;
    const int rows = s.q_len * G;
    for (int r = 0; r < rows; r++) {
        const int i = r / G, g = r - i * G;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int d = lid; d < HEAD_DIM; d += SEL_WG)
            qrow[d] = load_in(q, q_off + (long)(s.q0 + i) * q_s0 + (long)(hk * G + g) * q_s1 + d) * sm_scale;
        barrier(CLK_LOCAL_MEM_FENCE);
        float mloc = -INFINITY;
        for (int p = lid; p < full; p += SEL_WG) {
            const long page = phys_page(block_table, indices, dense, b, max_pages, s.p0, p, num_pages);
            const float msc = meta_scale(meta, meta_scale_off, ks, page, hk, heads_kv);
            float u = 0.0f, l = 0.0f;
            for (int d = 0; d < HEAD_DIM; d++) {
                float lo, hi;
                meta_bounds(meta, msc, page, hk, heads_kv, d, &lo, &hi);
                const float a = qrow[d] * lo, c = qrow[d] * hi;
                u += a > c ? a : c;
                l += a < c ? a : c;
            }
            ubs[p] = u;
            lbs[p] = l;
            mloc = u > mloc ? u : mloc;
        }
        const float mf = wg_max_float(fbuf, mloc);
        if (mf == -INFINITY)
            continue; /* one page: nothing left out */
        const acc_t m = (acc_t)mf;
        int exact[EXACT_PAGES];
        int n_exact = 0;
        for (int e = 0; e < EXACT_PAGES; e++) { /* the best chosen full pages by ub, lower page first */
            uint best_key = 0u;
            int best = -1;
            for (int p = lid; p < full; p += SEL_WG) {
                bool taken = !chosen[p];
                for (int x = 0; x < e; x++)
                    taken |= x < n_exact && exact[x] == p;
                const uint key = score_key(ubs[p]);
                if (!taken && (best < 0 || key > best_key)) { /* p ascending: the first of equal keys stays */
                    best_key = key;
                    best = p;
                }
            }
            const int win = wg_argmax(kbuf, ibuf, best_key, best);
            if (win < 0)
                break;
            exact[n_exact++] = win;
        }
        acc_t U = 0, L = 0;
        for (int p = lid; p < full; p += SEL_WG) {
            bool is_exact = false;
            for (int x = 0; x < n_exact; x++)
                is_exact |= exact[x] == p;
            if (!chosen[p])
                U += (acc_t)P * exp((acc_t)ubs[p] - m);
            else if (!is_exact)
                L += (acc_t)P * exp((acc_t)lbs[p] - m);
        }
        for (int x = 0; x < n_exact; x++) { /* exact weights: the page's keys, a work-item per token */
            const long page = phys_page(block_table, indices, dense, b, max_pages, s.p0, exact[x], num_pages);
            for (int t = lid; t < P; t += SEL_WG) {
#if CACHE_FMT == FMT_FP8 || CACHE_FMT == FMT_I8
                const float scale = ks[hk];
#elif CACHE_FMT == FMT_I8_ROW
                const float scale = ks[(page * P + t) * heads_kv + hk];
#else
                const float scale = 1.0f;
#endif
                const long at = page * page_stride + (long)t * tok_stride + (long)hk * head_stride;
                float dot = 0.0f;
                for (int d = 0; d < HEAD_DIM; d++)
                    dot += qrow[d] * (raw_value(kc, at + d) * scale);
                L += exp((acc_t)dot - m);
            }
        }
        U = wg_sum_acc(abuf, U);
        L = wg_sum_acc(abuf, L);
        if (U > (acc_t)epsilon * (L + U))
            return false;
    }
    return true;
}
#endif

kernel __attribute__((reqd_work_group_size(SEL_WG, 1, 1))) void select_topk(
    global const int *qo_indptr, global const int *block_table, global const int *seq_lens, global const int *indptr,
    global const int *indices, global const int *last_page_len, int dense, int max_pages, int page_size,
    int num_pages, int total_q, int max_q_len, long indices_count, int heads_kv, long sink_pages, long recent_pages,
    long budget_pages, long frac_m, int frac_shift, long max_budget_pages, global uchar *ws, long status_at,
    long scores_at, long chosen_at, long counts_at, long pages_at, global const in_bits *q, long q_off, long q_s0,
    long q_s1, global const uchar *meta, long meta_scale_off, global const float *ks, global const uchar *kc,
    long page_stride, long tok_stride, long head_stride, int group, float sm_scale, float epsilon, long ubs_at,
    long lbs_at)
{
    local int buf[SEL_WG + 1];
#if ADAPTIVE
    local float qrow[HEAD_DIM], fbuf[SEL_WG];
    local acc_t abuf[SEL_WG];
    local uint kbuf[SEL_WG];
    local int ibuf[SEL_WG];
#endif
    if (stopped(ws, status_at))
        return;
    const int lid = get_local_id(0), row = get_group_id(0);
    const int b = row / heads_kv, P = page_size;
    const seq_view s = seq_of(b, qo_indptr, seq_lens, indptr, last_page_len, dense, max_pages, page_size, total_q,
                              max_q_len, indices_count);
    global int *count_out = (global int *)(ws + counts_at) + row;
    global int *pages_out = (global int *)(ws + pages_at) + (long)row * max_pages;
    global const float *scores = (global const float *)(ws + scores_at) + (long)row * max_pages;
    global int *chosen = (global int *)(ws + chosen_at) + (long)row * max_pages;
    const long n = s.n;
    if (n == 0) {
        if (lid == 0)
            *count_out = 0;
        return;
    }
    /* qattn_select_geometry */
    long sinks = sink_pages < n ? sink_pages : n;
    long rb = n - (recent_pages > 1 ? recent_pages : 1);
    long first_q = (long)s.kv_len - (s.q_len > 0 ? s.q_len : 0);
    first_q = first_q > 0 ? first_q / P : 0;
    rb = first_q < rb ? first_q : rb;
    rb = rb < 0 ? 0 : rb;
    sinks = rb < sinks ? rb : sinks;
    const long forced = sinks + (n - rb);
    long k = budget_pages > 0 ? budget_pages : ceil_fraction(n, frac_m, frac_shift);
    k = k < forced ? forced : k > n ? n : k;
    long cap = ADAPTIVE && max_budget_pages > 0 ? max_budget_pages : n;
    cap = cap < k ? k : cap > n ? n : cap;
    const long ranked = rb - sinks;
    long want = k;
    for (;;) {
        const long take = min(want - forced, ranked);
        select_pass(scores, chosen, (int)n, (int)sinks, (int)rb, (int)take, buf);
        if (!ADAPTIVE || want >= cap)
            break;
        barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE); /* the flags are written */
#if ADAPTIVE
        if (adaptive_ok(s, b, row - b * heads_kv, q, q_off, q_s0, q_s1, meta, meta_scale_off, ks, kc, block_table,
                        indices, dense, max_pages, page_size, num_pages, heads_kv, group, page_stride, tok_stride,
                        head_stride, sm_scale, epsilon, chosen, (global float *)(ws + ubs_at) + (long)row * max_pages,
                        (global float *)(ws + lbs_at) + (long)row * max_pages, qrow, fbuf, abuf, kbuf, ibuf))
            break;
#endif
        want = want * 2 < cap ? want * 2 : cap;
    }
    barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    int run = 0;
    for (int base = 0; base < n; base += SEL_WG) {
        const int p = base + lid;
        const int c = p < n ? chosen[p] : 0;
        int total;
        const int pos = run + wg_scan_int(buf, c, &total);
        if (c)
            pages_out[pos] = p;
        run += total;
    }
    if (lid == 0)
        *count_out = run;
}

/* -------------------------------------------------------------- page_mass */

kernel __attribute__((reqd_work_group_size(SEL_WG, 1, 1))) void page_mass(
    global const in_bits *q, long q_off, long q_s0, long q_s1, global const float *lse, long lse_off,
    global const uchar *kc, global const float *ks, global const int *qo_indptr, global const int *block_table,
    global const int *seq_lens, global const int *indptr, global const int *indices, global const int *last_page_len,
    int dense, int max_pages, int page_size, int num_pages, int total_q, int max_q_len, long indices_count,
    int heads_kv, int group, int heads_q, long page_stride, long tok_stride, long head_stride, int causal,
    float sm_scale, global uchar *ws, long status_at, global float *mass, long mass_off)
{
    local acc_t red[SEL_WG];
    if (stopped(ws, status_at))
        return;
    const int lid = get_local_id(0);
    const int p = get_group_id(0) % max_pages, row = get_group_id(0) / max_pages;
    const int b = row / heads_kv, hk = row - b * heads_kv, G = group, P = page_size;
    const seq_view s = seq_of(b, qo_indptr, seq_lens, indptr, last_page_len, dense, max_pages, page_size, total_q,
                              max_q_len, indices_count);
    global float *out = mass + mass_off + (long)row * max_pages + p;
    if (p >= s.n) {
        if (lid == 0)
            *out = 0.0f;
        return;
    }
    const long page = phys_page(block_table, indices, dense, b, max_pages, s.p0, p, num_pages);
    const int rows = s.q_len * G, toks = min(P, s.kv_len - p * P), pairs = toks * rows;
    acc_t sum = 0;
    for (int x = lid; x < pairs; x += SEL_WG) {
        const int t = x / rows, r = x - t * rows, i = r / G, h = hk * G + (r - i * G);
        const int j = p * P + t;
        const float l = lse[lse_off + (long)(s.q0 + i) * heads_q + h];
        if (!(causal && j > i + s.kv_len - s.q_len) && l != -INFINITY) {
#if CACHE_FMT == FMT_FP8 || CACHE_FMT == FMT_I8
            const float scale = ks[hk];
#elif CACHE_FMT == FMT_I8_ROW
            const float scale = ks[(page * P + t) * heads_kv + hk];
#else
            const float scale = 1.0f;
#endif
            const long at = page * page_stride + (long)t * tok_stride + (long)hk * head_stride;
            const long qa = q_off + (long)(s.q0 + i) * q_s0 + (long)h * q_s1;
            acc_t dot = 0;
            for (int d = 0; d < HEAD_DIM; d++)
                dot += (acc_t)load_in(q, qa + d) * (acc_t)(raw_value(kc, at + d) * scale);
            sum += exp((acc_t)sm_scale * dot - (acc_t)l);
        }
    }
    red[lid] = sum;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int st = SEL_WG / 2; st > 0; st >>= 1) {
        if (lid < st)
            red[lid] += red[lid + st];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0)
        *out = (float)red[0];
}
