/*
 * CPU flash attention: tiled, online softmax, O(tile) extra memory per thread.
 *
 * One work item is (batch, q head, tile of CPU_QT query rows); items run in
 * parallel (OpenMP). Each item walks steps of CPU_KT keys (or CPU_KT_MAX, see
 * cpu_flash_params.step):
 *   S = Q K^T        4-row x 64-key register blocks, vectorized over keys
 *   online softmax   exp2 of log2e-scaled scores, vectorized polynomial
 *   O = a*O + P V    4-row x 64-channel register blocks, vectorized over D
 * Vectors are GCC vector extensions (16 floats); target_clones builds the hot
 * functions for AVX-512, AVX2+FMA and baseline x86-64 and picks one at load.
 *
 * The quantized modes run the same loops on the reference-quantized
 * workspace (src/quant.c), reproducing the GPU formats exactly:
 *   INT8 Q.K: int8 products summed in fp32 are exact (|sum| <= 127^2 * 256 < 2^24)
 *   FP8 P.V:  products of two E4M3 values are exact in fp32
 *   F16ACC:   exact sums over pv_f16_chunk keys, accumulated with fp16 rounding
 *             over each step (64 or 128 keys), then added to the fp32 output.
 *
 * The engine (cpu_flash.h) serves cpu_paged.c too; the dense plans and runs
 * follow it here.
 */
#include "cpu_internal.h"
#include "cpu_flash.h"

#include <math.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#include <string.h>

#include "numeric.h"
#include "quant.h"

