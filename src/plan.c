/* Validation of attention descriptors and the plan life cycle. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "quant.h"

static const char *const attention_dims[4] = {"B", "H", "N", "D"};

/* a * b, saturated to INT64_MAX so that impossible shapes fail validation
 * ("spans more bytes than size_t holds") instead of wrapping around. */
static int64_t mul_sat(int64_t a, int64_t b)
{
    int64_t r;
    return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

qattn_tensor_desc qattn_tensor_hnd(qattn_dtype dtype, int64_t b, int64_t h, int64_t n, int64_t d)
{
    qattn_tensor_desc t = {.dtype = dtype,
                           .shape = {b, h, n, d},
                           .stride = {mul_sat(mul_sat(h, n), d), mul_sat(n, d), d, 1}};
    return t;
}

qattn_tensor_desc qattn_tensor_nhd(qattn_dtype dtype, int64_t b, int64_t h, int64_t n, int64_t d)
{
    qattn_tensor_desc t = {.dtype = dtype,
                           .shape = {b, h, n, d},
                           .stride = {mul_sat(mul_sat(n, h), d), d, mul_sat(h, d), 1}};
    return t;
}

/* Elements spanned by the tensor, or 0 on overflow / invalid. */
static size_t tensor_span(const qattn_tensor_desc *t)
{
    uint64_t last = 0;
    for (int i = 0; i < 4; i++) {
        if (t->shape[i] <= 0 || t->stride[i] <= 0)
            return 0;
        uint64_t extent = (uint64_t)(t->shape[i] - 1);
        uint64_t stride = (uint64_t)t->stride[i];
        if (extent && stride > (UINT64_MAX / 2) / extent)
            return 0;
        if (last > UINT64_MAX / 2 - extent * stride)
            return 0;
        last += extent * stride;
    }
    if (last + 1 > SIZE_MAX)
        return 0;
    return (size_t)(last + 1);
}

size_t qattn_tensor_bytes(const qattn_tensor_desc *t)
{
    if (!t)
        return 0;
    size_t es = qattn_dtype_size(t->dtype);
    size_t n = tensor_span(t);
    if (!es || !n || n > SIZE_MAX / es)
        return 0;
    return n * es;
}

/* The exact overlap test, for strides the greedy rule in qattn_check_tensor
 * cannot clear (interleaved dims): do two index tuples meet at one address,
 * i.e. is there c != 0 with |c_i| < shape_i and sum c_i * stride_i = 0? The
 * dims but the longest are enumerated and the longest solved for. Returns 1
 * and the two tuples when they meet, 0 when none do, -1 when the enumeration
 * would exceed its budget. Sums fit 64 bits: tensor_span bounded them. */
static int strides_collide(const qattn_tensor_desc *t, int64_t first[4], int64_t second[4])
{
    int dims[4], k = 0, solved = -1;
    for (int i = 0; i < 4; i++)
        if (t->shape[i] > 1) {
            dims[k++] = i;
            if (solved < 0 || t->shape[i] > t->shape[solved])
                solved = i;
        }
    uint64_t count = 1;
    for (int j = 0; j < k; j++)
        if (dims[j] != solved && (count *= (uint64_t)(2 * t->shape[dims[j]] - 1)) > (1u << 22))
            return -1;
    int64_t c[4] = {0, 0, 0, 0};
    for (int j = 0; j < k; j++)
        if (dims[j] != solved)
            c[dims[j]] = 1 - t->shape[dims[j]];
    for (uint64_t n = 0; n < count; n++) {
        int64_t sum = 0;
        bool zero = true;
        for (int i = 0; i < 4; i++) {
            sum += c[i] * t->stride[i];
            zero = zero && c[i] == 0;
        }
        if (!zero && sum % t->stride[solved] == 0 && llabs(sum / t->stride[solved]) < t->shape[solved]) {
            c[solved] = -sum / t->stride[solved];
            for (int i = 0; i < 4; i++) {
                first[i] = c[i] > 0 ? c[i] : 0;
                second[i] = c[i] < 0 ? -c[i] : 0;
            }
            return 1;
        }
        for (int j = 0; j < k; j++) { /* odometer over the enumerated dims */
            int i = dims[j];
            if (i == solved)
                continue;
            if (++c[i] < t->shape[i])
                break;
            c[i] = 1 - t->shape[i];
        }
    }
    return 0;
}

qattn_status qattn_check_tensor(qattn_ctx *ctx, const char *name, const char *const dims[4],
                                const qattn_tensor_desc *t, size_t *bytes)
{
    const char *const *names = dims ? dims : attention_dims;
    if ((unsigned)t->dtype >= QATTN_DTYPE_COUNT)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s.dtype=%d is not a qattn_dtype", name, (int)t->dtype);
    for (int i = 0; i < 4; i++)
        if (t->shape[i] <= 0)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s.shape[%d] (%s) must be > 0, got %lld", name, i,
                                   names[i], (long long)t->shape[i]);
    if (t->stride[3] != 1)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "%s.stride[3] must be 1 (the head dim is contiguous), got %lld", name,
                               (long long)t->stride[3]);
    for (int i = 0; i < 3; i++)
        if (t->stride[i] <= 0)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s.stride[%d] (%s) must be > 0, got %lld", name, i,
                                   names[i], (long long)t->stride[i]);
    *bytes = qattn_tensor_bytes(t);
    if (!*bytes)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "%s: its byte span overflows size_t (shape [%lld, %lld, %lld, %lld])", name,
                               (long long)t->shape[0], (long long)t->shape[1], (long long)t->shape[2],
                               (long long)t->shape[3]);
    /* No two elements may share an address. Quick rule: sorted by stride,
     * each stride clears the extent of the smaller ones (every packed and
     * permuted layout). Interleaved layouts that fail it get the exact test. */
    int order[4] = {0, 1, 2, 3};
    for (int i = 1; i < 4; i++)
        for (int j = i; j > 0 && t->stride[order[j]] < t->stride[order[j - 1]]; j--) {
            int tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
    uint64_t reach = 1; /* elements covered by the dims sorted so far */
    bool cleared = true;
    for (int i = 0; i < 4 && cleared; i++) {
        int dim = order[i];
        if (t->shape[dim] == 1)
            continue;
        cleared = (uint64_t)t->stride[dim] >= reach;
        reach = (uint64_t)t->stride[dim] * (uint64_t)t->shape[dim]; /* bounded by the span above */
    }
    if (cleared)
        return QATTN_OK;
    int64_t a[4], b[4];
    int collide = strides_collide(t, a, b);
    if (collide > 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "%s strides overlap: elements [%lld, %lld, %lld, %lld] and [%lld, %lld, %lld, %lld] "
                               "(%s, %s, %s, %s) share an address (strides %lld, %lld, %lld, 1)",
                               name, (long long)a[0], (long long)a[1], (long long)a[2], (long long)a[3],
                               (long long)b[0], (long long)b[1], (long long)b[2], (long long)b[3], names[0], names[1],
                               names[2], names[3], (long long)t->stride[0], (long long)t->stride[1],
                               (long long)t->stride[2]);
    if (collide < 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "%s strides (%lld, %lld, %lld, 1) over shape [%lld, %lld, %lld, %lld] interleave too "
                               "finely to prove that no two elements share an address; use strides where each "
                               "clears the extent of the smaller ones",
                               name, (long long)t->stride[0], (long long)t->stride[1], (long long)t->stride[2],
                               (long long)t->shape[0], (long long)t->shape[1], (long long)t->shape[2],
                               (long long)t->shape[3]);
    return QATTN_OK;
}

