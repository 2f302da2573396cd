/*
 * The OpenCL backend's vtable and what it reports and owns directly: any
 * OpenCL 1.2+ device through the ICD loader (the device list is the
 * runtime's), contexts (one cl_context, one in-order queue and a cache of
 * built programs each) and buffers (cl_mem). Plans compile the kernels they
 * need; runs only enqueue. Dense attention is in opencl_attention.c, the
 * paged KV cache in opencl_paged.c, the shared machinery in opencl_runtime.c.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "opencl_internal.h"

/* ------------------------------------------------------------- devices */

static const ocl_device *device_at(int index)
{
    const ocl_device_list *list = qattn_opencl_devices();
    return index >= 0 && index < list->count ? &list->dev[index] : NULL;
}

static qattn_status ocl_probe(int *device_count, char *reason, size_t reason_len)
{
    const ocl_device_list *list = qattn_opencl_devices();
    *device_count = list->count;
    if (list->count == 0) {
        snprintf(reason, reason_len, "%s", list->reason);
        return QATTN_ERR_UNAVAILABLE;
    }
    return QATTN_OK;
}

/* auto prefers the native CPU backend to an OpenCL CPU device (PoCL). */
static int ocl_auto_score(void)
{
    const ocl_device *d = device_at(0);
    return d && !(d->type & CL_DEVICE_TYPE_CPU) ? 20 : 5;
}

static uint32_t device_precisions(const ocl_device *d)
{
    uint32_t p = (1u << QATTN_PRECISION_AUTO) | (1u << QATTN_PRECISION_EXACT);
    if (d->fp64) /* the reference quantization sums the smooth-K mean in double */
        p |= (1u << QATTN_PRECISION_INT8_FP16) | (1u << QATTN_PRECISION_INT8_FP8) |
             (1u << QATTN_PRECISION_INT8_FP8_F16ACC);
    return p;
}

static qattn_status ocl_device_info(int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    const ocl_device *d = device_at(device);
    if (!d) {
        snprintf(reason, reason_len, "OpenCL device %d does not exist (%d found)", device,
                 qattn_opencl_devices()->count);
        return QATTN_ERR_NOT_FOUND;
    }
    memset(info, 0, sizeof(*info));
    snprintf(info->name, sizeof(info->name), "%s", d->name);
    snprintf(info->vendor, sizeof(info->vendor), "%s", d->vendor);
    snprintf(info->driver, sizeof(info->driver), "%s, driver %s", d->version, d->driver);
    info->compute_units = (int)d->compute_units;
    info->memory_bytes = d->global_mem;
    info->max_buffer_bytes = d->max_alloc;
    info->caps = (d->fp16 ? QATTN_CAP_FP16 : 0u) | (d->int_dot ? QATTN_CAP_INT8_DOT : 0u) |
                 (d->subgroups ? QATTN_CAP_SUBGROUPS : 0u) | (d->unified ? QATTN_CAP_UNIFIED_MEMORY : 0u);
    info->precisions = device_precisions(d);
    snprintf(info->details, sizeof(info->details),
             "platform: %s (%s)\n"
             "device type: %s\n"
             "OpenCL C: %s\n"
             "fp16 (cl_khr_fp16): %s; fp64 (cl_khr_fp64): %s\n"
             "fp32 correctly rounded divide/sqrt: %s (quantization divides in integer arithmetic either way); "
             "fp32 denormals: %s\n"
             "subgroups (cl_khr_subgroups / cl_intel_subgroups): %s\n"
             "integer dot product (cl_khr_integer_dot_product, 4x8 packed): %s\n"
             "local memory: %" PRIu64 " bytes; max work-group size: %zu; max allocation: %" PRIu64 " bytes\n"
             "head dims: multiples of 16 up to 256\n"
             "kernels: 128 work-items, 64 or 32 query rows x 64 keys, fp32 FMA with register blocking%s\n"
             "quantized modes: %s\n"
             "paged KV cache: f16, bf16, fp8e4m3 and int8 pages (NHD/HND, dense/CSR tables, split-KV); fp8/int8 "
             "appends quantize as the reference does\n"
             "decode-time pruning: page metadata, page selection (fixed and adaptive budgets), page mass\n",
             d->platform_name, d->platform_version,
             (d->type & CL_DEVICE_TYPE_GPU) ? "GPU" : (d->type & CL_DEVICE_TYPE_CPU) ? "CPU"
             : (d->type & CL_DEVICE_TYPE_ACCELERATOR) ? "accelerator" : "other",
             d->c_version, d->fp16 ? "yes" : "no (fp16 data through vload_half/vstore_half)",
             d->fp64 ? "yes" : "no",
             d->correct_div ? "yes" : "no",
             d->denorms ? "yes" : "no (flushed to zero: quantized codes of subnormal inputs may differ from the CPU's)",
             d->subgroups ? "yes" : "no", d->int_dot ? "yes" : "no (int8 arithmetic)",
             (uint64_t)d->local_mem, d->max_wg, (uint64_t)d->max_alloc,
             d->int_dot ? "; INT8 Q.K by integer dot product" : "",
             d->fp64 ? "INT8 Q/K, fp16 or FP8-E4M3-emulated P and V, the reference quantization reproduced exactly"
                     : "unsupported (they need cl_khr_fp64 for the reference's double K-mean sum)");
    return QATTN_OK;
}