#define VW 16                  /* floats per vector */
#define LN2 0.6931471805599453

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));
typedef int8_t vb __attribute__((vector_size(VW)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(QATTN_NO_MULTIVERSION)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

static inline __attribute__((always_inline)) vf vload(const float *p)
{
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline __attribute__((always_inline)) void vstore(float *p, vf v) { memcpy(p, &v, sizeof(v)); }

static inline __attribute__((always_inline)) vf vsplat(float x) { return (vf){0} + x; }

static inline __attribute__((always_inline)) vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline __attribute__((always_inline)) vf vmax(vf a, vf b) { return vselect(a > b, a, b); }

/* 2^x for x <= 0 (any x >= -126 is accurate to ~2 ulp; below that: 0). */
static inline __attribute__((always_inline)) vf vexp2(vf x)
{
    vi tiny = x < -126.0f;
    x = vmax(x, vsplat(-126.0f));
    vf t = x + 0.5f;
    vi n = __builtin_convertvector(t, vi);
    n += (vi)(__builtin_convertvector(n, vf) > t); /* truncation -> floor (mask is -1) */
    vf f = x - __builtin_convertvector(n, vf);       /* [-0.5, 0.5] */
    vf p = vsplat(1.535336188319500e-4f);
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    vf scale = (vf)((n + 127) << 23);
    return (vf)((vi)(p * scale) & ~tiny);
}

/* Horizontal max and sum: four halving shuffles instead of a 15-step chain. */
#if defined(__clang__)
/* clang has no __builtin_shuffle; its __builtin_shufflevector takes constant lanes. */
static inline __attribute__((always_inline)) vf fold(vf v, int step)
{
    switch (step) {
    case 8: return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3);
    case 2: return __builtin_shufflevector(v, v, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1);
    default: return __builtin_shufflevector(v, v, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0);
    }
}
#else
static inline __attribute__((always_inline)) vf fold(vf v, int step)
{
    vi lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return __builtin_shuffle(v, (lanes + step) & 15);
}
#endif

static inline __attribute__((always_inline)) float hmax(vf v)
{
    for (int step = 8; step > 0; step /= 2)
        v = vmax(v, fold(v, step));
    return v[0];
}

static inline __attribute__((always_inline)) float hsum(vf v)
{
    for (int step = 8; step > 0; step /= 2)
        v += fold(v, step);
    return v[0];
}

/* 16 fp16 values to fp32: move exponent+mantissa into place and rescale by
 * 2^112 (exact for normals and subnormals); inf/nan keep an all-ones exponent. */
static inline __attribute__((always_inline)) vf vf16_to_f32(vh h16)
{
    vi h = __builtin_convertvector(h16, vi);
    vi sign = (h & 0x8000) << 16;
    vi em = (h & 0x7fff) << 13;
    vf mag = (vf)em * qattn_bits_f32(0x77800000u); /* 2^112 */
    vi special = (h & 0x7c00) == 0x7c00;
    vi bits = ((vi)mag & ~special) | ((em | 0x7f800000) & special);
    return (vf)(bits | sign);
}

/* dst[0..n) = src[0..n) * scale for a f32/f16/bf16 row; n is a multiple of 16. */
HOT void cpu_convert_row(float *restrict dst, const void *restrict src, qattn_dtype dt, int n, float scale)
{
    for (int i = 0; i < n; i += VW) {
        vf v;
        if (dt == QATTN_DTYPE_F32) {
            v = vload((const float *)src + i);
        } else {
            vh h;
            memcpy(&h, (const uint16_t *)src + i, sizeof(h));
            v = dt == QATTN_DTYPE_F16 ? vf16_to_f32(h) : (vf)(__builtin_convertvector(h, vi) << 16);
        }
        vstore(dst + i, v * scale);
    }
}

/* dst[0..n) = int8 src[0..n) as floats; n is a multiple of 16. */
HOT void cpu_convert_row_i8(float *restrict dst, const int8_t *restrict src, int n)
{
    for (int i = 0; i < n; i += VW) {
        vb b;
        memcpy(&b, src + i, sizeof(b));
        vstore(dst + i, __builtin_convertvector(__builtin_convertvector(b, vi), vf));
    }
}

/* S[r][0..64) = sum_d Q[r][d] * Kt[d][0..64), rows r < rows. Q rows are ldq apart; Kt and S
 * rows CPU_KT_MAX apart (a step of 128 keys is two calls). */
HOT static void qk_tile(const float *restrict Q, int ldq, const float *restrict Kt, int D, float *restrict S, int rows)
{
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        vf acc[4][4];
        memset(acc, 0, sizeof(acc));
        const float *q0 = Q + (size_t)r * ldq;
        for (int d = 0; d < D; d++) {
            const float *kr = Kt + (size_t)d * CPU_KT_MAX;
            vf k0 = vload(kr), k1 = vload(kr + 16), k2 = vload(kr + 32), k3 = vload(kr + 48);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                vf qb = vsplat(q0[(size_t)i * ldq + d]);
                acc[i][0] += qb * k0;
                acc[i][1] += qb * k1;
                acc[i][2] += qb * k2;
                acc[i][3] += qb * k3;
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                vstore(S + (size_t)(r + i) * CPU_KT_MAX + c * VW, acc[i][c]);
    }
    for (; r < rows; r++) {
        vf acc[4];
        memset(acc, 0, sizeof(acc));
        for (int d = 0; d < D; d++) {
            vf qb = vsplat(Q[(size_t)r * ldq + d]);
            const float *kr = Kt + (size_t)d * CPU_KT_MAX;
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                acc[c] += qb * vload(kr + c * VW);
        }
        for (int c = 0; c < 4; c++)
            vstore(S + (size_t)r * CPU_KT_MAX + c * VW, acc[c]);
    }
}

/* O[r][0..D) += sum_{j<keys} P[r][j] * V[j][0..D). P rows are CPU_KT_MAX apart, O rows D apart. */
HOT static void pv_tile(const float *restrict P, const float *restrict V, int keys, int D, float *restrict O,
                        int rows)
{
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        int c0 = 0;
        for (; c0 + 64 <= D; c0 += 64) {
            vf acc[4][4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++)
                    acc[i][c] = vload(O + (size_t)(r + i) * D + c0 + c * VW);
            for (int j = 0; j < keys; j++) {
                const float *vr = V + (size_t)j * D + c0;
                vf v0 = vload(vr), v1 = vload(vr + 16), v2 = vload(vr + 32), v3 = vload(vr + 48);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    vf pb = vsplat(P[(size_t)(r + i) * CPU_KT_MAX + j]);
                    acc[i][0] += pb * v0;
                    acc[i][1] += pb * v1;
                    acc[i][2] += pb * v2;
                    acc[i][3] += pb * v3;
                }
            }
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++)
                    vstore(O + (size_t)(r + i) * D + c0 + c * VW, acc[i][c]);
        }
        for (; c0 < D; c0 += VW) { /* D % 64 remainder, one vector at a time */
            vf acc[4];
            for (int i = 0; i < 4; i++)
                acc[i] = vload(O + (size_t)(r + i) * D + c0);
            for (int j = 0; j < keys; j++) {
                vf vv = vload(V + (size_t)j * D + c0);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++)
                    acc[i] += vsplat(P[(size_t)(r + i) * CPU_KT_MAX + j]) * vv;
            }
            for (int i = 0; i < 4; i++)
                vstore(O + (size_t)(r + i) * D + c0, acc[i]);
        }
    }
    for (; r < rows; r++)
        for (int c0 = 0; c0 < D; c0 += VW) {
            vf acc = vload(O + (size_t)r * D + c0);
            for (int j = 0; j < keys; j++)
                acc += vsplat(P[(size_t)r * CPU_KT_MAX + j]) * vload(V + (size_t)j * D + c0);
            vstore(O + (size_t)r * D + c0, acc);
        }
}

/*
 * Online softmax on one score tile (log2 domain, masked entries -inf).
 * Updates m, l; writes P (the probabilities, unquantized) and each row's
 * rescale factor alpha for the previous output.
 */
