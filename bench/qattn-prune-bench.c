/*
 * qattn-prune-bench: decode over a pruned paged cache, end to end.
 *
 *   qattn-prune-bench needle [--backend NAME] [--ctx N] [--trials T] [--batch S] [--budget TOKENS]
 *                            [--adaptive EPS,CAP] [--haystack random|coherent] [--noise X]
 *                            [--hq HQ] [--hkv HKV] [--d D] [--seed S]
 *   qattn-prune-bench evict  [--backend NAME] [--tokens N] [--keep-tokens K] [--policy window|scores]
 *                            [--hq HQ] [--hkv HKV] [--d D] [--check-every E] [--seed S]
 *
 * needle: passkey-style retrieval. S sequences of N distractor keys (N(0, 1)
 * per channel, so a query of norm sqrt(D) sees logits of spread ~1; with
 * --haystack coherent the 16 tokens of a page share that N(0, 1) centre and
 * differ by N(0, noise^2), as neighbouring tokens of real models do, which
 * tightens the page bounds) are
 * appended once; each trial rewrites one random slot of each sequence with a
 * needle key 20 u (logit 20 for the query sqrt(D) u + noise; u a random unit vector)
 * and a random value, through qattn_kv_append (so the page metadata follows
 * the rewrite), runs one decode step with page selection, and restores the
 * slot. A trial succeeds when the needle's page is selected and every query
 * head's output has cosine >= 0.99 with the needle's value (the dense answer,
 * which the dense plan is checked to give). Reports found / trials and the
 * mean pages read.
 *
 * evict: one sequence streams N tokens in chunks of 1..512 (random), a decode
 * step after each; pages beyond the budget are evicted (window: sinks + the
 * newest pages; scores: the page attention mass accumulated over the steps)
 * and returned to the pool. Checked every step: the pool's used pages equal
 * the sequence's (nothing leaked) and stay at the budget once warm; every E
 * steps the output against fp64 attention over the kept tokens (host
 * mirror of every page).
 *
 * Exit status 0 when every check passed, 1 when one failed, 2 on errors.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qattn/qattn.h"
#include "reference.h"

static qattn_ctx *ctx;

#define CHECK(call)                                                                                                    \
    do {                                                                                                               \
        qattn_status s_ = (call);                                                                                      \
        if (s_ != QATTN_OK) {                                                                                          \
            fprintf(stderr, "qattn-prune-bench: %s: %s: %s\n", #call, qattn_status_str(s_), qattn_last_error(ctx));   \
            exit(2);                                                                                                   \
        }                                                                                                              \
    } while (0)

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static qattn_buffer *buffer(size_t bytes)
{
    qattn_buffer *b = NULL;
    CHECK(qattn_buffer_create(ctx, bytes ? bytes : 4, &b));
    return b;
}

static qattn_buffer *upload(const void *data, size_t bytes)
{
    qattn_buffer *b = buffer(bytes);
    if (bytes)
        CHECK(qattn_buffer_upload(b, 0, data, bytes));
    return b;
}

typedef struct options {
    const char *backend, *policy, *haystack;
    double noise;
    int64_t ctx, trials, batch, budget, hq, hkv, d, tokens, keep_tokens, check_every;
    double adaptive_eps;
    int64_t adaptive_cap;
    uint64_t seed;
} options;

/* A cache with its metadata, sequences as page lists. */
typedef struct cache {
    qattn_kv_cache_desc desc;
    qattn_kv_cache_sizes sizes;
    qattn_kv_cache_buffers bufs;
    qattn_page_pool *pool;
} cache;

static void cache_make(cache *c, int64_t pages, int64_t hkv, int64_t d)
{
    memset(c, 0, sizeof(*c));
    c->desc = (qattn_kv_cache_desc){.num_pages = pages, .page_size = 16, .heads_kv = hkv, .head_dim = d,
                                    .dtype = QATTN_DTYPE_F16};
    CHECK(qattn_kv_cache_bytes(ctx, &c->desc, &c->sizes));
    qattn_kv_meta_sizes ms;
    CHECK(qattn_kv_meta_bytes(ctx, &c->desc, &ms));
    c->bufs.k = buffer(c->sizes.cache_bytes);
    c->bufs.v = buffer(c->sizes.cache_bytes);
    c->bufs.k_meta = buffer(ms.meta_bytes);
    CHECK(qattn_page_pool_create(pages, &c->pool));
}

