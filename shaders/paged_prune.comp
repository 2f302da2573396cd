#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_shader_16bit_storage : require
/*
 * Decode-time pruning on the paged KV cache: what src/prune.c defines (the
 * CPU backend's path and the reference), as four kernels from this source
 * (backends/vulkan/vulkan_paged.c records them; no host round trip between
 * the dispatches of one call):
 *
 * META  (-DMETA, paged_meta): after an append's writes (a barrier between),
 *       each page the append wrote is recomputed for every KV head from all
 *       page_size slots (qattn_kv_meta_update_host): NaN-skipping min/max per
 *       channel of the keys; f16/bf16/FP8/INT8-per-head store the min/max
 *       element's own code, INT8 per row codes against the page's largest row
 *       scale, rounded outward, and that scale. Work group per token; a token
 *       whose previous token wrote the same page skips it. Nothing when the
 *       append's check flagged a problem.
 * SCORE (-DSCORE, paged_select_score): grid over (sequence, KV head, chunk
 *       of 128 pages); invocation = page: its score, the largest bound
 *       sum_d max(qs_d lo_d, qs_d hi_d) over the group's query rows (qs = q *
 *       sm_scale in fp32, tiles of 16 rows in shared memory), fp32 into the
 *       backend scratch of the workspace (ws_scores [B * Hkv][max_pages]).
 * TOPK  (-DTOPK, paged_select_topk): work group per (sequence, KV head): the
 *       geometry of qattn_select_geometry, then the budget's best unforced
 *       pages: a bisection on the bits of the order-preserving score keys
 *       finds the k-th key, a second on the page index takes the lowest pages
 *       among equal keys (score descending, then the lower page: the core's
 *       rule; NaN last); adaptive plans double the budget up to the cap
 *       until every row's U <= epsilon (L + U) (adaptive_ok of src/prune.c,
 *       fp32, the exact weight of the 4 best selected full pages read from
 *       the cache, bounds in ws_scores' two following arrays). Writes the
 *       count and the ascending page list (a block-wide prefix scan) to the
 *       core's select_counts / select_pages regions.
 * MASS  (-DMASS, paged_mass): work group per (sequence, KV head, page slot
 *       of max_pages): sum over the visible (key, query row, head) of
 *       exp(sm_scale q.k - lse) (rows with lse -inf skipped), 0 past the
 *       sequence's pages, over the full table.
 *
 * Bindings as paged_common.glsl says, except: META 5 the metadata (words),
 * 7 the append's status words, 8 slot_mapping; SCORE/TOPK 2 the metadata;
 * MASS 5 the mass (fp32), 6 the LSE (input). K is read as words at 1.
 */

#define FMT_F16 0u
#define FMT_BF16 1u
#define FMT_FP8 2u
#define FMT_I8 3u
#define FMT_I8_ROW 4u

#define NEG_INF uintBitsToFloat(0xff800000u)
#define POS_INF uintBitsToFloat(0x7f800000u)

#ifdef META
/* --------------------------------------------------------------- META */
#include "numeric.glsl"
#include "status.glsl"

#define WG 64u
layout(local_size_x = WG) in;
layout(constant_id = 0) const uint FMT = FMT_F16;

layout(std430, set = 0, binding = 1) readonly buffer KC { uint kc[]; };
layout(std430, set = 0, binding = 3) readonly buffer KS { float ks[]; };
layout(std430, set = 0, binding = 5) writeonly buffer Meta { uint meta[]; };
layout(std430, set = 0, binding = 7) readonly buffer Status { uint status[]; };
layout(std430, set = 0, binding = 8) readonly buffer Slots { uint slot_words[]; };

#define APPEND_CHECK 1u
#define APPEND_HND 2u

layout(push_constant) uniform MetaArgs {
    uint slot_off, num_tokens, heads, head_dim;
    uint page_size, capacity, flags, meta_scale_off; /* meta_scale_off: words (INT8 per row) */
} A;

const uint NONE = 0xffffffffu;

/* As paged_append's: NONE for padding, capacity for a slot past the cache. */
uint slot_of(uint t)
{
    uint lo = slot_words[A.slot_off + 2u * t], hi = slot_words[A.slot_off + 2u * t + 1u];
    if ((hi & 0x80000000u) != 0u)
        return NONE;
    return hi != 0u || lo >= A.capacity ? A.capacity : lo;
}

