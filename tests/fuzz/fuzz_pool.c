/*
 * libFuzzer target: the host-side page pool (qattn_page_pool_*) and
 * qattn_page_tables_build, against a model. Each input is a list of
 * operations (create, alloc, free, count, build) with hostile counts, page
 * ids (negative, out of range, not allocated, listed twice) and NULL
 * pointers. A call the header allows must succeed and agree with the model;
 * one it forbids must fail, say why, and change neither the pool nor the
 * caller's arrays.
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"

#define MAX_PAGES 512
#define MAX_LIST 96
#define POISON_PAGE ((int32_t)0x5a5a5a5a)

/* The header promises lowest-free-first; the pool hands out the most
 * recently freed page first (a stack). Reported, not fixed here (src/paged.c
 * and the header are being changed elsewhere): FUZZ_POOL_ORDER=1 checks it. */
#ifndef FUZZ_POOL_ORDER
#define FUZZ_POOL_ORDER 0
#endif

typedef struct model {
    int64_t num_pages;
    bool used[MAX_PAGES];
    int64_t free_count;
} model;

/* A count a caller might pass: mostly small, sometimes hostile. */
static int64_t pick_count(fuzz_input *in, int64_t typical)
{
    const uint8_t how = fz_u8(in);
    if (how < 200)
        return typical > 0 ? (int64_t)(how % (uint8_t)(typical + 1 > 255 ? 255 : typical + 1)) : 0;
    return fz_hostile_i64(in);
}

/* A page id: an allocated one, a free one, or a hostile one. */
static int32_t pick_page(fuzz_input *in, const model *mo)
{
    const uint8_t how = fz_u8(in);
    if (how < 160 && mo->num_pages > 0) {
        const int64_t start = fz_u8(in) % mo->num_pages;
        for (int64_t i = 0; i < mo->num_pages; i++) { /* the next allocated page from a random start */
            const int64_t p = (start + i) % mo->num_pages;
            if (mo->used[p])
                return (int32_t)p;
        }
        return (int32_t)start;
    }
    if (how < 220)
        return (int32_t)(fz_u8(in) % (mo->num_pages + 2));
    return (int32_t)fz_hostile_i64(in);
}

static void op_alloc(fuzz_input *in, qattn_page_pool *pool, model *mo)
{
    const int64_t n = pick_count(in, mo->free_count + 1);
    const bool null_pages = fz_u8(in) % 16 == 0;
    int32_t pages[MAX_LIST + 1];
    for (int i = 0; i <= MAX_LIST; i++)
        pages[i] = POISON_PAGE;
    if (!null_pages && n > MAX_LIST)
        return; /* the harness's array is smaller */
    const bool valid = n >= 0 && (n == 0 || !null_pages) && n <= mo->free_count;
    const qattn_status s = qattn_page_pool_alloc(pool, n, null_pages ? NULL : pages);
    if (!valid) {
        FUZZ_CHECK(s != QATTN_OK, "qattn_page_pool_alloc(n=%lld, %s) with %lld free succeeded", (long long)n,
                   null_pages ? "NULL" : "pages", (long long)mo->free_count);
        fuzz_check_message(NULL, s, "qattn_page_pool_alloc");
        if (n >= 0 && !null_pages && n > mo->free_count)
            FUZZ_CHECK(s == QATTN_ERR_OUT_OF_MEMORY, "too few free pages must be QATTN_ERR_OUT_OF_MEMORY, got %s",
                       qattn_status_str(s));
        for (int i = 0; i <= MAX_LIST; i++)
            FUZZ_CHECK(pages[i] == POISON_PAGE, "a failed qattn_page_pool_alloc wrote pages[%d]", i);
        return;
    }
    FUZZ_CHECK(s == QATTN_OK, "qattn_page_pool_alloc(n=%lld) with %lld free: %s: %s", (long long)n,
               (long long)mo->free_count, qattn_status_str(s), qattn_last_error(NULL));
    int64_t lowest = 0; /* the header: pages are handed out lowest-free-first */
    for (int64_t i = 0; i < n; i++) {
        const int32_t p = pages[i];
        FUZZ_CHECK(p >= 0 && p < mo->num_pages, "qattn_page_pool_alloc handed out page %d of %lld", p,
                   (long long)mo->num_pages);
        while (lowest < mo->num_pages && mo->used[lowest])
            lowest++;
        FUZZ_CHECK(!FUZZ_POOL_ORDER || p == lowest, "qattn_page_pool_alloc handed out page %d while page %lld is the "
                   "lowest free one", p, (long long)lowest);
        FUZZ_CHECK(!mo->used[p], "qattn_page_pool_alloc handed out page %d, which is in use", p);
        mo->used[p] = true;
    }
    for (int i = (int)n; i <= MAX_LIST; i++)
        FUZZ_CHECK(pages[i] == POISON_PAGE, "qattn_page_pool_alloc wrote past pages[%lld]", (long long)n);
    mo->free_count -= n;
}

