"""The public functions: PyTorch's names, arguments and defaults, for NumPy
arrays, CuPy arrays and torch tensors alike.

Every call follows the same path:

1. find the arrays' kind (NumPy / CuPy / torch) and device; mixed kinds or
   devices are an error;
2. validate every argument before any work (:mod:`gpuloss._validate`);
3. move the class dimension last and flatten to 2-D rows (views where
   possible);
4. pick a backend (:mod:`gpuloss.dispatch`) and run its fused primitive;
5. give back the same kind of array, on the same device, shaped as PyTorch
   shapes it.

Gradients without autograd
--------------------------
NumPy and CuPy arrays have no autograd, so every loss takes
``return_grad``: with ``return_grad=True`` it returns a :class:`LossGrad`
``(loss, grad, grad_target)`` whose ``grad`` is the gradient of the returned
loss with respect to ``input``, computed in the same fused pass as the loss
(for ``reduction="none"``, the gradient of the sum of the per-element losses).
``return_grad="all"`` also fills ``grad_target`` for floating targets
(probability targets, BCE/MSE/KL targets); it is ``None`` otherwise.  Scale by
your own upstream gradient if it is not one.  softmax and log_softmax have
:func:`softmax_backward` and :func:`log_softmax_backward`.

torch tensors get the same ``return_grad`` form, and additionally, without
``return_grad``, a loss that backpropagates through autograd (the gradient
computed in the forward pass is saved and reused by backward).
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from . import _validate as V
from ._arrays import classify, dtype_name
from .backends.base import LossResult
from .dispatch import select, select_name


class _Named(NamedTuple):
    """A backend known by name only (torch.compile tracing: see _select)."""
    name: str


def _select(kind: str, device: str, backend: Optional[str]):
    """The backend for this call.  While torch.compile traces, only its name
    is needed (torch_ops.apply runs it inside a custom op) and the choice is
    made once, outside the traced code (dispatch.select_name)."""
    if kind == "torch" and sys.modules["torch"].compiler.is_compiling():
        return _Named(select_name(kind, device, backend))
    return select(kind, device, backend)

__all__ = [
    "LossGrad", "softmax", "log_softmax", "softmax_backward", "log_softmax_backward",
    "cross_entropy", "nll_loss", "kl_div", "kl_div_with_logits",
    "binary_cross_entropy_with_logits", "binary_cross_entropy", "mse_loss",
]


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
# array-library glue (the caller's kind, before conversion to native arrays)
# ---------------------------------------------------------------------------

def _xp(kind: str):
    if kind == "numpy":
        return np
    if kind == "cupy":
        return sys.modules["cupy"]
    return None


def _movedim(a, kind: str, src: int, dst: int):
    if kind == "torch":
        return a.movedim(src, dst)
    return _xp(kind).moveaxis(a, src, dst)


def _unit_last_stride(a, kind: str):
    """``a`` itself when its last axis has unit stride, else a contiguous copy
    (the kernels take any row stride but need unit stride inside a row)."""
    if a.ndim == 0:
        return a
    if kind == "torch":
        return a if (a.stride(-1) == 1 or a.shape[-1] <= 1) else a.contiguous()
    if a.strides[-1] == a.itemsize or a.shape[-1] <= 1:
        return a
    return _xp(kind).ascontiguousarray(a)


def _rows2d(a, kind: str, class_dim: int):
    """(R, C) rows with ``class_dim`` last, and how to undo it for a tensor
    of the same shape as ``a``."""
    nd = a.ndim
    if nd == 0:
        return a.reshape(1, 1), ("0d", a.shape)
    cd = class_dim % nd
    moved = a if cd == nd - 1 else _movedim(a, kind, cd, -1)
    C = moved.shape[-1]
    if nd == 2:
        rows = moved
    else:  # the row count given explicitly: reshape(-1, 0) is ambiguous
        rows = moved.reshape(math.prod(moved.shape[:-1]), C)
    return _unit_last_stride(rows, kind), ("nd", moved.shape, cd)


def _from_rows(rows, kind: str, layout):
    if rows is None:
        return None
    if layout[0] == "0d":
        return rows.reshape(layout[1])
    _, moved_shape, cd = layout
    out = rows.reshape(moved_shape)
    nd = len(moved_shape)
    return out if cd == nd - 1 else _movedim(out, kind, -1, cd)


def _cast_like(a, like, kind: str):
    """Loss values come back in float32 (float64 for float64 inputs); PyTorch
    returns the input's dtype."""
    if a is None:
        return None
    if kind == "torch":
        return a if a.dtype == like.dtype else a.to(like.dtype)
    return a if a.dtype == like.dtype else a.astype(like.dtype)


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    """PyTorch's deprecated ``size_average``/``reduce`` arguments."""
    if size_average is None and reduce is None:
        return reduction
    warnings.warn("size_average and reduce are deprecated, use reduction instead", UserWarning, stacklevel=3)
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def _wants(return_grad: Union[bool, str]):
    if return_grad not in (False, True, "all"):
        raise ValueError(f"return_grad must be False, True or 'all', got {return_grad!r}")
    return bool(return_grad), return_grad == "all"


