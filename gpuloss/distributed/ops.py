"""Vocabulary-parallel cross-entropy from logits: the per-rank forward pass
(statistics, the two all-reduces, the loss and this rank's gradient slice)
and its autograd."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import local as L
from .layout import VocabLayout


def _stats_pass(x2d: Tensor, info: L.RowInfo, smoothing: bool, softcap: Optional[float], step: int,
                lt: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Pass 1, one read of the logits: the slice max and the relative sums
    of every row (the fused kernel when ``lt``, its local targets, is given)."""
    R = x2d.shape[0]
    cdt = L.compute_dtype(x2d.dtype)
    m_r = torch.empty(R, dtype=cdt, device=x2d.device)
    stats = torch.empty((3 if smoothing else 2, R), dtype=cdt, device=x2d.device)
    if lt is not None:
        L.kernel_stats(x2d, lt, softcap, smoothing, m_r, stats)
        return m_r, stats
    for a in range(0, R, step):
        b = min(R, a + step)
        m_r[a:b], stats[:, a:b] = L.local_stats(L.capped(x2d[a:b], cdt, softcap), info.rows(a, b), smoothing)
    return m_r, stats


def _grad_pass(x2d: Tensor, info: L.RowInfo, shift: Tensor, log_s: Tensor, scale: Tensor, opts: L.CEOptions,
               V: int, step: int, lt: Optional[Tensor]) -> Tensor:
    """Pass 2, a second read of the logits and one write of the gradient,
    ``(R, V_local)`` in the logits' dtype."""
    if lt is not None:
        return L.kernel_grad(x2d, lt, shift, log_s, scale, opts, V)
    R = x2d.shape[0]
    cdt = L.compute_dtype(x2d.dtype)
    grad = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    for a in range(0, R, step):
        b = min(R, a + step)
        z = L.capped(x2d[a:b], cdt, opts.softcap)
        grad[a:b] = L.grad_chunk(z, shift[a:b], log_s[a:b], scale[a:b], info.rows(a, b), opts, V)
    return grad


def ce_forward(x2d: Tensor, target: Tensor, layout: VocabLayout, group, opts: L.CEOptions, chunk_elements: int,
               want_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(loss in the logits' dtype, this rank's ``(R, V_local)`` gradient or
    None): the statistics pass, the two all-reduces, the loss, and (when
    asked) the gradient pass."""
    R, v = x2d.shape
    info = L.RowInfo(target, layout, opts.ignore_index)
    step = L.chunk_rows(v, chunk_elements)
    lt = None
    if R > 0 and L.use_kernels(x2d):
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        lt = L.kernel_targets(info)
    m_r, stats = _stats_pass(x2d, info, opts.label_smoothing > 0, opts.softcap, step, lt)
    shift, log_s = L.global_lse(m_r, stats, group, info.owned, v)
    losses = L.loss_rows(shift, log_s, stats, info.valid, opts, layout.vocab)
    loss = L.reduce(losses, info, opts.reduction, target.shape).to(x2d.dtype)
    if not want_grad:
        return loss, None
    scale = L.row_scale(info, opts.reduction, L.compute_dtype(x2d.dtype))
    return loss, _grad_pass(x2d, info, shift, log_s, scale, opts, layout.vocab, step, lt)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and this rank's gradient slice in one go;
    backward scales the saved gradient by ``grad_output`` (a 0-d tensor, or
    per row for "none"): no communication in backward."""

    @staticmethod
    def forward(ctx, local_logits: Tensor, target: Tensor, layout: VocabLayout, group, opts: L.CEOptions,
                chunk_elements: int, want_grad: bool) -> Tensor:
        shape = local_logits.shape
        x2d = local_logits.reshape(math.prod(shape[:-1]), shape[-1])  # explicit: V_local may be 0
        loss, grad = ce_forward(x2d, target, layout, group, opts, chunk_elements, want_grad)
        ctx.reduction = opts.reduction
        ctx.shape = shape
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        cdt = L.compute_dtype(grad.dtype)
        go = grad_output.to(cdt)
        go = go.reshape(-1, 1) if ctx.reduction == "none" else go
        return (grad.to(cdt) * go).to(grad.dtype).reshape(ctx.shape), None, None, None, None, None, None
