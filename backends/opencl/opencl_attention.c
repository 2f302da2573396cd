/*
 * OpenCL dense attention: plans and runs. A plan resolves the precision,
 * picks the flash kernel's rows per work-item and builds its kernels (flash,
 * and the finite scan and quantization passes it needs). A run is:
 *     [finite scan] -> [quantization passes] -> flash kernel
 * With the finite check on, the scan flags the workspace status word, every
 * later kernel returns at once when it is set, and the run reads the word
 * back; without it the run is asynchronous on the context's queue.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "opencl_internal.h"
#include "opencl_kernels.h"

#define OCL_WG 128          /* work-items of a flash work-group (flash.cl: WG) */
#define OCL_BK 64           /* keys per tile (flash.cl: BK) */
#define OCL_QUANT_WG 128    /* prep.cl: QUANT_WG */
#define OCL_VFP8_WG 256     /* prep.cl: quant_v_fp8 */
#define OCL_SCAN_WG 64

/* ---------------------------------------------------------------- plans */

typedef struct ocl_plan {
    cl_kernel scan, k_mean, quant_rows, q_kmean, quant_v, flash;
    cl_kernel sp_lists, sp_pool, sp_select, sp_density; /* sparse plans (sparse.cl) */
    int tm;  /* query rows per work-item */
    int nqb; /* query blocks of 8*tm rows */
    /* Sparse plans with a layout: the flash tiles' step lists in the backend's
     * workspace region (byte offsets from its start): counts [B*Hkv*nqb] int32,
     * lists [B*Hkv*nqb][nsteps] (step, cell mask) uint2; PREDICT adds keep
     * flags and weights [rows][scratch_stride] uint32 and visible counts [rows] int32. */
    int nsteps;
    int64_t scratch_stride; /* k_blocks rounded up to 64, plus 128 words of padding */
    size_t sp_counts, sp_list, sp_keep, sp_vis, sp_weight;
} ocl_plan;

void qattn_opencl_plan_release(qattn_ctx *ctx, qattn_plan *plan)
{
    ocl_plan *op = plan->impl;
    if (!op)
        return;
    const cl_kernel all[] = {op->scan,     op->k_mean,  op->quant_rows, op->q_kmean,   op->quant_v,
                             op->flash,    op->sp_lists, op->sp_pool,   op->sp_select, op->sp_density};
    qattn_opencl_release_kernels(impl_of(ctx), all, sizeof(all) / sizeof(all[0]));
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

/* Local memory of flash.cl for (D, TM, mode), in bytes: mirrors its macros (SPARSE adds pv_big). */
static size_t flash_local_bytes(int64_t D, int tm, bool quant, bool sparse)
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
    return (size_t)(work > out_block ? work : out_block) * 4 + (sparse ? (size_t)bq / 16 * 4 : 0);
}

/* What the problem asks of the device that the kernels cannot give: head dim, dtypes, 32-bit rows, work-groups. */
static qattn_status check_problem(qattn_ctx *ctx, const ocl_device *d, const qattn_problem *p)
{
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
    return QATTN_OK;
}

/* Resolves AUTO (integer dot products and fp64 make int8_fp16 worth it) and the quantization geometry. */
static qattn_status choose_precision(qattn_ctx *ctx, const ocl_device *d, qattn_plan *plan)
{
    const int64_t D = plan->problem.head_dim;
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
    return QATTN_OK;
}

/*
 * Builds the flash kernel with tm query rows per work-item (8 or 4), falling
 * back to int multiply-adds when the integer dot product builtins do not
 * build (*use_dot cleared) and to 4 rows when registers cap the work-group
 * below 128 (*tm set).
 */