def _run(kind: str, be, op: str, arrays: dict, opts: dict, return_grad, floating_target: bool):
    """Run primitive ``op``.  Returns a LossResult of caller-kind arrays
    (2-D row layout)."""
    want_grad, want_gt = _wants(return_grad)
    want_gt = want_gt and floating_target
    if kind == "torch" and not return_grad:
        from . import torch_ops  # autograd path; imports torch (already imported by the caller)
        return torch_ops.apply(be.name, op, arrays, opts)
    if isinstance(be, _Named):  # return_grad while torch.compile traces: the real backend (graph break)
        from .dispatch import get_backend
        be = get_backend(be.name)
    kw = dict(opts)
    kw["want_grad"] = want_grad
    if op in ("cross_entropy", "kl_div", "bce_with_logits", "bce", "mse"):
        kw["want_grad_target"] = want_gt
    with _call_context(kind, be, arrays):
        native = {k: (None if v is None else be.to_native(v, kind)) for k, v in arrays.items()}
        res = getattr(be, op)(**native, **kw)
        conv = lambda a: None if a is None else be.from_native(a, kind)  # noqa: E731
        return LossResult(conv(res.loss), conv(res.grad), conv(res.grad_target), conv(res.lse))


def _call_context(kind: str, be, arrays: dict):
    """torch tensors: no autograd recording, and a CuPy backend runs (and
    converts through DLPack) on torch's current stream, so its work is ordered
    with torch's and can be captured in a CUDA graph."""
    if kind != "torch":
        return contextlib.nullcontext()
    import torch
    from .torch_ops import _native_stream
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(_native_stream(be, next(v for v in arrays.values() if v is not None)))
    return stack


def _same_layout(a, b, kind: str) -> bool:
    """Whether ``a`` and ``b`` (of one shape) are the same elements of the
    same memory (strides of size-1 dimensions do not matter)."""
    if a.dtype != b.dtype:
        return False
    if kind == "torch":
        pa, pb, sa, sb = a.data_ptr(), b.data_ptr(), a.stride(), b.stride()
    else:
        ptr = (lambda v: v.__array_interface__["data"][0]) if kind == "numpy" else (lambda v: v.data.ptr)
        pa, pb, sa, sb = ptr(a), ptr(b), a.strides, b.strides
    return pa == pb and all(x == y for x, y, n in zip(sa, sb, a.shape) if n > 1)


def _write_back(grad, input, kind: str):
    """``inplace_backward``: the gradient must end up in ``input``'s memory.
    A backend works on rows that are a view of ``input`` where it can; where
    they were a copy (class dimension not last, strided columns, bfloat16 on
    the NumPy backend) the gradient is copied (and rounded) into ``input``."""
    if grad is None or _same_layout(grad, input, kind):
        return input
    if kind == "torch":
        input.copy_(grad)
    else:
        _xp(kind).copyto(input, grad, casting="unsafe")
    return input