static void cache_free(cache *c)
{
    qattn_buffer_destroy(c->bufs.k);
    qattn_buffer_destroy(c->bufs.v);
    qattn_buffer_destroy(c->bufs.k_meta);
    qattn_page_pool_destroy(c->pool);
}

/* Writes T tokens (f32 [T, Hkv, D]) to the given slots. */
static void write_slots(cache *c, const float *k, const float *v, const int64_t *slots, int64_t T)
{
    const int64_t row = c->desc.heads_kv * c->desc.head_dim;
    qattn_buffer *kb = upload(k, (size_t)(T * row) * 4), *vb = upload(v, (size_t)(T * row) * 4),
                 *sb = upload(slots, (size_t)T * 8);
    qattn_kv_append_args a = {.cache = &c->desc, .buffers = &c->bufs, .num_tokens = T, .new_dtype = QATTN_DTYPE_F32,
                              .new_stride = {row, c->desc.head_dim}, .k_new = kb, .v_new = vb, .slot_mapping = sb,
                              .flags = QATTN_FLAG_NO_FINITE_CHECK};
    CHECK(qattn_kv_append(ctx, &a));
    qattn_buffer_destroy(kb), qattn_buffer_destroy(vb), qattn_buffer_destroy(sb);
}

typedef struct tables {
    qattn_buffer *qo, *indptr, *indices, *last;
} tables;

/* CSR tables of B sequences with page lists (lens tokens each). */
static tables tables_make(int64_t B, int32_t *const *lists, const int64_t *npages, const int64_t *lens, int64_t P)
{
    int64_t total = 0;
    for (int64_t b = 0; b < B; b++)
        total += npages[b];
    int32_t *indptr = malloc((size_t)(B + 1) * 4), *indices = malloc((size_t)(total + 1) * 4),
            *last = malloc((size_t)B * 4), *qo = malloc((size_t)(B + 1) * 4);
    CHECK(qattn_page_tables_build(B, (const int32_t *const *)lists, npages, 1, NULL, indptr, indices));
    for (int64_t b = 0; b <= B; b++)
        qo[b] = (int32_t)b;
    for (int64_t b = 0; b < B; b++)
        last[b] = (int32_t)(lens[b] - (npages[b] - 1) * P);
    tables t = {upload(qo, (size_t)(B + 1) * 4), upload(indptr, (size_t)(B + 1) * 4),
                upload(indices, (size_t)(total ? total : 1) * 4), upload(last, (size_t)B * 4)};
    free(indptr), free(indices), free(last), free(qo);
    return t;
}

static void tables_free(tables *t)
{
    qattn_buffer_destroy(t->qo), qattn_buffer_destroy(t->indptr), qattn_buffer_destroy(t->indices),
        qattn_buffer_destroy(t->last);
}

/* Fast N(0, 1) fill (a 1M-token stream of 32 heads is two billion values):
 * xorshift64* and a float Box-Muller pair, seeded from the reference RNG. */
static void fill_randn(float *x, int64_t n, ref_rng *rng)
{
    uint64_t s = (uint64_t)(ref_rng_uniform(rng) * 9007199254740992.0) | 1u;
    for (int64_t i = 0; i < n; i += 2) {
        s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
        const uint64_t r = s * 0x2545F4914F6CDD1Dull;
        const float u1 = ((float)(r >> 40) + 0.5f) * (1.0f / 16777216.0f);
        const float u2 = ((float)(r & 0xffffffu) + 0.5f) * (1.0f / 16777216.0f);
        const float rad = sqrtf(-2.0f * logf(u1)), ang = 6.2831853071795865f * u2;
        x[i] = rad * cosf(ang);
        if (i + 1 < n)
            x[i + 1] = rad * sinf(ang);
    }
}

static double cosine(const float *a, const float *b, int64_t n)
{
    double d = 0, x = 0, y = 0;
    for (int64_t i = 0; i < n; i++) {
        d += (double)a[i] * b[i];
        x += (double)a[i] * a[i];
        y += (double)b[i] * b[i];
    }
    return d / sqrt(x * y + 1e-300);
}

/* ---------------------------------------------------------------- needle */

