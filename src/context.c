/* Backend registry, backend/device discovery and contexts. */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "env.h"
#include "internal.h"

typedef struct registry_entry {
    const char *name;
    const qattn_backend_iface *iface; /* NULL: not built */
    const char *build_hint;
    bool test_only; /* listed only where linked in (the test programs) and never chosen by auto */
} registry_entry;

#if defined(__GNUC__)
/* The emulated CUDA backend (backends/cuda/emu) is linked into the test
 * programs only; elsewhere this weak reference stays NULL and the entry is
 * not listed. */
extern const qattn_backend_iface qattn_backend_cuda_emu __attribute__((weak));
#endif

static const registry_entry registry[] = {
    {"cpu", &qattn_backend_cpu, "", false},
#if QATTN_WITH_CUDA
    {"cuda", &qattn_backend_cuda, "", false},
#else
    {"cuda", NULL, "configure with -Dcuda=enabled and nvcc on PATH", false},
#endif
#if QATTN_WITH_VULKAN
    {"vulkan", &qattn_backend_vulkan, "", false},
#else
    {"vulkan", NULL, "configure with -Dvulkan=enabled and a GLSL compiler (glslc or glslang)", false},
#endif
#if QATTN_WITH_OPENCL
    {"opencl", &qattn_backend_opencl, "", false},
#else
    {"opencl", NULL, "configure with -Dopencl=enabled and the OpenCL ICD loader headers", false},
#endif
#if defined(__GNUC__)
    {"cuda-emu", &qattn_backend_cuda_emu, "", true},
#endif
};
#define REGISTRY_SIZE ((int)(sizeof(registry) / sizeof(registry[0])))
#define VALID_BACKENDS "cpu, cuda, vulkan, opencl, auto"

static bool listed(const registry_entry *e) { return !e->test_only || e->iface; }

/* The index-th listed entry, or NULL. */
static const registry_entry *listed_at(int index)
{
    for (int i = 0; i < REGISTRY_SIZE; i++)
        if (listed(&registry[i]) && index-- == 0)
            return &registry[i];
    return NULL;
}

int qattn_backend_count(void)
{
    int n = 0;
    for (int i = 0; i < REGISTRY_SIZE; i++)
        n += listed(&registry[i]);
    return n;
}

static const registry_entry *find_backend(const char *name)
{
    for (int i = 0; i < REGISTRY_SIZE; i++)
        if (listed(&registry[i]) && strcmp(registry[i].name, name) == 0)
            return &registry[i];
    return NULL;
}

static int auto_score_of(const qattn_backend_iface *b) { return b->auto_score ? b->auto_score() : b->score; }

static void probe_entry(const registry_entry *e, qattn_backend_info *info)
{
    memset(info, 0, sizeof(*info));
    info->name = e->name;
    info->built = e->iface != NULL;
    if (!e->iface) {
        snprintf(info->reason, sizeof(info->reason), "not built into this library (%s)", e->build_hint);
        return;
    }
    int count = 0;
    qattn_status s = e->iface->probe(&count, info->reason, sizeof(info->reason));
    if (s == QATTN_OK && count > 0) {
        info->usable = 1;
        info->device_count = count;
        info->reason[0] = '\0';
    } else if (!info->reason[0]) {
        snprintf(info->reason, sizeof(info->reason), "no device found");
    }
}

qattn_status qattn_backend_query(int index, qattn_backend_info *info)
{
    if (!info)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "info is NULL");
    const registry_entry *e = index >= 0 ? listed_at(index) : NULL;
    if (!e)
        return qattn_set_error(NULL, QATTN_ERR_NOT_FOUND, "backend index %d is out of range [0, %d)", index,
                               qattn_backend_count());
    probe_entry(e, info);
    return QATTN_OK;
}

