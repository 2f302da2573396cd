/*
 * Paged attention conformance, one source for every backend
 * (`test_paged <backend>`; exit 77 when the backend is not usable here).
 *
 * Each case fills a KV cache through qattn_kv_append with pages handed out in
 * random order, reads the cache back, checks the stored codes against the
 * appended values (format tolerance), and checks paged attention against an
 * fp64 reference over the gathered, dequantized sequence (so the attention
 * math is held tightly whatever the page format), plus against the original
 * values (the format's own error). Split-KV, both table encodings, ragged
 * lengths (1, not multiples of the page size), GQA, causal prefill and the
 * merge API are covered; so are bad inputs.
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

#define MAX_B 8

typedef struct paged_case {
    const char *name;
    int64_t page_size, heads_q, heads_kv, head_dim;
    qattn_dtype dtype;
    qattn_kv_layout layout;
    qattn_kv_scales scales;
    qattn_page_table_kind table;
    int causal;
    int num_splits;
    int64_t batch;
    int64_t kv_len[MAX_B];
    int64_t q_len[MAX_B];
} paged_case;

#define assert_ok(call)                                                                                                \
    do {                                                                                                               \
        qattn_status s_ = (call);                                                                                      \
        if (s_ != QATTN_OK)                                                                                            \
            fail_msg("%s: %s: %s", #call, qattn_status_str(s_), qattn_last_error(ctx));                               \
    } while (0)

/* Skips the calling case, before it allocates anything, when the backend does
 * not implement the paged KV cache (QATTN_ERR_UNSUPPORTED with a message). */
static void skip_unless_paged(const char *what)
{
    qattn_paged_desc probe = {.cache = {.num_pages = 1, .page_size = 16, .heads_kv = 1, .head_dim = 64,
                                        .dtype = QATTN_DTYPE_F16},
                              .batch = 1, .max_pages_per_seq = 1, .total_q = 1, .max_q_len = 1, .heads_q = 1,
                              .q_dtype = QATTN_DTYPE_F16, .q_stride = {64, 64}, .o_stride = {64, 64}};
    qattn_plan *plan = NULL;
    qattn_status s = qattn_paged_plan_create(ctx, &probe, &plan);
    qattn_plan_destroy(plan);
    if (s == QATTN_ERR_UNSUPPORTED && strcmp(backend_name, "cpu") != 0) {
        print_message("[  SKIP    ] %s: unsupported on %s: %s\n", what, backend_name, qattn_last_error(ctx));
        skip();
    }
}

static qattn_buffer *upload(const void *data, size_t bytes)
{
    qattn_buffer *b = NULL;
    assert_ok(qattn_buffer_create(ctx, bytes ? bytes : 4, &b));
    if (bytes)
        assert_ok(qattn_buffer_upload(b, 0, data, bytes));
    return b;
}

/* Stored value of (page, offset, head, d), dequantized as the format defines. */
static double cache_value(const paged_case *c, const uint8_t *cache, const float *scales, int64_t page, int64_t off,
                          int64_t h, int64_t d)
{
    const qattn_kv_cache_desc desc = {.page_size = c->page_size, .heads_kv = c->heads_kv, .head_dim = c->head_dim,
                                      .dtype = c->dtype, .layout = c->layout, .scales = c->scales};
    return ref_kv_value(&desc, cache, scales, page, off, h, d);
}

