"""What every CuPy launcher shares: dtypes of native arrays, pointer and
stride arguments, the row launch, the "mean" divisor, the reduction.

bfloat16: CuPy has no bfloat16 dtype (without ml_dtypes), and a torch bf16
tensor does not cross DLPack into CuPy.  So a bf16 buffer travels as its raw
16 bits: every floating slot that holds an int16/uint16 array is read as bf16
bits (the kernels take ``unsigned short`` storage and convert with PTX).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ... import rules
from . import build as B
from .plan import MAX_THREADS, RowPlan, plan_rows, selected_variant


def np_():
    import numpy
    return numpy


def null():
    return np_().uint64(0)  # a null pointer argument


def ptr(a):
    return null() if a is None else a


def storage_dtype(a: Any) -> str:
    """Storage dtype name of a CuPy array in a floating slot; int16/uint16 means bf16 bits."""
    name = str(a.dtype)
    if name in ("int16", "uint16", "bfloat16"):
        return "bfloat16"
    if name in B.DTYPES:
        return name
    raise TypeError(f"cupy backend: unsupported floating dtype {name}")


def promoted_storage(a: str, b: str) -> str:
    """torch's promotion of two floating storage dtypes: the wider one;
    float16 with bfloat16 is float32."""
    if a == b:
        return a
    order = {"float16": 0, "bfloat16": 0, "float32": 1, "float64": 2}
    if order[a] == order[b]:
        return "float32"
    return a if order[a] > order[b] else b


def to_storage(a: Any, dtype: str) -> Any:
    """``a`` (a floating CuPy array, bf16 as its int16 bits) in storage dtype
    ``dtype``, converted as the GPU converts: bfloat16 -> float32 is the
    16-bit shift (exact), float32 -> bfloat16 rounds to nearest even.  A
    plain ``astype`` would read or write bf16 bits as integers."""
    import cupy
    src = storage_dtype(a)
    if src == dtype:
        return a
    if src == "bfloat16":
        a = (a.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
        return a if dtype == "float32" else a.astype(dtype)
    if dtype == "bfloat16":
        f = a.astype(cupy.float32)
        bits = f.view(cupy.uint32).astype(cupy.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = cupy.where(cupy.isnan(f), (bits >> 16) | 0x40, rounded)
        return out.astype(cupy.uint16).view(cupy.int16)
    return a.astype(dtype)


def index_dtype(a: Any) -> str:
    name = str(a.dtype)
    if name not in B.INDEX_CTYPES:
        raise TypeError(f"cupy backend: class-index targets must be int32 or int64, got {name}")
    return name


def class_targets(t: Any) -> Any:
    """Class-index targets as the kernels index them, ``t[row]``: contiguous (a RawKernel gets
    a bare pointer, so a strided view such as ``labels[:, 0]`` would be read as its base).
    Their dtype is checked where the kernel is chosen (:func:`index_dtype`)."""
    import cupy
    return cupy.ascontiguousarray(t)


def acc(dtype: str):
    """The NumPy scalar type of the accumulation dtype (:mod:`gpuloss.rules`)."""
    return getattr(np_(), rules.acc_dtype_name(B.DTYPES[dtype][2]))


def aligned(arrays: Sequence[Any], itemsize: int) -> bool:
    """True when every row of every array starts on a 16-byte boundary."""
    for a in arrays:
        if a is None:
            continue
        if a.data.ptr % 16:
            return False
        if a.shape[0] > 1 and (a.strides[0] % 16):
            return False
    return True


def row_stride(a) -> int:
    return a.strides[0] // a.itemsize if a.ndim == 2 and a.shape[0] > 1 else (a.shape[-1] if a.ndim else 0)


def unit_rows(a):
    """Rows with a unit-stride last axis (the contract's layout); copies only if not."""
    import cupy
    if a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize):
        return a
    return cupy.ascontiguousarray(a)


def row_launch(op: str, dtype: str, expr_fmt: str, R: int, C: int, args: Sequence[Any],
               row_arrays: Sequence[Any], variant: Optional[str] = None) -> RowPlan:
    """Plan and launch a row kernel; ``expr_fmt`` has {vec}, {k}, {on} holes."""
    import cupy
    variant = variant or selected_variant()
    itemsize = B.DTYPES[dtype][1]
    is_aligned = aligned(row_arrays, itemsize)
    if variant == "staged":
        from . import staged
        plan = staged.launch(op, dtype, R, C, args, row_arrays, is_aligned)
        if plan is not None:
            return plan
    _, cc, optin = B.device_info(cupy)
    vec = B.vec_width(dtype) if is_aligned else 1
    plan = plan_rows(R, C, itemsize, vec, cc, optin, variant)
    if plan.grid == 0:
        return plan
    expr = expr_fmt.format(vec=plan.vec, k=plan.cluster, on="true" if plan.variant == "onchip" else "false")
    kern = B.kernel(op, dtype, expr, plan.smem_bytes)
    kern((plan.grid,), (plan.threads,), tuple(args), shared_mem=plan.smem_bytes)
    return plan


def weight_vector(weight, dt):
    if weight is None:
        return None
    import cupy
    return cupy.ascontiguousarray(weight, dtype=acc(dt))


def mean_divisor(op, target, w, R, C, ignore_index, dt):
    """Device scalar: the "mean" divisor of class-index losses, the sum of
    w[t] over the valid rows (:mod:`gpuloss.rules`)."""
    import cupy
    div = cupy.empty((1,), dtype=acc(dt))
    ti = B.INDEX_CTYPES[index_dtype(target)]
    k = B.kernel(op, dt, f"gpuloss_mean_divisor<{B.ACC_CTYPE[B.DTYPES[dt][2]]}, {ti}>")
    i64 = np_().int64
    k((1,), (MAX_THREADS,), (target, ptr(w), div, i64(R), i64(C), i64(ignore_index)))
    return div


def reduce_rows(loss_rows, reduction: str, divisor=None):
    """0-d device result of per-row (or per-block partial) losses; no host sync.
    "mean" of a zero divisor is NaN (:mod:`gpuloss.rules`): the class-target
    divisor kernel stores 0 as NaN."""
    if reduction == "none":
        return loss_rows
    tot = loss_rows.sum()
    return tot if reduction == "sum" else tot / divisor
