"""How a public function's call runs once it is validated: the backend
chosen once (:func:`backend_for`), the op run on 2-D rows of the caller's
kind (:func:`run`: torch tensors through their custom operator, NumPy and
CuPy arrays through :func:`gpuloss.launch.run`), and the caller's result
formed (:func:`finish`).  Shared by :mod:`gpuloss.functional`; nothing here
validates arguments or knows an op's math."""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Union

import numpy as np

from . import _layout as L
from . import _validate as V
from . import launch
from .backends.base import LossResult
from .dispatch import select, select_name
from .errors import ArgumentTypeError, ArgumentValueError
from .ops import OPS, Want


class LossGrad(NamedTuple):
    """A loss and its gradients from one fused pass.

    loss:        the loss, reduced as asked, same kind/device/dtype as input
    grad:        d loss / d input (input's shape and dtype)
    grad_target: d loss / d target for floating targets with
                 ``return_grad="all"``, else None
    """
    loss: Any
    grad: Any
    grad_target: Any = None


# ---------------------------------------------------------------------------
# one pass down
# ---------------------------------------------------------------------------

def backend_for(kind: str, device: str, backend: Optional[str], op: Optional[str] = None, x=None, dim: int = -1):
    """The backend of this call, chosen once: its name for torch tensors (what
    the custom operators take; while torch.compile traces, the choice is made
    once outside the traced code, :func:`gpuloss.dispatch.select_name`), the
    instance for NumPy and CuPy arrays.  ``op`` and the row array ``x`` (rows
    along ``dim``) let the design table choose among the backends on a GPU."""
    # The design table only orders backends for CUDA arrays.  While dynamo
    # traces, sizes may be symbolic and the choice is a constant of the graph:
    # the fixed order then, whatever the row length.
    hint = {}
    if op is not None and x is not None and x.ndim and device.startswith("cuda") and not _compiling(kind):
        hint = dict(op=op, dtype=str(x.dtype).replace("torch.", ""), n_cols=x.shape[dim])
    if kind == "torch":
        return select_name(kind, device, backend, **hint)
    return select(kind, device, backend, **hint)


def _compiling(kind: str) -> bool:
    if kind != "torch":
        return False
    import torch
    return torch.compiler.is_compiling()


def wants(return_grad: Union[bool, str]):
    """(gradient wanted, target gradient wanted) from ``return_grad``: a bool
    or "all" (1, 1.0 or a tensor are refused: a typo, not a choice)."""
    if isinstance(return_grad, str):
        if return_grad != "all":
            raise ArgumentValueError(f"return_grad must be False, True or 'all', got {return_grad!r}")
        return True, True
    if not isinstance(return_grad, (bool, np.bool_)):
        raise ArgumentTypeError(f"return_grad must be False, True or 'all', got {type(return_grad).__name__}")
    return bool(return_grad), False


def deprecated_mean(reduction, stacklevel: int, like):
    """torch's old spelling of "mean" (``torch.nn._reduction.get_enum``)."""
    if isinstance(reduction, str) and reduction == "elementwise_mean":
        L.user_warning("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.", stacklevel,
                       like)
        return "mean"
    return reduction


def legacy_reduction(size_average, reduce, reduction: str, like, depth: int = 0) -> str:
    """PyTorch's deprecated ``size_average``/``reduce`` arguments, and its
    deprecated ``reduction="elementwise_mean"`` ("mean"), with its warnings,
    attributed to the caller of the public function (``depth``: frames
    between that function and this call)."""
    if size_average is None and reduce is None:
        return deprecated_mean(reduction, 4 + depth, like)
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "none" if not reduce else "mean" if size_average else "sum"
    L.user_warning(f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.",
                   3 + depth, like)
    return reduction


def run(op: str, kind: str, be, arrays: List[Any], opts: Any, return_grad=False):
    """Run ``op`` on 2-D row arrays of the caller's kind.  Losses give a
    :class:`LossResult` of caller-kind arrays (torch without ``return_grad``:
    only ``loss`` and ``lse``, the loss differentiable); softmax ops an array."""
    spec = OPS[op]
    if spec.want is None:
        if kind == "torch":
            from . import torch_ops
            if _eager(arrays):
                return torch_ops.call_differentiable(op, be, arrays, opts)
            return torch_ops.call(op, be, arrays, opts)
        return launch.run(be, op, arrays, opts, None, kind)
    if kind == "torch" and not return_grad:
        return autograd_run(op, be, arrays, opts)
    want_grad, want_all = wants(return_grad)
    target = arrays[1]
    if want_all and V.is_floating(target, kind) and not spec.target_grad:
        raise _no_target_grad(op)  # grad_target would silently come back None
    want = Want(want_grad, want_all and spec.target_grad and V.is_floating(target, kind))
    if kind != "torch":
        return launch.run(be, op, arrays, opts, want, kind)
    import torch
    from . import torch_ops
    inplace = bool(getattr(opts, "grad_inplace", False))
    with torch.no_grad():
        if _eager(arrays):
            # the operator's body without its dispatch: the same outputs, ~150 us less per call (on a GPU
            # more than a 32000-class row kernel takes, which the caller then waits for)
            outs = torch_ops.call_eager(op, be, arrays, opts, want, inplace=inplace)
        else:
            outs = torch_ops.call(op, be, arrays, opts, want, inplace=inplace)
    return result(op, outs, inplace, arrays[0])


