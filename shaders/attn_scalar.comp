#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * Flash attention for any Vulkan 1.1 device: scalar fp32 arithmetic on
 * shared-memory tiles, no subgroup operations, so it runs the same on
 * lavapipe (subgroup 8), NVIDIA (32) and AMD (64).
 *
 * A workgroup of 64 invocations owns BR query rows of one (batch, q head);
 * TPR = 64 / BR invocations share a row. For each tile of BC keys:
 *   S = Q K^T            each invocation: BC / TPR scores of its row
 *   online softmax       in the log2 domain (as backends/cpu); every
 *                        invocation of a row reduces the whole row itself,
 *                        so m and l agree bit for bit without a broadcast
 *   O = alpha O + P V    each invocation: D / TPR channels of its row
 * QUANT = 1 (INT8_FP16) reads the quantized workspace: INT8 Q and K codes
 * (integer dot products, exact), fp32 scales, P rounded to fp16, fp16 V.
 *
 * SPARSE (sparse plans; 0: dense, the loop above unchanged): 1 structured
 * masks only, 2 a block layout as well (sparse.glsl). A tile of BR <= 16 rows
 * lies in one query block (blocks are multiples of 16, tiles of BR | 16
 * rows), so its layout row is the list of key blocks it may see: the tile
 * walks it (or, without a layout, the union of its rows' window and sinks)
 * and visits only the key steps that hold a key some row sees, masking per
 * element only in steps the masks cut. PV = 1 (pv_threshold): once a step's
 * scores and running maxima are known, the tile (16 rows; 8 when BR is 8)
 * skips loading V and the P.V product when every P < 2^-lambda; l counts them.
 */
#ifdef USE_INTDOT
#extension GL_EXT_integer_dot_product : require
#endif
#include "common.glsl"
#include "sparse.glsl"

layout(local_size_x = 64) in;

layout(constant_id = 0) const uint D = 128;
layout(constant_id = 3) const uint BR = 16;
layout(constant_id = 4) const uint BC = 16;
layout(constant_id = 5) const uint QUANT = 0;
layout(constant_id = 6) const uint CAUSAL = 0;
layout(constant_id = 9) const uint SPARSE = 0;
layout(constant_id = 10) const uint PV = 0;

const uint WG = 64;
const uint MAX_PER_THREAD = 64; /* D / TPR <= 64: D <= 256 with TPR >= 4 */

shared uint qs[BR * D];  /* exact: fp32 bits; quant: INT8 codes, 4 per word */
shared uint ks[BC * D];  /* likewise for K */
shared float vs[BC * D];
shared float ss[BR * BC]; /* scores, log2 domain */
shared float ps[BR * BC]; /* probabilities fed to P.V */
shared float kscale[BC];
shared uint sp_lo[BR], sp_hi[BR], sp_se[BR]; /* SPARSE: each row's keys (sp_row_keys) */
shared uint pv_big;                           /* PV: some row of the tile has P >= 2^-lambda in this step */

int dot4(uint a, uint b)
{
#ifdef USE_INTDOT
    return dotPacked4x8EXT(int(a), int(b));
#else
    ivec4 x = ivec4(bitfieldExtract(int(a), 0, 8), bitfieldExtract(int(a), 8, 8), bitfieldExtract(int(a), 16, 8),
                    bitfieldExtract(int(a), 24, 8));
    ivec4 y = ivec4(bitfieldExtract(int(b), 0, 8), bitfieldExtract(int(b), 8, 8), bitfieldExtract(int(b), 16, 8),
                    bitfieldExtract(int(b), 24, 8));
    return x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
#endif
}

uint group_of(uint t, uint block, uint inter) { return (t / block) * inter + (t % block) % inter; }

/* INT8_FP16: the fp16 V rows of keys [j0, j0 + BC) of head bhk into vs. */
void load_v_tile(uint j0, uint bhk)
{
    const uint D2 = D / 2u, Nk = P.seq_k;
    for (uint x = gl_LocalInvocationID.x; x < BC * D2; x += WG) {
        uint t = j0 + (2u * x) / D;
        vec2 v2 = t < Nk ? unpackHalf2x16(ws_u32[((R.ws_off + P.ws_v_q) >> 2) + (bhk * Nk * D) / 2u +
                                                 ((j0 * D) / 2u) + x])
                         : vec2(0.0);
        vs[2u * x] = v2.x;
        vs[2u * x + 1u] = v2.y;
    }
}

float round_f16(float x) { return unpackHalf2x16(f32_to_f16_bits(x)).x; }

void main()
{
    if (inputs_nonfinite())
        return; /* outputs stay untouched; the host reports QATTN_ERR_NONFINITE_INPUT */
    const uint TPR = WG / BR;
    const uint KPT = BC / TPR; /* keys per invocation */
    const uint CPT = D / TPR;  /* output channels per invocation */
    const uint DW = D / 4u;    /* words per INT8 row */
    const bool quant = QUANT != 0u;
    const uint tid = gl_LocalInvocationID.x, r = tid / TPR, sub = tid % TPR;
    const uint Nq = P.seq_q, Nk = P.seq_k;
    const uint ws = R.ws_off >> 2;

    for (uint bhq = gl_WorkGroupID.y; bhq < P.batch * P.heads_q; bhq += gl_NumWorkGroups.y)
    for (uint tile_it = gl_WorkGroupID.x; tile_it < P.q_tiles; tile_it += gl_NumWorkGroups.x) {
        /* Causal: the last tiles see the most keys; start them first. */
        uint tile = CAUSAL != 0u ? P.q_tiles - 1u - tile_it : tile_it;
        uint b = bhq / P.heads_q, h = bhq % P.heads_q;
        uint bhk = b * P.heads_kv + h / P.group;
        uint i0 = tile * BR, i = i0 + r;
        bool row_valid = i < Nq;

        barrier(); /* the previous tile's readers of qs are done */
        if (quant) {
            for (uint e = tid; e < BR * DW; e += WG) {
                uint row = e / DW, ii = i0 + row;
                qs[e] = ii < Nq ? ws_u32[((R.ws_off + P.ws_q_i8) >> 2) + ((bhq * Nq + ii) * D) / 4u + e % DW] : 0u;
            }
        } else {
            uint qbase = R.q_off + b * P.q_sb + h * P.q_sh;
            for (uint e = tid; e < BR * D; e += WG) {
                uint row = e / D, ii = i0 + row;
                qs[e] = floatBitsToUint(ii < Nq ? load_q(qbase + ii * P.q_sn + e % D) : 0.0);
            }
        }
        float qscale = 0.0;
        if (quant && row_valid)
            qscale = ws_f32[((R.ws_off + P.ws_q_scale) >> 2) + bhq * P.q_groups +
                            group_of(i, P.q_block, P.q_interleave)] * P.qk_scale_log2;

        float o[MAX_PER_THREAD];
        for (uint c = 0u; c < CPT; c++)
            o[c] = 0.0;
        float m = NEG_INF, l = 0.0;
        int my_end = key_end(int(min(i, Nq - 1u)), CAUSAL != 0u);
        int tile_end = key_end(int(min(i0 + BR, Nq) - 1u), CAUSAL != 0u);

        /* SPARSE: the rows' keys, their union ([0, u_s) and [u_l, u_h)), the layout row. */
        uint u_s = 0u, u_l = 0xffffffffu, u_h = 0u, ent = 0u, ent_end = 1u, next_j = 0u;
        uint my_lo = 0u, my_hi = 0u, my_se = 0u;
        if (SPARSE != 0u) {
            if (tid < BR) {
                uint lo = 0u, hi = 0u, se = 0u;
                if (i0 + tid < Nq)
                    sp_row_keys(int(i0 + tid), CAUSAL != 0u, lo, hi, se);
                sp_lo[tid] = lo;
                sp_hi[tid] = hi;
                sp_se[tid] = se;
            }
            barrier();
            for (uint rr = 0u; rr < BR; rr++) {
                u_s = max(u_s, sp_se[rr]);
                if (sp_hi[rr] > sp_lo[rr]) {
                    u_l = min(u_l, sp_lo[rr]);
                    u_h = max(u_h, sp_hi[rr]);
                }
            }
            my_lo = sp_lo[r];
            my_hi = sp_hi[r];
            my_se = sp_se[r];
            if (SPARSE == 2u)
                sp_layout_row((b * P.heads_kv + h / P.group) * P.sp_q_blocks + i0 / P.sp_q_block, ent, ent_end);
        }

        for (uint it = 0u;; it++) {
            uint j0;
            bool full = true; /* SPARSE: every row of the tile sees every key of the step */
            uint cells = 3u;  /* SPARSE 2: bit c: the 16 keys from (j0 & ~15) + 16 c are in a kept block */
            if (SPARSE == 0u) {
                j0 = it * BC;
                if (int(j0) >= tile_end)
                    break;
            } else {
                /* The next step (from next_j) holding a key of the union (and of a listed block). */
                uint f = 0xffffffffu;
                if (SPARSE == 1u) {
                    f = sp_first_visible(next_j, Nk, u_s, u_l, u_h);
                    if (f >= Nk)
                        break;
                } else {
                    for (; ent < ent_end; ent++) {
                        const uint kb = sp_entry(ent), blo = kb * P.sp_k_block, bhi = min(Nk, blo + P.sp_k_block);
                        f = sp_first_visible(max(blo, next_j), bhi, u_s, u_l, u_h);
                        if (f < bhi)
                            break;
                    }
                    if (ent >= ent_end)
                        break;
                }
                j0 = f / BC * BC;
                next_j = j0 + BC;
                if (SPARSE == 2u) {
                    /* A step (<= 32 keys) touches at most 2 blocks: entries ent, ent + 1 (blocks of
                     * earlier entries hold no visible key of it, else the walk would have stopped there). */
                    const uint base = j0 & ~15u, kb0 = sp_entry(ent);
                    const uint kb1 = ent + 1u < ent_end ? sp_entry(ent + 1u) : 0xffffffffu;
                    cells = 0u;
                    for (uint c = 0u; c < 2u; c++) {
                        const uint kb = (base + 16u * c) / P.sp_k_block;
                        if (kb == kb0 || kb == kb1)
                            cells |= 1u << c;
                    }
                }
                const uint jn = j0 + BC, need = ((jn - 1u - (j0 & ~15u)) >> 4) == 1u ? 3u : 1u;
                full = jn <= Nk && (cells & need) == need;
                for (uint rr = 0u; rr < BR && full; rr++)
                    if (i0 + rr < Nq)
                        full = (j0 >= sp_lo[rr] && jn <= sp_hi[rr]) || jn <= sp_se[rr];
            }
            barrier(); /* ks, vs, ps of the previous key tile are consumed */
            if (PV != 0u && tid == 0u)
                pv_big = 0u;
            if (quant) {
                for (uint e = tid; e < BC * DW; e += WG) {
                    uint t = j0 + e / DW;
                    ks[e] = t < Nk ? ws_u32[((R.ws_off + P.ws_k_i8) >> 2) + ((bhk * Nk + t) * D) / 4u + e % DW] : 0u;
                }
                for (uint j = tid; j < BC; j += WG) {
                    uint t = j0 + j;
                    kscale[j] = t < Nk ? ws_f32[((R.ws_off + P.ws_k_scale) >> 2) + bhk * P.k_groups +
                                                group_of(t, P.k_block, P.k_interleave)] : 0.0;
                }
                if (PV == 0u)
                    load_v_tile(j0, bhk);
            } else {
                uint kbase = R.k_off + b * P.k_sb + (h / P.group) * P.k_sh;
                uint vbase = R.v_off + b * P.v_sb + (h / P.group) * P.v_sh;
                for (uint x = tid; x < BC * D; x += WG) {
                    uint t = j0 + x / D, d = x % D;
                    ks[x] = floatBitsToUint(t < Nk ? load_k(kbase + t * P.k_sn + d) : 0.0);
                    if (PV == 0u)
                        vs[x] = t < Nk ? load_v(vbase + t * P.v_sn + d) : 0.0;
                }
            }
            barrier();

            for (uint kk = 0u; kk < KPT; kk++) {
                uint j = sub + TPR * kk;
                float s;
                if (quant) {
                    int acc = 0;
                    for (uint w = 0u; w < DW; w++)
                        acc += dot4(qs[r * DW + w], ks[j * DW + w]);
                    s = float(acc) * qscale * kscale[j];
                } else {
                    float acc = 0.0;
                    for (uint d = 0u; d < D; d++)
                        acc += uintBitsToFloat(qs[r * D + d]) * uintBitsToFloat(ks[j * D + d]);
                    s = acc * P.qk_scale_log2;
                }
                if (SPARSE == 0u) {
                    if (int(j0 + j) >= my_end)
                        s = NEG_INF;
                } else if (!full) {
                    const uint key = j0 + j;
                    bool vis = key < Nk && (key < my_se || (key >= my_lo && key < my_hi));
                    if (SPARSE == 2u)
                        vis = vis && ((cells >> ((key - (j0 & ~15u)) >> 4)) & 1u) != 0u;
                    if (!vis)
                        s = NEG_INF;
                }
                ss[r * BC + j] = s;
            }
            barrier();

            float tile_max = NEG_INF;
            for (uint j = 0u; j < BC; j++)
                tile_max = max(tile_max, ss[r * BC + j]);
            float m_new = max(m, tile_max);
            float alpha = 1.0;
            if (m_new != NEG_INF) {
                alpha = m == NEG_INF ? 0.0 : exp2(m - m_new);
                float row_sum = 0.0;
                for (uint j = 0u; j < BC; j++)
                    row_sum += exp2(ss[r * BC + j] - m_new);
                l = l * alpha + row_sum;
                m = m_new;
            }
            for (uint kk = 0u; kk < KPT; kk++) {
                uint j = sub + TPR * kk;
                float p = m_new == NEG_INF ? 0.0 : exp2(ss[r * BC + j] - m_new);
                ps[r * BC + j] = quant ? round_f16(p) : p;
            }
            bool skip_pv = false;
            if (PV != 0u) {
                /* The step's largest P of this row: below 2^-lambda for every row, the P.V is skipped. */
                if (sub == 0u && row_valid && m_new != NEG_INF && !(exp2(tile_max - m_new) < P.pv_limit))
                    atomicOr(pv_big, 1u);
                barrier();
                skip_pv = pv_big == 0u;
                if (!skip_pv) {
                    if (quant) {
                        load_v_tile(j0, bhk);
                    } else {
                        uint vbase = R.v_off + b * P.v_sb + (h / P.group) * P.v_sh;
                        for (uint x = tid; x < BC * D; x += WG) {
                            uint t = j0 + x / D;
                            vs[x] = t < Nk ? load_v(vbase + t * P.v_sn + x % D) : 0.0;
                        }
                    }
                }
            }
            barrier();

            for (uint c = 0u; c < CPT; c++) {
                uint d = sub + TPR * c;
                float acc = o[c] * alpha;
                if (!skip_pv)
                    for (uint j = 0u; j < BC; j++)
                        acc += ps[r * BC + j] * vs[j * D + d];
                o[c] = acc;
            }
        }

        if (row_valid) {
            float inv = l > 0.0 ? 1.0 / l : 0.0;
            uint obase = R.o_off + b * P.o_sb + h * P.o_sh + i * P.o_sn;
            for (uint c = 0u; c < CPT; c++)
                store_o(obase + sub + TPR * c, o[c] * inv);
            if (P.return_lse != 0u && sub == 0u) {
                float lse = NEG_INF;
                if (l > 0.0) {
                    lse = m * LN2 + log(l);
                    if (quant && P.smooth_k != 0u)
                        lse += ws_f32[((R.ws_off + P.ws_q_kmean) >> 2) + bhq * Nq + i];
                }
                lse_out[R.lse_off + bhq * Nq + i] = lse;
            }
        }
    }
}
