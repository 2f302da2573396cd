#include "fuzz_common.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "numeric.h"

void fuzz_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "\nqattn fuzz: property violated at %s:%d: ", file, line);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

void fuzz_check_message(const qattn_ctx *ctx, qattn_status s, const char *call)
{
    FUZZ_CHECK(s != QATTN_OK, "%s: expected a failure", call);
    const char *msg = qattn_last_error(ctx);
    FUZZ_CHECK(msg != NULL && msg[0] != '\0', "%s failed with %s but an empty message", call, qattn_status_str(s));
    FUZZ_CHECK(strncmp(qattn_status_str(s), "QATTN_ERR_", 10) == 0 && strcmp(qattn_status_str(s), "QATTN_ERR_UNKNOWN_STATUS"),
               "%s returned an unknown status %d", call, (int)s);
    FUZZ_CHECK(s != QATTN_ERR_INTERNAL, "%s: QATTN_ERR_INTERNAL: %s", call, msg);
}

/* ------------------------------------------------------------ input */

uint8_t fz_u8(fuzz_input *in) { return in->pos < in->size ? in->data[in->pos++] : 0; }

uint32_t fz_u32(fuzz_input *in)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)fz_u8(in) << (8 * i);
    return v;
}

uint64_t fz_u64(fuzz_input *in) { return (uint64_t)fz_u32(in) | (uint64_t)fz_u32(in) << 32; }

uint32_t fz_below(fuzz_input *in, uint32_t n)
{
    if (n <= 1)
        return 0;
    if (n <= 256)
        return fz_u8(in) % n;
    return (fz_u8(in) | (uint32_t)fz_u8(in) << 8) % n;
}

bool fz_more(const fuzz_input *in) { return in->pos < in->size; }

int64_t fz_hostile_i64(fuzz_input *in)
{
    static const int64_t interesting[] = {
        0, -1, 1, 2, 3, 15, 16, 17, 255, 256, 65535, 65536, 65537,
        INT32_MAX, (int64_t)INT32_MAX + 1, (int64_t)1 << 32, ((int64_t)1 << 32) + 1,
        (int64_t)1 << 40, (int64_t)1 << 47, (int64_t)1 << 52, (int64_t)1 << 61, (int64_t)1 << 62,
        INT64_MAX / 2, INT64_MAX / 2 + 1, INT64_MAX / 4, INT64_MAX / 256, INT64_MAX - 1, INT64_MAX,
        INT64_MIN, INT64_MIN + 1, INT32_MIN, -2, -16, -65536,
    };
    const uint32_t n = sizeof(interesting) / sizeof(interesting[0]);
    uint32_t pick = fz_u8(in);
    if (pick < n)
        return interesting[pick];
    if (pick < 200)
        return (int64_t)fz_u8(in) - 8; /* small, sometimes negative */
    return (int64_t)fz_u64(in);
}

size_t fz_hostile_offset(fuzz_input *in, size_t size)
{
    switch (fz_u8(in) % 8) {
    case 0: return size;
    case 1: return size + 1;
    case 2: return SIZE_MAX;
    case 3: return SIZE_MAX - fz_u8(in);
    case 4: return (size_t)1 << 63;
    case 5: return size ? size - 1 : 0;
    case 6: return (size_t)fz_u8(in) * 2 + 1; /* odd: misaligned for every dtype but i8 */
    default: return (size_t)fz_u64(in);
    }
}

