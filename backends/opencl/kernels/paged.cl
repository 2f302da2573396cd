/*
 * Paged KV-cache attention (decode and chunked prefill) and the page-table
 * check, OpenCL C 1.2, fp32 accumulation.
 *
 * paged_attention: a work-group of 128 work-items takes one (sequence, KV
 * head, query tile, key split). Its RT rows are the query heads of the GQA
 * group times the queries (row = query * group + member), so every K/V row
 * it reads serves the whole group. Keys stream in tiles of BK: each
 * work-item copies its 16-byte chunks of the next tile's K and V page rows
 * into registers (consecutive work-items take consecutive chunks of a row,
 * so the reads are coalesced; NCH chunks of each in flight per work-item)
 * while the current tile, staged raw in local memory, is used. Per tile:
 *   scores  work-item (key j, row group, head-dim slice): partial dot
 *           products of RA rows over ROWW/DG words, so each K word is decoded
 *           once and serves RA rows; a pass sums the DG slices, applies the
 *           per-row K scale and the mask, and takes 8 partial row maxima;
 *   softmax online in the log2 domain; each work-item keeps its (row, key)
 *           pairs' share of the row sums (they share the row maximum);
 *   P.V     work-item (word of a V row, row group, key group) accumulates RD
 *           rows x one word's 2 or 4 channels over every KS-th key of the
 *           tile, so each V word is decoded once; the KS key groups' sums
 *           are added at the end, through local memory.
 * Codes are decoded exactly, scales folded in: per-head K scale into Q,
 * per-row K scale into S, per-row V scale into P, per-head V scale into the
 * output. With split-KV the normalized partial output and its LSE go to the
 * workspace and merge.cl's merge_states combines them exactly. Bad tables
 * (when unchecked) are clamped so nothing outside the buffers is read; with
 * the check on, a non-zero status word stops every kernel. With a page
 * selection (sel_pages_at >= 0, prune.cl's lists in the workspace) a
 * (sequence, KV head) reads its selected logical pages as its cache.
 *
 * Host macros: HEAD_DIM (multiple of 16), CACHE_FMT (below), the geometry
 * RT, BK, AG, DG, TW, RG, KS (opencl_paged.c: paged_geometry), IN_DTYPE (Q)
 * and OUT_DTYPE (O, the same), HAS_FP16, HAS_FP64.
 */
#define FMT_F16 0
#define FMT_BF16 1
#define FMT_FP8 2
#define FMT_I8 3     /* per-head scales */
#define FMT_I8_ROW 4 /* a scale per (token, head) */
#define HEAD_SCALES (CACHE_FMT == FMT_FP8 || CACHE_FMT == FMT_I8)
#define ROW_SCALES (CACHE_FMT == FMT_I8_ROW)

#define WG 128
#define CES (CACHE_FMT <= FMT_BF16 ? 2 : 1) /* bytes per cached element */
#define ROWB (HEAD_DIM * CES)                /* bytes of one cached row (a multiple of 16) */
#define ROWW (ROWB / 4)                      /* its 32-bit words */
#define EPW (4 / CES)                        /* elements per word */
#define KW (ROWW + 1) /* local row stride in words: odd, so a column of rows spreads over the banks */
#define CPR (ROWB / 16)                      /* 16-byte chunks per row */
#define NCH ((BK * CPR + WG - 1) / WG)       /* chunks a work-item copies per tile, of K and of V */
#define RA ((RT + AG - 1) / AG)              /* score phase: rows per work-item */
#define WPD (ROWW / DG)                      /* score phase: words per work-item */
#define NP ((RT * BK + WG - 1) / WG)         /* softmax: (row, key) pairs per work-item */
#define RD ((RT + RG - 1) / RG)              /* P.V: rows per work-item */
#define WPI (ROWW / TW)                      /* P.V: words per work-item */
#define NACC (WPI * EPW)                     /* P.V: channels per work-item */
#define NSUB 8                               /* partial maxima per row */
#define SP (BK + 1)                          /* local row stride of S and P */
#define KV_WORDS (2 * BK * KW)
#define ACC_WORDS (KS * RT * HEAD_DIM) /* the key groups' sums at the end, over the K/V tiles */
#define SMEM_WORDS (KV_WORDS > ACC_WORDS ? KV_WORDS : ACC_WORDS)

