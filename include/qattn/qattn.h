/*
 * qattn: fast, accurate attention kernels for GPUs of every vendor.
 *
 * The whole public API. C11; every object is opaque and comes in a
 * create/destroy pair; destroy functions accept NULL.
 *
 * Flow:
 *   qattn_ctx_create      pick a backend and device (explicit, else QATTN_BACKEND, else auto)
 *   qattn_buffer_create   device memory owned by the backend (or qattn_buffer_wrap: yours)
 *   qattn_plan_create     validate an attention problem once, choose kernels and tiles
 *   qattn_run             execute the plan on buffers, as often as you like
 *
 * Ownership and threads:
 *   - A qattn_ctx owns its buffers and plans: destroy them before the context.
 *     A context may be used from several threads at once. Who serializes the
 *     work depends on the backend: CPU runs each call on the calling thread
 *     (calls from several threads run side by side); CUDA enqueues on the
 *     stream each call names (qattn_run_args.stream; NULL: the legacy default
 *     stream), so the caller orders work by its choice of streams; Vulkan and
 *     OpenCL take a per-context lock around recording or enqueueing a call and
 *     run it on the context's one queue, so calls on one context serialize.
 *     The last-error message is kept per context and per thread.
 *   - A qattn_plan is immutable after creation: it may be run concurrently from
 *     several threads as long as each run uses its own workspace and outputs.
 *   - A qattn_buffer is not synchronized: do not write one buffer from two
 *     calls in flight at once.
 *
 * ABI: the public structs keep their layout for the life of one soname
 * (libqattn.so.0); a struct that gains fields does so in a new soname.
 * Zero-initialize them (designated initializers, or = {0}) so that source
 * code keeps compiling and new fields take their defaults.
 *
 * Numerics:
 *   - Scores are s[i][j] = sm_scale * dot(q[i], k[j]); softmax over j.
 *   - LSE is the natural logarithm of sum_j exp(s[i][j]) over the keys row i
 *     may see, stored as fp32 [B, Hq, Nq] contiguous. A row that sees no key
 *     (causal with Nq > Nk) has output 0 and LSE = -INFINITY.
 *   - Causal masks are aligned bottom-right (as FlashAttention >= 2.1):
 *     query i sees key j iff j <= i + (Nk - Nq).
 */
#ifndef QATTN_QATTN_H
#define QATTN_QATTN_H

#include <stddef.h>
#include <stdint.h>

#include "qattn/qattn_config.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(QATTN_BUILDING)
#define QATTN_API __declspec(dllexport)
#elif defined(_WIN32)
#define QATTN_API __declspec(dllimport)
#elif defined(QATTN_BUILDING)
#define QATTN_API __attribute__((visibility("default")))
#else
#define QATTN_API
#endif

/* ---------------------------------------------------------------- version */

#define QATTN_VERSION_MAJOR 0
#define QATTN_VERSION_MINOR 3
#define QATTN_VERSION_PATCH 0
#define QATTN_VERSION_NUMBER (QATTN_VERSION_MAJOR * 10000 + QATTN_VERSION_MINOR * 100 + QATTN_VERSION_PATCH)

/* "MAJOR.MINOR.PATCH" of the library actually loaded. */
QATTN_API const char *qattn_version(void);
QATTN_API unsigned qattn_version_number(void);

/* ----------------------------------------------------------------- status */

typedef enum qattn_status {
    QATTN_OK = 0,
    QATTN_ERR_INVALID_ARGUMENT = 1, /* NULL, zero/overflowing size, bad shape/stride/dtype */
    QATTN_ERR_UNSUPPORTED = 2,      /* valid request this backend/device cannot run */
    QATTN_ERR_OUT_OF_MEMORY = 3,    /* host or device allocation failed */
    QATTN_ERR_BACKEND = 4,          /* the driver/runtime reported an error */
    QATTN_ERR_DEVICE_LOST = 5,      /* the device is gone; the context is unusable */
    QATTN_ERR_NOT_FOUND = 6,        /* unknown backend name, no such device */
    QATTN_ERR_UNAVAILABLE = 7,      /* backend known but not built, or not usable here */
    QATTN_ERR_NONFINITE_INPUT = 8,  /* NaN or Inf in Q, K or V; outputs untouched */
    QATTN_ERR_INTERNAL = 9          /* a bug in qattn: please report */
} qattn_status;

/* Static, never NULL: "QATTN_OK", "QATTN_ERR_INVALID_ARGUMENT", ... */
QATTN_API const char *qattn_status_str(qattn_status status);

typedef struct qattn_ctx qattn_ctx;
typedef struct qattn_buffer qattn_buffer;
typedef struct qattn_plan qattn_plan;

/*
 * The message of the last failed call, naming the offending argument.
 * ctx == NULL: the calling thread's last failure (covers calls with no
 * context, such as qattn_ctx_create). ctx != NULL: the calling thread's last
 * failure if it was on ctx, else the latest failure on ctx from any thread.
 * Valid until the next failing call on the same thread or context. Never
 * NULL ("" when none).
 */
QATTN_API const char *qattn_last_error(const qattn_ctx *ctx);

/* ------------------------------------------------------------------ dtypes */

typedef enum qattn_dtype {
    QATTN_DTYPE_F32 = 0,
    QATTN_DTYPE_F16 = 1,
    QATTN_DTYPE_BF16 = 2,
    QATTN_DTYPE_I8 = 3,
    QATTN_DTYPE_FP8_E4M3 = 4
} qattn_dtype;
#define QATTN_DTYPE_COUNT 5

