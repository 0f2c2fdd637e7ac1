"""The rules every backend follows, written once.

Backends implement the math of each op in their own language (NumPy, Triton,
CUDA C); the rules *around* the math live here, and backends, the public
functions, the fused linear cross-entropy and the vocabulary-parallel loss
import them instead of restating them.

Reductions
----------
``REDUCTIONS`` for every loss; ``KL_REDUCTIONS`` adds ``"batchmean"`` (sum
divided by the batch size) for the KL divergences.  Kernels that take the
reduction as a number use ``REDUCTION_CODES``.

Accumulation dtype
------------------
Arithmetic is float64 for float64 storage and float32 for every other
floating dtype (float16, bfloat16, float32): :func:`acc_dtype_name`.  Losses
come out of a backend in that dtype; the public functions cast them to the
input's dtype, as torch returns them.

Class-index targets
-------------------
A row whose target ``t`` equals ``ignore_index`` is *ignored*: loss 0,
gradient 0.  A row with ``0 <= t < C`` is *valid*.  Any other target is
*out of range*: value checks refuse it before any work where they run
(always on the CPU; on a GPU when :func:`gpuloss.set_value_checks` says so),
and where they do not run, the kernels never read out of bounds: that row's
loss and gradient are NaN, and every other row keeps its own values.

The ``"mean"`` divisor is the sum of ``weight[t]`` over the valid rows (their
count without class weights); out-of-range rows are not counted.  The
gradient scale of a valid row is ``1 / divisor`` (:func:`mean_scale`), of an
ignored row exactly 0 (selected, never multiplied).  A zero divisor (every
row ignored, or every valid row of weight 0) follows torch: the loss is
NaN (``0 / 0``; also with label smoothing, whose sum may be nonzero: torch
adds it to the NaN mean of the NLL term); ignored rows keep zero gradients
and the valid rows' are NaN (their scale, :func:`mean_scale`, is NaN; the
GPU divisor kernels store a zero divisor as NaN).

Empty inputs
------------
A loss over no elements follows torch: ``"none"`` gives an empty (or, for
the class-dimension losses with ``C = 0``, per-row) result, ``"sum"`` 0,
``"mean"`` NaN; see ``gpuloss.functional`` for the class-dimension details.
"""
from __future__ import annotations

import math

REDUCTIONS = ("none", "mean", "sum")
KL_REDUCTIONS = ("none", "mean", "sum", "batchmean")
#: the reduction as a kernel argument
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}


def acc_dtype_name(storage: str) -> str:
    """The arithmetic dtype for a storage dtype name: float64 stays float64,
    everything else computes in float32."""
    return "float64" if storage == "float64" else "float32"


def valid_targets(t, ignore_index: int, C: int):
    """The valid rows' mask of class-index targets ``t`` (NumPy, CuPy or
    torch): neither ignored nor out of range.  What counts in the "mean"
    divisor, above."""
    return (t != ignore_index) & (t >= 0) & (t < C)


def saved_grad_dtype_name(storage: str) -> str:
    """The dtype of a gradient a fused forward pass forms *before* backward
    multiplies the upstream gradient in (the fused linear and the
    vocabulary-parallel cross-entropy): the storage dtype, except float32
    for float16.  Divided by "mean"'s divisor and stored in fp16, its small
    components would flush to zero before a GradScaler's scale reaches them;
    bfloat16 has float32's range."""
    return "float32" if storage == "float16" else storage


def saved_grad_hidden_dtype_name(storage: str) -> str:
    """The dtype of the fused linear cross-entropy's grad_hidden between its
    forward and backward: float32 for both 16-bit dtypes (N x H, small beside
    the weight's V x H).  Its GEMM's float32 product takes "mean"'s divisor and
    the upstream gradient before one rounding, where torch rounds twice (dZ and
    the product); rounded into bf16 first and then scaled, it was rounded three
    or four times (max errors 1.4-2.5x torch's on the CPU, 12 seeds)."""
    return "float32" if storage in ("float16", "bfloat16") else storage


def mean_scale(divisor: float) -> float:
    """The gradient scale of a valid row under ``"mean"``: ``1 / divisor``,
    NaN for a zero divisor (so a valid row's gradient is NaN, as in torch,
    also where z_loss makes it nonzero, which inf would turn into +-inf;
    ignored rows, scaled by a selected 0, stay 0)."""
    return 1.0 / divisor if divisor != 0 else math.nan
