/*
 * opencl_ws_check: the OpenCL quantization pass must reproduce the reference
 * quantization (src/quant.c) bit for bit. For each case it runs a plan on the
 * opencl backend, downloads the workspace, quantizes the same host inputs with
 * qattn_quantize_host under the same plan, and compares every region byte by
 * byte. It also checks that an OpenCL compiler error comes back as
 * QATTN_ERR_BACKEND with the build log in the message, and that common.cl's
 * div_rn (the quantizers' divisions) equals the host's fp32 division.
 * Exit 0: all good; 1: a failure (reported); 77: no OpenCL device.
 *
 *   opencl_ws_check [case-name-substring]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "opencl_internal.h"
#include "opencl_kernels.h"
#include "quant.h"
#include "reference.h"

typedef struct ws_case {
    const char *name;
    int64_t b, hq, hkv, nq, nk, d;
    qattn_dtype dt;
    int nhd, pad, kbias;
    qattn_precision prec;
    qattn_granularity gran;
    qattn_toggle smooth;
} ws_case;

static const ws_case cases[] = {
    {"fp8_warp_f16", 1, 2, 2, 200, 200, 128, QATTN_DTYPE_F16, 0, 0, 1, QATTN_PRECISION_INT8_FP8, 0, 0},
    {"fp8_block_gqa", 2, 4, 2, 257, 130, 64, QATTN_DTYPE_F16, 0, 0, 1, QATTN_PRECISION_INT8_FP8,
     QATTN_GRANULARITY_PER_BLOCK, 0},
    {"fp8_thread_bf16_nhd", 1, 4, 2, 150, 150, 128, QATTN_DTYPE_BF16, 1, 8, 0, QATTN_PRECISION_INT8_FP8,
     QATTN_GRANULARITY_PER_THREAD, 0},
    {"f16acc_f32", 1, 2, 1, 70, 90, 96, QATTN_DTYPE_F32, 0, 4, 1, QATTN_PRECISION_INT8_FP8_F16ACC, 0, 0},
    {"int8_fp16_kbias", 1, 2, 2, 129, 300, 128, QATTN_DTYPE_F16, 0, 0, 1, QATTN_PRECISION_INT8_FP16, 0, 0},
    {"int8_fp16_no_smooth", 1, 2, 2, 64, 64, 64, QATTN_DTYPE_BF16, 0, 0, 0, QATTN_PRECISION_INT8_FP16, 0,
     QATTN_OFF},
};

static qattn_tensor_desc make(const ws_case *c, int64_t h, int64_t n)
{
    int64_t row = c->d + c->pad;
    qattn_tensor_desc t = {.dtype = c->dt, .shape = {c->b, h, n, c->d}};
    t.stride[3] = 1;
    if (c->nhd) {
        t.stride[1] = row;
        t.stride[2] = h * row;
        t.stride[0] = n * h * row;
    } else {
        t.stride[2] = row;
        t.stride[1] = n * row;
        t.stride[0] = h * n * row;
    }
    return t;
}

static int compare_region(const char *cname, const char *rname, const uint8_t *got, const uint8_t *want,
                          size_t offset, size_t bytes)
{
    if (offset == QATTN_WS_ABSENT)
        return 0;
    for (size_t i = 0; i < bytes; i++)
        if (got[offset + i] != want[offset + i]) {
            size_t diffs = 0;
            for (size_t j = i; j < bytes; j++)
                diffs += got[offset + j] != want[offset + j];
            printf("%s: region %s differs at byte %zu (opencl 0x%02x, reference 0x%02x), %zu of %zu bytes differ\n",
                   cname, rname, i, got[offset + i], want[offset + i], diffs, bytes);
            return 1;
        }
    return 0;
}

/* A kernel that cannot compile: the error must name the call and carry the log. */
static int check_build_error(qattn_ctx *ctx)
{
    const char *parts[1] = {"kernel void broken(global float *x) { x[0] = undeclared_identifier_qattn; }\n"};
    cl_program prog = NULL;
    qattn_status s = qattn_opencl_get_program(ctx, "broken-test", parts, 1, "-cl-std=CL1.2", &prog);
    const char *msg = qattn_last_error(ctx);
    bool ok = s == QATTN_ERR_BACKEND && strstr(msg, "clBuildProgram") && strstr(msg, "CL_BUILD_PROGRAM_FAILURE") &&
              strstr(msg, "undeclared_identifier_qattn") && strlen(msg) < QATTN_ERROR_MAX;
    printf("%-22s %s (%s)\n", "build_error", ok ? "reported" : "NOT REPORTED", qattn_status_str(s));
    if (!ok)
        printf("  message: %s\n", msg);
    return ok ? 0 : 1;
}

