#!/usr/bin/env python3
"""Decode throughput: qattn's paged kernels next to torch in the same GPU run.

Measures, on the current CUDA device:
  * device-to-device copy bandwidth (torch copy_ of 2 GiB, bytes read + written),
  * torch scaled_dot_product_attention decode (one query per sequence) over
    contiguous fp16 K/V [B, Hkv, N, D] with enable_gqa=True (or K/V expanded to
    Hq heads when this torch lacks it), for the same shapes,
and prints them next to qattn-decode-bench's rows (run as a subprocess with
--json, or read from --qattn-json). Pruned rows (qattn-decode-bench
--select) print their time, the fraction of pages read, their speed-up over
qattn's dense row and over torch, and their distance from the dense output. Throughput is bytes read per second:
K and V (+ Q, + the page table and scales for qattn), so the columns compare.

  python3 bench/decode_compare.py [--bench PATH] [--batch 1,16,64] [--ctx 1k,8k,32k]
                                  [--page 16] [--dtype f16,fp8,int8] [--qattn-json FILE]
                                  [--json OUT] [-- extra qattn-decode-bench args]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F


def parse_list(text):
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        mult = 1024 if tok[-1:] in "kK" else 1
        out.append(int(float(tok.rstrip("kK")) * mult))
    return out


def timed(fn, warmup, iters, reps):
    """Median over `reps` of the mean time of `iters` back-to-back calls (CUDA events), seconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(times)


def copy_bandwidth(nbytes=2 << 30):
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.fill_(1)
    t = timed(lambda: b.copy_(a), warmup=3, iters=10, reps=5)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9  # GB/s, read + write


def sdpa_decode(batch, ctx, hq, hkv, d, warmup, iters, reps):
    dev, dt = "cuda", torch.float16
    q = torch.randn(batch, hq, 1, d, device=dev, dtype=dt)
    k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=dt)
    v = torch.randn(batch, hkv, ctx, d, device=dev, dtype=dt)
    mode = "enable_gqa"
    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except (TypeError, RuntimeError):
        mode = "expanded"
        g = hq // hkv
        ke, ve = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        fn = lambda: F.scaled_dot_product_attention(q, ke, ve)
    t = timed(fn, warmup, iters, reps)
    read = 2 * batch * ctx * hkv * d * 2 + batch * hq * d * 2
    del q, k, v
    torch.cuda.empty_cache()
    return {"median_us": t * 1e6, "gbps": read / t / 1e9, "mode": mode}


def find_bench(explicit):
    if explicit:
        return explicit
    here = os.path.dirname(os.path.abspath(__file__))
    for build in ("build-paged", "build-cuda", "build"):
        path = os.path.join(here, "..", build, "bench", "qattn-decode-bench")
        if os.path.exists(path):
            return path
    return "qattn-decode-bench"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", help="path of qattn-decode-bench (default: ../build-*/bench/)")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--ctx", default="1k,8k,32k")
    ap.add_argument("--page", default="16")
    ap.add_argument("--dtype", default="f16,fp8,int8")
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--qattn-json", help="read qattn rows from this file (JSON lines) instead of running the bench")
    ap.add_argument("--json", help="also write every row here (JSON lines)")
    ap.add_argument("extra", nargs="*", help="more qattn-decode-bench arguments (after --)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_compare.py: torch sees no CUDA device")

    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)

    batches, ctxs = parse_list(args.batch), parse_list(args.ctx)
    torch_rows = {}
    for b in batches:
        for n in ctxs:
            r = sdpa_decode(b, n, args.hq, args.hkv, args.d, args.warmup, args.iters, args.reps)
            torch_rows[(b, n)] = r
            print(f"  torch sdpa B={b} N={n}: {r['median_us']:.1f} us, {r['gbps']:.0f} GB/s ({r['mode']})",
                  file=sys.stderr, flush=True)

    if args.qattn_json:
        with open(args.qattn_json) as f:
            lines = f.read().splitlines()
    else:
        cmd = [find_bench(args.bench), "--backend", "cuda", "--json", "--batch", args.batch, "--ctx", args.ctx,
               "--page", args.page, "--dtype", args.dtype, "--hq", str(args.hq), "--hkv", str(args.hkv),
               "--d", str(args.d), "--warmup", str(args.warmup), "--iters", str(args.iters), "--reps",
               str(args.reps), "--peak-gbps", f"{copy_gbps:.1f}"] + args.extra
        print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.splitlines()
        if proc.returncode not in (0, 1):
            print(f"qattn-decode-bench exited with {proc.returncode}", file=sys.stderr)
    qrows = [json.loads(l) for l in lines if l.startswith("{")]

    out = open(args.json, "w") if args.json else None
    print()
    print(f"decode, Hq={args.hq} Hkv={args.hkv} D={args.d}; GB/s = bytes read / median time; "
          f"% = of the {copy_gbps:.0f} GB/s copy")
    print(f"{'batch':>5} {'ctx':>6} {'impl':<22} {'page':>4} {'splits':>6} {'us':>9} {'GB/s':>7} {'%copy':>6} "
          f"{'tok/s vs f16':>12} {'cos':>9}")
    for b in batches:
        for n in ctxs:
            t = torch_rows[(b, n)]
            print(f"{b:5d} {n:6d} {'torch sdpa f16 (' + t['mode'] + ')':<22} {'-':>4} {'-':>6} {t['median_us']:9.1f} "
                  f"{t['gbps']:7.0f} {100 * t['gbps'] / copy_gbps:5.1f}% {'':>12} {'':>9}")
            if out:
                out.write(json.dumps({"impl": "torch_sdpa", "batch": b, "ctx": n, **t, "copy_gbps": copy_gbps,
                                      "device": name}) + "\n")
            for r in qrows:
                if r["batch"] != b or r["ctx"] != n:
                    continue
                if "select_budget" in r:  # a pruned row: against qattn dense and torch
                    label = f"qattn {r['dtype']} select {r['select_budget']}" + (" ad" if r.get("adaptive_eps") else "")
                    print(f"{b:5d} {n:6d} {label:<22} {r['page']:4d} {'-':>6} {r['median_us']:9.1f} "
                          f"read {100 * r['pages_read_frac']:5.1f}% of pages, {r['speedup_vs_dense']:.2f}x qattn "
                          f"dense, {t['median_us'] / r['median_us']:.2f}x torch; vs dense cos {r['cos_vs_dense']:.4f}")
                    if out:
                        out.write(json.dumps({"impl": "qattn_select", **r, "torch_us": t["median_us"],
                                              "copy_gbps": copy_gbps}) + "\n")
                    continue
                label = f"qattn {r['dtype']} {r['layout']}"
                speed = f"{r['speedup_vs_f16']:.2f}x" if r.get("speedup_vs_f16") else ""
                print(f"{b:5d} {n:6d} {label:<22} {r['page']:4d} {r['splits']:6d} {r['median_us']:9.1f} "
                      f"{r['gbps']:7.0f} {100 * r['gbps'] / copy_gbps:5.1f}% {speed:>12} {r['cos']:9.6f}")
                if out:
                    out.write(json.dumps({"impl": "qattn", **r, "copy_gbps": copy_gbps}) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
