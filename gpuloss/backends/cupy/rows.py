"""Row-kernel launchers: softmax / log_softmax forward and backward,
cross-entropy (loss and gradient in one launch), NLL, KL from logits.

Each launch plans its design (looped, on-chip in shared memory, or a
thread-block cluster per row on sm_90) with :func:`.plan.plan_rows`.
"""
from __future__ import annotations

from typing import Any, Optional

from ...ops import CrossEntropyOptions, KlDivLogitsOptions, NllOptions, SoftmaxOptions, Want
from ..base import LossResult
from . import build as B
from . import common as CM
from .plan import plan_rows


def softmax_forward(x: Any, opts: SoftmaxOptions) -> Any:
    import cupy
    x = CM.unit_rows(x)
    dt = CM.storage_dtype(x)
    R, C = x.shape
    y = cupy.empty((R, C), dtype=x.dtype)
    i64 = CM.np_().int64
    CM.row_launch("softmax_fwd", dt, f"gpuloss_softmax_fwd<{B.DTYPES[dt][0]}, {{vec}}, {{k}}, {{on}}>", R, C,
                  (x, y, i64(CM.row_stride(x)), i64(C), i64(R), i64(C), CM.np_().int32(1 if opts.log else 0)),
                  (x, y))
    return y


def softmax_backward(y: Any, dy: Any, opts: SoftmaxOptions) -> Any:
    import cupy
    y, dy = CM.unit_rows(y), CM.unit_rows(dy)
    dt = CM.storage_dtype(y)
    dy = CM.to_storage(dy, dt)  # bf16-aware (a plain astype reads bf16 bits as integers)
    R, C = y.shape
    dx = cupy.empty((R, C), dtype=y.dtype)
    i64 = CM.np_().int64
    CM.row_launch("softmax_bwd", dt, f"gpuloss_softmax_bwd<{B.DTYPES[dt][0]}, {{vec}}, {{k}}, {{on}}>", R, C,
                  (y, dy, dx, i64(CM.row_stride(y)), i64(CM.row_stride(dy)), i64(C), i64(R), i64(C),
                   CM.np_().int32(1 if opts.log else 0)), (y, dy, dx))
    return dx


def cross_entropy(x: Any, target: Any, weight: Optional[Any], opts: CrossEntropyOptions, want: Want) -> LossResult:
    import cupy
    x = CM.unit_rows(x)
    dt = CM.storage_dtype(x)
    R, C = x.shape
    acc = CM.acc(dt)
    prob = target.ndim == 2
    w = CM.weight_vector(weight, dt)
    div = None
    if prob:
        target = CM.unit_rows(target)
        target = CM.to_storage(target, dt)  # bf16-aware
        if opts.reduction == "mean":
            div = cupy.full((1,), float(R), dtype=acc)
    else:
        target = CM.class_targets(target)
        if opts.reduction == "mean":
            div = CM.mean_divisor("cross_entropy", target, w, R, C, opts.ignore_index, dt)
    loss_rows = cupy.empty((R,), dtype=acc)
    lse = cupy.empty((R,), dtype=cupy.float32)
    grad = (x if opts.grad_inplace else cupy.empty((R, C), dtype=x.dtype)) if want.grad else None
    gt = cupy.empty((R, C), dtype=x.dtype) if (prob and want.grad_target) else None
    ti = B.INDEX_CTYPES["int64"] if prob else B.INDEX_CTYPES[CM.index_dtype(target)]
    i64 = CM.np_().int64
    args = (x, CM.null() if prob else target, target if prob else CM.null(), CM.ptr(w), CM.ptr(div),
            CM.ptr(grad), loss_rows, lse, CM.ptr(gt),
            i64(CM.row_stride(x)), i64(CM.row_stride(target) if prob else 0),
            i64(CM.row_stride(grad) if grad is not None else 0), i64(R), i64(C), i64(opts.ignore_index),
            acc(opts.label_smoothing), acc(opts.z_loss), acc(opts.softcap if opts.softcap else 0.0))
    CM.row_launch("cross_entropy", dt,
                  f"gpuloss_cross_entropy<{B.DTYPES[dt][0]}, {ti}, {'true' if prob else 'false'}, {{vec}}, {{k}}, {{on}}>",
                  R, C, args, (x, grad, target if prob else None))
    loss = CM.reduce_rows(loss_rows, opts.reduction, None if div is None else div[0])
    return LossResult(loss, grad, gt, lse)


