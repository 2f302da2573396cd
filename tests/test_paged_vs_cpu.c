/*
 * One backend's paged KV cache against the CPU backend, through the public
 * API (and src/numeric.h):
 *
 *   test_paged_vs_cpu <backend> [append_cases [attention_cases [garbage_cases]]]
 *
 * The counts are the random cases of each kind (default 60 40 60). The seed
 * is $QATTN_TEST_SEED, else 1, and is printed; every case seeds its own
 * generator from it and its number, so QATTN_TEST_FILTER='*attention_17' (a
 * cmocka glob) repeats that case alone. Exit 77 when the backend is not
 * usable here or has no paged KV cache, and for `cpu`: the cpu backend is the
 * reference (and it checks the tables on every run, so the unchecked-run rules
 * below do not apply to it).
 *
 * append: the same tokens appended on both backends leave the same bytes in
 *   the K/V pages and the scale buffers: every page format (f16, bf16, FP8
 *   and INT8 per head, INT8 per row), input dtype (f32, f16, bf16), both
 *   layouts, head dims that are not multiples of 16, values from 1e-30 to
 *   1e30, rounding ties of every grid, FP8 saturation, fp32 subnormals, zero
 *   rows, tiny and huge per-head scales, padded input strides, input offsets,
 *   padding slots, checks on and off.
 * attention: paged attention agrees with the CPU's within fp32
 *   summation-order differences (every element, relative L1, cosine, LSE) on
 *   random problems (head dims 16..256, page sizes 1..64, GQA groups 1..8 with
 *   3 among them, empty sequences, more queries than keys, causal or not,
 *   planned and forced splits (more than there are pages too), f32/f16/bf16
 *   queries with padded or head-major strides, buffer offsets, with and
 *   without LSE and checks, junk in unused table entries) and on fixed ones:
 *   queries far beyond f16's range, the decode benchmark's shape (GQA 32/8,
 *   D 128, pages of 1 and 16 tokens, split-KV), MQA, odd page sizes. Both
 *   backends' caches must be byte-identical first. Output rows that belong to
 *   no sequence, row padding and the bytes before each buffer offset stay
 *   untouched.
 * merge: merge_states with bf16 states, state-minor LSE strides, empty states
 *   and strided f32 output (its padding untouched).
 * bad input: each kind of bad table is refused with QATTN_ERR_INVALID_ARGUMENT,
 *   a message naming the entry and outputs untouched, while the unchecked run
 *   completes (entries clamped, nothing read outside the cache); random
 *   garbage tables (pages, lengths, indptr, qo_indptr far out of range,
 *   negative, INT32_MIN/MAX) likewise: unchecked runs complete, checked runs
 *   refuse them (or find them valid) and write nothing; NaN and Inf in Q
 *   (QATTN_ERR_NONFINITE_INPUT, nothing written); a zero per-head scale
 *   (refused by the append, nothing written).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "numeric.h"
#include "qattn/qattn.h"
#include "reference.h"

static qattn_ctx *cpu, *dut; /* the reference and the backend under test */
static const char *backend_name;

/* How closely the backend's paged attention must follow the cpu's. The
 * portable backends compute in fp32 like the cpu: summation-order noise. The
 * CUDA kernels multiply on f16/bf16 tensor cores (Q split into a high and a
 * low part where it does not fit, P rounded to the pages' 16-bit type), so
 * they are held to the 16-bit operands' error instead (the bar the CUDA
 * emulator test used: cos 0.99999, relative L1 2e-3, LSE 1e-3). */
typedef struct attn_bars {
    double rel_l1_f32, rel_l1_16, elem_f32, elem_f16, elem_bf16, lse_rel, lse_abs;
} attn_bars;
static attn_bars bars = {1e-5, 1e-4, 2e-5, 2e-3, 1.6e-2, 2e-5, 1e-3};

/* The head dims the random attention cases draw from: those the backend offers. */
static int offered_dims[16], offered_dim_count;
static int probe_dims(void);
static const attn_bars tensor_core_bars = {2e-3, 2e-3, 3e-2, 3e-2, 3e-2, 1e-3, 1e-3};
static uint64_t seed;
static ref_rng rng;

#define MAX_B 8
#define MAX_HKV 8
#define O_POISON 0xcd  /* outputs before a run: finite in every dtype, so a NaN is never mistaken for it */
#define WS_POISON 0xff /* the workspace before a run: NaN everywhere */

#define F16 QATTN_DTYPE_F16
#define BF16 QATTN_DTYPE_BF16
#define F32 QATTN_DTYPE_F32
#define FP8 QATTN_DTYPE_FP8_E4M3
#define I8 QATTN_DTYPE_I8
#define NHD QATTN_KV_NHD
#define HND QATTN_KV_HND
#define NONE QATTN_KV_SCALES_NONE
#define HEAD QATTN_KV_SCALES_PER_HEAD
#define ROW QATTN_KV_SCALES_PER_ROW
#define DENSE QATTN_PAGES_DENSE
#define CSR QATTN_PAGES_CSR

#define assert_ok_on(ctx_, call)                                                                                       \
    do {                                                                                                               \
        qattn_status s_ = (call);                                                                                      \
        if (s_ != QATTN_OK)                                                                                            \
            fail_msg("%s on %s: %s: %s", #call, qattn_ctx_backend(ctx_), qattn_status_str(s_),                        \
                     qattn_last_error(ctx_));                                                                          \
    } while (0)

/* A cmocka case: its group and number seed its generator; spec is its fixed description, if any. */
typedef struct case_ref {
    int group, index;
    const void *spec;
} case_ref;

enum { GROUP_APPEND = 1, GROUP_ATTENTION, GROUP_MERGE, GROUP_BAD_INPUT };

static const case_ref *start_case(void **state)
{
    const case_ref *cr = *state;
    ref_rng_seed(&rng, seed * 0x100000001b3ull + (uint64_t)cr->group * 0x100000000ull + (uint64_t)cr->index);
    return cr;
}

static double uniform(void) { return ref_rng_uniform(&rng); }
static double normal(void) { return ref_rng_normal(&rng); }
static int pick(const int *options, int n) { return options[(int)(uniform() * n)]; }

static void shuffle(int64_t *x, int64_t n)
{
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(uniform() * (double)(i + 1)), t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

/* A buffer holding `bytes` of data, or filled with `fill` when data is NULL. */
static qattn_buffer *make_buffer(qattn_ctx *ctx, const void *data, size_t bytes, uint8_t fill)
{
    qattn_buffer *b = NULL;
    const size_t size = bytes ? bytes : 4;
    assert_ok_on(ctx, qattn_buffer_create(ctx, size, &b));
    if (data && bytes)
        assert_ok_on(ctx, qattn_buffer_upload(b, 0, data, bytes));
    else
        assert_ok_on(ctx, qattn_buffer_fill(b, 0, size, fill));
    return b;
}

static uint8_t *download(qattn_ctx *ctx, const qattn_buffer *b, size_t bytes)
{
    uint8_t *h = malloc(bytes ? bytes : 1);
    assert_non_null(h);
    if (bytes)
        assert_ok_on(ctx, qattn_buffer_download(b, 0, h, bytes));
    return h;
}

static void destroy_buffers(qattn_buffer **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        qattn_buffer_destroy(list[i]);
}

static void free_all(void **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(list[i]);
}

static bool all_bytes(const uint8_t *p, size_t n, uint8_t value)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != value)
            return false;
    return true;
}

/* Fails the case at the first byte where the backend's copy differs from the cpu's. */
static void assert_same_bytes(const char *label, const char *what, const uint8_t *want, const uint8_t *got, size_t n)
{
    size_t diffs = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (want[i] != got[i] && diffs++ == 0)
            first = i;
    if (diffs)
        fail_msg("%s: %s: %zu of %zu bytes differ from the cpu's, first at %zu (cpu 0x%02x, %s 0x%02x)", label, what,
                 diffs, n, first, want[first], backend_name, got[first]);
}

/* ------------------------------------------------------------ the cache */

/* Per-head scales: of[0] for K's heads, of[1] for V's. */
typedef struct head_scales_t {
    float of[2][MAX_HKV];
} head_scales_t;

typedef struct cache_on {
    qattn_ctx *ctx;
    qattn_kv_cache_desc desc;
    qattn_kv_cache_sizes sizes;
    qattn_kv_cache_buffers bufs;
} cache_on;

/* K, V pages and K, V scale buffers filled with fill[0..3]; then the per-head
 * scales (K heads, then V heads) uploaded when the format has them. */
static void cache_create(qattn_ctx *ctx, const qattn_kv_cache_desc *desc, const head_scales_t *head_scale,
                         const uint8_t fill[4], cache_on *c)
{
    memset(c, 0, sizeof(*c));
    c->ctx = ctx;
    c->desc = *desc;
    assert_ok_on(ctx, qattn_kv_cache_bytes(ctx, desc, &c->sizes));
    c->bufs.k = make_buffer(ctx, NULL, c->sizes.cache_bytes, fill[0]);
    c->bufs.v = make_buffer(ctx, NULL, c->sizes.cache_bytes, fill[1]);
    if (desc->scales != NONE) {
        c->bufs.k_scale = make_buffer(ctx, NULL, c->sizes.scale_bytes, fill[2]);
        c->bufs.v_scale = make_buffer(ctx, NULL, c->sizes.scale_bytes, fill[3]);
        if (desc->scales == HEAD && head_scale) {
            assert_ok_on(ctx, qattn_buffer_upload(c->bufs.k_scale, 0, head_scale->of[0], (size_t)desc->heads_kv * 4));
            assert_ok_on(ctx, qattn_buffer_upload(c->bufs.v_scale, 0, head_scale->of[1], (size_t)desc->heads_kv * 4));
        }
    }
}

static void cache_destroy(cache_on *c)
{
    qattn_buffer *all[] = {c->bufs.k, c->bufs.v, c->bufs.k_scale, c->bufs.v_scale};
    destroy_buffers(all, 4);
    memset(c, 0, sizeof(*c));
}

/* Every byte of the pages and scales of the backend's cache equals the cpu's. */
static void assert_same_cache(const char *label, const cache_on *want, const cache_on *got)
{
    static const char *what[4] = {"k pages", "v pages", "k scales", "v scales"};
    assert_int_equal(want->sizes.cache_bytes, got->sizes.cache_bytes);
    assert_int_equal(want->sizes.scale_bytes, got->sizes.scale_bytes);
    const qattn_buffer *w[4] = {want->bufs.k, want->bufs.v, want->bufs.k_scale, want->bufs.v_scale};
    const qattn_buffer *g[4] = {got->bufs.k, got->bufs.v, got->bufs.k_scale, got->bufs.v_scale};
    for (int i = 0; i < 4; i++) {
        if (!w[i])
            continue;
        size_t bytes = i < 2 ? want->sizes.cache_bytes : want->sizes.scale_bytes;
        uint8_t *a = download(want->ctx, w[i], bytes), *b = download(got->ctx, g[i], bytes);
        assert_same_bytes(label, what[i], a, b, bytes);
        free(a);
        free(b);
    }
}

