/*
 * The CUDA backend's paged KV cache: planning (kernel variant, query tiling,
 * split-KV against the SM count and occupancy), the runs with their checks,
 * appends and merges; the kernels are cuda_paged_kernels.cuh, reached through
 * the context's runtime.
 *
 * With the checks on (the default), a run zeroes the workspace status words,
 * runs the table/Q check kernel, then the attention (and merge) kernels, which
 * write nothing when a status word is set, and waits for the stream to read
 * them; the core names what the check found. Without them everything is
 * enqueued asynchronously, and the kernels clamp every table entry so they
 * never read outside the buffers.
 */
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"
#include "env.h"

/* qattn_dtype F32/F16/BF16 share their values with QA_ELEM_*. */
static int elem_of(qattn_dtype dt) { return (int)dt; }

static void *device_ptr(const qattn_buffer *b, size_t offset) { return b ? (char *)b->impl + offset : NULL; }

/* ------------------------------------------------------------- planning */

typedef struct paged_config {
    int fmt, head_dim, row_warps, q_tiles, need_lo;
} paged_config;

/* The kernel variant and its launch shape: a pure function of the problem, so the run recomputes it. */
static paged_config configure(const qattn_paged_problem *pp)
{
    paged_config c;
    c.fmt = qattn_kv_format_of(&pp->cache);
    c.head_dim = (int)pp->cache.head_dim;
    const int64_t rows = pp->group * pp->max_q_len; /* query heads of a group x queries */
    c.row_warps = rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
    c.q_tiles = (int)((rows + 16 * c.row_warps - 1) / (16 * c.row_warps));
    /* f16 Q fits f16 operands; bf16 Q fits both (with a power-of-two row scale for f16's range);
     * f32 Q, and f16 Q against bf16 operands, carry a second (low) part. */
    c.need_lo = pp->q_dtype == QATTN_DTYPE_F32 || (pp->q_dtype == QATTN_DTYPE_F16 && c.fmt == QATTN_KV_FMT_BF16);
    return c;
}

/* n / d = umulhi(n, mul) >> shr for every 0 <= n < 2^31 (round-up multiplier; mul = 0 means d = 1). */
static void fast_divisor(uint32_t d, uint32_t *mul, uint32_t *shr)
{
    if (d <= 1) {
        *mul = *shr = 0;
        return;
    }
    uint32_t log2_up = 0;
    while (((uint64_t)1 << log2_up) < d)
        log2_up++;
    const uint32_t p = 31 + log2_up;
    *mul = (uint32_t)((((uint64_t)1 << p) + d - 1) / d);
    *shr = p - 32;
}

/* ------------------------------------------------- decode-time pruning */

/* The real backend prunes with QATTN_CUDA_PRUNE=1 only (no GPU has measured it yet); cuda-emu always. */
static qattn_status prune_gate(qattn_ctx *ctx, const char *what)
{
    qattn_env env;
    qattn_env_read(&env, NULL);
    if (env.cuda_prune || strcmp(qa_rt_of(ctx)->backend_name, "cuda-emu") == 0)
        return QATTN_OK;
    return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                           "%s on the cuda backend is off until it has been measured on a GPU: set QATTN_CUDA_PRUNE=1 "
                           "to run it",
                           what);
}

/* An upper bound on any (b, hk)'s selected pages (qattn_select_geometry at n = max_pages_per_seq): the
 * split-KV chooser and the splits' page ranges see it instead of max_pages_per_seq. */
static int64_t select_pages_bound(const qattn_paged_problem *pp, const qattn_select_problem *sel)
{
    const int64_t M = pp->max_pages_per_seq, P = pp->cache.page_size;
    int64_t k = sel->budget_pages;
    if (k <= 0) {
        const double want = (double)sel->budget_fraction * (double)M;
        k = (int64_t)want;
        k += (double)k < want;
    }
    if (sel->adaptive)
        k = sel->max_budget_pages > 0 ? (sel->max_budget_pages > k ? sel->max_budget_pages : k) : M;
    const int64_t recent = sel->recent_pages > 1 ? sel->recent_pages : 1, qpages = (pp->max_q_len + P - 1) / P + 1;
    const int64_t forced = sel->sink_pages + (recent > qpages ? recent : qpages);
    const int64_t bound = k > forced ? k : forced;
    return bound < M ? bound : M;
}

