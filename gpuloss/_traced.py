"""The public functions under ``torch.jit.trace`` and ``torch.func``: torch's own operations.

``torch.jit.trace`` records tensor operations and bakes in every Python
decision as a constant.  gpuloss's calls decide at call time which gradients
the forward pass forms (from ``requires_grad`` and grad mode) and read target
values for their checks, so a traced gpuloss loss would replay one call's
decisions: traced under ``torch.no_grad()`` it never gives a gradient again,
and the default trace check fails ("Graphs differed across invocations").
While tracing, each public function computes its result with
``torch.nn.functional`` (the same semantics: gpuloss's are torch's), as
torch's own chunked ``linear_cross_entropy`` falls back to its reference path
under tracing; the extras torch has no operation for (``z_loss``,
``softcap``, ``inplace_backward``, ``return_grad``) are refused.

The same holds inside ``torch.func`` transforms (``grad``, ``vmap``,
``jacrev``, ``jvp``, ``hessian``...) and under forward-mode AD
(``torch.autograd.forward_ad``): gpuloss's custom operators carry reverse-mode
formulas for torch.autograd only, so there each function computes with
``torch.nn.functional``, whose operations every transform knows
(per-sample gradients with ``vmap(grad(...))``, Jacobians, tangents), without
a warning: the results are torch's.  Meta tensors (shapes and dtypes, no
values: ``device="meta"`` models, shape inference) take the same path.

Nothing here runs unless one of those is active (:func:`active`).
"""
from __future__ import annotations

import math
import sys
import warnings

from .errors import ArgumentValueError

_WARNED = set()


def active(input, *others) -> bool:
    """Whether torch's own operations must compute this call: ``torch.jit.trace``
    is recording, one of the tensors is being transformed by ``torch.func``
    or carries a forward-mode tangent, or ``input`` is a meta tensor.  Asked
    only when ``input`` is a tensor (torch is imported then: see
    :func:`gpuloss._layout.torch_tracing`).  While torch.compile traces, only
    a ``torch.func`` transform counts (compiled code otherwise runs
    gpuloss's operators)."""
    if not hasattr(input, "__torch_function__"):
        return False
    import torch
    if not isinstance(input, torch.Tensor):
        return False  # a tensor-like object of another class: refused by name (classify)
    if torch.jit.is_tracing():
        return True
    if torch.compiler.is_compiling():
        # gpuloss's operators, unless the compiled code is a torch.func transform (their tangents and
        # batching would be missing: a compiled jvp gave 0)
        return _in_compiled_transform()
    if input.is_meta:  # no values: torch's operations give the shapes and dtypes (no gpuloss backend serves meta)
        return True
    return _transformed((input,) + others)


def _in_compiled_transform() -> bool:
    """Whether a ``torch.func`` transform is active while torch.compile traces.
    dynamo runs the transforms' nesting for real while it traces them, so
    the functorch level is known then; the answer is a trace-time constant
    (reading the level is not an operation dynamo can put in a graph), and
    dynamo guards each compiled graph on the functorch stack it was traced
    under."""
    import torch
    return torch._C._functorch.maybe_current_level() is not None


# what torch._dynamo.assume_constant_result sets (dynamo calls the function while
# tracing and uses its result as a constant); set here: import gpuloss imports no torch
_in_compiled_transform._dynamo_marked_constant = True


def _transformed(arrays) -> bool:
    """A torch.func transform's wrapped tensor, or a forward-mode dual tensor, among ``arrays``."""
    import torch
    from torch.autograd import forward_ad
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    dual = getattr(forward_ad, "_current_level", -1) >= 0  # a dual level is entered: tangents may exist
    for a in arrays:
        if not isinstance(a, torch.Tensor):
            continue
        if wrapped is not None and wrapped(a):
            return True
        if dual and forward_ad.unpack_dual(a).tangent is not None:
            return True
    return False


def refuse_transformed(name: str, *arrays) -> None:
    """For the functions with no torch-operations form (the vocabulary-parallel
    losses, whose collectives sit inside their operators): a transformed or
    dual tensor among ``arrays`` is refused by name, where torch would raise
    about an internal autograd.Function (torch.func) or return the loss with
    no tangent at all (forward-mode AD)."""
    import torch
    if not torch.compiler.is_compiling() and _transformed(arrays):
        raise NotImplementedError(f"gpuloss.distributed.{name} does not support torch.func transforms (grad, vmap, "
                                  f"jacrev, jvp, ...) or forward-mode AD; use torch.autograd (loss.backward(), "
                                  f"torch.autograd.grad)")


def _jit() -> bool:
    import torch
    return torch.jit.is_tracing()


def _note(name: str) -> None:
    if _jit() and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"gpuloss.{name} under torch.jit.trace records torch.nn.functional's operations, not "
                      f"gpuloss's kernels (a trace would fix the gradients gpuloss forms to this call's); "
                      f"torch.compile runs gpuloss's kernels", UserWarning, stacklevel=4)