/* New tokens [count, Hkv, D] in `dtype` with element strides `stride`, and their slots (-1: padding). */
typedef struct tokens {
    qattn_dtype dtype;
    int64_t count, stride[2];
    void *k, *v;
    int64_t *slots;
} tokens;

static void tokens_alloc(tokens *t, qattn_dtype dtype, int64_t count, int64_t token_stride, int64_t head_stride)
{
    t->dtype = dtype;
    t->count = count;
    t->stride[0] = token_stride;
    t->stride[1] = head_stride;
    size_t bytes = (size_t)((count ? count : 1) * token_stride) * qattn_dtype_size(dtype);
    t->k = calloc(1, bytes);
    t->v = calloc(1, bytes);
    t->slots = malloc((size_t)(count ? count : 1) * 8);
    assert_true(t->k && t->v && t->slots);
}

static void tokens_free(tokens *t)
{
    free(t->k);
    free(t->v);
    free(t->slots);
}

/* Appends tokens [first, first + n) through buffers holding all of them (so the offsets are used). */
static qattn_status append_tokens(cache_on *c, const tokens *t, int64_t first, int64_t n, uint32_t flags)
{
    const size_t es = qattn_dtype_size(t->dtype), bytes = (size_t)(t->count * t->stride[0]) * es;
    qattn_buffer *kb = make_buffer(c->ctx, t->k, bytes, 0), *vb = make_buffer(c->ctx, t->v, bytes, 0);
    qattn_buffer *sb = make_buffer(c->ctx, t->slots, (size_t)t->count * 8, 0);
    qattn_kv_append_args a = {.cache = &c->desc, .buffers = &c->bufs, .num_tokens = n, .new_dtype = t->dtype,
                              .new_stride = {t->stride[0], t->stride[1]}, .k_new = kb, .v_new = vb,
                              .slot_mapping = sb, .k_new_offset = (size_t)(first * t->stride[0]) * es,
                              .v_new_offset = (size_t)(first * t->stride[0]) * es,
                              .slot_mapping_offset = (size_t)first * 8, .flags = flags};
    qattn_status s = qattn_kv_append(c->ctx, &a);
    qattn_buffer *all[] = {kb, vb, sb};
    destroy_buffers(all, 3);
    return s;
}

static float qmax_of(qattn_dtype dtype) { return dtype == FP8 ? 448.f : 127.f; }

/* Per-head scales: range / qmax, or (range 0) 0.8 x the head's amax / qmax, which saturates some values. */
static void head_scales(const qattn_kv_cache_desc *cache, const tokens *t, const double range[2],
                        head_scales_t *out)
{
    for (int which = 0; which < 2; which++)
        for (int64_t h = 0; h < cache->heads_kv; h++) {
            float amax = 0.f;
            for (int64_t tok = 0; range[which] <= 0 && tok < t->count; tok++)
                for (int64_t d = 0; d < cache->head_dim; d++)
                    amax = fmaxf(amax, fabsf(qattn_load_f(which ? t->v : t->k, t->dtype,
                                                          tok * t->stride[0] + h * t->stride[1] + d)));
            float qmax = qmax_of(cache->dtype);
            out->of[which][h] = range[which] > 0 ? (float)(range[which] / qmax) : amax > 0 ? amax / qmax * 0.8f : 1.f;
        }
}

/* --------------------------------------------------------------- append */

/* A value of the kind `kind` picks: plain, wide magnitudes, rounding ties, tiny, fp32 subnormal, zero. */
static float random_value(int kind, float tie_scale)
{
    switch (kind) {
    case 0: return (float)normal();
    case 1: return (float)(normal() * pow(10.0, uniform() * 60.0 - 30.0));
    case 2: { /* a tie of the target grid after scaling: (n + 0.5) * scale, and E4M3 mid-points */
        float n = (float)(int)(uniform() * 254.0 - 127.0);
        return (n + 0.5f) * tie_scale;
    }
    case 3: return (float)(normal() * 1e-6);
    case 4: return (float)(normal() * 1e-39);
    default: return 0.f;
    }
}

static const struct {
    qattn_dtype dtype;
    qattn_kv_scales scales;
    const char *name;
} page_formats[5] = {{F16, NONE, "f16"}, {BF16, NONE, "bf16"}, {FP8, HEAD, "fp8"}, {I8, HEAD, "int8"},
                     {I8, ROW, "int8row"}};

static const uint8_t append_fill[4] = {0x5a, 0xa5, 0x3c, 0x3c};

/* Appends the same tokens on both backends (the first `checked` with checks on, the rest off); same bytes. */
static void append_both(const char *label, const qattn_kv_cache_desc *desc, const head_scales_t *scales,
                        const uint8_t fill[4], const tokens *t, int64_t checked)
{
    cache_on c[2];
    qattn_ctx *ctxs[2] = {cpu, dut};
    for (int s = 0; s < 2; s++) {
        cache_create(ctxs[s], desc, scales, fill, &c[s]);
        if (checked > 0)
            assert_ok_on(ctxs[s], append_tokens(&c[s], t, 0, checked, 0));
        if (checked < t->count)
            assert_ok_on(ctxs[s], append_tokens(&c[s], t, checked, t->count - checked, QATTN_FLAG_NO_FINITE_CHECK));
    }
    assert_same_cache(label, &c[0], &c[1]);
    cache_destroy(&c[0]);
    cache_destroy(&c[1]);
}

/* Random shapes, formats, input dtypes and values (case c picks the format, input dtype and layout). */
static void append_random_case(void **state)
{
    const int c = start_case(state)->index;
    const int f = c % 5;
    static const qattn_dtype new_dtypes[3] = {F32, F16, BF16};
    const qattn_dtype nd = new_dtypes[(c / 5) % 3];
    const bool eight = page_formats[f].dtype == FP8 || page_formats[f].dtype == I8;
    const int64_t D = eight ? 4 * (1 + (int64_t)(uniform() * 40)) : 1 + (int64_t)(uniform() * 160);
    const int64_t H = 1 + (int64_t)(uniform() * 4), P = 1 + (int64_t)(uniform() * 20);
    const int64_t pages = 1 + (int64_t)(uniform() * 12), T = 1 + (int64_t)(uniform() * (double)(pages * P));
    /* fp32 subnormals too, except where a row's amax would be one (127 / amax overflows: the
     * reference then multiplies 0 by inf, and converts NaN to int8 as C leaves undefined) */
    const int kind = (int)(uniform() * (nd == F32 && page_formats[f].scales != ROW ? 5.0 : 4.0));
    const qattn_kv_cache_desc cache = {.num_pages = pages, .page_size = P, .heads_kv = H, .head_dim = D,
                                       .dtype = page_formats[f].dtype, .layout = (c / 15) % 2 ? HND : NHD,
                                       .scales = page_formats[f].scales};
    head_scales_t scale; /* per-head scales: moderate, or tiny and huge with the wide values */
    for (int w = 0; w < 2; w++)
        for (int64_t h = 0; h < H; h++)
            scale.of[w][h] = (float)pow(10.0, kind == 1 ? uniform() * 60.0 - 30.0 : uniform() * 4.0 - 3.0);
    const float tie_scale = eight ? scale.of[0][0] : 1.f / 1024.f;
    tokens t;
    tokens_alloc(&t, nd, T, H * D, D);
    for (int64_t i = 0; i < T * H * D; i++) {
        float kv[2] = {random_value(kind, tie_scale), random_value(kind == 4 ? 4 : (kind + 1) % 4, tie_scale)};
        if (T > 1 && i >= H * D && i < H * D + D)
            kv[0] = 0.f; /* token 1, head 0 of K: a zero row (amax 0) */
        for (int w = 0; w < 2; w++) { /* values past the input dtype's range: plain ones instead */
            void *dst = w ? t.v : t.k;
            qattn_store_f(dst, nd, i, kv[w]);
            if (!isfinite(qattn_load_f(dst, nd, i)))
                qattn_store_f(dst, nd, i, (float)normal());
        }
    }
    /* distinct slots in random order, some padding */
    int64_t *perm = malloc((size_t)(pages * P) * 8);
    for (int64_t i = 0; i < pages * P; i++)
        perm[i] = i;
    shuffle(perm, pages * P);
    for (int64_t i = 0; i < T; i++)
        t.slots[i] = uniform() < 0.1 ? -1 : perm[i];
    char label[200];
    snprintf(label, sizeof(label), "append %d (%s pages, %s in, %s, D=%lld H=%lld P=%lld T=%lld, values %d)", c,
             page_formats[f].name, qattn_dtype_name(nd), cache.layout == HND ? "HND" : "NHD", (long long)D,
             (long long)H, (long long)P, (long long)T, kind);
    append_both(label, &cache, &scale, append_fill, &t, T);
    free(perm);
    tokens_free(&t);
}

typedef struct append_spec {
    const char *name;
    int64_t page_size, heads_kv, head_dim;
    qattn_dtype dtype;
    qattn_kv_scales scales;
    qattn_kv_layout layout;
    qattn_dtype new_dtype;
    int ties; /* values on rounding ties of the INT8 and E4M3 grids, some saturating E4M3 */
} append_spec;

/*
 * Plain values: N(0, 1) times a per-row magnitude 2^U(-14, 10) plus a
 * per-channel bias on K, every 9th row zero. Ties: multiples of 2^-e (e in
 * 1, 5, 10) up to about +-600, which land on ties of the INT8 and E4M3 grids
 * at scale 1 and 0.5 and saturate E4M3.
 */
static void fill_fixed_tokens(tokens *t, int64_t heads, int64_t head_dim, bool ties)
{
    double bias[256];
    for (int64_t d = 0; d < head_dim; d++)
        bias[d] = 3.0 * normal();
    for (int64_t tok = 0; tok < t->count; tok++)
        for (int64_t h = 0; h < heads; h++)
            for (int which = 0; which < 2; which++) {
                double mag = ldexp(1.0, (int)(uniform() * 24) - 14);
                bool zero = (tok * heads + h) % 9 == 4;
                int e = (int[]){1, 5, 10}[(int)(uniform() * 3)];
                for (int64_t d = 0; d < head_dim; d++) {
                    double x = zero   ? 0.0
                               : ties ? ldexp(nearbyint(normal() * ldexp(200.0, e)), -e)
                                      : (normal() + (which ? 0.0 : bias[d])) * mag;
                    qattn_store_f(which ? t->v : t->k, t->dtype, tok * t->stride[0] + h * t->stride[1] + d, (float)x);
                }
            }
}

