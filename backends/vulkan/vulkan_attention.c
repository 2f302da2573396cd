/*
 * Vulkan dense attention: plans and runs. A plan picks the kernel variant,
 * creates its pipelines (specialized for head dim, dtypes, tiles, causal), a
 * descriptor set and a uniform buffer with the problem's constants. A run
 * updates the descriptors to the run's buffers, records
 *     [finite scan] -> [quantization passes] -> attention -> [status readback]
 * into the context's command buffer, submits it and waits: qattn_run on
 * Vulkan is synchronous (qattn_ctx_synchronize has nothing left to wait for).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vulkan_internal.h"

/* The plan's constants: mirrors `Params` in shaders/common.glsl (std140, scalars only). */
typedef struct vk_params {
    uint32_t batch, heads_q, heads_kv, seq_q, seq_k, head_dim, group;
    int32_t causal_shift;
    uint32_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn;
    float qk_scale_log2, sm_scale;
    uint32_t ws_q_i8, ws_k_i8, ws_v_q, ws_q_scale, ws_k_scale, ws_k_mean, ws_q_kmean, ws_status;
    uint32_t q_block, q_interleave, k_block, k_interleave, q_groups, k_groups;
    uint32_t smooth_k, check_finite, return_lse, q_tiles;
    /* sparse plans (shaders/sparse.glsl) */
    uint32_t sp_window, sp_left, sp_right, sp_sinks;
    uint32_t sp_q_block, sp_k_block, sp_q_blocks, sp_k_blocks;
    uint32_t sp_ptr, sp_idx, sp_stride;
    float pv_limit;
    uint32_t sp_q_pool, sp_k_pool, sp_q_sim, sp_k_sim, sp_counts, sp_density, sp_weights, sp_keep, sp_tally;
    float sp_sim_threshold, sp_cdf_threshold, sp_topk;
    uint32_t sp_sink_blocks, sp_recent_blocks, sp_last_q_blocks;
} vk_params;

/* Mirrors `Run` in shaders/common.glsl. */
typedef struct vk_push {
    uint32_t q_off, k_off, v_off, o_off, lse_off, ws_off;
    uint32_t arg0, arg1;
} vk_push;

/* One dispatch of a plan's run. */
typedef struct vk_planned_dispatch {
    VkPipeline pipeline;
    uint32_t grid[2];
    uint32_t arg0;
    bool barrier_before; /* wait for the previous dispatches' writes */
    bool arg1_count;     /* arg1: the run's block_count (a BLOCKS plan's attention) */
} vk_planned_dispatch;

#define MAX_DISPATCH 16
#define VK_PREDICT_MAX_KB 32768 /* MAX_KB of shaders/sparse_predict.comp */

typedef struct vk_plan {
    bool coopmat, emulated; /* the kernel variant plan_init chose */
    vk_params params;
    vk_mem params_buf;
    VkDescriptorPool pool;
    VkDescriptorSet set;
    vk_planned_dispatch d[MAX_DISPATCH];
    int count;
} vk_plan;

/* Specialization constant ids shared by the shaders (see the shaders). */
enum { SPEC_D = 0, SPEC_IN_DTYPE = 1, SPEC_OUT_DTYPE = 2, SPEC_BR = 3, SPEC_BC = 4, SPEC_QUANT = 5, SPEC_CAUSAL = 6,
       SPEC_SUBGROUP = 7, SPEC_PREFETCH = 8, SPEC_SPARSE = 9, SPEC_PV = 10, SPEC_COUNT = 11 };



/* The cooperative-matrix kernel's key tile and register prefetch; a build
 * may override them (-Dc_args=-DQATTN_VK_COOPMAT_BC=32) to compare variants. */
#ifndef QATTN_VK_COOPMAT_BC
#define QATTN_VK_COOPMAT_BC 64
#endif
#ifndef QATTN_VK_COOPMAT_PREFETCH
#define QATTN_VK_COOPMAT_PREFETCH 1
#endif
_Static_assert(QATTN_VK_COOPMAT_BC == 32 || QATTN_VK_COOPMAT_BC == 64, "the coopmat key tile is 32 or 64");

