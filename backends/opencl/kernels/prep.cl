/*
 * Passes before attention: the NaN/Inf scan and the reference quantization
 * (src/quant.c) reproduced bit for bit.
 *
 * Tensors arrive as (base, element offset, strides b/h/n); the head dim is
 * contiguous. The workspace is one byte buffer and its regions are byte
 * offsets. The status word sits at byte status_at of the workspace: a
 * non-zero word means the scan found NaN/Inf, and every later pass returns
 * without writing anything. status_at < 0: no finite check.
 *
 * Exactness: fp32 divisions are common.cl's div_rn (correctly rounded in
 * integer arithmetic: OpenCL's `/` is not, and a division in double is
 * narrowed back to it by the compiler), the K mean is a double sum in the
 * reference order, and contraction into FMA is off in this file.
 */
#pragma OPENCL FP_CONTRACT OFF

#define QUANT_WG 128 /* work-items of the quantization work-groups */

static inline long row_base(long off, long sb, long sh, long sn, long b, long h, long t)
{
    return off + b * sb + h * sh + t * sn;
}


/* One work-item per row of HEAD_DIM elements: sets `flag` (NONFINITE_Q, _K or
 * _V) in the status words when any element is NaN or Inf (an all-ones exponent). */
kernel void finite_scan(global const in_bits *x, long off, long sb, long sh, long sn, int heads, int n, long rows,
                        global uchar *ws, long status_at, uint flag)
{
    long row = get_global_id(0);
    if (row >= rows)
        return;
    long t = row % n, bh = row / n;
    global const in_bits *p = x + row_base(off, sb, sh, sn, bh / heads, bh % heads, t);
#if IN_DTYPE == DT_F32
    const uint mask = 0x7f800000u;
#elif IN_DTYPE == DT_F16
    const uint mask = 0x7c00u;
#else
    const uint mask = 0x7f80u;
#endif
    bool bad = false;
    for (int d = 0; d < HEAD_DIM; d++)
        bad |= ((uint)p[d] & mask) == mask;
    if (bad)
        atomic_or((global uint *)(ws + status_at) + STATUS_NONFINITE, flag);
}

#if HAS_FP64
/* Smooth-K mean: mean[c] = (sum_t k[t][c]) / Nk, summed in double in token
 * order. One work-item per (b, h, c), dimension 0 = c + D * bh. */
kernel void k_mean(global const in_bits *k, long off, long sb, long sh, long sn, int heads, int nk, int bh_count,
                   global uchar *ws, long mean_at, long status_at)
{
    long e = get_global_id(0);
    if (e >= (long)bh_count * HEAD_DIM || stopped(ws, status_at))
        return;
    int c = e % HEAD_DIM, bh = e / HEAD_DIM;
    global const in_bits *p = k + row_base(off, sb, sh, 0, bh / heads, bh % heads, 0) + c;
    double s = 0.0;
    for (int t = 0; t < nk; t++)
        s += (double)load_in(p, (long)t * sn);
    ((global float *)(ws + mean_at))[(long)bh * HEAD_DIM + c] = (float)(s / (double)nk);
}

/*
 * INT8 per scale group: amax = max |x - mean|, scale = amax / 127,
 * x8 = rint(x * (127 / amax)) clamped to [-127, 127]. One work-group per
 * (group, b, h), flattened into dimension 0 as group-major.
 */
