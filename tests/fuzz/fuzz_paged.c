/*
 * libFuzzer target: paged attention, qattn_paged_plan_create +
 * qattn_paged_run, over caches of every page format and layout, dense and
 * CSR page tables (built with the page pool and qattn_page_tables_build,
 * pages in random order), ragged and empty sequences, decode and causal
 * prefill, GQA, LSE, split-KV (planned or forced); hostile descriptions,
 * table entries (bad page ids, lengths, indptr), strides, offsets, NaN/Inf
 * and buffer arrangements.
 *
 * Input: an 8-byte header, one (kv_len, q_len) byte pair per sequence, the
 * values and a seed, one arrangement byte per buffer argument, then
 * mutations until the input ends. Unreferenced cache slots hold garbage
 * (NaN codes included): a kernel that reads one fails the fp64 check.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "numeric.h"

enum { A_Q, A_O, A_LSE, A_WS, A_QO, A_BT, A_SL, A_IP, A_IX, A_LP, A_KC, A_VC, A_KS, A_VS, N_ARGS };
#define MAX_B 4

typedef struct table_edit {
    uint8_t table;  /* which index buffer */
    uint8_t index;
    int32_t value;
} table_edit;

typedef struct paged_case {
    qattn_paged_desc desc;
    int64_t kv_len[MAX_B], q_len[MAX_B];
    int64_t extra_pages, extra_rows, first_row;
    fz_values q_values, kv_values;
    uint64_t seed;
    table_edit edits[6];
    int n_edits;
    float q_inject;
    uint32_t q_inject_at;
    bool q_injected, garbage_unused, null_args, null_cache, stream, pass_lse, other_tables;
    fz_arg a[N_ARGS];
} paged_case;

static void read_case(fuzz_input *in, paged_case *c)
{
    memset(c, 0, sizeof(*c));
    qattn_paged_desc *d = &c->desc;
    qattn_kv_cache_desc *cd = &d->cache;
    static const int64_t page_sizes[6] = {1, 2, 4, 8, 16, 3};
    static const int64_t dims[6] = {16, 16, 32, 32, 64, 128};
    static const qattn_dtype q_types[3] = {QATTN_DTYPE_F16, QATTN_DTYPE_BF16, QATTN_DTYPE_F32};
    const uint8_t h_format = fz_u8(in), h_heads = fz_u8(in), h_dim = fz_u8(in), h_flags = fz_u8(in);
    const uint8_t h_splits = fz_u8(in), h_q = fz_u8(in), h_o = fz_u8(in), h_extra = fz_u8(in);
    switch (h_format % 5) {
    case 0: cd->dtype = QATTN_DTYPE_F16; break;
    case 1: cd->dtype = QATTN_DTYPE_BF16; break;
    case 2: cd->dtype = QATTN_DTYPE_FP8_E4M3, cd->scales = QATTN_KV_SCALES_PER_HEAD; break;
    case 3: cd->dtype = QATTN_DTYPE_I8, cd->scales = QATTN_KV_SCALES_PER_HEAD; break;
    default: cd->dtype = QATTN_DTYPE_I8, cd->scales = QATTN_KV_SCALES_PER_ROW; break;
    }
    cd->layout = (qattn_kv_layout)((h_format >> 3) & 1);
    cd->page_size = page_sizes[(h_format >> 4) % 6];
    cd->heads_kv = 1 + h_heads % 2;
    d->heads_q = cd->heads_kv * (1 + (h_heads >> 1) % 3);
    cd->head_dim = dims[h_dim % 6];
    d->batch = 1 + h_flags % MAX_B;
    d->table = (qattn_page_table_kind)((h_flags >> 2) & 1);
    d->causal = (h_flags >> 3) & 1;
    d->return_lse = (h_flags >> 4) & 1;
    if (h_flags & 0x20)
        d->flags = QATTN_FLAG_NO_FINITE_CHECK;
    d->num_splits = h_splits < 128 ? 0 : (h_splits % 5);
    d->q_dtype = q_types[h_q % 3];
    c->extra_pages = (h_extra & 3);
    c->extra_rows = (h_extra >> 2) & 1;
    c->first_row = (h_extra >> 3) & 1;
    const int64_t Hq = d->heads_q, D = cd->head_dim;
    /* rows [total_q, Hq, D] token-major, or head-major, padded */
    for (int which = 0; which < 2; which++) {
        const uint8_t how = which ? h_o : h_q >> 2;
        int64_t *st = which ? d->o_stride : d->q_stride;
        const int64_t pad = (how >> 1) & 3;
        if (how & 1) { /* head-major: the row count is known later, so leave room for 64 rows */
            st[0] = D + pad;
            st[1] = 64 * (D + pad);
        } else {
            st[1] = D + pad;
            st[0] = Hq * (D + pad);
        }
    }
    for (int64_t b = 0; b < MAX_B; b++) {
        const uint8_t kv = fz_u8(in), q = fz_u8(in);
        c->kv_len[b] = kv < 200 ? kv % 20 : 20 + (kv - 200);        /* 0..75 */
        c->q_len[b] = q < 192 ? q % 3 : 3 + (q - 192) % 8;         /* decode, or a chunk of prefill */
    }
    c->q_values = fz_pick_values(in, d->q_dtype);
    c->kv_values = fz_pick_values(in, QATTN_DTYPE_F16);
    c->seed = fz_u64(in);
    fz_args_read(c->a, N_ARGS, in);
    for (int n = 0; n < 12 && fz_more(in); n++) {
        switch (fz_u8(in) % 12) {
        case 0: {
            int64_t *field[9] = {&d->batch, &d->max_pages_per_seq, &d->total_q, &d->max_q_len, &d->heads_q,
                                 &cd->num_pages, &cd->page_size, &cd->heads_kv, &cd->head_dim};
            const uint8_t which = fz_u8(in) % 9;
            /* 0 means "as built" for the fields the builder sets; the mutation applies after it */
            *field[which] = fz_hostile_i64(in);
            if (which < 4 && *field[which] == 0) /* 0 would mean "as built" below */
                *field[which] = -1;
            break;
        }
        case 1: {
            int64_t *st = fz_u8(in) & 1 ? d->o_stride : d->q_stride;
            int64_t *x = &st[fz_u8(in) & 1];
            const uint8_t how = fz_u8(in);
            *x = how < 128 ? (int64_t)((uint64_t)*x + (uint64_t)((int64_t)(how % 33) - 16)) : fz_hostile_i64(in);
            break;
        }
        case 2: {
            const uint8_t which = fz_u8(in) % 6, v = fz_u8(in);
            if (which == 0)
                d->num_splits = v < 128 ? (int)(v % 8) : (int)fz_u32(in);
            else if (which == 1)
                d->table = (qattn_page_table_kind)((int)(v % 4) - 1);
            else if (which == 2)
                d->q_dtype = (qattn_dtype)((int)(v % 7) - 1);
            else if (which == 3)
                d->flags = v & 0x80 ? fz_u32(in) : (uint32_t)(v & 1);
            else if (which == 4)
                cd->dtype = (qattn_dtype)((int)(v % 7) - 1);
            else
                cd->scales = (qattn_kv_scales)((int)(v % 5) - 1);
            break;
        }
        case 3: d->sm_scale = fz_hostile_float(in); break;
        case 4: case 5:
            if (c->n_edits < 6) {
                table_edit *e = &c->edits[c->n_edits++];
                e->table = fz_u8(in) % 6;
                e->index = fz_u8(in);
                const uint8_t how = fz_u8(in);
                e->value = how < 128 ? (int32_t)how - 8 : (int32_t)fz_hostile_i64(in);
            }
            break;
        case 6:
            c->q_injected = true;
            c->q_inject_at = fz_u32(in);
            c->q_inject = fz_hostile_float(in);
            break;
        case 7: c->garbage_unused = true; break;
        case 8: {
            const uint8_t which = fz_u8(in) % 5;
            if (which == 0)
                c->null_args = true;
            else if (which == 1)
                c->null_cache = true;
            else if (which == 2)
                c->stream = true;
            else if (which == 3)
                c->pass_lse = true;
            else
                c->other_tables = true;
            break;
        }
        default: fz_args_mutate(c->a, N_ARGS, in); break;
        }
    }
    for (int i = A_QO; i < N_ARGS; i++) { /* index tables and the cache are read from byte 0 of their buffers */
        c->a[i].place = 0;
        c->a[i].hostile = false;
    }
}

