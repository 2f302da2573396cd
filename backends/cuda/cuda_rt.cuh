/*
 * The CUDA backend's runtime (qa_rt, cuda_internal.h), one source for both
 * builds: on the CUDA runtime with nvcc (cuda_rt.cu defines `qa_rt_cuda`),
 * and with QA_EMULATE on host memory and the CPU emulator of the CUDA
 * execution model (emu/cuda_emu_rt.cpp defines `qa_rt_emulated`). The kernel
 * launches are the same code in both: QA_LAUNCH runs a kernel on the GPU or
 * on the emulator.
 *
 * The emulator's device is an sm_89 GPU with 132 SMs and 227 KiB of shared
 * memory per block unless QATTN_CUDA_EMU_CC / QATTN_CUDA_EMU_SMS say otherwise
 * (src/env.c), so the planners choose as they would on such a GPU. It runs
 * every launch at once on the calling thread, so streams are ignored.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"
#include "cuda_launch.cuh"
#include "cuda_paged_kernels.cuh"
#include "cuda_prune.cuh"

#if defined(QA_EMULATE)
#include <unistd.h>

#include "env.h"
#define QA_RT_INSTANCE qa_rt_emulated
#else
#include <cuda_runtime.h>
#define QA_RT_INSTANCE qa_rt_cuda
#ifndef QA_SM90A_BUILT
#define QA_SM90A_BUILT 0
#endif
#endif

QA_NAMESPACE_BEGIN
namespace rt {

/* --------------------------------------------------- devices and errors */

#if defined(QA_EMULATE)
enum { kEmuInvalidValue = 1, kEmuOutOfMemory = 2 };

static qa_rt_error explain(int code)
{
    qa_rt_error e = {code == kEmuOutOfMemory ? "out of host memory (emulated cudaErrorMemoryAllocation)"
                                             : "invalid argument (emulated cudaErrorInvalidValue)",
                     false, code == kEmuOutOfMemory};
    return e;
}
static int last_error() { return 0; }
static int device_count(int *count) { return *count = 1, 0; }
static int device_props(int device, qa_device_props *p)
{
    if (device != 0)
        return kEmuInvalidValue;
    qattn_env env;
    qattn_env_read(&env, NULL);
    memset(p, 0, sizeof(*p));
    p->cc = env.cuda_emu_cc;
    p->sms = env.cuda_emu_sms;
    snprintf(p->name, sizeof(p->name), "qattn CUDA emulator (sm_%d, %d SMs)", p->cc, p->sms);
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    p->memory_bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    p->smem_per_block_optin = 227 * 1024;
    p->l2_bytes = 50 * 1024 * 1024;
    return 0;
}
static int set_device(int device) { return device == 0 ? 0 : kEmuInvalidValue; }
static int create_context() { return 0; }
static int device_synchronize() { return 0; }
#else
static qa_rt_error explain(int code)
{
    static thread_local char text[256];
    const cudaError_t e = (cudaError_t)code;
    snprintf(text, sizeof(text), "%s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    bool sticky = false;
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorDevicesUnavailable: sticky = true; break;
    default: break;
    }
    qa_rt_error r = {text, sticky, e == cudaErrorMemoryAllocation};
    return r;
}
/* cudaGetLastError: returns the pending error and clears it (sticky ones stay). */
static int last_error() { return (int)cudaGetLastError(); }
static int device_count(int *count) { return (int)cudaGetDeviceCount(count); }
static int device_props(int device, qa_device_props *p)
{
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess)
        return (int)e;
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "%s", prop.name);
    p->cc = prop.major * 10 + prop.minor;
    p->sms = prop.multiProcessorCount;
    p->memory_bytes = (uint64_t)prop.totalGlobalMem;
    p->smem_per_block_optin = prop.sharedMemPerBlockOptin;
    p->l2_bytes = prop.l2CacheSize;
    cudaDriverGetVersion(&p->driver_version);
    cudaRuntimeGetVersion(&p->runtime_version);
    return 0;
}
static int set_device(int device) { return (int)cudaSetDevice(device); }
static int create_context() { return (int)cudaFree(NULL); }
static int device_synchronize() { return (int)cudaDeviceSynchronize(); }
#endif

/* ---------------------------------------------------------------- memory */

