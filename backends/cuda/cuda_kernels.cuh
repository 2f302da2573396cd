/*
 * qattn's CUDA kernels: the quantization passes and one flash-attention
 * kernel template for every precision mode.
 *
 * Attention (FlashAttention-2 structure, mma.sync on tensor cores):
 *   CTA = 4 warps x 32 query rows (128 rows), key tiles of 64. Each warp owns
 *   two m16 row tiles; K and V tiles are loaded with cp.async, Q/K/V fragments
 *   with ldmatrix. Online softmax in the log2 domain in registers; P is
 *   reused from registers as the A operand of P.V.
 *     QK:  fp16/bf16 m16n8k16 (exact) or s8 m16n8k32 (quantized, fp32 dequant
 *          with the row's Q scale and the key's K scale).
 *     PV:  fp16/bf16 m16n8k16 with fp32 accumulation (exact, INT8_FP16), or
 *          e4m3 m16n8k32 (P x448, V^T per-channel FP8) accumulated per 64-key
 *          block in a fresh accumulator, then added to fp32 (INT8_FP8), or
 *          with fp16 accumulation over the block (INT8_FP8_F16ACC).
 *   FP8 P.V needs each thread's P values in the A layout (4 consecutive keys
 *   per register), while the QK accumulator gives 2 consecutive keys per n8
 *   tile. Instead of shuffling P or permuting V, the K tile is stored in
 *   shared memory in a permuted key order (key_of), so the QK accumulator
 *   comes out directly in the FP8 A layout and V keeps its natural order.
 */
#ifndef QA_CUDA_KERNELS_CUH
#define QA_CUDA_KERNELS_CUH

#include "internal.h"
#include "cuda_device.cuh"
#include "cuda_sparse.cuh"

QA_NAMESPACE_BEGIN

enum class Qk { F16, BF16, S8 };
/* P.V: fp16/bf16 (exact, INT8_FP16); e4m3 mma with fp32 or fp16 accumulation
 * (sm_89+); e4m3-valued P and V on the fp16 mma (sm_90, where ptxas would
 * otherwise expand each e4m3 mma into unpacks and two fp16 mmas). */
enum class Pv { F16, BF16, E4M3_F32, E4M3_F16, E4M3H_F32, E4M3H_F16 };

constexpr int kThreads = 128;
constexpr int kBlockM = 128; /* query rows per CTA */
constexpr int kBlockN = 64;  /* keys per tile (also the K quantization block) */
constexpr float kLog2P8 = 8.807354922057604f; /* log2(448): P is scaled by 448 before FP8 */
constexpr float kLn2 = 0.6931471805599453f;

/* dtype codes, as qattn_dtype */
constexpr int kF32 = 0, kF16 = 1, kBF16 = 2;

struct AttnParams {
    /* exact: inputs (first elements) and element strides [b, h, n] */
    const uint8_t *q, *k, *v;
    int64_t q_stride[3], k_stride[3], v_stride[3];
    /* quantized: workspace regions */
    const int8_t *q8, *k8;
    const uint8_t *vq;
    const float *q_scale, *k_scale, *v_scale, *q_kmean;
    int64_t q_groups, k_groups, v_keys_padded;
    int q_block, q_inter, k_inter;
    /* outputs */
    uint8_t *o;
    int64_t o_stride[3];
    int out_dtype;
    float *lse;
    const uint32_t *status; /* the status words (QATTN_STATUS_*), or NULL */
    int heads_q, heads_kv, group, seq_q, seq_k, q_tiles;
    int causal;
    float scale_log2; /* sm_scale * log2(e) */
    SparseParams sp;  /* sparse plans (the SPARSE instantiations read it) */
};

/* Byte offset of 16-byte chunk c of row r in a tile with C chunks per row,
 * XOR-swizzled so that ldmatrix's 8 rows at one chunk hit 8 different bank groups. */
template <int C> QA_DEV int swz(int r, int c)
{
    static_assert(C == 4 || C % 8 == 0, "rows of 64 bytes or multiples of 128");
    if constexpr (C == 4)
        return r * 64 + ((c ^ ((r >> 1) & 3)) << 4);
    else
        return r * C * 16 + ((c ^ (r & 7)) << 4);
}

/* ldmatrix addresses: a lane's row and chunk are (lane part + r0, lane part + 2k)
 * for a compile-time row offset r0 (a multiple of 8 rows) and k-th pair of
 * chunks. With the swizzle above, offset(r0 + r, 2k + c) = (offset(r, c) + r0
 * * row bytes) ^ (k << 5): the lane's base offset is computed once and each
 * fragment costs one XOR. */
template <int C> QA_DEV int frag_off(int lane_base, int row0, int k)
{
    return (lane_base + row0 * C * 16) ^ (k << 5);
}

/* The key (within a 64-key tile) in column c of QK n8 tile j. Natural order,
 * or for FP8 P.V: thread t's columns {2t, 2t+1} of tiles 4i..4i+3 hold keys
 * 32i + {4t..4t+3} and 32i + 16 + {4t..4t+3}, the e4m3 A-fragment layout. */
template <bool FP8> QA_HOSTDEV int key_of(int j, int c)
{
    if constexpr (FP8) {
        int jj = j & 3;
        return 32 * (j >> 2) + (jj >> 1) * 16 + 4 * (c >> 1) + (jj & 1) * 2 + (c & 1);
    } else {
        return j * 8 + c;
    }
}

/* cp.async rows [0, nrows) of a tile (C chunks per row) from g; rows >= valid
 * are zero-filled. Thread t copies chunk t % C of rows t / C + i * (128 / C):
 * one source pointer and one shared offset per thread, advanced by constants. */
template <int C>
QA_DEV void load_tile(uint8_t *smem, const uint8_t *g, int64_t row_bytes, int nrows, int valid)
{
    constexpr int RS = kThreads / C; /* rows per pass; a multiple of 8, so the swizzle is per-thread constant */
    const int c = tid() % C, r0 = tid() / C;
    const uint8_t *src = opaque_ptr(g + r0 * row_bytes + c * 16);
    uint8_t *dst = smem + swz<C>(r0, c);
    QA_UNROLL
    for (int i = 0; i < nrows / RS; i++) {
        bool ok = r0 + i * RS < valid;
        cp_async16(dst + i * RS * C * 16, ok ? src + i * RS * row_bytes : g, ok);
    }
}

/* 16 bytes from global memory (rows are 16-byte aligned). */
struct Vec16 {
    uint8_t b[16];
};
QA_DEV Vec16 load16(const uint8_t *p)
{
    Vec16 v;
#if defined(QA_EMULATE)
    memcpy(v.b, p, 16);
#else
    *(uint4 *)v.b = *(const uint4 *)p;
#endif
    return v;
}
QA_DEV void store16(uint8_t *p, const Vec16 &v)
{
#if defined(QA_EMULATE)
    memcpy(p, v.b, 16);
#else
    *(uint4 *)p = *(const uint4 *)v.b;
#endif
}

/* The same for shared memory (generic addressing works for both). */
QA_DEV Vec16 load16_shared(const uint8_t *p) { return load16(p); }
QA_DEV void store16_shared(uint8_t *p, const Vec16 &v) { store16(p, v); }

/* 16 E4M3 codes to 16 fp16 values: codes 0-7 into lo, 8-15 into hi. */
QA_DEV void widen_e4m3x16(const Vec16 &src, Vec16 &lo, Vec16 &hi)
{
    uint32_t w[4], out[8];
    memcpy(w, src.b, 16);
QA_UNROLL
    for (int i = 0; i < 4; i++) {
        out[2 * i] = e4m3x2_to_f16x2(w[i] & 0xffffu);
        out[2 * i + 1] = e4m3x2_to_f16x2(w[i] >> 16);
    }
    memcpy(lo.b, out, 16);
    memcpy(hi.b, out + 4, 16);
}

