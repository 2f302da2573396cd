#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * Predicted layouts (QATTN_SPARSE_PREDICT) on the device, equal in meaning to
 * src/sparse.c (qattn_sparse_predict_host); R.arg0 picks the pass:
 *   0, 1  pool: per Q (0) or K (1) block, the mean of its tokens and the
 *         smallest cosine of a token to the mean (1 when the mean or every
 *         token is zero); one work group per (b, h, block)
 *   2     select: one work group per layout row (b, hkv, q block): for each
 *         query head of the group, softmax(sm_scale * pooled q . pooled k)
 *         over the visible key blocks, kept by cumulative mass (cdf_threshold)
 *         or count (topk) through a bisection on the weights' float bits (ties
 *         at the threshold are all kept), plus the blocks whose pooled token
 *         does not represent them, the forced sink/recent blocks, and whole
 *         rows for the last query blocks; writes the row (fixed stride
 *         k_blocks) and its count, and the row's visible count to scratch
 *   3     density: per (b, hkv), kept / visible blocks
 * fp32 where the host uses fp64: a borderline block may flip (the attention
 * runs with the layout written here, which qattn_sparse_layout_read returns).
 */
#include "common.glsl"
#include "sparse.glsl"

layout(local_size_x = 64) in;

layout(constant_id = 0) const uint D = 128;
layout(constant_id = 6) const uint CAUSAL = 0;

const uint WG = 64;
const uint MAX_KB = 32768; /* key blocks a row may have (the plan refuses more) */

shared float vec_s[256];
shared float red_f[WG];
shared uint red_u[WG];
shared uint keep_s[MAX_KB / 32];

float sum_f(float x)
{
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    red_f[tid] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s)
            red_f[tid] += red_f[tid + s];
        barrier();
    }
    return red_f[0];
}

float min_f(float x)
{
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    red_f[tid] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s)
            red_f[tid] = min(red_f[tid], red_f[tid + s]);
        barrier();
    }
    return red_f[0];
}

float max_f(float x) { return -min_f(-x); }

uint sum_u(uint x)
{
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    red_u[tid] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s)
            red_u[tid] += red_u[tid + s];
        barrier();
    }
    return red_u[0];
}

uint min_u(uint x)
{
    const uint tid = gl_LocalInvocationID.x;
    barrier();
    red_u[tid] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (tid < s)
            red_u[tid] = min(red_u[tid], red_u[tid + s]);
        barrier();
    }
    return red_u[0];
}

float load_in(bool is_q, uint i) { return is_q ? load_q(i) : load_k(i); }

void pool(bool is_q, uint bh, uint blk)
{
    const uint tid = gl_LocalInvocationID.x;
    const uint heads = is_q ? P.heads_q : P.heads_kv, nb = is_q ? P.sp_q_blocks : P.sp_k_blocks;
    const uint size = is_q ? P.sp_q_block : P.sp_k_block, n = is_q ? P.seq_q : P.seq_k;
    const uint b = bh / heads, h = bh % heads;
    const uint base = is_q ? R.q_off + b * P.q_sb + h * P.q_sh : R.k_off + b * P.k_sb + h * P.k_sh;
    const uint sn = is_q ? P.q_sn : P.k_sn;
    const uint t0 = blk * size, t1 = min(n, t0 + size);
    const uint idx = bh * nb + blk;
    const uint pool_at = ((R.ws_off + (is_q ? P.sp_q_pool : P.sp_k_pool)) >> 2) + idx * D;
    barrier(); /* vec_s of the previous item is consumed */
    float mm = 0.0;
    for (uint d = tid; d < D; d += WG) {
        float acc = 0.0;
        for (uint t = t0; t < t1; t++)
            acc += load_in(is_q, base + t * sn + d);
        const float mean = acc / float(t1 - t0);
        vec_s[d] = mean;
        ws_f32[pool_at + d] = mean;
        mm += mean * mean;
    }
    mm = sum_f(mm); /* its barriers publish vec_s */
    float least = 1.0;
    for (uint t = t0 + tid; t < t1 && mm > 0.0; t += WG) {
        float dot = 0.0, xx = 0.0;
        for (uint d = 0u; d < D; d++) {
            const float x = load_in(is_q, base + t * sn + d);
            dot += x * vec_s[d];
            xx += x * x;
        }
        if (xx > 0.0)
            least = min(least, dot / sqrt(xx * mm));
    }
    least = min_f(least);
    if (tid == 0u)
        ws_f32[((R.ws_off + (is_q ? P.sp_q_sim : P.sp_k_sim)) >> 2) + idx] = least;
}

