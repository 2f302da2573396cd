/*
 * The OpenCL backend: any OpenCL 1.2+ device through the ICD loader.
 *
 * Devices of every platform are listed once per process in a stable order
 * (GPUs, then accelerators, then other kinds, then CPUs; platforms by name).
 * A context owns one cl_context, one in-order queue and a cache of built
 * programs keyed by build options (and, with $QATTN_OPENCL_CACHE, program
 * binaries on disk keyed by device, driver, options and source). Plans
 * compile the kernels they need; runs only enqueue.
 *
 * A run is: [finite scan] -> [quantization passes] -> flash kernel. With the
 * finite check on, the scan flags the workspace status word, every later
 * kernel returns at once when it is set, and the run reads the word back.
 * The paged KV cache (appends, paged attention, merge) is in opencl_paged.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cl_loader.h"
#include "env.h"
#include "internal.h"
#include "opencl_internal.h"
#include "opencl_kernels.h"

#define OCL_MAX_DEVICES 64
#define OCL_WG 128          /* work-items of a flash work-group (flash.cl: WG) */
#define OCL_BK 64           /* keys per tile (flash.cl: BK) */
#define OCL_QUANT_WG 128    /* prep.cl: QUANT_WG */
#define OCL_VFP8_WG 256     /* prep.cl: quant_v_fp8 */
#define OCL_SCAN_WG 64

/* ------------------------------------------------------------- devices */

static struct {
    const qattn_cl_api *cl;
    int count;
    ocl_device dev[OCL_MAX_DEVICES];
    char reason[QATTN_NAME_MAX];
} devices;
static pthread_once_t devices_once = PTHREAD_ONCE_INIT;

static bool has_extension(const char *list, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)) != NULL; p += n)
        if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0'))
            return true;
    return false;
}

static void info_string(const qattn_cl_api *cl, cl_device_id d, cl_device_info what, char *out, size_t len)
{
    out[0] = '\0';
    if (cl->clGetDeviceInfo(d, what, len, out, NULL) != CL_SUCCESS)
        out[0] = '\0';
    out[len - 1] = '\0';
}

static int type_rank(cl_device_type t)
{
    if (t & CL_DEVICE_TYPE_GPU)
        return 0;
    if (t & CL_DEVICE_TYPE_ACCELERATOR)
        return 1;
    if (t & CL_DEVICE_TYPE_CPU)
        return 3;
    return 2;
}

typedef struct ranked {
    ocl_device dev;
    int platform_index, device_index;
} ranked;

static int compare_ranked(const void *pa, const void *pb)
{
    const ranked *a = pa, *b = pb;
    int ra = type_rank(a->dev.type), rb = type_rank(b->dev.type);
    if (ra != rb)
        return ra - rb;
    int byname = strcmp(a->dev.platform_name, b->dev.platform_name);
    if (byname)
        return byname;
    if (a->platform_index != b->platform_index)
        return a->platform_index - b->platform_index;
    return a->device_index - b->device_index;
}