/* cp.async of a tile of R rows x C 16-byte chunks; rows >= valid are
 * zero-filled. Thread t copies chunk t % C of rows t / C + i * (kThreads / C):
 * a fixed trip count and one running source pointer, so the addresses cost
 * two registers, and the swizzled shared-memory offsets fold to immediates
 * (the row's low bits, which the swizzle reads, do not change with i).
 * Tile row r comes from source row row_key(r) of g (rows row_bytes apart);
 * row_key must commute with the step (a permutation inside aligned groups of
 * 16 rows does when the step is a multiple of 16). */
template <int R, int C, typename RowKey>
QA_DEV void load_rows(uint8_t *smem, const uint8_t *g, int64_t row_bytes, int valid, RowKey row_key)
{
    constexpr int STEP = kThreads / C;
    static_assert(kThreads % C == 0 && R % STEP == 0, "tile shape");
    const int c = tid() % C, r0 = tid() / C;
    int src_row = row_key(r0);
    const uint8_t *src = g + (int64_t)src_row * row_bytes + c * 16;
    const int64_t step_bytes = (int64_t)STEP * row_bytes;
QA_UNROLL
    for (int i = 0; i < R / STEP; i++) {
        const bool ok = src_row + i * STEP < valid;
        cp_async16(smem + swz<C>(r0 + i * STEP, c), ok ? src : g, ok);
        src += step_bytes;
    }
}

struct NaturalRows {
    QA_DEV int operator()(int r) const { return r; }
};

template <Pv PV> constexpr bool pv_is_fp8() { return PV != Pv::F16 && PV != Pv::BF16; }

/* The 16-bit A fragment of P for one k16 step, from the S accumulators of its
 * two n8 tiles p0 and p1 (rows g and g + 8, keys 2t and 2t + 1 of each);
 * pack converts a pair of floats (fp16, bf16, or E4M3-rounded fp16). */
template <typename Pack> QA_DEV void pack_p16(uint32_t (&pa)[4], const float *p0, const float *p1, Pack pack)
{
    pa[0] = pack(p0[0], p0[1]);
    pa[1] = pack(p0[2], p0[3]);
    pa[2] = pack(p1[0], p1[1]);
    pa[3] = pack(p1[2], p1[3]);
}

template <int D, Qk QK, Pv PV> struct AttnTraits {
    /* P x448 and V from the FP8 V^T workspace. */
    static constexpr bool kFp8 = pv_is_fp8<PV>();
    /* Native e4m3 mma: K rows are permuted so that S comes out in the e4m3 A layout. */
    static constexpr bool kPermK = PV == Pv::E4M3_F32 || PV == Pv::E4M3_F16;
    /* FP8 values on the fp16 tensor path (sm_90, where mma e4m3 is not native):
     * V^T widened to fp16 once per tile in shared memory. */
    static constexpr bool kVh = PV == Pv::E4M3H_F32 || PV == Pv::E4M3H_F16;
    static constexpr int kQkBytes = QK == Qk::S8 ? 1 : 2;
    static constexpr int kQC = D * kQkBytes / 16;                /* chunks per Q/K row */
    static constexpr int kVC = kFp8 ? kBlockN / 16 : D * 2 / 16; /* chunks per V row as copied */
    static constexpr int kVRows = kFp8 ? D : kBlockN;
    static constexpr int kHC = kBlockN * 2 / 16; /* chunks per fp16 V^T row */
    static constexpr int kQBytes = kBlockM * kQC * 16;
    static constexpr int kKBytes = kBlockN * kQC * 16;
    static constexpr int kVBytes = kVRows * kVC * 16;
    static constexpr int kVhBytes = kVh ? D * kHC * 16 : 0;
    static constexpr int kSmem = kQBytes + kKBytes + kVBytes + kVhBytes;
};

/*
 * One CTA: 128 query rows of one (batch, head), all key tiles it may see.
 * Per key tile (FlashAttention-2 order, two barriers):
 *   wait K; barrier; copy V (async) | S = Q K^T; scale; mask (edge tiles only)
 *   wait V; [sm_90 FP8: widen own V^T chunks to fp16]; barrier; copy next K
 *   online softmax; O += P V
 */
