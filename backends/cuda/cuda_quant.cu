/* The quantization passes and the exact mode's finite check. */
#include "cuda_launch.cuh"

QA_NAMESPACE_BEGIN

template <int D, int DT> static void quantize_all(const QuantParams &qp, const qattn_problem &pb, void *stream)
{
    constexpr int VEC = In<DT>::kVec, RP = kStatsThreads / (D / VEC);
    const int kv_heads = (int)(pb.batch * pb.heads_kv), q_heads = (int)(pb.batch * pb.heads_q);
    if (qp.smooth_k || qp.fp8) { /* the K mean and V maxima need a pass over all keys first */
        auto stats = &kv_stats_kernel<D, DT>;
        QA_LAUNCH(stats, qp.chunks * kv_heads, kStatsThreads, RP * D * (int)(sizeof(double) + sizeof(float)), stream,
                  qp);
        auto finalize = &kv_finalize_kernel<D>;
        QA_LAUNCH(finalize, kv_heads, D, 0, stream, qp);
    }
    int kblocks = qp.fp8 ? (int)(qp.v_keys_padded / kBlockN) : (qp.seq_k + kBlockN - 1) / kBlockN;
    auto kv = &k_v_quant_kernel<D, DT>;
    QA_LAUNCH(kv, kblocks * kv_heads, kThreads, k_v_quant_smem<D>(), stream, qp);
    int qblocks = (qp.seq_q + kBlockM - 1) / kBlockM;
    auto q = &q_quant_kernel<D, DT>;
    QA_LAUNCH(q, qblocks * q_heads, kQuantQThreads, q_quant_smem(), stream, qp);
}

bool quantize(const QuantParams &qp, const qattn_problem &pb, void *stream)
{
    const int d = (int)pb.head_dim;
    switch (pb.in_dtype) {
    case QATTN_DTYPE_F16:
        if (d == 64)
            return quantize_all<64, kF16>(qp, pb, stream), true;
        if (d == 128)
            return quantize_all<128, kF16>(qp, pb, stream), true;
        return false;
    case QATTN_DTYPE_BF16:
        if (d == 64)
            return quantize_all<64, kBF16>(qp, pb, stream), true;
        if (d == 128)
            return quantize_all<128, kBF16>(qp, pb, stream), true;
        return false;
    case QATTN_DTYPE_F32:
        if (d == 64)
            return quantize_all<64, kF32>(qp, pb, stream), true;
        if (d == 128)
            return quantize_all<128, kF32>(qp, pb, stream), true;
        return false;
    default: return false;
    }
}

template <int DT> static void scan(const ScanParams &sp, void *stream)
{
    const int64_t items = scan_items(sp);
    auto fn = &finite_scan_kernel<DT>;
    QA_LAUNCH(fn, (int)(items < (1 << 30) ? items : (1 << 30)), 256, 0, stream, sp);
}

bool finite_scan(const ScanParams &sp, int dtype, void *stream)
{
    switch (dtype) {
    case QATTN_DTYPE_F16: return scan<kF16>(sp, stream), true;
    case QATTN_DTYPE_BF16: return scan<kBF16>(sp, stream), true;
    case QATTN_DTYPE_F32: return scan<kF32>(sp, stream), true;
    default: return false;
    }
}

QA_NAMESPACE_END
