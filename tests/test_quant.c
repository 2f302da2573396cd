/* The reference quantizer (src/quant.c): scale groups per granularity, INT8
 * codes, smooth K, V to FP8, the LSE correction and the workspace layout,
 * checked against independent recomputation on fresh random data. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "numeric.h"
#include "quant.h"
#include "reference.h"

typedef struct fixture {
    qattn_ctx *ctx;
    ref_rng rng;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof(*f));
    qattn_ctx_params params = {.backend = "cpu"};
    if (!f || qattn_ctx_create(&params, &f->ctx) != QATTN_OK)
        return -1;
    uint64_t seed = ref_rng_seed_auto(&f->rng);
    print_message("seed %llu\n", (unsigned long long)seed);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    qattn_ctx_destroy(f->ctx);
    free(f);
    return 0;
}

/* Group of token t written out per granularity, independently of qattn_quant_group_of. */
static int64_t expected_q_group(qattn_granularity g, int64_t t)
{
    switch (g) {
    case QATTN_GRANULARITY_PER_BLOCK: return t / 128;
    case QATTN_GRANULARITY_PER_WARP: return t / 32;
    default: return (t / 32) * 8 + (t % 32) % 8;
    }
}

static int64_t expected_k_group(qattn_granularity g, int64_t t)
{
    return g == QATTN_GRANULARITY_PER_THREAD ? (t / 64) * 8 + (t % 64) % 8 : t / 64;
}

