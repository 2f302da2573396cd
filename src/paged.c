/* The paged KV cache: validation of caches, appends, paged plans and runs,
 * merge-states, and the host-side page pool and table builder. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "quant.h"

/* a * b * ... for non-negative factors, false on overflow. */
static bool mul3(size_t *out, int64_t a, int64_t b, int64_t c)
{
    int64_t f[3] = {a, b, c};
    size_t r = 1;
    for (int i = 0; i < 3; i++) {
        if (f[i] < 0 || (f[i] && r > SIZE_MAX / (size_t)f[i]))
            return false;
        r *= (size_t)f[i];
    }
    *out = r;
    return true;
}

static qattn_status unsupported_slot(qattn_ctx *ctx, const char *what)
{
    return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "backend %s does not implement %s", ctx->backend->name, what);
}

qattn_status qattn_kv_cache_validate(qattn_ctx *ctx, const qattn_kv_cache_desc *d, qattn_kv_cache_sizes *sizes)
{
    if (!d)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "the KV-cache description is NULL");
    const struct {
        const char *name;
        int64_t value, max;
    } dims[] = {{"num_pages", d->num_pages, INT32_MAX},
                {"page_size", d->page_size, INT32_MAX},
                {"heads_kv", d->heads_kv, 65536},
                {"head_dim", d->head_dim, 65536}};
    for (int i = 0; i < 4; i++)
        if (dims[i].value <= 0 || dims[i].value > dims[i].max)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "cache.%s=%lld must be in [1, %lld]",
                                   dims[i].name, (long long)dims[i].value, (long long)dims[i].max);
    if ((unsigned)d->layout > QATTN_KV_HND)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "cache.layout=%d is not a qattn_kv_layout",
                               (int)d->layout);
    switch (d->dtype) {
    case QATTN_DTYPE_F16:
    case QATTN_DTYPE_BF16:
        if (d->scales != QATTN_KV_SCALES_NONE)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "cache.scales must be NONE for %s pages",
                                   qattn_dtype_name(d->dtype));
        break;
    case QATTN_DTYPE_FP8_E4M3:
        if (d->scales != QATTN_KV_SCALES_PER_HEAD)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "cache.scales must be PER_HEAD for fp8e4m3 pages (static per-head scales)");
        break;
    case QATTN_DTYPE_I8:
        if (d->scales != QATTN_KV_SCALES_PER_HEAD && d->scales != QATTN_KV_SCALES_PER_ROW)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "cache.scales must be PER_HEAD or PER_ROW for i8 pages");
        break;
    default:
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "cache.dtype=%s: pages hold f16, bf16, fp8e4m3 or i8", qattn_dtype_name(d->dtype));
    }
    qattn_kv_cache_sizes s = {0};
    size_t es = qattn_dtype_size(d->dtype);
    if (!mul3(&s.page_bytes, d->page_size, d->heads_kv, d->head_dim) || s.page_bytes > SIZE_MAX / es ||
        !mul3(&s.cache_bytes, d->num_pages, (int64_t)(s.page_bytes * es), 1))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "the KV cache's size overflows size_t");
    s.page_bytes *= es;
    if (d->scales == QATTN_KV_SCALES_PER_HEAD)
        s.scale_bytes = (size_t)d->heads_kv * 4;
    else if (d->scales == QATTN_KV_SCALES_PER_ROW && !mul3(&s.scale_bytes, d->num_pages * 4, d->page_size, d->heads_kv))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "the KV cache's scale size overflows size_t");
    if (sizes)
        *sizes = s;
    return QATTN_OK;
}

qattn_status qattn_kv_cache_bytes(qattn_ctx *ctx, const qattn_kv_cache_desc *desc, qattn_kv_cache_sizes *sizes)
{
    if (!sizes)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sizes is NULL");
    return qattn_kv_cache_validate(ctx, desc, sizes);
}

