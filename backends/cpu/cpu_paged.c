/*
 * CPU paged KV cache: append with quantization, paged attention (decode and
 * prefill) on the shared flash engine, split-KV with an exact LSE merge, and
 * qattn_merge_states. The query heads of a GQA group are packed into one
 * work item so they share every K/V row the item dequantizes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "cpu_flash.h"
#include "numeric.h"

static void *host_at(const qattn_buffer *b, size_t offset) { return b ? (char *)b->host + offset : NULL; }

/* Element index of (page, offset in page, head)'s first value. */
static int64_t cache_row(const qattn_kv_cache_desc *c, int64_t page, int64_t off, int64_t h)
{
    int64_t page_stride, token_stride, head_stride;
    qattn_kv_cache_strides(c, &page_stride, &token_stride, &head_stride);
    return page * page_stride + off * token_stride + h * head_stride;
}

/* Dequantizes one cached row into dst[D]. */
static void load_cache_row(const qattn_kv_cache_desc *c, const void *cache, const float *scales, int64_t page,
                           int64_t off, int64_t h, float *dst)
{
    const int D = (int)c->head_dim;
    int64_t at = cache_row(c, page, off, h);
    if (c->dtype == QATTN_DTYPE_F16 || c->dtype == QATTN_DTYPE_BF16) {
        cpu_convert_row(dst, (const uint16_t *)cache + at, c->dtype, D, 1.f);
        return;
    }
    float scale = c->scales == QATTN_KV_SCALES_PER_ROW ? scales[(page * c->page_size + off) * c->heads_kv + h]
                                                       : scales[h];
    if (c->dtype == QATTN_DTYPE_FP8_E4M3) {
        const float *e4m3 = cpu_e4m3_table();
        const uint8_t *src = (const uint8_t *)cache + at;
        for (int d = 0; d < D; d++)
            dst[d] = e4m3[src[d]] * scale;
    } else {
        cpu_convert_row_i8(dst, (const int8_t *)cache + at, D);
        for (int d = 0; d < D; d++)
            dst[d] *= scale;
    }
}

