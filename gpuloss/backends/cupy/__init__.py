"""CuPy backend: the fused loss kernels as CUDA C, compiled at run time by NVRTC.

Layers, in order: :mod:`.build` (sources, compile options, name expressions,
the module cache), :mod:`.plan` (the sizing helper), :mod:`.common` (shared
launch pieces), :mod:`.rows` and :mod:`.elementwise` (the launchers), and
:class:`CupyBackend` below.

bfloat16 travels as its raw 16 bits: :meth:`CupyBackend.to_native` views a
torch bf16 tensor as int16 before ``cupy.from_dlpack``, the kernels read
int16/uint16 floating slots as bf16 bits, and :meth:`CupyBackend.from_native`
views such an array back as ``torch.bfloat16``.  Nothing is copied either way.

Nothing here touches the GPU at import time; :meth:`CupyBackend.probe` is the
first call that does.
"""
from __future__ import annotations

from typing import Any, Tuple

from ..base import Backend
from . import elementwise as _ew
from . import rows as _rows
from .build import VARIANTS

__all__ = ["CupyBackend"]


class CupyBackend(Backend):
    """CUDA C kernels through CuPy RawModule; zero-copy with PyTorch through DLPack."""

    name = "cupy"
    native = "cupy"

    @staticmethod
    def variants() -> Tuple[str, ...]:
        """Row-kernel variants selectable with ``GPULOSS_CUPY_VARIANT``."""
        return VARIANTS

    # ---- availability ------------------------------------------------------------------
    def probe(self) -> Tuple[bool, str]:
        try:
            import cupy
        except Exception as e:  # noqa: BLE001
            return False, f"cupy cannot be imported ({type(e).__name__}: {e})"
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # noqa: BLE001  (no driver: CUDARuntimeError, ...)
            return False, f"no usable CUDA device: {type(e).__name__}: {e}"
        if n <= 0:
            return False, "no CUDA device found"
        return True, f"cupy {cupy.__version__}, {n} CUDA device(s)"

    def accepts(self, kind: str, device: str) -> bool:
        return kind in ("cupy", "torch") and device.startswith("cuda")

    # ---- conversion --------------------------------------------------------------------
    def to_native(self, a: Any, kind: str) -> Any:
        if kind == "cupy":
            return a
        if kind == "torch":
            import cupy
            import torch
            if a.dtype == torch.bfloat16:
                a = a.view(torch.int16)  # bf16 bits; see the module docstring
            return cupy.from_dlpack(a.detach())
        raise TypeError(f"cupy backend cannot take {kind} arrays")

    def from_native(self, a: Any, kind: str) -> Any:
        if kind == "cupy" or a is None:
            return a
        if kind == "torch":
            import torch
            if a.ndim == 0 and str(a.dtype) not in ("int16", "uint16"):
                return torch.from_dlpack(a)
            t = torch.from_dlpack(a)
            if t.dtype in (torch.int16, torch.uint16):
                t = t.view(torch.bfloat16)
            return t
        raise TypeError(f"cupy backend cannot produce {kind} arrays")

    # ---- launchers (one per op of gpuloss.ops) -------------------------------------------
    softmax_forward = staticmethod(_rows.softmax_forward)
    softmax_backward = staticmethod(_rows.softmax_backward)
    cross_entropy = staticmethod(_rows.cross_entropy)
    nll_loss = staticmethod(_rows.nll_loss)
    kl_div_logits = staticmethod(_rows.kl_div_logits)
    kl_div = staticmethod(_ew.kl_div)
    bce_with_logits = staticmethod(_ew.bce_with_logits)
    bce = staticmethod(_ew.bce)
    mse = staticmethod(_ew.mse)
