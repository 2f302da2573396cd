/*
 * The emulator build of the paged kernels: paged_rt.h on host memory, each
 * launch run block by block through pa_emu, and the same host code as the
 * CUDA build (paged_host.inc). The SM count and resident blocks per SM are
 * those of an H200 (132 SMs, 228 KiB of shared memory each) unless
 * PA_EMU_SMS says otherwise, so the planner makes the choices it makes there.
 */
#define PA_EMULATE 1
#define PA_ENTRY(name) qa_paged_emu_##name
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "paged_kernels.cuh"
#include "paged_rt.h"
#include "internal.h"

extern "C" {
qattn_status qa_paged_emu_kv_append(qattn_ctx *ctx, const qattn_kv_append_args *args, const qattn_kv_cache_sizes *sizes);
qattn_status qa_paged_emu_plan_init(qattn_ctx *ctx, qattn_plan *plan);
qattn_status qa_paged_emu_run(qattn_ctx *ctx, const qattn_plan *plan, const qattn_paged_args *args);
qattn_status qa_paged_emu_merge_states(qattn_ctx *ctx, const qattn_merge_desc *desc, const qattn_merge_args *args);
}

static uint32_t pa_append_status_words[QATTN_STATUS_WORDS];

static const char *pa_rt_error_text(int code, int *lost, int *oom)
{
    static char text[64];
    *lost = 0;
    *oom = 0;
    snprintf(text, sizeof(text), "emulated runtime error %d", code);
    return text;
}

static int pa_rt_set_device(int device)
{
    (void)device;
    return 0;
}
static int pa_rt_pending_error(void) { return 0; }

static int pa_rt_memset(void *dst, int value, size_t bytes, pa_stream stream)
{
    (void)stream;
    memset(dst, value, bytes);
    return 0;
}

static int pa_rt_read(void *dst, const void *src, size_t bytes, pa_stream stream)
{
    (void)stream;
    memcpy(dst, src, bytes);
    return 0;
}

static int pa_rt_sm_count(int device, int *sms)
{
    (void)device;
    const char *env = getenv("PA_EMU_SMS");
    *sms = env && atoi(env) > 0 ? atoi(env) : 132;
    return 0;
}

static int pa_rt_attn_prepare(int fmt, int head_dim, int smem, int *blocks_per_sm)
{
    (void)fmt;
    (void)head_dim;
    const int per_sm = 228 * 1024, reserved = 1024, limit = 227 * 1024;
    *blocks_per_sm = smem > limit ? 0 : per_sm / (smem + reserved);
    if (*blocks_per_sm > 16)
        *blocks_per_sm = 16;
    return 0;
}

template <int F, int D> static void pa_run_attn(long long grid, int smem, const pa_attn_params &p)
{
    pa_emu::launch(grid, PA_THREADS, (size_t)smem, [&] { pa_attn_body<F, D>(p); });
}

static int pa_rt_launch_attn(int fmt, int head_dim, long long grid, int smem, const pa_attn_params *p, pa_stream stream)
{
    (void)stream;
#define PA_CASE(F)                                                                                                     \
    case F:                                                                                                            \
        if (head_dim == 64)                                                                                            \
            pa_run_attn<F, 64>(grid, smem, *p);                                                                        \
        else                                                                                                           \
            pa_run_attn<F, 128>(grid, smem, *p);                                                                       \
        return 0;
    switch (fmt) {
        PA_CASE(PA_FMT_F16)
        PA_CASE(PA_FMT_BF16)
        PA_CASE(PA_FMT_FP8)
        PA_CASE(PA_FMT_I8)
        PA_CASE(PA_FMT_I8_ROW)
    default: return 1;
    }
#undef PA_CASE
}

static int pa_rt_launch_check(long long grid, const pa_check_params *p, pa_stream stream)
{
    (void)stream;
    pa_emu::launch(grid, PA_THREADS, 0, [&] { pa_check_body(*p); });
    return 0;
}

static int pa_rt_launch_merge(long long grid, const pa_merge_params *p, pa_stream stream)
{
    (void)stream;
    pa_emu::launch(grid, PA_THREADS, 0, [&] { pa_merge_body(*p); });
    return 0;
}

static int pa_rt_launch_append_check(long long grid, long long dup_blocks, const pa_append_params *p, pa_stream stream)
{
    (void)stream;
    pa_emu::launch(grid, PA_THREADS, PA_THREADS * 8, [&] { pa_append_check_body(*p, dup_blocks); });
    return 0;
}

static int pa_rt_launch_append_write(long long grid, const pa_append_params *p, pa_stream stream)
{
    (void)stream;
    pa_emu::launch(grid, PA_THREADS, 0, [&] { pa_append_write_body(*p); });
    return 0;
}

static uint32_t *pa_rt_append_status(void) { return pa_append_status_words; }

#include "paged_host.inc"
