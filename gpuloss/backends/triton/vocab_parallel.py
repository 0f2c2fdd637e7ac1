"""Launchers of the vocabulary-parallel per-rank kernels
(``kernels/triton/vocab_parallel.py``) for :mod:`gpuloss.distributed`."""
from __future__ import annotations

from typing import Optional

from ...launch import on_device
from . import common as CM
from .config import launch_config


def vocab_parallel_stats(x2d, local_target, softcap: Optional[float], smoothing: bool, m_r, stats) -> None:
    """Per-row statistics of this rank's logits in one read, relative to the
    slice max (exact whatever the logits' offset): the max into ``m_r``,
    ``sum exp(z - m_r)`` into ``stats[0]``, ``m_r - z_t`` into ``stats[1]``
    and (with smoothing) ``sum (m_r - z)`` into ``stats[2]``."""
    import torch
    from gpuloss.kernels.triton import vocab_parallel as K
    cfg = launch_config("row", x2d.shape[1], itemsize=x2d.element_size())
    _, acc = CM.acc(torch, x2d.dtype)
    with on_device("torch", x2d):
        K.vocab_parallel_stats_kernel[(x2d.shape[0],)](
            x2d, x2d.stride(0), local_target, m_r, stats[0], stats[1], stats[2] if smoothing else m_r,
            x2d.shape[1], CM.scalar(softcap if softcap is not None else 1.0, x2d),
            BLOCK=cfg.block, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=smoothing, ACC=acc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def vocab_parallel_grad(x2d, local_target, shift, log_s, scale, eps: float, vocab: int, z_loss: float,
                        softcap: Optional[float], out_dtype=None):
    """This rank's slice of dL/dlogits in one more read and one write, with
    p = exp((z - shift) - log_s)."""
    import torch
    from gpuloss.kernels.triton import vocab_parallel as K
    cfg = launch_config("row", x2d.shape[1], itemsize=x2d.element_size())
    _, acc = CM.acc(torch, x2d.dtype)
    sc = lambda v: CM.scalar(v, x2d)  # noqa: E731  (fp64 launches get exact scalars)
    grad = torch.empty(x2d.shape, dtype=out_dtype or x2d.dtype, device=x2d.device)
    with on_device("torch", x2d):
        K.vocab_parallel_grad_kernel[(x2d.shape[0],)](
            x2d, x2d.stride(0), grad, grad.stride(0), local_target, shift, log_s, scale,
            x2d.shape[1], sc(1.0 - eps), sc(eps / vocab), sc(z_loss), sc(softcap if softcap is not None else 1.0),
            BLOCK=cfg.block, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=eps > 0, HAS_Z_LOSS=bool(z_loss),
            ACC=acc, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad
