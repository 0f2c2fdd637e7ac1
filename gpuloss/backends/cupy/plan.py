"""The sizing helper of the CUDA C launches: every launch decision, with its
limits written once."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

from .build import CLUSTER_SIZES, DTYPES, VARIANTS, staged_cluster_sizes

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

STAGED_MAX_BUF = 4                    #: GL_STAGED_MAX_BUF in staged.cu
STAGED_SLICE_BYTES = 64 * 1024        #: preferred bytes per buffer (all staged inputs of one row slice)
STAGED_STATIC_RESERVE = 4096          #: static shared memory: reduction scratch, barriers, cluster slots
STAGED_MIN_THREADS = 128
STAGED_VECS_PER_THREAD = 4            #: 16-byte vectors per thread per pass: ~4 keeps 32 warps busy


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
                threads: Optional[int] = None, nvrtc: Optional[Tuple[int, int]] = None) -> Optional[StagedPlan]:
    """Staged launch shape for rows of ``C`` elements of ``itemsize`` bytes with ``n_inputs``
    staged inputs (2 for softmax backward), or None where the variant cannot run (before sm_80,
    or a row too long to double-buffer even over 8 blocks).

    The smallest cluster whose per-block buffer is at most ``slice_bytes`` (else the smallest
    that double-buffers at all), as many buffers as fit up to STAGED_MAX_BUF (``nbuf``
    overrides), ~STAGED_VECS_PER_THREAD 16-byte vectors per thread (``threads`` overrides).
    Clusters only where ``nvrtc`` (the compiler's version) can build them
    (:func:`~gpuloss.backends.cupy.build.staged_cluster_sizes`).
    """
    if C <= 0 or C > MAX_COLS or cc < 80:
        return None
    vec = 16 // itemsize
    budget = smem_optin - STAGED_STATIC_RESERVE
    chosen = None
    for k in staged_cluster_sizes(cc, nvrtc):
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