/* The value cache_value() of src/prune.c compares (FP8 and INT8 per head unscaled: order is what matters). */
float code_value(uint code, float row_scale)
{
    if (FMT == FMT_F16) return unpackHalf2x16(code).x;
    if (FMT == FMT_BF16) return uintBitsToFloat(code << 16);
    if (FMT == FMT_FP8) return e4m3_to_f32(code);
    float x = float(bitfieldExtract(int(code), 0, 8));
    return FMT == FMT_I8_ROW ? x * row_scale : x;
}

/* fminf(fmaxf(v, -127), 127) as C has it (NaN -> -127), as a byte. */
uint clamp_code(float v)
{
    float c = isnan(v) ? -127.0 : clamp(v, -127.0, 127.0);
    return uint(int(c)) & 0xffu;
}

void main()
{
    if ((A.flags & APPEND_CHECK) != 0u && (status[STATUS_NONFINITE] | status[STATUS_BOUNDS]) != 0u)
        return;
    const uint tid = gl_LocalInvocationID.x;
    const uint CPW = FMT <= FMT_BF16 ? 2u : 4u, BITS = 32u / CPW, MASK = (1u << BITS) - 1u;
    const uint P = A.page_size, H = A.heads, D = A.head_dim, words = D / CPW, per = H * words;
    const bool hnd = (A.flags & APPEND_HND) != 0u;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    for (uint t = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; t < A.num_tokens; t += groups) {
        const uint slot = slot_of(t);
        if (slot >= A.capacity)
            continue; /* padding (or a bad slot, unchecked) */
        const uint page = slot / P;
        if (t > 0u) { /* the previous token's group recomputes a shared page */
            uint prev = slot_of(t - 1u);
            if (prev < A.capacity && prev / P == page)
                continue;
        }
        for (uint e = tid; e < per; e += WG) {
            const uint h = e / words, w = e % words;
            float smax = 0.0;
            if (FMT == FMT_I8_ROW)
                for (uint s = 0u; s < P; s++) {
                    float sc = ks[(page * P + s) * H + h];
                    if (sc > smax) /* NaN never wins */
                        smax = sc;
                }
            vec4 lo = vec4(POS_INF), hi = vec4(NEG_INF);
            uvec4 lo_c = uvec4(0u), hi_c = uvec4(0u);
            for (uint s = 0u; s < P; s++) {
                uint within = hnd ? h * P + s : s * H + h;
                uint word = kc[((page * P * H + within) * D) / CPW + w];
                float rs = FMT == FMT_I8_ROW ? ks[(page * P + s) * H + h] : 1.0;
                for (uint c = 0u; c < CPW; c++) {
                    uint code = (word >> (c * BITS)) & MASK;
                    float x = code_value(code, rs);
                    if (s == 0u) { /* all-NaN channels keep slot 0's code */
                        lo_c[c] = code;
                        hi_c[c] = code;
                    }
                    if (x < lo[c]) {
                        lo[c] = x;
                        lo_c[c] = code;
                    }
                    if (x > hi[c]) {
                        hi[c] = x;
                        hi_c[c] = code;
                    }
                }
            }
            const uint row = ((page * H + h) * 2u * D) / CPW; /* word of the min row */
            uint lw = 0u, hw = 0u;
            if (FMT == FMT_I8_ROW) { /* codes against the page's largest row scale, outward */
                uint sb = floatBitsToUint(smax);
                float inv = smax > 0.0 && sb != 0x7f800000u ? uintBitsToFloat(div_rn_bits(0x3f800000u, sb)) : 0.0;
                for (uint c = 0u; c < 4u; c++) {
                    float l = lo[c] == POS_INF ? 0.0 : floor(lo[c] * inv);
                    float u = hi[c] == NEG_INF ? 0.0 : ceil(hi[c] * inv);
                    lw |= clamp_code(l) << (8u * c);
                    hw |= clamp_code(u) << (8u * c);
                }
                if (w == 0u)
                    meta[A.meta_scale_off + page * H + h] = sb;
            } else {
                for (uint c = 0u; c < CPW; c++) {
                    lw |= lo_c[c] << (c * BITS);
                    hw |= hi_c[c] << (c * BITS);
                }
            }
            meta[row + w] = lw;
            meta[row + words + w] = hw;
        }
    }
}

