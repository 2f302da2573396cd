/*
 * The public API's contract on bad input: every NULL, zero or overflowing
 * size, mismatched shape/dtype/stride, unknown backend, NaN/Inf data and
 * misuse of buffers returns the right status with a message naming the
 * problem, and leaves outputs untouched. Runs on the CPU backend (always
 * built); the core's checks are the same for every backend.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qattn/qattn.h"
#include "reference.h"

#define assert_error(call, status, ctx, fragment)                                                                     \
    do {                                                                                                               \
        qattn_status got_ = (call);                                                                                    \
        if (got_ != (status) || !strstr(qattn_last_error(ctx), (fragment)))                                           \
            fail_msg("%s: got %s '%s', want %s containing '%s'", #call, qattn_status_str(got_),                        \
                     qattn_last_error(ctx), qattn_status_str(status), (fragment));                                     \
    } while (0)

static qattn_ctx *cpu_ctx(void)
{
    qattn_ctx_params params = {.backend = "cpu"};
    qattn_ctx *ctx = NULL;
    assert_int_equal(qattn_ctx_create(&params, &ctx), QATTN_OK);
    return ctx;
}

static qattn_attention_desc small_desc(void)
{
    qattn_attention_desc d = {
        .q = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64),
        .k = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64),
        .v = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64),
        .o = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64),
        .precision = QATTN_PRECISION_EXACT,
    };
    return d;
}

static void test_version_and_strings(void **state)
{
    (void)state;
    char want[32];
    snprintf(want, sizeof(want), "%d.%d.%d", QATTN_VERSION_MAJOR, QATTN_VERSION_MINOR, QATTN_VERSION_PATCH);
    assert_string_equal(qattn_version(), want);
    assert_int_equal(qattn_version_number(), QATTN_VERSION_NUMBER);
    for (int s = QATTN_OK; s <= QATTN_ERR_INTERNAL; s++)
        assert_non_null(strstr(qattn_status_str((qattn_status)s), "QATTN_"));
    assert_string_equal(qattn_status_str((qattn_status)1234), "QATTN_ERR_UNKNOWN_STATUS");
    assert_int_equal(qattn_dtype_size(QATTN_DTYPE_BF16), 2);
    assert_int_equal(qattn_dtype_size((qattn_dtype)99), 0);
    assert_string_equal(qattn_dtype_name(QATTN_DTYPE_FP8_E4M3), "fp8e4m3");
    assert_string_equal(qattn_precision_name(QATTN_PRECISION_INT8_FP8_F16ACC), "int8_fp8_f16acc");
    assert_string_equal(qattn_last_error(NULL), qattn_last_error(NULL)); /* never NULL */
}

static void test_backend_discovery(void **state)
{
    (void)state;
    assert_true(qattn_backend_count() >= 4);
    qattn_backend_info info;
    assert_int_equal(qattn_backend_query(0, &info), QATTN_OK);
    assert_string_equal(info.name, "cpu");
    assert_true(info.built && info.usable && info.device_count == 1);
    for (int i = 1; i < qattn_backend_count(); i++) {
        assert_int_equal(qattn_backend_query(i, &info), QATTN_OK);
        if (!info.usable)
            assert_true(strlen(info.reason) > 0); /* always says why */
    }
    assert_error(qattn_backend_query(-1, &info), QATTN_ERR_NOT_FOUND, NULL, "out of range");
    assert_error(qattn_backend_query(0, NULL), QATTN_ERR_INVALID_ARGUMENT, NULL, "info");
    qattn_device_info dev;
    assert_int_equal(qattn_device_query("cpu", 0, &dev), QATTN_OK);
    assert_true(dev.compute_units >= 1 && strlen(dev.name) > 0);
    assert_true(dev.precisions & (1u << QATTN_PRECISION_INT8_FP8));
    assert_error(qattn_device_query("cpu", 1, &dev), QATTN_ERR_NOT_FOUND, NULL, "device 1");
    assert_error(qattn_device_query("nonsense", 0, &dev), QATTN_ERR_NOT_FOUND, NULL, "valid choices");
    assert_error(qattn_device_query(NULL, 0, &dev), QATTN_ERR_INVALID_ARGUMENT, NULL, "backend");
}

