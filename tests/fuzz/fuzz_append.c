/*
 * libFuzzer target: qattn_kv_append into a paged KV cache of every format
 * (f16, bf16, FP8 and INT8 with per-head scales, INT8 with per-row scales),
 * both page layouts, new tokens of any dtype and stride; hostile cache
 * descriptions, token counts, strides, slots (negative, out of range,
 * repeated), per-head scales (0, tiny, NaN, Inf, negative), NaN/Inf tokens,
 * flags and buffer arrangements.
 *
 * Input: an 8-byte header, the values and a seed, one arrangement byte per
 * buffer argument, then mutations until the input ends. A request the
 * header allows must succeed, write exactly the appended rows (and their
 * per-row scales) and store each value within the format's rounding; one it
 * forbids must fail, say why and change nothing.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "numeric.h"

enum { A_KC, A_VC, A_KS, A_VS, A_KN, A_VN, A_SLOTS, N_ARGS };

typedef struct append_case {
    qattn_kv_cache_desc cache;
    qattn_kv_append_args args;
    fz_values values;
    uint64_t seed;
    float scale_factor;          /* per-head scales: amax / qmax times this */
    float bad_scale;             /* replaces one head's scale when set */
    int bad_scale_head;
    bool null_args, null_buffers, null_cache, stream, same_kv;
    int64_t slot_edit[4][2];     /* token, new slot */
    int n_slot_edits;
    float inject[4];
    uint32_t inject_at[4];
    int n_inject;
    fz_arg a[N_ARGS];
} append_case;