static qattn_status build_flash(qattn_ctx *ctx, qattn_plan *plan, ocl_plan *op, int *tm, bool *use_dot)
{
    ocl_ctx *c = impl_of(ctx);
    const ocl_device *d = c->dev;
    const qattn_problem *p = &plan->problem;
    const int64_t D = p->head_dim;
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;
    /* Dense plans build exactly the program they always did; sparse ones put sparse.cl's mask helpers first. */
    const bool sparse = plan->sparse.enabled;
    const char *dense_parts[2] = {qattn_opencl_src_common, qattn_opencl_src_flash};
    const char *sparse_parts[3] = {qattn_opencl_src_common, qattn_opencl_src_sparse, qattn_opencl_src_flash};
    char options[512];
    for (;;) {
        int n = snprintf(options, sizeof(options),
                         "-cl-std=CL1.2 -DHEAD_DIM=%lld -DTM=%d -DMODE=%d -DIN_DTYPE=%d -DOUT_DTYPE=%d -DHAS_FP16=%d "
                         "-DHAS_FP64=%d -DHAS_INT_DOT=%d -DF16ACC_CHUNK=%d",
                         (long long)D, *tm, mode_code(plan->precision), dtype_code(p->in_dtype),
                         dtype_code(p->out_dtype), d->fp16, d->fp64, *use_dot,
                         quant && plan->quant.pv_f16_chunk > 0 ? plan->quant.pv_f16_chunk : 32);
        if (sparse && n > 0 && (size_t)n < sizeof(options))
            snprintf(options + n, sizeof(options) - (size_t)n, " -DSPARSE=1");
        cl_program prog = NULL;
        qattn_status s = sparse ? qattn_opencl_get_program(ctx, "flash", sparse_parts, 3, options, &prog)
                                : qattn_opencl_get_program(ctx, "flash", dense_parts, 2, options, &prog);
        if (s && *use_dot) {
            /* Same results without the extension's builtins (exact int8 products either way);
             * the kernel name and the plan's account say which ran. */
            qattn_log(QATTN_LOG_WARN, "opencl: the integer dot product kernel failed to build on %s (%s); using "
                      "int8 multiply-adds", d->name, qattn_last_error(ctx));
            size_t used = strlen(plan->why);
            snprintf(plan->why + used, sizeof(plan->why) - used,
                     " The cl_khr_integer_dot_product builtins did not build here; INT8 Q.K uses int multiply-adds.");
            *use_dot = false;
            continue;
        }
        if (s || (s = make_kernel(ctx, prog, "flash_attention", &op->flash)))
            return s;
        /* Registers may cap the work-group below 128: retry with 4 rows per work-item. */
        size_t wg = 0;
        cl_int err = c->cl->clGetKernelWorkGroupInfo(op->flash, d->id, CL_KERNEL_WORK_GROUP_SIZE, sizeof(wg), &wg,
                                                     NULL);
        if (err != CL_SUCCESS)
            return cl_error(ctx, err, "clGetKernelWorkGroupInfo", "flash_attention");
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
                     8 * *tm, (uint64_t)local_bytes, (uint64_t)private_bytes);
            qattn_log(QATTN_LOG_INFO, "opencl: %s", plan->why);
            return QATTN_OK;
        }
        c->cl->clReleaseKernel(op->flash);
        op->flash = NULL;
        if (*tm == 4)
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "the opencl flash kernel at D=%lld runs at most %zu work-items per group on %s; it "
                                   "needs %d",
                                   (long long)D, wg, d->name, OCL_WG);
        *tm = 4;
    }
}

/* The finite scan and the quantization passes the plan needs (prep.cl). */
static qattn_status build_prep(qattn_ctx *ctx, const qattn_plan *plan, ocl_plan *op)
{
    const ocl_device *d = impl_of(ctx)->dev;
    const qattn_problem *p = &plan->problem;
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;
    if (!p->check_finite && !quant)
        return QATTN_OK;
    const char *prep_parts[2] = {qattn_opencl_src_common, qattn_opencl_src_prep};
    char options[512];
    snprintf(options, sizeof(options), "-cl-std=CL1.2 -DHEAD_DIM=%lld -DIN_DTYPE=%d -DOUT_DTYPE=0 -DHAS_FP16=%d "
             "-DHAS_FP64=%d",
             (long long)p->head_dim, dtype_code(p->in_dtype), d->fp16, d->fp64);
    cl_program prog = NULL;
    qattn_status s;
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
    return QATTN_OK;
}

