/*
 * opencl_paged_check: the OpenCL paged KV cache against the CPU backend.
 *
 *  - append: the same tokens appended on both backends must leave the same
 *    bytes in the K/V caches and the scale buffers (every page format, new
 *    dtype, layout; values that hit rounding ties, FP8 saturation and
 *    subnormals, zero rows; padded strides; padding slots; checks on and off);
 *  - attention: paged attention on both backends over caches filled that way
 *    must agree to fp32 accumulation error (Q/O f32, f16, bf16; head dims 48 to
 *    256; GQA up to 8; prefill tiles; forced and planned splits; padded rows);
 *  - merge_states with bf16 states and strided f32 output;
 *  - bad inputs: each kind of bad table (checked: the right status and message,
 *    outputs untouched; unchecked: the run completes, reading nothing outside
 *    the cache), NaN in Q, a zero per-head scale.
 * Exit 0: all good; 1: a failure (reported); 77: no OpenCL device.
 *
 *   opencl_paged_check [case-name-substring]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "numeric.h"
#include "qattn/qattn.h"
#include "reference.h"

static qattn_ctx *cpu, *ocl;
static ref_rng rng;
static int failures, ran;
static const char *filter;

#define CTX_OF(which) ((which) ? ocl : cpu)

static bool selected(const char *name) { return !filter || strstr(name, filter); }

static void fail(const char *name, const char *fmt, const char *detail)
{
    printf("%-30s FAILED: %s%s%s\n", name, fmt, detail ? ": " : "", detail ? detail : "");
    failures++;
}

/* A buffer on ctx holding `bytes` of data (or filled with `fill` when data is NULL). */
static qattn_buffer *make_buffer(qattn_ctx *ctx, const void *data, size_t bytes, int fill)
{
    qattn_buffer *b = NULL;
    if (qattn_buffer_create(ctx, bytes ? bytes : 4, &b))
        return NULL;
    qattn_status s = data ? qattn_buffer_upload(b, 0, data, bytes) : qattn_buffer_fill(b, 0, bytes ? bytes : 4,
                                                                                      (uint8_t)fill);
    if (s) {
        qattn_buffer_destroy(b);
        return NULL;
    }
    return b;
}

static void store_value(void *base, qattn_dtype dt, int64_t i, float v)
{
    if (dt == QATTN_DTYPE_F16)
        ((uint16_t *)base)[i] = qattn_f32_to_f16(v);
    else if (dt == QATTN_DTYPE_BF16)
        ((uint16_t *)base)[i] = qattn_f32_to_bf16(v);
    else
        ((float *)base)[i] = v;
}

/* ----------------------------------------------------------- the cache */

typedef struct cache_spec {
    int64_t page, hkv, d;
    qattn_dtype dtype;
    qattn_kv_scales scales;
    qattn_kv_layout layout;
} cache_spec;

/* A cache on one backend. */
typedef struct cache_on {
    qattn_kv_cache_desc desc;
    qattn_kv_cache_sizes sizes;
    qattn_kv_cache_buffers bufs;
} cache_on;

static void cache_free(cache_on *c)
{
    qattn_buffer_destroy(c->bufs.k);
    qattn_buffer_destroy(c->bufs.v);
    qattn_buffer_destroy(c->bufs.k_scale);
    qattn_buffer_destroy(c->bufs.v_scale);
    memset(c, 0, sizeof(*c));
}

static bool cache_make(qattn_ctx *ctx, const cache_spec *s, int64_t num_pages, const float *head_scales,
                       cache_on *out)
{
    memset(out, 0, sizeof(*out));
    out->desc = (qattn_kv_cache_desc){.num_pages = num_pages, .page_size = s->page, .heads_kv = s->hkv,
                                      .head_dim = s->d, .dtype = s->dtype, .layout = s->layout, .scales = s->scales};
    if (qattn_kv_cache_bytes(ctx, &out->desc, &out->sizes))
        return false;
    out->bufs.k = make_buffer(ctx, NULL, out->sizes.cache_bytes, 0x5a);
    out->bufs.v = make_buffer(ctx, NULL, out->sizes.cache_bytes, 0x3c);
    bool ok = out->bufs.k && out->bufs.v;
    if (s->scales != QATTN_KV_SCALES_NONE) {
        out->bufs.k_scale = s->scales == QATTN_KV_SCALES_PER_HEAD
                                ? make_buffer(ctx, head_scales, out->sizes.scale_bytes, 0)
                                : make_buffer(ctx, NULL, out->sizes.scale_bytes, 0x11);
        out->bufs.v_scale = s->scales == QATTN_KV_SCALES_PER_HEAD
                                ? make_buffer(ctx, head_scales + s->hkv, out->sizes.scale_bytes, 0)
                                : make_buffer(ctx, NULL, out->sizes.scale_bytes, 0x22);
        ok = ok && out->bufs.k_scale && out->bufs.v_scale;
    }
    if (!ok)
        cache_free(out);
    return ok;
}

/* New tokens [T, Hkv, D] in `dt` with padded strides, and their slots. */
typedef struct tokens {
    int64_t count, stride[2];
    qattn_dtype dt;
    void *k, *v;
    int64_t *slots;
    size_t bytes;
} tokens;

static void tokens_free(tokens *t)
{
    free(t->k);
    free(t->v);
    free(t->slots);
}

