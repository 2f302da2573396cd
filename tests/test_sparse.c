/*
 * The sparse-attention suite (sequence pruning): one source, run against
 * every backend that is built (`test_sparse <backend>`).
 *
 * Each case draws fresh inputs (random, or ref_fill_structured's data with
 * real structure), poisons the outputs, runs a sparse plan and checks every
 * element against the fp64 reference of attention under the same element
 * mask (causal, window, sinks, block layout), with the dense accuracy bars of
 * the mode. Predicted layouts are read back (qattn_sparse_layout_read) and
 * the run is checked against the reference under the layout it used; on the
 * structured data the prediction must also prune (density < 1), keep the
 * needle's block and stay close to dense attention. A backend that does not
 * run a part must say QATTN_ERR_UNSUPPORTED with a message (the case is then
 * skipped); the CPU backend must run every case.
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
#include "reference.h"

static const char *backend_name;
static qattn_ctx *ctx;
static ref_rng rng;

enum { NO_LAYOUT = QATTN_SPARSE_NO_LAYOUT, BLOCKS = QATTN_SPARSE_BLOCKS, PREDICT = QATTN_SPARSE_PREDICT };
#define F16 QATTN_DTYPE_F16
#define BF16 QATTN_DTYPE_BF16
#define F32 QATTN_DTYPE_F32
#define EXACT QATTN_PRECISION_EXACT
#define I8F16 QATTN_PRECISION_INT8_FP16
#define I8F8 QATTN_PRECISION_INT8_FP8
#define I8F8H QATTN_PRECISION_INT8_FP8_F16ACC

typedef struct sp_case {
    const char *name;
    int64_t b, hq, hkv, nq, nk, d;
    qattn_dtype in;
    int causal;
    qattn_precision prec;
    int window;
    int64_t left, right, sinks;
    int layout;
    int64_t q_block, k_block;
    double keep;      /* BLOCKS: probability that a block is kept (rows may end up empty) */
    int structured;   /* ref_fill_structured's data instead of randn */
    float pv;         /* pv_threshold */
} sp_case;

typedef struct bars {
    double cos_min, rel_l1_max, lse_max;
} bars;

/* The dense suite's bars (tests/test_conformance.c). */
static bars accuracy_bars(qattn_precision p, qattn_dtype in)
{
    if (p == EXACT)
        return in == BF16 ? (bars){0.9999, 6e-3, 1e-3} : in == F32 ? (bars){0.999999, 1e-4, 1e-4}
                                                                     : (bars){0.99999, 2e-3, 1e-3};
    if (p == I8F16)
        return (bars){0.9995, 0.03, 0.05};
    return (bars){0.999, 0.05, 0.05};
}

/* A random block layout: each (row, key block) kept with probability keep. */
static int64_t random_layout(const sp_case *c, int64_t rows, int64_t kb, int32_t *indptr, int32_t *indices,
                             uint8_t *kept)
{
    int64_t n = 0;
    indptr[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t k = 0; k < kb; k++) {
            kept[r * kb + k] = ref_rng_uniform(&rng) < c->keep;
            if (kept[r * kb + k])
                indices[n++] = (int32_t)k;
        }
        indptr[r + 1] = (int32_t)n;
    }
    return n;
}

typedef struct run_result {
    qattn_status status;
    void *o;
    float *lse;
    int32_t *indptr, *indices; /* PREDICT: the layout read back */
    int64_t count;
    float *density;
    char kernel[128];
} run_result;

/* Uploads inputs, poisons outputs, plans and runs; downloads outputs (and a predicted layout). */
static run_result run_sparse(const qattn_attention_desc *desc, const qattn_sparse_desc *sd, void *const host[3],
                             const int32_t *indptr, const int32_t *indices, int64_t count, uint32_t flags)
{
    run_result res = {0};
    qattn_attention_desc d = *desc;
    d.flags |= flags;
    qattn_plan *plan = NULL;
    res.status = qattn_sparse_plan_create(ctx, &d, sd, &plan);
    if (res.status)
        return res;
    qattn_plan_info info;
    assert_int_equal(qattn_plan_get_info(plan, &info), QATTN_OK);
    snprintf(res.kernel, sizeof(res.kernel), "%s", info.kernel);
    const qattn_tensor_desc *descs[4] = {&d.q, &d.k, &d.v, &d.o};
    qattn_buffer *bufs[4] = {NULL}, *lse = NULL, *ws = NULL, *ptr = NULL, *idx = NULL;
    const size_t lse_bytes = (size_t)(d.q.shape[0] * d.q.shape[1] * d.q.shape[2]) * 4;
    for (int i = 0; i < 4; i++) {
        assert_int_equal(qattn_buffer_create(ctx, qattn_tensor_bytes(descs[i]), &bufs[i]), QATTN_OK);
        if (i < 3)
            assert_int_equal(qattn_buffer_upload(bufs[i], 0, host[i], qattn_tensor_bytes(descs[i])), QATTN_OK);
    }
    assert_int_equal(qattn_buffer_fill(bufs[3], 0, qattn_tensor_bytes(&d.o), REF_POISON_BYTE), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, lse_bytes, &lse), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(lse, 0, lse_bytes, REF_POISON_BYTE), QATTN_OK);
    if (qattn_plan_workspace_size(plan))
        assert_int_equal(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws), QATTN_OK);
    qattn_sparse_args sa = {0};
    if (sd->layout == QATTN_SPARSE_BLOCKS) {
        const int64_t rows = qattn_sparse_layout_rows(plan, NULL, NULL);
        assert_int_equal(qattn_buffer_create(ctx, (size_t)(rows + 1) * 4, &ptr), QATTN_OK);
        assert_int_equal(qattn_buffer_upload(ptr, 0, indptr, (size_t)(rows + 1) * 4), QATTN_OK);
        if (count) {
            assert_int_equal(qattn_buffer_create(ctx, (size_t)count * 4, &idx), QATTN_OK);
            assert_int_equal(qattn_buffer_upload(idx, 0, indices, (size_t)count * 4), QATTN_OK);
        }
        sa = (qattn_sparse_args){.block_indptr = ptr, .block_indices = idx, .block_count = count};
    }
    qattn_run_args args = {.q = bufs[0], .k = bufs[1], .v = bufs[2], .o = bufs[3], .lse = lse, .workspace = ws};
    res.status = qattn_sparse_run(plan, &args, &sa);
    if (!res.status)
        res.status = qattn_ctx_synchronize(ctx);
    if (!res.status) {
        res.o = malloc(qattn_tensor_bytes(&d.o));
        res.lse = malloc(lse_bytes);
        assert_int_equal(qattn_buffer_download(bufs[3], 0, res.o, qattn_tensor_bytes(&d.o)), QATTN_OK);
        assert_int_equal(qattn_buffer_download(lse, 0, res.lse, lse_bytes), QATTN_OK);
        if (sd->layout == QATTN_SPARSE_PREDICT) {
            const int64_t rows = qattn_sparse_layout_rows(plan, NULL, NULL);
            res.indptr = malloc((size_t)(rows + 1) * 4);
            res.density = malloc((size_t)(d.k.shape[0] * d.k.shape[1]) * 4);
            assert_int_equal(qattn_sparse_layout_read(plan, ws, 0, res.indptr, NULL, 0, &res.count, res.density),
                             QATTN_OK);
            res.indices = malloc((size_t)(res.count > 0 ? res.count : 1) * 4);
            int64_t again = -1;
            assert_int_equal(qattn_sparse_layout_read(plan, ws, 0, NULL, res.indices, res.count, &again, NULL),
                             QATTN_OK);
            assert_int_equal(again, res.count);
        }
    }
    for (int i = 0; i < 4; i++)
        qattn_buffer_destroy(bufs[i]);
    qattn_buffer_destroy(lse);
    qattn_buffer_destroy(ws);
    qattn_buffer_destroy(ptr);
    qattn_buffer_destroy(idx);
    qattn_plan_destroy(plan);
    return res;
}