#else
/* ------------------------------------------------- SCORE, TOPK, MASS */
#define PAGED_CUSTOM_ARGS
/* Mirrors vk_prune_args in backends/vulkan/vulkan_paged.c. */
layout(push_constant) uniform PruneArgs {
    uint q_off, lse_off, ws_off, flags;   /* elements of q, of lse; words of the workspace; ARG_* */
    uint q_s0, q_s1, batch, heads_kv;
    uint group, page_size, num_pages, max_pages;
    uint total_q, max_q_len, indices_count, ws_status;
    float sm_scale;
    uint meta_scale_off;                  /* words of the metadata (INT8 per row) */
    uint ws_scores, ws_sel_counts;        /* words from ws_off */
    uint ws_sel_pages, budget_pages, sink_pages, recent_pages; /* budget_pages 0: the fraction */
    uint frac_m, frac_shift;              /* budget_fraction = frac_m / 2^frac_shift */
    float epsilon;
    uint cap_pages;                       /* adaptive cap (0: none) */
    uint mass_off, reserved;              /* words of the mass buffer */
} A;
#include "paged_common.glsl"

#define WG 128u
layout(local_size_x = WG) in;
layout(constant_id = 0) const uint D = 128;
layout(constant_id = 2) const uint FMT = FMT_F16;

layout(std430, set = 0, binding = 1) readonly buffer KC { uint kc[]; };
layout(std430, set = 0, binding = 3) readonly buffer KS { float k_scale[]; };

const uint CPW = FMT <= FMT_BF16 ? 2u : 4u;
const uint DW = D / CPW; /* words per row */

/* The CPW values of one stored word, times scale (zeros past CPW). */
vec4 decode_word(uint w, float scale)
{
    if (FMT == FMT_F16)
        return vec4(unpackHalf2x16(w), 0.0, 0.0);
    if (FMT == FMT_BF16)
        return vec4(uintBitsToFloat(w << 16), uintBitsToFloat(w & 0xffff0000u), 0.0, 0.0);
    if (FMT == FMT_FP8)
        return vec4(e4m3_to_f32(w & 0xffu) * scale, e4m3_to_f32((w >> 8) & 0xffu) * scale,
                    e4m3_to_f32((w >> 16) & 0xffu) * scale, e4m3_to_f32(w >> 24) * scale);
    return vec4(float(bitfieldExtract(int(w), 0, 8)) * scale, float(bitfieldExtract(int(w), 8, 8)) * scale,
                float(bitfieldExtract(int(w), 16, 8)) * scale, float(bitfieldExtract(int(w), 24, 8)) * scale);
}

/* Word w of key row (page, token t, head hk), dequantized. */
vec4 key_word(uint page, uint t, uint hk, uint w)
{
    const uint P = A.page_size, H = A.heads_kv;
    uint within = (A.flags & ARG_HND) != 0u ? hk * P + t : t * H + hk;
    float scale = FMT == FMT_FP8 || FMT == FMT_I8 ? k_scale[hk]
                  : FMT == FMT_I8_ROW              ? k_scale[(page * P + t) * H + hk]
                                                   : 1.0;
    return decode_word(kc[((page * P * H + within) * D) / CPW + w], scale);
}

shared float red[WG];

float block_sum(float x)
{
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    red[tid] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s)
            red[tid] += red[tid + s];
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

#if defined(SCORE) || defined(TOPK)
layout(std430, set = 0, binding = 2) readonly buffer Meta { uint meta[]; };

/* Word w of (page, hk)'s min and max rows, dequantized (qattn_kv_meta_read_host). */
void meta_lohi(uint page, uint hk, uint w, out vec4 lo, out vec4 hi)
{
    const uint H = A.heads_kv;
    float scale = FMT == FMT_FP8 || FMT == FMT_I8 ? k_scale[hk]
                  : FMT == FMT_I8_ROW              ? uintBitsToFloat(meta[A.meta_scale_off + page * H + hk])
                                                   : 1.0;
    uint row = ((page * H + hk) * 2u * D) / CPW;
    lo = decode_word(meta[row + w], scale);
    hi = decode_word(meta[row + DW + w], scale);
}
#endif

