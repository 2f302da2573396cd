/*
 * The paged KV-cache kernels (namespace qa::paged; one source for the nvcc
 * build and the CPU emulator, on the primitives of cuda_device.cuh):
 *
 *  - attention_body: paged attention, decode and (chunked) prefill. A block of
 *    4 warps takes one (sequence, KV head, query tile, key split). Its rows are
 *    the query heads of the GQA group times the queries (row = query * group +
 *    member), so every K/V row read from memory serves the whole group. Keys
 *    stream through a cp.async pipeline of 64-key stages (16-byte copies, one
 *    page lookup per row, prefetched a tile ahead, so a page of one token costs
 *    what a page of sixteen does); quantized pages are decoded exactly to f16 in
 *    registers and their scales folded into the scores (K) and the softmax
 *    weights (V). S = Q K^T and O += P V run on mma.sync m16n8k16 with fp32
 *    accumulators. Decode (16 rows or fewer) gives each warp its own 16 keys of
 *    a stage and merges the four warps' states at the end; prefill gives each
 *    warp its own 16 rows.
 *  - check_body: the page-table check and the Q finite scan (status words).
 *  - merge_body: the exact LSE merge (split-KV partials, qattn_merge_states).
 *  - append_check_body / append_write_body: reshape_and_cache.
 *
 * With a page selection (p.sel_phys) the attention reads each (b, hk)'s
 * compacted list of selected physical pages instead of the table, over
 * kv_len' = (count - 1) * page_size + the last page's tokens (cuda_prune.cuh).
 */
#ifndef QA_CUDA_PAGED_KERNELS_CUH
#define QA_CUDA_PAGED_KERNELS_CUH

#include "cuda_device.cuh"
#include "cuda_internal.h"

QA_NAMESPACE_BEGIN
namespace paged {

constexpr float kLn2 = 0.69314718055994531f;

QA_HOSTDEV int imin(int a, int b) { return a < b ? a : b; }
QA_HOSTDEV int imax(int a, int b) { return a > b ? a : b; }
QA_HOSTDEV long long min64(long long a, long long b) { return a < b ? a : b; }

/* D = A * B + D, m16n8k16, fp32 accumulators; BF16 picks bf16 operands. */
template <bool BF16> QA_DEV void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    const uint32_t b[2] = {b0, b1};
    if (BF16)
        mma_bf16_f32(c, a, b);
    else
        mma_f16_f32(c, a, b);
}

/* ------------------------------------------------------- element access */

QA_DEV float load_elem(const void *base, int elem, long long i)
{
    if (elem == QA_ELEM_F16)
        return f16_to_f32(((const uint16_t *)base)[i]);
    if (elem == QA_ELEM_BF16)
        return bf16_to_f32(((const uint16_t *)base)[i]);
    return ((const float *)base)[i];
}

QA_DEV void store_elem(void *base, int elem, long long i, float x)
{
    if (elem == QA_ELEM_F16)
        ((uint16_t *)base)[i] = f16_bits(x);
    else if (elem == QA_ELEM_BF16)
        ((uint16_t *)base)[i] = bf16_bits(x);
    else
        ((float *)base)[i] = x;
}

/* Integer test, immune to fast-math: not NaN and not +-Inf. */
QA_DEV bool elem_finite(const void *base, int elem, long long i)
{
    if (elem == QA_ELEM_F16)
        return (((const uint16_t *)base)[i] & 0x7c00u) != 0x7c00u;
    if (elem == QA_ELEM_BF16)
        return (((const uint16_t *)base)[i] & 0x7f80u) != 0x7f80u;
    return (((const uint32_t *)base)[i] & 0x7f800000u) != 0x7f800000u;
}

/* ------------------------------------------------------ attention config */

template <int FMT> struct Traits {
    static constexpr int ES = (FMT == QATTN_KV_FMT_F16 || FMT == QATTN_KV_FMT_BF16) ? 2 : 1; /* bytes per cached element */
    static constexpr bool EIGHT = ES == 1;
    static constexpr bool BF16 = FMT == QATTN_KV_FMT_BF16;  /* bf16 MMA operands (else f16) */
    static constexpr bool FP8 = FMT == QATTN_KV_FMT_FP8;
    static constexpr bool ROW = FMT == QATTN_KV_FMT_I8_ROW; /* a scale per cached row */
    static constexpr bool HEAD = FMT == QATTN_KV_FMT_FP8 || FMT == QATTN_KV_FMT_I8;
};

QA_HOSTDEV constexpr int row_bytes(int fmt, int d) { return d * (fmt == QATTN_KV_FMT_F16 || fmt == QATTN_KV_FMT_BF16 ? 2 : 1); }
/* One stage: a K tile and a V tile of 64 rows, plus their per-row scales. */
QA_HOSTDEV constexpr int stage_bytes(int fmt, int d)
{
    return 2 * QA_PAGED_KEY_TILE * row_bytes(fmt, d) + (fmt == QATTN_KV_FMT_I8_ROW ? 2 * QA_PAGED_KEY_TILE * 4 : 0);
}
/* Stages in flight: up to 96 KiB of them, at least 2, at most 4. */
QA_HOSTDEV constexpr int stages(int fmt, int d)
{
    return 98304 / stage_bytes(fmt, d) < 2 ? 2 : 98304 / stage_bytes(fmt, d) > 4 ? 4 : 98304 / stage_bytes(fmt, d);
}

/* Dynamic shared memory of the attention kernel: the stages (reused at the
 * end for the warps' partial states), Q as fp32 rows, per-row Q multipliers,
 * and the low parts of Q's fragments when Q does not fit the operand type. */
typedef struct SmemLayout {
    int q, qmul, qlo, total;
} SmemLayout;