def _finish(res: LossResult, return_grad, kind, input, layout, target_layout=None, loss_layout=None,
            target_like=None, inplace: bool = False):
    """The caller's result: the loss in input's dtype (PyTorch's rule); with
    ``return_grad``, the gradient in input's dtype and shape (written into
    ``input`` itself for ``inplace``) and the target gradient in target's."""
    loss = res.loss
    if loss_layout is not None:
        loss = _from_rows(loss, kind, loss_layout)
    loss = _cast_like(loss, input, kind)
    if not return_grad:
        return loss
    grad = _from_rows(res.grad, kind, layout)
    grad = _write_back(grad, input, kind) if inplace else _cast_like(grad, input, kind)
    gt = None
    if res.grad_target is not None:
        gt = _from_rows(res.grad_target, kind, target_layout or layout)
        if target_like is not None:
            gt = _cast_like(gt, target_like, kind)
    return LossGrad(loss, grad, gt)


# ---------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------

def _cast_dtype(input, dtype, kind: str):
    """torch's ``dtype=`` of softmax/log_softmax: ``input`` cast to a
    floating ``dtype`` before the op (a torch.dtype for tensors; a NumPy
    dtype or its name for NumPy and CuPy arrays)."""
    if dtype is None:
        return input
    if kind == "torch":
        import torch
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype for a torch.Tensor input, got {type(dtype).__name__}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        return input.to(dtype)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy dtype or its name, got {dtype!r}") from None
    if dt.kind != "f":
        raise TypeError(f"dtype must be a floating-point dtype, got {dt}")
    return input.astype(dt, copy=False)


def _softmax_common(input, dim, dtype, backend, log: bool):
    kind, device = classify([("input", input)])
    input = _cast_dtype(input, dtype, kind)
    V.check_floating("input", input, kind)
    V.check_dim("dim", dim, input.ndim)
    be = _select(kind, device, backend)
    if _numel(input, kind) == 0:  # nothing to normalise: an empty result, as torch
        return input.clone() if kind == "torch" else _xp(kind).empty_like(input)  # clone: keeps autograd
    rows, layout = _rows2d(input, kind, dim)
    if kind == "torch":
        from . import torch_ops
        y = torch_ops.apply(be.name, "softmax_forward", {"x": rows}, {"log": log})
    else:
        y = be.from_native(be.softmax_forward(be.to_native(rows, kind), log=log), kind)
    return _from_rows(y, kind, layout)


def softmax(input, dim: int = -1, *, dtype=None, backend: Optional[str] = None):
    """softmax along ``dim``: ``exp(x_i) / sum_k exp(x_k)``, computed as
    ``exp(x_i - max) / sum exp(x_k - max)`` in float32 (float64 for float64).

    Parameters
    ----------
    input : array (NumPy, CuPy or torch), floating, any shape
    dim : the dimension to normalise (default: the last, unlike torch's
        implicit-dim warning path)
    dtype : as torch's: cast ``input`` to this floating dtype first (and
        return that dtype)
    backend : "numpy" | "triton" | "cupy" | None (automatic)
    """
    return _softmax_common(input, dim, dtype, backend, log=False)


def log_softmax(input, dim: int = -1, *, dtype=None, backend: Optional[str] = None):
    """log_softmax along ``dim``: ``x_i - logsumexp(x)``; ``dtype`` as in :func:`softmax`."""
    return _softmax_common(input, dim, dtype, backend, log=True)


def _softmax_bwd_common(grad_output, output, dim, backend, log: bool):
    kind, device = classify([("grad_output", grad_output), ("output", output)])
    V.check_floating("output", output, kind)
    V.check_floating("grad_output", grad_output, kind)
    V.check_same_shape("grad_output", grad_output, "output", output)
    V.check_dim("dim", dim, output.ndim)
    be = _select(kind, device, backend)
    if _numel(output, kind) == 0:
        return grad_output * output  # empty, and connected to autograd for torch
    y, layout = _rows2d(output, kind, dim)
    dy, _ = _rows2d(grad_output, kind, dim)
    if kind == "torch":
        from . import torch_ops
        dx = torch_ops.apply(be.name, "softmax_backward", {"y": y, "dy": dy}, {"log": log})
    else:
        dx = be.from_native(be.softmax_backward(be.to_native(y, kind), be.to_native(dy, kind), log=log), kind)
    return _from_rows(dx, kind, layout)


def softmax_backward(grad_output, output, dim: int = -1, *, backend: Optional[str] = None):
    """Gradient of softmax w.r.t. its input, from its output ``y`` and the
    upstream gradient ``dy``: ``y * (dy - sum(dy * y))`` along ``dim``."""
    return _softmax_bwd_common(grad_output, output, dim, backend, log=False)