/* The selection's scratch in the backend's workspace region, after the split partials: the pages' score
 * keys and the selected physical pages [B * Hkv][max_pages] (uint32, int32), and for adaptive plans one
 * query row's upper and lower bounds per page (fp32, same shape). Byte offsets inside the region. */
typedef struct select_scratch {
    size_t keys, phys, ub, lb, total;
} select_scratch;

static select_scratch select_scratch_of(const qattn_plan *plan, size_t partials)
{
    const qattn_paged_problem *pp = &plan->pp;
    const size_t row = qattn_round_up((size_t)pp->batch * (size_t)pp->cache.heads_kv * (size_t)pp->max_pages_per_seq * 4u, 256);
    select_scratch s;
    s.keys = qattn_round_up(partials, 256);
    s.phys = s.keys + row;
    s.ub = s.phys + row;
    s.lb = s.ub + (plan->select.adaptive ? row : 0);
    s.total = s.lb + (plan->select.adaptive ? row : 0);
    return s;
}

qattn_status qa_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    qattn_paged_problem *pp = &plan->pp;
    const int64_t D = pp->cache.head_dim, P = pp->cache.page_size;
    if (D != 64 && D != 128)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld: the cuda paged-attention kernels take head dims 64 and 128",
                               (long long)D);
    if (pp->max_pages_per_seq > (INT32_MAX - 1024) / P)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "max_pages_per_seq * page_size = %lld * %lld: the cuda kernels index at most 2^31 - "
                               "1025 keys per sequence",
                               (long long)pp->max_pages_per_seq, (long long)P);
    if (pp->heads_q > INT32_MAX / pp->max_q_len)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "heads_q * max_q_len overflows the cuda kernels' row index");
    const bool select = plan->select.enabled;
    if (select && pp->batch * pp->cache.heads_kv * qattn_ceil_div(pp->max_pages_per_seq, 16) > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "the page selection's scoring grid exceeds the CUDA grid");
    if (select && pp->max_pages_per_seq >= (1 << 21))
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "max_pages_per_seq=%lld: the cuda page selection ranks fewer than 2^21 pages per sequence",
                               (long long)pp->max_pages_per_seq);
    qattn_status s = select ? prune_gate(ctx, "page selection") : QATTN_OK;
    if (s)
        return s;
    if ((s = qa_enter(ctx)))
        return s;
    const qa_rt *rt = qa_rt_of(ctx);
    const paged_config cfg = configure(pp);
    /* With a selection the attention reads at most this many pages of a sequence. */
    const int64_t pages = select ? select_pages_bound(pp, &plan->select) : pp->max_pages_per_seq;
    qa_device_props props;
    int smem = 0, per_sm = 0, e;
    if ((e = rt->device_props(ctx->device, &props)))
        return qa_fail(ctx, e, "querying the SM count");
    if ((e = rt->paged_prepare(cfg.fmt, cfg.head_dim, cfg.row_warps, cfg.need_lo, &smem, &per_sm)))
        return qa_fail(ctx, e, "setting the paged-attention kernel's shared-memory limit");
    if (per_sm < 1)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the paged-attention kernel needs %d bytes of shared memory per block, more than this "
                               "device gives",
                               smem);
    const int sms = props.sms;
    const int64_t items = pp->batch * pp->cache.heads_kv * cfg.q_tiles, slots = (int64_t)sms * per_sm;
    if (pp->num_splits == 0) {
        pp->num_splits = qattn_paged_choose_splits(items, slots, pages, P);
        snprintf(plan->why, sizeof(plan->why),
                 "%lld work items (sequences x KV heads x %d query tile(s) of %d rows) for %lld resident blocks "
                 "(%d SMs x %d): %d split(s) of the keys%s.",
                 (long long)items, cfg.q_tiles, 16 * cfg.row_warps, (long long)slots, sms, per_sm, pp->num_splits,
                 select ? " (of the selected pages)" : "");
    } else {
        snprintf(plan->why, sizeof(plan->why), "%d split(s) of the keys, as requested; %lld resident blocks.",
                 pp->num_splits, (long long)slots);
    }
    if (items > INT32_MAX / pp->num_splits)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "%lld work items x %d splits exceed the CUDA grid",
                               (long long)items, pp->num_splits);
    qattn_status partials = qattn_paged_partials_bytes(ctx, pp, &plan->backend_workspace);
    if (partials)
        return partials;
    if (select)
        plan->backend_workspace = select_scratch_of(plan, plan->backend_workspace).total;
    const int64_t per = qattn_ceil_div(pages, pp->num_splits);
    plan->q_tile = 16 * cfg.row_warps;
    plan->kv_tile = pp->num_splits > 1 ? (int)(per * P) : 0;
    plan->status_word = pp->check;
    snprintf(plan->kernel, sizeof(plan->kernel), "cuda_paged_%s%s_d%lld_m%d%s", qattn_dtype_name(pp->cache.dtype),
             cfg.fmt == QATTN_KV_FMT_I8_ROW ? "_row" : "", (long long)D, 16 * cfg.row_warps,
             select ? (plan->select.adaptive ? "_select_adaptive" : "_select") : "");
    return QATTN_OK;
}

