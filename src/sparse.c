/* Sparse attention (sequence pruning): validation of qattn_sparse_desc, the
 * block-layout checks, and the host prediction of SpargeAttn-style layouts
 * that the CPU backend runs and the GPU kernels are checked against. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "numeric.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

qattn_status qattn_sparse_validate(qattn_ctx *ctx, const qattn_problem *p, const qattn_sparse_desc *d,
                                   qattn_sparse_problem *sp)
{
    memset(sp, 0, sizeof(*sp));
    if (d->window) {
        if (d->window_left < -1 || d->window_right < -1 || d->sink_tokens < 0)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.window_left=%lld, window_right=%lld must be >= -1 (-1: unbounded) and "
                                   "sink_tokens=%lld >= 0",
                                   (long long)d->window_left, (long long)d->window_right, (long long)d->sink_tokens);
    } else if (d->window_left || d->window_right || d->sink_tokens) {
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "sparse.window_left/window_right/sink_tokens are set but sparse.window is 0");
    }
    if ((unsigned)d->layout > QATTN_SPARSE_PREDICT)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse.layout=%d is not a qattn_sparse_layout_kind",
                               (int)d->layout);
    const bool predict = d->layout == QATTN_SPARSE_PREDICT;
    int64_t qb = d->q_block, kb = d->k_block;
    if (d->layout == QATTN_SPARSE_NO_LAYOUT) {
        if (qb || kb)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.q_block/k_block are set but there is no layout (sparse.layout)");
    } else {
        if (predict && !qb)
            qb = 128;
        if (predict && !kb)
            kb = 64;
        if (qb <= 0 || kb <= 0 || qb % 16 || kb % 16 || qb > (1 << 20) || kb > (1 << 20))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.q_block=%lld and k_block=%lld must be multiples of 16 in [16, 2^20]",
                                   (long long)d->q_block, (long long)d->k_block);
    }
    const bool finite = isfinite(d->sim_threshold) && isfinite(d->cdf_threshold) && isfinite(d->topk) &&
                        isfinite(d->pv_threshold);
    if (!finite)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse: the thresholds must be finite");
    if (predict) {
        if (d->sim_threshold < -1.f || d->sim_threshold > 1.f)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse.sim_threshold=%g must be in [-1, 1]",
                                   (double)d->sim_threshold);
        if (d->topk < 0.f || d->topk > 1.f)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse.topk=%g must be in [0, 1] (0: use "
                                   "cdf_threshold)", (double)d->topk);
        if (d->topk == 0.f && !(d->cdf_threshold > 0.f && d->cdf_threshold <= 1.f))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.cdf_threshold=%g must be in (0, 1] when topk is 0", (double)d->cdf_threshold);
        if (d->topk > 0.f && d->cdf_threshold != 0.f)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.topk and sparse.cdf_threshold are both set: give one");
        if (d->sink_blocks < 0 || d->recent_blocks < 0 || d->last_q_blocks < 0)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.sink_blocks=%lld, recent_blocks=%lld and last_q_blocks=%lld must be >= 0",
                                   (long long)d->sink_blocks, (long long)d->recent_blocks,
                                   (long long)d->last_q_blocks);
    } else if (d->sim_threshold != 0.f || d->cdf_threshold != 0.f || d->topk != 0.f || d->sink_blocks ||
               d->recent_blocks || d->last_q_blocks) {
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "sparse: sim_threshold, cdf_threshold, topk, sink_blocks, recent_blocks and "
                               "last_q_blocks apply to QATTN_SPARSE_PREDICT only");
    }
    if (d->pv_threshold < 0.f)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse.pv_threshold=%g must be >= 0 (0: off)",
                               (double)d->pv_threshold);

    sp->enabled = true;
    sp->window = d->window != 0;
    sp->window_left = d->window ? d->window_left : -1;
    sp->window_right = d->window ? d->window_right : -1;
    sp->sink_tokens = d->window ? d->sink_tokens : 0;
    sp->layout = d->layout;
    sp->pv_threshold = d->pv_threshold;
    if (d->layout != QATTN_SPARSE_NO_LAYOUT) {
        sp->q_block = qb;
        sp->k_block = kb;
        sp->q_blocks = qattn_ceil_div(p->seq_q, qb);
        sp->k_blocks = qattn_ceil_div(p->seq_k, kb);
        int64_t rows;
        if (__builtin_mul_overflow(p->batch * p->heads_kv, sp->q_blocks, &rows) || rows >= INT32_MAX ||
            sp->k_blocks >= INT32_MAX)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse: the layout's %lld x %lld x %lld rows of %lld key blocks exceed int32 "
                                   "indices",
                                   (long long)p->batch, (long long)p->heads_kv, (long long)sp->q_blocks,
                                   (long long)sp->k_blocks);
        sp->rows = rows;
    }
    if (predict) {
        sp->sim_threshold = d->sim_threshold;
        sp->cdf_threshold = d->cdf_threshold;
        sp->topk = d->topk;
        sp->sink_blocks = d->sink_blocks;
        sp->recent_blocks = d->recent_blocks;
        sp->last_q_blocks = d->last_q_blocks;
    }

    uint32_t need = (sp->window ? QATTN_SPARSE_CAP_WINDOW : 0u) |
                    (d->layout == QATTN_SPARSE_BLOCKS ? QATTN_SPARSE_CAP_BLOCKS : 0u) |
                    (predict ? QATTN_SPARSE_CAP_PREDICT : 0u) | (sp->pv_threshold > 0.f ? QATTN_SPARSE_CAP_PV_SKIP : 0u);
    uint32_t missing = need & ~ctx->backend->sparse;
    if (missing)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "backend %s does not run sparse attention with %s",
                               ctx->backend->name,
                               missing & QATTN_SPARSE_CAP_WINDOW    ? "a local window or sinks"
                               : missing & QATTN_SPARSE_CAP_BLOCKS  ? "block layouts"
                               : missing & QATTN_SPARSE_CAP_PREDICT ? "predicted layouts"
                                                                    : "pv_threshold");
    return QATTN_OK;
}

qattn_status qattn_sparse_plan_create(qattn_ctx *ctx, const qattn_attention_desc *desc,
                                      const qattn_sparse_desc *sparse, qattn_plan **out)
{
    return qattn_plan_create_sparse_internal(ctx, desc, sparse, out);
}

qattn_status qattn_sparse_check_layout(qattn_ctx *ctx, const qattn_sparse_problem *sp, const int32_t *indptr,
                                       const int32_t *indices, int64_t count)
{
    if (indptr[0] != 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse layout: block_indptr[0]=%d must be 0",
                               (int)indptr[0]);
    for (int64_t r = 0; r < sp->rows; r++) {
        if (indptr[r + 1] < indptr[r] || indptr[r + 1] > count)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse layout: block_indptr[%lld]=%d must be in [block_indptr[%lld]=%d, "
                                   "block_count=%lld]",
                                   (long long)r + 1, (int)indptr[r + 1], (long long)r, (int)indptr[r], (long long)count);
        for (int64_t e = indptr[r]; e < indptr[r + 1]; e++) {
            if (indices[e] < 0 || indices[e] >= sp->k_blocks)
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "sparse layout: block_indices[%lld]=%d (row %lld) is not a key block in [0, "
                                       "%lld)",
                                       (long long)e, (int)indices[e], (long long)r, (long long)sp->k_blocks);
            if (e > indptr[r] && indices[e] <= indices[e - 1])
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "sparse layout: block_indices[%lld]=%d (row %lld) does not follow %d in "
                                       "ascending order",
                                       (long long)e, (int)indices[e], (long long)r, (int)indices[e - 1]);
        }
    }
    if (indptr[sp->rows] != count)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "sparse layout: block_indptr[%lld]=%d must equal block_count=%lld", (long long)sp->rows,
                               (int)indptr[sp->rows], (long long)count);
    return QATTN_OK;
}

qattn_status qattn_sparse_check_layout_buffers(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
{
    const qattn_sparse_problem *sp = &plan->sparse;
    const size_t ptr_bytes = (size_t)(sp->rows + 1) * 4, idx_bytes = (size_t)run->block_count * 4;
    const int32_t *indptr = run->block_indptr->host, *indices = run->block_indices ? run->block_indices->host : NULL;
    int32_t *ptr_copy = NULL, *idx_copy = NULL;
    qattn_status s = QATTN_OK;
    if (!indptr) {
        if (!(ptr_copy = malloc(ptr_bytes)))
            return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the layout check");
        if ((s = qattn_buffer_download(run->block_indptr, 0, ptr_copy, ptr_bytes)))
            goto done;
        indptr = ptr_copy;
    }
    if (run->block_count && !indices) {
        if (!(idx_copy = malloc(idx_bytes))) {
            s = qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the layout check");
            goto done;
        }
        if ((s = qattn_buffer_download(run->block_indices, 0, idx_copy, idx_bytes)))
            goto done;
        indices = idx_copy;
    }
    s = qattn_sparse_check_layout(ctx, sp, indptr, indices, run->block_count);
done:
    free(ptr_copy);
    free(idx_copy);
    return s;
}

qattn_status qattn_sparse_run(const qattn_plan *plan, const qattn_run_args *args, const qattn_sparse_args *sparse)
{
    if (!plan)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "plan is NULL");
    qattn_ctx *ctx = plan->ctx;
    if (plan->paged || plan->sparse.layout != QATTN_SPARSE_BLOCKS) {
        if (sparse && (sparse->block_indptr || sparse->block_indices || sparse->block_count))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse: a layout is given but the plan was not made with QATTN_SPARSE_BLOCKS");
        return plan->paged ? qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "a paged plan runs with qattn_paged_run")
                           : qattn_run_internal(plan, args, NULL);
    }
    if (!sparse)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse is NULL (the plan needs a block layout)");
    const qattn_sparse_problem *sp = &plan->sparse;
    if (sparse->block_count < 0 || sparse->block_count > sp->rows * sp->k_blocks)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "sparse.block_count=%lld must be in [0, %lld] (rows x key blocks)",
                               (long long)sparse->block_count, (long long)(sp->rows * sp->k_blocks));
    const struct {
        const char *name;
        qattn_buffer *buf;
        size_t bytes;
    } t[2] = {{"block_indptr", sparse->block_indptr, (size_t)(sp->rows + 1) * 4},
              {"block_indices", sparse->block_indices, (size_t)sparse->block_count * 4}};
    for (int i = 0; i < 2; i++) {
        if (i == 1 && sparse->block_count == 0 && !t[i].buf)
            continue; /* an empty layout needs no indices */
        if (!t[i].buf)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sparse.%s is NULL", t[i].name);
        if (t[i].buf->ctx != ctx)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.%s belongs to another context than the plan", t[i].name);
        if (!qattn_buffer_fits(t[i].buf, 0, t[i].bytes))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.%s: %zu bytes do not fit in its %zu-byte buffer", t[i].name, t[i].bytes,
                                   t[i].buf->size);
        if (!qattn_buffer_aligned(t[i].buf, 0, 4))
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "sparse.%s: wrapped memory must be aligned to 4 bytes", t[i].name);
    }
    qattn_run_bound layout = {.block_indptr = sparse->block_indptr,
                              .block_indices = sparse->block_count ? sparse->block_indices : NULL,
                              .block_count = sparse->block_count};
    return qattn_run_internal(plan, args, &layout);
}