/* ------------------------------------------------------------------ plans */

/* The scalar kernel's tiles: the largest that fit in shared memory. */
static bool scalar_tiles(uint32_t d, uint32_t smem, uint32_t *br, uint32_t *bc)
{
    static const uint32_t options[][2] = {{16, 32}, {16, 16}, {8, 16}, {8, 8}};
    for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
        uint32_t r = options[i][0], c = options[i][1];
        uint32_t bytes = 4u * (r * d + 2u * c * d + 2u * r * c + c);
        if (bytes <= smem && d / (64u / r) <= 64u) {
            *br = r;
            *bc = c;
            return true;
        }
    }
    return false;
}

/* Why the cooperative-matrix kernel cannot run an exact problem (into why); false when it can. */
static bool coopmat_unavailable(const vk_ctx *vc, const qattn_problem *p, char *why, size_t len)
{
    const vk_device_caps *caps = vc->caps;
    const uint32_t D = (uint32_t)p->head_dim, smem = caps->props.limits.maxComputeSharedMemorySize;
    if (!vk_spirv_find("attn_coopmat"))
        snprintf(why, len, "the library was built without cooperative-matrix shaders");
    else if (!vc->use_coopmat)
        snprintf(why, len, "QATTN_VULKAN_COOPMAT=0");
    else if (!caps->coopmat_f16_16x16x16)
        snprintf(why, len, "the device enumerates no 16x16x16 fp16/fp32 cooperative matrix");
    else if (!caps->float16 || !caps->memory_model || !caps->subgroup_shuffle || caps->api_version < VK_API_VERSION_1_3)
        snprintf(why, len,
                 "the device lacks fp16 arithmetic, the Vulkan memory model with device scope, subgroup shuffles or "
                 "Vulkan 1.3");
    else if (p->in_dtype != QATTN_DTYPE_F16)
        snprintf(why, len, "%s inputs (the cooperative-matrix kernel reads f16)", qattn_dtype_name(p->in_dtype));
    else if (D != 64 && D != 128)
        snprintf(why, len, "head dim %u (the cooperative-matrix kernel has 64 and 128)", D);
    else if (!(caps->subgroup_size_control && caps->full_subgroups && caps->required_size_in_compute &&
               caps->min_subgroup <= 32 && caps->max_subgroup >= 32) &&
             caps->subgroup_size != 32)
        snprintf(why, len, "subgroups of 32 cannot be required on this device");
    else if (smem < 40u * 1024u)
        snprintf(why, len, "%u bytes of shared memory (it needs 40 KiB)", smem);
    else
        return false;
    return true;
}

/* What the problem asks of the device that the backend cannot give: dtypes, head dim, buffer sizes, 32-bit rows. */
static qattn_status check_problem(qattn_ctx *ctx, const vk_device_caps *caps, const qattn_problem *p)
{
    const uint64_t max_buffer = ctx->device_info.max_buffer_bytes;
    if (p->in_dtype != QATTN_DTYPE_F16 && p->in_dtype != QATTN_DTYPE_BF16 && p->in_dtype != QATTN_DTYPE_F32)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "the vulkan backend takes f16, bf16 or f32 inputs, not %s",
                               qattn_dtype_name(p->in_dtype));
    if (p->out_dtype != QATTN_DTYPE_F16 && p->out_dtype != QATTN_DTYPE_BF16 && p->out_dtype != QATTN_DTYPE_F32)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "the vulkan backend writes f16, bf16 or f32 outputs, not %s",
                               qattn_dtype_name(p->out_dtype));
    if (p->head_dim % 16 != 0 || p->head_dim > 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the vulkan backend (multiples of 16 up to 256)",
                               (long long)p->head_dim);
    const size_t extents[] = {p->q_bytes, p->k_bytes, p->v_bytes, p->o_bytes, p->lse_bytes};
    const char *names[] = {"q", "k", "v", "o", "lse"};
    for (int i = 0; i < 5; i++)
        if (extents[i] > max_buffer)
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "%s spans %zu bytes, more than the %llu bytes one Vulkan storage buffer holds on %s",
                                   names[i], extents[i], (unsigned long long)max_buffer, caps->props.deviceName);
    if (p->batch * p->heads_q > UINT32_MAX / 2 || p->seq_q > INT32_MAX || p->seq_k > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "the vulkan backend indexes rows with 32-bit integers");
    return QATTN_OK;
}

