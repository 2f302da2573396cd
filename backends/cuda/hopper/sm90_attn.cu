/* Host side of the sm_90a wgmma kernels (sm90_attn.cuh). Built into every
 * CUDA build; the kernels have bodies only in the sm_90a machine code, and
 * the planner selects them only on compute capability 9.0 when the library
 * was built with -Dnvcc_archs containing 90a (QA_SM90A_BUILT). */
#include "cuda_launch.cuh"
#include "sm90_attn.cuh"
#include "sm90_attn_ws.cuh"
#include "sm90_attn_exact_ws.cuh"

QA_NAMESPACE_BEGIN
template <int D, bool F16ACC> static int sm90_fp8_launch(const AttnParams *p, int grid, void *stream, bool prepare)
{
    auto fn = &sm90::attention_fp8_kernel<D, F16ACC>;
    const int smem = sm90::Sm90Traits<D>::kSmem;
    if (prepare)
        return QA_SET_SMEM(fn, smem) ? smem : 0;
    fn<<<grid, sm90::kThreads90, smem, (cudaStream_t)stream>>>(*p);
    return smem;
}

static bool encode_exact_maps(sm90::TmaMaps *m, const AttnParams &p, int D, int64_t batch, int q_rows, int kv_rows);

/* The kernel's parameters for CTAs of `rows` query rows (the planner counts
 * query tiles of kBlockM rows; the warp-specialized kernels may take more). */
static AttnParams with_cta_rows(const AttnParams &p, int rows)
{
    AttnParams r = p;
    r.q_tiles = (p.seq_q + rows - 1) / rows;
    return r;
}

template <int D, bool BF16, bool SPARSE>
static int sm90_exact_ws_launch(const AttnParams *p, int grid, void *stream, bool prepare)
{
    auto fn = &sm90::attention_exact_ws_kernel<D, BF16, false, SPARSE>;
    using T = sm90::ExactWsTraits<D>;
    if (prepare)
        return QA_SET_SMEM(fn, T::kSmem) ? T::kSmem : 0;
    const int64_t batch = grid / ((int64_t)p->q_tiles * p->heads_q);
    const AttnParams ap = with_cta_rows(*p, T::kRows);
    sm90::TmaMaps maps;
    if (!encode_exact_maps(&maps, ap, D, batch, T::kRows, T::kBN))
        return -1;
    fn<<<(int)(ap.q_tiles * batch * ap.heads_q), T::kThreads, T::kSmem, (cudaStream_t)stream>>>(ap, maps);
    return T::kSmem;
}

/* INT8_FP16 on the EXACT TMA kernel with INT8 Q.K (workspace Q, K int8 and V fp16). */
static bool encode_i8f16_maps(sm90::TmaMaps *m, const AttnParams &p, int D, int64_t batch, int q_rows, int kv_rows);

template <int D, bool SPARSE> static int sm90_i8f16_launch(const AttnParams *p, int grid, void *stream, bool prepare)
{
    auto fn = &sm90::attention_exact_ws_kernel<D, false, true, SPARSE>;
    using T = sm90::ExactWsTraits<D, true>;
    if (prepare)
        return QA_SET_SMEM(fn, T::kSmem) ? T::kSmem : 0;
    const int64_t batch = grid / ((int64_t)p->q_tiles * p->heads_q);
    const AttnParams ap = with_cta_rows(*p, T::kRows);
    sm90::TmaMaps maps;
    if (!encode_i8f16_maps(&maps, ap, D, batch, T::kRows, T::kBN))
        return -1;
    fn<<<(int)(ap.q_tiles * batch * ap.heads_q), T::kThreads, T::kSmem, (cudaStream_t)stream>>>(ap, maps);
    return T::kSmem;
}

template <bool SPARSE> static int sm90_int8_fp16_as(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare)
{
    switch (head_dim) {
    case 64: return sm90_i8f16_launch<64, SPARSE>(p, grid, stream, prepare);
    case 128: return sm90_i8f16_launch<128, SPARSE>(p, grid, stream, prepare);
    default: return 0;
    }
}

int attn_sm90_int8_fp16(const AttnParams *p, int head_dim, int grid, void *stream, bool prepare, bool sparse)
{
    return sparse ? sm90_int8_fp16_as<true>(p, head_dim, grid, stream, prepare)
                  : sm90_int8_fp16_as<false>(p, head_dim, grid, stream, prepare);
}

template <bool SPARSE>
static int sm90_exact_as(const AttnParams *p, int head_dim, bool bf16, int grid, void *stream, bool prepare)
{
    switch (head_dim) {
    case 64: return bf16 ? sm90_exact_ws_launch<64, true, SPARSE>(p, grid, stream, prepare)
                         : sm90_exact_ws_launch<64, false, SPARSE>(p, grid, stream, prepare);
    case 128: return bf16 ? sm90_exact_ws_launch<128, true, SPARSE>(p, grid, stream, prepare)
                          : sm90_exact_ws_launch<128, false, SPARSE>(p, grid, stream, prepare);
    case 256: return bf16 ? sm90_exact_ws_launch<256, true, SPARSE>(p, grid, stream, prepare)
                          : sm90_exact_ws_launch<256, false, SPARSE>(p, grid, stream, prepare);
    default: return 0;
    }
}