static void enumerate_devices(void)
{
    const char *why = NULL;
    const qattn_cl_api *cl = qattn_cl_load(&why);
    if (!cl) {
        snprintf(devices.reason, sizeof(devices.reason), "%s", why);
        return;
    }
    devices.cl = cl;
    cl_uint nplat = 0;
    cl_int err = cl->clGetPlatformIDs(0, NULL, &nplat);
    if (err != CL_SUCCESS || nplat == 0) {
        snprintf(devices.reason, sizeof(devices.reason), "no OpenCL platform (clGetPlatformIDs: %s)",
                 err == CL_SUCCESS ? "0 platforms" : qattn_cl_error_name(err));
        return;
    }
    cl_platform_id plats[16];
    if (nplat > 16)
        nplat = 16;
    if ((err = cl->clGetPlatformIDs(nplat, plats, NULL)) != CL_SUCCESS) {
        snprintf(devices.reason, sizeof(devices.reason), "clGetPlatformIDs failed with %s", qattn_cl_error_name(err));
        return;
    }
    ranked *found = calloc(OCL_MAX_DEVICES, sizeof(*found));
    if (!found) {
        snprintf(devices.reason, sizeof(devices.reason), "out of host memory listing OpenCL devices");
        return;
    }
    int count = 0;
    for (cl_uint p = 0; p < nplat; p++) {
        char pname[128] = "", pversion[128] = "";
        cl->clGetPlatformInfo(plats[p], CL_PLATFORM_NAME, sizeof(pname), pname, NULL);
        cl->clGetPlatformInfo(plats[p], CL_PLATFORM_VERSION, sizeof(pversion), pversion, NULL);
        pname[sizeof(pname) - 1] = pversion[sizeof(pversion) - 1] = '\0';
        cl_uint ndev = 0;
        if (cl->clGetDeviceIDs(plats[p], CL_DEVICE_TYPE_ALL, 0, NULL, &ndev) != CL_SUCCESS || ndev == 0)
            continue;
        cl_device_id ids[OCL_MAX_DEVICES];
        if (ndev > OCL_MAX_DEVICES)
            ndev = OCL_MAX_DEVICES;
        if (cl->clGetDeviceIDs(plats[p], CL_DEVICE_TYPE_ALL, ndev, ids, NULL) != CL_SUCCESS)
            continue;
        for (cl_uint i = 0; i < ndev && count < OCL_MAX_DEVICES; i++) {
            ranked *r = &found[count];
            ocl_device *d = &r->dev;
            d->platform = plats[p];
            d->id = ids[i];
            snprintf(d->platform_name, sizeof(d->platform_name), "%s", pname);
            snprintf(d->platform_version, sizeof(d->platform_version), "%s", pversion);
            info_string(cl, ids[i], CL_DEVICE_NAME, d->name, sizeof(d->name));
            info_string(cl, ids[i], CL_DEVICE_VENDOR, d->vendor, sizeof(d->vendor));
            info_string(cl, ids[i], CL_DRIVER_VERSION, d->driver, sizeof(d->driver));
            info_string(cl, ids[i], CL_DEVICE_VERSION, d->version, sizeof(d->version));
            info_string(cl, ids[i], CL_DEVICE_OPENCL_C_VERSION, d->c_version, sizeof(d->c_version));
            cl_bool unified = CL_FALSE, available = CL_FALSE, compiler = CL_FALSE;
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_TYPE, sizeof(d->type), &d->type, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_MAX_COMPUTE_UNITS, sizeof(d->compute_units), &d->compute_units, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_GLOBAL_MEM_SIZE, sizeof(d->global_mem), &d->global_mem, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof(d->max_alloc), &d->max_alloc, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_LOCAL_MEM_SIZE, sizeof(d->local_mem), &d->local_mem, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof(d->max_wg), &d->max_wg, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_HOST_UNIFIED_MEMORY, sizeof(unified), &unified, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_AVAILABLE, sizeof(available), &available, NULL);
            cl->clGetDeviceInfo(ids[i], CL_DEVICE_COMPILER_AVAILABLE, sizeof(compiler), &compiler, NULL);
            if (!available || !compiler)
                continue; /* cannot run our kernels: compiled from source at run time */
            d->unified = unified == CL_TRUE;
            cl_device_fp_config single = 0;
            if (cl->clGetDeviceInfo(ids[i], CL_DEVICE_SINGLE_FP_CONFIG, sizeof(single), &single, NULL) == CL_SUCCESS) {
                d->correct_div = (single & CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT) != 0;
                d->denorms = (single & CL_FP_DENORM) != 0;
            }
            size_t ext_len = 0;
            char *ext = NULL;
            if (cl->clGetDeviceInfo(ids[i], CL_DEVICE_EXTENSIONS, 0, NULL, &ext_len) == CL_SUCCESS &&
                (ext = calloc(ext_len + 1, 1)) != NULL &&
                cl->clGetDeviceInfo(ids[i], CL_DEVICE_EXTENSIONS, ext_len, ext, NULL) == CL_SUCCESS) {
                d->fp16 = has_extension(ext, "cl_khr_fp16");
                d->fp64 = has_extension(ext, "cl_khr_fp64");
                d->subgroups = has_extension(ext, "cl_khr_subgroups") || has_extension(ext, "cl_intel_subgroups");
                d->int_dot = has_extension(ext, "cl_khr_integer_dot_product");
            }
            free(ext);
#ifdef CL_DEVICE_INTEGER_DOT_PRODUCT_CAPABILITIES_KHR
            if (d->int_dot) { /* the packed signed form is the one the kernels call */
                cl_bitfield caps = 0;
                if (cl->clGetDeviceInfo(ids[i], CL_DEVICE_INTEGER_DOT_PRODUCT_CAPABILITIES_KHR, sizeof(caps), &caps,
                                        NULL) != CL_SUCCESS ||
                    !(caps & CL_DEVICE_INTEGER_DOT_PRODUCT_INPUT_4x8BIT_PACKED_KHR))
                    d->int_dot = false;
            }
#endif
            r->platform_index = (int)p;
            r->device_index = (int)i;
            count++;
        }
    }
    qsort(found, (size_t)count, sizeof(*found), compare_ranked);
    for (int i = 0; i < count; i++)
        devices.dev[i] = found[i].dev;
    devices.count = count;
    free(found);
    if (count == 0)
        snprintf(devices.reason, sizeof(devices.reason),
                 "%u OpenCL platform(s) but no available device with a compiler", (unsigned)nplat);
}

static const ocl_device *device_at(int index)
{
    pthread_once(&devices_once, enumerate_devices);
    return index >= 0 && index < devices.count ? &devices.dev[index] : NULL;
}