qattn_status vk_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    vk_ctx *vc = ctx->impl;
    const vk_device_caps *caps = vc->caps;
    const qattn_problem *p = &plan->problem;
    qattn_status s = check_problem(ctx, caps, p);
    if (s)
        return s;

    /* Precision. */
    switch (plan->precision) {
    case QATTN_PRECISION_AUTO:
        plan->precision = QATTN_PRECISION_EXACT;
        snprintf(plan->why, sizeof(plan->why),
                 "auto chose exact: the Vulkan INT8 kernel is the scalar one (no INT8 cooperative-matrix kernel yet), "
                 "so quantizing buys no speed.");
        break;
    case QATTN_PRECISION_INT8_FP8:
    case QATTN_PRECISION_INT8_FP8_F16ACC:
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "%s needs FP8 E4M3 arithmetic: the vulkan backend has no FP8 kernels (device %s %s "
                               "VK_EXT_shader_float8); use int8_fp16 or exact",
                               qattn_precision_name(plan->precision), caps->props.deviceName,
                               caps->float8_ext ? "offers" : "lacks");
    default:
        snprintf(plan->why, sizeof(plan->why), "%s as requested.", qattn_precision_name(plan->precision));
        break;
    }
    const bool quant = plan->precision == QATTN_PRECISION_INT8_FP16;
    if (quant) {
        if (plan->granularity == QATTN_GRANULARITY_DEFAULT)
            plan->granularity = QATTN_GRANULARITY_PER_WARP;
        /* The CPU backend's geometry, so its reference quantization is ours bit for bit. */
        qattn_quant_defaults(&plan->quant, plan->precision, plan->granularity, 128, 32, 64, plan->quant.smooth_k);
    }

    /* Kernel variant. */
    const uint32_t D = (uint32_t)p->head_dim;
    const uint32_t smem = caps->props.limits.maxComputeSharedMemorySize;
    char no_coopmat[160] = "";
    const bool sparse = plan->sparse.enabled;
    if (sparse)
        snprintf(no_coopmat, sizeof(no_coopmat), "sparse plans run the scalar kernel (the cooperative-matrix kernel "
                 "has no sparse path yet)");
    const bool coopmat = !quant && !sparse && !coopmat_unavailable(vc, p, no_coopmat, sizeof(no_coopmat));
    bool emulated = false;
#ifdef QATTN_VK_FORCE_EMULATED_COOPMAT
    /* Test builds: run the cooperative-matrix kernel's logic with emulated
     * matrix operations where the device has no matrix units (lavapipe). */
    if (!coopmat && !quant && !sparse && p->in_dtype == QATTN_DTYPE_F16 && (D == 64 || D == 128) && caps->subgroup_shuffle &&
        caps->subgroup_size >= 8 && caps->subgroup_size <= 64 && smem >= 32u * 1024u) {
        emulated = true;
        snprintf(no_coopmat, sizeof(no_coopmat), "emulated cooperative matrices (test build)");
    }