float fz_hostile_float(fuzz_input *in)
{
    static const float values[] = {NAN, INFINITY, -INFINITY, 0.f, -0.f, FLT_MIN, FLT_MIN / 4, -FLT_MIN, FLT_MAX,
                                   -FLT_MAX, 1e-30f, 1e30f, -1.f, 1.f, 0x1p-100f, 0x1p-101f, 65504.f, 65520.f, 448.f,
                                   464.f, -448.f, 1e-45f};
    uint8_t pick = fz_u8(in);
    if (pick < sizeof(values) / sizeof(values[0]))
        return values[pick];
    uint32_t bits = fz_u32(in);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ------------------------------------------------------------ contexts */

static qattn_ctx *make_ctx(void)
{
    qattn_ctx_params params = {.backend = "cpu", .num_threads = 1};
    qattn_ctx *ctx = NULL;
    qattn_status s = qattn_ctx_create(&params, &ctx);
    if (s) {
        fprintf(stderr, "qattn fuzz: no cpu context: %s\n", qattn_last_error(NULL));
        abort();
    }
    return ctx;
}

qattn_ctx *fuzz_ctx(void)
{
    static qattn_ctx *ctx;
    if (!ctx) {
        setenv("QATTN_LOG", "error", 0); /* expected failures need no log lines */
        ctx = make_ctx();
    }
    return ctx;
}

qattn_ctx *fuzz_other_ctx(void)
{
    static qattn_ctx *ctx;
    if (!ctx)
        ctx = make_ctx();
    return ctx;
}

/* ------------------------------------------------------------ memory model */

static int new_unit(fz_mem *m, size_t size)
{
    FUZZ_CHECK(m->n_units < FZ_MAX_UNITS, "harness: too many units");
    fz_unit *u = &m->units[m->n_units];
    memset(u, 0, sizeof(*u));
    u->size = size;
    u->host = malloc(size ? size : 1);
    u->before = malloc(size ? size : 1);
    u->after = malloc(size ? size : 1);
    u->may_change = calloc(size ? size : 1, 1);
    FUZZ_CHECK(u->host && u->before && u->after && u->may_change, "harness: out of memory");
    u->owned_buf = -1;
    return m->n_units++;
}

static int new_buf(fz_mem *m)
{
    FUZZ_CHECK(m->n_bufs < FZ_MAX_BUFS, "harness: too many buffers");
    memset(&m->bufs[m->n_bufs], 0, sizeof(m->bufs[0]));
    m->bufs[m->n_bufs].unit = -1;
    return m->n_bufs++;
}

static int create_on(fz_mem *m, qattn_ctx *ctx, size_t size, bool foreign)
{
    qattn_buffer *h = NULL;
    qattn_status s = qattn_buffer_create(ctx, size, &h);
    if (size == 0) {
        FUZZ_CHECK(s != QATTN_OK && h == NULL, "qattn_buffer_create accepted 0 bytes");
        fuzz_check_message(ctx, s, "qattn_buffer_create(0)");
        return -1;
    }
    FUZZ_CHECK(s == QATTN_OK, "qattn_buffer_create(%zu): %s: %s", size, qattn_status_str(s), qattn_last_error(ctx));
    FUZZ_CHECK(qattn_buffer_size(h) == size, "qattn_buffer_size");
    int b = new_buf(m);
    int u = new_unit(m, size);
    m->units[u].owned_buf = b;
    m->bufs[b] = (fz_buf){.handle = h, .unit = u, .unit_offset = 0, .size = size, .foreign = foreign};
    return b;
}

int fz_owned(fz_mem *m, size_t size) { return create_on(m, fuzz_ctx(), size, false); }
int fz_foreign(fz_mem *m, size_t size) { return create_on(m, fuzz_other_ctx(), size, true); }

int fz_arena(fz_mem *m, size_t size) { return new_unit(m, size); }

int fz_wrap(fz_mem *m, int unit, size_t offset, size_t size)
{
    fz_unit *u = &m->units[unit];
    FUZZ_CHECK(offset <= u->size && size <= u->size - offset, "harness: wrap outside its arena");
    qattn_buffer *h = NULL;
    qattn_status s = qattn_buffer_wrap(fuzz_ctx(), u->host + offset, size, &h);
    if (size == 0) {
        FUZZ_CHECK(s != QATTN_OK && h == NULL, "qattn_buffer_wrap accepted 0 bytes");
        fuzz_check_message(fuzz_ctx(), s, "qattn_buffer_wrap(0)");
        return -1;
    }
    FUZZ_CHECK(s == QATTN_OK, "qattn_buffer_wrap(%zu): %s: %s", size, qattn_status_str(s), qattn_last_error(fuzz_ctx()));
    int b = new_buf(m);
    m->bufs[b] = (fz_buf){.handle = h, .unit = unit, .unit_offset = offset, .size = size, .wrapped = true};
    return b;
}

uint8_t *fz_host(fz_mem *m, int b, size_t off)
{
    const fz_buf *buf = &m->bufs[b];
    return m->units[buf->unit].host + buf->unit_offset + off;
}

FZ_QUIET void fz_garbage(fz_mem *m, ref_rng *rng)
{
    uint64_t x = (uint64_t)(ref_rng_uniform(rng) * 0x1p53) | 1;
    for (int i = 0; i < m->n_units; i++)
        for (size_t j = 0; j < m->units[i].size; j++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift: garbage needs no quality */
            m->units[i].host[j] = (uint8_t)(x >> 32);
        }
}

FZ_QUIET static void snapshot(fz_mem *m, bool after)
{
    for (int i = 0; i < m->n_units; i++) {
        fz_unit *u = &m->units[i];
        uint8_t *dst = after ? u->after : u->before;
        if (u->owned_buf >= 0) {
            qattn_status s = qattn_buffer_download(m->bufs[u->owned_buf].handle, 0, dst, u->size);
            FUZZ_CHECK(s == QATTN_OK, "qattn_buffer_download: %s", qattn_last_error(NULL));
        } else {
            memcpy(dst, u->host, u->size);
        }
    }
}

FZ_QUIET void fz_commit(fz_mem *m)
{
    for (int i = 0; i < m->n_units; i++) {
        fz_unit *u = &m->units[i];
        if (u->owned_buf >= 0) {
            qattn_status s = qattn_buffer_upload(m->bufs[u->owned_buf].handle, 0, u->host, u->size);
            FUZZ_CHECK(s == QATTN_OK, "qattn_buffer_upload: %s", qattn_last_error(NULL));
        }
        memset(u->may_change, 0, u->size);
    }
    snapshot(m, false);
    for (int i = 0; i < m->n_units; i++)
        FUZZ_CHECK(memcmp(m->units[i].before, m->units[i].host, m->units[i].size) == 0,
                   "a buffer read back differs from what was uploaded");
}

FZ_QUIET void fz_allow(fz_mem *m, int b, size_t off, size_t n)
{
    if (b < 0)
        return;
    const fz_buf *buf = &m->bufs[b];
    if (off >= buf->size)
        return;
    if (n > buf->size - off)
        n = buf->size - off;
    memset(m->units[buf->unit].may_change + buf->unit_offset + off, 1, n);
}

FZ_QUIET void fz_check_unchanged(fz_mem *m, const char *what)
{
    snapshot(m, true);
    for (int i = 0; i < m->n_units; i++) {
        const fz_unit *u = &m->units[i];
        for (size_t j = 0; j < u->size; j++)
            FUZZ_CHECK(u->may_change[j] || u->before[j] == u->after[j],
                       "%s: byte %zu of unit %d (%s, %zu bytes) changed from 0x%02x to 0x%02x although the call may not "
                       "write it",
                       what, j, i, u->owned_buf >= 0 ? "library buffer" : "wrapped arena", u->size, u->before[j],
                       u->after[j]);
    }
}

const uint8_t *fz_before(const fz_mem *m, int b, size_t off)
{
    const fz_buf *buf = &m->bufs[b];
    return m->units[buf->unit].before + buf->unit_offset + off;
}

const uint8_t *fz_after(const fz_mem *m, int b, size_t off)
{
    const fz_buf *buf = &m->bufs[b];
    return m->units[buf->unit].after + buf->unit_offset + off;
}

bool fz_address_aligned(const fz_mem *m, int b, size_t off, size_t align)
{
    const fz_buf *buf = &m->bufs[b];
    if (align > 16)
        align = 16; /* the library's buffers start 64-byte aligned; wrapped ones anywhere */
    return !buf->wrapped || align <= 1 ||
           (uintptr_t)(m->units[buf->unit].host + buf->unit_offset + off) % align == 0;
}

bool fz_overlap(const fz_mem *m, int a, size_t ao, size_t an, int b, size_t bo, size_t bn)
{
    if (a < 0 || b < 0)
        return false;
    const fz_buf *x = &m->bufs[a], *y = &m->bufs[b];
    if (ao >= x->size || bo >= y->size || !an || !bn)
        return false;
    if (an > x->size - ao)
        an = x->size - ao;
    if (bn > y->size - bo)
        bn = y->size - bo;
    if (a != b && !(x->wrapped && y->wrapped && x->unit == y->unit))
        return false;
    const size_t xs = x->unit_offset + ao, ys = y->unit_offset + bo;
    return xs < ys + bn && ys < xs + an;
}

void fz_release(fz_mem *m)
{
    for (int i = 0; i < m->n_bufs; i++)
        qattn_buffer_destroy(m->bufs[i].handle);
    for (int i = 0; i < m->n_units; i++) {
        free(m->units[i].host);
        free(m->units[i].before);
        free(m->units[i].after);
        free(m->units[i].may_change);
    }
    m->n_bufs = m->n_units = 0;
}

/* ------------------------------------------------------------ tensors */

/* The sufficient test qattn_check_tensor applies: dims sorted by stride, each
 * stride at least the span of the smaller ones. */
FZ_QUIET static bool nested_strides(const qattn_tensor_desc *t)
{
    int order[4] = {0, 1, 2, 3};
    for (int i = 1; i < 4; i++)
        for (int j = i; j > 0 && t->stride[order[j]] < t->stride[order[j - 1]]; j--) {
            int tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
    unsigned __int128 reach = 1;
    for (int i = 0; i < 4; i++) {
        const int dim = order[i];
        if (t->shape[dim] == 1)
            continue;
        if ((unsigned __int128)t->stride[dim] < reach)
            return false;
        reach = (unsigned __int128)t->stride[dim] * (unsigned __int128)t->shape[dim];
    }
    return true;
}

FZ_QUIET fz_verdict fz_tensor_verdict(const qattn_tensor_desc *t, size_t *bytes)
{
    *bytes = 0;
    if ((unsigned)t->dtype >= QATTN_DTYPE_COUNT)
        return FZ_INVALID;
    for (int i = 0; i < 4; i++)
        if (t->shape[i] <= 0)
            return FZ_INVALID;
    if (t->stride[3] != 1)
        return FZ_INVALID;
    for (int i = 0; i < 3; i++)
        if (t->stride[i] <= 0)
            return FZ_INVALID;
    unsigned __int128 last = 0, count = 1;
    for (int i = 0; i < 4; i++) {
        last += (unsigned __int128)(t->shape[i] - 1) * (unsigned __int128)t->stride[i];
        count *= (unsigned __int128)t->shape[i];
    }
    const unsigned __int128 span = (last + 1) * qattn_dtype_size(t->dtype);
    /* more elements than addresses in the span: some share one */
    if (count > last + 1)
        return FZ_INVALID;
    if (span > (unsigned __int128)SIZE_MAX)
        return FZ_INVALID;
    if (span > (unsigned __int128)1 << 62)
        return FZ_EITHER; /* the library may refuse spans this large (it keeps a margin) */
    *bytes = (size_t)span;
    const bool nested = nested_strides(t);
    if (count > (1u << 16) || last + 1 > (1u << 22))
        return nested ? FZ_VALID : FZ_EITHER; /* too large to enumerate */
    /* Enumerate: every element's address once. */
    const size_t words = (size_t)(last + 1 + 63) / 64;
    uint64_t *seen = calloc(words, 8);
    FUZZ_CHECK(seen, "harness: out of memory");
    bool clash = false;
    for (int64_t b = 0; b < t->shape[0] && !clash; b++)
        for (int64_t h = 0; h < t->shape[1] && !clash; h++)
            for (int64_t n = 0; n < t->shape[2] && !clash; n++)
                for (int64_t d = 0; d < t->shape[3]; d++) {
                    const uint64_t at = (uint64_t)fz_offset_of(t, b, h, n, d);
                    if (seen[at / 64] >> (at % 64) & 1) {
                        clash = true;
                        break;
                    }
                    seen[at / 64] |= (uint64_t)1 << (at % 64);
                }
    free(seen);
    if (clash)
        return FZ_INVALID;
    return FZ_VALID; /* interleaved (not nested) strides whose elements never meet are valid too */
}

FZ_QUIET void fz_allow_tensor(fz_mem *m, int b, size_t off, const qattn_tensor_desc *t)
{
    const size_t es = qattn_dtype_size(t->dtype);
    for (int64_t i = 0; i < t->shape[0]; i++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t n = 0; n < t->shape[2]; n++)
                fz_allow(m, b, off + (size_t)fz_offset_of(t, i, h, n, 0) * es, (size_t)t->shape[3] * es);
}

FZ_QUIET bool fz_tensor_finite(const uint8_t *base, const qattn_tensor_desc *t)
{
    for (int64_t i = 0; i < t->shape[0]; i++)
        for (int64_t h = 0; h < t->shape[1]; h++)
            for (int64_t n = 0; n < t->shape[2]; n++)
                for (int64_t d = 0; d < t->shape[3]; d++)
                    if (!isfinite(fz_load(base, t->dtype, fz_offset_of(t, i, h, n, d))))
                        return false;
    return true;
}

fz_values fz_pick_values(fuzz_input *in, qattn_dtype dt)
{
    fz_values v = {.family = (uint8_t)(fz_u8(in) % 6)};
    /* 2^-14 .. 2^5: inside fp16's normal range with room for a channel bias */
    v.log2_mag = (int8_t)((int)fz_below(in, 20) - 14);
    if (dt == QATTN_DTYPE_F32 && v.log2_mag > 3)
        v.log2_mag = 3;
    return v;
}

FZ_QUIET double fz_draw(const fz_values *v, ref_rng *rng, int64_t channel)
{
    const double mag = ldexp(1.0, v->log2_mag);
    switch (v->family) {
    case 1: return mag * (ref_rng_normal(rng) + 8.0 * sin(1.7 * (double)channel + 0.3));
    case 2: return mag * (double)((int)(ref_rng_uniform(rng) * 7.0) - 3);
    case 3: return ref_rng_uniform(rng) < 0.9 ? 0.0 : 4.0 * mag * ref_rng_normal(rng);
    case 4: return mag;
    case 5: return ref_rng_normal(rng) * ldexp(1.0, (int)(ref_rng_uniform(rng) * (v->log2_mag + 13)) - 12);
    default: return mag * ref_rng_normal(rng);
    }
}

FZ_QUIET void fz_store(uint8_t *base, qattn_dtype dt, int64_t i, double x)
{
    switch (dt) {
    case QATTN_DTYPE_F16: {
        uint16_t h = qattn_f32_to_f16((float)x);
        memcpy(base + i * 2, &h, 2);
        break;
    }
    case QATTN_DTYPE_BF16: {
        uint16_t h = qattn_f32_to_bf16((float)x);
        memcpy(base + i * 2, &h, 2);
        break;
    }
    default: {
        float f = (float)x;
        memcpy(base + i * 4, &f, 4);
        break;
    }
    }
}

FZ_QUIET double fz_load(const uint8_t *base, qattn_dtype dt, int64_t i)
{
    uint16_t h;
    float f;
    switch (dt) {
    case QATTN_DTYPE_F16: memcpy(&h, base + i * 2, 2); return qattn_f16_to_f32(h);
    case QATTN_DTYPE_BF16: memcpy(&h, base + i * 2, 2); return qattn_bf16_to_f32(h);
    default: memcpy(&f, base + i * 4, 4); return f;
    }
}

double fz_dtype_eps(qattn_dtype dt)
{
    return dt == QATTN_DTYPE_F16 ? 0x1p-11 : dt == QATTN_DTYPE_BF16 ? 0x1p-8 : 0x1p-24;
}

double fz_dtype_tiny(qattn_dtype dt)
{
    return dt == QATTN_DTYPE_F16 ? 0x1p-25 : dt == QATTN_DTYPE_BF16 ? 0x1p-133 : 0x1p-149;
}

FZ_QUIET double fz_dtype_max(qattn_dtype dt)
{
    return dt == QATTN_DTYPE_F16 ? 65504.0 : dt == QATTN_DTYPE_BF16 ? 0x1.fep127 : 0x1.fffffep127;
}

FZ_QUIET double fz_softmax(const double *s, int64_t n, double *w)
{
    double m = -INFINITY;
    for (int64_t j = 0; j < n; j++)
        m = s[j] > m ? s[j] : m;
    if (n == 0 || m == -INFINITY)
        return -INFINITY;
    double l = 0.0;
    for (int64_t j = 0; j < n; j++)
        l += exp(s[j] - m);
    for (int64_t j = 0; j < n; j++) /* relative to the max: lse itself may have no digits left for log(l) */
        w[j] = exp(s[j] - m) / l;
    return m + log(l);
}

/* ------------------------------------------------------------ call arguments */

#define FZ_HOSTILE_MARK ((size_t)1 << 62)

void fz_args_read(fz_arg *a, int n, fuzz_input *in)
{
    static const size_t tails[4] = {0, 1, 16, 64};
    for (int i = 0; i < n; i++) {
        const uint8_t b = fz_u8(in);
        a[i].group = i;
        a[i].alias_of = -1;
        a[i].wrapped = b & 1;
        a[i].place = (size_t)((b >> 1) & 3) * 8;
        a[i].tail = tails[(b >> 3) & 3];
        a[i].buf = -1;
    }
}

void fz_args_mutate(fz_arg *a, int n, fuzz_input *in)
{
    const uint8_t op = fz_u8(in) % 6;
    fz_arg *x = &a[fz_u8(in) % n];
    switch (op) {
    case 0: case 1: { /* the same buffer as another argument (0) or a wrapped alias of its memory (1) */
        const int y = fz_u8(in) % n;
        const uint8_t at = fz_u8(in);
        /* mostly 8-byte steps; a set low bit of `at` shifts by 1..7 bytes: misaligned wraps */
        const int64_t shift = (int64_t)(at >> 1) * 8 - 256 + (at & 1 ? 1 + (int64_t)(fz_u8(in) % 7) : 0);
        if (x == &a[y])
            break;
        if (op == 0) {
            x->group = a[y].group;
            x->alias_of = -1;
            x->place = (size_t)(shift + 256);
        } else {
            x->group = (int)(x - a);
            x->alias_of = y;
            x->alias_shift = shift;
        }
        break;
    }
    case 2: x->shrink = 1 + fz_u8(in) % 64; break;
    case 3: x->null = true; break;
    case 4: x->foreign = true; break;
    default:
        x->hostile = true;
        x->offset = fz_hostile_offset(in, 4096);
        break;
    }
}

void fz_args_build(fz_mem *m, fz_arg *a, int n, size_t cap)
{
    size_t group_size[FZ_MAX_BUFS] = {0};
    int group_buf[FZ_MAX_BUFS], group_arena[FZ_MAX_BUFS];
    FUZZ_CHECK(n <= FZ_MAX_BUFS, "harness: too many arguments");
    for (int i = 0; i < n; i++) {
        group_buf[i] = group_arena[i] = -1;
        a[i].buf = -1;
    }
#define ALLOC_BYTES(x) ((x)->bytes < cap ? (x)->bytes : cap)
    for (int i = 0; i < n; i++)
        if (a[i].pass && a[i].alias_of < 0) {
            const size_t end = a[i].place + ALLOC_BYTES(&a[i]) + a[i].tail;
            group_size[a[i].group] = end > group_size[a[i].group] ? end : group_size[a[i].group];
        }
    for (int i = 0; i < n; i++) {
        fz_arg *x = &a[i];
        if (!x->pass || x->null)
            continue;
        if (x->foreign) {
            x->buf = fz_foreign(m, x->place + ALLOC_BYTES(x) + x->tail);
            continue;
        }
        if (x->alias_of >= 0)
            continue;
        const int g = x->group;
        if (group_buf[g] < 0) {
            const size_t shrink = (size_t)(a[g].shrink > x->shrink ? a[g].shrink : x->shrink);
            const size_t size = group_size[g] > shrink ? group_size[g] - shrink : 0;
            if (a[g].wrapped || x->wrapped) {
                group_arena[g] = fz_arena(m, size + 1024); /* room for aliases on both sides */
                group_buf[g] = fz_wrap(m, group_arena[g], 256, size);
            } else {
                group_buf[g] = fz_owned(m, size);
            }
        }
        x->buf = group_buf[g];
    }
    for (int i = 0; i < n; i++) {
        fz_arg *x = &a[i];
        if (!x->pass || x->null || x->foreign || x->alias_of < 0)
            continue;
        const int arena = group_arena[a[x->alias_of].group];
        const size_t size = x->place + ALLOC_BYTES(x) + x->tail;
        const int64_t at = 256 + x->alias_shift;
        if (arena >= 0 && at >= 0 && (size_t)at + size <= m->units[arena].size) {
            x->buf = fz_wrap(m, arena, (size_t)at, size);
        } else {
            const int own = fz_arena(m, size);
            x->buf = fz_wrap(m, own, 0, size);
        }
    }
    for (int i = 0; i < n; i++)
        if (!a[i].hostile)
            a[i].offset = a[i].place;
#undef ALLOC_BYTES
}

uint8_t *fz_arg_host(fz_mem *m, const fz_arg *a)
{
    if (!a->pass || a->buf < 0 || a->place > m->bufs[a->buf].size || a->bytes > m->bufs[a->buf].size - a->place)
        return NULL;
    return fz_host(m, a->buf, a->place);
}

fz_verdict fz_args_verdict(const fz_mem *m, const fz_arg *a, int n)
{
    for (int i = 0; i < n; i++) {
        if (!a[i].required)
            continue;
        if (!a[i].pass || a[i].buf < 0 || a[i].foreign)
            return FZ_INVALID;
        const fz_buf *buf = &m->bufs[a[i].buf];
        if (a[i].offset > buf->size || a[i].bytes > buf->size - a[i].offset || (a[i].align && a[i].offset % a[i].align))
            return FZ_INVALID;
        if (!fz_address_aligned(m, a[i].buf, a[i].offset, a[i].align))
            return FZ_INVALID;
    }
    for (int i = 0; i < n; i++) {
        if (!a[i].output || !a[i].pass || a[i].buf < 0)
            continue;
        for (int j = 0; j < n; j++)
            if (j != i && a[j].pass && a[j].buf >= 0 &&
                fz_overlap(m, a[i].buf, a[i].offset, a[i].bytes, a[j].buf, a[j].offset, a[j].bytes))
                return FZ_INVALID;
    }
    return FZ_VALID;
}

/* ------------------------------------------------------------ paged KV cache */

/* What qattn_kv_cache_validate must accept, and the sizes. */
fz_verdict fz_cache_verdict(const qattn_kv_cache_desc *d, qattn_kv_cache_sizes *s)
{
    memset(s, 0, sizeof(*s));
    if (d->num_pages <= 0 || d->num_pages > INT32_MAX || d->page_size <= 0 || d->page_size > INT32_MAX ||
        d->heads_kv <= 0 || d->heads_kv > 65536 || d->head_dim <= 0 || d->head_dim > 65536)
        return FZ_INVALID;
    if ((unsigned)d->layout > QATTN_KV_HND)
        return FZ_INVALID;
    const bool plain = d->dtype == QATTN_DTYPE_F16 || d->dtype == QATTN_DTYPE_BF16;
    if (plain ? d->scales != QATTN_KV_SCALES_NONE
              : d->dtype == QATTN_DTYPE_FP8_E4M3 ? d->scales != QATTN_KV_SCALES_PER_HEAD
              : d->dtype == QATTN_DTYPE_I8 ? (d->scales != QATTN_KV_SCALES_PER_HEAD && d->scales != QATTN_KV_SCALES_PER_ROW)
              : true)
        return FZ_INVALID;
    const unsigned __int128 page = (unsigned __int128)d->page_size * d->heads_kv * d->head_dim * qattn_dtype_size(d->dtype);
    const unsigned __int128 cache = page * (unsigned __int128)d->num_pages;
    const unsigned __int128 scales = d->scales == QATTN_KV_SCALES_PER_ROW
                                         ? (unsigned __int128)d->num_pages * d->page_size * d->heads_kv * 4
                                         : d->scales == QATTN_KV_SCALES_PER_HEAD ? (unsigned __int128)d->heads_kv * 4 : 0;
    if (cache > SIZE_MAX || scales > SIZE_MAX)
        return FZ_INVALID;
    s->page_bytes = (size_t)page;
    s->cache_bytes = (size_t)cache;
    s->scale_bytes = (size_t)scales;
    return cache > (unsigned __int128)1 << 62 ? FZ_EITHER : FZ_VALID;
}


int64_t fz_cache_row(const qattn_kv_cache_desc *c, int64_t slot, int64_t h)
{
    const int64_t page = slot / c->page_size, off = slot % c->page_size;
    const int64_t within = c->layout == QATTN_KV_NHD ? off * c->heads_kv + h : h * c->page_size + off;
    return (page * c->page_size * c->heads_kv + within) * c->head_dim;
}

