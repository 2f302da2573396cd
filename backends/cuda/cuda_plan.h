/*
 * Planning for the CUDA backend, free of CUDA calls so the emulator tests
 * share it: which modes and head dims run on which compute capability, the
 * quantization geometry, and the backend's scratch inside the workspace.
 */
#ifndef QATTN_CUDA_PLAN_H
#define QATTN_CUDA_PLAN_H

#include <stddef.h>

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

#define QA_CUDA_BLOCK_M 128  /* query rows per CTA (4 warps x 32) */
#define QA_CUDA_WARP_M 32    /* query rows per warp */
#define QA_CUDA_BLOCK_N 64   /* keys per tile and per K quantization block */
#define QA_CUDA_STATS_TOKENS 256 /* keys per CTA of the K-mean / V-max pass */
#define QA_CUDA_ALIGN 16     /* bytes: rows are copied 16 bytes at a time */

/* Scratch the quantization passes need beyond the core's regions
 * (plan->ws.backend): per-chunk partial K sums and V maxima, V's inverse scales. */
typedef struct qa_cuda_scratch {
    size_t part_sum, part_amax, v_inv, total; /* byte offsets inside the backend region */
    int chunks, chunk_tokens;
} qa_cuda_scratch;

qa_cuda_scratch qa_cuda_scratch_layout(const qattn_problem *p);

/* What plan->impl points to (static storage: nothing to release). */
typedef struct qa_cuda_plan_info {
    /* FP8 P.V on the fp16 tensor path (sm_90: the e4m3 mma.sync is not native
     * there and ptxas expands it into unpacks plus two fp16 mmas). */
    int fp8_on_f16_mma;
    /* FP8 modes on the sm_90a wgmma kernel (backends/cuda/hopper). */
    int wgmma;
    /* FP8 modes: the warp-specialized wgmma kernel fed by TMA
     * (hopper/sm90_attn_ws.cuh; needs seq_k % 16 == 0). */
    int tma;
} qa_cuda_plan_info;

/* Whether FP8 P.V runs on the fp16 mma for compute capability cc. */
int qa_cuda_fp8_on_f16_mma(int cc);

/* Whether the device (compute capability major*10+minor) runs the precision. */
int qa_cuda_supports(int cc, qattn_precision precision);

/* The plan_init logic for a device of compute capability cc (no CUDA calls);
 * sm90a_kernels: the library carries the sm_90a wgmma kernels. */
qattn_status qa_cuda_plan(qattn_ctx *ctx, qattn_plan *plan, int cc, int sm90a_kernels);

#ifdef __cplusplus
}
#endif

#endif