static qattn_status ocl_probe(int *device_count, char *reason, size_t reason_len)
{
    pthread_once(&devices_once, enumerate_devices);
    *device_count = devices.count;
    if (devices.count == 0) {
        snprintf(reason, reason_len, "%s", devices.reason);
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
        snprintf(reason, reason_len, "OpenCL device %d does not exist (%d found)", device, devices.count);
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
             "appends quantize as the reference does\n",
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
    const qattn_cl_api *cl = devices.cl;
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
    for (ocl_program *p = c->programs, *next; p; p = next) {
        next = p->next;
        c->cl->clReleaseProgram(p->program);
        free(p->key);
        free(p);
    }
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
    if ((err = c->cl->clRetainMemObject(mem)) != CL_SUCCESS)
        return cl_error(ctx, err, "clRetainMemObject", "the wrapped buffer");
    buf->impl = mem;
    buf->host = NULL;
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

/* ------------------------------------------------------------ programs */

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t fnv1a_str(uint64_t h, const char *s) { return fnv1a(h, s, strlen(s) + 1); }

/* The on-disk cache file of a program, or false when the cache is off. */
static bool cache_path(const ocl_ctx *c, const char *const *parts, size_t nparts, const char *options, char *out,
                       size_t len)
{
    qattn_env env;
    qattn_env_read(&env, NULL);
    if (!env.opencl_cache)
        return false;
    uint64_t h = 0xcbf29ce484222325ull;
    h = fnv1a_str(h, qattn_version());
    h = fnv1a_str(h, c->dev->platform_name);
    h = fnv1a_str(h, c->dev->platform_version);
    h = fnv1a_str(h, c->dev->name);
    h = fnv1a_str(h, c->dev->version);
    h = fnv1a_str(h, c->dev->driver);
    h = fnv1a_str(h, options);
    for (size_t i = 0; i < nparts; i++)
        h = fnv1a_str(h, parts[i]);
    int n = snprintf(out, len, "%s/qattn-%016" PRIx64 ".clbin", env.opencl_cache, h);
    return n > 0 && (size_t)n < len;
}

/* Loads a cached binary and builds it; NULL (quietly) on any failure. */
static cl_program load_cached(ocl_ctx *c, const char *path, const char *options)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    unsigned char *bin = NULL;
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (bin = malloc((size_t)size)) != NULL && fread(bin, 1, (size_t)size, f) != (size_t)size) {
        free(bin);
        bin = NULL;
    }
    fclose(f);
    if (!bin)
        return NULL;
    size_t len = (size_t)size;
    const unsigned char *bins[1] = {bin};
    cl_int status = CL_SUCCESS, err = CL_SUCCESS;
    cl_program prog = c->cl->clCreateProgramWithBinary(c->context, 1, &c->dev->id, &len, bins, &status, &err);
    free(bin);
    if (!prog) {
        qattn_log(QATTN_LOG_INFO, "opencl: ignoring the unreadable cached binary %s (%s)", path, qattn_cl_error_name(err));
        return NULL;
    }
    if (status != CL_SUCCESS || c->cl->clBuildProgram(prog, 1, &c->dev->id, options, NULL, NULL) != CL_SUCCESS) {
        c->cl->clReleaseProgram(prog);
        qattn_log(QATTN_LOG_INFO, "opencl: ignoring the unusable cached binary %s", path);
        return NULL;
    }
    return prog;
}

/* Best effort: a failure to write the cache only costs a rebuild next time. */
static void save_cached(ocl_ctx *c, cl_program prog, const char *path)
{
    size_t size = 0;
    if (c->cl->clGetProgramInfo(prog, CL_PROGRAM_BINARY_SIZES, sizeof(size), &size, NULL) != CL_SUCCESS || !size)
        return;
    unsigned char *bin = malloc(size);
    if (!bin)
        return;
    unsigned char *bins[1] = {bin};
    char tmp[4200];
    if (c->cl->clGetProgramInfo(prog, CL_PROGRAM_BINARIES, sizeof(bins), bins, NULL) == CL_SUCCESS &&
        snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long)getpid()) < (int)sizeof(tmp)) {
        FILE *f = fopen(tmp, "wb");
        bool ok = f && fwrite(bin, 1, size, f) == size;
        if (f && fclose(f) != 0)
            ok = false;
        if (ok && rename(tmp, path) == 0)
            qattn_log(QATTN_LOG_DEBUG, "opencl: cached program binary %s", path);
        else {
            qattn_log(QATTN_LOG_WARN, "opencl: cannot write the program cache file %s: %s", path, strerror(errno));
            remove(tmp);
        }
    }
    free(bin);
}

/*
 * The program built from `parts` with `options` on the context's device:
 * from the context's cache, the disk cache, or the compiler. A compiler
 * failure carries its build log into the error message.
 */
qattn_status qattn_opencl_get_program(qattn_ctx *ctx, const char *what, const char *const *parts, size_t nparts,
                                      const char *options, cl_program *out)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_cl_api *cl = c->cl;
    char key[1024];
    snprintf(key, sizeof(key), "%s|%s", what, options);
    pthread_mutex_lock(&c->lock);
    for (ocl_program *p = c->programs; p; p = p->next)
        if (strcmp(p->key, key) == 0) {
            *out = p->program;
            pthread_mutex_unlock(&c->lock);
            return QATTN_OK;
        }

    qattn_status s = QATTN_OK;
    char path[4096];
    bool cached = cache_path(c, parts, nparts, options, path, sizeof(path));
    cl_program prog = cached ? load_cached(c, path, options) : NULL;
    if (!prog) {
        cl_int err = CL_SUCCESS;
        prog = cl->clCreateProgramWithSource(c->context, (cl_uint)nparts, (const char **)parts, NULL, &err);
        if (!prog) {
            s = cl_error(ctx, err, "clCreateProgramWithSource", what);
            goto done;
        }
        err = cl->clBuildProgram(prog, 1, &c->dev->id, options, NULL, NULL);
        if (err != CL_SUCCESS) {
            size_t log_len = 0;
            char *log = NULL;
            if (cl->clGetProgramBuildInfo(prog, c->dev->id, CL_PROGRAM_BUILD_LOG, 0, NULL, &log_len) == CL_SUCCESS &&
                (log = calloc(log_len + 1, 1)) != NULL)
                cl->clGetProgramBuildInfo(prog, c->dev->id, CL_PROGRAM_BUILD_LOG, log_len, log, NULL);
            qattn_log(QATTN_LOG_DEBUG, "opencl: build log of the %s kernels (%s):\n%s", what, options,
                      log ? log : "(none)");
            /* The message holds as much of the log as fits (QATTN_ERROR_MAX). */
            s = qattn_set_error(ctx, QATTN_ERR_BACKEND,
                                "opencl: clBuildProgram failed with %s for the %s kernels on %s (options: %s); "
                                "build log: %s",
                                qattn_cl_error_name(err), what, c->dev->name, options,
                                log && log[0] ? log : "(empty)");
            free(log);
            cl->clReleaseProgram(prog);
            goto done;
        }
        if (cached)
            save_cached(c, prog, path);
    }
    ocl_program *entry = calloc(1, sizeof(*entry));
    if (!entry || !(entry->key = strdup(key))) {
        free(entry);
        cl->clReleaseProgram(prog);
        s = qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the OpenCL program cache");
        goto done;
    }
    entry->program = prog;
    entry->next = c->programs;
    c->programs = entry;
    *out = prog;
