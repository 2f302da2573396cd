"""python3 -m qattn.tune_sparsity: tune qattn's predicted sparse layouts
(SpargeAttn's autotune) on Q, K, V from .npy files or on synthetic data
(qattn.structured_qkv), print the per-head table and write the JSON that
qattn.SparsityTuning.load reads (its "common" object is a predict= argument
of qattn.sparse_attention).

This module is the command line only: the function is qattn.tune_sparsity
(importing this module by name rebinds that attribute of the package to the
module; use the function through `qattn.tune_sparsity` before, or
`qattn._tune.tune_sparsity`).
"""
from __future__ import annotations

import argparse
import sys
import time

from ._tune import DEFAULT_SIM_GRID


def _floats(text):
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m qattn.tune_sparsity",
                                description="Tune qattn's predicted sparse layouts (sim_threshold, cdf_threshold, "
                                            "pv_threshold) per KV head to a relative L1 error target.",
                                epilog="Exit status 0 when the common parameters meet the target on every head, 1 "
                                       "when not, 2 for bad arguments.")
    src = p.add_argument_group("inputs (one of)")
    src.add_argument("--q", help="Q as a .npy file ([B, H, N, D] for HND, [B, N, H, D] for NHD)")
    src.add_argument("--k", help="K as a .npy file")
    src.add_argument("--v", help="V as a .npy file")
    src.add_argument("--synthetic", action="store_true", help="use qattn.structured_qkv data instead")
    syn = p.add_argument_group("synthetic data (--synthetic)")
    syn.add_argument("--batch", type=int, default=1)
    syn.add_argument("--heads-q", type=int, default=4)
    syn.add_argument("--heads-kv", type=int, default=2)
    syn.add_argument("--seq", type=int, default=2048, help="Nq = Nk")
    syn.add_argument("--head-dim", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    opt = p.add_argument_group("attention")
    opt.add_argument("--layout", default="HND", choices=("HND", "NHD"))
    opt.add_argument("--causal", action="store_true")
    opt.add_argument("--precision", default="auto")
    opt.add_argument("--window", type=int, nargs=2, metavar=("LEFT", "RIGHT"), help="a local window (-1: unbounded)")
    opt.add_argument("--sink-tokens", type=int, default=0)
    tune = p.add_argument_group("tuning")
    tune.add_argument("--target", type=float, default=0.05, help="relative L1 error bar (default 0.05)")
    tune.add_argument("--q-block", type=int, default=128)
    tune.add_argument("--k-block", type=int, default=64)
    tune.add_argument("--sink-blocks", type=int, default=1)
    tune.add_argument("--recent-blocks", type=int, default=None, help="default q_block / k_block + 1")
    tune.add_argument("--sim-grid", type=_floats, default=None, help="comma-separated thetas (default %s)" %
                      ",".join("%g" % t for t in DEFAULT_SIM_GRID))
    tune.add_argument("--cdf-iters", type=int, default=8)
    tune.add_argument("--no-pv", action="store_true", help="leave pv_threshold off (0)")
    tune.add_argument("--out", default="qattn_sparsity.json", help="JSON output (default qattn_sparsity.json; "
                                                                    "'-': none)")
    tune.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import numpy as np

    from . import _tune
    from ._structured import structured_qkv

    if args.synthetic == bool(args.q or args.k or args.v):
        p.error("give either --q/--k/--v or --synthetic")
    if args.synthetic:
        q, k, v, info = structured_qkv(args.batch, args.heads_q, args.heads_kv, args.seq, args.seq, args.head_dim,
                                       args.seed, dtype=args.dtype, layout=args.layout)
        source = "synthetic structured_qkv(b=%d, hq=%d, hkv=%d, n=%d, d=%d, seed=%d, %s); needle query %d, key %d" % (
            args.batch, args.heads_q, args.heads_kv, args.seq, args.head_dim, args.seed, args.dtype,
            info["needle_query"], info["needle_key"])
    else:
        if not (args.q and args.k and args.v):
            p.error("--q, --k and --v come together")
        q, k, v = (np.load(path) for path in (args.q, args.k, args.v))
        source = "%s, %s, %s" % (args.q, args.k, args.v)
    kwargs = {}
    if args.sim_grid:
        kwargs["sim_grid"] = args.sim_grid
    start = time.time()
    result = _tune.tune_sparsity(q, k, v, args.target, is_causal=args.causal, precision=args.precision,
                                 layout=args.layout, window=tuple(args.window) if args.window else None,
                                 sink_tokens=args.sink_tokens, q_block=args.q_block, k_block=args.k_block,
                                 sink_blocks=args.sink_blocks, recent_blocks=args.recent_blocks,
                                 cdf_iters=args.cdf_iters, tune_pv=not args.no_pv, verbose=not args.quiet, **kwargs)
    print("inputs: %s; q %s k %s %s, %s%s" % (source, list(q.shape), list(k.shape), q.dtype, args.layout,
                                             ", causal" if args.causal else ""))
    print(result.table())
    print("tuned in %.1f s" % (time.time() - start))
    if args.out != "-":
        result.save(args.out)
        print("wrote %s" % args.out)
    return 0 if result.common_met else 1


if __name__ == "__main__":
    sys.exit(main())
