"""ctypes declarations of include/qattn/qattn.h and the loading of libqattn.

Everything here mirrors the C header one to one: the enums, the structs (ctypes
lays them out with the platform's C rules, so padding matches the compiler's),
and every function's argument and result types. Nothing here allocates or
raises qattn errors; see _core.py for the object layer.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import glob
import os
import sys
import threading
from ctypes import (POINTER, Structure, c_char, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_uint,
                    c_uint8, c_uint32, c_uint64, c_void_p)

# The header this binding mirrors. Before 1.0 a minor release may change the
# structs: the binding loads libraries of this major and of a minor from 0.1
# up to HEADER_VERSION's, and gates what an older minor lacks (the sparse calls
# need 0.2; the paged KV cache and pruning calls need 0.3, whose
# qattn_kv_cache_buffers gained k_meta).
HEADER_VERSION = (0, 3)
SPARSE_VERSION = (0, 2)  # the first minor with the sparse-attention calls
PAGED_VERSION = (0, 3)   # the first minor whose paged structs this binding mirrors

NAME_MAX = 256  # QATTN_NAME_MAX


# ------------------------------------------------------------------ enums


class Status(enum.IntEnum):
    OK = 0
    ERR_INVALID_ARGUMENT = 1
    ERR_UNSUPPORTED = 2
    ERR_OUT_OF_MEMORY = 3
    ERR_BACKEND = 4
    ERR_DEVICE_LOST = 5
    ERR_NOT_FOUND = 6
    ERR_UNAVAILABLE = 7
    ERR_NONFINITE_INPUT = 8
    ERR_INTERNAL = 9


class DType(enum.IntEnum):
    F32 = 0
    F16 = 1
    BF16 = 2
    I8 = 3
    FP8_E4M3 = 4


DTYPE_COUNT = 5


class Precision(enum.IntEnum):
    AUTO = 0
    EXACT = 1
    INT8_FP16 = 2
    INT8_FP8 = 3
    INT8_FP8_F16ACC = 4


PRECISION_COUNT = 5


class Granularity(enum.IntEnum):
    DEFAULT = 0
    PER_BLOCK = 1
    PER_WARP = 2
    PER_THREAD = 3


class Toggle(enum.IntEnum):
    DEFAULT = 0
    ON = 1
    OFF = 2


class SparseLayoutKind(enum.IntEnum):
    """qattn_sparse_layout_kind."""
    NO_LAYOUT = 0  # structured masks only (window, sinks, causal)
    BLOCKS = 1     # a block CSR given to each run (SparseArgs)
    PREDICT = 2    # predicted from Q and K at each run (SpargeAttn)


class KVLayout(enum.IntEnum):
    """qattn_kv_layout: a page is [page_size, Hkv, D] (NHD) or [Hkv, page_size, D] (HND)."""
    NHD = 0
    HND = 1


class KVScales(enum.IntEnum):
    """qattn_kv_scales."""
    NONE = 0      # fp16/bf16 pages
    PER_HEAD = 1  # fp8 or int8 pages, a static scale per KV head
    PER_ROW = 2   # int8 pages, a scale per (token, head), set on append


class PageTableKind(enum.IntEnum):
    """qattn_page_table_kind."""
    DENSE = 0  # block_table [B, max_pages_per_seq] + seq_lens [B]
    CSR = 1    # indptr [B + 1], indices, last_page_len [B]


# qattn_device_info.caps
CAP_FP16 = 1 << 0
CAP_BF16 = 1 << 1
CAP_INT8_DOT = 1 << 2
CAP_FP8 = 1 << 3
CAP_MATRIX_UNITS = 1 << 4
CAP_SUBGROUPS = 1 << 5
CAP_UNIFIED_MEMORY = 1 << 6

# qattn_attention_desc.flags
FLAG_NO_FINITE_CHECK = 1 << 0

# C enums are int-sized on every ABI qattn targets.
c_enum = c_int


# ---------------------------------------------------------------- structs


class BackendInfo(Structure):
    _fields_ = [
        ("name", c_char_p),
        ("built", c_int),
        ("usable", c_int),
        ("device_count", c_int),
        ("reason", c_char * NAME_MAX),
    ]


class DeviceInfo(Structure):
    _fields_ = [
        ("name", c_char * NAME_MAX),
        ("vendor", c_char * 64),
        ("driver", c_char * 128),
        ("compute_units", c_int),
        ("memory_bytes", c_uint64),
        ("max_buffer_bytes", c_uint64),
        ("caps", c_uint32),
        ("precisions", c_uint32),
        ("details", c_char * 2048),
    ]


class CtxParams(Structure):
    _fields_ = [
        ("backend", c_char_p),
        ("device", c_char_p),
        ("num_threads", c_int),
    ]


class TensorDesc(Structure):
    _fields_ = [
        ("dtype", c_enum),
        ("shape", c_int64 * 4),
        ("stride", c_int64 * 4),
    ]

    def key(self):
        """A hashable value naming this descriptor (for plan caches)."""
        return (int(self.dtype), tuple(self.shape), tuple(self.stride))

    def __repr__(self):
        return "TensorDesc(dtype=%s, shape=%s, stride=%s)" % (_enum_name(DType, self.dtype), list(self.shape),
                                                             list(self.stride))


class AttentionDesc(Structure):
    _fields_ = [
        ("q", TensorDesc),
        ("k", TensorDesc),
        ("v", TensorDesc),
        ("o", TensorDesc),
        ("causal", c_int),
        ("return_lse", c_int),
        ("sm_scale", c_float),
        ("precision", c_enum),
        ("granularity", c_enum),
        ("smooth_k", c_enum),
        ("flags", c_uint32),
    ]

    def key(self):
        """A hashable value of every field: two descs with equal keys make equal plans."""
        return (self.q.key(), self.k.key(), self.v.key(), self.o.key(), int(self.causal), int(self.return_lse),
                # the float32 bit pattern, so 0.1 and its float32 rounding are one key
                bytes(c_float(self.sm_scale)), int(self.precision), int(self.granularity), int(self.smooth_k),
                int(self.flags))


class PlanInfo(Structure):
    _fields_ = [
        ("precision", c_enum),
        ("granularity", c_enum),
        ("smooth_k", c_int),
        ("q_tile", c_int),
        ("kv_tile", c_int),
        ("q_quant_block", c_int),
        ("q_quant_interleave", c_int),
        ("k_quant_block", c_int),
        ("k_quant_interleave", c_int),
        ("v_fp8_max", c_float),
        ("p_fp8_scale", c_float),
        ("pv_f16_chunk", c_int),
        ("workspace_bytes", c_size_t),
        ("kernel", c_char * 128),
    ]


class RunArgs(Structure):
    _fields_ = [
        ("q", c_void_p),
        ("k", c_void_p),
        ("v", c_void_p),
        ("o", c_void_p),
        ("lse", c_void_p),
        ("workspace", c_void_p),
        ("q_offset", c_size_t),
        ("k_offset", c_size_t),
        ("v_offset", c_size_t),
        ("o_offset", c_size_t),
        ("lse_offset", c_size_t),
        ("workspace_offset", c_size_t),
        ("stream", c_void_p),
    ]


class SparseDesc(Structure):
    """qattn_sparse_desc: the restriction of a sparse plan (qattn_sparse_plan_create)."""
    _fields_ = [
        ("window", c_int),
        ("window_left", c_int64),
        ("window_right", c_int64),
        ("sink_tokens", c_int64),
        ("layout", c_enum),
        ("q_block", c_int64),
        ("k_block", c_int64),
        ("sim_threshold", c_float),
        ("cdf_threshold", c_float),
        ("topk", c_float),
        ("sink_blocks", c_int64),
        ("recent_blocks", c_int64),
        ("last_q_blocks", c_int64),
        ("pv_threshold", c_float),
    ]

    def key(self):
        """A hashable value of every field (floats by their float32 bit pattern)."""
        return (int(self.window), int(self.window_left), int(self.window_right), int(self.sink_tokens),
                int(self.layout), int(self.q_block), int(self.k_block), bytes(c_float(self.sim_threshold)),
                bytes(c_float(self.cdf_threshold)), bytes(c_float(self.topk)), int(self.sink_blocks),
                int(self.recent_blocks), int(self.last_q_blocks), bytes(c_float(self.pv_threshold)))

    def __repr__(self):
        return "SparseDesc(%s)" % ", ".join("%s=%r" % (name, getattr(self, name)) for name, _ in self._fields_)


class SparseArgs(Structure):
    """qattn_sparse_args: a BLOCKS plan's layout for one run (int32 block CSR buffers)."""
    _fields_ = [
        ("block_indptr", c_void_p),
        ("block_indices", c_void_p),
        ("block_count", c_int64),
    ]


