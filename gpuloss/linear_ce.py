"""Fused linear + cross-entropy with torch's API:
``linear_cross_entropy(input, linear_weight, target, *, linear_bias=None,
weight=None, reduction="mean", ignore_index=None, label_smoothing=0.0,
options=None)``, the loss of ``cross_entropy(linear(input, linear_weight,
linear_bias), target, ...)`` and its gradients, without ever holding the
``N x V`` logits.

Why
---
An LLM's output layer maps ``N`` hidden states of width ``H`` to ``V``
vocabulary logits.  At N = 8192, V = 128256 the logits alone are 2 GiB in
bf16, their gradient 2 GiB more, and an eager ``F.cross_entropy`` adds its
fp32 temporaries (12 GiB at N = 16384, bench/RESULTS.md).  Here the tokens are processed in
chunks, one ``(chunk, V)`` logits buffer at a time, our fused cross-entropy
kernel writing its gradient in place (:mod:`gpuloss._linear_chunks` has the
loop and its memory traffic).

Semantics are torch's, argument for argument (``torch.nn.functional.
linear_cross_entropy`` of torch 2.13, whether or not the installed torch has
it): ``input`` (in_features,) or (N, in_features); ``linear_weight`` (C, H)
or (C, d1, ..., dK, H) for a K-dimensional loss; class-index targets, or
probability targets of the logits' shape; ``ignore_index=None`` meaning -100
for class indices (and refused with probabilities); ``options`` (a
:class:`LinearCrossEntropyOptions`) is honoured where it has a meaning here:
``batch_chunk_size`` and ``chunking_method`` size the chunks, ``acc_policy``
"compact" and ``acc_dtype`` choose the accumulation of the weight gradient,
``allow_retain_graph`` keeps the saved gradients (a backward with
``retain_graph=True`` keeps them anyway).  Our extras are keyword-only:
``z_loss``, ``softcap``, ``chunk_size``, ``acc_dtype``, ``backend``,
``return_grad``.  Unlike torch's reference path (``options=None``), every
call runs chunked.

torch tensors backpropagate through the ``gpuloss::linear_cross_entropy``
custom operator (:mod:`gpuloss.torch_ops`), which ``torch.compile`` traces
without graph breaks; NumPy and CuPy arrays take ``return_grad=True``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _autocast as AC
from . import _layout as Lay
from . import _traced as TR
from . import _validate as VAL
from . import launch
from ._arrays import classify, dtype_name
from ._call import deprecated_mean
from ._linear_chunks import chunk_rows, default_chunk_size
from .dispatch import select, select_name
from .errors import ArgumentTypeError, ArgumentValueError
from .ops import LinearCEOptions, LinearWant

__all__ = ["LinearLossGrad", "linear_cross_entropy", "default_chunk_size", "LinearCrossEntropyOptions"]


class LinearLossGrad(NamedTuple):
    """Loss and gradients of :func:`linear_cross_entropy` (``return_grad=True``).

    loss:               the loss (0-d, or target's shape for ``reduction="none"``)
    grad_input:         d loss / d input, input's shape and dtype
    grad_linear_weight: d loss / d linear_weight, its shape and dtype
    grad_linear_bias:   d loss / d linear_bias, or None without a bias

    For ``reduction="none"`` the gradients are those of the sum of the
    per-sample losses.
    """
    loss: Any
    grad_input: Any
    grad_linear_weight: Any
    grad_linear_bias: Any = None


@dataclasses.dataclass(frozen=True)
class _Options:
    """torch's ``LinearCrossEntropyOptions`` fields, for a torch that lacks
    the class (before 2.13).  Same names, defaults and validation."""
    allow_retain_graph: bool = False
    batch_chunk_size: Optional[int] = None
    chunking_method: Optional[str] = "auto"
    acc_policy: str = "auto"
    acc_dtype: Any = None

    def __post_init__(self):
        if self.acc_policy not in {"auto", "accurate", "balanced", "compact"}:
            raise ArgumentValueError(f"invalid acc_policy: {self.acc_policy!r}")
        if self.chunking_method is not None and self.chunking_method != "auto":
            name, sep, factor = self.chunking_method.partition(":")
            if not (name == "aspect_ratio" and (not sep or (factor.isdigit() and int(factor) > 0))):
                raise ArgumentValueError(f"invalid chunking_method: {self.chunking_method!r}")
        if not (self.batch_chunk_size is None or (isinstance(self.batch_chunk_size, int)
                                                  and self.batch_chunk_size > 0)):
            raise ArgumentValueError(f"batch_chunk_size must be positive int or None, got {self.batch_chunk_size!r}")
        if self.acc_dtype is not None and str(self.acc_dtype).replace("torch.", "") not in (
                "float16", "bfloat16", "float32", "float64"):
            raise ArgumentValueError(f"acc_dtype must be one of {{None, torch.float16, torch.bfloat16, torch.float32, "
                                     f"torch.float64}}, got {self.acc_dtype!r}. Pass acc_dtype=None to let the op "
                                     f"pick automatically.")


def __getattr__(name: str):
    # torch's class where the installed torch has it, else ours; resolved on
    # first use so that importing gpuloss does not import torch
    if name == "LinearCrossEntropyOptions":
        try:
            import torch
            cls = getattr(torch.nn, "LinearCrossEntropyOptions", _Options)
        except ImportError:
            cls = _Options
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------
# validation: one pass over torch's rules
# ---------------------------------------------------------------------------

class _Call(NamedTuple):
    kind: str
    device: str
    prob: bool
    C: int
    out_features: tuple
    ignore_index: int


def _check_shapes(input, linear_weight, linear_bias, kind: str):
    """(C, out_features) after torch's shape rules for input, weight and bias."""
    VAL.check_floating("input", input, kind)
    VAL.check_floating("linear_weight", linear_weight, kind)
    if input.ndim not in (1, 2):
        raise ArgumentValueError(f"input must be 1-D (in_features,) or 2-D (N, in_features), as in torch's "
                                 f"linear_cross_entropy, got shape {tuple(input.shape)}; flatten leading "
                                 f"dimensions first")
    if linear_weight.ndim < 2:
        raise ArgumentValueError(f"linear_weight must have at least 2 dimensions (C, ..., in_features), got shape "
                                 f"{tuple(linear_weight.shape)}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise ArgumentValueError(f"input's last dimension {input.shape[-1]} does not match linear_weight's in_features "
                                 f"{linear_weight.shape[-1]}")
    if dtype_name(input, kind) != dtype_name(linear_weight, kind):
        raise ArgumentTypeError(f"input and linear_weight must have the same dtype, got {dtype_name(input, kind)} and "
                                f"{dtype_name(linear_weight, kind)}")
    C, out = int(linear_weight.shape[0]), tuple(int(d) for d in linear_weight.shape[1:-1])
    if len(out) > 0 and input.ndim == 1:
        raise ArgumentValueError(f"a K-dimensional loss (linear_weight of shape {tuple(linear_weight.shape)}) needs "
                                 f"batched input (N, in_features), got shape {tuple(input.shape)}")
    if linear_bias is not None:
        VAL.check_floating("linear_bias", linear_bias, kind)
        if tuple(linear_bias.shape) != (C, *out):
            raise ArgumentValueError(f"linear_bias must have shape {(C, *out)}, got {tuple(linear_bias.shape)}")
        if dtype_name(linear_bias, kind) != dtype_name(linear_weight, kind):
            raise ArgumentTypeError(f"linear_bias must have linear_weight's dtype {dtype_name(linear_weight, kind)}, "
                                    f"got {dtype_name(linear_bias, kind)}")
    return C, out


def _check_target(target, input, C: int, out: tuple, ignore_index, kind: str):
    """(target, prob, ignore_index as an int); target () for (1,) next to unbatched input."""
    logits_shape = tuple(input.shape[:-1]) + (C,) + out
    floating = VAL.is_floating(target, kind)
    if floating:
        VAL.check_float_target_batch("target", target, input)
    if floating and tuple(target.shape) == logits_shape:
        if ignore_index is not None:
            raise ArgumentValueError("ignore_index cannot be specified when target contains probabilities")
        return target, True, -100
    want = tuple(input.shape[:-1]) + out
    target = VAL.unbatched_index_target(target, kind, input.ndim)
    if not VAL.is_integer(target, kind):
        raise ArgumentTypeError(f"target must hold integer class indices of shape {want}, or probabilities of the "
                                f"logits' shape {logits_shape}; got {dtype_name(target, kind)} of shape "
                                f"{tuple(target.shape)}")
    if tuple(target.shape) != want and tuple(target.shape) == logits_shape:  # torch: class probabilities
        raise ArgumentTypeError(f"target has the logits' shape {logits_shape}, which makes it class probabilities, "
                                f"but holds {dtype_name(target, kind)}: probabilities must be floating point; "
                                f"class indices have shape {want}")
    if tuple(target.shape) != want:
        raise ArgumentValueError(f"target has shape {tuple(target.shape)} but class-index targets for input "
                                 f"{tuple(input.shape)} and linear_weight {(C, *out, input.shape[-1])} need shape "
                                 f"{want}")
    return target, False, -100 if ignore_index is None else VAL.check_ignore_index("ignore_index", ignore_index)


def _aspect_ratio_chunk(method: str, n_tokens: int, H: int, vocab: int) -> int:
    """torch's ``chunking_method="aspect_ratio[:N]"`` chunk size (before its clamp to >= 1)."""
    factor = int(method.split(":", 1)[1]) if ":" in method else 1
    target = -(-n_tokens // -(-vocab // max(H, 1)))
    return min((1 << max(0, (target - 1).bit_length())) // factor, n_tokens)


def _check_chunked_options(options, acc_dtype, n_tokens: int, H: int, C: int, input_dtype: str) -> None:
    """What torch's chunked path refuses in ``options`` where it takes the
    call (class indices, no smoothing, no out_features): a batch_chunk_size
    that its chunking_method contradicts (ValueError), and an acc_dtype other
    than the input's except float32 for 16-bit inputs (RuntimeError; ours is
    both).  gpuloss's own ``acc_dtype`` argument takes precedence and is not
    bound by it."""
    method = options.chunking_method
    if options.batch_chunk_size is not None and method not in (None, "auto"):
        size = _aspect_ratio_chunk(method, n_tokens, H, C)
        if size != options.batch_chunk_size:
            raise ArgumentValueError(f"batch_chunk_size (={options.batch_chunk_size}) and chunking_method "
                                     f"('{method}') give different chunk sizes ({options.batch_chunk_size} vs "
                                     f"{size}); pass only one.")
    acc = options.acc_dtype
    if acc_dtype is None and acc is not None:
        acc = str(acc).replace("torch.", "")
        if acc != input_dtype and not (input_dtype in ("float16", "bfloat16") and acc == "float32"):
            raise ArgumentValueError(f"linear_cross_entropy supports float32 acc_dtype with float16/bfloat16 "
                                     f"inputs, but got torch.{acc} acc_dtype and torch.{input_dtype} inputs.")


def _asked_acc(options, acc_dtype):
    """The accumulation dtype asked for: gpuloss's ``acc_dtype`` argument,
    else ``options.acc_dtype`` (None where neither names one)."""
    return acc_dtype if acc_dtype is not None else getattr(options, "acc_dtype", None)


def _chunked_logits(options, chunked: bool, input_dtype: str, acc_dtype, device: str) -> str:
    """The dtype of each chunk's logits (``LinearCEOptions.logits``).  With
    ``options`` torch's chunked path forms them in its ``acc_dtype``: float32
    for 16-bit operands when ``acc_dtype`` is float32, or None under
    ``acc_policy="auto"`` (an explicit policy with no ``acc_dtype`` keeps the
    input's dtype throughout); the softmax of logits never rounded to bf16.
    Not for float16 under a memory-saving ``acc_policy`` ("balanced",
    "compact"; "auto" is "compact" on a GPU, "accurate" on the CPU), which
    keeps float16 logits there, nor without ``options`` (``F.linear``'s
    logits, in the operands' dtype)."""
    if not chunked or input_dtype not in ("float16", "bfloat16"):
        return "input"
    acc = _asked_acc(options, acc_dtype)
    if acc is None and options.acc_policy != "auto":
        return "input"
    if acc is not None and str(acc).replace("torch.", "") != "float32":
        return "input"
    if input_dtype == "float16":
        policy = options.acc_policy
        if policy == "auto":
            policy = "accurate" if device == "cpu" else "compact"
        if policy in ("balanced", "compact"):
            return "input"
    return "float32"


def _resolve_options(options, chunk_size, acc_dtype, n_tokens: int, H: int, vocab: int, weight, kind: str,
                     device: str, allow_retain_graph: bool, logits32: bool = False):
    """(chunk tokens, accumulate, allow_retain_graph) from torch's options and our extras."""
    if options is not None:
        for f in ("batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype", "allow_retain_graph"):
            if not hasattr(options, f):
                raise ArgumentTypeError(f"options must be a LinearCrossEntropyOptions, got {type(options).__name__}")
    VAL.check_chunk_size("chunk_size", chunk_size)
    method = getattr(options, "chunking_method", None)
    if chunk_size is None and options is not None and options.batch_chunk_size is not None:
        chunk_size = options.batch_chunk_size
    elif chunk_size is None and method not in (None, "auto"):
        chunk_size = max(1, _aspect_ratio_chunk(method, n_tokens, H, vocab))
    if chunk_size is None:  # the op bounds it by the tokens (see chunk_rows)
        itemsize = 4 if logits32 else {"float16": 2, "bfloat16": 2, "float64": 8}.get(dtype_name(weight, kind), 4)
        chunk_size = chunk_rows(vocab, itemsize, "cpu" if device == "cpu" else "cuda")
    acc = _asked_acc(options, acc_dtype)
    wname = dtype_name(weight, kind)
    accumulate = "weight" if getattr(options, "acc_policy", "auto") == "compact" and acc is None else "float32"
    if acc is not None:
        name = str(acc).replace("torch.", "")
        if name not in ("float16", "bfloat16", "float32", "float64", "float32_split"):
            raise ArgumentValueError(f"acc_dtype must be None, a floating dtype or 'float32_split', got {acc!r}")
        accumulate = "split" if name == "float32_split" else "weight" if name == wname else "float32"
    retain = allow_retain_graph or bool(getattr(options, "allow_retain_graph", False))
    return int(chunk_size), accumulate, retain


def _prepare(kind, device, input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
             label_smoothing, options, z_loss, softcap, chunk_size, acc_dtype, allow_retain_graph, autocast: bool):
    reduction = deprecated_mean(reduction, 4, input)
    VAL.check_reduction(reduction)
    C, out = _check_shapes(input, linear_weight, linear_bias, kind)
    target, prob, ii = _check_target(target, input, C, out, ignore_index, kind)
    label_smoothing = VAL.check_ce_options(label_smoothing, z_loss, softcap)  # also a bool or 0-d tensor, as torch
    # under autocast the cross-entropy runs in float32: any floating class-weight dtype; with
    # ``options`` where torch's chunked op takes the call, any dtype (it converts the weight)
    chunked = (options is not None and reduction in ("mean", "sum", "none") and not label_smoothing and not prob
               and len(out) == 0 and dtype_name(target, kind) == "int64")
    VAL.check_weight("weight", weight, kind, C, None if autocast else input, prob, any_dtype=chunked)
    VAL.check_bool("allow_retain_graph", allow_retain_graph)
    P = math.prod(out)
    n_tokens = input.shape[0] if input.ndim == 2 else 1
    logits = _chunked_logits(options, chunked and not autocast, dtype_name(input, kind), acc_dtype, device)
    chunk, accumulate, retain = _resolve_options(options, chunk_size, acc_dtype, n_tokens, input.shape[-1], C * P,
                                                 linear_weight, kind, device, allow_retain_graph,
                                                 logits == "float32")
    if chunked and not autocast:  # (options is a LinearCrossEntropyOptions: _resolve_options checked)
        _check_chunked_options(options, acc_dtype, n_tokens, input.shape[-1], C, dtype_name(input, kind))
    if not prob:
        target = VAL.as_index_target("target", target, kind)
        VAL.check_class_targets("target", target, kind, C, ii)
    opts = LinearCEOptions(ii, reduction, float(label_smoothing), float(z_loss),
                           None if softcap is None else float(softcap), C, chunk, accumulate, retain, logits)
    return _Call(kind, device, prob, C, out, ii), target, opts


# ---------------------------------------------------------------------------
# the K-dimensional layout: positions outermost
# ---------------------------------------------------------------------------

def _to_op_layout(c: _Call, input, linear_weight, linear_bias, target):
    """2-D hidden (N, H); weight (P C, H) and bias (P C,) with the P positions
    outermost; targets as (N P,) class indices or (N P, C) probability rows."""
    H = input.shape[-1]
    h = input.reshape(-1, H)
    P = math.prod(c.out_features)
    if P == 1 and not c.out_features:
        W, b = linear_weight, linear_bias
    else:
        W = Lay.movedim(linear_weight.reshape(c.C, P, H), c.kind, 1, 0).reshape(P * c.C, H)
        b = None if linear_bias is None else Lay.movedim(linear_bias.reshape(c.C, P), c.kind, 1, 0).reshape(-1)
    if c.prob:
        t = Lay.movedim(target.reshape(h.shape[0], c.C, P), c.kind, 1, 2).reshape(-1, c.C)
    else:
        t = target.reshape(-1)
    return h, W, b, t


def _from_op_layout(c: _Call, grad_w, grad_b, linear_weight):
    """Gradients of the permuted weight and bias back in linear_weight's layout."""
    if not c.out_features:
        return grad_w, grad_b
    P, H = math.prod(c.out_features), linear_weight.shape[-1]
    gw = Lay.movedim(grad_w.reshape(P, c.C, H), c.kind, 0, 1).reshape(tuple(linear_weight.shape))
    gb = None if grad_b is None else Lay.movedim(grad_b.reshape(P, c.C), c.kind, 0, 1).reshape(
        (c.C,) + c.out_features)
    return gw, gb


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction: str = "mean",
                         ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                         z_loss: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                         acc_dtype=None, allow_retain_graph: bool = False, return_grad: bool = False,
                         loss_dtype=None, backend: Optional[str] = None):
    """``cross_entropy(linear(input, linear_weight, linear_bias), target)``
    computed in token chunks so that the ``N x C`` logits never exist; the
    arguments, defaults and results of ``torch.nn.functional.linear_cross_entropy``.

    Parameters
    ----------
    input : (H,) or (N, H) floating array (NumPy, CuPy or torch)
    linear_weight : (C, H), or (C, d1, ..., dK, H) for a K-dimensional loss;
        input's dtype
    target : class indices of shape (), (N,) or (N, d1, ..., dK); or class
        probabilities of the logits' shape (C,), (N, C) or (N, C, d1, ...)
    linear_bias : optional (C,) or (C, d1, ..., dK), linear_weight's dtype
    weight : optional (C,) class weights
    reduction : "mean" (divided by the sum of the class weights of the valid
        targets), "sum", or "none"
    ignore_index : class index that contributes nothing; None means -100
        (and must be None for probability targets), as in torch
    label_smoothing : at most 1 (as torch: a negative or NaN value smooths nothing)
    options : torch's ``LinearCrossEntropyOptions`` (see the module docstring)
    z_loss, softcap : as in :func:`gpuloss.cross_entropy`
    chunk_size : tokens per chunk (default: one logits chunk of at most 256 MiB
        on a GPU, 64 MiB on the CPU, or what ``options`` says)
    acc_dtype : the dtype grad_linear_weight / grad_linear_bias accumulate in
        across chunks: float32 (default for 16-bit weights) or the weight's
        dtype (one rounding per chunk, ``V x H x 4`` bytes less memory), or
        "float32_split": the same float32 sums, held as the bf16 gradient
        itself plus a ``V x H`` int16 buffer of their low halves (``V x H x 2``
        bytes less than float32; bf16 weights on the Triton backend, else as
        float32; not yet measured on a GPU, so not the default)
    allow_retain_graph : torch autograd, "mean"/"sum": backward scales the
        saved gradients by the upstream gradient in place unless it keeps the
        graph (``retain_graph=True``); True always multiplies out of place
    return_grad : return :class:`LinearLossGrad` (the gradients of the loss,
        for "none" of the sum of the per-sample losses); without it NumPy/CuPy
        get the loss only and torch tensors a loss that backpropagates
    loss_dtype : the loss's dtype (default: input's, torch's rule); float32
        for bf16 operands gives the loss as accumulated, unrounded
    backend : "numpy" | "triton" | "cupy" | None (automatic)

    Returns
    -------
    The loss in input's dtype or ``loss_dtype`` (0-d, or target's
    per-sample shape for "none"), or a :class:`LinearLossGrad`.
    """
    if not isinstance(return_grad, (bool, np.bool_)):  # "all", 1, 1.0 or a tensor: refused by name
        err = ArgumentValueError if isinstance(return_grad, str) else ArgumentTypeError
        raise err(f"return_grad must be False or True, got {return_grad!r}")
    if TR.active(input, linear_weight, target, linear_bias, weight):
        VAL.check_ce_options(label_smoothing, z_loss, softcap)  # the options are checked on every path
        VAL.check_chunk_size("chunk_size", chunk_size)
        return TR.linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                       label_smoothing, z_loss, softcap, return_grad, loss_dtype)
    if type(linear_weight).__name__ == "DTensor" and not return_grad and options is None and acc_dtype is None \
            and not allow_retain_graph:
        from .distributed import dtensor
        if dtensor.weight_class_sharded(input, linear_weight, target, linear_bias, weight):
            # the weight sharded along the classes (tensor parallelism): never gathered
            VAL.check_chunk_size("chunk_size", chunk_size)
            return dtensor.linear_cross_entropy(
                input, linear_weight, target, linear_bias, -100 if ignore_index is None else ignore_index, reduction,
                label_smoothing, z_loss, softcap, chunk_size, VAL.as_float_dtype("loss_dtype", loss_dtype, "torch"))
    input, linear_weight, target, linear_bias, weight = Lay.gathered(input, linear_weight, target, linear_bias, weight)
    kind, device = classify([("input", input), ("linear_weight", linear_weight), ("target", target),
                             ("linear_bias", linear_bias), ("weight", weight)],
                            optional=("linear_bias", "weight"))
    # the chunks compute in the caller's array library: NumPy arrays in its byte order
    input, linear_weight, target, linear_bias, weight = (Lay.native_array(a, kind) for a in (
        input, linear_weight, target, linear_bias, weight))
    # torch.autocast: F.linear's operands in autocast's dtype, the loss in float32
    (input, linear_weight, linear_bias), autocast = AC.linear_operands(kind, device, input, linear_weight,
                                                                       linear_bias)
    c, target, opts = _prepare(kind, device, input, linear_weight, target, linear_bias, weight, reduction,
                               ignore_index, label_smoothing, options, z_loss, softcap, chunk_size, acc_dtype,
                               allow_retain_graph, autocast is not None)
    loss_dtype = VAL.as_float_dtype("loss_dtype", loss_dtype, c.kind)
    if autocast is not None and loss_dtype is None:
        loss_dtype = AC.fp32_op("cross_entropy", kind, device, {"logits": input})[1]
    if c.prob:
        input, linear_weight, linear_bias, loss_dtype = _promoted(c.kind, input, linear_weight, linear_bias,
                                                                  target, weight, loss_dtype)
    logits_shape = tuple(input.shape[:-1]) + (c.C,) + c.out_features
    if math.prod(logits_shape) == 0:
        return Lay.loss_as(_empty(c, input, linear_weight, linear_bias, target, weight, opts, logits_shape,
                                  return_grad), loss_dtype, c.kind)
    if input.shape[-1] == 0:
        return _no_features(c, input, linear_weight, linear_bias, target, weight, opts, logits_shape, return_grad,
                            loss_dtype, backend)
    h, W, b, t = _to_op_layout(c, input, linear_weight, linear_bias, target)
    cw = None if weight is None else VAL.as_float_vector(weight, c.kind, linear_weight)
    arrays = [h, W, b, t, cw]
    loss_shape = tuple(target.shape) if not c.prob else tuple(input.shape[:-1]) + c.out_features
    if c.kind == "torch":  # the backend chosen once, by name (see gpuloss.functional)
        be = select_name(c.kind, c.device, backend)
        if not return_grad:
            loss = _autograd(be, arrays, opts, input, loss_shape, loss_dtype)
            if c.prob and torch_grad_of(target, weight):
                loss = loss + _prob_target_term(c, h, W, b, t, weight, opts, loss_shape).to(loss.dtype)
            return loss
        import torch
        from . import torch_ops
        with torch.no_grad():
            outs = torch_ops.call("linear_cross_entropy", be, arrays, opts, LinearWant(True, True, b is not None))
        loss, gh, gw, gb = [None if (i and tuple(o.shape) == (0,)) else o for i, o in enumerate(outs)]
    else:
        want = LinearWant(True, True, b is not None) if return_grad else LinearWant()
        loss, gh, gw, gb = launch.run(select(c.kind, c.device, backend), "linear_cross_entropy", arrays, opts,
                                      want, c.kind)
    loss = _loss_out(loss, c.kind, input, loss_shape, opts.reduction, loss_dtype)
    if not return_grad:
        return loss
    gw, gb = _from_op_layout(c, gw, gb, linear_weight)
    # (float32 from the op for float16 operands: see gpuloss._linear_chunks)
    return LinearLossGrad(loss, Lay.cast_like(gh.reshape(tuple(input.shape)), input, c.kind),
                          Lay.cast_like(gw, linear_weight, c.kind), Lay.cast_like(gb, linear_bias, c.kind))


def _promoted(kind: str, input, linear_weight, linear_bias, target, weight, loss_dtype):
    """Probability targets: torch promotes the logits, the probabilities and
    the class weights to one dtype, the loss's.  16-bit operands with float32
    probabilities keep their matmuls and give the loss as accumulated in
    float32; float64 probabilities or weights make the whole computation
    float64."""
    dt = VAL.floating_result_dtype(kind, input, target, weight)
    if dt == input.dtype:
        return input, linear_weight, linear_bias, loss_dtype
    if str(dt).replace("torch.", "") == "float64":
        return (Lay.astype(input, dt, kind), Lay.astype(linear_weight, dt, kind),
                Lay.astype(linear_bias, dt, kind), loss_dtype)
    return input, linear_weight, linear_bias, dt if loss_dtype is None else loss_dtype


def torch_grad_of(*tensors) -> bool:
    """Whether autograd is to differentiate the loss into any of these."""
    import torch
    return torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in tensors)


