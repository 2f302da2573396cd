/*
 * qattn-bench: times attention on one backend and checks every result
 * against an fp64 reference computed on the CPU.
 *
 *   qattn-bench [--backend NAME] [--precision LIST|all] [--b B] [--h H] [--hkv HKV]
 *               [--n N | --nq NQ --nk NK] [--d D] [--causal] [--dtype f16|bf16|f32]
 *               [--layout hnd|nhd] [--data randn|kbias] [--granularity G]
 *               [--warmup W] [--iters I] [--check-rows R] [--no-finite-check] [--json]
 *               [--data structured] [--window L[,R]] [--sinks S] [--blocks QBxKB --keep F]
 *               [--predict TAU[,THETA]] [--pv LAMBDA]
 *
 * Sparse options add a row per mode after the dense one: the sparse plan's
 * median, its speed-up over the dense plan of the same mode measured in the
 * same process, the fraction of the (causally) visible pairs it computes
 * (density) and the ideal speed-up 1/density; accuracy is against the fp64
 * reference under the same mask (--predict: the layout the run predicted,
 * read back). FLOP rates of sparse rows count the dense problem's FLOPs
 * (an equivalent rate).
 * FLOPs are counted as 4*B*Hq*Nq*Nk*D (halved for causal); times are medians
 * of individually synchronized runs after warm-up. Exit status: 0 when every
 * mode that ran met its accuracy bar, 1 when one did not, 2 on errors.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qattn/qattn.h"
#include "reference.h"

typedef struct options {
    const char *backend;
    char precisions[256];
    int64_t b, h, hkv, nq, nk, d;
    int causal;
    qattn_dtype dtype;
    int nhd;
    int kbias;
    qattn_granularity granularity;
    int warmup, iters;
    int64_t check_rows;
    int no_finite_check;
    int json;
    int structured;
    /* Sparse attention (a row after each dense one when any is set). */
    int sparse, window;
    int64_t window_left, window_right, sinks, q_block, k_block;
    double keep;             /* --blocks: fraction of (causally) visible blocks kept per row */
    float tau, theta, pv;    /* --predict, --pv */
} options;

/* Accuracy bars against fp64 (randn and K-bias data). */
typedef struct bar {
    double cos_min, rel_l1_max;
} bar;

static bar accuracy_bar(qattn_precision p, qattn_dtype dtype)
{
    switch (p) {
    case QATTN_PRECISION_EXACT: /* the output's rounding sets the floor: bf16 keeps 8 bits */
        return dtype == QATTN_DTYPE_BF16 ? (bar){0.9999, 0.006} : (bar){0.99999, 0.002};
    case QATTN_PRECISION_INT8_FP16: return (bar){0.9995, 0.03};
    default: return (bar){0.999, 0.05}; /* FP8 P and V: E4M3 rounding of both operands */
    }
}

static int64_t qattn_bench_min(int64_t a, int64_t b) { return a < b ? a : b; }

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

static void usage(FILE *f)
{
    fprintf(f,
            "usage: qattn-bench [options]\n"
            "  --backend NAME       cpu|cuda|vulkan|opencl|auto (default: $QATTN_BACKEND, else auto)\n"
            "  --precision LIST     comma-separated: exact,int8_fp16,int8_fp8,int8_fp8_f16acc,auto, or all\n"
            "  --b B --h H --hkv HKV --n N (--nq NQ --nk NK) --d D   problem shape\n"
            "  --causal             bottom-right causal mask\n"
            "  --dtype f16|bf16|f32 input and output dtype (default f16)\n"
            "  --layout hnd|nhd     memory layout (default hnd)\n"
            "  --data randn|kbias   randn, or randn with a large per-channel bias on K\n"
            "  --granularity G      per_block|per_warp|per_thread (quantized modes)\n"
            "  --warmup W --iters I timing (default 2 and 5 on cpu, 10 and 30 on gpus)\n"
            "  --check-rows R       reference rows per head (default 32; 0 skips the check)\n"
            "  --no-finite-check    skip the NaN/Inf scan of the inputs\n"
            "  --json               one JSON object per line instead of a table\n"
            "  --data structured    topic segments, a local bump, sinks and a needle (for sparse attention)\n"
            "  --window L[,R]       sparse: a local window of L keys before (and R after; -1 unbounded)\n"
            "  --sinks S            sparse: S sink tokens with the window\n"
            "  --blocks QBxKB       sparse: a random block layout of QB x KB blocks, --keep F of each row's\n"
            "  --keep F             visible blocks kept (default 0.5)\n"
            "  --predict TAU[,THETA] sparse: predicted layouts (128x64 blocks unless --blocks), cdf TAU, sim THETA (0.6)\n"
            "  --pv LAMBDA          sparse: skip P.V of 16-row groups below the running max by LAMBDA (log2)\n");
}

