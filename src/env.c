/* The one place that reads the environment. Keep README.md's table in step. */
#include "env.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* A decimal integer in [lo, hi] and nothing else: no sign, no spaces (strtol
 * would take " 4" and "+4"), no overflow. */
static bool parse_count(const char *text, long lo, long hi, int *out)
{
    if (!(text[0] >= '0' && text[0] <= '9'))
        return false;
    errno = 0;
    char *end = NULL;
    long n = strtol(text, &end, 10);
    if (errno || *end != '\0' || n < lo || n > hi)
        return false;
    *out = (int)n;
    return true;
}

static const char *nonempty(const char *name)
{
    const char *v = getenv(name);
    return (v && *v) ? v : NULL;
}

void qattn_env_read(qattn_env *env, const char **bad)
{
    memset(env, 0, sizeof(*env));
    env->log = QATTN_LOG_WARN;
    env->vulkan_coopmat = true;
    if (bad)
        *bad = NULL;

    env->backend = nonempty("QATTN_BACKEND");
    env->device = nonempty("QATTN_DEVICE");
    env->opencl_cache = nonempty("QATTN_OPENCL_CACHE");

    const char *log = nonempty("QATTN_LOG");
    if (log) {
        static const char *const levels[] = {"error", "warn", "info", "debug"};
        bool found = false;
        for (int i = 0; i < 4; i++)
            if (strcmp(log, levels[i]) == 0) {
                env->log = (qattn_log_level)i;
                found = true;
            }
        if (!found && bad)
            *bad = "QATTN_LOG";
    }

    /* Invalid: -1, an error only where no qattn_ctx_params.num_threads overrides it. */
    const char *threads = nonempty("QATTN_NUM_THREADS");
    if (threads && !parse_count(threads, 1, 4096, &env->num_threads))
        env->num_threads = -1;

    env->cuda_emu_cc = 89;
    env->cuda_emu_sms = 132;
    const struct {
        const char *name;
        int *value;
        long lo, hi;
    } ints[] = {{"QATTN_CUDA_EMU_CC", &env->cuda_emu_cc, 80, 120}, {"QATTN_CUDA_EMU_SMS", &env->cuda_emu_sms, 1, 1024}};
    for (int i = 0; i < 2; i++) {
        const char *text = nonempty(ints[i].name);
        if (!text)
            continue;
        if (!parse_count(text, ints[i].lo, ints[i].hi, ints[i].value) && bad)
            *bad = ints[i].name;
    }

    const char *coopmat = nonempty("QATTN_VULKAN_COOPMAT");
    if (coopmat) {
        if (strcmp(coopmat, "0") == 0)
            env->vulkan_coopmat = false;
        else if (strcmp(coopmat, "1") != 0 && bad)
            *bad = "QATTN_VULKAN_COOPMAT";
    }

    /* Switches of 0 or 1: Vulkan validation layers (off), the sm_90a CUDA kernels (on), CUDA sparse
     * attention and decode-time pruning (off until a GPU run has measured them). */
    const struct {
        const char *name;
        bool *value;
    } switches[] = {{"QATTN_VULKAN_VALIDATION", &env->vulkan_validation},
                    {"QATTN_CUDA_WGMMA", &env->cuda_wgmma},
                    {"QATTN_CUDA_SPARSE", &env->cuda_sparse},
                    {"QATTN_CUDA_PRUNE", &env->cuda_prune}};
    env->cuda_wgmma = true;
    for (int i = 0; i < 4; i++) {
        const char *text = nonempty(switches[i].name);
        if (!text)
            continue;
        if (strcmp(text, "0") == 0 || strcmp(text, "1") == 0)
            *switches[i].value = text[0] == '1';
        else if (bad)
            *bad = switches[i].name;
    }
}
