/*
 * The paged conformance suite (tests/test_paged.c, unchanged) against the
 * CUDA backend's paged kernels running on the CPU emulator: `test_paged cuda`
 * here gets a CPU context whose paged slots (append, plan, run, merge) are the
 * CUDA backend's host code and kernels over host memory (paged_emu_rt.cpp).
 * Everything else (buffers, the fp64 reference) is the CPU backend's.
 *
 * Then cases the suite does not reach, each checked against the CPU backend
 * on the same cache: f32 and bf16 queries (beyond f16's range), the decode
 * benchmark's shape (GQA 32/8, D 128) with pages of 1 and 16 tokens and
 * split-KV, and garbage page tables with the check off, which must neither
 * fail nor read outside the buffers (build with -fsanitize=address to see).
 */
#include <string.h>

#include "internal.h"
#include "qattn/qattn.h"

qattn_status qa_paged_emu_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status qa_paged_emu_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status qa_paged_emu_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status qa_paged_emu_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

#include "reference.h" /* first, so its declarations keep their names */

/* The suite's context comes from one of these: hooked so that "cuda" means the emulation. */
static qattn_status emulated_ctx_create(const qattn_ctx_params *params, qattn_ctx **out);
static int emulated_backend_context(int argc, char **argv, const char *program, qattn_ctx **out);
#define qattn_ctx_create emulated_ctx_create
#define ref_backend_context emulated_backend_context
#define main test_paged_main
#include "test_paged.c"
#undef main
#undef ref_backend_context
#undef qattn_ctx_create

static qattn_backend_iface emulated_cuda;

static qattn_status emulated_ctx_create(const qattn_ctx_params *params, qattn_ctx **out)
{
    const int emulate = params && params->backend && strcmp(params->backend, "cuda") == 0;
    qattn_ctx_params cpu = {0};
    if (params)
        cpu = *params;
    if (emulate)
        cpu.backend = "cpu";
    qattn_status s = qattn_ctx_create(&cpu, out);
    if (s || !emulate)
        return s;
    emulated_cuda = qattn_backend_cpu;
    emulated_cuda.name = "cuda-emulated";
    emulated_cuda.kv_append = qa_paged_emu_kv_append;
    emulated_cuda.paged_plan_init = qa_paged_emu_plan_init;
    emulated_cuda.paged_run = qa_paged_emu_run;
    emulated_cuda.merge_states = qa_paged_emu_merge_states;
    (*out)->backend = &emulated_cuda;
    return QATTN_OK;
}

static int emulated_backend_context(int argc, char **argv, const char *program, qattn_ctx **out)
{
    if (argc < 2 || strcmp(argv[1], "cuda") != 0)
        return ref_backend_context(argc, argv, program, out);
    qattn_ctx_params params = {.backend = "cuda"};
    if (emulated_ctx_create(&params, out)) {
        fprintf(stderr, "%s: %s\n", program, qattn_last_error(NULL));
        return 1;
    }
    return -1;
}

/* ------------------------------------------------- emulator-only cases */

typedef struct cross_case {
    const char *name;
    int64_t page_size, heads_q, heads_kv, head_dim;
    qattn_dtype dtype, q_dtype;
    qattn_kv_layout layout;
    qattn_kv_scales scales;
    qattn_page_table_kind table;
    double q_scale, k_scale; /* magnitudes of Q and K (V is N(0, 1)) */
    int num_splits;
    int64_t batch;
    int64_t kv_len[4], q_len[4];
} cross_case;

typedef struct cross_state {
    qattn_kv_cache_desc cache;
    qattn_kv_cache_buffers bufs;
    qattn_buffer *q, *qo, *bt, *sl, *ip, *ix, *lp;
    int64_t total_q, max_q, max_pages;
} cross_state;

