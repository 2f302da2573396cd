/*
 * libFuzzer target: dense attention, qattn_plan_create + qattn_run, every
 * precision mode, causal, GQA, LSE, workspace, any layout, hostile
 * descriptors and buffer arrangements.
 *
 * Input: a 12-byte header (precision, dtypes, flags, sizes, layouts), the
 * value distributions and a seed, one arrangement byte per argument, then
 * a list of mutations (hostile shapes, strides, dtypes, enums, offsets,
 * NaN/Inf, shared and aliased buffers, ...) until the input ends.
 * tests/fuzz/gen_corpus.py writes seeds in this format.
 *
 * Properties: the harness decides whether the request must succeed, must
 * fail, or may do either (fz_verdict), and checks that the call agrees; a
 * failure leaves every byte unchanged (the workspace aside) and says why; a
 * success writes nothing but O's elements, LSE and the workspace, and its
 * results lie within the error bound of the mode around an fp64 reference.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

enum { R_Q, R_K, R_V, R_O, R_LSE, R_WS, N_ROLES };

#define HUGE_REQUEST (1u << 20) /* a request larger than this gets small buffers: the run must refuse it */
#define SMALL_BUFFER 4096

typedef struct role {
    bool pass;              /* a buffer is passed for this argument */
    int group;              /* arguments of one group share a buffer */
    bool wrapped;           /* the group's buffer wraps an arena */
    int alias_of;           /* >= 0: an own wrapped buffer over that role's arena, shifted */
    int64_t alias_shift;
    size_t place;           /* where its data lies in the buffer */
    size_t offset;          /* the offset passed (hostile mutations change it) */
    size_t bytes, align;
    size_t tail;            /* slack after the data */
    int shrink;             /* bytes taken off the buffer's size */
    bool null, foreign;
    int buf;                /* fz_mem buffer, -1 for NULL */
} role;

typedef struct injection {
    int tensor;             /* q, k or v */
    uint32_t element;
    float value;
} injection;

static const int64_t dims_d[] = {16, 16, 16, 16, 16, 16, 32, 32, 32, 48, 64, 64, 80, 96, 128, 160, 192, 256};

/* Sequence lengths: mostly a few tokens (cheap executions), sometimes
 * dozens, rarely more than one 256-row query tile or 128-key step. */
static int64_t seq_len(uint8_t h)
{
    if (h < 160)
        return 1 + h % 8;
    if (h < 232)
        return 9 + h % 24;
    if (h < 248)
        return 33 + (int64_t)(h - 232) * 6;
    return 250 + (int64_t)(h - 248) * 8;
}

/* [B, H, N, D] with the outer dims in one of six orders, padded rows and a gap per head. */
static qattn_tensor_desc layout(qattn_dtype dt, int64_t b, int64_t h, int64_t n, int64_t d, uint8_t how)
{
    static const int orders[6][3] = {{2, 1, 0}, {1, 2, 0}, {2, 0, 1}, {0, 2, 1}, {1, 0, 2}, {0, 1, 2}};
    const int *order = orders[how % 6]; /* innermost first; {2, 1, 0} is HND */
    static const int64_t pads[4] = {0, 0, 1, 8};
    qattn_tensor_desc t = {.dtype = dt, .shape = {b, h, n, d}, .stride = {0, 0, 0, 1}};
    int64_t extent = d + pads[(how >> 3) & 3];
    for (int i = 0; i < 3; i++) {
        const int dim = order[i];
        t.stride[dim] = extent;
        extent *= t.shape[dim];
        if (dim == 1 && (how & 0x20))
            extent += d; /* room between heads */
    }
    return t;
}

static bool is_quantized(qattn_precision p) { return p >= QATTN_PRECISION_INT8_FP16 && p <= QATTN_PRECISION_INT8_FP8_F16ACC; }

