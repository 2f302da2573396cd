#include <math.h>

#include "internal.h"
#include "numeric.h"

bool qattn_host_tensor_is_finite(const void *base, qattn_dtype dtype, const int64_t shape[4], const int64_t stride[4])
{
    for (int64_t b = 0; b < shape[0]; b++)
        for (int64_t h = 0; h < shape[1]; h++)
            for (int64_t n = 0; n < shape[2]; n++) {
                int64_t row = b * stride[0] + h * stride[1] + n * stride[2];
                if (dtype == QATTN_DTYPE_F32) {
                    const float *p = (const float *)base + row;
                    for (int64_t d = 0; d < shape[3]; d++)
                        if (!isfinite(p[d]))
                            return false;
                } else {
                    /* fp16 and bf16: all-ones exponent means inf or nan. */
                    const uint16_t *p = (const uint16_t *)base + row;
                    uint16_t mask = dtype == QATTN_DTYPE_F16 ? 0x7c00u : 0x7f80u;
                    for (int64_t d = 0; d < shape[3]; d++)
                        if ((p[d] & mask) == mask)
                            return false;
                }
            }
    return true;
}