done:
    pthread_mutex_unlock(&c->lock);
    return s;
}

/* ---------------------------------------------------------------- plans */

typedef struct ocl_plan {
    cl_kernel scan, k_mean, quant_rows, q_kmean, quant_v, flash;
    int tm;  /* query rows per work-item */
    int nqb; /* query blocks of 8*tm rows */
} ocl_plan;

static void ocl_plan_release(qattn_ctx *ctx, qattn_plan *plan)
{
    ocl_plan *op = plan->impl;
    if (!op)
        return;
    const qattn_cl_api *cl = impl_of(ctx)->cl;
    cl_kernel all[] = {op->scan, op->k_mean, op->quant_rows, op->q_kmean, op->quant_v, op->flash};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (all[i])
            cl->clReleaseKernel(all[i]);
    free(op);
    plan->impl = NULL;
}

static int mode_code(qattn_precision p)
{
    switch (p) {
    case QATTN_PRECISION_INT8_FP16: return 1;
    case QATTN_PRECISION_INT8_FP8: return 2;
    case QATTN_PRECISION_INT8_FP8_F16ACC: return 3;
    default: return 0;
    }
}

/* Local memory of flash.cl for (D, TM, mode), in bytes: mirrors its macros. */
static size_t flash_local_bytes(int64_t D, int tm, bool quant)
{
    int64_t bq = 8 * tm, dc;
    if (quant) {
        int64_t words = D / 4;
        dc = words % 16 == 0 ? 16 : words % 8 == 0 ? 8 : 4;
    } else {
        dc = D % 32 == 0 ? 32 : 16;
    }
    int64_t kc = D > 128 ? 16 : 32;
    int64_t stage_qk = dc * ((bq + 4) + (OCL_BK + 4)), stage_v = kc * (D + 4);
    int64_t stage = stage_qk > stage_v ? stage_qk : stage_v;
    int64_t work = stage + OCL_BK * (bq + 4) + 16 * (bq + 4), out_block = bq * D + bq;
    return (size_t)(work > out_block ? work : out_block) * 4;
}

