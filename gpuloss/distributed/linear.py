"""Vocabulary-parallel linear + cross-entropy: the logits ``h @ W.T + b`` of
this rank's weight rows, one chunk of tokens at a time, never all at once."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import local as L
from .layout import VocabLayout

Need = Tuple[bool, bool, bool]  # which of (hidden, weight, bias) want a gradient


def _linear_logits(h: Tensor, w: Tensor, b: Optional[Tensor], cdt: torch.dtype, softcap: Optional[float]) -> Tensor:
    """One chunk's logits ``h @ w.T + b``, in the compute dtype, soft-capped.
    The matmul runs in the storage dtype (tensor cores for bf16) with fp32
    accumulation."""
    z = (h @ w.t()).to(cdt)
    if b is not None:
        z = z + b.to(cdt)
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z


def _zero_grads(R: int, H: int, w: Tensor, has_bias: bool, need: Need, cdt: torch.dtype):
    """The three gradient accumulators in the compute dtype (None where not needed)."""
    gh = torch.zeros((R, H), dtype=cdt, device=w.device) if need[0] else None
    gw = torch.zeros(w.shape, dtype=cdt, device=w.device) if need[1] else None
    gb = torch.zeros(w.shape[0], dtype=cdt, device=w.device) if (need[2] and has_bias) else None
    return gh, gw, gb


def _contract_chunk(dz: Tensor, hc: Tensor, w: Tensor, gh: Optional[Tensor], gw: Optional[Tensor],
                    gb: Optional[Tensor], a: int, e: int) -> None:
    """Accumulate one chunk's dlogits into the three gradients.  The matmuls
    take dlogits rounded to the weight's dtype (tensor cores for bf16, as the
    forward matmul); the accumulators stay in the compute dtype."""
    dzs = dz.to(w.dtype)
    if gh is not None:
        gh[a:e] = dzs @ w
    if gw is not None:
        gw += dzs.t() @ hc
    if gb is not None:
        gb += dz.sum(0)


def default_chunk(layout: VocabLayout, chunk_size: Optional[int], chunk_elements: int) -> int:
    """Tokens per chunk: ``chunk_size``, else what keeps the widest slice's
    chunk within ``chunk_elements``; from N and the global layout only, so
    that every rank issues the same collectives."""
    return chunk_size if chunk_size is not None else L.chunk_rows(max(layout.sizes), chunk_elements)


def linear_forward(h2d: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, layout: VocabLayout, group,
                   opts: L.CEOptions, need: Need, chunk: int):
    """(loss in hidden's dtype, per-row lse, gh, gw, gb).

    Per chunk: logits, local partials, the two all-reduces of this chunk,
    then (for "mean"/"sum", when any gradient is needed) the chunk's dlogits
    contracted into the gradients, which come back in the compute dtype,
    grad_hidden all-reduced over the ranks; otherwise they are None."""
    R, H = h2d.shape
    cdt = L.compute_dtype(h2d.dtype)
    smoothing = opts.label_smoothing > 0
    info = L.RowInfo(target, layout, opts.ignore_index)
    fused = any(need) and opts.reduction != "none"
    scale = L.row_scale(info, opts.reduction, cdt)
    lse = torch.empty(R, dtype=cdt, device=h2d.device)
    losses = torch.empty(R, dtype=cdt, device=h2d.device)
    gh, gw, gb = _zero_grads(R, H, w, b is not None, need if fused else (False,) * 3, cdt)
    for a in range(0, R, chunk):
        e = min(R, a + chunk)
        hc, rows = h2d[a:e], info.rows(a, e)
        z = _linear_logits(hc, w, b, cdt, opts.softcap)
        m_r, stats = L.local_stats(z, rows, smoothing)
        shift, log_s = L.global_lse(m_r, stats, group, rows.owned, z.shape[1])
        lse[a:e] = shift + log_s
        losses[a:e] = L.loss_rows(shift, log_s, stats, rows.valid, opts, layout.vocab)
        if fused:
            dz = L.grad_chunk(z, shift, log_s, scale[a:e], rows, opts, layout.vocab)
            _contract_chunk(dz, hc, w, gh, gw, gb, a, e)
    if gh is not None:
        dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
    loss = L.reduce(losses, info, opts.reduction, target.shape).to(h2d.dtype)
    return loss, lse, gh, gw, gb


def linear_backward(h2d: Tensor, w: Tensor, b: Optional[Tensor], target: Tensor, lse: Tensor,
                    grad_loss: Tensor, layout: VocabLayout, group, opts: L.CEOptions, need: Need, chunk: int):
    """(gh, gw, gb) in the compute dtype for "none" from the per-row lse.

    Per chunk the logits are recomputed, turned into dlogits with the
    per-row upstream gradient, and contracted: ``dW += dlogits^T h`` and
    ``db += sum dlogits`` stay local; ``dh = dlogits @ W`` is this rank's
    partial, summed over the ranks by one all-reduce at the end (every
    rank's slice of the vocabulary contributes to every hidden unit).  No
    MAX/SUM all-reduces: the lse is known."""
    R, H = h2d.shape
    cdt = L.compute_dtype(h2d.dtype)
    info = L.RowInfo(target, layout, opts.ignore_index)
    scale = torch.where(info.valid, grad_loss.reshape(-1).to(cdt), 0.0)
    gh, gw, gb = _zero_grads(R, H, w, b is not None, need, cdt)
    for a in range(0, R, chunk):
        e = min(R, a + chunk)
        hc = h2d[a:e]
        z = _linear_logits(hc, w, b, cdt, opts.softcap)
        dz = L.grad_chunk(z, lse[a:e], torch.zeros_like(lse[a:e]), scale[a:e], info.rows(a, e), opts,
                          layout.vocab)
        _contract_chunk(dz, hc, w, gh, gw, gb, a, e)
    if gh is not None:
        dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
    return gh, gw, gb


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """"mean"/"sum": the forward pass computes the loss and all gradients
    chunk by chunk (three matmuls in all) and backward scales them by the
    0-d ``grad_output``.  "none": the per-row upstream gradient is only known
    in backward, so forward saves the per-row lse and backward recomputes the
    logits chunk by chunk (no MAX/SUM all-reduces needed the second time)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, local_weight: Tensor, local_bias: Optional[Tensor], target: Tensor,
                layout: VocabLayout, group, opts: L.CEOptions, need: Need, chunk: int) -> Tensor:
        h2d = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
        loss, lse, gh, gw, gb = linear_forward(h2d, local_weight, local_bias, target, layout, group, opts, need,
                                               chunk)
        fused = any(need) and opts.reduction != "none"
        ctx.reduction, ctx.hshape, ctx.need = opts.reduction, hidden.shape, need
        ctx.dtypes = (hidden.dtype, local_weight.dtype, None if local_bias is None else local_bias.dtype)
        if fused:
            ctx.save_for_backward(gh, gw, gb)
        elif any(need):
            ctx.layout, ctx.group, ctx.opts, ctx.chunk = layout, group, opts, chunk
            ctx.save_for_backward(hidden, local_weight, local_bias, target, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.reduction != "none":
            gh, gw, gb = ctx.saved_tensors
            go = grad_output.to(gh.dtype if gh is not None else gw.dtype if gw is not None else torch.float32)
            grads = [None if g is None else g * go for g in (gh, gw, gb)]
        else:
            hidden, w, b, target, lse = ctx.saved_tensors
            h2d = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
            grads = list(linear_backward(h2d, w, b, target, lse, grad_output, ctx.layout, ctx.group, ctx.opts,
                                         ctx.need, ctx.chunk))
        gh, gw, gb = grads
        if gh is not None:
            gh = gh.to(ctx.dtypes[0]).reshape(ctx.hshape)
        if gw is not None:
            gw = gw.to(ctx.dtypes[1])
        if gb is not None:
            gb = gb.to(ctx.dtypes[2])
        return gh, gw, gb, None, None, None, None, None, None
