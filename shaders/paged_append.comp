#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * qattn_kv_append (vLLM's reshape_and_cache): new tokens into their cache
 * slots, converted or quantized exactly as backends/cpu does it, bit for bit.
 * Two kernels from this source:
 *
 * CHECK (-DCHECK): everything the append could reject, before anything is
 *   written, as flags in the status words (src/internal.h, QATTN_STATUS_*):
 *   work groups [0, A.dup_groups) take 256 tokens each and flag word 1 for a
 *   slot past the cache or given twice (comparing each token with every later
 *   one through shared memory); the other groups scan the new values for
 *   NaN/Inf (word 0, QATTN_NONFINITE_NEW_KV) and the first of them the
 *   per-head scales (word 1: a scale that is not finite and > 0). The host
 *   names the offending entry from copies (src/checks.c).
 * WRITE: one work group per (token, head, K or V) row at a time; nothing
 *   when the check's status words are set. FP8: code = e4m3(x * (1 / scale)),
 *   INT8 per head: rne(x * (1 / scale)) clamped to +-127, INT8 per row:
 *   amax over the row, scale = amax / 127, code = rne(x * (127 / amax)). The
 *   divisions are correctly rounded, as in C; f16/bf16 pages round to
 *   nearest even in integer arithmetic.
 *
 * Bindings: 0 k_new, 12 v_new (f32/f16/bf16), 8 slot_mapping (int64 as two
 * words), 1 k cache, 2 v cache, 3 k scales, 4 v scales, 7 status words.
 */
#extension GL_EXT_shader_16bit_storage : require
#include "numeric.glsl"
#include "status.glsl"

#ifdef CHECK
#define WG 256u
#else
#define WG 64u
#endif
layout(local_size_x = WG) in;

layout(constant_id = 0) const uint NEW_DTYPE = 0; /* 0 f32, 1 f16, 2 bf16 */
layout(constant_id = 1) const uint FMT = 0;       /* 0 f16, 1 bf16, 2 fp8, 3 int8 per head, 4 int8 per row */

layout(std430, set = 0, binding = 0) readonly buffer KN32 { uint kn_u32[]; };
layout(std430, set = 0, binding = 0) readonly buffer KN16 { uint16_t kn_u16[]; };
layout(std430, set = 0, binding = 12) readonly buffer VN32 { uint vn_u32[]; };
layout(std430, set = 0, binding = 12) readonly buffer VN16 { uint16_t vn_u16[]; };
layout(std430, set = 0, binding = 8) readonly buffer Slots { uint slot_words[]; };
layout(std430, set = 0, binding = 1) buffer KC32 { uint kc_u32[]; };
layout(std430, set = 0, binding = 1) buffer KC16 { uint16_t kc_u16[]; };
layout(std430, set = 0, binding = 2) buffer VC32 { uint vc_u32[]; };
layout(std430, set = 0, binding = 2) buffer VC16 { uint16_t vc_u16[]; };
layout(std430, set = 0, binding = 3) buffer KS { uint ks_bits[]; };
layout(std430, set = 0, binding = 4) buffer VS { uint vs_bits[]; };
layout(std430, set = 0, binding = 7) buffer Status { uint status[]; };

#define APPEND_CHECK 1u /* the check ran: write nothing when it found a problem */
#define APPEND_HND 2u

layout(push_constant) uniform AppendArgs {
    uint k_off, v_off, slot_off, num_tokens; /* elements of k_new / v_new; words of slot_mapping */
    uint heads, head_dim, page_size, capacity;
    uint s0, s1, flags, dup_groups;
} A;

const uint NONE = 0xffffffffu; /* never a valid slot: the cache has fewer than 2^32 - 4 */

/* Slot of token t, or NONE for padding (negative) and capacity for any slot past the cache. */
uint slot_of(uint t)
{
    uint lo = slot_words[A.slot_off + 2u * t], hi = slot_words[A.slot_off + 2u * t + 1u];
    if ((hi & 0x80000000u) != 0u)
        return NONE;
    return hi != 0u || lo >= A.capacity ? A.capacity : lo;
}

/* fp32 bits of element i of k_new (which = 0) or v_new (1). */
uint new_bits(uint which, uint i)
{
    if (NEW_DTYPE == 0u)
        return which == 0u ? kn_u32[i] : vn_u32[i];
    uint h = which == 0u ? uint(kn_u16[i]) : uint(vn_u16[i]);
    return NEW_DTYPE == 1u ? f16_bits_to_f32_bits(h) : h << 16;
}

bool finite_bits(uint x) { return (x & 0x7f800000u) != 0x7f800000u; }
bool scale_ok(uint x) { return (x & 0x80000000u) == 0u && x >= QUANT_MIN_AMAX_BITS && finite_bits(x); }

#ifdef CHECK

shared uint others[WG];