static qattn_status ocl_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    ocl_ctx *c = impl_of(ctx);
    const ocl_device *d = c->dev;
    const qattn_problem *p = &plan->problem;
    const int64_t D = p->head_dim;
    if (D % 16 != 0 || D > 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the opencl backend (multiples of 16 up to 256)",
                               (long long)D);
    if (p->in_dtype == QATTN_DTYPE_I8 || p->in_dtype == QATTN_DTYPE_FP8_E4M3 || p->out_dtype == QATTN_DTYPE_I8 ||
        p->out_dtype == QATTN_DTYPE_FP8_E4M3)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl backend takes f32/f16/bf16 inputs and outputs, not %s in / %s out",
                               qattn_dtype_name(p->in_dtype), qattn_dtype_name(p->out_dtype));
    if (p->seq_q > INT32_MAX || p->seq_k > INT32_MAX - OCL_BK || p->batch * p->heads_q > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "sequence lengths and batch*heads above 2^31-1 are not supported by the opencl backend");
    if (d->max_wg < OCL_QUANT_WG * 2)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl kernels need work-groups of 256 work-items; %s allows %zu", d->name,
                               d->max_wg);

    bool int8_fast = d->int_dot && d->fp64;
    if (plan->precision == QATTN_PRECISION_AUTO) {
        if (int8_fast) {
            plan->precision = QATTN_PRECISION_INT8_FP16;
            snprintf(plan->why, sizeof(plan->why),
                     "auto chose int8_fp16: the device has integer dot products, so INT8 Q.K runs at 4 MACs per "
                     "instruction; the FP8 modes are emulated here (more work per P) and never faster.");
        } else {
            plan->precision = QATTN_PRECISION_EXACT;
            snprintf(plan->why, sizeof(plan->why), "%s",
                     d->fp64 ? "auto chose exact: the device has no integer dot product (cl_khr_integer_dot_product), "
                               "so the quantized modes do the same fp32 work plus a quantization pass."
                             : "auto chose exact: the quantized modes need cl_khr_fp64, which this device lacks.");
        }
    } else {
        snprintf(plan->why, sizeof(plan->why), "%s as requested.", qattn_precision_name(plan->precision));
    }
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;
    if (quant && !d->fp64)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "%s on opencl needs cl_khr_fp64, which %s lacks: the reference quantization sums the "
                               "smooth-K mean in double",
                               qattn_precision_name(plan->precision), d->name);
    if (quant) {
        if (plan->granularity == QATTN_GRANULARITY_DEFAULT)
            plan->granularity = QATTN_GRANULARITY_PER_WARP; /* SageAttention2's default */
        /* The CUDA geometry, so the CPU reference and CUDA results compare directly. */
        qattn_quant_defaults(&plan->quant, plan->precision, plan->granularity, 128, 32, 64, plan->quant.smooth_k);
    }

    /* F16ACC rounds after every pv_f16_chunk keys: whole V stages (KC keys) inside a 64-key tile. */
    const int kc = D > 128 ? 16 : 32;
    if (plan->precision == QATTN_PRECISION_INT8_FP8_F16ACC &&
        (plan->quant.pv_f16_chunk <= 0 || plan->quant.pv_f16_chunk % kc || OCL_BK % plan->quant.pv_f16_chunk))
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl F16ACC kernel sums whole %d-key stages inside 64-key blocks; a %d-key "
                               "fp16 accumulation chunk does not fit that",
                               kc, plan->quant.pv_f16_chunk);

    /* 8 rows per work-item where registers allow; F16ACC and D > 128 carry more accumulators. */
    int tm = (D <= 128 && plan->precision != QATTN_PRECISION_INT8_FP8_F16ACC) ? 8 : 4;
    if (flash_local_bytes(D, tm, quant) > d->local_mem)
        tm = 4;
    if (flash_local_bytes(D, tm, quant) > d->local_mem)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl flash kernel needs %zu bytes of local memory at D=%lld; %s has %" PRIu64,
                               flash_local_bytes(D, tm, quant), (long long)D, d->name, (uint64_t)d->local_mem);

    ocl_plan *op = calloc(1, sizeof(*op));
    if (!op)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the plan");
    plan->impl = op; /* from here on a failure leaves it to the core, which calls the release slot */
    qattn_status s = QATTN_OK;
    const char *flash_parts[2] = {qattn_opencl_src_common, qattn_opencl_src_flash};
    const char *prep_parts[2] = {qattn_opencl_src_common, qattn_opencl_src_prep};
    char options[512];
    bool use_dot = quant && d->int_dot;
    for (;;) {
        snprintf(options, sizeof(options),
                 "-cl-std=CL1.2 -DHEAD_DIM=%lld -DTM=%d -DMODE=%d -DIN_DTYPE=%d -DOUT_DTYPE=%d -DHAS_FP16=%d "
                 "-DHAS_FP64=%d -DHAS_INT_DOT=%d -DF16ACC_CHUNK=%d",
                 (long long)D, tm, mode_code(plan->precision), dtype_code(p->in_dtype), dtype_code(p->out_dtype),
                 d->fp16, d->fp64, use_dot, quant && plan->quant.pv_f16_chunk > 0 ? plan->quant.pv_f16_chunk : 32);
        cl_program prog = NULL;
        s = qattn_opencl_get_program(ctx, "flash", flash_parts, 2, options, &prog);
        if (s && use_dot) {
            /* Same results without the extension's builtins (exact int8 products either way);
             * the kernel name and the plan's account say which ran. */
            qattn_log(QATTN_LOG_WARN, "opencl: the integer dot product kernel failed to build on %s (%s); using "
                      "int8 multiply-adds", d->name, qattn_last_error(ctx));
            size_t used = strlen(plan->why);
            snprintf(plan->why + used, sizeof(plan->why) - used,
                     " The cl_khr_integer_dot_product builtins did not build here; INT8 Q.K uses int multiply-adds.");
            use_dot = false;
            continue;
        }
        if (s || (s = make_kernel(ctx, prog, "flash_attention", &op->flash)))
            return s;
        /* Registers may cap the work-group below 128: retry with 4 rows per work-item. */
        size_t wg = 0;
        cl_int err = c->cl->clGetKernelWorkGroupInfo(op->flash, d->id, CL_KERNEL_WORK_GROUP_SIZE, sizeof(wg), &wg,
                                                     NULL);
        if (err != CL_SUCCESS) {
            s = cl_error(ctx, err, "clGetKernelWorkGroupInfo", "flash_attention");
            return s;
        }
        if (wg >= OCL_WG) {
            /* Private memory per work-item beyond registers means spills: worth knowing when tuning. */
            cl_ulong private_bytes = 0, local_bytes = 0;
            c->cl->clGetKernelWorkGroupInfo(op->flash, d->id, CL_KERNEL_PRIVATE_MEM_SIZE, sizeof(private_bytes),
                                            &private_bytes, NULL);
            c->cl->clGetKernelWorkGroupInfo(op->flash, d->id, CL_KERNEL_LOCAL_MEM_SIZE, sizeof(local_bytes),
                                            &local_bytes, NULL);
            size_t used = strlen(plan->why);
            snprintf(plan->why + used, sizeof(plan->why) - used,
                     " Flash kernel: %d query rows x 64 keys per 128 work-items, %" PRIu64
                     " bytes of local memory, %" PRIu64 " bytes of private memory per work-item.",
                     8 * tm, (uint64_t)local_bytes, (uint64_t)private_bytes);
            qattn_log(QATTN_LOG_INFO, "opencl: %s", plan->why);
            break;
        }
        c->cl->clReleaseKernel(op->flash);
        op->flash = NULL;
        if (tm == 4) {
            s = qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                "the opencl flash kernel at D=%lld runs at most %zu work-items per group on %s; it "
                                "needs %d",
                                (long long)D, wg, d->name, OCL_WG);
            return s;
        }
        tm = 4;
    }

    if (p->check_finite || quant) {
        snprintf(options, sizeof(options), "-cl-std=CL1.2 -DHEAD_DIM=%lld -DIN_DTYPE=%d -DOUT_DTYPE=0 -DHAS_FP16=%d "
                 "-DHAS_FP64=%d",
                 (long long)D, dtype_code(p->in_dtype), d->fp16, d->fp64);
        cl_program prog = NULL;
        if ((s = qattn_opencl_get_program(ctx, "prep", prep_parts, 2, options, &prog)))
            return s;
        if (p->check_finite && (s = make_kernel(ctx, prog, "finite_scan", &op->scan)))
            return s;
        if (quant) {
            const char *vname = plan->precision == QATTN_PRECISION_INT8_FP16 ? "quant_v_f16" : "quant_v_fp8";
            if ((s = make_kernel(ctx, prog, "quant_rows", &op->quant_rows)) ||
                (s = make_kernel(ctx, prog, vname, &op->quant_v)))
                return s;
            if (plan->quant.smooth_k && ((s = make_kernel(ctx, prog, "k_mean", &op->k_mean)) ||
                                         (s = make_kernel(ctx, prog, "q_kmean", &op->q_kmean))))
                return s;
        }
    }

    op->tm = tm;
    op->nqb = (int)((p->seq_q + 8 * tm - 1) / (8 * tm));
    if ((uint64_t)op->nqb * (uint64_t)(p->batch * p->heads_q) > INT32_MAX) {
        s = qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                            "B*Hq*ceil(Nq/%d) work-groups exceed 2^31-1, the opencl backend's launch limit", 8 * tm);
        return s;
    }
    plan->q_tile = 8 * tm;
    plan->kv_tile = OCL_BK;
    plan->status_word = p->check_finite;
    plan->backend_workspace = 0;
    snprintf(plan->kernel, sizeof(plan->kernel), "opencl_flash_%s_d%lld_r%d%s", qattn_precision_name(plan->precision),
             (long long)D, 8 * tm, use_dot ? "_dot4" : "");
    return QATTN_OK;
}

