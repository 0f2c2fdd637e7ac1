"""Launch configuration of the Triton kernels: the one sizing helper
(:func:`launch_config`) and the limits it works within, written once.

Every launcher asks :func:`launch_config` for its block, warps, stages and
design ("variant"); nothing else sizes a launch.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Tuple

#: the designs of the row kernels (softmax forward, cross-entropy loss+grad)
VARIANTS = ("twopass", "onchip")

# --- sizing limits, written once -------------------------------------------
#: elements per iteration of a looped row kernel (twopass CE / softmax,
#: softmax backward, KL, NLL).  4096 fp32 = 16 KiB per program in flight.
ROWLOOP_BLOCK = 4096
#: the second pass of the looped fused kernels walks the row backwards
#: (starting on the blocks the first pass read last); GPULOSS_TRITON_REVERSE
#: and GPULOSS_TRITON_ROWLOOP_BLOCK override this and ROWLOOP_BLOCK for sweeps.
ROWLOOP_REVERSE = True
#: block of the looped fused kernels (softmax forward, cross-entropy), from
#: the H200 sweep of 2026-11-26 with the backward second pass: 8192 for
#: softmax and for 4-byte cross-entropy, 4096 for 2-byte cross-entropy
#: (bench/RESULTS.md: 0.64-0.76 of the copy floor against 0.55-0.66 at 4096
#: forwards)
FUSED_ROWLOOP_BLOCK = {("softmax", 4): 8192, ("softmax", 2): 8192, ("cross_entropy", 4): 8192,
                       ("cross_entropy", 2): 4096}
#: the on-chip design keeps CHUNK elements per program in registers.  8192 is
#: the preferred chunk (16 elements per thread at 16 warps): small enough for
#: several programs per SM, large enough that the rendezvous is amortised.
ONCHIP_CHUNK = 8192
#: largest chunk one program may hold (32 fp32 per thread at 16 warps); beyond
#: ONCHIP_MAX_CHUNK * MAX_SPLIT elements per row the on-chip design is off.
ONCHIP_MAX_CHUNK = 16384
#: most programs sharing one row; they must be resident together.
MAX_SPLIT = 16
#: elements per tile of the element-wise kernels, and their widest row piece.
ELEMENTWISE_TILE = 4096
ELEMENTWISE_MAX_BLOCK_C = 1024
#: elements per thread the warp count aims at.
ELEMS_PER_THREAD = 16


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreter_numpy_compat() -> None:
    """Triton 3.6's interpreter turns a loop bound into a Python int with
    ``int(array_of_shape_1)``, which NumPy >= 2.3 rejects, so every kernel
    with a runtime-length loop fails under TRITON_INTERPRET=1.  When (and only
    when) that is the case, make the interpreter's ``tensor.__index__`` take
    the single element explicitly.  Interpreter mode only; the compiled path
    is untouched."""
    import numpy as np
    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "_gpuloss_numpy_compat", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _patch_lang_tensor._gpuloss_numpy_compat = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


@functools.lru_cache(maxsize=None)
def device_capability(device_index: int) -> Tuple[int, int]:
    """(major, minor) of a CUDA device, read on first launch only, cached."""
    import torch
    return torch.cuda.get_device_capability(device_index)


class LaunchConfig(NamedTuple):
    """What a launcher needs: design, block (elements per iteration or chunk),
    warps, pipelining stages, programs per row (SPLIT, and its power of two)."""
    variant: str
    block: int
    num_warps: int
    num_stages: int
    split: int = 1
    split_p2: int = 1
    reverse: bool = False


def warps_for(block: int, capability: Optional[Tuple[int, int]]) -> int:
    # 16 elements per thread; 4..16 warps (32 would halve the programs per SM
    # without adding bytes in flight).
    w = block // (32 * ELEMS_PER_THREAD)
    return int(min(16, max(4, next_pow2(max(w, 1)))))


#: automatic design choice, from the H200 sweeps of 2026-11-26 (bench/RESULTS.md):
#: rows of 4-byte elements up to AUTO_ONCHIP_MAX_COLS go whole into one
#: program of up to 32 warps ("onchip", SPLIT = 1: each element read once;
#: fp32 8192x32000: CE loss+grad 0.85, softmax 0.98 of the copy floor);
#: everything else uses the looped "twopass" kernels (0.62-0.76), which beat
#: the split-row on-chip programs at every other measured shape.
AUTO_ONCHIP_MAX_COLS = 32768


def auto_variant(kernel: str, n_cols: int, itemsize: int) -> str:
    """The design used when none is asked for (see AUTO_ONCHIP_MAX_COLS)."""
    if kernel in ("softmax", "cross_entropy") and itemsize == 4 and n_cols <= AUTO_ONCHIP_MAX_COLS:
        return "onchip"
    return "twopass"


def launch_config(op: str, n_cols: int, *, variant: Optional[str] = None,
                  max_block: Optional[int] = None, device_index: Optional[int] = None,
                  kernel: Optional[str] = None, itemsize: int = 4) -> LaunchConfig:
    """The one sizing helper: block size, warps, stages and split for every op.

    Parameters
    ----------
    op : {"row", "row_fused", "elementwise"}
        "row_fused" for the kernels that have two designs (softmax forward,
        cross-entropy loss + gradient), "row" for the other row kernels,
        "elementwise" for the tiled element-wise kernels (``block`` is then
        BLOCK_C; the caller derives BLOCK_R).
    n_cols : int
        Row length C.
    variant : {"twopass", "onchip", None}
        Design for "row_fused"; None: :func:`auto_variant` when ``kernel``
        ("softmax" | "cross_entropy") is given, else "onchip" when the row
        fits in at most MAX_SPLIT chunks of at most ONCHIP_MAX_CHUNK elements
        (each element then read once), else "twopass".  The environment variable
        ``GPULOSS_TRITON_VARIANT`` overrides the default (for benchmarks).
    max_block : int, optional
        Cap on the block / chunk (tests use it to force the row loop, and
        ``GPULOSS_TRITON_MAX_BLOCK`` sets it globally).
    device_index : int, optional
        CUDA device, for per-architecture choices (read lazily, cached).

    Under ``TRITON_INTERPRET=1`` programs run one after another, so a row
    split over several programs would wait forever: "onchip" is then only
    used with SPLIT = 1 (the whole row in one chunk) and falls back to
    "twopass" when the row is longer than the cap.  SPLIT > 1 is GPU-only.
    """
    env_block = os.environ.get("GPULOSS_TRITON_MAX_BLOCK")
    if max_block is None and env_block:
        max_block = int(env_block)
    cap_block = next_pow2(max_block) if max_block else None
    capability = None
    if device_index is not None and not interpret():
        capability = device_capability(device_index)
    # Hopper and later have 228 KiB of smem/L1 per SM: 3 stages pay for the
    # looped kernels; older parts keep 2.
    stages = 3 if capability is not None and capability[0] >= 9 else 2
    n = max(int(n_cols), 1)

    if op == "elementwise":
        b = min(next_pow2(n), ELEMENTWISE_MAX_BLOCK_C)
        if cap_block:
            b = min(b, cap_block)
        return LaunchConfig("tiled", b, 4, stages)

    def rowloop() -> LaunchConfig:
        pref = ROWLOOP_BLOCK
        if op == "row_fused" and kernel is not None:
            pref = FUSED_ROWLOOP_BLOCK.get((kernel, itemsize), ROWLOOP_BLOCK)
        b = min(next_pow2(n), env_int("GPULOSS_TRITON_ROWLOOP_BLOCK", pref))
        if cap_block:
            b = min(b, cap_block)
        reverse = bool(env_int("GPULOSS_TRITON_REVERSE", int(ROWLOOP_REVERSE)))
        return LaunchConfig("twopass", b, warps_for(b, capability), stages, reverse=reverse)

    if op == "row":
        return rowloop()
    if op != "row_fused":
        raise ValueError(f"unknown op kind {op!r}")

    if variant is None:
        variant = os.environ.get("GPULOSS_TRITON_VARIANT", "").strip() or None
    whole_row = False
    if variant is None and kernel is not None:
        variant = auto_variant(kernel, n_cols, itemsize)
        whole_row = variant == "onchip"
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown Triton variant {variant!r}; choose from {VARIANTS}")
    if variant == "twopass":
        return rowloop()

    # benchmark knobs: the largest and the preferred chunk, the most programs
    # per row and the warps of the on-chip design (GPULOSS_TRITON_MAX_CHUNK,
    # GPULOSS_TRITON_CHUNK, GPULOSS_TRITON_MAX_SPLIT, GPULOSS_TRITON_ONCHIP_WARPS),
    # so one GPU run can time several configurations; the defaults are the
    # constants above
    onchip_max = env_int("GPULOSS_TRITON_MAX_CHUNK", ONCHIP_MAX_CHUNK)
    max_chunk = min(onchip_max, cap_block) if cap_block else onchip_max
    pref_chunk = min(env_int("GPULOSS_TRITON_CHUNK", ONCHIP_CHUNK), max_chunk)
    max_split = env_int("GPULOSS_TRITON_MAX_SPLIT", MAX_SPLIT)
    if whole_row and not cap_block:
        # the automatic choice: the whole row in one program, 32 elements per
        # thread at 32 warps for the longest rows (no rendezvous)
        chunk = next_pow2(n)
        warps = min(32, max(warps_for(chunk, capability), chunk // 1024))
        return LaunchConfig("onchip", chunk, warps, 1, 1, 1)
    if interpret():
        chunk, split = next_pow2(n), 1
        if chunk > max_chunk:
            return rowloop()
    else:
        split = -(-n // pref_chunk)
        chunk = next_pow2(-(-n // split))
        if split > max_split:
            chunk = next_pow2(-(-n // max_split))
        if chunk > max_chunk:
            return rowloop()
        split = -(-n // chunk)
    # the whole row (or chunk) lives in registers: no software pipelining
    warps = env_int("GPULOSS_TRITON_ONCHIP_WARPS", 0) or warps_for(chunk, capability)
    return LaunchConfig("onchip", chunk, warps, 1, split, next_pow2(split))