template <int D, Qk QK, Pv PV, bool SPARSE = false> QA_KERNEL(kThreads) attention_kernel(const AttnParams p)
{
    using T = AttnTraits<D, QK, PV>;
    constexpr bool FP8 = T::kFp8, PERM = T::kPermK, VH = T::kVh;
    constexpr int QC = T::kQC, VC = T::kVC, HC = T::kHC;
    constexpr int NT = kBlockN / 8; /* n8 tiles of S */
    constexpr int DT = D / 8;       /* n8 tiles of O */
    constexpr int MT = 2;           /* m16 tiles per warp */

    if (p.status && load_volatile(p.status))
        return; /* non-finite input: leave the outputs untouched */

    uint8_t *smem = dynamic_smem();
    uint8_t *sQ = smem, *sK = smem + T::kQBytes, *sV = smem + T::kQBytes + T::kKBytes;
    uint8_t *sVh = sV + T::kVBytes;
    const saddr aQ = smem_addr(sQ), aK = smem_addr(sK), aV = smem_addr(sV), aVh = smem_addr(sVh);

    const int lane = lane_id(), warp = warp_id();
    const int g = lane >> 2, t = lane & 3;
    const int bx = block_x();
    const int bh = bx / p.q_tiles;
    const int tile = p.q_tiles - 1 - bx % p.q_tiles; /* last tiles (most causal work) first */
    const int b = bh / p.heads_q, h = bh % p.heads_q, hk = h / p.group;
    const int i0 = tile * kBlockM;
    const int rows_valid = min(kBlockM, p.seq_q - i0);
    const int64_t bhq = (int64_t)b * p.heads_q + h, bhk = (int64_t)b * p.heads_kv + hk;
    const int diag = p.seq_k - p.seq_q; /* bottom-right causal offset */

    int key_end = p.seq_k;
    int mask_from = p.seq_k; /* the first key some row of this tile may not see */
    if (p.causal) {
        key_end = min(p.seq_k, i0 + rows_valid + diag);
        mask_from = max(0, min(p.seq_k, i0 + 1 + diag));
    }
    const int n_tiles = key_end > 0 ? (key_end + kBlockN - 1) / kBlockN : 0;
    const int n_plain = min(n_tiles, mask_from / kBlockN); /* leading tiles without any mask */

    /* Sparse plans: the key steps this tile visits (cuda_sparse.cuh) and
     * the visible keys of this thread's four rows. */
    [[maybe_unused]] StepWalk walk;
    [[maybe_unused]] RowKeys rk[2][2];
    int n_steps = n_tiles, first_j0 = 0;
    if constexpr (SPARSE) {
        walk = sparse_walk(p.sp, p.seq_q, p.seq_k, p.causal != 0, p.q_tiles, bhk, tile, i0, rows_valid);
        n_steps = walk.count();
        first_j0 = n_steps > 0 ? walk.step(0) * kBlockN : 0;
QA_UNROLL
        for (int mt = 0; mt < 2; mt++)
QA_UNROLL
            for (int hh = 0; hh < 2; hh++)
                rk[mt][hh] = sparse_row_keys(p.sp, p.seq_q, p.seq_k, p.causal != 0,
                                             i0 + warp * 32 + mt * 16 + hh * 8 + g);
    }

    /* Global sources. */
    const uint8_t *gQ, *gK, *gV;
    int64_t q_row, k_row, v_row;
    if constexpr (QK == Qk::S8) {
        gQ = (const uint8_t *)(p.q8 + (bhq * p.seq_q + i0) * D);
        gK = (const uint8_t *)(p.k8 + bhk * p.seq_k * D);
        q_row = D;
        k_row = D;
    } else {
        gQ = p.q + (b * p.q_stride[0] + h * p.q_stride[1] + (int64_t)i0 * p.q_stride[2]) * 2;
        gK = p.k + (b * p.k_stride[0] + hk * p.k_stride[1]) * 2;
        q_row = p.q_stride[2] * 2;
        k_row = p.k_stride[2] * 2;
    }
    if constexpr (FP8) {
        gV = p.vq + bhk * D * p.v_keys_padded;
        v_row = p.v_keys_padded;
    } else if constexpr (QK == Qk::S8) {
        gV = p.vq + bhk * p.seq_k * D * 2;
        v_row = D * 2;
    } else {
        gV = p.v + (b * p.v_stride[0] + hk * p.v_stride[1]) * 2;
        v_row = p.v_stride[2] * 2;
    }

    /* K tile j0: smem row s holds key key_of<PERM>(s / 8, s % 8). */
    static_assert(!PERM || (kThreads / QC) % 16 == 0, "permuted K rows need a copy step of 16 rows");
    auto load_k = [&](int j0) {
        load_rows<kBlockN, QC>(sK, gK + (int64_t)j0 * k_row, k_row, p.seq_k - j0,
                               [](int s) { return key_of<PERM>(s >> 3, s & 7); });
    };
    auto load_v = [&](int j0) {
        if constexpr (FP8)
            load_rows<D, VC>(sV, gV + j0, v_row, D, NaturalRows()); /* keys padded with zeros in the workspace */
        else
            load_rows<kBlockN, VC>(sV, gV + (int64_t)j0 * v_row, v_row, p.seq_k - j0, NaturalRows());
    };

    /* Per-row score scales: sm_scale * log2(e), times the row's Q scale when quantized. */
    float q_scale[MT][2];
QA_UNROLL
    for (int mt = 0; mt < MT; mt++)
QA_UNROLL
        for (int hh = 0; hh < 2; hh++) {
            int row = i0 + warp * 32 + mt * 16 + hh * 8 + g;
            q_scale[mt][hh] = p.scale_log2;
            if constexpr (QK == Qk::S8) {
                int64_t grp = (int64_t)(row / p.q_block) * p.q_inter + (row % p.q_block) % p.q_inter;
                q_scale[mt][hh] = row < p.seq_q ? p.q_scale[bhq * p.q_groups + grp] * p.scale_log2 : 0.f;
            }
        }

    float o[MT][DT][4];
    float m[MT][2], l[MT][2];
QA_UNROLL
    for (int mt = 0; mt < MT; mt++) {
QA_UNROLL
        for (int n = 0; n < DT; n++)
QA_UNROLL
            for (int i = 0; i < 4; i++)
                o[mt][n][i] = 0.f;
QA_UNROLL
        for (int hh = 0; hh < 2; hh++) {
            m[mt][hh] = -INFINITY;
            l[mt][hh] = 0.f;
        }
    }

    /* ldmatrix row addresses. The swizzled offset of chunk c0 + 2k (c0 = 0, 1)
     * is the offset of chunk c0 XOR (k << 5): one LOP per load, no tables. */
    const int mi = lane >> 3;
    const int q_ld = swz<QC>(warp * 32 + (lane & 15), lane >> 4);
    const int k_ld = swz<QC>((mi >> 1) * 8 + (lane & 7), mi & 1);
    const int v_ld = FP8 ? swz<VC>((mi >> 1) * 8 + (lane & 7), mi & 1) : swz<VC>((mi & 1) * 8 + (lane & 7), mi >> 1);
    const int vh_ld = swz<HC>((mi >> 1) * 8 + (lane & 7), mi & 1);

    load_rows<kBlockM, QC>(sQ, gQ, q_row, rows_valid, NaturalRows());
    if (n_steps > 0)
        load_k(first_j0);
    cp_async_commit();

    /* One key tile from key j0 (next_j0: the next tile's, or -1); MASK: the
     * tile holds keys past Nk or past a row's causal end (sparse: keys the
     * structured masks or the cell mask `cells` hide from some row). */
    auto tile_step = [&](const int j0, const int next_j0, auto mask_tag, [[maybe_unused]] const uint64_t cells) {
        constexpr bool MASK = decltype(mask_tag)::value;
        cp_async_wait<0>();
        sync_block(); /* K tile visible; every warp is done with the previous V tile */
        load_v(j0);
        cp_async_commit();

        /* ---- S = Q K^T */
        using Acc = typename std::conditional<QK == Qk::S8, int32_t, float>::type;
        Acc s[MT][NT][4];
QA_UNROLL
        for (int mt = 0; mt < MT; mt++)
QA_UNROLL
            for (int j = 0; j < NT; j++)
QA_UNROLL
                for (int i = 0; i < 4; i++)
                    s[mt][j][i] = 0;
QA_UNROLL
        for (int ks = 0; ks < QC / 2; ks++) {
            uint32_t a[MT][4];
QA_UNROLL
            for (int mt = 0; mt < MT; mt++)
                ldsm_x4(a[mt], aQ + ((q_ld ^ (ks << 5)) + mt * 16 * QC * 16));
QA_UNROLL
            for (int jp = 0; jp < NT / 2; jp++) {
                uint32_t bf[4];
                ldsm_x4(bf, aK + ((k_ld ^ (ks << 5)) + jp * 16 * QC * 16));
QA_UNROLL
                for (int mt = 0; mt < MT; mt++) {
                    if constexpr (QK == Qk::S8) {
                        mma_s8(s[mt][2 * jp], a[mt], bf);
                        mma_s8(s[mt][2 * jp + 1], a[mt], bf + 2);
                    } else if constexpr (QK == Qk::F16) {
                        mma_f16_f32(s[mt][2 * jp], a[mt], bf);
                        mma_f16_f32(s[mt][2 * jp + 1], a[mt], bf + 2);
                    } else {
                        mma_bf16_f32(s[mt][2 * jp], a[mt], bf);
                        mma_bf16_f32(s[mt][2 * jp + 1], a[mt], bf + 2);
                    }
                }
            }
        }

        /* ---- scores in the log2 domain; masked entries -inf */
        float x[MT][NT][4];
        float k_scale[2][2] = {{1.f, 1.f}, {1.f, 1.f}};
        (void)k_scale; /* unused by the fp16/bf16 Q.K */
        if constexpr (QK == Qk::S8) {
            const float *ks_tile = p.k_scale + bhk * p.k_groups + (int64_t)(j0 / kBlockN) * p.k_inter;
QA_UNROLL
            for (int jb = 0; jb < 2; jb++)
QA_UNROLL
                for (int cb = 0; cb < 2; cb++)
                    k_scale[jb][cb] = ks_tile[p.k_inter == 1 ? 0 : key_of<PERM>(jb, 2 * t + cb) % 8];
        }
QA_UNROLL
        for (int mt = 0; mt < MT; mt++)
QA_UNROLL
            for (int j = 0; j < NT; j++)
QA_UNROLL
                for (int i = 0; i < 4; i++) {
                    float v = (float)s[mt][j][i] * q_scale[mt][i >> 1];
                    if constexpr (QK == Qk::S8)
                        v *= k_scale[j & 1][i & 1];
                    if constexpr (MASK && SPARSE) {
                        const int kl = key_of<PERM>(j, 2 * t + (i & 1));
                        if (!sparse_visible(rk[mt][i >> 1], j0 + kl, p.seq_k, cells, (warp * 2 + mt) * 8 + (kl >> 4)))
                            v = -INFINITY;
                    } else if constexpr (MASK) {
                        int key = j0 + key_of<PERM>(j, 2 * t + (i & 1));
                        int row = i0 + warp * 32 + mt * 16 + (i >> 1) * 8 + g;
                        if (key >= p.seq_k || (p.causal && key > row + diag))
                            v = -INFINITY;
                    }
                    x[mt][j][i] = v;
                }

        cp_async_wait<0>();
        if constexpr (VH) {
            /* Widen the V^T chunks this thread copied (FP8, 16 keys) to fp16 in sVh. */
            constexpr int STEP = kThreads / VC;
            const int c8 = tid() % VC, r0 = tid() / VC;
QA_UNROLL_1 /* one chunk's temporaries at a time: S and O already hold most registers */
            for (int i = 0; i < D / STEP; i++) {
                const int r = r0 + i * STEP;
                Vec16 src = load16_shared(sV + swz<VC>(r, c8));
                Vec16 lo, hi;
                widen_e4m3x16(src, lo, hi);
                store16_shared(sVh + swz<HC>(r, 2 * c8), lo);
                store16_shared(sVh + swz<HC>(r, 2 * c8 + 1), hi);
            }
        }
        sync_block(); /* V tile visible; every warp is done with this K tile */
        if (next_j0 >= 0)
            load_k(next_j0);
        cp_async_commit();

        /* ---- online softmax (log2 domain) */
        bool rescale = false;
        float alpha[MT][2];
        [[maybe_unused]] bool small[MT][2]; /* pv_threshold: the row's P all below 2^-lambda */
QA_UNROLL
        for (int mt = 0; mt < MT; mt++)
QA_UNROLL
            for (int hh = 0; hh < 2; hh++) {
                float mx = -INFINITY;
QA_UNROLL
                for (int j = 0; j < NT; j++)
                    mx = fmax_(mx, fmax_(x[mt][j][2 * hh], x[mt][j][2 * hh + 1]));
                mx = fmax_(mx, shfl_xor(mx, 1));
                mx = fmax_(mx, shfl_xor(mx, 2));
                const float m_new = fmax_(m[mt][hh], mx);
                const float m_use = m_new == -INFINITY ? 0.f : m_new; /* a row with no key yet */
                rescale = rescale || m_new != m[mt][hh];
                alpha[mt][hh] = ex2(m[mt][hh] - m_use);
                m[mt][hh] = m_new;
                if constexpr (SPARSE)
                    small[mt][hh] = mx - m_use < -p.sp.pv_threshold ||
                                    i0 + warp * 32 + mt * 16 + hh * 8 + g >= p.seq_q;
                const float bias = FP8 ? m_use - kLog2P8 : m_use; /* FP8: P comes out scaled by 448 */
                float sum = 0.f;
QA_UNROLL
                for (int j = 0; j < NT; j++)
QA_UNROLL
                    for (int e = 0; e < 2; e++) {
                        float pr = ex2(x[mt][j][2 * hh + e] - bias);
                        x[mt][j][2 * hh + e] = pr;
                        sum += pr;
                    }
                l[mt][hh] = l[mt][hh] * alpha[mt][hh] + sum;
            }
        /* Late in a row the running max rarely moves: skip the O rescale when no
         * row of the warp changed (alpha is then exactly 1). */
        if (warp_any(rescale)) {
QA_UNROLL
            for (int mt = 0; mt < MT; mt++)
QA_UNROLL
                for (int n = 0; n < DT; n++) {
                    o[mt][n][0] *= alpha[mt][0];
                    o[mt][n][1] *= alpha[mt][0];
                    o[mt][n][2] *= alpha[mt][1];
                    o[mt][n][3] *= alpha[mt][1];
                }
        }

        /* pv_threshold (SpargeAttn's second stage): a 16-row m16 tile whose P
         * all lie below 2^-lambda skips P V (its sums in l keep them). */
        bool skip_pv = false;
        if constexpr (SPARSE) {
            if (p.sp.pv_threshold > 0.f) {
                bool skip[MT];
QA_UNROLL
                for (int mt = 0; mt < MT; mt++) {
                    skip[mt] = !warp_any(!(small[mt][0] && small[mt][1]));
                    if (skip[mt])
QA_UNROLL
                        for (int j = 0; j < NT; j++)
QA_UNROLL
                            for (int i = 0; i < 4; i++)
                                x[mt][j][i] = 0.f;
                }
                skip_pv = skip[0] && skip[1];
            }
        }

        /* ---- O += P V */
        if (skip_pv) {
        } else if constexpr (!FP8) {
QA_UNROLL
            for (int kc = 0; kc < NT / 2; kc++) {
                uint32_t pa[MT][4];
QA_UNROLL
                for (int mt = 0; mt < MT; mt++) {
                    if constexpr (PV == Pv::BF16)
                        pack_p16(pa[mt], x[mt][2 * kc], x[mt][2 * kc + 1], pack_bf16x2);
                    else
                        pack_p16(pa[mt], x[mt][2 * kc], x[mt][2 * kc + 1], pack_f16x2);
                }
QA_UNROLL
                for (int np = 0; np < DT / 2; np++) {
                    uint32_t bf[4];
                    ldsm_x4_t(bf, aV + ((v_ld ^ (np << 5)) + kc * 16 * VC * 16));
QA_UNROLL
                    for (int mt = 0; mt < MT; mt++) {
                        if constexpr (PV == Pv::BF16) {
                            mma_bf16_f32(o[mt][2 * np], pa[mt], bf);
                            mma_bf16_f32(o[mt][2 * np + 1], pa[mt], bf + 2);
                        } else {
                            mma_f16_f32(o[mt][2 * np], pa[mt], bf);
                            mma_f16_f32(o[mt][2 * np + 1], pa[mt], bf + 2);
                        }
                    }
                }
            }
        } else if constexpr (PV == Pv::E4M3H_F32) {
            /* P rounded to E4M3 (x448), carried as fp16 (exact); V^T fp16 in sVh.
             * fp32 accumulation is exact enough on this path: no second level. */
QA_UNROLL
            for (int kc = 0; kc < NT / 2; kc++) {
                uint32_t pa[MT][4];
QA_UNROLL
                for (int mt = 0; mt < MT; mt++)
                    pack_p16(pa[mt], x[mt][2 * kc], x[mt][2 * kc + 1], pack_e4m3_as_f16x2);
QA_UNROLL
                for (int np = 0; np < DT / 2; np++) {
                    uint32_t bf[4];
                    ldsm_x4(bf, aVh + ((vh_ld ^ (kc << 5)) + np * 16 * HC * 16));
QA_UNROLL
                    for (int mt = 0; mt < MT; mt++) {
                        mma_f16_f32(o[mt][2 * np], pa[mt], bf);
                        mma_f16_f32(o[mt][2 * np + 1], pa[mt], bf + 2);
                    }
                }
            }
        } else if constexpr (PV == Pv::E4M3H_F16) {
            /* As above, with fp16 accumulation over the 64-key tile (four chained
             * k16 steps from zero), then added to the fp32 output. */
            uint32_t pa[MT][NT / 2][4];
QA_UNROLL
            for (int mt = 0; mt < MT; mt++)
QA_UNROLL
                for (int kc = 0; kc < NT / 2; kc++)
                    pack_p16(pa[mt][kc], x[mt][2 * kc], x[mt][2 * kc + 1], pack_e4m3_as_f16x2);
QA_UNROLL
            for (int np = 0; np < DT / 2; np++) {
                uint32_t acc16[MT][2][2];
QA_UNROLL
                for (int mt = 0; mt < MT; mt++)
QA_UNROLL
                    for (int e = 0; e < 2; e++)
                        acc16[mt][e][0] = acc16[mt][e][1] = 0u;
QA_UNROLL
                for (int kc = 0; kc < NT / 2; kc++) {
                    uint32_t bf[4];
                    ldsm_x4(bf, aVh + ((vh_ld ^ (kc << 5)) + np * 16 * HC * 16));
QA_UNROLL
                    for (int mt = 0; mt < MT; mt++) {
                        mma_f16_f16(acc16[mt][0], pa[mt][kc], bf);
                        mma_f16_f16(acc16[mt][1], pa[mt][kc], bf + 2);
                    }
                }
QA_UNROLL
                for (int mt = 0; mt < MT; mt++)
QA_UNROLL
                    for (int e = 0; e < 2; e++) {
                        float *dst = o[mt][2 * np + e];
                        dst[0] += f16_lo(acc16[mt][e][0]);
                        dst[1] += f16_hi(acc16[mt][e][0]);
                        dst[2] += f16_lo(acc16[mt][e][1]);
                        dst[3] += f16_hi(acc16[mt][e][1]);
                    }
            }
        } else {
            uint32_t pa[MT][2][4];
QA_UNROLL
            for (int mt = 0; mt < MT; mt++)
QA_UNROLL
                for (int kc = 0; kc < 2; kc++) {
                    const float *p0 = x[mt][4 * kc], *p1 = x[mt][4 * kc + 1];
                    const float *p2 = x[mt][4 * kc + 2], *p3 = x[mt][4 * kc + 3];
                    pa[mt][kc][0] = pack_e4m3x4(p0[0], p0[1], p1[0], p1[1]);
                    pa[mt][kc][1] = pack_e4m3x4(p0[2], p0[3], p1[2], p1[3]);
                    pa[mt][kc][2] = pack_e4m3x4(p2[0], p2[1], p3[0], p3[1]);
                    pa[mt][kc][3] = pack_e4m3x4(p2[2], p2[3], p3[2], p3[3]);
                }
QA_UNROLL
            for (int np = 0; np < DT / 2; np++) {
                /* A fresh accumulator per 64-key block (two-level accumulation). */
                float acc[MT][2][4];
                uint32_t acc16[MT][2][2];
QA_UNROLL
                for (int mt = 0; mt < MT; mt++)
QA_UNROLL
                    for (int e = 0; e < 2; e++) {
QA_UNROLL
                        for (int i = 0; i < 4; i++)
                            acc[mt][e][i] = 0.f;
                        acc16[mt][e][0] = acc16[mt][e][1] = 0u;
                    }
QA_UNROLL
                for (int kc = 0; kc < 2; kc++) {
                    uint32_t bf[4];
                    ldsm_x4(bf, aV + ((v_ld ^ (kc << 5)) + np * 16 * VC * 16));
QA_UNROLL
                    for (int mt = 0; mt < MT; mt++) {
                        if constexpr (PV == Pv::E4M3_F32) {
                            mma_e4m3_f32(acc[mt][0], pa[mt][kc], bf);
                            mma_e4m3_f32(acc[mt][1], pa[mt][kc], bf + 2);
                        } else {
                            mma_e4m3_f16(acc16[mt][0], pa[mt][kc], bf);
                            mma_e4m3_f16(acc16[mt][1], pa[mt][kc], bf + 2);
                        }
                    }
                }
QA_UNROLL
                for (int mt = 0; mt < MT; mt++)
QA_UNROLL
                    for (int e = 0; e < 2; e++) {
                        float *dst = o[mt][2 * np + e];
                        if constexpr (PV == Pv::E4M3_F32) {
QA_UNROLL
                            for (int i = 0; i < 4; i++)
                                dst[i] += acc[mt][e][i];
                        } else {
                            dst[0] += f16_lo(acc16[mt][e][0]);
                            dst[1] += f16_hi(acc16[mt][e][0]);
                            dst[2] += f16_lo(acc16[mt][e][1]);
                            dst[3] += f16_hi(acc16[mt][e][1]);
                        }
                    }
            }
        }
    };

    if constexpr (SPARSE) {
        for (int w = 0; w < n_steps; w++) {
            const int j0 = walk.step(w) * kBlockN;
            const int next_j0 = w + 1 < n_steps ? walk.step(w + 1) * kBlockN : -1;
            if (walk.masked(w))
                tile_step(j0, next_j0, std::true_type(), walk.cell_mask(w));
            else
                tile_step(j0, next_j0, std::false_type(), ~(uint64_t)0);
        }
    } else {
        int it = 0;
        for (; it < n_plain; it++)
            tile_step(it * kBlockN, it + 1 < n_tiles ? (it + 1) * kBlockN : -1, std::false_type(), ~(uint64_t)0);
        for (; it < n_tiles; it++)
            tile_step(it * kBlockN, it + 1 < n_tiles ? (it + 1) * kBlockN : -1, std::true_type(), ~(uint64_t)0);
    }
    cp_async_wait<0>();

    /* ---- normalize and store O (and LSE) */
    const float *v_scale = FP8 ? p.v_scale + bhk * D : nullptr;
    const int out_bytes = p.out_dtype == kF32 ? 4 : 2;
QA_UNROLL
    for (int mt = 0; mt < MT; mt++)
QA_UNROLL
        for (int hh = 0; hh < 2; hh++) {
            float lt = l[mt][hh];
            lt += shfl_xor(lt, 1);
            lt += shfl_xor(lt, 2);
            float inv = lt > 0.f ? 1.f / lt : 0.f;
            int row = i0 + warp * 32 + mt * 16 + hh * 8 + g;
            if (row >= p.seq_q)
                continue;
            uint8_t *orow =
                p.o + (b * p.o_stride[0] + h * p.o_stride[1] + (int64_t)row * p.o_stride[2]) * out_bytes;
QA_UNROLL
            for (int n = 0; n < DT; n++) {
                int ch = n * 8 + 2 * t;
                float v0 = o[mt][n][2 * hh] * inv, v1 = o[mt][n][2 * hh + 1] * inv;
                if constexpr (FP8) {
                    v0 *= v_scale[ch];
                    v1 *= v_scale[ch + 1];
                }
                if (p.out_dtype == kF32) {
                    float2 pair = make_float2(v0, v1);
                    *(float2 *)(orow + ch * 4) = pair;
                } else if (p.out_dtype == kF16) {
                    *(uint32_t *)(orow + ch * 2) = pack_f16x2(v0, v1);
                } else {
                    *(uint32_t *)(orow + ch * 2) = pack_bf16x2(v0, v1);
                }
            }
            if (p.lse && t == 0) {
                float lse = -INFINITY;
                if (lt > 0.f) {
                    lse = (m[mt][hh] + log2f(lt) - (FP8 ? kLog2P8 : 0.f)) * kLn2;
                    if (p.q_kmean)
                        lse += p.q_kmean[bhq * p.seq_q + row];
                }
                p.lse[bhq * p.seq_q + row] = lse;
            }
        }
}

