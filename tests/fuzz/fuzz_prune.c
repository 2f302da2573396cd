/*
 * libFuzzer target: decode-time pruning. qattn_kv_meta_bytes, the page
 * metadata qattn_kv_append keeps (buffers->k_meta, rewrites included),
 * qattn_paged_select_plan_create (fixed and adaptive budgets, sinks, recent
 * pages), qattn_paged_run on such plans, qattn_paged_selection_read,
 * qattn_paged_page_mass and qattn_evict_pages with the page pool, over caches
 * of every page format, odd page sizes, GQA, dense and CSR tables, sequences
 * of 0 and 1 tokens; hostile budgets, fractions and epsilons (NaN, Inf,
 * negative, > 1, huge), max_budget without epsilon, missing, short, aliased
 * and foreign k_meta, bad table entries, NaN in new K and in Q (with and
 * without the finite check), bad eviction policies and page lists.
 *
 * Input: a 9-byte header, one (kv_len, q_len) byte pair per sequence, the
 * values and a seed, one arrangement byte per buffer argument, then
 * mutations until the input ends. Each call is judged from the header's
 * rules: a refusal must say why with the right status and change nothing; a
 * success must match this file's own model: metadata = min/max of the cache
 * read back, selections ascending with the forced pages and the budgeted
 * count, selected scores >= unselected ones, attention over the selection =
 * fp64 attention over those pages, page mass rows summing to the rows that
 * see keys, eviction freeing exactly the excess with the pool consistent.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "numeric.h"

enum {
    A_KC, A_VC, A_KS, A_VS, A_META, A_KN, A_VN, A_SLOTS, A_Q, A_O, A_LSE, A_WS, A_QO, A_BT, A_SL, A_IP, A_IX, A_LP,
    A_MASS, N_ARGS
};
#define MAX_B 3
#define MAX_LEN 80
#define MAX_PAGES_ALL (MAX_B * MAX_LEN + 8)
#define POISON32 ((int32_t)0x5a5a5a5a)

typedef struct table_edit {
    uint8_t table, index;
    int32_t value;
} table_edit;

typedef struct prune_case {
    qattn_paged_desc desc;
    qattn_page_select_desc sel;
    bool no_select, rewrite, stale_scale_garbage, null_args, read_hostile, mass_null;
    int read_how;
    int64_t kv_len[MAX_B], q_len[MAX_B], extra_pages;
    fz_values q_values, kv_values;
    uint64_t seed;
    table_edit edits[4];
    int n_edits;
    bool k_injected, q_injected;
    float k_inject, q_inject;
    uint32_t k_inject_at, q_inject_at;
    qattn_evict_policy pol;
    int evict_scores;          /* 0 none, 1 random, 2 the page mass, 3 random with NaN */
    int list_edit_index;       /* -1: none */
    int32_t list_edit_value;
    int64_t hostile_count;     /* 0: none */
    fz_arg a[N_ARGS];
} prune_case;

static void read_case(fuzz_input *in, prune_case *c)
{
    memset(c, 0, sizeof(*c));
    qattn_paged_desc *d = &c->desc;
    qattn_kv_cache_desc *cd = &d->cache;
    static const int64_t page_sizes[8] = {1, 2, 3, 4, 5, 7, 8, 16};
    static const int64_t dims[3] = {16, 32, 64};
    static const qattn_dtype q_types[3] = {QATTN_DTYPE_F16, QATTN_DTYPE_BF16, QATTN_DTYPE_F32};
    static const float epsilons[8] = {0.5f, 0.1f, 0.01f, 1e-3f, 1e-6f, 0.3f, 0.9f, 1e-2f};
    const uint8_t h_format = fz_u8(in), h_heads = fz_u8(in), h_flags = fz_u8(in), h_mode = fz_u8(in);
    const uint8_t h_budget = fz_u8(in), h_forced = fz_u8(in), h_eps = fz_u8(in), h_evict = fz_u8(in), h_ev2 = fz_u8(in);
    switch (h_format % 5) {
    case 0: cd->dtype = QATTN_DTYPE_F16; break;
    case 1: cd->dtype = QATTN_DTYPE_BF16; break;
    case 2: cd->dtype = QATTN_DTYPE_FP8_E4M3, cd->scales = QATTN_KV_SCALES_PER_HEAD; break;
    case 3: cd->dtype = QATTN_DTYPE_I8, cd->scales = QATTN_KV_SCALES_PER_HEAD; break;
    default: cd->dtype = QATTN_DTYPE_I8, cd->scales = QATTN_KV_SCALES_PER_ROW; break;
    }
    cd->layout = (qattn_kv_layout)((h_format >> 3) & 1);
    cd->page_size = page_sizes[(h_format >> 4) % 8];
    cd->heads_kv = 1 + h_heads % 2;
    d->heads_q = cd->heads_kv * (1 + (h_heads >> 1) % 3);
    cd->head_dim = dims[(h_heads >> 3) % 3];
    d->batch = 1 + h_flags % MAX_B;
    d->table = (qattn_page_table_kind)((h_flags >> 2) & 1);
    d->causal = (h_flags >> 3) & 1;
    d->return_lse = (h_flags >> 4) & 1;
    if (h_flags & 0x20)
        d->flags = QATTN_FLAG_NO_FINITE_CHECK;
    d->q_dtype = q_types[(h_flags >> 6) % 3];
    d->num_splits = h_mode & 0x40 ? 2 : 0;
    if (h_mode & 2)
        c->sel.budget_fraction = (float)(1 + h_budget % 16) / 16.f;
    else
        c->sel.budget_tokens = 1 + h_budget % 40;
    if (h_mode & 4) {
        c->sel.epsilon = epsilons[h_eps % 8];
        if (h_mode & 8)
            c->sel.max_budget_tokens = 1 + (h_eps >> 3) * 3;
    }
    c->sel.sink_pages = h_forced % 4;
    c->sel.recent_pages = (h_forced >> 2) % 4;
    c->rewrite = (h_mode >> 4) & 1;
    c->stale_scale_garbage = (h_mode >> 5) & 1;
    c->no_select = h_mode == 0xff;
    c->pol.keep_pages = 1 + h_evict % 8;
    c->pol.sink_pages = (h_evict >> 3) % 3;
    c->pol.recent_pages = 1 + (h_evict >> 5) % 3;
    c->evict_scores = h_ev2 % 4;
    c->extra_pages = (h_ev2 >> 2) % 4;
    c->list_edit_index = -1;
    for (int b = 0; b < MAX_B; b++) {
        const uint8_t kv = fz_u8(in), q = fz_u8(in);
        c->kv_len[b] = kv < 200 ? kv % 24 : 24 + (kv - 200);
        c->q_len[b] = q < 240 ? q % 4 : 4 + (q - 240) % 4;
    }
    c->q_values = fz_pick_values(in, d->q_dtype);
    c->kv_values = fz_pick_values(in, QATTN_DTYPE_F32);
    c->seed = fz_u64(in);
    fz_args_read(c->a, N_ARGS, in);
    for (int n = 0; n < 12 && fz_more(in); n++) {
        switch (fz_u8(in) % 14) {
        case 0: c->sel.budget_tokens = fz_hostile_i64(in); break;
        case 1: c->sel.budget_fraction = fz_hostile_float(in); break;
        case 2: c->sel.epsilon = fz_hostile_float(in); break;
        case 3: c->sel.max_budget_tokens = fz_hostile_i64(in); break;
        case 4:
            if (fz_u8(in) & 1)
                c->sel.sink_pages = fz_hostile_i64(in);
            else
                c->sel.recent_pages = fz_hostile_i64(in);
            break;
        case 5:
            if (c->n_edits < 4) {
                table_edit *e = &c->edits[c->n_edits++];
                e->table = fz_u8(in) % 6;
                e->index = fz_u8(in);
                const uint8_t how = fz_u8(in);
                e->value = how < 128 ? (int32_t)how - 8 : (int32_t)fz_hostile_i64(in);
            }
            break;
        case 6:
            c->k_injected = true;
            c->k_inject_at = fz_u32(in);
            c->k_inject = fz_hostile_float(in);
            break;
        case 7:
            c->q_injected = true;
            c->q_inject_at = fz_u32(in);
            c->q_inject = fz_hostile_float(in);
            break;
        case 8: {
            const uint8_t which = fz_u8(in) % 4;
            if (which == 0)
                c->no_select = true;
            else if (which == 1)
                c->null_args = true;
            else if (which == 2)
                c->read_hostile = true, c->read_how = fz_u8(in) % 4;
            else
                c->mass_null = true;
            break;
        }
        case 9: {
            int64_t *f[3] = {&c->pol.keep_pages, &c->pol.sink_pages, &c->pol.recent_pages};
            *f[fz_u8(in) % 3] = fz_hostile_i64(in);
            break;
        }
        case 10:
            if (fz_u8(in) & 1) {
                c->list_edit_index = fz_u8(in);
                const uint8_t how = fz_u8(in);
                c->list_edit_value = how < 200 ? (int32_t)how - 4 : (int32_t)fz_hostile_i64(in);
            } else {
                c->hostile_count = fz_hostile_i64(in);
            }
            break;
        default: fz_args_mutate(c->a, N_ARGS, in); break;
        }
    }
    for (int i = 0; i < N_ARGS; i++) /* the cache and the tables are read from byte 0 of their buffers */
        if (i <= A_META || (i >= A_QO && i <= A_LP)) {
            c->a[i].place = 0;
            c->a[i].hostile = false;
        }
}

