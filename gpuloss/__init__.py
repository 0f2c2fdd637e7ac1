"""gpuloss: fused loss-function kernels for NumPy, CuPy and PyTorch.

Importing this package imports NumPy only; torch, triton and cupy are imported
the first time a call needs them, and no GPU is touched before that.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .dispatch import BackendUnavailableError, backend_status, get_backend, use_backend  # noqa: F401