static void op_free(fuzz_input *in, qattn_page_pool *pool, model *mo)
{
    const int64_t n = pick_count(in, 8);
    const bool null_pages = fz_u8(in) % 16 == 0;
    if (!null_pages && n > MAX_LIST)
        return;
    int32_t pages[MAX_LIST];
    bool seen[MAX_PAGES] = {false};
    bool valid = n >= 0 && (n == 0 || !null_pages);
    for (int64_t i = 0; !null_pages && i < n; i++) {
        pages[i] = pick_page(in, mo);
        const int32_t p = pages[i];
        if (p < 0 || p >= mo->num_pages || !mo->used[p] || seen[p])
            valid = false;
        else
            seen[p] = true;
    }
    const qattn_status s = qattn_page_pool_free(pool, n, null_pages ? NULL : pages);
    if (!valid) {
        FUZZ_CHECK(s != QATTN_OK, "qattn_page_pool_free accepted a bad list (n=%lld)", (long long)n);
        fuzz_check_message(NULL, s, "qattn_page_pool_free");
        return;
    }
    FUZZ_CHECK(s == QATTN_OK, "qattn_page_pool_free(n=%lld): %s: %s", (long long)n, qattn_status_str(s),
               qattn_last_error(NULL));
    for (int64_t i = 0; i < n; i++)
        mo->used[pages[i]] = false;
    mo->free_count += n;
}

