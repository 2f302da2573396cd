/*
 * The CUDA backend: device memory through the CUDA runtime (linked
 * statically, so the library loads where no driver is installed; probe then
 * says why the backend is unusable), planning in cuda_plan.c, kernels in the
 * .cu files behind cuda_kernels.h.
 *
 * Streams: the context's default stream is the legacy NULL stream; a run may
 * name its own (qattn_run_args.stream). With the finite check on (the
 * default), qattn_run waits for the stream to read the check's flag; with
 * QATTN_FLAG_NO_FINITE_CHECK it only enqueues (CUDA-graph capturable).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "cuda_kernels.h"
#include "cuda_plan.h"
#include "internal.h"
#include "paged/paged_api.h"

typedef struct cuda_ctx {
    int cc; /* compute capability, major * 10 + minor */
} cuda_ctx;

bool qa_cuda_error_is_sticky(int code)
{
    switch ((cudaError_t)code) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorDevicesUnavailable:
        return true;
    default:
        return false;
    }
}

/* Maps a CUDA error to a status and records the message. */
static qattn_status cuda_fail(qattn_ctx *ctx, cudaError_t e, const char *what)
{
    qattn_status s = e == cudaErrorMemoryAllocation ? QATTN_ERR_OUT_OF_MEMORY
                     : qa_cuda_error_is_sticky(e)   ? QATTN_ERR_DEVICE_LOST
                                                    : QATTN_ERR_BACKEND;
    return qattn_set_error(ctx, s, "%s: %s (%s)%s", what, cudaGetErrorString(e), cudaGetErrorName(e),
                           s == QATTN_ERR_DEVICE_LOST ? "; the CUDA context is unusable" : "");
}

static qattn_status use_device(qattn_ctx *ctx)
{
    cudaError_t e = cudaSetDevice(ctx->device);
    return e == cudaSuccess ? QATTN_OK : cuda_fail(ctx, e, "cudaSetDevice");
}

static int device_cc(int device)
{
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
        return 0;
    return major * 10 + minor;
}

static qattn_status cuda_probe(int *device_count, char *reason, size_t reason_len)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        snprintf(reason, reason_len, "no CUDA driver: cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e),
                 cudaGetErrorName(e));
        (void)cudaGetLastError();
        return QATTN_ERR_UNAVAILABLE;
    }
    if (n == 0) {
        snprintf(reason, reason_len, "no CUDA device");
        return QATTN_ERR_UNAVAILABLE;
    }
    int usable = 0, best = 0;
    for (int i = 0; i < n; i++) {
        int cc = device_cc(i);
        usable += cc >= 80;
        best = cc > best ? cc : best;
    }
    if (!usable) {
        snprintf(reason, reason_len,
                 "no CUDA device of compute capability 8.0 or newer (%d device(s), the newest is %d.%d)", n, best / 10,
                 best % 10);
        return QATTN_ERR_UNAVAILABLE;
    }
    *device_count = n;
    return QATTN_OK;
}

static qattn_status cuda_device_info(int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    memset(info, 0, sizeof(*info));
    struct cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, device);
    if (e != cudaSuccess) {
        snprintf(reason, reason_len, "cudaGetDeviceProperties(%d): %s", device, cudaGetErrorString(e));
        return QATTN_ERR_BACKEND;
    }
    int cc = prop.major * 10 + prop.minor;
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    snprintf(info->name, sizeof(info->name), "%s", prop.name);
    snprintf(info->vendor, sizeof(info->vendor), "NVIDIA");
    snprintf(info->driver, sizeof(info->driver), "CUDA driver %d.%d, runtime %d.%d (static)", driver / 1000,
             (driver % 1000) / 10, runtime / 1000, (runtime % 1000) / 10);
    info->compute_units = prop.multiProcessorCount;
    info->memory_bytes = (uint64_t)prop.totalGlobalMem;
    info->max_buffer_bytes = 0;
    info->caps = QATTN_CAP_FP16 | QATTN_CAP_BF16 | QATTN_CAP_INT8_DOT | QATTN_CAP_MATRIX_UNITS | QATTN_CAP_SUBGROUPS;
    if (cc >= 89)
        info->caps |= QATTN_CAP_FP8;
    for (int pr = 0; pr < QATTN_PRECISION_COUNT; pr++)
        if (qa_cuda_supports(cc, (qattn_precision)pr))
            info->precisions |= 1u << pr;
    snprintf(info->details, sizeof(info->details),
             "compute capability: %d.%d\n"
             "SMs: %d\n"
             "shared memory per block (opt-in): %zu bytes\n"
             "L2 cache: %d bytes\n"
             "head dims: 64, 128; inputs f16/bf16 (quantized modes also f32)\n"
             "tiles: %d query rows (4 warps x %d) x %d keys, mma.sync tensor cores%s\n",
             prop.major, prop.minor, prop.multiProcessorCount, (size_t)prop.sharedMemPerBlockOptin,
             prop.l2CacheSize, QA_CUDA_BLOCK_M, QA_CUDA_WARP_M, QA_CUDA_BLOCK_N,
             cc >= 89 ? ", FP8 e4m3 P.V" : "; FP8 modes need sm_89+");
    return QATTN_OK;
}