/* ====================================================================== */
/* Quantization (reference: src/quant.c; same groups, same rounding).      */

struct QuantParams {
    const uint8_t *q, *k, *v; /* first elements */
    int64_t q_stride[3], k_stride[3], v_stride[3];
    int heads_q, heads_kv, group, seq_q, seq_k;
    int8_t *q8, *k8;
    uint8_t *vq;
    float *q_scale, *k_scale, *v_scale, *k_mean, *q_kmean;
    int64_t q_groups, k_groups, v_keys_padded;
    int q_block, q_inter, k_inter;
    float v_fp8_max, sm_scale;
    int fp8, smooth_k;
    /* backend scratch */
    double *part_sum;
    float *part_amax, *v_inv;
    int chunks, chunk_tokens;
    uint32_t *status; /* NULL: no finite check */
};

template <int DT> struct In;
template <> struct In<kF16> {
    static constexpr int kVec = 8;
    QA_DEV static float get(const uint8_t *p, int i) { return f16_to_f32(((const uint16_t *)p)[i]); }
    QA_DEV static bool finite(const uint8_t *p, int i) { return (((const uint16_t *)p)[i] & 0x7c00u) != 0x7c00u; }
};
template <> struct In<kBF16> {
    static constexpr int kVec = 8;
    QA_DEV static float get(const uint8_t *p, int i) { return bf16_to_f32(((const uint16_t *)p)[i]); }
    QA_DEV static bool finite(const uint8_t *p, int i) { return (((const uint16_t *)p)[i] & 0x7f80u) != 0x7f80u; }
};
template <> struct In<kF32> {
    static constexpr int kVec = 4;
    QA_DEV static float get(const uint8_t *p, int i) { return ((const float *)p)[i]; }
    QA_DEV static bool finite(const uint8_t *p, int i)
    {
        float v = ((const float *)p)[i];
        return v - v == 0.f;
    }
};