/* What the header says qattn_plan_create must accept (on the CPU backend). */
static fz_verdict plan_verdict(const qattn_attention_desc *d, size_t bytes[4])
{
    const qattn_tensor_desc *t[4] = {&d->q, &d->k, &d->v, &d->o};
    fz_verdict v = FZ_VALID;
    for (int i = 0; i < 4; i++)
        v = fz_worst(v, fz_tensor_verdict(t[i], &bytes[i]));
    if (v == FZ_INVALID)
        return v;
    const qattn_dtype qd = d->q.dtype;
    if (qd != QATTN_DTYPE_F32 && qd != QATTN_DTYPE_F16 && qd != QATTN_DTYPE_BF16)
        return FZ_INVALID;
    if (d->k.dtype != qd || d->v.dtype != qd || (d->o.dtype != qd && d->o.dtype != QATTN_DTYPE_F32))
        return FZ_INVALID;
    const int64_t *qs = d->q.shape, *ks = d->k.shape, *vs = d->v.shape, *os = d->o.shape;
    if (ks[0] != qs[0] || vs[0] != qs[0] || os[0] != qs[0] || vs[1] != ks[1] || vs[2] != ks[2] || ks[3] != qs[3] ||
        vs[3] != qs[3] || os[1] != qs[1] || os[2] != qs[2] || os[3] != qs[3] || qs[1] % ks[1] != 0)
        return FZ_INVALID;
    if (!isfinite(d->sm_scale) || fabsf(d->sm_scale) > 2.3e38f || (unsigned)d->precision >= QATTN_PRECISION_COUNT ||
        (unsigned)d->granularity > QATTN_GRANULARITY_PER_THREAD || (unsigned)d->smooth_k > QATTN_OFF ||
        (d->flags & ~(uint32_t)QATTN_FLAG_NO_FINITE_CHECK))
        return FZ_INVALID;
    if (d->precision == QATTN_PRECISION_EXACT && (d->granularity != QATTN_GRANULARITY_DEFAULT || d->smooth_k != QATTN_DEFAULT))
        return FZ_INVALID;
    if (qs[3] % 16 != 0 || qs[3] > 256 || qs[2] > INT32_MAX || ks[2] > INT32_MAX) /* the CPU backend's kernels */
        return FZ_INVALID;
    const unsigned __int128 rows = (unsigned __int128)qs[0] * (unsigned __int128)qs[1] * (unsigned __int128)qs[2];
    if (d->return_lse && rows * 4 > (unsigned __int128)SIZE_MAX)
        return FZ_INVALID;
    if (d->return_lse && rows * 4 > (unsigned __int128)1 << 62)
        v = fz_worst(v, FZ_EITHER);
    /* The quantized workspace holds int8 copies of Q, K and V and their scales. */
    const unsigned __int128 ws = rows * (unsigned __int128)qs[3] * 8 +
                                 (unsigned __int128)ks[0] * ks[1] * (ks[2] + 128) * (unsigned __int128)qs[3] * 8;
    if (d->precision != QATTN_PRECISION_EXACT && ws > (unsigned __int128)1 << 62)
        v = fz_worst(v, FZ_EITHER);
    return v;
}

typedef struct dense_case {
    qattn_attention_desc desc;
    fz_values values[3];
    uint64_t seed;
    role roles[N_ROLES];
    injection inject[8];
    int n_inject;
    bool pass_lse, pass_ws, stream, rerun, null_calls;
    size_t describe_len;
} dense_case;