static int parse_precisions(const char *list, qattn_precision *out, int max)
{
    if (strcmp(list, "all") == 0) {
        for (int i = 0; i < 4; i++)
            out[i] = (qattn_precision)(QATTN_PRECISION_EXACT + i);
        return 4;
    }
    int n = 0;
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", list);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int found = -1;
        for (int p = 0; p < QATTN_PRECISION_COUNT; p++)
            if (strcmp(tok, qattn_precision_name((qattn_precision)p)) == 0)
                found = p;
        if (found < 0 || n >= max) {
            fprintf(stderr, "qattn-bench: unknown precision '%s' (exact, int8_fp16, int8_fp8, int8_fp8_f16acc, auto, all)\n",
                    tok);
            return -1;
        }
        out[n++] = (qattn_precision)found;
    }
    return n;
}

static int parse_args(int argc, char **argv, options *o)
{
    memset(o, 0, sizeof(*o));
    snprintf(o->precisions, sizeof(o->precisions), "all");
    o->b = o->h = o->hkv = o->nq = o->nk = o->d = -1;
    o->dtype = QATTN_DTYPE_F16;
    o->warmup = o->iters = -1;
    o->check_rows = 32;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define INT_OPT(name, field)                                                                                          \
    if (strcmp(a, name) == 0) {                                                                                        \
        if (!v) {                                                                                                      \
            fprintf(stderr, "qattn-bench: %s needs a value\n", name);                                                  \
            return -1;                                                                                                 \
        }                                                                                                              \
        char *end;                                                                                                     \
        o->field = strtoll(v, &end, 10);                                                                               \
        if (*end || o->field < 0) {                                                                                    \
            fprintf(stderr, "qattn-bench: %s wants a non-negative integer, got '%s'\n", name, v);                     \
            return -1;                                                                                                 \
        }                                                                                                              \
        i++;                                                                                                           \
        continue;                                                                                                      \
    }
        INT_OPT("--b", b)
        INT_OPT("--h", h)
        INT_OPT("--hkv", hkv)
        INT_OPT("--nq", nq)
        INT_OPT("--nk", nk)
        INT_OPT("--d", d)
        INT_OPT("--warmup", warmup)
        INT_OPT("--iters", iters)
        INT_OPT("--check-rows", check_rows)
#undef INT_OPT
        if (strcmp(a, "--n") == 0 && v) {
            o->nq = o->nk = strtoll(v, NULL, 10);
            i++;
        } else if (strcmp(a, "--backend") == 0 && v) {
            o->backend = v;
            i++;
        } else if (strcmp(a, "--precision") == 0 && v) {
            snprintf(o->precisions, sizeof(o->precisions), "%s", v);
            i++;
        } else if (strcmp(a, "--dtype") == 0 && v) {
            if (strcmp(v, "f16") == 0)
                o->dtype = QATTN_DTYPE_F16;
            else if (strcmp(v, "bf16") == 0)
                o->dtype = QATTN_DTYPE_BF16;
            else if (strcmp(v, "f32") == 0)
                o->dtype = QATTN_DTYPE_F32;
            else {
                fprintf(stderr, "qattn-bench: --dtype wants f16, bf16 or f32\n");
                return -1;
            }
            i++;
        } else if (strcmp(a, "--layout") == 0 && v) {
            o->nhd = strcmp(v, "nhd") == 0;
            if (!o->nhd && strcmp(v, "hnd") != 0) {
                fprintf(stderr, "qattn-bench: --layout wants hnd or nhd\n");
                return -1;
            }
            i++;
        } else if (strcmp(a, "--data") == 0 && v) {
            o->kbias = strcmp(v, "kbias") == 0;
            o->structured = strcmp(v, "structured") == 0;
            if (!o->kbias && !o->structured && strcmp(v, "randn") != 0) {
                fprintf(stderr, "qattn-bench: --data wants randn, kbias or structured\n");
                return -1;
            }
            i++;
        } else if (strcmp(a, "--granularity") == 0 && v) {
            int g = -1;
            for (int k = 1; k <= 3; k++)
                if (strcmp(v, qattn_granularity_name((qattn_granularity)k)) == 0)
                    g = k;
            if (g < 0) {
                fprintf(stderr, "qattn-bench: --granularity wants per_block, per_warp or per_thread\n");
                return -1;
            }
            o->granularity = (qattn_granularity)g;
            i++;
        } else if (strcmp(a, "--window") == 0 && v) {
            o->sparse = o->window = 1;
            o->window_right = -1;
            if (sscanf(v, "%lld,%lld", (long long *)&o->window_left, (long long *)&o->window_right) < 1) {
                fprintf(stderr, "qattn-bench: --window wants L or L,R\n");
                return -1;
            }
            i++;
        } else if (strcmp(a, "--sinks") == 0 && v) {
            o->sparse = o->window = 1;
            o->sinks = strtoll(v, NULL, 10);
            if (!o->window_left && !o->window_right)
                o->window_left = o->window_right = -1;
            i++;
        } else if (strcmp(a, "--blocks") == 0 && v) {
            o->sparse = 1;
            if (sscanf(v, "%lldx%lld", (long long *)&o->q_block, (long long *)&o->k_block) != 2) {
                fprintf(stderr, "qattn-bench: --blocks wants QBxKB (e.g. 128x128)\n");
                return -1;
            }
            if (o->keep == 0.0)
                o->keep = 0.5;
            i++;
        } else if (strcmp(a, "--keep") == 0 && v) {
            o->keep = strtod(v, NULL);
            i++;
        } else if (strcmp(a, "--predict") == 0 && v) {
            o->sparse = 1;
            o->theta = 0.6f;
            if (sscanf(v, "%f,%f", &o->tau, &o->theta) < 1) {
                fprintf(stderr, "qattn-bench: --predict wants TAU or TAU,THETA\n");
                return -1;
            }
            i++;
        } else if (strcmp(a, "--pv") == 0 && v) {
            o->sparse = 1;
            o->pv = strtof(v, NULL);
            i++;
        } else if (strcmp(a, "--causal") == 0) {
            o->causal = 1;
        } else if (strcmp(a, "--no-finite-check") == 0) {
            o->no_finite_check = 1;
        } else if (strcmp(a, "--json") == 0) {
            o->json = 1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        } else {
            fprintf(stderr, "qattn-bench: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return -1;
        }
    }
    return 0;
}

