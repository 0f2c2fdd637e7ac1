"""The sizing helper of the CUDA C launches: every launch decision, with its
limits written once."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

from .build import CLUSTER_SIZES, VARIANTS

MAX_THREADS = 1024          #: GL_MAX_THREADS in rows.cu (__launch_bounds__)
MIN_THREADS = 32
VECS_PER_THREAD = 8         #: aim for ~8 16-byte vectors per thread: loads in flight, few blocks idle
ONCHIP_TARGET_BYTES = 64 * 1024  #: per-block staged slice: 3 blocks per SM on sm_90 (227 KB)
STATIC_SMEM_RESERVE = 2048  #: the reduction scratch and cluster slot (static shared memory)
MAX_GRID_X = 2 ** 31 - 1
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


def plan_elementwise(n: int) -> Tuple[int, int]:
    """(grid, threads) for the element-wise kernel over ``n`` elements."""
    return max(1, min(EW_MAX_BLOCKS, -(-n // EW_THREADS))), EW_THREADS


def selected_variant() -> str:
    v = os.environ.get("GPULOSS_CUPY_VARIANT", "auto").strip() or "auto"
    if v not in VARIANTS:
        raise ValueError(f"GPULOSS_CUPY_VARIANT={v!r}; choose from {VARIANTS}")
    return v
