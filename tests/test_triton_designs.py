"""GPU only: every Triton design the design table can choose, run through the
key checks, and launches from several Python threads at once.

A design is chosen automatically only once a GPU run has verified it
(``gpuloss/tuning.py``).  ``bench/tune.py --write-table --verified RUN``
files the fastest of the configurations in ``tune.triton_configs()``; this
module runs each of them (and the automatic choice) through cross-entropy
(plain, every option, probability targets, in place, loss only) and softmax /
log_softmax forward and backward, on rows that need one or many programs
(split rows up to 32 programs), with extreme values and strided rows,
against the float64 reference with outputs poisoned.  ``ci/gpu.sh`` marks a
written table verified only when this suite passed.

Skipped without a CUDA device (the interpreter cannot run split rows or
threads; ``tests/test_triton_packed.py`` and ``test_triton_backend.py``
cover each design's arithmetic there).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from gpuloss import reference as ref

from prims import on_threads_and_streams, prim
from test_triton_offsets import _ref_ce, _row_shift, poisoned_outputs

from triton_env import HAS_CUDA, TDT, as_f64, close_fp32, torch

from gpuloss.bench.tune import triton_configs  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (not the interpreter)")]

#: every configuration the sweep can file in the table, and the automatic choice
DESIGNS = [("auto (design table)", {})] + triton_configs()
#: rows of one program, of several (split), ragged, and up to 32 programs
COLS = (1000, 32000, 50257, 200003)


def _backend():
    from gpuloss.backends.triton import TritonBackend
    return TritonBackend()


def _logits(rng, R, C, dtype, strided=False):
    x = rng.standard_normal((R, C)) * 3
    x[0, ::11] = -np.inf
    x[1] = rng.uniform(-40, 40, C)
    x[2] += 1e4 if dtype != "float16" else 1e3
    t = torch.from_numpy(x).to(TDT[dtype]).cuda()
    if strided:
        buf = torch.full((R, C + 9), float("nan"), dtype=TDT[dtype], device="cuda")
        buf[:, 4:4 + C] = t
        t = buf[:, 4:4 + C]
    return t, as_f64(t)


def _check_cross_entropy(b, rng, dtype, C):
    R = 12
    cases = (dict(), dict(label_smoothing=0.1, z_loss=1e-4, weight=True),
             dict(softcap=30.0, label_smoothing=0.05), dict(prob=True, label_smoothing=0.1, weight=True))
    for i, o in enumerate(cases):
        o = dict(o)
        x, xr = _logits(rng, R, C, dtype, strided=i == 1)
        if o:  # -inf logits with smoothing make an inf loss (as the reference): plain case only
            x[0] = torch.from_numpy(rng.standard_normal(C)).to(x.dtype)
            xr = as_f64(x)
        prob = o.pop("prob", False)
        w = as_f64(torch.from_numpy(rng.random(C) + 0.5).float()) if o.pop("weight", False) else None
        if prob:
            d = rng.random((R, C))
            d /= d.sum(1, keepdims=True)
            tt = torch.from_numpy(d).to(TDT[dtype]).cuda()
            t = as_f64(tt)
        else:
            t = rng.integers(0, C, R)
            t[0], t[3] = 1, -100
            tt = torch.from_numpy(t).cuda()
        kw = dict(label_smoothing=o.get("label_smoothing", 0.0), z_loss=o.get("z_loss", 0.0),
                  softcap=o.get("softcap"))
        want, gx, gd, lse = _ref_ce(xr, t, weight=w, reduction="mean", **kw)
        inplace = i == 0
        with poisoned_outputs():
            res = prim(b, "cross_entropy", x, tt, weight=None if w is None else torch.from_numpy(w).float().cuda(),
                                  ignore_index=-100, reduction="mean", want_grad=True, grad_inplace=inplace,
                                  want_grad_target=prob, **kw)
            only = prim(b, "cross_entropy", x if not inplace else torch.from_numpy(xr).to(TDT[dtype]).cuda(), tt,
                                   weight=None if w is None else torch.from_numpy(w).float().cuda(),
                                   ignore_index=-100, reduction="mean", want_grad=False, **kw)
        what = f"C={C} {dtype} case {i}"
        close_fp32(res.loss, want, "float32", "loss " + what)
        close_fp32(only.loss, want, "float32", "loss only " + what)
        close_fp32(res.grad, gx, dtype, "grad " + what, grad=True)
        close_fp32(res.lse, lse, "float32", "lse " + what)
        if prob:
            close_fp32(res.grad_target, gd, dtype, "grad target " + what, grad=True)
        torch.cuda.synchronize()


def _check_softmax(b, rng, dtype, C):
    R = 12
    for log in (False, True):
        x, xr = _logits(rng, R, C, dtype, strided=log)
        xs = xr - _row_shift(xr)
        want = ref.log_softmax(xs) if log else ref.softmax(xs)
        with poisoned_outputs():
            y = prim(b, "softmax_forward", x, log=log)
        close_fp32(y, want, dtype, f"forward log={log} C={C} {dtype}")
        yw = np.where(np.isfinite(want), want, -1e4) if log else want
        yt = torch.from_numpy(yw).to(TDT[dtype]).cuda()
        dy = torch.from_numpy(rng.standard_normal((R, C))).to(TDT[dtype]).cuda()
        yr, dyr = as_f64(yt), as_f64(dy)
        wantdx = ref.log_softmax_backward(yr, dyr) if log else ref.softmax_backward(yr, dyr)
        with poisoned_outputs():
            dx = prim(b, "softmax_backward", yt, dy, log=log)
        close_fp32(dx, wantdx, dtype, f"backward log={log} C={C} {dtype}", grad=True)
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("design", [d[0] for d in DESIGNS])
def test_gpu_every_design_the_table_can_choose(rng, monkeypatch, design, dtype):
    for k in [k for k in os.environ if k.startswith("GPULOSS_TRITON_")]:
        monkeypatch.delenv(k)
    for k, v in dict(DESIGNS)[design].items():
        monkeypatch.setenv(k, v)
    b = _backend()
    for C in COLS:
        _check_cross_entropy(b, rng, dtype, C)
        _check_softmax(b, rng, dtype, C)


@pytest.mark.parametrize("variant", [None, "packed"])
def test_gpu_concurrent_launches_from_threads(rng, variant):
    """Eight Python threads launch Triton kernels at once (first launches
    compile concurrently; half the threads on their own CUDA stream): every
    result equals the one computed alone afterwards."""
    from gpuloss.backends.triton import TritonBackend
    n_threads = 8
    shapes = [(64, 1000 + 997 * i) for i in range(n_threads)]
    inputs = []
    for i, (R, C) in enumerate(shapes):
        dt = torch.bfloat16 if i % 2 else torch.float32
        x = (torch.from_numpy(rng.standard_normal((R, C)) * 3).to(dt)).cuda()
        t = torch.from_numpy(rng.integers(0, C, R)).cuda()
        inputs.append((x, t))

    def call(i):
        b = TritonBackend(variant=variant)
        x, t = inputs[i]
        res = prim(b, "cross_entropy", x, t, weight=None, ignore_index=-100, label_smoothing=0.1, z_loss=0.0,
                   softcap=None, reduction="mean", want_grad=True)
        y = prim(b, "softmax_forward", x, log=False)
        return res.loss.clone(), res.grad.clone(), y.clone()

    results = on_threads_and_streams(n_threads, call)
    b = TritonBackend(variant=variant)
    for i, (x, t) in enumerate(inputs):
        res = prim(b, "cross_entropy", x, t, weight=None, ignore_index=-100, label_smoothing=0.1, z_loss=0.0, softcap=None,
                              reduction="mean", want_grad=True)
        y = prim(b, "softmax_forward", x, log=False)
        for loss, grad, yy in results[i]:
            assert torch.equal(loss, res.loss) and torch.equal(grad, res.grad) and torch.equal(yy, y), i
        xr = as_f64(x)
        want, gx, _, _ = _ref_ce(xr, as_f64(t).astype(np.int64), reduction="mean", label_smoothing=0.1)
        close_fp32(res.loss, want, "float32", f"thread {i} loss")
        close_fp32(res.grad, gx, "bfloat16" if x.dtype == torch.bfloat16 else "float32", f"thread {i} grad", grad=True)
