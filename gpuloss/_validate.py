"""Argument checks, run before any work.

Every failure is a ``TypeError`` (wrong kind or dtype) or ``ValueError``
(wrong shape or value) whose message names the argument and the problem.
Checks that need device values (class-index targets inside ``[0, C)``) follow
:mod:`gpuloss.config`'s ``value_checks`` mode so the hot path of a GPU
training step need not synchronise.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from . import config
from ._arrays import dtype_name

_REDUCTIONS = ("none", "mean", "sum")
_KL_REDUCTIONS = ("none", "mean", "sum", "batchmean")


def is_floating(a: Any, kind: str) -> bool:
    if kind == "torch":
        return a.dtype.is_floating_point
    return np.issubdtype(a.dtype, np.floating) or dtype_name(a, kind) == "bfloat16"


def is_integer(a: Any, kind: str) -> bool:
    if kind == "torch":
        import torch
        return not a.dtype.is_floating_point and not a.dtype.is_complex and a.dtype != torch.bool
    return np.issubdtype(a.dtype, np.integer)


def check_floating(name: str, a: Any, kind: str) -> None:
    if not is_floating(a, kind):
        raise TypeError(f"{name} must be a floating-point array (float16, bfloat16, float32 or float64), "
                        f"got {dtype_name(a, kind)}")


def check_reduction(reduction: str, kl: bool = False) -> None:
    allowed = _KL_REDUCTIONS if kl else _REDUCTIONS
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def check_dim(name: str, dim: Any, ndim: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise ValueError(f"{name}={dim} is out of range for an array with {ndim} dimension(s)")


def check_same_shape(n1: str, a: Any, n2: str, b: Any) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{n1} and {n2} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_bool(name: str, v: Any) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    return float(v)


def check_finite_number(name: str, v: Any) -> None:
    if not math.isfinite(_number(name, v)):
        raise ValueError(f"{name} must be finite, got {v}")


def check_range(name: str, v: Any, lo: float, hi: float) -> None:
    f = _number(name, v)
    if not lo <= f <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")


def check_positive(name: str, v: Any) -> None:
    f = _number(name, v)
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"{name} must be > 0 and finite, got {v}")


def check_positive_or_none(name: str, v: Any) -> None:
    if v is not None:
        check_positive(name, v)


# ---------------------------------------------------------------- targets

def _ce_target_shape(input: Any) -> tuple:
    if input.ndim == 1:
        return ()
    return (input.shape[0],) + tuple(input.shape[2:])


def check_ce_target(name: str, target: Any, kind: str, input: Any) -> bool:
    """True for probability targets, False for class indices; raises otherwise."""
    if is_floating(target, kind):
        if tuple(target.shape) != tuple(input.shape):
            raise TypeError(
                f"{name} is floating-point ({dtype_name(target, kind)}) with shape {tuple(target.shape)}: "
                f"class-index targets must be integers of shape {_ce_target_shape(input)}, probability "
                f"targets must have input's shape {tuple(input.shape)}")
        return True
    check_index_target(name, target, kind, input)
    return False


def check_index_target(name: str, target: Any, kind: str, input: Any) -> None:
    if not is_integer(target, kind):
        raise TypeError(f"{name} must hold integer class indices, got {dtype_name(target, kind)}")
    want = _ce_target_shape(input)
    if tuple(target.shape) != want:
        raise ValueError(f"{name} has shape {tuple(target.shape)} but input of shape {tuple(input.shape)} "
                         f"needs class-index targets of shape {want}")


def as_index_target(target: Any, kind: str) -> Any:
    """int32/int64 pass through; other integer dtypes become int64."""
    name = dtype_name(target, kind)
    if name in ("int32", "int64"):
        return target
    if kind == "torch":
        import torch
        return target.to(torch.int64)
    return target.astype("int64")


def _device_values_allowed(target: Any, kind: str) -> bool:
    """Whether reading ``target``'s values is allowed now (gpuloss.config)."""
    if kind == "numpy":
        return True
    if kind == "torch":
        import torch
        if torch.compiler.is_compiling():
            return False  # a data-dependent check would break the graph
        if target.device.type == "cpu":
            return True
        return config.value_checks() == "always" and not torch.cuda.is_current_stream_capturing()
    if kind == "cupy":
        cupy = sys.modules["cupy"]
        return config.value_checks() == "always" and not cupy.cuda.get_current_stream().is_capturing()
    return True


