"""The staged variant's launches (``kernels/cuda/staged.cu``): persistent
blocks that copy rows ahead into shared memory, so each element is read from
device memory once.  Chosen only by ``GPULOSS_CUPY_VARIANT=staged`` (it has
not yet run on a GPU); what it does not take runs on the row kernels."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

from . import build as B
from .common import np_
from .plan import (RowPlan, StagedPlan, conservative_clusters, plan_staged, staged_blocks_per_sm, staged_grid,
                   staged_max_threads)


def _max_active_clusters(kern, plan: StagedPlan) -> Optional[int]:
    """cuOccupancyMaxActiveClusters for this kernel and launch shape (libcuda through ctypes:
    CuPy does not wrap it), or None."""
    import ctypes
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuOccupancyMaxActiveClusters
    except (OSError, AttributeError):
        return None

    class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
        _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                    ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                    ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                    ("attrs", ctypes.c_void_p), ("numAttrs", ctypes.c_uint)]

    fn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.POINTER(LaunchConfig)]
    fn.restype = ctypes.c_int
    cfg = LaunchConfig(plan.cluster, 1, 1, plan.threads, 1, 1, plan.smem_bytes, None, None, 0)
    n = ctypes.c_int(0)
    rc = fn(ctypes.byref(n), ctypes.c_void_p(int(kern.kernel.ptr)), ctypes.byref(cfg))
    return n.value if rc == 0 and n.value > 0 else None


def _resident_clusters(kern, plan: StagedPlan) -> int:
    """How many clusters (blocks, for K = 1) of this launch fit on the device at once;
    GPULOSS_CUPY_STAGED_CLUSTERS overrides (the tuning sweep)."""
    import cupy
    env = os.environ.get("GPULOSS_CUPY_STAGED_CLUSTERS", "").strip()
    if env:
        return max(1, int(env))
    attrs = B.device_attrs(cupy)
    sms = attrs["MultiProcessorCount"]
    smem_sm = attrs["MaxSharedMemoryPerMultiprocessor"]
    bps = staged_blocks_per_sm(plan, int(getattr(kern, "num_regs", 64) or 64), smem_sm)
    if plan.cluster == 1:
        try:
            from cupy_backends.cuda.api import driver
            bps = max(1, int(driver.occupancyMaxActiveBlocksPerMultiprocessor(
                int(kern.kernel.ptr), plan.threads, plan.smem_bytes)))
        except Exception:  # noqa: BLE001  (fall back to the formula)
            pass
        return sms * bps
    exact = _max_active_clusters(kern, plan)
    return exact if exact else conservative_clusters(sms, bps, plan.cluster)


def knobs(dtype: str) -> Dict[str, Any]:
    """plan_staged's overrides from the environment (the tuning sweep's knobs)."""
    kw: Dict[str, Any] = {"max_threads": staged_max_threads(dtype)}
    env = os.environ.get
    if env("GPULOSS_CUPY_STAGED_SLICE_KB"):
        kw["slice_bytes"] = int(env("GPULOSS_CUPY_STAGED_SLICE_KB")) * 1024
    if env("GPULOSS_CUPY_STAGED_NBUF"):
        kw["nbuf"] = int(env("GPULOSS_CUPY_STAGED_NBUF"))
    if env("GPULOSS_CUPY_STAGED_THREADS"):
        kw["threads"] = int(env("GPULOSS_CUPY_STAGED_THREADS"))
    return kw


def _is_null(a) -> bool:
    """A null pointer argument (``common.null()``) rather than an array."""
    return isinstance(a, np_().integer) and int(a) == 0


def staged_args(op: str, args: Sequence[Any]) -> Optional[Tuple[Any, ...]]:
    """The staged kernel's arguments (less nbuf) from the row kernel's, or None where the
    staged kernels do not take the call (probability targets).  Class-index targets are widened
    to int64 (O(R) bytes), the one index type the staged kernel takes."""
    if op in ("softmax_fwd", "softmax_bwd"):
        return tuple(args)
    if op == "cross_entropy":
        (x, t, p, w, div, g, loss, lse, gt, xs, ps, gs, R, C, ign, eps, zl, cap) = args
        if _is_null(t) or not _is_null(p) or not _is_null(gt):
            return None
        if str(t.dtype) != "int64":
            t = t.astype("int64")
        return (x, t, w, div, g, loss, lse, xs, gs, R, C, ign, eps, zl, cap)
    return None


def launch(op: str, dtype: str, R: int, C: int, args: Sequence[Any], row_arrays: Sequence[Any],
           aligned: bool) -> Optional[RowPlan]:
    """Launch ``op`` on the staged kernels if they take it (see staged_args, plan_staged and
    16-byte ``aligned`` rows); None otherwise (the caller runs the row kernels)."""
    import cupy
    sargs = staged_args(op, args) if op in B.STAGED_OPS else None
    if sargs is None or R == 0 or not aligned:
        return None
    _, cc, optin = B.device_info(cupy)
    itemsize = B.DTYPES[dtype][1]
    plan = plan_staged(C, itemsize, 2 if op == "softmax_bwd" else 1, cc, optin, nvrtc=B.nvrtc_version(),
                       **knobs(dtype))
    if plan is None:
        return None
    kern = B.staged_kernel(op, dtype, plan.cluster, plan.smem_bytes)
    grid = staged_grid(R, plan.cluster, _resident_clusters(kern, plan))
    kern((grid,), (plan.threads,), (*sargs, np_().int32(plan.nbuf)), shared_mem=plan.smem_bytes)
    return RowPlan(variant="staged", vec=B.vec_width(dtype), cluster=plan.cluster, threads=plan.threads,
                   smem_bytes=plan.smem_bytes, grid=grid)
