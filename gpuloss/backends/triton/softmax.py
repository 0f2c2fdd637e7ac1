"""softmax / log_softmax forward and backward launchers.

The looped design reads a row twice (statistics, then the output) in blocks;
the on-chip designs ("onchip", and "packed", sized so that 2-byte rows do not
spill) keep the row (or their share of a split row) in registers and read it
once.  Backward reads y and dy (once on chip) and writes dx.
"""
from __future__ import annotations

from typing import Any

from ...ops import SoftmaxOptions
from . import common as CM
from .config import packed_upcast


def softmax_forward(be, x: Any, opts: SoftmaxOptions) -> Any:
    import torch
    from gpuloss.kernels.triton import softmax as K
    x = CM.rows(x)
    R, C = x.shape
    y = torch.empty((R, C), dtype=x.dtype, device=x.device)
    if R == 0 or C == 0:
        return y
    _, acc = CM.acc(torch, x.dtype)
    cfg = be.config("row_fused", x, kernel="softmax")
    if cfg.variant in ("onchip", "packed"):
        scratch, counter = CM.split_workspace(torch, R, cfg, x)
        K.softmax_fwd_onchip_kernel[(R * cfg.split,)](
            x, CM.row_stride(x), y, C, scratch, counter, C,
            CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, LOG=opts.log, ACC=acc,
            PACKED=packed_upcast("softmax", cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    else:
        K.softmax_fwd_twopass_kernel[(R,)](
            x, CM.row_stride(x), y, C, C,
            BLOCK=cfg.block, LOG=opts.log, ACC=acc, REVERSE=cfg.reverse,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def softmax_backward(be, y: Any, dy: Any, opts: SoftmaxOptions) -> Any:
    import torch
    from gpuloss.kernels.triton import softmax as K
    y, dy = CM.rows(y), CM.rows(dy)
    R, C = y.shape
    dx = torch.empty((R, C), dtype=y.dtype, device=y.device)
    if R == 0 or C == 0:
        return dx
    _, acc = CM.acc(torch, y.dtype)
    cfg = be.config("row_fused", y, kernel="softmax_backward")
    if cfg.variant in ("onchip", "packed"):
        scratch, counter = CM.split_workspace(torch, R, cfg, y)
        K.softmax_bwd_onchip_kernel[(R * cfg.split,)](
            y, CM.row_stride(y), dy, CM.row_stride(dy), dx, C, scratch, counter, C,
            CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, LOG=opts.log, ACC=acc,
            PACKED=packed_upcast("softmax_backward", cfg),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
        return dx
    K.softmax_bwd_kernel[(R,)](
        y, CM.row_stride(y), dy, CM.row_stride(dy), dx, C, C,
        BLOCK=cfg.block, SINGLE_BLOCK=cfg.block >= C, LOG=opts.log, ACC=acc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx
