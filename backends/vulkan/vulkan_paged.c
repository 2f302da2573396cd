/*
 * The Vulkan backend's paged KV cache: appends (reshape_and_cache with
 * quantization), paged attention (decode and chunked prefill, split-KV) and
 * the LSE merge, and decode-time pruning (page metadata kept by appends,
 * query-aware page selection before attention, page mass: the kernels of
 * shaders/paged_prune.comp). The kernels live in shaders/paged_*.comp and share one
 * descriptor layout of 13 storage buffers and 128 bytes of push constants
 * (the run's arguments: these kernels have no parameter buffer).
 *
 * Every operation is one submission the host waits for, as qattn_run is on
 * Vulkan. With the checks on, it is check kernel -> status words -> kernels
 * that write nothing when a status word is set -> status readback; the host
 * then names the problem (reading the offending entries back).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vulkan_internal.h"

#define PAGED_WG 128u /* invocations of paged_attn / paged_check */
#define APPEND_CHECK_WG 256u

/* The attention kernel's preferred keys per tile; a build may override it
 * (-Dc_args=-DQATTN_VK_PAGED_BC=64) to compare variants. */
#ifndef QATTN_VK_PAGED_BC
#define QATTN_VK_PAGED_BC 32
#endif
_Static_assert(QATTN_VK_PAGED_BC == 16 || QATTN_VK_PAGED_BC == 32 || QATTN_VK_PAGED_BC == 64,
               "the paged key tile is 16, 32 or 64");

/* Argument flags of paged_check / paged_attn / paged_prune (shaders/paged_common.glsl). */
enum { ARG_CHECK = 1, ARG_LSE = 2, ARG_CAUSAL = 4, ARG_DENSE = 8, ARG_HND = 16, ARG_SELECT = 32, ARG_ADAPTIVE = 64 };
/* Of paged_merge. */
enum { MERGE_LSE = 1, MERGE_PAGED = 2, MERGE_CHECK = 4 };
/* Of paged_append. */
enum { APPEND_CHECK = 1, APPEND_HND = 2 };

/* Mirrors `Args` in shaders/paged_common.glsl. */
typedef struct vk_paged_args {
    uint32_t q_off, o_off, lse_off, ws_off;
    uint32_t q_s0, q_s1, o_s0, o_s1;
    uint32_t batch, heads_kv, group, page_size;
    uint32_t num_pages, max_pages, total_q, max_q_len;
    uint32_t splits, pages_per_split, q_tiles, indices_count;
    float qk_scale_log2;
    uint32_t flags;
    uint32_t ws_status, ws_part_o;
    uint32_t ws_part_lse, items;
    uint32_t ws_sel_counts, ws_sel_pages;
} vk_paged_args;

/* Mirrors `PruneArgs` in shaders/paged_prune.comp (paged_select_score, paged_select_topk, paged_mass). */
typedef struct vk_prune_args {
    uint32_t q_off, lse_off, ws_off, flags;
    uint32_t q_s0, q_s1, batch, heads_kv;
    uint32_t group, page_size, num_pages, max_pages;
    uint32_t total_q, max_q_len, indices_count, ws_status;
    float sm_scale;
    uint32_t meta_scale_off;
    uint32_t ws_scores, ws_sel_counts;
    uint32_t ws_sel_pages, budget_pages, sink_pages, recent_pages;
    uint32_t frac_m, frac_shift;
    float epsilon;
    uint32_t cap_pages;
    uint32_t mass_off, reserved;
} vk_prune_args;

/* Mirrors `MetaArgs` in shaders/paged_prune.comp (paged_meta). */
typedef struct vk_meta_args {
    uint32_t slot_off, num_tokens, heads, head_dim;
    uint32_t page_size, capacity, flags, meta_scale_off;
} vk_meta_args;

/* Mirrors `MergeArgs` in shaders/paged_merge.comp. */
typedef struct vk_merge_args {
    uint32_t v_off, s_off, o_off, lse_off;
    uint32_t v_s0, v_s1, v_s2, s_s0;
    uint32_t s_s1, s_s2, o_s0, o_s1;
    uint32_t states, rows, heads, head_dim;
    uint32_t flags, batch, status_word;
} vk_merge_args;

/* Mirrors `AppendArgs` in shaders/paged_append.comp. */
typedef struct vk_append_args {
    uint32_t k_off, v_off, slot_off, num_tokens;
    uint32_t heads, head_dim, page_size, capacity;
    uint32_t s0, s1, flags, dup_groups;
} vk_append_args;

_Static_assert(sizeof(vk_paged_args) <= VK_PAGED_PUSH_BYTES && sizeof(vk_merge_args) <= VK_PAGED_PUSH_BYTES &&
                   sizeof(vk_append_args) <= VK_PAGED_PUSH_BYTES && sizeof(vk_prune_args) <= VK_PAGED_PUSH_BYTES &&
                   sizeof(vk_meta_args) <= VK_PAGED_PUSH_BYTES,
               "push constants fit the paged layout's range");

/* The pipeline of a paged kernel (the paged layout) for these specialization constants. */
static qattn_status paged_pipeline(qattn_ctx *ctx, vk_ctx *vc, const char *shader, const uint32_t *spec,
                                   uint32_t spec_count, VkPipeline *out)
{
    vk_pipeline_key key = {.shader = shader, .spec_count = spec_count, .paged = true};
    memcpy(key.spec, spec, spec_count * sizeof(uint32_t));
    return vk_pipeline_get(ctx, vc, &key, out);
}

/* Records a paged kernel's dispatch with its arguments as push constants. */
static void dispatch(vk_ctx *vc, VkPipeline pipeline, const void *args, size_t args_bytes, const uint32_t grid[2])
{
    vk_record_dispatch(vc, vc->paged_layout, pipeline, args, (uint32_t)args_bytes, grid);
}

static qattn_status paged_available(qattn_ctx *ctx, const vk_ctx *vc)
{
    if (vc->paged_unsupported[0])
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "the vulkan backend cannot run the paged KV cache on %s: %s",
                               vc->caps->props.deviceName, vc->paged_unsupported);
    return QATTN_OK;
}