def _refuse(name: str, like, **extras) -> None:
    if like.is_meta:  # shapes and dtypes only: the extras change values, none of which exist
        if extras.get("return_grad"):
            raise ArgumentValueError(f"gpuloss.{name}: return_grad is not available for meta tensors; "
                                     f"call .backward() on the loss")
        return
    used = [k for k, v in extras.items() if v]
    if used:
        if _jit():
            raise ArgumentValueError(f"gpuloss.{name} under torch.jit.trace runs torch's own operations, which have "
                                     f"no {', '.join(used)}; use torch.compile, or trace without them")
        raise ArgumentValueError(f"gpuloss.{name} inside a torch.func transform or forward-mode AD runs torch's own "
                                 f"operations, which have no {', '.join(used)}; leave them out there, or use "
                                 f"torch.autograd (loss.backward(), torch.autograd.grad)")


# ---------------------------------------------------------------------------
# torch's own functions, even where a caller has bound gpuloss's in their place
# ---------------------------------------------------------------------------
# ``torch.nn.functional.cross_entropy = gpuloss.cross_entropy`` (or a wrapper
# of it) is a way to drop gpuloss into code that calls torch's functions.  The
# paths here must then not call ``torch.nn.functional``'s attribute, which
# would be gpuloss's function again (endless recursion under every transform,
# for meta tensors and under torch.jit.trace).  torch's own functions are kept
# when first seen (at import, if torch is loaded already); where the attribute
# was replaced before that, the same computation is written here with the
# operations torch's functions call.

def _reduction_enum(size_average, reduce, reduction: str) -> int:
    from torch.nn import _reduction as R
    if size_average is not None or reduce is not None:
        return R.legacy_get_enum(size_average, reduce)
    return R.get_enum(reduction)


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                   label_smoothing=0.0):
    import torch
    return torch._C._nn.cross_entropy_loss(input, target, weight, _reduction_enum(size_average, reduce, reduction),
                                           ignore_index, label_smoothing)


def _nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean"):
    import torch
    return torch._C._nn.nll_loss_nd(input, target, weight, _reduction_enum(size_average, reduce, reduction),
                                    ignore_index)


def _kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    import torch
    if size_average is not None or reduce is not None:
        enum = _reduction_enum(size_average, reduce, reduction)
    else:
        if reduction == "mean":
            warnings.warn("reduction: 'mean' divides the total loss by both the batch size and the support size."
                          "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
                          "'mean' will be changed to behave the same as 'batchmean' in the next major release.",
                          stacklevel=4)
        enum = _reduction_enum(None, None, "sum" if reduction == "batchmean" else reduction)
    reduced = torch.kl_div(input, target, enum, log_target=log_target)
    if reduction == "batchmean" and input.dim() != 0:
        reduced = reduced / input.size()[0]
    return reduced


def _mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    import torch
    if target.size() != input.size():
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      f"This will likely lead to incorrect results due to broadcasting. Please ensure they have the "
                      f"same size.", stacklevel=4)
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as R
        reduction = R.legacy_get_string(size_average, reduce)
    x, t = torch.broadcast_tensors(input, target)
    if weight is None:
        return torch._C._nn.mse_loss(x, t, _reduction_enum(None, None, reduction))
    if weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")
    wse = torch.pow(x - t, 2) * weight
    if reduction == "none":
        return wse
    if reduction == "sum":
        return torch.sum(wse)
    if reduction == "mean":
        return torch.sum(wse) / torch.sum(weight)
    raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")


def _binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    import torch
    enum = _reduction_enum(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input size "
                         f"({input.size()}) is deprecated. Please ensure they have the same size.")
    if weight is not None:
        weight = weight.expand(torch.broadcast_shapes(target.size(), weight.size()))
    return torch._C._nn.binary_cross_entropy(input, target, weight, enum)


def _binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None, reduction="mean",
                                      pos_weight=None):
    import torch
    enum = _reduction_enum(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    return torch.binary_cross_entropy_with_logits(input, target, weight, pos_weight, enum)


def _softmax_fn(name: str):
    def fn(input, dim=None, _stacklevel=3, dtype=None):
        if dim is None:
            warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call to include "
                          f"dim=X as an argument.", stacklevel=max(1, _stacklevel - 1))
            dim = 0 if input.dim() in (0, 1, 3) else 1
        op = input.softmax if name == "softmax" else input.log_softmax
        return op(dim) if dtype is None else op(dim, dtype=dtype)
    return fn