#endif
    uint32_t br = 0, bc = 0;
    if (coopmat || emulated) {
        br = 64;                /* 4 subgroups x 16 rows */
        bc = emulated ? 32 : QATTN_VK_COOPMAT_BC; /* the emulation's scratch must fit lavapipe's 32 KiB */
    } else if (!scalar_tiles(D, smem, &br, &bc)) {
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %u needs more than the %u bytes of shared memory device %s offers", D, smem,
                               caps->props.deviceName);
    }
    plan->q_tile = (int)br;
    plan->kv_tile = (int)bc;
    plan->status_word = p->check_finite;
    plan->backend_workspace = 0;
    const qattn_sparse_problem *sp = &plan->sparse;
    if (sp->layout == QATTN_SPARSE_PREDICT) {
        if (sp->k_blocks > VK_PREDICT_MAX_KB)
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "the vulkan backend predicts layouts of up to %d key blocks a row, not %lld (use a "
                                   "larger k_block)",
                                   VK_PREDICT_MAX_KB, (long long)sp->k_blocks);
        /* The selection's scratch: each row's block weights, then its visible count. */
        plan->backend_workspace = (size_t)sp->rows * (size_t)sp->k_blocks * 4 + (size_t)sp->rows * 4;
    }
    snprintf(plan->kernel, sizeof(plan->kernel), "vulkan_%s_%s_d%u",
             coopmat ? "coopmat" : emulated ? "coopmat_emulated" : "scalar", qattn_precision_name(plan->precision), D);
    size_t used = strlen(plan->why);
    if (emulated)
        snprintf(plan->why + used, sizeof(plan->why) - used, " Cooperative-matrix kernel with %s.", no_coopmat);
    else if (!quant && !coopmat)
        snprintf(plan->why + used, sizeof(plan->why) - used, " Scalar kernel: %s.", no_coopmat);
    else if (quant)
        snprintf(plan->why + used, sizeof(plan->why) - used, " INT8 Q.K with %s.",
                 caps->int_dot && vk_spirv_find("attn_scalar_intdot") ? "packed integer dot products"
                                                                      : "unpacked 8-bit integer products");
    used = strlen(plan->why);
    if (sparse && quant)
        snprintf(plan->why + used, sizeof(plan->why) - used, " Sparse: the scalar kernel walks the layout per tile.");
    used = strlen(plan->why);
    if (sparse && sp->pv_threshold > 0.f && br < QATTN_SPARSE_PV_GROUP)
        snprintf(plan->why + used, sizeof(plan->why) - used,
                 " pv_threshold decides per %u rows (the tile; shared memory allows no 16-row tile).", br);
    vk_plan *vp = calloc(1, sizeof(*vp));
    if (!vp)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the plan");
    vp->coopmat = coopmat;
    vp->emulated = emulated;
    plan->impl = vp;
    return QATTN_OK;
}