static int cmp_i64(const void *a, const void *b)
{
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* After an append's writes: the metadata of every page it wrote, recomputed
 * from the page's slots (each page once). */
static qattn_status update_meta(qattn_ctx *ctx, const qattn_kv_append_args *a, const int64_t *slots,
                                const float *k_scale)
{
    const qattn_kv_cache_desc *c = a->cache;
    const int64_t capacity = c->num_pages * c->page_size;
    int64_t *touched = malloc((size_t)a->num_tokens * sizeof(int64_t)), n = 0;
    if (!touched)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory updating the page metadata");
    for (int64_t t = 0; t < a->num_tokens; t++)
        if (slots[t] >= 0 && slots[t] < capacity)
            touched[n++] = slots[t] / c->page_size;
    qsort(touched, (size_t)n, sizeof(int64_t), cmp_i64);
    int64_t unique = 0;
    for (int64_t i = 0; i < n; i++)
        if (unique == 0 || touched[unique - 1] != touched[i])
            touched[unique++] = touched[i];
    const int64_t items = unique * c->heads_kv;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(cpu_worker_count(ctx->num_threads, items))
#endif
    for (int64_t it = 0; it < items; it++)
        qattn_kv_meta_update_host(c, a->buffers->k->host, k_scale, a->buffers->k_meta->host,
                                  touched[it / c->heads_kv], it % c->heads_kv);
    free(touched);
    return QATTN_OK;
}

qattn_status cpu_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *a, const qattn_kv_cache_sizes *sizes)
{
    (void)sizes;
    const qattn_kv_cache_desc *c = a->cache;
    const int64_t T = a->num_tokens, H = c->heads_kv, D = c->head_dim;
    const int64_t capacity = c->num_pages * c->page_size;
    const int64_t *slots = host_at(a->slot_mapping, a->slot_mapping_offset);
    const char *k_new = host_at(a->k_new, a->k_new_offset), *v_new = host_at(a->v_new, a->v_new_offset);
    const size_t es = qattn_dtype_size(a->new_dtype);
    float *k_scale = host_at(a->buffers->k_scale, 0), *v_scale = host_at(a->buffers->v_scale, 0);

    if (!(a->flags & QATTN_FLAG_NO_FINITE_CHECK)) {
        int64_t shape[4] = {1, H, T, D}, stride[4] = {1, a->new_stride[1], a->new_stride[0], 1};
        const bool finite = qattn_host_tensor_is_finite(k_new, a->new_dtype, shape, stride) &&
                            qattn_host_tensor_is_finite(v_new, a->new_dtype, shape, stride);
        qattn_status s = qattn_kv_append_check(ctx, a, slots, finite ? 0u : QATTN_NONFINITE_NEW_KV, k_scale, v_scale);
        if (s)
            return s;
    }

#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(cpu_worker_count(ctx->num_threads, T))
#endif
    for (int64_t t = 0; t < T; t++) {
        int64_t slot = slots[t];
        if (slot < 0 || slot >= capacity) /* padding; out of range only when unchecked */
            continue;
        int64_t page = slot / c->page_size, off = slot % c->page_size;
        for (int64_t h = 0; h < H; h++)
            for (int which = 0; which < 2; which++) {
                const char *src = (which ? v_new : k_new) + (size_t)(t * a->new_stride[0] + h * a->new_stride[1]) * es;
                void *cache = which ? a->buffers->v->host : a->buffers->k->host;
                float *scales = which ? v_scale : k_scale;
                int64_t at = cache_row(c, page, off, h);
                if (c->dtype == QATTN_DTYPE_F16 || c->dtype == QATTN_DTYPE_BF16) {
                    for (int64_t d = 0; d < D; d++)
                        qattn_store_f(cache, c->dtype, at + d, qattn_load_f(src, a->new_dtype, d));
                    continue;
                }
                float inv;
                if (c->scales == QATTN_KV_SCALES_PER_ROW) { /* int8: amax of this row */
                    float amax = 0.f;
                    for (int64_t d = 0; d < D; d++)
                        amax = fmaxf(amax, fabsf(qattn_load_f(src, a->new_dtype, d)));
                    if (amax < QATTN_QUANT_MIN_AMAX) /* all tiny or zero: codes and scale 0 */
                        amax = 0.f;
                    scales[(page * c->page_size + off) * H + h] = amax / 127.f;
                    inv = amax > 0.f ? 127.f / amax : 0.f;
                } else { /* a scale below the floor (or not > 0) writes zeros, as on every backend */
                    inv = scales[h] >= QATTN_QUANT_MIN_AMAX ? 1.f / scales[h] : 0.f;
                }
                for (int64_t d = 0; d < D; d++) {
                    float x = qattn_load_f(src, a->new_dtype, d) * inv;
                    if (c->dtype == QATTN_DTYPE_FP8_E4M3) {
                        ((uint8_t *)cache)[at + d] = qattn_f32_to_e4m3(x);
                    } else {
                        /* fminf/fmaxf: an unchecked NaN becomes -127, not an undefined conversion */
                        ((int8_t *)cache)[at + d] = (int8_t)fminf(fmaxf(nearbyintf(x), -127.f), 127.f);
                    }
                }
            }
    }
    if (a->buffers->k_meta)
        return update_meta(ctx, a, slots, k_scale);
    return QATTN_OK;
}

qattn_status cpu_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    qattn_paged_problem *pp = &plan->pp;
    const int64_t D = pp->cache.head_dim;
    if (D % 16 != 0 || D > 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the cpu backend (multiples of 16 up to 256)",
                               (long long)D);
    const int64_t tiles = qattn_ceil_div(pp->group * pp->max_q_len, CPU_QT);
    const int64_t items = pp->batch * pp->cache.heads_kv * tiles;
    const int threads = ctx->num_threads;
    if (pp->num_splits == 0) {
        /* Split the keys only when sequences x heads x tiles leave threads idle. */
        int64_t splits = items >= threads ? 1 : qattn_ceil_div(threads, items);
        if (splits > pp->max_pages_per_seq)
            splits = pp->max_pages_per_seq;
        pp->num_splits = (int)splits;
        snprintf(plan->why, sizeof(plan->why), "%lld work items for %d threads: %d split(s) of the keys.",
                 (long long)items, threads, pp->num_splits);
    } else {
        snprintf(plan->why, sizeof(plan->why), "%d split(s) of the keys, as requested.", pp->num_splits);
    }
    qattn_status s = qattn_paged_partials_bytes(ctx, pp, &plan->backend_workspace);
    if (s)
        return s;
    int64_t per = qattn_ceil_div(pp->max_pages_per_seq, pp->num_splits);
    plan->q_tile = CPU_QT;
    plan->kv_tile = pp->num_splits > 1 ? (int)(per * pp->cache.page_size) : 0;
    plan->status_word = false;
    snprintf(plan->kernel, sizeof(plan->kernel), "cpu_paged_%s_d%lld", qattn_dtype_name(pp->cache.dtype),
             (long long)D);
    return QATTN_OK;
}