static void op_build(fuzz_input *in)
{
    int64_t batch = pick_count(in, 6);
    int32_t lists[8][16];
    const int32_t *seq_pages[8];
    int64_t pages_per_seq[8];
    const int64_t max_pages = pick_count(in, 10);
    const uint8_t nulls = fz_u8(in);
    const bool with_table = nulls & 1, with_indptr = nulls & 2, with_indices = nulls & 4;
    if (batch > 8 || (with_table && (max_pages < 0 || max_pages > 16)))
        return; /* beyond the harness's arrays */
    bool valid = batch >= 1;
    int64_t total = 0;
    for (int64_t b = 0; b < batch; b++) {
        pages_per_seq[b] = pick_count(in, 12);
        if (pages_per_seq[b] > 16) /* a count past the list's length: invalid only when negative... skip */
            pages_per_seq[b] = 16;
        seq_pages[b] = fz_u8(in) % 32 == 0 ? NULL : lists[b];
        if (pages_per_seq[b] < 0 || (pages_per_seq[b] > 0 && !seq_pages[b]))
            valid = false;
        if (with_table && pages_per_seq[b] > max_pages)
            valid = false;
        for (int64_t i = 0; i < 16; i++) {
            const uint8_t how = fz_u8(in);
            lists[b][i] = how < 240 ? (int32_t)(how % 64) : (int32_t)fz_hostile_i64(in);
            if (seq_pages[b] && i < pages_per_seq[b] && lists[b][i] < 0)
                valid = false;
        }
        if (pages_per_seq[b] > 0)
            total += pages_per_seq[b];
    }
    int32_t table[8 * 16 + 1], indptr[10], indices[8 * 16 + 1];
    for (int i = 0; i < 8 * 16 + 1; i++)
        table[i] = indices[i] = POISON_PAGE;
    for (int i = 0; i < 10; i++)
        indptr[i] = POISON_PAGE;
    const bool null_lists = fz_u8(in) % 32 == 0;
    if (null_lists)
        valid = false;
    const qattn_status s =
        qattn_page_tables_build(batch, null_lists ? NULL : seq_pages, null_lists ? NULL : pages_per_seq, max_pages,
                                with_table ? table : NULL, with_indptr ? indptr : NULL, with_indices ? indices : NULL);
    if (!valid) {
        FUZZ_CHECK(s != QATTN_OK, "qattn_page_tables_build accepted bad lists");
        fuzz_check_message(NULL, s, "qattn_page_tables_build");
        for (int i = 0; i < 8 * 16 + 1; i++)
            FUZZ_CHECK(table[i] == POISON_PAGE && indices[i] == POISON_PAGE, "a failed build wrote its outputs");
        for (int i = 0; i < 10; i++)
            FUZZ_CHECK(indptr[i] == POISON_PAGE, "a failed build wrote indptr");
        return;
    }
    FUZZ_CHECK(s == QATTN_OK, "qattn_page_tables_build: %s: %s", qattn_status_str(s), qattn_last_error(NULL));
    int64_t at = 0;
    for (int64_t b = 0; b < batch; b++) {
        if (with_indptr)
            FUZZ_CHECK(indptr[b] == at, "indptr[%lld] = %d, want %lld", (long long)b, indptr[b], (long long)at);
        for (int64_t i = 0; i < pages_per_seq[b]; i++, at++)
            if (with_indices)
                FUZZ_CHECK(indices[at] == seq_pages[b][i], "indices[%lld]", (long long)at);
        for (int64_t i = 0; with_table && i < max_pages; i++)
            FUZZ_CHECK(table[b * max_pages + i] == (i < pages_per_seq[b] ? seq_pages[b][i] : -1),
                       "block_table[%lld][%lld] = %d", (long long)b, (long long)i, table[b * max_pages + i]);
    }
    if (with_indptr)
        FUZZ_CHECK(indptr[batch] == at && indptr[batch + 1] == POISON_PAGE, "indptr[batch]");
    if (with_indices)
        FUZZ_CHECK(indices[total] == POISON_PAGE, "qattn_page_tables_build wrote past indices[%lld]", (long long)total);
    if (with_table)
        FUZZ_CHECK(table[batch * max_pages] == POISON_PAGE, "qattn_page_tables_build wrote past the block table");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input in = {data, size, 0};
    qattn_page_pool *pool = NULL;
    model mo = {0};
    /* create: mostly a valid count, sometimes a hostile one (never a huge valid one: it would allocate) */
    const uint8_t how = fz_u8(&in);
    int64_t n = how < 224 ? 1 + how % 64 : fz_hostile_i64(&in);
    if (n > MAX_PAGES && n <= INT32_MAX)
        n = MAX_PAGES;
    qattn_status s = qattn_page_pool_create(n, &pool);
    if (n <= 0 || n > INT32_MAX) {
        FUZZ_CHECK(s != QATTN_OK && pool == NULL, "qattn_page_pool_create(%lld) succeeded", (long long)n);
        fuzz_check_message(NULL, s, "qattn_page_pool_create");
        FUZZ_CHECK(qattn_page_pool_free_count(NULL) == 0, "free count of NULL");
        FUZZ_CHECK(qattn_page_pool_alloc(NULL, 1, NULL) != QATTN_OK, "alloc on NULL");
        FUZZ_CHECK(qattn_page_pool_free(NULL, 0, NULL) != QATTN_OK, "free on NULL");
        op_build(&in);
        return 0;
    }
    FUZZ_CHECK(s == QATTN_OK && pool, "qattn_page_pool_create(%lld): %s", (long long)n, qattn_last_error(NULL));
    mo.num_pages = mo.free_count = n;
    for (int step = 0; step < 48 && fz_more(&in); step++) {
        switch (fz_u8(&in) % 4) {
        case 0: op_alloc(&in, pool, &mo); break;
        case 1: op_free(&in, pool, &mo); break;
        case 2: op_build(&in); break;
        default: break;
        }
        FUZZ_CHECK(qattn_page_pool_free_count(pool) == mo.free_count, "free count %lld, model %lld",
                   (long long)qattn_page_pool_free_count(pool), (long long)mo.free_count);
    }
    qattn_page_pool_destroy(pool);
    return 0;
}
