/* The CPU flash engine shared by dense and paged attention (cpu_attention.c). */
#ifndef QATTN_CPU_FLASH_H
#define QATTN_CPU_FLASH_H

#include "cpu_internal.h"

#define CPU_KT 64      /* keys per score block (the register-blocked S = Q K^T) */
#define CPU_KT_MAX 128 /* keys per softmax step at most; the row stride of Kt, S and P */

/* Per-thread scratch, sized for CPU_QT rows, CPU_KT_MAX keys and head dim D. */
typedef struct cpu_scratch {
    float *Q;      /* [CPU_QT][D] query rows in the log2 domain (or INT8 codes) */
    float *Kt;     /* [D][CPU_KT_MAX] keys, transposed */
    float *V;      /* [CPU_KT_MAX][D] */
    float *S, *O, *acc16, *part, *row;
    float m[CPU_QT], l[CPU_QT], alpha[CPU_QT];
    float qscale[CPU_QT];   /* quantized modes: INT8 Q scale x sm_scale x log2(e) */
    float kscale[CPU_KT_MAX]; /* quantized modes: INT8 K scale per key */
    int64_t key_end[CPU_QT]; /* keys each row may see: [0, key_end) */
    struct cpu_sparse_tile *sparse; /* sparse runs' per-tile masks (cpu_attention.c) */
} cpu_scratch;

bool cpu_scratch_alloc(cpu_scratch *sc, int D);
void cpu_scratch_free(cpu_scratch *sc);
/* count scratches, all or nothing (NULL on failure). */
cpu_scratch *cpu_scratch_array(int count, int D);
void cpu_scratch_array_free(cpu_scratch *sc, int count);

/* Fills sc->Kt (zero past `keys`), sc->V and (quantized) sc->kscale for keys [j0, j0 + keys). */
typedef void (*cpu_kv_loader)(const void *ctx, int64_t j0, int keys, cpu_scratch *sc);

/* Sparse attention's filter of key steps (NULL in dense runs). */
typedef struct cpu_step_filter {
    /* Whether a row of the tile may see a key of [j0, j0 + keys); the loop skips the step when not. */
    bool (*visit)(void *ctx, int64_t j0, int keys);
    /* Sets to -inf the scores (S rows CPU_KT_MAX apart) of keys a row may not see, beyond key_end. */
    void (*mask)(void *ctx, int64_t j0, int keys, float *S, int rows);
    void *ctx;
    float pv_threshold;  /* lambda: skip P.V of 16-row groups whose step max is this far below (0: off) */
    int64_t first_row;   /* the tile's first query row; 16-row groups are aligned to it */
} cpu_step_filter;

typedef struct cpu_flash_params {
    int head_dim;
    /* Keys per online-softmax step, CPU_KT or CPU_KT_MAX: the FP8 modes round
     * P to E4M3 against the running max of whole steps, so a reference run
     * follows the step of the kernel it checks (its plan's kv_tile). */
    int step;
    qattn_precision precision;
    const qattn_quant_params *quant; /* quantized modes */
    const cpu_step_filter *filter;   /* sparse runs; NULL: every step up to key_end */
} cpu_flash_params;

/* Online softmax over keys [key_begin, key_end) for `rows` rows prepared in
 * sc->Q / sc->qscale / sc->key_end. Leaves the unnormalized output in sc->O
 * and the running max (log2 domain) and sum in sc->m, sc->l. */
void cpu_flash_loop(cpu_scratch *sc, int rows, const cpu_flash_params *fp, int64_t key_begin, int64_t key_end,
                    cpu_kv_loader load, const void *loader_ctx);

/* A filter for rows whose visible keys the caller computed (qattn_sparse_row_keys:
 * [lo, hi) and sinks [0, sinks)), without a layout: paged plans under a window.
 * Sets sc->key_end to hi. */
void cpu_sparse_rows_filter(cpu_scratch *sc, const qattn_sparse_problem *sp, const int64_t *lo, const int64_t *hi,
                            const int64_t *sinks, int rows, cpu_step_filter *filter);

/* LSE (natural log) of a row from its log2-domain max and sum; -inf when empty. */
float cpu_row_lse(float m, float l);

void cpu_convert_row(float *dst, const void *src, qattn_dtype dt, int n, float scale);
void cpu_convert_row_i8(float *dst, const int8_t *src, int n);
const float *cpu_e4m3_table(void);

/* Workers for `items` work items (1 without OpenMP) and the caller's index. */
int cpu_worker_count(int threads, int64_t items);
int cpu_thread_index(void);

#endif
