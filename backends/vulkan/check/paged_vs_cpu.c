/*
 * The Vulkan paged KV cache against the CPU reference.
 *
 * Appends, byte for byte: every page format (f16, bf16, fp8 per head, int8
 * per head and per row), every input dtype, both layouts, head dims that are
 * not multiples of 16, values from 1e-30 to 1e30 with rounding ties, fp32
 * subnormals, zero rows, tiny and huge scales.
 *
 * Paged attention, within fp32 summation-order differences: random head dims
 * (multiples of 16 up to 256), page formats and sizes, layouts, both table
 * encodings, GQA groups (3 included), empty sequences and sequences with more
 * queries than keys, causal or not, the planner's splits or forced ones (more
 * than there are pages too), f32/f16/bf16 queries with padded or head-major
 * strides, buffer offsets, with and without LSE and checks; rows that belong
 * to no sequence must stay untouched.
 *
 * Garbage tables (pages, lengths, indptr, qo_indptr far out of range or
 * negative): with the checks off a run must finish without reading outside
 * any buffer (clamped; an unclamped index would reach far outside the
 * allocations); with them on it must fail with QATTN_ERR_INVALID_ARGUMENT
 * and leave the outputs untouched.
 *
 *   paged_vs_cpu [append_cases [attention_cases [seed [garbage_cases]]]]
 *   exit 0: all agree, 1: a difference, 2: an error, 77: no Vulkan device
 *
 * Public API only (and src/numeric.h). Built by backends/vulkan/check/meson.build
 * (test 'vulkan-paged-vs-cpu'); by hand:
 *   cc -O2 -std=c11 -Iinclude -Ibuild-vkp/include -Isrc backends/vulkan/check/paged_vs_cpu.c \
 *      -Lbuild-vkp -lqattn -lm -Wl,-rpath,$PWD/build-vkp -o /tmp/paged_vs_cpu
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "numeric.h"
#include "qattn/qattn.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t next_u64(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double uniform(void) { return (double)(next_u64() >> 11) / 9007199254740992.0; }
static double normal(void)
{
    double u = uniform() + 1e-300, v = uniform();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* A value of the kind `kind` picks: plain, wide magnitudes, rounding ties, tiny. */
static float value(int kind, float scale)
{
    switch (kind) {
    case 0: return (float)normal();
    case 1: return (float)(normal() * pow(10.0, uniform() * 60.0 - 30.0));
    case 2: { /* a tie of the target format after scaling: (n + 0.5) * scale, and e4m3 mid-points */
        float n = (float)(int)(uniform() * 254.0 - 127.0);
        return (n + 0.5f) * scale;
    }
    case 3: return (float)(normal() * 1e-6);
    case 4: return (float)(normal() * 1e-39); /* fp32 subnormals */
    default: return 0.f;
    }
}

#define CHECK_OK(call)                                                                                                 \
    do {                                                                                                               \
        qattn_status s_ = (call);                                                                                      \
        if (s_ != QATTN_OK) {                                                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, qattn_status_str(s_));                      \
            exit(2);                                                                                                   \
        }                                                                                                              \
    } while (0)

typedef struct side {
    qattn_ctx *ctx;
    qattn_kv_cache_buffers bufs;
    qattn_buffer *k_new, *v_new, *slots;
} side;

static qattn_buffer *make(qattn_ctx *ctx, const void *data, size_t bytes)
{
    qattn_buffer *b = NULL;
    CHECK_OK(qattn_buffer_create(ctx, bytes ? bytes : 4, &b));
    if (data && bytes)
        CHECK_OK(qattn_buffer_upload(b, 0, data, bytes));
    return b;
}

static int compare(const char *what, const uint8_t *a, const uint8_t *b, size_t n, const char *label)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) {
            fprintf(stderr, "DIFF %s: %s byte %zu: cpu 0x%02x vulkan 0x%02x\n", label, what, i, a[i], b[i]);
            return 1;
        }
    return 0;
}

static int pick(const int *options, int n) { return options[(int)(uniform() * n)]; }

