/*
 * Dense attention on the CUDA backend: which modes and head dims run on which
 * compute capability, the kernel variant and quantization geometry (no CUDA
 * calls, so both runtimes plan alike), and the run, which enqueues the
 * plan's kernels through the runtime and reads the status words back.
 */
#include <stdio.h>
#include <string.h>

#include "cuda_internal.h"
#include "env.h"

qa_scratch qa_scratch_layout(const qattn_problem *p)
{
    qa_scratch s;
    s.chunk_tokens = QA_STATS_TOKENS;
    s.chunks = (int)((p->seq_k + s.chunk_tokens - 1) / s.chunk_tokens);
    size_t per_chunk = (size_t)p->batch * (size_t)p->heads_kv * (size_t)s.chunks * (size_t)p->head_dim;
    s.part_sum = 0;
    s.part_amax = qattn_round_up(per_chunk * sizeof(double), 256);
    s.v_inv = s.part_amax + qattn_round_up(per_chunk * sizeof(float), 256);
    s.total = s.v_inv + qattn_round_up((size_t)p->batch * (size_t)p->heads_kv * (size_t)p->head_dim * sizeof(float), 256);
    return s;
}

static const qa_plan_info plan_infos[4] = {{.fp8_on_f16_mma = 0, .wgmma = 0, .tma = 0},
                                                {.fp8_on_f16_mma = 1, .wgmma = 0, .tma = 0},
                                                {.fp8_on_f16_mma = 0, .wgmma = 1, .tma = 0},
                                                {.fp8_on_f16_mma = 0, .wgmma = 1, .tma = 1}};

/* Whether FP8 P.V runs on the fp16 mma for compute capability cc. */
static bool fp8_on_f16_mma(int cc) { return cc >= 90 && cc < 100; }

int qa_supports(int cc, qattn_precision precision)
{
    switch (precision) {
    case QATTN_PRECISION_AUTO:
    case QATTN_PRECISION_EXACT:
    case QATTN_PRECISION_INT8_FP16: return cc >= 80;
    case QATTN_PRECISION_INT8_FP8:
    case QATTN_PRECISION_INT8_FP8_F16ACC: return cc >= 89; /* mma.sync e4m3 needs sm_89 */
    }
    return 0;
}

