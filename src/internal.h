/*
 * qattn internals shared by the core and the backends. Not installed.
 *
 * The core validates every request before a backend sees it: a backend's
 * plan_init receives a problem whose shapes, strides, dtypes and sizes are
 * consistent and whose byte extents fit in size_t; its run receives buffers
 * whose extents were checked against the plan.
 */
#ifndef QATTN_INTERNAL_H
#define QATTN_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qattn/qattn.h"

#ifdef __cplusplus
extern "C" {
#endif

#define QATTN_BACKEND_API_VERSION 2
#define QATTN_ERROR_MAX 2048
#define QATTN_WS_ALIGN 256 /* every workspace region starts on this boundary */
#define QATTN_WS_ABSENT SIZE_MAX

/* ----------------------------------------------------- small helpers */

#define QATTN_LOG2E 1.4426950408889634 /* log2(e): softmax in base 2 */

static inline int64_t qattn_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline size_t qattn_round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }
static inline int64_t qattn_min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t qattn_clamp_i64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* Quantization groups (and appended rows) whose max |x| is below this, and
 * per-head scales below it, quantize to zero with a zero scale: the inverse
 * scale of a smaller one overflows (448 / 1.3e-36 > FLT_MAX), which turned
 * finite inputs into NaN. 2^-100, in every quantizer of every backend (GLSL
 * and OpenCL C mirror its bits, 0x0d800000). */
#define QATTN_QUANT_MIN_AMAX 0x1p-100f

/* Kernels fold sm_scale * log2(e) into one fp32 factor applied to Q: a scale
 * whose factor overflows (|sm_scale| > FLT_MAX / log2(e) = 2.36e38) made
 * every score Inf or NaN whatever the data. Validation refuses beyond this. */
#define QATTN_SM_SCALE_MAX 2.3e38f

/* ------------------------------------------------------- status words */

/*
 * A run or append with its checks on leaves QATTN_STATUS_BYTES of status words
 * in device memory (the workspace's `status` region, or the backend's own for
 * an append): zeroed before the checks, read back by the host afterwards.
 *   word QATTN_STATUS_NONFINITE: QATTN_NONFINITE_* bits of the inputs holding NaN or Inf;
 *   word QATTN_STATUS_BOUNDS:    non-zero when an index (a page-table entry, a
 *                                slot) or a per-head scale is out of bounds.
 * Kernels write no output once either word is set. Devices only flag; the
 * core names the offending entry from host copies (qattn_paged_status_error,
 * qattn_kv_append_status_error), so every backend reports it in the same words.
 */
enum { QATTN_STATUS_NONFINITE = 0, QATTN_STATUS_BOUNDS = 1, QATTN_STATUS_WORDS = 4 };
#define QATTN_STATUS_BYTES 16

/* --------------------------------------------------------------- problem */

/* A validated attention problem. Strides are in elements, [b, h, n, d]. */
typedef struct qattn_problem {
    int64_t batch, heads_q, heads_kv, seq_q, seq_k, head_dim;
    int64_t group; /* heads_q / heads_kv */
    qattn_dtype in_dtype, out_dtype;
    int64_t q_stride[4], k_stride[4], v_stride[4], o_stride[4];
    size_t q_bytes, k_bytes, v_bytes, o_bytes, lse_bytes; /* extents from the first element */
    bool causal, return_lse, check_finite;
    float sm_scale;
} qattn_problem;

/* First key index that query row i may NOT see (exclusive end) under the
 * bottom-right causal mask; seq_k when not causal. May be <= 0. */
static inline int64_t qattn_causal_key_end(const qattn_problem *p, int64_t i)
{
    if (!p->causal)
        return p->seq_k;
    int64_t end = i + 1 + (p->seq_k - p->seq_q);
    return end < p->seq_k ? end : p->seq_k;
}

/* A validated qattn_sparse_desc (see qattn.h); `enabled` false for dense plans. */
typedef struct qattn_sparse_problem {
    bool enabled;
    bool window;
    int64_t window_left, window_right, sink_tokens; /* -1: unbounded side */
    qattn_sparse_layout_kind layout;
    int64_t q_block, k_block;   /* layout block sizes (0 without a layout) */
    int64_t q_blocks, k_blocks; /* ceil(Nq / q_block), ceil(Nk / k_block) */
    int64_t rows;               /* B * Hkv * q_blocks */
    float sim_threshold, cdf_threshold, topk, pv_threshold;
    int64_t sink_blocks, recent_blocks, last_q_blocks;
} qattn_sparse_problem;

