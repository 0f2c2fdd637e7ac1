"""Vocabulary-parallel cross-entropy from logits as the custom operator
``gpuloss::vocab_parallel_cross_entropy``: the per-rank forward pass
(statistics, the two all-reduces, the loss and this rank's gradient slice),
its fake implementation and its autograd formula.

The operator takes the process group by name and the layout as plain ints,
so ``torch.compile(fullgraph=True)`` traces a call as one opaque node: the
collectives and the host reads of validation run inside it, and the fake
implementation gives the output shapes without any of them.  The gradient is
an output of the forward operator (as in :mod:`gpuloss.torch_ops`): backward
only scales it."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..torch_ops import first_order, kept_rows, loss_upstream, no_zero_grads, scaled_grad, stash_target, \
    stashed_target
from . import local as L
from .layout import VocabLayout, logits_errors, resolve_layout


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
    ``(R, V_local)`` in the logits' dtype (float32 for float16:
    :func:`local.saved_dtype`)."""
    if lt is not None:
        return L.kernel_grad(x2d, lt, shift, log_s, scale, opts, V)
    R = x2d.shape[0]
    cdt = L.compute_dtype(x2d.dtype)
    grad = torch.empty(x2d.shape, dtype=L.saved_dtype(x2d.dtype), device=x2d.device)
    for a in range(0, R, step):
        b = min(R, a + step)
        z = L.capped(x2d[a:b], cdt, opts.softcap)
        grad[a:b] = L.grad_chunk(z, shift[a:b], log_s[a:b], scale[a:b], info.rows(a, b), opts, V)
    return grad


def ce_forward(x2d: Tensor, target: Tensor, layout: VocabLayout, group, opts: L.CEOptions, chunk_elements: int,
               want_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(loss in the compute dtype, this rank's ``(R, V_local)`` gradient or
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
    loss = L.reduce(losses, info, opts.reduction, target.shape)
    if not want_grad:
        return loss, None
    scale = L.row_scale(info, opts.reduction, L.compute_dtype(x2d.dtype))
    return loss, _grad_pass(x2d, info, shift, log_s, scale, opts, layout.vocab, step, lt)


# ---------------------------------------------------------------------------
# the operator: gpuloss::vocab_parallel_cross_entropy
# ---------------------------------------------------------------------------

#: the arguments every vocab-parallel operator takes after its tensors: the
#: group by name, the layout as stated by the caller (resolved inside the
#: operator), the loss options
LAYOUT_ARGS = "str group, int? vocab_start, int[]? vocab_sizes, int? vocab_size"
OPTION_ARGS = "int ignore_index, str reduction, float label_smoothing, float z_loss, float? softcap"


@torch.library.custom_op("gpuloss::vocab_parallel_cross_entropy", mutates_args=(),
                         schema=f"(Tensor local_logits, Tensor target, {LAYOUT_ARGS}, bool validate, {OPTION_ARGS}, "
                                "int chunk_elements, bool want_grad) -> (Tensor, Tensor)")
def vocab_parallel_cross_entropy_op(local_logits: Tensor, target: Tensor, group: str, vocab_start: Optional[int],
                                    vocab_sizes: Optional[List[int]], vocab_size: Optional[int], validate: bool,
                                    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                                    softcap: Optional[float], chunk_elements: int,
                                    want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss in the compute dtype, this rank's ``(R, V_local)`` gradient or
    an empty placeholder).
    The layout is resolved here (validation's all-gather, or the cache), then
    the forward pass and its collectives run: all of it opaque to dynamo."""
    pg, layout = resolve_layout(group, local_logits.device, local_logits.shape[-1], target, ignore_index,
                                vocab_start, vocab_size, vocab_sizes, logits_errors(local_logits, target), validate,
                                (local_logits.dtype, ignore_index, reduction, label_smoothing, z_loss, softcap))
    opts = L.CEOptions(ignore_index, reduction, label_smoothing, z_loss, softcap)
    shape = local_logits.shape
    x2d = local_logits.reshape(math.prod(shape[:-1]), shape[-1])  # explicit: V_local may be 0
    loss, grad = ce_forward(x2d, target, layout, pg, opts, chunk_elements, want_grad)
    return L.not_a_view(loss), grad if grad is not None else local_logits.new_empty(
        (0,), dtype=L.saved_dtype(local_logits.dtype))


@vocab_parallel_cross_entropy_op.register_fake
def _(local_logits, target, group, vocab_start, vocab_sizes, vocab_size, validate, ignore_index, reduction,
      label_smoothing, z_loss, softcap, chunk_elements, want_grad):
    shape = local_logits.shape
    loss = local_logits.new_empty(tuple(target.shape) if reduction == "none" else (),
                                  dtype=L.compute_dtype(local_logits.dtype))
    grad = local_logits.new_empty((math.prod(shape[:-1]), shape[-1]) if want_grad else (0,),
                                  dtype=L.saved_dtype(local_logits.dtype))
    return loss, grad


def _ce_setup(ctx, inputs, output) -> None:
    local_logits, reduction, want_grad = inputs[0], inputs[8], inputs[-1]
    ctx.reduction, ctx.shape, ctx.n_inputs = reduction, local_logits.shape, len(inputs)
    ctx.dtype = local_logits.dtype
    ctx.want_grad = want_grad  # False: output[1] is the empty placeholder
    ctx.ignore_index = inputs[7]
    # the targets too, whose ignored rows take no upstream gradient (kept_rows)
    ctx.save_for_backward(output[1], *stash_target(ctx, inputs[1]))
    no_zero_grads(ctx, output)


def _ce_backward(ctx, grad_output: Tensor, _unused):
    """The gradient saved by the forward pass times ``grad_output`` (0-d, or
    per row for "none"): no communication, the logits are not read again.
    None when the forward was not asked for it (as the operators of
    :mod:`gpuloss.torch_ops`)."""
    grad = ctx.saved_tensors[0]
    gx = None
    grad_output = loss_upstream(ctx, grad_output)
    if ctx.want_grad and ctx.needs_input_grad[0]:
        go = grad_output.to(L.compute_dtype(grad.dtype))
        go = kept_rows(go.reshape(-1) if ctx.reduction == "none" else go, stashed_target(ctx, ctx.saved_tensors),
                       ctx.ignore_index)
        # the product in the compute dtype, rounded once, without a float32 copy of grad
        gx = scaled_grad(grad, go).to(ctx.dtype).reshape(ctx.shape)
    return first_order("vocab_parallel_cross_entropy", (gx,) + (None,) * (ctx.n_inputs - 1))


vocab_parallel_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup)
