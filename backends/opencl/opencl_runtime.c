/*
 * The OpenCL machinery the backend's files share: the device list (every
 * device of every platform, listed once per process), the program cache
 * (built programs per context, and with $QATTN_OPENCL_CACHE program binaries
 * on disk keyed by device, driver, options and source), the status words
 * and the end of a run. It calls no other file of the backend.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "env.h"
#include "opencl_internal.h"

/* ------------------------------------------------------------- devices */

static ocl_device_list devices;
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

const ocl_device_list *qattn_opencl_devices(void)
{
    pthread_once(&devices_once, enumerate_devices);
    return &devices;
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

void qattn_opencl_release_programs(ocl_ctx *c)
{
    for (ocl_program *p = c->programs, *next; p; p = next) {
        next = p->next;
        c->cl->clReleaseProgram(p->program);
        free(p->key);
        free(p);
    }
    c->programs = NULL;
}

void qattn_opencl_release_kernels(const ocl_ctx *c, const cl_kernel *kernels, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (kernels[i])
            c->cl->clReleaseKernel(kernels[i]);
}

/* ---------------------------------------------------------- status words */

qattn_status qattn_opencl_clear_status(qattn_ctx *ctx, cl_mem buffer, int64_t at, const char *what)
{
    ocl_ctx *c = impl_of(ctx);
    cl_uint zero = 0;
    cl_int err = c->cl->clEnqueueFillBuffer(c->queue, buffer, &zero, sizeof(zero), (size_t)at, QATTN_STATUS_BYTES, 0,
                                            NULL, NULL);
    return err == CL_SUCCESS ? QATTN_OK : cl_error(ctx, err, "clEnqueueFillBuffer", what);
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