static void free_result(run_result *r)
{
    free(r->o);
    free(r->lse);
    free(r->indptr);
    free(r->indices);
    free(r->density);
}

static qattn_sparse_desc sparse_desc(const sp_case *c)
{
    qattn_sparse_desc sd = {.window = c->window, .layout = (qattn_sparse_layout_kind)c->layout,
                            .pv_threshold = c->pv};
    if (c->window) {
        sd.window_left = c->left;
        sd.window_right = c->right;
        sd.sink_tokens = c->sinks;
    }
    if (c->layout != NO_LAYOUT) {
        sd.q_block = c->q_block;
        sd.k_block = c->k_block;
    }
    if (c->layout == PREDICT) {
        sd.sim_threshold = 0.6f;
        sd.cdf_threshold = 0.995f;
        sd.sink_blocks = 1;
        sd.recent_blocks = 1;
        sd.last_q_blocks = 1;
    }
    return sd;
}

static void skip_unsupported(const sp_case *c, qattn_status s)
{
    const char *msg = qattn_last_error(ctx);
    assert_true(strlen(msg) > 0);
    if (strcmp(backend_name, "cpu") == 0)
        fail_msg("the cpu backend must run every case: %s", msg);
    print_message("[  SKIP    ] %s: unsupported on %s: %s (%s)\n", c->name, backend_name, msg, qattn_status_str(s));
    skip();
}