static qattn_tensor_desc rows_tensor(qattn_dtype dt, int64_t rows, int64_t heads, int64_t d, const int64_t st[2])
{
    return (qattn_tensor_desc){.dtype = dt, .shape = {1, heads, rows, d}, .stride = {1, st[1], st[0], 1}};
}

static int32_t table_at(const uint8_t *t, int64_t i)
{
    int32_t v;
    memcpy(&v, t + i * 4, 4);
    return v;
}

/* The header's rules for a run's tables (as they are in memory): 1 valid, 0 not. */
FZ_QUIET static bool tables_valid(const qattn_paged_desc *d, const uint8_t *qo, const uint8_t *bt, const uint8_t *sl,
                                  const uint8_t *ip, const uint8_t *ix, int64_t ix_count, const uint8_t *lp)
{
    const int64_t P = d->cache.page_size;
    if (table_at(qo, 0) < 0)
        return false;
    for (int64_t b = 0; b < d->batch; b++) {
        const int64_t q_len = (int64_t)table_at(qo, b + 1) - table_at(qo, b);
        if (q_len < 0 || q_len > d->max_q_len || table_at(qo, b + 1) > d->total_q)
            return false;
        int64_t pages;
        if (d->table == QATTN_PAGES_DENSE) {
            const int64_t len = table_at(sl, b);
            if (len < 0 || len > d->max_pages_per_seq * P)
                return false;
            pages = (len + P - 1) / P;
        } else {
            if (table_at(ip, 0) < 0 || table_at(ip, b + 1) < table_at(ip, b) || table_at(ip, b + 1) > ix_count)
                return false;
            pages = (int64_t)table_at(ip, b + 1) - table_at(ip, b);
            if (pages > d->max_pages_per_seq || (pages > 0 && (table_at(lp, b) < 1 || table_at(lp, b) > P)))
                return false;
        }
        for (int64_t i = 0; i < pages; i++) {
            const int64_t page = d->table == QATTN_PAGES_DENSE ? table_at(bt, b * d->max_pages_per_seq + i)
                                                               : table_at(ix, table_at(ip, b) + i);
            if (page < 0 || page >= d->cache.num_pages)
                return false;
        }
    }
    return true;
}

