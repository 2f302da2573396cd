/*
 * qattn-decode-bench: paged-attention decode throughput on any backend, as
 * bytes read per second (K/V pages, plus Q, the scales and the page table),
 * with an accuracy check of a few sequences against fp64 attention over the
 * original fp32 values.
 *
 *   qattn-decode-bench [--backend NAME] [--batch LIST] [--ctx LIST] [--page LIST]
 *                      [--dtype LIST] [--hq HQ] [--hkv HKV] [--d D] [--layout nhd|hnd]
 *                      [--table dense|csr] [--splits N] [--ordered-pages] [--check]
 *                      [--warmup W] [--iters I] [--reps R] [--check-seqs S]
 *                      [--peak-gbps GBPS] [--seed S] [--json]
 *                      [--select LIST] [--adaptive EPS[,CAP]]
 *
 * Every (batch, context, page size) builds one set of sequences: K, V and Q
 * are N(0, 1), generated from a seed per sequence (so the checked sequences
 * are regenerated, never kept), appended through qattn_kv_append into one
 * cache per page dtype (pages handed out in shuffled order), then each cache
 * is timed: W warm-up runs, then R repetitions of I back-to-back runs and one
 * synchronize; the median of the R per-run times is reported. Per-head scales
 * of FP8/INT8 pages are the per-head amax of the data over 448 / 127.
 * Decode: one query per sequence, every sequence `ctx` tokens long.
 * Pruned rows (--select, --adaptive): the caches also keep page metadata;
 * after the dense row of a dtype, each budget (tokens) runs a page-selection
 * plan and reports its time, the fraction of pages it read, its speed-up
 * over the dense row and its output's distance from the dense output (on
 * N(0, 1) data attention is nearly uniform, the worst case for pruning: the
 * distance is reported, not judged).
 * Exit status: 0 when every accuracy check met its bar, 1 when one did not,
 * 2 on errors.
 */
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qattn/qattn.h"
#include "reference.h"

#define MAX_LIST 16

typedef struct page_kind {
    const char *name; /* f16, bf16, fp8, int8, int8row */
    qattn_dtype dtype;
    qattn_kv_scales scales;
} page_kind;

static const page_kind kinds[] = {
    {"f16", QATTN_DTYPE_F16, QATTN_KV_SCALES_NONE},
    {"bf16", QATTN_DTYPE_BF16, QATTN_KV_SCALES_NONE},
    {"fp8", QATTN_DTYPE_FP8_E4M3, QATTN_KV_SCALES_PER_HEAD},
    {"int8", QATTN_DTYPE_I8, QATTN_KV_SCALES_PER_HEAD},
    {"int8row", QATTN_DTYPE_I8, QATTN_KV_SCALES_PER_ROW},
};
#define NKINDS (int)(sizeof(kinds) / sizeof(kinds[0]))

typedef struct options {
    const char *backend;
    int64_t batch[MAX_LIST], ctx[MAX_LIST], page[MAX_LIST];
    int nbatch, nctx, npage;
    int kind[NKINDS], nkind;
    int64_t hq, hkv, d;
    qattn_kv_layout layout;
    qattn_page_table_kind table;
    int splits, ordered, check, warmup, iters, reps, check_seqs, json;
    double peak_gbps;
    uint64_t seed;
    int64_t select[MAX_LIST];
    int nselect;
    double adaptive_eps;
    int64_t adaptive_cap;
} options;

static void progress(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[decode-bench] ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* ------------------------------------------------------------ the data */

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Element `index` of the N(0, 1) stream `stream` (Box-Muller on a counter-based hash). */
static float randn_at(uint64_t stream, uint64_t index)
{
    uint64_t r = mix64(stream ^ mix64(index >> 1));
    float u1 = ((float)(r >> 40) + 0.5f) * (1.0f / 16777216.0f);
    float u2 = ((float)(r & 0xffffffu) + 0.5f) * (1.0f / 16777216.0f);
    float rad = sqrtf(-2.0f * logf(u1)), ang = 6.2831853071795865f * u2;
    return (index & 1) ? rad * sinf(ang) : rad * cosf(ang);
}

/* The streams of sequence b: K and V. */
static uint64_t seq_stream(uint64_t seed, int64_t b, int which) { return mix64(seed * 1000003u + (uint64_t)b * 2u + (uint64_t)which); }

typedef struct gen_job {
    float *k, *v;          /* [tokens, Hkv, D] */
    uint64_t ks, vs;
    int64_t t0, tokens, row; /* row = Hkv * D */
    float *k_amax, *v_amax; /* [Hkv] each, or NULL; per job */
    int64_t hkv, d;
} gen_job;

static void *gen_worker(void *arg)
{
    gen_job *j = arg;
    for (int64_t t = 0; t < j->tokens; t++)
        for (int64_t e = 0; e < j->row; e++) {
            uint64_t idx = (uint64_t)((j->t0 + t) * j->row + e);
            float kx = randn_at(j->ks, idx), vx = randn_at(j->vs, idx);
            if (j->k) {
                j->k[t * j->row + e] = kx;
                j->v[t * j->row + e] = vx;
            }
            if (j->k_amax) {
                int64_t h = e / j->d;
                j->k_amax[h] = fmaxf(j->k_amax[h], fabsf(kx));
                j->v_amax[h] = fmaxf(j->v_amax[h], fabsf(vx));
            }
        }
    return NULL;
}

static int nthreads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 64 ? 64 : (int)n;
}

