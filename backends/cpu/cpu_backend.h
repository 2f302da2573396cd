#ifndef QATTN_CPU_BACKEND_H
#define QATTN_CPU_BACKEND_H

#include "internal.h"

#define CPU_QT 256 /* query rows per work item */

/* One attention run on host memory, inputs already checked (and quantized
 * into ws for the quantized modes). */
typedef struct cpu_job {
    const qattn_plan *plan;
    const char *q, *k, *v; /* first elements */
    char *o;
    float *lse;            /* NULL unless requested */
    const uint8_t *ws;     /* quantized workspace (NULL for exact) */
} cpu_job;

qattn_status cpu_attention(const cpu_job *job, int threads);

/* Paged KV cache (cpu_paged.c). */
qattn_status cpu_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status cpu_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status cpu_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status cpu_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

#endif