/* Dequantized cache value (slot's head h, channel e), as the format defines it. */
static double cache_value(const qattn_kv_cache_desc *c, const uint8_t *cache, const uint8_t *scales, int64_t slot,
                          int64_t h, int64_t e)
{
    const int64_t at = fz_cache_row(c, slot, h) + e;
    float scale = 1.f;
    if (c->scales == QATTN_KV_SCALES_PER_HEAD)
        memcpy(&scale, scales + h * 4, 4);
    else if (c->scales == QATTN_KV_SCALES_PER_ROW)
        memcpy(&scale, scales + (slot * c->heads_kv + h) * 4, 4);
    switch (c->dtype) {
    case QATTN_DTYPE_F16: return fz_load(cache, QATTN_DTYPE_F16, at);
    case QATTN_DTYPE_BF16: return fz_load(cache, QATTN_DTYPE_BF16, at);
    case QATTN_DTYPE_FP8_E4M3: return (double)(qattn_e4m3_to_f32(cache[at]) * scale);
    default: return (double)((float)(int8_t)cache[at] * scale);
    }
}

typedef struct run_view {
    const qattn_paged_desc *d;
    const uint8_t *q, *o, *kc, *vc, *ks, *vs, *qo, *bt, *sl, *ip, *ix, *lp;
    const float *lse;
    int splits;
} run_view;

/* The cache slot of sequence b's key j (checked tables). */
static int64_t key_slot(const run_view *v, int64_t b, int64_t j)
{
    const qattn_paged_desc *d = v->d;
    const int64_t P = d->cache.page_size;
    const int64_t page = d->table == QATTN_PAGES_DENSE ? table_at(v->bt, b * d->max_pages_per_seq + j / P)
                                                       : table_at(v->ix, table_at(v->ip, b) + j / P);
    return page * P + j % P;
}

FZ_QUIET static void check_results(const run_view *v)
{
    const qattn_paged_desc *d = v->d;
    const qattn_kv_cache_desc *c = &d->cache;
    const int64_t Hq = d->heads_q, G = Hq / c->heads_kv, D = c->head_dim, P = c->page_size;
    const qattn_tensor_desc qt = rows_tensor(d->q_dtype, d->total_q, Hq, D, d->q_stride);
    const qattn_tensor_desc ot = rows_tensor(d->q_dtype, d->total_q, Hq, D, d->o_stride);
    const double scale = d->sm_scale != 0.f ? (double)d->sm_scale : (double)(float)(1.0 / sqrt((double)D));
    int64_t max_keys = 1; /* the longest sequence (tables checked: <= max_pages_per_seq * P) */
    for (int64_t b = 0; b < d->batch; b++) {
        const int64_t pages = d->table == QATTN_PAGES_DENSE ? 0 : table_at(v->ip, b + 1) - table_at(v->ip, b);
        const int64_t len = d->table == QATTN_PAGES_DENSE ? table_at(v->sl, b) : pages ? (pages - 1) * P + table_at(v->lp, b) : 0;
        max_keys = len > max_keys ? len : max_keys;
    }
    double *k = malloc((size_t)(max_keys * D) * sizeof(double)), *vv = malloc((size_t)(max_keys * D) * sizeof(double));
    double *s = malloc((size_t)max_keys * sizeof(double)), *w = malloc((size_t)max_keys * sizeof(double));
    double *q = malloc((size_t)D * sizeof(double));
    FUZZ_CHECK(k && vv && s && w && q, "harness: out of memory");
    for (int64_t b = 0; b < d->batch; b++) {
        const int64_t q0 = table_at(v->qo, b), q_len = table_at(v->qo, b + 1) - q0;
        int64_t kv_len;
        if (d->table == QATTN_PAGES_DENSE) {
            kv_len = table_at(v->sl, b);
        } else {
            const int64_t pages = table_at(v->ip, b + 1) - table_at(v->ip, b);
            kv_len = pages ? (pages - 1) * P + table_at(v->lp, b) : 0;
        }
        for (int64_t hk = 0; hk < c->heads_kv; hk++) {
            bool defined = true; /* edited tables may point at slots that hold garbage */
            for (int64_t j = 0; j < kv_len; j++) {
                const int64_t slot = key_slot(v, b, j);
                for (int64_t e = 0; e < D; e++) {
                    k[j * D + e] = cache_value(c, v->kc, v->ks, slot, hk, e);
                    vv[j * D + e] = cache_value(c, v->vc, v->vs, slot, hk, e);
                    defined &= isfinite(k[j * D + e]) && isfinite(vv[j * D + e]) && fabs(vv[j * D + e]) < 1e30;
                }
            }
            if (!defined)
                continue;
            for (int64_t g = 0; g < G; g++)
                for (int64_t i = 0; i < q_len; i++) {
                    const int64_t h = hk * G + g, row = q0 + i;
                    int64_t end = kv_len;
                    if (d->causal && i + 1 + kv_len - q_len < end)
                        end = i + 1 + kv_len - q_len;
                    const float *lse = v->lse ? v->lse + row * Hq + h : NULL;
                    if (end <= 0) {
                        for (int64_t e = 0; e < D; e++)
                            FUZZ_CHECK(fz_load(v->o, d->q_dtype, fz_offset_of(&ot, 0, h, row, e)) == 0.0,
                                       "paged: o[%lld,%lld] != 0 for a row that sees no key", (long long)row, (long long)h);
                        FUZZ_CHECK(!lse || (isinf(*lse) && *lse < 0), "paged: lse[%lld,%lld] = %g for a row that sees no key",
                                   (long long)row, (long long)h, lse ? (double)*lse : 0.0);
                        continue;
                    }
                    for (int64_t e = 0; e < D; e++)
                        q[e] = fz_load(v->q, d->q_dtype, fz_offset_of(&qt, 0, h, row, e));
                    double worst = 0.0, magnitude = 0.0;
                    for (int64_t j = 0; j < end; j++) {
                        double dot = 0.0, absdot = 0.0;
                        for (int64_t e = 0; e < D; e++) {
                            dot += q[e] * k[j * D + e];
                            absdot += fabs(q[e] * k[j * D + e]);
                        }
                        s[j] = scale * dot;
                        worst = fmax(worst, fabs(scale) * (double)(D + 16) * 0x1p-24 * absdot);
                        magnitude = fmax(magnitude, fabs(scale) * absdot); /* bounds every partial sum too */
                    }
                    double qmax = 0.0; /* kernels scale Q by sm_scale * log2(e) in fp32 first */
                    for (int64_t e = 0; e < D; e++)
                        qmax = fmax(qmax, fabs(q[e]));
                    if (magnitude > 1e30 || worst > 10.0 || qmax * fabs(scale) > 1e37)
                        continue;
                    const double ref_lse = fz_softmax(s, end, w);
                    double e_row = worst + 0x1p-18 + magnitude * 0x1p-22;
                    if (v->splits > 1) /* partial results merged through fp32 LSEs */
                        e_row += (fabs(ref_lse) + magnitude + 1.0) * 0x1p-21;
                    const double spread = expm1(2.0 * e_row);
                    for (int64_t e = 0; e < D; e++) {
                        double ref = 0.0, amax = 0.0;
                        for (int64_t j = 0; j < end; j++) {
                            ref += w[j] * vv[j * D + e];
                            amax = fmax(amax, fabs(vv[j * D + e]));
                        }
                        const double bound = spread * amax + (double)(2 * end + 64 + 8 * v->splits) * 0x1p-24 * amax;
                        const double tol = 2.0 * bound + 2.0 * fz_dtype_eps(d->q_dtype) * fabs(ref) + fz_dtype_tiny(d->q_dtype);
                        if (fabs(ref) + tol >= fz_dtype_max(d->q_dtype))
                            continue;
                        const double got = fz_load(v->o, d->q_dtype, fz_offset_of(&ot, 0, h, row, e));
                        FUZZ_CHECK(fabs(got - ref) <= tol,
                                   "paged: o[%lld,%lld,%lld] = %.9g, fp64 reference %.9g, bound %.3g (seq %lld, kv %lld, "
                                   "q_len %lld, keys %lld, splits %d)",
                                   (long long)row, (long long)h, (long long)e, got, ref, tol, (long long)b,
                                   (long long)kv_len, (long long)q_len, (long long)end, v->splits);
                    }
                    if (lse)
                        FUZZ_CHECK(fabs((double)*lse - ref_lse) <= 2.0 * (e_row + 0x1p-20 * (fabs(ref_lse) + 1.0)),
                                   "paged: lse[%lld,%lld] = %.9g, fp64 reference %.9g", (long long)row, (long long)h,
                                   (double)*lse, ref_lse);
                }
        }
    }
    free(k);
    free(vv);
    free(s);
    free(w);
    free(q);
}