/* Tokens [t0, t0 + tokens) of sequence b into k/v (may be NULL) and/or folded into the amax arrays. */
static void generate(uint64_t seed, int64_t b, int64_t t0, int64_t tokens, int64_t hkv, int64_t d, float *k, float *v,
                     float *k_amax, float *v_amax)
{
    int n = nthreads();
    if (tokens < n)
        n = tokens < 1 ? 1 : (int)tokens;
    pthread_t th[64];
    gen_job jobs[64];
    int started[64];
    float *amax = k_amax ? calloc((size_t)(n * 2 * hkv), sizeof(float)) : NULL;
    for (int i = 0; i < n; i++) {
        int64_t a = tokens * i / n, z = tokens * (i + 1) / n;
        jobs[i] = (gen_job){.k = k ? k + a * hkv * d : NULL, .v = v ? v + a * hkv * d : NULL,
                            .ks = seq_stream(seed, b, 0), .vs = seq_stream(seed, b, 1), .t0 = t0 + a,
                            .tokens = z - a, .row = hkv * d, .hkv = hkv, .d = d,
                            .k_amax = amax ? amax + (size_t)i * 2 * hkv : NULL,
                            .v_amax = amax ? amax + (size_t)i * 2 * hkv + hkv : NULL};
        started[i] = pthread_create(&th[i], NULL, gen_worker, &jobs[i]) == 0;
        if (!started[i])
            gen_worker(&jobs[i]);
    }
    for (int i = 0; i < n; i++)
        if (started[i])
            pthread_join(th[i], NULL);
    if (amax) {
        for (int i = 0; i < n; i++)
            for (int64_t h = 0; h < hkv; h++) {
                k_amax[h] = fmaxf(k_amax[h], amax[(size_t)i * 2 * hkv + h]);
                v_amax[h] = fmaxf(v_amax[h], amax[(size_t)i * 2 * hkv + hkv + h]);
            }
        free(amax);
    }
}

/* ----------------------------------------------------------- utilities */

static qattn_ctx *ctx;

#define CHECK(call)                                                                                                    \
    do {                                                                                                               \
        qattn_status s_ = (call);                                                                                      \
        if (s_ != QATTN_OK) {                                                                                          \
            fprintf(stderr, "qattn-decode-bench: %s: %s: %s\n", #call, qattn_status_str(s_), qattn_last_error(ctx));   \
            exit(2);                                                                                                   \
        }                                                                                                              \
    } while (0)

static qattn_buffer *buffer(size_t bytes)
{
    qattn_buffer *b = NULL;
    CHECK(qattn_buffer_create(ctx, bytes ? bytes : 4, &b));
    return b;
}

static int parse_list(const char *s, int64_t *out)
{
    int n = 0;
    char *copy = strdup(s), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok && n < MAX_LIST; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        double v = strtod(tok, &end);
        if (*end == 'k' || *end == 'K')
            v *= 1024;
        out[n++] = (int64_t)v;
    }
    free(copy);
    return n;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: qattn-decode-bench [options]\n"
            "  --backend NAME     cpu|cuda|vulkan|opencl|auto (default: $QATTN_BACKEND, else auto)\n"
            "  --batch LIST       sequences (default 1,16,64; cpu 1,4)\n"
            "  --ctx LIST         cached tokens per sequence, 'k' = 1024 (default 1k,8k,32k; cpu 512,2k)\n"
            "  --page LIST        tokens per page (default 16)\n"
            "  --dtype LIST       page dtypes: f16,bf16,fp8,int8,int8row (default f16,fp8,int8)\n"
            "  --hq HQ --hkv HKV --d D   heads and head dim (default 32, 8, 128)\n"
            "  --layout nhd|hnd   page layout (default nhd)\n"
            "  --table dense|csr  page-table encoding (default dense)\n"
            "  --splits N         force N key splits (default: the planner's choice)\n"
            "  --ordered-pages    hand pages out in order (default: shuffled, as a busy pool does)\n"
            "  --check            time with the NaN/Inf and table check on (default off: async runs)\n"
            "  --warmup W --iters I --reps R   timing (default 5, 20, 7; cpu 1, 2, 3)\n"
            "  --check-seqs S     sequences checked against fp64 (default 2; 0 skips)\n"
            "  --peak-gbps GBPS   also print the fraction of this bandwidth (e.g. a measured copy rate)\n"
            "  --seed S           data seed (default 1)\n"
            "  --json             one JSON object per line\n"
            "  --select LIST      also run page selection with these token budgets (e.g. 2k)\n"
            "  --adaptive EPS[,CAP]  with --select: the adaptive budget from each budget, up to CAP tokens\n");
}

static int parse_kinds(const char *s, options *o)
{
    o->nkind = 0;
    char *copy = strdup(s), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = -1;
        for (int i = 0; i < NKINDS; i++)
            if (strcmp(tok, kinds[i].name) == 0)
                found = i;
        if (found < 0 || o->nkind == NKINDS) {
            free(copy);
            return -1;
        }
        o->kind[o->nkind++] = found;
    }
    free(copy);
    return o->nkind ? 0 : -1;
}