qattn_status qa_plan_dense(qattn_ctx *ctx, qattn_plan *plan, int cc, int sm90a_kernels)
{
    const qattn_problem *p = &plan->problem;
    if (cc < 80)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the cuda backend needs compute capability 8.0 or newer, this device is %d.%d", cc / 10,
                               cc % 10);
    if (p->head_dim != 64 && p->head_dim != 128 && p->head_dim != 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the cuda backend (64 and 128 are; 256 with exact "
                               "precision on sm_90)",
                               (long long)p->head_dim);
    if (p->seq_q > INT32_MAX - 2 * QA_BLOCK_M || p->seq_k > INT32_MAX - 4 * QA_BLOCK_N ||
        p->batch * p->heads_q > INT32_MAX / 2)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the cuda backend indexes tokens and heads with 32-bit integers (Nq=%lld Nk=%lld "
                               "B*Hq=%lld)",
                               (long long)p->seq_q, (long long)p->seq_k, (long long)(p->batch * p->heads_q));
    long long q_tiles = (p->seq_q + QA_BLOCK_M - 1) / QA_BLOCK_M;
    if (q_tiles * p->batch * p->heads_q > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "too many query tiles for one CUDA grid");

    if (plan->precision == QATTN_PRECISION_AUTO) {
        /* The fastest mode at the quantized accuracy bar, as measured: FP8 P.V
         * where mma.sync has FP8 tensor cores (sm_89, and newer GPUs running
         * the compute_90 PTX). On sm_90 ptxas lowers mma.sync e4m3 to fp16
         * HMMA (no QMMA in the SASS), so INT8 Q.K with fp16 P.V is faster
         * there (H200, bench/NOTES.md, CUDA section) and more accurate. The
         * sm_90a wgmma FP8 kernel is faster again at N >= 4k (not at 1k) but
         * its E4M3 P and V keep it below cos 0.9995 / relL1 0.03 on randn
         * data, the bar INT8_FP16 meets: a faster but less accurate variant
         * is not the default there. */
        bool fp8_fast = cc == 89 || cc >= 100;
        plan->precision = fp8_fast ? QATTN_PRECISION_INT8_FP8 : QATTN_PRECISION_INT8_FP16;
        snprintf(plan->why, sizeof(plan->why), "auto chose %s: the fastest mode at the quantized accuracy bar on sm_%d (%s).",
                 qattn_precision_name(plan->precision), cc,
                 cc >= 100  ? "FP8 P.V tensor cores"
                 : cc == 89 ? "INT8 Q.K and FP8 P.V tensor cores"
                 : cc == 90 ? (sm90a_kernels ? "INT8 Q.K with fp16 P.V on wgmma meets the cos 0.9995 / relL1 0.03 "
                                              "bar; FP8 P.V is faster at long sequences but its E4M3 P and V stay "
                                              "below it"
                                            : "mma.sync FP8 runs on the fp16 units on Hopper, so fp16 P.V is faster")
                            : "no FP8 tensor cores below sm_89");
    } else {
        snprintf(plan->why, sizeof(plan->why), "%s as requested.", qattn_precision_name(plan->precision));
    }
    if (!qa_supports(cc, plan->precision))
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "precision %s needs FP8 tensor cores (compute capability 8.9 or newer); this device "
                               "is %d.%d",
                               qattn_precision_name(plan->precision), cc / 10, cc % 10);
    if (plan->precision == QATTN_PRECISION_EXACT && p->in_dtype == QATTN_DTYPE_F32)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "exact precision with f32 inputs is not supported by the cuda backend (its tensor "
                               "cores take f16 or bf16; convert the inputs, or use a quantized precision)");

    /* EXACT through the TMA kernel reads the caller's tensors with the copy
     * engine: 16-byte aligned rows, which the core checks for this backend
     * (tensor_alignment) before any plan. */
    const bool exact_tma = plan->precision == QATTN_PRECISION_EXACT && cc == 90 && sm90a_kernels;
    if (p->head_dim == 256 && !exact_tma)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim 256 on the cuda backend needs exact precision on an sm_90 GPU with the sm_90a "
                               "kernels built (this plan: %s precision, compute capability %d.%d%s)",
                               qattn_precision_name(plan->precision), cc / 10, cc % 10,
                               sm90a_kernels ? "" : ", the sm_90a kernels not built or off (QATTN_CUDA_WGMMA=0)");
    bool quantized = plan->precision != QATTN_PRECISION_EXACT;
    if (quantized) {
        if (plan->granularity == QATTN_GRANULARITY_DEFAULT)
            plan->granularity = QATTN_GRANULARITY_PER_WARP; /* SageAttention2's default */
        qattn_quant_defaults(&plan->quant, plan->precision, plan->granularity, QA_BLOCK_M, QA_WARP_M,
                             QA_BLOCK_N, plan->quant.smooth_k);
        /* On the fp16 mma the fp16 accumulation happens after every 16 keys
         * (m16n8k16 steps), not 32: report the chunk the kernel really uses. */
        if (plan->precision == QATTN_PRECISION_INT8_FP8_F16ACC && fp8_on_f16_mma(cc) && !sm90a_kernels)
            plan->quant.pv_f16_chunk = 16;
        plan->backend_workspace = qa_scratch_layout(p).total;
    } else {
        plan->backend_workspace = 0;
    }
    bool fp8 = plan->precision == QATTN_PRECISION_INT8_FP8 || plan->precision == QATTN_PRECISION_INT8_FP8_F16ACC;
    /* sm_90 with the wgmma kernels: FP8 P.V at the FP8 tensor rate; otherwise
     * the mma.sync kernels (fp16 units on sm_90). */
    /* The TMA kernels' coordinates are 32-bit row indices over all heads. */
    const bool rows_fit_int32 = p->batch * p->heads_q * (p->seq_q + QA_BLOCK_M) < INT32_MAX &&
                                p->batch * p->heads_kv * (p->seq_k + 2 * QA_BLOCK_N) < INT32_MAX;
    const bool i8f16_tma = plan->precision == QATTN_PRECISION_INT8_FP16 && cc == 90 && sm90a_kernels && rows_fit_int32;
    const bool wgmma = ((fp8 || plan->precision == QATTN_PRECISION_EXACT) && cc == 90 && sm90a_kernels) || i8f16_tma;
    const bool on_f16 = fp8 && fp8_on_f16_mma(cc) && !wgmma;
    /* The TMA kernel's K tensor map runs over the keys of all heads in units
     * of 16 (see hopper/sm90_attn_ws.cuh), and its coordinates are 32-bit. */
    const bool tma = exact_tma || i8f16_tma || (wgmma && fp8 && p->seq_k % 16 == 0 && rows_fit_int32);
    plan->impl = (void *)&plan_infos[tma ? 3 : wgmma ? 2 : on_f16 ? 1 : 0];
    /* F16ACC on the TMA kernel accumulates a whole 128-key step in fp16:
     * |V| <= 1.125 keeps 128 x 448 x 1.125 = 64512 below fp16's 65504 (the
     * 64-key kernels use 2.25, SageAttention2++'s bound for 64 keys). */
    if (tma && plan->precision == QATTN_PRECISION_INT8_FP8_F16ACC && p->head_dim <= 128)
        plan->quant.v_fp8_max = 1.125f;
    plan->q_tile = QA_BLOCK_M;
    /* The TMA kernels take 128 keys per online-softmax step at D <= 128
     * (hopper/: FP8, INT8_FP16 and EXACT alike; 64 at D = 256). */
    plan->kv_tile = tma && p->head_dim <= 128 ? 2 * QA_BLOCK_N : QA_BLOCK_N;
    plan->status_word = p->check_finite;
    static const char *const mode_names[] = {"auto", "exact", "int8_fp16", "int8_fp8", "int8_fp8_f16acc"};
    snprintf(plan->kernel, sizeof(plan->kernel), "cuda_%s_%s%s_d%lld_sm%d%s", tma ? "wgmma_tma" : wgmma ? "wgmma" : "mma",
             mode_names[plan->precision],
             plan->precision == QATTN_PRECISION_EXACT ? (p->in_dtype == QATTN_DTYPE_BF16 ? "_bf16" : "_f16")
             : fp8 ? (wgmma ? "_pv_e4m3" : on_f16 ? "_pv_f16mma" : "_pv_e4m3mma")
                   : "",
             (long long)p->head_dim, cc, wgmma ? "a" : "");
    if (wgmma) {
        size_t used = strlen(plan->why);
        const char *what =
            fp8 && tma ? " sm_90a wgmma kernel: INT8 Q.K and FP8 P.V from shared memory fed by a TMA producer "
                         "warpgroup, two consumer warpgroups of 64 query rows, 128-key steps, FP8 P.V accumulated "
                         "per step then added in fp32."
            : fp8      ? " sm_90a wgmma kernel: INT8 Q.K and FP8 P.V from shared memory, two warpgroups of 64 query "
                         "rows, FP8 P.V accumulated per 64-key tile then added in fp32 (cp.async loads: Nk is not a "
                         "multiple of 16)."
            : i8f16_tma ? " sm_90a wgmma kernel: INT8 Q.K (IGMMA) and fp16 P.V (HGMMA) fed by a TMA producer "
                          "warpgroup, two consumer warpgroups of 64 query rows, 128-key steps, fp32 accumulation."
                        : " sm_90a wgmma kernel fed by a TMA producer warpgroup, two consumer warpgroups of 64 "
                          "query rows, fp32 accumulation.";
        snprintf(plan->why + used, sizeof(plan->why) - used, "%s", what);
    }
    if (on_f16) {
        size_t used = strlen(plan->why);
        snprintf(plan->why + used, sizeof(plan->why) - used,
                 " FP8 P.V runs on the fp16 tensor cores here (sm_90 has no FP8 mma.sync): P and V are rounded to "
                 "E4M3 exactly as elsewhere and carried in fp16, which holds every E4M3 value.");
    }
    return QATTN_OK;
}

