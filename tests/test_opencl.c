/*
 * What only the OpenCL backend has (`test_opencl`; exit 77 without an OpenCL
 * device; built only with the OpenCL backend):
 *
 * build_error: a kernel that does not compile comes back from
 *   qattn_opencl_get_program as QATTN_ERR_BACKEND, the message naming
 *   clBuildProgram and CL_BUILD_PROGRAM_FAILURE and carrying the compiler's
 *   log (the undeclared identifier), within QATTN_ERROR_MAX.
 * div_rn: common.cl's div_rn, which every quantization scale and 1/scale goes
 *   through, equals the host's fp32 division bit for bit on 2^20 operand
 *   pairs: every pair of special operands (signed zeros, infinities, NaN,
 *   subnormals, the largest finite), random operands over the whole range
 *   (quotients that overflow or underflow), the quantizers' own divisions
 *   (127, 448 or 1 by an amax, an amax by 127 or 448) and quotients near 1.
 *
 * wrapped_aliasing: two qattn buffers over one cl_mem, or over a buffer and
 *   its sub-buffer, are seen as the same memory: an output over an input of
 *   qattn_run is refused, side by side is fine.
 *
 * The OpenCL quantization pass and paged KV cache are checked by the shared
 * suites: test_workspace opencl, test_paged opencl, test_paged_vs_cpu opencl.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "opencl_internal.h"
#include "opencl_kernels.h"
#include "reference.h"

static qattn_ctx *ctx;
static ref_rng rng;

static void build_error(void **state)
{
    (void)state;
    const char *parts[1] = {"kernel void broken(global float *x) { x[0] = undeclared_identifier_qattn; }\n"};
    cl_program prog = NULL;
    qattn_status s = qattn_opencl_get_program(ctx, "broken-test", parts, 1, "-cl-std=CL1.2", &prog);
    const char *msg = qattn_last_error(ctx);
    print_message("  %s: %s\n", qattn_status_str(s), msg);
    assert_int_equal(s, QATTN_ERR_BACKEND);
    assert_non_null(strstr(msg, "clBuildProgram"));
    assert_non_null(strstr(msg, "CL_BUILD_PROGRAM_FAILURE"));
    assert_non_null(strstr(msg, "undeclared_identifier_qattn"));
    assert_true(strlen(msg) < QATTN_ERROR_MAX);
}

static uint32_t rand_u32(void) { return (uint32_t)(ref_rng_uniform(&rng) * 4294967296.0); }

/* A float with a random mantissa and sign and a biased exponent in [lo, hi] (0: subnormal). */
static uint32_t rand_float_bits(int lo, int hi, bool any_sign)
{
    uint32_t e = (uint32_t)(lo + (int)(ref_rng_uniform(&rng) * (hi - lo + 1)));
    uint32_t sign = any_sign && ref_rng_uniform(&rng) < 0.5 ? 0x80000000u : 0u;
    return sign | e << 23 | (rand_u32() & 0x7fffffu);
}