static int32_t table_at(const uint8_t *t, int64_t i)
{
    int32_t v;
    memcpy(&v, t + i * 4, 4);
    return v;
}

/* The header's rules for a run's tables: true when valid. */
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

/* The tables as the run sees them (checked). */
typedef struct tables_view {
    const qattn_paged_desc *d;
    const uint8_t *qo, *bt, *sl, *ip, *ix, *lp;
} tables_view;

static int64_t tv_kv_len(const tables_view *t, int64_t b)
{
    if (t->d->table == QATTN_PAGES_DENSE)
        return table_at(t->sl, b);
    const int64_t pages = table_at(t->ip, b + 1) - table_at(t->ip, b);
    return pages ? (pages - 1) * t->d->cache.page_size + table_at(t->lp, b) : 0;
}

static int64_t tv_page(const tables_view *t, int64_t b, int64_t p)
{
    return t->d->table == QATTN_PAGES_DENSE ? table_at(t->bt, b * t->d->max_pages_per_seq + p)
                                            : table_at(t->ix, table_at(t->ip, b) + p);
}

/* Dequantized cache value of (slot, head h, channel e). */
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

/* The metadata's dequantized min (which 0) or max (1) of channel e of (page, head), per the header's layout. */
static double meta_value(const qattn_kv_cache_desc *c, const uint8_t *meta, size_t scale_offset, const uint8_t *ks,
                         int64_t page, int64_t h, int which, int64_t e)
{
    const size_t at = (size_t)(((page * c->heads_kv + h) * 2 + which) * c->head_dim + e);
    float scale;
    switch (c->dtype) {
    case QATTN_DTYPE_F16: return fz_load(meta, QATTN_DTYPE_F16, (int64_t)at);
    case QATTN_DTYPE_BF16: return fz_load(meta, QATTN_DTYPE_BF16, (int64_t)at);
    case QATTN_DTYPE_FP8_E4M3:
        memcpy(&scale, ks + h * 4, 4);
        return (double)(qattn_e4m3_to_f32(meta[at]) * scale);
    default:
        if (c->scales == QATTN_KV_SCALES_PER_ROW)
            memcpy(&scale, meta + scale_offset + (size_t)(page * c->heads_kv + h) * 4, 4);
        else
            memcpy(&scale, ks + h * 4, 4);
        return (double)((float)(int8_t)meta[at] * scale);
    }
}

/* The header's selection geometry for one sequence: n pages, forced [0, sinks) and [rb, n), budget, cap. */
static void geometry(const qattn_page_select_desc *s, int64_t P, int64_t kv_len, int64_t q_len, int64_t *n_out,
                     int64_t *sinks_out, int64_t *rb_out, int64_t *budget_out, int64_t *cap_out)
{
    const int64_t n = (kv_len + P - 1) / P;
    int64_t recent = s->recent_pages > 1 ? s->recent_pages : 1; /* at least the last page */
    if (q_len > 0) {                                            /* the pages holding the query tokens */
        const int64_t first = kv_len - q_len > 0 ? (kv_len - q_len) / P : 0;
        if (n - first > recent)
            recent = n - first;
    }
    const int64_t rb = recent >= n ? 0 : n - recent;
    const int64_t sinks = s->sink_pages < rb ? s->sink_pages : rb;
    const int64_t forced = sinks + (n - rb);
    const double want = ceil((double)s->budget_fraction * (double)n);
    int64_t k = s->budget_tokens > 0 ? s->budget_tokens / P + (s->budget_tokens % P != 0)
                : want >= (double)n ? n : want > 0.0 ? (int64_t)want : 0;
    k = k < forced ? forced : k > n ? n : k;
    int64_t cap = k;
    if (s->epsilon > 0.f) {
        cap = s->max_budget_tokens > 0 ? s->max_budget_tokens / P + (s->max_budget_tokens % P != 0) : n;
        cap = cap < k ? k : cap > n ? n : cap;
    }
    *n_out = n, *sinks_out = sinks, *rb_out = rb, *budget_out = k, *cap_out = cap;
}

/* Resyncs the staging copies of library-owned buffers with what a call left there (the next call's inputs). */
FZ_QUIET static void resync(fz_mem *m)
{
    for (int i = 0; i < m->n_units; i++)
        if (m->units[i].owned_buf >= 0)
            memcpy(m->units[i].host, m->units[i].after, m->units[i].size);
}

/* A copy of the arguments with only `use` passed: the view of one call. */
static void view(const fz_arg *a, fz_arg *out, const bool *use, const bool *output)
{
    memcpy(out, a, sizeof(fz_arg) * N_ARGS);
    for (int i = 0; i < N_ARGS; i++) {
        out[i].pass = a[i].pass && use[i];
        out[i].required = out[i].pass && !(i == A_META && a[i].null); /* k_meta is optional */
        out[i].output = output[i];
    }
}

/* fp64 attention of row (q, causal end) over keys k/v[0..end); checks o and lse as fuzz_paged does. */
FZ_QUIET static void check_row(const double *q, const double *k, const double *v, int64_t end, int64_t D, double scale,
                               int splits, const uint8_t *o, qattn_dtype odt, const float *lse, double *s, double *w,
                               const char *what)
{
    if (end <= 0) {
        for (int64_t e = 0; e < D; e++)
            FUZZ_CHECK(fz_load(o, odt, e) == 0.0, "%s: o != 0 for a row that sees no key", what);
        FUZZ_CHECK(!lse || (isinf(*lse) && *lse < 0), "%s: lse = %g for a row that sees no key", what,
                   lse ? (double)*lse : 0.0);
        return;
    }
    double worst = 0.0, magnitude = 0.0, qmax = 0.0;
    for (int64_t j = 0; j < end; j++) {
        double dot = 0.0, absdot = 0.0;
        for (int64_t e = 0; e < D; e++) {
            dot += q[e] * k[j * D + e];
            absdot += fabs(q[e] * k[j * D + e]);
        }
        s[j] = scale * dot;
        worst = fmax(worst, fabs(scale) * (double)(D + 16) * 0x1p-24 * absdot);
        magnitude = fmax(magnitude, fabs(scale) * absdot);
    }
    for (int64_t e = 0; e < D; e++)
        qmax = fmax(qmax, fabs(q[e]));
    if (magnitude > 1e30 || worst > 10.0 || qmax * fabs(scale) > 1e37)
        return;
    const double ref_lse = fz_softmax(s, end, w);
    double e_row = worst + 0x1p-18 + magnitude * 0x1p-22;
    if (splits > 1)
        e_row += (fabs(ref_lse) + magnitude + 1.0) * 0x1p-21;
    const double spread = expm1(2.0 * e_row);
    for (int64_t e = 0; e < D; e++) {
        double ref = 0.0, amax = 0.0;
        for (int64_t j = 0; j < end; j++) {
            ref += w[j] * v[j * D + e];
            amax = fmax(amax, fabs(v[j * D + e]));
        }
        const double bound = spread * amax + (double)(2 * end + 64 + 8 * splits) * 0x1p-24 * amax;
        const double tol = 2.0 * bound + 2.0 * fz_dtype_eps(odt) * fabs(ref) + fz_dtype_tiny(odt);
        if (fabs(ref) + tol >= fz_dtype_max(odt))
            continue;
        const double got = fz_load(o, odt, e);
        FUZZ_CHECK(fabs(got - ref) <= tol, "%s: o[%lld] = %.9g, fp64 reference over the selected pages %.9g, bound %.3g "
                   "(keys %lld)", what, (long long)e, got, ref, tol, (long long)end);
    }
    if (lse)
        FUZZ_CHECK(fabs((double)*lse - ref_lse) <= 2.0 * (e_row + 0x1p-20 * (fabs(ref_lse) + 1.0)),
                   "%s: lse = %.9g, fp64 reference %.9g", what, (double)*lse, ref_lse);
}

/* Valid codes for new tokens: values drawn per channel. */
FZ_QUIET static void fill_tokens(float *x, int64_t n, int64_t D, const fz_values *v, ref_rng *rng)
{
    for (int64_t i = 0; i < n; i++)
        for (int64_t e = 0; e < D; e++)
            x[i * D + e] = (float)fz_draw(v, rng, e);
}

typedef struct world {
    prune_case *c;
    fz_mem mem;
    int64_t P, H, D, G, B, M, num_pages;
    int32_t seq_pages[MAX_B][MAX_LEN];
    int64_t pages_of[MAX_B];
    qattn_kv_meta_sizes ms;
    qattn_kv_cache_sizes sizes;
    bool meta_kept;                  /* an append kept metadata */
    bool k_finite;                   /* no NaN/Inf went into the cache */
} world;