static int run_needle(const options *o)
{
    const int64_t B = o->batch, N = o->ctx, Hq = o->hq, Hkv = o->hkv, D = o->d, P = 16, G = Hq / Hkv;
    const int64_t npages = (N + P - 1) / P, row = Hkv * D;
    ref_rng rng;
    ref_rng_seed(&rng, o->seed);
    cache c;
    cache_make(&c, B * npages, Hkv, D);
    int32_t **lists = malloc((size_t)B * sizeof(*lists));
    int64_t *counts = malloc((size_t)B * 8), *lens = malloc((size_t)B * 8);
    const int64_t chunk = 4096;
    float *k = malloc((size_t)(chunk * row) * 4), *v = malloc((size_t)(chunk * row) * 4);
    int64_t *slots = malloc((size_t)chunk * 8);
    double t0 = now_seconds();
    for (int64_t b = 0; b < B; b++) {
        lists[b] = malloc((size_t)npages * 4);
        CHECK(qattn_page_pool_alloc(c.pool, npages, lists[b]));
        counts[b] = npages;
        lens[b] = N;
        for (int64_t done = 0; done < N; done += chunk) {
            const int64_t T = N - done < chunk ? N - done : chunk;
            const int coherent = !strcmp(o->haystack, "coherent");
            fill_randn(k, T * row, &rng);
            fill_randn(v, T * row, &rng);
            if (coherent) { /* a page's tokens share its first token's centre, plus their own noise */
                float *noise = malloc((size_t)row * 4);
                for (int64_t t = 0; t < T; t++) {
                    if ((done + t) % P)
                        memcpy(k + t * row, k + (t - 1) * row, (size_t)row * 4);
                }
                for (int64_t t = 0; t < T; t++) {
                    fill_randn(noise, row, &rng);
                    for (int64_t i = 0; i < row; i++)
                        k[t * row + i] += (float)o->noise * noise[i];
                }
                free(noise);
            }
            for (int64_t t = 0; t < T; t++)
                slots[t] = (int64_t)lists[b][(done + t) / P] * P + (done + t) % P;
            write_slots(&c, k, v, slots, T);
        }
    }
    CHECK(qattn_ctx_synchronize(ctx));
    fprintf(stderr, "[prune-bench] %lld sequences of %lld tokens appended in %.1f s\n", (long long)B, (long long)N,
            now_seconds() - t0);
    tables t = tables_make(B, lists, counts, lens, P);
    qattn_paged_desc pd = {.cache = c.desc, .table = QATTN_PAGES_CSR, .batch = B, .max_pages_per_seq = npages,
                           .total_q = B, .max_q_len = 1, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F32,
                           .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1,
                           .flags = QATTN_FLAG_NO_FINITE_CHECK};
    const qattn_page_select_desc sel = {.budget_tokens = o->budget, .sink_pages = 1, .recent_pages = 1,
                                        .epsilon = (float)o->adaptive_eps,
                                        .max_budget_tokens = o->adaptive_eps > 0 ? o->adaptive_cap : 0};
    qattn_plan *plan = NULL, *dense = NULL;
    CHECK(qattn_paged_select_plan_create(ctx, &pd, &sel, &plan));
    CHECK(qattn_paged_plan_create(ctx, &pd, &dense));
    char text[1024];
    qattn_plan_describe(plan, text, sizeof(text));
    fprintf(stderr, "[prune-bench] %s\n", text);
    qattn_buffer *ws = buffer(qattn_plan_workspace_size(plan)), *dws = buffer(qattn_plan_workspace_size(dense));
    qattn_buffer *qb = buffer((size_t)(B * Hq * D) * 4), *ob = buffer((size_t)(B * Hq * D) * 4);
    qattn_paged_args a = {.cache = &c.bufs, .q = qb, .o = ob, .qo_indptr = t.qo, .indptr = t.indptr,
                          .indices = t.indices, .last_page_len = t.last, .workspace = ws};
    float *q = malloc((size_t)(B * Hq * D) * 4), *o_sel = malloc((size_t)(B * Hq * D) * 4),
          *o_dense = malloc((size_t)(B * Hq * D) * 4);
    float *nk = malloc((size_t)(B * row) * 4), *nv = malloc((size_t)(B * row) * 4);
    float *old_k = malloc((size_t)(B * row) * 4), *old_v = malloc((size_t)(B * row) * 4);
    int64_t *nslots = malloc((size_t)B * 8), *at = malloc((size_t)B * 8);
    int32_t *sel_counts = malloc((size_t)(B * Hkv) * 4), *sel_pages = malloc((size_t)(B * Hkv * npages) * 4);
    int64_t found = 0, dense_found = 0, done_trials = 0;
    double pages_read = 0, step_seconds = 0;
    for (int64_t round = 0; done_trials < o->trials; round++) {
        /* a needle per sequence: direction u (unit), key 20 u in every KV head, a random value */
        for (int64_t b = 0; b < B; b++) {
            double u[1024], norm = 0;
            for (int64_t e = 0; e < D; e++) {
                u[e] = ref_rng_normal(&rng);
                norm += u[e] * u[e];
            }
            for (int64_t e = 0; e < D; e++)
                u[e] /= sqrt(norm);
            at[b] = P + (int64_t)(ref_rng_uniform(&rng) * (double)(N - 3 * P)); /* not a sink, not the last pages */
            nslots[b] = (int64_t)lists[b][at[b] / P] * P + at[b] % P;
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t e = 0; e < D; e++) {
                    nk[b * row + h * D + e] = (float)(20.0 * u[e]);
                    nv[b * row + h * D + e] = (float)ref_rng_normal(&rng);
                }
            for (int64_t h = 0; h < Hq; h++)
                for (int64_t e = 0; e < D; e++)
                    q[(b * Hq + h) * D + e] = (float)(sqrt((double)D) * u[e] + 0.1 * ref_rng_normal(&rng));
            /* the tokens the needle replaces, to put back (regenerated as the haystack's own statistics) */
            for (int64_t i = 0; i < row; i++) {
                old_k[b * row + i] = (float)ref_rng_normal(&rng);
                old_v[b * row + i] = (float)ref_rng_normal(&rng);
            }
        }
        write_slots(&c, nk, nv, nslots, B);
        CHECK(qattn_buffer_upload(qb, 0, q, (size_t)(B * Hq * D) * 4));
        CHECK(qattn_ctx_synchronize(ctx));
        double s0 = now_seconds();
        CHECK(qattn_paged_run(plan, &a));
        CHECK(qattn_ctx_synchronize(ctx));
        step_seconds += now_seconds() - s0;
        CHECK(qattn_buffer_download(ob, 0, o_sel, (size_t)(B * Hq * D) * 4));
        CHECK(qattn_paged_selection_read(plan, ws, 0, sel_counts, sel_pages));
        qattn_paged_args da = a;
        da.workspace = dws;
        CHECK(qattn_paged_run(dense, &da));
        CHECK(qattn_buffer_download(ob, 0, o_dense, (size_t)(B * Hq * D) * 4));
        for (int64_t b = 0; b < B && done_trials < o->trials; b++, done_trials++) {
            int ok = 1, dok = 1;
            for (int64_t hk = 0; hk < Hkv; hk++) {
                int hit = 0;
                const int64_t r = b * Hkv + hk;
                for (int64_t i = 0; i < sel_counts[r]; i++)
                    hit |= sel_pages[r * npages + i] == at[b] / P;
                ok &= hit;
                pages_read += (double)sel_counts[r] / (double)(Hkv * o->trials);
            }
            for (int64_t h = 0; h < Hq; h++) {
                ok &= cosine(o_sel + (b * Hq + h) * D, nv + b * row + (h / G) * D, D) >= 0.99;
                dok &= cosine(o_dense + (b * Hq + h) * D, nv + b * row + (h / G) * D, D) >= 0.99;
            }
            found += ok;
            dense_found += dok;
        }
        write_slots(&c, old_k, old_v, nslots, B);
    }
    printf("needle retrieval on %s: %lld trials at %lld tokens (%s haystack, Hq=%lld Hkv=%lld D=%lld, f16 pages of 16), "
           "budget %lld tokens%s: found %lld (%.1f%%), mean pages read %.1f of %lld (%.0f tokens); dense plan found %lld; "
           "selected step %.1f us (batch %lld)\n",
           qattn_ctx_backend(ctx), (long long)o->trials, (long long)N, o->haystack, (long long)Hq, (long long)Hkv,
           (long long)D, (long long)o->budget, o->adaptive_eps > 0 ? " (adaptive)" : "", (long long)found,
           100.0 * (double)found / (double)o->trials, pages_read, (long long)npages, pages_read * P,
           (long long)dense_found, 1e6 * step_seconds / (double)((o->trials + B - 1) / B), (long long)B);
    printf("{\"mode\":\"needle\",\"haystack\":\"%s\",\"backend\":\"%s\",\"ctx\":%lld,\"trials\":%lld,\"budget\":%lld,\"adaptive_eps\":%g,"
           "\"found\":%lld,\"dense_found\":%lld,\"mean_pages\":%.2f}\n",
           o->haystack, qattn_ctx_backend(ctx), (long long)N, (long long)o->trials, (long long)o->budget, o->adaptive_eps,
           (long long)found, (long long)dense_found, pages_read);
    qattn_buffer *bufs[] = {ws, dws, qb, ob};
    for (size_t i = 0; i < 4; i++)
        qattn_buffer_destroy(bufs[i]);
    tables_free(&t);
    qattn_plan_destroy(plan), qattn_plan_destroy(dense);
    for (int64_t b = 0; b < B; b++)
        free(lists[b]);
    void *heap[] = {lists, counts, lens, k, v, slots, q, o_sel, o_dense, nk, nv, old_k, old_v, nslots, at,
                    sel_counts, sel_pages};
    for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
        free(heap[i]);
    cache_free(&c);
    return dense_found == o->trials && (double)found >= 0.99 * (double)o->trials ? 0 : 1;
}