static void test_context_selection(void **state)
{
    (void)state;
    qattn_ctx *ctx = (qattn_ctx *)0x1;
    qattn_ctx_params params = {.backend = "nonsense"};
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_NOT_FOUND, NULL, "cpu, cuda, vulkan, opencl, auto");
    assert_null(ctx); /* cleared on failure */
    assert_error(qattn_ctx_create(&params, NULL), QATTN_ERR_INVALID_ARGUMENT, NULL, "out");

    /* The environment, parsed in one place, with the variable named in errors. */
    setenv("QATTN_BACKEND", "nonsense", 1);
    assert_error(qattn_ctx_create(NULL, &ctx), QATTN_ERR_NOT_FOUND, NULL, "from QATTN_BACKEND");
    setenv("QATTN_BACKEND", "cpu", 1);
    assert_int_equal(qattn_ctx_create(NULL, &ctx), QATTN_OK);
    assert_string_equal(qattn_ctx_backend(ctx), "cpu");
    qattn_ctx_destroy(ctx);
    /* An explicit parameter wins over the environment. */
    setenv("QATTN_BACKEND", "nonsense", 1);
    params.backend = "cpu";
    assert_int_equal(qattn_ctx_create(&params, &ctx), QATTN_OK);
    qattn_ctx_destroy(ctx);
    unsetenv("QATTN_BACKEND");

    setenv("QATTN_NUM_THREADS", "many", 1);
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_INVALID_ARGUMENT, NULL, "QATTN_NUM_THREADS");
    /* ... unless the parameter it stands in for is given (parameters win). */
    params.num_threads = 2;
    assert_int_equal(qattn_ctx_create(&params, &ctx), QATTN_OK);
    qattn_ctx_destroy(ctx);
    params.num_threads = 0;
    const char *not_counts[] = {" 4", "4 ", "+4", "0", "4097", "99999999999999999999"};
    for (size_t i = 0; i < sizeof(not_counts) / sizeof(not_counts[0]); i++) {
        setenv("QATTN_NUM_THREADS", not_counts[i], 1);
        assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_INVALID_ARGUMENT, NULL, "QATTN_NUM_THREADS");
    }
    setenv("QATTN_NUM_THREADS", "3", 1);
    assert_int_equal(qattn_ctx_create(&params, &ctx), QATTN_OK);
    qattn_ctx_destroy(ctx);
    unsetenv("QATTN_NUM_THREADS");
    setenv("QATTN_LOG", "loud", 1);
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_INVALID_ARGUMENT, NULL, "QATTN_LOG");
    unsetenv("QATTN_LOG");

    params.device = "3";
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_NOT_FOUND, NULL, "device 3");
    /* An index past long is an error that shows it as given. */
    params.device = "99999999999999999999";
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_INVALID_ARGUMENT, NULL, "99999999999999999999");
    params.device = NULL;
    setenv("QATTN_DEVICE", "99999999999999999999", 1);
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_INVALID_ARGUMENT, NULL, "from QATTN_DEVICE");
    unsetenv("QATTN_DEVICE");
    params.device = "no-such-device-name";
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_NOT_FOUND, NULL, "no-such-device-name");
    params.device = NULL;
    params.num_threads = -2;
    assert_error(qattn_ctx_create(&params, &ctx), QATTN_ERR_INVALID_ARGUMENT, NULL, "num_threads");

    /* A named backend that is not usable is an error that says why, never a switch. */
    for (int i = 1; i < qattn_backend_count(); i++) {
        qattn_backend_info info;
        qattn_backend_query(i, &info);
        if (info.usable)
            continue;
        qattn_ctx_params p = {.backend = info.name};
        assert_error(qattn_ctx_create(&p, &ctx), QATTN_ERR_UNAVAILABLE, NULL, info.name);
    }
    qattn_ctx_destroy(NULL); /* destroy accepts NULL */
}

