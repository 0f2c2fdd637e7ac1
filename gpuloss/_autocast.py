"""``torch.autocast`` as torch applies it to the ops gpuloss stands in for.

Inside ``torch.autocast(device_type, dtype=D)`` torch runs its losses (and,
on CUDA, softmax and log_softmax) in float32 and ``F.linear`` in ``D``.
gpuloss's custom operators are on none of autocast's lists, so the public
functions apply torch's policy themselves, for torch tensors on a device type
whose autocast is enabled:

* float32 ops (torch's ``cross_entropy``, ``nll_loss``, ``kl_div``,
  ``binary_cross_entropy_with_logits``, ``mse_loss``; ``binary_cross_entropy``
  on the CPU; ``softmax``/``log_softmax`` on CUDA only): float16 and bfloat16
  arguments are computed as float32 and the results are float32.  The kernels
  already compute in float32 from 16-bit inputs, so when every floating
  argument has one 16-bit dtype nothing is cast: only the loss comes out in
  float32, unrounded, and no float32 copy of the logits is made (torch makes
  one).  With mixed dtypes the 16-bit arguments are cast to float32, as torch
  casts them.  float64 is never cast.  (torch's own ``cross_entropy`` is on
  no CUDA list: it calls ``log_softmax`` with the input's dtype, so on CUDA
  its float32 loss comes from 16-bit log-probabilities; ours is the float32
  loss, as torch's is under CPU autocast.)  softmax's output is an array of the
  input's size, so there the input is cast (``dtype=float32``), as torch does.
* ``binary_cross_entropy`` under CUDA autocast: refused with torch's error.
* ``linear_cross_entropy``: ``F.linear``'s operands in ``D`` (float32 and the
  other 16-bit dtype cast, float64 untouched), the cross-entropy as a float32
  op; the chunk loop's own matmuls run with autocast off.

Gradients come back in each argument's own dtype, as through torch's casts.
Everything here is a constant while torch.compile traces (dynamo guards on
the autocast state), so it adds no graph break.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

#: ops that autocast runs in float32 on every device type / on CUDA only
_FP32_OPS = {"cross_entropy", "nll_loss", "kl_div", "kl_div_logits", "bce_with_logits", "mse", "bce"}
_FP32_CUDA_ONLY = {"softmax"}

BCE_REFUSED = ("torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
               "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
               "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
               "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
               "safe to autocast.")


def device_type(kind: str, device: str) -> Optional[str]:
    """The device type whose autocast is enabled for arrays on ``device``
    (torch tensors only), else None."""
    if kind != "torch":
        return None
    import torch
    dt = device.split(":", 1)[0]
    return dt if dt in ("cpu", "cuda") and torch.is_autocast_enabled(dt) else None


def _lower(dtype) -> bool:
    import torch
    return dtype in (torch.float16, torch.bfloat16)


def fp32_op(op: str, kind: str, device: str, arrays: Dict[str, Any]) -> Tuple[Dict[str, Any], Any]:
    """torch's float32 policy for ``op``: ``(arrays, out_dtype)``.

    ``arrays`` maps argument names to tensors (or None / integer tensors,
    which pass through).  ``out_dtype`` is float32 when the results must be
    float32 although the (unchanged) arguments are 16-bit, else None."""
    dt = device_type(kind, device)
    if dt is None:
        return arrays, None
    if op == "bce" and dt == "cuda":
        raise RuntimeError(BCE_REFUSED)
    if op not in _FP32_OPS and not (op in _FP32_CUDA_ONLY and dt == "cuda"):
        return arrays, None
    import torch
    floats = {k: a for k, a in arrays.items() if a is not None and a.is_floating_point()}
    dtypes = {a.dtype for a in floats.values()}
    if not any(_lower(d) for d in dtypes):
        return arrays, None
    if len(dtypes) == 1:
        return arrays, torch.float32
    return {k: (a.to(torch.float32) if k in floats and _lower(a.dtype) else a) for k, a in arrays.items()}, None


def softmax_dtype(kind: str, device: str, input, dtype):
    """softmax/log_softmax's ``dtype=`` under autocast: float32 for a 16-bit
    input on CUDA when the caller gave none (torch sets it so)."""
    if dtype is not None or kind != "torch" or not _lower(input.dtype):
        return dtype
    _, out = fp32_op("softmax", kind, device, {"input": input})
    return out


def linear_operands(kind: str, device: str, *operands):
    """``F.linear``'s operands under autocast: float32 and 16-bit tensors
    in autocast's dtype (float64 and None untouched).  ``(operands, device
    type)``; the device type is None when autocast is off."""
    dt = device_type(kind, device)
    if dt is None:
        return operands, None
    import torch
    target = torch.get_autocast_dtype(dt)
    cast = lambda a: a if a is None or a.dtype in (torch.float64, target) else a.to(target)  # noqa: E731
    return tuple(cast(a) for a in operands), dt


def disabled(device):
    """A context in which torch's autocast is off for ``device`` (a
    torch.device): what a custom operator's own matmuls run under, whatever
    its caller's autocast state (the public functions have already applied
    the policy to the operands)."""
    import contextlib
    import torch
    dt = device_type("torch", str(device))
    return contextlib.nullcontext() if dt is None else torch.autocast(dt, enabled=False)