static qattn_status validate(qattn_ctx *ctx, const qattn_attention_desc *d, qattn_problem *p)
{
    qattn_status s;
    memset(p, 0, sizeof(*p));
    if ((s = qattn_check_tensor(ctx, "q", NULL, &d->q, &p->q_bytes)) || (s = qattn_check_tensor(ctx, "k", NULL, &d->k, &p->k_bytes)) ||
        (s = qattn_check_tensor(ctx, "v", NULL, &d->v, &p->v_bytes)) || (s = qattn_check_tensor(ctx, "o", NULL, &d->o, &p->o_bytes)))
        return s;

    if (d->q.dtype != QATTN_DTYPE_F32 && d->q.dtype != QATTN_DTYPE_F16 && d->q.dtype != QATTN_DTYPE_BF16)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "q.dtype=%s: attention inputs must be f32, f16 or bf16 (quantization happens inside "
                               "the plan)",
                               qattn_dtype_name(d->q.dtype));
    if (d->k.dtype != d->q.dtype || d->v.dtype != d->q.dtype)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "dtypes differ: q=%s k=%s v=%s (they must match)",
                               qattn_dtype_name(d->q.dtype), qattn_dtype_name(d->k.dtype), qattn_dtype_name(d->v.dtype));
    if (d->o.dtype != d->q.dtype && d->o.dtype != QATTN_DTYPE_F32)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "o.dtype=%s must be q's dtype (%s) or f32",
                               qattn_dtype_name(d->o.dtype), qattn_dtype_name(d->q.dtype));

    const int64_t *qs = d->q.shape, *ks = d->k.shape, *vs = d->v.shape, *os = d->o.shape;
    if (ks[0] != qs[0] || vs[0] != qs[0] || os[0] != qs[0])
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "batch sizes differ: q=%lld k=%lld v=%lld o=%lld",
                               (long long)qs[0], (long long)ks[0], (long long)vs[0], (long long)os[0]);
    if (vs[1] != ks[1] || vs[2] != ks[2])
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "v shape [%lld, %lld, %lld, %lld] must match k [%lld, %lld, %lld, %lld] in B, H, N",
                               (long long)vs[0], (long long)vs[1], (long long)vs[2], (long long)vs[3],
                               (long long)ks[0], (long long)ks[1], (long long)ks[2], (long long)ks[3]);
    if (ks[3] != qs[3] || vs[3] != qs[3])
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "head dims differ: q=%lld k=%lld v=%lld (a separate V head dim is not supported)",
                               (long long)qs[3], (long long)ks[3], (long long)vs[3]);
    if (os[1] != qs[1] || os[2] != qs[2] || os[3] != qs[3])
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "o shape [%lld, %lld, %lld, %lld] must equal q's [%lld, %lld, %lld, %lld]",
                               (long long)os[0], (long long)os[1], (long long)os[2], (long long)os[3],
                               (long long)qs[0], (long long)qs[1], (long long)qs[2], (long long)qs[3]);
    if (qs[1] % ks[1] != 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "q heads (%lld) must be a multiple of k/v heads (%lld) for GQA/MQA", (long long)qs[1],
                               (long long)ks[1]);
    if (!isfinite(d->sm_scale) || fabsf(d->sm_scale) > QATTN_SM_SCALE_MAX)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "sm_scale must be finite and at most %g in magnitude, got %g", (double)QATTN_SM_SCALE_MAX,
                               (double)d->sm_scale);
    if ((unsigned)d->precision >= QATTN_PRECISION_COUNT)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "precision=%d is not a qattn_precision",
                               (int)d->precision);
    if ((unsigned)d->granularity > QATTN_GRANULARITY_PER_THREAD)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "granularity=%d is not a qattn_granularity",
                               (int)d->granularity);
    if ((unsigned)d->smooth_k > QATTN_OFF)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "smooth_k=%d is not a qattn_toggle", (int)d->smooth_k);
    if (d->precision == QATTN_PRECISION_EXACT &&
        (d->granularity != QATTN_GRANULARITY_DEFAULT || d->smooth_k != QATTN_DEFAULT))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "granularity and smooth_k apply to quantized precisions only, not to exact");
    if (d->flags & ~(uint32_t)QATTN_FLAG_NO_FINITE_CHECK)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "flags=0x%x has unknown bits", (unsigned)d->flags);

    p->batch = qs[0];
    p->heads_q = qs[1];
    p->heads_kv = ks[1];
    p->seq_q = qs[2];
    p->seq_k = ks[2];
    p->head_dim = qs[3];
    p->group = qs[1] / ks[1];
    p->in_dtype = d->q.dtype;
    p->out_dtype = d->o.dtype;
    memcpy(p->q_stride, d->q.stride, sizeof(p->q_stride));
    memcpy(p->k_stride, d->k.stride, sizeof(p->k_stride));
    memcpy(p->v_stride, d->v.stride, sizeof(p->v_stride));
    memcpy(p->o_stride, d->o.stride, sizeof(p->o_stride));
    p->causal = d->causal != 0;
    p->return_lse = d->return_lse != 0;
    p->check_finite = !(d->flags & QATTN_FLAG_NO_FINITE_CHECK);
    p->sm_scale = d->sm_scale != 0.f ? d->sm_scale : (float)(1.0 / sqrt((double)p->head_dim));
    if (p->return_lse) {
        uint64_t rows = (uint64_t)p->batch * (uint64_t)p->heads_q; /* each < 2^63 / 2 after span checks */
        if (rows / (uint64_t)p->batch != (uint64_t)p->heads_q || (uint64_t)p->seq_q > SIZE_MAX / 4 / rows)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "the LSE tensor [B, Hq, Nq] overflows size_t");
        p->lse_bytes = (size_t)(rows * (uint64_t)p->seq_q * 4);
    }
    return QATTN_OK;
}