static void parse_args(int argc, char **argv, options *o, int *explicit_shape, int *explicit_timing)
{
    memset(o, 0, sizeof(*o));
    o->hq = 32;
    o->hkv = 8;
    o->d = 128;
    o->layout = QATTN_KV_NHD;
    o->table = QATTN_PAGES_DENSE;
    o->check_seqs = 2;
    o->seed = 1;
    o->npage = 1;
    o->page[0] = 16;
    parse_kinds("f16,fp8,int8", o);
    *explicit_shape = *explicit_timing = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int used = 1;
        if (!strcmp(a, "--json")) {
            o->json = 1;
            used = 0;
        } else if (!strcmp(a, "--check")) {
            o->check = 1;
            used = 0;
        } else if (!strcmp(a, "--ordered-pages")) {
            o->ordered = 1;
            used = 0;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else if (!v) {
            usage(stderr);
            exit(2);
        } else if (!strcmp(a, "--backend")) {
            o->backend = v;
        } else if (!strcmp(a, "--batch")) {
            o->nbatch = parse_list(v, o->batch);
            *explicit_shape |= 1;
        } else if (!strcmp(a, "--ctx")) {
            o->nctx = parse_list(v, o->ctx);
            *explicit_shape |= 2;
        } else if (!strcmp(a, "--page")) {
            o->npage = parse_list(v, o->page);
        } else if (!strcmp(a, "--dtype")) {
            if (parse_kinds(v, o)) {
                fprintf(stderr, "qattn-decode-bench: --dtype takes f16,bf16,fp8,int8,int8row\n");
                exit(2);
            }
        } else if (!strcmp(a, "--hq")) {
            o->hq = atoll(v);
        } else if (!strcmp(a, "--hkv")) {
            o->hkv = atoll(v);
        } else if (!strcmp(a, "--d")) {
            o->d = atoll(v);
        } else if (!strcmp(a, "--layout")) {
            o->layout = !strcmp(v, "hnd") ? QATTN_KV_HND : QATTN_KV_NHD;
        } else if (!strcmp(a, "--table")) {
            o->table = !strcmp(v, "csr") ? QATTN_PAGES_CSR : QATTN_PAGES_DENSE;
        } else if (!strcmp(a, "--select")) {
            o->nselect = parse_list(v, o->select);
        } else if (!strcmp(a, "--adaptive")) {
            o->adaptive_eps = atof(v);
            const char *comma = strchr(v, ',');
            o->adaptive_cap = comma ? atoll(comma + 1) : 0;
        } else if (!strcmp(a, "--splits")) {
            o->splits = atoi(v);
        } else if (!strcmp(a, "--warmup")) {
            o->warmup = atoi(v);
            *explicit_timing |= 1;
        } else if (!strcmp(a, "--iters")) {
            o->iters = atoi(v);
            *explicit_timing |= 2;
        } else if (!strcmp(a, "--reps")) {
            o->reps = atoi(v);
            *explicit_timing |= 4;
        } else if (!strcmp(a, "--check-seqs")) {
            o->check_seqs = atoi(v);
        } else if (!strcmp(a, "--peak-gbps")) {
            o->peak_gbps = atof(v);
        } else if (!strcmp(a, "--seed")) {
            o->seed = strtoull(v, NULL, 10);
        } else {
            fprintf(stderr, "qattn-decode-bench: unknown option %s\n", a);
            usage(stderr);
            exit(2);
        }
        i += used;
    }
    if (o->hq <= 0 || o->hkv <= 0 || o->d <= 0 || o->hq % o->hkv || o->npage < 1) {
        fprintf(stderr, "qattn-decode-bench: bad shape (heads must divide, sizes positive)\n");
        exit(2);
    }
}

/* ---------------------------------------------------------- one cache */

typedef struct cache_set {
    const page_kind *kind;
    qattn_kv_cache_desc desc;
    qattn_kv_cache_sizes sizes;
    qattn_kv_cache_buffers bufs;
} cache_set;

/* fp64 attention of one query over n keys (K, V [n, Hkv, D] f32) for query head h: out[D]. */
static void reference_row(const float *q, const float *k, const float *v, int64_t n, int64_t hkv, int64_t d,
                          int64_t h_kv, double scale, double *out, double *scores)
{
    double m = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        const float *kr = k + (j * hkv + h_kv) * d;
        double s = 0;
        for (int64_t e = 0; e < d; e++)
            s += (double)q[e] * kr[e];
        scores[j] = s * scale;
        m = scores[j] > m ? scores[j] : m;
    }
    double l = 0;
    for (int64_t e = 0; e < d; e++)
        out[e] = 0;
    for (int64_t j = 0; j < n; j++) {
        double p = exp(scores[j] - m);
        l += p;
        const float *vr = v + (j * hkv + h_kv) * d;
        for (int64_t e = 0; e < d; e++)
            out[e] += p * vr[e];
    }
    for (int64_t e = 0; e < d; e++)
        out[e] /= l;
}