/* ------------------------------------------------------------------ run */

static qa_paged_tables tables_of(const qattn_paged_problem *pp, const qattn_paged_args *a)
{
    qa_paged_tables t;
    memset(&t, 0, sizeof(t));
    t.qo_indptr = (const int32_t *)device_ptr(a->qo_indptr, 0);
    t.dense = pp->table == QATTN_PAGES_DENSE;
    if (t.dense) {
        t.block_table = (const int32_t *)device_ptr(a->block_table, 0);
        t.seq_lens = (const int32_t *)device_ptr(a->seq_lens, 0);
    } else {
        t.indptr = (const int32_t *)device_ptr(a->indptr, 0);
        t.indices = (const int32_t *)device_ptr(a->indices, 0);
        t.last_page_len = (const int32_t *)device_ptr(a->last_page_len, 0);
        t.indices_count = (int64_t)(a->indices->size / 4);
    }
    t.batch = (int32_t)pp->batch;
    t.max_pages = (int32_t)pp->max_pages_per_seq;
    t.page_size = (int32_t)pp->cache.page_size;
    t.num_pages = (int32_t)pp->cache.num_pages;
    t.total_q = (int32_t)pp->total_q;
    t.max_q_len = (int32_t)pp->max_q_len;
    return t;
}

static bool misaligned(const void *p, size_t align) { return p && (uintptr_t)p % align; }

/* Zeroes the status words and enqueues the check of a run's tables and queries
 * (the finite scan of Q and the page-table bounds), on the run's stream. */
static int enqueue_table_check(const qa_rt *rt, const qattn_paged_problem *pp, const qa_paged_tables *tab,
                               const void *q, uint32_t *status, void *stream)
{
    qa_paged_check_params cp;
    memset(&cp, 0, sizeof(cp));
    cp.tab = *tab;
    cp.q = q;
    cp.q_stride0 = pp->q_stride[0];
    cp.q_stride1 = pp->q_stride[1];
    cp.q_elem = elem_of(pp->q_dtype);
    cp.heads_q = (int32_t)pp->heads_q;
    cp.head_dim = (int32_t)pp->cache.head_dim;
    cp.status = status;
    int64_t scan = qattn_ceil_div(pp->total_q * pp->heads_q * pp->cache.head_dim, QA_PAGED_THREADS);
    scan = scan < 1 ? 1 : scan > 1024 ? 1024 : scan;
    int e = rt->memset_async(status, 0, QATTN_STATUS_BYTES, stream);
    return e ? e : rt->paged_check(pp->batch + scan, &cp, stream);
}