/* ---------------------------------------------------------------- context */

qattn_status vk_paged_ctx_init(qattn_ctx *ctx, vk_ctx *vc)
{
    const VkPhysicalDeviceLimits *lim = &vc->caps->props.limits;
    if (lim->maxPerStageDescriptorStorageBuffers < VK_PAGED_BINDINGS ||
        lim->maxDescriptorSetStorageBuffers < VK_PAGED_BINDINGS || lim->maxPushConstantsSize < VK_PAGED_PUSH_BYTES) {
        snprintf(vc->paged_unsupported, sizeof(vc->paged_unsupported),
                 "its kernels bind %d storage buffers and %d bytes of push constants; the device allows %u and %u",
                 VK_PAGED_BINDINGS, VK_PAGED_PUSH_BYTES, lim->maxPerStageDescriptorStorageBuffers,
                 lim->maxPushConstantsSize);
        return QATTN_OK; /* the rest of the backend works */
    }
    qattn_status s = vk_layout_create(ctx, vc, VK_PAGED_BINDINGS, -1, VK_PAGED_PUSH_BYTES, " (paged)",
                                      &vc->paged_set_layout, &vc->paged_layout);
    if (!s) {
        const VkDescriptorPoolSize size = {VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, VK_PAGED_BINDINGS};
        s = vk_descriptor_set_create(ctx, vc, vc->paged_set_layout, &size, 1, " (paged)", &vc->paged_pool,
                                     &vc->paged_set);
    }
    if (!s)
        s = vk_mem_create(ctx, vc, 256, vc->device_local_type, false, &vc->paged_status, "append status buffer");
    return s; /* on failure vk_ctx_release -> vk_paged_ctx_release frees what was made */
}

void vk_paged_ctx_release(vk_ctx *vc)
{
    if (vc->paged_pool)
        vc->vk.vkDestroyDescriptorPool(vc->device, vc->paged_pool, NULL);
    if (vc->paged_layout)
        vc->vk.vkDestroyPipelineLayout(vc->device, vc->paged_layout, NULL);
    if (vc->paged_set_layout)
        vc->vk.vkDestroyDescriptorSetLayout(vc->device, vc->paged_set_layout, NULL);
    vk_mem_destroy(vc, &vc->paged_status);
    vc->paged_pool = VK_NULL_HANDLE;
    vc->paged_layout = VK_NULL_HANDLE;
    vc->paged_set_layout = VK_NULL_HANDLE;
    vc->paged_set = VK_NULL_HANDLE;
}

/* Points every binding of a paged descriptor set at a buffer; VK_NULL_HANDLE
 * entries take `fallback`, which the kernels never touch there. Under vc->lock. */
static void bind_all(vk_ctx *vc, VkDescriptorSet set, const VkBuffer bufs[VK_PAGED_BINDINGS], VkBuffer fallback)
{
    VkDescriptorBufferInfo infos[VK_PAGED_BINDINGS];
    VkWriteDescriptorSet writes[VK_PAGED_BINDINGS];
    for (uint32_t i = 0; i < VK_PAGED_BINDINGS; i++) {
        infos[i] = (VkDescriptorBufferInfo){.buffer = bufs[i] ? bufs[i] : fallback, .offset = 0,
                                            .range = VK_WHOLE_SIZE};
        writes[i] = (VkWriteDescriptorSet){.sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, .dstSet = set,
                                           .dstBinding = i, .descriptorCount = 1,
                                           .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                           .pBufferInfo = &infos[i]};
    }
    vc->vk.vkUpdateDescriptorSets(vc->device, VK_PAGED_BINDINGS, writes, 0, NULL);
}

/* ----------------------------------------------------------------- append */