static void read_case(fuzz_input *in, dense_case *c)
{
    memset(c, 0, sizeof(*c));
    const uint8_t h_prec = fz_u8(in), h_quant = fz_u8(in), h_dtype = fz_u8(in), h_flags = fz_u8(in);
    const uint8_t h_heads = fz_u8(in), h_nq = fz_u8(in), h_nk = fz_u8(in), h_d = fz_u8(in);
    uint8_t h_layout[4];
    for (int i = 0; i < 4; i++)
        h_layout[i] = fz_u8(in);
    qattn_attention_desc *d = &c->desc;
    d->precision = (qattn_precision)(h_prec % 5);
    if (is_quantized(d->precision) || d->precision == QATTN_PRECISION_AUTO) {
        d->granularity = (qattn_granularity)(h_quant % 4);
        d->smooth_k = (qattn_toggle)((h_quant >> 2) % 3);
        if (d->precision == QATTN_PRECISION_AUTO && (h_quant & 0x80)) /* AUTO may carry quantized options */
            d->granularity = QATTN_GRANULARITY_DEFAULT, d->smooth_k = QATTN_DEFAULT;
    }
    static const qattn_dtype in_types[3] = {QATTN_DTYPE_F16, QATTN_DTYPE_BF16, QATTN_DTYPE_F32};
    const qattn_dtype in_dt = in_types[h_dtype % 3];
    const qattn_dtype out_dt = (h_dtype & 4) ? QATTN_DTYPE_F32 : in_dt;
    d->causal = h_flags & 1;
    d->return_lse = (h_flags >> 1) & 1;
    if (h_flags & 4)
        d->flags = QATTN_FLAG_NO_FINITE_CHECK;
    if (h_flags & 8) {
        static const float scales[8] = {0.5f, 0.125f, -0.3f, 1.0f, 2.0f, 1e-3f, 0.0625f, -1.0f};
        d->sm_scale = scales[(h_flags >> 4) & 7];
    }
    int64_t B = 1 + h_heads % 2, Hkv = 1 + (h_heads >> 1) % 3, G = 1 + (h_heads >> 3) % 3;
    int64_t Nq = seq_len(h_nq), Nk = seq_len(h_nk);
    int64_t D = dims_d[h_d % (sizeof(dims_d) / sizeof(dims_d[0]))];
    if (B * Hkv * G * Nq * Nk * D > (1 << 16)) { /* keep an execution cheap: long sequences run narrow */
        B = Hkv = G = 1;
        D = 16;
        if (Nq * Nk * D > (1 << 16)) /* one long side, a short other */
            Nk = Nq > Nk ? (1 << 12) / Nq + 1 : Nk, Nq = Nq > Nk ? Nq : (1 << 12) / Nk + 1;
    }
    d->q = layout(in_dt, B, Hkv * G, Nq, D, h_layout[0]);
    d->k = layout(in_dt, B, Hkv, Nk, D, h_layout[1]);
    d->v = layout(in_dt, B, Hkv, Nk, D, h_layout[2]);
    d->o = layout(out_dt, B, Hkv * G, Nq, D, h_layout[3]);
    for (int i = 0; i < 3; i++)
        c->values[i] = fz_pick_values(in, in_dt);
    c->seed = fz_u64(in);
    for (int r = 0; r < N_ROLES; r++) {
        const uint8_t a = fz_u8(in);
        role *ro = &c->roles[r];
        ro->group = r;
        ro->alias_of = -1;
        ro->wrapped = a & 1;
        ro->place = (size_t)((a >> 1) & 3) * (r == R_WS ? 256 : 4); /* aligned for every dtype */
        static const size_t tails[4] = {0, 1, 16, 64};
        ro->tail = tails[(a >> 3) & 3];
    }
    c->describe_len = fz_u8(in);

    /* Mutations until the input ends. */
    for (int n = 0; n < 12 && fz_more(in); n++) {
        const uint8_t op = fz_u8(in) % 17;
        qattn_tensor_desc *t[4] = {&d->q, &d->k, &d->v, &d->o};
        switch (op) {
        case 0: {
            qattn_tensor_desc *x = t[fz_u8(in) % 4];
            x->shape[fz_u8(in) % 4] = fz_hostile_i64(in);
            break;
        }
        case 1: {
            qattn_tensor_desc *x = t[fz_u8(in) % 4];
            const int dim = fz_u8(in) % 4;
            const uint8_t how = fz_u8(in);
            x->stride[dim] = how < 128 ? (int64_t)((uint64_t)x->stride[dim] + (uint64_t)((int64_t)(how % 33) - 16))
                                       : fz_hostile_i64(in); /* a nudge interleaves or overlaps rows */
            break;
        }
        case 2: t[fz_u8(in) % 4]->dtype = (qattn_dtype)((int)(fz_u8(in) % 7) - 1); break;
        case 3: {
            const uint8_t which = fz_u8(in) % 4, value = fz_u8(in);
            if (which == 0)
                d->precision = (qattn_precision)((int)(value % 7) - 1);
            else if (which == 1)
                d->granularity = (qattn_granularity)((int)(value % 6) - 1);
            else if (which == 2)
                d->smooth_k = (qattn_toggle)((int)(value % 5) - 1);
            else
                d->flags = value & 0x80 ? fz_u32(in) : (uint32_t)(value & 3);
            break;
        }
        case 4: d->sm_scale = fz_hostile_float(in); break;
        case 5:
            if (c->n_inject < 8) {
                injection *j = &c->inject[c->n_inject++];
                j->tensor = fz_u8(in) % 3;
                j->element = fz_u32(in);
                j->value = fz_hostile_float(in);
            }
            break;
        case 6: case 7: { /* the same buffer (6) or a wrapped alias of its memory (7) */
            const int x = fz_u8(in) % N_ROLES, y = fz_u8(in) % N_ROLES;
            const uint8_t at = fz_u8(in); /* a set low bit shifts by 1..7 bytes: misaligned wraps */
            const int64_t shift = (int64_t)(at >> 1) * 8 - 256 + (at & 1 ? 1 + (int64_t)(fz_u8(in) % 7) : 0);
            if (x == y)
                break;
            if (op == 6) {
                c->roles[x].group = c->roles[y].group;
                c->roles[x].alias_of = -1;
                c->roles[x].place = (size_t)(shift + 256);
            } else {
                c->roles[x].group = x;
                c->roles[x].alias_of = y;
                c->roles[x].alias_shift = shift;
            }
            break;
        }
        case 8: c->roles[fz_u8(in) % N_ROLES].shrink = 1 + fz_u8(in) % 64; break;
        case 9: c->roles[fz_u8(in) % N_ROLES].null = true; break;
        case 10: c->roles[fz_u8(in) % N_ROLES].foreign = true; break;
        case 11: c->pass_lse = true; break;
        case 12: c->pass_ws = true; break;
        case 13: c->stream = true; break;
        case 14: c->rerun = true; break;
        case 15: c->null_calls = true; break;
        default: { /* a hostile offset, set after the layout (see run_case) */
            role *ro = &c->roles[fz_u8(in) % N_ROLES];
            ro->offset = fz_hostile_offset(in, 4096) | ((size_t)1 << 62); /* marked: applied later */
            break;
        }
        }
    }
}

/* Per-group INT8 error: half a quantization step (the group's amax / 254),
 * or the whole value when the group quantizes to zero (amax < 2^-100). */
FZ_QUIET static double half_step(double amax) { return amax < 0x1p-100 ? amax : amax / 254.0 * (1 + 0x1p-18) + 0x1p-140; }

typedef struct bound_ctx {
    const qattn_attention_desc *d;
    const qattn_plan_info *info;
    const uint8_t *q, *k, *v, *o;
    const float *lse;
} bound_ctx;