/* The plan's constants for the shaders, from the problem and the workspace layout. */
static void fill_params(const qattn_plan *plan, vk_params *pr)
{
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    pr->batch = (uint32_t)p->batch;
    pr->heads_q = (uint32_t)p->heads_q;
    pr->heads_kv = (uint32_t)p->heads_kv;
    pr->seq_q = (uint32_t)p->seq_q;
    pr->seq_k = (uint32_t)p->seq_k;
    pr->head_dim = (uint32_t)p->head_dim;
    pr->group = (uint32_t)p->group;
    pr->causal_shift = (int32_t)(p->seq_k - p->seq_q);
    pr->q_sb = vk_stride32(p->batch, p->q_stride[0]);
    pr->q_sh = vk_stride32(p->heads_q, p->q_stride[1]);
    pr->q_sn = vk_stride32(p->seq_q, p->q_stride[2]);
    pr->k_sb = vk_stride32(p->batch, p->k_stride[0]);
    pr->k_sh = vk_stride32(p->heads_kv, p->k_stride[1]);
    pr->k_sn = vk_stride32(p->seq_k, p->k_stride[2]);
    pr->v_sb = vk_stride32(p->batch, p->v_stride[0]);
    pr->v_sh = vk_stride32(p->heads_kv, p->v_stride[1]);
    pr->v_sn = vk_stride32(p->seq_k, p->v_stride[2]);
    pr->o_sb = vk_stride32(p->batch, p->o_stride[0]);
    pr->o_sh = vk_stride32(p->heads_q, p->o_stride[1]);
    pr->o_sn = vk_stride32(p->seq_q, p->o_stride[2]);
    pr->qk_scale_log2 = (float)((double)p->sm_scale * QATTN_LOG2E);
    pr->sm_scale = p->sm_scale;
    size_t regions[] = {L->q_i8, L->k_i8, L->v_q, L->q_scale, L->k_scale, L->k_mean, L->q_kmean, L->status};
    uint32_t *dst[] = {&pr->ws_q_i8, &pr->ws_k_i8, &pr->ws_v_q, &pr->ws_q_scale,
                       &pr->ws_k_scale, &pr->ws_k_mean, &pr->ws_q_kmean, &pr->ws_status};
    for (int i = 0; i < 8; i++)
        *dst[i] = regions[i] == QATTN_WS_ABSENT ? 0u : (uint32_t)regions[i];
    if (plan->precision != QATTN_PRECISION_EXACT) {
        pr->q_block = (uint32_t)plan->quant.q_block;
        pr->q_interleave = (uint32_t)plan->quant.q_interleave;
        pr->k_block = (uint32_t)plan->quant.k_block;
        pr->k_interleave = (uint32_t)plan->quant.k_interleave;
        pr->q_groups = (uint32_t)L->q_groups;
        pr->k_groups = (uint32_t)L->k_groups;
        pr->smooth_k = plan->quant.smooth_k;
    }
    pr->check_finite = p->check_finite;
    pr->return_lse = p->return_lse;
    pr->q_tiles = (uint32_t)qattn_ceil_div(p->seq_q, plan->q_tile);

    const qattn_sparse_problem *sp = &plan->sparse;
    if (sp->enabled) {
        /* Window bounds of 2^32 - 1 or more bound nothing (positions are below 2^31). */
        pr->sp_window = sp->window;
        pr->sp_left = sp->window_left < 0 || sp->window_left >= UINT32_MAX ? UINT32_MAX : (uint32_t)sp->window_left;
        pr->sp_right = sp->window_right < 0 || sp->window_right >= UINT32_MAX ? UINT32_MAX : (uint32_t)sp->window_right;
        pr->sp_sinks = (uint32_t)qattn_min_i64(sp->sink_tokens, p->seq_k);
        pr->pv_limit = exp2f(-sp->pv_threshold);
    }
    if (sp->layout != QATTN_SPARSE_NO_LAYOUT) {
        pr->sp_q_block = (uint32_t)sp->q_block;
        pr->sp_k_block = (uint32_t)sp->k_block;
        pr->sp_q_blocks = (uint32_t)sp->q_blocks;
        pr->sp_k_blocks = (uint32_t)sp->k_blocks;
    }
    if (sp->layout == QATTN_SPARSE_PREDICT) {
        pr->sp_ptr = (uint32_t)L->sparse_counts;
        pr->sp_idx = (uint32_t)L->sparse_indices;
        pr->sp_stride = (uint32_t)sp->k_blocks;
        pr->sp_q_pool = (uint32_t)L->sparse_q_pool;
        pr->sp_k_pool = (uint32_t)L->sparse_k_pool;
        pr->sp_q_sim = (uint32_t)L->sparse_q_sim;
        pr->sp_k_sim = (uint32_t)L->sparse_k_sim;
        pr->sp_counts = (uint32_t)L->sparse_counts;
        pr->sp_density = (uint32_t)L->sparse_density;
        pr->sp_sim_threshold = sp->sim_threshold;
        pr->sp_cdf_threshold = sp->cdf_threshold;
        pr->sp_topk = sp->topk;
        pr->sp_sink_blocks = (uint32_t)qattn_min_i64(sp->sink_blocks, sp->k_blocks);
        pr->sp_recent_blocks = (uint32_t)qattn_min_i64(sp->recent_blocks, sp->k_blocks);
        pr->sp_last_q_blocks = (uint32_t)qattn_min_i64(sp->last_q_blocks, sp->q_blocks);
        pr->sp_weights = (uint32_t)L->backend;
        pr->sp_tally = (uint32_t)(L->backend + (size_t)sp->rows * (size_t)sp->k_blocks * 4);
    }
}

