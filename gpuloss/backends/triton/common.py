"""What every Triton launcher shares: accumulation dtypes, scalar arguments,
row views and operands, the split-row workspace, the reduction of row losses.

No host synchronisation anywhere: reductions stay on the device (0-d tensors).
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Tuple

from ... import rules
from .config import LaunchConfig, interpret

#: one launch at a time under ``TRITON_INTERPRET=1``: the interpreter swaps
#: triton.language's functions for its NumPy versions around each launch (module
#: state), so a launch from a second Python thread meanwhile failed inside the
#: kernel ("Did you forget to add @triton.jit ?"); compiled kernels need no lock
_INTERPRETER_LOCK = threading.RLock()


def quiet_interpreter(launcher: Callable) -> Callable:
    """``launcher`` under ``TRITON_INTERPRET=1``: one at a time across threads
    (:data:`_INTERPRETER_LOCK`), with NumPy's floating-point warnings off.  The
    interpreter runs the kernels as NumPy code, which warns where the GPU
    computes IEEE results silently: masked lanes form ``-inf - -inf`` or
    ``0 * -inf`` before a ``tl.where`` discards them.  Those warnings say
    nothing about the results, and under ``python -W error`` they failed the
    call.  On a GPU: one environment lookup."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        if not interpret():
            return launcher(*args, **kwargs)
        import numpy as np
        with _INTERPRETER_LOCK, np.errstate(all="ignore"):
            return launcher(*args, **kwargs)
    return run


def acc(torch, dtype):
    """(torch accumulation dtype, triton constexpr dtype) for a storage dtype
    (:func:`gpuloss.rules.acc_dtype_name`)."""
    import triton.language as tl
    name = rules.acc_dtype_name(str(dtype).replace("torch.", ""))
    return getattr(torch, name), getattr(tl, name)


def scalar(v: float, like: Any) -> Any:
    """A float kernel argument: a Python float (fp32 in the kernel), or for
    float64 launches a one-element float64 tensor on the device, so the kernel
    reads the exact value (``scalar_acc``).  Created by a fill kernel, not a
    host copy, so it is safe inside CUDA-graph capture."""
    import torch
    if like.dtype == torch.float64:
        return torch.full((1,), float(v), dtype=torch.float64, device=like.device)
    return float(v)


def rows(a: Any) -> Any:
    """2-D view with unit column stride (copies only if the columns are strided)."""
    if a.dim() != 2:
        raise ValueError(f"expected a 2-D (R, C) array, got shape {tuple(a.shape)}")
    if a.shape[1] > 1 and a.stride(1) != 1:
        a = a.contiguous()
    return a


def row_stride(a: Any) -> int:
    return a.stride(0) if a.shape[0] > 1 else a.shape[1]


def operand(a: Any, n_rows: int, n_cols: int) -> Tuple[Any, int]:
    """A weight-like operand as (tensor, row stride): (C,) or (1, C)
    broadcast over rows with stride 0; (R, C) element-wise."""
    if a.dim() == 1:
        return a.contiguous(), 0
    if a.dim() == 2 and a.shape[0] == 1:
        return a[0].contiguous(), 0
    if tuple(a.shape) != (n_rows, n_cols):
        raise ValueError(f"operand of shape {tuple(a.shape)} does not match ({n_rows}, {n_cols})")
    a = rows(a)
    return a, row_stride(a)


def split_workspace(torch, n_rows: int, cfg: LaunchConfig, x: Any):
    """Scratch for the split-row rendezvous: partials (R, SPLIT, 4) in the
    accumulation dtype (every slot written before it is read: no init) and
    int32 counters [ticket, arrivals per row] zeroed by one async memset per
    launch (4 (R + 1) bytes), so repeated launches need no epochs."""
    acc_t, _ = acc(torch, x.dtype)
    if cfg.split == 1:
        dummy = torch.empty(1, dtype=acc_t, device=x.device)
        return dummy, torch.empty(1, dtype=torch.int32, device=x.device)
    scratch = torch.empty(n_rows * cfg.split * 4, dtype=acc_t, device=x.device)
    counter = torch.zeros(n_rows + 1, dtype=torch.int32, device=x.device)
    return scratch, counter


def reduce_rows(rows_loss, reduction: str, divisor):
    """"none": the rows; "sum": their sum; "mean": the sum over ``divisor``
    (a float, or a device scalar that the divisor kernel made NaN where it is
    0: :mod:`gpuloss.rules`)."""
    if reduction == "none":
        return rows_loss
    total = rows_loss.sum()
    return total if reduction == "sum" else total / divisor
