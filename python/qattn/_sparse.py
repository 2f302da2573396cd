"""qattn.sparse_attention: attention restricted by structured masks (a local
window, sink tokens, causal), by a block layout given with each call, or by a
layout predicted from Q and K at each run (SpargeAttn), plus SpargeAttn's
P.V skipping. A ctypes binding of qattn.h's "sparse attention (pruning)".

Visibility of score (i, j), with i' = i + Nk - Nq (bottom-right aligned):
    causal (if is_causal)   j <= i'
    AND window (if given)   i' - left <= j <= i' + right  (-1: unbounded side)
                            OR j < sink_tokens
    AND layout (if any)     key block j // k_block is listed for query block
                            i // q_block of the row's (batch, KV head)

Layouts are block CSR (BlockLayout): row r = (b * Hkv + hkv) * ceil(Nq /
q_block) + qb lists its kept key blocks in ascending order; int32 indptr
[rows + 1] and indices [nnz]. BlockLayout converts dense block masks,
FlexAttention's BlockMask and FlashInfer's BSR to and from it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import sys

from . import _capi as capi
from ._attention import _Call, _address
from ._capi import SparseLayoutKind
from ._core import _read_layout, _sparse_function

_INT32_MAX = 2 ** 31 - 1


def _np():
    import numpy
    return numpy


def _host_array(x, name):
    """A numpy view or copy of an array-like (numpy, torch on any device, lists)."""
    np = _np()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - the message says what was given
        raise ValueError("%s: cannot read %s as an array (%s)" % (name, type(x).__name__, e))


def _int_array(x, name, ndim=None):
    """An int64 numpy array of x (integers only; bools refused)."""
    np = _np()
    a = _host_array(x, name)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError("%s must hold integers, got dtype %s" % (name, a.dtype))
    if ndim is not None and a.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError("%s must be %s-D, got shape %s" % (name, ndim if isinstance(ndim, int) else
                                                              " or ".join(map(str, ndim)), list(a.shape)))
    return a.astype(np.int64, copy=False)


def _positive_int(value, name):
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError("%s=%r must be a positive integer" % (name, value))
    return int(value)


def _block_size(value, name):
    value = _positive_int(value, name)
    if value % 16:
        raise ValueError("%s=%d: qattn's layout blocks are multiples of 16 tokens" % (name, value))
    return value


def _ceil_div(a, b):
    return -(-a // b)


# ---------------------------------------------------------------- visibility


def _parse_window(window, sink_tokens):
    """(window flag, left, right, sinks) of the user's window and sink_tokens."""
    sinks = int(sink_tokens or 0)
    if sinks < 0:
        raise ValueError("sink_tokens=%d must be >= 0" % sinks)
    if window is None:
        return (1, -1, -1, sinks) if sinks else (0, 0, 0, 0)
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError("window=%r must be a pair (left, right) of key counts, -1 for an unbounded side" %
                         (window,))
    left, right = int(left), int(right)
    if left < -1 or right < -1:
        raise ValueError("window=(%d, %d): each side is >= 0, or -1 for unbounded" % (left, right))
    return 1, left, right, sinks


def _row_keys(nq, nk, is_causal, window, sink_tokens):
    """Per query row i: (lo, hi, sinks) arrays such that row i sees keys
    [lo, hi) and [0, sinks) before the layout (mirrors qattn_sparse_row_keys)."""
    np = _np()
    flag, left, right, sinks = _parse_window(window, sink_tokens)
    place = np.arange(nq, dtype=np.int64) + (nk - nq)
    causal_end = np.minimum(place + 1, nk) if is_causal else np.full(nq, nk, dtype=np.int64)
    hi = causal_end.copy()
    lo = np.zeros(nq, dtype=np.int64)
    sink_end = np.zeros(nq, dtype=np.int64)
    if flag:
        if right >= 0:
            hi = np.minimum(hi, place + right + 1)
        if left >= 0:
            lo = np.maximum(place - left, 0)
        sink_end = np.clip(np.minimum(sinks, causal_end), 0, None)
    hi = np.maximum(hi, lo)
    return lo, hi, sink_end


def sparse_mask(nq, nk, is_causal=False, window=None, sink_tokens=0, layout=None):
    """The element mask qattn applies: bool [Nq, Nk] without a layout, else
    [B, Hkv, Nq, Nk] (True: visible). For references and tests; its size is
    Nq x Nk per (b, KV head)."""
    np = _np()
    lo, hi, sink_end = _row_keys(nq, nk, is_causal, window, sink_tokens)
    j = np.arange(nk)[None, :]
    mask = ((j >= lo[:, None]) & (j < hi[:, None])) | (j < sink_end[:, None])
    if layout is None:
        return mask
    if not isinstance(layout, BlockLayout):
        raise ValueError("layout must be a BlockLayout, got %s" % type(layout).__name__)
    layout._check_problem(nq, nk)
    dense = layout.to_dense()
    rows = np.arange(nq) // layout.q_block
    cols = np.arange(nk) // layout.k_block
    return mask[None, None] & dense[:, :, rows][:, :, :, cols]