constexpr int kStatsThreads = 256;

/* Per (b, kv head, chunk of tokens): partial per-channel sums of K (double)
 * and per-channel max |V|; flags non-finite K or V. */
template <int D, int DT> QA_KERNEL(kStatsThreads) kv_stats_kernel(const QuantParams p)
{
    constexpr int VEC = In<DT>::kVec, VPR = D / VEC, RP = kStatsThreads / VPR;
    double *red_sum = (double *)dynamic_smem();        /* [RP][D] */
    float *red_amax = (float *)(red_sum + RP * D);     /* [RP][D] */
    const int bh = block_x() / p.chunks, chunk = block_x() % p.chunks;
    const int b = bh / p.heads_kv, hk = bh % p.heads_kv;
    const int vc = tid() % VPR, rl = tid() / VPR;
    const int es = DT == kF32 ? 4 : 2;
    const uint8_t *gk = p.k + (b * p.k_stride[0] + hk * p.k_stride[1]) * es;
    const uint8_t *gv = p.v + (b * p.v_stride[0] + hk * p.v_stride[1]) * es;
    double sum[VEC];
    float amax[VEC];
    for (int e = 0; e < VEC; e++) {
        sum[e] = 0.0;
        amax[e] = 0.f;
    }
    /* Only what the mode needs: K sums for smooth K, V maxima for FP8 V (the
     * finite check of K and V happens in k_v_quant_kernel, which reads all). */
    const int t0 = chunk * p.chunk_tokens, t1 = min(p.seq_k, t0 + p.chunk_tokens);
    /* One loop over the chunk for both, so K and V loads are in flight together. */
    for (int tkn = t0 + rl; tkn < t1; tkn += RP) {
        if (p.smooth_k) {
            Vec16 kv = load16(gk + ((int64_t)tkn * p.k_stride[2] + vc * VEC) * es);
            for (int e = 0; e < VEC; e++)
                sum[e] += (double)In<DT>::get(kv.b, e);
        }
        if (p.fp8) {
            Vec16 vv = load16(gv + ((int64_t)tkn * p.v_stride[2] + vc * VEC) * es);
            for (int e = 0; e < VEC; e++)
                amax[e] = fmaxf(amax[e], fabsf(In<DT>::get(vv.b, e)));
        }
    }
    for (int e = 0; e < VEC; e++) {
        red_sum[rl * D + vc * VEC + e] = sum[e];
        red_amax[rl * D + vc * VEC + e] = amax[e];
    }
    sync_block();
    for (int d = tid(); d < D; d += kStatsThreads) {
        double s = 0.0;
        float a = 0.f;
        for (int r = 0; r < RP; r++) {
            s += red_sum[r * D + d];
            a = fmaxf(a, red_amax[r * D + d]);
        }
        p.part_sum[((int64_t)bh * p.chunks + chunk) * D + d] = s;
        p.part_amax[((int64_t)bh * p.chunks + chunk) * D + d] = a;
    }
}