def log_softmax_backward(grad_output, output, dim: int = -1, *, backend: Optional[str] = None):
    """Gradient of log_softmax w.r.t. its input: ``dy - exp(y) * sum(dy)``."""
    return _softmax_bwd_common(grad_output, output, dim, backend, log=True)


# ---------------------------------------------------------------------------
# cross-entropy and NLL
# ---------------------------------------------------------------------------

def _class_dim_call(input, target, weight, size_average, reduce, reduction: str, ignore_index):
    """The checks cross_entropy and nll_loss share: (reduction, kind, device,
    C, ignore_index) for logits with the class dimension 1 ((C,) unbatched)."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    kind, device = classify([("input", input), ("target", target), ("weight", weight)], optional=("weight",))
    V.check_reduction(reduction)
    V.check_floating("input", input, kind)
    if input.ndim == 0:
        raise ValueError("input must have at least 1 dimension (C,), got a 0-d array")
    ignore_index = V.check_ignore_index("ignore_index", ignore_index)
    C = input.shape[1] if input.ndim >= 2 else input.shape[0]
    return reduction, kind, device, C, ignore_index


def _row_loss_shape(input) -> tuple:
    """The shape of a per-sample class-dimension loss: input without dim 1."""
    return tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.ndim >= 2 else ()


def _empty_class_loss(kind, input, target, prob: bool, ignore_index: int, eps: float, reduction: str,
                      return_grad):
    """cross_entropy / nll_loss when the logits hold no element (no rows, or
    C = 0), as torch gives it: a row's loss is 0 when its target is ignored,
    NaN otherwise (no class can match it), NaN for every row with label
    smoothing (``eps / C`` is infinite), 0 for a probability target (an empty
    sum); "sum" adds the rows, "mean" is NaN (a zero divisor).  Gradients are
    zeros of input's (and target's) shape.  torch tensors stay connected to
    autograd, so ``backward()`` gives those zero gradients."""
    shape = _row_loss_shape(input)
    nan = float("nan")
    if kind == "torch":
        import torch
        rows = torch.zeros(shape, dtype=input.dtype, device=input.device)
        if not prob:
            rows = rows.masked_fill(target.reshape(shape) != ignore_index, nan)
        if eps > 0 and not prob:
            rows = rows.fill_(nan)
    else:
        xp = _xp(kind)
        rows = xp.zeros(shape, dtype=input.dtype)
        if not prob:
            rows[...] = xp.where(target.reshape(shape) != ignore_index, nan, 0.0)
        if eps > 0 and not prob:
            rows[...] = nan
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() * nan
    if kind == "torch":
        loss = loss.to(input.dtype) + input.sum() * 0
        if prob and target.requires_grad:
            loss = loss + target.sum() * 0
    else:
        loss = _xp(kind).asarray(loss, dtype=input.dtype)
    if not return_grad:
        return loss
    zeros = (lambda a: a.new_zeros(a.shape)) if kind == "torch" else (lambda a: _xp(kind).zeros_like(a))
    gt = zeros(target) if (prob and return_grad == "all") else None
    return LossGrad(loss, zeros(input), gt)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, inplace_backward: bool = False,
                  return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Cross-entropy from logits, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    input : (C,), (N, C) or (N, C, d1, ...) floating logits
    target : class indices, integer, of shape (), (N,) or (N, d1, ...); or
        class probabilities, floating, of input's shape
    weight : optional (C,) class weights
    ignore_index : class-index targets equal to it contribute nothing (an
        int; anything else is a TypeError, as in torch)
    reduction : "none" | "mean" | "sum"
    label_smoothing : in [0, 1]
    z_loss : adds ``z_loss * logsumexp(z)**2`` per (non-ignored) row (PaLM)
    softcap : if set, logits become ``softcap * tanh(z / softcap)`` first (Gemma 2)
    inplace_backward : write the gradient over ``input`` (saves N x C memory;
        the logits are consumed).  ``input`` must be writable with no two
        elements sharing memory.
    return_grad : see the module docstring
    backend : "numpy" | "triton" | "cupy" | None

    The math is written out in :func:`gpuloss.reference.cross_entropy`.  An
    empty batch or an all-ignored batch gives nan for "mean", as PyTorch.
    """
    reduction, kind, device, C, ignore_index = _class_dim_call(input, target, weight, size_average, reduce,
                                                              reduction, ignore_index)
    prob = V.check_ce_target("target", target, kind, input)
    V.check_weight("weight", weight, kind, C)
    V.check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    V.check_finite_number("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    V.check_positive_or_none("softcap", softcap)
    V.check_bool("inplace_backward", inplace_backward)
    _wants(return_grad)
    if inplace_backward:
        V.check_inplace_ok("input", input, kind, return_grad)
    if not prob:
        target = V.as_index_target(target, kind)
        V.check_class_targets("target", target, kind, C, ignore_index)
    be = _select(kind, device, backend)
    if _numel(input, kind) == 0:
        return _empty_class_loss(kind, input, target, prob, ignore_index, float(label_smoothing), reduction,
                                 return_grad)
    if input.ndim == 1:  # one unbatched row
        rows, layout = input.reshape(1, C), ("0d", (C,))
        t_rows = target.reshape(1, C) if prob else target.reshape(1)
    else:
        rows, layout = _rows2d(input, kind, 1)
        t_rows = _rows2d(target, kind, 1)[0] if prob else target.reshape(-1)
    w = None if weight is None else V.as_float_vector(weight, kind, input)
    opts = dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                softcap=None if softcap is None else float(softcap), reduction=reduction,
                grad_inplace=bool(inplace_backward))
    res = _run(kind, be, "cross_entropy", {"x": rows, "target": t_rows, "weight": w}, opts, return_grad, prob)
    if reduction == "none":
        res = res._replace(loss=res.loss.reshape(_row_loss_shape(input)))
    return _finish(res, return_grad, kind, input, layout, target_like=target if prob else None,
                   inplace=bool(inplace_backward))


