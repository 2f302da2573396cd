#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * Smooth K: mean[d] = (sum_t k[t][d]) / Nk per (batch, kv head), as
 * src/quant.c: accumulated in double (USE_F64), else in a float-float pair
 * (within an ulp of it). A workgroup covers 16 channels with 16 token lanes;
 * lanes combine in a fixed order, so the result does not depend on timing.
 */
#ifdef USE_F64
#extension GL_ARB_gpu_shader_fp64 : require
#endif
#include "common.glsl"

layout(local_size_x = 16, local_size_y = 16) in;

#ifdef USE_F64
shared double part[16][16];
#else
shared float part_hi[16][16];
shared float part_lo[16][16];
#endif

void main()
{
    uint D = P.head_dim, Nk = P.seq_k;
    uint c = gl_WorkGroupID.x * 16u + gl_LocalInvocationID.x;
    uint lane = gl_LocalInvocationID.y;
    for (uint bh = gl_WorkGroupID.y; bh < P.batch * P.heads_kv; bh += gl_NumWorkGroups.y) {
        uint base = R.k_off + (bh / P.heads_kv) * P.k_sb + (bh % P.heads_kv) * P.k_sh + c;
#ifdef USE_F64
        double s = 0.0;
        if (c < D)
            for (uint t = lane; t < Nk; t += 16u)
                s += double(load_k(base + t * P.k_sn));
        part[lane][gl_LocalInvocationID.x] = s;
#else
        precise float hi = 0.0, lo = 0.0;
        if (c < D)
            for (uint t = lane; t < Nk; t += 16u) {
                precise float x = load_k(base + t * P.k_sn);
                precise float sum = hi + x;
                precise float bv = sum - hi;
                precise float err = (hi - (sum - bv)) + (x - bv);
                hi = sum;
                lo += err;
            }
        part_hi[lane][gl_LocalInvocationID.x] = hi;
        part_lo[lane][gl_LocalInvocationID.x] = lo;
#endif
        barrier();
        if (lane == 0u && c < D) {
#ifdef USE_F64
            double total = 0.0;
            for (uint l = 0u; l < 16u; l++)
                total += part[l][gl_LocalInvocationID.x];
            float mean = float(total / double(Nk));
#else
            precise float th = 0.0, tl = 0.0;
            for (uint l = 0u; l < 16u; l++) {
                precise float x = part_hi[l][gl_LocalInvocationID.x];
                precise float sum = th + x;
                precise float bv = sum - th;
                precise float err = (th - (sum - bv)) + (x - bv);
                th = sum;
                tl += err + part_lo[l][gl_LocalInvocationID.x];
            }
            precise float n = float(Nk);
            precise float q0 = th / n;
            /* one correction step with the remainder, in float-float */
            precise float r = (th - q0 * n) + tl;
            float mean = q0 + r / n;
#endif
            ws_f32[((R.ws_off + P.ws_k_mean) >> 2) + bh * D + c] = mean;
        }
        barrier();
    }
}