#if defined(QA_EMULATE)
static int device_malloc(void **ptr, size_t bytes)
{
    /* 256-byte aligned as cudaMalloc's; a zero-byte request still gets a pointer. */
    const size_t rounded = (bytes + 255) / 256 * 256;
    *ptr = rounded >= bytes ? aligned_alloc(256, rounded ? rounded : 256) : NULL;
    return *ptr ? 0 : kEmuOutOfMemory;
}
static void device_free(void *ptr) { free(ptr); }
/* Host memory is all there is: any pointer counts as memory of device 0. */
static int pointer_device(const void *ptr, int *device) { return *device = ptr ? 0 : -1, 0; }
static int copy_to_device(void *dst, const void *src, size_t bytes) { return memmove(dst, src, bytes), 0; }
static int copy_to_host(void *dst, const void *src, size_t bytes) { return memmove(dst, src, bytes), 0; }
static int memset_device(void *dst, int value, size_t bytes, void *) { return memset(dst, value, bytes), 0; }
static int read_sync(void *dst, const void *src, size_t bytes, void *) { return memcpy(dst, src, bytes), 0; }
static int stream_synchronize(void *) { return 0; }
#else
static int device_malloc(void **ptr, size_t bytes) { return (int)cudaMalloc(ptr, bytes); }
static void device_free(void *ptr) { cudaFree(ptr); }
static int pointer_device(const void *ptr, int *device)
{
    cudaPointerAttributes attr;
    cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
    if (e != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
        (void)cudaGetLastError();
        *device = -1;
        return 0;
    }
    *device = attr.device;
    return 0;
}
static int copy_to_device(void *dst, const void *src, size_t bytes)
{
    return (int)cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
}
static int copy_to_host(void *dst, const void *src, size_t bytes)
{
    return (int)cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
}
static int memset_device(void *dst, int value, size_t bytes, void *stream)
{
    return (int)cudaMemsetAsync(dst, value, bytes, (cudaStream_t)stream);
}
static int read_sync(void *dst, const void *src, size_t bytes, void *stream)
{
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize((cudaStream_t)stream);
    return (int)e;
}
static int stream_synchronize(void *stream) { return (int)cudaStreamSynchronize((cudaStream_t)stream); }
#endif

/* ------------------------------------------------------- dense attention */

static int dense_prepare(const qattn_plan *plan) { return prepare_plan(plan); }

static const char *dense_enqueue(const qattn_plan *plan, const qa_dense_args *a, void *stream)
{
    RunArgs r;
    r.q = (const uint8_t *)a->q;
    r.k = (const uint8_t *)a->k;
    r.v = (const uint8_t *)a->v;
    r.o = (uint8_t *)a->o;
    r.lse = a->lse;
    r.ws = (uint8_t *)a->ws;
    r.stream = stream;
    r.block_indptr = a->block_indptr;
    r.block_indices = a->block_indices;
    r.block_count = a->block_count;
    return run_plan(plan, r);
}

/* ---------------------------------------------------------- paged kernels */

/* The error for a format or head dim that has no kernel. */
static int no_such_kernel()
{
#if defined(QA_EMULATE)
    return kEmuInvalidValue;
#else
    return (int)cudaErrorInvalidDeviceFunction;
#endif
}

/* Runs f.operator()<FMT, D>() for the page format and head dim of a plan; false for others. */
template <typename F> static bool with_format(int format, int head_dim, F &f)
{
    switch (format * 1000 + head_dim) {
#define QA_PAGED_CASE(FMT)                                                                                             \
    case FMT * 1000 + 64: f.template operator()<FMT, 64>(); return true;                                               \
    case FMT * 1000 + 128: f.template operator()<FMT, 128>(); return true;
        QA_PAGED_CASE(QATTN_KV_FMT_F16)
        QA_PAGED_CASE(QATTN_KV_FMT_BF16)
        QA_PAGED_CASE(QATTN_KV_FMT_FP8)
        QA_PAGED_CASE(QATTN_KV_FMT_I8)
        QA_PAGED_CASE(QATTN_KV_FMT_I8_ROW)
#undef QA_PAGED_CASE
    default: return false;
    }
}

struct PreparePaged {
    int smem, *blocks_per_sm, error;
    template <int FMT, int D> void operator()()
    {
#if defined(QA_EMULATE)
        /* An H200's SM: 228 KiB of shared memory, 1 KiB reserved per block, at most 227 KiB to one. */
        const int per_sm = 228 * 1024, reserved = 1024, limit = 227 * 1024;
        *blocks_per_sm = smem > limit ? 0 : per_sm / (smem + reserved);
        *blocks_per_sm = *blocks_per_sm > 16 ? 16 : *blocks_per_sm;
        error = 0;
#else
        const void *fn = (const void *)paged::attention_kernel<FMT, D>;
        cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e == cudaSuccess)
            e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, fn, QA_PAGED_THREADS, (size_t)smem);
        if (e != cudaSuccess)
            (void)cudaGetLastError();
        error = (int)e;
#endif
    }
};

static int paged_prepare(int format, int head_dim, int row_warps, int need_lo, int *smem, int *blocks_per_sm)
{
    *smem = paged::attention_smem(format, head_dim, row_warps, need_lo).total;
    PreparePaged f = {*smem, blocks_per_sm, 0};
    return with_format(format, head_dim, f) ? f.error : no_such_kernel();
}

/* After a launch: the launch's own error (a bad configuration), if any. */
static int launched()
{
#if defined(QA_EMULATE)
    return 0;
#else
    return (int)cudaGetLastError();
#endif
}

struct LaunchAttention {
    long long grid;
    int smem;
    const qa_paged_attn_params *p;
    void *stream;
    template <int FMT, int D> void operator()()
    {
        auto fn = &paged::attention_kernel<FMT, D>;
        QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, smem, stream, *p);
    }
};