static void run_paged_case(void **state)
{
    const paged_case *c = *state;
    skip_unless_paged(c->name);
    const int64_t B = c->batch, Hq = c->heads_q, Hkv = c->heads_kv, D = c->head_dim, P = c->page_size;
    int64_t pages_of[MAX_B], total_pages = 0, total_tokens = 0, total_q = 0, max_pages = 1, max_q = 1;
    int32_t qo_indptr[MAX_B + 1] = {0};
    for (int64_t b = 0; b < B; b++) {
        pages_of[b] = (c->kv_len[b] + P - 1) / P;
        total_pages += pages_of[b];
        total_tokens += c->kv_len[b];
        max_pages = pages_of[b] > max_pages ? pages_of[b] : max_pages;
        max_q = c->q_len[b] > max_q ? c->q_len[b] : max_q;
        qo_indptr[b + 1] = (int32_t)(qo_indptr[b] + c->q_len[b]);
        total_q += c->q_len[b];
    }
    const int64_t num_pages = total_pages + 5; /* a few pages nobody uses */
    qattn_kv_cache_desc cache = {.num_pages = num_pages, .page_size = P, .heads_kv = Hkv, .head_dim = D,
                                 .dtype = c->dtype, .layout = c->layout, .scales = c->scales};
    qattn_kv_cache_sizes sizes;
    assert_ok(qattn_kv_cache_bytes(ctx, &cache, &sizes));

    /* Pages in random order: take them all from the pool, shuffle, hand out. */
    qattn_page_pool *pool = NULL;
    assert_ok(qattn_page_pool_create(num_pages, &pool));
    int32_t *all = malloc((size_t)num_pages * sizeof(int32_t));
    assert_ok(qattn_page_pool_alloc(pool, num_pages, all));
    assert_int_equal(qattn_page_pool_free_count(pool), 0);
    for (int64_t i = num_pages - 1; i > 0; i--) {
        int64_t j = (int64_t)(ref_rng_uniform(&rng) * (double)(i + 1));
        int32_t t = all[i];
        all[i] = all[j];
        all[j] = t;
    }
    const int32_t *seq_pages[MAX_B];
    int64_t at = 0;
    for (int64_t b = 0; b < B; b++) {
        seq_pages[b] = all + at;
        at += pages_of[b];
    }
    int32_t *block_table = malloc((size_t)(B * max_pages) * sizeof(int32_t));
    int32_t indptr[MAX_B + 1];
    int32_t *indices = malloc((size_t)(total_pages + 1) * sizeof(int32_t));
    assert_ok(qattn_page_tables_build(B, seq_pages, pages_of, max_pages, block_table, indptr, indices));
    int32_t seq_lens[MAX_B], last_page_len[MAX_B];
    for (int64_t b = 0; b < B; b++) {
        seq_lens[b] = (int32_t)c->kv_len[b];
        last_page_len[b] = (int32_t)(c->kv_len[b] - (pages_of[b] - 1) * P);
    }

    /* New tokens: K with a per-channel bias (as real keys have), V plain. */
    float *k_new = malloc((size_t)(total_tokens * Hkv * D) * sizeof(float));
    float *v_new = malloc((size_t)(total_tokens * Hkv * D) * sizeof(float));
    int64_t *slots = malloc((size_t)total_tokens * sizeof(int64_t));
    double bias[256];
    for (int64_t d = 0; d < D; d++)
        bias[d] = 2.0 * ref_rng_normal(&rng);
    int64_t tok = 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < c->kv_len[b]; t++, tok++) {
            slots[tok] = (int64_t)seq_pages[b][t / P] * P + t % P;
            for (int64_t e = 0; e < Hkv * D; e++) {
                k_new[tok * Hkv * D + e] = (float)(ref_rng_normal(&rng) + bias[e % D]);
                v_new[tok * Hkv * D + e] = (float)ref_rng_normal(&rng);
            }
        }
    /* Static per-head scales, as an engine would calibrate them. */
    float k_scale_h[64], v_scale_h[64];
    for (int64_t h = 0; h < Hkv; h++) {
        float ka = 0, va = 0;
        for (int64_t t = 0; t < total_tokens; t++)
            for (int64_t d = 0; d < D; d++) {
                ka = fmaxf(ka, fabsf(k_new[(t * Hkv + h) * D + d]));
                va = fmaxf(va, fabsf(v_new[(t * Hkv + h) * D + d]));
            }
        float qmax = c->dtype == QATTN_DTYPE_FP8_E4M3 ? 448.f : 127.f;
        k_scale_h[h] = ka / qmax;
        v_scale_h[h] = va / qmax;
    }

    qattn_kv_cache_buffers bufs = {0};
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.k));
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.v));
    assert_ok(qattn_buffer_fill(bufs.k, 0, sizes.cache_bytes, 0x7f)); /* unused pages hold garbage */
    assert_ok(qattn_buffer_fill(bufs.v, 0, sizes.cache_bytes, 0x7f));
    if (c->scales != QATTN_KV_SCALES_NONE) {
        assert_ok(qattn_buffer_create(ctx, sizes.scale_bytes, &bufs.k_scale));
        assert_ok(qattn_buffer_create(ctx, sizes.scale_bytes, &bufs.v_scale));
        /* per-row scales of unused slots hold garbage too (and the download below reads them all) */
        assert_ok(qattn_buffer_fill(bufs.k_scale, 0, sizes.scale_bytes, 0x7f));
        assert_ok(qattn_buffer_fill(bufs.v_scale, 0, sizes.scale_bytes, 0x7f));
        if (c->scales == QATTN_KV_SCALES_PER_HEAD) {
            assert_ok(qattn_buffer_upload(bufs.k_scale, 0, k_scale_h, (size_t)Hkv * 4));
            assert_ok(qattn_buffer_upload(bufs.v_scale, 0, v_scale_h, (size_t)Hkv * 4));
        }
    }
    /* Two appends: most tokens, then the rest (the usual prefill-then-decode rhythm). */
    qattn_buffer *kb = upload(k_new, (size_t)(total_tokens * Hkv * D) * 4);
    qattn_buffer *vb = upload(v_new, (size_t)(total_tokens * Hkv * D) * 4);
    qattn_buffer *sb = upload(slots, (size_t)total_tokens * 8);
    int64_t first = total_tokens - total_tokens / 4;
    qattn_kv_append_args app = {.cache = &cache, .buffers = &bufs, .num_tokens = first,
                                .new_dtype = QATTN_DTYPE_F32, .new_stride = {Hkv * D, D},
                                .k_new = kb, .v_new = vb, .slot_mapping = sb};
    assert_ok(qattn_kv_append(ctx, &app));
    app.num_tokens = total_tokens - first;
    app.k_new_offset = app.v_new_offset = (size_t)(first * Hkv * D) * 4;
    app.slot_mapping_offset = (size_t)first * 8;
    assert_ok(qattn_kv_append(ctx, &app));

    /* Read the cache back; check the stored values against what was appended. */
    uint8_t *kc = malloc(sizes.cache_bytes), *vc = malloc(sizes.cache_bytes);
    float *ks = NULL, *vs = NULL;
    assert_ok(qattn_buffer_download(bufs.k, 0, kc, sizes.cache_bytes));
    assert_ok(qattn_buffer_download(bufs.v, 0, vc, sizes.cache_bytes));
    if (c->scales != QATTN_KV_SCALES_NONE) {
        ks = malloc(sizes.scale_bytes);
        vs = malloc(sizes.scale_bytes);
        assert_ok(qattn_buffer_download(bufs.k_scale, 0, ks, sizes.scale_bytes));
        assert_ok(qattn_buffer_download(bufs.v_scale, 0, vs, sizes.scale_bytes));
    }
    /* Gathered, dequantized K/V per sequence: [B][Hkv][kv_len][D] as f32 HND tensors. */
    float *gk[MAX_B], *gv[MAX_B];
    ref_accum k_fmt = {0}, v_fmt = {0};
    tok = 0;
    for (int64_t b = 0; b < B; b++) {
        gk[b] = malloc((size_t)(Hkv * (c->kv_len[b] + 1) * D) * 4);
        gv[b] = malloc((size_t)(Hkv * (c->kv_len[b] + 1) * D) * 4);
        for (int64_t t = 0; t < c->kv_len[b]; t++, tok++)
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t d = 0; d < D; d++) {
                    int64_t page = seq_pages[b][t / P], off = t % P;
                    double kq = cache_value(c, kc, ks, page, off, h, d), vq = cache_value(c, vc, vs, page, off, h, d);
                    gk[b][(h * c->kv_len[b] + t) * D + d] = (float)kq;
                    gv[b][(h * c->kv_len[b] + t) * D + d] = (float)vq;
                    ref_accum_add(&k_fmt, kq, k_new[(tok * Hkv + h) * D + d]);
                    ref_accum_add(&v_fmt, vq, v_new[(tok * Hkv + h) * D + d]);
                }
    }
    ref_metrics km = ref_accum_finish(&k_fmt), vm = ref_accum_finish(&v_fmt);
    double fmt_bar = c->dtype == QATTN_DTYPE_F16 ? 1e-3 : c->dtype == QATTN_DTYPE_BF16 ? 6e-3 : 0.05;
    print_message("  %-30s stored K relL1 %.2e, V relL1 %.2e\n", c->name, km.rel_l1, vm.rel_l1);
    assert_true(km.rel_l1 <= fmt_bar && vm.rel_l1 <= fmt_bar);

    /* Queries [total_q, Hq, D] f16. */
    qattn_tensor_desc qd = qattn_tensor_nhd(QATTN_DTYPE_F16, 1, Hq, total_q, D);
    void *q = ref_tensor_alloc(&qd);
    ref_fill_randn(q, &qd, &rng, 1.0, NULL);
    qattn_paged_desc pd = {.cache = cache, .table = c->table, .batch = B, .max_pages_per_seq = max_pages,
                           .total_q = total_q, .max_q_len = max_q, .heads_q = Hq, .q_dtype = QATTN_DTYPE_F16,
                           .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = c->causal, .return_lse = 1,
                           .num_splits = c->num_splits};
    qattn_plan *plan = NULL;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    qattn_plan_info info;
    assert_ok(qattn_plan_get_info(plan, &info));
    size_t obytes = qattn_tensor_bytes(&qd), lse_bytes = (size_t)(total_q * Hq) * 4;
    qattn_buffer *qb = upload(q, obytes), *ob = NULL, *lb = NULL, *ws = NULL;
    assert_ok(qattn_buffer_create(ctx, obytes, &ob));
    assert_ok(qattn_buffer_create(ctx, lse_bytes, &lb));
    assert_ok(qattn_buffer_fill(ob, 0, obytes, REF_POISON_BYTE));
    assert_ok(qattn_buffer_fill(lb, 0, lse_bytes, REF_POISON_BYTE));
    if (qattn_plan_workspace_size(plan))
        assert_ok(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws));
    qattn_buffer *qo_b = upload(qo_indptr, (size_t)(B + 1) * 4);
    qattn_buffer *bt_b = upload(block_table, (size_t)(B * max_pages) * 4), *sl_b = upload(seq_lens, (size_t)B * 4);
    qattn_buffer *ip_b = upload(indptr, (size_t)(B + 1) * 4), *ix_b = upload(indices, (size_t)(total_pages + 1) * 4);
    qattn_buffer *lp_b = upload(last_page_len, (size_t)B * 4);
    qattn_paged_args args = {.cache = &bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = qo_b, .workspace = ws};
    if (c->table == QATTN_PAGES_DENSE) {
        args.block_table = bt_b;
        args.seq_lens = sl_b;
    } else {
        args.indptr = ip_b;
        args.indices = ix_b;
        args.last_page_len = lp_b;
    }
    assert_ok(qattn_paged_run(plan, &args));
    assert_ok(qattn_ctx_synchronize(ctx));
    void *o = malloc(obytes);
    float *lse = malloc(lse_bytes);
    assert_ok(qattn_buffer_download(ob, 0, o, obytes));
    assert_ok(qattn_buffer_download(lb, 0, lse, lse_bytes));

    /* fp64 reference per sequence: over the stored values (tight) and the appended ones (format error). */
    ref_accum tight = {0}, tight_lse = {0}, loose = {0};
    double *row = malloc((size_t)D * sizeof(double));
    tok = 0;
    for (int64_t b = 0; b < B; b++) {
        qattn_tensor_desc kd = qattn_tensor_hnd(QATTN_DTYPE_F32, 1, Hkv, c->kv_len[b] ? c->kv_len[b] : 1, D);
        qattn_tensor_desc qs = {.dtype = QATTN_DTYPE_F16, .shape = {1, Hq, c->q_len[b], D},
                                .stride = {1, D, Hq * D, 1}};
        const char *qb0 = (const char *)q + (size_t)qo_indptr[b] * Hq * D * 2;
        /* original values in HND for the loose check */
        float *ok = malloc((size_t)(Hkv * (c->kv_len[b] + 1) * D) * 4), *ov = malloc((size_t)(Hkv * (c->kv_len[b] + 1) * D) * 4);
        for (int64_t t = 0; t < c->kv_len[b]; t++)
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t d = 0; d < D; d++) {
                    ok[(h * c->kv_len[b] + t) * D + d] = k_new[((tok + t) * Hkv + h) * D + d];
                    ov[(h * c->kv_len[b] + t) * D + d] = v_new[((tok + t) * Hkv + h) * D + d];
                }
        tok += c->kv_len[b];
        for (int pass = 0; pass < 2; pass++) {
            ref_problem rp = {.q = &qs, .k = &kd, .v = &kd, .qd = qb0, .kd = pass ? ok : gk[b],
                              .vd = pass ? ov : gv[b], .causal = c->causal != 0};
            if (c->kv_len[b] == 0) { /* no cached tokens: zeros and LSE -inf */
                for (int64_t r = qo_indptr[b]; r < qo_indptr[b + 1] && !pass; r++)
                    for (int64_t h = 0; h < Hq; h++) {
                        for (int64_t d = 0; d < D; d++)
                            assert_int_equal(((uint16_t *)o)[(r * Hq + h) * D + d] & 0x7fff, 0);
                        assert_true(isinf(lse[r * Hq + h]) && lse[r * Hq + h] < 0);
                    }
                continue;
            }
            for (int64_t h = 0; h < Hq; h++)
                for (int64_t i = 0; i < c->q_len[b]; i++) {
                    double l;
                    ref_attention_row(&rp, 0, h, i, row, &l);
                    int64_t r = qo_indptr[b] + i;
                    for (int64_t d = 0; d < D; d++)
                        ref_accum_add(pass ? &loose : &tight, qattn_f16_to_f32(((uint16_t *)o)[(r * Hq + h) * D + d]),
                                      row[d]);
                    if (!pass) {
                        double got = lse[r * Hq + h];
                        ref_accum_add(&tight_lse, isinf(l) ? (isinf(got) && got < 0 ? 0.0 : NAN) : got,
                                      isinf(l) ? 0.0 : l);
                    }
                }
        }
        free(ok);
        free(ov);
    }
    ref_metrics tm = ref_accum_finish(&tight), tl = ref_accum_finish(&tight_lse), lm = ref_accum_finish(&loose);
    print_message("  %-30s %-24s splits %d: vs stored cos %.7f relL1 %.2e lse %.2e | vs appended cos %.6f relL1 "
                  "%.4f\n",
                  c->name, info.kernel, info.kv_tile ? (int)((max_pages * P + info.kv_tile - 1) / info.kv_tile) : 1,
                  tm.cos_sim, tm.rel_l1, tl.max_abs, lm.cos_sim, lm.rel_l1);
    assert_int_equal(tm.nonfinite, 0);
    assert_true(tm.cos_sim >= 0.99999 && tm.rel_l1 <= 2e-3 && tl.max_abs <= 1e-3);
    /* The page format's own error against the appended values: a sanity bar
     * that a wrong scale or page layout falls far below. E4M3 keeps 3 mantissa
     * bits (2.3% relative L1 per stored value, checked above) and these keys
     * carry per-channel offsets, so score errors grow with |k|: typical cosines
     * are 0.996-0.999, and a decode case has few output rows to average over. */
    double loose_cos = c->dtype == QATTN_DTYPE_FP8_E4M3 ? 0.99 : c->dtype == QATTN_DTYPE_I8 ? 0.998 : 0.9999;
    assert_true(lm.cos_sim >= loose_cos);

    qattn_buffer *to_free[] = {kb, vb, sb, qb, ob, lb, ws, qo_b, bt_b, sl_b, ip_b, ix_b, lp_b,
                               bufs.k, bufs.v, bufs.k_scale, bufs.v_scale};
    for (size_t i = 0; i < sizeof(to_free) / sizeof(to_free[0]); i++)
        qattn_buffer_destroy(to_free[i]);
    qattn_plan_destroy(plan);
    assert_ok(qattn_page_pool_free(pool, num_pages, all));
    assert_int_equal(qattn_page_pool_free_count(pool), num_pages);
    qattn_page_pool_destroy(pool);
    for (int64_t b = 0; b < B; b++) {
        free(gk[b]);
        free(gv[b]);
    }
    void *heap[] = {all, block_table, indices, k_new, v_new, slots, kc, vc, ks, vs, q, o, lse, row};
    for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
        free(heap[i]);
}