qattn_status qa_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a)
{
    const qattn_paged_problem *pp = &plan->pp;
    qattn_status s = qa_enter(ctx);
    if (s)
        return s;
    const qa_rt *rt = qa_rt_of(ctx);
    const paged_config cfg = configure(pp);
    void *stream = a->stream;
    const qattn_kv_cache_buffers *cb = a->cache;
    uint8_t *ws = (uint8_t *)device_ptr(a->workspace, a->workspace_offset);

    qa_paged_attn_params ap;
    memset(&ap, 0, sizeof(ap));
    ap.tab = tables_of(pp, a);
    ap.k = (const uint8_t *)device_ptr(cb->k, 0);
    ap.v = (const uint8_t *)device_ptr(cb->v, 0);
    ap.k_scale = (const float *)device_ptr(cb->k_scale, 0);
    ap.v_scale = (const float *)device_ptr(cb->v_scale, 0);
    if (misaligned(ap.k, 16) || misaligned(ap.v, 16) || misaligned(ap.k_scale, 4) ||
        misaligned(ap.v_scale, 4))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "the cache buffers must start on 16-byte boundaries (scales on 4): the kernels copy "
                               "pages 16 bytes at a time; check wrapped pointers");
    qattn_kv_cache_strides(&pp->cache, &ap.page_stride, &ap.tok_stride, &ap.head_stride);
    ap.heads_kv = (int32_t)pp->cache.heads_kv;
    ap.group = (int32_t)pp->group;
    ap.heads_q = (int32_t)pp->heads_q;
    fast_divisor((uint32_t)pp->cache.page_size, &ap.page_div_mul, &ap.page_div_shr);
    ap.q = device_ptr(a->q, a->q_offset);
    ap.q_stride0 = pp->q_stride[0];
    ap.q_stride1 = pp->q_stride[1];
    ap.o = device_ptr(a->o, a->o_offset);
    ap.o_stride0 = pp->o_stride[0];
    ap.o_stride1 = pp->o_stride[1];
    ap.lse = pp->return_lse ? (float *)device_ptr(a->lse, a->lse_offset) : NULL;
    ap.q_elem = elem_of(pp->q_dtype);
    ap.splits = pp->num_splits;
    const bool select = plan->select.enabled;
    ap.pages_per_split = (int32_t)qattn_ceil_div(select ? select_pages_bound(pp, &plan->select) : pp->max_pages_per_seq,
                                                 pp->num_splits);
    ap.q_tiles = cfg.q_tiles;
    ap.row_warps = cfg.row_warps;
    ap.causal = pp->causal;
    ap.need_lo = cfg.need_lo;
    ap.scale_log2 = pp->sm_scale * (float)QATTN_LOG2E;
    uint32_t *status = pp->check ? (uint32_t *)(ws + plan->ws.status) : NULL;
    ap.status = status;
    if (pp->num_splits > 1) {
        ap.part_o = (float *)(ws + plan->ws.backend);
        ap.part_lse = ap.part_o + (size_t)pp->num_splits * pp->total_q * pp->heads_q * pp->cache.head_dim;
    }

    int e;
    if (status) {
        if ((e = enqueue_table_check(rt, pp, &ap.tab, ap.q, status, stream)))
            return qa_fail(ctx, e, "launching the paged-table check");
    }
    if (select) { /* score every page, then each (b, hk)'s top-k: no host synchronization between them */
        size_t partials = 0;
        if ((s = qattn_paged_partials_bytes(ctx, pp, &partials)))
            return s;
        const select_scratch sc = select_scratch_of(plan, partials);
        uint8_t *region = ws + plan->ws.backend;
        qa_select_params sp;
        memset(&sp, 0, sizeof(sp));
        sp.tab = ap.tab;
        sp.k = ap.k;
        sp.k_scale = ap.k_scale;
        sp.meta = (const uint8_t *)device_ptr(cb->k_meta, 0);
        if (misaligned(sp.meta, 16))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "the cache's k_meta buffer must start on a 16-byte boundary: the selection reads "
                                   "the metadata 16 bytes at a time; check wrapped pointers");
        qattn_kv_meta_sizes ms;
        if ((s = qattn_kv_meta_validate(ctx, &pp->cache, &ms)))
            return s;
        sp.meta_scale_offset = (int64_t)ms.scale_offset;
        sp.page_stride = ap.page_stride;
        sp.tok_stride = ap.tok_stride;
        sp.head_stride = ap.head_stride;
        sp.heads_kv = ap.heads_kv;
        sp.group = ap.group;
        sp.head_dim = cfg.head_dim;
        sp.format = cfg.fmt;
        sp.q = ap.q;
        sp.q_stride0 = ap.q_stride0;
        sp.q_stride1 = ap.q_stride1;
        sp.q_elem = ap.q_elem;
        sp.sm_scale = pp->sm_scale;
        sp.adaptive = plan->select.adaptive;
        sp.budget_pages = plan->select.budget_pages;
        sp.budget_fraction = plan->select.budget_fraction;
        sp.sink_pages = plan->select.sink_pages;
        sp.recent_pages = plan->select.recent_pages;
        sp.epsilon = plan->select.epsilon;
        sp.max_budget_pages = plan->select.max_budget_pages;
        /* about 1024 scoring blocks or more, so that one sequence still fills the GPU */
        const int64_t all = pp->batch * pp->cache.heads_kv * pp->max_pages_per_seq;
        int32_t chunk = 16;
        while (chunk < QA_SELECT_CHUNK_PAGES && (int64_t)chunk * 1024 < all)
            chunk *= 2;
        sp.chunk_pages = chunk;
        /* shared memory for the rows there are (decode: the group's heads), so that many blocks stay resident */
        const int64_t qrows = pp->group * pp->max_q_len;
        sp.score_rows = (int32_t)(qrows < QA_SELECT_SCORE_ROWS ? qrows : QA_SELECT_SCORE_ROWS);
        sp.chunks = (int32_t)qattn_ceil_div(pp->max_pages_per_seq, chunk);
        sp.keys = (uint32_t *)(region + sc.keys);
        sp.phys = (int32_t *)(region + sc.phys);
        sp.ub = plan->select.adaptive ? (float *)(region + sc.ub) : NULL;
        sp.lb = plan->select.adaptive ? (float *)(region + sc.lb) : NULL;
        sp.counts = (int32_t *)(ws + plan->ws.select_counts);
        sp.pages = (int32_t *)(ws + plan->ws.select_pages);
        sp.status = status;
        const long long rows = (long long)pp->batch * pp->cache.heads_kv;
        if ((e = rt->select_score(rows * sp.chunks, &sp, stream)) || (e = rt->select_topk(rows, &sp, stream)))
            return qa_fail(ctx, e, "launching the page selection");
        ap.sel_counts = sp.counts;
        ap.sel_phys = sp.phys;
    }
    const long long grid = (long long)pp->batch * pp->cache.heads_kv * cfg.q_tiles * pp->num_splits;
    if ((e = rt->paged_attention(cfg.fmt, cfg.head_dim, grid, &ap, stream)))
        return qa_fail(ctx, e, "launching the paged-attention kernel");
    if (pp->num_splits > 1) {
        qa_merge_params mp;
        memset(&mp, 0, sizeof(mp));
        const int64_t D = pp->cache.head_dim, Hq = pp->heads_q, R = pp->total_q;
        mp.v = ap.part_o;
        mp.v_stride[0] = R * Hq * D;
        mp.v_stride[1] = Hq * D;
        mp.v_stride[2] = D;
        mp.s = ap.part_lse;
        mp.s_stride[0] = R * Hq;
        mp.s_stride[1] = Hq;
        mp.s_stride[2] = 1;
        mp.o = ap.o;
        mp.o_stride[0] = pp->o_stride[0];
        mp.o_stride[1] = pp->o_stride[1];
        mp.lse = ap.lse;
        mp.v_elem = QA_ELEM_F32;
        mp.o_elem = ap.q_elem;
        mp.states = pp->num_splits;
        mp.heads = (int32_t)Hq;
        mp.head_dim = (int32_t)D;
        mp.rows = R;
        mp.qo_indptr = ap.tab.qo_indptr;
        mp.batch = ap.tab.batch;
        mp.status = status;
        /* a warp per 32 channels */
        int64_t blocks = qattn_ceil_div(R * Hq * qattn_ceil_div(D, 32), QA_PAGED_THREADS / 32);
        if ((e = rt->merge(blocks < 65536 ? blocks : 65536, &mp, stream)))
            return qa_fail(ctx, e, "launching the split-KV merge");
    }
    if (status) {
        uint32_t words[QATTN_STATUS_WORDS];
        if ((e = rt->read_sync(words, status, QATTN_STATUS_BYTES, stream)))
            return qa_fail(ctx, e, "reading the paged check's status words");
        return qattn_paged_status_error(ctx, plan, a, words);
    }
    return QATTN_OK;
}

