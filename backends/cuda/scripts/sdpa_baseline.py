"""torch SDPA timings (flash and cuDNN) on the shapes qattn-bench uses: 16k tokens
in total (B = 16384 / N), H = 2048 / D, fp16, HND. TFLOP/s-equivalent =
4*B*H*N*N*D / t, halved for causal. Median of CUDA-event timings after warm-up."""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, warmup=5, iters=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    shapes = [(d, n, c) for d in (128, 64) for n in (4096, 16384) for c in (False, True)]
    if len(sys.argv) > 1:
        shapes = [s for s in shapes if f"d{s[0]}" in sys.argv[1:]]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'D':>4} {'N':>6} {'causal':>6} {'flash_ms':>9} {'flash_TF':>9} {'cudnn_ms':>9} {'cudnn_TF':>9}")
    for d, n, causal in shapes:
        b, h = max(1, 16384 // n), 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        row = [f"{d:>4} {n:>6} {str(causal):>6}"]
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                row.append(f"{ms:9.3f} {flops / ms / 1e9:9.1f}")
            except RuntimeError as e:  # a backend that does not take the shape
                row.append(f"{'n/a':>9} {'n/a':>9}  ({str(e)[:40]})")
        print(" ".join(row), flush=True)


if __name__ == "__main__":
    main()