/* Defaults that make a meaningful run on the chosen backend. */
static void apply_defaults(options *o, int on_cpu)
{
    if (o->d < 0)
        o->d = 128;
    if (o->nq < 0)
        o->nq = on_cpu ? 2048 : 4096;
    if (o->nk < 0)
        o->nk = o->nq;
    if (o->h < 0)
        o->h = on_cpu ? 8 : 2048 / o->d;
    if (o->hkv < 0)
        o->hkv = o->h;
    if (o->b < 0)
        o->b = on_cpu ? 1 : (16384 / o->nq > 0 ? 16384 / o->nq : 1);
    if (o->warmup < 0)
        o->warmup = on_cpu ? 1 : 10;
    if (o->iters < 0)
        o->iters = on_cpu ? 3 : 30;
}

static qattn_tensor_desc make_desc(const options *o, int64_t heads, int64_t n, qattn_dtype dt)
{
    return o->nhd ? qattn_tensor_nhd(dt, o->b, heads, n, o->d) : qattn_tensor_hnd(dt, o->b, heads, n, o->d);
}

/* ---------------------------------------------------------- sparse rows */

/* Visible pairs of (b, kv head) rows under the mask, and under causal alone. */
static void count_pairs(const options *o, const ref_sparse_mask *m, double *kept, double *dense)
{
    *kept = *dense = 0;
    for (int64_t b = 0; b < o->b; b++)
        for (int64_t hk = 0; hk < o->hkv; hk++)
            for (int64_t i = 0; i < o->nq; i++) {
                const int64_t end = o->causal ? qattn_bench_min(o->nk, i + 1 + o->nk - o->nq) : o->nk;
                if (end <= 0)
                    continue;
                *dense += (double)end;
                if (!m->sd->window && !m->kept) {
                    *kept += (double)end;
                    continue;
                }
                /* Walk the key blocks of the layout (or 64-key stretches) and count per stretch. */
                const int64_t step = m->kept ? m->sd->k_block : 64;
                for (int64_t j0 = 0; j0 < end; j0 += step) {
                    const int64_t j1 = qattn_bench_min(end, j0 + step);
                    if (m->kept && !m->kept[((b * m->hkv + hk) * m->q_blocks + i / m->sd->q_block) * m->k_blocks +
                                            j0 / step])
                        continue;
                    if (!m->sd->window) {
                        *kept += (double)(j1 - j0);
                        continue;
                    }
                    for (int64_t j = j0; j < j1; j++)
                        *kept += ref_sparse_visible(m, b, hk * m->group, i, j);
                }
            }
}