#ifdef SCORE
/* ------------------------------------------------------------- SCORE */
const uint RT = 16u; /* query rows per tile */
shared float qsh[RT * D];

void main()
{
    if (status_set())
        return;
    const uint tid = gl_LocalInvocationID.x;
    const uint H = A.heads_kv, G = A.group, P = A.page_size, M = A.max_pages;
    const uint chunks = (M + WG - 1u) / WG, items = A.batch * H * chunks;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    for (uint item = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; item < items; item += groups) {
        const uint chunk = item % chunks, row = item / chunks, hk = row % H, b = row / H;
        const Seq seq = sequence(b);
        const int n = (seq.kv_len + int(P) - 1) / int(P);
        if (int(chunk * WG) >= n)
            continue; /* uniform */
        const uint p = chunk * WG + tid, rows = uint(seq.q_len) * G;
        const bool live = int(p) < n;
        const uint page = live ? page_at(seq, p) : 0u;
        float best = NEG_INF;
        for (uint r0 = 0u; r0 < rows; r0 += RT) {
            barrier(); /* the previous tile's readers are done */
            for (uint e = tid; e < RT * D; e += WG) {
                uint r = r0 + e / D, d = e % D;
                float x = 0.0;
                if (r < rows) {
                    uint i = r / G, head = hk * G + r % G;
                    x = load_q(A.q_off + (uint(seq.q0) + i) * A.q_s0 + head * A.q_s1 + d) * A.sm_scale;
                }
                qsh[e] = x;
            }
            barrier();
            if (live) {
                float acc[RT];
                for (uint r = 0u; r < RT; r++)
                    acc[r] = 0.0;
                for (uint w = 0u; w < DW; w++) {
                    vec4 lo, hi;
                    meta_lohi(page, hk, w, lo, hi);
                    for (uint c = 0u; c < CPW; c++)
                        for (uint r = 0u; r < RT; r++) {
                            float qv = qsh[r * D + w * CPW + c];
                            float a = qv * lo[c], bb = qv * hi[c];
                            acc[r] += a > bb ? a : bb;
                        }
                }
                for (uint r = 0u; r < RT && r0 + r < rows; r++)
                    best = acc[r] > best ? acc[r] : best; /* NaN never wins */
            }
        }
        if (live)
            ws_f32[A.ws_off + A.ws_scores + row * M + p] = best;
    }
}
#endif

#ifdef TOPK
/* -------------------------------------------------------------- TOPK */
#define EXACT_PAGES 4u /* QATTN_SELECT_EXACT_PAGES */
const uint NONE = 0xffffffffu;

shared uint cnt_s;
shared uint scan_s[WG];
shared float qrow[D];
shared float cand_u[WG * EXACT_PAGES];
shared uint cand_p[WG * EXACT_PAGES];
shared uint ex_p[EXACT_PAGES];
shared uint n_ex_s;

/* The sum of every invocation's local count. */
uint block_count(uint local)
{
    barrier();
    if (gl_LocalInvocationID.x == 0u)
        cnt_s = 0u;
    barrier();
    if (local != 0u)
        atomicAdd(cnt_s, local);
    barrier();
    return cnt_s;
}

float block_max(float x)
{
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    red[tid] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s && red[tid + s] > red[tid])
            red[tid] = red[tid + s];
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

/* Scores ordered as unsigned keys: higher score -> larger key; -0 = +0; NaN lowest (0). */
uint key_of(float s)
{
    if (isnan(s))
        return 0u;
    uint u = floatBitsToUint(s == 0.0 ? 0.0 : s);
    return (u & 0x80000000u) != 0u ? ~u : u | 0x80000000u;
}