def block_visibility(nq, nk, q_block, k_block, is_causal=False, window=None, sink_tokens=0):
    """bool [ceil(Nq / q_block), ceil(Nk / k_block)]: whether a block holds an
    element the structured masks leave visible (as qattn_sparse_block_visible:
    the blocks PREDICT chooses among and densities count)."""
    np = _np()
    q_block, k_block = _positive_int(q_block, "q_block"), _positive_int(k_block, "k_block")
    lo, hi, sink_end = _row_keys(nq, nk, is_causal, window, sink_tokens)
    qb_count, kb_count = _ceil_div(nq, q_block), _ceil_div(nk, k_block)
    # Per query block, the union over its rows: [min lo, max hi) plus [0, max sinks).
    starts = np.arange(qb_count) * q_block
    blo = np.minimum.reduceat(lo, starts)
    bhi = np.maximum.reduceat(hi, starts)
    bsink = np.maximum.reduceat(sink_end, starts)
    nonempty = np.maximum.reduceat(hi - lo, starts) > 0
    k0 = np.arange(kb_count) * k_block
    k1 = np.minimum(nk, k0 + k_block)
    window_part = (k0[None, :] < bhi[:, None]) & (k1[None, :] > blo[:, None]) & nonempty[:, None]
    return window_part | (k0[None, :] < bsink[:, None])


# ------------------------------------------------------------ block layouts


