"""Launch configuration of the Triton kernels: the one sizing helper
(:func:`launch_config`) and the limits it works within, written once.

Every launcher asks :func:`launch_config` for its block, warps, stages and
design ("variant"); nothing else sizes a launch.  The automatic design comes
from the design table (:mod:`gpuloss.tuning`), which holds only designs that
have passed the GPU test suite.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

#: the designs of the row kernels (softmax forward and backward, cross-entropy
#: loss + gradient): "twopass" the looped kernels (any row; loss+grad and
#: softmax read the row twice), "onchip" the row in register-resident chunks
#: read once, "packed" the same one-read kernels sized for 2-byte rows so that
#: nothing spills and several programs share an SM (PACKED_SIZING)
VARIANTS = ("twopass", "onchip", "packed")

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
#: float64 tiles are a quarter (8 per thread at 4 warps): at 32 per thread
#: fp64 log / exp (subroutines of many registers) spill in BCE and KL
#: (``python -m gpuloss.bench.resources``).
ELEMENTWISE_TILE = 4096
ELEMENTWISE_TILE_FP64 = 1024
ELEMENTWISE_MAX_BLOCK_C = 1024
#: elements per thread the warp count aims at (float64: 4, which keeps
#: every looped fp64 kernel free of spills at sm_80 and sm_90).
ELEMS_PER_THREAD = 16
ELEMS_PER_THREAD_FP64 = 4
#: the "packed" design, per (kernel, heavy features): (elements per thread
#: for 2-byte storage, warps, register cap per thread).  Chosen from the
#: offline register counts (``python -m gpuloss.bench.resources --group
#: variant``): no spills at sm_80 / sm_90, and the cap sets the programs per
#: SM (65536 registers): CE 8 warps x 80 -> 3 programs, 64 B per thread in
#: flight (64 spills at sm_80, and at sm_90 with 32 programs per row);
#: softmax 8 x 56 -> 4; softmax backward (y and dy) 8 x 48 -> 5.  "heavy"
#: cross-entropy (class weights, probability targets or softcap: more live
#: values per element) holds 8 elements per thread at 16 warps x 48 -> 2.
#: 4-byte storage holds half the elements per thread (same bytes).
PACKED_SIZING = {("cross_entropy", False): (32, 8, 80), ("cross_entropy", True): (8, 16, 48),
                 ("softmax", False): (32, 8, 56), ("softmax_backward", False): (16, 8, 48)}
#: most programs sharing one row in the "packed" design (all resident at once:
#: 32 x 512 threads, a small part of one GPU)
PACKED_MAX_SPLIT = 32


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def interpreter_patches() -> None:
    """Where Triton's interpreter departs from the GPU in ways that change
    results, make it behave as the GPU does (interpreter mode only)."""
    interpreter_numpy_compat()
    interpreter_bf16_rounding()


def _f32_to_bf16_bits(a):
    """The bfloat16 bits of float32 ``a`` rounded to nearest, ties to even
    (the GPU's ``cvt.rn.bf16.f32``); NaN stays a quiet NaN of its sign."""
    import numpy as np
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(np.isnan(a), quiet_nan, rounded).astype(np.uint16)


def interpreter_bf16_rounding() -> None:
    """Triton 3.6's interpreter converts float32 to bfloat16 by truncation
    (``InterpreterBuilder.cast_impl`` passes no rounding mode), where the GPU
    rounds to nearest even: every bf16 store was up to one ulp off, and a
    softmax of 1.0 became 0.99609375; and it converts bfloat16 subnormals to
    float32 wrongly (9.2e-41 became 0, -2.8e-40 became -5.9e-39).  Make both
    conversions exact as on the GPU (bfloat16 -> float32 is a 16-bit shift);
    the others (float16 through NumPy) already are."""
    from triton.runtime import interpreter
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_gpuloss_rne", False):
        return
    import triton.language as tl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16_bits(src.data), dst_type.scalar)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:
            import numpy as np
            bits = np.ascontiguousarray(src.data).view(np.uint16).astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._gpuloss_rne = True
    builder.cast_impl = cast_impl