class KVCacheDesc(Structure):
    """qattn_kv_cache_desc."""
    _fields_ = [
        ("num_pages", c_int64),
        ("page_size", c_int64),
        ("heads_kv", c_int64),
        ("head_dim", c_int64),
        ("dtype", c_enum),
        ("layout", c_enum),
        ("scales", c_enum),
    ]


class KVCacheSizes(Structure):
    """qattn_kv_cache_sizes."""
    _fields_ = [
        ("page_bytes", c_size_t),
        ("cache_bytes", c_size_t),
        ("scale_bytes", c_size_t),
    ]


class KVCacheBuffers(Structure):
    """qattn_kv_cache_buffers (0.3: k_meta added at the end)."""
    _fields_ = [
        ("k", c_void_p),
        ("v", c_void_p),
        ("k_scale", c_void_p),
        ("v_scale", c_void_p),
        ("k_meta", c_void_p),
    ]


class KVMetaSizes(Structure):
    """qattn_kv_meta_sizes."""
    _fields_ = [
        ("meta_bytes", c_size_t),
        ("scale_offset", c_size_t),
    ]


class KVAppendArgs(Structure):
    """qattn_kv_append_args."""
    _fields_ = [
        ("cache", POINTER(KVCacheDesc)),
        ("buffers", POINTER(KVCacheBuffers)),
        ("num_tokens", c_int64),
        ("new_dtype", c_enum),
        ("new_stride", c_int64 * 2),
        ("k_new", c_void_p),
        ("v_new", c_void_p),
        ("slot_mapping", c_void_p),
        ("k_new_offset", c_size_t),
        ("v_new_offset", c_size_t),
        ("slot_mapping_offset", c_size_t),
        ("flags", c_uint32),
        ("stream", c_void_p),
    ]


