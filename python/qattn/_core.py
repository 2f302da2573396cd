"""The C API as Python objects: Context, Buffer, Plan.

Lifetimes follow the C rules (a context outlives its buffers and plans)
through references: every Buffer and Plan holds the native context it was
made on, so the context is destroyed only after the last of them. Objects
still alive when the interpreter shuts down are not destroyed (the process is
ending, and a GPU runtime may already be torn down).
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import sys
import threading
from ctypes import byref, c_void_p

from . import _capi as capi
from ._capi import Granularity, Precision, Toggle, text
from ._errors import InvalidArgumentError, UnavailableError, error_for


def _lib():
    return capi.load()


def _finalizing():
    return sys is None or sys.is_finalizing()


def raise_status(status, ctx_handle):
    """Raises the exception of a failed call, with qattn_last_error's message
    (of ctx_handle, or of this thread when the call had no context)."""
    raise error_for(status, text(_lib().qattn_last_error(ctx_handle)))


# ------------------------------------------------------------ plain values


def version():
    """The loaded library's "MAJOR.MINOR.PATCH"."""
    return text(_lib().qattn_version())


def version_number():
    return int(_lib().qattn_version_number())


def status_str(status):
    return text(_lib().qattn_status_str(int(status)))


def dtype_size(dtype):
    return int(_lib().qattn_dtype_size(int(dtype)))


def dtype_name(dtype):
    return text(_lib().qattn_dtype_name(int(dtype)))


def precision_name(precision):
    return text(_lib().qattn_precision_name(int(precision)))


def granularity_name(granularity):
    return text(_lib().qattn_granularity_name(int(granularity)))


def tensor_hnd(dtype, b, h, n, d):
    """qattn_tensor_hnd: a contiguous [B, H, N, D] descriptor."""
    return _lib().qattn_tensor_hnd(int(dtype), b, h, n, d)


def tensor_nhd(dtype, b, h, n, d):
    """qattn_tensor_nhd: a contiguous [B, N, H, D] tensor described as [B, H, N, D]."""
    return _lib().qattn_tensor_nhd(int(dtype), b, h, n, d)


def tensor_desc(dtype, shape, stride):
    """A qattn_tensor_desc from a dtype and [B, H, N, D] shape and element strides."""
    if len(shape) != 4 or len(stride) != 4:
        raise InvalidArgumentError("a tensor descriptor needs 4 dims [B, H, N, D], got shape %s and stride %s" %
                                   (list(shape), list(stride)))
    return capi.TensorDesc(int(dtype), (ctypes.c_int64 * 4)(*shape), (ctypes.c_int64 * 4)(*stride))


def tensor_bytes(desc):
    """Bytes spanned by the tensor from its first element (0 if invalid)."""
    return int(_lib().qattn_tensor_bytes(byref(desc)))


def _precision_names(bits):
    return [precision_name(p) for p in range(1, capi.PRECISION_COUNT) if bits & (1 << p)]


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    built: bool
    usable: bool
    device_count: int
    reason: str  # why not usable; "" when usable


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str
    vendor: str
    driver: str
    compute_units: int
    memory_bytes: int
    max_buffer_bytes: int
    caps: int  # capi.CAP_* bits
    precisions: tuple  # names of the modes it runs ("auto", "exact", ...)
    details: str

    @classmethod
    def from_c(cls, info):
        return cls(text(info.name), text(info.vendor), text(info.driver), int(info.compute_units),
                   int(info.memory_bytes), int(info.max_buffer_bytes), int(info.caps),
                   tuple(precision_name(p) for p in range(capi.PRECISION_COUNT) if info.precisions & (1 << p)),
                   text(info.details))


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    precision: str  # chosen mode, never "auto"
    granularity: str  # chosen INT8 scale granularity ("default" for exact)
    smooth_k: bool
    q_tile: int
    kv_tile: int
    q_quant_block: int
    q_quant_interleave: int
    k_quant_block: int
    k_quant_interleave: int
    v_fp8_max: float
    p_fp8_scale: float
    pv_f16_chunk: int
    workspace_bytes: int
    kernel: str

    @classmethod
    def from_c(cls, info):
        return cls(precision_name(info.precision), granularity_name(info.granularity), bool(info.smooth_k),
                   int(info.q_tile), int(info.kv_tile), int(info.q_quant_block), int(info.q_quant_interleave),
                   int(info.k_quant_block), int(info.k_quant_interleave), float(info.v_fp8_max),
                   float(info.p_fp8_scale), int(info.pv_f16_chunk), int(info.workspace_bytes), text(info.kernel))


