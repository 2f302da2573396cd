/*
 * The OpenCL paged KV cache: appends with quantization and page metadata
 * (kv_append.cl), paged attention with split-KV (paged.cl) over the whole
 * table or a page selection (prune.cl: select_scores, select_topk), the page
 * mass (prune.cl: page_mass), the exact LSE merge (merge.cl).
 *
 * Runs are enqueued on the context's in-order queue. With the check on (the
 * default), a run zeroes the workspace status word, runs the table check and
 * Q's NaN/Inf scan, then attention (and the merge), which write nothing when
 * the word is set, and reads the word back; when a table is bad it downloads
 * the tables to name the first bad entry. Without the check the run is
 * asynchronous and the kernels clamp every table entry, so they never read
 * outside the cache. Appends check on the host (slot range and duplicates,
 * per-head scales) and on the device (NaN/Inf) before writing anything, and
 * return when the cache is written.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "opencl_internal.h"
#include "opencl_kernels.h"

#define PAGED_WG 128  /* paged.cl: WG */
#define CHECK_WG 128  /* paged.cl: CHECK_WG */
#define MERGE_WG 64   /* merge.cl: MERGE_WG */
#define APPEND_WG 64  /* kv_append.cl: APPEND_WG */
#define SCAN_WG 64
#define SEL_WG 64     /* prune.cl: SEL_WG */
#define MAX_GROUPS 65536 /* work-groups of the grid-stride kernels (merge, append) */

/* ------------------------------------------------------------ planning */

/* The work split of paged.cl's attention kernel (its macros of the same names). */
typedef struct paged_geometry {
    int rt, bk;     /* rows (query heads x queries) and keys per tile */
    int ag, dg;     /* score phase: row groups x head-dim slices (x BK keys = 128 work-items) */
    int tw, rg, ks; /* P.V: word lanes x row groups x key groups (= 128 work-items) */
} paged_geometry;

/*
 * Score phase: up to 8 rows per work-item (each decoded K word serves them
 * all), the other lanes split the head dim. P.V: words of a V row across
 * lanes, rows grouped so a work-item holds at most 32 accumulators, the
 * remaining lanes split the tile's keys (each decoded V word serves all of a
 * work-item's rows).
 */
static paged_geometry paged_geometry_for(int64_t D, int64_t es, int rt, int bk)
{
    paged_geometry g = {.rt = rt, .bk = bk};
    const int words = (int)(D * es / 4), epw = (int)(4 / es), lanes = PAGED_WG / bk;
    g.ag = rt / 8 < 1 ? 1 : rt / 8 > lanes ? lanes : rt / 8;
    g.dg = lanes / g.ag;
    while (words % g.dg) { /* head-dim slices of whole words */
        g.dg /= 2;
        g.ag *= 2;
    }
    g.tw = PAGED_WG;
    while (g.tw > words || words % g.tw)
        g.tw /= 2;
    const int groups = PAGED_WG / g.tw, channels = epw * (words / g.tw), rows_max = channels >= 32 ? 1 : 32 / channels;
    g.rg = 1;
    while (g.rg < groups && (rt + g.rg - 1) / g.rg > rows_max)
        g.rg *= 2;
    g.ks = groups / g.rg;
    while (bk % g.ks) {
        g.ks /= 2;
        g.rg *= 2;
    }
    return g;
}

/* Local memory of paged_attention in bytes: mirrors paged.cl's arrays. */
static size_t paged_local_bytes(int64_t D, int64_t es, const paged_geometry *g)
{
    size_t kv = 2 * (size_t)g->bk * (size_t)(D * es / 4 + 1), acc = (size_t)g->ks * (size_t)g->rt * (size_t)D;
    size_t rt = (size_t)g->rt;
    return 4 * ((kv > acc ? kv : acc) + 2 * (size_t)g->bk + rt * (size_t)D + (size_t)g->dg * rt * (g->bk + 1) +
                rt * 8 + 3 * rt);
}

typedef struct ocl_paged_plan {
    cl_kernel attention, check, merge;
    cl_kernel scores, topk; /* page selection (prune.cl), when plan->select.enabled */
    paged_geometry geo;
    int q_tiles;
    int64_t scores_at, chosen_at; /* selection scratch, bytes from ws.backend's start */
    int64_t ubs_at, lbs_at;       /* adaptive selection: per-page bounds of the query row being tested */
} ocl_paged_plan;

void qattn_opencl_paged_plan_release(qattn_ctx *ctx, qattn_plan *plan)
{
    ocl_paged_plan *op = plan->impl;
    if (!op)
        return;
    const cl_kernel all[] = {op->attention, op->check, op->merge, op->scores, op->topk};
    qattn_opencl_release_kernels(impl_of(ctx), all, 5);
    free(op);
    plan->impl = NULL;
}