#if AG * DG * BK != WG || TW * RG * KS != WG || ROWW % DG || ROWW % TW || BK % KS || BK % NSUB
#error "inconsistent paged attention geometry"
#endif

#define LN2 0.6931471805599453f

/* The EPW channels of word w of a cached row staged in local memory, as floats (exact). */
#if CACHE_FMT == FMT_F16
typedef float2 wvec;
static inline wvec decode_word(local const uint *row, int w) { return vload_half2(w, (local const half *)row); }
static inline wvec load_q(local const float *q, int w) { return vload2(w, q); }
#elif CACHE_FMT == FMT_BF16
typedef float2 wvec;
static inline wvec decode_word(local const uint *row, int w)
{
    local const ushort *h = (local const ushort *)row + 2 * w;
    return (float2)(bf16_bits_to_float(h[0]), bf16_bits_to_float(h[1]));
}
static inline wvec load_q(local const float *q, int w) { return vload2(w, q); }
#elif CACHE_FMT == FMT_FP8
typedef float4 wvec;
/* E4M3 code to float without fp32 subnormals: the 7 magnitude bits go into an
 * fp32 exponent and mantissa rebiased by 120 (by 121 then minus 2^-6 for the
 * E4M3 subnormals, exact by Sterbenz); 0x7f/0xff are NaN. */
static inline float e4m3_value(uint c)
{
    uint mag = c & 0x7fu;
    bool sub = mag < 8u;
    float r = as_float((mag << 20) + (sub ? 0x3c800000u : 0x3c000000u)) - (sub ? 0.015625f : 0.0f);
    r = as_float(as_uint(r) | ((c & 0x80u) << 24));
    return mag == 0x7fu ? as_float(0x7fc00000u) : r;
}
static inline wvec decode_word(local const uint *row, int w)
{
    local const uchar *c = (local const uchar *)row + 4 * w;
    return (float4)(e4m3_value(c[0]), e4m3_value(c[1]), e4m3_value(c[2]), e4m3_value(c[3]));
}
static inline wvec load_q(local const float *q, int w) { return vload4(w, q); }
#else
typedef float4 wvec;
/* int8 code to float with integer ops only: 2^23 + (code + 128) is a float's exact bit pattern. */
static inline float i8_value(uint c) { return as_float(0x4b000000u | (c ^ 0x80u)) - 8388736.0f; }
static inline wvec decode_word(local const uint *row, int w)
{
    local const uchar *c = (local const uchar *)row + 4 * w;
    return (float4)(i8_value(c[0]), i8_value(c[1]), i8_value(c[2]), i8_value(c[3]));
}
static inline wvec load_q(local const float *q, int w) { return vload4(w, q); }
#endif

static inline float wvec_at(wvec v, int e)
{
#if EPW == 2
    return e == 0 ? v.s0 : v.s1;
#else
    return e == 0 ? v.s0 : e == 1 ? v.s1 : e == 2 ? v.s2 : v.s3;
#endif
}


/* The tile maximum of row r from its NSUB partial maxima. */
static inline float tile_max(local const float *red, int r)
{
    float m = red[r * NSUB];
    for (int u = 1; u < NSUB; u++)
        m = fmax(m, red[r * NSUB + u]);
    return m;
}

/* Copies this work-item's chunks of keys [t0, t0 + BK) (K and V page rows,
 * zeros past `end`) and, for per-row scales, one scale into registers. */