HOT static void softmax_tile(float *restrict S, int rows, int step, float *restrict m, float *restrict l,
                             float *restrict alpha)
{
    for (int r = 0; r < rows; r++) {
        float *s = S + (size_t)r * CPU_KT_MAX;
        vf vmx = vload(s);
        for (int c = VW; c < step; c += VW)
            vmx = vmax(vmx, vload(s + c));
        float tile_max = hmax(vmx);
        float m_new = tile_max > m[r] ? tile_max : m[r];
        if (m_new == -INFINITY) { /* every key so far masked: nothing to add */
            alpha[r] = 1.f;
            memset(s, 0, (size_t)step * sizeof(float));
            continue;
        }
        alpha[r] = m[r] == -INFINITY ? 0.f : exp2f(m[r] - m_new);
        vf mb = vsplat(m_new), sum = vsplat(0.f);
        for (int c = 0; c < step; c += 4 * VW) { /* the sum in the same order as one 64-key block */
            vf s0 = vexp2(vload(s + c) - mb), s1 = vexp2(vload(s + c + 16) - mb);
            vf s2 = vexp2(vload(s + c + 32) - mb), s3 = vexp2(vload(s + c + 48) - mb);
            vstore(s + c, s0);
            vstore(s + c + 16, s1);
            vstore(s + c + 32, s2);
            vstore(s + c + 48, s3);
            sum += s0 + s1 + s2 + s3;
        }
        l[r] = l[r] * alpha[r] + hsum(sum);
        m[r] = m_new;
    }
}

static void scale_rows(float *O, int rows, int D, const float *alpha)
{
    for (int r = 0; r < rows; r++) {
        if (alpha[r] == 1.f)
            continue;
        vf a = vsplat(alpha[r]);
        for (int c = 0; c < D; c += VW)
            vstore(O + (size_t)r * D + c, vload(O + (size_t)r * D + c) * a);
    }
}

/* ------------------------------------------------------------ sparse masks */

#define CPU_SPARSE_QBLOCKS (CPU_QT / 16 + 1) /* query blocks one tile's rows can touch */
#define CPU_SPARSE_KBLOCKS 16                /* key blocks one step can touch (<= 128 / 16 + 1) */

/* One tile's view of a sparse plan: each row's keys under the structured
 * masks and, with a layout, the key blocks kept for each of its query blocks. */
struct cpu_sparse_tile {
    const qattn_sparse_problem *sp;
    int64_t i0;
    int rows;
    int64_t lo[CPU_QT], hi[CPU_QT], sinks[CPU_QT]; /* qattn_sparse_row_keys per row */
    const int32_t *indptr, *indices;               /* NULL without a layout */
    int64_t count, stride;                         /* see qattn_sparse_layout_row */
    int64_t layout_row0;                           /* layout row of query block qb0 */
    int64_t qb0;
    int nqb;
    int64_t qlo[CPU_SPARSE_QBLOCKS], qhi[CPU_SPARSE_QBLOCKS], qsinks[CPU_SPARSE_QBLOCKS]; /* unions per query block */
    int64_t kb0;                                   /* the masked step's first key block */
    uint8_t kept[CPU_SPARSE_QBLOCKS][CPU_SPARSE_KBLOCKS];
};
typedef struct cpu_sparse_tile cpu_sparse_tile;

/* SpargeAttn's second stage: a 16-row group whose scores in this step all lie
 * more than lambda below the rows' running maxima (every P < 2^-lambda) adds
 * nothing to P.V; its P rows become 0 (the sums in l keep them, as the GPU
 * kernels that skip the product do). Groups are aligned to absolute rows. */
static void skip_small_steps(float *S, int rows, int keys, int64_t first_row, float lambda)
{
    const float limit = exp2f(-lambda);
    for (int r0 = 0; r0 < rows;) {
        const int r1 = (int)qattn_min_i64(rows, r0 + QATTN_SPARSE_PV_GROUP - (first_row + r0) % QATTN_SPARSE_PV_GROUP);
        bool small = true;
        for (int r = r0; r < r1 && small; r++)
            for (int j = 0; j < keys && small; j++)
                small = S[(size_t)r * CPU_KT_MAX + j] < limit;
        if (small)
            for (int r = r0; r < r1; r++)
                memset(S + (size_t)r * CPU_KT_MAX, 0, (size_t)keys * sizeof(float));
        r0 = r1;
    }
}

void cpu_scratch_free(cpu_scratch *sc)
{
    free(sc->Q);
    free(sc->Kt);
    free(sc->V);
    free(sc->S);
    free(sc->O);
    free(sc->acc16);
    free(sc->part);
    free(sc->row);
    free(sc->sparse);
}

bool cpu_scratch_alloc(cpu_scratch *sc, int D)
{
    memset(sc, 0, sizeof(*sc));
    size_t qd = (size_t)CPU_QT * D * sizeof(float), kd = (size_t)CPU_KT_MAX * D * sizeof(float);
    sc->Q = aligned_alloc(64, qd);
    sc->Kt = aligned_alloc(64, kd);
    sc->V = aligned_alloc(64, kd);
    sc->S = aligned_alloc(64, (size_t)CPU_QT * CPU_KT_MAX * sizeof(float));
    sc->O = aligned_alloc(64, qd);
    sc->acc16 = aligned_alloc(64, qd);
    sc->part = aligned_alloc(64, qd);
    sc->row = aligned_alloc(64, (size_t)D * sizeof(float));
    sc->sparse = malloc(sizeof(struct cpu_sparse_tile));
    if (!sc->Q || !sc->Kt || !sc->V || !sc->S || !sc->O || !sc->acc16 || !sc->part || !sc->row || !sc->sparse) {
        cpu_scratch_free(sc);
        return false;
    }
    return true;
}