int attn_sm90_exact(const AttnParams *p, int head_dim, bool bf16, int grid, void *stream, bool prepare, bool sparse)
{
    return sparse ? sm90_exact_as<true>(p, head_dim, bf16, grid, stream, prepare)
                  : sm90_exact_as<false>(p, head_dim, bf16, grid, stream, prepare);
}

/* The tensor-map encoder of the driver, found through the runtime (the
 * library links no libcuda); NULL if the driver lacks it. */
typedef CUresult (*EncodeTiledFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                  const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                  CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static EncodeTiledFn encode_tiled()
{
    static const EncodeTiledFn fn = [] {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult found;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
                cudaSuccess ||
            found != cudaDriverEntryPointSuccess)
            f = nullptr;
        return (EncodeTiledFn)f;
    }();
    return fn;
}

/* A tensor map of 1- or 2-byte elements: rank dims (innermost first),
 * strides in bytes of dims 1.., box, swizzle width in bytes. */
static bool encode_map(CUtensorMap *map, CUtensorMapDataType type, const void *base, int rank, const uint64_t *dims,
                       const uint64_t *strides, const uint32_t *box, int swizzle)
{
    EncodeTiledFn fn = encode_tiled();
    if (!fn)
        return false;
    cuuint64_t d[5], st[4];
    cuuint32_t b[5], es[5];
    for (int i = 0; i < rank; i++) {
        d[i] = dims[i];
        b[i] = box[i];
        es[i] = 1;
        if (i + 1 < rank)
            st[i] = strides[i];
    }
    const CUtensorMapSwizzle sw = swizzle == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
    return fn(map, type, (cuuint32_t)rank, (void *)base, d, st, b, es,
              CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* The three maps of sm90_attn_ws.cuh for batch * heads of the workspace. */
static bool encode_ws_maps(sm90::TmaMaps *m, const AttnParams &p, int D, int64_t batch, int q_rows, int kv_keys)
{
    const int swz = D == 128 ? 128 : 64;
    const uint64_t q_dims[2] = {(uint64_t)D, (uint64_t)(batch * p.heads_q * p.seq_q)};
    const uint64_t q_strides[1] = {(uint64_t)D};
    const uint32_t q_box[2] = {(uint32_t)D, (uint32_t)q_rows};
    const uint64_t k_dims[5] = {(uint64_t)D, 2, 4, 2, (uint64_t)(batch * p.heads_kv * p.seq_k / 16)};
    const uint64_t k_strides[4] = {(uint64_t)D, 4ull * D, 2ull * D, 16ull * D};
    const uint32_t k_box[5] = {(uint32_t)D, 2, 4, 2, (uint32_t)kv_keys / 16};
    const uint64_t v_dims[2] = {(uint64_t)p.v_keys_padded, (uint64_t)(batch * p.heads_kv * D)};
    const uint64_t v_strides[1] = {(uint64_t)p.v_keys_padded};
    const uint32_t v_box[2] = {(uint32_t)kv_keys, (uint32_t)D};
    const CUtensorMapDataType u8 = CU_TENSOR_MAP_DATA_TYPE_UINT8;
    return encode_map(&m->q, u8, p.q8, 2, q_dims, q_strides, q_box, swz) &&
           encode_map(&m->k, u8, p.k8, 5, k_dims, k_strides, k_box, swz) &&
           encode_map(&m->v, u8, p.vq, 2, v_dims, v_strides, v_box, kv_keys); /* rows of kv_keys bytes */
}

/* The maps of sm90_attn_exact_ws.cuh: the caller's 16-bit Q, K, V as
 * (D, tokens, heads, batch) with their element strides [b, h, n]. */
/* A 16-bit (D, tokens, heads, batch) tensor with element strides [b, h, n],
 * in boxes of 64 channels by `rows` tokens. */
static bool encode_bhnd16(CUtensorMap *map, const void *base, const int64_t st[3], int D, int tokens, int heads,
                          int64_t batch, int rows)
{
    const uint64_t dims[4] = {(uint64_t)D, (uint64_t)tokens, (uint64_t)heads, (uint64_t)batch};
    const uint64_t strides[3] = {(uint64_t)st[2] * 2, (uint64_t)st[1] * 2, (uint64_t)st[0] * 2};
    const uint32_t box[4] = {64, (uint32_t)rows, 1, 1};
    return encode_map(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, base, 4, dims, strides, box, 128);
}

static bool encode_exact_maps(sm90::TmaMaps *m, const AttnParams &p, int D, int64_t batch, int q_rows, int kv_rows)
{
    return encode_bhnd16(&m->q, p.q, p.q_stride, D, p.seq_q, p.heads_q, batch, q_rows) &&
           encode_bhnd16(&m->k, p.k, p.k_stride, D, p.seq_k, p.heads_kv, batch, kv_rows) &&
           encode_bhnd16(&m->v, p.v, p.v_stride, D, p.seq_k, p.heads_kv, batch, kv_rows);
}

/* INT8_FP16: int8 Q and K rows of the workspace (all heads one after the
 * other; a box past a head's last key reads the next head's rows, which the
 * kernel masks), and its fp16 V as a (D, keys, heads, batch) tensor. */
static bool encode_i8f16_maps(sm90::TmaMaps *m, const AttnParams &p, int D, int64_t batch, int q_rows, int kv_rows)
{
    const int swz = D == 128 ? 128 : 64;
    const CUtensorMapDataType u8 = CU_TENSOR_MAP_DATA_TYPE_UINT8;
    const uint64_t q_dims[2] = {(uint64_t)D, (uint64_t)(batch * p.heads_q * p.seq_q)};
    const uint64_t k_dims[2] = {(uint64_t)D, (uint64_t)(batch * p.heads_kv * p.seq_k)};
    const uint64_t row_stride[1] = {(uint64_t)D};
    const uint32_t q_box[2] = {(uint32_t)D, (uint32_t)q_rows}, k_box[2] = {(uint32_t)D, (uint32_t)kv_rows};
    const int64_t v_st[3] = {(int64_t)p.heads_kv * p.seq_k * D, (int64_t)p.seq_k * D, D};
    return encode_map(&m->q, u8, p.q8, 2, q_dims, row_stride, q_box, swz) &&
           encode_map(&m->k, u8, p.k8, 2, k_dims, row_stride, k_box, swz) &&
           encode_bhnd16(&m->v, p.vq, v_st, D, p.seq_k, p.heads_kv, batch, kv_rows);
}

template <int D, bool F16ACC, bool UNIFORM_K, bool SPARSE>
static int sm90_fp8_ws_launch(const AttnParams *p, int grid, void *stream, bool prepare)
{
    auto fn = &sm90::attention_fp8_ws_kernel<D, F16ACC, UNIFORM_K, SPARSE>;
    using T = sm90::WsTraits<D>;
    if (prepare)
        return QA_SET_SMEM(fn, T::kSmem) ? T::kSmem : 0;
    const int64_t batch = grid / ((int64_t)p->q_tiles * p->heads_q);
    const AttnParams ap = with_cta_rows(*p, T::kRows);
    sm90::TmaMaps maps;
    if (!encode_ws_maps(&maps, ap, D, batch, T::kRows, T::kBN))
        return -1;
    fn<<<(int)(ap.q_tiles * batch * ap.heads_q), T::kThreads, T::kSmem, (cudaStream_t)stream>>>(ap, maps);
    return T::kSmem;
}

template <int D, bool F16ACC, bool SPARSE>
static int sm90_fp8_ws(const AttnParams *p, int grid, void *stream, bool prepare)
{
    if (prepare) {
        const int a = sm90_fp8_ws_launch<D, F16ACC, true, SPARSE>(p, grid, stream, true);
        const int b = sm90_fp8_ws_launch<D, F16ACC, false, SPARSE>(p, grid, stream, true);
        return a > 0 && b > 0 ? a : 0;
    }
    return p->k_inter == 1 ? sm90_fp8_ws_launch<D, F16ACC, true, SPARSE>(p, grid, stream, false)
                           : sm90_fp8_ws_launch<D, F16ACC, false, SPARSE>(p, grid, stream, false);
}

template <bool SPARSE>
static int sm90_fp8_ws_as(const AttnParams *p, int head_dim, bool f16acc, int grid, void *stream, bool prepare)
{
    switch (head_dim) {
    case 64: return f16acc ? sm90_fp8_ws<64, true, SPARSE>(p, grid, stream, prepare)
                           : sm90_fp8_ws<64, false, SPARSE>(p, grid, stream, prepare);
    case 128: return f16acc ? sm90_fp8_ws<128, true, SPARSE>(p, grid, stream, prepare)
                            : sm90_fp8_ws<128, false, SPARSE>(p, grid, stream, prepare);
    default: return 0;
    }
}

int attn_sm90_fp8(const AttnParams *p, int head_dim, bool f16acc, bool tma, int grid, void *stream, bool prepare,
                  bool sparse)
{
    if (tma)
        return sparse ? sm90_fp8_ws_as<true>(p, head_dim, f16acc, grid, stream, prepare)
                      : sm90_fp8_ws_as<false>(p, head_dim, f16acc, grid, stream, prepare);
    if (sparse)
        return 0; /* the cp.async wgmma kernel has no sparse form: the planner keeps those plans on mma.sync */
    switch (head_dim) {
    case 64: return f16acc ? sm90_fp8_launch<64, true>(p, grid, stream, prepare)
                           : sm90_fp8_launch<64, false>(p, grid, stream, prepare);
    case 128: return f16acc ? sm90_fp8_launch<128, true>(p, grid, stream, prepare)
                            : sm90_fp8_launch<128, false>(p, grid, stream, prepare);
    default: return 0;
    }
}
QA_NAMESPACE_END