static void test_buffers(void **state)
{
    (void)state;
    qattn_ctx *ctx = cpu_ctx();
    qattn_buffer *buf = NULL;
    assert_error(qattn_buffer_create(ctx, 0, &buf), QATTN_ERR_INVALID_ARGUMENT, ctx, "bytes is 0");
    assert_error(qattn_buffer_create(NULL, 16, &buf), QATTN_ERR_INVALID_ARGUMENT, NULL, "ctx");
    assert_error(qattn_buffer_create(ctx, 16, NULL), QATTN_ERR_INVALID_ARGUMENT, ctx, "out");
    /* An allocation no machine can satisfy fails cleanly. */
    assert_error(qattn_buffer_create(ctx, SIZE_MAX - 8, &buf), QATTN_ERR_OUT_OF_MEMORY, ctx, "buffer");
    assert_null(buf);

    assert_int_equal(qattn_buffer_create(ctx, 64, &buf), QATTN_OK);
    assert_int_equal(qattn_buffer_size(buf), 64);
    uint8_t data[80] = {0};
    assert_error(qattn_buffer_upload(buf, 0, data, 65), QATTN_ERR_INVALID_ARGUMENT, ctx, "do not fit");
    assert_error(qattn_buffer_upload(buf, SIZE_MAX, data, 2), QATTN_ERR_INVALID_ARGUMENT, ctx, "do not fit");
    assert_error(qattn_buffer_upload(buf, 8, data, SIZE_MAX - 4), QATTN_ERR_INVALID_ARGUMENT, ctx, "do not fit");
    assert_error(qattn_buffer_upload(buf, 0, NULL, 4), QATTN_ERR_INVALID_ARGUMENT, ctx, "src");
    assert_error(qattn_buffer_download(buf, 0, NULL, 4), QATTN_ERR_INVALID_ARGUMENT, ctx, "dst");
    assert_error(qattn_buffer_fill(buf, 60, 8, 0), QATTN_ERR_INVALID_ARGUMENT, ctx, "do not fit");
    for (int i = 0; i < 64; i++)
        data[i] = (uint8_t)i;
    assert_int_equal(qattn_buffer_upload(buf, 0, data, 64), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(buf, 8, 8, 0xee), QATTN_OK);
    uint8_t back[64];
    assert_int_equal(qattn_buffer_download(buf, 0, back, 64), QATTN_OK);
    for (int i = 0; i < 64; i++)
        assert_int_equal(back[i], i >= 8 && i < 16 ? 0xee : i);
    qattn_buffer_destroy(buf);
    qattn_buffer_destroy(NULL);

    /* Wrapping caller memory (host memory on the CPU backend). */
    assert_error(qattn_buffer_wrap(ctx, NULL, 16, &buf), QATTN_ERR_INVALID_ARGUMENT, ctx, "native");
    assert_int_equal(qattn_buffer_wrap(ctx, data, sizeof(data), &buf), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(buf, 0, 4, 7), QATTN_OK);
    assert_int_equal(data[0], 7);
    qattn_buffer_destroy(buf); /* must not free caller memory (ASan would catch it) */
    qattn_ctx_destroy(ctx);
}