/* A cache filled through the emulated append, its tables and Q. */
static void cross_build(const cross_case *c, cross_state *st)
{
    const int64_t B = c->batch, Hkv = c->heads_kv, D = c->head_dim, P = c->page_size;
    int64_t pages_of[4], total_pages = 0, tokens = 0;
    int32_t qo[5] = {0};
    st->total_q = 0;
    st->max_q = 1;
    st->max_pages = 1;
    for (int64_t b = 0; b < B; b++) {
        pages_of[b] = (c->kv_len[b] + P - 1) / P;
        total_pages += pages_of[b];
        tokens += c->kv_len[b];
        st->max_pages = pages_of[b] > st->max_pages ? pages_of[b] : st->max_pages;
        st->max_q = c->q_len[b] > st->max_q ? c->q_len[b] : st->max_q;
        qo[b + 1] = (int32_t)(qo[b] + c->q_len[b]);
        st->total_q += c->q_len[b];
    }
    const int64_t num_pages = total_pages + 3;
    st->cache = (qattn_kv_cache_desc){.num_pages = num_pages, .page_size = P, .heads_kv = Hkv, .head_dim = D,
                                      .dtype = c->dtype, .layout = c->layout, .scales = c->scales};
    qattn_kv_cache_sizes sizes;
    assert_ok(qattn_kv_cache_bytes(ctx, &st->cache, &sizes));
    int32_t *order = malloc((size_t)num_pages * 4);
    for (int64_t i = 0; i < num_pages; i++)
        order[i] = (int32_t)i;
    for (int64_t i = num_pages - 1; i > 0; i--) {
        int64_t j = (int64_t)(ref_rng_uniform(&rng) * (double)(i + 1));
        int32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    const int32_t *lists[4];
    for (int64_t b = 0, at = 0; b < B; at += pages_of[b], b++)
        lists[b] = order + at;
    int32_t *bt = malloc((size_t)(B * st->max_pages) * 4), ip[5], *ix = malloc((size_t)(total_pages + 1) * 4);
    int32_t sl[4], lp[4];
    assert_ok(qattn_page_tables_build(B, lists, pages_of, st->max_pages, bt, ip, ix));
    float *kv = malloc((size_t)(tokens * Hkv * D) * 8);
    int64_t *slots = malloc((size_t)tokens * 8);
    for (int64_t b = 0, tok = 0; b < B; b++) {
        sl[b] = (int32_t)c->kv_len[b];
        lp[b] = (int32_t)(c->kv_len[b] - (pages_of[b] - 1) * P);
        for (int64_t t = 0; t < c->kv_len[b]; t++, tok++) {
            slots[tok] = (int64_t)lists[b][t / P] * P + t % P;
            for (int64_t e = 0; e < Hkv * D; e++) {
                kv[tok * Hkv * D + e] = (float)(ref_rng_normal(&rng) * c->k_scale);
                kv[(tokens + tok) * Hkv * D + e] = (float)ref_rng_normal(&rng);
            }
        }
    }
    memset(&st->bufs, 0, sizeof(st->bufs));
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &st->bufs.k));
    assert_ok(qattn_buffer_create(ctx, sizes.cache_bytes, &st->bufs.v));
    assert_ok(qattn_buffer_fill(st->bufs.k, 0, sizes.cache_bytes, 0xff)); /* NaN in every format */
    assert_ok(qattn_buffer_fill(st->bufs.v, 0, sizes.cache_bytes, 0xff));
    if (c->scales != QATTN_KV_SCALES_NONE) {
        assert_ok(qattn_buffer_create(ctx, sizes.scale_bytes, &st->bufs.k_scale));
        assert_ok(qattn_buffer_create(ctx, sizes.scale_bytes, &st->bufs.v_scale));
        if (c->scales == QATTN_KV_SCALES_PER_HEAD) {
            float ks[64], vs[64];
            float qmax = c->dtype == QATTN_DTYPE_FP8_E4M3 ? 448.f : 127.f;
            for (int64_t h = 0; h < Hkv; h++) {
                ks[h] = (float)(4.5 * c->k_scale / qmax);
                vs[h] = 4.5f / qmax;
            }
            assert_ok(qattn_buffer_upload(st->bufs.k_scale, 0, ks, (size_t)Hkv * 4));
            assert_ok(qattn_buffer_upload(st->bufs.v_scale, 0, vs, (size_t)Hkv * 4));
        }
    }
    qattn_buffer *kb = upload(kv, (size_t)(tokens * Hkv * D) * 4);
    qattn_buffer *vb = upload(kv + tokens * Hkv * D, (size_t)(tokens * Hkv * D) * 4);
    qattn_buffer *sb = upload(slots, (size_t)tokens * 8);
    qattn_kv_append_args app = {.cache = &st->cache, .buffers = &st->bufs, .num_tokens = tokens,
                                .new_dtype = QATTN_DTYPE_F32, .new_stride = {Hkv * D, D},
                                .k_new = kb, .v_new = vb, .slot_mapping = sb};
    assert_ok(qattn_kv_append(ctx, &app));
    qattn_tensor_desc qd = qattn_tensor_nhd(c->q_dtype, 1, c->heads_q, st->total_q, D);
    void *q = ref_tensor_alloc(&qd);
    ref_fill_randn(q, &qd, &rng, c->q_scale, NULL);
    st->q = upload(q, qattn_tensor_bytes(&qd));
    st->qo = upload(qo, (size_t)(B + 1) * 4);
    st->bt = upload(bt, (size_t)(B * st->max_pages) * 4);
    st->sl = upload(sl, (size_t)B * 4);
    st->ip = upload(ip, (size_t)(B + 1) * 4);
    st->ix = upload(ix, (size_t)(total_pages + 1) * 4);
    st->lp = upload(lp, (size_t)B * 4);
    qattn_buffer_destroy(kb);
    qattn_buffer_destroy(vb);
    qattn_buffer_destroy(sb);
    void *heap[] = {order, bt, ix, kv, slots, q};
    for (size_t i = 0; i < sizeof(heap) / sizeof(heap[0]); i++)
        free(heap[i]);
}

