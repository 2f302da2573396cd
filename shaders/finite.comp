#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * The finite check: flags NaN/Inf in Q, K or V (R.arg0 = 0, 1, 2) by testing
 * exponent bits, which no fast-math setting of a driver can fold away.
 * Grid: x strides over rows of one (batch, head), y over (batch, head).
 */
#include "common.glsl"

layout(local_size_x = 256) in;

bool nonfinite_at(uint which, uint i)
{
    if (IN_DTYPE == DT_F32) {
        uint x = floatBitsToUint(which == 0u ? q_f32[i] : which == 1u ? k_f32[i] : v_f32[i]);
        return (x & 0x7f800000u) == 0x7f800000u;
    }
    uint h = which == 0u ? uint(q_u16[i]) : which == 1u ? uint(k_u16[i]) : uint(v_u16[i]);
    uint mask = IN_DTYPE == DT_F16 ? 0x7c00u : 0x7f80u;
    return (h & mask) == mask;
}

void main()
{
    uint which = R.arg0;
    uint heads = which == 0u ? P.heads_q : P.heads_kv;
    uint n = which == 0u ? P.seq_q : P.seq_k;
    uint sb = which == 0u ? P.q_sb : which == 1u ? P.k_sb : P.v_sb;
    uint sh = which == 0u ? P.q_sh : which == 1u ? P.k_sh : P.v_sh;
    uint sn = which == 0u ? P.q_sn : which == 1u ? P.k_sn : P.v_sn;
    uint off = which == 0u ? R.q_off : which == 1u ? R.k_off : R.v_off;
    uint D = P.head_dim;
    bool bad = false;
    for (uint bh = gl_WorkGroupID.y; bh < P.batch * heads; bh += gl_NumWorkGroups.y) {
        uint base = off + (bh / heads) * sb + (bh % heads) * sh;
        for (uint e = gl_WorkGroupID.x * 256u + gl_LocalInvocationID.x; e < n * D; e += gl_NumWorkGroups.x * 256u) {
            uint t = e / D, d = e % D;
            bad = bad || nonfinite_at(which, base + t * sn + d);
        }
    }
    if (bad)
        atomicOr(ws_u32[(R.ws_off + P.ws_status) >> 2], 1u << which); /* NONFINITE_Q, _K, _V of status.glsl */
}
