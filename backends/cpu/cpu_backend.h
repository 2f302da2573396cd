#ifndef QATTN_CPU_BACKEND_H
#define QATTN_CPU_BACKEND_H

#include "internal.h"

#define CPU_QT 128 /* query rows per work item */

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

#endif
