/*
 * The CUDA backend's private header, shared by its C host code (cuda_backend.c,
 * cuda_attention.c, cuda_paged.c) and its C++ kernel side (the .cu/.cuh files).
 *
 * One stack, two runtimes: the host code makes every CUDA call through a
 * `qa_rt` table, which cuda_rt.cuh implements twice from one source: on the
 * CUDA runtime with nvcc (cuda_rt.cu, the `cuda` backend) and on host memory
 * with the CPU emulator of the CUDA execution model (emu/, the test-only
 * `cuda-emu` backend that CI runs the shared suites on). The kernels are the
 * same source in both.
 */
#ifndef QA_CUDA_INTERNAL_H
#define QA_CUDA_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------- dense attention */

#define QA_BLOCK_M 128        /* query rows per CTA (4 warps x 32) */
#define QA_WARP_M 32          /* query rows per warp */
#define QA_BLOCK_N 64         /* keys per tile and per K quantization block */
#define QA_STATS_TOKENS 256   /* keys per CTA of the K-mean / V-max pass */
#define QA_ALIGN 16           /* bytes: rows are copied 16 bytes at a time */

/* Scratch the quantization passes need beyond the core's regions
 * (plan->ws.backend): per-chunk partial K sums and V maxima, V's inverse scales. */
typedef struct qa_scratch {
    size_t part_sum, part_amax, v_inv, total; /* byte offsets inside the backend region */
    int chunks, chunk_tokens;
} qa_scratch;

qa_scratch qa_scratch_layout(const qattn_problem *p);

/* What a dense plan's impl points to (static storage: nothing to release). */
typedef struct qa_plan_info {
    /* FP8 P.V on the fp16 tensor path (sm_90: the e4m3 mma.sync is not native
     * there and ptxas expands it into unpacks plus two fp16 mmas). */
    int fp8_on_f16_mma;
    /* FP8 and EXACT modes on the sm_90a wgmma kernels (hopper/). */
    int wgmma;
    /* The warp-specialized wgmma kernels fed by TMA (FP8: needs seq_k % 16 == 0). */
    int tma;
} qa_plan_info;

/* Whether the device (compute capability major * 10 + minor) runs the precision. */
int qa_supports(int cc, qattn_precision precision);

/* The dense plan for a device of compute capability cc (no CUDA calls);
 * sm90a_kernels: the runtime carries the sm_90a wgmma kernels. */
qattn_status qa_plan_dense(qattn_ctx *ctx, qattn_plan *plan, int cc, int sm90a_kernels);

/* Device pointers of one dense run (first elements; lse and ws may be NULL). */
typedef struct qa_dense_args {
    const void *q, *k, *v;
    void *o;
    float *lse;
    void *ws;
    /* QATTN_SPARSE_BLOCKS plans: the user's layout (indices may be NULL when count is 0). */
    const int32_t *block_indptr, *block_indices;
    int64_t block_count;
} qa_dense_args;

/*
 * Sparse plans with a block layout (given or predicted): the pre-pass's
 * per-tile step lists (cuda_sparse.cuh) in the backend's workspace region,
 * after the quantization scratch: counts int32 [tiles], steps uint32
 * [tiles][ksteps], cell masks uint64 [tiles][ksteps], for tiles = B * Hkv *
 * ceil(Nq / 128) and ksteps = ceil(Nk / kv_tile).
 */
typedef struct qa_sparse_lists {
    size_t count, steps, cells, total; /* byte offsets inside the backend region from `base` on */
    int64_t tiles;
    int ksteps, bn;
} qa_sparse_lists;

/* PREDICT plans: key blocks per layout row the selection kernel holds in 48 KiB of shared memory. */
#define QA_SPARSE_MAX_K_BLOCKS 6000

