#!/usr/bin/env python3
"""Where one qattn.attention call spends its GPU time, kernel by kernel.

For each mode it runs --warmup calls, then --iters calls under the torch
profiler (CUDA activity: every kernel of the process, so qattn's own launches
too) and prints, per kernel, the calls per attention call, the mean device
time per attention call and its share; the quantization passes (everything
but the attention kernel) are summed on their own line. Shapes as in
compare.py: 16k tokens per problem (B = 16384 / N), H = 2048 / D.

  python3 bench/kernel_times.py [--d 128] [--n 4096,16384] [--causal] [--modes int8_fp8,exact]
"""
import argparse
import collections
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_time_us(event):
    for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", default="4096,16384")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--modes", default="int8_fp8,int8_fp8_f16acc,int8_fp16,exact")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.join(REPO, "python"))
    import qattn  # the library: $QATTN_LIBRARY, else as python/qattn finds it

    print("| D | N | B×H | causal | mode | kernel | calls/run | µs/run | share |")
    print("|---:|---:|---:|---|---|---|---:|---:|---:|")
    for n in (int(x) for x in args.n.split(",")):
        b, h = max(1, 16384 // n), 2048 // args.d
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, n, args.d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
        for mode in args.modes.split(","):
            kwargs = dict(is_causal=args.causal, precision=mode, check_finite=False)
            try:
                qattn.attention_plan(q, k, v, **kwargs)
            except qattn.UnsupportedError as e:
                print("| %d | %d | %d×%d | %s | %s | unsupported: %s | | | |" % (args.d, n, b, h, args.causal, mode, e.message))
                continue
            for _ in range(args.warmup):
                qattn.attention(q, k, v, **kwargs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA], acc_events=True) as prof:
                for _ in range(args.iters):
                    qattn.attention(q, k, v, **kwargs)
                torch.cuda.synchronize()
            per_kernel = collections.OrderedDict()
            for event in prof.key_averages():
                t = device_time_us(event)
                if t > 0:
                    per_kernel[event.key] = (event.count / args.iters, t / args.iters)
            total = sum(t for _, t in per_kernel.values()) or 1.0
            rest = 0.0
            for name, (calls, t) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
                short = name if len(name) <= 70 else name[:67] + "..."
                print("| %d | %d | %d×%d | %s | %s | `%s` | %.1f | %.1f | %.1f%% |"
                      % (args.d, n, b, h, args.causal, mode, short, calls, t, 100 * t / total))
                if "attention" not in name:
                    rest += t
            print("| %d | %d | %d×%d | %s | %s | **all but the attention kernel** | | %.1f | %.1f%% |"
                  % (args.d, n, b, h, args.causal, mode, rest, 100 * rest / total))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