static void read_case(fuzz_input *in, append_case *c)
{
    memset(c, 0, sizeof(*c));
    qattn_kv_cache_desc *cd = &c->cache;
    qattn_kv_append_args *ar = &c->args;
    static const int64_t page_sizes[6] = {1, 2, 3, 4, 8, 16};
    static const int64_t dims[6] = {1, 3, 16, 16, 32, 64};
    static const qattn_dtype new_types[3] = {QATTN_DTYPE_F32, QATTN_DTYPE_F16, QATTN_DTYPE_BF16};
    const uint8_t h_pages = fz_u8(in), h_heads = fz_u8(in), h_format = fz_u8(in), h_tokens = fz_u8(in);
    const uint8_t h_new = fz_u8(in), h_flags = fz_u8(in), h_scale = fz_u8(in);
    fz_u8(in); /* spare */
    cd->num_pages = 1 + h_pages % 8;
    cd->page_size = page_sizes[(h_pages >> 3) % 6];
    cd->heads_kv = 1 + h_heads % 3;
    cd->head_dim = dims[(h_heads >> 2) % 6];
    cd->layout = (qattn_kv_layout)((h_format >> 3) & 1);
    switch (h_format % 5) {
    case 0: cd->dtype = QATTN_DTYPE_F16; break;
    case 1: cd->dtype = QATTN_DTYPE_BF16; break;
    case 2: cd->dtype = QATTN_DTYPE_FP8_E4M3, cd->scales = QATTN_KV_SCALES_PER_HEAD; break;
    case 3: cd->dtype = QATTN_DTYPE_I8, cd->scales = QATTN_KV_SCALES_PER_HEAD; break;
    default: cd->dtype = QATTN_DTYPE_I8, cd->scales = QATTN_KV_SCALES_PER_ROW; break;
    }
    ar->num_tokens = h_tokens % 13;
    ar->new_dtype = new_types[h_new % 3];
    const int64_t H = cd->heads_kv, D = cd->head_dim, T = ar->num_tokens, pad = (h_new >> 2) & 3;
    if (h_new & 0x10) { /* head-major [H, T, D] */
        ar->new_stride[0] = D + pad;
        ar->new_stride[1] = (T > 0 ? T : 1) * (D + pad);
    } else {            /* token-major [T, H, D] */
        ar->new_stride[1] = D + pad;
        ar->new_stride[0] = H * (D + pad);
    }
    if (h_flags & 1)
        ar->flags = QATTN_FLAG_NO_FINITE_CHECK;
    c->scale_factor = 0.5f + (float)(h_scale % 8) * 0.25f;
    c->values = fz_pick_values(in, ar->new_dtype);
    c->seed = fz_u64(in);
    fz_args_read(c->a, N_ARGS, in);
    for (int n = 0; n < 12 && fz_more(in); n++) {
        switch (fz_u8(in) % 12) {
        case 0: {
            int64_t *dim[4] = {&cd->num_pages, &cd->page_size, &cd->heads_kv, &cd->head_dim};
            *dim[fz_u8(in) % 4] = fz_hostile_i64(in);
            break;
        }
        case 1: {
            const uint8_t which = fz_u8(in) % 3, v = fz_u8(in);
            if (which == 0)
                cd->dtype = (qattn_dtype)((int)(v % 7) - 1);
            else if (which == 1)
                cd->layout = (qattn_kv_layout)((int)(v % 4) - 1);
            else
                cd->scales = (qattn_kv_scales)((int)(v % 5) - 1);
            break;
        }
        case 2: ar->num_tokens = fz_u8(in) & 1 ? fz_hostile_i64(in) : (int64_t)(fz_u8(in) % 16); break;
        case 3: ar->new_dtype = (qattn_dtype)((int)(fz_u8(in) % 7) - 1); break;
        case 4: {
            int64_t *x = &ar->new_stride[fz_u8(in) & 1];
            const uint8_t how = fz_u8(in);
            *x = how < 128 ? (int64_t)((uint64_t)*x + (uint64_t)((int64_t)(how % 33) - 16)) : fz_hostile_i64(in);
            break;
        }
        case 5:
            if (c->n_slot_edits < 4) {
                c->slot_edit[c->n_slot_edits][0] = fz_u8(in);
                const uint8_t how = fz_u8(in);
                c->slot_edit[c->n_slot_edits++][1] = how < 128 ? (int64_t)how - 8 : fz_hostile_i64(in);
            }
            break;
        case 6:
            c->bad_scale_head = fz_u8(in);
            c->bad_scale = fz_hostile_float(in);
            if (c->bad_scale == 0.f && !signbit(c->bad_scale))
                c->bad_scale = -0.f; /* 0 means "no edit" below; -0 is as bad */
            break;
        case 7:
            if (c->n_inject < 4) {
                c->inject_at[c->n_inject] = fz_u32(in);
                c->inject[c->n_inject++] = fz_hostile_float(in);
            }
            break;
        case 8: ar->flags = fz_u8(in) & 1 ? fz_u32(in) : (uint32_t)(fz_u8(in) & 1); break;
        case 9: {
            const uint8_t which = fz_u8(in) % 5;
            if (which == 0)
                c->null_args = true;
            else if (which == 1)
                c->null_buffers = true;
            else if (which == 2)
                c->null_cache = true;
            else if (which == 3)
                c->stream = true;
            else
                c->same_kv = true;
            break;
        }
        default: fz_args_mutate(c->a, N_ARGS, in); break;
        }
    }
    for (int i = A_KC; i <= A_VS; i++) { /* the cache's buffers have no offsets: they start at byte 0 */
        c->a[i].place = 0;
        c->a[i].hostile = false;
    }
}

static qattn_tensor_desc new_tensor(const qattn_kv_append_args *a, const qattn_kv_cache_desc *c)
{
    return (qattn_tensor_desc){.dtype = a->new_dtype, .shape = {1, c->heads_kv, a->num_tokens, c->head_dim},
                               .stride = {1, a->new_stride[1], a->new_stride[0], 1}};
}

FZ_QUIET static void fill_tokens(uint8_t *base, const qattn_tensor_desc *t, const append_case *c, ref_rng *rng)
{
    for (int64_t h = 0; h < t->shape[1]; h++)
        for (int64_t n = 0; n < t->shape[2]; n++)
            for (int64_t d = 0; d < t->shape[3]; d++)
                fz_store(base, t->dtype, fz_offset_of(t, 0, h, n, d), fz_draw(&c->values, rng, d));
}