/* Bytes per element; 0 for an unknown dtype. */
QATTN_API size_t qattn_dtype_size(qattn_dtype dtype);
/* "f32", "f16", "bf16", "i8", "fp8e4m3"; "?" for an unknown dtype. */
QATTN_API const char *qattn_dtype_name(qattn_dtype dtype);

/* ------------------------------------------------- backends and devices */

#define QATTN_NAME_MAX 256

typedef struct qattn_backend_info {
    const char *name;   /* "cpu", "cuda", "vulkan", "opencl" (static) */
    int built;          /* compiled into this library */
    int usable;         /* built and at least one device answered here */
    int device_count;
    char reason[QATTN_NAME_MAX]; /* why not usable; "" when usable */
} qattn_backend_info;

/* Capability bits of qattn_device_info.caps. */
#define QATTN_CAP_FP16 (1u << 0)          /* fp16 arithmetic */
#define QATTN_CAP_BF16 (1u << 1)          /* bf16 storage/arithmetic */
#define QATTN_CAP_INT8_DOT (1u << 2)      /* int8 dot products / int8 matrix units */
#define QATTN_CAP_FP8 (1u << 3)           /* FP8 E4M3 matrix units */
#define QATTN_CAP_MATRIX_UNITS (1u << 4)  /* tensor cores / cooperative matrix */
#define QATTN_CAP_SUBGROUPS (1u << 5)     /* subgroup / warp operations */
#define QATTN_CAP_UNIFIED_MEMORY (1u << 6) /* buffers are host memory */

typedef struct qattn_device_info {
    char name[QATTN_NAME_MAX];
    char vendor[64];
    char driver[128];
    int compute_units;          /* SMs, CUs, EUs, or CPU threads */
    uint64_t memory_bytes;      /* device memory (host RAM for the CPU) */
    uint64_t max_buffer_bytes;  /* largest single buffer the backend accepts */
    uint32_t caps;              /* QATTN_CAP_* */
    uint32_t precisions;        /* bit (1u << qattn_precision) per mode it runs */
    char details[2048];         /* backend-specific lines: limits, subgroup sizes, shapes */
} qattn_device_info;

/* Known backends, built or not, in a fixed order (index 0 is "cpu"). */
QATTN_API int qattn_backend_count(void);
/* Probes the backend (loads its driver if needed). */
QATTN_API qattn_status qattn_backend_query(int index, qattn_backend_info *info);
QATTN_API qattn_status qattn_device_query(const char *backend, int device, qattn_device_info *info);

/* --------------------------------------------------------------- context */

typedef struct qattn_ctx_params {
    /* "cpu" | "cuda" | "vulkan" | "opencl" | "auto". NULL: $QATTN_BACKEND, else "auto".
     * "auto" takes the usable backend with the best score (cuda > vulkan > opencl > cpu).
     * A named backend that is not usable is an error (QATTN_ERR_UNAVAILABLE), never a switch. */
    const char *backend;
    /* Device index ("0") or a case-insensitive substring of its name.
     * NULL: $QATTN_DEVICE, else device 0. */
    const char *device;
    /* CPU backend worker threads. 0: $QATTN_NUM_THREADS, else one per core. */
    int num_threads;
} qattn_ctx_params;

/* params may be NULL (all defaults). */
QATTN_API qattn_status qattn_ctx_create(const qattn_ctx_params *params, qattn_ctx **out);
QATTN_API void qattn_ctx_destroy(qattn_ctx *ctx);
/* "cpu", "cuda", ... */
QATTN_API const char *qattn_ctx_backend(const qattn_ctx *ctx);
QATTN_API qattn_status qattn_ctx_device_info(const qattn_ctx *ctx, qattn_device_info *info);
/* Waits for all work the context enqueued (on every stream it was given). */
QATTN_API qattn_status qattn_ctx_synchronize(qattn_ctx *ctx);

/* ---------------------------------------------------------------- buffers */

/* Device memory owned by the backend. Contents are undefined until written. */
QATTN_API qattn_status qattn_buffer_create(qattn_ctx *ctx, size_t bytes, qattn_buffer **out);
/*
 * Wraps memory the caller owns and keeps owning (it must outlive the buffer):
 * CPU: a host pointer; CUDA: a device (or managed) pointer on the context's
 * device; OpenCL: a cl_mem of the context's cl_context. Vulkan cannot wrap
 * (its VkDevice is private to the context) and returns QATTN_ERR_UNSUPPORTED.
 * Every call refuses an output that shares a byte with one of its inputs,
 * index tables or other outputs, through one buffer object or two that wrap
 * the same memory (CPU, CUDA: by address; OpenCL: one cl_mem, or a buffer and
 * its sub-buffers, by origin).
 */
QATTN_API qattn_status qattn_buffer_wrap(qattn_ctx *ctx, void *native, size_t bytes, qattn_buffer **out);
QATTN_API void qattn_buffer_destroy(qattn_buffer *buf);
QATTN_API size_t qattn_buffer_size(const qattn_buffer *buf);
/* Host <-> buffer copies. Synchronous: they return when the copy is complete,
 * after all work previously enqueued on the context's default stream. */
QATTN_API qattn_status qattn_buffer_upload(qattn_buffer *buf, size_t offset, const void *src, size_t bytes);
QATTN_API qattn_status qattn_buffer_download(const qattn_buffer *buf, size_t offset, void *dst, size_t bytes);
/* Sets bytes to value (synchronous). */
QATTN_API qattn_status qattn_buffer_fill(qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value);

/* ---------------------------------------------------------------- tensors */

