/* The CPU backend: host memory buffers, the reference quantizer and the
 * tiled flash kernel of cpu_attention.c. Always built, always usable. */
#include "cpu_backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "quant.h"

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
    size_t bytes = (buf->size + 63) / 64 * 64;
    if (bytes < buf->size)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "a %zu-byte buffer is too large", buf->size);
    void *mem = aligned_alloc(64, bytes);
    if (!mem)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for a %zu-byte buffer", buf->size);
    buf->impl = buf->host = mem;
    return QATTN_OK;
}

static qattn_status cpu_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native)
{
    (void)ctx;
    buf->impl = NULL; /* not ours to free */
    buf->host = native;
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

static qattn_status cpu_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    const qattn_problem *p = &plan->problem;
    if (p->head_dim % 16 != 0 || p->head_dim > 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the cpu backend (multiples of 16 up to 256)",
                               (long long)p->head_dim);
    if (p->seq_q > INT32_MAX || p->seq_k > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "sequence lengths above 2^31-1 are not supported");
    if (plan->precision == QATTN_PRECISION_AUTO) {
        /* The quantized modes emulate GPU number formats here and are slower
         * than fp32 on a CPU, so the fastest mode at the accuracy bar is exact. */
        plan->precision = QATTN_PRECISION_EXACT;
        snprintf(plan->why, sizeof(plan->why),
                 "auto chose exact: on the CPU the quantized modes are emulated and slower than fp32.");
    } else {
        snprintf(plan->why, sizeof(plan->why), "%s as requested.", qattn_precision_name(plan->precision));
    }
    if (plan->precision != QATTN_PRECISION_EXACT) {
        if (plan->granularity == QATTN_GRANULARITY_DEFAULT)
            plan->granularity = QATTN_GRANULARITY_PER_WARP; /* SageAttention2's default */
        /* The same geometry as the CUDA mma.sync kernels, so the CPU result is
         * the reference for theirs. */
        qattn_quant_defaults(&plan->quant, plan->precision, plan->granularity, 128, 32, 64, plan->quant.smooth_k);
    }
    plan->q_tile = CPU_QT;
    plan->kv_tile = 64;
    plan->status_word = false;
    snprintf(plan->kernel, sizeof(plan->kernel), "cpu_flash_%s_d%lld", qattn_precision_name(plan->precision),
             (long long)p->head_dim);
    return QATTN_OK;
}

static qattn_status cpu_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_run_bound *run)
{
    const qattn_problem *p = &plan->problem;
    if (run->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the cpu backend");
    cpu_job job = {
        .plan = plan,
        .q = (const char *)run->q->host + run->q_offset,
        .k = (const char *)run->k->host + run->k_offset,
        .v = (const char *)run->v->host + run->v_offset,
        .o = (char *)run->o->host + run->o_offset,
        .lse = run->lse ? (float *)((char *)run->lse->host + run->lse_offset) : NULL,
        .ws = run->workspace ? (const uint8_t *)run->workspace->host + run->workspace_offset : NULL,
    };
    if (p->check_finite) {
        const struct {
            uint32_t flag;
            const void *base;
            const int64_t *stride;
            int64_t heads, seq;
        } in[3] = {{QATTN_NONFINITE_Q, job.q, p->q_stride, p->heads_q, p->seq_q},
                   {QATTN_NONFINITE_K, job.k, p->k_stride, p->heads_kv, p->seq_k},
                   {QATTN_NONFINITE_V, job.v, p->v_stride, p->heads_kv, p->seq_k}};
        for (int i = 0; i < 3; i++) {
            int64_t shape[4] = {p->batch, in[i].heads, in[i].seq, p->head_dim};
            if (!qattn_host_tensor_is_finite(in[i].base, p->in_dtype, shape, in[i].stride))
                return qattn_nonfinite_error(ctx, in[i].flag);
        }
    }
    if (plan->precision != QATTN_PRECISION_EXACT)
        qattn_quantize_host(plan, job.q, job.k, job.v, (uint8_t *)job.ws, ctx->num_threads);
    qattn_status s = cpu_attention(&job, ctx->num_threads);
    if (s)
        return qattn_set_error(ctx, s, "out of host memory for the cpu kernel's per-thread tiles");
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
    .kv_append = cpu_kv_append,
    .paged_plan_init = cpu_paged_plan_init,
    .paged_run = cpu_paged_run,
    .merge_states = cpu_merge_states,
};
