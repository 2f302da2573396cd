/*
 * Decode-time pruning, one source for every backend (`test_prune <backend>`;
 * exit 77 when the backend is not usable here; cases a backend does not run
 * are skipped after its QATTN_ERR_UNSUPPORTED, never passed).
 *
 *   meta_*:       the page metadata qattn_kv_append keeps equals the
 *                 channel-wise min/max of each page's dequantized keys, read
 *                 back from the cache (INT8 per-row: a bound within one code),
 *                 also after slots are rewritten;
 *   select_*:     the selected pages equal this file's own reference of the
 *                 bound's top-k (ties within rounding allowed), and attention
 *                 over them matches an fp64 reference over those pages at the
 *                 dense paged bars; a budget that covers the sequence gives
 *                 the dense result;
 *   needle:       planted needle keys are found (page selected, output close
 *                 to the needle's value) with a small budget; the adaptive
 *                 mode finds them too and reports its mean budget;
 *   page_mass:    qattn_paged_page_mass against fp64, and its rows sum to 1;
 *   evict_stream: a stream appended in chunks with decode steps between,
 *                 under a page budget (window and score policies): pool usage
 *                 flat, no page leaked, output equal to attention over the
 *                 kept tokens;
 *   bad_inputs:   every argument error, with nothing changed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "numeric.h"
#include "qattn/qattn.h"
#include "reference.h"

static const char *backend_name;
static qattn_ctx *ctx;
static ref_rng rng;

#define MAX_B 4

#define assert_ok(call)                                                                                                \
    do {                                                                                                               \
        qattn_status s_ = (call);                                                                                      \
        if (s_ != QATTN_OK)                                                                                            \
            fail_msg("%s: %s: %s", #call, qattn_status_str(s_), qattn_last_error(ctx));                               \
    } while (0)

static bool is_cpu(void) { return strcmp(backend_name, "cpu") == 0; }

/* Skips the case when the backend refuses s with QATTN_ERR_UNSUPPORTED (the
 * CPU backend, the reference, must run everything). Returns true to skip. */
static bool unsupported(qattn_status s, const char *what)
{
    if (s == QATTN_ERR_UNSUPPORTED && !is_cpu()) {
        print_message("[  SKIP    ] %s: unsupported on %s: %s\n", what, backend_name, qattn_last_error(ctx));
        return true;
    }
    return false;
}

static qattn_buffer *upload(const void *data, size_t bytes)
{
    qattn_buffer *b = NULL;
    assert_ok(qattn_buffer_create(ctx, bytes ? bytes : 4, &b));
    if (bytes)
        assert_ok(qattn_buffer_upload(b, 0, data, bytes));
    return b;
}

static void *download(qattn_buffer *b, size_t bytes)
{
    void *h = malloc(bytes ? bytes : 1);
    assert_non_null(h);
    if (bytes)
        assert_ok(qattn_buffer_download(b, 0, h, bytes));
    return h;
}

/* ------------------------------------------------------------ a paged cache */

typedef struct cache_case {
    const char *name;
    qattn_dtype dtype;
    qattn_kv_layout layout;
    qattn_kv_scales scales;
    int64_t page_size, heads_q, heads_kv, head_dim;
} cache_case;

typedef struct paged_cache {
    const cache_case *cc;
    qattn_kv_cache_desc desc;
    qattn_kv_cache_sizes sizes;
    qattn_kv_meta_sizes meta_sizes;
    qattn_kv_cache_buffers bufs;
    qattn_page_pool *pool;
    int64_t batch;
    int64_t kv_len[MAX_B];
    int32_t *pages[MAX_B]; /* each sequence's pages, in order */
    int64_t num_pages[MAX_B];
    /* host copies after a download */
    uint8_t *k, *v, *meta;
    float *k_scale, *v_scale;
} paged_cache;

static void cache_init(paged_cache *pc, const cache_case *cc, int64_t num_pages)
{
    memset(pc, 0, sizeof(*pc));
    pc->cc = cc;
    pc->desc = (qattn_kv_cache_desc){.num_pages = num_pages, .page_size = cc->page_size, .heads_kv = cc->heads_kv,
                                     .head_dim = cc->head_dim, .dtype = cc->dtype, .layout = cc->layout,
                                     .scales = cc->scales};
    assert_ok(qattn_kv_cache_bytes(ctx, &pc->desc, &pc->sizes));
    assert_ok(qattn_kv_meta_bytes(ctx, &pc->desc, &pc->meta_sizes));
    assert_ok(qattn_buffer_create(ctx, pc->sizes.cache_bytes, &pc->bufs.k));
    assert_ok(qattn_buffer_create(ctx, pc->sizes.cache_bytes, &pc->bufs.v));
    /* Stale bytes in unfilled slots must not matter: fill with NaN-ish 0xff. */
    assert_ok(qattn_buffer_fill(pc->bufs.k, 0, pc->sizes.cache_bytes, 0xff));
    assert_ok(qattn_buffer_fill(pc->bufs.v, 0, pc->sizes.cache_bytes, 0xff));
    assert_ok(qattn_buffer_create(ctx, pc->meta_sizes.meta_bytes, &pc->bufs.k_meta));
    assert_ok(qattn_buffer_fill(pc->bufs.k_meta, 0, pc->meta_sizes.meta_bytes, 0xff));
    if (cc->scales != QATTN_KV_SCALES_NONE) {
        pc->bufs.k_scale = NULL;
        assert_ok(qattn_buffer_create(ctx, pc->sizes.scale_bytes, &pc->bufs.k_scale));
        assert_ok(qattn_buffer_create(ctx, pc->sizes.scale_bytes, &pc->bufs.v_scale));
        if (cc->scales == QATTN_KV_SCALES_PER_HEAD) {
            float *sc = malloc(pc->sizes.scale_bytes);
            for (int64_t h = 0; h < cc->heads_kv; h++)
                sc[h] = cc->dtype == QATTN_DTYPE_FP8_E4M3 ? (float)(4.0 / 448.0) : (float)(4.0 / 127.0);
            assert_ok(qattn_buffer_upload(pc->bufs.k_scale, 0, sc, pc->sizes.scale_bytes));
            assert_ok(qattn_buffer_upload(pc->bufs.v_scale, 0, sc, pc->sizes.scale_bytes));
            free(sc);
        }
    }
    assert_ok(qattn_page_pool_create(num_pages, &pc->pool));
}

static void cache_free(paged_cache *pc)
{
    qattn_buffer_destroy(pc->bufs.k);
    qattn_buffer_destroy(pc->bufs.v);
    qattn_buffer_destroy(pc->bufs.k_scale);
    qattn_buffer_destroy(pc->bufs.v_scale);
    qattn_buffer_destroy(pc->bufs.k_meta);
    qattn_page_pool_destroy(pc->pool);
    for (int b = 0; b < MAX_B; b++)
        free(pc->pages[b]);
    free(pc->k), free(pc->v), free(pc->meta), free(pc->k_scale), free(pc->v_scale);
}

/* Appends rows [T, Hkv, D] (f32) to sequence b's end, taking pages from the pool as needed. */
static void cache_append(paged_cache *pc, int64_t b, const float *k, const float *v, int64_t T)
{
    const int64_t P = pc->desc.page_size, H = pc->desc.heads_kv, D = pc->desc.head_dim;
    int64_t *slots = malloc((size_t)T * 8);
    for (int64_t t = 0; t < T; t++) {
        int64_t pos = pc->kv_len[b] + t, lp = pos / P;
        if (lp >= pc->num_pages[b]) {
            pc->pages[b] = realloc(pc->pages[b], (size_t)(lp + 1) * 4);
            assert_ok(qattn_page_pool_alloc(pc->pool, 1, &pc->pages[b][lp]));
            pc->num_pages[b] = lp + 1;
        }
        slots[t] = (int64_t)pc->pages[b][lp] * P + pos % P;
    }
    qattn_buffer *kb = upload(k, (size_t)T * H * D * 4), *vb = upload(v, (size_t)T * H * D * 4),
                 *sb = upload(slots, (size_t)T * 8);
    qattn_kv_append_args a = {.cache = &pc->desc, .buffers = &pc->bufs, .num_tokens = T,
                              .new_dtype = QATTN_DTYPE_F32, .new_stride = {H * D, D}, .k_new = kb, .v_new = vb,
                              .slot_mapping = sb};
    assert_ok(qattn_kv_append(ctx, &a));
    qattn_buffer_destroy(kb), qattn_buffer_destroy(vb), qattn_buffer_destroy(sb);
    free(slots);
    pc->kv_len[b] += T;
}

