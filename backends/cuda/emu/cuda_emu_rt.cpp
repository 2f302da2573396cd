/*
 * The test-only cuda-emu backend's runtime (qa_rt_emulated): cuda_rt.cuh and
 * every kernel of the CUDA backend, compiled with QA_EMULATE by the host C++
 * compiler onto the emulator in cuda_emu.cpp. Nothing here is GPU-specific
 * beyond what cuda_device.cuh emulates; the sm_90a (hopper/) kernels have no
 * emulated build, so the emulated device never plans them.
 */
#if !defined(QA_EMULATE)
#error "built with -DQA_EMULATE only (backends/cuda/meson.build)"
#endif

#include "cuda_rt.cuh"

#include "cuda_attn_exact.cu"
#include "cuda_attn_int8_fp16.cu"
#include "cuda_attn_int8_fp8.cu"
#include "cuda_attn_int8_fp8_f16acc.cu"
#include "cuda_attn_int8_fp8_f16mma.cu"
#include "cuda_quant.cu"
#include "cuda_sparse.cu"
