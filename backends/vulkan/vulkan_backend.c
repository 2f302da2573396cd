/*
 * The Vulkan backend's vtable and what it reports and owns directly: probing
 * and device information, contexts (a VkDevice each, opened by the runtime)
 * and buffers (device-local memory, copied through the staging buffer).
 * Dense attention is in vulkan_attention.c, the paged KV cache in
 * vulkan_paged.c, the shared machinery in vulkan_runtime.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "vulkan_internal.h"

/* ---------------------------------------------------------------- devices */

static qattn_status vk_probe(int *device_count, char *reason, size_t reason_len)
{
    const vk_instance *inst = vk_instance_get(reason, reason_len);
    if (!inst) {
        *device_count = 0;
        return QATTN_ERR_UNAVAILABLE;
    }
    *device_count = inst->device_count;
    return QATTN_OK;
}

/* auto prefers the native CPU backend to a CPU implementation of Vulkan. */
static int vk_auto_score(void)
{
    const vk_instance *inst = vk_instance_get(NULL, 0);
    if (!inst || inst->device_count == 0)
        return 0;
    return inst->devices[0].props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU ? 5 : 50; /* the cpu backend scores 10 */
}

static const char *vendor_name(uint32_t id)
{
    switch (id) {
    case 0x10de: return "NVIDIA";
    case 0x1002: return "AMD";
    case 0x8086: return "Intel";
    case 0x13b5: return "ARM";
    case 0x5143: return "Qualcomm";
    case 0x106b: return "Apple";
    case 0x10005: return "Mesa";
    default: return "unknown";
    }
}

static const char *component_name(VkComponentTypeKHR t)
{
    static const char *const names[] = {"f16", "f32", "f64", "s8", "s16", "s32", "s64", "u8", "u16", "u32", "u64"};
    if ((unsigned)t == 1000141000u) /* VK_COMPONENT_TYPE_BFLOAT16_KHR */
        return "bf16";
    return (unsigned)t < sizeof(names) / sizeof(names[0]) ? names[t] : "?";
}

/* The free-text details of qattn-info: the device's features and the kernels it gets. */
static void describe_device(const vk_device_caps *c, char *out, size_t len)
{
    char shapes[768] = "";
    for (uint32_t i = 0; i < c->shape_count; i++) {
        const VkCooperativeMatrixPropertiesKHR *s = &c->shapes[i];
        vk_str_append(shapes, sizeof(shapes), "%s%ux%ux%u %sx%s+%s->%s%s%s", i ? ", " : "", s->MSize, s->NSize,
                      s->KSize, component_name(s->AType), component_name(s->BType), component_name(s->CType),
                      component_name(s->ResultType), s->saturatingAccumulation ? " sat" : "",
                      s->scope == VK_SCOPE_SUBGROUP_KHR ? "" : " (non-subgroup scope)");
    }
    const VkPhysicalDeviceLimits *lim = &c->props.limits;
    snprintf(out, len,
             "Vulkan API %u.%u.%u, driver version 0x%x, device type %d\n"
             "subgroup size %u (min %u, max %u; size control %s, full subgroups %s)\n"
             "fp16 arithmetic %s, int8 arithmetic %s, fp64 %s, 16-bit storage %s, 8-bit storage %s\n"
             "integer dot product %s%s\n"
             "cooperative matrix (VK_KHR_cooperative_matrix): %s%s%s\n"
             "VK_NV_cooperative_matrix2 %s, VK_EXT_shader_float8 %s, VK_KHR_shader_bfloat16 %s\n"
             "maxComputeSharedMemorySize %u, maxStorageBufferRange %u, maxMemoryAllocationSize %llu\n"
             "kernels: scalar flash (any device)%s; paged KV cache (f16/bf16/fp8/int8 pages); FP8 modes not "
             "implemented on Vulkan\n",
             VK_API_VERSION_MAJOR(c->api_version), VK_API_VERSION_MINOR(c->api_version),
             VK_API_VERSION_PATCH(c->api_version), c->props.driverVersion, (int)c->props.deviceType,
             c->subgroup_size, c->min_subgroup, c->max_subgroup, c->subgroup_size_control ? "yes" : "no",
             c->full_subgroups ? "yes" : "no", c->float16 ? "yes" : "no", c->int8 ? "yes" : "no",
             c->float64 ? "yes" : "no", c->storage16 ? "yes" : "no", c->storage8 ? "yes" : "no",
             c->int_dot ? "yes" : "no",
             c->int_dot ? (c->int_dot_accelerated ? " (4x8 packed accelerated)" : " (not accelerated)") : "",
             c->coopmat ? "yes" : "no", c->shape_count ? "; shapes: " : "", shapes, c->coopmat2_nv ? "yes" : "no",
             c->float8_ext ? "yes" : "no", c->bfloat16_ext ? "yes" : "no", lim->maxComputeSharedMemorySize,
             lim->maxStorageBufferRange, (unsigned long long)c->max_alloc,
             c->coopmat_f16_16x16x16 ? ", cooperative-matrix flash (fp16 16x16x16)" : "");
}