/* Host copies of the cache, scales and metadata. */
static void cache_download(paged_cache *pc)
{
    free(pc->k), free(pc->v), free(pc->meta), free(pc->k_scale), free(pc->v_scale);
    pc->k = download(pc->bufs.k, pc->sizes.cache_bytes);
    pc->v = download(pc->bufs.v, pc->sizes.cache_bytes);
    pc->meta = download(pc->bufs.k_meta, pc->meta_sizes.meta_bytes);
    pc->k_scale = pc->bufs.k_scale ? download(pc->bufs.k_scale, pc->sizes.scale_bytes) : NULL;
    pc->v_scale = pc->bufs.v_scale ? download(pc->bufs.v_scale, pc->sizes.scale_bytes) : NULL;
}

/* Dequantized element d of (page, off, head) of the K (which 0) or V cache. */
static double cached(const paged_cache *pc, int which, int64_t page, int64_t off, int64_t h, int64_t d)
{
    return ref_kv_value(&pc->desc, which ? pc->v : pc->k, which ? pc->v_scale : pc->k_scale, page, off, h, d);
}

/* The metadata's dequantized min (which 0) or max (1) of channel d of (page, head). */
static double meta_value(const paged_cache *pc, int64_t page, int64_t h, int which, int64_t d)
{
    const cache_case *c = pc->cc;
    const size_t at = (size_t)(((page * c->heads_kv + h) * 2 + which) * c->head_dim + d);
    switch (c->dtype) {
    case QATTN_DTYPE_F16: return qattn_f16_to_f32(((const uint16_t *)pc->meta)[at]);
    case QATTN_DTYPE_BF16: return qattn_bf16_to_f32(((const uint16_t *)pc->meta)[at]);
    case QATTN_DTYPE_FP8_E4M3: return qattn_e4m3_to_f32(pc->meta[at]) * (double)pc->k_scale[h];
    default: {
        double scale = c->scales == QATTN_KV_SCALES_PER_ROW
                           ? ((const float *)(pc->meta + pc->meta_sizes.scale_offset))[page * c->heads_kv + h]
                           : pc->k_scale[h];
        return ((const int8_t *)pc->meta)[at] * scale;
    }
    }
}

static const cache_case cache_cases[] = {
    {"f16 NHD", QATTN_DTYPE_F16, QATTN_KV_NHD, QATTN_KV_SCALES_NONE, 16, 8, 2, 64},
    {"bf16 HND", QATTN_DTYPE_BF16, QATTN_KV_HND, QATTN_KV_SCALES_NONE, 16, 8, 2, 64},
    {"fp8 NHD", QATTN_DTYPE_FP8_E4M3, QATTN_KV_NHD, QATTN_KV_SCALES_PER_HEAD, 16, 8, 2, 64},
    {"i8 per-head HND", QATTN_DTYPE_I8, QATTN_KV_HND, QATTN_KV_SCALES_PER_HEAD, 8, 4, 1, 128},
    {"i8 per-row NHD", QATTN_DTYPE_I8, QATTN_KV_NHD, QATTN_KV_SCALES_PER_ROW, 16, 8, 2, 64},
};
#define N_CACHE_CASES (sizeof(cache_cases) / sizeof(cache_cases[0]))

static float *randn_rows(int64_t n, double scale)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)(ref_rng_normal(&rng) * scale);
    return x;
}

/* Keys with page structure, as real caches have (neighbouring tokens alike):
 * each run of `run` tokens shares a random centre, plus noise. */
static float *structured_keys(int64_t T, int64_t H, int64_t D, int64_t run, double centre, double noise)
{
    float *k = malloc((size_t)T * H * D * sizeof(float));
    double *c = malloc((size_t)H * D * sizeof(double));
    for (int64_t t = 0; t < T; t++) {
        if (t % run == 0)
            for (int64_t i = 0; i < H * D; i++)
                c[i] = ref_rng_normal(&rng) * centre;
        for (int64_t i = 0; i < H * D; i++)
            k[t * H * D + i] = (float)(c[i] + ref_rng_normal(&rng) * noise);
    }
    free(c);
    return k;
}

/* Checks the metadata of sequence b's pages against the cache read back. */
static void check_meta(const paged_cache *pc, int64_t b, double *worst_gap)
{
    const cache_case *c = pc->cc;
    const int64_t P = c->page_size, D = c->head_dim;
    for (int64_t lp = 0; lp < pc->num_pages[b]; lp++) {
        const int64_t page = pc->pages[b][lp];
        if ((lp + 1) * P > pc->kv_len[b])
            continue; /* a partly filled page holds stale slots: its metadata is never used */
        for (int64_t h = 0; h < c->heads_kv; h++)
            for (int64_t d = 0; d < D; d++) {
                double lo = INFINITY, hi = -INFINITY, row_scale_max = 0.0;
                for (int64_t t = 0; t < P; t++) {
                    double x = cached(pc, 0, page, t, h, d);
                    lo = x < lo ? x : lo;
                    hi = x > hi ? x : hi;
                    if (c->scales == QATTN_KV_SCALES_PER_ROW)
                        row_scale_max = fmax(row_scale_max, pc->k_scale[(page * P + t) * c->heads_kv + h]);
                }
                double mlo = meta_value(pc, page, h, 0, d), mhi = meta_value(pc, page, h, 1, d);
                if (c->scales == QATTN_KV_SCALES_PER_ROW) { /* outward, within one code of the page scale */
                    double slack = 1e-6 * fabs(lo) + 1e-30;
                    if (!(mlo <= lo + slack && mhi >= hi - 1e-6 * fabs(hi) - 1e-30 &&
                          lo - mlo <= row_scale_max * 1.0001 && mhi - hi <= row_scale_max * 1.0001))
                        fail_msg("%s: page %lld head %lld ch %lld: meta [%g, %g] vs keys [%g, %g] (scale %g)", c->name,
                                 (long long)page, (long long)h, (long long)d, mlo, mhi, lo, hi, row_scale_max);
                    *worst_gap = fmax(*worst_gap, fmax(lo - mlo, mhi - hi) / (row_scale_max > 0 ? row_scale_max : 1));
                } else if (mlo != lo || mhi != hi) {
                    fail_msg("%s: page %lld head %lld ch %lld: meta [%g, %g] but the keys span [%g, %g]", c->name,
                             (long long)page, (long long)h, (long long)d, mlo, mhi, lo, hi);
                }
            }
    }
}

/* Whether the backend keeps metadata for this cache format (skips otherwise). */
static bool meta_supported(const cache_case *cc)
{
    paged_cache pc;
    cache_init(&pc, cc, 1);
    const int64_t n = cc->heads_kv * cc->head_dim;
    float *k = randn_rows(n, 1.0);
    int64_t slot = 0;
    qattn_buffer *kb = upload(k, (size_t)n * 4), *vb = upload(k, (size_t)n * 4), *sb = upload(&slot, 8);
    qattn_kv_append_args a = {.cache = &pc.desc, .buffers = &pc.bufs, .num_tokens = 1, .new_dtype = QATTN_DTYPE_F32,
                              .new_stride = {n, cc->head_dim}, .k_new = kb, .v_new = vb, .slot_mapping = sb};
    qattn_status s = qattn_kv_append(ctx, &a);
    qattn_buffer_destroy(kb), qattn_buffer_destroy(vb), qattn_buffer_destroy(sb);
    free(k);
    cache_free(&pc);
    if (unsupported(s, "page metadata"))
        return false;
    assert_ok(s);
    return true;
}

