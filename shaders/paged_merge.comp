#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * The exact LSE merge of attention states computed over disjoint key sets
 * (qattn_merge_states, and the split-KV partials of a paged run):
 *   lse = M + log(sum_s exp(lse_s - M)),  o = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)
 * with M the largest lse_s. States whose LSE is -inf are skipped (their
 * values are never read); when all are, o = 0 and lse = -inf.
 * One work group per (row, head) at a time: the states' weights go through
 * shared memory 64 at a time, invocations stride over the head dim.
 *
 * Bindings: 12 the states v (dtype V_DTYPE), 7 their LSE (fp32), 5 o, 6 lse,
 * 8 qo_indptr (a paged run: only its query rows are merged).
 */
#extension GL_EXT_shader_16bit_storage : require
#include "numeric.glsl"
#include "status.glsl"

layout(local_size_x = 64) in;

layout(constant_id = 0) const uint V_DTYPE = 0; /* 0 f32, 1 f16, 2 bf16 */
layout(constant_id = 1) const uint O_DTYPE = 0;

layout(std430, set = 0, binding = 12) readonly buffer VF32 { float v_f32[]; };
layout(std430, set = 0, binding = 12) readonly buffer VU16 { uint16_t v_u16[]; };
layout(std430, set = 0, binding = 7) buffer SU { uint s_u32[]; };
layout(std430, set = 0, binding = 7) buffer SF { float s_f32[]; };
layout(std430, set = 0, binding = 5) writeonly buffer OF32 { float o_f32[]; };
layout(std430, set = 0, binding = 5) writeonly buffer OU16 { uint16_t o_u16[]; };
layout(std430, set = 0, binding = 6) writeonly buffer LSE { float lse_out[]; };
layout(std430, set = 0, binding = 8) readonly buffer QO { int qo_indptr[]; };

#define MERGE_LSE 1u    /* write lse */
#define MERGE_PAGED 2u  /* rows qo_indptr[0] .. qo_indptr[batch] only */
#define MERGE_CHECK 4u  /* skip everything when the status words (in binding 7) are set */

layout(push_constant) uniform MergeArgs {
    uint v_off, s_off, o_off, lse_off; /* elements (s: words) */
    uint v_s0, v_s1, v_s2, s_s0;       /* strides: state, row, head */
    uint s_s1, s_s2, o_s0, o_s1;
    uint states, rows, heads, head_dim;
    uint flags, batch, status_word;    /* status_word: word index in binding 7 */
} M;

const uint WG = 64u;
#define NEG_INF uintBitsToFloat(0xff800000u)

shared float red[WG];
shared float weight[WG];

float load_v(uint i)
{
    if (V_DTYPE == 0u) return v_f32[i];
    if (V_DTYPE == 1u) return unpackHalf2x16(uint(v_u16[i])).x;
    return bf16_bits_to_f32(uint(v_u16[i]));
}

void store_o(uint i, float x)
{
    if (O_DTYPE == 0u) o_f32[i] = x;
    else if (O_DTYPE == 1u) o_u16[i] = uint16_t(f32_to_f16_bits(x));
    else o_u16[i] = uint16_t(f32_to_bf16_bits(x));
}

float lse_of(uint st, uint r, uint h) { return s_f32[M.s_off + st * M.s_s0 + r * M.s_s1 + h * M.s_s2]; }

void main()
{
    if ((M.flags & MERGE_CHECK) != 0u && (s_u32[M.status_word + STATUS_NONFINITE] | s_u32[M.status_word + STATUS_BOUNDS]) != 0u)
        return;
    const uint tid = gl_LocalInvocationID.x;
    uint lo = 0u, hi = M.rows;
    if ((M.flags & MERGE_PAGED) != 0u) {
        lo = uint(clamp(qo_indptr[0], 0, int(M.rows)));
        hi = uint(clamp(qo_indptr[M.batch], int(lo), int(M.rows)));
    }
    const uint pairs = (hi - lo) * M.heads, groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    for (uint pair = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; pair < pairs; pair += groups) {
        const uint r = lo + pair / M.heads, h = pair % M.heads;
        float mx = NEG_INF;
        for (uint st = tid; st < M.states; st += WG)
            mx = max(mx, lse_of(st, r, h));
        barrier(); /* the previous pair's readers of red and weight are done */
        red[tid] = mx;
        barrier();
        for (uint n = WG / 2u; n > 0u; n >>= 1) {
            if (tid < n)
                red[tid] = max(red[tid], red[tid + n]);
            barrier();
        }
        mx = red[0];
        barrier();
        float total = 0.0;
        if (mx != NEG_INF)
            for (uint st = tid; st < M.states; st += WG) {
                float x = lse_of(st, r, h);
                if (x != NEG_INF)
                    total += exp(x - mx);
            }
        red[tid] = total;
        barrier();
        for (uint n = WG / 2u; n > 0u; n >>= 1) {
            if (tid < n)
                red[tid] += red[tid + n];
            barrier();
        }
        total = red[0];
        const uint vbase = M.v_off + r * M.v_s1 + h * M.v_s2, obase = M.o_off + r * M.o_s0 + h * M.o_s1;
        for (uint d0 = 0u; d0 < M.head_dim; d0 += WG) {
            const uint d = d0 + tid;
            float acc = 0.0;
            for (uint s0 = 0u; mx != NEG_INF && s0 < M.states; s0 += WG) {
                barrier(); /* the previous chunk's weights are consumed */
                float x = s0 + tid < M.states ? lse_of(s0 + tid, r, h) : NEG_INF;
                weight[tid] = x != NEG_INF ? exp(x - mx) : -1.0; /* -1: skipped, its values unread */
                barrier();
                uint n = min(WG, M.states - s0);
                for (uint k = 0u; k < n; k++) {
                    float w = weight[k];
                    if (w >= 0.0 && d < M.head_dim)
                        acc += w * load_v(vbase + (s0 + k) * M.v_s0 + d);
                }
            }
            if (d < M.head_dim)
                store_o(obase + d, mx != NEG_INF ? acc / total : 0.0);
        }
        if (tid == 0u && (M.flags & MERGE_LSE) != 0u)
            lse_out[M.lse_off + r * M.heads + h] = mx != NEG_INF ? mx + log(total) : NEG_INF;
    }
}
