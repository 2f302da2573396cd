/*
 * Flash attention forward, OpenCL C 1.2, fp32 accumulation.
 *
 * A work-group of 128 work-items (16 x 8) owns BQ = 8*TM query rows of one
 * (batch, q head) and walks the keys in tiles of BK = 64 with an online
 * softmax in the log2 domain (O(N) memory). Work-item (tx, ty) holds
 *   S: rows ty*TM .. +TM-1 x keys tx*4 .. +3         (TM x 4 registers)
 *   O: the same rows x TD = D/16 channels             (TM x TD registers)
 * so every value read from local memory feeds 4..TD FMAs (register blocking,
 * as in an SGEMM). Q and K are staged through local memory in chunks of DC
 * channels (transposed, so each step is two or three float4 loads), P goes
 * through local memory [key][row], and V in chunks of KC keys. Row maxima
 * are reduced across the 16 work-items of a row; row sums stay per
 * work-item (they share the row maximum) and are added once at the end.
 *
 * Host macros: HEAD_DIM (multiple of 16), TM (4 or 8), MODE, HAS_INT_DOT,
 * plus common.cl's. MODE: 0 exact (inputs f32/f16/bf16), 1 INT8_FP16,
 * 2 INT8_FP8, 3 INT8_FP8_F16ACC; the quantized modes read the workspace the
 * prep pass wrote (src/internal.h layout) and emulate the CPU reference:
 * INT8 Q.K exact in integers, P rounded to fp16 or to E4M3 (P * 448), V fp16
 * or E4M3 with per-channel scales, F16ACC rounding sums of 32 keys into an
 * fp16 accumulator per 64-key block.
 *
 * SPARSE (sparse.cl comes before this file): the tile visits only the key
 * steps its rows see under causal + window + sinks (sp_tile_steps), or, with
 * a layout, the steps sparse_lists listed for its (b, hkv, tile), masking per
 * element only in steps the masks cut; pv_limit > 0 drops P.V of a 16-row
 * group for a step whose P are all below it (the row sums keep them).
 */
#define MODE_EXACT 0
#define MODE_INT8_FP16 1
#define MODE_INT8_FP8 2
#define MODE_INT8_FP8_F16ACC 3
#define QUANT (MODE != MODE_EXACT)
#define FP8 (MODE >= MODE_INT8_FP8)

#define WG 128
#define TX 16
#define TY 8
#define TN 4
#define BQ (TY * TM)
#define BK (TX * TN)
#define TD (HEAD_DIM / TX)
#define KC (HEAD_DIM > 128 ? 16 : 32)
#ifndef F16ACC_CHUNK
#define F16ACC_CHUNK 32 /* keys summed exactly before each fp16 accumulation (plan: pv_f16_chunk) */
#endif
#ifndef SPARSE
#define SPARSE 0
#endif

/* Channels (exact) or 4-channel words (INT8) staged per Q.K step. */
#if QUANT
#define NWORDS (HEAD_DIM / 4)
#define QK_STEPS NWORDS
#define DC (NWORDS % 16 == 0 ? 16 : NWORDS % 8 == 0 ? 8 : 4)
#else
#define QK_STEPS HEAD_DIM
#define DC (HEAD_DIM % 32 == 0 ? 32 : 16)
#endif

/* Local strides, padded by 4 floats: keeps float4 alignment, spreads banks. */
#define QS (BQ + 4)
#define KS (BK + 4)
#define VS (HEAD_DIM + 4)
#define PS (BQ + 4)
#define RS (BQ + 4)
#define STAGE_QK (DC * (QS + KS))
#define STAGE_V (KC * VS)
#define STAGE (STAGE_QK > STAGE_V ? STAGE_QK : STAGE_V)
#define OUT_BLOCK (BQ * HEAD_DIM + BQ) /* output rows, then their LSE */
#define WORK (STAGE + BK * PS + TX * RS)
#define SMEM (WORK > OUT_BLOCK ? WORK : OUT_BLOCK)

/* Channel of a work-item's i-th output column: float4 runs when TD allows. */
#if TD % 4 == 0
#define DIM(tx, i) ((((i) >> 2) << 6) + ((tx) << 2) + ((i)&3))
#else
#define DIM(tx, i) ((tx) + TX * (i))
#endif

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