static qattn_status cuda_ctx_init(qattn_ctx *ctx)
{
    cuda_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the CUDA context");
    qattn_status s = use_device(ctx);
    if (s) {
        free(c);
        return s;
    }
    c->cc = device_cc(ctx->device);
    if (c->cc < 80) {
        int cc = c->cc;
        free(c);
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "CUDA device %d has compute capability %d.%d; the cuda backend needs 8.0 or newer",
                               ctx->device, cc / 10, cc % 10);
    }
    /* Create the CUDA context now, so the first run does not pay for it. */
    cudaError_t e = cudaFree(NULL);
    if (e != cudaSuccess) {
        free(c);
        return cuda_fail(ctx, e, "creating the CUDA context (cudaFree(NULL))");
    }
    ctx->impl = c;
    return QATTN_OK;
}

static void cuda_ctx_release(qattn_ctx *ctx)
{
    free(ctx->impl);
    ctx->impl = NULL;
}

static qattn_status cuda_synchronize(qattn_ctx *ctx)
{
    qattn_status s = use_device(ctx);
    if (s)
        return s;
    cudaError_t e = cudaDeviceSynchronize();
    return e == cudaSuccess ? QATTN_OK : cuda_fail(ctx, e, "cudaDeviceSynchronize");
}

static qattn_status cuda_buffer_alloc(qattn_ctx *ctx, qattn_buffer *buf)
{
    qattn_status s = use_device(ctx);
    if (s)
        return s;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, buf->size);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* allocation failures are not sticky: clear them */
        return cuda_fail(ctx, e, "cudaMalloc");
    }
    buf->impl = p;
    buf->host = NULL;
    return QATTN_OK;
}

static qattn_status cuda_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native)
{
    struct cudaPointerAttributes attr;
    cudaError_t e = cudaPointerGetAttributes(&attr, native);
    if (e != cudaSuccess || (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
        (void)cudaGetLastError();
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "native=%p is not CUDA device memory (the cuda backend wraps device pointers)",
                               native);
    }
    if (attr.device != ctx->device)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "native=%p lives on CUDA device %d, the context uses device %d", native, attr.device,
                               ctx->device);
    buf->impl = native;
    buf->host = NULL;
    return QATTN_OK;
}

static void cuda_buffer_release(qattn_ctx *ctx, qattn_buffer *buf)
{
    if (buf->wrapped || !buf->impl)
        return;
    if (use_device(ctx) == QATTN_OK)
        cudaFree(buf->impl);
}

