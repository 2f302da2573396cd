/*
 * Shared by the paged-attention shaders (paged_check, paged_attn): the
 * bindings of the paged descriptor layout as a run binds them, the run's
 * arguments (push constants, mirrored by vk_paged_args in
 * backends/vulkan/vulkan_paged.c) and the page-table view of one sequence.
 *
 * Bindings (whole buffers, offset 0; element offsets arrive as arguments):
 *   0 q   1 k cache   2 v cache   3 k scales   4 v scales   5 o   6 lse
 *   7 workspace (status words, split partials)   8 qo_indptr
 *   9..11 the page table: DENSE block_table, seq_lens; CSR indptr, indices, last_page_len
 *   12 the workspace again (the merge's view of the partials)
 * (paged_prune.comp's kernels bind the page metadata in place of 2 or 5, see there.)
 */
#extension GL_EXT_shader_16bit_storage : require

#include "numeric.glsl"
#include "status.glsl"

#define DT_F32 0u
#define DT_F16 1u
#define DT_BF16 2u

/* Page formats (spec constant FMT). */
#define FMT_F16 0u
#define FMT_BF16 1u
#define FMT_FP8 2u    /* E4M3 codes, a scale per KV head */
#define FMT_I8 3u     /* INT8 codes, a scale per KV head */
#define FMT_I8_ROW 4u /* INT8 codes, a scale per (token, head) */

/* Argument flags. */
#define ARG_CHECK 1u      /* the table check ran: skip everything when it found a problem */
#define ARG_LSE 2u        /* write the LSE */
#define ARG_CAUSAL 4u
#define ARG_DENSE 8u      /* DENSE tables (else CSR) */
#define ARG_HND 16u       /* HND pages (else NHD) */
#define ARG_SELECT 32u    /* paged_attn: read each (sequence, KV head)'s selected pages (ws_sel_*) */
#define ARG_ADAPTIVE 64u  /* paged_prune TOPK: the adaptive budget */

layout(std430, set = 0, binding = 0) readonly buffer QF32 { float q_f32[]; };
layout(std430, set = 0, binding = 0) readonly buffer QU16 { uint16_t q_u16[]; };
layout(std430, set = 0, binding = 7) buffer WSU { uint ws_u32[]; };
layout(std430, set = 0, binding = 7) buffer WSF { float ws_f32[]; };
layout(std430, set = 0, binding = 8) readonly buffer QO { int qo_indptr[]; };
layout(std430, set = 0, binding = 9) readonly buffer T0 { int table0[]; };  /* block_table | indptr */
layout(std430, set = 0, binding = 10) readonly buffer T1 { int table1[]; }; /* seq_lens | indices */
layout(std430, set = 0, binding = 11) readonly buffer T2 { int table2[]; }; /* last_page_len */

/* paged_prune.comp defines its own push constants (PAGED_CUSTOM_ARGS) with
 * the members these helpers read: total_q, max_q_len, page_size, flags,
 * max_pages, indices_count, num_pages, ws_off, ws_status. */
#ifndef PAGED_CUSTOM_ARGS
layout(push_constant) uniform Args {
    uint q_off, o_off, lse_off, ws_off; /* elements of q / o / lse; words of the workspace */
    uint q_s0, q_s1, o_s0, o_s1;        /* element strides: between tokens, between heads */
    uint batch, heads_kv, group, page_size;
    uint num_pages, max_pages, total_q, max_q_len;
    uint splits, pages_per_split, q_tiles, indices_count;
    float qk_scale_log2;
    uint flags;
    uint ws_status, ws_part_o;          /* words from ws_off */
    uint ws_part_lse, items;            /* items: work items (paged_attn), table-check groups (paged_check) */
    uint ws_sel_counts, ws_sel_pages;   /* ARG_SELECT: the selection's counts and page lists, words from ws_off */
} A;
#endif

layout(constant_id = 1) const uint Q_DTYPE = DT_F16;

float load_q(uint i)
{
    if (Q_DTYPE == DT_F32) return q_f32[i];
    if (Q_DTYPE == DT_F16) return unpackHalf2x16(uint(q_u16[i])).x;
    return bf16_bits_to_f32(uint(q_u16[i]));
}

bool status_set()
{
    return (A.flags & ARG_CHECK) != 0u &&
           (ws_u32[A.ws_off + A.ws_status + STATUS_NONFINITE] | ws_u32[A.ws_off + A.ws_status + STATUS_BOUNDS]) != 0u;
}

/* One sequence as the kernels see it, clamped so that unchecked bad tables
 * never reach outside any buffer. */
struct Seq {
    int q0, q_len, kv_len;
    uint list; /* index of the sequence's first page entry in table0 (DENSE) or table1 (CSR) */
};

Seq sequence(uint b)
{
    Seq s;
    int total_q = int(A.total_q);
    s.q0 = clamp(qo_indptr[b], 0, total_q);
    int q1 = clamp(qo_indptr[b + 1u], s.q0, total_q);
    s.q_len = min(q1 - s.q0, int(A.max_q_len));
    int P = int(A.page_size);
    if ((A.flags & ARG_DENSE) != 0u) {
        s.kv_len = clamp(table1[b], 0, int(A.max_pages) * P);
        s.list = b * A.max_pages;
    } else {
        int count = int(min(A.indices_count, 0x7fffffffu));
        int p0 = clamp(table0[b], 0, count);
        int p1 = clamp(table0[b + 1u], p0, count);
        int pages = min(p1 - p0, int(A.max_pages));
        s.kv_len = pages > 0 ? (pages - 1) * P + clamp(table2[b], 1, P) : 0;
        s.list = uint(p0);
    }
    return s;
}

/* The cache page holding entry `index` of the sequence's page list, clamped into the cache. */
uint page_at(Seq s, uint index)
{
    int page = (A.flags & ARG_DENSE) != 0u ? table0[s.list + index] : table1[s.list + index];
    return uint(clamp(page, 0, int(A.num_pages) - 1));
}