def _numel(a, kind: str) -> int:
    return a.numel() if kind == "torch" else a.size


def nll_loss(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
             reduction: str = "mean", *, return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Negative log-likelihood on log-probabilities, as
    ``torch.nn.functional.nll_loss``: ``loss_i = -weight[t_i] * input[i, t_i]``;
    "mean" divides by the sum of the weights of the non-ignored targets."""
    reduction, kind, device, C, ignore_index = _class_dim_call(input, target, weight, size_average, reduce,
                                                              reduction, ignore_index)
    V.check_index_target("target", target, kind, input)
    V.check_weight("weight", weight, kind, C)
    _wants(return_grad)
    target = V.as_index_target(target, kind)
    V.check_class_targets("target", target, kind, C, ignore_index)
    be = _select(kind, device, backend)
    if _numel(input, kind) == 0:
        return _empty_class_loss(kind, input, target, False, ignore_index, 0.0, reduction, return_grad)
    rows, layout = _rows2d(input, kind, 1) if input.ndim >= 2 else (input.reshape(1, C), ("0d", (C,)))
    w = None if weight is None else V.as_float_vector(weight, kind, input)
    res = _run(kind, be, "nll_loss", {"logp": rows, "target": target.reshape(-1), "weight": w},
               dict(ignore_index=ignore_index, reduction=reduction), return_grad, False)
    if reduction == "none":
        res = res._replace(loss=res.loss.reshape(_row_loss_shape(input)))
    return _finish(res, return_grad, kind, input, layout)


# ---------------------------------------------------------------------------
# KL divergence
# ---------------------------------------------------------------------------

def kl_div(input, target, size_average=None, reduce=None, reduction: str = "mean", log_target: bool = False,
           *, return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """KL divergence as ``torch.nn.functional.kl_div``: ``input`` holds
    log-probabilities; element-wise ``target * (log target - input)``
    (``exp(target) * (target - input)`` with ``log_target``).  Reductions
    "none", "mean" (over elements), "sum", "batchmean" (sum / input.shape[0]).
    input and target broadcast against each other, as in torch."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    V.check_bool("log_target", log_target)
    return _elementwise("kl_div", input, target, reduction, return_grad, backend,
                        dict(log_target=bool(log_target)), {}, broadcast=True, kl=True)


def _batchmean(res: LossResult, n: int, kind: str) -> LossResult:
    """Turn a "sum" result into "batchmean" (sum / n) without a host sync."""
    inv = 1.0 / n if n else float("nan")
    scale = lambda a: None if a is None else a * inv  # noqa: E731
    return LossResult(scale(res.loss), scale(res.grad) if res.grad is not None else None,
                      scale(res.grad_target), res.lse)


def kl_div_with_logits(input, target, temperature: float = 1.0, reduction: str = "batchmean",
                       target_is_logits: bool = True, *, return_grad: Union[bool, str] = False,
                       backend: Optional[str] = None):
    """The lecture's divergence for distillation, from logits, per row along
    the last dimension: ``KL(d || softmax(input / T))`` with
    ``d = softmax(target / T)`` (teacher logits) or ``d = target``
    (probabilities).  Gradient w.r.t. input: ``(softmax(input / T) - d) / T``.

    reduction: "batchmean" (sum / number of rows; PyTorch's batchmean for
    2-D inputs), "sum", "mean" (sum / elements), "none" (one value per row).
    No ``T**2`` factor is applied."""
    kind, device = classify([("input", input), ("target", target)])
    V.check_reduction(reduction, kl=True)
    V.check_floating("input", input, kind)
    V.check_floating("target", target, kind)
    V.check_same_shape("input", input, "target", target)
    V.check_positive("temperature", temperature)
    V.check_bool("target_is_logits", target_is_logits)
    if input.ndim == 0:
        raise ValueError("input must have at least 1 dimension, got a 0-d array")
    be = _select(kind, device, backend)
    x, layout = _rows2d(input, kind, -1)
    t, _ = _rows2d(target, kind, -1)
    res = _run(kind, be, "kl_div_logits", {"x": x, "target": t},
               dict(temperature=float(temperature), target_is_logits=bool(target_is_logits),
                    reduction=reduction), return_grad, False)
    if reduction == "none":
        res = res._replace(loss=res.loss.reshape(input.shape[:-1]))
    return _finish(res, return_grad, kind, input, layout)


# ---------------------------------------------------------------------------
# element-wise losses
# ---------------------------------------------------------------------------

def _broadcast_pair(input, target, kind: str, warn: bool):
    """``(input, target, shape)`` expanded to their common shape, as torch's
    ``mse_loss`` and ``kl_div`` broadcast them (``mse_loss`` with torch's
    warning when the sizes differ); ``shape`` is None when they already
    agree.  Views, no copies."""
    if tuple(input.shape) == tuple(target.shape):
        return input, target, None
    try:
        shape = tuple(np.broadcast_shapes(tuple(input.shape), tuple(target.shape)))
    except ValueError:
        raise ValueError(f"target of shape {tuple(target.shape)} does not broadcast with input of shape "
                         f"{tuple(input.shape)}") from None
    if warn:
        warnings.warn(f"Using a target size ({tuple(target.shape)}) that is different to the input size "
                      f"({tuple(input.shape)}). This will likely lead to incorrect results due to broadcasting. "
                      f"Please ensure they have the same size.", UserWarning, stacklevel=4)
    if kind == "torch":
        return input.expand(shape), target.expand(shape), shape
    xp = _xp(kind)
    return xp.broadcast_to(input, shape), xp.broadcast_to(target, shape), shape


def _sum_to(a, shape: tuple, kind: str):
    """``a`` summed over the dimensions that broadcasting added to ``shape``:
    the gradient of a broadcast operand."""
    if a is None or tuple(a.shape) == tuple(shape):
        return a
    if kind == "torch":
        return a.sum_to_size(shape) if len(shape) else a.sum()
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and a.shape[lead + i] != 1)
    return a.sum(axis=axes, keepdims=True).reshape(shape)


