/*
 * Reference quantization, on host memory. The CPU backend runs exactly this;
 * GPU backends must reproduce it (tests compare their workspaces and outputs
 * with it). Definitions, per (batch, head):
 *
 *   smooth K   mean[d] = (sum_t k[t][d]) / Nk  (accumulated in double);
 *              K is quantized as k[t][d] - mean[d]. Exact under softmax; the
 *              LSE gets q_kmean[i] = sm_scale * dot(q[i], mean) added back.
 *   INT8       per scale group (qattn_quant_group_of): amax = max |x|;
 *              scale = amax / 127; x8 = rne(x * (127 / amax)); a group with
 *              amax < 2^-100 (QATTN_QUANT_MIN_AMAX) has scale 0 and codes 0.
 *   V, FP8     per channel d: amax = max_t |v[t][d]|; scale = amax / v_fp8_max;
 *              v8 = e4m3_rne_satfinite(v * (v_fp8_max / amax)), stored [d][t]
 *              with keys padded to v_key_pad (padding is zero).
 *   V, FP16    INT8_FP16 keeps V as fp16 (rne), [t][d].
 */
#ifndef QATTN_QUANT_H
#define QATTN_QUANT_H

#include <stdint.h>

#include "internal.h"

/* Lays out plan->ws for the plan's precision (the core calls this). */
qattn_status qattn_workspace_layout_init(qattn_plan *plan, bool status_word);

/* Fills the quantized-workspace regions from host inputs (base pointers of
 * the first elements). threads: worker threads to use (OpenMP when built with it). */
void qattn_quantize_host(const qattn_plan *plan, const void *q, const void *k, const void *v, uint8_t *ws,
                         int threads);

#endif
