"""qattn: fast, accurate attention kernels (flash and SageAttention-style
quantized) for GPUs of every vendor. A ctypes binding of libqattn: no compiled
extension, the shared library is found at first use (see qattn.capi.load).

High level:
    qattn.attention(q, k, v, is_causal=False, sm_scale=None, precision="auto",
                    layout="HND", return_lse=False, granularity=None,
                    smooth_k=None, check_finite=False)
    qattn.attention_plan(...)      the plan attention() runs (chosen mode, kernel)
    qattn.sparse_attention(q, k, v, window=..., sink_tokens=..., block_mask=...,
                           predict=..., pv_threshold=..., ...)
                                   sequence pruning: windows, sinks, block layouts
                                   (qattn.BlockLayout), SpargeAttn prediction
    qattn.structured_qkv(...)      test data with topics, locality, sinks, a needle
    qattn.tune_sparsity(q, k, v)   SpargeAttn's per-head autotune of the prediction
                                   (CLI: python3 -m qattn.tune_sparsity --help)
    qattn.PagedKVCache(ctx, num_pages, page_size, heads_kv, head_dim, dtype=...,
                       metadata=...)
                                   a paged KV cache with a page pool and sequences
                                   (append, evict, accumulate_mass); libqattn 0.3
    qattn.paged_attention(cache, q, seqs, q_lens=None, select=..., return_lse=...,
                          return_selection=..., return_mass=...)
                                   decode / chunked prefill over it, with
                                   query-aware page selection (qattn.PageSelect)

The C API as objects:
    qattn.Context, Buffer, Plan; qattn.backends(), qattn.device_info()
    qattn.capi: the raw ctypes structs, enums and library (qattn.capi.load()).

Errors: qattn.QattnError and one subclass per qattn_status, each carrying
qattn_last_error's message.
"""
from . import _capi as capi
from ._attention import (LAYOUTS, PRECISIONS, attention, attention_plan, clear_plan_caches, get_context)
from ._capi import (CAP_BF16, CAP_FP8, CAP_FP16, CAP_INT8_DOT, CAP_MATRIX_UNITS, CAP_SUBGROUPS, CAP_UNIFIED_MEMORY,
                    FLAG_NO_FINITE_CHECK, DType, Granularity, KVLayout, KVScales, LibraryNotFound, PageTableKind,
                    Precision, SparseLayoutKind, Status, Toggle, library_path)
from ._core import (BackendInfo, Buffer, Context, DeviceInfo, Plan, PlanInfo, backends, device_info, dtype_name,
                    dtype_size, granularity_name, make_desc, precision_name, status_str, tensor_bytes, tensor_desc,
                    tensor_hnd, tensor_nhd, version, version_number)
from ._sparse import (BlockLayout, PredictParams, block_visibility, make_sparse_desc, sparse_attention,
                      sparse_attention_plan, sparse_mask)
from ._paged import CACHE_DTYPES, PagedKVCache, PagedPlan, PageSelect, create_paged_plan, paged_attention
from ._structured import structured_qkv
from ._tune import SparsityTuning, tune_sparsity
from ._errors import (BackendError, DeviceLostError, InternalError, InvalidArgumentError, NonfiniteInputError,
                      NotFoundError, OutOfMemoryError, QattnError, UnavailableError, UnsupportedError)

__version__ = "0.3.0"  # of this binding; qattn.version() is the loaded library's

__all__ = [
    "attention", "attention_plan", "get_context", "clear_plan_caches", "LAYOUTS", "PRECISIONS",
    "sparse_attention", "sparse_attention_plan", "sparse_mask", "block_visibility", "make_sparse_desc",
    "BlockLayout", "PredictParams", "SparseLayoutKind", "structured_qkv", "tune_sparsity", "SparsityTuning",
    "PagedKVCache", "PageSelect", "PagedPlan", "paged_attention", "create_paged_plan", "CACHE_DTYPES",
    "KVLayout", "KVScales", "PageTableKind",
    "Context", "Buffer", "Plan", "BackendInfo", "DeviceInfo", "PlanInfo",
    "backends", "device_info", "version", "version_number", "library_path", "status_str",
    "dtype_name", "dtype_size", "precision_name", "granularity_name",
    "tensor_desc", "tensor_hnd", "tensor_nhd", "tensor_bytes", "make_desc",
    "DType", "Precision", "Granularity", "Toggle", "Status", "FLAG_NO_FINITE_CHECK",
    "CAP_FP16", "CAP_BF16", "CAP_INT8_DOT", "CAP_FP8", "CAP_MATRIX_UNITS", "CAP_SUBGROUPS", "CAP_UNIFIED_MEMORY",
    "QattnError", "InvalidArgumentError", "UnsupportedError", "OutOfMemoryError", "BackendError",
    "DeviceLostError", "NotFoundError", "UnavailableError", "NonfiniteInputError", "InternalError",
    "LibraryNotFound", "capi",
]