qattn_status vk_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *a, const qattn_kv_cache_sizes *sizes)
{
    (void)sizes;
    vk_ctx *vc = ctx->impl;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the vulkan backend");
    qattn_status s = paged_available(ctx, vc);
    if (s)
        return s;
    const qattn_kv_cache_desc *c = a->cache;
    const int fmt = qattn_kv_format_of(c);
    const bool eight = fmt >= QATTN_KV_FMT_FP8, check = !(a->flags & QATTN_FLAG_NO_FINITE_CHECK);
    if (eight && c->head_dim % 4)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld: the vulkan backend writes 8-bit pages four codes to a word (head dims "
                               "that are multiples of 4)",
                               (long long)c->head_dim);
    const uint64_t T = (uint64_t)a->num_tokens, H = (uint64_t)c->heads_kv;
    if (T * H * 2 > UINT32_MAX || T * 2 > UINT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "%llu tokens x %llu heads: the vulkan append indexes rows with 32-bit integers",
                               (unsigned long long)T, (unsigned long long)H);
    const qattn_kv_cache_buffers *cb = a->buffers;
    const bool meta = cb->k_meta != NULL;
    if (meta && !eight && c->head_dim % 2)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld: the vulkan backend keeps page metadata two 16-bit values to a word "
                               "(even head dims)",
                               (long long)c->head_dim);
    const size_t es = qattn_dtype_size(a->new_dtype);
    const uint32_t spec[2] = {(uint32_t)a->new_dtype, (uint32_t)fmt}, meta_spec[1] = {(uint32_t)fmt};
    VkPipeline check_pipe = VK_NULL_HANDLE, write_pipe = VK_NULL_HANDLE, meta_pipe = VK_NULL_HANDLE;
    if ((s = paged_pipeline(ctx, vc, "paged_append", spec, 2, &write_pipe)) ||
        (check && (s = paged_pipeline(ctx, vc, "paged_append_check", spec, 2, &check_pipe))) ||
        (meta && (s = paged_pipeline(ctx, vc, "paged_meta", meta_spec, 1, &meta_pipe))))
        return s;

    const uint64_t dup_groups = (uint64_t)qattn_ceil_div((int64_t)T, APPEND_CHECK_WG);
    uint64_t scan_groups = (T * H * (uint64_t)c->head_dim + APPEND_CHECK_WG * 8 - 1) / (APPEND_CHECK_WG * 8);
    scan_groups = scan_groups < 1 ? 1 : scan_groups > 1024 ? 1024 : scan_groups;
    vk_append_args args = {
        .k_off = (uint32_t)(a->k_new_offset / es),
        .v_off = (uint32_t)(a->v_new_offset / es),
        .slot_off = (uint32_t)(a->slot_mapping_offset / 4),
        .num_tokens = (uint32_t)T,
        .heads = (uint32_t)H,
        .head_dim = (uint32_t)c->head_dim,
        .page_size = (uint32_t)c->page_size,
        .capacity = (uint32_t)(c->num_pages * c->page_size), /* < 2^32: the cache fits one buffer */
        .s0 = vk_stride32(a->num_tokens, a->new_stride[0]),
        .s1 = vk_stride32(c->heads_kv, a->new_stride[1]),
        .flags = (check ? APPEND_CHECK : 0u) | (c->layout == QATTN_KV_HND ? APPEND_HND : 0u),
        .dup_groups = (uint32_t)dup_groups,
    };
    qattn_kv_meta_sizes ms = {0};
    if (meta && (s = qattn_kv_meta_validate(ctx, c, &ms)))
        return s;
    const vk_meta_args meta_args = {
        .slot_off = args.slot_off,
        .num_tokens = args.num_tokens,
        .heads = args.heads,
        .head_dim = args.head_dim,
        .page_size = args.page_size,
        .capacity = args.capacity,
        .flags = args.flags,
        .meta_scale_off = (uint32_t)(ms.scale_offset / 4),
    };
    VkBuffer bufs[VK_PAGED_BINDINGS] = {
        [0] = vk_buffer_handle(a->k_new),         [1] = vk_buffer_handle(cb->k),
        [2] = vk_buffer_handle(cb->v),            [3] = vk_buffer_handle(cb->k_scale),
        [4] = vk_buffer_handle(cb->v_scale),      [5] = vk_buffer_handle(cb->k_meta),
        [7] = vc->paged_status.buffer,            [8] = vk_buffer_handle(a->slot_mapping),
        [12] = vk_buffer_handle(a->v_new),
    };
    uint32_t check_grid[2], write_grid[2], meta_grid[2], words[QATTN_STATUS_WORDS] = {0};
    vk_grid_of(dup_groups + scan_groups, check_grid);
    vk_grid_of(T * H * 2 < 65535 ? T * H * 2 : 65535, write_grid);
    vk_grid_of(T < 65535 ? T : 65535, meta_grid);

    pthread_mutex_lock(&vc->lock);
    bind_all(vc, vc->paged_set, bufs, vk_buffer_handle(a->k_new));
    s = vk_begin(ctx, vc);
    if (!s) {
        VkCommandBuffer cmd = vc->cmd;
        if (check)
            vk_status_clear(vc, vc->paged_status.buffer, 0);
        vc->vk.vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vc->paged_layout, 0, 1, &vc->paged_set, 0,
                                       NULL);
        if (check) {
            dispatch(vc, check_pipe, &args, sizeof(args), check_grid);
            vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
        }
        dispatch(vc, write_pipe, &args, sizeof(args), write_grid);
        if (meta) { /* the pages written, recomputed from their slots once the writes are visible */
            vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
            dispatch(vc, meta_pipe, &meta_args, sizeof(meta_args), meta_grid);
        }
        if (check)
            vk_read_status_back(vc, vc->paged_status.buffer, 0);
        s = vk_submit_wait(ctx, vc);
        if (!s && check)
            vk_status_words(vc, words);
    }
    pthread_mutex_unlock(&vc->lock);
    if (s || !check)
        return s;
    return qattn_kv_append_status_error(ctx, a, words);
}

/* ------------------------------------------------------------------ plans */

static uint32_t next_pow2(uint64_t x)
{
    uint32_t p = 1;
    while (p < x && p < (1u << 30))
        p <<= 1;
    return p;
}

/* The attention kernel's shape: rows per item, keys per tile and how its
 * phases divide the work (shaders/paged_attn.comp, whose spec constants
 * these are). */
typedef struct paged_geometry {
    uint32_t br, bc, rw, rwp, rpt, kp, cpw, v_words, s_split, lpt;
    uint32_t smem; /* bytes of shared memory */
} paged_geometry;

/* The geometry for br rows, bc keys per tile and rpt P V rows per invocation; false when it does not exist. */
static bool geometry_of(uint32_t d, bool eight, uint32_t br, uint32_t bc, uint32_t rpt, paged_geometry *g)
{
    g->br = br;
    g->bc = bc;
    g->rpt = rpt;
    g->cpw = eight ? 4 : 2;
    g->rw = d / g->cpw;
    g->rwp = next_pow2(g->rw);
    g->s_split = PAGED_WG / bc;
    const uint32_t chunks = g->rw / 4;         /* 16-byte chunks per cached row */
    const uint32_t groups = PAGED_WG / g->rwp; /* invocations per P V word: row blocks x key partitions */
    if (g->rwp > PAGED_WG || chunks % g->s_split || rpt > br || rpt * g->cpw > 32 || br / rpt > groups)
        return false;
    g->kp = groups / (br / rpt);
    g->lpt = (bc * chunks + PAGED_WG - 1) / PAGED_WG;
    if (g->lpt > 8)
        return false;
    g->v_words = bc * g->rw;
    if (g->kp > 1 && g->kp * br * d > g->v_words)
        g->v_words = g->kp * br * d;
    const uint32_t br4 = (br + 3) / 4;
    g->smem = 4 * br * d + 16 * bc * (chunks + 1) + 4 * g->v_words + 16 * g->s_split * bc * br4 + 12 * bc + 12 * br;
    return true;
}