qattn_status qattn_opencl_paged_plan_init(qattn_ctx *ctx, qattn_plan *plan)
{
    ocl_ctx *c = impl_of(ctx);
    const ocl_device *d = c->dev;
    qattn_paged_problem *pp = &plan->pp;
    const int64_t D = pp->cache.head_dim, P = pp->cache.page_size, G = pp->group;
    if (D % 16 != 0 || D > 256)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "head dim %lld is not supported by the opencl paged kernels (multiples of 16 up to 256)",
                               (long long)D);
    if (pp->max_pages_per_seq > (INT32_MAX - 1024) / P)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "max_pages_per_seq * page_size = %lld * %lld: the opencl kernels index at most 2^31 - "
                               "1025 keys per sequence",
                               (long long)pp->max_pages_per_seq, (long long)P);
    if (pp->heads_q > INT32_MAX / pp->max_q_len)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "heads_q * max_q_len overflows the opencl kernels' row index");
    if (d->max_wg < PAGED_WG)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl paged kernels need work-groups of %d work-items; %s allows %zu", PAGED_WG,
                               d->name, d->max_wg);

    const int fmt = qattn_kv_format_of(&pp->cache);
    const int64_t es = (int64_t)qattn_dtype_size(pp->cache.dtype), rowb = D * es;
    /* Keys per tile: a K and a V tile of at most 20 KiB together, so a few work-groups share a compute unit. */
    int bk = 64;
    while (bk > 16 && 2 * bk * (rowb + 4) > 20480)
        bk /= 2;
    /* Rows per tile: the GQA group times the queries, up to RT * D <= 4096 accumulators per work-group. */
    const int64_t rows_needed = G * pp->max_q_len;
    const int rt_max = D <= 128 ? 32 : 16;
    int rt = 1;
    while (rt < rows_needed && rt < rt_max)
        rt *= 2;
    paged_geometry geo = paged_geometry_for(D, es, rt, bk);
    while (rt > 1 && paged_local_bytes(D, es, &geo) > d->local_mem) {
        rt /= 2;
        geo = paged_geometry_for(D, es, rt, bk);
    }
    if (paged_local_bytes(D, es, &geo) > d->local_mem)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "the opencl paged kernel needs %zu bytes of local memory at D=%lld; %s has %" PRIu64,
                               paged_local_bytes(D, es, &geo), (long long)D, d->name, (uint64_t)d->local_mem);
    const int64_t q_tiles = qattn_ceil_div(rows_needed, rt);
    const int64_t items = pp->batch * pp->cache.heads_kv * q_tiles;
    /* Work-groups resident at once: a few per GPU compute unit, one per CPU thread. */
    const int64_t slots = (int64_t)d->compute_units * ((d->type & CL_DEVICE_TYPE_CPU) ? 1 : 4);
    if (pp->num_splits == 0) {
        pp->num_splits = qattn_paged_choose_splits(items, slots > 0 ? slots : 1, pp->max_pages_per_seq, P);
        snprintf(plan->why, sizeof(plan->why),
                 "%lld work items (sequences x KV heads x %lld query tile(s) of %d rows) for about %lld resident "
                 "work-groups (%u compute units): %d split(s) of the keys.",
                 (long long)items, (long long)q_tiles, rt, (long long)slots, (unsigned)d->compute_units,
                 pp->num_splits);
    } else {
        snprintf(plan->why, sizeof(plan->why), "%d split(s) of the keys, as requested.", pp->num_splits);
    }
    if (items > INT32_MAX / PAGED_WG / pp->num_splits)
        return qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                               "%lld work items x %d splits exceed the opencl backend's launch limit",
                               (long long)items, pp->num_splits);
    qattn_status partials = qattn_paged_partials_bytes(ctx, pp, &plan->backend_workspace);
    if (partials)
        return partials;
    /* Page selection: fp32 scores and int32 chosen flags per (b, KV head, logical page), after the partials. */
    size_t scores_off = 0, chosen_off = 0, ubs_off = 0, lbs_off = 0;
    if (plan->select.enabled) {
        const size_t per = (size_t)pp->batch * (size_t)pp->cache.heads_kv * (size_t)pp->max_pages_per_seq * 4u;
        scores_off = qattn_round_up(plan->backend_workspace, 256);
        chosen_off = scores_off + qattn_round_up(per, 256);
        plan->backend_workspace = chosen_off + per;
        if (plan->select.adaptive) {
            ubs_off = qattn_round_up(plan->backend_workspace, 256);
            lbs_off = ubs_off + qattn_round_up(per, 256);
            plan->backend_workspace = lbs_off + per;
        }
    }

    ocl_paged_plan *op = calloc(1, sizeof(*op));
    if (!op)
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the plan");
    plan->impl = op; /* from here on a failure leaves it to the core, which calls the release slot */
    op->geo = geo;
    op->q_tiles = (int)q_tiles;
    op->scores_at = (int64_t)scores_off; /* made absolute (+ ws.backend) at run time */
    op->chosen_at = (int64_t)chosen_off;
    op->ubs_at = (int64_t)ubs_off;
    op->lbs_at = (int64_t)lbs_off;
    qattn_status s;
    char options[512];
    snprintf(options, sizeof(options),
             "-cl-std=CL1.2 -DHEAD_DIM=%lld -DCACHE_FMT=%d -DRT=%d -DBK=%d -DAG=%d -DDG=%d -DTW=%d -DRG=%d -DKS=%d "
             "-DIN_DTYPE=%d -DOUT_DTYPE=%d -DHAS_FP16=%d -DHAS_FP64=%d",
             (long long)D, fmt, rt, bk, geo.ag, geo.dg, geo.tw, geo.rg, geo.ks, dtype_code(pp->q_dtype),
             dtype_code(pp->q_dtype), d->fp16, d->fp64);
    const char *paged_parts[2] = {qattn_opencl_src_common, qattn_opencl_src_paged};
    cl_program prog = NULL;
    if ((s = qattn_opencl_get_program(ctx, "paged", paged_parts, 2, options, &prog)) ||
        (s = make_kernel(ctx, prog, "paged_attention", &op->attention)) ||
        (pp->check && (s = make_kernel(ctx, prog, "paged_check", &op->check))))
        return s;
    size_t wg = 0;
    cl_int err = c->cl->clGetKernelWorkGroupInfo(op->attention, d->id, CL_KERNEL_WORK_GROUP_SIZE, sizeof(wg), &wg,
                                                 NULL);
    if (err != CL_SUCCESS) {
        s = cl_error(ctx, err, "clGetKernelWorkGroupInfo", "paged_attention");
        return s;
    }
    if (wg < PAGED_WG) {
        s = qattn_set_error(ctx, QATTN_ERR_UNSUPPORTED,
                            "the opencl paged kernel at D=%lld runs at most %zu work-items per group on %s; it "
                            "needs %d",
                            (long long)D, wg, d->name, PAGED_WG);
        return s;
    }
    if (pp->num_splits > 1) {
        snprintf(options, sizeof(options), "-cl-std=CL1.2 -DIN_DTYPE=0 -DOUT_DTYPE=%d -DHAS_FP16=%d -DHAS_FP64=%d",
                 dtype_code(pp->q_dtype), d->fp16, d->fp64);
        const char *merge_parts[2] = {qattn_opencl_src_common, qattn_opencl_src_merge};
        if ((s = qattn_opencl_get_program(ctx, "merge", merge_parts, 2, options, &prog)) ||
            (s = make_kernel(ctx, prog, "merge_states", &op->merge)))
            return s;
    }
    if (plan->select.enabled) {
        snprintf(options, sizeof(options),
                 "-cl-std=CL1.2 -DHEAD_DIM=%lld -DCACHE_FMT=%d -DIN_DTYPE=%d -DOUT_DTYPE=0 -DADAPTIVE=%d "
                 "-DHAS_FP16=%d -DHAS_FP64=%d",
                 (long long)D, fmt, dtype_code(pp->q_dtype), plan->select.adaptive ? 1 : 0, d->fp16, d->fp64);
        const char *prune_parts[2] = {qattn_opencl_src_common, qattn_opencl_src_prune};
        if ((s = qattn_opencl_get_program(ctx, "prune", prune_parts, 2, options, &prog)) ||
            (s = make_kernel(ctx, prog, "select_scores", &op->scores)) ||
            (s = make_kernel(ctx, prog, "select_topk", &op->topk)))
            return s;
    }
    const int64_t per = qattn_ceil_div(pp->max_pages_per_seq, pp->num_splits);
    plan->q_tile = rt;
    plan->kv_tile = pp->num_splits > 1 ? (int)(per * P) : 0;
    plan->status_word = pp->check;
    snprintf(plan->kernel, sizeof(plan->kernel), "opencl_paged_%s%s_d%lld_r%d_k%d", qattn_dtype_name(pp->cache.dtype),
             fmt == QATTN_KV_FMT_I8_ROW ? "_row" : "", (long long)D, rt, bk);
    size_t used = strlen(plan->why);
    snprintf(plan->why + used, sizeof(plan->why) - used,
             " Tiles of %d rows (the %lld query heads of a KV head x queries) x %d keys; scores by %d row group(s) "
             "x %d head-dim slice(s), P.V by %d word lanes x %d row group(s) x %d key group(s); %zu bytes of local "
             "memory.",
             rt, (long long)G, bk, geo.ag, geo.dg, geo.tw, geo.rg, geo.ks, paged_local_bytes(D, es, &geo));
    return QATTN_OK;
}