void qattn_quant_defaults(qattn_quant_params *quant, qattn_precision precision, qattn_granularity granularity,
                          int q_block, int q_warp, int k_block, bool smooth_k)
{
    memset(quant, 0, sizeof(*quant));
    quant->smooth_k = smooth_k;
    quant->k_block = k_block;
    quant->k_interleave = 1;
    switch (granularity) {
    case QATTN_GRANULARITY_PER_WARP:
        quant->q_block = q_warp;
        quant->q_interleave = 1;
        break;
    case QATTN_GRANULARITY_PER_THREAD:
        /* An MMA fragment gives each thread rows r with the same r % 8 within a
         * warp's rows, and keys t with the same t % 8 within a key block. */
        quant->q_block = q_warp;
        quant->q_interleave = 8;
        quant->k_interleave = 8;
        break;
    default:
        quant->q_block = q_block;
        quant->q_interleave = 1;
        break;
    }
    quant->p_fp8_scale = 448.f;
    quant->v_fp8_max = precision == QATTN_PRECISION_INT8_FP8_F16ACC ? 2.25f : 448.f;
    quant->pv_f16_chunk = precision == QATTN_PRECISION_INT8_FP8_F16ACC ? 32 : 0;
}

qattn_status qattn_plan_create(qattn_ctx *ctx, const qattn_attention_desc *desc, qattn_plan **out)
{
    return qattn_plan_create_sparse_internal(ctx, desc, NULL, out);
}