static void test_plan_validation(void **state)
{
    (void)state;
    qattn_ctx *ctx = cpu_ctx();
    qattn_plan *plan = NULL;
    qattn_attention_desc d = small_desc();
    assert_int_equal(qattn_plan_create(ctx, &d, &plan), QATTN_OK);
    qattn_plan_destroy(plan);

    assert_error(qattn_plan_create(ctx, NULL, &plan), QATTN_ERR_INVALID_ARGUMENT, ctx, "desc");
    assert_error(qattn_plan_create(NULL, &d, &plan), QATTN_ERR_INVALID_ARGUMENT, NULL, "ctx");
    assert_error(qattn_plan_create(ctx, &d, NULL), QATTN_ERR_INVALID_ARGUMENT, ctx, "out");

#define BAD(mutation, status, fragment)                                                                               \
    do {                                                                                                               \
        d = small_desc();                                                                                              \
        mutation;                                                                                                      \
        plan = (qattn_plan *)0x1;                                                                                      \
        assert_error(qattn_plan_create(ctx, &d, &plan), status, ctx, fragment);                                       \
        assert_null(plan);                                                                                             \
    } while (0)
    BAD(d.q.shape[2] = 0, QATTN_ERR_INVALID_ARGUMENT, "q.shape[2] (N) must be > 0");
    BAD(d.k.shape[0] = -1, QATTN_ERR_INVALID_ARGUMENT, "k.shape[0] (B) must be > 0");
    BAD(d.v.stride[3] = 2, QATTN_ERR_INVALID_ARGUMENT, "v.stride[3] must be 1");
    BAD(d.o.stride[1] = -64, QATTN_ERR_INVALID_ARGUMENT, "o.stride[1] (H) must be > 0");
    BAD(d.q.stride[2] = 32, QATTN_ERR_INVALID_ARGUMENT, "q strides overlap");
    BAD(d.q.dtype = (qattn_dtype)77, QATTN_ERR_INVALID_ARGUMENT, "q.dtype=77");
    BAD(d.k.dtype = QATTN_DTYPE_BF16, QATTN_ERR_INVALID_ARGUMENT, "dtypes differ");
    BAD(d.o.dtype = QATTN_DTYPE_BF16, QATTN_ERR_INVALID_ARGUMENT, "o.dtype=bf16");
    BAD((d.q.dtype = d.k.dtype = d.v.dtype = QATTN_DTYPE_I8), QATTN_ERR_UNSUPPORTED, "f32, f16 or bf16");
    BAD(d.k.shape[0] = 2, QATTN_ERR_INVALID_ARGUMENT, "batch sizes differ");
    BAD(d.v = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 41, 64), QATTN_ERR_INVALID_ARGUMENT, "must match k");
    BAD((d.k.shape[3] = 32, d.k = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 32)), QATTN_ERR_INVALID_ARGUMENT,
        "head dims differ");
    BAD(d.o = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 41, 64), QATTN_ERR_INVALID_ARGUMENT, "o shape");
    BAD((d.q = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 3, 40, 64), d.o = d.q), QATTN_ERR_INVALID_ARGUMENT,
        "multiple of k/v heads");
    BAD(d.sm_scale = NAN, QATTN_ERR_INVALID_ARGUMENT, "sm_scale");
    BAD(d.sm_scale = INFINITY, QATTN_ERR_INVALID_ARGUMENT, "sm_scale");
    BAD(d.precision = (qattn_precision)9, QATTN_ERR_INVALID_ARGUMENT, "precision=9");
    BAD(d.granularity = QATTN_GRANULARITY_PER_WARP, QATTN_ERR_INVALID_ARGUMENT, "quantized precisions only");
    BAD((d.precision = QATTN_PRECISION_INT8_FP8, d.granularity = (qattn_granularity)8), QATTN_ERR_INVALID_ARGUMENT,
        "granularity=8");
    BAD((d.precision = QATTN_PRECISION_INT8_FP8, d.smooth_k = (qattn_toggle)5), QATTN_ERR_INVALID_ARGUMENT,
        "smooth_k=5");
    BAD(d.flags = 0x80, QATTN_ERR_INVALID_ARGUMENT, "unknown bits");
    /* Shapes whose byte size overflows size_t. */
    BAD((d.q.shape[0] = d.k.shape[0] = d.v.shape[0] = d.o.shape[0] = INT64_C(1) << 40,
         d.q.stride[0] = d.k.stride[0] = d.v.stride[0] = d.o.stride[0] = INT64_C(1) << 40),
        QATTN_ERR_INVALID_ARGUMENT, "overflow");
    BAD((d.q = d.o = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, INT64_C(1) << 62, 64)), QATTN_ERR_INVALID_ARGUMENT,
        "q");
    /* A head dim the CPU kernels do not implement is unsupported, with the dims that are. */
    BAD((d.q = d.k = d.v = d.o = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 100)), QATTN_ERR_UNSUPPORTED,
        "head dim 100");
    /* Interleaved strides: H 65 and N 129 over [2, 40, 64] fail the quick
     * rule (129 < 2 x 65) but no two elements meet: accepted. H 63 puts
     * element (h 1, d 0) on (h 0, d 63): refused, naming both. */
    d = small_desc();
    d.q.stride[1] = 65;
    d.q.stride[2] = 129;
    assert_int_equal(qattn_plan_create(ctx, &d, &plan), QATTN_OK);
    qattn_plan_destroy(plan);
    BAD((d.q.stride[1] = 63, d.q.stride[2] = 129), QATTN_ERR_INVALID_ARGUMENT,
        "q strides overlap: elements [0, 0, 0, 63] and [0, 1, 0, 0] (B, H, N, D) share an address");
    /* Too many index combinations to test exactly: refused, saying so. */
    BAD((d.q.shape[0] = 40, d.q.shape[1] = 2000, d.q.shape[2] = 3000, d.q.stride[0] = INT64_C(1) << 30,
         d.q.stride[1] = 65, d.q.stride[2] = 129),
        QATTN_ERR_INVALID_ARGUMENT, "interleave too finely");