/*
 * A 4-D tensor [B, H, N, D] (batch, heads, tokens, head dim) with element
 * strides, so both HND ([B, H, N, D] in memory) and NHD ([B, N, H, D] in
 * memory) layouts and padded rows work. The head dim must be contiguous
 * (stride[3] == 1); other strides must be positive.
 */
typedef struct qattn_tensor_desc {
    qattn_dtype dtype;
    int64_t shape[4];
    int64_t stride[4];
} qattn_tensor_desc;

/* Contiguous [B, H, N, D] in memory. */
QATTN_API qattn_tensor_desc qattn_tensor_hnd(qattn_dtype dtype, int64_t b, int64_t h, int64_t n, int64_t d);
/* Contiguous [B, N, H, D] in memory (described as [B, H, N, D] with strides). */
QATTN_API qattn_tensor_desc qattn_tensor_nhd(qattn_dtype dtype, int64_t b, int64_t h, int64_t n, int64_t d);
/* Bytes spanned from the first to one past the last element (0 if invalid). */
QATTN_API size_t qattn_tensor_bytes(const qattn_tensor_desc *t);

/* ----------------------------------------------------- attention and plans */

typedef enum qattn_precision {
    /* The fastest mode this backend and device run at the quantized accuracy
     * bar; the plan reports which it chose (qattn_plan_info.precision). */
    QATTN_PRECISION_AUTO = 0,
    /* fp32/fp16/bf16 inputs, QK and PV with fp32 accumulation. */
    QATTN_PRECISION_EXACT = 1,
    /* SageAttention: INT8 Q/K (smoothed K), FP16 P and V, fp32 accumulation. */
    QATTN_PRECISION_INT8_FP16 = 2,
    /* SageAttention2: INT8 Q/K, FP8 E4M3 P (scaled by 448) and V (per-channel
     * scale), P.V accumulated per key block then summed in fp32 (two-level). */
    QATTN_PRECISION_INT8_FP8 = 3,
    /* SageAttention2++: as INT8_FP8, but P.V accumulated in fp16 over one key
     * block; V scaled into [-2.25, 2.25] so 448 * 2.25 * 64 < 65504. */
    QATTN_PRECISION_INT8_FP8_F16ACC = 4
} qattn_precision;
#define QATTN_PRECISION_COUNT 5
QATTN_API const char *qattn_precision_name(qattn_precision p); /* "auto", "exact", "int8_fp16", "int8_fp8", "int8_fp8_f16acc" */

typedef enum qattn_granularity {
    QATTN_GRANULARITY_DEFAULT = 0,   /* the backend's preference (reported by the plan) */
    QATTN_GRANULARITY_PER_BLOCK = 1, /* one INT8 scale per block of tokens (Q block, K block) */
    QATTN_GRANULARITY_PER_WARP = 2,  /* Q: one scale per warp's rows; K: per block */
    QATTN_GRANULARITY_PER_THREAD = 3 /* Q and K: per group of tokens one thread holds in the MMA layout */
} qattn_granularity;
QATTN_API const char *qattn_granularity_name(qattn_granularity g);

typedef enum qattn_toggle {
    QATTN_DEFAULT = 0,
    QATTN_ON = 1,
    QATTN_OFF = 2
} qattn_toggle;

/* Flags of qattn_attention_desc, qattn_paged_desc and qattn_kv_append_args. */
/* Skip the checks that need a pass over the data, not only the finite check
 * of its name: the NaN/Inf scan of Q, K, V (and of the new tokens of an
 * append), and for paged runs and appends the check of the page tables,
 * slots and per-head scales too. Without them a run needs no host
 * synchronization (required for CUDA graph capture); non-finite inputs give
 * unspecified (typically NaN) outputs, and bad tables or slots unspecified
 * outputs, but never a read or write outside the buffers. */
#define QATTN_FLAG_NO_FINITE_CHECK (1u << 0)

typedef struct qattn_attention_desc {
    /* Q [B, Hq, Nq, D], K [B, Hkv, Nk, D], V [B, Hkv, Nk, D], O [B, Hq, Nq, D].
     * Hq must be a multiple of Hkv (GQA; Hkv == 1 is MQA). Q, K, V share a
     * dtype; O has the dtype of Q unless set to f32. */
    qattn_tensor_desc q, k, v, o;
    int causal;            /* bottom-right aligned, see the top of this file */
    int return_lse;        /* write LSE, fp32 [B, Hq, Nq] contiguous */
    float sm_scale;        /* 0: 1/sqrt(D) */
    qattn_precision precision;
    qattn_granularity granularity; /* quantized modes only */
    qattn_toggle smooth_k;  /* quantized modes only; default on */
    uint32_t flags;         /* QATTN_FLAG_* */
} qattn_attention_desc;

/* Validates desc and chooses a kernel. Expensive (may compile shaders);
 * reuse the plan. Unsupported requests return QATTN_ERR_UNSUPPORTED with a
 * message naming what is unsupported. */
QATTN_API qattn_status qattn_plan_create(qattn_ctx *ctx, const qattn_attention_desc *desc, qattn_plan **out);
QATTN_API void qattn_plan_destroy(qattn_plan *plan);

typedef struct qattn_plan_info {
    qattn_precision precision;     /* chosen (never AUTO) */
    qattn_granularity granularity; /* chosen (never DEFAULT for quantized modes) */
    int smooth_k;
    int q_tile, kv_tile;           /* rows of Q and K per work tile (the FP8 modes round P to E4M3
                                      against the running max of whole kv tiles) */
    /* INT8 scale groups: token t of a block of `block` tokens belongs to group
     * (t / block, t % interleave); one scale per group per head. */
    int q_quant_block, q_quant_interleave;
    int k_quant_block, k_quant_interleave;
    float v_fp8_max;               /* V is scaled so |V| <= this before FP8 (448 or 2.25) */
    float p_fp8_scale;             /* P is multiplied by this before FP8 (448) */
    int pv_f16_chunk;              /* F16ACC: keys summed exactly before each fp16 accumulation */
    size_t workspace_bytes;
    char kernel[128];              /* the kernel variant's name */
} qattn_plan_info;

