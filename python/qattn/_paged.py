"""A paged KV cache and decode-time pruning: qattn.h's "paged KV cache" section
as objects (libqattn 0.3 or later).

    cache = qattn.PagedKVCache("cpu", num_pages=256, page_size=16, heads_kv=2, head_dim=64,
                               dtype="f16", metadata=True)
    seq = cache.add_sequence()
    cache.append(seq, k, v)                     # [T, Hkv, D] numpy float32/float16
    o = qattn.paged_attention(cache, q, [seq])  # q [total_q, Hq, D]

The cache owns its device buffers (K, V, their scales for fp8/int8 pages, and
the page metadata that page selection reads when metadata=True) and a
qattn_page_pool; each sequence is a list of pages from it. paged_attention
builds the CSR page tables of the sequences it is given (qattn_page_tables_build),
makes a plan (qattn_paged_plan_create, or qattn_paged_select_plan_create with
select=...), runs it and reads back what was asked: the output, the LSE, the
selected pages per (sequence, KV head), the attention mass per page.
Eviction (qattn_evict_pages) returns pages of a sequence to the pool, oldest
first (sinks + a recent window) or by a per-page score such as the page mass
accumulated over decode steps (accumulate_mass).

Host numpy arrays travel through backend buffers (uploads and downloads), so
any backend runs it; torch tensors are read through numpy.
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import sys
from ctypes import POINTER, byref, c_float, c_int32, c_int64, c_void_p

from . import _capi as capi
from ._capi import DType, KVLayout, KVScales, PageTableKind
from ._core import Context, PlanInfo, _finalizing, raise_status, version
from ._errors import InvalidArgumentError, UnavailableError, error_for

_INT32_MAX = 2 ** 31 - 1


def _np():
    import numpy
    return numpy


def _lib():
    return capi.load()


def paged_function(name):
    """A paged / pruning entry point of the loaded library, or UnavailableError
    when the library predates 0.3 (whose qattn_kv_cache_buffers this binding
    mirrors) or lacks the function."""
    lib = _lib()
    fn = getattr(lib, name, None)
    if fn is None or not capi.version_at_least(capi.PAGED_VERSION):
        raise UnavailableError("the loaded libqattn (%s, version %s) predates the paged KV cache and pruning API "
                               "of qattn %d.%d that this binding mirrors (%s): rebuild or update it" %
                               (capi.library_path(), version(), capi.PAGED_VERSION[0], capi.PAGED_VERSION[1], name))
    return fn


def _check_host(status):
    """Raises for a failed call without a context (the thread's last error)."""
    if status:
        raise error_for(status, capi.text(_lib().qattn_last_error(None)))


def _i32p(array):
    return array.ctypes.data_as(POINTER(c_int32))


# ------------------------------------------------------------- dtypes


# name -> (page dtype, scales); aliases map onto these
_CACHE_DTYPES = {
    "f16": (DType.F16, KVScales.NONE),
    "bf16": (DType.BF16, KVScales.NONE),
    "fp8": (DType.FP8_E4M3, KVScales.PER_HEAD),
    "int8": (DType.I8, KVScales.PER_HEAD),
    "int8row": (DType.I8, KVScales.PER_ROW),
}
_CACHE_DTYPE_ALIASES = {"float16": "f16", "half": "f16", "bfloat16": "bf16", "fp8e4m3": "fp8", "fp8_e4m3": "fp8",
                        "float8_e4m3fn": "fp8", "i8": "int8", "int8_row": "int8row"}
CACHE_DTYPES = tuple(_CACHE_DTYPES)
_LAYOUTS = {"nhd": KVLayout.NHD, "hnd": KVLayout.HND}


def _cache_dtype(name):
    key = str(name).lower()
    key = _CACHE_DTYPE_ALIASES.get(key, key)
    if key not in _CACHE_DTYPES:
        raise InvalidArgumentError("unknown KV cache dtype %r; valid: %s" % (name, ", ".join(CACHE_DTYPES)))
    return key


def _host_float_dtype(array, name, what="queries and new tokens"):
    """qattn's dtype of a numpy array of floats (float32, float16, ml_dtypes bfloat16)."""
    np = _np()
    if array.dtype == np.float32:
        return DType.F32
    if array.dtype == np.float16:
        return DType.F16
    if array.dtype.name == "bfloat16":
        return DType.BF16
    raise InvalidArgumentError("%s.dtype=%s: %s are float32, float16 or bfloat16" % (name, array.dtype, what))


def _as_numpy(x, name):
    np = _np()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            raise InvalidArgumentError("%s is a bfloat16 torch tensor: pass float32 or float16" % name)
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise InvalidArgumentError("%s must be a numpy.ndarray (or a torch tensor), got %s" % (name, type(x).__name__))
    return x


def _e4m3_table():
    np = _np()
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 15) & (man == 7), np.nan, value)
    return (sign * value).astype(np.float32)


