"""qattn.tune_sparsity: SpargeAttn's autotune of the layout prediction, per KV head.

For each KV head (with the query heads of its GQA group, over the whole
batch) and each sim_threshold theta of a small grid, cdf_threshold tau is
bisected to the smallest value whose sparse output stays within the error
target of the dense output of the same heads (qattn.attention with the same
precision and structured masks); the theta whose tau keeps the fewest blocks
wins. Then pv_threshold lambda is bisected to the smallest value that keeps
the total error within the target (0, off, when none does).

qattn's plans take one set of parameters for all heads: `common` is the most
conservative combination (the largest theta, tau and lambda of any head:
each keeps a superset of the blocks, and skips less P.V, than every head's
own), measured again on every head. Per-head parameters need one plan per KV
head group: SparsityTuning.attention(..., per_head=True) runs them so.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

from ._sparse import PredictParams, _SparseCall

FORMAT = "qattn.sparsity/1"
DEFAULT_SIM_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8)


def _np():
    import numpy
    return numpy


def _numpy64(x):
    np = _np()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _rel_l1(out, ref):
    np = _np()
    out = _numpy64(out)
    denom = float(np.abs(ref).sum())
    return float(np.abs(out - ref).sum()) / denom if denom > 0 else float(np.abs(out).sum())


def _head_axis(layout):
    return 1 if str(layout).upper() == "HND" else 2


def _heads(x, layout, start, stop):
    """x's heads [start, stop) as a view."""
    return x[:, start:stop] if _head_axis(layout) == 1 else x[:, :, start:stop]


@dataclasses.dataclass
class HeadTuning:
    """The result for one KV head: its own parameters, the error and density
    they reach, and whether the target was met."""
    head_kv: int
    params: PredictParams
    rel_l1: float        # with pv_threshold
    rel_l1_blocks: float  # layout alone (pv_threshold 0)
    density: float       # share of the visible blocks kept (mean over the batch)
    met: bool
    evaluations: int

    @property
    def sparsity(self):
        return 1.0 - self.density

    def to_dict(self):
        return {"head_kv": self.head_kv, "params": self.params.to_dict(), "rel_l1": self.rel_l1,
                "rel_l1_blocks": self.rel_l1_blocks, "density": self.density, "sparsity": self.sparsity,
                "met": self.met, "evaluations": self.evaluations}

    @classmethod
    def from_dict(cls, d):
        return cls(int(d["head_kv"]), PredictParams(**d["params"]), float(d["rel_l1"]), float(d["rel_l1_blocks"]),
                   float(d["density"]), bool(d["met"]), int(d.get("evaluations", 0)))


@dataclasses.dataclass
class SparsityTuning:
    """tune_sparsity's result. `common` (a PredictParams) is what one plan for
    all heads takes: sparse_attention(q, k, v, predict=tuning) uses it.
    `heads`: HeadTuning per KV head. `common_rel_l1` / `common_density`: per
    KV head, what `common` reaches. save(path) / SparsityTuning.load(path):
    JSON whose "common" object holds qattn_sparse_desc's field names."""
    target_rel_l1: float
    common: PredictParams
    heads: list
    common_rel_l1: list
    common_density: list
    problem: dict

    @property
    def common_met(self):
        return all(e <= self.target_rel_l1 for e in self.common_rel_l1)

    @property
    def common_sparsity(self):
        return 1.0 - sum(self.common_density) / max(len(self.common_density), 1)

    def per_head_params(self, head_kv):
        return self.heads[head_kv].params

    def to_dict(self):
        return {"format": FORMAT, "target_rel_l1": self.target_rel_l1, "problem": self.problem,
                "common": self.common.to_dict(),
                "common_result": {"rel_l1": self.common_rel_l1, "density": self.common_density,
                                  "met": self.common_met},
                "heads": [h.to_dict() for h in self.heads]}

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_dict(cls, d):
        if d.get("format") != FORMAT:
            raise ValueError("not a %s document (format=%r)" % (FORMAT, d.get("format")))
        res = d.get("common_result", {})
        return cls(float(d["target_rel_l1"]), PredictParams(**d["common"]),
                   [HeadTuning.from_dict(h) for h in d.get("heads", [])], list(res.get("rel_l1", [])),
                   list(res.get("density", [])), dict(d.get("problem", {})))

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def table(self):
        """The per-head results as a text table."""
        lines = ["target rel L1 %.4g; blocks %dx%d, sink_blocks %d, recent_blocks %d" %
                 (self.target_rel_l1, self.common.q_block, self.common.k_block, self.common.sink_blocks,
                  self.common.recent_blocks),
                 "%-8s %7s %8s %7s %9s %9s %8s  %s" % ("kv head", "theta", "tau", "lambda", "rel L1", "blocks L1",
                                                       "sparsity", "met")]
        for h in self.heads:
            p = h.params
            lines.append("%-8d %7.3f %8.5f %7.2f %9.5f %9.5f %8.3f  %s" %
                         (h.head_kv, p.sim_threshold, p.resolved_cdf(), p.pv_threshold, h.rel_l1, h.rel_l1_blocks,
                          h.sparsity, "yes" if h.met else "NO"))
        c = self.common
        lines.append("common   %7.3f %8.5f %7.2f %9.5f %9s %8.3f  %s" %
                     (c.sim_threshold, c.resolved_cdf(), c.pv_threshold, max(self.common_rel_l1 or [0.0]), "",
                      self.common_sparsity, "yes" if self.common_met else "NO"))
        lines.append("common per kv head: rel L1 %s, sparsity %s" %
                     ([round(e, 5) for e in self.common_rel_l1], [round(1 - x, 3) for x in self.common_density]))
        return "\n".join(lines)

    def attention(self, q, k, v, per_head=True, **kwargs):
        """sparse_attention with these parameters: per_head=True runs one plan
        per KV head group with that head's own parameters and joins the
        outputs (kwargs as sparse_attention's, without predict and
        return_lse/return_layout); False runs `common` in one plan."""
        from ._sparse import sparse_attention
        if not per_head:
            return sparse_attention(q, k, v, predict=self.common, **kwargs)
        for name in ("predict", "return_lse", "return_layout", "block_mask", "pv_threshold"):
            if name in kwargs:
                raise ValueError("attention(per_head=True) takes no %s" % name)
        layout = kwargs.get("layout", "HND")
        axis = _head_axis(layout)
        hq, hkv = q.shape[axis], k.shape[axis]
        if hkv != len(self.heads):
            raise ValueError("the tuning has %d KV heads, k has %d" % (len(self.heads), hkv))
        group = hq // hkv
        outs = [sparse_attention(_heads(q, layout, h * group, (h + 1) * group), _heads(k, layout, h, h + 1),
                                 _heads(v, layout, h, h + 1), predict=self.heads[h].params, **kwargs)
                for h in range(hkv)]
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(outs[0], torch.Tensor):
            return torch.cat(outs, dim=axis)
        return _np().concatenate(outs, axis=axis)