/* A buffer argument: present, of this context, large enough, aligned. */
static qattn_status check_buffer(qattn_ctx *ctx, const char *name, const qattn_buffer *buf, size_t offset,
                                 size_t bytes, size_t align)
{
    if (!buf)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", name);
    if (buf->ctx != ctx)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s belongs to another context", name);
    if (!qattn_buffer_fits(buf, offset, bytes))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "%s: %zu bytes at offset %zu do not fit in its %zu-byte buffer", name, bytes, offset,
                               buf->size);
    if (align > 1 && offset % align)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s offset %zu is not a multiple of %zu bytes", name,
                               offset, align);
    if (!qattn_buffer_aligned(buf, offset, align))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "%s: the address %p of its first element is not a multiple of %zu bytes (wrapped "
                               "memory must be aligned for its elements)",
                               name, (void *)(buf->alias_base + offset), align < 16 ? align : (size_t)16);
    return QATTN_OK;
}

static qattn_status check_cache_buffers(qattn_ctx *ctx, const qattn_kv_cache_desc *cache,
                                        const qattn_kv_cache_sizes *sizes, const qattn_kv_cache_buffers *b)
{
    qattn_status s;
    if (!b)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "the cache buffers are NULL");
    const size_t es = qattn_dtype_size(cache->dtype); /* pages are read and written element by element */
    if ((s = check_buffer(ctx, "cache k", b->k, 0, sizes->cache_bytes, es)) ||
        (s = check_buffer(ctx, "cache v", b->v, 0, sizes->cache_bytes, es)))
        return s;
    if (b->k == b->v)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "cache k and v must be different buffers");
    if (cache->scales != QATTN_KV_SCALES_NONE) {
        if ((s = check_buffer(ctx, "cache k_scale", b->k_scale, 0, sizes->scale_bytes, 4)) ||
            (s = check_buffer(ctx, "cache v_scale", b->v_scale, 0, sizes->scale_bytes, 4)))
            return s;
    } else if (b->k_scale || b->v_scale) {
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "scale buffers were given for unscaled %s pages",
                               qattn_dtype_name(cache->dtype));
    }
    if (b->k_meta) {
        qattn_kv_meta_sizes ms;
        if ((s = qattn_kv_meta_validate(ctx, cache, &ms)) ||
            (s = check_buffer(ctx, "cache k_meta", b->k_meta, 0, ms.meta_bytes, 4)))
            return s;
        if (b->k_meta == b->k || b->k_meta == b->v)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "cache k_meta must be its own buffer");
    }
    return QATTN_OK;
}

static size_t meta_bytes(const qattn_kv_cache_desc *cache, const qattn_kv_cache_buffers *b)
{
    qattn_kv_meta_sizes ms = {0};
    if (b->k_meta)
        qattn_kv_meta_validate(NULL, cache, &ms); /* validated with the cache already */
    return ms.meta_bytes;
}

/* A [tokens, heads, D] host-layout tensor with token and head strides, as a
 * 4-D descriptor so the common checks apply. */
/* Dim names for the messages of row tensors (rows_tensor) and merge states. */
static const char *const row_dims[4] = {"-", "heads", "tokens", "head_dim"};
static const char *const state_dims[4] = {"states", "rows", "heads", "head_dim"};

static qattn_tensor_desc rows_tensor(qattn_dtype dt, int64_t tokens, int64_t heads, int64_t d, const int64_t st[2])
{
    /* A batch of one: its stride never moves and is not checked for overlap. */
    qattn_tensor_desc t = {.dtype = dt, .shape = {1, heads, tokens, d}, .stride = {1, st[1], st[0], 1}};
    return t;
}

