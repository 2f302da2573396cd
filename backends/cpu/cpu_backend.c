/*
 * The CPU backend's vtable and what it reports and owns directly: the host
 * as its one device, contexts (nothing to hold) and buffers in host memory.
 * Always built, always usable. Dense attention (and the flash engine) is in
 * cpu_attention.c, the paged KV cache in cpu_paged.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cpu_internal.h"

static qattn_status cpu_probe(int *device_count, char *reason, size_t reason_len)
{
    (void)reason;
    (void)reason_len;
    *device_count = 1;
    return QATTN_OK;
}

static void cpu_model_name(char *out, size_t len)
{
    snprintf(out, len, "host CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[512];
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *colon = strchr(line, ':');
            if (colon) {
                colon += 2;
                colon[strcspn(colon, "\n")] = '\0';
                snprintf(out, len, "%s", colon);
            }
            break;
        }
    }
    fclose(f);
}

static qattn_status cpu_device_info(int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    if (device != 0) {
        snprintf(reason, reason_len, "the CPU backend has one device");
        return QATTN_ERR_NOT_FOUND;
    }
    memset(info, 0, sizeof(*info));
    cpu_model_name(info->name, sizeof(info->name));
    snprintf(info->vendor, sizeof(info->vendor), "host");
    snprintf(info->driver, sizeof(info->driver), "qattn cpu (%s)",
#if defined(_OPENMP)
             "OpenMP"
#else
             "single thread"
#endif
    );
    info->compute_units = qattn_host_cpu_count();
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    info->memory_bytes = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    info->max_buffer_bytes = 0; /* limited by host memory only */
    info->caps = QATTN_CAP_UNIFIED_MEMORY;
    info->precisions = (1u << QATTN_PRECISION_AUTO) | (1u << QATTN_PRECISION_EXACT) |
                       (1u << QATTN_PRECISION_INT8_FP16) | (1u << QATTN_PRECISION_INT8_FP8) |
                       (1u << QATTN_PRECISION_INT8_FP8_F16ACC);
    snprintf(info->details, sizeof(info->details),
             "head dims: multiples of 16 up to 256\n"
             "tiles: %d query rows x 64 keys, fp32 vector kernels (AVX-512 / AVX2 / baseline chosen at load)\n"
             "quantized modes: emulate the GPU formats exactly (reference quantization)\n",
             CPU_QT);
    return QATTN_OK;
}

static qattn_status cpu_ctx_init(qattn_ctx *ctx)
{
    ctx->impl = NULL;
    return QATTN_OK;
}

static void cpu_ctx_release(qattn_ctx *ctx) { (void)ctx; }

static qattn_status cpu_synchronize(qattn_ctx *ctx)
{
    (void)ctx;
    return QATTN_OK;
}

static qattn_status cpu_buffer_alloc(qattn_ctx *ctx, qattn_buffer *buf)
{
    size_t bytes = qattn_round_up(buf->size, 64);
    if (bytes < buf->size)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "a %zu-byte buffer is too large", buf->size);
    void *mem = aligned_alloc(64, bytes);
    if (!mem)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for a %zu-byte buffer", buf->size);
    buf->impl = buf->host = mem;
    buf->alias_space = QATTN_PROCESS_ADDRESSES;
    buf->alias_base = (uintptr_t)mem;
    return QATTN_OK;
}

static qattn_status cpu_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native)
{
    (void)ctx;
    buf->impl = NULL; /* not ours to free */
    buf->host = native;
    buf->alias_space = QATTN_PROCESS_ADDRESSES;
    buf->alias_base = (uintptr_t)native;
    return QATTN_OK;
}

static void cpu_buffer_release(qattn_ctx *ctx, qattn_buffer *buf)
{
    (void)ctx;
    free(buf->impl);
}

static qattn_status cpu_buffer_upload(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes)
{
    (void)ctx;
    memmove((char *)buf->host + offset, src, bytes);
    return QATTN_OK;
}

static qattn_status cpu_buffer_download(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst,
                                        size_t bytes)
{
    (void)ctx;
    memmove(dst, (const char *)buf->host + offset, bytes);
    return QATTN_OK;
}

static qattn_status cpu_buffer_fill(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value)
{
    (void)ctx;
    memset((char *)buf->host + offset, value, bytes);
    return QATTN_OK;
}

const qattn_backend_iface qattn_backend_cpu = {
    .api_version = QATTN_BACKEND_API_VERSION,
    .name = "cpu",
    .score = 10,
    .probe = cpu_probe,
    .device_info = cpu_device_info,
    .ctx_init = cpu_ctx_init,
    .ctx_release = cpu_ctx_release,
    .synchronize = cpu_synchronize,
    .buffer_alloc = cpu_buffer_alloc,
    .buffer_wrap = cpu_buffer_wrap,
    .buffer_release = cpu_buffer_release,
    .buffer_upload = cpu_buffer_upload,
    .buffer_download = cpu_buffer_download,
    .buffer_fill = cpu_buffer_fill,
    .plan_init = cpu_plan_init,
    .plan_release = NULL,
    .run = cpu_run,
    .tensor_alignment = 1,
    .sparse = QATTN_SPARSE_CAP_WINDOW | QATTN_SPARSE_CAP_BLOCKS | QATTN_SPARSE_CAP_PREDICT | QATTN_SPARSE_CAP_PV_SKIP |
              QATTN_SPARSE_CAP_PAGED_WINDOW,
    .kv_append = cpu_kv_append,
    .paged_plan_init = cpu_paged_plan_init,
    .paged_run = cpu_paged_run,
    .merge_states = cpu_merge_states,
    .prune = QATTN_PRUNE_CAP_META | QATTN_PRUNE_CAP_SELECT | QATTN_PRUNE_CAP_ADAPTIVE | QATTN_PRUNE_CAP_PAGE_MASS,
    .paged_page_mass = cpu_paged_page_mass,
};