typedef struct paged_loader {
    const qattn_paged_problem *pp;
    const qattn_page_tables *tables;
    const qattn_kv_cache_buffers *cache;
    int64_t b, hk;
    const int32_t *selected; /* a selection row: the logical pages read, in order (NULL: all) */
} paged_loader;

static void load_paged_kv(const void *ctx, int64_t j0, int keys, cpu_scratch *sc)
{
    const paged_loader *pl = ctx;
    const qattn_kv_cache_desc *c = &pl->pp->cache;
    const int D = (int)c->head_dim;
    const float *ks = pl->cache->k_scale ? pl->cache->k_scale->host : NULL;
    const float *vs = pl->cache->v_scale ? pl->cache->v_scale->host : NULL;
    if (keys < CPU_KT_MAX)
        memset(sc->Kt, 0, (size_t)D * CPU_KT_MAX * sizeof(float));
    for (int j = 0; j < keys; j++) {
        int64_t t = j0 + j, logical = t / c->page_size, off = t % c->page_size;
        if (pl->selected)
            logical = pl->selected[logical];
        int64_t page = qattn_table_page(pl->pp, pl->tables, pl->b, logical);
        load_cache_row(c, pl->cache->k->host, ks, page, off, pl->hk, sc->row);
        for (int d = 0; d < D; d++)
            sc->Kt[(size_t)d * CPU_KT_MAX + j] = sc->row[d];
        load_cache_row(c, pl->cache->v->host, vs, page, off, pl->hk, sc->V + (size_t)j * D);
    }
}

/* Merges S states of one (row, head): values at v[s * vs] (dtype vdt), LSEs at
 * lse[s * ls]; writes out[D] (fp32) and returns the merged LSE. */
static float merge_one(int64_t S, int D, const void *v, qattn_dtype vdt, int64_t vs, const float *lse, int64_t ls,
                       float *out)
{
    float m = -INFINITY;
    for (int64_t s = 0; s < S; s++)
        m = lse[s * ls] > m ? lse[s * ls] : m;
    for (int d = 0; d < D; d++)
        out[d] = 0.f;
    if (m == -INFINITY)
        return -INFINITY;
    double total = 0.0;
    for (int64_t s = 0; s < S; s++) {
        if (lse[s * ls] == -INFINITY)
            continue;
        float w = expf(lse[s * ls] - m);
        total += w;
        for (int d = 0; d < D; d++)
            out[d] += w * qattn_load_f(v, vdt, s * vs + d);
    }
    for (int d = 0; d < D; d++)
        out[d] = (float)(out[d] / total);
    return (float)(m + log(total));
}

/* A run's tables (host memory on the CPU), checked: host tables are cheap to
 * check, so the CPU always does and never reads outside the cache. */
static qattn_status checked_tables(qattn_ctx *ctx, const qattn_paged_problem *pp, const qattn_paged_args *a,
                                   qattn_page_tables *t)
{
    *t = (qattn_page_tables){
        .qo_indptr = a->qo_indptr->host,
        .block_table = a->block_table ? a->block_table->host : NULL,
        .seq_lens = a->seq_lens ? a->seq_lens->host : NULL,
        .indptr = a->indptr ? a->indptr->host : NULL,
        .indices = a->indices ? a->indices->host : NULL,
        .last_page_len = a->last_page_len ? a->last_page_len->host : NULL,
        .indices_count = a->indices ? (int64_t)(a->indices->size / 4) : 0,
    };
    return qattn_paged_check_tables(ctx, pp, t);
}

