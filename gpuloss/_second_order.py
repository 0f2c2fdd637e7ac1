"""Second derivatives of the losses: their gradients under ``create_graph=True``.

A loss's backward scales the gradient its forward pass saved
(:mod:`gpuloss.torch_ops`).  That gradient is a constant to autograd, so a
derivative taken through it would miss the loss's curvature.  When the
gradient is asked for with ``create_graph=True`` (grad mode on inside
backward: ``gradgradcheck``, Hessian-vector products, gradient penalties, a
MAML outer step), backward instead forms it again from the op's inputs with
torch's own differentiable operations, in the loss's accumulation dtype
(float32 for 16-bit inputs, float64 for float64), and takes it with
``torch.autograd.grad(..., create_graph=True)``: every higher derivative is
then torch's.

Each function here is one op of :data:`gpuloss.ops.OPS`, on the op's arrays
(2-D rows for the row losses, the broadcast element arrays for the
element-wise ones) and its options record, with the op's loss and reduction:
the definitions of :mod:`gpuloss.reference`.  ``torch.ops.aten`` and
``torch``'s own functions are called, never ``torch.nn.functional``'s, which
a caller may have bound to gpuloss's.

The forward pass keeps plain references to the op's inputs for this (no
saved tensors, so a first-order backward is unaffected by a later in-place
change of an input; a second-order one refuses it).  The row losses keep
them only up to :data:`MAX_ROW_ELEMENTS` elements: beyond that, keeping the
logits alive until backward could double the memory a training step holds
for them, and their second derivatives raise as before.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

#: the largest input (elements) of a row loss (cross_entropy, kl_div_with_logits) whose
#: second derivatives are available: 2**24, 64 MiB of float32 logits
MAX_ROW_ELEMENTS = 1 << 24

_ROW_OPS = frozenset({"cross_entropy", "kl_div_logits"})
_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


class ChangedInPlace(RuntimeError):
    """An input kept for the second-order backward was modified in place since the forward pass."""


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(a: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if a is None else a.to(dtype)


def _reduce(rows: Tensor, reduction: str, divisor: Any) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / divisor


def _cross_entropy(arrays: List[Optional[Tensor]], o) -> Tensor:
    """reference.cross_entropy on rows: weights, ignore_index, label smoothing, probability targets,
    z_loss, softcap; "mean" over the selected weights (class indices) or the rows (probabilities)."""
    x, target, weight = arrays
    f = _acc(x)
    z = x.to(f)
    if o.softcap is not None:
        z = o.softcap * torch.tanh(z / o.softcap)
    lse = torch.logsumexp(z, -1)
    logp = torch.log_softmax(z, -1)
    M, C = z.shape
    w = _as(weight, f)
    eps = float(o.label_smoothing)
    if target.is_floating_point():
        ts = target.to(f) * (1.0 - eps) + eps / C
        rows = -(logp * (ts if w is None else ts * w)).sum(-1)
        if o.z_loss:
            rows = rows + o.z_loss * lse ** 2
        return _reduce(rows, o.reduction, M)
    valid = target != o.ignore_index
    tt = torch.where(valid, target, 0)
    wt = valid.to(f) if w is None else torch.where(valid, w[tt], 0.0)
    # select, never multiply by the mask: a -inf logit of an ignored row must not become 0 * inf
    rows = (1.0 - eps) * torch.where(valid, -logp.gather(1, tt[:, None]).squeeze(1) * wt, 0.0)
    if eps > 0:
        rows = rows + (eps / C) * torch.where(valid, -(logp if w is None else logp * w).sum(-1), 0.0)
    if o.z_loss:
        rows = rows + torch.where(valid, o.z_loss * lse ** 2, 0.0)
    return _reduce(rows, o.reduction, wt.sum())


def _kl_div_logits(arrays: List[Optional[Tensor]], o) -> Tensor:
    from ._traced import kl_div_with_logits
    x, target = arrays
    f = _acc(x)
    return kl_div_with_logits(x.to(f), target.to(f), o.temperature, o.reduction, o.target_is_logits, False)


def _kl_div(arrays: List[Optional[Tensor]], o) -> Tensor:
    x, target = arrays
    f = _acc(x)
    return torch.kl_div(x.to(f), target.to(f), _REDUCTION[o.reduction], log_target=o.log_target)


def _bce_with_logits(arrays: List[Optional[Tensor]], o) -> Tensor:
    x, target, weight, pos_weight = arrays
    f = _acc(x)
    return torch.ops.aten.binary_cross_entropy_with_logits(x.to(f), target.to(f), _as(weight, f),
                                                           _as(pos_weight, f), _REDUCTION[o.reduction])


def _bce(arrays: List[Optional[Tensor]], o) -> Tensor:
    p, target, weight = arrays
    f = _acc(p)
    return torch.ops.aten.binary_cross_entropy(p.to(f), target.to(f), _as(weight, f), _REDUCTION[o.reduction])


def _mse(arrays: List[Optional[Tensor]], o) -> Tensor:
    x, target = arrays
    f = _acc(x)
    return torch.ops.aten.mse_loss(x.to(f), target.to(f), _REDUCTION[o.reduction])


#: op name -> its loss from (arrays, options) with torch's differentiable operations
LOSSES: Dict[str, Callable[[List[Optional[Tensor]], Any], Tensor]] = {
    "cross_entropy": _cross_entropy,
    "kl_div_logits": _kl_div_logits,
    "kl_div": _kl_div,
    "bce_with_logits": _bce_with_logits,
    "bce": _bce,
    "mse": _mse,
}


def keep(name: str, arrays: Sequence[Optional[Tensor]]) -> Any:
    """What the forward pass keeps for a later second-order backward: the
    arrays and their version counters; or the reason there is nothing."""
    if name not in LOSSES:
        return "not implemented for this loss"
    if name in _ROW_OPS and arrays[0].numel() > MAX_ROW_ELEMENTS:
        return (f"its input has {arrays[0].numel()} elements, more than the {MAX_ROW_ELEMENTS} "
                f"(gpuloss._second_order.MAX_ROW_ELEMENTS) whose second derivatives gpuloss keeps the logits for")
    if any(a is not None and a.is_inference() for a in arrays):  # no version counter to keep
        return "an argument is an inference tensor (created under torch.inference_mode)"
    return tuple(arrays), tuple(None if a is None else a._version for a in arrays)


def grads(name: str, kept: Any, opts: Any, wrt: Sequence[int], g_loss: Tensor) -> List[Optional[Tensor]]:
    """The gradients of op ``name``'s loss with respect to its arrays at
    positions ``wrt`` (upstream ``g_loss``, times the options' ``grad_scale``
    where they have one), differentiable to any order; None for an array the
    loss does not depend on.  ``kept``: :func:`keep`'s result (a str: the
    reason, raised by the caller)."""
    arrays, versions = kept
    for i, (a, v) in enumerate(zip(arrays, versions)):
        if a is not None and a._version != v:
            raise ChangedInPlace(f"array {i} of the loss was modified in place after the forward pass")
    with torch.enable_grad():
        loss = LOSSES[name](list(arrays), opts)
        scale = getattr(opts, "grad_scale", 1.0)
        g = g_loss.to(loss.dtype).reshape(loss.shape)
        out = torch.autograd.grad(loss, [arrays[i] for i in wrt], g if scale == 1.0 else g * scale,
                                  create_graph=True, allow_unused=True)
    return list(out)
