/*
 * The C interface between the CUDA backend's host code (cuda_backend.c, C11)
 * and the kernels behind it (cuda_launch.cu and the .cu files it drives, and
 * the paged kernels in paged/).
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

/* 1 when the library carries the sm_90a wgmma kernels (built with nvcc_archs 90a). */
int qa_cuda_sm90a_built(void);

/* Enqueues the plan's kernels (quantization or finite scan, then attention) on
 * stream. Pointers are device addresses of the first elements. Returns NULL on
 * success, else a message describing the failed launch. */
const char *qa_cuda_enqueue(const qattn_plan *plan, const void *q, const void *k, const void *v, void *o,
                            float *lse, void *ws, void *stream);

/* Whether a CUDA runtime error code leaves the CUDA context unusable
 * (illegal address, launch failure, ...): such errors are sticky and map to
 * QATTN_ERR_DEVICE_LOST. Defined in cuda_backend.c. */
bool qa_cuda_error_is_sticky(int code);

#ifdef __cplusplus
}
#endif

#endif