static void meta_case(void **state)
{
    (void)state;
    for (size_t ci = 0; ci < N_CACHE_CASES; ci++) {
        const cache_case *cc = &cache_cases[ci];
        paged_cache pc;
        cache_init(&pc, cc, 96);
        const int64_t H = cc->heads_kv, D = cc->head_dim, P = cc->page_size;
        /* Chunks of odd sizes, so appends start and end mid-page. */
        const int64_t chunks[MAX_B][4] = {{37, 1, 200, 5}, {16, 16, 1, 0}, {3, 0, 0, 0}};
        if (!meta_supported(cc)) {
            cache_free(&pc);
            skip();
        }
        for (int64_t b = 0; b < 3; b++)
            for (int i = 0; i < 4 && chunks[b][i]; i++) {
                float *k = randn_rows(chunks[b][i] * H * D, 1.0), *v = randn_rows(chunks[b][i] * H * D, 1.0);
                cache_append(&pc, b, k, v, chunks[b][i]);
                free(k), free(v);
            }
        pc.batch = 3;
        /* Rewrite slots inside full pages (an engine correcting tokens): the metadata follows. */
        {
            const int64_t T = 3;
            float *k = randn_rows(T * H * D, 3.0), *v = randn_rows(T * H * D, 1.0);
            int64_t slots[3] = {(int64_t)pc.pages[0][1] * P + 2, (int64_t)pc.pages[0][1] * P + 7,
                                (int64_t)pc.pages[1][0] * P + 0};
            qattn_buffer *kb = upload(k, (size_t)T * H * D * 4), *vb = upload(v, (size_t)T * H * D * 4),
                         *sb = upload(slots, sizeof(slots));
            qattn_kv_append_args a = {.cache = &pc.desc, .buffers = &pc.bufs, .num_tokens = T,
                                      .new_dtype = QATTN_DTYPE_F32, .new_stride = {H * D, D}, .k_new = kb,
                                      .v_new = vb, .slot_mapping = sb};
            assert_ok(qattn_kv_append(ctx, &a));
            qattn_buffer_destroy(kb), qattn_buffer_destroy(vb), qattn_buffer_destroy(sb);
            free(k), free(v);
        }
        cache_download(&pc);
        double gap = 0.0;
        for (int64_t b = 0; b < 3; b++)
            check_meta(&pc, b, &gap);
        const double kv_bytes = 2.0 * (double)pc.sizes.cache_bytes + 2.0 * (double)pc.sizes.scale_bytes;
        print_message("  %-16s metadata %zu B = 1/%.2f of K+V (page %lld)%s\n", cc->name, pc.meta_sizes.meta_bytes,
                      kv_bytes / (double)pc.meta_sizes.meta_bytes, (long long)P,
                      cc->scales == QATTN_KV_SCALES_PER_ROW ? "" : ", exact");
        assert_true((double)pc.meta_sizes.meta_bytes * (double)P <= kv_bytes + 256.0 * P); /* + alignment pad */
        cache_free(&pc);
    }
}

/* ----------------------------------------------------------- selection */

typedef struct select_case {
    const char *name;
    size_t cache_case;
    int64_t batch;
    int64_t kv_len[MAX_B], q_len[MAX_B];
    qattn_page_table_kind table;
    int causal;
    qattn_page_select_desc sel;
} select_case;

/* The reference selection of (b, hk) from the downloaded metadata: pages out[], count returned. */
static int64_t ref_select(const paged_cache *pc, const qattn_page_select_desc *sel, int64_t b, int64_t hk,
                          const float *q, int64_t q_len, int64_t G, float sm_scale, int32_t *out, double *scores,
                          double *kth)
{
    const cache_case *cc = pc->cc;
    const int64_t P = cc->page_size, D = cc->head_dim, kv_len = pc->kv_len[b], n = (kv_len + P - 1) / P;
    *kth = INFINITY;
    if (n == 0)
        return 0;
    for (int64_t p = 0; p < n; p++) { /* score: the largest bound over the group's rows */
        double best = -INFINITY;
        for (int64_t r = 0; r < q_len * G; r++) {
            double ub = 0;
            for (int64_t d = 0; d < D; d++) {
                double qs = (double)q[r * D + d] * sm_scale;
                double a = qs * meta_value(pc, pc->pages[b][p], hk, 0, d), c = qs * meta_value(pc, pc->pages[b][p], hk, 1, d);
                ub += a > c ? a : c;
            }
            best = ub > best ? ub : best;
        }
        scores[p] = best;
    }
    int64_t sinks = sel->sink_pages < n ? sel->sink_pages : n;
    int64_t rb = n - (sel->recent_pages > 1 ? sel->recent_pages : 1);
    int64_t fq = kv_len - q_len > 0 ? (kv_len - q_len) / P : 0;
    rb = fq < rb ? fq : rb;
    rb = rb < 0 ? 0 : rb;
    sinks = sinks > rb ? rb : sinks;
    int64_t forced = sinks + n - rb;
    int64_t k = sel->budget_tokens > 0 ? (sel->budget_tokens + P - 1) / P
                                       : (int64_t)ceil((double)sel->budget_fraction * (double)n - 1e-9);
    k = k < forced ? forced : k > n ? n : k;
    uint8_t *chosen = calloc((size_t)n, 1);
    for (int64_t p = 0; p < n; p++)
        chosen[p] = p < sinks || p >= rb;
    for (int64_t taken = forced; taken < k; taken++) { /* the best unchosen page, lower index on ties */
        int64_t best = -1;
        for (int64_t p = sinks; p < rb; p++)
            if (!chosen[p] && (best < 0 || scores[p] > scores[best]))
                best = p;
        chosen[best] = 1;
        *kth = scores[best];
    }
    int64_t count = 0;
    for (int64_t p = 0; p < n; p++)
        if (chosen[p])
            out[count++] = (int32_t)p;
    free(chosen);
    return count;
}

typedef struct run_result {
    float *o, *lse;
    int32_t *counts, *pages;
} run_result;

/* Runs plan over the cache for queries q [total_q, Hq, D] (f32): O, LSE and (selection plans) the lists. */
static qattn_status run_plan(paged_cache *pc, const qattn_paged_desc *pd, qattn_plan *plan, const float *q,
                             const int32_t *qo_indptr, run_result *rr, qattn_buffer **mass_out)
{
    const int64_t B = pd->batch, M = pd->max_pages_per_seq, Hq = pd->heads_q, D = pd->cache.head_dim;
    int32_t *table = malloc((size_t)(B * M + 1) * 4), *indptr = calloc((size_t)B + 1, 4), *indices = NULL,
            *last = calloc((size_t)B + 1, 4), *lens = calloc((size_t)B + 1, 4);
    const int32_t *lists[MAX_B];
    int64_t counts[MAX_B];
    for (int64_t b = 0; b < B; b++) {
        lists[b] = pc->pages[b];
        counts[b] = pc->num_pages[b];
        lens[b] = (int32_t)pc->kv_len[b];
        last[b] = (int32_t)(pc->kv_len[b] - (pc->num_pages[b] - 1) * pd->cache.page_size);
    }
    int64_t total = 0;
    for (int64_t b = 0; b < B; b++)
        total += counts[b];
    indices = malloc((size_t)(total + 1) * 4);
    assert_ok(qattn_page_tables_build(B, lists, counts, M, table, indptr, indices));
    qattn_buffer *qb = upload(q, (size_t)pd->total_q * Hq * D * 4), *ob = NULL, *lb = NULL, *ws = NULL;
    qattn_buffer *qo = upload(qo_indptr, (size_t)(B + 1) * 4);
    qattn_buffer *tb = upload(table, (size_t)B * M * 4), *sl = upload(lens, (size_t)B * 4);
    qattn_buffer *ip = upload(indptr, (size_t)(B + 1) * 4), *ix = upload(indices, (size_t)(total ? total : 1) * 4),
                 *lp = upload(last, (size_t)B * 4);
    assert_ok(qattn_buffer_create(ctx, (size_t)pd->total_q * Hq * D * 4, &ob));
    assert_ok(qattn_buffer_fill(ob, 0, (size_t)pd->total_q * Hq * D * 4, REF_POISON_BYTE));
    assert_ok(qattn_buffer_create(ctx, (size_t)pd->total_q * Hq * 4, &lb));
    size_t wsz = qattn_plan_workspace_size(plan);
    if (wsz)
        assert_ok(qattn_buffer_create(ctx, wsz, &ws));
    qattn_paged_args a = {.cache = &pc->bufs, .q = qb, .o = ob, .lse = pd->return_lse ? lb : NULL, .qo_indptr = qo,
                          .workspace = ws};
    if (pd->table == QATTN_PAGES_DENSE) {
        a.block_table = tb;
        a.seq_lens = sl;
    } else {
        a.indptr = ip;
        a.indices = ix;
        a.last_page_len = lp;
    }
    qattn_status s = qattn_paged_run(plan, &a);
    if (!s) {
        rr->o = download(ob, (size_t)pd->total_q * Hq * D * 4);
        rr->lse = pd->return_lse ? download(lb, (size_t)pd->total_q * Hq * 4) : NULL;
        rr->counts = rr->pages = NULL;
        if (qattn_paged_selection_read(plan, ws, 0, NULL, NULL) == QATTN_OK) {
            rr->counts = malloc((size_t)B * pd->cache.heads_kv * 4);
            rr->pages = malloc((size_t)B * pd->cache.heads_kv * M * 4);
            assert_ok(qattn_paged_selection_read(plan, ws, 0, rr->counts, rr->pages));
        }
        if (mass_out) {
            assert_ok(qattn_buffer_create(ctx, (size_t)B * pd->cache.heads_kv * M * 4, mass_out));
            assert_ok(qattn_buffer_fill(*mass_out, 0, (size_t)B * pd->cache.heads_kv * M * 4, REF_POISON_BYTE));
            s = qattn_paged_page_mass(plan, &a, *mass_out, 0);
        }
    }
    qattn_buffer *all[] = {qb, ob, lb, ws, qo, tb, sl, ip, ix, lp};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    free(table), free(indptr), free(indices), free(last), free(lens);
    return s;
}