/* merge_states against attention over the union of disjoint key sets, with
 * an empty state (-inf) that must be ignored whatever its values. */
static void merge_states_case(void **state)
{
    (void)state;
    {
        /* probe: one state, one row, before allocating anything */
        qattn_merge_desc probe = {.num_states = 1, .rows = 1, .heads = 1, .head_dim = 16, .v_dtype = QATTN_DTYPE_F32,
                                  .o_dtype = QATTN_DTYPE_F32, .v_stride = {16, 16, 16}, .s_stride = {1, 1, 1},
                                  .o_stride = {16, 16}};
        float v[16] = {0}, lse[1] = {0};
        qattn_buffer *vb = upload(v, sizeof(v)), *sb = upload(lse, sizeof(lse)), *ob = upload(v, sizeof(v));
        qattn_merge_args pa = {.v = vb, .s = sb, .o = ob};
        qattn_status ps = qattn_merge_states(ctx, &probe, &pa);
        qattn_ctx_synchronize(ctx);
        qattn_buffer_destroy(vb);
        qattn_buffer_destroy(sb);
        qattn_buffer_destroy(ob);
        if (ps == QATTN_ERR_UNSUPPORTED && strcmp(backend_name, "cpu") != 0) {
            print_message("[  SKIP    ] merge: %s\n", qattn_last_error(ctx));
            skip();
        }
    }
    const int64_t S = 3, R = 5, H = 4, D = 64, N = 90;
    qattn_tensor_desc qd = qattn_tensor_hnd(QATTN_DTYPE_F32, 1, H, R, D);
    qattn_tensor_desc kd = qattn_tensor_hnd(QATTN_DTYPE_F32, 1, H, N, D);
    float *q = ref_tensor_alloc(&qd), *k = ref_tensor_alloc(&kd), *v = ref_tensor_alloc(&kd);
    ref_fill_randn(q, &qd, &rng, 1.0, NULL);
    ref_fill_randn(k, &kd, &rng, 1.0, NULL);
    ref_fill_randn(v, &kd, &rng, 1.0, NULL);
    /* states [S, R, H, D] and lse [S, R, H] from fp64 attention over key thirds; state 2 empty */
    float *states = malloc((size_t)(S * R * H * D) * 4), *lses = malloc((size_t)(S * R * H) * 4);
    double *row = malloc((size_t)D * sizeof(double));
    for (int64_t s = 0; s < S; s++)
        for (int64_t r = 0; r < R; r++)
            for (int64_t h = 0; h < H; h++) {
                float *dst = states + ((s * R + r) * H + h) * D;
                if (s == 2) {
                    for (int64_t d = 0; d < D; d++)
                        dst[d] = 1e30f; /* garbage the merge must not touch */
                    lses[(s * R + r) * H + h] = -INFINITY;
                    continue;
                }
                int64_t k0 = s * N / 2, k1 = (s + 1) * N / 2;
                qattn_tensor_desc ks = {.dtype = QATTN_DTYPE_F32, .shape = {1, H, k1 - k0, D}, .stride = {H * N * D, N * D, D, 1}};
                ref_problem rp = {.q = &qd, .k = &ks, .v = &ks, .qd = q, .kd = k + k0 * D, .vd = v + k0 * D};
                double l;
                ref_attention_row(&rp, 0, h, r, row, &l);
                for (int64_t d = 0; d < D; d++)
                    dst[d] = (float)row[d];
                lses[(s * R + r) * H + h] = (float)l;
            }
    qattn_buffer *vb = upload(states, (size_t)(S * R * H * D) * 4), *sb = upload(lses, (size_t)(S * R * H) * 4);
    qattn_buffer *ob = NULL, *lb = NULL;
    assert_ok(qattn_buffer_create(ctx, (size_t)(R * H * D) * 2, &ob));
    assert_ok(qattn_buffer_create(ctx, (size_t)(R * H) * 4, &lb));
    qattn_merge_desc md = {.num_states = S, .rows = R, .heads = H, .head_dim = D, .v_dtype = QATTN_DTYPE_F32,
                           .o_dtype = QATTN_DTYPE_F16, .v_stride = {R * H * D, H * D, D},
                           .s_stride = {R * H, H, 1}, .o_stride = {H * D, D}};
    qattn_merge_args ma = {.v = vb, .s = sb, .o = ob, .lse = lb};
    assert_ok(qattn_merge_states(ctx, &md, &ma));
    assert_ok(qattn_ctx_synchronize(ctx));
    uint16_t *o = malloc((size_t)(R * H * D) * 2);
    float *lse = malloc((size_t)(R * H) * 4);
    assert_ok(qattn_buffer_download(ob, 0, o, (size_t)(R * H * D) * 2));
    assert_ok(qattn_buffer_download(lb, 0, lse, (size_t)(R * H) * 4));
    ref_accum acc = {0}, lacc = {0};
    ref_problem full = {.q = &qd, .k = &kd, .v = &kd, .qd = q, .kd = k, .vd = v};
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < H; h++) {
            double l;
            ref_attention_row(&full, 0, h, r, row, &l);
            for (int64_t d = 0; d < D; d++)
                ref_accum_add(&acc, qattn_f16_to_f32(o[(r * H + h) * D + d]), row[d]);
            ref_accum_add(&lacc, lse[r * H + h], l);
        }
    ref_metrics m = ref_accum_finish(&acc), ml = ref_accum_finish(&lacc);
    print_message("  merge_states: cos %.7f relL1 %.2e lse max %.2e\n", m.cos_sim, m.rel_l1, ml.max_abs);
    assert_true(m.cos_sim >= 0.99999 && m.rel_l1 <= 2e-3 && ml.max_abs <= 1e-4);

    /* Every state empty: zeros and -inf. */
    for (int64_t i = 0; i < S * R * H; i++)
        lses[i] = -INFINITY;
    assert_ok(qattn_buffer_upload(sb, 0, lses, (size_t)(S * R * H) * 4));
    assert_ok(qattn_merge_states(ctx, &md, &ma));
    assert_ok(qattn_ctx_synchronize(ctx));
    assert_ok(qattn_buffer_download(ob, 0, o, (size_t)(R * H * D) * 2));
    assert_ok(qattn_buffer_download(lb, 0, lse, (size_t)(R * H) * 4));
    for (int64_t i = 0; i < R * H * D; i++)
        assert_int_equal(o[i] & 0x7fff, 0);
    for (int64_t i = 0; i < R * H; i++)
        assert_true(isinf(lse[i]) && lse[i] < 0);

    /* Bad descriptions. */
    md.head_dim = 0;
    assert_int_equal(qattn_merge_states(ctx, &md, &ma), QATTN_ERR_INVALID_ARGUMENT);
    md.head_dim = D;
    md.v_dtype = QATTN_DTYPE_I8;
    assert_int_equal(qattn_merge_states(ctx, &md, &ma), QATTN_ERR_INVALID_ARGUMENT);
    md.v_dtype = QATTN_DTYPE_F32;
    ma.o = vb;
    assert_int_equal(qattn_merge_states(ctx, &md, &ma), QATTN_ERR_INVALID_ARGUMENT);

    qattn_buffer_destroy(vb);
    qattn_buffer_destroy(sb);
    qattn_buffer_destroy(ob);
    qattn_buffer_destroy(lb);
    void *heap[] = {q, k, v, states, lses, row, o, lse};
    for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
        free(heap[i]);
}

