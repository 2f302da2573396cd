/* Sparse plans: the layout pre-pass (block layout to the attention kernels'
 * step lists, cuda_sparse.cuh) and the PREDICT kernels, equal in meaning to
 * src/sparse.c's host prediction: pool (each Q and K block's mean and the
 * smallest cosine of a token to it), select (per layout row: softmax of the
 * pooled scores over the visible key blocks per query head of the GQA
 * group, kept by cumulative mass or top-k, plus the unlike, sink and recent
 * blocks, united over the group), and the density per (b, hkv). Float
 * arithmetic: a borderline block may come out otherwise than on the host. */
#include "cuda_launch.cuh"

QA_NAMESPACE_BEGIN

struct PredictParams {
    const uint8_t *q, *k; /* the run's inputs (first elements) */
    int64_t q_stride[3], k_stride[3];
    int dtype, head_dim, heads_q, heads_kv, group, seq_q, seq_k, causal;
    float sm_scale;
    SparseParams sp; /* window and sinks */
    int q_block, k_block, q_blocks, k_blocks, q_items, batch;
    float sim_threshold, cdf_threshold, topk;
    int sink_blocks, recent_blocks, last_q_blocks;
    float *q_pool, *k_pool, *q_sim, *k_sim, *density;
    int32_t *counts, *indices;
};

constexpr int kPredictThreads = 128;

QA_DEV float load_in(const uint8_t *base, int dtype, int64_t i)
{
    if (dtype == kF32)
        return ((const float *)base)[i];
    return dtype == kF16 ? f16_to_f32(((const uint16_t *)base)[i]) : bf16_to_f32(((const uint16_t *)base)[i]);
}

/* Sum over the CTA of v (every thread calls it); red: kPredictThreads floats. */
QA_DEV float block_sum(float v, float *red)
{
    red[tid()] = v;
    sync_block();
    for (int s = kPredictThreads / 2; s > 0; s >>= 1) {
        if (tid() < s)
            red[tid()] += red[tid() + s];
        sync_block();
    }
    const float r = red[0];
    sync_block();
    return r;
}
QA_DEV float block_max(float v, float *red)
{
    red[tid()] = v;
    sync_block();
    for (int s = kPredictThreads / 2; s > 0; s >>= 1) {
        if (tid() < s)
            red[tid()] = fmaxf(red[tid()], red[tid() + s]);
        sync_block();
    }
    const float r = red[0];
    sync_block();
    return r;
}

/* One CTA per Q block (items [0, q_items)) or K block: mean and the smallest cosine to it. */
QA_KERNEL(kPredictThreads) sparse_pool_kernel(const PredictParams p)
{
    float *mean = (float *)dynamic_smem(), *red = mean + p.head_dim;
    const int item = block_x();
    const bool is_q = item < p.q_items;
    const int idx = is_q ? item : item - p.q_items;
    const int nb = is_q ? p.q_blocks : p.k_blocks, heads = is_q ? p.heads_q : p.heads_kv;
    const int blk = idx % nb, h = idx / nb % heads, b = idx / nb / heads;
    const int size = is_q ? p.q_block : p.k_block, n = is_q ? p.seq_q : p.seq_k;
    const int t0 = blk * size, t1 = min(n, t0 + size);
    const int64_t *st = is_q ? p.q_stride : p.k_stride;
    const uint8_t *base = is_q ? p.q : p.k;
    const int64_t head_off = b * st[0] + h * st[1];
    const int D = p.head_dim;
    for (int d = tid(); d < D; d += kPredictThreads) {
        float acc = 0.f;
        for (int t = t0; t < t1; t++)
            acc += load_in(base, p.dtype, head_off + t * st[2] + d);
        mean[d] = acc / (float)(t1 - t0);
    }
    sync_block();
    float part = 0.f;
    for (int d = tid(); d < D; d += kPredictThreads)
        part += mean[d] * mean[d];
    const float mm = block_sum(part, red);
    float least = 1.f;
    for (int t = t0 + tid(); t < t1 && mm > 0.f; t += kPredictThreads) {
        float dot = 0.f, xx = 0.f;
        for (int d = 0; d < D; d++) {
            const float x = load_in(base, p.dtype, head_off + t * st[2] + d);
            dot += x * mean[d];
            xx += x * x;
        }
        if (xx > 0.f) {
            const float c = dot / sqrtf(xx * mm);
            least = c < least ? c : least;
        }
    }
    least = -block_max(-least, red);
    float *pool = (is_q ? p.q_pool : p.k_pool) + (int64_t)idx * D;
    for (int d = tid(); d < D; d += kPredictThreads)
        pool[d] = mean[d];
    if (tid() == 0)
        (is_q ? p.q_sim : p.k_sim)[idx] = least;
}