/* ------------------------------------------------------------------ run */

/* The table arguments shared by paged_check and paged_attention, after their tensors. */
static void arg_tables(arg_list *al, const qattn_paged_args *a)
{
    arg_mem(al, mem_of(a->qo_indptr));
    arg_mem(al, mem_of(a->block_table));
    arg_mem(al, mem_of(a->seq_lens));
    arg_mem(al, mem_of(a->indptr));
    arg_mem(al, mem_of(a->indices));
    arg_mem(al, mem_of(a->last_page_len));
}

static qattn_status enqueue_check(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a, cl_mem ws,
                                  int64_t status_at)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_paged_problem *pp = &plan->pp;
    const ocl_paged_plan *op = plan->impl;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    qattn_status s = qattn_opencl_clear_status(ctx, ws, status_at, "the status word");
    if (s)
        return s;
    arg_list al = args_for(c, op->check, "paged_check");
    arg_tables(&al, a);
    arg_int(&al, pp->table == QATTN_PAGES_DENSE);
    arg_int(&al, pp->batch);
    arg_int(&al, pp->max_pages_per_seq);
    arg_int(&al, pp->cache.page_size);
    arg_int(&al, pp->cache.num_pages);
    arg_int(&al, pp->total_q);
    arg_int(&al, pp->max_q_len);
    arg_long(&al, a->indices ? (int64_t)(a->indices->size / 4) : 0);
    arg_mem(&al, mem_of(a->q));
    arg_long(&al, (int64_t)(a->q_offset / es));
    arg_long(&al, pp->q_stride[0]);
    arg_long(&al, pp->q_stride[1]);
    arg_int(&al, pp->heads_q);
    arg_mem(&al, ws);
    arg_long(&al, status_at);
    int64_t scan = qattn_ceil_div(pp->total_q * pp->heads_q, CHECK_WG);
    scan = scan < 1 ? 1 : scan > 1024 ? 1024 : scan;
    size_t local = CHECK_WG, global = (size_t)(pp->batch + scan) * local;
    return launch(ctx, &al, 1, &global, &local);
}