cpu_scratch *cpu_scratch_array(int count, int D)
{
    cpu_scratch *sc = calloc((size_t)count, sizeof(*sc));
    if (!sc)
        return NULL;
    for (int t = 0; t < count; t++)
        if (!cpu_scratch_alloc(&sc[t], D)) {
            for (int u = 0; u < t; u++)
                cpu_scratch_free(&sc[u]);
            free(sc);
            return NULL;
        }
    return sc;
}

void cpu_scratch_array_free(cpu_scratch *sc, int count)
{
    for (int t = 0; sc && t < count; t++)
        cpu_scratch_free(&sc[t]);
    free(sc);
}

static float e4m3_table[256];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static void init_tables(void)
{
    for (int i = 0; i < 256; i++)
        e4m3_table[i] = qattn_e4m3_to_f32((uint8_t)i);
}

const float *cpu_e4m3_table(void)
{
    pthread_once(&tables_once, init_tables);
    return e4m3_table;
}

void cpu_flash_loop(cpu_scratch *sc, int rows, const cpu_flash_params *fp, int64_t key_begin, int64_t key_end,
                    cpu_kv_loader load, const void *loader_ctx)
{
    const int D = fp->head_dim;
    const qattn_precision prec = fp->precision;
    const bool quant = prec != QATTN_PRECISION_EXACT;
    const bool fp8 = prec == QATTN_PRECISION_INT8_FP8 || prec == QATTN_PRECISION_INT8_FP8_F16ACC;
    const float *e4m3 = cpu_e4m3_table();

    for (int r = 0; r < rows; r++) {
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.f;
    }
    memset(sc->O, 0, (size_t)rows * D * sizeof(float));

    int64_t last = key_begin; /* one past the last key any row sees */
    for (int r = 0; r < rows; r++)
        last = sc->key_end[r] > last ? sc->key_end[r] : last;
    if (last > key_end)
        last = key_end;
    const int step = fp->step == CPU_KT_MAX ? CPU_KT_MAX : CPU_KT;
    for (int64_t j0 = key_begin; j0 < last; j0 += step) {
        const int keys = (int)(last - j0 < step ? last - j0 : step);
        if (fp->filter && !fp->filter->visit(fp->filter->ctx, j0, keys))
            continue; /* no row sees a key of this step: it is never loaded */
        load(loader_ctx, j0, keys, sc); /* Kt [D][CPU_KT_MAX] zero past `keys`, V [keys][D], kscale */

        for (int c0 = 0; c0 < step; c0 += CPU_KT)
            qk_tile(sc->Q, D, sc->Kt + c0, D, sc->S + c0, rows);

        /* Dequantize scores, then mask keys each row may not see. */
        for (int r = 0; r < rows; r++) {
            float *s = sc->S + (size_t)r * CPU_KT_MAX;
            if (quant) {
                vf qs = vsplat(sc->qscale[r]);
                for (int c = 0; c < step; c += VW)
                    vstore(s + c, vload(s + c) * qs * vload(sc->kscale + c));
            }
            int64_t visible = sc->key_end[r] - j0;
            if (visible > keys)
                visible = keys;
            for (int64_t j = visible < 0 ? 0 : visible; j < step; j++)
                s[j] = -INFINITY;
        }
        if (fp->filter)
            fp->filter->mask(fp->filter->ctx, j0, keys, sc->S, rows);

        softmax_tile(sc->S, rows, step, sc->m, sc->l, sc->alpha);
        scale_rows(sc->O, rows, D, sc->alpha);
        if (fp->filter && fp->filter->pv_threshold > 0.f)
            skip_small_steps(sc->S, rows, keys, fp->filter->first_row, fp->filter->pv_threshold);

        if (prec == QATTN_PRECISION_INT8_FP16) {
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < keys; j++)
                    sc->S[(size_t)r * CPU_KT_MAX + j] = qattn_round_f16(sc->S[(size_t)r * CPU_KT_MAX + j]);
        } else if (fp8) {
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < keys; j++) {
                    float *pp = &sc->S[(size_t)r * CPU_KT_MAX + j];
                    *pp = e4m3[qattn_f32_to_e4m3(*pp * fp->quant->p_fp8_scale)];
                }
        }

        if (prec == QATTN_PRECISION_INT8_FP8_F16ACC) {
            /* fp16 accumulation over each step: exact chunk sums, rounded adds
             * (the plan's V bound keeps step x 448 x v_fp8_max below 65504). */
            const int chunk = fp->quant->pv_f16_chunk;
            for (int blk = 0; blk < keys; blk += step) {
                memset(sc->acc16, 0, (size_t)rows * D * sizeof(float));
                int blk_end = blk + step < keys ? blk + step : keys;
                for (int c0 = blk; c0 < blk_end; c0 += chunk) {
                    int n = c0 + chunk < blk_end ? chunk : blk_end - c0;
                    memset(sc->part, 0, (size_t)rows * D * sizeof(float));
                    pv_tile(sc->S + c0, sc->V + (size_t)c0 * D, n, D, sc->part, rows);
                    for (size_t e = 0; e < (size_t)rows * D; e++)
                        sc->acc16[e] = qattn_round_f16(sc->acc16[e] + sc->part[e]);
                }
                for (size_t e = 0; e < (size_t)rows * D; e++)
                    sc->O[e] += sc->acc16[e];
            }
        } else {
            pv_tile(sc->S, sc->V, keys, D, sc->O, rows);
        }
    }
}