int64_t qattn_sparse_layout_rows(const qattn_plan *plan, int64_t *q_block, int64_t *k_block)
{
    const bool has = plan && !plan->paged && plan->sparse.layout != QATTN_SPARSE_NO_LAYOUT;
    if (q_block)
        *q_block = has ? plan->sparse.q_block : 0;
    if (k_block)
        *k_block = has ? plan->sparse.k_block : 0;
    return has ? plan->sparse.rows : 0;
}

qattn_status qattn_sparse_layout_read(const qattn_plan *plan, const qattn_buffer *workspace, size_t workspace_offset,
                                      int32_t *indptr, int32_t *indices, int64_t capacity, int64_t *count,
                                      float *density)
{
    if (!plan)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "plan is NULL");
    qattn_ctx *ctx = plan->ctx;
    if (plan->paged || plan->sparse.layout != QATTN_SPARSE_PREDICT)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "qattn_sparse_layout_read needs a plan made with QATTN_SPARSE_PREDICT");
    if (!workspace || !count)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", workspace ? "count" : "workspace");
    if (workspace->ctx != ctx)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "workspace belongs to another context than the plan");
    if (!qattn_buffer_fits(workspace, workspace_offset, plan->ws.total) || workspace_offset % QATTN_WS_ALIGN)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "workspace: %zu bytes at offset %zu (a multiple of %d) do not fit in its %zu bytes",
                               plan->ws.total, workspace_offset, QATTN_WS_ALIGN, workspace->size);
    if (capacity < 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "capacity=%lld must be >= 0", (long long)capacity);
    const qattn_sparse_problem *sp = &plan->sparse;
    const qattn_workspace_layout *L = &plan->ws;
    const size_t count_bytes = (size_t)sp->rows * 4;
    int32_t *counts = malloc(count_bytes);
    int32_t *rows = NULL;
    if (!counts)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the layout's counts");
    qattn_status s = qattn_buffer_download(workspace, workspace_offset + L->sparse_counts, counts, count_bytes);
    int64_t total = 0;
    for (int64_t r = 0; !s && r < sp->rows; r++)
        total += qattn_clamp_i64(counts[r], 0, sp->k_blocks);
    if (!s) {
        *count = total;
        if (indptr) {
            indptr[0] = 0;
            for (int64_t r = 0; r < sp->rows; r++)
                indptr[r + 1] = indptr[r] + (int32_t)qattn_clamp_i64(counts[r], 0, sp->k_blocks);
        }
    }
    if (!s && indices && total <= capacity && total > 0) { /* the fixed-stride rows, compacted here */
        const size_t row_bytes = (size_t)sp->rows * (size_t)sp->k_blocks * 4;
        if (!(rows = malloc(row_bytes)))
            s = qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the layout's indices");
        else if (!(s = qattn_buffer_download(workspace, workspace_offset + L->sparse_indices, rows, row_bytes))) {
            int64_t at = 0;
            for (int64_t r = 0; r < sp->rows; r++) {
                const int64_t n = qattn_clamp_i64(counts[r], 0, sp->k_blocks);
                memcpy(indices + at, rows + r * sp->k_blocks, (size_t)n * 4);
                at += n;
            }
        }
    }
    if (!s && density)
        s = qattn_buffer_download(workspace, workspace_offset + L->sparse_density, density,
                                  (size_t)(plan->problem.batch * plan->problem.heads_kv) * 4);
    free(counts);
    free(rows);
    return s;
}

