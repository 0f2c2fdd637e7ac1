"""Vocabulary-parallel cross-entropy over ``torch.distributed``.

In tensor-parallel language-model training the output projection is sharded
by vocabulary: rank ``r`` of a process group holds the logits (or the weight
rows) of a contiguous slice ``[start_r, start_r + V_r)`` of a vocabulary of
``V = sum_r V_r`` classes, while the targets (global class indices) are the
same on every rank.  No rank ever holds a whole row.  This module computes
PyTorch's cross-entropy (plus gpuloss's ``z_loss`` and ``softcap``) and its
exact gradient from those shards.

The math, per row (token) i, with z the (soft-capped) logits
-------------------------------------------------------------------------
The log-sum-exp splits over the shards once the rows share one shift.  Each
rank reduces its slice to its max ``m_r`` and ``S_r = sum_{c in slice r}
exp(z_c - m_r)``, and the slices combine as::

    M     = max_r m_r
    lse   = M + log S,   S = sum_r S_r exp(m_r - M)

(every factor ``<= 1``, the largest exactly 1: no overflow, no all-zero sum).
The per-row partial sums the loss needs come from the same chunk of logits,
relative to the slice's max, so that they are sums of terms >= 0 whatever
the offset of the logits (absolute sums ``z_t`` and ``sum_c z_c`` would
cancel against ``lse``: 1e-4 of relative precision lost at an offset of 1e5
in fp32, and ``V * 1e37`` overflows):

* ``m_r - z_t`` if this rank owns the target, else 0;
* ``sum_c (m_r - z_c)`` over the slice (label smoothing only);

each moved to the common shift by adding ``M - m_r`` (``V_r (M - m_r)``).
With eps the label smoothing, PyTorch's formula
``loss = (1 - eps) * (-log p_t) + eps / V * sum_c (-log p_c)`` becomes::

    loss_i = log S + (1 - eps) (M - z_t) + eps / V * sum_c (M - z_c)  +  z_loss * lse**2

(ignored rows: 0).  Collectives per call: one all-reduce (MAX) of the ``(N,)``
slice maxima, then one all-reduce (SUM) of the stacked ``(2 or 3, N)`` tensor
``[S_r exp(m_r - M), M - z_t, sum_c (M - z_c)]``.  Two is the minimum with
all-reduces: the terms of the sum need the common shift.  (One all-gather of
every rank's partials would also do, at ``world`` times the bytes; the
all-reduce pair is what every backend and torch version supports alike.)

The gradient of the rank's own slice needs no further communication::

    dL/dz_c = s_i * [ (1 + 2 z_loss lse) p_c - (1 - eps) [c == t] - eps / V ]

with ``p_c = exp((z_c - M) - log S)`` (never ``exp(z_c - lse)`` with an lse
rounded at the size of the logits) and ``s_i`` the reduction's row scale
(``1 / n`` for "mean", n the number of non-ignored rows, counted on the device
since the targets are replicated; 1 for "sum"; the upstream gradient for
"none").
Through the softcap ``z = cap * tanh(x / cap)``: ``dz/dx = 1 - (z / cap)**2``.

The forward pass writes this gradient (in the logits' dtype, computed in
fp32) and autograd's backward only scales it by ``grad_output``: the logits
are read twice in all (statistics, gradient) and never again in backward.
No ``.item()`` and no Python branch on a device value on the hot path: the
only host synchronisation is inside the collectives.

Validation, and why it costs one small collective
-------------------------------------------------
A wrong slice layout or an out-of-range target on ONE rank must not leave the
other ranks waiting in an all-reduce.  With ``validate=True`` (the default)
every rank all-gathers a small int64 vector (its ``V_r``, its ``vocab_start``,
the ``vocab_size``/``vocab_sizes`` it was given, its target min/max over
non-ignored rows, two target checksums and its local argument problems) and
reads it on the host.  Every rank then takes the same decision from the same
gathered data and raises the same ``ValueError`` together.  That is one
all-gather of ``(10 + world)`` int64 values and one device-to-host copy per
call.  ``validate=False`` skips it: the layout then comes from
``vocab_sizes`` when given, else from a per-process cache filled by the first
call with this (group, ``V_local``, ``vocab_start``); an out-of-range target is
then owned by no rank and its row's loss is plain ``lse`` (no out-of-bounds
read, but a wrong value).  With ``validate=False`` and no ``vocab_sizes``, all
ranks must keep their cache in step (a layout change must change ``V_local``
on every rank); pass ``vocab_sizes`` to be independent of the cache.

Works with any backend that has all-gather and MAX/SUM all-reduce on the
logits' device: NCCL on GPUs, gloo on CPUs.  Every rank must call with the
same ``reduction``, options, targets and ``requires_grad`` settings, as for
any collective.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import _validate as V

__all__ = ["VocabLayout", "vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]


#: Rows per chunk are chosen so that one chunk's fp32 temporaries hold at most
#: this many elements (64 MiB each): the local passes create a few of them
#: (capped logits, exp, gradient) and need not scale with N x V_local.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class VocabLayout:
    """Where this rank's slice lies in the vocabulary.

    start:  first global class index of the slice
    size:   V_local, the number of classes on this rank
    vocab:  V, the whole vocabulary
    sizes:  V_r of every rank, in rank order
    """
    start: int
    size: int
    vocab: int
    sizes: Tuple[int, ...]


# ---------------------------------------------------------------------------
# validation: one all-gather, the same decision on every rank
# ---------------------------------------------------------------------------

# local problems, as bits, so that they travel in the gathered vector
_ERR_TARGET_DTYPE = 1
_ERR_TARGET_SHAPE = 2
_ERR_SIZES_LEN = 4
_ERR_NEGATIVE = 8
_ERR_DEVICE = 16
_ERR_WEIGHT_SHAPE = 32
_ERR_BIAS_SHAPE = 64
_ERR_DTYPE = 128
_ERR_TEXT = {
    _ERR_TARGET_DTYPE: "target must hold integer class indices",
    _ERR_TARGET_SHAPE: "target's shape must be the logits' (or hidden's) shape without the last dimension",
    _ERR_SIZES_LEN: "vocab_sizes must have one entry per rank of the group",
    _ERR_NEGATIVE: "vocab_start, vocab_size and vocab_sizes must be >= 0",
    _ERR_DEVICE: "all tensors must be on the same device",
    _ERR_WEIGHT_SHAPE: "local_weight must be (V_local, H) with H = hidden.shape[-1]",
    _ERR_BIAS_SHAPE: "local_bias must be (V_local,)",
    _ERR_DTYPE: "hidden, local_weight and local_bias must have one floating dtype",
}

# fields of the gathered vector
_F_VLOCAL, _F_START, _F_VTOTAL, _F_ROWS, _F_TMIN, _F_TMAX, _F_ERR, _F_SUM1, _F_SUM2, _F_HAS_SIZES = range(10)
_NFIELDS = 10
_BIG = torch.iinfo(torch.int64).max

#: layouts found by a validating call, reused by ``validate=False`` calls
_LAYOUT_CACHE: Dict[tuple, VocabLayout] = {}


def _group_rank_world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> int:
    """Pure-argument checks (the same validators as every public function):
    every rank runs the same code with the same options, so these raise
    before any collective on every rank alike.  Returns ``ignore_index`` as
    an int."""
    V.check_reduction(reduction)
    V.check_ce_options(label_smoothing, z_loss, softcap)
    return V.check_ignore_index("ignore_index", ignore_index)


def _target_errors(target, shape: tuple) -> int:
    """The target's error bits (raised later on every rank alike): not class
    indices, or not of ``shape``.  A non-tensor is refused at once."""
    if not isinstance(target, Tensor):
        raise TypeError("target must be a torch tensor")
    err = 0
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        err |= _ERR_TARGET_DTYPE
    if tuple(target.shape) != shape:
        err |= _ERR_TARGET_SHAPE
    return err


def _as_int_or_none(name: str, v) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or None, got {v!r}")
    return int(v)


def _target_stats(t: Tensor, ignore_index: int) -> Tensor:
    """[min, max, checksum1, checksum2] of the targets, on the device, no sync.

    min/max are over non-ignored rows (sentinels when there are none); the
    checksums cover every row so that targets differing between ranks (a
    silent wrong answer otherwise) are caught."""
    t = t.reshape(-1).to(torch.int64)
    valid = t != ignore_index
    sentinel = t.new_tensor([_BIG])
    tmin = torch.cat([torch.where(valid, t, _BIG), sentinel]).amin()
    tmax = torch.cat([torch.where(valid, t, -1), -sentinel]).amax()
    pos = torch.arange(t.numel(), device=t.device, dtype=torch.int64) % 1021 + 1
    return torch.stack([tmin, tmax, t.sum(), (t * pos).sum()])


def _gather_and_decide(group, rank: int, world: int, device, v_local: int, vocab_start: Optional[int],
                       vocab_size: Optional[int], vocab_sizes: Optional[Sequence[int]], rows: int,
                       target: Optional[Tensor], ignore_index: int, local_err: int) -> VocabLayout:
    """One all-gather of every rank's facts, one host read, one decision.

    Every rank sees the same gathered matrix and runs the same code on it, so
    either every rank returns a consistent layout or every rank raises the
    same ``ValueError``: none is left waiting in a later collective."""
    vec = torch.full((_NFIELDS + world,), -1, dtype=torch.int64, device=device)
    head = [v_local, -1 if vocab_start is None else vocab_start, -1 if vocab_size is None else vocab_size,
            rows, _BIG, -1, local_err, 0, 0, 0 if vocab_sizes is None else 1]
    vec[:_NFIELDS] = torch.tensor(head, dtype=torch.int64, device=device)
    if vocab_sizes is not None and len(vocab_sizes) == world:
        vec[_NFIELDS:] = torch.tensor([int(s) for s in vocab_sizes], dtype=torch.int64, device=device)
    if target is not None:
        ts = _target_stats(target, ignore_index)
        vec[_F_TMIN:_F_TMAX + 1] = ts[:2]
        vec[_F_SUM1:_F_SUM2 + 1] = ts[2:]
    out = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(out, vec, group=group)
    G: List[List[int]] = torch.stack(out).cpu().tolist()  # the one host read of validation

    problems: List[str] = []
    for r, row in enumerate(G):
        bits = row[_F_ERR]
        for bit, text in _ERR_TEXT.items():
            if bits & bit:
                problems.append(f"rank {r}: {text}")
    if problems:
        raise ValueError("vocab-parallel cross-entropy: bad arguments (raised on every rank):\n  "
                         + "\n  ".join(problems))

    sizes = [row[_F_VLOCAL] for row in G]
    V = sum(sizes)
    for r, row in enumerate(G):
        if row[_F_HAS_SIZES] and row[_NFIELDS:] != sizes:
            problems.append(f"rank {r} was given vocab_sizes={row[_NFIELDS:]} but the ranks' local "
                            f"vocabulary sizes are {sizes}")
        if row[_F_VTOTAL] >= 0 and row[_F_VTOTAL] != V:
            problems.append(f"rank {r} was given vocab_size={row[_F_VTOTAL]} but the local slices "
                            f"{sizes} add up to {V}")
        if row[_F_ROWS] != G[0][_F_ROWS]:
            problems.append(f"rank {r} has {row[_F_ROWS]} target rows, rank 0 has {G[0][_F_ROWS]}")
        elif (row[_F_SUM1], row[_F_SUM2]) != (G[0][_F_SUM1], G[0][_F_SUM2]):
            problems.append(f"rank {r}'s targets differ from rank 0's (they must be the same on every rank)")
    given = [row[_F_START] >= 0 for row in G]
    if any(given) and not all(given):
        problems.append("vocab_start must be given on every rank or on none "
                        f"(given on ranks {[r for r, g in enumerate(given) if g]})")
        starts = None
    elif all(given):
        starts = [row[_F_START] for row in G]
        end = 0
        for r in sorted(range(world), key=lambda r: (starts[r], sizes[r])):
            if starts[r] != end:
                problems.append(f"the slices [vocab_start, vocab_start + V_local) = "
                                f"{[(s, s + v) for s, v in zip(starts, sizes)]} do not tile [0, {V}) "
                                "without gaps or overlaps")
                break
            end += sizes[r]
    else:
        starts = [sum(sizes[:r]) for r in range(world)]
    if not problems:
        tmin = min(row[_F_TMIN] for row in G)
        tmax = max(row[_F_TMAX] for row in G)
        if tmax >= 0 and (tmin < 0 or tmax >= V):
            bad = tmin if tmin < 0 else tmax
            problems.append(f"target holds class index {bad}, outside the vocabulary [0, {V}) "
                            f"(and not ignore_index={ignore_index})")
    if problems:
        raise ValueError("vocab-parallel cross-entropy: inconsistent layout or targets "
                         "(raised on every rank):\n  " + "\n  ".join(problems))
    return VocabLayout(start=starts[rank], size=v_local, vocab=V, sizes=tuple(sizes))


def _resolve_layout(group, device, v_local: int, target: Optional[Tensor], rows: int, ignore_index: int,
                    vocab_start, vocab_size, vocab_sizes, local_err: int, validate: bool) -> VocabLayout:
    rank, world = _group_rank_world(group)
    vocab_start = _as_int_or_none("vocab_start", vocab_start)
    vocab_size = _as_int_or_none("vocab_size", vocab_size)
    if vocab_sizes is not None:
        vocab_sizes = [_as_int_or_none("vocab_sizes[i]", s) for s in vocab_sizes]
        if len(vocab_sizes) != world:
            local_err |= _ERR_SIZES_LEN
        if any(s < 0 for s in vocab_sizes):
            local_err |= _ERR_NEGATIVE
    if (vocab_start is not None and vocab_start < 0) or (vocab_size is not None and vocab_size < 0):
        local_err |= _ERR_NEGATIVE
    key = (id(group) if group is not None else None, rank, world, v_local, vocab_start, vocab_size)
    if validate:
        layout = _gather_and_decide(group, rank, world, device, v_local, vocab_start, vocab_size, vocab_sizes,
                                    rows, target if not local_err & (_ERR_TARGET_DTYPE | _ERR_TARGET_SHAPE)
                                    else None, ignore_index, local_err)
        _LAYOUT_CACHE[key] = layout
        return layout
    # hot path: no host read; a local problem can only be raised here
    for bit, text in _ERR_TEXT.items():
        if local_err & bit:
            raise ValueError(f"vocab-parallel cross-entropy (rank {rank}): {text}")
    if vocab_sizes is not None:
        start = vocab_start if vocab_start is not None else sum(vocab_sizes[:rank])
        return VocabLayout(start=start, size=v_local, vocab=sum(vocab_sizes), sizes=tuple(vocab_sizes))
    if world == 1:
        return VocabLayout(start=vocab_start or 0, size=v_local, vocab=v_local, sizes=(v_local,))
    if key not in _LAYOUT_CACHE:  # first call with this layout: one small collective
        _LAYOUT_CACHE[key] = _gather_and_decide(group, rank, world, device, v_local, vocab_start, vocab_size,
                                                None, rows, None, ignore_index, 0)
    return _LAYOUT_CACHE[key]


# ---------------------------------------------------------------------------
# the local passes (torch ops on this rank's slice; fp32 arithmetic)
# ---------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _capped(x: Tensor, cdt: torch.dtype, softcap: Optional[float]) -> Tensor:
    """The logits in the compute dtype after the softcap.  Never writes over
    ``x``: ``x.to(cdt)`` may return ``x`` itself."""
    if softcap is None:
        return x.to(cdt)
    z = x.to(cdt) / softcap  # a new tensor: the in-place ops below are safe
    return z.tanh_().mul_(softcap)


def _chunk_rows(v: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(v, 1))


class _RowInfo:
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


def _local_stats(z: Tensor, owned: Tensor, local_t: Tensor, smoothing: bool) -> Tuple[Tensor, Tensor]:
    """One chunk of capped logits -> (m_r, stack[S_r, h - z_t, sum (h - z)]).

    m_r is the slice's max and S_r = sum exp(z - m_r); an empty slice, or a
    row whose slice is all -inf, has m_r = -inf, S_r = 0 and contributes 0 to
    the global sum.  The target's logit and the smoothing sum are relative
    to h = m_r (0 when -inf): terms >= 0 whatever the offset of the logits,
    where an absolute sum z would cancel against V lse.  ``_global_lse``
    moves them to the global shift after the MAX all-reduce."""
    R, v = z.shape
    stats = z.new_zeros((3 if smoothing else 2, R))
    if v == 0:
        return z.new_full((R,), -math.inf), stats
    m_r = z.amax(dim=1)
    h = torch.where(m_r == -math.inf, 0.0, m_r)
    d = h[:, None] - z  # >= 0
    stats[1] = torch.where(owned, d.gather(1, local_t[:, None]).squeeze(1), 0.0)
    if smoothing:
        stats[2] = d.sum(1)
    stats[0] = torch.exp(d.neg_()).sum(1)
    return m_r, stats


def _loss_rows(shift: Tensor, log_s: Tensor, dt: Tensor, dsum: Optional[Tensor], valid: Tensor, eps: float,
               V: int, z_loss: float) -> Tensor:
    """(1 - eps) (lse - z_t) + eps / V sum_c (lse - z_c) + z_loss lse**2 from
    lse = shift + log_s, dt = shift - z_t and dsum = sum_c (shift - z_c)."""
    loss = log_s + (1.0 - eps) * dt
    if dsum is not None:
        loss = loss + (eps / V) * dsum
    if z_loss:
        lse = shift + log_s
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, 0.0)


def _grad_chunk(z: Tensor, shift: Tensor, log_s: Tensor, scale: Tensor, valid: Tensor, owned: Tensor,
                local_t: Tensor, eps: float, V: int, z_loss: float, softcap: Optional[float]) -> Tensor:
    """dL/dx for one chunk of this rank's slice, in the compute dtype::

        scale * [(1 + 2 z_loss lse) p - (1 - eps) onehot - eps / V] * (1 - (z / cap)**2)

    with lse = shift + log_s and p = exp((z - shift) - log_s) (callers that
    only know the lse pass it as the shift and log_s = 0), built in place in
    one temporary (exp, then per-row scale and shift, the one-hot as a
    scatter); ignored rows exactly 0 even when their logits are not finite
    (as PyTorch)."""
    d = torch.exp((z - shift[:, None]) - log_s[:, None])
    coef = scale * (1.0 + 2.0 * z_loss * (shift + log_s)) if z_loss else scale
    d.mul_(coef[:, None])
    if eps:
        d.sub_((scale * (eps / V))[:, None])
    if z.shape[1]:
        d.scatter_add_(1, local_t[:, None], (-(1.0 - eps) * scale * owned.to(d.dtype))[:, None])
    if softcap is not None:
        d.mul_(1.0 - (z / softcap) ** 2)
    return d.masked_fill_(~valid[:, None], 0.0)


def _row_scale(info: _RowInfo, reduction: str, cdt: torch.dtype) -> Tensor:
    """d(reduced loss)/d(loss_i) for an upstream gradient of one: 1/n for
    "mean" (0 where ignored, also when n = 0), 1 otherwise."""
    if reduction == "mean":
        return torch.where(info.valid, 1.0 / info.n_valid.to(cdt), 0.0)
    return info.valid.to(cdt)


def _reduce(loss_rows: Tensor, info: _RowInfo, reduction: str, shape) -> Tensor:
    if reduction == "none":
        return loss_rows.reshape(shape)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / info.n_valid.to(loss_rows.dtype)  # 0 / 0 = nan when all ignored, as PyTorch


def _global_lse(m_r: Tensor, stats: Tensor, group, owned: Tensor, v_local: int) -> Tuple[Tensor, Tensor]:
    """The two all-reduces.  MAX of the slices' maxima ``m_r`` gives a shift
    ``M`` (a logit, exact) with every ``exp(m_r - M) <= 1`` (and one of them
    1), so the SUM of the stacked ``[S_r exp(m_r - M), M - z_t, sum (M - z)]``
    neither overflows nor underflows to an all-zero sum.  Each rank first
    moves its relative sums (``_local_stats``) from h = m_r to M: terms >= 0,
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