#undef BAD
    qattn_plan_destroy(NULL);
    qattn_ctx_destroy(ctx);
}

/* sm_scale * log2(e) is one fp32 factor in every kernel: a finite scale whose
 * factor overflows turned every score into Inf/NaN (found by tests/fuzz: a
 * plan with sm_scale = FLT_MAX ran and wrote zeros). Such scales are refused;
 * large ones below the bound still plan. */
static void test_sm_scale_range(void **state)
{
    (void)state;
    qattn_ctx *ctx = cpu_ctx();
    qattn_plan *plan = NULL;
    qattn_attention_desc d = small_desc();
    const float too_large[3] = {FLT_MAX, -FLT_MAX, 2.4e38f};
    for (int i = 0; i < 3; i++) {
        d.sm_scale = too_large[i];
        assert_error(qattn_plan_create(ctx, &d, &plan), QATTN_ERR_INVALID_ARGUMENT, ctx, "sm_scale");
        assert_null(plan);
    }
    d.sm_scale = 1e30f;
    assert_int_equal(qattn_plan_create(ctx, &d, &plan), QATTN_OK);
    qattn_plan_destroy(plan);

    qattn_paged_desc pd = {.cache = {.num_pages = 1, .page_size = 16, .heads_kv = 1, .head_dim = 64,
                                     .dtype = QATTN_DTYPE_F16},
                           .batch = 1, .max_pages_per_seq = 1, .total_q = 1, .max_q_len = 1, .heads_q = 1,
                           .q_dtype = QATTN_DTYPE_F16, .q_stride = {64, 64}, .o_stride = {64, 64},
                           .sm_scale = FLT_MAX};
    assert_error(qattn_paged_plan_create(ctx, &pd, &plan), QATTN_ERR_INVALID_ARGUMENT, ctx, "sm_scale");
    assert_null(plan);
    pd.sm_scale = 1e30f;
    assert_int_equal(qattn_paged_plan_create(ctx, &pd, &plan), QATTN_OK);
    qattn_plan_destroy(plan);
    qattn_ctx_destroy(ctx);
}

/* Offsets are checked against a buffer's start, but wrapped memory may start
 * anywhere: an f16 tensor or an int64 slot mapping wrapped at an odd address
 * reached the CPU kernels' typed loads misaligned (undefined behaviour; found
 * by tests/fuzz under UBSan). Such runs and appends are refused. */
