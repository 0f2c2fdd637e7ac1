"""gpuloss: fused loss-function kernels for NumPy, CuPy and PyTorch.

Importing this package imports NumPy only; torch, triton and cupy are imported
the first time a call needs them, and no GPU is touched before that.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import set_value_checks, value_checks  # noqa: F401
from .dispatch import (BackendUnavailableError, backend_status, get_backend, register,  # noqa: F401
                       use_backend)
from .errors import (ArgumentDtypeError, ArgumentTypeError, ArgumentValueError, ClassIndexError,  # noqa: F401
                     DimensionError)
from .functional import (LossGrad, binary_cross_entropy, binary_cross_entropy_with_logits,  # noqa: F401
                         cross_entropy, kl_div, kl_div_with_logits, log_softmax, log_softmax_backward,
                         mse_loss, nll_loss, softmax, softmax_backward)
from .linear_ce import LinearLossGrad, linear_cross_entropy  # noqa: F401

__all__ = [
    "softmax", "log_softmax", "softmax_backward", "log_softmax_backward", "cross_entropy", "nll_loss",
    "kl_div", "kl_div_with_logits", "binary_cross_entropy_with_logits", "binary_cross_entropy", "mse_loss",
    "linear_cross_entropy", "LinearLossGrad", "LossGrad", "use_backend", "backend_status", "get_backend", "register", "BackendUnavailableError",
    "set_value_checks", "value_checks",
    "ArgumentValueError", "ArgumentTypeError", "ArgumentDtypeError", "ClassIndexError", "DimensionError",
]

#: submodules that import torch: loaded on first attribute access (``gpuloss.nn.CrossEntropyLoss``
#: after a plain ``import gpuloss``, as ``torch.nn`` after ``import torch``), never by ``import gpuloss``
_LAZY_SUBMODULES = ("nn", "distributed", "integrations", "torch_ops", "reference")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
