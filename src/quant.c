#include "quant.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "numeric.h"

static bool add_region(size_t *cursor, size_t *offset, size_t bytes)
{
    size_t at = (*cursor + QATTN_WS_ALIGN - 1) / QATTN_WS_ALIGN * QATTN_WS_ALIGN;
    if (at < *cursor || bytes > SIZE_MAX - at)
        return false;
    *offset = at;
    *cursor = at + bytes;
    return true;
}

/* a * b * c * d with overflow detection (all non-negative). */
static bool mul_size(size_t *out, int64_t a, int64_t b, int64_t c, int64_t d)
{
    int64_t f[4] = {a, b, c, d};
    size_t r = 1;
    for (int i = 0; i < 4; i++) {
        if (f[i] < 0 || (f[i] && r > SIZE_MAX / (size_t)f[i]))
            return false;
        r *= (size_t)f[i];
    }
    *out = r;
    return true;
}

qattn_status qattn_workspace_layout_init(qattn_plan *plan, bool status_word)
{
    const qattn_problem *p = &plan->problem;
    qattn_workspace_layout *ws = &plan->ws;
    size_t *regions[] = {&ws->q_i8, &ws->k_i8, &ws->v_q, &ws->q_scale, &ws->k_scale,
                         &ws->v_scale, &ws->k_mean, &ws->q_kmean, &ws->status, &ws->backend,
                         &ws->sparse_counts, &ws->sparse_indices, &ws->sparse_density, &ws->sparse_q_pool,
                         &ws->sparse_k_pool, &ws->sparse_q_sim, &ws->sparse_k_sim, &ws->select_counts,
                         &ws->select_pages};
    for (size_t i = 0; i < sizeof(regions) / sizeof(regions[0]); i++)
        *regions[i] = QATTN_WS_ABSENT;
    ws->total = 0;
    ws->q_groups = ws->k_groups = 0;
    ws->v_key_pad = 128;
    ws->v_keys_padded = (p->seq_k + ws->v_key_pad - 1) / ws->v_key_pad * ws->v_key_pad;

    size_t cursor = 0, bytes;
    bool ok = true;
    bool quantized = plan->precision != QATTN_PRECISION_EXACT;
    if (quantized) {
        const qattn_quant_params *qp = &plan->quant;
        ws->q_groups = qattn_quant_groups(p->seq_q, qp->q_block, qp->q_interleave);
        ws->k_groups = qattn_quant_groups(p->seq_k, qp->k_block, qp->k_interleave);
        bool fp8 = plan->precision != QATTN_PRECISION_INT8_FP16;
        ok = ok && mul_size(&bytes, p->batch, p->heads_q, p->seq_q, p->head_dim) && add_region(&cursor, &ws->q_i8, bytes);
        ok = ok && mul_size(&bytes, p->batch, p->heads_kv, p->seq_k, p->head_dim) && add_region(&cursor, &ws->k_i8, bytes);
        if (fp8)
            ok = ok && mul_size(&bytes, p->batch, p->heads_kv, p->head_dim, ws->v_keys_padded);
        else
            ok = ok && mul_size(&bytes, p->batch, p->heads_kv, p->seq_k, p->head_dim * 2);
        ok = ok && add_region(&cursor, &ws->v_q, bytes);
        ok = ok && mul_size(&bytes, p->batch, p->heads_q, ws->q_groups, 4) && add_region(&cursor, &ws->q_scale, bytes);
        ok = ok && mul_size(&bytes, p->batch, p->heads_kv, ws->k_groups, 4) && add_region(&cursor, &ws->k_scale, bytes);
        if (fp8)
            ok = ok && mul_size(&bytes, p->batch, p->heads_kv, p->head_dim, 4) && add_region(&cursor, &ws->v_scale, bytes);
        if (qp->smooth_k) {
            ok = ok && mul_size(&bytes, p->batch, p->heads_kv, p->head_dim, 4) && add_region(&cursor, &ws->k_mean, bytes);
            ok = ok && mul_size(&bytes, p->batch, p->heads_q, p->seq_q, 4) && add_region(&cursor, &ws->q_kmean, bytes);
        }
    }
    if (status_word)
        ok = ok && add_region(&cursor, &ws->status, 16);
    if (plan->backend_workspace)
        ok = ok && add_region(&cursor, &ws->backend, plan->backend_workspace);
    const qattn_sparse_problem *sp = &plan->sparse;
    if (sp->layout == QATTN_SPARSE_PREDICT) {
        ok = ok && mul_size(&bytes, sp->rows + 1, 4, 1, 1) && add_region(&cursor, &ws->sparse_counts, bytes);
        ok = ok && mul_size(&bytes, sp->rows, sp->k_blocks, 4, 1) && add_region(&cursor, &ws->sparse_indices, bytes);
        ok = ok && mul_size(&bytes, p->batch, p->heads_kv, 4, 1) && add_region(&cursor, &ws->sparse_density, bytes);
        ok = ok && mul_size(&bytes, p->batch * p->heads_q, sp->q_blocks, p->head_dim, 4) &&
             add_region(&cursor, &ws->sparse_q_pool, bytes);
        ok = ok && mul_size(&bytes, p->batch * p->heads_kv, sp->k_blocks, p->head_dim, 4) &&
             add_region(&cursor, &ws->sparse_k_pool, bytes);
        ok = ok && mul_size(&bytes, p->batch * p->heads_q, sp->q_blocks, 4, 1) &&
             add_region(&cursor, &ws->sparse_q_sim, bytes);
        ok = ok && mul_size(&bytes, p->batch * p->heads_kv, sp->k_blocks, 4, 1) &&
             add_region(&cursor, &ws->sparse_k_sim, bytes);
    }
    if (plan->paged && plan->select.enabled) {
        const qattn_paged_problem *pp = &plan->pp;
        ok = ok && mul_size(&bytes, pp->batch, pp->cache.heads_kv, 4, 1) && add_region(&cursor, &ws->select_counts, bytes);
        ok = ok && mul_size(&bytes, pp->batch, pp->cache.heads_kv, pp->max_pages_per_seq, 4) &&
             add_region(&cursor, &ws->select_pages, bytes);
    }
    if (!ok)
        return qattn_set_error(plan->ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "the workspace for this problem overflows size_t (B=%lld Hq=%lld Nq=%lld Nk=%lld D=%lld)",
                               (long long)p->batch, (long long)p->heads_q, (long long)p->seq_q,
                               (long long)p->seq_k, (long long)p->head_dim);
    ws->total = cursor;
    return QATTN_OK;
}

