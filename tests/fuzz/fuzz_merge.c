/*
 * libFuzzer target: qattn_merge_states. States [S, R, H, D] and their LSEs
 * [S, R, H] in any strided layout and dtype (empty states with LSE -inf
 * among them), outputs in any layout, an optional LSE output; hostile
 * sizes, strides, dtypes, offsets, NaN/Inf and buffer arrangements.
 *
 * Input: an 8-byte header (sizes, dtypes, layouts), a seed, one arrangement
 * byte per argument (v, s, o, lse), then mutations until the input ends.
 * A request the header allows must succeed and match an fp64 merge within
 * the error of fp32 exponentials; one it forbids must fail, say why and
 * leave every byte unchanged.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

enum { A_V, A_S, A_O, A_LSE, N_ARGS };

typedef struct merge_case {
    qattn_merge_desc desc;
    bool lse, stream;
    fz_values values;
    uint64_t seed;
    uint8_t empty_every;        /* every n-th state is empty (LSE -inf); 0: none */
    float inject[4];            /* values written into s (even) or v (odd) entries */
    uint32_t inject_at[4];
    int n_inject;
    fz_arg args[N_ARGS];
} merge_case;

/* Strides of a tensor whose three outer dims (sizes n[0..2]) are laid out in
 * one of six orders around a contiguous inner run of `inner` elements + pad. */
static void strides3(const int64_t n[3], int64_t inner, uint8_t how, int64_t out[3])
{
    static const int orders[6][3] = {{2, 1, 0}, {1, 2, 0}, {2, 0, 1}, {0, 2, 1}, {1, 0, 2}, {0, 1, 2}};
    const int *order = orders[how % 6];
    int64_t extent = inner + ((how >> 3) & 1) * 3;
    for (int i = 0; i < 3; i++) {
        out[order[i]] = extent;
        extent *= n[order[i]];
    }
}

static qattn_tensor_desc v_tensor(const qattn_merge_desc *d)
{
    return (qattn_tensor_desc){.dtype = d->v_dtype, .shape = {d->num_states, d->rows, d->heads, d->head_dim},
                               .stride = {d->v_stride[0], d->v_stride[1], d->v_stride[2], 1}};
}
static qattn_tensor_desc s_tensor(const qattn_merge_desc *d)
{
    return (qattn_tensor_desc){.dtype = QATTN_DTYPE_F32, .shape = {d->num_states, d->rows, d->heads, 1},
                               .stride = {d->s_stride[0], d->s_stride[1], d->s_stride[2], 1}};
}
static qattn_tensor_desc o_tensor(const qattn_merge_desc *d)
{
    return (qattn_tensor_desc){.dtype = d->o_dtype, .shape = {1, d->rows, d->heads, d->head_dim},
                               .stride = {1, d->o_stride[0], d->o_stride[1], 1}};
}

