"""Element-wise loss launchers (kl_div, BCE with logits and on probabilities,
MSE): one grid-stride kernel, per-block partial sums reduced on the device."""
from __future__ import annotations

from typing import Any, Optional

from ...ops import KlDivOptions, ReductionOptions, Want
from ..base import LossResult
from . import build as B
from . import common as CM
from .plan import plan_elementwise


def _operand(a, acc):
    """A weight-like operand as (array, mode, row stride): mode 1 a (C,)
    vector, 2 an (R, C) array, 0 none."""
    import cupy
    if a is None:
        return None, 0, 0
    a = cupy.asarray(a, dtype=acc)
    if a.ndim == 1:
        return cupy.ascontiguousarray(a), 1, 0
    a = CM.unit_rows(a)
    return a, 2, CM.row_stride(a)


def _drive(opname, x, t, reduction: str, want: Want, weight=None, pos_weight=None, divisor=None,
           grad_scale: float = 1.0) -> LossResult:
    import cupy
    x, t = CM.unit_rows(x), CM.unit_rows(t)
    dt = CM.storage_dtype(x)
    t = CM.to_storage(t, dt)  # bf16-aware (a plain astype reads bf16 bits as integers)
    R, C = x.shape
    n = R * C
    acc = CM.acc(dt)
    w, wm, ws = _operand(weight, acc)
    pw, pm, ps = _operand(pos_weight, acc)
    if divisor is None:
        divisor = {"none": 1.0, "sum": 1.0, "mean": float(n)}[reduction]
    grid, threads = plan_elementwise(n)
    L = cupy.empty((R, C), dtype=acc) if reduction == "none" else None
    part = cupy.empty((grid,), dtype=acc) if reduction != "none" else None
    gx = cupy.empty((R, C), dtype=x.dtype) if want.grad else None
    gt = cupy.empty((R, C), dtype=x.dtype) if want.grad_target else None
    if n:
        i64, i32 = CM.np_().int64, CM.np_().int32
        k = B.kernel("elementwise", dt, f"gpuloss_elementwise<{B.DTYPES[dt][0]}, {B.EW_OPS[opname]}>")
        k((grid,), (threads,), (x, t, CM.ptr(w), CM.ptr(pw), CM.ptr(gx), CM.ptr(gt), CM.ptr(L), CM.ptr(part),
                                i64(CM.row_stride(x)), i64(CM.row_stride(t)), i64(ws), i64(ps), i64(R), i64(C),
                                i32(wm), i32(pm), acc(grad_scale / divisor) if divisor else acc(float("nan"))))
    if reduction == "none":
        return LossResult(L, gx, gt)
    tot = part.sum() if n else cupy.zeros((), dtype=acc)
    loss = tot if reduction == "sum" else tot / acc(divisor) if divisor else cupy.full((), float("nan"), dtype=acc)
    return LossResult(loss, gx, gt)


def kl_div(input: Any, target: Any, opts: KlDivOptions, want: Want) -> LossResult:
    name = "kl_div_log_target" if opts.log_target else "kl_div"
    if opts.reduction == "batchmean":
        return _drive(name, input, target, "mean", want, divisor=float(input.shape[0]))
    return _drive(name, input, target, opts.reduction, want)


def bce_with_logits(x: Any, target: Any, weight: Optional[Any], pos_weight: Optional[Any], opts: ReductionOptions,
                    want: Want) -> LossResult:
    return _drive("bce_with_logits", x, target, opts.reduction, want, weight=weight, pos_weight=pos_weight,
                  grad_scale=opts.grad_scale)


def bce(p: Any, target: Any, weight: Optional[Any], opts: ReductionOptions, want: Want) -> LossResult:
    return _drive("bce", p, target, opts.reduction, want, weight=weight, grad_scale=opts.grad_scale)


def mse(x: Any, target: Any, opts: ReductionOptions, want: Want) -> LossResult:
    return _drive("mse", x, target, opts.reduction, want, grad_scale=opts.grad_scale)
