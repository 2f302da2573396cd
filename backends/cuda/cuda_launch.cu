/* The CUDA build of the launch sequence (qa_launch.cuh) behind a C interface. */
#include <stdio.h>

#include "cuda_kernels.h"
#include "qa_launch.cuh"

namespace qa {

bool memset_async(void *dst, int value, size_t bytes, void *stream)
{
    return cudaMemsetAsync(dst, value, bytes, (cudaStream_t)stream) == cudaSuccess;
}

const char *launch_error()
{
    static thread_local char text[256];
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess)
        return nullptr;
    snprintf(text, sizeof(text), "kernel launch failed: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    return text;
}

} // namespace qa

extern "C" int qa_cuda_prepare(const qattn_plan *plan) { return qa::prepare_plan(plan); }

extern "C" const char *qa_cuda_enqueue(const qattn_plan *plan, const void *q, const void *k, const void *v, void *o,
                                       float *lse, void *ws, void *stream)
{
    qa::RunArgs a;
    a.q = (const uint8_t *)q;
    a.k = (const uint8_t *)k;
    a.v = (const uint8_t *)v;
    a.o = (uint8_t *)o;
    a.lse = lse;
    a.ws = (uint8_t *)ws;
    a.stream = stream;
    return qa::run_plan(plan, a);
}