def _eager(arrays) -> bool:
    """Plain tensors outside any tracing: no torch.compile, no dispatch mode
    (the stack counts torch's own fake and proxy modes too: make_fx, export),
    no torch.func transform, no tensor subclass or torch-function mode that
    would want to see the operator."""
    import torch
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() > 0:
        return False
    for a in arrays:
        # an nn.Parameter is a plain tensor to every operator (it disables __torch_function__)
        if a is not None and ((type(a) is not torch.Tensor and type(a) is not torch.nn.Parameter)
                              or torch._C._functorch.is_functorch_wrapped_tensor(a)):
            return False
    return True


def _no_target_grad(op: str) -> NotImplementedError:
    what = "teacher logits / target probabilities" if op == "kl_div_logits" else "target"
    return NotImplementedError(
        f"gpuloss {op}: the gradient with respect to the {what} is not supported (autograd, or "
        f"return_grad='all'); detach the target (target.detach()), use return_grad=True, or use an op that "
        f"differentiates it")


def autograd_run(op: str, be: str, arrays: List[Any], opts: Any) -> LossResult:
    """torch tensors: the loss differentiable into the input and, where the op
    gives that gradient, into a floating target."""
    import torch
    from . import torch_ops
    spec = OPS[op]
    x, target = arrays[0], arrays[1]
    grad_on = torch.is_grad_enabled()
    want = Want(grad_on and x.requires_grad,
                grad_on and target.requires_grad and target.is_floating_point())
    if want.grad_target and not spec.target_grad:
        raise _no_target_grad(op)
    eager = _eager(arrays)
    if getattr(opts, "grad_inplace", False) and want.grad:
        return result(op, torch_ops.call_inplace(op, be, arrays, opts, want, eager=eager), True, autograd=True)
    call = torch_ops.call_differentiable if eager else torch_ops.call
    return result(op, call(op, be, arrays, opts, want), False, autograd=True)


def result(op: str, outs, inplace: bool, x=None, autograd: bool = False) -> LossResult:
    """A custom operator's outputs as a LossResult: empty placeholders become
    None; an in-place operator returns no gradient (it is ``x``, which it
    wrote); under autograd only the loss and lse are the caller's."""
    spec = OPS[op]
    names = [o for o in spec.outputs if not (inplace and o == "grad")]
    vals = {n: (None if n != "loss" and tuple(t.shape) == (0,) else t) for n, t in zip(names, outs)}
    if autograd:
        return LossResult(vals["loss"], None, None, vals.get("lse"))
    return LossResult(vals["loss"], x if inplace else vals.get("grad"), vals.get("grad_target"), vals.get("lse"))


def finish(res: LossResult, return_grad, kind, input, layout, target_layout=None, loss_layout=None,
            target_like=None, inplace: bool = False, loss_dtype=None):
    """The caller's result: the loss in input's dtype (PyTorch's rule) or in
    ``loss_dtype``, cast once from the accumulation dtype; with
    ``return_grad``, the gradient in input's dtype and shape (written into
    ``input`` itself for ``inplace``) and the target gradient in target's."""
    loss = res.loss
    if loss_layout is not None:
        loss = L.from_rows(loss, kind, loss_layout)
    loss = L.cast_like(loss, input, kind) if loss_dtype is None else L.astype(loss, loss_dtype, kind)
    loss = L.as_array(loss, kind)
    if not return_grad:
        return loss
    grad = L.from_rows(res.grad, kind, layout)
    grad = L.write_back(grad, input, kind) if inplace else L.cast_like(grad, input, kind)
    gt = None
    if res.grad_target is not None:
        gt = L.from_rows(res.grad_target, kind, target_layout or layout)
        if target_like is not None:
            gt = L.cast_like(gt, target_like, kind)
    return LossGrad(loss, grad, gt)