/* ---------------------------------------------------------- dense attention */

typedef struct dense_loader {
    const cpu_job *job;
    int64_t b, hk;
} dense_loader;

/* K tile transposed to [D][CPU_KT_MAX] (zero past the last key) and V [keys][D]:
 * input values, or the quantized workspace's codes. */
static void load_dense_kv(const void *ctx, int64_t j0, int keys, cpu_scratch *sc)
{
    const dense_loader *dl = ctx;
    const cpu_job *job = dl->job;
    const qattn_plan *plan = job->plan;
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    const qattn_quant_params *qp = &plan->quant;
    const int D = (int)p->head_dim;
    const int64_t b = dl->b, hk = dl->hk, bhk = b * p->heads_kv + hk;
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;
    const bool fp8 = quant && plan->precision != QATTN_PRECISION_INT8_FP16;
    const size_t es = qattn_dtype_size(p->in_dtype);
    const float *e4m3 = cpu_e4m3_table();

    if (keys < CPU_KT_MAX)
        memset(sc->Kt, 0, (size_t)D * CPU_KT_MAX * sizeof(float));
    for (int j = 0; j < keys; j++) {
        int64_t t = j0 + j;
        if (quant) {
            cpu_convert_row_i8(sc->row, (const int8_t *)(job->ws + L->k_i8) + (bhk * p->seq_k + t) * D, D);
            const float *ks = (const float *)(job->ws + L->k_scale) + bhk * L->k_groups;
            sc->kscale[j] = ks[qattn_quant_group_of(t, qp->k_block, qp->k_interleave)];
        } else {
            const char *src = job->k + (size_t)(b * p->k_stride[0] + hk * p->k_stride[1] + t * p->k_stride[2]) * es;
            cpu_convert_row(sc->row, src, p->in_dtype, D, 1.f);
        }
        for (int d = 0; d < D; d++)
            sc->Kt[(size_t)d * CPU_KT_MAX + j] = sc->row[d];
    }
    for (int j = keys; j < CPU_KT_MAX; j++)
        sc->kscale[j] = 0.f;

    for (int j = 0; j < keys; j++) {
        int64_t t = j0 + j;
        float *dst = sc->V + (size_t)j * D;
        if (fp8) {
            const uint8_t *src = job->ws + L->v_q + (size_t)(bhk * D) * L->v_keys_padded + t;
            for (int d = 0; d < D; d++)
                dst[d] = e4m3[src[(size_t)d * L->v_keys_padded]];
        } else if (quant) {
            cpu_convert_row(dst, (const uint16_t *)(job->ws + L->v_q) + (bhk * p->seq_k + t) * D, QATTN_DTYPE_F16, D,
                            1.f);
        } else {
            const char *src = job->v + (size_t)(b * p->v_stride[0] + hk * p->v_stride[1] + t * p->v_stride[2]) * es;
            cpu_convert_row(dst, src, p->in_dtype, D, 1.f);
        }
    }
}


/* Layout row r's entries, clamped so that an unchecked layout reads in bounds. */
static void layout_row(const cpu_sparse_tile *t, int64_t r, int64_t *begin, int64_t *end)
{
    qattn_sparse_layout_row(t->indptr, t->stride, t->count, r, begin, end);
}

/* First entry of [begin, end) not below kb (the row is ascending). */
static int64_t lower_bound(const int32_t *idx, int64_t begin, int64_t end, int64_t kb)
{
    while (begin < end) {
        int64_t mid = begin + (end - begin) / 2;
        if (idx[mid] < kb)
            begin = mid + 1;
        else
            end = mid;
    }
    return begin;
}

/* Whether query block qi keeps a key block holding a key of [a, b). */
static bool keeps_keys(const cpu_sparse_tile *t, int qi, int64_t a, int64_t b)
{
    if (a >= b)
        return false;
    if (!t->indptr)
        return true;
    int64_t begin, end;
    layout_row(t, t->layout_row0 + qi, &begin, &end);
    const int64_t e = lower_bound(t->indices, begin, end, a / t->sp->k_block);
    return e < end && t->indices[e] <= (b - 1) / t->sp->k_block;
}

static bool sparse_visit(void *ctx, int64_t j0, int keys)
{
    const cpu_sparse_tile *t = ctx;
    const int64_t j1 = j0 + keys;
    for (int qi = 0; qi < t->nqb; qi++) {
        const int64_t lo = qattn_clamp_i64(t->qlo[qi], j0, j1), hi = qattn_clamp_i64(t->qhi[qi], j0, j1);
        if (keeps_keys(t, qi, lo, hi) || keeps_keys(t, qi, j0, qattn_min_i64(t->qsinks[qi], j1)))
            return true;
    }
    return false;
}