static void run_case(void **state)
{
    const sp_case *c = *state;
    const int64_t D = c->d;
    qattn_attention_desc desc = {
        .q = qattn_tensor_hnd(c->in, c->b, c->hq, c->nq, D),
        .k = qattn_tensor_hnd(c->in, c->b, c->hkv, c->nk, D),
        .v = qattn_tensor_hnd(c->in, c->b, c->hkv, c->nk, D),
        .o = qattn_tensor_hnd(c->in, c->b, c->hq, c->nq, D),
        .causal = c->causal,
        .return_lse = 1,
        .precision = c->prec,
    };
    const qattn_sparse_desc sd = sparse_desc(c);
    void *host[3];
    const qattn_tensor_desc *in_descs[3] = {&desc.q, &desc.k, &desc.v};
    for (int i = 0; i < 3; i++)
        host[i] = ref_tensor_alloc(in_descs[i]);
    ref_structure st = ref_structure_default(c->nk);
    if (c->structured) {
        ref_fill_structured(host[0], &desc.q, host[1], &desc.k, host[2], &desc.v, &rng, &st);
    } else {
        for (int i = 0; i < 3; i++)
            ref_fill_randn(host[i], in_descs[i], &rng, 1.0, NULL);
    }

    ref_sparse_mask mc = {.sd = &sd, .nq = c->nq, .nk = c->nk, .hkv = c->hkv, .group = c->hq / c->hkv};
    uint8_t *kept = NULL; /* the layout's blocks, as mc.kept */
    int32_t *indptr = NULL, *indices = NULL;
    int64_t count = 0;
    if (c->layout != NO_LAYOUT) {
        mc.q_blocks = qattn_ceil_div(c->nq, c->q_block);
        mc.k_blocks = qattn_ceil_div(c->nk, c->k_block);
        const int64_t rows = c->b * c->hkv * mc.q_blocks;
        mc.kept = kept = calloc((size_t)(rows * mc.k_blocks), 1);
        indptr = malloc((size_t)(rows + 1) * 4);
        indices = malloc((size_t)(rows * mc.k_blocks + 1) * 4);
        if (c->layout == BLOCKS)
            count = random_layout(c, rows, mc.k_blocks, indptr, indices, kept);
    }

    run_result got = run_sparse(&desc, &sd, host, indptr, indices, count, 0);
    if (got.status == QATTN_ERR_UNSUPPORTED) {
        for (int i = 0; i < 3; i++)
            free(host[i]);
        free(kept);
        free(indptr);
        free(indices);
        skip_unsupported(c, got.status);
    }
    if (got.status)
        fail_msg("%s: %s: %s", c->name, qattn_status_str(got.status), qattn_last_error(ctx));

    if (c->layout == PREDICT) { /* the layout it used: valid, and what the reference masks with */
        qattn_sparse_problem sp = {.rows = c->b * c->hkv * mc.q_blocks, .k_blocks = mc.k_blocks};
        if (qattn_sparse_check_layout(ctx, &sp, got.indptr, got.indices, got.count))
            fail_msg("%s: the predicted layout is not valid: %s", c->name, qattn_last_error(ctx));
        for (int64_t r = 0; r < sp.rows; r++)
            for (int64_t e = got.indptr[r]; e < got.indptr[r + 1]; e++)
                kept[r * mc.k_blocks + got.indices[e]] = 1;
    }

    ref_problem rp = {.q = &desc.q, .k = &desc.k, .v = &desc.v, .qd = host[0], .kd = host[1], .vd = host[2],
                      .causal = c->causal != 0, .visible = ref_sparse_visible, .visible_ctx = &mc};
    ref_compare cmp = ref_check(&rp, got.o, &desc.o, got.lse, 0, &rng);
    bars bar = accuracy_bars(c->prec, c->in);
    if (c->structured && c->prec != EXACT) /* logits up to ~15: INT8 Q.K errors scale with them */
        bar.lse_max = 0.1;
    if (c->pv > 0.f) /* approximate by design: P below 2^-pv of the row max is dropped */
        bar.rel_l1_max += 0.01, bar.cos_min -= 1e-4, bar.lse_max += 1e-3;
    print_message("  %-34s %-22s cos %.7f relL1 %.5f rmse %.2e max %.2e lse %.2e\n", c->name, got.kernel,
                  cmp.out.cos_sim, cmp.out.rel_l1, cmp.out.rmse, cmp.out.max_abs, cmp.lse.max_abs);
    assert_int_equal(cmp.out.nonfinite, 0); /* includes unwritten (poisoned) elements */
    assert_int_equal(cmp.lse.nonfinite, 0);
    if (!(cmp.out.cos_sim >= bar.cos_min && cmp.out.rel_l1 <= bar.rel_l1_max && cmp.lse.max_abs <= bar.lse_max))
        fail_msg("%s: accuracy below the bar (cos >= %g, relL1 <= %g, lse <= %g)", c->name, bar.cos_min,
                 bar.rel_l1_max, bar.lse_max);

    if (c->layout == PREDICT && c->structured) {
        /* Pruning that keeps what matters: close to dense attention in the same mode (with the
         * same window), the needle's block kept. */
        qattn_sparse_desc dense_sd = sd;
        dense_sd.layout = QATTN_SPARSE_NO_LAYOUT;
        dense_sd.q_block = dense_sd.k_block = dense_sd.sink_blocks = dense_sd.recent_blocks = dense_sd.last_q_blocks = 0;
        dense_sd.sim_threshold = dense_sd.cdf_threshold = 0.f;
        run_result dense = run_sparse(&desc, &dense_sd, host, NULL, NULL, 0, 0);
        assert_int_equal(dense.status, QATTN_OK);
        ref_metrics dm = {0};
        {
            ref_accum acc = {0};
            for (int64_t e = 0; e < c->b * c->hq * c->nq * D; e++)
                ref_accum_add(&acc, qattn_load_f(got.o, c->in, e), qattn_load_f(dense.o, c->in, e));
            dm = ref_accum_finish(&acc);
        }
        free_result(&dense);
        double density = 0.0;
        for (int64_t i = 0; i < c->b * c->hkv; i++)
            density += got.density[i] / (double)(c->b * c->hkv);
        print_message("  %-34s predicted density %.3f; vs dense %s cos %.6f relL1 %.4f\n", c->name, density,
                      qattn_precision_name(c->prec), dm.cos_sim, dm.rel_l1);
        /* Fresh segments each run: at 2k tokens the kept fraction varies (0.44-0.78 seen), so the bar
         * only asks that the prediction pruned; bench/RESULTS.md has the measured curve. */
        if (!(density < 0.9))
            fail_msg("%s: the prediction kept %.3f of the blocks of structured data", c->name, density);
        if (!(dm.rel_l1 <= 0.05))
            fail_msg("%s: relL1 %.4f against dense attention (bar 0.05)", c->name, dm.rel_l1);
        if (st.needle_key >= 0)
            for (int64_t b = 0; b < c->b; b++)
                for (int64_t h = 0; h < c->hq; h++)
                    if (ref_sparse_visible(&(ref_sparse_mask){.sd = &sd, .nq = c->nq, .nk = c->nk}, b, h, st.needle_query,
                                st.needle_key) && /* the window may hide it: the layout must not */
                        !ref_sparse_visible(&mc, b, h, st.needle_query, st.needle_key))
                        fail_msg("%s: the needle (query %lld, key %lld) of (b %lld, h %lld) was pruned", c->name,
                                 (long long)st.needle_query, (long long)st.needle_key, (long long)b, (long long)h);
    }

    for (int i = 0; i < 3; i++)
        free(host[i]);
    free(kept);
    free(indptr);
    free(indices);
    free_result(&got);
}

/*
 * Skipped keys are never read: K and V of every key that no query of a head
 * may see, in 128-key blocks (no kernel's step is larger), hold NaN, and the
 * finite check is off. A kernel that loaded them would spread the NaN
 * (0 * NaN is NaN) into its outputs.
 */
