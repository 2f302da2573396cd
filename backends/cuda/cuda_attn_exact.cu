/* Exact attention kernels: fp16 and bf16 inputs, fp32 accumulation. */
#include "cuda_launch.cuh"

QA_NAMESPACE_BEGIN
int attn_exact(const AttnParams *p, int head_dim, bool bf16, int grid, void *stream, bool prepare, bool sparse)
{
    switch (head_dim) {
    case 64:
        return bf16 ? attn_launch<64, Qk::BF16, Pv::BF16>(p, grid, stream, prepare, sparse)
                    : attn_launch<64, Qk::F16, Pv::F16>(p, grid, stream, prepare, sparse);
    case 128:
        return bf16 ? attn_launch<128, Qk::BF16, Pv::BF16>(p, grid, stream, prepare, sparse)
                    : attn_launch<128, Qk::F16, Pv::F16>(p, grid, stream, prepare, sparse);
    default: return 0;
    }
}
QA_NAMESPACE_END
