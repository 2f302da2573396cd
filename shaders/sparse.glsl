/*
 * Sparse attention (sequence pruning) for the Vulkan kernels: the structured
 * masks of qattn_sparse_row_keys (src/internal.h) and the block-visibility of
 * src/sparse.c, in 32-bit integers. Positions are below seq_k < 2^31; window
 * bounds arrive as uints (SP_UNBOUNDED: none) and every intermediate that could
 * leave int range is compared in uint first (wrapping int arithmetic gives the
 * true value whenever that value is in range).
 *
 * Layouts (read alike, see qattn_sparse_layout_row): sp_stride 0: a user's
 * block CSR at bindings 7 (indptr) and 8 (R.arg1 entries of indices);
 * sp_stride = k_blocks: a predicted layout in the workspace (counts at byte
 * sp_ptr, row r at sp_idx + 4 r stride).
 */
const uint SP_UNBOUNDED = 0xffffffffu;

layout(std430, set = 0, binding = 7) readonly buffer SpIndptr { int sp_indptr[]; };
layout(std430, set = 0, binding = 8) readonly buffer SpIndices { int sp_indices[]; };

/* Row i's keys under causal + window + sinks: [lo, hi) and sinks [0, se) (se <= lo, 0 when merged). */
void sp_row_keys(int i, bool causal, out uint lo, out uint hi, out uint se)
{
    const int nk = int(P.seq_k);
    const int place = i + P.causal_shift;
    int end = nk, begin = 0, sinks = 0;
    if (causal && place + 1 < end)
        end = place + 1;
    if (P.sp_window != 0u) {
        /* end - 1 - place >= 0 here (end <= place + 1 or end = nk > place). */
        if (P.sp_right != SP_UNBOUNDED && P.sp_right < uint(end - 1 - place))
            end = place + int(P.sp_right) + 1;
        if (P.sp_left != SP_UNBOUNDED && place > 0 && uint(place) > P.sp_left)
            begin = place - int(P.sp_left);
        sinks = int(P.sp_sinks);
        const int causal_end = causal && place + 1 < nk ? place + 1 : nk;
        if (sinks > causal_end)
            sinks = causal_end;
    }
    if (end < begin)
        end = begin;
    if (sinks >= begin) { /* the sinks reach the window: one interval */
        begin = 0;
        end = max(sinks, end);
        sinks = 0;
    }
    lo = uint(begin);
    hi = uint(max(end, 0));
    se = uint(max(sinks, 0));
}

/* The first key of [a, b) in [0, s) u [l, h); b when none. */
uint sp_first_visible(uint a, uint b, uint s, uint l, uint h)
{
    if (a < s)
        return a < b ? a : b;
    uint f = max(a, l);
    return f < h && f < b ? f : b;
}

/* Entries [begin, end) of layout row r (clamped, so an unchecked layout stays in bounds). */
void sp_layout_row(uint r, out uint begin, out uint end)
{
    if (P.sp_stride != 0u) {
        begin = r * P.sp_stride;
        end = begin + uint(clamp(int(ws_u32[((R.ws_off + P.sp_ptr) >> 2) + r]), 0, int(P.sp_stride)));
    } else {
        const int count = int(R.arg1);
        begin = uint(clamp(sp_indptr[r], 0, count));
        end = uint(clamp(sp_indptr[r + 1u], int(begin), count));
    }
}

/* Key block of layout entry e, clamped to [0, k_blocks). */
uint sp_entry(uint e)
{
    const int kb = P.sp_stride != 0u ? int(ws_u32[((R.ws_off + P.sp_idx) >> 2) + e]) : sp_indices[e];
    return uint(clamp(kb, 0, int(P.sp_k_blocks) - 1));
}

/* Query block qb's keys under the structured masks (src/sparse.c block_keys). */
void sp_block_keys(uint qb, bool causal, out uint lo, out uint hi, out uint sinks)
{
    const int nk = int(P.seq_k);
    const int i0 = int(qb * P.sp_q_block), i1 = int(min(P.seq_q, qb * P.sp_q_block + P.sp_q_block)) - 1;
    const int place0 = i0 + P.causal_shift, place1 = i1 + P.causal_shift;
    const int cend = causal ? clamp(place1 + 1, 0, nk) : nk;
    lo = 0u;
    hi = uint(cend);
    sinks = 0u;
    if (P.sp_window != 0u) {
        if (P.sp_left != SP_UNBOUNDED && place0 > 0 && uint(place0) > P.sp_left)
            lo = uint(min(place0 - int(P.sp_left), nk));
        /* cend - place1 - 1 >= 0 (place1 < nk; causal: cend >= place1 + 1 or cend = 0 > place1). */
        if (P.sp_right != SP_UNBOUNDED && P.sp_right < uint(cend - place1 - 1))
            hi = uint(max(place1 + int(P.sp_right) + 1, 0));
        sinks = min(P.sp_sinks, uint(cend));
    }
}

bool sp_block_visible(uint lo, uint hi, uint sinks, uint kb)
{
    const uint k0 = kb * P.sp_k_block, k1 = min(P.seq_k, k0 + P.sp_k_block);
    return k0 < sinks || (k0 < hi && k1 > lo);
}