static void test_wrapped_alignment(void **state)
{
    (void)state;
    qattn_ctx *ctx = cpu_ctx();
    qattn_attention_desc d = small_desc();
    qattn_plan *plan = NULL;
    assert_int_equal(qattn_plan_create(ctx, &d, &plan), QATTN_OK);
    const size_t qb = qattn_tensor_bytes(&d.q);
    uint8_t *raw = calloc(qb + 16, 1);
    qattn_buffer *q = NULL, *k = NULL, *v = NULL, *o = NULL;
    assert_int_equal(qattn_buffer_wrap(ctx, raw + 1, qb, &q), QATTN_OK); /* odd: misaligned for f16 */
    assert_int_equal(qattn_buffer_create(ctx, qb, &k), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, qb, &v), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, qb, &o), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(k, 0, qb, 0), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(v, 0, qb, 0), QATTN_OK);
    qattn_run_args args = {.q = q, .k = k, .v = v, .o = o};
    assert_error(qattn_run(plan, &args), QATTN_ERR_INVALID_ARGUMENT, ctx, "aligned");
    qattn_buffer_destroy(q);
    assert_int_equal(qattn_buffer_wrap(ctx, raw + 2, qb, &q), QATTN_OK); /* 2 bytes: aligned for f16 */
    args.q = q;
    assert_int_equal(qattn_run(plan, &args), QATTN_OK);

    qattn_kv_cache_desc cache = {.num_pages = 1, .page_size = 4, .heads_kv = 1, .head_dim = 16,
                                 .dtype = QATTN_DTYPE_F16};
    qattn_kv_cache_sizes sizes;
    assert_int_equal(qattn_kv_cache_bytes(ctx, &cache, &sizes), QATTN_OK);
    qattn_kv_cache_buffers bufs = {0};
    assert_int_equal(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.k), QATTN_OK);
    assert_int_equal(qattn_buffer_create(ctx, sizes.cache_bytes, &bufs.v), QATTN_OK);
    qattn_buffer *kn = NULL, *slots = NULL;
    assert_int_equal(qattn_buffer_create(ctx, 16 * 4, &kn), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(kn, 0, 16 * 4, 0), QATTN_OK);
    int64_t *slot_memory = calloc(2, sizeof(int64_t));
    assert_int_equal(qattn_buffer_wrap(ctx, (char *)slot_memory + 4, 8, &slots), QATTN_OK); /* int64 at 4 mod 8 */
    qattn_kv_append_args app = {.cache = &cache, .buffers = &bufs, .num_tokens = 1, .new_dtype = QATTN_DTYPE_F32,
                                .new_stride = {16, 16}, .k_new = kn, .v_new = kn, .slot_mapping = slots};
    assert_error(qattn_kv_append(ctx, &app), QATTN_ERR_INVALID_ARGUMENT, ctx, "aligned");
    qattn_buffer_destroy(slots);
    assert_int_equal(qattn_buffer_wrap(ctx, slot_memory, 8, &slots), QATTN_OK);
    app.slot_mapping = slots;
    assert_int_equal(qattn_kv_append(ctx, &app), QATTN_OK);

    qattn_buffer *all[] = {q, k, v, o, bufs.k, bufs.v, kn, slots};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        qattn_buffer_destroy(all[i]);
    qattn_plan_destroy(plan);
    qattn_ctx_destroy(ctx);
    free(raw);
    free(slot_memory);
}

static void test_plan_reporting(void **state)
{
    (void)state;
    qattn_ctx *ctx = cpu_ctx();
    qattn_attention_desc d = small_desc();
    d.precision = QATTN_PRECISION_AUTO;
    qattn_plan *plan = NULL;
    assert_int_equal(qattn_plan_create(ctx, &d, &plan), QATTN_OK);
    qattn_plan_info info;
    assert_int_equal(qattn_plan_get_info(plan, &info), QATTN_OK);
    assert_true(info.precision != QATTN_PRECISION_AUTO); /* the plan reports what auto chose */
    assert_true(strlen(info.kernel) > 0);
    assert_int_equal(info.workspace_bytes, qattn_plan_workspace_size(plan));
    char text[16];
    size_t full = qattn_plan_describe(plan, text, sizeof(text));
    assert_true(full > sizeof(text));
    assert_int_equal(strlen(text), sizeof(text) - 1); /* truncated, terminated */
    char *all = malloc(full + 1);
    assert_int_equal(qattn_plan_describe(plan, all, full + 1), full);
    assert_non_null(strstr(all, "auto chose"));
    free(all);
    assert_int_equal(qattn_plan_get_info(NULL, &info), QATTN_ERR_INVALID_ARGUMENT);
    qattn_plan_destroy(plan);

    d.precision = QATTN_PRECISION_INT8_FP8;
    assert_int_equal(qattn_plan_create(ctx, &d, &plan), QATTN_OK);
    qattn_plan_get_info(plan, &info);
    assert_int_equal(info.precision, QATTN_PRECISION_INT8_FP8);
    assert_true(info.granularity != QATTN_GRANULARITY_DEFAULT);
    assert_true(info.smooth_k);
    assert_true(info.workspace_bytes > 0);
    assert_true(info.v_fp8_max == 448.f && info.p_fp8_scale == 448.f);
    qattn_plan_destroy(plan);
    qattn_ctx_destroy(ctx);
}