static qattn_status cuda_buffer_upload(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes)
{
    qattn_status s = use_device(ctx);
    if (s)
        return s;
    cudaError_t e = cudaMemcpy((char *)buf->impl + offset, src, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? QATTN_OK : cuda_fail(ctx, e, "cudaMemcpy (upload)");
}

static qattn_status cuda_buffer_download(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst,
                                         size_t bytes)
{
    qattn_status s = use_device(ctx);
    if (s)
        return s;
    cudaError_t e = cudaMemcpy(dst, (const char *)buf->impl + offset, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? QATTN_OK : cuda_fail(ctx, e, "cudaMemcpy (download)");
}

static qattn_status cuda_buffer_fill(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value)
{
    qattn_status s = use_device(ctx);
    if (s)
        return s;
    cudaError_t e = cudaMemsetAsync((char *)buf->impl + offset, value, bytes, 0);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(0);
    return e == cudaSuccess ? QATTN_OK : cuda_fail(ctx, e, "cudaMemset (fill)");
}

static qattn_status cuda_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    cuda_ctx *c = ctx->impl;
    qattn_status s = qa_cuda_plan(ctx, plan, c->cc, qa_cuda_sm90a_built());
    if (s)
        return s;
    if ((s = use_device(ctx)))
        return s;
    if (qa_cuda_prepare(plan)) {
        cudaError_t e = cudaGetLastError();
        return cuda_fail(ctx, e == cudaSuccess ? cudaErrorInvalidValue : e,
                         "setting the attention kernel's shared-memory limit (cudaFuncSetAttribute)");
    }
    return QATTN_OK;
}

static qattn_status cuda_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
{
    const qattn_problem *p = &plan->problem;
    qattn_status s = use_device(ctx);
    if (s)
        return s;
    cudaError_t pending = cudaGetLastError();
    if (pending != cudaSuccess)
        return cuda_fail(ctx, pending, "an earlier CUDA error was pending before qattn_run");

    const char *q = (const char *)run->q->impl + run->q_offset;
    const char *k = (const char *)run->k->impl + run->k_offset;
    const char *v = (const char *)run->v->impl + run->v_offset;
    char *o = (char *)run->o->impl + run->o_offset;
    float *lse = run->lse ? (float *)((char *)run->lse->impl + run->lse_offset) : NULL;
    char *ws = run->workspace ? (char *)run->workspace->impl + run->workspace_offset : NULL;
    const struct {
        const char *name;
        const void *ptr;
        size_t align;
    } ptrs[] = {{"q", q, QA_CUDA_ALIGN}, {"k", k, QA_CUDA_ALIGN}, {"v", v, QA_CUDA_ALIGN},
                {"o", o, QA_CUDA_ALIGN}, {"lse", lse, 4},            {"workspace", ws, QATTN_WS_ALIGN}};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++)
        if (ptrs[i].ptr && (uintptr_t)ptrs[i].ptr % ptrs[i].align)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "args.%s starts at device address %p, which is not %zu-byte aligned (the cuda "
                                   "backend copies rows 16 bytes at a time; check wrapped pointers)",
                                   ptrs[i].name, ptrs[i].ptr, ptrs[i].align);

    void *stream = run->stream;
    const char *err = qa_cuda_enqueue(plan, q, k, v, o, lse, ws, stream);
    if (err) {
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess && qa_cuda_error_is_sticky(e))
            return cuda_fail(ctx, e, err);
        return qattn_set_error(ctx, QATTN_ERR_BACKEND, "%s", err);
    }
    if (p->check_finite) {
        /* The kernels skipped writing the outputs if a word is set. */
        uint32_t words[QATTN_STATUS_WORDS];
        cudaError_t e = cudaMemcpyAsync(words, ws + plan->ws.status, QATTN_STATUS_BYTES, cudaMemcpyDeviceToHost,
                                        (cudaStream_t)stream);
        if (e == cudaSuccess)
            e = cudaStreamSynchronize((cudaStream_t)stream);
        if (e != cudaSuccess)
            return cuda_fail(ctx, e, "reading the finite check's status words");
        if (words[QATTN_STATUS_NONFINITE])
            return qattn_nonfinite_error(ctx, words[QATTN_STATUS_NONFINITE]);
    }
    return QATTN_OK;
}

const qattn_backend_iface qattn_backend_cuda = {
    .api_version = QATTN_BACKEND_API_VERSION,
    .name = "cuda",
    .score = 100, /* above vulkan (50), opencl (20) and cpu (10): auto picks CUDA on NVIDIA */
    .probe = cuda_probe,
    .device_info = cuda_device_info,
    .ctx_init = cuda_ctx_init,
    .ctx_release = cuda_ctx_release,
    .synchronize = cuda_synchronize,
    .buffer_alloc = cuda_buffer_alloc,
    .buffer_wrap = cuda_buffer_wrap,
    .buffer_release = cuda_buffer_release,
    .buffer_upload = cuda_buffer_upload,
    .buffer_download = cuda_buffer_download,
    .buffer_fill = cuda_buffer_fill,
    .plan_init = cuda_plan_init,
    .plan_release = NULL,
    .run = cuda_run,
    .tensor_alignment = QA_CUDA_ALIGN,
    .kv_append = qa_paged_kv_append,
    .paged_plan_init = qa_paged_plan_init,
    .paged_run = qa_paged_run,
    .merge_states = qa_paged_merge_states,
};
