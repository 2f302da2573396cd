/*
 * The CUDA backend's vtable and context: devices, the context, buffers. Every
 * CUDA call goes through the context's runtime (qa_rt, cuda_internal.h): the
 * CUDA runtime for `cuda`, the CPU emulator for the test-only `cuda-emu`.
 *
 * Streams: the context's default stream is the legacy NULL stream; a run may
 * name its own (qattn_run_args.stream). With the checks on (the default) a
 * run waits for its stream to read the status words; with
 * QATTN_FLAG_NO_FINITE_CHECK it only enqueues (CUDA-graph capturable).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

qattn_status qa_probe(const qa_rt *rt, int *device_count, char *reason, size_t reason_len)
{
    int n = 0, e = rt->device_count(&n);
    if (e) {
        snprintf(reason, reason_len, "no CUDA driver: cudaGetDeviceCount: %s", rt->explain(e).text);
        (void)rt->last_error();
        return QATTN_ERR_UNAVAILABLE;
    }
    if (n == 0) {
        snprintf(reason, reason_len, "no CUDA device");
        return QATTN_ERR_UNAVAILABLE;
    }
    int usable = 0, best = 0;
    for (int i = 0; i < n; i++) {
        qa_device_props props;
        if (rt->device_props(i, &props))
            continue;
        usable += props.cc >= 80;
        best = props.cc > best ? props.cc : best;
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

qattn_status qa_device_info(const qa_rt *rt, int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    memset(info, 0, sizeof(*info));
    qa_device_props p;
    int e = rt->device_props(device, &p);
    if (e) {
        snprintf(reason, reason_len, "cudaGetDeviceProperties(%d): %s", device, rt->explain(e).text);
        return QATTN_ERR_BACKEND;
    }
    snprintf(info->name, sizeof(info->name), "%s", p.name);
    snprintf(info->vendor, sizeof(info->vendor), "NVIDIA");
    if (p.driver_version)
        snprintf(info->driver, sizeof(info->driver), "CUDA driver %d.%d, runtime %d.%d (static)",
                 p.driver_version / 1000, (p.driver_version % 1000) / 10, p.runtime_version / 1000,
                 (p.runtime_version % 1000) / 10);
    else
        snprintf(info->driver, sizeof(info->driver), "qattn's CPU emulator of the CUDA execution model");
    info->compute_units = p.sms;
    info->memory_bytes = p.memory_bytes;
    info->max_buffer_bytes = 0;
    info->caps = QATTN_CAP_FP16 | QATTN_CAP_BF16 | QATTN_CAP_INT8_DOT | QATTN_CAP_MATRIX_UNITS | QATTN_CAP_SUBGROUPS;
    if (p.cc >= 89)
        info->caps |= QATTN_CAP_FP8;
    for (int pr = 0; pr < QATTN_PRECISION_COUNT; pr++)
        if (qa_supports(p.cc, (qattn_precision)pr))
            info->precisions |= 1u << pr;
    snprintf(info->details, sizeof(info->details),
             "compute capability: %d.%d\n"
             "SMs: %d\n"
             "shared memory per block (opt-in): %zu bytes\n"
             "L2 cache: %d bytes\n"
             "head dims: 64, 128; inputs f16/bf16 (quantized modes also f32)\n"
             "tiles: %d query rows (4 warps x %d) x %d keys, mma.sync tensor cores%s\n",
             p.cc / 10, p.cc % 10, p.sms, p.smem_per_block_optin, p.l2_bytes, QA_BLOCK_M, QA_WARP_M, QA_BLOCK_N,
             p.cc >= 89 ? ", FP8 e4m3 P.V" : "; FP8 modes need sm_89+");
    return QATTN_OK;
}

qattn_status qa_ctx_init(const qa_rt *rt, qattn_ctx *ctx)
{
    qa_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the CUDA context");
    c->rt = rt;
    ctx->impl = c;
    qattn_status s = qa_use_device(ctx);
    qa_device_props props;
    memset(&props, 0, sizeof(props));
    int e = 0;
    if (!s && (e = rt->device_props(ctx->device, &props)))
        s = qa_fail(ctx, e, "cudaGetDeviceProperties");
    if (!s && props.cc < 80)
        s = qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                            "CUDA device %d has compute capability %d.%d; the cuda backend needs 8.0 or newer",
                            ctx->device, props.cc / 10, props.cc % 10);
    /* Create the CUDA context now, so the first run does not pay for it. */
    if (!s && (e = rt->create_context()))
        s = qa_fail(ctx, e, "creating the CUDA context (cudaFree(NULL))");
    if (s) {
        free(c);
        ctx->impl = NULL;
        return s;
    }
    c->cc = props.cc;
    return QATTN_OK;
}