kernel __attribute__((reqd_work_group_size(QUANT_WG, 1, 1))) void quant_rows(
    global const in_bits *x, long off, long sb, long sh, long sn, int heads, int n, int block, int interleave,
    int groups, global uchar *ws, long i8_at, long scale_at, long mean_at, int use_mean, long status_at)
{
    local float partial[QUANT_WG];
    int lid = get_local_id(0);
    int g = get_group_id(0) % groups;
    int bh = get_group_id(0) / groups;
    if (stopped(ws, status_at))
        return;
    int blk = g / interleave, lane = g % interleave;
    int t0 = blk * block + lane;
    int t1 = min((blk + 1) * block, n);
    int count = t1 > t0 ? (t1 - t0 + interleave - 1) / interleave : 0; /* tokens in the group */
    global const in_bits *src = x + row_base(off, sb, sh, 0, bh / heads, bh % heads, 0);
    global const float *sub = (global const float *)(ws + mean_at) + (long)bh * HEAD_DIM; /* read iff use_mean */

    float amax = 0.0f;
    for (int e = lid; e < count * HEAD_DIM; e += QUANT_WG) {
        int t = t0 + (e / HEAD_DIM) * interleave, c = e % HEAD_DIM;
        float v = load_in(src, (long)t * sn + c) - (use_mean ? sub[c] : 0.0f);
        amax = fmax(amax, fabs(v));
    }
    partial[lid] = amax;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = QUANT_WG / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            partial[lid] = fmax(partial[lid], partial[lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    amax = partial[0];
    amax = amax < QUANT_MIN_AMAX ? 0.0f : amax;
    float inv = amax > 0.0f ? div_rn(127.0f, amax) : 0.0f;
    if (lid == 0)
        ((global float *)(ws + scale_at))[(long)bh * groups + g] = div_rn(amax, 127.0f);
    global char *dst = (global char *)(ws + i8_at) + (long)bh * n * HEAD_DIM;
    for (int e = lid; e < count * HEAD_DIM; e += QUANT_WG) {
        int t = t0 + (e / HEAD_DIM) * interleave, c = e % HEAD_DIM;
        float v = load_in(src, (long)t * sn + c) - (use_mean ? sub[c] : 0.0f);
        float r = fmin(fmax(rint(v * inv), -127.0f), 127.0f); /* fmax takes the number over a NaN: -127 */
        dst[(long)t * HEAD_DIM + c] = (char)(int)r;
    }
}

/* LSE correction of smooth K: q_kmean[i] = sm_scale * sum_c q[i][c] * mean[c]
 * in channel order. One work-item per (row, b*h), dimension 0 rows. */
kernel void q_kmean(global const in_bits *q, long off, long sb, long sh, long sn, int heads_q, int group, int heads_kv,
                    int nq, long rows, float sm_scale, global uchar *ws, long mean_at, long corr_at, long status_at)
{
    long row = get_global_id(0);
    if (row >= rows || stopped(ws, status_at))
        return;
    long t = row % nq, bh = row / nq;
    long b = bh / heads_q, h = bh % heads_q;
    global const in_bits *p = q + row_base(off, sb, sh, sn, b, h, t);
    global const float *mean = (global const float *)(ws + mean_at) + (b * heads_kv + h / group) * HEAD_DIM;
    float s = 0.0f;
    for (int c = 0; c < HEAD_DIM; c++) {
        float prod = load_in(p, c) * mean[c];
        s += prod;
    }
    ((global float *)(ws + corr_at))[row] = sm_scale * s;
}

/* INT8_FP16: V to fp16 (round to nearest even), dense [B, Hkv, Nk, D].
 * One work-item per element, dimension 0 = c + D * (t + Nk * bh). */
kernel void quant_v_f16(global const in_bits *v, long off, long sb, long sh, long sn, int heads, int nk, long total,
                        global uchar *ws, long vq_at, long status_at)
{
    long e = get_global_id(0);
    if (e >= total || stopped(ws, status_at))
        return;
    long c = e % HEAD_DIM, row = e / HEAD_DIM;
    long t = row % nk, bh = row / nk;
    float x = load_in(v, row_base(off, sb, sh, sn, bh / heads, bh % heads, t) + c);
    vstore_half_rte(x, e, (global half *)(ws + vq_at));
}

/*
 * FP8 V, per channel c: amax over all keys, scale = amax / vmax,
 * v8 = e4m3(v * (vmax / amax)), stored transposed [B, Hkv, D, Nk_pad] with
 * zero padding. A work-group (32 channels x 8 token lanes) per (channel block,
 * b*h), flattened channel-block-major in dimension 0.
 */
#define VT 32 /* channels per work-group and tokens per transposed tile */
kernel __attribute__((reqd_work_group_size(256, 1, 1))) void quant_v_fp8(
    global const in_bits *v, long off, long sb, long sh, long sn, int heads, int nk, int nk_pad, float vmax,
    global uchar *ws, long vq_at, long scale_at, long status_at)
{
    local float partial[8][VT];
    local uchar tile[VT][VT + 1];
    const int cblocks = (HEAD_DIM + VT - 1) / VT;
    int tx = get_local_id(0) % VT, ty = get_local_id(0) / VT;
    int c0 = (get_group_id(0) % cblocks) * VT;
    int bh = get_group_id(0) / cblocks;
    if (stopped(ws, status_at))
        return;
    global const in_bits *src = v + row_base(off, sb, sh, 0, bh / heads, bh % heads, 0);
    int c = c0 + tx;

    float amax = 0.0f;
    if (c < HEAD_DIM)
        for (int t = ty; t < nk; t += 8)
            amax = fmax(amax, fabs(load_in(src, (long)t * sn + c)));
    partial[ty][tx] = amax;
    barrier(CLK_LOCAL_MEM_FENCE);
    amax = partial[0][tx];
    for (int i = 1; i < 8; i++)
        amax = fmax(amax, partial[i][tx]);
    amax = amax < QUANT_MIN_AMAX ? 0.0f : amax;
    float inv = amax > 0.0f ? div_rn(vmax, amax) : 0.0f;
    if (ty == 0 && c < HEAD_DIM)
        ((global float *)(ws + scale_at))[(long)bh * HEAD_DIM + c] = div_rn(amax, vmax);

    /* Transpose through local memory so both the reads (along channels) and
     * the writes (along tokens) are contiguous. Each lane quantizes its own
     * channel tx with its own inv. */
    global uchar *dst = ws + vq_at + (long)bh * HEAD_DIM * nk_pad;
    for (int t0 = 0; t0 < nk_pad; t0 += VT) {
        for (int i = ty; i < VT; i += 8) {
            int t = t0 + i;
            uchar code = 0;
            if (c < HEAD_DIM && t < nk)
                code = float_to_e4m3(load_in(src, (long)t * sn + c) * inv);
            tile[i][tx] = code;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = ty; i < VT; i += 8)
            if (c0 + i < HEAD_DIM)
                dst[(long)(c0 + i) * nk_pad + t0 + tx] = tile[tx][i];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}
#endif /* HAS_FP64 */