/* Row r of a layout as every backend's kernels read it: a user's block CSR
 * (stride 0: indices[ptr[r] .. ptr[r + 1]) of count entries) or a predicted
 * layout's fixed-stride rows (stride k_blocks: indices[r * stride .. +
 * ptr[r]), ptr holding counts). Clamped, so that an unchecked layout reads
 * inside its buffers. */
static inline void qattn_sparse_layout_row(const int32_t *ptr, int64_t stride, int64_t count, int64_t r,
                                           int64_t *begin, int64_t *end)
{
    if (stride > 0) {
        *begin = r * stride;
        *end = *begin + (ptr[r] < 0 ? 0 : ptr[r] > stride ? stride : ptr[r]);
    } else {
        *begin = ptr[r] < 0 ? 0 : ptr[r] > count ? count : ptr[r];
        *end = ptr[r + 1] < *begin ? *begin : ptr[r + 1] > count ? count : ptr[r + 1];
    }
}

/* Rows of one 16-row group share the pv_threshold decision on every backend. */
#define QATTN_SPARSE_PV_GROUP 16

/* Keys query row i sees under causal + window (not the layout): the interval
 * [*lo, *hi) and the sinks [0, *sink_end) (sink_end <= lo when they merge or
 * there are none). Either interval may be empty. */
static inline void qattn_sparse_row_keys(const qattn_problem *p, const qattn_sparse_problem *sp, int64_t i,
                                         int64_t *lo, int64_t *hi, int64_t *sink_end)
{
    const int64_t place = i + p->seq_k - p->seq_q;
    int64_t end = p->seq_k, begin = 0, sinks = 0;
    if (p->causal && place + 1 < end)
        end = place + 1;
    if (sp->window) {
        if (sp->window_right >= 0 && place + sp->window_right + 1 < end)
            end = place + sp->window_right + 1;
        if (sp->window_left >= 0 && place - sp->window_left > 0)
            begin = place - sp->window_left;
        sinks = sp->sink_tokens;
        const int64_t causal_end = p->causal && place + 1 < p->seq_k ? place + 1 : p->seq_k;
        if (sinks > causal_end)
            sinks = causal_end;
    }
    if (end < begin)
        end = begin;
    if (sinks >= begin) { /* the sinks reach the window: one interval */
        begin = 0;
        end = sinks > end ? sinks : end;
        sinks = 0;
    }
    *lo = begin;
    *hi = end;
    *sink_end = sinks;
}

/* Quantization geometry, see qattn_plan_info. */
typedef struct qattn_quant_params {
    int q_block, q_interleave;
    int k_block, k_interleave;
    float v_fp8_max;   /* 448 (INT8_FP8) or 2.25 (F16ACC) */
    float p_fp8_scale; /* 448 */
    int pv_f16_chunk;  /* F16ACC: keys per exact partial sum before fp16 accumulation */
    bool smooth_k;
} qattn_quant_params;

/* Number of INT8 scale groups per head for n tokens. */
static inline int64_t qattn_quant_groups(int64_t n, int block, int interleave)
{
    return ((n + block - 1) / block) * interleave;
}
/* Scale-group index of token t. */
static inline int64_t qattn_quant_group_of(int64_t t, int block, int interleave)
{
    return (t / block) * interleave + (t % block) % interleave;
}

/*
 * Workspace layout of the quantized modes, byte offsets from the workspace
 * start (QATTN_WS_ABSENT when a region is not used). All regions are dense:
 *   q_i8     int8  [B, Hq,  Nq, D]
 *   k_i8     int8  [B, Hkv, Nk, D]
 *   v_q      INT8_FP8*: fp8 codes [B, Hkv, D, Nk_pad] (transposed, keys padded to
 *            v_key_pad so P.V tiles load whole rows); INT8_FP16: fp16 [B, Hkv, Nk, D]
 *   q_scale  f32   [B, Hq,  q_groups]
 *   k_scale  f32   [B, Hkv, k_groups]
 *   v_scale  f32   [B, Hkv, D]        (FP8 modes)
 *   k_mean   f32   [B, Hkv, D]        (smooth K)
 *   q_kmean  f32   [B, Hq,  Nq]       sm_scale * dot(q_i, mean_k): the LSE correction
 *   status   u32   [4]                finite-check flag and spare words
 *   backend  extra bytes the backend asked for
 */
