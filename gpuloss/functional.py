"""The public functions: PyTorch's names, arguments and defaults, for NumPy
arrays, CuPy arrays and torch tensors alike.

Every call goes down once:

1. find the arrays' kind (NumPy / CuPy / torch) and device; mixed kinds or
   devices are an error;
2. validate every argument before any work (:mod:`gpuloss._validate`) and
   build the op's options record (:mod:`gpuloss.ops`);
3. pick a backend, once (:mod:`gpuloss.dispatch`);
4. move the class dimension last and flatten to 2-D rows (views where
   possible, :mod:`gpuloss._layout`);
5. run the op: torch tensors through its custom operator
   (:mod:`gpuloss.torch_ops`, differentiable and traceable), NumPy and CuPy
   arrays through :func:`gpuloss.launch.run`; either way the arrays are
   converted to the backend's native arrays once;
6. give back the same kind of array, on the same device, shaped as PyTorch
   shapes it.

Inputs that hold no element never reach a backend: their result is torch's,
formed here (:mod:`gpuloss.rules`).

Gradients without autograd
--------------------------
NumPy and CuPy arrays have no autograd, so every loss takes
``return_grad``: with ``return_grad=True`` it returns a :class:`LossGrad`
``(loss, grad, grad_target)`` whose ``grad`` is the gradient of the returned
loss with respect to ``input``, computed in the same fused pass as the loss
(for ``reduction="none"``, the gradient of the sum of the per-element losses).
``return_grad="all"`` also fills ``grad_target`` for floating targets
(probability targets, BCE/MSE/KL targets; :func:`kl_div_with_logits` refuses
it); it is ``None`` otherwise.  Scale by
your own upstream gradient if it is not one.  softmax and log_softmax have
:func:`softmax_backward` and :func:`log_softmax_backward`.

torch tensors get the same ``return_grad`` form, and additionally, without
``return_grad``, a loss that backpropagates through autograd (the gradient
computed in the forward pass is saved and reused by backward).
"""
from __future__ import annotations

from typing import Optional, Union

from . import _autocast as AC
from . import _layout as L
from . import _traced as TR
from . import _validate as V
from . import rules
from ._arrays import classify, dtype_name
from ._call import LossGrad, backend_for, finish, legacy_reduction, run, wants
from .backends.base import LossResult
from .errors import ArgumentTypeError, ArgumentValueError
from .ops import CrossEntropyOptions, KlDivLogitsOptions, KlDivOptions, NllOptions, ReductionOptions, SoftmaxOptions

__all__ = [
    "LossGrad", "softmax", "log_softmax", "softmax_backward", "log_softmax_backward",
    "cross_entropy", "nll_loss", "kl_div", "kl_div_with_logits",
    "binary_cross_entropy_with_logits", "binary_cross_entropy", "mse_loss",
]


# ---------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------

def _cast_dtype(input, dtype, kind: str):
    """torch's ``dtype=`` of softmax/log_softmax: ``input`` cast to a
    floating ``dtype`` before the op (a torch.dtype for tensors; a NumPy
    dtype or its name for NumPy and CuPy arrays)."""
    dt = V.as_float_dtype("dtype", dtype, kind)
    if dt is None:
        return input
    return input.to(dt) if kind == "torch" else input.astype(dt, copy=False)


def implicit_softmax_dim(name: str, input, stacklevel: int = 4) -> int:
    """torch's rule for ``dim=None`` (deprecated there, with this warning)."""
    L.user_warning(f"Implicit dimension choice for {name} has been deprecated. "
                   f"Change the call to include dim=X as an argument.", stacklevel, input)
    return 0 if input.ndim in (0, 1, 3) else 1


def _softmax_common(input, dim, dtype, backend, log: bool, stacklevel: int = 3):
    input, = L.gathered(input)
    kind, device = classify([("input", input)])
    if dim is None:  # torch's _stacklevel counts from its softmax; this frame is one more
        dim = implicit_softmax_dim("log_softmax" if log else "softmax", input, stacklevel + 1)
    input = _cast_dtype(input, AC.softmax_dtype(kind, device, input, dtype), kind)
    V.check_floating("input", input, kind)
    dim = V.check_dim("dim", dim, input.ndim)
    be = backend_for(kind, device, backend, "softmax_forward", input, dim if input.ndim else -1)
    if L.numel(input, kind) == 0:  # nothing to normalise: an empty result, as torch
        if kind == "torch":  # torch's own operation: in autograd's graph as torch's, double backward included
            import torch
            return (torch.log_softmax if log else torch.softmax)(input, dim)
        return L.xp(kind).empty_like(input)
    rows, layout = L.rows2d(input, kind, dim)
    return L.contiguous(L.from_rows(run("softmax_forward", kind, be, [rows], SoftmaxOptions(log)), kind, layout), kind)