void keep_block(uint kb) { atomicOr(keep_s[kb >> 5], 1u << (kb & 31u)); }
bool kept(uint kb) { return (keep_s[kb >> 5] & (1u << (kb & 31u))) != 0u; }

void select_row(uint bhk, uint qb)
{
    const uint tid = gl_LocalInvocationID.x;
    const uint KB = P.sp_k_blocks, QB = P.sp_q_blocks;
    const uint b = bhk / P.heads_kv, hk = bhk % P.heads_kv;
    const uint row = bhk * QB + qb;
    const uint wbase = ((R.ws_off + P.sp_weights) >> 2) + row * KB;
    uint lo, hi, sinks;
    sp_block_keys(qb, CAUSAL != 0u, lo, hi, sinks);

    barrier(); /* keep_s of the previous row is consumed */
    for (uint w = tid; w < (KB + 31u) / 32u; w += WG)
        keep_s[w] = 0u;
    uint nvis = 0u, last = 0u;
    for (uint kb = tid; kb < KB; kb += WG)
        if (sp_block_visible(lo, hi, sinks, kb)) {
            nvis++;
            last = kb;
        }
    nvis = sum_u(nvis);
    const uint nvis_last = 0xffffffffu - min_u(0xffffffffu - last); /* max; 0 when none is visible */
    const bool whole = qb + P.sp_last_q_blocks >= QB;
    if (whole) {
        for (uint kb = tid; kb < KB; kb += WG)
            if (sp_block_visible(lo, hi, sinks, kb))
                keep_block(kb);
    }
    for (uint g = 0u; g < P.group && nvis > 0u && !whole; g++) {
        const uint bhq = b * P.heads_q + hk * P.group + g;
        const uint qpool = ((R.ws_off + P.sp_q_pool) >> 2) + (bhq * QB + qb) * D;
        barrier(); /* vec_s of the previous head is consumed */
        for (uint d = tid; d < D; d += WG)
            vec_s[d] = ws_f32[qpool + d];
        barrier();
        const bool q_unlike = ws_f32[((R.ws_off + P.sp_q_sim) >> 2) + bhq * QB + qb] < P.sp_sim_threshold;
        float mx = uintBitsToFloat(0xff800000u);
        for (uint kb = tid; kb < KB; kb += WG) {
            float w = uintBitsToFloat(0xff800000u);
            if (sp_block_visible(lo, hi, sinks, kb)) {
                const uint bk = bhk * KB + kb;
                if (q_unlike || ws_f32[((R.ws_off + P.sp_k_sim) >> 2) + bk] < P.sp_sim_threshold)
                    keep_block(kb); /* the pooled token does not represent the block */
                const uint kpool = ((R.ws_off + P.sp_k_pool) >> 2) + bk * D;
                float dot = 0.0;
                for (uint d = 0u; d < D; d++)
                    dot += vec_s[d] * ws_f32[kpool + d];
                w = dot * P.sm_scale;
                mx = max(mx, w);
            }
            ws_f32[wbase + kb] = w;
        }
        mx = max_f(mx);
        float sum = 0.0;
        for (uint kb = tid; kb < KB; kb += WG) {
            const float w = ws_f32[wbase + kb];
            const float e = w == uintBitsToFloat(0xff800000u) ? -1.0 : exp(w - mx); /* -1: not visible */
            ws_f32[wbase + kb] = e;
            sum += max(e, 0.0);
        }
        sum = sum_f(sum);
        /* The largest threshold t (bits in [0, 1.0]) whose kept set {w >= t} still holds the target. */
        const bool topk = P.sp_topk > 0.0;
        const float target = topk ? ceil(P.sp_topk * float(nvis)) : P.sp_cdf_threshold * sum;
        uint tlo = 0u, thi = 0x3f800001u;
        while (thi - tlo > 1u) {
            const uint mid = tlo + (thi - tlo) / 2u;
            const float t = uintBitsToFloat(mid);
            float got = 0.0;
            for (uint kb = tid; kb < KB; kb += WG) {
                const float e = ws_f32[wbase + kb];
                if (e >= t)
                    got += topk ? 1.0 : e;
            }
            got = sum_f(got);
            if (got >= target)
                tlo = mid;
            else
                thi = mid;
        }
        const float t = uintBitsToFloat(tlo);
        for (uint kb = tid; kb < KB; kb += WG)
            if (ws_f32[wbase + kb] >= t)
                keep_block(kb);
    }
    barrier();
    if (tid == 0u) {
        /* Forced blocks: the first sink_blocks key blocks and the last recent_blocks visible ones. */
        for (uint kb = 0u; kb < P.sp_sink_blocks && kb < KB; kb++)
            if (sp_block_visible(lo, hi, sinks, kb))
                keep_block(kb);
        uint c = 0u;
        for (int kb = int(nvis_last); nvis > 0u && kb >= 0 && c < P.sp_recent_blocks; kb--)
            if (sp_block_visible(lo, hi, sinks, uint(kb))) {
                keep_block(uint(kb));
                c++;
            }
    }
    barrier();
    /* The row, ascending: each invocation a contiguous chunk of blocks, at its prefix count. */
    const uint chunk = (KB + WG - 1u) / WG, c0 = min(KB, tid * chunk), c1 = min(KB, c0 + chunk);
    uint mine = 0u;
    for (uint kb = c0; kb < c1; kb++)
        mine += kept(kb) ? 1u : 0u;
    barrier();
    red_u[tid] = mine;
    barrier();
    uint at = 0u, total = 0u;
    for (uint u = 0u; u < WG; u++) {
        at += u < tid ? red_u[u] : 0u;
        total += red_u[u];
    }
    const uint dst = ((R.ws_off + P.sp_idx) >> 2) + row * KB;
    for (uint kb = c0; kb < c1; kb++)
        if (kept(kb))
            ws_u32[dst + at++] = kb;
    if (tid == 0u) {
        ws_u32[((R.ws_off + P.sp_counts) >> 2) + row] = total;
        ws_u32[((R.ws_off + P.sp_tally) >> 2) + row] = nvis;
    }
}