_FALLBACKS = {"cross_entropy": _cross_entropy, "nll_loss": _nll_loss, "kl_div": _kl_div, "mse_loss": _mse_loss,
              "binary_cross_entropy": _binary_cross_entropy,
              "binary_cross_entropy_with_logits": _binary_cross_entropy_with_logits,
              "softmax": _softmax_fn("softmax"), "log_softmax": _softmax_fn("log_softmax")}
_ORIGINALS = {}


def _keep_originals() -> None:
    """torch's functions, while ``torch.nn.functional`` still holds them."""
    F = sys.modules.get("torch.nn.functional")
    if F is None:
        return
    for name in _FALLBACKS:
        fn = getattr(F, name, None)
        if name not in _ORIGINALS and getattr(fn, "__module__", None) == "torch.nn.functional":
            _ORIGINALS[name] = fn


_keep_originals()


def torch_function(name: str):
    """``torch.nn.functional.<name>`` as torch defines it: the one kept, the
    attribute while it is torch's, else the same computation written here."""
    fn = _ORIGINALS.get(name)
    if fn is not None:
        return fn
    import torch.nn.functional as F
    fn = getattr(F, name)
    if getattr(fn, "__module__", None) == "torch.nn.functional":
        _ORIGINALS[name] = fn
        return fn
    return _FALLBACKS[name]


def _index(target):
    """Class indices as torch's losses take them (gpuloss also takes int8/16/32)."""
    import torch
    if not target.is_floating_point() and target.dtype not in (torch.int64, torch.uint8):
        return target.to(torch.int64)
    return target


def _dtype(loss, loss_dtype):
    return loss if loss_dtype is None else loss.to(loss_dtype)


def cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing, z_loss,
                  softcap, inplace_backward, return_grad, loss_dtype):
    _refuse("cross_entropy", input, z_loss=z_loss, softcap=softcap is not None, inplace_backward=inplace_backward,
            return_grad=return_grad)
    _note("cross_entropy")
    ce = torch_function("cross_entropy")
    return _dtype(ce(input, _index(target), weight, size_average, ignore_index, reduce, reduction, label_smoothing),
                  loss_dtype)


def nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction, return_grad):
    _refuse("nll_loss", input, return_grad=return_grad)
    _note("nll_loss")
    return torch_function("nll_loss")(input, _index(target), weight, size_average, ignore_index, reduce, reduction)


def elementwise(name: str, *args, return_grad, **kwargs):
    """kl_div, binary_cross_entropy(_with_logits), mse_loss: torch's function of the same name."""
    _refuse(name, args[0], return_grad=return_grad)
    _note(name)
    return torch_function(name)(*args, **kwargs)


def softmax(name: str, input, dim, dtype, stacklevel: int = 3):
    """``F.softmax``/``F.log_softmax``; the caller's ``_stacklevel`` counts from
    gpuloss's function: torch's, two frames below it, is two more."""
    _note(name)
    return torch_function(name)(input, dim, stacklevel + 2, dtype)


def softmax_backward(grad_output, output, dim: int, log: bool):
    import torch
    _note("log_softmax_backward" if log else "softmax_backward")
    fn = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    return fn(grad_output, output, dim, output.dtype)


def kl_div_with_logits(input, target, temperature, reduction, target_is_logits, return_grad):
    """KL(d || softmax(input / T)) per row, gpuloss.reference's definition."""
    import torch
    _refuse("kl_div_with_logits", input, return_grad=return_grad)
    _note("kl_div_with_logits")
    lq = torch.log_softmax(input / temperature, -1)
    if target_is_logits:
        ld = torch.log_softmax(target / temperature, -1)
        d = ld.exp()
    else:
        d = target
        ld = torch.where(d > 0, d, 1).log()
    rows = torch.where(d == 0, 0, d * (ld - lq)).sum(-1)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    n = rows.numel() if reduction == "batchmean" else input.numel()
    return total / n if n else total * math.nan


def linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                         label_smoothing, z_loss, softcap, return_grad, loss_dtype):
    """torch's reference definition: cross_entropy(linear(...))."""
    import torch.nn.functional as F
    _refuse("linear_cross_entropy", input, z_loss=z_loss, softcap=softcap is not None, return_grad=return_grad)
    _note("linear_cross_entropy")
    C, out, H = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    logits = F.linear(input, linear_weight.reshape(C * math.prod(out), H),
                      None if linear_bias is None else linear_bias.reshape(-1))
    logits = logits.reshape(tuple(input.shape[:-1]) + (C,) + out)
    prob = target.is_floating_point() and tuple(target.shape) == tuple(logits.shape)
    if prob and ignore_index is not None:
        raise ArgumentValueError("ignore_index cannot be specified when target contains probabilities")
    ii = -100 if ignore_index is None else ignore_index
    return _dtype(torch_function("cross_entropy")(logits, target if prob else _index(target), weight, ignore_index=ii,
                                                  reduction=reduction, label_smoothing=label_smoothing), loss_dtype)