/* fp64 attention of one query row and head over the listed logical pages of
 * sequence b (all when list is NULL), causal as the compacted cache is. */
static void ref_row(const paged_cache *pc, int64_t b, const int32_t *list, int64_t count, const float *q, int64_t hk,
                    int64_t i, int64_t q_len, int causal, double sm_scale, double *out, double *lse)
{
    const int64_t P = pc->cc->page_size, D = pc->cc->head_dim, kv_len = pc->kv_len[b];
    const int64_t n = list ? count : (kv_len + P - 1) / P;
    const int64_t last_len = kv_len - ((kv_len + P - 1) / P - 1) * P;
    const int64_t len = n == 0 ? 0 : (n - 1) * P + last_len;
    double m = -INFINITY, l = 0;
    double *acc = calloc((size_t)D, sizeof(double));
    for (int64_t j = 0; j < len; j++) {
        if (causal && j > i + len - q_len)
            continue;
        int64_t lp = list ? list[j / P] : j / P, page = pc->pages[b][lp], off = j % P;
        double dot = 0;
        for (int64_t d = 0; d < D; d++)
            dot += (double)q[d] * cached(pc, 0, page, off, hk, d);
        double s = dot * sm_scale, mn = s > m ? s : m, c = exp(m - mn), w = exp(s - mn);
        l = l * c + w;
        for (int64_t d = 0; d < D; d++)
            acc[d] = acc[d] * c + w * cached(pc, 1, page, off, hk, d);
        m = mn;
    }
    for (int64_t d = 0; d < D; d++)
        out[d] = l > 0 ? acc[d] / l : 0;
    *lse = l > 0 ? m + log(l) : -INFINITY;
    free(acc);
}

/* Builds a cache for sc: sequence b gets kv_len[b] structured keys. Returns the queries [total_q, Hq, D]. */
static float *build_select_problem(paged_cache *pc, const select_case *sc, int32_t *qo_indptr, int64_t *total_q,
                                   int64_t *max_q, int64_t *max_pages)
{
    const cache_case *cc = &cache_cases[sc->cache_case];
    const int64_t H = cc->heads_kv, D = cc->head_dim, P = cc->page_size, Hq = cc->heads_q;
    int64_t pages = 0;
    *max_pages = 1;
    for (int64_t b = 0; b < sc->batch; b++) {
        pages += (sc->kv_len[b] + P - 1) / P;
        *max_pages = (sc->kv_len[b] + P - 1) / P > *max_pages ? (sc->kv_len[b] + P - 1) / P : *max_pages;
    }
    cache_init(pc, cc, pages + 4);
    pc->batch = sc->batch;
    *total_q = 0;
    *max_q = 1;
    qo_indptr[0] = 0;
    for (int64_t b = 0; b < sc->batch; b++) {
        /* in chunks, with distinct page order (the pool hands pages out lowest first across sequences) */
        for (int64_t done = 0; done < sc->kv_len[b];) {
            int64_t T = sc->kv_len[b] - done < 300 ? sc->kv_len[b] - done : 300;
            float *k = structured_keys(T, H, D, P, 1.0, 0.3), *v = randn_rows(T * H * D, 1.0);
            cache_append(pc, b, k, v, T);
            free(k), free(v);
            done += T;
        }
        *total_q += sc->q_len[b];
        *max_q = sc->q_len[b] > *max_q ? sc->q_len[b] : *max_q;
        qo_indptr[b + 1] = (int32_t)*total_q;
    }
    return randn_rows(*total_q * Hq * D, 1.0);
}

static void select_case_run(void **state)
{
    const select_case *sc = *state;
    const cache_case *cc = &cache_cases[sc->cache_case];
    const int64_t Hq = cc->heads_q, Hkv = cc->heads_kv, D = cc->head_dim, G = Hq / Hkv;
    paged_cache pc;
    int32_t qo_indptr[MAX_B + 1];
    int64_t total_q, max_q, M;
    /* Probe support before building anything. */
    {
        qattn_paged_desc probe = {.cache = {.num_pages = 1, .page_size = cc->page_size, .heads_kv = Hkv,
                                            .head_dim = D, .dtype = cc->dtype, .layout = cc->layout,
                                            .scales = cc->scales},
                                  .batch = 1, .max_pages_per_seq = 1, .total_q = 1, .max_q_len = 1, .heads_q = Hq,
                                  .q_dtype = QATTN_DTYPE_F32, .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}};
        qattn_plan *plan = NULL;
        qattn_status s = qattn_paged_select_plan_create(ctx, &probe, &sc->sel, &plan);
        qattn_plan_destroy(plan);
        if (unsupported(s, sc->name))
            skip();
        assert_ok(s);
    }
    float *q = build_select_problem(&pc, sc, qo_indptr, &total_q, &max_q, &M);
    qattn_paged_desc pd = {.cache = pc.desc, .table = sc->table, .batch = sc->batch, .max_pages_per_seq = M,
                           .total_q = total_q, .max_q_len = max_q, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F32,
                           .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = sc->causal, .return_lse = 1};
    qattn_plan *plan = NULL;
    assert_ok(qattn_paged_select_plan_create(ctx, &pd, &sc->sel, &plan));
    run_result rr;
    assert_ok(run_plan(&pc, &pd, plan, q, qo_indptr, &rr, NULL));
    qattn_plan_destroy(plan);
    assert_non_null(rr.counts);
    cache_download(&pc);

    int32_t *ref = malloc((size_t)M * 4);
    double *scores = malloc((size_t)M * sizeof(double));
    float *qg = malloc((size_t)max_q * G * D * sizeof(float));
    ref_accum acc = {0}, lacc = {0};
    int64_t read = 0, total_pages = 0, near_ties = 0;
    for (int64_t b = 0; b < sc->batch; b++) {
        const int64_t q0 = qo_indptr[b], q_len = qo_indptr[b + 1] - q0;
        for (int64_t hk = 0; hk < Hkv; hk++) {
            for (int64_t i = 0; i < q_len; i++)
                for (int64_t g = 0; g < G; g++)
                    memcpy(qg + (i * G + g) * D, q + ((q0 + i) * Hq + hk * G + g) * D, (size_t)D * 4);
            double kth;
            const float sm = (float)(1.0 / sqrt((double)D));
            int64_t nref = ref_select(&pc, &sc->sel, b, hk, qg, q_len, G, sm, ref, scores, &kth);
            const int32_t *got = rr.pages + (b * Hkv + hk) * M;
            const int64_t ngot = rr.counts[b * Hkv + hk];
            if (!sc->sel.epsilon) { /* fixed budget: the same count, the same pages up to near-ties */
                if (ngot != nref)
                    fail_msg("%s: seq %lld head %lld: %lld pages selected, the reference selects %lld", sc->name,
                             (long long)b, (long long)hk, (long long)ngot, (long long)nref);
                for (int64_t x = 0, y = 0; x < nref || y < ngot;) {
                    if (x < nref && y < ngot && ref[x] == got[y]) {
                        x++, y++;
                        continue;
                    }
                    int64_t p = (y >= ngot || (x < nref && ref[x] < got[y])) ? ref[x++] : got[y++];
                    if (!(fabs(scores[p] - kth) <= 1e-4 * (1 + fabs(kth))))
                        fail_msg("%s: seq %lld head %lld: page %lld (score %.6f) differs from the reference "
                                 "(threshold %.6f)", sc->name, (long long)b, (long long)hk, (long long)p, scores[p], kth);
                    near_ties++;
                }
            } else { /* adaptive: at least the fixed budget's pages, ascending, within the sequence */
                assert_true(ngot >= nref);
                for (int64_t y = 1; y < ngot; y++)
                    assert_true(got[y] > got[y - 1]);
                assert_true(ngot == 0 || got[ngot - 1] == pc.num_pages[b] - 1);
            }
            read += ngot;
            total_pages += pc.num_pages[b];
            /* attention over the selected pages against fp64 */
            double *out = malloc((size_t)D * sizeof(double)), lse;
            for (int64_t i = 0; i < q_len; i++)
                for (int64_t g = 0; g < G; g++) {
                    const int64_t h = hk * G + g, row = q0 + i;
                    ref_row(&pc, b, got, ngot, q + (row * Hq + h) * D, hk, i, q_len, sc->causal,
                            1.0 / sqrt((double)D), out, &lse);
                    for (int64_t d = 0; d < D; d++)
                        ref_accum_add(&acc, rr.o[(row * Hq + h) * D + d], out[d]);
                    ref_accum_add(&lacc, rr.lse[row * Hq + h], lse);
                }
            free(out);
        }
    }
    ref_metrics m = ref_accum_finish(&acc), lm = ref_accum_finish(&lacc);
    print_message("  %-28s read %lld of %lld pages (%.1f%%), %lld near-tie swaps; vs fp64 over them: cos %.7f "
                  "relL1 %.2e, lse max %.2e\n",
                  sc->name, (long long)read, (long long)total_pages, 100.0 * (double)read / (double)total_pages,
                  (long long)near_ties, m.cos_sim, m.rel_l1, lm.max_abs);
    assert_int_equal(m.nonfinite, 0);
    assert_true(m.cos_sim >= 0.99999 && m.rel_l1 <= 2e-3 && lm.max_abs <= 1e-3);
    free(ref), free(scores), free(qg), free(q);
    free(rr.o), free(rr.lse), free(rr.counts), free(rr.pages);
    cache_free(&pc);
}