qattn_status qattn_plan_create_sparse_internal(qattn_ctx *ctx, const qattn_attention_desc *desc,
                                               const qattn_sparse_desc *sparse, qattn_plan **out)
{
    if (!out)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "out (the plan pointer) is NULL");
    *out = NULL;
    if (!ctx)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "ctx is NULL");
    if (!desc)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "desc is NULL");

    qattn_plan *plan = calloc(1, sizeof(*plan));
    if (!plan)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the plan");
    plan->ctx = ctx;
    qattn_status s = validate(ctx, desc, &plan->problem);
    if (s) {
        free(plan);
        return s;
    }
    /* Row strides must keep rows aligned as the backend requires. */
    const qattn_problem *p = &plan->problem;
    size_t ta = ctx->backend->tensor_alignment ? ctx->backend->tensor_alignment : 1;
    const int64_t *strides[4] = {p->q_stride, p->k_stride, p->v_stride, p->o_stride};
    const char *names[4] = {"q", "k", "v", "o"};
    for (int i = 0; i < 4; i++)
        for (int dim = 0; dim < 3; dim++) {
            size_t es = qattn_dtype_size(i == 3 ? p->out_dtype : p->in_dtype);
            if (((size_t)strides[i][dim] * es) % ta) {
                const long long stride = (long long)strides[i][dim]; /* it lives in the plan freed below */
                free(plan);
                return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                       "%s.stride[%d]=%lld elements is not a multiple of %zu bytes, which backend %s "
                                       "requires",
                                       names[i], dim, stride, ta, ctx->backend->name);
            }
        }
    if (sparse && (s = qattn_sparse_validate(ctx, p, sparse, &plan->sparse))) {
        free(plan);
        return s;
    }
    plan->precision = desc->precision;
    plan->granularity = desc->granularity;
    plan->quant.smooth_k = desc->smooth_k != QATTN_OFF;

    s = ctx->backend->plan_init(ctx, plan);
    if (!s && (plan->precision == QATTN_PRECISION_AUTO ||
               (plan->precision != QATTN_PRECISION_EXACT && plan->granularity == QATTN_GRANULARITY_DEFAULT)))
        s = qattn_set_error(ctx, QATTN_ERR_INTERNAL, "backend %s left the precision or granularity unresolved",
                            ctx->backend->name);
    return qattn_plan_finish(plan, s, out);
}