static inline void fetch_tile(int t0, int end, int lid, global const uint4 *kc, global const uint4 *vc,
                              global const float *ks, global const float *vs, global const int *page_list,
                              global const int *sel_row, int sel_n, int page_size, int num_pages, long page_stride,
                              long tok_stride, long head_off, int heads_kv, int hk, private uint4 *kr,
                              private uint4 *vr, private float *sr)
{
    for (int n = 0; n < NCH; n++) {
        int c = lid + n * WG, row = c / CPR;
        int j = t0 + row;
        uint4 kx = (uint4)(0u), vx = (uint4)(0u);
        if (c < BK * CPR && j < end) {
            int pi = j / page_size, off = j - pi * page_size;
            if (sel_row)
                pi = clamp(sel_row[pi], 0, sel_n - 1);
            int page = clamp(page_list[pi], 0, num_pages - 1);
            long at = (page * page_stride + off * tok_stride + head_off) / (16 / CES) + (c - row * CPR);
            kx = kc[at];
            vx = vc[at];
        }
        kr[n] = kx;
        vr[n] = vx;
    }
#if ROW_SCALES
    /* work-items 0..BK-1: K scales of the tile's keys; BK..2BK-1: V scales */
    float x = 0.0f;
    int j = t0 + (lid % BK);
    if (lid < 2 * BK && j < end) {
        int pi = j / page_size, off = j - pi * page_size;
        if (sel_row)
            pi = clamp(sel_row[pi], 0, sel_n - 1);
        int page = clamp(page_list[pi], 0, num_pages - 1);
        long at = ((long)page * page_size + off) * heads_kv + hk;
        x = lid < BK ? ks[at] : vs[at];
    }
    *sr = x;
#endif
}

kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void paged_attention(
    global const in_bits *q, global out_bits *o, global float *lse,
    global const uint4 *kc, global const uint4 *vc, global const float *ks, global const float *vs,
    global const int *qo_indptr, global const int *block_table, global const int *seq_lens,
    global const int *indptr, global const int *indices, global const int *last_page_len,
    global uchar *ws,
    long q_off, long q_s0, long q_s1, long o_off, long o_s0, long o_s1, long lse_off, int want_lse,
    long page_stride, long tok_stride, long head_stride,
    int heads_kv, int group, int heads_q, int page_size, int num_pages, int dense, int max_pages, int total_q,
    int max_q_len, long indices_count, int splits, int pages_per_split, int q_tiles, int causal, float q_scale,
    long status_at, long part_o_at, long part_lse_at, long sel_counts_at, long sel_pages_at)
{
    local uint smem[SMEM_WORDS]; /* the K and V tiles; at the end, the key groups' sums */
    local float ksc[BK], vsc[BK];
    local float qs[RT * HEAD_DIM];
    local float sp[DG * RT * SP]; /* partial scores per head-dim slice; S then P in slice 0; the row sums' parts */
    local float red[RT * NSUB];
    local int row_end[RT];
    local float row_m[RT], row_scale[RT];
    local uint *const kt = smem, *const vt = smem + BK * KW;

    const int lid = get_local_id(0);
    if (stopped(ws, status_at))
        return; /* the check found bad tables or a non-finite Q: write nothing */
    long item = get_group_id(0);
    const int split = (int)(item % splits);
    item /= splits;
    const int qt = (int)(item % q_tiles);
    item /= q_tiles;
    const int hk = (int)(item % heads_kv);
    const int b = (int)(item / heads_kv);
    const int P = page_size, G = group;

    /* The sequence, clamped so that unchecked tables never lead outside the buffers. */
    const int q0 = clamp(qo_indptr[b], 0, total_q);
    const int q1 = clamp(qo_indptr[b + 1], q0, total_q);
    const int q_len = min(q1 - q0, max_q_len);
    long p0 = 0;
    int kv_len;
    if (dense) {
        kv_len = clamp(seq_lens[b], 0, max_pages * P);
    } else {
        p0 = clamp((long)indptr[b], 0L, indices_count);
        long p1 = clamp((long)indptr[b + 1], p0, indices_count);
        int pages = (int)min(p1 - p0, (long)max_pages);
        kv_len = pages ? (pages - 1) * P + clamp(last_page_len[b], 1, P) : 0;
    }
    /* A page selection (sel_pages_at >= 0): the (b, hk)'s selected logical pages, in order, are its cache;
     * the last page (always selected) keeps its token count. */
    global const int *sel_row = 0;
    const int sel_n = (kv_len + P - 1) / P;
    if (sel_pages_at >= 0 && sel_n > 0) {
        const int count = clamp(((global const int *)(ws + sel_counts_at))[b * heads_kv + hk], 1, sel_n);
        sel_row = (global const int *)(ws + sel_pages_at) + (long)(b * heads_kv + hk) * max_pages;
        kv_len = (count - 1) * P + (kv_len - (sel_n - 1) * P);
    }
    const int row_base = qt * RT, rows = min(RT, q_len * G - row_base);
    if (rows <= 0)
        return;
    const long span = (long)pages_per_split * P;
    const int kb = (int)min((long)split * span, (long)kv_len);
    int ke = (int)min((long)(split + 1) * span, (long)kv_len);
    if (causal) /* the tile's last query sees the most keys */
        ke = min(ke, max(kb, (row_base + rows - 1) / G + 1 + kv_len - q_len));

#if HEAD_SCALES
    const float qk = q_scale * ks[hk], v_head = vs[hk];
#else
    const float qk = q_scale, v_head = 1.0f;
#endif
    for (int e = lid; e < RT * HEAD_DIM; e += WG) {
        int r = e / HEAD_DIM, d = e - r * HEAD_DIM;
        float x = 0.0f;
        if (r < rows) {
            int pr = row_base + r, i = pr / G, member = pr - i * G;
            x = load_in(q, q_off + (long)(q0 + i) * q_s0 + (long)(hk * G + member) * q_s1 + d) * qk;
        }
        qs[e] = x;
    }
    for (int r = lid; r < RT; r += WG) {
        int end = ke;
        if (causal)
            end = min(end, (row_base + r) / G + 1 + kv_len - q_len);
        row_end[r] = end;
    }

    /* score phase: key j, rows ag + AG*k, words dg*WPD ..; softmax: pairs (row rs0 + (WG/BK)*x, key j);
     * P.V: words tw + TW*i, rows rg + RG*k, keys kg + KS*x */
    const int j = lid % BK, dg = (lid / BK) % DG, ag = lid / BK / DG, rs0 = lid / BK;
    const int tw = lid % TW, kg = (lid / TW) % KS, rg = lid / TW / KS;
    float m_s[NP], l_s[NP], m_o[RD], acc[RD][NACC];
    for (int x = 0; x < NP; x++) {
        m_s[x] = -INFINITY;
        l_s[x] = 0.0f;
    }
    for (int k = 0; k < RD; k++) {
        m_o[k] = -INFINITY;
        for (int c = 0; c < NACC; c++)
            acc[k][c] = 0.0f;
    }

    global const int *page_list = dense ? block_table + (long)b * max_pages : indices + p0;
    const long head_off = (long)hk * head_stride;
    uint4 kr[NCH], vr[NCH];
    float sr = 0.0f;
    if (kb < ke)
        fetch_tile(kb, ke, lid, kc, vc, ks, vs, page_list, sel_row, sel_n, P, num_pages, page_stride, tok_stride, head_off,
                   heads_kv, hk, kr, vr, &sr);

    for (int t0 = kb; t0 < ke; t0 += BK) {
        barrier(CLK_LOCAL_MEM_FENCE); /* the previous tile is no longer read */
        for (int n = 0; n < NCH; n++) {
            int c = lid + n * WG, row = c / CPR;
            if (c < BK * CPR) {
                vstore4(kr[n], 0, kt + row * KW + (c - row * CPR) * 4);
                vstore4(vr[n], 0, vt + row * KW + (c - row * CPR) * 4);
            }
        }
#if ROW_SCALES
        if (lid < BK)
            ksc[lid] = sr;
        else if (lid < 2 * BK)
            vsc[lid - BK] = sr;
#endif
        barrier(CLK_LOCAL_MEM_FENCE);
        if (t0 + BK < ke) /* the next tile's reads are in flight while this one is used */
            fetch_tile(t0 + BK, ke, lid, kc, vc, ks, vs, page_list, sel_row, sel_n, P, num_pages, page_stride, tok_stride,
                       head_off, heads_kv, hk, kr, vr, &sr);

        /* scores: partial dot products over this work-item's slice of the head dim */
        {
            float s[RA];
            for (int k = 0; k < RA; k++)
                s[k] = 0.0f;
            local const uint *krow = kt + j * KW;
            for (int w = dg * WPD; w < (dg + 1) * WPD; w++) {
                wvec kv = decode_word(krow, w);
                for (int k = 0; k < RA; k++) {
                    int r = ag + AG * k;
                    if (RA * AG == RT || r < RT)
                        s[k] += dot(load_q(qs + r * HEAD_DIM, w), kv);
                }
            }
            for (int k = 0; k < RA; k++) {
                int r = ag + AG * k;
                if (RA * AG == RT || r < RT)
                    sp[(dg * RT + r) * SP + j] = s[k];
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        /* full scores (slices added, per-row K scale, mask) and partial row maxima */
        for (int task = lid; task < RT * NSUB; task += WG) {
            int r = task / NSUB, u = task - r * NSUB;
            float mx = -INFINITY;
            for (int jj = u; jj < BK; jj += NSUB) {
                float x = sp[r * SP + jj];
                for (int g = 1; g < DG; g++)
                    x += sp[(g * RT + r) * SP + jj];
#if ROW_SCALES
                x *= ksc[jj];
#endif
                if (t0 + jj >= row_end[r])
                    x = -INFINITY;
                sp[r * SP + jj] = x;
                mx = fmax(mx, x);
            }
            red[task] = mx;
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* probabilities of this work-item's pairs, and its share of the row sums */
        for (int x = 0; x < NP; x++) {
            int r = rs0 + (WG / BK) * x;
            if (NP * (WG / BK) == RT || r < RT) {
                float m_new = fmax(m_s[x], tile_max(red, r));
                float p = m_new == -INFINITY ? 0.0f : exp2(sp[r * SP + j] - m_new);
                float alpha = m_s[x] == -INFINITY ? 0.0f : exp2(m_s[x] - m_new);
                l_s[x] = l_s[x] * alpha + p;
                m_s[x] = m_new;
#if ROW_SCALES
                p *= vsc[j];
#endif
                sp[r * SP + j] = p;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* O = O * alpha + P V over this work-item's keys */
        for (int k = 0; k < RD; k++) {
            int r = rg + RG * k;
            if (RD * RG == RT || r < RT) {
                float m_new = fmax(m_o[k], tile_max(red, r));
                float alpha = m_o[k] == -INFINITY ? 0.0f : exp2(m_o[k] - m_new);
                m_o[k] = m_new;
                for (int c = 0; c < NACC; c++)
                    acc[k][c] *= alpha;
            }
        }
        for (int jj = kg; jj < BK; jj += KS) {
            local const uint *vrow = vt + jj * KW;
            float p[RD];
            for (int k = 0; k < RD; k++) {
                int r = rg + RG * k;
                p[k] = (RD * RG == RT || r < RT) ? sp[r * SP + jj] : 0.0f;
            }
            for (int i = 0; i < WPI; i++) {
                wvec vv = decode_word(vrow, tw + TW * i);
                for (int k = 0; k < RD; k++)
                    for (int e = 0; e < EPW; e++)
                        acc[k][i * EPW + e] += p[k] * wvec_at(vv, e);
            }
        }
    }

    /* the row sums (each pair's share, added up), the rows' maxima, and the key groups' sums */
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int x = 0; x < NP; x++) {
        int r = rs0 + (WG / BK) * x;
        if (NP * (WG / BK) == RT || r < RT) {
            sp[r * SP + j] = l_s[x];
            if (j == 0)
                row_m[r] = m_s[x];
        }
    }
    local float *acc_sum = (local float *)smem;
    for (int k = 0; k < RD; k++) {
        int r = rg + RG * k;
        if (RD * RG == RT || r < RT)
            for (int i = 0; i < WPI; i++)
                for (int e = 0; e < EPW; e++)
                    acc_sum[(kg * RT + r) * HEAD_DIM + (tw + TW * i) * EPW + e] = acc[k][i * EPW + e];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int r = lid; r < RT; r += WG) {
        float L = 0.0f;
        for (int jj = 0; jj < BK; jj++)
            L += sp[r * SP + jj];
        row_scale[r] = L > 0.0f ? v_head / L : 0.0f;
        row_m[r] = L > 0.0f ? (row_m[r] + log2(L)) * LN2 : -INFINITY; /* now the row's LSE */
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    global float *part_o = part_o_at >= 0 ? (global float *)(ws + part_o_at) : 0;
    global float *part_lse = part_o_at >= 0 ? (global float *)(ws + part_lse_at) : 0;
    /* element (r, d) of the tile's output: consecutive work-items, consecutive channels */
    for (int e = lid; e < rows * HEAD_DIM; e += WG) {
        const int r = e / HEAD_DIM, d = e - r * HEAD_DIM;
        float x = 0.0f;
        for (int g = 0; g < KS; g++)
            x += acc_sum[(g * RT + r) * HEAD_DIM + d];
        x *= row_scale[r];
        const int pr = row_base + r, i = pr / G, head = hk * G + (pr - i * G);
        const long row = q0 + i;
        if (part_o)
            part_o[(((long)split * total_q + row) * heads_q + head) * HEAD_DIM + d] = x;
        else
            store_out(o, o_off + row * o_s0 + (long)head * o_s1 + d, x);
    }
    for (int r = lid; r < rows; r += WG) {
        const int pr = row_base + r, i = pr / G, head = hk * G + (pr - i * G);
        const long row = q0 + i;
        if (part_o)
            part_lse[((long)split * total_q + row) * heads_q + head] = row_m[r];
        else if (want_lse)
            lse[lse_off + row * heads_q + head] = row_m[r];
    }
}

/*
 * The page-table check and Q's NaN/Inf scan, before attention when checks
 * are on. Work-groups [0, batch): sequence g's table entries (STATUS_BOUNDS);
 * the rest: one work-item per (row, head) of Q scans its HEAD_DIM values
 * (STATUS_NONFINITE). The host names the first bad entry from the tables.
 */
#define CHECK_WG 128
kernel __attribute__((reqd_work_group_size(CHECK_WG, 1, 1))) void paged_check(
    global const int *qo_indptr, global const int *block_table, global const int *seq_lens,
    global const int *indptr, global const int *indices, global const int *last_page_len,
    int dense, int batch, int max_pages, int page_size, int num_pages, int total_q, int max_q_len,
    long indices_count, global const in_bits *q, long q_off, long q_s0, long q_s1, int heads_q,
    global uchar *ws, long status_at)
{
    global uint *status = (global uint *)(ws + status_at);
    const int g = get_group_id(0), lid = get_local_id(0);
    if (g < batch) {
        const int b = g, P = page_size;
        bool bad = b == 0 && qo_indptr[0] < 0;
        long q_len = (long)qo_indptr[b + 1] - qo_indptr[b];
        bad |= q_len < 0 || q_len > max_q_len || qo_indptr[b + 1] > total_q;
        long pages = 0, first = 0;
        if (!bad && dense) {
            int len = seq_lens[b];
            bad = len < 0 || len > (long)max_pages * P;
            pages = ((long)len + P - 1) / P;
            first = (long)b * max_pages;
        } else if (!bad) {
            long a0 = indptr[b], a1 = indptr[b + 1];
            bad = indptr[0] < 0 || a1 < a0 || a1 > indices_count || a1 - a0 > max_pages ||
                  (a1 > a0 && (last_page_len[b] < 1 || last_page_len[b] > P));
            pages = a1 - a0;
            first = a0;
        }
        if (bad) {
            if (lid == 0)
                atomic_or(status + STATUS_BOUNDS, 1u);
            return;
        }
        for (long i = lid; i < pages; i += CHECK_WG) {
            int page = dense ? block_table[first + i] : indices[first + i];
            if (page < 0 || page >= num_pages) {
                atomic_or(status + STATUS_BOUNDS, 1u);
                break;
            }
        }
        return;
    }
#if IN_DTYPE == DT_F32
    const uint mask = 0x7f800000u;
#elif IN_DTYPE == DT_F16
    const uint mask = 0x7c00u;
#else
    const uint mask = 0x7f80u;
#endif
    const long lo = clamp((long)qo_indptr[0], 0L, (long)total_q);
    const long hi = clamp((long)qo_indptr[batch], lo, (long)total_q);
    const long n = (hi - lo) * heads_q, step = (long)(get_num_groups(0) - batch) * CHECK_WG;
    bool bad = false;
    for (long idx = (long)(g - batch) * CHECK_WG + lid; idx < n; idx += step) {
        long row = lo + idx / heads_q, h = idx % heads_q;
        global const in_bits *p = q + q_off + row * q_s0 + h * q_s1;
        for (int d = 0; d < HEAD_DIM; d++)
            bad |= ((uint)p[d] & mask) == mask;
    }
    if (bad)
        atomic_or(status + STATUS_NONFINITE, NONFINITE_Q);
}