/* Runs div_rn over the operand pairs on the device: got[i] = div_rn(a[i], b[i]). */
static void device_div_rn(const uint32_t *a, const uint32_t *b, uint32_t *got, int n)
{
    static const char kernel[] = "kernel void div_check(global const uint *a, global const uint *b, global uint *q, "
                                 "int n)\n"
                                 "{\n"
                                 "    int i = get_global_id(0);\n"
                                 "    if (i < n)\n"
                                 "        q[i] = as_uint(div_rn(as_float(a[i]), as_float(b[i])));\n"
                                 "}\n";
    const char *parts[2] = {qattn_opencl_src_common, kernel};
    cl_program prog = NULL;
    cl_kernel k = NULL;
    qattn_buffer *ba = NULL, *bb = NULL, *bq = NULL;
    const size_t bytes = (size_t)n * 4;
    qattn_status s = qattn_opencl_get_program(ctx, "div-check", parts, 2,
                                              "-cl-std=CL1.2 -DIN_DTYPE=0 -DOUT_DTYPE=0 -DHAS_FP16=0 -DHAS_FP64=0",
                                              &prog);
    if (!s)
        s = make_kernel(ctx, prog, "div_check", &k);
    if (!s)
        s = qattn_buffer_create(ctx, bytes, &ba);
    if (!s)
        s = qattn_buffer_create(ctx, bytes, &bb);
    if (!s)
        s = qattn_buffer_create(ctx, bytes, &bq);
    if (!s)
        s = qattn_buffer_upload(ba, 0, a, bytes);
    if (!s)
        s = qattn_buffer_upload(bb, 0, b, bytes);
    if (!s) {
        arg_list al = args_for(impl_of(ctx), k, "div_check");
        arg_mem(&al, mem_of(ba));
        arg_mem(&al, mem_of(bb));
        arg_mem(&al, mem_of(bq));
        arg_int(&al, n);
        size_t local = 64, global = (size_t)n;
        s = launch(ctx, &al, 1, &global, &local);
    }
    if (!s)
        s = qattn_ctx_synchronize(ctx);
    if (!s)
        s = qattn_buffer_download(bq, 0, got, bytes);
    if (k)
        impl_of(ctx)->cl->clReleaseKernel(k);
    qattn_buffer_destroy(ba);
    qattn_buffer_destroy(bb);
    qattn_buffer_destroy(bq);
    if (s)
        fail_msg("div_rn on the device: %s: %s", qattn_status_str(s), qattn_last_error(ctx));
}

static void div_rn(void **state)
{
    (void)state;
    enum { N = 1 << 20 };
    uint32_t *a = malloc(N * 4), *b = malloc(N * 4), *got = malloc(N * 4);
    assert_true(a && b && got);
    static const uint32_t special[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                       0x00000001u, 0x007fffffu, 0x00800000u, 0x7f7fffffu, 0x3f800000u};
    enum { NS = sizeof(special) / sizeof(special[0]) };
    static const float numerators[] = {127.0f, 448.0f, 1.0f};
    for (int i = 0; i < N; i++) {
        int kind = i % 8;
        if (i < NS * NS) { /* every pair of special operands */
            a[i] = special[i / NS];
            b[i] = special[i % NS];
        } else if (kind < 3) { /* anything finite */
            a[i] = rand_float_bits(0, 254, true);
            b[i] = rand_float_bits(0, 254, true);
        } else if (kind < 5) { /* 127 / amax, 448 / amax, 1 / scale */
            float num = numerators[(i / 8) % 3];
            memcpy(&a[i], &num, 4);
            b[i] = rand_float_bits(kind == 3 ? 1 : 0, kind == 3 ? 254 : 20, false);
        } else if (kind < 7) { /* amax / 127, amax / 448 */
            float den = numerators[(i / 8) % 2];
            a[i] = rand_float_bits(kind == 5 ? 1 : 0, kind == 5 ? 254 : 20, false);
            memcpy(&b[i], &den, 4);
        } else { /* quotients near 1 (close mantissas): long runs of equal quotient bits */
            a[i] = rand_float_bits(100, 150, false);
            b[i] = (a[i] & 0xffff0000u) | (rand_u32() & 0xffffu);
        }
    }
    device_div_rn(a, b, got, N);
    size_t diffs = 0;
    for (int i = 0; i < N; i++) {
        float x, y, g;
        memcpy(&x, &a[i], 4);
        memcpy(&y, &b[i], 4);
        memcpy(&g, &got[i], 4);
        const float q = x / y;
        uint32_t want;
        memcpy(&want, &q, 4);
        if (got[i] == want || (isnan(q) && isnan(g)))
            continue;
        if (diffs++ < 5)
            print_message("  div_rn: 0x%08x / 0x%08x (%.9g / %.9g): opencl 0x%08x, host 0x%08x\n", a[i], b[i],
                          (double)x, (double)y, got[i], want);
    }
    print_message("  div_rn: %d quotients, %zu differ from the host's fp32 division\n", N, diffs);
    free(a);
    free(b);
    free(got);
    assert_int_equal(diffs, 0);
}