static qattn_status add_dispatch(qattn_ctx *ctx, vk_ctx *vc, vk_plan *vp, const char *shader, const uint32_t *spec,
                                 uint32_t required_subgroup, uint32_t gx, uint32_t gy, uint32_t arg0, bool barrier)
{
    vk_pipeline_key key = {.shader = shader, .spec_count = SPEC_COUNT, .required_subgroup = required_subgroup};
    memcpy(key.spec, spec, SPEC_COUNT * sizeof(uint32_t));
    vk_planned_dispatch *d = &vp->d[vp->count];
    qattn_status s = vk_pipeline_get(ctx, vc, &key, &d->pipeline);
    if (s)
        return s;
    d->grid[0] = gx ? gx : 1;
    d->grid[1] = gy ? gy : 1;
    d->arg0 = arg0;
    d->barrier_before = barrier;
    vp->count++;
    return QATTN_OK;
}

/* The run's dispatches: [finite scan of q, k, v] -> [K mean, K, V, Q quantization] -> attention. */
static qattn_status plan_dispatches(qattn_ctx *ctx, vk_ctx *vc, const qattn_plan *plan, vk_plan *vp)
{
    const vk_device_caps *caps = vc->caps;
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    const bool coopmat = vp->coopmat, emulated = vp->emulated;
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;
    const uint32_t D = vp->params.head_dim, cap = 65535;
    uint32_t spec[SPEC_COUNT] = {
        [SPEC_D] = D,
        [SPEC_IN_DTYPE] = (uint32_t)p->in_dtype,
        [SPEC_OUT_DTYPE] = (uint32_t)p->out_dtype,
        [SPEC_BR] = (uint32_t)plan->q_tile,
        [SPEC_BC] = (uint32_t)plan->kv_tile,
        [SPEC_QUANT] = quant,
        [SPEC_CAUSAL] = p->causal,
        [SPEC_SUBGROUP] = coopmat ? 32 : caps->subgroup_size,
        [SPEC_PREFETCH] = QATTN_VK_COOPMAT_PREFETCH,
        [SPEC_SPARSE] = !plan->sparse.enabled ? 0u : plan->sparse.layout == QATTN_SPARSE_NO_LAYOUT ? 1u : 2u,
        [SPEC_PV] = plan->sparse.enabled && plan->sparse.pv_threshold > 0.f,
    };
    uint64_t bhq = (uint64_t)p->batch * (uint64_t)p->heads_q, bhk = (uint64_t)p->batch * (uint64_t)p->heads_kv;
    qattn_status s = QATTN_OK;
    if (p->check_finite) {
        uint64_t qe = (uint64_t)p->seq_q * (uint64_t)D, ke = (uint64_t)p->seq_k * (uint64_t)D;
        s = add_dispatch(ctx, vc, vp, "finite", spec, 0, vk_min_u32((qe + 2047) / 2048, cap), vk_min_u32(bhq, cap), 0,
                         false);
        if (!s)
            s = add_dispatch(ctx, vc, vp, "finite", spec, 0, vk_min_u32((ke + 2047) / 2048, cap),
                             vk_min_u32(bhk, cap), 1, false);
        if (!s)
            s = add_dispatch(ctx, vc, vp, "finite", spec, 0, vk_min_u32((ke + 2047) / 2048, cap),
                             vk_min_u32(bhk, cap), 2, false);
    }
    if (!s && quant) {
        if (plan->quant.smooth_k)
            s = add_dispatch(ctx, vc, vp, caps->float64 && vk_spirv_find("kmean_f64") ? "kmean_f64" : "kmean", spec, 0,
                             D / 16, vk_min_u32(bhk, cap), 0, true);
        /* After the K mean, which it reads; without smooth K after the finite
         * scans: their status word and the codes are disjoint parts of the
         * workspace, but synchronization validation sees one binding (one
         * barrier more, only without smooth K). */
        if (!s)
            s = add_dispatch(ctx, vc, vp, "quant_rows", spec, 0, vk_min_u32((uint64_t)L->k_groups, cap),
                             vk_min_u32(bhk, cap), 1, true);
        if (!s)
            s = add_dispatch(ctx, vc, vp, "quant_v16", spec, 0,
                             vk_min_u32(((uint64_t)p->seq_k * D / 2 + 255) / 256, cap), vk_min_u32(bhk, cap), 0, false);
        if (!s)
            s = add_dispatch(ctx, vc, vp, "quant_rows", spec, 0, vk_min_u32((uint64_t)L->q_groups, cap),
                             vk_min_u32(bhq, cap), 0, false);
    }
    if (!s && plan->sparse.layout == QATTN_SPARSE_PREDICT) {
        /* The prediction (shaders/sparse_predict.comp): pool Q and K blocks, select each row, densities. */
        const qattn_sparse_problem *sp = &plan->sparse;
        s = add_dispatch(ctx, vc, vp, "sparse_predict", spec, 0, vk_min_u32((uint64_t)sp->q_blocks, cap),
                         vk_min_u32(bhq, cap), 0, true);
        if (!s)
            s = add_dispatch(ctx, vc, vp, "sparse_predict", spec, 0, vk_min_u32((uint64_t)sp->k_blocks, cap),
                             vk_min_u32(bhk, cap), 1, true);
        if (!s)
            s = add_dispatch(ctx, vc, vp, "sparse_predict", spec, 0, vk_min_u32((uint64_t)sp->q_blocks, cap),
                             vk_min_u32(bhk, cap), 2, true);
        if (!s)
            s = add_dispatch(ctx, vc, vp, "sparse_predict", spec, 0, vk_min_u32(bhk, cap), 1, 3, true);
    }
    if (!s) {
        const char *shader = coopmat    ? "attn_coopmat"
                             : emulated ? "attn_coopmat_emu"
                             : quant && caps->int_dot && vk_spirv_find("attn_scalar_intdot") ? "attn_scalar_intdot"
                                                                                               : "attn_scalar";
        /* The matrix kernels need whole subgroups of the size they were specialized for. */
        uint32_t sg = (coopmat || emulated) && caps->subgroup_size_control && caps->required_size_in_compute &&
                              caps->full_subgroups
                          ? spec[SPEC_SUBGROUP]
                          : 0;
        s = add_dispatch(ctx, vc, vp, shader, spec, sg, vk_min_u32(vp->params.q_tiles, cap), vk_min_u32(bhq, cap), 0,
                         true);
        if (!s)
            vp->d[vp->count - 1].arg1_count = plan->sparse.layout == QATTN_SPARSE_BLOCKS;
    }
    return s;
}