typedef struct qattn_workspace_layout {
    size_t q_i8, k_i8, v_q, q_scale, k_scale, v_scale, k_mean, q_kmean, status, backend;
    /* QATTN_SPARSE_PREDICT: the predicted layout in fixed-stride rows (int32
     * counts [rows], indices [rows][k_blocks]: row r is indices[r * k_blocks
     * .. + counts[r]), so that kernels write rows independently; see
     * qattn_sparse_layout_row), the density per (b, hkv) (f32),
     * and the pooled blocks: mean of each Q block [B, Hq, q_blocks, D] and K
     * block [B, Hkv, k_blocks, D] (f32), and their mean pairwise cosine
     * [B, Hq, q_blocks] and [B, Hkv, k_blocks] (f32). */
    size_t sparse_counts, sparse_indices, sparse_density, sparse_q_pool, sparse_k_pool, sparse_q_sim, sparse_k_sim;
    /* Paged plans with page selection: int32 counts [B * Hkv] and logical
     * pages [B * Hkv][max_pages_per_seq] (see qattn_select_problem). */
    size_t select_counts, select_pages;
    size_t total;
    int64_t q_groups, k_groups, v_key_pad, v_keys_padded;
} qattn_workspace_layout;

/* ----------------------------------------------------------------- objects */

typedef struct qattn_backend_iface qattn_backend_iface;

struct qattn_ctx {
    const qattn_backend_iface *backend;
    void *impl;          /* the backend's context */
    int device;
    int num_threads;
    qattn_device_info device_info;
    void *error_lock;    /* mtx_t*, owned by the core */
    char error[QATTN_ERROR_MAX];
};

struct qattn_buffer {
    qattn_ctx *ctx;
    size_t size;
    void *impl;          /* the backend's handle */
    void *host;          /* host address when the memory is host memory, else NULL */
    /* Where the memory lives, set by the backend, so that the overlap checks
     * see two buffers over the same memory: buffers with the same non-NULL
     * alias_space index one memory, and alias_base is the first byte's place
     * in it. CPU and CUDA: QATTN_PROCESS_ADDRESSES and the (unified) address;
     * OpenCL: the root cl_mem and the sub-buffer's origin. */
    const void *alias_space;
    uintptr_t alias_base;
    bool wrapped;
};

/* A validated paged-attention problem (see qattn_paged_desc). */
typedef struct qattn_paged_problem {
    qattn_kv_cache_desc cache;
    qattn_kv_cache_sizes sizes;
    qattn_page_table_kind table;
    int64_t batch, max_pages_per_seq, total_q, max_q_len, heads_q, group;
    qattn_dtype q_dtype;
    int64_t q_stride[2], o_stride[2];
    size_t q_bytes, o_bytes, lse_bytes;
    bool causal, return_lse, check;
    float sm_scale;
    int num_splits;  /* requested (0: decide); the backend stores its choice */
} qattn_paged_problem;

/* The page formats the paged kernels are made for; every backend's kernels
 * number them this way (CUDA, GLSL and OpenCL C mirror the values). */
typedef enum qattn_kv_format {
    QATTN_KV_FMT_F16 = 0,
    QATTN_KV_FMT_BF16 = 1,
    QATTN_KV_FMT_FP8 = 2,    /* E4M3 codes, a scale per KV head */
    QATTN_KV_FMT_I8 = 3,     /* INT8 codes, a scale per KV head */
    QATTN_KV_FMT_I8_ROW = 4, /* INT8 codes, a scale per (token, head) */
    QATTN_KV_FMT_COUNT = 5
} qattn_kv_format;

static inline qattn_kv_format qattn_kv_format_of(const qattn_kv_cache_desc *c)
{
    switch (c->dtype) {
    case QATTN_DTYPE_F16: return QATTN_KV_FMT_F16;
    case QATTN_DTYPE_BF16: return QATTN_KV_FMT_BF16;
    case QATTN_DTYPE_FP8_E4M3: return QATTN_KV_FMT_FP8;
    default: return c->scales == QATTN_KV_SCALES_PER_ROW ? QATTN_KV_FMT_I8_ROW : QATTN_KV_FMT_I8;
    }
}

/* Element strides of a validated cache: between pages, a page's tokens, and heads. */
static inline void qattn_kv_cache_strides(const qattn_kv_cache_desc *c, int64_t *page, int64_t *token, int64_t *head)
{
    *page = c->page_size * c->heads_kv * c->head_dim;
    *token = c->layout == QATTN_KV_NHD ? c->heads_kv * c->head_dim : c->head_dim;
    *head = c->layout == QATTN_KV_NHD ? c->head_dim : c->page_size * c->head_dim;
}

/* Key range of split s (of n) over a sequence bound of max_keys, in whole
 * pages so a split never straddles one: [begin, end). */
static inline void qattn_split_range(int64_t max_pages, int64_t page_size, int s, int n, int64_t *begin, int64_t *end)
{
    int64_t per = (max_pages + n - 1) / n;
    *begin = (int64_t)s * per * page_size;
    *end = ((int64_t)s + 1) * per * page_size;
}