class _HeadTuner:
    """Runs one KV head's group with given parameters, memoized."""

    def __init__(self, q, k, v, ref, base, kwargs):
        self.q, self.k, self.v, self.ref = q, k, v, ref
        self.base = base
        self.kwargs = kwargs
        self.memo = {}

    def __call__(self, theta, tau, lam=0.0):
        key = (round(theta, 9), round(tau, 9), round(lam, 9))
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        params = dataclasses.replace(self.base, sim_threshold=float(theta), cdf_threshold=float(tau),
                                     pv_threshold=float(lam))
        out, _, density = _SparseCall(self.q, self.k, self.v, predict=params, return_layout=True, cache_plan=False,
                                      block_mask=None, pv_threshold=0.0, **self.kwargs).run()
        result = (_rel_l1(out, self.ref), float(_np().mean(density)))
        self.memo[key] = result
        return result


def tune_sparsity(q, k, v, target_rel_l1=0.05, *, is_causal=False, precision="auto", layout="HND", sm_scale=None,
                  window=None, sink_tokens=0, q_block=128, k_block=64, sink_blocks=1, recent_blocks=None,
                  sim_grid=DEFAULT_SIM_GRID, cdf_iters=8, tune_pv=True, pv_range=(1.0, 32.0), pv_iters=6,
                  cdf_target_rel_l1=None, verbose=False):
    """SpargeAttn's autotune of qattn's predicted layouts, per KV head.

    q, k, v: as sparse_attention's (numpy or torch; layout "HND" or "NHD"),
        a representative batch of the workload.
    target_rel_l1: the error bar, relative L1 of the sparse output against
        the dense output (qattn.attention, same precision, same is_causal /
        window / sink_tokens) of the same heads.
    q_block, k_block, sink_blocks: fixed prediction settings.
    recent_blocks: fixed; None: q_block / k_block + 1, so each query block
        keeps its diagonal and the key block before it (the local context of
        its first rows, which pooled scores miss).
    sim_grid: the thetas tried. cdf_iters: bisection steps of tau in (0, 1].
    tune_pv: also bisect lambda in pv_range (pv_iters steps; log2 units).
    cdf_target_rel_l1: the bar of the layout stage (default 0.9 x target,
        leaving the rest to lambda; the target itself without tune_pv).
    verbose: print each head's result as it is found.

    Returns a SparsityTuning: per-head parameters and results, `common` (one
    set for all heads: the most conservative) with its measured per-head
    error and density, save() / load() to JSON.
    """
    np = _np()
    layout = str(layout).upper()
    axis = _head_axis(layout)
    hq, hkv = q.shape[axis], k.shape[axis]
    if hkv < 1 or hq % hkv:
        raise ValueError("q has %d heads, k %d: not a GQA grouping" % (hq, hkv))
    group = hq // hkv
    target = float(target_rel_l1)
    if not target > 0:
        raise ValueError("target_rel_l1=%r must be > 0" % (target_rel_l1,))
    stage1 = float(cdf_target_rel_l1) if cdf_target_rel_l1 is not None else (0.9 * target if tune_pv else target)
    if recent_blocks is None:
        recent_blocks = -(-int(q_block) // int(k_block)) + 1
    base = PredictParams(q_block=int(q_block), k_block=int(k_block), sink_blocks=int(sink_blocks),
                         recent_blocks=int(recent_blocks))
    kwargs = dict(is_causal=is_causal, sm_scale=sm_scale, precision=precision, layout=layout, return_lse=False,
                  granularity=None, smooth_k=None, check_finite=False, window=window, sink_tokens=sink_tokens)
    sim_grid = sorted(float(t) for t in sim_grid)

    heads = []
    for h in range(hkv):
        qh, kh, vh = (_heads(q, layout, h * group, (h + 1) * group), _heads(k, layout, h, h + 1),
                      _heads(v, layout, h, h + 1))
        ref = _numpy64(_SparseCall(qh, kh, vh, block_mask=None, predict=None, pv_threshold=0.0,
                                   return_layout=False, cache_plan=False, **kwargs).run())
        run = _HeadTuner(qh, kh, vh, ref, base, kwargs)
        best = None  # (density, -theta, theta, tau, rel)
        for theta in sim_grid:
            rel, density = run(theta, 1.0)
            if rel > stage1:
                continue  # even every block of this theta misses the bar
            lo, hi = 0.0, 1.0
            for _ in range(int(cdf_iters)):
                mid = 0.5 * (lo + hi)
                rel_mid, _ = run(theta, mid)
                if rel_mid <= stage1:
                    hi = mid
                else:
                    lo = mid
            rel, density = run(theta, hi)
            cand = (density, -theta, theta, hi, rel)
            if best is None or cand[:2] < best[:2]:
                best = cand
        if best is None:  # nothing met the bar: the most conservative point tried
            theta, tau = sim_grid[-1], 1.0
            rel, density = run(theta, tau)
        else:
            density, _, theta, tau, rel = best
        rel_blocks, lam, rel_total = rel, 0.0, rel
        if tune_pv and rel_blocks <= target:
            lo, hi = float(pv_range[0]), float(pv_range[1])
            rel_hi, _ = run(theta, tau, hi)
            if rel_hi <= target:
                if run(theta, tau, lo)[0] <= target:
                    hi = lo
                else:
                    for _ in range(int(pv_iters)):
                        mid = 0.5 * (lo + hi)
                        if run(theta, tau, mid)[0] <= target:
                            hi = mid
                        else:
                            lo = mid
                lam = hi
                rel_total = run(theta, tau, lam)[0]
        params = dataclasses.replace(base, sim_threshold=theta, cdf_threshold=tau, pv_threshold=lam)
        result = HeadTuning(h, params, rel_total, rel_blocks, density, rel_total <= target, len(run.memo))
        heads.append(result)
        if verbose:
            print("kv head %d: theta %.3f tau %.5f lambda %.2f rel L1 %.5f sparsity %.3f (%d runs)" %
                  (h, theta, tau, lam, rel_total, 1 - density, len(run.memo)), flush=True)

    lams = [hd.params.pv_threshold for hd in heads]
    common = dataclasses.replace(base, sim_threshold=max(hd.params.sim_threshold for hd in heads),
                                 cdf_threshold=max(hd.params.resolved_cdf() for hd in heads),
                                 pv_threshold=0.0 if (not lams or min(lams) == 0.0) else max(lams))
    out, _, density = _SparseCall(q, k, v, predict=common, return_layout=True, cache_plan=False, block_mask=None,
                                  pv_threshold=0.0, **kwargs).run()
    dense = _numpy64(_SparseCall(q, k, v, block_mask=None, predict=None, pv_threshold=0.0, return_layout=False,
                                 cache_plan=False, **kwargs).run())
    out = _numpy64(out)
    common_rel = [_rel_l1(_heads(out, layout, h * group, (h + 1) * group),
                          _heads(dense, layout, h * group, (h + 1) * group)) for h in range(hkv)]
    common_density = [float(x) for x in np.mean(density, axis=0)]
    shape_q, shape_k = list(q.shape), list(k.shape)
    dims = (0, 1, 2, 3) if layout == "HND" else (0, 2, 1, 3)
    problem = {"batch": shape_q[0], "heads_q": shape_q[dims[1]], "heads_kv": shape_k[dims[1]],
               "seq_q": shape_q[dims[2]], "seq_k": shape_k[dims[2]], "head_dim": shape_q[3],
               "causal": bool(is_causal), "precision": str(precision), "window": list(window) if window else None,
               "sink_tokens": int(sink_tokens or 0), "sm_scale": sm_scale}
    return SparsityTuning(target, common, heads, common_rel, common_density, problem)


__all__ = ["HeadTuning", "SparsityTuning", "tune_sparsity"]