/* 61 tokens with padded strides, every 7th a padding slot: 40 appended with checks, the rest without. */
static void append_fixed_case(void **state)
{
    const append_spec *s = start_case(state)->spec;
    const int64_t T = 61, H = s->heads_kv, D = s->head_dim;
    const int64_t num_pages = (T + s->page_size - 1) / s->page_size + 3, capacity = num_pages * s->page_size;
    const qattn_kv_cache_desc cache = {.num_pages = num_pages, .page_size = s->page_size, .heads_kv = H,
                                       .head_dim = D, .dtype = s->dtype, .layout = s->layout, .scales = s->scales};
    tokens t;
    tokens_alloc(&t, s->new_dtype, T, H * (D + 4) + 8, D + 4);
    fill_fixed_tokens(&t, H, D, s->ties);
    int64_t *perm = malloc((size_t)capacity * 8);
    for (int64_t i = 0; i < capacity; i++)
        perm[i] = i;
    shuffle(perm, capacity);
    for (int64_t i = 0; i < T; i++)
        t.slots[i] = i % 7 == 3 ? -1 : perm[i];
    free(perm);
    head_scales_t scale;
    if (s->ties) /* scales 1 and 0.5 keep the ties on the grid */
        for (int64_t h = 0; h < H; h++)
            scale.of[0][h] = scale.of[1][h] = h % 2 ? 0.5f : 1.0f;
    else
        head_scales(&cache, &t, (const double[2]){0, 0}, &scale);
    static const uint8_t fill[4] = {0x5a, 0x3c, 0x11, 0x22};
    append_both(s->name, &cache, &scale, fill, &t, 40);
    tokens_free(&t);
}

/* name, page size, Hkv, D, page dtype, scales, layout, input dtype, ties */
static const append_spec append_specs[] = {
    {"append_f16_from_f32", 16, 2, 128, F16, NONE, NHD, F32, 0},
    {"append_bf16_from_f32_hnd", 7, 3, 64, BF16, NONE, HND, F32, 0},
    {"append_f16_from_bf16_p1", 1, 2, 48, F16, NONE, NHD, BF16, 0},
    {"append_fp8_f32", 16, 2, 128, FP8, HEAD, NHD, F32, 0},
    {"append_fp8_ties_f32", 16, 2, 64, FP8, HEAD, HND, F32, 1},
    {"append_fp8_f16_d256", 5, 2, 256, FP8, HEAD, NHD, F16, 0},
    {"append_int8_head_bf16", 16, 4, 64, I8, HEAD, HND, BF16, 0},
    {"append_int8_head_ties", 16, 2, 128, I8, HEAD, NHD, F32, 1},
    {"append_int8_row_f32", 16, 2, 128, I8, ROW, NHD, F32, 0},
    {"append_int8_row_f16_d80", 3, 2, 80, I8, ROW, HND, F16, 0},
    {"append_int8_row_ties", 16, 1, 64, I8, ROW, NHD, F32, 1},
};

/* ------------------------------------------------------------ attention */

typedef struct attn_spec {
    const char *name;
    int64_t page_size, heads_q, heads_kv, head_dim;
    qattn_dtype dtype;
    qattn_kv_layout layout;
    qattn_kv_scales scales;
    qattn_page_table_kind table;
    qattn_dtype q_dtype; /* and O's */
    int causal, num_splits;
    int64_t batch, kv_len[MAX_B], q_len[MAX_B];
    double q_mag, k_mag;      /* magnitudes of Q and K (0: 1); V is N(0, 1) */
    double k_range, v_range;  /* per-head scales range x magnitude / qmax (0: 0.8 x amax / qmax) */
    int no_lse, no_checks;
    int64_t extra_rows;       /* query rows no sequence owns: never written */
    int64_t table_slack;      /* unused dense-table entries per sequence, holding junk */
    int q_head_major;
    int64_t q_pad_d, q_pad_t, o_pad_t; /* padding after each head's row, each token's rows (elements) */
    size_t q_off, o_off, lse_off, ws_off;
} attn_spec;

/* One problem on the host: what both contexts get. */
typedef struct attn_host {
    attn_spec s;
    qattn_kv_cache_desc cache;
    int64_t total_q, owned_q, max_q, mp, total_pages;
    int32_t qo[MAX_B + 1], indptr[MAX_B + 1], seq_lens[MAX_B], last[MAX_B];
    int32_t *block_table, *indices;
    tokens kv; /* f32 */
    head_scales_t scale;
    int64_t q_stride[2], o_stride[2];
    uint8_t *q;
    size_t q_bytes, o_bytes, lse_bytes, es;
} attn_host;

static void attn_host_make(const attn_spec *spec, attn_host *h)
{
    memset(h, 0, sizeof(*h));
    h->s = *spec;
    const attn_spec *s = &h->s;
    const int64_t B = s->batch, P = s->page_size, Hkv = s->heads_kv, Hq = s->heads_q, D = s->head_dim;
    const double q_mag = s->q_mag > 0 ? s->q_mag : 1.0, k_mag = s->k_mag > 0 ? s->k_mag : 1.0;
    int64_t pages_of[MAX_B], max_pages = 1, tokens_total = 0;
    h->max_q = 1;
    for (int64_t b = 0; b < B; b++) {
        pages_of[b] = (s->kv_len[b] + P - 1) / P;
        h->total_pages += pages_of[b];
        tokens_total += s->kv_len[b];
        max_pages = pages_of[b] > max_pages ? pages_of[b] : max_pages;
        h->max_q = s->q_len[b] > h->max_q ? s->q_len[b] : h->max_q;
        h->qo[b + 1] = (int32_t)(h->qo[b] + s->q_len[b]);
    }
    h->owned_q = h->qo[B];
    h->total_q = h->owned_q + s->extra_rows > 0 ? h->owned_q + s->extra_rows : 1;
    h->mp = max_pages + s->table_slack;
    const int64_t num_pages = h->total_pages + 3; /* a few pages nobody uses */
    h->cache = (qattn_kv_cache_desc){.num_pages = num_pages, .page_size = P, .heads_kv = Hkv, .head_dim = D,
                                     .dtype = s->dtype, .layout = s->layout, .scales = s->scales};
    /* pages in random order; unused dense entries hold anything */
    int64_t *perm = malloc((size_t)num_pages * 8);
    for (int64_t i = 0; i < num_pages; i++)
        perm[i] = i;
    shuffle(perm, num_pages);
    h->block_table = malloc((size_t)(B * h->mp) * 4);
    h->indices = malloc((size_t)(h->total_pages + 1) * 4);
    tokens_alloc(&h->kv, F32, tokens_total, Hkv * D, D);
    int64_t at = 0, tok = 0;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t i = 0; i < h->mp; i++)
            h->block_table[b * h->mp + i] = i < pages_of[b] ? (int32_t)perm[at + i] : uniform() < 0.5 ? -1 : 12345;
        for (int64_t i = 0; i < pages_of[b]; i++)
            h->indices[at + i] = (int32_t)perm[at + i];
        for (int64_t t = 0; t < s->kv_len[b]; t++)
            h->kv.slots[tok++] = perm[at + t / P] * P + t % P;
        at += pages_of[b];
        h->indptr[b + 1] = (int32_t)at;
        h->seq_lens[b] = (int32_t)s->kv_len[b];
        h->last[b] = pages_of[b] ? (int32_t)(s->kv_len[b] - (pages_of[b] - 1) * P) : 1;
    }
    free(perm);
    /* K with a per-channel bias, as real keys have */
    float *k = h->kv.k, *v = h->kv.v;
    for (int64_t i = 0; i < tokens_total * Hkv * D; i++) {
        k[i] = (float)((normal() + (double)((i % D) % 7) - 3.0) * k_mag);
        v[i] = (float)normal();
    }
    const double range[2] = {s->k_range * k_mag, s->v_range};
    head_scales(&h->cache, &h->kv, range, &h->scale);
    /* queries: padded rows, token-major or head-major */
    if (s->q_head_major) {
        h->q_stride[0] = D + s->q_pad_d;
        h->q_stride[1] = h->total_q * (D + s->q_pad_d) + s->q_pad_t;
    } else {
        h->q_stride[1] = D + s->q_pad_d;
        h->q_stride[0] = Hq * (D + s->q_pad_d) + s->q_pad_t;
    }
    h->o_stride[1] = D;
    h->o_stride[0] = Hq * D + s->o_pad_t;
    h->es = qattn_dtype_size(s->q_dtype);
    const int64_t q_elems = (h->total_q - 1) * h->q_stride[0] + (Hq - 1) * h->q_stride[1] + D;
    const int64_t o_elems = (h->total_q - 1) * h->o_stride[0] + (Hq - 1) * h->o_stride[1] + D;
    h->q_bytes = (size_t)q_elems * h->es;
    h->o_bytes = (size_t)o_elems * h->es;
    h->lse_bytes = (size_t)(h->total_q * Hq) * 4;
    h->q = malloc(h->q_bytes);
    for (int64_t i = 0; i < q_elems; i++)
        qattn_store_f(h->q, s->q_dtype, i, (float)(normal() * q_mag));
}

static void attn_host_free(attn_host *h)
{
    free(h->block_table);
    free(h->indices);
    free(h->q);
    tokens_free(&h->kv);
}

/* The cache (appended on this context) and the tables on one context. */
typedef struct attn_device {
    qattn_ctx *ctx;
    cache_on cache;
    qattn_buffer *qo, *block_table, *seq_lens, *indptr, *indices, *last;
} attn_device;

static void attn_device_make(qattn_ctx *ctx, const attn_host *h, attn_device *d)
{
    static const uint8_t fill[4] = {0x7f, 0x7f, 0x7f, 0x7f}; /* unused pages hold garbage */
    const int64_t B = h->s.batch;
    d->ctx = ctx;
    cache_create(ctx, &h->cache, &h->scale, fill, &d->cache);
    if (h->kv.count)
        assert_ok_on(ctx, append_tokens(&d->cache, &h->kv, 0, h->kv.count, 0));
    d->qo = make_buffer(ctx, h->qo, (size_t)(B + 1) * 4, 0);
    d->block_table = make_buffer(ctx, h->block_table, (size_t)(B * h->mp) * 4, 0);
    d->seq_lens = make_buffer(ctx, h->seq_lens, (size_t)B * 4, 0);
    d->indptr = make_buffer(ctx, h->indptr, (size_t)(B + 1) * 4, 0);
    d->indices = make_buffer(ctx, h->indices, (size_t)(h->total_pages + 1) * 4, 0);
    d->last = make_buffer(ctx, h->last, (size_t)B * 4, 0);
}

