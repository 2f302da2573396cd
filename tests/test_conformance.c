/*
 * The conformance suite: one source, run against every backend that is built
 * (`test_conformance <backend>`); a backend not usable here exits 77 (skip)
 * with its reason.
 *
 * Each case draws fresh random inputs (seed printed; QATTN_TEST_SEED repeats
 * it), poisons the outputs, runs, and checks every element against an fp64
 * reference (cosine similarity, relative L1, RMSE, max error; LSE too). For
 * the quantized modes on a non-CPU backend it also runs the CPU backend's
 * reference quantization with the backend's own scale-group geometry and
 * requires a much tighter match than against exact attention. A mode a GPU
 * backend does not offer must say so with QATTN_ERR_UNSUPPORTED and a message
 * (the case is then skipped); the CPU backend must run every case.
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

static const char *backend_name;
static qattn_ctx *ctx;     /* the backend under test */
static qattn_ctx *cpu;     /* the reference quantizer */
static ref_rng rng;

/* DATA_TINY: randn, except for groups whose every value is below 2^-100
 * (one tiny value, the rest zeros): the first 128 rows of Q and K in head
 * (0, 0), and V channel 3 of every head. Finite input whose naive scales
 * overflow (448 / 1e-37 > FLT_MAX); the output must stay finite and right. */
typedef enum data_kind { DATA_RANDN, DATA_KBIAS, DATA_TINY } data_kind;

typedef struct conf_case {
    const char *name;
    int64_t b, hq, hkv, nq, nk, d;
    qattn_dtype in, out;
    int causal, nhd, pad;
    data_kind data;
    qattn_precision prec;
    qattn_granularity gran;
    qattn_toggle smooth;
    float sm_scale; /* 0: 1/sqrt(D) */
} conf_case;

/* [B, H, N, D] with `pad` extra elements after every row, in HND or NHD order. */
static qattn_tensor_desc tensor(const conf_case *c, int64_t h, int64_t n, qattn_dtype dt)
{
    int64_t row = c->d + c->pad;
    qattn_tensor_desc t = {.dtype = dt, .shape = {c->b, h, n, c->d}};
    if (c->nhd) {
        t.stride[3] = 1;
        t.stride[1] = row;
        t.stride[2] = h * row;
        t.stride[0] = n * h * row;
    } else {
        t.stride[3] = 1;
        t.stride[2] = row;
        t.stride[1] = n * row;
        t.stride[0] = h * n * row;
    }
    return t;
}

typedef struct bars {
    double cos_min, rel_l1_max, lse_max;
} bars;

static bars accuracy_bars(qattn_precision p, qattn_dtype in, qattn_dtype out)
{
    if (p == QATTN_PRECISION_EXACT) {
        if (in == QATTN_DTYPE_BF16 || out == QATTN_DTYPE_BF16)
            return (bars){0.9999, 6e-3, 1e-3};
        if (in == QATTN_DTYPE_F32)
            return (bars){0.999999, 1e-4, 1e-4};
        return (bars){0.99999, 2e-3, 1e-3};
    }
    if (p == QATTN_PRECISION_INT8_FP16)
        return (bars){0.9995, 0.03, 0.05};
    return (bars){0.999, 0.05, 0.05}; /* E4M3 P and V: SageAttention2's published level is 0.99927 / 0.038 */
}

typedef struct outputs {
    void *o;
    float *lse;
} outputs;

/* Runs desc on context c with host inputs; poisons the outputs first. For the
 * CPU reference run, `geometry` (when set) replaces the plan's scale groups. */