# ----------------------------------------------------------- page selection


@dataclasses.dataclass
class PageSelect:
    """qattn_page_select_desc: which pages each (sequence, KV head) reads.

    budget_tokens (> 0, rounded up to pages) or else budget_fraction (0, 1] of
    each sequence's pages; the first sink_pages and the last recent_pages (and
    the pages holding the query tokens) are always read. epsilon > 0: the
    adaptive budget (doubles, up to max_budget_tokens, until the unread pages'
    softmax weight is bounded by epsilon). See qattn.h for the exact rules."""
    budget_tokens: int = 0
    budget_fraction: float = 0.0
    sink_pages: int = 1
    recent_pages: int = 1
    epsilon: float = 0.0
    max_budget_tokens: int = 0

    def to_c(self):
        return capi.PageSelectDesc(int(self.budget_tokens), float(self.budget_fraction), int(self.sink_pages),
                                   int(self.recent_pages), float(self.epsilon), int(self.max_budget_tokens))


def _page_select(select):
    if isinstance(select, PageSelect):
        return select
    if isinstance(select, capi.PageSelectDesc):
        return PageSelect(*(getattr(select, name) for name, _ in capi.PageSelectDesc._fields_))
    if isinstance(select, dict):
        names = {f.name for f in dataclasses.fields(PageSelect)}
        unknown = sorted(set(select) - names)
        if unknown:
            raise InvalidArgumentError("select: unknown field(s) %s; valid: %s" % (", ".join(unknown),
                                                                                 ", ".join(sorted(names))))
        return PageSelect(**select)
    raise InvalidArgumentError("select must be None, a dict, a qattn.PageSelect or a capi.PageSelectDesc, got %s" %
                               type(select).__name__)


# ---------------------------------------------------------------- plans