def nll_loss(logp: Any, target: Any, weight: Optional[Any], opts: NllOptions, want: Want) -> LossResult:
    import cupy
    logp = CM.unit_rows(logp)
    dt = CM.storage_dtype(logp)
    R, C = logp.shape
    w = CM.weight_vector(weight, dt)
    target = CM.class_targets(target)
    div = CM.mean_divisor("nll", target, w, R, C, opts.ignore_index, dt) if opts.reduction == "mean" else None
    loss_rows = cupy.empty((R,), dtype=CM.acc(dt))
    grad = cupy.empty((R, C), dtype=logp.dtype) if want.grad else None
    ti = B.INDEX_CTYPES[CM.index_dtype(target)]
    i64 = CM.np_().int64
    if R:
        plan = plan_rows(R, C, B.DTYPES[dt][1], 1, 0, 0, "looped")
        k = B.kernel("nll", dt, f"gpuloss_nll<{B.DTYPES[dt][0]}, {ti}>")
        k((plan.grid,), (plan.threads,), (logp, target, CM.ptr(w), CM.ptr(div), CM.ptr(grad), loss_rows,
                                         i64(CM.row_stride(logp)), i64(C), i64(R), i64(C), i64(opts.ignore_index)))
    return LossResult(CM.reduce_rows(loss_rows, opts.reduction, None if div is None else div[0]), grad)


def kl_div_logits(x: Any, target: Any, opts: KlDivLogitsOptions, want: Want) -> LossResult:
    import cupy
    x, target = CM.unit_rows(x), CM.unit_rows(target)
    dt, tdt = CM.storage_dtype(x), CM.storage_dtype(target)
    if tdt != dt:
        # a bf16 student and a float32 teacher: both in the promoted dtype (as the other backends compute),
        # the gradient back in the student's (``astype`` read bf16 bits as integers: a garbage teacher)
        wide = CM.promoted_storage(dt, tdt)
        res = kl_div_logits(CM.to_storage(x, wide), CM.to_storage(target, wide), opts, want)
        return res._replace(grad=None if res.grad is None else CM.to_storage(res.grad, dt))
    R, C = x.shape
    acc = CM.acc(dt)
    divisor = {"none": 1.0, "sum": 1.0, "batchmean": float(R), "mean": float(R * C)}[opts.reduction]
    loss_rows = cupy.empty((R,), dtype=acc)
    grad = cupy.empty((R, C), dtype=x.dtype) if want.grad else None
    i64 = CM.np_().int64
    args = (x, target, CM.ptr(grad), loss_rows, i64(CM.row_stride(x)), i64(CM.row_stride(target)),
            i64(C), i64(R), i64(C), acc(1.0 / opts.temperature), acc(1.0 / divisor if divisor else float("nan")))
    logits = "true" if opts.target_is_logits else "false"
    CM.row_launch("kl_div_logits", dt, f"gpuloss_kl_div_logits<{B.DTYPES[dt][0]}, {logits}, {{vec}}, {{k}}, {{on}}>",
                  R, C, args, (x, target, grad))
    if opts.reduction in ("mean", "batchmean"):
        loss = loss_rows.sum() / acc(divisor) if divisor else cupy.full((), float("nan"), dtype=acc)
    else:
        loss = CM.reduce_rows(loss_rows, opts.reduction)
    return LossResult(loss, grad)
