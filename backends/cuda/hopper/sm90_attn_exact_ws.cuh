/*
 * sm_90a attention for EXACT (fp16/bf16 in, fp32 accumulation), warp-
 * specialized: the FP8 TMA kernel's structure (sm90_attn_ws.cuh: a producer
 * warpgroup issuing bulk tensor copies into an mbarrier ring, two consumer
 * warpgroups of 64 query rows) with 16-bit math: S = Q K^T on HGMMA from
 * shared memory (Q and K in 64-column blocks of 128-byte rows, 128-byte
 * swizzle), O += P V with P from registers and V read MN-major (transposed
 * B), accumulated in fp32 straight into O, which is rescaled before each P V
 * is issued (FlashAttention-3's order).
 *
 * The tensor maps read the caller's tensors directly: 4-D (D, tokens, heads,
 * batch) with the tensor's own strides, in boxes of 64 channels (one
 * 128-byte-swizzled column block) by 64 or 128 rows; rows past the sequence
 * are zero-filled per head (the core has checked the 16-byte alignment the
 * copy engine needs). D = 256 exists only here (two 64 KiB stages).
 */
#ifndef QA_SM90_ATTN_EXACT_WS_CUH
#define QA_SM90_ATTN_EXACT_WS_CUH

#include "sm90_attn_ws.cuh"

QA_NAMESPACE_BEGIN
namespace sm90 {

/* INT8_QK: Q and K are the quantization pass's int8 rows (INT8_FP16 mode),
 * S = Q K^T on IGMMA, then the same fp16 P V; otherwise 16-bit Q and K.
 * Keys per step: 128 at D <= 128 (FlashAttention-3's tile; it beat 64-key
 * steps with three consumers by 0-12% on the H200, bench/NOTES.md); 64 at
 * D = 256, where O alone takes 128 registers. */
template <int D, bool INT8_QK = false> struct ExactWsTraits : WsShape {
    static constexpr int kBN = D <= 128 ? 128 : 64;
    static constexpr int kQKBytes = INT8_QK ? 1 : 2; /* bytes per Q/K element */
    static constexpr int kQBytes = kRows * D * kQKBytes;
    static constexpr int kKBytes = kBN * D * kQKBytes;
    static constexpr int kVBytes = kBN * D * 2;
    static constexpr int kStageBytes = kKBytes + kVBytes;
    static constexpr int kStages = stages(kQBytes, kStageBytes);
    static constexpr int kBarOffset = kQBytes + kStages * kStageBytes;
    static constexpr int kSmem = kBarOffset + 8 * (2 * kStages + 1) + kAlign;
    static_assert(kStages >= 2 && kSmem <= kSmemLimit, "more shared memory than a block may have");
};

#if defined(QA_SM90_DEVICE_CODE)
QA_DEV void tma_load_4d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c0, int c1, int c2, int c3)
{
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
                 : "memory");
}
#endif

