/* The backend's runtime on the CUDA runtime (qa_rt_cuda, see cuda_rt.cuh),
 * with the paged kernels' instantiations. */
#include "cuda_rt.cuh"