class PagedDesc(Structure):
    """qattn_paged_desc."""
    _fields_ = [
        ("cache", KVCacheDesc),
        ("table", c_enum),
        ("batch", c_int64),
        ("max_pages_per_seq", c_int64),
        ("total_q", c_int64),
        ("max_q_len", c_int64),
        ("heads_q", c_int64),
        ("q_dtype", c_enum),
        ("q_stride", c_int64 * 2),
        ("o_stride", c_int64 * 2),
        ("causal", c_int),
        ("return_lse", c_int),
        ("sm_scale", c_float),
        ("num_splits", c_int),
        ("flags", c_uint32),
    ]

    def key(self):
        """A hashable value of every field (the struct's bytes: ctypes zeroes its padding)."""
        return bytes(self)


class PagedArgs(Structure):
    """qattn_paged_args."""
    _fields_ = [
        ("cache", POINTER(KVCacheBuffers)),
        ("q", c_void_p),
        ("o", c_void_p),
        ("lse", c_void_p),
        ("qo_indptr", c_void_p),
        ("block_table", c_void_p),
        ("seq_lens", c_void_p),
        ("indptr", c_void_p),
        ("indices", c_void_p),
        ("last_page_len", c_void_p),
        ("workspace", c_void_p),
        ("q_offset", c_size_t),
        ("o_offset", c_size_t),
        ("lse_offset", c_size_t),
        ("workspace_offset", c_size_t),
        ("stream", c_void_p),
    ]


class PageSelectDesc(Structure):
    """qattn_page_select_desc: query-aware page selection (Quest) on a paged plan."""
    _fields_ = [
        ("budget_tokens", c_int64),
        ("budget_fraction", c_float),
        ("sink_pages", c_int64),
        ("recent_pages", c_int64),
        ("epsilon", c_float),
        ("max_budget_tokens", c_int64),
    ]

    def key(self):
        return bytes(self)

    def __repr__(self):
        return "PageSelectDesc(%s)" % ", ".join("%s=%r" % (name, getattr(self, name)) for name, _ in self._fields_)


