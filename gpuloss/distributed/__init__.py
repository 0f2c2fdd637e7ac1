"""Vocabulary-parallel cross-entropy over ``torch.distributed``.

In tensor-parallel language-model training the output projection is sharded
by vocabulary: rank ``r`` of a process group holds the logits (or the weight
rows) of a contiguous slice ``[start_r, start_r + V_r)`` of a vocabulary of
``V = sum_r V_r`` classes, while the targets (global class indices) are the
same on every rank.  No rank ever holds a whole row.  This module computes
PyTorch's cross-entropy (plus gpuloss's ``z_loss`` and ``softcap``) and its
exact gradient from those shards.

The math, per row (token) i, with z the (soft-capped) logits
-------------------------------------------------------------------------
The log-sum-exp splits over the shards once the rows share one shift.  Each
rank reduces its slice to its max ``m_r`` and ``S_r = sum_{c in slice r}
exp(z_c - m_r)``, and the slices combine as::

    M     = max_r m_r
    lse   = M + log S,   S = sum_r S_r exp(m_r - M)

(every factor ``<= 1``, the largest exactly 1: no overflow, no all-zero sum).
The per-row partial sums the loss needs come from the same chunk of logits,
relative to the slice's max, so that they are sums of terms >= 0 whatever
the offset of the logits (absolute sums ``z_t`` and ``sum_c z_c`` would
cancel against ``lse``: 1e-4 of relative precision lost at an offset of 1e5
in fp32, and ``V * 1e37`` overflows):

* ``m_r - z_t`` if this rank owns the target, else 0;
* ``sum_c (m_r - z_c)`` over the slice (label smoothing only);

each moved to the common shift by adding ``M - m_r`` (``V_r (M - m_r)``).
With eps the label smoothing, PyTorch's formula
``loss = (1 - eps) * (-log p_t) + eps / V * sum_c (-log p_c)`` becomes::

    loss_i = log S + (1 - eps) (M - z_t) + eps / V * sum_c (M - z_c)  +  z_loss * lse**2

(ignored rows: 0).  Collectives per call: one all-reduce (MAX) of the ``(N,)``
slice maxima, then one all-reduce (SUM) of the stacked ``(2 or 3, N)`` tensor
``[S_r exp(m_r - M), M - z_t, sum_c (M - z_c)]``.  Two is the minimum with
all-reduces: the terms of the sum need the common shift.  (One all-gather of
every rank's partials would also do, at ``world`` times the bytes; the
all-reduce pair is what every backend and torch version supports alike.)

The gradient of the rank's own slice needs no further communication::

    dL/dz_c = s_i * [ (1 + 2 z_loss lse) p_c - (1 - eps) [c == t] - eps / V ]

with ``p_c = exp((z_c - M) - log S)`` (never ``exp(z_c - lse)`` with an lse
rounded at the size of the logits) and ``s_i`` the reduction's row scale
(``1 / n`` for "mean", n the number of non-ignored rows, counted on the device
since the targets are replicated; 1 for "sum"; the upstream gradient for
"none").
Through the softcap ``z = cap * tanh(x / cap)``: ``dz/dx = 1 - (z / cap)**2``.

The forward pass writes this gradient (in the logits' dtype, computed in
fp32) and autograd's backward only scales it by ``grad_output``: the logits
are read twice in all (statistics, gradient) and never again in backward.
No ``.item()`` and no Python branch on a device value on the hot path: the
only host synchronisation is inside the collectives.

Validation, and why it costs one small collective
-------------------------------------------------
A wrong slice layout or an out-of-range target on ONE rank must not leave the
other ranks waiting in an all-reduce.  With ``validate=True`` (the default)
every rank all-gathers a small int64 vector (its ``V_r``, its ``vocab_start``,
the ``vocab_size``/``vocab_sizes`` it was given, its target min/max over
non-ignored rows, two target checksums and its local argument problems) and
reads it on the host.  Every rank then takes the same decision from the same
gathered data and raises the same ``ValueError`` together.  That is one
all-gather of ``(12 + world)`` int64 values and one device-to-host copy per
call.  ``validate=False`` skips it: the layout then comes from
``vocab_sizes`` when given, else from the previous call on this group while
this rank's (``V_local``, ``vocab_start``, ``vocab_size``) stay the same (one
small collective when they change); an out-of-range target is then owned by
no rank and its row's loss is plain ``lse`` (no out-of-bounds read, but a
wrong value).  With ``validate=False`` and no ``vocab_sizes``, all ranks must
see a layout change together (it must change ``V_local`` on every rank: a
rank whose ``V_local`` stays reuses the old layout); pass ``vocab_sizes`` to be
independent of that, and where two heads of different layouts alternate on one
group (a teacher and a student), which would otherwise gather on every call.

Custom operators, and torch.compile
-----------------------------------
Each public function checks its Python arguments and calls one
``torch.library`` custom operator (``gpuloss::vocab_parallel_cross_entropy``,
``gpuloss::vocab_parallel_linear_cross_entropy``; the linear form's "none"
backward is ``gpuloss::vocab_parallel_linear_cross_entropy_backward``), which
takes the process group by its name and the layout as plain ints.  The
collectives, the validation all-gather with its host read and the layout
cache all run inside the operators, whose fake implementations give the
output shapes without any of them: ``torch.compile(fullgraph=True)`` traces a
call, forward and backward, with no graph break, and a compiled call keeps
the eager contract (the same collectives in the same order on every rank, the
same ``ValueError`` on every rank).  The group's name is looked up once per
compilation, guarded on the group object.

Works with any backend that has all-gather and MAX/SUM all-reduce on the
logits' device: NCCL on GPUs, gloo on CPUs.  Every rank must call with the
same ``reduction``, options, targets and ``requires_grad`` settings, as for
any collective.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _autocast as AC
from .. import _traced as TR
from .. import _validate as V
from ..errors import ArgumentTypeError, ArgumentValueError
from .layout import VocabLayout, check_options, group_name, layout_arguments, require_target
from .linear import vocab_parallel_linear_cross_entropy_op
from .ops import vocab_parallel_cross_entropy_op

__all__ = ["VocabLayout", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

#: Rows per chunk are chosen so that one chunk's fp32 temporaries hold at most
#: this many elements (64 MiB each): the local passes create a few of them
#: (capped logits, exp, gradient) and need not scale with N x V_local.
_CHUNK_ELEMENTS = 1 << 24


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, group=None, *,
                                 vocab_start: Optional[int] = None, vocab_sizes: Optional[Sequence[int]] = None,
                                 vocab_size: Optional[int] = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                                 softcap: Optional[float] = None, validate: bool = True,
                                 loss_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Cross-entropy over a vocabulary sharded across the ranks of ``group``.

    Parameters
    ----------
    local_logits : (..., V_local) floating tensor (fp16, bf16, fp32, fp64):
        this rank's logits for classes ``[vocab_start, vocab_start + V_local)``.
        The class dimension is LAST (the tensor-parallel convention), unlike
        ``torch.nn.functional.cross_entropy``.
    target : (...) integer tensor of GLOBAL class indices, the same on every
        rank, on the logits' device.
    group : the process group (default: the world).
    vocab_start : this rank's first class; default: the slices lie in rank
        order, ``vocab_start = sum of V_local of the lower ranks``.  Given on
        every rank or on none; the slices must tile ``[0, V)``.
    vocab_sizes : V_local of every rank, in rank order (the same list on every
        rank): states the layout without a collective.
    vocab_size : the whole vocabulary V, checked against the slices.
    ignore_index, reduction, label_smoothing : as ``torch.nn.functional.cross_entropy``
        (no class weights).  Label smoothing follows PyTorch's formula.
    z_loss : adds ``z_loss * lse**2`` per non-ignored row (PaLM).
    softcap : logits become ``softcap * tanh(x / softcap)`` first (Gemma 2).
    validate : check the layout and the targets on every rank with one small
        all-gather and one host read (see the module docstring); False for
        the hot path.
    loss_dtype : the loss's dtype, as :func:`gpuloss.cross_entropy`'s: e.g.
        float32 for bf16 logits gives the loss as accumulated, unrounded.

    Returns
    -------
    The loss, the same on every rank, in ``loss_dtype`` or else the logits'
    dtype (float32 for 16-bit logits under ``torch.autocast``, as torch's): 0-d for "mean"
    and "sum" ("mean" divides by the number of non-ignored rows: nan when
    there are none), ``target``'s shape for "none".  Backpropagates into
    ``local_logits`` (this rank's slice of the exact gradient).

    Collectives: one all-reduce MAX of ``(N,)`` and one all-reduce SUM of
    ``(2, N)`` (``(3, N)`` with label smoothing), plus the validation
    all-gather when ``validate``.
    """
    ignore_index, label_smoothing = check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if not isinstance(local_logits, Tensor) or not local_logits.is_floating_point() or local_logits.ndim < 1:
        raise ArgumentTypeError("local_logits must be a floating torch tensor with at least one dimension")
    require_target(target)
    loss_dtype = V.as_float_dtype("loss_dtype", loss_dtype, "torch")
    TR.refuse_transformed("vocab_parallel_cross_entropy", local_logits, target)
    name = group_name(group)
    vocab_start, vocab_size, vocab_sizes = layout_arguments(vocab_start, vocab_size, vocab_sizes)
    want_grad = torch.is_grad_enabled() and local_logits.requires_grad
    loss, _ = vocab_parallel_cross_entropy_op(
        local_logits, target, name, vocab_start, vocab_sizes, vocab_size, bool(validate), ignore_index, reduction,
        float(label_smoothing), float(z_loss), None if softcap is None else float(softcap), _CHUNK_ELEMENTS,
        want_grad)
    return _loss_dtype(loss, local_logits, loss_dtype)


