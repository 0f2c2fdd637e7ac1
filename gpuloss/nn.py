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

Importing this module imports torch (``import gpuloss`` does not) and
registers gpuloss's torch operators, which a saved ``torch.export`` program
names: import ``gpuloss.nn`` (or ``gpuloss.torch_ops``) before
``torch.export.load``.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import functional as F
from . import linear_ce as _lce

__all__ = [
    "CrossEntropyLoss", "NLLLoss", "KLDivLoss", "KLDivWithLogitsLoss", "BCEWithLogitsLoss", "BCELoss",
    "MSELoss", "Softmax", "LogSoftmax", "LinearCrossEntropyLoss", "LinearCrossEntropyOptions",
]

# gpuloss's torch operators registered now: a saved torch.export program names them
importlib.import_module(".torch_ops", __package__)

#: torch's options class where the installed torch has it (2.13+), else ours
LinearCrossEntropyOptions = _lce.LinearCrossEntropyOptions


def _torch_base(cls) -> Optional[type]:
    return next((b for b in cls.__mro__ if b.__module__.startswith("torch.nn")), None)


def _not_scriptable(module: torch.nn.Module, torch_scripts: bool = True) -> torch.nn.Module:
    """``__prepare_scriptable__``: TorchScript compiles a module's Python source
    and cannot call gpuloss's kernels, and failed deep inside its compiler (a
    keyword-only argument, ``getattr``), leaving a half-compiled class behind.
    Say so first.  (Handing TorchScript the ``torch.nn`` module instead would
    replace it in the caller's model too: torch.jit.script writes what this
    returns into the parent's submodules.)"""
    name = type(module).__name__
    instead = f"torch.nn.{name} scripts" if torch_scripts else f"torch.nn has no scriptable {name}"
    raise RuntimeError(f"torch.jit.script cannot compile gpuloss.nn.{name}: TorchScript compiles Python source and "
                       f"cannot call gpuloss's kernels ({instead}). torch.compile and torch.export run them; "
                       f"torch.jit.trace records torch's operations")


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
        it holds ``dL/dlogits`` (float16 logits with "mean" under autograd:
        before the division by the mean's divisor, which backward applies
        with ``grad_output`` in float32).  It must not be a leaf that requires grad,
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

    def __prepare_scriptable__(self) -> torch.nn.Module:
        return _not_scriptable(self)

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


class _OnGpuloss:
    """The ``torch.nn`` loss of the same name with its forward on gpuloss: the
    constructor is torch's (arguments, defaults, buffers) plus a keyword-only
    ``backend``; ``forward`` calls ``gpuloss.functional.<_fn>`` with the
    module attributes named in ``_keys``."""
    _fn: str = ""
    _keys: Tuple[str, ...] = ()

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    def __init_subclass__(cls, **kwargs) -> None:
        """Each subclass shows its torch base's constructor signature plus
        ``backend`` (``inspect.signature``, help(), config tools that check
        arguments against it), not ``(*args, backend=None, **kwargs)``.  A
        subclass with a constructor of its own (a user's) keeps it."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            return
        sig = inspect.signature(_torch_base(cls).__init__)
        backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=Optional[str])

        def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
            _OnGpuloss.__init__(self, *args, backend=backend, **kwargs)

        __init__.__signature__ = sig.replace(parameters=list(sig.parameters.values()) + [backend])
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__

    def __prepare_scriptable__(self) -> torch.nn.Module:
        return _not_scriptable(self)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return getattr(F, self._fn)(input, target, backend=self.backend, **{k: getattr(self, k) for k in self._keys})


class NLLLoss(_OnGpuloss, torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` (input: log-probabilities) on gpuloss."""
    _fn, _keys = "nll_loss", ("weight", "ignore_index", "reduction")


