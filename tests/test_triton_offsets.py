"""Precision of the Triton row kernels does not depend on where the logits sit.

Softmax-based losses are shift-invariant in exact arithmetic, and so must be
their row sums in floating point: the label-smoothing sum ``sum_c w_c z_c``,
the probability-target sums ``sum_c w_c d~_c z_c``, the target's logit, the
distillation sums.  Formed from raw logits, these cancel against
``lse * sum_c w_c`` and lose everything at large offsets (relative error
~1e-4 at an offset of 1e5 in fp32; inf - inf = nan near 1e37, where ``V *
1e37`` overflows).  The kernels form them relative to the row maximum.

Every test: logits ``randn + offset`` for offsets 0, +-1e5, 1e30, +-3e37
(fp32) and up to +-1e307 (fp64), rows of C = 37 (the looped kernel in blocks
of 16, i.e. three blocks with a ragged last one; the on-chip kernel with the
whole row), every reduction, loss and gradient against the float64 reference
on the values the kernel sees, with outputs poisoned (NaN) before the kernel
runs.  The loss must meet a relative tolerance close to what the dtype can do
(LOSS_RTOL), not merely the suite-wide one.

The float64 reference forms log p = z - lse, which itself loses everything
once |lse| passes ~1e16; the expected values here are the reference's on the
logits minus their row max (cross-entropy and KL are shift-invariant), with
the two terms that are not (z-loss, from lse, and the softcap, applied
before the shift) added in float64 by ``_ref_ce``.

Triton's interpreter on the CPU (``TRITON_INTERPRET=1``) or a CUDA device.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from gpuloss import reference as ref

from conftest import tol
from prims import prim

from triton_env import DEV, HAS_CUDA, INTERPRET, RUNS_HERE, as_f64, torch

pytestmark = RUNS_HERE

from gpuloss.backends.triton import TritonBackend  # noqa: E402

TDT = {"float32": torch.float32, "float64": torch.float64}
OFFSETS = {"float32": [0.0, 1e5, -1e5, 1e30, 3e37, -3e37],
           "float64": [1e5, -1e30, 1e307, -1e307]}
#: relative tolerance of the loss: a few ulps of the dtype times log(C), not
#: the suite's general float32 tolerance (2e-5)
LOSS_RTOL = {"float32": 2e-6, "float64": 1e-13}
DESIGNS = [("twopass", 16), ("onchip", None)]
R, C = 5, 37


@contextlib.contextmanager
def poisoned_outputs():
    """Every float tensor the launcher allocates with ``torch.empty`` starts
    as NaN, so an element the kernel does not write fails the comparison."""
    empty = torch.empty

    def nan_empty(*args, **kw):
        t = empty(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = nan_empty
    try:
        yield
    finally:
        torch.empty = empty


def _t(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=DEV, dtype=TDT[dtype] if dtype else None)


def _logits(rng, offset, dtype, n_rows=R):
    """randn + offset as stored in ``dtype``, and those values in float64."""
    x = _t(rng.standard_normal((n_rows, C)) + offset, dtype)
    return x, as_f64(x)


def _expect(got, want, dtype, rtol=None, atol=None, what=""):
    """``want`` (float64) rounded to the output dtype first: a loss of 1e60
    is inf in fp32 (z-loss at an offset of 1e30), and must be."""
    want = np.asarray(want, dtype=np.float64).astype(np.float32 if dtype == "float32" else np.float64)
    t = tol(dtype)
    np.testing.assert_allclose(as_f64(got), want.astype(np.float64), err_msg=what,
                               rtol=t["rtol"] if rtol is None else rtol,
                               atol=t["atol"] if atol is None else atol)


def _row_shift(z):
    m = z.max(axis=1, keepdims=True)
    return np.where(np.isfinite(m), m, 0.0)


def _ref_ce(xr, t, *, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    """(loss, dL/dx, dL/dd or None, lse) in float64, exact at any offset."""
    z = softcap * np.tanh(xr / softcap) if softcap else xr
    m = _row_shift(z)
    zs = z - m  # exact: the differences of nearby doubles
    kw = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    loss = ref.cross_entropy(zs, t, **kw)
    gx, gd = ref.cross_entropy_grad(zs, t, **kw)
    lse = m[:, 0] + ref.logsumexp(zs)
    if z_loss:
        prob = np.issubdtype(np.asarray(t).dtype, np.floating)
        valid = np.ones(len(xr), bool) if prob else t != -100
        w = np.ones(xr.shape[1]) if weight is None else weight
        div = len(xr) if prob else w[np.where(valid, t, 0)][valid].sum()
        scale = np.where(valid, 1.0 / div if reduction == "mean" else 1.0, 0.0)
        rows = np.where(valid, z_loss * lse * lse, 0.0)
        loss = loss + (rows if reduction == "none" else rows.sum() / (div if reduction == "mean" else 1.0))
        gx = gx + 2.0 * z_loss * (lse * scale)[:, None] * ref.softmax(zs)
    if softcap:
        gx = gx * (1.0 - np.tanh(xr / softcap) ** 2)
    return loss, gx, gd, lse


def _softcap_rounding(xr, cap, dtype):
    """Relative error that rounding z = cap tanh(x / cap) to the dtype puts
    into every z_c - max (so into log p and p): ~2 ulps of |z| against the
    spread of z, 0 without softcap or when a row's z are all equal (the
    kernel then computes the same z for each)."""
    if not cap:
        return 0.0
    z = cap * np.tanh(xr / cap)
    if (z.max(1) == z.min(1)).all():
        return 0.0
    return 4.0 * float(np.finfo(dtype).eps) * float(np.abs(z).max())


def _grad_atol(g_ref, dtype):
    """Absolute tolerance of a gradient: the dtype's relative tolerance of its
    largest entry (entries near 0 come from p_c - [c == t] and are only
    known to a few ulps of that)."""
    return tol(dtype)["rtol"] * max(float(np.abs(g_ref).max()), 1e-30)


CASES = {
    # class targets, label smoothing, class weights, one ignored row
    "smoothing+weight": dict(label_smoothing=0.1, weight=True),
    # smoothing without weights (W = C), z-loss on top
    "smoothing+z_loss": dict(label_smoothing=0.2, z_loss=1e-3),
    # soft-capping with a cap that does not saturate at this offset
    "softcap": dict(label_smoothing=0.1, weight=True, softcap="4|offset|"),
    # probability targets with weights, smoothing and z-loss, and dL/dd
    "prob": dict(prob=True, label_smoothing=0.1, weight=True, z_loss=1e-3),
}


def _case(rng, name, offset, dtype):
    o = dict(CASES[name])
    prob = o.pop("prob", False)
    if o.get("softcap"):
        o["softcap"] = 4.0 * max(abs(offset), 1.0)
    w = rng.random(C) + 0.5 if o.pop("weight", False) else None
    if w is not None:
        w = as_f64(_t(w, dtype))
    if prob:
        d = rng.random((R, C))
        d /= d.sum(1, keepdims=True)
        target = _t(d, dtype)
        t_np = as_f64(target)
    else:
        t_np = rng.integers(0, C, R)
        t_np[1] = -100
        target = _t(t_np)
    return o, prob, w, target, t_np


@pytest.mark.parametrize("variant,cap", DESIGNS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_cross_entropy_offsets(rng, variant, cap, dtype, case):
    b = TritonBackend(variant=variant, max_block=cap)
    failures = []
    for offset in OFFSETS[dtype]:
        o, prob, w, target, t_np = _case(rng, case, offset, dtype)
        x, xr = _logits(rng, offset, dtype)
        # ("sum" is the kernel of "none" with another scale: see the next test)
        for reduction in ("none", "mean"):
            with poisoned_outputs():
                res = prim(b, "cross_entropy", x, target, weight=None if w is None else _t(w, dtype),
                                      ignore_index=-100, label_smoothing=o.get("label_smoothing", 0.0),
                                      z_loss=o.get("z_loss", 0.0), softcap=o.get("softcap"),
                                      reduction=reduction, want_grad=True, want_grad_target=prob)
            want_loss, gx, gd, lse = _ref_ce(xr, t_np, weight=w, reduction=reduction, **o)
            what = f"offset {offset:g}, reduction {reduction}"
            z_err = _softcap_rounding(xr, o.get("softcap"), dtype)
            try:
                _expect(res.loss, want_loss, dtype, rtol=LOSS_RTOL[dtype] + 4 * z_err, atol=0.0,
                        what="loss, " + what)
                _expect(res.grad, gx, dtype, rtol=tol(dtype)["rtol"] + z_err,
                        atol=_grad_atol(gx, dtype) * (1.0 + z_err / tol(dtype)["rtol"]), what="grad, " + what)
                if prob:
                    _expect(res.grad_target, gd, dtype, atol=_grad_atol(gd, dtype), what="grad target, " + what)
                _expect(res.lse, lse, "float32", what="lse, " + what)
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures[:4]) + f"\n({len(failures)} failures)"


@pytest.mark.parametrize("variant,cap", DESIGNS)
def test_cross_entropy_offsets_in_place_loss_only(rng, variant, cap):
    """The same sums on the loss-only path and with the gradient written over
    the logits."""
    b = TritonBackend(variant=variant, max_block=cap)
    for offset in OFFSETS["float32"]:
        x, xr = _logits(rng, offset, "float32")
        t = rng.integers(0, C, R)
        want, gx, _, _ = _ref_ce(xr, t, label_smoothing=0.1, reduction="sum")
        with poisoned_outputs():
            only = prim(b, "cross_entropy", x, _t(t), weight=None, ignore_index=-100, label_smoothing=0.1, z_loss=0.0,
                                   softcap=None, reduction="sum", want_grad=False)
        _expect(only.loss, want, "float32", rtol=LOSS_RTOL["float32"], atol=0.0, what=f"loss only, {offset:g}")
        res = prim(b, "cross_entropy", x, _t(t), weight=None, ignore_index=-100, label_smoothing=0.1, z_loss=0.0,
                              softcap=None, reduction="sum", want_grad=True, grad_inplace=True)
        assert res.grad is x
        _expect(res.loss, want, "float32", rtol=LOSS_RTOL["float32"], atol=0.0, what=f"in place, {offset:g}")
        _expect(res.grad, gx, "float32", atol=_grad_atol(gx, "float32"), what=f"in place grad, {offset:g}")


@pytest.mark.parametrize("target_is_logits", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kl_div_logits_offsets(rng, target_is_logits, dtype):
    """Distillation KL: student logits at an offset, teacher logits at another
    (or probability targets)."""
    b = TritonBackend(max_block=16)
    failures = []
    for offset in OFFSETS[dtype]:
        x, xr = _logits(rng, offset, dtype)
        if target_is_logits:
            t, tr = _logits(rng, -offset / 2, dtype)
        else:
            d = rng.random((R, C))
            d[0, :3] = 0.0
            d /= d.sum(1, keepdims=True)
            t = _t(d, dtype)
            tr = as_f64(t)
        for reduction in ("none", "batchmean"):
            kw = dict(temperature=2.0, target_is_logits=target_is_logits, reduction=reduction)
            with poisoned_outputs():
                res = prim(b, "kl_div_logits", x, t, temperature=2.0, target_is_logits=target_is_logits,
                                      reduction=reduction, want_grad=True)
            # shift-invariant in both arguments: the reference on shifted rows
            xs = xr - _row_shift(xr)
            ts = tr - _row_shift(tr) if target_is_logits else tr
            gx = ref.kl_div_logits_grad(xs, ts, **kw)[0]
            what = f"offset {offset:g}, reduction {reduction}"
            try:
                # KL is a difference of O(1) terms: its ulps are those of the terms
                _expect(res.loss, ref.kl_div_logits(xs, ts, **kw), dtype, rtol=LOSS_RTOL[dtype] * 10,
                        atol=LOSS_RTOL[dtype] * 10, what="loss, " + what)
                # entries are q/T - d/T scaled by the reduction: a few ulps of 1/(T C)
                unit = 1.0 / (2.0 * C * {"none": 1, "sum": 1, "batchmean": R}[reduction])
                _expect(res.grad, gx, dtype, atol=_grad_atol(gx, dtype) + tol(dtype)["rtol"] * unit,
                        what="grad, " + what)
            except AssertionError as e:
                failures.append(str(e))
    assert not failures, "\n".join(failures[:4]) + f"\n({len(failures)} failures)"


@pytest.mark.parametrize("per_rank", ["triton", "torch"])
def test_vocab_parallel_offsets(rng, monkeypatch, per_rank):
    """Vocabulary-parallel cross-entropy at world size 1 (one gloo rank in this
    process): the per-rank kernels (``kernels/triton/vocab_parallel.py``) and
    the torch per-rank path share the host combination, whose sums must be
    relative as well.  (The multi-rank algebra is checked at ordinary offsets
    by tests/test_distributed.py.)"""
    import socket
    from datetime import timedelta

    import torch.distributed as dist
    from gpuloss.distributed import vocab_parallel_cross_entropy
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    if per_rank == "triton" and not INTERPRET:
        pytest.skip("the per-rank kernels on CPU tensors need TRITON_INTERPRET=1")
    monkeypatch.setenv("GPULOSS_VOCAB_PARALLEL_KERNEL", per_rank)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    failures = []
    try:
        for dtype in ("float32", "float64"):
            for offset in OFFSETS[dtype]:
                for o in (dict(label_smoothing=0.1, z_loss=1e-3),
                          dict(label_smoothing=0.2, softcap=4.0 * max(abs(offset), 1.0))):
                    x = _t(rng.standard_normal((R, C)) + offset, dtype).cpu().requires_grad_(True)
                    xr = as_f64(x)
                    t = rng.integers(0, C, R)
                    t[1] = -100
                    loss = vocab_parallel_cross_entropy(x, torch.from_numpy(t), reduction="mean", **o)
                    loss.backward()
                    want, gx, _, _ = _ref_ce(xr, t, reduction="mean", **o)
                    z_err = _softcap_rounding(xr, o.get("softcap"), dtype)
                    what = f"{dtype}, offset {offset:g}, {o}"
                    try:
                        _expect(loss, want, dtype, rtol=LOSS_RTOL[dtype] + 4 * z_err, atol=0.0,
                                what="loss, " + what)
                        _expect(x.grad, gx, dtype, rtol=tol(dtype)["rtol"] + z_err,
                                atol=_grad_atol(gx, dtype) * (1.0 + z_err / tol(dtype)["rtol"]),
                                what="grad, " + what)
                    except AssertionError as e:
                        failures.append(str(e))
    finally:
        dist.destroy_process_group()
    assert not failures, "\n".join(failures[:4]) + f"\n({len(failures)} failures)"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (split rows cannot run in the interpreter)")
@pytest.mark.parametrize("variant", ["twopass", "onchip"])
def test_gpu_split_rows_offsets(rng, variant):
    """Rows of 50257 on a GPU: the on-chip design splits them over several
    programs whose relative sums meet in ``split_row_combine``."""
    b = TritonBackend(variant=variant)
    n, v = 8, 50257
    w = as_f64(_t(rng.random(v) + 0.5, "float32"))
    for offset in (0.0, 1e5, -1e5, 3e37):
        x = _t(rng.standard_normal((n, v)) + offset, "float32")
        xr = as_f64(x)
        t = rng.integers(0, v, n)
        kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-4, reduction="mean")
        want, gx, _, _ = _ref_ce(xr, t, **kw)
        with poisoned_outputs():
            res = prim(b, "cross_entropy", x, _t(t), weight=_t(w, "float32"), ignore_index=-100, label_smoothing=0.1,
                                  z_loss=1e-4, softcap=None, reduction="mean", want_grad=True)
        _expect(res.loss, want, "float32", rtol=LOSS_RTOL["float32"] * 10, atol=0.0, what=f"loss, {offset:g}")
        _expect(res.grad, gx, "float32", atol=_grad_atol(gx, "float32"), what=f"grad, {offset:g}")