typedef struct vk_paged_plan {
    VkDescriptorPool pool;
    VkDescriptorSet set;
    VkPipeline check, attn, merge; /* check: with the checks on; merge: with splits */
    paged_geometry g;
    uint32_t items, check_table_groups;
    uint32_t attn_grid[2], check_grid[2], merge_grid[2];
    /* Page selection (plan->select): its kernels bind the metadata at 2 (a set of their own), and
     * their scratch (scores; adaptive: bounds) lies in the backend's workspace after the partials. */
    VkDescriptorPool select_pool;
    VkDescriptorSet select_set;
    VkPipeline score, topk;
    uint32_t score_grid[2], topk_grid[2];
    size_t scratch; /* byte offset from ws.backend */
} vk_paged_plan;

void vk_paged_plan_release(qattn_ctx *ctx, qattn_plan *plan)
{
    vk_ctx *vc = ctx->impl;
    vk_paged_plan *vp = plan->impl;
    if (!vp)
        return;
    if (vp->pool)
        vc->vk.vkDestroyDescriptorPool(vc->device, vp->pool, NULL);
    if (vp->select_pool)
        vc->vk.vkDestroyDescriptorPool(vc->device, vp->select_pool, NULL);
    free(vp);
    plan->impl = NULL;
}

/* What the problem asks of the device that the paged kernels cannot give: head dim, buffer sizes, 32-bit keys. */
static qattn_status check_paged_problem(qattn_ctx *ctx, const vk_device_caps *caps, const qattn_paged_problem *pp)
{
    const int64_t D = pp->cache.head_dim, P = pp->cache.page_size;
    const uint64_t max_buffer = ctx->device_info.max_buffer_bytes;
    if (D % 16 != 0 || D > 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the vulkan paged kernels (multiples of 16 up to 256)",
                               (long long)D);
    const size_t extents[] = {pp->sizes.cache_bytes, pp->q_bytes, pp->o_bytes, pp->lse_bytes};
    const char *names[] = {"the KV cache (K or V)", "q", "o", "lse"};
    for (int i = 0; i < 4; i++)
        if (extents[i] > max_buffer)
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "%s spans %zu bytes, more than the %llu bytes one Vulkan storage buffer holds on %s",
                                   names[i], extents[i], (unsigned long long)max_buffer, caps->props.deviceName);
    /* Key positions are 32-bit signed in the kernels, with a split's and a tile's overhang. */
    if ((pp->max_pages_per_seq + 1024) * P + 1024 > INT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "max_pages_per_seq * page_size = %lld * %lld: the vulkan kernels index at most about "
                               "2^31 keys per sequence",
                               (long long)pp->max_pages_per_seq, (long long)P);
    return QATTN_OK;
}

/* Rows per item (the group's heads times the queries, as one tile if it fits), keys per tile and
 * P V rows per invocation: the largest geometry whose shared memory the device has. */
static qattn_status choose_geometry(qattn_ctx *ctx, const vk_device_caps *caps, const qattn_paged_problem *pp,
                                    paged_geometry *g)
{
    const int64_t D = pp->cache.head_dim;
    const bool eight = qattn_kv_format_of(&pp->cache) >= QATTN_KV_FMT_FP8;
    const uint32_t smem_limit = caps->props.limits.maxComputeSharedMemorySize;
    const uint64_t rows = (uint64_t)pp->group * (uint64_t)pp->max_q_len;
    bool found = false;
    /* The most rows per item, then the preferred key tile, then the most P V rows per invocation
     * (fewer decodes of each V word; more shared memory for the partitions' sums). */
    const uint32_t tiles[4] = {QATTN_VK_PAGED_BC, QATTN_VK_PAGED_BC == 32 ? 16 : 32,
                               QATTN_VK_PAGED_BC == 64 ? 16 : 64, 128 /* head dims with few 16-byte chunks */};
    for (uint32_t br = next_pow2(rows) < 32 ? next_pow2(rows) : 32; br >= 1 && !found; br /= 2)
        for (int t = 0; t < 4 && !found; t++)
            for (uint32_t rpt = br < 16 ? br : 16; rpt >= 1 && !found; rpt /= 2)
                found = geometry_of((uint32_t)D, eight, br, tiles[t], rpt, g) && g->smem <= smem_limit;
    if (!found)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld needs more than the %u bytes of shared memory device %s offers",
                               (long long)D, smem_limit, caps->props.deviceName);
    return QATTN_OK;
}

/* The split count of an automatic plan (pp->num_splits 0) and the plan's account of it. */
static void choose_splits(qattn_plan *plan, const vk_device_caps *caps, const paged_geometry *g, int64_t items,
                          int64_t q_tiles)
{
    qattn_paged_problem *pp = &plan->pp;
    if (pp->num_splits != 0) {
        snprintf(plan->why, sizeof(plan->why), "%d split(s) of the keys, as requested.", pp->num_splits);
        return;
    }
    /* Work groups resident at once: per compute unit as shared memory allows (8 at most), or
     * the host's threads for a CPU implementation, or a large GPU's worth when unknown. */
    int64_t per_cu = 98304 / g->smem;
    per_cu = per_cu < 1 ? 1 : per_cu > 8 ? 8 : per_cu;
    int64_t slots = caps->compute_units ? (int64_t)caps->compute_units * per_cu
                    : caps->props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU ? qattn_host_cpu_count()
                                                                           : 1024;
    pp->num_splits = qattn_paged_choose_splits(items, slots, pp->max_pages_per_seq, pp->cache.page_size);
    snprintf(plan->why, sizeof(plan->why),
             "%lld work items (sequences x KV heads x %lld query tile(s) of %u rows) for about %lld resident work "
             "groups (%s): %d split(s) of the keys.",
             (long long)items, (long long)q_tiles, g->br, (long long)slots,
             caps->compute_units ? "compute units x groups per unit"
             : caps->props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU ? "host threads"
                                                                      : "compute units unknown: a large GPU",
             pp->num_splits);
}

