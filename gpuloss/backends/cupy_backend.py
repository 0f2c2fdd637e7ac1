"""CuPy backend: the fused loss kernels as CUDA C, compiled at run time by NVRTC.

Layers, in order: compile options and name expressions (shared with the nvcc test in
``tests/test_cuda_sources.py`` so the two cannot drift), the sizing helper, the module cache,
the launchers, the :class:`CupyBackend` primitives.

Device code lives in ``gpuloss/kernels/cuda/*.cu``: one templated ``__global__`` body per op,
instantiated per storage dtype through ``cupy.RawModule(name_expressions=...)`` and cached per
(device, source, op, dtype).

bfloat16: CuPy has no bfloat16 dtype (without ml_dtypes), and a torch bf16 tensor does not cross
DLPack into CuPy.  So a bf16 buffer travels as its raw 16 bits: :meth:`CupyBackend.to_native`
views a torch bf16 tensor as int16 before ``cupy.from_dlpack``, every floating slot of a
primitive that holds an int16/uint16 array is read as bf16 bits (the kernels take
``unsigned short`` storage and convert with PTX), and :meth:`CupyBackend.from_native` views such
an array back as ``torch.bfloat16``.  Nothing is copied either way.

Nothing here touches the GPU at import time; :meth:`CupyBackend.probe` is the first call that
does.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .base import Backend, LossResult

# --------------------------------------------------------------------------------------------
# Sources, dtypes, compile options
# --------------------------------------------------------------------------------------------

#: directory of the .cu/.cuh sources (installed as gpuloss.kernels.cuda)
def kernel_dir() -> Path:
    import gpuloss.kernels.cuda as kc
    return Path(kc.__file__).resolve().parent


#: storage dtype name -> (C++ tag type in common.cuh, itemsize, accumulation dtype name)
DTYPES: Dict[str, Tuple[str, int, str]] = {
    "float32": ("f32", 4, "float32"),
    "float64": ("f64", 8, "float64"),
    "float16": ("f16", 2, "float32"),
    "bfloat16": ("bf16", 2, "float32"),
}
_ACC_CTYPE = {"float32": "float", "float64": "double"}
#: target index dtype -> C++ type
INDEX_CTYPES = {"int32": "int", "int64": "long long"}

#: "staged" (staged.cu) runs softmax forward / backward and class-index cross-entropy; every other
#: op, and rows it cannot stage, run as "auto".  Not the default: it has not yet run on a GPU.
VARIANTS = ("auto", "looped", "onchip", "staged")
#: cluster sizes the onchip variant may use on sm_90.  Clusters of 4 and 8 lost to the looped
#: kernel on the H200 (bench/RESULTS.md, 2026-11-26: 0.34-0.46 against 0.44-0.59 of the floor)
#: and are no longer built; the staged variant is the design for rows split over clusters.
CLUSTER_SIZES = (1, 2)
#: (K, ONCHIP) combinations instantiated: looped, single-block onchip, then clusters on sm_90
def _row_flavours(cc: int) -> List[Tuple[int, bool]]:
    flav = [(1, False), (1, True)]
    if cc >= 90:
        flav += [(k, True) for k in CLUSTER_SIZES if k > 1]
    return flav


#: op group -> source file
OP_SOURCES = {
    "softmax_fwd": "rows.cu",
    "softmax_bwd": "rows.cu",
    "cross_entropy": "rows.cu",
    "nll": "rows.cu",
    "kl_div_logits": "rows.cu",
    "elementwise": "elementwise.cu",
    "staged": "staged.cu",
}
#: elementwise OP codes (see elementwise.cu)
EW_OPS = {"mse": 0, "kl_div": 1, "kl_div_log_target": 2, "bce_with_logits": 3, "bce": 4}


def nvrtc_options(cc: int) -> Tuple[str, ...]:
    """Compiler options for compute capability ``cc`` (e.g. 90), identical for NVRTC and the
    nvcc compile test.  The architecture itself is passed separately (NVRTC: ``--gpu-
    architecture=sm_XX`` through CuPy; nvcc: ``-arch=sm_XX``)."""
    opts = ["-std=c++17", f"-DGPULOSS_CC={cc}"]
    if cc >= 90:
        opts.append("-DGPULOSS_HAS_CLUSTER=1")
    return tuple(opts)


def vec_width(dtype: str) -> int:
    """Elements per 16-byte vector access for a storage dtype."""
    return 16 // DTYPES[dtype][1]


def name_expressions(op: str, dtype: str, cc: int) -> List[str]:
    """Every kernel instantiation the backend may launch for ``op`` at ``dtype`` on ``cc``."""
    tag = DTYPES[dtype][0]
    vecs = (1, vec_width(dtype))
    out: List[str] = []
    flav = _row_flavours(cc)
    b = lambda v: "true" if v else "false"  # noqa: E731
    if op in ("softmax_fwd", "softmax_bwd"):
        out = [f"gpuloss_{op}<{tag}, {v}, {k}, {b(on)}>" for v in vecs for k, on in flav]
    elif op == "kl_div_logits":
        out = [f"gpuloss_kl_div_logits<{tag}, {b(tl)}, {v}, {k}, {b(on)}>"
               for tl in (True, False) for v in vecs for k, on in flav]
    elif op == "cross_entropy":
        combos = [(INDEX_CTYPES["int32"], False), (INDEX_CTYPES["int64"], False), (INDEX_CTYPES["int64"], True)]
        out = [f"gpuloss_cross_entropy<{tag}, {ti}, {b(pr)}, {v}, {k}, {b(on)}>"
               for ti, pr in combos for v in vecs for k, on in flav]
        acc = _ACC_CTYPE[DTYPES[dtype][2]]
        out += [f"gpuloss_mean_divisor<{acc}, {ti}>" for ti in INDEX_CTYPES.values()]
    elif op == "nll":
        out = [f"gpuloss_nll<{tag}, {ti}>" for ti in INDEX_CTYPES.values()]
        acc = _ACC_CTYPE[DTYPES[dtype][2]]
        out += [f"gpuloss_mean_divisor<{acc}, {ti}>" for ti in INDEX_CTYPES.values()]
    elif op == "elementwise":
        out = [f"gpuloss_elementwise<{tag}, {code}>" for code in sorted(set(EW_OPS.values()))]
    elif op == "staged":
        out = [staged_name(o, dtype, k) for k in staged_cluster_sizes(cc) for o in STAGED_OPS]
    else:
        raise ValueError(f"unknown op {op!r}")
    return out


def read_source(filename: str, _seen: Optional[set] = None) -> str:
    """Source text with the local ``#include "x.cuh"`` lines expanded in place, each header
    once (the headers' ``#pragma once``).

    Expanding here (rather than ``-I``) keeps CuPy's compile cache honest: its key is the
    source text and options, so an edit to a header changes the key."""
    seen = set() if _seen is None else _seen
    out = []
    for line in (kernel_dir() / filename).read_text().splitlines():
        s = line.strip()
        if s.startswith("#include") and s.endswith('.cuh"'):
            header = s.split('"')[1]
            if header not in seen:
                seen.add(header)
                out.append(read_source(header, seen))
        elif s == "#pragma once":
            continue
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# The sizing helper: every launch decision, with its limits written once.
# --------------------------------------------------------------------------------------------

MAX_THREADS = 512           #: GL_MAX_THREADS in rows.cu (__launch_bounds__)
MIN_THREADS = 32
VECS_PER_THREAD = 8         #: aim for ~8 16-byte vectors per thread: loads in flight, few blocks idle
ONCHIP_TARGET_BYTES = 64 * 1024  #: per-block staged slice: 3 blocks per SM on sm_90 (227 KB)
STATIC_SMEM_RESERVE = 2048  #: the reduction scratch and cluster slot (static shared memory)
MAX_GRID_X = 2 ** 31 - 1
MAX_COLS = 2 ** 31 - 1 - 65536  #: GL_MAX_COLS in rows.cu: column indices are 32-bit in a row
EW_THREADS = 256            #: GL_EW_THREADS in elementwise.cu
EW_MAX_BLOCKS = 4096        #: grid-stride beyond this; also bounds the partial-sum buffer


@dataclass(frozen=True)
class RowPlan:
    """How a row kernel is launched."""
    variant: str      # "looped" or "onchip"
    vec: int          # elements per vector access (1 or 16 bytes' worth)
    cluster: int      # blocks per row (K); > 1 only on sm_90
    threads: int
    smem_bytes: int   # dynamic shared memory per block
    grid: int


def _pow2ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


#: the largest cluster the automatic choice uses (see plan_rows)
AUTO_MAX_CLUSTER = 2


def plan_rows(R: int, C: int, itemsize: int, vec: int, cc: int, smem_optin: int,
              variant: str = "auto") -> RowPlan:
    """Launch plan for a row kernel over ``R`` rows of ``C`` elements.

    ``variant``: "looped" (two reads per element, any row length), "onchip" (row slice kept in
    shared memory; falls back to looped when no cluster size makes it fit), "auto" (onchip when
    it fits one block or a cluster of at most AUTO_MAX_CLUSTER blocks).  ``smem_optin`` is the device's opt-in shared memory per block in bytes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if variant == "staged":  # what the staged kernels do not take runs as "auto"
        variant = "auto"
    if C > MAX_COLS:
        raise ValueError(f"rows of {C} elements: the cupy backend takes at most {MAX_COLS} per row")
    budget = smem_optin - STATIC_SMEM_RESERVE
    chosen = None
    if variant in ("auto", "onchip") and C > 0:
        sizes = [k for k in CLUSTER_SIZES if k == 1 or cc >= 90]
        if variant == "auto":
            # measured on an H200 (bench/RESULTS.md, 2026-11-26): a row on one
            # block or a cluster of 2 beats the looped kernel (softmax fp32
            # 8192x32000: 0.71 vs 0.68 of the copy floor); clusters of 4 and 8
            # lose to it (16384x128256 bf16: 0.46 vs 0.59)
            sizes = [k for k in sizes if k <= AUTO_MAX_CLUSTER]
        fits = []
        for k in sizes:
            chunk = -(-(-(-C // k)) // vec) * vec
            fits.append((k, chunk * itemsize))
        small = [kb for kb in fits if kb[1] <= ONCHIP_TARGET_BYTES]
        # "auto" only takes the measured-good shapes: a slice of at most
        # ONCHIP_TARGET_BYTES per block; "onchip" also fills the whole budget
        ok = small if variant == "auto" else (small or [kb for kb in fits if kb[1] <= budget])
        if ok:
            chosen = ok[0]
    if chosen is None:
        k, smem, name = 1, 0, "looped"
        chunk = C
    else:
        k, smem = chosen
        name = "onchip"
        chunk = smem // itemsize
    vecs = -(-max(chunk, 1) // vec)
    threads = min(MAX_THREADS, max(MIN_THREADS, _pow2ceil(-(-vecs // VECS_PER_THREAD))))
    grid = min(R * k, (MAX_GRID_X // k) * k)
    return RowPlan(variant=name, vec=vec, cluster=k, threads=threads, smem_bytes=smem, grid=grid)


# --------------------------------------------------------------------------------------------
# The staged variant's sizing (staged.cu): pure functions of the shape and the device limits.
# --------------------------------------------------------------------------------------------

STAGED_OPS = ("softmax_fwd", "softmax_bwd", "cross_entropy")
STAGED_CLUSTER_SIZES = (1, 2, 4, 8)   #: portable cluster sizes; > 1 only on sm_90
STAGED_MAX_BUF = 4                    #: GL_STAGED_MAX_BUF in staged.cu
STAGED_SLICE_BYTES = 64 * 1024        #: preferred bytes per buffer (all staged inputs of one row slice)
STAGED_STATIC_RESERVE = 4096          #: static shared memory: reduction scratch, barriers, cluster slots
STAGED_MIN_THREADS = 128
STAGED_VECS_PER_THREAD = 4            #: 16-byte vectors per thread per pass: ~4 keeps 32 warps busy


def staged_cluster_sizes(cc: int) -> Tuple[int, ...]:
    return tuple(k for k in STAGED_CLUSTER_SIZES if k == 1 or cc >= 90)


def staged_name(op: str, dtype: str, k: int) -> str:
    """The extern "C" kernel of ``op`` at ``dtype`` over clusters of ``k`` blocks."""
    return f"gpuloss_{op}_staged_k{k}_{DTYPES[dtype][0]}"


def staged_max_threads(dtype: str) -> int:
    """StagedThreads<D> in staged.cu: the launch bound (fp64 needs more registers)."""
    return 512 if DTYPES[dtype][2] == "float64" else 1024


@dataclass(frozen=True)
class StagedPlan:
    """How a staged kernel is launched (the grid follows from how many clusters fit at once)."""
    cluster: int      # K blocks per row (a thread-block cluster when > 1)
    chunk: int        # elements of a row per block (a multiple of 16 bytes)
    nbuf: int         # row buffers per block: rows in flight
    threads: int
    smem_bytes: int   # dynamic shared memory per block


def plan_staged(C: int, itemsize: int, n_inputs: int, cc: int, smem_optin: int, *, max_threads: int = 1024,
                slice_bytes: int = STAGED_SLICE_BYTES, nbuf: Optional[int] = None,
                threads: Optional[int] = None) -> Optional[StagedPlan]:
    """Staged launch shape for rows of ``C`` elements of ``itemsize`` bytes with ``n_inputs``
    staged inputs (2 for softmax backward), or None where the variant cannot run (before sm_80,
    or a row too long to double-buffer even over 8 blocks).

    The smallest cluster whose per-block buffer is at most ``slice_bytes`` (else the smallest
    that double-buffers at all), as many buffers as fit up to STAGED_MAX_BUF (``nbuf``
    overrides), ~STAGED_VECS_PER_THREAD 16-byte vectors per thread (``threads`` overrides).
    """
    if C <= 0 or C > MAX_COLS or cc < 80:
        return None
    vec = 16 // itemsize
    budget = smem_optin - STAGED_STATIC_RESERVE
    chosen = None
    for k in staged_cluster_sizes(cc):
        chunk = -(-(-(-C // k)) // vec) * vec
        per_buf = chunk * itemsize * n_inputs
        if 2 * per_buf > budget:
            continue
        if chosen is None or per_buf <= slice_bytes:
            chosen = (k, chunk, per_buf)
        if per_buf <= slice_bytes:
            break
    if chosen is None:
        return None
    k, chunk, per_buf = chosen
    nb = max(1, min(STAGED_MAX_BUF, budget // per_buf, nbuf or STAGED_MAX_BUF))
    vecs = chunk // vec
    t = _pow2ceil(threads or -(-vecs // STAGED_VECS_PER_THREAD))  # whole warps: the block reduction
    t = min(max_threads, max(STAGED_MIN_THREADS, t))
    return StagedPlan(cluster=k, chunk=chunk, nbuf=nb, threads=t, smem_bytes=nb * per_buf)


def staged_blocks_per_sm(plan: StagedPlan, regs: int, smem_per_sm: int, max_threads_per_sm: int = 2048) -> int:
    """Resident blocks per SM (no cluster constraint): threads, registers, shared memory."""
    by_threads = max_threads_per_sm // plan.threads
    by_regs = 65536 // max(1, regs * plan.threads)
    by_smem = smem_per_sm // (plan.smem_bytes + STAGED_STATIC_RESERVE + 1024)
    return max(1, min(by_threads, by_regs, by_smem, 32))


def staged_grid(R: int, cluster: int, resident_clusters: int) -> int:
    """Persistent grid: one cluster per co-resident slot, never more clusters than rows.  More
    clusters than fit at once would run after the others, doubling the time of their rows."""
    return max(1, min(R, max(1, resident_clusters))) * cluster


def conservative_clusters(sm_count: int, blocks_per_sm: int, cluster: int) -> int:
    """Co-resident clusters without the driver's answer: clusters of 4 and 8 must sit in one GPC
    (an H100 / H200 has GPCs of 16-18 SMs, and 132 SMs hold 32 clusters of 4, not 33), so
    count 15/16 of the naive figure for them; pairs of SMs always fit."""
    n = sm_count * blocks_per_sm // cluster
    return n if cluster <= 2 else max(1, n * 15 // 16)


def plan_elementwise(n: int) -> Tuple[int, int]:
    """(grid, threads) for the element-wise kernel over ``n`` elements."""
    return max(1, min(EW_MAX_BLOCKS, -(-n // EW_THREADS))), EW_THREADS


def selected_variant() -> str:
    v = os.environ.get("GPULOSS_CUPY_VARIANT", "auto").strip() or "auto"
    if v not in VARIANTS:
        raise ValueError(f"GPULOSS_CUPY_VARIANT={v!r}; choose from {VARIANTS}")
    return v


# --------------------------------------------------------------------------------------------
# dtype of a native array
# --------------------------------------------------------------------------------------------

def storage_dtype(a: Any) -> str:
    """Storage dtype name of a CuPy array in a floating slot; int16/uint16 means bf16 bits."""
    name = str(a.dtype)
    if name in ("int16", "uint16", "bfloat16"):
        return "bfloat16"
    if name in DTYPES:
        return name
    raise TypeError(f"cupy backend: unsupported floating dtype {name}")


def index_dtype(a: Any) -> str:
    name = str(a.dtype)
    if name not in INDEX_CTYPES:
        raise TypeError(f"cupy backend: class-index targets must be int32 or int64, got {name}")
    return name


# --------------------------------------------------------------------------------------------
# Module cache
# --------------------------------------------------------------------------------------------

_cache: Dict[Tuple[int, str, str], Any] = {}  # (device, op, name expression) -> RawModule
_cache_lock = threading.Lock()


def _device_info(cupy) -> Tuple[int, int, int]:
    """(device id, compute capability as int, opt-in shared memory per block)."""
    dev = cupy.cuda.Device()
    cc = int(dev.compute_capability)
    optin = int(dev.attributes.get("MaxSharedMemoryPerBlockOptin", 48 * 1024))
    return dev.id, cc, optin


def get_module(op: str, dtype: str, expr: str):
    """The compiled RawModule holding the one instantiation ``expr`` of ``op`` at ``dtype`` on
    the current device (cached).  One instantiation per module: a call compiles only what it
    launches (a whole op's set at one dtype is ~30 kernels, tens of seconds of NVRTC)."""
    import cupy
    dev, cc, _ = _device_info(cupy)
    if expr not in name_expressions(op, dtype, cc):
        raise ValueError(f"{expr} is not an instantiation of {op} at {dtype} for sm_{cc}")
    key = (dev, op, expr)
    with _cache_lock:
        mod = _cache.get(key)
        if mod is None:
            mod = cupy.RawModule(code=read_source(OP_SOURCES[op]),
                                 options=nvrtc_options(cc),  # CuPy adds the architecture
                                 name_expressions=[expr])
            _cache[key] = mod
    return mod


def _kernel(op: str, dtype: str, expr: str, smem: int = 0):
    k = get_module(op, dtype, expr).get_function(expr)
    if smem > 48 * 1024 and k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    return k


#: GPULOSS_STAGED_DTYPE codes in staged.cu
_STAGED_DTYPE_CODES = {"float32": 1, "float64": 2, "float16": 3, "bfloat16": 4}


def staged_options(cc: int, k: int, dtype: str) -> Tuple[str, ...]:
    """The staged module of one cluster size and dtype: its 3 kernels (STAGED_OPS)."""
    return (*nvrtc_options(cc), f"-DGPULOSS_STAGED_K={k}", f"-DGPULOSS_STAGED_DTYPE={_STAGED_DTYPE_CODES[dtype]}")


def _staged_kernel(op: str, dtype: str, k: int, smem: int):
    import cupy
    dev, cc, _ = _device_info(cupy)
    key = (dev, "staged", f"k{k} {dtype}")
    with _cache_lock:
        mod = _cache.get(key)
        if mod is None:
            # extern "C" kernels: fetched by name, no name expressions needed
            mod = cupy.RawModule(code=read_source("staged.cu"), options=staged_options(cc, k, dtype))
            _cache[key] = mod
    kern = mod.get_function(staged_name(op, dtype, k))
    if smem > 48 * 1024 and kern.max_dynamic_shared_size_bytes < smem:
        kern.max_dynamic_shared_size_bytes = smem
    return kern


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
    attrs = cupy.cuda.Device().attributes
    sms = int(attrs.get("MultiProcessorCount", 1))
    smem_sm = int(attrs.get("MaxSharedMemoryPerMultiprocessor", 228 * 1024))
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


def _staged_knobs(dtype: str) -> Dict[str, Any]:
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


def _is_null(a) -> bool:
    np = _np()
    return isinstance(a, np.integer) and int(a) == 0


def _staged_launch(op: str, dtype: str, R: int, C: int, args: Sequence[Any],
                   row_arrays: Sequence[Any]) -> Optional[RowPlan]:
    """Launch ``op`` on the staged kernels if they take it (see staged_args, plan_staged and
    16-byte aligned rows); None otherwise (the caller runs the row kernels)."""
    import cupy
    sargs = staged_args(op, args) if op in STAGED_OPS else None
    itemsize = DTYPES[dtype][1]
    if sargs is None or R == 0 or not _aligned(row_arrays, itemsize):
        return None
    _, cc, optin = _device_info(cupy)
    plan = plan_staged(C, itemsize, 2 if op == "softmax_bwd" else 1, cc, optin, **_staged_knobs(dtype))
    if plan is None:
        return None
    kern = _staged_kernel(op, dtype, plan.cluster, plan.smem_bytes)
    grid = staged_grid(R, plan.cluster, _resident_clusters(kern, plan))
    kern((grid,), (plan.threads,), (*sargs, _np().int32(plan.nbuf)), shared_mem=plan.smem_bytes)
    return RowPlan(variant="staged", vec=vec_width(dtype), cluster=plan.cluster, threads=plan.threads,
                   smem_bytes=plan.smem_bytes, grid=grid)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _np():
    import numpy
    return numpy


def _null():
    return _np().uint64(0)  # a null pointer argument


def _ptr(a):
    return _null() if a is None else a


def _aligned(arrays: Sequence[Any], itemsize: int) -> bool:
    """True when every row of every array starts on a 16-byte boundary."""
    for a in arrays:
        if a is None:
            continue
        if a.data.ptr % 16:
            return False
        if a.shape[0] > 1 and (a.strides[0] % 16):
            return False
    return True


def _row_stride(a) -> int:
    return a.strides[0] // a.itemsize if a.ndim == 2 and a.shape[0] > 1 else (a.shape[-1] if a.ndim else 0)


def _unit_rows(a):
    """Rows with a unit-stride last axis (the contract's layout); copies only if not."""
    import cupy
    if a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize):
        return a
    return cupy.ascontiguousarray(a)


def _row_launch(op: str, dtype: str, expr_fmt: str, R: int, C: int, args: Sequence[Any],
                row_arrays: Sequence[Any], variant: Optional[str] = None) -> RowPlan:
    """Plan and launch a row kernel; ``expr_fmt`` has {vec}, {k}, {on} holes."""
    import cupy
    variant = variant or selected_variant()
    if variant == "staged":
        staged = _staged_launch(op, dtype, R, C, args, row_arrays)
        if staged is not None:
            return staged
    _, cc, optin = _device_info(cupy)
    itemsize = DTYPES[dtype][1]
    vec = vec_width(dtype) if _aligned(row_arrays, itemsize) else 1
    plan = plan_rows(R, C, itemsize, vec, cc, optin, variant)
    if plan.grid == 0:
        return plan
    expr = expr_fmt.format(vec=plan.vec, k=plan.cluster, on="true" if plan.variant == "onchip" else "false")
    kern = _kernel(op, dtype, expr, plan.smem_bytes)
    kern((plan.grid,), (plan.threads,), tuple(args), shared_mem=plan.smem_bytes)
    return plan


def _acc(dtype: str):
    return _np().float64 if DTYPES[dtype][2] == "float64" else _np().float32


def _reduce_rows(loss_rows, reduction: str, divisor=None):
    """0-d device result of per-row (or per-block partial) losses; no host sync."""
    if reduction == "none":
        return loss_rows
    tot = loss_rows.sum()
    if reduction == "sum":
        return tot
    return tot / divisor


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------

class CupyBackend(Backend):
    """CUDA C kernels through CuPy RawModule; zero-copy with PyTorch through DLPack."""

    name = "cupy"
    native = "cupy"

    @staticmethod
    def variants() -> Tuple[str, ...]:
        """Row-kernel variants selectable with ``GPULOSS_CUPY_VARIANT``."""
        return VARIANTS

    # ---- availability ------------------------------------------------------------------
    def probe(self) -> Tuple[bool, str]:
        try:
            import cupy
        except Exception as e:  # noqa: BLE001
            return False, f"cupy cannot be imported ({type(e).__name__}: {e})"
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # noqa: BLE001  (no driver: CUDARuntimeError, ...)
            return False, f"no usable CUDA device: {type(e).__name__}: {e}"
        if n <= 0:
            return False, "no CUDA device found"
        return True, f"cupy {cupy.__version__}, {n} CUDA device(s)"

    def accepts(self, kind: str, device: str) -> bool:
        return kind in ("cupy", "torch") and device.startswith("cuda")

    # ---- conversion --------------------------------------------------------------------
    def to_native(self, a: Any, kind: str) -> Any:
        if kind == "cupy":
            return a
        if kind == "torch":
            import cupy
            import torch
            if a.dtype == torch.bfloat16:
                a = a.view(torch.int16)  # bf16 bits; see the module docstring
            return cupy.from_dlpack(a.detach())
        raise TypeError(f"cupy backend cannot take {kind} arrays")

    def from_native(self, a: Any, kind: str) -> Any:
        if kind == "cupy" or a is None:
            return a
        if kind == "torch":
            import torch
            if a.ndim == 0 and str(a.dtype) not in ("int16", "uint16"):
                return torch.from_dlpack(a)
            t = torch.from_dlpack(a)
            if t.dtype in (torch.int16, torch.uint16):
                t = t.view(torch.bfloat16)
            return t
        raise TypeError(f"cupy backend cannot produce {kind} arrays")

    # ---- softmax -----------------------------------------------------------------------
    def softmax_forward(self, x: Any, *, log: bool) -> Any:
        import cupy
        x = _unit_rows(x)
        dt = storage_dtype(x)
        R, C = x.shape
        y = cupy.empty((R, C), dtype=x.dtype)
        tag = DTYPES[dt][0]
        _row_launch("softmax_fwd", dt, f"gpuloss_softmax_fwd<{tag}, {{vec}}, {{k}}, {{on}}>", R, C,
                    (x, y, _np().int64(_row_stride(x)), _np().int64(C), _np().int64(R), _np().int64(C),
                     _np().int32(1 if log else 0)), (x, y))
        return y

    def softmax_backward(self, y: Any, dy: Any, *, log: bool) -> Any:
        import cupy
        y, dy = _unit_rows(y), _unit_rows(dy)
        dt = storage_dtype(y)
        if storage_dtype(dy) != dt:
            dy = dy.astype(y.dtype)
        R, C = y.shape
        dx = cupy.empty((R, C), dtype=y.dtype)
        tag = DTYPES[dt][0]
        i64 = _np().int64
        _row_launch("softmax_bwd", dt, f"gpuloss_softmax_bwd<{tag}, {{vec}}, {{k}}, {{on}}>", R, C,
                    (y, dy, dx, i64(_row_stride(y)), i64(_row_stride(dy)), i64(C), i64(R), i64(C),
                     _np().int32(1 if log else 0)), (y, dy, dx))
        return dx

    # ---- row-wise losses ---------------------------------------------------------------
    def _weight(self, weight, dt):
        if weight is None:
            return None
        import cupy
        return cupy.ascontiguousarray(weight, dtype=_acc(dt))

    def _divisor(self, op, target, w, R, C, ignore_index, dt):
        """Device scalar: the PyTorch "mean" divisor of class-index losses."""
        import cupy
        acc = _acc(dt)
        div = cupy.empty((1,), dtype=acc)
        ti = INDEX_CTYPES[index_dtype(target)]
        k = _kernel(op, dt,
                    f"gpuloss_mean_divisor<{_ACC_CTYPE[DTYPES[dt][2]]}, {ti}>")
        k((1,), (MAX_THREADS,), (target, _ptr(w), div, _np().int64(R), _np().int64(C), _np().int64(ignore_index)))
        return div

    def cross_entropy(self, x, target, *, weight, ignore_index, label_smoothing, z_loss, softcap,
                      reduction, want_grad, grad_inplace=False, want_grad_target=False) -> LossResult:
        import cupy
        x = _unit_rows(x)
        dt = storage_dtype(x)
        R, C = x.shape
        acc = _acc(dt)
        prob = target.ndim == 2
        w = self._weight(weight, dt)
        div = None
        if prob:
            target = _unit_rows(target)
            if str(target.dtype) != str(x.dtype):
                target = target.astype(x.dtype)
            scale_div = float(R)
        elif reduction == "mean":
            div = self._divisor("cross_entropy", target, w, R, C, ignore_index, dt)
        loss_rows = cupy.empty((R,), dtype=acc)
        lse = cupy.empty((R,), dtype=cupy.float32)
        grad = (x if grad_inplace else cupy.empty((R, C), dtype=x.dtype)) if want_grad else None
        gt = cupy.empty((R, C), dtype=x.dtype) if (prob and want_grad_target) else None
        divp = div
        if prob and reduction == "mean":
            divp = cupy.full((1,), scale_div, dtype=acc)
        tag = DTYPES[dt][0]
        ti = INDEX_CTYPES["int64"] if prob else INDEX_CTYPES[index_dtype(target)]
        i64 = _np().int64
        args = (x, _null() if prob else target, target if prob else _null(), _ptr(w), _ptr(divp),
                _ptr(grad), loss_rows, lse, _ptr(gt),
                i64(_row_stride(x)), i64(_row_stride(target) if prob else 0),
                i64(_row_stride(grad) if grad is not None else 0), i64(R), i64(C), i64(ignore_index),
                acc(label_smoothing), acc(z_loss), acc(softcap if softcap else 0.0))
        _row_launch("cross_entropy", dt,
                    f"gpuloss_cross_entropy<{tag}, {ti}, {'true' if prob else 'false'}, {{vec}}, {{k}}, {{on}}>",
                    R, C, args, (x, grad, target if prob else None))
        if reduction == "mean":
            loss = loss_rows.sum() / (divp[0])
        else:
            loss = _reduce_rows(loss_rows, reduction)
        return LossResult(loss=loss, grad=grad, grad_target=gt, lse=lse)

    def nll_loss(self, logp, target, *, weight, ignore_index, reduction, want_grad) -> LossResult:
        import cupy
        logp = _unit_rows(logp)
        dt = storage_dtype(logp)
        R, C = logp.shape
        acc = _acc(dt)
        w = self._weight(weight, dt)
        div = self._divisor("nll", target, w, R, C, ignore_index, dt) if reduction == "mean" else None
        loss_rows = cupy.empty((R,), dtype=acc)
        grad = cupy.empty((R, C), dtype=logp.dtype) if want_grad else None
        ti = INDEX_CTYPES[index_dtype(target)]
        i64 = _np().int64
        if R:
            plan = plan_rows(R, C, DTYPES[dt][1], 1, 0, 0, "looped")
            k = _kernel("nll", dt, f"gpuloss_nll<{DTYPES[dt][0]}, {ti}>")
            k((plan.grid,), (plan.threads,), (logp, target, _ptr(w), _ptr(div), _ptr(grad), loss_rows,
                                             i64(_row_stride(logp)), i64(C), i64(R), i64(C), i64(ignore_index)))
        loss = loss_rows.sum() / div[0] if reduction == "mean" else _reduce_rows(loss_rows, reduction)
        return LossResult(loss=loss, grad=grad)

    def kl_div_logits(self, x, target, *, temperature, target_is_logits, reduction, want_grad) -> LossResult:
        import cupy
        x, target = _unit_rows(x), _unit_rows(target)
        dt = storage_dtype(x)
        if str(target.dtype) != str(x.dtype):
            target = target.astype(x.dtype)
        R, C = x.shape
        acc = _acc(dt)
        divisor = {"none": 1.0, "sum": 1.0, "batchmean": float(R), "mean": float(R * C)}[reduction]
        loss_rows = cupy.empty((R,), dtype=acc)
        grad = cupy.empty((R, C), dtype=x.dtype) if want_grad else None
        tag = DTYPES[dt][0]
        i64 = _np().int64
        args = (x, target, _ptr(grad), loss_rows, i64(_row_stride(x)), i64(_row_stride(target)),
                i64(C), i64(R), i64(C), acc(1.0 / temperature), acc(1.0 / divisor if divisor else float("nan")))
        _row_launch("kl_div_logits", dt,
                    f"gpuloss_kl_div_logits<{tag}, {'true' if target_is_logits else 'false'}, {{vec}}, {{k}}, {{on}}>",
                    R, C, args, (x, target, grad))
        if reduction in ("mean", "batchmean"):
            loss = loss_rows.sum() / acc(divisor) if divisor else cupy.full((), float("nan"), dtype=acc)
        else:
            loss = _reduce_rows(loss_rows, reduction)
        return LossResult(loss=loss, grad=grad)

    # ---- element-wise losses -----------------------------------------------------------
    def _elementwise(self, opname, x, t, *, weight=None, pos_weight=None, reduction, want_grad,
                     want_grad_target, divisor=None) -> LossResult:
        import cupy
        x, t = _unit_rows(x), _unit_rows(t)
        dt = storage_dtype(x)
        if str(t.dtype) != str(x.dtype):
            t = t.astype(x.dtype)
        R, C = x.shape
        n = R * C
        acc = _acc(dt)

        def aux(a):
            if a is None:
                return None, 0, 0
            a = cupy.asarray(a, dtype=acc)
            if a.ndim == 1:
                return cupy.ascontiguousarray(a), 1, 0
            a = _unit_rows(a)
            return a, 2, _row_stride(a)

        w, wm, ws = aux(weight)
        pw, pm, ps = aux(pos_weight)
        if divisor is None:
            divisor = {"none": 1.0, "sum": 1.0, "mean": float(n)}[reduction]
        grid, threads = plan_elementwise(n)
        L = cupy.empty((R, C), dtype=acc) if reduction == "none" else None
        part = cupy.empty((grid,), dtype=acc) if reduction != "none" else None
        gx = cupy.empty((R, C), dtype=x.dtype) if want_grad else None
        gt = cupy.empty((R, C), dtype=x.dtype) if want_grad_target else None
        if n:
            i64 = _np().int64
            k = _kernel("elementwise", dt, f"gpuloss_elementwise<{DTYPES[dt][0]}, {EW_OPS[opname]}>")
            k((grid,), (threads,), (x, t, _ptr(w), _ptr(pw), _ptr(gx), _ptr(gt), _ptr(L), _ptr(part),
                                    i64(_row_stride(x)), i64(_row_stride(t)), i64(ws), i64(ps), i64(R), i64(C),
                                    _np().int32(wm), _np().int32(pm),
                                    acc(1.0 / divisor) if divisor else acc(float("nan"))))
        if reduction == "none":
            return LossResult(loss=L, grad=gx, grad_target=gt)
        tot = part.sum() if n else cupy.zeros((), dtype=acc)
        loss = tot if reduction == "sum" else tot / acc(divisor) if divisor else cupy.full((), float("nan"), dtype=acc)
        return LossResult(loss=loss, grad=gx, grad_target=gt)

    def kl_div(self, input, target, *, log_target, reduction, want_grad, want_grad_target=False) -> LossResult:
        div = float(input.shape[0]) if reduction == "batchmean" else None
        red = "sum" if reduction == "batchmean" else reduction
        res = self._elementwise("kl_div_log_target" if log_target else "kl_div", input, target,
                                reduction=red if reduction != "batchmean" else "mean", want_grad=want_grad,
                                want_grad_target=want_grad_target, divisor=div)
        return res

    def bce_with_logits(self, x, target, *, weight, pos_weight, reduction, want_grad,
                        want_grad_target=False) -> LossResult:
        return self._elementwise("bce_with_logits", x, target, weight=weight, pos_weight=pos_weight,
                                 reduction=reduction, want_grad=want_grad, want_grad_target=want_grad_target)

    def bce(self, p, target, *, weight, reduction, want_grad, want_grad_target=False) -> LossResult:
        return self._elementwise("bce", p, target, weight=weight, reduction=reduction, want_grad=want_grad,
                                 want_grad_target=want_grad_target)

    def mse(self, x, target, *, reduction, want_grad, want_grad_target=False) -> LossResult:
        return self._elementwise("mse", x, target, reduction=reduction, want_grad=want_grad,
                                 want_grad_target=want_grad_target)


def source_name_expressions(filename: str, cc: int) -> List[str]:
    """Every name expression the backend may request from ``filename`` on ``cc``, over all ops
    and dtypes (deduplicated): what the compile tests instantiate."""
    names: List[str] = []
    for op, src in OP_SOURCES.items():
        if src == filename:
            for dt in DTYPES:
                names += name_expressions(op, dt, cc)
    return list(dict.fromkeys(names))
