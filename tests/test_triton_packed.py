"""The "packed" design (GPULOSS_TRITON_VARIANT=packed): one read of each row,
2-byte rows kept in registers in their storage dtype and upcast afresh in
each phase (``common.unpack``), softmax backward with y and dy read once
(``softmax_bwd_onchip_kernel``).  Opt-in only: it has not run on a GPU.

In Triton's interpreter (whole rows, SPLIT = 1) against the float64
reference: bf16, fp16 and fp32 storage, fresh random inputs, outputs
poisoned (NaN) before the kernel runs, rows of non-power-of-two length, one
row, strided rows, extreme logits (-inf entries, a spread of +-60, a row at
an offset near the top of the dtype's range), cross-entropy loss + gradient
in place and not, loss only, softmax / log_softmax forward and backward.
The GPU part (split rows, SPLIT > 1) is ``tests/test_triton_designs.py``.
"""
from __future__ import annotations


import numpy as np
import pytest

from gpuloss import reference as ref

from prims import prim
from test_triton_offsets import _ref_ce, _row_shift, poisoned_outputs

from triton_env import DEV, RUNS_HERE, TDT, as_f64, close_fp32, torch

pytestmark = RUNS_HERE

from gpuloss.backends.triton import TritonBackend  # noqa: E402
from gpuloss.backends.triton.config import PACKED_MAX_SPLIT, launch_config  # noqa: E402

DTYPES = ["bfloat16", "float16", "float32"]
#: the largest finite magnitude used as an offset per dtype (fp16 tops out at 65504)
BIG = {"bfloat16": 1e38, "float16": 6e4, "float32": 1e38}


def _logits(rng, R, C, dtype, strided=False):
    """Extreme rows: row 0 has -inf entries, row 1 a spread of +-60, the last
    row sits at an offset near the top of the range; the rest randn * 3."""
    x = rng.standard_normal((R, C)) * 3
    if R > 2:
        x[0, :: 7] = -np.inf
        x[1] = rng.uniform(-60, 60, C)
        x[-1] = rng.standard_normal(C) + BIG[dtype]
    t = torch.from_numpy(x).to(TDT[dtype])
    if strided:
        buf = torch.full((R, C + 5), float("nan"), dtype=TDT[dtype])
        buf[:, 2:2 + C] = t
        t = buf[:, 2:2 + C]
    t = t.to(DEV)
    return t, as_f64(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [263, 1000])
