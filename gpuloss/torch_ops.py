"""PyTorch integration: every op of :data:`gpuloss.ops.OPS` as a
``torch.library`` custom operator (``torch.ops.gpuloss.<op>``), generated from
the table.

Each operator has

* an eager implementation that runs the op through :func:`gpuloss.launch.run`
  (zero-copy conversion to the backend's native arrays, the fused launcher,
  conversion back) and gives its outputs the dtypes, shapes and layouts the
  fake implementation promises;
* a fake (meta) implementation giving output shapes and dtypes without
  touching data, so ``torch.compile(..., fullgraph=True)`` traces straight
  through: no graph break, and no host synchronisation anywhere;
* an autograd formula.  Losses reuse the gradient their fused forward pass
  already computed: ``backward = saved_grad * grad_output``; the logits are
  never read again.

In eager code, plain tensors skip the dispatcher: :func:`call_eager` runs an
operator's body and :func:`call_differentiable` its autograd formula around
the body (:func:`_eager_function`), the same outputs and gradients for a
fraction of the host time.  torch.compile, dispatch and function modes,
torch.func transforms and tensor subclasses see the operators
(:func:`gpuloss._call._eager`).

Schema: the op's arrays (``Tensor``, ``Tensor?`` for optional ones), the
backend's name, the fields of its options record, then one ``want_*`` flag per
field of its ``want`` record.  Outputs are tensors; what was not asked for is
an empty placeholder (custom operators return tensors, not None).

Why the gradient is an *output* of the forward operator
------------------------------------------------------
A loss-only forward pass reads the ``N x C`` logits once; the fused pass reads
them once and writes ``dL/dx`` once (``PERF.md``: read N·V + write N·V), where
an unfused backward would read the logits a second time and write the
gradient.  So autograd saves the ``grad`` outputs and backward multiplies by
the upstream gradient: a 0-d tensor for reduced losses, a per-row (``(R,)``)
or per-element (``(R, C)``) tensor for ``reduction="none"``.  The
multiplication runs on the device: no ``.item()``, no Python branch on a
device value.

The gradient written over the logits
------------------------------------
Ops whose options have ``grad_inplace`` (cross-entropy) get a second operator,
``gpuloss::<op>_inplace``, declared with ``mutates_args=("x",)``: it writes
``dL/dx`` (computed in fp32, rounded once to the logits' dtype) over the
logits buffer, saving an ``N x C`` allocation (12 GiB at 16384 x 128256 bf16
in ``PERF.md``).  Backward scales that buffer in place by the upstream
gradient and hands it on.  The hazard: **the logits are consumed**:

* a leaf tensor that requires grad (a parameter) must not be passed, nor a
  view of one: we raise ``ValueError`` before touching it;
* the logits must not be needed by any other autograd node.  The operator
  bumps the tensor's version counter, so an op that saved the logits for its
  own backward raises PyTorch's "modified by an inplace operation"
  ``RuntimeError`` at backward time instead of silently using the gradient as
  its input; the common case, the op that *produced* the logits having saved
  its output (``tanh``, ``sigmoid``, ``exp``...), is detected up front and
  raises ``ValueError`` in the forward call;
* backward can run once per forward (it scales the buffer in place).

Mutable custom operators cannot carry a ``register_autograd`` formula, so the
in-place variant is wrapped in a ``torch.autograd.Function`` (which
``torch.compile`` also traces without a graph break).
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake as _is_fake

from . import _second_order as SO
from . import launch, rules
from .dispatch import get_backend
from .errors import ArgumentValueError
from .ops import OPS, OpSpec, Want

__all__ = ["call", "call_inplace"]

_SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}


# ---------------------------------------------------------------------------
# schema and argument packing, from the table
# ---------------------------------------------------------------------------

def _field_type(tp) -> str:
    if tp in _SCALARS:
        return _SCALARS[tp]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1 and args[0] in _SCALARS:
        return _SCALARS[args[0]] + "?"
    raise TypeError(f"no schema type for option type {tp!r}")


def _schema(spec: OpSpec, outputs: Sequence[str], mutated: Optional[str] = None) -> str:
    hints = typing.get_type_hints(spec.options)
    args = []
    for a in spec.arrays:
        t = "Tensor?" if a in spec.optional else ("Tensor(a!)" if a == mutated else "Tensor")
        args.append(f"{t} {a}")
    args.append("str backend")
    args += [f"{_field_type(hints[f.name])} {f.name}" for f in dataclasses.fields(spec.options)]
    if spec.want is not None:
        args += [f"bool want_{w}" for w in spec.want._fields]
    rets = ", ".join("Tensor" for _ in outputs)
    return f"({', '.join(args)}) -> " + (f"({rets})" if len(outputs) > 1 else rets)


def _pack(spec: OpSpec, backend: str, arrays: Sequence[Optional[Tensor]], opts: Any, want: Any) -> tuple:
    # field by field: dataclasses.astuple deep-copies, which dynamo in torch 2.11 does not trace
    fields = tuple(getattr(opts, f.name) for f in dataclasses.fields(opts))
    return (*arrays, backend, *fields, *(() if want is None else tuple(want)))


def _unpack(spec: OpSpec, args: tuple):
    n, k = len(spec.arrays), len(dataclasses.fields(spec.options))
    arrays, backend = args[:n], args[n]
    opts = spec.options(*args[n + 1:n + 1 + k])
    want = spec.want(*args[n + 1 + k:]) if spec.want is not None else None
    return list(arrays), backend, opts, want


# ---------------------------------------------------------------------------
# outputs: what the fake promises and the eager implementation delivers
# ---------------------------------------------------------------------------

def _acc_dtype(x: Tensor) -> torch.dtype:
    """Losses are float32 whatever the storage dtype, float64 for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _loss_shape(spec: OpSpec, reduction: str, arrays: Dict[str, Optional[Tensor]]) -> Tuple[int, ...]:
    """() for a reduced loss; per element, or one value per target row (the
    fused linear CE has one row per token and position)."""
    if reduction != "none":
        return ()
    if spec.loss_shape == "elem":
        return tuple(arrays[spec.arrays[0]].shape)
    return (arrays["target"].shape[0],)