typedef struct run_fixture {
    qattn_ctx *ctx;
    qattn_attention_desc desc;
    qattn_plan *plan;
    qattn_buffer *q, *k, *v, *o, *lse, *ws;
    size_t bytes;
    void *host;
} run_fixture;

static void run_setup(run_fixture *f, qattn_precision prec)
{
    memset(f, 0, sizeof(*f));
    f->ctx = cpu_ctx();
    f->desc = small_desc();
    f->desc.precision = prec;
    f->desc.return_lse = 1;
    assert_int_equal(qattn_plan_create(f->ctx, &f->desc, &f->plan), QATTN_OK);
    f->bytes = qattn_tensor_bytes(&f->desc.q);
    f->host = malloc(f->bytes);
    ref_rng rng;
    ref_rng_seed_auto(&rng);
    qattn_buffer **bufs[] = {&f->q, &f->k, &f->v, &f->o};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(qattn_buffer_create(f->ctx, f->bytes, bufs[i]), QATTN_OK);
        ref_fill_randn(f->host, &f->desc.q, &rng, 1.0, NULL);
        assert_int_equal(qattn_buffer_upload(*bufs[i], 0, f->host, f->bytes), QATTN_OK);
    }
    assert_int_equal(qattn_buffer_create(f->ctx, 2 * 40 * 4, &f->lse), QATTN_OK);
    size_t ws = qattn_plan_workspace_size(f->plan);
    if (ws)
        assert_int_equal(qattn_buffer_create(f->ctx, ws, &f->ws), QATTN_OK);
}

static void run_teardown(run_fixture *f)
{
    qattn_buffer *bufs[] = {f->q, f->k, f->v, f->o, f->lse, f->ws};
    for (int i = 0; i < 6; i++)
        qattn_buffer_destroy(bufs[i]);
    qattn_plan_destroy(f->plan);
    qattn_ctx_destroy(f->ctx);
    free(f->host);
}

static qattn_run_args good_args(const run_fixture *f)
{
    qattn_run_args a = {.q = f->q, .k = f->k, .v = f->v, .o = f->o, .lse = f->lse, .workspace = f->ws};
    return a;
}

static void test_run_arguments(void **state)
{
    (void)state;
    run_fixture f;
    run_setup(&f, QATTN_PRECISION_INT8_FP8);
    qattn_run_args a = good_args(&f);
    assert_int_equal(qattn_run(f.plan, &a), QATTN_OK);

    assert_error(qattn_run(NULL, &a), QATTN_ERR_INVALID_ARGUMENT, NULL, "plan");
    assert_error(qattn_run(f.plan, NULL), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "args");
    a = good_args(&f);
    a.k = NULL;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "args.k is NULL");
    a = good_args(&f);
    a.workspace = NULL;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "workspace");
    a = good_args(&f);
    a.lse = NULL;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "args.lse is NULL");
    a = good_args(&f);
    a.v_offset = 2;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "do not fit");
    a = good_args(&f);
    a.q_offset = SIZE_MAX - 1;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "do not fit");
    a = good_args(&f);
    a.o = f.q; /* output over an input */
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "args.o overlaps args.q");
    /* Two buffers that wrap one host region: o over q is seen and refused. */
    void *region = malloc(f.bytes);
    assert_int_equal(qattn_buffer_download(f.q, 0, region, f.bytes), QATTN_OK);
    qattn_buffer *wq = NULL, *wo = NULL;
    assert_int_equal(qattn_buffer_wrap(f.ctx, region, f.bytes, &wq), QATTN_OK);
    assert_int_equal(qattn_buffer_wrap(f.ctx, region, f.bytes, &wo), QATTN_OK);
    a = good_args(&f);
    a.q = wq;
    a.o = wo;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx,
                 "args.o overlaps args.q (two buffers over the same memory)");
    a.o = f.o;
    assert_int_equal(qattn_run(f.plan, &a), QATTN_OK);
    qattn_buffer_destroy(wq);
    qattn_buffer_destroy(wo);
    free(region);
    a = good_args(&f);
    a.stream = (void *)0x1;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "stream");

    /* A buffer too small for the tensor, and one from another context. */
    qattn_buffer *small = NULL;
    assert_int_equal(qattn_buffer_create(f.ctx, f.bytes - 2, &small), QATTN_OK);
    a = good_args(&f);
    a.o = small;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "args.o");
    qattn_buffer_destroy(small);
    qattn_ctx *other = cpu_ctx();
    qattn_buffer *foreign = NULL;
    assert_int_equal(qattn_buffer_create(other, f.bytes, &foreign), QATTN_OK);
    a = good_args(&f);
    a.o = foreign;
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "another context");
    qattn_buffer_destroy(foreign);
    qattn_ctx_destroy(other);
    run_teardown(&f);

    /* LSE given to a plan made without it. */
    run_setup(&f, QATTN_PRECISION_EXACT);
    qattn_plan_destroy(f.plan);
    f.desc.return_lse = 0;
    assert_int_equal(qattn_plan_create(f.ctx, &f.desc, &f.plan), QATTN_OK);
    a = good_args(&f);
    assert_error(qattn_run(f.plan, &a), QATTN_ERR_INVALID_ARGUMENT, f.ctx, "without return_lse");
    a.lse = NULL;
    assert_int_equal(qattn_run(f.plan, &a), QATTN_OK);
    run_teardown(&f);
}