/* The plan's device objects: parameters, descriptor set, pipelines; they
 * need the workspace layout, which the core makes after plan_init. On
 * failure the core calls vk_plan_release, which frees what was made. */
qattn_status vk_plan_finish(qattn_ctx *ctx, qattn_plan *plan)
{
    vk_ctx *vc = ctx->impl;
    vk_plan *vp = plan->impl;
    fill_params(plan, &vp->params);
    if (plan->ws.total > ctx->device_info.max_buffer_bytes)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the workspace (%zu bytes) exceeds the %llu bytes one Vulkan storage buffer holds",
                               plan->ws.total, (unsigned long long)ctx->device_info.max_buffer_bytes);
    qattn_status s = vk_mem_create(ctx, vc, sizeof(vk_params), vc->device_local_type, false, &vp->params_buf,
                                   "plan parameter buffer");
    if (!s)
        s = vk_staged_copy(ctx, vc, vp->params_buf.buffer, 0, &vp->params, sizeof(vk_params), VK_COPY_UP, 0);
    if (!s) {
        const VkDescriptorPoolSize sizes[2] = {{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, VK_BINDINGS - 1},
                                               {VK_DESCRIPTOR_TYPE_UNIFORM_BUFFER, 1}};
        s = vk_descriptor_set_create(ctx, vc, vc->set_layout, sizes, 2, "", &vp->pool, &vp->set);
    }
    if (!s)
        s = plan_dispatches(ctx, vc, plan, vp);
    return s;
}

void vk_plan_release(qattn_ctx *ctx, qattn_plan *plan)
{
    vk_ctx *vc = ctx->impl;
    vk_plan *vp = plan->impl;
    if (!vp)
        return;
    if (vp->pool)
        vc->vk.vkDestroyDescriptorPool(vc->device, vp->pool, NULL);
    vk_mem_destroy(vc, &vp->params_buf);
    free(vp);
    plan->impl = NULL;
}

