"""Where each rank's slice lies, and the validation that every rank decides
alike (see the package docstring, "Validation").

Two halves.  What runs in the public functions (and so is traced by
``torch.compile``) is pure argument checking on Python values and tensor
metadata, plus :func:`group_name`, which dynamo treats as a constant.  What
needs the process group or reads device values to the host (the gathered
validation vector, the layout cache) is :func:`resolve_layout`, called only
inside the custom operators' implementations.
"""
from __future__ import annotations

import operator
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validate as V
from .._arrays import FLOAT_DTYPES
from ..errors import ArgumentTypeError, ArgumentValueError, ClassIndexError


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


# local problems, as bits, so that they travel in the gathered vector
ERR_TARGET_DTYPE = 1
ERR_TARGET_SHAPE = 2
ERR_SIZES_LEN = 4
ERR_NEGATIVE = 8
ERR_DEVICE = 16
ERR_WEIGHT_SHAPE = 32
ERR_BIAS_SHAPE = 64
ERR_DTYPE = 128
_ERR_TEXT = {
    ERR_TARGET_DTYPE: "target must hold integer class indices",
    ERR_TARGET_SHAPE: "target's shape must be the logits' (or hidden's) shape without the last dimension",
    ERR_SIZES_LEN: "vocab_sizes must have one entry per rank of the group",
    ERR_NEGATIVE: "vocab_start, vocab_size and vocab_sizes must be >= 0",
    ERR_DEVICE: "all tensors must be on the same device",
    ERR_WEIGHT_SHAPE: "local_weight must be (V_local, H) with H = hidden.shape[-1]",
    ERR_BIAS_SHAPE: "local_bias must be (V_local,)",
    ERR_DTYPE: "hidden, local_weight and local_bias must have one floating dtype",
}

# fields of the gathered vector
(_F_VLOCAL, _F_START, _F_VTOTAL, _F_ROWS, _F_TMIN, _F_TMAX, _F_ERR, _F_SUM1, _F_SUM2, _F_HAS_SIZES, _F_DTYPE,
 _F_OPTS) = range(12)
_NFIELDS = 12
_BIG = torch.iinfo(torch.int64).max

#: the last layout per (group name, rank, world), with the (V_local, vocab_start,
#: vocab_size) it was found for; reused by ``validate=False`` calls while those stay
#: the same.  Only the last: a rank cannot see the other ranks' sizes without a
#: collective, so an older layout of the same V_local (sizes (4, 6) -> (6, 4) ->
#: (4, 8): rank 0 has V_local 4 again) would be served stale on one rank while the
#: others gather, and the ranks would wait for each other forever.
_LAYOUT_CACHE: Dict[tuple, Tuple[tuple, VocabLayout]] = {}


# ---------------------------------------------------------------------------
# in the public functions: Python values and tensor metadata only
# ---------------------------------------------------------------------------

def group_name(group) -> str:
    """The name the custom operators take for ``group`` (None: the world).

    ``torch.compile`` calls this once while tracing and keeps the name as a
    constant, guarded on the group object (the attribute below is what
    ``torch.compiler.assume_constant_result`` sets): the initialisation check
    and the default-group lookup are host state dynamo does not trace."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    pg = dist.group.WORLD if group is None else group
    if pg is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
        raise ArgumentValueError(f"this rank ({dist.get_rank()}) is not a member of group: torch.distributed.new_group "
                                 f"returns a placeholder on the ranks it leaves out; call the loss only on the "
                                 f"group's ranks")
    if not isinstance(pg, dist.ProcessGroup):
        raise ArgumentTypeError(f"group must be a torch.distributed ProcessGroup or None (the default group), got "
                                f"{type(group).__name__}")
    return pg.group_name


group_name._dynamo_marked_constant = True  # type: ignore[attr-defined]


def check_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> Tuple[int, float]:
    """Pure-argument checks (the same validators as every public function):
    every rank runs the same code with the same options, so these raise
    before any collective on every rank alike.  Returns ``ignore_index`` as
    an int and the label smoothing to apply."""
    V.check_reduction(reduction)
    label_smoothing = V.check_ce_options(label_smoothing, z_loss, softcap)
    return V.check_ignore_index("ignore_index", ignore_index), label_smoothing


def require_target(target) -> None:
    """A non-tensor target is refused at once; its other problems travel
    as error bits (:func:`target_errors`)."""
    if not isinstance(target, Tensor):
        raise ArgumentTypeError("target must be a torch tensor")


def as_int_or_none(name: str, v) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not hasattr(v, "__index__") or isinstance(v, Tensor):
        raise ArgumentTypeError(f"{name} must be an int or None, got {v!r}")
    return operator.index(v)  # also a NumPy integer, as ignore_index takes


def layout_arguments(vocab_start, vocab_size, vocab_sizes) -> Tuple[Optional[int], Optional[int],
                                                                    Optional[List[int]]]:
    """``vocab_start``, ``vocab_size`` and ``vocab_sizes`` as the operators'
    ``int?``, ``int?`` and ``int[]?`` (TypeError for anything else)."""
    if vocab_sizes is not None:
        vocab_sizes = [as_int_or_none("vocab_sizes[i]", s) for s in vocab_sizes]
    return as_int_or_none("vocab_start", vocab_start), as_int_or_none("vocab_size", vocab_size), vocab_sizes


# ---------------------------------------------------------------------------
# in the operators: local problems as bits
# ---------------------------------------------------------------------------

def target_errors(target: Tensor, shape: tuple) -> int:
    """The target's error bits: not class indices, or not of ``shape``."""
    err = 0
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        err |= ERR_TARGET_DTYPE
    if tuple(target.shape) != shape:
        err |= ERR_TARGET_SHAPE
    return err