/* The plan's device objects: its pipelines and descriptor set. */
static qattn_status make_pipelines(qattn_ctx *ctx, vk_ctx *vc, const qattn_paged_problem *pp, bool select,
                                   vk_paged_plan *vp)
{
    const paged_geometry *g = &vp->g;
    const uint32_t D = (uint32_t)pp->cache.head_dim;
    const uint32_t attn_spec[13] = {D, (uint32_t)pp->q_dtype, (uint32_t)qattn_kv_format_of(&pp->cache), g->br, g->bc,
                                    g->rw, g->rwp, g->rpt, g->kp, g->cpw, g->v_words, g->s_split, g->lpt};
    const uint32_t check_spec[2] = {D, (uint32_t)pp->q_dtype};
    const uint32_t merge_spec[2] = {(uint32_t)QATTN_DTYPE_F32, (uint32_t)pp->q_dtype};
    qattn_status s = paged_pipeline(ctx, vc, "paged_attn", attn_spec, 13, &vp->attn);
    if (!s && pp->check)
        s = paged_pipeline(ctx, vc, "paged_check", check_spec, 2, &vp->check);
    if (!s && pp->num_splits > 1)
        s = paged_pipeline(ctx, vc, "paged_merge", merge_spec, 2, &vp->merge);
    if (!s) {
        const VkDescriptorPoolSize size = {VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, VK_PAGED_BINDINGS};
        s = vk_descriptor_set_create(ctx, vc, vc->paged_set_layout, &size, 1, "", &vp->pool, &vp->set);
    }
    if (!s && select) {
        const uint32_t prune_spec[3] = {D, (uint32_t)pp->q_dtype, (uint32_t)qattn_kv_format_of(&pp->cache)};
        const VkDescriptorPoolSize size = {VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, VK_PAGED_BINDINGS};
        if (!(s = paged_pipeline(ctx, vc, "paged_select_score", prune_spec, 3, &vp->score)) &&
            !(s = paged_pipeline(ctx, vc, "paged_select_topk", prune_spec, 3, &vp->topk)))
            s = vk_descriptor_set_create(ctx, vc, vc->paged_set_layout, &size, 1, " (selection)", &vp->select_pool,
                                         &vp->select_set);
    }
    return s;
}

qattn_status vk_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    vk_ctx *vc = ctx->impl;
    const vk_device_caps *caps = vc->caps;
    qattn_paged_problem *pp = &plan->pp;
    paged_geometry g = {0};
    qattn_status s = paged_available(ctx, vc);
    if (!s)
        s = check_paged_problem(ctx, caps, pp);
    if (!s)
        s = choose_geometry(ctx, caps, pp, &g);
    if (s)
        return s;
    const int64_t D = pp->cache.head_dim, P = pp->cache.page_size;
    const uint64_t max_buffer = ctx->device_info.max_buffer_bytes;
    const int64_t q_tiles = qattn_ceil_div(pp->group * pp->max_q_len, g.br);
    const int64_t items = pp->batch * pp->cache.heads_kv * q_tiles;
    choose_splits(plan, caps, &g, items, q_tiles);
    if ((uint64_t)items * (uint64_t)pp->num_splits > UINT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "%lld work items x %d splits exceed 2^32",
                               (long long)items, pp->num_splits);
    if ((s = qattn_paged_partials_bytes(ctx, pp, &plan->backend_workspace)))
        return s;
    size_t scratch = 0;
    if (plan->select.enabled) { /* fp32 scores [B * Hkv][max_pages]; adaptive: upper and lower bounds as well */
        const uint64_t rows = (uint64_t)pp->batch * (uint64_t)pp->cache.heads_kv * (uint64_t)pp->max_pages_per_seq;
        const uint64_t bytes = rows * 4u * (plan->select.adaptive ? 3u : 1u);
        scratch = qattn_round_up(plan->backend_workspace, 256);
        if (bytes + scratch + 1024 > max_buffer)
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "the page selection's scratch (%llu bytes for %lld sequences x %lld KV heads x %lld "
                                   "pages) exceeds the %llu bytes one Vulkan storage buffer holds",
                                   (unsigned long long)bytes, (long long)pp->batch, (long long)pp->cache.heads_kv,
                                   (long long)pp->max_pages_per_seq, (unsigned long long)max_buffer);
        plan->backend_workspace = scratch + (size_t)bytes;
    }
    if (plan->backend_workspace) {
        if ((uint64_t)plan->backend_workspace + 1024 > max_buffer)
            return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                                   "the split-KV partials (%d splits x %lld rows x %lld heads) exceed the %llu bytes "
                                   "one Vulkan storage buffer holds; ask for fewer splits",
                                   pp->num_splits, (long long)pp->total_q, (long long)pp->heads_q,
                                   (unsigned long long)max_buffer);
    }
    const int64_t per = qattn_ceil_div(pp->max_pages_per_seq, pp->num_splits);
    plan->q_tile = (int)g.br;
    plan->kv_tile = pp->num_splits > 1 ? (int)(per * P) : 0;
    plan->status_word = pp->check;
    snprintf(plan->kernel, sizeof(plan->kernel), "vulkan_paged_%s%s_d%lld_r%u_k%u_p%u",
             qattn_dtype_name(pp->cache.dtype), qattn_kv_format_of(&pp->cache) == QATTN_KV_FMT_I8_ROW ? "_row" : "",
             (long long)D, g.br, g.bc, g.kp);

    vk_paged_plan *vp = calloc(1, sizeof(*vp));
    if (!vp)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the plan");
    plan->impl = vp;
    vp->g = g;
    vp->items = (uint32_t)(items * pp->num_splits);
    vk_grid_of(vp->items, vp->attn_grid);
    vp->check_table_groups = vk_min_u32((uint64_t)pp->batch, 1024);
    uint64_t scan = ((uint64_t)pp->total_q * (uint64_t)pp->heads_q * (uint64_t)D + PAGED_WG * 16 - 1) / (PAGED_WG * 16);
    scan = scan < 1 ? 1 : scan > 1024 ? 1024 : scan;
    vk_grid_of(vp->check_table_groups + scan, vp->check_grid);
    vk_grid_of((uint64_t)pp->total_q * (uint64_t)pp->heads_q, vp->merge_grid);
    vp->scratch = scratch;
    if (plan->select.enabled)
        vk_str_append(plan->why, sizeof(plan->why),
                      " Pages selected on the device first (paged_select_score, paged_select_topk%s).",
                      plan->select.adaptive ? ", adaptive budget" : "");
    const uint64_t rows = (uint64_t)pp->batch * (uint64_t)pp->cache.heads_kv;
    vk_grid_of(rows * (uint64_t)qattn_ceil_div(pp->max_pages_per_seq, 128), vp->score_grid);
    vk_grid_of(rows, vp->topk_grid);
    return make_pipelines(ctx, vc, pp, plan->select.enabled, vp); /* on failure the core calls vk_paged_plan_release */
}

