#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * Flash attention (EXACT, fp16 inputs) on cooperative matrices
 * (GL_KHR_cooperative_matrix, 16x16x16 fp16 x fp16 + fp32).
 *
 * A workgroup is 4 subgroups; each subgroup owns 16 query rows (BR = 64 per
 * workgroup) and keeps Q (D/16 A fragments) and O (D/16 fp32 accumulators)
 * in registers for the whole key loop. Per tile of BC keys:
 *   S = Q K^T      BC/16 accumulators, K^T read from shared memory
 *   softmax        S goes through shared memory (the accumulator layout is
 *                  opaque); SG/16 invocations per row reduce with subgroup
 *                  shuffles, in the log2 domain with fp32 m and l, and write
 *                  P as fp16 (the A operand of P.V)
 *   O = alpha O    per element, through the accumulator's row map (below)
 *   O += P V       V from shared memory
 * K and V share one shared-memory tile; the next tile is prefetched into
 * registers while the current one is used, hiding global latency.
 *
 * The row of an accumulator element is implementation-defined; it is learned
 * once by loading a matrix whose elements hold their row index: elements with
 * the same index in two accumulators of the same type sit at the same place.
 *
 * EMULATE_COOPMAT replaces every cooperative-matrix operation with plain code
 * on per-invocation arrays (element e = lane + SG * i, row-major), so the
 * kernel's tiling, masking and softmax logic runs on devices without matrix
 * units (lavapipe); the build tests it there.
 */
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#ifdef EMULATE_COOPMAT
#extension GL_EXT_control_flow_attributes : require
#else
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#endif
#include "common.glsl"

layout(constant_id = 0) const uint D = 128;
layout(constant_id = 4) const uint BC = 64;   /* keys per tile: 32 or 64 (BR is a multiple) */
layout(constant_id = 6) const uint CAUSAL = 0;
layout(constant_id = 7) const uint SG = 32;   /* the (required) subgroup size, >= 8 */
layout(constant_id = 8) const uint PREFETCH = 1; /* 0: load each K/V tile straight into shared memory */
layout(local_size_x_id = 7) in;               /* x 4 subgroups: local_size_y = 4 */
layout(local_size_y = 4) in;

const uint NSG = 4;                 /* subgroups per workgroup */
const uint BR = 16 * NSG;           /* query rows per workgroup */
const uint DT = D / 16;             /* 16-wide tiles along the head dim */
const uint KT = BC / 16;            /* 16-wide tiles along the keys */
const uint PD = D + 8;              /* fp16 pitch of the Q/K/V tile (breaks bank conflicts, keeps 16 B rows) */
const uint PS = BC + 4;             /* fp32 pitch of a subgroup's scores */
const uint PP = BC + 8;             /* fp16 pitch of a subgroup's probabilities */
const uint LPR = SG >= 16 ? SG / 16 : 1; /* invocations per row in the softmax */
const uint RPL = SG >= 16 ? 1 : 16 / SG; /* rows per invocation (small subgroups) */
const uint KPL = BC / LPR;          /* keys per invocation per row */

shared uvec4 kv_s[BC * PD / 8];     /* Q at the start, then K and V tiles (8 fp16 per uvec4) */
shared float s_s[NSG * 16 * PS];
shared uvec4 p_s[NSG * 16 * PP / 8];
shared float row_s[NSG * 16];       /* per-row alpha, then 1 / l */

layout(std430, set = 0, binding = 0) readonly buffer QV4 { uvec4 q_v4[]; };
layout(std430, set = 0, binding = 1) readonly buffer KV4 { uvec4 k_v4[]; };
layout(std430, set = 0, binding = 2) readonly buffer VV4 { uvec4 v_v4[]; };

#ifdef EMULATE_COOPMAT
/* ---- emulation: 256 elements spread over the subgroup, row-major ---- */
const uint EN = 256 / SG;
shared float emu_a[NSG * 256];
shared float emu_b[NSG * 256];
#define ACC_T float
#define ACC_DECL(name) float name[EN]
#define ACC_ARR(name, n) float name[n][EN]
#define FRAG_DECL(name) float name[EN]
#define FRAG_ARR(name, n) float name[n][EN]
#define ACC_LEN EN
uint emu_sg() { return gl_SubgroupID; }
float half_at(uvec4 w, uint j)
{
    uint word = j < 4u ? (j < 2u ? w.x : w.y) : (j < 6u ? w.z : w.w);
    return unpackHalf2x16(word).x * float(1u - (j & 1u)) + unpackHalf2x16(word).y * float(j & 1u);
}
/* element (r, c) of a matrix in kv_s / p_s (fp16, pitch in uvec4 units) */
float kv_half(uint off, uint stride, uint r, uint c, bool colmajor)
{
    uint h = colmajor ? (off * 8u + c * stride * 8u + r) : (off * 8u + r * stride * 8u + c);
    return half_at(kv_s[h / 8u], h % 8u);
}
float p_half(uint off, uint stride, uint r, uint c)
{
    uint h = off * 8u + r * stride * 8u + c;
    return half_at(p_s[h / 8u], h % 8u);
}
#define LOAD_KV(m, off, stride, colmajor)                                                         \
    [[dont_unroll]] for (uint i_ = 0u; i_ < EN; i_++) {                                                           \
        uint e_ = gl_SubgroupInvocationID + SG * i_;                                              \
        m[i_] = kv_half(off, stride, e_ / 16u, e_ % 16u, colmajor);                               \
    }
