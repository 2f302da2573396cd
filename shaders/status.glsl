/*
 * The status words of a checked run or append, as src/internal.h defines them
 * for every backend (QATTN_STATUS_*, QATTN_NONFINITE_*): word 0 holds bits of
 * the inputs with NaN or Inf, word 1 is non-zero when an index or a per-head
 * scale is out of bounds. Kernels write nothing once either is set; the host
 * names the offending entry (src/checks.c).
 */
#define STATUS_NONFINITE 0u
#define STATUS_BOUNDS 1u

#define NONFINITE_Q 1u
#define NONFINITE_K 2u
#define NONFINITE_V 4u
#define NONFINITE_NEW_KV 8u
