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
        double acc = 0.0;
        for (int64_t d = 0; d < D; d++)
            acc += ref_load(p->qd, p->q, b, h, i, d) * ref_load(p->kd, p->k, b, hk, j, d);
        s[j] = acc * scale;
        if (s[j] > m)
            m = s[j];
    }
    double l = 0.0;
    for (int64_t j = 0; j < end; j++) {
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
