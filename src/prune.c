/*
 * Decode-time pruning: page metadata (channel-wise min/max of K per page and
 * head), query-aware page selection (Quest-style bounds, fixed or adaptive
 * budget), attention mass per page, and page-granular eviction. The core
 * validates and owns the semantics; the host functions here are the CPU
 * backend's path and the reference the GPU backends are tested against.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "numeric.h"

/* ------------------------------------------------------------- metadata */

/* Bytes of the codes [num_pages][Hkv][2][D]; the per-row INT8 scales start at
 * the next 256-byte boundary. */
static size_t meta_codes_bytes(const qattn_kv_cache_desc *c)
{
    return (size_t)c->num_pages * (size_t)c->heads_kv * 2u * (size_t)c->head_dim * qattn_kv_meta_elem(c);
}

qattn_status qattn_kv_meta_validate(qattn_ctx *ctx, const qattn_kv_cache_desc *desc, qattn_kv_meta_sizes *sizes)
{
    qattn_kv_cache_sizes cs;
    qattn_status s = qattn_kv_cache_validate(ctx, desc, &cs);
    if (s)
        return s;
    /* The cache's validation bounds num_pages * page_size * Hkv * D * elem by
     * size_t; the metadata is smaller per page (2 * D <= page_size * D * 2). */
    const size_t codes = meta_codes_bytes(desc);
    sizes->meta_bytes = codes;
    sizes->scale_offset = 0;
    if (qattn_kv_format_of(desc) == QATTN_KV_FMT_I8_ROW) {
        sizes->scale_offset = qattn_round_up(codes, 256);
        sizes->meta_bytes = sizes->scale_offset + (size_t)desc->num_pages * (size_t)desc->heads_kv * 4u;
    }
    return QATTN_OK;
}

qattn_status qattn_kv_meta_bytes(qattn_ctx *ctx, const qattn_kv_cache_desc *desc, qattn_kv_meta_sizes *sizes)
{
    if (!sizes)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "sizes is NULL");
    return qattn_kv_meta_validate(ctx, desc, sizes);
}

/* The dequantized value of element d of a cached row at element index at. */
static float cache_value(const qattn_kv_cache_desc *c, const void *k, int64_t at, float scale)
{
    switch (qattn_kv_format_of(c)) {
    case QATTN_KV_FMT_F16: return qattn_f16_to_f32(((const uint16_t *)k)[at]);
    case QATTN_KV_FMT_BF16: return qattn_bf16_to_f32(((const uint16_t *)k)[at]);
    case QATTN_KV_FMT_FP8: return qattn_e4m3_to_f32(((const uint8_t *)k)[at]) * scale;
    default: return (float)((const int8_t *)k)[at] * scale;
    }
}

