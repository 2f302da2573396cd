"""qattn.attention: scaled-dot-product attention on torch tensors or numpy arrays.

torch CUDA tensors run on the CUDA backend, on the current torch stream of
their device; torch CPU tensors and numpy arrays run on the CPU backend. The
tensors are wrapped in place (no copies); the output, the LSE and the
workspace are allocated by the array library of the inputs (for torch CUDA:
the caching allocator, stream-ordered on the current stream).
"""
from __future__ import annotations

import ctypes
import sys
import threading

from . import _capi as capi
from ._capi import DType, Granularity, Precision, Toggle
from ._core import Context, make_desc, raise_status, tensor_desc
from ._errors import InvalidArgumentError, UnsupportedError

# cudaStreamLegacy: torch reports its default stream as 0, which qattn_run
# would read as "the context's default stream". Naming the legacy default
# stream keeps the kernel ordered with torch's work on it.
CUDA_STREAM_LEGACY = 0x1

WORKSPACE_ALIGN = 256  # QATTN_WS_ALIGN: the workspace's regions are laid out from an aligned base

PRECISIONS = {p.name.lower(): p for p in Precision}
GRANULARITIES = {g.name.lower(): g for g in Granularity}
LAYOUTS = ("HND", "NHD")
# Where B, H, N, D sit in a tensor of each layout.
_LAYOUT_DIMS = {"HND": (0, 1, 2, 3), "NHD": (0, 2, 1, 3)}


# ------------------------------------------------------------ contexts


_contexts = {}
_contexts_lock = threading.Lock()


def get_context(device="cpu"):
    """The context attention() uses for a device, created on first use and
    kept for the process: "cpu", or "cuda:N" / a torch.device of type cuda."""
    kind, index = _parse_device(device)
    return _context_for(kind, index)


def _parse_device(device):
    text = str(device)
    if text == "cpu":
        return "cpu", None
    if text.startswith("cuda"):
        index = text[5:] if text.startswith("cuda:") else ""
        if index == "":
            torch = sys.modules.get("torch")
            return "cuda", torch.cuda.current_device() if torch is not None else 0
        if index.isdigit():
            return "cuda", int(index)
    raise InvalidArgumentError("device %r is neither 'cpu' nor 'cuda[:N]'" % (device,))


def _context_for(kind, index):
    key = (kind, index)
    ctx = _contexts.get(key)
    if ctx is not None and ctx._native is not None:
        return ctx
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None or ctx._native is None:  # first use, or the caller closed it
            # The device is named explicitly so $QATTN_DEVICE (meant for another
            # backend, say) cannot move a torch tensor's work elsewhere.
            ctx = Context(backend=kind, device=str(index if index is not None else 0))
            _contexts[key] = ctx
    return ctx


def clear_plan_caches():
    """Drops every cached plan of attention()'s contexts."""
    with _contexts_lock:
        for ctx in _contexts.values():
            ctx.clear_plan_cache()


# ------------------------------------------------------------- operands


class _Operand:
    """What qattn needs to know of one input or output array."""

    __slots__ = ("name", "array", "framework", "device", "dtype", "shape", "strides", "wrap_address", "wrap_bytes",
                 "offset", "itemsize")

    def __repr__(self):
        return "<%s %s %s %s>" % (self.name, self.framework, self.shape, self.strides)


_NUMPY_DTYPES = {"f": DType.F32, "e": DType.F16, "b": DType.I8}  # by numpy's dtype.char
_NUMPY_EXTRA_DTYPES = {"bfloat16": DType.BF16, "float8_e4m3fn": DType.FP8_E4M3}  # ml_dtypes, when used
_torch_dtypes = None


def _numpy_dtype(dtype):
    found = _NUMPY_DTYPES.get(dtype.char) if dtype.isbuiltin else None
    return found if found is not None else _NUMPY_EXTRA_DTYPES.get(dtype.name)