static void attn_device_free(attn_device *d)
{
    qattn_buffer *all[] = {d->qo, d->block_table, d->seq_lens, d->indptr, d->indices, d->last};
    destroy_buffers(all, 6);
    cache_destroy(&d->cache);
}

/* What a run left: O and LSE buffers whole (offsets included), the kernel and its split count. */
typedef struct attn_output {
    uint8_t *o, *lse;
    char kernel[160];
    int splits;
} attn_output;

/* One run with these flags; outputs downloaded whatever the status. Returns the run's status (or the sync's). */
static qattn_status attn_device_run(const attn_host *h, attn_device *d, uint32_t flags, attn_output *out)
{
    const attn_spec *s = &h->s;
    qattn_ctx *ctx = d->ctx;
    const bool lse_on = !s->no_lse;
    qattn_paged_desc pd = {.cache = h->cache, .table = s->table, .batch = s->batch, .max_pages_per_seq = h->mp,
                           .total_q = h->total_q, .max_q_len = h->max_q, .heads_q = s->heads_q,
                           .q_dtype = s->q_dtype, .q_stride = {h->q_stride[0], h->q_stride[1]},
                           .o_stride = {h->o_stride[0], h->o_stride[1]}, .causal = s->causal,
                           .return_lse = lse_on, .num_splits = s->num_splits, .flags = flags};
    qattn_plan *plan = NULL;
    qattn_status made = qattn_paged_plan_create(ctx, &pd, &plan);
    if (made == QATTN_ERR_UNSUPPORTED && ctx != cpu && *qattn_last_error(ctx)) /* said why: the caller skips */
        return made;
    assert_ok_on(ctx, made);
    qattn_plan_info info;
    assert_ok_on(ctx, qattn_plan_get_info(plan, &info));
    out->splits = info.kv_tile ? (int)((h->mp * s->page_size + info.kv_tile - 1) / info.kv_tile) : 1;
    snprintf(out->kernel, sizeof(out->kernel), "%.140s", info.kernel);
    const size_t ws_bytes = qattn_plan_workspace_size(plan);
    qattn_buffer *qb = make_buffer(ctx, NULL, s->q_off + h->q_bytes, 0);
    assert_ok_on(ctx, qattn_buffer_upload(qb, s->q_off, h->q, h->q_bytes));
    qattn_buffer *ob = make_buffer(ctx, NULL, s->o_off + h->o_bytes, O_POISON);
    qattn_buffer *lb = make_buffer(ctx, NULL, s->lse_off + h->lse_bytes, O_POISON);
    qattn_buffer *ws = ws_bytes ? make_buffer(ctx, NULL, s->ws_off + ws_bytes, WS_POISON) : NULL;
    qattn_paged_args pa = {.cache = &d->cache.bufs, .q = qb, .o = ob, .lse = lse_on ? lb : NULL,
                           .qo_indptr = d->qo, .workspace = ws, .q_offset = s->q_off, .o_offset = s->o_off,
                           .lse_offset = s->lse_off, .workspace_offset = ws ? s->ws_off : 0};
    if (s->table == DENSE) {
        pa.block_table = d->block_table;
        pa.seq_lens = d->seq_lens;
    } else {
        pa.indptr = d->indptr;
        pa.indices = d->indices;
        pa.last_page_len = d->last;
    }
    qattn_status st = qattn_paged_run(plan, &pa);
    qattn_status sync = qattn_ctx_synchronize(ctx);
    if (st == QATTN_OK)
        st = sync;
    out->o = download(ctx, ob, s->o_off + h->o_bytes);
    out->lse = download(ctx, lb, s->lse_off + h->lse_bytes);
    qattn_buffer *all[] = {qb, ob, lb, ws};
    destroy_buffers(all, 4);
    qattn_plan_destroy(plan);
    return st;
}

static void attn_output_free(attn_output *o)
{
    free(o->o);
    free(o->lse);
}

static bool is_poison(const uint8_t *p, size_t es) { return p[0] == O_POISON && p[es - 1] == O_POISON; }

/* Bytes a run must not write: before the offsets, row padding, rows no sequence owns, LSE when not asked for. */
static void assert_untouched(const attn_host *h, const attn_output *out, const char *who)
{
    const attn_spec *s = &h->s;
    const size_t es = h->es, row_bytes = (size_t)(s->heads_q * s->head_dim) * es;
    if (!all_bytes(out->o, s->o_off, O_POISON) || !all_bytes(out->lse, s->lse_off, O_POISON))
        fail_msg("%s: %s wrote before the O or LSE offset", s->name, who);
    for (int64_t r = 0; r < h->total_q; r++) {
        const uint8_t *row = out->o + s->o_off + (size_t)(r * h->o_stride[0]) * es;
        const size_t pad = r + 1 < h->total_q ? (size_t)h->o_stride[0] * es - row_bytes : 0;
        const bool owned = r < h->owned_q;
        if (!all_bytes(row + row_bytes, pad, O_POISON) || (!owned && !all_bytes(row, row_bytes, O_POISON)))
            fail_msg("%s: %s wrote row %lld's %s", s->name, who, (long long)r,
                     owned ? "padding" : "O (no sequence owns it)");
        const uint8_t *lse_row = out->lse + s->lse_off + (size_t)(r * s->heads_q) * 4;
        if ((!owned || s->no_lse) && !all_bytes(lse_row, (size_t)s->heads_q * 4, O_POISON))
            fail_msg("%s: %s wrote row %lld's LSE", s->name, who, (long long)r);
    }
}

/*
 * The backend's outputs against the cpu's: every written element within
 * fp32 summation-order noise (an output ulp or so relative to the row's
 * scale), relative L1 and cosine over all of them, LSE to 2e-5 relative
 * (1e-3 absolute at most), infinities and NaN bit for bit; an element either
 * side left unwritten must be unwritten on both.
 */
static void compare_attention(const attn_host *h, const attn_output *want, const attn_output *got)
{
    const attn_spec *s = &h->s;
    const qattn_dtype qdt = s->q_dtype;
    const size_t es = h->es;
    assert_untouched(h, want, "cpu");
    assert_untouched(h, got, backend_name);
    ref_accum acc = {0};
    double worst = 0, lse_worst = 0;
    char first[240] = "";
    const double elem_tol = qdt == F32 ? bars.elem_f32 : qdt == F16 ? bars.elem_f16 : bars.elem_bf16;
    for (int64_t r = 0; r < h->owned_q; r++)
        for (int64_t hq = 0; hq < s->heads_q; hq++) {
            for (int64_t d = 0; d < s->head_dim; d++) {
                const int64_t i = r * h->o_stride[0] + hq * h->o_stride[1] + d;
                const uint8_t *a = want->o + s->o_off + (size_t)i * es, *b = got->o + s->o_off + (size_t)i * es;
                if (is_poison(a, es) || is_poison(b, es)) {
                    if (memcmp(a, b, es) != 0)
                        fail_msg("%s: row %lld head %lld dim %lld written by %s only", s->name, (long long)r,
                                 (long long)hq, (long long)d, is_poison(a, es) ? backend_name : "cpu");
                    continue;
                }
                const double x = qattn_load_f(want->o + s->o_off, qdt, i), y = qattn_load_f(got->o + s->o_off, qdt, i);
                ref_accum_add(&acc, y, x);
                if (!isfinite(x) || !isfinite(y) || fabs(x - y) > elem_tol * (fabs(x) + 0.1)) {
                    if (!first[0])
                        snprintf(first, sizeof(first), "row %lld head %lld dim %lld: cpu %.9g %s %.9g", (long long)r,
                                 (long long)hq, (long long)d, x, backend_name, y);
                    if (!(fabs(x - y) <= worst)) /* NaN too */
                        worst = fabs(x - y);
                }
            }
            if (s->no_lse)
                continue;
            float a, b;
            memcpy(&a, want->lse + s->lse_off + (size_t)(r * s->heads_q + hq) * 4, 4);
            memcpy(&b, got->lse + s->lse_off + (size_t)(r * s->heads_q + hq) * 4, 4);
            const bool special = !isfinite(a) || !isfinite(b);
            const double err = special ? (memcmp(&a, &b, 4) ? INFINITY : 0.0) : fabs((double)a - b);
            if (err > fmin(bars.lse_rel * fmax(1.0, fabs(a)), bars.lse_abs)) {
                if (!first[0])
                    snprintf(first, sizeof(first), "lse row %lld head %lld: cpu %.9g %s %.9g", (long long)r,
                             (long long)hq, (double)a, backend_name, (double)b);
                lse_worst = fmax(lse_worst, err);
            }
        }
    const ref_metrics m = ref_accum_finish(&acc);
    const double rel_bar = qdt == F32 ? bars.rel_l1_f32 : bars.rel_l1_16;
    const bool ok = !first[0] && m.nonfinite == 0 && m.rel_l1 <= rel_bar && (m.count == 0 || m.cos_sim >= 0.99999);
    print_message("  %-26s %s D=%lld P=%lld Hq/Hkv=%lld/%lld B=%lld q=%s%s %s%s lse=%d checks=%d splits cpu %d %s %d "
                  "(asked %d): cos %.7f relL1 %.2e [%s]\n",
                  s->name, qattn_dtype_name(s->dtype), (long long)s->head_dim, (long long)s->page_size,
                  (long long)s->heads_q, (long long)s->heads_kv, (long long)s->batch, qattn_dtype_name(qdt),
                  s->q_head_major ? " head-major" : "", s->table == CSR ? "csr" : "dense", s->causal ? " causal" : "",
                  !s->no_lse, !s->no_checks, want->splits, backend_name, got->splits, s->num_splits, m.cos_sim,
                  m.rel_l1, got->kernel);
    if (!ok)
        fail_msg("%s: %s and cpu paged attention disagree: relL1 %.2e (bar %.0e), cos %.7f, %lld non-finite, worst "
                 "element %.2e, worst lse %.2e; first: %s",
                 s->name, backend_name, m.rel_l1, rel_bar, m.cos_sim, (long long)m.nonfinite, worst, lse_worst,
                 first[0] ? first : "-");
}

