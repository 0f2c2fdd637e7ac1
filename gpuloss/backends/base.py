"""The contract every backend implements.

The public functions in :mod:`gpuloss.functional` validate arguments, move the
class dimension last and flatten everything into 2-D ``(R, C)`` row views, then
call one of the primitives below on the backend's *native* arrays (NumPy arrays
for ``numpy``, torch tensors for ``triton``, CuPy arrays for ``cupy``).  So a
backend only ever sees:

* ``x``: a 2-D floating array ``(R, C)`` (float16, bfloat16, float32 or
  float64) whose last axis has unit stride; rows may be strided (a slice of a
  larger buffer).  ``R`` may be 0.
* class-index ``target``: 1-D integer ``(R,)``, int32 or int64, values already
  validated on the host when value checks are on (see ``gpuloss.config``);
  kernels must still never read out of bounds for a bad value: such a row's
  loss is NaN and its gradient row is NaN.
* ``weight``/``pos_weight``: ``None``, a 1-D float32 ``(C,)`` vector
  (broadcast over rows), or for the element-wise losses a 2-D ``(R, C)`` array
  that the host already broadcast.

Arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype;
results are rounded once at the store.

Every loss primitive returns a :class:`LossResult`:

* ``loss``: float32 (float64 for float64 inputs).  ``reduction="none"``: the
  unreduced loss (per row for the row-wise losses, ``(R, C)`` for element-wise
  ones).  Otherwise a 0-d array on the same device: no host synchronisation.
* ``grad``: the gradient of the *returned* loss with respect to ``x`` (for
  ``"none"``: of the sum of the returned losses, i.e. an upstream gradient of
  ones), in ``x.dtype``, or ``None`` when ``want_grad`` is false.  Ignored rows
  have zero gradient.
* ``grad_target``: the gradient with respect to a floating ``target`` when
  ``want_grad_target`` is true, else ``None``.
* ``lse``: the per-row log-sum-exp (after softcap) for the softmax-based
  losses, float32 ``(R,)`` (float64 inputs may give float64); ``None``
  elsewhere.

Reduction semantics are PyTorch's and are written out in
:mod:`gpuloss.reference`, which is the executable specification every backend
is tested against.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

REDUCTIONS = ("none", "mean", "sum")
KL_REDUCTIONS = ("none", "mean", "sum", "batchmean")


class LossResult(NamedTuple):
    loss: Any
    grad: Any = None
    grad_target: Any = None
    lse: Any = None


class Backend:
    """Base class: a named set of primitives over one native array type."""

    #: registry name ("numpy", "triton", "cupy")
    name: str = ""
    #: the array type the primitives take and return ("numpy", "torch", "cupy")
    native: str = ""

    # --- availability -----------------------------------------------------
    def probe(self) -> Tuple[bool, str]:
        """(available, reason).  Must not raise and must not touch a GPU
        unless the package it needs imports; called lazily, never at import."""
        raise NotImplementedError

    def accepts(self, kind: str, device: str) -> bool:
        """Whether arrays of ``kind`` ("numpy" | "torch" | "cupy") living on
        ``device`` ("cpu" | "cuda:<i>") can be served (possibly via DLPack)."""
        raise NotImplementedError

    # --- conversion between the caller's arrays and native arrays ----------
    def to_native(self, a: Any, kind: str) -> Any:
        """Zero-copy view of the caller's array as a native array."""
        raise NotImplementedError

    def from_native(self, a: Any, kind: str) -> Any:
        """Zero-copy view of a native array as the caller's kind."""
        raise NotImplementedError

    # --- softmax ----------------------------------------------------------
    def softmax_forward(self, x: Any, *, log: bool) -> Any:
        """softmax (or log_softmax) over the last axis, in ``x.dtype``."""
        raise NotImplementedError

    def softmax_backward(self, y: Any, dy: Any, *, log: bool) -> Any:
        """Gradient w.r.t. the forward's input, given its output ``y``.

        softmax:     dx = y * (dy - sum(dy * y))
        log_softmax: dx = dy - exp(y) * sum(dy)
        """
        raise NotImplementedError

    # --- row-wise losses --------------------------------------------------
    def cross_entropy(self, x: Any, target: Any, *, weight: Optional[Any], ignore_index: int,
                      label_smoothing: float, z_loss: float, softcap: Optional[float],
                      reduction: str, want_grad: bool, grad_inplace: bool = False,
                      want_grad_target: bool = False) -> LossResult:
        """Cross-entropy from logits; ``target`` is class indices ``(R,)`` or
        probabilities ``(R, C)`` (floating).  ``grad_inplace`` writes the
        gradient over ``x`` and returns ``x`` as ``grad``."""
        raise NotImplementedError

    def nll_loss(self, logp: Any, target: Any, *, weight: Optional[Any], ignore_index: int,
                 reduction: str, want_grad: bool) -> LossResult:
        raise NotImplementedError

    def kl_div_logits(self, x: Any, target: Any, *, temperature: float, target_is_logits: bool,
                      reduction: str, want_grad: bool) -> LossResult:
        """Row-wise KL(d || softmax(x / T)), d = target probabilities or
        softmax(target / T).  ``reduction`` in KL_REDUCTIONS; "none" is per
        row; "mean" divides by R*C, "batchmean" by R."""
        raise NotImplementedError

    # --- element-wise losses ----------------------------------------------
    def kl_div(self, input: Any, target: Any, *, log_target: bool, reduction: str,
               want_grad: bool, want_grad_target: bool = False) -> LossResult:
        raise NotImplementedError

    def bce_with_logits(self, x: Any, target: Any, *, weight: Optional[Any], pos_weight: Optional[Any],
                        reduction: str, want_grad: bool, want_grad_target: bool = False) -> LossResult:
        raise NotImplementedError

    def bce(self, p: Any, target: Any, *, weight: Optional[Any], reduction: str,
            want_grad: bool, want_grad_target: bool = False) -> LossResult:
        raise NotImplementedError

    def mse(self, x: Any, target: Any, *, reduction: str, want_grad: bool,
            want_grad_target: bool = False) -> LossResult:
        raise NotImplementedError