def logits_errors(local_logits: Tensor, target: Tensor) -> int:
    err = target_errors(target, tuple(local_logits.shape[:-1]))
    if target.device != local_logits.device:
        err |= ERR_DEVICE
    return err


def linear_errors(hidden: Tensor, local_weight: Tensor, local_bias: Optional[Tensor], target: Tensor) -> int:
    err = target_errors(target, tuple(hidden.shape[:-1]))
    if local_weight.ndim != 2 or local_weight.shape[1] != hidden.shape[-1]:
        err |= ERR_WEIGHT_SHAPE
    if local_bias is not None and tuple(local_bias.shape) != (local_rows(local_weight),):
        err |= ERR_BIAS_SHAPE
    if local_weight.dtype != hidden.dtype or (local_bias is not None and local_bias.dtype != hidden.dtype):
        err |= ERR_DTYPE
    if len({t.device for t in (hidden, local_weight, target, local_bias) if t is not None}) > 1:
        err |= ERR_DEVICE
    return err


def local_rows(local_weight: Tensor) -> int:
    """V_local of the linear form (0 for a weight that is not 2-D, an error
    the validation reports)."""
    return local_weight.shape[0] if local_weight.ndim == 2 else 0


def layout_errors(world: int, vocab_start: Optional[int], vocab_size: Optional[int],
                  vocab_sizes: Optional[Sequence[int]]) -> int:
    err = 0
    if vocab_sizes is not None:
        if len(vocab_sizes) != world:
            err |= ERR_SIZES_LEN
        if any(s < 0 for s in vocab_sizes):
            err |= ERR_NEGATIVE
    if (vocab_start is not None and vocab_start < 0) or (vocab_size is not None and vocab_size < 0):
        err |= ERR_NEGATIVE
    return err


def agreement(dtype, *options) -> Tuple[int, int]:
    """What every rank must pass alike, as two integers for validation's
    all-gather: the floating dtype's code and a CRC of the options (their
    repr: no per-process hash seed).  Ranks that disagree would run
    collectives of different sizes (a dtype, a hidden size: a process abort
    in the backend) or compute different losses (ignore_index, reduction,
    label smoothing, ...)."""
    name = str(dtype).replace("torch.", "")
    return (FLOAT_DTYPES.index(name) if name in FLOAT_DTYPES else len(FLOAT_DTYPES),
            zlib.crc32(repr(options).encode()) & 0x7FFFFFFF)


def process_group(name: str):
    """(group, rank in it, its size) from the name the operators take."""
    group = dist.distributed_c10d._resolve_process_group(name)
    return group, dist.get_rank(group), dist.get_world_size(group)


# ---------------------------------------------------------------------------
# validation: one all-gather, the same decision on every rank
# ---------------------------------------------------------------------------

def _target_stats(t: Tensor, ignore_index: int) -> Tensor:
    """[min, max, checksum1, checksum2] of the targets, on the device, no sync.

    min/max are over non-ignored rows (sentinels when there are none); the
    checksums cover every row so that targets differing between ranks (a
    silent wrong answer otherwise) are caught: the plain sum, and a sum
    weighted by a hash of the row index (odd multiplier modulo 2**31: a
    different weight for every row, so swapped or offsetting targets do not
    cancel as they did under periodic weights), each term reduced modulo the
    prime 2**31 - 1 so that no sum can overflow."""
    t = t.reshape(-1).to(torch.int64)
    valid = t != ignore_index
    sentinel = t.new_tensor([_BIG])
    tmin = torch.cat([torch.where(valid, t, _BIG), sentinel]).amin()
    tmax = torch.cat([torch.where(valid, t, -1), -sentinel]).amax()
    p = 2 ** 31 - 1
    pos = torch.arange(t.numel(), device=t.device, dtype=torch.int64) * 2654435761 % 2 ** 31 + 1
    return torch.stack([tmin, tmax, t.sum(), (t.remainder(p) * pos % p).sum()])


