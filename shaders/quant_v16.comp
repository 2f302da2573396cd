#version 450
#extension GL_GOOGLE_include_directive : require
/* INT8_FP16 keeps V as fp16 (round to nearest even), dense [B, Hkv, Nk, D],
 * two values per word. */
#include "common.glsl"

layout(local_size_x = 256) in;

void main()
{
    uint D = P.head_dim, Nk = P.seq_k;
    uint pairs = Nk * D / 2u;
    uint at = (R.ws_off + P.ws_v_q) >> 2;
    for (uint bh = gl_WorkGroupID.y; bh < P.batch * P.heads_kv; bh += gl_NumWorkGroups.y) {
        uint base = R.v_off + (bh / P.heads_kv) * P.v_sb + (bh % P.heads_kv) * P.v_sh;
        for (uint e = gl_WorkGroupID.x * 256u + gl_LocalInvocationID.x; e < pairs; e += gl_NumWorkGroups.x * 256u) {
            uint t = (2u * e) / D, c = (2u * e) % D;
            uint lo = f32_to_f16_bits(load_v(base + t * P.v_sn + c));
            uint hi = f32_to_f16_bits(load_v(base + t * P.v_sn + c + 1u));
            ws_u32[at + bh * pairs + e] = lo | (hi << 16);
        }
    }
}