/* Looks a usable backend up by name, with messages for the ways it can fail. */
static qattn_status usable_backend(const char *name, const char *source, const registry_entry **out,
                                   qattn_backend_info *info)
{
    const registry_entry *e = find_backend(name);
    if (!e)
        return qattn_set_error(NULL, QATTN_ERR_NOT_FOUND, "unknown backend '%s'%s; valid choices: " VALID_BACKENDS,
                               name, source);
    probe_entry(e, info);
    if (!info->usable)
        return qattn_set_error(NULL, QATTN_ERR_UNAVAILABLE, "backend '%s'%s is not usable: %s", name, source,
                               info->reason);
    *out = e;
    return QATTN_OK;
}

static bool contains_nocase(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (; *hay; hay++) {
        size_t i = 0;
        while (i < n && hay[i] && tolower((unsigned char)hay[i]) == tolower((unsigned char)needle[i]))
            i++;
        if (i == n)
            return true;
    }
    return n == 0;
}

/* Resolves a device given as an index or a name substring. */
static qattn_status pick_device(const registry_entry *e, int count, const char *spec, const char *source, int *out,
                                qattn_device_info *info)
{
    char reason[QATTN_NAME_MAX] = "";
    /* All digits: an index (checked for overflow); anything else: a name. */
    char *end = NULL;
    errno = 0;
    long index = spec[0] >= '0' && spec[0] <= '9' ? strtol(spec, &end, 10) : -1;
    if (end && *end == '\0') {
        if (errno == ERANGE)
            return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "device index %s%s is out of range", spec,
                                   source);
        if (index >= count)
            return qattn_set_error(NULL, QATTN_ERR_NOT_FOUND, "device %ld%s does not exist: backend %s has %d device(s)",
                                   index, source, e->name, count);
        if (e->iface->device_info((int)index, info, reason, sizeof(reason)))
            return qattn_set_error(NULL, QATTN_ERR_BACKEND, "device %ld of backend %s: %s", index, e->name, reason);
        *out = (int)index;
        return QATTN_OK;
    }
    char names[1024] = "";
    for (int i = 0; i < count; i++) {
        if (e->iface->device_info(i, info, reason, sizeof(reason)))
            continue;
        if (contains_nocase(info->name, spec)) {
            *out = i;
            return QATTN_OK;
        }
        size_t used = strlen(names);
        snprintf(names + used, sizeof(names) - used, "%s%d: %s", i ? "; " : "", i, info->name);
    }
    return qattn_set_error(NULL, QATTN_ERR_NOT_FOUND, "no %s device matches '%s'%s (devices: %s)", e->name, spec,
                           source, names[0] ? names : "none");
}

qattn_status qattn_device_query(const char *backend, int device, qattn_device_info *info)
{
    if (!backend || !info)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", backend ? "info" : "backend");
    const registry_entry *e = NULL;
    qattn_backend_info binfo;
    qattn_status s = usable_backend(backend, "", &e, &binfo);
    if (s)
        return s;
    if (device < 0 || device >= binfo.device_count)
        return qattn_set_error(NULL, QATTN_ERR_NOT_FOUND, "device %d does not exist: backend %s has %d device(s)",
                               device, backend, binfo.device_count);
    char reason[QATTN_NAME_MAX] = "";
    memset(info, 0, sizeof(*info));
    if (e->iface->device_info(device, info, reason, sizeof(reason)))
        return qattn_set_error(NULL, QATTN_ERR_BACKEND, "device %d of backend %s: %s", device, backend, reason);
    return QATTN_OK;
}