/* ------------------------------------------------------------------ run */

/* A tensor: base element offset and the b, h, n strides. */
static void arg_tensor(arg_list *a, size_t byte_offset, size_t elem, const int64_t stride[4])
{
    arg_long(a, (int64_t)(byte_offset / elem));
    arg_long(a, stride[0]);
    arg_long(a, stride[1]);
    arg_long(a, stride[2]);
}

typedef struct run_state {
    const qattn_plan *plan;
    const qattn_run_bound *run;
    cl_mem ws;         /* the workspace buffer (NULL when the plan needs none) */
    int64_t ws_base;   /* byte offset of the workspace inside it */
    int64_t status_at; /* byte offset of the status word, -1 without the finite check */
} run_state;

/* Byte offset of a workspace region inside the workspace buffer, -1 when absent. */
static int64_t region(const run_state *rs, size_t offset)
{
    return offset == QATTN_WS_ABSENT ? -1 : rs->ws_base + (int64_t)offset;
}

/* Enqueues the finite scan of the three inputs (flags 1, 2, 4 for q, k, v). */
static qattn_status enqueue_scan(qattn_ctx *ctx, const run_state *rs)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_problem *p = &rs->plan->problem;
    const ocl_plan *op = rs->plan->impl;
    size_t es = qattn_dtype_size(p->in_dtype);
    cl_uint zero = 0;
    cl_int err = c->cl->clEnqueueFillBuffer(c->queue, rs->ws, &zero, sizeof(zero), (size_t)rs->status_at,
                                            QATTN_STATUS_BYTES, 0, NULL, NULL);
    if (err != CL_SUCCESS)
        return cl_error(ctx, err, "clEnqueueFillBuffer", "the status word");
    const struct {
        qattn_buffer *buf;
        size_t offset;
        const int64_t *stride;
        int64_t heads, n;
    } in[3] = {{rs->run->q, rs->run->q_offset, p->q_stride, p->heads_q, p->seq_q},
               {rs->run->k, rs->run->k_offset, p->k_stride, p->heads_kv, p->seq_k},
               {rs->run->v, rs->run->v_offset, p->v_stride, p->heads_kv, p->seq_k}};
    for (int i = 0; i < 3; i++) {
        int64_t rows = p->batch * in[i].heads * in[i].n;
        arg_list a = args_for(c, op->scan, "finite_scan");
        arg_mem(&a, mem_of(in[i].buf));
        arg_tensor(&a, in[i].offset, es, in[i].stride);
        arg_int(&a, in[i].heads);
        arg_int(&a, in[i].n);
        arg_long(&a, rows);
        arg_mem(&a, rs->ws);
        arg_long(&a, rs->status_at);
        arg_uint(&a, 1u << i);
        size_t local = OCL_SCAN_WG, global = qattn_round_up((size_t)rows, local);
        qattn_status s = launch(ctx, &a, 1, &global, &local);
        if (s)
            return s;
    }
    return QATTN_OK;
}