/* Sparse plans: the kernels of sparse.cl the plan needs and the backend's workspace for the step lists. */
static qattn_status sparse_plan_init(qattn_ctx *ctx, qattn_plan *plan, ocl_plan *op)
{
    const ocl_device *d = impl_of(ctx)->dev;
    const qattn_problem *p = &plan->problem;
    const qattn_sparse_problem *sp = &plan->sparse;
    if (sp->layout == QATTN_SPARSE_NO_LAYOUT)
        return QATTN_OK; /* structured masks: computed in the flash kernel */
    const bool predict = sp->layout == QATTN_SPARSE_PREDICT;
    const char *parts[2] = {qattn_opencl_src_common, qattn_opencl_src_sparse};
    char options[512];
    snprintf(options, sizeof(options),
             "-cl-std=CL1.2 -DSPARSE_KERNELS=1 -DHEAD_DIM=%lld -DIN_DTYPE=%d -DOUT_DTYPE=0 -DHAS_FP16=%d "
             "-DHAS_FP64=%d",
             (long long)p->head_dim, dtype_code(p->in_dtype), d->fp16, d->fp64);
    cl_program prog = NULL;
    qattn_status s;
    if ((s = qattn_opencl_get_program(ctx, "sparse", parts, 2, options, &prog)) ||
        (s = make_kernel(ctx, prog, "sparse_lists", &op->sp_lists)))
        return s;
    if (predict && ((s = make_kernel(ctx, prog, "sparse_pool", &op->sp_pool)) ||
                    (s = make_kernel(ctx, prog, "sparse_select", &op->sp_select)) ||
                    (s = make_kernel(ctx, prog, "sparse_density", &op->sp_density))))
        return s;
    const int64_t tiles = p->batch * p->heads_kv * (int64_t)op->nqb;
    op->nsteps = (int)qattn_ceil_div(p->seq_k, OCL_BK);
    size_t bytes = 0, part = 0;
    bool ok = tiles <= INT32_MAX;
    op->sp_counts = 0;
    bytes = qattn_round_up((size_t)tiles * 4, QATTN_WS_ALIGN);
    op->sp_list = bytes;
    ok = ok && !__builtin_mul_overflow((size_t)tiles, (size_t)op->nsteps * 8, &part) &&
         !__builtin_add_overflow(bytes, qattn_round_up(part, QATTN_WS_ALIGN), &bytes);
    if (predict) {
        op->scratch_stride = (sp->k_blocks + 63) / 64 * 64 + 128;
        op->sp_keep = bytes;
        ok = ok && !__builtin_mul_overflow((size_t)sp->rows, (size_t)op->scratch_stride * 4, &part) &&
             !__builtin_add_overflow(bytes, qattn_round_up(part, QATTN_WS_ALIGN), &bytes);
        op->sp_weight = bytes;
        ok = ok && !__builtin_add_overflow(bytes, qattn_round_up(part, QATTN_WS_ALIGN), &bytes);
        op->sp_vis = bytes;
        ok = ok && !__builtin_add_overflow(bytes, qattn_round_up((size_t)sp->rows * 4, QATTN_WS_ALIGN), &bytes);
    }
    if (!ok || bytes > (size_t)1 << 50)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl sparse step lists for %lld tiles of %d steps do not fit the workspace",
                               (long long)tiles, op->nsteps);
    plan->backend_workspace = bytes;
    return QATTN_OK;
}