static void cross_free(cross_state *st)
{
    qattn_buffer *all[] = {st->bufs.k, st->bufs.v, st->bufs.k_scale, st->bufs.v_scale, st->q, st->qo,
                           st->bt, st->sl, st->ip, st->ix, st->lp};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
}

/* Runs paged attention on the context's current backend; O (f32 copy) and LSE out. */
static void cross_run(const cross_case *c, cross_state *st, uint32_t flags, float *o, float *lse, char *kernel)
{
    const int64_t Hq = c->heads_q, D = c->head_dim;
    qattn_paged_desc pd = {.cache = st->cache, .table = c->table, .batch = c->batch,
                           .max_pages_per_seq = st->max_pages, .total_q = st->total_q, .max_q_len = st->max_q,
                           .heads_q = Hq, .q_dtype = c->q_dtype, .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D},
                           .causal = 1, .return_lse = 1, .num_splits = c->num_splits, .flags = flags};
    qattn_plan *plan = NULL;
    assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
    qattn_plan_info info;
    assert_ok(qattn_plan_get_info(plan, &info));
    int splits = info.kv_tile ? (int)((st->max_pages * c->page_size + info.kv_tile - 1) / info.kv_tile) : 1;
    snprintf(kernel, 160, "%.100s splits %d", info.kernel, splits);
    qattn_tensor_desc od = qattn_tensor_nhd(c->q_dtype, 1, Hq, st->total_q, D);
    size_t obytes = qattn_tensor_bytes(&od);
    qattn_buffer *ob = NULL, *lb = NULL, *ws = NULL;
    assert_ok(qattn_buffer_create(ctx, obytes, &ob));
    assert_ok(qattn_buffer_create(ctx, (size_t)(st->total_q * Hq) * 4, &lb));
    if (qattn_plan_workspace_size(plan))
        assert_ok(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws));
    qattn_paged_args args = {.cache = &st->bufs, .q = st->q, .o = ob, .lse = lb, .qo_indptr = st->qo, .workspace = ws};
    if (c->table == QATTN_PAGES_DENSE) {
        args.block_table = st->bt;
        args.seq_lens = st->sl;
    } else {
        args.indptr = st->ip;
        args.indices = st->ix;
        args.last_page_len = st->lp;
    }
    assert_ok(qattn_paged_run(plan, &args));
    assert_ok(qattn_ctx_synchronize(ctx));
    void *raw = malloc(obytes);
    assert_ok(qattn_buffer_download(ob, 0, raw, obytes));
    assert_ok(qattn_buffer_download(lb, 0, lse, (size_t)(st->total_q * Hq) * 4));
    for (int64_t r = 0; r < st->total_q; r++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t d = 0; d < D; d++)
                o[(r * Hq + h) * D + d] = (float)ref_load(raw, &od, 0, h, r, d);
    free(raw);
    qattn_buffer_destroy(ob);
    qattn_buffer_destroy(lb);
    qattn_buffer_destroy(ws);
    qattn_plan_destroy(plan);
}

