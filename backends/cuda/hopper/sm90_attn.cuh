/*
 * sm_90a attention for the FP8 modes: INT8 Q.K and FP8 P.V on wgmma.
 *
 * Why a second kernel: Hopper has no native FP8 mma.sync (ptxas expands it to
 * fp16 HMMA), so FP8 P.V only reaches the FP8 tensor rate through wgmma,
 * the warpgroup-wide asynchronous MMA that reads its B operand (and here the
 * Q operand of Q.K) straight from shared memory through 64-bit descriptors.
 *
 * CTA = 2 warpgroups x 64 query rows (128 rows, the same query tiling and
 * quantization groups as the mma.sync kernels), key tiles of 64 (the K
 * quantization block). Per tile and warpgroup:
 *   S  = Q K^T       wgmma m64n64k32 s8, both operands in shared memory
 *   softmax          registers (log2 domain, P x448 rounded to E4M3)
 *   Oblk = P V       wgmma m64nDk32 e4m3, P from registers, V^T in shared memory,
 *                    fresh accumulator per tile (fp32, or fp16 for F16ACC)
 *   O = O*alpha + Oblk   (two-level accumulation in fp32 on the CUDA cores)
 * K rows are stored in a permuted key order (key_of<true>) so that the S
 * accumulator comes out in the e4m3 A-register layout (as the mma.sync kernel).
 *
 * Overlap without a producer warpgroup (FlashAttention-3's intra-warpgroup
 * pipeline): each iteration issues S of the next tile and P V of this one
 * back to back and computes the next softmax while P V runs; the two
 * warpgroups of the CTA share the tensor cores. K/V tiles stream in through
 * cp.async, four stages, two tiles ahead of use; each warpgroup loads its own
 * Q rows and its own copy of every K/V tile and synchronizes only its four
 * warps (one named barrier per tile), so the warpgroups drift apart and one's
 * softmax overlaps the other's matrix work.
 *
 * Shared memory operands use the 128-byte (rows of 128 B) or 64-byte (rows
 * of 64 B) swizzle, which is exactly qa::swz<8> / qa::swz<4>, so the loaders
 * of the mma.sync kernels' layout carry over.
 */
#ifndef QA_SM90_ATTN_CUH
#define QA_SM90_ATTN_CUH

#include "cuda_kernels.cuh"
#include "sm90_wgmma.cuh"