QA_HOSTDEV SmemLayout attention_smem(int fmt, int d, int row_warps, int need_lo)
{
    SmemLayout l;
    l.q = stages(fmt, d) * stage_bytes(fmt, d);
    l.qmul = l.q + 16 * row_warps * (d + 4) * 4;
    l.qlo = l.qmul + 64 * 4;
    l.total = l.qlo + (need_lo ? 4 * (d / 16) * 32 * 16 : 0);
    return l;
}

/* Row swizzle of the 16-byte chunks in a K/V tile: the 8 rows an ldmatrix
 * phase reads land in 8 different bank groups. */
template <int CPR> QA_DEV int swizzle(int row) { return CPR >= 8 ? (row & 7) : ((row >> 1) & 3); }

/* Four 8-bit codes of one cached row (4 consecutive dims) to two f16 pairs. */
template <bool FP8> QA_DEV void decode4(uint32_t w, uint32_t &lo, uint32_t &hi)
{
    if (FP8) {
        lo = e4m3x2_to_f16x2(w & 0xffffu);
        hi = e4m3x2_to_f16x2(w >> 16);
    } else { /* f16 with bits 0x64xx is 1024 + xx: bias the codes by 128, subtract 1152 */
        uint32_t x = w ^ 0x80808080u;
        lo = hsub2(prmt(x, 0x64646464u, 0x4140), 0x64806480u);
        hi = hsub2(prmt(x, 0x64646464u, 0x4342), 0x64806480u);
    }
}

/* An f16 pair of keys (low: byte `sel` 0, high: byte `sel` 2 of x) for one dim: V fragments. */
template <bool FP8> QA_DEV void decode_pairs(uint32_t a, uint32_t c, uint32_t b[2][2])
{
    /* a: keys 2t, 2t+1 (bytes: k2t d, k2t d+1, k2t+1 d, k2t+1 d+1); c: keys 2t+8, 2t+9, same dims.
     * b[e][0]: keys (2t, 2t+1) of dim d+e; b[e][1]: keys (2t+8, 2t+9). */
    if (FP8) {
        uint32_t even = prmt(a, c, 0x6420), odd = prmt(a, c, 0x7531);
        b[0][0] = e4m3x2_to_f16x2(even & 0xffffu);
        b[0][1] = e4m3x2_to_f16x2(even >> 16);
        b[1][0] = e4m3x2_to_f16x2(odd & 0xffffu);
        b[1][1] = e4m3x2_to_f16x2(odd >> 16);
    } else {
        uint32_t xa = a ^ 0x80808080u, xc = c ^ 0x80808080u;
        b[0][0] = hsub2(prmt(xa, 0x64646464u, 0x4240), 0x64806480u);
        b[0][1] = hsub2(prmt(xc, 0x64646464u, 0x4240), 0x64806480u);
        b[1][0] = hsub2(prmt(xa, 0x64646464u, 0x4341), 0x64806480u);
        b[1][1] = hsub2(prmt(xc, 0x64646464u, 0x4341), 0x64806480u);
    }
}