void main()
{
    const uint tid = gl_LocalInvocationID.x;
    const uint group = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    if (group < A.dup_groups) {
        const uint t = group * WG + tid;
        const uint slot = t < A.num_tokens ? slot_of(t) : NONE;
        if (slot == A.capacity)
            atomicOr(status[STATUS_BOUNDS], 1u);
        const bool mine = slot < A.capacity;
        bool dup = false;
        for (uint g = group; g < A.dup_groups; g++) {
            barrier();
            uint j = g * WG + tid;
            uint other = j < A.num_tokens ? slot_of(j) : NONE;
            others[tid] = other < A.capacity ? other : NONE;
            barrier();
            if (mine && !dup)
                for (uint k = g == group ? tid + 1u : 0u; k < WG; k++)
                    if (others[k] == slot) {
                        dup = true;
                        break;
                    }
        }
        if (dup)
            atomicOr(status[STATUS_BOUNDS], 1u);
        return;
    }
    const uint per_token = A.heads * A.head_dim, n = A.num_tokens * per_token;
    bool bad = false;
    for (uint e = (group - A.dup_groups) * WG + tid; e < n; e += (groups - A.dup_groups) * WG) {
        uint t = e / per_token, rest = e % per_token, h = rest / A.head_dim, d = rest % A.head_dim;
        uint rel = t * A.s0 + h * A.s1 + d;
        bad = bad || !finite_bits(new_bits(0u, A.k_off + rel)) || !finite_bits(new_bits(1u, A.v_off + rel));
    }
    if (bad)
        atomicOr(status[STATUS_NONFINITE], NONFINITE_NEW_KV);
    if (group == A.dup_groups && (FMT == 2u || FMT == 3u)) {
        bool scale_bad = false;
        for (uint h = tid; h < A.heads; h += WG)
            scale_bad = scale_bad || !scale_ok(ks_bits[h]) || !scale_ok(vs_bits[h]);
        if (scale_bad)
            atomicOr(status[STATUS_BOUNDS], 1u);
    }
}

#else

shared uint red[WG];

void main()
{
    if ((A.flags & APPEND_CHECK) != 0u && (status[STATUS_NONFINITE] | status[STATUS_BOUNDS]) != 0u)
        return;
    const uint tid = gl_LocalInvocationID.x;
    const uint H = A.heads, D = A.head_dim, P = A.page_size;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    const uint rows = A.num_tokens * H * 2u; /* < 2^32: checked on the host */
    for (uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; row < rows; row += groups) {
        const uint t = row / (2u * H), rem = row % (2u * H), h = rem >> 1, which = rem & 1u;
        const uint slot = slot_of(t);
        if (slot >= A.capacity)
            continue; /* padding (or, unchecked, past the cache): uniform over the group */
        const uint page = slot / P, off = slot % P;
        const uint within = (A.flags & APPEND_HND) != 0u ? h * P + off : off * H + h;
        const uint dst = (page * P * H + within) * D; /* element index in the cache */
        const uint src = (which == 0u ? A.k_off : A.v_off) + t * A.s0 + h * A.s1;
        if (FMT <= 1u) {
            for (uint d = tid; d < D; d += WG) {
                uint x = new_bits(which, src + d);
                uint code = FMT == 0u ? f32_bits_to_f16_bits(x) : f32_bits_to_bf16_bits(x);
                if (which == 0u) kc_u16[dst + d] = uint16_t(code);
                else vc_u16[dst + d] = uint16_t(code);
            }
            continue;
        }
        uint inv_bits;
        if (FMT == 4u) {
            /* amax as fmaxf over |x| does it: NaN ignored; ordered as integers. */
            uint amax = 0u;
            for (uint d = tid; d < D; d += WG) {
                uint ax = new_bits(which, src + d) & 0x7fffffffu;
                if (ax <= 0x7f800000u)
                    amax = max(amax, ax);
            }
            barrier(); /* the previous row's reduction is read */
            red[tid] = amax;
            barrier();
            for (uint n = WG / 2u; n > 0u; n >>= 1) {
                if (tid < n)
                    red[tid] = max(red[tid], red[tid + n]);
                barrier();
            }
            amax = red[0] < QUANT_MIN_AMAX_BITS ? 0u : red[0];
            const uint c127 = 0x42fe0000u; /* 127.0 */
            bool inf = amax == 0x7f800000u;
            if (tid == 0u) {
                uint scale = inf ? amax : div_rn_bits(amax, c127);
                uint at = (page * P + off) * H + h;
                if (which == 0u) ks_bits[at] = scale;
                else vs_bits[at] = scale;
            }
            inv_bits = amax == 0u || inf ? 0u : div_rn_bits(c127, amax);
        } else {
            uint s = which == 0u ? ks_bits[h] : vs_bits[h];
            /* 1 / scale for scale >= 2^-100 (1 / inf = 0); anything else gives 0, as on the cpu */
            bool positive = (s & 0x80000000u) == 0u && s >= QUANT_MIN_AMAX_BITS && s <= 0x7f800000u;
            inv_bits = positive && s != 0x7f800000u ? div_rn_bits(0x3f800000u, s) : 0u;
        }
        const float inv = uintBitsToFloat(inv_bits);
        for (uint w = tid; w < D / 4u; w += WG) {
            uint word = 0u;
            for (uint c = 0u; c < 4u; c++) {
                precise float y = uintBitsToFloat(new_bits(which, src + 4u * w + c)) * inv;
                uint code;
                if (FMT == 2u) {
                    code = f32_bits_to_e4m3(floatBitsToUint(y));
                } else {
                    float r = isnan(y) ? -127.0 : clamp(roundEven(y), -127.0, 127.0); /* NaN: -127, as the CPU */
                    code = uint(int(r)) & 0xffu;
                }
                word |= code << (8u * c);
            }
            if (which == 0u) kc_u32[dst / 4u + w] = word;
            else vc_u32[dst / 4u + w] = word;
        }
    }
}

#endif