def softmax(input, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None, *, backend: Optional[str] = None):
    """softmax along ``dim``: ``exp(x_i) / sum_k exp(x_k)``, computed as
    ``exp(x_i - max) / sum exp(x_k - max)`` in float32 (float64 for float64).

    Parameters
    ----------
    input : array (NumPy, CuPy or torch), floating, any shape
    dim : the dimension to normalise.  None (the default, as torch's) takes
        torch's deprecated implicit choice with its warning: dimension 0 for
        0-, 1- and 3-D input, else 1; pass ``dim`` (e.g. -1)
    _stacklevel : as torch's: the stack level of the implicit-``dim``
        warning (3: the caller of this function), on every path
    dtype : as torch's: cast ``input`` to this floating dtype first (and
        return that dtype)
    backend : "numpy" | "triton" | "cupy" | None (automatic)
    """
    if TR.active(input):
        return TR.softmax("softmax", input, dim, dtype, _stacklevel)
    return _softmax_common(input, dim, dtype, backend, log=False, stacklevel=_stacklevel)


def log_softmax(input, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None, *,
                backend: Optional[str] = None):
    """log_softmax along ``dim``: ``x_i - logsumexp(x)``; ``dtype`` as in :func:`softmax`."""
    if TR.active(input):
        return TR.softmax("log_softmax", input, dim, dtype, _stacklevel)
    return _softmax_common(input, dim, dtype, backend, log=True, stacklevel=_stacklevel)


def _softmax_bwd_common(grad_output, output, dim, backend, log: bool):
    grad_output, output = L.gathered(grad_output, output)
    kind, device = classify([("grad_output", grad_output), ("output", output)])
    V.check_floating("output", output, kind)
    V.check_floating("grad_output", grad_output, kind)
    V.check_same_shape("grad_output", grad_output, "output", output)
    V.check_same_dtype("grad_output", grad_output, "output", output, kind)
    dim = V.check_dim("dim", dim, output.ndim)
    be = backend_for(kind, device, backend, "softmax_backward", output, dim if output.ndim else -1)
    if L.numel(output, kind) == 0:
        return grad_output * output  # empty, and connected to autograd for torch
    y, layout = L.rows2d(output, kind, dim)
    dy, _ = L.rows2d(grad_output, kind, dim)
    return L.contiguous(L.from_rows(run("softmax_backward", kind, be, [y, dy], SoftmaxOptions(log)), kind, layout),
                        kind)


def softmax_backward(grad_output, output, dim: int = -1, *, backend: Optional[str] = None):
    """Gradient of softmax w.r.t. its input, from its output ``y`` and the
    upstream gradient ``dy``: ``y * (dy - sum(dy * y))`` along ``dim``."""
    if TR.active(output, grad_output):
        return TR.softmax_backward(grad_output, output, dim, log=False)
    return _softmax_bwd_common(grad_output, output, dim, backend, log=False)


def log_softmax_backward(grad_output, output, dim: int = -1, *, backend: Optional[str] = None):
    """Gradient of log_softmax w.r.t. its input: ``dy - exp(y) * sum(dy)``."""
    if TR.active(output, grad_output):
        return TR.softmax_backward(grad_output, output, dim, log=True)
    return _softmax_bwd_common(grad_output, output, dim, backend, log=True)


# ---------------------------------------------------------------------------
# cross-entropy and NLL
# ---------------------------------------------------------------------------

def _fp32_op(op: str, kind: str, device: str, **arrays):
    """torch.autocast's float32 policy (:mod:`gpuloss._autocast`): the
    arrays as the op computes them, in the order given, and float32 or None
    for the loss."""
    args, out = AC.fp32_op(op, kind, device, arrays)
    return tuple(args.values()), out


def _fp16_mean(kind: str, return_grad, *arrays) -> bool:
    """Whether a "mean" (or "batchmean") runs as a sum (or per-row losses)
    whose division comes after the op: float16 torch tensors that autograd
    differentiates.

    The op saves its gradient for backward in the input's dtype.  Divided by
    the mean's divisor first (e.g. ``(p - y) / N``), fp16 flushes most of it
    to zero (at N=8192, C=1000 four elements in five); a GradScaler's scale
    that backward would multiply in comes too late.  Saved undivided, the
    division joins the upstream gradient in float32 (one rounding, no
    underflow: what torch's own fp16 backward does).  bfloat16 has float32's
    range and keeps the one-rounding kernel path, as does float16
    binary_cross_entropy, whose undivided gradient would overflow instead."""
    if kind != "torch" or return_grad:
        return False
    import torch
    return (torch.is_grad_enabled() and arrays[0].dtype == torch.float16
            and any(a is not None and a.requires_grad for a in arrays))


def _mean_of_rows(losses, t, w, ignore_index: int, C: int):
    """"mean" from the per-row losses of a class-dimension loss (the
    division after the op, :func:`_fp16_mean`), by :mod:`gpuloss.rules`'
    contract: the divisor is the sum of ``w[t]`` over the valid rows (their
    count without weights; every row for probability targets, ``t`` None);
    a valid row's gradient scale is ``1 / divisor``, an ignored row's a
    selected 0; a zero divisor gives a NaN loss."""
    import torch
    if t is None:
        return losses.sum() * (1.0 / losses.shape[0])
    valid = rules.valid_targets(t, ignore_index, C)
    wt = valid.to(losses.dtype) if w is None else torch.where(valid, w[torch.where(valid, t, 0)].to(losses.dtype), 0.0)
    div = wt.sum()
    # a zero divisor: NaN, so a valid row's gradient is NaN as torch's (1 / 0 = inf times a z-loss term: inf)
    scale = torch.where(valid, torch.where(div == 0, float("nan"), 1.0 / div), 0.0)
    return (losses * scale).sum() + torch.where(div == 0, float("nan"), 0.0)