qattn_status qa_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    const qa_ctx *c = ctx->impl;
    qattn_env env; /* QATTN_CUDA_WGMMA=0 keeps sm_90 on the mma.sync kernels (testing them on Hopper) */
    qattn_env_read(&env, NULL);
    const qattn_sparse_problem *sp = &plan->sparse;
    if (sp->enabled && !env.cuda_sparse)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "sparse attention on the cuda backend is off until it has been measured on a GPU: "
                               "set QATTN_CUDA_SPARSE=1 to run it");
    /* The selection kernel holds a layout row's weights in shared memory (cuda_sparse.cu). */
    if (sp->enabled && sp->layout == QATTN_SPARSE_PREDICT && sp->k_blocks > QA_SPARSE_MAX_K_BLOCKS)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "predicted sparse layouts on the cuda backend take at most %d key blocks (this plan: "
                               "%lld; use a larger k_block)",
                               QA_SPARSE_MAX_K_BLOCKS, (long long)sp->k_blocks);
    qattn_status s = qa_plan_dense(ctx, plan, c->cc, c->rt->sm90a_kernels && env.cuda_wgmma);
    if (s)
        return s;
    /* Sparse plans run on the mma.sync kernels and the sm_90a TMA kernels;
     * the cp.async wgmma kernel (FP8 with Nk % 16 != 0) has no sparse form. */
    const qa_plan_info *info = plan->impl;
    if (sp->enabled && info->wgmma && !info->tma && (s = qa_plan_dense(ctx, plan, c->cc, 0)))
        return s;
    if (sp->enabled && sp->layout != QATTN_SPARSE_NO_LAYOUT) {
        const qattn_problem *p = &plan->problem;
        const double tiles = (double)p->batch * (double)p->heads_kv * (double)((p->seq_q + QA_BLOCK_M - 1) / QA_BLOCK_M);
        const double ksteps = (double)((p->seq_k + plan->kv_tile - 1) / plan->kv_tile);
        if (tiles * ksteps * 12.0 > (double)(SIZE_MAX / 4) || tiles > INT32_MAX)
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "the sparse step lists of this problem (%.0f query tiles x %.0f key steps) are too "
                                   "large for the cuda backend",
                                   tiles, ksteps);
        plan->backend_workspace = qa_sparse_lists_layout(plan, plan->backend_workspace).total;
    }
    if ((s = qa_enter(ctx)))
        return s;
    if (c->rt->dense_prepare(plan)) {
        int e = c->rt->last_error();
        return qa_fail(ctx, e ? e : 1, "setting the attention kernel's shared-memory limit (cudaFuncSetAttribute)");
    }
    return QATTN_OK;
}