static void skipped_keys_unread(void **state)
{
    (void)state;
    const int64_t B = 1, Hq = 4, Hkv = 2, N = 1024, D = 64, KB = 128, QB = 128;
    qattn_attention_desc desc = {.q = qattn_tensor_hnd(F16, B, Hq, N, D), .k = qattn_tensor_hnd(F16, B, Hkv, N, D),
                                 .v = qattn_tensor_hnd(F16, B, Hkv, N, D), .o = qattn_tensor_hnd(F16, B, Hq, N, D),
                                 .return_lse = 1, .causal = 1, .precision = EXACT};
    const int64_t rows = B * Hkv * (N / QB), kblocks = N / KB;
    int32_t indptr[17], indices[16 * 8];
    uint8_t kept[16 * 8] = {0}, used[2][8] = {{0}};
    int64_t n = 0;
    indptr[0] = 0;
    for (int64_t r = 0; r < rows; r++) { /* keys blocks 0 and the diagonal; head 1 also block 3 */
        const int64_t hk = r / (N / QB), qb = r % (N / QB);
        for (int64_t kb = 0; kb <= qb; kb++)
            if (kb == 0 || kb == qb || (hk == 1 && kb == 3)) {
                indices[n++] = (int32_t)kb;
                kept[r * kblocks + kb] = used[hk][kb] = 1;
            }
        indptr[r + 1] = (int32_t)n;
    }
    void *host[3];
    const qattn_tensor_desc *in_descs[3] = {&desc.q, &desc.k, &desc.v};
    for (int i = 0; i < 3; i++) {
        host[i] = ref_tensor_alloc(in_descs[i]);
        ref_fill_randn(host[i], in_descs[i], &rng, 1.0, NULL);
    }
    for (int64_t hk = 0; hk < Hkv; hk++)
        for (int64_t j = 0; j < N; j++)
            if (!used[hk][j / KB])
                for (int64_t dd = 0; dd < D; dd++)
                    for (int i = 1; i < 3; i++)
                        qattn_store_f(host[i], F16, (hk * N + j) * D + dd, NAN);
    qattn_sparse_desc sd = {.layout = QATTN_SPARSE_BLOCKS, .q_block = QB, .k_block = KB};
    run_result got = run_sparse(&desc, &sd, host, indptr, indices, n, QATTN_FLAG_NO_FINITE_CHECK);
    if (got.status == QATTN_ERR_UNSUPPORTED) {
        for (int i = 0; i < 3; i++)
            free(host[i]);
        skip_unsupported(&(sp_case){.name = "skipped_keys_unread"}, got.status);
    }
    assert_int_equal(got.status, QATTN_OK);
    qattn_sparse_desc msd = sd;
    ref_sparse_mask mc = {.sd = &msd, .nq = N, .nk = N, .hkv = Hkv, .group = Hq / Hkv, .q_blocks = N / QB,
                   .k_blocks = kblocks, .kept = kept};
    ref_problem rp = {.q = &desc.q, .k = &desc.k, .v = &desc.v, .qd = host[0], .kd = host[1], .vd = host[2],
                      .causal = true, .visible = ref_sparse_visible, .visible_ctx = &mc};
    ref_compare cmp = ref_check(&rp, got.o, &desc.o, got.lse, 0, &rng);
    print_message("  skipped_keys_unread: cos %.7f relL1 %.5f nonfinite %lld\n", cmp.out.cos_sim, cmp.out.rel_l1,
                  (long long)cmp.out.nonfinite);
    assert_int_equal(cmp.out.nonfinite, 0);
    assert_true(cmp.out.cos_sim >= 0.99999 && cmp.out.rel_l1 <= 2e-3);

    /* The window skips too: keys older than every query's window are NaN. */
    for (int i = 0; i < 3; i++)
        ref_fill_randn(host[i], in_descs[i], &rng, 1.0, NULL);
    const int64_t q0 = N - 128, left = 100; /* queries of the last 128 rows, 100 keys back */
    qattn_attention_desc late = desc;
    late.q = qattn_tensor_hnd(F16, B, Hq, N - q0, D);
    late.o = late.q;
    for (int64_t hk = 0; hk < Hkv; hk++)
        for (int64_t j = 0; j < q0 - 128; j++) /* the window reaches back to q0 - 100: spare 128 */
            for (int64_t dd = 0; dd < D; dd++)
                for (int i = 1; i < 3; i++)
                    qattn_store_f(host[i], F16, (hk * N + j) * D + dd, NAN);
    qattn_sparse_desc wd = {.window = 1, .window_left = left, .window_right = -1};
    free_result(&got);
    got = run_sparse(&late, &wd, host, NULL, NULL, 0, QATTN_FLAG_NO_FINITE_CHECK);
    if (got.status == QATTN_ERR_UNSUPPORTED) {
        for (int i = 0; i < 3; i++)
            free(host[i]);
        skip_unsupported(&(sp_case){.name = "skipped_keys_unread (window)"}, got.status);
    }
    assert_int_equal(got.status, QATTN_OK);
    ref_sparse_mask wc = {.sd = &wd, .nq = N - q0, .nk = N, .hkv = Hkv, .group = Hq / Hkv};
    ref_problem wp = {.q = &late.q, .k = &late.k, .v = &late.v, .qd = host[0], .kd = host[1], .vd = host[2],
                      .causal = true, .visible = ref_sparse_visible, .visible_ctx = &wc};
    cmp = ref_check(&wp, got.o, &late.o, got.lse, 0, &rng);
    print_message("  skipped_keys_unread (window): cos %.7f relL1 %.5f nonfinite %lld\n", cmp.out.cos_sim,
                  cmp.out.rel_l1, (long long)cmp.out.nonfinite);
    assert_int_equal(cmp.out.nonfinite, 0);
    assert_true(cmp.out.cos_sim >= 0.99999 && cmp.out.rel_l1 <= 2e-3);
    for (int i = 0; i < 3; i++)
        free(host[i]);
    free_result(&got);
}

/*
 * A window and sinks over a paged cache (decode and chunked prefill, GQA,
 * CSR tables, one and two splits) against an fp64 reference of the cached
 * (fp16-rounded) K and V under the same mask.
 */