class MergeDesc(Structure):
    """qattn_merge_desc."""
    _fields_ = [
        ("num_states", c_int64),
        ("rows", c_int64),
        ("heads", c_int64),
        ("head_dim", c_int64),
        ("v_dtype", c_enum),
        ("o_dtype", c_enum),
        ("v_stride", c_int64 * 3),
        ("s_stride", c_int64 * 3),
        ("o_stride", c_int64 * 2),
    ]


class MergeArgs(Structure):
    """qattn_merge_args."""
    _fields_ = [
        ("v", c_void_p),
        ("s", c_void_p),
        ("o", c_void_p),
        ("lse", c_void_p),
        ("v_offset", c_size_t),
        ("s_offset", c_size_t),
        ("o_offset", c_size_t),
        ("lse_offset", c_size_t),
        ("stream", c_void_p),
    ]


class EvictPolicy(Structure):
    """qattn_evict_policy."""
    _fields_ = [
        ("keep_pages", c_int64),
        ("sink_pages", c_int64),
        ("recent_pages", c_int64),
    ]


def _enum_name(enum_type, value):
    try:
        return enum_type(value).name
    except ValueError:
        return str(int(value))


# -------------------------------------------------------------- functions

# name: (restype, argtypes)
_PROTOTYPES = {
    "qattn_version": (c_char_p, []),
    "qattn_version_number": (c_uint, []),
    "qattn_status_str": (c_char_p, [c_enum]),
    "qattn_last_error": (c_char_p, [c_void_p]),
    "qattn_dtype_size": (c_size_t, [c_enum]),
    "qattn_dtype_name": (c_char_p, [c_enum]),
    "qattn_backend_count": (c_int, []),
    "qattn_backend_query": (c_enum, [c_int, POINTER(BackendInfo)]),
    "qattn_device_query": (c_enum, [c_char_p, c_int, POINTER(DeviceInfo)]),
    "qattn_ctx_create": (c_enum, [POINTER(CtxParams), POINTER(c_void_p)]),
    "qattn_ctx_destroy": (None, [c_void_p]),
    "qattn_ctx_backend": (c_char_p, [c_void_p]),
    "qattn_ctx_device_info": (c_enum, [c_void_p, POINTER(DeviceInfo)]),
    "qattn_ctx_synchronize": (c_enum, [c_void_p]),
    "qattn_buffer_create": (c_enum, [c_void_p, c_size_t, POINTER(c_void_p)]),
    "qattn_buffer_wrap": (c_enum, [c_void_p, c_void_p, c_size_t, POINTER(c_void_p)]),
    "qattn_buffer_destroy": (None, [c_void_p]),
    "qattn_buffer_size": (c_size_t, [c_void_p]),
    "qattn_buffer_upload": (c_enum, [c_void_p, c_size_t, c_void_p, c_size_t]),
    "qattn_buffer_download": (c_enum, [c_void_p, c_size_t, c_void_p, c_size_t]),
    "qattn_buffer_fill": (c_enum, [c_void_p, c_size_t, c_size_t, c_uint8]),
    "qattn_tensor_hnd": (TensorDesc, [c_enum, c_int64, c_int64, c_int64, c_int64]),
    "qattn_tensor_nhd": (TensorDesc, [c_enum, c_int64, c_int64, c_int64, c_int64]),
    "qattn_tensor_bytes": (c_size_t, [POINTER(TensorDesc)]),
    "qattn_precision_name": (c_char_p, [c_enum]),
    "qattn_granularity_name": (c_char_p, [c_enum]),
    "qattn_plan_create": (c_enum, [c_void_p, POINTER(AttentionDesc), POINTER(c_void_p)]),
    "qattn_plan_destroy": (None, [c_void_p]),
    "qattn_plan_get_info": (c_enum, [c_void_p, POINTER(PlanInfo)]),
    "qattn_plan_workspace_size": (c_size_t, [c_void_p]),
    "qattn_plan_describe": (c_size_t, [c_void_p, c_char_p, c_size_t]),
    "qattn_run": (c_enum, [c_void_p, POINTER(RunArgs)]),
}

