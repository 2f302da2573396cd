/*
 * Scalar number formats: fp16, bf16 and FP8 E4M3 (OCP "E4M3FN": bias 7, max
 * 448, no infinities, NaN = S.1111.111) to and from fp32. Conversions to the
 * narrow formats round to nearest even; E4M3 saturates finite values to
 * +-448 (as cvt.rn.satfinite does on NVIDIA GPUs) and keeps NaN.
 */
#ifndef QATTN_NUMERIC_H
#define QATTN_NUMERIC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "qattn/qattn.h"

static inline uint32_t qattn_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float qattn_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float qattn_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) /* inf / nan */
        return qattn_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) { /* zero / subnormal: man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return qattn_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline uint16_t qattn_f32_to_f16(float f)
{
    uint32_t x = qattn_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf / nan (keep a quiet nan) */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) { /* below fp16's smallest normal: subnormal or zero */
        /* value * 2^24 rounded to an integer, nearest even. */
        float v = qattn_bits_f32(ax) * 16777216.0f;
        return (uint16_t)(sign | (uint16_t)nearbyintf(v));
    }
    uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u); /* round to nearest even at bit 13 */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

static inline float qattn_bf16_to_f32(uint16_t b) { return qattn_bits_f32((uint32_t)b << 16); }

static inline uint16_t qattn_f32_to_bf16(float f)
{
    uint32_t x = qattn_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u); /* quiet nan */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static inline float qattn_e4m3_to_f32(uint8_t v)
{
    uint32_t sign = v >> 7, exp = (v >> 3) & 0xfu, man = v & 7u;
    float r;
    if (exp == 0xf && man == 7)
        r = NAN;
    else if (exp == 0)
        r = (float)man * 0.001953125f; /* man * 2^-9 */
    else
        r = ldexpf(1.0f + (float)man / 8.0f, (int)exp - 7);
    return sign ? -r : r;
}

static inline uint8_t qattn_f32_to_e4m3(float f)
{
    uint32_t x = qattn_f32_bits(f);
    uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
    float a = fabsf(f);
    if (isnan(f))
        return (uint8_t)(sign | 0x7fu);
    if (a >= 448.0f) /* saturate (includes inf) */
        return (uint8_t)(sign | 0x7eu);
    if (a < 0.015625f) { /* subnormal range: multiples of 2^-9 */
        float q = nearbyintf(a * 512.0f); /* 0..8; 8 becomes the smallest normal */
        return (uint8_t)(sign | (uint8_t)q);
    }
    /* Normal: keep 3 mantissa bits, round to nearest even on the fp32 pattern. */
    uint32_t ax = qattn_f32_bits(a);
    uint32_t rounded = ax + 0x7ffffu + ((ax >> 20) & 1u);
    uint32_t exp = (rounded >> 23) - 127u + 7u;
    uint32_t man = (rounded >> 20) & 7u;
    if (exp > 15 || (exp == 15 && man == 7)) /* rounded past 448 */
        return (uint8_t)(sign | 0x7eu);
    return (uint8_t)(sign | (exp << 3) | man);
}

/* Rounds an fp32 value to the nearest fp16 value (as fp32). */
static inline float qattn_round_f16(float f) { return qattn_f16_to_f32(qattn_f32_to_f16(f)); }

/* Loads element i (already offset) of a f32/f16/bf16 array as fp32. */
static inline float qattn_load_f(const void *base, qattn_dtype dt, int64_t i)
{
    switch (dt) {
    case QATTN_DTYPE_F16: return qattn_f16_to_f32(((const uint16_t *)base)[i]);
    case QATTN_DTYPE_BF16: return qattn_bf16_to_f32(((const uint16_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

static inline void qattn_store_f(void *base, qattn_dtype dt, int64_t i, float v)
{
    switch (dt) {
    case QATTN_DTYPE_F16: ((uint16_t *)base)[i] = qattn_f32_to_f16(v); break;
    case QATTN_DTYPE_BF16: ((uint16_t *)base)[i] = qattn_f32_to_bf16(v); break;
    default: ((float *)base)[i] = v; break;
    }
}

#endif
