"""Element-wise loss launchers: kl_div, BCE (with logits and on
probabilities), MSE.  One tiled launch each: read input, target (and weights)
once, write each requested output once; "sum"/"mean" add per-tile partials on
the device."""
from __future__ import annotations

from typing import Any, Optional

from ...ops import KlDivOptions, ReductionOptions, Want
from ..base import LossResult
from . import common as CM
from .config import elementwise_tile, next_pow2


def _drive(be, kernel, x: Any, target: Any, extra: tuple, flags: dict, reduction: str, want: Want,
           grad_scale: float = 1.0) -> LossResult:
    """Shared launcher: tiles, outputs, and the reduction of tile partials."""
    import torch
    R, C = x.shape
    acc_t, acc = CM.acc(torch, x.dtype)
    n = R * C
    divisor = {"none": 1, "sum": 1, "mean": n, "batchmean": R}[reduction]
    reduce = reduction != "none"
    cfg = be.config("elementwise", x)
    block_c = cfg.block
    block_r = max(1, min(next_pow2(max(R, 1)), elementwise_tile(x.element_size()) // block_c))
    n_tiles = -(-R // block_r) * -(-C // block_c)
    loss_full = None if reduce else torch.empty((R, C), dtype=acc_t, device=x.device)
    partials = torch.empty(n_tiles if reduce else 1, dtype=acc_t, device=x.device)
    grad = torch.empty((R, C), dtype=x.dtype, device=x.device) if want.grad else None
    grad_t = torch.empty((R, C), dtype=target.dtype, device=x.device) if want.grad_target else None
    if n > 0:
        dummy = partials
        kernel[(n_tiles,)](
            x, CM.row_stride(x), target, CM.row_stride(target), *extra,
            loss_full if loss_full is not None else dummy, C if loss_full is not None else 0,
            partials,
            grad if grad is not None else dummy, C,
            grad_t if grad_t is not None else dummy, C,
            R, C, CM.scalar(grad_scale / max(divisor, 1), x),
            BLOCK_R=block_r, BLOCK_C=block_c, REDUCE=reduce, **flags,
            WANT_GRAD=want.grad, WANT_GRAD_TARGET=want.grad_target, ACC=acc,
            num_warps=cfg.num_warps)
    if not reduce:
        loss = loss_full
    else:
        total = partials.sum() if n > 0 else torch.zeros((), dtype=acc_t, device=x.device)
        loss = total if reduction == "sum" else total / float(divisor)
    return LossResult(loss, grad, grad_t)


def kl_div(be, input: Any, target: Any, opts: KlDivOptions, want: Want) -> LossResult:
    from gpuloss.kernels.triton import elementwise as K
    x, t = CM.rows(input), CM.rows(target)
    return _drive(be, K.kl_div_kernel, x, t, (), dict(LOG_TARGET=bool(opts.log_target)), opts.reduction, want)


def bce_with_logits(be, x: Any, target: Any, weight: Optional[Any], pos_weight: Optional[Any],
                    opts: ReductionOptions, want: Want) -> LossResult:
    from gpuloss.kernels.triton import elementwise as K
    x, t = CM.rows(x), CM.rows(target)
    R, C = x.shape
    w, ws = CM.operand(weight, R, C) if weight is not None else (x, 0)
    pw, pws = CM.operand(pos_weight, R, C) if pos_weight is not None else (x, 0)
    return _drive(be, K.bce_with_logits_kernel, x, t, (w, ws, pw, pws),
                  dict(HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None), opts.reduction, want,
                  opts.grad_scale)


def bce(be, p: Any, target: Any, weight: Optional[Any], opts: ReductionOptions, want: Want) -> LossResult:
    from gpuloss.kernels.triton import elementwise as K
    x, t = CM.rows(p), CM.rows(target)
    R, C = x.shape
    w, ws = CM.operand(weight, R, C) if weight is not None else (x, 0)
    return _drive(be, K.bce_kernel, x, t, (w, ws), dict(HAS_WEIGHT=weight is not None), opts.reduction, want,
                  opts.grad_scale)


def mse(be, x: Any, target: Any, opts: ReductionOptions, want: Want) -> LossResult:
    from gpuloss.kernels.triton import elementwise as K
    x, t = CM.rows(x), CM.rows(target)
    return _drive(be, K.mse_kernel, x, t, (), {}, opts.reduction, want, opts.grad_scale)