/* ------------------------------------------------------------------- runs */

/* budget_fraction as m / 2^shift (m odd, or 0), so the kernel takes ceil(fraction * n) exactly. */
static void fraction_bits(float f, uint32_t *m, uint32_t *shift)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const uint32_t e = (bits >> 23) & 0xffu;
    uint32_t mant = bits & 0x7fffffu, sh = 149; /* subnormal: mant * 2^-149 */
    if (e != 0) {
        mant |= 0x800000u;
        sh = 150 - e; /* f = mant * 2^(e - 150); f <= 1 so e <= 127 */
    }
    while (mant && !(mant & 1u) && sh > 0) {
        mant >>= 1;
        sh--;
    }
    *m = mant;
    *shift = sh;
}

/* The arguments of the pruning kernels (shaders/paged_prune.comp) for a run's arguments. */
static vk_prune_args prune_args(const qattn_plan *plan, const qattn_paged_args *a, const vk_paged_args *run)
{
    const qattn_paged_problem *pp = &plan->pp;
    const qattn_select_problem *sel = &plan->select;
    const vk_paged_plan *vp = plan->impl;
    const int64_t M1 = pp->max_pages_per_seq + 1; /* counts past max_pages act alike */
    qattn_kv_meta_sizes ms = {0};
    qattn_kv_meta_validate(NULL, &pp->cache, &ms); /* validated with the plan */
    vk_prune_args p = {
        .q_off = run->q_off,
        .lse_off = run->lse_off,
        .ws_off = run->ws_off,
        .flags = (run->flags & ~(uint32_t)ARG_LSE) | (sel->adaptive ? (uint32_t)ARG_ADAPTIVE : 0u),
        .q_s0 = run->q_s0,
        .q_s1 = run->q_s1,
        .batch = run->batch,
        .heads_kv = run->heads_kv,
        .group = run->group,
        .page_size = run->page_size,
        .num_pages = run->num_pages,
        .max_pages = run->max_pages,
        .total_q = run->total_q,
        .max_q_len = run->max_q_len,
        .indices_count = run->indices_count,
        .ws_status = run->ws_status,
        .sm_scale = pp->sm_scale,
        .meta_scale_off = (uint32_t)(ms.scale_offset / 4),
        .ws_scores = sel->enabled ? (uint32_t)((plan->ws.backend + vp->scratch) / 4) : 0u,
        .ws_sel_counts = sel->enabled ? (uint32_t)(plan->ws.select_counts / 4) : 0u,
        .ws_sel_pages = sel->enabled ? (uint32_t)(plan->ws.select_pages / 4) : 0u,
        .budget_pages = (uint32_t)qattn_min_i64(sel->budget_pages, M1),
        .sink_pages = (uint32_t)qattn_min_i64(sel->sink_pages, M1),
        .recent_pages = (uint32_t)qattn_min_i64(sel->recent_pages, M1),
        .epsilon = sel->epsilon,
        .cap_pages = (uint32_t)qattn_min_i64(sel->max_budget_pages, M1),
    };
    (void)a;
    fraction_bits(sel->budget_fraction, &p.frac_m, &p.frac_shift);
    return p;
}

/* The run's arguments as paged_check / paged_attn take them (shaders/paged_common.glsl). */
static vk_paged_args paged_args_of(const qattn_plan *plan, const qattn_paged_args *a)
{
    const vk_paged_plan *vp = plan->impl;
    const qattn_paged_problem *pp = &plan->pp;
    const int64_t D = pp->cache.head_dim, Hq = pp->heads_q;
    const bool dense = pp->table == QATTN_PAGES_DENSE, split = pp->num_splits > 1;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    const uint32_t ws_off = (uint32_t)(a->workspace_offset / 4);
    vk_paged_args args = {
        .q_off = (uint32_t)(a->q_offset / es),
        .o_off = (uint32_t)(a->o_offset / es),
        .lse_off = (uint32_t)(a->lse_offset / 4),
        .ws_off = ws_off,
        .q_s0 = vk_stride32(pp->total_q, pp->q_stride[0]),
        .q_s1 = vk_stride32(Hq, pp->q_stride[1]),
        .o_s0 = vk_stride32(pp->total_q, pp->o_stride[0]),
        .o_s1 = vk_stride32(Hq, pp->o_stride[1]),
        .batch = (uint32_t)pp->batch,
        .heads_kv = (uint32_t)pp->cache.heads_kv,
        .group = (uint32_t)pp->group,
        .page_size = (uint32_t)pp->cache.page_size,
        .num_pages = (uint32_t)pp->cache.num_pages,
        .max_pages = (uint32_t)pp->max_pages_per_seq,
        .total_q = (uint32_t)pp->total_q,
        .max_q_len = (uint32_t)pp->max_q_len,
        .splits = (uint32_t)pp->num_splits,
        .pages_per_split = (uint32_t)qattn_ceil_div(pp->max_pages_per_seq, pp->num_splits),
        .q_tiles = (uint32_t)qattn_ceil_div(pp->group * pp->max_q_len, vp->g.br),
        .indices_count = dense ? 0u : vk_min_u32(a->indices->size / 4, UINT32_MAX),
        .qk_scale_log2 = (float)((double)pp->sm_scale * QATTN_LOG2E),
        .flags = (pp->check ? ARG_CHECK : 0u) | (pp->return_lse ? ARG_LSE : 0u) | (pp->causal ? ARG_CAUSAL : 0u) |
                 (dense ? ARG_DENSE : 0u) | (pp->cache.layout == QATTN_KV_HND ? ARG_HND : 0u),
        .ws_status = pp->check ? (uint32_t)(plan->ws.status / 4) : 0u,
        .ws_part_o = split ? (uint32_t)(plan->ws.backend / 4) : 0u,
        .ws_part_lse = 0,
        .items = vp->items,
    };
    if (split)
        args.ws_part_lse = args.ws_part_o + (uint32_t)((uint64_t)pp->num_splits * pp->total_q * Hq * D);
    if (plan->select.enabled) {
        args.flags |= ARG_SELECT;
        args.ws_sel_counts = (uint32_t)(plan->ws.select_counts / 4);
        args.ws_sel_pages = (uint32_t)(plan->ws.select_pages / 4);
    }
    return args;
}

