"""The NumPy backend: the CPU fallback.

Launchers for every op of :mod:`gpuloss.ops` on NumPy arrays (and on CPU torch
tensors, shared without a copy), chunked into cache-sized tiles and threaded
(:mod:`.tiling` has the design).  One module per op family:
:mod:`.softmax`, :mod:`.cross_entropy` (and NLL), :mod:`.kl_logits`,
:mod:`.elementwise`.

NumPy has no bfloat16 of its own: a bfloat16 torch tensor is shared as
ml_dtypes' bfloat16 where that package is installed, else served through a
float32 copy (see :meth:`NumpyBackend.to_native`).  Inputs are never written, except
``x`` under ``grad_inplace``.
"""
from __future__ import annotations

import functools
from typing import Any, Tuple

import numpy as np

from ..base import Backend
from .cross_entropy import cross_entropy, nll_loss
from .elementwise import bce, bce_with_logits, kl_div, mse
from .kl_logits import kl_div_logits
from .softmax import softmax_backward, softmax_forward
from .tiling import num_threads

__all__ = ["NumpyBackend", "num_threads"]


@functools.lru_cache(maxsize=None)
def _numpy_bfloat16():
    """ml_dtypes' bfloat16 NumPy dtype, or None where the package is not installed
    (looked up once: a missing package is not searched for again on every call)."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


class NumpyBackend(Backend):
    """Launchers on NumPy arrays (CPU)."""

    name = "numpy"
    native = "numpy"

    # --- availability -----------------------------------------------------
    def probe(self) -> Tuple[bool, str]:
        return True, f"numpy {np.__version__}"

    def accepts(self, kind: str, device: str) -> bool:
        return kind in ("numpy", "torch") and device == "cpu"

    # --- conversion -------------------------------------------------------
    def to_native(self, a: Any, kind: str) -> np.ndarray:
        """NumPy view of ``a``.  A CPU torch tensor is shared without a copy;
        bfloat16 as ml_dtypes' bfloat16, and where that package is missing as
        a float32 copy (then a ``grad_inplace`` on it writes the copy, and the
        caller copies the gradient back).  A NumPy array of non-native byte order
        becomes a native copy the same way, so that results come out native,
        as NumPy's own functions give them."""
        if kind == "numpy":
            return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
        if kind == "torch":
            import torch

            t = a.detach()
            if t.dtype == torch.bfloat16:
                bf16 = _numpy_bfloat16()
                # shared as NumPy's bfloat16 (ml_dtypes) where it is installed: tiles are upcast one at a
                # time, as for float16, and a gradient is written straight into bfloat16 memory
                return t.view(torch.int16).numpy().view(bf16) if bf16 is not None else t.float().numpy()
            return t.numpy()
        raise TypeError(f"numpy backend cannot take {kind} arrays")

    def from_native(self, a: Any, kind: str) -> Any:
        if a is None or kind == "numpy":
            return a
        if kind == "torch":
            import torch

            a = np.asarray(a)
            if a.dtype.name == "bfloat16":  # ml_dtypes' (to_native): torch has no NumPy bfloat16
                return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(a)
        raise TypeError(f"numpy backend cannot produce {kind} arrays")

    # --- launchers (one per op of gpuloss.ops) -------------------------------
    softmax_forward = staticmethod(softmax_forward)
    softmax_backward = staticmethod(softmax_backward)
    cross_entropy = staticmethod(cross_entropy)
    nll_loss = staticmethod(nll_loss)
    kl_div_logits = staticmethod(kl_div_logits)
    kl_div = staticmethod(kl_div)
    bce_with_logits = staticmethod(bce_with_logits)
    bce = staticmethod(bce)
    mse = staticmethod(mse)
