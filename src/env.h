/* Every environment variable qattn reads, parsed in one place (env.c). */
#ifndef QATTN_ENV_H
#define QATTN_ENV_H

#include <stdbool.h>

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qattn_env {
    const char *backend;     /* QATTN_BACKEND: cpu|cuda|vulkan|opencl|auto (NULL: unset) */
    const char *device;      /* QATTN_DEVICE: index or name substring (NULL: unset) */
    qattn_log_level log;     /* QATTN_LOG: error|warn|info|debug (default warn) */
    int num_threads;         /* QATTN_NUM_THREADS: CPU workers (0: unset, -1: invalid) */
    bool vulkan_coopmat;     /* QATTN_VULKAN_COOPMAT=0 turns the cooperative-matrix variant off */
    const char *opencl_cache;/* QATTN_OPENCL_CACHE: program-binary cache folder (NULL: none) */
    int cuda_emu_cc;         /* QATTN_CUDA_EMU_CC: compute capability the test-only cuda-emu backend plays (89) */
    int cuda_emu_sms;        /* QATTN_CUDA_EMU_SMS: its SM count, which the planners size grids by (132) */
    bool vulkan_validation;  /* QATTN_VULKAN_VALIDATION=1: Khronos + synchronization validation; errors fail calls */
    bool cuda_wgmma;         /* QATTN_CUDA_WGMMA=0: the mma.sync kernels on sm_90 too (default 1: the sm_90a kernels) */
    bool cuda_sparse;        /* QATTN_CUDA_SPARSE=1: sparse attention on CUDA (default 0: QATTN_ERR_UNSUPPORTED) */
    bool cuda_prune;         /* QATTN_CUDA_PRUNE=1: decode-time pruning on CUDA (default 0: QATTN_ERR_UNSUPPORTED) */
} qattn_env;

/* Reads the environment now (it may change between calls). Invalid values are
 * reported through *bad (the variable's name) and left at their default. */
void qattn_env_read(qattn_env *env, const char **bad);

#ifdef __cplusplus
}
#endif

#endif