static qattn_status run_on(qattn_ctx *c, const qattn_attention_desc *desc, void *const host[3], outputs *out,
                           const qattn_plan *geometry, qattn_plan_info *info)
{
    qattn_plan *plan = NULL;
    qattn_status s = qattn_plan_create(c, desc, &plan);
    if (s)
        return s;
    if (geometry) {
        plan->quant.q_block = geometry->quant.q_block;
        plan->quant.q_interleave = geometry->quant.q_interleave;
        plan->quant.k_block = geometry->quant.k_block;
        plan->quant.k_interleave = geometry->quant.k_interleave;
        plan->quant.pv_f16_chunk = geometry->quant.pv_f16_chunk; /* F16ACC: the backend's exact-sum width */
        plan->kv_tile = geometry->kv_tile; /* FP8: P is rounded against the running max of whole key tiles */
        plan->quant.v_fp8_max = geometry->quant.v_fp8_max; /* F16ACC: the V bound of the kernel's fp16 sums */
        assert_int_equal(qattn_workspace_layout_init(plan, plan->status_word), QATTN_OK);
    }
    if (info)
        qattn_plan_get_info(plan, info);
    const qattn_tensor_desc *descs[4] = {&desc->q, &desc->k, &desc->v, &desc->o};
    qattn_buffer *bufs[4] = {NULL}, *lse = NULL, *ws = NULL;
    size_t lse_bytes = (size_t)(desc->q.shape[0] * desc->q.shape[1] * desc->q.shape[2]) * 4;
    for (int i = 0; i < 4; i++) {
        assert_int_equal(qattn_buffer_create(c, qattn_tensor_bytes(descs[i]), &bufs[i]), QATTN_OK);
        if (i < 3)
            assert_int_equal(qattn_buffer_upload(bufs[i], 0, host[i], qattn_tensor_bytes(descs[i])), QATTN_OK);
    }
    assert_int_equal(qattn_buffer_fill(bufs[3], 0, qattn_tensor_bytes(&desc->o), REF_POISON_BYTE), QATTN_OK);
    assert_int_equal(qattn_buffer_create(c, lse_bytes, &lse), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(lse, 0, lse_bytes, REF_POISON_BYTE), QATTN_OK);
    if (qattn_plan_workspace_size(plan))
        assert_int_equal(qattn_buffer_create(c, qattn_plan_workspace_size(plan), &ws), QATTN_OK);
    qattn_run_args args = {.q = bufs[0], .k = bufs[1], .v = bufs[2], .o = bufs[3], .lse = lse, .workspace = ws};
    s = qattn_run(plan, &args);
    if (!s)
        s = qattn_ctx_synchronize(c);
    if (!s) {
        assert_int_equal(qattn_buffer_download(bufs[3], 0, out->o, qattn_tensor_bytes(&desc->o)), QATTN_OK);
        assert_int_equal(qattn_buffer_download(lse, 0, out->lse, lse_bytes), QATTN_OK);
    }
    for (int i = 0; i < 4; i++)
        qattn_buffer_destroy(bufs[i]);
    qattn_buffer_destroy(lse);
    qattn_buffer_destroy(ws);
    qattn_plan_destroy(plan);
    return s;
}

/* Metrics of a against b over every element (both in the desc's layout). */
static ref_metrics compare_outputs(const void *a, const void *b, const qattn_tensor_desc *t)
{
    ref_accum acc = {0};
    for (int64_t i = 0; i < t->shape[0]; i++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t n = 0; n < t->shape[2]; n++)
                for (int64_t d = 0; d < t->shape[3]; d++)
                    ref_accum_add(&acc, ref_load(a, t, i, h, n, d), ref_load(b, t, i, h, n, d));
    return ref_accum_finish(&acc);
}

static void offset_store(void *base, const qattn_tensor_desc *t, int64_t b, int64_t h, int64_t n, int64_t d, float v)
{
    qattn_store_f(base, t->dtype, b * t->stride[0] + h * t->stride[1] + n * t->stride[2] + d, v);
}

static void make_tiny_groups(void *host[3], const qattn_tensor_desc *const descs[3])
{
    for (int i = 0; i < 2; i++) { /* Q, K: a 128-row block of head (0, 0) */
        const qattn_tensor_desc *t = descs[i];
        for (int64_t n = 0; n < t->shape[2] && n < 128; n++)
            for (int64_t d = 0; d < t->shape[3]; d++)
                offset_store(host[i], t, 0, 0, n, d, n == 0 && d == i ? 1e-38f : 0.f);
    }
    const qattn_tensor_desc *v = descs[2];
    for (int64_t b = 0; b < v->shape[0]; b++)
        for (int64_t h = 0; h < v->shape[1]; h++)
            for (int64_t n = 0; n < v->shape[2]; n++)
                offset_store(host[2], v, b, h, n, 3, n == 5 ? 1e-37f : 0.f);
}

