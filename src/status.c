/* Status strings, last-error messages, logging and small public helpers. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "env.h"
#include "internal.h"

#define STR_(x) #x
#define STR(x) STR_(x)

const char *qattn_version(void)
{
    return STR(QATTN_VERSION_MAJOR) "." STR(QATTN_VERSION_MINOR) "." STR(QATTN_VERSION_PATCH);
}

unsigned qattn_version_number(void) { return QATTN_VERSION_NUMBER; }

const char *qattn_status_str(qattn_status status)
{
    switch (status) {
    case QATTN_OK: return "QATTN_OK";
    case QATTN_ERR_INVALID_ARGUMENT: return "QATTN_ERR_INVALID_ARGUMENT";
    case QATTN_ERR_UNSUPPORTED: return "QATTN_ERR_UNSUPPORTED";
    case QATTN_ERR_OUT_OF_MEMORY: return "QATTN_ERR_OUT_OF_MEMORY";
    case QATTN_ERR_BACKEND: return "QATTN_ERR_BACKEND";
    case QATTN_ERR_DEVICE_LOST: return "QATTN_ERR_DEVICE_LOST";
    case QATTN_ERR_NOT_FOUND: return "QATTN_ERR_NOT_FOUND";
    case QATTN_ERR_UNAVAILABLE: return "QATTN_ERR_UNAVAILABLE";
    case QATTN_ERR_NONFINITE_INPUT: return "QATTN_ERR_NONFINITE_INPUT";
    case QATTN_ERR_INTERNAL: return "QATTN_ERR_INTERNAL";
    }
    return "QATTN_ERR_UNKNOWN_STATUS";
}

/* The calling thread's last error, and the context it concerned (NULL when
 * none): a thread that shares a context with others reads its own failure. */
static _Thread_local char thread_error[QATTN_ERROR_MAX];
static _Thread_local const qattn_ctx *thread_error_ctx;

qattn_status qattn_set_errorv(qattn_ctx *ctx, qattn_status status, const char *fmt, va_list ap)
{
    char msg[QATTN_ERROR_MAX];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    memcpy(thread_error, msg, sizeof(msg));
    thread_error_ctx = ctx;
    if (ctx) {
        pthread_mutex_t *lock = ctx->error_lock;
        if (lock)
            pthread_mutex_lock(lock);
        memcpy(ctx->error, msg, sizeof(msg));
        if (lock)
            pthread_mutex_unlock(lock);
    }
    qattn_log(QATTN_LOG_DEBUG, "%s: %s", qattn_status_str(status), msg);
    return status;
}

qattn_status qattn_set_error(qattn_ctx *ctx, qattn_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    qattn_status s = qattn_set_errorv(ctx, status, fmt, ap);
    va_end(ap);
    return s;
}

qattn_status qattn_nonfinite_error(qattn_ctx *ctx, uint32_t flags)
{
    if (flags & QATTN_NONFINITE_NEW_KV)
        return qattn_set_error(ctx, QATTN_ERR_NONFINITE_INPUT,
                               "k_new or v_new contains NaN or Inf; the cache was not written");
    static const char *const names[3] = {"q", "k", "v"};
    char which[16] = "";
    int named = 0;
    for (int i = 0; i < 3; i++)
        if (flags & (1u << i)) {
            size_t used = strlen(which);
            snprintf(which + used, sizeof(which) - used, "%s%s", named++ ? ", " : "", names[i]);
        }
    if (!named) /* no input named: say it is one of them, not an empty name */
        snprintf(which, sizeof(which), "q, k or v");
    return qattn_set_error(ctx, QATTN_ERR_NONFINITE_INPUT,
                           "%s contain%s NaN or Inf; outputs were not written (set QATTN_FLAG_NO_FINITE_CHECK to "
                           "skip this scan)",
                           which, named > 1 ? "" : "s");
}

void qattn_clear_error(qattn_ctx *ctx)
{
    thread_error[0] = '\0';
    (void)ctx; /* a context keeps its last failure until the next one */
}

const char *qattn_last_error(const qattn_ctx *ctx)
{
    if (!ctx || ctx == thread_error_ctx)
        return thread_error;
    return ctx->error; /* the context's latest failure, from another thread */
}

void qattn_log(qattn_log_level level, const char *fmt, ...)
{
    qattn_env env;
    qattn_env_read(&env, NULL);
    if (level > env.log)
        return;
    static const char *const names[] = {"error", "warn", "info", "debug"};
    char line[QATTN_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "qattn[%s]: %s\n", names[level], line);
}

size_t qattn_dtype_size(qattn_dtype dtype)
{
    switch (dtype) {
    case QATTN_DTYPE_F32: return 4;
    case QATTN_DTYPE_F16:
    case QATTN_DTYPE_BF16: return 2;
    case QATTN_DTYPE_I8:
    case QATTN_DTYPE_FP8_E4M3: return 1;
    }
    return 0;
}

const char *qattn_dtype_name(qattn_dtype dtype)
{
    switch (dtype) {
    case QATTN_DTYPE_F32: return "f32";
    case QATTN_DTYPE_F16: return "f16";
    case QATTN_DTYPE_BF16: return "bf16";
    case QATTN_DTYPE_I8: return "i8";
    case QATTN_DTYPE_FP8_E4M3: return "fp8e4m3";
    }
    return "?";
}

const char *qattn_precision_name(qattn_precision p)
{
    switch (p) {
    case QATTN_PRECISION_AUTO: return "auto";
    case QATTN_PRECISION_EXACT: return "exact";
    case QATTN_PRECISION_INT8_FP16: return "int8_fp16";
    case QATTN_PRECISION_INT8_FP8: return "int8_fp8";
    case QATTN_PRECISION_INT8_FP8_F16ACC: return "int8_fp8_f16acc";
    }
    return "?";
}

const char *qattn_granularity_name(qattn_granularity g)
{
    switch (g) {
    case QATTN_GRANULARITY_DEFAULT: return "default";
    case QATTN_GRANULARITY_PER_BLOCK: return "per_block";
    case QATTN_GRANULARITY_PER_WARP: return "per_warp";
    case QATTN_GRANULARITY_PER_THREAD: return "per_thread";
    }
    return "?";
}

int qattn_host_cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