def check_class_targets(name: str, target: Any, kind: str, C: int, ignore_index: int) -> None:
    """Every class index in [0, C) or equal to ignore_index (value check)."""
    n = target.numel() if kind == "torch" else target.size
    if n == 0:
        return
    if not _device_values_allowed(target, kind):
        return
    bad = ((target < 0) | (target >= C)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad].reshape(-1)[0]
        first = int(first.item()) if hasattr(first, "item") else int(first)
        raise ValueError(f"{name} contains class index {first}, outside [0, {C}) and not "
                         f"ignore_index={ignore_index}")


# ---------------------------------------------------------------- weights

def check_weight(name: str, weight: Any, kind: str, C: int) -> None:
    if weight is None:
        return
    check_floating(name, weight, kind)
    if weight.ndim != 1 or weight.shape[0] != C:
        raise ValueError(f"{name} must be a 1-D array of length C={C} (one weight per class), "
                         f"got shape {tuple(weight.shape)}")


def _compute_dtype(input: Any, kind: str):
    return "float64" if dtype_name(input, kind) == "float64" else "float32"


def as_float_vector(w: Any, kind: str, input: Any) -> Any:
    """A contiguous float32 (float64 for float64 input) copy or view of ``w``."""
    dt = _compute_dtype(input, kind)
    if kind == "torch":
        import torch
        return w.detach().to(getattr(torch, dt)).contiguous()
    xp = np if kind == "numpy" else sys.modules["cupy"]
    return xp.ascontiguousarray(w, dtype=dt)


def check_broadcastable(name: str, w: Any, kind: str, input: Any) -> None:
    if w is None:
        return
    check_floating(name, w, kind)
    try:
        out = np.broadcast_shapes(tuple(w.shape), tuple(input.shape))
    except ValueError:
        out = None
    if out != tuple(input.shape):
        raise ValueError(f"{name} of shape {tuple(w.shape)} does not broadcast to input's shape "
                         f"{tuple(input.shape)}")


def as_row_broadcast(w: Any, kind: str, input: Any, rows: Any) -> Any:
    """A per-class (C,) vector when ``w`` only varies along the last
    dimension, else ``w`` broadcast to the (R, C) rows, materialised."""
    C = rows.shape[-1]
    shape = tuple(w.shape)
    dt = _compute_dtype(input, kind)
    lead_ones = all(s == 1 for s in shape[:-1])
    if kind == "torch":
        import torch
        w = w.detach().to(getattr(torch, dt))
        if lead_ones:
            return w.reshape(-1).expand(C).contiguous() if (len(shape) == 0 or shape[-1] == 1) \
                else w.reshape(C).contiguous()
        return w.expand(tuple(input.shape)).reshape(rows.shape).contiguous()
    xp = np if kind == "numpy" else sys.modules["cupy"]
    w = xp.asarray(w, dtype=dt)
    if lead_ones:
        v = w.reshape(-1)
        return xp.ascontiguousarray(xp.broadcast_to(v, (C,)))
    return xp.ascontiguousarray(xp.broadcast_to(w, tuple(input.shape)).reshape(rows.shape))


# ---------------------------------------------------------------- in-place

def check_inplace_ok(name: str, input: Any, rows: Any, kind: str, return_grad: Any) -> None:
    """``inplace_backward`` overwrites the logits with their gradient."""
    if kind == "torch" and return_grad and input.requires_grad:
        raise ValueError(f"inplace_backward=True with return_grad would overwrite {name}, which requires "
                         f"grad; call it on a tensor that does not require grad, or use autograd "
                         f"(drop return_grad)")