static inline qa_sparse_lists qa_sparse_lists_layout(const qattn_plan *plan, size_t base)
{
    const qattn_problem *p = &plan->problem;
    qa_sparse_lists s;
    memset(&s, 0, sizeof(s));
    s.bn = plan->kv_tile;
    s.ksteps = (int)((p->seq_k + s.bn - 1) / s.bn);
    s.tiles = p->batch * p->heads_kv * ((p->seq_q + QA_BLOCK_M - 1) / QA_BLOCK_M);
    s.count = qattn_round_up(base, 256);
    s.steps = s.count + qattn_round_up((size_t)s.tiles * 4, 256);
    s.cells = s.steps + qattn_round_up((size_t)s.tiles * (size_t)s.ksteps * 4, 256);
    s.total = s.cells + qattn_round_up((size_t)s.tiles * (size_t)s.ksteps * 8, 256);
    return s;
}

/* ----------------------------------------------------- paged KV cache */

#define QA_PAGED_THREADS 128 /* threads per block of every paged kernel */
#define QA_PAGED_KEY_TILE 64 /* keys per pipeline stage of the paged attention kernel */

/* Element types of queries, outputs and new tokens: the values of qattn_dtype. */
enum { QA_ELEM_F32 = QATTN_DTYPE_F32, QA_ELEM_F16 = QATTN_DTYPE_F16, QA_ELEM_BF16 = QATTN_DTYPE_BF16 };

/* The page tables of one run, as the kernels read them (element strides). */
typedef struct qa_paged_tables {
    const int32_t *qo_indptr;
    const int32_t *block_table, *seq_lens;           /* DENSE */
    const int32_t *indptr, *indices, *last_page_len; /* CSR */
    int64_t indices_count;                           /* entries the indices buffer holds */
    int32_t dense, batch, max_pages, page_size, num_pages, total_q, max_q_len;
} qa_paged_tables;

/* Launch parameters of the paged kernels: plain structs passed by value;
 * strides in elements. `status` points at the status words (QATTN_STATUS_*)
 * or is NULL without the checks; a kernel writes nothing once a word is set. */
typedef struct qa_paged_attn_params {
    qa_paged_tables tab;
    const uint8_t *k, *v;                         /* cache bases */
    const float *k_scale, *v_scale;               /* per head [Hkv] or per row [pages * page_size * Hkv]; NULL unscaled */
    int64_t page_stride, tok_stride, head_stride; /* elements between pages, tokens of a page, heads */
    int32_t heads_kv, group, heads_q;
    uint32_t page_div_mul, page_div_shr;          /* j / page_size = umulhi(j, mul) >> shr for j < 2^31 (mul 0: size 1) */
    const void *q;
    int64_t q_stride0, q_stride1;
    void *o;
    int64_t o_stride0, o_stride1;
    float *lse;                                   /* [total_q, Hq] or NULL */
    float *part_o, *part_lse;                     /* split partials [splits, total_q, Hq, D] and [splits, total_q, Hq] */
    int32_t q_elem;                               /* QA_ELEM_* of Q and O */
    int32_t splits, pages_per_split, q_tiles, row_warps; /* row_warps: warps along query rows (1, 2 or 4) */
    int32_t causal, need_lo;                      /* need_lo: Q does not fit the MMA operand type: add a low part */
    float scale_log2;                             /* sm_scale * log2(e) */
    const uint32_t *status;
    /* Page selection (plan->select): each (b, hk)'s selected pages, compacted:
     * counts [B * Hkv] and their physical pages [B * Hkv][max_pages]; NULL: every page. */
    const int32_t *sel_counts, *sel_phys;
} qa_paged_attn_params;

/* ------------------------------------------------- decode-time pruning */

#define QA_SELECT_CHUNK_PAGES 64 /* at most this many pages per block of the selection's scoring kernel */
#define QA_SELECT_SCORE_ROWS 64  /* query rows of a (b, hk) a scoring block holds at once */
#define QA_SELECT_SMEM_KEYS 8192 /* candidates the top-k block keeps in shared memory (else it reads them again) */

/* kv_append's metadata pass: one warp per (token that starts a run of slots in a page, KV head). */
typedef struct qa_meta_params {
    const int64_t *slots;
    int64_t num_tokens, capacity;
    const uint8_t *k;
    const float *k_scale;
    uint8_t *meta;
    int64_t scale_offset;                          /* INT8 per row: byte offset of the page scales in meta */
    int64_t page_stride, tok_stride, head_stride;
    int32_t heads_kv, head_dim, page_size, cache_format;
} qa_meta_params;