def _gather(group, world: int, device, v_local: int, vocab_start: Optional[int], vocab_size: Optional[int],
            vocab_sizes: Optional[Sequence[int]], rows: int, target: Optional[Tensor], ignore_index: int,
            local_err: int, agreed: Tuple[int, int]) -> List[List[int]]:
    """Every rank's facts as one int64 row, all-gathered and read to the host."""
    vec = torch.full((_NFIELDS + world,), -1, dtype=torch.int64, device=device)
    head = [v_local, -1 if vocab_start is None else vocab_start, -1 if vocab_size is None else vocab_size,
            rows, _BIG, -1, local_err, 0, 0, 0 if vocab_sizes is None else 1, agreed[0], agreed[1]]
    vec[:_NFIELDS] = torch.tensor(head, dtype=torch.int64, device=device)
    if vocab_sizes is not None and len(vocab_sizes) == world:
        vec[_NFIELDS:] = torch.tensor([int(s) for s in vocab_sizes], dtype=torch.int64, device=device)
    if target is not None:
        ts = _target_stats(target, ignore_index)
        vec[_F_TMIN:_F_TMAX + 1] = ts[:2]
        vec[_F_SUM1:_F_SUM2 + 1] = ts[2:]
    out = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(out, vec, group=group)
    return torch.stack(out).cpu().tolist()  # the one host read of validation


def _argument_problems(G: List[List[int]]) -> List[str]:
    return [f"rank {r}: {text}" for r, row in enumerate(G) for bit, text in _ERR_TEXT.items() if row[_F_ERR] & bit]


def _agreement_problems(G: List[List[int]], sizes: List[int]) -> List[str]:
    """The stated sizes, the row counts, the targets, the dtype and the
    options, against the ranks'."""
    problems = []
    total = sum(sizes)
    for r, row in enumerate(G):
        if row[_F_DTYPE] != G[0][_F_DTYPE]:
            name = lambda code: FLOAT_DTYPES[code] if code < len(FLOAT_DTYPES) else "not floating"  # noqa: E731
            problems.append(f"rank {r}'s tensors are {name(row[_F_DTYPE])}, rank 0's {name(G[0][_F_DTYPE])} "
                            f"(every rank must pass one dtype)")
        if row[_F_OPTS] != G[0][_F_OPTS]:
            problems.append(f"rank {r} was given other options than rank 0 (ignore_index, reduction, "
                            f"label_smoothing, z_loss, softcap, chunk_size or the hidden size; they must be the "
                            f"same on every rank)")
        if row[_F_HAS_SIZES] and row[_NFIELDS:] != sizes:
            problems.append(f"rank {r} was given vocab_sizes={row[_NFIELDS:]} but the ranks' local "
                            f"vocabulary sizes are {sizes}")
        if row[_F_VTOTAL] >= 0 and row[_F_VTOTAL] != total:
            problems.append(f"rank {r} was given vocab_size={row[_F_VTOTAL]} but the local slices "
                            f"{sizes} add up to {total}")
        if row[_F_ROWS] != G[0][_F_ROWS]:
            problems.append(f"rank {r} has {row[_F_ROWS]} target rows, rank 0 has {G[0][_F_ROWS]}")
        elif (row[_F_SUM1], row[_F_SUM2]) != (G[0][_F_SUM1], G[0][_F_SUM2]):
            problems.append(f"rank {r}'s targets differ from rank 0's (they must be the same on every rank)")
    return problems


def _slice_starts(G: List[List[int]], sizes: List[int], problems: List[str]) -> Optional[List[int]]:
    """Every rank's first class: as given (given on every rank or none, the
    slices tiling ``[0, V)``), else in rank order.  Appends to ``problems``."""
    world = len(G)
    given = [row[_F_START] >= 0 for row in G]
    if any(given) and not all(given):
        problems.append("vocab_start must be given on every rank or on none "
                        f"(given on ranks {[r for r, g in enumerate(given) if g]})")
        return None
    if not all(given):
        return [sum(sizes[:r]) for r in range(world)]
    starts = [row[_F_START] for row in G]
    end = 0
    for r in sorted(range(world), key=lambda r: (starts[r], sizes[r])):
        if starts[r] != end:
            problems.append(f"the slices [vocab_start, vocab_start + V_local) = "
                            f"{[(s, s + v) for s, v in zip(starts, sizes)]} do not tile [0, {sum(sizes)}) "
                            "without gaps or overlaps")
            break
        end += sizes[r]
    return starts