# ---------------------------------------------------------------------------
# vocab-parallel cross-entropy from logits
# ---------------------------------------------------------------------------

def _use_kernels(x: Tensor) -> bool:
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
    from .dispatch import backend_status
    ok = backend_status()["triton"][0]
    if choice == "triton":
        if not ok or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError("GPULOSS_VOCAB_PARALLEL_KERNEL=triton needs the triton backend "
                               "(CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors)")
        return True
    return False  # "auto": the torch path until the kernels pass on a GPU


def _kernel_targets(info: _RowInfo) -> Tensor:
    """Local target per row for the kernels: the local index when this rank
    owns it, -1 when another rank does, -2 for an ignored row."""
    return torch.where(info.owned, info.local_t, torch.where(info.valid, -1, -2))


def _kernel_stats(x2d: Tensor, lt: Tensor, softcap: Optional[float], smoothing: bool, m_r: Tensor,
                  stats: Tensor) -> None:
    from .dispatch import get_backend
    get_backend("triton").vocab_parallel_stats(x2d, lt, softcap, smoothing, m_r, stats)


def _kernel_grad(x2d: Tensor, lt: Tensor, shift: Tensor, log_s: Tensor, scale: Tensor, eps: float, V: int,
                 z_loss: float, softcap: Optional[float]) -> Tensor:
    from .dispatch import get_backend
    return get_backend("triton").vocab_parallel_grad(x2d, lt, shift, log_s, scale, eps, V, z_loss, softcap)


