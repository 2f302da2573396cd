/*
 * A GPU backend's quantization pass against the reference quantizer
 * (src/quant.c), region by region: INT8 codes and scales of Q and K, the
 * smooth-K mean, the LSE correction, and V (fp16, or FP8 codes, transposed
 * and padded) and its scales. `test_workspace <backend>`; the CPU backend is
 * the reference itself (skipped), a backend not usable here exits 77.
 *
 * Codes may differ from the reference by one step in at most 1 of 10^4
 * places (a float rounding of x * (127 / amax) landing on the other side of a
 * tie); scales and means within 2 ulp. Every count is printed.
 *
 * The bitexact cases (other shapes: head dims 64, 96 and 128, one batch or
 * two, MQA and GQA, 64 to 300 tokens, padded rows, every tensor NHD or HND,
 * f32 in, with and without a K bias, no LSE) must hold every region bit for
 * bit, as every GPU backend promises (their quantizers divide with correctly
 * rounded fp32 division); the bytes that differ are counted per region. One
 * exception: the CUDA Q pass sums the LSE correction sm_scale * dot(q, mean_k)
 * with warp shuffles, in another order than the reference, so on cuda and
 * cuda-emu that region is held to the other cases' dot-product rule instead.
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

#include "internal.h"
#include "numeric.h"
#include "quant.h"
#include "reference.h"

static qattn_ctx *ctx;
static bool warp_reduced_dot; /* the backend sums q_kmean in another order (CUDA) */
static ref_rng rng;

/* Which tensors are stored NHD (token-major); the others are HND. */
enum { NHD_Q = 1, NHD_K = 2, NHD_V = 4, NHD_O = 8, NHD_ALL = 15 };

typedef struct ws_case {
    const char *name;
    qattn_precision prec;
    qattn_granularity gran;
    qattn_toggle smooth;
    qattn_dtype dtype;
    unsigned nhd;             /* NHD_* bits */
    int64_t shape[6];         /* B, Hq, Hkv, Nq, Nk, D; all 0: 2, 4, 2, 150, 201, 64 */
    int64_t row_pad;          /* elements after each row of D */
    double k_bias, v_scale;   /* K's per-channel bias N(0, k_bias) (0: none); V's magnitude (0: 1) */
    int no_lse, exact;        /* exact: every region bit for bit */
} ws_case;

/* A [B, H, N, D] tensor, NHD or HND, each row of D followed by `pad` elements. */
static qattn_tensor_desc ws_tensor(qattn_dtype dtype, bool nhd, int64_t B, int64_t H, int64_t N, int64_t D,
                                   int64_t pad)
{
    const int64_t row = D + pad;
    qattn_tensor_desc t = {.dtype = dtype, .shape = {B, H, N, D}};
    t.stride[3] = 1;
    if (nhd) {
        t.stride[1] = row;
        t.stride[2] = H * row;
    } else {
        t.stride[2] = row;
        t.stride[1] = N * row;
    }
    t.stride[0] = H * N * row;
    return t;
}

/* Bytes of a region that differ from the reference's (0 for a region the plan does not have). */
static size_t region_diffs(const char *region, const uint8_t *got, const uint8_t *want, size_t offset, size_t bytes)
{
    if (offset == QATTN_WS_ABSENT)
        return 0;
    size_t diffs = 0, first = 0;
    for (size_t i = 0; i < bytes; i++)
        if (got[offset + i] != want[offset + i] && diffs++ == 0)
            first = i;
    if (diffs)
        print_message("    region %s: %zu of %zu bytes differ, first at %zu (got 0x%02x, reference 0x%02x)\n", region,
                      diffs, bytes, first, got[offset + first], want[offset + first]);
    return diffs;
}

typedef struct diff_count {
    size_t total, off_by_one, worse;
    double max_rel;
} diff_count;

static void compare_codes(const int8_t *got, const int8_t *want, size_t n, diff_count *d)
{
    for (size_t i = 0; i < n; i++) {
        int delta = abs(got[i] - want[i]);
        d->total++;
        d->off_by_one += delta == 1;
        d->worse += delta > 1;
    }
}

/* FP8 codes: neighbours in magnitude are adjacent codes of the same sign. */
static void compare_fp8(const uint8_t *got, const uint8_t *want, size_t n, diff_count *d)
{
    for (size_t i = 0; i < n; i++) {
        int same_sign = (got[i] & 0x80) == (want[i] & 0x80);
        int delta = abs((got[i] & 0x7f) - (want[i] & 0x7f));
        d->total++;
        d->off_by_one += same_sign && delta == 1;
        d->worse += !same_sign ? (got[i] & 0x7f) != 0 || (want[i] & 0x7f) != 0 : delta > 1;
    }
}