static uint32_t rand_u32(ref_rng *rng) { return (uint32_t)(ref_rng_uniform(rng) * 4294967296.0); }

/* A float with a random mantissa and sign and a biased exponent in [lo, hi] (0: subnormal). */
static uint32_t rand_float_bits(ref_rng *rng, int lo, int hi, bool any_sign)
{
    uint32_t e = (uint32_t)(lo + (int)(ref_rng_uniform(rng) * (hi - lo + 1)));
    uint32_t sign = any_sign && ref_rng_uniform(rng) < 0.5 ? 0x80000000u : 0u;
    return sign | e << 23 | (rand_u32(rng) & 0x7fffffu);
}

/*
 * common.cl's div_rn, which every quantization scale and 1/scale goes
 * through, against the host's fp32 division bit for bit: random operands over
 * the whole range (subnormals, quotients that overflow or underflow), the
 * quantizers' own divisions (127, 448 or 1 by an amax, an amax by 127 or 448),
 * signed zeros, infinities and NaN.
 */
static int check_div_rn(qattn_ctx *ctx, ref_rng *rng)
{
    static const char kernel[] =
        "kernel void div_check(global const uint *a, global const uint *b, global uint *q, int n)\n"
        "{\n"
        "    int i = get_global_id(0);\n"
        "    if (i < n)\n"
        "        q[i] = as_uint(div_rn(as_float(a[i]), as_float(b[i])));\n"
        "}\n";
    enum { N = 1 << 20 };
    uint32_t *a = malloc(N * 4), *b = malloc(N * 4), *got = malloc(N * 4);
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
            a[i] = rand_float_bits(rng, 0, 254, true);
            b[i] = rand_float_bits(rng, 0, 254, true);
        } else if (kind < 5) { /* 127 / amax, 448 / amax, 1 / scale */
            float num = numerators[(i / 8) % 3];
            memcpy(&a[i], &num, 4);
            b[i] = rand_float_bits(rng, kind == 3 ? 1 : 0, kind == 3 ? 254 : 20, false);
        } else if (kind < 7) { /* amax / 127, amax / 448 */
            float den = numerators[(i / 8) % 2];
            a[i] = rand_float_bits(rng, kind == 5 ? 1 : 0, kind == 5 ? 254 : 20, false);
            memcpy(&b[i], &den, 4);
        } else { /* quotients near 1 (close mantissas): long runs of equal quotient bits */
            a[i] = rand_float_bits(rng, 100, 150, false);
            b[i] = (a[i] & 0xffff0000u) | (rand_u32(rng) & 0xffffu);
        }
    }
    const char *parts[2] = {qattn_opencl_src_common, kernel};
    cl_program prog = NULL;
    cl_kernel k = NULL;
    qattn_buffer *ba = NULL, *bb = NULL, *bq = NULL;
    qattn_status s = qattn_opencl_get_program(ctx, "div-check", parts, 2,
                                              "-cl-std=CL1.2 -DIN_DTYPE=0 -DOUT_DTYPE=0 -DHAS_FP16=0 -DHAS_FP64=0",
                                              &prog);
    if (!s)
        s = make_kernel(ctx, prog, "div_check", &k);
    if (!s)
        s = qattn_buffer_create(ctx, N * 4, &ba);
    if (!s)
        s = qattn_buffer_create(ctx, N * 4, &bb);
    if (!s)
        s = qattn_buffer_create(ctx, N * 4, &bq);
    if (!s)
        s = qattn_buffer_upload(ba, 0, a, N * 4);
    if (!s)
        s = qattn_buffer_upload(bb, 0, b, N * 4);
    if (!s) {
        arg_list al = args_for(impl_of(ctx), k, "div_check");
        arg_mem(&al, mem_of(ba));
        arg_mem(&al, mem_of(bb));
        arg_mem(&al, mem_of(bq));
        arg_int(&al, N);
        size_t local = 64, global = N;
        s = launch(ctx, &al, 1, &global, &local);
    }
    if (!s)
        s = qattn_ctx_synchronize(ctx);
    if (!s)
        s = qattn_buffer_download(bq, 0, got, N * 4);
    int bad = 0;
    if (s) {
        printf("%-22s %s\n", "div_rn", qattn_last_error(ctx));
        bad = 1;
    } else {
        size_t diffs = 0;
        for (int i = 0; i < N; i++) {
            float x, y, q;
            memcpy(&x, &a[i], 4);
            memcpy(&y, &b[i], 4);
            q = x / y;
            uint32_t want;
            memcpy(&want, &q, 4);
            float g;
            memcpy(&g, &got[i], 4);
            if (got[i] == want || (isnan(q) && isnan(g)))
                continue;
            if (diffs++ < 5)
                printf("div_rn: 0x%08x / 0x%08x (%.9g / %.9g): opencl 0x%08x, host 0x%08x\n", a[i], b[i], (double)x,
                       (double)y, got[i], want);
        }
        printf("%-22s %s (%d quotients, %zu differ from the host's fp32 division)\n", "div_rn",
               diffs ? "DIFFERS" : "bit-identical", N, diffs);
        bad = diffs != 0;
    }
    if (k)
        impl_of(ctx)->cl->clReleaseKernel(k);
    qattn_buffer_destroy(ba);
    qattn_buffer_destroy(bb);
    qattn_buffer_destroy(bq);
    free(a);
    free(b);
    free(got);
    return bad;
}

