/*
 * The checks of a run's indices that every backend shares: page tables and
 * appended slots and scales, on host memory, and the decoder of the device
 * status words (QATTN_STATUS_*) that GPU kernels leave behind. The CPU backend
 * checks its host memory directly; a GPU backend checks on the device, and
 * only when a status word is set does the core download the indices and name
 * the first bad entry, so every backend words an error the same way.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ------------------------------------------------------ split partials */

qattn_status qattn_paged_partials_bytes(qattn_ctx *ctx, const qattn_paged_problem *pp, size_t *bytes)
{
    *bytes = 0;
    if (pp->num_splits <= 1)
        return QATTN_OK;
    /* Each factor is below 2^31; the product of the first two fits 64 bits. */
    const uint64_t per_split = (uint64_t)pp->total_q * (uint64_t)pp->heads_q;
    const uint64_t row_bytes = ((uint64_t)pp->cache.head_dim + 1) * sizeof(float);
    if (per_split > SIZE_MAX / (uint64_t)pp->num_splits / row_bytes)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "the split-KV workspace (%d splits x total_q %lld x heads_q %lld x (D+1) floats) "
                               "overflows size_t; ask for fewer splits",
                               pp->num_splits, (long long)pp->total_q, (long long)pp->heads_q);
    *bytes = (size_t)(per_split * (uint64_t)pp->num_splits * row_bytes);
    return QATTN_OK;
}

/* ----------------------------------------------------------- page tables */

qattn_status qattn_paged_check_tables(qattn_ctx *ctx, const qattn_paged_problem *pp, const qattn_page_tables *t)
{
    const int64_t P = pp->cache.page_size;
    if (t->qo_indptr[0] < 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "qo_indptr[0]=%d is negative", t->qo_indptr[0]);
    for (int64_t b = 0; b < pp->batch; b++) {
        const int64_t q_len = (int64_t)t->qo_indptr[b + 1] - t->qo_indptr[b];
        if (q_len < 0 || q_len > pp->max_q_len || t->qo_indptr[b + 1] > pp->total_q)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "qo_indptr[%lld..%lld] = %d..%d: query counts must be in [0, max_q_len=%lld] "
                                   "and rows below total_q=%lld",
                                   (long long)b, (long long)b + 1, t->qo_indptr[b], t->qo_indptr[b + 1],
                                   (long long)pp->max_q_len, (long long)pp->total_q);
        int64_t pages;
        if (pp->table == QATTN_PAGES_DENSE) {
            if (t->seq_lens[b] < 0 || t->seq_lens[b] > pp->max_pages_per_seq * P)
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "seq_lens[%lld]=%d must be in [0, max_pages_per_seq * page_size = %lld]",
                                       (long long)b, t->seq_lens[b], (long long)(pp->max_pages_per_seq * P));
            pages = qattn_ceil_div(t->seq_lens[b], P);
        } else {
            if (t->indptr[0] < 0 || t->indptr[b + 1] < t->indptr[b] || t->indptr[b + 1] > t->indices_count)
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "indptr[%lld..%lld] = %d..%d must be non-decreasing, from >= 0, and inside "
                                       "the %lld-entry indices buffer",
                                       (long long)b, (long long)b + 1, t->indptr[b], t->indptr[b + 1],
                                       (long long)t->indices_count);
            pages = t->indptr[b + 1] - t->indptr[b];
            if (pages > pp->max_pages_per_seq) /* splits cover max_pages_per_seq pages: more would be dropped */
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "sequence %lld has %lld pages in its CSR table, more than "
                                       "max_pages_per_seq=%lld",
                                       (long long)b, (long long)pages, (long long)pp->max_pages_per_seq);
            if (pages > 0 && (t->last_page_len[b] < 1 || t->last_page_len[b] > P))
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "last_page_len[%lld]=%d must be in [1, page_size=%lld]", (long long)b,
                                       t->last_page_len[b], (long long)P);
        }
        for (int64_t i = 0; i < pages; i++) {
            const int64_t page = qattn_table_page(pp, t, b, i);
            if (page < 0 || page >= pp->cache.num_pages)
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "sequence %lld's page %lld is %lld, outside the cache's %lld pages",
                                       (long long)b, (long long)i, (long long)page, (long long)pp->cache.num_pages);
        }
    }
    return QATTN_OK;
}

/* A host copy of `count` int32 at the start of buf; NULL when it cannot be made. */
static int32_t *download_ints(const qattn_buffer *buf, int64_t count)
{
    int32_t *host = malloc((size_t)(count > 0 ? count : 1) * 4);
    if (host && count > 0 && qattn_buffer_download(buf, 0, host, (size_t)count * 4) != QATTN_OK) {
        free(host);
        return NULL;
    }
    return host;
}