def backends():
    """Every backend qattn knows, built or not, with whether it runs here."""
    lib = _lib()
    out = []
    for i in range(lib.qattn_backend_count()):
        info = capi.BackendInfo()
        status = lib.qattn_backend_query(i, byref(info))
        if status:
            raise_status(status, None)
        out.append(BackendInfo(text(info.name), bool(info.built), bool(info.usable), int(info.device_count),
                               text(info.reason)))
    return out


def device_info(backend, device=0):
    """qattn_device_query: one device of a usable backend."""
    info = capi.DeviceInfo()
    status = _lib().qattn_device_query(backend.encode(), int(device), byref(info))
    if status:
        raise_status(status, None)
    return DeviceInfo.from_c(info)


# ---------------------------------------------------------------- context


class _NativeContext:
    """Owns one qattn_ctx*; destroyed when the last object using it goes.

    Buffers and plans hold a reference to it, and also register as children
    (retain / release): when the garbage collector frees a reference cycle
    that holds the context and its buffers (say, through an exception's
    traceback), it runs their finalizers in no particular order, so the
    context's may run first. It then only marks itself pending, and the last
    child to be destroyed destroys the context."""

    __slots__ = ("handle", "children", "pending", "__weakref__")

    def __init__(self, handle):
        self.handle = handle
        self.children = []  # one token per live child (list append/pop are atomic)
        self.pending = False

    def retain(self):
        self.children.append(None)

    def release(self):
        if self.children:
            self.children.pop()
        if self.pending and not self.children:
            self._destroy()

    def _destroy(self):
        if self.handle and not _finalizing():
            _lib().qattn_ctx_destroy(self.handle)
        self.handle = None

    def __del__(self):
        if self.children:
            self.pending = True  # a child in the same cycle is still to be finalized
            return
        self._destroy()