void qattn_kv_meta_update_host(const qattn_kv_cache_desc *c, const void *k, const float *k_scale, void *meta,
                               int64_t page, int64_t head)
{
    const int64_t D = c->head_dim, P = c->page_size, H = c->heads_kv;
    int64_t page_stride, token_stride, head_stride;
    qattn_kv_cache_strides(c, &page_stride, &token_stride, &head_stride);
    const int64_t base = page * page_stride + head * head_stride;
    const qattn_kv_format fmt = qattn_kv_format_of(c);
    const size_t row = (size_t)((page * H + head) * 2 * D); /* element index of the min row */
    float row_scale_max = 0.f;
    if (fmt == QATTN_KV_FMT_I8_ROW)
        for (int64_t t = 0; t < P; t++) {
            float sc = k_scale[(page * P + t) * H + head];
            if (sc > row_scale_max) /* NaN (stale, unchecked) never wins */
                row_scale_max = sc;
        }
    for (int64_t d = 0; d < D; d++) {
        /* fminf/fmaxf skip NaN: stale slots of a partly filled page cannot poison the page's bound. */
        float lo = INFINITY, hi = -INFINITY;
        int64_t lo_at = base + d, hi_at = base + d;
        for (int64_t t = 0; t < P; t++) {
            const int64_t at = base + t * token_stride + d;
            float scale = fmt == QATTN_KV_FMT_I8_ROW ? k_scale[(page * P + t) * H + head] : 1.f;
            float x = cache_value(c, k, at, scale);
            if (x < lo) {
                lo = x;
                lo_at = at;
            }
            if (x > hi) {
                hi = x;
                hi_at = at;
            }
        }
        switch (fmt) {
        case QATTN_KV_FMT_F16:
        case QATTN_KV_FMT_BF16:
            ((uint16_t *)meta)[row + (size_t)d] = ((const uint16_t *)k)[lo_at];
            ((uint16_t *)meta)[row + (size_t)(D + d)] = ((const uint16_t *)k)[hi_at];
            break;
        case QATTN_KV_FMT_FP8:
        case QATTN_KV_FMT_I8:
            ((uint8_t *)meta)[row + (size_t)d] = ((const uint8_t *)k)[lo_at];
            ((uint8_t *)meta)[row + (size_t)(D + d)] = ((const uint8_t *)k)[hi_at];
            break;
        default: { /* INT8 per row: codes against the page's largest row scale, rounded outward */
            float inv = row_scale_max > 0.f ? 1.f / row_scale_max : 0.f;
            float l = lo == INFINITY ? 0.f : floorf(lo * inv), h = hi == -INFINITY ? 0.f : ceilf(hi * inv);
            ((int8_t *)meta)[row + (size_t)d] = (int8_t)fminf(fmaxf(l, -127.f), 127.f);
            ((int8_t *)meta)[row + (size_t)(D + d)] = (int8_t)fminf(fmaxf(h, -127.f), 127.f);
            break;
        }
        }
    }
    if (fmt == QATTN_KV_FMT_I8_ROW)
        ((float *)((char *)meta + qattn_round_up(meta_codes_bytes(c), 256)))[page * H + head] = row_scale_max;
}

void qattn_kv_meta_read_host(const qattn_kv_cache_desc *c, const void *meta, const float *k_scale, int64_t page,
                             int64_t head, float *lo, float *hi)
{
    const int64_t D = c->head_dim, H = c->heads_kv;
    const size_t row = (size_t)((page * H + head) * 2 * D);
    const qattn_kv_format fmt = qattn_kv_format_of(c);
    float scale = 1.f;
    if (fmt == QATTN_KV_FMT_FP8 || fmt == QATTN_KV_FMT_I8)
        scale = k_scale[head];
    else if (fmt == QATTN_KV_FMT_I8_ROW)
        scale = ((const float *)((const char *)meta + qattn_round_up(meta_codes_bytes(c), 256)))[page * H + head];
    for (int64_t d = 0; d < D; d++) {
        const size_t i = row + (size_t)d, j = row + (size_t)(D + d);
        switch (fmt) {
        case QATTN_KV_FMT_F16:
            lo[d] = qattn_f16_to_f32(((const uint16_t *)meta)[i]);
            hi[d] = qattn_f16_to_f32(((const uint16_t *)meta)[j]);
            break;
        case QATTN_KV_FMT_BF16:
            lo[d] = qattn_bf16_to_f32(((const uint16_t *)meta)[i]);
            hi[d] = qattn_bf16_to_f32(((const uint16_t *)meta)[j]);
            break;
        case QATTN_KV_FMT_FP8:
            lo[d] = qattn_e4m3_to_f32(((const uint8_t *)meta)[i]) * scale;
            hi[d] = qattn_e4m3_to_f32(((const uint8_t *)meta)[j]) * scale;
            break;
        default:
            lo[d] = (float)((const int8_t *)meta)[i] * scale;
            hi[d] = (float)((const int8_t *)meta)[j] * scale;
            break;
        }
    }
}

/* ------------------------------------------------------------ selection */

typedef struct page_rank {
    float score;
    int32_t page;
} page_rank;