/* -------------------------------------------------------------- context */

static qattn_status ocl_ctx_init(qattn_ctx *ctx)
{
    const ocl_device *d = device_at(ctx->device);
    if (!d)
        return qattn_set_error(ctx, QATTN_ERR_NOT_FOUND, "opencl: device %d does not exist", ctx->device);
    const qattn_cl_api *cl = qattn_opencl_devices()->cl;
    ocl_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the OpenCL context");
    c->cl = cl;
    c->dev = d;
    cl_int err = CL_SUCCESS;
    cl_context_properties props[] = {CL_CONTEXT_PLATFORM, (cl_context_properties)d->platform, 0};
    c->context = cl->clCreateContext(props, 1, &d->id, NULL, NULL, &err);
    if (!c->context) {
        free(c);
        return cl_error(ctx, err, "clCreateContext", d->name);
    }
    c->queue = cl->clCreateCommandQueue(c->context, d->id, 0, &err);
    if (!c->queue) {
        cl->clReleaseContext(c->context);
        free(c);
        return cl_error(ctx, err, "clCreateCommandQueue", d->name);
    }
    if (pthread_mutex_init(&c->lock, NULL)) {
        cl->clReleaseCommandQueue(c->queue);
        cl->clReleaseContext(c->context);
        free(c);
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "cannot create the OpenCL context's lock");
    }
    ctx->impl = c;
    return QATTN_OK;
}

static void ocl_ctx_release(qattn_ctx *ctx)
{
    ocl_ctx *c = impl_of(ctx);
    if (!c)
        return;
    c->cl->clFinish(c->queue);
    qattn_opencl_release_programs(c);
    if (c->append_status)
        c->cl->clReleaseMemObject(c->append_status);
    c->cl->clReleaseCommandQueue(c->queue);
    c->cl->clReleaseContext(c->context);
    pthread_mutex_destroy(&c->lock);
    free(c);
    ctx->impl = NULL;
}

static qattn_status ocl_synchronize(qattn_ctx *ctx)
{
    ocl_ctx *c = impl_of(ctx);
    cl_int err = c->cl->clFinish(c->queue);
    return err == CL_SUCCESS ? QATTN_OK : cl_error(ctx, err, "clFinish", "synchronize");
}

/* -------------------------------------------------------------- buffers */

static qattn_status ocl_buffer_alloc(qattn_ctx *ctx, qattn_buffer *buf)
{
    ocl_ctx *c = impl_of(ctx);
    cl_int err = CL_SUCCESS;
    cl_mem mem = c->cl->clCreateBuffer(c->context, CL_MEM_READ_WRITE, buf->size, NULL, &err);
    if (!mem) {
        if (err == CL_INVALID_BUFFER_SIZE || err == CL_OUT_OF_RESOURCES)
            err = CL_MEM_OBJECT_ALLOCATION_FAILURE; /* both mean: no room for this size */
        char what[64];
        snprintf(what, sizeof(what), "a %zu-byte buffer", buf->size);
        return cl_error(ctx, err, "clCreateBuffer", what);
    }
    buf->impl = mem;
    buf->host = NULL;
    buf->alias_space = mem;
    buf->alias_base = 0;
    return QATTN_OK;
}