static const select_case select_cases[] = {
    {"decode f16 budget 256", 0, 3, {1000, 37, 530}, {1, 1, 1}, QATTN_PAGES_CSR, 1, {.budget_tokens = 256, .sink_pages = 1, .recent_pages = 2}},
    {"decode bf16 fraction 0.2", 1, 2, {700, 1210}, {1, 1}, QATTN_PAGES_DENSE, 0, {.budget_fraction = 0.2f}},
    {"decode fp8 budget 100", 2, 2, {900, 17}, {1, 1}, QATTN_PAGES_DENSE, 1, {.budget_tokens = 100, .sink_pages = 2, .recent_pages = 1}},
    {"decode i8 head budget 64", 3, 2, {641, 300}, {1, 1}, QATTN_PAGES_CSR, 1, {.budget_tokens = 64, .recent_pages = 3}},
    {"decode i8 row budget 128", 4, 2, {777, 64}, {1, 1}, QATTN_PAGES_DENSE, 1, {.budget_tokens = 128, .sink_pages = 1}},
    {"chunked prefill f16 q=40", 0, 2, {900, 333}, {40, 7}, QATTN_PAGES_CSR, 1, {.budget_tokens = 192, .sink_pages = 1, .recent_pages = 1}},
    {"adaptive f16 eps 0.05", 0, 2, {1500, 400}, {1, 1}, QATTN_PAGES_CSR, 1, {.budget_tokens = 64, .sink_pages = 1, .recent_pages = 1, .epsilon = 0.05f, .max_budget_tokens = 1024}},
};

/* A budget covering the sequence reads everything: the dense plan's result. */
static void budget_covers_dense_case(void **state)
{
    (void)state;
    const select_case sc = {"covering budget", 0, 2, {300, 45}, {1, 3}, QATTN_PAGES_CSR, 1, {.budget_tokens = 4096}};
    const cache_case *cc = &cache_cases[0];
    const int64_t Hq = cc->heads_q, D = cc->head_dim;
    {
        qattn_paged_desc probe = {.cache = {.num_pages = 1, .page_size = 16, .heads_kv = cc->heads_kv, .head_dim = D,
                                            .dtype = cc->dtype},
                                  .batch = 1, .max_pages_per_seq = 1, .total_q = 1, .max_q_len = 1, .heads_q = Hq,
                                  .q_dtype = QATTN_DTYPE_F32, .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}};
        qattn_plan *plan = NULL;
        qattn_status s = qattn_paged_select_plan_create(ctx, &probe, &sc.sel, &plan);
        qattn_plan_destroy(plan);
        if (unsupported(s, sc.name))
            skip();
    }
    paged_cache pc;
    int32_t qo[MAX_B + 1];
    int64_t total_q, max_q, M;
    float *q = build_select_problem(&pc, &sc, qo, &total_q, &max_q, &M);
    qattn_paged_desc pd = {.cache = pc.desc, .table = sc.table, .batch = sc.batch, .max_pages_per_seq = M,
                           .total_q = total_q, .max_q_len = max_q, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F32,
                           .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1, .return_lse = 1,
                           .num_splits = 1};
    qattn_plan *sel_plan = NULL, *dense_plan = NULL;
    assert_ok(qattn_paged_select_plan_create(ctx, &pd, &sc.sel, &sel_plan));
    assert_ok(qattn_paged_plan_create(ctx, &pd, &dense_plan));
    run_result a, b;
    assert_ok(run_plan(&pc, &pd, sel_plan, q, qo, &a, NULL));
    assert_ok(run_plan(&pc, &pd, dense_plan, q, qo, &b, NULL));
    double worst = 0;
    for (int64_t i = 0; i < total_q * Hq * D; i++)
        worst = fmax(worst, fabs((double)a.o[i] - b.o[i]));
    print_message("  covering budget vs dense plan: max |diff| %.3g\n", worst);
    assert_true(worst <= 1e-6);
    qattn_plan_destroy(sel_plan), qattn_plan_destroy(dense_plan);
    free(q), free(a.o), free(a.lse), free(a.counts), free(a.pages), free(b.o), free(b.lse);
    cache_free(&pc);
}

/* -------------------------------------------------------------- needles */

/* Passkey-style retrieval: n distractor keys (pages of alike tokens), one
 * needle key at a random depth whose direction only the query holds, with a
 * logit of `needle` over distractor logits of spread ~1. Success: the
 * needle's page is selected and the output is the needle's value (cos >= 0.99). */
