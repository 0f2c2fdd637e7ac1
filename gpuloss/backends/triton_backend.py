"""The Triton backend: launchers for the kernels in ``gpuloss.kernels.triton``.

Native arrays are torch tensors on CUDA (CuPy arrays come in and go out
through DLPack, zero-copy).  With ``TRITON_INTERPRET=1`` the same kernels run
on CPU tensors through Triton's interpreter (slow; for tests at tiny shapes).

Arithmetic: float32 for float16 / bfloat16 / float32 storage, float64 for
float64 storage (the kernels take the accumulation dtype as a constexpr), so
float64 inputs meet the float64 tolerances.  Losses come back in the
accumulation dtype, lse always in float32 (the contract), gradients in the storage dtype of what they differentiate.

No host synchronisation anywhere: reductions stay on the device (0-d tensors),
and the class-target "mean" divisor sum_i w[t_i] is computed by a one-program
kernel into a device scalar that the cross-entropy kernel reads.

Launch configuration comes from :func:`launch_config` only; see its
docstring for the limits and the designs ("variants") it chooses between.
The automatic design comes from the design table (:mod:`gpuloss.tuning`),
which holds only designs that have passed the GPU test suite.
"""
from __future__ import annotations

import functools
import os
from typing import Any, List, NamedTuple, Optional, Tuple

from .base import Backend, LossResult

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


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _interpreter_numpy_compat() -> None:
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
def _capability(device_index: int) -> Tuple[int, int]:
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
    maxnreg: Optional[int] = None


def _warps(block: int, capability: Optional[Tuple[int, int]], itemsize: int = 4) -> int:
    # 16 elements per thread (fp64: 4); 4..16 warps (32 would halve the
    # programs per SM without adding bytes in flight).
    w = block // (32 * (ELEMS_PER_THREAD_FP64 if itemsize >= 8 else ELEMS_PER_THREAD))
    return int(min(16, max(4, _next_pow2(max(w, 1)))))


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
    b = min(_next_pow2(n), _env_int("GPULOSS_TRITON_ROWLOOP_BLOCK", pref))
    if cap_block:
        b = min(b, cap_block)
    reverse = bool(_env_int("GPULOSS_TRITON_REVERSE", int(tuned.get("reverse", ROWLOOP_REVERSE))))
    warps = int(tuned["num_warps"]) if "num_warps" in tuned else _warps(b, capability, itemsize)
    return LaunchConfig("twopass", b, warps, stages, reverse=reverse)