qattn_status vk_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a)
{
    vk_ctx *vc = ctx->impl;
    const vk_paged_plan *vp = plan->impl;
    const qattn_paged_problem *pp = &plan->pp;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the vulkan backend");
    const int64_t D = pp->cache.head_dim, Hq = pp->heads_q;
    const bool dense = pp->table == QATTN_PAGES_DENSE, split = pp->num_splits > 1;
    const uint32_t ws_off = (uint32_t)(a->workspace_offset / 4);
    const vk_paged_args args = paged_args_of(plan, a);
    const bool select = plan->select.enabled;
    const vk_prune_args sel_args = prune_args(plan, a, &args);
    vk_merge_args merge = {
        .v_off = ws_off + args.ws_part_o,
        .s_off = ws_off + args.ws_part_lse,
        .o_off = args.o_off,
        .lse_off = args.lse_off,
        .v_s0 = (uint32_t)(pp->total_q * Hq * D),
        .v_s1 = (uint32_t)(Hq * D),
        .v_s2 = (uint32_t)D,
        .s_s0 = (uint32_t)(pp->total_q * Hq),
        .s_s1 = (uint32_t)Hq,
        .s_s2 = 1,
        .o_s0 = args.o_s0,
        .o_s1 = args.o_s1,
        .states = (uint32_t)pp->num_splits,
        .rows = (uint32_t)pp->total_q,
        .heads = (uint32_t)Hq,
        .head_dim = (uint32_t)D,
        .flags = MERGE_PAGED | (pp->return_lse ? MERGE_LSE : 0u) | (pp->check ? MERGE_CHECK : 0u),
        .batch = (uint32_t)pp->batch,
        .status_word = ws_off + args.ws_status,
    };
    const qattn_kv_cache_buffers *cb = a->cache;
    VkBuffer ws = vk_buffer_handle(a->workspace);
    VkBuffer bufs[VK_PAGED_BINDINGS] = {
        [0] = vk_buffer_handle(a->q),
        [1] = vk_buffer_handle(cb->k),
        [2] = vk_buffer_handle(cb->v),
        [3] = vk_buffer_handle(cb->k_scale),
        [4] = vk_buffer_handle(cb->v_scale),
        [5] = vk_buffer_handle(a->o),
        [6] = vk_buffer_handle(pp->return_lse ? a->lse : a->o),
        [7] = ws,
        [8] = vk_buffer_handle(a->qo_indptr),
        [9] = vk_buffer_handle(dense ? a->block_table : a->indptr),
        [10] = vk_buffer_handle(dense ? a->seq_lens : a->indices),
        [11] = dense ? VK_NULL_HANDLE : vk_buffer_handle(a->last_page_len),
        [12] = ws,
    };
    const VkDeviceSize status_at = a->workspace_offset + plan->ws.status;
    uint32_t words[QATTN_STATUS_WORDS] = {0};

    pthread_mutex_lock(&vc->lock);
    bind_all(vc, vp->set, bufs, vk_buffer_handle(a->q));
    if (select) { /* the selection's set: the attention's, with the metadata at 2 */
        VkBuffer sel_bufs[VK_PAGED_BINDINGS];
        memcpy(sel_bufs, bufs, sizeof(sel_bufs));
        sel_bufs[2] = vk_buffer_handle(cb->k_meta);
        bind_all(vc, vp->select_set, sel_bufs, vk_buffer_handle(a->q));
    }
    qattn_status s = vk_begin(ctx, vc);
    if (!s) {
        VkCommandBuffer cmd = vc->cmd;
        if (pp->check)
            vk_status_clear(vc, ws, status_at);
        vc->vk.vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vc->paged_layout, 0, 1, &vp->set, 0, NULL);
        if (pp->check) {
            vk_paged_args check_args = args;
            check_args.items = vp->check_table_groups;
            dispatch(vc, vp->check, &check_args, sizeof(check_args), vp->check_grid);
            vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
        }
        if (select) { /* scores -> each (sequence, KV head)'s pages -> attention over them, on the device */
            vc->vk.vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vc->paged_layout, 0, 1,
                                           &vp->select_set, 0, NULL);
            dispatch(vc, vp->score, &sel_args, sizeof(sel_args), vp->score_grid);
            vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
            dispatch(vc, vp->topk, &sel_args, sizeof(sel_args), vp->topk_grid);
            vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
            vc->vk.vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vc->paged_layout, 0, 1, &vp->set, 0,
                                           NULL);
        }
        dispatch(vc, vp->attn, &args, sizeof(args), vp->attn_grid);
        if (split) {
            vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
            dispatch(vc, vp->merge, &merge, sizeof(merge), vp->merge_grid);
        }
        if (pp->check)
            vk_read_status_back(vc, ws, status_at);
        s = vk_submit_wait(ctx, vc);
        if (!s && pp->check)
            vk_status_words(vc, words);
    }
    pthread_mutex_unlock(&vc->lock);
    return s ? s : qattn_paged_status_error(ctx, plan, a, words);
}

/* ------------------------------------------------------------- page mass */

