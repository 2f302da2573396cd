/*
 * The runtime calls the paged host code makes, behind small functions so the
 * same host code (paged_host.inc) runs on CUDA (paged_cuda.cu) and on the CPU
 * emulator (paged_emu_rt.cpp). Every function returns 0 on success, else a
 * runtime error code for pa_rt_error_text. Static: each build defines them in
 * the translation unit that includes paged_host.inc.
 */
#ifndef QATTN_PAGED_RT_H
#define QATTN_PAGED_RT_H

#include <stddef.h>

#include "paged_params.h"

typedef void *pa_stream; /* a cudaStream_t; NULL: the legacy default stream */

/* Text of a runtime error; *lost is set when the CUDA context is unusable, *oom when memory ran out. */
static const char *pa_rt_error_text(int code, int *lost, int *oom);
static int pa_rt_set_device(int device);
static int pa_rt_pending_error(void); /* an error left by earlier work (cleared unless sticky) */
static int pa_rt_memset(void *dst, int value, size_t bytes, pa_stream stream);
/* Device -> host copy on the stream, then waits for the stream. */
static int pa_rt_read(void *dst, const void *src, size_t bytes, pa_stream stream);
static int pa_rt_sm_count(int device, int *sms);
/* Raises the attention kernel's shared-memory limit to smem and reports its resident blocks per SM. */
static int pa_rt_attn_prepare(int fmt, int head_dim, int smem, int *blocks_per_sm);
static int pa_rt_launch_attn(int fmt, int head_dim, long long grid, int smem, const pa_attn_params *p, pa_stream stream);
static int pa_rt_launch_check(long long grid, const pa_check_params *p, pa_stream stream);
static int pa_rt_launch_merge(long long grid, const pa_merge_params *p, pa_stream stream);
static int pa_rt_launch_append_check(long long grid, long long dup_blocks, const pa_append_params *p, pa_stream stream);
static int pa_rt_launch_append_write(long long grid, const pa_append_params *p, pa_stream stream);
/* Device address of the append check's status words (QATTN_STATUS_WORDS, static device memory). */
static uint32_t *pa_rt_append_status(void);

#endif