/* Higher score first; equal scores (and NaN, last) by lower page index. */
static int rank_cmp(const void *a, const void *b)
{
    const page_rank *x = a, *y = b;
    const bool xn = isnan(x->score), yn = isnan(y->score);
    if (xn != yn)
        return xn ? 1 : -1;
    if (!xn && x->score != y->score)
        return x->score > y->score ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

/* Bound of the scaled query row qs[D] over one page's lo/hi rows: upper and lower. */
static void page_bounds(const float *qs, const float *lo, const float *hi, int64_t D, float *ub, float *lb)
{
    float u = 0.f, l = 0.f;
    for (int64_t d = 0; d < D; d++) {
        const float a = qs[d] * lo[d], b = qs[d] * hi[d];
        u += a > b ? a : b;
        l += a < b ? a : b;
    }
    *ub = u;
    *lb = l;
}

/* Exact weight exp(q . k_j - m) summed over the keys of one full page (qs scaled). */
static double page_exact_weight(const qattn_plan *plan, const void *k, const float *k_scale, int64_t page, int64_t hk,
                                const float *qs, double m)
{
    const qattn_kv_cache_desc *c = &plan->pp.cache;
    const int64_t D = c->head_dim, P = c->page_size, H = c->heads_kv;
    int64_t page_stride, token_stride, head_stride;
    qattn_kv_cache_strides(c, &page_stride, &token_stride, &head_stride);
    const qattn_kv_format fmt = qattn_kv_format_of(c);
    double sum = 0.0;
    for (int64_t t = 0; t < P; t++) {
        const int64_t at = page * page_stride + t * token_stride + hk * head_stride;
        const float scale = fmt == QATTN_KV_FMT_I8_ROW ? k_scale[(page * P + t) * H + hk]
                            : fmt == QATTN_KV_FMT_FP8 || fmt == QATTN_KV_FMT_I8 ? k_scale[hk] : 1.f;
        float dot = 0.f;
        for (int64_t d = 0; d < D; d++)
            dot += qs[d] * cache_value(c, k, at + d, scale);
        sum += exp((double)dot - m);
    }
    return sum;
}

/* The adaptive test for one (b, hk): every query row and head leaves at most
 * epsilon of its softmax weight bound in the unselected pages. U bounds the
 * unread weight from above (n_p exp(ub)); L bounds the read weight from
 * below: the exact weight of the row's QATTN_SELECT_EXACT_PAGES best selected
 * full pages (by ub; their keys are read) plus n_p exp(lb) of the others. */
static bool adaptive_ok(const qattn_plan *plan, const qattn_page_tables *t, int64_t b, int64_t hk, const void *k,
                        const float *k_scale, const float *qs, int64_t rows, const float *lohi, const uint8_t *chosen,
                        int64_t n, float *ubs, float *lbs)
{
    const int64_t D = plan->pp.cache.head_dim, P = plan->pp.cache.page_size;
    for (int64_t r = 0; r < rows; r++) {
        const float *q = qs + r * D;
        double m = -INFINITY;
        for (int64_t p = 0; p + 1 < n; p++) {
            page_bounds(q, lohi + (size_t)(2 * p) * D, lohi + (size_t)(2 * p + 1) * D, D, &ubs[p], &lbs[p]);
            m = ubs[p] > m ? ubs[p] : m;
        }
        if (m == -INFINITY)
            continue; /* one page: nothing left out */
        int64_t exact[QATTN_SELECT_EXACT_PAGES];
        int n_exact = 0;
        for (int64_t p = 0; p + 1 < n; p++) { /* the best selected full pages by ub, kept sorted */
            if (!chosen[p])
                continue;
            int at = n_exact < QATTN_SELECT_EXACT_PAGES ? n_exact++ : QATTN_SELECT_EXACT_PAGES;
            while (at > 0 && ubs[exact[at - 1]] < ubs[p]) {
                if (at < QATTN_SELECT_EXACT_PAGES)
                    exact[at] = exact[at - 1];
                at--;
            }
            if (at < QATTN_SELECT_EXACT_PAGES)
                exact[at] = p;
        }
        double U = 0.0, L = 0.0;
        for (int64_t p = 0; p + 1 < n; p++) /* full pages only: the last one is always read */
            if (!chosen[p])
                U += (double)P * exp((double)ubs[p] - m);
        for (int64_t p = 0; p + 1 < n; p++) {
            if (!chosen[p])
                continue;
            bool is_exact = false;
            for (int e = 0; e < n_exact; e++)
                is_exact |= exact[e] == p;
            L += is_exact ? page_exact_weight(plan, k, k_scale, qattn_table_page(&plan->pp, t, b, p), hk, q, m)
                          : (double)P * exp((double)lbs[p] - m);
        }
        if (U > (double)plan->select.epsilon * (L + U))
            return false;
    }
    return true;
}

qattn_status qattn_select_pages_host(qattn_ctx *ctx, const qattn_plan *plan, const void *q, const qattn_page_tables *t,
                                     const void *k, const void *meta, const float *k_scale, int32_t *counts,
                                     int32_t *pages, int threads)
{
    const qattn_paged_problem *pp = &plan->pp;
    const qattn_kv_cache_desc *c = &pp->cache;
    const int64_t D = c->head_dim, P = c->page_size, Hkv = c->heads_kv, G = pp->group, M = pp->max_pages_per_seq;
    const int64_t items = pp->batch * Hkv;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    qattn_status status = QATTN_OK;
    (void)threads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1)
#endif
    for (int64_t item = 0; item < items; item++) {
        const int64_t b = item / Hkv, hk = item % Hkv;
        const int64_t q0 = t->qo_indptr[b], q_len = t->qo_indptr[b + 1] - q0, kv_len = qattn_table_kv_len(pp, t, b);
        const int64_t n = (kv_len + P - 1) / P;
        int32_t *row = pages + item * M;
        if (n == 0) {
            counts[item] = 0;
            continue;
        }
        int64_t sinks, rb, budget, cap;
        qattn_select_geometry(&plan->select, P, kv_len, q_len, &sinks, &rb, &budget, &cap);
        const int64_t rows = q_len * G;
        float *qs = malloc((size_t)(rows > 0 ? rows : 1) * (size_t)D * sizeof(float));
        float *lohi = malloc((size_t)n * 2u * (size_t)D * sizeof(float));
        page_rank *rank = malloc((size_t)n * sizeof(page_rank));
        uint8_t *chosen = calloc((size_t)n, 1);
        float *bounds = malloc((size_t)n * 2u * sizeof(float));
        if (!qs || !lohi || !rank || !chosen || !bounds) {
            free(qs), free(lohi), free(rank), free(chosen), free(bounds);
#if defined(_OPENMP)
#pragma omp critical(qattn_select_oom)
#endif
            status = QATTN_ERR_OUT_OF_MEMORY;
            continue;
        }
        for (int64_t i = 0; i < q_len; i++) /* the group's query rows, scaled by sm_scale */
            for (int64_t g = 0; g < G; g++) {
                const char *src = (const char *)q + (size_t)((q0 + i) * pp->q_stride[0] + (hk * G + g) * pp->q_stride[1]) * es;
                for (int64_t d = 0; d < D; d++)
                    qs[(i * G + g) * D + d] = qattn_load_f(src, pp->q_dtype, d) * pp->sm_scale;
            }
        for (int64_t p = 0; p < n; p++)
            qattn_kv_meta_read_host(c, meta, k_scale, qattn_table_page(pp, t, b, p), hk, lohi + (size_t)(2 * p) * D,
                                    lohi + (size_t)(2 * p + 1) * D);
        /* Rank the unforced pages by their score: the largest bound over the group's rows. */
        int64_t ranked = 0;
        for (int64_t p = sinks; p < rb; p++) {
            float best = -INFINITY;
            for (int64_t r = 0; r < rows; r++) {
                float ub, lb;
                page_bounds(qs + r * D, lohi + (size_t)(2 * p) * D, lohi + (size_t)(2 * p + 1) * D, D, &ub, &lb);
                best = ub > best ? ub : best;
            }
            rank[ranked++] = (page_rank){best, (int32_t)p};
        }
        qsort(rank, (size_t)ranked, sizeof(*rank), rank_cmp);
        for (int64_t p = 0; p < sinks; p++)
            chosen[p] = 1;
        for (int64_t p = rb; p < n; p++)
            chosen[p] = 1;
        const int64_t forced = sinks + (n - rb);
        int64_t want = budget, taken = 0;
        for (;;) {
            for (; taken < want - forced && taken < ranked; taken++)
                chosen[rank[taken].page] = 1;
            if (!plan->select.adaptive || want >= cap ||
                adaptive_ok(plan, t, b, hk, k, k_scale, qs, rows, lohi, chosen, n, bounds, bounds + n))
                break;
            want = want * 2 < cap ? want * 2 : cap;
        }
        int64_t count = 0;
        for (int64_t p = 0; p < n; p++)
            if (chosen[p])
                row[count++] = (int32_t)p;
        counts[item] = (int32_t)count;
        free(qs), free(lohi), free(rank), free(chosen), free(bounds);
    }
    if (status)
        return qattn_set_error(ctx, status, "out of host memory for the page selection's scratch");
    return QATTN_OK;
}

