/*
 * Shared by every qattn compute shader: the descriptor layout, the plan's
 * parameter block, the per-run push constants, and exact number conversions.
 *
 * Bindings (all whole buffers; element offsets arrive as push constants):
 *   0 q, 1 k, 2 v (inputs), 3 o, 4 lse, 5 workspace, 6 params (uniform)
 * Inputs are seen through f32, f16 and 16-bit-pattern views of the same
 * binding; the IN_DTYPE/OUT_DTYPE specialization constants pick one, so the
 * driver folds the others away.
 */
#extension GL_EXT_shader_16bit_storage : require

#include "numeric.glsl"

#define DT_F32 0u
#define DT_F16 1u
#define DT_BF16 2u

layout(std430, set = 0, binding = 0) readonly buffer QF32 { float q_f32[]; };
layout(std430, set = 0, binding = 0) readonly buffer QF16 { float16_t q_f16[]; };
layout(std430, set = 0, binding = 0) readonly buffer QU16 { uint16_t q_u16[]; };
layout(std430, set = 0, binding = 1) readonly buffer KF32 { float k_f32[]; };
layout(std430, set = 0, binding = 1) readonly buffer KF16 { float16_t k_f16[]; };
layout(std430, set = 0, binding = 1) readonly buffer KU16 { uint16_t k_u16[]; };
layout(std430, set = 0, binding = 2) readonly buffer VF32 { float v_f32[]; };
layout(std430, set = 0, binding = 2) readonly buffer VF16 { float16_t v_f16[]; };
layout(std430, set = 0, binding = 2) readonly buffer VU16 { uint16_t v_u16[]; };
layout(std430, set = 0, binding = 3) writeonly buffer OF32 { float o_f32[]; };
layout(std430, set = 0, binding = 3) writeonly buffer OF16 { float16_t o_f16[]; };
layout(std430, set = 0, binding = 3) writeonly buffer OU16 { uint16_t o_u16[]; };
layout(std430, set = 0, binding = 4) writeonly buffer LSE { float lse_out[]; };
layout(std430, set = 0, binding = 5) coherent buffer WSU { uint ws_u32[]; };
layout(std430, set = 0, binding = 5) coherent buffer WSF { float ws_f32[]; };

/* The plan's constants (mirrors vk_params in backends/vulkan/vulkan_attention.c). */
layout(std140, set = 0, binding = 6) uniform Params {
    uint batch, heads_q, heads_kv, seq_q, seq_k, head_dim, group;
    int causal_shift; /* Nk - Nq */
    uint q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn;
    float qk_scale_log2; /* sm_scale * log2(e) */
    float sm_scale;
    /* workspace regions, byte offsets from the workspace start */
    uint ws_q_i8, ws_k_i8, ws_v_q, ws_q_scale, ws_k_scale, ws_k_mean, ws_q_kmean, ws_status;
    uint q_block, q_interleave, k_block, k_interleave, q_groups, k_groups;
    uint smooth_k, check_finite, return_lse, q_tiles;
    /* Sparse plans (sparse.glsl); zero for dense ones. Window bounds: SP_UNBOUNDED
     * or the bound (clamped below 2^32 - 1), sinks clamped to seq_k. */
    uint sp_window, sp_left, sp_right, sp_sinks;
    uint sp_q_block, sp_k_block, sp_q_blocks, sp_k_blocks;
    uint sp_ptr, sp_idx, sp_stride; /* the layout in the workspace (bytes), see sparse.glsl */
    float pv_limit;                 /* 2^-pv_threshold */
    /* PREDICT: the core's regions and the backend's scratch (bytes) */
    uint sp_q_pool, sp_k_pool, sp_q_sim, sp_k_sim, sp_counts, sp_density, sp_weights, sp_keep, sp_tally;
    float sp_sim_threshold, sp_cdf_threshold, sp_topk;
    uint sp_sink_blocks, sp_recent_blocks, sp_last_q_blocks;
} P;

/* Per run: where each tensor starts in its buffer (elements; the workspace in bytes). */
layout(push_constant) uniform Run {
    uint q_off, k_off, v_off, o_off, lse_off, ws_off;
    uint arg0, arg1; /* per dispatch (the finite scan: which tensor) */
} R;

layout(constant_id = 1) const uint IN_DTYPE = DT_F16;
layout(constant_id = 2) const uint OUT_DTYPE = DT_F16;

float load_q(uint i)
{
    if (IN_DTYPE == DT_F32) return q_f32[i];
    if (IN_DTYPE == DT_F16) return float(q_f16[i]);
    return bf16_bits_to_f32(uint(q_u16[i]));
}
float load_k(uint i)
{
    if (IN_DTYPE == DT_F32) return k_f32[i];
    if (IN_DTYPE == DT_F16) return float(k_f16[i]);
    return bf16_bits_to_f32(uint(k_u16[i]));
}
float load_v(uint i)
{
    if (IN_DTYPE == DT_F32) return v_f32[i];
    if (IN_DTYPE == DT_F16) return float(v_f16[i]);
    return bf16_bits_to_f32(uint(v_u16[i]));
}

void store_o(uint i, float v)
{
    if (OUT_DTYPE == DT_F32) o_f32[i] = v;
    else if (OUT_DTYPE == DT_F16) o_f16[i] = float16_t(v);
    else o_u16[i] = uint16_t(f32_to_bf16_bits(v));
}

#define NEG_INF uintBitsToFloat(0xff800000u)
const float LN2 = 0.6931471805599453;

/* First key row i may NOT see (bottom-right causal), clamped to [0, Nk]. */
int key_end(int i, bool causal)
{
    int nk = int(P.seq_k);
    if (!causal) return nk;
    int e = i + 1 + P.causal_shift;
    return clamp(e, 0, nk);
}

/* The finite check's flag, set by finite.comp; kernels skip their outputs when set. */
bool inputs_nonfinite()
{
    return P.check_finite != 0u && ws_u32[(R.ws_off + P.ws_status) >> 2] != 0u;
}