qattn_status qattn_plan_finish(qattn_plan *plan, qattn_status s, qattn_plan **out)
{
    qattn_ctx *ctx = plan->ctx;
    if (!s)
        s = qattn_workspace_layout_init(plan, plan->status_word);
    if (!s && !plan->paged && ctx->backend->plan_finish)
        s = ctx->backend->plan_finish(ctx, plan);
    if (s) {
        qattn_plan_destroy(plan); /* the backend's release takes back what its init made */
        return s;
    }
    *out = plan;
    return QATTN_OK;
}

void qattn_plan_destroy(qattn_plan *plan)
{
    if (!plan)
        return;
    const qattn_backend_iface *b = plan->ctx ? plan->ctx->backend : NULL;
    void (*release)(qattn_ctx *, qattn_plan *) = !b ? NULL : plan->paged ? b->paged_plan_release : b->plan_release;
    if (release)
        release(plan->ctx, plan);
    free(plan);
}

size_t qattn_plan_workspace_size(const qattn_plan *plan) { return plan ? plan->ws.total : 0; }

qattn_status qattn_plan_get_info(const qattn_plan *plan, qattn_plan_info *info)
{
    if (!plan || !info)
        return qattn_set_error(plan ? plan->ctx : NULL, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL",
                               plan ? "info" : "plan");
    memset(info, 0, sizeof(*info));
    info->precision = plan->precision;
    info->granularity = plan->granularity;
    info->smooth_k = plan->precision != QATTN_PRECISION_EXACT && plan->quant.smooth_k;
    info->q_tile = plan->q_tile;
    info->kv_tile = plan->kv_tile;
    if (plan->precision != QATTN_PRECISION_EXACT) {
        info->q_quant_block = plan->quant.q_block;
        info->q_quant_interleave = plan->quant.q_interleave;
        info->k_quant_block = plan->quant.k_block;
        info->k_quant_interleave = plan->quant.k_interleave;
        if (plan->precision != QATTN_PRECISION_INT8_FP16) {
            info->v_fp8_max = plan->quant.v_fp8_max;
            info->p_fp8_scale = plan->quant.p_fp8_scale;
        }
        info->pv_f16_chunk = plan->quant.pv_f16_chunk;
    }
    info->workspace_bytes = plan->ws.total;
    snprintf(info->kernel, sizeof(info->kernel), "%s", plan->kernel);
    return QATTN_OK;
}