def interpreter_numpy_compat() -> None:
    """Triton 3.6's interpreter turns a loop bound into a Python int with
    ``int(array_of_shape_1)``, which NumPy >= 2.3 rejects, so every kernel
    with a runtime-length loop fails under TRITON_INTERPRET=1.  When (and only
    when) that is the case, make the interpreter's ``tensor.__index__`` take
    the single element explicitly.  Interpreter mode only; the compiled path
    is untouched."""
    import warnings

    import numpy as np
    try:
        with warnings.catch_warnings():  # NumPy 1.25-2.2: a DeprecationWarning, not yet the TypeError
            warnings.simplefilter("ignore", DeprecationWarning)
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
    maxnreg: Optional[int] = None


def warps_for(block: int, capability: Optional[Tuple[int, int]], itemsize: int = 4) -> int:
    # 16 elements per thread (fp64: 4); 4..16 warps (32 would halve the
    # programs per SM without adding bytes in flight).
    w = block // (32 * (ELEMS_PER_THREAD_FP64 if itemsize >= 8 else ELEMS_PER_THREAD))
    return int(min(16, max(4, next_pow2(max(w, 1)))))


def elementwise_tile(itemsize: int) -> int:
    """Elements per program of the element-wise kernels."""
    return ELEMENTWISE_TILE_FP64 if itemsize >= 8 else ELEMENTWISE_TILE


def _rowloop_config(op: str, n: int, kernel: Optional[str], itemsize: int, cap_block: Optional[int],
                    capability: Optional[Tuple[int, int]], stages: int, tuned: dict) -> LaunchConfig:
    """The looped kernels: block from the design table's ``block`` (else
    FUSED_ROWLOOP_BLOCK / ROWLOOP_BLOCK), direction from its ``reverse``
    (else ROWLOOP_REVERSE); GPULOSS_TRITON_ROWLOOP_BLOCK / _REVERSE win."""
    pref = ROWLOOP_BLOCK
    if op == "row_fused" and kernel is not None:
        pref = tuned.get("block") or FUSED_ROWLOOP_BLOCK.get((kernel, itemsize), ROWLOOP_BLOCK)
    b = min(next_pow2(n), env_int("GPULOSS_TRITON_ROWLOOP_BLOCK", pref))
    if cap_block:
        b = min(b, cap_block)
    reverse = bool(env_int("GPULOSS_TRITON_REVERSE", int(tuned.get("reverse", ROWLOOP_REVERSE))))
    warps = int(tuned["num_warps"]) if "num_warps" in tuned else warps_for(b, capability, itemsize)
    return LaunchConfig("twopass", b, warps, stages, reverse=reverse)