/* Valid codes in the slots the tables reference; garbage (NaN codes too) elsewhere. */
FZ_QUIET static void fill_cache(const qattn_kv_cache_desc *c, uint8_t *cache, uint8_t *scales, const fz_values *vals,
                                ref_rng *rng, int64_t slot)
{
    const int64_t D = c->head_dim;
    for (int64_t h = 0; h < c->heads_kv; h++) {
        const int64_t at = fz_cache_row(c, slot, h);
        for (int64_t e = 0; cache && e < D; e++) {
            if (c->dtype == QATTN_DTYPE_F16 || c->dtype == QATTN_DTYPE_BF16)
                fz_store(cache, c->dtype, at + e, fz_draw(vals, rng, e));
            else if (c->dtype == QATTN_DTYPE_FP8_E4M3)
                cache[at + e] = (uint8_t)((int)(ref_rng_uniform(rng) * 254) + ((ref_rng_uniform(rng) * 254) >= 127 ? 1 : 0)) & 0xfe;
            else
                cache[at + e] = (uint8_t)(int8_t)((int)(ref_rng_uniform(rng) * 255) - 127);
        }
        if (scales && c->scales == QATTN_KV_SCALES_PER_ROW) {
            const float s = (float)ldexp(1.0 + ref_rng_uniform(rng), vals->log2_mag - 7);
            memcpy(scales + (slot * c->heads_kv + h) * 4, &s, 4);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size, 0};
    qattn_ctx *ctx = fuzz_ctx();
    paged_case c;
    read_case(&in, &c);
    qattn_paged_desc *d = &c.desc;
    qattn_kv_cache_desc *cd = &d->cache;
    ref_rng rng;
    ref_rng_seed(&rng, c.seed);

    /* The sequences as built (hostile description fields apply on top). */
    const int64_t B0 = d->batch > 0 && d->batch <= MAX_B ? d->batch : 1;
    const int64_t P0 = cd->page_size > 0 && cd->page_size <= 16 ? cd->page_size : 1;
    int64_t pages_of[MAX_B], total_pages = 0, max_pages = 1, max_q = 1, total_q;
    int32_t qo[MAX_B + 1];
    qo[0] = (int32_t)c.first_row;
    for (int64_t b = 0; b < B0; b++) {
        pages_of[b] = (c.kv_len[b] + P0 - 1) / P0;
        total_pages += pages_of[b];
        max_pages = pages_of[b] > max_pages ? pages_of[b] : max_pages;
        max_q = c.q_len[b] > max_q ? c.q_len[b] : max_q;
        qo[b + 1] = qo[b] + (int32_t)c.q_len[b];
    }
    total_q = qo[B0] + c.extra_rows;
    if (total_q < 1)
        total_q = 1;
    const int64_t num_pages = total_pages + c.extra_pages + 1;
    /* fields left at 0 take the built values; hostile mutations set them non-zero */
    if (cd->num_pages == 0)
        cd->num_pages = num_pages;
    if (d->max_pages_per_seq == 0)
        d->max_pages_per_seq = max_pages;
    if (d->total_q == 0)
        d->total_q = total_q;
    if (d->max_q_len == 0)
        d->max_q_len = max_q;

    /* Pages in random order from the pool, then both table encodings. */
    qattn_page_pool *pool = NULL;
    FUZZ_CHECK(qattn_page_pool_create(num_pages, &pool) == QATTN_OK, "qattn_page_pool_create");
    int32_t all[MAX_B * 80 + 8];
    FUZZ_CHECK(qattn_page_pool_alloc(pool, num_pages, all) == QATTN_OK, "qattn_page_pool_alloc");
    for (int64_t i = num_pages - 1; i > 0; i--) {
        const int64_t j = (int64_t)(ref_rng_uniform(&rng) * (double)(i + 1));
        const int32_t t = all[i];
        all[i] = all[j];
        all[j] = t;
    }
    const int32_t *seq_pages[MAX_B];
    for (int64_t b = 0, at = 0; b < B0; at += pages_of[b], b++)
        seq_pages[b] = all + at;
    int32_t block_table[MAX_B * 80], indptr[MAX_B + 1], indices[MAX_B * 80 + 1];
    FUZZ_CHECK(qattn_page_tables_build(B0, seq_pages, pages_of, max_pages, block_table, indptr, indices) == QATTN_OK,
               "qattn_page_tables_build: %s", qattn_last_error(NULL));
    FUZZ_CHECK(qattn_page_pool_free(pool, num_pages, all) == QATTN_OK && qattn_page_pool_free_count(pool) == num_pages,
               "qattn_page_pool_free");
    qattn_page_pool_destroy(pool);

    /* Plan. */
    qattn_kv_cache_sizes sizes;
    fz_verdict pv = fz_cache_verdict(cd, &sizes);
    size_t q_bytes = 0, o_bytes = 0;
    const int64_t counts[5] = {d->batch, d->max_pages_per_seq, d->total_q, d->max_q_len, d->heads_q};
    for (int i = 0; i < 5; i++)
        if (counts[i] <= 0 || counts[i] > INT32_MAX)
            pv = FZ_INVALID;
    if (pv != FZ_INVALID) {
        if ((unsigned)d->table > QATTN_PAGES_CSR || d->max_q_len > d->total_q || d->heads_q % cd->heads_kv ||
            (d->q_dtype != QATTN_DTYPE_F32 && d->q_dtype != QATTN_DTYPE_F16 && d->q_dtype != QATTN_DTYPE_BF16) ||
            !isfinite(d->sm_scale) || fabsf(d->sm_scale) > 2.3e38f || d->num_splits < 0 || d->num_splits > 1024 ||
            (d->flags & ~(uint32_t)QATTN_FLAG_NO_FINITE_CHECK) || cd->head_dim % 16 || cd->head_dim > 256)
            pv = FZ_INVALID;
        if ((double)d->batch * (double)d->heads_q * (double)d->max_q_len > 0x1p52)
            pv = fz_worst(pv, FZ_EITHER); /* a bound of the library on work items */
    }
    if (pv != FZ_INVALID) {
        const qattn_tensor_desc qt = rows_tensor(d->q_dtype, d->total_q, d->heads_q, cd->head_dim, d->q_stride);
        const qattn_tensor_desc ot = rows_tensor(d->q_dtype, d->total_q, d->heads_q, cd->head_dim, d->o_stride);
        pv = fz_worst(pv, fz_tensor_verdict(&qt, &q_bytes));
        pv = fz_worst(pv, fz_tensor_verdict(&ot, &o_bytes));
        const unsigned __int128 partials = (unsigned __int128)1024 * d->total_q * d->heads_q * (cd->head_dim + 1) * 4;
        if (partials > (unsigned __int128)1 << 62)
            pv = fz_worst(pv, FZ_EITHER); /* split partials the library may refuse to size */
    }
    qattn_plan *plan = (qattn_plan *)(uintptr_t)1;
    qattn_status s = qattn_paged_plan_create(ctx, d, &plan);
    if (s) {
        FUZZ_CHECK(pv != FZ_VALID, "qattn_paged_plan_create refused a valid request: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        FUZZ_CHECK(plan == NULL, "a failed qattn_paged_plan_create left *out set");
        fuzz_check_message(ctx, s, "qattn_paged_plan_create");
        return 0;
    }
    FUZZ_CHECK(pv != FZ_INVALID, "qattn_paged_plan_create accepted an invalid request");
    qattn_plan_info info;
    FUZZ_CHECK(qattn_plan_get_info(plan, &info) == QATTN_OK && info.workspace_bytes == qattn_plan_workspace_size(plan),
               "qattn_plan_get_info");
    char text[64];
    FUZZ_CHECK(qattn_plan_describe(plan, text, sizeof(text)) > 0 && memchr(text, 0, sizeof(text)), "describe");
    const int64_t max_keys = d->max_pages_per_seq * cd->page_size;
    const int splits = info.kv_tile > 0 ? (int)((max_keys + info.kv_tile - 1) / info.kv_tile) : 1;

    /* Buffers. */
    const int64_t B = d->batch, Hq = d->heads_q;
    const size_t ws_size = qattn_plan_workspace_size(plan);
    const size_t b4 = (size_t)B * 4;
    const bool dense = d->table == QATTN_PAGES_DENSE, scaled = cd->scales != QATTN_KV_SCALES_NONE;
    const size_t need[N_ARGS] = {q_bytes, o_bytes, (size_t)d->total_q * (size_t)Hq * 4, ws_size, b4 + 4,
                                 (size_t)d->max_pages_per_seq * b4, b4, b4 + 4, (size_t)(B0 * 80 + 1) * 4, b4,
                                 sizes.cache_bytes, sizes.cache_bytes, scaled ? sizes.scale_bytes : 64,
                                 scaled ? sizes.scale_bytes : 64};
    const size_t es = qattn_dtype_size(d->q_dtype);
    const size_t page_es = sizes.cache_bytes ? qattn_dtype_size(cd->dtype) : 1; /* pages are accessed element-wise */
    const size_t align[N_ARGS] = {es, es, 4, 256, 4, 4, 4, 4, 4, 4, page_es, page_es, 4, 4};
    fz_arg *a = c.a;
    size_t total = 0;
    for (int i = 0; i < N_ARGS; i++) {
        a[i].bytes = need[i];
        a[i].align = align[i];
        a[i].output = i >= A_O && i <= A_WS;
        a[i].pass = i == A_Q || i == A_O || i == A_QO || i == A_KC || i == A_VC || (i == A_LSE && (d->return_lse || c.pass_lse)) ||
                    (i == A_WS && ws_size > 0) || (scaled && (i == A_KS || i == A_VS)) ||
                    ((i == A_BT || i == A_SL) && (dense || c.other_tables)) ||
                    ((i == A_IP || i == A_IX || i == A_LP) && (!dense || c.other_tables));
        if (a[i].pass)
            total += need[i] < (1u << 20) ? need[i] : (1u << 20);
    }
    const bool huge = total >= (1u << 20) || !q_bytes || !o_bytes || !sizes.cache_bytes;
    fz_mem mem = {0};
    fz_args_build(&mem, a, N_ARGS, huge ? 4096 : SIZE_MAX);
    fz_garbage(&mem, &rng);
    if (!huge) {
        uint8_t *o = fz_arg_host(&mem, &a[A_O]), *lse = fz_arg_host(&mem, &a[A_LSE]);
        if (o)
            memset(o, 0xff, need[A_O]);
        if (lse)
            memset(lse, 0xff, need[A_LSE]);
        uint8_t *kc = fz_arg_host(&mem, &a[A_KC]), *vc = fz_arg_host(&mem, &a[A_VC]);
        uint8_t *ks = fz_arg_host(&mem, &a[A_KS]), *vs = fz_arg_host(&mem, &a[A_VS]);
        if (cd->scales == QATTN_KV_SCALES_PER_HEAD)
            for (int64_t h = 0; h < cd->heads_kv; h++) {
                const float kscale = (float)ldexp(1.0, c.kv_values.log2_mag - 6), vscale = kscale * 1.5f;
                if (ks && (size_t)(h + 1) * 4 <= need[A_KS])
                    memcpy(ks + h * 4, &kscale, 4);
                if (vs && (size_t)(h + 1) * 4 <= need[A_VS])
                    memcpy(vs + h * 4, &vscale, 4);
            }
        if (sizes.cache_bytes && cd->page_size == P0)
            for (int64_t b = 0; b < B0; b++)
                for (int64_t t = 0; t < c.kv_len[b]; t++) {
                    const int64_t slot = (int64_t)seq_pages[b][t / P0] * P0 + t % P0;
                    if (slot >= cd->num_pages * P0)
                        continue;
                    fill_cache(cd, kc, ks, &c.kv_values, &rng, slot);
                    fill_cache(cd, vc, vs, &c.kv_values, &rng, slot);
                }
        uint8_t *q = fz_arg_host(&mem, &a[A_Q]);
        if (q) {
            const qattn_tensor_desc qt = rows_tensor(d->q_dtype, d->total_q, Hq, cd->head_dim, d->q_stride);
            for (int64_t r = 0; r < d->total_q; r++)
                for (int64_t h = 0; h < Hq; h++)
                    for (int64_t e = 0; e < cd->head_dim; e++)
                        fz_store(q, d->q_dtype, fz_offset_of(&qt, 0, h, r, e), fz_draw(&c.q_values, &rng, e));
            if (c.q_injected) {
                const int64_t n = d->total_q * Hq * cd->head_dim, at = (int64_t)(c.q_inject_at % (uint64_t)n);
                fz_store(q, d->q_dtype, fz_offset_of(&qt, 0, at / cd->head_dim % Hq, at / cd->head_dim / Hq, at % cd->head_dim),
                         c.q_inject);
            }
        }
        /* tables, then the edits */
        uint8_t *tab[6] = {fz_arg_host(&mem, &a[A_QO]), fz_arg_host(&mem, &a[A_BT]), fz_arg_host(&mem, &a[A_SL]),
                           fz_arg_host(&mem, &a[A_IP]), fz_arg_host(&mem, &a[A_IX]), fz_arg_host(&mem, &a[A_LP])};
        int32_t seq_lens[MAX_B], last[MAX_B];
        for (int64_t b = 0; b < B0; b++) {
            seq_lens[b] = (int32_t)c.kv_len[b];
            last[b] = pages_of[b] ? (int32_t)(c.kv_len[b] - (pages_of[b] - 1) * P0) : (int32_t)(ref_rng_uniform(&rng) * 3);
        }
        const int64_t mp = d->max_pages_per_seq;
        if (tab[0])
            memcpy(tab[0], qo, (size_t)((B < B0 ? B : B0) + 1) * 4);
        if (tab[1] && mp == max_pages && B <= B0)
            for (int64_t i = 0; i < B * mp; i++) {
                int32_t x = block_table[i];
                if (x < 0 && c.garbage_unused) /* entries past a sequence's pages are never read */
                    x = (int32_t)(ref_rng_uniform(&rng) * 4e9 - 2e9);
                memcpy(tab[1] + i * 4, &x, 4);
            }
        if (tab[2])
            memcpy(tab[2], seq_lens, (size_t)(B < B0 ? B : B0) * 4);
        if (tab[3])
            memcpy(tab[3], indptr, (size_t)((B < B0 ? B : B0) + 1) * 4);
        if (tab[4])
            memcpy(tab[4], indices, (size_t)(total_pages + 1) * 4);
        if (tab[5])
            memcpy(tab[5], last, (size_t)(B < B0 ? B : B0) * 4);
        const size_t tab_bytes[6] = {need[A_QO], need[A_BT], need[A_SL], need[A_IP], need[A_IX], need[A_LP]};
        for (int i = 0; i < c.n_edits; i++) {
            const table_edit *e = &c.edits[i];
            const size_t at = (size_t)e->index * 4 % (tab_bytes[e->table] ? tab_bytes[e->table] : 4);
            if (tab[e->table] && at + 4 <= tab_bytes[e->table])
                memcpy(tab[e->table] + at, &e->value, 4);
        }
    }
    fz_commit(&mem);

    /* The run's verdict. */
    qattn_kv_cache_buffers cache = {.k = fz_arg_buffer(&mem, &a[A_KC]), .v = fz_arg_buffer(&mem, &a[A_VC]),
                                    .k_scale = fz_arg_buffer(&mem, &a[A_KS]), .v_scale = fz_arg_buffer(&mem, &a[A_VS])};
    qattn_paged_args args = {
        .cache = c.null_cache ? NULL : &cache, .q = fz_arg_buffer(&mem, &a[A_Q]), .o = fz_arg_buffer(&mem, &a[A_O]),
        .lse = fz_arg_buffer(&mem, &a[A_LSE]), .qo_indptr = fz_arg_buffer(&mem, &a[A_QO]),
        .block_table = fz_arg_buffer(&mem, &a[A_BT]), .seq_lens = fz_arg_buffer(&mem, &a[A_SL]),
        .indptr = fz_arg_buffer(&mem, &a[A_IP]), .indices = fz_arg_buffer(&mem, &a[A_IX]),
        .last_page_len = fz_arg_buffer(&mem, &a[A_LP]), .workspace = fz_arg_buffer(&mem, &a[A_WS]),
        .q_offset = a[A_Q].offset, .o_offset = a[A_O].offset, .lse_offset = a[A_LSE].offset,
        .workspace_offset = a[A_WS].offset, .stream = c.stream ? (void *)&c : NULL,
    };
    fz_verdict rv = c.null_args || c.null_cache || c.stream ? FZ_INVALID : FZ_VALID;
    if (!d->return_lse && args.lse)
        rv = FZ_INVALID;
    if (cache.k && cache.k == cache.v)
        rv = FZ_INVALID;
    if (!scaled && (cache.k_scale || cache.v_scale))
        rv = FZ_INVALID;
    if (!dense && args.indices)
        a[A_IX].bytes = mem.bufs[a[A_IX].buf].size; /* the whole indices buffer is an input */
    for (int i = 0; i < N_ARGS; i++) {
        a[i].required = (i == A_Q || i == A_O || i == A_QO || i == A_KC || i == A_VC) ||
                        (i == A_LSE && d->return_lse) || (i == A_WS && ws_size > 0) || (scaled && (i == A_KS || i == A_VS)) ||
                        (dense && (i == A_BT || i == A_SL)) || (!dense && (i == A_IP || i == A_IX || i == A_LP));
        if (!a[i].required) /* unused arguments are ignored: no overlap with them counts */
            a[i].pass = a[i].pass && (i == A_LSE);
    }
    if (!dense && args.indices && a[A_IX].bytes < 4)
        rv = FZ_INVALID;
    rv = fz_worst(rv, fz_args_verdict(&mem, a, N_ARGS));
    if (!q_bytes || !o_bytes || !sizes.cache_bytes) /* spans over 2^62 bytes: no buffer here holds them */
        rv = FZ_INVALID;
    if (!dense)
        a[A_IX].bytes = need[A_IX];
    const bool checked = !(d->flags & QATTN_FLAG_NO_FINITE_CHECK);
    bool tables_ok = false, q_finite = true;
    const uint8_t *tabs[6] = {NULL};
    if (rv != FZ_INVALID && !huge) {
        const int ids[6] = {A_QO, A_BT, A_SL, A_IP, A_IX, A_LP};
        for (int i = 0; i < 6; i++)
            tabs[i] = a[ids[i]].required ? fz_before(&mem, a[ids[i]].buf, 0) : NULL;
        const int64_t ix_count = dense ? 0 : (int64_t)(mem.bufs[a[A_IX].buf].size / 4);
        tables_ok = tables_valid(d, tabs[0], tabs[1], tabs[2], tabs[3], tabs[4], ix_count, tabs[5]);
        if (!tables_ok)
            rv = checked ? FZ_INVALID : fz_worst(rv, FZ_EITHER); /* the CPU checks host tables even then */
        if (tables_ok) { /* Q of the rows the sequences own */
            const qattn_tensor_desc qt = rows_tensor(d->q_dtype, d->total_q, Hq, cd->head_dim, d->q_stride);
            const uint8_t *q = fz_before(&mem, a[A_Q].buf, a[A_Q].offset);
            for (int64_t b = 0; b < B; b++)
                for (int64_t r = table_at(tabs[0], b); r < table_at(tabs[0], b + 1); r++)
                    for (int64_t h = 0; h < Hq; h++)
                        for (int64_t e = 0; e < cd->head_dim; e++)
                            q_finite &= isfinite(fz_load(q, d->q_dtype, fz_offset_of(&qt, 0, h, r, e))) != 0;
            if (!q_finite && checked)
                rv = FZ_INVALID;
            if (c.q_injected && q_finite && checked)
                rv = fz_worst(rv, FZ_EITHER); /* NaN in a row no sequence owns: the header does not say */
        }
    } else if (rv != FZ_INVALID) {
        rv = fz_worst(rv, FZ_EITHER);
    }

    s = qattn_paged_run(plan, c.null_args ? NULL : &args);
    if (s == QATTN_OK)
        s = qattn_ctx_synchronize(ctx);
    if (args.workspace)
        fz_allow(&mem, a[A_WS].buf, a[A_WS].offset, ws_size);
    if (s) {
        FUZZ_CHECK(rv != FZ_VALID, "qattn_paged_run refused a valid request: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        fuzz_check_message(ctx, s, "qattn_paged_run");
        fz_check_unchanged(&mem, "failed qattn_paged_run");
    } else {
        FUZZ_CHECK(rv != FZ_INVALID, "qattn_paged_run accepted an invalid request");
        if (tables_ok) { /* the rows the sequences own; the CPU writes no other */
            const qattn_tensor_desc ot = rows_tensor(d->q_dtype, d->total_q, Hq, cd->head_dim, d->o_stride);
            for (int64_t b = 0; b < B; b++)
                for (int64_t r = table_at(tabs[0], b); r < table_at(tabs[0], b + 1); r++)
                    for (int64_t h = 0; h < Hq; h++) {
                        fz_allow(&mem, a[A_O].buf, a[A_O].offset + (size_t)fz_offset_of(&ot, 0, h, r, 0) * es,
                                 (size_t)cd->head_dim * es);
                        if (d->return_lse)
                            fz_allow(&mem, a[A_LSE].buf, a[A_LSE].offset + (size_t)(r * Hq + h) * 4, 4);
                    }
        } else { /* unchecked bad tables: unspecified outputs, but nothing outside them */
            const qattn_tensor_desc ot = rows_tensor(d->q_dtype, d->total_q, Hq, cd->head_dim, d->o_stride);
            fz_allow_tensor(&mem, a[A_O].buf, a[A_O].offset, &ot);
            if (d->return_lse)
                fz_allow(&mem, a[A_LSE].buf, a[A_LSE].offset, need[A_LSE]);
        }
        fz_check_unchanged(&mem, "qattn_paged_run");
        if (tables_ok && q_finite && rv == FZ_VALID && !huge && cd->page_size == P0) {
            float *lse = NULL;
            if (d->return_lse) {
                lse = malloc(need[A_LSE]);
                FUZZ_CHECK(lse, "harness: out of memory");
                memcpy(lse, fz_after(&mem, a[A_LSE].buf, a[A_LSE].offset), need[A_LSE]);
            }
            run_view v = {.d = d, .q = fz_before(&mem, a[A_Q].buf, a[A_Q].offset),
                          .o = fz_after(&mem, a[A_O].buf, a[A_O].offset), .kc = fz_before(&mem, a[A_KC].buf, 0),
                          .vc = fz_before(&mem, a[A_VC].buf, 0), .ks = scaled ? fz_before(&mem, a[A_KS].buf, 0) : NULL,
                          .vs = scaled ? fz_before(&mem, a[A_VS].buf, 0) : NULL, .qo = tabs[0], .bt = tabs[1],
                          .sl = tabs[2], .ip = tabs[3], .ix = tabs[4], .lp = tabs[5], .lse = lse, .splits = splits};
            check_results(&v);
            free(lse);
        }
    }
    qattn_plan_destroy(plan);
    fz_release(&mem);
    return 0;
}