/* --------------------------------------------------------------- append */

static pthread_mutex_t append_lock = PTHREAD_MUTEX_INITIALIZER; /* guards the static status words */

qattn_status qa_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *a, const qattn_kv_cache_sizes *sizes)
{
    (void)sizes;
    qattn_status s = a->buffers->k_meta ? prune_gate(ctx, "page metadata (k_meta)") : QATTN_OK;
    if (s)
        return s;
    if ((s = qa_enter(ctx)))
        return s;
    const qa_rt *rt = qa_rt_of(ctx);
    const qattn_kv_cache_desc *c = a->cache;
    void *stream = a->stream;
    qa_append_params p;
    memset(&p, 0, sizeof(p));
    p.slots = (const int64_t *)device_ptr(a->slot_mapping, a->slot_mapping_offset);
    p.num_tokens = a->num_tokens;
    p.capacity = c->num_pages * c->page_size;
    p.k_new = device_ptr(a->k_new, a->k_new_offset);
    p.v_new = device_ptr(a->v_new, a->v_new_offset);
    p.new_stride0 = a->new_stride[0];
    p.new_stride1 = a->new_stride[1];
    p.new_elem = elem_of(a->new_dtype);
    p.heads_kv = (int32_t)c->heads_kv;
    p.head_dim = (int32_t)c->head_dim;
    p.page_size = (int32_t)c->page_size;
    p.cache_format = qattn_kv_format_of(c);
    p.k = (uint8_t *)device_ptr(a->buffers->k, 0);
    p.v = (uint8_t *)device_ptr(a->buffers->v, 0);
    p.k_scale = (float *)device_ptr(a->buffers->k_scale, 0);
    p.v_scale = (float *)device_ptr(a->buffers->v_scale, 0);
    if (misaligned(p.k_scale, 4) || misaligned(p.v_scale, 4) ||
        ((c->dtype == QATTN_DTYPE_F16 || c->dtype == QATTN_DTYPE_BF16) && (misaligned(p.k, 2) || misaligned(p.v, 2))))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "the cache buffers are not aligned to their elements");
    qattn_kv_cache_strides(c, &p.page_stride, &p.tok_stride, &p.head_stride);
    int e;
    if (!(a->flags & QATTN_FLAG_NO_FINITE_CHECK)) {
        /* Check everything first (range, duplicates, NaN/Inf, scales), then write. */
        pthread_mutex_lock(&append_lock);
        uint32_t words[QATTN_STATUS_WORDS] = {0};
        if (!(p.status = rt->append_status())) {
            pthread_mutex_unlock(&append_lock);
            return qa_fail(ctx, rt->last_error(), "finding the append check's status words");
        }
        const int64_t dup_blocks = qattn_ceil_div(a->num_tokens, QA_PAGED_THREADS);
        int64_t scan = qattn_ceil_div(a->num_tokens * c->heads_kv * c->head_dim, QA_PAGED_THREADS);
        scan = scan < 1 ? 1 : scan > 2048 ? 2048 : scan;
        if (!(e = rt->memset_async(p.status, 0, QATTN_STATUS_BYTES, stream)) &&
            !(e = rt->append_check(dup_blocks + scan, dup_blocks, &p, stream)))
            e = rt->read_sync(words, p.status, QATTN_STATUS_BYTES, stream);
        pthread_mutex_unlock(&append_lock);
        if (e)
            return qa_fail(ctx, e, "checking the appended tokens");
        if ((s = qattn_kv_append_status_error(ctx, a, words)))
            return s;
    }
    const int64_t warps = a->num_tokens * c->heads_kv * 2;
    int64_t blocks = qattn_ceil_div(warps, QA_PAGED_THREADS / 32);
    if ((e = rt->append_write(blocks < 65536 ? blocks : 65536, &p, stream)))
        return qa_fail(ctx, e, "launching the cache append");
    if (a->buffers->k_meta) { /* then the metadata of every page the append wrote, stream-ordered */
        qa_meta_params mp;
        memset(&mp, 0, sizeof(mp));
        mp.slots = p.slots;
        mp.num_tokens = p.num_tokens;
        mp.capacity = p.capacity;
        mp.k = p.k;
        mp.k_scale = p.k_scale;
        mp.meta = (uint8_t *)device_ptr(a->buffers->k_meta, 0);
        qattn_kv_meta_sizes ms;
        if ((s = qattn_kv_meta_validate(ctx, c, &ms)))
            return s;
        mp.scale_offset = (int64_t)ms.scale_offset;
        mp.page_stride = p.page_stride;
        mp.tok_stride = p.tok_stride;
        mp.head_stride = p.head_stride;
        mp.heads_kv = p.heads_kv;
        mp.head_dim = p.head_dim;
        mp.page_size = p.page_size;
        mp.cache_format = p.cache_format;
        int64_t meta_blocks = qattn_ceil_div(a->num_tokens * c->heads_kv, QA_PAGED_THREADS / 32);
        if ((e = rt->meta_update(meta_blocks < 65536 ? meta_blocks : 65536, &mp, stream)))
            return qa_fail(ctx, e, "launching the page-metadata update");
    }
    return QATTN_OK;
}