/* fp64 reference and the mode's error bound for every output; aborts on a violation. */
FZ_QUIET static void check_results(const bound_ctx *bc)
{
    const qattn_attention_desc *d = bc->d;
    const qattn_plan_info *info = bc->info;
    const int64_t B = d->q.shape[0], Hq = d->q.shape[1], Nq = d->q.shape[2], D = d->q.shape[3];
    const int64_t Hkv = d->k.shape[1], Nk = d->k.shape[2], G = Hq / Hkv;
    const qattn_precision prec = info->precision;
    const bool quant = is_quantized(prec), smooth = quant && info->smooth_k;
    const double scale = d->sm_scale != 0.f ? (double)d->sm_scale : (double)(float)(1.0 / sqrt((double)D));
    const qattn_dtype in = d->q.dtype, out = d->o.dtype;

    double *s = malloc((size_t)Nk * sizeof(double)), *w = malloc((size_t)Nk * sizeof(double));
    double *err = malloc((size_t)Nk * sizeof(double));
    double *mean = calloc((size_t)D, sizeof(double)), *vmax = malloc((size_t)D * sizeof(double));
    double *kq = malloc((size_t)(Nk * D) * sizeof(double)), *dk = malloc((size_t)Nk * sizeof(double));
    double *kr = malloc((size_t)(Nk * D) * sizeof(double)), *vr = malloc((size_t)(Nk * D) * sizeof(double));
    double *qr = malloc((size_t)D * sizeof(double));
    FUZZ_CHECK(s && w && err && mean && vmax && kq && dk && kr && vr && qr, "harness: out of memory");

    for (int64_t b = 0; b < B; b++)
        for (int64_t hk = 0; hk < Hkv; hk++) {
            for (int64_t j = 0; j < Nk; j++)
                for (int64_t dd = 0; dd < D; dd++) {
                    kr[j * D + dd] = fz_load(bc->k, in, fz_offset_of(&d->k, b, hk, j, dd));
                    vr[j * D + dd] = fz_load(bc->v, in, fz_offset_of(&d->v, b, hk, j, dd));
                }
            /* K as quantized (mean-subtracted with smooth K) and its per-key INT8 error. */
            for (int64_t dd = 0; dd < D; dd++) {
                mean[dd] = 0.0;
                vmax[dd] = 0.0;
                for (int64_t j = 0; j < Nk; j++) {
                    if (smooth)
                        mean[dd] += kr[j * D + dd];
                    vmax[dd] = fmax(vmax[dd], fabs(vr[j * D + dd]));
                }
                mean[dd] /= (double)Nk;
            }
            for (int64_t j = 0; j < Nk; j++)
                for (int64_t dd = 0; dd < D; dd++)
                    kq[j * D + dd] = kr[j * D + dd] - mean[dd];
            if (quant) {
                const int64_t blk = info->k_quant_block, il = info->k_quant_interleave;
                for (int64_t j = 0; j < Nk; j++) {
                    double amax = 0.0;
                    for (int64_t t = j / blk * blk + (j % blk) % il; t < Nk && t < (j / blk + 1) * blk; t += il)
                        for (int64_t dd = 0; dd < D; dd++)
                            amax = fmax(amax, fabs(kq[t * D + dd]));
                    dk[j] = half_step(amax * (1 + 0x1p-20));
                }
            }
            for (int64_t g = 0; g < G; g++)
                for (int64_t i = 0; i < Nq; i++) {
                    const int64_t h = hk * G + g;
                    int64_t end = Nk;
                    if (d->causal)
                        end = i + 1 + Nk - Nq < Nk ? i + 1 + Nk - Nq : Nk;
                    const float *lse = bc->lse ? bc->lse + (b * Hq + h) * Nq + i : NULL;
                    if (end <= 0) { /* sees no key: zeros and -inf */
                        for (int64_t dd = 0; dd < D; dd++) {
                            const double got = fz_load(bc->o, out, fz_offset_of(&d->o, b, h, i, dd));
                            FUZZ_CHECK(got == 0.0, "o[%lld,%lld,%lld,%lld] = %g for a row that sees no key",
                                       (long long)b, (long long)h, (long long)i, (long long)dd, got);
                        }
                        FUZZ_CHECK(!lse || (isinf(*lse) && *lse < 0), "lse = %g for a row that sees no key",
                                   lse ? (double)*lse : 0.0);
                        continue;
                    }
                    double dq = 0.0, qmean = 0.0;
                    if (quant) {
                        const int64_t blk = info->q_quant_block, il = info->q_quant_interleave;
                        double amax = 0.0;
                        for (int64_t t = i / blk * blk + (i % blk) % il; t < Nq && t < (i / blk + 1) * blk; t += il)
                            for (int64_t dd = 0; dd < D; dd++)
                                amax = fmax(amax, fabs(fz_load(bc->q, in, fz_offset_of(&d->q, b, h, t, dd))));
                        dq = half_step(amax * (1 + 0x1p-20));
                    }
                    for (int64_t dd = 0; dd < D; dd++)
                        qr[dd] = fz_load(bc->q, in, fz_offset_of(&d->q, b, h, i, dd));
                    double worst = 0.0, magnitude = 0.0;
                    for (int64_t j = 0; j < end; j++) {
                        double dot = 0.0, absdot = 0.0, e = 0.0;
                        for (int64_t dd = 0; dd < D; dd++) {
                            const double qv = qr[dd], kv = kr[j * D + dd];
                            dot += qv * kv;
                            if (quant) {
                                const double kqv = kq[j * D + dd];
                                absdot += (fabs(qv) + dq) * (fabs(kqv) + dk[j]);
                                e += fabs(qv) * dk[j] + fabs(kqv) * dq + dq * dk[j];
                                if (j == 0)
                                    qmean += fabs(qv * mean[dd]);
                            } else {
                                absdot += fabs(qv * kv);
                            }
                        }
                        s[j] = scale * dot;
                        err[j] = fabs(scale) * (e + (double)(D + 16) * 0x1p-24 * absdot);
                        worst = fmax(worst, err[j]);
                        magnitude = fmax(magnitude, fabs(scale) * absdot); /* bounds every partial sum too */
                    }
                    double qmax = 0.0; /* kernels scale Q by sm_scale * log2(e) in fp32 first */
                    for (int64_t dd = 0; dd < D; dd++)
                        qmax = fmax(qmax, fabs(qr[dd]));
                    /* scores past fp32 or errors past any bound: no check */
                    if (magnitude > 1e30 || worst > 10.0 || qmax * fabs(scale) > 1e37)
                        continue;
                    const double e_row = worst + 0x1p-18 + magnitude * 0x1p-22;
                    const double ref_lse = fz_softmax(s, end, w);
                    const double spread = expm1(2.0 * e_row);
                    for (int64_t dd = 0; dd < D; dd++) {
                        double ref = 0.0, amax = 0.0;
                        for (int64_t j = 0; j < end; j++) {
                            const double vv = vr[j * D + dd];
                            ref += w[j] * vv;
                            amax = fmax(amax, fabs(vv));
                        }
                        if (quant)
                            amax = vmax[dd]; /* V is scaled per channel over every key */
                        double bound = spread * amax + (double)(2 * end + 64) * 0x1p-24 * amax;
                        if (prec == QATTN_PRECISION_INT8_FP16) {
                            bound += 0x1p-11 * amax + 0x1p-25 + (0x1p-11 + (double)end * 0x1p-25) * amax * 1.01;
                        } else if (quant) {
                            const double vfp8 = info->v_fp8_max;
                            bound += 0x1p-4 * amax + 0x1p-10 * amax / vfp8;
                            if (amax < 0x1p-100) /* a channel below the quantizer's floor becomes zeros */
                                bound += amax;
                            bound += (0x1p-4 + (double)end * 0x1p-10 / 448.0) * amax * 1.13;
                            if (prec == QATTN_PRECISION_INT8_FP8_F16ACC)
                                bound += 0x1p-9 * amax * 1.13 + (double)end * 0x1p-24 * amax / (vfp8 * 448.0);
                        }
                        const double got = fz_load(bc->o, out, fz_offset_of(&d->o, b, h, i, dd));
                        const double tol = 2.0 * bound + 2.0 * fz_dtype_eps(out) * fabs(ref) + fz_dtype_tiny(out);
                        FUZZ_CHECK(fabs(got - ref) <= tol,
                                   "%s: o[%lld,%lld,%lld,%lld] = %.9g, fp64 reference %.9g, bound %.3g (D=%lld Nq=%lld "
                                   "Nk=%lld keys %lld, score error %.3g)",
                                   qattn_precision_name(prec), (long long)b, (long long)h, (long long)i, (long long)dd,
                                   got, ref, tol, (long long)D, (long long)Nq, (long long)Nk, (long long)end, e_row);
                    }
                    if (lse) {
                        double tol = 2.0 * (e_row + 0x1p-20 * (fabs(ref_lse) + 1.0));
                        if (smooth)
                            tol += fabs(scale) * qmean * (double)(D + 8) * 0x1p-23;
                        FUZZ_CHECK(fabs((double)*lse - ref_lse) <= tol,
                                   "%s: lse[%lld,%lld,%lld] = %.9g, fp64 reference %.9g, bound %.3g",
                                   qattn_precision_name(prec), (long long)b, (long long)h, (long long)i, (double)*lse,
                                   ref_lse, tol);
                    }
                }
        }
    free(s);
    free(w);
    free(err);
    free(mean);
    free(vmax);
    free(kq);
    free(dk);
    free(kr);
    free(vr);
    free(qr);
}