# Functions added after 0.1: a library of an older minor still loads
# (has(name) and version_at_least tell), and the binding's features that need
# them raise UnavailableError naming what is missing. 0.2: sparse attention.
# 0.3: the paged KV cache and decode-time pruning (the paged calls of a 0.2
# library take the 0.2 qattn_kv_cache_buffers, without k_meta: the binding
# calls none of them on a library older than PAGED_VERSION).
_OPTIONAL_PROTOTYPES = {
    "qattn_sparse_plan_create": (c_enum, [c_void_p, POINTER(AttentionDesc), POINTER(SparseDesc), POINTER(c_void_p)]),
    "qattn_sparse_run": (c_enum, [c_void_p, POINTER(RunArgs), POINTER(SparseArgs)]),
    "qattn_sparse_layout_rows": (c_int64, [c_void_p, POINTER(c_int64), POINTER(c_int64)]),
    "qattn_sparse_layout_read": (c_enum, [c_void_p, c_void_p, c_size_t, POINTER(c_int32), POINTER(c_int32), c_int64,
                                          POINTER(c_int64), POINTER(c_float)]),
    # 0.3
    "qattn_kv_cache_bytes": (c_enum, [c_void_p, POINTER(KVCacheDesc), POINTER(KVCacheSizes)]),
    "qattn_kv_meta_bytes": (c_enum, [c_void_p, POINTER(KVCacheDesc), POINTER(KVMetaSizes)]),
    "qattn_kv_append": (c_enum, [c_void_p, POINTER(KVAppendArgs)]),
    "qattn_paged_plan_create": (c_enum, [c_void_p, POINTER(PagedDesc), POINTER(c_void_p)]),
    "qattn_paged_sparse_plan_create": (c_enum, [c_void_p, POINTER(PagedDesc), POINTER(SparseDesc),
                                                POINTER(c_void_p)]),
    "qattn_paged_select_plan_create": (c_enum, [c_void_p, POINTER(PagedDesc), POINTER(PageSelectDesc),
                                                POINTER(c_void_p)]),
    "qattn_paged_selection_read": (c_enum, [c_void_p, c_void_p, c_size_t, POINTER(c_int32), POINTER(c_int32)]),
    "qattn_paged_page_mass": (c_enum, [c_void_p, POINTER(PagedArgs), c_void_p, c_size_t]),
    "qattn_paged_run": (c_enum, [c_void_p, POINTER(PagedArgs)]),
    "qattn_merge_states": (c_enum, [c_void_p, POINTER(MergeDesc), POINTER(MergeArgs)]),
    "qattn_page_pool_create": (c_enum, [c_int64, POINTER(c_void_p)]),
    "qattn_page_pool_destroy": (None, [c_void_p]),
    "qattn_page_pool_alloc": (c_enum, [c_void_p, c_int64, POINTER(c_int32)]),
    "qattn_page_pool_free": (c_enum, [c_void_p, c_int64, POINTER(c_int32)]),
    "qattn_page_pool_free_count": (c_int64, [c_void_p]),
    "qattn_evict_pages": (c_enum, [c_void_p, POINTER(EvictPolicy), POINTER(c_int32), POINTER(c_int64),
                                   POINTER(c_float), POINTER(c_int64)]),
    "qattn_page_tables_build": (c_enum, [c_int64, POINTER(POINTER(c_int32)), POINTER(c_int64), c_int64,
                                         POINTER(c_int32), POINTER(c_int32), POINTER(c_int32)]),
}


class LibraryNotFound(ImportError):
    """libqattn could not be found or loaded, or is of another version."""


def _standard_names():
    if sys.platform == "win32":
        return ["qattn.dll", "libqattn.dll"]
    if sys.platform == "darwin":
        return ["libqattn.0.dylib", "libqattn.dylib"]
    return ["libqattn.so.0"]


def _repo_root():
    # python/qattn/_capi.py -> the repository root two folders up from the package
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# A library built with these sanitizers aborts a process it is dlopen'ed into
# ("ASan runtime does not come first"): never pick one up by searching.
_PRELOAD_SANITIZERS = (b"libasan.so", b"libtsan.so", b"libhwasan.so", b"libclang_rt.asan")


