/*
 * sm_90a attention for the FP8 modes, warp-specialized: a producer warpgroup
 * streams Q, K and V^T into shared memory with the tensor memory accelerator
 * (cp.async.bulk.tensor completing on mbarriers) while two consumer
 * warpgroups of 64 query rows run the matrix work and the softmax.
 *
 * Why: the cp.async kernel (sm90_attn.cuh) spends about 210 of its ~550
 * instructions per warp and 64-key tile on load addresses, cp.async,
 * descriptors and the per-tile barrier (SASS of the 04:10 build), and each of
 * its warpgroups copies every K/V tile for itself. Here one thread issues two
 * bulk copies per tile into a ring of stages both consumers read; a consumer
 * waits on the stage's "full" barrier and, once its P V of that tile has
 * completed, arrives on the stage's "empty" barrier (one arrival per warp).
 * setmaxnreg moves registers from the producer (24) to the consumers (240).
 *
 * The tensor maps need no layout change of the workspace:
 *   Q   2-D (D bytes, all query rows), 128-row boxes;
 *   K   5-D view of the int8 rows that lands them in the permuted key order the
 *       P registers need (key_of<true>): smem row s of a tile holds key
 *       k = (k5 k4 k3 k2 k1 k0) at s = (k5 k4 k1 k3 k2 k0), so the dims are
 *       [D bytes][k0: 2][k3 k2: 4][k1: 2][key / 16], strides D, 4D, 2D, 16D.
 *       The last dim runs over every key of every head, so this needs
 *       seq_k % 16 == 0 (the planner keeps the cp.async kernel otherwise);
 *       keys past seq_k in a last partial tile belong to the next head or lie
 *       out of bounds (zero-filled) and are masked either way;
 *   V^T 2-D (padded keys, B * Hkv * D rows), 64-key boxes.
 * The consumers' pipeline is the cp.async kernel's (S of the next tile and
 * P V of this one issued together, softmax overlapped with P V), and with a
 * uniform K scale per tile (per-block and per-warp K) the softmax works on the
 * raw integer scores: max on them, then one FFMA per score into ex2.
 */
#ifndef QA_SM90_ATTN_WS_CUH
#define QA_SM90_ATTN_WS_CUH

#include <cuda.h> /* CUtensorMap (the type only; encoding goes through the runtime's driver entry point) */

#include "sm90_attn.cuh"

