"""Clocks, memory meters and the copy-bandwidth floor, for a GPU or the CPU.

GPU: ``triton.testing.do_bench`` (CUDA events, median, L2 flushed before every
call by writing a 256 MB buffer), peak memory from
``torch.cuda.max_memory_allocated`` (CuPy's allocations are routed through
torch's caching allocator while the benchmark runs, so they are counted too).

CPU: wall clock (``time.perf_counter``), median of repeated calls; peak memory
as the rise of the process's resident-set high-water mark (``VmHWM``, reset
before each call through ``/proc/self/clear_refs``), which sees NumPy's,
torch's and SciPy's allocations alike; ``tracemalloc`` (NumPy allocations
only) where ``clear_refs`` cannot be written.
"""
from __future__ import annotations

import gc
import os
import platform
import socket
import statistics
import time
from typing import Any, Callable, Dict, Optional, Tuple


class Device:
    """Where the benchmark runs: ``kind`` is ``"cuda"`` or ``"cpu"``."""

    def __init__(self, kind: str, quick: bool = False):
        import torch
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {kind!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        self.kind = kind
        self.quick = quick
        self.torch_device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
        self._mem_method: Optional[str] = None
        self._cupy_routed = False

    # ---- description ----------------------------------------------------
    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def name(self) -> str:
        """The card's name, or the CPU model and core count."""
        if self.is_gpu:
            import torch
            return torch.cuda.get_device_name(self.torch_device)
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"{model} ({cores} cores available)"

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"device": self.kind, "card": self.name(), "host": socket.gethostname()}
        if self.is_gpu:
            import torch
            p = torch.cuda.get_device_properties(self.torch_device)
            d.update(total_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                     capability=f"{p.major}.{p.minor}")
        return d

    # ---- synchronisation and freeing --------------------------------------
    def sync(self) -> None:
        if self.is_gpu:
            import torch
            torch.cuda.synchronize(self.torch_device)

    def free(self) -> None:
        """Give cached memory back between rows of the table (a 16384x128256
        bf16 row is 4 GiB of logits; torch eager CE takes ~12 GiB more).
        Called once per (op, shape, dtype), not per implementation: with
        torch imported a ``gc.collect`` costs a few hundred milliseconds."""
        gc.collect()
        if self.is_gpu:
            import torch
            torch.cuda.synchronize(self.torch_device)
            torch.cuda.empty_cache()

    # ---- timing ------------------------------------------------------------
    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Median time of one call of ``fn`` in milliseconds (``fn`` has
        already run once: compilation and autotuning are done)."""
        if self.is_gpu:
            from triton.testing import do_bench
            warmup, rep = (10, 40) if self.quick else (25, 100)
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        # no warm-up call: the runner has already called fn for the check and
        # the memory measurement (a 4096x32000 CE call is ~1 s on 2 cores)
        return cpu_median_ms(fn, min_time_s=0.3 if self.quick else 0.5, warmup=False)

    # ---- memory --------------------------------------------------------------
    def route_cupy_allocations(self) -> None:
        """Make CuPy allocate through torch's caching allocator, so that
        ``torch.cuda.max_memory_allocated`` counts CuPy's temporaries too."""
        if not self.is_gpu or self._cupy_routed:
            return
        try:
            import cupy
            import torch
        except Exception:
            return
        dev = self.torch_device

        def torch_alloc(size: int):
            # the tensor owns the bytes; CuPy keeps it alive through UnownedMemory
            buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=dev)
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(buf.data_ptr(), size, buf, dev.index), 0)

        cupy.cuda.set_allocator(torch_alloc)
        self._cupy_routed = True

    @property
    def mem_method(self) -> str:
        if self.is_gpu:
            return "torch.cuda.max_memory_allocated - allocated before the call (CuPy routed through torch)"
        if self._mem_method is None:
            self._mem_method = ("RSS high-water mark rise (VmHWM, reset via /proc/self/clear_refs)"
                                if _can_reset_hwm() else "tracemalloc peak (NumPy allocations only)")
        return self._mem_method

    def peak_extra_bytes(self, fn: Callable[[], Any]) -> Optional[int]:
        """Peak bytes allocated during one call above what was allocated
        before it (outputs included: an in-place gradient costs nothing)."""
        if self.is_gpu:
            import torch
            torch.cuda.synchronize(self.torch_device)
            base = torch.cuda.memory_allocated(self.torch_device)
            torch.cuda.reset_peak_memory_stats(self.torch_device)
            out = fn()
            torch.cuda.synchronize(self.torch_device)
            peak = torch.cuda.max_memory_allocated(self.torch_device)
            del out
            return max(0, peak - base)
        if "VmHWM" in self.mem_method:
            _reset_hwm()
            base = _status_kb("VmRSS")
            out = fn()
            peak = _status_kb("VmHWM")
            del out
            return max(0, (peak - base) * 1024)
        import tracemalloc
        tracemalloc.start()
        try:
            out = fn()
            _, peak = tracemalloc.get_traced_memory()
            del out
        finally:
            tracemalloc.stop()
        return int(peak)

    # ---- the floor -----------------------------------------------------------
    def copy_bandwidth(self, nbytes: Optional[int] = None) -> Tuple[float, int]:
        """Device copy bandwidth in bytes/s (bytes read + written) and the
        buffer size used: a device-to-device ``copy_`` of 2 GiB on a GPU (far
        above any L2), an ``np.copyto`` of 256 MiB on the CPU."""
        if self.is_gpu:
            import torch
            from triton.testing import do_bench
            if nbytes is None:
                free, _ = torch.cuda.mem_get_info(self.torch_device)
                nbytes = min(2 << 30, free // 4)
            src = torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device).fill_(7)
            dst = torch.empty_like(src)
            ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
            del src, dst
            self.free()
            return 2 * nbytes / (ms * 1e-3), nbytes
        import numpy as np
        if nbytes is None:
            nbytes = 256 << 20
        src = np.full(nbytes // 4, 1.5, dtype=np.float32)
        dst = np.empty_like(src)
        ms = cpu_median_ms(lambda: np.copyto(dst, src), min_time_s=0.5, min_reps=5)
        return 2 * src.nbytes / (ms * 1e-3), int(src.nbytes)


def cpu_median_ms(fn: Callable[[], Any], min_time_s: float = 1.0, min_reps: int = 3, max_reps: int = 50,
                  warmup: bool = True) -> float:
    """Median wall-clock time of ``fn`` over at least ``min_reps`` calls and
    ``min_time_s`` seconds (after one untimed warm-up call if ``warmup``)."""
    if warmup:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time_s and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _can_reset_hwm() -> bool:
    try:
        _reset_hwm()
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False
