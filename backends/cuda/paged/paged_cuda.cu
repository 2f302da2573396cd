/*
 * The CUDA build of the paged KV-cache kernels (paged_kernels.cuh), the
 * runtime calls behind paged_rt.h, and the host code (paged_host.inc) that
 * the backend's vtable reaches through paged_api.h.
 */
#include <stdio.h>

#include <cuda_runtime.h>

#include "../cuda_kernels.h"
#include "paged_kernels.cuh"
#include "paged_rt.h"

template <int FMT, int D>
__global__ void __launch_bounds__(PA_THREADS) pa_attn_kernel(const __grid_constant__ pa_attn_params p)
{
    pa_attn_body<FMT, D>(p);
}

__global__ void __launch_bounds__(PA_THREADS) pa_check_kernel(const __grid_constant__ pa_check_params p)
{
    pa_check_body(p);
}

__global__ void __launch_bounds__(PA_THREADS) pa_merge_kernel(const __grid_constant__ pa_merge_params p)
{
    pa_merge_body(p);
}

__global__ void __launch_bounds__(PA_THREADS)
    pa_append_check_kernel(const __grid_constant__ pa_append_params p, long long dup_blocks)
{
    pa_append_check_body(p, dup_blocks);
}

__global__ void __launch_bounds__(PA_THREADS) pa_append_write_kernel(const __grid_constant__ pa_append_params p)
{
    pa_append_write_body(p);
}

/* The append check's status words: static device memory, so an append allocates nothing. */
static __device__ uint32_t pa_append_status_words[QATTN_STATUS_WORDS];

static const void *pa_attn_fn(int fmt, int d)
{
#define PA_CASE(F)                                                                                                     \
    case F: return d == 64 ? (const void *)pa_attn_kernel<F, 64> : (const void *)pa_attn_kernel<F, 128>;
    switch (fmt) {
        PA_CASE(PA_FMT_F16)
        PA_CASE(PA_FMT_BF16)
        PA_CASE(PA_FMT_FP8)
        PA_CASE(PA_FMT_I8)
        PA_CASE(PA_FMT_I8_ROW)
    default: return NULL;
    }
#undef PA_CASE
}


static const char *pa_rt_error_text(int code, int *lost, int *oom)
{
    static __thread char text[256];
    cudaError_t e = (cudaError_t)code;
    *lost = qa_cuda_error_is_sticky(e);
    *oom = e == cudaErrorMemoryAllocation;
    snprintf(text, sizeof(text), "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    return text;
}

static int pa_rt_set_device(int device) { return (int)cudaSetDevice(device); }

static int pa_rt_pending_error(void)
{
    cudaError_t e = cudaPeekAtLastError();
    if (e != cudaSuccess && !qa_cuda_error_is_sticky(e))
        (void)cudaGetLastError();
    return (int)e;
}

static int pa_rt_memset(void *dst, int value, size_t bytes, pa_stream stream)
{
    return (int)cudaMemsetAsync(dst, value, bytes, (cudaStream_t)stream);
}

static int pa_rt_read(void *dst, const void *src, size_t bytes, pa_stream stream)
{
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize((cudaStream_t)stream);
    return (int)e;
}

static int pa_rt_sm_count(int device, int *sms)
{
    return (int)cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
}

static int pa_rt_attn_prepare(int fmt, int head_dim, int smem, int *blocks_per_sm)
{
    const void *fn = pa_attn_fn(fmt, head_dim);
    if (!fn)
        return (int)cudaErrorInvalidDeviceFunction;
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e == cudaSuccess)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, fn, PA_THREADS, (size_t)smem);
    if (e != cudaSuccess)
        (void)cudaGetLastError();
    return (int)e;
}

static int pa_launched(void)
{
    cudaError_t e = cudaGetLastError();
    return (int)e;
}

static int pa_rt_launch_attn(int fmt, int head_dim, long long grid, int smem, const pa_attn_params *p, pa_stream stream)
{
    if (grid <= 0)
        return 0;
    const void *fn = pa_attn_fn(fmt, head_dim);
    void *args[] = {(void *)p};
    cudaError_t e = cudaLaunchKernel(fn, dim3((unsigned)grid), dim3(PA_THREADS), args, (size_t)smem,
                                     (cudaStream_t)stream);
    return e != cudaSuccess ? (int)e : pa_launched();
}

static int pa_rt_launch_check(long long grid, const pa_check_params *p, pa_stream stream)
{
    pa_check_kernel<<<(unsigned)grid, PA_THREADS, 0, (cudaStream_t)stream>>>(*p);
    return pa_launched();
}

static int pa_rt_launch_merge(long long grid, const pa_merge_params *p, pa_stream stream)
{
    if (grid <= 0)
        return 0;
    pa_merge_kernel<<<(unsigned)grid, PA_THREADS, 0, (cudaStream_t)stream>>>(*p);
    return pa_launched();
}

static int pa_rt_launch_append_check(long long grid, long long dup_blocks, const pa_append_params *p, pa_stream stream)
{
    pa_append_check_kernel<<<(unsigned)grid, PA_THREADS, PA_THREADS * 8, (cudaStream_t)stream>>>(*p, dup_blocks);
    return pa_launched();
}

static int pa_rt_launch_append_write(long long grid, const pa_append_params *p, pa_stream stream)
{
    if (grid <= 0)
        return 0;
    pa_append_write_kernel<<<(unsigned)grid, PA_THREADS, 0, (cudaStream_t)stream>>>(*p);
    return pa_launched();
}

static uint32_t *pa_rt_append_status(void)
{
    void *p = NULL;
    if (cudaGetSymbolAddress(&p, pa_append_status_words) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return (uint32_t *)p;
}

#include "paged_host.inc"