qattn_status cpu_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a)
{
    const qattn_paged_problem *pp = &plan->pp;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the cpu backend");
    qattn_page_tables tables;
    qattn_status s = checked_tables(ctx, pp, a, &tables);
    if (s)
        return s;
    const char *q = host_at(a->q, a->q_offset);
    const int64_t D = pp->cache.head_dim, Hq = pp->heads_q, Hkv = pp->cache.heads_kv, G = pp->group;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    if (pp->check) {
        for (int64_t b = 0; b < pp->batch; b++) {
            int64_t q0 = tables.qo_indptr[b], n = tables.qo_indptr[b + 1] - q0;
            int64_t shape[4] = {1, Hq, n, D}, stride[4] = {1, pp->q_stride[1], pp->q_stride[0], 1};
            if (n > 0 && !qattn_host_tensor_is_finite(q + (size_t)(q0 * pp->q_stride[0]) * es, pp->q_dtype, shape,
                                                      stride))
                return qattn_nonfinite_error(ctx, QATTN_NONFINITE_Q);
        }
    }

    int32_t *sel_counts = NULL, *sel_pages = NULL;
    if (plan->select.enabled) { /* choose each (sequence, KV head)'s pages first, into the workspace */
        char *ws = host_at(a->workspace, a->workspace_offset);
        sel_counts = (int32_t *)(ws + plan->ws.select_counts);
        sel_pages = (int32_t *)(ws + plan->ws.select_pages);
        s = qattn_select_pages_host(ctx, plan, q, &tables, a->cache->k->host, a->cache->k_meta->host,
                                    a->cache->k_scale ? a->cache->k_scale->host : NULL, sel_counts, sel_pages,
                                    ctx->num_threads);
        if (s)
            return s;
    }

    const int splits = pp->num_splits;
    const int64_t tiles = qattn_ceil_div(G * pp->max_q_len, CPU_QT);
    const int64_t items = pp->batch * Hkv * tiles * splits;
    const int threads = cpu_worker_count(ctx->num_threads, items);
    cpu_scratch *sc = cpu_scratch_array(threads, (int)D);
    if (!sc)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the cpu kernel's tiles");
    char *o = host_at(a->o, a->o_offset);
    float *lse_out = pp->return_lse ? host_at(a->lse, a->lse_offset) : NULL;
    float *part_o = NULL, *part_lse = NULL;
    if (splits > 1) {
        part_o = (float *)host_at(a->workspace, a->workspace_offset + plan->ws.backend);
        part_lse = part_o + (size_t)splits * pp->total_q * Hq * D;
    }
    const float qk_to_log2 = pp->sm_scale * (float)QATTN_LOG2E;
    const cpu_flash_params dense_fp = {.head_dim = (int)D, .precision = QATTN_PRECISION_EXACT};

#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
    for (int64_t it = 0; it < items; it++) {
        const int split = (int)(it % splits);
        const int64_t tile = (it / splits) % tiles, hk = (it / splits / tiles) % Hkv, b = it / splits / tiles / Hkv;
        const int64_t q0 = tables.qo_indptr[b], q_len = tables.qo_indptr[b + 1] - q0;
        int64_t kv_len = qattn_table_kv_len(pp, &tables, b);
        const int32_t *selected = NULL;
        if (sel_counts && kv_len > 0) { /* the selected pages, as if they were the whole cache */
            const int64_t P = pp->cache.page_size, n = (kv_len + P - 1) / P, count = sel_counts[b * Hkv + hk];
            selected = sel_pages + (b * Hkv + hk) * pp->max_pages_per_seq;
            kv_len = (count - 1) * P + (kv_len - (n - 1) * P);
        }
        const int64_t first = tile * CPU_QT, rows_total = q_len * G;
        if (first >= rows_total)
            continue;
        const int rows = (int)(rows_total - first < CPU_QT ? rows_total - first : CPU_QT);
        cpu_scratch *mine = &sc[cpu_thread_index()];
        for (int r = 0; r < rows; r++) { /* row r is query i of head hk * G + g */
            int64_t i = (first + r) / G, g = (first + r) % G;
            const char *src = q + (size_t)((q0 + i) * pp->q_stride[0] + (hk * G + g) * pp->q_stride[1]) * es;
            cpu_convert_row(mine->Q + (size_t)r * D, src, pp->q_dtype, (int)D, qk_to_log2);
            int64_t end = pp->causal ? i + 1 + kv_len - q_len : kv_len;
            mine->key_end[r] = end < kv_len ? end : kv_len;
        }
        int64_t begin = 0, end = kv_len;
        if (splits > 1) {
            qattn_split_range(pp->max_pages_per_seq, pp->cache.page_size, split, splits, &begin, &end);
            end = end < kv_len ? end : kv_len;
        }
        cpu_flash_params fp = dense_fp;
        cpu_step_filter filter;
        if (plan->sparse.enabled) { /* the window and sinks, placed as causal is: i' = i + kv_len - q_len */
            const qattn_problem seq = {.seq_q = q_len, .seq_k = kv_len, .causal = pp->causal};
            int64_t lo[CPU_QT], hi[CPU_QT], sinks[CPU_QT];
            for (int r = 0; r < rows; r++)
                qattn_sparse_row_keys(&seq, &plan->sparse, (first + r) / G, &lo[r], &hi[r], &sinks[r]);
            cpu_sparse_rows_filter(mine, &plan->sparse, lo, hi, sinks, rows, &filter);
            fp.filter = &filter;
        }
        paged_loader pl = {.pp = pp, .tables = &tables, .cache = a->cache, .b = b, .hk = hk, .selected = selected};
        cpu_flash_loop(mine, rows, &fp, begin, end, load_paged_kv, &pl);

        for (int r = 0; r < rows; r++) {
            int64_t i = (first + r) / G, h = hk * G + (first + r) % G, row = q0 + i;
            float inv = mine->l[r] > 0.f ? 1.f / mine->l[r] : 0.f;
            float lse = cpu_row_lse(mine->m[r], mine->l[r]);
            const float *acc = mine->O + (size_t)r * D;
            if (splits > 1) {
                float *dst = part_o + (((size_t)split * pp->total_q + row) * Hq + h) * D;
                for (int64_t d = 0; d < D; d++)
                    dst[d] = acc[d] * inv;
                part_lse[((size_t)split * pp->total_q + row) * Hq + h] = lse;
                continue;
            }
            char *dst = o + (size_t)(row * pp->o_stride[0] + h * pp->o_stride[1]) * es;
            for (int64_t d = 0; d < D; d++)
                qattn_store_f(dst, pp->q_dtype, d, acc[d] * inv);
            if (lse_out)
                lse_out[row * Hq + h] = lse;
        }
    }

    if (splits > 1) { /* exact merge of the splits through their LSE */
        float *merged = sc[0].row;
        for (int64_t b = 0; b < pp->batch; b++)
            for (int64_t row = tables.qo_indptr[b]; row < tables.qo_indptr[b + 1]; row++)
                for (int64_t h = 0; h < Hq; h++) {
                    size_t first = (size_t)row * Hq + h, stride = (size_t)pp->total_q * Hq;
                    float lse = merge_one(splits, (int)D, part_o + first * D, QATTN_DTYPE_F32, (int64_t)(stride * D),
                                          part_lse + first, (int64_t)stride, merged);
                    char *dst = o + (size_t)(row * pp->o_stride[0] + h * pp->o_stride[1]) * es;
                    for (int64_t d = 0; d < D; d++)
                        qattn_store_f(dst, pp->q_dtype, d, merged[d]);
                    if (lse_out)
                        lse_out[row * Hq + h] = lse;
                }
    }
    cpu_scratch_array_free(sc, threads);
    return QATTN_OK;
}