/*
 * Values of kind 0: N(0, 1) times a per-row magnitude 2^U(-14, 10) plus a
 * per-channel bias, every 9th row zero; kind 1: multiples of 2^-e (e in
 * 1, 5, 10) up to about +-600, which land on rounding ties of the INT8 and
 * E4M3 grids at scale 1 and 0.5 and saturate E4M3.
 */
static void tokens_make(tokens *t, const cache_spec *s, int64_t count, qattn_dtype dt, int kind)
{
    const int64_t H = s->hkv, D = s->d, pad = 4;
    t->count = count;
    t->dt = dt;
    t->stride[1] = D + pad;
    t->stride[0] = H * (D + pad) + 8;
    size_t es = qattn_dtype_size(dt);
    t->bytes = (size_t)(count * t->stride[0]) * es;
    t->k = calloc(1, t->bytes);
    t->v = calloc(1, t->bytes);
    t->slots = malloc((size_t)count * 8);
    double bias[256];
    for (int64_t d = 0; d < D; d++)
        bias[d] = 3.0 * ref_rng_normal(&rng);
    for (int64_t tok = 0; tok < count; tok++)
        for (int64_t h = 0; h < H; h++)
            for (int which = 0; which < 2; which++) {
                double mag = ldexp(1.0, (int)(ref_rng_uniform(&rng) * 24) - 14);
                bool zero = (tok * H + h) % 9 == 4;
                int e = (int[]){1, 5, 10}[(int)(ref_rng_uniform(&rng) * 3)];
                for (int64_t d = 0; d < D; d++) {
                    double x;
                    if (zero)
                        x = 0.0;
                    else if (kind == 0)
                        x = (ref_rng_normal(&rng) + (which ? 0.0 : bias[d])) * mag;
                    else
                        x = ldexp(nearbyint(ref_rng_normal(&rng) * ldexp(200.0, e)), -e);
                    store_value(which ? t->v : t->k, dt, tok * t->stride[0] + h * t->stride[1] + d, (float)x);
                }
            }
}

/* Appends tokens [first, first + n) on ctx; flags as given. */
static qattn_status append_on(qattn_ctx *ctx, cache_on *c, const tokens *t, int64_t first, int64_t n, uint32_t flags)
{
    size_t es = qattn_dtype_size(t->dt);
    qattn_buffer *kb = make_buffer(ctx, t->k, t->bytes, 0), *vb = make_buffer(ctx, t->v, t->bytes, 0);
    qattn_buffer *sb = make_buffer(ctx, t->slots, (size_t)t->count * 8, 0);
    qattn_status s = QATTN_ERR_OUT_OF_MEMORY;
    if (kb && vb && sb) {
        qattn_kv_append_args a = {.cache = &c->desc, .buffers = &c->bufs, .num_tokens = n, .new_dtype = t->dt,
                                  .new_stride = {t->stride[0], t->stride[1]}, .k_new = kb, .v_new = vb,
                                  .slot_mapping = sb, .k_new_offset = (size_t)(first * t->stride[0]) * es,
                                  .v_new_offset = (size_t)(first * t->stride[0]) * es,
                                  .slot_mapping_offset = (size_t)first * 8, .flags = flags};
        s = qattn_kv_append(ctx, &a);
    }
    qattn_buffer_destroy(kb);
    qattn_buffer_destroy(vb);
    qattn_buffer_destroy(sb);
    return s;
}

static uint8_t *download(const qattn_buffer *b, size_t bytes)
{
    uint8_t *h = malloc(bytes ? bytes : 1);
    if (h && bytes && qattn_buffer_download(b, 0, h, bytes)) {
        free(h);
        return NULL;
    }
    return h;
}

/* The first differing byte of two buffers of the two backends; 0 when equal. */
static int compare_buffers(const char *name, const char *what, const qattn_buffer *a, const qattn_buffer *b,
                           size_t bytes)
{
    uint8_t *x = download(a, bytes), *y = download(b, bytes);
    int bad = 0;
    if (!x || !y) {
        fail(name, "download", what);
        bad = 1;
    } else {
        size_t diffs = 0, first = 0;
        for (size_t i = 0; i < bytes; i++)
            if (x[i] != y[i] && diffs++ == 0)
                first = i;
        if (diffs) {
            char detail[160];
            snprintf(detail, sizeof(detail), "%s: %zu of %zu bytes differ, first at %zu (cpu 0x%02x, opencl 0x%02x)",
                     what, diffs, bytes, first, x[first], y[first]);
            fail(name, "codes differ from the cpu backend's", detail);
            bad = 1;
        }
    }
    free(x);
    free(y);
    return bad;
}

/* Per-head scales [K heads, V heads] for the tokens: amax / qmax * shrink (shrink < 1 saturates some values). */
static void head_scales_for(const cache_spec *s, const tokens *t, int kind, float *out)
{
    float qmax = s->dtype == QATTN_DTYPE_FP8_E4M3 ? 448.f : 127.f;
    for (int which = 0; which < 2; which++)
        for (int64_t h = 0; h < s->hkv; h++) {
            float amax = 0.f;
            for (int64_t tok = 0; tok < t->count; tok++)
                for (int64_t d = 0; d < s->d; d++) {
                    int64_t i = tok * t->stride[0] + h * t->stride[1] + d;
                    const void *base = which ? t->v : t->k;
                    float x = t->dt == QATTN_DTYPE_F32 ? ((const float *)base)[i]
                              : t->dt == QATTN_DTYPE_F16 ? qattn_f16_to_f32(((const uint16_t *)base)[i])
                                                         : qattn_bf16_to_f32(((const uint16_t *)base)[i]);
                    amax = fmaxf(amax, fabsf(x));
                }
            out[which * s->hkv + h] = kind == 1 ? (h % 2 ? 0.5f : 1.0f) : (amax > 0 ? amax / qmax * 0.8f : 1.0f);
        }
}