static void paged_window(void **state)
{
    (void)state;
    enum { B = 3, HQ = 4, HKV = 2, D = 64, PAGE = 16 };
    const int64_t kv_len[B] = {300, 77, 500}, q_len[B] = {1, 5, 40}, left = 50, sinks = 4;
    int32_t indptr[B + 1] = {0}, last[B], qo[B + 1] = {0};
    int64_t pages = 0, total_q = 0;
    for (int b = 0; b < B; b++) {
        pages += (kv_len[b] + PAGE - 1) / PAGE;
        indptr[b + 1] = (int32_t)pages;
        last[b] = (int32_t)((kv_len[b] - 1) % PAGE + 1);
        total_q += q_len[b];
        qo[b + 1] = (int32_t)total_q;
    }
    const qattn_kv_cache_desc cache = {.num_pages = pages, .page_size = PAGE, .heads_kv = HKV, .head_dim = D,
                                       .dtype = F16, .layout = QATTN_KV_NHD};
    const qattn_sparse_desc sd = {.window = 1, .window_left = left, .window_right = -1, .sink_tokens = sinks};
    { /* a backend without it says so before anything is allocated */
        const qattn_paged_desc probe = {.cache = cache, .table = QATTN_PAGES_CSR, .batch = B,
                                        .max_pages_per_seq = 32, .total_q = total_q, .max_q_len = 40, .heads_q = HQ,
                                        .q_dtype = F16, .q_stride = {HQ * D, D}, .o_stride = {HQ * D, D}};
        qattn_plan *plan = NULL;
        qattn_status st = qattn_paged_sparse_plan_create(ctx, &probe, &sd, &plan);
        qattn_plan_destroy(plan);
        if (st == QATTN_ERR_UNSUPPORTED)
            skip_unsupported(&(sp_case){.name = "paged_window"}, st);
        if (st)
            fail_msg("paged_window: %s: %s", qattn_status_str(st), qattn_last_error(ctx));
    }
    int32_t *indices = malloc((size_t)pages * 4);
    for (int64_t i = 0; i < pages; i++) /* pages out of order: the table decides */
        indices[i] = (int32_t)i;
    for (int64_t i = pages - 1; i > 0; i--) {
        const int64_t j = (int64_t)(ref_rng_uniform(&rng) * (double)(i + 1));
        const int32_t tmp = indices[i];
        indices[i] = indices[j];
        indices[j] = tmp;
    }
    qattn_kv_cache_sizes sizes;
    assert_int_equal(qattn_kv_cache_bytes(ctx, &cache, &sizes), QATTN_OK);
    int64_t tokens = 0;
    for (int b = 0; b < B; b++)
        tokens += kv_len[b];
    float *kv[2] = {malloc((size_t)tokens * HKV * D * 4), malloc((size_t)tokens * HKV * D * 4)};
    int64_t *slots = malloc((size_t)tokens * 8), *first_token = malloc(B * 8);
    for (int64_t t = 0, b = 0; b < B; b++) {
        first_token[b] = t;
        for (int64_t j = 0; j < kv_len[b]; j++, t++) {
            slots[t] = (int64_t)indices[indptr[b] + j / PAGE] * PAGE + j % PAGE;
            for (int64_t e = 0; e < HKV * D; e++)
                for (int i = 0; i < 2; i++) /* the cache holds fp16: the reference reads what it holds */
                    kv[i][t * HKV * D + e] = qattn_round_f16((float)ref_rng_normal(&rng));
        }
    }
    uint16_t *q = malloc((size_t)total_q * HQ * D * 2);
    for (int64_t e = 0; e < total_q * HQ * D; e++)
        qattn_store_f(q, F16, e, (float)ref_rng_normal(&rng));
    qattn_buffer *kc, *vc, *kn, *vn, *sl, *bq, *bo, *blse, *bqo, *bptr, *bidx, *blast;
    const size_t obytes = (size_t)total_q * HQ * D * 2;
    assert_int_equal(qattn_buffer_create(ctx, sizes.cache_bytes, &kc), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, sizes.cache_bytes, &vc), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, (size_t)tokens * HKV * D * 4, &kn), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, (size_t)tokens * HKV * D * 4, &vn), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, (size_t)tokens * 8, &sl), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(kn, 0, kv[0], (size_t)tokens * HKV * D * 4), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(vn, 0, kv[1], (size_t)tokens * HKV * D * 4), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(sl, 0, slots, (size_t)tokens * 8), QATTN_OK);
    qattn_kv_cache_buffers cb = {.k = kc, .v = vc};
    qattn_kv_append_args ap = {.cache = &cache, .buffers = &cb, .num_tokens = tokens, .new_dtype = F32,
                               .new_stride = {HKV * D, D}, .k_new = kn, .v_new = vn, .slot_mapping = sl};
    if (qattn_kv_append(ctx, &ap))
        fail_msg("paged_window: append: %s", qattn_last_error(ctx));
    assert_int_equal(qattn_buffer_create(ctx, (size_t)total_q * HQ * D * 2, &bq), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(bq, 0, q, (size_t)total_q * HQ * D * 2), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, obytes, &bo), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, (size_t)total_q * HQ * 4, &blse), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, sizeof(qo), &bqo), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, sizeof(indptr), &bptr), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, (size_t)pages * 4, &bidx), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, sizeof(last), &blast), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(bqo, 0, qo, sizeof(qo)), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(bptr, 0, indptr, sizeof(indptr)), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(bidx, 0, indices, (size_t)pages * 4), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(blast, 0, last, sizeof(last)), QATTN_OK);
    uint16_t *o = malloc(obytes);
    float *lse = malloc((size_t)total_q * HQ * 4);
    double *row = malloc(D * sizeof(double)), *s = malloc(512 * sizeof(double));
    for (int splits = 1; splits <= 2; splits++) {
        qattn_paged_desc pd = {.cache = cache, .table = QATTN_PAGES_CSR, .batch = B, .max_pages_per_seq = 32,
                               .total_q = total_q, .max_q_len = 40, .heads_q = HQ, .q_dtype = F16,
                               .q_stride = {HQ * D, D}, .o_stride = {HQ * D, D}, .causal = 1, .return_lse = 1,
                               .num_splits = splits};
        qattn_plan *plan = NULL;
        qattn_status st = qattn_paged_sparse_plan_create(ctx, &pd, &sd, &plan);
        if (st)
            fail_msg("paged_window: %s: %s", qattn_status_str(st), qattn_last_error(ctx));
        qattn_buffer *ws = NULL;
        if (qattn_plan_workspace_size(plan))
            assert_int_equal(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws), QATTN_OK);
        assert_int_equal(qattn_buffer_fill(bo, 0, obytes, REF_POISON_BYTE), QATTN_OK);
        qattn_paged_args pa = {.cache = &cb, .q = bq, .o = bo, .lse = blse, .qo_indptr = bqo, .indptr = bptr,
                               .indices = bidx, .last_page_len = blast, .workspace = ws};
        st = qattn_paged_run(plan, &pa);
        if (st)
            fail_msg("paged_window: %s: %s", qattn_status_str(st), qattn_last_error(ctx));
        assert_int_equal(qattn_ctx_synchronize(ctx), QATTN_OK);
        assert_int_equal(qattn_buffer_download(bo, 0, o, obytes), QATTN_OK);
        assert_int_equal(qattn_buffer_download(blse, 0, lse, (size_t)total_q * HQ * 4), QATTN_OK);
        ref_accum acc = {0};
        double lse_err = 0.0;
        for (int b = 0; b < B; b++)
            for (int64_t i = 0; i < q_len[b]; i++)
                for (int64_t h = 0; h < HQ; h++) {
                    const int64_t place = i + kv_len[b] - q_len[b], hk = h / (HQ / HKV), r = qo[b] + i;
                    double m = -INFINITY, l = 0.0;
                    for (int64_t j = 0; j <= place; j++) {
                        s[j] = -INFINITY;
                        if (j < place - left && j >= sinks)
                            continue;
                        double dot = 0.0;
                        for (int64_t d = 0; d < D; d++)
                            dot += qattn_load_f(q, F16, (r * HQ + h) * D + d) *
                                   kv[0][((first_token[b] + j) * HKV + hk) * D + d];
                        s[j] = dot / sqrt((double)D);
                        m = s[j] > m ? s[j] : m;
                    }
                    for (int64_t d = 0; d < D; d++)
                        row[d] = 0.0;
                    for (int64_t j = 0; j <= place; j++) {
                        if (s[j] == -INFINITY)
                            continue;
                        const double w = exp(s[j] - m);
                        l += w;
                        for (int64_t d = 0; d < D; d++)
                            row[d] += w * kv[1][((first_token[b] + j) * HKV + hk) * D + d];
                    }
                    for (int64_t d = 0; d < D; d++)
                        ref_accum_add(&acc, qattn_load_f(o, F16, (r * HQ + h) * D + d), row[d] / l);
                    const double want = m + log(l), diff = fabs(lse[r * HQ + h] - want);
                    lse_err = isfinite(diff) && diff < lse_err ? lse_err : diff;
                }
        ref_metrics mt = ref_accum_finish(&acc);
        print_message("  paged_window (%d split%s): cos %.7f relL1 %.5f max %.2e lse %.2e\n", splits,
                      splits > 1 ? "s" : "", mt.cos_sim, mt.rel_l1, mt.max_abs, lse_err);
        assert_int_equal(mt.nonfinite, 0);
        if (!(mt.cos_sim >= 0.99999 && mt.rel_l1 <= 2e-3 && lse_err <= 1e-3))
            fail_msg("paged_window: accuracy below the bar with %d split(s)", splits);
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
    }
    /* Layouts and the P.V skip are refused on paged plans. */
    qattn_paged_desc pd = {.cache = cache, .table = QATTN_PAGES_CSR, .batch = B, .max_pages_per_seq = 32,
                           .total_q = total_q, .max_q_len = 40, .heads_q = HQ, .q_dtype = F16,
                           .q_stride = {HQ * D, D}, .o_stride = {HQ * D, D}};
    qattn_plan *plan = NULL;
    const qattn_sparse_desc bad = {.layout = QATTN_SPARSE_BLOCKS, .q_block = 64, .k_block = 64};
    assert_int_equal(qattn_paged_sparse_plan_create(ctx, &pd, &bad, &plan), QATTN_ERR_INVALID_ARGUMENT);
    const qattn_sparse_desc bad_pv = {.window = 1, .window_left = 8, .window_right = -1, .pv_threshold = 4.f};
    assert_int_equal(qattn_paged_sparse_plan_create(ctx, &pd, &bad_pv, &plan), QATTN_ERR_INVALID_ARGUMENT);
    assert_null(plan);
    qattn_buffer *all[] = {kc, vc, kn, vn, sl, bq, bo, blse, bqo, bptr, bidx, blast};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    free(kv[0]);
    free(kv[1]);
    free(slots);
    free(first_token);
    free(indices);
    free(q);
    free(o);
    free(lse);
    free(row);
    free(s);
}