def _loss_dtype(loss: Tensor, logits_like: Tensor, loss_dtype: Optional[torch.dtype]) -> Tensor:
    """The operator's loss (compute dtype) in ``loss_dtype`` or else the
    logits' dtype, as torch's cross_entropy gives it; in float32 under
    torch.autocast for 16-bit logits, as autocast gives torch's
    (gpuloss._autocast)."""
    if loss_dtype is not None:
        return loss.to(loss_dtype)
    _, fp32 = AC.fp32_op("cross_entropy", "torch", str(logits_like.device), {"input": logits_like})
    return loss.to(fp32 or logits_like.dtype)


def vocab_parallel_linear_cross_entropy(hidden: Tensor, local_weight: Tensor, target: Tensor, group=None,
                                        local_bias: Optional[Tensor] = None, *, vocab_start: Optional[int] = None,
                                        vocab_sizes: Optional[Sequence[int]] = None,
                                        vocab_size: Optional[int] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0,
                                        z_loss: float = 0.0, softcap: Optional[float] = None,
                                        chunk_size: Optional[int] = None, validate: bool = True,
                                        loss_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Cross-entropy of ``hidden @ W.T + b`` with ``W`` sharded by vocabulary.

    Parameters
    ----------
    hidden : (..., H) floating tensor, the same on every rank (replicated).
    local_weight : (V_local, H), this rank's rows of the output projection,
        classes ``[vocab_start, vocab_start + V_local)``; hidden's dtype.
    target : (...) integer GLOBAL class indices, the same on every rank.
    group : the process group (default: the world).
    local_bias : optional (V_local,) bias slice.
    chunk_size : tokens per chunk; only one chunk's ``(chunk, V_local)``
        logits (and their fp32 temporaries) exist at a time.  Default: at most
        ``2**24`` logits per chunk for the largest slice of the layout.  The
        chunk count is derived from N and the global layout only, so every
        rank issues the same collectives.
    other arguments : as :func:`vocab_parallel_cross_entropy`.

    Returns
    -------
    The loss (as :func:`vocab_parallel_cross_entropy`).  Backward gives
    ``grad_hidden`` (the full gradient, all-reduced over the ranks: the same on
    every rank), and ``grad_local_weight``/``grad_local_bias`` (this rank's
    slice, local).

    Collectives: per chunk one all-reduce MAX ``(chunk,)`` and one all-reduce
    SUM ``(2 or 3, chunk)``; one all-reduce SUM of ``(N, H)`` for
    ``grad_hidden`` (in forward for "mean"/"sum", where the gradients are
    computed with the loss; in backward for "none", which recomputes the
    logits from the saved per-row lse).  All ranks must agree on which of
    hidden/weight/bias require grad.
    """
    ignore_index, label_smoothing = check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    for arg, t in (("hidden", hidden), ("local_weight", local_weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ArgumentTypeError(f"{arg} must be a floating torch tensor")
    if local_bias is not None and (not isinstance(local_bias, Tensor) or not local_bias.is_floating_point()):
        raise ArgumentTypeError("local_bias must be None or a floating torch tensor")
    V.check_chunk_size("chunk_size", chunk_size)
    loss_dtype = V.as_float_dtype("loss_dtype", loss_dtype, "torch")
    if hidden.ndim < 1:
        raise ArgumentValueError("hidden must be (..., H)")
    require_target(target)
    TR.refuse_transformed("vocab_parallel_linear_cross_entropy", hidden, local_weight, target, local_bias)
    name = group_name(group)
    vocab_start, vocab_size, vocab_sizes = layout_arguments(vocab_start, vocab_size, vocab_sizes)
    # torch.autocast: the projection's operands in autocast's dtype, as F.linear's
    (hidden, local_weight, local_bias), _ = AC.linear_operands("torch", str(hidden.device), hidden, local_weight,
                                                               local_bias)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and local_weight.requires_grad,
            grad_on and local_bias is not None and local_bias.requires_grad)
    loss, *_ = vocab_parallel_linear_cross_entropy_op(
        hidden, local_weight, local_bias, target, name, vocab_start, vocab_sizes, vocab_size, bool(validate),
        ignore_index, reduction, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap),
        chunk_size, _CHUNK_ELEMENTS, *need)
    return _loss_dtype(loss, hidden, loss_dtype)
