#include "reference.h"

#include "numeric.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t splitmix(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void ref_rng_seed(ref_rng *rng, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        rng->s[i] = splitmix(&seed);
}

uint64_t ref_rng_seed_auto(ref_rng *rng)
{
    const char *env = getenv("QATTN_TEST_SEED");
    uint64_t seed;
    if (env && *env) {
        seed = strtoull(env, NULL, 0);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec;
    }
    ref_rng_seed(rng, seed);
    return seed;
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next(ref_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double ref_rng_uniform(ref_rng *rng) { return (double)(next(rng) >> 11) * 0x1.0p-53; }

double ref_rng_normal(ref_rng *rng)
{
    double u1 = ref_rng_uniform(rng), u2 = ref_rng_uniform(rng);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void *ref_tensor_alloc(const qattn_tensor_desc *t)
{
    size_t bytes = qattn_tensor_bytes(t);
    return bytes ? malloc(bytes) : NULL;
}

static int64_t offset_of(const qattn_tensor_desc *t, int64_t b, int64_t h, int64_t n, int64_t d)
{
    return b * t->stride[0] + h * t->stride[1] + n * t->stride[2] + d * t->stride[3];
}

double ref_load(const void *base, const qattn_tensor_desc *t, int64_t b, int64_t h, int64_t n, int64_t d)
{
    return qattn_load_f(base, t->dtype, offset_of(t, b, h, n, d));
}

void ref_fill_randn(void *base, const qattn_tensor_desc *t, ref_rng *rng, double scale, const double *channel_bias)
{
    for (int64_t b = 0; b < t->shape[0]; b++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t n = 0; n < t->shape[2]; n++)
                for (int64_t d = 0; d < t->shape[3]; d++)
                    qattn_store_f(base, t->dtype, offset_of(t, b, h, n, d), (float)(
                          ref_rng_normal(rng) * scale + (channel_bias ? channel_bias[d] : 0.0)));
}

void ref_attention_row(const ref_problem *p, int64_t b, int64_t h, int64_t i, double *out, double *lse)
{
    const int64_t D = p->q->shape[3], Nq = p->q->shape[2], Nk = p->k->shape[2];
    const int64_t hk = h / (p->q->shape[1] / p->k->shape[1]);
    const double scale = p->sm_scale != 0.0 ? p->sm_scale : 1.0 / sqrt((double)D);
    int64_t end = Nk;
    if (p->causal) {
        end = i + 1 + (Nk - Nq);
        if (end > Nk)
            end = Nk;
    }
    for (int64_t d = 0; d < D; d++)
        out[d] = 0.0;
    if (end <= 0) {
        *lse = -INFINITY;
        return;
    }
    double *s = malloc((size_t)end * sizeof(double));
    double m = -INFINITY;
    for (int64_t j = 0; j < end; j++) {
        if (p->visible && !p->visible(p->visible_ctx, b, h, i, j)) {
            s[j] = -INFINITY;
            continue;
        }
        double acc = 0.0;
        for (int64_t d = 0; d < D; d++)
            acc += ref_load(p->qd, p->q, b, h, i, d) * ref_load(p->kd, p->k, b, hk, j, d);
        s[j] = acc * scale;
        if (s[j] > m)
            m = s[j];
    }
    if (m == -INFINITY) { /* the mask hides every key */
        *lse = -INFINITY;
        free(s);
        return;
    }
    double l = 0.0;
    for (int64_t j = 0; j < end; j++) {
        if (s[j] == -INFINITY)
            continue;
        double w = exp(s[j] - m);
        l += w;
        for (int64_t d = 0; d < D; d++)
            out[d] += w * ref_load(p->vd, p->v, b, hk, j, d);
    }
    for (int64_t d = 0; d < D; d++)
        out[d] /= l;
    *lse = m + log(l);
    free(s);
}

void ref_accum_add(ref_accum *a, double out, double ref)
{
    a->count++;
    if (!isfinite(out)) {
        a->nonfinite++;
        return;
    }
    double diff = fabs(out - ref);
    a->dot += out * ref;
    a->nn_out += out * out;
    a->nn_ref += ref * ref;
    a->l1_diff += diff;
    a->l1_ref += fabs(ref);
    a->sq_diff += diff * diff;
    if (diff > a->max_abs)
        a->max_abs = diff;
}

ref_metrics ref_accum_finish(const ref_accum *a)
{
    ref_metrics m = {0};
    m.count = a->count;
    m.nonfinite = a->nonfinite;
    if (a->nonfinite || !a->count) {
        m.cos_sim = m.rel_l1 = m.rmse = m.max_abs = NAN;
        return m;
    }
    double denom = sqrt(a->nn_out) * sqrt(a->nn_ref);
    m.cos_sim = denom > 0 ? a->dot / denom : (a->nn_out == a->nn_ref ? 1.0 : 0.0);
    m.rel_l1 = a->l1_ref > 0 ? a->l1_diff / a->l1_ref : a->l1_diff;
    m.rmse = sqrt(a->sq_diff / (double)a->count);
    m.max_abs = a->max_abs;
    return m;
}

ref_compare ref_check(const ref_problem *p, const void *o, const qattn_tensor_desc *od, const float *lse,
                      int64_t rows_per_head, ref_rng *rng)
{
    const int64_t B = p->q->shape[0], H = p->q->shape[1], Nq = p->q->shape[2], D = p->q->shape[3];
    ref_accum ao = {0}, al = {0};
    ref_compare c = {0};
    double *row = malloc((size_t)D * sizeof(double));
    bool all = rows_per_head <= 0 || rows_per_head >= Nq;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            int64_t n = all ? Nq : rows_per_head;
            for (int64_t r = 0; r < n; r++) {
                int64_t i = all ? r : (int64_t)(ref_rng_uniform(rng) * (double)Nq);
                double l;
                ref_attention_row(p, b, h, i, row, &l);
                for (int64_t d = 0; d < D; d++)
                    ref_accum_add(&ao, ref_load(o, od, b, h, i, d), row[d]);
                if (lse) {
                    double got = lse[(b * H + h) * Nq + i];
                    if (isinf(l) && l < 0) /* fully masked row: must be -inf exactly */
                        ref_accum_add(&al, isinf(got) && got < 0 ? 0.0 : NAN, 0.0);
                    else
                        ref_accum_add(&al, got, l);
                }
                c.rows_checked++;
            }
        }
    free(row);
    c.out = ref_accum_finish(&ao);
    c.lse = ref_accum_finish(&al);
    return c;
}

int ref_backend_context(int argc, char **argv, const char *program, qattn_ctx **ctx)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s <cpu|cuda|vulkan|opencl|cuda-emu>\n", program);
        return 2;
    }
    qattn_ctx_params params = {.backend = argv[1]};
    qattn_status s = qattn_ctx_create(&params, ctx);
    if (s == QATTN_ERR_UNAVAILABLE) {
        printf("SKIP: backend %s is not usable here: %s\n", argv[1], qattn_last_error(NULL));
        return 77;
    }
    if (s) {
        fprintf(stderr, "%s: %s: %s\n", program, qattn_status_str(s), qattn_last_error(NULL));
        return 1;
    }
    return -1;
}

