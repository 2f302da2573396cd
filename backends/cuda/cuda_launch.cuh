/*
 * Host side of the dense kernels: turns a plan and device pointers into the
 * sequence of launches (quantization passes, finite check, attention).
 * Compiled into both runtimes (cuda_rt.cuh).
 */
#ifndef QA_CUDA_LAUNCH_CUH
#define QA_CUDA_LAUNCH_CUH

#include "cuda_internal.h"
#include "cuda_kernels.cuh"

#if defined(QA_EMULATE)
#define QA_LAUNCH(fn, grid, block, smem, stream, ...) \
    ((void)(stream), emu::launch((grid), (block), (smem), [&] { fn(__VA_ARGS__); }))
#else
#define QA_LAUNCH(fn, grid, block, smem, stream, ...) \
    fn<<<(grid), (block), (smem), (cudaStream_t)(stream)>>>(__VA_ARGS__)
#endif

QA_NAMESPACE_BEGIN

/* Defined in the per-mode translation units (they instantiate the kernels). */
/* prepare: set the kernel's shared-memory limit; returns the bytes it needs (0: no such kernel). */
int attn_exact(const AttnParams *p, int head_dim, bool bf16, int grid, void *stream, bool prepare, bool sparse);
int attn_int8_fp16(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse);
int attn_int8_fp8(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse);
int attn_int8_fp8_f16acc(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse);
/* Both FP8 modes with P.V on the fp16 mma (sm_90). */
int attn_int8_fp8_f16mma(const AttnParams *p, int head_dim, bool f16acc, int grid, void *stream, bool prepare, bool sparse);

/* Both FP8 modes on the sm_90a wgmma kernel (hopper/sm90_attn.cu; not in the emulator). */
/* tma: the warp-specialized TMA kernel (returns -1 if the tensor maps cannot be encoded). */
int attn_sm90_fp8(const AttnParams *p, int head_dim, bool f16acc, bool tma, int grid, void *stream, bool prepare,
                  bool sparse);
/* EXACT on the sm_90a TMA kernel; -1 as attn_sm90_fp8. (The core has checked
 * that Q, K, V and their strides are 16-byte aligned, as the copy engine needs.) */
int attn_sm90_exact(const AttnParams *p, int head_dim, bool bf16, int grid, void *stream, bool prepare, bool sparse);
/* INT8_FP16 on the sm_90a TMA kernel (INT8 Q.K on IGMMA, fp16 P V); -1 as attn_sm90_fp8. */
int attn_sm90_int8_fp16(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse);

inline bool plan_wgmma(const qattn_plan *plan)
{
    const qa_plan_info *info = (const qa_plan_info *)plan->impl;
    return info && info->wgmma;
}

inline bool plan_tma(const qattn_plan *plan)
{
    const qa_plan_info *info = (const qa_plan_info *)plan->impl;
    return info && info->tma;
}

inline bool plan_fp8_on_f16_mma(const qattn_plan *plan)
{
    const qa_plan_info *info = (const qa_plan_info *)plan->impl;
    return info && info->fp8_on_f16_mma;
}
/* The quantization passes; false if the head dim or dtype has no kernel. */
bool quantize(const QuantParams &qp, const qattn_problem &pb, void *stream);
/* Sparse plans (cuda_sparse.cu): the layout pre-pass over `tiles` query
 * tiles, and the PREDICT kernels writing the core's layout regions. */
bool sparse_layout(const LayoutParams &lp, long long tiles, void *stream);
struct RunArgs;
const char *predict_layout(const qattn_plan *plan, const RunArgs &a);
bool finite_scan(const ScanParams &sp, int dtype, void *stream);

/* Provided by the build: an asynchronous memset, and the last launch error (NULL if none). */
bool memset_async(void *dst, int value, size_t bytes, void *stream);
const char *launch_error();