static void needle_trials(int64_t n, int64_t trials, const qattn_page_select_desc *sel, int *found, double *mean_pages)
{
    const cache_case *cc = &cache_cases[0];
    const int64_t Hq = 4, Hkv = 1, D = cc->head_dim, P = cc->page_size, G = Hq / Hkv;
    cache_case one = *cc;
    one.heads_q = Hq;
    one.heads_kv = Hkv;
    *found = 0;
    *mean_pages = 0;
    for (int64_t trial = 0; trial < trials; trial++) {
        paged_cache pc;
        cache_init(&pc, &one, (n + P - 1) / P + 1);
        pc.batch = 1;
        /* the needle direction u (unit), the query 4 * sqrt(D) * u per head plus noise */
        double *u = malloc((size_t)D * sizeof(double)), norm = 0;
        for (int64_t d = 0; d < D; d++)
        {
            u[d] = ref_rng_normal(&rng);
            norm += u[d] * u[d];
        }
        for (int64_t d = 0; d < D; d++)
            u[d] /= sqrt(norm);
        const int64_t at = (int64_t)(ref_rng_uniform(&rng) * (double)(n - 2 * P)) + P / 2;
        float *needle_v = randn_rows(D, 1.0);
        for (int64_t done = 0; done < n;) {
            int64_t T = n - done < 4096 ? n - done : 4096;
            /* distractors: logit spread ~1 after sm_scale for a query of norm 4 sqrt(D) */
            float *k = structured_keys(T, Hkv, D, P, 0.2, 0.05), *v = randn_rows(T * Hkv * D, 1.0);
            if (at >= done && at < done + T) {
                for (int64_t d = 0; d < D; d++) { /* logit 4 sqrt(D) * 5 / sqrt(D) = 20 */
                    k[(at - done) * D + d] = (float)(5.0 * u[d]);
                    v[(at - done) * D + d] = needle_v[d];
                }
            }
            cache_append(&pc, 0, k, v, T);
            free(k), free(v);
            done += T;
        }
        float *q = malloc((size_t)Hq * D * sizeof(float));
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t d = 0; d < D; d++)
                q[h * D + d] = (float)(4.0 * sqrt((double)D) * u[d] + 0.3 * ref_rng_normal(&rng));
        int32_t qo[2] = {0, 1};
        qattn_paged_desc pd = {.cache = pc.desc, .table = QATTN_PAGES_CSR, .batch = 1,
                               .max_pages_per_seq = pc.num_pages[0], .total_q = 1, .max_q_len = 1, .heads_q = Hq,
                               .q_dtype = QATTN_DTYPE_F32, .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D},
                               .causal = 1, .return_lse = 1};
        qattn_plan *plan = NULL;
        assert_ok(qattn_paged_select_plan_create(ctx, &pd, sel, &plan));
        run_result rr;
        assert_ok(run_plan(&pc, &pd, plan, q, qo, &rr, NULL));
        qattn_plan_destroy(plan);
        bool selected = false;
        for (int64_t i = 0; i < rr.counts[0]; i++)
            selected |= rr.pages[i] == at / P;
        double worst_cos = 1;
        for (int64_t h = 0; h < G; h++) {
            double dot = 0, a = 0, b = 0;
            for (int64_t d = 0; d < D; d++) {
                dot += (double)rr.o[h * D + d] * needle_v[d];
                a += (double)rr.o[h * D + d] * rr.o[h * D + d];
                b += (double)needle_v[d] * needle_v[d];
            }
            worst_cos = fmin(worst_cos, dot / sqrt(a * b + 1e-300));
        }
        *found += selected && worst_cos >= 0.99;
        *mean_pages += (double)rr.counts[0] / (double)trials;
        free(rr.o), free(rr.lse), free(rr.counts), free(rr.pages), free(q), free(u), free(needle_v);
        cache_free(&pc);
    }
}

static void needle_case(void **state)
{
    (void)state;
    const qattn_page_select_desc fixed = {.budget_tokens = 256, .sink_pages = 1, .recent_pages = 1};
    const qattn_page_select_desc adaptive = {.budget_tokens = 32, .sink_pages = 1, .recent_pages = 1, .epsilon = 0.01f,
                                             .max_budget_tokens = 256};
    const cache_case *cc = &cache_cases[0];
    {
        qattn_paged_desc probe = {.cache = {.num_pages = 1, .page_size = 16, .heads_kv = 1, .head_dim = cc->head_dim,
                                            .dtype = cc->dtype},
                                  .batch = 1, .max_pages_per_seq = 1, .total_q = 1, .max_q_len = 1, .heads_q = 4,
                                  .q_dtype = QATTN_DTYPE_F32, .q_stride = {4 * 64, 64}, .o_stride = {4 * 64, 64}};
        qattn_plan *plan = NULL;
        qattn_status s = qattn_paged_select_plan_create(ctx, &probe, &adaptive, &plan);
        qattn_plan_destroy(plan);
        if (unsupported(s, "needle retrieval (adaptive)"))
            skip();
    }
    const int64_t n = 16384, trials = 12;
    int found_fixed, found_adaptive;
    double pages_fixed, pages_adaptive;
    needle_trials(n, trials, &fixed, &found_fixed, &pages_fixed);
    needle_trials(n, trials, &adaptive, &found_adaptive, &pages_adaptive);
    print_message("  needles at %lld tokens: fixed budget 256 found %d/%lld (%.1f pages); adaptive (eps 0.01, cap 256) "
                  "found %d/%lld with %.1f pages on average\n",
                  (long long)n, found_fixed, (long long)trials, pages_fixed, found_adaptive, (long long)trials,
                  pages_adaptive);
    assert_int_equal(found_fixed, trials);
    assert_int_equal(found_adaptive, trials);
    assert_true(pages_adaptive < pages_fixed);
}

/* ------------------------------------------------------------ page mass */

static void page_mass_case(void **state)
{
    (void)state;
    const select_case sc = {"mass", 2, 2, {400, 70}, {3, 1}, QATTN_PAGES_DENSE, 1, {0}};
    const cache_case *cc = &cache_cases[sc.cache_case];
    const int64_t Hq = cc->heads_q, Hkv = cc->heads_kv, D = cc->head_dim, G = Hq / Hkv, P = cc->page_size;
    paged_cache pc;
    int32_t qo[MAX_B + 1];
    int64_t total_q, max_q, M;
    float *q = build_select_problem(&pc, &sc, qo, &total_q, &max_q, &M);
    qattn_paged_desc pd = {.cache = pc.desc, .table = sc.table, .batch = sc.batch, .max_pages_per_seq = M,
                           .total_q = total_q, .max_q_len = max_q, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F32,
                           .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1, .return_lse = 1};
    qattn_plan *plan = NULL;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    run_result rr;
    qattn_buffer *mass = NULL;
    qattn_status s = run_plan(&pc, &pd, plan, q, qo, &rr, &mass);
    qattn_plan_destroy(plan);
    if (unsupported(s, "page mass")) {
        qattn_buffer_destroy(mass);
        free(rr.o), free(rr.lse), free(q);
        cache_free(&pc);
        skip();
    }
    assert_ok(s);
    float *m = download(mass, (size_t)sc.batch * Hkv * M * 4);
    qattn_buffer_destroy(mass);
    cache_download(&pc);
    ref_accum acc = {0};
    double worst_sum = 0;
    for (int64_t b = 0; b < sc.batch; b++) {
        const int64_t q0 = qo[b], q_len = qo[b + 1] - q0, kv_len = pc.kv_len[b];
        for (int64_t hk = 0; hk < Hkv; hk++) {
            double total = 0;
            for (int64_t p = 0; p < M; p++) {
                double ref = 0;
                for (int64_t j = p * P; j < (p + 1) * P && j < kv_len && p < pc.num_pages[b]; j++)
                    for (int64_t i = 0; i < q_len; i++) {
                        if (j > i + kv_len - q_len)
                            continue;
                        for (int64_t g = 0; g < G; g++) {
                            const int64_t h = hk * G + g;
                            double dot = 0, out[256], lse;
                            for (int64_t d = 0; d < D; d++)
                                dot += (double)q[((q0 + i) * Hq + h) * D + d] * cached(&pc, 0, pc.pages[b][p], j % P, hk, d);
                            ref_row(&pc, b, NULL, 0, q + ((q0 + i) * Hq + h) * D, hk, i, q_len, 1, 1.0 / sqrt((double)D),
                                    out, &lse);
                            ref += exp(dot / sqrt((double)D) - lse);
                        }
                    }
                ref_accum_add(&acc, m[(b * Hkv + hk) * M + p], ref);
                total += m[(b * Hkv + hk) * M + p];
            }
            worst_sum = fmax(worst_sum, fabs(total - (double)(q_len * G)));
        }
    }
    ref_metrics mm = ref_accum_finish(&acc);
    print_message("  page mass vs fp64: cos %.7f relL1 %.2e max %.2e; rows sum to 1 within %.2e\n", mm.cos_sim,
                  mm.rel_l1, mm.max_abs, worst_sum);
    assert_int_equal(mm.nonfinite, 0);
    assert_true(mm.cos_sim >= 0.9999 && mm.rel_l1 <= 5e-3 && worst_sum <= 1e-2);
    free(m), free(q), free(rr.o), free(rr.lse);
    cache_free(&pc);
}

/* ------------------------------------------------------------- eviction */

/* A stream of `total` tokens in chunks of up to 512 with decode steps
 * between, under keep_pages (window policy, or scores from page mass). */
