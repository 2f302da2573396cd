/*
 * The OpenCL entry points qattn uses, loaded from the ICD loader
 * (libOpenCL.so.1) at run time: a library built with OpenCL still loads, and
 * reports the backend as unusable, on a machine without an OpenCL runtime.
 */
#ifndef QATTN_OPENCL_CL_LOADER_H
#define QATTN_OPENCL_CL_LOADER_H

#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <CL/cl_icd.h>

#include <stdbool.h>

/* X(name): every function of the table (OpenCL 1.2 core only). */
#define QATTN_CL_FUNCTIONS(X)                                                                                         \
    X(clGetPlatformIDs)                                                                                                \
    X(clGetPlatformInfo)                                                                                               \
    X(clGetDeviceIDs)                                                                                                  \
    X(clGetDeviceInfo)                                                                                                 \
    X(clCreateContext)                                                                                                 \
    X(clReleaseContext)                                                                                                \
    X(clCreateCommandQueue)                                                                                            \
    X(clReleaseCommandQueue)                                                                                           \
    X(clFinish)                                                                                                        \
    X(clFlush)                                                                                                         \
    X(clCreateBuffer)                                                                                                  \
    X(clCreateSubBuffer)                                                                                               \
    X(clRetainMemObject)                                                                                               \
    X(clReleaseMemObject)                                                                                              \
    X(clGetMemObjectInfo)                                                                                              \
    X(clEnqueueReadBuffer)                                                                                             \
    X(clEnqueueWriteBuffer)                                                                                            \
    X(clEnqueueFillBuffer)                                                                                             \
    X(clCreateProgramWithSource)                                                                                       \
    X(clCreateProgramWithBinary)                                                                                       \
    X(clBuildProgram)                                                                                                  \
    X(clGetProgramInfo)                                                                                                \
    X(clGetProgramBuildInfo)                                                                                           \
    X(clReleaseProgram)                                                                                                \
    X(clCreateKernel)                                                                                                  \
    X(clReleaseKernel)                                                                                                 \
    X(clSetKernelArg)                                                                                                  \
    X(clGetKernelWorkGroupInfo)                                                                                        \
    X(clEnqueueNDRangeKernel)                                                                                          \
    X(clWaitForEvents)                                                                                                 \
    X(clReleaseEvent)

typedef struct qattn_cl_api {
#define QATTN_CL_MEMBER(name) cl_api_##name name;
    QATTN_CL_FUNCTIONS(QATTN_CL_MEMBER)
#undef QATTN_CL_MEMBER
} qattn_cl_api;

/* The loaded table, or NULL with a reason (the loader is missing or lacks an
 * OpenCL 1.2 entry point). Loads once per process; thread-safe. */
const qattn_cl_api *qattn_cl_load(const char **reason);

/* "CL_OUT_OF_RESOURCES", ...; "CL_ERROR_<n>" for codes it does not know. */
const char *qattn_cl_error_name(cl_int err);

#endif