static void wrapped_aliasing(void **state)
{
    (void)state;
    ocl_ctx *c = impl_of(ctx);
    cl_int err = CL_SUCCESS;
    cl_mem root = c->cl->clCreateBuffer(c->context, CL_MEM_READ_WRITE, 32768, NULL, &err);
    assert_int_equal(err, CL_SUCCESS);
    cl_buffer_region region = {.origin = 4096, .size = 16384}; /* 4096: a multiple of every base alignment */
    cl_mem sub = c->cl->clCreateSubBuffer(root, CL_MEM_READ_WRITE, CL_BUFFER_CREATE_TYPE_REGION, &region, &err);
    assert_int_equal(err, CL_SUCCESS);
    qattn_attention_desc d = {.q = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64),
                              .k = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64),
                              .v = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64),
                              .o = qattn_tensor_hnd(QATTN_DTYPE_F16, 1, 2, 40, 64)};
    const size_t bytes = qattn_tensor_bytes(&d.q); /* 10240 */
    qattn_plan *plan = NULL;
    assert_int_equal(qattn_plan_create(ctx, &d, &plan), QATTN_OK);
    qattn_buffer *whole = NULL, *again = NULL, *part = NULL, *kv = NULL, *ws = NULL;
    assert_int_equal(qattn_buffer_wrap(ctx, root, 32768, &whole), QATTN_OK);
    assert_int_equal(qattn_buffer_wrap(ctx, root, 32768, &again), QATTN_OK);
    assert_int_equal(qattn_buffer_wrap(ctx, sub, 16384, &part), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(whole, 0, 32768, 0), QATTN_OK); /* zeros: finite inputs */
    assert_int_equal(qattn_buffer_create(ctx, bytes, &kv), QATTN_OK);
    assert_int_equal(qattn_buffer_fill(kv, 0, bytes, 0), QATTN_OK);
    if (qattn_plan_workspace_size(plan))
        assert_int_equal(qattn_buffer_create(ctx, qattn_plan_workspace_size(plan), &ws), QATTN_OK);
    qattn_run_args a = {.q = whole, .k = kv, .v = kv, .o = again, .o_offset = 8192, .workspace = ws};
    assert_int_equal(qattn_run(plan, &a), QATTN_ERR_INVALID_ARGUMENT); /* [8192, 18432) over q's [0, 10240) */
    assert_non_null(strstr(qattn_last_error(ctx), "same memory"));
    a.o_offset = 12288;
    assert_int_equal(qattn_run(plan, &a), QATTN_OK);
    a.o = part; /* root bytes [4096, 14336): over q */
    a.o_offset = 0;
    assert_int_equal(qattn_run(plan, &a), QATTN_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(qattn_last_error(ctx), "args.o overlaps args.q"));
    a.o_offset = 6144; /* root bytes [10240, 20480): beside q */
    assert_int_equal(qattn_run(plan, &a), QATTN_OK);
    assert_int_equal(qattn_ctx_synchronize(ctx), QATTN_OK);
    qattn_buffer *all[] = {whole, again, part, kv, ws};
    for (int i = 0; i < 5; i++)
        qattn_buffer_destroy(all[i]);
    qattn_plan_destroy(plan);
    c->cl->clReleaseMemObject(sub);
    c->cl->clReleaseMemObject(root);
}

int main(void)
{
    char *argv[] = {"test_opencl", "opencl", NULL};
    int early = ref_backend_context(2, argv, "test_opencl", &ctx);
    if (early >= 0)
        return early;
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("OpenCL-specific checks, seed %llu (QATTN_TEST_SEED repeats it)\n", (unsigned long long)seed);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(build_error),
        cmocka_unit_test(div_rn),
        cmocka_unit_test(wrapped_aliasing),
    };
    int failed = cmocka_run_group_tests_name("opencl", tests, NULL, NULL);
    qattn_ctx_destroy(ctx);
    return failed ? 1 : 0;
}