static void run_case(void **state)
{
    const conf_case *c = *state;
    qattn_attention_desc desc = {
        .q = tensor(c, c->hq, c->nq, c->in),
        .k = tensor(c, c->hkv, c->nk, c->in),
        .v = tensor(c, c->hkv, c->nk, c->in),
        .o = tensor(c, c->hq, c->nq, c->out),
        .causal = c->causal,
        .return_lse = 1,
        .precision = c->prec,
        .granularity = c->gran,
        .smooth_k = c->smooth,
        .sm_scale = c->sm_scale,
    };
    void *host[3];
    const qattn_tensor_desc *in_descs[3] = {&desc.q, &desc.k, &desc.v};
    double *bias = calloc((size_t)c->d, sizeof(double));
    for (int64_t i = 0; c->data == DATA_KBIAS && i < c->d; i++)
        bias[i] = 8.0 * ref_rng_normal(&rng);
    for (int i = 0; i < 3; i++) {
        host[i] = ref_tensor_alloc(in_descs[i]);
        /* padding gets random bytes too: kernels must not read it as data */
        for (size_t byte = 0; byte < qattn_tensor_bytes(in_descs[i]); byte++)
            ((uint8_t *)host[i])[byte] = (uint8_t)(ref_rng_uniform(&rng) * 256);
        ref_fill_randn(host[i], in_descs[i], &rng, 1.0, i == 1 ? bias : NULL);
    }
    if (c->data == DATA_TINY)
        make_tiny_groups(host, in_descs);
    size_t obytes = qattn_tensor_bytes(&desc.o), lse_count = (size_t)(c->b * c->hq * c->nq);
    outputs got = {malloc(obytes), malloc(lse_count * 4)};

    qattn_plan_info info;
    qattn_status s = run_on(ctx, &desc, host, &got, NULL, &info);
    if (s == QATTN_ERR_UNSUPPORTED) {
        const char *msg = qattn_last_error(ctx);
        assert_true(strlen(msg) > 0);
        if (strcmp(backend_name, "cpu") == 0)
            fail_msg("the cpu backend must run every case: %s", msg);
        print_message("[  SKIP    ] %s: unsupported on %s: %s\n", c->name, backend_name, msg);
        for (int i = 0; i < 3; i++)
            free(host[i]);
        free(got.o);
        free(got.lse);
        free(bias);
        skip();
    }
    if (s)
        fail_msg("%s: %s: %s", c->name, qattn_status_str(s), qattn_last_error(ctx));

    ref_problem rp = {.q = &desc.q, .k = &desc.k, .v = &desc.v, .qd = host[0], .kd = host[1], .vd = host[2],
                      .causal = c->causal != 0, .sm_scale = c->sm_scale};
    ref_compare cmp = ref_check(&rp, got.o, &desc.o, got.lse, 0, &rng);
    bars bar = accuracy_bars(info.precision, c->in, c->out);
    print_message("  %-28s %-16s %-22s cos %.7f relL1 %.5f rmse %.2e max %.2e lse %.2e\n", c->name,
                  qattn_precision_name(info.precision), info.kernel, cmp.out.cos_sim, cmp.out.rel_l1, cmp.out.rmse,
                  cmp.out.max_abs, cmp.lse.max_abs);
    assert_int_equal(cmp.out.nonfinite, 0); /* includes unwritten (poisoned) elements */
    assert_int_equal(cmp.lse.nonfinite, 0);
    if (!(cmp.out.cos_sim >= bar.cos_min && cmp.out.rel_l1 <= bar.rel_l1_max && cmp.lse.max_abs <= bar.lse_max))
        fail_msg("%s: accuracy below the bar (cos >= %g, relL1 <= %g, lse <= %g)", c->name, bar.cos_min,
                 bar.rel_l1_max, bar.lse_max);

    /* The plan is reusable and the result reproducible. */
    outputs again = {malloc(obytes), malloc(lse_count * 4)};
    assert_int_equal(run_on(ctx, &desc, host, &again, NULL, NULL), QATTN_OK);
    if (memcmp(again.o, got.o, obytes) != 0) {
        ref_metrics m = compare_outputs(again.o, got.o, &desc.o);
        fail_msg("%s: two runs differ (max %.3g)", c->name, m.max_abs);
    }

    /* GPU quantized modes against the CPU's reference quantization with the same groups. */
    if (info.precision != QATTN_PRECISION_EXACT && strcmp(backend_name, "cpu") != 0) {
        qattn_plan *plan = NULL;
        qattn_attention_desc exact_mode = desc;
        exact_mode.precision = info.precision;
        exact_mode.granularity = info.granularity;
        assert_int_equal(qattn_plan_create(ctx, &exact_mode, &plan), QATTN_OK);
        outputs ref = {malloc(obytes), malloc(lse_count * 4)};
        assert_int_equal(run_on(cpu, &exact_mode, host, &ref, plan, NULL), QATTN_OK);
        ref_metrics m = compare_outputs(got.o, ref.o, &desc.o);
        print_message("  %-28s vs cpu reference quantization: cos %.7f relL1 %.5f max %.2e\n", c->name, m.cos_sim,
                      m.rel_l1, m.max_abs);
        if (!(m.cos_sim >= 0.9999 && m.rel_l1 <= 0.01))
            fail_msg("%s: differs from the reference quantized result (cos %.6f, relL1 %.4f)", c->name, m.cos_sim,
                     m.rel_l1);
        qattn_plan_destroy(plan);
        free(ref.o);
        free(ref.lse);
    }

    /* The CPU reference with 128-key softmax steps (how it checks the sm_90a
     * TMA kernels): within the same bars against fp64, and close to the
     * 64-key result. */
    if (info.precision != QATTN_PRECISION_EXACT && strcmp(backend_name, "cpu") == 0) {
        qattn_plan *plan = NULL;
        assert_int_equal(qattn_plan_create(ctx, &desc, &plan), QATTN_OK);
        plan->kv_tile = 128;
        if (info.precision == QATTN_PRECISION_INT8_FP8_F16ACC)
            plan->quant.v_fp8_max = 1.125f; /* as the CUDA planner bounds 128-key fp16 sums */
        outputs wide = {malloc(obytes), malloc(lse_count * 4)};
        assert_int_equal(run_on(ctx, &desc, host, &wide, plan, NULL), QATTN_OK);
        ref_compare wc = ref_check(&rp, wide.o, &desc.o, wide.lse, 0, &rng);
        ref_metrics m = compare_outputs(wide.o, got.o, &desc.o);
        print_message("  %-28s 128-key steps: cos %.7f relL1 %.5f; vs 64-key steps relL1 %.5f\n", c->name,
                      wc.out.cos_sim, wc.out.rel_l1, m.rel_l1);
        if (!(wc.out.cos_sim >= bar.cos_min && wc.out.rel_l1 <= bar.rel_l1_max && wc.lse.max_abs <= bar.lse_max))
            fail_msg("%s: 128-key steps below the accuracy bar", c->name);
        qattn_plan_destroy(plan);
        free(wide.o);
        free(wide.lse);
    }

    for (int i = 0; i < 3; i++)
        free(host[i]);
    free(got.o);
    free(got.lse);
    free(again.o);
    free(again.lse);
    free(bias);
}