def _target_range_problems(G: List[List[int]], total: int, ignore_index: int) -> List[str]:
    tmin = min(row[_F_TMIN] for row in G)
    tmax = max(row[_F_TMAX] for row in G)
    if tmin != _BIG and (tmin < 0 or tmax >= total):  # tmin == _BIG: no row to check
        bad = tmin if tmin < 0 else tmax
        return [f"target holds class index {bad}, outside the vocabulary [0, {total}) "
                f"(and not ignore_index={ignore_index})"]
    return []


def gather_and_decide(group, rank: int, world: int, device, v_local: int, vocab_start: Optional[int],
                      vocab_size: Optional[int], vocab_sizes: Optional[Sequence[int]], rows: int,
                      target: Optional[Tensor], ignore_index: int, local_err: int,
                      agreed: Tuple[int, int] = (0, 0)) -> VocabLayout:
    """One all-gather of every rank's facts, one host read, one decision.

    Every rank sees the same gathered matrix and runs the same code on it, so
    either every rank returns a consistent layout or every rank raises the
    same ``ValueError``: none is left waiting in a later collective."""
    G = _gather(group, world, device, v_local, vocab_start, vocab_size, vocab_sizes, rows, target, ignore_index,
                local_err, agreed)
    problems = _argument_problems(G)
    if problems:
        raise ArgumentValueError("vocab-parallel cross-entropy: bad arguments (raised on every rank):\n  "
                                 + "\n  ".join(problems))
    sizes = [row[_F_VLOCAL] for row in G]
    problems = _agreement_problems(G, sizes)
    starts = _slice_starts(G, sizes, problems)
    error = ArgumentValueError
    if not problems:
        problems = _target_range_problems(G, sum(sizes), ignore_index)
        error = ClassIndexError  # also an IndexError, as gpuloss.cross_entropy's and torch's
    if problems:
        raise error("vocab-parallel cross-entropy: inconsistent layout or targets "
                    "(raised on every rank):\n  " + "\n  ".join(problems))
    return VocabLayout(start=starts[rank], size=v_local, vocab=sum(sizes), sizes=tuple(sizes))


def _agreement_of(agree_on: tuple) -> tuple:
    """:func:`agreement` of the dtype and options, ``(0, 0)`` where none are compared."""
    return agreement(*agree_on) if agree_on else (0, 0)


def resolve_layout(name: str, device, v_local: int, target: Tensor, ignore_index: int,
                   vocab_start: Optional[int], vocab_size: Optional[int], vocab_sizes: Optional[Sequence[int]],
                   local_err: int, validate: bool, agree_on: tuple = ()):
    """(group, layout): validated by one all-gather, or (``validate=False``)
    from ``vocab_sizes`` or the per-process cache.  ``local_err``: the
    caller's tensor error bits (target dtype/shape, devices, shapes);
    ``agree_on``: the dtype and the options every rank must pass alike,
    reduced by :func:`agreement` only where they are gathered (not on the
    cached hot path)."""
    group, rank, world = process_group(name)
    local_err |= layout_errors(world, vocab_start, vocab_size, vocab_sizes)
    key, here = (name, rank, world), (v_local, vocab_start, vocab_size)
    if validate:
        layout = gather_and_decide(group, rank, world, device, v_local, vocab_start, vocab_size, vocab_sizes,
                                   target.numel(), None if local_err else target, ignore_index, local_err,
                                   _agreement_of(agree_on))
        _LAYOUT_CACHE[key] = (here, layout)
        return group, layout
    # hot path: no host read; a local problem can only be raised here
    for bit, text in _ERR_TEXT.items():
        if local_err & bit:
            raise ArgumentValueError(f"vocab-parallel cross-entropy (rank {rank}): {text}")
    if vocab_sizes is not None:
        start = vocab_start if vocab_start is not None else sum(vocab_sizes[:rank])
        return group, VocabLayout(start=start, size=v_local, vocab=sum(vocab_sizes), sizes=tuple(vocab_sizes))
    if world == 1:
        return group, VocabLayout(start=vocab_start or 0, size=v_local, vocab=v_local, sizes=(v_local,))
    cached = _LAYOUT_CACHE.get(key)
    if cached is None or cached[0] != here:  # a new layout: one small collective
        cached = _LAYOUT_CACHE[key] = (here, gather_and_decide(group, rank, world, device, v_local, vocab_start,
                                                               vocab_size, None, target.numel(), None,
                                                               ignore_index, 0, _agreement_of(agree_on)))
    return group, cached[1]
