"""qattn.structured_qkv: synthetic Q, K, V with the structure sparse attention
exploits (randn inputs have none: every key matters a little to every query)."""
from __future__ import annotations

import math


def structured_qkv(b=1, hq=4, hkv=None, nq=1024, nk=None, d=64, seed=0, *, dtype="float16", layout="HND",
                   segments=8, topic_strength=4.0, local_width=24.0, local_strength=6.0, local_features=None,
                   sink_tokens=4, sink_strength=6.0, needle_len=16, needle_strength=12.0, noise=0.25,
                   head_jitter=0.5):
    """Q, K, V whose attention is sparse in the ways real models' is.

    Returns (q, k, v, info): numpy arrays [B, H, N, D] (layout "HND") or
    [B, N, H, D] ("NHD") of `dtype`, and a dict info with "needle_query" and
    "needle_key" (first token of the planted query run and key run, each
    needle_len long), "segment_starts" (key positions where topics begin),
    "sink_tokens" and "sm_scale" (1 / sqrt(D), the scale the strengths are
    given for). Nq <= Nk: query i sits at key place i' = i + Nk - Nq (as
    qattn's causal mask), and every rule below uses places.

    Recipe (all strengths are logits: score contributions after sm_scale; s =
    1 / sqrt(D); every random draw comes from numpy.random.default_rng(seed)
    in the order listed; the structure is shared by the batch, the noise and V
    are not):
    1. Dims [0, 2F) (F = local_features, default D // 4): locality. Per KV
       head, F frequencies w_f ~ N(0, 1 / local_width^2). A token at place p
       gets c * (cos(w_f p), sin(w_f p)) (cos in dim 2f, sin in 2f + 1) with
       c^2 * F * s = local_strength, in Q and K alike, so q.k * s =
       local_strength * mean_f cos(w_f (p_q - p_k)): a bump of height
       local_strength and Gaussian width ~local_width on the diagonal (random
       Fourier features of an RBF kernel).
    2. Dims [2F, D - 1): topics. Places [0, Nk) are cut into `segments`
       segments at the places round(Nk * (t + u_t) / segments), t = 1 ..
       segments - 1, u_t ~ U(-0.3, 0.3). Per KV head, each segment t has a unit
       vector u_t (normalized N(0, I)); its keys and queries get a * u_t with
       a^2 * s = topic_strength: queries attend to their segment's keys.
    3. Dim D - 1: sinks. Keys [0, sink_tokens) and every query get g there,
       g^2 * s = sink_strength: the first tokens draw attention from all.
    4. The needle: a unit vector z (normalized N(0, I) over the topic dims) is
       added, times n with n^2 * s = needle_strength, to keys [pk, pk +
       needle_len) and queries [pq, pq + needle_len), pk uniform in [Nk/8,
       Nk/2), pq uniform over the last quarter of the queries (clamped so the
       run fits and pq's place is past pk + needle_len + 4 * local_width):
       those queries retrieve those keys across the sequence. needle_len 0:
       no needle (positions -1).
    5. Per query head, the local, topic and needle strengths are multiplied
       by exp(U(-head_jitter, head_jitter)) each (heads differ: some more
       local, some more topical), query heads of a GQA group sharing their KV
       head's vectors.
    6. Q and K get N(0, noise^2) on every component; V is N(0, 1).
    """
    import numpy as np

    hkv = hq if hkv is None else int(hkv)
    nk = nq if nk is None else int(nk)
    b, hq, nq, d = int(b), int(hq), int(nq), int(d)
    if hq % hkv:
        raise ValueError("hq=%d must be a multiple of hkv=%d" % (hq, hkv))
    if nq > nk:
        raise ValueError("nq=%d > nk=%d: the generator places queries on the last Nq keys" % (nq, nk))
    f = d // 4 if local_features is None else int(local_features)
    if d < 2 * f + 4:
        raise ValueError("d=%d is too small for %d local features (2F + 4 dims needed)" % (d, f))
    if layout not in ("HND", "NHD"):
        raise ValueError("layout=%r; valid: 'HND' or 'NHD'" % (layout,))
    segments = max(1, int(segments))
    s = 1.0 / math.sqrt(d)
    rng = np.random.default_rng(seed)
    places_k = np.arange(nk)
    places_q = np.arange(nq) + (nk - nq)
    topic_dims = d - 2 * f - 1
    group = hq // hkv

    # 1. locality
    omega = rng.standard_normal((hkv, f)) / float(local_width)
    c = math.sqrt(local_strength / (f * s))

    def positional(places):  # [Hkv, N, 2F]
        angle = omega[:, None, :] * places[None, :, None]
        out = np.empty((hkv, len(places), 2 * f))
        out[:, :, 0::2] = np.cos(angle)
        out[:, :, 1::2] = np.sin(angle)
        return c * out

    # 2. topics
    cuts = [int(round(nk * (t + rng.uniform(-0.3, 0.3)) / segments)) for t in range(1, segments)]
    starts = np.array(sorted(set([0] + [min(max(x, 1), nk - 1) for x in cuts])), dtype=np.int64)
    topics = rng.standard_normal((hkv, len(starts), topic_dims))
    topics /= np.linalg.norm(topics, axis=-1, keepdims=True)
    a = math.sqrt(topic_strength / s)
    seg_k = np.searchsorted(starts, places_k, side="right") - 1
    seg_q = np.searchsorted(starts, places_q, side="right") - 1
    # 3. sinks
    g = math.sqrt(sink_strength / s)
    # 4. the needle
    needle_len = int(needle_len)
    if needle_len > 0:
        z = rng.standard_normal(topic_dims)
        z /= np.linalg.norm(z)
        n = math.sqrt(needle_strength / s)
        pk = int(rng.integers(nk // 8, max(nk // 2, nk // 8 + 1)))
        pk = min(pk, nk - needle_len)
        lo_q = max(nq - nq // 4, 0)
        pq = int(rng.integers(lo_q, max(nq - needle_len, lo_q) + 1))
        earliest = pk + needle_len + int(4 * local_width) - (nk - nq)  # the first query index far enough
        pq = min(max(pq, earliest), nq - needle_len)
        if pq < 0 or pq + (nk - nq) <= pk:
            raise ValueError("nq=%d / nk=%d are too short to plant a needle of %d tokens" % (nq, nk, needle_len))
    else:
        pk = pq = -1
    # 5. per query head strengths
    jitter = np.exp(rng.uniform(-head_jitter, head_jitter, size=(hq, 3)))

    k = np.zeros((hkv, nk, d))
    k[:, :, :2 * f] = positional(places_k)
    k[:, :, 2 * f:d - 1] = a * topics[np.arange(hkv)[:, None], seg_k[None, :]]
    k[:, :min(int(sink_tokens), nk), d - 1] = g
    if needle_len > 0:
        k[:, pk:pk + needle_len, 2 * f:d - 1] += n * z
    pos_q = positional(places_q)
    q = np.zeros((hq, nq, d))
    for h in range(hq):
        hk = h // group
        q[h, :, :2 * f] = jitter[h, 0] * pos_q[hk]
        q[h, :, 2 * f:d - 1] = jitter[h, 1] * a * topics[hk, seg_q]
        q[h, :, d - 1] = g
        if needle_len > 0:
            q[h, pq:pq + needle_len, 2 * f:d - 1] += jitter[h, 2] * n * z
    # 6. noise and values, per batch element
    q = q[None] + noise * rng.standard_normal((b, hq, nq, d))
    k = k[None] + noise * rng.standard_normal((b, hkv, nk, d))
    v = rng.standard_normal((b, hkv, nk, d))
    if layout == "NHD":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    q, k, v = (np.ascontiguousarray(x, dtype=dtype) for x in (q, k, v))
    info = {"needle_query": pq, "needle_key": pk, "needle_len": needle_len, "segment_starts": starts,
            "sink_tokens": min(int(sink_tokens), nk), "sm_scale": s}
    return q, k, v, info