/* One append of T tokens (rows x [T][H][D] f32) to slots; returns whether it succeeded. */
FZ_QUIET static bool do_append(world *w, const float *kx, const float *vx, const int64_t *slots, int64_t T,
                               bool inject, bool *touched_pages)
{
    prune_case *c = w->c;
    fz_arg *a = c->a;
    fz_mem *m = &w->mem;
    qattn_ctx *ctx = fuzz_ctx();
    const qattn_kv_cache_desc *cd = &c->desc.cache;
    const int64_t H = w->H, D = w->D, P = w->P;
    const bool scaled = cd->scales != QATTN_KV_SCALES_NONE;
    uint8_t *kn = fz_arg_host(m, &a[A_KN]), *vn = fz_arg_host(m, &a[A_VN]), *sl = fz_arg_host(m, &a[A_SLOTS]);
    if (kn)
        memcpy(kn, kx, (size_t)(T * H * D) * 4);
    if (vn)
        memcpy(vn, vx, (size_t)(T * H * D) * 4);
    if (sl)
        memcpy(sl, slots, (size_t)T * 8);
    bool finite = true;
    if (inject && kn) {
        const int64_t at = (int64_t)(c->k_inject_at % (uint64_t)(T * H * D));
        memcpy(kn + at * 4, &c->k_inject, 4);
        finite = isfinite(c->k_inject);
    }
    fz_commit(m);
    bool use[N_ARGS] = {0}, out[N_ARGS] = {0};
    use[A_KC] = use[A_VC] = use[A_META] = use[A_KN] = use[A_VN] = use[A_SLOTS] = true;
    use[A_KS] = use[A_VS] = scaled;
    out[A_KC] = out[A_VC] = out[A_KS] = out[A_VS] = out[A_META] = true;
    fz_arg v[N_ARGS];
    view(a, v, use, out);
    qattn_kv_cache_buffers bufs = {.k = fz_arg_buffer(m, &a[A_KC]), .v = fz_arg_buffer(m, &a[A_VC]),
                                   .k_scale = scaled ? fz_arg_buffer(m, &a[A_KS]) : NULL,
                                   .v_scale = scaled ? fz_arg_buffer(m, &a[A_VS]) : NULL,
                                   .k_meta = fz_arg_buffer(m, &a[A_META])};
    qattn_kv_append_args ar = {.cache = cd, .buffers = &bufs, .num_tokens = T, .new_dtype = QATTN_DTYPE_F32,
                               .new_stride = {H * D, D}, .k_new = fz_arg_buffer(m, &a[A_KN]),
                               .v_new = fz_arg_buffer(m, &a[A_VN]), .slot_mapping = fz_arg_buffer(m, &a[A_SLOTS]),
                               .k_new_offset = a[A_KN].offset, .v_new_offset = a[A_VN].offset,
                               .slot_mapping_offset = a[A_SLOTS].offset, .flags = c->desc.flags};
    fz_verdict verdict = fz_args_verdict(m, v, N_ARGS);
    if (bufs.k_meta && (bufs.k_meta == bufs.k || bufs.k_meta == bufs.v))
        verdict = FZ_INVALID;
    const bool checked = !(c->desc.flags & QATTN_FLAG_NO_FINITE_CHECK);
    if (verdict != FZ_INVALID && !finite && checked)
        verdict = FZ_INVALID;
    const qattn_status s = qattn_kv_append(ctx, &ar);
    if (s) {
        FUZZ_CHECK(verdict != FZ_VALID, "qattn_kv_append refused a valid append: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        fuzz_check_message(ctx, s, "qattn_kv_append");
        if (fz_args_verdict(m, v, N_ARGS) == FZ_VALID && !(bufs.k_meta && (bufs.k_meta == bufs.k || bufs.k_meta == bufs.v)))
            FUZZ_CHECK(s == QATTN_ERR_NONFINITE_INPUT, "qattn_kv_append: NaN/Inf in new K must be "
                       "QATTN_ERR_NONFINITE_INPUT, got %s", qattn_status_str(s));
        else
            FUZZ_CHECK(s == QATTN_ERR_INVALID_ARGUMENT, "qattn_kv_append: bad buffers must be "
                       "QATTN_ERR_INVALID_ARGUMENT, got %s: %s", qattn_status_str(s), qattn_last_error(ctx));
        fz_check_unchanged(m, "failed qattn_kv_append");
        return false;
    }
    if (verdict == FZ_INVALID && getenv("FZ_DEBUG"))
        for (int i = 0; i < N_ARGS; i++)
            if (v[i].pass)
                fprintf(stderr, "arg %d buf %d off %zu bytes %zu size %zu align %zu out %d foreign %d\n", i, v[i].buf,
                        v[i].offset, v[i].bytes, v[i].buf >= 0 ? m->bufs[v[i].buf].size : 0, v[i].align, v[i].output,
                        v[i].foreign);
    FUZZ_CHECK(verdict != FZ_INVALID, "qattn_kv_append accepted an invalid append");
    w->k_finite &= finite;
    const size_t ces = qattn_dtype_size(cd->dtype), me = cd->dtype == QATTN_DTYPE_F16 || cd->dtype == QATTN_DTYPE_BF16 ? 2 : 1;
    for (int64_t t = 0; t < T; t++) {
        const int64_t page = slots[t] / P;
        touched_pages[page] = true;
        for (int64_t h = 0; h < H; h++) {
            fz_allow(m, a[A_KC].buf, (size_t)fz_cache_row(cd, slots[t], h) * ces, (size_t)D * ces);
            fz_allow(m, a[A_VC].buf, (size_t)fz_cache_row(cd, slots[t], h) * ces, (size_t)D * ces);
            if (cd->scales == QATTN_KV_SCALES_PER_ROW) {
                fz_allow(m, a[A_KS].buf, (size_t)(slots[t] * H + h) * 4, 4);
                fz_allow(m, a[A_VS].buf, (size_t)(slots[t] * H + h) * 4, 4);
            }
            if (bufs.k_meta) { /* the page's metadata: its two rows and, INT8 per row, its scale */
                fz_allow(m, a[A_META].buf, (size_t)((page * H + h) * 2 * D) * me, (size_t)(2 * D) * me);
                if (cd->scales == QATTN_KV_SCALES_PER_ROW)
                    fz_allow(m, a[A_META].buf, w->ms.scale_offset + (size_t)(page * H + h) * 4, 4);
            }
        }
    }
    fz_check_unchanged(m, "qattn_kv_append");
    resync(m);
    w->meta_kept = bufs.k_meta != NULL;
    return true;
}

/* The metadata of every page an append wrote equals the min/max of its slots read back. */
FZ_QUIET static void check_meta(world *w, const bool *touched, const bool *full)
{
    const prune_case *c = w->c;
    const qattn_kv_cache_desc *cd = &c->desc.cache;
    const fz_arg *a = c->a;
    const uint8_t *kc = fz_after(&w->mem, a[A_KC].buf, 0), *meta = fz_after(&w->mem, a[A_META].buf, 0);
    const uint8_t *ks = cd->scales != QATTN_KV_SCALES_NONE ? fz_after(&w->mem, a[A_KS].buf, 0) : NULL;
    const bool row = cd->scales == QATTN_KV_SCALES_PER_ROW;
    for (int64_t page = 0; page < w->num_pages; page++) {
        if (!touched[page] || (row && !full[page]))
            continue; /* per-row pages: stale slots may hold codes (-128) an append never writes */
        for (int64_t h = 0; h < w->H; h++) {
            double smax = 0.0;
            for (int64_t t = 0; row && t < w->P; t++) {
                float sc;
                memcpy(&sc, ks + ((page * w->P + t) * w->H + h) * 4, 4);
                smax = fmax(smax, sc);
            }
            for (int64_t e = 0; e < w->D; e++) {
                double lo = INFINITY, hi = -INFINITY;
                for (int64_t t = 0; t < w->P; t++) {
                    const double x = cache_value(cd, kc, ks, page * w->P + t, h, e);
                    if (x < lo)
                        lo = x;
                    if (x > hi)
                        hi = x;
                }
                const double mlo = meta_value(cd, meta, w->ms.scale_offset, ks, page, h, 0, e);
                const double mhi = meta_value(cd, meta, w->ms.scale_offset, ks, page, h, 1, e);
                if (row && !isfinite(smax)) {
                    continue; /* an unchecked Inf row: its scale is Inf, the bound unspecified */
                } else if (row) {
                    FUZZ_CHECK(mlo <= lo + 1e-6 * fabs(lo) + 1e-30 && mhi >= hi - 1e-6 * fabs(hi) - 1e-30 &&
                                   lo - mlo <= smax * 1.0001 && mhi - hi <= smax * 1.0001,
                               "meta: page %lld head %lld ch %lld: [%g, %g] is no bound within one code of the keys' "
                               "[%g, %g] (row scale %g)", (long long)page, (long long)h, (long long)e, mlo, mhi, lo, hi, smax);
                } else if (lo == INFINITY || hi == -INFINITY) {
                    continue; /* only NaN and Inf of one sign (unchecked appends, stale slots): no order to keep */
                } else {
                    FUZZ_CHECK(mlo == lo && mhi == hi, "meta: page %lld head %lld ch %lld: [%g, %g] but the page's "
                               "keys span [%g, %g]", (long long)page, (long long)h, (long long)e, mlo, mhi, lo, hi);
                }
            }
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size, 0};
    qattn_ctx *ctx = fuzz_ctx();
    static prune_case c;
    read_case(&in, &c);
    static world w;
    memset(&w, 0, sizeof(w));
    w.c = &c;
    w.k_finite = true;
    qattn_paged_desc *d = &c.desc;
    qattn_kv_cache_desc *cd = &d->cache;
    ref_rng rng;
    ref_rng_seed(&rng, c.seed);
    const int64_t P = w.P = cd->page_size, H = w.H = cd->heads_kv, D = w.D = cd->head_dim;
    const int64_t B = w.B = d->batch, Hq = d->heads_q, G = w.G = Hq / H;
    const bool scaled = cd->scales != QATTN_KV_SCALES_NONE, dense = d->table == QATTN_PAGES_DENSE;

    /* Sequences, their pages from the pool (random order), the extra pages left free. */
    int64_t total_pages = 0, max_pages = 1, max_q = 1;
    int32_t qo[MAX_B + 1] = {0};
    for (int64_t b = 0; b < B; b++) {
        w.pages_of[b] = (c.kv_len[b] + P - 1) / P;
        total_pages += w.pages_of[b];
        max_pages = w.pages_of[b] > max_pages ? w.pages_of[b] : max_pages;
        max_q = c.q_len[b] > max_q ? c.q_len[b] : max_q;
        qo[b + 1] = qo[b] + (int32_t)c.q_len[b];
    }
    const int64_t num_pages = w.num_pages = total_pages + c.extra_pages + 1;
    cd->num_pages = num_pages;
    d->max_pages_per_seq = w.M = max_pages;
    d->total_q = qo[B] > 0 ? qo[B] : 1;
    d->max_q_len = max_q < d->total_q ? max_q : d->total_q;
    d->q_stride[1] = d->o_stride[1] = D;
    d->q_stride[0] = d->o_stride[0] = Hq * D;
    qattn_page_pool *pool = NULL;
    FUZZ_CHECK(qattn_page_pool_create(num_pages, &pool) == QATTN_OK, "qattn_page_pool_create");
    int32_t all[MAX_PAGES_ALL];
    FUZZ_CHECK(qattn_page_pool_alloc(pool, num_pages, all) == QATTN_OK, "qattn_page_pool_alloc");
    for (int64_t i = num_pages - 1; i > 0; i--) {
        const int64_t j = (int64_t)(ref_rng_uniform(&rng) * (double)(i + 1));
        const int32_t t = all[i];
        all[i] = all[j], all[j] = t;
    }
    for (int64_t b = 0, at = 0; b < B; at += w.pages_of[b], b++)
        memcpy(w.seq_pages[b], all + at, (size_t)w.pages_of[b] * 4);
    FUZZ_CHECK(qattn_page_pool_free(pool, num_pages - total_pages, all + total_pages) == QATTN_OK, "qattn_page_pool_free");

    /* qattn_kv_meta_bytes: the header's layout. */
    qattn_kv_meta_sizes ms;
    memset(&ms, 0x5a, sizeof(ms));
    FUZZ_CHECK(qattn_kv_meta_bytes(ctx, cd, NULL) == QATTN_ERR_INVALID_ARGUMENT, "qattn_kv_meta_bytes(NULL sizes)");
    fuzz_check_message(ctx, QATTN_ERR_INVALID_ARGUMENT, "qattn_kv_meta_bytes");
    qattn_status s = qattn_kv_meta_bytes(ctx, cd, &ms);
    FUZZ_CHECK(s == QATTN_OK, "qattn_kv_meta_bytes: %s", qattn_last_error(ctx));
    FUZZ_CHECK(qattn_kv_cache_bytes(ctx, cd, &w.sizes) == QATTN_OK, "qattn_kv_cache_bytes");
    {
        const size_t me = cd->dtype == QATTN_DTYPE_F16 || cd->dtype == QATTN_DTYPE_BF16 ? 2 : 1;
        const size_t codes = (size_t)(num_pages * H * 2 * D) * me;
        if (cd->scales == QATTN_KV_SCALES_PER_ROW)
            FUZZ_CHECK(ms.scale_offset >= codes && ms.scale_offset % 4 == 0 &&
                           ms.meta_bytes == ms.scale_offset + (size_t)(num_pages * H) * 4,
                       "qattn_kv_meta_bytes: %zu bytes, scales at %zu, for %zu bytes of codes", ms.meta_bytes,
                       ms.scale_offset, codes);
        else
            FUZZ_CHECK(ms.scale_offset == 0 && ms.meta_bytes == codes && ms.meta_bytes * (size_t)P == 2 * w.sizes.cache_bytes,
                       "qattn_kv_meta_bytes: %zu bytes for %zu bytes of codes (1/page_size of K+V: %zu)", ms.meta_bytes,
                       codes, 2 * w.sizes.cache_bytes / (size_t)P);
        qattn_kv_cache_desc bad = *cd;
        bad.page_size = 0;
        qattn_kv_meta_sizes poisoned;
        memset(&poisoned, 0x5a, sizeof(poisoned));
        qattn_kv_meta_sizes copy = poisoned;
        s = qattn_kv_meta_bytes(ctx, &bad, &poisoned);
        fuzz_check_message(ctx, s, "qattn_kv_meta_bytes(page_size 0)");
        FUZZ_CHECK(memcmp(&copy, &poisoned, sizeof(copy)) == 0, "a failed qattn_kv_meta_bytes wrote its sizes");
    }
    w.ms = ms;

    /* Buffers. */
    const size_t b4 = (size_t)B * 4;
    const int64_t T1 = total_pages ? c.kv_len[0] + (B > 1 ? c.kv_len[1] : 0) + (B > 2 ? c.kv_len[2] : 0) : 0;
    const size_t tok_bytes = (size_t)((T1 > 0 ? T1 : 1) * H * D) * 4;
    const size_t need[N_ARGS] = {w.sizes.cache_bytes, w.sizes.cache_bytes, scaled ? w.sizes.scale_bytes : 64,
                                 scaled ? w.sizes.scale_bytes : 64, ms.meta_bytes, tok_bytes, tok_bytes,
                                 (size_t)(T1 > 0 ? T1 : 1) * 8, 0, 0, (size_t)d->total_q * (size_t)Hq * 4, 0, b4 + 4,
                                 (size_t)max_pages * b4, b4, b4 + 4, (size_t)(total_pages + 1) * 4, b4,
                                 (size_t)(B * H * max_pages) * 4};
    const size_t qes = qattn_dtype_size(d->q_dtype), ces = qattn_dtype_size(cd->dtype);
    const size_t align[N_ARGS] = {ces, ces, 4, 4, 4, 4, 4, 8, qes, qes, 4, 256, 4, 4, 4, 4, 4, 4, 4};

    /* The plan first: its workspace size sizes a buffer. */
    const bool sel_given = !c.no_select;
    const qattn_page_select_desc *sel = &c.sel;
    fz_verdict pv = FZ_VALID;
    if (sel_given) {
        if (sel->budget_tokens < 0 || (sel->budget_tokens == 0 && !(sel->budget_fraction > 0.f && sel->budget_fraction <= 1.f)) ||
            (sel->budget_tokens > 0 && sel->budget_fraction != 0.f) || sel->sink_pages < 0 || sel->recent_pages < 0 ||
            sel->max_budget_tokens < 0 || !(sel->epsilon >= 0.f) || sel->epsilon >= 1.f ||
            (sel->max_budget_tokens > 0 && sel->epsilon == 0.f))
            pv = FZ_INVALID;
    }
    /* The adaptive budget is refused (QATTN_ERR_UNSUPPORTED) for a causal chunk of a valid plan. */
    const bool adaptive_chunk = sel_given && pv == FZ_VALID && sel->epsilon > 0.f && d->causal && d->max_q_len > 1;
    qattn_plan *plan = (qattn_plan *)(uintptr_t)1;
    s = sel_given ? qattn_paged_select_plan_create(ctx, d, sel, &plan) : qattn_paged_select_plan_create(ctx, d, NULL, &plan);
    if (s == QATTN_ERR_UNSUPPORTED && adaptive_chunk) {
        FUZZ_CHECK(plan == NULL, "a failed qattn_paged_select_plan_create left *out set");
        fuzz_check_message(ctx, s, "qattn_paged_select_plan_create");
        qattn_page_pool_destroy(pool);
        return 0;
    }
    FUZZ_CHECK(!(s == QATTN_OK && adaptive_chunk), "an adaptive selection plan was made for a causal chunk");
    if (s) {
        FUZZ_CHECK(pv != FZ_VALID, "qattn_paged_select_plan_create refused a valid request: %s: %s",
                   qattn_status_str(s), qattn_last_error(ctx));
        FUZZ_CHECK(plan == NULL, "a failed qattn_paged_select_plan_create left *out set");
        fuzz_check_message(ctx, s, "qattn_paged_select_plan_create");
        FUZZ_CHECK(s == QATTN_ERR_INVALID_ARGUMENT, "a bad selection must be QATTN_ERR_INVALID_ARGUMENT, got %s",
                   qattn_status_str(s));
        qattn_page_pool_destroy(pool);
        return 0;
    }
    FUZZ_CHECK(pv != FZ_INVALID, "qattn_paged_select_plan_create accepted a bad selection (budget_tokens %lld, "
               "fraction %g, sinks %lld, recent %lld, epsilon %g, max_budget %lld)", (long long)sel->budget_tokens,
               (double)sel->budget_fraction, (long long)sel->sink_pages, (long long)sel->recent_pages,
               (double)sel->epsilon, (long long)sel->max_budget_tokens);
    char text[512];
    FUZZ_CHECK(qattn_plan_describe(plan, text, sizeof(text)) > 0 && memchr(text, 0, sizeof(text)), "describe");
    qattn_plan_info info;
    FUZZ_CHECK(qattn_plan_get_info(plan, &info) == QATTN_OK, "qattn_plan_get_info");
    const size_t ws_size = qattn_plan_workspace_size(plan);
    FUZZ_CHECK(!sel_given || ws_size > 0, "a selection plan needs a workspace for its lists");
    const int splits = info.kv_tile > 0 ? (int)((max_pages * P + info.kv_tile - 1) / info.kv_tile) : 1;
    fz_arg *a = c.a;
    size_t qb_bytes = (size_t)(d->total_q * Hq * D) * qes;
    for (int i = 0; i < N_ARGS; i++) {
        a[i].bytes = i == A_Q || i == A_O ? qb_bytes : i == A_WS ? ws_size : need[i];
        a[i].align = align[i];
        a[i].pass = !(i == A_KS || i == A_VS) || scaled;
        if (i == A_WS)
            a[i].pass = ws_size > 0;
        if ((i == A_BT || i == A_SL) && !dense)
            a[i].pass = false;
        if ((i == A_IP || i == A_IX || i == A_LP) && dense)
            a[i].pass = false;
        if (i == A_LSE)
            a[i].pass = d->return_lse;
    }
    fz_mem *m = &w.mem;
    fz_args_build(m, a, N_ARGS, SIZE_MAX);
    fz_garbage(m, &rng);
    if (scaled) { /* per-head scales from the magnitude of the values; per-row stale scales sane unless asked */
        uint8_t *ks = fz_arg_host(m, &a[A_KS]), *vs = fz_arg_host(m, &a[A_VS]);
        for (int64_t i = 0; i < (int64_t)(w.sizes.scale_bytes / 4); i++) {
            float sc = cd->scales == QATTN_KV_SCALES_PER_HEAD
                           ? (float)ldexp(1.0, c.kv_values.log2_mag + 4) / (cd->dtype == QATTN_DTYPE_I8 ? 127.f : 448.f)
                           : (float)ldexp(1.0 + ref_rng_uniform(&rng), c.kv_values.log2_mag - 7);
            if (cd->scales == QATTN_KV_SCALES_PER_ROW && c.stale_scale_garbage)
                continue;
            if (ks && (size_t)(i + 1) * 4 <= a[A_KS].bytes)
                memcpy(ks + i * 4, &sc, 4);
            if (vs && (size_t)(i + 1) * 4 <= a[A_VS].bytes)
                memcpy(vs + i * 4, &sc, 4);
        }
    }

    /* Appends: every sequence's tokens, then (sometimes) a rewrite of some slots. */
    bool touched[MAX_PAGES_ALL] = {false}, full[MAX_PAGES_ALL] = {false};
    bool appended = true;
    int64_t *slots = malloc((size_t)(T1 > 0 ? T1 : 1) * 8);
    float *kx = malloc(tok_bytes), *vx = malloc(tok_bytes);
    FUZZ_CHECK(slots && kx && vx, "harness: out of memory");
    if (T1 > 0) {
        int64_t t = 0;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < c.kv_len[b]; j++)
                slots[t++] = (int64_t)w.seq_pages[b][j / P] * P + j % P;
        fill_tokens(kx, T1 * H, D, &c.kv_values, &rng);
        fill_tokens(vx, T1 * H, D, &c.kv_values, &rng);
        appended = do_append(&w, kx, vx, slots, T1, c.k_injected, touched);
        if (appended && c.rewrite) {
            const int64_t T2 = 1 + (int64_t)(ref_rng_uniform(&rng) * (double)(T1 < 6 ? T1 : 6));
            for (int64_t i = 0; i < T2; i++) { /* distinct slots from the appended ones: a partial shuffle */
                const int64_t j = i + (int64_t)(ref_rng_uniform(&rng) * (double)(T1 - i));
                const int64_t tmp = slots[i];
                slots[i] = slots[j], slots[j] = tmp;
            }
            fill_tokens(kx, T2 * H, D, &c.kv_values, &rng);
            fill_tokens(vx, T2 * H, D, &c.kv_values, &rng);
            appended = do_append(&w, kx, vx, slots, T2, false, touched);
        }
    }
    free(slots), free(kx), free(vx);
    if (!appended) {
        qattn_plan_destroy(plan);
        fz_release(m);
        qattn_page_pool_destroy(pool);
        return 0;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t p = 0; p < w.pages_of[b]; p++)
            full[w.seq_pages[b][p]] = (p + 1) * P <= c.kv_len[b];
    if (w.meta_kept)
        check_meta(&w, touched, full);

    /* Queries, outputs, tables. */
    uint8_t *q = fz_arg_host(m, &a[A_Q]);
    if (q) {
        for (int64_t i = 0; i < d->total_q * Hq * D; i++)
            fz_store(q, d->q_dtype, i, fz_draw(&c.q_values, &rng, i % D));
        if (c.q_injected)
            fz_store(q, d->q_dtype, (int64_t)(c.q_inject_at % (uint64_t)(d->total_q * Hq * D)), c.q_inject);
    }
    uint8_t *o = fz_arg_host(m, &a[A_O]), *lse_h = fz_arg_host(m, &a[A_LSE]), *mass_h = fz_arg_host(m, &a[A_MASS]);
    if (o)
        memset(o, 0xff, qb_bytes);
    if (lse_h && d->return_lse)
        memset(lse_h, 0xff, need[A_LSE]);
    if (mass_h)
        memset(mass_h, 0xff, need[A_MASS]);
    {
        const int32_t *lists[MAX_B];
        for (int64_t b = 0; b < B; b++)
            lists[b] = w.seq_pages[b];
        int32_t bt[MAX_B * MAX_LEN], ip[MAX_B + 1], ix[MAX_PAGES_ALL], sl[MAX_B], lp[MAX_B];
        FUZZ_CHECK(qattn_page_tables_build(B, lists, w.pages_of, max_pages, bt, ip, ix) == QATTN_OK,
                   "qattn_page_tables_build");
        for (int64_t b = 0; b < B; b++) {
            sl[b] = (int32_t)c.kv_len[b];
            lp[b] = w.pages_of[b] ? (int32_t)(c.kv_len[b] - (w.pages_of[b] - 1) * P) : 1;
        }
        uint8_t *tab[6] = {fz_arg_host(m, &a[A_QO]), fz_arg_host(m, &a[A_BT]), fz_arg_host(m, &a[A_SL]),
                           fz_arg_host(m, &a[A_IP]), fz_arg_host(m, &a[A_IX]), fz_arg_host(m, &a[A_LP])};
        const void *src[6] = {qo, bt, sl, ip, ix, lp};
        const size_t bytes[6] = {need[A_QO], need[A_BT], need[A_SL], need[A_IP], need[A_IX], need[A_LP]};
        for (int i = 0; i < 6; i++)
            if (tab[i])
                memcpy(tab[i], src[i], bytes[i]);
        for (int i = 0; i < c.n_edits; i++) {
            const table_edit *e = &c.edits[i];
            const size_t at = (size_t)e->index * 4 % bytes[e->table];
            if (tab[e->table] && at + 4 <= bytes[e->table])
                memcpy(tab[e->table] + at, &e->value, 4);
        }
    }
    fz_commit(m);

    /* The run. */
    qattn_kv_cache_buffers cache = {.k = fz_arg_buffer(m, &a[A_KC]), .v = fz_arg_buffer(m, &a[A_VC]),
                                    .k_scale = scaled ? fz_arg_buffer(m, &a[A_KS]) : NULL,
                                    .v_scale = scaled ? fz_arg_buffer(m, &a[A_VS]) : NULL,
                                    .k_meta = fz_arg_buffer(m, &a[A_META])};
    qattn_paged_args args = {
        .cache = &cache, .q = fz_arg_buffer(m, &a[A_Q]), .o = fz_arg_buffer(m, &a[A_O]),
        .lse = d->return_lse ? fz_arg_buffer(m, &a[A_LSE]) : NULL, .qo_indptr = fz_arg_buffer(m, &a[A_QO]),
        .block_table = dense ? fz_arg_buffer(m, &a[A_BT]) : NULL, .seq_lens = dense ? fz_arg_buffer(m, &a[A_SL]) : NULL,
        .indptr = dense ? NULL : fz_arg_buffer(m, &a[A_IP]), .indices = dense ? NULL : fz_arg_buffer(m, &a[A_IX]),
        .last_page_len = dense ? NULL : fz_arg_buffer(m, &a[A_LP]), .workspace = fz_arg_buffer(m, &a[A_WS]),
        .q_offset = a[A_Q].offset, .o_offset = a[A_O].offset, .lse_offset = a[A_LSE].offset,
        .workspace_offset = a[A_WS].offset};
    bool use[N_ARGS] = {0}, outp[N_ARGS] = {0};
    for (int i = 0; i < N_ARGS; i++)
        use[i] = i != A_KN && i != A_VN && i != A_SLOTS && i != A_MASS;
    use[A_META] = sel_given;
    outp[A_O] = outp[A_LSE] = outp[A_WS] = true;
    fz_arg v[N_ARGS];
    if (!dense && a[A_IX].buf >= 0)
        a[A_IX].bytes = m->bufs[a[A_IX].buf].size; /* the whole indices buffer is an input */
    view(a, v, use, outp);
    fz_verdict rv = c.null_args ? FZ_INVALID : fz_args_verdict(m, v, N_ARGS);
    if (!dense && a[A_IX].buf >= 0 && m->bufs[a[A_IX].buf].size < 4)
        rv = FZ_INVALID; /* indices must hold one entry */
    if (!dense)
        a[A_IX].bytes = need[A_IX];
    if (sel_given && !cache.k_meta)
        rv = FZ_INVALID;
    if ((cache.k_meta && (cache.k_meta == cache.k || cache.k_meta == cache.v)) || (cache.k && cache.k == cache.v))
        rv = FZ_INVALID; /* one buffer object for two of the cache's parts (no append ran to refuse it first) */
    if (!sel_given && cache.k_meta && rv != FZ_INVALID) { /* k_meta given to a plain plan: sized, else unused */
        const fz_arg *x = &a[A_META];
        if (x->foreign || x->bytes > m->bufs[x->buf].size || !fz_address_aligned(m, x->buf, 0, 4))
            rv = FZ_INVALID;
    }
    const bool checked = !(d->flags & QATTN_FLAG_NO_FINITE_CHECK);
    tables_view tv = {.d = d};
    bool tables_ok = false, q_finite = true;
    if (rv != FZ_INVALID) {
        tv.qo = fz_before(m, a[A_QO].buf, 0);
        tv.bt = dense ? fz_before(m, a[A_BT].buf, 0) : NULL;
        tv.sl = dense ? fz_before(m, a[A_SL].buf, 0) : NULL;
        tv.ip = dense ? NULL : fz_before(m, a[A_IP].buf, 0);
        tv.ix = dense ? NULL : fz_before(m, a[A_IX].buf, 0);
        tv.lp = dense ? NULL : fz_before(m, a[A_LP].buf, 0);
        tables_ok = tables_valid(d, tv.qo, tv.bt, tv.sl, tv.ip, tv.ix, dense ? 0 : (int64_t)(m->bufs[a[A_IX].buf].size / 4), tv.lp);
        if (!tables_ok)
            rv = FZ_INVALID; /* the CPU checks host tables even unchecked */
        else {
            const uint8_t *qb = fz_before(m, a[A_Q].buf, a[A_Q].offset);
            for (int64_t r = table_at(tv.qo, 0); r < table_at(tv.qo, B); r++)
                for (int64_t i = 0; i < Hq * D; i++)
                    q_finite &= isfinite(fz_load(qb, d->q_dtype, r * Hq * D + i)) != 0;
            if (!q_finite && checked)
                rv = FZ_INVALID;
            if (c.q_injected && q_finite && checked)
                rv = fz_worst(rv, FZ_EITHER); /* NaN in a row no sequence owns */
        }
    }
    s = qattn_paged_run(plan, c.null_args ? NULL : &args);
    if (args.workspace)
        fz_allow(m, a[A_WS].buf, a[A_WS].offset, ws_size);
    if (s) {
        FUZZ_CHECK(rv != FZ_VALID, "qattn_paged_run (selection) refused a valid request: %s: %s", qattn_status_str(s),
                   qattn_last_error(ctx));
        fuzz_check_message(ctx, s, "qattn_paged_run");
        FUZZ_CHECK(s == QATTN_ERR_INVALID_ARGUMENT || s == QATTN_ERR_NONFINITE_INPUT,
                   "qattn_paged_run: unexpected %s: %s", qattn_status_str(s), qattn_last_error(ctx));
        fz_check_unchanged(m, "failed qattn_paged_run");
        qattn_plan_destroy(plan);
        fz_release(m);
        qattn_page_pool_destroy(pool);
        return 0;
    }
    FUZZ_CHECK(rv != FZ_INVALID, "qattn_paged_run (selection) accepted an invalid request (k_meta %s)",
               cache.k_meta ? "given" : "NULL");
    for (int64_t b = 0; b < B; b++)
        for (int64_t r = table_at(tv.qo, b); r < table_at(tv.qo, b + 1); r++)
            for (int64_t h = 0; h < Hq; h++) {
                fz_allow(m, a[A_O].buf, a[A_O].offset + (size_t)((r * Hq + h) * D) * qes, (size_t)D * qes);
                if (d->return_lse)
                    fz_allow(m, a[A_LSE].buf, a[A_LSE].offset + (size_t)(r * Hq + h) * 4, 4);
            }
    fz_check_unchanged(m, "qattn_paged_run (selection)");

    /* The selection lists. */
    const int64_t M = max_pages, rows = B * H;
    int32_t counts[MAX_B * 2 + 4], lists[MAX_B * 2 * MAX_LEN + 4];
    for (size_t i = 0; i < sizeof(counts) / 4; i++)
        counts[i] = POISON32;
    for (size_t i = 0; i < sizeof(lists) / 4; i++)
        lists[i] = POISON32;
    if (c.read_hostile || !sel_given) {
        const qattn_buffer *wsb = c.read_how == 0 ? NULL : args.workspace;
        size_t off = c.read_how == 1 ? a[A_WS].offset + 256 * ((ws_size + 256) / 256) : a[A_WS].offset;
        const qattn_plan *p = c.read_how == 2 ? NULL : plan;
        if (c.read_how == 3)
            off = SIZE_MAX - 255;
        s = qattn_paged_selection_read(p, wsb, off, counts, lists);
        const bool valid = sel_given && p && wsb && off <= m->bufs[a[A_WS].buf].size &&
                           ws_size <= m->bufs[a[A_WS].buf].size - off;
        if (valid) {
            FUZZ_CHECK(s == QATTN_OK, "qattn_paged_selection_read: %s", qattn_last_error(ctx));
        } else {
            FUZZ_CHECK(s == QATTN_ERR_INVALID_ARGUMENT, "qattn_paged_selection_read accepted a bad call (%s)",
                       qattn_status_str(s));
            fuzz_check_message(p ? ctx : NULL, s, "qattn_paged_selection_read");
            for (size_t i = 0; i < sizeof(counts) / 4; i++)
                FUZZ_CHECK(counts[i] == POISON32, "a failed qattn_paged_selection_read wrote counts[%zu]", i);
            for (size_t i = 0; i < sizeof(lists) / 4; i++)
                FUZZ_CHECK(lists[i] == POISON32, "a failed qattn_paged_selection_read wrote pages[%zu]", i);
        }
    }
    const double sm = d->sm_scale != 0.f ? (double)d->sm_scale : (double)(float)(1.0 / sqrt((double)D));
    const qattn_kv_cache_desc *ccd = cd;
    const uint8_t *kc = fz_after(m, a[A_KC].buf, 0), *vc = fz_after(m, a[A_VC].buf, 0);
    const uint8_t *ksb = scaled ? fz_after(m, a[A_KS].buf, 0) : NULL, *vsb = scaled ? fz_after(m, a[A_VS].buf, 0) : NULL;
    const uint8_t *qb = fz_after(m, a[A_Q].buf, a[A_Q].offset), *ob = fz_after(m, a[A_O].buf, a[A_O].offset);
    float *lse = NULL;
    if (d->return_lse) {
        lse = malloc(need[A_LSE]);
        FUZZ_CHECK(lse, "harness: out of memory");
        memcpy(lse, fz_after(m, a[A_LSE].buf, a[A_LSE].offset), need[A_LSE]);
    }
    if (sel_given) {
        FUZZ_CHECK(qattn_paged_selection_read(plan, args.workspace, a[A_WS].offset, counts, lists) == QATTN_OK,
                   "qattn_paged_selection_read: %s", qattn_last_error(ctx));
        for (size_t i = (size_t)rows; i < sizeof(counts) / 4; i++)
            FUZZ_CHECK(counts[i] == POISON32, "qattn_paged_selection_read wrote counts[%zu] past B * Hkv", i);
        for (size_t i = (size_t)(rows * M); i < sizeof(lists) / 4; i++)
            FUZZ_CHECK(lists[i] == POISON32, "qattn_paged_selection_read wrote pages[%zu] past its rows", i);
    }
    const uint8_t *meta = cache.k_meta ? fz_after(m, a[A_META].buf, 0) : NULL;
    double *kk = malloc((size_t)(MAX_LEN * D) * 8), *vv = malloc((size_t)(MAX_LEN * D) * 8);
    double *sc = malloc(MAX_LEN * 8), *wt = malloc(MAX_LEN * 8), *qd = malloc((size_t)D * 8);
    double *score = malloc(MAX_LEN * 8), *mag = malloc(MAX_LEN * 8);
    FUZZ_CHECK(kk && vv && sc && wt && qd && score && mag, "harness: out of memory");
    for (int64_t b = 0; b < B; b++) {
        const int64_t q0 = table_at(tv.qo, b), q_len = table_at(tv.qo, b + 1) - q0, kv_len = tv_kv_len(&tv, b);
        int64_t n, sinks, rb, budget, cap;
        geometry(sel, P, kv_len, q_len, &n, &sinks, &rb, &budget, &cap);
        for (int64_t hk = 0; hk < H; hk++) {
            const int64_t r = b * H + hk;
            int32_t all_pages[MAX_LEN];
            const int32_t *list = all_pages;
            int64_t count = n;
            for (int64_t p = 0; p < n; p++)
                all_pages[p] = (int32_t)p;
            if (sel_given) {
                count = counts[r];
                list = lists + r * M;
                FUZZ_CHECK(count >= 0 && count <= n, "selection row %lld: %lld pages of %lld", (long long)r,
                           (long long)count, (long long)n);
                for (int64_t i = 0; i < count; i++)
                    FUZZ_CHECK(list[i] >= 0 && list[i] < n && (i == 0 || list[i] > list[i - 1]),
                               "selection row %lld: page %d at %lld is out of order or past the sequence's %lld",
                               (long long)r, list[i], (long long)i, (long long)n);
                bool chosen[MAX_LEN] = {false};
                for (int64_t i = 0; i < count; i++)
                    chosen[list[i]] = true;
                for (int64_t p = 0; p < n; p++)
                    FUZZ_CHECK(chosen[p] || (p >= sinks && p < rb), "selection row %lld: forced page %lld (sinks %lld, "
                               "recent from %lld) missing", (long long)r, (long long)p, (long long)sinks, (long long)rb);
                if (sel->epsilon > 0.f) {
                    bool ok = count == cap;
                    for (int64_t want = budget; !ok && want < cap; want *= 2)
                        ok = count == want;
                    FUZZ_CHECK(n == 0 || ok, "selection row %lld: %lld pages; adaptive budget %lld doubling to %lld",
                               (long long)r, (long long)count, (long long)budget, (long long)cap);
                } else {
                    FUZZ_CHECK(count == (n ? budget : 0), "selection row %lld: %lld pages, budget %lld (n %lld, forced "
                               "%lld)", (long long)r, (long long)count, (long long)budget, (long long)n,
                               (long long)(sinks + n - rb));
                }
                /* Scores from the metadata read back: selected >= unselected among the unforced pages. */
                bool finite_scores = meta != NULL;
                for (int64_t p = sinks; p < rb && finite_scores; p++) {
                    const int64_t page = tv_page(&tv, b, p);
                    double best = -INFINITY, best_mag = 0.0;
                    for (int64_t i = 0; i < q_len; i++)
                        for (int64_t g = 0; g < G; g++) {
                            double ub = 0.0, am = 0.0;
                            for (int64_t e = 0; e < D; e++) {
                                const double qs = (double)(float)(fz_load(qb, d->q_dtype, ((q0 + i) * Hq + hk * G + g) * D + e) * (float)sm);
                                const double x = qs * meta_value(ccd, meta, ms.scale_offset, ksb, page, hk, 0, e);
                                const double y = qs * meta_value(ccd, meta, ms.scale_offset, ksb, page, hk, 1, e);
                                ub += x > y ? x : y;
                                am += fabs(x) + fabs(y);
                            }
                            if (ub > best)
                                best = ub;
                            best_mag = fmax(best_mag, am);
                        }
                    score[p] = best, mag[p] = best_mag;
                    finite_scores &= q_len == 0 || (isfinite(best) && best_mag < 1e30);
                }
                if (finite_scores && q_len > 0) {
                    for (int64_t p = sinks; p < rb; p++)
                        for (int64_t u = sinks; u < rb; u++)
                            if (chosen[p] && !chosen[u]) {
                                const double tol = 1e-4 * fmax(fabs(score[p]), fabs(score[u])) + 1e-5 * fmax(mag[p], mag[u]) + 1e-30;
                                FUZZ_CHECK(score[p] >= score[u] - tol, "selection row %lld: page %lld (score %.9g) "
                                           "selected over page %lld (score %.9g)", (long long)r, (long long)p, score[p],
                                           (long long)u, score[u]);
                            }
                } else if (q_len == 0) { /* no query rows: every score ties; the lower pages go first */
                    for (int64_t p = sinks; p < rb; p++)
                        FUZZ_CHECK(chosen[p] == (p < sinks + count - (sinks + n - rb)), "selection row %lld: with "
                                   "equal scores page %lld %s", (long long)r, (long long)p, chosen[p] ? "chosen" : "left");
                }
            }
            /* Attention over the listed pages, compacted (the last one partly filled). */
            if (n == 0 || !q_finite || !w.k_finite)
                goto next_head;
            const int64_t last_len = kv_len - (n - 1) * P, len = (count - 1) * P + last_len;
            bool defined = true;
            for (int64_t j = 0; j < len; j++) {
                const int64_t slot = (int64_t)tv_page(&tv, b, list[j / P]) * P + j % P;
                for (int64_t e = 0; e < D; e++) {
                    kk[j * D + e] = cache_value(ccd, kc, ksb, slot, hk, e);
                    vv[j * D + e] = cache_value(ccd, vc, vsb, slot, hk, e);
                    defined &= isfinite(kk[j * D + e]) && isfinite(vv[j * D + e]) && fabs(vv[j * D + e]) < 1e30;
                }
            }
            if (!defined)
                goto next_head;
            for (int64_t i = 0; i < q_len; i++)
                for (int64_t g = 0; g < G; g++) {
                    const int64_t h = hk * G + g, row = q0 + i;
                    for (int64_t e = 0; e < D; e++)
                        qd[e] = fz_load(qb, d->q_dtype, (row * Hq + h) * D + e);
                    int64_t end = len;
                    if (d->causal && i + 1 + len - q_len < end)
                        end = i + 1 + len - q_len;
                    char what[96];
                    snprintf(what, sizeof(what), "attention over the selection (seq %lld, row %lld, head %lld)",
                             (long long)b, (long long)row, (long long)h);
                    check_row(qd, kk, vv, end, D, sm, splits, ob + (size_t)((row * Hq + h) * D) * qes, d->q_dtype,
                              lse ? lse + row * Hq + h : NULL, sc, wt, what);
                }
        next_head:;
        }
    }

    /* Page mass. */
    float *mass = NULL;
    {
        bool mu[N_ARGS], mo[N_ARGS] = {0};
        for (int i = 0; i < N_ARGS; i++)
            mu[i] = use[i] || i == A_MASS;
        mu[A_META] = mu[A_VC] = mu[A_VS] = false; /* what the mass does not read */
        mo[A_MASS] = true;
        const size_t wsave = a[A_WS].bytes;
        if (!dense && a[A_IX].buf >= 0)
            a[A_IX].bytes = m->bufs[a[A_IX].buf].size;
        view(a, v, mu, mo);
        a[A_IX].bytes = need[A_IX];
        a[A_WS].bytes = wsave;
        qattn_buffer *mb = c.mass_null ? NULL : fz_arg_buffer(m, &a[A_MASS]);
        fz_verdict mv = d->return_lse ? fz_args_verdict(m, v, N_ARGS) : FZ_INVALID;
        if (c.mass_null)
            mv = FZ_INVALID;
        resync(m);
        fz_commit(m);
        s = qattn_paged_page_mass(plan, &args, mb, a[A_MASS].offset);
        if (s) {
            FUZZ_CHECK(mv != FZ_VALID, "qattn_paged_page_mass refused a valid call: %s: %s", qattn_status_str(s),
                       qattn_last_error(ctx));
            fuzz_check_message(ctx, s, "qattn_paged_page_mass");
            fz_check_unchanged(m, "failed qattn_paged_page_mass");
        } else {
            FUZZ_CHECK(mv != FZ_INVALID, "qattn_paged_page_mass accepted an invalid call");
            fz_allow(m, a[A_MASS].buf, a[A_MASS].offset, need[A_MASS]);
            fz_check_unchanged(m, "qattn_paged_page_mass");
            mass = malloc(need[A_MASS]);
            FUZZ_CHECK(mass, "harness: out of memory");
            memcpy(mass, fz_after(m, a[A_MASS].buf, a[A_MASS].offset), need[A_MASS]);
            for (int64_t b = 0; b < B && q_finite && w.k_finite; b++) {
                const int64_t q0 = table_at(tv.qo, b), q_len = table_at(tv.qo, b + 1) - q0, kv_len = tv_kv_len(&tv, b);
                const int64_t n = (kv_len + P - 1) / P;
                for (int64_t hk = 0; hk < H; hk++) {
                    const float *row = mass + (b * H + hk) * M;
                    double sum = 0.0, lse_mag = 0.0;
                    for (int64_t p = 0; p < M; p++) {
                        FUZZ_CHECK(p < n || row[p] == 0.f, "page mass [%lld][%lld][%lld] = %g past the sequence",
                                   (long long)b, (long long)hk, (long long)p, (double)row[p]);
                        FUZZ_CHECK(!(row[p] < 0.f), "page mass [%lld][%lld][%lld] = %g < 0", (long long)b,
                                   (long long)hk, (long long)p, (double)row[p]);
                        sum += row[p];
                    }
                    int64_t seeing = 0; /* (row, head) pairs that see a key: each one's weights sum to 1 */
                    bool defined = true;
                    for (int64_t i = 0; i < q_len; i++) {
                        if (kv_len > 0 && (!d->causal || i + kv_len - q_len >= 0))
                            seeing += G;
                        for (int64_t g = 0; g < G; g++)
                            lse_mag = fmax(lse_mag, fabs((double)lse[(q0 + i) * Hq + hk * G + g]));
                    }
                    for (int64_t p = 0; p < n; p++) /* every key the mass reads */
                        for (int64_t t = 0; t < P && p * P + t < kv_len; t++)
                            for (int64_t e = 0; e < D; e++)
                                defined &= isfinite(cache_value(ccd, kc, ksb, (int64_t)tv_page(&tv, b, p) * P + t, hk, e));
                    if (!defined || !isfinite(lse_mag) || lse_mag > 1e6)
                        continue;
                    const double tol = 1e-4 * (double)(seeing + 1) + (double)seeing * lse_mag * 0x1p-20;
                    if (sel_given)
                        FUZZ_CHECK(sum >= (double)seeing - tol, "page mass of [%lld][%lld] sums to %.9g < %lld rows",
                                   (long long)b, (long long)hk, sum, (long long)seeing);
                    else
                        FUZZ_CHECK(fabs(sum - (double)seeing) <= tol, "page mass of [%lld][%lld] sums to %.9g, not %lld "
                                   "(one per query row and head that sees keys)", (long long)b, (long long)hk, sum,
                                   (long long)seeing);
                }
            }
        }
    }
    free(kk), free(vv), free(sc), free(wt), free(qd), free(score), free(mag), free(lse);

    /* Eviction of each sequence's page list under one policy. */
    const qattn_evict_policy *pol = &c.pol;
    const bool pol_ok = pol->sink_pages >= 0 && pol->recent_pages >= 1 && pol->keep_pages >= 1 &&
                        pol->keep_pages - pol->recent_pages >= pol->sink_pages; /* no overflow: recent >= 1 */
    for (int64_t b = 0; b < B; b++) {
        int32_t pages[MAX_LEN + 4];
        float scores[MAX_LEN + 4];
        const int64_t n0 = w.pages_of[b];
        for (int64_t i = 0; i < MAX_LEN + 4; i++) {
            pages[i] = i < n0 ? w.seq_pages[b][i] : POISON32;
            scores[i] = i < n0 ? (mass && c.evict_scores == 2 ? mass[(b * H) * M + i]
                                                              : (float)(ref_rng_uniform(&rng) * 4.0))
                               : -1234.5f;
            if (c.evict_scores == 3 && i < n0 && ref_rng_uniform(&rng) < 0.3)
                scores[i] = NAN;
        }
        if (c.list_edit_index >= 0 && n0 > 0 && b == 0)
            pages[c.list_edit_index % n0] = c.list_edit_value;
        int64_t count = b == 0 && c.hostile_count != 0 && (c.hostile_count < 0 || c.hostile_count > INT32_MAX)
                            ? c.hostile_count : n0;
        const bool with_scores = c.evict_scores != 0;
        int32_t pages0[MAX_LEN + 4];
        float scores0[MAX_LEN + 4];
        memcpy(pages0, pages, sizeof(pages));
        memcpy(scores0, scores, sizeof(scores));
        const int64_t free0 = qattn_page_pool_free_count(pool), count0 = count;
        /* The model: the victims, oldest or lowest-scored first among [sinks, n - recent). */
        fz_verdict ev = pol_ok && count >= 0 && count <= INT32_MAX ? FZ_VALID : FZ_INVALID;
        for (int64_t i = 0; ev == FZ_VALID && i < count; i++) /* a page listed twice is refused */
            for (int64_t j = 0; j < i; j++)
                if (pages[i] == pages[j])
                    ev = FZ_INVALID;
        bool victim[MAX_LEN] = {false}, nan_choice = false;
        int64_t drop = 0;
        if (ev == FZ_VALID && count > pol->keep_pages) {
            drop = count - pol->keep_pages;
            const int64_t first = pol->sink_pages, end = count - pol->recent_pages;
            for (int64_t k = 0; k < drop; k++) {
                int64_t pick = -1;
                for (int64_t p = first; p < end; p++) {
                    if (victim[p])
                        continue;
                    if (with_scores && isnan(scores[p])) {
                        nan_choice = true;
                        continue;
                    }
                    if (pick < 0 || (with_scores && scores[p] < scores[pick]))
                        pick = p;
                }
                if (pick < 0) { /* only NaN-scored candidates left: the header does not say which go */
                    nan_choice = true;
                    break;
                }
                victim[pick] = true;
            }
            /* The victims must be allocated, distinct pages of the pool, else nothing changes. */
            int32_t ids[MAX_LEN];
            int64_t nv = 0;
            for (int64_t p = 0; p < count; p++)
                if (victim[p])
                    ids[nv++] = pages[p];
            bool ok = true;
            for (int64_t i = 0; i < nv; i++) {
                bool owned = false; /* allocated: some sequence's page (the extra pages are free) */
                for (int64_t bb = 0; bb < B; bb++)
                    for (int64_t p = 0; p < w.pages_of[bb]; p++)
                        owned |= w.seq_pages[bb][p] == ids[i];
                for (int64_t j = 0; j < i; j++)
                    owned &= ids[j] != ids[i];
                ok &= owned;
            }
            if (!ok)
                ev = FZ_INVALID;
            bool list_bad = false; /* any entry that could be a victim being bad makes a NaN choice undecided */
            for (int64_t p = first; p < end; p++) {
                bool owned = false;
                for (int64_t bb = 0; bb < B; bb++)
                    for (int64_t pp = 0; pp < w.pages_of[bb]; pp++)
                        owned |= w.seq_pages[bb][pp] == pages[p];
                list_bad |= !owned;
            }
            if (nan_choice && (list_bad || c.list_edit_index >= 0))
                ev = fz_worst(ev, FZ_EITHER);
        }
        int64_t freed = -77;
        s = qattn_evict_pages(pool, pol, pages, &count, with_scores ? scores : NULL, &freed);
        if (s) {
            FUZZ_CHECK(ev != FZ_VALID, "qattn_evict_pages refused a valid call (keep %lld, sinks %lld, recent %lld, "
                       "%lld pages): %s: %s", (long long)pol->keep_pages, (long long)pol->sink_pages,
                       (long long)pol->recent_pages, (long long)count0, qattn_status_str(s), qattn_last_error(NULL));
            fuzz_check_message(NULL, s, "qattn_evict_pages");
            FUZZ_CHECK(s == QATTN_ERR_INVALID_ARGUMENT, "qattn_evict_pages: %s", qattn_status_str(s));
            FUZZ_CHECK(count == count0 && memcmp(pages, pages0, sizeof(pages)) == 0 &&
                           memcmp(scores, scores0, sizeof(scores)) == 0 && qattn_page_pool_free_count(pool) == free0 &&
                           (freed == -77 || freed == 0),
                       "a failed qattn_evict_pages changed the list, scores, pool or *freed (%lld)", (long long)freed);
            continue;
        }
        FUZZ_CHECK(ev != FZ_INVALID, "qattn_evict_pages accepted an invalid call (keep %lld, sinks %lld, recent %lld, "
                   "%lld pages)", (long long)pol->keep_pages, (long long)pol->sink_pages, (long long)pol->recent_pages,
                   (long long)count0);
        const int64_t keep = count0 > pol->keep_pages ? pol->keep_pages : count0;
        FUZZ_CHECK(count == keep && freed == count0 - keep, "qattn_evict_pages: %lld pages left, %lld freed, of %lld "
                   "(keep %lld)", (long long)count, (long long)freed, (long long)count0, (long long)pol->keep_pages);
        FUZZ_CHECK(qattn_page_pool_free_count(pool) == free0 + freed, "qattn_evict_pages: the pool has %lld free pages, "
                   "expected %lld", (long long)qattn_page_pool_free_count(pool), (long long)(free0 + freed));
        for (int64_t i = count0; i < MAX_LEN + 4; i++)
            FUZZ_CHECK(pages[i] == pages0[i] && (!with_scores || memcmp(&scores[i], &scores0[i], 4) == 0),
                       "qattn_evict_pages wrote past the list at %lld", (long long)i);
        /* The survivors: a subsequence of the list, in order, with their scores, the sinks and the recent pages. */
        int64_t at = 0;
        bool kept[MAX_LEN] = {false};
        for (int64_t i = 0; i < count; i++) {
            /* (page, score) pairs: an edited list may hold one page twice */
            while (at < count0 && !(pages0[at] == pages[i] && (!with_scores || memcmp(&scores[i], &scores0[at], 4) == 0)))
                at++;
            FUZZ_CHECK(at < count0, "qattn_evict_pages: survivor %lld (page %d) is out of order or lost its score",
                       (long long)i, pages[i]);
            kept[at++] = true;
        }
        for (int64_t p = 0; p < count0; p++) {
            const bool forced = p < pol->sink_pages || p >= count0 - pol->recent_pages;
            FUZZ_CHECK(kept[p] || !forced, "qattn_evict_pages evicted forced page %lld of %lld", (long long)p,
                       (long long)count0);
            FUZZ_CHECK(nan_choice || kept[p] == !victim[p], "qattn_evict_pages: position %lld %s (the model says "
                       "otherwise; scores %s)", (long long)p, kept[p] ? "kept" : "evicted", with_scores ? "on" : "off");
        }
        /* Pool accounting: the free pages are the extra ones, the evicted ones and earlier sequences' victims;
         * allocating every free page must hand out exactly the evicted ones plus those. */
        for (int64_t p = 0, k = 0; p < count0; p++) { /* keep the model's lists current */
            if (kept[p])
                w.seq_pages[b][k++] = pages0[p];
        }
        w.pages_of[b] = count;
        if (c.list_edit_index >= 0)
            break; /* an edited list may free another sequence's page: the model stops here */
    }
    if (c.list_edit_index < 0) {
        const int64_t nfree = qattn_page_pool_free_count(pool);
        int32_t got[MAX_PAGES_ALL];
        bool used[MAX_PAGES_ALL] = {false};
        for (int64_t b = 0; b < B; b++)
            for (int64_t p = 0; p < w.pages_of[b]; p++)
                used[w.seq_pages[b][p]] = true;
        int64_t model_free = 0;
        for (int64_t p = 0; p < num_pages; p++)
            model_free += !used[p];
        FUZZ_CHECK(nfree == model_free, "page pool: %lld free pages, the model has %lld", (long long)nfree,
                   (long long)model_free);
        FUZZ_CHECK(qattn_page_pool_alloc(pool, nfree, got) == QATTN_OK, "page pool: allocating its %lld free pages",
                   (long long)nfree);
        for (int64_t i = 0; i < nfree; i++) {
            FUZZ_CHECK(got[i] >= 0 && got[i] < num_pages && !used[got[i]], "page pool handed out page %d, in use",
                       got[i]);
            used[got[i]] = true;
        }
        FUZZ_CHECK(qattn_page_pool_free_count(pool) == 0, "page pool: pages left after allocating every free one");
    }
    free(mass);
    qattn_plan_destroy(plan);
    fz_release(m);
    qattn_page_pool_destroy(pool);
    return 0;
}