/* Median seconds per run of plan after the warm-up. */
static double time_plan(const options *o, const qattn_plan *plan, const qattn_paged_args *args)
{
    for (int w = 0; w < o->warmup; w++)
        CHECK(qattn_paged_run(plan, args));
    CHECK(qattn_ctx_synchronize(ctx));
    double *times = malloc((size_t)o->reps * sizeof(double));
    for (int r = 0; r < o->reps; r++) {
        double t0 = now_seconds();
        for (int it = 0; it < o->iters; it++)
            CHECK(qattn_paged_run(plan, args));
        CHECK(qattn_ctx_synchronize(ctx));
        times[r] = (now_seconds() - t0) / o->iters;
    }
    qsort(times, (size_t)o->reps, sizeof(double), cmp_double);
    double med = o->reps % 2 ? times[o->reps / 2] : 0.5 * (times[o->reps / 2 - 1] + times[o->reps / 2]);
    free(times);
    return med;
}

/* The pruned rows of one cache: each budget against the dense run (dense_med, dense output dense_o). */
static void run_selected(const options *o, const qattn_paged_desc *pd, qattn_paged_args args, const char *kind,
                         const char *device, double dense_med, const uint16_t *dense_o, int64_t pages_per_seq)
{
    const int64_t B = pd->batch, Hq = pd->heads_q, D = pd->cache.head_dim, Hkv = pd->cache.heads_kv;
    const size_t q_elems = (size_t)(B * Hq * D);
    uint16_t *oh = malloc(q_elems * 2);
    int32_t *counts = malloc((size_t)(B * Hkv) * 4);
    for (int i = 0; i < o->nselect; i++) {
        qattn_page_select_desc sel = {.budget_tokens = o->select[i], .sink_pages = 1, .recent_pages = 1,
                                      .epsilon = (float)o->adaptive_eps,
                                      .max_budget_tokens = o->adaptive_eps > 0 ? o->adaptive_cap : 0};
        qattn_plan *plan = NULL;
        qattn_status st = qattn_paged_select_plan_create(ctx, pd, &sel, &plan);
        if (st == QATTN_ERR_UNSUPPORTED) {
            progress("  %s pages, selection %lld: unsupported here: %s", kind, (long long)o->select[i],
                     qattn_last_error(ctx));
            continue;
        }
        CHECK(st);
        qattn_plan_info info;
        CHECK(qattn_plan_get_info(plan, &info));
        qattn_buffer *ws = buffer(info.workspace_bytes);
        args.workspace = ws;
        const double med = time_plan(o, plan, &args);
        CHECK(qattn_paged_run(plan, &args));
        CHECK(qattn_ctx_synchronize(ctx));
        CHECK(qattn_buffer_download(args.o, 0, oh, q_elems * 2));
        CHECK(qattn_paged_selection_read(plan, ws, 0, counts, NULL));
        double read = 0;
        for (int64_t r = 0; r < B * Hkv; r++)
            read += counts[r];
        const double frac = read / (double)(B * Hkv * pages_per_seq);
        ref_accum acc = {0};
        for (size_t e = 0; e < q_elems; e++) {
            float x, y;
            uint32_t bx = (uint32_t)oh[e], by = (uint32_t)dense_o[e];
            /* f16 -> f32 through the reference's loader */
            const qattn_tensor_desc one = qattn_tensor_nhd(QATTN_DTYPE_F16, 1, 1, 1, 1);
            uint16_t hx = (uint16_t)bx, hy = (uint16_t)by;
            x = (float)ref_load(&hx, &one, 0, 0, 0, 0);
            y = (float)ref_load(&hy, &one, 0, 0, 0, 0);
            ref_accum_add(&acc, x, y);
        }
        ref_metrics m = ref_accum_finish(&acc);
        if (o->json) {
            printf("{\"backend\":\"%s\",\"device\":\"%s\",\"batch\":%lld,\"ctx\":%lld,\"hq\":%lld,\"hkv\":%lld,"
                   "\"d\":%lld,\"page\":%lld,\"dtype\":\"%s\",\"select_budget\":%lld,\"adaptive_eps\":%g,"
                   "\"kernel\":\"%s\",\"median_us\":%.3f,\"dense_us\":%.3f,\"speedup_vs_dense\":%.3f,"
                   "\"pages_read_frac\":%.5f,\"cos_vs_dense\":%.7f,\"rel_l1_vs_dense\":%.5f}\n",
                   qattn_ctx_backend(ctx), device, (long long)B, (long long)(pd->max_pages_per_seq * pd->cache.page_size),
                   (long long)Hq, (long long)Hkv, (long long)D, (long long)pd->cache.page_size, kind,
                   (long long)o->select[i], o->adaptive_eps, info.kernel, med * 1e6, dense_med * 1e6, dense_med / med,
                   frac, m.cos_sim, m.rel_l1);
        } else {
            printf("%5lld %6s %5lld %-8s select %6lld%s: %9.2f us (dense %9.2f us) %6.2fx, read %5.1f%% of pages, vs "
                   "dense cos %.5f relL1 %.4f  %s\n",
                   (long long)B, "", (long long)pd->cache.page_size, kind, (long long)o->select[i],
                   o->adaptive_eps > 0 ? " adaptive" : "", med * 1e6, dense_med * 1e6, dense_med / med, 100 * frac,
                   m.cos_sim, m.rel_l1, info.kernel);
        }
        fflush(stdout);
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
    }
    free(oh);
    free(counts);
}