/* ------------------------------------------------------------- plans */

qattn_status qattn_paged_select_plan_create(qattn_ctx *ctx, const qattn_paged_desc *desc,
                                            const qattn_page_select_desc *sel, qattn_plan **out)
{
    if (out)
        *out = NULL;
    if (!ctx)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "ctx is NULL");
    if (!sel) /* without a selection this is qattn_paged_plan_create */
        return qattn_paged_plan_create(ctx, desc, out);
    qattn_select_problem sp = {.enabled = true};
    if (sel->budget_tokens < 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "select.budget_tokens=%lld must be >= 0",
                               (long long)sel->budget_tokens);
    if (sel->budget_tokens == 0 && !(sel->budget_fraction > 0.f && sel->budget_fraction <= 1.f))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "select: budget_tokens is 0, so budget_fraction must be in (0, 1], got %g",
                               (double)sel->budget_fraction);
    if (sel->budget_tokens > 0 && sel->budget_fraction != 0.f)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "select: give budget_tokens or budget_fraction, not both (%lld, %g)",
                               (long long)sel->budget_tokens, (double)sel->budget_fraction);
    if (sel->sink_pages < 0 || sel->recent_pages < 0 || sel->max_budget_tokens < 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "select: sink_pages=%lld, recent_pages=%lld and max_budget_tokens=%lld must be >= 0",
                               (long long)sel->sink_pages, (long long)sel->recent_pages,
                               (long long)sel->max_budget_tokens);
    if (!(sel->epsilon >= 0.f && sel->epsilon < 1.f))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "select.epsilon=%g must be in [0, 1)",
                               (double)sel->epsilon);
    if (sel->max_budget_tokens > 0 && sel->epsilon == 0.f)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "select.max_budget_tokens caps the adaptive budget: set epsilon > 0 or leave it 0");
    if (!desc)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "desc is NULL");
    const int64_t P = desc->cache.page_size > 0 ? desc->cache.page_size : 1;
    /* Tokens to pages, rounded up without overflow (budget_tokens may be INT64_MAX: "the whole sequence"). */
    sp.budget_pages = sel->budget_tokens > 0 ? sel->budget_tokens / P + (sel->budget_tokens % P != 0) : 0;
    sp.budget_fraction = sel->budget_fraction;
    sp.sink_pages = sel->sink_pages;
    sp.recent_pages = sel->recent_pages;
    sp.epsilon = sel->epsilon;
    sp.adaptive = sel->epsilon > 0.f;
    sp.max_budget_pages = sel->max_budget_tokens > 0 ? sel->max_budget_tokens / P + (sel->max_budget_tokens % P != 0) : 0;
    const uint32_t need = QATTN_PRUNE_CAP_SELECT | (sp.adaptive ? QATTN_PRUNE_CAP_ADAPTIVE : 0u);
    if ((ctx->backend->prune & need) != need)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "backend %s does not run %s page selection",
                               ctx->backend->name, sp.adaptive ? "an adaptive" : "a");
    return qattn_paged_plan_create_internal(ctx, desc, NULL, &sp, out);
}