/* One random attention problem on both contexts; 0 when they agree. */
static int attention_case(qattn_ctx *cpu, qattn_ctx *vk, int c)
{
    static const int dims[] = {16, 32, 48, 64, 80, 96, 128, 128, 128, 160, 192, 256};
    static const int page_sizes[] = {1, 2, 3, 5, 8, 16, 16, 32, 64};
    static const int groups[] = {1, 2, 3, 4, 4, 8};
    static const int split_options[] = {0, 0, 0, 1, 2, 3, 5, 16};
    static const qattn_dtype q_dtypes[] = {QATTN_DTYPE_F16, QATTN_DTYPE_F16, QATTN_DTYPE_BF16, QATTN_DTYPE_F32};
    static const struct {
        qattn_dtype dtype;
        qattn_kv_scales scales;
    } formats[] = {{QATTN_DTYPE_F16, QATTN_KV_SCALES_NONE},
                   {QATTN_DTYPE_BF16, QATTN_KV_SCALES_NONE},
                   {QATTN_DTYPE_FP8_E4M3, QATTN_KV_SCALES_PER_HEAD},
                   {QATTN_DTYPE_I8, QATTN_KV_SCALES_PER_HEAD},
                   {QATTN_DTYPE_I8, QATTN_KV_SCALES_PER_ROW}};
    const int64_t D = pick(dims, 12), P = pick(page_sizes, 9), Hkv = 1 + (int64_t)(uniform() * 3);
    const int64_t G = pick(groups, 6), Hq = Hkv * G, B = 1 + (int64_t)(uniform() * 5);
    const int f = (int)(uniform() * 5);
    const bool prefill = uniform() < 0.4, causal = uniform() < 0.7, lse_on = uniform() < 0.8;
    const bool checks = uniform() < 0.7, csr = uniform() < 0.5, q_head_major = uniform() < 0.2;
    const qattn_dtype qdt = q_dtypes[(int)(uniform() * 4)];
    int64_t kv_len[8], q_len[8], total_tokens = 0, total_pages = 0, max_pages = 1, max_q = 1, total_q = 0;
    for (int64_t b = 0; b < B; b++) {
        kv_len[b] = uniform() < 0.1 ? 0 : (int64_t)(uniform() * 300);
        q_len[b] = prefill ? (int64_t)(uniform() * 40) : (uniform() < 0.8 ? 1 : 0);
        if (prefill && uniform() < 0.7 && q_len[b] > kv_len[b])
            q_len[b] = kv_len[b];
        int64_t pages = (kv_len[b] + P - 1) / P;
        total_pages += pages;
        total_tokens += kv_len[b];
        max_pages = pages > max_pages ? pages : max_pages;
        max_q = q_len[b] > max_q ? q_len[b] : max_q;
        total_q += q_len[b];
    }
    const int64_t extra_rows = (int64_t)(uniform() * 3); /* rows no sequence owns: never written */
    total_q += extra_rows;
    if (total_q == 0)
        total_q = 1;
    const int64_t slack = uniform() < 0.3 ? (int64_t)(uniform() * 4) : 0;
    const int64_t num_pages = total_pages + 3;
    qattn_kv_cache_desc cache = {.num_pages = num_pages, .page_size = P, .heads_kv = Hkv, .head_dim = D,
                                 .dtype = formats[f].dtype, .layout = uniform() < 0.5 ? QATTN_KV_HND : QATTN_KV_NHD,
                                 .scales = formats[f].scales};
    qattn_kv_cache_sizes sizes;
    CHECK_OK(qattn_kv_cache_bytes(cpu, &cache, &sizes));

    /* pages in random order; tables */
    int32_t *perm = malloc((size_t)num_pages * 4), *block_table = malloc((size_t)(B * (max_pages + slack)) * 4);
    int32_t indptr[9], *indices = malloc((size_t)(total_pages + 1) * 4), seq_lens[8], last[8], qo[9];
    for (int64_t i = 0; i < num_pages; i++)
        perm[i] = (int32_t)i;
    for (int64_t i = num_pages - 1; i > 0; i--) {
        int64_t j = (int64_t)(uniform() * (double)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    const int64_t mp = max_pages + slack;
    int64_t at = 0, row = 0;
    int64_t *slots = malloc((size_t)(total_tokens + 1) * 8);
    int64_t tok = 0;
    indptr[0] = 0;
    qo[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t pages = (kv_len[b] + P - 1) / P;
        for (int64_t i = 0; i < mp; i++)
            block_table[b * mp + i] = i < pages ? perm[at + i] : (uniform() < 0.5 ? -1 : 12345); /* unused: anything */
        for (int64_t i = 0; i < pages; i++)
            indices[at + i] = perm[at + i];
        for (int64_t t = 0; t < kv_len[b]; t++)
            slots[tok++] = (int64_t)perm[at + t / P] * P + t % P;
        at += pages;
        indptr[b + 1] = (int32_t)at;
        seq_lens[b] = (int32_t)kv_len[b];
        last[b] = pages ? (int32_t)(kv_len[b] - (pages - 1) * P) : 1;
        row += q_len[b];
        qo[b + 1] = (int32_t)row;
    }
    /* new tokens f32 [T, Hkv, D]; K with a per-channel bias */
    const size_t nkv = (size_t)(total_tokens * Hkv * D) + 1;
    float *kn = malloc(nkv * 4), *vn = malloc(nkv * 4), ks[8], vs[8];
    for (size_t i = 0; i < nkv; i++) {
        kn[i] = (float)(normal() + (double)((i % (size_t)D) % 7) - 3.0);
        vn[i] = (float)normal();
    }
    for (int64_t h = 0; h < Hkv; h++) {
        ks[h] = (float)(6.0 / (formats[f].dtype == QATTN_DTYPE_FP8_E4M3 ? 448.0 : 127.0));
        vs[h] = (float)(4.5 / (formats[f].dtype == QATTN_DTYPE_FP8_E4M3 ? 448.0 : 127.0));
    }
    /* queries: token stride and head stride with padding, maybe head-major */
    const int64_t pad_d = uniform() < 0.5 ? 0 : 8, pad_t = uniform() < 0.5 ? 0 : 16;
    int64_t q_stride[2], o_stride[2];
    if (q_head_major) {
        q_stride[0] = D + pad_d;
        q_stride[1] = total_q * (D + pad_d) + pad_t;
    } else {
        q_stride[1] = D + pad_d;
        q_stride[0] = Hq * (D + pad_d) + pad_t;
    }
    o_stride[1] = D;
    o_stride[0] = Hq * D + (uniform() < 0.5 ? 0 : 8);
    const size_t qes = qattn_dtype_size(qdt);
    const size_t q_elems = (size_t)((total_q - 1) * q_stride[0] + (Hq - 1) * q_stride[1] + D);
    const size_t o_elems = (size_t)((total_q - 1) * o_stride[0] + (Hq - 1) * o_stride[1] + D);
    const size_t q_off = 16 * (size_t)(uniform() * 4), o_off = 16 * (size_t)(uniform() * 4);
    const size_t lse_off = 4 * (size_t)(uniform() * 8), ws_off = 256 * (size_t)(uniform() * 3);
    uint8_t *qh = malloc(q_elems * qes);
    for (size_t i = 0; i < q_elems; i++)
        qattn_store_f(qh, qdt, (int64_t)i, (float)normal());
    const int num_splits = pick(split_options, 8);
    qattn_paged_desc pd = {.cache = cache, .table = csr ? QATTN_PAGES_CSR : QATTN_PAGES_DENSE, .batch = B,
                           .max_pages_per_seq = mp, .total_q = total_q, .max_q_len = max_q, .heads_q = Hq,
                           .q_dtype = qdt, .q_stride = {q_stride[0], q_stride[1]},
                           .o_stride = {o_stride[0], o_stride[1]}, .causal = causal, .return_lse = lse_on,
                           .num_splits = num_splits, .flags = checks ? 0u : QATTN_FLAG_NO_FINITE_CHECK};
    qattn_ctx *ctxs[2] = {cpu, vk};
    uint8_t *outs[2];
    float *lses[2];
    char kernel[2][128];
    int splits_used[2] = {0, 0};
    const size_t o_bytes = o_elems * qes, lse_bytes = (size_t)(total_q * Hq) * 4;
    for (int s = 0; s < 2; s++) {
        qattn_ctx *ctx = ctxs[s];
        qattn_kv_cache_buffers bufs = {0};
        bufs.k = make(ctx, NULL, sizes.cache_bytes);
        bufs.v = make(ctx, NULL, sizes.cache_bytes);
        CHECK_OK(qattn_buffer_fill(bufs.k, 0, sizes.cache_bytes, 0x7f));
        CHECK_OK(qattn_buffer_fill(bufs.v, 0, sizes.cache_bytes, 0x7f));
        if (cache.scales != QATTN_KV_SCALES_NONE) {
            bufs.k_scale = make(ctx, NULL, sizes.scale_bytes);
            bufs.v_scale = make(ctx, NULL, sizes.scale_bytes);
            CHECK_OK(qattn_buffer_fill(bufs.k_scale, 0, sizes.scale_bytes, 0x7f));
            CHECK_OK(qattn_buffer_fill(bufs.v_scale, 0, sizes.scale_bytes, 0x7f));
            if (cache.scales == QATTN_KV_SCALES_PER_HEAD) {
                CHECK_OK(qattn_buffer_upload(bufs.k_scale, 0, ks, (size_t)Hkv * 4));
                CHECK_OK(qattn_buffer_upload(bufs.v_scale, 0, vs, (size_t)Hkv * 4));
            }
        }
        qattn_buffer *kb = make(ctx, kn, nkv * 4), *vb = make(ctx, vn, nkv * 4);
        qattn_buffer *sb = make(ctx, slots, (size_t)(total_tokens + 1) * 8);
        if (total_tokens) {
            qattn_kv_append_args app = {.cache = &cache, .buffers = &bufs, .num_tokens = total_tokens,
                                        .new_dtype = QATTN_DTYPE_F32, .new_stride = {Hkv * D, D}, .k_new = kb,
                                        .v_new = vb, .slot_mapping = sb};
            CHECK_OK(qattn_kv_append(ctx, &app));
        }
        qattn_plan *plan = NULL;
        qattn_status st = qattn_paged_plan_create(ctx, &pd, &plan);
        if (st) {
            fprintf(stderr, "attention case %d: plan on %s: %s\n", c, qattn_ctx_backend(ctx), qattn_last_error(ctx));
            exit(2);
        }
        qattn_plan_info info;
        CHECK_OK(qattn_plan_get_info(plan, &info));
        snprintf(kernel[s], sizeof(kernel[s]), "%s", info.kernel);
        splits_used[s] = info.kv_tile ? (int)((mp * P + info.kv_tile - 1) / info.kv_tile) : 1;
        qattn_buffer *qb = make(ctx, NULL, q_off + q_elems * qes), *ob = make(ctx, NULL, o_off + o_bytes);
        qattn_buffer *lb = make(ctx, NULL, lse_off + lse_bytes), *ws = NULL;
        CHECK_OK(qattn_buffer_upload(qb, q_off, qh, q_elems * qes));
        CHECK_OK(qattn_buffer_fill(ob, 0, o_off + o_bytes, 0xcd));
        CHECK_OK(qattn_buffer_fill(lb, 0, lse_off + lse_bytes, 0xcd));
        if (qattn_plan_workspace_size(plan)) {
            ws = make(ctx, NULL, ws_off + qattn_plan_workspace_size(plan));
            CHECK_OK(qattn_buffer_fill(ws, 0, ws_off + qattn_plan_workspace_size(plan), 0xff)); /* NaN garbage */
        }
        qattn_buffer *qob = make(ctx, qo, (size_t)(B + 1) * 4), *btb = make(ctx, block_table, (size_t)(B * mp) * 4);
        qattn_buffer *slb = make(ctx, seq_lens, (size_t)B * 4), *ipb = make(ctx, indptr, (size_t)(B + 1) * 4);
        qattn_buffer *ixb = make(ctx, indices, (size_t)(total_pages + 1) * 4), *lpb = make(ctx, last, (size_t)B * 4);
        qattn_paged_args pa = {.cache = &bufs, .q = qb, .o = ob, .lse = lse_on ? lb : NULL, .qo_indptr = qob,
                               .workspace = ws, .q_offset = q_off, .o_offset = o_off, .lse_offset = lse_off,
                               .workspace_offset = ws ? ws_off : 0};
        if (csr) {
            pa.indptr = ipb;
            pa.indices = ixb;
            pa.last_page_len = lpb;
        } else {
            pa.block_table = btb;
            pa.seq_lens = slb;
        }
        st = qattn_paged_run(plan, &pa);
        if (st) {
            fprintf(stderr, "attention case %d: run on %s: %s\n", c, qattn_ctx_backend(ctx), qattn_last_error(ctx));
            exit(2);
        }
        CHECK_OK(qattn_ctx_synchronize(ctx));
        outs[s] = malloc(o_off + o_bytes);
        lses[s] = malloc(lse_off + lse_bytes);
        CHECK_OK(qattn_buffer_download(ob, 0, outs[s], o_off + o_bytes));
        CHECK_OK(qattn_buffer_download(lb, 0, lses[s], lse_off + lse_bytes));
        qattn_buffer *all[] = {bufs.k, bufs.v, bufs.k_scale, bufs.v_scale, kb, vb, sb, qb, ob, lb, ws,
                               qob, btb, slb, ipb, ixb, lpb};
        for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
            qattn_buffer_destroy(all[i]);
        qattn_plan_destroy(plan);
    }
    /* compare: untouched bytes identical; written values within fp32 summation-order noise */
    int bad = memcmp(outs[0], outs[1], o_off) != 0 || memcmp(lses[0], lses[1], lse_off) != 0;
    double err = 0, ref = 0, worst = 0;
    bool lse_bad = false;
    char first[200] = "";
    for (int64_t r = 0; r < total_q && !bad; r++)
        for (int64_t h = 0; h < Hq; h++) {
            for (int64_t d = 0; d < D; d++) {
                size_t i = (size_t)(r * o_stride[0] + h * o_stride[1] + d);
                const uint8_t *a = outs[0] + o_off + i * qes, *b = outs[1] + o_off + i * qes;
                bool a_poison = a[0] == 0xcd && a[qes - 1] == 0xcd, b_poison = b[0] == 0xcd && b[qes - 1] == 0xcd;
                if (a_poison || b_poison) {
                    if (memcmp(a, b, qes) != 0 && !first[0])
                        snprintf(first, sizeof(first), "row %lld head %lld dim %lld written by %s only", (long long)r,
                                 (long long)h, (long long)d, a_poison ? "vulkan" : "cpu");
                    bad |= memcmp(a, b, qes) != 0;
                    continue;
                }
                double x = qattn_load_f(outs[0] + o_off, qdt, (int64_t)i), y = qattn_load_f(outs[1] + o_off, qdt, (int64_t)i);
                if (!isfinite(x) || !isfinite(y)) {
                    if (!first[0])
                        snprintf(first, sizeof(first), "row %lld head %lld dim %lld: cpu %g vulkan %g",
                                 (long long)r, (long long)h, (long long)d, x, y);
                    bad = 1;
                    continue;
                }
                err += fabs(x - y);
                ref += fabs(x);
                /* an output ulp (fp32: accumulated rounding) relative to the row's scale */
                double tol = (qdt == QATTN_DTYPE_F32 ? 2e-5 : qdt == QATTN_DTYPE_F16 ? 2e-3 : 1.6e-2) * (fabs(x) + 0.1);
                if (fabs(x - y) > tol) {
                    if (!first[0])
                        snprintf(first, sizeof(first), "row %lld head %lld dim %lld: cpu %.9g vulkan %.9g",
                                 (long long)r, (long long)h, (long long)d, x, y);
                    worst = fabs(x - y) > worst ? fabs(x - y) : worst;
                }
            }
            if (lse_on) {
                float a = lses[0][lse_off / 4 + (size_t)(r * Hq + h)], b = lses[1][lse_off / 4 + (size_t)(r * Hq + h)];
                bool lb = isinf(a) || isinf(b) || isnan(a) || isnan(b) ? memcmp(&a, &b, 4) != 0
                                                                        : fabsf(a - b) > 1e-4f * (1.f + fabsf(a));
                if (lb && !first[0])
                    snprintf(first, sizeof(first), "lse row %lld head %lld: cpu %.9g vulkan %.9g", (long long)r,
                             (long long)h, a, b);
                lse_bad |= lb;
            }
        }
    double rel = ref > 0 ? err / ref : err;
    bad |= lse_bad || worst > 0 || rel > (qdt == QATTN_DTYPE_F32 ? 1e-5 : 1e-4);
    if (bad || getenv("PAGED_VS_CPU_VERBOSE"))
        fprintf(bad ? stderr : stdout,
                "%s attention case %d: %s D=%lld P=%lld Hq/Hkv=%lld/%lld B=%lld %s%s %s q=%s%s lse=%d checks=%d "
                "splits cpu %d vulkan %d (asked %d): relL1 %.2e worst %.2e lse %s [%s] %s\n",
                bad ? "DIFF" : "ok", c, qattn_dtype_name(cache.dtype), (long long)D, (long long)P, (long long)Hq,
                (long long)Hkv, (long long)B, prefill ? "prefill" : "decode", causal ? " causal" : "",
                csr ? "csr" : "dense", qattn_dtype_name(qdt), q_head_major ? " head-major" : "", lse_on, checks,
                splits_used[0], splits_used[1], num_splits, rel, worst, lse_bad ? "BAD" : "ok", kernel[1], first);
    for (int s = 0; s < 2; s++) {
        free(outs[s]);
        free(lses[s]);
    }
    void *heap[] = {perm, block_table, indices, slots, kn, vn, qh};
    for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
        free(heap[i]);
    return bad;
}

/* A table entry: mostly plausible, sometimes far out of range or negative. */
static int32_t garbage(int32_t plausible)
{
    double u = uniform();
    if (u < 0.5)
        return plausible;
    if (u < 0.65)
        return -1 - (int32_t)(uniform() * 1000);
    if (u < 0.8)
        return (int32_t)(uniform() * 2147483647.0);
    return (int32_t)(uniform() * 3.0 * (plausible + 1));
}

/* Runs one plan over garbage tables, unchecked then checked, on the vulkan context; 0 when it behaves. */
static int garbage_case(qattn_ctx *vk, int c)
{
    static const qattn_dtype dtypes[] = {QATTN_DTYPE_F16, QATTN_DTYPE_FP8_E4M3, QATTN_DTYPE_I8, QATTN_DTYPE_I8};
    const int f = (int)(uniform() * 4);
    enum { B = 3, mp = 4 };
    const int64_t D = uniform() < 0.5 ? 64 : 128, P = 1 + (int64_t)(uniform() * 16), Hkv = 2, Hq = 4;
    const int64_t pages = 6, total_q = 6, max_q = 3;
    qattn_kv_cache_desc cache = {.num_pages = pages, .page_size = P, .heads_kv = Hkv, .head_dim = D,
                                 .dtype = dtypes[f], .layout = uniform() < 0.5 ? QATTN_KV_HND : QATTN_KV_NHD,
                                 .scales = f == 0 ? QATTN_KV_SCALES_NONE
                                           : f == 3 ? QATTN_KV_SCALES_PER_ROW : QATTN_KV_SCALES_PER_HEAD};
    qattn_kv_cache_sizes sizes;
    CHECK_OK(qattn_kv_cache_bytes(vk, &cache, &sizes));
    qattn_kv_cache_buffers bufs = {0};
    bufs.k = make(vk, NULL, sizes.cache_bytes);
    bufs.v = make(vk, NULL, sizes.cache_bytes);
    CHECK_OK(qattn_buffer_fill(bufs.k, 0, sizes.cache_bytes, 0x11));
    CHECK_OK(qattn_buffer_fill(bufs.v, 0, sizes.cache_bytes, 0x11));
    if (cache.scales != QATTN_KV_SCALES_NONE) {
        bufs.k_scale = make(vk, NULL, sizes.scale_bytes);
        bufs.v_scale = make(vk, NULL, sizes.scale_bytes);
        CHECK_OK(qattn_buffer_fill(bufs.k_scale, 0, sizes.scale_bytes, 0x3c));
        CHECK_OK(qattn_buffer_fill(bufs.v_scale, 0, sizes.scale_bytes, 0x3c));
    }
    const bool csr = uniform() < 0.5;
    int32_t qo[B + 1], table[B * mp], lens[B], indptr[B + 1], indices[8], last[B];
    /* which entries go bad: the query rows, the pages, the lengths / indptr, or all */
    const int target = (int)(uniform() * 4);
    for (int64_t b = 0; b <= B; b++) {
        qo[b] = target == 0 || target == 3 ? garbage((int32_t)(2 * b)) : (int32_t)(2 * b);
        indptr[b] = target >= 2 ? garbage((int32_t)(2 * b)) : (int32_t)(2 * b);
    }
    for (int64_t i = 0; i < B * mp; i++)
        table[i] = target == 1 || target == 3 ? garbage((int32_t)(i % pages)) : (int32_t)(i % pages);
    for (int i = 0; i < 8; i++)
        indices[i] = target == 1 || target == 3 ? garbage(i % (int32_t)pages) : i % (int32_t)pages;
    for (int64_t b = 0; b < B; b++) {
        lens[b] = target >= 2 ? garbage((int32_t)(P * 2)) : (int32_t)(P * 2);
        last[b] = target >= 2 ? garbage((int32_t)P) : (int32_t)P;
    }
    const size_t q_bytes = (size_t)(total_q * Hq * D) * 2, lse_bytes = (size_t)(total_q * Hq) * 4;
    uint16_t *qh = malloc(q_bytes);
    for (size_t i = 0; i < q_bytes / 2; i++)
        qh[i] = qattn_f32_to_f16((float)normal());
    qattn_buffer *qb = make(vk, qh, q_bytes), *ob = make(vk, NULL, q_bytes), *lb = make(vk, NULL, lse_bytes);
    qattn_buffer *qob = make(vk, qo, sizeof(qo)), *tb = make(vk, table, sizeof(table));
    qattn_buffer *sb = make(vk, lens, sizeof(lens)), *ib = make(vk, indptr, sizeof(indptr));
    qattn_buffer *xb = make(vk, indices, sizeof(indices)), *pb = make(vk, last, sizeof(last));
    int bad = 0;
    for (int checked = 0; checked < 2; checked++) {
        qattn_paged_desc pd = {.cache = cache, .table = csr ? QATTN_PAGES_CSR : QATTN_PAGES_DENSE, .batch = B,
                               .max_pages_per_seq = mp, .total_q = total_q, .max_q_len = max_q, .heads_q = Hq,
                               .q_dtype = QATTN_DTYPE_F16, .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D},
                               .causal = uniform() < 0.5, .return_lse = 1, .num_splits = (int)(uniform() * 4),
                               .flags = checked ? 0u : QATTN_FLAG_NO_FINITE_CHECK};
        qattn_plan *plan = NULL;
        CHECK_OK(qattn_paged_plan_create(vk, &pd, &plan));
        qattn_buffer *ws = qattn_plan_workspace_size(plan) ? make(vk, NULL, qattn_plan_workspace_size(plan)) : NULL;
        CHECK_OK(qattn_buffer_fill(ob, 0, q_bytes, 0xcd));
        qattn_paged_args pa = {.cache = &bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = qob, .workspace = ws};
        if (csr) {
            pa.indptr = ib;
            pa.indices = xb;
            pa.last_page_len = pb;
        } else {
            pa.block_table = tb;
            pa.seq_lens = sb;
        }
        qattn_status st = qattn_paged_run(plan, &pa);
        if (!checked && st != QATTN_OK) {
            fprintf(stderr, "garbage case %d: unchecked run failed: %s\n", c, qattn_last_error(vk));
            bad = 1;
        }
        if (checked && st == QATTN_OK && getenv("PAGED_VS_CPU_VERBOSE"))
            printf("garbage case %d: the tables were valid after all\n", c);
        if (checked && st != QATTN_OK) {
            uint8_t *out = malloc(q_bytes);
            CHECK_OK(qattn_buffer_download(ob, 0, out, q_bytes));
            for (size_t i = 0; i < q_bytes; i++)
                if (out[i] != 0xcd) {
                    fprintf(stderr, "garbage case %d: a rejected run wrote o\n", c);
                    bad = 1;
                    break;
                }
            free(out);
            if (st != QATTN_ERR_INVALID_ARGUMENT) {
                fprintf(stderr, "garbage case %d: %s: %s\n", c, qattn_status_str(st), qattn_last_error(vk));
                bad = 1;
            } else if (getenv("PAGED_VS_CPU_VERBOSE")) {
                printf("garbage case %d: rejected: %s\n", c, qattn_last_error(vk));
            }
        }
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
    }
    qattn_buffer *all[] = {bufs.k, bufs.v, bufs.k_scale, bufs.v_scale, qb, ob, lb, qob, tb, sb, ib, xb, pb};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    free(qh);
    return bad;
}

int main(int argc, char **argv)
{
    int cases = argc > 1 ? atoi(argv[1]) : 200;
    int attention_cases = argc > 2 ? atoi(argv[2]) : 100;
    const uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 0) : 1;
    const char *only = getenv("PAGED_VS_CPU_CASE"); /* one attention case (its number), to reproduce it */
    qattn_ctx *cpu = NULL, *vk = NULL;
    qattn_ctx_params cpu_params = {.backend = "cpu"}, vk_params = {.backend = "vulkan"};
    CHECK_OK(qattn_ctx_create(&cpu_params, &cpu));
    if (qattn_ctx_create(&vk_params, &vk) != QATTN_OK) {
        printf("no Vulkan device: %s\n", qattn_last_error(NULL));
        return 77;
    }
    static const struct {
        qattn_dtype dtype;
        qattn_kv_scales scales;
        const char *name;
    } formats[] = {{QATTN_DTYPE_F16, QATTN_KV_SCALES_NONE, "f16"},
                   {QATTN_DTYPE_BF16, QATTN_KV_SCALES_NONE, "bf16"},
                   {QATTN_DTYPE_FP8_E4M3, QATTN_KV_SCALES_PER_HEAD, "fp8"},
                   {QATTN_DTYPE_I8, QATTN_KV_SCALES_PER_HEAD, "int8"},
                   {QATTN_DTYPE_I8, QATTN_KV_SCALES_PER_ROW, "int8row"}};
    const qattn_dtype new_dtypes[3] = {QATTN_DTYPE_F32, QATTN_DTYPE_F16, QATTN_DTYPE_BF16};
    int failures = 0;
    size_t bytes_compared = 0;
    for (int c = 0; c < cases && !only; c++) {
        rng_state = seed * 0x100000001b3ull + (uint64_t)c; /* each case from its own seed */
        const int f = c % 5;
        const qattn_dtype nd = new_dtypes[(c / 5) % 3];
        const bool eight = formats[f].dtype == QATTN_DTYPE_FP8_E4M3 || formats[f].dtype == QATTN_DTYPE_I8;
        const int64_t D = eight ? 4 * (1 + (int64_t)(uniform() * 40)) : 1 + (int64_t)(uniform() * 160);
        const int64_t H = 1 + (int64_t)(uniform() * 4), P = 1 + (int64_t)(uniform() * 20);
        const int64_t pages = 1 + (int64_t)(uniform() * 12), T = 1 + (int64_t)(uniform() * (double)(pages * P));
        /* fp32 subnormals too, except where a row's amax would be one (127 / amax overflows: the
         * reference then multiplies 0 by inf, and converts NaN to int8 as C leaves undefined) */
        const int kind = (int)(uniform() * (nd == QATTN_DTYPE_F32 && formats[f].scales != QATTN_KV_SCALES_PER_ROW ? 5.0 : 4.0));
        qattn_kv_cache_desc cache = {.num_pages = pages, .page_size = P, .heads_kv = H, .head_dim = D,
                                     .dtype = formats[f].dtype, .layout = (c / 15) % 2 ? QATTN_KV_HND : QATTN_KV_NHD,
                                     .scales = formats[f].scales};
        qattn_kv_cache_sizes sizes;
        CHECK_OK(qattn_kv_cache_bytes(cpu, &cache, &sizes));
        /* per-head scales: moderate, tiny or huge */
        float head_scale[2][8];
        for (int w = 0; w < 2; w++)
            for (int64_t h = 0; h < H; h++) {
                double e = kind == 1 ? uniform() * 60.0 - 30.0 : uniform() * 4.0 - 3.0;
                head_scale[w][h] = (float)pow(10.0, e);
            }
        const float tie_scale = eight ? head_scale[0][0] : 1.f / 1024.f;
        /* new tokens in fp32, then in the input dtype */
        const size_t n = (size_t)(T * H * D);
        float *kf = malloc(n * 4), *vf = malloc(n * 4);
        for (size_t i = 0; i < n; i++) {
            kf[i] = value(kind, tie_scale);
            vf[i] = value(kind == 4 ? 4 : (kind + 1) % 4, tie_scale);
        }
        if (T > 1) /* a zero row: amax 0 */
            for (int64_t d = 0; d < D; d++)
                kf[(size_t)(H * D) + d] = 0.f;
        const size_t es = qattn_dtype_size(nd);
        uint8_t *kn = malloc(n * es), *vn = malloc(n * es);
        for (size_t i = 0; i < n; i++) { /* values past the input dtype's range: plain ones instead */
            qattn_store_f(kn, nd, (int64_t)i, kf[i]);
            qattn_store_f(vn, nd, (int64_t)i, vf[i]);
            if (!isfinite(qattn_load_f(kn, nd, (int64_t)i)))
                qattn_store_f(kn, nd, (int64_t)i, (float)normal());
            if (!isfinite(qattn_load_f(vn, nd, (int64_t)i)))
                qattn_store_f(vn, nd, (int64_t)i, (float)normal());
        }
        /* distinct slots in random order, some padding */
        int64_t cap = pages * P, *slots = malloc((size_t)T * 8), *perm = malloc((size_t)cap * 8);
        for (int64_t i = 0; i < cap; i++)
            perm[i] = i;
        for (int64_t i = cap - 1; i > 0; i--) {
            int64_t j = (int64_t)(uniform() * (double)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (int64_t t = 0; t < T; t++)
            slots[t] = uniform() < 0.1 ? -1 : perm[t];

        side sides[2];
        qattn_ctx *ctxs[2] = {cpu, vk};
        uint8_t *got[2][4];
        for (int s = 0; s < 2; s++) {
            side *sd = &sides[s];
            memset(sd, 0, sizeof(*sd));
            sd->ctx = ctxs[s];
            sd->bufs.k = make(sd->ctx, NULL, sizes.cache_bytes);
            sd->bufs.v = make(sd->ctx, NULL, sizes.cache_bytes);
            CHECK_OK(qattn_buffer_fill(sd->bufs.k, 0, sizes.cache_bytes, 0x5a));
            CHECK_OK(qattn_buffer_fill(sd->bufs.v, 0, sizes.cache_bytes, 0xa5));
            if (formats[f].scales != QATTN_KV_SCALES_NONE) {
                sd->bufs.k_scale = make(sd->ctx, NULL, sizes.scale_bytes);
                sd->bufs.v_scale = make(sd->ctx, NULL, sizes.scale_bytes);
                CHECK_OK(qattn_buffer_fill(sd->bufs.k_scale, 0, sizes.scale_bytes, 0x3c));
                CHECK_OK(qattn_buffer_fill(sd->bufs.v_scale, 0, sizes.scale_bytes, 0x3c));
                if (formats[f].scales == QATTN_KV_SCALES_PER_HEAD) {
                    CHECK_OK(qattn_buffer_upload(sd->bufs.k_scale, 0, head_scale[0], (size_t)H * 4));
                    CHECK_OK(qattn_buffer_upload(sd->bufs.v_scale, 0, head_scale[1], (size_t)H * 4));
                }
            }
            sd->k_new = make(sd->ctx, kn, n * es);
            sd->v_new = make(sd->ctx, vn, n * es);
            sd->slots = make(sd->ctx, slots, (size_t)T * 8);
            qattn_kv_append_args app = {.cache = &cache, .buffers = &sd->bufs, .num_tokens = T, .new_dtype = nd,
                                        .new_stride = {H * D, D}, .k_new = sd->k_new, .v_new = sd->v_new,
                                        .slot_mapping = sd->slots};
            CHECK_OK(qattn_kv_append(sd->ctx, &app));
            got[s][0] = malloc(sizes.cache_bytes);
            got[s][1] = malloc(sizes.cache_bytes);
            CHECK_OK(qattn_buffer_download(sd->bufs.k, 0, got[s][0], sizes.cache_bytes));
            CHECK_OK(qattn_buffer_download(sd->bufs.v, 0, got[s][1], sizes.cache_bytes));
            got[s][2] = got[s][3] = NULL;
            if (formats[f].scales != QATTN_KV_SCALES_NONE) {
                got[s][2] = malloc(sizes.scale_bytes);
                got[s][3] = malloc(sizes.scale_bytes);
                CHECK_OK(qattn_buffer_download(sd->bufs.k_scale, 0, got[s][2], sizes.scale_bytes));
                CHECK_OK(qattn_buffer_download(sd->bufs.v_scale, 0, got[s][3], sizes.scale_bytes));
            }
        }
        char label[160];
        snprintf(label, sizeof(label), "case %d (%s pages, %s in, %s, D=%lld H=%lld P=%lld T=%lld, values %d)", c,
                 formats[f].name, qattn_dtype_name(nd), cache.layout ? "HND" : "NHD", (long long)D, (long long)H,
                 (long long)P, (long long)T, kind);
        int bad = compare("k", got[0][0], got[1][0], sizes.cache_bytes, label) +
                  compare("v", got[0][1], got[1][1], sizes.cache_bytes, label);
        bytes_compared += 2 * sizes.cache_bytes;
        if (got[0][2]) {
            bad += compare("k_scale", got[0][2], got[1][2], sizes.scale_bytes, label) +
                   compare("v_scale", got[0][3], got[1][3], sizes.scale_bytes, label);
            bytes_compared += 2 * sizes.scale_bytes;
        }
        failures += bad != 0;
        for (int s = 0; s < 2; s++) {
            qattn_buffer *all[] = {sides[s].bufs.k, sides[s].bufs.v, sides[s].bufs.k_scale, sides[s].bufs.v_scale,
                                   sides[s].k_new, sides[s].v_new, sides[s].slots};
            for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
                qattn_buffer_destroy(all[i]);
            for (int i = 0; i < 4; i++)
                free(got[s][i]);
        }
        free(kf);
        free(vf);
        free(kn);
        free(vn);
        free(slots);
        free(perm);
    }
    printf("%d append cases, %zu cache bytes compared: %d with differences\n", cases, bytes_compared, failures);
    int attention_failures = 0;
    for (int c = 0; c < attention_cases; c++) {
        if (only && atoi(only) != c)
            continue;
        rng_state = seed * 0x100000001b3ull + 0x80000000ull + (uint64_t)c;
        attention_failures += attention_case(cpu, vk, c);
    }
    printf("%d attention cases against the cpu: %d with differences\n", attention_cases, attention_failures);
    failures += attention_failures;
    const int garbage_cases = argc > 4 ? atoi(argv[4]) : 100;
    int garbage_failures = 0;
    for (int c = 0; c < garbage_cases && !only; c++) {
        rng_state = seed * 0x100000001b3ull + 0x40000000ull + (uint64_t)c;
        garbage_failures += garbage_case(vk, c);
    }
    printf("%d garbage-table cases (unchecked: finish; checked: rejected, outputs untouched): %d misbehaved\n",
           garbage_cases, garbage_failures);
    failures += garbage_failures;
    qattn_ctx_destroy(cpu);
    qattn_ctx_destroy(vk);
    return failures ? 1 : 0;
}