static int run_shape(const options *o, int64_t B, int64_t N, int64_t P, const char *device)
{
    const int64_t Hq = o->hq, Hkv = o->hkv, D = o->d, G = Hq / Hkv;
    const int64_t pages_per_seq = (N + P - 1) / P, num_pages = B * pages_per_seq;
    int failed = 0;
    progress("shape B=%lld ctx=%lld page=%lld: building %lld pages per dtype", (long long)B, (long long)N,
             (long long)P, (long long)num_pages);

    /* Pages in shuffled (or handed-out) order, the page tables, the slots. */
    int32_t *pages = malloc((size_t)num_pages * 4);
    for (int64_t i = 0; i < num_pages; i++)
        pages[i] = (int32_t)i;
    if (!o->ordered) {
        ref_rng rng;
        ref_rng_seed(&rng, o->seed ^ 0x5eed);
        for (int64_t i = num_pages - 1; i > 0; i--) {
            int64_t j = (int64_t)(ref_rng_uniform(&rng) * (double)(i + 1));
            int32_t t = pages[i];
            pages[i] = pages[j];
            pages[j] = t;
        }
    }
    const int32_t **lists = malloc((size_t)B * sizeof(*lists));
    int64_t *counts = malloc((size_t)B * sizeof(int64_t));
    for (int64_t b = 0; b < B; b++) {
        lists[b] = pages + b * pages_per_seq;
        counts[b] = pages_per_seq;
    }
    int32_t *block_table = malloc((size_t)(B * pages_per_seq) * 4), *indptr = malloc((size_t)(B + 1) * 4);
    int32_t *seq_lens = malloc((size_t)B * 4), *last = malloc((size_t)B * 4), *qo = malloc((size_t)(B + 1) * 4);
    CHECK(qattn_page_tables_build(B, lists, counts, pages_per_seq, block_table, indptr, pages));
    for (int64_t b = 0; b < B; b++) {
        seq_lens[b] = (int32_t)N;
        last[b] = (int32_t)(N - (pages_per_seq - 1) * P);
        qo[b] = (int32_t)b;
    }
    qo[B] = (int32_t)B;

    /* Per-head amax (static scales) over all the data, when a per-head format is asked for. */
    float *k_amax = calloc((size_t)Hkv, sizeof(float)), *v_amax = calloc((size_t)Hkv, sizeof(float));
    int per_head = 0;
    for (int i = 0; i < o->nkind; i++)
        per_head |= kinds[o->kind[i]].scales == QATTN_KV_SCALES_PER_HEAD;
    if (per_head) {
        progress("  calibrating per-head scales (amax of the data)");
        for (int64_t b = 0; b < B; b++)
            generate(o->seed, b, 0, N, Hkv, D, NULL, NULL, k_amax, v_amax);
    }

    cache_set caches[NKINDS];
    int ncache = 0;
    for (int i = 0; i < o->nkind; i++) {
        cache_set *c = &caches[ncache];
        c->kind = &kinds[o->kind[i]];
        c->desc = (qattn_kv_cache_desc){.num_pages = num_pages, .page_size = P, .heads_kv = Hkv, .head_dim = D,
                                        .dtype = c->kind->dtype, .layout = o->layout, .scales = c->kind->scales};
        CHECK(qattn_kv_cache_bytes(ctx, &c->desc, &c->sizes));
        memset(&c->bufs, 0, sizeof(c->bufs));
        c->bufs.k = buffer(c->sizes.cache_bytes);
        c->bufs.v = buffer(c->sizes.cache_bytes);
        if (o->nselect > 0) { /* selection reads the page metadata the appends keep */
            qattn_kv_meta_sizes ms;
            CHECK(qattn_kv_meta_bytes(ctx, &c->desc, &ms));
            c->bufs.k_meta = buffer(ms.meta_bytes);
        }
        if (c->kind->scales != QATTN_KV_SCALES_NONE) {
            c->bufs.k_scale = buffer(c->sizes.scale_bytes);
            c->bufs.v_scale = buffer(c->sizes.scale_bytes);
            if (c->kind->scales == QATTN_KV_SCALES_PER_HEAD) {
                float qmax = c->kind->dtype == QATTN_DTYPE_FP8_E4M3 ? 448.f : 127.f;
                float *ks = malloc((size_t)Hkv * 4), *vs = malloc((size_t)Hkv * 4);
                for (int64_t h = 0; h < Hkv; h++) {
                    ks[h] = k_amax[h] > 0 ? k_amax[h] / qmax : 1.f;
                    vs[h] = v_amax[h] > 0 ? v_amax[h] / qmax : 1.f;
                }
                CHECK(qattn_buffer_upload(c->bufs.k_scale, 0, ks, (size_t)Hkv * 4));
                CHECK(qattn_buffer_upload(c->bufs.v_scale, 0, vs, (size_t)Hkv * 4));
                free(ks);
                free(vs);
            }
        }
        ncache++;
    }

    /* Append every sequence, chunk by chunk, into every cache (one upload serves them all). */
    const int64_t chunk = N < 8192 ? N : 8192;
    float *kh = malloc((size_t)(chunk * Hkv * D) * 4), *vh = malloc((size_t)(chunk * Hkv * D) * 4);
    int64_t *slots = malloc((size_t)chunk * 8);
    qattn_buffer *kb = buffer((size_t)(chunk * Hkv * D) * 4), *vb = buffer((size_t)(chunk * Hkv * D) * 4);
    qattn_buffer *sb = buffer((size_t)chunk * 8);
    double t_gen = now_seconds();
    for (int64_t b = 0; b < B; b++) {
        for (int64_t t0 = 0; t0 < N; t0 += chunk) {
            int64_t n = N - t0 < chunk ? N - t0 : chunk;
            generate(o->seed, b, t0, n, Hkv, D, kh, vh, NULL, NULL);
            for (int64_t t = 0; t < n; t++)
                slots[t] = (int64_t)pages[b * pages_per_seq + (t0 + t) / P] * P + (t0 + t) % P;
            CHECK(qattn_buffer_upload(kb, 0, kh, (size_t)(n * Hkv * D) * 4));
            CHECK(qattn_buffer_upload(vb, 0, vh, (size_t)(n * Hkv * D) * 4));
            CHECK(qattn_buffer_upload(sb, 0, slots, (size_t)n * 8));
            for (int i = 0; i < ncache; i++) {
                qattn_kv_append_args app = {.cache = &caches[i].desc, .buffers = &caches[i].bufs, .num_tokens = n,
                                            .new_dtype = QATTN_DTYPE_F32, .new_stride = {Hkv * D, D},
                                            .k_new = kb, .v_new = vb, .slot_mapping = sb,
                                            .flags = QATTN_FLAG_NO_FINITE_CHECK};
                CHECK(qattn_kv_append(ctx, &app));
            }
        }
        if (B >= 8 && (b + 1) % (B / 4) == 0)
            progress("  appended %lld/%lld sequences", (long long)(b + 1), (long long)B);
    }
    CHECK(qattn_ctx_synchronize(ctx));
    progress("  caches filled in %.1f s", now_seconds() - t_gen);
    qattn_buffer_destroy(kb);
    qattn_buffer_destroy(vb);
    qattn_buffer_destroy(sb);
    free(kh);
    free(vh);
    free(slots);

    /* Queries [B, Hq, D] f16 (kept: they are small), a seed of their own; tables on the device. */
    const size_t q_elems = (size_t)(B * Hq * D);
    const qattn_tensor_desc qd = qattn_tensor_nhd(QATTN_DTYPE_F16, 1, Hq, B, D); /* rows b, heads h */
    void *qh = ref_tensor_alloc(&qd);
    ref_rng qrng;
    ref_rng_seed(&qrng, o->seed ^ 0x9999);
    ref_fill_randn(qh, &qd, &qrng, 1.0, NULL);
    float *qf = malloc(q_elems * 4);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t e = 0; e < D; e++)
                qf[(b * Hq + h) * D + e] = (float)ref_load(qh, &qd, 0, h, b, e);
    qattn_buffer *qb = buffer(q_elems * 2), *ob = buffer(q_elems * 2);
    CHECK(qattn_buffer_upload(qb, 0, qh, q_elems * 2));
    qattn_buffer *qob = buffer((size_t)(B + 1) * 4), *btb = buffer((size_t)(B * pages_per_seq) * 4);
    qattn_buffer *slb = buffer((size_t)B * 4), *ipb = buffer((size_t)(B + 1) * 4), *ixb = buffer((size_t)num_pages * 4);
    qattn_buffer *lpb = buffer((size_t)B * 4);
    CHECK(qattn_buffer_upload(qob, 0, qo, (size_t)(B + 1) * 4));
    CHECK(qattn_buffer_upload(btb, 0, block_table, (size_t)(B * pages_per_seq) * 4));
    CHECK(qattn_buffer_upload(slb, 0, seq_lens, (size_t)B * 4));
    CHECK(qattn_buffer_upload(ipb, 0, indptr, (size_t)(B + 1) * 4));
    CHECK(qattn_buffer_upload(ixb, 0, pages, (size_t)num_pages * 4));
    CHECK(qattn_buffer_upload(lpb, 0, last, (size_t)B * 4));

    double f16_seconds = 0;
    void *oh = ref_tensor_alloc(&qd);
    for (int i = 0; i < ncache; i++) {
        cache_set *c = &caches[i];
        qattn_paged_desc pd = {.cache = c->desc, .table = o->table, .batch = B, .max_pages_per_seq = pages_per_seq,
                               .total_q = B, .max_q_len = 1, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F16,
                               .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1,
                               .num_splits = o->splits, .flags = o->check ? 0 : QATTN_FLAG_NO_FINITE_CHECK};
        qattn_plan *plan = NULL;
        qattn_status st = qattn_paged_plan_create(ctx, &pd, &plan);
        if (st == QATTN_ERR_UNSUPPORTED) {
            progress("  %s pages: unsupported here: %s", c->kind->name, qattn_last_error(ctx));
            continue;
        }
        CHECK(st);
        qattn_plan_info info;
        CHECK(qattn_plan_get_info(plan, &info));
        qattn_buffer *ws = info.workspace_bytes ? buffer(info.workspace_bytes) : NULL;
        qattn_paged_args args = {.cache = &c->bufs, .q = qb, .o = ob, .qo_indptr = qob, .workspace = ws};
        if (o->table == QATTN_PAGES_DENSE) {
            args.block_table = btb;
            args.seq_lens = slb;
        } else {
            args.indptr = ipb;
            args.indices = ixb;
            args.last_page_len = lpb;
        }
        const double med = time_plan(o, plan, &args);

        /* Bytes read: every cached row of K and V, the scales, Q, and the page table. */
        const double es = (double)qattn_dtype_size(c->kind->dtype);
        const double kv_bytes = 2.0 * (double)B * (double)N * (double)Hkv * (double)D * es;
        double scale_bytes = c->kind->scales == QATTN_KV_SCALES_PER_ROW ? 2.0 * (double)B * (double)N * (double)Hkv * 4
                             : c->kind->scales == QATTN_KV_SCALES_PER_HEAD ? 2.0 * (double)Hkv * 4
                                                                           : 0;
        const double read_bytes = kv_bytes + scale_bytes + (double)q_elems * 2 + (double)(B * pages_per_seq) * 4;
        const double gbps = read_bytes / med / 1e9, tokens = (double)B * (double)N / med;
        if (c->kind->dtype == QATTN_DTYPE_F16)
            f16_seconds = med;

        /* Accuracy: a few sequences against fp64 over the original fp32 values. */
        ref_accum acc = {0};
        if (o->check_seqs > 0) {
            CHECK(qattn_paged_run(plan, &args));
            CHECK(qattn_ctx_synchronize(ctx));
            CHECK(qattn_buffer_download(ob, 0, oh, q_elems * 2));
            float *k = malloc((size_t)(N * Hkv * D) * 4), *v = malloc((size_t)(N * Hkv * D) * 4);
            double *out = malloc((size_t)D * sizeof(double)), *scores = malloc((size_t)N * sizeof(double));
            int nseq = o->check_seqs < B ? o->check_seqs : (int)B;
            for (int s = 0; s < nseq; s++) {
                int64_t b = nseq == 1 ? 0 : (int64_t)s * (B - 1) / (nseq - 1);
                generate(o->seed, b, 0, N, Hkv, D, k, v, NULL, NULL);
                for (int64_t h = 0; h < Hq; h++) {
                    reference_row(qf + (b * Hq + h) * D, k, v, N, Hkv, D, h / G, 1.0 / sqrt((double)D), out, scores);
                    for (int64_t e = 0; e < D; e++)
                        ref_accum_add(&acc, ref_load(oh, &qd, 0, h, b, e), out[e]);
                }
            }
            free(k);
            free(v);
            free(out);
            free(scores);
        }
        ref_metrics m = ref_accum_finish(&acc);
        const double cos_bar = c->kind->dtype == QATTN_DTYPE_FP8_E4M3 ? 0.999
                               : c->kind->dtype == QATTN_DTYPE_I8 ? 0.9995
                               : c->kind->dtype == QATTN_DTYPE_BF16 ? 0.9999
                                                                    : 0.99999;
        const int ok = o->check_seqs <= 0 || (m.nonfinite == 0 && m.cos_sim >= cos_bar);
        failed |= !ok;
        const double speedup = f16_seconds > 0 ? f16_seconds / med : 0;
        if (o->json) {
            printf("{\"backend\":\"%s\",\"device\":\"%s\",\"batch\":%lld,\"ctx\":%lld,\"hq\":%lld,\"hkv\":%lld,"
                   "\"d\":%lld,\"page\":%lld,\"dtype\":\"%s\",\"layout\":\"%s\",\"table\":\"%s\",\"check\":%d,"
                   "\"kernel\":\"%s\",\"splits\":%d,\"median_us\":%.3f,\"read_bytes\":%.0f,\"kv_bytes\":%.0f,"
                   "\"gbps\":%.2f,\"frac_peak\":%.4f,\"kv_tokens_per_s\":%.4g,\"speedup_vs_f16\":%.3f,"
                   "\"cos\":%.7f,\"rel_l1\":%.5f,\"checked_seqs\":%d,\"ok\":%s}\n",
                   qattn_ctx_backend(ctx), device, (long long)B, (long long)N, (long long)Hq, (long long)Hkv,
                   (long long)D, (long long)P, c->kind->name, o->layout == QATTN_KV_NHD ? "nhd" : "hnd",
                   o->table == QATTN_PAGES_DENSE ? "dense" : "csr", o->check, info.kernel,
                   info.kv_tile ? (int)((pages_per_seq * P + info.kv_tile - 1) / info.kv_tile) : 1, med * 1e6,
                   read_bytes, kv_bytes, gbps, o->peak_gbps > 0 ? gbps / o->peak_gbps : 0.0, tokens, speedup,
                   o->check_seqs > 0 ? m.cos_sim : 0.0, o->check_seqs > 0 ? m.rel_l1 : 0.0,
                   o->check_seqs > 0 ? (o->check_seqs < B ? o->check_seqs : (int)B) : 0, ok ? "true" : "false");
        } else {
            char frac[32] = "";
            if (o->peak_gbps > 0)
                snprintf(frac, sizeof(frac), "%6.1f%%", 100.0 * gbps / o->peak_gbps);
            printf("%5lld %6lld %5lld %-8s %7d %11.2f %10.1f %7s %10.3g %6.2fx %10.7f %8.5f %s  %s\n", (long long)B,
                   (long long)N, (long long)P, c->kind->name,
                   info.kv_tile ? (int)((pages_per_seq * P + info.kv_tile - 1) / info.kv_tile) : 1, med * 1e6, gbps,
                   o->peak_gbps > 0 ? frac : "-", tokens, speedup, o->check_seqs > 0 ? m.cos_sim : NAN,
                   o->check_seqs > 0 ? m.rel_l1 : NAN, ok ? "ok" : "FAIL", info.kernel);
        }
        fflush(stdout);
        if (o->nselect > 0) { /* the dense output, then the pruned rows against it */
            CHECK(qattn_paged_run(plan, &args));
            CHECK(qattn_ctx_synchronize(ctx));
            CHECK(qattn_buffer_download(ob, 0, oh, q_elems * 2));
            run_selected(o, &pd, args, c->kind->name, device, med, oh, pages_per_seq);
        }
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
    }
    free(oh);
    for (int i = 0; i < ncache; i++) {
        qattn_buffer_destroy(caches[i].bufs.k);
        qattn_buffer_destroy(caches[i].bufs.v);
        qattn_buffer_destroy(caches[i].bufs.k_scale);
        qattn_buffer_destroy(caches[i].bufs.v_scale);
        qattn_buffer_destroy(caches[i].bufs.k_meta);
    }
    qattn_buffer *bufs[] = {qb, ob, qob, btb, slb, ipb, ixb, lpb};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        qattn_buffer_destroy(bufs[i]);
    void *heap[] = {pages, lists, counts, block_table, indptr, seq_lens, last, qo, k_amax, v_amax, qh, qf};
    for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
        free(heap[i]);
    return failed;
}