def _class_dim_call(input, target, weight, size_average, reduce, reduction: str, ignore_index):
    """The checks cross_entropy and nll_loss share: (reduction, kind, device,
    C, ignore_index) for logits with the class dimension 1 ((C,) unbatched)."""
    reduction = legacy_reduction(size_average, reduce, reduction, input, depth=1)
    kind, device = classify([("input", input), ("target", target), ("weight", weight)], optional=("weight",))
    V.check_reduction(reduction)
    V.check_floating("input", input, kind)
    if input.ndim == 0:
        raise ArgumentValueError("input must have at least 1 dimension (C,), got a 0-d array (Expected 1 or more "
                                 "dimensions (got 0))")
    ignore_index = V.check_ignore_index("ignore_index", ignore_index)
    C = input.shape[1] if input.ndim >= 2 else input.shape[0]
    return reduction, kind, device, C, ignore_index


def _row_loss_shape(input) -> tuple:
    """The shape of a per-sample class-dimension loss: input without dim 1."""
    return tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.ndim >= 2 else ()


def _empty_class(kind, input, target, prob: bool, ignore_index: int, eps: float, reduction: str, return_grad,
                 z_loss: float = 0.0, weight=None):
    """cross_entropy / nll_loss over logits that hold no element (torch's
    result, :func:`gpuloss._layout.empty_class_loss`); in autograd's graph of
    the logits, and with probability targets of them and the class weight."""
    loss = L.empty_class_loss(kind, input, target, prob, ignore_index, eps, reduction, z_loss)
    loss = L.connected(loss, kind, input, *((target, weight) if prob else ()))
    if not return_grad:
        return loss
    gt = L.zeros(target, tuple(target.shape), kind) if (prob and return_grad == "all") else None
    return LossGrad(loss, L.zeros(input, tuple(input.shape), kind), gt)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, inplace_backward: bool = False,
                  return_grad: Union[bool, str] = False, loss_dtype=None, backend: Optional[str] = None):
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
    label_smoothing : at most 1 (as torch: a negative or NaN value smooths nothing)
    z_loss : adds ``z_loss * logsumexp(z)**2`` per (non-ignored) row (PaLM)
    softcap : if set, logits become ``softcap * tanh(z / softcap)`` first (Gemma 2)
    inplace_backward : write the gradient over ``input`` (saves N x C memory;
        the logits are consumed).  ``input`` must be writable with no two
        elements sharing memory.  Under autograd, where the op works on a
        copy (class dimension not last, strided columns, a dtype cast), the
        copy takes the gradient and ``input`` keeps its values.
    return_grad : see the module docstring
    loss_dtype : the loss's dtype (default: input's, torch's rule); e.g.
        float32 for bf16 logits gives the loss as accumulated, without the
        rounding to bf16 (as ``F.cross_entropy(logits.float(), ...)`` but with
        no fp32 copy of the logits)
    backend : "numpy" | "triton" | "cupy" | None

    The math is written out in :func:`gpuloss.reference.cross_entropy`.  An
    empty batch or an all-ignored batch gives nan for "mean", as PyTorch.
    """
    if TR.active(input, target, weight):
        V.check_ce_options(label_smoothing, z_loss, softcap)  # the options are checked on every path
        V.check_bool("inplace_backward", inplace_backward)
        wants(return_grad)
        return TR.cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction,
                                label_smoothing, z_loss, softcap, inplace_backward, return_grad, loss_dtype)
    if type(input).__name__ == "DTensor" and not return_grad and not inplace_backward:
        from .distributed import dtensor
        if dtensor.class_sharded(input, target, weight):  # vocabulary-sharded logits: never gathered
            reduction = legacy_reduction(size_average, reduce, reduction, input)
            V.check_reduction(reduction)
            ignore_index = V.check_ignore_index("ignore_index", ignore_index)
            return dtensor.cross_entropy(input, target, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                         V.as_float_dtype("loss_dtype", loss_dtype, "torch"))
    input, target, weight = L.gathered(input, target, weight)
    reduction, kind, device, C, ignore_index = _class_dim_call(input, target, weight, size_average, reduce,
                                                              reduction, ignore_index)
    # the options before the target and weight, in torch's order (its label_smoothing check precedes
    # the shapes'); a bool or 0-d tensor label_smoothing is taken, as torch takes it
    label_smoothing = V.check_ce_options(label_smoothing, z_loss, softcap)
    caller_input = input
    (input, target, weight), ac_dtype = _fp32_op("cross_entropy", kind, device, input=input, target=target,
                                                         weight=weight)
    target = V.unbatched_index_target(target, kind, input.ndim)
    prob = V.check_ce_target("target", target, kind, input, ignore_index)
    V.check_weight("weight", weight, kind, C, input, prob)
    V.check_bool("inplace_backward", inplace_backward)
    wants(return_grad)
    loss_dtype = V.as_float_dtype("loss_dtype", loss_dtype, kind)
    loss_dtype = ac_dtype if loss_dtype is None else loss_dtype
    if inplace_backward and _writes_gradient(input, kind, return_grad):
        V.check_inplace_ok("input", input, kind, return_grad)
    x, caller_target = input, target
    if prob:  # torch promotes logits, probabilities and class weights to one dtype
        dt = V.floating_result_dtype(kind, input, target, weight)
        x, target = L.astype(input, dt, kind), L.astype(target, dt, kind)
    else:
        target = V.as_index_target("target", target, kind)
        V.check_class_targets("target", target, kind, C, ignore_index)
    be = backend_for(kind, device, backend, "cross_entropy", x, 1 if x.ndim >= 2 else 0)
    if L.numel(input, kind) == 0:
        return L.loss_as(_empty_class(kind, x, target, prob, ignore_index, float(label_smoothing), reduction,
                                      return_grad, float(z_loss), weight), loss_dtype, kind)
    if x.ndim == 1:  # one unbatched row
        rows, layout = x.reshape(1, C), ("0d", (C,))
        t_rows = target.reshape(1, C) if prob else target.reshape(1)
    else:
        rows, layout = L.rows2d(x, kind, 1)
        t_rows = L.rows2d(target, kind, 1)[0] if prob else target.reshape(-1)
    w = None if weight is None else V.as_float_vector(weight, kind, x)
    w_grad = prob and kind == "torch" and weight is not None and weight.requires_grad and not return_grad
    rows_mean = reduction == "mean" and not w_grad and _fp16_mean(kind, return_grad, x, target if prob else None)
    opts = CrossEntropyOptions(ignore_index, "none" if rows_mean else reduction, float(label_smoothing),
                               float(z_loss), None if softcap is None else float(softcap), bool(inplace_backward))
    w_term = None  # formed before the call: with inplace_backward the call overwrites the logits
    if w_grad:
        w_term = _class_weight_term(rows, t_rows, weight, opts, _row_loss_shape(x))
    res = run("cross_entropy", kind, be, [rows, t_rows, w], opts, return_grad)
    if rows_mean:
        res = res._replace(loss=_mean_of_rows(res.loss, None if prob else t_rows, w, ignore_index, C))
    elif reduction == "none":
        res = res._replace(loss=res.loss.reshape(_row_loss_shape(x)))
    if w_term is not None:
        res = res._replace(loss=res.loss + w_term)
    out = finish(res, return_grad, kind, x, layout, target_like=caller_target if prob else None,
                  inplace=bool(inplace_backward), loss_dtype=loss_dtype)
    if return_grad and x is not caller_input:
        out = out._replace(grad=L.cast_like(out.grad, caller_input, kind))
    return out


def _writes_gradient(input, kind: str, return_grad) -> bool:
    """Whether this call forms the input's gradient (and so, with
    inplace_backward, writes over it): with return_grad, or for a torch
    tensor that autograd differentiates."""
    if return_grad:
        return True
    if kind != "torch":
        return False
    import torch
    return input.requires_grad and torch.is_grad_enabled()


def _class_weight_term(rows, t_rows, weight, opts: CrossEntropyOptions, loss_shape):
    """torch differentiates cross-entropy with probability targets with respect
    to the class weights (the op gives the targets' gradient itself): an extra
    pass over the rows, taken only when a weight requires grad."""
    import torch
    with torch.no_grad():
        neg_logp = neg_log_softmax(rows.to(weight.dtype), opts.softcap)
    return prob_target_term(neg_logp, t_rows, weight, opts.label_smoothing, opts.reduction, loss_shape,
                            target_grad=False)


def neg_log_softmax(z, softcap: Optional[float]):
    """``-log_softmax`` of the (soft-capped) logits ``z`` along the last
    dimension: the ``a`` of :func:`prob_target_term`."""
    import torch
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, -1).neg_()


def prob_target_term(neg_logp, t_rows, weight, eps: float, reduction: str, loss_shape, target_grad: bool):
    """torch differentiates cross-entropy with probability targets with respect
    to the probabilities and the class weights: with ``a = -log p`` (rows of
    ``neg_logp``, no graph) and ``d~ = (1 - eps) d + eps / C``, per row
    ``dL/dd_c = (1 - eps) w_c a_c`` (with ``target_grad``) and ``dL/dw_c =
    d~_c a_c`` (when ``weight`` requires grad).  The result is a term whose
    value is 0 and whose gradients are those, to add to the loss (reduced
    as it is: "mean" over the rows).  Shared by :func:`cross_entropy` and the
    fused linear cross-entropy."""
    import torch
    from .torch_ops import row_grad_term
    a, dt, C = neg_logp, neg_logp.dtype, neg_logp.shape[-1]
    per_row = torch.zeros(a.shape[:-1], dtype=dt, device=a.device)
    with torch.no_grad():
        w = None if weight is None else weight.detach().to(dt)
    if target_grad:
        with torch.no_grad():
            coef = a * (1 - eps) if w is None else a * (w * (1 - eps))
        per_row = per_row + row_grad_term(t_rows, coef)
    if weight is not None and weight.requires_grad:
        with torch.no_grad():
            coef = (t_rows.detach().to(dt) * (1 - eps) + eps / C) * a
        per_row = per_row + row_grad_term(weight, coef)
    if reduction == "none":
        return per_row.reshape(loss_shape)
    return per_row.sum() / (a.shape[0] if reduction == "mean" else 1)


def nll_loss(input, target, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
             reduction: str = "mean", *, return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Negative log-likelihood on log-probabilities, as
    ``torch.nn.functional.nll_loss``: ``loss_i = -weight[t_i] * input[i, t_i]``;
    "mean" divides by the sum of the weights of the non-ignored targets."""
    if TR.active(input, target, weight):
        return TR.nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction, return_grad)
    input, target, weight = L.gathered(input, target, weight)
    reduction, kind, device, C, ignore_index = _class_dim_call(input, target, weight, size_average, reduce,
                                                              reduction, ignore_index)
    caller_input = input
    (input, target, weight), ac_dtype = _fp32_op("nll_loss", kind, device, input=input, target=target, weight=weight)
    target = V.unbatched_index_target(target, kind, input.ndim)
    V.check_index_target("target", target, kind, input, probabilities=False)
    V.check_weight("weight", weight, kind, C, input)
    wants(return_grad)
    target = V.as_index_target("target", target, kind)
    V.check_class_targets("target", target, kind, C, ignore_index)
    be = backend_for(kind, device, backend)
    if L.numel(input, kind) == 0:
        return L.loss_as(_empty_class(kind, input, target, False, ignore_index, 0.0, reduction, return_grad),
                         ac_dtype, kind)
    rows, layout = L.rows2d(input, kind, 1) if input.ndim >= 2 else (input.reshape(1, C), ("0d", (C,)))
    w = None if weight is None else V.as_float_vector(weight, kind, input)
    # (no float16 division after the op as in cross_entropy: the gradient is
    # one entry per row, w[t] / divisor, inside fp16's range up to ~10**7
    # rows, and torch makes only that entry NaN for a zero divisor)
    res = run("nll_loss", kind, be, [rows, target.reshape(-1), w], NllOptions(ignore_index, reduction),
              return_grad)
    if reduction == "none":
        res = res._replace(loss=res.loss.reshape(_row_loss_shape(input)))
    out = finish(res, return_grad, kind, input, layout, loss_dtype=ac_dtype)
    if return_grad and input is not caller_input:
        out = out._replace(grad=L.cast_like(out.grad, caller_input, kind))
    return out


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
    if TR.active(input, target):
        return TR.elementwise("kl_div", input, target, size_average, reduce, reduction, log_target,
                              return_grad=return_grad)
    if size_average is None and reduce is None and isinstance(reduction, str) and reduction == "mean":
        L.user_warning("reduction: 'mean' divides the total loss by both the batch size and the support size."
                       "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
                       "'mean' will be changed to behave the same as 'batchmean' in the next major release.", 2,
                       input)
    reduction = legacy_reduction(size_average, reduce, reduction, input)
    V.check_bool("log_target", log_target)
    return _elementwise("kl_div", input, target, reduction, return_grad, backend,
                        lambda red: KlDivOptions(bool(log_target), red), {}, broadcast=True, kl=True)


