/*
 * Appending tokens to a paged KV cache (vLLM's reshape_and_cache), with the
 * quantization of backends/cpu/cpu_paged.c reproduced code for code:
 *   f16 / bf16 pages: round to nearest even;
 *   FP8 E4M3, per-head scale s:  code = e4m3_satfinite_rne(x * (1 / s));
 *   INT8, per-head scale s:      code = clamp(rne(x * (1 / s)), -127, 127);
 *   INT8, per row (token, head): amax = max |x|, scale = amax / 127 stored,
 *                                code = clamp(rne(x * (127 / amax)), -127, 127).
 * The divisions are correctly rounded fp32 results, as the CPU's, on every
 * device: common.cl's div_rn (integer arithmetic).
 *
 * Host macros: HEAD_DIM, CACHE_FMT (paged.cl's codes), IN_DTYPE (the new
 * tokens), HAS_FP16, HAS_FP64.
 */
#pragma OPENCL FP_CONTRACT OFF

#define FMT_F16 0
#define FMT_BF16 1
#define FMT_FP8 2
#define FMT_I8 3
#define FMT_I8_ROW 4

#define APPEND_WG 64
#define XN ((HEAD_DIM + APPEND_WG - 1) / APPEND_WG) /* channels per work-item */

/* One work-item per (token, head) row of k_new and v_new: NONFINITE_NEW_KV in
 * the status words when any value is NaN or Inf (an all-ones exponent). */
kernel void append_scan(global const in_bits *k_new, global const in_bits *v_new, long k_off, long v_off, long s0,
                        long s1, int heads, long rows, global uint *status)
{
    long row = get_global_id(0);
    if (row >= rows)
        return;
    long t = row / heads, h = row % heads;
    global const in_bits *kp = k_new + k_off + t * s0 + h * s1, *vp = v_new + v_off + t * s0 + h * s1;
#if IN_DTYPE == DT_F32
    const uint mask = 0x7f800000u;
#elif IN_DTYPE == DT_F16
    const uint mask = 0x7c00u;
#else
    const uint mask = 0x7f80u;
#endif
    bool bad = false;
    for (int d = 0; d < HEAD_DIM; d++)
        bad |= ((uint)kp[d] & mask) == mask || ((uint)vp[d] & mask) == mask;
    if (bad)
        atomic_or(status + STATUS_NONFINITE, NONFINITE_NEW_KV);
}

/* A work-group per (token, head, K or V) row at a time: convert or quantize it into its slot. */
kernel __attribute__((reqd_work_group_size(APPEND_WG, 1, 1))) void append_write(
    global const in_bits *k_new, global const in_bits *v_new, long k_off, long v_off, long s0, long s1,
    global const long *slots, long slot_off, long num_tokens, long capacity, int heads, int page_size,
    long page_stride, long tok_stride, long head_stride, global uchar *kc, global uchar *vc, global float *ks,
    global float *vs)
{
#if CACHE_FMT == FMT_I8_ROW
    local float red[APPEND_WG];
#endif
    const int lid = get_local_id(0);
    const long total = num_tokens * heads * 2;
    for (long w = get_group_id(0); w < total; w += get_num_groups(0)) {
        const long t = w / (2 * heads);
        const int rem = (int)(w - t * 2 * heads), h = rem >> 1, which = rem & 1;
        const long slot = slots[slot_off + t];
        /* Padding (or, unchecked, out of range): the row is read and reduced
         * like any other but not stored, so every work-item of the group meets
         * the same barriers (PoCL miscompiles a `continue` ahead of them). */
        const bool store = slot >= 0 && slot < capacity;
        const long page = store ? slot / page_size : 0, off = store ? slot - page * page_size : 0;
        global const in_bits *src = (which ? v_new + v_off : k_new + k_off) + t * s0 + (long)h * s1;
        const long dst = page * page_stride + off * tok_stride + (long)h * head_stride;
        float x[XN];
        for (int i = 0; i < XN; i++) {
            int d = lid + APPEND_WG * i;
            x[i] = d < HEAD_DIM ? load_in(src, d) : 0.0f;
        }
#if CACHE_FMT == FMT_F16 || CACHE_FMT == FMT_BF16
        global ushort *cache = (global ushort *)(which ? vc : kc);
        for (int i = 0; i < XN; i++) {
            int d = lid + APPEND_WG * i;
            if (store && d < HEAD_DIM) {
#if CACHE_FMT == FMT_F16
                vstore_half_rte(x[i], dst + d, (global half *)cache);
#else
                cache[dst + d] = float_to_bf16_bits(x[i]);
#endif
            }
        }
#else
        global float *scales = which ? vs : ks;
        float inv;
#if CACHE_FMT == FMT_I8_ROW
        float amax = 0.0f;
        for (int i = 0; i < XN; i++)
            amax = fmax(amax, fabs(x[i]));
        red[lid] = amax;
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int stride = APPEND_WG / 2; stride > 0; stride >>= 1) {
            if (lid < stride)
                red[lid] = fmax(red[lid], red[lid + stride]);
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        amax = red[0] < QUANT_MIN_AMAX ? 0.0f : red[0];
        barrier(CLK_LOCAL_MEM_FENCE); /* red is reused by the next row */
        if (store && lid == 0)
            scales[(page * page_size + off) * heads + h] = div_rn(amax, 127.0f);
        inv = amax > 0.0f ? div_rn(127.0f, amax) : 0.0f;
#else
        const float s = scales[h];
        inv = s >= QUANT_MIN_AMAX ? div_rn(1.0f, s) : 0.0f; /* below the floor (or not > 0): zeros */
#endif
        global uchar *cache = which ? vc : kc;
        for (int i = 0; i < XN; i++) {
            int d = lid + APPEND_WG * i;
            if (store && d < HEAD_DIM) {
                float y = x[i] * inv;
#if CACHE_FMT == FMT_FP8
                cache[dst + d] = float_to_e4m3(y);
#else
                cache[dst + d] = (uchar)(char)(int)fmin(fmax(rint(y), -127.0f), 127.0f); /* NaN: -127 */
#endif
            }
        }
#endif
    }
}