/* Refusals: clear errors, outputs untouched. */
static void bad_inputs(void **state)
{
    (void)state;
    const int64_t N = 100, D = 64;
    qattn_attention_desc desc = {.q = qattn_tensor_hnd(F16, 1, 2, N, D), .k = qattn_tensor_hnd(F16, 1, 1, N, D),
                                 .v = qattn_tensor_hnd(F16, 1, 1, N, D), .o = qattn_tensor_hnd(F16, 1, 2, N, D),
                                 .precision = EXACT};
    qattn_plan *plan = NULL;
    const qattn_sparse_desc bad[] = {
        {.window = 0, .window_left = 5},
        {.window = 1, .window_left = -2},
        {.window = 1, .window_right = -5},
        {.window = 1, .sink_tokens = -1},
        {.layout = (qattn_sparse_layout_kind)7},
        {.layout = QATTN_SPARSE_BLOCKS, .q_block = 0, .k_block = 64},
        {.layout = QATTN_SPARSE_BLOCKS, .q_block = 24, .k_block = 64},
        {.layout = QATTN_SPARSE_BLOCKS, .q_block = 64, .k_block = -16},
        {.layout = QATTN_SPARSE_NO_LAYOUT, .q_block = 64},
        {.layout = QATTN_SPARSE_BLOCKS, .q_block = 64, .k_block = 64, .cdf_threshold = 0.9f},
        {.layout = QATTN_SPARSE_PREDICT, .cdf_threshold = 0.f},
        {.layout = QATTN_SPARSE_PREDICT, .cdf_threshold = 1.5f},
        {.layout = QATTN_SPARSE_PREDICT, .cdf_threshold = 0.9f, .topk = 0.5f},
        {.layout = QATTN_SPARSE_PREDICT, .topk = 1.5f},
        {.layout = QATTN_SPARSE_PREDICT, .cdf_threshold = 0.9f, .sim_threshold = 2.f},
        {.layout = QATTN_SPARSE_PREDICT, .cdf_threshold = NAN},
        {.layout = QATTN_SPARSE_PREDICT, .cdf_threshold = 0.9f, .sink_blocks = -1},
        {.layout = QATTN_SPARSE_PREDICT, .cdf_threshold = 0.9f, .last_q_blocks = -1},
        {.layout = QATTN_SPARSE_BLOCKS, .q_block = 64, .k_block = 64, .last_q_blocks = 1},
        {.pv_threshold = -1.f},
        {.pv_threshold = INFINITY},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        qattn_status s = qattn_sparse_plan_create(ctx, &desc, &bad[i], &plan);
        if (s != QATTN_ERR_INVALID_ARGUMENT)
            fail_msg("bad sparse desc %zu: %s (%s), expected QATTN_ERR_INVALID_ARGUMENT", i, qattn_status_str(s),
                     qattn_last_error(ctx));
        assert_null(plan);
        assert_true(strlen(qattn_last_error(ctx)) > 0);
    }

    /* A BLOCKS plan: every bad layout refused, outputs untouched. */
    qattn_sparse_desc sd = {.layout = QATTN_SPARSE_BLOCKS, .q_block = 32, .k_block = 48};
    qattn_status s = qattn_sparse_plan_create(ctx, &desc, &sd, &plan);
    if (s == QATTN_ERR_UNSUPPORTED) {
        skip_unsupported(&(sp_case){.name = "bad_inputs"}, s);
    }
    assert_int_equal(s, QATTN_OK);
    const int64_t rows = qattn_sparse_layout_rows(plan, NULL, NULL); /* 1 x 1 x 4 */
    assert_int_equal(rows, 4);
    const size_t obytes = qattn_tensor_bytes(&desc.o);
    qattn_buffer *q, *k, *v, *o, *ptr, *idx;
    assert_int_equal(qattn_buffer_create(ctx, qattn_tensor_bytes(&desc.q), &q), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, qattn_tensor_bytes(&desc.k), &k), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, qattn_tensor_bytes(&desc.v), &v), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, obytes, &o), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, 64, &ptr), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, 64, &idx), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(q, 0, qattn_tensor_bytes(&desc.q), 0x3c), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(k, 0, qattn_tensor_bytes(&desc.k), 0x3c), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(v, 0, qattn_tensor_bytes(&desc.v), 0x3c), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(o, 0, obytes, 0xab), QATTN_OK);
    qattn_buffer *ws = NULL; /* GPU backends keep the checks' status word there */
    if (qattn_plan_workspace_size(plan))
        assert_int_equal(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws), QATTN_OK);
    qattn_run_args args = {.q = q, .k = k, .v = v, .o = o, .workspace = ws};
    assert_int_equal(qattn_run(plan, &args), QATTN_ERR_INVALID_ARGUMENT); /* needs its layout */
    assert_int_equal(qattn_sparse_run(plan, &args, NULL), QATTN_ERR_INVALID_ARGUMENT);
    const struct {
        int32_t indptr[5], indices[6];
        int64_t count;
    } layouts[] = {
        {{1, 1, 2, 3, 4}, {0, 1, 2, 3}, 4},       /* indptr[0] != 0 */
        {{0, 2, 1, 3, 4}, {0, 1, 2, 0}, 4},       /* indptr decreasing */
        {{0, 1, 2, 3, 4}, {0, 3, 1, 2}, 4},       /* key block 3 of 3 */
        {{0, 2, 2, 3, 4}, {1, 0, 1, 2}, 4},       /* not ascending */
        {{0, 2, 2, 3, 4}, {1, 1, 1, 2}, 4},       /* repeated */
        {{0, 1, 2, 3, 3}, {0, 1, 2, 0}, 4},       /* indptr[rows] != count */
        {{0, 1, 2, 3, 5}, {0, 1, 2, 0, 1}, 4},    /* indptr beyond count */
        {{0, 1, 2, 3, 4}, {0, -1, 2, 0}, 4},      /* negative block */
    };
    for (size_t i = 0; i < sizeof(layouts) / sizeof(layouts[0]); i++) {
        assert_int_equal(qattn_buffer_upload(ptr, 0, layouts[i].indptr, sizeof(layouts[i].indptr)), QATTN_OK);
        assert_int_equal(qattn_buffer_upload(idx, 0, layouts[i].indices, sizeof(layouts[i].indices)), QATTN_OK);
        qattn_sparse_args sa = {.block_indptr = ptr, .block_indices = idx, .block_count = layouts[i].count};
        s = qattn_sparse_run(plan, &args, &sa);
        if (s != QATTN_ERR_INVALID_ARGUMENT)
            fail_msg("bad layout %zu: %s, expected QATTN_ERR_INVALID_ARGUMENT", i, qattn_status_str(s));
        print_message("  bad layout %zu: %s\n", i, qattn_last_error(ctx));
    }
    qattn_sparse_args sa = {.block_indptr = ptr, .block_indices = idx, .block_count = 13}; /* > rows x 3 */
    assert_int_equal(qattn_sparse_run(plan, &args, &sa), QATTN_ERR_INVALID_ARGUMENT);
    sa.block_count = 4;
    sa.block_indptr = NULL;
    assert_int_equal(qattn_sparse_run(plan, &args, &sa), QATTN_ERR_INVALID_ARGUMENT);
    qattn_buffer *small = NULL;
    assert_int_equal(qattn_buffer_create(ctx, 8, &small), QATTN_OK);
    sa.block_indptr = small; /* 5 entries do not fit 8 bytes */
    assert_int_equal(qattn_sparse_run(plan, &args, &sa), QATTN_ERR_INVALID_ARGUMENT);
    sa.block_indptr = o; /* the output aliases the layout */
    assert_int_equal(qattn_sparse_run(plan, &args, &sa), QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "block_indptr"));
    uint8_t *after = malloc(obytes);
    assert_int_equal(qattn_buffer_download(o, 0, after, obytes), QATTN_OK);
    for (size_t i = 0; i < obytes; i++)
        if (after[i] != 0xab)
            fail_msg("a refused run wrote output byte %zu", i);
    free(after);
    int64_t c64 = 0;
    assert_int_equal(qattn_sparse_layout_read(plan, o, 0, NULL, NULL, 0, &c64, NULL), QATTN_ERR_INVALID_ARGUMENT);

    /* A good layout on the same plan runs. */
    const int32_t good_ptr[5] = {0, 1, 2, 3, 4}, good_idx[4] = {0, 1, 2, 0};
    assert_int_equal(qattn_buffer_upload(ptr, 0, good_ptr, sizeof(good_ptr)), QATTN_OK);
    assert_int_equal(qattn_buffer_upload(idx, 0, good_idx, sizeof(good_idx)), QATTN_OK);
    sa = (qattn_sparse_args){.block_indptr = ptr, .block_indices = idx, .block_count = 4};
    assert_int_equal(qattn_sparse_run(plan, &args, &sa), QATTN_OK);
    assert_int_equal(qattn_ctx_synchronize(ctx), QATTN_OK);
    /* A layout for a plan without one. */
    qattn_plan *dense = NULL;
    assert_int_equal(qattn_plan_create(ctx, &desc, &dense), QATTN_OK);
    qattn_buffer *dense_ws = NULL;
    if (qattn_plan_workspace_size(dense))
        assert_int_equal(qattn_buffer_create(ctx, qattn_plan_workspace_size(dense), &dense_ws), QATTN_OK);
    args.workspace = dense_ws;
    assert_int_equal(qattn_sparse_run(dense, &args, &sa), QATTN_ERR_INVALID_ARGUMENT);
    qattn_buffer_destroy(dense_ws);
    assert_int_equal(qattn_sparse_layout_rows(dense, NULL, NULL), 0);
    qattn_plan_destroy(dense);
    qattn_buffer_destroy(small);
    qattn_buffer_destroy(q);
    qattn_buffer_destroy(k);
    qattn_buffer_destroy(v);
    qattn_buffer_destroy(o);
    qattn_buffer_destroy(ptr);
    qattn_buffer_destroy(idx);
    qattn_buffer_destroy(ws);
    qattn_plan_destroy(plan);
}

