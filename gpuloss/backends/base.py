"""The contract every backend implements.

A backend owns *launchers*: one method per op of :mod:`gpuloss.ops`, named
after the op, that runs the op's fused primitive on the backend's *native*
arrays (NumPy arrays for ``numpy``, torch tensors for ``triton``, CuPy arrays
for ``cupy``)::

    backend.cross_entropy(x, target, weight, opts, want) -> LossResult
    backend.softmax_forward(x, opts) -> y
    backend.softmax_backward(y, dy, opts) -> dx

The array arguments come in the order of ``OpSpec.arrays`` (optional ones may
be None), ``opts`` is the op's frozen options record, unchanged from the
public function, and ``want`` (:class:`gpuloss.ops.Want`) says which
gradients to form besides the loss.  Everything else (validation, moving the
class dimension last, the caller's array kind, autograd) happens before the
call, once, in :mod:`gpuloss.functional` and :mod:`gpuloss.launch`; nobody
calls a backend's private names.

What a launcher sees:

* ``x``: a 2-D floating array ``(R, C)`` (float16, bfloat16, float32 or
  float64) whose last axis has unit stride; rows may be strided (a slice of a
  larger buffer).  ``R >= 0``; the row-wise losses have ``C >= 1`` (empty
  inputs never reach a backend: the public functions give torch's result for
  them, :mod:`gpuloss.rules`).
* class-index ``target``: 1-D integer ``(R,)``, int32 or int64, values already
  validated on the host when value checks are on; launchers must still never
  read out of bounds for a bad value (the contract of :mod:`gpuloss.rules`).
* ``weight``/``pos_weight``: ``None``, a 1-D ``(C,)`` vector in the
  accumulation dtype (broadcast over rows), or for the element-wise losses a
  2-D ``(R, C)`` array that the host already broadcast.

Arithmetic is float32 (float64 for float64 inputs: ``rules.acc_dtype_name``)
whatever the storage dtype; results are rounded once at the store.

Every loss launcher returns a :class:`LossResult`:

* ``loss``: in the accumulation dtype.  ``reduction="none"``: the unreduced
  loss (per row for the row-wise losses, ``(R, C)`` for element-wise ones).
  Otherwise a 0-d array on the same device: no host synchronisation.
* ``grad``: the gradient of the *returned* loss with respect to ``x`` (for
  ``"none"``: of the sum of the returned losses, i.e. an upstream gradient of
  ones), in ``x.dtype``, when ``want.grad``, else ``None``.  Ignored rows
  have zero gradient.  With ``opts.grad_inplace`` it is ``x`` itself.
* ``grad_target``: the gradient with respect to a floating ``target`` when
  ``want.grad_target``, else ``None``.
* ``lse``: the per-row log-sum-exp (after softcap) for the softmax-based
  losses, float32 ``(R,)`` (float64 inputs may give float64); ``None``
  elsewhere.

Reduction semantics are PyTorch's and are written out in
:mod:`gpuloss.reference`, the executable specification every backend is
tested against.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Tuple


class LossResult(NamedTuple):
    loss: Any
    grad: Any = None
    grad_target: Any = None
    lse: Any = None


class Backend:
    """Base class: a named set of launchers over one native array type.

    Subclasses define one method per op of :data:`gpuloss.ops.OPS` they
    support (with the signature above) and the availability and conversion
    methods below."""

    #: registry name ("numpy", "triton", "cupy")
    name: str = ""
    #: the array type the launchers take and return ("numpy", "torch", "cupy")
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