static qattn_status enqueue_attention(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a, cl_mem ws,
                                      int64_t status_at, int64_t part_o_at, int64_t part_lse_at, int64_t sel_at)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_paged_problem *pp = &plan->pp;
    const ocl_paged_plan *op = plan->impl;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    int64_t page_stride, tok_stride, head_stride;
    qattn_kv_cache_strides(&pp->cache, &page_stride, &tok_stride, &head_stride);
    arg_list al = args_for(c, op->attention, "paged_attention");
    arg_mem(&al, mem_of(a->q));
    arg_mem(&al, mem_of(a->o));
    arg_mem(&al, pp->return_lse ? mem_of(a->lse) : NULL);
    arg_mem(&al, mem_of(a->cache->k));
    arg_mem(&al, mem_of(a->cache->v));
    arg_mem(&al, mem_of(a->cache->k_scale));
    arg_mem(&al, mem_of(a->cache->v_scale));
    arg_tables(&al, a);
    arg_mem(&al, ws);
    arg_long(&al, (int64_t)(a->q_offset / es));
    arg_long(&al, pp->q_stride[0]);
    arg_long(&al, pp->q_stride[1]);
    arg_long(&al, (int64_t)(a->o_offset / es));
    arg_long(&al, pp->o_stride[0]);
    arg_long(&al, pp->o_stride[1]);
    arg_long(&al, (int64_t)(a->lse_offset / 4));
    arg_int(&al, pp->return_lse);
    arg_long(&al, page_stride);
    arg_long(&al, tok_stride);
    arg_long(&al, head_stride);
    arg_int(&al, pp->cache.heads_kv);
    arg_int(&al, pp->group);
    arg_int(&al, pp->heads_q);
    arg_int(&al, pp->cache.page_size);
    arg_int(&al, pp->cache.num_pages);
    arg_int(&al, pp->table == QATTN_PAGES_DENSE);
    arg_int(&al, pp->max_pages_per_seq);
    arg_int(&al, pp->total_q);
    arg_int(&al, pp->max_q_len);
    arg_long(&al, a->indices ? (int64_t)(a->indices->size / 4) : 0);
    arg_int(&al, pp->num_splits);
    arg_int(&al, qattn_ceil_div(pp->max_pages_per_seq, pp->num_splits));
    arg_int(&al, op->q_tiles);
    arg_int(&al, pp->causal);
    arg_float(&al, pp->sm_scale * (float)QATTN_LOG2E);
    arg_long(&al, status_at);
    arg_long(&al, part_o_at);
    arg_long(&al, part_lse_at);
    arg_long(&al, sel_at >= 0 ? (int64_t)a->workspace_offset + (int64_t)plan->ws.select_counts : -1);
    arg_long(&al, sel_at);
    size_t local = PAGED_WG;
    size_t global = (size_t)(pp->batch * pp->cache.heads_kv * op->q_tiles * pp->num_splits) * local;
    return launch(ctx, &al, 1, &global, &local);
}

/* The budget fraction as m * 2^-shift (m < 2^24), for prune.cl's exact ceil(fraction * n). */
static void fraction_bits(float f, int64_t *m, int *shift)
{
    *m = 0;
    *shift = 0;
    if (!(f > 0.f))
        return;
    int e = 0;
    float x = frexpf(f, &e); /* f = x * 2^e, x in [0.5, 1) */
    *m = (int64_t)ldexpf(x, 24);
    *shift = 24 - e;
}

/* The selection of every (b, KV head) into the workspace: select_scores, then select_topk. */
static qattn_status enqueue_selection(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a, cl_mem ws,
                                      int64_t status_at)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_paged_problem *pp = &plan->pp;
    const ocl_paged_plan *op = plan->impl;
    const qattn_select_problem *sel = &plan->select;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    const int64_t base = (int64_t)a->workspace_offset, backend = base + (int64_t)plan->ws.backend;
    const int64_t scores_at = backend + op->scores_at, chosen_at = backend + op->chosen_at;
    const int64_t rows = pp->batch * pp->cache.heads_kv, chunks = qattn_ceil_div(pp->max_pages_per_seq, SEL_WG);
    qattn_kv_meta_sizes ms;
    qattn_status s = qattn_kv_meta_validate(ctx, &pp->cache, &ms);
    if (s)
        return s;
    const int64_t indices_count = a->indices ? (int64_t)(a->indices->size / 4) : 0;
    arg_list al = args_for(c, op->scores, "select_scores");
    arg_mem(&al, mem_of(a->q));
    arg_long(&al, (int64_t)(a->q_offset / es));
    arg_long(&al, pp->q_stride[0]);
    arg_long(&al, pp->q_stride[1]);
    arg_mem(&al, mem_of(a->cache->k_meta));
    arg_long(&al, (int64_t)ms.scale_offset);
    arg_mem(&al, mem_of(a->cache->k_scale));
    arg_tables(&al, a);
    arg_int(&al, pp->table == QATTN_PAGES_DENSE);
    arg_int(&al, pp->max_pages_per_seq);
    arg_int(&al, pp->cache.page_size);
    arg_int(&al, pp->cache.num_pages);
    arg_int(&al, pp->total_q);
    arg_int(&al, pp->max_q_len);
    arg_long(&al, indices_count);
    arg_int(&al, pp->cache.heads_kv);
    arg_int(&al, pp->group);
    arg_float(&al, pp->sm_scale);
    arg_int(&al, chunks);
    arg_mem(&al, ws);
    arg_long(&al, status_at);
    arg_long(&al, scores_at);
    size_t local = SEL_WG, global = (size_t)(rows * chunks) * local;
    if ((s = launch(ctx, &al, 1, &global, &local)))
        return s;

    int64_t frac_m;
    int frac_shift;
    fraction_bits(sel->budget_fraction, &frac_m, &frac_shift);
    al = args_for(c, op->topk, "select_topk");
    arg_tables(&al, a);
    arg_int(&al, pp->table == QATTN_PAGES_DENSE);
    arg_int(&al, pp->max_pages_per_seq);
    arg_int(&al, pp->cache.page_size);
    arg_int(&al, pp->cache.num_pages);
    arg_int(&al, pp->total_q);
    arg_int(&al, pp->max_q_len);
    arg_long(&al, indices_count);
    arg_int(&al, pp->cache.heads_kv);
    arg_long(&al, sel->sink_pages);
    arg_long(&al, sel->recent_pages);
    arg_long(&al, sel->budget_pages);
    arg_long(&al, frac_m);
    arg_int(&al, frac_shift);
    arg_long(&al, sel->max_budget_pages);
    arg_mem(&al, ws);
    arg_long(&al, status_at);
    arg_long(&al, scores_at);
    arg_long(&al, chosen_at);
    arg_long(&al, base + (int64_t)plan->ws.select_counts);
    arg_long(&al, base + (int64_t)plan->ws.select_pages);
    int64_t page_stride, tok_stride, head_stride;
    qattn_kv_cache_strides(&pp->cache, &page_stride, &tok_stride, &head_stride);
    arg_mem(&al, mem_of(a->q));
    arg_long(&al, (int64_t)(a->q_offset / es));
    arg_long(&al, pp->q_stride[0]);
    arg_long(&al, pp->q_stride[1]);
    arg_mem(&al, mem_of(a->cache->k_meta));
    arg_long(&al, (int64_t)ms.scale_offset);
    arg_mem(&al, mem_of(a->cache->k_scale));
    arg_mem(&al, mem_of(a->cache->k));
    arg_long(&al, page_stride);
    arg_long(&al, tok_stride);
    arg_long(&al, head_stride);
    arg_int(&al, pp->group);
    arg_float(&al, pp->sm_scale);
    arg_float(&al, sel->epsilon);
    arg_long(&al, sel->adaptive ? backend + op->ubs_at : 0);
    arg_long(&al, sel->adaptive ? backend + op->lbs_at : 0);
    global = (size_t)rows * local;
    return launch(ctx, &al, 1, &global, &local);
}

