#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * Paged attention for any Vulkan 1.1 device (scalar fp32 arithmetic, no
 * subgroup operations): decode and (chunked) prefill over a paged KV cache.
 *
 * A work group of 128 takes one work item (sequence, KV head, query tile,
 * key split). Its BR rows are the GQA group's query heads times the queries
 * (row = query * group + member), so every K/V row read from memory serves
 * the whole group. For each tile of BC keys of the item's key range:
 *   load   the keys' cache addresses (one page lookup per key), then the K
 *          and V rows as stored: 16-byte loads, consecutive invocations on
 *          consecutive chunks of a row, all of an invocation's loads issued
 *          before the first is stored to shared memory;
 *   S      invocation (key j, part) reads its 1/S_SPLIT of K row j 16 bytes at
 *          a time, decodes it once and dots it with every row's query (fp32;
 *          the K scale is folded into the score afterwards);
 *   softmax online, in the log2 domain: each row's invocation takes the
 *          tile's max, P and sum in one pass (fp32 running max and sum);
 *   P V    invocation (word w, row block, key partition) decodes V word w of
 *          each of its keys once and accumulates it into its RPT rows, whose
 *          P it reads four at a time (the V row scale folded into P; a
 *          per-head V scale is applied at the end).
 * Key partitions are summed at the end (they share the running max). Rows
 * that see no key end with O = 0 and LSE = -inf. With several splits the
 * item writes its normalized partial O and LSE to the workspace and
 * paged_merge combines them. With ARG_SELECT an item reads only its (sequence,
 * KV head)'s selected pages (paged_prune.comp TOPK) through that indirection,
 * as if they were the sequence's cache. The host (vulkan_paged.c) derives every spec
 * constant below from BR, BC and the page format.
 */
#include "paged_common.glsl"

layout(local_size_x = 128) in;

layout(constant_id = 0) const uint D = 128;
layout(constant_id = 2) const uint FMT = FMT_F16;
layout(constant_id = 3) const uint BR = 4;        /* rows per item (a power of two, <= 32) */
layout(constant_id = 4) const uint BC = 32;       /* keys per tile (16, 32 or 64) */
layout(constant_id = 5) const uint RW = 64;       /* 32-bit words per cached row */
layout(constant_id = 6) const uint RWP = 64;      /* RW rounded up to a power of two */
layout(constant_id = 7) const uint RPT = 4;       /* P V rows per invocation */
layout(constant_id = 8) const uint KP = 2;        /* P V key partitions */
layout(constant_id = 9) const uint CPW = 2;       /* values per word: 2 (16-bit pages) or 4 (8-bit) */
layout(constant_id = 10) const uint V_WORDS = 2048; /* the V tile; at the end, the key partitions' sums */
layout(constant_id = 11) const uint S_SPLIT = 4;  /* 128 / BC: invocations sharing one key in S */
layout(constant_id = 12) const uint LPT = 4;      /* 16-byte loads per invocation per tile, of K and of V */

layout(std430, set = 0, binding = 1) readonly buffer KC { uvec4 k_cache[]; };
layout(std430, set = 0, binding = 2) readonly buffer VC { uvec4 v_cache[]; };
layout(std430, set = 0, binding = 3) readonly buffer KS { float k_scale[]; };
layout(std430, set = 0, binding = 4) readonly buffer VS { float v_scale[]; };
layout(std430, set = 0, binding = 5) writeonly buffer OF32 { float o_f32[]; };
layout(std430, set = 0, binding = 5) writeonly buffer OU16 { uint16_t o_u16[]; };
layout(std430, set = 0, binding = 6) writeonly buffer LSE { float lse_out[]; };

const uint WG = 128u;
const uint W4 = RW / 4u;        /* 16-byte chunks per row */
const uint K4 = W4 + 1u;        /* K tile row stride in chunks: 8 consecutive keys hit 8 distinct bank groups */
const uint D4 = D / 4u;
const uint U_PART = W4 / S_SPLIT; /* chunks of a K row per S invocation */
const uint RG = BR / RPT;       /* P V row blocks */
const uint BR4 = (BR + 3u) / 4u; /* rows of one key's scores, in vec4 (rows past BR are masked) */
const uint NO_ROW = 0xffffffffu;
const uint MAX_BR = 32u, MAX_O = 32u, MAX_LPT = 8u;
#define NEG_INF uintBitsToFloat(0xff800000u)
const float LN2 = 0.6931471805599453;