qattn_status vk_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a,
                                qattn_buffer *mass, size_t mass_offset)
{
    vk_ctx *vc = ctx->impl;
    const vk_paged_plan *vp = plan->impl;
    const qattn_paged_problem *pp = &plan->pp;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the vulkan backend");
    const uint64_t items = (uint64_t)pp->batch * (uint64_t)pp->cache.heads_kv * (uint64_t)pp->max_pages_per_seq;
    if (items > UINT32_MAX)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED, "%llu page masses: the vulkan kernel counts them in 32 bits",
                               (unsigned long long)items);
    const uint32_t spec[3] = {(uint32_t)pp->cache.head_dim, (uint32_t)pp->q_dtype,
                              (uint32_t)qattn_kv_format_of(&pp->cache)};
    VkPipeline pipe;
    qattn_status s = paged_pipeline(ctx, vc, "paged_mass", spec, 3, &pipe);
    if (s)
        return s;
    const vk_paged_args args = paged_args_of(plan, a);
    vk_prune_args m = prune_args(plan, a, &args);
    m.mass_off = (uint32_t)(mass_offset / 4);
    const bool dense = pp->table == QATTN_PAGES_DENSE;
    const qattn_kv_cache_buffers *cb = a->cache;
    VkBuffer ws = vk_buffer_handle(a->workspace);
    /* The table check (and Q's finite scan) first, as a run does, when the plan checks. */
    const bool check = pp->check && ws != VK_NULL_HANDLE;
    m.flags = check ? m.flags : m.flags & ~(uint32_t)ARG_CHECK;
    VkBuffer bufs[VK_PAGED_BINDINGS] = {
        [0] = vk_buffer_handle(a->q),
        [1] = vk_buffer_handle(cb->k),
        [3] = vk_buffer_handle(cb->k_scale),
        [5] = vk_buffer_handle(mass),
        [6] = vk_buffer_handle(a->lse),
        [7] = ws,
        [8] = vk_buffer_handle(a->qo_indptr),
        [9] = vk_buffer_handle(dense ? a->block_table : a->indptr),
        [10] = vk_buffer_handle(dense ? a->seq_lens : a->indices),
        [11] = dense ? VK_NULL_HANDLE : vk_buffer_handle(a->last_page_len),
    };
    const VkDeviceSize status_at = a->workspace_offset + plan->ws.status;
    uint32_t grid[2], words[QATTN_STATUS_WORDS] = {0};
    vk_grid_of(items, grid);
    pthread_mutex_lock(&vc->lock);
    bind_all(vc, vc->paged_set, bufs, vk_buffer_handle(a->q));
    s = vk_begin(ctx, vc);
    if (!s) {
        VkCommandBuffer cmd = vc->cmd;
        if (check)
            vk_status_clear(vc, ws, status_at);
        vc->vk.vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vc->paged_layout, 0, 1, &vc->paged_set, 0,
                                       NULL);
        if (check) {
            vk_paged_args check_args = args;
            check_args.items = vp->check_table_groups;
            dispatch(vc, vp->check, &check_args, sizeof(check_args), vp->check_grid);
            vk_compute_barrier(vc, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT);
        }
        dispatch(vc, pipe, &m, sizeof(m), grid);
        if (check)
            vk_read_status_back(vc, ws, status_at);
        s = vk_submit_wait(ctx, vc);
        if (!s && check)
            vk_status_words(vc, words);
    }
    pthread_mutex_unlock(&vc->lock);
    return s ? s : qattn_paged_status_error(ctx, plan, a, words);
}

/* ------------------------------------------------------------------ merge */

qattn_status vk_merge_states(qattn_ctx *ctx, const qattn_merge_desc *d, const qattn_merge_args *a)
{
    vk_ctx *vc = ctx->impl;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT, "args.stream must be NULL on the vulkan backend");
    qattn_status s = paged_available(ctx, vc);
    if (s)
        return s;
    const uint32_t spec[2] = {(uint32_t)d->v_dtype, (uint32_t)d->o_dtype};
    VkPipeline pipe;
    if ((s = paged_pipeline(ctx, vc, "paged_merge", spec, 2, &pipe)))
        return s;
    vk_merge_args m = {
        .v_off = (uint32_t)(a->v_offset / qattn_dtype_size(d->v_dtype)),
        .s_off = (uint32_t)(a->s_offset / 4),
        .o_off = (uint32_t)(a->o_offset / qattn_dtype_size(d->o_dtype)),
        .lse_off = (uint32_t)(a->lse_offset / 4),
        .v_s0 = vk_stride32(d->num_states, d->v_stride[0]),
        .v_s1 = vk_stride32(d->rows, d->v_stride[1]),
        .v_s2 = vk_stride32(d->heads, d->v_stride[2]),
        .s_s0 = vk_stride32(d->num_states, d->s_stride[0]),
        .s_s1 = vk_stride32(d->rows, d->s_stride[1]),
        .s_s2 = vk_stride32(d->heads, d->s_stride[2]),
        .o_s0 = vk_stride32(d->rows, d->o_stride[0]),
        .o_s1 = vk_stride32(d->heads, d->o_stride[1]),
        .states = (uint32_t)d->num_states,
        .rows = (uint32_t)d->rows,
        .heads = (uint32_t)d->heads,
        .head_dim = (uint32_t)d->head_dim,
        .flags = a->lse ? MERGE_LSE : 0u,
    };
    VkBuffer bufs[VK_PAGED_BINDINGS] = {[5] = vk_buffer_handle(a->o), [6] = vk_buffer_handle(a->lse),
                                        [7] = vk_buffer_handle(a->s), [12] = vk_buffer_handle(a->v)};
    uint32_t grid[2];
    vk_grid_of((uint64_t)d->rows * (uint64_t)d->heads, grid);
    pthread_mutex_lock(&vc->lock);
    bind_all(vc, vc->paged_set, bufs, vk_buffer_handle(a->v));
    s = vk_begin(ctx, vc);
    if (!s) {
        vc->vk.vkCmdBindDescriptorSets(vc->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vc->paged_layout, 0, 1, &vc->paged_set,
                                       0, NULL);
        dispatch(vc, pipe, &m, sizeof(m), grid);
        s = vk_submit_wait(ctx, vc);
    }
    pthread_mutex_unlock(&vc->lock);
    return s;
}