/* NaN in K: a clear status, outputs untouched; skipping the scan still runs. */
static void nonfinite_case(void **state)
{
    const conf_case *c = *state;
    {
        /* a mode the backend does not offer: skip before allocating anything */
        qattn_attention_desc probe = {.q = tensor(c, c->hq, c->nq, c->in), .k = tensor(c, c->hkv, c->nk, c->in),
                                      .v = tensor(c, c->hkv, c->nk, c->in), .o = tensor(c, c->hq, c->nq, c->out),
                                      .precision = c->prec};
        qattn_plan *plan = NULL;
        qattn_status s = qattn_plan_create(ctx, &probe, &plan);
        qattn_plan_destroy(plan);
        if (s == QATTN_ERR_UNSUPPORTED && strcmp(backend_name, "cpu") != 0) {
            print_message("[  SKIP    ] unsupported: %s\n", qattn_last_error(ctx));
            skip();
        }
    }
    qattn_attention_desc desc = {
        .q = tensor(c, c->hq, c->nq, c->in), .k = tensor(c, c->hkv, c->nk, c->in),
        .v = tensor(c, c->hkv, c->nk, c->in), .o = tensor(c, c->hq, c->nq, c->out),
        .return_lse = 1, .precision = c->prec,
    };
    void *host[3];
    const qattn_tensor_desc *in_descs[3] = {&desc.q, &desc.k, &desc.v};
    for (int i = 0; i < 3; i++) {
        host[i] = ref_tensor_alloc(in_descs[i]);
        ref_fill_randn(host[i], in_descs[i], &rng, 1.0, NULL);
    }
    ((uint16_t *)host[1])[desc.k.stride[2] * 7 + 3] = 0x7e00; /* fp16 NaN */
    size_t obytes = qattn_tensor_bytes(&desc.o);
    outputs got = {malloc(obytes), malloc((size_t)(c->b * c->hq * c->nq) * 4)};
    memset(got.o, 0, obytes);
    qattn_status s = run_on(ctx, &desc, host, &got, NULL, NULL);
    assert_int_equal(s, QATTN_ERR_NONFINITE_INPUT);
    assert_non_null(strstr(qattn_last_error(ctx), "NaN or Inf"));
    /* run_on downloads nothing on failure; check the device copy stayed poisoned by running the
     * plan directly once more with our own buffers. */
    qattn_plan *plan = NULL;
    assert_int_equal(qattn_plan_create(ctx, &desc, &plan), QATTN_OK);
    qattn_buffer *b[4], *ws = NULL, *lse = NULL;
    const qattn_tensor_desc *all[4] = {&desc.q, &desc.k, &desc.v, &desc.o};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(qattn_buffer_create(ctx, qattn_tensor_bytes(all[i]), &b[i]), QATTN_OK);
        if (i < 3)
            qattn_buffer_upload(b[i], 0, host[i], qattn_tensor_bytes(all[i]));
    }
    qattn_buffer_fill(b[3], 0, obytes, REF_POISON_BYTE);
    assert_int_equal(qattn_buffer_create(ctx, (size_t)(c->b * c->hq * c->nq) * 4, &lse), QATTN_OK);
    if (qattn_plan_workspace_size(plan))
        assert_int_equal(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws), QATTN_OK);
    qattn_run_args args = {.q = b[0], .k = b[1], .v = b[2], .o = b[3], .lse = lse, .workspace = ws};
    assert_int_equal(qattn_run(plan, &args), QATTN_ERR_NONFINITE_INPUT);
    qattn_ctx_synchronize(ctx);
    uint8_t *o = malloc(obytes);
    qattn_buffer_download(b[3], 0, o, obytes);
    for (size_t i = 0; i < obytes; i++)
        if (o[i] != REF_POISON_BYTE)
            fail_msg("output byte %zu was written although the run failed", i);
    free(o);
    qattn_plan_destroy(plan);

    /* Without the scan the run goes through (the result is unspecified, but no crash). */
    desc.flags = QATTN_FLAG_NO_FINITE_CHECK;
    assert_int_equal(qattn_plan_create(ctx, &desc, &plan), QATTN_OK);
    qattn_buffer_destroy(ws);
    ws = NULL;
    if (qattn_plan_workspace_size(plan))
        assert_int_equal(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws), QATTN_OK);
    args.workspace = ws;
    assert_int_equal(qattn_run(plan, &args), QATTN_OK);
    assert_int_equal(qattn_ctx_synchronize(ctx), QATTN_OK);
    qattn_plan_destroy(plan);
    for (int i = 0; i < 4; i++)
        qattn_buffer_destroy(b[i]);
    qattn_buffer_destroy(ws);
    qattn_buffer_destroy(lse);
    for (int i = 0; i < 3; i++)
        free(host[i]);
    free(got.o);
    free(got.lse);
}