#if QUANT
#if HAS_INT_DOT
#pragma OPENCL EXTENSION cl_khr_integer_dot_product : enable
static inline int dot4_i8(uint a, uint b) { return dot_4x8packed_ss_int(a, b); }
#else
/* Four int8 products summed in int: exact, no extension needed. */
static inline int dot4_i8(uint a, uint b)
{
    char4 x = as_char4(a), y = as_char4(b);
    return (int)x.s0 * y.s0 + (int)x.s1 * y.s1 + (int)x.s2 * y.s2 + (int)x.s3 * y.s3;
}
#endif
#endif

/* Loads 4 consecutive channels of an input row as floats: one vector load
 * (vloadn and vload_halfn need only element alignment). */
static inline float4 load_in4(global const in_bits *p, long i)
{
#if IN_DTYPE == DT_F32
    return as_float4(vload4(0, p + i));
#elif IN_DTYPE == DT_F16
#if HAS_FP16
    return convert_float4(vload4(0, (global const half *)p + i));
#else
    return vload_half4(0, (global const half *)p + i);
#endif
#else
    return as_float4(convert_uint4(vload4(0, p + i)) << 16);
#endif
}

kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void flash_attention(
    global const in_bits *q, global const in_bits *k, global const in_bits *v, global out_bits *o,
    global float *lse, global uchar *ws,
    long q_off, long q_sb, long q_sh, long q_sn,
    long k_off, long k_sb, long k_sh, long k_sn,
    long v_off, long v_sb, long v_sh, long v_sn,
    long o_off, long o_sb, long o_sh, long o_sn,
    long lse_off, int want_lse,
    int heads_q, int heads_kv, int group, int nq, int nk, int causal, float qk_scale, int nqb,
    long status_at, long q_i8_at, long k_i8_at, long v_q_at, long q_scale_at, long k_scale_at, long v_scale_at,
    long q_kmean_at, int q_groups, int k_groups, int q_block, int q_inter, int k_block, int k_inter, int nk_pad
#if SPARSE
    , int sp_window, long sp_left, long sp_right, long sp_sinks, int sp_layout, long sp_counts_at, long sp_list_at,
    int sp_nsteps, float pv_limit
#endif
    )
{
    /* One local array: the staging area, P, the row reductions; at the end
     * the normalized output block, stored to global memory cooperatively. */
    local float smem[SMEM];
    local float *const stage = smem;
    local float *const ps = smem + STAGE;
    local float *const red = ps + BK * PS;

    const int lid = get_local_id(0);
    const int tx = lid % TX, ty = lid / TX;
    const int bh_count = get_num_groups(0) / nqb;
    const int bh = get_group_id(0) % bh_count;
    const int qblk = nqb - 1 - (int)(get_group_id(0) / bh_count); /* costliest causal blocks first */
    const int b = bh / heads_q, h = bh % heads_q, hk = h / group;
    const int bhk = b * heads_kv + hk;
    const int row0 = qblk * BQ;

    if (stopped(ws, status_at))
        return; /* the finite scan failed: leave the outputs untouched */

    /* Keys the block's last row may see; tiles past it are fully masked. */
    const int diag = nk - nq; /* row i sees key j iff j <= i + diag (causal) */
    const int last_row = min(row0 + BQ, nq) - 1;
    const int key_end = causal ? min(nk, last_row + 1 + diag) : nk;
    const int ntiles = key_end > 0 ? (key_end + BK - 1) / BK : 0;
#if SPARSE
    /* Each row's keys, the tile's union (the steps it visits) and what every row sees (unmasked steps). */
    local int pv_big[BQ / 16];
    int row_lo[TM], row_hi[TM], row_sink[TM];
#pragma unroll
    for (int r = 0; r < TM; r++) {
        int i = row0 + ty * TM + r;
        row_lo[r] = row_hi[r] = row_sink[r] = 0;
        if (i < nq)
            sp_row_keys(i, nq, nk, causal, sp_window, sp_left, sp_right, sp_sinks, &row_lo[r], &row_hi[r],
                        &row_sink[r]);
    }
    int u_lo, u_hi, u_sink, x_lo, x_hi, x_sink, sp_ns, sp_w0, nsteps;
    sp_tile_keys(row0, min(BQ, nq - row0), nq, nk, causal, sp_window, sp_left, sp_right, sp_sinks, &u_lo, &u_hi,
                 &u_sink, &x_lo, &x_hi, &x_sink);
    sp_tile_steps(u_lo, u_hi, u_sink, &sp_ns, &sp_w0, &nsteps);
    global const uint2 *sp_list = 0;
    if (sp_layout) {
        const long at = (long)bhk * nqb + qblk;
        nsteps = clamp(((global const int *)(ws + sp_counts_at))[at], 0, sp_nsteps);
        sp_list = (global const uint2 *)(ws + sp_list_at) + at * sp_nsteps;
    }
    const uint all_cells = BQ == 64 ? 0xffffu : 0xffu;
    const int my_group = (ty * TM) / 16;
#endif

    global const in_bits *qh = q + q_off + (long)b * q_sb + (long)h * q_sh;
    global const in_bits *kh = k + k_off + (long)b * k_sb + (long)hk * k_sh;
    global const in_bits *vh = v + v_off + (long)b * v_sb + (long)hk * v_sh;

#if QUANT
    global const uint *q8 = (global const uint *)(ws + q_i8_at) + (long)bh * nq * NWORDS;
    global const uint *k8 = (global const uint *)(ws + k_i8_at) + (long)bhk * nk * NWORDS;
    global const float *kscale_g = (global const float *)(ws + k_scale_at) + (long)bhk * k_groups;
    float qrow_scale[TM];
    {
        global const float *qs = (global const float *)(ws + q_scale_at) + (long)bh * q_groups;
#pragma unroll
        for (int r = 0; r < TM; r++) {
            int i = row0 + ty * TM + r;
            qrow_scale[r] = i < nq ? qs[quant_group_of(i, q_block, q_inter)] * qk_scale : 0.0f;
        }
    }
#endif

    float m[TM], l[TM], acc[TM][TD];
#pragma unroll
    for (int r = 0; r < TM; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < TD; i++)
            acc[r][i] = 0.0f;
    }