/* ------------------------------------------------------------ prediction */

/* The keys that query block qb's rows see under the structured masks, as the
 * union of two intervals: [*lo, *hi) and the sinks [0, *sinks). The row
 * intervals move monotonically with the row, so the union runs from the
 * first row's start to the last row's end. */
static void block_keys(const qattn_problem *p, const qattn_sparse_problem *sp, int64_t qb, int64_t *lo, int64_t *hi,
                       int64_t *sinks)
{
    const int64_t i0 = qb * sp->q_block, i1 = qattn_min_i64(p->seq_q, i0 + sp->q_block) - 1;
    const int64_t place0 = i0 + p->seq_k - p->seq_q, place1 = i1 + p->seq_k - p->seq_q;
    const int64_t cend = p->causal ? qattn_clamp_i64(place1 + 1, 0, p->seq_k) : p->seq_k;
    *lo = 0;
    *hi = cend;
    *sinks = 0;
    if (sp->window) {
        if (sp->window_left >= 0)
            *lo = qattn_clamp_i64(place0 - sp->window_left, 0, p->seq_k);
        if (sp->window_right >= 0)
            *hi = qattn_clamp_i64(place1 + sp->window_right + 1, 0, cend);
        *sinks = qattn_min_i64(sp->sink_tokens, cend);
    }
}