size_t qattn_plan_describe(const qattn_plan *plan, char *buf, size_t len)
{
    char text[2048];
    int n;
    if (!plan) {
        n = snprintf(text, sizeof(text), "(no plan)");
    } else if (plan->paged) {
        const qattn_paged_problem *pp = &plan->pp;
        const qattn_select_problem *sel = &plan->select;
        char select[256] = "";
        if (sel->enabled) {
            char budget[64];
            if (sel->budget_pages > 0)
                snprintf(budget, sizeof(budget), "%lld pages", (long long)sel->budget_pages);
            else
                snprintf(budget, sizeof(budget), "%g of each sequence", (double)sel->budget_fraction);
            snprintf(select, sizeof(select),
                     "; page selection: budget %s, %lld sink and %lld recent page(s)%s", budget,
                     (long long)sel->sink_pages, (long long)sel->recent_pages, sel->adaptive ? ", adaptive" : "");
            if (sel->adaptive) {
                const size_t used = strlen(select);
                snprintf(select + used, sizeof(select) - used, " (epsilon %g, cap %lld pages)", (double)sel->epsilon,
                         (long long)sel->max_budget_pages);
            }
        }
        n = snprintf(text, sizeof(text),
                     "backend %s, kernel %s: paged attention over %s pages of %lld tokens (%s, %lld pages), "
                     "B=%lld Hq=%lld Hkv=%lld D=%lld, %lld query rows (<= %lld per sequence) %s%s, %s tables; "
                     "%d split(s)%s; workspace %zu bytes. %s",
                     plan->ctx->backend->name, plan->kernel, qattn_dtype_name(pp->cache.dtype),
                     (long long)pp->cache.page_size, pp->cache.layout == QATTN_KV_NHD ? "NHD" : "HND",
                     (long long)pp->cache.num_pages, (long long)pp->batch, (long long)pp->heads_q,
                     (long long)pp->cache.heads_kv, (long long)pp->cache.head_dim, (long long)pp->total_q,
                     (long long)pp->max_q_len, pp->causal ? "causal" : "full", pp->return_lse ? " +LSE" : "",
                     pp->table == QATTN_PAGES_DENSE ? "dense" : "CSR", pp->num_splits, select, plan->ws.total,
                     plan->why);
    } else {
        const qattn_problem *p = &plan->problem;
        char quant[512] = "";
        if (plan->precision != QATTN_PRECISION_EXACT)
            snprintf(quant, sizeof(quant),
                     "; %s INT8 scales (Q: %d-token blocks x %d, K: %d-token blocks x %d), smooth K %s%s",
                     qattn_granularity_name(plan->granularity), plan->quant.q_block, plan->quant.q_interleave,
                     plan->quant.k_block, plan->quant.k_interleave, plan->quant.smooth_k ? "on" : "off",
                     plan->precision == QATTN_PRECISION_INT8_FP16 ? "; V fp16"
                     : plan->precision == QATTN_PRECISION_INT8_FP8 ? "; P x448, V per-channel to FP8 (|V| <= 448), fp32 two-level accumulation"
                     : "; P x448, V per-channel to FP8 (|V| <= 2.25), P.V accumulated in fp16 per key block");
        char sparse[256] = "";
        const qattn_sparse_problem *sp = &plan->sparse;
        if (sp->enabled) {
            int m = snprintf(sparse, sizeof(sparse), "; sparse:");
            if (sp->window) {
                char left[32] = "all", right[32] = "all";
                if (sp->window_left >= 0)
                    snprintf(left, sizeof(left), "%lld", (long long)sp->window_left);
                if (sp->window_right >= 0)
                    snprintf(right, sizeof(right), "%lld", (long long)sp->window_right);
                m += snprintf(sparse + m, sizeof(sparse) - (size_t)m, " window of %s keys before, %s after, %lld sinks",
                              left, right, (long long)sp->sink_tokens);
            }
            if (sp->layout != QATTN_SPARSE_NO_LAYOUT)
                m += snprintf(sparse + m, sizeof(sparse) - (size_t)m, " %s layout of %lldx%lld blocks",
                              sp->layout == QATTN_SPARSE_BLOCKS ? "given" : "predicted", (long long)sp->q_block,
                              (long long)sp->k_block);
            if (sp->pv_threshold > 0.f)
                snprintf(sparse + m, sizeof(sparse) - (size_t)m, " P.V skipped below -%g (log2)",
                         (double)sp->pv_threshold);
        }
        n = snprintf(text, sizeof(text),
                     "backend %s, kernel %s: %s, B=%lld Hq=%lld Hkv=%lld Nq=%lld Nk=%lld D=%lld %s%s, %s in, %s out; "
                     "tiles %dx%d%s%s; workspace %zu bytes. %s",
                     plan->ctx->backend->name, plan->kernel, qattn_precision_name(plan->precision),
                     (long long)p->batch, (long long)p->heads_q, (long long)p->heads_kv, (long long)p->seq_q,
                     (long long)p->seq_k, (long long)p->head_dim, p->causal ? "causal" : "full",
                     p->return_lse ? " +LSE" : "", qattn_dtype_name(p->in_dtype), qattn_dtype_name(p->out_dtype),
                     plan->q_tile, plan->kv_tile, quant, sparse, plan->ws.total, plan->why);
    }
    if (n < 0)
        n = 0;
    if (buf && len) {
        size_t copy = (size_t)n < len - 1 ? (size_t)n : len - 1;
        memcpy(buf, text, copy);
        buf[copy] = '\0';
    }
    return (size_t)n;
}

qattn_status qattn_run(const qattn_plan *plan, const qattn_run_args *args)
{
    if (plan && !plan->paged && plan->sparse.layout == QATTN_SPARSE_BLOCKS)
        return qattn_set_error(plan->ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "the plan takes a block layout at each run: use qattn_sparse_run");
    return qattn_run_internal(plan, args, NULL);
}

