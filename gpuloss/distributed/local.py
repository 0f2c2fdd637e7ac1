"""The per-rank passes of vocabulary-parallel cross-entropy: torch operations
on this rank's slice of the logits (fp32 arithmetic, fp64 for fp64), the two
all-reduces that join the slices, and the switch to the fused Triton kernels.

Everything here runs inside the custom operators' implementations
(:mod:`.ops`, :mod:`.linear`), on real tensors: no Python branch on a device
value, no ``.item()``.  The math is the package docstring's.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import rules
from .layout import VocabLayout


@dataclass(frozen=True)
class CEOptions:
    """The loss options, as every rank must pass them alike."""
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def not_a_view(t: Tensor) -> Tensor:
    """``t``, without the view bookkeeping when it is a view of a buffer made
    inside an operator (a "none" loss reshaped from its rows): the caller may
    modify the loss in place (``loss += aux``), which autograd forbids on a
    view returned by a custom function."""
    return t.detach() if t._is_view() else t


def chunk_rows(v: int, chunk_elements: int) -> int:
    """Rows per chunk so that one chunk's fp32 temporaries hold at most
    ``chunk_elements`` values whatever N x V_local."""
    return max(1, chunk_elements // max(v, 1))


def capped(x: Tensor, cdt: torch.dtype, softcap: Optional[float]) -> Tensor:
    """The logits in the compute dtype after the softcap.  Never writes over
    ``x``: ``x.to(cdt)`` may return ``x`` itself."""
    if softcap is None:
        return x.to(cdt)
    z = x.to(cdt) / softcap  # a new tensor: the in-place ops below are safe
    return z.tanh_().mul_(softcap)


class RowInfo:
    """Per-row target facts shared by the passes (all on the device)."""

    def __init__(self, target: Tensor, layout: VocabLayout, ignore_index: int):
        t = target.reshape(-1).to(torch.int64)
        self.valid = t != ignore_index
        local = t - layout.start
        # ignored rows are owned by nobody even if ignore_index falls in a slice
        self.owned = self.valid & (local >= 0) & (local < layout.size)
        # clamped so that a gather/scatter never leaves the slice; non-owned
        # rows are masked out by ``owned``
        self.local_t = local.clamp(0, max(layout.size - 1, 0))
        self.n_valid = self.valid.sum()

    def rows(self, a: int, b: int) -> "RowInfo":
        """The facts of rows ``[a, b)`` (views; ``n_valid`` stays the batch's)."""
        part = RowInfo.__new__(RowInfo)
        part.valid, part.owned, part.local_t = self.valid[a:b], self.owned[a:b], self.local_t[a:b]
        part.n_valid = self.n_valid
        return part


def local_stats(z: Tensor, rows: RowInfo, smoothing: bool) -> Tuple[Tensor, Tensor]:
    """One chunk of capped logits -> (m_r, stack[S_r, h - z_t, sum (h - z)]).

    m_r is the slice's max and S_r = sum exp(z - m_r); an empty slice, or a
    row whose slice is all -inf, has m_r = -inf, S_r = 0 and contributes 0 to
    the global sum.  The target's logit and the smoothing sum are relative
    to h = m_r (0 when -inf): terms >= 0 whatever the offset of the logits,
    where an absolute sum z would cancel against V lse.  ``global_lse``
    moves them to the global shift after the MAX all-reduce."""
    R, v = z.shape
    stats = z.new_zeros((3 if smoothing else 2, R))
    if v == 0:
        return z.new_full((R,), -math.inf), stats
    m_r = z.amax(dim=1)
    h = torch.where(m_r == -math.inf, 0.0, m_r)
    d = h[:, None] - z  # >= 0
    stats[1] = torch.where(rows.owned, d.gather(1, rows.local_t[:, None]).squeeze(1), 0.0)
    if smoothing:
        stats[2] = d.sum(1)
    stats[0] = torch.exp(d.neg_()).sum(1)
    return m_r, stats


def global_lse(m_r: Tensor, stats: Tensor, group, owned: Tensor, v_local: int) -> Tuple[Tensor, Tensor]:
    """The two all-reduces.  MAX of the slices' maxima ``m_r`` gives a shift
    ``M`` (a logit, exact) with every ``exp(m_r - M) <= 1`` (and one of them
    1), so the SUM of the stacked ``[S_r exp(m_r - M), M - z_t, sum (M - z)]``
    neither overflows nor underflows to an all-zero sum.  Each rank first
    moves its relative sums (``local_stats``) from h = m_r to M: terms >= 0,
    exact whatever the offset of the logits.  Returns (M, log S), lse = M +
    log S; ``stats`` holds the global sums afterwards."""
    m = m_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, 0.0)  # every slice -inf: lse = -inf, not nan
    stats[0] *= torch.exp(m_r - m)
    d = m - torch.where(m_r == -math.inf, 0.0, m_r)
    stats[1] += torch.where(owned, d, 0.0)
    if stats.shape[0] > 2 and v_local:
        stats[2] += v_local * d
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    return m, torch.log(stats[0])