#if SPARSE
    for (int e = 0; e < nsteps; e++) {
        int tile = e < sp_ns ? e : sp_w0 + e - sp_ns;
        uint cells = all_cells;
        if (sp_layout) {
            const uint2 it = sp_list[e];
            tile = (int)it.x;
            cells = it.y;
        }
        const int j0 = tile * BK;
        const bool cut = cells != all_cells || !sp_step_full(j0, nk, x_lo, x_hi, x_sink);
#else
    for (int tile = 0; tile < ntiles; tile++) {
        const int j0 = tile * BK;
#endif

        /* ---- S = Q K^T for BQ rows x BK keys, DC channels (words) per step */
#if QUANT
        int si[TM][TN];
#else
        float s[TM][TN];
#endif
#pragma unroll
        for (int r = 0; r < TM; r++)
#pragma unroll
            for (int c = 0; c < TN; c++) {
#if QUANT
                si[r][c] = 0;
#else
                s[r][c] = 0.0f;
#endif
            }
        for (int d0 = 0; d0 < QK_STEPS; d0 += DC) {
            barrier(CLK_LOCAL_MEM_FENCE); /* the previous readers of `stage` are done */
#if SPARSE
            if (d0 == 0 && lid < BQ / 16)
                pv_big[lid] = 0; /* the previous step's readers passed this barrier */
#endif
            /* Stage Q [DC][BQ] and K [DC][BK], transposed; 4 channels (words) per item,
             * consecutive work-items on consecutive channels of a row. */
            for (int e = lid; e < BQ * (DC / 4); e += WG) {
                int dd = (e % (DC / 4)) * 4, rr = e / (DC / 4);
                int tok = row0 + rr;
#if QUANT
                float4 x = as_float4(tok < nq ? vload4(0, q8 + (long)tok * NWORDS + d0 + dd) : (uint4)(0u));
#else
                float4 x = tok < nq ? load_in4(qh, (long)tok * q_sn + d0 + dd) * qk_scale : (float4)(0.0f);
#endif
                local float *dst = stage + dd * QS + rr;
                dst[0] = x.s0;
                dst[QS] = x.s1;
                dst[2 * QS] = x.s2;
                dst[3 * QS] = x.s3;
            }
            for (int e = lid; e < BK * (DC / 4); e += WG) {
                int dd = (e % (DC / 4)) * 4, rr = e / (DC / 4);
                int tok = j0 + rr;
#if QUANT
                float4 x = as_float4(tok < nk ? vload4(0, k8 + (long)tok * NWORDS + d0 + dd) : (uint4)(0u));
#else
                float4 x = tok < nk ? load_in4(kh, (long)tok * k_sn + d0 + dd) : (float4)(0.0f);
#endif
                local float *dst = stage + DC * QS + dd * KS + rr;
                dst[0] = x.s0;
                dst[KS] = x.s1;
                dst[2 * KS] = x.s2;
                dst[3 * KS] = x.s3;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            local const float *qsm = stage + ty * TM;
            local const float *ksm = stage + DC * QS + tx * TN;
#pragma unroll 4
            for (int d = 0; d < DC; d++) {
                float qv[TM];
#pragma unroll
                for (int r = 0; r < TM; r += 4) {
                    float4 t4 = vload4(0, qsm + d * QS + r);
                    qv[r] = t4.s0;
                    qv[r + 1] = t4.s1;
                    qv[r + 2] = t4.s2;
                    qv[r + 3] = t4.s3;
                }
                float4 kv = vload4(0, ksm + d * KS);
                float kk[TN] = {kv.s0, kv.s1, kv.s2, kv.s3};
#pragma unroll
                for (int r = 0; r < TM; r++)
#pragma unroll
                    for (int c = 0; c < TN; c++) {
#if QUANT
                        si[r][c] += dot4_i8(as_uint(qv[r]), as_uint(kk[c]));
#else
                        s[r][c] = mad(qv[r], kk[c], s[r][c]);
#endif
                    }
            }
        }

        /* ---- scores in the log2 domain, masked: causal and keys past Nk */
#if QUANT
        float s[TM][TN];
        float kscale[TN];
#pragma unroll
        for (int c = 0; c < TN; c++) {
            int j = j0 + tx * TN + c;
            kscale[c] = j < nk ? kscale_g[quant_group_of(j, k_block, k_inter)] : 0.0f;
        }
#endif
        float tile_max[TM];
#pragma unroll
        for (int r = 0; r < TM; r++) {
            int i = row0 + ty * TM + r;
            int visible = causal ? min(nk, i + 1 + diag) : nk;
            tile_max[r] = -INFINITY;
#pragma unroll
            for (int c = 0; c < TN; c++) {
                int j = j0 + tx * TN + c;
#if QUANT
                float x = (float)si[r][c] * qrow_scale[r] * kscale[c];
#else
                float x = s[r][c];
#endif
#if SPARSE
                bool vis = true;
                if (cut)
                    vis = (j < row_sink[r] || (j >= row_lo[r] && j < row_hi[r])) &&
                          ((cells >> (4 * ((ty * TM + r) >> 4) + (tx >> 2))) & 1u);
                s[r][c] = vis ? x : -INFINITY;
#else
                s[r][c] = j < visible ? x : -INFINITY;
#endif
                tile_max[r] = fmax(tile_max[r], s[r][c]);
            }
        }
        /* Row maxima across the 16 work-items that share the rows. */
#pragma unroll
        for (int r = 0; r < TM; r += 4)
            vstore4((float4)(tile_max[r], tile_max[r + 1], tile_max[r + 2], tile_max[r + 3]), 0,
                    red + tx * RS + ty * TM + r);
        barrier(CLK_LOCAL_MEM_FENCE);
        float mt[TM];
#pragma unroll
        for (int r = 0; r < TM; r += 4) {
            float4 x = vload4(0, red + ty * TM + r);
            for (int t = 1; t < TX; t++)
                x = fmax(x, vload4(0, red + t * RS + ty * TM + r));
            mt[r] = x.s0;
            mt[r + 1] = x.s1;
            mt[r + 2] = x.s2;
            mt[r + 3] = x.s3;
        }
        float alpha[TM], m_ref[TM];
#pragma unroll
        for (int r = 0; r < TM; r++) {
            float m_new = fmax(m[r], mt[r]);
            /* A row with no visible key yet keeps m = -inf; 0 avoids inf - inf. */
            m_ref[r] = m_new == -INFINITY ? 0.0f : m_new;
            alpha[r] = native_exp2(m[r] - m_ref[r]);
            m[r] = m_new;
        }

        /* P = 2^(s - m): the row sum uses P unquantized, P.V its quantized value. */
#if SPARSE
#pragma unroll
        for (int c = 0; c < TN; c++)
#pragma unroll
            for (int r = 0; r < TM; r++)
                s[r][c] = native_exp2(s[r][c] - m_ref[r]);
        /* pv_threshold: a 16-row group (absolute rows; row0 is a multiple of 16) whose P in this
         * step are all below the limit adds nothing to P.V; a step where every group does skips V. */
        bool pv_drop = false, pv_skip_step = false;
        if (pv_limit > 0.0f) {
            bool big = false;
#pragma unroll
            for (int r = 0; r < TM; r++)
#pragma unroll
                for (int c = 0; c < TN; c++)
                    big = big || (s[r][c] >= pv_limit && row0 + ty * TM + r < nq);
            if (big)
                pv_big[my_group] = 1;
            barrier(CLK_LOCAL_MEM_FENCE);
            pv_drop = pv_big[my_group] == 0;
            pv_skip_step = true;
            for (int g = 0; g < BQ / 16; g++)
                pv_skip_step = pv_skip_step && pv_big[g] == 0;
        }
#endif
#pragma unroll
        for (int c = 0; c < TN; c++) {
            float pq[TM];
#pragma unroll
            for (int r = 0; r < TM; r++) {
#if SPARSE
                float p = pv_drop ? 0.0f : s[r][c];
#else
                float p = native_exp2(s[r][c] - m_ref[r]);
                s[r][c] = p;
#endif
#if MODE == MODE_INT8_FP16
                pq[r] = round_f16(p);
#elif FP8
                pq[r] = e4m3_to_float(float_to_e4m3(p * 448.0f));
#else
                pq[r] = p;
#endif
            }
#pragma unroll
            for (int r = 0; r < TM; r += 4)
                vstore4((float4)(pq[r], pq[r + 1], pq[r + 2], pq[r + 3]), 0, ps + (tx * TN + c) * PS + ty * TM + r);
        }
#pragma unroll
        for (int r = 0; r < TM; r++) {
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < TN; c++)
                sum += s[r][c];
            l[r] = l[r] * alpha[r] + sum;
#pragma unroll
            for (int i = 0; i < TD; i++)
                acc[r][i] *= alpha[r];
        }

        /* ---- O += P V, V staged KC keys at a time */
#if SPARSE
        if (pv_skip_step)
            continue; /* no group keeps a product: V is not loaded */
#endif
#if MODE == MODE_INT8_FP8_F16ACC
        float acc16[TM][TD], part[TM][TD];
#pragma unroll
        for (int r = 0; r < TM; r++)
#pragma unroll
            for (int i = 0; i < TD; i++)
                acc16[r][i] = part[r][i] = 0.0f;
#endif
        for (int kc = 0; kc < BK; kc += KC) {
            barrier(CLK_LOCAL_MEM_FENCE); /* P written; the Q/K stage is no longer read */
#if FP8
            /* V codes are [D][Nk_pad]: read 4 keys of one channel, decode, transpose. */
            global const uchar *vq = ws + v_q_at + (long)bhk * HEAD_DIM * nk_pad;
            for (int e = lid; e < HEAD_DIM * (KC / 4); e += WG) {
                int t4 = (e % (KC / 4)) * 4, c = e / (KC / 4);
                int t = j0 + kc + t4;
                uchar4 code = t < nk_pad ? vload4(0, vq + (long)c * nk_pad + t) : (uchar4)(0);
                local float *dst = stage + t4 * VS + c;
                dst[0] = e4m3_to_float(code.s0);
                dst[VS] = e4m3_to_float(code.s1);
                dst[2 * VS] = e4m3_to_float(code.s2);
                dst[3 * VS] = e4m3_to_float(code.s3);
            }
#else
            for (int e = lid; e < KC * (HEAD_DIM / 4); e += WG) {
                int dd = (e % (HEAD_DIM / 4)) * 4, t = e / (HEAD_DIM / 4);
                int tok = j0 + kc + t;
                float4 x = (float4)(0.0f);
                if (tok < nk) {
#if MODE == MODE_INT8_FP16
                    global const half *vf = (global const half *)(ws + v_q_at) + ((long)bhk * nk + tok) * HEAD_DIM;
#if HAS_FP16
                    x = convert_float4(vload4(0, vf + dd));
#else
                    x = vload_half4(0, vf + dd);
#endif
#else
                    x = load_in4(vh, (long)tok * v_sn + dd);
#endif
                }
                vstore4(x, 0, stage + t * VS + dd);
            }
#endif
            barrier(CLK_LOCAL_MEM_FENCE);
#pragma unroll 2
            for (int j = 0; j < KC; j++) {
                float pv[TM], vv[TD];
#pragma unroll
                for (int r = 0; r < TM; r += 4) {
                    float4 t4 = vload4(0, ps + (kc + j) * PS + ty * TM + r);
                    pv[r] = t4.s0;
                    pv[r + 1] = t4.s1;
                    pv[r + 2] = t4.s2;
                    pv[r + 3] = t4.s3;
                }
#if TD % 4 == 0
#pragma unroll
                for (int i = 0; i < TD; i += 4) {
                    float4 t4 = vload4(0, stage + j * VS + DIM(tx, i));
                    vv[i] = t4.s0;
                    vv[i + 1] = t4.s1;
                    vv[i + 2] = t4.s2;
                    vv[i + 3] = t4.s3;
                }
#else
#pragma unroll
                for (int i = 0; i < TD; i++)
                    vv[i] = stage[j * VS + DIM(tx, i)];
#endif
#pragma unroll
                for (int r = 0; r < TM; r++)
#pragma unroll
                    for (int i = 0; i < TD; i++) {
#if MODE == MODE_INT8_FP8_F16ACC
                        part[r][i] = mad(pv[r], vv[i], part[r][i]);
#else
                        acc[r][i] = mad(pv[r], vv[i], acc[r][i]);
#endif
                    }
            }
#if MODE == MODE_INT8_FP8_F16ACC
            if ((kc + KC) % F16ACC_CHUNK == 0) {
#pragma unroll
                for (int r = 0; r < TM; r++)
#pragma unroll
                    for (int i = 0; i < TD; i++) {
                        acc16[r][i] = round_f16(acc16[r][i] + part[r][i]);
                        part[r][i] = 0.0f;
                    }
            }
#endif
        }
#if MODE == MODE_INT8_FP8_F16ACC
#pragma unroll
        for (int r = 0; r < TM; r++)
#pragma unroll
            for (int i = 0; i < TD; i++)
                acc[r][i] += acc16[r][i];
#endif
    }

    /* ---- row sums across the 16 work-items, normalize, store */
    barrier(CLK_LOCAL_MEM_FENCE); /* `red` readers of the last tile are done */
#pragma unroll
    for (int r = 0; r < TM; r += 4)
        vstore4((float4)(l[r], l[r + 1], l[r + 2], l[r + 3]), 0, red + tx * RS + ty * TM + r);
    barrier(CLK_LOCAL_MEM_FENCE);
    float sums[TM];
#pragma unroll
    for (int r = 0; r < TM; r += 4) {
        float4 x = (float4)(0.0f);
        for (int t = 0; t < TX; t++)
            x += vload4(0, red + t * RS + ty * TM + r);
        sums[r] = x.s0;
        sums[r + 1] = x.s1;
        sums[r + 2] = x.s2;
        sums[r + 3] = x.s3;
    }
    float inv[TM], row_lse[TM];
#pragma unroll
    for (int r = 0; r < TM; r++) {
        float lsum = sums[r];
        inv[r] = lsum > 0.0f ? 1.0f / lsum : 0.0f;
#if FP8
        inv[r] /= 448.0f; /* P was scaled by 448 before FP8 */
#endif
        row_lse[r] = lsum > 0.0f ? m[r] * LN2 + log(lsum) : -INFINITY;
    }
    barrier(CLK_LOCAL_MEM_FENCE); /* everyone has read `red`: smem becomes the output block */
    local float *const out = smem;
    local float *const out_lse = smem + BQ * HEAD_DIM;
#if FP8
    global const float *vscale = (global const float *)(ws + v_scale_at) + (long)bhk * HEAD_DIM;
#endif
#pragma unroll
    for (int r = 0; r < TM; r++) {
#pragma unroll
        for (int c = 0; c < TD; c++) {
            float val = acc[r][c] * inv[r];
#if FP8
            val *= vscale[DIM(tx, c)];
#endif
            out[(ty * TM + r) * HEAD_DIM + DIM(tx, c)] = val;
        }
    }
    if (tx == 0)
        for (int r = 0; r < TM; r++)
            out_lse[ty * TM + r] = row_lse[r];
    barrier(CLK_LOCAL_MEM_FENCE);
    /* Consecutive work-items store consecutive channels; rows past Nq are never touched. */
    const int rows = min(BQ, nq - row0);
    global out_bits *oblk = o + o_off + (long)b * o_sb + (long)h * o_sh + (long)row0 * o_sn;
    for (int e = lid; e < rows * HEAD_DIM; e += WG) {
        int r = e / HEAD_DIM, c = e % HEAD_DIM;
        store_out(oblk, (long)r * o_sn + c, out[e]);
    }
    if (want_lse)
        for (int r = lid; r < rows; r += WG) {
            float x = out_lse[r];
#if QUANT
            if (q_kmean_at >= 0 && x != -INFINITY)
                x += ((global const float *)(ws + q_kmean_at))[(long)bh * nq + row0 + r];
#endif
            lse[lse_off + (long)bh * nq + row0 + r] = x;
        }
}
