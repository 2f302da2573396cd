/* qattn-info: which backends this library has, whether each runs here (and
 * why not), and each device's capabilities. */
#include <stdio.h>
#include <string.h>

#include "qattn/qattn.h"

static void print_caps(uint32_t caps, uint32_t precisions)
{
    static const struct {
        uint32_t bit;
        const char *name;
    } names[] = {{QATTN_CAP_FP16, "fp16"},       {QATTN_CAP_BF16, "bf16"},
                 {QATTN_CAP_INT8_DOT, "int8-dot"}, {QATTN_CAP_FP8, "fp8"},
                 {QATTN_CAP_MATRIX_UNITS, "matrix-units"}, {QATTN_CAP_SUBGROUPS, "subgroups"},
                 {QATTN_CAP_UNIFIED_MEMORY, "host-memory"}};
    printf("    capabilities:");
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (caps & names[i].bit)
            printf(" %s", names[i].name);
    printf("\n    precision modes:");
    for (int p = 1; p < QATTN_PRECISION_COUNT; p++)
        if (precisions & (1u << p))
            printf(" %s", qattn_precision_name((qattn_precision)p));
    printf("\n");
}

int main(int argc, char **argv)
{
    if (argc > 1 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        printf("usage: qattn-info\nLists qattn's backends, whether each is usable here, and their devices.\n");
        return 0;
    }
    printf("qattn %s\n", qattn_version());
    int usable = 0;
    for (int i = 0; i < qattn_backend_count(); i++) {
        qattn_backend_info b;
        if (qattn_backend_query(i, &b) != QATTN_OK) {
            fprintf(stderr, "qattn-info: %s\n", qattn_last_error(NULL));
            return 1;
        }
        printf("\nbackend %s: %s\n", b.name,
               !b.built ? "not built" : b.usable ? "usable" : "built, not usable here");
        if (!b.usable) {
            printf("  why: %s\n", b.reason);
            continue;
        }
        usable++;
        for (int d = 0; d < b.device_count; d++) {
            qattn_device_info info;
            if (qattn_device_query(b.name, d, &info) != QATTN_OK) {
                printf("  device %d: %s\n", d, qattn_last_error(NULL));
                continue;
            }
            printf("  device %d: %s\n    vendor: %s; driver: %s\n    compute units: %d; memory: %.1f GiB",
                   d, info.name, info.vendor, info.driver, info.compute_units,
                   (double)info.memory_bytes / (1024.0 * 1024.0 * 1024.0));
            if (info.max_buffer_bytes)
                printf("; largest buffer: %.1f MiB", (double)info.max_buffer_bytes / (1024.0 * 1024.0));
            printf("\n");
            print_caps(info.caps, info.precisions);
            /* details: one indented line each */
            const char *line = info.details;
            while (*line) {
                const char *end = strchr(line, '\n');
                int len = end ? (int)(end - line) : (int)strlen(line);
                if (len)
                    printf("    %.*s\n", len, line);
                line += len + (end ? 1 : 0);
            }
        }
    }
    qattn_ctx *ctx = NULL;
    if (qattn_ctx_create(NULL, &ctx) == QATTN_OK) {
        printf("\ndefault backend (QATTN_BACKEND, else auto): %s\n", qattn_ctx_backend(ctx));
        qattn_ctx_destroy(ctx);
    } else {
        printf("\ndefault backend: none: %s\n", qattn_last_error(NULL));
        return 1;
    }
    return usable ? 0 : 1;
}