static void sparse_mask(void *ctx, int64_t j0, int keys, float *S, int rows)
{
    cpu_sparse_tile *t = ctx;
    const int64_t kblock = t->sp->k_block;
    if (t->indptr) {
        t->kb0 = j0 / kblock;
        const int64_t kb1 = (j0 + keys - 1) / kblock;
        for (int qi = 0; qi < t->nqb; qi++) {
            memset(t->kept[qi], 0, sizeof(t->kept[qi]));
            int64_t begin, end;
            layout_row(t, t->layout_row0 + qi, &begin, &end);
            for (int64_t e = lower_bound(t->indices, begin, end, t->kb0); e < end && t->indices[e] <= kb1; e++)
                t->kept[qi][t->indices[e] - t->kb0] = 1;
        }
    }
    const int64_t j1 = j0 + keys;
    for (int r = 0; r < rows; r++) {
        float *s = S + (size_t)r * CPU_KT_MAX;
        const int64_t lo = t->lo[r], hi = t->hi[r], sinks = t->sinks[r];
        const int qi = t->indptr ? (int)((t->i0 + r) / t->sp->q_block - t->qb0) : 0;
        /* Whole key blocks at a time: kept and inside the window, dropped, or cut by the window. */
        for (int64_t k0 = j0; k0 < j1;) {
            const int64_t k1 = t->indptr ? qattn_min_i64(j1, (k0 / kblock + 1) * kblock) : j1;
            if (t->indptr && !t->kept[qi][k0 / kblock - t->kb0]) {
                for (int64_t key = k0; key < k1; key++)
                    s[key - j0] = -INFINITY;
            } else if (!((k0 >= lo && k1 <= hi) || k1 <= sinks)) {
                for (int64_t key = k0; key < k1; key++)
                    if (!(key < sinks || (key >= lo && key < hi)))
                        s[key - j0] = -INFINITY;
            }
            k0 = k1;
        }
    }
}

/* Fills t for rows [i0, i0 + rows) of (b, hk); key_end[r] gets each row's window end. */
static void sparse_tile_init(cpu_sparse_tile *t, const cpu_job *job, int64_t b, int64_t hk, int64_t i0, int rows,
                             int64_t *key_end)
{
    const qattn_problem *p = &job->plan->problem;
    const qattn_sparse_problem *sp = &job->plan->sparse;
    t->sp = sp;
    t->i0 = i0;
    t->rows = rows;
    for (int r = 0; r < rows; r++) {
        qattn_sparse_row_keys(p, sp, i0 + r, &t->lo[r], &t->hi[r], &t->sinks[r]);
        key_end[r] = t->hi[r];
    }
    const int64_t qblock = sp->layout == QATTN_SPARSE_NO_LAYOUT ? CPU_QT : sp->q_block;
    t->qb0 = i0 / qblock;
    t->nqb = (int)((i0 + rows - 1) / qblock - t->qb0 + 1);
    for (int qi = 0; qi < t->nqb; qi++) {
        t->qlo[qi] = INT64_MAX;
        t->qhi[qi] = t->qsinks[qi] = 0;
    }
    for (int r = 0; r < rows; r++) {
        const int qi = (int)((i0 + r) / qblock - t->qb0);
        t->qlo[qi] = t->lo[r] < t->qlo[qi] ? t->lo[r] : t->qlo[qi];
        t->qhi[qi] = t->hi[r] > t->qhi[qi] ? t->hi[r] : t->qhi[qi];
        t->qsinks[qi] = t->sinks[r] > t->qsinks[qi] ? t->sinks[r] : t->qsinks[qi];
    }
    t->indptr = job->block_indptr;
    t->indices = job->block_indices;
    t->count = job->block_count;
    t->stride = job->block_stride;
    t->layout_row0 = (b * p->heads_kv + hk) * sp->q_blocks + t->qb0;
}

void cpu_sparse_rows_filter(cpu_scratch *sc, const qattn_sparse_problem *sp, const int64_t *lo, const int64_t *hi,
                            const int64_t *sinks, int rows, cpu_step_filter *filter)
{
    cpu_sparse_tile *t = sc->sparse;
    memset(t, 0, offsetof(cpu_sparse_tile, kept));
    t->sp = sp;
    t->rows = rows;
    t->nqb = 1; /* no layout: one group of rows, whose union of intervals decides the visits */
    t->qlo[0] = INT64_MAX;
    for (int r = 0; r < rows; r++) {
        t->lo[r] = lo[r];
        t->hi[r] = hi[r];
        t->sinks[r] = sinks[r];
        t->qlo[0] = lo[r] < t->qlo[0] ? lo[r] : t->qlo[0];
        t->qhi[0] = hi[r] > t->qhi[0] ? hi[r] : t->qhi[0];
        t->qsinks[0] = sinks[r] > t->qsinks[0] ? sinks[r] : t->qsinks[0];
        sc->key_end[r] = hi[r];
    }
    *filter = (cpu_step_filter){.visit = sparse_visit, .mask = sparse_mask, .ctx = t};
}