bool qattn_sparse_block_visible(const qattn_problem *p, const qattn_sparse_problem *sp, int64_t qb, int64_t kb)
{
    int64_t lo, hi, sinks;
    block_keys(p, sp, qb, &lo, &hi, &sinks);
    const int64_t k0 = kb * sp->k_block, k1 = qattn_min_i64(p->seq_k, k0 + sp->k_block);
    return (k0 < sinks) || (k0 < hi && k1 > lo);
}

/* Mean of rows [t0, t1) of one head and how alike they are: the smallest
 * cosine between a row and the mean (1 when every row points the same way).
 * SpargeAttn measures the mean pairwise cosine instead, which one outlier
 * row (a needle) barely moves; the smallest cosine to the mean flags it, so
 * the block is kept whole. Zero rows and a zero mean count as alike. */
static void pool_block(const void *base, qattn_dtype dt, const int64_t *stride, int64_t b, int64_t h, int64_t t0,
                       int64_t t1, int64_t D, float *mean, float *sim, double *acc)
{
    for (int64_t d = 0; d < D; d++)
        acc[d] = 0.0;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t off = b * stride[0] + h * stride[1] + t * stride[2];
        for (int64_t d = 0; d < D; d++)
            acc[d] += qattn_load_f(base, dt, off + d);
    }
    const double n = (double)(t1 - t0);
    double mm = 0.0;
    for (int64_t d = 0; d < D; d++) {
        acc[d] /= n;
        mean[d] = (float)acc[d];
        mm += acc[d] * acc[d];
    }
    double least = 1.0;
    for (int64_t t = t0; t < t1 && mm > 0.0; t++) {
        const int64_t off = b * stride[0] + h * stride[1] + t * stride[2];
        double dot = 0.0, xx = 0.0;
        for (int64_t d = 0; d < D; d++) {
            const double x = qattn_load_f(base, dt, off + d);
            dot += x * acc[d];
            xx += x * x;
        }
        if (xx > 0.0 && dot / sqrt(xx * mm) < least)
            least = dot / sqrt(xx * mm);
    }
    *sim = (float)least;
}

