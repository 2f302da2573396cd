/*
 * The device primitives of the paged kernels, in two builds of one source:
 * nvcc (inline PTX) and the CPU emulator (PA_EMULATE, paged_emu.hpp), so the
 * kernels in paged_kernels.cuh are tested bit for bit without a GPU.
 */
#ifndef QATTN_PAGED_DEVICE_CUH
#define QATTN_PAGED_DEVICE_CUH

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(PA_EMULATE)
#include "paged_emu.hpp"
extern "C" {
#include "numeric.h"
}
#define PA_DEV static inline
#define PA_HOST_DEV static inline
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PA_DEV static __device__ __forceinline__
#define PA_HOST_DEV static __host__ __device__ __forceinline__
#endif

#define PA_THREADS 128 /* threads per block of every paged kernel */

/* ------------------------------------------------------------ threads */

#if defined(PA_EMULATE)
PA_DEV int pa_tid() { return pa_emu::thread_index(); }
PA_DEV long long pa_bid() { return pa_emu::block_index(); }
PA_DEV long long pa_nblocks() { return pa_emu::block_count(); }
PA_DEV uint8_t *pa_smem() { return pa_emu::shared_base(); }
PA_DEV void pa_sync() { pa_emu::sync_block(); }
PA_DEV uint32_t pa_shfl_xor(uint32_t v, int mask) { return pa_emu::shfl_xor(v, mask); }
#else
extern __shared__ __align__(128) uint8_t pa_smem_bytes[];
PA_DEV int pa_tid() { return (int)threadIdx.x; }
PA_DEV long long pa_bid() { return (long long)blockIdx.x; }
PA_DEV long long pa_nblocks() { return (long long)gridDim.x; }
PA_DEV uint8_t *pa_smem() { return pa_smem_bytes; }
PA_DEV void pa_sync() { __syncthreads(); }
PA_DEV uint32_t pa_shfl_xor(uint32_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
#endif

PA_HOST_DEV uint32_t pa_f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
PA_HOST_DEV float pa_u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}
PA_DEV float pa_shfl_xor_f(float v, int mask) { return pa_u2f(pa_shfl_xor(pa_f2u(v), mask)); }

/* Lane src's value (every lane of the warp takes part). */
PA_DEV float pa_shfl_idx_f(float v, int src)
{
#if defined(PA_EMULATE)
    return pa_u2f(pa_emu::shfl_idx(pa_f2u(v), src));
#else
    return __shfl_sync(0xffffffffu, v, src);
#endif
}

PA_DEV uint32_t pa_umulhi(uint32_t a, uint32_t b)
{
#if defined(PA_EMULATE)
    return (uint32_t)(((uint64_t)a * b) >> 32);
#else
    return __umulhi(a, b);
#endif
}

/* A read-only 32-bit load kept where it is written: volatile, so the compiler
 * neither sinks it to its first use nor merges it into that use's branch (the
 * page ids of the next tile load while this tile computes). */