struct RunArgs {
    const uint8_t *q, *k, *v;
    uint8_t *o;
    float *lse;
    uint8_t *ws; /* workspace start, or NULL */
    void *stream;
    const int32_t *block_indptr, *block_indices; /* QATTN_SPARSE_BLOCKS */
    int64_t block_count;
};

inline void copy_strides(int64_t dst[3], const int64_t src[4])
{
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
}

/* Sets the shared-memory limit of the plan's attention kernel; 0 on success. */
inline int prepare_plan(const qattn_plan *plan)
{
    const qattn_problem &pb = plan->problem;
    const bool sparse = plan->sparse.enabled;
    int d = (int)pb.head_dim, r = 0;
    switch (plan->precision) {
    case QATTN_PRECISION_EXACT:
        if (plan_wgmma(plan)) {
#if !defined(QA_EMULATE)
            r = attn_sm90_exact(nullptr, d, pb.in_dtype == QATTN_DTYPE_BF16, 0, nullptr, true, sparse);
#endif
        } else {
            r = attn_exact(nullptr, d, pb.in_dtype == QATTN_DTYPE_BF16, 0, nullptr, true, sparse);
        }
        break;
    case QATTN_PRECISION_INT8_FP16:
        if (plan_wgmma(plan)) {
#if !defined(QA_EMULATE)
            r = attn_sm90_int8_fp16(nullptr, d, 0, nullptr, true, sparse);
#endif
        } else {
            r = attn_int8_fp16(nullptr, d, 0, nullptr, true, sparse);
        }
        break;
    case QATTN_PRECISION_INT8_FP8:
    case QATTN_PRECISION_INT8_FP8_F16ACC: {
        const bool f16acc = plan->precision == QATTN_PRECISION_INT8_FP8_F16ACC;
        if (plan_wgmma(plan)) {
#if !defined(QA_EMULATE)
            r = attn_sm90_fp8(nullptr, d, f16acc, plan_tma(plan), 0, nullptr, true, sparse);
#endif
        } else if (plan_fp8_on_f16_mma(plan))
            r = attn_int8_fp8_f16mma(nullptr, d, f16acc, 0, nullptr, true, sparse);
        else
            r = f16acc ? attn_int8_fp8_f16acc(nullptr, d, 0, nullptr, true, sparse)
                   : attn_int8_fp8(nullptr, d, 0, nullptr, true, sparse);
        break;
    }
    default: break;
    }
    return r > 0 ? 0 : -1;
}

/* The sparse launch's parameters; with a layout, enqueues the pre-pass
 * that turns it into the attention kernel's step lists (after the PREDICT
 * kernels for predicted layouts). Returns NULL, or what failed. */