/* Builds the problem on both contexts (same cache bytes), runs it on both, compares. */
static void attention_both(const attn_spec *spec)
{
    attn_host h;
    attn_host_make(spec, &h);
    attn_device d[2];
    attn_output out[2];
    qattn_ctx *ctxs[2] = {cpu, dut};
    const uint32_t flags = spec->no_checks ? QATTN_FLAG_NO_FINITE_CHECK : 0u;
    for (int i = 0; i < 2; i++) {
        attn_device_make(ctxs[i], &h, &d[i]);
        if (i == 1)
            assert_same_cache(spec->name, &d[0].cache, &d[1].cache);
        qattn_status st = attn_device_run(&h, &d[i], flags, &out[i]);
        if (st == QATTN_ERR_UNSUPPORTED && i == 1) { /* a shape this backend does not offer, and says so */
            print_message("[  SKIP    ] %s: unsupported on %s: %s\n", spec->name, backend_name,
                          qattn_last_error(ctxs[1]));
            attn_output_free(&out[0]);
            attn_device_free(&d[0]);
            attn_device_free(&d[1]);
            attn_host_free(&h);
            skip();
        }
        if (st)
            fail_msg("%s: run on %s: %s: %s", spec->name, qattn_ctx_backend(ctxs[i]), qattn_status_str(st),
                     qattn_last_error(ctxs[i]));
    }
    compare_attention(&h, &out[0], &out[1]);
    for (int i = 0; i < 2; i++) {
        attn_output_free(&out[i]);
        attn_device_free(&d[i]);
    }
    attn_host_free(&h);
}

/* A random problem: shapes, formats, tables, strides, offsets, splits, flags. */
static void attention_random_case(void **state)
{
    const int c = start_case(state)->index;
    /* Head dims the backend offers (probed in main): every random case runs. */
    const int *dims = offered_dims;
    static const int page_sizes[] = {1, 2, 3, 5, 8, 16, 16, 32, 64};
    static const int groups[] = {1, 2, 3, 4, 4, 8};
    static const int split_options[] = {0, 0, 0, 1, 2, 3, 5, 16};
    static const qattn_dtype q_dtypes[] = {F16, F16, BF16, F32};
    char name[32];
    snprintf(name, sizeof(name), "attention_%d", c);
    attn_spec s = {.name = name, .head_dim = pick(dims, offered_dim_count), .page_size = pick(page_sizes, 9),
                   .heads_kv = 1 + (int64_t)(uniform() * 3)};
    s.heads_q = s.heads_kv * pick(groups, 6);
    s.batch = 1 + (int64_t)(uniform() * 5);
    const int f = (int)(uniform() * 5);
    s.dtype = page_formats[f].dtype;
    s.scales = page_formats[f].scales;
    const bool prefill = uniform() < 0.4;
    s.causal = uniform() < 0.7;
    s.no_lse = !(uniform() < 0.8);
    s.no_checks = !(uniform() < 0.7);
    s.table = uniform() < 0.5 ? CSR : DENSE;
    s.q_head_major = uniform() < 0.2;
    s.q_dtype = q_dtypes[(int)(uniform() * 4)];
    for (int64_t b = 0; b < s.batch; b++) {
        s.kv_len[b] = uniform() < 0.1 ? 0 : (int64_t)(uniform() * 300);
        s.q_len[b] = prefill ? (int64_t)(uniform() * 40) : (uniform() < 0.8 ? 1 : 0);
        if (prefill && uniform() < 0.7 && s.q_len[b] > s.kv_len[b])
            s.q_len[b] = s.kv_len[b];
    }
    s.extra_rows = (int64_t)(uniform() * 3);
    s.table_slack = uniform() < 0.3 ? (int64_t)(uniform() * 4) : 0;
    s.layout = uniform() < 0.5 ? HND : NHD;
    s.k_range = 6.0; /* K is N(0, 1) plus a bias in [-3, 3]: some codes saturate */
    s.v_range = 4.5;
    s.q_pad_d = uniform() < 0.5 ? 0 : 8;
    s.q_pad_t = uniform() < 0.5 ? 0 : 16;
    s.o_pad_t = uniform() < 0.5 ? 0 : 8;
    s.q_off = 16 * (size_t)(uniform() * 4);
    s.o_off = 16 * (size_t)(uniform() * 4);
    s.lse_off = 4 * (size_t)(uniform() * 8);
    s.ws_off = 256 * (size_t)(uniform() * 3);
    s.num_splits = pick(split_options, 8);
    attention_both(&s);
}

static void attention_fixed_case(void **state) { attention_both(start_case(state)->spec); }

static const attn_spec attention_specs[] = {
    /* Q rows padded by 8 elements; per-head scales at 0.8 x amax (some codes saturate) */
    {.name = "attn_f32q_f16_d256_split", .page_size = 16, .heads_q = 4, .heads_kv = 2, .head_dim = 256,
     .dtype = F16, .layout = NHD, .table = DENSE, .q_dtype = F32, .causal = 1, .batch = 2, .kv_len = {300, 40},
     .q_len = {1, 1}, .q_pad_d = 8},
    {.name = "attn_bf16q_bf16_d48_csr", .page_size = 5, .heads_q = 8, .heads_kv = 2, .head_dim = 48,
     .dtype = BF16, .layout = HND, .table = CSR, .q_dtype = BF16, .causal = 1, .batch = 3, .kv_len = {1, 77, 130},
     .q_len = {1, 2, 3}, .q_pad_d = 8},
    {.name = "attn_f16q_fp8_gqa8_d96", .page_size = 16, .heads_q = 8, .heads_kv = 1, .head_dim = 96, .dtype = FP8,
     .scales = HEAD, .layout = NHD, .table = DENSE, .q_dtype = F16, .num_splits = 2, .batch = 2,
     .kv_len = {200, 9}, .q_len = {1, 1}, .q_pad_d = 8},
    {.name = "attn_f32q_int8row_prefill", .page_size = 16, .heads_q = 4, .heads_kv = 2, .head_dim = 64, .dtype = I8,
     .scales = ROW, .layout = NHD, .table = CSR, .q_dtype = F32, .causal = 1, .batch = 2, .kv_len = {150, 64},
     .q_len = {70, 64}, .q_pad_d = 8},
    {.name = "attn_f16q_int8head_mqa_d160", .page_size = 8, .heads_q = 2, .heads_kv = 1, .head_dim = 160,
     .dtype = I8, .scales = HEAD, .layout = HND, .table = DENSE, .q_dtype = F16, .causal = 1, .num_splits = 5,
     .batch = 2, .kv_len = {90, 33}, .q_len = {4, 1}, .q_pad_d = 8},
    {.name = "attn_f16q_f16_empty_seq", .page_size = 16, .heads_q = 2, .heads_kv = 2, .head_dim = 64, .dtype = F16,
     .layout = NHD, .table = DENSE, .q_dtype = F16, .causal = 1, .num_splits = 3, .batch = 3, .kv_len = {0, 50, 20},
     .q_len = {1, 2, 0}, .q_pad_d = 8},
    /* queries beyond f16's range over tiny keys; the decode benchmark's shape; MQA prefill on odd pages */
    {.name = "f32_q_f16_pages_huge_q", .page_size = 16, .heads_q = 8, .heads_kv = 2, .head_dim = 128, .dtype = F16,
     .layout = NHD, .table = DENSE, .q_dtype = F32, .causal = 1, .batch = 2, .kv_len = {70, 200}, .q_len = {1, 3},
     .q_mag = 2e5, .k_mag = 1e-5},
    {.name = "bf16_q_f16_pages_huge_q", .page_size = 16, .heads_q = 4, .heads_kv = 2, .head_dim = 64, .dtype = F16,
     .layout = HND, .table = CSR, .q_dtype = BF16, .causal = 1, .batch = 2, .kv_len = {33, 90}, .q_len = {2, 1},
     .q_mag = 3e6, .k_mag = 1e-6},
    {.name = "f32_q_fp8_pages", .page_size = 16, .heads_q = 8, .heads_kv = 2, .head_dim = 128, .dtype = FP8,
     .scales = HEAD, .layout = NHD, .table = CSR, .q_dtype = F32, .causal = 1, .num_splits = 2, .batch = 2,
     .kv_len = {150, 61}, .q_len = {1, 1}, .k_range = 4.5, .v_range = 4.5},
    {.name = "bf16_q_int8_row_prefill", .page_size = 16, .heads_q = 4, .heads_kv = 2, .head_dim = 64, .dtype = I8,
     .scales = ROW, .layout = NHD, .table = DENSE, .q_dtype = BF16, .causal = 1, .batch = 2, .kv_len = {80, 45},
     .q_len = {40, 9}},
    {.name = "f32_q_bf16_pages", .page_size = 32, .heads_q = 8, .heads_kv = 4, .head_dim = 128, .dtype = BF16,
     .layout = NHD, .table = DENSE, .q_dtype = F32, .causal = 1, .batch = 2, .kv_len = {100, 31}, .q_len = {2, 1}},
    {.name = "bench_shape_f16_p16", .page_size = 16, .heads_q = 32, .heads_kv = 8, .head_dim = 128, .dtype = F16,
     .layout = NHD, .table = DENSE, .q_dtype = F16, .causal = 1, .batch = 2, .kv_len = {1500, 700},
     .q_len = {1, 1}},
    {.name = "bench_shape_f16_p16_split4", .page_size = 16, .heads_q = 32, .heads_kv = 8, .head_dim = 128,
     .dtype = F16, .layout = NHD, .table = CSR, .q_dtype = F16, .causal = 1, .num_splits = 4, .batch = 2,
     .kv_len = {1500, 700}, .q_len = {1, 1}},
    {.name = "bench_shape_fp8_p1", .page_size = 1, .heads_q = 32, .heads_kv = 8, .head_dim = 128, .dtype = FP8,
     .scales = HEAD, .layout = NHD, .table = DENSE, .q_dtype = F16, .causal = 1, .batch = 1, .kv_len = {1200},
     .q_len = {1}, .k_range = 4.5, .v_range = 4.5},
    {.name = "bench_shape_int8_p1_hnd", .page_size = 1, .heads_q = 32, .heads_kv = 8, .head_dim = 128, .dtype = I8,
     .scales = HEAD, .layout = HND, .table = CSR, .q_dtype = F16, .causal = 1, .batch = 2, .kv_len = {300, 513},
     .q_len = {1, 1}, .k_range = 4.5, .v_range = 4.5},
    {.name = "odd_page_mqa_prefill", .page_size = 5, .heads_q = 16, .heads_kv = 1, .head_dim = 64, .dtype = F16,
     .layout = NHD, .table = CSR, .q_dtype = F16, .causal = 1, .batch = 3, .kv_len = {37, 12, 64},
     .q_len = {5, 12, 3}},
};