QATTN_API qattn_status qattn_plan_get_info(const qattn_plan *plan, qattn_plan_info *info);
/* Bytes of scratch qattn_run needs (0 if none). */
QATTN_API size_t qattn_plan_workspace_size(const qattn_plan *plan);
/* A human-readable account: variant, tiles, quantization, and why. Writes at
 * most len bytes including the terminating NUL; returns the full length. */
QATTN_API size_t qattn_plan_describe(const qattn_plan *plan, char *buf, size_t len);

typedef struct qattn_run_args {
    qattn_buffer *q, *k, *v, *o;
    qattn_buffer *lse;        /* required iff desc.return_lse */
    qattn_buffer *workspace;  /* >= qattn_plan_workspace_size bytes; NULL when 0 */
    /* Byte offsets of each tensor's first element inside its buffer: a
     * multiple of the element size (the backend may ask for more: its message
     * says how much); workspace_offset a multiple of 256. No output (o, lse,
     * workspace) may share a byte with another argument of the call. */
    size_t q_offset, k_offset, v_offset, o_offset, lse_offset, workspace_offset;
    /* CUDA: a cudaStream_t to run on (NULL: the context's default stream). Other
     * backends: must be NULL. */
    void *stream;
} qattn_run_args;

/*
 * Runs the plan. On GPU backends the work is asynchronous on the stream
 * unless the finite check is on (the default), which waits for the result of
 * the scan. Allocates no device memory. On error, outputs are untouched.
 */
QATTN_API qattn_status qattn_run(const qattn_plan *plan, const qattn_run_args *args);

/* ------------------------------------------------ sparse attention (pruning) */

/*
 * Attention restricted to a mask, with the work of masked keys skipped:
 * sequence pruning for prefill. Element (query i, key j) of batch b and query
 * head h is visible iff all of these hold:
 *   - causal, when desc.causal is set (bottom-right aligned, as above);
 *   - the local window, when sparse.window is set: with i' = i + Nk - Nq
 *     (the query's place among the keys, aligned like causal),
 *       i' - window_left <= j <= i' + window_right   (-1: no bound that side)
 *     or j < sink_tokens (StreamingLLM's attention sinks);
 *   - the block layout, when there is one: j's key block (j / k_block) is
 *     listed for i's query block (i / q_block) of (b, h / group). One layout
 *     per KV head: a GQA group shares it (the union over its query heads), so
 *     skipped keys are never read.
 * A row that sees no key has O = 0 and LSE = -inf. Skipping never changes the
 * result beyond the rounding of the mode: kernels skip whole key steps that
 * no row of a tile sees and mask elements inside the steps they visit. The
 * structured masks (causal, window, sinks) are computed in the kernels: a
 * step wholly inside them is "full" and runs without per-element masking, so
 * layouts need no full-block flags.
 *
 * Layouts (QATTN_SPARSE_BLOCKS) are block CSR, int32, read from offset 0 of
 * their buffers: row r = (b * Hkv + hkv) * ceil(Nq / q_block) + qb lists key
 * blocks indices[indptr[r] .. indptr[r + 1]), strictly ascending, each below
 * ceil(Nk / k_block); indptr has B * Hkv * ceil(Nq / q_block) + 1 entries,
 * indptr[0] == 0. Block sizes are any multiples of 16. The Python binding
 * converts dense block masks, FlexAttention's BlockMask (kv_num_blocks,
 * kv_indices) and FlashInfer's BSR (indptr, indices) to and from it.
 *
 * Predicted layouts (QATTN_SPARSE_PREDICT, after SpargeAttn): each run pools
 * every q_block of Q and k_block of K to its mean, keeps every key block for
 * a query block whose tokens are not alike (some token's cosine to the
 * block's mean below sim_threshold: one outlier token, such as a needle,
 * flags its block, where SpargeAttn's mean pairwise cosine barely moves) and
 * every key block whose tokens are not alike, and else
 * keeps key blocks in order of their weight in softmax(sm_scale * pooled
 * q . pooled k) over the visible blocks until the kept weight reaches
 * cdf_threshold (or, with topk > 0, the ceil(topk * visible) heaviest), plus
 * the first sink_blocks and the last recent_blocks visible key blocks of
 * every query block; the last last_q_blocks query blocks keep every visible
 * key block (the end of a prompt, where a question sits and generation
 * continues, sees all of it: a needle that only such a query looks for is
 * invisible to pooled scores). Blocks are chosen per query head and united
 * over the GQA group. qattn_sparse_layout_read returns the layout a run used and the
 * density it achieved per KV head.
 *
 * pv_threshold (lambda > 0, any layout; SpargeAttn's second stage): a kernel
 * skips the P.V product of a key step for each group of 16 query rows whose
 * largest score in the step is more than lambda below the row's running
 * maximum (log2 units, scores scaled by sm_scale * log2(e)); the softmax
 * denominator still counts those keys. Approximate by design: 0 turns it off.
 */
typedef enum qattn_sparse_layout_kind {
    QATTN_SPARSE_NO_LAYOUT = 0, /* structured masks only (window, sinks, causal) */
    QATTN_SPARSE_BLOCKS = 1,    /* a block CSR given to each run (qattn_sparse_args) */
    QATTN_SPARSE_PREDICT = 2    /* predicted from Q and K at each run */
} qattn_sparse_layout_kind;

