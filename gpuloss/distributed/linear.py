"""Vocabulary-parallel linear + cross-entropy: the logits ``h @ W.T + b`` of
this rank's weight rows, one chunk of tokens at a time, never all at once."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _autocast as AC
from ..torch_ops import first_order, ignored_rows_scale, loss_upstream, no_zero_grads, stash_target, \
    stashed_target
from . import local as L
from .layout import VocabLayout, linear_errors, local_rows, resolve_layout
from .ops import LAYOUT_ARGS, OPTION_ARGS

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
    """(loss in the compute dtype, per-row lse, gh, gw, gb).

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
    loss = L.reduce(losses, info, opts.reduction, target.shape)
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


# ---------------------------------------------------------------------------
# the operators: gpuloss::vocab_parallel_linear_cross_entropy and its backward
# ---------------------------------------------------------------------------

def _placeholder(like: Tensor) -> Tensor:
    """What an operator returns for a gradient it was not asked for."""
    return like.new_empty((0,), dtype=L.compute_dtype(like.dtype))


def _grads_or_placeholders(hidden: Tensor, grads) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(_placeholder(hidden) if g is None else g for g in grads)


def _fake_grads(hidden: Tensor, local_weight: Tensor, local_bias: Optional[Tensor], need: Need):
    """(gh, gw, gb) as the operators return them: the compute dtype, gh as
    ``(R, H)``, placeholders where not needed."""
    cdt = L.compute_dtype(hidden.dtype)
    R = math.prod(hidden.shape[:-1])
    gh = hidden.new_empty((R, hidden.shape[-1]), dtype=cdt) if need[0] else _placeholder(hidden)
    gw = hidden.new_empty(tuple(local_weight.shape), dtype=cdt) if need[1] else _placeholder(hidden)
    has_b = need[2] and local_bias is not None
    gb = hidden.new_empty((local_weight.shape[0],), dtype=cdt) if has_b else _placeholder(hidden)
    return gh, gw, gb


def _flat(hidden: Tensor) -> Tensor:
    return hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])


@torch.library.custom_op(
    "gpuloss::vocab_parallel_linear_cross_entropy", mutates_args=(),
    schema=f"(Tensor hidden, Tensor local_weight, Tensor? local_bias, Tensor target, {LAYOUT_ARGS}, bool validate, "
           f"{OPTION_ARGS}, int? chunk_size, int chunk_elements, bool want_hidden, bool want_weight, "
           "bool want_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def vocab_parallel_linear_cross_entropy_op(hidden: Tensor, local_weight: Tensor, local_bias: Optional[Tensor],
                                           target: Tensor, group: str, vocab_start: Optional[int],
                                           vocab_sizes: Optional[List[int]], vocab_size: Optional[int],
                                           validate: bool, ignore_index: int, reduction: str,
                                           label_smoothing: float, z_loss: float, softcap: Optional[float],
                                           chunk_size: Optional[int], chunk_elements: int, want_hidden: bool,
                                           want_weight: bool, want_bias: bool):
    """(loss, per-row lse, gh, gw, gb): the gradients (compute dtype) only
    for "mean"/"sum", where the forward pass forms them; placeholders else."""
    err = linear_errors(hidden, local_weight, local_bias, target)
    pg, layout = resolve_layout(group, hidden.device, local_rows(local_weight), target, ignore_index, vocab_start,
                                vocab_size, vocab_sizes, err, validate,
                                (hidden.dtype, ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size,
                                 hidden.shape[-1], local_bias is not None))
    opts = L.CEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)
    chunk = default_chunk(layout, chunk_size, chunk_elements)
    need = (want_hidden, want_weight, want_bias)
    with AC.disabled(hidden.device):  # the chunk matmuls in the operands' dtypes
        loss, lse, *grads = linear_forward(_flat(hidden), local_weight, local_bias, target, layout, pg, opts,
                                           need, chunk)
    return (L.not_a_view(loss), lse) + _grads_or_placeholders(hidden, grads)


@vocab_parallel_linear_cross_entropy_op.register_fake
def _(hidden, local_weight, local_bias, target, group, vocab_start, vocab_sizes, vocab_size, validate,
      ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, chunk_elements, want_hidden,
      want_weight, want_bias):
    cdt = L.compute_dtype(hidden.dtype)
    loss = hidden.new_empty(tuple(target.shape) if reduction == "none" else (), dtype=cdt)
    lse = hidden.new_empty((math.prod(hidden.shape[:-1]),), dtype=cdt)
    need = (want_hidden, want_weight, want_bias) if reduction != "none" else (False,) * 3
    return (loss, lse) + _fake_grads(hidden, local_weight, local_bias, need)