int main(int argc, char **argv)
{
    qattn_ctx *ctx = NULL;
    qattn_ctx_params params = {.backend = "opencl"};
    if (qattn_ctx_create(&params, &ctx)) {
        printf("SKIP: %s\n", qattn_last_error(NULL));
        return 77;
    }
    ref_rng rng;
    uint64_t seed = ref_rng_seed_auto(&rng);
    printf("opencl_ws_check, seed %llu\n", (unsigned long long)seed);
    int failures = 0, ran = 0;
    if (argc < 2 || strstr("build_error", argv[1])) {
        failures += check_build_error(ctx);
        ran++;
    }
    if (argc < 2 || strstr("div_rn", argv[1])) {
        failures += check_div_rn(ctx, &rng);
        ran++;
    }
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        const ws_case *c = &cases[ci];
        if (argc > 1 && !strstr(c->name, argv[1]))
            continue;
        qattn_attention_desc desc = {
            .q = make(c, c->hq, c->nq), .k = make(c, c->hkv, c->nk), .v = make(c, c->hkv, c->nk),
            .o = make(c, c->hq, c->nq), .precision = c->prec, .granularity = c->gran, .smooth_k = c->smooth,
        };
        const qattn_tensor_desc *in[3] = {&desc.q, &desc.k, &desc.v};
        void *host[3];
        double *bias = calloc((size_t)c->d, sizeof(double));
        for (int64_t i = 0; c->kbias && i < c->d; i++)
            bias[i] = 8.0 * ref_rng_normal(&rng);
        for (int i = 0; i < 3; i++) {
            host[i] = ref_tensor_alloc(in[i]);
            memset(host[i], 0, qattn_tensor_bytes(in[i]));
            ref_fill_randn(host[i], in[i], &rng, 1.0, i == 1 ? bias : NULL);
        }
        qattn_plan *plan = NULL;
        if (qattn_plan_create(ctx, &desc, &plan)) {
            printf("%s: plan: %s\n", c->name, qattn_last_error(ctx));
            failures++;
            continue;
        }
        const qattn_workspace_layout *L = &plan->ws;
        qattn_buffer *buf[4] = {NULL}, *ws = NULL;
        int bad = 0;
        for (int i = 0; i < 4; i++)
            bad |= qattn_buffer_create(ctx, qattn_tensor_bytes(i < 3 ? in[i] : &desc.o), &buf[i]) != QATTN_OK;
        bad |= qattn_buffer_create(ctx, L->total, &ws) != QATTN_OK;
        for (int i = 0; i < 3 && !bad; i++)
            bad |= qattn_buffer_upload(buf[i], 0, host[i], qattn_tensor_bytes(in[i])) != QATTN_OK;
        /* Poison the workspace so a region the kernels forget shows up. */
        bad |= qattn_buffer_fill(ws, 0, L->total, 0xA5) != QATTN_OK;
        qattn_run_args args = {.q = buf[0], .k = buf[1], .v = buf[2], .o = buf[3], .workspace = ws};
        bad |= qattn_run(plan, &args) != QATTN_OK || qattn_ctx_synchronize(ctx) != QATTN_OK;
        uint8_t *got = malloc(L->total), *want = calloc(1, L->total);
        bad |= qattn_buffer_download(ws, 0, got, L->total) != QATTN_OK;
        if (bad) {
            printf("%s: run: %s\n", c->name, qattn_last_error(ctx));
            failures++;
        } else {
            qattn_quantize_host(plan, host[0], host[1], host[2], want, 1);
            const qattn_problem *p = &plan->problem;
            size_t B = (size_t)p->batch, Hq = (size_t)p->heads_q, Hk = (size_t)p->heads_kv, D = (size_t)p->head_dim;
            size_t Nq = (size_t)p->seq_q, Nk = (size_t)p->seq_k;
            bool fp8 = plan->precision != QATTN_PRECISION_INT8_FP16;
            int f = 0;
            f += compare_region(c->name, "q_i8", got, want, L->q_i8, B * Hq * Nq * D);
            f += compare_region(c->name, "k_i8", got, want, L->k_i8, B * Hk * Nk * D);
            f += compare_region(c->name, "v_q", got, want, L->v_q,
                                fp8 ? B * Hk * D * (size_t)L->v_keys_padded : B * Hk * Nk * D * 2);
            f += compare_region(c->name, "q_scale", got, want, L->q_scale, B * Hq * (size_t)L->q_groups * 4);
            f += compare_region(c->name, "k_scale", got, want, L->k_scale, B * Hk * (size_t)L->k_groups * 4);
            f += compare_region(c->name, "v_scale", got, want, L->v_scale, B * Hk * D * 4);
            f += compare_region(c->name, "k_mean", got, want, L->k_mean, B * Hk * D * 4);
            f += compare_region(c->name, "q_kmean", got, want, L->q_kmean, B * Hq * Nq * 4);
            printf("%-22s %-16s %-10s %s\n", c->name, qattn_precision_name(plan->precision),
                   qattn_granularity_name(plan->granularity), f ? "DIFFERS" : "bit-identical");
            failures += f != 0;
        }
        ran++;
        free(got);
        free(want);
        for (int i = 0; i < 4; i++)
            qattn_buffer_destroy(buf[i]);
        qattn_buffer_destroy(ws);
        qattn_plan_destroy(plan);
        for (int i = 0; i < 3; i++)
            free(host[i]);
        free(bias);
    }
    qattn_ctx_destroy(ctx);
    printf("%d passed, %d failed\n", ran - failures, failures);
    return failures ? 1 : 0;
}