/* Per (b, kv head): K mean, V scale and its inverse, from the chunk partials in a fixed order. */
template <int D> QA_KERNEL(D) kv_finalize_kernel(const QuantParams p)
{
    const int bh = block_x(), d = tid();
    double s = 0.0;
    float a = 0.f;
    for (int c = 0; c < p.chunks; c++) {
        s += p.part_sum[((int64_t)bh * p.chunks + c) * D + d];
        a = fmaxf(a, p.part_amax[((int64_t)bh * p.chunks + c) * D + d]);
    }
    if (p.smooth_k)
        p.k_mean[(int64_t)bh * D + d] = (float)(s / (double)p.seq_k);
    if (p.fp8) {
        if (a < QATTN_QUANT_MIN_AMAX) /* all tiny or zero: codes and scale 0 */
            a = 0.f;
        p.v_scale[(int64_t)bh * D + d] = a / p.v_fp8_max;
        p.v_inv[(int64_t)bh * D + d] = a > 0.f ? p.v_fp8_max / a : 0.f;
    }
}

QA_DEV int8_t quant_i8(float x, float inv)
{
    /* fmaxf takes the number over a NaN (unchecked input): -127, never a NaN
     * converted to an integer (undefined in C++, so in the emulator too). */
    return (int8_t)(int)fminf(fmaxf(rintf(x * inv), -127.f), 127.f);
}

/* A quantization CTA's rows, held in registers: a row of D elements is read
 * by G = D / VEC consecutive lanes, 16 bytes each (coalesced); lane group
 * r_lane holds the R consecutive rows from R * r_lane. Every load of the CTA
 * is issued before the first reduction, and the group maxima are reduced in
 * parallel (a single thread walking a group's rows stalled the whole CTA). */
template <int D, int DT, int THREADS, int ROWS> struct RowTile {
    static constexpr int VEC = In<DT>::kVec, G = D / VEC, RP = THREADS / G, R = ROWS / RP;
    static_assert(G <= 32 && 32 % G == 0, "a row's lanes stay inside one warp");
    static_assert(ROWS % RP == 0 && R % 4 == 0, "whole rows per lane group, 4-key words of FP8 V");
};

/* Sum and max over the G lanes of a row (all 32 lanes call it). */
template <int G> QA_DEV float row_max(float v)
{
    for (int o = G / 2; o > 0; o >>= 1)
        v = fmax_(v, shfl_xor(v, o));
    return v;
}
template <int G> QA_DEV float row_sum(float v)
{
    for (int o = G / 2; o > 0; o >>= 1)
        v += shfl_xor(v, o);
    return v;
}

/* Max over the lanes of a warp that share lane % stride (stride divides 32). */
QA_DEV float lanes_max(float v, int stride)
{
    for (int o = 16; o >= stride; o >>= 1)
        v = fmax_(v, shfl_xor(v, o));
    return v;
}

/* Stores VEC INT8 codes (VEC = 4 or 8 bytes). */
template <int VEC> QA_DEV void store_codes(int8_t *dst, const int8_t *codes)
{
#if defined(QA_EMULATE)
    memcpy(dst, codes, VEC);
#else
    if constexpr (VEC == 8)
        *(uint2 *)dst = *(const uint2 *)codes;
    else
        *(uint32_t *)dst = *(const uint32_t *)codes;
#endif
}

/* 32-bit shared-memory words (the emulator has no alignment guarantees to lean on). */
QA_DEV void store_word(uint8_t *p, uint32_t v)
{
#if defined(QA_EMULATE)
    memcpy(p, &v, 4);
#else
    *(uint32_t *)p = v;
#endif
}
QA_DEV uint32_t load_word(const uint8_t *p)
{
#if defined(QA_EMULATE)
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#else
    return *(const uint32_t *)p;
#endif
}

/* Makes the compiler forget what it knows of v's value, so that the values
 * it converted from v before a barrier are converted again after it rather
 * than held in registers (twice the registers of the packed row). */
QA_DEV void forget_converted(Vec16 &v)
{
#if !defined(QA_EMULATE)
    uint32_t *w = (uint32_t *)v.b;
    asm volatile("" : "+r"(w[0]), "+r"(w[1]), "+r"(w[2]), "+r"(w[3]));
#else
    (void)v;
#endif
}

/* Loads rows [r0, r0 + R) of a tile starting at token t0 (zeros past n). */
template <int R>
QA_DEV void load_rows(Vec16 *dst, const uint8_t *g, int64_t row_stride_bytes, int t0, int n)
{
    for (int i = 0; i < R; i++) {
        if (t0 + i < n)
            dst[i] = load16(g + (int64_t)(t0 + i) * row_stride_bytes);
        else
            for (int e = 0; e < 16; e++)
                dst[i].b[e] = 0;
    }
}