PA_DEV int32_t pa_load_early(const int32_t *p)
{
#if defined(PA_EMULATE)
    return *p;
#else
    int32_t v;
    asm volatile("ld.global.nc.s32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
#endif
}

/* ------------------------------------------------------------- copies */

#if defined(PA_EMULATE)
PA_DEV void pa_cp16(void *dst, const void *src, bool valid) { pa_emu::cp_async(dst, src, 16, valid ? 16 : 0); }
PA_DEV void pa_cp4(void *dst, const void *src, bool valid) { pa_emu::cp_async(dst, src, 4, valid ? 4 : 0); }
PA_DEV void pa_cp_commit() { pa_emu::cp_commit(); }
template <int N> PA_DEV void pa_cp_wait() { pa_emu::cp_wait(N); }
PA_DEV void pa_ldsm_x4(uint32_t r[4], const void *p) { pa_emu::ldmatrix_x4(r, p, false); }
PA_DEV void pa_ldsm_x4_t(uint32_t r[4], const void *p) { pa_emu::ldmatrix_x4(r, p, true); }
#else
PA_DEV uint32_t pa_smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
/* 16 bytes global -> shared, bypassing L1; zero-filled (nothing read) when !valid. */
PA_DEV void pa_cp16(void *dst, const void *src, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(pa_smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
PA_DEV void pa_cp4(void *dst, const void *src, bool valid)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(pa_smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
PA_DEV void pa_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> PA_DEV void pa_cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
PA_DEV void pa_ldsm_x4(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(pa_smem_addr(p)));
}
PA_DEV void pa_ldsm_x4_t(uint32_t r[4], const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(pa_smem_addr(p)));
}
#endif

/* --------------------------------------------------------------- math */

/* D = A * B + D, m16n8k16, fp32 accumulators; BF16 picks bf16 operands. */
template <bool BF16> PA_DEV void pa_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
#if defined(PA_EMULATE)
    pa_emu::mma_16816(c, a, b0, b1, BF16);
#else
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

/* Byte permute (PTX prmt, default mode): byte i of the result is byte sel[i] of {b:a}. */
PA_DEV uint32_t pa_prmt(uint32_t a, uint32_t b, uint32_t sel)
{
#if defined(PA_EMULATE)
    uint64_t both = (uint64_t)a | ((uint64_t)b << 32);
    uint32_t r = 0;
    for (int i = 0; i < 4; i++)
        r |= (uint32_t)((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
#else
    return __byte_perm(a, b, sel);
#endif
}

/* Two E4M3 codes (low byte first) to two exact f16 values (low half first). */
PA_DEV uint32_t pa_e4m3x2_to_f16x2(uint32_t pair)
{
#if defined(PA_EMULATE)
    uint32_t lo = qattn_f32_to_f16(qattn_e4m3_to_f32((uint8_t)pair));
    uint32_t hi = qattn_f32_to_f16(qattn_e4m3_to_f32((uint8_t)(pair >> 8)));
    return lo | (hi << 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint32_t d;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(d) : "h"((unsigned short)pair));
    return d;
#else
    /* Sign to bit 15, exponent and mantissa to bits 7..13: the f16 with the
     * same bits is the value times 2^-8 (subnormals included); scale back exactly. */
    uint32_t w = __byte_perm(pair, 0, 0x4140);
    uint32_t h = ((w & 0x00800080u) << 8) | ((w & 0x007f007fu) << 7);
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(h), "r"(0x5c005c00u));
    return d;
#endif
}

/* a - b on f16 pairs (exact in the INT8 decode below). */
PA_DEV uint32_t pa_hsub2(uint32_t a, uint32_t b)
{
#if defined(PA_EMULATE)
    uint32_t lo = qattn_f32_to_f16(qattn_f16_to_f32((uint16_t)a) - qattn_f16_to_f32((uint16_t)b));
    uint32_t hi = qattn_f32_to_f16(qattn_f16_to_f32((uint16_t)(a >> 16)) - qattn_f16_to_f32((uint16_t)(b >> 16)));
    return lo | (hi << 16);
#else
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
    return d;
#endif
}

/* fp32 pair to f16x2 / bf16x2, round to nearest even; x goes to the low half. */
PA_DEV uint32_t pa_pack_f16(float x, float y)
{
#if defined(PA_EMULATE)
    return (uint32_t)qattn_f32_to_f16(x) | ((uint32_t)qattn_f32_to_f16(y) << 16);
#else
    __half2 h = __floats2half2_rn(x, y);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
#endif
}
PA_DEV uint32_t pa_pack_bf16(float x, float y)
{
#if defined(PA_EMULATE)
    return (uint32_t)qattn_f32_to_bf16(x) | ((uint32_t)qattn_f32_to_bf16(y) << 16);
#else
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
#endif
}
PA_DEV float pa_f16_to_f32(uint16_t h)
{
#if defined(PA_EMULATE)
    return qattn_f16_to_f32(h);
#else
    return __half2float(__ushort_as_half(h));
#endif
}
PA_DEV float pa_bf16_to_f32(uint16_t h) { return pa_u2f((uint32_t)h << 16); }
PA_DEV uint16_t pa_f32_to_f16(float f)
{
#if defined(PA_EMULATE)
    return qattn_f32_to_f16(f);
#else
    return __half_as_ushort(__float2half_rn(f));
#endif
}
PA_DEV uint16_t pa_f32_to_bf16(float f)
{
#if defined(PA_EMULATE)
    return qattn_f32_to_bf16(f);
#else
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#endif
}

/* fp32 to E4M3, round to nearest even, finite values saturate to +-448 (NaN stays NaN). */
PA_DEV uint8_t pa_f32_to_e4m3(float f)
{
#if defined(PA_EMULATE)
    return qattn_f32_to_e4m3(f);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    unsigned short d;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(d) : "f"(0.f), "f"(f));
    return (uint8_t)d;
#else
    uint32_t x = pa_f2u(f);
    uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
    float a = fabsf(f);
    if (a != a)
        return (uint8_t)(sign | 0x7fu);
    if (a >= 448.0f)
        return (uint8_t)(sign | 0x7eu);
    if (a < 0.015625f)
        return (uint8_t)(sign | (uint8_t)rintf(a * 512.0f));
    uint32_t ax = pa_f2u(a);
    uint32_t rounded = ax + 0x7ffffu + ((ax >> 20) & 1u);
    uint32_t exp = (rounded >> 23) - 127u + 7u, man = (rounded >> 20) & 7u;
    if (exp > 15 || (exp == 15 && man == 7))
        return (uint8_t)(sign | 0x7eu);
    return (uint8_t)(sign | (exp << 3) | man);
#endif
}

/* 2^x and log2(x): the hardware approximations (relative error ~2^-22). */
PA_DEV float pa_exp2(float x)
{
#if defined(PA_EMULATE)
    return exp2f(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
#endif
}
PA_DEV float pa_log2(float x)
{
#if defined(PA_EMULATE)
    return log2f(x);
#else
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
#endif
}

/* ------------------------------------------------------------ atomics */

PA_DEV void pa_atomic_or(uint32_t *p, uint32_t v)
{
#if defined(PA_EMULATE)
    *p |= v;
#else
    atomicOr((unsigned int *)p, v);
#endif
}

#endif