int main(int argc, char **argv)
{
    options o;
    int explicit_shape, explicit_timing;
    parse_args(argc, argv, &o, &explicit_shape, &explicit_timing);
    qattn_ctx_params params = {.backend = o.backend};
    qattn_status s = qattn_ctx_create(&params, &ctx);
    if (s) {
        fprintf(stderr, "qattn-decode-bench: %s: %s\n", qattn_status_str(s), qattn_last_error(NULL));
        return 2;
    }
    const int on_cpu = strcmp(qattn_ctx_backend(ctx), "cpu") == 0;
    if (!(explicit_shape & 1))
        o.nbatch = on_cpu ? parse_list("1,4", o.batch) : parse_list("1,16,64", o.batch);
    if (!(explicit_shape & 2))
        o.nctx = on_cpu ? parse_list("512,2k", o.ctx) : parse_list("1k,8k,32k", o.ctx);
    if (!(explicit_timing & 1))
        o.warmup = on_cpu ? 1 : 5;
    if (!(explicit_timing & 2))
        o.iters = on_cpu ? 2 : 20;
    if (!(explicit_timing & 4))
        o.reps = on_cpu ? 3 : 7;
    if (o.iters < 1 || o.reps < 1 || o.warmup < 0) {
        fprintf(stderr, "qattn-decode-bench: --iters and --reps must be >= 1\n");
        return 2;
    }
    qattn_device_info dev;
    CHECK(qattn_ctx_device_info(ctx, &dev));
    for (char *c = dev.name; *c; c++)
        if (*c == '"' || *c == '\\')
            *c = ' ';
    if (!o.json) {
        printf("decode on %s (%s): Hq=%lld Hkv=%lld D=%lld, %s pages, %s tables, q f16, check %s | warmup %d, median "
               "of %d x %d runs\n",
               qattn_ctx_backend(ctx), dev.name, (long long)o.hq, (long long)o.hkv, (long long)o.d,
               o.layout == QATTN_KV_NHD ? "NHD" : "HND", o.table == QATTN_PAGES_DENSE ? "dense" : "CSR",
               o.check ? "on" : "off", o.warmup, o.reps, o.iters);
        printf("%5s %6s %5s %-8s %7s %11s %10s %7s %10s %7s %10s %8s %s\n", "batch", "ctx", "page", "dtype", "splits",
               "median_us", "GB/s", "peak", "tokens/s", "vs f16", "cos", "relL1", "ok");
    }
    int failed = 0;
    for (int pi = 0; pi < o.npage; pi++)
        for (int bi = 0; bi < o.nbatch; bi++)
            for (int ci = 0; ci < o.nctx; ci++) {
                if (o.batch[bi] < 1 || o.ctx[ci] < 1 || o.page[pi] < 1) {
                    fprintf(stderr, "qattn-decode-bench: batch, ctx and page must be >= 1\n");
                    return 2;
                }
                failed |= run_shape(&o, o.batch[bi], o.ctx[ci], o.page[pi], dev.name);
            }
    qattn_ctx_destroy(ctx);
    return failed ? 1 : 0;
}