/* FP8 V^T staging in shared memory: [D][kBlockN] bytes, 32-bit words swizzled
 * by channel so the transposing stores of one warp spread over the banks. */
QA_DEV int vt_word(int d, int w) { return d * (kBlockN / 4) + (w ^ ((d >> 3) & (kBlockN / 4 - 1))); }

/* Per (b, kv head, 64-key block): K minus its mean to INT8 with per-block or
 * per-thread (8 interleaved) scales; V to FP8 transposed [D][keys] (zero past
 * Nk up to the padding), or to fp16 [keys][D]. */
template <int D, int DT> QA_KERNEL(kThreads) k_v_quant_kernel(const QuantParams p)
{
    using RT = RowTile<D, DT, kThreads, kBlockN>;
    constexpr int VEC = RT::VEC, G = RT::G, R = RT::R;
    static_assert(kBlockN == 64, "the K group reduction reads two rows per lane");
    const int es = DT == kF32 ? 4 : 2;
    const int kblocks = p.fp8 ? (int)(p.v_keys_padded / kBlockN) : (p.seq_k + kBlockN - 1) / kBlockN;
    const int bh = block_x() / kblocks, blk = block_x() % kblocks;
    const int b = bh / p.heads_kv, hk = bh % p.heads_kv;
    const int j0 = blk * kBlockN;
    float *row_amax = (float *)dynamic_smem(); /* [64] */
    float *group_inv = row_amax + kBlockN;     /* [8] */
    uint8_t *vt = (uint8_t *)(group_inv + 8);  /* [D][64] FP8 V^T, 16-byte aligned */

    const int lane_v = tid() % G, r0 = (tid() / G) * R, c0 = lane_v * VEC;
    const int64_t k_row = p.k_stride[2] * es, v_row = p.v_stride[2] * es;
    const uint8_t *gk = p.k + (b * p.k_stride[0] + hk * p.k_stride[1] + c0) * es;
    const uint8_t *gv = p.v + (b * p.v_stride[0] + hk * p.v_stride[1] + c0) * es;
    const bool has_keys = j0 < p.seq_k; /* uniform over the block; false only in FP8 V padding */

    Vec16 kv[R];
    load_rows<R>(kv, gk, k_row, j0 + r0, has_keys ? p.seq_k : 0);

    /* This pass reads every K and V element: it does their finite check. */
    bool k_finite = true, v_finite = true;
    if (has_keys) {
        const float *mean = p.smooth_k ? p.k_mean + (int64_t)bh * D : nullptr;
        float mv[VEC];
        for (int e = 0; e < VEC; e++)
            mv[e] = mean ? mean[c0 + e] : 0.f;
        for (int i = 0; i < R; i++) {
            float amax = 0.f;
            if (j0 + r0 + i < p.seq_k)
                for (int e = 0; e < VEC; e++) {
                    amax = fmaxf(amax, fabsf(In<DT>::get(kv[i].b, e) - mv[e]));
                    k_finite = k_finite && In<DT>::finite(kv[i].b, e);
                }
            amax = row_max<G>(amax);
            if (lane_v == 0)
                row_amax[r0 + i] = amax;
        }
        sync_block();
        /* The block is one K group (per-block) or k_inter groups of every
         * k_inter-th key (k_inter divides 32): warp 0 reduces them. */
        const int ki = p.k_inter;
        if (warp_id() == 0) {
            float gmax = lanes_max(fmaxf(row_amax[lane_id()], row_amax[lane_id() + 32]), ki);
            gmax = gmax < QATTN_QUANT_MIN_AMAX ? 0.f : gmax;
            if (lane_id() < ki) {
                group_inv[lane_id()] = gmax > 0.f ? 127.f / gmax : 0.f;
                p.k_scale[(int64_t)bh * p.k_groups + (int64_t)blk * ki + lane_id()] = gmax / 127.f;
            }
        }
        sync_block();
        for (int i = 0; i < R; i++) {
            const int tkn = j0 + r0 + i;
            if (tkn >= p.seq_k)
                continue;
            forget_converted(kv[i]);
            int8_t codes[VEC];
            for (int e = 0; e < VEC; e++)
                codes[e] = quant_i8(In<DT>::get(kv[i].b, e) - mv[e], group_inv[(r0 + i) % ki]);
            store_codes<VEC>(p.k8 + ((int64_t)bh * p.seq_k + tkn) * D + c0, codes);
        }
    }

    Vec16 vv[R];
    load_rows<R>(vv, gv, v_row, j0 + r0, p.seq_k);
    for (int i = 0; i < R; i++)
        if (j0 + r0 + i < p.seq_k)
            for (int e = 0; e < VEC; e++)
                v_finite = v_finite && In<DT>::finite(vv[i].b, e);

    if (p.fp8) {
        /* Each lane packs its R keys of a channel as E4M3 bytes (key order),
         * stages them transposed, then the CTA writes 16-byte runs of the
         * padded [D][keys] layout. */
        const float *inv = p.v_inv + (int64_t)bh * D + c0;
        for (int e = 0; e < VEC; e++) {
            const float s = inv[e];
            for (int w = 0; w < R / 4; w++) {
                float x[4];
                for (int k = 0; k < 4; k++)
                    x[k] = j0 + r0 + 4 * w + k < p.seq_k ? In<DT>::get(vv[4 * w + k].b, e) * s : 0.f;
                store_word(vt + 4 * vt_word(c0 + e, r0 / 4 + w), pack_e4m3x4(x[0], x[1], x[2], x[3]));
            }
        }
        sync_block();
        constexpr int RUNS = kBlockN / 16; /* 16-byte runs per channel */
        uint8_t *dst = p.vq + (int64_t)bh * D * p.v_keys_padded + j0;
        for (int c = tid(); c < D * RUNS; c += kThreads) {
            const int d = c / RUNS, run = c % RUNS;
            Vec16 out;
            for (int w = 0; w < 4; w++) {
                uint32_t word = load_word(vt + 4 * vt_word(d, 4 * run + w));
                for (int k = 0; k < 4; k++)
                    out.b[4 * w + k] = (uint8_t)(word >> (8 * k));
            }
            store16(dst + (int64_t)d * p.v_keys_padded + 16 * run, out);
        }
    } else if (has_keys) {
        uint16_t *dst = (uint16_t *)p.vq + (int64_t)bh * p.seq_k * D + c0;
        for (int i = 0; i < R; i++) {
            const int tkn = j0 + r0 + i;
            if (tkn >= p.seq_k)
                continue;
            uint16_t h[VEC];
            for (int e = 0; e < VEC; e++)
                h[e] = f16_bits(In<DT>::get(vv[i].b, e));
            for (int e = 0; e < VEC; e += 4) {
#if defined(QA_EMULATE)
                memcpy(dst + (int64_t)tkn * D + e, h + e, 8);
#else
                *(uint2 *)(dst + (int64_t)tkn * D + e) = *(const uint2 *)(h + e);
#endif
            }
        }
    }
    const uint32_t flags = (k_finite ? 0u : (uint32_t)QATTN_NONFINITE_K) | (v_finite ? 0u : (uint32_t)QATTN_NONFINITE_V);
    if (flags && p.status)
        atomic_or(p.status + QATTN_STATUS_NONFINITE, flags);
}

/* Bytes of dynamic shared memory of k_v_quant_kernel. */
template <int D> constexpr int k_v_quant_smem() { return (kBlockN + 8) * (int)sizeof(float) + D * kBlockN; }

/* q_quant_kernel's CTA: 256 threads over 128 rows keeps 8 rows (32 registers) per lane at D = 128. */
constexpr int kQuantQThreads = 256;