/* The aliasing rule: no output of a call may share a byte with its inputs or
 * index tables, whether through one buffer or two that wrap the same memory.
 * A refused call names both arguments and writes nothing. */
static void aliasing_case(void **state)
{
    (void)state;
    skip_unless_paged("aliasing");
    enum { P = 16, H = 2, D = 64, pages = 4 };
    qattn_kv_cache_desc cache = {.num_pages = pages, .page_size = P, .heads_kv = H, .head_dim = D,
                                 .dtype = QATTN_DTYPE_F16};
    qattn_kv_cache_sizes sizes;
    assert_ok(qattn_kv_cache_bytes(ctx, &cache, &sizes));
    qattn_kv_cache_buffers bufs = {0};
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.k));
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.v));
    assert_ok(qattn_buffer_fill(bufs.k, 0, sizes.cache_bytes, 0));
    assert_ok(qattn_buffer_fill(bufs.v, 0, sizes.cache_bytes, 0));
    qattn_paged_desc pd = {.cache = cache, .table = QATTN_PAGES_DENSE, .batch = 1, .max_pages_per_seq = 2,
                           .total_q = 1, .max_q_len = 1, .heads_q = H, .q_dtype = QATTN_DTYPE_F16,
                           .q_stride = {H * D, D}, .o_stride = {H * D, D}, .num_splits = 1};
    qattn_plan *plan = NULL;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    const size_t q_bytes = (size_t)(H * D) * 2;
    /* One buffer that holds both the index tables and room for the output: a
     * run that took it as o would overwrite its own page table. */
    int32_t tables[2 * 64] = {0, 1, 0, 1, 20}; /* qo_indptr {0, 1}; block_table {0, 1}; seq_lens {20} */
    uint16_t qh[2 * 64];
    for (int i = 0; i < 2 * 64; i++)
        qh[i] = qattn_f32_to_f16((float)ref_rng_normal(&rng));
    qattn_buffer *shared = upload(tables, sizeof(tables)), *qb = upload(qh, sizeof(qh)), *ws = NULL;
    if (qattn_plan_workspace_size(plan))
        assert_ok(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws));
    qattn_paged_args pa = {.cache = &bufs, .q = qb, .o = shared, .qo_indptr = shared, .block_table = shared,
                           .seq_lens = shared, .workspace = ws};
    /* The tables are read at offset 0 of their buffers: put them in three. */
    qattn_buffer *qo = upload(tables, 8), *bt = upload(tables + 2, 8), *sl = upload(tables + 4, 4);
    const struct {
        const char *name;
        qattn_buffer **slot;
    } tabs[3] = {{"qo_indptr", &pa.qo_indptr}, {"block_table", &pa.block_table}, {"seq_lens", &pa.seq_lens}};
    for (int victim = 0; victim < 3; victim++) {
        pa.qo_indptr = qo;
        pa.block_table = bt;
        pa.seq_lens = sl;
        *tabs[victim].slot = shared; /* the table at offset 0 of the buffer o writes */
        const int32_t *src = victim == 0 ? tables : victim == 1 ? tables + 2 : tables + 4;
        assert_ok(qattn_buffer_upload(shared, 0, src, 8));
        qattn_status st = qattn_paged_run(plan, &pa);
        qattn_ctx_synchronize(ctx);
        assert_int_equal(st, QATTN_ERR_INVALID_ARGUMENT);
        assert_non_null(strstr(qattn_last_error(ctx), tabs[victim].name));
        assert_non_null(strstr(qattn_last_error(ctx), "args.o"));
        int32_t back[2];
        assert_ok(qattn_buffer_download(shared, 0, back, 8));
        assert_memory_equal(back, src, 8); /* nothing written */
    }
    /* Past the tables in the same buffer is fine: o at an offset beyond them. */
    pa.qo_indptr = qo;
    pa.block_table = bt;
    pa.seq_lens = sl;
    pa.o = shared;
    pa.o_offset = 256;
    assert_true(256 + q_bytes <= sizeof(tables));
    assert_ok(qattn_paged_run(plan, &pa));
    assert_ok(qattn_ctx_synchronize(ctx));
    pa.o_offset = 0;

    /* Two buffers over the same memory (wrapping is CPU host memory or a
     * device address; the emulated CUDA device's addresses are host ones). */
    if (!strcmp(backend_name, "cpu") || !strcmp(backend_name, "cuda-emu")) {
        uint16_t *mem = malloc(q_bytes * 2);
        memcpy(mem, qh, q_bytes);
        memcpy(mem + H * D, qh, q_bytes);
        qattn_buffer *w1 = NULL, *w2 = NULL;
        assert_ok(qattn_buffer_wrap(ctx, mem, q_bytes * 2, &w1));
        assert_ok(qattn_buffer_wrap(ctx, mem, q_bytes * 2, &w2));
        pa.q = w1;
        pa.o = w2;
        pa.o_offset = q_bytes / 2; /* overlaps the second half of q */
        assert_int_equal(qattn_paged_run(plan, &pa), QATTN_ERR_INVALID_ARGUMENT);
        assert_non_null(strstr(qattn_last_error(ctx), "same memory"));
        assert_memory_equal(mem + H * D, qh, q_bytes);
        pa.o_offset = q_bytes; /* beside it: fine */
        assert_ok(qattn_paged_run(plan, &pa));
        assert_ok(qattn_ctx_synchronize(ctx));
        qattn_buffer_destroy(w1);
        qattn_buffer_destroy(w2);
        free(mem);
        pa.q = qb;
        pa.o_offset = 0;
    }
    qattn_plan_destroy(plan);

    /* An INT8 per-row append whose k_scale and v_scale are one buffer. */
    qattn_kv_cache_desc i8 = cache;
    i8.dtype = QATTN_DTYPE_I8;
    i8.scales = QATTN_KV_SCALES_PER_ROW;
    qattn_kv_cache_sizes i8s;
    assert_ok(qattn_kv_cache_bytes(ctx, &i8, &i8s));
    qattn_kv_cache_buffers ib = {.k = bufs.k, .v = bufs.v};
    assert_ok(qattn_buffer_create(ctx, i8s.scale_bytes, &ib.k_scale));
    assert_ok(qattn_buffer_fill(ib.k_scale, 0, i8s.scale_bytes, 0x3c));
    ib.v_scale = ib.k_scale;
    float kv[H * D];
    for (int i = 0; i < H * D; i++)
        kv[i] = 1.f;
    int64_t slot = 3;
    qattn_buffer *kvb = upload(kv, sizeof(kv)), *slb = upload(&slot, 8);
    qattn_kv_append_args app = {.cache = &i8, .buffers = &ib, .num_tokens = 1, .new_dtype = QATTN_DTYPE_F32,
                                .new_stride = {H * D, D}, .k_new = kvb, .v_new = kvb, .slot_mapping = slb};
    assert_int_equal(qattn_kv_append(ctx, &app), QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "k_scale"));
    assert_non_null(strstr(qattn_last_error(ctx), "v_scale"));
    uint8_t *scales = malloc(i8s.scale_bytes);
    assert_ok(qattn_buffer_download(ib.k_scale, 0, scales, i8s.scale_bytes));
    for (size_t i = 0; i < i8s.scale_bytes; i++)
        assert_int_equal(scales[i], 0x3c);
    /* ... and the cache K buffer also given as the new tokens. */
    ib.v_scale = NULL;
    assert_ok(qattn_buffer_create(ctx, i8s.scale_bytes, &ib.v_scale));
    app.k_new = bufs.k;
    assert_int_equal(qattn_kv_append(ctx, &app), QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "k_new"));
    app.k_new = kvb;
    assert_ok(qattn_kv_append(ctx, &app)); /* separate buffers: fine */
    assert_ok(qattn_ctx_synchronize(ctx));

    qattn_buffer *all[] = {bufs.k, bufs.v, ib.k_scale, ib.v_scale, shared, qb, ws, qo, bt, sl, kvb, slb};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    free(scales);
}