QA_NAMESPACE_BEGIN
namespace sm90 {

/* The CTA of both TMA kernels: a producer warpgroup and two consumer
 * warpgroups of 64 query rows. After setmaxnreg the consumers hold 240
 * registers and the producer 24: what the producer gives up is what the
 * consumers take (at launch every thread has 65536 / 384 = 168). (Three
 * consumers at 160 registers lost to 128-key steps with two: NOTES.md.) */
struct WsShape {
    static constexpr int kConsumers = 2;
    static constexpr int kThreads = 128 * (kConsumers + 1);
    static constexpr int kRows = 64 * kConsumers; /* query rows per CTA */
    static constexpr int kConsumerRegs = 240;
    static constexpr int kProducerRegs = 24;
    static constexpr int kSmemLimit = 232448; /* 227 KiB: the most dynamic shared memory a block may have */
    static constexpr int kAlign = 1024;       /* the 128-byte swizzle repeats every 1024 bytes */
    /* Stages of stage_bytes that fit next to Q (q_bytes) and the barriers, at most 8. */
    static constexpr int stages(int q_bytes, int stage_bytes)
    {
        return (kSmemLimit - kAlign - 256 - q_bytes) / stage_bytes < 8
                   ? (kSmemLimit - kAlign - 256 - q_bytes) / stage_bytes
                   : 8;
    }
};

struct TmaMaps {
    CUtensorMap q, k, v;
};

/* The FP8 kernel: steps of 128 keys (as the EXACT kernel's at D <= 128;
 * the plan's kv_tile says so). */
template <int D> struct WsTraits : WsShape {
    static constexpr int kBN = 128;
    static constexpr int kQBytes = kRows * D;       /* int8 Q, all consumers' rows */
    static constexpr int kKBytes = kBN * D;         /* int8 K, permuted key order in each 64 keys */
    static constexpr int kVBytes = D * kBN;         /* FP8 V^T: D rows of kBN keys */
    static constexpr int kCopyBytes = kKBytes + kVBytes; /* what the TMA copies per stage */
    /* Then 8 rows of E4M3 ones (V^T rows D..D+7) so that P V also sums each
     * row of P; stages stay 1024-byte aligned for the 128-byte swizzle. */
    static constexpr int kOnesBytes = 8 * kBN;
    static constexpr int kStageBytes = (kCopyBytes + kOnesBytes + 1023) / 1024 * 1024;
    static constexpr int kStages = stages(kQBytes, kStageBytes);
    static constexpr int kBarOffset = kQBytes + kStages * kStageBytes;
    static constexpr int kSmem = kBarOffset + 8 * (2 * kStages + 1) + kAlign;
    static constexpr int kQKSwizzle = D == 128 ? 128 : 64;
    static constexpr int kVSwizzle = kBN; /* V^T rows are kBN bytes: 64- or 128-byte swizzle */
    static_assert(kStages >= 2 && kSmem <= kSmemLimit, "more shared memory than a block may have");
};

#if defined(QA_SM90_DEVICE_CODE)
QA_DEV void mbar_init(uint32_t bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
QA_DEV void mbar_expect_tx(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
QA_DEV void mbar_arrive(uint32_t bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
QA_DEV void mbar_wait(uint32_t bar, uint32_t parity)
{
    asm volatile("{\n.reg .pred P1;\nLAB_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
QA_DEV void tma_load_2d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c0, int c1)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(bar), "r"(c0), "r"(c1)
                 : "memory");
}
QA_DEV void tma_load_5d(uint32_t dst, const CUtensorMap *map, uint32_t bar, int c4)
{
    asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %3, %3, %3, %4}], [%2];\n" ::"r"(dst),
                 "l"((uint64_t)map), "r"(bar), "r"(0), "r"(c4)
                 : "memory");
}
QA_DEV void prefetch_tensor_map(const CUtensorMap *map)
{
    asm volatile("prefetch.tensormap [%0];\n" ::"l"((uint64_t)map) : "memory");
}
template <int N> QA_DEV void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> QA_DEV void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }

/* The mbarriers of a ring of S stages plus Q's, 8 bytes each from `bars`:
 * "full" completes when a stage's copies have landed (the producer's
 * expect_tx, then the bytes), "empty" when every consumer warp has finished
 * reading it (P V of that step completed). Both TMA kernels use it. */