def _output_meta(spec: OpSpec, name: str, arrays: Dict[str, Optional[Tensor]], opts: Any, want: Any):
    """(dtype, shape) of output ``name``; shape None means the empty
    placeholder of an output that was not asked for."""
    first = arrays[spec.arrays[0]]
    if name == "loss":
        return _acc_dtype(first), _loss_shape(spec, opts.reduction, arrays)
    if name == "lse":
        return torch.float32, (first.shape[0],)
    if name in ("y", "dx"):
        return first.dtype, tuple(first.shape)
    src = arrays.get(spec.grad_of(name))
    asked = getattr(want, name) if want is not None else True
    if src is None or not asked or (name == "grad_target" and not src.is_floating_point()):
        return (src if src is not None else first).dtype, None
    if spec.name == "linear_cross_entropy":  # saved for backward's scale (rules.saved_grad_dtype_name)
        rule = rules.saved_grad_hidden_dtype_name if name == "grad_hidden" else rules.saved_grad_dtype_name
        return getattr(torch, rule(str(src.dtype).replace("torch.", ""))), tuple(src.shape)
    return src.dtype, tuple(src.shape)


def _fake_outputs(spec: OpSpec, outputs: Sequence[str], arrays, opts, want) -> tuple:
    first = arrays[spec.arrays[0]]
    out = []
    for name in outputs:
        dtype, shape = _output_meta(spec, name, arrays, opts, want)
        out.append(first.new_empty((0,) if shape is None else shape, dtype=dtype))
    return tuple(out)


def _canonical(spec: OpSpec, outputs: Sequence[str], res, arrays, opts, want) -> tuple:
    """The launcher's results as the fake promised them: a backend may, e.g.,
    return float32 for a bfloat16 input it cannot represent."""
    first = arrays[spec.arrays[0]]
    if hasattr(res, "_asdict"):
        vals = res._asdict()
    else:
        vals = dict(zip(spec.outputs, res)) if isinstance(res, tuple) else {spec.outputs[0]: res}
    out = []
    for name in outputs:
        dtype, shape = _output_meta(spec, name, arrays, opts, want)
        t = vals.get(name)
        if shape is None or t is None:
            out.append(first.new_empty((0,), dtype=dtype))
        else:
            if t.dtype != dtype or t.device != first.device:
                t = t.to(device=first.device, dtype=dtype)
            if t.shape != shape:
                t = t.reshape(shape)
            if not t.is_contiguous():
                t = t.contiguous()
            # a view of a launcher's buffer (a reduced loss is often one) would
            # reach the caller as a view made inside the autograd function,
            # which torch forbids modifying in place (``loss += aux``): the
            # same storage, without the view bookkeeping
            out.append(t.detach() if t._is_view() else t)
    return tuple(out)


# ---------------------------------------------------------------------------
# operator generation
# ---------------------------------------------------------------------------

#: each operator's body on unpacked arguments (arrays, backend name, options,
#: want): what its dispatch runs after unpacking, and what :func:`call_eager` runs
_BODIES: Dict[str, Any] = {}


def _define(spec: OpSpec):
    """``gpuloss::<op>``: functional (never writes its inputs)."""
    outputs = spec.outputs

    def body(arrays, backend, opts, want):
        if spec.inplace and opts.grad_inplace:
            opts = dataclasses.replace(opts, grad_inplace=False)
        res = launch.run(get_backend(backend), spec.name, arrays, opts, want, "torch")
        return _canonical(spec, outputs, res, dict(zip(spec.arrays, arrays)), opts, want)

    def impl(*args):
        return body(*_unpack(spec, args))

    def fake(*args):
        arrays, _, opts, want = _unpack(spec, args)
        return _fake_outputs(spec, outputs, dict(zip(spec.arrays, arrays)), opts, want)

    _BODIES[spec.name] = _single(body, outputs)
    op = torch.library.custom_op(f"gpuloss::{spec.name}", mutates_args=(), schema=_schema(spec, outputs))(
        _single(impl, outputs))
    op.register_fake(_single(fake, outputs))
    return op