qattn_status qattn_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *a)
{
    if (!ctx)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "ctx is NULL");
    if (!a)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args is NULL");
    qattn_kv_cache_sizes sizes;
    qattn_status s = qattn_kv_cache_validate(ctx, a->cache, &sizes);
    if (s || (s = check_cache_buffers(ctx, a->cache, &sizes, a->buffers)))
        return s;
    if (a->num_tokens < 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "num_tokens=%lld must be >= 0",
                               (long long)a->num_tokens);
    if (a->flags & ~(uint32_t)QATTN_FLAG_NO_FINITE_CHECK)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "flags=0x%x has unknown bits", (unsigned)a->flags);
    if (a->num_tokens == 0)
        return QATTN_OK;
    if (a->new_dtype != QATTN_DTYPE_F32 && a->new_dtype != QATTN_DTYPE_F16 && a->new_dtype != QATTN_DTYPE_BF16)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "new_dtype=%s: new tokens are f32, f16 or bf16",
                               qattn_dtype_name(a->new_dtype));
    qattn_tensor_desc t = rows_tensor(a->new_dtype, a->num_tokens, a->cache->heads_kv, a->cache->head_dim,
                                      a->new_stride);
    size_t bytes;
    if ((s = qattn_check_tensor(ctx, "k_new/v_new", row_dims, &t, &bytes)))
        return s;
    size_t es = qattn_dtype_size(a->new_dtype);
    if ((s = check_buffer(ctx, "k_new", a->k_new, a->k_new_offset, bytes, es)) ||
        (s = check_buffer(ctx, "v_new", a->v_new, a->v_new_offset, bytes, es)) ||
        (s = check_buffer(ctx, "slot_mapping", a->slot_mapping, a->slot_mapping_offset,
                          (size_t)a->num_tokens * 8, 8)))
        return s;
    const qattn_kv_cache_buffers *b = a->buffers;
    const qattn_span outs[5] = {{"cache k", b->k, 0, sizes.cache_bytes},
                                {"cache v", b->v, 0, sizes.cache_bytes},
                                {"cache k_scale", b->k_scale, 0, sizes.scale_bytes},
                                {"cache v_scale", b->v_scale, 0, sizes.scale_bytes},
                                {"cache k_meta", b->k_meta, 0, meta_bytes(a->cache, b)}};
    const qattn_span ins[3] = {{"k_new", a->k_new, a->k_new_offset, bytes},
                               {"v_new", a->v_new, a->v_new_offset, bytes},
                               {"slot_mapping", a->slot_mapping, a->slot_mapping_offset, (size_t)a->num_tokens * 8}};
    if ((s = qattn_check_outputs(ctx, outs, 5, ins, 3)))
        return s;
    if (!ctx->backend->kv_append)
        return unsupported_slot(ctx, "the paged KV cache (kv_append)");
    if (b->k_meta && !(ctx->backend->prune & QATTN_PRUNE_CAP_META))
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "backend %s does not keep page metadata (k_meta)",
                               ctx->backend->name);
    return ctx->backend->kv_append(ctx, a, &sizes);
}

int qattn_paged_choose_splits(int64_t items, int64_t slots, int64_t max_pages, int64_t page_size)
{
    const int64_t ramp_keys = 64, merge_keys = 256;
    int64_t best_cost = INT64_MAX;
    int best = 1;
    const int64_t limit = max_pages < 1024 ? max_pages : 1024;
    for (int64_t s = 1; s <= limit; s++) {
        int64_t per = (max_pages + s - 1) / s;
        if ((max_pages + per - 1) / per != s) /* trailing splits past the last page would be empty */
            continue;
        int64_t cost = ((items * s + slots - 1) / slots) * (per * page_size + ramp_keys) + (s > 1 ? merge_keys : 0);
        if (cost < best_cost) {
            best_cost = cost;
            best = (int)s;
        }
    }
    return best;
}

qattn_status qattn_paged_plan_create(qattn_ctx *ctx, const qattn_paged_desc *d, qattn_plan **out)
{
    return qattn_paged_plan_create_internal(ctx, d, NULL, NULL, out);
}

