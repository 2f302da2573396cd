/*
 * The CPU backend's private types and the functions its files share.
 *
 * Files: cpu_backend.c (the vtable, the host device, contexts, host-memory
 * buffers), cpu_attention.c (the flash engine of cpu_flash.h, and dense
 * plans and runs on it), cpu_paged.c (the paged KV cache, on the same
 * engine). Everything runs on the calling thread, with OpenMP inside.
 */
#ifndef QATTN_CPU_INTERNAL_H
#define QATTN_CPU_INTERNAL_H

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
    /* Sparse plans with a layout: a given block CSR (stride 0), or the
     * predicted fixed-stride rows in ws (see qattn_sparse_layout_row). */
    const int32_t *block_indptr, *block_indices;
    int64_t block_count, block_stride;
    int tile_rows;         /* query rows per work item (<= CPU_QT) */
} cpu_job;

/* Dense attention (cpu_attention.c). cpu_attention computes a job with up to
 * `threads` threads; QATTN_ERR_OUT_OF_MEMORY (outputs untouched) when the
 * per-thread tiles cannot be allocated. */
qattn_status cpu_attention(const cpu_job *job, int threads);
qattn_status cpu_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status cpu_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run);

/* Paged KV cache (cpu_paged.c). */
qattn_status cpu_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status cpu_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status cpu_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status cpu_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args,
                                 qattn_buffer *mass, size_t mass_offset);
qattn_status cpu_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

#endif
