/* Buffers: the core checks sizes and ranges; backends move the bytes. */
#include <stdlib.h>

#include "internal.h"

static qattn_status new_buffer(qattn_ctx *ctx, size_t bytes, qattn_buffer **out, qattn_buffer **buf)
{
    if (!out)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "out (the buffer pointer) is NULL");
    *out = NULL;
    if (!ctx)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "ctx is NULL");
    if (bytes == 0)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "bytes is 0: buffers hold at least one byte");
    if (ctx->device_info.max_buffer_bytes && bytes > ctx->device_info.max_buffer_bytes)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "a %zu-byte buffer exceeds the %llu bytes backend %s allows in one buffer", bytes,
                               (unsigned long long)ctx->device_info.max_buffer_bytes, ctx->backend->name);
    *buf = calloc(1, sizeof(**buf));
    if (!*buf)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for a buffer handle");
    (*buf)->ctx = ctx;
    (*buf)->size = bytes;
    return QATTN_OK;
}

qattn_status qattn_buffer_create(qattn_ctx *ctx, size_t bytes, qattn_buffer **out)
{
    qattn_buffer *buf = NULL;
    qattn_status s = new_buffer(ctx, bytes, out, &buf);
    if (s)
        return s;
    s = ctx->backend->buffer_alloc(ctx, buf);
    if (s) {
        free(buf);
        return s;
    }
    *out = buf;
    return QATTN_OK;
}

qattn_status qattn_buffer_wrap(qattn_ctx *ctx, void *native, size_t bytes, qattn_buffer **out)
{
    qattn_buffer *buf = NULL;
    qattn_status s = new_buffer(ctx, bytes, out, &buf);
    if (s)
        return s;
    if (!native) {
        free(buf);
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "native (the memory to wrap) is NULL");
    }
    if (!ctx->backend->buffer_wrap) {
        free(buf);
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "backend %s cannot wrap caller memory", ctx->backend->name);
    }
    buf->wrapped = true;
    s = ctx->backend->buffer_wrap(ctx, buf, native);
    if (s) {
        free(buf);
        return s;
    }
    *out = buf;
    return QATTN_OK;
}

void qattn_buffer_destroy(qattn_buffer *buf)
{
    if (!buf)
        return;
    buf->ctx->backend->buffer_release(buf->ctx, buf);
    free(buf);
}

size_t qattn_buffer_size(const qattn_buffer *buf) { return buf ? buf->size : 0; }

static qattn_status check_range(const qattn_buffer *buf, size_t offset, size_t bytes, const void *host,
                                const char *what)
{
    if (!buf)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "buf is NULL");
    if (!host && bytes)
        return qattn_set_error(buf->ctx, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", what);
    if (offset > buf->size || bytes > buf->size - offset)
        return qattn_set_error(buf->ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "%zu bytes at offset %zu do not fit in the %zu-byte buffer", bytes, offset, buf->size);
    return QATTN_OK;
}

qattn_status qattn_buffer_upload(qattn_buffer *buf, size_t offset, const void *src, size_t bytes)
{
    qattn_status s = check_range(buf, offset, bytes, src, "src");
    if (s || !bytes)
        return s;
    return buf->ctx->backend->buffer_upload(buf->ctx, buf, offset, src, bytes);
}

qattn_status qattn_buffer_download(const qattn_buffer *buf, size_t offset, void *dst, size_t bytes)
{
    qattn_status s = check_range(buf, offset, bytes, dst, "dst");
    if (s || !bytes)
        return s;
    return buf->ctx->backend->buffer_download(buf->ctx, buf, offset, dst, bytes);
}

qattn_status qattn_buffer_fill(qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value)
{
    qattn_status s = check_range(buf, offset, bytes, buf, "buf");
    if (s || !bytes)
        return s;
    return buf->ctx->backend->buffer_fill(buf->ctx, buf, offset, bytes, value);
}

const char qattn_process_addresses = 0;

bool qattn_buffer_fits(const qattn_buffer *buf, size_t offset, size_t bytes)
{
    return offset <= buf->size && bytes <= buf->size - offset;
}

bool qattn_buffer_aligned(const qattn_buffer *buf, size_t offset, size_t align)
{
    if (align > 16)
        align = 16;
    return align <= 1 || buf->alias_space != QATTN_PROCESS_ADDRESSES || (buf->alias_base + offset) % align == 0;
}

bool qattn_buffer_ranges_overlap(const qattn_buffer *a, size_t ao, size_t an, const qattn_buffer *b, size_t bo,
                                 size_t bn)
{
    if (!a || !b || !an || !bn)
        return false;
    if (a == b)
        return ao < bo + bn && bo < ao + an;
    if (!a->alias_space || a->alias_space != b->alias_space) /* unknown (Vulkan) or apart */
        return false;
    const uintptr_t x = a->alias_base + ao, y = b->alias_base + bo;
    return x < y + bn && y < x + an;
}

qattn_status qattn_check_outputs(qattn_ctx *ctx, const qattn_span *outs, int n_outs, const qattn_span *ins, int n_ins)
{
    for (int i = 0; i < n_outs; i++) {
        const qattn_span *o = &outs[i];
        for (int j = 0; j < n_ins + n_outs; j++) {
            const qattn_span *x = j < n_ins ? &ins[j] : &outs[j - n_ins];
            if (x == o || (j >= n_ins && j - n_ins < i)) /* each pair of outputs once */
                continue;
            if (qattn_buffer_ranges_overlap(o->buf, o->offset, o->bytes, x->buf, x->offset, x->bytes))
                return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "%s overlaps %s%s", o->name, x->name,
                                       o->buf == x->buf ? " in the same buffer"
                                                        : " (two buffers over the same memory)");
        }
    }
    return QATTN_OK;
}