typedef struct qattn_sparse_desc {
    int window;                 /* nonzero: apply window_left, window_right and sink_tokens */
    int64_t window_left;        /* keys before the query's place it sees (>= 0), -1: all */
    int64_t window_right;       /* keys after it (>= 0), -1: all (causal still applies) */
    int64_t sink_tokens;        /* keys [0, sink_tokens) visible to every query (>= 0) */
    qattn_sparse_layout_kind layout;
    /* BLOCKS and PREDICT: block sizes, multiples of 16 (PREDICT: 0 picks 128 x 64). */
    int64_t q_block, k_block;
    /* PREDICT */
    float sim_threshold;        /* theta in [-1, 1]: blocks less alike are always kept (0.5 is typical) */
    float cdf_threshold;        /* tau in (0, 1]: the softmax weight to keep, unless topk > 0 */
    float topk;                 /* (0, 1]: the fraction of visible key blocks to keep instead */
    int64_t sink_blocks;        /* first key blocks always kept (>= 0) */
    int64_t recent_blocks;      /* last visible key blocks of each query block always kept (>= 0) */
    int64_t last_q_blocks;      /* last query blocks kept whole (>= 0) */
    /* Any layout: lambda, see above; 0: off. */
    float pv_threshold;
} qattn_sparse_desc;

/*
 * A plan for desc restricted by sparse (NULL: same as qattn_plan_create). A
 * backend that cannot run a part of it returns QATTN_ERR_UNSUPPORTED naming
 * the part. qattn_plan_describe reports the restriction.
 */
QATTN_API qattn_status qattn_sparse_plan_create(qattn_ctx *ctx, const qattn_attention_desc *desc,
                                                const qattn_sparse_desc *sparse, qattn_plan **out);

typedef struct qattn_sparse_args {
    qattn_buffer *block_indptr, *block_indices; /* QATTN_SPARSE_BLOCKS: the layout, int32 */
    int64_t block_count;                        /* entries of block_indices (== indptr's last) */
} qattn_sparse_args;

/* Runs a sparse plan (qattn_run runs those without a BLOCKS layout too). The
 * layout is checked (indices in range, ascending; the error names the first
 * bad entry) unless QATTN_FLAG_NO_FINITE_CHECK: then a bad layout gives
 * unspecified outputs but never a read outside the buffers. */
QATTN_API qattn_status qattn_sparse_run(const qattn_plan *plan, const qattn_run_args *args,
                                        const qattn_sparse_args *sparse);

/* Rows of a sparse plan's layout (B * Hkv * ceil(Nq / q_block)) and its block
 * sizes; 0 rows for a plan without a layout. */
QATTN_API int64_t qattn_sparse_layout_rows(const qattn_plan *plan, int64_t *q_block, int64_t *k_block);

/*
 * After a run of a PREDICT plan, with the workspace that run used: the
 * predicted layout (indptr [rows + 1], indices of capacity entries; either
 * may be NULL) and, per (b, hkv), the fraction of visible blocks it kept
 * (density[B * Hkv], may be NULL). Synchronizes with the run. *count gets
 * the number of indices (larger than capacity: nothing written to indices).
 */
QATTN_API qattn_status qattn_sparse_layout_read(const qattn_plan *plan, const qattn_buffer *workspace,
                                                size_t workspace_offset, int32_t *indptr, int32_t *indices,
                                                int64_t capacity, int64_t *count, float *density);

/* --------------------------------------------------------- paged KV cache */

/*
 * A KV cache in fixed-size pages (vLLM's PagedAttention, FlashInfer). K and V
 * live in two buffers of num_pages pages each; a page holds page_size tokens
 * of every KV head:
 *   QATTN_KV_NHD: page [page_size, Hkv, D]     (vLLM / FlashInfer "NHD")
 *   QATTN_KV_HND: page [Hkv, page_size, D]     (FlashInfer "HND")
 * Quantized pages store E4M3 or INT8 codes; the real value is code * scale:
 *   FP8 E4M3: one scale per KV head, given by the caller (static, as vLLM's
 *             k_scale/v_scale): fp32 [Hkv] buffers for K and V.
 *   INT8:     per KV head (static, as above) or per page row (one scale per
 *             token and head, computed when the token is appended): fp32
 *             [num_pages, page_size, Hkv] buffers for K and V.
 * The library does not own the cache: the caller allocates the buffers
 * (qattn_kv_cache_bytes tells the sizes) and decides which pages hold what.
 */
typedef enum qattn_kv_layout {
    QATTN_KV_NHD = 0,
    QATTN_KV_HND = 1
} qattn_kv_layout;

typedef enum qattn_kv_scales {
    QATTN_KV_SCALES_NONE = 0,     /* fp16/bf16 pages */
    QATTN_KV_SCALES_PER_HEAD = 1, /* fp8 or int8 pages, static scale per KV head */
    QATTN_KV_SCALES_PER_ROW = 2   /* int8 pages, a scale per (token, head), set on append */
} qattn_kv_scales;

typedef struct qattn_kv_cache_desc {
    int64_t num_pages;
    int64_t page_size;   /* tokens per page, >= 1 (16 is common) */
    int64_t heads_kv;
    int64_t head_dim;
    qattn_dtype dtype;   /* f16, bf16, fp8e4m3 or i8 */
    qattn_kv_layout layout;
    qattn_kv_scales scales;
} qattn_kv_cache_desc;