static void compare_floats(const float *got, const float *want, size_t n, diff_count *d)
{
    for (size_t i = 0; i < n; i++) {
        double rel = fabs((double)got[i] - want[i]) / fmax(fabs((double)want[i]), 1e-30);
        d->total++;
        if (!(rel <= 2.5e-7)) /* 2 ulp; NaN counts as worse */
            d->worse++;
        if (rel > d->max_rel)
            d->max_rel = rel;
    }
}

static void run_ws_case(void **state)
{
    const ws_case *c = *state;
    static const int64_t default_shape[6] = {2, 4, 2, 150, 201, 64};
    const int64_t *shape = c->shape[0] ? c->shape : default_shape;
    const int64_t B = shape[0], Hq = shape[1], Hkv = shape[2], Nq = shape[3], Nk = shape[4], D = shape[5];
    const int64_t pad = c->row_pad;
    qattn_attention_desc desc = {
        .q = ws_tensor(c->dtype, c->nhd & NHD_Q, B, Hq, Nq, D, pad),
        .k = ws_tensor(c->dtype, c->nhd & NHD_K, B, Hkv, Nk, D, pad),
        .v = ws_tensor(c->dtype, c->nhd & NHD_V, B, Hkv, Nk, D, pad),
        .o = ws_tensor(c->dtype, c->nhd & NHD_O, B, Hq, Nq, D, pad),
        .return_lse = !c->no_lse, .precision = c->prec, .granularity = c->gran, .smooth_k = c->smooth,
    };
    qattn_plan *plan = NULL;
    qattn_status s = qattn_plan_create(ctx, &desc, &plan);
    if (s == QATTN_ERR_UNSUPPORTED) {
        print_message("[  SKIP    ] %s: %s\n", c->name, qattn_last_error(ctx));
        skip();
    }
    assert_int_equal(s, QATTN_OK);
    const qattn_tensor_desc *ins[3] = {&desc.q, &desc.k, &desc.v};
    void *host[3];
    double bias[256];
    for (int64_t d = 0; d < D; d++)
        bias[d] = c->k_bias * ref_rng_normal(&rng);
    for (int i = 0; i < 3; i++) {
        host[i] = ref_tensor_alloc(ins[i]);
        memset(host[i], 0, qattn_tensor_bytes(ins[i])); /* row padding: defined bytes */
        ref_fill_randn(host[i], ins[i], &rng, i == 2 && c->v_scale > 0 ? c->v_scale : 1.0,
                       i == 1 && c->k_bias > 0 ? bias : NULL);
    }
    size_t wsb = qattn_plan_workspace_size(plan);
    qattn_buffer *b[4], *lse = NULL, *ws = NULL;
    const qattn_tensor_desc *all[4] = {&desc.q, &desc.k, &desc.v, &desc.o};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(qattn_buffer_create(ctx, qattn_tensor_bytes(all[i]), &b[i]), QATTN_OK);
        if (i < 3)
            assert_int_equal(qattn_buffer_upload(b[i], 0, host[i], qattn_tensor_bytes(all[i])), QATTN_OK);
    }
    if (!c->no_lse)
        assert_int_equal(qattn_buffer_create(ctx, (size_t)(B * Hq * Nq) * 4, &lse), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, wsb, &ws), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(ws, 0, wsb, 0xa5), QATTN_OK); /* padding must be written */
    qattn_run_args args = {.q = b[0], .k = b[1], .v = b[2], .o = b[3], .lse = lse, .workspace = ws};
    assert_int_equal(qattn_run(plan, &args), QATTN_OK);
    assert_int_equal(qattn_ctx_synchronize(ctx), QATTN_OK);
    uint8_t *got = malloc(wsb), *want = calloc(1, wsb);
    assert_int_equal(qattn_buffer_download(ws, 0, got, wsb), QATTN_OK);
    qattn_quantize_host(plan, host[0], host[1], host[2], want, 1);

    const qattn_workspace_layout *L = &plan->ws;
    const bool fp8 = plan->precision != QATTN_PRECISION_INT8_FP16;
    if (c->exact) {
        const struct {
            const char *name;
            size_t offset, bytes;
        } regions[] = {
            {"q_i8", L->q_i8, (size_t)(B * Hq * Nq * D)},
            {"k_i8", L->k_i8, (size_t)(B * Hkv * Nk * D)},
            {"v_q", L->v_q, fp8 ? (size_t)(B * Hkv * D * L->v_keys_padded) : (size_t)(B * Hkv * Nk * D) * 2},
            {"q_scale", L->q_scale, (size_t)(B * Hq * L->q_groups) * 4},
            {"k_scale", L->k_scale, (size_t)(B * Hkv * L->k_groups) * 4},
            {"v_scale", L->v_scale, (size_t)(B * Hkv * D) * 4},
            {"k_mean", L->k_mean, (size_t)(B * Hkv * D) * 4},
            {"q_kmean", L->q_kmean, (size_t)(B * Hq * Nq) * 4},
        };
        size_t diffs = 0;
        for (size_t i = 0; i < sizeof(regions) / sizeof(regions[0]); i++)
            if (!(warp_reduced_dot && strcmp(regions[i].name, "q_kmean") == 0))
                diffs += region_diffs(regions[i].name, got, want, regions[i].offset, regions[i].bytes);
        print_message("  %-26s %s %s: %zu bytes differ from the reference (every region must be bit-identical)\n",
                      c->name, qattn_precision_name(plan->precision), qattn_granularity_name(plan->granularity),
                      diffs);
        assert_int_equal(diffs, 0);
    }
    diff_count codes = {0}, vcodes = {0}, scales = {0}, means = {0}, corr = {0};
    compare_codes((int8_t *)(got + L->q_i8), (int8_t *)(want + L->q_i8), (size_t)(B * Hq * Nq * D), &codes);
    compare_codes((int8_t *)(got + L->k_i8), (int8_t *)(want + L->k_i8), (size_t)(B * Hkv * Nk * D), &codes);
    compare_floats((float *)(got + L->q_scale), (float *)(want + L->q_scale), (size_t)(B * Hq * L->q_groups), &scales);
    compare_floats((float *)(got + L->k_scale), (float *)(want + L->k_scale), (size_t)(B * Hkv * L->k_groups),
                   &scales);
    if (fp8) {
        compare_fp8(got + L->v_q, want + L->v_q, (size_t)(B * Hkv * D * L->v_keys_padded), &vcodes);
        compare_floats((float *)(got + L->v_scale), (float *)(want + L->v_scale), (size_t)(B * Hkv * D), &scales);
    } else {
        /* fp16 V: rounding an fp16/bf16/f32 input to fp16 has one answer */
        assert_memory_equal(got + L->v_q, want + L->v_q, (size_t)(B * Hkv * Nk * D) * 2);
    }
    if (plan->quant.smooth_k) {
        compare_floats((float *)(got + L->k_mean), (float *)(want + L->k_mean), (size_t)(B * Hkv * D), &means);
        /* q_kmean is a dot product: summation order moves it by a few ulp of its terms */
        const float *g = (const float *)(got + L->q_kmean), *w = (const float *)(want + L->q_kmean);
        for (int64_t i = 0; i < B * Hq * Nq; i++) {
            corr.total++;
            if (!(fabs(g[i] - w[i]) <= 1e-5 * (1.0 + fabs(w[i]))))
                corr.worse++;
        }
    }
    print_message("  %-26s codes %zu/%zu off by one, %zu worse | V codes %zu/%zu off by one, %zu worse | scales "
                  "%zu worse (max rel %.1e) | K mean %zu worse | LSE correction %zu worse\n",
                  c->name, codes.off_by_one, codes.total, codes.worse, vcodes.off_by_one, vcodes.total,
                  vcodes.worse, scales.worse, scales.max_rel, means.worse, corr.worse);
    assert_int_equal(codes.worse, 0);
    assert_int_equal(vcodes.worse, 0);
    assert_true(codes.off_by_one * 10000 <= codes.total);
    assert_true(vcodes.off_by_one * 10000 <= vcodes.total);
    assert_int_equal(scales.worse, 0);
    assert_int_equal(means.worse, 0);
    assert_int_equal(corr.worse, 0);

    for (int i = 0; i < 4; i++)
        qattn_buffer_destroy(b[i]);
    qattn_buffer_destroy(lse);
    qattn_buffer_destroy(ws);
    qattn_plan_destroy(plan);
    for (int i = 0; i < 3; i++)
        free(host[i]);
    free(got);
    free(want);
}