/* ---------------------------------------------------------------- evict */

static int run_evict(const options *o)
{
    const int64_t Hq = o->hq, Hkv = o->hkv, D = o->d, P = 16, row = Hkv * D, G = Hq / Hkv;
    const int64_t keep = (o->keep_tokens + P - 1) / P, pool_pages = keep + 512 / P + 2;
    const int scores_policy = !strcmp(o->policy, "scores");
    ref_rng rng;
    ref_rng_seed(&rng, o->seed);
    cache c;
    cache_make(&c, pool_pages, Hkv, D);
    /* host mirror of every page: [page][P][Hkv][D] */
    float *mk = calloc((size_t)(pool_pages * P * row), 4), *mv = calloc((size_t)(pool_pages * P * row), 4);
    int32_t *pages = malloc((size_t)pool_pages * 4);
    float *scores = calloc((size_t)pool_pages, sizeof(float));
    int64_t npages = 0, len = 0, appended = 0, steps = 0, checks = 0, failures = 0, peak = 0, flat_from = -1;
    double worst_cos = 1, worst_rel = 0, t0 = now_seconds();
    const qattn_evict_policy pol = {.keep_pages = keep, .sink_pages = 1, .recent_pages = 4};
    float *k = malloc((size_t)(512 * row) * 4), *v = malloc((size_t)(512 * row) * 4), *q = malloc((size_t)(Hq * D) * 4),
          *out = malloc((size_t)(Hq * D) * 4);
    int64_t *slots = malloc(512 * 8);
    double *ref = malloc((size_t)D * sizeof(double)), *w = malloc((size_t)(pool_pages * P) * sizeof(double));
    while (appended < o->tokens) {
        int64_t T = 1 + (int64_t)(ref_rng_uniform(&rng) * 512);
        T = T > o->tokens - appended ? o->tokens - appended : T;
        for (int64_t t = 0; t < T; t++) {
            const int64_t pos = len + t, lp = pos / P;
            if (lp >= npages) {
                CHECK(qattn_page_pool_alloc(c.pool, 1, &pages[lp]));
                scores[lp] = 0;
                npages = lp + 1;
            }
            slots[t] = (int64_t)pages[lp] * P + pos % P;
        }
        fill_randn(k, T * row, &rng);
        fill_randn(v, T * row, &rng);
        for (int64_t t = 0; t < T; t++) {
            memcpy(mk + slots[t] * row, k + t * row, (size_t)row * 4);
            memcpy(mv + slots[t] * row, v + t * row, (size_t)row * 4);
        }
        write_slots(&c, k, v, slots, T);
        appended += T;
        len += T;
        /* a decode step over the kept tokens */
        for (int64_t i = 0; i < Hq * D; i++)
            q[i] = (float)ref_rng_normal(&rng);
        int32_t *list = pages;
        tables t = tables_make(1, &list, &npages, &len, P);
        qattn_paged_desc pd = {.cache = c.desc, .table = QATTN_PAGES_CSR, .batch = 1, .max_pages_per_seq = npages,
                               .total_q = 1, .max_q_len = 1, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F32,
                               .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1, .return_lse = 1};
        qattn_plan *plan = NULL;
        CHECK(qattn_paged_plan_create(ctx, &pd, &plan));
        qattn_buffer *ws = buffer(qattn_plan_workspace_size(plan)), *qb = upload(q, (size_t)(Hq * D) * 4),
                     *ob = buffer((size_t)(Hq * D) * 4), *lb = buffer((size_t)Hq * 4);
        qattn_paged_args a = {.cache = &c.bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = t.qo, .indptr = t.indptr,
                              .indices = t.indices, .last_page_len = t.last, .workspace = ws};
        CHECK(qattn_paged_run(plan, &a));
        if (scores_policy) {
            qattn_buffer *mass = buffer((size_t)(Hkv * npages) * 4);
            CHECK(qattn_paged_page_mass(plan, &a, mass, 0));
            float *m = malloc((size_t)(Hkv * npages) * 4);
            CHECK(qattn_buffer_download(mass, 0, m, (size_t)(Hkv * npages) * 4));
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t p = 0; p < npages; p++)
                    scores[p] += m[h * npages + p];
            free(m);
            qattn_buffer_destroy(mass);
        }
        if (steps % o->check_every == 0 || appended >= o->tokens) { /* fp64 over the kept tokens */
            CHECK(qattn_buffer_download(ob, 0, out, (size_t)(Hq * D) * 4));
            ref_accum acc = {0};
            for (int64_t h = 0; h < Hq; h++) {
                double mx = -INFINITY, l = 0;
                for (int64_t j = 0; j < len; j++) {
                    const float *kr = mk + ((int64_t)pages[j / P] * P + j % P) * row + (h / G) * D;
                    double dot = 0;
                    for (int64_t e = 0; e < D; e++)
                        dot += (double)q[h * D + e] * kr[e];
                    w[j] = dot / sqrt((double)D);
                    mx = w[j] > mx ? w[j] : mx;
                }
                for (int64_t e = 0; e < D; e++)
                    ref[e] = 0;
                for (int64_t j = 0; j < len; j++) {
                    const double p = exp(w[j] - mx);
                    const float *vr = mv + ((int64_t)pages[j / P] * P + j % P) * row + (h / G) * D;
                    l += p;
                    for (int64_t e = 0; e < D; e++)
                        ref[e] += p * vr[e];
                }
                for (int64_t e = 0; e < D; e++)
                    ref_accum_add(&acc, out[h * D + e], ref[e] / l);
            }
            ref_metrics m = ref_accum_finish(&acc);
            checks++;
            worst_cos = m.cos_sim < worst_cos ? m.cos_sim : worst_cos;
            worst_rel = m.rel_l1 > worst_rel ? m.rel_l1 : worst_rel;
            failures += !(m.nonfinite == 0 && m.cos_sim >= 0.99999 && m.rel_l1 <= 2e-3);
        }
        qattn_buffer_destroy(ws), qattn_buffer_destroy(qb), qattn_buffer_destroy(ob), qattn_buffer_destroy(lb);
        qattn_plan_destroy(plan);
        tables_free(&t);
        /* evict down to the budget: the kept pages are the sequence from now on */
        int64_t freed = 0;
        CHECK(qattn_evict_pages(c.pool, &pol, pages, &npages, scores_policy ? scores : NULL, &freed));
        len -= freed * P;
        const int64_t used = pool_pages - qattn_page_pool_free_count(c.pool);
        if (used != npages) {
            fprintf(stderr, "qattn-prune-bench: step %lld: the pool has %lld pages out, the sequence holds %lld\n",
                    (long long)steps, (long long)used, (long long)npages);
            failures++;
        }
        if (appended > keep * P) {
            if (flat_from < 0)
                flat_from = steps;
            failures += used != keep;
        }
        peak = used > peak ? used : peak;
        steps++;
    }
    printf("eviction stream on %s (%s policy): %lld tokens in %lld steps (chunks of 1..512, a decode step after each), "
           "budget %lld pages of %lld in a pool of %lld; pages in use %lld from step %lld on (peak %lld), leaks %s; "
           "%lld outputs vs fp64 over the kept tokens: worst cos %.7f, worst relL1 %.2e; %.1f s\n",
           qattn_ctx_backend(ctx), o->policy, (long long)appended, (long long)steps, (long long)keep, (long long)P,
           (long long)pool_pages, (long long)keep, (long long)flat_from, (long long)peak, failures ? "or drift" : "none",
           (long long)checks, worst_cos, worst_rel, now_seconds() - t0);
    printf("{\"mode\":\"evict\",\"backend\":\"%s\",\"policy\":\"%s\",\"tokens\":%lld,\"steps\":%lld,\"keep_pages\":%lld,"
           "\"peak_pages\":%lld,\"checks\":%lld,\"worst_cos\":%.7f,\"worst_rel_l1\":%.3g,\"failures\":%lld}\n",
           qattn_ctx_backend(ctx), o->policy, (long long)appended, (long long)steps, (long long)keep, (long long)peak,
           (long long)checks, worst_cos, worst_rel, (long long)failures);
    void *heap[] = {mk, mv, pages, scores, k, v, q, out, slots, ref, w};
    for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
        free(heap[i]);
    cache_free(&c);
    return failures ? 1 : 0;
}