qattn_status qattn_paged_sparse_plan_create(qattn_ctx *ctx, const qattn_paged_desc *desc,
                                            const qattn_sparse_desc *sparse, qattn_plan **out)
{
    return qattn_paged_plan_create_internal(ctx, desc, sparse, NULL, out);
}

qattn_status qattn_paged_plan_create_internal(qattn_ctx *ctx, const qattn_paged_desc *d,
                                              const qattn_sparse_desc *sparse, const qattn_select_problem *select,
                                              qattn_plan **out)
{
    if (!out)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "out (the plan pointer) is NULL");
    *out = NULL;
    if (!ctx)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "ctx is NULL");
    if (!d)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "desc is NULL");
    qattn_paged_problem pp = {.cache = d->cache};
    qattn_status s = qattn_kv_cache_validate(ctx, &d->cache, &pp.sizes);
    if (s)
        return s;
    if ((unsigned)d->table > QATTN_PAGES_CSR)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "table=%d is not a qattn_page_table_kind",
                               (int)d->table);
    const struct {
        const char *name;
        int64_t value;
    } counts[] = {{"batch", d->batch},
                  {"max_pages_per_seq", d->max_pages_per_seq},
                  {"total_q", d->total_q},
                  {"max_q_len", d->max_q_len},
                  {"heads_q", d->heads_q}};
    for (int i = 0; i < 5; i++)
        if (counts[i].value <= 0 || counts[i].value > INT32_MAX)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s=%lld must be in [1, 2^31)", counts[i].name,
                                   (long long)counts[i].value);
    /* Work counts (sequences x heads x query tiles, x splits) stay far inside
     * 64 bits in every backend's planner. */
    if ((double)d->batch * (double)d->heads_q * (double)d->max_q_len > 0x1p52)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "batch %lld x heads_q %lld x max_q_len %lld exceeds 2^52 query rows",
                               (long long)d->batch, (long long)d->heads_q, (long long)d->max_q_len);
    if (d->max_q_len > d->total_q)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "max_q_len=%lld exceeds total_q=%lld",
                               (long long)d->max_q_len, (long long)d->total_q);
    if (d->heads_q % d->cache.heads_kv)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "heads_q (%lld) must be a multiple of the cache's heads_kv (%lld)",
                               (long long)d->heads_q, (long long)d->cache.heads_kv);
    if (d->q_dtype != QATTN_DTYPE_F32 && d->q_dtype != QATTN_DTYPE_F16 && d->q_dtype != QATTN_DTYPE_BF16)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "q_dtype=%s: queries are f32, f16 or bf16",
                               qattn_dtype_name(d->q_dtype));
    if (!isfinite(d->sm_scale) || fabsf(d->sm_scale) > QATTN_SM_SCALE_MAX)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "sm_scale must be finite and at most %g in magnitude, got %g", (double)QATTN_SM_SCALE_MAX,
                               (double)d->sm_scale);
    if (d->num_splits < 0 || d->num_splits > 1024)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "num_splits=%d must be in [0, 1024]", d->num_splits);
    if (d->flags & ~(uint32_t)QATTN_FLAG_NO_FINITE_CHECK)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "flags=0x%x has unknown bits", (unsigned)d->flags);
    qattn_tensor_desc qt = rows_tensor(d->q_dtype, d->total_q, d->heads_q, d->cache.head_dim, d->q_stride);
    qattn_tensor_desc ot = rows_tensor(d->q_dtype, d->total_q, d->heads_q, d->cache.head_dim, d->o_stride);
    if ((s = qattn_check_tensor(ctx, "q", row_dims, &qt, &pp.q_bytes)) || (s = qattn_check_tensor(ctx, "o", row_dims, &ot, &pp.o_bytes)))
        return s;
    pp.table = d->table;
    pp.batch = d->batch;
    pp.max_pages_per_seq = d->max_pages_per_seq;
    pp.total_q = d->total_q;
    pp.max_q_len = d->max_q_len;
    pp.heads_q = d->heads_q;
    pp.group = d->heads_q / d->cache.heads_kv;
    pp.q_dtype = d->q_dtype;
    memcpy(pp.q_stride, d->q_stride, sizeof(pp.q_stride));
    memcpy(pp.o_stride, d->o_stride, sizeof(pp.o_stride));
    pp.causal = d->causal != 0;
    pp.return_lse = d->return_lse != 0;
    pp.check = !(d->flags & QATTN_FLAG_NO_FINITE_CHECK);
    pp.sm_scale = d->sm_scale != 0.f ? d->sm_scale : (float)(1.0 / sqrt((double)d->cache.head_dim));
    pp.num_splits = d->num_splits;
    pp.lse_bytes = (size_t)d->total_q * (size_t)d->heads_q * 4;

    if (!ctx->backend->paged_plan_init)
        return unsupported_slot(ctx, "paged attention");
    qattn_sparse_problem sp = {0};
    if (sparse) { /* a cache is pruned by its page tables: the window and sinks are what apply here */
        if (sparse->layout != QATTN_SPARSE_NO_LAYOUT || sparse->pv_threshold != 0.f)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse: paged plans take a window and sinks only (no block layout, no "
                                   "pv_threshold)");
        const qattn_problem unused = {0}; /* sizes only matter to layouts */
        if ((s = qattn_sparse_validate(ctx, &unused, sparse, &sp)))
            return s;
        if (!(ctx->backend->sparse & QATTN_SPARSE_CAP_PAGED_WINDOW))
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "backend %s does not run a window or sinks over a paged cache",
                                   ctx->backend->name);
    }
    /* The adaptive bound counts every key of the selected full pages as read; a
     * causal row of a chunk does not see the later query tokens' pages, so the
     * certificate would not hold for it. */
    if (select && select->adaptive && pp.causal && pp.max_q_len > 1)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "select: the adaptive budget is for decode (max_q_len 1) or non-causal plans; a "
                               "causal chunk (max_q_len=%lld) takes a fixed budget",
                               (long long)pp.max_q_len);
    qattn_plan *plan = calloc(1, sizeof(*plan));
    if (!plan)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the plan");
    plan->ctx = ctx;
    plan->paged = true;
    plan->pp = pp;
    plan->sparse = sp;
    if (select)
        plan->select = *select;
    plan->precision = QATTN_PRECISION_EXACT;
    s = ctx->backend->paged_plan_init(ctx, plan);
    if (!s && plan->pp.num_splits < 1)
        s = qattn_set_error(ctx, QATTN_ERR_INTERNAL, "backend %s left num_splits unresolved", ctx->backend->name);
    return qattn_plan_finish(plan, s, out);
}