/* ceil(budget_fraction * n) exactly (frac_m * n < 2^55). */
int fraction_pages(int n)
{
    uint hi, lo;
    umulExtended(A.frac_m, uint(n), hi, lo);
    const uint s = A.frac_shift;
    if (hi == 0u && lo == 0u)
        return 0;
    if (s >= 64u)
        return 1;
    uint q, rem;
    if (s >= 32u) {
        uint k = s - 32u;
        q = k == 0u ? hi : hi >> k;
        rem = lo | (k == 0u ? 0u : hi & ((1u << k) - 1u));
    } else if (s == 0u) {
        q = lo;
        rem = 0u;
    } else {
        q = (lo >> s) | (hi << (32u - s));
        rem = lo & ((1u << s) - 1u);
    }
    return int(q) + (rem != 0u ? 1 : 0);
}

/* The selection of one row, as state: forced [0, sinks) and [rb, n); of the
 * unforced pages, `take`: all when take >= rb - sinks, else the pages whose
 * key exceeds t and those equal to t up to page I. */
struct Choice {
    int sinks, rb, take;
    uint t, I;
};

bool chosen(Choice ch, uint row, uint p)
{
    if (int(p) < ch.sinks || int(p) >= ch.rb)
        return true;
    if (ch.take <= 0)
        return false;
    if (ch.take >= ch.rb - ch.sinks)
        return true;
    uint k = key_of(ws_f32[A.ws_off + A.ws_scores + row * A.max_pages + p]);
    return k > ch.t || (k == ch.t && p <= ch.I);
}

/* The threshold for ch.take of the unforced pages (bisection on the key bits, then on the page index). */
void choose(inout Choice ch, uint row)
{
    const uint tid = gl_LocalInvocationID.x, sc = A.ws_off + A.ws_scores + row * A.max_pages;
    ch.t = 0u;
    ch.I = NONE;
    if (ch.take <= 0 || ch.take >= ch.rb - ch.sinks)
        return;
    const uint take = uint(ch.take);
    for (int bit = 31; bit >= 0; bit--) { /* the largest t with #(key >= t) >= take: the take-th key */
        uint cand = ch.t | (1u << uint(bit)), local = 0u;
        for (int p = ch.sinks + int(tid); p < ch.rb; p += int(WG))
            local += key_of(ws_f32[sc + uint(p)]) >= cand ? 1u : 0u;
        if (block_count(local) >= take)
            ch.t = cand;
    }
    uint local = 0u;
    for (int p = ch.sinks + int(tid); p < ch.rb; p += int(WG))
        local += key_of(ws_f32[sc + uint(p)]) > ch.t ? 1u : 0u;
    const uint need = take - block_count(local); /* >= 1 pages of key t, the lowest first */
    ch.I = 0u;
    for (int bit = 30; bit >= 0; bit--) { /* the largest I with #(key == t, p < I) < need */
        uint cand = ch.I | (1u << uint(bit));
        local = 0u;
        for (int p = ch.sinks + int(tid); p < ch.rb && uint(p) < cand; p += int(WG))
            local += key_of(ws_f32[sc + uint(p)]) == ch.t ? 1u : 0u;
        if (block_count(local) < need)
            ch.I = cand;
    }
}

/* Row r's bounds of page p: upper and lower. */
void bounds(uint page, uint hk, out float ub, out float lb)
{
    float u = 0.0, l = 0.0;
    for (uint w = 0u; w < DW; w++) {
        vec4 lo, hi;
        meta_lohi(page, hk, w, lo, hi);
        for (uint c = 0u; c < CPW; c++) {
            float qv = qrow[w * CPW + c];
            float a = qv * lo[c], bb = qv * hi[c];
            u += a > bb ? a : bb;
            l += a < bb ? a : bb;
        }
    }
    ub = u;
    lb = l;
}