static int64_t parse_count(const char *s)
{
    char *end;
    double x = strtod(s, &end);
    if (*end == 'k' || *end == 'K')
        x *= 1024;
    else if (*end == 'm' || *end == 'M')
        x *= 1024 * 1024;
    return (int64_t)x;
}

int main(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "needle") && strcmp(argv[1], "evict"))) {
        fprintf(stderr, "usage: qattn-prune-bench needle|evict [options] (see the source's header)\n");
        return 2;
    }
    options o = {.ctx = 100000, .trials = 200, .batch = 16, .budget = 1024, .hq = 4, .hkv = 1, .d = 128,
                 .tokens = 1 << 20, .keep_tokens = 4096, .check_every = 64, .policy = "window", .seed = 1,
                 .haystack = "random", .noise = 0.1};
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "qattn-prune-bench: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--backend"))
            o.backend = v;
        else if (!strcmp(a, "--ctx"))
            o.ctx = parse_count(v);
        else if (!strcmp(a, "--trials"))
            o.trials = parse_count(v);
        else if (!strcmp(a, "--batch"))
            o.batch = parse_count(v);
        else if (!strcmp(a, "--budget"))
            o.budget = parse_count(v);
        else if (!strcmp(a, "--adaptive")) {
            o.adaptive_eps = atof(v);
            const char *comma = strchr(v, ',');
            o.adaptive_cap = comma ? parse_count(comma + 1) : 0;
        } else if (!strcmp(a, "--hq"))
            o.hq = parse_count(v);
        else if (!strcmp(a, "--hkv"))
            o.hkv = parse_count(v);
        else if (!strcmp(a, "--d"))
            o.d = parse_count(v);
        else if (!strcmp(a, "--tokens"))
            o.tokens = parse_count(v);
        else if (!strcmp(a, "--keep-tokens"))
            o.keep_tokens = parse_count(v);
        else if (!strcmp(a, "--haystack"))
            o.haystack = v;
        else if (!strcmp(a, "--noise"))
            o.noise = atof(v);
        else if (!strcmp(a, "--policy"))
            o.policy = v;
        else if (!strcmp(a, "--check-every"))
            o.check_every = parse_count(v);
        else if (!strcmp(a, "--seed"))
            o.seed = (uint64_t)parse_count(v);
        else {
            fprintf(stderr, "qattn-prune-bench: unknown option %s\n", a);
            return 2;
        }
    }
    if (o.ctx < 64 || o.trials < 1 || o.batch < 1 || o.budget < 1 || o.hq < 1 || o.hkv < 1 || o.hq % o.hkv ||
        o.d < 16 || o.d > 1024 || o.tokens < 1 || o.keep_tokens < 96 || o.check_every < 1 ||
        (strcmp(o.policy, "window") && strcmp(o.policy, "scores")) ||
        (strcmp(o.haystack, "random") && strcmp(o.haystack, "coherent"))) {
        fprintf(stderr, "qattn-prune-bench: bad option values (ctx >= 64, keep-tokens >= 96, hq a multiple of hkv, "
                        "16 <= d <= 1024, policy window|scores)\n");
        return 2;
    }
    qattn_ctx_params params = {.backend = o.backend};
    qattn_status s = qattn_ctx_create(&params, &ctx);
    if (s) {
        fprintf(stderr, "qattn-prune-bench: %s: %s\n", qattn_status_str(s), qattn_last_error(NULL));
        return 2;
    }
    int rc = !strcmp(argv[1], "needle") ? run_needle(&o) : run_evict(&o);
    qattn_ctx_destroy(ctx);
    return rc;
}