template <int S> struct StageRing {
    uint32_t bars;
    QA_DEV uint32_t full(int it) const { return bars + 8 * (it % S); }
    QA_DEV uint32_t empty(int it) const { return bars + 8 * (S + it % S); }
    QA_DEV uint32_t q() const { return bars + 16 * S; }
    /* By one thread, before the block barrier that publishes the barriers. */
    QA_DEV void init(int consumer_warps) const
    {
        for (int s = 0; s < S; s++) {
            mbar_init(full(s), 1);
            mbar_init(empty(s), consumer_warps);
        }
        mbar_init(q(), 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        fence_proxy_async();
    }
    /* Producer: wait until step it's stage is free (its previous use read). */
    QA_DEV void acquire(int it) const
    {
        if (it >= S)
            mbar_wait(empty(it), (uint32_t)((it / S - 1) & 1));
    }
    /* Consumers: wait for step it's data; release it once this warp's P V of it completed. */
    QA_DEV void wait_full(int it) const { mbar_wait(full(it), (uint32_t)((it / S) & 1)); }
    QA_DEV void release(int it, int lane) const
    {
        if (lane == 0)
            mbar_arrive(empty(it));
    }
};

/* Dynamic shared memory aligned to ALIGN bytes (the kernels ask for ALIGN more). */
template <int ALIGN> QA_DEV uint8_t *aligned_smem()
{
    uint8_t *raw = dynamic_smem();
    return raw + ((ALIGN - (smem_u32(raw) & (ALIGN - 1))) & (ALIGN - 1));
}

/* tile_span in steps of `keys` keys (it counts 64-key tiles): n_tiles rounds
 * up, n_plain (steps needing no mask) down. */
QA_DEV TileSpan tile_span_steps(const AttnParams &p, int rows, int keys)
{
    TileSpan ts = tile_span(p, rows);
    ts.n_tiles = (ts.n_tiles * kBlockN + keys - 1) / keys;
    ts.n_plain = ts.n_plain * kBlockN / keys;
    return ts;
}

/* Online softmax of a step of NB 64-key blocks, each with one K scale
 * (per-block and per-warp K): the scores stay in their integer form
 * r = 1.5 * 2^23 + s (read as floats: exact, and ordered like s), so a
 * block's max needs one scaling and each probability is one FFMA into ex2:
 * exp2(r * sc - (1.5 * 2^23 * sc + m - p_log2)), sc = q_scale * k_scale *
 * log2(e) * sm_scale of its block. Masked scores are -inf in r. No row sums:
 * P V sums the rows (the ones block after V^T). */
template <int NT, int NB>
QA_DEV void online_softmax_raw(float (&r)[NT][4], const float (&sc)[2][NB], float (&m)[2], float (&alpha)[2],
                               float p_log2)
{
    constexpr int JB = NT / NB; /* column groups per block */
QA_UNROLL
    for (int hh = 0; hh < 2; hh++) {
        float tile_max = -INFINITY; /* stays -inf for a row with no unmasked key */
QA_UNROLL
        for (int b = 0; b < NB; b++) {
            /* Four partial maxima: dependent chains of JB / 4, not JB. */
            float part[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
QA_UNROLL
            for (int j = b * JB; j < (b + 1) * JB; j++)
                part[j & 3] = fmax_(part[j & 3], fmax_(r[j][2 * hh], r[j][2 * hh + 1]));
            const float mx = fmax_(fmax_(part[0], part[1]), fmax_(part[2], part[3]));
            tile_max = fmax_(tile_max, (mx - 12582912.0f) * sc[hh][b]);
        }
        tile_max = fmax_(tile_max, shfl_xor(tile_max, 1));
        tile_max = fmax_(tile_max, shfl_xor(tile_max, 2));
        const float m_new = fmax_(m[hh], tile_max);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[hh] = ex2(m[hh] - m_use);
        m[hh] = m_new;
QA_UNROLL
        for (int b = 0; b < NB; b++) {
            const float bias = fmaf(12582912.0f, sc[hh][b], m_use - p_log2);
QA_UNROLL
            for (int j = b * JB; j < (b + 1) * JB; j++)
QA_UNROLL
                for (int e = 0; e < 2; e++)
                    r[j][2 * hh + e] = ex2(fmaf(r[j][2 * hh + e], sc[hh][b], -bias));
        }
    }
}
#endif

template <int D, bool F16ACC, bool UNIFORM_K, bool SPARSE = false>
__global__ void __launch_bounds__(WsShape::kThreads, 1)
    attention_fp8_ws_kernel(const AttnParams p, const __grid_constant__ TmaMaps maps)
{
#if defined(QA_SM90_DEVICE_CODE)
    using T = WsTraits<D>;
    constexpr int BN = T::kBN;      /* keys per step */
    constexpr int NB = BN / 64;     /* 64-key blocks (K quantization blocks) per step */
    constexpr int NT = BN / 8;      /* n8 column groups of S */
    constexpr int DT = D / 8;       /* n8 column groups of O */
    constexpr int S = T::kStages;

    if (p.status && load_volatile(p.status))
        return; /* non-finite input: leave the outputs untouched (every thread returns here) */

    uint8_t *smem = aligned_smem<T::kAlign>();
    const uint32_t sQ = smem_u32(smem);
    const uint32_t sStage = sQ + T::kQBytes;
    const StageRing<S> ring{sQ + T::kBarOffset};

    /* The ones block of every stage (never overwritten: the copies end before it). */
    for (int i = tid(); i < S * T::kOnesBytes / 4; i += T::kThreads) {
        const int stage = i / (T::kOnesBytes / 4), word = i % (T::kOnesBytes / 4);
        *(uint32_t *)(smem + T::kQBytes + stage * T::kStageBytes + T::kCopyBytes + 4 * word) = 0x38383838u; /* E4M3 1.0 */
    }
    fence_proxy_async(); /* generic-proxy writes that wgmma reads */
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
        /* Producer: one thread issues every copy. */
        setmaxnreg_dec<T::kProducerRegs>();
        if (tid() == 0) {
            prefetch_tensor_map(&maps.q);
            prefetch_tensor_map(&maps.k);
            prefetch_tensor_map(&maps.v);
            mbar_expect_tx(ring.q(), T::kQBytes);
            tma_load_2d(sQ, &maps.q, ring.q(), 0, (int)(ts.bhq * p.seq_q + ts.i0));
            const int key16 = (int)(ts.bhk * p.seq_k / 16);
            const int v_row = (int)(ts.bhk * D);
            for (int it = 0; it < n_steps; it++) {
                const int ks = kstep(it);
                ring.acquire(it);
                const uint32_t stage = sStage + (uint32_t)((it % S) * T::kStageBytes);
                mbar_expect_tx(ring.full(it), T::kCopyBytes);
                tma_load_5d(stage, &maps.k, ring.full(it), key16 + ks * (BN / 16));
                tma_load_2d(stage + T::kKBytes, &maps.v, ring.full(it), ks * BN, v_row);
            }
        }
    } else {
        setmaxnreg_inc<T::kConsumerRegs>();
        const int lane = lane_id();
        const int cw = (warp >> 2) - 1, wl = warp & 3; /* consumer warpgroup, warp within it */
        const int g = lane >> 2, t = lane & 3;
        const int i0 = ts.i0, diag = ts.diag, n_tiles = n_steps, n_plain = ts.n_plain;
        const int64_t bhq = ts.bhq, bhk = ts.bhk;

        /* This thread's two rows (within the CTA tile): r and r + 8. Rows past
         * seq_q get a harmless positive scale (never stored; a zero would turn
         * masked -inf scores into NaN in the raw-score softmax). */
        const int row_base = cw * 64 + wl * 16 + g;
        float q_scale[2];
QA_UNROLL
        for (int hh = 0; hh < 2; hh++) {
            const int row = i0 + row_base + hh * 8;
            const int64_t grp = (int64_t)(row / p.q_block) * p.q_inter + (row % p.q_block) % p.q_inter;
            q_scale[hh] = row < p.seq_q ? p.q_scale[bhq * p.q_groups + grp] * p.scale_log2 : 1e-6f;
        }

        [[maybe_unused]] RowKeys rk[2];
        if constexpr (SPARSE)
            for (int hh = 0; hh < 2; hh++)
                rk[hh] = sparse_row_keys(p.sp, p.seq_q, p.seq_k, p.causal != 0, i0 + row_base + hh * 8);

        float o[DT * 4];
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
QA_UNROLL
        for (int i = 0; i < DT * 4; i++)
            o[i] = 0.f;

        int32_t s[NT * 4];
QA_UNROLL
        for (int i = 0; i < NT * 4; i++)
            s[i] = 0;
        const uint64_t desc_q = smem_desc<T::kQKSwizzle>(sQ + cw * 64 * D);
        const uint64_t desc_k0 = smem_desc<T::kQKSwizzle>(sStage);
        const uint64_t desc_v0 = smem_desc<T::kVSwizzle>(sStage + T::kKBytes);
        auto stage_desc = [&](uint64_t base, int it) { return base + (uint64_t)((it % S) * (T::kStageBytes >> 4)); };
        auto qk_issue = [&](int it) {
            const uint64_t desc_k = stage_desc(desc_k0, it);
            fence_operands(s);
            wgmma_fence();
QA_UNROLL
            for (int ks = 0; ks < D / 32; ks++) { /* k32 steps: 32 bytes along the row */
                if constexpr (BN == 128)
                    wgmma_s8_n128_ss(s, desc_q + 2 * ks, desc_k + 2 * ks, ks);
                else
                    wgmma_s8_n64_ss(s, desc_q + 2 * ks, desc_k + 2 * ks, ks);
            }
            wgmma_commit();
        };

        /* The K scales of step it that this thread's columns use, per 64-key
         * block b: k_scale[b][column group parity][column parity] (loaded a
         * step ahead: a global load on the softmax's critical path stalls it).
         * Blocks past the last key (all masked) read the last block's. */
        const int k_blocks = (p.seq_k + kBlockN - 1) / kBlockN;
        auto load_k_scales = [&](int it, float (&k_scale)[T::kBN / 64][2][2]) {
QA_UNROLL
            for (int b = 0; b < NB; b++) {
                const int blk = min(kstep(it) * NB + b, k_blocks - 1);
                const float *ks_tile = p.k_scale + bhk * p.k_groups + (int64_t)blk * p.k_inter;
                if constexpr (UNIFORM_K) {
                    k_scale[b][0][0] = k_scale[b][0][1] = k_scale[b][1][0] = k_scale[b][1][1] = ks_tile[0];
                } else {
QA_UNROLL
                    for (int jb = 0; jb < 2; jb++)
QA_UNROLL
                        for (int cb = 0; cb < 2; cb++)
                            k_scale[b][jb][cb] = ks_tile[key_of<true>(jb, 2 * t + cb) % 8];
                }
            }
        };
        /* -inf for a key past seq_k or (causal) right of this row's diagonal;
         * column group j, element i of the S fragment, K rows in key_of order. */
        /* Sparse: outside the row's windows or sinks, or in a cell the layout drops. */
        [[maybe_unused]] uint64_t cells = ~(uint64_t)0;
        auto masked = [&](float v, int j0, int j, int i) {
            const int kl = key_of<true>(j, 2 * t + (i & 1));
            const int key = j0 + kl;
            if constexpr (SPARSE)
                return sparse_visible(rk[i >> 1], key, p.seq_k, cells, (cw * 4 + wl) * 8 + (kl >> 4)) ? v : -INFINITY;
            const int row = i0 + row_base + (i >> 1) * 8;
            return key >= p.seq_k || (p.causal && key > row + diag) ? -INFINITY : v;
        };
        auto softmax = [&](int it, auto mask_tag, const float (&k_scale)[T::kBN / 64][2][2],
                           uint32_t (&pa)[T::kBN / 32][4], float (&alpha)[2], float (&pv_sum)[2]) {
            constexpr bool MASK = decltype(mask_tag)::value;
            const int j0 = kstep(it) * BN;
            if constexpr (SPARSE && MASK)
                cells = walk.cell_mask(it);
            float x[NT][4];
            if constexpr (UNIFORM_K) {
                /* The raw scores (see online_softmax_raw). A zero scale (a Q row
                 * or K block of zeros or values below QATTN_QUANT_MIN_AMAX: all its
                 * codes are 0, so every unmasked raw score is exactly 1.5 * 2^23)
                 * would turn the masked -inf scores into NaN (-inf * 0); any
                 * positive stand-in gives the same, exact, zero scores.
                 * A negative sm_scale (every scale then has its sign: Q and K scales
                 * are >= 0) mirrors the raw scores, r' = 3 * 2^23 - r (exact), so
                 * that (r' - 1.5 * 2^23) |sc| = s sc and the maximum stays the maximum. */
                const bool mirror = p.scale_log2 < 0.f;
                float sc[2][NB];
QA_UNROLL
                for (int b = 0; b < NB; b++) {
                    sc[0][b] = fabsf(q_scale[0] * k_scale[b][0][0]);
                    sc[1][b] = fabsf(q_scale[1] * k_scale[b][0][0]);
                    sc[0][b] = sc[0][b] != 0.f ? sc[0][b] : 1e-30f;
                    sc[1][b] = sc[1][b] != 0.f ? sc[1][b] : 1e-30f;
                }
QA_UNROLL
                for (int j = 0; j < NT; j++)
QA_UNROLL
                    for (int i = 0; i < 4; i++) {
                        float v = __int_as_float(s[4 * j + i] + 0x4B400000);
                        if (mirror)
                            v = 25165824.0f - v;
                        x[j][i] = MASK ? masked(v, j0, j, i) : v;
                    }
                online_softmax_raw(x, sc, m, alpha, kLog2P8);
            } else {
                /* Per-thread K scales differ between columns: scale each score
                 * (one FFMA from the raw form), then the float softmax. */
                float sc[NB][2][2][2], nb[NB][2][2][2];
QA_UNROLL
                for (int b = 0; b < NB; b++)
QA_UNROLL
                    for (int jb = 0; jb < 2; jb++)
QA_UNROLL
                        for (int hh = 0; hh < 2; hh++)
QA_UNROLL
                            for (int cb = 0; cb < 2; cb++) {
                                sc[b][jb][hh][cb] = q_scale[hh] * k_scale[b][jb][cb];
                                nb[b][jb][hh][cb] = -12582912.0f * sc[b][jb][hh][cb];
                            }
QA_UNROLL
                for (int j = 0; j < NT; j++)
QA_UNROLL
                    for (int i = 0; i < 4; i++) {
                        float v = fmaf(__int_as_float(s[4 * j + i] + 0x4B400000), sc[j >> 3][j & 1][i >> 1][i & 1],
                                       nb[j >> 3][j & 1][i >> 1][i & 1]);
                        x[j][i] = MASK ? masked(v, j0, j, i) : v;
                    }
                online_softmax<NT, false>(x, m, l, alpha, kLog2P8);
            }
            /* pv_threshold: this warp's 16 rows skip P V; their sums, which the
             * ones block would have given, go to l directly (o_update). */
            pv_sum[0] = pv_sum[1] = 0.f;
            if constexpr (SPARSE) {
                if (p.sp.pv_threshold > 0.f)
                    pv_group_skip(x, p.sp.pv_threshold, 448.f, i0 + row_base < p.seq_q, i0 + row_base + 8 < p.seq_q,
                                  pv_sum);
            }
            /* P x448 to E4M3 in the A-register layout (see sm90_attn.cuh). */
QA_UNROLL
            for (int kc = 0; kc < BN / 32; kc++) {
                const float *p0 = x[4 * kc], *p1 = x[4 * kc + 1], *p2 = x[4 * kc + 2], *p3 = x[4 * kc + 3];
                pa[kc][0] = pack_e4m3x4(p0[0], p0[1], p1[0], p1[1]);
                pa[kc][1] = pack_e4m3x4(p0[2], p0[3], p1[2], p1[3]);
                pa[kc][2] = pack_e4m3x4(p2[0], p2[1], p3[0], p3[1]);
                pa[kc][3] = pack_e4m3x4(p2[2], p2[3], p3[2], p3[3]);
            }
        };
        auto softmax_tile = [&](int it, const float (&k_scale)[T::kBN / 64][2][2], uint32_t (&pa)[T::kBN / 32][4],
                                float (&alpha)[2], float (&pv_sum)[2]) {
            bool plain;
            if constexpr (SPARSE)
                plain = !walk.masked(it);
            else
                plain = it < n_plain;
            if (plain)
                softmax(it, std::false_type(), k_scale, pa, alpha, pv_sum);
            else
                softmax(it, std::true_type(), k_scale, pa, alpha, pv_sum);
        };

        using Acc = typename std::conditional<F16ACC, uint32_t, float>::type;
        /* D columns of P V and 8 of row sums of P (all equal), fresh each
         * step. F16ACC: fp16 over the whole step, kept finite by the plan's
         * V bound (steps x 448 x v_fp8_max < 65504; cuda_plan.c). */
        constexpr int kAccRegs = F16ACC ? (DT + 1) * 2 : (DT + 1) * 4;
        constexpr int NACC = 1;
        Acc acc[NACC][kAccRegs];
QA_UNROLL
        for (int a = 0; a < NACC; a++)
QA_UNROLL
            for (int i = 0; i < kAccRegs; i++)
                acc[a][i] = 0;
        auto pv_issue = [&](int it, const uint32_t (&pa)[T::kBN / 32][4]) {
            const uint64_t desc_v = stage_desc(desc_v0, it);
QA_UNROLL
            for (int a = 0; a < NACC; a++)
                fence_operands(acc[a]);
            wgmma_fence();
QA_UNROLL
            for (int kc = 0; kc < BN / 32; kc++) { /* k32 steps: 32 keys (bytes) along the V^T rows */
                const uint64_t dv = desc_v + 2 * kc;
                if constexpr (F16ACC) {
                    if constexpr (D == 128)
                        wgmma_e4m3_n136_rs_f16(acc[0], pa[kc], dv, kc);
                    else
                        wgmma_e4m3_n72_rs_f16(acc[0], pa[kc], dv, kc);
                } else {
                    if constexpr (D == 128)
                        wgmma_e4m3_n136_rs_f32(acc[0], pa[kc], dv, kc);
                    else
                        wgmma_e4m3_n72_rs_f32(acc[0], pa[kc], dv, kc);
                }
            }
            wgmma_commit();
        };
        auto o_update = [&](const float (&alpha)[2], const float (&pv_sum)[2]) {
QA_UNROLL
            for (int n = 0; n < DT; n++) {
                if constexpr (F16ACC) {
                    o[4 * n + 0] = o[4 * n + 0] * alpha[0] + f16_lo(acc[0][2 * n]);
                    o[4 * n + 1] = o[4 * n + 1] * alpha[0] + f16_hi(acc[0][2 * n]);
                    o[4 * n + 2] = o[4 * n + 2] * alpha[1] + f16_lo(acc[0][2 * n + 1]);
                    o[4 * n + 3] = o[4 * n + 3] * alpha[1] + f16_hi(acc[0][2 * n + 1]);
                } else {
QA_UNROLL
                    for (int i = 0; i < 4; i++)
                        o[4 * n + i] = o[4 * n + i] * alpha[i >> 1] + acc[0][4 * n + i];
                }
            }
            if constexpr (F16ACC) {
                l[0] = l[0] * alpha[0] + f16_lo(acc[0][2 * DT]);
                l[1] = l[1] * alpha[1] + f16_lo(acc[0][2 * DT + 1]);
            } else {
                l[0] = l[0] * alpha[0] + acc[0][4 * DT];
                l[1] = l[1] * alpha[1] + acc[0][4 * DT + 2];
            }
            if constexpr (SPARSE) {
                l[0] += pv_sum[0];
                l[1] += pv_sum[1];
            }
        };

        uint32_t pa[2][BN / 32][4];
        float alpha[2][2], pv_sum[2][2];
        /* K scales, loaded a step before their softmax (an L2 round trip is
         * longer than the S GEMM it would otherwise hide behind). */
        float k_scale[2][NB][2][2];
        mbar_wait(ring.q(), 0);
        if (n_tiles > 0) {
            ring.wait_full(0);
            load_k_scales(0, k_scale[0]);
            load_k_scales(min(1, n_tiles - 1), k_scale[1]);
            qk_issue(0);
            wgmma_wait<0>();
            fence_operands(s);
            softmax_tile(0, k_scale[0], pa[0], alpha[0], pv_sum[0]);
        }
        /* Iteration it: S of tile it + 1 and P V of tile it issued back to back,
         * the softmax of tile it + 1 while P V runs (sm90_attn.cuh). The last
         * tile issues a throwaway S of itself so that every path has the same
         * wgmma groups in flight. */
        auto step = [&](int it, const uint32_t (&pa_cur)[T::kBN / 32][4], const float (&alpha_cur)[2],
                        const float (&sum_cur)[2], uint32_t (&pa_next)[T::kBN / 32][4], float (&alpha_next)[2],
                        float (&sum_next)[2], const float (&ks_next)[T::kBN / 64][2][2],
                        float (&ks_after)[T::kBN / 64][2][2]) {
            const bool more = it + 1 < n_tiles;
            const int next = more ? it + 1 : it;
            /* ks_after held tile it's scales, used by the previous softmax. */
            load_k_scales(min(it + 2, n_tiles - 1), ks_after);
            if (more)
                ring.wait_full(next);
            qk_issue(next);
            pv_issue(it, pa_cur);
            wgmma_wait<1>(); /* S of the next tile (committed first) */
            fence_operands(s);
            /* o_update reads sum_cur after the softmax: copy it first (the
             * next softmax writes the other slot, but keep it obvious). */
            const float sc0 = sum_cur[0], sc1 = sum_cur[1];
            if (more)
                softmax_tile(next, ks_next, pa_next, alpha_next, sum_next);
            wgmma_wait<0>();
QA_UNROLL
            for (int a = 0; a < NACC; a++)
                fence_operands(acc[a]);
            ring.release(it, lane);
            const float cur_sum[2] = {sc0, sc1};
            o_update(alpha_cur, cur_sum);
        };
        for (int it = 0; it < n_tiles; it += 2) {
            step(it, pa[0], alpha[0], pv_sum[0], pa[1], alpha[1], pv_sum[1], k_scale[1], k_scale[0]);
            if (it + 1 < n_tiles)
                step(it + 1, pa[1], alpha[1], pv_sum[1], pa[0], alpha[0], pv_sum[0], k_scale[0], k_scale[1]);
        }
        /* Every thread of a row holds the whole row sum; store_rows adds the
         * four threads' parts. */
        if (t != 0)
            l[0] = l[1] = 0.f;
        store_rows<D>(p, ts, row_base, o, m, l, p.v_scale + bhk * D, kLog2P8, p.q_kmean);
    }
#else
    (void)p;
    (void)maps;
#endif
}

} // namespace sm90
QA_NAMESPACE_END

#endif