qattn_status qattn_paged_status_error(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a,
                                      const uint32_t words[QATTN_STATUS_WORDS])
{
    const qattn_paged_problem *pp = &plan->pp;
    if (!words[QATTN_STATUS_BOUNDS])
        return words[QATTN_STATUS_NONFINITE] ? qattn_nonfinite_error(ctx, words[QATTN_STATUS_NONFINITE]) : QATTN_OK;
    /* Every table the kernels read, whole: this path runs only for a failed check. */
    const bool dense = pp->table == QATTN_PAGES_DENSE;
    const int64_t B = pp->batch, indices_count = dense ? 0 : (int64_t)(a->indices->size / 4);
    qattn_page_tables t = {.indices_count = indices_count};
    int32_t *copies[4] = {NULL, NULL, NULL, NULL};
    bool ok = (copies[0] = download_ints(a->qo_indptr, B + 1)) != NULL;
    t.qo_indptr = copies[0];
    if (dense) {
        ok = ok && (copies[1] = download_ints(a->seq_lens, B)) && (copies[2] = download_ints(a->block_table, B * pp->max_pages_per_seq));
        t.seq_lens = copies[1];
        t.block_table = copies[2];
    } else {
        ok = ok && (copies[1] = download_ints(a->indptr, B + 1)) && (copies[2] = download_ints(a->last_page_len, B)) &&
             (copies[3] = download_ints(a->indices, indices_count));
        t.indptr = copies[1];
        t.last_page_len = copies[2];
        t.indices = copies[3];
    }
    qattn_status s = ok ? qattn_paged_check_tables(ctx, pp, &t) : QATTN_OK;
    for (int i = 0; i < 4; i++)
        free(copies[i]);
    if (s)
        return s;
    return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                           "the page tables held an entry out of bounds when the run checked them (%s)",
                           ok ? "they have changed since" : "reading them back to name it failed");
}

/* --------------------------------------------------------------- appends */

static int compare_i64(const void *a, const void *b)
{
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static qattn_status check_slots(qattn_ctx *ctx, const qattn_kv_cache_desc *c, int64_t count, const int64_t *slots)
{
    const int64_t capacity = c->num_pages * c->page_size;
    for (int64_t t = 0; t < count; t++)
        if (slots[t] >= capacity)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "slot_mapping[%lld]=%lld is outside the cache's %lld slots", (long long)t,
                                   (long long)slots[t], (long long)capacity);
    int64_t *sorted = malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
    if (!sorted)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory checking the slot mapping");
    int64_t used = 0;
    for (int64_t t = 0; t < count; t++)
        if (slots[t] >= 0) /* negative slots are padding */
            sorted[used++] = slots[t];
    qsort(sorted, (size_t)used, sizeof(int64_t), compare_i64);
    int64_t twice = -1;
    for (int64_t i = 1; i < used && twice < 0; i++)
        if (sorted[i] == sorted[i - 1])
            twice = sorted[i];
    free(sorted);
    if (twice >= 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "slot %lld appears twice in slot_mapping",
                               (long long)twice);
    return QATTN_OK;
}

qattn_status qattn_kv_append_check(qattn_ctx *ctx, const qattn_kv_append_args *a, const int64_t *slots,
                                   uint32_t nonfinite, const float *k_scale, const float *v_scale)
{
    const qattn_kv_cache_desc *c = a->cache;
    qattn_status s;
    if (slots && (s = check_slots(ctx, c, a->num_tokens, slots)))
        return s;
    if (nonfinite)
        return qattn_nonfinite_error(ctx, nonfinite);
    if (c->scales == QATTN_KV_SCALES_PER_HEAD && k_scale && v_scale)
        for (int64_t h = 0; h < c->heads_kv; h++)
            if (!(k_scale[h] >= QATTN_QUANT_MIN_AMAX && isfinite(k_scale[h])) ||
                !(v_scale[h] >= QATTN_QUANT_MIN_AMAX && isfinite(v_scale[h])))
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                       "per-head scale of head %lld must be finite and > 0 (at least 2^-100): k %g, "
                                       "v %g",
                                       (long long)h, (double)k_scale[h], (double)v_scale[h]);
    return QATTN_OK;
}

qattn_status qattn_kv_append_status_error(qattn_ctx *ctx, const qattn_kv_append_args *a,
                                          const uint32_t words[QATTN_STATUS_WORDS])
{
    const uint32_t nonfinite = words[QATTN_STATUS_NONFINITE];
    if (!words[QATTN_STATUS_BOUNDS])
        return nonfinite ? qattn_nonfinite_error(ctx, nonfinite) : QATTN_OK;
    const qattn_kv_cache_desc *c = a->cache;
    const int64_t H = c->heads_kv;
    const bool head_scales = c->scales == QATTN_KV_SCALES_PER_HEAD;
    int64_t *slots = malloc((size_t)a->num_tokens * sizeof(int64_t));
    float *scales = head_scales ? malloc((size_t)H * 2 * sizeof(float)) : NULL;
    bool ok = slots && (!head_scales || scales) &&
              !qattn_buffer_download(a->slot_mapping, a->slot_mapping_offset, slots,
                                     (size_t)a->num_tokens * sizeof(int64_t)) &&
              (!head_scales || (!qattn_buffer_download(a->buffers->k_scale, 0, scales, (size_t)H * sizeof(float)) &&
                                !qattn_buffer_download(a->buffers->v_scale, 0, scales + H, (size_t)H * sizeof(float))));
    qattn_status s = ok ? qattn_kv_append_check(ctx, a, slots, nonfinite, scales, scales ? scales + H : NULL) : QATTN_OK;
    free(slots);
    free(scales);
    if (s)
        return s;
    return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                           "a slot or per-head scale was out of bounds when the append checked it (%s); the cache was "
                           "not written",
                           ok ? "it has changed since" : "reading it back to name it failed");
}
