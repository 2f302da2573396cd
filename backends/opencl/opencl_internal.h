/*
 * The OpenCL backend's private types and the functions its files share (and
 * tests/test_opencl.c uses; not part of the API).
 *
 * Files: opencl_backend.c (the vtable, devices as qattn reports them,
 * contexts, buffers), opencl_attention.c (dense plans and runs),
 * opencl_paged.c (the paged KV cache), opencl_runtime.c (the device list,
 * the program cache, the end of a run: what the others call; it calls none
 * of them), cl_loader.c (the ICD loader, opened at run time).
 */
#ifndef QATTN_OPENCL_INTERNAL_H
#define QATTN_OPENCL_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cl_loader.h"
#include "internal.h"

/* One device, as listed once per process (opencl_runtime.c). */
typedef struct ocl_device {
    cl_platform_id platform;
    cl_device_id id;
    cl_device_type type;
    char name[QATTN_NAME_MAX];
    char vendor[64];
    char driver[64];
    char version[128];      /* CL_DEVICE_VERSION */
    char c_version[64];     /* CL_DEVICE_OPENCL_C_VERSION */
    char platform_name[128];
    char platform_version[128];
    cl_uint compute_units;
    cl_ulong global_mem, max_alloc, local_mem;
    size_t max_wg;
    bool fp16, fp64, int_dot, subgroups, unified;
    bool correct_div; /* CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT (reported only: the bit-exact kernels divide in
                         integer arithmetic, common.cl's div_rn) */
    bool denorms;     /* CL_FP_DENORM: fp32 subnormals kept (else flushed to zero) */
} ocl_device;

#define OCL_MAX_DEVICES 64

/* The devices of every platform that can build and run the kernels, listed
 * once per process in a stable order: GPUs, then accelerators, then other
 * kinds, then CPUs (platforms by name). */
typedef struct ocl_device_list {
    const qattn_cl_api *cl; /* NULL when the ICD loader could not be loaded */
    int count;
    ocl_device dev[OCL_MAX_DEVICES];
    char reason[QATTN_NAME_MAX]; /* why count is 0 */
} ocl_device_list;

typedef struct ocl_program {
    struct ocl_program *next;
    char *key;
    cl_program program;
} ocl_program;

typedef struct ocl_ctx {
    const qattn_cl_api *cl;
    const ocl_device *dev;
    cl_context context;
    cl_command_queue queue;
    pthread_mutex_t lock; /* program cache; kernel arguments + enqueue of a run; the append check */
    ocl_program *programs;
    cl_mem append_status; /* 16 bytes for the append check's flags, made on first use (under lock) */
} ocl_ctx;

static inline ocl_ctx *impl_of(const qattn_ctx *ctx) { return (ocl_ctx *)ctx->impl; }
static inline cl_mem mem_of(const qattn_buffer *buf) { return buf ? (cl_mem)buf->impl : NULL; }

/* Reports a failed cl* call: allocation failures are OUT_OF_MEMORY, the rest BACKEND. */
static inline qattn_status cl_error(qattn_ctx *ctx, cl_int err, const char *call, const char *what)
{
    qattn_status s = (err == CL_MEM_OBJECT_ALLOCATION_FAILURE || err == CL_OUT_OF_HOST_MEMORY)
                         ? QATTN_ERR_OUT_OF_MEMORY
                         : QATTN_ERR_BACKEND;
    return qattn_set_error(ctx, s, "opencl: %s failed with %s (%s)", call, qattn_cl_error_name(err), what);
}

/* ------------------------------------------------------- opencl_runtime.c */

/* The device list (made on first use). */
const ocl_device_list *qattn_opencl_devices(void);

/*
 * Ends a run whose kernels were enqueued under c->lock (s: the status so far):
 * enqueues the read of the status words at `status_at` of ws (status_at < 0:
 * no check, just flushes), releases c->lock, then waits for the read. On
 * success `words` holds them (zeros without a check); the caller decodes them.
 */
qattn_status qattn_opencl_finish_run(qattn_ctx *ctx, qattn_status s, cl_mem ws, int64_t status_at, const char *what,
                                     uint32_t words[QATTN_STATUS_WORDS]);

/*
 * The program built from `parts` with `options` on ctx's device (ctx must be
 * an opencl context): from the context's cache, the $QATTN_OPENCL_CACHE
 * folder, or the compiler. The context owns the program. A compiler failure
 * returns QATTN_ERR_BACKEND with the build log in the error message.
 */