/*
 * Page metadata (QATTN_PRUNE_CAP_META), enqueued after append_write: for every
 * page the append wrote and every KV head, the channel-wise min and max of the
 * page's dequantized keys over all page_size slots, as src/prune.c's
 * qattn_kv_meta_update_host has them: NaN never wins (strict compares, slots
 * in order, so the first of equal values is kept); f16/bf16 store the min/max
 * element's own bits, FP8 and INT8 per-head its code; INT8 per row stores
 * codes against the page's largest row scale, rounded outward (floor for the
 * min, ceil for the max, clamped to [-127, 127]) and that scale as fp32 at
 * byte scale_off of meta, index page * heads + h. Layout [pages][heads][2][D].
 *
 * One work-item per (token, head, channel), grid-stride; no local memory and no
 * barriers. Token t recomputes its page only when it is the first of a run of
 * tokens in that page (t == 0, or token t-1 skipped or in another page);
 * pages written by non-adjacent tokens are recomputed more than once with the
 * same values. Slots that are negative or out of range are skipped.
 */
static inline float meta_cache_value(global const uchar *kc, long at)
{
#if CACHE_FMT == FMT_F16
    return vload_half(at, (global const half *)kc);
#elif CACHE_FMT == FMT_BF16
    return bf16_bits_to_float(((global const ushort *)kc)[at]);
#elif CACHE_FMT == FMT_FP8
    return e4m3_to_float(kc[at]);
#else
    return (float)(char)kc[at];
#endif
}

kernel void append_meta(global const long *slots, long slot_off, long num_tokens, long capacity, int heads,
                        int page_size, long page_stride, long tok_stride, long head_stride, global const uchar *kc,
                        global const float *ks, global uchar *meta, long scale_off)
{
    const long total = num_tokens * heads * HEAD_DIM;
    for (long w = get_global_id(0); w < total; w += get_global_size(0)) {
        const long t = w / ((long)heads * HEAD_DIM);
        const int rem = (int)(w - t * heads * HEAD_DIM), h = rem / HEAD_DIM, d = rem - h * HEAD_DIM;
        const long slot = slots[slot_off + t];
        if (slot < 0 || slot >= capacity)
            continue;
        const long page = slot / page_size;
        if (t > 0) {
            const long prev = slots[slot_off + t - 1];
            if (prev >= 0 && prev < capacity && prev / page_size == page)
                continue; /* the run's first token does this page */
        }
        const long base = page * page_stride + (long)h * head_stride + d;
#if CACHE_FMT == FMT_I8_ROW
        float row_scale_max = 0.0f;
        for (int s = 0; s < page_size; s++) {
            float sc = ks[(page * page_size + s) * heads + h];
            if (sc > row_scale_max) /* NaN (stale) never wins */
                row_scale_max = sc;
        }
#endif
        float lo = INFINITY, hi = -INFINITY;
        long lo_at = base, hi_at = base;
        for (int s = 0; s < page_size; s++) {
            const long at = base + s * tok_stride;
#if CACHE_FMT == FMT_I8_ROW
            float x = meta_cache_value(kc, at) * ks[(page * page_size + s) * heads + h];
#else
            float x = meta_cache_value(kc, at);
#endif
            if (x < lo) {
                lo = x;
                lo_at = at;
            }
            if (x > hi) {
                hi = x;
                hi_at = at;
            }
        }
        const long row = (page * heads + h) * 2 * HEAD_DIM; /* element index of the min row */
#if CACHE_FMT == FMT_F16 || CACHE_FMT == FMT_BF16
        global const ushort *k16 = (global const ushort *)kc;
        global ushort *m16 = (global ushort *)meta;
        m16[row + d] = k16[lo_at];
        m16[row + HEAD_DIM + d] = k16[hi_at];
#elif CACHE_FMT == FMT_FP8 || CACHE_FMT == FMT_I8
        meta[row + d] = kc[lo_at];
        meta[row + HEAD_DIM + d] = kc[hi_at];
#else
        const float inv = row_scale_max > 0.0f ? div_rn(1.0f, row_scale_max) : 0.0f;
        const float l = lo == INFINITY ? 0.0f : floor(lo * inv), u = hi == -INFINITY ? 0.0f : ceil(hi * inv);
        meta[row + d] = (uchar)(char)(int)fmin(fmax(l, -127.0f), 127.0f);
        meta[row + HEAD_DIM + d] = (uchar)(char)(int)fmin(fmax(u, -127.0f), 127.0f);
        if (d == 0)
            ((global float *)(meta + scale_off))[page * heads + h] = row_scale_max;
#endif
    }
}
