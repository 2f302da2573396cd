/*
 * Test and benchmark support (not part of the library): random tensors, an
 * fp64 reference attention and the error metrics reported everywhere.
 */
#ifndef QATTN_REFERENCE_H
#define QATTN_REFERENCE_H

#include <stdbool.h>
#include <stdint.h>

#include "qattn/qattn.h"

typedef struct ref_rng {
    uint64_t s[4];
} ref_rng;

/* Seeds from $QATTN_TEST_SEED when set, else from the clock; returns the seed used. */
uint64_t ref_rng_seed_auto(ref_rng *rng);
void ref_rng_seed(ref_rng *rng, uint64_t seed);
double ref_rng_uniform(ref_rng *rng); /* [0, 1) */
double ref_rng_normal(ref_rng *rng);

/* Host tensor with room for the desc's byte span; free with free(). */
void *ref_tensor_alloc(const qattn_tensor_desc *t);

/*
 * Fills a tensor with N(0, 1) * scale, plus channel_bias[d] (may be NULL) on
 * every token: "K with a large per-channel bias shared by all tokens".
 * Values are stored in the tensor's dtype (rounded).
 */
void ref_fill_randn(void *base, const qattn_tensor_desc *t, ref_rng *rng, double scale, const double *channel_bias);

/* The element mask of a sparse plan beyond causal, for ref_problem.visible:
 * the window and sinks of sd (aligned bottom-right) and, when kept is set, a
 * dense map [B * Hkv * q_blocks][k_blocks] of the kept blocks (sd's sizes). */
typedef struct ref_sparse_mask {
    const qattn_sparse_desc *sd;
    int64_t nq, nk, hkv, group, q_blocks, k_blocks;
    const uint8_t *kept; /* NULL without a layout */
} ref_sparse_mask;
bool ref_sparse_visible(const void *mask, int64_t b, int64_t h, int64_t i, int64_t j);

/*
 * Q, K and V with the structure real attention has, for sparse attention's
 * tests and benchmarks (random data gives uniform attention, where pruning
 * can only lose): per batch, tokens fall in topic segments of seg_min to
 * seg_max tokens; a segment's queries and keys share a topic direction, so
 * queries attend to their own segment; sinusoidal position features add a
 * local bump near the diagonal; the first `sinks` keys share a direction
 * every query holds (attention sinks); and one needle key is planted with a
 * direction only one late query holds. Q and K are placed by position with
 * queries aligned bottom-right (query i at key place i + Nk - Nq). V is
 * N(0, 1). Amplitudes are in logits (after sm_scale = 1/sqrt(D)).
 */
typedef struct ref_structure {
    int64_t seg_min, seg_max; /* topic segment lengths (tokens) */
    double topic;             /* logit of a query for its own segment's keys */
    double local;             /* logit bump of keys next to the query's place */
    double sink;              /* logit of every query for the sink keys */
    double needle;            /* logit of the needle query for the needle key */
    double noise;             /* per-element noise (std, before sm_scale) */
    int64_t sinks;            /* sink keys at the start */
    /* Out: the needle's places (key index, query row). */
    int64_t needle_key, needle_query;
} ref_structure;

/* Defaults for n keys: segments of n/16..n/4 tokens (at least 64), topic 6,
 * local 4, sinks 4 with logit 3, needle 12, noise 1. */
ref_structure ref_structure_default(int64_t nk);
void ref_fill_structured(void *q, const qattn_tensor_desc *qd, void *k, const qattn_tensor_desc *kd, void *v,
                         const qattn_tensor_desc *vd, ref_rng *rng, ref_structure *st);

/* Element d of (page, offset in page, KV head) of a paged cache's K or V
 * buffer (host copy), dequantized as the page format defines (scales: the
 * buffer's fp32 scales, NULL for f16/bf16 pages). */
double ref_kv_value(const qattn_kv_cache_desc *c, const void *cache, const float *scales, int64_t page, int64_t off,
                    int64_t h, int64_t d);

/* Element (b, h, n, d) of a f32/f16/bf16 tensor as double. */
double ref_load(const void *base, const qattn_tensor_desc *t, int64_t b, int64_t h, int64_t n, int64_t d);

typedef struct ref_problem {
    const qattn_tensor_desc *q, *k, *v;
    const void *qd, *kd, *vd;
    bool causal;
    double sm_scale; /* 0: 1/sqrt(D) */
    /* Optional mask on top of causal (sparse attention): key j is seen by
     * query row i of (b, query head h) only where it returns true. */
    bool (*visible)(const void *ctx, int64_t b, int64_t h, int64_t i, int64_t j);
    const void *visible_ctx;
} ref_problem;

/*
 * fp64 attention for query rows of one (b, h): out[D] and lse (natural log;
 * -inf and zeros for a row that sees no key), from the stored inputs.
 */
void ref_attention_row(const ref_problem *p, int64_t b, int64_t h, int64_t i, double *out, double *lse);

typedef struct ref_metrics {
    double cos_sim, rel_l1, rmse, max_abs;
    int64_t count, nonfinite;
} ref_metrics;

typedef struct ref_accum {
    double dot, nn_out, nn_ref, l1_diff, l1_ref, sq_diff, max_abs;
    int64_t count, nonfinite;
} ref_accum;

void ref_accum_add(ref_accum *a, double out, double ref);
ref_metrics ref_accum_finish(const ref_accum *a);

/* Compares output rows (any dtype/layout) with the fp64 reference over the
 * given rows (all rows when rows_per_head <= 0 or >= Nq), sampling heads
 * evenly; LSE too when lse is not NULL. */
typedef struct ref_compare {
    ref_metrics out, lse;
    int64_t rows_checked;
} ref_compare;

ref_compare ref_check(const ref_problem *p, const void *o, const qattn_tensor_desc *od, const float *lse,
                      int64_t rows_per_head, ref_rng *rng);

/*
 * Start of a per-backend test program: `prog <backend>`. Creates the context;
 * returns -1 when it did, else the exit code to leave with (2 for usage, 77 =
 * skip when the backend is not usable here, 1 on other errors).
 */
int ref_backend_context(int argc, char **argv, const char *program, qattn_ctx **ctx);

/* Poison pattern for outputs: a NaN in every dtype when all bytes are 0xff. */
#define REF_POISON_BYTE 0xff

#endif