static qattn_status vk_device_info(int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    const vk_instance *inst = vk_instance_get(reason, reason_len);
    if (!inst)
        return QATTN_ERR_UNAVAILABLE;
    if (device < 0 || device >= inst->device_count) {
        snprintf(reason, reason_len, "device %d does not exist (%d usable Vulkan devices)", device, inst->device_count);
        return QATTN_ERR_NOT_FOUND;
    }
    const vk_device_caps *c = &inst->devices[device];
    memset(info, 0, sizeof(*info));
    snprintf(info->name, sizeof(info->name), "%s", c->props.deviceName);
    snprintf(info->vendor, sizeof(info->vendor), "%s (0x%04x)", vendor_name(c->props.vendorID), c->props.vendorID);
    snprintf(info->driver, sizeof(info->driver), "%s%s%s", c->driver_name[0] ? c->driver_name : "driver",
             c->driver_info[0] ? " " : "", c->driver_info);
    info->compute_units = (int)c->compute_units; /* 0: core Vulkan does not report it */
    info->memory_bytes = c->device_local_bytes;
    uint64_t max = c->max_buffer < c->max_alloc ? c->max_buffer : c->max_alloc;
    /* Shaders index buffers with 32-bit element indices; 4 GiB - 4 is the most they reach. */
    if (max > 0xfffffffcull)
        max = 0xfffffffcull;
    info->max_buffer_bytes = max;
    info->caps = QATTN_CAP_SUBGROUPS | QATTN_CAP_BF16; /* bf16: as storage (converted to fp32) */
    if (c->float16)
        info->caps |= QATTN_CAP_FP16;
    if (c->int_dot)
        info->caps |= QATTN_CAP_INT8_DOT;
    if (c->float8_ext)
        info->caps |= QATTN_CAP_FP8;
    if (c->coopmat)
        info->caps |= QATTN_CAP_MATRIX_UNITS;
    if (c->props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU)
        info->caps |= QATTN_CAP_UNIFIED_MEMORY;
    info->precisions = (1u << QATTN_PRECISION_AUTO) | (1u << QATTN_PRECISION_EXACT) |
                       (1u << QATTN_PRECISION_INT8_FP16);
    describe_device(c, info->details, sizeof(info->details));
    return QATTN_OK;
}

/* ---------------------------------------------------------------- contexts */

static void vk_ctx_release(qattn_ctx *ctx)
{
    vk_ctx *vc = ctx->impl;
    if (!vc)
        return;
    if (vc->device) {
        vc->vk.vkDeviceWaitIdle(vc->device);
        vk_paged_ctx_release(vc);
        vk_device_close(vc);
    }
    pthread_mutex_destroy(&vc->lock);
    free(vc);
    ctx->impl = NULL;
}

static qattn_status vk_ctx_init(qattn_ctx *ctx)
{
    char reason[QATTN_NAME_MAX] = "";
    const vk_instance *inst = vk_instance_get(reason, sizeof(reason));
    if (!inst)
        return qattn_set_error(ctx, QATTN_ERR_UNAVAILABLE, "%s", reason);
    if (ctx->device < 0 || ctx->device >= inst->device_count)
        return qattn_set_error(ctx, QATTN_ERR_NOT_FOUND, "Vulkan device %d does not exist", ctx->device);
    if (inst->validation_unavailable[0]) /* asked for by QATTN_VULKAN_VALIDATION=1: no silent run without it */
        return qattn_set_error(ctx, QATTN_ERR_BACKEND, "%s", inst->validation_unavailable);
    vk_ctx *vc = calloc(1, sizeof(*vc));
    if (!vc)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the Vulkan context");
    if (pthread_mutex_init(&vc->lock, NULL)) {
        free(vc);
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "cannot create a mutex");
    }
    ctx->impl = vc;
    vc->caps = &inst->devices[ctx->device];
    qattn_env env;
    qattn_env_read(&env, NULL);
    vc->use_coopmat = env.vulkan_coopmat;

    qattn_status s = vk_device_open(ctx, vc);
    if (!s)
        s = vk_paged_ctx_init(ctx, vc);
    if (!s) /* what the layer said since the instance was made, device creation included */
        s = vk_validation_check(ctx, vc);
    if (s) {
        vk_ctx_release(ctx);
        return s;
    }
    return QATTN_OK;
}