qattn_status qattn_opencl_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    const ocl_device *d = impl_of(ctx)->dev;
    const qattn_problem *p = &plan->problem;
    const int64_t D = p->head_dim;
    qattn_status s = check_problem(ctx, d, p);
    if (!s)
        s = choose_precision(ctx, d, plan);
    if (s)
        return s;
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;

    /* 8 rows per work-item where registers allow; F16ACC and D > 128 carry more accumulators. */
    const bool sparse = plan->sparse.enabled;
    int tm = (D <= 128 && plan->precision != QATTN_PRECISION_INT8_FP8_F16ACC) ? 8 : 4;
    if (flash_local_bytes(D, tm, quant, sparse) > d->local_mem)
        tm = 4;
    if (flash_local_bytes(D, tm, quant, sparse) > d->local_mem)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl flash kernel needs %zu bytes of local memory at D=%lld; %s has %" PRIu64,
                               flash_local_bytes(D, tm, quant, sparse), (long long)D, d->name,
                               (uint64_t)d->local_mem);

    ocl_plan *op = calloc(1, sizeof(*op));
    if (!op)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the plan");
    plan->impl = op; /* from here on a failure leaves it to the core, which calls the release slot */
    bool use_dot = quant && d->int_dot;
    if ((s = build_flash(ctx, plan, op, &tm, &use_dot)) || (s = build_prep(ctx, plan, op)))
        return s;

    op->tm = tm;
    op->nqb = (int)qattn_ceil_div(p->seq_q, 8 * tm);
    if ((uint64_t)op->nqb * (uint64_t)(p->batch * p->heads_q) > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "B*Hq*ceil(Nq/%d) work-groups exceed 2^31-1, the opencl backend's launch limit", 8 * tm);
    plan->q_tile = 8 * tm;
    plan->kv_tile = OCL_BK;
    plan->status_word = p->check_finite;
    plan->backend_workspace = 0;
    if (sparse && (s = sparse_plan_init(ctx, plan, op)))
        return s;
    snprintf(plan->kernel, sizeof(plan->kernel), "opencl_flash_%s_d%lld_r%d%s%s",
             qattn_precision_name(plan->precision), (long long)D, 8 * tm, use_dot ? "_dot4" : "",
             sparse ? "_sparse" : "");
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
    qattn_status s = qattn_opencl_clear_status(ctx, rs->ws, rs->status_at, "the status word");
    if (s)
        return s;
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
        if ((s = launch(ctx, &a, 1, &global, &local)))
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
        size_t local = OCL_VFP8_WG, global = (size_t)(qattn_ceil_div(p->head_dim, 32) * bhk) * local;
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

/* The window's bounds as the kernels take them: -1 where unbounded, and bounds past every key folded into -1. */
static void sparse_window(const qattn_plan *plan, int64_t *left, int64_t *right, int64_t *sinks)
{
    const qattn_problem *p = &plan->problem;
    const qattn_sparse_problem *sp = &plan->sparse;
    const int64_t reach = p->seq_k + p->seq_q;
    *left = sp->window && sp->window_left >= 0 && sp->window_left <= reach ? sp->window_left : -1;
    *right = sp->window && sp->window_right >= 0 && sp->window_right <= reach ? sp->window_right : -1;
    *sinks = sp->window ? qattn_min_i64(sp->sink_tokens, p->seq_k) : 0;
}

/* The structured-mask arguments sparse.cl's kernels share: causal, window, left, right, sinks. */
static void arg_window(arg_list *a, const qattn_plan *plan)
{
    int64_t left, right, sinks;
    sparse_window(plan, &left, &right, &sinks);
    arg_int(a, plan->problem.causal);
    arg_int(a, plan->sparse.window);
    arg_long(a, left);
    arg_long(a, right);
    arg_long(a, sinks);
}