def _onchip_config(n: int, cap_block: Optional[int], capability: Optional[Tuple[int, int]],
                   tuned: dict) -> Optional[LaunchConfig]:
    """The on-chip design: the row in SPLIT register-resident chunks (None:
    the row is too long for it).  Sizing from the design table's ``chunk``,
    ``max_split``, ``num_warps`` (else ONCHIP_CHUNK, MAX_SPLIT, warps_for);
    the benchmark knobs GPULOSS_TRITON_CHUNK, _MAX_CHUNK, _MAX_SPLIT and
    _ONCHIP_WARPS win, so that one GPU run can time several configurations.
    A table entry whose ``chunk`` holds the whole row gets one program per row
    (no rendezvous) with up to ``num_warps`` warps, 32 elements per thread."""
    pref = int(tuned.get("chunk", ONCHIP_CHUNK))
    onchip_max = env_int("GPULOSS_TRITON_MAX_CHUNK", max(ONCHIP_MAX_CHUNK, pref))
    max_chunk = min(onchip_max, cap_block) if cap_block else onchip_max
    pref_chunk = min(env_int("GPULOSS_TRITON_CHUNK", pref), max_chunk)
    max_split = env_int("GPULOSS_TRITON_MAX_SPLIT", int(tuned.get("max_split", MAX_SPLIT)))
    env_warps = env_int("GPULOSS_TRITON_ONCHIP_WARPS", 0)
    if interpret():
        # programs run one after another: only SPLIT = 1 can complete
        chunk, split = next_pow2(n), 1
        if chunk > max_chunk:
            return None
    else:
        split = -(-n // pref_chunk)
        chunk = next_pow2(-(-n // split))
        if split > max_split:
            chunk = next_pow2(-(-n // max_split))
        if chunk > max_chunk:
            return None
        split = -(-n // chunk)
    if env_warps:
        warps = env_warps
    elif "num_warps" in tuned:
        warps = min(int(tuned["num_warps"]), max(warps_for(chunk, capability), chunk // 1024))
    else:
        warps = warps_for(chunk, capability)
    # the whole row (or chunk) lives in registers: no software pipelining
    return LaunchConfig("onchip", chunk, warps, 1, split, next_pow2(split))


def _packed_config(n: int, kernel: Optional[str], itemsize: int, heavy: bool, cap_block: Optional[int],
                   tuned: dict) -> Optional[LaunchConfig]:
    """The "packed" design: the on-chip kernels with PACKED_SIZING (None: not
    for this row / dtype: 8-byte storage, or too long).  Elements per
    thread, warps and register cap from PACKED_SIZING, or from the design
    table's ``chunk`` / ``num_warps`` / ``maxnreg`` / ``max_split``; the
    benchmark knobs GPULOSS_TRITON_CHUNK, _ONCHIP_WARPS, _MAXNREG and
    _MAX_SPLIT win.  Rows longer than max_split chunks take more warps per
    program (up to 32), then fall back to the looped kernels."""
    if itemsize > 4:
        return None
    e, warps, maxnreg = PACKED_SIZING.get((kernel or "softmax", heavy), PACKED_SIZING[("softmax", False)])
    e = e * 2 // itemsize
    warps = int(tuned.get("num_warps", warps))
    chunk = int(tuned.get("chunk", e * 32 * warps))
    maxnreg = tuned.get("maxnreg", maxnreg)
    max_split = env_int("GPULOSS_TRITON_MAX_SPLIT", int(tuned.get("max_split", PACKED_MAX_SPLIT)))
    chunk = env_int("GPULOSS_TRITON_CHUNK", chunk)
    warps = env_int("GPULOSS_TRITON_ONCHIP_WARPS", warps)
    maxnreg = env_int("GPULOSS_TRITON_MAXNREG", maxnreg or 0) or None
    per_thread = max(1, chunk // (32 * warps))
    if interpret():
        chunk, split = next_pow2(n), 1
        if cap_block and chunk > cap_block:
            return None
        return LaunchConfig("packed", chunk, warps, 1, 1, 1, maxnreg=maxnreg)
    while -(-n // chunk) > max_split and warps < 32:
        warps, chunk = warps * 2, chunk * 2
    if -(-n // chunk) > max_split:
        return None
    if n < chunk:  # short rows: the whole row, fewer warps, same elements per thread
        chunk = next_pow2(n)
        warps = int(min(warps, max(1, next_pow2(max(chunk // (32 * per_thread), 1)))))
    split = -(-n // chunk)
    return LaunchConfig("packed", chunk, warps, 1, split, next_pow2(split), maxnreg=maxnreg)


def launch_config(op: str, n_cols: int, *, variant: Optional[str] = None,
                  max_block: Optional[int] = None, device_index: Optional[int] = None,
                  kernel: Optional[str] = None, itemsize: int = 4, dtype: Optional[str] = None,
                  capability: Optional[Tuple[int, int]] = None, heavy: bool = False) -> LaunchConfig:
    """The one sizing helper: block size, warps, stages and split for every op.

    Parameters
    ----------
    op : {"row", "row_fused", "elementwise"}
        "row_fused" for the kernels that have several designs (softmax
        forward, cross-entropy loss + gradient), "row" for the other row
        kernels, "elementwise" for the tiled element-wise kernels (``block``
        is then BLOCK_C; the caller derives BLOCK_R).
    n_cols : int
        Row length C.
    variant : one of VARIANTS, or None
        Design for "row_fused".  None: ``GPULOSS_TRITON_VARIANT`` if set, else
        the design table (:func:`gpuloss.tuning.lookup` for this device's
        architecture, ``kernel``, ``dtype`` and C), which only holds designs
        verified on a GPU; without a verified entry (another card, Triton's
        interpreter, no ``kernel``) the looped "twopass" kernels.
    max_block : int, optional
        Cap on the block / chunk (tests use it to force the row loop, and
        ``GPULOSS_TRITON_MAX_BLOCK`` sets it globally).
    device_index : int, optional
        CUDA device, for per-architecture choices (read lazily, cached).
    kernel : {"cross_entropy", "softmax", "softmax_backward"}, optional
        Which fused kernel (block sizes and the table are per kernel).
    heavy : bool
        Cross-entropy with class weights, probability targets or softcap
        (the "packed" design holds fewer elements per thread then).
    itemsize, dtype : storage element size and dtype name ("bfloat16", ...).
    capability : (major, minor), optional
        Size for this architecture instead of ``device_index``'s (offline
        tools: ``gpuloss.bench.resources``).

    Under ``TRITON_INTERPRET=1`` programs run one after another, so a row
    split over several programs would wait forever: "onchip" is then only
    used with SPLIT = 1 (the whole row in one chunk) and falls back to
    "twopass" when the row is longer than the cap.  SPLIT > 1 is GPU-only.
    """
    env_block = os.environ.get("GPULOSS_TRITON_MAX_BLOCK")
    if max_block is None and env_block:
        max_block = int(env_block)
    cap_block = next_pow2(max_block) if max_block else None
    if capability is None and device_index is not None and not interpret():
        from gpuloss import tuning
        capability = tuning.device_capability(f"cuda:{device_index}")
    # Hopper and later have 228 KiB of smem/L1 per SM: 3 stages pay for the
    # looped kernels; older parts keep 2.
    stages = 3 if capability is not None and capability[0] >= 9 else 2
    n = max(int(n_cols), 1)

    if op == "elementwise":
        b = min(next_pow2(n), ELEMENTWISE_MAX_BLOCK_C)
        if cap_block:
            b = min(b, cap_block)
        return LaunchConfig("tiled", b, 4, stages)
    if op == "row":
        return _rowloop_config(op, n, kernel, itemsize, cap_block, capability, stages, {})
    if op != "row_fused":
        raise ValueError(f"unknown op kind {op!r}")

    if variant is None:
        variant = os.environ.get("GPULOSS_TRITON_VARIANT", "").strip() or None
    tuned: dict = {}
    if variant is None:
        design = auto_design(kernel, dtype or _DTYPE_OF_ITEMSIZE.get(itemsize, "float32"), n, capability)
        variant, tuned = design.variant, design.config
    if variant not in VARIANTS:
        raise ValueError(f"unknown Triton variant {variant!r}; choose from {VARIANTS}")
    if variant == "onchip":
        cfg = _onchip_config(n, cap_block, capability, tuned)
        if cfg is not None:
            return cfg
        tuned = {}
    elif variant == "packed":
        cfg = _packed_config(n, kernel, itemsize, heavy, cap_block, tuned)
        if cfg is not None:
            return cfg
        tuned = {}
    return _rowloop_config(op, n, kernel, itemsize, cap_block, capability, stages, tuned)


#: the dtype a bare itemsize stands for when no dtype name is given
_DTYPE_OF_ITEMSIZE = {8: "float64", 4: "float32", 2: "bfloat16"}


def auto_design(kernel: Optional[str], dtype: str, n_cols: int, capability: Optional[Tuple[int, int]]):
    """The automatic design of a fused row kernel: the design table's
    verified entry for this architecture, or the safe default (see
    :mod:`gpuloss.tuning`).  An entry that names another backend (the
    dispatcher's choice) says nothing of Triton's design: the safe default."""
    from gpuloss import tuning
    if kernel is None:
        return tuning.SAFE_DEFAULT
    d = tuning.lookup(capability, kernel, dtype, n_cols)
    return d if d.backend in (None, "triton") else tuning.SAFE_DEFAULT


#: kernels whose "packed" launches upcast the 2-byte chunk afresh in each
#: phase (PACKED=True, ``common.unpack``): measured at sm_80 / sm_90, this
#: spares cross-entropy registers; in softmax forward and backward ptxas
#: already keeps the chunk in its 2-byte registers and the explicit form
#: only adds instructions (bench/RESULTS.md, prepared-not-run note)
PACKED_UPCAST = {"cross_entropy": True, "softmax": False, "softmax_backward": False}


def packed_upcast(kernel: str, cfg: LaunchConfig) -> bool:
    return cfg.variant == "packed" and PACKED_UPCAST[kernel]
