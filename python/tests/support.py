"""Shared helpers of the qattn binding tests: the import path, an fp64
reference attention in numpy, and accuracy metrics."""
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# Test this tree's package, not an installed one.
sys.path.insert(0, os.path.join(REPO, "python"))

try:
    import numpy as np
except ImportError:  # the numpy tests skip; CI installs python3-numpy
    np = None

try:
    import torch
except ImportError:
    torch = None

import qattn  # noqa: E402

NUMPY_MISSING = "numpy is not importable (apt-get install python3-numpy)"

# Accuracy bars against fp64, as bench/qattn-bench.c uses them.
BARS = {
    "exact": (0.99999, 0.002),
    "int8_fp16": (0.9995, 0.03),
    "int8_fp8": (0.999, 0.05),
    "int8_fp8_f16acc": (0.999, 0.05),
}
QUANTIZED = ("int8_fp16", "int8_fp8", "int8_fp8_f16acc")
MODES = ("exact",) + QUANTIZED


def reference(q, k, v, causal=False, sm_scale=None, layout="HND", mask=None):
    """fp64 attention with qattn's conventions (bottom-right causal, GQA,
    rows that see no key give O = 0 and LSE = -inf). Inputs in the layout;
    mask (optional): an element mask [Nq, Nk] or [B, Hkv, Nq, Nk], True where
    visible, on top of causal. Returns (O in the layout, LSE [B, H, N])."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if layout == "NHD":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if causal:
        i = np.arange(nq)[:, None]
        j = np.arange(nk)[None, :]
        s = np.where(j <= i + (nk - nq), s, -np.inf)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 2:
            mask = mask[None, None]
        mask = np.repeat(np.broadcast_to(mask, (b, hkv, nq, nk)), group, axis=1)
        s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    seen = np.isfinite(m)
    p = np.exp(s - np.where(seen, m, 0.0))
    l = p.sum(axis=-1, keepdims=True)
    o = np.where(seen, np.einsum("bhij,bhjd->bhid", p, v) / np.where(seen, l, 1.0), 0.0)
    lse = np.where(seen, m + np.log(np.where(seen, l, 1.0)), -np.inf)[..., 0]
    if layout == "NHD":
        o = o.transpose(0, 2, 1, 3)
    return o, lse


def metrics(out, ref):
    """(cosine similarity, relative L1 error, max abs error) in fp64."""
    a = np.asarray(out, dtype=np.float64).ravel()
    r = np.asarray(ref, dtype=np.float64).ravel()
    denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(r, r)))
    cos = float(np.dot(a, r)) / denom if denom > 0 else (1.0 if not a.any() and not r.any() else 0.0)
    l1 = float(np.abs(r).sum())
    rel = float(np.abs(a - r).sum()) / l1 if l1 > 0 else float(np.abs(a).sum())
    return cos, rel, float(np.abs(a - r).max())


def randn(rng, shape, dtype="float16", bias=None):
    x = rng.standard_normal(shape)
    if bias is not None:
        x = x + bias
    return x.astype(dtype)
