#version 450
#extension GL_GOOGLE_include_directive : require
/*
 * The paged run's check, before anything is written: the page tables
 * (work groups [0, A.items): one sequence at a time) and the queries' NaN/Inf
 * scan (the other groups, striding over the rows qo_indptr[0] ..
 * qo_indptr[batch]). Findings are flags in the workspace status words
 * (status.glsl): a bad table entry in STATUS_BOUNDS, NaN or Inf in Q in
 * STATUS_NONFINITE. The attention and merge kernels write nothing when either
 * is set; the host then reads the tables back to name the first bad entry.
 */
#include "paged_common.glsl"

layout(local_size_x = 128) in;
layout(constant_id = 0) const uint D = 128;

const uint WG = 128u;

void flag(uint word, uint bits) { atomicOr(ws_u32[A.ws_off + A.ws_status + word], bits); }

/* Every violation the reference (backends/cpu) rejects, plus a CSR sequence
 * longer than max_pages_per_seq; a negative qo_indptr / indptr entry is
 * always a violation somewhere (the lists start >= 0 and never decrease). */
void check_sequence(uint b)
{
    const uint tid = gl_LocalInvocationID.x;
    const int P = int(A.page_size);
    int a0 = qo_indptr[b], a1 = qo_indptr[b + 1u];
    bool bad = a0 < 0 || a1 < a0 || a1 > int(A.total_q) || a1 - a0 > int(A.max_q_len);
    uint first = 0u, pages = 0u;
    if ((A.flags & ARG_DENSE) != 0u) {
        int len = table1[b];
        bad = bad || len < 0 || len > int(A.max_pages) * P;
        if (!bad) {
            pages = uint((len + P - 1) / P);
            first = b * A.max_pages;
        }
    } else {
        int p0 = table0[b], p1 = table0[b + 1u];
        bad = bad || p0 < 0 || p1 < p0 || uint(p1) > A.indices_count || p1 - p0 > int(A.max_pages);
        if (!bad && p1 > p0) {
            int last = table2[b];
            bad = last < 1 || last > P;
            pages = uint(p1 - p0);
            first = uint(p0);
        }
    }
    if (bad) {
        if (tid == 0u)
            flag(STATUS_BOUNDS, 1u);
        return;
    }
    bool page_bad = false;
    for (uint i = tid; i < pages; i += WG) {
        int page = (A.flags & ARG_DENSE) != 0u ? table0[first + i] : table1[first + i];
        page_bad = page_bad || page < 0 || page >= int(A.num_pages);
    }
    if (page_bad)
        flag(STATUS_BOUNDS, 1u);
}

bool q_nonfinite(uint i)
{
    if (Q_DTYPE == DT_F32)
        return (floatBitsToUint(q_f32[i]) & 0x7f800000u) == 0x7f800000u;
    uint mask = Q_DTYPE == DT_F16 ? 0x7c00u : 0x7f80u;
    return (uint(q_u16[i]) & mask) == mask;
}

void main()
{
    const uint tid = gl_LocalInvocationID.x;
    const uint group = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y;
    if (group < A.items) {
        for (uint b = group; b < A.batch; b += A.items)
            check_sequence(b);
        return;
    }
    int total_q = int(A.total_q);
    uint lo = uint(clamp(qo_indptr[0], 0, total_q));
    uint hi = uint(clamp(qo_indptr[A.batch], int(lo), total_q));
    uint heads_q = A.heads_kv * A.group;
    uint per_row = heads_q * D;
    uint n = (hi - lo) * per_row; /* < 2^32: Q's extent fits one buffer */
    bool bad = false;
    for (uint e = (group - A.items) * WG + tid; e < n; e += (groups - A.items) * WG) {
        uint row = lo + e / per_row, rest = e % per_row;
        bad = bad || q_nonfinite(A.q_off + row * A.q_s0 + (rest / D) * A.q_s1 + rest % D);
    }
    if (bad)
        flag(STATUS_NONFINITE, NONFINITE_Q);
}