/* The split count (1..1024) an automatic paged plan uses, for `items` work
 * groups per split of which `slots` run at once: it minimizes waves x (keys
 * per split + a group's start-up) plus a merge's cost. One copy, so that
 * every GPU backend chooses alike. */
int qattn_paged_choose_splits(int64_t items, int64_t slots, int64_t max_pages, int64_t page_size);

/* A validated qattn_page_select_desc (enabled false: no selection). Each
 * selection row r = b * Hkv + hk holds counts[r] logical page indices,
 * ascending, at pages[r * max_pages_per_seq ..] (workspace regions
 * select_counts and select_pages); attention reads the row's pages as if they
 * were the sequence's cache: kv_len' = (count - 1) * page_size + the last
 * page's tokens (the last page is always selected). */
typedef struct qattn_select_problem {
    bool enabled, adaptive;
    int64_t budget_pages;     /* > 0: fixed budget; 0: budget_fraction */
    float budget_fraction;
    int64_t sink_pages, recent_pages;
    float epsilon;
    int64_t max_budget_pages; /* adaptive cap (0: none) */
} qattn_select_problem;

/* One sequence's selection geometry (every backend computes it alike):
 * n pages, forced pages [0, *sinks) and [*recent_begin, n), the budget
 * *budget (forced pages included, clamped to [forced, n]) and, adaptive, the
 * cap *cap (>= budget). */
static inline void qattn_select_geometry(const qattn_select_problem *sel, int64_t page_size, int64_t kv_len,
                                         int64_t q_len, int64_t *sinks, int64_t *recent_begin, int64_t *budget,
                                         int64_t *cap)
{
    const int64_t n = (kv_len + page_size - 1) / page_size;
    int64_t s = sel->sink_pages < n ? sel->sink_pages : n;
    int64_t recent = sel->recent_pages > 1 ? sel->recent_pages : 1;
    int64_t rb = n - recent;
    int64_t first_q = kv_len - (q_len > 0 ? q_len : 0);
    first_q = first_q > 0 ? first_q / page_size : 0; /* the first page holding a query token */
    if (first_q < rb)
        rb = first_q;
    if (rb < 0)
        rb = 0;
    if (rb < s)
        s = rb; /* overlapping: the recent range covers the rest */
    const int64_t forced = s + (n - rb);
    int64_t k = sel->budget_pages;
    if (k <= 0) { /* ceil(fraction * n), without libm */
        const double want = (double)sel->budget_fraction * (double)n;
        k = (int64_t)want;
        k += (double)k < want;
    }
    k = k < forced ? forced : k > n ? n : k;
    int64_t c = sel->adaptive && sel->max_budget_pages > 0 ? sel->max_budget_pages : n;
    c = c < k ? k : c > n ? n : c;
    *sinks = s;
    *recent_begin = rb;
    *budget = k;
    *cap = sel->adaptive ? c : k;
}

struct qattn_plan {
    qattn_ctx *ctx;
    bool paged;                 /* a qattn_paged_plan_create plan: `pp` is set, `problem` is not */
    qattn_paged_problem pp;
    qattn_problem problem;
    qattn_sparse_problem sparse; /* qattn_sparse_plan_create's restriction (enabled false: dense); paged
                                    plans: a window and sinks (qattn_paged_sparse_plan_create) */
    qattn_select_problem select; /* paged plans: page selection (qattn_paged_select_plan_create) */
    qattn_precision precision;
    qattn_granularity granularity;
    qattn_quant_params quant;
    int q_tile, kv_tile;
    size_t backend_workspace; /* extra workspace the backend asked for */
    bool status_word;         /* the backend wants a device status word (finite check) */
    qattn_workspace_layout ws;
    char kernel[128];
    char why[512];
    void *impl;          /* the backend's plan */
};

/* Ends qattn_plan_create and qattn_paged_plan_create once the backend's
 * plan_init returned s: lays out the workspace, runs plan_finish, and hands
 * the plan out, or destroys it (through the backend's release) on failure. */
qattn_status qattn_plan_finish(qattn_plan *plan, qattn_status s, qattn_plan **out);

/* A run whose buffers the core has checked against the plan. */
typedef struct qattn_run_bound {
    qattn_buffer *q, *k, *v, *o, *lse, *workspace; /* lse, workspace may be NULL */
    size_t q_offset, k_offset, v_offset, o_offset, lse_offset, workspace_offset;
    void *stream;
    /* QATTN_SPARSE_BLOCKS plans: the layout, checked unless the plan skips
     * checks (then its entries may be anything; kernels clamp). */
    qattn_buffer *block_indptr, *block_indices;
    int64_t block_count;
} qattn_run_bound;

