"""Running one op on one backend: the single place where the caller's arrays
become the backend's native arrays and back.

:func:`run` converts every array once (zero-copy where the backend can),
calls the backend's launcher for the op with the options record unchanged,
and converts the results back.  The public functions call it for NumPy and
CuPy arrays; the torch custom operators (:mod:`gpuloss.torch_ops`) call it
from their implementations.  Nothing here validates or chooses: that happened
before, once.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator, Optional, Sequence

from .backends.base import Backend, LossResult
from .ops import OPS, Want

__all__ = ["run"]


def run(be: Backend, op: str, arrays: Sequence[Optional[Any]], opts: Any, want: Want, kind: str) -> Any:
    """Op ``op`` of backend ``be`` on ``arrays`` (of the caller's ``kind``,
    in the order of ``OpSpec.arrays``).  Returns the launcher's result with
    its arrays converted back to ``kind``: a :class:`LossResult` for losses,
    one array for the softmax ops."""
    spec = OPS[op]
    first = next(a for a in arrays if a is not None)
    if spec.composite:  # a loop around launchers, in the caller's array library
        modname, _, fname = spec.composite.partition(":")
        with _native_context(be, kind, first):
            return getattr(importlib.import_module(modname), fname)(be, kind, arrays, opts, want)
    with _native_context(be, kind, first):
        native = [None if a is None else be.to_native(_detached(a, kind), kind) for a in arrays]
        launcher = getattr(be, op)
        res = launcher(*native, opts, want) if spec.want is not None else launcher(*native, opts)
        back = lambda a: None if a is None else be.from_native(a, kind)  # noqa: E731
        if isinstance(res, LossResult):
            return LossResult(*(back(a) for a in res))
        return back(res)


def _detached(a: Any, kind: str) -> Any:
    """torch tensors below autograd: a launcher converting with ``.numpy()``
    must not see ``requires_grad``.  ``detach()`` shares storage and version
    counter, so an in-place write still lands in the caller's tensor."""
    return a.detach() if kind == "torch" else a


def _native_context(be: Backend, kind: str, like: Any):
    if kind == "torch" and (be.native != "cupy" or like.device.type != "cuda"):
        return _TorchNative(like)  # the common case, without an ExitStack and a generator (~12 us a call)
    stack = contextlib.ExitStack()
    stack.enter_context(on_device(kind, like, torch_too=be.native == "torch"))
    if kind != "torch":
        return stack
    import torch
    stack.enter_context(torch.no_grad())
    stack.enter_context(_torch_stream(be, like))
    return stack


class _TorchNative:
    """For torch tensors on a backend that launches on torch's own stream:
    the tensors' GPU as the current device (:func:`on_device`) and grad mode
    off, restored on exit."""

    __slots__ = ("like", "prev_device", "prev_grad")

    def __init__(self, like: Any) -> None:
        self.like = like

    def __enter__(self) -> "_TorchNative":
        import torch
        self.prev_grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        dev = self.like.device
        self.prev_device = torch.cuda._exchange_device(dev.index) if dev.type == "cuda" else None
        return self

    def __exit__(self, *exc) -> None:
        import torch
        if self.prev_device is not None:
            torch.cuda._maybe_exchange_device(self.prev_device)
        torch.set_grad_enabled(self.prev_grad)


def on_device(kind: str, like: Any, torch_too: bool = False):
    """The arrays' GPU as the current device while the op runs.

    Triton launches on torch's current device and stream, CuPy on its own
    current device: with arrays on another GPU than the current one (a model
    split over GPUs, e.g. transformers' ``device_map="auto"``, whose last
    layers live on the last GPU), a kernel would run on the wrong GPU, reading
    memory it cannot address (an illegal address kills the CUDA context) or,
    with peer access, unordered with the work of the arrays' own stream.
    ``torch_too``: CuPy arrays that a backend runs through torch (Triton) make
    that GPU torch's current device as well."""
    if kind == "torch":
        if like.device.type != "cuda":
            return contextlib.nullcontext()
        import torch
        return torch.cuda.device(like.device)
    if kind == "cupy":
        stack = contextlib.ExitStack()
        stack.enter_context(like.device)  # cupy.cuda.Device
        if torch_too:
            import torch
            stack.enter_context(torch.cuda.device(like.device.id))
        return stack
    return contextlib.nullcontext()


@contextlib.contextmanager
def _torch_stream(be: Backend, like: Any) -> Iterator[None]:
    """Run a CuPy backend on torch's current device and stream.

    torch orders work on its current stream (a side stream while a CUDA graph
    is captured); CuPy launches on its own current stream, by default the
    legacy default stream, which would be outside the capture and unordered
    with torch's work.  The DLPack conversions too: CuPy orders a conversion
    on its current stream.  Triton launches on torch's stream by itself.
    CuPy's allocations go through torch's caching allocator for the same
    reasons."""
    if be.native != "cupy" or like.device.type != "cuda":
        yield
        return
    import cupy
    import torch
    dev = like.device

    def torch_alloc(size: int):
        # CuPy's buffers from torch's caching allocator: legal inside CUDA-graph
        # capture (torch gives captured allocations a private pool; cudaMalloc
        # from CuPy's own pool is not), and ordered on torch's stream.  The
        # tensor owns the bytes; UnownedMemory keeps it alive.
        buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=dev)
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(buf.data_ptr(), size, buf, dev.index), 0)

    with cupy.cuda.Device(dev.index), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream), \
            cupy.cuda.using_allocator(torch_alloc):
        yield