/* PREDICT: pool Q and K blocks, select each layout row's key blocks, the densities (sparse.cl). */
static qattn_status enqueue_predict(qattn_ctx *ctx, const run_state *rs)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_plan *plan = rs->plan;
    const qattn_problem *p = &plan->problem;
    const qattn_sparse_problem *sp = &plan->sparse;
    const qattn_workspace_layout *L = &plan->ws;
    const ocl_plan *op = plan->impl;
    const size_t es = qattn_dtype_size(p->in_dtype);
    const int64_t backend = region(rs, L->backend);
    const int64_t q_items = p->batch * p->heads_q * sp->q_blocks, k_items = p->batch * p->heads_kv * sp->k_blocks;
    qattn_status s;
    {
        arg_list a = args_for(c, op->sp_pool, "sparse_pool");
        arg_mem(&a, mem_of(rs->run->q));
        arg_mem(&a, mem_of(rs->run->k));
        arg_tensor(&a, rs->run->q_offset, es, p->q_stride);
        arg_tensor(&a, rs->run->k_offset, es, p->k_stride);
        arg_int(&a, p->heads_q);
        arg_int(&a, p->heads_kv);
        arg_int(&a, p->seq_q);
        arg_int(&a, p->seq_k);
        arg_int(&a, sp->q_block);
        arg_int(&a, sp->k_block);
        arg_int(&a, sp->q_blocks);
        arg_int(&a, sp->k_blocks);
        arg_long(&a, q_items);
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->sparse_q_pool));
        arg_long(&a, region(rs, L->sparse_k_pool));
        arg_long(&a, region(rs, L->sparse_q_sim));
        arg_long(&a, region(rs, L->sparse_k_sim));
        arg_long(&a, rs->status_at);
        size_t local = 64, global = (size_t)(q_items + k_items) * local;
        if ((s = launch(ctx, &a, 1, &global, &local)))
            return s;
    }
    {
        arg_list a = args_for(c, op->sp_select, "sparse_select");
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->sparse_q_pool));
        arg_long(&a, region(rs, L->sparse_k_pool));
        arg_long(&a, region(rs, L->sparse_q_sim));
        arg_long(&a, region(rs, L->sparse_k_sim));
        arg_long(&a, region(rs, L->sparse_counts));
        arg_long(&a, region(rs, L->sparse_indices));
        arg_long(&a, backend + (int64_t)op->sp_keep);
        arg_long(&a, backend + (int64_t)op->sp_vis);
        arg_long(&a, backend + (int64_t)op->sp_weight);
        arg_long(&a, op->scratch_stride);
        arg_int(&a, p->heads_q);
        arg_int(&a, p->heads_kv);
        arg_int(&a, p->group);
        arg_int(&a, p->seq_q);
        arg_int(&a, p->seq_k);
        arg_window(&a, plan);
        arg_int(&a, sp->q_block);
        arg_int(&a, sp->k_block);
        arg_int(&a, sp->q_blocks);
        arg_int(&a, sp->k_blocks);
        arg_float(&a, p->sm_scale);
        arg_float(&a, sp->sim_threshold);
        arg_float(&a, sp->cdf_threshold);
        arg_float(&a, sp->topk);
        arg_long(&a, sp->sink_blocks);
        arg_long(&a, sp->recent_blocks);
        arg_long(&a, sp->last_q_blocks);
        arg_long(&a, rs->status_at);
        size_t local = 128, global = (size_t)sp->rows * local;
        if ((s = launch(ctx, &a, 1, &global, &local)))
            return s;
    }
    const int64_t bhk = p->batch * p->heads_kv;
    arg_list a = args_for(c, op->sp_density, "sparse_density");
    arg_mem(&a, rs->ws);
    arg_long(&a, region(rs, L->sparse_counts));
    arg_long(&a, backend + (int64_t)op->sp_vis);
    arg_long(&a, region(rs, L->sparse_density));
    arg_int(&a, bhk);
    arg_int(&a, sp->q_blocks);
    arg_int(&a, sp->k_blocks);
    arg_long(&a, rs->status_at);
    size_t local = 64, global = qattn_round_up((size_t)bhk, local);
    return launch(ctx, &a, 1, &global, &local);
}

