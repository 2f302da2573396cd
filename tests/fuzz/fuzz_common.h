/*
 * Shared parts of the libFuzzer targets of the public API (tests/fuzz):
 *
 *   - an input reader: the fuzzer's bytes become a problem description
 *     (small sizes most of the time, hostile values when a byte says so);
 *     data values come from a PRNG seeded by the input, so inputs stay small;
 *   - a memory model: buffers created by the library or wrapped over arenas
 *     the harness owns, several arguments in one buffer and several wrapped
 *     buffers over the same bytes; snapshots before and after a call prove
 *     that nothing outside the bytes a call may write changed, and that a
 *     failed call wrote nothing;
 *   - error bounds of fp32 softmax attention for the fp64 references;
 *   - FUZZ_CHECK: any violated property aborts, which libFuzzer reports.
 */
#ifndef QATTN_FUZZ_COMMON_H
#define QATTN_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qattn/qattn.h"
#include "reference.h"

/* The harness's own loops (references, snapshots, fills) stay out of the
 * coverage the fuzzer steers by: only the library's branches and the
 * decoding of the input count, and executions stay fast. */
#define FZ_QUIET __attribute__((no_sanitize("coverage")))

/* ------------------------------------------------------------ failures */

_Noreturn void fuzz_fail(const char *file, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
#define FUZZ_CHECK(cond, ...)                                                                                         \
    do {                                                                                                               \
        if (!(cond))                                                                                                   \
            fuzz_fail(__FILE__, __LINE__, __VA_ARGS__);                                                                \
    } while (0)

/* A failed call must say why: a non-empty message for that context (or NULL). */
void fuzz_check_message(const qattn_ctx *ctx, qattn_status s, const char *call);

/* ------------------------------------------------------------ input */

typedef struct fuzz_input {
    const uint8_t *data;
    size_t size, pos;
} fuzz_input;

uint8_t fz_u8(fuzz_input *in); /* 0 once the input is exhausted */
uint32_t fz_u32(fuzz_input *in);
uint64_t fz_u64(fuzz_input *in);
/* A value in [0, n) from one byte (n <= 256) or two (n larger). */
uint32_t fz_below(fuzz_input *in, uint32_t n);
bool fz_more(const fuzz_input *in);
/* An int64 a hostile caller might pass: 0, -1, INT64_MIN/MAX, 2^31, 2^32,
 * 2^62, near SIZE_MAX / element sizes, or raw bits. */
int64_t fz_hostile_i64(fuzz_input *in);
/* A size_t offset a hostile caller might pass, relative to a buffer of `size` bytes. */
size_t fz_hostile_offset(fuzz_input *in, size_t size);
/* A float a hostile caller might pass: NaN, +-Inf, 0, -0, denormals, FLT_MAX, ... */
float fz_hostile_float(fuzz_input *in);

/* ------------------------------------------------------------ context */

/* The CPU context every target uses (one thread, created once). */
qattn_ctx *fuzz_ctx(void);
/* A second CPU context: its buffers must be refused by calls on the first. */
qattn_ctx *fuzz_other_ctx(void);

/* ------------------------------------------------------------ memory model */

#define FZ_MAX_UNITS 24
#define FZ_MAX_BUFS 32

typedef struct fz_unit {
    uint8_t *host;        /* arena (wrapped buffers) or the staging copy of an owned buffer */
    size_t size;
    int owned_buf;        /* index of the owned buffer it stages, -1 for an arena */
    uint8_t *before, *after, *may_change;
} fz_unit;

typedef struct fz_buf {
    qattn_buffer *handle;
    int unit;
    size_t unit_offset;   /* where the buffer's first byte lies in its unit */
    size_t size;
    bool wrapped, foreign;
} fz_buf;

typedef struct fz_mem {
    fz_unit units[FZ_MAX_UNITS];
    int n_units;
    fz_buf bufs[FZ_MAX_BUFS];
    int n_bufs;
} fz_mem;

/* A buffer the library allocates (qattn_buffer_create); -1 when it refused. */
int fz_owned(fz_mem *m, size_t size);
/* A buffer allocated on the second context. */
int fz_foreign(fz_mem *m, size_t size);
/* An arena of the harness (returns a unit index) and a buffer wrapping part of it. */
int fz_arena(fz_mem *m, size_t size);
int fz_wrap(fz_mem *m, int unit, size_t offset, size_t size);
/* Host bytes of buffer b at byte offset off (staging: write here, then fz_commit). */
uint8_t *fz_host(fz_mem *m, int b, size_t off);
/* Fills every unit with bytes from rng (garbage the calls must not read as data). */
void fz_garbage(fz_mem *m, ref_rng *rng);
/* Uploads the staging copies, then snapshots every unit (before a call). */
void fz_commit(fz_mem *m);
/* Marks bytes [off, off + n) of buffer b as allowed to change (clipped to the buffer). */
void fz_allow(fz_mem *m, int b, size_t off, size_t n);
/* Snapshots after the call and aborts if a byte not allowed to change did. */
void fz_check_unchanged(fz_mem *m, const char *what);
/* Bytes of buffer b at off as they were before the call (reference inputs). */
const uint8_t *fz_before(const fz_mem *m, int b, size_t off);
/* ... and after the call (outputs). */
const uint8_t *fz_after(const fz_mem *m, int b, size_t off);
/* Whether the byte at off of buffer b lies on an address aligned for elements
 * of `align` bytes (the library asks for natural alignment, at most 16). */
bool fz_address_aligned(const fz_mem *m, int b, size_t off, size_t align);
/* Whether two byte ranges share memory: the same buffer object, or wrapped
 * buffers over the same arena. Ranges are clipped to their buffers. */
bool fz_overlap(const fz_mem *m, int a, size_t ao, size_t an, int b, size_t bo, size_t bn);
void fz_release(fz_mem *m);

/* ------------------------------------------------------------ tensors */

/* The verdict of the harness on a request: it must succeed, must fail, or either. */
typedef enum fz_verdict { FZ_VALID = 0, FZ_EITHER = 1, FZ_INVALID = 2 } fz_verdict;
static inline fz_verdict fz_worst(fz_verdict a, fz_verdict b) { return a > b ? a : b; }

/* A 4-D descriptor as the header defines it (positive strides, contiguous
 * head dim, no two elements at one address, span in size_t). Sets *bytes
 * to the span when it fits. The overlap rule is checked exactly for spans
 * small enough to enumerate. */
fz_verdict fz_tensor_verdict(const qattn_tensor_desc *t, size_t *bytes);

/* Element (b, h, n, d)'s element offset. */
FZ_QUIET static inline int64_t fz_offset_of(const qattn_tensor_desc *t, int64_t b, int64_t h, int64_t n, int64_t d)
{
    return b * t->stride[0] + h * t->stride[1] + n * t->stride[2] + d * t->stride[3];
}
/* Marks every element's bytes of t (at byte offset off of buffer b) as allowed to change. */
void fz_allow_tensor(fz_mem *m, int b, size_t off, const qattn_tensor_desc *t);
/* Whether every element of t (f32/f16/bf16) is finite. */
bool fz_tensor_finite(const uint8_t *base, const qattn_tensor_desc *t);

/* Values: a family of distributions and a magnitude chosen by the input. */
typedef struct fz_values {
    uint8_t family;   /* 0 randn, 1 randn + channel bias, 2 small integers, 3 sparse, 4 constant, 5 wide range */
    int8_t log2_mag;  /* magnitude 2^log2_mag */
} fz_values;
fz_values fz_pick_values(fuzz_input *in, qattn_dtype dt);
double fz_draw(const fz_values *v, ref_rng *rng, int64_t channel);
/* Writes value x (rounded to dt) at element index i of base. */
void fz_store(uint8_t *base, qattn_dtype dt, int64_t i, double x);
double fz_load(const uint8_t *base, qattn_dtype dt, int64_t i);

/* Unit roundoff of a stored output dtype, and the absolute floor of its subnormals. */
double fz_dtype_eps(qattn_dtype dt);
double fz_dtype_tiny(qattn_dtype dt);
/* The largest finite value of an output dtype: results past it round to infinity. */
double fz_dtype_max(qattn_dtype dt);

/* ------------------------------------------------------------ references */

/* fp64 softmax over scores s[0..n) with values fetched by the caller:
 * returns lse (natural log), writes weights w[j] = exp(s[j] - lse). */
double fz_softmax(const double *s, int64_t n, double *w);

/* ------------------------------------------------------------ paged KV cache */

/* What qattn_kv_cache_validate must accept, and the sizes it reports. */
fz_verdict fz_cache_verdict(const qattn_kv_cache_desc *d, qattn_kv_cache_sizes *s);
/* Element index of the first value of (slot, head) in a cache of desc c. */
int64_t fz_cache_row(const qattn_kv_cache_desc *c, int64_t slot, int64_t h);

#endif

/* ------------------------------------------------------------ call arguments */

/*
 * Where a call's buffer arguments live. By default each gets its own buffer
 * (library-owned or wrapping an arena), its data at a small aligned offset
 * with some slack after it; mutations put two arguments in one buffer, wrap
 * one over another's memory at a shift, shrink a buffer, pass NULL or a
 * buffer of another context, or pass a hostile offset.
 */
typedef struct fz_arg {
    bool pass;           /* the call gets a buffer for it */
    size_t bytes;        /* bytes the call uses from offset (buffers get at most fz_args_build's cap) */
    size_t align;        /* required alignment of offset */
    bool output;         /* the call writes it (aliasing rule) */
    bool required;       /* the call must have it */
    int group, alias_of;
    int64_t alias_shift;
    bool wrapped, null, foreign, hostile;
    size_t place, offset, tail;
    int shrink;
    int buf;             /* fz_mem buffer index, -1 for none */
} fz_arg;

/* One arrangement byte per argument. */
void fz_args_read(fz_arg *a, int n, fuzz_input *in);
/* Applies one arrangement mutation (share, alias, shrink, null, foreign, offset) chosen by the input. */
void fz_args_mutate(fz_arg *a, int n, fuzz_input *in);
/* Creates the buffers; bytes larger than `cap` get `cap`-byte buffers (a huge request must be refused). */
void fz_args_build(fz_mem *m, fz_arg *a, int n, size_t cap);
static inline qattn_buffer *fz_arg_buffer(const fz_mem *m, const fz_arg *a)
{
    return a->pass && a->buf >= 0 ? m->bufs[a->buf].handle : NULL;
}
/* Host bytes where argument a's data goes (NULL when its buffer cannot hold it). */
uint8_t *fz_arg_host(fz_mem *m, const fz_arg *a);
/* The verdict of the arguments as the header states it: every required
 * argument present, of this context, inside its buffer and aligned; no
 * output sharing a byte with another argument. */
fz_verdict fz_args_verdict(const fz_mem *m, const fz_arg *a, int n);