static void evict_stream(int use_scores, int64_t total, int64_t keep_pages)
{
    const cache_case *cc = &cache_cases[0];
    const int64_t Hq = cc->heads_q, Hkv = cc->heads_kv, D = cc->head_dim, P = cc->page_size;
    paged_cache pc;
    cache_init(&pc, cc, keep_pages + 512 / P + 2);
    pc.batch = 1;
    const qattn_evict_policy pol = {.keep_pages = keep_pages, .sink_pages = 1, .recent_pages = 4};
    float *scores = calloc((size_t)(keep_pages + 512 / P + 2), sizeof(float));
    int64_t steps = 0, appended = 0, peak_used = 0, used_after_warm = -1;
    ref_accum acc = {0};
    while (appended < total) {
        int64_t T = (int64_t)(ref_rng_uniform(&rng) * 512) + 1;
        T = T > total - appended ? total - appended : T;
        float *k = randn_rows(T * Hkv * D, 1.0), *v = randn_rows(T * Hkv * D, 1.0);
        cache_append(&pc, 0, k, v, T);
        free(k), free(v);
        appended += T;
        /* a decode step over the cache as it is (with the page mass when scoring) */
        float *q = randn_rows(Hq * D, 1.0);
        int32_t qo[2] = {0, 1};
        qattn_paged_desc pd = {.cache = pc.desc, .table = QATTN_PAGES_CSR, .batch = 1,
                               .max_pages_per_seq = pc.num_pages[0], .total_q = 1, .max_q_len = 1, .heads_q = Hq,
                               .q_dtype = QATTN_DTYPE_F32, .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D},
                               .causal = 1, .return_lse = 1};
        qattn_plan *plan = NULL;
        assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
        run_result rr;
        qattn_buffer *mass = NULL;
        assert_ok(run_plan(&pc, &pd, plan, q, qo, &rr, use_scores ? &mass : NULL));
        qattn_plan_destroy(plan);
        if (steps % 8 == 0) { /* the output is attention over the kept tokens */
            cache_download(&pc);
            double out[256], lse;
            for (int64_t h = 0; h < Hq; h++) {
                ref_row(&pc, 0, NULL, 0, q + h * D, h / (Hq / Hkv), 0, 1, 1, 1.0 / sqrt((double)D), out, &lse);
                for (int64_t d = 0; d < D; d++)
                    ref_accum_add(&acc, rr.o[h * D + d], out[d]);
            }
        }
        if (mass) {
            float *m = download(mass, (size_t)Hkv * pc.num_pages[0] * 4);
            for (int64_t hk = 0; hk < Hkv; hk++)
                for (int64_t p = 0; p < pc.num_pages[0]; p++)
                    scores[p] += m[hk * pc.num_pages[0] + p];
            free(m);
            qattn_buffer_destroy(mass);
        }
        free(rr.o), free(rr.lse), free(q);
        /* evict down to the budget; the tokens left are the sequence now */
        int64_t freed = 0, before = pc.num_pages[0];
        assert_ok(qattn_evict_pages(pc.pool, &pol, pc.pages[0], &pc.num_pages[0], use_scores ? scores : NULL, &freed));
        assert_int_equal(before - freed, pc.num_pages[0]);
        pc.kv_len[0] -= freed * P;
        const int64_t used = pc.desc.num_pages - qattn_page_pool_free_count(pc.pool);
        assert_int_equal(used, pc.num_pages[0]); /* pool accounting: every page is the sequence's or free */
        if (appended > keep_pages * P) {
            if (used_after_warm < 0)
                used_after_warm = used;
            assert_int_equal(used, keep_pages); /* flat once warm */
        }
        peak_used = used > peak_used ? used : peak_used;
        steps++;
    }
    ref_metrics m = ref_accum_finish(&acc);
    print_message("  eviction (%s): %lld tokens in %lld steps, pool %lld pages (peak %lld); output vs fp64 over kept "
                  "tokens: cos %.7f relL1 %.2e\n",
                  use_scores ? "scores" : "sinks + window", (long long)appended, (long long)steps,
                  (long long)keep_pages, (long long)peak_used, m.cos_sim, m.rel_l1);
    assert_true(m.cos_sim >= 0.99999 && m.rel_l1 <= 2e-3);
    free(scores);
    cache_free(&pc);
}

static void evict_window_case(void **state)
{
    (void)state;
    evict_stream(0, 40000, 64);
}

/* Whether the backend computes page masses (a real call on a one-page cache). */
static bool mass_supported(void)
{
    const cache_case *cc = &cache_cases[0];
    paged_cache pc;
    cache_init(&pc, cc, 2);
    const int64_t Hq = cc->heads_q, D = cc->head_dim;
    float *k = randn_rows(cc->heads_kv * D, 1.0), *q = randn_rows(Hq * D, 1.0);
    cache_append(&pc, 0, k, k, 1);
    pc.batch = 1;
    int32_t qo[2] = {0, 1};
    qattn_paged_desc pd = {.cache = pc.desc, .table = QATTN_PAGES_CSR, .batch = 1, .max_pages_per_seq = 1,
                           .total_q = 1, .max_q_len = 1, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F32,
                           .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1, .return_lse = 1};
    qattn_plan *plan = NULL;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    run_result rr = {0};
    qattn_buffer *mass = NULL;
    qattn_status s = run_plan(&pc, &pd, plan, q, qo, &rr, &mass);
    qattn_plan_destroy(plan);
    qattn_buffer_destroy(mass);
    free(rr.o), free(rr.lse), free(k), free(q);
    cache_free(&pc);
    if (unsupported(s, "page mass"))
        return false;
    assert_ok(s);
    return true;
}

static void evict_scores_case(void **state)
{
    (void)state;
    if (!mass_supported())
        skip();
    evict_stream(1, 20000, 48);
}

/* ----------------------------------------------------------- bad inputs */

static void expect_in(const qattn_ctx *where, qattn_status s, qattn_status want, const char *needle)
{
    if (s != want)
        fail_msg("expected %s, got %s: %s", qattn_status_str(want), qattn_status_str(s), qattn_last_error(where));
    if (needle && !strstr(qattn_last_error(where), needle))
        fail_msg("the message \"%s\" does not mention \"%s\"", qattn_last_error(where), needle);
}
static void expect(qattn_status s, qattn_status want, const char *needle) { expect_in(ctx, s, want, needle); }