/* INT8 rows of q or k into the workspace (quant_rows). */
static qattn_status enqueue_quant_rows(qattn_ctx *ctx, const run_state *rs, bool is_q)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_plan *plan = rs->plan;
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    const qattn_quant_params *qp = &plan->quant;
    const ocl_plan *op = plan->impl;
    int64_t heads = is_q ? p->heads_q : p->heads_kv, n = is_q ? p->seq_q : p->seq_k;
    int64_t groups = is_q ? L->q_groups : L->k_groups;
    bool use_mean = !is_q && qp->smooth_k;
    arg_list a = args_for(c, op->quant_rows, is_q ? "quant_rows (q)" : "quant_rows (k)");
    arg_mem(&a, mem_of(is_q ? rs->run->q : rs->run->k));
    arg_tensor(&a, is_q ? rs->run->q_offset : rs->run->k_offset, qattn_dtype_size(p->in_dtype),
               is_q ? p->q_stride : p->k_stride);
    arg_int(&a, heads);
    arg_int(&a, n);
    arg_int(&a, is_q ? qp->q_block : qp->k_block);
    arg_int(&a, is_q ? qp->q_interleave : qp->k_interleave);
    arg_int(&a, groups);
    arg_mem(&a, rs->ws);
    arg_long(&a, region(rs, is_q ? L->q_i8 : L->k_i8));
    arg_long(&a, region(rs, is_q ? L->q_scale : L->k_scale));
    arg_long(&a, use_mean ? region(rs, L->k_mean) : 0);
    arg_int(&a, use_mean);
    arg_long(&a, rs->status_at);
    size_t local = OCL_QUANT_WG, global = (size_t)(groups * p->batch * heads) * local;
    return launch(ctx, &a, 1, &global, &local);
}

/* The quantization passes of src/quant.c: K mean, K, V, Q, then the LSE correction. */
static qattn_status enqueue_quantize(qattn_ctx *ctx, const run_state *rs)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_plan *plan = rs->plan;
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    const qattn_quant_params *qp = &plan->quant;
    const ocl_plan *op = plan->impl;
    const size_t es = qattn_dtype_size(p->in_dtype);
    const int64_t bhk = p->batch * p->heads_kv;
    qattn_status s;

    if (qp->smooth_k) {
        arg_list a = args_for(c, op->k_mean, "k_mean");
        arg_mem(&a, mem_of(rs->run->k));
        arg_tensor(&a, rs->run->k_offset, es, p->k_stride);
        arg_int(&a, p->heads_kv);
        arg_int(&a, p->seq_k);
        arg_int(&a, bhk);
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->k_mean));
        arg_long(&a, rs->status_at);
        size_t local = 64, global = qattn_round_up((size_t)(bhk * p->head_dim), local);
        if ((s = launch(ctx, &a, 1, &global, &local)))
            return s;
    }
    if ((s = enqueue_quant_rows(ctx, rs, false)))
        return s;

    if (plan->precision == QATTN_PRECISION_INT8_FP16) {
        int64_t total = bhk * p->seq_k * p->head_dim;
        arg_list a = args_for(c, op->quant_v, "quant_v_f16");
        arg_mem(&a, mem_of(rs->run->v));
        arg_tensor(&a, rs->run->v_offset, es, p->v_stride);
        arg_int(&a, p->heads_kv);
        arg_int(&a, p->seq_k);
        arg_long(&a, total);
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->v_q));
        arg_long(&a, rs->status_at);
        size_t local = 256, global = qattn_round_up((size_t)total, local);
        if ((s = launch(ctx, &a, 1, &global, &local)))
            return s;
    } else {
        arg_list a = args_for(c, op->quant_v, "quant_v_fp8");
        arg_mem(&a, mem_of(rs->run->v));
        arg_tensor(&a, rs->run->v_offset, es, p->v_stride);
        arg_int(&a, p->heads_kv);
        arg_int(&a, p->seq_k);
        arg_int(&a, L->v_keys_padded);
        arg_float(&a, qp->v_fp8_max);
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->v_q));
        arg_long(&a, region(rs, L->v_scale));
        arg_long(&a, rs->status_at);
        size_t local = OCL_VFP8_WG, global = (size_t)(((p->head_dim + 31) / 32) * bhk) * local;
        if ((s = launch(ctx, &a, 1, &global, &local)))
            return s;
    }

    if ((s = enqueue_quant_rows(ctx, rs, true)))
        return s;
    if (qp->smooth_k) {
        int64_t rows = p->batch * p->heads_q * p->seq_q;
        arg_list a = args_for(c, op->q_kmean, "q_kmean");
        arg_mem(&a, mem_of(rs->run->q));
        arg_tensor(&a, rs->run->q_offset, es, p->q_stride);
        arg_int(&a, p->heads_q);
        arg_int(&a, p->group);
        arg_int(&a, p->heads_kv);
        arg_int(&a, p->seq_q);
        arg_long(&a, rows);
        arg_float(&a, p->sm_scale);
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->k_mean));
        arg_long(&a, region(rs, L->q_kmean));
        arg_long(&a, rs->status_at);
        size_t local = 64, global = qattn_round_up((size_t)rows, local);
        if ((s = launch(ctx, &a, 1, &global, &local)))
            return s;
    }
    return QATTN_OK;
}