/* NaN or Inf anywhere in Q, K or V: a clear error and untouched outputs; the
 * same context then runs clean data correctly. */
static void test_nonfinite_inputs(void **state)
{
    (void)state;
    const qattn_precision modes[] = {QATTN_PRECISION_EXACT, QATTN_PRECISION_INT8_FP8};
    for (int m = 0; m < 2; m++) {
        run_fixture f;
        run_setup(&f, modes[m]);
        const uint16_t bad_codes[] = {0x7e00, 0x7c00, 0xfc00}; /* fp16 nan, +inf, -inf */
        qattn_buffer *inputs[] = {f.q, f.k, f.v};
        const char *names[] = {"q", "k", "v"};
        void *saved = malloc(f.bytes);
        for (int i = 0; i < 3; i++) {
            qattn_buffer_download(inputs[i], 0, saved, f.bytes);
            uint16_t bad = bad_codes[i];
            size_t at = (size_t)(17 * 64 + 5) * 2;
            qattn_buffer_upload(inputs[i], at, &bad, 2);
            qattn_buffer_fill(f.o, 0, f.bytes, REF_POISON_BYTE);
            qattn_run_args a = good_args(&f);
            char want[8];
            snprintf(want, sizeof(want), "%s ", names[i]);
            assert_error(qattn_run(f.plan, &a), QATTN_ERR_NONFINITE_INPUT, f.ctx, want);
            uint8_t *o = malloc(f.bytes);
            qattn_buffer_download(f.o, 0, o, f.bytes);
            for (size_t b = 0; b < f.bytes; b++)
                assert_int_equal(o[b], REF_POISON_BYTE);
            free(o);
            qattn_buffer_upload(inputs[i], 0, saved, f.bytes);
        }
        /* Clean inputs again: the run succeeds and writes finite values everywhere. */
        qattn_run_args a = good_args(&f);
        assert_int_equal(qattn_run(f.plan, &a), QATTN_OK);
        uint16_t *o = malloc(f.bytes);
        qattn_buffer_download(f.o, 0, o, f.bytes);
        for (size_t e = 0; e < f.bytes / 2; e++)
            assert_true((o[e] & 0x7c00) != 0x7c00);
        free(o);
        free(saved);
        run_teardown(&f);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version_and_strings),
        cmocka_unit_test(test_backend_discovery),
        cmocka_unit_test(test_context_selection),
        cmocka_unit_test(test_buffers),
        cmocka_unit_test(test_plan_validation),
        cmocka_unit_test(test_sm_scale_range),
        cmocka_unit_test(test_wrapped_alignment),
        cmocka_unit_test(test_plan_reporting),
        cmocka_unit_test(test_run_arguments),
        cmocka_unit_test(test_nonfinite_inputs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
