"""The table of ops: each op declared once.

An op is what a backend implements as one primitive (a fused kernel launch,
or a chunk loop around one).  Its :class:`OpSpec` says

* ``arrays``: the primitive's array arguments, in order (``optional`` ones
  may be None);
* ``options``: a frozen, typed record of every other argument.  The public
  function builds it once, after validation, and the same record reaches the
  backend unchanged (through the torch custom op as its fields);
* ``outputs``: what the primitive returns;
* ``grads``: which arrays the op can differentiate (``"target"`` only when it
  is floating);
* ``loss_shape``: the loss's shape under ``reduction="none"``: one value per
  row (``"row"``) or per element (``"elem"``).

Everything that used to be listed by hand per op is derived from this table:
the torch custom operators, their fake (meta) implementations and autograd
formulas (:mod:`gpuloss.torch_ops`), which ops give a target gradient, the
backend method that runs each op (the op's name).  Adding an option to an op
means adding a field to its record, to the reference and to each backend's
kernel: nothing else.

This module imports nothing beyond the standard library.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, FrozenSet, NamedTuple, Optional, Tuple, Type

__all__ = [
    "OpSpec", "Want", "LinearWant", "OPS", "SoftmaxOptions", "CrossEntropyOptions", "NllOptions", "KlDivLogitsOptions",
    "KlDivOptions", "ReductionOptions", "LinearCEOptions", "spec", "option_fields",
]


# --------------------------------------------------------------------------
# option records
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SoftmaxOptions:
    """softmax (``log=False``) or log_softmax over the last axis."""
    log: bool = False


@dataclass(frozen=True)
class CrossEntropyOptions:
    """cross_entropy from logits; ``grad_inplace`` writes the gradient over
    the logits (their dtype, rounded once)."""
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    grad_inplace: bool = False


@dataclass(frozen=True)
class NllOptions:
    ignore_index: int = -100
    reduction: str = "mean"


@dataclass(frozen=True)
class KlDivLogitsOptions:
    """Row-wise ``KL(d || softmax(x / T))``; ``reduction`` may be "batchmean"."""
    temperature: float = 1.0
    target_is_logits: bool = True
    reduction: str = "batchmean"


@dataclass(frozen=True)
class KlDivOptions:
    """Element-wise kl_div on log-probabilities (``"batchmean"`` is applied
    by the public function as a "sum" divided by the batch size)."""
    log_target: bool = False
    reduction: str = "mean"


@dataclass(frozen=True)
class ReductionOptions:
    """The element-wise losses with nothing but a reduction.  ``grad_scale``:
    a factor on the gradients only, not on the loss (mse_loss's fp16 "mean"
    path saves ``x - y``, half its gradient, so that it overflows fp16 only
    past 65504: :func:`gpuloss.functional._elementwise`)."""
    reduction: str = "mean"
    grad_scale: float = 1.0


@dataclass(frozen=True)
class LinearCEOptions:
    """Fused ``cross_entropy(hidden @ weight.T + bias)`` in token chunks.

    ``num_classes``: C, the classes of one loss row; the weight has ``P C``
    rows for a K-dimensional loss of ``P`` positions per token, positions
    outermost.  ``chunk_size``: tokens per chunk (resolved by the public
    function);
    ``accumulate``: ``"float32"`` accumulates grad_weight / grad_bias across
    chunks in an fp32 buffer, ``"weight"`` in the weight's dtype inside the
    GEMM (``beta = 1``, one rounding per chunk), ``"split"`` grad_weight in
    float32 held as the bf16 gradient plus an int16 buffer of the low halves
    (bf16 weights on the Triton backend; else as ``"float32"``);
    ``allow_retain_graph``: backward scales the saved gradients out of place
    (so it may run twice) instead of in place; ``logits``: ``"input"`` forms
    each chunk's logits in the operands' dtype (``F.linear``'s), ``"float32"``
    in float32 from 16-bit operands (torch's chunked path with a float32
    ``acc_dtype``)."""
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    num_classes: int = 1
    chunk_size: int = 1
    accumulate: str = "float32"
    allow_retain_graph: bool = False
    logits: str = "input"


def option_fields(options: Type) -> Tuple[dataclasses.Field, ...]:
    return dataclasses.fields(options)


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------

class Want(NamedTuple):
    """Which gradients a loss call forms besides the loss: with respect to
    the input (``grad``) and to a floating target (``grad_target``)."""
    grad: bool = False
    grad_target: bool = False


class LinearWant(NamedTuple):
    """Which gradients the fused linear cross-entropy forms."""
    grad_hidden: bool = False
    grad_weight: bool = False
    grad_bias: bool = False


@dataclass(frozen=True)
class OpSpec:
    name: str
    arrays: Tuple[str, ...]
    options: Type
    outputs: Tuple[str, ...] = ("loss", "grad", "grad_target")
    optional: FrozenSet[str] = frozenset()
    grads: Tuple[str, ...] = ()
    loss_shape: str = "row"
    want: Optional[Type] = Want
    #: "module:function" of an op that is not one backend launcher but a loop
    #: around them (the fused linear cross-entropy), called with
    #: ``(backend, kind, arrays, opts, want)``
    composite: str = ""

    @property
    def is_loss(self) -> bool:
        return self.outputs[0] == "loss"

    @property
    def target_grad(self) -> bool:
        """Whether a floating target of this op can receive a gradient."""
        return "target" in self.grads

    @property
    def inplace(self) -> bool:
        """Whether the op has a variant that writes its gradient over its
        first array (its options have ``grad_inplace``)."""
        return any(f.name == "grad_inplace" for f in dataclasses.fields(self.options))

    def grad_of(self, output: str) -> str:
        """The array an output is the gradient of: "grad" is the first
        array's, "grad_<name>" array <name>'s."""
        return self.arrays[0] if output == "grad" else output[len("grad_"):]


_F = frozenset
_LINEAR = ("hidden", "weight", "bias", "target", "class_weight")

OPS: Dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("softmax_forward", ("x",), SoftmaxOptions, ("y",), grads=("x",), loss_shape="same", want=None),
    OpSpec("softmax_backward", ("y", "dy"), SoftmaxOptions, ("dx",), grads=("y", "dy"), loss_shape="same",
           want=None),
    OpSpec("cross_entropy", ("x", "target", "weight"), CrossEntropyOptions, ("loss", "grad", "grad_target", "lse"),
           optional=_F({"weight"}), grads=("x", "target")),
    OpSpec("nll_loss", ("logp", "target", "weight"), NllOptions, ("loss", "grad"), optional=_F({"weight"}),
           grads=("logp",)),
    OpSpec("kl_div_logits", ("x", "target"), KlDivLogitsOptions, ("loss", "grad"), grads=("x",)),
    OpSpec("kl_div", ("input", "target"), KlDivOptions, grads=("input", "target"), loss_shape="elem"),
    OpSpec("bce_with_logits", ("x", "target", "weight", "pos_weight"), ReductionOptions,
           optional=_F({"weight", "pos_weight"}), grads=("x", "target"), loss_shape="elem"),
    OpSpec("bce", ("p", "target", "weight"), ReductionOptions, optional=_F({"weight"}), grads=("p", "target"),
           loss_shape="elem"),
    OpSpec("mse", ("x", "target"), ReductionOptions, grads=("x", "target"), loss_shape="elem"),
    OpSpec("linear_cross_entropy", _LINEAR, LinearCEOptions,
           ("loss", "grad_hidden", "grad_weight", "grad_bias"), optional=_F({"bias", "class_weight"}),
           grads=("hidden", "weight", "bias"), want=LinearWant, composite="gpuloss._linear_chunks:forward"),
    # backward of reduction="none": the per-token upstream gradient is known only then
    OpSpec("linear_cross_entropy_backward", _LINEAR + ("row_grad",), LinearCEOptions,
           ("grad_hidden", "grad_weight", "grad_bias"), optional=_F({"bias", "class_weight"}), want=LinearWant,
           composite="gpuloss._linear_chunks:backward"),
)}


def spec(name: str) -> OpSpec:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; ops: {', '.join(OPS)}") from None