/* src/sparse.c's block_keys: the keys query block qb sees, [lo, hi) and [0, sinks). */
QA_DEV void predict_block_keys(const PredictParams &p, int qb, int64_t &lo, int64_t &hi, int64_t &sinks)
{
    const int64_t i0 = (int64_t)qb * p.q_block, i1 = min((int64_t)p.seq_q, i0 + p.q_block) - 1;
    const int64_t place0 = i0 + p.seq_k - p.seq_q, place1 = i1 + p.seq_k - p.seq_q;
    const int64_t cend = p.causal ? min(max(place1 + 1, (int64_t)0), (int64_t)p.seq_k) : (int64_t)p.seq_k;
    lo = 0;
    hi = cend;
    sinks = 0;
    if (p.sp.window) {
        if (p.sp.wl >= 0)
            lo = min(max(place0 - p.sp.wl, (int64_t)0), (int64_t)p.seq_k);
        if (p.sp.wr >= 0)
            hi = min(max(place1 + p.sp.wr + 1, (int64_t)0), cend);
        sinks = min((int64_t)p.sp.sinks, cend);
    }
}

QA_DEV bool predict_visible(const PredictParams &p, int64_t lo, int64_t hi, int64_t sinks, int kb)
{
    const int64_t k0 = (int64_t)kb * p.k_block, k1 = min((int64_t)p.seq_k, k0 + p.k_block);
    return k0 < sinks || (k0 < hi && k1 > lo);
}

/* One CTA per layout row (b, hkv, qb). Shared: keep[k_blocks] ints, w[k_blocks] floats, red. */
QA_KERNEL(kPredictThreads) sparse_select_kernel(const PredictParams p)
{
    const int KB = p.k_blocks, D = p.head_dim;
    int *keep = (int *)dynamic_smem();
    float *w = (float *)(keep + KB), *red = w + KB;
    const int row = block_x();
    const int qb = row % p.q_blocks, bhk = row / p.q_blocks;
    const int b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
    int64_t lo, hi, sinks;
    predict_block_keys(p, qb, lo, hi, sinks);
    const bool whole = qb >= p.q_blocks - p.last_q_blocks;
    for (int kb = tid(); kb < KB; kb += kPredictThreads)
        keep[kb] = whole && predict_visible(p, lo, hi, sinks, kb);
    sync_block();
    for (int g = 0; g < p.group && !whole; g++) {
        const int bhq = b * p.heads_q + hk * p.group + g;
        const float *qp = p.q_pool + ((int64_t)bhq * p.q_blocks + qb) * D;
        const bool q_unlike = p.q_sim[(int64_t)bhq * p.q_blocks + qb] < p.sim_threshold;
        float mx = -INFINITY;
        for (int kb = tid(); kb < KB; kb += kPredictThreads) {
            float v = -INFINITY;
            if (predict_visible(p, lo, hi, sinks, kb)) {
                const int64_t bk = (int64_t)bhk * KB + kb;
                if (q_unlike || p.k_sim[bk] < p.sim_threshold)
                    keep[kb] = 1; /* the pooled token does not represent the block */
                const float *kp = p.k_pool + bk * D;
                float dot = 0.f;
                for (int d = 0; d < D; d++)
                    dot += qp[d] * kp[d];
                v = dot * p.sm_scale;
                mx = fmaxf(mx, v);
            }
            w[kb] = v;
        }
        mx = block_max(mx, red); /* also orders the writes of w before the reads below */
        if (mx == -INFINITY)
            continue; /* no visible block (uniform: every thread sees the same mx) */
        float part = 0.f;
        for (int kb = tid(); kb < KB; kb += kPredictThreads) {
            const float e = w[kb] == -INFINITY ? 0.f : expf(w[kb] - mx);
            w[kb] = e;
            part += e;
        }
        const float sum = block_sum(part, red);
        int n = 0; /* visible blocks */
        for (int kb = 0; kb < KB; kb++)
            n += predict_visible(p, lo, hi, sinks, kb);
        const int want = p.topk > 0.f ? (int)ceilf(p.topk * (float)n) : 0;
        /* Block e's rank in descending weight (ties: lower index first) and the mass before it. */
        for (int e = tid(); e < KB; e += kPredictThreads) {
            if (!predict_visible(p, lo, hi, sinks, e))
                continue;
            const float we = w[e];
            int rank = 0;
            float before = 0.f;
            for (int f = 0; f < KB; f++) {
                if (f == e || !predict_visible(p, lo, hi, sinks, f))
                    continue;
                if (w[f] > we || (w[f] == we && f < e)) {
                    rank++;
                    before += w[f];
                }
            }
            if (p.topk > 0.f ? rank < want : before < p.cdf_threshold * sum)
                keep[e] = 1;
        }
        sync_block(); /* w is rewritten for the next head */
    }
    sync_block();
    if (tid() == 0) {
        /* Forced blocks: the first sink_blocks key blocks, the last recent_blocks visible ones. */
        for (int kb = 0; kb < p.sink_blocks && kb < KB; kb++)
            if (predict_visible(p, lo, hi, sinks, kb))
                keep[kb] = 1;
        for (int kb = KB - 1, c = 0; kb >= 0 && c < p.recent_blocks; kb--)
            if (predict_visible(p, lo, hi, sinks, kb)) {
                keep[kb] = 1;
                c++;
            }
        int c = 0;
        int32_t *dst = p.indices + (int64_t)row * KB;
        for (int kb = 0; kb < KB; kb++)
            if (keep[kb])
                dst[c++] = kb;
        p.counts[row] = c;
    }
}