static void check_plan_info(const qattn_plan *plan, const qattn_attention_desc *d, size_t describe_len,
                            qattn_plan_info *info)
{
    FUZZ_CHECK(qattn_plan_get_info(plan, info) == QATTN_OK, "qattn_plan_get_info");
    FUZZ_CHECK(info->precision != QATTN_PRECISION_AUTO && (unsigned)info->precision < QATTN_PRECISION_COUNT,
               "the plan left precision %d unresolved", (int)info->precision);
    if (d->precision != QATTN_PRECISION_AUTO)
        FUZZ_CHECK(info->precision == d->precision, "the plan ran %s for %s", qattn_precision_name(info->precision),
                   qattn_precision_name(d->precision));
    if (is_quantized(info->precision)) {
        FUZZ_CHECK(info->granularity != QATTN_GRANULARITY_DEFAULT, "granularity unresolved");
        if (d->granularity != QATTN_GRANULARITY_DEFAULT)
            FUZZ_CHECK(info->granularity == d->granularity, "granularity changed");
        FUZZ_CHECK(info->q_quant_block > 0 && info->k_quant_block > 0 && info->q_quant_interleave > 0 &&
                       info->k_quant_interleave > 0 && info->q_quant_interleave <= info->q_quant_block &&
                       info->k_quant_interleave <= info->k_quant_block,
                   "scale groups %d/%d %d/%d", info->q_quant_block, info->q_quant_interleave, info->k_quant_block,
                   info->k_quant_interleave);
        FUZZ_CHECK(info->smooth_k == (d->smooth_k != QATTN_OFF), "smooth_k");
    }
    FUZZ_CHECK(info->workspace_bytes == qattn_plan_workspace_size(plan), "workspace sizes disagree");
    FUZZ_CHECK(memchr(info->kernel, 0, sizeof(info->kernel)) && info->kernel[0], "kernel name");
    char text[256];
    memset(text, 0x5a, sizeof(text));
    const size_t len = describe_len % sizeof(text);
    const size_t full = qattn_plan_describe(plan, text, len);
    FUZZ_CHECK(full > 0, "qattn_plan_describe returned 0");
    if (len) {
        FUZZ_CHECK(memchr(text, 0, len) != NULL, "qattn_plan_describe: no NUL within %zu bytes", len);
        FUZZ_CHECK(strlen(text) == (full < len - 1 ? full : len - 1), "qattn_plan_describe: length");
    }
    for (size_t i = len; i < sizeof(text); i++)
        FUZZ_CHECK((uint8_t)text[i] == 0x5a, "qattn_plan_describe wrote past len=%zu", len);
    FUZZ_CHECK(qattn_plan_describe(plan, NULL, 0) == full, "qattn_plan_describe(NULL, 0)");
}

