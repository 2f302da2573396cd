/*
 * Exact number-format conversions in integer arithmetic, bit for bit those of
 * src/numeric.h, so no driver setting (denormal flushing, fast math, the
 * rounding of float16_t()) can change a stored value. No bindings: any
 * shader may include this.
 */
#ifndef QATTN_NUMERIC_GLSL
#define QATTN_NUMERIC_GLSL

/* Groups with max |x| below 2^-100 (and per-head scales below it) quantize to
 * zero with a zero scale: QATTN_QUANT_MIN_AMAX of src/internal.h, as bits
 * (positive floats order as their bits). */
const uint QUANT_MIN_AMAX_BITS = 0x0d800000u;

float bf16_bits_to_f32(uint b) { return uintBitsToFloat(b << 16); }

/* fp32 -> bf16 bits, round to nearest even, NaN kept quiet (as src/numeric.h). */
uint f32_bits_to_bf16_bits(uint x)
{
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (x >> 16) | 0x40u;
    return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
}
uint f32_to_bf16_bits(float f) { return f32_bits_to_bf16_bits(floatBitsToUint(f)); }

/* fp32 -> fp16 bits, round to nearest even in integer arithmetic, so every
 * driver agrees with qattn_f32_to_f16 bit for bit. */
uint f32_bits_to_f16_bits(uint x)
{
    uint sign = (x >> 16) & 0x8000u;
    uint ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
        return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u);
    if (ax >= 0x477ff000u)
        return sign | 0x7c00u;
    if (ax < 0x38800000u) {
        /* subnormal or zero: the value in units of 2^-24, rounded to nearest even */
        if (ax < 0x33000000u) /* below 2^-25: rounds to zero (2^-25 itself ties to 0) */
            return sign;
        uint e = ax >> 23;             /* 102..112 */
        uint m = (ax & 0x7fffffu) | 0x800000u;
        uint shift = 126u - e;         /* value * 2^24 = m * 2^(e - 150 + 24) */
        uint q = m >> shift;
        uint rem = m & ((1u << shift) - 1u);
        uint half_ = 1u << (shift - 1u);
        if (rem > half_ || (rem == half_ && (q & 1u) != 0u))
            q += 1u;
        return sign | q;
    }
    uint rounded = ax + 0xfffu + ((ax >> 13) & 1u);
    return sign | ((rounded - 0x38000000u) >> 13);
}
uint f32_to_f16_bits(float f) { return f32_bits_to_f16_bits(floatBitsToUint(f)); }

/* fp16 bits -> fp32 bits, exact (subnormal halves become normal floats). */
uint f16_bits_to_f32_bits(uint h)
{
    uint sign = (h & 0x8000u) << 16;
    uint e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu)
        return sign | 0x7f800000u | (m << 13);
    if (e == 0u) {
        if (m == 0u)
            return sign;
        int s = 10 - findMSB(m); /* normalize: the leading one to bit 10 */
        return sign | (uint(113 - s) << 23) | (((m << uint(s)) & 0x3ffu) << 13);
    }
    return sign | ((e + 112u) << 23) | (m << 13);
}

/* FP8 E4M3 ("E4M3FN": bias 7, max 448, NaN = S.1111.111) code -> fp32. */
float e4m3_to_f32(uint c)
{
    uint e = (c >> 3) & 15u, m = c & 7u;
    float mag = e == 0u ? float(m) * 0.001953125 : uintBitsToFloat(((e + 120u) << 23) | (m << 20));
    if ((c & 0x7fu) == 0x7fu)
        mag = uintBitsToFloat(0x7fc00000u);
    return (c & 0x80u) != 0u ? -mag : mag;
}

/* fp32 bits -> E4M3 code: round to nearest even, saturate finite values (and
 * infinities) to +-448, keep NaN; exactly qattn_f32_to_e4m3. */
uint f32_bits_to_e4m3(uint x)
{
    uint sign = (x >> 24) & 0x80u;
    uint ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u)
        return sign | 0x7fu;
    if (ax >= 0x43e00000u) /* >= 448 */
        return sign | 0x7eu;
    if (ax < 0x3c800000u) { /* below 2^-6: multiples of 2^-9, 0..8 (8 is the smallest normal) */
        if (ax < 0x3a800000u) /* below 2^-10: rounds to zero (2^-10 itself ties to 0) */
            return sign;
        uint e = ax >> 23;             /* 117..120 */
        uint m = (ax & 0x7fffffu) | 0x800000u;
        uint shift = 141u - e;         /* value * 2^9 = m * 2^(e - 150 + 9) */
        uint q = m >> shift;
        uint rem = m & ((1u << shift) - 1u);
        uint half_ = 1u << (shift - 1u);
        if (rem > half_ || (rem == half_ && (q & 1u) != 0u))
            q += 1u;
        return sign | q;
    }
    uint rounded = ax + 0x7ffffu + ((ax >> 20) & 1u);
    uint e = (rounded >> 23) - 120u;
    uint m = (rounded >> 20) & 7u;
    if (e > 15u || (e == 15u && m == 7u))
        return sign | 0x7eu;
    return sign | (e << 3) | m;
}

/*
 * a / b correctly rounded (nearest even), on bit patterns, in integer
 * arithmetic: GPUs may divide with 2.5 ulp of error, and the reference
 * quantizers divide in C. a >= 0 and b > 0, both finite (either may be
 * subnormal); the quotient may be subnormal or overflow to +inf.
 */
uint div_rn_bits(uint ua, uint ub)
{
    if ((ua & 0x7fffffffu) == 0u)
        return 0u;
    int ea = int(ua >> 23), eb = int(ub >> 23);
    uint ma = ua & 0x7fffffu, mb = ub & 0x7fffffu;
    if (ea == 0) { int s = 23 - findMSB(ma); ma <<= uint(s); ea = 1 - s; } else ma |= 0x800000u;
    if (eb == 0) { int s = 23 - findMSB(mb); mb <<= uint(s); eb = 1 - s; } else mb |= 0x800000u;
    int e = ea - eb + 127;
    if (ma < mb) { ma <<= 1; e -= 1; }
    /* 26 quotient bits, q in [2^25, 2^26): the value is q * 2^(e - 152) plus a sticky remainder */
    uint q = 0u, r = ma;
    for (int i = 0; i < 26; i++) {
        q <<= 1;
        if (r >= mb) { r -= mb; q |= 1u; }
        r <<= 1;
    }
    bool sticky = r != 0u;
    if (e >= 1) {
        uint mant = q >> 2, rest = q & 3u;
        if ((rest & 2u) != 0u && ((rest & 1u) != 0u || sticky || (mant & 1u) != 0u))
            mant += 1u;
        if (mant == 0x1000000u) { mant >>= 1; e += 1; }
        if (e >= 255)
            return 0x7f800000u;
        return (uint(e) << 23) | (mant & 0x7fffffu);
    }
    /* subnormal: units of 2^-149 are q * 2^(e - 3) */
    uint n = uint(3 - e);
    if (n >= 27u)
        return 0u;
    uint kept = q >> n, rem = q & ((1u << n) - 1u), half_ = 1u << (n - 1u);
    if ((rem & half_) != 0u && (sticky || (rem & (half_ - 1u)) != 0u || (kept & 1u) != 0u))
        kept += 1u;
    return kept;
}

#endif