inline const char *sparse_prepare(const qattn_plan *plan, const RunArgs &a, SparseParams &sp)
{
    const qattn_problem &pb = plan->problem;
    const qattn_sparse_problem &s = plan->sparse;
    memset(&sp, 0, sizeof(sp));
    sp.window = s.window;
    sp.wl = s.window_left < 0 ? -1 : (int)min(s.window_left, (int64_t)INT32_MAX);
    sp.wr = s.window_right < 0 ? -1 : (int)min(s.window_right, (int64_t)INT32_MAX);
    sp.sinks = (int)min(s.sink_tokens, pb.seq_k);
    sp.bn = plan->kv_tile;
    sp.pv_threshold = s.pv_threshold;
    if (s.layout == QATTN_SPARSE_NO_LAYOUT)
        return nullptr;
    const size_t base = plan->precision != QATTN_PRECISION_EXACT ? qa_scratch_layout(&pb).total : 0;
    const qa_sparse_lists sl = qa_sparse_lists_layout(plan, base);
    uint8_t *region = a.ws + plan->ws.backend;
    sp.list_count = (const int32_t *)(region + sl.count);
    sp.list_steps = (const uint32_t *)(region + sl.steps);
    sp.list_cells = (const uint64_t *)(region + sl.cells);
    sp.ksteps = sl.ksteps;

    LayoutParams lp;
    memset(&lp, 0, sizeof(lp));
    lp.sp = sp;
    lp.q_block = (int)s.q_block;
    lp.k_block = (int)s.k_block;
    lp.q_blocks = (int)s.q_blocks;
    lp.seq_q = (int)pb.seq_q;
    lp.seq_k = (int)pb.seq_k;
    lp.causal = pb.causal;
    lp.heads_kv = (int)pb.heads_kv;
    lp.q_tiles = (int)((pb.seq_q + kBlockM - 1) / kBlockM);
    if (s.layout == QATTN_SPARSE_BLOCKS) {
        lp.ptr = a.block_indptr;
        lp.indices = a.block_indices;
        lp.count = a.block_indices ? a.block_count : 0;
        lp.stride = 0;
    } else {
        const char *err = predict_layout(plan, a);
        if (err)
            return err;
        lp.ptr = (const int32_t *)(a.ws + plan->ws.sparse_counts);
        lp.indices = (const int32_t *)(a.ws + plan->ws.sparse_indices);
        lp.count = s.rows * s.k_blocks;
        lp.stride = s.k_blocks;
    }
    if (!sparse_layout(lp, (long long)sl.tiles, a.stream))
        return "no sparse layout kernel";
    return launch_error();
}