shared vec4 qs[BR * D4];          /* the item's queries, fp32, times sm_scale * log2(e) */
shared uvec4 ktile[BC * K4];      /* K rows as stored */
shared uint vtile[V_WORDS];       /* V rows [BC][RW] as stored */
shared vec4 sp[S_SPLIT * BC * BR4]; /* partial scores [part][key][row]; then scores; then P */
shared uint rowbase[BC];          /* word index of each key's row in the cache; NO_ROW past the range */
shared float kscl[BC], vscl[BC];  /* per-row scales (FMT_I8_ROW) */
shared float m_s[BR], l_s[BR], alpha_s[BR];

/* True when a byte of x (bytes < 0x80) is zero. */
bool has_zero_byte(uint x) { return ((x - 0x01010101u) & ~x & 0x80808080u) != 0u; }

/* Four E4M3 codes. Normal codes go through fp16 with the exponent rebased by
 * +8 (fp16 normals, exact on any driver, no rescale); zero, subnormal and NaN
 * codes (rare) take the per-value path. */
vec4 decode_fp8(uint w)
{
    uint x = w & 0x7f7f7f7fu;
    if (has_zero_byte(x & 0x78787878u) || has_zero_byte(x ^ 0x7f7f7f7fu))
        return vec4(e4m3_to_f32(w & 0xffu), e4m3_to_f32((w >> 8) & 0xffu), e4m3_to_f32((w >> 16) & 0xffu),
                    e4m3_to_f32(w >> 24));
    uint s = w & 0x80808080u;
    uint h02 = (((x & 0x007f007fu) << 7) + 0x20002000u) | ((s & 0x00800080u) << 8);
    uint h13 = (((x & 0x7f007f00u) >> 1) + 0x20002000u) | (s & 0x80008000u);
    vec2 a = unpackHalf2x16(h02), b = unpackHalf2x16(h13);
    return vec4(a.x, b.x, a.y, b.y);
}

/* Four INT8 codes: 2^23 + 128 + code is exact in fp32. */
vec4 decode_i8(uint w)
{
    uint x = w ^ 0x80808080u;
    return vec4(uintBitsToFloat(0x4b000000u | (x & 0xffu)), uintBitsToFloat(0x4b000000u | ((x >> 8) & 0xffu)),
                uintBitsToFloat(0x4b000000u | ((x >> 16) & 0xffu)), uintBitsToFloat(0x4b000000u | (x >> 24))) -
           8388736.0;
}

vec2 decode16(uint w)
{
    if (FMT == FMT_F16)
        return unpackHalf2x16(w);
    return vec2(uintBitsToFloat(w << 16), uintBitsToFloat(w & 0xffff0000u));
}

/* The CPW values of one stored word (zeros past CPW). */
vec4 decode(uint w)
{
    if (CPW == 2u)
        return vec4(decode16(w), 0.0, 0.0);
    return FMT == FMT_FP8 ? decode_fp8(w) : decode_i8(w);
}

void store_out(uint i, float v)
{
    if (Q_DTYPE == DT_F32) o_f32[i] = v;
    else if (Q_DTYPE == DT_F16) o_u16[i] = uint16_t(f32_to_f16_bits(v));
    else o_u16[i] = uint16_t(f32_to_bf16_bits(v));
}

/* Writes nv values of item row pr (channels d0..) and, from channel 0, its LSE:
 * to O and the LSE, or to the split's partials in the workspace. */
void emit(Seq seq, uint hk, uint split, uint pr, float m, float L, uint d0, uint nv, vec4 acc, float v_head)
{
    const uint G = A.group, Hq = A.heads_kv * A.group;
    float mul = L > 0.0 ? v_head / L : 0.0;
    uint i = pr / G, head = hk * G + pr % G, row = uint(seq.q0) + i;
    float lse = L > 0.0 ? m * LN2 + log(L) : NEG_INF;
    if (A.splits > 1u) {
        uint at = (split * A.total_q + row) * Hq + head;
        for (uint c = 0u; c < nv; c++)
            ws_f32[A.ws_off + A.ws_part_o + at * D + d0 + c] = acc[c] * mul;
        if (d0 == 0u)
            ws_f32[A.ws_off + A.ws_part_lse + at] = lse;
    } else {
        uint ob = A.o_off + row * A.o_s0 + head * A.o_s1 + d0;
        for (uint c = 0u; c < nv; c++)
            store_out(ob + c, acc[c] * mul);
        if (d0 == 0u && (A.flags & ARG_LSE) != 0u)
            lse_out[A.lse_off + row * Hq + head] = lse;
    }
}