/* Per (b, q head, 128 rows): Q to INT8 with per-block, per-warp or per-thread
 * scales, the LSE correction sm_scale * dot(q, mean_k); flags non-finite Q. */
template <int D, int DT> QA_KERNEL(kQuantQThreads) q_quant_kernel(const QuantParams p)
{
    using RT = RowTile<D, DT, kQuantQThreads, kBlockM>;
    constexpr int VEC = RT::VEC, G = RT::G, R = RT::R;
    constexpr int kWarpsM = kBlockM / 32;
    const int es = DT == kF32 ? 4 : 2;
    const int qblocks = (p.seq_q + kBlockM - 1) / kBlockM;
    const int bh = block_x() / qblocks, blk = block_x() % qblocks;
    const int b = bh / p.heads_q, h = bh % p.heads_q;
    const int64_t bhk = (int64_t)b * p.heads_kv + h / p.group;
    float *row_amax = (float *)dynamic_smem(); /* [128] */
    float *part = row_amax + kBlockM;          /* [4 warps of rows][8 lanes] */
    float *group_inv = part + kWarpsM * 8;     /* [n_local <= 32] */
    const int lane_v = tid() % G, r0 = (tid() / G) * R, c0 = lane_v * VEC;
    const int i0 = blk * kBlockM;
    const uint8_t *gq = p.q + (b * p.q_stride[0] + h * p.q_stride[1] + c0) * es;

    Vec16 qv[R];
    load_rows<R>(qv, gq, p.q_stride[2] * es, i0 + r0, p.seq_q);

    const float *mean = p.smooth_k ? p.k_mean + bhk * D : nullptr;
    float mv[VEC];
    for (int e = 0; e < VEC; e++)
        mv[e] = mean ? mean[c0 + e] : 0.f;

    bool finite = true;
    for (int i = 0; i < R; i++) {
        const int r = r0 + i, tkn = i0 + r;
        float amax = 0.f, dot = 0.f;
        if (tkn < p.seq_q)
            for (int e = 0; e < VEC; e++) {
                float x = In<DT>::get(qv[i].b, e);
                amax = fmaxf(amax, fabsf(x));
                finite = finite && In<DT>::finite(qv[i].b, e);
                dot += x * mv[e];
            }
        amax = row_max<G>(amax);
        dot = row_sum<G>(dot);
        if (lane_v == 0) {
            row_amax[r] = amax;
            if (mean && tkn < p.seq_q)
                p.q_kmean[(int64_t)bh * p.seq_q + tkn] = p.sm_scale * dot;
        }
    }
    if (!finite && p.status)
        atomic_or(p.status + QATTN_STATUS_NONFINITE, QATTN_NONFINITE_Q);
    sync_block();
    /* Scale groups inside this CTA's 128 rows: local group g = block
     * (g / q_inter) of q_block rows, lane g % q_inter. q_block is a multiple
     * of 32 dividing 128 and q_inter divides 8, so a row's group lane is its
     * lane % q_inter: each warp of rows reduces its lanes, then one thread
     * per group combines the warps of its block. */
    const int qb = p.q_block, qi = p.q_inter;
    const int n_local = kBlockM / qb * qi;
    if (warp_id() < kWarpsM) {
        float m = lanes_max(row_amax[tid()], qi);
        if (lane_id() < qi)
            part[warp_id() * 8 + lane_id()] = m;
    }
    sync_block();
    if (tid() < n_local) {
        const int g = tid(), gb = g / qi, gl = g % qi;
        float gmax = 0.f;
        for (int w = gb * qb / 32; w < (gb + 1) * qb / 32; w++)
            gmax = fmaxf(gmax, part[w * 8 + gl]);
        gmax = gmax < QATTN_QUANT_MIN_AMAX ? 0.f : gmax;
        group_inv[g] = gmax > 0.f ? 127.f / gmax : 0.f;
        const int first_block = i0 / qb, q_blocks_total = (p.seq_q + qb - 1) / qb;
        if (first_block + gb < q_blocks_total)
            p.q_scale[(int64_t)bh * p.q_groups + (int64_t)first_block * qi + g] = gmax / 127.f;
    }
    sync_block();
    for (int i = 0; i < R; i++) {
        const int r = r0 + i, tkn = i0 + r;
        if (tkn >= p.seq_q)
            continue;
        const float inv = group_inv[(r / qb) * qi + r % qi];
        forget_converted(qv[i]);
        int8_t codes[VEC];
        for (int e = 0; e < VEC; e++)
            codes[e] = quant_i8(In<DT>::get(qv[i].b, e), inv);
        store_codes<VEC>(p.q8 + ((int64_t)bh * p.seq_q + tkn) * D + c0, codes);
    }
}

/* Bytes of dynamic shared memory of q_quant_kernel. */
constexpr int q_quant_smem() { return (kBlockM + (kBlockM / 32) * 8 + 32) * (int)sizeof(float); }

/* Exact mode's finite check: one pass over Q, K and V. */
struct ScanParams {
    const uint8_t *base[3];
    int64_t stride[3][3];
    int64_t heads[3], seq[3];
    int batch, head_dim;
    uint32_t *status;
};

/* Rows per work item of the scan: a CTA checks 64 rows of one (tensor, b, h). */
constexpr int kScanRows = 64;

/* Work items over Q, K and V together (one CTA each). */
QA_HOSTDEV int64_t scan_items(const ScanParams &p)
{
    int64_t n = 0;
    for (int x = 0; x < 3; x++)
        n += (int64_t)p.batch * p.heads[x] * ((p.seq[x] + kScanRows - 1) / kScanRows);
    return n;
}

/* A CTA per (tensor, b, h, 64 rows) item: the item is decoded once per CTA and
 * each thread walks fixed 16-byte columns down the rows, so the inner loop has
 * no 64-bit divisions (decoding every 16-byte vector ran at ~40% of
 * bandwidth). A grid-stride loop over items keeps the grid within limits. */
template <int DT> QA_KERNEL(256) finite_scan_kernel(const ScanParams p)
{
    constexpr int VEC = In<DT>::kVec;
    const int es = DT == kF32 ? 4 : 2;
    const int vpr = p.head_dim / VEC, rows_per_pass = 256 / vpr;
    const int vc = tid() % vpr, r0 = tid() / vpr;
    const int64_t total = scan_items(p);
    uint32_t flags = 0; /* QATTN_NONFINITE_Q << x for a bad item of tensor x */
    for (int64_t it = block_x(); it < total; it += grid_x()) {
        int64_t item = it, chunks = 0;
        int x = 0;
        for (; x < 2; x++) {
            chunks = (p.seq[x] + kScanRows - 1) / kScanRows;
            const int64_t items = (int64_t)p.batch * p.heads[x] * chunks;
            if (item < items)
                break;
            item -= items;
        }
        chunks = (p.seq[x] + kScanRows - 1) / kScanRows;
        const int64_t bh = item / chunks, chunk = item % chunks;
        const int64_t hh = bh % p.heads[x], bb = bh / p.heads[x];
        const uint8_t *base = p.base[x] + (bb * p.stride[x][0] + hh * p.stride[x][1] + (int64_t)vc * VEC) * es;
        const int64_t n1 = min(p.seq[x], (chunk + 1) * kScanRows);
        bool finite = true;
        for (int64_t n = chunk * kScanRows + r0; n < n1; n += rows_per_pass) {
            Vec16 v = load16(base + n * p.stride[x][2] * es);
            for (int e = 0; e < VEC; e++)
                finite = finite && In<DT>::finite(v.b, e);
        }
        if (!finite)
            flags |= (uint32_t)QATTN_NONFINITE_Q << x;
    }
    if (flags)
        atomic_or(p.status + QATTN_STATUS_NONFINITE, flags);
}

QA_NAMESPACE_END

#endif