static int heavier_first(const void *a, const void *b)
{
    const qattn_block_weight *x = a, *y = b;
    return x->w > y->w ? -1 : x->w < y->w ? 1 : (x->kb > y->kb) - (x->kb < y->kb);
}

void qattn_sparse_select_host(const qattn_plan *plan, uint8_t *ws, int64_t b, int64_t hk, uint8_t *keep,
                              qattn_block_weight *wts)
{
    const qattn_problem *p = &plan->problem;
    const qattn_sparse_problem *sp = &plan->sparse;
    const qattn_workspace_layout *L = &plan->ws;
    const int64_t D = p->head_dim, QB = sp->q_blocks, KB = sp->k_blocks;
    const float *q_pool = (const float *)(ws + L->sparse_q_pool), *k_pool = (const float *)(ws + L->sparse_k_pool);
    const float *q_sim = (const float *)(ws + L->sparse_q_sim), *k_sim = (const float *)(ws + L->sparse_k_sim);
    int32_t *counts = (int32_t *)(ws + L->sparse_counts), *indices = (int32_t *)(ws + L->sparse_indices);
    int64_t kept_total = 0, visible_total = 0;
    for (int64_t qb = 0; qb < QB; qb++) {
        const int64_t row = (b * p->heads_kv + hk) * QB + qb;
        int64_t lo, hi, sinks;
        block_keys(p, sp, qb, &lo, &hi, &sinks);
        memset(keep, 0, (size_t)KB);
        /* Visible blocks, in order: [first, last] of the window plus the sink blocks. */
        int64_t visible = 0, nvis_first = -1, nvis_last = -1;
        for (int64_t kb = 0; kb < KB; kb++)
            if (qattn_sparse_block_visible(p, sp, qb, kb)) {
                visible++;
                if (nvis_first < 0)
                    nvis_first = kb;
                nvis_last = kb;
            }
        visible_total += visible;
        const bool whole = qb >= QB - sp->last_q_blocks;
        for (int64_t kb = nvis_first; whole && kb <= nvis_last && kb >= 0; kb++)
            keep[kb] = qattn_sparse_block_visible(p, sp, qb, kb);
        for (int64_t g = 0; g < p->group && visible && !whole; g++) {
            const int64_t h = hk * p->group + g, bhq = b * p->heads_q + h;
            const float *qp = q_pool + (bhq * QB + qb) * D;
            int64_t n = 0;
            for (int64_t kb = nvis_first; kb <= nvis_last; kb++) {
                if (!qattn_sparse_block_visible(p, sp, qb, kb))
                    continue;
                const int64_t bhk_kb = (b * p->heads_kv + hk) * KB + kb;
                if (q_sim[bhq * QB + qb] < sp->sim_threshold || k_sim[bhk_kb] < sp->sim_threshold)
                    keep[kb] = 1; /* the pooled token does not represent the block */
                double dot = 0.0;
                for (int64_t d = 0; d < D; d++)
                    dot += (double)qp[d] * k_pool[bhk_kb * D + d];
                wts[n].w = dot * p->sm_scale;
                wts[n].kb = (int32_t)kb;
                n++;
            }
            double mx = -INFINITY, sum = 0.0;
            for (int64_t e = 0; e < n; e++)
                mx = wts[e].w > mx ? wts[e].w : mx;
            for (int64_t e = 0; e < n; e++)
                sum += (wts[e].w = exp(wts[e].w - mx));
            qsort(wts, (size_t)n, sizeof(*wts), heavier_first);
            if (sp->topk > 0.f) {
                int64_t want = (int64_t)ceil((double)sp->topk * (double)n);
                for (int64_t e = 0; e < want && e < n; e++)
                    keep[wts[e].kb] = 1;
            } else {
                double mass = 0.0;
                for (int64_t e = 0; e < n && mass < (double)sp->cdf_threshold * sum; e++) {
                    keep[wts[e].kb] = 1;
                    mass += wts[e].w;
                }
            }
        }
        /* Forced blocks: the first sink_blocks key blocks and the last recent_blocks visible ones. */
        for (int64_t kb = 0; kb < sp->sink_blocks && kb < KB; kb++)
            if (qattn_sparse_block_visible(p, sp, qb, kb))
                keep[kb] = 1;
        for (int64_t kb = nvis_last, c = 0; kb >= 0 && c < sp->recent_blocks; kb--)
            if (qattn_sparse_block_visible(p, sp, qb, kb)) {
                keep[kb] = 1;
                c++;
            }
        int64_t c = 0;
        int32_t *dst = indices + row * KB;
        for (int64_t kb = 0; kb < KB; kb++)
            if (keep[kb])
                dst[c++] = (int32_t)kb;
        counts[row] = (int32_t)c;
        kept_total += c;
    }
    ((float *)(ws + L->sparse_density))[b * p->heads_kv + hk] =
        visible_total ? (float)((double)kept_total / (double)visible_total) : 0.f;
}