/* ------------------------------------------------------------------- runs */

/* Points the plan's descriptor set at the run's buffers (a BLOCKS plan's
 * layout at bindings 7 and 8; other plans bind q there, unread). Under vc->lock. */
static void bind_run(vk_ctx *vc, const vk_plan *vp, const qattn_run_bound *run)
{
    const qattn_buffer *ptr = run->block_indptr ? run->block_indptr : run->q;
    const qattn_buffer *bufs[VK_BINDINGS] = {run->q, run->k, run->v, run->o,
                                             run->lse ? run->lse : run->o,
                                             run->workspace ? run->workspace : run->q, NULL, ptr,
                                             run->block_indices ? run->block_indices : ptr};
    VkDescriptorBufferInfo infos[VK_BINDINGS];
    VkWriteDescriptorSet writes[VK_BINDINGS];
    for (int i = 0; i < VK_BINDINGS; i++) {
        VkBuffer b = i != VK_UNIFORM_BINDING ? vk_buffer_handle(bufs[i]) : vp->params_buf.buffer;
        infos[i] = (VkDescriptorBufferInfo){.buffer = b, .offset = 0, .range = VK_WHOLE_SIZE};
        writes[i] = (VkWriteDescriptorSet){.sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, .dstSet = vp->set,
                                           .dstBinding = (uint32_t)i, .descriptorCount = 1,
                                           .descriptorType = i == VK_UNIFORM_BINDING ? VK_DESCRIPTOR_TYPE_UNIFORM_BUFFER
                                                                                     : VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                           .pBufferInfo = &infos[i]};
    }
    vc->vk.vkUpdateDescriptorSets(vc->device, VK_BINDINGS, writes, 0, NULL);
}

qattn_status vk_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
{
    vk_ctx *vc = ctx->impl;
    const qattn_problem *p = &plan->problem;
    if (run->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the vulkan backend");
    const vk_plan *vp = plan->impl;

    const size_t in_es = qattn_dtype_size(p->in_dtype), out_es = qattn_dtype_size(p->out_dtype);
    vk_push push = {
        .q_off = (uint32_t)(run->q_offset / in_es),
        .k_off = (uint32_t)(run->k_offset / in_es),
        .v_off = (uint32_t)(run->v_offset / in_es),
        .o_off = (uint32_t)(run->o_offset / out_es),
        .lse_off = (uint32_t)(run->lse_offset / 4),
        .ws_off = (uint32_t)run->workspace_offset,
    };
    VkBuffer ws = vk_buffer_handle(run->workspace);
    VkDeviceSize status_at = run->workspace_offset + plan->ws.status;
    uint32_t words[QATTN_STATUS_WORDS] = {0};

    pthread_mutex_lock(&vc->lock);
    bind_run(vc, vp, run);
    qattn_status s = vk_begin(ctx, vc);
    if (!s) {
        if (p->check_finite)
            vk_status_clear(vc, ws, status_at);
        vc->vk.vkCmdBindDescriptorSets(vc->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vc->pipeline_layout, 0, 1, &vp->set,
                                       0, NULL);
        for (int i = 0; i < vp->count; i++) {
            const vk_planned_dispatch *d = &vp->d[i];
            if (d->barrier_before && i > 0)
                vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
            push.arg0 = d->arg0;
            push.arg1 = d->arg1_count ? (uint32_t)run->block_count : 0u;
            vk_record_dispatch(vc, vc->pipeline_layout, d->pipeline, &push, sizeof(push), d->grid);
        }
        if (p->check_finite)
            vk_read_status_back(vc, ws, status_at);
        s = vk_submit_wait(ctx, vc);
        if (!s && p->check_finite)
            vk_status_words(vc, words);
    }
    pthread_mutex_unlock(&vc->lock);
    if (s)
        return s;
    if (words[QATTN_STATUS_NONFINITE])
        return qattn_nonfinite_error(ctx, words[QATTN_STATUS_NONFINITE]);
    return QATTN_OK;
}