qattn_status qa_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
{
    const qattn_problem *p = &plan->problem;
    const qa_rt *rt = qa_rt_of(ctx);
    qattn_status s = qa_enter(ctx);
    if (s)
        return s;
    const qa_dense_args args = {
        .q = (const char *)run->q->impl + run->q_offset,
        .k = (const char *)run->k->impl + run->k_offset,
        .v = (const char *)run->v->impl + run->v_offset,
        .o = (char *)run->o->impl + run->o_offset,
        .lse = run->lse ? (float *)((char *)run->lse->impl + run->lse_offset) : NULL,
        .ws = run->workspace ? (char *)run->workspace->impl + run->workspace_offset : NULL,
        .block_indptr = run->block_indptr ? (const int32_t *)run->block_indptr->impl : NULL,
        .block_indices = run->block_indices ? (const int32_t *)run->block_indices->impl : NULL,
        .block_count = run->block_count,
    };
    const struct {
        const char *name;
        const void *ptr;
        size_t align;
    } ptrs[] = {{"q", args.q, QA_ALIGN}, {"k", args.k, QA_ALIGN},   {"v", args.v, QA_ALIGN},
                {"o", args.o, QA_ALIGN}, {"lse", args.lse, 4}, {"workspace", args.ws, QATTN_WS_ALIGN}};
    for (size_t i = 0; i < sizeof(ptrs) / sizeof(ptrs[0]); i++)
        if (ptrs[i].ptr && (uintptr_t)ptrs[i].ptr % ptrs[i].align)
            return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                                   "args.%s starts at device address %p, which is not %zu-byte aligned (the cuda "
                                   "backend copies rows 16 bytes at a time; check wrapped pointers)",
                                   ptrs[i].name, ptrs[i].ptr, ptrs[i].align);

    const char *failed = rt->dense_enqueue(plan, &args, run->stream);
    if (failed) {
        int e = rt->last_error();
        if (e && rt->explain(e).sticky)
            return qa_fail(ctx, e, failed);
        return qattn_set_error(ctx, QATTN_ERR_BACKEND, "%s", failed);
    }
    if (p->check_finite) {
        /* The kernels skipped writing the outputs if a word is set. */
        uint32_t words[QATTN_STATUS_WORDS];
        int e = rt->read_sync(words, (const char *)args.ws + plan->ws.status, QATTN_STATUS_BYTES, run->stream);
        if (e)
            return qa_fail(ctx, e, "reading the finite check's status words");
        if (words[QATTN_STATUS_NONFINITE])
            return qattn_nonfinite_error(ctx, words[QATTN_STATUS_NONFINITE]);
    }
    return QATTN_OK;
}