#define LOAD_P(m, off, stride)                                                                    \
    [[dont_unroll]] for (uint i_ = 0u; i_ < EN; i_++) {                                                           \
        uint e_ = gl_SubgroupInvocationID + SG * i_;                                              \
        m[i_] = p_half(off, stride, e_ / 16u, e_ % 16u);                                          \
    }
#define LOAD_S(m, off, stride)                                                                    \
    [[dont_unroll]] for (uint i_ = 0u; i_ < EN; i_++) {                                                           \
        uint e_ = gl_SubgroupInvocationID + SG * i_;                                              \
        m[i_] = s_s[(off) + (e_ / 16u) * (stride) + e_ % 16u];                                    \
    }
#define STORE_S(m, off, stride)                                                                   \
    [[dont_unroll]] for (uint i_ = 0u; i_ < EN; i_++) {                                                           \
        uint e_ = gl_SubgroupInvocationID + SG * i_;                                              \
        s_s[(off) + (e_ / 16u) * (stride) + e_ % 16u] = m[i_];                                    \
    }
#define ACC_ZERO(m) [[dont_unroll]] for (uint i_ = 0u; i_ < EN; i_++) m[i_] = 0.0;
/* c += a * b, through the subgroup's scratch */
#define MUL_ADD(a, b, c)                                                                          \
    {                                                                                             \
        uint base_ = emu_sg() * 256u;                                                             \
        [[dont_unroll]] for (uint i_ = 0u; i_ < EN; i_++) {                                                       \
            uint e_ = gl_SubgroupInvocationID + SG * i_;                                          \
            emu_a[base_ + e_] = a[i_];                                                            \
            emu_b[base_ + e_] = b[i_];                                                            \
        }                                                                                         \
        subgroupMemoryBarrierShared();                                                            \
        subgroupBarrier();                                                                        \
        [[dont_unroll]] for (uint i_ = 0u; i_ < EN; i_++) {                                                       \
            uint e_ = gl_SubgroupInvocationID + SG * i_, r_ = e_ / 16u, c_ = e_ % 16u;            \
            float acc_ = c[i_];                                                                   \
            [[dont_unroll]] for (uint k_ = 0u; k_ < 16u; k_++)                                                    \
                acc_ += emu_a[base_ + r_ * 16u + k_] * emu_b[base_ + k_ * 16u + c_];              \
            c[i_] = acc_;                                                                         \
        }                                                                                         \
        subgroupMemoryBarrierShared();                                                            \
        subgroupBarrier();                                                                        \
    }
#else
/* ---- cooperative matrices ---- */
#define ACC_TYPE coopmat<float, gl_ScopeSubgroup, 16, 16, gl_MatrixUseAccumulator>
#define A_TYPE coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA>
#define B_TYPE coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseB>
#define ACC_DECL(name) ACC_TYPE name
#define ACC_ARR(name, n) ACC_TYPE name[n]
#define ACC_LEN 16
#define ROW_MAJOR gl_CooperativeMatrixLayoutRowMajor
#define COL_MAJOR gl_CooperativeMatrixLayoutColumnMajor
#define LOAD_KV(m, off, stride, colmajor) coopMatLoad(m, kv_s, off, stride, (colmajor) ? COL_MAJOR : ROW_MAJOR);
#define LOAD_P(m, off, stride) coopMatLoad(m, p_s, off, stride, ROW_MAJOR);
#define LOAD_S(m, off, stride) coopMatLoad(m, s_s, off, stride, ROW_MAJOR);
#define STORE_S(m, off, stride) coopMatStore(m, s_s, off, stride, ROW_MAJOR);
#define ACC_ZERO(m) m = ACC_TYPE(0.0);
#define MUL_ADD(a, b, c) c = coopMatMulAdd(a, b, c);
#endif