qattn_status qattn_opencl_get_program(qattn_ctx *ctx, const char *what, const char *const *parts, size_t nparts,
                                      const char *options, cl_program *out);
/* Releases the programs of the context's cache. */
void qattn_opencl_release_programs(ocl_ctx *c);

/* Enqueues the zeroing of the status words (QATTN_STATUS_BYTES at byte `at`
 * of buffer); `what` names them in an error. */
qattn_status qattn_opencl_clear_status(qattn_ctx *ctx, cl_mem buffer, int64_t at, const char *what);
/* Releases the kernels of `kernels` that were made (non-NULL). */
void qattn_opencl_release_kernels(const ocl_ctx *c, const cl_kernel *kernels, size_t n);

/* ------------------------------------------------- kernels and their arguments */

static inline qattn_status make_kernel(qattn_ctx *ctx, cl_program prog, const char *name, cl_kernel *out)
{
    cl_int err = CL_SUCCESS;
    *out = impl_of(ctx)->cl->clCreateKernel(prog, name, &err);
    return *out ? QATTN_OK : cl_error(ctx, err, "clCreateKernel", name);
}

/* common.cl's IN_DTYPE / OUT_DTYPE codes. */
static inline int dtype_code(qattn_dtype dt) { return dt == QATTN_DTYPE_F32 ? 0 : dt == QATTN_DTYPE_F16 ? 1 : 2; }

/* Sets kernel arguments in order; the first failure sticks. */
typedef struct arg_list {
    const qattn_cl_api *cl;
    cl_kernel kernel;
    cl_uint next;
    cl_int err;
    const char *name;
} arg_list;

static inline void arg(arg_list *a, size_t size, const void *value)
{
    if (a->err == CL_SUCCESS)
        a->err = a->cl->clSetKernelArg(a->kernel, a->next, size, value);
    a->next++;
}

static inline void arg_mem(arg_list *a, cl_mem m) { arg(a, sizeof(m), &m); }
static inline void arg_long(arg_list *a, int64_t x)
{
    cl_long v = (cl_long)x;
    arg(a, sizeof(v), &v);
}
static inline void arg_int(arg_list *a, int64_t x)
{
    cl_int v = (cl_int)x;
    arg(a, sizeof(v), &v);
}
static inline void arg_uint(arg_list *a, uint32_t x)
{
    cl_uint v = x;
    arg(a, sizeof(v), &v);
}
static inline void arg_float(arg_list *a, float x)
{
    cl_float v = x;
    arg(a, sizeof(v), &v);
}

static inline arg_list args_for(const ocl_ctx *c, cl_kernel k, const char *name)
{
    arg_list a = {.cl = c->cl, .kernel = k, .next = 0, .err = CL_SUCCESS, .name = name};
    return a;
}

/* Enqueues a kernel whose arguments were set through `a` (event may be NULL). */
static inline qattn_status launch_event(qattn_ctx *ctx, arg_list *a, cl_uint dims, const size_t *global,
                                        const size_t *local, cl_event *event)
{
    ocl_ctx *c = impl_of(ctx);
    if (a->err != CL_SUCCESS)
        return cl_error(ctx, a->err, "clSetKernelArg", a->name);
    cl_int err = c->cl->clEnqueueNDRangeKernel(c->queue, a->kernel, dims, NULL, global, local, 0, NULL, event);
    return err == CL_SUCCESS ? QATTN_OK : cl_error(ctx, err, "clEnqueueNDRangeKernel", a->name);
}

static inline qattn_status launch(qattn_ctx *ctx, arg_list *a, cl_uint dims, const size_t *global, const size_t *local)
{
    return launch_event(ctx, a, dims, global, local, NULL);
}

/* ---------------------------------------------------- dense attention (opencl_attention.c) */

qattn_status qattn_opencl_plan_init(qattn_ctx *ctx, qattn_plan *plan);
void qattn_opencl_plan_release(qattn_ctx *ctx, qattn_plan *plan);
qattn_status qattn_opencl_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run);

/* ---------------------------------------------------- paged KV cache (opencl_paged.c) */

qattn_status qattn_opencl_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args,
                                    const qattn_kv_cache_sizes *sizes);
qattn_status qattn_opencl_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan);
void qattn_opencl_paged_plan_release(qattn_ctx *ctx, qattn_plan *plan);
qattn_status qattn_opencl_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status qattn_opencl_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args,
                                          qattn_buffer *mass, size_t mass_offset);
qattn_status qattn_opencl_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

#endif