static inline int8_t quant_i8(float x, float inv)
{
    /* fminf/fmaxf take the number over NaN: an unchecked NaN becomes -127,
     * never a NaN converted to an integer (undefined behaviour). */
    return (int8_t)fminf(fmaxf(nearbyintf(x * inv), -127.f), 127.f);
}

/* Quantizes one head's [n, d] rows (src row stride rs) into dst [n][d] int8
 * with scales[groups]; `sub` (may be NULL) is subtracted per channel. */
static void quantize_rows_i8(const void *src, qattn_dtype dt, int64_t rs, int64_t n, int64_t d, const float *sub,
                             int block, int interleave, int8_t *dst, float *scales)
{
    int64_t groups = qattn_quant_groups(n, block, interleave);
    for (int64_t g = 0; g < groups; g++) {
        int64_t blk = g / interleave, lane = g % interleave;
        int64_t t0 = blk * block + lane, t1 = (blk + 1) * block < n ? (blk + 1) * block : n;
        float amax = 0.f;
        for (int64_t t = t0; t < t1; t += interleave)
            for (int64_t c = 0; c < d; c++) {
                float x = qattn_load_f(src, dt, t * rs + c) - (sub ? sub[c] : 0.f);
                amax = fmaxf(amax, fabsf(x));
            }
        if (amax < QATTN_QUANT_MIN_AMAX) /* all tiny or zero: codes and scale 0 */
            amax = 0.f;
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        scales[g] = amax / 127.f;
        for (int64_t t = t0; t < t1; t += interleave)
            for (int64_t c = 0; c < d; c++) {
                float x = qattn_load_f(src, dt, t * rs + c) - (sub ? sub[c] : 0.f);
                dst[t * d + c] = quant_i8(x, inv);
            }
    }
}