template <bool BF16> QA_DEV uint32_t pack(float x, float y) { return BF16 ? pack_bf16x2(x, y) : pack_f16x2(x, y); }
template <bool BF16> QA_DEV float half_value(uint32_t r, int part)
{
    uint16_t h = (uint16_t)(r >> (16 * part));
    return BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

/* Head dim of output column n (0..7) of accumulator tile nt. 16-bit V: the
 * natural order. 8-bit V: tiles come in (32-dim block, 16-dim half, parity). */
template <bool EIGHT> QA_DEV int out_dim(int nt, int n)
{
    return EIGHT ? 32 * (nt >> 2) + 16 * ((nt >> 1) & 1) + 2 * n + (nt & 1) : 8 * nt + n;
}

/* -------------------------------------------------------------- attention */

template <int FMT, int D> QA_DEV void attention_body(const qa_paged_attn_params &p)
{
    typedef Traits<FMT> T;
    constexpr int ES = T::ES, ROWB = D * ES, CPR = ROWB / 16, KT = QA_PAGED_KEY_TILE;
    constexpr int RSTEP = QA_PAGED_THREADS / CPR, NR = KT / RSTEP; /* rows per copy pass; rows a thread copies */
    constexpr int TILEB = KT * ROWB, STAGEB = stage_bytes(FMT, D), NS = stages(FMT, D);
    constexpr int NKS = D / 16, NNT = D / 8, QLD = D + 4;
    static_assert(CPR >= 4 && CPR <= QA_PAGED_THREADS && QA_PAGED_THREADS == 2 * KT, "tile geometry");
    static_assert(4 * 16 * D * 4 + 3 * 64 * 4 <= NS * STAGEB, "the warps' states fit in the stages");
    const float inf = inf_f32();

    if (p.status && (p.status[QATTN_STATUS_NONFINITE] | p.status[QATTN_STATUS_BOUNDS]))
        return; /* the check found bad tables or a non-finite Q: write nothing */

    const qa_paged_tables &tb = p.tab;
    long long item = block_x();
    const int split = (int)(item % p.splits);
    item /= p.splits;
    const int qt = (int)(item % p.q_tiles);
    item /= p.q_tiles;
    const int hk = (int)(item % p.heads_kv);
    const int b = (int)(item / p.heads_kv);
    const int P = tb.page_size, G = p.group;

    /* The sequence, clamped so that bad tables (unchecked) never read outside the buffers. */
    const int q0 = clamp<int>(tb.qo_indptr[b], 0, tb.total_q);
    const int q1 = clamp<int>(tb.qo_indptr[b + 1], q0, tb.total_q);
    const int q_len = imin(q1 - q0, tb.max_q_len);
    long long p0 = 0;
    int kv_len;
    if (tb.dense) {
        kv_len = clamp<int>(tb.seq_lens[b], 0, tb.max_pages * P);
    } else {
        p0 = clamp<long long>(tb.indptr[b], 0, tb.indices_count);
        long long p1 = clamp<long long>(tb.indptr[b + 1], p0, tb.indices_count);
        int pages = (int)min64(p1 - p0, tb.max_pages);
        kv_len = pages ? (pages - 1) * P + clamp<int>(tb.last_page_len[b], 1, P) : 0;
    }
    const int32_t *sel_list = nullptr;
    if (p.sel_phys) { /* the selected pages, compacted, as if they were the whole cache */
        const long long r = (long long)b * p.heads_kv + hk;
        const int n = (kv_len + P - 1) / P, count = clamp<int>(p.sel_counts[r], 0, n);
        kv_len = count ? (count - 1) * P + (kv_len - (n - 1) * P) : 0;
        sel_list = p.sel_phys + r * tb.max_pages;
    }
    const int RT = 16 * p.row_warps, WK = 4 / p.row_warps;
    const int row_base = qt * RT, rows = imin(RT, q_len * G - row_base);
    if (rows <= 0)
        return;
    const long long span = (long long)p.pages_per_split * P;
    const int kb = (int)min64((long long)split * span, kv_len);
    int ke = (int)min64((long long)(split + 1) * span, kv_len);
    if (p.causal) /* the tile's last query sees the most keys */
        ke = imin(ke, imax(kb, (row_base + rows - 1) / G + 1 + kv_len - q_len));
    const int ntiles = (ke - kb + KT - 1) / KT;

    uint8_t *const smem = dynamic_smem();
    const SmemLayout lay = attention_smem(FMT, D, p.row_warps, p.need_lo);
    const int tid = qa::tid();

    /* --- the copy pipeline: thread tid copies chunk tid % CPR of NR rows per tile */
    const int ld_chunk = tid % CPR, ld_row0 = tid / CPR;
    const long long head_off = (long long)hk * p.head_stride;
    /* The sequence's page list: row b of the dense table, or its CSR slice. */
    const int32_t *const page_list =
        sel_list ? sel_list : tb.dense ? tb.block_table + (long long)b * tb.max_pages : tb.indices + p0;
    auto page_index = [&](int j) -> int { /* j / P without a division */
        return p.page_div_mul ? (int)(umulhi((uint32_t)j, p.page_div_mul) >> p.page_div_shr) : j;
    };
    int ld_page[NR]; /* raw page ids of the next tile to copy (clamped when used) */
    int sc_page = 0;
    auto fetch_pages = [&](int u) {
        /* All loads issued together, branch-free (rows past the range re-read the last
         * valid entry); nothing uses them before the next tile's copies are issued. */
        for (int k = 0; k < NR; k++)
            ld_page[k] = load_early(page_list + page_index(imin(kb + u * KT + ld_row0 + k * RSTEP, ke - 1)));
        if (T::ROW)
            sc_page = load_early(page_list + page_index(imin(kb + u * KT + (tid & (KT - 1)), ke - 1)));
    };
    auto issue = [&](int u) {
        uint8_t *st = smem + (u % NS) * STAGEB;
        for (int k = 0; k < NR; k++) {
            int r = ld_row0 + k * RSTEP, j = kb + u * KT + r;
            bool valid = j < ke; /* rows past the range are zero-filled, never read */
            int off = valid ? j - page_index(j) * P : 0;
            int page = clamp<int>(ld_page[k], 0, tb.num_pages - 1); /* unchecked tables never reach outside */
            long long at = ((long long)page * p.page_stride + (long long)off * p.tok_stride + head_off) * ES +
                           ld_chunk * 16;
            int dst = r * ROWB + ((ld_chunk ^ swizzle<CPR>(r)) << 4);
            cp_async16(st + dst, valid ? p.k + at : p.k, valid);
            cp_async16(st + TILEB + dst, valid ? p.v + at : p.v, valid);
        }
        if (T::ROW) { /* threads 0..63: K scales of rows 0..63; 64..127: V scales */
            int r = tid & (KT - 1), j = kb + u * KT + r;
            bool valid = j < ke;
            int off = valid ? j - page_index(j) * P : 0;
            int page = clamp<int>(sc_page, 0, tb.num_pages - 1);
            const float *src = (tid < KT ? p.k_scale : p.v_scale) + ((long long)page * P + off) * p.heads_kv + hk;
            cp_async4(st + 2 * TILEB + (tid < KT ? 0 : KT * 4) + r * 4, valid ? src : p.k_scale, valid);
        }
    };
    if (ntiles > 0)
        fetch_pages(0);
    for (int s = 0; s < NS - 1; s++) {
        if (s < ntiles) {
            issue(s);
            fetch_pages(s + 1);
        }
        cp_async_commit();
    }

    /* --- Q: stage the tile's rows as fp32, scale each row by a power of two so
     * it fits f16's range (not needed for f16 Q or bf16 operands), split into the
     * MMA operand type plus a low part when that type cannot hold Q exactly. */
    float *qs = (float *)(smem + lay.q), *qmul = (float *)(smem + lay.qmul);
    for (int idx = tid; idx < RT * D; idx += QA_PAGED_THREADS) {
        int r = idx / D, d = idx - r * D;
        float x = 0.f;
        if (r < rows) {
            int pr = row_base + r, i = pr / G, member = pr - i * G;
            x = load_elem(p.q, p.q_elem,
                             (long long)(q0 + i) * p.q_stride0 + (long long)(hk * G + member) * p.q_stride1 + d);
        }
        qs[r * QLD + d] = x;
    }
    sync_block();
    if (!T::BF16 && p.q_elem != QA_ELEM_F16) {
        /* each row's amax over 128 / RT consecutive lanes, then a shuffle reduction among them */
        const int lanes = QA_PAGED_THREADS / RT, row = tid / lanes, sub = tid % lanes;
        float amax = 0.f;
        for (int d = sub; d < D; d += lanes)
            amax = fmaxf(amax, fabsf(qs[row * QLD + d]));
        for (int m = 1; m < lanes; m <<= 1)
            amax = fmaxf(amax, shfl_xor(amax, m));
        float mul = 1.f;
        if (amax > 0.f && is_finite(amax)) {
            int ex;
            frexpf(amax, &ex); /* amax in [2^(ex-1), 2^ex): bring it to [2^13, 2^14) */
            mul = ldexpf(1.f, imin(14 - ex, 100));
        }
        if (sub == 0)
            qmul[row] = mul;
    } else if (tid < RT) {
        qmul[tid] = 1.f;
    }
    sync_block();

    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp / WK, wk = warp % WK;
    const int r0 = wm * 16 + g, r1 = r0 + 8;
    uint32_t qa[NKS][4];
    uint32_t *qlo = (uint32_t *)(smem + lay.qlo) + warp * NKS * 32 * 4;
    for (int ks = 0; ks < NKS; ks++)
        for (int ri = 0; ri < 4; ri++) {
            /* A fragment register ri: row g (+8 when ri is odd), logical k 2t (+8 when ri >= 2). With
             * 8-bit pages the head dims are permuted to match the ldmatrix layout of the codes. */
            int row = (ri & 1) ? r1 : r0;
            int d = T::EIGHT ? 16 * ks + 4 * t + 2 * (ri >> 1) : 16 * ks + 2 * t + 8 * (ri >> 1);
            float x0 = qs[row * QLD + d] * qmul[row], x1 = qs[row * QLD + d + 1] * qmul[row];
            uint32_t hi = pack<T::BF16>(x0, x1);
            qa[ks][ri] = hi;
            if (p.need_lo)
                qlo[(ks * 32 + lane) * 4 + ri] =
                    pack<T::BF16>(x0 - half_value<T::BF16>(hi, 0), x1 - half_value<T::BF16>(hi, 1));
        }
    const float k_head = T::HEAD ? p.k_scale[hk] : 1.f;
    const float qm0 = p.scale_log2 * k_head / qmul[r0], qm1 = p.scale_log2 * k_head / qmul[r1];
    auto row_end = [&](int r) -> int { /* keys of row r: [kb, end) */
        if (!p.causal || r >= rows)
            return ke;
        return imin(ke, (row_base + r) / G + 1 + kv_len - q_len);
    };
    const int kend0 = row_end(r0), kend1 = row_end(r1);

    float o[NNT][4];
    for (int nt = 0; nt < NNT; nt++)
        o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
    float m_run[2] = {-inf, -inf}, l_run[2] = {0.f, 0.f}, mo_run[2] = {-inf, -inf};

    /* ldmatrix row addresses: lane l feeds row l % 8 of matrix l / 8. */
    const int mi = lane >> 3, r8 = lane & 7;
    const int k_row = T::EIGHT ? (mi & 1) * 8 + r8 : (mi >> 1) * 8 + r8, k_cadd = T::EIGHT ? (mi >> 1) : (mi & 1);
    const int v_row = (mi & 1) * 8 + r8, v_cadd = mi >> 1;
    const int swz = swizzle<CPR>(r8);

    for (int u = 0; u < ntiles; u++) {
        cp_async_wait<NS - 2>();
        sync_block(); /* tile u has landed for all threads; everyone is done with tile u - 1's stage */
        if (u + NS - 1 < ntiles) {
            issue(u + NS - 1);
            fetch_pages(u + NS);
        }
        cp_async_commit();
        const uint8_t *kt = smem + (u % NS) * STAGEB, *vt = kt + TILEB;
        const float *ksc = (const float *)(kt + 2 * TILEB), *vsc = ksc + KT;

        for (int kg = wk; kg < KT / 16; kg += WK) {
            const int key0 = kb + u * KT + kg * 16;
            if (key0 >= ke)
                break;
            /* S = Q K^T for 16 keys: two n-tiles of 8, even and odd k-steps in separate
             * accumulators (two shorter dependency chains), added at the end */
            float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            float s_odd[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            const uint8_t *krow = kt + (kg * 16 + k_row) * ROWB;
            if (!T::EIGHT) {
                for (int ks = 0; ks < NKS; ks++) {
                    uint32_t kf[4];
                    float(*acc)[4] = (ks & 1) ? s_odd : s;
                    ldsm_x4(kf, smem_addr(krow + (((2 * ks + k_cadd) ^ swz) << 4)));
                    mma16816<T::BF16>(acc[0], qa[ks], kf[0], kf[1]);
                    mma16816<T::BF16>(acc[1], qa[ks], kf[2], kf[3]);
                    if (p.need_lo) {
                        const uint32_t *lo = qlo + (ks * 32 + lane) * 4;
                        uint32_t a[4] = {lo[0], lo[1], lo[2], lo[3]};
                        mma16816<T::BF16>(acc[0], a, kf[0], kf[1]);
                        mma16816<T::BF16>(acc[1], a, kf[2], kf[3]);
                    }
                }
            } else {
                for (int c2 = 0; c2 < D / 32; c2++) {
                    uint32_t kf[4];
                    ldsm_x4(kf, smem_addr(krow + (((2 * c2 + k_cadd) ^ swz) << 4)));
                    for (int q = 0; q < 4; q++) { /* matrix q: keys 8 * (q & 1) .., k-step 2 * c2 + q / 2 */
                        uint32_t b0, b1;
                        decode4<T::FP8>(kf[q], b0, b1);
                        const int ks = 2 * c2 + (q >> 1), nt = q & 1;
                        float *acc = (q >> 1) ? s_odd[nt] : s[nt];
                        mma16816<false>(acc, qa[ks], b0, b1);
                        if (p.need_lo) {
                            const uint32_t *lo = qlo + (ks * 32 + lane) * 4;
                            uint32_t a[4] = {lo[0], lo[1], lo[2], lo[3]};
                            mma16816<false>(acc, a, b0, b1);
                        }
                    }
                }
            }
            for (int nt = 0; nt < 2; nt++)
                for (int e = 0; e < 4; e++)
                    s[nt][e] += s_odd[nt][e];

            /* Online softmax in the log2 domain. Accumulator element e of tile nt is
             * row g + 8 * (e / 2), key 8 * nt + 2t + e % 2. */
            float mx[2] = {-inf, -inf};
            for (int nt = 0; nt < 2; nt++)
                for (int e = 0; e < 4; e++) {
                    const int kl = nt * 8 + 2 * t + (e & 1), h = e >> 1;
                    float x = s[nt][e] * (h ? qm1 : qm0);
                    if (T::ROW)
                        x *= ksc[kg * 16 + kl];
                    x = key0 + kl < (h ? kend1 : kend0) ? x : -inf;
                    s[nt][e] = x;
                    mx[h] = fmaxf(mx[h], x);
                }
            float alpha[2], base[2];
            for (int h = 0; h < 2; h++) {
                mx[h] = fmaxf(mx[h], shfl_xor(mx[h], 1));
                mx[h] = fmaxf(mx[h], shfl_xor(mx[h], 2));
                float m_new = fmaxf(m_run[h], mx[h]);
                base[h] = m_new == -inf ? 0.f : m_new; /* a row that has seen no key yet */
                alpha[h] = ex2(m_run[h] - base[h]);
                m_run[h] = m_new;
            }
            float pr[2][4], lsum[2] = {0.f, 0.f};
            for (int nt = 0; nt < 2; nt++)
                for (int e = 0; e < 4; e++) {
                    pr[nt][e] = ex2(s[nt][e] - base[e >> 1]);
                    lsum[e >> 1] += pr[nt][e];
                }
            l_run[0] = l_run[0] * alpha[0] + lsum[0];
            l_run[1] = l_run[1] * alpha[1] + lsum[1];
            if (T::ROW) {
                /* Fold the V row scales into the weights without leaving f16's range: the
                 * weights get their own running maximum (mo) over s + log2(v_scale). */
                float my[2] = {-inf, -inf};
                for (int nt = 0; nt < 2; nt++)
                    for (int e = 0; e < 4; e++) {
                        float y = s[nt][e] + lg2(vsc[kg * 16 + nt * 8 + 2 * t + (e & 1)]);
                        pr[nt][e] = y;
                        my[e >> 1] = fmaxf(my[e >> 1], y);
                    }
                for (int h = 0; h < 2; h++) {
                    my[h] = fmaxf(my[h], shfl_xor(my[h], 1));
                    my[h] = fmaxf(my[h], shfl_xor(my[h], 2));
                    float mo_new = fmaxf(mo_run[h], my[h]);
                    base[h] = mo_new == -inf ? 0.f : mo_new;
                    alpha[h] = ex2(mo_run[h] - base[h]);
                    mo_run[h] = mo_new;
                }
                for (int nt = 0; nt < 2; nt++)
                    for (int e = 0; e < 4; e++)
                        pr[nt][e] = ex2(pr[nt][e] - base[e >> 1]);
            }
            if (alpha[0] != 1.f || alpha[1] != 1.f) /* once the maxima settle, most groups skip this */
                for (int nt = 0; nt < NNT; nt++) {
                    o[nt][0] *= alpha[0];
                    o[nt][1] *= alpha[0];
                    o[nt][2] *= alpha[1];
                    o[nt][3] *= alpha[1];
                }
            /* P as the A operand: registers (row g, keys 2t..), (row g+8, ..), (row g, keys 8+2t..), (row g+8, ..) */
            uint32_t pa[4] = {pack<T::BF16>(pr[0][0], pr[0][1]), pack<T::BF16>(pr[0][2], pr[0][3]),
                              pack<T::BF16>(pr[1][0], pr[1][1]), pack<T::BF16>(pr[1][2], pr[1][3])};
            uint32_t p_lo[4] = {0, 0, 0, 0};
            if (T::BF16) { /* bf16 keeps 8 bits: carry P's next 8 in a second operand */
                p_lo[0] = pack<true>(pr[0][0] - half_value<true>(pa[0], 0), pr[0][1] - half_value<true>(pa[0], 1));
                p_lo[1] = pack<true>(pr[0][2] - half_value<true>(pa[1], 0), pr[0][3] - half_value<true>(pa[1], 1));
                p_lo[2] = pack<true>(pr[1][0] - half_value<true>(pa[2], 0), pr[1][1] - half_value<true>(pa[2], 1));
                p_lo[3] = pack<true>(pr[1][2] - half_value<true>(pa[3], 0), pr[1][3] - half_value<true>(pa[3], 1));
            }

            /* O += P V */
            const uint8_t *vrow = vt + (kg * 16 + v_row) * ROWB;
            if (!T::EIGHT) {
                for (int j = 0; j < D / 16; j++) {
                    uint32_t vf[4];
                    ldsm_x4_t(vf, smem_addr(vrow + (((2 * j + v_cadd) ^ swz) << 4)));
                    mma16816<T::BF16>(o[2 * j], pa, vf[0], vf[1]);
                    mma16816<T::BF16>(o[2 * j + 1], pa, vf[2], vf[3]);
                    if (T::BF16) {
                        mma16816<true>(o[2 * j], p_lo, vf[0], vf[1]);
                        mma16816<true>(o[2 * j + 1], p_lo, vf[2], vf[3]);
                    }
                }
            } else {
                for (int j = 0; j < D / 32; j++) {
                    uint32_t vf[4];
                    ldsm_x4_t(vf, smem_addr(vrow + (((2 * j + v_cadd) ^ swz) << 4)));
                    for (int h = 0; h < 2; h++) { /* h: the 16 dims of chunk 2j + h */
                        uint32_t bb[2][2];
                        decode_pairs<T::FP8>(vf[2 * h], vf[2 * h + 1], bb);
                        mma16816<false>(o[4 * j + 2 * h], pa, bb[0][0], bb[0][1]);
                        mma16816<false>(o[4 * j + 2 * h + 1], pa, bb[1][0], bb[1][1]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    /* --- merge the warps that shared rows, normalize, write */
    for (int h = 0; h < 2; h++) {
        l_run[h] += shfl_xor(l_run[h], 1);
        l_run[h] += shfl_xor(l_run[h], 2);
    }
    sync_block(); /* every warp is done with the stages: reuse them */
    float *osm = (float *)smem, *msm = osm + 4 * 16 * D, *lsm = msm + 64, *mosm = lsm + 64;
    for (int nt = 0; nt < NNT; nt++)
        for (int e = 0; e < 4; e++)
            osm[(warp * 16 + g + 8 * (e >> 1)) * D + out_dim<T::EIGHT>(nt, 2 * t + (e & 1))] = o[nt][e];
    if (t == 0)
        for (int h = 0; h < 2; h++) {
            msm[warp * 16 + g + 8 * h] = m_run[h];
            lsm[warp * 16 + g + 8 * h] = l_run[h];
            mosm[warp * 16 + g + 8 * h] = T::ROW ? mo_run[h] : m_run[h];
        }
    sync_block();
    const float v_head = T::HEAD ? p.v_scale[hk] : 1.f;
    for (int idx = tid; idx < rows * D; idx += QA_PAGED_THREADS) {
        const int r = idx / D, d = idx - r * D, grp = r >> 4, rr = r & 15;
        float M = -inf, MO = -inf;
        for (int w = 0; w < WK; w++) {
            M = fmaxf(M, msm[(grp * WK + w) * 16 + rr]);
            MO = fmaxf(MO, mosm[(grp * WK + w) * 16 + rr]);
        }
        float L = 0.f, acc = 0.f;
        for (int w = 0; w < WK; w++) {
            const int at = (grp * WK + w) * 16 + rr;
            if (msm[at] != -inf)
                L += lsm[at] * ex2(msm[at] - M);
            if (mosm[at] != -inf)
                acc += osm[at * D + d] * ex2(mosm[at] - MO);
        }
        float out = 0.f, lse = -inf;
        if (L > 0.f) {
            out = acc * ex2(MO - M) * v_head / L;
            lse = (M + log2f(L)) * kLn2;
        }
        const int pr = row_base + r, i = pr / G, head = hk * G + (pr - i * G);
        const long long row = q0 + i;
        if (p.part_o) {
            const long long at = ((long long)split * tb.total_q + row) * p.heads_q + head;
            p.part_o[at * D + d] = out;
            if (d == 0)
                p.part_lse[at] = lse;
        } else {
            store_elem(p.o, p.q_elem, row * p.o_stride0 + (long long)head * p.o_stride1 + d, out);
            if (d == 0 && p.lse)
                p.lse[row * p.heads_q + head] = lse;
        }
    }
}

/* ------------------------------------------------------------------ check */

/* Blocks [0, batch): sequence `block`'s table entries; the rest: Q's NaN/Inf scan. */
QA_DEV void check_body(const qa_paged_check_params &p)
{
    const qa_paged_tables &tb = p.tab;
    const long long blk = block_x();
    const int tid = qa::tid();
    if (blk < tb.batch) {
        const int b = (int)blk, P = tb.page_size;
        const long long q_len = (long long)tb.qo_indptr[b + 1] - tb.qo_indptr[b];
        bool bad = (b == 0 && tb.qo_indptr[0] < 0) || q_len < 0 || q_len > tb.max_q_len ||
                   tb.qo_indptr[b + 1] > tb.total_q;
        long long pages = 0, first = 0;
        if (!bad && tb.dense) {
            const int len = tb.seq_lens[b];
            bad = len < 0 || len > (long long)tb.max_pages * P;
            pages = ((long long)len + P - 1) / P;
            first = (long long)b * tb.max_pages;
        } else if (!bad) {
            const long long a0 = tb.indptr[b], a1 = tb.indptr[b + 1];
            bad = tb.indptr[0] < 0 || a1 < a0 || a1 > tb.indices_count || a1 - a0 > tb.max_pages ||
                  (a1 > a0 && (tb.last_page_len[b] < 1 || tb.last_page_len[b] > P));
            pages = a1 - a0;
            first = a0;
        }
        if (bad) { /* the host names the entry from the tables (src/checks.c) */
            if (tid == 0)
                atomic_or(p.status + QATTN_STATUS_BOUNDS, 1u);
            return;
        }
        for (long long i = tid; i < pages; i += QA_PAGED_THREADS) {
            const int page = tb.dense ? tb.block_table[first + i] : tb.indices[first + i];
            if (page < 0 || page >= tb.num_pages) {
                atomic_or(p.status + QATTN_STATUS_BOUNDS, 1u);
                break;
            }
        }
        return;
    }
    const long long lo = clamp<long long>(tb.qo_indptr[0], 0, tb.total_q);
    const long long hi = clamp<long long>(tb.qo_indptr[tb.batch], lo, tb.total_q);
    const long long n = (hi - lo) * p.heads_q * p.head_dim;
    const long long step = ((long long)grid_x() - tb.batch) * QA_PAGED_THREADS;
    bool bad = false;
    for (long long idx = (blk - tb.batch) * QA_PAGED_THREADS + tid; idx < n; idx += step) {
        const long long d = idx % p.head_dim, rest = idx / p.head_dim;
        const long long h = rest % p.heads_q, row = lo + rest / p.heads_q;
        bad |= !elem_finite(p.q, p.q_elem, row * p.q_stride0 + h * p.q_stride1 + d);
    }
    if (bad)
        atomic_or(p.status + QATTN_STATUS_NONFINITE, QATTN_NONFINITE_Q);
}

/* ------------------------------------------------------------------ merge */

QA_DEV float warp_max(float x)
{
    for (int m = 16; m; m >>= 1)
        x = fmaxf(x, shfl_xor(x, m));
    return x;
}
QA_DEV float warp_sum(float x)
{
    for (int m = 16; m; m >>= 1)
        x += shfl_xor(x, m);
    return x;
}

/* Work units of the merge: one warp per (row, head, 32 channels). */
QA_DEV long long merge_chunks(int head_dim) { return (head_dim + 31) / 32; }

/* lse = log(sum_s exp(lse_s)), o = sum_s exp(lse_s - lse) o_s. One warp per
 * (row, head, 32-channel chunk), so a single sequence's split-KV merge still
 * spreads over many warps; each lane issues the loads of four states before
 * accumulating them, so the partials' latencies overlap instead of queueing. */
QA_DEV void merge_body(const qa_merge_params &p)
{
    if (p.status && (p.status[QATTN_STATUS_NONFINITE] | p.status[QATTN_STATUS_BOUNDS]))
        return;
    const float inf = inf_f32();
    const int lane = tid() & 31;
    long long row_lo = 0, row_hi = p.rows;
    if (p.qo_indptr) {
        row_lo = clamp<long long>(p.qo_indptr[0], 0, p.rows);
        row_hi = clamp<long long>(p.qo_indptr[p.batch], row_lo, p.rows);
    }
    const long long chunks = merge_chunks(p.head_dim);
    const long long units = (row_hi - row_lo) * p.heads * chunks, warps = (long long)grid_x() * (QA_PAGED_THREADS / 32);
    for (long long w = block_x() * (QA_PAGED_THREADS / 32) + (tid() >> 5); w < units; w += warps) {
        const long long pair = w / chunks;
        const int d = (int)(w - pair * chunks) * 32 + lane;
        const long long r = row_lo + pair / p.heads;
        const int h = (int)(pair % p.heads);
        const float *s = p.s + r * p.s_stride[1] + (long long)h * p.s_stride[2];
        float M = -inf;
        for (int st = lane; st < p.states; st += 32)
            M = fmaxf(M, s[st * p.s_stride[0]]);
        M = warp_max(M);
        float total = 0.f;
        if (M != -inf)
            for (int st = lane; st < p.states; st += 32) {
                const float x = s[st * p.s_stride[0]];
                if (x != -inf)
                    total += expf(x - M);
            }
        total = warp_sum(total);
        const long long vbase = r * p.v_stride[1] + (long long)h * p.v_stride[2];
        const int dd = d < p.head_dim ? d : 0; /* lanes past the head dim read channel 0 and store nothing */
        float acc = 0.f;
        for (int s0 = 0; M != -inf && s0 < p.states; s0 += 32) {
            /* lane k holds state s0 + k's weight; every lane takes each in turn */
            const float x = s0 + lane < p.states ? s[(s0 + lane) * p.s_stride[0]] : -inf;
            const float w_mine = x != -inf ? expf(x - M) : 0.f;
            const int n = imin(32, p.states - s0);
            const long long at = vbase + (long long)s0 * p.v_stride[0] + dd;
            int k = 0;
            for (; k + 4 <= n; k += 4) {
                float v[4];
                for (int u = 0; u < 4; u++)
                    v[u] = load_elem(p.v, p.v_elem, at + (long long)(k + u) * p.v_stride[0]);
                for (int u = 0; u < 4; u++) {
                    const float wk = shfl_idx(w_mine, k + u);
                    if (wk != 0.f) /* an empty split's partial may hold anything */
                        acc += wk * v[u];
                }
            }
            for (; k < n; k++) {
                const float vk = load_elem(p.v, p.v_elem, at + (long long)k * p.v_stride[0]);
                const float wk = shfl_idx(w_mine, k);
                if (wk != 0.f)
                    acc += wk * vk;
            }
        }
        if (d < p.head_dim)
            store_elem(p.o, p.o_elem, r * p.o_stride[0] + (long long)h * p.o_stride[1] + d,
                          M != -inf ? acc / total : 0.f);
        if (lane == 0 && d == 0 && p.lse)
            p.lse[r * p.heads + h] = M != -inf ? M + logf(total) : -inf;
    }
}

/* ----------------------------------------------------------------- append */

/* Blocks [0, dup_blocks): block i checks tokens [128 i, 128 i + 128) against
 * the cache's range and every later token for a repeated slot. Then blocks
 * scan the new tokens for NaN/Inf (and the first of them the per-head scales). */
QA_DEV void append_check_body(const qa_append_params &p, long long dup_blocks)
{
    const long long blk = block_x();
    const int tid = qa::tid();
    if (blk < dup_blocks) {
        const long long t = blk * QA_PAGED_THREADS + tid;
        const long long slot = t < p.num_tokens ? p.slots[t] : -1;
        if (slot >= p.capacity)
            atomic_or(p.status + QATTN_STATUS_BOUNDS, 1u);
        long long *other = (long long *)dynamic_smem();
        bool dup = false;
        for (long long jb = blk; jb < dup_blocks; jb++) {
            sync_block();
            const long long j = jb * QA_PAGED_THREADS + tid;
            other[tid] = j < p.num_tokens ? p.slots[j] : -1;
            sync_block();
            if (slot >= 0 && slot < p.capacity && !dup)
                for (int k = jb == blk ? tid + 1 : 0; k < QA_PAGED_THREADS; k++)
                    if (other[k] == slot) {
                        dup = true;
                        break;
                    }
        }
        if (dup)
            atomic_or(p.status + QATTN_STATUS_BOUNDS, 1u);
        return;
    }
    const long long per_token = (long long)p.heads_kv * p.head_dim, n = p.num_tokens * per_token;
    const long long step = ((long long)grid_x() - dup_blocks) * QA_PAGED_THREADS;
    bool bad = false;
    for (long long idx = (blk - dup_blocks) * QA_PAGED_THREADS + tid; idx < n; idx += step) {
        const long long t = idx / per_token, rest = idx - t * per_token, h = rest / p.head_dim;
        const long long at = t * p.new_stride0 + h * p.new_stride1 + (rest - h * p.head_dim);
        bad |= !elem_finite(p.k_new, p.new_elem, at) || !elem_finite(p.v_new, p.new_elem, at);
    }
    if (bad)
        atomic_or(p.status + QATTN_STATUS_NONFINITE, QATTN_NONFINITE_NEW_KV);
    if (blk == dup_blocks && (p.cache_format == QATTN_KV_FMT_FP8 || p.cache_format == QATTN_KV_FMT_I8))
        for (int h = tid; h < p.heads_kv; h += QA_PAGED_THREADS) {
            const float ks = p.k_scale[h], vs = p.v_scale[h];
            if (!(ks >= QATTN_QUANT_MIN_AMAX && is_finite(ks)) || !(vs >= QATTN_QUANT_MIN_AMAX && is_finite(vs)))
                atomic_or(p.status + QATTN_STATUS_BOUNDS, 1u);
        }
}

/* One warp per (token, head, K or V): convert or quantize a row into its slot. */
QA_DEV void append_write_body(const qa_append_params &p)
{
    const int lane = tid() & 31, H = p.heads_kv, D = p.head_dim, P = p.page_size;
    const long long total = p.num_tokens * H * 2, warps = (long long)grid_x() * (QA_PAGED_THREADS / 32);
    for (long long w = block_x() * (QA_PAGED_THREADS / 32) + (tid() >> 5); w < total; w += warps) {
        const long long t = w / (2 * H);
        const int rem = (int)(w - t * 2 * H), h = rem >> 1, which = rem & 1;
        const long long slot = p.slots[t];
        if (slot < 0 || slot >= p.capacity) /* padding (or out of range when unchecked) */
            continue;
        const long long page = slot / P, off = slot - page * P;
        const void *src = which ? p.v_new : p.k_new;
        const long long sbase = t * p.new_stride0 + (long long)h * p.new_stride1;
        uint8_t *cache = which ? p.v : p.k;
        const long long dbase = page * p.page_stride + off * p.tok_stride + (long long)h * p.head_stride;
        if (p.cache_format == QATTN_KV_FMT_F16 || p.cache_format == QATTN_KV_FMT_BF16) {
            for (int d = lane; d < D; d += 32) {
                const float x = load_elem(src, p.new_elem, sbase + d);
                ((uint16_t *)cache)[dbase + d] = p.cache_format == QATTN_KV_FMT_F16 ? f16_bits(x) : bf16_bits(x);
            }
            continue;
        }
        float *scales = which ? p.v_scale : p.k_scale;
        float inv;
        if (p.cache_format == QATTN_KV_FMT_I8_ROW) { /* the row's own scale: amax / 127 */
            float amax = 0.f;
            for (int d = lane; d < D; d += 32)
                amax = fmaxf(amax, fabsf(load_elem(src, p.new_elem, sbase + d)));
            amax = warp_max(amax);
            if (lane == 0)
                scales[(page * P + off) * H + h] = amax < QATTN_QUANT_MIN_AMAX ? 0.f : amax / 127.f;
            inv = amax < QATTN_QUANT_MIN_AMAX ? 0.f : 127.f / amax;
        } else { /* a scale below the floor (or not > 0) writes zeros */
            inv = scales[h] >= QATTN_QUANT_MIN_AMAX ? 1.f / scales[h] : 0.f;
        }
        for (int d = lane; d < D; d += 32) {
            const float x = load_elem(src, p.new_elem, sbase + d) * inv;
            if (p.cache_format == QATTN_KV_FMT_FP8) {
                cache[dbase + d] = e4m3(x);
            } else {
                const float r = fminf(fmaxf(rintf(x), -127.f), 127.f); /* NaN: -127, as quant_i8 */
                cache[dbase + d] = (uint8_t)(int8_t)r;
            }
        }
    }
}

/* ---------------------------------------------------------------- kernels */

template <int FMT, int D> QA_KERNEL(QA_PAGED_THREADS) attention_kernel(const QA_GRID_CONSTANT qa_paged_attn_params p)
{
    attention_body<FMT, D>(p);
}

QA_KERNEL(QA_PAGED_THREADS) check_kernel(const QA_GRID_CONSTANT qa_paged_check_params p) { check_body(p); }

QA_KERNEL(QA_PAGED_THREADS) merge_kernel(const QA_GRID_CONSTANT qa_merge_params p) { merge_body(p); }

QA_KERNEL(QA_PAGED_THREADS) append_check_kernel(const QA_GRID_CONSTANT qa_append_params p, long long dup_blocks)
{
    append_check_body(p, dup_blocks);
}

QA_KERNEL(QA_PAGED_THREADS) append_write_kernel(const QA_GRID_CONSTANT qa_append_params p) { append_write_body(p); }

} // namespace paged
QA_NAMESPACE_END

#endif