def _elementwise(op: str, input, target, reduction, return_grad, backend, extra: dict, named_weights: dict,
                 broadcast: bool = False, kl: bool = False):
    """The element-wise losses: one element of input and target gives one
    loss element.  ``broadcast``: input and target broadcast to a common
    shape (mse_loss, kl_div), else they must agree (BCE, as in torch)."""
    kind, device = classify([("input", input), ("target", target)] + list(named_weights.items()),
                            optional=named_weights)
    V.check_reduction(reduction, kl=kl)
    V.check_floating("input", input, kind)
    V.check_floating("target", target, kind)
    if not broadcast:
        V.check_same_shape("input", input, "target", target)
    for name, w in named_weights.items():
        V.check_broadcastable(name, w, kind, input)
        V.check_no_grad(name, w, kind, op)
    _wants(return_grad)
    if op == "bce":
        V.check_unit_interval("input", input, kind)
        V.check_unit_interval("target", target, kind)
    be = _select(kind, device, backend)
    xin, tin, bshape = _broadcast_pair(input, target, kind, warn=op == "mse") if broadcast else \
        (input, target, None)
    red = "sum" if reduction == "batchmean" else reduction
    if _numel(xin, kind) == 0:
        res = _empty_elementwise(kind, xin, tin, red)
    else:
        x, layout = _rows2d(xin, kind, -1)
        t, _ = _rows2d(tin, kind, -1)
        arrays = {"x" if op != "bce" else "p": x, "target": t}
        if op == "kl_div":
            arrays = {"input": x, "target": t}
        for name, w in named_weights.items():
            arrays[name] = None if w is None else V.as_row_broadcast(w, kind, xin, x)
        res = _run(kind, be, op, arrays, dict(reduction=red, **extra), return_grad, True)
        unrow = lambda a: _from_rows(a, kind, layout)  # noqa: E731
        res = LossResult(unrow(res.loss) if red == "none" else res.loss, unrow(res.grad), unrow(res.grad_target))
    if reduction == "batchmean":  # torch: sum / input.size(0)
        res = _batchmean(res, input.shape[0] if input.ndim else 1, kind)
    if return_grad and bshape is not None:
        res = res._replace(grad=_sum_to(res.grad, tuple(input.shape), kind),
                           grad_target=_sum_to(res.grad_target, tuple(target.shape), kind))
    return _finish(res, return_grad, kind, input, ("0d", tuple(input.shape)),
                   target_layout=("0d", tuple(target.shape)), target_like=target)


