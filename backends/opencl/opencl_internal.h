/* OpenCL backend internals reachable from its checks (not part of the API). */
#ifndef QATTN_OPENCL_INTERNAL_H
#define QATTN_OPENCL_INTERNAL_H

#include <stddef.h>

#include "cl_loader.h"
#include "internal.h"

/*
 * The program built from `parts` with `options` on ctx's device (ctx must be
 * an opencl context): from the context's cache, the $QATTN_OPENCL_CACHE
 * folder, or the compiler. The context owns the program. A compiler failure
 * returns QATTN_ERR_BACKEND with the build log in the error message.
 */
qattn_status qattn_opencl_get_program(qattn_ctx *ctx, const char *what, const char *const *parts, size_t nparts,
                                      const char *options, cl_program *out);


#endif