void main()
{
    if (status_set())
        return; /* bad tables or a non-finite Q: write nothing (the host reports it) */
    const uint tid = gl_LocalInvocationID.x;
    const uint G = A.group, Hq = A.heads_kv * A.group, P = A.page_size;
    const bool causal = (A.flags & ARG_CAUSAL) != 0u, hnd = (A.flags & ARG_HND) != 0u;
    const bool head_scales = FMT == FMT_FP8 || FMT == FMT_I8;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;

    /* S: this invocation's key and its chunks [s_u0, s_u0 + U_PART) of the row. */
    const uint s_key = tid % BC, s_part = tid / BC, s_u0 = s_part * U_PART;
    /* P V: this invocation's word, rows pv_rg * RPT + i (i < RPT) and keys pv_kp + k * KP. */
    const uint pv_w = tid % RWP, pv_rg = (tid / RWP) % RG, pv_kp = tid / RWP / RG;
    const bool pv_on = pv_w < RW;

    for (uint item = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; item < A.items; item += groups) {
        const uint split = item % A.splits;
        uint rest = item / A.splits;
        const uint qt = rest % A.q_tiles;
        rest /= A.q_tiles;
        const uint hk = rest % A.heads_kv, b = rest / A.heads_kv;
        const Seq seq = sequence(b);
        const int rows_total = seq.q_len * int(G), row_base = int(qt * BR);
        if (row_base >= rows_total)
            continue; /* uniform: every invocation sees the same item */
        const uint rows = uint(min(int(BR), rows_total - row_base));
        /* A selection (ARG_SELECT): the item reads its row's selected pages as if they were the whole
         * cache, kv_len' = (count - 1) * P + the last page's tokens (the last page is always selected). */
        const bool selected = (A.flags & ARG_SELECT) != 0u && seq.kv_len > 0;
        const uint sel_row = b * A.heads_kv + hk;
        const int n_pages = (seq.kv_len + int(P) - 1) / int(P);
        int kv_len = seq.kv_len;
        if (selected) {
            int count = clamp(int(ws_u32[A.ws_off + A.ws_sel_counts + sel_row]), 1, n_pages);
            kv_len = (count - 1) * int(P) + (seq.kv_len - (n_pages - 1) * int(P));
        }
        const int span = int(A.pages_per_split * P);
        const int kb = min(int(split) * span, kv_len);
        const int ke = min(int(split + 1u) * span, kv_len);
        /* The keys past the tile's last row's causal end are seen by no row. */
        int ke_tile = ke;
        if (causal)
            ke_tile = min(ke, max(kb, (row_base + int(rows) - 1) / int(G) + 1 + kv_len - seq.q_len));

        barrier(); /* the previous item's readers of shared memory are done */
        for (uint e = tid; e < BR * D4; e += WG) {
            uint r = e / D4, g = e % D4;
            vec4 x = vec4(0.0);
            if (r < rows) {
                uint pr = uint(row_base) + r, i = pr / G, head = hk * G + pr % G;
                uint at = A.q_off + (uint(seq.q0) + i) * A.q_s0 + head * A.q_s1 + 4u * g;
                x = vec4(load_q(at), load_q(at + 1u), load_q(at + 2u), load_q(at + 3u)) * A.qk_scale_log2;
            }
            qs[e] = x;
        }
        if (tid < BR) {
            m_s[tid] = NEG_INF;
            l_s[tid] = 0.0;
        }
        const float k_head = head_scales ? k_scale[hk] : 1.0;

        float o[MAX_O];
        for (uint c = 0u; c < RPT * CPW; c++)
            o[c] = 0.0;

        for (int j0 = kb; j0 < ke_tile; j0 += int(BC)) {
            barrier(); /* the previous tile's readers are done */
            if (tid < BC) {
                int t = j0 + int(tid);
                uint base = NO_ROW;
                if (FMT == FMT_I8_ROW) { /* keys past the range: P = 0 times a finite scale */
                    kscl[tid] = 0.0;
                    vscl[tid] = 0.0;
                }
                if (t < ke_tile) {
                    uint page_index = uint(t) / P, off = uint(t) - page_index * P;
                    if (selected) /* clamped: a selection only names the sequence's pages */
                        page_index = uint(clamp(int(ws_u32[A.ws_off + A.ws_sel_pages + sel_row * A.max_pages + page_index]),
                                                0, n_pages - 1));
                    uint page = page_at(seq, page_index);
                    uint within = hnd ? hk * P + off : off * A.heads_kv + hk;
                    base = ((page * P * A.heads_kv + within) * D) / CPW;
                    if (FMT == FMT_I8_ROW) {
                        uint at = (page * P + off) * A.heads_kv + hk;
                        kscl[tid] = k_scale[at];
                        vscl[tid] = v_scale[at];
                    }
                }
                rowbase[tid] = base;
            }
            barrier();
            {
                /* Rows past the range are zero (never garbage): their scores are masked and P is 0. */
                uvec4 kx[MAX_LPT], vx[MAX_LPT];
                for (uint c = 0u; c < LPT; c++) {
                    uint e = tid + c * WG;
                    kx[c] = uvec4(0u);
                    vx[c] = uvec4(0u);
                    if (e < BC * W4) {
                        uint base = rowbase[e / W4];
                        if (base != NO_ROW) {
                            kx[c] = k_cache[base / 4u + e % W4];
                            vx[c] = v_cache[base / 4u + e % W4];
                        }
                    }
                }
                for (uint c = 0u; c < LPT; c++) {
                    uint e = tid + c * WG;
                    if (e < BC * W4) {
                        uint j = e / W4, c4 = e % W4, vd = j * RW + 4u * c4;
                        ktile[j * K4 + c4] = kx[c];
                        vtile[vd] = vx[c].x;
                        vtile[vd + 1u] = vx[c].y;
                        vtile[vd + 2u] = vx[c].z;
                        vtile[vd + 3u] = vx[c].w;
                    }
                }
            }
            barrier();

            /* S: partial dots of key s_key with every row's query. */
            {
                float acc[MAX_BR];
                for (uint r = 0u; r < BR; r++)
                    acc[r] = 0.0;
                for (uint u = s_u0; u < s_u0 + U_PART; u++) {
                    uvec4 kw = ktile[s_key * K4 + u];
                    if (CPW == 2u) { /* 8 dims: query groups 2u, 2u + 1 */
                        vec4 k0 = vec4(decode16(kw.x), decode16(kw.y)), k1 = vec4(decode16(kw.z), decode16(kw.w));
                        for (uint r = 0u; r < BR; r++)
                            acc[r] += dot(qs[r * D4 + 2u * u], k0) + dot(qs[r * D4 + 2u * u + 1u], k1);
                    } else { /* 16 dims: query groups 4u .. 4u + 3 */
                        vec4 k0 = decode(kw.x), k1 = decode(kw.y), k2 = decode(kw.z), k3 = decode(kw.w);
                        for (uint r = 0u; r < BR; r++) {
                            uint g = r * D4 + 4u * u;
                            acc[r] += dot(qs[g], k0) + dot(qs[g + 1u], k1) + dot(qs[g + 2u], k2) + dot(qs[g + 3u], k3);
                        }
                    }
                }
                for (uint r = 0u; r < BR; r++)
                    sp[(s_part * BC + s_key) * BR4 + r / 4u][r % 4u] = acc[r];
            }
            barrier();
            /* Scores: the parts summed, the K scale folded in, causal and range masks. */
            for (uint u = tid; u < BC * BR4; u += WG) {
                uint j = u / BR4, r0 = 4u * (u % BR4);
                vec4 s4 = vec4(0.0);
                for (uint p = 0u; p < S_SPLIT; p++)
                    s4 += sp[p * BC * BR4 + u];
                s4 *= FMT == FMT_I8_ROW ? kscl[j] : k_head;
                for (uint c = 0u; c < 4u; c++) {
                    int key_end = ke_tile;
                    if (causal)
                        key_end = min(key_end, (row_base + int(r0 + c)) / int(G) + 1 + kv_len - seq.q_len);
                    if (r0 + c >= rows || j0 + int(j) >= key_end)
                        s4[c] = NEG_INF;
                }
                sp[u] = s4;
            }
            barrier();
            /* Each row's invocation: the tile's max, the rescale of the row's state, P and its sum. */
            if (tid < BR) {
                const uint r = tid, at = r / 4u, c = r % 4u;
                float mt = NEG_INF;
                for (uint j = 0u; j < BC; j++)
                    mt = max(mt, sp[j * BR4 + at][c]);
                float mo = m_s[r], mn = max(mo, mt);
                float alpha = mn == NEG_INF ? 1.0 : (mo == NEG_INF ? 0.0 : exp2(mo - mn));
                float sum = 0.0;
                for (uint j = 0u; j < BC; j++) {
                    float x = sp[j * BR4 + at][c];
                    float p = x == NEG_INF ? 0.0 : exp2(x - mn);
                    sp[j * BR4 + at][c] = p;
                    sum += p;
                }
                alpha_s[r] = alpha;
                m_s[r] = mn;
                l_s[r] = l_s[r] * alpha + sum;
            }
            barrier();

            /* O = alpha O + P V */
            if (pv_on) {
                for (uint i = 0u; i < RPT; i++) {
                    float a = alpha_s[pv_rg * RPT + i];
                    for (uint c = 0u; c < CPW; c++)
                        o[i * CPW + c] *= a;
                }
                for (uint j = pv_kp; j < BC; j += KP) {
                    vec4 vf = decode(vtile[j * RW + pv_w]);
                    float vmul = FMT == FMT_I8_ROW ? vscl[j] : 1.0;
                    for (uint i4 = 0u; i4 < (RPT + 3u) / 4u; i4++) {
                        /* P of rows pv_rg * RPT + 4 i4 .. (blocks of fewer than 4 rows share one vec4) */
                        uint row0 = pv_rg * RPT + 4u * i4;
                        vec4 p4 = sp[j * BR4 + row0 / 4u] * vmul;
                        for (uint c4 = 0u; c4 < min(4u, RPT); c4++) {
                            uint i = 4u * i4 + c4;
                            float p = RPT >= 4u ? p4[c4] : p4[row0 % 4u + c4];
                            o[i * CPW] += p * vf.x;
                            o[i * CPW + 1u] += p * vf.y;
                            if (CPW == 4u) {
                                o[i * CPW + 2u] += p * vf.z;
                                o[i * CPW + 3u] += p * vf.w;
                            }
                        }
                    }
                }
            }
        }

        /* Normalize and write the item's rows: to O (or the split's partials). */
        const float v_head = head_scales ? v_scale[hk] : 1.0;
        barrier(); /* the tiles are consumed; m_s, l_s are final (also when the item had no key tile) */
        if (KP > 1u) {
            /* Key partitions of a row share its running max: their sums simply add. */
            if (pv_on)
                for (uint i = 0u; i < RPT; i++)
                    for (uint c = 0u; c < CPW; c++)
                        vtile[(pv_kp * BR + pv_rg * RPT + i) * D + pv_w * CPW + c] = floatBitsToUint(o[i * CPW + c]);
            barrier();
            for (uint e = tid; e < rows * D; e += WG) {
                uint r = e / D, d = e % D;
                float ov = 0.0;
                for (uint kp = 0u; kp < KP; kp++)
                    ov += uintBitsToFloat(vtile[(kp * BR + r) * D + d]);
                emit(seq, hk, split, uint(row_base) + r, m_s[r], l_s[r], d, 1u, vec4(ov, 0.0, 0.0, 0.0), v_head);
            }
        } else if (pv_on) {
            for (uint i = 0u; i < RPT; i++) {
                uint r = pv_rg * RPT + i;
                if (r < rows)
                    emit(seq, hk, split, uint(row_base) + r, m_s[r], l_s[r], pv_w * CPW, CPW,
                         vec4(o[i * CPW], o[i * CPW + 1u], CPW == 4u ? o[i * CPW + 2u] : 0.0,
                              CPW == 4u ? o[i * CPW + 3u] : 0.0),
                         v_head);
            }
        }
    }
}