bool ref_sparse_visible(const void *mask, int64_t b, int64_t h, int64_t i, int64_t j)
{
    const ref_sparse_mask *m = mask;
    const qattn_sparse_desc *sd = m->sd;
    if (sd->window) {
        const int64_t place = i + m->nk - m->nq;
        bool in_window = (sd->window_left < 0 || j >= place - sd->window_left) &&
                         (sd->window_right < 0 || j <= place + sd->window_right);
        if (!in_window && j >= sd->sink_tokens)
            return false;
    }
    if (m->kept) {
        const int64_t row = (b * m->hkv + h / m->group) * m->q_blocks + i / sd->q_block;
        return m->kept[row * m->k_blocks + j / sd->k_block] != 0;
    }
    return true;
}

ref_structure ref_structure_default(int64_t nk)
{
    ref_structure st = {.seg_min = nk / 16 > 64 ? nk / 16 : 64, .seg_max = nk / 4 > 64 ? nk / 4 : 64,
                        .topic = 6.0, .local = 4.0, .sink = 3.0, .needle = 12.0, .noise = 1.0, .sinks = 4,
                        .needle_key = -1, .needle_query = -1};
    return st;
}

/* Adds a * dir (unit, D) to row n of head (b, h). */
static void add_dir(void *base, const qattn_tensor_desc *t, int64_t b, int64_t h, int64_t n, const double *dir,
                    double a)
{
    for (int64_t d = 0; d < t->shape[3]; d++) {
        int64_t off = offset_of(t, b, h, n, d);
        qattn_store_f(base, t->dtype, off, (float)(qattn_load_f(base, t->dtype, off) + a * dir[d]));
    }
}

static void random_unit(ref_rng *rng, double *dir, int64_t D)
{
    double nn = 0.0;
    for (int64_t d = 0; d < D; d++) {
        dir[d] = ref_rng_normal(rng);
        nn += dir[d] * dir[d];
    }
    for (int64_t d = 0; d < D; d++)
        dir[d] /= sqrt(nn);
}