/* The emulated CUDA kernels against the CPU backend, on the same cache and queries. */
static void cross_check(void **state)
{
    const cross_case *c = *state;
    cross_state st;
    cross_build(c, &st);
    const size_t n = (size_t)(st.total_q * c->heads_q);
    float *o_gpu = malloc(n * (size_t)c->head_dim * 4), *o_cpu = malloc(n * (size_t)c->head_dim * 4);
    float *l_gpu = malloc(n * 4), *l_cpu = malloc(n * 4);
    char k_gpu[160], k_cpu[160];
    cross_run(c, &st, 0, o_gpu, l_gpu, k_gpu);
    ctx->backend = &qattn_backend_cpu;
    cross_run(c, &st, 0, o_cpu, l_cpu, k_cpu);
    ctx->backend = &emulated_cuda;
    ref_accum acc = {0}, lacc = {0};
    for (size_t i = 0; i < n * (size_t)c->head_dim; i++)
        ref_accum_add(&acc, o_gpu[i], o_cpu[i]);
    for (size_t i = 0; i < n; i++)
        ref_accum_add(&lacc, isinf(l_cpu[i]) ? (isinf(l_gpu[i]) && l_gpu[i] < 0 ? 0.0 : NAN) : l_gpu[i],
                      isinf(l_cpu[i]) ? 0.0 : l_cpu[i]);
    ref_metrics m = ref_accum_finish(&acc), ml = ref_accum_finish(&lacc);
    print_message("  %-28s %-34s vs cpu: cos %.7f relL1 %.2e lse %.2e\n", c->name, k_gpu, m.cos_sim, m.rel_l1,
                  ml.max_abs);
    assert_int_equal(m.nonfinite, 0);
    assert_int_equal(ml.nonfinite, 0);
    assert_true(m.cos_sim >= 0.99999 && m.rel_l1 <= 2e-3 && ml.max_abs <= 1e-3);
    free(o_gpu);
    free(o_cpu);
    free(l_gpu);
    free(l_cpu);
    cross_free(&st);
}

/* Garbage tables with the check off: the run succeeds (outputs unspecified) and reads nothing outside. */
static void unchecked_garbage(void **state)
{
    const cross_case *c = *state;
    cross_state st;
    cross_build(c, &st);
    float *o = malloc((size_t)(st.total_q * c->heads_q * c->head_dim) * 4);
    float *l = malloc((size_t)(st.total_q * c->heads_q) * 4);
    char kernel[128];
    const int32_t junk[] = {-7, 1 << 30, -1, 99999, INT32_MAX, INT32_MIN, 3};
    for (int round = 0; round < 6; round++) {
        int32_t ints[64];
        for (int i = 0; i < 64; i++)
            ints[i] = (round + i) % 3 ? junk[(round * 5 + i) % 7] : (int32_t)(ref_rng_uniform(&rng) * 40) - 5;
        ints[1] = -7; /* qo_indptr[1], seq_lens[1] or indptr[1]: the checked run must refuse */
        qattn_buffer *targets[] = {st.bt, st.sl, st.ip, st.ix, st.lp, st.qo};
        for (size_t t = 0; t < sizeof(targets) / sizeof(targets[0]); t++) {
            size_t bytes = qattn_buffer_size(targets[t]);
            assert_ok(qattn_buffer_upload(targets[t], 0, ints, bytes < sizeof(ints) ? bytes : sizeof(ints)));
        }
        if (round % 2) { /* valid query rows: the kernels walk the garbage pages */
            int32_t qo[5] = {0};
            for (int64_t b = 0; b < c->batch; b++)
                qo[b + 1] = qo[b] + (int32_t)c->q_len[b];
            assert_ok(qattn_buffer_upload(st.qo, 0, qo, (size_t)(c->batch + 1) * 4));
        }
        cross_run(c, &st, QATTN_FLAG_NO_FINITE_CHECK, o, l, kernel);
        /* ... and the checked run refuses the same tables. */
        qattn_paged_desc pd = {.cache = st.cache, .table = c->table, .batch = c->batch,
                               .max_pages_per_seq = st.max_pages, .total_q = st.total_q, .max_q_len = st.max_q,
                               .heads_q = c->heads_q, .q_dtype = c->q_dtype,
                               .q_stride = {c->heads_q * c->head_dim, c->head_dim},
                               .o_stride = {c->heads_q * c->head_dim, c->head_dim}, .causal = 1};
        qattn_plan *plan = NULL;
        assert_ok(qattn_paged_plan_create(ctx, &pd, &plan));
        qattn_buffer *ob = NULL, *ws = NULL;
        assert_ok(qattn_buffer_create(ctx, (size_t)(st.total_q * c->heads_q * c->head_dim) * 4, &ob));
        if (qattn_plan_workspace_size(plan))
            assert_ok(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws));
        qattn_paged_args args = {.cache = &st.bufs, .q = st.q, .o = ob, .qo_indptr = st.qo, .workspace = ws,
                                 .block_table = st.bt, .seq_lens = st.sl, .indptr = st.ip, .indices = st.ix,
                                 .last_page_len = st.lp};
        if (c->table == QATTN_PAGES_DENSE)
            args.indptr = args.indices = args.last_page_len = NULL;
        else
            args.block_table = args.seq_lens = NULL;
        qattn_status s = qattn_paged_run(plan, &args);
        print_message("  %-28s round %d: unchecked ok, checked: %s (%s)\n", c->name, round, qattn_status_str(s),
                      qattn_last_error(ctx));
        assert_int_equal(s, QATTN_ERR_INVALID_ARGUMENT);
        qattn_buffer_destroy(ob);
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
    }
    free(o);
    free(l);
    cross_free(&st);
}