class PagedPlan:
    """A qattn_plan made by qattn_paged_plan_create / _select_plan_create."""

    def __init__(self, native_ctx, handle, desc, select=None):
        self._native_ctx = native_ctx
        self._handle = handle
        native_ctx.retain()
        self.desc = capi.PagedDesc.from_buffer_copy(desc)
        self.select = capi.PageSelectDesc.from_buffer_copy(select) if select is not None else None
        info = capi.PlanInfo()
        status = _lib().qattn_plan_get_info(handle, byref(info))
        if status:
            raise_status(status, native_ctx.handle)
        self.info = PlanInfo.from_c(info)
        self.workspace_size = int(_lib().qattn_plan_workspace_size(handle))

    def __del__(self):
        if getattr(self, "_handle", None):
            if not _finalizing():
                _lib().qattn_plan_destroy(self._handle)
                self._native_ctx.release()
        self._handle = None

    def close(self):
        if self._handle:
            _lib().qattn_plan_destroy(self._handle)
            self._native_ctx.release()
        self._handle = None

    def __repr__(self):
        return "qattn.PagedPlan(kernel=%r, workspace=%d, select=%s)" % (self.info.kernel, self.workspace_size,
                                                                       self.select is not None)

    @property
    def handle(self):
        if not self._handle:
            raise InvalidArgumentError("the plan is closed")
        return self._handle

    def describe(self):
        lib = _lib()
        n = lib.qattn_plan_describe(self.handle, None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        lib.qattn_plan_describe(self.handle, buf, n + 1)
        return capi.text(buf.value)


def create_paged_plan(ctx, desc, select=None):
    """qattn_paged_plan_create (select None) or qattn_paged_select_plan_create
    on a Context: a PagedPlan for a capi.PagedDesc (and capi.PageSelectDesc)."""
    out = c_void_p()
    if select is None:
        status = paged_function("qattn_paged_plan_create")(ctx.handle, byref(desc), byref(out))
    else:
        status = paged_function("qattn_paged_select_plan_create")(ctx.handle, byref(desc), byref(select), byref(out))
    if status:
        raise_status(status, ctx.handle)
    return PagedPlan(ctx._native, out.value, desc, select)


# ---------------------------------------------------------------- pool


class _Pool:
    """Owns one qattn_page_pool*."""

    __slots__ = ("handle",)

    def __init__(self, num_pages):
        out = c_void_p()
        _check_host(paged_function("qattn_page_pool_create")(int(num_pages), byref(out)))
        self.handle = out.value

    def __del__(self):
        if self.handle and not _finalizing():
            _lib().qattn_page_pool_destroy(self.handle)
        self.handle = None

    def alloc(self, n):
        np = _np()
        pages = np.zeros(max(n, 1), dtype=np.int32)
        _check_host(_lib().qattn_page_pool_alloc(self.handle, int(n), _i32p(pages)))
        return pages[:n]

    def free(self, pages):
        np = _np()
        pages = np.ascontiguousarray(pages, dtype=np.int32)
        if pages.size:
            _check_host(_lib().qattn_page_pool_free(self.handle, int(pages.size), _i32p(pages)))

    def free_count(self):
        return int(_lib().qattn_page_pool_free_count(self.handle))


class _Sequence:
    __slots__ = ("pages", "length", "scores")

    def __init__(self):
        np = _np()
        self.pages = np.zeros(0, dtype=np.int32)  # physical pages, in order
        self.length = 0                           # tokens cached
        self.scores = None                        # float32 per page, once accumulate_mass ran


# ---------------------------------------------------------------- cache


class PagedKVCache:
    """A paged KV cache on a context, with a page pool and sequences.

    ctx_or_backend: a qattn.Context, a backend name ("cpu", "cuda", ...: a new
        Context), or None (qattn.get_context("cpu")).
    num_pages, page_size: the pool (every sequence's pages come from it).
    dtype: "f16", "bf16", "fp8" (E4M3 codes, a static scale per KV head:
        k_scale / v_scale, default 1.0), "int8" (a static scale per KV head,
        k_scale / v_scale required) or "int8row" (a scale per token and head,
        computed on append).
    layout: "nhd" (a page is [page_size, Hkv, D]) or "hnd" ([Hkv, page_size, D]).
    metadata: keep per-page key bounds (k_meta), which page selection reads.
    """

    def __init__(self, ctx_or_backend, num_pages, page_size, heads_kv, head_dim, dtype="f16", layout="nhd",
                 k_scale=None, v_scale=None, metadata=False):
        paged_function("qattn_kv_cache_bytes")  # a clear error on a library older than 0.3
        if ctx_or_backend is None:
            from ._attention import get_context
            ctx = get_context("cpu")
        elif isinstance(ctx_or_backend, Context):
            ctx = ctx_or_backend
        elif isinstance(ctx_or_backend, str):
            ctx = Context(ctx_or_backend)
        else:
            raise InvalidArgumentError("ctx_or_backend must be a qattn.Context, a backend name or None, got %s" %
                                       type(ctx_or_backend).__name__)
        self.ctx = ctx
        self.dtype = _cache_dtype(dtype)
        page_dtype, scales = _CACHE_DTYPES[self.dtype]
        layout_key = str(layout).lower()
        if layout_key not in _LAYOUTS:
            raise InvalidArgumentError("layout=%r; valid: 'nhd' (a page is [page_size, Hkv, D]) or 'hnd' "
                                       "([Hkv, page_size, D])" % (layout,))
        self.layout = layout_key
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("heads_kv", heads_kv),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or int(value) != value:
                raise InvalidArgumentError("%s=%r must be an integer" % (name, value))
        self.desc = capi.KVCacheDesc(int(num_pages), int(page_size), int(heads_kv), int(head_dim), int(page_dtype),
                                     int(_LAYOUTS[layout_key]), int(scales))
        lib = _lib()
        self.sizes = capi.KVCacheSizes()
        status = lib.qattn_kv_cache_bytes(ctx.handle, byref(self.desc), byref(self.sizes))
        if status:
            raise_status(status, ctx.handle)
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self.heads_kv, self.head_dim = int(heads_kv), int(head_dim)

        # scales
        if scales == KVScales.PER_HEAD:
            default = 1.0 if page_dtype == DType.FP8_E4M3 else None
            self.k_scale = self._head_scales(k_scale, "k_scale", default)
            self.v_scale = self._head_scales(v_scale, "v_scale", default)
        elif k_scale is not None or v_scale is not None:
            raise InvalidArgumentError("k_scale / v_scale are for 'fp8' and 'int8' caches (static per-head scales); "
                                       "a %r cache takes none" % self.dtype)
        else:
            self.k_scale = self.v_scale = None

        bufs = capi.KVCacheBuffers()
        self._k = ctx.create_buffer(self.sizes.cache_bytes)
        self._v = ctx.create_buffer(self.sizes.cache_bytes)
        self._k.fill(0)
        self._v.fill(0)
        bufs.k, bufs.v = self._k.handle, self._v.handle
        self._k_scale = self._v_scale = self._meta = None
        if scales != KVScales.NONE:
            self._k_scale = ctx.create_buffer(self.sizes.scale_bytes)
            self._v_scale = ctx.create_buffer(self.sizes.scale_bytes)
            if scales == KVScales.PER_HEAD:
                self._k_scale.upload(self.k_scale)
                self._v_scale.upload(self.v_scale)
            else:
                self._k_scale.fill(0)
                self._v_scale.fill(0)
            bufs.k_scale, bufs.v_scale = self._k_scale.handle, self._v_scale.handle
        self.metadata = bool(metadata)
        self.meta_sizes = None
        if self.metadata:
            self.meta_sizes = capi.KVMetaSizes()
            status = lib.qattn_kv_meta_bytes(ctx.handle, byref(self.desc), byref(self.meta_sizes))
            if status:
                raise_status(status, ctx.handle)
            self._meta = ctx.create_buffer(self.meta_sizes.meta_bytes)
            self._meta.fill(0)
            bufs.k_meta = self._meta.handle
        self.buffers = bufs
        self._pool = _Pool(self.num_pages)
        self._seqs = {}
        self._next_id = itertools.count()

    def _head_scales(self, value, name, default):
        if value is None:
            if default is None:
                raise InvalidArgumentError("a %r cache needs %s (a float or [heads_kv] floats: the static scale of "
                                           "each KV head, real value = code * scale)" % (self.dtype, name))
            value = default
        np = _np()
        a = np.asarray(value, dtype=np.float32)
        if a.ndim == 0:
            a = np.full(self.heads_kv, float(a), dtype=np.float32)
        if a.shape != (self.heads_kv,):
            raise InvalidArgumentError("%s must be a float or [heads_kv=%d] floats, got shape %s" %
                                       (name, self.heads_kv, list(a.shape)))
        if not (np.isfinite(a).all() and (a > 0).all()):
            raise InvalidArgumentError("%s must be finite and positive, got %s" % (name, a.tolist()))
        return np.ascontiguousarray(a)

    def __repr__(self):
        return ("qattn.PagedKVCache(%s, pages=%d x %d tokens, heads_kv=%d, head_dim=%d, dtype=%r, layout=%r, "
                "metadata=%s, sequences=%d, free pages=%d)" %
                (self.ctx.backend, self.num_pages, self.page_size, self.heads_kv, self.head_dim, self.dtype,
                 self.layout, self.metadata, len(self._seqs), self.pool_free_pages))

    # sequences

    def _seq(self, seq):
        try:
            return self._seqs[seq]
        except (KeyError, TypeError):
            raise InvalidArgumentError("sequence %r is not in this cache (live: %s)" %
                                       (seq, sorted(self._seqs) if len(self._seqs) <= 16 else len(self._seqs)))

    def add_sequence(self):
        """A new, empty sequence; returns its id."""
        seq = next(self._next_id)
        self._seqs[seq] = _Sequence()
        return seq

    @property
    def sequences(self):
        """The ids of the live sequences."""
        return list(self._seqs)

    def length(self, seq):
        """Tokens cached for seq (after eviction: the kept ones)."""
        return self._seq(seq).length

    def pages(self, seq):
        """seq's physical pages, in order (a copy)."""
        return self._seq(seq).pages.copy()

    def scores(self, seq):
        """seq's accumulated per-page scores (accumulate_mass), or None."""
        s = self._seq(seq).scores
        return None if s is None else s.copy()

    @property
    def pool_free_pages(self):
        """Pages of the pool no sequence holds."""
        return self._pool.free_count()

    def free_sequence(self, seq):
        """Returns all of seq's pages to the pool and forgets it."""
        s = self._seq(seq)
        self._pool.free(s.pages)
        del self._seqs[seq]

    def append(self, seq, k, v, check_finite=False):
        """Appends tokens to seq: k, v [T, Hkv, D] (or [Hkv, D] for one token),
        numpy float32 / float16 (or bfloat16); pages come from the pool as
        needed (OutOfMemoryError when it runs dry: nothing changes).
        check_finite: the library's NaN/Inf (and slot) check."""
        np = _np()
        s = self._seq(seq)
        k, v = _as_numpy(k, "k"), _as_numpy(v, "v")
        if k.ndim == 2:
            k = k[None]
        if v.ndim == 2:
            v = v[None]
        shape = (k.shape[0] if k.ndim == 3 else None, self.heads_kv, self.head_dim)
        if k.ndim != 3 or k.shape[1:] != shape[1:]:
            raise InvalidArgumentError("k must be [T, heads_kv=%d, head_dim=%d], got shape %s" %
                                       (self.heads_kv, self.head_dim, list(k.shape)))
        if v.shape != k.shape:
            raise InvalidArgumentError("v's shape %s differs from k's %s" % (list(v.shape), list(k.shape)))
        dt = _host_float_dtype(k, "k", "new tokens")
        if v.dtype != k.dtype:
            raise InvalidArgumentError("k and v must share a dtype, got %s and %s" % (k.dtype, v.dtype))
        T = int(k.shape[0])
        if T == 0:
            return
        P = self.page_size
        have = len(s.pages)
        need = -(-(s.length + T) // P) - have
        new_pages = self._pool.alloc(need) if need > 0 else np.zeros(0, np.int32)
        pages = np.concatenate([s.pages, new_pages]) if need > 0 else s.pages
        try:
            pos = s.length + np.arange(T, dtype=np.int64)
            slots = pages[pos // P].astype(np.int64) * P + pos % P
            k = np.ascontiguousarray(k)
            v = np.ascontiguousarray(v)
            kb = self.ctx.create_buffer(k.nbytes)
            vb = self.ctx.create_buffer(v.nbytes)
            sb = self.ctx.create_buffer(slots.nbytes)
            kb.upload(k.view(np.uint8))
            vb.upload(v.view(np.uint8))
            sb.upload(slots)
            args = capi.KVAppendArgs()
            args.cache = ctypes.pointer(self.desc)
            args.buffers = ctypes.pointer(self.buffers)
            args.num_tokens = T
            args.new_dtype = int(dt)
            args.new_stride[0], args.new_stride[1] = self.heads_kv * self.head_dim, self.head_dim
            args.k_new, args.v_new, args.slot_mapping = kb.handle, vb.handle, sb.handle
            args.flags = 0 if check_finite else capi.FLAG_NO_FINITE_CHECK
            status = _lib().qattn_kv_append(self.ctx.handle, byref(args))
            if status:
                raise_status(status, self.ctx.handle)
        except BaseException:
            self._pool.free(new_pages)
            raise
        s.pages = pages
        s.length += T
        if s.scores is not None and need > 0:
            s.scores = np.concatenate([s.scores, np.zeros(need, np.float32)])

    def accumulate_mass(self, seqs, mass, decay=1.0):
        """Adds page masses to the sequences' per-page scores (summed over KV
        heads): seqs as given to paged_attention, mass its [B, Hkv, max_pages]
        return_mass output (a single seq id with [Hkv, max_pages] works too).
        decay multiplies the old scores first (1: plain sums, as H2O)."""
        np = _np()
        if not isinstance(seqs, (list, tuple)):
            seqs = [seqs]
            mass = np.asarray(mass)[None]
        mass = np.asarray(mass, dtype=np.float32)
        if mass.ndim != 3 or mass.shape[0] != len(seqs) or mass.shape[1] != self.heads_kv:
            raise InvalidArgumentError("mass must be [B=%d, heads_kv=%d, max_pages], got shape %s" %
                                       (len(seqs), self.heads_kv, list(mass.shape)))
        for b, seq in enumerate(seqs):
            s = self._seq(seq)
            n = len(s.pages)
            if s.scores is None:
                s.scores = np.zeros(n, np.float32)
            elif decay != 1.0:
                s.scores *= np.float32(decay)
            m = min(n, mass.shape[2])
            s.scores[:m] += mass[b, :, :m].sum(axis=0)

    def reset_scores(self, seq):
        self._seq(seq).scores = None

    def evict(self, seq, keep_pages, sink_pages=1, recent_pages=1, scores=None):
        """qattn_evict_pages: when seq holds more than keep_pages pages, returns
        the pages beyond the budget to the pool, never the first sink_pages
        nor the last recent_pages (>= 1: the page being filled stays). Among
        the others: scores=None, the oldest first (StreamingLLM: sinks + a
        recent window); scores="mass", the lowest accumulated page mass first
        (accumulate_mass; ties: the older); or an array of one score per page.
        The kept tokens are the sequence from then on. Returns the number of
        pages freed."""
        np = _np()
        s = self._seq(seq)
        fn = paged_function("qattn_evict_pages")
        policy = capi.EvictPolicy(int(keep_pages), int(sink_pages), int(recent_pages))
        pages = np.ascontiguousarray(s.pages, dtype=np.int32).copy()
        n = len(pages)
        if isinstance(scores, str):
            if scores != "mass":
                raise InvalidArgumentError("scores=%r: None, 'mass' or one float per page" % (scores,))
            arr = s.scores if s.scores is not None else np.zeros(n, np.float32)
            arr = np.ascontiguousarray(arr, dtype=np.float32).copy()
        elif scores is not None:
            arr = np.ascontiguousarray(_as_numpy(np.asarray(scores), "scores"), dtype=np.float32).copy()
            if arr.shape != (n,):
                raise InvalidArgumentError("scores must hold one float per page of the sequence (%d), got shape %s"
                                           % (n, list(arr.shape)))
        else:
            arr = None
        count = c_int64(n)
        freed = c_int64(0)
        _check_host(fn(self._pool.handle, byref(policy), _i32p(pages) if n else _i32p(np.zeros(1, np.int32)),
                       byref(count), arr.ctypes.data_as(POINTER(c_float)) if arr is not None else None,
                       byref(freed)))
        kept = pages[:count.value].copy()
        if freed.value:
            # Evicted pages are never the last (recent_pages >= 1): all were full.
            if s.scores is not None:
                keep_mask = np.isin(s.pages, kept)
                s.scores = s.scores[keep_mask]
            s.length -= int(freed.value) * self.page_size
            s.pages = kept
        return int(freed.value)

    # reading back

    def read(self, seq):
        """seq's cached K and V, dequantized: float32 [length, Hkv, D] each
        (downloads the cache; for tests and debugging)."""
        np = _np()
        s = self._seq(seq)
        P, H, D = self.page_size, self.heads_kv, self.head_dim
        page_dtype, scales = _CACHE_DTYPES[self.dtype]
        raw = {}
        for name, buf in (("k", self._k), ("v", self._v)):
            data = np.frombuffer(bytes(buf.download()), dtype=np.uint8)
            if page_dtype == DType.F16:
                vals = data.view(np.float16).astype(np.float32)
            elif page_dtype == DType.BF16:
                vals = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif page_dtype == DType.FP8_E4M3:
                vals = _e4m3_table()[data]
            else:
                vals = data.view(np.int8).astype(np.float32)
            if self.layout == "nhd":
                vals = vals.reshape(self.num_pages, P, H, D)
            else:
                vals = vals.reshape(self.num_pages, H, P, D).transpose(0, 2, 1, 3)
            if scales == KVScales.PER_HEAD:
                vals = vals * (self.k_scale if name == "k" else self.v_scale)[None, None, :, None]
            elif scales == KVScales.PER_ROW:
                sbuf = self._k_scale if name == "k" else self._v_scale
                sc = np.frombuffer(bytes(sbuf.download()), dtype=np.float32).reshape(self.num_pages, P, H)
                vals = vals * sc[..., None]
            raw[name] = vals
        pos = np.arange(s.length)
        pages = s.pages[pos // P]
        return (np.ascontiguousarray(raw["k"][pages, pos % P]), np.ascontiguousarray(raw["v"][pages, pos % P]))

    def close(self):
        """Frees the device buffers and the pool now (the object is unusable after)."""
        for buf in (self._k, self._v, self._k_scale, self._v_scale, self._meta):
            if buf is not None:
                buf.close()
        self._seqs.clear()
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------- attention


def _seq_list(seqs):
    if isinstance(seqs, (list, tuple)):
        return list(seqs)
    np = _np()
    if isinstance(seqs, np.ndarray):
        return [int(x) for x in seqs.ravel()]
    return [seqs]


def paged_attention(cache, q, seqs, q_lens=None, causal=True, sm_scale=None, return_lse=False, select=None,
                    return_selection=False, return_mass=False, num_splits=0, check_finite=False):
    """Attention of queries over the sequences of a PagedKVCache.

    q: numpy [total_q, Hq, D] float32 / float16 (or bfloat16), rows grouped by
        sequence in the order of seqs; Hq a multiple of the cache's heads_kv.
    seqs: sequence ids (or one id). q_lens: each sequence's query rows (None:
        one each, decode); they are the sequence's last tokens (append their
        K/V first): with causal, query i of a sequence of q_len queries and
        kv_len cached tokens sees keys j <= i + kv_len - q_len.
    sm_scale: None for 1/sqrt(D).
    select: None (every page), or a dict / qattn.PageSelect (qattn_page_select_desc:
        budget_tokens, budget_fraction, sink_pages, recent_pages, epsilon,
        max_budget_tokens): query-aware page selection from the cache's
        metadata (the cache needs metadata=True).
    return_lse: also the LSE, float32 [total_q, Hq] (natural log).
    return_selection: also {(seq, kv_head): int32 logical page indices (positions
        in cache.pages(seq))} the selection read (select only).
    return_mass: also the attention mass per page, float32 [B, Hkv, max_pages]
        (qattn_paged_page_mass; each row-head's masses sum to 1 without select).
    num_splits: 0 lets the planner split long sequences; >= 1 forces.
    check_finite: the library's NaN/Inf scan of q and the check of the tables.

    Returns O (q's shape and dtype) or a tuple (O, [lse], [selection], [mass])
    in that order.
    """
    np = _np()
    if not isinstance(cache, PagedKVCache):
        raise InvalidArgumentError("cache must be a qattn.PagedKVCache, got %s" % type(cache).__name__)
    ctx = cache.ctx
    seqs = _seq_list(seqs)
    if not seqs:
        raise InvalidArgumentError("seqs is empty")
    states = [cache._seq(s) for s in seqs]
    B = len(seqs)
    q = _as_numpy(q, "q")
    if q.ndim != 3:
        raise InvalidArgumentError("q must be [total_q, heads_q, head_dim], got shape %s" % list(q.shape))
    q_dtype = _host_float_dtype(q, "q", "queries")
    total_q, heads_q, d = (int(x) for x in q.shape)
    if total_q == 0:
        raise InvalidArgumentError("q has no rows")
    if d != cache.head_dim:
        raise InvalidArgumentError("q's head dim %d differs from the cache's head_dim %d" % (d, cache.head_dim))
    if q_lens is None:
        q_lens = [1] * B
    q_lens = [int(x) for x in q_lens]
    if len(q_lens) != B:
        raise InvalidArgumentError("q_lens has %d entries for %d sequences" % (len(q_lens), B))
    if any(n < 0 for n in q_lens) or sum(q_lens) != total_q:
        raise InvalidArgumentError("q_lens %s must be >= 0 and sum to q's %d rows" % (q_lens, total_q))
    for seq, s, n in zip(seqs, states, q_lens):
        if causal and n > s.length:
            raise InvalidArgumentError("sequence %r has %d query rows but only %d cached tokens: append the "
                                       "queries' own K/V first" % (seq, n, s.length))
    sel = _page_select(select) if select is not None else None
    if sel is not None and not cache.metadata:
        raise InvalidArgumentError("page selection reads page metadata: make the cache with metadata=True")
    if return_selection and sel is None:
        raise InvalidArgumentError("return_selection needs select=...")
    scale = 0.0
    if sm_scale is not None:
        scale = float(sm_scale)
        if scale == 0.0:
            raise InvalidArgumentError("sm_scale=0 is not supported (the C API reads 0 as 1/sqrt(D)); pass None")
    P = cache.page_size

    # page tables (CSR)
    counts = np.array([len(s.pages) for s in states], dtype=np.int64)
    lists = [np.ascontiguousarray(s.pages, dtype=np.int32) for s in states]
    M = max(int(counts.max()), 1)
    total_pages = int(counts.sum())
    indptr = np.zeros(B + 1, dtype=np.int32)
    indices = np.zeros(max(total_pages, 1), dtype=np.int32)
    ptrs = (POINTER(c_int32) * B)(*[_i32p(a) if a.size else None for a in lists])
    _check_host(paged_function("qattn_page_tables_build")(B, ptrs, counts.ctypes.data_as(POINTER(c_int64)), M, None,
                                                         _i32p(indptr), _i32p(indices)))
    last = np.array([s.length - (len(s.pages) - 1) * P if len(s.pages) else 0 for s in states], dtype=np.int32)
    qo_indptr = np.zeros(B + 1, dtype=np.int32)
    qo_indptr[1:] = np.cumsum(q_lens)

    want_lse = bool(return_lse or return_mass)
    desc = capi.PagedDesc()
    desc.cache = cache.desc
    desc.table = int(PageTableKind.CSR)
    desc.batch = B
    desc.max_pages_per_seq = M
    desc.total_q = total_q
    desc.max_q_len = max(max(q_lens), 1)
    desc.heads_q = heads_q
    desc.q_dtype = int(q_dtype)
    desc.q_stride[0], desc.q_stride[1] = heads_q * d, d
    desc.o_stride[0], desc.o_stride[1] = heads_q * d, d
    desc.causal = int(bool(causal))
    desc.return_lse = int(want_lse)
    desc.sm_scale = scale
    desc.num_splits = int(num_splits)
    desc.flags = 0 if check_finite else capi.FLAG_NO_FINITE_CHECK
    select_c = sel.to_c() if sel is not None else None
    key = ("paged", desc.key(), select_c.key() if select_c is not None else None)
    plan = ctx.cached_plan(key, lambda: desc, create=lambda dsc: create_paged_plan(ctx, dsc, select_c))

    qc = np.ascontiguousarray(q)
    keep = []

    def upload(array):
        buf = ctx.create_buffer(max(array.nbytes, 4))
        if array.nbytes:
            buf.upload(array.view(np.uint8))
        keep.append(buf)
        return buf.handle

    args = capi.PagedArgs()
    args.cache = ctypes.pointer(cache.buffers)
    args.q = upload(qc)
    o_buf = ctx.create_buffer(qc.nbytes)
    args.o = o_buf.handle
    lse_buf = None
    if want_lse:
        lse_buf = ctx.create_buffer(total_q * heads_q * 4)
        args.lse = lse_buf.handle
    args.qo_indptr = upload(qo_indptr)
    args.indptr = upload(indptr)
    args.indices = upload(indices)
    args.last_page_len = upload(last)
    ws = None
    if plan.workspace_size:
        ws = ctx.create_buffer(plan.workspace_size)
        args.workspace = ws.handle
    status = paged_function("qattn_paged_run")(plan.handle, byref(args))
    if status:
        raise_status(status, ctx.handle)
    out = np.empty(qc.shape, dtype=qc.dtype)
    o_buf.download_into(out.view(np.uint8))
    result = [out]
    lse = None
    if want_lse:
        lse = np.empty((total_q, heads_q), dtype=np.float32)
        lse_buf.download_into(lse)
    if return_lse:
        result.append(lse)
    if return_selection:
        hkv = cache.heads_kv
        sel_counts = np.zeros(B * hkv, dtype=np.int32)
        sel_pages = np.zeros(B * hkv * M, dtype=np.int32)
        status = paged_function("qattn_paged_selection_read")(plan.handle, ws.handle if ws else None, 0,
                                                             _i32p(sel_counts), _i32p(sel_pages))
        if status:
            raise_status(status, ctx.handle)
        sel_pages = sel_pages.reshape(B, hkv, M)
        selection = {}
        for b, seq in enumerate(seqs):
            for hk in range(hkv):
                selection[(seq, hk)] = sel_pages[b, hk, :sel_counts[b * hkv + hk]].copy()
        result.append(selection)
    if return_mass:
        mass_buf = ctx.create_buffer(B * cache.heads_kv * M * 4)
        status = paged_function("qattn_paged_page_mass")(plan.handle, byref(args), mass_buf.handle, 0)
        if status:
            raise_status(status, ctx.handle)
        mass = np.empty((B, cache.heads_kv, M), dtype=np.float32)
        mass_buf.download_into(mass)
        result.append(mass)
    return tuple(result) if len(result) > 1 else out


__all__ = ["PagedKVCache", "PageSelect", "PagedPlan", "paged_attention", "create_paged_plan", "paged_function",
           "CACHE_DTYPES"]