qattn_status qattn_paged_selection_read(const qattn_plan *plan, const qattn_buffer *workspace,
                                        size_t workspace_offset, int32_t *counts, int32_t *pages)
{
    if (!plan)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "plan is NULL");
    qattn_ctx *ctx = plan->ctx;
    if (!plan->paged || !plan->select.enabled)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "this plan selects no pages (make it with qattn_paged_select_plan_create)");
    if (!workspace || workspace->ctx != ctx)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "workspace is NULL or of another context");
    if (!qattn_buffer_fits(workspace, workspace_offset, plan->ws.total))
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "workspace: %zu bytes at offset %zu do not fit in its %zu-byte buffer",
                               plan->ws.total, workspace_offset, workspace->size);
    const size_t rows = (size_t)(plan->pp.batch * plan->pp.cache.heads_kv);
    qattn_status s = QATTN_OK;
    if (counts)
        s = ctx->backend->buffer_download(ctx, workspace, workspace_offset + plan->ws.select_counts, counts, rows * 4);
    if (!s && pages)
        s = ctx->backend->buffer_download(ctx, workspace, workspace_offset + plan->ws.select_pages, pages,
                                          rows * (size_t)plan->pp.max_pages_per_seq * 4);
    return s;
}

qattn_status qattn_paged_page_mass(const qattn_plan *plan, const qattn_paged_args *args, qattn_buffer *mass,
                                   size_t mass_offset)
{
    if (!plan)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "plan is NULL");
    qattn_ctx *ctx = plan->ctx;
    if (!plan->paged)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "page mass needs a paged plan");
    if (!plan->pp.return_lse)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "page mass reads the LSE of a run: make the plan with return_lse");
    qattn_status s = qattn_paged_check_args(plan, args);
    if (s)
        return s;
    if (!(ctx->backend->prune & QATTN_PRUNE_CAP_PAGE_MASS) || !ctx->backend->paged_page_mass)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "backend %s does not compute page masses",
                               ctx->backend->name);
    if (!mass)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "mass is NULL");
    const size_t bytes = (size_t)plan->pp.batch * (size_t)plan->pp.cache.heads_kv * (size_t)plan->pp.max_pages_per_seq * 4u;
    if (mass->ctx != ctx || !qattn_buffer_fits(mass, mass_offset, bytes) || mass_offset % 4)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "mass: %zu bytes at offset %zu (a multiple of 4) must fit in a buffer of this context",
                               bytes, mass_offset);
    /* The mass is the one output: it shares no byte with what the kernel reads. */
    const qattn_kv_cache_buffers *c = args->cache;
    const qattn_paged_problem *pp = &plan->pp;
    const size_t b4 = (size_t)pp->batch * 4;
    const bool dense = pp->table == QATTN_PAGES_DENSE;
    const qattn_span ins[12] = {
        {"args.q", args->q, args->q_offset, pp->q_bytes},
        {"cache k", c->k, 0, pp->sizes.cache_bytes},
        {"cache k_scale", c->k_scale, 0, pp->sizes.scale_bytes},
        {"args.lse", args->lse, args->lse_offset, pp->lse_bytes},
        {"args.qo_indptr", args->qo_indptr, 0, b4 + 4},
        {"args.block_table", dense ? args->block_table : NULL, 0, (size_t)pp->max_pages_per_seq * b4},
        {"args.seq_lens", dense ? args->seq_lens : NULL, 0, b4},
        {"args.indptr", dense ? NULL : args->indptr, 0, b4 + 4},
        {"args.indices", dense ? NULL : args->indices, 0, args->indices ? args->indices->size : 0},
        {"args.last_page_len", dense ? NULL : args->last_page_len, 0, b4},
        {"args.o", args->o, args->o_offset, pp->o_bytes},
        {"args.workspace", plan->ws.total ? args->workspace : NULL, args->workspace_offset, plan->ws.total}};
    const qattn_span outs[1] = {{"mass", mass, mass_offset, bytes}};
    if ((s = qattn_check_outputs(ctx, outs, 1, ins, 12)))
        return s;
    return ctx->backend->paged_page_mass(ctx, plan, args, mass, mass_offset);
}

