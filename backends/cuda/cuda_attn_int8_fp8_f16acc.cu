/* INT8_FP8_F16ACC attention kernels (SageAttention2++): as INT8_FP8, but
 * P.V accumulated in fp16 over each 64-key block (mma ... .f16.e4m3.e4m3.f16). */
#include "cuda_launch.cuh"

QA_NAMESPACE_BEGIN
int attn_int8_fp8_f16acc(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse)
{
    switch (head_dim) {
    case 64: return attn_launch<64, Qk::S8, Pv::E4M3_F16>(p, grid, stream, prepare, sparse);
    case 128: return attn_launch<128, Qk::S8, Pv::E4M3_F16>(p, grid, stream, prepare, sparse);
    default: return 0;
    }
}
QA_NAMESPACE_END