/* The page selection of a paged plan (scoring, top-k, adaptive budget). */
typedef struct qa_select_params {
    qa_paged_tables tab;
    const uint8_t *k;
    const float *k_scale;
    const uint8_t *meta;
    int64_t meta_scale_offset;
    int64_t page_stride, tok_stride, head_stride;
    int32_t heads_kv, group, head_dim, format;
    const void *q;
    int64_t q_stride0, q_stride1;
    int32_t q_elem;
    float sm_scale;
    /* qattn_select_problem */
    int32_t adaptive;
    int64_t budget_pages, sink_pages, recent_pages, max_budget_pages;
    float budget_fraction, epsilon;
    int32_t chunk_pages; /* pages per scoring block (16 to QA_SELECT_CHUNK_PAGES) */
    int32_t score_rows;  /* query rows a scoring block holds at once: min(group * max_q_len, QA_SELECT_SCORE_ROWS) */
    int32_t chunks;      /* scoring blocks per (b, hk): ceil(max_pages / chunk_pages) */
    uint32_t *keys;      /* [B * Hkv][max_pages]: order-preserving keys of the pages' scores */
    int32_t *counts;     /* ws.select_counts */
    int32_t *pages;      /* ws.select_pages: logical pages, ascending */
    int32_t *phys;       /* [B * Hkv][max_pages]: their physical pages */
    float *ub, *lb;      /* adaptive: one query row's bounds per page [B * Hkv][max_pages] */
    const uint32_t *status;
} qa_select_params;

/* qattn_paged_page_mass: one block per (b, hk, logical page). */
typedef struct qa_mass_params {
    qa_paged_tables tab;
    const uint8_t *k;
    const float *k_scale;
    int64_t page_stride, tok_stride, head_stride;
    int32_t heads_kv, group, heads_q, head_dim, format, causal;
    const void *q;
    int64_t q_stride0, q_stride1;
    int32_t q_elem;
    float sm_scale;
    const float *lse;
    float *mass;
} qa_mass_params;

typedef struct qa_paged_check_params {
    qa_paged_tables tab;
    const void *q;
    int64_t q_stride0, q_stride1;
    int32_t q_elem, heads_q, head_dim;
    uint32_t *status;
} qa_paged_check_params;

/* Merges S attention states per (row, head): split-KV partials and qattn_merge_states. */
typedef struct qa_merge_params {
    const void *v;
    int64_t v_stride[3]; /* state, row, head */
    const float *s;
    int64_t s_stride[3];
    void *o;
    int64_t o_stride[2]; /* row, head */
    float *lse;          /* [rows, heads] contiguous, or NULL */
    int32_t v_elem, o_elem;
    int32_t states, heads, head_dim;
    int64_t rows;
    const int32_t *qo_indptr; /* paged split merge: only rows qo_indptr[0] .. qo_indptr[batch] */
    int32_t batch;
    const uint32_t *status;
} qa_merge_params;

/* qattn_kv_append: the check flags bad slots, bad per-head scales and
 * non-finite new tokens in `status`; the write runs after the host read them clear. */
typedef struct qa_append_params {
    const int64_t *slots;
    int64_t num_tokens, capacity;
    const void *k_new, *v_new;
    int64_t new_stride0, new_stride1;
    int32_t new_elem, heads_kv, head_dim, page_size;
    int32_t cache_format; /* qattn_kv_format */
    uint8_t *k, *v;
    float *k_scale, *v_scale;
    int64_t page_stride, tok_stride, head_stride;
    uint32_t *status;
} qa_append_params;

/* ---------------------------------------------------------- the runtime */

/* A device as the planner and qattn-info see it. */
typedef struct qa_device_props {
    char name[256];
    int cc; /* compute capability, major * 10 + minor */
    int sms;
    uint64_t memory_bytes;
    size_t smem_per_block_optin;
    int l2_bytes;
    int driver_version, runtime_version; /* 0 where there is none (the emulator) */
} qa_device_props;

/* A runtime error code's meaning: its text, whether it leaves the CUDA
 * context unusable (sticky: illegal address, launch failure, ...) and
 * whether memory ran out. */