qattn_status cpu_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a,
                                 qattn_buffer *mass_buf, size_t mass_offset)
{
    const qattn_paged_problem *pp = &plan->pp;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the cpu backend");
    qattn_page_tables tables;
    qattn_status s = checked_tables(ctx, pp, a, &tables);
    if (s)
        return s;
    const qattn_kv_cache_desc *c = &pp->cache;
    const int64_t D = c->head_dim, P = c->page_size, Hkv = c->heads_kv, Hq = pp->heads_q, G = pp->group;
    const int64_t M = pp->max_pages_per_seq;
    const char *q = host_at(a->q, a->q_offset);
    const float *lse = host_at(a->lse, a->lse_offset);
    const float *ks = a->cache->k_scale ? a->cache->k_scale->host : NULL;
    float *mass = host_at(mass_buf, mass_offset);
    const size_t es = qattn_dtype_size(pp->q_dtype);
    const int64_t items = pp->batch * Hkv;
    float *rows = malloc((size_t)cpu_worker_count(ctx->num_threads, items) * 2u * (size_t)D * sizeof(float));
    if (!rows)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the page mass");
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(cpu_worker_count(ctx->num_threads, items))
#endif
    for (int64_t it = 0; it < items; it++) {
        const int64_t b = it / Hkv, hk = it % Hkv;
        float *qrow = rows + (size_t)cpu_thread_index() * 2u * (size_t)D, *krow = qrow + D;
        const int64_t q0 = tables.qo_indptr[b], q_len = tables.qo_indptr[b + 1] - q0;
        const int64_t kv_len = qattn_table_kv_len(pp, &tables, b), n = (kv_len + P - 1) / P;
        float *out = mass + it * M;
        for (int64_t p = 0; p < M; p++)
            out[p] = 0.f;
        for (int64_t p = 0; p < n; p++) {
            const int64_t page = qattn_table_page(pp, &tables, b, p);
            double sum = 0.0;
            for (int64_t t = 0; t < P && p * P + t < kv_len; t++) {
                load_cache_row(c, a->cache->k->host, ks, page, t, hk, krow);
                for (int64_t i = 0; i < q_len; i++) {
                    if (pp->causal && p * P + t > i + kv_len - q_len)
                        continue;
                    for (int64_t g = 0; g < G; g++) {
                        const int64_t h = hk * G + g;
                        const float l = lse[(q0 + i) * Hq + h];
                        if (l == -INFINITY)
                            continue;
                        cpu_convert_row(qrow, q + (size_t)((q0 + i) * pp->q_stride[0] + h * pp->q_stride[1]) * es,
                                        pp->q_dtype, (int)D, 1.f);
                        double dot = 0.0;
                        for (int64_t d = 0; d < D; d++)
                            dot += (double)qrow[d] * krow[d];
                        sum += exp((double)pp->sm_scale * dot - l);
                    }
                }
            }
            out[p] = (float)sum;
        }
    }
    free(rows);
    return QATTN_OK;
}