/* Copies rows [t0, t0 + rows) of a [*, D] fp16 tensor (uvec4 view, row pitch
 * `pitch` uvec4s) into kv_s; rows past `valid` become zero. */
void stage_rows(uint which, uint base_v4, uint pitch_v4, uint t0, uint valid, uint rows)
{
    const uint W = D / 8; /* uvec4 per row */
    uint tid = gl_LocalInvocationIndex;
    for (uint e = tid; e < rows * W; e += SG * NSG) {
        uint r = e / W, c = e % W, t = t0 + r;
        uvec4 v = uvec4(0u);
        if (t < valid) {
            uint at = base_v4 + t * pitch_v4 + c;
            v = which == 0u ? q_v4[at] : which == 1u ? k_v4[at] : v_v4[at];
        }
        kv_s[r * (PD / 8) + c] = v;
    }
}

/* A tile's worth of K or V rows in registers, per invocation. */
const uint PREF = (BC * D / 8 + SG * NSG - 1) / (SG * NSG);

void prefetch(inout uvec4 pref[PREF], uint which, uint base_v4, uint pitch_v4, uint t0, uint valid)
{
    const uint W = D / 8;
    uint tid = gl_LocalInvocationIndex;
    for (uint k = 0u; k < PREF; k++) {
        uint e = tid + k * SG * NSG;
        uint r = e / W, c = e % W, t = t0 + r;
        uvec4 v = uvec4(0u);
        if (e < BC * W && t < valid) {
            uint at = base_v4 + t * pitch_v4 + c;
            v = which == 1u ? k_v4[at] : v_v4[at];
        }
        pref[k] = v;
    }
}

void commit_prefetch(uvec4 pref[PREF])
{
    const uint W = D / 8;
    uint tid = gl_LocalInvocationIndex;
    for (uint k = 0u; k < PREF; k++) {
        uint e = tid + k * SG * NSG;
        if (e < BC * W)
            kv_s[(e / W) * (PD / 8) + e % W] = pref[k];
    }
}

/* One online-softmax step for row r of subgroup sg over key tile j0: reads
 * the scores from s_s, writes P (fp16) to p_s and alpha to row_s, updates the
 * row's running max m and sum l (log2 domain). Scalars, not arrays: private
 * arrays indexed in loops spill to scratch on some drivers. */
void softmax_row(uint sg, uint r, uint part, uint i0, uint j0, inout float m, inout float l)
{
    int i = int(i0 + sg * 16u + r);
    int kend = key_end(min(i, int(P.seq_q) - 1), CAUSAL != 0u);
    float sv[KPL];
    float mx = NEG_INF;
    for (uint c = 0u; c < KPL; c++) {
        uint key = part * KPL + c;
        float s = s_s[sg * 16u * PS + r * PS + key] * P.qk_scale_log2;
        if (int(j0 + key) >= kend)
            s = NEG_INF;
        sv[c] = s;
        mx = max(mx, s);
    }
    for (uint x = 1u; x < LPR; x <<= 1)
        mx = max(mx, subgroupShuffleXor(mx, x));
    float m_new = max(m, mx);
    float alpha = 1.0, sum = 0.0;
    if (m_new != NEG_INF) {
        alpha = m == NEG_INF ? 0.0 : exp2(m - m_new);
        for (uint c = 0u; c < KPL; c++) {
            sv[c] = exp2(sv[c] - m_new);
            sum += sv[c];
        }
    } else {
        for (uint c = 0u; c < KPL; c++)
            sv[c] = 0.0;
    }
    for (uint x = 1u; x < LPR; x <<= 1)
        sum += subgroupShuffleXor(sum, x);
    l = l * alpha + sum;
    m = m_new;
    /* P as fp16, 8 keys per store */
    for (uint c = 0u; c < KPL; c += 8u) {
        uvec4 w = uvec4(packHalf2x16(vec2(sv[c], sv[c + 1u])), packHalf2x16(vec2(sv[c + 2u], sv[c + 3u])),
                        packHalf2x16(vec2(sv[c + 4u], sv[c + 5u])), packHalf2x16(vec2(sv[c + 6u], sv[c + 7u])));
        p_s[(sg * 16u * PP + r * PP + part * KPL + c) / 8u] = w;
    }
    if (part == 0u)
        row_s[sg * 16u + r] = alpha;
}