static void read_case(fuzz_input *in, merge_case *c)
{
    memset(c, 0, sizeof(*c));
    qattn_merge_desc *d = &c->desc;
    static const qattn_dtype types[3] = {QATTN_DTYPE_F32, QATTN_DTYPE_F16, QATTN_DTYPE_BF16};
    static const int64_t dims[8] = {1, 2, 3, 4, 8, 16, 17, 64};
    const uint8_t h_sizes = fz_u8(in), h_dims = fz_u8(in), h_types = fz_u8(in), h_flags = fz_u8(in);
    const uint8_t h_vlayout = fz_u8(in), h_slayout = fz_u8(in), h_olayout = fz_u8(in), h_empty = fz_u8(in);
    d->num_states = 1 + h_sizes % 5;
    d->rows = 1 + (h_sizes >> 3) % 6;
    d->heads = 1 + h_dims % 4;
    d->head_dim = dims[(h_dims >> 2) % 8];
    d->v_dtype = types[h_types % 3];
    d->o_dtype = types[(h_types >> 2) % 3];
    c->lse = h_flags & 1;
    const int64_t vn[3] = {d->num_states, d->rows, d->heads};
    strides3(vn, d->head_dim, h_vlayout, d->v_stride);
    strides3(vn, 1, h_slayout, d->s_stride);
    const int64_t on[3] = {d->rows, d->heads, 1};
    int64_t os[3];
    strides3(on, d->head_dim, h_olayout % 2 ? 1 : 3, os); /* rows outer or heads outer */
    d->o_stride[0] = os[0];
    d->o_stride[1] = os[1];
    c->empty_every = h_empty % 4;
    c->values = fz_pick_values(in, d->v_dtype);
    c->seed = fz_u64(in);
    fz_args_read(c->args, N_ARGS, in);
    for (int n = 0; n < 12 && fz_more(in); n++) {
        const uint8_t op = fz_u8(in) % 8;
        switch (op) {
        case 0: {
            int64_t *dim[4] = {&d->num_states, &d->rows, &d->heads, &d->head_dim};
            *dim[fz_u8(in) % 4] = fz_hostile_i64(in);
            break;
        }
        case 1: {
            int64_t *st[8] = {&d->v_stride[0], &d->v_stride[1], &d->v_stride[2], &d->s_stride[0],
                              &d->s_stride[1], &d->s_stride[2], &d->o_stride[0], &d->o_stride[1]};
            int64_t *x = st[fz_u8(in) % 8];
            const uint8_t how = fz_u8(in);
            *x = how < 128 ? (int64_t)((uint64_t)*x + (uint64_t)((int64_t)(how % 33) - 16)) : fz_hostile_i64(in);
            break;
        }
        case 2:
            if (fz_u8(in) & 1)
                d->v_dtype = (qattn_dtype)((int)(fz_u8(in) % 7) - 1);
            else
                d->o_dtype = (qattn_dtype)((int)(fz_u8(in) % 7) - 1);
            break;
        case 3:
            if (c->n_inject < 4) {
                c->inject_at[c->n_inject] = fz_u32(in);
                c->inject[c->n_inject++] = fz_hostile_float(in);
            }
            break;
        case 4: c->stream = true; break;
        case 5: c->lse = !c->lse; break;
        default: fz_args_mutate(c->args, N_ARGS, in); break;
        }
    }
}

/* Fills states and their LSEs; every `empty_every`-th state is empty (-inf, garbage values). */
FZ_QUIET static void fill(merge_case *c, uint8_t *v, uint8_t *s, ref_rng *rng)
{
    const qattn_merge_desc *d = &c->desc;
    const qattn_tensor_desc vt = v_tensor(d), st = s_tensor(d);
    for (int64_t a = 0; a < d->num_states; a++)
        for (int64_t r = 0; r < d->rows; r++)
            for (int64_t h = 0; h < d->heads; h++) {
                const bool empty = c->empty_every && (a + r + h) % (c->empty_every + 1) == 0;
                if (s)
                    fz_store(s, QATTN_DTYPE_F32, fz_offset_of(&st, a, r, h, 0),
                             empty ? -INFINITY : 20.0 * (ref_rng_uniform(rng) - 0.5));
                for (int64_t e = 0; v && e < d->head_dim; e++)
                    fz_store(v, d->v_dtype, fz_offset_of(&vt, a, r, h, e), fz_draw(&c->values, rng, e));
            }
    const int64_t count = d->num_states * d->rows * d->heads;
    for (int i = 0; i < c->n_inject; i++) {
        const int64_t at = (int64_t)(c->inject_at[i] % (uint64_t)count);
        const int64_t a = at / (d->rows * d->heads), r = at / d->heads % d->rows, h = at % d->heads;
        if (i % 2 == 0 && s)
            fz_store(s, QATTN_DTYPE_F32, fz_offset_of(&st, a, r, h, 0), c->inject[i]);
        else if (v)
            fz_store(v, d->v_dtype, fz_offset_of(&vt, a, r, h, (int64_t)(c->inject_at[i] >> 24) % d->head_dim),
                     c->inject[i]);
    }
}

/* Whether the inputs are in the domain where the merge is defined: finite
 * values, LSEs finite or -inf. */
FZ_QUIET static bool defined_inputs(const merge_case *c, const uint8_t *v, const uint8_t *s)
{
    const qattn_merge_desc *d = &c->desc;
    const qattn_tensor_desc vt = v_tensor(d), st = s_tensor(d);
    for (int64_t a = 0; a < d->num_states; a++)
        for (int64_t r = 0; r < d->rows; r++)
            for (int64_t h = 0; h < d->heads; h++) {
                const double l = fz_load(s, QATTN_DTYPE_F32, fz_offset_of(&st, a, r, h, 0));
                if (isnan(l) || l == INFINITY || fabs(l) > 1e30)
                    return false;
                for (int64_t e = 0; e < d->head_dim; e++)
                    if (!isfinite(fz_load(v, d->v_dtype, fz_offset_of(&vt, a, r, h, e))))
                        return false;
            }
    return true;
}