/* Computes one (b, h, query tile) work item. */
static void attend_tile(const cpu_job *job, int64_t b, int64_t h, int64_t i0, cpu_scratch *sc)
{
    const qattn_plan *plan = job->plan;
    const qattn_problem *p = &plan->problem;
    const qattn_workspace_layout *L = &plan->ws;
    const qattn_quant_params *qp = &plan->quant;
    const int D = (int)p->head_dim;
    const int rows = (int)(p->seq_q - i0 < job->tile_rows ? p->seq_q - i0 : job->tile_rows);
    const int64_t hk = h / p->group;
    const int64_t bhq = b * p->heads_q + h, bhk = b * p->heads_kv + hk;
    const bool quant = plan->precision != QATTN_PRECISION_EXACT;
    const bool fp8 = quant && plan->precision != QATTN_PRECISION_INT8_FP16;
    const size_t es = qattn_dtype_size(p->in_dtype);
    const float qk_to_log2 = p->sm_scale * (float)QATTN_LOG2E;

    /* Q tile: values pre-scaled into the log2 domain (exact), or int8 codes + row scales. */
    for (int r = 0; r < rows; r++) {
        int64_t i = i0 + r;
        float *dst = sc->Q + (size_t)r * D;
        if (quant) {
            cpu_convert_row_i8(dst, (const int8_t *)(job->ws + L->q_i8) + (bhq * p->seq_q + i) * D, D);
            const float *qs = (const float *)(job->ws + L->q_scale) + bhq * L->q_groups;
            sc->qscale[r] = qs[qattn_quant_group_of(i, qp->q_block, qp->q_interleave)] * qk_to_log2;
        } else {
            const char *src = job->q + (size_t)(b * p->q_stride[0] + h * p->q_stride[1] + i * p->q_stride[2]) * es;
            cpu_convert_row(dst, src, p->in_dtype, D, qk_to_log2);
        }
        sc->key_end[r] = qattn_causal_key_end(p, i);
    }

    cpu_flash_params fp = {.head_dim = D, .step = plan->kv_tile, .precision = plan->precision, .quant = qp};
    cpu_sparse_tile *tile = NULL;
    cpu_step_filter filter;
    if (plan->sparse.enabled) {
        tile = sc->sparse;
        sparse_tile_init(tile, job, b, hk, i0, rows, sc->key_end);
        filter = (cpu_step_filter){.visit = sparse_visit, .mask = sparse_mask, .ctx = tile,
                                   .pv_threshold = plan->sparse.pv_threshold, .first_row = i0};
        fp.filter = &filter;
    }
    dense_loader dl = {.job = job, .b = b, .hk = hk};
    cpu_flash_loop(sc, rows, &fp, 0, p->seq_k, load_dense_kv, &dl);

    /* Normalize and store. FP8 modes undo P's x448 and V's per-channel scale. */
    const float *vscale = fp8 ? (const float *)(job->ws + L->v_scale) + bhk * D : NULL;
    size_t os = qattn_dtype_size(p->out_dtype);
    for (int r = 0; r < rows; r++) {
        int64_t i = i0 + r;
        char *dst = job->o + (size_t)(b * p->o_stride[0] + h * p->o_stride[1] + i * p->o_stride[2]) * os;
        float inv = sc->l[r] > 0.f ? 1.f / sc->l[r] : 0.f;
        if (fp8)
            inv /= qp->p_fp8_scale;
        for (int d = 0; d < D; d++) {
            float val = sc->O[(size_t)r * D + d] * inv;
            if (vscale)
                val *= vscale[d];
            qattn_store_f(dst, p->out_dtype, d, val);
        }
        if (job->lse) {
            float lse = cpu_row_lse(sc->m[r], sc->l[r]);
            if (sc->l[r] > 0.f && quant && qp->smooth_k)
                lse += ((const float *)(job->ws + L->q_kmean))[bhq * p->seq_q + i];
            job->lse[bhq * p->seq_q + i] = lse;
        }
    }
}

float cpu_row_lse(float m, float l)
{
    return l > 0.f ? (float)((double)m * LN2 + log((double)l)) : -INFINITY;
}

int cpu_worker_count(int threads, int64_t items)
{
#if !defined(_OPENMP)
    threads = 1;
#endif
    if (threads > items)
        threads = (int)(items > 0 ? items : 1);
    return threads;
}