qattn_status qattn_ctx_create(const qattn_ctx_params *params, qattn_ctx **out)
{
    if (!out)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "out (the context pointer) is NULL");
    *out = NULL;
    qattn_ctx_params defaults = {0};
    if (!params)
        params = &defaults;
    if (params->num_threads < 0)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "params.num_threads=%d must be >= 0",
                               params->num_threads);

    qattn_env env;
    const char *bad = NULL;
    qattn_env_read(&env, &bad);
    if (bad)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "environment variable %s has an invalid value (see "
                               "README.md, 'Environment')", bad);

    if (env.num_threads < 0 && !params->num_threads)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT,
                               "environment variable QATTN_NUM_THREADS has an invalid value (a count in [1, 4096]; "
                               "see README.md, 'Environment')");

    const char *name = params->backend ? params->backend : env.backend ? env.backend : "auto";
    const char *source = params->backend ? " (from qattn_ctx_params.backend)"
                         : env.backend  ? " (from QATTN_BACKEND)"
                                        : "";
    const registry_entry *chosen = NULL;
    qattn_backend_info binfo;
    qattn_status s;
    if (strcmp(name, "auto") == 0) {
        /* Best score first; every backend's reason goes into the message if none is usable. */
        char reasons[1536] = "";
        bool tried[REGISTRY_SIZE] = {false};
        for (int round = 0; round < REGISTRY_SIZE && !chosen; round++) {
            int best = -1;
            for (int i = 0; i < REGISTRY_SIZE; i++)
                if (!tried[i] && registry[i].iface && !registry[i].test_only &&
                    (best < 0 || auto_score_of(registry[i].iface) > auto_score_of(registry[best].iface)))
                    best = i;
            if (best < 0)
                break;
            tried[best] = true;
            probe_entry(&registry[best], &binfo);
            if (binfo.usable) {
                chosen = &registry[best];
            } else {
                size_t used = strlen(reasons);
                snprintf(reasons + used, sizeof(reasons) - used, "%s%s: %s", used ? "; " : "", registry[best].name,
                         binfo.reason);
            }
        }
        if (!chosen)
            return qattn_set_error(NULL, QATTN_ERR_UNAVAILABLE, "no usable backend (%s)", reasons);
    } else if ((s = usable_backend(name, source, &chosen, &binfo))) {
        return s;
    }

    const char *spec = params->device ? params->device : env.device ? env.device : "0";
    const char *dsource = params->device ? " (from qattn_ctx_params.device)"
                          : env.device  ? " (from QATTN_DEVICE)"
                                        : "";
    qattn_ctx *ctx = calloc(1, sizeof(*ctx));
    pthread_mutex_t *lock = malloc(sizeof(*lock));
    if (!ctx || !lock || pthread_mutex_init(lock, NULL)) {
        free(ctx);
        free(lock);
        return qattn_set_error(NULL, QATTN_ERR_OUT_OF_MEMORY, "out of host memory for the context");
    }
    ctx->error_lock = lock;
    ctx->backend = chosen->iface;
    ctx->num_threads = params->num_threads ? params->num_threads
                       : env.num_threads   ? env.num_threads
                                           : qattn_host_cpu_count();
    s = pick_device(chosen, binfo.device_count, spec, dsource, &ctx->device, &ctx->device_info);
    if (!s)
        s = chosen->iface->ctx_init(ctx);
    if (s) {
        /* Keep the message for the caller, who has no context to ask. */
        char msg[QATTN_ERROR_MAX];
        snprintf(msg, sizeof(msg), "%s", ctx->error[0] ? ctx->error : qattn_last_error(NULL));
        pthread_mutex_destroy(lock);
        free(lock);
        free(ctx);
        return qattn_set_error(NULL, s, "%s", msg);
    }
    qattn_log(QATTN_LOG_INFO, "context on backend %s, device %d (%s)", chosen->name, ctx->device,
              ctx->device_info.name);
    *out = ctx;
    return QATTN_OK;
}

void qattn_ctx_destroy(qattn_ctx *ctx)
{
    if (!ctx)
        return;
    ctx->backend->ctx_release(ctx);
    pthread_mutex_destroy(ctx->error_lock);
    free(ctx->error_lock);
    free(ctx);
}

const char *qattn_ctx_backend(const qattn_ctx *ctx) { return ctx ? ctx->backend->name : NULL; }

qattn_status qattn_ctx_device_info(const qattn_ctx *ctx, qattn_device_info *info)
{
    if (!ctx || !info)
        return qattn_set_error((qattn_ctx *)ctx, QATTN_ERR_INVALID_ARGUMENT, "%s is NULL", ctx ? "info" : "ctx");
    *info = ctx->device_info;
    return QATTN_OK;
}

qattn_status qattn_ctx_synchronize(qattn_ctx *ctx)
{
    if (!ctx)
        return qattn_set_error(NULL, QATTN_ERR_INVALID_ARGUMENT, "ctx is NULL");
    return ctx->backend->synchronize(ctx);
}