/* Stored value checks for one appended row: x[D] the new values, the cache row, its scale. */
FZ_QUIET static void check_row(const qattn_kv_cache_desc *c, const double *x, const uint8_t *row, const float *scale,
                               int64_t token, int64_t h)
{
    const int64_t D = c->head_dim;
    if (c->dtype == QATTN_DTYPE_F16 || c->dtype == QATTN_DTYPE_BF16) {
        for (int64_t d = 0; d < D; d++) {
            uint16_t got, want = c->dtype == QATTN_DTYPE_F16 ? qattn_f32_to_f16((float)x[d]) : qattn_f32_to_bf16((float)x[d]);
            memcpy(&got, row + d * 2, 2);
            FUZZ_CHECK(got == want, "append: token %lld head %lld d %lld stored 0x%04x, want 0x%04x", (long long)token,
                       (long long)h, (long long)d, got, want);
        }
        return;
    }
    const double s = *scale;
    if (c->scales == QATTN_KV_SCALES_PER_ROW) {
        double amax = 0.0;
        for (int64_t d = 0; d < D; d++)
            amax = fmax(amax, fabs(x[d]));
        const double want = amax < 0x1p-100 ? 0.0 : amax / 127.0;
        FUZZ_CHECK(fabs(s - want) <= want * 0x1p-20, "append: token %lld head %lld row scale %g, want %g",
                   (long long)token, (long long)h, s, want);
    }
    for (int64_t d = 0; d < D; d++) {
        if (c->dtype == QATTN_DTYPE_FP8_E4M3) {
            const double y = fmin(fmax(x[d] / s, -448.0), 448.0), got = qattn_e4m3_to_f32(row[d]);
            FUZZ_CHECK(fabs(got - y) <= fmax(0x1p-4 * fabs(y), 0x1p-10) * (1 + 0x1p-10) + 0x1p-20 * fabs(x[d] / s),
                       "append: token %lld head %lld d %lld: fp8 code %g for %g (scale %g)", (long long)token,
                       (long long)h, (long long)d, got, x[d] / s, s);
        } else {
            const double y = s > 0 ? fmin(fmax(x[d] / s, -127.0), 127.0) : 0.0, got = (int8_t)row[d];
            FUZZ_CHECK(fabs(got - y) <= 0.5 + 0x1p-16 * 127.0, "append: token %lld head %lld d %lld: int8 code %g for %g",
                       (long long)token, (long long)h, (long long)d, got, y);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size, 0};
    qattn_ctx *ctx = fuzz_ctx();
    append_case c;
    read_case(&in, &c);
    qattn_kv_cache_desc *cd = &c.cache;
    qattn_kv_append_args *ar = &c.args;
    fz_arg *a = c.a;

    qattn_kv_cache_sizes sizes;
    fz_verdict verdict = fz_cache_verdict(cd, &sizes);
    const bool cache_ok = verdict != FZ_INVALID && sizes.cache_bytes > 0;
    const bool scaled = cache_ok && cd->scales != QATTN_KV_SCALES_NONE;
    const int64_t T = ar->num_tokens;
    size_t new_bytes = 0;
    const qattn_tensor_desc nt = new_tensor(ar, cd);
    fz_verdict token_verdict = FZ_VALID;
    if (cache_ok && T > 0) {
        if (ar->new_dtype != QATTN_DTYPE_F32 && ar->new_dtype != QATTN_DTYPE_F16 && ar->new_dtype != QATTN_DTYPE_BF16)
            token_verdict = FZ_INVALID;
        else
            token_verdict = fz_tensor_verdict(&nt, &new_bytes);
    }
    /* tokens the harness fills (more get small buffers and must be refused) */
    const bool tokens_known = cache_ok && T > 0 && T < ((int64_t)1 << 40) && token_verdict != FZ_INVALID && new_bytes > 0;
    const bool tokens_ok = cache_ok && T >= 0 && T <= 64 && (T == 0 || tokens_known);
    const size_t need[N_ARGS] = {cache_ok ? sizes.cache_bytes : 64, cache_ok ? sizes.cache_bytes : 64,
                                 scaled ? sizes.scale_bytes : 64, scaled ? sizes.scale_bytes : 64,
                                 tokens_known ? new_bytes : 64, tokens_known ? new_bytes : 64,
                                 tokens_known ? (size_t)T * 8 : 64};
    const size_t es = ar->new_dtype < QATTN_DTYPE_COUNT ? qattn_dtype_size(ar->new_dtype) : 1;
    const size_t page_es = cache_ok ? qattn_dtype_size(cd->dtype) : 1; /* pages are accessed element-wise */
    const size_t align[N_ARGS] = {page_es, page_es, 4, 4, es ? es : 1, es ? es : 1, 8};
    size_t total = 0;
    for (int i = 0; i < N_ARGS; i++) {
        a[i].pass = i < A_KS || i > A_VS || scaled || (a[i].wrapped && a[i].tail == 64); /* sometimes stray scales */
        a[i].bytes = need[i];
        a[i].align = align[i];
        a[i].output = i <= A_VS;
        total += need[i] < (1u << 20) ? need[i] : (1u << 20);
    }
    const bool huge = !cache_ok || !tokens_ok || total >= (1u << 20);
    fz_mem mem = {0};
    fz_args_build(&mem, a, N_ARGS, huge ? 4096 : SIZE_MAX);
    if (c.same_kv) /* one buffer object for cache k and v */
        a[A_VC].buf = a[A_KC].buf;

    ref_rng rng;
    ref_rng_seed(&rng, c.seed);
    fz_garbage(&mem, &rng);
    const int64_t H = cache_ok ? cd->heads_kv : 0, capacity = cache_ok ? cd->num_pages * cd->page_size : 0;
    if (!huge && T > 0) {
        uint8_t *kn = fz_arg_host(&mem, &a[A_KN]), *vn = fz_arg_host(&mem, &a[A_VN]);
        if (kn)
            fill_tokens(kn, &nt, &c, &rng);
        if (vn)
            fill_tokens(vn, &nt, &c, &rng);
        for (int i = 0; i < c.n_inject; i++) {
            uint8_t *base = i % 2 ? vn : kn;
            const int64_t e = (int64_t)(c.inject_at[i] % (uint64_t)(T * H * cd->head_dim));
            if (base)
                fz_store(base, ar->new_dtype, fz_offset_of(&nt, 0, e / cd->head_dim % H, e / cd->head_dim / H,
                                                           e % cd->head_dim), c.inject[i]);
        }
        /* slots: distinct cache slots in random order, a few negative (padding), then the edits */
        uint8_t *sl = fz_arg_host(&mem, &a[A_SLOTS]);
        if (sl) {
            for (int64_t t = 0; t < T; t++) {
                int64_t slot = ref_rng_uniform(&rng) < 0.15 ? -1 - (int64_t)(ref_rng_uniform(&rng) * 4) : -1;
                for (int tries = 0; slot == -1 && tries < 8; tries++) {
                    const int64_t pick = (int64_t)(ref_rng_uniform(&rng) * (double)capacity);
                    bool taken = false;
                    for (int64_t u = 0; u < t; u++) {
                        int64_t other;
                        memcpy(&other, sl + u * 8, 8);
                        taken |= other == pick;
                    }
                    if (!taken)
                        slot = pick;
                }
                memcpy(sl + t * 8, &slot, 8);
            }
            for (int i = 0; i < c.n_slot_edits; i++) {
                const int64_t t = c.slot_edit[i][0] % T; /* repeats, out of range, padding */
                memcpy(sl + t * 8, &c.slot_edit[i][1], 8);
            }
        }
    }
    if (!huge && scaled && cd->scales == QATTN_KV_SCALES_PER_HEAD) {
        const float qmax = cd->dtype == QATTN_DTYPE_FP8_E4M3 ? 448.f : 127.f;
        for (int which = A_KS; which <= A_VS; which++) {
            uint8_t *sb = fz_arg_host(&mem, &a[which]);
            const uint8_t *tokens = fz_arg_host(&mem, &a[which == A_KS ? A_KN : A_VN]);
            for (int64_t h = 0; sb && h < H; h++) {
                double amax = 0.0;
                for (int64_t t = 0; tokens && t < T; t++)
                    for (int64_t d = 0; d < cd->head_dim; d++) {
                        const double x = fz_load(tokens, ar->new_dtype, fz_offset_of(&nt, 0, h, t, d));
                        if (isfinite(x))
                            amax = fmax(amax, fabs(x));
                    }
                float s = (float)(amax / qmax) * c.scale_factor;
                if (!(s >= 0x1p-100f))
                    s = 1.f;
                if (c.bad_scale != 0.f && c.bad_scale_head % H == h && which == (c.bad_scale_head & 1 ? A_VS : A_KS))
                    s = c.bad_scale;
                memcpy(sb + h * 4, &s, 4);
            }
        }
    }
    fz_commit(&mem);

    /* What the header requires, in qattn_kv_append's terms. */
    qattn_kv_cache_buffers bufs = {.k = fz_arg_buffer(&mem, &a[A_KC]), .v = fz_arg_buffer(&mem, &a[A_VC]),
                                   .k_scale = fz_arg_buffer(&mem, &a[A_KS]), .v_scale = fz_arg_buffer(&mem, &a[A_VS])};
    ar->cache = c.null_cache ? NULL : cd;
    ar->buffers = c.null_buffers ? NULL : &bufs;
    ar->k_new = fz_arg_buffer(&mem, &a[A_KN]);
    ar->v_new = fz_arg_buffer(&mem, &a[A_VN]);
    ar->slot_mapping = fz_arg_buffer(&mem, &a[A_SLOTS]);
    ar->k_new_offset = a[A_KN].offset;
    ar->v_new_offset = a[A_VN].offset;
    ar->slot_mapping_offset = a[A_SLOTS].offset;
    ar->stream = c.stream ? (void *)&c : NULL;
    if (c.null_args || c.null_buffers || c.null_cache || c.same_kv)
        verdict = FZ_INVALID;
    if (!scaled && (bufs.k_scale || bufs.v_scale))
        verdict = FZ_INVALID;
    if (T < 0 || (ar->flags & ~(uint32_t)QATTN_FLAG_NO_FINITE_CHECK))
        verdict = FZ_INVALID;
    for (int i = 0; i < N_ARGS; i++)
        a[i].required = i <= A_VC || (scaled && i <= A_VS) || (T > 0 && i >= A_KN);
    if (T > 0)
        verdict = fz_worst(verdict, token_verdict);
    if (T > 0 && cache_ok && !tokens_known && token_verdict != FZ_INVALID)
        verdict = fz_worst(verdict, FZ_EITHER); /* a span the harness cannot size */
    if (cache_ok) {
        if (T == 0) { /* nothing to append: the cache's buffers are sized, nothing is written or read */
            fz_arg quiet[N_ARGS];
            memcpy(quiet, a, sizeof(quiet));
            for (int i = 0; i < N_ARGS; i++) {
                quiet[i].pass &= i <= A_VS;
                quiet[i].output = false;
            }
            verdict = fz_worst(verdict, fz_args_verdict(&mem, quiet, N_ARGS));
            if (fz_args_verdict(&mem, a, N_ARGS) == FZ_INVALID) /* aliased cache buffers: harmless here */
                verdict = fz_worst(verdict, FZ_EITHER);
        } else {
            verdict = fz_worst(verdict, fz_args_verdict(&mem, a, N_ARGS));
        }
    }
    if (c.stream)
        verdict = fz_worst(verdict, FZ_EITHER); /* streams are CUDA's; the header says nothing for others */
    const bool checked = !(ar->flags & QATTN_FLAG_NO_FINITE_CHECK);
    bool data_ok = true; /* the tokens, slots and scales are in the domain the checks accept */
    const uint8_t *slot_bytes = NULL;
    if (verdict != FZ_INVALID && cache_ok && tokens_ok && T > 0 && !huge) {
        slot_bytes = fz_before(&mem, a[A_SLOTS].buf, a[A_SLOTS].offset);
        for (int64_t t = 0; t < T; t++) {
            int64_t s1;
            memcpy(&s1, slot_bytes + t * 8, 8);
            if (s1 >= capacity)
                data_ok = false;
            for (int64_t u = 0; u < t && s1 >= 0; u++) {
                int64_t s2;
                memcpy(&s2, slot_bytes + u * 8, 8);
                data_ok &= s1 != s2;
            }
        }
        data_ok &= fz_tensor_finite(fz_before(&mem, a[A_KN].buf, a[A_KN].offset), &nt) &&
                   fz_tensor_finite(fz_before(&mem, a[A_VN].buf, a[A_VN].offset), &nt);
        if (cd->scales == QATTN_KV_SCALES_PER_HEAD)
            for (int which = A_KS; which <= A_VS; which++)
                for (int64_t h = 0; h < H; h++) {
                    float s;
                    memcpy(&s, fz_before(&mem, a[which].buf, h * 4), 4);
                    data_ok &= isfinite(s) && s >= 0x1p-100f;
                }
        if (checked && !data_ok)
            verdict = FZ_INVALID;
    } else if (verdict != FZ_INVALID && T > 0) {
        data_ok = false; /* not filled by the harness: whatever bytes are there decide */
        if (checked)
            verdict = fz_worst(verdict, FZ_EITHER);
    }

    qattn_status s = qattn_kv_append(ctx, c.null_args ? NULL : ar);
    if (s == QATTN_OK)
        s = qattn_ctx_synchronize(ctx);
    if (s) {
        FUZZ_CHECK(verdict != FZ_VALID, "qattn_kv_append refused a valid request: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        fuzz_check_message(ctx, s, "qattn_kv_append");
        fz_check_unchanged(&mem, "failed qattn_kv_append");
        fz_release(&mem);
        return 0;
    }
    FUZZ_CHECK(verdict != FZ_INVALID, "qattn_kv_append accepted an invalid request");
    if (T > 0 && !huge && slot_bytes) {
        /* The rows of the appended slots (and their per-row scales) may change; nothing else. */
        const size_t ces = qattn_dtype_size(cd->dtype);
        for (int64_t t = 0; t < T; t++) {
            int64_t slot;
            memcpy(&slot, slot_bytes + t * 8, 8);
            if (slot < 0 || slot >= capacity)
                continue;
            for (int64_t h = 0; h < H; h++) {
                fz_allow(&mem, a[A_KC].buf, (size_t)fz_cache_row(cd, slot, h) * ces, (size_t)cd->head_dim * ces);
                fz_allow(&mem, a[A_VC].buf, (size_t)fz_cache_row(cd, slot, h) * ces, (size_t)cd->head_dim * ces);
                if (cd->scales == QATTN_KV_SCALES_PER_ROW) {
                    fz_allow(&mem, a[A_KS].buf, (size_t)(slot * H + h) * 4, 4);
                    fz_allow(&mem, a[A_VS].buf, (size_t)(slot * H + h) * 4, 4);
                }
            }
        }
    }
    fz_check_unchanged(&mem, "qattn_kv_append");
    if (T > 0 && !huge && data_ok && verdict == FZ_VALID) {
        const size_t ces = qattn_dtype_size(cd->dtype);
        double *x = malloc((size_t)cd->head_dim * sizeof(double));
        FUZZ_CHECK(x, "harness: out of memory");
        for (int which = 0; which < 2; which++) {
            const uint8_t *tokens = fz_before(&mem, a[which ? A_VN : A_KN].buf, a[which ? A_VN : A_KN].offset);
            const int cache_arg = which ? A_VC : A_KC, scale_arg = which ? A_VS : A_KS;
            for (int64_t t = 0; t < T; t++) {
                int64_t slot;
                memcpy(&slot, slot_bytes + t * 8, 8);
                if (slot < 0)
                    continue;
                for (int64_t h = 0; h < H; h++) {
                    for (int64_t d = 0; d < cd->head_dim; d++)
                        x[d] = fz_load(tokens, ar->new_dtype, fz_offset_of(&nt, 0, h, t, d));
                    float scale = 1.f;
                    if (cd->scales != QATTN_KV_SCALES_NONE)
                        memcpy(&scale, fz_after(&mem, a[scale_arg].buf,
                                                (size_t)(cd->scales == QATTN_KV_SCALES_PER_ROW ? slot * H + h : h) * 4), 4);
                    check_row(cd, x, fz_after(&mem, a[cache_arg].buf, (size_t)fz_cache_row(cd, slot, h) * ces), &scale, t, h);
                }
            }
        }
        free(x);
    }
    fz_release(&mem);
    return 0;
}