static int paged_attention(int format, int head_dim, long long grid, const qa_paged_attn_params *p, void *stream)
{
    if (grid <= 0)
        return 0;
    LaunchAttention f = {grid, paged::attention_smem(format, head_dim, p->row_warps, p->need_lo).total, p, stream};
    return with_format(format, head_dim, f) ? launched() : no_such_kernel();
}

static int paged_check(long long grid, const qa_paged_check_params *p, void *stream)
{
    auto fn = &paged::check_kernel;
    QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, 0, stream, *p);
    return launched();
}

static int merge(long long grid, const qa_merge_params *p, void *stream)
{
    if (grid <= 0)
        return 0;
    auto fn = &paged::merge_kernel;
    QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, 0, stream, *p);
    return launched();
}

static int append_check(long long grid, long long dup_blocks, const qa_append_params *p, void *stream)
{
    auto fn = &paged::append_check_kernel;
    QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, QA_PAGED_THREADS * 8, stream, *p, dup_blocks);
    return launched();
}

static int append_write(long long grid, const qa_append_params *p, void *stream)
{
    if (grid <= 0)
        return 0;
    auto fn = &paged::append_write_kernel;
    QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, 0, stream, *p);
    return launched();
}

/* The append check's status words: static (device) memory, so an append allocates nothing. */
#if defined(QA_EMULATE)
static uint32_t append_status_words[QATTN_STATUS_WORDS];
static uint32_t *append_status() { return append_status_words; }
#else
static __device__ uint32_t append_status_words[QATTN_STATUS_WORDS];
static uint32_t *append_status()
{
    void *p = NULL;
    if (cudaGetSymbolAddress(&p, append_status_words) != cudaSuccess)
        return NULL;
    return (uint32_t *)p;
}
#endif

/* ------------------------------------------------- decode-time pruning */

static int meta_update(long long grid, const qa_meta_params *p, void *stream)
{
    if (grid <= 0)
        return 0;
    auto fn = &prune::meta_kernel;
    QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, 0, stream, *p);
    return launched();
}

struct LaunchScore {
    long long grid;
    const qa_select_params *p;
    void *stream;
    template <int FMT, int D> void operator()()
    {
        auto fn = &prune::score_kernel<FMT, D>;
        QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, p->score_rows * D * 4, stream, *p);
    }
};

static int select_score(long long grid, const qa_select_params *p, void *stream)
{
    if (grid <= 0)
        return 0;
    LaunchScore f = {grid, p, stream};
    return with_format(p->format, p->head_dim, f) ? launched() : no_such_kernel();
}

static int select_topk(long long grid, const qa_select_params *p, void *stream)
{
    if (grid <= 0)
        return 0;
    auto fn = &prune::topk_kernel;
    QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, prune::topk_smem_bytes(p->head_dim), stream, *p);
    return launched();
}

static int page_mass(long long grid, const qa_mass_params *p, void *stream)
{
    if (grid <= 0)
        return 0;
    auto fn = &prune::mass_kernel;
    QA_LAUNCH(fn, (unsigned)grid, QA_PAGED_THREADS, prune::mass_smem_bytes(p->head_dim), stream, *p);
    return launched();
}

} // namespace rt

/* The dense launch sequence's two runtime calls (cuda_launch.cuh). */
bool memset_async(void *dst, int value, size_t bytes, void *stream)
{
    return rt::memset_device(dst, value, bytes, stream) == 0;
}

const char *launch_error()
{
    static thread_local char text[320];
    const int e = rt::launched();
    if (!e)
        return nullptr;
    snprintf(text, sizeof(text), "kernel launch failed: %s", rt::explain(e).text);
    return text;
}

QA_NAMESPACE_END

extern "C" const qa_rt QA_RT_INSTANCE = {
#if defined(QA_EMULATE)
    /* backend_name */ "cuda-emu",
    /* sm90a_kernels */ 0,
#else
    /* backend_name */ "cuda",
    /* sm90a_kernels */ QA_SM90A_BUILT,
#endif
    qa::rt::explain,
    qa::rt::last_error,
    qa::rt::device_count,
    qa::rt::device_props,
    qa::rt::set_device,
    qa::rt::create_context,
    qa::rt::device_synchronize,
    qa::rt::device_malloc,
    qa::rt::device_free,
    qa::rt::pointer_device,
    qa::rt::copy_to_device,
    qa::rt::copy_to_host,
    qa::rt::memset_device,
    qa::rt::read_sync,
    qa::rt::stream_synchronize,
    qa::rt::dense_prepare,
    qa::rt::dense_enqueue,
    qa::rt::paged_prepare,
    qa::rt::paged_attention,
    qa::rt::paged_check,
    qa::rt::merge,
    qa::rt::append_check,
    qa::rt::append_write,
    qa::rt::append_status,
    qa::rt::meta_update,
    qa::rt::select_score,
    qa::rt::select_topk,
    qa::rt::page_mass,
};