static qattn_status enqueue_flash(qattn_ctx *ctx, const run_state *rs)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_plan *plan = rs->plan;
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    const qattn_quant_params *qp = &plan->quant;
    const qattn_run_bound *run = rs->run;
    const ocl_plan *op = plan->impl;
    const size_t es = qattn_dtype_size(p->in_dtype), os = qattn_dtype_size(p->out_dtype);
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;

    arg_list a = args_for(c, op->flash, "flash_attention");
    arg_mem(&a, mem_of(run->q));
    arg_mem(&a, mem_of(run->k));
    arg_mem(&a, mem_of(run->v));
    arg_mem(&a, mem_of(run->o));
    arg_mem(&a, run->lse ? mem_of(run->lse) : NULL);
    arg_mem(&a, rs->ws);
    arg_tensor(&a, run->q_offset, es, p->q_stride);
    arg_tensor(&a, run->k_offset, es, p->k_stride);
    arg_tensor(&a, run->v_offset, es, p->v_stride);
    arg_tensor(&a, run->o_offset, os, p->o_stride);
    arg_long(&a, (int64_t)(run->lse_offset / 4));
    arg_int(&a, run->lse != NULL);
    arg_int(&a, p->heads_q);
    arg_int(&a, p->heads_kv);
    arg_int(&a, p->group);
    arg_int(&a, p->seq_q);
    arg_int(&a, p->seq_k);
    arg_int(&a, p->causal);
    arg_float(&a, p->sm_scale * (float)QATTN_LOG2E);
    arg_int(&a, op->nqb);
    arg_long(&a, rs->status_at);
    arg_long(&a, quant ? region(rs, L->q_i8) : -1);
    arg_long(&a, quant ? region(rs, L->k_i8) : -1);
    arg_long(&a, quant ? region(rs, L->v_q) : -1);
    arg_long(&a, quant ? region(rs, L->q_scale) : -1);
    arg_long(&a, quant ? region(rs, L->k_scale) : -1);
    arg_long(&a, quant ? region(rs, L->v_scale) : -1);
    arg_long(&a, quant ? region(rs, L->q_kmean) : -1);
    arg_int(&a, L->q_groups);
    arg_int(&a, L->k_groups);
    arg_int(&a, quant ? qp->q_block : 1);
    arg_int(&a, quant ? qp->q_interleave : 1);
    arg_int(&a, quant ? qp->k_block : 1);
    arg_int(&a, quant ? qp->k_interleave : 1);
    arg_int(&a, L->v_keys_padded);
    size_t local = OCL_WG, global = (size_t)op->nqb * (size_t)(p->batch * p->heads_q) * local;
    return launch(ctx, &a, 1, &global, &local);
}

static qattn_status ocl_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_problem *p = &plan->problem;
    if (run->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "args.stream must be NULL on the opencl backend (it runs on the context's queue)");
    run_state rs = {
        .plan = plan,
        .run = run,
        .ws = run->workspace ? mem_of(run->workspace) : NULL,
        .ws_base = (int64_t)run->workspace_offset,
        .status_at = -1,
    };
    if (p->check_finite)
        rs.status_at = region(&rs, plan->ws.status);

    /* Kernel arguments live in the plan's kernel objects: one run at a time sets and enqueues them. */
    pthread_mutex_lock(&c->lock);
    qattn_status s = QATTN_OK;
    if (p->check_finite)
        s = enqueue_scan(ctx, &rs);
    if (!s && plan->precision != QATTN_PRECISION_EXACT)
        s = enqueue_quantize(ctx, &rs);
    if (!s)
        s = enqueue_flash(ctx, &rs);
    uint32_t words[QATTN_STATUS_WORDS];
    s = qattn_opencl_finish_run(ctx, s, rs.ws, p->check_finite ? rs.status_at : -1, "run", words);
    if (!s && words[QATTN_STATUS_NONFINITE])
        return qattn_nonfinite_error(ctx, words[QATTN_STATUS_NONFINITE]);
    return s;
}

qattn_status qattn_opencl_finish_run(qattn_ctx *ctx, qattn_status s, cl_mem ws, int64_t status_at, const char *what,
                                     uint32_t words[QATTN_STATUS_WORDS])
{
    ocl_ctx *c = impl_of(ctx);
    cl_event read = NULL;
    memset(words, 0, QATTN_STATUS_BYTES);
    if (!s && status_at >= 0) {
        cl_int err = c->cl->clEnqueueReadBuffer(c->queue, ws, CL_FALSE, (size_t)status_at, QATTN_STATUS_BYTES, words, 0,
                                                NULL, &read);
        if (err != CL_SUCCESS)
            s = cl_error(ctx, err, "clEnqueueReadBuffer", "the status word");
    } else if (!s) {
        cl_int err = c->cl->clFlush(c->queue);
        if (err != CL_SUCCESS)
            s = cl_error(ctx, err, "clFlush", what);
    }
    pthread_mutex_unlock(&c->lock);
    if (s || !read)
        return s;
    cl_int err = c->cl->clWaitForEvents(1, &read);
    c->cl->clReleaseEvent(read);
    return err == CL_SUCCESS ? QATTN_OK : cl_error(ctx, err, "clWaitForEvents", "the status word");
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
    .plan_init = ocl_plan_init,
    .plan_release = ocl_plan_release,
    .run = ocl_run,
    .tensor_alignment = 1,
    .kv_append = qattn_opencl_kv_append,
    .paged_plan_init = qattn_opencl_paged_plan_init,
    .paged_plan_release = qattn_opencl_paged_plan_release,
    .paged_run = qattn_opencl_paged_run,
    .merge_states = qattn_opencl_merge_states,
};