QA_NAMESPACE_BEGIN
namespace sm90 {

constexpr int kWarpgroups = 2;
constexpr int kThreads90 = 128 * kWarpgroups;
constexpr int kStages = 4;

template <int D> struct Sm90Traits {
    static constexpr int kQC = D / 16;            /* 16-byte chunks per int8 Q/K row */
    static constexpr int kVC = kBlockN / 16;      /* chunks per FP8 V^T row (64 keys) */
    static constexpr int kQBytes = kBlockM * D;   /* int8 Q */
    static constexpr int kKBytes = kBlockN * D;   /* int8 K */
    static constexpr int kVBytes = D * kBlockN;   /* FP8 V^T */
    static constexpr int kStageBytes = kKBytes + kVBytes;
    static constexpr int kAlign = 1024;           /* the 128-byte swizzle repeats every 1024 bytes */
    /* Each warpgroup streams its own copy of the K/V tiles, so the two never
     * wait for each other: its stages follow its own progress. */
    static constexpr int kSmem = kQBytes + kWarpgroups * kStages * kStageBytes + kAlign;
    static constexpr int kQKSwizzle = D == 128 ? 128 : 64;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QA_SM90_DEVICE_CODE 1
#endif

#if defined(QA_SM90_DEVICE_CODE)
QA_DEV void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
QA_DEV void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> QA_DEV void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
/* Pins a register value at this point of the program: the wait instructions
 * name no registers, so without this the compiler may move reads of an
 * accumulator above the wait that makes it valid. */
QA_DEV void fence_operand(int32_t &r) { asm volatile("" : "+r"(r)::"memory"); }
QA_DEV void fence_operand(uint32_t &r) { asm volatile("" : "+r"(r)::"memory"); }
QA_DEV void fence_operand(float &r) { asm volatile("" : "+f"(r)::"memory"); }
template <typename A, int N> QA_DEV void fence_operands(A (&r)[N])
{
QA_UNROLL
    for (int i = 0; i < N; i++)
        fence_operand(r[i]);
}
/* cp.async writes are generic-proxy writes; wgmma reads shared memory through the async proxy. */
QA_DEV void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/* Barrier of one warpgroup (named barrier 1 + wg, 128 threads). */
QA_DEV void sync_warpgroup(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); }

/* Shared-memory matrix descriptor of a K-major operand whose rows are exactly
 * the swizzle width (64 or 128 bytes): 8-row core groups SWIZZLE*8 bytes
 * apart (stride byte offset); the leading byte offset is unused for swizzled
 * K-major operands; base offset 0 (tiles are 1024-byte aligned). */
template <int SWIZZLE> QA_DEV uint64_t smem_desc(uint32_t addr)
{
    static_assert(SWIZZLE == 64 || SWIZZLE == 128, "swizzle width");
    uint64_t d = (uint64_t)((addr & 0x3FFFFu) >> 4);
    d |= (uint64_t)1 << 16;
    d |= (uint64_t)((SWIZZLE * 8) >> 4) << 32;
    d |= (uint64_t)(SWIZZLE == 128 ? 1 : 2) << 62;
    return d;
}

/* Descriptor of an MN-major operand in 128-byte-swizzled blocks: 64 16-bit
 * elements along MN per 128-byte row, rows along K 128 bytes apart (8-row
 * groups 1024 bytes apart: stride byte offset), blocks of 64 MN-elements
 * block_bytes apart (leading byte offset). */
QA_DEV uint64_t smem_desc_mn128(uint32_t addr, int block_bytes)
{
    uint64_t d = (uint64_t)((addr & 0x3FFFFu) >> 4);
    d |= (uint64_t)((block_bytes >> 4) & 0x3FFF) << 16;
    d |= (uint64_t)(1024 >> 4) << 32;
    d |= (uint64_t)1 << 62;
    return d;
}
/* The query tile and key range of this CTA (every sm_90a kernel): CTA bx
 * covers query rows i0.. of one (batch, head), a head's last tiles first (most
 * causal work); keys [0, n_tiles * 64), of which the first n_plain tiles need
 * no mask. The CTAs of one head run together and share its K/V in L2
 * (ordering causal CTAs longest first over all heads measured no better:
 * bench/NOTES.md). */
struct TileSpan {
    int b, h, hk, i0, rows_valid, diag, n_tiles, n_plain;
    int64_t bhq, bhk;
};
QA_DEV TileSpan tile_span(const AttnParams &p, int block_m)
{
    TileSpan r;
    const int bx = block_x();
    const int bh = bx / p.q_tiles;
    const int tile = p.q_tiles - 1 - bx % p.q_tiles;
    r.b = bh / p.heads_q;
    r.h = bh % p.heads_q;
    r.hk = r.h / p.group;
    r.i0 = tile * block_m;
    r.rows_valid = min(block_m, p.seq_q - r.i0);
    r.bhq = (int64_t)r.b * p.heads_q + r.h;
    r.bhk = (int64_t)r.b * p.heads_kv + r.hk;
    r.diag = p.seq_k - p.seq_q; /* bottom-right causal offset */
    int key_end = p.seq_k, mask_from = p.seq_k;
    if (p.causal) {
        key_end = min(p.seq_k, r.i0 + r.rows_valid + r.diag);
        mask_from = max(0, min(p.seq_k, r.i0 + 1 + r.diag));
    }
    r.n_tiles = key_end > 0 ? (key_end + kBlockN - 1) / kBlockN : 0;
    r.n_plain = min(r.n_tiles, mask_from / kBlockN);
    return r;
}

/* Online softmax of this thread's two rows (g and g + 8) of a 64-key tile of
 * scores x (log2 domain, masked entries -inf): updates the running max m and
 * (ROW_SUM) sum l, sets the rescale factor alpha of O, and replaces x by
 * exp2(x - m + p_log2) (p_log2 = log2(448) when P is to be rounded to E4M3). */
template <int NT, bool ROW_SUM = true>
QA_DEV void online_softmax(float (&x)[NT][4], float (&m)[2], float (&l)[2], float (&alpha)[2], float p_log2)
{
QA_UNROLL
    for (int hh = 0; hh < 2; hh++) {
        float mx = -INFINITY;
QA_UNROLL
        for (int j = 0; j < NT; j++)
            mx = fmax_(mx, fmax_(x[j][2 * hh], x[j][2 * hh + 1]));
        mx = fmax_(mx, shfl_xor(mx, 1));
        mx = fmax_(mx, shfl_xor(mx, 2));
        const float m_new = fmax_(m[hh], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new; /* a row with no key yet */
        alpha[hh] = ex2(m[hh] - m_use);
        m[hh] = m_new;
        const float bias = m_use - p_log2;
        float sum = 0.f;
QA_UNROLL
        for (int j = 0; j < NT; j++)
QA_UNROLL
            for (int e = 0; e < 2; e++) {
                const float pr = ex2(x[j][2 * hh + e] - bias);
                x[j][2 * hh + e] = pr;
                sum += pr;
            }
        if constexpr (ROW_SUM)
            l[hh] = l[hh] * alpha[hh] + sum;
    }
}

/* Normalizes and stores this thread's two rows of O (o in the m64nD
 * accumulator layout) and their LSE. v_scale: per-channel factor of O (FP8 V)
 * or NULL; p_log2 as in online_softmax; q_kmean: the smooth-K LSE correction
 * or NULL. */
template <int D>
QA_DEV void store_rows(const AttnParams &p, const TileSpan &ts, int row_base, const float (&o)[D / 2],
                       const float (&m)[2], const float (&l)[2], const float *v_scale, float p_log2,
                       const float *q_kmean)
{
    const int t = lane_id() & 3;
    const int out_bytes = p.out_dtype == kF32 ? 4 : 2;
QA_UNROLL
    for (int hh = 0; hh < 2; hh++) {
        float lt = l[hh];
        lt += shfl_xor(lt, 1);
        lt += shfl_xor(lt, 2);
        const float inv = lt > 0.f ? 1.f / lt : 0.f;
        const int row = ts.i0 + row_base + hh * 8;
        if (row >= p.seq_q)
            continue;
        uint8_t *orow =
            p.o + (ts.b * p.o_stride[0] + ts.h * p.o_stride[1] + (int64_t)row * p.o_stride[2]) * out_bytes;
QA_UNROLL
        for (int n = 0; n < D / 8; n++) {
            const int ch = n * 8 + 2 * t;
            float v0 = o[4 * n + 2 * hh] * inv, v1 = o[4 * n + 2 * hh + 1] * inv;
            if (v_scale) {
                v0 *= v_scale[ch];
                v1 *= v_scale[ch + 1];
            }
            if (p.out_dtype == kF32)
                *(float2 *)(orow + ch * 4) = make_float2(v0, v1);
            else if (p.out_dtype == kF16)
                *(uint32_t *)(orow + ch * 2) = pack_f16x2(v0, v1);
            else
                *(uint32_t *)(orow + ch * 2) = pack_bf16x2(v0, v1);
        }
        if (p.lse && t == 0) {
            float lse = -INFINITY;
            if (lt > 0.f) {
                lse = (m[hh] + log2f(lt) - p_log2) * kLn2;
                if (q_kmean)
                    lse += q_kmean[ts.bhq * p.seq_q + row];
            }
            p.lse[ts.bhq * p.seq_q + row] = lse;
        }
    }
}
#endif

/* cp.async of R rows x C chunks by the NTHREADS threads numbered lt (see qa::load_rows). */
template <int NTHREADS, int R, int C, typename RowKey>
QA_DEV void load_rows90(uint8_t *smem, const uint8_t *g, int64_t row_bytes, int valid, RowKey row_key, int lt)
{
    constexpr int STEP = NTHREADS / C;
    static_assert(R % STEP == 0 || STEP % R == 0, "tile shape");
    const int c = lt % C, r0 = lt / C;
    if (STEP > R && r0 >= R)
        return;
    const int src_row = row_key(r0);
    const uint8_t *src = g + (int64_t)src_row * row_bytes + c * 16;
    const int64_t step_bytes = (int64_t)STEP * row_bytes;
QA_UNROLL
    for (int i = 0; i < (R + STEP - 1) / STEP; i++) {
        const bool ok = src_row + i * STEP < valid;
        cp_async16(smem + swz<C>(r0 + i * STEP, c), ok ? src : g, ok);
        src += step_bytes;
    }
}

/* cp.async of R rows of D 16-bit elements (rows row_bytes apart in g) into
 * D / 64 column blocks of [R rows][128 bytes], 128-byte swizzle; rows >= valid
 * are zero-filled. */
template <int R, int D>
QA_DEV void load_rows_blocked(uint8_t *smem, const uint8_t *g, int64_t row_bytes, int valid)
{
    constexpr int C = D * 2 / 16;
    constexpr int STEP = kThreads90 / C;
    static_assert(R % STEP == 0, "tile shape");
    const int c = tid() % C, r0 = tid() / C;
    const uint8_t *src = g + (int64_t)r0 * row_bytes + c * 16;
    uint8_t *dst = smem + (c >> 3) * (R * 128);
    const int64_t step_bytes = (int64_t)STEP * row_bytes;
QA_UNROLL
    for (int i = 0; i < R / STEP; i++) {
        const int r = r0 + i * STEP;
        const bool ok = r < valid;
        cp_async16(dst + swz<8>(r, c & 7), ok ? src : g, ok);
        src += step_bytes;
    }
}

template <int D, bool F16ACC> __global__ void __launch_bounds__(kThreads90, 1) attention_fp8_kernel(const AttnParams p)
{
#if defined(QA_SM90_DEVICE_CODE)
    using T = Sm90Traits<D>;
    constexpr int QC = T::kQC, VC = T::kVC;
    constexpr int NT = kBlockN / 8; /* n8 column groups of S */
    constexpr int DT = D / 8;       /* n8 column groups of O */

    if (p.status && load_volatile(p.status))
        return; /* non-finite input: leave the outputs untouched */

    uint8_t *smem_raw = dynamic_smem();
    uint8_t *smem = smem_raw + ((T::kAlign - (smem_u32(smem_raw) & (T::kAlign - 1))) & (T::kAlign - 1));
    uint8_t *sQ = smem;
    const int wg_of_thread = warp_id() >> 2;
    uint8_t *sStage = smem + T::kQBytes + wg_of_thread * kStages * T::kStageBytes;

    const int lane = lane_id(), warp = warp_id();
    const int wg = warp >> 2, wl = warp & 3;
    const int g = lane >> 2, t = lane & 3;
    const TileSpan ts = tile_span(p, kBlockM);
    const int i0 = ts.i0, rows_valid = ts.rows_valid, diag = ts.diag, n_tiles = ts.n_tiles, n_plain = ts.n_plain;
    const int64_t bhq = ts.bhq, bhk = ts.bhk;

    const uint8_t *gQ = (const uint8_t *)(p.q8 + (bhq * p.seq_q + i0) * D);
    const uint8_t *gK = (const uint8_t *)(p.k8 + bhk * p.seq_k * D);
    const uint8_t *gV = p.vq + bhk * D * p.v_keys_padded;

    auto stage_k = [&](int it) { return sStage + (it % kStages) * T::kStageBytes; };
    auto stage_v = [&](int it) { return sStage + (it % kStages) * T::kStageBytes + T::kKBytes; };
    auto load_tile = [&](int it) {
        const int j0 = it * kBlockN;
        load_rows90<128, kBlockN, QC>(stage_k(it), gK + (int64_t)j0 * D, D, p.seq_k - j0,
                                      [](int s) { return key_of<true>(s >> 3, s & 7); }, tid() & 127);
        load_rows90<128, D, VC>(stage_v(it), gV + j0, p.v_keys_padded, D, NaturalRows(), tid() & 127);
    };

    /* This thread's two rows (within the CTA tile): r and r + 8. */
    const int row_base = wg * 64 + wl * 16 + g;
    float q_scale[2];
QA_UNROLL
    for (int hh = 0; hh < 2; hh++) {
        const int row = i0 + row_base + hh * 8;
        const int64_t grp = (int64_t)(row / p.q_block) * p.q_inter + (row % p.q_block) % p.q_inter;
        q_scale[hh] = row < p.seq_q ? p.q_scale[bhq * p.q_groups + grp] * p.scale_log2 : 0.f;
    }

    float o[DT * 4];
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
QA_UNROLL
    for (int i = 0; i < DT * 4; i++)
        o[i] = 0.f;

    const uint32_t aQ = smem_u32(sQ) + wg * 64 * D;

    /* S = Q K^T for tile it, issued into s as one wgmma group (the caller waits). */
    int32_t s[NT * 4];
QA_UNROLL
    for (int i = 0; i < NT * 4; i++)
        s[i] = 0;
    /* Descriptors: built once; a tile's is stage 0's plus the stage offset
     * (the start address field counts 16-byte units, and shared addresses stay
     * below 2^18, so adding to the 64-bit word cannot carry out of the field). */
    const uint64_t desc_q = smem_desc<T::kQKSwizzle>(aQ);
    const uint64_t desc_k0 = smem_desc<T::kQKSwizzle>(smem_u32(sStage));
    const uint64_t desc_v0 = smem_desc<64>(smem_u32(sStage + T::kKBytes));
    auto stage_desc = [&](uint64_t base, int it) { return base + (uint64_t)((it % kStages) * (T::kStageBytes >> 4)); };
    auto qk_issue = [&](int it) {
        const uint64_t desc_k = stage_desc(desc_k0, it);
        fence_operands(s);
        wgmma_fence();
QA_UNROLL
        for (int ks = 0; ks < QC / 2; ks++) /* k32 steps: 32 bytes along the row */
            wgmma_s8_n64_ss(s, desc_q + 2 * ks, desc_k + 2 * ks, ks);
        wgmma_commit();
    };

    /* Online softmax of tile it from s: P (x448, E4M3, in the A-register layout)
     * into pa, the O rescale factor into alpha; updates m and l. */
    /* The K scales of tile it that this thread's columns use (loaded early:
     * a global load on the softmax's critical path would stall it). */
    auto load_k_scales = [&](int it, float (&k_scale)[2][2]) {
        const float *ks_tile = p.k_scale + bhk * p.k_groups + (int64_t)it * p.k_inter;
QA_UNROLL
        for (int jb = 0; jb < 2; jb++)
QA_UNROLL
            for (int cb = 0; cb < 2; cb++)
                k_scale[jb][cb] = ks_tile[p.k_inter == 1 ? 0 : key_of<true>(jb, 2 * t + cb) % 8];
    };
    auto softmax = [&](int it, auto mask_tag, const float (&k_scale)[2][2], uint32_t (&pa)[2][4], float (&alpha)[2]) {
        constexpr bool MASK = decltype(mask_tag)::value;
        const int j0 = it * kBlockN;
        float x[NT][4];
        /* The int32 scores to float without I2F (a quarter-rate conversion that
         * shares its pipe with MUFU.EX2): |s| < 2^22 (127 * 127 * 128 at most),
         * so the bits of s + 1.5 * 2^23 read as a float are exactly 1.5 * 2^23 + s. */
        float sc[2][2];
QA_UNROLL
        for (int hh = 0; hh < 2; hh++)
QA_UNROLL
            for (int cb = 0; cb < 2; cb++)
                sc[hh][cb] = q_scale[hh] * k_scale[0][cb];
        float sc1[2][2];
QA_UNROLL
        for (int hh = 0; hh < 2; hh++)
QA_UNROLL
            for (int cb = 0; cb < 2; cb++)
                sc1[hh][cb] = q_scale[hh] * k_scale[1][cb];
QA_UNROLL
        for (int j = 0; j < NT; j++)
QA_UNROLL
            for (int i = 0; i < 4; i++) {
                const float exact = __int_as_float(s[4 * j + i] + 0x4B400000) - 12582912.0f;
                float v = exact * ((j & 1) ? sc1[i >> 1][i & 1] : sc[i >> 1][i & 1]);
                if constexpr (MASK) {
                    const int key = j0 + key_of<true>(j, 2 * t + (i & 1));
                    const int row = i0 + row_base + (i >> 1) * 8;
                    if (key >= p.seq_k || (p.causal && key > row + diag))
                        v = -INFINITY;
                }
                x[j][i] = v;
            }
        online_softmax(x, m, l, alpha, kLog2P8); /* P comes out scaled by 448 */
        /* k32 step kc holds keys 32kc + {4t..4t+3} (rows g, g+8) and 32kc + 16 +
         * {4t..4t+3}, thanks to the permuted K rows. */
QA_UNROLL
        for (int kc = 0; kc < 2; kc++) {
            const float *p0 = x[4 * kc], *p1 = x[4 * kc + 1], *p2 = x[4 * kc + 2], *p3 = x[4 * kc + 3];
            pa[kc][0] = pack_e4m3x4(p0[0], p0[1], p1[0], p1[1]);
            pa[kc][1] = pack_e4m3x4(p0[2], p0[3], p1[2], p1[3]);
            pa[kc][2] = pack_e4m3x4(p2[0], p2[1], p3[0], p3[1]);
            pa[kc][3] = pack_e4m3x4(p2[2], p2[3], p3[2], p3[3]);
        }
    };
    auto softmax_tile = [&](int it, const float (&k_scale)[2][2], uint32_t (&pa)[2][4], float (&alpha)[2]) {
        if (it < n_plain)
            softmax(it, std::false_type(), k_scale, pa, alpha);
        else
            softmax(it, std::true_type(), k_scale, pa, alpha);
    };

    /* P V of tile it into a fresh accumulator (two-level accumulation). */
    using Acc = typename std::conditional<F16ACC, uint32_t, float>::type;
    constexpr int kAccRegs = F16ACC ? DT * 2 : DT * 4;
    Acc acc[kAccRegs];
QA_UNROLL
    for (int i = 0; i < kAccRegs; i++)
        acc[i] = 0;
    auto pv_issue = [&](int it, const uint32_t (&pa)[2][4]) {
        const uint64_t desc_v = stage_desc(desc_v0, it);
        const uint64_t dv[2] = {desc_v, desc_v + 2};
        fence_operands(acc);
        wgmma_fence();
QA_UNROLL
        for (int kc = 0; kc < 2; kc++) {
            if constexpr (F16ACC) {
                if constexpr (D == 128)
                    wgmma_e4m3_n128_rs_f16(acc, pa[kc], dv[kc], kc);
                else
                    wgmma_e4m3_n64_rs_f16(acc, pa[kc], dv[kc], kc);
            } else {
                if constexpr (D == 128)
                    wgmma_e4m3_n128_rs_f32(acc, pa[kc], dv[kc], kc);
                else
                    wgmma_e4m3_n64_rs_f32(acc, pa[kc], dv[kc], kc);
            }
        }
        wgmma_commit();
    };
    auto o_update = [&](const float (&alpha)[2]) {
QA_UNROLL
        for (int n = 0; n < DT; n++) {
            if constexpr (F16ACC) {
                o[4 * n + 0] = o[4 * n + 0] * alpha[0] + f16_lo(acc[2 * n]);
                o[4 * n + 1] = o[4 * n + 1] * alpha[0] + f16_hi(acc[2 * n]);
                o[4 * n + 2] = o[4 * n + 2] * alpha[1] + f16_lo(acc[2 * n + 1]);
                o[4 * n + 3] = o[4 * n + 3] * alpha[1] + f16_hi(acc[2 * n + 1]);
            } else {
QA_UNROLL
                for (int i = 0; i < 4; i++)
                    o[4 * n + i] = o[4 * n + i] * alpha[i >> 1] + acc[4 * n + i];
            }
        }
    };

    /* Prologue: Q with tile 0, then tiles 1 and 2 (one cp.async group each). */
    /* This warpgroup's 64 rows of Q. */
    load_rows90<128, 64, QC>(sQ + wg * 64 * D, gQ + (int64_t)wg * 64 * D, D, rows_valid - wg * 64, NaturalRows(),
                             tid() & 127);
QA_UNROLL
    for (int it = 0; it < 3; it++) {
        if (it < n_tiles)
            load_tile(it);
        cp_async_commit();
    }
    /* P and alpha of the tile whose P V is next, in two buffers used in turn:
     * the softmax of tile it + 1 writes one while P V of tile it still reads
     * the other from registers. */
    uint32_t pa[2][2][4];
    float alpha[2][2];
    if (n_tiles > 0) {
        cp_async_wait<2>();
        fence_proxy_async();
        sync_warpgroup(wg);
        float k_scale[2][2];
        load_k_scales(0, k_scale);
        qk_issue(0);
        wgmma_wait<0>();
        fence_operands(s);
        softmax_tile(0, k_scale, pa[0], alpha[0]);
    }

    /* Iteration it (FlashAttention-3's intra-warpgroup pipeline): issue S of
     * tile it + 1 and P V of tile it back to back; the softmax of tile it + 1
     * runs on the CUDA cores while P V is still on the tensor cores. Stage
     * (it + 3) % 4 is refilled here: it held tile it - 1, whose last reader
     * (P V of iteration it - 1) completed before this barrier. */
    auto step = [&](int it, const uint32_t (&pa_cur)[2][4], const float (&alpha_cur)[2], uint32_t (&pa_next)[2][4],
                    float (&alpha_next)[2]) {
        cp_async_wait<1>(); /* tile it + 1 has landed */
        fence_proxy_async();
        sync_warpgroup(wg);
        if (it + 3 < n_tiles)
            load_tile(it + 3);
        cp_async_commit();
        /* The last tile issues a throwaway S (of itself) so that every path
         * has the same wgmma groups in flight; ptxas serializes the pipeline
         * when the count at a partial wait differs between paths. */
        const bool more = it + 1 < n_tiles;
        float k_scale[2][2];
        load_k_scales(more ? it + 1 : it, k_scale);
        qk_issue(more ? it + 1 : it);
        pv_issue(it, pa_cur);
        wgmma_wait<1>(); /* S of tile it + 1 (committed first) */
        fence_operands(s);
        if (more)
            softmax_tile(it + 1, k_scale, pa_next, alpha_next);
        wgmma_wait<0>();
        fence_operands(acc);
        o_update(alpha_cur);
    };
    for (int it = 0; it < n_tiles; it += 2) {
        step(it, pa[0], alpha[0], pa[1], alpha[1]);
        if (it + 1 < n_tiles)
            step(it + 1, pa[1], alpha[1], pa[0], alpha[0]);
    }
    cp_async_wait<0>();

    store_rows<D>(p, ts, row_base, o, m, l, p.v_scale + bhk * D, kLog2P8, p.q_kmean);
#else
    (void)p;
#endif
}

} // namespace sm90
QA_NAMESPACE_END

#endif