qattn_status qattn_paged_check_args(const qattn_plan *plan, const qattn_paged_args *a)
{
    qattn_ctx *ctx = plan->ctx;
    if (!plan->paged)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "this plan is not paged: run it with qattn_run");
    if (!a)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args is NULL");
    const qattn_paged_problem *pp = &plan->pp;
    qattn_status s = check_cache_buffers(ctx, &pp->cache, &pp->sizes, a->cache);
    if (s)
        return s;
    if (plan->select.enabled && !a->cache->k_meta)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "this plan selects pages by their metadata: the cache's k_meta buffer is NULL");
    size_t es = qattn_dtype_size(pp->q_dtype), b4 = (size_t)pp->batch * 4;
    if ((s = check_buffer(ctx, "q", a->q, a->q_offset, pp->q_bytes, es)) ||
        (s = check_buffer(ctx, "o", a->o, a->o_offset, pp->o_bytes, es)) ||
        (s = check_buffer(ctx, "qo_indptr", a->qo_indptr, 0, b4 + 4, 4)))
        return s;
    if (pp->return_lse) {
        if ((s = check_buffer(ctx, "lse", a->lse, a->lse_offset, pp->lse_bytes, 4)))
            return s;
    } else if (a->lse) {
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "lse is set but the plan was made without return_lse");
    }
    if (pp->table == QATTN_PAGES_DENSE) {
        size_t table_bytes = (size_t)pp->max_pages_per_seq * b4; /* both < 2^31: no overflow in 64 bits */
        if ((s = check_buffer(ctx, "block_table", a->block_table, 0, table_bytes, 4)) ||
            (s = check_buffer(ctx, "seq_lens", a->seq_lens, 0, b4, 4)))
            return s;
    } else {
        if ((s = check_buffer(ctx, "indptr", a->indptr, 0, b4 + 4, 4)) ||
            (s = check_buffer(ctx, "indices", a->indices, 0, 4, 4)) ||
            (s = check_buffer(ctx, "last_page_len", a->last_page_len, 0, b4, 4)))
            return s;
    }
    if (plan->ws.total && (s = check_buffer(ctx, "workspace", a->workspace, a->workspace_offset, plan->ws.total,
                                            QATTN_WS_ALIGN)))
        return s;
    return QATTN_OK;
}

