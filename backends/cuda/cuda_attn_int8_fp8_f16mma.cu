/* INT8_FP8 and INT8_FP8_F16ACC attention kernels for sm_90: INT8 Q.K, FP8 P.V
 * with P and V rounded to E4M3 and multiplied on the fp16 tensor cores (every
 * E4M3 value is exact in fp16). Hopper has no FP8 mma.sync; ptxas expands
 * mma.e4m3 into per-instruction unpacks plus two fp16 mmas, which costs more
 * registers and issue slots than widening V^T once per tile. */
#include "cuda_launch.cuh"

QA_NAMESPACE_BEGIN
int attn_int8_fp8_f16mma(const AttnParams *p, int head_dim, bool f16acc, int grid, void *stream, bool prepare, bool sparse)
{
    switch (head_dim) {
    case 64:
        return f16acc ? attn_launch<64, Qk::S8, Pv::E4M3H_F16>(p, grid, stream, prepare, sparse)
                      : attn_launch<64, Qk::S8, Pv::E4M3H_F32>(p, grid, stream, prepare, sparse);
    case 128:
        return f16acc ? attn_launch<128, Qk::S8, Pv::E4M3H_F16>(p, grid, stream, prepare, sparse)
                      : attn_launch<128, Qk::S8, Pv::E4M3H_F32>(p, grid, stream, prepare, sparse);
    default: return 0;
    }
}
QA_NAMESPACE_END