int cpu_thread_index(void)
{
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

qattn_status cpu_attention(const cpu_job *job, int threads)
{
    const qattn_problem *p = &job->plan->problem;
    const int64_t tiles = qattn_ceil_div(p->seq_q, job->tile_rows);
    const int64_t heads = p->batch * p->heads_q;
    const int64_t items = heads * tiles;
    threads = cpu_worker_count(threads, items);

    /* All scratch up front: a failure leaves the outputs untouched. */
    cpu_scratch *sc = cpu_scratch_array(threads, (int)p->head_dim);
    if (!sc)
        return QATTN_ERR_OUT_OF_MEMORY;

    /* Causal: tiles late in the sequence cost most; hand them out first. */
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
    for (int64_t it = 0; it < items; it++) {
        int64_t tile = tiles - 1 - it / heads, bh = it % heads;
        attend_tile(job, bh / p->heads_q, bh % p->heads_q, tile * job->tile_rows, &sc[cpu_thread_index()]);
    }
    cpu_scratch_array_free(sc, threads);
    return QATTN_OK;
}

/* ------------------------------------------------------------ plans and runs */

qattn_status cpu_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    const qattn_problem *p = &plan->problem;
    if (p->head_dim % 16 != 0 || p->head_dim > 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the cpu backend (multiples of 16 up to 256)",
                               (long long)p->head_dim);
    if (p->seq_q > INT32_MAX || p->seq_k > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "sequence lengths above 2^31-1 are not supported");
    if (plan->precision == QATTN_PRECISION_AUTO) {
        /* The quantized modes emulate GPU number formats here and are slower
         * than fp32 on a CPU, so the fastest mode at the accuracy bar is exact. */
        plan->precision = QATTN_PRECISION_EXACT;
        snprintf(plan->why, sizeof(plan->why),
                 "auto chose exact: on the CPU the quantized modes are emulated and slower than fp32.");
    } else {
        snprintf(plan->why, sizeof(plan->why), "%s as requested.", qattn_precision_name(plan->precision));
    }
    if (plan->precision != QATTN_PRECISION_EXACT) {
        if (plan->granularity == QATTN_GRANULARITY_DEFAULT)
            plan->granularity = QATTN_GRANULARITY_PER_WARP; /* SageAttention2's default */
        /* The same geometry as the CUDA mma.sync kernels, so the CPU result is
         * the reference for theirs. */
        qattn_quant_defaults(&plan->quant, plan->precision, plan->granularity, 128, 32, 64, plan->quant.smooth_k);
    }
    plan->q_tile = CPU_QT;
    plan->kv_tile = 64;
    plan->status_word = false;
    snprintf(plan->kernel, sizeof(plan->kernel), "cpu_flash_%s_d%lld", qattn_precision_name(plan->precision),
             (long long)p->head_dim);
    return QATTN_OK;
}

qattn_status cpu_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
{
    const qattn_problem *p = &plan->problem;
    if (run->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the cpu backend");
    cpu_job job = {
        .plan = plan,
        .q = (const char *)run->q->host + run->q_offset,
        .k = (const char *)run->k->host + run->k_offset,
        .v = (const char *)run->v->host + run->v_offset,
        .o = (char *)run->o->host + run->o_offset,
        .lse = run->lse ? (float *)((char *)run->lse->host + run->lse_offset) : NULL,
        .ws = run->workspace ? (const uint8_t *)run->workspace->host + run->workspace_offset : NULL,
    };
    if (p->check_finite) {
        const struct {
            uint32_t flag;
            const void *base;
            const int64_t *stride;
            int64_t heads, seq;
        } in[3] = {{QATTN_NONFINITE_Q, job.q, p->q_stride, p->heads_q, p->seq_q},
                   {QATTN_NONFINITE_K, job.k, p->k_stride, p->heads_kv, p->seq_k},
                   {QATTN_NONFINITE_V, job.v, p->v_stride, p->heads_kv, p->seq_k}};
        for (int i = 0; i < 3; i++) {
            int64_t shape[4] = {p->batch, in[i].heads, in[i].seq, p->head_dim};
            if (!qattn_host_tensor_is_finite(in[i].base, p->in_dtype, shape, in[i].stride))
                return qattn_nonfinite_error(ctx, in[i].flag);
        }
    }
    /* A layout's query blocks of 64 to 256 rows are the work items, so that a
     * tile's key steps are its own block's, not the union of several. */
    job.tile_rows = CPU_QT;
    if (plan->sparse.layout != QATTN_SPARSE_NO_LAYOUT && plan->sparse.q_block >= 64 && plan->sparse.q_block <= CPU_QT)
        job.tile_rows = (int)plan->sparse.q_block;
    if (plan->sparse.layout == QATTN_SPARSE_BLOCKS) {
        job.block_indptr = run->block_indptr->host;
        job.block_indices = run->block_indices ? run->block_indices->host : NULL;
        job.block_count = run->block_count;
    } else if (plan->sparse.layout == QATTN_SPARSE_PREDICT) {
        uint8_t *ws = (uint8_t *)run->workspace->host + run->workspace_offset;
        if (qattn_sparse_predict_host(plan, job.q, job.k, ws, ctx->num_threads))
            return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the sparse prediction");
        job.block_indptr = (const int32_t *)(ws + plan->ws.sparse_counts);
        job.block_indices = (const int32_t *)(ws + plan->ws.sparse_indices);
        job.block_stride = plan->sparse.k_blocks;
    }
    if (plan->precision != QATTN_PRECISION_EXACT)
        qattn_quantize_host(plan, job.q, job.k, job.v, (uint8_t *)job.ws, ctx->num_threads);
    qattn_status s = cpu_attention(&job, ctx->num_threads);
    if (s)
        return qattn_set_error(ctx, s, "out of host memory for the cpu kernel's per-thread tiles");
    return QATTN_OK;
}