void qa_ctx_release(qattn_ctx *ctx)
{
    free(ctx->impl);
    ctx->impl = NULL;
}

qattn_status qa_synchronize(qattn_ctx *ctx)
{
    qattn_status s = qa_use_device(ctx);
    if (s)
        return s;
    int e = qa_rt_of(ctx)->device_synchronize();
    return e ? qa_fail(ctx, e, "cudaDeviceSynchronize") : QATTN_OK;
}

/* --------------------------------------------------------------- buffers */

qattn_status qa_buffer_alloc(qattn_ctx *ctx, qattn_buffer *buf)
{
    qattn_status s = qa_use_device(ctx);
    if (s)
        return s;
    const qa_rt *rt = qa_rt_of(ctx);
    void *p = NULL;
    int e = rt->malloc(&p, buf->size);
    if (e) {
        (void)rt->last_error(); /* allocation failures are not sticky: clear them */
        return qa_fail(ctx, e, "cudaMalloc");
    }
    buf->impl = p;
    buf->alias_space = QATTN_PROCESS_ADDRESSES; /* unified addressing: device pointers are unique in the process */
    buf->alias_base = (uintptr_t)p;
    buf->host = NULL;
    return QATTN_OK;
}

qattn_status qa_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native)
{
    int device = -1;
    qa_rt_of(ctx)->pointer_device(native, &device);
    if (device < 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "native=%p is not CUDA device memory (the cuda backend wraps device pointers)",
                               native);
    if (device != ctx->device)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "native=%p lives on CUDA device %d, the context uses device %d", native, device,
                               ctx->device);
    buf->impl = native;
    buf->alias_space = QATTN_PROCESS_ADDRESSES;
    buf->alias_base = (uintptr_t)native;
    buf->host = NULL;
    return QATTN_OK;
}

void qa_buffer_release(qattn_ctx *ctx, qattn_buffer *buf)
{
    if (buf->wrapped || !buf->impl)
        return;
    if (qa_use_device(ctx) == QATTN_OK)
        qa_rt_of(ctx)->free(buf->impl);
}

qattn_status qa_buffer_upload(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes)
{
    qattn_status s = qa_use_device(ctx);
    if (s)
        return s;
    int e = qa_rt_of(ctx)->copy_to_device((char *)buf->impl + offset, src, bytes);
    return e ? qa_fail(ctx, e, "cudaMemcpy (upload)") : QATTN_OK;
}

qattn_status qa_buffer_download(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst, size_t bytes)
{
    qattn_status s = qa_use_device(ctx);
    if (s)
        return s;
    int e = qa_rt_of(ctx)->copy_to_host(dst, (const char *)buf->impl + offset, bytes);
    return e ? qa_fail(ctx, e, "cudaMemcpy (download)") : QATTN_OK;
}

qattn_status qa_buffer_fill(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value)
{
    qattn_status s = qa_use_device(ctx);
    if (s)
        return s;
    const qa_rt *rt = qa_rt_of(ctx);
    int e = rt->memset_async((char *)buf->impl + offset, value, bytes, NULL);
    if (!e)
        e = rt->stream_synchronize(NULL);
    return e ? qa_fail(ctx, e, "cudaMemset (fill)") : QATTN_OK;
}

/* ---------------------------------------------------------------- vtable */

#if QATTN_WITH_CUDA
static qattn_status cuda_probe(int *device_count, char *reason, size_t reason_len)
{
    return qa_probe(&qa_rt_cuda, device_count, reason, reason_len);
}

static qattn_status cuda_device_info(int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    return qa_device_info(&qa_rt_cuda, device, info, reason, reason_len);
}

static qattn_status cuda_ctx_init(qattn_ctx *ctx) { return qa_ctx_init(&qa_rt_cuda, ctx); }

const qattn_backend_iface qattn_backend_cuda = {
    .name = "cuda",
    .score = 100, /* above vulkan (50), opencl (20) and cpu (10): auto picks CUDA on NVIDIA */
    .probe = cuda_probe,
    .device_info = cuda_device_info,
    .ctx_init = cuda_ctx_init,
    QA_BACKEND_SHARED_SLOTS,
};
#endif