/* Parts of qattn_sparse_desc a backend runs (qattn_backend_iface.sparse). */
enum {
    QATTN_SPARSE_CAP_WINDOW = 1u << 0,  /* window and sinks */
    QATTN_SPARSE_CAP_BLOCKS = 1u << 1,  /* user block layouts */
    QATTN_SPARSE_CAP_PREDICT = 1u << 2, /* predicted layouts */
    QATTN_SPARSE_CAP_PV_SKIP = 1u << 3, /* pv_threshold */
    QATTN_SPARSE_CAP_PAGED_WINDOW = 1u << 4 /* window and sinks on paged plans (plan->sparse of a paged plan) */
};

/* Parts of decode-time pruning a backend runs (qattn_backend_iface.prune). */
enum {
    QATTN_PRUNE_CAP_META = 1u << 0,      /* kv_append keeps buffers->k_meta */
    QATTN_PRUNE_CAP_SELECT = 1u << 1,    /* paged plans with a fixed-budget page selection */
    QATTN_PRUNE_CAP_ADAPTIVE = 1u << 2,  /* ... and the adaptive budget (epsilon > 0) */
    QATTN_PRUNE_CAP_PAGE_MASS = 1u << 3  /* paged_page_mass */
};

/* ----------------------------------------------------------------- vtable */

/*
 * One backend. Every slot is required unless marked optional. Functions
 * that fail set the context's error with qattn_set_error() and return its
 * status; the core adds nothing to a backend's message.
 */
struct qattn_backend_iface {
    int api_version; /* QATTN_BACKEND_API_VERSION */
    const char *name;
    int score;       /* auto picks the usable backend with the highest score */
    /* Optional: the score auto uses on this machine (e.g. lower than the CPU
     * backend's when the only devices are CPU implementations); NULL: score. */
    int (*auto_score)(void);

    /* Whether the backend can run here. Fills device_count, or reason. */
    qattn_status (*probe)(int *device_count, char *reason, size_t reason_len);
    qattn_status (*device_info)(int device, qattn_device_info *info, char *reason, size_t reason_len);

    qattn_status (*ctx_init)(qattn_ctx *ctx);    /* sets ctx->impl */
    void (*ctx_release)(qattn_ctx *ctx);
    qattn_status (*synchronize)(qattn_ctx *ctx);

    qattn_status (*buffer_alloc)(qattn_ctx *ctx, qattn_buffer *buf);               /* sets impl (and host) */
    qattn_status (*buffer_wrap)(qattn_ctx *ctx, qattn_buffer *buf, void *native); /* optional */
    void (*buffer_release)(qattn_ctx *ctx, qattn_buffer *buf);
    qattn_status (*buffer_upload)(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes);
    qattn_status (*buffer_download)(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst, size_t bytes);
    qattn_status (*buffer_fill)(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value);

    /*
     * Chooses the kernel for a validated problem. On entry plan->precision is
     * the requested mode (maybe AUTO) and plan->granularity the requested one
     * (maybe DEFAULT); the backend resolves both (AUTO and DEFAULT never leave
     * here), fills quant (qattn_quant_defaults helps), tiles, kernel, why and
     * backend_workspace, and may set impl. Unsupported: QATTN_ERR_UNSUPPORTED
     * with a message. The core lays out the workspace afterwards (plan->ws).
     */
    qattn_status (*plan_init)(qattn_ctx *ctx, qattn_plan *plan);
    /* Optional: runs once plan->ws is laid out, for what depends on its
     * offsets (parameter buffers, descriptor sets). Plain plans only: paged
     * kernels take their workspace offsets as run arguments. */
    qattn_status (*plan_finish)(qattn_ctx *ctx, qattn_plan *plan);
    /* Optional: frees plan->impl of a plain plan. The core also calls it when
     * plan_init or plan_finish failed, so it must accept a partly made impl. */
    void (*plan_release)(qattn_ctx *ctx, qattn_plan *plan);

    qattn_status (*run)(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run);

    /* Required byte alignment of tensor bases and of row strides*elem size. */
    size_t tensor_alignment;

    /* QATTN_SPARSE_CAP_* bits: what of qattn_sparse_plan_create the plain
     * plan_init and run handle (plan->sparse); the core refuses the rest. */
    uint32_t sparse;