void ref_fill_structured(void *q, const qattn_tensor_desc *qd, void *k, const qattn_tensor_desc *kd, void *v,
                         const qattn_tensor_desc *vd, ref_rng *rng, ref_structure *st)
{
    const int64_t B = qd->shape[0], Hq = qd->shape[1], Hkv = kd->shape[1], Nq = qd->shape[2], Nk = kd->shape[2];
    const int64_t D = qd->shape[3], group = Hq / Hkv, shift = Nk - Nq;
    /* Logit a between unit directions scaled by x in q and y in k: x * y / sqrt(D) = a; split evenly. */
    const double root = pow((double)D, 0.25);
    double *dir = malloc((size_t)D * sizeof(double)), *sinkdir = malloc((size_t)D * sizeof(double));
    double *needle = malloc((size_t)D * sizeof(double));
    ref_fill_randn(q, qd, rng, st->noise / root, NULL);
    ref_fill_randn(k, kd, rng, st->noise / root, NULL);
    ref_fill_randn(v, vd, rng, 1.0, NULL);
    st->needle_key = Nk > 8 ? Nk / 3 + (int64_t)(ref_rng_uniform(rng) * (double)(Nk / 3)) : -1;
    st->needle_query = st->needle_key >= 0 ? Nq - 1 - (int64_t)(ref_rng_uniform(rng) * (double)(Nq < 8 ? Nq : 8)) : -1;
    if (st->needle_query >= 0 && st->needle_query + shift < st->needle_key) /* the query must see its needle */
        st->needle_key = st->needle_query + shift > 0 ? (st->needle_query + shift) / 2 : -1;
    /* Position features: F sinusoid pairs in the first 2F channels, frequencies 2^-f / 8, sum of
     * cosines of (place_q - place_k) peaks at 0 and falls off within a few dozen tokens. */
    const int64_t F = D / 8 > 1 ? D / 8 : 1;
    const double local_amp = sqrt(st->local / (double)F) * root;
    for (int64_t b = 0; b < B; b++) {
        random_unit(rng, sinkdir, D);
        random_unit(rng, needle, D);
        for (int64_t hk = 0; hk < Hkv; hk++) {
            int64_t start = 0;
            while (start < Nk) {
                int64_t len = st->seg_min + (int64_t)(ref_rng_uniform(rng) * (double)(st->seg_max - st->seg_min + 1));
                int64_t end = start + len < Nk ? start + len : Nk;
                random_unit(rng, dir, D);
                const double amp = sqrt(st->topic) * root;
                for (int64_t n = start; n < end; n++)
                    add_dir(k, kd, b, hk, n, dir, amp);
                for (int64_t g = 0; g < group; g++)
                    for (int64_t i = start - shift; i < end - shift; i++)
                        if (i >= 0 && i < Nq)
                            add_dir(q, qd, b, hk * group + g, i, dir, amp);
                start = end;
            }
            for (int64_t n = 0; n < Nk; n++) {
                for (int64_t f = 0; f < F && 2 * f + 1 < D; f++) {
                    double w = ldexp(1.0, (int)-f) / 8.0;
                    int64_t o0 = offset_of(kd, b, hk, n, 2 * f), o1 = offset_of(kd, b, hk, n, 2 * f + 1);
                    qattn_store_f(k, kd->dtype, o0, (float)(qattn_load_f(k, kd->dtype, o0) + local_amp * cos(w * (double)n)));
                    qattn_store_f(k, kd->dtype, o1, (float)(qattn_load_f(k, kd->dtype, o1) + local_amp * sin(w * (double)n)));
                }
                if (n < st->sinks)
                    add_dir(k, kd, b, hk, n, sinkdir, sqrt(st->sink) * root);
                if (n == st->needle_key)
                    add_dir(k, kd, b, hk, n, needle, sqrt(st->needle) * root);
            }
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = hk * group + g;
                for (int64_t i = 0; i < Nq; i++) {
                    const double place = (double)(i + shift);
                    for (int64_t f = 0; f < F && 2 * f + 1 < D; f++) {
                        double w = ldexp(1.0, (int)-f) / 8.0;
                        int64_t o0 = offset_of(qd, b, h, i, 2 * f), o1 = offset_of(qd, b, h, i, 2 * f + 1);
                        qattn_store_f(q, qd->dtype, o0, (float)(qattn_load_f(q, qd->dtype, o0) + local_amp * cos(w * place)));
                        qattn_store_f(q, qd->dtype, o1, (float)(qattn_load_f(q, qd->dtype, o1) + local_amp * sin(w * place)));
                    }
                    add_dir(q, qd, b, h, i, sinkdir, sqrt(st->sink) * root);
                    if (i == st->needle_query)
                        add_dir(q, qd, b, h, i, needle, sqrt(st->needle) * root);
                }
            }
        }
    }
    free(dir);
    free(sinkdir);
    free(needle);
}

double ref_kv_value(const qattn_kv_cache_desc *c, const void *cache, const float *scales, int64_t page, int64_t off,
                    int64_t h, int64_t d)
{
    const int64_t within = c->layout == QATTN_KV_NHD ? off * c->heads_kv + h : h * c->page_size + off;
    const int64_t at = (page * c->page_size * c->heads_kv + within) * c->head_dim + d;
    switch (c->dtype) {
    case QATTN_DTYPE_F16: return qattn_f16_to_f32(((const uint16_t *)cache)[at]);
    case QATTN_DTYPE_BF16: return qattn_bf16_to_f32(((const uint16_t *)cache)[at]);
    case QATTN_DTYPE_FP8_E4M3: return qattn_e4m3_to_f32(((const uint8_t *)cache)[at]) * (double)scales[h];
    default: {
        const float scale = c->scales == QATTN_KV_SCALES_PER_ROW
                                ? scales[(page * c->page_size + off) * c->heads_kv + h]
                                : scales[h];
        return ((const int8_t *)cache)[at] * (double)scale;
    }
    }
}
