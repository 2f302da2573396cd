/*
 * The device primitives every CUDA kernel of the backend uses (dense, paged,
 * quantization), in two builds of one source:
 *   - nvcc: inline PTX (ldmatrix, mma.sync, cp.async, cvt, ex2, prmt).
 *   - QA_EMULATE (a host C++ compiler): the same operations on the CPU
 *     emulator of the CUDA execution model (emu/cuda_emu.hpp: one fiber per
 *     GPU thread, the PTX ISA's fragment layouts), which the test-only
 *     backend `cuda-emu` runs, so CI checks the kernels without a GPU.
 * Kernels call only what is here, so both builds run the same kernel source.
 *
 * Everything lives in namespace qa, inside an inline namespace that differs
 * between the two builds (QA_NAMESPACE_BEGIN): a test program links both, and
 * the emulated kernels must not share symbols with nvcc's host stubs.
 */
#ifndef QA_CUDA_DEVICE_CUH
#define QA_CUDA_DEVICE_CUH

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#if defined(QA_EMULATE)
#include <algorithm>

#include "emu/cuda_emu.hpp"
extern "C" {
#include "numeric.h"
}
#define QA_DEV inline
#define QA_HOSTDEV inline
#define QA_KERNEL(threads) inline void
#define QA_UNROLL
#define QA_UNROLL_1
#define QA_RESTRICT
#define QA_GRID_CONSTANT
#define QA_NAMESPACE_BEGIN                                                                                             \
    namespace qa {                                                                                                     \
    inline namespace emulated {
using std::max;
using std::min;
struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QA_DEV __device__ __forceinline__
#define QA_HOSTDEV __host__ __device__ __forceinline__
#define QA_KERNEL(threads) __global__ void __launch_bounds__(threads)
#define QA_RESTRICT __restrict__
#define QA_GRID_CONSTANT __grid_constant__
#define QA_UNROLL _Pragma("unroll")
#define QA_UNROLL_1 _Pragma("unroll 1")
#define QA_NAMESPACE_BEGIN                                                                                             \
    namespace qa {                                                                                                     \
    inline namespace device {
#endif
#define QA_NAMESPACE_END                                                                                               \
    }                                                                                                                  \
    }

QA_NAMESPACE_BEGIN

/* ------------------------------------------------------------ thread ids */

#if defined(QA_EMULATE)
QA_DEV int tid() { return emu::thread_index(); }
QA_DEV int block_x() { return emu::block_index(); }
QA_DEV int grid_x() { return emu::block_count(); }
QA_DEV void sync_block() { emu::sync_block(); }
QA_DEV uint8_t *dynamic_smem() { return emu::shared_base(); }
#else
QA_DEV int tid() { return (int)threadIdx.x; }
QA_DEV int block_x() { return (int)blockIdx.x; }
QA_DEV int grid_x() { return (int)gridDim.x; }
QA_DEV void sync_block() { __syncthreads(); }
QA_DEV uint8_t *dynamic_smem()
{
    extern __shared__ __align__(128) uint8_t qa_smem[];
    return qa_smem;
}
#endif
QA_DEV int lane_id() { return tid() & 31; }
QA_DEV int warp_id() { return tid() >> 5; }

/* ------------------------------------------------------------- scalars */

QA_HOSTDEV uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
QA_HOSTDEV float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}
QA_HOSTDEV float inf_f32() { return bits_float(0x7f800000u); }
/* Not NaN and not +-Inf, by the exponent bits: immune to fast-math. */
QA_DEV bool is_finite(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }
template <typename T> QA_HOSTDEV T clamp(T x, T lo, T hi) { return x < lo ? lo : x > hi ? hi : x; }

#if defined(QA_EMULATE)
QA_DEV float ex2(float x) { return exp2f(x); }
QA_DEV float lg2(float x) { return log2f(x); }
QA_DEV uint32_t shfl_xor(uint32_t v, int mask) { return emu::shfl_xor(v, mask); }
QA_DEV uint32_t shfl_idx(uint32_t v, int src_lane) { return emu::shfl_idx(v, src_lane); }
QA_DEV float fmax_(float a, float b) { return fmaxf(a, b); }
QA_DEV void atomic_or(uint32_t *p, uint32_t v) { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
QA_DEV uint32_t load_volatile(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
QA_DEV uint32_t umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
QA_DEV int32_t load_early(const int32_t *p) { return *p; }
/* Byte permute (PTX prmt, default mode): byte i of the result is byte sel[i] of {b:a}. */
QA_DEV uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel)
{
    const uint64_t both = (uint64_t)a | ((uint64_t)b << 32);
    uint32_t r = 0;
    for (int i = 0; i < 4; i++)
        r |= (uint32_t)((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
#else
/* 2^x and log2(x) with MUFU (relative error ~2^-22); ex2(-inf) = +0, which masked entries rely on. */
QA_DEV float ex2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
QA_DEV float lg2(float x)
{
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
QA_DEV uint32_t shfl_xor(uint32_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
QA_DEV uint32_t shfl_idx(uint32_t v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
QA_DEV float fmax_(float a, float b) { return fmaxf(a, b); }
QA_DEV void atomic_or(uint32_t *p, uint32_t v) { atomicOr((unsigned int *)p, v); }
QA_DEV uint32_t load_volatile(const uint32_t *p) { return *(const volatile uint32_t *)p; }
QA_DEV uint32_t umulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
/* A read-only 32-bit load kept where it is written: volatile, so the compiler
 * neither sinks it to its first use nor merges it into that use's branch (the
 * page ids of the next tile load while this tile computes). */
QA_DEV int32_t load_early(const int32_t *p)
{
    int32_t v;
    asm volatile("ld.global.nc.s32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}
QA_DEV uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) { return __byte_perm(a, b, sel); }
#endif
#if defined(QA_EMULATE)
QA_DEV float shfl_xor(float v, int mask) { return bits_float(shfl_xor(float_bits(v), mask)); }
QA_DEV float shfl_idx(float v, int src_lane) { return bits_float(shfl_idx(float_bits(v), src_lane)); }
QA_DEV bool warp_any(bool v)
{
    uint32_t x = v ? 1u : 0u;
    for (int mask = 1; mask < 32; mask <<= 1)
        x |= shfl_xor(x, mask);
    return x != 0;
}
#else
QA_DEV float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
QA_DEV float shfl_idx(float v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
QA_DEV bool warp_any(bool v) { return __any_sync(0xffffffffu, v) != 0; }
#endif

/* ----------------------------------------------------- number formats */

/* Packs two floats as fp16x2 / bf16x2 (lo in the low half), round to nearest even. */
QA_DEV uint32_t pack_f16x2(float lo, float hi);
QA_DEV uint32_t pack_bf16x2(float lo, float hi);
/* Four floats to E4M3 (satfinite, RNE), a in the lowest byte. */
QA_DEV uint32_t pack_e4m3x4(float a, float b, float c, float d);
QA_DEV float f16_lo(uint32_t v);
QA_DEV float f16_hi(uint32_t v);

#if defined(QA_EMULATE)
QA_DEV uint32_t pack_f16x2(float lo, float hi)
{
    return (uint32_t)qattn_f32_to_f16(lo) | ((uint32_t)qattn_f32_to_f16(hi) << 16);
}
QA_DEV uint32_t pack_bf16x2(float lo, float hi)
{
    return (uint32_t)qattn_f32_to_bf16(lo) | ((uint32_t)qattn_f32_to_bf16(hi) << 16);
}
QA_DEV uint8_t e4m3(float a) { return qattn_f32_to_e4m3(a); }
QA_DEV uint32_t pack_e4m3x4(float a, float b, float c, float d)
{
    return (uint32_t)e4m3(a) | ((uint32_t)e4m3(b) << 8) | ((uint32_t)e4m3(c) << 16) | ((uint32_t)e4m3(d) << 24);
}
/* Two E4M3 codes (low byte first) to fp16x2; exact (E4M3 is a subset of fp16). */
QA_DEV uint32_t e4m3x2_to_f16x2(uint32_t two)
{
    return (uint32_t)qattn_f32_to_f16(qattn_e4m3_to_f32((uint8_t)(two & 0xffu))) |
           ((uint32_t)qattn_f32_to_f16(qattn_e4m3_to_f32((uint8_t)((two >> 8) & 0xffu))) << 16);
}
/* lo, hi rounded to E4M3 (satfinite, RNE), returned as fp16x2. */
QA_DEV uint32_t pack_e4m3_as_f16x2(float lo, float hi)
{
    return e4m3x2_to_f16x2((uint32_t)qattn_f32_to_e4m3(lo) | ((uint32_t)qattn_f32_to_e4m3(hi) << 8));
}
QA_DEV float f16_lo(uint32_t v) { return qattn_f16_to_f32((uint16_t)(v & 0xffffu)); }
QA_DEV float f16_hi(uint32_t v) { return qattn_f16_to_f32((uint16_t)(v >> 16)); }
QA_DEV uint16_t f16_bits(float x) { return qattn_f32_to_f16(x); }
QA_DEV uint16_t bf16_bits(float x) { return qattn_f32_to_bf16(x); }
QA_DEV float f16_to_f32(uint16_t h) { return qattn_f16_to_f32(h); }
/* a - b on f16 pairs (rounded as the hardware does). */
QA_DEV uint32_t hsub2(uint32_t a, uint32_t b)
{
    uint32_t lo = qattn_f32_to_f16(qattn_f16_to_f32((uint16_t)a) - qattn_f16_to_f32((uint16_t)b));
    uint32_t hi = qattn_f32_to_f16(qattn_f16_to_f32((uint16_t)(a >> 16)) - qattn_f16_to_f32((uint16_t)(b >> 16)));
    return lo | (hi << 16);
}
#else
QA_DEV uint32_t pack_f16x2(float lo, float hi)
{
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
QA_DEV uint32_t pack_bf16x2(float lo, float hi)
{
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
/* E4M3 in software, bit-exact with src/numeric.h (used where no cvt exists: sm80). */
QA_DEV uint32_t e4m3_soft(float f)
{
    uint32_t x = __float_as_uint(f);
    uint32_t sign = (x >> 24) & 0x80u;
    float a = fabsf(f);
    if (a != a)
        return sign | 0x7fu;
    if (a >= 448.0f)
        return sign | 0x7eu;
    if (a < 0.015625f)
        return sign | (uint32_t)__float2int_rn(a * 512.0f);
    uint32_t ax = __float_as_uint(a);
    uint32_t rounded = ax + 0x7ffffu + ((ax >> 20) & 1u);
    uint32_t exp = (rounded >> 23) - 127u + 7u;
    uint32_t man = (rounded >> 20) & 7u;
    if (exp > 15 || (exp == 15 && man == 7))
        return sign | 0x7eu;
    return sign | (exp << 3) | man;
}
QA_DEV uint32_t pack_e4m3x4(float a, float b, float c, float d)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
    return (uint32_t)lo | ((uint32_t)hi << 16);
#else
    return e4m3_soft(a) | (e4m3_soft(b) << 8) | (e4m3_soft(c) << 16) | (e4m3_soft(d) << 24);
#endif
}
/* One float to E4M3, round to nearest even, finite values saturate to +-448 (NaN stays NaN). */
QA_DEV uint8_t e4m3(float a)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short d;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(d) : "f"(0.f), "f"(a));
    return (uint8_t)d;
#else
    return (uint8_t)e4m3_soft(a);
#endif
}
/* Two E4M3 codes (low byte first) to fp16x2; exact (E4M3 is a subset of fp16). */
QA_DEV uint32_t e4m3x2_to_f16x2(uint32_t two)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint32_t r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"((uint16_t)(two & 0xffffu)));
    return r;
#else
    /* Sign to bit 15, exponent and mantissa to bits 7..13: the f16 with the
     * same bits is the value times 2^-8 (subnormals included); scale back exactly. */
    uint32_t w = __byte_perm(two, 0, 0x4140);
    uint32_t h = ((w & 0x00800080u) << 8) | ((w & 0x007f007fu) << 7);
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(h), "r"(0x5c005c00u));
    return d;
#endif
}
/* lo, hi rounded to E4M3 (satfinite, RNE), returned as fp16x2. */
QA_DEV uint32_t pack_e4m3_as_f16x2(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t e;
    uint32_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(e) : "f"(hi), "f"(lo));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(e));
    return r;
#else
    return e4m3x2_to_f16x2(e4m3_soft(lo) | (e4m3_soft(hi) << 8));
#endif
}
QA_DEV float f16_lo(uint32_t v) { return __half2float(__ushort_as_half((unsigned short)(v & 0xffffu))); }
QA_DEV float f16_hi(uint32_t v) { return __half2float(__ushort_as_half((unsigned short)(v >> 16))); }
QA_DEV uint16_t f16_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
QA_DEV uint16_t bf16_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
QA_DEV float f16_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
/* a - b on f16 pairs. */
QA_DEV uint32_t hsub2(uint32_t a, uint32_t b)
{
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
#endif
/* bf16 widens to fp32 exactly: its bits are the top half. */
QA_DEV float bf16_to_f32(uint16_t h) { return bits_float((uint32_t)h << 16); }

/* --------------------------------------------------- async copies, ldmatrix */

#if defined(QA_EMULATE)
/* 16 (or 4) bytes global -> shared; when !valid nothing is read and the bytes are zero-filled. */
QA_DEV void cp_async16(void *smem, const void *gmem, bool valid) { emu::cp_async(smem, gmem, 16, valid ? 16 : 0); }
QA_DEV void cp_async4(void *smem, const void *gmem, bool valid) { emu::cp_async(smem, gmem, 4, valid ? 4 : 0); }
QA_DEV void cp_async_commit() { emu::cp_commit(); }
template <int N> QA_DEV void cp_async_wait() { emu::cp_wait(N); }
/* Shared-memory addresses: 32-bit on the GPU, host addresses in the emulator. */
using saddr = uintptr_t;
QA_DEV saddr smem_addr(const void *p) { return (uintptr_t)p; }
QA_DEV saddr opaque(saddr a) { return a; }
QA_DEV const uint8_t *opaque_ptr(const uint8_t *p) { return p; }
QA_DEV void ldsm_x4(uint32_t r[4], saddr row) { emu::ldmatrix_x4(r, (const void *)row, false); }
QA_DEV void ldsm_x4_t(uint32_t r[4], saddr row) { emu::ldmatrix_x4(r, (const void *)row, true); }
#else
QA_DEV uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
using saddr = uint32_t;
QA_DEV saddr smem_addr(const void *p) { return smem_u32(p); }
/* The same value, opaque to the optimizer: computed in a loop body, it keeps
 * the compiler from hoisting dozens of derived addresses into registers. */
QA_DEV saddr opaque(saddr a)
{
    saddr r;
    asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(a));
    return r;
}
QA_DEV const uint8_t *opaque_ptr(const uint8_t *p)
{
    const uint8_t *r;
    asm volatile("mov.b64 %0, %1;" : "=l"(r) : "l"(p));
    return r;
}
/* 16 bytes global -> shared, bypassing L1; when !valid the 16 bytes are zero-filled (src-size 0). */
QA_DEV void cp_async16(void *smem, const void *gmem, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
/* 4 bytes global -> shared (through L1); zero-filled when !valid. */
QA_DEV void cp_async4(void *smem, const void *gmem, bool valid)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
                 "r"(valid ? 4 : 0));
}
QA_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> QA_DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
QA_DEV void ldsm_x4(uint32_t r[4], saddr row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}
QA_DEV void ldsm_x4_t(uint32_t r[4], saddr row)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row));
}
#endif

/* ------------------------------------------------------------------ mma */

enum class MmaKind { F16, BF16, S8, E4M3 };

#if defined(QA_EMULATE)
QA_DEV void mma_f16_f32(float c[4], const uint32_t a[4], const uint32_t b[2]) { emu::mma(c, a, b, emu::F16); }
QA_DEV void mma_bf16_f32(float c[4], const uint32_t a[4], const uint32_t b[2]) { emu::mma(c, a, b, emu::BF16); }
QA_DEV void mma_e4m3_f32(float c[4], const uint32_t a[4], const uint32_t b[2]) { emu::mma(c, a, b, emu::E4M3); }
QA_DEV void mma_s8(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) { emu::mma_s8(c, a, b); }
QA_DEV void mma_e4m3_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]) { emu::mma_e4m3_f16(c, a, b); }
QA_DEV void mma_f16_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2]) { emu::mma_f16_f16(c, a, b); }
#else
QA_DEV void mma_f16_f32(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
QA_DEV void mma_bf16_f32(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
QA_DEV void mma_f16_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%0,%1};\n"
                 : "+r"(c[0]), "+r"(c[1])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
QA_DEV void mma_s8(int32_t c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
QA_DEV void mma_e4m3_f32(float c[4], const uint32_t a[4], const uint32_t b[2])
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)c, (void)a, (void)b;
    __trap(); /* never launched below sm89: plan_init refuses FP8 modes there */
#endif
}
QA_DEV void mma_e4m3_f16(uint32_t c[2], const uint32_t a[4], const uint32_t b[2])
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f16.e4m3.e4m3.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%0,%1};\n"
                 : "+r"(c[0]), "+r"(c[1])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)c, (void)a, (void)b;
    __trap();
#endif
}
#endif

QA_NAMESPACE_END

#endif