#define I8F16 QATTN_PRECISION_INT8_FP16
#define I8F8 QATTN_PRECISION_INT8_FP8
#define I8F8H QATTN_PRECISION_INT8_FP8_F16ACC

#define F16 QATTN_DTYPE_F16
#define BF16 QATTN_DTYPE_BF16
#define F32 QATTN_DTYPE_F32
#define DEFAULT_GRAN QATTN_GRANULARITY_DEFAULT
#define BLOCK QATTN_GRANULARITY_PER_BLOCK
#define WARP QATTN_GRANULARITY_PER_WARP
#define THREAD QATTN_GRANULARITY_PER_THREAD

/* The default shape, Q and V NHD when asked, K with a large bias, V x3, LSE; codes within a step */
#define TOLERANT .k_bias = 6.0, .v_scale = 3.0

static const ws_case cases[] = {
    {"int8_fp16_warp_f16", I8F16, WARP, QATTN_DEFAULT, F16, 0, TOLERANT},
    {"int8_fp16_block_bf16_nhd", I8F16, BLOCK, QATTN_DEFAULT, BF16, NHD_Q | NHD_V, TOLERANT},
    {"int8_fp16_thread_nosmooth", I8F16, THREAD, QATTN_OFF, F16, 0, TOLERANT},
    {"int8_fp16_warp_f32", I8F16, WARP, QATTN_DEFAULT, F32, NHD_Q | NHD_V, TOLERANT},
    {"int8_fp8_warp_f16", I8F8, WARP, QATTN_DEFAULT, F16, 0, TOLERANT},
    {"int8_fp8_thread_bf16_nhd", I8F8, THREAD, QATTN_DEFAULT, BF16, NHD_Q | NHD_V, TOLERANT},
    {"int8_fp8_f16acc_block", I8F8H, BLOCK, QATTN_DEFAULT, F16, 0, TOLERANT},
    /* bit for bit: name, precision, granularity, smooth K, dtype, layouts, {B, Hq, Hkv, Nq, Nk, D}, padding, K bias */
    {"bitexact_fp8_default_f16", I8F8, DEFAULT_GRAN, QATTN_DEFAULT, F16, 0, {1, 2, 2, 200, 200, 128}, 0, 8.0,
     .no_lse = 1, .exact = 1},
    {"bitexact_fp8_block_gqa", I8F8, BLOCK, QATTN_DEFAULT, F16, 0, {2, 4, 2, 257, 130, 64}, 0, 8.0, .no_lse = 1,
     .exact = 1},
    {"bitexact_fp8_thread_bf16_nhd_pad", I8F8, THREAD, QATTN_DEFAULT, BF16, NHD_ALL, {1, 4, 2, 150, 150, 128}, 8, 0.0,
     .no_lse = 1, .exact = 1},
    {"bitexact_fp8_f16acc_f32_mqa_d96", I8F8H, DEFAULT_GRAN, QATTN_DEFAULT, F32, 0, {1, 2, 1, 70, 90, 96}, 4, 8.0,
     .no_lse = 1, .exact = 1},
    {"bitexact_int8_fp16_kbias_d128", I8F16, DEFAULT_GRAN, QATTN_DEFAULT, F16, 0, {1, 2, 2, 129, 300, 128}, 0, 8.0,
     .no_lse = 1, .exact = 1},
    {"bitexact_int8_fp16_nosmooth_bf16", I8F16, DEFAULT_GRAN, QATTN_OFF, BF16, 0, {1, 2, 2, 64, 64, 64}, 0, 0.0,
     .no_lse = 1, .exact = 1},
};

int main(int argc, char **argv)
{
    int early = ref_backend_context(argc, argv, "test_workspace", &ctx);
    if (early >= 0)
        return early;
    if (strcmp(argv[1], "cpu") == 0) {
        printf("SKIP: the cpu backend runs the reference quantizer itself\n");
        qattn_ctx_destroy(ctx);
        return 77;
    }
    warp_reduced_dot = strcmp(argv[1], "cuda") == 0 || strcmp(argv[1], "cuda-emu") == 0;
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("workspace check on backend %s, seed %llu\n", argv[1], (unsigned long long)seed);
    const char *filter = getenv("QATTN_TEST_FILTER"); /* a cmocka glob over the case names */
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    enum { N = sizeof(cases) / sizeof(cases[0]) };
    struct CMUnitTest tests[N];
    for (int i = 0; i < N; i++)
        tests[i] = (struct CMUnitTest){cases[i].name, run_ws_case, NULL, NULL, (void *)&cases[i]};
    int failed = _cmocka_run_group_tests(argv[1], tests, N, NULL, NULL);
    qattn_ctx_destroy(ctx);
    return failed ? 1 : 0;
}