/* Enqueues the whole run. Returns NULL, or what failed. */
inline const char *run_plan(const qattn_plan *plan, const RunArgs &a)
{
    const qattn_problem &pb = plan->problem;
    const qattn_workspace_layout &L = plan->ws;
    const bool quantized = plan->precision != QATTN_PRECISION_EXACT;
    const int D = (int)pb.head_dim;
    uint32_t *status = pb.check_finite ? (uint32_t *)(a.ws + L.status) : nullptr;
    const char *err;

    if (status && !memset_async(status, 0, QATTN_STATUS_BYTES, a.stream))
        return "clearing the finite-check flag (cudaMemsetAsync)";

    AttnParams ap;
    memset(&ap, 0, sizeof(ap));
    ap.o = a.o;
    copy_strides(ap.o_stride, pb.o_stride);
    ap.out_dtype = (int)pb.out_dtype;
    ap.lse = a.lse;
    ap.status = status;
    ap.heads_q = (int)pb.heads_q;
    ap.heads_kv = (int)pb.heads_kv;
    ap.group = (int)pb.group;
    ap.seq_q = (int)pb.seq_q;
    ap.seq_k = (int)pb.seq_k;
    ap.q_tiles = (int)((pb.seq_q + kBlockM - 1) / kBlockM);
    ap.causal = pb.causal;
    ap.scale_log2 = pb.sm_scale * (float)QATTN_LOG2E;
    const int grid = ap.q_tiles * (int)(pb.batch * pb.heads_q);
    const bool sparse = plan->sparse.enabled;

    if (!quantized) {
        if (status) {
            ScanParams sp;
            memset(&sp, 0, sizeof(sp));
            const uint8_t *bases[3] = {a.q, a.k, a.v};
            const int64_t *strides[3] = {pb.q_stride, pb.k_stride, pb.v_stride};
            const int64_t heads[3] = {pb.heads_q, pb.heads_kv, pb.heads_kv}, seqs[3] = {pb.seq_q, pb.seq_k, pb.seq_k};
            for (int x = 0; x < 3; x++) {
                sp.base[x] = bases[x];
                copy_strides(sp.stride[x], strides[x]);
                sp.heads[x] = heads[x];
                sp.seq[x] = seqs[x];
            }
            sp.batch = (int)pb.batch;
            sp.head_dim = D;
            sp.status = status;
            if (!finite_scan(sp, (int)pb.in_dtype, a.stream))
                return "no finite-check kernel for this dtype";
            if ((err = launch_error()))
                return err;
        }
        if (sparse && (err = sparse_prepare(plan, a, ap.sp)))
            return err;
        ap.q = a.q;
        ap.k = a.k;
        ap.v = a.v;
        copy_strides(ap.q_stride, pb.q_stride);
        copy_strides(ap.k_stride, pb.k_stride);
        copy_strides(ap.v_stride, pb.v_stride);
        int ok = 0;
        if (plan_wgmma(plan)) {
#if !defined(QA_EMULATE)
            ok = attn_sm90_exact(&ap, D, pb.in_dtype == QATTN_DTYPE_BF16, grid, a.stream, false, sparse);
#endif
        } else {
            ok = attn_exact(&ap, D, pb.in_dtype == QATTN_DTYPE_BF16, grid, a.stream, false, sparse);
        }
        if (ok < 0)
            return "encoding the TMA tensor maps failed (cuTensorMapEncodeTiled through "
                   "cudaGetDriverEntryPointByVersion)";
        if (!ok)
            return "no exact attention kernel for this head dim";
        return launch_error();
    }

    const qattn_quant_params &qq = plan->quant;
    qa_scratch sc = qa_scratch_layout(&pb);
    uint8_t *scratch = a.ws + L.backend;
    QuantParams qp;
    memset(&qp, 0, sizeof(qp));
    qp.q = a.q;
    qp.k = a.k;
    qp.v = a.v;
    copy_strides(qp.q_stride, pb.q_stride);
    copy_strides(qp.k_stride, pb.k_stride);
    copy_strides(qp.v_stride, pb.v_stride);
    qp.heads_q = (int)pb.heads_q;
    qp.heads_kv = (int)pb.heads_kv;
    qp.group = (int)pb.group;
    qp.seq_q = (int)pb.seq_q;
    qp.seq_k = (int)pb.seq_k;
    qp.q8 = (int8_t *)(a.ws + L.q_i8);
    qp.k8 = (int8_t *)(a.ws + L.k_i8);
    qp.vq = a.ws + L.v_q;
    qp.q_scale = (float *)(a.ws + L.q_scale);
    qp.k_scale = (float *)(a.ws + L.k_scale);
    qp.fp8 = plan->precision != QATTN_PRECISION_INT8_FP16;
    qp.v_scale = qp.fp8 ? (float *)(a.ws + L.v_scale) : nullptr;
    qp.smooth_k = qq.smooth_k;
    qp.k_mean = qq.smooth_k ? (float *)(a.ws + L.k_mean) : nullptr;
    qp.q_kmean = qq.smooth_k ? (float *)(a.ws + L.q_kmean) : nullptr;
    qp.q_groups = L.q_groups;
    qp.k_groups = L.k_groups;
    qp.v_keys_padded = L.v_keys_padded;
    qp.q_block = qq.q_block;
    qp.q_inter = qq.q_interleave;
    qp.k_inter = qq.k_interleave;
    qp.v_fp8_max = qq.v_fp8_max;
    qp.sm_scale = pb.sm_scale;
    qp.part_sum = (double *)(scratch + sc.part_sum);
    qp.part_amax = (float *)(scratch + sc.part_amax);
    qp.v_inv = (float *)(scratch + sc.v_inv);
    qp.chunks = sc.chunks;
    qp.chunk_tokens = sc.chunk_tokens;
    qp.status = status;
    if (qq.k_block != kBlockN)
        return "the K quantization block must be the kernel's key tile";
    /* The quantization kernels reduce scale groups with warp shuffles: Q
     * blocks are whole warps of rows inside a CTA and the interleaves divide
     * a warp (every granularity the plan picks is such). */
    if (qp.q_block % 32 != 0 || kBlockM % qp.q_block != 0 || 8 % qp.q_inter != 0 || 8 % qp.k_inter != 0)
        return "the quantization groups must be whole warps of rows with interleaves dividing 8";
    if (!quantize(qp, pb, a.stream))
        return "no quantization kernels for this head dim and dtype";
    if ((err = launch_error()))
        return err;

    if (sparse && (err = sparse_prepare(plan, a, ap.sp)))
        return err;
    ap.q8 = qp.q8;
    ap.k8 = qp.k8;
    ap.vq = qp.vq;
    ap.q_scale = qp.q_scale;
    ap.k_scale = qp.k_scale;
    ap.v_scale = qp.v_scale;
    ap.q_kmean = qp.q_kmean;
    ap.q_groups = L.q_groups;
    ap.k_groups = L.k_groups;
    ap.v_keys_padded = L.v_keys_padded;
    ap.q_block = qq.q_block;
    ap.q_inter = qq.q_interleave;
    ap.k_inter = qq.k_interleave;
    int ok = 0;
    switch (plan->precision) {
    case QATTN_PRECISION_INT8_FP16:
        if (plan_wgmma(plan)) {
#if !defined(QA_EMULATE)
            ok = attn_sm90_int8_fp16(&ap, D, grid, a.stream, false, sparse);
#endif
        } else {
            ok = attn_int8_fp16(&ap, D, grid, a.stream, false, sparse);
        }
        break;
    case QATTN_PRECISION_INT8_FP8:
    case QATTN_PRECISION_INT8_FP8_F16ACC: {
        const bool f16acc = plan->precision == QATTN_PRECISION_INT8_FP8_F16ACC;
        if (plan_wgmma(plan)) {
#if !defined(QA_EMULATE)
            ok = attn_sm90_fp8(&ap, D, f16acc, plan_tma(plan), grid, a.stream, false, sparse);
#endif
        } else if (plan_fp8_on_f16_mma(plan))
            ok = attn_int8_fp8_f16mma(&ap, D, f16acc, grid, a.stream, false, sparse);
        else
            ok = f16acc ? attn_int8_fp8_f16acc(&ap, D, grid, a.stream, false, sparse)
                        : attn_int8_fp8(&ap, D, grid, a.stream, false, sparse);
        break;
    }
    default: break;
    }
    if (ok < 0)
        return "encoding the TMA tensor maps failed (cuTensorMapEncodeTiled through cudaGetDriverEntryPointByVersion)";
    if (!ok)
        return "no quantized attention kernel for this head dim";
    return launch_error();
}