def _define_inplace(spec: OpSpec):
    """``gpuloss::<op>_inplace``: writes the gradient over the first array;
    returns the other outputs."""
    x_name = spec.arrays[0]
    outputs = tuple(o for o in spec.outputs if o != "grad")

    def body(arrays, backend, opts, want):
        if not opts.grad_inplace:
            opts = dataclasses.replace(opts, grad_inplace=True)
        if not want.grad:
            want = want._replace(grad=True)
        x = arrays[0]
        res = launch.run(get_backend(backend), spec.name, arrays, opts, want, "torch")
        g = res.grad
        # A backend that cannot write x's storage directly (NumPy with bfloat16
        # logits and no ml_dtypes computes on a float32 copy) hands back that copy: one rounding
        # copy into x.  Comparing data pointers is host metadata, not a sync.
        if g is not None and (g.device != x.device or g.data_ptr() != x.data_ptr() or g.dtype != x.dtype):
            x.copy_(g.reshape(x.shape))
        return _canonical(spec, outputs, res, dict(zip(spec.arrays, arrays)), opts, want)

    def impl(*args):
        return body(*_unpack(spec, args))

    def fake(*args):
        arrays, _, opts, want = _unpack(spec, args)
        return _fake_outputs(spec, outputs, dict(zip(spec.arrays, arrays)), opts, want)

    _BODIES[spec.name + "_inplace"] = _single(body, outputs)
    op = torch.library.custom_op(f"gpuloss::{spec.name}_inplace", mutates_args=(x_name,),
                                 schema=_schema(spec, outputs, mutated=x_name))(_single(impl, outputs))
    op.register_fake(_single(fake, outputs))
    return op


def _single(fn, outputs):
    """A one-output operator returns a Tensor, not a 1-tuple."""
    if len(outputs) > 1:
        return fn
    return lambda *args: fn(*args)[0]


# ---------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------

def traced(t: Tensor) -> bool:
    """Whether ``t``'s values are being traced rather than computed: under
    torch.compile, or by AOTAutograd without it (``torch.library.opcheck``,
    ``aot_function``), whose tensors are fake.  A backward must then not
    scale a saved forward output in place: functionalization would move the
    write into the forward graph's output, which depends on the upstream
    gradient ("Node mul was invalid, but is output")."""
    return torch.compiler.is_compiling() or _is_fake(t)