typedef struct append_case {
    const char *name;
    cache_spec cache;
    qattn_dtype new_dtype;
    int kind;
} append_case;

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

static const append_case append_cases[] = {
    {"append_f16_from_f32", {16, 2, 128, F16, NONE, NHD}, F32, 0},
    {"append_bf16_from_f32_hnd", {7, 3, 64, BF16, NONE, HND}, F32, 0},
    {"append_f16_from_bf16_p1", {1, 2, 48, F16, NONE, NHD}, BF16, 0},
    {"append_fp8_f32", {16, 2, 128, FP8, HEAD, NHD}, F32, 0},
    {"append_fp8_ties_f32", {16, 2, 64, FP8, HEAD, HND}, F32, 1},
    {"append_fp8_f16_d256", {5, 2, 256, FP8, HEAD, NHD}, F16, 0},
    {"append_int8_head_bf16", {16, 4, 64, I8, HEAD, HND}, BF16, 0},
    {"append_int8_head_ties", {16, 2, 128, I8, HEAD, NHD}, F32, 1},
    {"append_int8_row_f32", {16, 2, 128, I8, ROW, NHD}, F32, 0},
    {"append_int8_row_f16_d80", {3, 2, 80, I8, ROW, HND}, F16, 0},
    {"append_int8_row_ties", {16, 1, 64, I8, ROW, NHD}, F32, 1},
};