/* One CTA per (b, hkv): kept / visible blocks over its layout rows. */
QA_KERNEL(kPredictThreads) sparse_density_kernel(const PredictParams p)
{
    float *red = (float *)dynamic_smem();
    const int bhk = block_x();
    float kept = 0.f, visible = 0.f;
    for (int qb = tid(); qb < p.q_blocks; qb += kPredictThreads) {
        int64_t lo, hi, sinks;
        predict_block_keys(p, qb, lo, hi, sinks);
        for (int kb = 0; kb < p.k_blocks; kb++)
            visible += predict_visible(p, lo, hi, sinks, kb) ? 1.f : 0.f;
        kept += (float)p.counts[(int64_t)bhk * p.q_blocks + qb];
    }
    kept = block_sum(kept, red);
    visible = block_sum(visible, red);
    if (tid() == 0)
        p.density[bhk] = visible > 0.f ? kept / visible : 0.f;
}

bool sparse_layout(const LayoutParams &lp, long long tiles, void *stream)
{
    if (tiles <= 0)
        return true;
    const int smem = (3 * 8 + kLayoutThreads + 1) * 4;
    QA_LAUNCH(sparse_layout_kernel<128>, (int)tiles, kLayoutThreads, smem, stream, lp);
    return true;
}

/* Shared memory of the select kernel for k_blocks key blocks (the planner bounds it). */
int sparse_select_smem(int k_blocks) { return k_blocks * 8 + kPredictThreads * 4; }

const char *predict_layout(const qattn_plan *plan, const RunArgs &a)
{
    const qattn_problem &pb = plan->problem;
    const qattn_sparse_problem &s = plan->sparse;
    const qattn_workspace_layout &L = plan->ws;
    PredictParams pp;
    memset(&pp, 0, sizeof(pp));
    pp.q = a.q;
    pp.k = a.k;
    copy_strides(pp.q_stride, pb.q_stride);
    copy_strides(pp.k_stride, pb.k_stride);
    pp.dtype = (int)pb.in_dtype;
    pp.head_dim = (int)pb.head_dim;
    pp.heads_q = (int)pb.heads_q;
    pp.heads_kv = (int)pb.heads_kv;
    pp.group = (int)pb.group;
    pp.seq_q = (int)pb.seq_q;
    pp.seq_k = (int)pb.seq_k;
    pp.causal = pb.causal;
    pp.sm_scale = pb.sm_scale;
    pp.sp.window = s.window;
    pp.sp.wl = s.window_left < 0 ? -1 : (int)min(s.window_left, (int64_t)INT32_MAX);
    pp.sp.wr = s.window_right < 0 ? -1 : (int)min(s.window_right, (int64_t)INT32_MAX);
    pp.sp.sinks = (int)min(s.sink_tokens, pb.seq_k);
    pp.q_block = (int)s.q_block;
    pp.k_block = (int)s.k_block;
    pp.q_blocks = (int)s.q_blocks;
    pp.k_blocks = (int)s.k_blocks;
    pp.batch = (int)pb.batch;
    pp.q_items = (int)(pb.batch * pb.heads_q * s.q_blocks);
    pp.sim_threshold = s.sim_threshold;
    pp.cdf_threshold = s.cdf_threshold;
    pp.topk = s.topk;
    pp.sink_blocks = (int)min(s.sink_blocks, (int64_t)INT32_MAX);
    pp.recent_blocks = (int)min(s.recent_blocks, (int64_t)INT32_MAX);
    pp.last_q_blocks = (int)min(s.last_q_blocks, (int64_t)INT32_MAX);
    pp.q_pool = (float *)(a.ws + L.sparse_q_pool);
    pp.k_pool = (float *)(a.ws + L.sparse_k_pool);
    pp.q_sim = (float *)(a.ws + L.sparse_q_sim);
    pp.k_sim = (float *)(a.ws + L.sparse_k_sim);
    pp.density = (float *)(a.ws + L.sparse_density);
    pp.counts = (int32_t *)(a.ws + L.sparse_counts);
    pp.indices = (int32_t *)(a.ws + L.sparse_indices);
    const long long items = (long long)pp.q_items + pb.batch * pb.heads_kv * s.k_blocks;
    const char *err;
    QA_LAUNCH(sparse_pool_kernel, (int)items, kPredictThreads, (pp.head_dim + kPredictThreads) * 4, a.stream, pp);
    if ((err = launch_error()))
        return err;
    QA_LAUNCH(sparse_select_kernel, (int)s.rows, kPredictThreads, sparse_select_smem(pp.k_blocks), a.stream, pp);
    if ((err = launch_error()))
        return err;
    QA_LAUNCH(sparse_density_kernel, (int)(pb.batch * pb.heads_kv), kPredictThreads, kPredictThreads * 4, a.stream,
              pp);
    return launch_error();
}
QA_NAMESPACE_END