    /* Optional (NULL: QATTN_ERR_UNSUPPORTED): the paged KV cache. Arguments
     * arrive validated (src/paged.c). */
    qattn_status (*kv_append)(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
    qattn_status (*paged_plan_init)(qattn_ctx *ctx, qattn_plan *plan); /* sets num_splits, tiles, kernel, ... */
    void (*paged_plan_release)(qattn_ctx *ctx, qattn_plan *plan);       /* optional; as plan_release */
    qattn_status (*paged_run)(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
    qattn_status (*merge_states)(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

    /* QATTN_PRUNE_CAP_* bits: what of decode-time pruning kv_append,
     * paged_plan_init/paged_run (plan->select) and paged_page_mass handle;
     * the core refuses the rest with QATTN_ERR_UNSUPPORTED. */
    uint32_t prune;
    /* Optional (QATTN_PRUNE_CAP_PAGE_MASS): qattn_paged_page_mass, arguments checked. */
    qattn_status (*paged_page_mass)(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args,
                                    qattn_buffer *mass, size_t mass_offset);
};

/* Backends compiled in (NULL when not built). */
extern const qattn_backend_iface qattn_backend_cpu;
#if QATTN_WITH_CUDA
extern const qattn_backend_iface qattn_backend_cuda;
#endif
#if QATTN_WITH_VULKAN
extern const qattn_backend_iface qattn_backend_vulkan;
#endif
#if QATTN_WITH_OPENCL
extern const qattn_backend_iface qattn_backend_opencl;
#endif

/* ----------------------------------------------------------------- helpers */

/* Records a formatted message for ctx (and the calling thread); returns status. */
qattn_status qattn_set_error(qattn_ctx *ctx, qattn_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
qattn_status qattn_set_errorv(qattn_ctx *ctx, qattn_status status, const char *fmt, va_list ap);
void qattn_clear_error(qattn_ctx *ctx);

/* Which inputs the finite check found NaN or Inf in (bit i: q, k, v; the
 * new tokens of an append). Devices set these bits in QATTN_STATUS_NONFINITE. */
enum {
    QATTN_NONFINITE_Q = 1u << 0,
    QATTN_NONFINITE_K = 1u << 1,
    QATTN_NONFINITE_V = 1u << 2,
    QATTN_NONFINITE_NEW_KV = 1u << 3 /* k_new or v_new of qattn_kv_append */
};
/* Records QATTN_ERR_NONFINITE_INPUT with the message every backend gives for
 * a failed finite check (naming the flagged inputs); returns that status. One
 * helper so that the wording, which tests and users match, cannot drift. */
qattn_status qattn_nonfinite_error(qattn_ctx *ctx, uint32_t flags);

/* ------------------------------------- checks of indices (src/checks.c) */

/* A run's page tables in host memory (NULL where the table kind has none). */
typedef struct qattn_page_tables {
    const int32_t *qo_indptr;
    const int32_t *block_table, *seq_lens;           /* DENSE */
    const int32_t *indptr, *indices, *last_page_len; /* CSR */
    int64_t indices_count;                           /* entries the indices buffer holds */
} qattn_page_tables;

/* Of checked tables: the cache page holding sequence b's i-th page of keys, and its key count. */
static inline int64_t qattn_table_page(const qattn_paged_problem *pp, const qattn_page_tables *t, int64_t b, int64_t i)
{
    return pp->table == QATTN_PAGES_DENSE ? t->block_table[b * pp->max_pages_per_seq + i] : t->indices[t->indptr[b] + i];
}
static inline int64_t qattn_table_kv_len(const qattn_paged_problem *pp, const qattn_page_tables *t, int64_t b)
{
    if (pp->table == QATTN_PAGES_DENSE)
        return t->seq_lens[b];
    const int64_t pages = t->indptr[b + 1] - t->indptr[b];
    return pages == 0 ? 0 : (pages - 1) * pp->cache.page_size + t->last_page_len[b];
}

/* Bytes of the split-KV partials every backend keeps in its workspace: O
 * [splits, total_q, Hq, D] and LSE [splits, total_q, Hq], fp32; 0 for one
 * split. Refuses a size that overflows size_t. */
qattn_status qattn_paged_partials_bytes(qattn_ctx *ctx, const qattn_paged_problem *pp, size_t *bytes);

/* Checks a paged run's tables; the error names the first bad entry. A
 * backend whose tables live in host memory calls it before its kernels. */
qattn_status qattn_paged_check_tables(qattn_ctx *ctx, const qattn_paged_problem *pp, const qattn_page_tables *t);

/* An append's checks, in the order every backend reports them: slots (in the
 * cache or negative, none twice), then the finite check's flags (nonfinite:
 * QATTN_NONFINITE_NEW_KV or 0), then the per-head scales (finite and > 0).
 * slots or the scales may be NULL to skip that part. */
qattn_status qattn_kv_append_check(qattn_ctx *ctx, const qattn_kv_append_args *args, const int64_t *slots,
                                   uint32_t nonfinite, const float *k_scale, const float *v_scale);

/* After a checked paged run or append whose status words (QATTN_STATUS_*)
 * say something is wrong: downloads the indices involved and returns the
 * error that names the first bad entry (QATTN_OK when the words are clear). */
qattn_status qattn_paged_status_error(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args,
                                      const uint32_t words[QATTN_STATUS_WORDS]);
qattn_status qattn_kv_append_status_error(qattn_ctx *ctx, const qattn_kv_append_args *args,
                                          const uint32_t words[QATTN_STATUS_WORDS]);

/* ------------------------------ decode-time pruning (src/prune.c) */

/* qattn_paged_plan_create with an optional window/sinks and page selection. */
qattn_status qattn_paged_plan_create_internal(qattn_ctx *ctx, const qattn_paged_desc *desc,
                                              const qattn_sparse_desc *sparse, const qattn_select_problem *select,
                                              qattn_plan **out);
/* qattn_paged_run's checks of its arguments against the plan (buffers present,
 * of this context, large enough, aligned), without the aliasing rule. */
qattn_status qattn_paged_check_args(const qattn_plan *plan, const qattn_paged_args *args);

/* Sizes of the k_meta buffer (see qattn_kv_meta_bytes); validates the cache desc. */
qattn_status qattn_kv_meta_validate(qattn_ctx *ctx, const qattn_kv_cache_desc *desc, qattn_kv_meta_sizes *sizes);
/* Bytes of one metadata element: 2 for f16/bf16 pages, 1 for FP8 and INT8. */
static inline size_t qattn_kv_meta_elem(const qattn_kv_cache_desc *c)
{
    return c->dtype == QATTN_DTYPE_F16 || c->dtype == QATTN_DTYPE_BF16 ? 2 : 1;
}

/* Recomputes the metadata of (page, head) from its page_size slots (host
 * memory: the CPU backend's path and the tests' reference). k: the cache's K
 * pages; k_scale: its scales (NULL when unscaled); meta: the k_meta buffer. */
void qattn_kv_meta_update_host(const qattn_kv_cache_desc *c, const void *k, const float *k_scale, void *meta,
                               int64_t page, int64_t head);
/* The dequantized minimum and maximum rows of (page, head): lo[D], hi[D]. */
void qattn_kv_meta_read_host(const qattn_kv_cache_desc *c, const void *meta, const float *k_scale, int64_t page,
                             int64_t head, float *lo, float *hi);

/* The selection of a paged plan from host copies (q with the plan's strides,
 * checked tables, the metadata and the K scales): fills counts [B * Hkv] and
 * pages [B * Hkv][max_pages_per_seq]. The CPU backend's path and the
 * reference other backends are checked against. QATTN_ERR_OUT_OF_MEMORY when
 * its scratch fails (nothing written). */
qattn_status qattn_select_pages_host(qattn_ctx *ctx, const qattn_plan *plan, const void *q, const qattn_page_tables *t,
                                     const void *k, const void *meta, const float *k_scale, int32_t *counts,
                                     int32_t *pages, int threads);
/* Adaptive selection: the selected full pages (best by bound) whose keys are
 * read for an exact lower bound on the read weight, per query row and head. */
#define QATTN_SELECT_EXACT_PAGES 4

/* ------------------------------------ sparse attention (src/sparse.c) */

/* Validates sparse against a validated problem into sp, refusing what the
 * context's backend does not run (QATTN_ERR_UNSUPPORTED). */
qattn_status qattn_sparse_validate(qattn_ctx *ctx, const qattn_problem *p, const qattn_sparse_desc *sparse,
                                   qattn_sparse_problem *sp);
/* qattn_plan_create with an optional restriction (NULL: dense). */
qattn_status qattn_plan_create_sparse_internal(qattn_ctx *ctx, const qattn_attention_desc *desc,
                                               const qattn_sparse_desc *sparse, qattn_plan **out);
/* qattn_run's checks and dispatch; layout (may be NULL) carries a BLOCKS
 * plan's layout buffers, already checked to fit. */
qattn_status qattn_run_internal(const qattn_plan *plan, const qattn_run_args *args, const qattn_run_bound *layout);
/* Downloads a bound layout (host copies for host memory) and checks it. */
qattn_status qattn_sparse_check_layout_buffers(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run);

/* Checks a block layout in host memory: indptr[0] == 0, non-decreasing,
 * indptr[rows] == count, indices strictly ascending per row and below
 * k_blocks. The error names the first bad entry. */
qattn_status qattn_sparse_check_layout(qattn_ctx *ctx, const qattn_sparse_problem *sp, const int32_t *indptr,
                                       const int32_t *indices, int64_t count);

/* Whether key block kb of query block qb has an element the structured masks
 * (causal, window, sinks) leave visible. */
bool qattn_sparse_block_visible(const qattn_problem *p, const qattn_sparse_problem *sp, int64_t qb, int64_t kb);

/* The prediction of a PREDICT plan from host copies of Q and K (f32/f16/bf16
 * with the problem's strides): fills the workspace's pooled blocks, the
 * layout and the densities (ws: the workspace's host address). The CPU
 * backend's path, and the reference the GPU kernels are checked against.
 * QATTN_ERR_OUT_OF_MEMORY (nothing written) when its scratch fails. */
qattn_status qattn_sparse_predict_host(const qattn_plan *plan, const void *q, const void *k, uint8_t *ws, int threads);

/* Selection for one (b, hkv) given pooled blocks and similarities already in
 * the workspace (the second half of qattn_sparse_predict_host): writes its
 * rows (fixed stride) and counts, and its density. */
typedef struct qattn_block_weight {
    double w;
    int32_t kb;
} qattn_block_weight;
/* keep: k_blocks bytes, wts: k_blocks entries of scratch. */
void qattn_sparse_select_host(const qattn_plan *plan, uint8_t *ws, int64_t b, int64_t hk, uint8_t *keep,
                              qattn_block_weight *wts);

/* Logging to stderr, filtered by QATTN_LOG (error|warn|info|debug). */
typedef enum qattn_log_level { QATTN_LOG_ERROR = 0, QATTN_LOG_WARN, QATTN_LOG_INFO, QATTN_LOG_DEBUG } qattn_log_level;
void qattn_log(qattn_log_level level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Fills quant with the standard geometry for precision and granularity:
 * q_block rows per block, q_warp rows per warp, k_block keys per block. */
void qattn_quant_defaults(qattn_quant_params *quant, qattn_precision precision, qattn_granularity granularity,
                          int q_block, int q_warp, int k_block, bool smooth_k);

/* True when every element of the tensor is finite (f32/f16/bf16 host data). */
bool qattn_host_tensor_is_finite(const void *base, qattn_dtype dtype, const int64_t shape[4], const int64_t stride[4]);

/* Validates a tensor descriptor (shape, strides, no two elements at one
 * address, byte span) and returns its byte span; messages name the tensor and
 * its dims (dims NULL: B, H, N, D). */
qattn_status qattn_check_tensor(qattn_ctx *ctx, const char *name, const char *const dims[4],
                                const qattn_tensor_desc *t, size_t *bytes);
/* [offset, offset + bytes) lies inside buf (no overflow). */
bool qattn_buffer_fits(const qattn_buffer *buf, size_t offset, size_t bytes);
/* The byte at offset lies on an address that is a multiple of align (at most
 * 16 counts): offsets are checked against a buffer's start, but memory a
 * caller wraps may start anywhere, and kernels load elements at their
 * natural alignment. True when the address is unknown (not a process address). */
bool qattn_buffer_aligned(const qattn_buffer *buf, size_t offset, size_t align);
/* Two byte ranges (checked to fit their buffers) share a byte: in the same
 * buffer object, or in two buffers whose addresses say they share memory. */
bool qattn_buffer_ranges_overlap(const qattn_buffer *a, size_t ao, size_t an, const qattn_buffer *b, size_t bo,
                                 size_t bn);

/* The alias_space of memory addressed by process-wide pointers. */
extern const char qattn_process_addresses;
#define QATTN_PROCESS_ADDRESSES ((const void *)&qattn_process_addresses)

/* A call's argument: a byte range of a buffer (buf NULL: absent). */
typedef struct qattn_span {
    const char *name;
    const qattn_buffer *buf;
    size_t offset, bytes;
} qattn_span;

/* The aliasing rule of every entry point: an output shares no byte with an
 * input or with another output (kernels read inputs while they write, and
 * outputs are written in any order). The error names both arguments. */
qattn_status qattn_check_outputs(qattn_ctx *ctx, const qattn_span *outs, int n_outs, const qattn_span *ins, int n_ins);
/* Validates a KV-cache description and computes its sizes. */
qattn_status qattn_kv_cache_validate(qattn_ctx *ctx, const qattn_kv_cache_desc *desc, qattn_kv_cache_sizes *sizes);

/* Number of hardware threads of this machine (>= 1). */
int qattn_host_cpu_count(void);

#ifdef __cplusplus
}
#endif

#endif /* QATTN_INTERNAL_H */