static void run_append_case(const append_case *ac)
{
    const cache_spec *s = &ac->cache;
    const int64_t T = 61, num_pages = (T + s->page - 1) / s->page + 3, capacity = num_pages * s->page;
    tokens t;
    tokens_make(&t, s, T, ac->new_dtype, ac->kind);
    /* distinct slots in random order; every 7th token is padding */
    int64_t *perm = malloc((size_t)capacity * 8);
    for (int64_t i = 0; i < capacity; i++)
        perm[i] = i;
    for (int64_t i = capacity - 1; i > 0; i--) {
        int64_t j = (int64_t)(ref_rng_uniform(&rng) * (double)(i + 1)), x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    for (int64_t i = 0; i < T; i++)
        t.slots[i] = i % 7 == 3 ? -1 : perm[i];
    free(perm);
    float hs[128];
    head_scales_for(s, &t, ac->kind, hs);
    cache_on c[2];
    bool made[2] = {false, false};
    int bad = 0;
    for (int which = 0; which < 2 && !bad; which++) {
        made[which] = cache_make(CTX_OF(which), s, num_pages, hs, &c[which]);
        /* checked, then unchecked: both paths must write the same codes */
        qattn_status st = made[which] ? append_on(CTX_OF(which), &c[which], &t, 0, 40, 0) : QATTN_ERR_OUT_OF_MEMORY;
        if (!st)
            st = append_on(CTX_OF(which), &c[which], &t, 40, T - 40, QATTN_FLAG_NO_FINITE_CHECK);
        if (st) {
            fail(ac->name, which ? "opencl append" : "cpu append", qattn_last_error(CTX_OF(which)));
            bad = 1;
        }
    }
    if (!bad) {
        bad |= compare_buffers(ac->name, "k pages", c[0].bufs.k, c[1].bufs.k, c[0].sizes.cache_bytes);
        bad |= compare_buffers(ac->name, "v pages", c[0].bufs.v, c[1].bufs.v, c[0].sizes.cache_bytes);
        if (s->scales == ROW) {
            bad |= compare_buffers(ac->name, "k row scales", c[0].bufs.k_scale, c[1].bufs.k_scale,
                                   c[0].sizes.scale_bytes);
            bad |= compare_buffers(ac->name, "v row scales", c[0].bufs.v_scale, c[1].bufs.v_scale,
                                   c[0].sizes.scale_bytes);
        }
        if (!bad)
            printf("%-30s bit-identical to the cpu backend (%zu bytes of pages)\n", ac->name,
                   2 * c[0].sizes.cache_bytes);
    }
    for (int which = 0; which < 2; which++)
        if (made[which])
            cache_free(&c[which]);
    tokens_free(&t);
}

/* ---------------------------------------------------------- attention */

#define MAX_B 4

typedef struct attn_case {
    const char *name;
    cache_spec cache;
    int64_t hq;
    qattn_page_table_kind table;
    int causal, splits;
    qattn_dtype q_dtype;
    int64_t batch, kv_len[MAX_B], q_len[MAX_B];
} attn_case;

static const attn_case attn_cases[] = {
    {"attn_f32q_f16_d256_split", {16, 2, 256, F16, NONE, NHD}, 4, QATTN_PAGES_DENSE, 1, 0, F32, 2, {300, 40}, {1, 1}},
    {"attn_bf16q_bf16_d48_csr", {5, 2, 48, BF16, NONE, HND}, 8, QATTN_PAGES_CSR, 1, 0, BF16, 3, {1, 77, 130},
     {1, 2, 3}},
    {"attn_f16q_fp8_gqa8_d96", {16, 1, 96, FP8, HEAD, NHD}, 8, QATTN_PAGES_DENSE, 0, 2, F16, 2, {200, 9}, {1, 1}},
    {"attn_f32q_int8row_prefill", {16, 2, 64, I8, ROW, NHD}, 4, QATTN_PAGES_CSR, 1, 0, F32, 2, {150, 64},
     {70, 64}},
    {"attn_f16q_int8head_mqa_d160", {8, 1, 160, I8, HEAD, HND}, 2, QATTN_PAGES_DENSE, 1, 5, F16, 2, {90, 33},
     {4, 1}},
    {"attn_f16q_f16_empty_seq", {16, 2, 64, F16, NONE, NHD}, 2, QATTN_PAGES_DENSE, 1, 3, F16, 3, {0, 50, 20},
     {1, 2, 0}},
};

typedef struct attn_result {
    void *o;
    float *lse;
} attn_result;

/* Builds the same cache and tables on ctx and runs the case; the run's outputs in *r. */
static qattn_status attn_on(int which, const attn_case *ac, const tokens *t, const int32_t *const *seq_pages,
                            const int64_t *pages_of, int64_t num_pages, int64_t max_pages, const void *q,
                            size_t q_bytes, int64_t total_q, const int32_t *qo, attn_result *r, char *kernel)
{
    qattn_ctx *ctx = CTX_OF(which);
    const cache_spec *s = &ac->cache;
    const int64_t B = ac->batch, Hq = ac->hq, D = s->d;
    float hs[128];
    head_scales_for(s, t, 0, hs);
    cache_on c;
    if (!cache_make(ctx, s, num_pages, hs, &c))
        return QATTN_ERR_OUT_OF_MEMORY;
    qattn_status st = append_on(ctx, &c, t, 0, t->count, 0);
    int32_t *bt = malloc((size_t)(B * max_pages) * 4), ip[MAX_B + 1], ix[256], lens[MAX_B], last[MAX_B];
    qattn_page_tables_build(B, seq_pages, pages_of, max_pages, bt, ip, ix);
    for (int64_t b = 0; b < B; b++) {
        lens[b] = (int32_t)ac->kv_len[b];
        last[b] = (int32_t)(ac->kv_len[b] - (pages_of[b] - 1) * s->page);
    }
    const int64_t q_row = Hq * (D + 8); /* padded rows */
    qattn_paged_desc pd = {.cache = c.desc, .table = ac->table, .batch = B, .max_pages_per_seq = max_pages,
                           .total_q = total_q, .heads_q = Hq, .q_dtype = ac->q_dtype, .q_stride = {q_row, D + 8},
                           .o_stride = {Hq * D, D}, .causal = ac->causal, .return_lse = 1, .num_splits = ac->splits};
    for (int64_t b = 0; b < B; b++)
        pd.max_q_len = ac->q_len[b] > pd.max_q_len ? ac->q_len[b] : pd.max_q_len;
    qattn_plan *plan = NULL;
    size_t o_bytes = (size_t)(total_q * Hq * D) * qattn_dtype_size(ac->q_dtype), lse_bytes = (size_t)(total_q * Hq) * 4;
    qattn_buffer *qb = make_buffer(ctx, q, q_bytes, 0), *ob = make_buffer(ctx, NULL, o_bytes, 0xff);
    qattn_buffer *lb = make_buffer(ctx, NULL, lse_bytes, 0xff), *ws = NULL;
    qattn_buffer *qob = make_buffer(ctx, qo, (size_t)(B + 1) * 4, 0);
    qattn_buffer *t1 = NULL, *t2 = NULL, *t3 = NULL;
    if (ac->table == QATTN_PAGES_DENSE) {
        t1 = make_buffer(ctx, bt, (size_t)(B * max_pages) * 4, 0);
        t2 = make_buffer(ctx, lens, (size_t)B * 4, 0);
    } else {
        t1 = make_buffer(ctx, ip, (size_t)(B + 1) * 4, 0);
        t2 = make_buffer(ctx, ix, (size_t)(ip[B] + 1) * 4, 0);
        t3 = make_buffer(ctx, last, (size_t)B * 4, 0);
    }
    if (!st)
        st = qattn_paged_plan_create(ctx, &pd, &plan);
    if (!st && qattn_plan_workspace_size(plan))
        ws = make_buffer(ctx, NULL, qattn_plan_workspace_size(plan), 0xa5);
    if (!st) {
        qattn_plan_info info;
        qattn_plan_get_info(plan, &info);
        snprintf(kernel, 160, "%s, %d split(s)", info.kernel,
                 info.kv_tile ? (int)((max_pages * s->page + info.kv_tile - 1) / info.kv_tile) : 1);
        qattn_paged_args pa = {.cache = &c.bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = qob, .workspace = ws};
        if (ac->table == QATTN_PAGES_DENSE) {
            pa.block_table = t1;
            pa.seq_lens = t2;
        } else {
            pa.indptr = t1;
            pa.indices = t2;
            pa.last_page_len = t3;
        }
        st = qattn_paged_run(plan, &pa);
        if (!st)
            st = qattn_ctx_synchronize(ctx);
    }
    if (!st) {
        r->o = download(ob, o_bytes);
        r->lse = (float *)download(lb, lse_bytes);
        if (!r->o || !r->lse)
            st = QATTN_ERR_BACKEND;
    }
    qattn_plan_destroy(plan);
    qattn_buffer *all[] = {qb, ob, lb, ws, qob, t1, t2, t3};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    cache_free(&c);
    free(bt);
    return st;
}

static double load_out(const void *o, qattn_dtype dt, int64_t i)
{
    return dt == QATTN_DTYPE_F32 ? ((const float *)o)[i]
           : dt == QATTN_DTYPE_F16 ? qattn_f16_to_f32(((const uint16_t *)o)[i])
                                   : qattn_bf16_to_f32(((const uint16_t *)o)[i]);
}

static void run_attn_case(const attn_case *ac)
{
    const cache_spec *s = &ac->cache;
    const int64_t B = ac->batch, Hq = ac->hq, D = s->d, P = s->page;
    int64_t pages_of[MAX_B], total_pages = 0, total_tokens = 0, total_q = 0, max_pages = 1;
    int32_t qo[MAX_B + 1] = {0};
    for (int64_t b = 0; b < B; b++) {
        pages_of[b] = (ac->kv_len[b] + P - 1) / P;
        total_pages += pages_of[b];
        total_tokens += ac->kv_len[b];
        max_pages = pages_of[b] > max_pages ? pages_of[b] : max_pages;
        qo[b + 1] = (int32_t)(qo[b] + ac->q_len[b]);
        total_q += ac->q_len[b];
    }
    const int64_t num_pages = total_pages + 2;
    int32_t *order = malloc((size_t)num_pages * 4);
    for (int64_t i = 0; i < num_pages; i++)
        order[i] = (int32_t)(num_pages - 1 - i);
    const int32_t *seq_pages[MAX_B];
    tokens t;
    tokens_make(&t, s, total_tokens, QATTN_DTYPE_F32, 0);
    /* kind-0 magnitudes vary per row; attention wants comparable rows: take N(0,1) (+ K bias) */
    for (int64_t i = 0; i < total_tokens * t.stride[0]; i++) {
        ((float *)t.k)[i] = (float)(ref_rng_normal(&rng) + (i % t.stride[1] < 3 ? 2.0 : 0.0));
        ((float *)t.v)[i] = (float)ref_rng_normal(&rng);
    }
    int64_t at = 0, tok = 0;
    for (int64_t b = 0; b < B; b++) {
        seq_pages[b] = order + at;
        for (int64_t j = 0; j < ac->kv_len[b]; j++)
            t.slots[tok++] = (int64_t)seq_pages[b][j / P] * P + j % P;
        at += pages_of[b];
    }
    const int64_t q_row = Hq * (D + 8);
    size_t q_bytes = (size_t)((total_q ? total_q : 1) * q_row) * qattn_dtype_size(ac->q_dtype);
    void *q = calloc(1, q_bytes);
    for (int64_t r = 0; r < total_q; r++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t d = 0; d < D; d++)
                store_value(q, ac->q_dtype, r * q_row + h * (D + 8) + d, (float)ref_rng_normal(&rng));
    attn_result res[2] = {{0}};
    char kernel[2][160] = {"", ""};
    int bad = 0;
    for (int which = 0; which < 2 && !bad; which++) {
        qattn_status st = attn_on(which, ac, &t, seq_pages, pages_of, num_pages, max_pages, q, q_bytes,
                                  total_q ? total_q : 1, qo, &res[which], kernel[which]);
        if (st) {
            fail(ac->name, which ? "opencl run" : "cpu run", qattn_last_error(CTX_OF(which)));
            bad = 1;
        }
    }
    if (!bad) {
        ref_accum acc = {0};
        double lse_err = 0;
        int64_t lse_mismatch = 0;
        for (int64_t r = 0; r < total_q; r++)
            for (int64_t h = 0; h < Hq; h++) {
                for (int64_t d = 0; d < D; d++) {
                    int64_t i = (r * Hq + h) * D + d;
                    ref_accum_add(&acc, load_out(res[1].o, ac->q_dtype, i), load_out(res[0].o, ac->q_dtype, i));
                }
                float a = res[0].lse[r * Hq + h], b = res[1].lse[r * Hq + h];
                if (isinf(a) || isinf(b))
                    lse_mismatch += !(a == b);
                else
                    lse_err = fmax(lse_err, fabs((double)a - b) / fmax(1.0, fabs(a)));
            }
        ref_metrics m = ref_accum_finish(&acc);
        double bar = ac->q_dtype == QATTN_DTYPE_BF16 ? 4e-3 : 5e-4;
        bool ok = m.nonfinite == 0 && lse_mismatch == 0 && lse_err <= 2e-5 && m.rel_l1 <= bar &&
                  (m.count == 0 || m.cos_sim >= 0.99999);
        printf("%-30s %s vs cpu: cos %.7f relL1 %.2e lse %.1e (%s)\n", ac->name, ok ? "ok" : "MISMATCH", m.cos_sim,
               m.rel_l1, lse_err, kernel[1]);
        if (!ok)
            fail(ac->name, "opencl and cpu paged attention disagree", kernel[1]);
    }
    for (int which = 0; which < 2; which++) {
        free(res[which].o);
        free(res[which].lse);
    }
    free(q);
    free(order);
    tokens_free(&t);
}

/* --------------------------------------------------------------- merge */

static void run_merge_case(void)
{
    const char *name = "merge_bf16_states";
    const int64_t S = 5, R = 7, H = 3, D = 80;
    const int64_t vs[3] = {R * H * (D + 16), H * (D + 16), D + 16}, ss[3] = {1, S * H, S}; /* state-minor LSE */
    size_t v_bytes = (size_t)(S * vs[0]) * 2, s_bytes = (size_t)(R * S * H) * 4;
    uint16_t *v = calloc(1, v_bytes);
    float *lse = malloc(s_bytes);
    for (int64_t i = 0; i < S * vs[0]; i++)
        v[i] = qattn_f32_to_bf16((float)ref_rng_normal(&rng));
    for (int64_t i = 0; i < R * S * H; i++)
        lse[i] = i % 11 == 5 ? -INFINITY : (float)(3.0 * ref_rng_normal(&rng));
    for (int64_t s = 0; s < S; s++) /* row 2, head 1: every state empty */
        lse[2 * ss[1] + 1 * ss[2] + s * ss[0]] = -INFINITY;
    const int64_t o_row = H * (D + 4);
    size_t o_bytes = (size_t)(R * o_row) * 4;
    float *out[2] = {NULL, NULL}, *lout[2] = {NULL, NULL};
    int bad = 0;
    for (int which = 0; which < 2 && !bad; which++) {
        qattn_ctx *ctx = CTX_OF(which);
        qattn_buffer *vb = make_buffer(ctx, v, v_bytes, 0), *sb = make_buffer(ctx, lse, s_bytes, 0);
        qattn_buffer *ob = make_buffer(ctx, NULL, o_bytes, 0x7f), *lb = make_buffer(ctx, NULL, (size_t)(R * H) * 4, 0);
        qattn_merge_desc md = {.num_states = S, .rows = R, .heads = H, .head_dim = D, .v_dtype = BF16,
                               .o_dtype = F32, .v_stride = {vs[0], vs[1], vs[2]}, .s_stride = {ss[0], ss[1], ss[2]},
                               .o_stride = {o_row, D + 4}};
        qattn_merge_args ma = {.v = vb, .s = sb, .o = ob, .lse = lb};
        qattn_status st = vb && sb && ob && lb ? qattn_merge_states(ctx, &md, &ma) : QATTN_ERR_OUT_OF_MEMORY;
        if (!st)
            st = qattn_ctx_synchronize(ctx);
        if (!st) {
            out[which] = (float *)download(ob, o_bytes);
            lout[which] = (float *)download(lb, (size_t)(R * H) * 4);
        }
        if (st || !out[which] || !lout[which]) {
            fail(name, which ? "opencl merge" : "cpu merge", qattn_last_error(ctx));
            bad = 1;
        }
        qattn_buffer_destroy(vb);
        qattn_buffer_destroy(sb);
        qattn_buffer_destroy(ob);
        qattn_buffer_destroy(lb);
    }
    if (!bad) {
        ref_accum acc = {0};
        double lerr = 0;
        int untouched = 1;
        for (int64_t r = 0; r < R; r++)
            for (int64_t h = 0; h < H; h++) {
                for (int64_t d = 0; d < D + 4; d++) {
                    float a = out[0][r * o_row + h * (D + 4) + d], b = out[1][r * o_row + h * (D + 4) + d];
                    if (d < D)
                        ref_accum_add(&acc, b, a);
                    else if (h < H - 1) /* the row padding between heads stays as it was */
                        untouched &= memcmp(&a, &b, 4) == 0;
                }
                float a = lout[0][r * H + h], b = lout[1][r * H + h];
                lerr = isinf(a) || isinf(b) ? (a == b ? lerr : INFINITY) : fmax(lerr, fabs((double)a - b));
            }
        ref_metrics m = ref_accum_finish(&acc);
        bool ok = m.nonfinite == 0 && m.rel_l1 <= 1e-5 && lerr <= 1e-5 && untouched;
        printf("%-30s %s vs cpu: relL1 %.2e lse %.1e\n", name, ok ? "ok" : "MISMATCH", m.rel_l1, lerr);
        if (!ok)
            fail(name, "opencl and cpu merges disagree", NULL);
    }
    for (int which = 0; which < 2; which++) {
        free(out[which]);
        free(lout[which]);
    }
    free(v);
    free(lse);
}

/* ----------------------------------------------------------- bad input */

/* One bad table: which entries to spoil. */
typedef struct bad_table {
    const char *name;
    qattn_page_table_kind table;
    int what; /* see spoil() */
    const char *message;
} bad_table;

static const bad_table bad_tables[] = {
    {"bad_qo_first", QATTN_PAGES_DENSE, 0, "qo_indptr[0]"},
    {"bad_qo_range", QATTN_PAGES_CSR, 1, "qo_indptr[1..2]"},
    {"bad_seq_len", QATTN_PAGES_DENSE, 2, "seq_lens[1]"},
    {"bad_dense_page", QATTN_PAGES_DENSE, 3, "sequence 1's page 2 is 1000000"},
    {"bad_negative_page", QATTN_PAGES_DENSE, 4, "sequence 0's page 0 is -7"},
    {"bad_indptr", QATTN_PAGES_CSR, 5, "indptr[1..2]"},
    {"bad_last_page_len", QATTN_PAGES_CSR, 6, "last_page_len[0]"},
    {"bad_csr_page", QATTN_PAGES_CSR, 7, "sequence 1's page 0 is 99"},
    {"bad_csr_too_long", QATTN_PAGES_CSR, 8, "more than max_pages_per_seq"},
    {"bad_indptr_past_indices", QATTN_PAGES_CSR, 9, "inside the"},
};

static void run_bad_tables(void)
{
    /* 2 sequences of 40 and 50 tokens in pages of 16 (3 and 4 pages), 2 queries each, Hq=4 Hkv=2 D=64 f16 */
    const int64_t P = 16, H = 2, Hq = 4, D = 64, num_pages = 8, max_pages = 4, total_q = 4;
    const cache_spec s = {P, H, D, F16, NONE, NHD};
    cache_on c;
    if (!cache_make(ocl, &s, num_pages, NULL, &c)) {
        fail("bad_tables", "cache", qattn_last_error(ocl));
        return;
    }
    uint16_t q[4 * 4 * 64];
    for (size_t i = 0; i < sizeof(q) / 2; i++)
        q[i] = qattn_f32_to_f16((float)ref_rng_normal(&rng));
    qattn_buffer *qb = make_buffer(ocl, q, sizeof(q), 0);
    for (size_t bi = 0; bi < sizeof(bad_tables) / sizeof(bad_tables[0]); bi++) {
        const bad_table *bt = &bad_tables[bi];
        if (!selected(bt->name))
            continue;
        ran++;
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
        for (int checked = 1; checked >= 0; checked--) {
            qattn_paged_desc pd = {.cache = c.desc, .table = bt->table, .batch = 2, .max_pages_per_seq = max_pages,
                                   .total_q = total_q, .max_q_len = 2, .heads_q = Hq, .q_dtype = F16,
                                   .q_stride = {Hq * D, D}, .o_stride = {Hq * D, D}, .causal = 1, .return_lse = 1,
                                   .num_splits = checked ? 0 : 2,
                                   .flags = checked ? 0 : QATTN_FLAG_NO_FINITE_CHECK};
            qattn_plan *plan = NULL;
            qattn_buffer *ob = make_buffer(ocl, NULL, sizeof(q), 0xff), *lb = make_buffer(ocl, NULL, 64, 0xff);
            qattn_buffer *qob = make_buffer(ocl, qo, sizeof(qo), 0), *ws = NULL, *t1, *t2, *t3 = NULL;
            if (bt->table == QATTN_PAGES_DENSE) {
                t1 = make_buffer(ocl, block, sizeof(block), 0);
                t2 = make_buffer(ocl, lens, sizeof(lens), 0);
            } else {
                t1 = make_buffer(ocl, ip, sizeof(ip), 0);
                t2 = make_buffer(ocl, ix, sizeof(ix), 0);
                t3 = make_buffer(ocl, last, sizeof(last), 0);
            }
            qattn_status st = qattn_paged_plan_create(ocl, &pd, &plan);
            if (!st && qattn_plan_workspace_size(plan))
                ws = make_buffer(ocl, NULL, qattn_plan_workspace_size(plan), 0);
            if (!st) {
                qattn_paged_args pa = {.cache = &c.bufs, .q = qb, .o = ob, .lse = lb, .qo_indptr = qob,
                                       .workspace = ws};
                if (bt->table == QATTN_PAGES_DENSE) {
                    pa.block_table = t1;
                    pa.seq_lens = t2;
                } else {
                    pa.indptr = t1;
                    pa.indices = t2;
                    pa.last_page_len = t3;
                }
                st = qattn_paged_run(plan, &pa);
                qattn_status sync = qattn_ctx_synchronize(ocl);
                if (!checked) {
                    if (st || sync)
                        fail(bt->name, "unchecked run over a bad table did not complete", qattn_last_error(ocl));
                    else
                        printf("%-30s unchecked: the run completes (entries clamped)\n", bt->name);
                } else {
                    uint8_t out[sizeof(q)];
                    bool untouched = qattn_buffer_download(ob, 0, out, sizeof(out)) == QATTN_OK;
                    for (size_t i = 0; untouched && i < sizeof(out); i++)
                        untouched = out[i] == 0xff;
                    const char *msg = qattn_last_error(ocl);
                    if (st != QATTN_ERR_INVALID_ARGUMENT || !strstr(msg, bt->message) || !untouched) {
                        char detail[600];
                        snprintf(detail, sizeof(detail), "%s, outputs %s, message \"%s\" (wanted \"%s\")",
                                 qattn_status_str(st), untouched ? "untouched" : "WRITTEN", msg, bt->message);
                        fail(bt->name, "checked run", detail);
                    } else {
                        printf("%-30s checked: %s\n", bt->name, msg);
                    }
                }
            } else {
                fail(bt->name, "plan", qattn_last_error(ocl));
            }
            qattn_plan_destroy(plan);
            qattn_buffer *all[] = {ob, lb, qob, ws, t1, t2, t3};
            for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
                qattn_buffer_destroy(all[i]);
        }
    }
    qattn_buffer_destroy(qb);
    cache_free(&c);
}

/* NaN in Q (checked: NONFINITE_INPUT, outputs untouched) and a zero per-head scale (nothing written). */
static void run_bad_values(void)
{
    const char *name = "bad_values";
    const int64_t P = 16, H = 2, D = 64;
    const cache_spec s = {P, H, D, FP8, HEAD, HND};
    float hs[4] = {0.01f, 0.0f, 0.01f, 0.01f}; /* head 1's K scale is 0 */
    cache_on c;
    if (!cache_make(ocl, &s, 2, hs, &c)) {
        fail(name, "cache", qattn_last_error(ocl));
        return;
    }
    tokens t;
    tokens_make(&t, &s, 5, F32, 0);
    for (int64_t i = 0; i < 5; i++)
        t.slots[i] = i;
    qattn_status st = append_on(ocl, &c, &t, 0, 5, 0);
    uint8_t *k = download(c.bufs.k, c.sizes.cache_bytes);
    bool untouched = k != NULL;
    for (size_t i = 0; untouched && i < c.sizes.cache_bytes; i++)
        untouched = k[i] == 0x5a;
    free(k);
    if (st != QATTN_ERR_INVALID_ARGUMENT || !strstr(qattn_last_error(ocl), "head 1") || !untouched)
        fail(name, "zero per-head scale", qattn_last_error(ocl));
    else
        printf("%-30s zero scale: %s\n", name, qattn_last_error(ocl));
    hs[1] = 0.01f;
    qattn_buffer_upload(c.bufs.k_scale, 0, hs, 8);
    if ((st = append_on(ocl, &c, &t, 0, 5, 0)))
        fail(name, "append", qattn_last_error(ocl));

    const int64_t Hq = 4;
    float q[2 * 4 * 64];
    for (size_t i = 0; i < sizeof(q) / 4; i++)
        q[i] = (float)ref_rng_normal(&rng);
    q[1 * 4 * 64 + 2 * 64 + 17] = INFINITY;
    int32_t qo[2] = {0, 2}, table[1] = {0}, lens[1] = {5};
    qattn_paged_desc pd = {.cache = c.desc, .table = QATTN_PAGES_DENSE, .batch = 1, .max_pages_per_seq = 1,
                           .total_q = 2, .max_q_len = 2, .heads_q = Hq, .q_dtype = F32, .q_stride = {Hq * D, D},
                           .o_stride = {Hq * D, D}, .causal = 1};
    qattn_plan *plan = NULL;
    qattn_buffer *qb = make_buffer(ocl, q, sizeof(q), 0), *ob = make_buffer(ocl, NULL, sizeof(q), 0xff);
    qattn_buffer *qob = make_buffer(ocl, qo, sizeof(qo), 0), *tb = make_buffer(ocl, table, sizeof(table), 0);
    qattn_buffer *lb = make_buffer(ocl, lens, sizeof(lens), 0), *ws = NULL;
    st = qattn_paged_plan_create(ocl, &pd, &plan);
    if (!st && qattn_plan_workspace_size(plan))
        ws = make_buffer(ocl, NULL, qattn_plan_workspace_size(plan), 0);
    if (!st) {
        qattn_paged_args pa = {.cache = &c.bufs, .q = qb, .o = ob, .qo_indptr = qob, .block_table = tb,
                               .seq_lens = lb, .workspace = ws};
        st = qattn_paged_run(plan, &pa);
        uint8_t out[sizeof(q)];
        untouched = qattn_buffer_download(ob, 0, out, sizeof(out)) == QATTN_OK;
        for (size_t i = 0; untouched && i < sizeof(out); i++)
            untouched = out[i] == 0xff;
        if (st != QATTN_ERR_NONFINITE_INPUT || !untouched)
            fail(name, "Inf in q", qattn_last_error(ocl));
        else
            printf("%-30s inf in q: %s\n", name, qattn_last_error(ocl));
    } else {
        fail(name, "plan", qattn_last_error(ocl));
    }
    qattn_plan_destroy(plan);
    qattn_buffer *all[] = {qb, ob, qob, tb, lb, ws};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    tokens_free(&t);
    cache_free(&c);
}

int main(int argc, char **argv)
{
    qattn_ctx_params params = {.backend = "opencl"};
    if (qattn_ctx_create(&params, &ocl)) {
        printf("SKIP: %s\n", qattn_last_error(NULL));
        return 77;
    }
    params.backend = "cpu";
    if (qattn_ctx_create(&params, &cpu)) {
        printf("cpu context: %s\n", qattn_last_error(NULL));
        qattn_ctx_destroy(ocl);
        return 1;
    }
    filter = argc > 1 ? argv[1] : NULL;
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("opencl_paged_check, seed %llu (QATTN_TEST_SEED repeats it)\n", (unsigned long long)seed);
    for (size_t i = 0; i < sizeof(append_cases) / sizeof(append_cases[0]); i++)
        if (selected(append_cases[i].name)) {
            ran++;
            run_append_case(&append_cases[i]);
        }
    for (size_t i = 0; i < sizeof(attn_cases) / sizeof(attn_cases[0]); i++)
        if (selected(attn_cases[i].name)) {
            ran++;
            run_attn_case(&attn_cases[i]);
        }
    if (selected("merge_bf16_states")) {
        ran++;
        run_merge_case();
    }
    run_bad_tables();
    if (selected("bad_values")) {
        ran++;
        run_bad_values();
    }
    qattn_ctx_destroy(cpu);
    qattn_ctx_destroy(ocl);
    printf("%d case(s), %d failure(s)\n", ran, failures);
    return failures ? 1 : 0;
}