def _torch_dtype(torch, dtype):
    global _torch_dtypes
    if _torch_dtypes is None:
        table = {torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16,
                 torch.int8: DType.I8}
        fp8 = getattr(torch, "float8_e4m3fn", None)
        if fp8 is not None:
            table[fp8] = DType.FP8_E4M3
        _torch_dtypes = table
    return _torch_dtypes.get(dtype)


def _operand(name, array):
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    op = _Operand()
    op.name = name
    op.array = array
    if np is not None and isinstance(array, np.ndarray):
        op.framework = "numpy"
        op.device = ("cpu", None)
        op.dtype = _numpy_dtype(array.dtype)
        op.itemsize = array.itemsize
        op.shape = tuple(array.shape)
        if any(s % array.itemsize for s in array.strides):
            raise InvalidArgumentError("%s's byte strides %s are not multiples of its %d-byte elements" %
                                       (name, array.strides, array.itemsize))
        op.strides = tuple(s // array.itemsize for s in array.strides)
        if not array.flags.aligned:
            raise InvalidArgumentError("%s is not aligned to its %d-byte elements" % (name, array.itemsize))
        op.wrap_address = array.__array_interface__["data"][0]
        op.wrap_bytes = None  # the tensor's own span, known once validated
        op.offset = 0
    elif torch is not None and isinstance(array, torch.Tensor):
        op.framework = "torch"
        if array.layout != torch.strided:
            raise UnsupportedError("%s has layout %s; only strided (dense) tensors are supported" %
                                   (name, array.layout))
        if array.device.type == "cuda":
            op.device = ("cuda", array.device.index)
        elif array.device.type == "cpu":
            op.device = ("cpu", None)
        else:
            raise UnsupportedError("%s is on device %s; qattn runs torch tensors on cuda and cpu" %
                                   (name, array.device))
        if array.is_neg() or array.is_conj():
            raise InvalidArgumentError("%s is a lazily negated/conjugated view; call resolve_neg()/resolve_conj()"
                                       % name)
        op.dtype = _torch_dtype(torch, array.dtype)
        op.itemsize = array.element_size()
        op.shape = tuple(array.shape)
        op.strides = tuple(array.stride())
        # Wrap the whole storage and pass the view's byte offset: the library
        # then checks the offset against the backend's alignment.
        storage = array.untyped_storage()
        op.wrap_address = storage.data_ptr()
        op.wrap_bytes = storage.nbytes()
        op.offset = array.data_ptr() - op.wrap_address
    else:
        raise InvalidArgumentError("%s must be a torch.Tensor or a numpy.ndarray, got %s" %
                                   (name, type(array).__name__))
    if op.dtype is None:
        raise UnsupportedError("%s.dtype=%s has no qattn dtype (attention takes float32, float16 or bfloat16)" %
                               (name, array.dtype))
    return op


def _desc_geometry(op, layout):
    """([B, H, N, D] shape, element strides) of an operand in a layout."""
    if len(op.shape) != 4:
        raise InvalidArgumentError("%s must be 4-D, [B, %s] for layout %s; got shape %s" %
                                   (op.name, ", ".join(layout[i] for i in range(3)) + ", D", layout,
                                    list(op.shape)))
    dims = _LAYOUT_DIMS[layout]
    shape = [op.shape[i] for i in dims]
    stride = [op.strides[i] for i in dims]
    return shape, _normalize_unit_strides(shape, stride)


def _normalize_unit_strides(shape, stride):
    """The stride of a size-1 dim is meaningless (numpy gives a newaxis 0, torch
    views anything); qattn wants every stride positive and aligned, so such a
    dim gets the tensor's full reach, as a contiguous tensor would. Equal
    tensors then also share one cached plan."""
    if 1 not in shape[:3]:
        return stride
    reach = max([shape[i] * stride[i] for i in range(4) if shape[i] != 1 and stride[i] > 0] + [shape[3]])
    return [reach if (i < 3 and shape[i] == 1) else stride[i] for i in range(4)]


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


# -------------------------------------------------------------- options


def _parse_precision(precision):
    if isinstance(precision, str):
        p = PRECISIONS.get(precision.lower())
        if p is None:
            raise InvalidArgumentError("unknown precision %r; valid: %s" % (precision, ", ".join(PRECISIONS)))
        return p
    return int(precision)  # an int the library validates (a bad one gets its message)


def _parse_granularity(granularity):
    if granularity is None:
        return Granularity.DEFAULT
    if isinstance(granularity, str):
        g = GRANULARITIES.get(granularity.lower())
        if g is None:
            raise InvalidArgumentError("unknown granularity %r; valid: %s" %
                                       (granularity, ", ".join(GRANULARITIES)))
        return g
    return int(granularity)


def _parse_toggle(value):
    if value is None:
        return Toggle.DEFAULT
    if isinstance(value, Toggle):
        return value
    return Toggle.ON if value else Toggle.OFF


def _parse_layout(layout):
    text = str(layout).upper()
    if text not in LAYOUTS:
        raise InvalidArgumentError("layout=%r; valid: 'HND' ([B, H, N, D]) or 'NHD' ([B, N, H, D])" % (layout,))
    return text


def _sm_scale_value(sm_scale):
    if sm_scale is None:
        return 0.0  # the C API's "1/sqrt(D)"
    value = float(sm_scale)
    if value == 0.0:
        raise InvalidArgumentError("sm_scale=0 is not supported (the C API reads 0 as 1/sqrt(D)); pass None for "
                                   "the default")
    return value


# ----------------------------------------------------------------- calls


class _Call:
    """One attention call: operands checked, plan found; run() executes it."""

    def __init__(self, q, k, v, is_causal, sm_scale, precision, layout, return_lse, granularity, smooth_k,
                 check_finite):
        self.layout = _parse_layout(layout)
        precision = _parse_precision(precision)
        granularity = _parse_granularity(granularity)
        smooth_k = _parse_toggle(smooth_k)
        scale = _sm_scale_value(sm_scale)
        flags = 0 if check_finite else capi.FLAG_NO_FINITE_CHECK
        self.return_lse = bool(return_lse)

        self.ops = [_operand("q", q), _operand("k", k), _operand("v", v)]
        frameworks = {op.framework for op in self.ops}
        if len(frameworks) != 1:
            raise InvalidArgumentError("q, k and v must all be torch tensors or all numpy arrays, got %s" %
                                       ", ".join(op.framework for op in self.ops))
        self.framework = frameworks.pop()
        devices = {op.device for op in self.ops}
        if len(devices) != 1:
            raise InvalidArgumentError("q, k and v are on different devices: %s" %
                                       ", ".join("%s=%s" % (op.name, _device_text(op.device)) for op in self.ops))
        self.device = devices.pop()
        if self.framework == "torch":
            torch = sys.modules["torch"]
            if torch.is_grad_enabled() and any(op.array.requires_grad for op in self.ops):
                raise UnsupportedError("qattn.attention has no backward pass; call it under torch.no_grad() or "
                                       "on detached tensors")

        geometry = [_desc_geometry(op, self.layout) for op in self.ops]
        q_shape = geometry[0][0]
        # O: q's shape, contiguous in the caller's layout, q's dtype.
        self.o_shape = tuple(self.ops[0].shape)
        dims = _LAYOUT_DIMS[self.layout]
        o_strides = _contiguous_strides(self.o_shape)
        o_geometry = (q_shape, _normalize_unit_strides(q_shape, [o_strides[i] for i in dims]))
        dtypes = [int(op.dtype) for op in self.ops] + [int(self.ops[0].dtype)]
        tensors = [(dt, tuple(shape), tuple(stride)) for dt, (shape, stride) in zip(dtypes, geometry + [o_geometry])]
        self.lse_shape = (q_shape[0], q_shape[1], q_shape[2])
        key = tuple(tensors) + (int(bool(is_causal)), int(self.return_lse), bytes(ctypes.c_float(scale)),
                                int(precision), int(granularity), int(smooth_k), flags)

        def build_desc():
            descs = [tensor_desc(dt, shape, stride) for dt, shape, stride in tensors]
            return make_desc(*descs, causal=is_causal, return_lse=self.return_lse, sm_scale=scale,
                             precision=precision, granularity=granularity, smooth_k=smooth_k, flags=flags)

        self.ctx = _context_for(*self.device)
        self.plan = self._make_plan(key, build_desc)  # validates: the spans below are sound
        for op, (_, shape, stride) in zip(self.ops, tensors):
            if op.wrap_bytes is None:  # numpy: the tensor's span from its first element
                op.wrap_bytes = op.itemsize * (1 + sum((n - 1) * st for n, st in zip(shape, stride)))
        self.o_bytes = self.ops[0].itemsize * q_shape[0] * q_shape[1] * q_shape[2] * q_shape[3]

    # Hooks of calls that run another entry point (qattn.sparse_attention).

    def _make_plan(self, key, build_desc):
        return self.ctx.cached_plan(key, build_desc)

    def _extra_regions(self):
        """(address, bytes) of further memory the call reads, wrapped for it."""
        return []

    def _invoke(self, lib, plan_handle, args, extra_handles):
        return lib.qattn_run(plan_handle, ctypes.byref(args))

    def _after_run(self, lib, handles, extra_handles):
        """What the call returns beyond O and LSE, read while its buffers live."""
        return ()

    def run(self):
        lib = capi.load()
        ctx_handle = self.ctx.handle
        plan_handle = self.plan.handle  # self.plan keeps the plan alive through the call
        if self.framework == "numpy":
            out, lse, workspace = self._allocate_numpy()
        else:
            out, lse, workspace = self._allocate_torch()
        # (address, bytes, offset) of q, k, v, o, lse, workspace, wrapped for
        # this call only: the library keeps no pointer after qattn_run returns.
        regions = [(op.wrap_address, op.wrap_bytes, op.offset) for op in self.ops]
        regions.append((_address(out), self.o_bytes, 0))
        regions.append((_address(lse), 4 * lse_elements(self.lse_shape), 0) if lse is not None else None)
        if workspace is not None:
            ws_address = _address(workspace)
            aligned = (ws_address + WORKSPACE_ALIGN - 1) // WORKSPACE_ALIGN * WORKSPACE_ALIGN
            regions.append((aligned, self.plan.workspace_size, 0))
        else:
            regions.append(None)
        extra = self._extra_regions()
        handles, extra_handles = [], []
        try:
            out_handle = ctypes.c_void_p()
            for region, into in [(r, handles) for r in regions] + [(r, extra_handles) for r in extra]:
                if region is None:
                    into.append(None)
                    continue
                status = lib.qattn_buffer_wrap(ctx_handle, region[0], region[1], ctypes.byref(out_handle))
                if status:
                    raise_status(status, ctx_handle)
                into.append(out_handle.value)
            stream = None
            if self.device[0] == "cuda":
                torch = sys.modules["torch"]
                stream = torch.cuda.current_stream(self.device[1]).cuda_stream or CUDA_STREAM_LEGACY
            args = capi.RunArgs(*handles, *(r[2] if r else 0 for r in regions), stream)
            if self.device[0] == "cuda" and sys.modules["torch"].cuda.current_device() != self.device[1]:
                with sys.modules["torch"].cuda.device(self.device[1]):
                    status = self._invoke(lib, plan_handle, args, extra_handles)
            else:
                status = self._invoke(lib, plan_handle, args, extra_handles)
            if status:
                raise_status(status, ctx_handle)
            more = self._after_run(lib, handles, extra_handles)
        finally:
            for handle in handles + extra_handles:
                if handle:
                    lib.qattn_buffer_destroy(handle)
            # The workspace lives until here: the kernels are enqueued on the
            # current stream, which also orders the caching allocator's reuse.
            del workspace
        result = (out, lse) if self.return_lse else (out,)
        result += tuple(more)
        return result if len(result) > 1 else out

    def _allocate_numpy(self):
        np = sys.modules["numpy"]
        out = np.empty(self.o_shape, dtype=self.ops[0].array.dtype)
        lse = np.empty(self.lse_shape, dtype=np.float32) if self.return_lse else None
        ws = self.plan.workspace_size
        workspace = np.empty(ws + WORKSPACE_ALIGN, dtype=np.uint8) if ws else None
        return out, lse, workspace

    def _allocate_torch(self):
        torch = sys.modules["torch"]
        device = self.ops[0].array.device
        out = torch.empty(self.o_shape, dtype=self.ops[0].array.dtype, device=device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=device) if self.return_lse else None
        ws = self.plan.workspace_size
        workspace = torch.empty(ws + WORKSPACE_ALIGN, dtype=torch.uint8, device=device) if ws else None
        return out, lse, workspace


def lse_elements(shape):
    return shape[0] * shape[1] * shape[2]


def _address(array):
    np = sys.modules.get("numpy")
    if np is not None and isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0]
    return array.data_ptr()