/* ---------------------------------------------------------------- merge */

/* bf16 states with state-minor LSE strides, empty states, a row whose states are all empty; strided f32 output. */
static void merge_case(void **state)
{
    start_case(state);
    const int64_t S = 5, R = 7, H = 3, D = 80, o_head = D + 4, o_row = H * o_head;
    const int64_t vs[3] = {R * H * (D + 16), H * (D + 16), D + 16}, ss[3] = {1, S * H, S};
    const size_t v_bytes = (size_t)(S * vs[0]) * 2, s_bytes = (size_t)(R * S * H) * 4;
    const size_t o_bytes = (size_t)(R * o_row) * 4, lse_bytes = (size_t)(R * H) * 4;
    uint16_t *v = calloc(1, v_bytes);
    float *lse = malloc(s_bytes);
    for (int64_t i = 0; i < S * vs[0]; i++)
        v[i] = qattn_f32_to_bf16((float)normal());
    for (int64_t i = 0; i < R * S * H; i++)
        lse[i] = i % 11 == 5 ? -INFINITY : (float)(3.0 * normal());
    for (int64_t st = 0; st < S; st++) /* row 2, head 1: every state empty */
        lse[2 * ss[1] + 1 * ss[2] + st * ss[0]] = -INFINITY;
    const qattn_merge_desc md = {.num_states = S, .rows = R, .heads = H, .head_dim = D, .v_dtype = BF16,
                                 .o_dtype = F32, .v_stride = {vs[0], vs[1], vs[2]}, .s_stride = {ss[0], ss[1], ss[2]},
                                 .o_stride = {o_row, o_head}};
    float *out[2], *lout[2];
    qattn_ctx *ctxs[2] = {cpu, dut};
    for (int i = 0; i < 2; i++) {
        qattn_ctx *ctx = ctxs[i];
        qattn_buffer *vb = make_buffer(ctx, v, v_bytes, 0), *sb = make_buffer(ctx, lse, s_bytes, 0);
        qattn_buffer *ob = make_buffer(ctx, NULL, o_bytes, 0x7f), *lb = make_buffer(ctx, NULL, lse_bytes, 0);
        qattn_merge_args ma = {.v = vb, .s = sb, .o = ob, .lse = lb};
        assert_ok_on(ctx, qattn_merge_states(ctx, &md, &ma));
        assert_ok_on(ctx, qattn_ctx_synchronize(ctx));
        out[i] = (float *)download(ctx, ob, o_bytes);
        lout[i] = (float *)download(ctx, lb, lse_bytes);
        qattn_buffer *all[] = {vb, sb, ob, lb};
        destroy_buffers(all, 4);
    }
    ref_accum acc = {0};
    double lse_err = 0;
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < H; h++) {
            for (int64_t d = 0; d < o_head; d++) {
                const int64_t i = r * o_row + h * o_head + d;
                if (d < D) {
                    ref_accum_add(&acc, out[1][i], out[0][i]);
                } else if (!all_bytes((const uint8_t *)&out[0][i], 4, 0x7f) ||
                           !all_bytes((const uint8_t *)&out[1][i], 4, 0x7f)) {
                    fail_msg("merge wrote the padding after row %lld head %lld", (long long)r, (long long)h);
                }
            }
            const float a = lout[0][r * H + h], b = lout[1][r * H + h];
            lse_err = isinf(a) || isinf(b) ? (a == b ? lse_err : INFINITY) : fmax(lse_err, fabs((double)a - b));
        }
    const ref_metrics m = ref_accum_finish(&acc);
    print_message("  merge_bf16_states vs cpu: relL1 %.2e lse %.1e\n", m.rel_l1, lse_err);
    assert_int_equal(m.nonfinite, 0);
    assert_true(m.rel_l1 <= 1e-5);
    assert_true(lse_err <= 1e-5);
    void *heap[] = {v, lse, out[0], out[1], lout[0], lout[1]};
    free_all(heap, 6);
}

/* ------------------------------------------------------------ bad input */

/* A table entry: mostly plausible, sometimes far out of range or negative. */
static int32_t garbage(int32_t plausible)
{
    double u = uniform();
    if (u < 0.5)
        return plausible;
    if (u < 0.65)
        return -1 - (int32_t)(uniform() * 1000);
    if (u < 0.8)
        return (int32_t)(uniform() * 2147483647.0);
    return (int32_t)(uniform() * 3.0 * (plausible + 1));
}

/* Random garbage in some tables: unchecked, the run completes; checked, it is refused and writes nothing
 * (unless the tables were valid after all). */
static void garbage_random_case(void **state)
{
    const int c = start_case(state)->index;
    static const qattn_dtype dtypes[] = {F16, FP8, I8, I8};
    const int f = (int)(uniform() * 4);
    enum { B = 3, mp = 4 };
    const int64_t D = uniform() < 0.5 ? 64 : 128, P = 1 + (int64_t)(uniform() * 16), Hkv = 2, Hq = 4;
    const int64_t pages = 6, total_q = 6, max_q = 3;
    const qattn_kv_cache_desc desc = {.num_pages = pages, .page_size = P, .heads_kv = Hkv, .head_dim = D,
                                      .dtype = dtypes[f], .layout = uniform() < 0.5 ? HND : NHD,
                                      .scales = f == 0 ? NONE : f == 3 ? ROW : HEAD};
    static const uint8_t fill[4] = {0x11, 0x11, 0x3c, 0x3c};
    cache_on cache;
    cache_create(dut, &desc, NULL, fill, &cache);
    const bool csr = uniform() < 0.5;
    int32_t qo[B + 1], table[B * mp], lens[B], indptr[B + 1], indices[8], last[B];
    const int target = (int)(uniform() * 4); /* the query rows, the pages, the lengths / indptr, or all */
    for (int b = 0; b <= B; b++) {
        qo[b] = target == 0 || target == 3 ? garbage(2 * b) : 2 * b;
        indptr[b] = target >= 2 ? garbage(2 * b) : 2 * b;
    }
    for (int i = 0; i < B * mp; i++)
        table[i] = target == 1 || target == 3 ? garbage(i % (int32_t)pages) : i % (int32_t)pages;
    for (int i = 0; i < 8; i++)
        indices[i] = target == 1 || target == 3 ? garbage(i % (int32_t)pages) : i % (int32_t)pages;
    for (int b = 0; b < B; b++) {
        lens[b] = target >= 2 ? garbage((int32_t)(P * 2)) : (int32_t)(P * 2);
        last[b] = target >= 2 ? garbage((int32_t)P) : (int32_t)P;
    }
    const size_t q_bytes = (size_t)(total_q * Hq * D) * 2, lse_bytes = (size_t)(total_q * Hq) * 4;
    uint16_t *qh = malloc(q_bytes);
    for (size_t i = 0; i < q_bytes / 2; i++)
        qh[i] = qattn_f32_to_f16((float)normal());
    qattn_buffer *qb = make_buffer(dut, qh, q_bytes, 0), *ob = make_buffer(dut, NULL, q_bytes, 0);
    qattn_buffer *lb = make_buffer(dut, NULL, lse_bytes, 0), *qob = make_buffer(dut, qo, sizeof(qo), 0);
    qattn_buffer *tb = make_buffer(dut, table, sizeof(table), 0), *sb = make_buffer(dut, lens, sizeof(lens), 0);
    qattn_buffer *ib = make_buffer(dut, indptr, sizeof(indptr), 0);
    qattn_buffer *xb = make_buffer(dut, indices, sizeof(indices), 0), *pb = make_buffer(dut, last, sizeof(last), 0);
    for (int checked = 0; checked < 2; checked++) {
        const qattn_paged_desc pd = {.cache = desc, .table = csr ? CSR : DENSE, .batch = B, .max_pages_per_seq = mp,
                                     .total_q = total_q, .max_q_len = max_q, .heads_q = Hq, .q_dtype = F16,
                                     .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = uniform() < 0.5,
                                     .return_lse = 1, .num_splits = (int)(uniform() * 4),
                                     .flags = checked ? 0u : QATTN_FLAG_NO_FINITE_CHECK};
        qattn_plan *plan = NULL;
        assert_ok_on(dut, qattn_paged_plan_create(dut, &pd, &plan));
        const size_t ws_bytes = qattn_plan_workspace_size(plan);
        qattn_buffer *ws = ws_bytes ? make_buffer(dut, NULL, ws_bytes, WS_POISON) : NULL;
        assert_ok_on(dut, qattn_buffer_fill(ob, 0, q_bytes, O_POISON));
        qattn_paged_args pa = {.cache = &cache.bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = qob, .workspace = ws};
        if (csr) {
            pa.indptr = ib;
            pa.indices = xb;
            pa.last_page_len = pb;
        } else {
            pa.block_table = tb;
            pa.seq_lens = sb;
        }
        const qattn_status st = qattn_paged_run(plan, &pa), sync = qattn_ctx_synchronize(dut);
        if (!checked && (st != QATTN_OK || sync != QATTN_OK))
            fail_msg("garbage %d (tables %d): the unchecked run did not complete: %s: %s", c, target,
                     qattn_status_str(st ? st : sync), qattn_last_error(dut));
        if (checked && st != QATTN_OK) {
            uint8_t *out = download(dut, ob, q_bytes);
            const bool untouched = all_bytes(out, q_bytes, O_POISON);
            free(out);
            if (st != QATTN_ERR_INVALID_ARGUMENT || !untouched)
                fail_msg("garbage %d (tables %d): the checked run gave %s (%s), outputs %s", c, target,
                         qattn_status_str(st), qattn_last_error(dut), untouched ? "untouched" : "WRITTEN");
        }
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
    }
    qattn_buffer *all[] = {qb, ob, lb, qob, tb, sb, ib, xb, pb};
    destroy_buffers(all, 9);
    cache_destroy(&cache);
    free(qh);
}

/* One bad entry in otherwise valid tables, and the words the refusal must contain. */
typedef struct bad_table {
    const char *name;
    qattn_page_table_kind table;
    int what; /* see bad_table_case */
    const char *message;
} bad_table;

