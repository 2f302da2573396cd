/* OpenCL C sources embedded at build time (embed_kernels.py writes the
 * definitions from the .cl files in kernels/). Each is NUL-terminated. */
#ifndef QATTN_OPENCL_KERNELS_H
#define QATTN_OPENCL_KERNELS_H

extern const char qattn_opencl_src_common[];
extern const char qattn_opencl_src_prep[];
extern const char qattn_opencl_src_flash[];
extern const char qattn_opencl_src_paged[];
extern const char qattn_opencl_src_merge[];
extern const char qattn_opencl_src_kv_append[];
extern const char qattn_opencl_src_sparse[];
extern const char qattn_opencl_src_prune[];

#endif