def test_packed_cross_entropy(rng, dtype, C):
    """Loss + gradient (in place and not, strided rows, one row), light and
    heavy features (different sizing), loss only."""
    b = TritonBackend(variant="packed")
    R = 5
    for opts, strided, inplace in ((dict(), True, False),
                                   (dict(label_smoothing=0.1, z_loss=1e-3), False, True),
                                   (dict(weight=True, label_smoothing=0.1, softcap=20.0), False, False)):
        x, xr = _logits(rng, R, C, dtype, strided)
        # -inf logits with smoothing make the loss inf (as the reference): keep them for the plain case
        if opts:
            x[0] = torch.from_numpy(rng.standard_normal(C) * 3).to(x.dtype)
            xr = as_f64(x)
        t = rng.integers(0, C, R)
        t[2] = -100
        t[0] = 1  # a finite target on the row with -inf entries (column 0 is -inf)
        w = None
        if opts.pop("weight", False):
            w = as_f64(torch.from_numpy(rng.random(C) + 0.5).float())
        kw = dict(label_smoothing=opts.get("label_smoothing", 0.0), z_loss=opts.get("z_loss", 0.0),
                  softcap=opts.get("softcap"))
        want, gx, _, lse = _ref_ce(xr, t, weight=w, reduction="mean", **kw)
        with poisoned_outputs():
            res = prim(b, "cross_entropy", x, torch.from_numpy(t).to(DEV), weight=None if w is None else
                                  torch.from_numpy(w).float().to(DEV), ignore_index=-100,
                                  reduction="mean", want_grad=True, grad_inplace=inplace, **kw)
        what = f"{dtype} C={C} {opts} strided={strided} inplace={inplace}"
        assert (res.grad is x) == inplace
        close_fp32(res.loss, want, "float32", "loss " + what)
        close_fp32(res.grad, gx, dtype, "grad " + what, grad=True)
        close_fp32(res.lse, lse, "float32", "lse " + what)
    # one row, loss only (the looped kernel, one read) and loss + grad
    x, xr = _logits(rng, 1, C, dtype)
    t = rng.integers(0, C, 1)
    want, gx, _, _ = _ref_ce(xr, t, reduction="sum")
    with poisoned_outputs():
        only = prim(b, "cross_entropy", x, torch.from_numpy(t).to(DEV), weight=None, ignore_index=-100, label_smoothing=0.0,
                               z_loss=0.0, softcap=None, reduction="sum", want_grad=False)
        res = prim(b, "cross_entropy", x, torch.from_numpy(t).to(DEV), weight=None, ignore_index=-100, label_smoothing=0.0,
                              z_loss=0.0, softcap=None, reduction="sum", want_grad=True)
    close_fp32(only.loss, want, "float32", f"loss only, one row, {dtype}")
    close_fp32(res.grad, gx, dtype, f"grad, one row, {dtype}", grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_packed_softmax_forward_backward(rng, dtype, log):
    b = TritonBackend(variant="packed")
    for R, C, strided in ((4, 263, True), (1, 1000, False)):
        x, xr = _logits(rng, R, C, dtype, strided)
        xs = xr - _row_shift(xr)  # the reference is exact only near 0 (log_softmax = x - lse)
        want = ref.log_softmax(xs) if log else ref.softmax(xs)
        with poisoned_outputs():
            y = prim(b, "softmax_forward", x, log=log)
        close_fp32(y, want, dtype, f"forward {dtype} R={R} log={log}")
        # backward from a stored output and a random upstream gradient
        yw = np.where(np.isfinite(want), want, -1e4) if log else want
        yt = torch.from_numpy(yw).to(TDT[dtype]).to(DEV)
        dy = torch.from_numpy(rng.standard_normal((R, C))).to(TDT[dtype]).to(DEV)
        if strided:
            buf = torch.full((R, C + 3), float("nan"), dtype=TDT[dtype], device=DEV)
            buf[:, 1:1 + C] = dy
            dy = buf[:, 1:1 + C]
        yr, dyr = as_f64(yt), as_f64(dy)
        wantdx = ref.log_softmax_backward(yr, dyr) if log else ref.softmax_backward(yr, dyr)
        with poisoned_outputs():
            dx = prim(b, "softmax_backward", yt, dy, log=log)
        close_fp32(dx, wantdx, dtype, f"backward {dtype} R={R} log={log}", grad=True)


def test_packed_sizing(monkeypatch):
    """The GPU sizing of the packed design at PERF.md's shapes: chunks cover
    the row, at most PACKED_MAX_SPLIT programs per row, a register cap, and
    the heavier cross-entropy features hold fewer elements per thread."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("GPULOSS_TRITON_VARIANT", raising=False)
    for kernel in ("cross_entropy", "softmax", "softmax_backward"):
        for dtype, itemsize, V in (("bfloat16", 2, 32000), ("bfloat16", 2, 128256), ("bfloat16", 2, 262144),
                                   ("float32", 4, 32000), ("float16", 2, 50257), ("bfloat16", 2, 300)):
            for heavy in (False, True):
                cfg = launch_config("row_fused", V, variant="packed", kernel=kernel, dtype=dtype, itemsize=itemsize,
                                    capability=(9, 0), heavy=heavy)
                assert cfg.variant == "packed" and cfg.maxnreg and cfg.block & (cfg.block - 1) == 0
                assert 1 <= cfg.split <= PACKED_MAX_SPLIT
                assert cfg.block * cfg.split >= V > cfg.block * (cfg.split - 1)
                assert cfg.maxnreg * 32 * cfg.num_warps <= 65536
    light = launch_config("row_fused", 32000, variant="packed", kernel="cross_entropy", itemsize=2, capability=(9, 0))
    heavy = launch_config("row_fused", 32000, variant="packed", kernel="cross_entropy", itemsize=2, capability=(9, 0),
                          heavy=True)
    assert light.block // (32 * light.num_warps) > heavy.block // (32 * heavy.num_warps)
    # 8-byte storage: the looped kernels
    assert launch_config("row_fused", 32000, variant="packed", kernel="softmax", itemsize=8).variant == "twopass"
