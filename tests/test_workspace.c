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
static ref_rng rng;

typedef struct ws_case {
    const char *name;
    qattn_precision prec;
    qattn_granularity gran;
    qattn_toggle smooth;
    qattn_dtype dtype;
    int nhd;
} ws_case;

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
    const int64_t B = 2, Hq = 4, Hkv = 2, Nq = 150, Nk = 201, D = 64;
    qattn_attention_desc desc = {
        .q = c->nhd ? qattn_tensor_nhd(c->dtype, B, Hq, Nq, D) : qattn_tensor_hnd(c->dtype, B, Hq, Nq, D),
        .k = qattn_tensor_hnd(c->dtype, B, Hkv, Nk, D),
        .v = c->nhd ? qattn_tensor_nhd(c->dtype, B, Hkv, Nk, D) : qattn_tensor_hnd(c->dtype, B, Hkv, Nk, D),
        .o = qattn_tensor_hnd(c->dtype, B, Hq, Nq, D),
        .return_lse = 1, .precision = c->prec, .granularity = c->gran, .smooth_k = c->smooth,
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
    double bias[64];
    for (int64_t d = 0; d < D; d++)
        bias[d] = 6.0 * ref_rng_normal(&rng);
    for (int i = 0; i < 3; i++) {
        host[i] = ref_tensor_alloc(ins[i]);
        ref_fill_randn(host[i], ins[i], &rng, i == 2 ? 3.0 : 1.0, i == 1 ? bias : NULL);
    }
    size_t wsb = qattn_plan_workspace_size(plan);
    qattn_buffer *b[4], *lse = NULL, *ws = NULL;
    const qattn_tensor_desc *all[4] = {&desc.q, &desc.k, &desc.v, &desc.o};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(qattn_buffer_create(ctx, qattn_tensor_bytes(all[i]), &b[i]), QATTN_OK);
        if (i < 3)
            assert_int_equal(qattn_buffer_upload(b[i], 0, host[i], qattn_tensor_bytes(all[i])), QATTN_OK);
    }
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

static const ws_case cases[] = {
    {"int8_fp16_warp_f16", I8F16, QATTN_GRANULARITY_PER_WARP, QATTN_DEFAULT, QATTN_DTYPE_F16, 0},
    {"int8_fp16_block_bf16_nhd", I8F16, QATTN_GRANULARITY_PER_BLOCK, QATTN_DEFAULT, QATTN_DTYPE_BF16, 1},
    {"int8_fp16_thread_nosmooth", I8F16, QATTN_GRANULARITY_PER_THREAD, QATTN_OFF, QATTN_DTYPE_F16, 0},
    {"int8_fp16_warp_f32", I8F16, QATTN_GRANULARITY_PER_WARP, QATTN_DEFAULT, QATTN_DTYPE_F32, 1},
    {"int8_fp8_warp_f16", I8F8, QATTN_GRANULARITY_PER_WARP, QATTN_DEFAULT, QATTN_DTYPE_F16, 0},
    {"int8_fp8_thread_bf16_nhd", I8F8, QATTN_GRANULARITY_PER_THREAD, QATTN_DEFAULT, QATTN_DTYPE_BF16, 1},
    {"int8_fp8_f16acc_block", I8F8H, QATTN_GRANULARITY_PER_BLOCK, QATTN_DEFAULT, QATTN_DTYPE_F16, 0},
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
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("workspace check on backend %s, seed %llu\n", argv[1], (unsigned long long)seed);
    enum { N = sizeof(cases) / sizeof(cases[0]) };
    struct CMUnitTest tests[N];
    for (int i = 0; i < N; i++)
        tests[i] = (struct CMUnitTest){cases[i].name, run_ws_case, NULL, NULL, (void *)&cases[i]};
    int failed = _cmocka_run_group_tests(argv[1], tests, N, NULL, NULL);
    qattn_ctx_destroy(ctx);
    return failed ? 1 : 0;
}
