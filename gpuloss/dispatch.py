"""The backend registry and the rules that pick a backend for a call.

Automatic choice, by where the data lives:

==========================  ======================================
arrays                      backend (first available)
==========================  ======================================
NumPy, CPU torch tensors    numpy
CUDA torch tensors          triton, then cupy (through DLPack)
CuPy arrays                 cupy, then triton (through DLPack)
==========================  ======================================

For CUDA arrays the design table (:mod:`gpuloss.tuning`) may put first the
backend a GPU run verified fastest for the call's (architecture, op, dtype,
row length).

Overrides, strongest first: ``backend=`` on a call, the :func:`use_backend`
context manager, the ``GPULOSS_BACKEND`` environment variable.  A backend asked
for explicitly that cannot run, or cannot take the arrays given, raises
:class:`BackendUnavailableError` saying what is missing; the automatic choice
falls through to the next candidate silently.

Backends are imported lazily, the first time one is needed: ``import gpuloss``
never imports torch, triton or cupy and never touches a GPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import threading
from typing import Dict, Iterator, List, Optional, Tuple

from .backends.base import Backend
from .errors import ArgumentTypeError, ArgumentValueError

#: name -> "module:Class" of the implementation (imported on first use)
_REGISTRY: Dict[str, str] = {
    "numpy": "gpuloss.backends.numpy:NumpyBackend",
    "triton": "gpuloss.backends.triton:TritonBackend",
    "cupy": "gpuloss.backends.cupy:CupyBackend",
}

#: automatic preference per (array kind, device type)
_PREFERENCE = {
    ("numpy", "cpu"): ("numpy",),
    ("torch", "cpu"): ("numpy",),
    ("torch", "cuda"): ("triton", "cupy"),
    ("cupy", "cuda"): ("cupy", "triton"),
}

_instances: Dict[str, Backend] = {}
_status: Dict[str, Tuple[bool, str]] = {}
_lock = threading.Lock()
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("gpuloss_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here or cannot take these arrays."""


def register(name: str, target: str) -> None:
    """Register a backend implementation as ``"module:Class"`` (for plug-ins)."""
    if not isinstance(name, str) or not name:
        raise ArgumentTypeError(f"register: the backend name must be a non-empty str, got {name!r}")
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ArgumentValueError(f"register: the target must be 'module:Class', got {target!r}")
    with _lock:
        _REGISTRY[name] = target
        _instances.pop(name, None)
        _status.pop(name, None)


def registered() -> List[str]:
    return list(_REGISTRY)


def _load(name: str) -> Tuple[Optional[Backend], Tuple[bool, str]]:
    with _lock:
        if name in _status:
            return _instances.get(name), _status[name]
        if name not in _REGISTRY:
            raise ArgumentValueError(f"unknown backend {name!r}; registered: {', '.join(_REGISTRY)}")
        modname, _, clsname = _REGISTRY[name].partition(":")
        inst: Optional[Backend] = None
        try:
            mod = importlib.import_module(modname)
            inst = getattr(mod, clsname)()
            status = inst.probe()
        except ImportError as e:
            status = (False, f"cannot import: {e}")
        except Exception as e:  # a broken install must not break the other backends
            status = (False, f"{type(e).__name__}: {e}")
        if status[0] and inst is not None:
            _instances[name] = inst
        _status[name] = status
        return _instances.get(name), status


def get_backend(name: str) -> Backend:
    """The backend instance called ``name``; raises if it cannot run here."""
    inst, (ok, why) = _load(name)
    if not ok or inst is None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {why} (found at its first use in this "
                                      f"process, for the whole process; TRITON_INTERPRET=1 must be set before the "
                                      f"process imports triton)")
    return inst


def backend_status() -> Dict[str, Tuple[bool, str]]:
    """Every registered backend: (available, reason).  Probes each one."""
    return {name: _load(name)[1] for name in _REGISTRY}


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Use backend ``name`` for every gpuloss call in this block (``None``
    restores automatic choice).  Thread- and task-local."""
    if name is not None and name not in _REGISTRY:
        raise ArgumentValueError(f"unknown backend {name!r}; registered: {', '.join(_REGISTRY)}")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def _requested(explicit: Optional[str]) -> Tuple[Optional[str], str]:
    if explicit is not None:
        return explicit, "backend= argument"
    ctx = _override.get()
    if ctx is not None:
        return ctx, "use_backend()"
    env = os.environ.get("GPULOSS_BACKEND", "").strip()
    if env and env != "auto":
        return env, "GPULOSS_BACKEND"
    return None, ""


#: the ops whose automatic backend the design table may choose, by table kernel name
_TABLE_KERNELS = {"cross_entropy": "cross_entropy", "softmax_forward": "softmax",
                  "softmax_backward": "softmax_backward"}


def _auto_order(kind: str, device: str, op: Optional[str], dtype: Optional[str], n_cols: Optional[int]):
    """The automatic candidates, the design table's verified backend first
    for this (architecture, op, dtype, row length) where it names one."""
    order = _PREFERENCE.get((kind, device.split(":")[0]), ())
    if not device.startswith("cuda") or op not in _TABLE_KERNELS or dtype is None or n_cols is None:
        return order
    from . import tuning
    pick = tuning.lookup(tuning.device_capability(device), _TABLE_KERNELS[op], dtype, n_cols).backend
    return (pick,) + tuple(c for c in order if c != pick) if pick in order else order


def select(kind: str, device: str, backend: Optional[str] = None, *, op: Optional[str] = None,
           dtype: Optional[str] = None, n_cols: Optional[int] = None) -> Backend:
    """The backend for arrays of ``kind`` on ``device``.  ``op``, ``dtype``
    and ``n_cols`` (the call's rows) let the design table
    (:mod:`gpuloss.tuning`) put the backend it verified fastest first in the
    automatic choice; explicit requests always win."""
    name, source = _requested(backend)
    if name is not None:
        if name not in _REGISTRY:
            raise ArgumentValueError(f"unknown backend {name!r} (from {source}); registered: {', '.join(_REGISTRY)}")
        inst = get_backend(name)
        if not inst.accepts(kind, device):
            raise BackendUnavailableError(
                f"backend {name!r} (from {source}) cannot take {kind} arrays on {device}")
        return inst
    tried = _auto_order(kind, device, op, dtype, n_cols)
    for cand in tried:
        inst, (ok, _) = _load(cand)
        if ok and inst is not None and inst.accepts(kind, device):
            return inst
    if not tried:
        raise BackendUnavailableError(f"no backend serves {kind} arrays on {device}")
    reasons = "; ".join(f"{c}: {_load(c)[1][1]}" for c in tried)
    raise BackendUnavailableError(f"no backend available for {kind} arrays on {device} ({reasons})")


def select_name(kind: str, device: str, backend: Optional[str] = None, *, op: Optional[str] = None,
                dtype: Optional[str] = None, n_cols: Optional[int] = None) -> str:
    """``select(kind, device, backend, op=..., dtype=..., n_cols=...).name``.

    ``torch.compile`` evaluates this once while tracing and keeps the result
    as a constant instead of tracing into it: the choice is host logic (a
    ContextVar, a lock, the environment) that dynamo cannot trace.  The
    attribute below is what ``torch.compiler.assume_constant_result`` sets;
    it is set by hand so that this module need not import torch."""
    return select(kind, device, backend, op=op, dtype=dtype, n_cols=n_cols).name


select_name._dynamo_marked_constant = True  # type: ignore[attr-defined]
