/*
 * The CUDA backend's paged KV-cache entry points (the optional slots of
 * qattn_backend_iface): reshape_and_cache, paged attention (decode, chunked
 * prefill, split-KV) and merge_states. Implemented in paged_cuda.cu; the same
 * host code drives the kernels under the CPU emulator in paged_emu_rt.cpp.
 */
#ifndef QATTN_PAGED_API_H
#define QATTN_PAGED_API_H

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

qattn_status qa_paged_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status qa_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status qa_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status qa_paged_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

#ifdef __cplusplus
}
#endif

#endif
