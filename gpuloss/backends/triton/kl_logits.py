"""Row-wise KL divergence from logits (distillation) launcher."""
from __future__ import annotations

from typing import Any

from ...ops import KlDivLogitsOptions, Want
from ..base import LossResult
from . import common as CM


def kl_div_logits(be, x: Any, target: Any, opts: KlDivLogitsOptions, want: Want) -> LossResult:
    import torch
    from gpuloss.kernels.triton import kl_div as K
    x, target = CM.rows(x), CM.rows(target)
    R, C = x.shape
    acc_t, acc = CM.acc(torch, x.dtype)
    loss_rows = torch.empty(R, dtype=acc_t, device=x.device)
    grad = torch.empty((R, C), dtype=x.dtype, device=x.device) if want.grad else None
    divisor = {"none": 1, "sum": 1, "batchmean": R, "mean": R * C}[opts.reduction]
    if R > 0 and C > 0:
        cfg = be.config("row", x)
        K.kl_div_logits_kernel[(R,)](
            x, CM.row_stride(x), target, CM.row_stride(target),
            grad if grad is not None else loss_rows, C, loss_rows,
            C, CM.scalar(1.0 / float(opts.temperature), x), CM.scalar(1.0 / max(divisor, 1), x),
            BLOCK=cfg.block, TARGET_IS_LOGITS=bool(opts.target_is_logits), WANT_GRAD=want.grad,
            ACC=acc, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    red = "mean" if opts.reduction == "batchmean" else opts.reduction
    return LossResult(CM.reduce_rows(loss_rows, red, float(divisor)), grad)