def _batchmean(res: LossResult, n: int) -> LossResult:
    """Turn a "sum" result into "batchmean" (sum / n) without a host sync."""
    inv = 1.0 / n if n else float("nan")
    scale = lambda a: None if a is None else a * inv  # noqa: E731
    return LossResult(scale(res.loss), scale(res.grad), scale(res.grad_target), res.lse)


def kl_div_with_logits(input, target, temperature: float = 1.0, reduction: str = "batchmean",
                       target_is_logits: bool = True, *, return_grad: Union[bool, str] = False,
                       backend: Optional[str] = None):
    """The lecture's divergence for distillation, from logits, per row along
    the last dimension: ``KL(d || softmax(input / T))`` with
    ``d = softmax(target / T)`` (teacher logits) or ``d = target``
    (probabilities).  Gradient w.r.t. input: ``(softmax(input / T) - d) / T``.

    reduction: "batchmean" (sum / number of rows; PyTorch's batchmean for
    2-D inputs), "sum", "mean" (sum / elements), "none" (one value per row).
    No ``T**2`` factor is applied.  No elements: each row's divergence is 0
    (an empty sum), "mean" NaN, "batchmean" NaN without rows."""
    if TR.active(input, target):
        V.check_positive("temperature", temperature)  # the options are checked on every path
        return TR.kl_div_with_logits(input, target, temperature, reduction, target_is_logits, return_grad)
    input, target = L.gathered(input, target)
    kind, device = classify([("input", input), ("target", target)])
    V.check_reduction(reduction, kl=True)
    V.check_floating("input", input, kind)
    V.check_floating("target", target, kind)
    V.check_same_shape("input", input, "target", target)
    caller = input, target
    (input, target), ac_dtype = _fp32_op("kl_div_logits", kind, device, input=input, target=target)
    V.check_positive("temperature", temperature)
    V.check_bool("target_is_logits", target_is_logits)
    wants(return_grad)
    if input.ndim == 0:
        raise ArgumentValueError("input must have at least 1 dimension, got a 0-d array")
    be = backend_for(kind, device, backend)
    x, layout = L.rows2d(input, kind, -1)
    if L.numel(input, kind) == 0:
        R = x.shape[0]
        rows = L.zeros(input, tuple(input.shape[:-1]), kind)
        div = {"none": 1, "sum": 1, "batchmean": R, "mean": 0}[reduction]
        loss = rows if reduction == "none" else rows.sum() * (1.0 / div if div else float("nan"))
        # input's dtype: NumPy 1.x promotes a float16 scalar times a Python float to float64
        loss = L.as_array(L.loss_as(L.connected(L.cast_like(loss, input, kind), kind, input), ac_dtype, kind), kind)
        return LossGrad(loss, L.zeros(caller[0], tuple(input.shape), kind)) if return_grad else loss
    t, _ = L.rows2d(target, kind, -1)
    summed = reduction in ("mean", "batchmean") and _fp16_mean(kind, return_grad, input)
    res = run("kl_div_logits", kind, be, [x, t],
              KlDivLogitsOptions(float(temperature), bool(target_is_logits), "sum" if summed else reduction),
              return_grad)
    if summed:
        res = _batchmean(res, x.shape[0] * (x.shape[1] if reduction == "mean" else 1))
    if reduction == "none":
        res = res._replace(loss=res.loss.reshape(input.shape[:-1]))
    out = finish(res, return_grad, kind, input, layout, loss_dtype=ac_dtype)
    if return_grad and input is not caller[0]:
        out = out._replace(grad=L.cast_like(out.grad, caller[0], kind),
                           grad_target=L.cast_like(out.grad_target, caller[1], kind))
    return out


# ---------------------------------------------------------------------------
# element-wise losses
# ---------------------------------------------------------------------------

def _elementwise(op: str, input, target, reduction, return_grad, backend, make_opts, named_weights: dict,
                 broadcast: bool = False, kl: bool = False):
    """The element-wise losses: one element of input and target gives one
    loss element.  ``broadcast``: input and target broadcast to a common
    shape (mse_loss, kl_div), else they must agree (BCE, as in torch).
    ``make_opts(reduction)`` builds the options record."""
    input, target, *ws = L.gathered(input, target, *named_weights.values())
    named_weights = dict(zip(named_weights, ws))
    kind, device = classify([("input", input), ("target", target)] + list(named_weights.items()),
                            optional=named_weights)
    caller_input, caller_target = input, target
    if op == "mse":  # torch promotes an integer or bool operand to the other's floating dtype
        input, target = _integral_promoted(kind, input, target)
    named_weights = {name: _integral_weight(kind, name, w, input) for name, w in named_weights.items()}
    args, ac_dtype = AC.fp32_op(op, kind, device, dict(input=input, target=target, **named_weights))
    input, target = args.pop("input"), args.pop("target")
    named_weights = args
    V.check_reduction(reduction, kl=kl)
    V.check_floating("input", input, kind)
    V.check_floating("target", target, kind)
    if not broadcast:  # torch's words: binary_cross_entropy's, binary_cross_entropy_with_logits's
        V.check_same_shape("input", input, "target", target,
                           "Using a target size ({b}) that is different to the input size ({a}) is deprecated. "
                           "Please ensure they have the same size." if op == "bce" else
                           "Target size ({b}) must be the same as input size ({a})")
    for name, w in named_weights.items():
        V.check_broadcastable(name, w, kind, input)
        V.check_no_grad(name, w, kind, op)
    wants(return_grad)
    if op == "bce":
        V.check_same_dtype("target", target, "input", input, kind)
        V.check_unit_interval("input", input, kind)
        V.check_unit_interval("target", target, kind)
    be = backend_for(kind, device, backend)
    # torch's dtypes: mse_loss and kl_div promote input and target; BCE with
    # logits gives its loss in the target's dtype, but its gradient from the
    # logits at their own precision: computed in the promoted dtype here, the
    # loss rounded to the target's after
    # (mse_loss broadcasts first, so a 0-d operand counts as dimensioned; kl_div does not)
    dt = L.result_dtype(kind, input, target, zero_dim_rule=op != "mse")
    loss_dt = target.dtype if op == "bce_with_logits" else dt
    xin, tin = L.astype(input, dt, kind), L.astype(target, dt, kind)
    xin, tin, bshape = L.broadcast_pair(xin, tin, kind, warn=op == "mse") if broadcast else (xin, tin, None)
    # not BCE on probabilities: its gradient (p - y) / (p (1 - p)) is unbounded, and undivided it overflows
    # fp16 wherever p (1 - p) < ~1.5e-5 (-73853 at p = 7.7e-6: -inf, where torch's, divided, is -1368)
    summed = reduction == "mean" and L.numel(xin, kind) > 0 and op != "bce" and _fp16_mean(kind, return_grad, xin, tin)
    red = "sum" if reduction == "batchmean" or summed else reduction
    # undivided, mse's gradient 2 (x - y) overflows fp16 past |x - y| = 32752 where torch's, divided, is finite:
    # the op saves x - y (exact for nearby values, finite up to 65504) and the factor 2 joins the upstream
    half = summed and op == "mse"
    if L.numel(xin, kind) == 0:
        res = _empty_elementwise(kind, xin, tin, red)
    else:
        # the op runs over the memory in torch's result order (a "none" loss comes back in that layout)
        order = _result_order(op, kind, xin, tin, named_weights.get("pos_weight"))
        weights = list(named_weights.values())
        if order is not None:
            xin_, tin_ = L.permute(xin, order, kind), L.permute(tin, order, kind)
            weights = [L.permute(w, order, kind, xin.ndim) for w in weights]
        else:
            xin_, tin_ = xin, tin
        x, layout = L.rows2d(xin_, kind, -1)
        t, _ = L.rows2d(tin_, kind, -1)
        arrays = [x, t] + [None if w is None else V.as_row_broadcast(w, kind, xin_, x) for w in weights]
        res = run(op, kind, be, arrays, make_opts(red, 0.5) if half else make_opts(red), return_grad)
        if half:
            from .torch_ops import grad_factor
            res = res._replace(loss=grad_factor(res.loss, 2.0))
        back = None if order is None else L.inverse_order(order)
        unrow = lambda a: L.permute(L.from_rows(a, kind, layout), back, kind) if back else L.from_rows(  # noqa: E731
            a, kind, layout)
        res = LossResult(unrow(res.loss) if red == "none" else res.loss, unrow(res.grad), unrow(res.grad_target))
    if reduction == "batchmean":  # torch: sum / input.size(0)
        res = _batchmean(res, input.shape[0] if input.ndim else 1)
    elif summed:
        res = _batchmean(res, L.numel(xin, kind))
    if return_grad and bshape is not None:
        res = res._replace(grad=L.sum_to(res.grad, tuple(input.shape), kind),
                           grad_target=L.sum_to(res.grad_target, tuple(target.shape), kind))
    dt = ac_dtype or loss_dt  # the promoted dtype (BCE with logits: target's), not input's; float32 under autocast
    res = res._replace(loss=L.astype(res.loss, dt, kind))
    if not V.is_floating(caller_target, kind):  # an integer target has no gradient
        res = res._replace(grad_target=None)
    out = finish(res, return_grad, kind, xin, ("0d", tuple(input.shape)),
                  target_layout=("0d", tuple(target.shape)), target_like=caller_target, loss_dtype=dt)
    if not return_grad:
        return out
    if not V.is_floating(caller_input, kind):  # an integer or bool input has no gradient (as the target)
        return out._replace(grad=None)
    return out._replace(grad=L.cast_like(out.grad, caller_input, kind))


def _result_order(op: str, kind: str, xin, tin, pos_weight):
    """The dimension order of torch's result of an element-wise loss
    (:func:`gpuloss._layout.iteration_order`; None: row-major).  Which
    operand decides follows torch's formulas: ``mse_loss`` input then target;
    ``kl_div`` and the BCE with logits target first (their first operation
    is on the target: ``xlogy(target, target)``, ``(1 - target)``,
    ``(pos_weight - 1) * target``); ``binary_cross_entropy``
    ``empty_like(input)``: input's layout when it is dense, else row-major."""
    shape = tuple(xin.shape)
    if op == "bce":
        return L.iteration_order(kind, shape, xin) if L.dense(xin, kind) else None
    if op == "mse":
        return L.iteration_order(kind, shape, xin, tin)
    return L.iteration_order(kind, shape, pos_weight, tin, xin)


def _integral_promoted(kind: str, input, target):
    """mse_loss's operands as torch's type promotion gives them: an integer
    or bool array next to a floating one takes the floating one's dtype
    (torch's category rule, for NumPy and CuPy arrays too, where NumPy's own
    would give float64 for float32 and int64).  Two integral operands stay
    as they are (and are refused, as torch refuses them)."""
    fx, ft = V.is_floating(input, kind), V.is_floating(target, kind)
    if fx and not ft and V.is_integral(target, kind):
        return input, L.astype(target, input.dtype, kind)
    if ft and not fx and V.is_integral(input, kind):
        return L.astype(input, target.dtype, kind), target
    return input, target


