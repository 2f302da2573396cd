/*
 * Shared OpenCL C 1.2 helpers: input/output element access, fp16/bf16/E4M3
 * conversions that round exactly as src/numeric.h does, and a correctly
 * rounded fp32 division.
 *
 * Host-defined macros: IN_DTYPE, OUT_DTYPE (0 f32, 1 f16, 2 bf16), HAS_FP16,
 * HAS_FP64.
 */
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

#if HAS_FP16
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#endif
#if HAS_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

/* The status words of a checked run (src/internal.h, QATTN_STATUS_*): word 0
 * holds bits of the inputs with NaN or Inf, word 1 is non-zero when an index
 * or a per-head scale is out of bounds. Kernels write nothing once either is
 * set; the host names the offending entry (src/checks.c). */
#define STATUS_NONFINITE 0
#define STATUS_BOUNDS 1
#define NONFINITE_Q 1u
#define NONFINITE_K 2u
#define NONFINITE_V 4u
#define NONFINITE_NEW_KV 8u

/* Groups with max |x| below 2^-100 (and per-head scales below it) quantize to
 * zero with a zero scale: QATTN_QUANT_MIN_AMAX of src/internal.h. */
#define QUANT_MIN_AMAX 0x1p-100f

/* The status words at byte status_at of ws (>= 0 when the checks are on) are set. */
static inline bool stopped(global const uchar *ws, long status_at)
{
    global const uint *w = (global const uint *)(ws + status_at);
    return status_at >= 0 && (w[STATUS_NONFINITE] | w[STATUS_BOUNDS]) != 0u;
}

/* Inputs and outputs travel as raw bits; loads widen them to float. */
#if IN_DTYPE == DT_F32
typedef uint in_bits;
#else
typedef ushort in_bits;
#endif
#if OUT_DTYPE == DT_F32
typedef uint out_bits;
#else
typedef ushort out_bits;
#endif

/* fp16 bits to float: native half where cl_khr_fp16 exists, vload_half otherwise
 * (both exact). */
static inline float f16_load(global const ushort *p, long i)
{
#if HAS_FP16
    return convert_float(((global const half *)p)[i]);
#else
    return vload_half(i, (global const half *)p);
#endif
}

static inline float bf16_bits_to_float(ushort b) { return as_float((uint)b << 16); }

static inline float load_in(global const in_bits *p, long i)
{
#if IN_DTYPE == DT_F32
    return as_float(p[i]);
#elif IN_DTYPE == DT_F16
    return f16_load(p, i);
#else
    return bf16_bits_to_float(p[i]);
#endif
}