/* ------------------------------------------------------------ page mass */

qattn_status qa_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a,
                                qattn_buffer *mass, size_t mass_offset)
{
    const qattn_paged_problem *pp = &plan->pp;
    qattn_status s = prune_gate(ctx, "the page mass");
    if (s)
        return s;
    if ((s = qa_enter(ctx)))
        return s;
    const long long grid = (long long)pp->batch * pp->cache.heads_kv * pp->max_pages_per_seq;
    if (grid > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "the page mass's %lld blocks exceed the CUDA grid", grid);
    const qa_rt *rt = qa_rt_of(ctx);
    const paged_config cfg = configure(pp);
    const qattn_kv_cache_buffers *cb = a->cache;
    void *stream = a->stream;
    qa_mass_params mp;
    memset(&mp, 0, sizeof(mp));
    mp.tab = tables_of(pp, a);
    mp.k = (const uint8_t *)device_ptr(cb->k, 0);
    mp.k_scale = (const float *)device_ptr(cb->k_scale, 0);
    qattn_kv_cache_strides(&pp->cache, &mp.page_stride, &mp.tok_stride, &mp.head_stride);
    mp.heads_kv = (int32_t)pp->cache.heads_kv;
    mp.group = (int32_t)pp->group;
    mp.heads_q = (int32_t)pp->heads_q;
    mp.head_dim = cfg.head_dim;
    mp.format = cfg.fmt;
    mp.causal = pp->causal;
    mp.q = device_ptr(a->q, a->q_offset);
    mp.q_stride0 = pp->q_stride[0];
    mp.q_stride1 = pp->q_stride[1];
    mp.q_elem = elem_of(pp->q_dtype);
    mp.sm_scale = pp->sm_scale;
    mp.lse = (const float *)device_ptr(a->lse, a->lse_offset);
    mp.mass = (float *)device_ptr(mass, mass_offset);
    int e;
    if (pp->check && a->workspace) { /* the tables first: the mass kernel only clamps */
        uint32_t *status = (uint32_t *)((uint8_t *)device_ptr(a->workspace, a->workspace_offset) + plan->ws.status);
        uint32_t words[QATTN_STATUS_WORDS];
        if ((e = enqueue_table_check(rt, pp, &mp.tab, mp.q, status, stream)) ||
            (e = rt->read_sync(words, status, QATTN_STATUS_BYTES, stream)))
            return qa_fail(ctx, e, "checking the page mass's tables");
        if ((s = qattn_paged_status_error(ctx, plan, a, words)))
            return s;
    }
    if ((e = rt->page_mass(grid, &mp, stream)))
        return qa_fail(ctx, e, "launching the page mass");
    return QATTN_OK;
}