qattn_status qattn_run_internal(const qattn_plan *plan, const qattn_run_args *args, const qattn_run_bound *layout)
{
    if (!plan)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "plan is NULL");
    qattn_ctx *ctx = plan->ctx;
    if (plan->paged)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "a paged plan runs with qattn_paged_run");
    if (!args)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args is NULL");
    const qattn_problem *p = &plan->problem;
    struct {
        const char *name;
        qattn_buffer *buf;
        size_t offset, bytes, align;
    } t[] = {
        {"q", args->q, args->q_offset, p->q_bytes, qattn_dtype_size(p->in_dtype)},
        {"k", args->k, args->k_offset, p->k_bytes, qattn_dtype_size(p->in_dtype)},
        {"v", args->v, args->v_offset, p->v_bytes, qattn_dtype_size(p->in_dtype)},
        {"o", args->o, args->o_offset, p->o_bytes, qattn_dtype_size(p->out_dtype)},
        {"lse", args->lse, args->lse_offset, p->lse_bytes, 4},
        {"workspace", args->workspace, args->workspace_offset, plan->ws.total, QATTN_WS_ALIGN},
    };
    for (int i = 0; i < 6; i++) {
        bool needed = i < 4 || (i == 4 && p->return_lse) || (i == 5 && plan->ws.total > 0);
        if (!needed) {
            if (i == 4 && t[i].buf)
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "args.lse is set but the plan was made without return_lse");
            continue;
        }
        if (!t[i].buf)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.%s is NULL%s", t[i].name,
                                   i == 5 ? " (the plan needs a workspace: qattn_plan_workspace_size)" : "");
        if (t[i].buf->ctx != ctx)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "args.%s belongs to another context than the plan", t[i].name);
        if (!qattn_buffer_fits(t[i].buf, t[i].offset, t[i].bytes))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "args.%s: %zu bytes at offset %zu do not fit in its %zu-byte buffer", t[i].name,
                                   t[i].bytes, t[i].offset, t[i].buf->size);
        size_t align = t[i].align > ctx->backend->tensor_alignment || i == 5 ? t[i].align
                                                                              : ctx->backend->tensor_alignment;
        if (t[i].offset % align)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "args.%s_offset=%zu must be a multiple of %zu bytes on backend %s", t[i].name,
                                   t[i].offset, align, ctx->backend->name);
        if (!qattn_buffer_aligned(t[i].buf, t[i].offset, t[i].align))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "args.%s: its first element's address %p is not a multiple of %zu bytes (wrapped "
                                   "memory must be aligned for its elements)",
                                   t[i].name, (void *)(t[i].buf->alias_base + t[i].offset),
                                   t[i].align < 16 ? t[i].align : (size_t)16);
    }
    const qattn_span ins[5] = {
        {"args.q", args->q, args->q_offset, p->q_bytes},
        {"args.k", args->k, args->k_offset, p->k_bytes},
        {"args.v", args->v, args->v_offset, p->v_bytes},
        {"sparse.block_indptr", layout ? layout->block_indptr : NULL, 0,
         layout ? (size_t)(plan->sparse.rows + 1) * 4 : 0},
        {"sparse.block_indices", layout && layout->block_count ? layout->block_indices : NULL, 0,
         layout ? (size_t)layout->block_count * 4 : 0}};
    const qattn_span outs[3] = {{"args.o", args->o, args->o_offset, p->o_bytes},
                                {"args.lse", p->return_lse ? args->lse : NULL, args->lse_offset, p->lse_bytes},
                                {"args.workspace", plan->ws.total ? args->workspace : NULL, args->workspace_offset,
                                 plan->ws.total}};
    qattn_status s = qattn_check_outputs(ctx, outs, 3, ins, 5);
    if (s)
        return s;
    qattn_run_bound bound = {
        .q = args->q, .k = args->k, .v = args->v, .o = args->o,
        .lse = p->return_lse ? args->lse : NULL,
        .workspace = plan->ws.total ? args->workspace : NULL,
        .q_offset = args->q_offset, .k_offset = args->k_offset, .v_offset = args->v_offset,
        .o_offset = args->o_offset, .lse_offset = args->lse_offset, .workspace_offset = args->workspace_offset,
        .stream = args->stream,
        .block_indptr = layout ? layout->block_indptr : NULL,
        .block_indices = layout ? layout->block_indices : NULL,
        .block_count = layout ? layout->block_count : 0,
    };
    if (layout && p->check_finite && (s = qattn_sparse_check_layout_buffers(ctx, plan, &bound)))
        return s;
    return ctx->backend->run(ctx, plan, &bound);
}
