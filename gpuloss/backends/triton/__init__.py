"""The Triton backend: launchers for the kernels in ``gpuloss.kernels.triton``.

Native arrays are torch tensors on CUDA (CuPy arrays come in and go out
through DLPack, zero-copy).  With ``TRITON_INTERPRET=1`` the same kernels run
on CPU tensors through Triton's interpreter (slow; for tests at tiny shapes).

Arithmetic: float32 for float16 / bfloat16 / float32 storage, float64 for
float64 storage (the kernels take the accumulation dtype as a constexpr), so
float64 inputs meet the float64 tolerances.  Losses come back in the
accumulation dtype, lse always in float32 (the contract), gradients in the
storage dtype of what they differentiate.

One module per op family (:mod:`.softmax`, :mod:`.cross_entropy`,
:mod:`.kl_logits`, :mod:`.elementwise`, :mod:`.vocab_parallel`); launch
configuration comes from :func:`.config.launch_config` only.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

from ..base import Backend
from . import cross_entropy as _ce
from . import elementwise as _ew
from . import kl_logits as _kl
from . import softmax as _sm
from . import vocab_parallel as _vp
from .common import quiet_interpreter as _quiet_interpreter
from .config import VARIANTS, LaunchConfig, interpret, interpreter_patches, launch_config

__all__ = ["TritonBackend", "LaunchConfig", "launch_config", "VARIANTS"]


class TritonBackend(Backend):
    """Fused loss kernels in Triton, on CUDA torch tensors (or CPU tensors
    under ``TRITON_INTERPRET=1``).

    Parameters
    ----------
    variant : one of VARIANTS ("twopass", "onchip", "packed") or None
        Force one design of the fused row kernels (default: the design table's
        verified choice, :func:`launch_config`, or ``GPULOSS_TRITON_VARIANT``).
    max_block : int, optional
        Cap on the elements per block (tests use small caps to exercise the
        row loops at small C).
    """

    name = "triton"
    native = "torch"

    def __init__(self, variant: Optional[str] = None, max_block: Optional[int] = None) -> None:
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown Triton variant {variant!r}; choose from {VARIANTS}")
        self.variant = variant
        self.max_block = max_block
        if interpret():
            interpreter_patches()

    @staticmethod
    def variants() -> List[str]:
        """The designs of softmax forward and cross-entropy loss + gradient
        that ``GPULOSS_TRITON_VARIANT`` (or ``variant=``) can select."""
        return list(VARIANTS)

    # --- availability -----------------------------------------------------
    def probe(self) -> Tuple[bool, str]:
        try:
            import torch
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return False, f"cannot import torch/triton: {e}"
        if interpret():
            try:
                interpreter_patches()
            except Exception as e:
                return False, f"Triton interpreter unusable with this NumPy: {e}"
            return True, f"Triton {triton.__version__} interpreter on CPU tensors (TRITON_INTERPRET=1)"
        try:
            if torch.cuda.is_available():
                return True, f"Triton {triton.__version__} on CUDA"
        except Exception as e:
            return False, f"torch.cuda.is_available() failed: {e}"
        return False, "no CUDA device visible to torch (set TRITON_INTERPRET=1 to run on CPU tensors)"

    def accepts(self, kind: str, device: str) -> bool:
        if device.startswith("cuda"):
            return kind in ("torch", "cupy") and not interpret()
        if device == "cpu":
            return kind == "torch" and interpret()
        return False

    def to_native(self, a: Any, kind: str) -> Any:
        if kind == "torch":
            return a
        if kind == "cupy":
            import torch
            return torch.from_dlpack(a)
        raise TypeError(f"triton backend cannot take {kind} arrays")

    def from_native(self, a: Any, kind: str) -> Any:
        if a is None or kind == "torch":
            return a
        if kind == "cupy":
            import cupy
            return cupy.from_dlpack(a)
        raise TypeError(f"triton backend cannot return {kind} arrays")

    def config(self, op: str, x: Any, kernel: Optional[str] = None, variant: Optional[str] = None,
               heavy: bool = False) -> LaunchConfig:
        """This instance's launch configuration for ``op`` on rows like ``x``
        (``heavy``: cross-entropy with weights, probability targets or softcap)."""
        dev = x.device.index if x.device.type == "cuda" else None
        if dev is None and x.device.type == "cuda":
            dev = 0
        variant = variant or (self.variant if op == "row_fused" else None)
        return launch_config(op, x.shape[-1], variant=variant, max_block=self.max_block, device_index=dev,
                             kernel=kernel, itemsize=x.element_size(), dtype=str(x.dtype).replace("torch.", ""),
                             heavy=heavy)

    # --- launchers (one per op of gpuloss.ops) -------------------------------
    @_quiet_interpreter
    def softmax_forward(self, x, opts):
        return _sm.softmax_forward(self, x, opts)

    @_quiet_interpreter
    def softmax_backward(self, y, dy, opts):
        return _sm.softmax_backward(self, y, dy, opts)

    @_quiet_interpreter
    def cross_entropy(self, x, target, weight, opts, want):
        return _ce.cross_entropy(self, x, target, weight, opts, want)

    @_quiet_interpreter
    def nll_loss(self, logp, target, weight, opts, want):
        return _ce.nll_loss(self, logp, target, weight, opts, want)

    @_quiet_interpreter
    def kl_div_logits(self, x, target, opts, want):
        return _kl.kl_div_logits(self, x, target, opts, want)

    @_quiet_interpreter
    def kl_div(self, input, target, opts, want):
        return _ew.kl_div(self, input, target, opts, want)

    @_quiet_interpreter
    def bce_with_logits(self, x, target, weight, pos_weight, opts, want):
        return _ew.bce_with_logits(self, x, target, weight, pos_weight, opts, want)

    @_quiet_interpreter
    def bce(self, p, target, weight, opts, want):
        return _ew.bce(self, p, target, weight, opts, want)

    @_quiet_interpreter
    def mse(self, x, target, opts, want):
        return _ew.mse(self, x, target, opts, want)

    # the vocabulary-parallel per-rank passes (gpuloss.distributed)
    vocab_parallel_stats = staticmethod(_quiet_interpreter(_vp.vocab_parallel_stats))
    vocab_parallel_grad = staticmethod(_quiet_interpreter(_vp.vocab_parallel_grad))
