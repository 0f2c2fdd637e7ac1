"""Which array library an argument comes from, and where it lives.

No array library other than NumPy is imported here: torch and CuPy arrays are
recognised only once their library is loaded (see :func:`kind_of`), so
``import gpuloss`` stays light and never touches a GPU.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Optional, Tuple

import numpy as np

from .errors import ArgumentTypeError, ArgumentValueError

KINDS = ("numpy", "torch", "cupy")


def kind_of(a: Any) -> Optional[str]:
    """"numpy", "torch", "cupy", or None for anything that is not an array.

    torch and CuPy are never imported for this: an object can only be an
    array of a library that is already imported.  A torch tensor is
    recognised by ``__torch_function__`` first, so that torch.compile,
    which traces this, never has to trace ``sys.modules`` (a dict that an
    import elsewhere may change while dynamo reads it)."""
    if isinstance(a, np.ndarray):
        return "numpy"
    if hasattr(a, "__torch_function__"):
        import torch  # imported already: the object's class comes from it or uses its protocol
        if isinstance(a, torch.Tensor):
            return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return "cupy"
    return None


def device_of(a: Any, kind: str) -> str:
    """"cpu" or "cuda:<index>"."""
    if kind == "numpy":
        return "cpu"
    if kind == "torch":
        d = a.device
        if d.type == "cpu":
            return "cpu"
        if d.type == "meta":
            return "meta"
        return f"{d.type}:{d.index if d.index is not None else 0}"
    if kind == "cupy":
        return f"cuda:{a.device.id}"
    raise ArgumentTypeError(f"not an array: {type(a).__name__}")


def classify(named: Iterable[Tuple[str, Any]], optional: Iterable[str] = ()) -> Tuple[str, str]:
    """Kind and device shared by every array argument.

    ``named`` is (argument name, value) pairs.  ``None`` is allowed only for
    the names in ``optional`` (and is skipped); a required argument that is
    ``None`` or not an array raises ``TypeError`` naming it.  Raises
    ``TypeError`` for mixed kinds and ``ValueError`` for mixed devices, naming
    the arguments.
    """
    optional = set(optional)
    kind = device = None
    first = None
    for name, a in named:
        if a is None:
            if name in optional:
                continue
            raise ArgumentTypeError(f"{name} must be a NumPy array, CuPy array or torch.Tensor, got None")
        k = kind_of(a)
        if k is None:
            if first is None:
                raise ArgumentTypeError(f"{name} must be a NumPy array, CuPy array or torch.Tensor, got "
                                        f"{type(a).__name__}")
            raise ArgumentTypeError(f"{name} must be an array of the same kind as {first} ({kind}), got "
                                    f"{type(a).__name__}")
        if k == "numpy" and type(a) is not np.ndarray:
            _check_ndarray_subclass(name, a)
        if k == "torch" and a.layout != _torch_strided():
            raise ArgumentTypeError(f"{name} is a tensor of layout {a.layout}; gpuloss takes dense (strided) "
                                    f"tensors: pass {name}.to_dense()")
        d = device_of(a, k)
        if first is None:
            first, kind, device = name, k, d
            continue
        if k != kind:
            raise ArgumentTypeError(f"mixed array kinds: {first} is a {kind} array but {name} is a {k} array; "
                                    f"convert them to one kind")
        if d != device:
            raise ArgumentValueError(f"mixed devices: {first} is on {device} but {name} is on {d}")
    if first is None:
        raise ArgumentTypeError("no array argument given")
    return kind, device


def _torch_strided():
    import torch
    return torch.strided


def _check_ndarray_subclass(name: str, a) -> None:
    """NumPy's masked arrays (the kernels would read the masked values as if
    they were data) and matrices (always 2-D: row slices stay 2-D) are
    refused; other ndarray subclasses (memmap, ...) are plain data."""
    if isinstance(a, np.ma.MaskedArray):
        raise ArgumentTypeError(f"{name} is a NumPy masked array, whose mask gpuloss would ignore; pass "
                                f"{name}.filled(value) or select the unmasked elements first")
    if isinstance(a, np.matrix):
        raise ArgumentTypeError(f"{name} is a numpy.matrix; pass np.asarray({name})")


def dtype_name(a: Any, kind: str) -> str:
    """Short dtype name: float16, bfloat16, float32, float64, int32, int64, bool, ..."""
    if kind == "torch":
        return str(a.dtype).replace("torch.", "")
    dt = a.dtype
    # a NumPy array of non-native byte order ('>f4' on this machine) holds the same values:
    # NumPy computes on it as on its native dtype, and so do gpuloss's NumPy kernels
    return str(dt) if dt.isnative else dt.name


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