class KLDivLoss(_OnGpuloss, torch.nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` (input: log-probabilities) on gpuloss."""
    _fn, _keys = "kl_div", ("reduction", "log_target")


class BCEWithLogitsLoss(_OnGpuloss, torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` on gpuloss; ``weight`` and
    ``pos_weight`` are buffers, as in torch."""
    _fn, _keys = "binary_cross_entropy_with_logits", ("weight", "reduction", "pos_weight")


class BCELoss(_OnGpuloss, torch.nn.BCELoss):
    """``torch.nn.BCELoss`` (input: probabilities) on gpuloss."""
    _fn, _keys = "binary_cross_entropy", ("weight", "reduction")


class MSELoss(_OnGpuloss, torch.nn.MSELoss):
    """``torch.nn.MSELoss`` on gpuloss."""
    _fn, _keys = "mse_loss", ("reduction",)


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

    def __prepare_scriptable__(self) -> torch.nn.Module:
        return _not_scriptable(self, torch_scripts=False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.kl_div_with_logits(input, target, temperature=self.temperature, reduction=self.reduction,
                                    target_is_logits=self.target_is_logits, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, "
                f"target_is_logits={self.target_is_logits}")


class _SoftmaxOnGpuloss:
    """``torch.nn.Softmax`` / ``LogSoftmax`` with forward on gpuloss
    (differentiable through the backend's softmax_backward).  ``dim=None``
    follows torch's deprecated implicit rule; keyword-only ``dtype`` casts
    the input first, as ``F.softmax(..., dtype=)``, and ``backend``."""
    _fn: str = ""

    def __init__(self, dim: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__(dim)
        self.dtype = dtype
        self.backend = backend

    def __prepare_scriptable__(self) -> torch.nn.Module:
        return _not_scriptable(self)

    def forward(self, input: Tensor) -> Tensor:
        # stack level 5 from the warning, as torch.nn.Softmax's (_stacklevel=5)
        dim = self.dim if self.dim is not None else F.implicit_softmax_dim(self._fn, input, 4)
        return getattr(F, self._fn)(input, dim, dtype=getattr(self, "dtype", None), backend=self.backend)


class Softmax(_SoftmaxOnGpuloss, torch.nn.Softmax):
    """``torch.nn.Softmax`` on gpuloss."""
    _fn = "softmax"


class LogSoftmax(_SoftmaxOnGpuloss, torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` on gpuloss."""
    _fn = "log_softmax"


#: torch.nn.LinearCrossEntropyLoss (torch 2.13+) is the base where it exists,
#: so isinstance checks, state_dicts and repr match; before 2.13 the same
#: structure is built on _WeightedLoss
_LCE_BASE = getattr(torch.nn, "LinearCrossEntropyLoss", None)


class LinearCrossEntropyLoss(_LCE_BASE or torch.nn.modules.loss._WeightedLoss):
    """``torch.nn.LinearCrossEntropyLoss`` on gpuloss's fused, chunked linear
    + cross-entropy: a module that owns its projection (``self.linear``, an
    ``nn.Linear(in_features, num_classes * prod(out_features))``) and the class
    ``weight`` buffer, with torch's constructor, attributes and state_dict keys
    (``linear.weight``, ``linear.bias``, ``weight``), whether or not the
    installed torch has its own.

    ``loss = module(input, target)``; keyword-only extras: ``z_loss``,
    ``softcap``, ``chunk_size``, ``acc_dtype``, ``backend``
    (see :func:`gpuloss.linear_cross_entropy`).
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: Tuple[int, ...] = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 z_loss: float = 0.0, softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                 acc_dtype=None, backend: Optional[str] = None) -> None:
        if _LCE_BASE is not None:
            super().__init__(in_features, num_classes, out_features=out_features, bias=bias, device=device,
                             dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, options=options)
        else:
            # torch's checks and errors (RuntimeError), as its module makes them
            if weight is not None and tuple(weight.shape) != (num_classes,):
                raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
            if label_smoothing < 0 or label_smoothing > 1.0:
                raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
            super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
            self.num_classes = num_classes
            self.out_features = out_features
            self.ignore_index = ignore_index
            self.label_smoothing = label_smoothing
            self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                          device=device, dtype=dtype)
            self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.acc_dtype = acc_dtype
        self.backend = backend

    def __prepare_scriptable__(self) -> torch.nn.Module:
        return _not_scriptable(self, torch_scripts=False)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        linear_bias = None if self.linear.bias is None else \
            self.linear.bias.reshape((self.num_classes, *self.out_features))
        return _lce.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, options=self.options,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size, acc_dtype=self.acc_dtype,
            backend=self.backend)

    def extra_repr(self) -> str:
        """torch's (every attribute, whether or not the installed torch has
        the module), then our extras where set."""
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                 f"out_features={self.out_features}", f"bias={self.linear.bias is not None}",
                 f"reduction={self.reduction}", f"ignore_index={self.ignore_index}",
                 f"label_smoothing={self.label_smoothing}", f"options={self.options}"]
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