def _onchip_config(n: int, cap_block: Optional[int], capability: Optional[Tuple[int, int]],
                   tuned: dict) -> Optional[LaunchConfig]:
    """The on-chip design: the row in SPLIT register-resident chunks (None:
    the row is too long for it).  Sizing from the design table's ``chunk``,
    ``max_split``, ``num_warps`` (else ONCHIP_CHUNK, MAX_SPLIT, _warps);
    the benchmark knobs GPULOSS_TRITON_CHUNK, _MAX_CHUNK, _MAX_SPLIT and
    _ONCHIP_WARPS win, so that one GPU run can time several configurations.
    A table entry whose ``chunk`` holds the whole row gets one program per row
    (no rendezvous) with up to ``num_warps`` warps, 32 elements per thread."""
    pref = int(tuned.get("chunk", ONCHIP_CHUNK))
    onchip_max = _env_int("GPULOSS_TRITON_MAX_CHUNK", max(ONCHIP_MAX_CHUNK, pref))
    max_chunk = min(onchip_max, cap_block) if cap_block else onchip_max
    pref_chunk = min(_env_int("GPULOSS_TRITON_CHUNK", pref), max_chunk)
    max_split = _env_int("GPULOSS_TRITON_MAX_SPLIT", int(tuned.get("max_split", MAX_SPLIT)))
    env_warps = _env_int("GPULOSS_TRITON_ONCHIP_WARPS", 0)
    if _interpret():
        # programs run one after another: only SPLIT = 1 can complete
        chunk, split = _next_pow2(n), 1
        if chunk > max_chunk:
            return None
    else:
        split = -(-n // pref_chunk)
        chunk = _next_pow2(-(-n // split))
        if split > max_split:
            chunk = _next_pow2(-(-n // max_split))
        if chunk > max_chunk:
            return None
        split = -(-n // chunk)
    if env_warps:
        warps = env_warps
    elif "num_warps" in tuned:
        warps = min(int(tuned["num_warps"]), max(_warps(chunk, capability), chunk // 1024))
    else:
        warps = _warps(chunk, capability)
    # the whole row (or chunk) lives in registers: no software pipelining
    return LaunchConfig("onchip", chunk, warps, 1, split, _next_pow2(split))


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
    max_split = _env_int("GPULOSS_TRITON_MAX_SPLIT", int(tuned.get("max_split", PACKED_MAX_SPLIT)))
    chunk = _env_int("GPULOSS_TRITON_CHUNK", chunk)
    warps = _env_int("GPULOSS_TRITON_ONCHIP_WARPS", warps)
    maxnreg = _env_int("GPULOSS_TRITON_MAXNREG", maxnreg or 0) or None
    per_thread = max(1, chunk // (32 * warps))
    if _interpret():
        chunk, split = _next_pow2(n), 1
        if cap_block and chunk > cap_block:
            return None
        return LaunchConfig("packed", chunk, warps, 1, 1, 1, maxnreg=maxnreg)
    while -(-n // chunk) > max_split and warps < 32:
        warps, chunk = warps * 2, chunk * 2
    if -(-n // chunk) > max_split:
        return None
    if n < chunk:  # short rows: the whole row, fewer warps, same elements per thread
        chunk = _next_pow2(n)
        warps = int(min(warps, max(1, _next_pow2(max(chunk // (32 * per_thread), 1)))))
    split = -(-n // chunk)
    return LaunchConfig("packed", chunk, warps, 1, split, _next_pow2(split), maxnreg=maxnreg)


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
    cap_block = _next_pow2(max_block) if max_block else None
    if capability is None and device_index is not None and not _interpret():
        capability = _capability(device_index)
    # Hopper and later have 228 KiB of smem/L1 per SM: 3 stages pay for the
    # looped kernels; older parts keep 2.
    stages = 3 if capability is not None and capability[0] >= 9 else 2
    n = max(int(n_cols), 1)

    if op == "elementwise":
        b = min(_next_pow2(n), ELEMENTWISE_MAX_BLOCK_C)
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
    :mod:`gpuloss.tuning`).  Its ``backend`` field is not read here."""
    from gpuloss import tuning
    if kernel is None:
        return tuning.SAFE_DEFAULT
    return tuning.lookup(capability, kernel, dtype, n_cols)


#: kernels whose "packed" launches upcast the 2-byte chunk afresh in each
#: phase (PACKED=True, ``common.unpack``): measured at sm_80 / sm_90, this
#: spares cross-entropy registers; in softmax forward and backward ptxas
#: already keeps the chunk in its 2-byte registers and the explicit form
#: only adds instructions (bench/RESULTS.md, prepared-not-run note)
PACKED_UPCAST = {"cross_entropy": True, "softmax": False, "softmax_backward": False}


def _packed_upcast(kernel: str, cfg: LaunchConfig) -> bool:
    return cfg.variant == "packed" and PACKED_UPCAST[kernel]


def _acc(torch, dtype):
    """(torch accumulation dtype, triton constexpr dtype) for a storage dtype."""
    import triton.language as tl
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


class TritonBackend(Backend):
    """Fused loss kernels in Triton, on CUDA torch tensors (or CPU tensors
    under ``TRITON_INTERPRET=1``).

    Parameters
    ----------
    variant : {"twopass", "onchip", None}
        Force one design of the fused row kernels (default: chosen per shape
        by :func:`launch_config`, or ``GPULOSS_TRITON_VARIANT``).
    max_block : int, optional
        Cap on the elements per block (tests use small caps to exercise the
        row loops at small C).
    """

    name = "triton"
    native = "torch"

    def __init__(self, variant: Optional[str] = None, max_block: Optional[int] = None) -> None:
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"unknown Triton variant {variant!r}; choose from {VARIANTS}")
        self.variant = variant
        self.max_block = max_block
        if _interpret():
            _interpreter_numpy_compat()

    @staticmethod
    def variants() -> List[str]:
        """The designs of softmax forward and cross-entropy loss + gradient
        that ``GPULOSS_TRITON_VARIANT`` (or ``variant=``) can select."""
        return list(VARIANTS)

    # --- availability -----------------------------------------------------
    def probe(self) -> Tuple[bool, str]:
        try:
            import torch
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return False, f"cannot import torch/triton: {e}"
        if _interpret():
            try:
                _interpreter_numpy_compat()
            except Exception as e:
                return False, f"Triton interpreter unusable with this NumPy: {e}"
            return True, f"Triton {triton.__version__} interpreter on CPU tensors (TRITON_INTERPRET=1)"
        try:
            if torch.cuda.is_available():
                return True, f"Triton {triton.__version__} on CUDA"
        except Exception as e:
            return False, f"torch.cuda.is_available() failed: {e}"
        return False, "no CUDA device visible to torch (set TRITON_INTERPRET=1 to run on CPU tensors)"

    def accepts(self, kind: str, device: str) -> bool:
        if device.startswith("cuda"):
            return kind in ("torch", "cupy") and not _interpret()
        if device == "cpu":
            return kind == "torch" and _interpret()
        return False

    def to_native(self, a: Any, kind: str) -> Any:
        if kind == "torch":
            return a
        if kind == "cupy":
            import torch
            return torch.from_dlpack(a)
        raise TypeError(f"triton backend cannot take {kind} arrays")

    def from_native(self, a: Any, kind: str) -> Any:
        if a is None or kind == "torch":
            return a
        if kind == "cupy":
            import cupy
            return cupy.from_dlpack(a)
        raise TypeError(f"triton backend cannot return {kind} arrays")

    # --- helpers ------------------------------------------------------------
    def _config(self, op: str, x: Any, kernel: Optional[str] = None,
                variant: Optional[str] = None, heavy: bool = False) -> LaunchConfig:
        dev = x.device.index if x.device.type == "cuda" else None
        if dev is None and x.device.type == "cuda":
            dev = 0
        variant = variant or (self.variant if op == "row_fused" else None)
        return launch_config(op, x.shape[-1], variant=variant,
                             max_block=self.max_block, device_index=dev, kernel=kernel,
                             itemsize=x.element_size(), dtype=str(x.dtype).replace("torch.", ""),
                             heavy=heavy)

    @staticmethod
    def _scalar(v: float, like: Any) -> Any:
        """A float kernel argument: a Python float (fp32 in the kernel), or
        for float64 launches a one-element float64 tensor on the device, so
        the kernel reads the exact value (``scalar_acc``).  Created by a fill
        kernel, not a host copy, so it is safe inside CUDA-graph capture."""
        import torch
        if like.dtype == torch.float64:
            return torch.full((1,), float(v), dtype=torch.float64, device=like.device)
        return float(v)

    @staticmethod
    def _rows(a: Any) -> Any:
        """2-D view with unit column stride (copies only if the columns are strided)."""
        if a.dim() != 2:
            raise ValueError(f"expected a 2-D (R, C) array, got shape {tuple(a.shape)}")
        if a.shape[1] > 1 and a.stride(1) != 1:
            a = a.contiguous()
        return a

    @staticmethod
    def _row_stride(a: Any) -> int:
        return a.stride(0) if a.shape[0] > 1 else a.shape[1]

    @staticmethod
    def _operand(a: Any, n_rows: int, n_cols: int) -> Tuple[Any, int]:
        """A weight-like operand as (tensor, row stride): (C,) or (1, C)
        broadcast over rows with stride 0; (R, C) element-wise."""
        if a.dim() == 1:
            return a.contiguous(), 0
        if a.dim() == 2 and a.shape[0] == 1:
            return a[0].contiguous(), 0
        if tuple(a.shape) != (n_rows, n_cols):
            raise ValueError(f"operand of shape {tuple(a.shape)} does not match ({n_rows}, {n_cols})")
        a = TritonBackend._rows(a)
        return a, TritonBackend._row_stride(a)

    # --- softmax ----------------------------------------------------------
    def softmax_forward(self, x: Any, *, log: bool) -> Any:
        import torch
        from gpuloss.kernels.triton import softmax as K
        x = self._rows(x)
        R, C = x.shape
        y = torch.empty((R, C), dtype=x.dtype, device=x.device)
        if R == 0 or C == 0:
            return y
        _, acc = _acc(torch, x.dtype)
        cfg = self._config("row_fused", x, kernel="softmax")
        if cfg.variant in ("onchip", "packed"):
            scratch, counter = self._split_workspace(torch, R, cfg, x)
            K.softmax_fwd_onchip_kernel[(R * cfg.split,)](
                x, self._row_stride(x), y, C, scratch, counter, C,
                CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, LOG=log, ACC=acc,
                PACKED=_packed_upcast("softmax", cfg),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
        else:
            K.softmax_fwd_twopass_kernel[(R,)](
                x, self._row_stride(x), y, C, C,
                BLOCK=cfg.block, LOG=log, ACC=acc, REVERSE=cfg.reverse,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y

    def softmax_backward(self, y: Any, dy: Any, *, log: bool) -> Any:
        import torch
        from gpuloss.kernels.triton import softmax as K
        y, dy = self._rows(y), self._rows(dy)
        R, C = y.shape
        dx = torch.empty((R, C), dtype=y.dtype, device=y.device)
        if R == 0 or C == 0:
            return dx
        _, acc = _acc(torch, y.dtype)
        cfg = self._config("row_fused", y, kernel="softmax_backward")
        if cfg.variant in ("onchip", "packed"):
            scratch, counter = self._split_workspace(torch, R, cfg, y)
            K.softmax_bwd_onchip_kernel[(R * cfg.split,)](
                y, self._row_stride(y), dy, self._row_stride(dy), dx, C, scratch, counter, C,
                CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, LOG=log, ACC=acc,
                PACKED=_packed_upcast("softmax_backward", cfg),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
            return dx
        K.softmax_bwd_kernel[(R,)](
            y, self._row_stride(y), dy, self._row_stride(dy), dx, C, C,
            BLOCK=cfg.block, SINGLE_BLOCK=cfg.block >= C, LOG=log, ACC=acc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dx

    @staticmethod
    def _split_workspace(torch, n_rows: int, cfg: LaunchConfig, x: Any):
        """Scratch for the split-row rendezvous: partials (R, SPLIT, 4) in the
        accumulation dtype (every slot written before it is read: no init) and
        int32 counters [ticket, arrivals per row] zeroed by one async memset
        per launch (4 (R + 1) bytes), so repeated launches need no epochs."""
        acc_t, _ = _acc(torch, x.dtype)
        if cfg.split == 1:
            dummy = torch.empty(1, dtype=acc_t, device=x.device)
            return dummy, torch.empty(1, dtype=torch.int32, device=x.device)
        scratch = torch.empty(n_rows * cfg.split * 4, dtype=acc_t, device=x.device)
        counter = torch.zeros(n_rows + 1, dtype=torch.int32, device=x.device)
        return scratch, counter

    # --- cross-entropy ------------------------------------------------------
    def _mean_divisor(self, torch, target, weight, ignore_index: int, n_cols: int, acc_t, acc):
        from gpuloss.kernels.triton import cross_entropy as K
        R = target.shape[0]
        div = torch.empty((), dtype=acc_t, device=target.device)
        if R == 0:
            div.zero_()
            return div
        block = min(_next_pow2(R), 1024)
        K.ce_mean_divisor_kernel[(1,)](
            target, target.stride(0), weight if weight is not None else div, div,
            R, n_cols, ignore_index,
            BLOCK=block, HAS_WEIGHT=weight is not None, ACC=acc, num_warps=4)
        return div

    @staticmethod
    def _reduce(torch, rows_loss, reduction: str, divisor):
        if reduction == "none":
            return rows_loss
        total = rows_loss.sum()
        if reduction == "sum":
            return total
        return total / divisor

    def cross_entropy(self, x: Any, target: Any, *, weight: Optional[Any], ignore_index: int,
                      label_smoothing: float, z_loss: float, softcap: Optional[float],
                      reduction: str, want_grad: bool, grad_inplace: bool = False,
                      want_grad_target: bool = False) -> LossResult:
        import torch
        from gpuloss.kernels.triton import cross_entropy as K
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be none|mean|sum, got {reduction!r}")
        if grad_inplace and x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError("grad_inplace needs logits with unit column stride")
        x = self._rows(x)
        R, C = x.shape
        acc_t, acc = _acc(torch, x.dtype)
        prob = target.is_floating_point()
        if prob:
            target = self._rows(target)
            t_stride = self._row_stride(target)
        else:
            if target.dim() != 1:
                raise ValueError(f"class-index target must be 1-D, got shape {tuple(target.shape)}")
            t_stride = target.stride(0)
        if weight is not None:
            weight = weight.contiguous()
        loss_rows = torch.empty(R, dtype=acc_t, device=x.device)
        lse = torch.empty(R, dtype=torch.float32, device=x.device)  # float32 by contract
        grad = None
        if want_grad:
            grad = x if grad_inplace else torch.empty((R, C), dtype=x.dtype, device=x.device)
        grad_t = None
        if want_grad_target and prob:
            grad_t = torch.empty((R, C), dtype=target.dtype, device=x.device)
        div_on_device = reduction == "mean" and not prob
        if div_on_device:
            divisor = self._mean_divisor(torch, target, weight, ignore_index, C, acc_t, acc)
        else:
            divisor = float(R)
        grad_scale = 1.0 / R if (reduction == "mean" and prob and R > 0) else 1.0
        if R > 0 and C > 0:
            dummy = loss_rows
            g = grad if grad is not None else x
            gt = grad_t if grad_t is not None else dummy
            args = dict(
                PROB_TARGET=prob, HAS_WEIGHT=weight is not None,
                HAS_SMOOTHING=float(label_smoothing) != 0.0, HAS_Z_LOSS=float(z_loss) != 0.0,
                HAS_SOFTCAP=softcap is not None, DIV_ON_DEVICE=div_on_device,
                WANT_GRAD_TARGET=grad_t is not None, ACC=acc)
            head = (x, self._row_stride(x), target, t_stride,
                    weight if weight is not None else dummy,
                    g, self._row_stride(g), gt, self._row_stride(gt) if grad_t is not None else C,
                    loss_rows, lse, divisor if div_on_device else dummy)
            sc = self._scalar
            scalars = (C, int(ignore_index), sc(label_smoothing, x), sc(z_loss, x),
                       sc(softcap if softcap is not None else 1.0, x), sc(grad_scale, x))
            heavy = prob or weight is not None or softcap is not None
            cfg = self._config("row_fused", x, kernel="cross_entropy", heavy=heavy)
            if want_grad and cfg.variant in ("onchip", "packed"):
                scratch, counter = self._split_workspace(torch, R, cfg, x)
                K.cross_entropy_onchip_kernel[(R * cfg.split,)](
                    *head, scratch, counter, *scalars,
                    CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, **args,
                    PACKED=_packed_upcast("cross_entropy", cfg),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
            else:
                # loss only reads each logit once in the looped kernel already
                if cfg.variant != "twopass":
                    cfg = self._config("row_fused", x, kernel="cross_entropy", variant="twopass")
                K.cross_entropy_twopass_kernel[(R,)](
                    *head, *scalars, BLOCK=cfg.block, WANT_GRAD=want_grad, REVERSE=cfg.reverse, **args,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        loss = self._reduce(torch, loss_rows, reduction, divisor)
        return LossResult(loss=loss, grad=grad, grad_target=grad_t, lse=lse)

    def nll_loss(self, logp: Any, target: Any, *, weight: Optional[Any], ignore_index: int,
                 reduction: str, want_grad: bool) -> LossResult:
        import torch
        from gpuloss.kernels.triton import cross_entropy as K
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be none|mean|sum, got {reduction!r}")
        x = self._rows(logp)
        R, C = x.shape
        acc_t, acc = _acc(torch, x.dtype)
        if weight is not None:
            weight = weight.contiguous()
        loss_rows = torch.empty(R, dtype=acc_t, device=x.device)
        grad = torch.empty((R, C), dtype=x.dtype, device=x.device) if want_grad else None
        div_on_device = reduction == "mean"
        divisor = self._mean_divisor(torch, target, weight, ignore_index, C, acc_t, acc) if div_on_device else None
        if R > 0 and C > 0:
            cfg = self._config("row", x)
            dummy = loss_rows
            K.nll_loss_kernel[(R,)](
                x, self._row_stride(x), target, target.stride(0),
                weight if weight is not None else dummy,
                grad if grad is not None else dummy, C, loss_rows,
                divisor if divisor is not None else dummy,
                C, int(ignore_index), 1.0,
                BLOCK=cfg.block, HAS_WEIGHT=weight is not None, DIV_ON_DEVICE=div_on_device,
                WANT_GRAD=want_grad, ACC=acc, num_warps=cfg.num_warps)
        loss = self._reduce(torch, loss_rows, reduction, divisor)
        return LossResult(loss=loss, grad=grad)

    def kl_div_logits(self, x: Any, target: Any, *, temperature: float, target_is_logits: bool,
                      reduction: str, want_grad: bool) -> LossResult:
        import torch
        from gpuloss.kernels.triton import kl_div as K
        if reduction not in ("none", "mean", "sum", "batchmean"):
            raise ValueError(f"reduction must be none|mean|sum|batchmean, got {reduction!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        x, target = self._rows(x), self._rows(target)
        R, C = x.shape
        acc_t, acc = _acc(torch, x.dtype)
        loss_rows = torch.empty(R, dtype=acc_t, device=x.device)
        grad = torch.empty((R, C), dtype=x.dtype, device=x.device) if want_grad else None
        divisor = {"none": 1, "sum": 1, "batchmean": R, "mean": R * C}[reduction]
        scale = 1.0 / max(divisor, 1)
        if R > 0 and C > 0:
            cfg = self._config("row", x)
            K.kl_div_logits_kernel[(R,)](
                x, self._row_stride(x), target, self._row_stride(target),
                grad if grad is not None else loss_rows, C, loss_rows,
                C, self._scalar(1.0 / float(temperature), x), self._scalar(scale, x),
                BLOCK=cfg.block, TARGET_IS_LOGITS=bool(target_is_logits), WANT_GRAD=want_grad,
                ACC=acc, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        loss = self._reduce(torch, loss_rows, reduction, float(divisor))
        return LossResult(loss=loss, grad=grad)

    # --- element-wise losses ----------------------------------------------
    def _elementwise(self, kernel, x: Any, target: Any, extra: tuple, flags: dict, reduction: str,
                     want_grad: bool, want_grad_target: bool) -> LossResult:
        """Shared launcher: tiles, outputs, and the reduction of tile partials."""
        import torch
        R, C = x.shape
        acc_t, acc = _acc(torch, x.dtype)
        n = R * C
        divisor = {"none": 1, "sum": 1, "mean": n, "batchmean": R}[reduction]
        scale = 1.0 / max(divisor, 1)
        reduce = reduction != "none"
        cfg = self._config("elementwise", x)
        block_c = cfg.block
        block_r = max(1, min(_next_pow2(max(R, 1)), elementwise_tile(x.element_size()) // block_c))
        n_tiles = -(-R // block_r) * -(-C // block_c)
        loss_full = None if reduce else torch.empty((R, C), dtype=acc_t, device=x.device)
        partials = torch.empty(n_tiles if reduce else 1, dtype=acc_t, device=x.device)
        grad = torch.empty((R, C), dtype=x.dtype, device=x.device) if want_grad else None
        grad_t = torch.empty((R, C), dtype=target.dtype, device=x.device) if want_grad_target else None
        if n > 0:
            dummy = partials
            kernel[(n_tiles,)](
                x, self._row_stride(x), target, self._row_stride(target), *extra,
                loss_full if loss_full is not None else dummy, C if loss_full is not None else 0,
                partials,
                grad if grad is not None else dummy, C,
                grad_t if grad_t is not None else dummy, C,
                R, C, self._scalar(scale, x),
                BLOCK_R=block_r, BLOCK_C=block_c, REDUCE=reduce, **flags,
                WANT_GRAD=want_grad, WANT_GRAD_TARGET=want_grad_target, ACC=acc,
                num_warps=cfg.num_warps)
        if not reduce:
            loss = loss_full
        else:
            total = partials.sum() if n > 0 else torch.zeros((), dtype=acc_t, device=x.device)
            loss = total if reduction == "sum" else total / float(divisor)
        return LossResult(loss=loss, grad=grad, grad_target=grad_t)

    def kl_div(self, input: Any, target: Any, *, log_target: bool, reduction: str,
               want_grad: bool, want_grad_target: bool = False) -> LossResult:
        from gpuloss.kernels.triton import elementwise as K
        if reduction not in ("none", "mean", "sum", "batchmean"):
            raise ValueError(f"reduction must be none|mean|sum|batchmean, got {reduction!r}")
        x, t = self._rows(input), self._rows(target)
        return self._elementwise(K.kl_div_kernel, x, t, (), dict(LOG_TARGET=bool(log_target)),
                                 reduction, want_grad, want_grad_target)

    def bce_with_logits(self, x: Any, target: Any, *, weight: Optional[Any], pos_weight: Optional[Any],
                        reduction: str, want_grad: bool, want_grad_target: bool = False) -> LossResult:
        from gpuloss.kernels.triton import elementwise as K
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be none|mean|sum, got {reduction!r}")
        x, t = self._rows(x), self._rows(target)
        R, C = x.shape
        w, ws = self._operand(weight, R, C) if weight is not None else (x, 0)
        pw, pws = self._operand(pos_weight, R, C) if pos_weight is not None else (x, 0)
        return self._elementwise(K.bce_with_logits_kernel, x, t, (w, ws, pw, pws),
                                 dict(HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None),
                                 reduction, want_grad, want_grad_target)

    def bce(self, p: Any, target: Any, *, weight: Optional[Any], reduction: str,
            want_grad: bool, want_grad_target: bool = False) -> LossResult:
        from gpuloss.kernels.triton import elementwise as K
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be none|mean|sum, got {reduction!r}")
        x, t = self._rows(p), self._rows(target)
        R, C = x.shape
        w, ws = self._operand(weight, R, C) if weight is not None else (x, 0)
        return self._elementwise(K.bce_kernel, x, t, (w, ws), dict(HAS_WEIGHT=weight is not None),
                                 reduction, want_grad, want_grad_target)

    def mse(self, x: Any, target: Any, *, reduction: str, want_grad: bool,
            want_grad_target: bool = False) -> LossResult:
        from gpuloss.kernels.triton import elementwise as K
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be none|mean|sum, got {reduction!r}")
        x, t = self._rows(x), self._rows(target)
        return self._elementwise(K.mse_kernel, x, t, (), {}, reduction, want_grad, want_grad_target)