def _ce_forward(x2d: Tensor, info: _RowInfo, layout: VocabLayout, group, reduction: str, eps: float,
                z_loss: float, softcap: Optional[float], want_grad: bool, loss_shape):
    R, v = x2d.shape
    cdt = _compute_dtype(x2d.dtype)
    smoothing = eps > 0
    m_r = torch.empty(R, dtype=cdt, device=x2d.device)
    stats = torch.empty((3 if smoothing else 2, R), dtype=cdt, device=x2d.device)
    step = _chunk_rows(v)
    kernels = R > 0 and _use_kernels(x2d)
    if kernels:
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        lt = _kernel_targets(info)
        _kernel_stats(x2d, lt, softcap, smoothing, m_r, stats)
    else:
        # pass 1: one read of the logits for every per-row partial
        for a in range(0, R, step):
            b = min(R, a + step)
            m_r[a:b], stats[:, a:b] = _local_stats(_capped(x2d[a:b], cdt, softcap), info.owned[a:b],
                                                 info.local_t[a:b], smoothing)
    shift, log_s = _global_lse(m_r, stats, group, info.owned, v)
    loss_rows = _loss_rows(shift, log_s, stats[1], stats[2] if smoothing else None, info.valid, eps, layout.vocab,
                           z_loss)
    loss = _reduce(loss_rows, info, reduction, loss_shape).to(x2d.dtype)
    if not want_grad:
        return loss, None
    # pass 2: second read of the logits, one write of the gradient
    scale = _row_scale(info, reduction, cdt)
    if kernels:
        return loss, _kernel_grad(x2d, lt, shift, log_s, scale, eps, layout.vocab, z_loss, softcap)
    grad = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    for a in range(0, R, step):
        b = min(R, a + step)
        z = _capped(x2d[a:b], cdt, softcap)
        grad[a:b] = _grad_chunk(z, shift[a:b], log_s[a:b], scale[a:b], info.valid[a:b], info.owned[a:b],
                                info.local_t[a:b],
                                eps, layout.vocab, z_loss, softcap)
    return loss, grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and this rank's gradient slice in one go;
    backward scales the saved gradient by ``grad_output`` (a 0-d tensor, or
    per row for "none"): no communication in backward."""

    @staticmethod
    def forward(ctx, local_logits: Tensor, target: Tensor, layout: VocabLayout, group, opts: dict,
                want_grad: bool) -> Tensor:
        shape = local_logits.shape
        x2d = local_logits.reshape(math.prod(shape[:-1]), shape[-1])  # explicit: V_local may be 0
        info = _RowInfo(target, layout, opts["ignore_index"])
        loss, grad = _ce_forward(x2d, info, layout, group, opts["reduction"], opts["label_smoothing"],
                                 opts["z_loss"], opts["softcap"], want_grad, target.shape)
        ctx.reduction = opts["reduction"]
        ctx.shape = shape
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        cdt = _compute_dtype(grad.dtype)
        go = grad_output.to(cdt)
        go = go.reshape(-1, 1) if ctx.reduction == "none" else go
        return (grad.to(cdt) * go).to(grad.dtype).reshape(ctx.shape), None, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, group=None, *,
                                 vocab_start: Optional[int] = None, vocab_sizes: Optional[Sequence[int]] = None,
                                 vocab_size: Optional[int] = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                                 softcap: Optional[float] = None, validate: bool = True) -> Tensor:
    """Cross-entropy over a vocabulary sharded across the ranks of ``group``.

    Parameters
    ----------
    local_logits : (..., V_local) floating tensor (fp16, bf16, fp32, fp64):
        this rank's logits for classes ``[vocab_start, vocab_start + V_local)``.
        The class dimension is LAST (the tensor-parallel convention), unlike
        ``torch.nn.functional.cross_entropy``.
    target : (...) integer tensor of GLOBAL class indices, the same on every
        rank, on the logits' device.
    group : the process group (default: the world).
    vocab_start : this rank's first class; default: the slices lie in rank
        order, ``vocab_start = sum of V_local of the lower ranks``.  Given on
        every rank or on none; the slices must tile ``[0, V)``.
    vocab_sizes : V_local of every rank, in rank order (the same list on every
        rank): states the layout without a collective.
    vocab_size : the whole vocabulary V, checked against the slices.
    ignore_index, reduction, label_smoothing : as ``torch.nn.functional.cross_entropy``
        (no class weights).  Label smoothing follows PyTorch's formula.
    z_loss : adds ``z_loss * lse**2`` per non-ignored row (PaLM).
    softcap : logits become ``softcap * tanh(x / softcap)`` first (Gemma 2).
    validate : check the layout and the targets on every rank with one small
        all-gather and one host read (see the module docstring); False for
        the hot path.

    Returns
    -------
    The loss, the same on every rank, in the logits' dtype: 0-d for "mean"
    and "sum" ("mean" divides by the number of non-ignored rows: nan when
    there are none), ``target``'s shape for "none".  Backpropagates into
    ``local_logits`` (this rank's slice of the exact gradient).

    Collectives: one all-reduce MAX of ``(N,)`` and one all-reduce SUM of
    ``(2, N)`` (``(3, N)`` with label smoothing), plus the validation
    all-gather when ``validate``.
    """
    ignore_index = _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if not isinstance(local_logits, Tensor) or not local_logits.is_floating_point() or local_logits.ndim < 1:
        raise TypeError("local_logits must be a floating torch tensor with at least one dimension")
    err = _target_errors(target, tuple(local_logits.shape[:-1]))
    if target.device != local_logits.device:
        err |= _ERR_DEVICE
    layout = _resolve_layout(group, local_logits.device, local_logits.shape[-1],
                             target if not err else None, target.numel(), ignore_index, vocab_start, vocab_size,
                             vocab_sizes, err, validate)
    want_grad = torch.is_grad_enabled() and local_logits.requires_grad
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=float(label_smoothing),
                z_loss=float(z_loss), softcap=None if softcap is None else float(softcap))
    return _VocabParallelCrossEntropy.apply(local_logits, target, layout, group, opts, want_grad)


# ---------------------------------------------------------------------------
# vocab-parallel linear + cross-entropy
# ---------------------------------------------------------------------------

def _linear_logits(h: Tensor, w: Tensor, b: Optional[Tensor], cdt: torch.dtype, softcap: Optional[float]) -> Tensor:
    """One chunk's logits ``h @ w.T + b``, in the compute dtype, soft-capped.
    The matmul runs in the storage dtype (tensor cores for bf16) with fp32
    accumulation."""
    z = (h @ w.t()).to(cdt)
    if b is not None:
        z = z + b.to(cdt)
    if softcap is not None:
        z = z.div_(softcap).tanh_().mul_(softcap)
    return z


def _contract_chunk(dz: Tensor, hc: Tensor, w: Tensor, gh: Optional[Tensor], gw: Optional[Tensor],
                    gb: Optional[Tensor], a: int, e: int) -> None:
    """Accumulate one chunk's dlogits into the three gradients.  The matmuls
    take dlogits rounded to the weight's dtype (tensor cores for bf16, as the
    forward matmul); the accumulators stay in the compute dtype."""
    dzs = dz.to(w.dtype)
    if gh is not None:
        gh[a:e] = dzs @ w
    if gw is not None:
        gw += dzs.t() @ hc
    if gb is not None:
        gb += dz.sum(0)


def _linear_ce_grads(h2d: Tensor, w: Tensor, b: Optional[Tensor], info: _RowInfo, lse: Tensor, scale: Tensor,
                     layout: VocabLayout, group, eps: float, z_loss: float, softcap: Optional[float], step: int,
                     need: Tuple[bool, bool, bool]):
    """(grad_hidden, grad_weight, grad_bias) from the known per-row lse.

    Per chunk the logits are recomputed (or were just computed), turned into
    dlogits, and contracted: ``dW += dlogits^T h`` and ``db += sum dlogits``
    stay local; ``dh = dlogits @ W`` is this rank's partial, summed over the
    ranks by one all-reduce at the end (every rank's slice of the vocabulary
    contributes to every hidden unit)."""
    cdt = _compute_dtype(h2d.dtype)
    R, H = h2d.shape
    gh = torch.zeros((R, H), dtype=cdt, device=h2d.device) if need[0] else None
    gw = torch.zeros(w.shape, dtype=cdt, device=w.device) if need[1] else None
    gb = torch.zeros(w.shape[0], dtype=cdt, device=w.device) if (need[2] and b is not None) else None
    for a in range(0, R, step):
        e = min(R, a + step)
        hc = h2d[a:e]
        z = _linear_logits(hc, w, b, cdt, softcap)
        dz = _grad_chunk(z, lse[a:e], torch.zeros_like(lse[a:e]), scale[a:e], info.valid[a:e], info.owned[a:e],
                         info.local_t[a:e],
                         eps, layout.vocab, z_loss, softcap)
        _contract_chunk(dz, hc, w, gh, gw, gb, a, e)
    if gh is not None:
        dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
    return gh, gw, gb


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """"mean"/"sum": the forward pass computes the loss and all gradients
    chunk by chunk (three matmuls in all) and backward scales them by the
    0-d ``grad_output``.  "none": the per-row upstream gradient is only known
    in backward, so forward saves the per-row lse and backward recomputes the
    logits chunk by chunk (no MAX/SUM all-reduces needed the second time)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, local_weight: Tensor, local_bias: Optional[Tensor], target: Tensor,
                layout: VocabLayout, group, opts: dict, need: Tuple[bool, bool, bool], chunk: int) -> Tensor:
        H = hidden.shape[-1]
        h2d = hidden.reshape(math.prod(hidden.shape[:-1]), H)
        R = h2d.shape[0]
        cdt = _compute_dtype(hidden.dtype)
        eps, z_loss, softcap, reduction = opts["label_smoothing"], opts["z_loss"], opts["softcap"], opts["reduction"]
        smoothing = eps > 0
        info = _RowInfo(target, layout, opts["ignore_index"])
        fused = any(need) and reduction != "none"
        scale = _row_scale(info, reduction, cdt)
        lse = torch.empty(R, dtype=cdt, device=hidden.device)
        loss_rows = torch.empty(R, dtype=cdt, device=hidden.device)
        gh = torch.zeros((R, H), dtype=cdt, device=hidden.device) if fused and need[0] else None
        gw = torch.zeros(local_weight.shape, dtype=cdt, device=hidden.device) if fused and need[1] else None
        gb = (torch.zeros(local_weight.shape[0], dtype=cdt, device=hidden.device)
              if fused and need[2] and local_bias is not None else None)
        # Per chunk: logits, local partials, the two all-reduces of this chunk,
        # then (fused) the gradient of the chunk.  The chunk count depends only
        # on N and the global layout, so every rank issues the same collectives.
        for a in range(0, R, chunk):
            e = min(R, a + chunk)
            hc = h2d[a:e]
            z = _linear_logits(hc, local_weight, local_bias, cdt, softcap)
            m_r, stats = _local_stats(z, info.owned[a:e], info.local_t[a:e], smoothing)
            shift_c, log_s_c = _global_lse(m_r, stats, group, info.owned[a:e], z.shape[1])
            lse[a:e] = shift_c + log_s_c
            loss_rows[a:e] = _loss_rows(shift_c, log_s_c, stats[1], stats[2] if smoothing else None,
                                        info.valid[a:e], eps, layout.vocab, z_loss)
            if fused:
                dz = _grad_chunk(z, shift_c, log_s_c, scale[a:e], info.valid[a:e], info.owned[a:e],
                                 info.local_t[a:e], eps, layout.vocab, z_loss, softcap)
                _contract_chunk(dz, hc, local_weight, gh, gw, gb, a, e)
        if gh is not None:
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
        loss = _reduce(loss_rows, info, reduction, target.shape).to(hidden.dtype)
        ctx.reduction, ctx.hshape, ctx.has_bias = reduction, hidden.shape, local_bias is not None
        ctx.need = need
        ctx.dtypes = (hidden.dtype, local_weight.dtype, None if local_bias is None else local_bias.dtype)
        if fused:
            ctx.save_for_backward(gh, gw, gb)
        elif any(need):
            ctx.layout, ctx.group, ctx.opts, ctx.chunk = layout, group, opts, chunk
            ctx.save_for_backward(hidden, local_weight, local_bias, target, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.reduction != "none":
            gh, gw, gb = ctx.saved_tensors
            go = grad_output.to(gh.dtype if gh is not None else gw.dtype if gw is not None else torch.float32)
            grads = [None if g is None else g * go for g in (gh, gw, gb)]
        else:
            hidden, w, b, target, lse = ctx.saved_tensors
            h2d = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])
            info = _RowInfo(target, ctx.layout, ctx.opts["ignore_index"])
            cdt = _compute_dtype(hidden.dtype)
            scale = torch.where(info.valid, grad_output.reshape(-1).to(cdt), 0.0)
            grads = list(_linear_ce_grads(h2d, w, b, info, lse, scale, ctx.layout, ctx.group,
                                          ctx.opts["label_smoothing"], ctx.opts["z_loss"], ctx.opts["softcap"],
                                          ctx.chunk, ctx.need))
        gh, gw, gb = grads
        if gh is not None:
            gh = gh.to(ctx.dtypes[0]).reshape(ctx.hshape)
        if gw is not None:
            gw = gw.to(ctx.dtypes[1])
        if gb is not None:
            gb = gb.to(ctx.dtypes[2])
        return gh, gw, gb, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(hidden: Tensor, local_weight: Tensor, target: Tensor, group=None,
                                        local_bias: Optional[Tensor] = None, *, vocab_start: Optional[int] = None,
                                        vocab_sizes: Optional[Sequence[int]] = None,
                                        vocab_size: Optional[int] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0,
                                        z_loss: float = 0.0, softcap: Optional[float] = None,
                                        chunk_size: Optional[int] = None, validate: bool = True) -> Tensor:
    """Cross-entropy of ``hidden @ W.T + b`` with ``W`` sharded by vocabulary.

    Parameters
    ----------
    hidden : (..., H) floating tensor, the same on every rank (replicated).
    local_weight : (V_local, H), this rank's rows of the output projection,
        classes ``[vocab_start, vocab_start + V_local)``; hidden's dtype.
    target : (...) integer GLOBAL class indices, the same on every rank.
    group : the process group (default: the world).
    local_bias : optional (V_local,) bias slice.
    chunk_size : tokens per chunk; only one chunk's ``(chunk, V_local)``
        logits (and their fp32 temporaries) exist at a time.  Default: at most
        ``2**24`` logits per chunk for the largest slice of the layout.  The
        chunk count is derived from N and the global layout only, so every
        rank issues the same collectives.
    other arguments : as :func:`vocab_parallel_cross_entropy`.

    Returns
    -------
    The loss (as :func:`vocab_parallel_cross_entropy`).  Backward gives
    ``grad_hidden`` (the full gradient, all-reduced over the ranks: the same on
    every rank), and ``grad_local_weight``/``grad_local_bias`` (this rank's
    slice, local).

    Collectives: per chunk one all-reduce MAX ``(chunk,)`` and one all-reduce
    SUM ``(2 or 3, chunk)``; one all-reduce SUM of ``(N, H)`` for
    ``grad_hidden`` (in forward for "mean"/"sum", where the gradients are
    computed with the loss; in backward for "none", which recomputes the
    logits from the saved per-row lse).  All ranks must agree on which of
    hidden/weight/bias require grad.
    """
    ignore_index = _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    for name, t in (("hidden", hidden), ("local_weight", local_weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch tensor")
    if local_bias is not None and (not isinstance(local_bias, Tensor) or not local_bias.is_floating_point()):
        raise TypeError("local_bias must be None or a floating torch tensor")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if hidden.ndim < 1:
        raise ValueError("hidden must be (..., H)")
    err = _target_errors(target, tuple(hidden.shape[:-1]))
    if local_weight.ndim != 2 or local_weight.shape[1] != hidden.shape[-1]:
        err |= _ERR_WEIGHT_SHAPE
    v_local = local_weight.shape[0] if local_weight.ndim == 2 else 0
    if local_bias is not None and tuple(local_bias.shape) != (v_local,):
        err |= _ERR_BIAS_SHAPE
    if local_weight.dtype != hidden.dtype or (local_bias is not None and local_bias.dtype != hidden.dtype):
        err |= _ERR_DTYPE
    devs = {t.device for t in (hidden, local_weight, target, local_bias) if t is not None}
    if len(devs) > 1:
        err |= _ERR_DEVICE
    layout = _resolve_layout(group, hidden.device, v_local, target if not err else None, target.numel(),
                             ignore_index, vocab_start, vocab_size, vocab_sizes, err, validate)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and local_weight.requires_grad,
            grad_on and local_bias is not None and local_bias.requires_grad)
    chunk = chunk_size if chunk_size is not None else _chunk_rows(max(layout.sizes))
    opts = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=float(label_smoothing),
                z_loss=float(z_loss), softcap=None if softcap is None else float(softcap))
    return _VocabParallelLinearCrossEntropy.apply(hidden, local_weight, local_bias, target, layout, group, opts,
                                                 need, chunk)