/* Times the sparse plan of one mode after its dense row; prints its row. Returns 1 below the bar. */
static int sparse_row(const options *o, qattn_ctx *ctx, const qattn_attention_desc *dense_desc,
                      const qattn_run_args *dense_args, const ref_problem *dense_rp, void *hq, void *hk, void *hv,
                      void *ho, float *hlse, double dense_median, double flops, int on_cpu, const char *backend,
                      const char *device, uint64_t seed, ref_rng *rng)
{
    (void)hq, (void)hk, (void)hv;
    qattn_sparse_desc sd = {.window = o->window, .pv_threshold = o->pv};
    if (o->window) {
        sd.window_left = o->window_left;
        sd.window_right = o->window_right;
        sd.sink_tokens = o->sinks;
    }
    if (o->tau > 0.f) {
        sd.layout = QATTN_SPARSE_PREDICT;
        sd.q_block = o->q_block ? o->q_block : 128;
        sd.k_block = o->k_block ? o->k_block : 64;
        sd.cdf_threshold = o->tau;
        sd.sim_threshold = o->theta;
        sd.sink_blocks = 1;
        sd.recent_blocks = 1;
        sd.last_q_blocks = 1;
    } else if (o->q_block) {
        sd.layout = QATTN_SPARSE_BLOCKS;
        sd.q_block = o->q_block;
        sd.k_block = o->k_block;
    }
    const char *pname = qattn_precision_name(dense_desc->precision);
    qattn_plan *plan = NULL;
    qattn_status s = qattn_sparse_plan_create(ctx, dense_desc, &sd, &plan);
    if (s) {
        printf("%-16s sparse %s: %s\n", pname, s == QATTN_ERR_UNSUPPORTED ? "unsupported" : "failed",
               qattn_last_error(ctx));
        return s == QATTN_ERR_UNSUPPORTED ? 0 : 1;
    }
    int64_t q_block = 0, k_block = 0;
    const int64_t rows = qattn_sparse_layout_rows(plan, &q_block, &k_block);
    const int64_t q_blocks = q_block ? (o->nq + q_block - 1) / q_block : 0, k_blocks = k_block ? (o->nk + k_block - 1) / k_block : 0;
    uint8_t *kept = rows ? calloc((size_t)(rows * k_blocks), 1) : NULL;
    int32_t *indptr = rows ? malloc((size_t)(rows + 1) * 4) : NULL, *indices = rows ? malloc((size_t)(rows * k_blocks + 1) * 4) : NULL;
    qattn_buffer *bptr = NULL, *bidx = NULL, *ws = NULL;
    int64_t count = 0;
    if (sd.layout == QATTN_SPARSE_BLOCKS) { /* keep a fraction of each row's causally visible blocks */
        indptr[0] = 0;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t qb = r % q_blocks, last_row = qattn_bench_min(o->nq, (qb + 1) * q_block) - 1;
            const int64_t end = o->causal ? last_row + 1 + o->nk - o->nq : o->nk;
            const int64_t visible = end <= 0 ? 0 : qattn_bench_min(k_blocks, (end + k_block - 1) / k_block);
            int64_t want = (int64_t)(o->keep * (double)visible + 0.5), left = visible;
            for (int64_t kb = 0; kb < visible; kb++, left--) /* selection sampling: exactly `want` */
                if (ref_rng_uniform(rng) * (double)left < (double)want) {
                    indices[count++] = (int32_t)kb;
                    kept[r * k_blocks + kb] = 1;
                    want--;
                }
            indptr[r + 1] = (int32_t)count;
        }
        if (qattn_buffer_create(ctx, (size_t)(rows + 1) * 4, &bptr) ||
            qattn_buffer_create(ctx, (size_t)(count + 1) * 4, &bidx) ||
            qattn_buffer_upload(bptr, 0, indptr, (size_t)(rows + 1) * 4) ||
            (count && qattn_buffer_upload(bidx, 0, indices, (size_t)count * 4))) {
            fprintf(stderr, "qattn-bench: layout buffers: %s\n", qattn_last_error(ctx));
            return 1;
        }
    }
    if (qattn_plan_workspace_size(plan) && qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws)) {
        fprintf(stderr, "qattn-bench: workspace: %s\n", qattn_last_error(ctx));
        return 1;
    }
    qattn_run_args args = *dense_args;
    args.workspace = ws;
    qattn_sparse_args sa = {.block_indptr = bptr, .block_indices = count ? bidx : NULL, .block_count = count};
    qattn_buffer_fill(args.o, 0, qattn_tensor_bytes(&dense_desc->o), REF_POISON_BYTE);
    s = qattn_sparse_run(plan, &args, &sa);
    if (!s)
        s = qattn_ctx_synchronize(ctx);
    double *times = malloc(sizeof(double) * (size_t)(o->iters > 0 ? o->iters : 1));
    for (int w = 0; w < o->warmup && !s; w++)
        s = qattn_sparse_run(plan, &args, &sa);
    if (!s)
        s = qattn_ctx_synchronize(ctx);
    for (int it = 0; it < o->iters && !s; it++) {
        double t0 = now_seconds();
        s = qattn_sparse_run(plan, &args, &sa);
        if (!s)
            s = qattn_ctx_synchronize(ctx);
        times[it] = now_seconds() - t0;
    }
    if (s) {
        fprintf(stderr, "qattn-bench: %s sparse run: %s\n", pname, qattn_last_error(ctx));
        return 1;
    }
    qsort(times, (size_t)o->iters, sizeof(double), cmp_double);
    const double median = o->iters % 2 ? times[o->iters / 2] : 0.5 * (times[o->iters / 2 - 1] + times[o->iters / 2]);
    free(times);
    float density_kv = NAN;
    if (sd.layout == QATTN_SPARSE_PREDICT) { /* the layout the last run predicted */
        float *dens = malloc((size_t)(o->b * o->hkv) * 4);
        if (qattn_sparse_layout_read(plan, ws, 0, indptr, indices, rows * k_blocks, &count, dens)) {
            fprintf(stderr, "qattn-bench: layout read: %s\n", qattn_last_error(ctx));
            return 1;
        }
        density_kv = 0.f;
        for (int64_t i = 0; i < o->b * o->hkv; i++)
            density_kv += dens[i] / (float)(o->b * o->hkv);
        free(dens);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t e = indptr[r]; e < indptr[r + 1]; e++)
                kept[r * k_blocks + indices[e]] = 1;
    }
    /* Outputs of the last run (same inputs as the first): accuracy under the mask. */
    qattn_buffer_download(args.o, 0, ho, qattn_tensor_bytes(&dense_desc->o));
    qattn_buffer_download(args.lse, 0, hlse, (size_t)(o->b * o->h * o->nq) * 4);
    ref_sparse_mask m = {.sd = &sd, .nq = o->nq, .nk = o->nk, .hkv = o->hkv, .group = o->h / o->hkv,
                    .q_blocks = q_blocks, .k_blocks = k_blocks, .kept = kept};
    ref_problem rp = *dense_rp;
    rp.visible = ref_sparse_visible;
    rp.visible_ctx = &m;
    ref_compare cmp = {0};
    if (o->check_rows > 0) {
        ref_rng rows_rng;
        ref_rng_seed(&rows_rng, seed + 23);
        cmp = ref_check(&rp, ho, &dense_desc->o, hlse, o->check_rows, &rows_rng);
    }
    double kept_pairs, dense_pairs;
    count_pairs(o, &m, &kept_pairs, &dense_pairs);
    const double density = kept_pairs / dense_pairs;
    const double speedup = dense_median / median, ideal = 1.0 / density;
    bar br = accuracy_bar(dense_desc->precision == QATTN_PRECISION_AUTO ? QATTN_PRECISION_INT8_FP8 : dense_desc->precision, o->dtype);
    const int pass = o->check_rows <= 0 || (cmp.out.cos_sim >= br.cos_min - (o->pv > 0 ? 1e-4 : 0) &&
                                            cmp.out.rel_l1 <= br.rel_l1_max + (o->pv > 0 ? 0.01 : 0));
    if (o->json)
        printf("{\"backend\":\"%s\",\"device\":\"%s\",\"precision\":\"%s\",\"sparse\":true,\"window\":[%lld,%lld],"
               "\"sinks\":%lld,\"layout\":\"%s\",\"q_block\":%lld,\"k_block\":%lld,\"b\":%lld,\"hq\":%lld,"
               "\"hkv\":%lld,\"nq\":%lld,\"nk\":%lld,\"d\":%lld,\"causal\":%d,\"median_ms\":%.6f,"
               "\"dense_median_ms\":%.6f,\"speedup\":%.4f,\"density\":%.6f,\"ideal\":%.4f,\"of_ideal\":%.4f,"
               "\"predicted_block_density\":%.4f,\"%s_equiv\":%.4f,\"cos_sim\":%.7f,\"rel_l1\":%.6f,"
               "\"verdict\":\"%s\"}\n",
               backend, device, pname, (long long)sd.window_left, (long long)sd.window_right, (long long)sd.sink_tokens,
               sd.layout == QATTN_SPARSE_BLOCKS ? "blocks" : sd.layout == QATTN_SPARSE_PREDICT ? "predict" : "none",
               (long long)q_block, (long long)k_block, (long long)o->b, (long long)o->h, (long long)o->hkv,
               (long long)o->nq, (long long)o->nk, (long long)o->d, o->causal, median * 1e3, dense_median * 1e3,
               speedup, density, ideal, speedup / ideal, (double)density_kv, on_cpu ? "gflops" : "tflops",
               flops / median / (on_cpu ? 1e9 : 1e12), cmp.out.cos_sim, cmp.out.rel_l1, pass ? "ok" : "FAIL");
    else
        printf("%-16s %-16s %10.3f %10.2f %9.6f %9.5f %9.2e %9.2e %9.2e  %s | density %.4f, %.2fx dense "
               "(ideal %.2fx, %.0f%% of it)\n",
               pname, "+sparse", median * 1e3, flops / median / (on_cpu ? 1e9 : 1e12), cmp.out.cos_sim,
               cmp.out.rel_l1, cmp.out.rmse, cmp.out.max_abs, cmp.lse.max_abs, pass ? "ok" : "FAIL", density,
               speedup, ideal, 100.0 * speedup / ideal);
    fflush(stdout);
    free(kept);
    free(indptr);
    free(indices);
    qattn_buffer_destroy(bptr);
    qattn_buffer_destroy(bidx);
    qattn_buffer_destroy(ws);
    qattn_plan_destroy(plan);
    return pass ? 0 : 1;
}