FZ_QUIET static void check_results(const merge_case *c, const uint8_t *v, const uint8_t *s, const uint8_t *o,
                                   const uint8_t *lse)
{
    const qattn_merge_desc *d = &c->desc;
    const qattn_tensor_desc vt = v_tensor(d), st = s_tensor(d), ot = o_tensor(d);
    for (int64_t r = 0; r < d->rows; r++)
        for (int64_t h = 0; h < d->heads; h++) {
            double m = -INFINITY;
            for (int64_t a = 0; a < d->num_states; a++)
                m = fmax(m, fz_load(s, QATTN_DTYPE_F32, fz_offset_of(&st, a, r, h, 0)));
            const double got_lse = lse ? fz_load(lse, QATTN_DTYPE_F32, r * d->heads + h) : 0.0;
            if (m == -INFINITY) { /* every state empty: zeros and -inf */
                for (int64_t e = 0; e < d->head_dim; e++)
                    FUZZ_CHECK(fz_load(o, d->o_dtype, fz_offset_of(&ot, 0, r, h, e)) == 0.0,
                               "merge of empty states: o != 0");
                FUZZ_CHECK(!lse || got_lse == -INFINITY, "merge of empty states: lse = %g", got_lse);
                continue;
            }
            double total = 0.0;
            for (int64_t a = 0; a < d->num_states; a++)
                total += exp(fz_load(s, QATTN_DTYPE_F32, fz_offset_of(&st, a, r, h, 0)) - m);
            const double ref_lse = m + log(total);
            const double e_w = 0x1p-20 + (fabs(m) + 1.0) * 0x1p-21;
            if (e_w > 1.0) /* LSEs so large that fp32 keeps no digit of their differences */
                continue;
            for (int64_t e = 0; e < d->head_dim; e++) {
                double ref = 0.0, amax = 0.0;
                for (int64_t a = 0; a < d->num_states; a++) {
                    const double l = fz_load(s, QATTN_DTYPE_F32, fz_offset_of(&st, a, r, h, 0));
                    if (l == -INFINITY)
                        continue;
                    const double x = fz_load(v, d->v_dtype, fz_offset_of(&vt, a, r, h, e));
                    ref += exp(l - ref_lse) * x;
                    amax = fmax(amax, fabs(x));
                }
                const double got = fz_load(o, d->o_dtype, fz_offset_of(&ot, 0, r, h, e));
                const double tol = 2.0 * (expm1(2.0 * e_w) + (double)(d->num_states + 4) * 0x1p-23) * amax +
                                   2.0 * fz_dtype_eps(d->o_dtype) * fabs(ref) + fz_dtype_tiny(d->o_dtype);
                if (fabs(ref) + tol >= fz_dtype_max(d->o_dtype) || amax >= 0x1p126) /* past the output's range */
                    continue;
                FUZZ_CHECK(fabs(got - ref) <= tol, "merge: o[%lld,%lld,%lld] = %.9g, fp64 reference %.9g, bound %.3g",
                           (long long)r, (long long)h, (long long)e, got, ref, tol);
            }
            if (lse)
                FUZZ_CHECK(fabs(got_lse - ref_lse) <= 2.0 * (e_w + 0x1p-22 * (fabs(ref_lse) + 1.0)),
                           "merge: lse[%lld,%lld] = %.9g, fp64 reference %.9g", (long long)r, (long long)h, got_lse,
                           ref_lse);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size, 0};
    qattn_ctx *ctx = fuzz_ctx();
    merge_case c;
    read_case(&in, &c);
    const qattn_merge_desc *d = &c.desc;

    /* What the header allows. */
    fz_verdict verdict = FZ_VALID;
    const int64_t dims[4] = {d->num_states, d->rows, d->heads, d->head_dim};
    for (int i = 0; i < 4; i++)
        if (dims[i] <= 0 || dims[i] > INT32_MAX)
            verdict = FZ_INVALID;
    const qattn_dtype dts[2] = {d->v_dtype, d->o_dtype};
    for (int i = 0; i < 2; i++)
        if (dts[i] != QATTN_DTYPE_F32 && dts[i] != QATTN_DTYPE_F16 && dts[i] != QATTN_DTYPE_BF16)
            verdict = FZ_INVALID;
    size_t vb = 0, sb = 0, ob = 0;
    if (verdict != FZ_INVALID) {
        const qattn_tensor_desc vt = v_tensor(d), st = s_tensor(d), ot = o_tensor(d);
        verdict = fz_worst(verdict, fz_tensor_verdict(&vt, &vb));
        verdict = fz_worst(verdict, fz_tensor_verdict(&st, &sb));
        verdict = fz_worst(verdict, fz_tensor_verdict(&ot, &ob));
    }
    const bool shapes_ok = verdict != FZ_INVALID;
    const size_t lse_bytes = shapes_ok ? (size_t)d->rows * (size_t)d->heads * 4 : 64;

    fz_arg *a = c.args;
    const size_t need[N_ARGS] = {vb, sb, ob, lse_bytes};
    const size_t align[N_ARGS] = {qattn_dtype_size(d->v_dtype), 4, qattn_dtype_size(d->o_dtype), 4};
    for (int i = 0; i < N_ARGS; i++) {
        a[i].pass = i != A_LSE || c.lse;
        a[i].bytes = shapes_ok ? need[i] : 64;
        a[i].align = align[i] ? align[i] : 1;
        a[i].output = i >= A_O;
    }
    const size_t total = a[A_V].bytes + a[A_S].bytes + a[A_O].bytes + a[A_LSE].bytes;
    /* spans too large to hold (or to know: the verdict leaves bytes 0) get small buffers */
    const bool huge = !shapes_ok || !vb || !sb || !ob || total > (1u << 20);
    fz_mem mem = {0};
    fz_args_build(&mem, a, N_ARGS, huge ? 4096 : SIZE_MAX);
    for (int i = 0; i < N_ARGS; i++)
        a[i].required = a[i].pass && (i != A_LSE || fz_arg_buffer(&mem, &a[i]) != NULL);
    ref_rng rng;
    ref_rng_seed(&rng, c.seed);
    fz_garbage(&mem, &rng);
    if (!huge) {
        uint8_t *o = fz_arg_host(&mem, &a[A_O]), *l = fz_arg_host(&mem, &a[A_LSE]);
        if (o)
            memset(o, 0xff, a[A_O].bytes);
        if (l)
            memset(l, 0xff, a[A_LSE].bytes);
        fill(&c, fz_arg_host(&mem, &a[A_V]), fz_arg_host(&mem, &a[A_S]), &rng);
    }
    fz_commit(&mem);
    if (shapes_ok)
        verdict = fz_worst(verdict, fz_args_verdict(&mem, a, N_ARGS));
    if (shapes_ok && (!vb || !sb || !ob)) /* a span over 2^62 bytes: no buffer here holds it */
        verdict = FZ_INVALID;
    if (c.stream)
        verdict = FZ_INVALID;

    qattn_merge_args args = {.v = fz_arg_buffer(&mem, &a[A_V]), .s = fz_arg_buffer(&mem, &a[A_S]),
                             .o = fz_arg_buffer(&mem, &a[A_O]), .lse = fz_arg_buffer(&mem, &a[A_LSE]),
                             .v_offset = a[A_V].offset, .s_offset = a[A_S].offset, .o_offset = a[A_O].offset,
                             .lse_offset = a[A_LSE].offset, .stream = c.stream ? (void *)&c : NULL};
    qattn_status s = qattn_merge_states(ctx, d, &args);
    if (s == QATTN_OK)
        s = qattn_ctx_synchronize(ctx);
    if (s) {
        FUZZ_CHECK(verdict != FZ_VALID, "qattn_merge_states refused a valid request: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        fuzz_check_message(ctx, s, "qattn_merge_states");
        fz_check_unchanged(&mem, "failed qattn_merge_states");
    } else {
        FUZZ_CHECK(verdict != FZ_INVALID, "qattn_merge_states accepted an invalid request");
        const qattn_tensor_desc ot = o_tensor(d);
        fz_allow_tensor(&mem, a[A_O].buf, a[A_O].offset, &ot);
        if (args.lse)
            fz_allow(&mem, a[A_LSE].buf, a[A_LSE].offset, lse_bytes);
        fz_check_unchanged(&mem, "qattn_merge_states");
        const uint8_t *v = fz_before(&mem, a[A_V].buf, a[A_V].offset), *sv = fz_before(&mem, a[A_S].buf, a[A_S].offset);
        if (verdict == FZ_VALID && !huge && defined_inputs(&c, v, sv))
            check_results(&c, v, sv, fz_after(&mem, a[A_O].buf, a[A_O].offset),
                          args.lse ? fz_after(&mem, a[A_LSE].buf, a[A_LSE].offset) : NULL);
    }
    fz_release(&mem);
    return 0;
}