/* INT8 pages, per-row and per-head scales: rows whose values are all tiny
 * (below 2^-100) or zero store zero codes with a zero scale, and attention
 * over them stays finite; under NO_FINITE_CHECK a NaN row stores no NaN
 * converted to an integer (the sanitizer build catches that). */
static void tiny_rows_case(void **state)
{
    (void)state;
    skip_unless_paged("tiny_rows");
    enum { P = 16, H = 2, D = 64, T = 20 };
    for (int per_head = 0; per_head < 2; per_head++) {
        qattn_kv_cache_desc cache = {.num_pages = 2, .page_size = P, .heads_kv = H, .head_dim = D,
                                     .dtype = QATTN_DTYPE_I8,
                                     .scales = per_head ? QATTN_KV_SCALES_PER_HEAD : QATTN_KV_SCALES_PER_ROW};
        qattn_kv_cache_sizes sizes;
        assert_ok(qattn_kv_cache_bytes(ctx, &cache, &sizes));
        qattn_kv_cache_buffers bufs = {0};
        assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.k));
        assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.v));
        assert_ok(qattn_buffer_create(ctx, sizes.scale_bytes, &bufs.k_scale));
        assert_ok(qattn_buffer_create(ctx, sizes.scale_bytes, &bufs.v_scale));
        assert_ok(qattn_buffer_fill(bufs.k, 0, sizes.cache_bytes, 0x55));
        assert_ok(qattn_buffer_fill(bufs.v, 0, sizes.cache_bytes, 0x55));
        float head_scale[2] = {1.f / 127.f, 1.f / 127.f};
        if (per_head) {
            assert_ok(qattn_buffer_upload(bufs.k_scale, 0, head_scale, 8));
            assert_ok(qattn_buffer_upload(bufs.v_scale, 0, head_scale, 8));
        }
        /* token t, head h: t even -> all zero but one 1e-38; t odd -> randn in [-1, 1]-ish */
        float *kv = malloc((size_t)(T * H * D) * 4);
        int64_t slots[T];
        for (int64_t t = 0; t < T; t++) {
            slots[t] = t;
            for (int64_t e = 0; e < H * D; e++)
                kv[t * H * D + e] = t % 2 ? (float)(0.3 * ref_rng_normal(&rng)) : (e % D == 7 ? 1e-38f : 0.f);
        }
        qattn_buffer *kvb = upload(kv, (size_t)(T * H * D) * 4), *sb = upload(slots, sizeof(slots));
        qattn_kv_append_args app = {.cache = &cache, .buffers = &bufs, .num_tokens = T,
                                    .new_dtype = QATTN_DTYPE_F32, .new_stride = {H * D, D}, .k_new = kvb,
                                    .v_new = kvb, .slot_mapping = sb};
        assert_ok(qattn_kv_append(ctx, &app));
        assert_ok(qattn_ctx_synchronize(ctx));
        int8_t *codes = malloc(sizes.cache_bytes);
        float *sc = malloc(sizes.scale_bytes);
        assert_ok(qattn_buffer_download(bufs.v, 0, codes, sizes.cache_bytes));
        assert_ok(qattn_buffer_download(bufs.v_scale, 0, sc, sizes.scale_bytes));
        for (int64_t t = 0; t < T; t += 2)
            for (int64_t h = 0; h < H; h++) {
                for (int64_t d = 0; d < D; d++)
                    assert_int_equal(codes[(t * H + h) * D + d], 0);
                if (!per_head)
                    assert_true(sc[t * H + h] == 0.f);
            }
        /* Decode over the 20 tokens: finite, and right against fp64 over the stored values. */
        qattn_paged_desc pd = {.cache = cache, .table = QATTN_PAGES_DENSE, .batch = 1, .max_pages_per_seq = 2,
                               .total_q = 1, .max_q_len = 1, .heads_q = H, .q_dtype = QATTN_DTYPE_F32,
                               .q_stride = {H * D, D}, .o_stride = {H * D, D}, .return_lse = 1};
        qattn_plan *plan = NULL;
        qattn_status ps = qattn_paged_plan_create(ctx, &pd, &plan);
        if (ps == QATTN_ERR_UNSUPPORTED) { /* f32 queries: not every backend */
            pd.q_dtype = QATTN_DTYPE_F16;
            ps = qattn_paged_plan_create(ctx, &pd, &plan);
        }
        assert_int_equal(ps, QATTN_OK);
        const bool f32q = pd.q_dtype == QATTN_DTYPE_F32;
        float qf[2 * 64];
        uint16_t qh[2 * 64];
        for (int i = 0; i < H * D; i++) {
            qh[i] = qattn_f32_to_f16((float)ref_rng_normal(&rng));
            qf[i] = qattn_f16_to_f32(qh[i]);
        }
        int32_t qo[2] = {0, 1}, table[2] = {0, 1}, len[1] = {T};
        qattn_buffer *qb = f32q ? upload(qf, sizeof(qf)) : upload(qh, sizeof(qh)), *ob = NULL, *lb = NULL, *ws = NULL;
        assert_ok(qattn_buffer_create(ctx, sizeof(qf), &ob));
        assert_ok(qattn_buffer_create(ctx, (size_t)H * 4, &lb));
        if (qattn_plan_workspace_size(plan))
            assert_ok(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws));
        qattn_buffer *qob = upload(qo, 8), *tb = upload(table, 8), *lnb = upload(len, 4);
        qattn_paged_args pa = {.cache = &bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = qob, .block_table = tb,
                               .seq_lens = lnb, .workspace = ws};
        assert_ok(qattn_paged_run(plan, &pa));
        assert_ok(qattn_ctx_synchronize(ctx));
        float of[2 * 64];
        uint16_t oh[2 * 64];
        assert_ok(qattn_buffer_download(ob, 0, f32q ? (void *)of : (void *)oh, f32q ? sizeof(of) : sizeof(oh)));
        int8_t *kcodes = malloc(sizes.cache_bytes);
        float *ksc = malloc(sizes.scale_bytes);
        assert_ok(qattn_buffer_download(bufs.k, 0, kcodes, sizes.cache_bytes));
        assert_ok(qattn_buffer_download(bufs.k_scale, 0, ksc, sizes.scale_bytes));
        ref_accum acc = {0};
        for (int64_t h = 0; h < H; h++) {
            double sco[T], m = -INFINITY, sum = 0;
            for (int64_t t = 0; t < T; t++) {
                double ks = per_head ? ksc[h] : ksc[t * H + h], dot = 0;
                for (int64_t d = 0; d < D; d++)
                    dot += qf[h * D + d] * (kcodes[(t * H + h) * D + d] * ks);
                sco[t] = dot / sqrt((double)D);
                m = fmax(m, sco[t]);
            }
            for (int64_t t = 0; t < T; t++)
                sum += (sco[t] = exp(sco[t] - m));
            for (int64_t d = 0; d < D; d++) {
                double want = 0;
                for (int64_t t = 0; t < T; t++)
                    want += sco[t] / sum * (codes[(t * H + h) * D + d] * (double)(per_head ? sc[h] : sc[t * H + h]));
                ref_accum_add(&acc, f32q ? of[h * D + d] : qattn_f16_to_f32(oh[h * D + d]), want);
            }
        }
        ref_metrics mt = ref_accum_finish(&acc);
        print_message("  tiny rows, %s scales: cos %.7f relL1 %.2e\n", per_head ? "per-head" : "per-row", mt.cos_sim,
                      mt.rel_l1);
        assert_int_equal(mt.nonfinite, 0);
        assert_true(mt.cos_sim >= 0.99999 && mt.rel_l1 <= 2e-3);

        /* A NaN row without the check: stored as something, never UB. */
        kv[3] = NAN;
        assert_ok(qattn_buffer_upload(kvb, 0, kv, (size_t)(T * H * D) * 4));
        app.num_tokens = 1;
        assert_int_equal(qattn_kv_append(ctx, &app), QATTN_ERR_NONFINITE_INPUT);
        app.flags = QATTN_FLAG_NO_FINITE_CHECK;
        assert_ok(qattn_kv_append(ctx, &app));
        assert_ok(qattn_ctx_synchronize(ctx));

        qattn_buffer *all[] = {bufs.k, bufs.v, bufs.k_scale, bufs.v_scale, kvb, sb, qb, ob, lb, ws, qob, tb, lnb};
        for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
            qattn_buffer_destroy(all[i]);
        qattn_plan_destroy(plan);
        void *heap[] = {kv, codes, sc, kcodes, ksc};
        for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
            free(heap[i]);
    }
}