qattn_status qattn_paged_run(const qattn_plan *plan, const qattn_paged_args *a)
{
    if (!plan)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "plan is NULL");
    qattn_ctx *ctx = plan->ctx;
    qattn_status s = qattn_paged_check_args(plan, a);
    if (s)
        return s;
    const qattn_paged_problem *pp = &plan->pp;
    const size_t b4 = (size_t)pp->batch * 4;
    /* Outputs may share no byte with anything the kernels read, tables included. */
    const qattn_kv_cache_buffers *c = a->cache;
    const bool dense = pp->table == QATTN_PAGES_DENSE;
    const qattn_span ins[12] = {
        {"args.q", a->q, a->q_offset, pp->q_bytes},
        {"cache k", c->k, 0, pp->sizes.cache_bytes},
        {"cache v", c->v, 0, pp->sizes.cache_bytes},
        {"cache k_scale", c->k_scale, 0, pp->sizes.scale_bytes},
        {"cache v_scale", c->v_scale, 0, pp->sizes.scale_bytes},
        {"args.qo_indptr", a->qo_indptr, 0, b4 + 4},
        {"args.block_table", dense ? a->block_table : NULL, 0, (size_t)pp->max_pages_per_seq * b4},
        {"args.seq_lens", dense ? a->seq_lens : NULL, 0, b4},
        {"args.indptr", dense ? NULL : a->indptr, 0, b4 + 4},
        {"args.indices", dense ? NULL : a->indices, 0, a->indices ? a->indices->size : 0},
        {"args.last_page_len", dense ? NULL : a->last_page_len, 0, b4},
        {"cache k_meta", plan->select.enabled ? c->k_meta : NULL, 0, meta_bytes(&pp->cache, c)}};
    const qattn_span outs[3] = {{"args.o", a->o, a->o_offset, pp->o_bytes},
                                {"args.lse", pp->return_lse ? a->lse : NULL, a->lse_offset, pp->lse_bytes},
                                {"args.workspace", plan->ws.total ? a->workspace : NULL, a->workspace_offset,
                                 plan->ws.total}};
    if ((s = qattn_check_outputs(ctx, outs, 3, ins, 12)))
        return s;
    return ctx->backend->paged_run(ctx, plan, a);
}

