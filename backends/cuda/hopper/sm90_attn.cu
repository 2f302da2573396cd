/* Host side of the sm_90a wgmma kernels (sm90_attn.cuh). Built into every
 * CUDA build; the kernels have bodies only in the sm_90a machine code, and
 * the planner selects them only on compute capability 9.0 when the library
 * was built with -Dnvcc_archs containing 90a (QA_SM90A_BUILT). */
#include "qa_launch.cuh"
#include "sm90_attn.cuh"
#include "sm90_attn_exact.cuh"

#ifndef QA_SM90A_BUILT
#define QA_SM90A_BUILT 0
#endif

namespace qa {
template <int D, bool F16ACC> static int sm90_fp8_launch(const AttnParams *p, int grid, void *stream, bool prepare)
{
    auto fn = &sm90::attention_fp8_kernel<D, F16ACC>;
    const int smem = sm90::Sm90Traits<D>::kSmem;
    if (prepare)
        return QA_SET_SMEM(fn, smem) ? smem : 0;
    fn<<<grid, sm90::kThreads90, smem, (cudaStream_t)stream>>>(*p);
    return smem;
}

template <int D, bool BF16> static int sm90_exact_launch(const AttnParams *p, int grid, void *stream, bool prepare)
{
    auto fn = &sm90::attention_exact_kernel<D, BF16>;
    const int smem = sm90::Sm90ExactTraits<D>::kSmem;
    if (prepare)
        return QA_SET_SMEM(fn, smem) ? smem : 0;
    fn<<<grid, sm90::kThreads90, smem, (cudaStream_t)stream>>>(*p);
    return smem;
}

int attn_sm90_exact(const AttnParams *p, int head_dim, bool bf16, int grid, void *stream, bool prepare)
{
    switch (head_dim) {
    case 64: return bf16 ? sm90_exact_launch<64, true>(p, grid, stream, prepare)
                         : sm90_exact_launch<64, false>(p, grid, stream, prepare);
    case 128: return bf16 ? sm90_exact_launch<128, true>(p, grid, stream, prepare)
                          : sm90_exact_launch<128, false>(p, grid, stream, prepare);
    default: return 0;
    }
}

int attn_sm90_fp8(const AttnParams *p, int head_dim, bool f16acc, int grid, void *stream, bool prepare)
{
    switch (head_dim) {
    case 64: return f16acc ? sm90_fp8_launch<64, true>(p, grid, stream, prepare)
                           : sm90_fp8_launch<64, false>(p, grid, stream, prepare);
    case 128: return f16acc ? sm90_fp8_launch<128, true>(p, grid, stream, prepare)
                            : sm90_fp8_launch<128, false>(p, grid, stream, prepare);
    default: return 0;
    }
}
} // namespace qa

extern "C" int qa_cuda_sm90a_built(void) { return QA_SM90A_BUILT; }