/* adaptive_ok of src/prune.c for one (sequence, KV head), in fp32. */
bool adaptive_ok(Seq seq, uint b, uint hk, uint row, int n, Choice ch)
{
    const uint tid = gl_LocalInvocationID.x, G = A.group, P = A.page_size, M = A.max_pages;
    const uint rows = uint(seq.q_len) * G, R = A.batch * A.heads_kv;
    const uint ub_at = A.ws_off + A.ws_scores + R * M + row * M, lb_at = ub_at + R * M;
    for (uint r = 0u; r < rows; r++) {
        barrier();
        for (uint d = tid; d < D; d += WG) {
            uint i = r / G, head = hk * G + r % G;
            qrow[d] = load_q(A.q_off + (uint(seq.q0) + i) * A.q_s0 + head * A.q_s1 + d) * A.sm_scale;
        }
        barrier();
        /* every full page's bounds (kept for the second pass by the same invocation), the max, and the
         * invocation's best selected pages by ub (ties: the lower page first) */
        float m_loc = NEG_INF;
        float bu[EXACT_PAGES];
        uint bp[EXACT_PAGES];
        for (uint e = 0u; e < EXACT_PAGES; e++) {
            bu[e] = NEG_INF;
            bp[e] = NONE;
        }
        for (int p = int(tid); p + 1 < n; p += int(WG)) {
            float ub, lb;
            bounds(page_at(seq, uint(p)), hk, ub, lb);
            ws_f32[ub_at + uint(p)] = ub;
            ws_f32[lb_at + uint(p)] = lb;
            m_loc = ub > m_loc ? ub : m_loc;
            if (chosen(ch, row, uint(p))) {
                uint at = EXACT_PAGES;
                while (at > 0u && (bp[at - 1u] == NONE || bu[at - 1u] < ub))
                    at--;
                if (at < EXACT_PAGES) {
                    for (uint e = EXACT_PAGES - 1u; e > at; e--) {
                        bu[e] = bu[e - 1u];
                        bp[e] = bp[e - 1u];
                    }
                    bu[at] = ub;
                    bp[at] = uint(p);
                }
            }
        }
        const float m = block_max(m_loc);
        if (m == NEG_INF)
            continue; /* one page: nothing left out */
        for (uint e = 0u; e < EXACT_PAGES; e++) {
            cand_u[tid * EXACT_PAGES + e] = bu[e];
            cand_p[tid * EXACT_PAGES + e] = bp[e];
        }
        barrier();
        if (tid == 0u) { /* the best EXACT_PAGES of all: ub descending, then the lower page */
            uint got = 0u;
            for (uint e = 0u; e < EXACT_PAGES; e++) {
                uint best = NONE;
                for (uint c = 0u; c < WG * EXACT_PAGES; c++) {
                    uint p = cand_p[c];
                    if (p == NONE)
                        continue;
                    if (best == NONE || cand_u[c] > cand_u[best] ||
                        (cand_u[c] == cand_u[best] && p < cand_p[best]))
                        best = c;
                }
                if (best == NONE)
                    break;
                ex_p[got++] = cand_p[best];
                cand_p[best] = NONE;
            }
            n_ex_s = got;
        }
        barrier();
        const uint n_ex = n_ex_s;
        float U = 0.0, L = 0.0;
        for (int p = int(tid); p + 1 < n; p += int(WG)) {
            if (!chosen(ch, row, uint(p))) {
                U += float(P) * exp(ws_f32[ub_at + uint(p)] - m);
                continue;
            }
            bool is_exact = false;
            for (uint e = 0u; e < n_ex; e++)
                is_exact = is_exact || ex_p[e] == uint(p);
            if (!is_exact)
                L += float(P) * exp(ws_f32[lb_at + uint(p)] - m);
        }
        for (uint e = tid; e < n_ex * P; e += WG) { /* the exact weight of the best selected pages */
            uint page = page_at(seq, ex_p[e / P]), t = e % P;
            float dot = 0.0;
            for (uint w = 0u; w < DW; w++) {
                vec4 k = key_word(page, t, hk, w);
                for (uint c = 0u; c < CPW; c++)
                    dot += qrow[w * CPW + c] * k[c];
            }
            L += exp(dot - m);
        }
        U = block_sum(U);
        L = block_sum(L);
        if (U > A.epsilon * (L + U))
            return false;
    }
    return true;
}