/* name, b, hq, hkv, nq, nk, d, dtype, causal, precision, window, left, right, sinks, layout, q_block, k_block,
 * keep, structured, pv */
static const sp_case cases[] = {
    /* Structured masks. */
    {"window_causal", 1, 2, 2, 300, 300, 64, F16, 1, EXACT, 1, 64, 0, 0, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_both_sides", 1, 2, 1, 333, 333, 64, F16, 0, EXACT, 1, 50, 70, 0, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_sinks_causal_gqa", 2, 4, 2, 400, 400, 128, BF16, 1, EXACT, 1, 100, -1, 4, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_sinks_nq_lt_nk", 1, 2, 2, 90, 500, 64, F16, 1, EXACT, 1, 120, -1, 16, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_nq_gt_nk_causal", 1, 2, 2, 200, 80, 64, F16, 1, EXACT, 1, 30, -1, 3, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_zero_width_f32", 1, 2, 2, 100, 100, 32, F32, 1, EXACT, 1, 0, 0, 0, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"sinks_only_far_window", 1, 2, 2, 260, 260, 64, F16, 1, EXACT, 1, 10, -1, 40, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_int8_fp16", 1, 4, 2, 500, 500, 128, F16, 1, I8F16, 1, 200, -1, 8, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_int8_fp8", 1, 4, 2, 500, 500, 128, F16, 1, I8F8, 1, 200, -1, 8, NO_LAYOUT, 0, 0, 0, 0, 0},
    {"window_int8_fp8_f16acc", 1, 2, 2, 400, 400, 64, F16, 1, I8F8H, 1, 150, 20, 4, NO_LAYOUT, 0, 0, 0, 0, 0},
    /* User block layouts, sizes down to 16 and not dividing the kernels' tiles. */
    {"blocks_64x64", 1, 2, 2, 300, 300, 64, F16, 0, EXACT, 0, 0, 0, 0, BLOCKS, 64, 64, 0.5, 0, 0},
    {"blocks_16x16_causal", 1, 2, 1, 200, 200, 64, F16, 1, EXACT, 0, 0, 0, 0, BLOCKS, 16, 16, 0.4, 0, 0},
    {"blocks_48x80_gqa", 2, 4, 2, 333, 410, 128, F16, 0, EXACT, 0, 0, 0, 0, BLOCKS, 48, 80, 0.5, 0, 0},
    {"blocks_128x128_causal_bf16", 1, 2, 2, 700, 700, 64, BF16, 1, EXACT, 0, 0, 0, 0, BLOCKS, 128, 128, 0.6, 0, 0},
    {"blocks_sparse_empty_rows", 1, 2, 2, 256, 256, 64, F16, 0, EXACT, 0, 0, 0, 0, BLOCKS, 32, 64, 0.15, 0, 0},
    {"blocks_window_sinks_causal", 1, 4, 2, 500, 600, 64, F16, 1, EXACT, 1, 150, -1, 8, BLOCKS, 64, 32, 0.5, 0, 0},
    {"blocks_int8_fp16", 1, 4, 2, 400, 400, 128, F16, 1, I8F16, 0, 0, 0, 0, BLOCKS, 64, 64, 0.5, 0, 0},
    {"blocks_int8_fp8", 1, 4, 2, 400, 400, 128, F16, 0, I8F8, 0, 0, 0, 0, BLOCKS, 128, 64, 0.5, 0, 0},
    {"blocks_int8_fp8_f16acc_causal", 1, 2, 2, 300, 300, 64, F16, 1, I8F8H, 0, 0, 0, 0, BLOCKS, 32, 96, 0.6, 0, 0},
    /* Predicted layouts on structured data, every mode. */
    {"predict_exact", 1, 4, 2, 2048, 2048, 64, F16, 1, EXACT, 0, 0, 0, 0, PREDICT, 128, 64, 0, 1, 0},
    {"predict_exact_full", 1, 2, 2, 1536, 1536, 64, F16, 0, EXACT, 0, 0, 0, 0, PREDICT, 64, 64, 0, 1, 0},
    {"predict_int8_fp8", 1, 4, 2, 2048, 2048, 64, F16, 1, I8F8, 0, 0, 0, 0, PREDICT, 128, 64, 0, 1, 0},
    {"predict_int8_fp16_window", 1, 2, 1, 2048, 2048, 64, F16, 1, I8F16, 1, 1024, -1, 16, PREDICT, 128, 64, 0, 1, 0},
    {"predict_int8_fp8_f16acc", 1, 2, 2, 2048, 2048, 64, BF16, 1, I8F8H, 0, 0, 0, 0, PREDICT, 64, 64, 0, 1, 0},
    /* The P.V skip. */
    {"pv_skip_exact", 1, 2, 2, 1024, 1024, 64, F16, 1, EXACT, 0, 0, 0, 0, NO_LAYOUT, 0, 0, 0, 1, 8.f},
    {"pv_skip_blocks_int8_fp8", 1, 2, 2, 512, 512, 64, F16, 1, I8F8, 0, 0, 0, 0, BLOCKS, 64, 64, 0.7, 1, 8.f},
};

int main(int argc, char **argv)
{
    int early = ref_backend_context(argc, argv, "test_sparse", &ctx);
    if (early >= 0)
        return early;
    backend_name = argv[1];
    qattn_device_info dev;
    qattn_ctx_device_info(ctx, &dev);
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("sparse attention on backend %s, device %s, seed %llu (QATTN_TEST_SEED repeats it)\n", backend_name,
           dev.name, (unsigned long long)seed);
    const char *filter = getenv("QATTN_TEST_FILTER");
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    enum { NCASES = sizeof(cases) / sizeof(cases[0]) };
    struct CMUnitTest tests[NCASES + 3];
    for (int i = 0; i < NCASES; i++)
        tests[i] = (struct CMUnitTest){cases[i].name, run_case, NULL, NULL, (void *)&cases[i]};
    tests[NCASES] = (struct CMUnitTest){"skipped_keys_unread", skipped_keys_unread, NULL, NULL, NULL};
    tests[NCASES + 1] = (struct CMUnitTest){"bad_inputs", bad_inputs, NULL, NULL, NULL};
    tests[NCASES + 2] = (struct CMUnitTest){"paged_window", paged_window, NULL, NULL, NULL};
    int failed = _cmocka_run_group_tests(backend_name, tests, NCASES + 3, NULL, NULL);
    qattn_ctx_destroy(ctx);
    return failed ? 1 : 0;
}