def _prob_target_term(c: _Call, h, W, b, t, weight, opts: LinearCEOptions, loss_shape):
    """The probabilities' and class weights' gradients (torch's), as
    :func:`gpuloss.functional.prob_target_term` forms them for
    cross_entropy, from the logits recomputed chunk by chunk with no graph:
    one more projection, and an ``N x C`` buffer the size of the
    probabilities, only when one of them requires grad."""
    import torch
    from .functional import neg_log_softmax, prob_target_term
    rows, tokens = t.shape[0], h.shape[0]
    per_token = rows // tokens
    dt = torch.float64 if torch.float64 in (t.dtype, W.dtype) else torch.float32
    with torch.no_grad():
        a = torch.empty((rows, c.C), dtype=dt, device=t.device)
        for i in range(0, tokens, opts.chunk_size):
            z = torch.nn.functional.linear(h[i:i + opts.chunk_size], W, b).to(dt).reshape(-1, c.C)
            a[i * per_token:(i + opts.chunk_size) * per_token] = neg_log_softmax(z, opts.softcap)
    return prob_target_term(a, t, weight, opts.label_smoothing, opts.reduction, loss_shape,
                            target_grad=t.requires_grad)


def _empty(c: _Call, input, linear_weight, linear_bias, target, weight, opts: LinearCEOptions, logits_shape,
           return_grad):
    """Logits that hold no element (no tokens, or C = 0): torch's result, as
    cross-entropy gives it on empty logits; zero gradients (probability
    targets and the class weight with them are in the graph too, as torch's)."""
    logits = Lay.zeros(input, logits_shape, c.kind)
    loss = Lay.empty_class_loss(c.kind, logits, target, c.prob, opts.ignore_index, opts.label_smoothing,
                                opts.reduction)
    loss = Lay.connected(loss, c.kind, input, linear_weight, linear_bias, *((target, weight) if c.prob else ()))
    if not return_grad:
        return loss
    zero = lambda a: None if a is None else Lay.zeros(a, tuple(a.shape), c.kind)  # noqa: E731
    return LinearLossGrad(loss, zero(input), zero(linear_weight), zero(linear_bias))


