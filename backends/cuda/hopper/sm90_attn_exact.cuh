/*
 * sm_90a attention for EXACT (fp16/bf16 in, fp32 accumulation) on wgmma.
 *
 * The same CTA shape and pipeline as the FP8 kernel (sm90_attn.cuh): two
 * warpgroups x 64 query rows, key tiles of 64, four cp.async stages two tiles
 * ahead, and per iteration S of the next tile and P V of this one issued
 * back to back with the softmax in between. Differences:
 *   - Q, K and V are 16-bit, stored in column blocks of 64 elements (128-byte
 *     rows, 128-byte swizzle);
 *   - S = Q K^T: wgmma m64n64k16, both operands K-major in shared memory;
 *   - O += P V: wgmma m64nDk16 with P (fp16/bf16) from registers and V read
 *     MN-major (transposed B), accumulated in fp32 straight into O, which is
 *     rescaled by alpha before each P V is issued (FlashAttention-3's order).
 */
#ifndef QA_SM90_ATTN_EXACT_CUH
#define QA_SM90_ATTN_EXACT_CUH

#include "sm90_attn.cuh"

namespace qa {
namespace sm90 {

template <int D> struct Sm90ExactTraits {
    static constexpr int kQBytes = kBlockM * D * 2;
    static constexpr int kKBytes = kBlockN * D * 2;
    static constexpr int kVBytes = kBlockN * D * 2;
    static constexpr int kStageBytes = kKBytes + kVBytes;
    static constexpr int kAlign = 1024;
    static constexpr int kSmem = kQBytes + kStages * kStageBytes + kAlign;
};

template <int D, bool BF16>
__global__ void __launch_bounds__(kThreads90, 1) attention_exact_kernel(const AttnParams p)
{
#if defined(QA_SM90_DEVICE_CODE)
    using T = Sm90ExactTraits<D>;
    constexpr int NT = kBlockN / 8; /* n8 column groups of S */
    constexpr int DT = D / 8;       /* n8 column groups of O */
    constexpr int KS = D / 16;      /* k16 steps of Q K^T */

    if (p.status && load_volatile(p.status))
        return; /* non-finite input: leave the outputs untouched */

    uint8_t *smem_raw = dynamic_smem();
    uint8_t *smem = smem_raw + ((T::kAlign - (smem_u32(smem_raw) & (T::kAlign - 1))) & (T::kAlign - 1));
    uint8_t *sQ = smem;
    uint8_t *sStage = smem + T::kQBytes;

    const int lane = lane_id(), warp = warp_id();
    const int wg = warp >> 2, wl = warp & 3;
    const int g = lane >> 2, t = lane & 3;
    const TileSpan ts = tile_span(p, kBlockM);
    const int b = ts.b, h = ts.h, hk = ts.hk, i0 = ts.i0, rows_valid = ts.rows_valid, diag = ts.diag;
    const int n_tiles = ts.n_tiles, n_plain = ts.n_plain;

    const uint8_t *gQ = p.q + (b * p.q_stride[0] + h * p.q_stride[1] + (int64_t)i0 * p.q_stride[2]) * 2;
    const uint8_t *gK = p.k + (b * p.k_stride[0] + hk * p.k_stride[1]) * 2;
    const uint8_t *gV = p.v + (b * p.v_stride[0] + hk * p.v_stride[1]) * 2;
    const int64_t q_row = p.q_stride[2] * 2, k_row = p.k_stride[2] * 2, v_row = p.v_stride[2] * 2;

    auto load_tile = [&](int it) {
        const int j0 = it * kBlockN;
        uint8_t *stage = sStage + (it % kStages) * T::kStageBytes;
        load_rows_blocked<kBlockN, D>(stage, gK + (int64_t)j0 * k_row, k_row, p.seq_k - j0);
        load_rows_blocked<kBlockN, D>(stage + T::kKBytes, gV + (int64_t)j0 * v_row, v_row, p.seq_k - j0);
    };

    const int row_base = wg * 64 + wl * 16 + g; /* this thread's rows: row_base and row_base + 8 */
    float o[DT * 4];
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
QA_UNROLL
    for (int i = 0; i < DT * 4; i++)
        o[i] = 0.f;

    /* Descriptors (see the FP8 kernel): Q's rows of this warpgroup start 64
     * rows into each column block; a tile's K and V are stage 0's plus the
     * stage offset. V is read MN-major: its column blocks are kBlockN * 128
     * bytes apart, k16 steps 16 rows (2048 bytes) apart. */
    const uint64_t desc_q = smem_desc<128>(smem_u32(sQ) + wg * 64 * 128);
    const uint64_t desc_k0 = smem_desc<128>(smem_u32(sStage));
    const uint64_t desc_v0 = smem_desc_mn128(smem_u32(sStage + T::kKBytes), kBlockN * 128);
    auto stage_desc = [&](uint64_t base, int it) { return base + (uint64_t)((it % kStages) * (T::kStageBytes >> 4)); };

    float s[NT * 4];
QA_UNROLL
    for (int i = 0; i < NT * 4; i++)
        s[i] = 0.f;
    auto qk_issue = [&](int it) {
        const uint64_t desc_k = stage_desc(desc_k0, it);
        fence_operands(s);
        wgmma_fence();
QA_UNROLL
        for (int ks = 0; ks < KS; ks++) {
            /* k16 step ks: column block ks / 4, 32 bytes per step inside it */
            const uint64_t a = desc_q + (uint64_t)(((ks >> 2) * kBlockM * 128 + (ks & 3) * 32) >> 4);
            const uint64_t bk = desc_k + (uint64_t)(((ks >> 2) * kBlockN * 128 + (ks & 3) * 32) >> 4);
            if constexpr (BF16)
                wgmma_bf16_n64_ss(s, a, bk, ks);
            else
                wgmma_f16_n64_ss(s, a, bk, ks);
        }
        wgmma_commit();
    };

    /* Online softmax of tile it from s: P (fp16/bf16, A-register layout) into
     * pa, the O rescale factor into alpha; updates m and l. */
    auto softmax = [&](int it, auto mask_tag, uint32_t (&pa)[4][4], float (&alpha)[2]) {
        constexpr bool MASK = decltype(mask_tag)::value;
        const int j0 = it * kBlockN;
        float x[NT][4];
QA_UNROLL
        for (int j = 0; j < NT; j++)
QA_UNROLL
            for (int i = 0; i < 4; i++) {
                float v = s[4 * j + i] * p.scale_log2;
                if constexpr (MASK) {
                    const int key = j0 + j * 8 + 2 * t + (i & 1);
                    const int row = i0 + row_base + (i >> 1) * 8;
                    if (key >= p.seq_k || (p.causal && key > row + diag))
                        v = -INFINITY;
                }
                x[j][i] = v;
            }
        online_softmax(x, m, l, alpha, 0.f);
        /* k16 step kc: keys 16kc + {2t, 2t+1} and 16kc + 8 + {2t, 2t+1}, rows g and g + 8. */
QA_UNROLL
        for (int kc = 0; kc < 4; kc++) {
            if constexpr (BF16)
                pack_p16(pa[kc], x[2 * kc], x[2 * kc + 1], pack_bf16x2);
            else
                pack_p16(pa[kc], x[2 * kc], x[2 * kc + 1], pack_f16x2);
        }
    };
    auto softmax_tile = [&](int it, uint32_t (&pa)[4][4], float (&alpha)[2]) {
        if (it < n_plain)
            softmax(it, std::false_type(), pa, alpha);
        else
            softmax(it, std::true_type(), pa, alpha);
    };

    /* O = O * alpha, then O += P V of tile it (issued; the caller waits). */
    auto pv_issue = [&](int it, const uint32_t (&pa)[4][4], const float (&alpha)[2]) {
        const uint64_t desc_v = stage_desc(desc_v0, it);
QA_UNROLL
        for (int n = 0; n < DT; n++)
QA_UNROLL
            for (int i = 0; i < 4; i++)
                o[4 * n + i] *= alpha[i >> 1];
        fence_operands(o);
        wgmma_fence();
QA_UNROLL
        for (int kc = 0; kc < 4; kc++) {
            const uint64_t dv = desc_v + (uint64_t)(kc * (16 * 128 >> 4));
            if constexpr (BF16) {
                if constexpr (D == 128)
                    wgmma_bf16_n128_rs_tb(o, pa[kc], dv, 1);
                else
                    wgmma_bf16_n64_rs_tb(o, pa[kc], dv, 1);
            } else {
                if constexpr (D == 128)
                    wgmma_f16_n128_rs_tb(o, pa[kc], dv, 1);
                else
                    wgmma_f16_n64_rs_tb(o, pa[kc], dv, 1);
            }
        }
        wgmma_commit();
    };

    /* Prologue: Q with tile 0, then tiles 1 and 2 (one cp.async group each). */
    load_rows_blocked<kBlockM, D>(sQ, gQ, q_row, rows_valid);
QA_UNROLL
    for (int it = 0; it < 3; it++) {
        if (it < n_tiles)
            load_tile(it);
        cp_async_commit();
    }
    uint32_t pa[2][4][4];
    float alpha[2][2];
    if (n_tiles > 0) {
        cp_async_wait<2>();
        fence_proxy_async();
        sync_block();
        qk_issue(0);
        wgmma_wait<0>();
        fence_operands(s);
        softmax_tile(0, pa[0], alpha[0]);
    }

    /* The same pipeline as the FP8 kernel (see there). */
    auto step = [&](int it, const uint32_t (&pa_cur)[4][4], const float (&alpha_cur)[2], uint32_t (&pa_next)[4][4],
                    float (&alpha_next)[2]) {
        cp_async_wait<1>(); /* tile it + 1 has landed */
        fence_proxy_async();
        sync_block();
        if (it + 3 < n_tiles)
            load_tile(it + 3);
        cp_async_commit();
        const bool more = it + 1 < n_tiles;
        qk_issue(more ? it + 1 : it);
        pv_issue(it, pa_cur, alpha_cur);
        wgmma_wait<1>(); /* S of tile it + 1 (committed first) */
        fence_operands(s);
        if (more)
            softmax_tile(it + 1, pa_next, alpha_next);
        wgmma_wait<0>();
        fence_operands(o);
    };
    for (int it = 0; it < n_tiles; it += 2) {
        step(it, pa[0], alpha[0], pa[1], alpha[1]);
        if (it + 1 < n_tiles)
            step(it + 1, pa[1], alpha[1], pa[0], alpha[0]);
    }
    cp_async_wait<0>();

    store_rows<D>(p, ts, row_base, o, m, l, nullptr, 0.f, nullptr);
#else
    (void)p;
#endif
}

} // namespace sm90
} // namespace qa

#endif