qattn_status qattn_merge_states(qattn_ctx *ctx, const qattn_merge_desc *d, const qattn_merge_args *a)
{
    if (!ctx)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "ctx is NULL");
    if (!d || !a)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", d ? "args" : "desc");
    const int64_t dims[4] = {d->num_states, d->rows, d->heads, d->head_dim};
    const char *names[4] = {"num_states", "rows", "heads", "head_dim"};
    for (int i = 0; i < 4; i++)
        if (dims[i] <= 0 || dims[i] > INT32_MAX)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s=%lld must be in [1, 2^31)", names[i],
                                   (long long)dims[i]);
    const qattn_dtype dts[2] = {d->v_dtype, d->o_dtype};
    for (int i = 0; i < 2; i++)
        if (dts[i] != QATTN_DTYPE_F32 && dts[i] != QATTN_DTYPE_F16 && dts[i] != QATTN_DTYPE_BF16)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s=%s: merge takes f32, f16 or bf16",
                                   i ? "o_dtype" : "v_dtype", qattn_dtype_name(dts[i]));
    qattn_tensor_desc vt = {.dtype = d->v_dtype,
                            .shape = {d->num_states, d->rows, d->heads, d->head_dim},
                            .stride = {d->v_stride[0], d->v_stride[1], d->v_stride[2], 1}};
    qattn_tensor_desc st = {.dtype = QATTN_DTYPE_F32,
                            .shape = {d->num_states, d->rows, d->heads, 1},
                            .stride = {d->s_stride[0], d->s_stride[1], d->s_stride[2], 1}};
    qattn_tensor_desc ot = {.dtype = d->o_dtype,
                            .shape = {1, d->rows, d->heads, d->head_dim},
                            .stride = {1, d->o_stride[0], d->o_stride[1], 1}};
    size_t vb, sb, ob;
    qattn_status s;
    if ((s = qattn_check_tensor(ctx, "v (states)", state_dims, &vt, &vb)) || (s = qattn_check_tensor(ctx, "s (lse)", state_dims, &st, &sb)) ||
        (s = qattn_check_tensor(ctx, "o", state_dims, &ot, &ob)))
        return s;
    size_t lse_bytes = (size_t)d->rows * (size_t)d->heads * 4;
    if ((s = check_buffer(ctx, "v", a->v, a->v_offset, vb, qattn_dtype_size(d->v_dtype))) ||
        (s = check_buffer(ctx, "s", a->s, a->s_offset, sb, 4)) ||
        (s = check_buffer(ctx, "o", a->o, a->o_offset, ob, qattn_dtype_size(d->o_dtype))) ||
        (a->lse && (s = check_buffer(ctx, "lse", a->lse, a->lse_offset, lse_bytes, 4))))
        return s;
    const qattn_span ins[2] = {{"args.v", a->v, a->v_offset, vb}, {"args.s", a->s, a->s_offset, sb}};
    const qattn_span outs[2] = {{"args.o", a->o, a->o_offset, ob}, {"args.lse", a->lse, a->lse_offset, lse_bytes}};
    if ((s = qattn_check_outputs(ctx, outs, 2, ins, 2)))
        return s;
    if (!ctx->backend->merge_states)
        return unsupported_slot(ctx, "qattn_merge_states");
    return ctx->backend->merge_states(ctx, d, a);
}

/* ------------------------------------------------------------- page pool */

struct qattn_page_pool {
    int64_t num_pages, free_count;
    int32_t *free_stack; /* free pages; the top is handed out next */
    uint8_t *used;
};

qattn_status qattn_page_pool_create(int64_t num_pages, qattn_page_pool **out)
{
    if (!out)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    if (num_pages <= 0 || num_pages > INT32_MAX)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "num_pages=%lld must be in [1, 2^31)",
                               (long long)num_pages);
    qattn_page_pool *p = calloc(1, sizeof(*p));
    if (p) {
        p->free_stack = malloc((size_t)num_pages * sizeof(int32_t));
        p->used = calloc((size_t)num_pages, 1);
    }
    if (!p || !p->free_stack || !p->used) {
        qattn_page_pool_destroy(p);
        return qattn_set_error(NULL, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for a page pool");
    }
    p->num_pages = p->free_count = num_pages;
    for (int64_t i = 0; i < num_pages; i++) /* page 0 on top: a fresh pool hands out 0, 1, 2, ... */
        p->free_stack[i] = (int32_t)(num_pages - 1 - i);
    *out = p;
    return QATTN_OK;
}