def _integral_weight(kind: str, name: str, w, input):
    """The BCE losses' ``weight`` / ``pos_weight`` as torch takes them: an
    integer (or, for ``weight``, bool) array in input's floating dtype.  A
    bool ``pos_weight`` is refused, as torch refuses it (it subtracts 1)."""
    if w is None or V.is_floating(w, kind) or not V.is_integral(w, kind) or not V.is_floating(input, kind):
        return w
    if name == "pos_weight" and dtype_name(w, kind) == "bool":
        raise ArgumentTypeError("pos_weight must be a floating-point or integer array, got bool (torch subtracts 1 "
                                "from it, which a bool tensor does not support)")
    return L.astype(w, input.dtype, kind)


def _empty_elementwise(kind: str, input, target, reduction: str) -> LossResult:
    """An element-wise loss over no elements, as torch: "none" an empty
    array of input's shape, "sum" 0, "mean" NaN; zero-size gradients."""
    if reduction == "none":
        loss = L.zeros(input, tuple(input.shape), kind)
    else:
        loss = L.zeros(input, (), kind) + (float("nan") if reduction == "mean" else 0.0)
    loss = L.connected(loss, kind, input, target)
    return LossResult(loss, L.zeros(input, tuple(input.shape), kind), L.zeros(target, tuple(target.shape), kind))


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction: str = "mean", pos_weight=None, *,
                                     return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Sigmoid + binary cross-entropy in one stable step, as
    ``torch.nn.functional.binary_cross_entropy_with_logits``::

        loss = weight * ((1 - t) x + (1 + (pos_weight - 1) t) log(1 + exp(-x)))

    ``weight`` broadcasts against input; ``pos_weight`` along the last
    dimension.  Gradient w.r.t. x without pos_weight: ``weight (sigmoid(x) - t)``."""
    if TR.active(input, target, weight, pos_weight):
        return TR.elementwise("binary_cross_entropy_with_logits", input, target, weight, size_average, reduce,
                              reduction, pos_weight, return_grad=return_grad)
    reduction = legacy_reduction(size_average, reduce, reduction, input)
    return _elementwise("bce_with_logits", input, target, reduction, return_grad, backend, ReductionOptions,
                        {"weight": weight, "pos_weight": pos_weight})


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction: str = "mean",
                         *, return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Binary cross-entropy on probabilities, as
    ``torch.nn.functional.binary_cross_entropy`` (each log clamped at -100;
    input and target must lie in [0, 1])."""
    if TR.active(input, target, weight):
        return TR.elementwise("binary_cross_entropy", input, target, weight, size_average, reduce, reduction,
                              return_grad=return_grad)
    reduction = legacy_reduction(size_average, reduce, reduction, input)
    return _elementwise("bce", input, target, reduction, return_grad, backend, ReductionOptions,
                        {"weight": weight})