@torch.library.custom_op(
    "gpuloss::vocab_parallel_linear_cross_entropy_backward", mutates_args=(),
    schema=f"(Tensor hidden, Tensor local_weight, Tensor? local_bias, Tensor target, Tensor lse, Tensor grad_loss, "
           f"{LAYOUT_ARGS}, {OPTION_ARGS}, int? chunk_size, int chunk_elements, bool want_hidden, "
           "bool want_weight, bool want_bias) -> (Tensor, Tensor, Tensor)")
def vocab_parallel_linear_cross_entropy_backward_op(hidden: Tensor, local_weight: Tensor,
                                                    local_bias: Optional[Tensor], target: Tensor, lse: Tensor,
                                                    grad_loss: Tensor, group: str, vocab_start: Optional[int],
                                                    vocab_sizes: Optional[List[int]], vocab_size: Optional[int],
                                                    ignore_index: int, reduction: str, label_smoothing: float,
                                                    z_loss: float, softcap: Optional[float],
                                                    chunk_size: Optional[int], chunk_elements: int,
                                                    want_hidden: bool, want_weight: bool, want_bias: bool):
    """(gh, gw, gb) for "none" from the saved per-row lse.  The forward
    operator resolved (and validated) the layout with these arguments, so
    it comes from ``vocab_sizes`` or the layout cache: no validation
    collective, only the all-reduce of gh."""
    pg, layout = resolve_layout(group, hidden.device, local_rows(local_weight), target, ignore_index, vocab_start,
                                vocab_size, vocab_sizes, 0, validate=False)
    opts = L.CEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)
    chunk = default_chunk(layout, chunk_size, chunk_elements)
    with AC.disabled(hidden.device):
        grads = linear_backward(_flat(hidden), local_weight, local_bias, target, lse, grad_loss, layout, pg,
                                opts, (want_hidden, want_weight, want_bias), chunk)
    return _grads_or_placeholders(hidden, grads)


@vocab_parallel_linear_cross_entropy_backward_op.register_fake
def _(hidden, local_weight, local_bias, target, lse, grad_loss, group, vocab_start, vocab_sizes, vocab_size,
      ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, chunk_elements, want_hidden,
      want_weight, want_bias):
    return _fake_grads(hidden, local_weight, local_bias, (want_hidden, want_weight, want_bias))


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------

def _linear_setup(ctx, inputs, output) -> None:
    """"mean"/"sum": save the gradients the forward pass formed.  "none":
    the per-row upstream gradient is only known in backward, so save the
    inputs and the per-row lse; backward recomputes the logits chunk by
    chunk (no MAX/SUM all-reduces needed the second time)."""
    hidden, local_weight, local_bias, target = inputs[:4]
    ctx.n_inputs = len(inputs)
    ctx.reduction = inputs[10]
    ctx.need = (inputs[-3], inputs[-2], inputs[-1] and local_bias is not None)
    ctx.hshape = hidden.shape
    ctx.dtypes = (hidden.dtype, local_weight.dtype, None if local_bias is None else local_bias.dtype)
    # the backward operator's arguments: the forward's, without validate
    ctx.args = inputs[4:8] + inputs[9:]
    if ctx.reduction != "none":
        ctx.ignore_index = inputs[9]
        ctx.save_for_backward(*output[2:], *stash_target(ctx, target))  # ignored rows (ignored_rows_scale)
    else:
        ctx.save_for_backward(hidden, local_weight, local_bias, target, output[1])
    no_zero_grads(ctx, output)


def _linear_backward(ctx, grad_output: Tensor, *_unused):
    """The gradients the forward asked for (``want_*``: the same on every
    rank, so every rank issues the same all-reduce), as torch expects them:
    in the inputs' dtypes, grad_hidden in hidden's shape."""
    grad_output = loss_upstream(ctx, grad_output)  # None on this rank: it still joins the all-reduce
    if ctx.reduction != "none":
        go = grad_output.to(L.compute_dtype(ctx.dtypes[0]))
        saved = ctx.saved_tensors[:3]
        target = stashed_target(ctx, ctx.saved_tensors)
        # ignored rows take no gradient whatever the upstream
        grads = [g * ignored_rows_scale(go, target, ctx.ignore_index, g, i == 0) if n else None
                 for i, (g, n) in enumerate(zip(saved, ctx.need))]
    elif any(ctx.need):
        hidden, w, b, target, lse = ctx.saved_tensors
        grads = torch.ops.gpuloss.vocab_parallel_linear_cross_entropy_backward(
            hidden, w, b, target, lse, grad_output, *ctx.args)
        grads = [g if n else None for g, n in zip(grads, ctx.need)]
    else:
        grads = [None] * 3
    gh, gw, gb = grads
    if gh is not None:
        gh = gh.to(ctx.dtypes[0]).reshape(ctx.hshape)
    if gw is not None:
        gw = gw.to(ctx.dtypes[1])
    if gb is not None:
        gb = gb.to(ctx.dtypes[2])
    return first_order("vocab_parallel_linear_cross_entropy", (gh, gw, gb) + (None,) * (ctx.n_inputs - 3))


vocab_parallel_linear_cross_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup)