/* Values of input tensor `which` (q, k or v), then the case's NaN/Inf/extreme injections. */
FZ_QUIET static void fill_input(uint8_t *base, const qattn_tensor_desc *t, const fz_values *values, ref_rng *rng,
                                const dense_case *c, int which)
{
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t n = 0; n < t->shape[2]; n++)
                for (int64_t dd = 0; dd < t->shape[3]; dd++)
                    fz_store(base, t->dtype, fz_offset_of(t, b, h, n, dd), fz_draw(values, rng, dd));
    for (int j = 0; j < c->n_inject; j++) {
        if (c->inject[j].tensor != which)
            continue;
        const int64_t count = t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3];
        const int64_t e = (int64_t)(c->inject[j].element % (uint64_t)count);
        const int64_t dd = e % t->shape[3], n = e / t->shape[3] % t->shape[2];
        const int64_t h = e / t->shape[3] / t->shape[2] % t->shape[1];
        const int64_t b = e / t->shape[3] / t->shape[2] / t->shape[1];
        fz_store(base, t->dtype, fz_offset_of(t, b, h, n, dd), c->inject[j].value);
    }
}

/* INT8_FP16 keeps V in fp16: f32 values past 65504 overflow it (a limit of the format, not checked). */
FZ_QUIET static bool fp16_overflow(const uint8_t *v, const qattn_tensor_desc *t)
{
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t n = 0; n < t->shape[2]; n++)
                for (int64_t dd = 0; dd < t->shape[3]; dd++)
                    if (fabs(fz_load(v, t->dtype, fz_offset_of(t, b, h, n, dd))) >= 65504.0)
                        return true;
    return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size, 0};
    qattn_ctx *ctx = fuzz_ctx();
    dense_case c;
    read_case(&in, &c);
    qattn_attention_desc *d = &c.desc;

    size_t tbytes[4];
    const fz_verdict pv = plan_verdict(d, tbytes);
    qattn_plan *plan = (qattn_plan *)(uintptr_t)1;
    qattn_status s = qattn_plan_create(ctx, d, &plan);
    if (s) {
        FUZZ_CHECK(pv != FZ_VALID, "qattn_plan_create refused a valid request: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        FUZZ_CHECK(plan == NULL, "a failed qattn_plan_create left *out set");
        fuzz_check_message(ctx, s, "qattn_plan_create");
        FUZZ_CHECK(qattn_run(NULL, NULL) != QATTN_OK, "qattn_run(NULL)");
        return 0;
    }
    FUZZ_CHECK(pv != FZ_INVALID, "qattn_plan_create accepted an invalid request");
    qattn_plan_info info;
    check_plan_info(plan, d, c.describe_len, &info);

    /* Sizes of every argument; a huge request gets small buffers and must be refused. */
    const int64_t B = d->q.shape[0], Hq = d->q.shape[1], Nq = d->q.shape[2];
    const size_t ws_size = qattn_plan_workspace_size(plan);
    const size_t lse_bytes = d->return_lse ? (size_t)B * (size_t)Hq * (size_t)Nq * 4 : 64;
    /* 0: a span too large to know (over 2^62 bytes), which no buffer here holds */
    const size_t need[N_ROLES] = {tbytes[0], tbytes[1], tbytes[2], tbytes[3], lse_bytes, ws_size};
    const size_t es_in = qattn_dtype_size(d->q.dtype), es_out = qattn_dtype_size(d->o.dtype);
    const size_t align[N_ROLES] = {es_in, es_in, es_in, es_out, 4, 256};
    const bool needed[N_ROLES] = {true, true, true, true, d->return_lse != 0, ws_size > 0};
    size_t total = 0;
    for (int r = 0; r < N_ROLES; r++)
        total += need[r] < HUGE_REQUEST ? need[r] : HUGE_REQUEST;
    const bool huge = total >= HUGE_REQUEST || !tbytes[0] || !tbytes[1] || !tbytes[2] || !tbytes[3];

    role *ro = c.roles;
    for (int r = 0; r < N_ROLES; r++) {
        ro[r].pass = needed[r] || (r == R_LSE && c.pass_lse) || (r == R_WS && c.pass_ws);
        ro[r].bytes = huge ? (need[r] < SMALL_BUFFER ? need[r] : SMALL_BUFFER) : need[r];
        ro[r].align = align[r];
        ro[r].buf = -1;
    }
    /* Buffers: one per group (owned or wrapping an arena), plus wrapped aliases. */
    ref_rng rng;
    ref_rng_seed(&rng, c.seed);
    fz_mem mem = {0};
    int group_buf[N_ROLES], group_arena[N_ROLES];
    size_t group_size[N_ROLES] = {0};
    for (int r = 0; r < N_ROLES; r++) {
        group_buf[r] = group_arena[r] = -1;
        if (ro[r].pass && ro[r].alias_of < 0) {
            const size_t end = ro[r].place + ro[r].bytes + ro[r].tail;
            group_size[ro[r].group] = end > group_size[ro[r].group] ? end : group_size[ro[r].group];
        }
    }
    for (int r = 0; r < N_ROLES; r++) {
        if (!ro[r].pass || ro[r].null)
            continue;
        if (ro[r].foreign) {
            ro[r].buf = fz_foreign(&mem, ro[r].place + ro[r].bytes + ro[r].tail);
            continue;
        }
        if (ro[r].alias_of >= 0)
            continue;
        const int g = ro[r].group;
        if (group_buf[g] < 0) {
            size_t sz = group_size[g];
            const int shrink = ro[g].shrink > ro[r].shrink ? ro[g].shrink : ro[r].shrink;
            sz = sz > (size_t)shrink ? sz - (size_t)shrink : 0;
            if (ro[g].wrapped || ro[r].wrapped) {
                group_arena[g] = fz_arena(&mem, sz + 1024); /* room for aliases on both sides */
                group_buf[g] = fz_wrap(&mem, group_arena[g], 256, sz);
            } else {
                group_buf[g] = fz_owned(&mem, sz);
            }
        }
        ro[r].buf = group_buf[g];
    }
    for (int r = 0; r < N_ROLES; r++) { /* aliases: wrap the memory of another argument's arena */
        if (!ro[r].pass || ro[r].null || ro[r].foreign || ro[r].alias_of < 0)
            continue;
        const int y = ro[r].alias_of, gy = ro[y].group;
        const size_t sz = ro[r].place + ro[r].bytes + ro[r].tail;
        if (group_arena[gy] >= 0 && (int64_t)256 + ro[r].alias_shift >= 0 &&
            (size_t)(256 + ro[r].alias_shift) + sz <= mem.units[group_arena[gy]].size) {
            ro[r].buf = fz_wrap(&mem, group_arena[gy], (size_t)(256 + ro[r].alias_shift), sz);
        } else {
            const int arena = fz_arena(&mem, sz);
            ro[r].buf = fz_wrap(&mem, arena, 0, sz);
        }
    }
    for (int r = 0; r < N_ROLES; r++) {
        if (ro[r].offset & ((size_t)1 << 62))
            ro[r].offset &= ~((size_t)1 << 62);
        else
            ro[r].offset = ro[r].place;
    }

    /* Contents: garbage everywhere, poisoned outputs, then the inputs' values. */
    fz_garbage(&mem, &rng);
    const qattn_tensor_desc *tensors[4] = {&d->q, &d->k, &d->v, &d->o};
    if (!huge) {
        if (ro[R_O].buf >= 0 && ro[R_O].place + need[R_O] <= mem.bufs[ro[R_O].buf].size)
            memset(fz_host(&mem, ro[R_O].buf, ro[R_O].place), 0xff, need[R_O]);
        if (ro[R_LSE].buf >= 0 && ro[R_LSE].place + need[R_LSE] <= mem.bufs[ro[R_LSE].buf].size)
            memset(fz_host(&mem, ro[R_LSE].buf, ro[R_LSE].place), 0xff, need[R_LSE]);
        for (int r = R_Q; r <= R_V; r++) {
            if (ro[r].buf < 0 || ro[r].place + need[r] > mem.bufs[ro[r].buf].size)
                continue;
            fill_input(fz_host(&mem, ro[r].buf, ro[r].place), tensors[r], &c.values[r], &rng, &c, r);
        }
    }
    fz_commit(&mem);

    /* What the run must do. */
    fz_verdict rv = FZ_VALID;
    bool fits = true;
    for (int r = 0; r < N_ROLES; r++) {
        if (!needed[r])
            continue;
        if (!ro[r].pass || ro[r].buf < 0 || ro[r].foreign) {
            rv = FZ_INVALID;
            fits = false;
            continue;
        }
        const size_t bsz = mem.bufs[ro[r].buf].size;
        if (need[r] == 0 || ro[r].offset > bsz || need[r] > bsz - ro[r].offset || ro[r].offset % ro[r].align ||
            !fz_address_aligned(&mem, ro[r].buf, ro[r].offset, ro[r].align)) {
            rv = FZ_INVALID;
            fits = false;
        }
    }
    if (!d->return_lse && c.pass_lse && !ro[R_LSE].null)
        rv = FZ_INVALID;
    if (c.stream)
        rv = FZ_INVALID;
    const int outs[3] = {R_O, R_LSE, R_WS};
    for (int i = 0; i < 3; i++) {
        const int x = outs[i];
        if (!needed[x] || ro[x].buf < 0)
            continue;
        for (int y = 0; y < N_ROLES; y++) {
            if (y == x || !needed[y] || ro[y].buf < 0)
                continue;
            if (fz_overlap(&mem, ro[x].buf, ro[x].offset, need[x], ro[y].buf, ro[y].offset, need[y]))
                rv = FZ_INVALID;
        }
    }
    bool finite = true;
    if (fits) {
        for (int r = R_Q; r <= R_V; r++)
            finite = finite && fz_tensor_finite(fz_before(&mem, ro[r].buf, ro[r].offset), tensors[r]);
        if (!finite && !(d->flags & QATTN_FLAG_NO_FINITE_CHECK))
            rv = FZ_INVALID;
    }

    qattn_run_args args = {
        .q = ro[R_Q].buf >= 0 ? mem.bufs[ro[R_Q].buf].handle : NULL,
        .k = ro[R_K].buf >= 0 ? mem.bufs[ro[R_K].buf].handle : NULL,
        .v = ro[R_V].buf >= 0 ? mem.bufs[ro[R_V].buf].handle : NULL,
        .o = ro[R_O].buf >= 0 ? mem.bufs[ro[R_O].buf].handle : NULL,
        .lse = ro[R_LSE].pass && ro[R_LSE].buf >= 0 ? mem.bufs[ro[R_LSE].buf].handle : NULL,
        .workspace = ro[R_WS].pass && ro[R_WS].buf >= 0 ? mem.bufs[ro[R_WS].buf].handle : NULL,
        .q_offset = ro[R_Q].offset, .k_offset = ro[R_K].offset, .v_offset = ro[R_V].offset,
        .o_offset = ro[R_O].offset, .lse_offset = ro[R_LSE].offset, .workspace_offset = ro[R_WS].offset,
        .stream = c.stream ? (void *)&c : NULL,
    };
    if (c.null_calls) {
        FUZZ_CHECK(qattn_run(plan, NULL) != QATTN_OK, "qattn_run(plan, NULL) succeeded");
        fuzz_check_message(ctx, QATTN_ERR_INVALID_ARGUMENT, "qattn_run(plan, NULL)");
        FUZZ_CHECK(qattn_paged_run(plan, NULL) != QATTN_OK, "qattn_paged_run on a dense plan succeeded");
    }
    s = qattn_run(plan, &args);
    if (s == QATTN_OK)
        s = qattn_ctx_synchronize(ctx);
    if (ro[R_WS].pass && ro[R_WS].buf >= 0)
        fz_allow(&mem, ro[R_WS].buf, ro[R_WS].offset, ws_size); /* scratch, success or not */
    if (s) {
        FUZZ_CHECK(rv != FZ_VALID, "qattn_run refused a valid request: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        fuzz_check_message(ctx, s, "qattn_run");
        if (fits && !finite && rv == FZ_INVALID && s == QATTN_ERR_NONFINITE_INPUT)
            FUZZ_CHECK(strstr(qattn_last_error(ctx), "NaN or Inf") != NULL, "non-finite message");
        fz_check_unchanged(&mem, "failed qattn_run");
    } else {
        FUZZ_CHECK(rv != FZ_INVALID, "qattn_run accepted an invalid request (%s)", huge ? "huge" : "small");
        fz_allow_tensor(&mem, ro[R_O].buf, ro[R_O].offset, &d->o);
        if (d->return_lse)
            fz_allow(&mem, ro[R_LSE].buf, ro[R_LSE].offset, need[R_LSE]);
        fz_check_unchanged(&mem, "qattn_run");
        if (finite && rv == FZ_VALID && !huge) {
            float *lse = NULL;
            if (d->return_lse) {
                lse = malloc(need[R_LSE]);
                FUZZ_CHECK(lse, "harness: out of memory");
                memcpy(lse, fz_after(&mem, ro[R_LSE].buf, ro[R_LSE].offset), need[R_LSE]);
            }
            const bool fp16_v_overflow = info.precision == QATTN_PRECISION_INT8_FP16 &&
                                         fp16_overflow(fz_before(&mem, ro[R_V].buf, ro[R_V].offset), &d->v);
            bound_ctx bc = {.d = d, .info = &info, .q = fz_before(&mem, ro[R_Q].buf, ro[R_Q].offset),
                            .k = fz_before(&mem, ro[R_K].buf, ro[R_K].offset),
                            .v = fz_before(&mem, ro[R_V].buf, ro[R_V].offset),
                            .o = fz_after(&mem, ro[R_O].buf, ro[R_O].offset), .lse = lse};
            if (!fp16_v_overflow)
                check_results(&bc);
            free(lse);
        }
        if (c.rerun) { /* the plan is reusable and its result reproducible */
            uint8_t *first[FZ_MAX_UNITS];
            for (int u = 0; u < mem.n_units; u++) {
                first[u] = malloc(mem.units[u].size ? mem.units[u].size : 1);
                FUZZ_CHECK(first[u], "harness: out of memory");
                memcpy(first[u], mem.units[u].after, mem.units[u].size);
            }
            FUZZ_CHECK(qattn_run(plan, &args) == QATTN_OK, "a second run failed: %s", qattn_last_error(ctx));
            fz_check_unchanged(&mem, "second qattn_run");
            for (int u = 0; u < mem.n_units; u++) {
                memset(mem.units[u].may_change, 0, mem.units[u].size);
                memcpy(mem.units[u].before, first[u], mem.units[u].size);
                free(first[u]);
            }
            if (ro[R_WS].pass && ro[R_WS].buf >= 0)
                fz_allow(&mem, ro[R_WS].buf, ro[R_WS].offset, ws_size);
            fz_check_unchanged(&mem, "second qattn_run differs from the first");
        }
    }
    qattn_plan_destroy(plan);
    fz_release(&mem);
    return 0;
}