static void check_quantized(fixture *f, qattn_precision prec, qattn_granularity gran, bool smooth, bool kbias)
{
    const int64_t B = 2, Hq = 4, Hkv = 2, Nq = 300, Nk = 270, D = 32;
    qattn_attention_desc desc = {
        .q = qattn_tensor_hnd(QATTN_DTYPE_F16, B, Hq, Nq, D),
        .k = qattn_tensor_nhd(QATTN_DTYPE_F16, B, Hkv, Nk, D),
        .v = qattn_tensor_hnd(QATTN_DTYPE_F16, B, Hkv, Nk, D),
        .o = qattn_tensor_hnd(QATTN_DTYPE_F16, B, Hq, Nq, D),
        .precision = prec, .granularity = gran, .smooth_k = smooth ? QATTN_ON : QATTN_OFF,
    };
    qattn_plan *plan = NULL;
    assert_int_equal(qattn_plan_create(f->ctx, &desc, &plan), QATTN_OK);
    const qattn_workspace_layout *L = &plan->ws;

    void *q = ref_tensor_alloc(&desc.q), *k = ref_tensor_alloc(&desc.k), *v = ref_tensor_alloc(&desc.v);
    double bias[32];
    for (int c = 0; c < D; c++)
        bias[c] = kbias ? 8.0 * ref_rng_normal(&f->rng) : 0.0;
    ref_fill_randn(q, &desc.q, &f->rng, 1.0, NULL);
    ref_fill_randn(k, &desc.k, &f->rng, 1.0, bias);
    ref_fill_randn(v, &desc.v, &f->rng, 1.0, NULL);
    uint8_t *ws = malloc(L->total);
    memset(ws, 0xa5, L->total); /* poison: padding must be written */
    qattn_quantize_host(plan, q, k, v, ws, 2);

    /* Layout: aligned, ordered, inside total. */
    size_t regions[] = {L->q_i8, L->k_i8, L->v_q, L->q_scale, L->k_scale, L->k_mean, L->q_kmean};
    for (size_t i = 0; i < sizeof(regions) / sizeof(regions[0]); i++)
        if (regions[i] != QATTN_WS_ABSENT) {
            assert_int_equal(regions[i] % QATTN_WS_ALIGN, 0);
            assert_true(regions[i] < L->total);
        }

    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++) {
            int64_t bh = b * Hkv + h;
            /* Smooth K: the mean in double. */
            double mean[32];
            for (int c = 0; c < D; c++) {
                double s = 0;
                for (int64_t t = 0; t < Nk; t++)
                    s += ref_load(k, &desc.k, b, h, t, c);
                mean[c] = smooth ? s / (double)Nk : 0.0;
                if (smooth)
                    assert_float_equal(((float *)(ws + L->k_mean))[bh * D + c], mean[c], 1e-5 * (1 + fabs(mean[c])));
            }
            /* K codes: |code| <= 127, dequantized within half a step, each group's max hits 127. */
            const int8_t *k8 = (const int8_t *)(ws + L->k_i8) + bh * Nk * D;
            const float *ks = (const float *)(ws + L->k_scale) + bh * L->k_groups;
            int8_t group_peak[64] = {0};
            for (int64_t t = 0; t < Nk; t++) {
                int64_t g = expected_k_group(gran, t);
                assert_int_equal(g, qattn_quant_group_of(t, plan->quant.k_block, plan->quant.k_interleave));
                for (int c = 0; c < D; c++) {
                    double x = ref_load(k, &desc.k, b, h, t, c) - mean[c];
                    int code = k8[t * D + c];
                    assert_true(code >= -127 && code <= 127);
                    assert_true(fabs(code * (double)ks[g] - x) <= 0.5001 * ks[g] + 1e-4 * fabs(x) + 1e-5);
                    if (abs(code) > group_peak[g])
                        group_peak[g] = (int8_t)abs(code);
                }
            }
            for (int64_t g = 0; g < L->k_groups; g++)
                assert_int_equal(group_peak[g], 127);

            if (prec == QATTN_PRECISION_INT8_FP16) {
                const uint16_t *v16 = (const uint16_t *)(ws + L->v_q) + bh * Nk * D;
                for (int64_t t = 0; t < Nk; t++)
                    for (int c = 0; c < D; c++)
                        assert_true(qattn_f16_to_f32(v16[t * D + c]) == (float)ref_load(v, &desc.v, b, h, t, c));
                continue;
            }
            /* V: per channel, the largest |v| maps to v_fp8_max; E4M3 keeps 3 mantissa bits. */
            const uint8_t *v8 = ws + L->v_q + (size_t)bh * D * L->v_keys_padded;
            const float *vs = (const float *)(ws + L->v_scale) + bh * D;
            for (int c = 0; c < D; c++) {
                float peak = 0;
                for (int64_t t = 0; t < L->v_keys_padded; t++) {
                    uint8_t code = v8[c * L->v_keys_padded + t];
                    if (t >= Nk) {
                        assert_int_equal(code, 0);
                        continue;
                    }
                    double x = ref_load(v, &desc.v, b, h, t, c);
                    double got = qattn_e4m3_to_f32(code) * (double)vs[c];
                    /* half an E4M3 step: 2^-4 relative for normals, 2^-10 absolute (scaled) for subnormals */
                    assert_true(fabs(got - x) <= fabs(x) / 16.0 + vs[c] * 0.0009765625 + 1e-7);
                    peak = fmaxf(peak, fabsf(qattn_e4m3_to_f32(code)));
                }
                assert_true(peak == plan->quant.v_fp8_max);
            }
        }

    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++) {
            int64_t bh = b * Hq + h, bhk = b * Hkv + h / (Hq / Hkv);
            const int8_t *q8 = (const int8_t *)(ws + L->q_i8) + bh * Nq * D;
            const float *qs = (const float *)(ws + L->q_scale) + bh * L->q_groups;
            for (int64_t t = 0; t < Nq; t++) {
                int64_t g = expected_q_group(gran, t);
                assert_int_equal(g, qattn_quant_group_of(t, plan->quant.q_block, plan->quant.q_interleave));
                double dot = 0;
                for (int c = 0; c < D; c++) {
                    double x = ref_load(q, &desc.q, b, h, t, c);
                    assert_true(fabs(q8[t * D + c] * (double)qs[g] - x) <= 0.5001 * qs[g] + 1e-4 * fabs(x));
                    if (smooth)
                        dot += x * ((float *)(ws + L->k_mean))[bhk * D + c];
                }
                if (smooth)
                    assert_float_equal(((float *)(ws + L->q_kmean))[bh * Nq + t], plan->problem.sm_scale * dot,
                                       1e-4 * (1 + fabs(dot)));
            }
        }
    free(q);
    free(k);
    free(v);
    free(ws);
    qattn_plan_destroy(plan);
}