class BlockLayout:
    """A block-sparse layout in qattn's block CSR: for each (batch, KV head,
    query block) row, the ascending key blocks it keeps.

    indptr: int32 [batch * heads_kv * q_blocks + 1], indptr[0] == 0.
    indices: int32 [indptr[-1]]; row r = (b * heads_kv + h) * q_blocks + qb.
    q_block, k_block: tokens per block, multiples of 16.
    batch, heads_kv: 1 means "the same for every batch / KV head"
    (sparse_attention broadcasts it).

    Converters: from_dense / to_dense ([B, Hkv, Qb, Kb] bool), from_flex /
    to_flex (torch FlexAttention's BlockMask arrays), from_bsr / to_bsr
    (FlashInfer's BSR). Invalid input raises ValueError naming the entry.
    """

    def __init__(self, indptr, indices, q_block, k_block, batch, heads_kv, q_blocks, k_blocks):
        np = _np()
        self.q_block = _block_size(q_block, "q_block")
        self.k_block = _block_size(k_block, "k_block")
        self.batch = _positive_int(batch, "batch")
        self.heads_kv = _positive_int(heads_kv, "heads_kv")
        self.q_blocks = _positive_int(q_blocks, "q_blocks")
        self.k_blocks = _positive_int(k_blocks, "k_blocks")
        ptr = _int_array(indptr, "indptr", 1)
        idx = _int_array(indices, "indices", 1)
        rows = self.rows
        if rows >= _INT32_MAX or self.k_blocks >= _INT32_MAX:
            raise ValueError("%d rows of %d key blocks exceed qattn's int32 layouts" % (rows, self.k_blocks))
        if ptr.shape[0] != rows + 1:
            raise ValueError("indptr has %d entries; batch=%d x heads_kv=%d x q_blocks=%d rows need %d" %
                             (ptr.shape[0], self.batch, self.heads_kv, self.q_blocks, rows + 1))
        if ptr[0] != 0:
            raise ValueError("indptr[0]=%d must be 0" % ptr[0])
        steps = np.diff(ptr)
        if (steps < 0).any():
            r = int(np.argmax(steps < 0))
            raise ValueError("indptr decreases at indptr[%d]=%d > indptr[%d]=%d" % (r, ptr[r], r + 1, ptr[r + 1]))
        if ptr[-1] != idx.shape[0]:
            raise ValueError("indptr[-1]=%d must equal the %d entries of indices" % (ptr[-1], idx.shape[0]))
        if ptr[-1] > _INT32_MAX:
            raise ValueError("%d entries exceed qattn's int32 layouts" % ptr[-1])
        if idx.size:
            bad = (idx < 0) | (idx >= self.k_blocks)
            if bad.any():
                e = int(np.argmax(bad))
                raise ValueError("indices[%d]=%d (row %d) is not a key block in [0, %d)" %
                                 (e, idx[e], self._row_of(ptr, e), self.k_blocks))
            row_of = np.repeat(np.arange(rows), steps)
            bad = (np.diff(idx) <= 0) & (np.diff(row_of) == 0)
            if bad.any():
                e = int(np.argmax(bad)) + 1
                raise ValueError("indices[%d]=%d (row %d) does not follow %d in ascending order (each row lists "
                                 "distinct key blocks, ascending)" % (e, idx[e], row_of[e], idx[e - 1]))
        self.indptr = np.ascontiguousarray(ptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(idx, dtype=np.int32)

    @staticmethod
    def _row_of(ptr, e):
        return int(_np().searchsorted(ptr, e, side="right") - 1)

    # ------------------------------------------------------------ basics

    @property
    def rows(self):
        return self.batch * self.heads_kv * self.q_blocks

    @property
    def nnz(self):
        return int(self.indices.shape[0])

    @property
    def shape(self):
        """(batch, heads_kv, q_blocks, k_blocks) of to_dense()."""
        return (self.batch, self.heads_kv, self.q_blocks, self.k_blocks)

    def __repr__(self):
        return ("qattn.BlockLayout(batch=%d, heads_kv=%d, q_blocks=%d x %d, k_blocks=%d x %d, nnz=%d)" %
                (self.batch, self.heads_kv, self.q_blocks, self.q_block, self.k_blocks, self.k_block, self.nnz))

    def __eq__(self, other):
        if not isinstance(other, BlockLayout):
            return NotImplemented
        np = _np()
        return (self.shape == other.shape and (self.q_block, self.k_block) == (other.q_block, other.k_block) and
                np.array_equal(self.indptr, other.indptr) and np.array_equal(self.indices, other.indices))

    __hash__ = None

    def row(self, b, h, qb):
        """The key blocks of one (batch, KV head, query block) row."""
        r = (b * self.heads_kv + h) * self.q_blocks + qb
        return self.indices[self.indptr[r]:self.indptr[r + 1]]

    def expand(self, batch, heads_kv):
        """This layout for `batch` x `heads_kv` rows, broadcasting a batch or
        heads_kv of 1; returns self when they already match."""
        batch, heads_kv = int(batch), int(heads_kv)
        if (batch, heads_kv) == (self.batch, self.heads_kv):
            return self
        for name, mine, want in (("batch", self.batch, batch), ("heads_kv", self.heads_kv, heads_kv)):
            if mine not in (1, want):
                raise ValueError("the layout's %s=%d does not match the problem's %d (a layout of 1 is broadcast)" %
                                 (name, mine, want))
        np = _np()
        counts = np.diff(self.indptr.astype(np.int64)).reshape(self.batch, self.heads_kv, self.q_blocks)
        parts = []
        for b in range(batch):
            for h in range(heads_kv):
                s = (b if self.batch > 1 else 0) * self.heads_kv + (h if self.heads_kv > 1 else 0)
                parts.append(self.indices[self.indptr[s * self.q_blocks]:self.indptr[(s + 1) * self.q_blocks]])
        counts = np.broadcast_to(counts, (batch, heads_kv, self.q_blocks)).ravel()
        indptr = np.concatenate([[0], np.cumsum(counts)])
        indices = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return BlockLayout(indptr, indices, self.q_block, self.k_block, batch, heads_kv, self.q_blocks,
                           self.k_blocks)

    def _check_problem(self, nq, nk):
        want = (_ceil_div(nq, self.q_block), _ceil_div(nk, self.k_block))
        if (self.q_blocks, self.k_blocks) != want:
            raise ValueError("the layout has %d x %d blocks of %d x %d tokens; Nq=%d, Nk=%d need %d x %d" %
                             (self.q_blocks, self.k_blocks, self.q_block, self.k_block, nq, nk, want[0], want[1]))

    def density(self, nq=None, nk=None, is_causal=False, window=None, sink_tokens=0):
        """float64 [batch, heads_kv]: the fraction of the blocks visible under
        the structured masks that the layout keeps (as qattn reports for
        predicted layouts). nq, nk default to whole blocks."""
        np = _np()
        nq = self.q_blocks * self.q_block if nq is None else int(nq)
        nk = self.k_blocks * self.k_block if nk is None else int(nk)
        self._check_problem(nq, nk)
        visible = block_visibility(nq, nk, self.q_block, self.k_block, is_causal, window, sink_tokens)
        total = int(visible.sum())
        kept = (self.to_dense() & visible).sum(axis=(2, 3))
        return kept / total if total else np.zeros((self.batch, self.heads_kv))

    # ------------------------------------------------------- dense masks

    @classmethod
    def from_dense(cls, mask, q_block, k_block, batch=None, heads_kv=None):
        """From a boolean block mask [Qb, Kb], [Hkv, Qb, Kb] or [B, Hkv, Qb, Kb]
        (numpy, torch or nested lists; nonzero = kept). batch / heads_kv
        broadcast dims of size 1 (and missing leading dims)."""
        np = _np()
        m = _host_array(mask, "mask")
        if m.ndim not in (2, 3, 4):
            raise ValueError("mask must be [Qb, Kb], [Hkv, Qb, Kb] or [B, Hkv, Qb, Kb]; got shape %s" %
                             list(m.shape))
        if not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.integer)):
            raise ValueError("mask must be boolean (or integer 0/1), got dtype %s" % m.dtype)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape) != 0
        b = m.shape[0] if batch is None else int(batch)
        h = m.shape[1] if heads_kv is None else int(heads_kv)
        for name, have, want in (("batch", m.shape[0], b), ("heads_kv", m.shape[1], h)):
            if have not in (1, want):
                raise ValueError("mask's %s dim is %d, cannot broadcast to %d" % (name, have, want))
        if m.shape[2] < 1 or m.shape[3] < 1:
            raise ValueError("mask has no blocks: shape %s" % list(m.shape))
        m = np.broadcast_to(m, (b, h) + m.shape[2:])
        flat = m.reshape(-1, m.shape[3])
        counts = flat.sum(axis=1)
        indices = np.nonzero(flat)[1]
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return cls(indptr, indices, q_block, k_block, b, h, m.shape[2], m.shape[3])

    def to_dense(self):
        """bool [batch, heads_kv, q_blocks, k_blocks]."""
        np = _np()
        dense = np.zeros((self.rows, self.k_blocks), dtype=np.bool_)
        rows = np.repeat(np.arange(self.rows), np.diff(self.indptr))
        dense[rows, self.indices] = True
        return dense.reshape(self.shape)

    # ------------------------------------------------------ FlexAttention

    @classmethod
    def from_flex(cls, kv_num_blocks, kv_indices=None, full_kv_num_blocks=None, full_kv_indices=None,
                  q_block=None, k_block=None, heads_kv=None, merge_gqa=False):
        """From torch FlexAttention's BlockMask convention, without importing it:
        kv_num_blocks int [B, H, Qb] and kv_indices int [B, H, Qb, KVb] (row
        (b, h, q) keeps kv_indices[b, h, q, :kv_num_blocks[b, h, q]], in any
        order), and the optional full_kv_num_blocks / full_kv_indices of the
        blocks FlexAttention runs without mask_mod. qattn has no full-block
        flags (it masks only the window and causal edges), so both sets are
        united. Arrays may be numpy, torch (any device) or lists; a BlockMask
        object itself may be passed as kv_num_blocks (its BLOCK_SIZE gives the
        block sizes).

        Only the block structure is taken: a mask_mod's element-wise mask
        inside partial blocks is not (express causal or sliding windows with
        sparse_attention's is_causal and window).

        q_block, k_block: FlexAttention's BLOCK_SIZE (default 128, its default).
        H is FlexAttention's head dim (query heads, or 1 for all): with
        heads_kv given and H = g * heads_kv, the g query heads of a GQA group
        must share a qattn row, which merge_gqa=True does by uniting them
        (less sparse; qattn's layouts are per KV head). B or H of 1 broadcast.
        """
        np = _np()
        if hasattr(kv_num_blocks, "kv_num_blocks") and kv_indices is None:
            mask = kv_num_blocks
            kv_num_blocks, kv_indices = mask.kv_num_blocks, mask.kv_indices
            full_kv_num_blocks = getattr(mask, "full_kv_num_blocks", None)
            full_kv_indices = getattr(mask, "full_kv_indices", None)
            size = getattr(mask, "BLOCK_SIZE", None)
            if size is not None:
                size = (size, size) if isinstance(size, int) else tuple(size)
                q_block = size[0] if q_block is None else q_block
                k_block = size[1] if k_block is None else k_block
        if kv_indices is None:
            raise ValueError("from_flex needs kv_num_blocks and kv_indices (or a BlockMask)")
        q_block = 128 if q_block is None else q_block
        k_block = 128 if k_block is None else k_block
        dense = cls._flex_dense(kv_num_blocks, kv_indices, "kv_num_blocks", "kv_indices")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices come together (got only one)")
        if full_kv_num_blocks is not None:
            full = cls._flex_dense(full_kv_num_blocks, full_kv_indices, "full_kv_num_blocks", "full_kv_indices")
            if full.shape[2:] != dense.shape[2:]:
                raise ValueError("full_kv_* have %d x %d blocks, kv_* %d x %d" % (full.shape[2], full.shape[3],
                                                                                  dense.shape[2], dense.shape[3]))
            try:
                shape = np.broadcast_shapes(full.shape[:2], dense.shape[:2])
                dense = np.broadcast_to(dense, shape + dense.shape[2:]) | np.broadcast_to(full, shape +
                                                                                            full.shape[2:])
            except ValueError:
                raise ValueError("full_kv_num_blocks's [B, H] %s and kv_num_blocks's %s do not broadcast" %
                                 (list(full.shape[:2]), list(dense.shape[:2])))
        h = dense.shape[1]
        if heads_kv is not None and h not in (1, int(heads_kv)):
            heads_kv = int(heads_kv)
            if h % heads_kv:
                raise ValueError("the mask's %d heads are neither 1, heads_kv=%d, nor a multiple of it" %
                                 (h, heads_kv))
            if not merge_gqa:
                raise ValueError("the mask has %d (query) heads but qattn's layout has one row per KV head "
                                 "(heads_kv=%d); pass merge_gqa=True to unite each group of %d query heads" %
                                 (h, heads_kv, h // heads_kv))
            dense = dense.reshape(dense.shape[0], heads_kv, h // heads_kv, *dense.shape[2:]).any(axis=2)
        return cls.from_dense(dense, q_block, k_block)

    @staticmethod
    def _flex_dense(num, idx, num_name, idx_name):
        np = _np()
        num = _int_array(num, num_name, 3)
        idx = _int_array(idx, idx_name, 4)
        if idx.shape[:3] != num.shape:
            raise ValueError("%s is %s but %s is %s: they must be [B, H, Qb] and [B, H, Qb, KVb]" %
                             (num_name, list(num.shape), idx_name, list(idx.shape)))
        kvb = idx.shape[3]
        if kvb < 1 or num.shape[2] < 1:
            raise ValueError("%s has no blocks: shape %s" % (idx_name, list(idx.shape)))
        if (num < 0).any() or (num > kvb).any():
            at = tuple(int(x[0]) for x in np.nonzero((num < 0) | (num > kvb)))
            raise ValueError("%s%s=%d is not in [0, %d]" % (num_name, list(at), num[at], kvb))
        valid = np.arange(kvb) < num[..., None]
        bad = valid & ((idx < 0) | (idx >= kvb))
        if bad.any():
            at = tuple(int(x[0]) for x in np.nonzero(bad))
            raise ValueError("%s%s=%d is not a key block in [0, %d)" % (idx_name, list(at), idx[at], kvb))
        dense = np.zeros(idx.shape, dtype=np.bool_)
        b, h, q, slot = np.nonzero(valid)
        dense[b, h, q, idx[b, h, q, slot]] = True
        kept = dense.sum(axis=3)
        if (kept != num).any():
            at = tuple(int(x[0]) for x in np.nonzero(kept != num))
            raise ValueError("%s%s repeats a key block in its first %d entries" % (idx_name, list(at), num[at]))
        return dense

    def to_flex(self):
        """(kv_num_blocks int32 [B, Hkv, Qb], kv_indices int32 [B, Hkv, Qb, Kb])
        in torch's own ordering (create_block_mask's: each row's kept blocks
        ascending, then the others ascending). Wrap them with torch.from_numpy
        and BlockMask.from_kv_blocks(kv_num_blocks, kv_indices,
        BLOCK_SIZE=(q_block, k_block)); with GQA, FlexAttention broadcasts a
        mask of Hkv heads only when Hkv == 1: repeat_interleave dim 1 by
        Hq / Hkv first."""
        np = _np()
        dense = self.to_dense()
        num = dense.sum(axis=3).astype(np.int32)
        order = np.argsort(~dense, axis=3, kind="stable").astype(np.int32)
        return num, order

    # --------------------------------------------------------- FlashInfer

    @classmethod
    def from_bsr(cls, indptr, indices, M, N, R, C, batch=1):
        """From FlashInfer's block sparse row format (BlockSparseAttentionWrapper
        .plan(indptr, indices, M, N, R, C, ...)): the [M, N] score matrix in
        R x C blocks, indptr [MB + 1], indices [nnz] (MB = ceil(M / R)), one
        pattern shared by all heads -> a layout of heads_kv 1. Per KV head:
        indptr [Hkv, MB + 1] (or a list of Hkv arrays) and a list of Hkv
        indices arrays, each head's own BSR. Column indices within a row may
        come in any order (sorted here); repeats are refused. batch: the
        layout's batch (FlashInfer's BSR is one sequence).
        R and C must be multiples of 16 (qattn's blocks)."""
        np = _np()
        M, N = _positive_int(M, "M"), _positive_int(N, "N")
        R, C = _block_size(R, "R"), _block_size(C, "C")
        mb, nb = _ceil_div(M, R), _ceil_div(N, C)
        if isinstance(indptr, (list, tuple)) and len(indptr) and np.ndim(indptr[0]) >= 1:
            per_head = True
        else:
            per_head = _host_array(indptr, "indptr").ndim == 2
        if per_head:
            ptrs = [_int_array(p, "indptr[%d]" % h, 1) for h, p in enumerate(indptr)]
            if not isinstance(indices, (list, tuple)):
                raise ValueError("with per-head indptr [Hkv, MB + 1], indices must be a list of Hkv arrays")
            idxs = [_int_array(x, "indices[%d]" % h, 1) for h, x in enumerate(indices)]
            if len(idxs) != len(ptrs):
                raise ValueError("%d indptr rows but %d indices arrays" % (len(ptrs), len(idxs)))
        else:
            ptrs, idxs = [_int_array(indptr, "indptr", 1)], [_int_array(indices, "indices", 1)]
        dense = np.zeros((len(ptrs), mb, nb), dtype=np.bool_)
        for h, (ptr, idx) in enumerate(zip(ptrs, idxs)):
            where = "" if not per_head else " of head %d" % h
            if ptr.shape[0] != mb + 1:
                raise ValueError("indptr%s has %d entries; M=%d in blocks of R=%d needs %d" %
                                 (where, ptr.shape[0], M, R, mb + 1))
            if ptr[0] != 0 or (np.diff(ptr) < 0).any() or ptr[-1] != idx.shape[0]:
                raise ValueError("indptr%s must start at 0, never decrease and end at len(indices)=%d; got %s" %
                                 (where, idx.shape[0], ptr.tolist() if ptr.size <= 16 else "[...]"))
            if idx.size and ((idx < 0) | (idx >= nb)).any():
                e = int(np.argmax((idx < 0) | (idx >= nb)))
                raise ValueError("indices%s[%d]=%d is not a column block in [0, %d) (N=%d, C=%d)" %
                                 (where, e, idx[e], nb, N, C))
            rows = np.repeat(np.arange(mb), np.diff(ptr))
            dense[h, rows, idx] = True
            if int(dense[h].sum()) != idx.shape[0]:
                raise ValueError("indices%s repeats a column block within a row" % where)
        return cls.from_dense(dense[None], R, C, batch=batch)

    def to_bsr(self, per_head=False):
        """FlashInfer BSR (indptr int32 [q_blocks + 1], indices int32), with
        R = q_block, C = k_block, M = q_blocks * R, N = k_blocks * C (or the
        true lengths). One pattern for all rows (every (b, KV head) equal, else
        ValueError); per_head=True: lists of batch * heads_kv indptr and
        indices arrays, in (b, h) order."""
        np = _np()
        n = self.batch * self.heads_kv
        ptrs, idxs = [], []
        for s in range(n):
            base = self.indptr[s * self.q_blocks]
            ptrs.append((self.indptr[s * self.q_blocks:(s + 1) * self.q_blocks + 1] - base).astype(np.int32))
            idxs.append(self.indices[base:self.indptr[(s + 1) * self.q_blocks]].copy())
        if per_head:
            return ptrs, idxs
        for s in range(1, n):
            if not (np.array_equal(ptrs[s], ptrs[0]) and np.array_equal(idxs[s], idxs[0])):
                raise ValueError("the layout differs between (batch, KV head) rows (row set %d differs from 0): "
                                 "use to_bsr(per_head=True)" % s)
        return ptrs[0], idxs[0]

    # ----------------------------------------------------------- qattn CSR

    @classmethod
    def from_csr(cls, indptr, indices, q_block, k_block, nq, nk, batch=1, heads_kv=1):
        """From qattn's own CSR for a problem of Nq x Nk tokens: indptr of
        B * Hkv * Qb + 1 entries, or Hkv * Qb + 1 (shared by the batch) or
        Qb + 1 (shared by all)."""
        q_block, k_block = _block_size(q_block, "q_block"), _block_size(k_block, "k_block")
        qb, kb = _ceil_div(int(nq), q_block), _ceil_div(int(nk), k_block)
        n = _int_array(indptr, "indptr", 1).shape[0] - 1
        for b, h in ((batch, heads_kv), (1, heads_kv), (1, 1)):
            if n == b * h * qb:
                return cls(indptr, indices, q_block, k_block, b, h, qb, kb)
        raise ValueError("indptr has %d rows; Nq=%d in blocks of %d gives %d query blocks, so B*Hkv*Qb=%d, Hkv*Qb=%d "
                         "or Qb=%d rows" % (n, nq, q_block, qb, batch * heads_kv * qb, heads_kv * qb, qb))


# ---------------------------------------------------------------- prediction


@dataclasses.dataclass
class PredictParams:
    """SpargeAttn-style layout prediction (QATTN_SPARSE_PREDICT), as the plan
    takes it, plus SpargeAttn's second stage (pv_threshold).

    sim_threshold: theta in [-1, 1]; a query or key block whose tokens are
        not alike (see qattn.h: a token's cosine to the block's mean below
        theta) keeps every key block (its mean does not represent it).
        Higher: more blocks kept.
    cdf_threshold: tau in (0, 1]: key blocks are kept heaviest first (softmax
        of the pooled scores) until this share of the weight; None: 0.98
        unless topk is set. Higher: more blocks kept.
    topk: (0, 1], instead of cdf_threshold: keep this fraction of the visible
        key blocks.
    sink_blocks, recent_blocks: first / last visible key blocks always kept.
    last_q_blocks: the last query blocks keep every visible key block (the
        end of a prompt, where a question sits, sees all of it).
    q_block, k_block: block sizes, multiples of 16 (0: the library's 128 x 64).
    pv_threshold: lambda (log2 units) of P.V skipping; 0: off. Higher: less
        skipped.
    """
    sim_threshold: float = 0.5
    cdf_threshold: float = None
    topk: float = 0.0
    sink_blocks: int = 0
    recent_blocks: int = 0
    last_q_blocks: int = 0
    q_block: int = 128
    k_block: int = 64
    pv_threshold: float = 0.0

    @classmethod
    def coerce(cls, value):
        """A PredictParams from None (None), True (defaults), a PredictParams, a
        dict of its fields, or any object with (some of) its fields as
        attributes (a tune_sparsity result gives its common params)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if hasattr(value, "common") and isinstance(getattr(value, "common"), cls):
            return value.common
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ValueError("predict: unknown keys %s; valid: %s" % (unknown, ", ".join(names)))
            return cls(**value)
        found = {n: getattr(value, n) for n in names if hasattr(value, n)}
        if not found:
            raise ValueError("predict=%r: expected a dict, a PredictParams or an object with %s" %
                             (value, ", ".join(names)))
        return cls(**found)

    def resolved_cdf(self):
        if self.cdf_threshold is not None:
            return float(self.cdf_threshold)
        return 0.0 if self.topk else 0.98

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["cdf_threshold"] = self.resolved_cdf()
        return d


def make_sparse_desc(window=None, sink_tokens=0, layout=SparseLayoutKind.NO_LAYOUT, q_block=0, k_block=0,
                     predict=None, pv_threshold=0.0):
    """A capi.SparseDesc from sparse_attention's options. predict: a
    PredictParams (or what PredictParams.coerce takes), which implies the
    PREDICT layout and gives the block sizes unless q_block / k_block are."""
    flag, left, right, sinks = _parse_window(window, sink_tokens)
    predict = PredictParams.coerce(predict)
    d = capi.SparseDesc()
    d.window, d.window_left, d.window_right, d.sink_tokens = flag, left, right, sinks
    if predict is not None:
        layout = SparseLayoutKind.PREDICT
        q_block = q_block or int(predict.q_block or 0)
        k_block = k_block or int(predict.k_block or 0)
    d.layout = int(layout)
    d.q_block, d.k_block = int(q_block), int(k_block)
    if predict is not None:
        d.sim_threshold = float(predict.sim_threshold)
        d.cdf_threshold = predict.resolved_cdf()
        d.topk = float(predict.topk or 0.0)
        d.sink_blocks = int(predict.sink_blocks)
        d.recent_blocks = int(predict.recent_blocks)
        d.last_q_blocks = int(predict.last_q_blocks)
    d.pv_threshold = float(pv_threshold)
    return d


# ---------------------------------------------------------------- the call


class _SparseCall(_Call):
    """An attention call through qattn_sparse_plan_create / qattn_sparse_run."""

    def __init__(self, q, k, v, is_causal, sm_scale, precision, layout, return_lse, granularity, smooth_k,
                 check_finite, window, sink_tokens, block_mask, predict, pv_threshold, return_layout,
                 cache_plan=True):
        self.is_causal = bool(is_causal)
        self.window = window
        self.sink_tokens = int(sink_tokens or 0)
        self.return_layout = bool(return_layout)
        self.cache_plan = cache_plan
        self.predict = PredictParams.coerce(predict)
        pv = float(pv_threshold or 0.0)
        if self.predict is not None and self.predict.pv_threshold:
            if pv and pv != float(self.predict.pv_threshold):
                raise ValueError("pv_threshold=%g and predict's pv_threshold=%g disagree: give one" %
                                 (pv, self.predict.pv_threshold))
            pv = float(self.predict.pv_threshold)
        if self.predict is not None and block_mask is not None:
            raise ValueError("block_mask and predict are exclusive: a layout is either given or predicted")
        self.given = block_mask
        if self.predict is not None:
            kind, qb, kb = SparseLayoutKind.PREDICT, int(self.predict.q_block or 0), int(self.predict.k_block or 0)
        elif block_mask is not None:
            if isinstance(block_mask, BlockLayout):
                qb, kb = block_mask.q_block, block_mask.k_block
            else:
                try:
                    _, _, qb, kb = block_mask
                except (TypeError, ValueError):
                    raise ValueError("block_mask must be a BlockLayout or a tuple (indptr, indices, q_block, "
                                     "k_block); got %s" % type(block_mask).__name__)
                qb, kb = _block_size(qb, "block_mask's q_block"), _block_size(kb, "block_mask's k_block")
            kind = SparseLayoutKind.BLOCKS
        else:
            kind, qb, kb = SparseLayoutKind.NO_LAYOUT, 0, 0
        if self.return_layout and kind == SparseLayoutKind.NO_LAYOUT:
            raise ValueError("return_layout needs a layout (block_mask or predict)")
        self.kind = kind
        self.sparse_desc = make_sparse_desc(window, sink_tokens, kind, qb, kb, self.predict, pv)
        super().__init__(q, k, v, is_causal, sm_scale, precision, layout, return_lse, granularity, smooth_k,
                         check_finite)
        qd, kd = self.plan.desc.q, self.plan.desc.k
        self.batch, self.heads_kv = int(kd.shape[0]), int(kd.shape[1])
        self.nq, self.nk = int(qd.shape[2]), int(kd.shape[2])
        self.block_layout = None
        self.layout_arrays = None
        if kind == SparseLayoutKind.BLOCKS:
            given = block_mask
            if not isinstance(given, BlockLayout):
                given = BlockLayout.from_csr(given[0], given[1], qb, kb, self.nq, self.nk, self.batch, self.heads_kv)
            given._check_problem(self.nq, self.nk)
            self.block_layout = given.expand(self.batch, self.heads_kv)
            self.layout_arrays = self._device_arrays(self.block_layout)

    def _make_plan(self, key, build_desc):
        sparse = self.sparse_desc
        if not self.cache_plan:
            return self.ctx.create_sparse_plan(build_desc(), sparse)
        return self.ctx.cached_plan(key + ("sparse",) + sparse.key(), lambda: (build_desc(), sparse),
                                    create=lambda pair: self.ctx.create_sparse_plan(*pair))

    def _device_arrays(self, layout):
        """The layout's indptr and indices where the kernels read them (None
        for empty indices)."""
        arrays = [layout.indptr, layout.indices if layout.nnz else None]
        if self.framework == "torch":
            torch = sys.modules["torch"]
            device = self.ops[0].array.device
            arrays = [None if a is None else torch.from_numpy(a).to(device) for a in arrays]
        return arrays

    def _extra_regions(self):
        if self.layout_arrays is None:
            return []
        return [None if a is None else (_address(a), 4 * (a.numel() if hasattr(a, "numel") else a.size), 0)
                for a in self.layout_arrays]

    def _invoke(self, lib, plan_handle, args, extra_handles):
        fn = _sparse_function("qattn_sparse_run")
        if extra_handles:
            sparse = capi.SparseArgs(extra_handles[0], extra_handles[1], self.block_layout.nnz)
        else:
            sparse = capi.SparseArgs(None, None, 0)
        return fn(plan_handle, ctypes.byref(args), ctypes.byref(sparse))

    def _after_run(self, lib, handles, extra_handles):
        if not self.return_layout:
            return ()
        np = _np()
        if self.kind == SparseLayoutKind.BLOCKS:
            density = self.block_layout.density(self.nq, self.nk, self.is_causal, self.window,
                                                self.sink_tokens).astype(np.float32)
            return self.block_layout, density
        fn = _sparse_function("qattn_sparse_layout_read")
        rows, qb, kb = self.plan.layout_rows()
        indptr = np.zeros(rows + 1, dtype=np.int32)
        density = np.zeros(self.batch * self.heads_kv, dtype=np.float32)
        count = ctypes.c_int64()
        ws_handle = handles[5]
        _read_layout(fn, self.plan, ws_handle, 0, indptr, None, 0, count, density)
        indices = np.zeros(int(count.value), dtype=np.int32)
        if count.value:
            _read_layout(fn, self.plan, ws_handle, 0, None, indices, indices.size, count, None)
        layout = BlockLayout(indptr, indices, qb, kb, self.batch, self.heads_kv, _ceil_div(self.nq, qb),
                             _ceil_div(self.nk, kb))
        return layout, density.reshape(self.batch, self.heads_kv)


def sparse_attention(q, k, v, *, is_causal=False, sm_scale=None, precision="auto", layout="HND", window=None,
                     sink_tokens=0, block_mask=None, predict=None, pv_threshold=0.0, return_lse=False,
                     return_layout=False, granularity=None, smooth_k=None, check_finite=False):
    """Attention restricted to a sparse set of scores; otherwise as
    qattn.attention (same inputs, layouts, precisions, output and LSE).

    window: None, or (left, right): query i (at key place i' = i + Nk - Nq)
        sees keys i' - left .. i' + right; -1 leaves a side unbounded.
    sink_tokens: keys [0, sink_tokens) every query sees (still causal); with
        window None they change nothing.
    block_mask: a BlockLayout, or (indptr, indices, q_block, k_block) in
        qattn's block CSR (rows B*Hkv*Qb, Hkv*Qb or Qb: shared), intersected
        with the masks above. Checked here (the library skips its own check
        unless check_finite). A layout of batch or heads_kv 1 is broadcast.
    predict: a layout predicted from Q and K at each run (SpargeAttn): a
        PredictParams, a dict of its fields, True (defaults), or a
        tune_sparsity result (its common params).
    pv_threshold: lambda > 0 skips the P.V product of 16-row groups whose
        scores in a key step all lie more than lambda (log2 units) below the
        rows' running maxima; approximate by design. 0: off.
    return_layout: also return (layout, density): the BlockLayout the run used
        (predicted, or the given one broadcast) and float32 [B, Hkv], the
        share of the visible blocks kept. Host numpy data, also for torch.
    Returns O, (O, LSE), (O, layout, density) or (O, LSE, layout, density).
    Rows that see no key give O = 0 and LSE = -inf.
    """
    return _SparseCall(q, k, v, is_causal, sm_scale, precision, layout, return_lse, granularity, smooth_k,
                       check_finite, window, sink_tokens, block_mask, predict, pv_threshold, return_layout).run()


def sparse_attention_plan(q, k, v, *, is_causal=False, sm_scale=None, precision="auto", layout="HND", window=None,
                          sink_tokens=0, block_mask=None, predict=None, pv_threshold=0.0, return_lse=False,
                          granularity=None, smooth_k=None, check_finite=False):
    """The (cached) qattn.Plan sparse_attention runs with these arguments;
    plan.describe() reports the restriction, plan.sparse holds it."""
    return _SparseCall(q, k, v, is_causal, sm_scale, precision, layout, return_lse, granularity, smooth_k,
                       check_finite, window, sink_tokens, block_mask, predict, pv_threshold, False).plan


__all__ = ["BlockLayout", "PredictParams", "block_visibility", "make_sparse_desc", "sparse_attention",
           "sparse_attention_plan", "sparse_mask"]