def scaled_grad(saved: Tensor, g: Tensor, inplace: bool = False, differentiable: bool = False) -> Tensor:
    """``saved * g``: a gradient the forward pass saved (``(R, C)``) times the
    loss's upstream gradient (0-d for reduced losses, ``(R,)`` per row,
    ``(R, C)`` per element), in ``saved``'s dtype.

    The product is formed in float32 and rounded once, as torch's own cast
    backward would give it (a float32 loss of bf16/fp16 logits: autocast,
    ``loss_dtype``): rounding ``g`` to a 16-bit dtype first would bias every
    element by the scale's rounding (up to 2**-9 in bf16) and turn a
    GradScaler scale of 65536 into inf in fp16.  Without an ``N x C``
    float32 temporary: a 0-d CPU ``g`` is a scalar to torch's CPU kernels,
    which multiply by its unrounded value in float32; any other ``g`` gets
    one dimension (a 0-d CUDA tensor would be rounded to ``saved``'s dtype:
    0-d tensors do not take part in type promotion) and the product of mixed
    dtypes is stored into a tensor of ``saved``'s dtype (in place: into
    ``saved`` itself), which a GPU kernel converts element by element and
    the CPU's through temporaries of its operands' size: on the CPU, a block
    of rows at a time.

    ``differentiable``: through operations autograd differentiates in ``g``
    (``create_graph=True``), as while torch.compile traces: no ``out=``
    tensor, no CPU blocks."""
    compiling = traced(saved) or differentiable
    cpu = saved.device.type == "cpu" and not compiling
    if g.dim() == 1 and saved.dim() == 2:
        g = g.unsqueeze(-1)
    elif g.dim() == 0:
        if cpu and g.device.type == "cpu":
            return saved.mul_(g) if inplace else saved * g
        g = g.reshape(1)
    if inplace and not (cpu and g.dtype != saved.dtype):
        return saved.mul_(g)
    if g.dtype == saved.dtype:
        return saved * g
    if compiling:
        return (saved * g).to(saved.dtype)  # one fused kernel once compiled
    out = saved if inplace else torch.empty_like(saved)
    if not cpu or saved.dim() == 0 or saved.numel() <= _CPU_MIXED_BLOCK:
        return torch.mul(saved, g, out=out)
    rows = max(1, _CPU_MIXED_BLOCK // max(1, saved[0].numel()))
    per_row = g.dim() == saved.dim() and g.shape[0] == saved.shape[0] and saved.shape[0] > 1
    for r0 in range(0, saved.shape[0], rows):
        torch.mul(saved[r0:r0 + rows], g[r0:r0 + rows] if per_row else g, out=out[r0:r0 + rows])
    return out


#: elements per block of scaled_grad's mixed-dtype product on the CPU (its temporaries' size)
_CPU_MIXED_BLOCK = 1 << 18


class _RowGradTerm(torch.autograd.Function):
    """Per row 0 in value; in gradient, ``a`` gets ``g[r] * coef[r, c]``
    (summed to ``a``'s shape where ``a`` broadcasts, as a class weight
    does): a term to add to a loss, giving ``a`` torch's gradient where the
    kernels give none.  A product with ``a - a.detach()`` would be NaN in
    value where ``a`` or ``coef`` is infinite (0 * inf); here an infinite or
    NaN slope reaches the gradient as it is, as torch's does, and the loss
    is untouched."""

    @staticmethod
    def forward(ctx, a: Tensor, coef: Tensor) -> Tensor:
        ctx.save_for_backward(coef)
        ctx.shape, ctx.dtype = tuple(a.shape), a.dtype
        return coef.new_zeros(coef.shape[:-1])

    @staticmethod
    def backward(ctx, g: Tensor):
        # coef is a constant to autograd: under create_graph=True a derivative of this gradient would
        # silently miss its dependence on the logits
        first_order("cross_entropy (the gradient of its class weight or probability targets)", ())
        (coef,) = ctx.saved_tensors
        ga = g.unsqueeze(-1) * coef
        if tuple(ga.shape) != ctx.shape:
            ga = ga.sum_to_size(ctx.shape)
        return ga.to(ctx.dtype), None


def row_grad_term(a: Tensor, coef: Tensor) -> Tensor:
    """See :class:`_RowGradTerm` (``coef`` carries no graph)."""
    return _RowGradTerm.apply(a, coef)


class _GradFactor(torch.autograd.Function):
    """``a`` in value; in gradient, the upstream gradient times ``factor`` (a
    power of two: exact), in float32 or wider as the upstream is."""

    @staticmethod
    def forward(ctx, a: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.factor, None


def grad_factor(a: Tensor, factor: float) -> Tensor:
    """See :class:`_GradFactor`."""
    return _GradFactor.apply(a, factor)


class SecondOrderError(RuntimeError):
    """A loss's gradient was asked for with ``create_graph=True``."""


def _second_order_refused(name: str, why: str, status: str = "are not available here"):
    raise SecondOrderError(
        f"gpuloss {name}: second derivatives {status}: its gradient was asked for with "
        f"create_graph=True (autograd.grad(..., create_graph=True), backward(create_graph=True), hvp, hessian, "
        f"gradgradcheck), and {why}; compute this loss with torch.nn.functional where higher-order gradients "
        f"are needed")


def first_order(name: str, grads):
    """``grads`` as backward returns them, for the backward formulas that have
    no second derivatives (the fused linear CE, a loss whose logits were
    consumed in place, the vocabulary-parallel losses; the others:
    :mod:`gpuloss._second_order`).  Under ``create_graph=True`` (grad
    mode on inside backward) this raises: their backward multiplies a
    gradient saved by the forward pass, which does not depend on the logits
    in autograd's eyes, so any derivative taken through it would silently
    miss the loss's curvature.  Marking the result and raising only when it
    is differentiated again is not enough: ``torch.autograd.grad(outer,
    params)`` runs only the nodes on a path to ``params``, and the marker's
    path does not lead there, so MAML-style outer gradients and gradient
    penalties came out silently first-order.  torch's own chunked linear
    cross-entropy supports no higher-order gradients either.  Nothing happens
    while torch.compile traces (it refuses double backward itself)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _second_order_refused(name, "any derivative of that gradient would miss the loss's curvature",
                              "are not implemented")
    return tuple(grads)


def _row_target_slots(spec: OpSpec) -> Optional[Tuple[int, int, int]]:
    """Positions of (target, reduction, ignore_index) in the operator's flat
    arguments (:func:`_pack`), for the ops that have all three; else None."""
    names = [f.name for f in dataclasses.fields(spec.options)]
    if "target" not in spec.arrays or "reduction" not in names or "ignore_index" not in names:
        return None
    n = len(spec.arrays) + 1  # the arrays, then the backend, then the options' fields
    return spec.arrays.index("target"), n + names.index("reduction"), n + names.index("ignore_index")


_ROW_TARGET_SLOTS = {s.name: _row_target_slots(s) for s in OPS.values()}


def _ignored_rows(spec: OpSpec, inputs) -> Tuple[Optional[int], Optional[Tensor]]:
    """(ignore_index, class-index targets) of a loss with class-index
    targets, whose backward must give an ignored row no gradient whatever its
    upstream gradient (:func:`kept_rows`); (None, None) otherwise.  ``inputs``:
    the operator's flat arguments (read in place: this runs on every call)."""
    slots = _ROW_TARGET_SLOTS[spec.name]
    if slots is None:
        return None, None
    t = inputs[slots[0]]
    if t is None or t.is_floating_point():
        return None, None
    return inputs[slots[2]], t


def no_zero_grads(ctx, outputs) -> None:
    """``outputs[0]`` is the loss; mark the others (the saved gradients, lse:
    what the loss's backward uses, never differentiated) non-differentiable,
    and have autograd pass None for their upstream gradients: by default it
    materialises a zero tensor of each one's shape in every backward, an
    ``N x C`` (the linear CE: ``V x H``) allocation and fill that the backward
    never reads.  The loss's own zero, where autograd has none for it, is
    :func:`loss_upstream`'s."""
    ctx.mark_non_differentiable(*outputs[1:])
    ctx.set_materialize_grads(False)
    loss = outputs[0]
    ctx.loss_like = (tuple(loss.shape), loss.dtype, loss.device)


def loss_upstream(ctx, g: Optional[Tensor]) -> Tensor:
    """The loss's upstream gradient, zeros where autograd passes None (an
    upstream node gave the loss no gradient): what autograd materialised
    before, so the inputs still get (zero) gradients, as DistributedDataParallel
    expects of every used parameter, and every rank of a vocabulary-parallel
    loss still joins backward's collectives."""
    if g is not None:
        return g
    shape, dtype, device = ctx.loss_like
    return torch.zeros(shape, dtype=dtype, device=device)


def kept_rows(g: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """The upstream gradient of each row, ignored rows 0: torch's nll_loss
    backward skips them, so a NaN or inf upstream (``loss / n`` with ``n =
    0``: transformers' ``num_items_in_batch`` of a step whose labels are all
    -100, or padding rows of a per-row loss) leaves their gradient 0, where
    the saved gradient (0) times it would be NaN.  ``g``: per row (a "none"
    loss; returned in its shape), or 0-d (a reduced loss, whose rows all take
    it; returned with one value per row of ``target``)."""
    if g.dim() == 0:
        return torch.where(target.reshape(-1) != ignore_index, g, 0)
    return torch.where(target.reshape(g.shape) != ignore_index, g, 0)


def ignored_rows_scale(g: Tensor, target: Tensor, ignore_index: int, grad: Tensor, by_row: bool) -> Tensor:
    """The scale of a fused linear CE's saved gradient ``grad`` for a reduced
    loss's 0-d upstream ``g`` (:func:`kept_rows`): grad_hidden (``by_row``)
    by row, ignored rows 0, where each row has one target; the sums over rows
    (weight, bias; grad_hidden of the K-dimensional form, whose rows have
    several) 0 where every target is ignored: they are then exactly 0, as
    torch's, where a NaN or inf upstream would make them NaN."""
    if by_row and target.numel() == grad[..., 0].numel():
        return kept_rows(g, target, ignore_index).reshape(*grad.shape[:-1], 1)
    return torch.where((target != ignore_index).any(), g, 0)


def stash_target(ctx, target: Optional[Tensor]) -> list:
    """``[target]`` for ``ctx.save_for_backward`` (none for None), read back by
    :func:`stashed_target`.  An inference tensor (targets from a data
    pipeline under torch.inference_mode) cannot be saved for backward; it is
    kept as a plain reference instead, which is safe: outside inference mode
    nothing can change it in place.  (dynamo cannot trace ``is_inference``;
    a compiled graph gets no inference tensors.)"""
    ctx.inference_target = None
    if target is not None and not torch.compiler.is_compiling() and target.is_inference():
        ctx.inference_target = target
        return []
    return [] if target is None else [target]


def stashed_target(ctx, saved: Sequence[Tensor]) -> Tensor:
    """The target :func:`stash_target` kept: its own, else ``saved[-1]``."""
    return ctx.inference_target if ctx.inference_target is not None else saved[-1]


def _constant_gradient(spec: OpSpec, inputs) -> bool:
    """Whether the loss is linear in every input it is differentiated in, so
    that the gradient its forward pass saved is the whole of its derivative
    and every higher one is zero: ``nll_loss`` (``-w[t] x[t]``, the weight
    never differentiable), and ``kl_div`` in ``input`` while its target is not
    differentiated (``t (log t - x)``).  Their backward then serves
    ``create_graph=True`` (MAML's outer step through ``log_softmax`` and
    ``nll_loss``, ``gradgradcheck``) with that gradient; the others form it
    again from their inputs (:mod:`gpuloss._second_order`)."""
    if spec.name == "nll_loss":
        return True
    if spec.name == "kl_div":
        target = inputs[spec.arrays.index("target")]
        return not (isinstance(target, Tensor) and target.requires_grad)
    return False


def _linked(grad: Tensor, x: Optional[Tensor]) -> Tensor:
    """``grad`` in value, and in autograd's graph of the input ``x`` it belongs
    to with derivative zero (a ``where`` that never takes ``x``: ``0 * x``
    would be NaN at an infinite log-probability)."""
    if x is None or not x.requires_grad:
        return grad
    return grad + torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x.reshape(grad.shape), 0)


def _loss_autograd(spec: OpSpec):
    """(backward, setup_context) of a loss: backward = saved gradient * upstream,
    for every gradient output."""
    grad_outputs = [i for i, o in enumerate(spec.outputs) if o.startswith("grad")]
    positions = [spec.arrays.index(spec.grad_of(spec.outputs[i])) for i in grad_outputs]
    n_arrays, n_options = len(spec.arrays), len(dataclasses.fields(spec.options))

    def setup(ctx, inputs, output):
        ctx.option_values = tuple(inputs[n_arrays + 1:n_arrays + 1 + n_options])
        saved = [output[i] for i in grad_outputs]
        # an asked-for gradient has its (2-D, non-empty) array's shape; the
        # placeholder is the 1-D empty tensor: a shape test, not a value read
        ctx.present = [tuple(s.shape) != (0,) for s in saved]
        ctx.n_inputs = len(inputs)
        ctx.ignore_index, target = _ignored_rows(spec, inputs)
        ctx.constant = _constant_gradient(spec, inputs)
        # for create_graph=True: plain references to the inputs (not saved tensors: a first-order backward
        # stays indifferent to a later in-place change of them), see gpuloss._second_order; of the constant
        # gradients, nll_loss's input, which its gradient joins with derivative zero, as torch's does
        if torch.compiler.is_compiling() or (ctx.constant and spec.name != "nll_loss"):
            ctx.kept = None
        else:
            ctx.kept = inputs[0] if ctx.constant else SO.keep(spec.name, inputs[:n_arrays])
        ctx.save_for_backward(*saved, *stash_target(ctx, target))
        no_zero_grads(ctx, output)

    def backward(ctx, g_loss, *unused):
        grads: List[Optional[Tensor]] = [None] * ctx.n_inputs
        g_loss = loss_upstream(ctx, g_loss)
        saved = ctx.saved_tensors
        first = not torch.is_grad_enabled() or torch.compiler.is_compiling()
        if ctx.ignore_index is not None and (first or g_loss.dim() > 0):
            g_loss = kept_rows(g_loss, stashed_target(ctx, saved), ctx.ignore_index)
        wanted = [(pos, s) for pos, present, s in zip(positions, ctx.present, saved)
                  if present and ctx.needs_input_grad[pos]]
        if first:
            # a backward that frees the graph scales the saved gradient in place: no second gradient-sized
            # buffer at the peak of backward (the saved one is never read again; autograd frees it now)
            keep = _keeps_graph()
            inplace = not keep and not any(traced(s) for _, s in wanted)
            for pos, s in wanted:
                grads[pos] = scaled_grad(s, g_loss, inplace=inplace)
            if not keep:  # as autograd frees saved tensors: a loss kept for logging keeps no inputs
                ctx.kept = None
            return tuple(grads)
        # create_graph=True
        if ctx.constant:  # the saved gradient is the whole derivative: a product differentiable in g_loss
            for pos, s in wanted:
                grads[pos] = _linked(scaled_grad(s, g_loss, differentiable=True), ctx.kept)
            return tuple(grads)
        if not isinstance(ctx.kept, tuple):
            _second_order_refused(spec.name, ctx.kept or "not implemented for this loss")
        opts = spec.options(*ctx.option_values)
        try:
            out = SO.grads(spec.name, ctx.kept, opts, [pos for pos, _ in wanted], g_loss)
        except SO.ChangedInPlace as e:
            _second_order_refused(spec.name, str(e))
        for (pos, s), g in zip(wanted, out):
            grads[pos] = torch.zeros_like(s) if g is None else g
        return tuple(grads)

    return backward, setup


def _softmax_setup(ctx, inputs, output) -> None:
    _, backend, log = inputs
    ctx.backend, ctx.log = backend, log
    ctx.save_for_backward(output)


def _softmax_bwd(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    # through the same backend op, itself differentiable (below): double backward works
    return torch.ops.gpuloss.softmax_backward(y, grad.contiguous(), ctx.backend, ctx.log), None, None


def _softmax_backward_setup(ctx, inputs, output) -> None:
    y, dy, backend, log = inputs
    ctx.backend, ctx.log = backend, log
    ctx.save_for_backward(y, dy)


def _softmax_backward_bwd(ctx, G: Tensor):
    """Derivatives of the backward formulas, for double backward.

    softmax: dx_j = y_j (dy_j - s), s = sum_k dy_k y_k.  With upstream G::

        d/d dy_k = y_k (G_k - sum_j G_j y_j)          (softmax_backward(y, G))
        d/d y_k  = G_k (dy_k - s) - dy_k sum_j G_j y_j

    log_softmax: dx_j = dy_j - exp(y_j) S, S = sum_k dy_k::

        d/d dy_k = G_k - sum_j G_j exp(y_j)
        d/d y_k  = -G_k exp(y_k) S
    """
    y, dy = ctx.saved_tensors
    G = G.contiguous()
    if ctx.log:
        ey = torch.exp(y)
        g_dy = G - (G * ey).sum(-1, keepdim=True)
        g_y = -G * ey * dy.sum(-1, keepdim=True)
    else:
        g_dy = torch.ops.gpuloss.softmax_backward(y, G, ctx.backend, False)
        gy = (G * y).sum(-1, keepdim=True)
        g_y = G * (dy - (dy * y).sum(-1, keepdim=True)) - dy * gy
    return g_y, g_dy, None, None


def _linear_setup(ctx, inputs, output) -> None:
    """Fused linear CE: "mean"/"sum" save the gradients the forward pass
    formed; "none" saves the inputs, since the per-token upstream gradient is
    only known in backward (which recomputes the logits chunk by chunk)."""
    spec = OPS["linear_cross_entropy"]
    arrays, backend, opts, _ = _unpack(spec, inputs)
    ctx.backend, ctx.opts, ctx.n_inputs = backend, opts, len(inputs)
    ctx.dtypes = [None if a is None else a.dtype for a in arrays[:3]]
    ctx.none = opts.reduction == "none"
    ctx.consumed = False
    target = arrays[spec.arrays.index("target")]
    # "mean"/"sum" with class-index targets: those too, for the ignored rows (ignored_rows_scale)
    ctx.rows = not ctx.none and not target.is_floating_point()
    kept = stash_target(ctx, target if ctx.rows else None)
    ctx.save_for_backward(*(arrays if ctx.none else list(output[1:4]) + kept))
    no_zero_grads(ctx, output)


def _linear_bwd(ctx, g_loss: Tensor, *unused):
    """"none": the chunk loop again with the per-token upstream gradient.
    "mean"/"sum": saved gradient * upstream, in place (so a second backward
    through the same graph raises) unless this backward keeps the graph
    (``retain_graph=True``: one gradient-sized allocation then, as torch's
    reference path), ``allow_retain_graph``, or while torch.compile traces
    (where the guard cannot hold, as in torch's own)."""
    first_order("linear_cross_entropy", ())  # before the saved gradients are scaled in place
    need = ctx.needs_input_grad[:3]
    grads: List[Optional[Tensor]] = [None] * ctx.n_inputs
    g_loss = loss_upstream(ctx, g_loss)
    if ctx.none:
        saved = list(ctx.saved_tensors)
        want = OPS["linear_cross_entropy_backward"].want(need[0], need[1], need[2] and saved[2] is not None)
        g_rows = g_loss.reshape(-1)
        t = saved[OPS["linear_cross_entropy"].arrays.index("target")]
        if not t.is_floating_point():  # class-index targets: ignored rows take no upstream gradient
            g_rows = kept_rows(g_rows, t, ctx.opts.ignore_index)
        out = call("linear_cross_entropy_backward", ctx.backend, saved + [g_rows], ctx.opts, want)
        grads[:3] = [g if n and g.shape != (0,) else None for g, n in zip(out, need)]
        return first_order("linear_cross_entropy", grads)
    if ctx.consumed:
        raise RuntimeError("linear_cross_entropy: trying to backward through the graph a second time; specify "
                           "retain_graph=True the first time (or allow_retain_graph=True): without it the saved "
                           "gradients are scaled in place by the upstream gradient, which saves one "
                           "gradient-sized allocation")
    saved = ctx.saved_tensors  # unpacked once: the loop scales them in place
    inplace = not ctx.opts.allow_retain_graph and not _keeps_graph() and not any(traced(g) for g in saved[:3])
    ctx.consumed = inplace
    for i, (g, n) in enumerate(zip(saved[:3], need)):
        if n and tuple(g.shape) != (0,):
            scale = ignored_rows_scale(g_loss, stashed_target(ctx, saved), ctx.opts.ignore_index, g, i == 0) \
                if ctx.rows else g_loss
            # float32 for float16 operands (see _output_meta): scaled, then rounded once
            grads[i] = scaled_grad(g, scale, inplace=inplace).to(ctx.dtypes[i])
    return first_order("linear_cross_entropy", grads)


def _keeps_graph() -> bool:
    """Whether the running backward was asked to keep the graph (``retain_graph``
    or ``create_graph``): then the saved tensors must come out of it unchanged."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(keep()) if keep is not None else True


#: the derivative formulas that are not "saved gradient * upstream"
_AUTOGRAD = {
    "linear_cross_entropy": (_linear_bwd, _linear_setup),
    "softmax_forward": (_softmax_bwd, _softmax_setup),
    "softmax_backward": (_softmax_backward_bwd, _softmax_backward_setup),
}

def _eager_function(spec: OpSpec, backward, setup):
    """What torch.library's autograd kernel runs for ``gpuloss::<op>``, an
    autograd Function with the operator's ``setup_context`` and ``backward``,
    whose forward calls the operator's body where that kernel redispatches to
    it: the same outputs, saved tensors and gradients, for plain tensors in
    eager code (:func:`call_differentiable`)."""
    body = _BODIES[spec.name]

    def forward(ctx, *args):
        out = body(*_unpack(spec, args))
        setup(ctx, args, out)
        return out

    return type(f"EagerFor_gpuloss_{spec.name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_OPS: Dict[str, Any] = {}
_INPLACE: Dict[str, Any] = {}
_EAGER: Dict[str, Any] = {}
for _spec in OPS.values():
    _OPS[_spec.name] = _define(_spec)
    if _spec.inplace:
        _INPLACE[_spec.name] = _define_inplace(_spec)
    _formulas = _AUTOGRAD.get(_spec.name) or (
        _loss_autograd(_spec) if _spec.is_loss and not _spec.composite else None)
    if _formulas is not None:
        _OPS[_spec.name].register_autograd(_formulas[0], setup_context=_formulas[1])
        _EAGER[_spec.name] = _eager_function(_spec, *_formulas)


_DTENSOR_SHARDING = False


def dtensor_sharding() -> None:
    """Give every operator its DTensor sharding rule, once DTensor is loaded
    (``torch.distributed.tensor``, whose import alone takes ~0.5 s, is never
    imported for this): DTensor inputs (tensor parallelism with
    ``use_local_output=False``, a replicated or batch-sharded DTensor)
    are redistributed to ``Replicate()`` and every output is ``Replicate()``,
    the same values as on the full tensors.  Without a rule DTensor raises
    "does not have a sharding strategy registered".  Runs at this module's
    import when DTensor is loaded already, else from :func:`call` (outside
    torch.compile); idempotent."""
    global _DTENSOR_SHARDING
    import sys
    if _DTENSOR_SHARDING or "torch.distributed.tensor" not in sys.modules:
        return
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.experimental import register_sharding
    for op in list(_OPS.values()) + list(_INPLACE.values()):
        overload = op._opoverload
        n_out = len(overload._schema.returns)

        def replicated(*args, _n_out=n_out, **kwargs):
            # tensors come as DTensor specs (placements and a mesh), other arguments as themselves
            return [([Replicate()] * _n_out, [Replicate() if hasattr(a, "placements") else None for a in args])]

        register_sharding(overload)(replicated)
    _DTENSOR_SHARDING = True


dtensor_sharding()


# ---------------------------------------------------------------------------
# calls from gpuloss.functional
# ---------------------------------------------------------------------------

def call(op: str, backend: str, arrays: Sequence[Optional[Tensor]], opts: Any, want: Any = None,
         inplace: bool = False):
    """``torch.ops.gpuloss.<op>`` on ``arrays``: differentiable, traceable.
    Returns the op's outputs (one tensor for the softmax ops).  ``inplace``:
    the raw ``<op>_inplace`` operator (no autograd: for ``return_grad``),
    which writes the gradient over ``arrays[0]`` and returns the rest."""
    if not _DTENSOR_SHARDING and not torch.compiler.is_compiling():
        dtensor_sharding()
    spec = OPS[op]
    return getattr(torch.ops.gpuloss, op + ("_inplace" if inplace else ""))(*_pack(spec, backend, arrays, opts, want))


def call_eager(op: str, backend: str, arrays: Sequence[Optional[Tensor]], opts: Any, want: Any = None,
               inplace: bool = False):
    """What :func:`call` returns, from the operator's own body without going
    through torch's dispatcher or its flat argument list (``return_grad`` on
    plain tensors in eager code; :func:`gpuloss._call._eager` decides).  The
    in-place operator's write bumps ``arrays[0]``'s version counter, as the
    dispatcher does for an argument the schema marks mutated: a node that
    saved the logits for its backward then raises instead of reading the
    gradient as its input."""
    spec = OPS[op]
    if spec.want is not None:  # the operator's own record, as its unpacking makes it
        want = spec.want(*(() if want is None else tuple(want)))
    outs = _BODIES[op + ("_inplace" if inplace else "")](list(arrays), backend, opts, want)
    if inplace:
        torch.autograd.graph.increment_version(arrays[0])
    return outs


def call_differentiable(op: str, backend: str, arrays: Sequence[Optional[Tensor]], opts: Any, want: Any = None):
    """What :func:`call` returns, differentiable as the operator is, for plain
    tensors in eager code (:func:`gpuloss._call._eager` decides): the
    operator's autograd formula around its body where an input requires grad
    (:func:`_eager_function`), else the body alone, as torch.library's
    autograd kernel chooses, without the dispatcher in between (~100 us per
    call on the CPU)."""
    if op in _EAGER and torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arrays):
        return _EAGER[op].apply(*_pack(OPS[op], backend, arrays, opts, want))
    return call_eager(op, backend, arrays, opts, want)


def call_inplace(op: str, backend: str, arrays: Sequence[Optional[Tensor]], opts: Any, want: Want,
                 eager: bool = False):
    """``gpuloss::<op>_inplace`` through its autograd Function: the gradient is
    written over ``arrays[0]`` now and scaled in place by backward.  ``eager``:
    the operator's body runs instead of the operator (:func:`call_eager`)."""
    _check_inplace_target(arrays[0])
    if not eager and not _DTENSOR_SHARDING and not torch.compiler.is_compiling():
        dtensor_sharding()
    return _InplaceFn.apply(op, backend, opts, want, eager, *arrays)


class _InplaceFn(torch.autograd.Function):
    """Autograd for the in-place operators: backward scales the first array's
    buffer (now holding dL/dx) in place and returns it."""

    @staticmethod
    def forward(ctx, op: str, backend: str, opts: Any, want: Want, eager: bool, *arrays):
        spec = OPS[op]
        packed = _pack(spec, backend, arrays, opts, want)
        if eager:
            outs = call_eager(op, backend, arrays, opts, want, inplace=True)
        else:
            outs = getattr(torch.ops.gpuloss, op + "_inplace")(*packed)
        x = arrays[0]
        names = [o for o in spec.outputs if o != "grad"]
        gt = outs[names.index("grad_target")] if "grad_target" in names else x.new_empty((0,))
        # x is saved *after* the write: its version now is the one backward
        # expects; any later in-place change to the buffer is caught on unpack
        ctx.ignore_index, target = _ignored_rows(spec, packed)
        ctx.save_for_backward(x, gt, *stash_target(ctx, target))
        ctx.want_gt = bool(want.grad_target)
        ctx.n, ctx.op = len(arrays), op
        no_zero_grads(ctx, outs)
        return outs

    @staticmethod
    def backward(ctx, g_loss: Optional[Tensor], *unused):
        g_loss = loss_upstream(ctx, g_loss)
        grad, gt = ctx.saved_tensors[:2]
        if ctx.ignore_index is not None:
            g_loss = kept_rows(g_loss, stashed_target(ctx, ctx.saved_tensors), ctx.ignore_index)
        # scale in place: the buffer is ours now and the gradient is handed on
        # without a second N x C allocation
        gx = scaled_grad(grad, g_loss, inplace=True) if ctx.needs_input_grad[5] else None
        gtt = scaled_grad(gt, g_loss) if (ctx.want_gt and ctx.needs_input_grad[6]) else None
        return first_order(ctx.op, (None,) * 5 + (gx, gtt) + (None,) * (ctx.n - 2))


_LEAF_MSG = ("inplace_backward=True would overwrite the logits with their gradient, but they are (a view of) "
             "a leaf tensor that requires grad, e.g. a parameter; pass the output of an operation (the logits "
             "of a model) or use inplace_backward=False")


def _check_inplace_target(x: Tensor) -> None:
    """Refuse to overwrite logits that autograd still needs (see the module
    docstring).  Host-side metadata only."""
    if traced(x):
        # Under torch.compile (and AOTAutograd without it: fake tensors, no
        # storage) the mutation is functionalized (no other node can observe
        # it) and dynamo cannot inspect grad_fn: only the leaf rule applies.
        if x.is_leaf and x.requires_grad:
            raise ArgumentValueError(_LEAF_MSG)
        return
    t: Optional[Tensor] = x
    while t is not None:
        if t.is_leaf and t.requires_grad:
            raise ArgumentValueError(_LEAF_MSG)
        t = t._base
    fn = x.grad_fn
    if fn is None:
        return
    storage = x.untyped_storage().data_ptr()
    for name in dir(fn):
        if not name.startswith("_saved_"):
            continue
        try:
            v = getattr(fn, name)
        except RuntimeError:
            continue
        if isinstance(v, Tensor) and v.untyped_storage().data_ptr() == storage:
            raise ArgumentValueError(
                f"inplace_backward=True would overwrite the logits, but {fn.name()} (the operation that "
                f"produced them) saved them for its own backward; its gradient would be computed from the "
                f"overwritten values.  Use inplace_backward=False here")