template <int D, bool BF16, bool INT8_QK = false, bool SPARSE = false>
__global__ void __launch_bounds__(WsShape::kThreads, 1)
    attention_exact_ws_kernel(const AttnParams p, const __grid_constant__ TmaMaps maps)
{
#if defined(QA_SM90_DEVICE_CODE)
    static_assert(!(INT8_QK && BF16), "INT8 Q.K runs with fp16 P V");
    using T = ExactWsTraits<D, INT8_QK>;
    constexpr int BN = T::kBN;      /* keys per step */
    constexpr int NT = BN / 8;      /* n8 column groups of S */
    constexpr int DT = D / 8;       /* n8 column groups of O */
    constexpr int KS = D / 16;      /* k16 steps of Q K^T */
    constexpr int CB = D / 64;      /* 64-channel column blocks */
    constexpr int S = T::kStages;

    if (p.status && load_volatile(p.status))
        return; /* non-finite input: leave the outputs untouched (every thread returns here) */

    const uint32_t sQ = smem_u32(aligned_smem<T::kAlign>());
    const uint32_t sStage = sQ + T::kQBytes;
    const StageRing<S> ring{sQ + T::kBarOffset};
    if (tid() == 0)
        ring.init(4 * T::kConsumers);
    sync_block();

    const TileSpan ts = tile_span_steps(p, T::kRows, BN);
    /* Sparse plans: producer and consumers walk the same key steps
     * (cuda_sparse.cuh); `it` stays the ring position, kstep(it) the keys. */
    [[maybe_unused]] StepWalk walk;
    int n_steps = ts.n_tiles;
    if constexpr (SPARSE) {
        walk = sparse_walk(p.sp, p.seq_q, p.seq_k, p.causal != 0, p.q_tiles, ts.bhk, ts.i0 / T::kRows, ts.i0,
                           ts.rows_valid);
        n_steps = walk.count();
    }
    auto kstep = [&](int it) {
        if constexpr (SPARSE)
            return walk.step(it);
        else
            return it;
    };
    const int warp = warp_id();
    if (warp < 4) {
        setmaxnreg_dec<T::kProducerRegs>();
        if (tid() == 0) {
            prefetch_tensor_map(&maps.q);
            prefetch_tensor_map(&maps.k);
            prefetch_tensor_map(&maps.v);
            mbar_expect_tx(ring.q(), T::kQBytes);
            if constexpr (INT8_QK)
                tma_load_2d(sQ, &maps.q, ring.q(), 0, (int)(ts.bhq * p.seq_q + ts.i0));
            else
                for (int c = 0; c < CB; c++)
                    tma_load_4d(sQ + c * T::kRows * 128, &maps.q, ring.q(), c * 64, ts.i0, ts.h, ts.b);
            for (int it = 0; it < n_steps; it++) {
                const int j0 = kstep(it) * BN;
                ring.acquire(it);
                const uint32_t stage = sStage + (uint32_t)((it % S) * T::kStageBytes);
                mbar_expect_tx(ring.full(it), T::kStageBytes);
                if constexpr (INT8_QK) /* rows past this head's keys are masked */
                    tma_load_2d(stage, &maps.k, ring.full(it), 0, (int)(ts.bhk * p.seq_k + j0));
                for (int c = 0; c < CB; c++) {
                    if constexpr (!INT8_QK)
                        tma_load_4d(stage + c * BN * 128, &maps.k, ring.full(it), c * 64, j0, ts.hk, ts.b);
                    tma_load_4d(stage + T::kKBytes + c * BN * 128, &maps.v, ring.full(it), c * 64, j0, ts.hk, ts.b);
                }
            }
        }
    } else {
        setmaxnreg_inc<T::kConsumerRegs>();
        const int lane = lane_id();
        const int cw = (warp >> 2) - 1, wl = warp & 3;
        const int g = lane >> 2, t = lane & 3;
        const int i0 = ts.i0, diag = ts.diag, n_tiles = n_steps, n_plain = ts.n_plain;
        const int row_base = cw * 64 + wl * 16 + g; /* this thread's rows: row_base and row_base + 8 */
        [[maybe_unused]] RowKeys rk[2];
        if constexpr (SPARSE)
            for (int hh = 0; hh < 2; hh++)
                rk[hh] = sparse_row_keys(p.sp, p.seq_q, p.seq_k, p.causal != 0, i0 + row_base + hh * 8);

        float o[DT * 4];
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
QA_UNROLL
        for (int i = 0; i < DT * 4; i++)
            o[i] = 0.f;

        /* Descriptors: 16-bit Q/K in 64-column blocks of 128-byte rows, or
         * int8 Q/K in rows of D bytes (as sm90_attn.cuh); V MN-major, its
         * 64-channel blocks BN * 128 bytes apart, k16 steps 2048 bytes apart. */
        constexpr int QK_SWIZZLE = INT8_QK && D == 64 ? 64 : 128;
        const uint64_t desc_q = smem_desc<QK_SWIZZLE>(sQ + cw * 64 * (INT8_QK ? D : 128));
        const uint64_t desc_k0 = smem_desc<QK_SWIZZLE>(sStage);
        const uint64_t desc_v0 = smem_desc_mn128(sStage + T::kKBytes, BN * 128);
        auto stage_desc = [&](uint64_t base, int it) { return base + (uint64_t)((it % S) * (T::kStageBytes >> 4)); };

        using Score = typename std::conditional<INT8_QK, int32_t, float>::type;
        Score s[NT * 4];
QA_UNROLL
        for (int i = 0; i < NT * 4; i++)
            s[i] = 0;
        /* INT8: this thread's rows' Q scales (log2 domain) and the K scales of
         * its columns: k_scale[block of 64 keys in the step][column parity]. */
        float q_scale[2] = {0.f, 0.f};
        if constexpr (INT8_QK) {
QA_UNROLL
            for (int hh = 0; hh < 2; hh++) {
                const int row = i0 + row_base + hh * 8;
                const int64_t grp = (int64_t)(row / p.q_block) * p.q_inter + (row % p.q_block) % p.q_inter;
                q_scale[hh] = row < p.seq_q ? p.q_scale[ts.bhq * p.q_groups + grp] * p.scale_log2 : 0.f;
            }
        }
        const int k_blocks = (p.seq_k + kBlockN - 1) / kBlockN;
        auto load_k_scales = [&](int it, float (&ks)[BN / 64][2]) {
QA_UNROLL
            for (int b = 0; b < BN / 64; b++) {
                const int blk = min(kstep(it) * (BN / 64) + b, k_blocks - 1);
                const float *kb = p.k_scale + ts.bhk * p.k_groups + (int64_t)blk * p.k_inter;
QA_UNROLL
                for (int cb = 0; cb < 2; cb++)
                    ks[b][cb] = kb[p.k_inter == 1 ? 0 : 2 * t + cb]; /* natural key order: key % 8 = 2t + cb */
            }
        };
        auto qk_issue = [&](int it) {
            const uint64_t desc_k = stage_desc(desc_k0, it);
            fence_operands(s);
            wgmma_fence();
            if constexpr (INT8_QK) {
QA_UNROLL
                for (int ks = 0; ks < D / 32; ks++) { /* k32 steps: 32 bytes along the row */
                    if constexpr (BN == 128)
                        wgmma_s8_n128_ss(s, desc_q + 2 * ks, desc_k + 2 * ks, ks);
                    else
                        wgmma_s8_n64_ss(s, desc_q + 2 * ks, desc_k + 2 * ks, ks);
                }
            } else {
QA_UNROLL
                for (int ks = 0; ks < KS; ks++) {
                    const uint64_t a = desc_q + (uint64_t)(((ks >> 2) * T::kRows * 128 + (ks & 3) * 32) >> 4);
                    const uint64_t bk = desc_k + (uint64_t)(((ks >> 2) * BN * 128 + (ks & 3) * 32) >> 4);
                    if constexpr (BF16 && BN == 128)
                        wgmma_bf16_n128_ss(s, a, bk, ks);
                    else if constexpr (BF16)
                        wgmma_bf16_n64_ss(s, a, bk, ks);
                    else if constexpr (BN == 128)
                        wgmma_f16_n128_ss(s, a, bk, ks);
                    else
                        wgmma_f16_n64_ss(s, a, bk, ks);
                }
            }
            wgmma_commit();
        };
        auto softmax = [&](int it, auto mask_tag, const float (&ksc)[T::kBN / 64][2], uint32_t (&pa)[T::kBN / 16][4],
                           float (&alpha)[2]) {
            constexpr bool MASK = decltype(mask_tag)::value;
            const int j0 = kstep(it) * BN;
            [[maybe_unused]] uint64_t cells = ~(uint64_t)0;
            if constexpr (SPARSE && MASK)
                cells = walk.cell_mask(it);
            float x[NT][4];
            /* INT8: the score from the int32 sum in one FFMA (the raw form of
             * sm90_attn.cuh: the bits of s + 1.5 * 2^23 read as a float). */
            [[maybe_unused]] float sc[BN / 64][2][2], nb[BN / 64][2][2];
            if constexpr (INT8_QK) {
QA_UNROLL
                for (int b = 0; b < BN / 64; b++)
QA_UNROLL
                    for (int hh = 0; hh < 2; hh++)
QA_UNROLL
                        for (int cb = 0; cb < 2; cb++) {
                            sc[b][hh][cb] = q_scale[hh] * ksc[b][cb];
                            nb[b][hh][cb] = -12582912.0f * sc[b][hh][cb];
                        }
            }
QA_UNROLL
            for (int j = 0; j < NT; j++)
QA_UNROLL
                for (int i = 0; i < 4; i++) {
                    float v;
                    if constexpr (INT8_QK)
                        v = fmaf(__int_as_float(s[4 * j + i] + 0x4B400000), sc[j >> 3][i >> 1][i & 1],
                                 nb[j >> 3][i >> 1][i & 1]);
                    else
                        v = s[4 * j + i] * p.scale_log2;
                    if constexpr (MASK && SPARSE) {
                        const int kl = j * 8 + 2 * t + (i & 1);
                        if (!sparse_visible(rk[i >> 1], j0 + kl, p.seq_k, cells, (cw * 4 + wl) * 8 + (kl >> 4)))
                            v = -INFINITY;
                    } else if constexpr (MASK) {
                        const int key = j0 + j * 8 + 2 * t + (i & 1);
                        const int row = i0 + row_base + (i >> 1) * 8;
                        if (key >= p.seq_k || (p.causal && key > row + diag))
                            v = -INFINITY;
                    }
                    x[j][i] = v;
                }
            online_softmax(x, m, l, alpha, 0.f);
            if constexpr (SPARSE) { /* pv_threshold: l already counts the skipped P */
                float unused[2];
                if (p.sp.pv_threshold > 0.f)
                    pv_group_skip(x, p.sp.pv_threshold, 1.f, i0 + row_base < p.seq_q, i0 + row_base + 8 < p.seq_q,
                                  unused);
            }
QA_UNROLL
            for (int kc = 0; kc < BN / 16; kc++) {
                if constexpr (BF16)
                    pack_p16(pa[kc], x[2 * kc], x[2 * kc + 1], pack_bf16x2);
                else
                    pack_p16(pa[kc], x[2 * kc], x[2 * kc + 1], pack_f16x2);
            }
        };
        auto softmax_tile = [&](int it, const float (&ksc)[T::kBN / 64][2], uint32_t (&pa)[T::kBN / 16][4],
                                float (&alpha)[2]) {
            bool plain;
            if constexpr (SPARSE)
                plain = !walk.masked(it);
            else
                plain = it < n_plain;
            if (plain)
                softmax(it, std::false_type(), ksc, pa, alpha);
            else
                softmax(it, std::true_type(), ksc, pa, alpha);
        };
        auto pv_issue = [&](int it, const uint32_t (&pa)[T::kBN / 16][4], const float (&alpha)[2]) {
            const uint64_t desc_v = stage_desc(desc_v0, it);
QA_UNROLL
            for (int n = 0; n < DT; n++)
QA_UNROLL
                for (int i = 0; i < 4; i++)
                    o[4 * n + i] *= alpha[i >> 1];
            fence_operands(o);
            wgmma_fence();
QA_UNROLL
            for (int kc = 0; kc < BN / 16; kc++) {
                const uint64_t dv = desc_v + (uint64_t)(kc * (16 * 128 >> 4));
                if constexpr (BF16) {
                    if constexpr (D == 256)
                        wgmma_bf16_n256_rs_tb(o, pa[kc], dv, 1);
                    else if constexpr (D == 128)
                        wgmma_bf16_n128_rs_tb(o, pa[kc], dv, 1);
                    else
                        wgmma_bf16_n64_rs_tb(o, pa[kc], dv, 1);
                } else {
                    if constexpr (D == 256)
                        wgmma_f16_n256_rs_tb(o, pa[kc], dv, 1);
                    else if constexpr (D == 128)
                        wgmma_f16_n128_rs_tb(o, pa[kc], dv, 1);
                    else
                        wgmma_f16_n64_rs_tb(o, pa[kc], dv, 1);
                }
            }
            wgmma_commit();
        };

        uint32_t pa[2][BN / 16][4];
        float alpha[2][2];
        /* INT8 K scales, loaded a step before their softmax (sm90_attn_ws.cuh);
         * unused (and dropped by the compiler) for 16-bit Q/K. */
        float k_scale[2][BN / 64][2] = {};
        mbar_wait(ring.q(), 0);
        if (n_tiles > 0) {
            ring.wait_full(0);
            if constexpr (INT8_QK) {
                load_k_scales(0, k_scale[0]);
                load_k_scales(min(1, n_tiles - 1), k_scale[1]);
            }
            qk_issue(0);
            wgmma_wait<0>();
            fence_operands(s);
            softmax_tile(0, k_scale[0], pa[0], alpha[0]);
        }
        /* The FP8 TMA kernel's pipeline (see there). */
        auto step = [&](int it, const uint32_t (&pa_cur)[T::kBN / 16][4], const float (&alpha_cur)[2],
                        uint32_t (&pa_next)[T::kBN / 16][4], float (&alpha_next)[2],
                        const float (&ks_next)[T::kBN / 64][2], float (&ks_after)[T::kBN / 64][2]) {
            const bool more = it + 1 < n_tiles;
            const int next = more ? it + 1 : it;
            if constexpr (INT8_QK)
                load_k_scales(min(it + 2, n_tiles - 1), ks_after);
            if (more)
                ring.wait_full(next);
            qk_issue(next);
            pv_issue(it, pa_cur, alpha_cur);
            wgmma_wait<1>(); /* S of the next tile (committed first) */
            fence_operands(s);
            if (more)
                softmax_tile(next, ks_next, pa_next, alpha_next);
            wgmma_wait<0>();
            fence_operands(o);
            ring.release(it, lane);
        };
        for (int it = 0; it < n_tiles; it += 2) {
            step(it, pa[0], alpha[0], pa[1], alpha[1], k_scale[1], k_scale[0]);
            if (it + 1 < n_tiles)
                step(it + 1, pa[1], alpha[1], pa[0], alpha[0], k_scale[0], k_scale[1]);
        }
        store_rows<D>(p, ts, row_base, o, m, l, nullptr, 0.f, INT8_QK ? p.q_kmean : nullptr);
    }
#else
    (void)p;
    (void)maps;
#endif
}

} // namespace sm90
QA_NAMESPACE_END

#endif