/* The split-KV partials in the workspace, merged into O (and LSE). */
static qattn_status enqueue_split_merge(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a, cl_mem ws,
                                        int64_t status_at, int64_t part_o_at, int64_t part_lse_at)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_paged_problem *pp = &plan->pp;
    const ocl_paged_plan *op = plan->impl;
    const int64_t D = pp->cache.head_dim, Hq = pp->heads_q, R = pp->total_q;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    arg_list al = args_for(c, op->merge, "merge_states (split-KV)");
    arg_mem(&al, ws);
    arg_long(&al, part_o_at / 4);
    arg_long(&al, R * Hq * D);
    arg_long(&al, Hq * D);
    arg_long(&al, D);
    arg_mem(&al, ws);
    arg_long(&al, part_lse_at / 4);
    arg_long(&al, R * Hq);
    arg_long(&al, Hq);
    arg_long(&al, 1);
    arg_mem(&al, mem_of(a->o));
    arg_long(&al, (int64_t)(a->o_offset / es));
    arg_long(&al, pp->o_stride[0]);
    arg_long(&al, pp->o_stride[1]);
    arg_mem(&al, pp->return_lse ? mem_of(a->lse) : NULL);
    arg_long(&al, (int64_t)(a->lse_offset / 4));
    arg_int(&al, pp->return_lse);
    arg_int(&al, pp->num_splits);
    arg_long(&al, R);
    arg_int(&al, Hq);
    arg_int(&al, D);
    arg_mem(&al, mem_of(a->qo_indptr));
    arg_int(&al, pp->batch);
    arg_int(&al, 1);
    arg_mem(&al, ws);
    arg_long(&al, status_at);
    int64_t groups = R * Hq < MAX_GROUPS ? R * Hq : MAX_GROUPS;
    size_t local = MERGE_WG, global = (size_t)groups * local;
    return launch(ctx, &al, 1, &global, &local);
}

qattn_status qattn_opencl_paged_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_paged_problem *pp = &plan->pp;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "args.stream must be NULL on the opencl backend (it runs on the context's queue)");
    cl_mem ws = plan->ws.total ? mem_of(a->workspace) : NULL;
    const int64_t base = (int64_t)a->workspace_offset;
    const int64_t status_at = pp->check ? base + (int64_t)plan->ws.status : -1;
    int64_t part_o_at = -1, part_lse_at = -1;
    if (pp->num_splits > 1) {
        part_o_at = base + (int64_t)plan->ws.backend;
        part_lse_at = part_o_at + (int64_t)pp->num_splits * pp->total_q * pp->heads_q * pp->cache.head_dim * 4;
    }

    /* Kernel arguments live in the plan's kernel objects: one run at a time sets and enqueues them. */
    pthread_mutex_lock(&c->lock);
    qattn_status s = QATTN_OK;
    if (pp->check)
        s = enqueue_check(ctx, plan, a, ws, status_at);
    int64_t sel_at = -1; /* the selected pages' lists, when the plan selects */
    if (!s && plan->select.enabled) {
        sel_at = base + (int64_t)plan->ws.select_pages;
        s = enqueue_selection(ctx, plan, a, ws, status_at);
    }
    if (!s)
        s = enqueue_attention(ctx, plan, a, ws, status_at, part_o_at, part_lse_at, sel_at);
    if (!s && pp->num_splits > 1)
        s = enqueue_split_merge(ctx, plan, a, ws, status_at, part_o_at, part_lse_at);
    uint32_t words[QATTN_STATUS_WORDS];
    s = qattn_opencl_finish_run(ctx, s, ws, pp->check ? status_at : -1, "paged run", words);
    return s ? s : qattn_paged_status_error(ctx, plan, a, words);
}

/* ----------------------------------------------------------- page mass */