static qattn_status vk_synchronize(qattn_ctx *ctx)
{
    /* qattn_run and the copies wait for their own submissions: nothing is in flight. */
    vk_ctx *vc = ctx->impl;
    if (vc->lost)
        return qattn_set_error(ctx, QATTN_ERR_DEVICE_LOST, "the Vulkan device was lost; the context is unusable");
    return QATTN_OK;
}

/* ---------------------------------------------------------------- buffers */

static qattn_status vk_buffer_alloc(qattn_ctx *ctx, qattn_buffer *buf)
{
    vk_ctx *vc = ctx->impl;
    vk_buffer *b = calloc(1, sizeof(*b));
    if (!b)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for a buffer");
    /* Round up to 16 bytes so vector loads at the end stay inside. */
    VkDeviceSize size = qattn_round_up(buf->size, 16);
    qattn_status s = vk_mem_create(ctx, vc, size, vc->device_local_type, false, &b->mem, "buffer allocation");
    if (s) {
        free(b);
        return s;
    }
    buf->impl = b;
    buf->host = NULL;
    return QATTN_OK;
}

static void vk_buffer_release(qattn_ctx *ctx, qattn_buffer *buf)
{
    vk_ctx *vc = ctx->impl;
    vk_buffer *b = buf->impl;
    if (!b)
        return;
    vk_mem_destroy(vc, &b->mem);
    free(b);
}

static qattn_status vk_buffer_upload(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, const void *src, size_t bytes)
{
    return vk_staged_copy(ctx, ctx->impl, vk_buffer_handle(buf), offset, (void *)src, bytes, VK_COPY_UP, 0);
}

static qattn_status vk_buffer_download(qattn_ctx *ctx, const qattn_buffer *buf, size_t offset, void *dst, size_t bytes)
{
    return vk_staged_copy(ctx, ctx->impl, vk_buffer_handle(buf), offset, dst, bytes, VK_COPY_DOWN, 0);
}

static qattn_status vk_buffer_fill(qattn_ctx *ctx, qattn_buffer *buf, size_t offset, size_t bytes, uint8_t value)
{
    vk_ctx *vc = ctx->impl;
    if (offset % 4 != 0 || (bytes % 4 != 0 && offset + bytes != buf->size))
        return vk_staged_copy(ctx, vc, vk_buffer_handle(buf), offset, NULL, bytes, VK_COPY_FILL, value);
    /* vkCmdFillBuffer writes whole words; the allocation is rounded up to 16 bytes. */
    pthread_mutex_lock(&vc->lock);
    qattn_status s = vk_begin(ctx, vc);
    if (!s) {
        vc->vk.vkCmdFillBuffer(vc->cmd, vk_buffer_handle(buf), offset, qattn_round_up(bytes, 4), value * 0x01010101u);
        s = vk_submit_wait(ctx, vc);
    }
    pthread_mutex_unlock(&vc->lock);
    return s;
}

static qattn_status vk_buffer_wrap(qattn_ctx *ctx, qattn_buffer *buf, void *native)
{
    (void)buf;
    (void)native;
    return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                           "the vulkan backend cannot wrap a caller's VkBuffer yet: its VkDevice is private to the "
                           "qattn context; copy through qattn_buffer_upload instead");
}

const qattn_backend_iface qattn_backend_vulkan = {
    .api_version = QATTN_BACKEND_API_VERSION,
    .name = "vulkan",
    .score = 50,
    .auto_score = vk_auto_score,
    .probe = vk_probe,
    .device_info = vk_device_info,
    .ctx_init = vk_ctx_init,
    .ctx_release = vk_ctx_release,
    .synchronize = vk_synchronize,
    .buffer_alloc = vk_buffer_alloc,
    .buffer_wrap = vk_buffer_wrap,
    .buffer_release = vk_buffer_release,
    .buffer_upload = vk_buffer_upload,
    .buffer_download = vk_buffer_download,
    .buffer_fill = vk_buffer_fill,
    .plan_init = vk_plan_init,
    .plan_finish = vk_plan_finish,
    .plan_release = vk_plan_release,
    .run = vk_run,
    .tensor_alignment = 16,
    .sparse = QATTN_SPARSE_CAP_WINDOW | QATTN_SPARSE_CAP_BLOCKS | QATTN_SPARSE_CAP_PREDICT | QATTN_SPARSE_CAP_PV_SKIP,
    .kv_append = vk_kv_append,
    .paged_plan_init = vk_paged_plan_init,
    .paged_plan_release = vk_paged_plan_release,
    .paged_run = vk_paged_run,
    .merge_states = vk_merge_states,
    .prune = QATTN_PRUNE_CAP_META | QATTN_PRUNE_CAP_SELECT | QATTN_PRUNE_CAP_ADAPTIVE | QATTN_PRUNE_CAP_PAGE_MASS,
    .paged_page_mass = vk_paged_page_mass,
};