void density(uint bhk)
{
    const uint tid = gl_LocalInvocationID.x, QB = P.sp_q_blocks;
    uint kept_n = 0u, vis_n = 0u;
    for (uint qb = tid; qb < QB; qb += WG) {
        kept_n += ws_u32[((R.ws_off + P.sp_counts) >> 2) + bhk * QB + qb];
        vis_n += ws_u32[((R.ws_off + P.sp_tally) >> 2) + bhk * QB + qb];
    }
    kept_n = sum_u(kept_n);
    vis_n = sum_u(vis_n);
    if (tid == 0u)
        ws_f32[((R.ws_off + P.sp_density) >> 2) + bhk] = vis_n > 0u ? float(kept_n) / float(vis_n) : 0.0;
}

void main()
{
    const uint pass = R.arg0;
    if (pass <= 1u) {
        const bool is_q = pass == 0u;
        const uint items = P.batch * (is_q ? P.heads_q : P.heads_kv), nb = is_q ? P.sp_q_blocks : P.sp_k_blocks;
        for (uint bh = gl_WorkGroupID.y; bh < items; bh += gl_NumWorkGroups.y)
            for (uint blk = gl_WorkGroupID.x; blk < nb; blk += gl_NumWorkGroups.x)
                pool(is_q, bh, blk);
    } else if (pass == 2u) {
        for (uint bhk = gl_WorkGroupID.y; bhk < P.batch * P.heads_kv; bhk += gl_NumWorkGroups.y)
            for (uint qb = gl_WorkGroupID.x; qb < P.sp_q_blocks; qb += gl_NumWorkGroups.x)
                select_row(bhk, qb);
    } else {
        for (uint bhk = gl_WorkGroupID.x; bhk < P.batch * P.heads_kv; bhk += gl_NumWorkGroups.x)
            density(bhk);
    }
}