qattn_status qattn_opencl_paged_page_mass(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *a,
                                          qattn_buffer *mass, size_t mass_offset)
{
    ocl_ctx *c = impl_of(ctx);
    const ocl_device *d = c->dev;
    const qattn_paged_problem *pp = &plan->pp;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "args.stream must be NULL on the opencl backend (it runs on the context's queue)");
    /* Built on first use (cached by the context): plans that never ask for masses never compile it. */
    char options[256];
    snprintf(options, sizeof(options),
             "-cl-std=CL1.2 -DHEAD_DIM=%lld -DCACHE_FMT=%d -DIN_DTYPE=%d -DOUT_DTYPE=0 -DADAPTIVE=0 -DHAS_FP16=%d "
             "-DHAS_FP64=%d",
             (long long)pp->cache.head_dim, qattn_kv_format_of(&pp->cache), dtype_code(pp->q_dtype), d->fp16, d->fp64);
    const char *parts[2] = {qattn_opencl_src_common, qattn_opencl_src_prune};
    cl_program prog = NULL;
    cl_kernel kernel = NULL;
    qattn_status s;
    if ((s = qattn_opencl_get_program(ctx, "prune", parts, 2, options, &prog)) ||
        (s = make_kernel(ctx, prog, "page_mass", &kernel)))
        return s;
    cl_mem ws = plan->ws.total ? mem_of(a->workspace) : NULL;
    const int64_t status_at = pp->check ? (int64_t)a->workspace_offset + (int64_t)plan->ws.status : -1;
    const size_t es = qattn_dtype_size(pp->q_dtype);
    int64_t page_stride, tok_stride, head_stride;
    qattn_kv_cache_strides(&pp->cache, &page_stride, &tok_stride, &head_stride);
    pthread_mutex_lock(&c->lock);
    if (pp->check) /* the same table check (and Q scan) as a run's, before anything is read through the tables */
        s = enqueue_check(ctx, plan, a, ws, status_at);
    if (!s) {
        arg_list al = args_for(c, kernel, "page_mass");
        arg_mem(&al, mem_of(a->q));
        arg_long(&al, (int64_t)(a->q_offset / es));
        arg_long(&al, pp->q_stride[0]);
        arg_long(&al, pp->q_stride[1]);
        arg_mem(&al, mem_of(a->lse));
        arg_long(&al, (int64_t)(a->lse_offset / 4));
        arg_mem(&al, mem_of(a->cache->k));
        arg_mem(&al, mem_of(a->cache->k_scale));
        arg_tables(&al, a);
        arg_int(&al, pp->table == QATTN_PAGES_DENSE);
        arg_int(&al, pp->max_pages_per_seq);
        arg_int(&al, pp->cache.page_size);
        arg_int(&al, pp->cache.num_pages);
        arg_int(&al, pp->total_q);
        arg_int(&al, pp->max_q_len);
        arg_long(&al, a->indices ? (int64_t)(a->indices->size / 4) : 0);
        arg_int(&al, pp->cache.heads_kv);
        arg_int(&al, pp->group);
        arg_int(&al, pp->heads_q);
        arg_long(&al, page_stride);
        arg_long(&al, tok_stride);
        arg_long(&al, head_stride);
        arg_int(&al, pp->causal);
        arg_float(&al, pp->sm_scale);
        arg_mem(&al, ws);
        arg_long(&al, status_at);
        arg_mem(&al, mem_of(mass));
        arg_long(&al, (int64_t)(mass_offset / 4));
        size_t local = SEL_WG;
        size_t global = (size_t)(pp->batch * pp->cache.heads_kv * pp->max_pages_per_seq) * local;
        s = launch(ctx, &al, 1, &global, &local);
    }
    uint32_t words[QATTN_STATUS_WORDS];
    s = qattn_opencl_finish_run(ctx, s, ws, pp->check ? status_at : -1, "page mass", words);
    c->cl->clReleaseKernel(kernel); /* the enqueued command keeps what it needs */
    return s ? s : qattn_paged_status_error(ctx, plan, a, words);
}

/* ---------------------------------------------------------------- merge */

qattn_status qattn_opencl_merge_states(qattn_ctx *ctx, const qattn_merge_desc *d, const qattn_merge_args *a)
{
    ocl_ctx *c = impl_of(ctx);
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "args.stream must be NULL on the opencl backend (it runs on the context's queue)");
    char options[256];
    snprintf(options, sizeof(options), "-cl-std=CL1.2 -DIN_DTYPE=%d -DOUT_DTYPE=%d -DHAS_FP16=%d -DHAS_FP64=%d",
             dtype_code(d->v_dtype), dtype_code(d->o_dtype), c->dev->fp16, c->dev->fp64);
    const char *parts[2] = {qattn_opencl_src_common, qattn_opencl_src_merge};
    cl_program prog = NULL;
    cl_kernel kernel = NULL;
    qattn_status s;
    if ((s = qattn_opencl_get_program(ctx, "merge", parts, 2, options, &prog)) ||
        (s = make_kernel(ctx, prog, "merge_states", &kernel)))
        return s;
    const size_t ves = qattn_dtype_size(d->v_dtype), oes = qattn_dtype_size(d->o_dtype);
    arg_list al = args_for(c, kernel, "merge_states");
    arg_mem(&al, mem_of(a->v));
    arg_long(&al, (int64_t)(a->v_offset / ves));
    for (int i = 0; i < 3; i++)
        arg_long(&al, d->v_stride[i]);
    arg_mem(&al, mem_of(a->s));
    arg_long(&al, (int64_t)(a->s_offset / 4));
    for (int i = 0; i < 3; i++)
        arg_long(&al, d->s_stride[i]);
    arg_mem(&al, mem_of(a->o));
    arg_long(&al, (int64_t)(a->o_offset / oes));
    arg_long(&al, d->o_stride[0]);
    arg_long(&al, d->o_stride[1]);
    arg_mem(&al, mem_of(a->lse));
    arg_long(&al, (int64_t)(a->lse_offset / 4));
    arg_int(&al, a->lse != NULL);
    arg_int(&al, d->num_states);
    arg_long(&al, d->rows);
    arg_int(&al, d->heads);
    arg_int(&al, d->head_dim);
    arg_mem(&al, NULL);
    arg_int(&al, 0);
    arg_int(&al, 0);
    arg_mem(&al, NULL);
    arg_long(&al, -1);
    int64_t pairs = d->rows * d->heads;
    size_t local = MERGE_WG, global = (size_t)(pairs < MAX_GROUPS ? pairs : MAX_GROUPS) * local;
    s = launch(ctx, &al, 1, &global, &local);
    if (!s) {
        cl_int err = c->cl->clFlush(c->queue);
        if (err != CL_SUCCESS)
            s = cl_error(ctx, err, "clFlush", "merge_states");
    }
    c->cl->clReleaseKernel(kernel); /* the enqueued command keeps what it needs */
    return s;
}