static const bad_table bad_tables[] = {
    {"bad_qo_first", DENSE, 0, "qo_indptr[0]"},
    {"bad_qo_range", CSR, 1, "qo_indptr[1..2]"},
    {"bad_seq_len", DENSE, 2, "seq_lens[1]"},
    {"bad_dense_page", DENSE, 3, "sequence 1's page 2 is 1000000"},
    {"bad_negative_page", DENSE, 4, "sequence 0's page 0 is -7"},
    {"bad_indptr", CSR, 5, "indptr[1..2]"},
    {"bad_last_page_len", CSR, 6, "last_page_len[0]"},
    {"bad_csr_page", CSR, 7, "sequence 1's page 0 is 99"},
    {"bad_csr_too_long", CSR, 8, "more than max_pages_per_seq"},
    {"bad_indptr_past_indices", CSR, 9, "inside the"},
};

/* Checked: refused with the entry named and nothing written; unchecked (forced splits): completes. */
static void bad_table_case(void **state)
{
    const bad_table *bt = start_case(state)->spec;
    /* 2 sequences of 40 and 50 tokens in pages of 16 (3 and 4 pages), 2 queries each, Hq=4 Hkv=2 D=64 f16 */
    const int64_t P = 16, H = 2, Hq = 4, D = 64, max_pages = 4, total_q = 4;
    const qattn_kv_cache_desc desc = {.num_pages = 8, .page_size = P, .heads_kv = H, .head_dim = D, .dtype = F16};
    static const uint8_t fill[4] = {0x5a, 0x3c, 0, 0};
    cache_on cache;
    cache_create(dut, &desc, NULL, fill, &cache);
    uint16_t q[4 * 4 * 64];
    for (size_t i = 0; i < sizeof(q) / 2; i++)
        q[i] = qattn_f32_to_f16((float)normal());
    int32_t qo[3] = {0, 2, 4}, block[2 * 4] = {0, 1, 2, -1, 3, 4, 5, 6}, lens[2] = {40, 50};
    int32_t ip[3] = {0, 3, 7}, ix[8] = {0, 1, 2, 3, 4, 5, 6, 0}, last[2] = {8, 2};
    switch (bt->what) {
    case 0: qo[0] = -1; break;
    case 1: qo[2] = 1; break;
    case 2: lens[1] = 65; break;
    case 3: block[4 + 2] = 1000000; break;
    case 4: block[0] = -7; break;
    case 5: ip[2] = 2; break;
    case 6: last[0] = 0; break;
    case 7: ix[3] = 99; break;
    case 8: ip[2] = 8; break; /* 5 pages > max_pages_per_seq = 4 */
    default: ip[2] = 9; break; /* 9 entries > the 8-entry indices buffer */
    }
    qattn_buffer *qb = make_buffer(dut, q, sizeof(q), 0), *qob = make_buffer(dut, qo, sizeof(qo), 0);
    qattn_buffer *t1, *t2, *t3 = NULL;
    if (bt->table == DENSE) {
        t1 = make_buffer(dut, block, sizeof(block), 0);
        t2 = make_buffer(dut, lens, sizeof(lens), 0);
    } else {
        t1 = make_buffer(dut, ip, sizeof(ip), 0);
        t2 = make_buffer(dut, ix, sizeof(ix), 0);
        t3 = make_buffer(dut, last, sizeof(last), 0);
    }
    for (int checked = 1; checked >= 0; checked--) {
        const qattn_paged_desc pd = {.cache = desc, .table = bt->table, .batch = 2, .max_pages_per_seq = max_pages,
                                     .total_q = total_q, .max_q_len = 2, .heads_q = Hq, .q_dtype = F16,
                                     .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1, .return_lse = 1,
                                     .num_splits = checked ? 0 : 2, .flags = checked ? 0u : QATTN_FLAG_NO_FINITE_CHECK};
        qattn_plan *plan = NULL;
        assert_ok_on(dut, qattn_paged_plan_create(dut, &pd, &plan));
        const size_t ws_bytes = qattn_plan_workspace_size(plan);
        qattn_buffer *ob = make_buffer(dut, NULL, sizeof(q), O_POISON), *lb = make_buffer(dut, NULL, 64, O_POISON);
        qattn_buffer *ws = ws_bytes ? make_buffer(dut, NULL, ws_bytes, WS_POISON) : NULL;
        qattn_paged_args pa = {.cache = &cache.bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = qob, .workspace = ws};
        if (bt->table == DENSE) {
            pa.block_table = t1;
            pa.seq_lens = t2;
        } else {
            pa.indptr = t1;
            pa.indices = t2;
            pa.last_page_len = t3;
        }
        const qattn_status st = qattn_paged_run(plan, &pa), sync = qattn_ctx_synchronize(dut);
        const char *msg = qattn_last_error(dut);
        if (!checked) {
            if (st || sync)
                fail_msg("%s: the unchecked run over a bad table did not complete: %s: %s", bt->name,
                         qattn_status_str(st ? st : sync), msg);
            print_message("  %-26s unchecked: the run completes (entries clamped)\n", bt->name);
        } else {
            uint8_t *o = download(dut, ob, sizeof(q)), *l = download(dut, lb, 64);
            const bool untouched = all_bytes(o, sizeof(q), O_POISON) && all_bytes(l, 64, O_POISON);
            free(o);
            free(l);
            if (st != QATTN_ERR_INVALID_ARGUMENT || !strstr(msg, bt->message) || !untouched)
                fail_msg("%s: checked run: %s, outputs %s, message \"%s\" (wanted \"%s\")", bt->name,
                         qattn_status_str(st), untouched ? "untouched" : "WRITTEN", msg, bt->message);
            print_message("  %-26s checked: %s\n", bt->name, msg);
        }
        qattn_buffer *all[] = {ob, lb, ws};
        destroy_buffers(all, 3);
        qattn_plan_destroy(plan);
    }
    qattn_buffer *all[] = {qb, qob, t1, t2, t3};
    destroy_buffers(all, 5);
    cache_destroy(&cache);
}

/* A zero per-head scale (the append refuses it, nothing written), then NaN and Inf in Q (refused, nothing written). */
static void bad_values_case(void **state)
{
    start_case(state);
    const int64_t P = 16, H = 2, D = 64, Hq = 4;
    const qattn_kv_cache_desc desc = {.num_pages = 2, .page_size = P, .heads_kv = H, .head_dim = D, .dtype = FP8,
                                      .layout = HND, .scales = HEAD};
    head_scales_t scale = {{{0.01f, 0.0f}, {0.01f, 0.01f}}}; /* head 1's K scale is 0 */
    static const uint8_t fill[4] = {0x5a, 0x3c, 0, 0};
    cache_on cache;
    cache_create(dut, &desc, &scale, fill, &cache);
    tokens t;
    tokens_alloc(&t, F32, 5, H * D, D);
    for (int64_t i = 0; i < 5 * H * D; i++) {
        ((float *)t.k)[i] = (float)normal();
        ((float *)t.v)[i] = (float)normal();
    }
    for (int64_t i = 0; i < 5; i++)
        t.slots[i] = i;
    qattn_status st = append_tokens(&cache, &t, 0, 5, 0);
    uint8_t *k = download(dut, cache.bufs.k, cache.sizes.cache_bytes);
    const bool k_untouched = all_bytes(k, cache.sizes.cache_bytes, 0x5a);
    free(k);
    if (st != QATTN_ERR_INVALID_ARGUMENT || !strstr(qattn_last_error(dut), "head 1") || !k_untouched)
        fail_msg("zero per-head scale: %s (%s), cache %s", qattn_status_str(st), qattn_last_error(dut),
                 k_untouched ? "untouched" : "WRITTEN");
    print_message("  zero scale: %s\n", qattn_last_error(dut));
    scale.of[0][1] = 0.01f;
    assert_ok_on(dut, qattn_buffer_upload(cache.bufs.k_scale, 0, scale.of[0], (size_t)H * 4));
    assert_ok_on(dut, append_tokens(&cache, &t, 0, 5, 0));

    float q[2 * 4 * 64];
    for (size_t i = 0; i < sizeof(q) / 4; i++)
        q[i] = (float)normal();
    int32_t qo[2] = {0, 2}, table[1] = {0}, lens[1] = {5};
    const qattn_paged_desc pd = {.cache = desc, .table = DENSE, .batch = 1, .max_pages_per_seq = 1, .total_q = 2,
                                 .max_q_len = 2, .heads_q = Hq, .q_dtype = F32, .q_stride = {Hq * D, D},
                                 .o_stride = {Hq * D, D}, .causal = 1};
    qattn_plan *plan = NULL;
    assert_ok_on(dut, qattn_paged_plan_create(dut, &pd, &plan));
    const size_t ws_bytes = qattn_plan_workspace_size(plan);
    qattn_buffer *qob = make_buffer(dut, qo, sizeof(qo), 0), *tb = make_buffer(dut, table, sizeof(table), 0);
    qattn_buffer *lb = make_buffer(dut, lens, sizeof(lens), 0);
    qattn_buffer *ws = ws_bytes ? make_buffer(dut, NULL, ws_bytes, 0) : NULL;
    const float specials[2] = {NAN, INFINITY};
    for (int i = 0; i < 2; i++) {
        q[1 * 4 * 64 + 2 * 64 + 17] = specials[i]; /* row 1, head 2 */
        qattn_buffer *qb = make_buffer(dut, q, sizeof(q), 0), *ob = make_buffer(dut, NULL, sizeof(q), O_POISON);
        qattn_paged_args pa = {.cache = &cache.bufs, .q = qb, .o = ob, .qo_indptr = qob, .block_table = tb,
                               .seq_lens = lb, .workspace = ws};
        st = qattn_paged_run(plan, &pa);
        qattn_ctx_synchronize(dut);
        uint8_t *out = download(dut, ob, sizeof(q));
        const bool untouched = all_bytes(out, sizeof(q), O_POISON);
        free(out);
        if (st != QATTN_ERR_NONFINITE_INPUT || !untouched)
            fail_msg("%s in q: %s (%s), outputs %s", i ? "Inf" : "NaN", qattn_status_str(st), qattn_last_error(dut),
                     untouched ? "untouched" : "WRITTEN");
        print_message("  %s in q: %s\n", i ? "Inf" : "NaN", qattn_last_error(dut));
        qattn_buffer_destroy(qb);
        qattn_buffer_destroy(ob);
    }
    qattn_plan_destroy(plan);
    qattn_buffer *all[] = {qob, tb, lb, ws};
    destroy_buffers(all, 4);
    tokens_free(&t);
    cache_destroy(&cache);
}

/*
 * A valid cache, then rounds of junk (INT32_MIN/MAX, far out of range,
 * negative) in every table buffer, qo_indptr included in every other round:
 * the unchecked run completes and reads nothing outside the buffers; the
 * checked run refuses the same tables.
 */
