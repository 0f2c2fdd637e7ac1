"""Cross-entropy (loss and gradient in one launch) and NLL launchers.

The class-target "mean" divisor sum_i w[t_i] over the valid rows
(:mod:`gpuloss.rules`) is computed by a one-program kernel into a device
scalar that the loss kernel reads: no host synchronisation.
"""
from __future__ import annotations

from typing import Any, Optional

from ...ops import CrossEntropyOptions, NllOptions, Want
from ..base import LossResult
from . import common as CM
from .config import next_pow2, packed_upcast


def mean_divisor(torch, target, weight, ignore_index: int, n_cols: int, acc_t, acc):
    from gpuloss.kernels.triton import cross_entropy as K
    R = target.shape[0]
    div = torch.empty((), dtype=acc_t, device=target.device)
    if R == 0:
        div.zero_()
        return div
    K.ce_mean_divisor_kernel[(1,)](
        target, target.stride(0), weight if weight is not None else div, div,
        R, n_cols, ignore_index,
        BLOCK=min(next_pow2(R), 1024), HAS_WEIGHT=weight is not None, ACC=acc, num_warps=4)
    return div


def _target_rows(target):
    """(target, row stride): probability targets as 2-D rows, class indices 1-D."""
    if target.is_floating_point():
        target = CM.rows(target)
        return target, CM.row_stride(target)
    if target.dim() != 1:
        raise ValueError(f"class-index target must be 1-D, got shape {tuple(target.shape)}")
    return target, target.stride(0)


def cross_entropy(be, x: Any, target: Any, weight: Optional[Any], opts: CrossEntropyOptions,
                  want: Want) -> LossResult:
    import torch
    from gpuloss.kernels.triton import cross_entropy as K
    if opts.grad_inplace and x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError("grad_inplace needs logits with unit column stride")
    x = CM.rows(x)
    R, C = x.shape
    acc_t, acc = CM.acc(torch, x.dtype)
    prob = target.is_floating_point()
    target, t_stride = _target_rows(target)
    if weight is not None:
        weight = weight.contiguous()
    loss_rows = torch.empty(R, dtype=acc_t, device=x.device)
    lse = torch.empty(R, dtype=torch.float32, device=x.device)  # float32 by contract
    grad = None
    if want.grad:
        grad = x if opts.grad_inplace else torch.empty((R, C), dtype=x.dtype, device=x.device)
    grad_t = torch.empty((R, C), dtype=target.dtype, device=x.device) if (want.grad_target and prob) else None
    div_on_device = opts.reduction == "mean" and not prob
    divisor = mean_divisor(torch, target, weight, opts.ignore_index, C, acc_t, acc) if div_on_device \
        else float(R)
    if R > 0 and C > 0:
        _launch_ce(be, K, x, target, t_stride, weight, grad, grad_t, loss_rows, lse,
                   divisor if div_on_device else None, opts, want, prob, acc)
    return LossResult(CM.reduce_rows(loss_rows, opts.reduction, divisor), grad, grad_t, lse)


def _launch_ce(be, K, x, target, t_stride, weight, grad, grad_t, loss_rows, lse, divisor, opts, want,
               prob: bool, acc) -> None:
    import torch
    R, C = x.shape
    grad_scale = 1.0 / R if (opts.reduction == "mean" and prob) else 1.0
    dummy = loss_rows
    g = grad if grad is not None else x
    gt = grad_t if grad_t is not None else dummy
    flags = dict(
        PROB_TARGET=prob, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=float(opts.label_smoothing) != 0.0, HAS_Z_LOSS=float(opts.z_loss) != 0.0,
        HAS_SOFTCAP=opts.softcap is not None, DIV_ON_DEVICE=divisor is not None,
        WANT_GRAD_TARGET=grad_t is not None, ACC=acc)
    head = (x, CM.row_stride(x), target, t_stride, weight if weight is not None else dummy,
            g, CM.row_stride(g), gt, CM.row_stride(gt) if grad_t is not None else C,
            loss_rows, lse, divisor if divisor is not None else dummy)
    sc = CM.scalar
    scalars = (C, int(opts.ignore_index), sc(opts.label_smoothing, x), sc(opts.z_loss, x),
               sc(opts.softcap if opts.softcap is not None else 1.0, x), sc(grad_scale, x))
    heavy = prob or weight is not None or opts.softcap is not None
    cfg = be.config("row_fused", x, kernel="cross_entropy", heavy=heavy)
    if want.grad and cfg.variant in ("onchip", "packed"):
        scratch, counter = CM.split_workspace(torch, R, cfg, x)
        K.cross_entropy_onchip_kernel[(R * cfg.split,)](
            *head, scratch, counter, *scalars,
            CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, **flags,
            PACKED=packed_upcast("cross_entropy", cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
        return
    # loss only reads each logit once in the looped kernel already
    if cfg.variant != "twopass":
        cfg = be.config("row_fused", x, kernel="cross_entropy", variant="twopass")
    K.cross_entropy_twopass_kernel[(R,)](
        *head, *scalars, BLOCK=cfg.block, WANT_GRAD=want.grad, REVERSE=cfg.reverse, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def nll_loss(be, logp: Any, target: Any, weight: Optional[Any], opts: NllOptions, want: Want) -> LossResult:
    import torch
    from gpuloss.kernels.triton import cross_entropy as K
    x = CM.rows(logp)
    R, C = x.shape
    acc_t, acc = CM.acc(torch, x.dtype)
    if weight is not None:
        weight = weight.contiguous()
    loss_rows = torch.empty(R, dtype=acc_t, device=x.device)
    grad = torch.empty((R, C), dtype=x.dtype, device=x.device) if want.grad else None
    div_on_device = opts.reduction == "mean"
    divisor = mean_divisor(torch, target, weight, opts.ignore_index, C, acc_t, acc) if div_on_device else None
    if R > 0 and C > 0:
        cfg = be.config("row", x)
        dummy = loss_rows
        K.nll_loss_kernel[(R,)](
            x, CM.row_stride(x), target, target.stride(0),
            weight if weight is not None else dummy,
            grad if grad is not None else dummy, C, loss_rows,
            divisor if divisor is not None else dummy,
            C, int(opts.ignore_index), 1.0,
            BLOCK=cfg.block, HAS_WEIGHT=weight is not None, DIV_ON_DEVICE=div_on_device,
            WANT_GRAD=want.grad, ACC=acc, num_warps=cfg.num_warps)
    return LossResult(CM.reduce_rows(loss_rows, opts.reduction, divisor), grad)