void main()
{
    if (inputs_nonfinite())
        return;
    const uint sg = gl_SubgroupID, lane = gl_SubgroupInvocationID;
    const uint Nq = P.seq_q, Nk = P.seq_k;
    const bool causal = CAUSAL != 0u;
    /* q, k, v element offsets and strides are multiples of 8 (16-byte alignment, checked by the core) */
    const uint q_pitch = P.q_sn / 8u, k_pitch = P.k_sn / 8u, v_pitch = P.v_sn / 8u;

    /* The accumulator row map: rowmap[i] is the row of element i. */
    uint rowmap[ACC_LEN]; /* entries past acc_len are unused */
    uint acc_len;
    {
        for (uint e = lane; e < 256u; e += SG)
            s_s[sg * 16u * PS + (e / 16u) * PS + e % 16u] = float(e / 16u);
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        ACC_DECL(rows_m);
        LOAD_S(rows_m, sg * 16u * PS, PS)
#ifdef EMULATE_COOPMAT
        acc_len = EN;
        for (uint i = 0u; i < ACC_LEN; i++)
            rowmap[i] = uint(rows_m[i]);
#else
        acc_len = min(uint(rows_m.length()), ACC_LEN);
        for (int i = 0; i < rows_m.length() && i < int(ACC_LEN); i++)
            rowmap[i] = uint(rows_m[i]);
#endif
        subgroupBarrier();
    }

    for (uint bhq = gl_WorkGroupID.y; bhq < P.batch * P.heads_q; bhq += gl_NumWorkGroups.y)
    for (uint tile_it = gl_WorkGroupID.x; tile_it < P.q_tiles; tile_it += gl_NumWorkGroups.x) {
        uint tile = causal ? P.q_tiles - 1u - tile_it : tile_it;
        uint b = bhq / P.heads_q, h = bhq % P.heads_q, hk = h / P.group;
        uint i0 = tile * BR;
        uint q_base = (R.q_off + b * P.q_sb + h * P.q_sh) / 8u;
        uint k_base = (R.k_off + b * P.k_sb + hk * P.k_sh) / 8u;
        uint v_base = (R.v_off + b * P.v_sb + hk * P.v_sh) / 8u;

        /* Q rows of this workgroup -> registers, through kv_s, BC rows at a time. */
#ifdef EMULATE_COOPMAT
        FRAG_ARR(qf, DT);
#else
        A_TYPE qf[DT];
#endif
        for (uint c0 = 0u; c0 < BR; c0 += BC) {
            barrier();
            stage_rows(0u, q_base, q_pitch, i0 + c0, Nq, BC);
            barrier();
            if (sg * 16u >= c0 && sg * 16u < c0 + BC)
                for (uint d = 0u; d < DT; d++) {
                    LOAD_KV(qf[d], ((sg * 16u - c0) * PD + d * 16u) / 8u, PD / 8u, false)
                }
        }
        ACC_ARR(o, DT);
        for (uint d = 0u; d < DT; d++) {
            ACC_ZERO(o[d])
        }

        /* Softmax state of the rows this invocation reduces. */
        /* Softmax state of the row(s) this invocation reduces: row0 (and row0 + SG). */
        const uint row0 = SG >= 16 ? lane / LPR : lane, part = SG >= 16 ? lane % LPR : 0u;
        float m0 = NEG_INF, l0 = 0.0, m1 = NEG_INF, l1 = 0.0;
        int tile_end = key_end(int(min(i0 + BR, Nq) - 1u), causal);
        barrier(); /* everyone has its Q fragments: kv_s is free */
        if (tile_end > 0)
            stage_rows(1u, k_base, k_pitch, 0u, Nk, BC);

        uvec4 pref[PREF]; /* the next K or V tile, on its way from global memory */
        for (uint j0 = 0u; int(j0) < tile_end; j0 += BC) {
            barrier(); /* K tile j0 staged */
            if (PREFETCH != 0u)
                prefetch(pref, 2u, v_base, v_pitch, j0, Nk);

            /* S = Q K^T for this subgroup's 16 rows */
            for (uint n = 0u; n < KT; n++) {
                ACC_DECL(sacc);
                ACC_ZERO(sacc)
                for (uint d = 0u; d < DT; d++) {
#ifdef EMULATE_COOPMAT
                    FRAG_DECL(kb);
#else
                    B_TYPE kb;
#endif
                    LOAD_KV(kb, (n * 16u * PD + d * 16u) / 8u, PD / 8u, true)
                    MUL_ADD(qf[d], kb, sacc)
                }
                STORE_S(sacc, sg * 16u * PS + n * 16u, PS)
            }
            subgroupMemoryBarrierShared();
            subgroupBarrier();

            /* Online softmax, LPR invocations per row, KPL keys each (two rows per
             * invocation when the subgroup is smaller than 16). */
            softmax_row(sg, row0, part, i0, j0, m0, l0);
            if (RPL > 1u)
                softmax_row(sg, row0 + SG, part, i0, j0, m1, l1);
            barrier(); /* every subgroup is done with K; p_s and row_s are written */

            if (PREFETCH != 0u) /* V tile into kv_s */
                commit_prefetch(pref);
            else
                stage_rows(2u, v_base, v_pitch, j0, Nk, BC);
            /* O *= alpha, per element through the row map */
            float alpha_e[ACC_LEN];
            for (uint i = 0u; i < acc_len; i++)
                alpha_e[i] = row_s[sg * 16u + rowmap[i]];
            for (uint d = 0u; d < DT; d++) {
#ifdef EMULATE_COOPMAT
                for (uint i = 0u; i < EN; i++)
                    o[d][i] *= alpha_e[i];
#else
                for (int i = 0; i < min(o[d].length(), int(ACC_LEN)); i++)
                    o[d][i] *= alpha_e[i];
#endif
            }
            barrier(); /* V staged */
            if (PREFETCH != 0u && int(j0 + BC) < tile_end)
                prefetch(pref, 1u, k_base, k_pitch, j0 + BC, Nk);

            /* O += P V */
#ifdef EMULATE_COOPMAT
            FRAG_ARR(pf, KT);
#else
            A_TYPE pf[KT];
#endif
            for (uint kk = 0u; kk < KT; kk++) {
                LOAD_P(pf[kk], (sg * 16u * PP + kk * 16u) / 8u, PP / 8u)
            }
            for (uint d = 0u; d < DT; d++)
                for (uint kk = 0u; kk < KT; kk++) {
#ifdef EMULATE_COOPMAT
                    FRAG_DECL(vb);
#else
                    B_TYPE vb;
#endif
                    LOAD_KV(vb, (kk * 16u * PD + d * 16u) / 8u, PD / 8u, false)
                    MUL_ADD(pf[kk], vb, o[d])
                }
            barrier(); /* every subgroup is done with V */
            if (int(j0 + BC) < tile_end) { /* next K tile */
                if (PREFETCH != 0u)
                    commit_prefetch(pref);
                else
                    stage_rows(1u, k_base, k_pitch, j0 + BC, Nk, BC);
            }
        }

        /* Normalize, then write through shared memory (any dtype, partial tiles). */
        if (part == 0u) {
            row_s[sg * 16u + row0] = l0 > 0.0 ? 1.0 / l0 : 0.0;
            if (RPL > 1u)
                row_s[sg * 16u + row0 + SG] = l1 > 0.0 ? 1.0 / l1 : 0.0;
        }
        subgroupMemoryBarrierShared();
        subgroupBarrier();
        float inv_e[ACC_LEN];
        for (uint i = 0u; i < acc_len; i++)
            inv_e[i] = row_s[sg * 16u + rowmap[i]];
        for (uint d = 0u; d < DT; d++) {
#ifdef EMULATE_COOPMAT
            for (uint i = 0u; i < EN; i++)
                o[d][i] *= inv_e[i];
#else
            for (int i = 0; i < min(o[d].length(), int(ACC_LEN)); i++)
                o[d][i] *= inv_e[i];
#endif
        }
        uint o_base = R.o_off + b * P.o_sb + h * P.o_sh;
        for (uint d0 = 0u; d0 < DT; d0 += KT) {
            /* up to KT accumulators (BC columns) fit in the subgroup's score rows */
            for (uint d = d0; d < min(d0 + KT, DT); d++) {
                STORE_S(o[d], sg * 16u * PS + (d - d0) * 16u, PS)
            }
            subgroupMemoryBarrierShared();
            subgroupBarrier();
            uint cols = min(KT, DT - d0) * 16u;
            for (uint e = lane; e < 16u * cols; e += SG) {
                uint r = e / cols, c = e % cols, i = i0 + sg * 16u + r;
                if (i < Nq)
                    store_o(o_base + i * P.o_sn + d0 * 16u + c, s_s[sg * 16u * PS + r * PS + c]);
            }
            subgroupBarrier();
        }
        if (P.return_lse != 0u && part == 0u) {
            uint i = i0 + sg * 16u + row0;
            if (i < Nq)
                lse_out[R.lse_off + bhq * Nq + i] = l0 > 0.0 ? m0 * LN2 + log(l0) : NEG_INF;
            if (RPL > 1u && i + SG < Nq)
                lse_out[R.lse_off + bhq * Nq + i + SG] = l1 > 0.0 ? m1 * LN2 + log(l1) : NEG_INF;
        }
    }
}