void main()
{
    if (status_set())
        return;
    const uint tid = gl_LocalInvocationID.x;
    const uint H = A.heads_kv, M = A.max_pages;
    const int P = int(A.page_size);
    const bool adaptive = (A.flags & ARG_ADAPTIVE) != 0u;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    for (uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; row < A.batch * H; row += groups) {
        const uint hk = row % H, b = row / H;
        const Seq seq = sequence(b);
        const int kv_len = seq.kv_len, n = (kv_len + P - 1) / P;
        if (n == 0) {
            if (tid == 0u)
                ws_u32[A.ws_off + A.ws_sel_counts + row] = 0u;
            continue;
        }
        /* qattn_select_geometry */
        int sinks = min(int(A.sink_pages), n);
        int rb = n - max(int(A.recent_pages), 1);
        int first_q = kv_len - max(seq.q_len, 0);
        first_q = first_q > 0 ? first_q / P : 0;
        rb = max(min(rb, first_q), 0);
        sinks = min(sinks, rb);
        const int forced = sinks + (n - rb);
        int budget = int(A.budget_pages);
        if (budget <= 0)
            budget = fraction_pages(n);
        budget = budget < forced ? forced : budget > n ? n : budget;
        int cap = budget;
        if (adaptive) {
            cap = A.cap_pages > 0u ? int(A.cap_pages) : n;
            cap = cap < budget ? budget : cap > n ? n : cap;
        }
        Choice ch;
        ch.sinks = sinks;
        ch.rb = rb;
        int want = budget;
        for (;;) {
            ch.take = min(want - forced, rb - sinks);
            choose(ch, row);
            if (!adaptive || want >= cap || adaptive_ok(seq, b, hk, row, n, ch))
                break;
            want = want * 2 < cap ? want * 2 : cap;
        }
        /* the chosen pages, ascending: a prefix scan per 128 pages */
        uint base = 0u;
        for (int c0 = 0; c0 < n; c0 += int(WG)) {
            uint p = uint(c0) + tid;
            bool f = int(p) < n && chosen(ch, row, p);
            barrier();
            scan_s[tid] = f ? 1u : 0u;
            barrier();
            for (uint off = 1u; off < WG; off <<= 1) {
                uint v = tid >= off ? scan_s[tid - off] : 0u;
                barrier();
                scan_s[tid] += v;
                barrier();
            }
            if (f)
                ws_u32[A.ws_off + A.ws_sel_pages + row * M + base + scan_s[tid] - 1u] = p;
            base += scan_s[WG - 1u];
        }
        if (tid == 0u)
            ws_u32[A.ws_off + A.ws_sel_counts + row] = base;
    }
}
#endif

#ifdef MASS
/* -------------------------------------------------------------- MASS */
layout(std430, set = 0, binding = 5) writeonly buffer Mass { float mass[]; };
layout(std430, set = 0, binding = 6) readonly buffer LseIn { float lse_in[]; };

void main()
{
    if (status_set())
        return;
    const uint tid = gl_LocalInvocationID.x;
    const uint H = A.heads_kv, G = A.group, P = A.page_size, M = A.max_pages, Hq = H * G;
    const bool causal = (A.flags & ARG_CAUSAL) != 0u;
    const uint items = A.batch * H * M, groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    for (uint item = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; item < items; item += groups) {
        const uint p = item % M, row = item / M, hk = row % H, b = row / H;
        const Seq seq = sequence(b);
        const int kv_len = seq.kv_len, n = (kv_len + int(P) - 1) / int(P);
        float sum = 0.0;
        if (int(p) < n) {
            const uint page = page_at(seq, p), rows = uint(seq.q_len) * G;
            const uint keys = uint(min(int(P), kv_len - int(p * P)));
            for (uint e = tid; e < keys * rows; e += WG) {
                uint t = e / rows, r = e % rows, i = r / G, head = hk * G + r % G;
                if (causal && int(p * P + t) > int(i) + kv_len - seq.q_len)
                    continue;
                float l = lse_in[A.lse_off + (uint(seq.q0) + i) * Hq + head];
                if (l == NEG_INF)
                    continue;
                uint qa = A.q_off + (uint(seq.q0) + i) * A.q_s0 + head * A.q_s1;
                float dot = 0.0;
                for (uint w = 0u; w < DW; w++) {
                    vec4 k = key_word(page, t, hk, w);
                    for (uint c = 0u; c < CPW; c++)
                        dot += load_q(qa + w * CPW + c) * k[c];
                }
                sum += exp(A.sm_scale * dot - l);
            }
        }
        sum = block_sum(sum);
        if (tid == 0u)
            mass[A.mass_off + row * M + p] = sum;
    }
}
#endif

#endif