qattn_status qattn_sparse_predict_host(const qattn_plan *plan, const void *q, const void *k, uint8_t *ws, int threads)
{
    const qattn_problem *p = &plan->problem;
    const qattn_sparse_problem *sp = &plan->sparse;
    const qattn_workspace_layout *L = &plan->ws;
    const int64_t D = p->head_dim, QB = sp->q_blocks, KB = sp->k_blocks;
    const int64_t q_items = p->batch * p->heads_q * QB, k_items = p->batch * p->heads_kv * KB;
    float *q_pool = (float *)(ws + L->sparse_q_pool), *k_pool = (float *)(ws + L->sparse_k_pool);
    float *q_sim = (float *)(ws + L->sparse_q_sim), *k_sim = (float *)(ws + L->sparse_k_sim);
#if defined(_OPENMP)
    threads = threads > 0 ? threads : 1;
#else
    threads = 1;
#endif
    /* Every thread's scratch up front: a failure leaves the outputs untouched. */
    const size_t per_thread = (size_t)D * sizeof(double) + (size_t)KB * sizeof(qattn_block_weight) + (size_t)KB;
    uint8_t *scratch = malloc(per_thread * (size_t)threads);
    if (!scratch)
        return QATTN_ERR_OUT_OF_MEMORY;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
#endif
    {
#if defined(_OPENMP)
        uint8_t *mine = scratch + per_thread * (size_t)omp_get_thread_num();
#else
        uint8_t *mine = scratch;
#endif
        double *acc = (double *)mine;
        qattn_block_weight *wts = (qattn_block_weight *)(mine + (size_t)D * sizeof(double));
        uint8_t *keep = (uint8_t *)(wts + KB);
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
        for (int64_t it = 0; it < q_items + k_items; it++) {
            const bool is_q = it < q_items;
            const int64_t idx = is_q ? it : it - q_items, nb = is_q ? QB : KB, heads = is_q ? p->heads_q : p->heads_kv;
            const int64_t blk = idx % nb, h = idx / nb % heads, b = idx / nb / heads;
            const int64_t size = is_q ? sp->q_block : sp->k_block, n = is_q ? p->seq_q : p->seq_k;
            const int64_t t0 = blk * size, t1 = qattn_min_i64(n, t0 + size);
            pool_block(is_q ? q : k, p->in_dtype, is_q ? p->q_stride : p->k_stride, b, h, t0, t1, D,
                       (is_q ? q_pool : k_pool) + idx * D, (is_q ? q_sim : k_sim) + idx, acc);
        }
#if defined(_OPENMP)
#pragma omp for schedule(dynamic)
#endif
        for (int64_t bh = 0; bh < p->batch * p->heads_kv; bh++)
            qattn_sparse_select_host(plan, ws, bh / p->heads_kv, bh % p->heads_kv, keep, wts);
    }
    free(scratch);
    return QATTN_OK;
}