/* Merge states laid out with interleaved strides that no two elements share
 * (state 16, row 255, head 128 over [3, 6, 2, 16]): accepted and merged
 * right; strides that do collide are refused naming the merge's own dims. */
static void merge_strides_case(void **state)
{
    (void)state;
    enum { S = 3, R = 6, H = 2, D = 16 };
    const int64_t vs[3] = {16, 255, 128};
    const size_t v_elems = (size_t)((S - 1) * vs[0] + (R - 1) * vs[1] + (H - 1) * vs[2] + D);
    float *v = malloc(v_elems * 4), lse[S * R * H];
    for (size_t i = 0; i < v_elems; i++)
        v[i] = (float)ref_rng_normal(&rng);
    for (int i = 0; i < S * R * H; i++)
        lse[i] = (float)(2.0 * ref_rng_normal(&rng));
    qattn_merge_desc md = {.num_states = S, .rows = R, .heads = H, .head_dim = D, .v_dtype = QATTN_DTYPE_F32,
                           .o_dtype = QATTN_DTYPE_F32, .v_stride = {vs[0], vs[1], vs[2]},
                           .s_stride = {R * H, H, 1}, .o_stride = {H * D, D}};
    qattn_buffer *vb = upload(v, v_elems * 4), *sb = upload(lse, sizeof(lse)), *ob = NULL, *lb = NULL;
    assert_ok(qattn_buffer_create(ctx, (size_t)(R * H * D) * 4, &ob));
    assert_ok(qattn_buffer_create(ctx, (size_t)(R * H) * 4, &lb));
    assert_ok(qattn_buffer_fill(ob, 0, (size_t)(R * H * D) * 4, REF_POISON_BYTE));
    qattn_merge_args ma = {.v = vb, .s = sb, .o = ob, .lse = lb};
    qattn_status st = qattn_merge_states(ctx, &md, &ma);
    if (st == QATTN_ERR_UNSUPPORTED && strcmp(backend_name, "cpu") != 0) {
        print_message("[  SKIP    ] merge strides: %s\n", qattn_last_error(ctx));
        qattn_buffer *all[] = {vb, sb, ob, lb};
        for (int i = 0; i < 4; i++)
            qattn_buffer_destroy(all[i]);
        free(v);
        skip();
    }
    if (st)
        fail_msg("merge with interleaved strides: %s: %s", qattn_status_str(st), qattn_last_error(ctx));
    assert_ok(qattn_ctx_synchronize(ctx));
    float o[R * H * D], lo[R * H];
    assert_ok(qattn_buffer_download(ob, 0, o, sizeof(o)));
    assert_ok(qattn_buffer_download(lb, 0, lo, sizeof(lo)));
    ref_accum acc = {0}, lacc = {0};
    for (int r = 0; r < R; r++)
        for (int h = 0; h < H; h++) {
            double m = -INFINITY, sum = 0;
            for (int s2 = 0; s2 < S; s2++)
                m = fmax(m, lse[(s2 * R + r) * H + h]);
            for (int s2 = 0; s2 < S; s2++)
                sum += exp(lse[(s2 * R + r) * H + h] - m);
            for (int d = 0; d < D; d++) {
                double want = 0;
                for (int s2 = 0; s2 < S; s2++)
                    want += exp(lse[(s2 * R + r) * H + h] - m) / sum * v[s2 * vs[0] + r * vs[1] + h * vs[2] + d];
                ref_accum_add(&acc, o[(r * H + h) * D + d], want);
            }
            ref_accum_add(&lacc, lo[r * H + h], m + log(sum));
        }
    ref_metrics mo = ref_accum_finish(&acc), ml = ref_accum_finish(&lacc);
    print_message("  merge, interleaved strides: cos %.7f relL1 %.2e lse max %.2e\n", mo.cos_sim, mo.rel_l1,
                  ml.max_abs);
    assert_int_equal(mo.nonfinite, 0);
    assert_true(mo.cos_sim >= 0.999999 && mo.rel_l1 <= 1e-5 && ml.max_abs <= 1e-5);

    /* Row stride 256 - 16 * 15 = 16: row 1 of state 0 is state 1 of row 0. */
    md.v_stride[1] = 16;
    md.v_stride[0] = 16;
    assert_int_equal(qattn_merge_states(ctx, &md, &ma), QATTN_ERR_INVALID_ARGUMENT);
    const char *msg = qattn_last_error(ctx);
    assert_non_null(strstr(msg, "overlap"));
    assert_non_null(strstr(msg, "states"));
    assert_non_null(strstr(msg, "rows"));
    assert_null(strstr(msg, "(B)"));
    qattn_buffer *all[] = {vb, sb, ob, lb};
    for (int i = 0; i < 4; i++)
        qattn_buffer_destroy(all[i]);
    free(v);
}