def _no_features(c: _Call, input, linear_weight, linear_bias, target, weight, opts: LinearCEOptions, logits_shape,
                 return_grad, loss_dtype, backend):
    """in_features = 0: the logits are the bias (zeros without one), as
    torch's linear gives them; their cross-entropy, differentiable into the
    bias.  The logits are as small as the bias broadcast over the tokens."""
    from .functional import cross_entropy
    xp = Lay.xp(c.kind)
    lead = tuple(input.shape[:-1])
    bias = linear_bias if linear_bias is not None else Lay.zeros(linear_weight, logits_shape[len(lead):], c.kind)
    logits = bias.expand(logits_shape) if c.kind == "torch" else xp.broadcast_to(bias, logits_shape)
    if c.kind == "torch":  # connected to input and linear_weight (zero-size gradients) as F.linear's are
        logits = logits + (input.sum() + linear_weight.sum()).to(logits.dtype)
    kw = dict(weight=weight, ignore_index=opts.ignore_index, reduction=opts.reduction,
              label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap, loss_dtype=loss_dtype,
              backend=backend)
    if not return_grad:
        return cross_entropy(logits, target, **kw)
    out = cross_entropy(xp.ascontiguousarray(logits) if c.kind != "torch" else logits.contiguous(), target,
                        return_grad=True, **kw)
    zero = lambda a: None if a is None else Lay.zeros(a, tuple(a.shape), c.kind)  # noqa: E731
    gb = None if linear_bias is None else out.grad.sum(0) if lead else out.grad
    return LinearLossGrad(out.loss, zero(input), zero(linear_weight), Lay.cast_like(gb, linear_bias, c.kind))


def _autograd(be: str, arrays, opts: LinearCEOptions, input, loss_shape, loss_dtype=None):
    """torch tensors: the loss, differentiable into input, linear_weight and
    linear_bias through the custom operator's autograd formula."""
    import torch
    from . import torch_ops
    h, W, b = arrays[:3]
    on = torch.is_grad_enabled()
    want = LinearWant(on and h.requires_grad, on and W.requires_grad, on and b is not None and b.requires_grad)
    if opts.reduction == "none":
        want = LinearWant()  # loss only now; backward recomputes with the per-sample upstream gradient
    outs = torch_ops.call("linear_cross_entropy", be, arrays, opts, want)
    return _loss_out(outs[0], "torch", input, loss_shape, opts.reduction, loss_dtype)


def _loss_out(loss, kind: str, input, loss_shape, reduction: str, loss_dtype=None):
    """The loss in input's dtype (torch returns the logits' dtype) or
    ``loss_dtype`` and, for "none", the per-sample shape."""
    if reduction == "none":
        loss = loss.reshape(loss_shape)
    dtype = input.dtype if loss_dtype is None else loss_dtype
    if kind == "torch":
        return loss.to(dtype)
    return Lay.xp(kind).asarray(loss, dtype=dtype)