static void test_fp8_per_warp_smooth(void **state)
{
    check_quantized(*state, QATTN_PRECISION_INT8_FP8, QATTN_GRANULARITY_PER_WARP, true, true);
}
static void test_fp8_per_block(void **state)
{
    check_quantized(*state, QATTN_PRECISION_INT8_FP8, QATTN_GRANULARITY_PER_BLOCK, true, false);
}
static void test_fp8_per_thread_no_smooth(void **state)
{
    check_quantized(*state, QATTN_PRECISION_INT8_FP8, QATTN_GRANULARITY_PER_THREAD, false, false);
}
static void test_f16acc_bounded_v(void **state)
{
    check_quantized(*state, QATTN_PRECISION_INT8_FP8_F16ACC, QATTN_GRANULARITY_PER_WARP, true, true);
}
static void test_int8_fp16(void **state)
{
    check_quantized(*state, QATTN_PRECISION_INT8_FP16, QATTN_GRANULARITY_PER_THREAD, true, true);
}

static void test_group_math(void **state)
{
    (void)state;
    assert_int_equal(qattn_quant_groups(1, 128, 1), 1);
    assert_int_equal(qattn_quant_groups(129, 128, 1), 2);
    assert_int_equal(qattn_quant_groups(33, 32, 8), 16);
    assert_int_equal(qattn_quant_group_of(37, 32, 8), 8 + 5);
    qattn_quant_params qp;
    qattn_quant_defaults(&qp, QATTN_PRECISION_INT8_FP8_F16ACC, QATTN_GRANULARITY_PER_THREAD, 128, 32, 64, true);
    assert_int_equal(qp.q_block, 32);
    assert_int_equal(qp.q_interleave, 8);
    assert_int_equal(qp.k_interleave, 8);
    assert_true(qp.v_fp8_max == 2.25f);
    /* The fp16 accumulation bound: one 64-key block of P (<= 448) times V (<= 2.25). */
    assert_true(448.0 * qp.v_fp8_max * 64 < 65504.0);
}

static void test_all_zero_group(void **state)
{
    fixture *f = *state;
    const int64_t N = 64, D = 16;
    qattn_attention_desc desc = {
        .q = qattn_tensor_hnd(QATTN_DTYPE_F32, 1, 1, N, D),
        .k = qattn_tensor_hnd(QATTN_DTYPE_F32, 1, 1, N, D),
        .v = qattn_tensor_hnd(QATTN_DTYPE_F32, 1, 1, N, D),
        .o = qattn_tensor_hnd(QATTN_DTYPE_F32, 1, 1, N, D),
        .precision = QATTN_PRECISION_INT8_FP8,
    };
    qattn_plan *plan = NULL;
    assert_int_equal(qattn_plan_create(f->ctx, &desc, &plan), QATTN_OK);
    float *zeros = calloc((size_t)(N * D), sizeof(float));
    uint8_t *ws = malloc(plan->ws.total);
    qattn_quantize_host(plan, zeros, zeros, zeros, ws, 1);
    const float *qs = (const float *)(ws + plan->ws.q_scale);
    for (int64_t g = 0; g < plan->ws.q_groups; g++)
        assert_true(qs[g] == 0.0f); /* no NaN from 0/0 */
    for (int64_t i = 0; i < N * D; i++)
        assert_int_equal(((int8_t *)(ws + plan->ws.q_i8))[i], 0);
    free(zeros);
    free(ws);
    qattn_plan_destroy(plan);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_math),
        cmocka_unit_test(test_fp8_per_warp_smooth),
        cmocka_unit_test(test_fp8_per_block),
        cmocka_unit_test(test_fp8_per_thread_no_smooth),
        cmocka_unit_test(test_f16acc_bounded_v),
        cmocka_unit_test(test_int8_fp16),
        cmocka_unit_test(test_all_zero_group),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