def mse_loss(input, target, size_average=None, reduce=None, reduction: str = "mean", weight=None, *,
             return_grad: Union[bool, str] = False, backend: Optional[str] = None):
    """Mean squared error, as ``torch.nn.functional.mse_loss``: ``(x - t)**2``;
    input and target broadcast against each other, as in torch.

    ``weight`` (torch's, of input's shape): ``weight * (x - t)**2`` per
    element, and "mean" divides their sum by ``weight.sum()``.

    The lecture's L2 divergence ``1/2 ||Y - d||^2`` is
    ``mse_loss(Y, d, reduction="sum") / 2``, with gradient ``Y - d``."""
    if TR.active(input, target, weight):
        return TR.elementwise("mse_loss", input, target, size_average, reduce, reduction, return_grad=return_grad,
                              weight=weight)
    reduction = legacy_reduction(size_average, reduce, reduction, input)
    if weight is None:
        return _elementwise("mse", input, target, reduction, return_grad, backend, ReductionOptions, {},
                            broadcast=True)
    kind = _check_mse_weight(input, target, weight, reduction, return_grad)
    res = _elementwise("mse", input, target, "none", return_grad, backend, ReductionOptions, {}, broadcast=True)
    return _weighted_mse(res, weight, reduction, return_grad, kind)


def _check_mse_weight(input, target, weight, reduction: str, return_grad) -> str:
    """torch requires ``weight`` of input's shape (its ValueError and message
    otherwise); the gradient form needs the target of that shape too."""
    kind, _ = classify([("input", input), ("target", target), ("weight", weight)])
    V.check_reduction(reduction)
    if tuple(weight.shape) != tuple(input.shape):
        raise ArgumentValueError(f"Weights and input must have the same size: weight of shape {tuple(weight.shape)}, "
                                 f"input of shape {tuple(input.shape)}")
    if return_grad and tuple(target.shape) != tuple(input.shape):
        raise ArgumentValueError("mse_loss with weight and return_grad needs target of input's shape (the gradient "
                                 "per element); broadcast the target first")
    return kind


def _weighted_mse(res, weight, reduction: str, return_grad, kind: str):
    """torch's weighted mean squared error from the fused per-element loss
    ``res`` (with its gradient under return_grad): times ``weight``, reduced;
    "mean" is ``sum(w se) / sum(w)``.  With autograd, ``weight`` is
    differentiated too (a plain factor here)."""
    wse = (res.loss if return_grad else res) * weight
    w_sum = weight.sum() if reduction == "mean" else None  # once, for the loss and the gradient scale
    loss = wse if reduction == "none" else L.as_array(wse.sum() if w_sum is None else wse.sum() / w_sum, kind)
    if not return_grad:
        return loss
    scale = weight if w_sum is None else weight / w_sum
    grad_target = None if res.grad_target is None else L.cast_like(res.grad_target * scale, res.grad_target, kind)
    return res._replace(loss=loss, grad=L.cast_like(res.grad * scale, res.grad, kind), grad_target=grad_target)