qattn_status cpu_merge_states(qattn_ctx *ctx, const qattn_merge_desc *d, const qattn_merge_args *a)
{
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the cpu backend");
    const char *v = host_at(a->v, a->v_offset);
    const float *s = host_at(a->s, a->s_offset);
    char *o = host_at(a->o, a->o_offset);
    float *lse = a->lse ? host_at(a->lse, a->lse_offset) : NULL;
    const size_t ves = qattn_dtype_size(d->v_dtype), oes = qattn_dtype_size(d->o_dtype);
    float *tmp = malloc((size_t)d->head_dim * sizeof(float));
    if (!tmp)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory merging states");
    for (int64_t r = 0; r < d->rows; r++)
        for (int64_t h = 0; h < d->heads; h++) {
            const char *v0 = v + (size_t)(r * d->v_stride[1] + h * d->v_stride[2]) * ves;
            const float *s0 = s + r * d->s_stride[1] + h * d->s_stride[2];
            float merged = merge_one(d->num_states, (int)d->head_dim, v0, d->v_dtype, d->v_stride[0], s0,
                                     d->s_stride[0], tmp);
            char *dst = o + (size_t)(r * d->o_stride[0] + h * d->o_stride[1]) * oes;
            for (int64_t e = 0; e < d->head_dim; e++)
                qattn_store_f(dst, d->o_dtype, e, tmp[e]);
            if (lse)
                lse[r * d->heads + h] = merged;
        }
    free(tmp);
    return QATTN_OK;
}