/* A layout (the run's block CSR or the predicted rows) to the flash tiles' step lists (sparse_lists). */
static qattn_status enqueue_lists(qattn_ctx *ctx, const run_state *rs)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_plan *plan = rs->plan;
    const qattn_problem *p = &plan->problem;
    const qattn_sparse_problem *sp = &plan->sparse;
    const qattn_workspace_layout *L = &plan->ws;
    const qattn_run_bound *run = rs->run;
    const ocl_plan *op = plan->impl;
    const int64_t backend = region(rs, L->backend);
    const int64_t tiles = p->batch * p->heads_kv * (int64_t)op->nqb;
    arg_list a = args_for(c, op->sp_lists, "sparse_lists");
    if (sp->layout == QATTN_SPARSE_PREDICT) {
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->sparse_counts));
        arg_mem(&a, rs->ws);
        arg_long(&a, region(rs, L->sparse_indices));
        arg_long(&a, sp->k_blocks);
        arg_long(&a, sp->rows * sp->k_blocks);
    } else {
        arg_mem(&a, mem_of(run->block_indptr));
        arg_long(&a, 0);
        arg_mem(&a, run->block_indices ? mem_of(run->block_indices) : mem_of(run->block_indptr));
        arg_long(&a, 0);
        arg_long(&a, 0);
        arg_long(&a, run->block_indices ? run->block_count : 0);
    }
    arg_int(&a, sp->q_block);
    arg_int(&a, sp->k_block);
    arg_int(&a, sp->q_blocks);
    arg_int(&a, p->seq_q);
    arg_int(&a, p->seq_k);
    arg_window(&a, plan);
    arg_int(&a, plan->q_tile);
    arg_int(&a, op->nqb);
    arg_int(&a, tiles);
    arg_int(&a, op->nsteps);
    arg_mem(&a, rs->ws);
    arg_long(&a, backend + (int64_t)op->sp_counts);
    arg_long(&a, backend + (int64_t)op->sp_list);
    arg_long(&a, rs->status_at);
    size_t local = 64, global = qattn_round_up((size_t)tiles, local);
    return launch(ctx, &a, 1, &global, &local);
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
    if (plan->sparse.enabled) {
        const qattn_sparse_problem *sp = &plan->sparse;
        const bool layout = sp->layout != QATTN_SPARSE_NO_LAYOUT;
        const int64_t backend = layout ? region(rs, L->backend) : 0;
        int64_t left, right, sinks;
        sparse_window(plan, &left, &right, &sinks);
        arg_int(&a, sp->window);
        arg_long(&a, left);
        arg_long(&a, right);
        arg_long(&a, sinks);
        arg_int(&a, layout);
        arg_long(&a, layout ? backend + (int64_t)op->sp_counts : 0);
        arg_long(&a, layout ? backend + (int64_t)op->sp_list : 0);
        arg_int(&a, op->nsteps);
        arg_float(&a, sp->pv_threshold > 0.f ? exp2f(-sp->pv_threshold) : 0.f);
    }
    size_t local = OCL_WG, global = (size_t)op->nqb * (size_t)(p->batch * p->heads_q) * local;
    return launch(ctx, &a, 1, &global, &local);
}

qattn_status qattn_opencl_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
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
    if (!s && plan->sparse.layout == QATTN_SPARSE_PREDICT)
        s = enqueue_predict(ctx, &rs);
    if (!s && plan->sparse.layout != QATTN_SPARSE_NO_LAYOUT)
        s = enqueue_lists(ctx, &rs);
    if (!s)
        s = enqueue_flash(ctx, &rs);
    uint32_t words[QATTN_STATUS_WORDS];
    s = qattn_opencl_finish_run(ctx, s, rs.ws, p->check_finite ? rs.status_at : -1, "run", words);
    if (!s && words[QATTN_STATUS_NONFINITE])
        return qattn_nonfinite_error(ctx, words[QATTN_STATUS_NONFINITE]);
    return s;
}