static void bad_inputs_case(void **state)
{
    (void)state;
    qattn_paged_desc pd = {.cache = {.num_pages = 8, .page_size = 16, .heads_kv = 2, .head_dim = 64,
                                     .dtype = QATTN_DTYPE_F16},
                           .batch = 1, .max_pages_per_seq = 8, .total_q = 1, .max_q_len = 1, .heads_q = 8,
                           .q_dtype = QATTN_DTYPE_F32, .q_stride = {512, 64}, .o_stride = {512, 64}, .return_lse = 1};
    qattn_plan *plan = (qattn_plan *)0x1;
    const qattn_page_select_desc good = {.budget_tokens = 64};
    qattn_page_select_desc sel = good;
    sel.budget_tokens = -1;
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "budget_tokens");
    assert_null(plan);
    sel = (qattn_page_select_desc){.budget_fraction = 1.5f};
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "budget_fraction");
    sel = (qattn_page_select_desc){.budget_fraction = NAN};
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "budget_fraction");
    sel = (qattn_page_select_desc){.budget_tokens = 64, .budget_fraction = 0.5f};
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "not both");
    sel = (qattn_page_select_desc){.budget_tokens = 64, .sink_pages = -1};
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "sink_pages");
    sel = (qattn_page_select_desc){.budget_tokens = 64, .epsilon = 1.0f};
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "epsilon");
    sel = (qattn_page_select_desc){.budget_tokens = 64, .epsilon = INFINITY};
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "epsilon");
    sel = (qattn_page_select_desc){.budget_tokens = 64, .max_budget_tokens = 128};
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_INVALID_ARGUMENT, "max_budget_tokens");
    /* Huge budgets are valid (the whole sequence): rounding them up to pages overflowed int64 (UBSan; found by
     * fuzz_prune with budget_tokens = INT64_MAX). */
    sel = (qattn_page_select_desc){.budget_tokens = INT64_MAX};
    assert_ok(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan));
    qattn_plan_destroy(plan);
    sel = (qattn_page_select_desc){.budget_tokens = INT64_MAX - 3, .epsilon = 0.5f, .max_budget_tokens = INT64_MAX};
    qattn_status huge = qattn_paged_select_plan_create(ctx, &pd, &sel, &plan);
    if (!unsupported(huge, "adaptive page selection")) {
        assert_ok(huge);
        qattn_plan_destroy(plan);
    }
    sel = (qattn_page_select_desc){.budget_tokens = 64, .epsilon = 0.01f};
    pd.causal = 1;
    pd.max_q_len = 2;
    pd.total_q = 2;
    expect(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan), QATTN_ERR_UNSUPPORTED, "causal chunk");
    assert_null(plan);
    pd.causal = 0;
    pd.max_q_len = 1;
    pd.total_q = 1;
    expect(qattn_paged_select_plan_create(NULL, &pd, &good, &plan), QATTN_ERR_INVALID_ARGUMENT, NULL);
    expect(qattn_paged_select_plan_create(ctx, NULL, &good, &plan), QATTN_ERR_INVALID_ARGUMENT, "desc");
    expect(qattn_kv_meta_bytes(ctx, &pd.cache, NULL), QATTN_ERR_INVALID_ARGUMENT, "sizes");
    qattn_kv_cache_desc bad_cache = pd.cache;
    bad_cache.page_size = 0;
    qattn_kv_meta_sizes ms;
    expect(qattn_kv_meta_bytes(ctx, &bad_cache, &ms), QATTN_ERR_INVALID_ARGUMENT, "page_size");

    qattn_status s = qattn_paged_select_plan_create(ctx, &pd, &good, &plan);
    if (unsupported(s, "page selection's argument checks"))
        skip();
    assert_ok(s);
    /* A run without the metadata buffer, with one too small, and reads of the selection. */
    paged_cache pc;
    cache_init(&pc, &cache_cases[0], 8);
    float *k = randn_rows(40 * 2 * 64, 1.0), *v = randn_rows(40 * 2 * 64, 1.0);
    cache_append(&pc, 0, k, v, 40);
    free(k), free(v);
    pc.batch = 1;
    int32_t qo[2] = {0, 1};
    float *q = randn_rows(8 * 64, 1.0);
    qattn_buffer *meta = pc.bufs.k_meta;
    pc.bufs.k_meta = NULL;
    run_result rr;
    expect(run_plan(&pc, &pd, plan, q, qo, &rr, NULL), QATTN_ERR_INVALID_ARGUMENT, "k_meta");
    assert_ok(qattn_buffer_create(ctx, 64, &pc.bufs.k_meta));
    expect(run_plan(&pc, &pd, plan, q, qo, &rr, NULL), QATTN_ERR_INVALID_ARGUMENT, "k_meta");
    qattn_buffer_destroy(pc.bufs.k_meta);
    pc.bufs.k_meta = pc.bufs.k; /* the metadata may not be the cache itself */
    expect(run_plan(&pc, &pd, plan, q, qo, &rr, NULL), QATTN_ERR_INVALID_ARGUMENT, "k_meta");
    pc.bufs.k_meta = meta;
    int32_t counts[2];
    expect(qattn_paged_selection_read(plan, NULL, 0, counts, NULL), QATTN_ERR_INVALID_ARGUMENT, "workspace");
    expect(qattn_paged_selection_read(NULL, NULL, 0, counts, NULL), QATTN_ERR_INVALID_ARGUMENT, NULL);
    qattn_plan_destroy(plan);
    /* Page mass: a plan without return_lse, no mass buffer, a mass buffer too small, the mass over the LSE. */
    pd.return_lse = 0;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    qattn_paged_args none = {0};
    expect(qattn_paged_page_mass(plan, &none, NULL, 0), QATTN_ERR_INVALID_ARGUMENT, "return_lse");
    qattn_plan_destroy(plan);
    pd.return_lse = 1;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    expect(qattn_paged_page_mass(plan, NULL, NULL, 0), QATTN_ERR_INVALID_ARGUMENT, "args");
    qattn_plan_destroy(plan);
    /* Eviction policy and pool errors leave the list and the pool as they were. */
    int32_t pages[6];
    assert_ok(qattn_page_pool_alloc(pc.pool, 3, pages));
    int64_t count = 3, freed = 7;
    const int64_t free_before = qattn_page_pool_free_count(pc.pool);
    qattn_evict_policy pol = {.keep_pages = 1, .sink_pages = 1, .recent_pages = 1};
    expect_in(NULL, qattn_evict_pages(pc.pool, &pol, pages, &count, NULL, &freed), QATTN_ERR_INVALID_ARGUMENT, "keep_pages");
    pol = (qattn_evict_policy){.keep_pages = 2, .sink_pages = 0, .recent_pages = 0};
    expect_in(NULL, qattn_evict_pages(pc.pool, &pol, pages, &count, NULL, &freed), QATTN_ERR_INVALID_ARGUMENT, "recent_pages");
    /* sink_pages + recent_pages overflowed int64 in the check (UBSan; found by fuzz_prune) */
    pol = (qattn_evict_policy){.keep_pages = 2, .sink_pages = INT64_MAX, .recent_pages = 2};
    expect_in(NULL, qattn_evict_pages(pc.pool, &pol, pages, &count, NULL, &freed), QATTN_ERR_INVALID_ARGUMENT, "keep_pages");
    pol = (qattn_evict_policy){.keep_pages = INT64_MAX, .sink_pages = INT64_MAX, .recent_pages = 1};
    expect_in(NULL, qattn_evict_pages(pc.pool, &pol, pages, &count, NULL, &freed), QATTN_ERR_INVALID_ARGUMENT, "keep_pages");
    pol = (qattn_evict_policy){.keep_pages = 2, .sink_pages = 0, .recent_pages = 1};
    expect_in(NULL, qattn_evict_pages(NULL, &pol, pages, &count, NULL, &freed), QATTN_ERR_INVALID_ARGUMENT, "pool");
    int32_t twice[3] = {pages[0], pages[1], pages[0]}; /* a page listed twice: refused, nothing changes */
    int64_t tc = 3;
    expect_in(NULL, qattn_evict_pages(pc.pool, &pol, twice, &tc, NULL, &freed), QATTN_ERR_INVALID_ARGUMENT,
              "listed twice");
    assert_int_equal(tc, 3);
    assert_int_equal(qattn_page_pool_free_count(pc.pool), free_before);
    int32_t foreign[3] = {7, pages[1], pages[2]}; /* the oldest, the victim, was never handed out */
    int64_t fc = 3;
    expect_in(NULL, qattn_evict_pages(pc.pool, &pol, foreign, &fc, NULL, &freed), QATTN_ERR_INVALID_ARGUMENT, NULL);
    assert_int_equal(fc, 3);
    assert_int_equal(qattn_page_pool_free_count(pc.pool), free_before);
    assert_ok(qattn_evict_pages(pc.pool, &pol, pages, &count, NULL, &freed));
    assert_int_equal(count, 2);
    assert_int_equal(freed, 1);
    assert_int_equal(qattn_page_pool_free_count(pc.pool), free_before + 1);
    free(q);
    cache_free(&pc);
}

int main(int argc, char **argv)
{
    int rc = ref_backend_context(argc, argv, "test_prune", &ctx);
    if (rc >= 0)
        return rc;
    backend_name = argv[1];
    print_message("test_prune %s: seed %llu\n", backend_name, (unsigned long long)ref_rng_seed_auto(&rng));
    struct CMUnitTest tests[32];
    int n = 0;
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(meta_case);
    for (size_t i = 0; i < sizeof(select_cases) / sizeof(select_cases[0]); i++)
        tests[n++] = (struct CMUnitTest){select_cases[i].name, select_case_run, NULL, NULL, (void *)&select_cases[i]};
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(budget_covers_dense_case);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(needle_case);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(page_mass_case);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(evict_window_case);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(evict_scores_case);
    tests[n++] = (struct CMUnitTest)cmocka_unit_test(bad_inputs_case);
    const char *filter = getenv("QATTN_TEST_FILTER");
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    rc = _cmocka_run_group_tests("prune", tests, (size_t)n, NULL, NULL);
    qattn_ctx_destroy(ctx);
    return rc;
}