int main(int argc, char **argv)
{
    options opt;
    if (parse_args(argc, argv, &opt))
        return 2;
    qattn_precision precs[8];
    int nprec = parse_precisions(opt.precisions, precs, 8);
    if (nprec < 0)
        return 2;

    qattn_ctx *ctx = NULL;
    qattn_ctx_params params = {.backend = opt.backend};
    if (qattn_ctx_create(&params, &ctx) != QATTN_OK) {
        fprintf(stderr, "qattn-bench: %s\n", qattn_last_error(NULL));
        return 2;
    }
    const char *backend = qattn_ctx_backend(ctx);
    int on_cpu = strcmp(backend, "cpu") == 0;
    apply_defaults(&opt, on_cpu);
    qattn_device_info dev;
    qattn_ctx_device_info(ctx, &dev);

    ref_rng rng;
    uint64_t seed = ref_rng_seed_auto(&rng);
    qattn_tensor_desc qd = make_desc(&opt, opt.h, opt.nq, opt.dtype);
    qattn_tensor_desc kd = make_desc(&opt, opt.hkv, opt.nk, opt.dtype);
    qattn_tensor_desc vd = kd, od = qd;
    size_t qb = qattn_tensor_bytes(&qd), kb = qattn_tensor_bytes(&kd), ob = qb;
    if (!qb || !kb) {
        fprintf(stderr, "qattn-bench: invalid shape\n");
        return 2;
    }
    void *hq = malloc(qb), *hk = malloc(kb), *hv = malloc(kb), *ho = malloc(ob);
    float *hlse = malloc((size_t)(opt.b * opt.h * opt.nq) * sizeof(float));
    double *bias = calloc((size_t)opt.d, sizeof(double));
    if (!hq || !hk || !hv || !ho || !hlse || !bias) {
        fprintf(stderr, "qattn-bench: out of host memory\n");
        return 2;
    }
    if (!opt.json)
        fprintf(stderr, "qattn-bench: generating inputs (seed %llu)\n", (unsigned long long)seed);
    for (int64_t c = 0; c < opt.d && opt.kbias; c++)
        bias[c] = 8.0 * ref_rng_normal(&rng); /* large per-channel offsets shared by all tokens */
    ref_structure structure = ref_structure_default(opt.nk);
    if (opt.structured) {
        ref_fill_structured(hq, &qd, hk, &kd, hv, &vd, &rng, &structure);
    } else {
        ref_fill_randn(hq, &qd, &rng, 1.0, NULL);
        ref_fill_randn(hk, &kd, &rng, 1.0, opt.kbias ? bias : NULL);
        ref_fill_randn(hv, &vd, &rng, 1.0, NULL);
    }

    qattn_buffer *bq = NULL, *bk = NULL, *bv = NULL, *bo = NULL, *blse = NULL;
    size_t lse_bytes = (size_t)(opt.b * opt.h * opt.nq) * sizeof(float);
    if (qattn_buffer_create(ctx, qb, &bq) || qattn_buffer_create(ctx, kb, &bk) ||
        qattn_buffer_create(ctx, kb, &bv) || qattn_buffer_create(ctx, ob, &bo) ||
        qattn_buffer_create(ctx, lse_bytes, &blse) || qattn_buffer_upload(bq, 0, hq, qb) ||
        qattn_buffer_upload(bk, 0, hk, kb) || qattn_buffer_upload(bv, 0, hv, kb)) {
        fprintf(stderr, "qattn-bench: %s\n", qattn_last_error(ctx));
        return 2;
    }

    double flops = 4.0 * (double)opt.b * (double)opt.h * (double)opt.nq * (double)opt.nk * (double)opt.d;
    if (opt.causal) /* exact count of visible pairs under the bottom-right mask */ {
        double pairs = 0;
        for (int64_t i = 0; i < opt.nq; i++) {
            int64_t end = i + 1 + (opt.nk - opt.nq);
            pairs += (double)(end < 0 ? 0 : end > opt.nk ? opt.nk : end);
        }
        flops = 4.0 * (double)opt.b * (double)opt.h * pairs * (double)opt.d;
    }
    if (!opt.json) {
        printf("qattn-bench %s | backend %s | device %s\n", qattn_version(), backend, dev.name);
        printf("B=%lld Hq=%lld Hkv=%lld Nq=%lld Nk=%lld D=%lld %s %s %s data=%s | warmup %d, median of %d | seed %llu\n",
               (long long)opt.b, (long long)opt.h, (long long)opt.hkv, (long long)opt.nq, (long long)opt.nk,
               (long long)opt.d, opt.causal ? "causal" : "full", qattn_dtype_name(opt.dtype),
               opt.nhd ? "NHD" : "HND", opt.kbias ? "kbias" : opt.structured ? "structured" : "randn", opt.warmup, opt.iters,
               (unsigned long long)seed);
        printf("%-16s %-16s %10s %10s %9s %9s %9s %9s %9s  %s\n", "precision", "chosen", "median_ms",
               on_cpu ? "GFLOP/s" : "TFLOP/s", "cos_sim", "rel_l1", "rmse", "max_err", "lse_err", "verdict");
    }

    ref_problem rp = {.q = &qd, .k = &kd, .v = &vd, .qd = hq, .kd = hk, .vd = hv, .causal = opt.causal != 0};
    int status = 0;
    double *times = malloc(sizeof(double) * (size_t)(opt.iters > 0 ? opt.iters : 1));
    for (int pi = 0; pi < nprec; pi++) {
        qattn_attention_desc desc = {
            .q = qd, .k = kd, .v = vd, .o = od,
            .causal = opt.causal, .return_lse = 1,
            .precision = precs[pi],
            .granularity = precs[pi] == QATTN_PRECISION_EXACT ? QATTN_GRANULARITY_DEFAULT : opt.granularity,
            .flags = opt.no_finite_check ? QATTN_FLAG_NO_FINITE_CHECK : 0,
        };
        const char *pname = qattn_precision_name(precs[pi]);
        if (!opt.json)
            fprintf(stderr, "[%d/%d] %s: planning\n", pi + 1, nprec, pname);
        qattn_plan *plan = NULL;
        qattn_status s = qattn_plan_create(ctx, &desc, &plan);
        if (s == QATTN_ERR_UNSUPPORTED) {
            if (opt.json)
                printf("{\"backend\":\"%s\",\"precision\":\"%s\",\"unsupported\":\"%s\"}\n", backend, pname,
                       qattn_last_error(ctx));
            else
                printf("%-16s unsupported: %s\n", pname, qattn_last_error(ctx));
            continue;
        }
        if (s) {
            fprintf(stderr, "qattn-bench: %s: %s: %s\n", pname, qattn_status_str(s), qattn_last_error(ctx));
            status = 2;
            continue;
        }
        qattn_plan_info info;
        qattn_plan_get_info(plan, &info);
        qattn_buffer *ws = NULL;
        if (info.workspace_bytes && qattn_buffer_create(ctx, info.workspace_bytes, &ws)) {
            fprintf(stderr, "qattn-bench: workspace: %s\n", qattn_last_error(ctx));
            qattn_plan_destroy(plan);
            status = 2;
            continue;
        }
        qattn_run_args args = {.q = bq, .k = bk, .v = bv, .o = bo, .lse = blse, .workspace = ws};

        /* Correctness run on poisoned outputs. */
        qattn_buffer_fill(bo, 0, ob, REF_POISON_BYTE);
        qattn_buffer_fill(blse, 0, lse_bytes, REF_POISON_BYTE);
        s = qattn_run(plan, &args);
        if (!s)
            s = qattn_ctx_synchronize(ctx);
        if (s) {
            fprintf(stderr, "qattn-bench: %s: run: %s: %s\n", pname, qattn_status_str(s), qattn_last_error(ctx));
            status = 2;
            qattn_buffer_destroy(ws);
            qattn_plan_destroy(plan);
            continue;
        }
        qattn_buffer_download(bo, 0, ho, ob);
        qattn_buffer_download(blse, 0, hlse, lse_bytes);
        ref_compare cmp = {0};
        int checked = opt.check_rows > 0;
        if (checked) {
            if (!opt.json)
                fprintf(stderr, "[%d/%d] %s: fp64 reference on %lld rows per head\n", pi + 1, nprec, pname,
                        (long long)(opt.check_rows < opt.nq ? opt.check_rows : opt.nq));
            ref_rng rows_rng;
            ref_rng_seed(&rows_rng, seed + 17);
            cmp = ref_check(&rp, ho, &od, hlse, opt.check_rows, &rows_rng);
        }

        if (!opt.json)
            fprintf(stderr, "[%d/%d] %s: timing %d + %d runs\n", pi + 1, nprec, pname, opt.warmup, opt.iters);
        for (int w = 0; w < opt.warmup && !s; w++)
            s = qattn_run(plan, &args);
        if (!s)
            s = qattn_ctx_synchronize(ctx);
        for (int it = 0; it < opt.iters && !s; it++) {
            double t0 = now_seconds();
            s = qattn_run(plan, &args);
            if (!s)
                s = qattn_ctx_synchronize(ctx);
            times[it] = now_seconds() - t0;
        }
        if (s) {
            fprintf(stderr, "qattn-bench: %s: timed run: %s\n", pname, qattn_last_error(ctx));
            status = 2;
        }
        double median = NAN;
        if (opt.iters > 0 && !s) {
            qsort(times, (size_t)opt.iters, sizeof(double), cmp_double);
            median = opt.iters % 2 ? times[opt.iters / 2] : 0.5 * (times[opt.iters / 2 - 1] + times[opt.iters / 2]);
        }
        double rate = flops / median / (on_cpu ? 1e9 : 1e12);

        bar br = accuracy_bar(info.precision, opt.dtype);
        /* LSE: absolute error in natural-log units; quantized scores shift it slightly. */
        double lse_bar = info.precision == QATTN_PRECISION_EXACT ? 1e-3 : 0.05;
        int pass = !checked || (cmp.out.cos_sim >= br.cos_min && cmp.out.rel_l1 <= br.rel_l1_max &&
                                cmp.lse.max_abs <= lse_bar);
        if (!pass && status == 0)
            status = 1;
        const char *verdict = !checked ? "unchecked" : pass ? "ok" : "FAIL";
        if (opt.json) {
            printf("{\"backend\":\"%s\",\"device\":\"%s\",\"precision\":\"%s\",\"chosen\":\"%s\",\"kernel\":\"%s\","
                   "\"b\":%lld,\"hq\":%lld,\"hkv\":%lld,\"nq\":%lld,\"nk\":%lld,\"d\":%lld,\"causal\":%d,"
                   "\"dtype\":\"%s\",\"layout\":\"%s\",\"data\":\"%s\",\"median_ms\":%.6f,\"%s\":%.4f,"
                   "\"cos_sim\":%.7f,\"rel_l1\":%.6f,\"rmse\":%.6g,\"max_err\":%.6g,\"lse_max_err\":%.6g,"
                   "\"rows_checked\":%lld,\"verdict\":\"%s\",\"seed\":%llu}\n",
                   backend, dev.name, pname, qattn_precision_name(info.precision), info.kernel, (long long)opt.b,
                   (long long)opt.h, (long long)opt.hkv, (long long)opt.nq, (long long)opt.nk, (long long)opt.d,
                   opt.causal, qattn_dtype_name(opt.dtype), opt.nhd ? "nhd" : "hnd", opt.kbias ? "kbias" : "randn",
                   median * 1e3, on_cpu ? "gflops" : "tflops", rate, cmp.out.cos_sim, cmp.out.rel_l1, cmp.out.rmse,
                   cmp.out.max_abs, cmp.lse.max_abs, (long long)cmp.rows_checked, verdict,
                   (unsigned long long)seed);
        } else {
            printf("%-16s %-16s %10.3f %10.2f %9.6f %9.5f %9.2e %9.2e %9.2e  %s\n", pname,
                   qattn_precision_name(info.precision), median * 1e3, rate, cmp.out.cos_sim, cmp.out.rel_l1,
                   cmp.out.rmse, cmp.out.max_abs, cmp.lse.max_abs, verdict);
        }
        fflush(stdout);
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
        if (opt.sparse && !s && sparse_row(&opt, ctx, &desc, &args, &rp, hq, hk, hv, ho, hlse, median, flops, on_cpu,
                                           backend, dev.name, seed, &rng) && status == 0)
            status = 1;
    }
    if (!opt.json)
        printf("accuracy bars (vs fp64): exact cos>=0.99999 relL1<=0.002 (bf16: 0.9999, 0.006); int8_fp16 "
               "cos>=0.9995 relL1<=0.03; int8_fp8* cos>=0.999 relL1<=0.05\n");
    free(times);
    qattn_buffer_destroy(bq);
    qattn_buffer_destroy(bk);
    qattn_buffer_destroy(bv);
    qattn_buffer_destroy(bo);
    qattn_buffer_destroy(blse);
    qattn_ctx_destroy(ctx);
    free(hq);
    free(hk);
    free(hv);
    free(ho);
    free(hlse);
    free(bias);
    return status;
}