/* Bad appends and bad tables: clear errors, nothing written. */
static void bad_input_case(void **state)
{
    (void)state;
    skip_unless_paged("bad_inputs");
    const int64_t P = 16, H = 2, D = 64, pages = 4;
    qattn_kv_cache_desc cache = {.num_pages = pages, .page_size = P, .heads_kv = H, .head_dim = D,
                                 .dtype = QATTN_DTYPE_F16};
    qattn_kv_cache_sizes sizes;
    assert_ok(qattn_kv_cache_bytes(ctx, &cache, &sizes));
    assert_int_equal(sizes.cache_bytes, (size_t)(pages * P * H * D * 2));
    qattn_kv_cache_desc bad = cache;
    bad.scales = QATTN_KV_SCALES_PER_HEAD;
    assert_int_equal(qattn_kv_cache_bytes(ctx, &bad, &sizes), QATTN_ERR_INVALID_ARGUMENT);
    bad = cache;
    bad.dtype = QATTN_DTYPE_FP8_E4M3; /* fp8 needs per-head scales */
    assert_int_equal(qattn_kv_cache_bytes(ctx, &bad, &sizes), QATTN_ERR_INVALID_ARGUMENT);
    bad = cache;
    bad.page_size = 0;
    assert_int_equal(qattn_kv_cache_bytes(ctx, &bad, &sizes), QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "page_size"));
    assert_ok(qattn_kv_cache_bytes(ctx, &cache, &sizes));

    qattn_kv_cache_buffers bufs = {0};
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.k));
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.v));
    assert_ok(qattn_buffer_fill(bufs.k, 0, sizes.cache_bytes, 0x11));
    assert_ok(qattn_buffer_fill(bufs.v, 0, sizes.cache_bytes, 0x11));
    float kv[3 * 2 * 64];
    for (int i = 0; i < 3 * 2 * 64; i++)
        kv[i] = (float)ref_rng_normal(&rng);
    int64_t slots[3] = {5, 70, 6};
    qattn_buffer *kb = upload(kv, sizeof(kv)), *sb = upload(slots, sizeof(slots));
    qattn_kv_append_args app = {.cache = &cache, .buffers = &bufs, .num_tokens = 3, .new_dtype = QATTN_DTYPE_F32,
                                .new_stride = {H * D, D}, .k_new = kb, .v_new = kb, .slot_mapping = sb};
    qattn_status s = qattn_kv_append(ctx, &app);
    assert_int_equal(s, QATTN_ERR_INVALID_ARGUMENT); /* slot 70 >= 64 */
    assert_non_null(strstr(qattn_last_error(ctx), "outside"));
    slots[1] = 5; /* duplicate */
    assert_ok(qattn_buffer_upload(sb, 0, slots, sizeof(slots)));
    assert_int_equal(qattn_kv_append(ctx, &app), QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "twice"));
    slots[1] = -1; /* padding: skipped */
    assert_ok(qattn_buffer_upload(sb, 0, slots, sizeof(slots)));
    kv[64 + 3] = NAN;
    assert_ok(qattn_buffer_upload(kb, 0, kv, sizeof(kv)));
    assert_int_equal(qattn_kv_append(ctx, &app), QATTN_ERR_NONFINITE_INPUT);
    uint8_t *after = malloc(sizes.cache_bytes);
    assert_ok(qattn_buffer_download(bufs.k, 0, after, sizes.cache_bytes));
    for (size_t i = 0; i < sizes.cache_bytes; i++)
        assert_int_equal(after[i], 0x11); /* nothing written by the failed appends */
    free(after);
    app.new_stride[1] = 3; /* heads overlap */
    assert_int_equal(qattn_kv_append(ctx, &app), QATTN_ERR_INVALID_ARGUMENT);
    app.new_stride[1] = D;
    app.buffers = NULL;
    assert_int_equal(qattn_kv_append(ctx, &app), QATTN_ERR_INVALID_ARGUMENT);

    /* Plans and tables. */
    qattn_paged_desc pd = {.cache = cache, .table = QATTN_PAGES_DENSE, .batch = 1, .max_pages_per_seq = 2,
                           .total_q = 1, .max_q_len = 1, .heads_q = 3, .q_dtype = QATTN_DTYPE_F16,
                           .q_stride = {3 * D, D}, .o_stride = {3 * D, D}};
    qattn_plan *plan = NULL;
    assert_int_equal(qattn_paged_plan_create(ctx, &pd, &plan), QATTN_ERR_INVALID_ARGUMENT); /* 3 % 2 */
    pd.heads_q = 4;
    pd.q_stride[0] = pd.o_stride[0] = 4 * D;
    pd.max_q_len = 2;
    assert_int_equal(qattn_paged_plan_create(ctx, &pd, &plan), QATTN_ERR_INVALID_ARGUMENT); /* > total_q */
    pd.max_q_len = 1;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    qattn_run_args dense_args = {0};
    assert_int_equal(qattn_run(plan, &dense_args), QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "qattn_paged_run"));
    uint16_t qh[4 * 64] = {0};
    int32_t qo[2] = {0, 1}, table[2] = {1, 9}, lens[1] = {20};
    qattn_buffer *qb = upload(qh, sizeof(qh)), *ob = NULL, *qob = upload(qo, sizeof(qo));
    qattn_buffer *tb = upload(table, sizeof(table)), *lb = upload(lens, sizeof(lens)), *ws = NULL;
    assert_ok(qattn_buffer_create(ctx, sizeof(qh), &ob));
    assert_ok(qattn_buffer_fill(ob, 0, sizeof(qh), REF_POISON_BYTE));
    if (qattn_plan_workspace_size(plan))
        assert_ok(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws));
    qattn_paged_args pa = {.cache = &bufs, .q = qb, .o = ob, .qo_indptr = qob, .block_table = tb, .seq_lens = lb,
                           .workspace = ws};
    s = qattn_paged_run(plan, &pa); /* page 9 of a 4-page cache */
    qattn_ctx_synchronize(ctx);
    assert_int_equal(s, QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "page"));
    lens[0] = 40; /* longer than max_pages_per_seq * page_size */
    table[1] = 2;
    assert_ok(qattn_buffer_upload(lb, 0, lens, sizeof(lens)));
    assert_ok(qattn_buffer_upload(tb, 0, table, sizeof(table)));
    s = qattn_paged_run(plan, &pa);
    qattn_ctx_synchronize(ctx);
    assert_int_equal(s, QATTN_ERR_INVALID_ARGUMENT);
    uint8_t out[sizeof(qh)];
    assert_ok(qattn_buffer_download(ob, 0, out, sizeof(out)));
    for (size_t i = 0; i < sizeof(out); i++)
        assert_int_equal(out[i], REF_POISON_BYTE);
    pa.seq_lens = NULL;
    assert_int_equal(qattn_paged_run(plan, &pa), QATTN_ERR_INVALID_ARGUMENT);
    qattn_plan_destroy(plan);

    /* CSR: a sequence with more pages than max_pages_per_seq (= 2) is refused,
     * not cut short. */
    pd.table = QATTN_PAGES_CSR;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    /* the dense plan's workspace serves (so the refusal below is about the table) */
    assert_true(qattn_plan_workspace_size(plan) <= (ws ? qattn_buffer_size(ws) : 0));
    int32_t csr_indptr[2] = {0, 3}, csr_indices[3] = {0, 1, 2}, csr_last[1] = {16};
    qattn_buffer *ipb = upload(csr_indptr, sizeof(csr_indptr)), *ixb = upload(csr_indices, sizeof(csr_indices));
    qattn_buffer *lpb = upload(csr_last, sizeof(csr_last));
    qattn_paged_args csr = {.cache = &bufs, .q = qb, .o = ob, .qo_indptr = qob, .indptr = ipb, .indices = ixb,
                            .last_page_len = lpb, .workspace = ws};
    s = qattn_paged_run(plan, &csr);
    qattn_ctx_synchronize(ctx);
    assert_int_equal(s, QATTN_ERR_INVALID_ARGUMENT);
    assert_ok(qattn_buffer_download(ob, 0, out, sizeof(out)));
    for (size_t i = 0; i < sizeof(out); i++)
        assert_int_equal(out[i], REF_POISON_BYTE);
    qattn_buffer_destroy(ipb);
    qattn_buffer_destroy(ixb);
    qattn_buffer_destroy(lpb);

    /* A split-KV workspace past size_t (1024 x (2^31 - 1) x 2^20 x 65 floats)
     * is refused, not wrapped around (a backend may refuse it earlier). */
    qattn_paged_desc huge = {.cache = {.num_pages = 1, .page_size = 16, .heads_kv = 1, .head_dim = 64,
                                       .dtype = QATTN_DTYPE_F16},
                             .table = QATTN_PAGES_DENSE, .batch = 1, .max_pages_per_seq = 1024,
                             .total_q = INT32_MAX, .max_q_len = 1, .heads_q = 1 << 20, .q_dtype = QATTN_DTYPE_F16,
                             .q_stride = {(1 << 20) * 64, 64}, .o_stride = {(1 << 20) * 64, 64}, .num_splits = 1024};
    qattn_plan *huge_plan = NULL;
    s = qattn_paged_plan_create(ctx, &huge, &huge_plan);
    print_message("  huge split-KV plan: %s: %s\n", qattn_status_str(s), qattn_last_error(ctx));
    assert_int_not_equal(s, QATTN_OK);
    assert_null(huge_plan);
    if (s == QATTN_ERR_INVALID_ARGUMENT)
        assert_non_null(strstr(qattn_last_error(ctx), "overflow"));

    qattn_buffer *all[] = {bufs.k, bufs.v, kb, sb, qb, ob, qob, tb, lb, ws};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    qattn_plan_destroy(plan);
}

