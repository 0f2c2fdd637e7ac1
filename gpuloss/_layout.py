"""Array-library glue in the caller's kind (NumPy, CuPy or torch), before and
after a backend runs: moving the class dimension last and flattening to 2-D
rows (views where possible), and back; casting results; broadcasting operand
pairs; writing an in-place gradient back.  No backend is involved here.
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional, Tuple

import numpy as np

from .errors import ArgumentValueError


def xp(kind: str):
    """The array module of a NumPy or CuPy caller (None for torch)."""
    if kind == "numpy":
        return np
    if kind == "cupy":
        return sys.modules["cupy"]
    return None


def numel(a: Any, kind: str) -> int:
    return a.numel() if kind == "torch" else a.size


def movedim(a, kind: str, src: int, dst: int):
    if kind == "torch":
        return a.movedim(src, dst)
    return xp(kind).moveaxis(a, src, dst)


def unit_last_stride(a, kind: str):
    """``a`` itself when its last axis has unit stride, else a contiguous copy
    (the kernels take any row stride but need unit stride inside a row)."""
    if a.ndim == 0:
        return a
    if kind == "torch":
        return a if (a.stride(-1) == 1 or a.shape[-1] <= 1) else a.contiguous()
    if a.strides[-1] == a.itemsize or a.shape[-1] <= 1:
        return a
    return xp(kind).ascontiguousarray(a)


def gathered(*arrays) -> tuple:
    """``arrays`` with every DTensor that is not replicated redistributed to
    ``Replicate()`` (differentiably: its gradient goes back to its own
    placements).  gpuloss's operators replicate their DTensor inputs anyway
    (:func:`gpuloss.torch_ops.dtensor_sharding`), but the layout steps before
    them (moving the class dimension, flattening rows) would ask DTensor to
    flatten a sharded tensor, which it refuses where the shards are uneven."""
    if not any(type(a).__name__ == "DTensor" for a in arrays):
        return arrays
    from torch.distributed.tensor import Replicate
    return tuple(a.redistribute(a.device_mesh, [Replicate()] * a.device_mesh.ndim)
                 if type(a).__name__ == "DTensor" and not all(q.is_replicate() for q in a.placements) else a
                 for a in arrays)


def rows2d(a, kind: str, class_dim: int):
    """(R, C) rows with ``class_dim`` last, and the layout that undoes it
    for an array of the same shape as ``a`` (:func:`from_rows`)."""
    nd = a.ndim
    if nd == 0:
        return a.reshape(1, 1), ("0d", a.shape)
    cd = class_dim % nd
    moved = a if cd == nd - 1 else movedim(a, kind, cd, -1)
    C = moved.shape[-1]
    if nd == 2:
        rows = moved
    else:  # the row count given explicitly: reshape(-1, 0) is ambiguous
        rows = moved.reshape(math.prod(moved.shape[:-1]), C)
    return unit_last_stride(rows, kind), ("nd", moved.shape, cd)


def from_rows(rows, kind: str, layout):
    if rows is None:
        return None
    if layout[0] == "0d":
        return rows.reshape(layout[1])
    _, moved_shape, cd = layout
    out = rows.reshape(moved_shape)
    nd = len(moved_shape)
    return out if cd == nd - 1 else movedim(out, kind, -1, cd)


def elem_strides(a, kind: str) -> tuple:
    """Strides in elements (NumPy's bytes divided by the item size)."""
    return tuple(a.stride()) if kind == "torch" else tuple(st // a.itemsize for st in a.strides)


def iteration_order(kind: str, shape: tuple, *arrays) -> Optional[Tuple[int, ...]]:
    """The order of dimensions, outermost first, in which torch's
    TensorIterator lays out the result of an element-wise operation on
    ``arrays`` (broadcastable to ``shape``; the first array's strides decide,
    the next ones break its ties, a broadcast dimension takes no part), as in
    ``reorder_dimensions`` of ATen's TensorIterator; None for the row-major
    order.  An element-wise loss with ``reduction="none"`` has its result in
    this layout: a transposed or channels_last input gives a transposed or
    channels_last loss, and the op runs over the inputs' memory as it lies,
    with no copy."""
    nd = len(shape)
    if nd < 2:
        return None
    strides = []
    for a in arrays:
        if a is None:
            continue
        pad = nd - a.ndim
        st, sh = (0,) * pad + elem_strides(a, kind), (1,) * pad + tuple(a.shape)
        strides.append(tuple(0 if (sh[i] == 1 and shape[i] != 1) else st[i] for i in range(nd)))

    def should_swap(d0: int, d1: int) -> int:
        for st in strides:
            s0, s1 = st[d0], st[d1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 != s1:
                return -1 if s0 < s1 else 1
            if shape[d0] > shape[d1]:
                return 1
        return 0

    perm = list(range(nd - 1, -1, -1))  # innermost first, as ATen's
    for i in range(1, nd):
        d1 = i
        for d0 in range(i - 1, -1, -1):
            c = should_swap(perm[d0], perm[d1])
            if c > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif c < 0:
                break
    order = tuple(reversed(perm))
    return None if order == tuple(range(nd)) else order


def sorted_pairs(pairs) -> list:
    """``sorted(pairs)`` for (stride, size) pairs, by comparisons only: under
    torch.compile with dynamic shapes the strides are symbolic, which dynamo
    cannot sort but can compare (each comparison a guard, as torch's own
    layout code guards); a handful of dimensions, so insertion order."""
    out: list = []
    for p in pairs:
        i = len(out)
        while i > 0 and (p[0] < out[i - 1][0] or (p[0] == out[i - 1][0] and p[1] < out[i - 1][1])):
            i -= 1
        out.insert(i, p)
    return out


def dense(a, kind: str) -> bool:
    """Whether ``a``'s elements fill its memory without gaps or overlaps, in
    some order of its dimensions (torch's ``is_non_overlapping_and_dense``)."""
    if kind == "numpy" and any(st % a.itemsize for st in a.strides):
        return False
    expect = 1
    for st, n in sorted_pairs((st, n) for n, st in zip(a.shape, elem_strides(a, kind)) if n != 1):
        if st != expect:
            return False
        expect *= n
    return True


def permute(a, order: Tuple[int, ...], kind: str, ndim: Optional[int] = None):
    """``a`` with its dimensions in ``order``; with ``ndim``, an array
    broadcastable to that many dimensions first takes leading ones."""
    if a is None:
        return None
    if ndim is not None and a.ndim < ndim:
        a = a.reshape((1,) * (ndim - a.ndim) + tuple(a.shape))
    return a.permute(order) if kind == "torch" else a.transpose(order)


def inverse_order(order: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def contiguous(out, kind: str):
    """``out`` contiguous, as torch's softmax / log_softmax (and backward)
    always return their result whatever the input's layout: one formed along a
    dimension other than the last comes back from the rows as a permuted view
    (``.view`` on it would fail).  A copy only then."""
    if kind == "torch":
        return out.contiguous()
    return out if out.flags.c_contiguous else xp(kind).ascontiguousarray(out)


def native(dtype):
    """A NumPy dtype in this machine's byte order: results come out native,
    as NumPy's own functions give them, whatever the byte order of the
    arrays passed (``'>f4'`` in, ``float32`` out)."""
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def native_array(a, kind: str):
    """``a``, or a copy of it in this machine's byte order (NumPy only)."""
    if kind != "numpy" or a is None or a.dtype.isnative:
        return a
    return a.astype(native(a.dtype))


def cast_like(a, like, kind: str):
    """``a`` in ``like``'s dtype (losses come back from a backend in the
    accumulation dtype; PyTorch returns the input's dtype)."""
    if a is None:
        return None
    if kind == "torch":
        return a if a.dtype == like.dtype else a.to(like.dtype)
    dt = native(like.dtype)
    return a if a.dtype == dt else a.astype(dt)


def same_layout(a, b, kind: str) -> bool:
    """Whether ``a`` and ``b`` (of one shape) are the same elements of the
    same memory (strides of size-1 dimensions do not matter)."""
    if a.dtype != b.dtype:
        return False
    if kind == "torch":
        pa, pb, sa, sb = a.data_ptr(), b.data_ptr(), a.stride(), b.stride()
    else:
        ptr = (lambda v: v.__array_interface__["data"][0]) if kind == "numpy" else (lambda v: v.data.ptr)
        pa, pb, sa, sb = ptr(a), ptr(b), a.strides, b.strides
    return pa == pb and all(x == y for x, y, n in zip(sa, sb, a.shape) if n > 1)


def write_back(grad, input, kind: str):
    """``inplace_backward``: the gradient must end up in ``input``'s memory.
    A backend works on rows that are a view of ``input`` where it can; where
    they were a copy (class dimension not last, strided columns, bfloat16 on
    the NumPy backend) the gradient is copied (and rounded) into ``input``."""
    if grad is None or same_layout(grad, input, kind):
        return input
    if kind == "torch":
        input.copy_(grad)
    else:
        xp(kind).copyto(input, grad, casting="unsafe")
    return input


def user_warning(message: str, stacklevel: int, like: Any) -> None:
    """``warnings.warn`` (a UserWarning, ``stacklevel`` counted from the
    caller of ``warn``), except while torch.compile traces: dynamo cannot
    trace ``warnings.warn`` in user code, and the call would break the graph
    (``fullgraph=True`` raises) where torch's own function compiles.
    ``like``: the call's array (a tensor only where torch can be compiling;
    see :func:`torch_tracing`)."""
    if torch_tracing(like, "compile"):
        return
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def torch_tracing(like: Any, how: str) -> bool:
    """Whether torch traces now (``how``: "compile" for torch.compile, "jit"
    for torch.jit.trace), asked only for a torch tensor ``like``: torch is
    imported already then, and nothing reads ``sys.modules``, a dict that
    dynamo would trace while an import elsewhere may change it."""
    if not hasattr(like, "__torch_function__"):
        return False
    import torch
    return torch.compiler.is_compiling() if how == "compile" else torch.jit.is_tracing()


def broadcast_pair(input, target, kind: str, warn: bool):
    """``(input, target, shape)`` expanded to their common shape, as torch's
    ``mse_loss`` and ``kl_div`` broadcast them (``mse_loss`` with torch's
    warning when the sizes differ); ``shape`` is None when they already
    agree.  Views, no copies."""
    if tuple(input.shape) == tuple(target.shape):
        return input, target, None
    try:
        if kind == "torch":  # symbolic sizes stay symbolic (torch.export, make_fx)
            import torch
            shape = tuple(torch.broadcast_shapes(input.shape, target.shape))
        else:
            shape = tuple(np.broadcast_shapes(tuple(input.shape), tuple(target.shape)))
    except (ValueError, RuntimeError):
        raise ArgumentValueError(f"target of shape {tuple(target.shape)} does not broadcast with input of shape "
                                 f"{tuple(input.shape)}{_torch_broadcast_words(input.shape, target.shape)}") from None
    if warn:
        shapes = (target.shape, input.shape) if kind == "torch" else (tuple(target.shape), tuple(input.shape))
        user_warning(f"Using a target size ({shapes[0]}) that is different to the input size ({shapes[1]}). "
                     f"This will likely lead to incorrect results due to broadcasting. "
                     f"Please ensure they have the same size.", stacklevel=4, like=input)
    if kind == "torch":
        return input.expand(shape), target.expand(shape), shape
    return xp(kind).broadcast_to(input, shape), xp(kind).broadcast_to(target, shape), shape


def sum_to(a, shape: Tuple[int, ...], kind: str):
    """``a`` summed over the dimensions that broadcasting added to ``shape``:
    the gradient of a broadcast operand."""
    if a is None or tuple(a.shape) == tuple(shape):
        return a
    if kind == "torch":
        return a.sum_to_size(shape) if len(shape) else a.sum()
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and a.shape[lead + i] != 1)
    return a.sum(axis=axes, keepdims=True).reshape(shape)


def zeros(like, shape, kind: str, dtype: Optional[Any] = None):
    if kind == "torch":
        return like.new_zeros(shape, dtype=dtype or like.dtype)
    return xp(kind).zeros(shape, dtype=native(dtype or like.dtype))


def result_dtype(kind: str, *arrays, zero_dim_rule: bool = False):
    """The dtype torch's type promotion gives these floating arrays.  With
    ``zero_dim_rule`` (two arrays), its rule that a 0-d tensor does not raise
    a dimensioned one's dtype within a category (float32 (3,) with float64
    () is float32), as an element-wise operation on them gives; without, as
    when they were broadcast to one shape first (mse_loss)."""
    if kind == "torch":
        import torch
        if zero_dim_rule and len(arrays) == 2 and (arrays[0].dim() == 0) != (arrays[1].dim() == 0):
            # floating both (one category): the dimensioned one's dtype (torch.result_type
            # would break the graph under torch.compile: it returns a dtype)
            return (arrays[1] if arrays[0].dim() == 0 else arrays[0]).dtype
        dt = arrays[0].dtype
        for a in arrays[1:]:
            dt = torch.promote_types(dt, a.dtype)
        return dt
    return native(np.result_type(*arrays))


def as_array(a, kind: str):
    """A NumPy loss as a 0-d ndarray, not the NumPy scalar arithmetic on a
    0-d array gives (arrays in, arrays out); other kinds as they are."""
    return np.asarray(a) if kind == "numpy" else a


def astype(a, dtype, kind: str):
    """``a`` in ``dtype`` (differentiable for torch: its gradient comes back
    in ``a``'s own dtype); ``a`` itself when it already is."""
    if kind != "torch":
        dtype = native(dtype)
    if a is None or a.dtype == dtype:
        return a
    return a.to(dtype) if kind == "torch" else a.astype(dtype)


def loss_as(out, dtype, kind: str):
    """A result whose loss is in ``dtype`` (None: as it is): ``out`` is the
    loss itself, or a named tuple of results with a ``loss`` field."""
    if dtype is None:
        return out
    if hasattr(out, "_replace"):
        return out._replace(loss=astype(out.loss, dtype, kind))
    return astype(out, dtype, kind)


def connected(loss, kind: str, *arrays):
    """An empty-input result that stays in torch's autograd graph (its
    gradients are zeros of each array's shape)."""
    if kind != "torch":
        return loss
    for a in arrays:
        if a is not None and a.requires_grad:
            loss = loss + a.sum() * 0
    return loss


def empty_class_loss(kind: str, logits, target, prob: bool, ignore_index: int, eps: float, reduction: str,
                     z_loss: float = 0.0):
    """Cross-entropy / NLL over ``logits`` (class dimension 1, or 0 unbatched)
    that hold no element (no rows, or C = 0), as torch gives it: a row's loss
    is 0 when its target is ignored, NaN otherwise (no class can match it),
    NaN for every row with label smoothing (``eps / C`` is infinite), 0 for a
    probability target (an empty sum); "sum" adds the rows, "mean" is NaN (a
    zero divisor).  With ``z_loss`` and C = 0, a counted row adds
    ``z_loss * lse**2`` of an empty logsumexp: infinity.  In ``logits``' dtype."""
    shape = tuple(logits.shape[:1]) + tuple(logits.shape[2:]) if logits.ndim >= 2 else ()
    nan = float("nan")
    rows = zeros(logits, shape, kind)
    if not prob:
        bad = target.reshape(shape) != ignore_index
        rows = rows.masked_fill(bad, nan) if kind == "torch" else xp(kind).where(bad, nan, rows)
        if eps > 0:
            rows = rows * nan
    elif z_loss > 0 and logits.ndim and logits.shape[1 if logits.ndim >= 2 else 0] == 0:
        rows = rows + float("inf")
    C = logits.shape[1 if logits.ndim >= 2 else 0] if logits.ndim else 1
    # "sum" with smoothing over C = 0 classes: torch's 0 * (eps / C), NaN even without rows
    smooth_nan = not prob and eps > 0 and C == 0
    loss = rows if reduction == "none" else rows.sum() * (nan if reduction == "mean" or smooth_nan else 1.0)
    return cast_like(loss, logits, kind) if kind == "torch" else xp(kind).asarray(loss, dtype=logits.dtype)


def _torch_broadcast_words(a, b) -> str:
    """torch's sentence for shapes that do not broadcast (``a - b``): the
    first clash from the right, as a dimension of the broadcast result."""
    n = max(len(a), len(b))
    for i in range(1, n + 1):
        sa = a[-i] if i <= len(a) else 1
        sb = b[-i] if i <= len(b) else 1
        if sa != sb and sa != 1 and sb != 1:
            return (f" (The size of tensor a ({sa}) must match the size of tensor b ({sb}) at non-singleton "
                    f"dimension {n - i})")
    return ""