typedef struct qattn_kv_cache_sizes {
    size_t page_bytes;   /* one page of K (or of V) */
    size_t cache_bytes;  /* num_pages pages: the size of the K buffer and of the V buffer */
    size_t scale_bytes;  /* each of the K and V scale buffers (0 when unscaled) */
} qattn_kv_cache_sizes;

/* Validates desc and reports the buffer sizes it needs. */
QATTN_API qattn_status qattn_kv_cache_bytes(qattn_ctx *ctx, const qattn_kv_cache_desc *desc,
                                            qattn_kv_cache_sizes *sizes);

/* The cache's buffers as given to qattn_kv_append and qattn_paged_run.
 * (0.3 added k_meta at the end: code built against 0.2 headers must be
 * rebuilt, and should zero-initialize the struct.) */
typedef struct qattn_kv_cache_buffers {
    qattn_buffer *k, *v;             /* cache_bytes each */
    qattn_buffer *k_scale, *v_scale; /* scale_bytes each; NULL for unscaled pages */
    qattn_buffer *k_meta;            /* optional page metadata (qattn_kv_meta_bytes); NULL: none kept */
} qattn_kv_cache_buffers;

/*
 * Page metadata for query-aware page selection (Quest): per page and KV head,
 * the channel-wise minimum and maximum of the page's keys, kept beside the
 * cache by qattn_kv_append when buffers->k_meta is set. Every append
 * recomputes the metadata of each page it writes from all page_size slots of
 * that page, so it always describes the page's current keys (rewritten slots
 * included). Slots a sequence has not filled yet hold stale data; only the
 * last page of a sequence is partly filled, and selection always reads it
 * without looking at its metadata.
 * Layout of the k_meta buffer: codes [num_pages][Hkv][2][D] (min row, then
 * max row) in the cache's own element type: f16 and bf16 pages keep f16/bf16
 * values, FP8 pages E4M3 codes and INT8 per-head pages INT8 codes (the real
 * value is code * the head's scale, exact); INT8 per-row pages keep INT8 codes
 * against a scale per (page, head), rounded outward (min down, max up) so the
 * bound stays a bound: fp32 [num_pages][Hkv] at byte offset scale_offset.
 * Its size is exactly 1/page_size of the K+V bytes it describes (f16, bf16,
 * FP8, INT8 per head) and at most that for INT8 per row (scales counted),
 * apart from up to 255 bytes of alignment before the scales.
 */
typedef struct qattn_kv_meta_sizes {
    size_t meta_bytes;   /* the whole k_meta buffer */
    size_t scale_offset; /* INT8 per-row pages: where the fp32 scales start; 0 otherwise */
} qattn_kv_meta_sizes;
QATTN_API qattn_status qattn_kv_meta_bytes(qattn_ctx *ctx, const qattn_kv_cache_desc *desc,
                                           qattn_kv_meta_sizes *sizes);

/*
 * Writes new tokens into the cache (vLLM's reshape_and_cache): token t of
 * k_new/v_new ([T, Hkv, D], f16/bf16/f32, element strides for token and head,
 * head dim contiguous) goes to slot slot_mapping[t] = page * page_size +
 * offset (int64 buffer [T]); a negative slot skips the token (padding).
 * FP8 and INT8 pages are quantized on the way in (per-head scales are read,
 * per-row scales are written). Slots must be distinct. Synchronous on
 * backends without streams; on CUDA it runs on args->stream.
 */
typedef struct qattn_kv_append_args {
    const qattn_kv_cache_desc *cache;
    const qattn_kv_cache_buffers *buffers;
    int64_t num_tokens;
    qattn_dtype new_dtype;
    int64_t new_stride[2];           /* elements between tokens, between heads */
    qattn_buffer *k_new, *v_new, *slot_mapping;
    size_t k_new_offset, v_new_offset, slot_mapping_offset;
    uint32_t flags;                  /* QATTN_FLAG_NO_FINITE_CHECK skips the NaN/Inf, slot and scale checks */
    void *stream;
} qattn_kv_append_args;

QATTN_API qattn_status qattn_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args);

/* Page tables, in both common encodings (int32 buffers):
 *   DENSE (vLLM, FlashAttention): block_table [B, max_pages_per_seq] and
 *     seq_lens [B] (tokens in the cache for each sequence).
 *   CSR (FlashInfer): indptr [B + 1], indices [indptr[B]] (the pages of
 *     sequence b are indices[indptr[b] .. indptr[b+1])), last_page_len [B]
 *     (tokens in the last page, 1..page_size). A sequence may have 0 pages
 *     (indptr[b] == indptr[b+1]; DENSE: seq_lens[b] == 0): nothing is cached
 *     for it yet, and its query rows get O = 0 and LSE = -inf. */
typedef enum qattn_page_table_kind {
    QATTN_PAGES_DENSE = 0,
    QATTN_PAGES_CSR = 1
} qattn_page_table_kind;

/*
 * Attention of ragged queries over a paged KV cache: decode (one or a few
 * query tokens per sequence) and prefill / chunked prefill (many, causal
 * against the cached prefix). Queries and outputs are [total_q, Hq, D] with
 * token and head strides; sequence b owns query rows qo_indptr[b] ..
 * qo_indptr[b+1] (int32 buffer [B + 1]), which are its last tokens: with
 * causal, query i of a sequence with q_len queries and kv_len cached tokens
 * sees keys j <= i + kv_len - q_len (the cache already holds the queries' own
 * K/V). LSE (optional) is fp32 [total_q, Hq].
 * The planner splits long sequences over several work items when batch x
 * heads would not fill the device (split-KV) and merges the partial results
 * exactly through their LSE.
 */
