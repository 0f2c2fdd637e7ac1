"""Building the CUDA C kernels: sources, dtypes, compile options, the name
expressions of every instantiation, and the per-device module cache.

The options and name expressions are shared with the nvcc/NVRTC compile tests
(``tests/test_cuda_sources.py``) so the two cannot drift.  Device code lives in
``gpuloss/kernels/cuda/*.cu``: one templated ``__global__`` body per op,
instantiated per storage dtype through ``cupy.RawModule(name_expressions=...)``
and cached per (device, op, instantiation).
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


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
ACC_CTYPE = {"float32": "float", "float64": "double"}
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
#: the ops staged.cu has kernels for
STAGED_OPS = ("softmax_fwd", "softmax_bwd", "cross_entropy")
STAGED_CLUSTER_SIZES = (1, 2, 4, 8)   #: portable cluster sizes; > 1 only on sm_90
#: GPULOSS_STAGED_DTYPE codes in staged.cu
STAGED_DTYPE_CODES = {"float32": 1, "float64": 2, "float16": 3, "bfloat16": 4}


#: the oldest NVRTC whose PTX has ``st.async`` (PTX ISA 8.1), which the staged kernels'
#: cluster exchange uses: NVRTC 12.0 fails to compile every staged module of k > 1 for sm_90
STAGED_CLUSTER_MIN_NVRTC = (12, 1)


def staged_cluster_sizes(cc: int, nvrtc: Optional[Tuple[int, int]] = None) -> Tuple[int, ...]:
    """Cluster sizes of the staged kernels on ``cc``: > 1 only on sm_90 and with an NVRTC
    (``nvrtc``: its (major, minor); None: taken as new enough) that has ``st.async``."""
    clusters = cc >= 90 and (nvrtc is None or tuple(nvrtc) >= STAGED_CLUSTER_MIN_NVRTC)
    return tuple(k for k in STAGED_CLUSTER_SIZES if k == 1 or clusters)


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of the NVRTC that CuPy compiles with; None where it cannot be read."""
    try:
        from cupy.cuda import nvrtc
        return tuple(int(v) for v in nvrtc.getVersion())[:2]
    except Exception:  # noqa: BLE001 (no CuPy, no libnvrtc: the compile itself will say so)
        return None


def staged_name(op: str, dtype: str, k: int) -> str:
    """The extern "C" kernel of ``op`` at ``dtype`` over clusters of ``k`` blocks."""
    return f"gpuloss_{op}_staged_k{k}_{DTYPES[dtype][0]}"


def staged_options(cc: int, k: int, dtype: str) -> Tuple[str, ...]:
    """The staged module of one cluster size and dtype: its 3 kernels (STAGED_OPS)."""
    return (*nvrtc_options(cc), f"-DGPULOSS_STAGED_K={k}", f"-DGPULOSS_STAGED_DTYPE={STAGED_DTYPE_CODES[dtype]}")


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
        acc = ACC_CTYPE[DTYPES[dtype][2]]
        out += [f"gpuloss_mean_divisor<{acc}, {ti}>" for ti in INDEX_CTYPES.values()]
    elif op == "nll":
        out = [f"gpuloss_nll<{tag}, {ti}>" for ti in INDEX_CTYPES.values()]
        acc = ACC_CTYPE[DTYPES[dtype][2]]
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


_cache: Dict[Tuple[int, str, str], Any] = {}  # (device, op, name expression) -> RawModule
_cache_lock = threading.Lock()


_device_attrs: Dict[int, Dict[str, int]] = {}  # device id -> the attributes the launchers read


def device_attrs(cupy) -> Dict[str, int]:
    """The current device's attributes the launchers read, queried once per
    device: CuPy's ``Device().attributes`` asks the driver for every attribute
    (about a hundred calls) each time, and launches read it two or three
    times."""
    dev = cupy.cuda.Device()
    attrs = _device_attrs.get(dev.id)
    if attrs is None:
        every = dev.attributes
        attrs = _device_attrs[dev.id] = {
            "id": dev.id,
            "cc": int(dev.compute_capability),
            "MaxSharedMemoryPerBlockOptin": int(every.get("MaxSharedMemoryPerBlockOptin", 48 * 1024)),
            "MultiProcessorCount": int(every.get("MultiProcessorCount", 1)),
            "MaxSharedMemoryPerMultiprocessor": int(every.get("MaxSharedMemoryPerMultiprocessor", 228 * 1024)),
        }
    return attrs


def device_info(cupy) -> Tuple[int, int, int]:
    """(device id, compute capability as int, opt-in shared memory per block)."""
    a = device_attrs(cupy)
    return a["id"], a["cc"], a["MaxSharedMemoryPerBlockOptin"]


def _cached_module(key, build):
    """The RawModule cached under ``key``, compiled by ``build()`` on first use."""
    with _cache_lock:
        mod = _cache.get(key)
        if mod is None:
            mod = _cache[key] = build()
    return mod


def _with_smem(kern, smem: int):
    """``kern`` allowed ``smem`` bytes of dynamic shared memory (above 48 KiB
    a kernel must opt in)."""
    if smem > 48 * 1024 and kern.max_dynamic_shared_size_bytes < smem:
        with _cache_lock:  # two threads raising it to different sizes: the larger stays
            if kern.max_dynamic_shared_size_bytes < smem:
                kern.max_dynamic_shared_size_bytes = smem
    return kern


def get_module(op: str, dtype: str, expr: str):
    """The compiled RawModule holding the one instantiation ``expr`` of ``op`` at ``dtype`` on
    the current device (cached).  One instantiation per module: a call compiles only what it
    launches (a whole op's set at one dtype is ~30 kernels, tens of seconds of NVRTC)."""
    import cupy
    dev, cc, _ = device_info(cupy)
    if expr not in name_expressions(op, dtype, cc):
        raise ValueError(f"{expr} is not an instantiation of {op} at {dtype} for sm_{cc}")
    return _cached_module((dev, op, expr), lambda: cupy.RawModule(
        code=read_source(OP_SOURCES[op]), options=nvrtc_options(cc),  # CuPy adds the architecture
        name_expressions=[expr]))


def kernel(op: str, dtype: str, expr: str, smem: int = 0):
    return _with_smem(get_module(op, dtype, expr).get_function(expr), smem)


def staged_kernel(op: str, dtype: str, k: int, smem: int):
    """The staged kernel of ``op`` at ``dtype`` over clusters of ``k`` blocks: one module of
    extern "C" kernels (fetched by name) per (device, cluster size, dtype)."""
    import cupy
    dev, cc, _ = device_info(cupy)
    mod = _cached_module((dev, "staged", f"k{k} {dtype}"), lambda: cupy.RawModule(
        code=read_source("staged.cu"), options=staged_options(cc, k, dtype)))
    return _with_smem(mod.get_function(staged_name(op, dtype, k)), smem)


def source_name_expressions(filename: str, cc: int) -> List[str]:
    """Every name expression the backend may request from ``filename`` on ``cc``, over all ops
    and dtypes (deduplicated): what the compile tests instantiate."""
    names: List[str] = []
    for op, src in OP_SOURCES.items():
        if src == filename:
            for dt in DTYPES:
                names += name_expressions(op, dt, cc)
    return list(dict.fromkeys(names))
