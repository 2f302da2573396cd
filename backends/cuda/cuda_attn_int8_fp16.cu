/* INT8_FP16 attention kernels (SageAttention): INT8 Q.K, fp16 P.V with fp32 accumulation. */
#include "qa_launch.cuh"

namespace qa {
int attn_int8_fp16(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare)
{
    switch (head_dim) {
    case 64: return attn_launch<64, Qk::S8, Pv::F16>(p, grid, stream, prepare);
    case 128: return attn_launch<128, Qk::S8, Pv::F16>(p, grid, stream, prepare);
    default: return 0;
    }
}
} // namespace qa