#define F16 QATTN_DTYPE_F16
#define BF16 QATTN_DTYPE_BF16
#define F32 QATTN_DTYPE_F32
#define EXACT QATTN_PRECISION_EXACT
#define I8F16 QATTN_PRECISION_INT8_FP16
#define I8F8 QATTN_PRECISION_INT8_FP8
#define I8F8H QATTN_PRECISION_INT8_FP8_F16ACC
#define BLOCK QATTN_GRANULARITY_PER_BLOCK
#define WARP QATTN_GRANULARITY_PER_WARP
#define THREAD QATTN_GRANULARITY_PER_THREAD

/* name, b, hq, hkv, nq, nk, d, in, out, causal, nhd, pad, data, precision, granularity, smooth */
static const conf_case cases[] = {
    {"exact_d64", 2, 4, 4, 197, 197, 64, F16, F16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_d128_causal", 1, 4, 4, 300, 300, 128, F16, F16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_d128_kbias", 1, 2, 2, 256, 256, 128, F16, F16, 0, 0, 0, DATA_KBIAS, EXACT, 0, 0, 0.f},
    {"exact_bf16_d128", 1, 2, 2, 129, 129, 128, BF16, BF16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_f32_d64", 1, 2, 2, 77, 77, 64, F32, F32, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_f16_in_f32_out", 1, 2, 2, 100, 100, 64, F16, F32, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_n1", 1, 2, 2, 1, 1, 64, F16, F16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_decode_causal", 2, 4, 4, 1, 333, 128, F16, F16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_causal_nq_gt_nk", 1, 2, 2, 150, 70, 64, F16, F16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_causal_nq_lt_nk", 1, 2, 2, 70, 250, 128, F16, F16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_gqa", 1, 8, 2, 100, 100, 64, F16, F16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_mqa_causal", 2, 4, 1, 90, 90, 128, F16, F16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_nhd_padded", 2, 4, 2, 123, 123, 64, F16, F16, 0, 1, 8, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_hnd_padded", 1, 2, 2, 65, 65, 128, F16, F16, 1, 0, 8, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_d32", 1, 2, 2, 70, 70, 32, F16, F16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_d96", 1, 2, 2, 70, 70, 96, F16, F16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_d256", 1, 2, 2, 70, 70, 256, F16, F16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    /* Longer than the TMA kernels' stage rings, D = 256 in both dtypes, and a
     * token stride that is not a multiple of 8 (the cp.async kernel on sm_90). */
    {"exact_d128_long", 1, 2, 2, 1000, 1000, 128, F16, F16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_d64_causal_long", 1, 2, 1, 700, 1100, 64, F16, F16, 1, 0, 0, DATA_KBIAS, EXACT, 0, 0, 0.f},
    {"exact_d256_bf16_causal_gqa", 1, 4, 2, 200, 333, 256, BF16, BF16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"exact_d256_nhd_f32_out", 2, 2, 1, 130, 130, 256, F16, F32, 0, 1, 8, DATA_KBIAS, EXACT, 0, 0, 0.f},
    {"exact_hnd_pad4", 1, 2, 2, 100, 100, 128, F16, F16, 1, 0, 4, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"int8_fp16_d64", 2, 2, 2, 200, 200, 64, F16, F16, 0, 0, 0, DATA_RANDN, I8F16, 0, 0, 0.f},
    {"int8_fp16_d128_kbias_causal", 1, 4, 2, 260, 260, 128, F16, F16, 1, 0, 0, DATA_KBIAS, I8F16, 0, 0, 0.f},
    /* INT8_FP16 on the sm_90a TMA kernel: more 128-key steps than stages,
     * per-thread and per-block K scales, bf16 NHD input, decode. */
    {"int8_fp16_long_gqa", 1, 4, 2, 1000, 1040, 128, F16, F16, 0, 0, 0, DATA_KBIAS, I8F16, 0, 0, 0.f},
    {"int8_fp16_bf16_nhd_per_thread_causal", 1, 2, 2, 300, 333, 64, BF16, BF16, 1, 1, 8, DATA_RANDN, I8F16, THREAD, 0, 0.f},
    {"int8_fp16_decode_per_block", 3, 4, 1, 1, 700, 128, F16, F16, 1, 0, 0, DATA_KBIAS, I8F16, BLOCK, 0, 0.f},
    {"int8_fp8_d128", 1, 4, 4, 300, 300, 128, F16, F16, 0, 0, 0, DATA_RANDN, I8F8, 0, 0, 0.f},
    {"int8_fp8_d128_kbias", 1, 4, 4, 300, 300, 128, F16, F16, 0, 0, 0, DATA_KBIAS, I8F8, 0, 0, 0.f},
    {"int8_fp8_d64_kbias_causal", 2, 4, 2, 333, 333, 64, F16, F16, 1, 0, 0, DATA_KBIAS, I8F8, 0, 0, 0.f},
    {"int8_fp8_per_block", 1, 2, 2, 257, 257, 128, F16, F16, 0, 0, 0, DATA_KBIAS, I8F8, BLOCK, 0, 0.f},
    {"int8_fp8_per_thread", 1, 2, 2, 257, 257, 128, F16, F16, 1, 0, 0, DATA_KBIAS, I8F8, THREAD, 0, 0.f},
    {"int8_fp8_no_smooth", 1, 2, 2, 200, 200, 64, F16, F16, 0, 0, 0, DATA_RANDN, I8F8, WARP, QATTN_OFF, 0.f},
    {"int8_fp8_bf16_nhd_padded", 1, 4, 2, 150, 150, 128, BF16, BF16, 0, 1, 8, DATA_RANDN, I8F8, 0, 0, 0.f},
    {"int8_fp8_causal_nq_gt_nk", 1, 2, 2, 140, 60, 128, F16, F16, 1, 0, 0, DATA_RANDN, I8F8, 0, 0, 0.f},
    {"int8_fp8_decode", 4, 4, 1, 1, 500, 128, F16, F16, 1, 0, 0, DATA_KBIAS, I8F8, 0, 0, 0.f},
    {"int8_fp8_f16acc_d128", 1, 4, 4, 300, 300, 128, F16, F16, 0, 0, 0, DATA_RANDN, I8F8H, 0, 0, 0.f},
    {"int8_fp8_f16acc_d64_kbias", 1, 4, 2, 222, 222, 64, F16, F16, 1, 0, 0, DATA_KBIAS, I8F8H, 0, 0, 0.f},
    /* Nk a multiple of 16: the sm_90a TMA kernel's cases (a partial last tile
     * that reads into the next head, GQA, more tiles than pipeline stages,
     * per-thread K scales, both accumulators, D 64 and 128). */
    {"int8_fp8_tma_gqa_tail", 2, 4, 2, 300, 272, 128, F16, F16, 0, 0, 0, DATA_RANDN, I8F8, 0, 0, 0.f},
    {"int8_fp8_tma_causal_kbias", 1, 4, 4, 400, 400, 128, F16, F16, 1, 0, 0, DATA_KBIAS, I8F8, 0, 0, 0.f},
    {"int8_fp8_tma_d64_causal_nq_lt_nk", 2, 2, 1, 100, 208, 64, F16, F16, 1, 0, 0, DATA_KBIAS, I8F8, 0, 0, 0.f},
    {"int8_fp8_tma_per_thread", 1, 2, 2, 200, 336, 128, F16, F16, 0, 0, 0, DATA_KBIAS, I8F8, THREAD, 0, 0.f},
    {"int8_fp8_tma_long_per_block", 1, 2, 2, 1100, 1088, 128, F16, F16, 0, 0, 0, DATA_KBIAS, I8F8, BLOCK, 0, 0.f},
    {"int8_fp8_f16acc_tma_nhd", 1, 4, 2, 256, 528, 128, F16, F16, 0, 1, 8, DATA_RANDN, I8F8H, 0, 0, 0.f},
    {"int8_fp8_f16acc_tma_d64_causal", 2, 2, 2, 130, 1040, 64, F16, F16, 1, 0, 0, DATA_KBIAS, I8F8H, 0, 0, 0.f},
    /* A negative sm_scale (the API allows any finite scale): softmax of -|s| q.k,
     * in every mode, masked and not, on the TMA kernels' shapes (Nk % 16 == 0). */
    {"exact_negative_scale_causal", 1, 2, 2, 130, 160, 64, F16, F16, 1, 0, 0, DATA_RANDN, EXACT, 0, 0, -0.11f},
    {"int8_fp16_negative_scale_causal", 1, 2, 2, 130, 160, 128, F16, F16, 1, 0, 0, DATA_RANDN, I8F16, 0, 0, -0.07f},
    {"int8_fp8_negative_scale_causal", 1, 2, 2, 130, 160, 128, F16, F16, 1, 0, 0, DATA_RANDN, I8F8, 0, 0, -0.07f},
    {"int8_fp8_f16acc_negative_scale", 1, 2, 1, 100, 208, 64, F16, F16, 0, 0, 0, DATA_RANDN, I8F8H, 0, 0, -0.1f},
    /* Groups of tiny values and zeros: scales floor to zero, never NaN. */
    {"int8_fp8_bf16_tiny_groups", 1, 2, 2, 200, 200, 128, BF16, BF16, 0, 0, 0, DATA_TINY, I8F8, 0, 0, 0.f},
    {"int8_fp8_f16acc_bf16_tiny_groups", 1, 2, 1, 150, 272, 64, BF16, BF16, 1, 0, 0, DATA_TINY, I8F8H, 0, 0, 0.f},
    {"int8_fp16_bf16_tiny_no_smooth", 1, 2, 2, 200, 200, 128, BF16, BF16, 0, 0, 0, DATA_TINY, I8F16, WARP, QATTN_OFF, 0.f},
    {"int8_fp8_f32_tiny_groups", 1, 2, 2, 140, 140, 64, F32, F32, 0, 0, 0, DATA_TINY, I8F8, BLOCK, QATTN_OFF, 0.f},
    {"auto_d128", 1, 4, 4, 256, 256, 128, F16, F16, 0, 0, 0, DATA_KBIAS, QATTN_PRECISION_AUTO, 0, 0, 0.f},
};

static const conf_case nonfinite_cases[] = {
    {"nonfinite_exact", 1, 2, 2, 64, 64, 64, F16, F16, 0, 0, 0, DATA_RANDN, EXACT, 0, 0, 0.f},
    {"nonfinite_int8_fp8", 1, 2, 2, 64, 64, 64, F16, F16, 0, 0, 0, DATA_RANDN, I8F8, 0, 0, 0.f},
    {"nonfinite_int8_fp16", 1, 2, 2, 64, 64, 128, F16, F16, 0, 0, 0, DATA_RANDN, I8F16, 0, 0, 0.f},
};

int main(int argc, char **argv)
{
    int early = ref_backend_context(argc, argv, "test_conformance", &ctx);
    if (early >= 0)
        return early;
    backend_name = argv[1];
    qattn_ctx_params cpu_params = {.backend = "cpu"};
    if (qattn_ctx_create(&cpu_params, &cpu)) {
        fprintf(stderr, "test_conformance: cpu reference: %s\n", qattn_last_error(NULL));
        return 1;
    }
    qattn_device_info dev;
    qattn_ctx_device_info(ctx, &dev);
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("conformance on backend %s, device %s, seed %llu (QATTN_TEST_SEED repeats it)\n", backend_name, dev.name,
           (unsigned long long)seed);

    const char *filter = getenv("QATTN_TEST_FILTER"); /* a cmocka glob over the case names */
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    enum { NCASES = sizeof(cases) / sizeof(cases[0]), NNF = sizeof(nonfinite_cases) / sizeof(nonfinite_cases[0]) };
    struct CMUnitTest tests[NCASES + NNF];
    for (int i = 0; i < NCASES; i++)
        tests[i] = (struct CMUnitTest){cases[i].name, run_case, NULL, NULL, (void *)&cases[i]};
    for (int i = 0; i < NNF; i++)
        tests[NCASES + i] =
            (struct CMUnitTest){nonfinite_cases[i].name, nonfinite_case, NULL, NULL, (void *)&nonfinite_cases[i]};
    int failed = _cmocka_run_group_tests(backend_name, tests, NCASES + NNF, NULL, NULL);
    qattn_ctx_destroy(cpu);
    qattn_ctx_destroy(ctx);
    return failed ? 1 : 0;
}
