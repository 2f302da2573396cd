#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * INT8 quantization of Q (R.arg0 = 0) or K (R.arg0 = 1), one workgroup per
 * scale group of one head, exactly as src/quant.c: amax over the group
 * (K minus its smooth mean), scale = amax / 127, code = rne(x * (127 / amax)).
 * Q also gets q_kmean = sm_scale * dot(q, mean_k), summed in channel order.
 * Codes are written four to a word (the workspace rows are D bytes, D % 16 == 0).
 */
#include "common.glsl"
#include "exact_math.glsl"

layout(local_size_x = 256) in;

shared float red[256];

float load_in(bool is_k, uint i) { return is_k ? load_k(i) : load_q(i); }

void main()
{
    bool is_k = R.arg0 == 1u;
    uint D = P.head_dim;
    uint heads = is_k ? P.heads_kv : P.heads_q;
    uint n = is_k ? P.seq_k : P.seq_q;
    uint block = is_k ? P.k_block : P.q_block;
    uint inter = is_k ? P.k_interleave : P.q_interleave;
    uint groups = is_k ? P.k_groups : P.q_groups;
    uint sb = is_k ? P.k_sb : P.q_sb, sh = is_k ? P.k_sh : P.q_sh, sn = is_k ? P.k_sn : P.q_sn;
    uint off = is_k ? R.k_off : R.q_off;
    uint wsb = R.ws_off >> 2;
    bool use_mean = P.smooth_k != 0u;
    uint tid = gl_LocalInvocationID.x;

    for (uint bh = gl_WorkGroupID.y; bh < P.batch * heads; bh += gl_NumWorkGroups.y) {
        uint b = bh / heads, h = bh % heads;
        uint base = off + b * sb + h * sh;
        uint bhk = b * P.heads_kv + (is_k ? h : h / P.group);
        uint mean_at = ((R.ws_off + P.ws_k_mean) >> 2) + bhk * D;
        for (uint g = gl_WorkGroupID.x; g < groups; g += gl_NumWorkGroups.x) {
            uint blk = g / inter, lane = g % inter;
            uint t0 = blk * block + lane;
            uint t1 = min((blk + 1u) * block, n);
            uint ntok = t0 < t1 ? (t1 - t0 + inter - 1u) / inter : 0u;
            uint quads = D / 4u;

            float amax = 0.0;
            for (uint e = tid; e < ntok * D; e += 256u) {
                uint t = t0 + (e / D) * inter, c = e % D;
                precise float x = load_in(is_k, base + t * sn + c);
                if (is_k && use_mean) x = x - ws_f32[mean_at + c];
                amax = max(amax, abs(x));
            }
            red[tid] = amax;
            barrier();
            for (uint s = 128u; s > 0u; s >>= 1) {
                if (tid < s) red[tid] = max(red[tid], red[tid + s]);
                barrier();
            }
            amax = floatBitsToUint(red[0]) < QUANT_MIN_AMAX_BITS ? 0.0 : red[0];
            barrier();
            float inv = amax > 0.0 ? div_rn(127.0, amax) : 0.0;
            if (tid == 0u) {
                uint scale_at = ((R.ws_off + (is_k ? P.ws_k_scale : P.ws_q_scale)) >> 2) + bh * groups + g;
                ws_f32[scale_at] = amax > 0.0 ? div_rn(amax, 127.0) : 0.0;
            }
            uint codes_at = (R.ws_off + (is_k ? P.ws_k_i8 : P.ws_q_i8)) >> 2;
            for (uint e = tid; e < ntok * quads; e += 256u) {
                uint t = t0 + (e / quads) * inter, c4 = (e % quads) * 4u;
                uint word = 0u;
                for (uint j = 0u; j < 4u; j++) {
                    precise float x = load_in(is_k, base + t * sn + c4 + j);
                    if (is_k && use_mean) x = x - ws_f32[mean_at + c4 + j];
                    precise float y = x * inv;
                    float r = isnan(y) ? -127.0 : clamp(roundEven(y), -127.0, 127.0); /* NaN: -127, as the CPU */
                    word |= (uint(int(r)) & 0xffu) << (8u * j);
                }
                ws_u32[codes_at + ((bh * n + t) * D + c4) / 4u] = word;
            }
            if (!is_k && use_mean)
                for (uint i = tid; i < ntok; i += 256u) {
                    uint t = t0 + i * inter;
                    precise float s = 0.0;
                    for (uint c = 0u; c < D; c++) {
                        precise float prod = load_q(base + t * sn + c) * ws_f32[mean_at + c];
                        s = s + prod;
                    }
                    precise float corr = P.sm_scale * s;
                    ws_f32[((R.ws_off + P.ws_q_kmean) >> 2) + bh * n + t] = corr;
                }
        }
    }
}