static qattn_status ocl_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native)
{
    ocl_ctx *c = impl_of(ctx);
    cl_mem mem = (cl_mem)native;
    cl_context owner = NULL;
    size_t size = 0;
    cl_int err = c->cl->clGetMemObjectInfo(mem, CL_MEM_CONTEXT, sizeof(owner), &owner, NULL);
    if (err != CL_SUCCESS)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "native is not a valid cl_mem (clGetMemObjectInfo failed with %s)",
                               qattn_cl_error_name(err));
    if (owner != c->context)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the cl_mem belongs to another cl_context than this qattn context's; qattn wraps only "
                               "memory of its own context");
    err = c->cl->clGetMemObjectInfo(mem, CL_MEM_SIZE, sizeof(size), &size, NULL);
    if (err != CL_SUCCESS)
        return cl_error(ctx, err, "clGetMemObjectInfo", "CL_MEM_SIZE of the wrapped buffer");
    if (size < buf->size)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "bytes=%zu exceeds the wrapped cl_mem's %zu bytes",
                               buf->size, size);
    /* The memory it indexes, for the overlap checks: a sub-buffer's root
     * buffer and origin (a sub-buffer is made of a buffer, never of another
     * sub-buffer), else the cl_mem itself. */
    cl_mem parent = NULL;
    size_t origin = 0;
    if ((err = c->cl->clGetMemObjectInfo(mem, CL_MEM_ASSOCIATED_MEMOBJECT, sizeof(parent), &parent, NULL)) ||
        (err = c->cl->clGetMemObjectInfo(mem, CL_MEM_OFFSET, sizeof(origin), &origin, NULL)))
        return cl_error(ctx, err, "clGetMemObjectInfo", "the wrapped buffer's parent and origin");
    if ((err = c->cl->clRetainMemObject(mem)) != CL_SUCCESS)
        return cl_error(ctx, err, "clRetainMemObject", "the wrapped buffer");
    buf->impl = mem;
    buf->host = NULL;
    buf->alias_space = parent ? parent : mem;
    buf->alias_base = parent ? origin : 0;
    return QATTN_OK;
}

static void ocl_buffer_release(qattn_ctx *ctx, qattn_buffer *buf)
{
    if (buf->impl)
        impl_of(ctx)->cl->clReleaseMemObject(mem_of(buf));
}

static qattn_status ocl_buffer_upload(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes)
{
    ocl_ctx *c = impl_of(ctx);
    cl_int err = c->cl->clEnqueueWriteBuffer(c->queue, mem_of(buf), CL_TRUE, offset, bytes, src, 0, NULL, NULL);
    return err == CL_SUCCESS ? QATTN_OK : cl_error(ctx, err, "clEnqueueWriteBuffer", "upload");
}

static qattn_status ocl_buffer_download(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst,
                                        size_t bytes)
{
    ocl_ctx *c = impl_of(ctx);
    cl_int err = c->cl->clEnqueueReadBuffer(c->queue, mem_of(buf), CL_TRUE, offset, bytes, dst, 0, NULL, NULL);
    return err == CL_SUCCESS ? QATTN_OK : cl_error(ctx, err, "clEnqueueReadBuffer", "download");
}

static qattn_status ocl_buffer_fill(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value)
{
    ocl_ctx *c = impl_of(ctx);
    cl_event done = NULL;
    cl_int err = c->cl->clEnqueueFillBuffer(c->queue, mem_of(buf), &value, 1, offset, bytes, 0, NULL, &done);
    if (err != CL_SUCCESS)
        return cl_error(ctx, err, "clEnqueueFillBuffer", "fill");
    err = c->cl->clWaitForEvents(1, &done);
    c->cl->clReleaseEvent(done);
    return err == CL_SUCCESS ? QATTN_OK : cl_error(ctx, err, "clWaitForEvents", "fill");
}

const qattn_backend_iface qattn_backend_opencl = {
    .api_version = QATTN_BACKEND_API_VERSION,
    .name = "opencl",
    .score = 20,
    .auto_score = ocl_auto_score,
    .probe = ocl_probe,
    .device_info = ocl_device_info,
    .ctx_init = ocl_ctx_init,
    .ctx_release = ocl_ctx_release,
    .synchronize = ocl_synchronize,
    .buffer_alloc = ocl_buffer_alloc,
    .buffer_wrap = ocl_buffer_wrap,
    .buffer_release = ocl_buffer_release,
    .buffer_upload = ocl_buffer_upload,
    .buffer_download = ocl_buffer_download,
    .buffer_fill = ocl_buffer_fill,
    .plan_init = qattn_opencl_plan_init,
    .plan_release = qattn_opencl_plan_release,
    .run = qattn_opencl_run,
    .tensor_alignment = 1,
    .sparse = QATTN_SPARSE_CAP_WINDOW | QATTN_SPARSE_CAP_BLOCKS | QATTN_SPARSE_CAP_PV_SKIP | QATTN_SPARSE_CAP_PREDICT,
    .kv_append = qattn_opencl_kv_append,
    .paged_plan_init = qattn_opencl_paged_plan_init,
    .paged_plan_release = qattn_opencl_paged_plan_release,
    .paged_run = qattn_opencl_paged_run,
    .merge_states = qattn_opencl_merge_states,
    .prune = QATTN_PRUNE_CAP_META | QATTN_PRUNE_CAP_SELECT | QATTN_PRUNE_CAP_ADAPTIVE | QATTN_PRUNE_CAP_PAGE_MASS,
    .paged_page_mass = qattn_opencl_paged_page_mass,
};
