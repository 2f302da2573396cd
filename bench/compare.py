#!/usr/bin/env python3
"""qattn against torch SDPA (FlashAttention and cuDNN backends) on one CUDA GPU.

For D in {64, 128}, N in {1k, 4k, 16k, 32k} (16k tokens per problem:
B = 16384 / N, at least 1; H = 2048 / D), causal and not, it prints

  * speed: TFLOP/s-equivalent, 4*B*H*N*N*D / t (halved for causal), from the
    median of --iters runs after --warmup runs, each run timed with CUDA
    events. The host is let run ahead (a torch.cuda._sleep spin kernel holds
    the GPU while the runs are enqueued) so the events time the GPU work, not
    Python's launch overhead. One input set is used: at these sizes Q, K, V
    are larger than the L2 cache, so reuse does not flatter the numbers.
  * accuracy of each implementation against a float64 reference (chunked
    matmuls on the GPU; --ref-dtype float32 for fp32), on batch 0 and the
    first --ref-heads heads: cosine similarity, relative L1 error and max abs
    error, on randn data and on data whose K has a large per-channel bias
    shared by all tokens (K = randn + 8 * randn(D), broadcast).

Rows: torch SDPA "flash" and "cudnn" (sdpa_kernel(FLASH_ATTENTION) /
sdpa_kernel(CUDNN_ATTENTION)), and "qattn:<mode>" for each qattn precision
(exact, int8_fp16, int8_fp8, int8_fp8_f16acc) through qattn.attention on the
CUDA backend, with check_finite off as SDPA has none (--check-finite turns the
scan on). A mode qattn's plan calls unsupported prints "unsupported"; any
other failure prints its error in its cell and the table goes on.

--vulkan / --opencl add "vulkan:<mode>" / "opencl:<mode>" rows through the C
API (a context of that backend, inputs uploaded with qattn_buffer_upload);
their times are host timers around qattn_run + qattn_ctx_synchronize, so they
include the synchronization (a few microseconds to tens of microseconds).

  python3 bench/compare.py [--quick] [--json FILE] [--markdown FILE]
                           [--backends flash,cudnn,qattn] [--modes exact,...]
                           [--vulkan] [--opencl] [--library PATH] ...

The qattn library: --library, else $QATTN_LIBRARY, else as `import qattn`
finds it (installed, then the repository's build*/ folders). Progress goes to
stderr, the table to stdout; --json/--markdown files are rewritten after each
problem, so an interrupted run keeps what it measured. Exit status: 0 when
every cell ran (or was unsupported), 1 when a cell failed, 2 without torch or
a CUDA device.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = ("exact", "int8_fp16", "int8_fp8", "int8_fp8_f16acc")
VALID_MODES = MODES + ("auto",)
TORCH_BACKENDS = ("flash", "cudnn")
BACKENDS = TORCH_BACKENDS + ("qattn",)
HEAD_DIMS = (64, 128)
SEQ_LENS = (1024, 4096, 16384, 32768)
QUICK_HEAD_DIMS = (128,)
QUICK_SEQ_LENS = (1024, 4096)
TOKENS_PER_PROBLEM = 16384
MODEL_WIDTH = 2048  # H * D
KBIAS_SCALE = 8.0
DATASETS = ("randn", "kbias")


# ------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class Problem:
    d: int
    n: int
    causal: bool
    batch: int
    heads: int

    @property
    def flops(self):
        """4*B*H*N*N*D, halved for causal (the SDPA benchmarks' convention)."""
        full = 4.0 * self.batch * self.heads * self.n * self.n * self.d
        return full / 2 if self.causal else full

    @property
    def label(self):
        return "D=%d N=%d %s B=%d H=%d" % (self.d, self.n, "causal" if self.causal else "full", self.batch,
                                           self.heads)


def make_problem(d, n, causal):
    return Problem(d=d, n=n, causal=causal, batch=max(1, TOKENS_PER_PROBLEM // n), heads=MODEL_WIDTH // d)


def problems(args):
    causal_values = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    return [make_problem(d, n, c) for d in args.d for n in args.n for c in causal_values]


def implementations(args):
    """Row names in order: flash, cudnn, qattn:<mode>..., vulkan:<mode>..., opencl:<mode>..."""
    names = [b for b in TORCH_BACKENDS if b in args.backends]
    if "qattn" in args.backends:
        names += ["qattn:" + m for m in args.modes]
    for portable in ("vulkan", "opencl"):
        if getattr(args, portable):
            names += ["%s:%s" % (portable, m) for m in args.modes]
    return names


def _csv(choices, what):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError("unknown %s %s; valid: %s" % (what, ", ".join(bad) or "(none)",
                                                                           ", ".join(choices)))
        return tuple(dict.fromkeys(items))  # in order, without repeats
    return parse


def _int_csv(text):
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers, got %r" % text)
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers, got %r" % text)
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="qattn vs torch SDPA (flash, cuDNN): speed and accuracy on one GPU.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="a small subset: D=%s, N=%s, %d iterations unless given" %
                   (",".join(map(str, QUICK_HEAD_DIMS)), ",".join(map(str, QUICK_SEQ_LENS)), 20))
    p.add_argument("--d", type=_int_csv, default=None, help="head dims (default 64,128)")
    p.add_argument("--n", type=_int_csv, default=None, help="sequence lengths (default 1024,4096,16384,32768)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--backends", type=_csv(BACKENDS, "backend"), default=BACKENDS,
                   help="rows to run among flash, cudnn, qattn (default all)")
    p.add_argument("--modes", type=_csv(VALID_MODES, "mode"), default=MODES,
                   help="qattn precisions (default %s; auto allowed)" % ",".join(MODES))
    p.add_argument("--vulkan", action="store_true", help="add rows for qattn's Vulkan backend (host-timed)")
    p.add_argument("--opencl", action="store_true", help="add rows for qattn's OpenCL backend (host-timed)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--iters", type=int, default=None, help="timed runs per cell, median reported (default 30; "
                   "at least 20 is advised)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5, quick 3)")
    p.add_argument("--ref-heads", type=int, default=2, help="heads of batch 0 checked against the reference")
    p.add_argument("--ref-dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--check-finite", action="store_true", help="qattn rows with the NaN/Inf scan on (synchronous)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--library", default=None, help="libqattn to load (default: $QATTN_LIBRARY, else search)")
    p.add_argument("--json", metavar="FILE", default=None, help="write every result and the run's metadata")
    p.add_argument("--markdown", metavar="FILE", default=None, help="write tables ready for bench/RESULTS.md")
    p.add_argument("--dry-run", action="store_true", help="print the problems and rows, run nothing")
    args = p.parse_args(argv)
    if args.d is None:
        args.d = QUICK_HEAD_DIMS if args.quick else HEAD_DIMS
    if args.n is None:
        args.n = QUICK_SEQ_LENS if args.quick else SEQ_LENS
    if args.iters is None:
        args.iters = 20 if args.quick else 30
    if args.warmup is None:
        args.warmup = 3 if args.quick else 5
    if args.iters < 1 or args.warmup < 0 or args.ref_heads < 1:
        p.error("--iters must be >= 1, --warmup >= 0, --ref-heads >= 1")
    bad_d = [d for d in args.d if MODEL_WIDTH % d]
    if bad_d:
        p.error("head dims must divide %d (H = %d / D): %s" % (MODEL_WIDTH, MODEL_WIDTH, bad_d))
    if not implementations(args):
        p.error("nothing to run: --backends and --modes leave no rows")
    return args


# ------------------------------------------------------------- accuracy


def metrics(out, ref):
    """Cosine similarity, relative L1 error and max abs error of out against
    ref, in float64 (numpy arrays or anything numpy.asarray takes)."""
    import numpy as np

    a = np.asarray(out, dtype=np.float64).ravel()
    r = np.asarray(ref, dtype=np.float64).ravel()
    if a.shape != r.shape:
        raise ValueError("output has %d elements, reference %d" % (a.size, r.size))
    finite = bool(np.isfinite(a).all())
    norm = math.sqrt(float(np.dot(a, a)) * float(np.dot(r, r)))
    cos = float(np.dot(a, r)) / norm if (norm > 0 and finite) else float("nan")
    l1 = float(np.abs(r).sum())
    diff = np.abs(a - r)
    rel_l1 = float(diff.sum()) / l1 if l1 > 0 else float("nan")
    max_abs = float(diff.max()) if finite else float("nan")
    return {"cos": cos, "rel_l1": rel_l1, "max_abs": max_abs, "finite": finite}


def reference_attention(q, k, v, causal, scale=None, dtype=None, max_chunk_bytes=1 << 30):
    """softmax(scale * q k^T) v in `dtype` (default float64) with bottom-right
    causal masking, computed in chunks of query rows to bound memory.
    q [B, H, Nq, D], k and v [B, H, Nk, D] torch tensors (same H)."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    q, k, v = (x.to(dtype) for x in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    elem = torch.finfo(dtype).bits // 8
    chunk = max(1, min(nq, max_chunk_bytes // max(1, b * h * nk * elem)))
    out = torch.empty((b, h, nq, d), dtype=dtype, device=q.device)
    kt = k.transpose(-1, -2)
    for start in range(0, nq, chunk):
        end = min(nq, start + chunk)
        s = torch.matmul(q[:, :, start:end], kt) * scale
        if causal:
            rows = torch.arange(start, end, device=q.device)[:, None]
            cols = torch.arange(nk, device=q.device)[None, :]
            s.masked_fill_(cols > rows + (nk - nq), float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, v) / torch.where(l > 0, l, torch.ones_like(l))
        out[:, :, start:end] = o
        del s, p
    return out


# --------------------------------------------------------------- timing


def median(values):
    return statistics.median(values) if values else float("nan")


def tflops(problem, ms):
    return problem.flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else float("nan")


class CudaTimer:
    """Times callables with CUDA events, the host running ahead of the GPU."""

    def __init__(self, torch):
        self.torch = torch
        self.cycles_per_ms = None
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is not None:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            sleep(1000)  # load the kernel
            start.record()
            sleep(20_000_000)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
            if ms > 0:
                self.cycles_per_ms = 20_000_000 / ms

    def time(self, fn, warmup, iters):
        torch = self.torch
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        if self.cycles_per_ms:
            # Hold the GPU long enough for the host to enqueue every run.
            hold_ms = min(1.5 * host_ms * iters + 1.0, 2000.0)
            torch.cuda._sleep(int(hold_ms * self.cycles_per_ms))
        for i in range(iters):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def host_time(fn, warmup, iters):
    """Host wall-clock of fn (which must synchronize), in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# -------------------------------------------------------- implementations


class Unsupported(Exception):
    """The implementation declines this problem (a plan's QATTN_ERR_UNSUPPORTED,
    SDPA's "no available kernel")."""


class Bound:
    """One implementation bound to one problem's inputs."""

    timing = "cuda_events"
    kernel = ""

    def run(self):
        """Runs once; returns the output (or None when it stays on the device)."""
        raise NotImplementedError

    def output_subset(self, out, heads):
        """Batch 0, the first `heads` heads of an output, as a numpy array."""
        return out[0:1, :heads].double().cpu().numpy()


class SdpaBound(Bound):
    def __init__(self, torch, backend, q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.torch = torch
        self.kernel_ctx = sdpa_kernel
        self.backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
        self.kernel = "sdpa:" + self.backend.name
        self.args = (q, k, v)
        self.causal = causal

    def run(self):
        with self.kernel_ctx(self.backend):
            try:
                return self.torch.nn.functional.scaled_dot_product_attention(*self.args, is_causal=self.causal)
            except RuntimeError as e:
                if "No available kernel" in str(e):
                    raise Unsupported(first_line(str(e)))
                raise


class QattnCudaBound(Bound):
    def __init__(self, qattn, mode, q, k, v, causal, check_finite):
        self.qattn = qattn
        self.kwargs = dict(is_causal=causal, precision=mode, check_finite=check_finite)
        self.args = (q, k, v)
        try:
            plan = qattn.attention_plan(q, k, v, **self.kwargs)
        except qattn.UnsupportedError as e:
            raise Unsupported(e.message)
        if mode != "auto" and plan.info.precision != mode:
            raise RuntimeError("the plan runs %s when %s was asked for" % (plan.info.precision, mode))
        self.kernel = "%s (%s)" % (plan.info.kernel, plan.info.precision)

    def run(self):
        return self.qattn.attention(*self.args, **self.kwargs)


class PortableBound(Bound):
    """qattn on a Vulkan or OpenCL context: inputs uploaded through the C API."""

    timing = "host"

    def __init__(self, qattn, ctx, mode, q, k, v, causal, check_finite):
        self.qattn = qattn
        self.ctx = ctx
        b, h, n, d = q.shape
        dtype = {"torch.float16": qattn.DType.F16, "torch.bfloat16": qattn.DType.BF16}[str(q.dtype)]
        t = qattn.tensor_hnd(dtype, b, h, n, d)
        desc = qattn.make_desc(t, t, t, t, causal=causal, precision=qattn.PRECISIONS[mode],
                               flags=0 if check_finite else qattn.FLAG_NO_FINITE_CHECK)
        try:
            self.plan = ctx.plan(desc)
        except qattn.UnsupportedError as e:
            raise Unsupported(e.message)
        if mode != "auto" and self.plan.info.precision != mode:
            raise RuntimeError("the plan runs %s when %s was asked for" % (self.plan.info.precision, mode))
        self.kernel = "%s (%s)" % (self.plan.info.kernel, self.plan.info.precision)
        self.shape = (b, h, n, d)
        self.torch_dtype = q.dtype
        self.buffers = []
        for x in (q, k, v):
            host = x.contiguous().cpu()
            buf = ctx.create_buffer(host.numel() * host.element_size())
            buf.upload_from(host.data_ptr(), host.numel() * host.element_size())
            self.buffers.append(buf)
        self.o = ctx.create_buffer(self.buffers[0].size)
        self.ws = ctx.create_buffer(self.plan.workspace_size) if self.plan.workspace_size else None

    def run(self):
        self.plan.run(*self.buffers, self.o, workspace=self.ws)
        self.ctx.synchronize()
        return None

    def output_subset(self, out, heads):
        import torch

        b, h, n, d = self.shape
        heads = min(heads, h)
        host = torch.empty((1, heads, n, d), dtype=self.torch_dtype)
        # batch 0's first heads are the buffer's first bytes in HND
        self.o.download_to(host.data_ptr(), host.numel() * host.element_size())
        return host.double().numpy()

    def close(self):
        for buf in self.buffers + [self.o, self.ws]:
            if buf is not None:
                buf.close()


def close_bound(bound):
    """Frees what a bound implementation holds (device buffers); returns None."""
    if bound is not None and hasattr(bound, "close"):
        bound.close()
    return None


def first_line(text, limit=300):
    """A message on one line (lines joined with ' / '), at most limit characters."""
    line = " / ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------- cells


class Bench:
    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.qattn = None
        self.qattn_error = None
        self.portable = {}  # backend -> Context or the error text
        self.results = []
        self.meta = {}
        torch.cuda.set_device(args.device)
        torch.set_float32_matmul_precision("highest")  # no TF32 in an fp32 reference
        self.timer = CudaTimer(torch)
        self._load_qattn()

    def _load_qattn(self):
        needs = [i for i in implementations(self.args) if ":" in i]
        if not needs:
            return
        if self.args.library:
            os.environ["QATTN_LIBRARY"] = self.args.library
        sys.path.insert(0, os.path.join(REPO, "python"))
        try:
            import qattn

            qattn.version()  # loads the library
            self.qattn = qattn
        except Exception as e:  # every qattn cell reports it; the SDPA rows still run
            self.qattn_error = "cannot load qattn: %s" % first_line(e)
            progress(self.qattn_error)
            return
        for portable in ("vulkan", "opencl"):
            if getattr(self.args, portable):
                try:
                    self.portable[portable] = qattn.Context(portable)
                except qattn.QattnError as e:
                    self.portable[portable] = "%s: %s" % (type(e).__name__, e.message)

    def metadata(self, argv):
        torch = self.torch
        props = torch.cuda.get_device_properties(self.args.device)
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(self.args.device),
            "compute_capability": "%d.%d" % (props.major, props.minor),
            "multiprocessors": props.multi_processor_count,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(),
            "host": platform.node(),
            "command": "python3 bench/compare.py " + " ".join(shlex.quote(a) for a in argv),
            "dtype": self.args.dtype,
            "iters": self.args.iters,
            "warmup": self.args.warmup,
            "ref_dtype": self.args.ref_dtype,
            "ref_heads": self.args.ref_heads,
            "check_finite": self.args.check_finite,
            "timing": "CUDA events per run, median; host run ahead behind torch.cuda._sleep"
                      if self.timer.cycles_per_ms else "CUDA events per run, median (no torch.cuda._sleep: "
                                                       "includes launch gaps)",
        }
        if self.qattn is not None:
            meta["qattn"] = self.qattn.version()
            meta["qattn_library"] = self.qattn.library_path()
        elif self.qattn_error:
            meta["qattn"] = self.qattn_error
        self.meta = meta
        return meta

    def make_data(self, problem):
        torch = self.torch
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[self.args.dtype]
        gen = torch.Generator(device="cuda").manual_seed(self.args.seed * 1000003 + problem.n * 131 + problem.d)
        shape = (problem.batch, problem.heads, problem.n, problem.d)

        def randn():
            return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32)

        q, k, v = randn().to(dtype), randn(), randn().to(dtype)
        bias = KBIAS_SCALE * torch.randn(problem.d, generator=gen, device="cuda", dtype=torch.float32)
        k_bias = (k + bias).to(dtype)  # one bias per channel, shared by every token and head
        k = k.to(dtype)
        return {"randn": (q, k, v), "kbias": (q, k_bias, v)}

    def references(self, problem, data):
        torch = self.torch
        heads = min(self.args.ref_heads, problem.heads)
        ref_dtype = {"float64": torch.float64, "float32": torch.float32}[self.args.ref_dtype]
        refs = {}
        for name, (q, k, v) in data.items():
            sub = [x[0:1, :heads] for x in (q, k, v)]
            refs[name] = reference_attention(*sub, causal=problem.causal, dtype=ref_dtype).cpu().numpy()
        return refs

    def bind(self, impl, problem, q, k, v):
        if impl in TORCH_BACKENDS:
            return SdpaBound(self.torch, impl, q, k, v, problem.causal)
        backend, mode = impl.split(":")
        if self.qattn is None:
            raise RuntimeError(self.qattn_error or "qattn is not loaded")
        if backend == "qattn":
            return QattnCudaBound(self.qattn, mode, q, k, v, problem.causal, self.args.check_finite)
        ctx = self.portable.get(backend)
        if not isinstance(ctx, self.qattn.Context):
            raise RuntimeError("no %s context: %s" % (backend, ctx))
        return PortableBound(self.qattn, ctx, mode, q, k, v, problem.causal, self.args.check_finite)

    def cell(self, impl, problem, data, refs):
        torch = self.torch
        result = {"impl": impl, "d": problem.d, "n": problem.n, "causal": problem.causal, "batch": problem.batch,
                  "heads": problem.heads, "flops": problem.flops, "status": "ok", "message": "", "kernel": "",
                  "median_ms": None, "tflops": None, "times_ms": [], "timing": None, "accuracy": {}}
        bound = None
        try:
            for name in DATASETS:
                bound = self.bind(impl, problem, *data[name])
                result["kernel"] = bound.kernel
                out = bound.run()
                torch.cuda.synchronize()
                result["accuracy"][name] = metrics(bound.output_subset(out, self.args.ref_heads), refs[name])
                del out
                bound = close_bound(bound)
            bound = self.bind(impl, problem, *data["randn"])
            if bound.timing == "host":
                times = host_time(bound.run, self.args.warmup, self.args.iters)
            else:
                times = self.timer.time(bound.run, self.args.warmup, self.args.iters)
            result["timing"] = bound.timing
            result["times_ms"] = times
            result["median_ms"] = median(times)
            result["tflops"] = tflops(problem, result["median_ms"])
        except Unsupported as e:
            result["status"] = "unsupported"
            result["message"] = first_line(e)
        except Exception as e:  # one cell's failure must not end the table
            result["status"] = "error"
            result["message"] = "%s: %s" % (type(e).__name__, first_line(e))
            try:
                torch.cuda.synchronize()
            except Exception as sync_error:
                result["message"] += " (CUDA context broken: %s)" % first_line(sync_error)
            torch.cuda.empty_cache()
        finally:
            close_bound(bound)
        return result


# ---------------------------------------------------------------- output


def fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan" if value is not None else "-"
    return format(value, spec)


def accuracy_cells(result):
    cells = []
    for name in DATASETS:
        acc = result["accuracy"].get(name)
        if acc is None:
            cells += ["-", "-", "-"]
        else:
            cells += [fmt(acc["cos"], ".6f"), fmt(acc["rel_l1"], ".4f"), fmt(acc["max_abs"], ".4f")]
    return cells


def speed_cells(result):
    if result["status"] == "unsupported":
        return ["unsupported", ""]
    if result["status"] == "error":
        return ["error: " + result["message"], ""]
    return [fmt(result["median_ms"], ".3f"), fmt(result["tflops"], ".1f")]


TEXT_HEADER = ("%-26s %-22s %10s %8s  %10s %8s %8s  %10s %8s %8s" %
               ("problem", "impl", "ms", "TFLOP/s", "cos:randn", "relL1", "maxabs", "cos:kbias", "relL1", "maxabs"))


def text_row(result):
    problem = make_problem(result["d"], result["n"], result["causal"])
    speed = speed_cells(result)
    acc = accuracy_cells(result)
    if result["status"] == "ok":
        return "%-26s %-22s %10s %8s  %10s %8s %8s  %10s %8s %8s" % ((problem.label, result["impl"]) +
                                                                    tuple(speed) + tuple(acc))
    line = "%-26s %-22s %s" % (problem.label, result["impl"], speed[0])
    if result["accuracy"]:
        line += "  [accuracy: %s]" % " ".join(acc)
    return line


def markdown(results, meta):
    lines = ["## qattn vs torch SDPA on %s" % meta.get("device", "?"), ""]
    for key, label in (("date", "date"), ("device", "device"), ("compute_capability", "compute capability"),
                       ("torch", "torch"), ("cuda", "CUDA (torch)"), ("cudnn", "cuDNN"), ("qattn", "qattn"),
                       ("qattn_library", "qattn library"), ("dtype", "inputs"), ("timing", "timing"),
                       ("command", "command")):
        if key in meta and meta[key] is not None:
            value = "`%s`" % meta[key] if key in ("command", "qattn_library") else meta[key]
            lines.append("- %s: %s" % (label, value))
    lines.append("- speed: TFLOP/s-equivalent = 4·B·H·N²·D / median time (halved for causal); B = max(1, 16384/N), "
                 "H = 2048/D; median of %s runs after %s warm-up runs" % (meta.get("iters"), meta.get("warmup")))
    lines.append("- accuracy: against a %s reference on batch 0, first %s heads; randn data, and kbias data "
                 "(K = randn + %g·randn(D) shared by all tokens)" % (meta.get("ref_dtype"), meta.get("ref_heads"),
                                                                    KBIAS_SCALE))
    lines.append("")
    groups = []
    for r in results:
        g = (r["d"], r["causal"])
        if g not in groups:
            groups.append(g)
    for d, causal in groups:
        lines.append("### D=%d, %s" % (d, "causal" if causal else "full attention"))
        lines.append("")
        lines.append("| N | B×H | impl | ms | TFLOP/s | cos (randn) | rel L1 (randn) | max abs (randn) | "
                     "cos (kbias) | rel L1 (kbias) | max abs (kbias) |")
        lines.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            if (r["d"], r["causal"]) != (d, causal):
                continue
            speed = speed_cells(r)
            cells = [str(r["n"]), "%d×%d" % (r["batch"], r["heads"]), r["impl"]] + speed + accuracy_cells(r)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def json_safe(value):
    """NaN and infinities as null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_outputs(args, meta, results):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_safe({"meta": meta, "results": results}), f, indent=1, allow_nan=False)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, meta))


def progress(message):
    print("compare: " + message, file=sys.stderr, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    grid = problems(args)
    impls = implementations(args)
    if args.dry_run:
        for problem in grid:
            print("%s: %s" % (problem.label, ", ".join(impls)))
        return 0
    try:
        import torch
    except ImportError:
        print("compare: torch is not importable; this benchmark needs torch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("compare: torch sees no CUDA device", file=sys.stderr)
        return 2
    bench = Bench(args)
    meta = bench.metadata(argv)
    progress("%s, torch %s, qattn %s" % (meta["device"], meta["torch"], meta.get("qattn")))
    print(TEXT_HEADER, flush=True)
    results = []
    for index, problem in enumerate(grid, 1):
        progress("[%d/%d] %s: inputs and %s reference" % (index, len(grid), problem.label, args.ref_dtype))
        try:
            data = bench.make_data(problem)
            refs = bench.references(problem, data)
        except Exception as e:
            for impl in impls:
                result = {"impl": impl, "d": problem.d, "n": problem.n, "causal": problem.causal,
                          "batch": problem.batch, "heads": problem.heads, "flops": problem.flops,
                          "status": "error", "message": "inputs/reference: %s: %s" % (type(e).__name__,
                                                                                       first_line(e)),
                          "kernel": "", "median_ms": None, "tflops": None, "times_ms": [], "timing": None,
                          "accuracy": {}}
                results.append(result)
                print(text_row(result), flush=True)
            torch.cuda.empty_cache()
            write_outputs(args, meta, results)
            continue
        for impl in impls:
            progress("[%d/%d] %s: %s" % (index, len(grid), problem.label, impl))
            result = bench.cell(impl, problem, data, refs)
            results.append(result)
            print(text_row(result), flush=True)
        del data, refs
        torch.cuda.empty_cache()
        write_outputs(args, meta, results)
    write_outputs(args, meta, results)
    failed = sum(r["status"] == "error" for r in results)
    progress("done: %d cells, %d errors, %d unsupported" %
             (len(results), failed, sum(r["status"] == "unsupported" for r in results)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