QA_NAMESPACE_END

/* ------------------------------------------------------------------------
 * Instantiation helpers for the per-mode translation units. */

#if defined(QA_EMULATE)
#define QA_SET_SMEM(fn, bytes) (true)
#else
#define QA_SET_SMEM(fn, bytes) \
    (cudaFuncSetAttribute((const void *)(fn), cudaFuncAttributeMaxDynamicSharedMemorySize, (bytes)) == cudaSuccess)
#endif

QA_NAMESPACE_BEGIN
/* Launches (or prepares) attention_kernel<D, QK, PV>; returns its shared memory bytes, 0 on failure. */
template <int D, Qk QK, Pv PV, bool SPARSE>
int attn_launch_as(const AttnParams *p, int grid, void *stream, bool prepare)
{
    auto fn = &attention_kernel<D, QK, PV, SPARSE>;
    const int smem = AttnTraits<D, QK, PV>::kSmem;
    if (prepare)
        return QA_SET_SMEM(fn, smem) ? smem : 0;
    QA_LAUNCH(fn, grid, kThreads, smem, stream, *p);
    return smem;
}
/* sparse: the instantiation that walks a sparse plan's key steps (p->sp). */
template <int D, Qk QK, Pv PV>
int attn_launch(const AttnParams *p, int grid, void *stream, bool prepare, bool sparse)
{
    return sparse ? attn_launch_as<D, QK, PV, true>(p, grid, stream, prepare)
                  : attn_launch_as<D, QK, PV, false>(p, grid, stream, prepare);
}
QA_NAMESPACE_END

#endif