typedef struct qattn_paged_desc {
    qattn_kv_cache_desc cache;
    qattn_page_table_kind table;
    int64_t batch;
    int64_t max_pages_per_seq;  /* DENSE: block_table's row length; CSR: the most pages any sequence has */
    int64_t total_q;            /* rows of Q and O */
    int64_t max_q_len;          /* bound on any sequence's query count (1 for pure decode) */
    int64_t heads_q;            /* multiple of cache.heads_kv */
    qattn_dtype q_dtype;        /* f16, bf16 or f32; O has the same dtype */
    int64_t q_stride[2];        /* elements between tokens, between heads (head dim contiguous) */
    int64_t o_stride[2];
    int causal;
    int return_lse;
    float sm_scale;             /* 0: 1/sqrt(D) */
    int num_splits;             /* 0: the planner decides; >= 1 forces */
    /* QATTN_FLAG_NO_FINITE_CHECK skips the NaN/Inf scan of Q and the check of
     * the page tables (out-of-range pages and lengths). Without the check,
     * bad tables give unspecified outputs, but never a read outside the cache. */
    uint32_t flags;
} qattn_paged_desc;

typedef struct qattn_paged_args {
    const qattn_kv_cache_buffers *cache;
    qattn_buffer *q, *o, *lse;
    qattn_buffer *qo_indptr;
    qattn_buffer *block_table, *seq_lens;                /* DENSE */
    qattn_buffer *indptr, *indices, *last_page_len;      /* CSR */
    qattn_buffer *workspace;
    /* As in qattn_run_args: element-size multiples, workspace_offset a
     * multiple of 256; the tables are read from offset 0 of their buffers. */
    size_t q_offset, o_offset, lse_offset, workspace_offset;
    void *stream;
} qattn_paged_args;

QATTN_API qattn_status qattn_paged_plan_create(qattn_ctx *ctx, const qattn_paged_desc *desc, qattn_plan **out);
/* A paged plan under a local window and sinks (sparse.window; no layout and
 * no pv_threshold: a cache is pruned through its page tables). Query i of a
 * sequence with q_len queries and kv_len cached tokens sits at i' = i +
 * kv_len - q_len among its keys, as with causal. NULL sparse: as above. */
QATTN_API qattn_status qattn_paged_sparse_plan_create(qattn_ctx *ctx, const qattn_paged_desc *desc,
                                                      const qattn_sparse_desc *sparse, qattn_plan **out);

/*
 * Query-aware page selection (Quest-style) on a paged plan: before attending,
 * each (sequence b, KV head hk) picks the pages to read from the cache's
 * metadata (buffers->k_meta must be kept), and attention reads only those.
 *   Bound of page p for query row i and query head h of hk's group, with
 *   q scaled by sm_scale (s):
 *     ub = sum_d max(s q_d kmin_d, s q_d kmax_d) >= s q . k for every key of p.
 *   Score of p: the largest ub over the sequence's query rows and the group's
 *   query heads (a page any head needs is kept for the group).
 *   Forced pages: the first sink_pages, and the last max(recent_pages, pages
 *   holding the sequence's query tokens) pages (so causal chunked prefill
 *   stays exact); at least the last page.
 *   Budget: budget_tokens (> 0, rounded up to whole pages) or else
 *   ceil(budget_fraction * the sequence's pages); never fewer than the
 *   forced pages, never more than the sequence has. The rest of the budget
 *   goes to the unforced pages of highest score; equal scores: the lower page
 *   index first. A sequence within its budget reads every page (dense).
 *   Adaptive (0 < epsilon < 1): the budget doubles (up to max_budget_tokens,
 *   0: no cap) until, for every query row and head, the unread pages' weight
 *   bound U / (L + U) <= epsilon, where U sums n_p exp(ub) over unread
 *   pages and L bounds the read weight from below: the exact weight of the 4
 *   selected full pages of highest ub (their keys are read) plus n_p exp(lb)
 *   of the other selected full pages (lb = sum_d min(s q_d kmin_d, s q_d
 *   kmax_d), n_p the page's tokens): a true bound on the softmax weight
 *   attention leaves out. Decode (max_q_len 1) or non-causal plans only (a
 *   causal chunk's early rows do not see all of L's keys: refused). Giving
 *   both budget_tokens and budget_fraction is refused.
 * Attention then runs over each (b, hk)'s selected pages in page order, as
 * if they were the sequence's whole cache. No window or sinks on the same
 * plan. qattn_paged_selection_read returns the selected page lists.
 */
typedef struct qattn_page_select_desc {
    int64_t budget_tokens;      /* > 0: tokens per (sequence, KV head), rounded up to pages */
    float budget_fraction;      /* budget_tokens == 0: fraction of each sequence's pages, (0, 1] */
    int64_t sink_pages;         /* first pages always read (>= 0) */
    int64_t recent_pages;       /* last pages always read (>= 0; the query tokens' pages always are) */
    float epsilon;              /* > 0: adaptive budget (see above); 0: fixed */
    int64_t max_budget_tokens;  /* adaptive: the budget's cap in tokens (0: the whole sequence) */
} qattn_page_select_desc;

QATTN_API qattn_status qattn_paged_select_plan_create(qattn_ctx *ctx, const qattn_paged_desc *desc,
                                                      const qattn_page_select_desc *select, qattn_plan **out);
/*
 * After a run of a selection plan, with the workspace it used: for each row r
 * = b * Hkv + hk, counts[r] (B * Hkv entries) and the selected logical page
 * indices (positions in the sequence's page table, ascending) at
 * pages[r * max_pages_per_seq ..] (B * Hkv * max_pages_per_seq entries).
 * Either output may be NULL.
 */