/* ---------------------------------------------------------------- merge */

qattn_status qa_merge_states(qattn_ctx *ctx, const qattn_merge_desc *d, const qattn_merge_args *a)
{
    qattn_status s = qa_enter(ctx);
    if (s)
        return s;
    qa_merge_params p;
    memset(&p, 0, sizeof(p));
    p.v = device_ptr(a->v, a->v_offset);
    memcpy(p.v_stride, d->v_stride, sizeof(p.v_stride));
    p.s = (const float *)device_ptr(a->s, a->s_offset);
    memcpy(p.s_stride, d->s_stride, sizeof(p.s_stride));
    p.o = device_ptr(a->o, a->o_offset);
    p.o_stride[0] = d->o_stride[0];
    p.o_stride[1] = d->o_stride[1];
    p.lse = a->lse ? (float *)device_ptr(a->lse, a->lse_offset) : NULL;
    p.v_elem = elem_of(d->v_dtype);
    p.o_elem = elem_of(d->o_dtype);
    p.states = (int32_t)d->num_states;
    p.heads = (int32_t)d->heads;
    p.head_dim = (int32_t)d->head_dim;
    p.rows = d->rows;
    int64_t blocks = qattn_ceil_div(d->rows * d->heads * qattn_ceil_div(d->head_dim, 32), QA_PAGED_THREADS / 32);
    int e = qa_rt_of(ctx)->merge(blocks < 65536 ? blocks : 65536, &p, a->stream);
    return e ? qa_fail(ctx, e, "launching merge_states") : QATTN_OK;
}