typedef struct qa_rt_error {
    const char *text;
    bool sticky, out_of_memory;
} qa_rt_error;

/*
 * Every CUDA call of the host code. Functions returning int give 0 on
 * success, else a runtime error code for `explain`. Streams are
 * cudaStream_t (NULL: the legacy default stream); the emulator runs
 * everything at once on the calling thread.
 */
typedef struct qa_rt {
    const char *backend_name; /* "cuda" or "cuda-emu" */
    int sm90a_kernels;        /* carries the sm_90a wgmma kernels (hopper/) */
    qa_rt_error (*explain)(int code);
    int (*last_error)(void); /* the pending error of earlier work, cleared unless sticky */

    int (*device_count)(int *count);
    int (*device_props)(int device, qa_device_props *props);
    int (*set_device)(int device);
    int (*create_context)(void); /* the current device's context, so the first run does not pay for it */
    int (*device_synchronize)(void);

    int (*malloc)(void **ptr, size_t bytes);
    void (*free)(void *ptr);
    /* The device `ptr` lives on, or -1 when it is not device (or managed) memory. */
    int (*pointer_device)(const void *ptr, int *device);
    int (*copy_to_device)(void *dst, const void *src, size_t bytes);
    int (*copy_to_host)(void *dst, const void *src, size_t bytes);
    int (*memset_async)(void *dst, int value, size_t bytes, void *stream);
    /* Device -> host copy on the stream, then waits for the stream. */
    int (*read_sync)(void *dst, const void *src, size_t bytes, void *stream);
    int (*stream_synchronize)(void *stream);

    /* Dense attention (cuda_launch.cuh): raises the plan's kernels'
     * shared-memory limits; enqueues quantization or the finite scan, then
     * attention. enqueue returns NULL, or what failed (then last_error says why). */
    int (*dense_prepare)(const qattn_plan *plan);
    const char *(*dense_enqueue)(const qattn_plan *plan, const qa_dense_args *args, void *stream);

    /* The paged kernels (cuda_paged_kernels.cuh). paged_prepare raises the
     * attention kernel's shared-memory limit and reports its bytes and the
     * blocks per SM that fit. */
    int (*paged_prepare)(int format, int head_dim, int row_warps, int need_lo, int *smem, int *blocks_per_sm);
    int (*paged_attention)(int format, int head_dim, long long grid, const qa_paged_attn_params *p, void *stream);
    int (*paged_check)(long long grid, const qa_paged_check_params *p, void *stream);
    int (*merge)(long long grid, const qa_merge_params *p, void *stream);
    int (*append_check)(long long grid, long long dup_blocks, const qa_append_params *p, void *stream);
    int (*append_write)(long long grid, const qa_append_params *p, void *stream);
    /* Device address of the append check's QATTN_STATUS_WORDS (static device memory; NULL on failure). */
    uint32_t *(*append_status)(void);
    /* Decode-time pruning (cuda_prune.cuh). */
    int (*meta_update)(long long grid, const qa_meta_params *p, void *stream);
    int (*select_score)(long long grid, const qa_select_params *p, void *stream);
    int (*select_topk)(long long grid, const qa_select_params *p, void *stream);
    int (*page_mass)(long long grid, const qa_mass_params *p, void *stream);
} qa_rt;

extern const qa_rt qa_rt_cuda;     /* cuda_rt.cu: built with nvcc */
extern const qa_rt qa_rt_emulated; /* emu/cuda_emu_rt.cpp: the test programs only */

/* ----------------------------------------------------------- host code */

typedef struct qa_ctx {
    const qa_rt *rt;
    int cc; /* compute capability, major * 10 + minor */
} qa_ctx;

static inline const qa_rt *qa_rt_of(const qattn_ctx *ctx) { return ((const qa_ctx *)ctx->impl)->rt; }

/* Records the failed runtime call's error as the context's (out of memory,
 * device lost when sticky, else a backend error); returns the status. */