/* --------------------------------------------------------------- append */

/* The append's checks: NaN/Inf in the new values by a device scan, the
 * slots and per-head scales on host copies (the device has no sort for
 * duplicates); the core words the result. Nothing is written before they pass. */
static qattn_status append_check(qattn_ctx *ctx, const qattn_kv_append_args *a, cl_kernel scan)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_kv_cache_desc *cd = a->cache;
    const int64_t T = a->num_tokens, H = cd->heads_kv;
    const bool head_scales = cd->scales == QATTN_KV_SCALES_PER_HEAD;
    const size_t es = qattn_dtype_size(a->new_dtype);
    int64_t *slots = malloc((size_t)T * 8);
    float *scales = head_scales ? malloc((size_t)H * 8) : NULL;
    if (!slots || (head_scales && !scales)) {
        free(slots);
        free(scales);
        return qattn_set_error(ctx, QATTN_ERR_OUT_OF_MEMORY, "out of host memory checking the slot mapping");
    }
    uint32_t words[QATTN_STATUS_WORDS] = {0};
    qattn_status s = QATTN_OK;
    cl_int err = CL_SUCCESS;
    pthread_mutex_lock(&c->lock); /* the status buffer is the context's */
    if (!c->append_status) {
        c->append_status = c->cl->clCreateBuffer(c->context, CL_MEM_READ_WRITE, QATTN_STATUS_BYTES, NULL, &err);
        if (!c->append_status)
            s = cl_error(ctx, err, "clCreateBuffer", "the append check's status words");
    }
    if (!s)
        s = qattn_opencl_clear_status(ctx, c->append_status, 0, "the append check's status words");
    if (!s) {
        int64_t rows = T * H;
        arg_list al = args_for(c, scan, "append_scan");
        arg_mem(&al, mem_of(a->k_new));
        arg_mem(&al, mem_of(a->v_new));
        arg_long(&al, (int64_t)(a->k_new_offset / es));
        arg_long(&al, (int64_t)(a->v_new_offset / es));
        arg_long(&al, a->new_stride[0]);
        arg_long(&al, a->new_stride[1]);
        arg_int(&al, H);
        arg_long(&al, rows);
        arg_mem(&al, c->append_status);
        size_t local = SCAN_WG, global = qattn_round_up((size_t)rows, local);
        s = launch(ctx, &al, 1, &global, &local);
    }
    if (!s && (err = c->cl->clEnqueueReadBuffer(c->queue, mem_of(a->slot_mapping), CL_FALSE, a->slot_mapping_offset,
                                                (size_t)T * 8, slots, 0, NULL, NULL)))
        s = cl_error(ctx, err, "clEnqueueReadBuffer", "the slot mapping");
    if (!s && head_scales &&
        ((err = c->cl->clEnqueueReadBuffer(c->queue, mem_of(a->buffers->k_scale), CL_FALSE, 0, (size_t)H * 4, scales,
                                           0, NULL, NULL)) ||
         (err = c->cl->clEnqueueReadBuffer(c->queue, mem_of(a->buffers->v_scale), CL_FALSE, 0, (size_t)H * 4,
                                           scales + H, 0, NULL, NULL))))
        s = cl_error(ctx, err, "clEnqueueReadBuffer", "the per-head scales");
    /* in-order queue: the last read is done when all of them are */
    if (!s && (err = c->cl->clEnqueueReadBuffer(c->queue, c->append_status, CL_TRUE, 0, QATTN_STATUS_BYTES, words, 0,
                                                NULL, NULL)))
        s = cl_error(ctx, err, "clEnqueueReadBuffer", "the append check's status words");
    if (s) /* reads may still be in flight into our host memory */
        c->cl->clFinish(c->queue);
    pthread_mutex_unlock(&c->lock);
    if (!s)
        s = qattn_kv_append_check(ctx, a, slots, words[QATTN_STATUS_NONFINITE], scales, scales ? scales + H : NULL);
    free(slots);
    free(scales);
    return s;
}