class Context:
    """qattn_ctx: a backend and device.

    backend: "cpu", "cuda", "vulkan", "opencl", "auto", or None ($QATTN_BACKEND,
    else auto). device: an index or a name substring, None ($QATTN_DEVICE, else
    0). num_threads: CPU worker threads, 0 for the default.
    plan_cache_size: how many plans Context.plan keeps (least recently used go).
    """

    def __init__(self, backend=None, device=None, num_threads=0, plan_cache_size=64):
        lib = _lib()
        params = capi.CtxParams(backend.encode() if backend is not None else None,
                                str(device).encode() if device is not None else None, int(num_threads))
        handle = c_void_p()
        status = lib.qattn_ctx_create(byref(params), byref(handle))
        if status:
            raise_status(status, None)
        self._native = _NativeContext(handle.value)
        self.backend = text(lib.qattn_ctx_backend(handle))
        info = capi.DeviceInfo()
        status = lib.qattn_ctx_device_info(handle, byref(info))
        if status:
            raise_status(status, handle)
        self.device_info = DeviceInfo.from_c(info)
        self._plans = collections.OrderedDict()
        self._plans_lock = threading.Lock()
        self.plan_cache_size = int(plan_cache_size)
        self.plan_cache_hits = 0
        self.plan_cache_misses = 0

    def __repr__(self):
        return "qattn.Context(backend=%r, device=%r)" % (self.backend, self.device_info.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def handle(self):
        """The qattn_ctx* as an int (for direct calls through qattn.capi)."""
        if self._native is None:
            raise InvalidArgumentError("the context is closed")
        return self._native.handle

    def close(self):
        """Drops this object's hold on the native context and its cached plans.
        The qattn_ctx itself is destroyed once no Buffer or Plan uses it."""
        with self._plans_lock:
            self._plans.clear()
        self._native = None

    @property
    def last_error(self):
        return text(_lib().qattn_last_error(self.handle))

    def _check(self, status):
        if status:
            raise_status(status, self.handle)

    def synchronize(self):
        """Waits for all work the context enqueued."""
        self._check(_lib().qattn_ctx_synchronize(self.handle))

    # buffers

    def create_buffer(self, nbytes):
        """qattn_buffer_create: backend-owned memory; contents undefined."""
        out = c_void_p()
        self._check(_lib().qattn_buffer_create(self.handle, int(nbytes), byref(out)))
        return Buffer(self._native, out.value, None)

    def wrap(self, native, nbytes, keepalive=None):
        """qattn_buffer_wrap: memory you own (CPU: a host address; CUDA: a device
        address; Vulkan: a VkBuffer; OpenCL: a cl_mem), given as an int.
        keepalive: an object the buffer holds on to (the memory's owner)."""
        out = c_void_p()
        self._check(_lib().qattn_buffer_wrap(self.handle, c_void_p(int(native)), int(nbytes), byref(out)))
        return Buffer(self._native, out.value, keepalive)

    # plans

    def create_plan(self, desc):
        """qattn_plan_create: a new plan for a capi.AttentionDesc (not cached)."""
        out = c_void_p()
        self._check(_lib().qattn_plan_create(self.handle, byref(desc), byref(out)))
        return Plan(self._native, out.value, desc)

    def create_sparse_plan(self, desc, sparse):
        """qattn_sparse_plan_create: a new plan for a capi.AttentionDesc restricted
        by a capi.SparseDesc (None: a dense plan through the same call)."""
        fn = _sparse_function("qattn_sparse_plan_create")
        out = c_void_p()
        self._check(fn(self.handle, byref(desc), byref(sparse) if sparse is not None else None, byref(out)))
        return Plan(self._native, out.value, desc, sparse)

    def plan(self, desc):
        """The plan for desc from this context's LRU cache, created on a miss."""
        return self.cached_plan(desc.key(), lambda: desc)

    def cached_plan(self, key, make_desc, create=None):
        """The cached plan under key (a capi.AttentionDesc.key() value), else a
        new one for make_desc(), stored under key. make_desc runs only on a
        miss, so callers skip building ctypes structs on hits. create: how a
        miss makes the plan from make_desc()'s value (default create_plan)."""
        with self._plans_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self.plan_cache_hits += 1
                return plan
        # Plan creation may compile shaders: not under the lock. Two threads
        # missing at once both build; the first stored wins.
        plan = (create or self.create_plan)(make_desc())
        with self._plans_lock:
            self.plan_cache_misses += 1
            plan = self._plans.setdefault(key, plan)
            self._plans.move_to_end(key)
            while len(self._plans) > max(self.plan_cache_size, 0):
                self._plans.popitem(last=False)  # destroyed once no caller holds it
        return plan

    def clear_plan_cache(self):
        with self._plans_lock:
            self._plans.clear()

    @property
    def plan_cache_len(self):
        with self._plans_lock:
            return len(self._plans)


# ---------------------------------------------------------------- buffers


def _address_of_buffer(obj, writable):
    """(address, nbytes, keepalive) of a C-contiguous buffer-protocol object."""
    view = memoryview(obj)
    if not view.c_contiguous:
        raise InvalidArgumentError("the buffer must be C-contiguous")
    view = view.cast("B")
    if view.readonly:
        if writable:
            raise InvalidArgumentError("the destination buffer is read-only")
        copy = bytearray(view)  # ctypes can only address writable memory
        view = memoryview(copy)
    array = (ctypes.c_char * len(view)).from_buffer(view)
    return ctypes.addressof(array), len(view), (view, array)


class Buffer:
    """qattn_buffer: device memory of a context (owned or wrapped)."""

    def __init__(self, native_ctx, handle, keepalive):
        self._native_ctx = native_ctx
        self._handle = handle
        self._keepalive = keepalive
        native_ctx.retain()

    def __del__(self):
        if getattr(self, "_handle", None):
            if not _finalizing():
                _lib().qattn_buffer_destroy(self._handle)
                self._native_ctx.release()
        self._handle = None

    def close(self):
        if self._handle:
            _lib().qattn_buffer_destroy(self._handle)
            self._native_ctx.release()
        self._handle = None
        self._keepalive = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def handle(self):
        if not self._handle:
            raise InvalidArgumentError("the buffer is closed")
        return self._handle

    @property
    def size(self):
        return int(_lib().qattn_buffer_size(self.handle))

    def _check(self, status):
        if status:
            raise_status(status, self._native_ctx.handle)

    def upload_from(self, address, nbytes, offset=0):
        """Copies nbytes from a host address (an int) to offset."""
        self._check(_lib().qattn_buffer_upload(self.handle, int(offset), c_void_p(int(address)), int(nbytes)))

    def upload(self, data, offset=0):
        """Copies a bytes-like object (bytes, bytearray, numpy array, ...) to offset."""
        address, nbytes, keep = _address_of_buffer(data, writable=False)
        self.upload_from(address, nbytes, offset)
        del keep

    def download_to(self, address, nbytes, offset=0):
        """Copies nbytes at offset to a host address (an int)."""
        self._check(_lib().qattn_buffer_download(self.handle, int(offset), c_void_p(int(address)), int(nbytes)))

    def download_into(self, dst, offset=0):
        """Fills a writable bytes-like object from offset."""
        address, nbytes, keep = _address_of_buffer(dst, writable=True)
        self.download_to(address, nbytes, offset)
        del keep

    def download(self, nbytes=None, offset=0):
        """Returns nbytes (default: to the end) from offset as a bytearray."""
        if nbytes is None:
            nbytes = max(self.size - int(offset), 0)
        out = bytearray(nbytes)
        if nbytes:
            self.download_into(out, offset)
        return out

    def fill(self, value, offset=0, nbytes=None):
        """Sets nbytes (default: to the end) from offset to the byte value."""
        if nbytes is None:
            nbytes = max(self.size - int(offset), 0)
        if not 0 <= int(value) <= 255:
            raise InvalidArgumentError("fill value %r is not a byte (0..255)" % (value,))
        self._check(_lib().qattn_buffer_fill(self.handle, int(offset), int(nbytes), int(value)))


# ------------------------------------------------------------------ plans


def _sparse_function(name):
    """A sparse-attention entry point of the loaded library, or UnavailableError
    when the library predates them."""
    fn = getattr(_lib(), name, None)
    if fn is None:
        raise UnavailableError("the loaded libqattn (%s, version %s) has no %s: it predates sparse attention; "
                               "rebuild it" % (capi.library_path(), version(), name))
    return fn


class Plan:
    """qattn_plan: a validated attention problem with its kernel chosen.
    Sparse plans (Context.create_sparse_plan) also carry `sparse`, a copy of
    their capi.SparseDesc (None for dense plans)."""

    def __init__(self, native_ctx, handle, desc, sparse=None):
        self._native_ctx = native_ctx
        self._handle = handle
        native_ctx.retain()
        self.desc = capi.AttentionDesc.from_buffer_copy(desc)
        self.sparse = capi.SparseDesc.from_buffer_copy(sparse) if sparse is not None else None
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

    def __repr__(self):
        return "qattn.Plan(%s, kernel=%r, workspace=%d)" % (self.info.precision, self.info.kernel,
                                                            self.workspace_size)

    @property
    def handle(self):
        if not self._handle:
            raise InvalidArgumentError("the plan is closed")
        return self._handle

    def close(self):
        if self._handle:
            _lib().qattn_plan_destroy(self._handle)
            self._native_ctx.release()
        self._handle = None

    def describe(self):
        """qattn_plan_describe: variant, tiles, quantization and why."""
        lib = _lib()
        n = lib.qattn_plan_describe(self.handle, None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        lib.qattn_plan_describe(self.handle, buf, n + 1)
        return text(buf.value)

    def run(self, q, k, v, o, lse=None, workspace=None, q_offset=0, k_offset=0, v_offset=0, o_offset=0,
            lse_offset=0, workspace_offset=0, stream=None):
        """qattn_run on Buffers. stream: a cudaStream_t as an int (CUDA only)."""

        def handle(buf):
            return None if buf is None else buf.handle

        args = capi.RunArgs(handle(q), handle(k), handle(v), handle(o), handle(lse), handle(workspace),
                            q_offset, k_offset, v_offset, o_offset, lse_offset, workspace_offset,
                            None if not stream else int(stream))
        status = _lib().qattn_run(self.handle, byref(args))
        if status:
            raise_status(status, self._native_ctx.handle)

    # sparse plans

    def layout_rows(self):
        """qattn_sparse_layout_rows: (rows, q_block, k_block) of a sparse plan's
        layout; (0, 0, 0) for a plan without one."""
        qb, kb = ctypes.c_int64(), ctypes.c_int64()
        rows = _sparse_function("qattn_sparse_layout_rows")(self.handle, byref(qb), byref(kb))
        return int(rows), int(qb.value), int(kb.value)

    def sparse_run(self, q, k, v, o, lse=None, workspace=None, block_indptr=None, block_indices=None,
                   block_count=0, q_offset=0, k_offset=0, v_offset=0, o_offset=0, lse_offset=0, workspace_offset=0,
                   stream=None):
        """qattn_sparse_run on Buffers: block_indptr / block_indices are int32
        Buffers holding a BLOCKS plan's layout (read from offset 0)."""

        def handle(buf):
            return None if buf is None else buf.handle

        args = capi.RunArgs(handle(q), handle(k), handle(v), handle(o), handle(lse), handle(workspace),
                            q_offset, k_offset, v_offset, o_offset, lse_offset, workspace_offset,
                            None if not stream else int(stream))
        sparse = capi.SparseArgs(handle(block_indptr), handle(block_indices), int(block_count))
        status = _sparse_function("qattn_sparse_run")(self.handle, byref(args), byref(sparse))
        if status:
            raise_status(status, self._native_ctx.handle)

    def read_layout(self, workspace, workspace_offset=0):
        """qattn_sparse_layout_read after a run of a PREDICT plan with this
        workspace (a Buffer): (indptr int32 [rows + 1], indices int32 [nnz],
        density float32 [B * Hkv]) as numpy arrays."""
        import numpy as np
        fn = _sparse_function("qattn_sparse_layout_read")
        rows, _, _ = self.layout_rows()
        batch, heads_kv = int(self.desc.k.shape[0]), int(self.desc.k.shape[1])
        indptr = np.zeros(rows + 1, dtype=np.int32)
        density = np.zeros(batch * heads_kv, dtype=np.float32)
        count = ctypes.c_int64()
        _read_layout(fn, self, workspace.handle, workspace_offset, indptr, None, 0, count, density)
        indices = np.zeros(int(count.value), dtype=np.int32)
        if count.value:
            _read_layout(fn, self, workspace.handle, workspace_offset, None, indices, indices.size, count, None)
        return indptr, indices, density


def _read_layout(fn, plan, workspace_handle, workspace_offset, indptr, indices, capacity, count, density):
    """One qattn_sparse_layout_read into numpy arrays (None: not read)."""

    def pointer(array, ctype):
        return None if array is None else array.ctypes.data_as(ctypes.POINTER(ctype))

    status = fn(plan.handle, workspace_handle, int(workspace_offset), pointer(indptr, ctypes.c_int32),
                pointer(indices, ctypes.c_int32), int(capacity), byref(count), pointer(density, ctypes.c_float))
    if status:
        raise_status(status, plan._native_ctx.handle)


def make_desc(q, k, v, o, causal=False, return_lse=False, sm_scale=0.0, precision=Precision.AUTO,
              granularity=Granularity.DEFAULT, smooth_k=Toggle.DEFAULT, flags=0):
    """A capi.AttentionDesc from four TensorDescs and the options."""
    return capi.AttentionDesc(q, k, v, o, int(bool(causal)), int(bool(return_lse)), float(sm_scale), int(precision),
                              int(granularity), int(smooth_k), int(flags))


__all__ = ["BackendInfo", "Buffer", "Context", "DeviceInfo", "Plan", "PlanInfo", "backends", "device_info", "dtype_name",
           "dtype_size", "granularity_name", "make_desc", "precision_name", "raise_status", "status_str",
           "tensor_bytes", "tensor_desc", "tensor_hnd", "tensor_nhd", "version", "version_number"]