static inline qattn_status qa_fail(qattn_ctx *ctx, int code, const char *what)
{
    const qa_rt_error e = qa_rt_of(ctx)->explain(code);
    const qattn_status s = e.out_of_memory ? QATTN_ERR_OUT_OF_MEMORY
                           : e.sticky      ? QATTN_ERR_DEVICE_LOST
                                           : QATTN_ERR_BACKEND;
    return qattn_set_error(ctx, s, "%s: %s%s", what, e.text, e.sticky ? "; the CUDA context is unusable" : "");
}

/* Selects the context's device. */
static inline qattn_status qa_use_device(qattn_ctx *ctx)
{
    int e = qa_rt_of(ctx)->set_device(ctx->device);
    return e ? qa_fail(ctx, e, "cudaSetDevice") : QATTN_OK;
}

/* Selects the context's device and refuses to start over an earlier error. */
static inline qattn_status qa_enter(qattn_ctx *ctx)
{
    qattn_status s = qa_use_device(ctx);
    if (s)
        return s;
    int e = qa_rt_of(ctx)->last_error();
    return e ? qa_fail(ctx, e, "an earlier CUDA error was pending") : QATTN_OK;
}

/* The backend's entry points over a runtime (cuda_backend.c, cuda_attention.c, cuda_paged.c). */
qattn_status qa_probe(const qa_rt *rt, int *device_count, char *reason, size_t reason_len);
qattn_status qa_device_info(const qa_rt *rt, int device, qattn_device_info *info, char *reason, size_t reason_len);
qattn_status qa_ctx_init(const qa_rt *rt, qattn_ctx *ctx);
void qa_ctx_release(qattn_ctx *ctx);
qattn_status qa_synchronize(qattn_ctx *ctx);
qattn_status qa_buffer_alloc(qattn_ctx *ctx, qattn_buffer *buf);
qattn_status qa_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native);
void qa_buffer_release(qattn_ctx *ctx, qattn_buffer *buf);
qattn_status qa_buffer_upload(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes);
qattn_status qa_buffer_download(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst, size_t bytes);
qattn_status qa_buffer_fill(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value);
qattn_status qa_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status qa_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run);
qattn_status qa_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status qa_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status qa_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status qa_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);
qattn_status qa_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args,
                                qattn_buffer *mass, size_t mass_offset);

/* The vtable slots the real and the emulated backend share; each adds its
 * name, score, probe, device_info and ctx_init bound to its runtime. */
#define QA_BACKEND_SHARED_SLOTS                                                                                        \
    .api_version = QATTN_BACKEND_API_VERSION, .ctx_release = qa_ctx_release, .synchronize = qa_synchronize,           \
    .buffer_alloc = qa_buffer_alloc, .buffer_wrap = qa_buffer_wrap, .buffer_release = qa_buffer_release,               \
    .buffer_upload = qa_buffer_upload, .buffer_download = qa_buffer_download, .buffer_fill = qa_buffer_fill,           \
    .plan_init = qa_plan_init, .run = qa_run, .tensor_alignment = QA_ALIGN, .kv_append = qa_kv_append,                \
    .paged_plan_init = qa_paged_plan_init, .paged_run = qa_paged_run, .merge_states = qa_merge_states,          \
    .sparse = QA_SPARSE_CAPS, .prune = QA_PRUNE_CAPS, .paged_page_mass = qa_paged_page_mass

/* What of a sparse plan the backend runs (with QATTN_CUDA_SPARSE=1; plan_init refuses sparse plans without it). */
#define QA_SPARSE_CAPS                                                                                                 \
    (QATTN_SPARSE_CAP_WINDOW | QATTN_SPARSE_CAP_BLOCKS | QATTN_SPARSE_CAP_PREDICT | QATTN_SPARSE_CAP_PV_SKIP)

/* Decode-time pruning: all of it. The real backend runs it with QATTN_CUDA_PRUNE=1 only (cuda-emu always):
 * without it kv_append with k_meta, selection plans and page masses return QATTN_ERR_UNSUPPORTED. */
#define QA_PRUNE_CAPS                                                                                                  \
    (QATTN_PRUNE_CAP_META | QATTN_PRUNE_CAP_SELECT | QATTN_PRUNE_CAP_ADAPTIVE | QATTN_PRUNE_CAP_PAGE_MASS)

#ifdef __cplusplus
}
#endif

#endif
