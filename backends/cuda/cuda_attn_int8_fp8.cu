/* INT8_FP8 attention kernels (SageAttention2): INT8 Q.K, FP8 P.V accumulated
 * per 64-key block, then in fp32. The e4m3 mma needs sm_89; older
 * architectures compile a trap in its place and plan_init never picks it there. */
#include "cuda_launch.cuh"

QA_NAMESPACE_BEGIN
int attn_int8_fp8(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse)
{
    switch (head_dim) {
    case 64: return attn_launch<64, Qk::S8, Pv::E4M3_F32>(p, grid, stream, prepare, sparse);
    case 128: return attn_launch<128, Qk::S8, Pv::E4M3_F32>(p, grid, stream, prepare, sparse);
    default: return 0;
    }
}
QA_NAMESPACE_END
