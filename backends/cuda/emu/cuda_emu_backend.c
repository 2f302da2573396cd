/*
 * The test-only `cuda-emu` backend: the CUDA backend's own host code and
 * kernels over the emulated runtime (host memory, the CPU emulator of the
 * CUDA execution model), so the shared suites exercise them in CI without a
 * GPU. Linked into the test programs only; the library's registry finds it
 * there (src/context.c) and nowhere else.
 */
#include "cuda_internal.h"

static qattn_status emu_probe(int *device_count, char *reason, size_t reason_len)
{
    return qa_probe(&qa_rt_emulated, device_count, reason, reason_len);
}

static qattn_status emu_device_info(int device, qattn_device_info *info, char *reason, size_t reason_len)
{
    return qa_device_info(&qa_rt_emulated, device, info, reason, reason_len);
}

static qattn_status emu_ctx_init(qattn_ctx *ctx) { return qa_ctx_init(&qa_rt_emulated, ctx); }

const qattn_backend_iface qattn_backend_cuda_emu = {
    .name = "cuda-emu",
    .score = 0, /* never chosen by auto: named only by the tests */
    .probe = emu_probe,
    .device_info = emu_device_info,
    .ctx_init = emu_ctx_init,
    QA_BACKEND_SHARED_SLOTS,
};
