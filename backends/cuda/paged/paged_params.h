/*
 * Launch parameters of the paged kernels, shared by the host glue and the
 * kernels (plain C structs, passed by value). Element strides, not bytes.
 */
#ifndef QATTN_PAGED_PARAMS_H
#define QATTN_PAGED_PARAMS_H

#include <stdint.h>

/* Page formats the attention kernel is instantiated for. */
enum pa_format {
    PA_FMT_F16 = 0,
    PA_FMT_BF16 = 1,
    PA_FMT_FP8 = 2,     /* E4M3 codes, per-head scales */
    PA_FMT_I8 = 3,      /* INT8 codes, per-head scales */
    PA_FMT_I8_ROW = 4,  /* INT8 codes, a scale per (token, head) */
    PA_FMT_COUNT = 5
};

/* Element types of queries, outputs and new tokens (values of qattn_dtype). */
enum pa_elem { PA_ELEM_F32 = 0, PA_ELEM_F16 = 1, PA_ELEM_BF16 = 2 };

#define PA_KEY_TILE 64 /* keys per pipeline stage */

/* Status words (QATTN_STATUS_* of src/internal.h) in the paged plan's
 * workspace, zeroed before the check: the check kernel flags bad tables and a
 * non-finite Q there, and the kernels write nothing when a word is set. */

/* The page tables of one run. */
typedef struct pa_tables {
    const int32_t *qo_indptr;
    const int32_t *block_table, *seq_lens;               /* DENSE */
    const int32_t *indptr, *indices, *last_page_len;     /* CSR */
    int64_t indices_count;                               /* entries the indices buffer holds */
    int32_t dense, batch, max_pages, page_size, num_pages, total_q, max_q_len;
} pa_tables;

typedef struct pa_attn_params {
    pa_tables tab;
    const uint8_t *k, *v;              /* cache bases */
    const float *k_scale, *v_scale;    /* per head [Hkv] or per row [pages * page_size * Hkv]; NULL unscaled */
    int64_t page_stride, tok_stride, head_stride; /* elements between pages, tokens of a page, heads */
    int32_t heads_kv, group, heads_q;
    uint32_t page_div_mul, page_div_shr; /* j / page_size = umulhi(j, mul) >> shr for j < 2^31 (mul 0: size 1) */
    const void *q;
    int64_t q_stride0, q_stride1;
    void *o;
    int64_t o_stride0, o_stride1;
    float *lse;                        /* [total_q, Hq] or NULL */
    float *part_o, *part_lse;          /* split partials [splits, total_q, Hq, D] and [splits, total_q, Hq] */
    int32_t q_elem;                    /* pa_elem of Q and O */
    int32_t splits, pages_per_split, q_tiles, row_warps; /* row_warps: warps along query rows (1, 2 or 4) */
    int32_t causal, need_lo;           /* need_lo: Q does not fit the MMA operand type: add a low part */
    float scale_log2;                  /* sm_scale * log2(e) */
    const uint32_t *status;            /* the workspace status words, NULL without the check */
} pa_attn_params;

typedef struct pa_check_params {
    pa_tables tab;
    const void *q;
    int64_t q_stride0, q_stride1;
    int32_t q_elem, heads_q, head_dim;
    uint32_t *status;
} pa_check_params;

/* Merges S attention states per (row, head): used for split-KV and qattn_merge_states. */
typedef struct pa_merge_params {
    const void *v;
    int64_t v_stride[3];               /* state, row, head */
    const float *s;
    int64_t s_stride[3];
    void *o;
    int64_t o_stride[2];               /* row, head */
    float *lse;                        /* [rows, heads] contiguous, or NULL */
    int32_t v_elem, o_elem;
    int32_t states, heads, head_dim;
    int64_t rows;
    const int32_t *qo_indptr;          /* paged split merge: only rows qo_indptr[0] .. qo_indptr[batch] */
    int32_t batch;
    const uint32_t *status;
} pa_merge_params;

/* An append's check flags a bad slot or per-head scale and non-finite new
 * tokens in its status words (QATTN_STATUS_*); the write runs only after the
 * host has read them clear. */
typedef struct pa_append_params {
    const int64_t *slots;
    int64_t num_tokens, capacity;
    const void *k_new, *v_new;
    int64_t new_stride0, new_stride1;
    int32_t new_elem, heads_kv, head_dim, page_size;
    int32_t cache_format;              /* pa_format (PA_FMT_F16 / BF16 for unscaled pages) */
    uint8_t *k, *v;
    float *k_scale, *v_scale;
    int64_t page_stride, tok_stride, head_stride;
    uint32_t *status;                  /* the check's status words */
} pa_append_params;

#endif
