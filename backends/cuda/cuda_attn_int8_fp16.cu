/* INT8_FP16 attention kernels (SageAttention): INT8 Q.K, fp16 P.V with fp32 accumulation. */
#include "cuda_launch.cuh"

QA_NAMESPACE_BEGIN
int attn_int8_fp16(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse)
{
    switch (head_dim) {
    case 64: return attn_launch<64, Qk::S8, Pv::F16>(p, grid, stream, prepare, sparse);
    case 128: return attn_launch<128, Qk::S8, Pv::F16>(p, grid, stream, prepare, sparse);
    default: return 0;
    }
}
QA_NAMESPACE_END