def _empty_elementwise(kind: str, input, target, reduction: str) -> LossResult:
    """An element-wise loss over no elements, as torch: "none" an empty
    array of input's shape, "sum" 0, "mean" NaN; zero-size gradients.  torch
    tensors stay connected to autograd."""
    zeros = (lambda a, shape: a.new_zeros(shape)) if kind == "torch" else \
        (lambda a, shape: _xp(kind).zeros(shape, dtype=a.dtype))
    if reduction == "none":
        loss = zeros(input, tuple(input.shape))
    else:
        loss = zeros(input, ()) + (float("nan") if reduction == "mean" else 0.0)
    if kind == "torch":
        loss = loss + input.sum() * 0 + (target.sum() * 0 if target.requires_grad else 0)
    return LossResult(loss, zeros(input, tuple(input.shape)), zeros(target, tuple(target.shape)))


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction: str = "mean", pos_weight=None, *,
                                     return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Sigmoid + binary cross-entropy in one stable step, as
    ``torch.nn.functional.binary_cross_entropy_with_logits``::

        loss = weight * ((1 - t) x + (1 + (pos_weight - 1) t) log(1 + exp(-x)))

    ``weight`` broadcasts against input; ``pos_weight`` along the last
    dimension.  Gradient w.r.t. x without pos_weight: ``weight (sigmoid(x) - t)``."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    return _elementwise("bce_with_logits", input, target, reduction, return_grad, backend, {},
                        {"weight": weight, "pos_weight": pos_weight})


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction: str = "mean",
                         *, return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Binary cross-entropy on probabilities, as
    ``torch.nn.functional.binary_cross_entropy`` (each log clamped at -100)."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    return _elementwise("bce", input, target, reduction, return_grad, backend, {}, {"weight": weight})


def mse_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", *,
             return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Mean squared error, as ``torch.nn.functional.mse_loss``: ``(x - t)**2``.

    The lecture's L2 divergence ``1/2 ||Y - d||^2`` is
    ``mse_loss(Y, d, reduction="sum") / 2``, with gradient ``Y - d``."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    return _elementwise("mse", input, target, reduction, return_grad, backend, {}, {}, broadcast=True)