QATTN_API qattn_status qattn_paged_selection_read(const qattn_plan *plan, const qattn_buffer *workspace,
                                                  size_t workspace_offset, int32_t *counts, int32_t *pages);

/*
 * Attention mass per page, for score-based eviction (H2O- and SnapKV-style):
 * after a run of plan (made with return_lse) filled args->lse, reads the same
 * queries, cache and tables and writes fp32 mass [B, Hkv, max_pages_per_seq]:
 *   mass[b][hk][p] = sum over b's query rows i and hk's query heads h of
 *                    sum over keys j of page p that row i sees of
 *                    exp(sm_scale * q_ih . k_j - lse[i][h])
 * over every page of the table (a selection plan's LSE covers only what it
 * read, so there the masses of a row may add to more than 1). Entries past a
 * sequence's pages are 0. args->lse is an input here.
 */
QATTN_API qattn_status qattn_paged_page_mass(const qattn_plan *plan, const qattn_paged_args *args,
                                             qattn_buffer *mass, size_t mass_offset);

/* qattn_plan_destroy, qattn_plan_workspace_size, qattn_plan_describe and
 * qattn_plan_get_info (q_tile: query rows per item; kv_tile: keys per split
 * chunk, 0 when unsplit) apply to paged plans too. */
QATTN_API qattn_status qattn_paged_run(const qattn_plan *plan, const qattn_paged_args *args);

/*
 * Merges attention states computed over disjoint key sets (split-KV,
 * cascades, context parallelism): for each row r and head h,
 *   lse = log(sum_s exp(lse_s)),  o = sum_s exp(lse_s - lse) * o_s.
 * States whose LSE is -inf contribute nothing; if all are, o = 0, lse = -inf.
 * v: [S, R, H, D] (f32/f16/bf16, strides in elements, head dim contiguous),
 * s: fp32 [S, R, H] with strides; o: [R, H, D] (dtype, strides), lse: fp32 [R, H]
 * contiguous (optional).
 */
typedef struct qattn_merge_desc {
    int64_t num_states, rows, heads, head_dim;
    qattn_dtype v_dtype, o_dtype;
    int64_t v_stride[3];   /* state, row, head */
    int64_t s_stride[3];   /* state, row, head */
    int64_t o_stride[2];   /* row, head */
} qattn_merge_desc;

typedef struct qattn_merge_args {
    qattn_buffer *v, *s, *o, *lse; /* lse may be NULL */
    size_t v_offset, s_offset, o_offset, lse_offset;
    void *stream;
} qattn_merge_args;

QATTN_API qattn_status qattn_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);

/* A small host-side page allocator an engine may use or ignore: pages are
 * handed out lowest-free-first; not thread-safe (one per engine thread). */
typedef struct qattn_page_pool qattn_page_pool;
QATTN_API qattn_status qattn_page_pool_create(int64_t num_pages, qattn_page_pool **out);
QATTN_API void qattn_page_pool_destroy(qattn_page_pool *pool);
/* Takes n free pages into pages[0..n); all or nothing (QATTN_ERR_OUT_OF_MEMORY when fewer are free). */
QATTN_API qattn_status qattn_page_pool_alloc(qattn_page_pool *pool, int64_t n, int32_t *pages);
/* Returns pages; freeing a page that is not allocated is QATTN_ERR_INVALID_ARGUMENT (nothing changes). */
QATTN_API qattn_status qattn_page_pool_free(qattn_page_pool *pool, int64_t n, const int32_t *pages);
QATTN_API int64_t qattn_page_pool_free_count(const qattn_page_pool *pool);
/*
 * Page-granular eviction for one sequence, so a stream runs in a fixed number
 * of pages: pages[0 .. *num_pages) is the sequence's page list in order (the
 * last page may be partly filled). When it holds more than keep_pages pages,
 * the pages beyond the budget are returned to pool: never the first
 * sink_pages nor the last recent_pages; among the others, without scores the
 * oldest go first (StreamingLLM: sinks + a recent window), with scores
 * (one per page, e.g. accumulated qattn_paged_page_mass) the lowest score
 * first, equal scores the older first, NaN scores last. The survivors stay
 * in order, compacted to the front of pages (and of scores, so they can keep
 * accumulating); *num_pages and *freed (may be NULL) say how many remain and
 * went. The list's pages must be distinct. A refused call changes nothing
 * but *freed, which it sets to 0.
 * Attention over the kept pages treats them as the sequence's cache.
 */
typedef struct qattn_evict_policy {
    int64_t keep_pages;   /* pages a sequence keeps at most; >= sink_pages + recent_pages, >= 1 */
    int64_t sink_pages;   /* >= 0 */
    int64_t recent_pages; /* >= 1: the page being filled always stays */
} qattn_evict_policy;
QATTN_API qattn_status qattn_evict_pages(qattn_page_pool *pool, const qattn_evict_policy *policy, int32_t *pages,
                                         int64_t *num_pages, float *scores, int64_t *freed);

/*
 * Builds a dense block table row and the CSR arrays for sequences whose pages
 * are given as lists: seq_pages[b] has pages_per_seq[b] entries. block_table
 * is [batch, max_pages_per_seq] (unused entries -1); indptr [batch + 1];
 * indices [sum]. Any output pointer may be NULL.
 */
QATTN_API qattn_status qattn_page_tables_build(int64_t batch, const int32_t *const *seq_pages,
                                               const int64_t *pages_per_seq, int64_t max_pages_per_seq,
                                               int32_t *block_table, int32_t *indptr, int32_t *indices);

#ifdef __cplusplus
}
#endif

#endif /* QATTN_QATTN_H */