def _device_text(device):
    return device[0] if device[1] is None else "%s:%d" % device


def attention(q, k, v, is_causal=False, sm_scale=None, precision="auto", layout="HND", return_lse=False,
              granularity=None, smooth_k=None, check_finite=False):
    """Scaled-dot-product attention softmax(sm_scale * q k^T) v, like
    torch.nn.functional.scaled_dot_product_attention.

    q, k, v: torch tensors (CUDA: fp16/bf16 on the CUDA backend; CPU: the CPU
        backend) or numpy arrays (CPU backend), all of one kind and device.
        layout "HND": [B, H, N, D]; "NHD": [B, N, H, D] (SageAttention's
        tensor_layout). Any strides with the head dim contiguous. K and V may
        have fewer heads than Q (GQA/MQA: Hq a multiple of Hkv).
    is_causal: a causal mask aligned bottom-right (query i sees key j iff
        j <= i + Nk - Nq, as FlashAttention >= 2.1; torch's SDPA aligns
        top-left, which differs only when Nq != Nk). Rows that see no key
        give 0 and LSE -inf.
    sm_scale: None for 1/sqrt(D).
    precision: "auto", "exact", "int8_fp16", "int8_fp8", "int8_fp8_f16acc"
        (a mode the backend cannot run raises UnsupportedError; none is
        substituted). attention_plan() tells which mode "auto" chose.
    granularity: None, "per_block", "per_warp", "per_thread" (quantized modes).
    smooth_k: None (the default, on), True or False (quantized modes).
    check_finite: False (default, like SDPA): no NaN/Inf scan, so the call is
        asynchronous and CUDA-graph capturable, and non-finite inputs give
        unspecified outputs. True: the library's scan, which raises
        NonfiniteInputError and, on GPUs, waits for the scan's result.
    return_lse: also return the log-sum-exp (natural log) of each row,
        float32 [B, H, N] whatever the layout.

    Returns O (q's shape, dtype and layout, contiguous), or (O, LSE).
    Raises a qattn.QattnError subclass carrying the library's message.
    """
    return _Call(q, k, v, is_causal, sm_scale, precision, layout, return_lse, granularity, smooth_k,
                 check_finite).run()


def attention_plan(q, k, v, is_causal=False, sm_scale=None, precision="auto", layout="HND", return_lse=False,
                   granularity=None, smooth_k=None, check_finite=False):
    """The (cached) qattn.Plan that attention() with these arguments runs:
    plan.info.precision is the mode chosen, plan.describe() says why."""
    return _Call(q, k, v, is_causal, sm_scale, precision, layout, return_lse, granularity, smooth_k,
                 check_finite).plan
