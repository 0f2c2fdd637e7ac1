"""Launchers of the split float32 accumulation of the fused linear
cross-entropy's weight gradient (``kernels/triton/linear_acc.py``), for
:mod:`gpuloss._linear_chunks` (``acc_dtype="float32_split"``, bf16 weights).

The accumulator is the bf16 gradient buffer (upper halves of the float32
sums) and an int16 buffer of the same shape (lower halves).  Not a default:
opt-in until a GPU run has measured it (bench/RESULTS.md).  The chunk loop
calls these inside :func:`gpuloss.launch.run`, on the arrays' device."""
from __future__ import annotations

from typing import Any, Optional

from .common import quiet_interpreter
from .config import interpret


#: GEMM tiles per architecture (bf16 tensor cores, fp32 accumulation), sized
#: offline so that nothing spills (``python -m gpuloss.bench.resources``):
#: sm_90 128 x 256 x 64, 8 warps, 3 stages (254 registers, 112 KB shared);
#: sm_80 128 x 128 x 64, 8 warps, 3 stages (220 registers)
TILES = {90: dict(BLOCK_V=128, BLOCK_H=256, BLOCK_K=64, GROUP_V=8, num_warps=8, num_stages=3),
         80: dict(BLOCK_V=128, BLOCK_H=128, BLOCK_K=64, GROUP_V=8, num_warps=8, num_stages=3)}


def _tiles(x: Any) -> dict:
    """The tiles for ``x``'s device; the smallest tl.dot tiles in the interpreter."""
    if interpret() and x.device.type == "cpu":
        return dict(BLOCK_V=16, BLOCK_H=16, BLOCK_K=16, GROUP_V=2, UPCAST=True, num_warps=4, num_stages=1)
    from gpuloss import tuning
    cap = tuning.device_capability(str(x.device)) or (8, 0)
    return dict(TILES[90 if cap[0] >= 9 else 80], UPCAST=False)


@quiet_interpreter
def split_acc_matmul(dz: Any, h: Any, hi: Any, lo: Any, first: bool) -> None:
    """(hi, lo) += dz^T @ h in float32: ``dz`` (n, V) and ``h`` (n, H) in
    bf16, ``hi`` the (V, H) bf16 gradient buffer, ``lo`` (V, H) int16.
    ``first`` overwrites instead of adding."""
    import torch
    from gpuloss.kernels.triton import linear_acc as K
    n, V = dz.shape
    H = h.shape[1]
    assert hi.is_contiguous() and lo.is_contiguous() and hi.shape == lo.shape == (V, H)
    t = _tiles(dz)
    grid = (-(-V // t["BLOCK_V"]) * -(-H // t["BLOCK_H"]),)
    K.split_acc_matmul_kernel[grid](
        dz, dz.stride(0), dz.stride(1), h, h.stride(0), h.stride(1), hi.view(torch.int16), lo, H,
        n, V, H, FIRST=bool(first), **t)


@quiet_interpreter
def split_acc_finish(hi: Any, lo: Any, scale: Optional[Any]) -> Any:
    """The float32 sums times ``scale`` (None, a float or a 0-d device
    tensor), rounded once to bf16 over ``hi``; returns ``hi``."""
    import torch
    from gpuloss.kernels.triton import linear_acc as K
    n = hi.numel()
    s = None
    if scale is not None:
        s = scale.reshape(1) if torch.is_tensor(scale) else torch.full((1,), float(scale), device=hi.device)
    BLOCK = 1024
    K.split_acc_finish_kernel[(max(1, -(-n // BLOCK)),)](
        hi.view(torch.int16), lo, s if s is not None else lo, n, HAS_SCALE=s is not None, BLOCK=BLOCK)
    return hi
