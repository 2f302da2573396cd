/*
 * Exact merge of attention states through their LSE (qattn_merge_states, and
 * the split-KV partials of paged attention): for each row r and head h,
 *   lse = log(sum_s exp(lse_s)),  o = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)
 * with M the largest lse_s; states whose LSE is -inf contribute nothing, and
 * when all are -inf, o = 0 and lse = -inf.
 *
 * A work-group of MERGE_WG work-items takes one (row, head) at a time (the
 * groups stride over them); its work-items take the channels. Each computes
 * M and the weight sum itself, in the same order, so all agree bit for bit.
 * Rows are limited to [qo_indptr[0], qo_indptr[batch]) when use_qo is set
 * (the paged split-KV case), and nothing is written when the status word at
 * status_at (>= 0) is set.
 *
 * Host macros: IN_DTYPE (the states), OUT_DTYPE (o), HAS_FP16, HAS_FP64.
 */
#define MERGE_WG 64

kernel __attribute__((reqd_work_group_size(MERGE_WG, 1, 1))) void merge_states(
    global const in_bits *v, long v_off, long v_s0, long v_s1, long v_s2,
    global const float *s, long s_off, long s_s0, long s_s1, long s_s2,
    global out_bits *o, long o_off, long o_s0, long o_s1,
    global float *lse, long lse_off, int want_lse,
    int states, long rows, int heads, int head_dim,
    global const int *qo_indptr, int batch, int use_qo, global const uchar *ws, long status_at)
{
    if (stopped(ws, status_at))
        return;
    const int lid = get_local_id(0);
    long lo = 0, hi = rows;
    if (use_qo) {
        lo = clamp((long)qo_indptr[0], 0L, rows);
        hi = clamp((long)qo_indptr[batch], lo, rows);
    }
    const long pairs = (hi - lo) * heads;
    for (long pr = get_group_id(0); pr < pairs; pr += get_num_groups(0)) {
        const long r = lo + pr / heads;
        const int h = (int)(pr % heads);
        global const float *sr = s + s_off + r * s_s1 + (long)h * s_s2;
        float M = -INFINITY;
        for (int st = 0; st < states; st++)
            M = fmax(M, sr[st * s_s0]);
        float total = 0.0f;
        if (M != -INFINITY)
            for (int st = 0; st < states; st++) {
                float x = sr[st * s_s0];
                if (x != -INFINITY)
                    total += exp(x - M);
            }
        const long vbase = v_off + r * v_s1 + (long)h * v_s2;
        for (int d = lid; d < head_dim; d += MERGE_WG) {
            float acc = 0.0f;
            if (M != -INFINITY)
                for (int st = 0; st < states; st++) {
                    float x = sr[st * s_s0];
                    if (x != -INFINITY)
                        acc += exp(x - M) * load_in(v, vbase + st * v_s0 + d);
                }
            store_out(o, o_off + r * o_s0 + (long)h * o_s1 + d, M != -INFINITY ? acc / total : 0.0f);
        }
        if (lid == 0 && want_lse)
            lse[lse_off + r * heads + h] = M != -INFINITY ? M + log(total) : -INFINITY;
    }
}