/* ------------------------------------------------------------- eviction */

static int cmp_i32(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

qattn_status qattn_evict_pages(qattn_page_pool *pool, const qattn_evict_policy *pol, int32_t *pages,
                               int64_t *num_pages, float *scores, int64_t *freed)
{
    if (freed)
        *freed = 0;
    if (!pool || !pol || !pages || !num_pages)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL",
                               !pool ? "pool" : !pol ? "policy" : !pages ? "pages" : "num_pages");
    const int64_t n = *num_pages;
    if (pol->sink_pages < 0 || pol->recent_pages < 1 || pol->keep_pages < 1 ||
        pol->keep_pages - pol->recent_pages < pol->sink_pages) /* no overflow: both >= 1 here */
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT,
                               "policy: keep_pages=%lld must be >= 1 and >= sink_pages (%lld, >= 0) + recent_pages "
                               "(%lld, >= 1)",
                               (long long)pol->keep_pages, (long long)pol->sink_pages, (long long)pol->recent_pages);
    if (n < 0 || n > INT32_MAX)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "*num_pages=%lld must be in [0, 2^31)", (long long)n);
    { /* distinct pages: evicting one copy of a page listed twice would free a page the list still holds */
        int32_t *sorted = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
        if (!sorted)
            return qattn_set_error(NULL, QATTN_ERR_OUT_OF_MEMORY, "out of host memory checking the page list");
        memcpy(sorted, pages, (size_t)n * sizeof(int32_t));
        qsort(sorted, (size_t)n, sizeof(int32_t), cmp_i32);
        int64_t twice = -1;
        for (int64_t i = 1; i < n && twice < 0; i++)
            if (sorted[i] == sorted[i - 1])
                twice = sorted[i];
        free(sorted);
        if (twice >= 0)
            return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "pages: page %lld is listed twice",
                                   (long long)twice);
    }
    if (n <= pol->keep_pages)
        return QATTN_OK;
    /* Candidates: the pages between the sinks and the recent window; drop the n - keep lowest. */
    const int64_t first = pol->sink_pages, end = n - pol->recent_pages, drop = n - pol->keep_pages;
    page_rank *cand = malloc((size_t)(end - first) * sizeof(*cand));
    int32_t *victims = malloc((size_t)drop * sizeof(*victims));
    uint8_t *gone = calloc((size_t)n, 1);
    if (!cand || !victims || !gone) {
        free(cand), free(victims), free(gone);
        return qattn_set_error(NULL, QATTN_ERR_OUT_OF_MEMORY, "out of host memory choosing pages to evict");
    }
    for (int64_t p = first; p < end; p++) /* the oldest first without scores; lowest score first with them */
        cand[p - first] = (page_rank){scores ? -scores[p] : 0.f, (int32_t)p};
    qsort(cand, (size_t)(end - first), sizeof(*cand), rank_cmp); /* highest -score (lowest score), then oldest */
    for (int64_t i = 0; i < drop; i++) {
        gone[cand[i].page] = 1;
        victims[i] = pages[cand[i].page];
    }
    qattn_status s = qattn_page_pool_free(pool, drop, victims);
    if (!s) {
        int64_t kept = 0;
        for (int64_t p = 0; p < n; p++) {
            if (gone[p])
                continue;
            pages[kept] = pages[p];
            if (scores)
                scores[kept] = scores[p];
            kept++;
        }
        *num_pages = kept;
        if (freed)
            *freed = drop;
    }
    free(cand), free(victims), free(gone);
    return s;
}
