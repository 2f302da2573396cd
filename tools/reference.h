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

/* Element (b, h, n, d) of a f32/f16/bf16 tensor as double. */
double ref_load(const void *base, const qattn_tensor_desc *t, int64_t b, int64_t h, int64_t n, int64_t d);

typedef struct ref_problem {
    const qattn_tensor_desc *q, *k, *v;
    const void *qd, *kd, *vd;
    bool causal;
    double sm_scale; /* 0: 1/sqrt(D) */
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