/* kv_append.cl's append_meta over the append's tokens (QATTN_PRUNE_CAP_META); *done: its event. */
static qattn_status enqueue_append_meta(qattn_ctx *ctx, const qattn_kv_append_args *a, cl_kernel kernel,
                                        cl_event *done)
{
    ocl_ctx *c = impl_of(ctx);
    const qattn_kv_cache_desc *cd = a->cache;
    int64_t page_stride, tok_stride, head_stride;
    qattn_kv_cache_strides(cd, &page_stride, &tok_stride, &head_stride);
    qattn_kv_meta_sizes ms;
    qattn_status s = qattn_kv_meta_validate(ctx, cd, &ms);
    if (s)
        return s;
    arg_list al = args_for(c, kernel, "append_meta");
    arg_mem(&al, mem_of(a->slot_mapping));
    arg_long(&al, (int64_t)(a->slot_mapping_offset / 8));
    arg_long(&al, a->num_tokens);
    arg_long(&al, cd->num_pages * cd->page_size);
    arg_int(&al, cd->heads_kv);
    arg_int(&al, cd->page_size);
    arg_long(&al, page_stride);
    arg_long(&al, tok_stride);
    arg_long(&al, head_stride);
    arg_mem(&al, mem_of(a->buffers->k));
    arg_mem(&al, mem_of(a->buffers->k_scale));
    arg_mem(&al, mem_of(a->buffers->k_meta));
    arg_long(&al, (int64_t)ms.scale_offset);
    const int64_t items = a->num_tokens * cd->heads_kv * cd->head_dim;
    const int64_t groups = qattn_ceil_div(items, APPEND_WG);
    size_t local = APPEND_WG, global = (size_t)(groups < MAX_GROUPS ? groups : MAX_GROUPS) * local;
    return launch_event(ctx, &al, 1, &global, &local, done);
}

qattn_status qattn_opencl_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *a, const qattn_kv_cache_sizes *sizes)
{
    (void)sizes;
    ocl_ctx *c = impl_of(ctx);
    const ocl_device *d = c->dev;
    const qattn_kv_cache_desc *cd = a->cache;
    if (a->stream)
        return qattn_set_error(ctx, QATTN_ERR_INVALID_ARGUMENT,
                               "args.stream must be NULL on the opencl backend (it runs on the context's queue)");
    /* The quantized formats divide with common.cl's div_rn (integer arithmetic), so their codes equal the CPU
     * reference's on every device, whatever its fp32 division accuracy or fp64 support. */
    const int fmt = qattn_kv_format_of(cd);
    char options[512];
    snprintf(options, sizeof(options),
             "-cl-std=CL1.2 -DHEAD_DIM=%lld -DCACHE_FMT=%d -DIN_DTYPE=%d -DOUT_DTYPE=0 -DHAS_FP16=%d -DHAS_FP64=%d",
             (long long)cd->head_dim, fmt, dtype_code(a->new_dtype), d->fp16, d->fp64);
    const char *parts[2] = {qattn_opencl_src_common, qattn_opencl_src_kv_append};
    const bool check = !(a->flags & QATTN_FLAG_NO_FINITE_CHECK);
    cl_program prog = NULL;
    cl_kernel kernels[3] = {NULL, NULL, NULL}; /* write, scan, meta */
    qattn_status s;
    if ((s = qattn_opencl_get_program(ctx, "kv_append", parts, 2, options, &prog)) ||
        (s = make_kernel(ctx, prog, "append_write", &kernels[0])) ||
        (check && (s = make_kernel(ctx, prog, "append_scan", &kernels[1]))) ||
        (a->buffers->k_meta && (s = make_kernel(ctx, prog, "append_meta", &kernels[2]))))
        goto done;
    if (check && (s = append_check(ctx, a, kernels[1])))
        goto done;

    int64_t page_stride, tok_stride, head_stride;
    qattn_kv_cache_strides(cd, &page_stride, &tok_stride, &head_stride);
    const size_t es = qattn_dtype_size(a->new_dtype);
    const int64_t rows = a->num_tokens * cd->heads_kv * 2;
    arg_list al = args_for(c, kernels[0], "append_write");
    arg_mem(&al, mem_of(a->k_new));
    arg_mem(&al, mem_of(a->v_new));
    arg_long(&al, (int64_t)(a->k_new_offset / es));
    arg_long(&al, (int64_t)(a->v_new_offset / es));
    arg_long(&al, a->new_stride[0]);
    arg_long(&al, a->new_stride[1]);
    arg_mem(&al, mem_of(a->slot_mapping));
    arg_long(&al, (int64_t)(a->slot_mapping_offset / 8));
    arg_long(&al, a->num_tokens);
    arg_long(&al, cd->num_pages * cd->page_size);
    arg_int(&al, cd->heads_kv);
    arg_int(&al, cd->page_size);
    arg_long(&al, page_stride);
    arg_long(&al, tok_stride);
    arg_long(&al, head_stride);
    arg_mem(&al, mem_of(a->buffers->k));
    arg_mem(&al, mem_of(a->buffers->v));
    arg_mem(&al, mem_of(a->buffers->k_scale));
    arg_mem(&al, mem_of(a->buffers->v_scale));
    size_t local = APPEND_WG, global = (size_t)(rows < MAX_GROUPS ? rows : MAX_GROUPS) * local;
    cl_event written = NULL;
    if ((s = launch_event(ctx, &al, 1, &global, &local, &written)))
        goto done;
    if (a->buffers->k_meta) { /* the pages it wrote get their metadata recomputed, after it on the in-order queue */
        cl_event meta_done = NULL;
        if ((s = enqueue_append_meta(ctx, a, kernels[2], &meta_done))) {
            c->cl->clWaitForEvents(1, &written); /* nothing of ours is left in flight */
            c->cl->clReleaseEvent(written);
            goto done;
        }
        c->cl->clReleaseEvent(written);
        written = meta_done;
    }
    /* Synchronous, as the API promises for backends without streams. */
    cl_int err = c->cl->clWaitForEvents(1, &written);
    c->cl->clReleaseEvent(written);
    if (err != CL_SUCCESS)
        s = cl_error(ctx, err, "clWaitForEvents", "the cache append");
done:
    qattn_opencl_release_kernels(c, kernels, 3);
    return s;
}