#define F32 QATTN_DTYPE_F32

/* name, page, Hq, Hkv, D, dtype, q dtype, layout, scales, table, |q|, |k|, splits, B, kv_len[], q_len[] */
static const cross_case cross_cases[] = {
    {"f32_q_f16_pages_huge_q", 16, 8, 2, 128, F16, F32, NHD, NONE, DENSE, 2e5, 1e-5, 0, 2, {70, 200}, {1, 3}},
    {"bf16_q_f16_pages_huge_q", 16, 4, 2, 64, F16, BF16, HND, NONE, CSR, 3e6, 1e-6, 0, 2, {33, 90}, {2, 1}},
    {"f32_q_fp8_pages", 16, 8, 2, 128, FP8, F32, NHD, HEAD, CSR, 1.0, 1.0, 2, 2, {150, 61}, {1, 1}},
    {"bf16_q_int8_row_prefill", 16, 4, 2, 64, I8, BF16, NHD, ROW, DENSE, 1.0, 1.0, 0, 2, {80, 45}, {40, 9}},
    {"f32_q_bf16_pages", 32, 8, 4, 128, BF16, F32, NHD, NONE, DENSE, 1.0, 1.0, 0, 2, {100, 31}, {2, 1}},
    {"bench_shape_f16_p16", 16, 32, 8, 128, F16, F16, NHD, NONE, DENSE, 1.0, 1.0, 0, 2, {1500, 700}, {1, 1}},
    {"bench_shape_fp8_p1", 1, 32, 8, 128, FP8, F16, NHD, HEAD, DENSE, 1.0, 1.0, 0, 1, {1200}, {1}},
    {"bench_shape_int8_p1_hnd", 1, 32, 8, 128, I8, F16, HND, HEAD, CSR, 1.0, 1.0, 0, 2, {300, 513}, {1, 1}},
    {"odd_page_mqa_prefill", 5, 16, 1, 64, F16, F16, NHD, NONE, CSR, 1.0, 1.0, 0, 3, {37, 12, 64}, {5, 12, 3}},
};

static const cross_case garbage_cases[] = {
    {"garbage_dense_split", 16, 8, 2, 64, F16, F16, NHD, NONE, DENSE, 1.0, 1.0, 3, 2, {70, 33}, {2, 1}},
    {"garbage_csr_int8row", 4, 4, 2, 64, I8, F16, HND, ROW, CSR, 1.0, 1.0, 0, 3, {9, 30, 17}, {1, 4, 2}},
};

int main(int argc, char **argv)
{
    int failed = test_paged_main(argc, argv) != 0;
    if (argc < 2 || strcmp(argv[1], "cuda") != 0)
        return failed;
    qattn_ctx_params params = {.backend = "cuda"};
    if (emulated_ctx_create(&params, &ctx))
        return 1;
    ref_rng_seed_auto(&rng);
    enum { NC = sizeof(cross_cases) / sizeof(cross_cases[0]), NG = sizeof(garbage_cases) / sizeof(garbage_cases[0]) };
    struct CMUnitTest tests[NC + NG];
    for (int i = 0; i < NC; i++)
        tests[i] = (struct CMUnitTest){cross_cases[i].name, cross_check, NULL, NULL, (void *)&cross_cases[i]};
    for (int i = 0; i < NG; i++)
        tests[NC + i] = (struct CMUnitTest){garbage_cases[i].name, unchecked_garbage, NULL, NULL,
                                            (void *)&garbage_cases[i]};
    failed |= _cmocka_run_group_tests("cuda_emulator_extra", tests, NC + NG, NULL, NULL) != 0;
    qattn_ctx_destroy(ctx);
    return failed;
}