def loss_rows(shift: Tensor, log_s: Tensor, stats: Tensor, valid: Tensor, opts: CEOptions, V: int) -> Tensor:
    """(1 - eps) (lse - z_t) + eps / V sum_c (lse - z_c) + z_loss lse**2 from
    lse = shift + log_s and the global sums ``stats[1]`` = shift - z_t and
    (with smoothing) ``stats[2]`` = sum_c (shift - z_c)."""
    eps = opts.label_smoothing
    loss = log_s + (1.0 - eps) * stats[1]
    if stats.shape[0] > 2:
        loss = loss + (eps / V) * stats[2]
    if opts.z_loss:
        lse = shift + log_s
        loss = loss + opts.z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def grad_chunk(z: Tensor, shift: Tensor, log_s: Tensor, scale: Tensor, rows: RowInfo, opts: CEOptions,
               V: int) -> Tensor:
    """dL/dx for one chunk of this rank's slice, in the compute dtype::

        scale * [(1 + 2 z_loss lse) p - (1 - eps) onehot - eps / V] * (1 - (z / cap)**2)

    with lse = shift + log_s and p = exp((z - shift) - log_s) (callers that
    only know the lse pass it as the shift and log_s = 0), built in place in
    one temporary (exp, then per-row scale and shift, the one-hot as a
    scatter); ignored rows exactly 0 even when their logits are not finite
    (as PyTorch)."""
    eps, z_loss, softcap = opts.label_smoothing, opts.z_loss, opts.softcap
    d = torch.exp((z - shift[:, None]) - log_s[:, None])
    coef = scale * (1.0 + 2.0 * z_loss * (shift + log_s)) if z_loss else scale
    d.mul_(coef[:, None])
    if eps:
        d.sub_((scale * (eps / V))[:, None])
    if z.shape[1]:
        d.scatter_add_(1, rows.local_t[:, None], (-(1.0 - eps) * scale * rows.owned.to(d.dtype))[:, None])
    if softcap is not None:
        d.mul_(1.0 - (z / softcap) ** 2)
    return d.masked_fill_(~rows.valid[:, None], 0.0)


def row_scale(info: RowInfo, reduction: str, cdt: torch.dtype) -> Tensor:
    """d(reduced loss)/d(loss_i) for an upstream gradient of one: 1/n for
    "mean" (0 where ignored, also when n = 0), 1 otherwise."""
    if reduction == "mean":
        return torch.where(info.valid, 1.0 / info.n_valid.to(cdt), 0.0)
    return info.valid.to(cdt)


def reduce(losses: Tensor, info: RowInfo, reduction: str, shape) -> Tensor:
    if reduction == "none":
        return losses.reshape(shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / info.n_valid.to(losses.dtype)  # 0 / 0 = nan when all ignored, as PyTorch


# ---------------------------------------------------------------------------
# the fused Triton kernels (off by default until they have passed on a GPU)
# ---------------------------------------------------------------------------

def use_kernels(x: Tensor) -> bool:
    """Whether the per-rank passes run as the fused Triton kernels
    (``kernels/triton/vocab_parallel.py``: one read of the logits per pass)
    or as chunked torch operations.  Default: the torch operations, because
    the kernels have passed in Triton's interpreter and compile for sm_90
    but have not yet run on a GPU (a path that has not passed on a GPU is
    not the default for CUDA tensors); ``GPULOSS_VOCAB_PARALLEL_KERNEL`` =
    "triton" or "torch" overrides (CPU tensors run the kernels only in
    Triton's interpreter, ``TRITON_INTERPRET=1``: the CPU tests do this).
    The GPU suite runs both (``test_vocab_parallel_world_size_1_nccl``)."""
    choice = os.environ.get("GPULOSS_VOCAB_PARALLEL_KERNEL", "auto").strip() or "auto"
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"GPULOSS_VOCAB_PARALLEL_KERNEL must be auto, triton or torch, got {choice!r}")
    if choice == "torch" or x.shape[1] == 0:
        return False
    from ..dispatch import backend_status
    ok = backend_status()["triton"][0]
    if choice == "triton":
        if not ok or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError("GPULOSS_VOCAB_PARALLEL_KERNEL=triton needs the triton backend "
                               "(CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors)")
        return True
    return False  # "auto": the torch path until the kernels pass on a GPU


def kernel_targets(info: RowInfo) -> Tensor:
    """Local target per row for the kernels: the local index when this rank
    owns it, -1 when another rank does, -2 for an ignored row."""
    return torch.where(info.owned, info.local_t, torch.where(info.valid, -1, -2))


def kernel_stats(x2d: Tensor, lt: Tensor, softcap: Optional[float], smoothing: bool, m_r: Tensor,
                 stats: Tensor) -> None:
    from ..dispatch import get_backend
    get_backend("triton").vocab_parallel_stats(x2d, lt, softcap, smoothing, m_r, stats)


def kernel_grad(x2d: Tensor, lt: Tensor, shift: Tensor, log_s: Tensor, scale: Tensor, opts: CEOptions,
                V: int) -> Tensor:
    from ..dispatch import get_backend
    return get_backend("triton").vocab_parallel_grad(x2d, lt, shift, log_s, scale, opts.label_smoothing, V,
                                                     opts.z_loss, opts.softcap, out_dtype=saved_dtype(x2d.dtype))


def saved_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gradient the forward pass saves for backward
    (:func:`gpuloss.rules.saved_grad_dtype_name`)."""
    return getattr(torch, rules.saved_grad_dtype_name(str(dtype).replace("torch.", "")))