def _needs_preloaded_sanitizer(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return any(name in data for name in _PRELOAD_SANITIZERS)


def _build_folder_candidates():
    """libqattn in build*/ folders of the repository, newest first, leaving out
    sanitizer builds (which cannot be loaded into a plain interpreter)."""
    root = _repo_root()
    paths = []
    for pattern in ("build*/libqattn.so.0", "build*/libqattn.so", "build*/libqattn.*.dylib", "build*/qattn.dll"):
        paths.extend(os.path.realpath(p) for p in glob.glob(os.path.join(root, pattern)) if os.path.isfile(p))
    paths = [p for p in set(paths) if not _needs_preloaded_sanitizer(p)]
    return sorted(paths, key=lambda p: os.path.getmtime(p), reverse=True)


def _declare(lib):
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)  # AttributeError: not a qattn library of this version
        fn.restype = restype
        fn.argtypes = argtypes
    for name, (restype, argtypes) in _OPTIONAL_PROTOTYPES.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = restype
            fn.argtypes = argtypes


def has(name):
    """Whether the loaded library exports the function `name` (loads it if needed)."""
    return getattr(load(), name, None) is not None


def loaded_version():
    """(major, minor) of the loaded library (loads it if needed)."""
    number = load().qattn_version_number()
    return number // 10000, number // 100 % 100


def version_at_least(version):
    """Whether the loaded library's (major, minor) is at least `version`."""
    return loaded_version() >= tuple(version)


def _try_load(spec):
    """Loads and declares one candidate; returns (lib, None) or (None, why)."""
    try:
        lib = ctypes.CDLL(spec)
    except OSError as e:
        return None, str(e)
    try:
        _declare(lib)
    except AttributeError as e:
        return None, "not a qattn %d.%d library (%s)" % (HEADER_VERSION + (e,))
    number = lib.qattn_version_number()
    loaded = (number // 10000, number // 100 % 100)
    # An older minor lacks functions (gated by version_at_least) but keeps every
    # struct the binding passes to the functions it had.
    if loaded[0] != HEADER_VERSION[0] or loaded[1] > HEADER_VERSION[1] or loaded[1] < 1:
        return None, "library version %s, but this binding mirrors qattn.h %d.%d (and reads 0.1 and 0.2 too)" % (
            lib.qattn_version().decode(), HEADER_VERSION[0], HEADER_VERSION[1])
    return lib, None


_lock = threading.Lock()
_lib = None
_lib_path = None


def load(path=None):
    """Loads libqattn (once) and returns the ctypes library.

    Search order: `path` if given; else $QATTN_LIBRARY (used alone: a set
    variable that does not load is an error, never a fallback); else the
    installed library (ctypes.util.find_library("qattn"), then the standard
    soname libqattn.so.0 through the dynamic loader's path); else the newest
    build*/libqattn.so* of the repository this package sits in.
    """
    global _lib, _lib_path
    if _lib is not None and path is None:
        return _lib  # the common case, without the lock
    with _lock:
        if _lib is not None:
            if path is not None and path != _lib_path:
                # Objects of one library must never reach another: one per process.
                raise RuntimeError("libqattn is already loaded from %s; cannot also load %s" % (_lib_path, path))
            return _lib
        tried = []
        if path is not None or os.environ.get("QATTN_LIBRARY"):
            source = "path argument" if path is not None else "$QATTN_LIBRARY"
            spec = path if path is not None else os.environ["QATTN_LIBRARY"]
            candidates = [(spec, source)]
        else:
            candidates = []
            found = ctypes.util.find_library("qattn")
            if found:
                candidates.append((found, "installed (find_library)"))
            candidates += [(name, "installed (dynamic loader path)") for name in _standard_names()]
            candidates += [(p, "build folder") for p in _build_folder_candidates()]
        for spec, source in candidates:
            lib, why = _try_load(spec)
            if lib is not None:
                _lib, _lib_path = lib, spec
                return lib
            tried.append("%s [%s]: %s" % (spec, source, why))
        if not candidates:
            tried.append("no candidates")
        raise LibraryNotFound("cannot load libqattn; tried:\n  " + "\n  ".join(tried) +
                              "\nSet QATTN_LIBRARY to the library's path (e.g. build/libqattn.so.0), install "
                              "it, or build it in a build*/ folder of the repository.")


def library_path():
    """What the loaded library was loaded from (a path or a soname); loads it if needed."""
    load()
    return _lib_path


def text(value):
    """A const char* result as str ('' for NULL)."""
    return value.decode("utf-8", "replace") if value else ""