static void page_pool_case(void **state)
{
    (void)state;
    qattn_page_pool *pool = NULL;
    assert_int_equal(qattn_page_pool_create(0, &pool), QATTN_ERR_INVALID_ARGUMENT);
    assert_ok(qattn_page_pool_create(8, &pool));
    int32_t a[8], b[2];
    assert_ok(qattn_page_pool_alloc(pool, 3, a));
    assert_true(a[0] == 0 && a[1] == 1 && a[2] == 2);
    assert_int_equal(qattn_page_pool_alloc(pool, 6, b), QATTN_ERR_OUT_OF_MEMORY); /* all or nothing */
    assert_int_equal(qattn_page_pool_free_count(pool), 5);
    int32_t twice[2] = {1, 1}, stranger[1] = {5}, outside[1] = {9};
    assert_int_equal(qattn_page_pool_free(pool, 2, twice), QATTN_ERR_INVALID_ARGUMENT);
    assert_int_equal(qattn_page_pool_free(pool, 1, stranger), QATTN_ERR_INVALID_ARGUMENT);
    assert_int_equal(qattn_page_pool_free(pool, 1, outside), QATTN_ERR_INVALID_ARGUMENT);
    assert_int_equal(qattn_page_pool_free_count(pool), 5); /* failed frees changed nothing */
    assert_ok(qattn_page_pool_free(pool, 1, &a[1]));
    assert_ok(qattn_page_pool_alloc(pool, 1, b));
    assert_int_equal(b[0], 1); /* recently freed first */
    qattn_page_pool_destroy(pool);
    qattn_page_pool_destroy(NULL);

    int32_t s0[] = {4, 2}, s1[] = {7};
    const int32_t *lists[] = {s0, s1};
    int64_t counts[] = {2, 1};
    int32_t table[2 * 3], ip[3], ix[3];
    assert_ok(qattn_page_tables_build(2, lists, counts, 3, table, ip, ix));
    const int32_t want_table[] = {4, 2, -1, 7, -1, -1}, want_ip[] = {0, 2, 3}, want_ix[] = {4, 2, 7};
    assert_memory_equal(table, want_table, sizeof(want_table));
    assert_memory_equal(ip, want_ip, sizeof(want_ip));
    assert_memory_equal(ix, want_ix, sizeof(want_ix));
    assert_int_equal(qattn_page_tables_build(2, lists, counts, 1, table, NULL, NULL), QATTN_ERR_INVALID_ARGUMENT);
}

#define F16 QATTN_DTYPE_F16
#define BF16 QATTN_DTYPE_BF16
#define FP8 QATTN_DTYPE_FP8_E4M3
#define I8 QATTN_DTYPE_I8
#define NHD QATTN_KV_NHD
#define HND QATTN_KV_HND
#define NONE QATTN_KV_SCALES_NONE
#define HEAD QATTN_KV_SCALES_PER_HEAD
#define ROW QATTN_KV_SCALES_PER_ROW
#define DENSE QATTN_PAGES_DENSE
#define CSR QATTN_PAGES_CSR

/* name, page, Hq, Hkv, D, dtype, layout, scales, table, causal, splits, B, kv_len[], q_len[] */
static const paged_case paged_cases[] = {
    {"decode_f16_p16_gqa", 16, 8, 2, 128, F16, NHD, NONE, DENSE, 1, 0, 4, {1, 17, 100, 256}, {1, 1, 1, 1}},
    {"decode_f16_p1_csr", 1, 4, 4, 64, F16, HND, NONE, CSR, 1, 0, 3, {1, 33, 70}, {1, 1, 1}},
    {"decode_bf16_p128", 128, 4, 1, 128, BF16, NHD, NONE, DENSE, 0, 0, 2, {129, 300}, {1, 1}},
    {"decode_fp8_p16", 16, 8, 2, 128, FP8, NHD, HEAD, CSR, 1, 0, 3, {5, 160, 211}, {1, 1, 1}},
    {"decode_int8_head_p16", 16, 4, 2, 64, I8, HND, HEAD, DENSE, 1, 0, 2, {48, 95}, {1, 1}},
    {"decode_int8_row_p16", 16, 4, 2, 128, I8, NHD, ROW, DENSE, 1, 0, 2, {31, 250}, {1, 1}},
    {"decode_split3_f16", 16, 8, 2, 128, F16, NHD, NONE, DENSE, 1, 3, 2, {1, 700}, {1, 1}},
    {"decode_split4_fp8_csr", 16, 4, 1, 64, FP8, HND, HEAD, CSR, 0, 4, 1, {333}, {1}},
    {"prefill_f16_p16_causal", 16, 4, 2, 64, F16, NHD, NONE, DENSE, 1, 0, 3, {40, 70, 90}, {40, 20, 1}},
    {"prefill_chunked_fp8_p128", 128, 4, 2, 128, FP8, NHD, HEAD, CSR, 1, 0, 2, {300, 129}, {64, 129}},
    {"prefill_int8_row_split2", 16, 8, 4, 64, I8, HND, ROW, CSR, 1, 2, 2, {77, 150}, {13, 30}},
    {"multi_query_decode_p1", 1, 4, 2, 64, F16, NHD, NONE, DENSE, 1, 0, 2, {9, 40}, {3, 4}},
    /* Sequences with nothing cached yet: CSR with 0 pages, DENSE with seq_len 0. */
    {"empty_seq_csr", 16, 4, 2, 64, F16, NHD, NONE, CSR, 0, 0, 3, {0, 50, 0}, {1, 1, 2}},
    {"empty_seq_dense_split2", 16, 4, 1, 128, F16, HND, NONE, DENSE, 1, 2, 2, {40, 0}, {1, 1}},
};

int main(int argc, char **argv)
{
    int early = ref_backend_context(argc, argv, "test_paged", &ctx);
    if (early >= 0)
        return early;
    backend_name = argv[1];
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("paged conformance on backend %s, seed %llu (QATTN_TEST_SEED repeats it)\n", backend_name,
           (unsigned long long)seed);
    const char *filter = getenv("QATTN_TEST_FILTER"); /* a cmocka glob over the case names */
    if (filter && *filter)
        cmocka_set_test_filter(filter);
    enum { NCASES = sizeof(paged_cases) / sizeof(paged_cases[0]) };
    struct CMUnitTest tests[NCASES + 6];
    for (int i = 0; i < NCASES; i++)
        tests[i] = (struct CMUnitTest){paged_cases[i].name, run_paged_case, NULL, NULL, (void *)&paged_cases[i]};
    tests[NCASES] = (struct CMUnitTest){"merge_states", merge_states_case, NULL, NULL, NULL};
    tests[NCASES + 1] = (struct CMUnitTest){"bad_inputs", bad_input_case, NULL, NULL, NULL};
    tests[NCASES + 2] = (struct CMUnitTest){"page_pool", page_pool_case, NULL, NULL, NULL};
    tests[NCASES + 3] = (struct CMUnitTest){"aliasing", aliasing_case, NULL, NULL, NULL};
    tests[NCASES + 4] = (struct CMUnitTest){"tiny_rows", tiny_rows_case, NULL, NULL, NULL};
    tests[NCASES + 5] = (struct CMUnitTest){"merge_strides", merge_strides_case, NULL, NULL, NULL};
    int failed = _cmocka_run_group_tests(backend_name, tests, NCASES + 6, NULL, NULL);
    qattn_ctx_destroy(ctx);
    return failed ? 1 : 0;
}
