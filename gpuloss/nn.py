"""Drop-in ``torch.nn`` loss modules backed by gpuloss.

Each class subclasses the ``torch.nn`` module of the same name, so it takes
the same constructor arguments with the same defaults (deprecated
``size_average``/``reduce`` included), registers ``weight``/``pos_weight`` as
the same buffers (``state_dict``\\ s load both ways between ``torch.nn`` and
``gpuloss.nn``), passes ``isinstance(m, torch.nn.CrossEntropyLoss)`` checks
and prints the same ``repr``.  Only ``forward`` differs: it calls
:mod:`gpuloss.functional`, whose loss backpropagates through the gradient the
fused forward pass computed (:mod:`gpuloss.torch_ops`).

Every module also takes a keyword-only ``backend=`` ("numpy", "triton",
"cupy" or None for the automatic choice).  :class:`CrossEntropyLoss` adds
``z_loss``, ``softcap`` and ``inplace_backward``;
:class:`KLDivWithLogitsLoss` is the distillation loss from logits.

Importing this module imports torch (``import gpuloss`` does not).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import functional as F
from .linear_ce import LinearCrossEntropyLoss  # noqa: F401  (fused linear + CE, gpuloss/linear_ce.py)

__all__ = [
    "CrossEntropyLoss", "NLLLoss", "KLDivLoss", "KLDivWithLogitsLoss", "BCEWithLogitsLoss", "BCELoss",
    "MSELoss", "Softmax", "LogSoftmax", "LinearCrossEntropyLoss",
]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on gpuloss's fused loss+gradient kernel.

    Parameters
    ----------
    weight, size_average, ignore_index, reduce, reduction, label_smoothing :
        as ``torch.nn.CrossEntropyLoss``; ``weight`` is a buffer.
    z_loss : float, keyword-only
        adds ``z_loss * logsumexp(z)**2`` per non-ignored row (PaLM's z-loss).
    softcap : float or None, keyword-only
        logits become ``softcap * tanh(z / softcap)`` first (Gemma 2).
    inplace_backward : bool, keyword-only
        write the gradient over the logits in the forward pass (no ``N x C``
        gradient allocation).  The logits tensor is consumed: after the call
        it holds ``dL/dlogits``.  It must not be a leaf that requires grad,
        nor be needed by another autograd node (see :mod:`gpuloss.torch_ops`).
    backend : str or None, keyword-only

    Shapes: input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``; target class
    indices ``()``, ``(N,)``, ``(N, d1, ...)`` or probabilities of input's
    shape.
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, inplace_backward: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap, inplace_backward=self.inplace_backward,
                               backend=self.backend)

    def extra_repr(self) -> str:
        parts = []
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class NLLLoss(torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` (input: log-probabilities) on gpuloss."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", *, backend: Optional[str] = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction, backend=self.backend)


class KLDivLoss(torch.nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` (input: log-probabilities) on gpuloss."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False, *,
                 backend: Optional[str] = None) -> None:
        super().__init__(size_average, reduce, reduction, log_target)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target,
                        backend=self.backend)


class KLDivWithLogitsLoss(torch.nn.Module):
    """Distillation loss from logits, per row along the last dimension::

        KL(d || softmax(input / T)),  d = softmax(target / T)  (target_is_logits)
                                      d = target               (probabilities)

    in one fused pass (see :func:`gpuloss.functional.kl_div_with_logits`).
    ``reduction``: "batchmean" (default: sum / rows), "sum", "mean"
    (sum / elements), "none" (one value per row).  No ``T**2`` factor is
    applied; the target (teacher) receives no gradient, so pass it detached.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", target_is_logits: bool = True,
                 *, backend: Optional[str] = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.target_is_logits = target_is_logits
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.kl_div_with_logits(input, target, temperature=self.temperature, reduction=self.reduction,
                                    target_is_logits=self.target_is_logits, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, "
                f"target_is_logits={self.target_is_logits}")


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` on gpuloss; ``weight`` and
    ``pos_weight`` are buffers, as in torch."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Optional[Tensor] = None, *, backend: Optional[str] = None) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, weight=self.weight, reduction=self.reduction,
                                                  pos_weight=self.pos_weight, backend=self.backend)


class BCELoss(torch.nn.BCELoss):
    """``torch.nn.BCELoss`` (input: probabilities) on gpuloss."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, reduce=None, reduction: str = "mean",
                 *, backend: Optional[str] = None) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction,
                                      backend=self.backend)


class MSELoss(torch.nn.MSELoss):
    """``torch.nn.MSELoss`` on gpuloss."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", *,
                 backend: Optional[str] = None) -> None:
        super().__init__(size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction, backend=self.backend)


def _implicit_softmax_dim(name: str, ndim: int) -> int:
    """torch's rule for ``dim=None`` (deprecated there, with this warning)."""
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                  f"Change the call to include dim=X as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax`` on gpuloss (differentiable through the backend's
    softmax_backward).  ``dim=None`` follows torch's deprecated implicit rule;
    ``dtype`` (keyword-only) casts the input first, as ``F.softmax(..., dtype=)``."""

    def __init__(self, dim: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(dim)
        self.dtype = dtype
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        dim = self.dim if self.dim is not None else _implicit_softmax_dim("softmax", input.dim())
        return F.softmax(input, dim, dtype=getattr(self, "dtype", None), backend=self.backend)


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` on gpuloss."""

    def __init__(self, dim: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(dim)
        self.dtype = dtype
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        dim = self.dim if self.dim is not None else _implicit_softmax_dim("log_softmax", input.dim())
        return F.log_softmax(input, dim, dtype=getattr(self, "dtype", None), backend=self.backend)