/* float to bf16, round to nearest even, NaN stays a quiet NaN. */
static inline ushort float_to_bf16_bits(float f)
{
    uint x = as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (ushort)((x >> 16) | 0x40u);
    return (ushort)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static inline void store_out(global out_bits *p, long i, float v)
{
#if OUT_DTYPE == DT_F32
    p[i] = as_uint(v);
#elif OUT_DTYPE == DT_F16
    vstore_half_rte(v, i, (global half *)p);
#else
    p[i] = float_to_bf16_bits(v);
#endif
}

/* The nearest fp16 value (round to nearest even), as a float. */
static inline float round_f16(float f)
{
    uint x = as_uint(f);
    uint sign = x & 0x80000000u, ax = x & 0x7fffffffu;
    if (ax >= 0x477ff000u) /* rounds to 65520 or more: overflow (and inf/nan) */
        return as_float(sign | (ax > 0x7f800000u ? x : 0x7f800000u));
    if (ax < 0x38800000u) /* below the smallest normal: multiples of 2^-24 */
        return as_float(sign | as_uint(rint(as_float(ax) * 16777216.0f) * 5.9604644775390625e-8f));
    return as_float(sign | ((ax + 0xfffu + ((ax >> 13) & 1u)) & 0xffffe000u));
}

/* FP8 E4M3 (OCP E4M3FN): round to nearest even, saturate finite values to
 * +-448, keep NaN: the same bits as qattn_f32_to_e4m3. */
static inline uchar float_to_e4m3(float f)
{
    uint x = as_uint(f);
    uint sign = (x >> 24) & 0x80u;
    float a = fabs(f);
    if (isnan(f))
        return (uchar)(sign | 0x7fu);
    if (a >= 448.0f)
        return (uchar)(sign | 0x7eu);
    if (a < 0.015625f) /* subnormal range: multiples of 2^-9 */
        return (uchar)(sign | (uint)rint(a * 512.0f));
    uint ax = as_uint(a);
    uint rounded = ax + 0x7ffffu + ((ax >> 20) & 1u);
    uint e = (rounded >> 23) - 127u + 7u;
    uint man = (rounded >> 20) & 7u;
    if (e > 15u || (e == 15u && man == 7u))
        return (uchar)(sign | 0x7eu);
    return (uchar)(sign | (e << 3) | man);
}

static inline float e4m3_to_float(uchar v)
{
    uint e = (v >> 3) & 0xfu, man = v & 7u;
    float r;
    if (e == 0xfu && man == 7u)
        r = as_float(0x7fc00000u);
    else if (e == 0u)
        r = (float)man * 0.001953125f;
    else
        r = as_float(((e + 120u) << 23) | (man << 20));
    return (v & 0x80u) ? -r : r;
}

/*
 * a / b rounded to nearest even, on the bit patterns in integer arithmetic
 * (shaders/numeric.glsl's div_rn_bits): the C reference divides in fp32,
 * correctly rounded, and every INT8/FP8 code and scale depends on the
 * quotient. OpenCL C's fp32 `/` may be off by 2.5 ulp (NVIDIA's driver uses
 * that licence unless built with -cl-fp32-correctly-rounded-divide-sqrt, an
 * optional capability), and (float)((double)a / (double)b) does not help:
 * compilers narrow it back to an fp32 division (LLVM's instcombine does;
 * PoCL's IR shows `fdiv float`). Integer arithmetic depends on neither, nor
 * on the denormal mode. Finite operands of either sign (subnormal too; the
 * quotient may be subnormal or overflow to inf); zeros, infinities and NaN
 * as IEEE has them.
 */
static inline uint div_rn_mag(uint ua, uint ub) /* magnitudes: finite, ua > 0, ub > 0 */
{
    int ea = (int)(ua >> 23), eb = (int)(ub >> 23);
    uint ma = ua & 0x7fffffu, mb = ub & 0x7fffffu;
    if (ea == 0) {
        int sh = (int)clz(ma) - 8; /* normalise a subnormal: leading one at bit 23 */
        ma <<= sh;
        ea = 1 - sh;
    } else {
        ma |= 0x800000u;
    }
    if (eb == 0) {
        int sh = (int)clz(mb) - 8;
        mb <<= sh;
        eb = 1 - sh;
    } else {
        mb |= 0x800000u;
    }
    int e = ea - eb + 127;
    if (ma < mb) {
        ma <<= 1;
        e -= 1;
    }
    /* 26 quotient bits, q in [2^25, 2^26): the value is q * 2^(e - 152) plus a sticky remainder */
    uint q = 0u, r = ma;
    for (int i = 0; i < 26; i++) {
        q <<= 1;
        if (r >= mb) {
            r -= mb;
            q |= 1u;
        }
        r <<= 1;
    }
    bool sticky = r != 0u;
    if (e >= 1) {
        uint mant = q >> 2, rest = q & 3u;
        if ((rest & 2u) != 0u && ((rest & 1u) != 0u || sticky || (mant & 1u) != 0u))
            mant += 1u;
        if (mant == 0x1000000u) {
            mant >>= 1;
            e += 1;
        }
        return e >= 255 ? 0x7f800000u : ((uint)e << 23) | (mant & 0x7fffffu);
    }
    /* subnormal: units of 2^-149 are q * 2^(e - 3) */
    uint n = (uint)(3 - e);
    if (n >= 27u)
        return 0u;
    uint kept = q >> n, rem = q & ((1u << n) - 1u), half_unit = 1u << (n - 1u);
    if ((rem & half_unit) != 0u && (sticky || (rem & (half_unit - 1u)) != 0u || (kept & 1u) != 0u))
        kept += 1u;
    return kept;
}

static inline float div_rn(float a, float b)
{
    uint sign = (as_uint(a) ^ as_uint(b)) & 0x80000000u;
    uint ua = as_uint(a) & 0x7fffffffu, ub = as_uint(b) & 0x7fffffffu;
    const uint inf = 0x7f800000u;
    uint bits;
    if (ua > inf || ub > inf || (ua == 0u && ub == 0u) || (ua == inf && ub == inf))
        return as_float(0x7fc00000u);
    if (ua == 0u || ub == inf)
        bits = 0u;
    else if (ub == 0u || ua == inf)
        bits = inf;
    else
        bits = div_rn_mag(ua, ub);
    return as_float(sign | bits);
}

/* Scale-group index of token t (qattn_quant_group_of). */
static inline int quant_group_of(int t, int block, int interleave)
{
    return (t / block) * interleave + (t % block) % interleave;
}
