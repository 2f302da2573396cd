/* fma-peak: this machine's fp32 FMA throughput, all threads (OpenMP), using
 * 12 independent vector accumulators so FMA latency is hidden. Prints GFLOP/s. */
#include <stdio.h>
#include <time.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

typedef float vf __attribute__((vector_size(64)));

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(void)
{
    const long iters = 200000000L / 16;
    int threads = 1;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now();
        float sink = 0;
#if defined(_OPENMP)
#pragma omp parallel reduction(+ : sink)
#endif
        {
#if defined(_OPENMP)
#pragma omp single
            threads = omp_get_num_threads();
#endif
            vf a[12], x = (vf){0} + 1.0000001f, y = (vf){0} + 0.9999999f;
            for (int i = 0; i < 12; i++)
                a[i] = (vf){0} + (float)i;
            for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
                for (int i = 0; i < 12; i++)
                    a[i] = a[i] * x + y;
            for (int i = 0; i < 12; i++)
                for (int l = 0; l < 16; l++)
                    sink += a[i][l];
        }
        double dt = now() - t0;
        double gflops = (double)iters * 12 * 16 * 2 * threads / dt / 1e9;
        if (gflops > best)
            best = gflops;
        if (sink == 42.0f)
            printf(" ");
    }
    printf("fp32 FMA peak: %.1f GFLOP/s with %d threads (%d-wide vectors)\n", best, threads, 16);
    return 0;
}