static void garbage_rounds_case(void **state)
{
    const attn_spec *spec = start_case(state)->spec;
    attn_host h;
    attn_host_make(spec, &h);
    attn_device d;
    attn_device_make(dut, &h, &d);
    static const int32_t junk[] = {-7, 1 << 30, -1, 99999, INT32_MAX, INT32_MIN, 3};
    for (int round = 0; round < 6; round++) {
        int32_t ints[64];
        for (int i = 0; i < 64; i++)
            ints[i] = (round + i) % 3 ? junk[(round * 5 + i) % 7] : (int32_t)(uniform() * 40) - 5;
        ints[1] = -7; /* qo_indptr[1], seq_lens[1] or indptr[1]: the checked run must refuse */
        qattn_buffer *targets[] = {d.block_table, d.seq_lens, d.indptr, d.indices, d.last, d.qo};
        for (size_t i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
            const size_t bytes = qattn_buffer_size(targets[i]);
            assert_ok_on(dut, qattn_buffer_upload(targets[i], 0, ints, bytes < sizeof(ints) ? bytes : sizeof(ints)));
        }
        if (round % 2) /* valid query rows: the kernels walk the garbage pages */
            assert_ok_on(dut, qattn_buffer_upload(d.qo, 0, h.qo, (size_t)(spec->batch + 1) * 4));
        attn_output out;
        qattn_status st = attn_device_run(&h, &d, QATTN_FLAG_NO_FINITE_CHECK, &out);
        attn_output_free(&out);
        if (st)
            fail_msg("%s round %d: the unchecked run did not complete: %s: %s", spec->name, round,
                     qattn_status_str(st), qattn_last_error(dut));
        st = attn_device_run(&h, &d, 0, &out);
        const bool untouched = all_bytes(out.o, spec->o_off + h.o_bytes, O_POISON);
        attn_output_free(&out);
        print_message("  %-26s round %d: unchecked ok, checked: %s (%s)\n", spec->name, round, qattn_status_str(st),
                      qattn_last_error(dut));
        assert_int_equal(st, QATTN_ERR_INVALID_ARGUMENT);
        assert_true(untouched);
    }
    attn_device_free(&d);
    attn_host_free(&h);
}

static const attn_spec garbage_specs[] = {
    {.name = "garbage_dense_split", .page_size = 16, .heads_q = 8, .heads_kv = 2, .head_dim = 64, .dtype = F16,
     .layout = NHD, .table = DENSE, .q_dtype = F16, .causal = 1, .num_splits = 3, .batch = 2, .kv_len = {70, 33},
     .q_len = {2, 1}},
    {.name = "garbage_csr_int8row", .page_size = 4, .heads_q = 4, .heads_kv = 2, .head_dim = 64, .dtype = I8,
     .scales = ROW, .layout = HND, .table = CSR, .q_dtype = F16, .causal = 1, .batch = 3, .kv_len = {9, 30, 17},
     .q_len = {1, 4, 2}},
};

/* ----------------------------------------------------------------- main */

/* Whether the backend implements the paged KV cache at all. */
/* Whether the backend plans paged attention at head dim d (f16 pages and queries). */
static bool offers_paged(qattn_ctx *ctx, int64_t d)
{
    const qattn_paged_desc probe = {.cache = {.num_pages = 1, .page_size = 16, .heads_kv = 1, .head_dim = d,
                                              .dtype = F16},
                                    .batch = 1, .max_pages_per_seq = 1, .total_q = 1, .max_q_len = 1, .heads_q = 1,
                                    .q_dtype = F16, .q_stride = {d, d}, .o_stride = {d, d}};
    qattn_plan *plan = NULL;
    qattn_status s = qattn_paged_plan_create(ctx, &probe, &plan);
    qattn_plan_destroy(plan);
    return s != QATTN_ERR_UNSUPPORTED;
}

/* Whether the backend implements the paged KV cache at all. */
static bool has_paged(qattn_ctx *ctx) { return offers_paged(ctx, 64); }

/* Picks the head dims of the random attention cases among those the backend
 * offers, weighted as the candidates are (128 three times); returns how many. */
static int probe_dims(void)
{
    static const int candidates[] = {16, 32, 48, 64, 80, 96, 128, 128, 128, 160, 192, 256};
    offered_dim_count = 0;
    for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); i++)
        if (offers_paged(dut, candidates[i]))
            offered_dims[offered_dim_count++] = candidates[i];
    return offered_dim_count;
}

typedef struct group_builder {
    struct CMUnitTest *tests;
    case_ref *refs;
    char (*names)[40];
    int count;
} group_builder;

/* Fixed cases are numbered from FIXED_BASE, so their data does not depend on how many random ones run. */
enum { FIXED_BASE = 1000000 };

static void add_case(group_builder *g, int group, int index, const char *name, void (*fn)(void **), const void *spec)
{
    const int i = g->count++;
    g->refs[i] = (case_ref){group, index, spec};
    snprintf(g->names[i], sizeof(g->names[i]), "%s", name);
    g->tests[i] = (struct CMUnitTest){g->names[i], fn, NULL, NULL, &g->refs[i]};
}

static int run_group(const char *name, group_builder *g)
{
    char group_name[64];
    snprintf(group_name, sizeof(group_name), "%s_%s", backend_name, name);
    return _cmocka_run_group_tests(group_name, g->tests, (size_t)g->count, NULL, NULL);
}

static bool parse_count(const char *text, int *out)
{
    char *end;
    long v = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || v < 0 || v > 100000)
        return false;
    *out = (int)v;
    return true;
}

int main(int argc, char **argv)
{
    int early = ref_backend_context(argc, argv, "test_paged_vs_cpu", &dut);
    if (early >= 0)
        return early;
    backend_name = argv[1];
    if (strcmp(backend_name, "cpu") == 0) {
        printf("SKIP: the cpu backend is the reference\n");
        qattn_ctx_destroy(dut);
        return 77;
    }
    int counts[3] = {60, 40, 60}; /* random append, attention and garbage-table cases */
    for (int i = 0; i < 3 && i + 2 < argc; i++)
        if (!parse_count(argv[i + 2], &counts[i])) {
            fprintf(stderr, "usage: test_paged_vs_cpu <backend> [append_cases [attention_cases [garbage_cases]]]\n");
            qattn_ctx_destroy(dut);
            return 2;
        }
    if (strcmp(backend_name, "cuda") == 0 || strcmp(backend_name, "cuda-emu") == 0)
        bars = tensor_core_bars;
    if (!has_paged(dut)) {
        printf("SKIP: backend %s has no paged KV cache: %s\n", backend_name, qattn_last_error(dut));
        qattn_ctx_destroy(dut);
        return 77;
    }
    printf("random attention cases draw head dims from the %d the backend offers:", probe_dims());
    for (int i = 0; i < offered_dim_count; i++)
        printf(" %d", offered_dims[i]);
    printf("\n");
    qattn_ctx_params cpu_params = {.backend = "cpu"};
    if (qattn_ctx_create(&cpu_params, &cpu) != QATTN_OK) {
        fprintf(stderr, "test_paged_vs_cpu: cpu context: %s\n", qattn_last_error(NULL));
        qattn_ctx_destroy(dut);
        return 1;
    }
    const char *env = getenv("QATTN_TEST_SEED");
    seed = env && *env ? strtoull(env, NULL, 0) : 1;
    printf("paged KV cache of backend %s against the cpu backend, seed %llu (QATTN_TEST_SEED repeats it): "
           "%d random append, %d attention and %d garbage-table cases\n",
           backend_name, (unsigned long long)seed, counts[0], counts[1], counts[2]);
    const char *filter = getenv("QATTN_TEST_FILTER");
    if (filter && *filter)
        cmocka_set_test_filter(filter);

    enum {
        NA = sizeof(append_specs) / sizeof(append_specs[0]),
        NT = sizeof(attention_specs) / sizeof(attention_specs[0]),
        NB = sizeof(bad_tables) / sizeof(bad_tables[0]),
        NG = sizeof(garbage_specs) / sizeof(garbage_specs[0])
    };
    const int most = counts[0] + counts[1] + counts[2] + NA + NT + NB + NG + 2;
    group_builder g = {.tests = calloc((size_t)most, sizeof(struct CMUnitTest)),
                       .refs = calloc((size_t)most, sizeof(case_ref)), .names = calloc((size_t)most, sizeof(char[40]))};
    if (!g.tests || !g.refs || !g.names)
        return 1;
    int failed = 0;
    char name[40];
    for (int i = 0; i < counts[0]; i++) {
        snprintf(name, sizeof(name), "append_%d", i);
        add_case(&g, GROUP_APPEND, i, name, append_random_case, NULL);
    }
    for (int i = 0; i < NA; i++)
        add_case(&g, GROUP_APPEND, FIXED_BASE + i, append_specs[i].name, append_fixed_case, &append_specs[i]);
    failed += run_group("append", &g);

    g.count = 0;
    for (int i = 0; i < counts[1]; i++) {
        snprintf(name, sizeof(name), "attention_%d", i);
        add_case(&g, GROUP_ATTENTION, i, name, attention_random_case, NULL);
    }
    for (int i = 0; i < NT; i++)
        add_case(&g, GROUP_ATTENTION, FIXED_BASE + i, attention_specs[i].name, attention_fixed_case,
                 &attention_specs[i]);
    failed += run_group("attention", &g);

    g.count = 0;
    add_case(&g, GROUP_MERGE, FIXED_BASE, "merge_bf16_states", merge_case, NULL);
    failed += run_group("merge", &g);

    g.count = 0;
    for (int i = 0; i < NB; i++)
        add_case(&g, GROUP_BAD_INPUT, FIXED_BASE + i, bad_tables[i].name, bad_table_case, &bad_tables[i]);
    add_case(&g, GROUP_BAD_INPUT, FIXED_BASE + NB, "bad_values", bad_values_case, NULL);
    for (int i = 0; i < NG; i++)
        add_case(&g, GROUP_BAD_INPUT, FIXED_BASE + NB + 1 + i, garbage_specs[i].name, garbage_rounds_case,
                 &garbage_specs[i]);
    for (int i = 0; i < counts[2]; i++) {
        snprintf(name, sizeof(name), "garbage_%d", i);
        add_case(&g, GROUP_BAD_INPUT, i, name, garbage_random_case, NULL);
    }
    failed += run_group("bad_input", &g);

    free(g.tests);
    free(g.refs);
    free(g.names);
    qattn_ctx_destroy(cpu);
    qattn_ctx_destroy(dut);
    return failed ? 1 : 0;
}