void qattn_quantize_host(const qattn_plan *plan, const void *q, const void *k, const void *v, uint8_t *ws,
                         int threads)
{
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    const qattn_quant_params *qp = &plan->quant;
    const int64_t D = p->head_dim, Nq = p->seq_q, Nk = p->seq_k;
    const size_t es = qattn_dtype_size(p->in_dtype);
    const bool fp8 = plan->precision != QATTN_PRECISION_INT8_FP16;
    (void)threads;

    /* K and V first: Q's LSE correction needs the K mean. */
#if defined(_OPENMP)
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads)
#endif
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t h = 0; h < p->heads_kv; h++) {
            const int64_t bh = b * p->heads_kv + h;
            const char *kh = (const char *)k + (size_t)(b * p->k_stride[0] + h * p->k_stride[1]) * es;
            const char *vh = (const char *)v + (size_t)(b * p->v_stride[0] + h * p->v_stride[1]) * es;
            float *mean = NULL;
            if (qp->smooth_k) {
                mean = (float *)(ws + L->k_mean) + bh * D;
                for (int64_t c = 0; c < D; c++) {
                    double s = 0.0;
                    for (int64_t t = 0; t < Nk; t++)
                        s += qattn_load_f(kh, p->in_dtype, t * p->k_stride[2] + c);
                    mean[c] = (float)(s / (double)Nk);
                }
            }
            quantize_rows_i8(kh, p->in_dtype, p->k_stride[2], Nk, D, mean, qp->k_block, qp->k_interleave,
                             (int8_t *)(ws + L->k_i8) + bh * Nk * D, (float *)(ws + L->k_scale) + bh * L->k_groups);
            if (fp8) {
                uint8_t *vq = ws + L->v_q + (size_t)(bh * D * L->v_keys_padded);
                float *vs = (float *)(ws + L->v_scale) + bh * D;
                for (int64_t c = 0; c < D; c++) {
                    float amax = 0.f;
                    for (int64_t t = 0; t < Nk; t++)
                        amax = fmaxf(amax, fabsf(qattn_load_f(vh, p->in_dtype, t * p->v_stride[2] + c)));
                    if (amax < QATTN_QUANT_MIN_AMAX)
                        amax = 0.f;
                    float inv = amax > 0.f ? qp->v_fp8_max / amax : 0.f;
                    vs[c] = amax / qp->v_fp8_max;
                    uint8_t *row = vq + c * L->v_keys_padded;
                    for (int64_t t = 0; t < Nk; t++)
                        row[t] = qattn_f32_to_e4m3(qattn_load_f(vh, p->in_dtype, t * p->v_stride[2] + c) * inv);
                    memset(row + Nk, 0, (size_t)(L->v_keys_padded - Nk));
                }
            } else {
                uint16_t *vq = (uint16_t *)(ws + L->v_q) + bh * Nk * D;
                for (int64_t t = 0; t < Nk; t++)
                    for (int64_t c = 0; c < D; c++)
                        vq[t * D + c] = qattn_f32_to_f16(qattn_load_f(vh, p->in_dtype, t * p->v_stride[2] + c));
            }
        }

#if defined(_OPENMP)
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads)
#endif
    for (int64_t b = 0; b < p->batch; b++)
        for (int64_t h = 0; h < p->heads_q; h++) {
            const int64_t bh = b * p->heads_q + h;
            const int64_t bhkv = b * p->heads_kv + h / p->group;
            const char *qh = (const char *)q + (size_t)(b * p->q_stride[0] + h * p->q_stride[1]) * es;
            quantize_rows_i8(qh, p->in_dtype, p->q_stride[2], Nq, D, NULL, qp->q_block, qp->q_interleave,
                             (int8_t *)(ws + L->q_i8) + bh * Nq * D, (float *)(ws + L->q_scale) + bh * L->q_groups);
            if (qp->smooth_k) {
                const float *mean = (const float *)(ws + L->k_mean) + bhkv * D;
                float *corr = (float *)(ws + L->q_kmean) + bh * Nq;
                for (int64_t t = 0; t < Nq; t++) {
                    float s = 0.f;
                    for (int64_t c = 0; c < D; c++)
                        s += qattn_load_f(qh, p->in_dtype, t * p->q_stride[2] + c) * mean[c];
                    corr[t] = p->sm_scale * s;
                }
            }
        }
}