void qattn_page_pool_destroy(qattn_page_pool *pool)
{
    if (!pool)
        return;
    free(pool->free_stack);
    free(pool->used);
    free(pool);
}

qattn_status qattn_page_pool_alloc(qattn_page_pool *pool, int64_t n, int32_t *pages)
{
    if (!pool || (!pages && n > 0))
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", pool ? "pages" : "pool");
    if (n < 0)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "n=%lld must be >= 0", (long long)n);
    if (n > pool->free_count)
        return qattn_set_error(NULL, QATTN_ERR_OUT_OF_MEMORY, "%lld pages asked, %lld free", (long long)n,
                               (long long)pool->free_count);
    for (int64_t i = 0; i < n; i++) {
        int32_t page = pool->free_stack[--pool->free_count];
        pool->used[page] = 1;
        pages[i] = page;
    }
    return QATTN_OK;
}

qattn_status qattn_page_pool_free(qattn_page_pool *pool, int64_t n, const int32_t *pages)
{
    if (!pool || (!pages && n > 0))
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", pool ? "pages" : "pool");
    if (n < 0)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "n=%lld must be >= 0", (long long)n);
    /* Check everything first (including duplicates within the list) so a bad call changes nothing. */
    int64_t i = 0;
    for (; i < n; i++) {
        if (pages[i] < 0 || pages[i] >= pool->num_pages || pool->used[pages[i]] != 1)
            break;
        pool->used[pages[i]] = 2; /* marked: seen in this call */
    }
    bool ok = i == n;
    for (int64_t j = 0; j < i; j++)
        pool->used[pages[j]] = 1;
    if (!ok)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT,
                               "page %d (entry %lld) is out of range, not allocated, or listed twice", (int)pages[i],
                               (long long)i);
    for (int64_t j = n; j-- > 0;) {
        pool->used[pages[j]] = 0;
        pool->free_stack[pool->free_count++] = pages[j];
    }
    return QATTN_OK;
}

int64_t qattn_page_pool_free_count(const qattn_page_pool *pool) { return pool ? pool->free_count : 0; }

qattn_status qattn_page_tables_build(int64_t batch, const int32_t *const *seq_pages, const int64_t *pages_per_seq,
                                     int64_t max_pages_per_seq, int32_t *block_table, int32_t *indptr,
                                     int32_t *indices)
{
    if (batch <= 0 || batch > INT32_MAX || !seq_pages || !pages_per_seq)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT,
                               "batch must be in [1, 2^31) and seq_pages, pages_per_seq not NULL");
    int64_t total = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (pages_per_seq[b] < 0 || (pages_per_seq[b] > 0 && !seq_pages[b]))
            return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "sequence %lld: bad page list", (long long)b);
        if (block_table && pages_per_seq[b] > max_pages_per_seq)
            return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT,
                                   "sequence %lld has %lld pages, more than max_pages_per_seq=%lld", (long long)b,
                                   (long long)pages_per_seq[b], (long long)max_pages_per_seq);
        for (int64_t i = 0; i < pages_per_seq[b]; i++)
            if (seq_pages[b][i] < 0)
                return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "sequence %lld page %lld is negative",
                                       (long long)b, (long long)i);
        total += pages_per_seq[b];
        if (total > INT32_MAX)
            return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "more than 2^31 pages in total");
    }
    int32_t at = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (indptr)
            indptr[b] = at;
        for (int64_t i = 0; i < pages_per_seq[b]; i++) {
            if (indices)
                indices[at] = seq_pages[b][i];
            at++;
        }
        if (block_table)
            for (int64_t i = 0; i < max_pages_per_seq; i++)
                block_table[b * max_pages_per_seq + i] = i < pages_per_seq[b] ? seq_pages[b][i] : -1;
    }
    if (indptr)
        indptr[batch] = at;
    return QATTN_OK;
}
