"""The CUDA row kernels' arithmetic, run on the CPU.

``tests/host/rows_harness.cpp`` compiles ``kernels/cuda/rowops.cuh`` (the per-row math every
row kernel calls) with g++ and drives it in the engines' order: K blocks per row, T threads,
VEC-element vectors, the warp butterfly, the cluster combine.  These tests compare it with the
float64 reference where the precision of the formulation shows: logits sitting at a large
shared offset (0, +-1e5, 1e30, +-1e37), where sums of raw logits lose the loss to cancellation
or overflow fp32.  ``test_naive_sums_fail_here`` shows the inputs are sharp enough to catch that.

What the harness cannot show: the GPU's FMA contraction and expf / ex2.approx's last bits (the
GPU tests run the kernels themselves: tests/test_cupy_backend.py).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpuloss import reference as ref

from conftest import tol

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "host" / "rows_harness.cpp"
KERNELS = ROOT / "kernels" / "cuda"

OPS = {"softmax_fwd": 0, "softmax_bwd": 1, "ce": 2, "ce_prob": 3, "kl_prob": 4, "kl_logits": 5}
#: (K blocks per row, T threads per block, VEC): looped/unaligned, fp32 vectors, bf16-width
#: vectors, a 2-block cluster, an 8-block cluster (the staged variant's longest split)
LAYOUTS = [(1, 32, 1), (1, 64, 4), (1, 32, 8), (2, 32, 4), (8, 32, 8)]
OFFSETS = [0.0, 1e5, -1e5, 1e30, 1e37, -1e37]


def _build(tmp_path_factory, source: Path):
    """``source`` compiled by g++ with the kernels' directory on the include path."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp(source.stem) / source.stem
    proc = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", "-Werror", f"-I{KERNELS}",
                           str(source), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return _build(tmp_path_factory, HARNESS)


def run(exe, op, x, *, aux=None, t=None, w=None, K=1, T=32, VEC=1, log=False, eps=0.0, z_loss=0.0,
        softcap=0.0, inv_t=1.0, fast=False):
    R, C = x.shape
    hdr = struct.pack("<9q4d", OPS[op], R, C, K, T, VEC, int(log), int(w is not None), int(fast),
                      eps, z_loss, softcap, inv_t)
    data = [hdr, np.ascontiguousarray(x, np.float32).tobytes()]
    if aux is not None:
        data.append(np.ascontiguousarray(aux, np.float32).tobytes())
    if t is not None:
        data.append(np.ascontiguousarray(t, np.int64).tobytes())
    if w is not None:
        data.append(np.ascontiguousarray(w, np.float32).tobytes())
    proc = subprocess.run([str(exe)], input=b"".join(data), capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = np.frombuffer(proc.stdout, dtype=np.float32).astype(np.float64)
    return out[:R], out[R:].reshape(R, C)


def _logits(rng, R, C, offset):
    """fp32 logits at ``offset``: rows of offset + N(0, 4) (all equal in fp32 beyond ~1e8) and
    rows of offset * (1 + 1e-6 N(0, 1)) (a few ulps apart at any offset); as float64 copies of
    the fp32 values the kernels see."""
    x = np.empty((R, C))
    x[: R // 2] = offset + 4 * rng.standard_normal((R // 2, C))
    x[R // 2:] = (offset if offset else 1.0) * (1 + 1e-6 * rng.standard_normal((R - R // 2, C)))
    return x.astype(np.float32).astype(np.float64)


def _shifted(x):
    """``x`` minus its row maxima, exactly (fp32 values differ by at most 25 significant bits).
    Loss and gradient do not change under a shift, but the float64 reference does at 1e30: there
    lse = 1e30 + log C rounds to 1e30 in float64 too, so it is given the shifted rows."""
    return x - x.max(1, keepdims=True)


def _close(actual, expected, what):
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol("float32"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "K%d-T%d-V%d" % l)
@pytest.mark.parametrize("offset", OFFSETS)
def test_cross_entropy_at_offsets(harness, rng, layout, offset):
    K, T, VEC = layout
    R, C = 6, 1003  # ragged: C is no multiple of VEC or of K * VEC
    x = _logits(rng, R, C, offset)
    xs = _shifted(x)
    t = rng.integers(0, C, R)
    t[1] = -100  # an ignored row
    t[4] = C - 1  # a target in the ragged tail
    w = rng.uniform(0.5, 2.0, C).astype(np.float32).astype(np.float64)
    for kw in (dict(eps=0.1), dict(eps=0.1, w=w), dict(), dict(fast=True), dict(eps=0.1, w=w, fast=True)):
        loss, g = run(harness, "ce", x, t=t, K=K, T=T, VEC=VEC, **kw)
        rkw = dict(label_smoothing=kw.get("eps", 0.0), weight=kw.get("w"))
        _close(loss, ref.cross_entropy(xs, t, reduction="none", **rkw), f"loss {sorted(kw)}")
        _close(g, ref.cross_entropy_grad(xs, t, reduction="none", **rkw)[0], f"grad {sorted(kw)}")
    # probability targets (smoothed, weighted)
    d = rng.dirichlet(np.ones(C), R).astype(np.float32).astype(np.float64)
    loss, g = run(harness, "ce_prob", x, aux=d, w=w, K=K, T=T, VEC=VEC, eps=0.05)
    _close(loss, ref.cross_entropy(xs, d, weight=w, label_smoothing=0.05, reduction="none"), "prob loss")
    _close(g, ref.cross_entropy_grad(xs, d, weight=w, label_smoothing=0.05, reduction="none")[0], "prob grad")


def _bf16(x):
    """``x`` rounded to bfloat16 (nearest even, through float32), as float64: the values a bf16
    kernel sees (its arithmetic is fp32 on exactly widened bf16, as the harness's)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def _bf16_logits(rng, R, C, offset):
    """The GPU test's bf16 rows (tests/test_cupy_backend.py, _offset_logits): offset + N(0, 4),
    and offset (1 + 4 ulp N(0, 1)) with bf16's ulp 2^-7, so at 1e37 logits ~1e35-1e36 apart."""
    x = np.empty((R, C))
    x[: R // 2] = offset + 4 * rng.standard_normal((R // 2, C))
    x[R // 2:] = (offset or 1.0) * (1 + 4 * 2.0 ** -7 * rng.standard_normal((R - R // 2, C)))
    return _bf16(x)


@pytest.mark.parametrize("layout", [(1, 32, 1), (1, 64, 8), (2, 32, 8), (8, 32, 8)], ids=lambda l: "K%d-T%d-V%d" % l)
@pytest.mark.parametrize("offset", [1e30, 1e37, -1e37])
def test_bf16_spreads_at_offsets(harness, rng, layout, offset):
    """bf16 logits at a large offset keep only 8 significant bits, so near 1e37 they lie up to
    ~1e36 apart and the loss is that large (finite).  Label smoothing's sum_c w_c (z_c - m) is
    then ~C x 1e36, past fp32's 3.4e38 (1e39 at C = 1003): it gave an infinite loss (the bf16
    cases of test_gpu_precision_at_offsets on the H200) until the sum carried eps/C per term."""
    K, T, VEC = layout
    R, C = 6, 1003
    x = _bf16_logits(rng, R, C, offset)
    xs = _shifted(x)
    t = rng.integers(0, C, R)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32).astype(np.float64)
    for kw in (dict(eps=0.1), dict(eps=0.1, w=w), dict(), dict(eps=0.1, fast=True), dict(eps=0.1, w=w, fast=True)):
        loss, g = run(harness, "ce", x, t=t, K=K, T=T, VEC=VEC, **kw)
        rkw = dict(label_smoothing=kw.get("eps", 0.0), weight=kw.get("w"))
        _close(loss, ref.cross_entropy(xs, t, reduction="none", **rkw), f"loss {sorted(kw)}")
        _close(g, ref.cross_entropy_grad(xs, t, reduction="none", **rkw)[0], f"grad {sorted(kw)}")
    d = _bf16(rng.dirichlet(np.ones(C), R))
    loss, g = run(harness, "ce_prob", x, aux=d, w=w, K=K, T=T, VEC=VEC, eps=0.05)
    _close(loss, ref.cross_entropy(xs, d, weight=w, label_smoothing=0.05, reduction="none"), "prob loss")
    _close(g, ref.cross_entropy_grad(xs, d, weight=w, label_smoothing=0.05, reduction="none")[0], "prob grad")
    y = _bf16_logits(rng, R, C, offset)
    for op, aux, tref in (("kl_logits", y, _shifted(y)), ("kl_prob", d, d)):
        loss, g = run(harness, op, x, aux=aux, K=K, T=T, VEC=VEC, inv_t=0.5)
        kw = dict(temperature=2.0, reduction="none", target_is_logits=op == "kl_logits")
        _close(loss, ref.kl_div_with_logits(xs, tref, **kw), op)
        _close(g, ref.kl_div_with_logits_grad(xs, tref, **kw)[0], op + " grad")


@pytest.mark.parametrize("offset", [0.0, 1e5, -1e5])
def test_z_loss_at_offsets(harness, rng, offset):
    # z_loss lse^2 overflows fp32 (as it should) beyond |lse| ~ 1.8e19: moderate offsets only
    R, C = 4, 777
    x = _logits(rng, R, C, offset)
    t = rng.integers(0, C, R)
    loss, g = run(harness, "ce", x, t=t, K=2, T=32, VEC=4, eps=0.1, z_loss=1e-3)
    _close(loss, ref.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3, reduction="none"), "loss")
    _close(g, ref.cross_entropy_grad(x, t, label_smoothing=0.1, z_loss=1e-3, reduction="none")[0], "grad")


def test_no_z_loss_is_finite_at_huge_offsets(harness, rng):
    """z_loss = 0 contributes nothing, not 0 * lse^2 = 0 * inf = nan."""
    x = _logits(rng, 4, 100, 1e37)
    t = rng.integers(0, 100, 4)
    loss, _ = run(harness, "ce", x, t=t, K=1, T=32, VEC=4)
    _close(loss, ref.cross_entropy(_shifted(x), t, reduction="none"), "loss")


@pytest.mark.parametrize("layout", [(1, 32, 1), (2, 32, 4), (8, 32, 8)], ids=lambda l: "K%d-T%d-V%d" % l)
@pytest.mark.parametrize("offset", OFFSETS)
def test_kl_div_logits_at_offsets(harness, rng, layout, offset):
    K, T, VEC = layout
    R, C = 6, 1003
    x = _logits(rng, R, C, offset)
    # teacher logits near the student's (distillation), at the same offset
    y = (x + rng.standard_normal((R, C)) * (4 if offset == 0 else abs(offset) * 1e-6)).astype(np.float32)
    y = y.astype(np.float64)
    xs, ys = _shifted(x), _shifted(y)
    for temperature in (1.0, 2.0):
        loss, g = run(harness, "kl_logits", x, aux=y, K=K, T=T, VEC=VEC, inv_t=1 / temperature)
        _close(loss, ref.kl_div_with_logits(xs, ys, temperature, reduction="none"), "kl logits")
        _close(g, ref.kl_div_with_logits_grad(xs, ys, temperature, reduction="none")[0], "kl logits grad")
    d = rng.dirichlet(np.ones(C), R).astype(np.float32).astype(np.float64)
    loss, g = run(harness, "kl_prob", x, aux=d, K=K, T=T, VEC=VEC)
    _close(loss, ref.kl_div_with_logits(xs, d, reduction="none", target_is_logits=False), "kl prob")
    _close(g, ref.kl_div_with_logits_grad(xs, d, reduction="none", target_is_logits=False)[0], "kl prob grad")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "K%d-T%d-V%d" % l)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_fwd_bwd(harness, rng, layout, log):
    """The engines' order on the ops without max-relative sums (a check of the harness too)."""
    K, T, VEC = layout
    x = _logits(rng, 5, 517, 1e5)
    for fast in (False, True):
        _, y = run(harness, "softmax_fwd", x, K=K, T=T, VEC=VEC, log=log, fast=fast)
        _close(y, ref.log_softmax(_shifted(x)) if log else ref.softmax(x), "forward")
        y = y.astype(np.float32).astype(np.float64)
        dy = rng.standard_normal(x.shape).astype(np.float32).astype(np.float64)
        _, dx = run(harness, "softmax_bwd", y, aux=dy, K=K, T=T, VEC=VEC, log=log, fast=fast)
        expect = ref.log_softmax_backward(y, dy) if log else ref.softmax_backward(y, dy)
        np.testing.assert_allclose(dx, expect, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("offset", [1e5, 1e37])
def test_naive_sums_fail_here(rng, offset):
    """The smoothing term from raw-logit sums (eps/C (C lse - sum z), fp32, summed in order),
    on the test's own inputs, misses the tolerance (1e5) or is not finite (1e37): the tests
    above would catch a kernel that formed it that way."""
    R, C, eps = 6, 1003, 0.1
    x = _logits(rng, R, C, offset)
    x32 = x.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        m = x32.max(1)
        lse = m + np.log(np.exp(x32 - m[:, None]).sum(1, dtype=np.float32))
        naive = np.float32(eps / C) * (np.float32(C) * lse - np.cumsum(x32, 1, dtype=np.float32)[:, -1])
    xs = _shifted(x)
    exact = eps / C * (C * ref.logsumexp(xs) - xs.sum(1))
    rtol = tol("float32")["rtol"]
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(naive) | (np.abs(naive - exact) > 10 * rtol * np.abs(exact))
    assert bad.any()


@pytest.mark.parametrize("layout", [(1, 32, 1), (2, 32, 4), (8, 32, 8)], ids=lambda l: "K%d-T%d-V%d" % l)
def test_kl_div_logits_masked_teacher_classes(harness, rng, layout):
    """A class the teacher gives no probability (logit -inf, or probability
    0) adds nothing, also where the student's logit is -inf too: merging a
    masked teacher logit into the running (max, sum) multiplied its -inf
    term by exp(-inf) = 0, and a zero probability times the student's -inf
    made the row NaN."""
    K, T, VEC = layout
    R, C = 4, 301
    x = rng.standard_normal((R, C)).astype(np.float32).astype(np.float64)
    y = rng.standard_normal((R, C)).astype(np.float32).astype(np.float64)
    y[:, 1::3] = -np.inf
    y[0, 0] = -np.inf  # the row's first element masked too
    x[1, 1::6] = -np.inf  # the student's -inf where the teacher has no mass
    d = ref.softmax(y)
    for op, aux in (("kl_logits", y), ("kl_prob", d)):
        loss, g = run(harness, op, x, aux=aux, K=K, T=T, VEC=VEC)
        want = ref.kl_div_with_logits(x, aux, reduction="none", target_is_logits=op == "kl_logits")
        assert np.isfinite(want).all() and np.isfinite(loss).all() and np.isfinite(g).all(), op
        _close(loss, want, op)
        _close(g, ref.softmax(x) - d, op + " grad")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "K%d-T%d-V%d" % l)
@pytest.mark.parametrize("where", ["first", "first-vector", "middle"])
def test_nan_logit_propagates(harness, rng, layout, where):
    """A NaN logit makes its row's loss and every output NaN, as torch's: also when it is the
    first thing a thread folds, where the running max is still -inf and fmaxf(-inf, NaN) = -inf
    (the row's other values must not hide it).  Rows 1 and 3 stay finite."""
    K, T, VEC = layout
    R, C = 4, 301
    x = rng.standard_normal((R, C)).astype(np.float32).astype(np.float64)
    cols = {"first": [0], "first-vector": list(range(VEC)), "middle": [C // 2]}[where]
    for r in (0, 2):
        x[r, cols] = np.nan
    x[2, :C // 3] = -np.inf  # a NaN among -inf: the running max stays -inf past it
    x[2, C // 3:C // 3 + 3] = rng.standard_normal(3)
    if where != "middle":
        x[2, cols] = np.nan
    nan_rows = np.array([True, False, True, False])
    t = np.array([5, 6, 7, -100])  # the target never at the NaN: the NaN reaches the loss via lse
    y = rng.standard_normal((R, C))
    y_nan = y.copy()
    y_nan[0, cols] = np.nan
    checks = [("ce", dict(t=t)), ("ce", dict(t=t, eps=0.1)), ("softmax_fwd", {}), ("softmax_fwd", dict(log=True)),
              ("kl_logits", dict(aux=y))]
    for op, kw in checks:
        loss, out = run(harness, op, x, K=K, T=T, VEC=VEC, **kw)
        what = f"{op} {sorted(kw)}"
        assert np.isnan(out[nan_rows]).all(), what
        assert np.isfinite(out[~nan_rows]).all(), what
        if op != "softmax_fwd":
            assert np.isnan(loss[nan_rows]).all() and np.isfinite(loss[~nan_rows]).all(), what
    # a NaN teacher logit (student finite): that row's KL and gradient are NaN, as torch's
    xf = np.where(np.isnan(x), 0.0, x)
    xf[2] = rng.standard_normal(C)
    for temperature in (1.0, 2.0):
        loss, g = run(harness, "kl_logits", xf, aux=y_nan, K=K, T=T, VEC=VEC, inv_t=1 / temperature)
        assert np.isnan(loss[0]) and np.isnan(g[0]).all(), "NaN teacher"
        assert np.isfinite(loss[1:]).all() and np.isfinite(g[1:]).all(), "NaN teacher"


# ---------------------------------------------------------------------------------------------
# the element-wise losses (kernels/cuda/elementwise.cuh, run by tests/host/elementwise_harness.cpp)
# ---------------------------------------------------------------------------------------------

EW_HARNESS = ROOT / "tests" / "host" / "elementwise_harness.cpp"


@pytest.fixture(scope="module")
def ew_harness(tmp_path_factory):
    return _build(tmp_path_factory, EW_HARNESS)


def ew_run(exe, op, x, t, w=None, pw=None):
    """(loss, dx, dt) per element from the CUDA element code, float32 in and out (float64 copies)."""
    n = x.size
    w = np.ones(n) if w is None else w
    pw = np.ones(n) if pw is None else pw
    data = struct.pack("<2q", op, n) + b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in (x, t, w, pw))
    proc = subprocess.run([str(exe)], input=data, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = np.frombuffer(proc.stdout, dtype=np.float32).astype(np.float64)
    return out[:n], out[n:2 * n], out[2 * n:]


def _f32(*arrays):
    return [np.asarray(a, np.float64).astype(np.float32).astype(np.float64) for a in arrays]


def test_bce_with_logits_element_is_exact_in_both_tails(ew_harness):
    """The CUDA element code of BCE with logits, loss and both gradients, over both tails and
    x near 0, with weight and pos_weight: within float32 rounding of the float64 value, relative
    to each element.  Its single formulas lost the loss and dx of t = 0, x << 0 (0 where the
    value is 2e-9) and the target gradient next to x = 0 (1e-5 relative at |x| = 1e-3)."""
    import itertools
    xs = [-80, -40, -20, -15, -10, -5, -1, -1e-3, 0, 1e-3, 1, 5, 10, 20, 40, 80]
    g = np.array(list(itertools.product(xs, [0, 0.3, 1], [1, 2.5], [1, 3, 0.5])), dtype=np.float64)
    x, t, w, pw = _f32(*g.T)
    got = ew_run(ew_harness, 3, x, t, w, pw)
    # the float64 reference, per sign of x: exact where torch's float64 formulas cancel
    want = (ref.binary_cross_entropy_with_logits(x, t, w, pw, "none"),
            *ref.binary_cross_entropy_with_logits_grad(x, t, w, pw, "none"))
    for name, a, b in zip(("loss", "dx", "dt"), got, want):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=0, err_msg=name)
    # the reference is torch's function where torch's float64 evaluation is exact (|x| <= 10)
    torch = pytest.importorskip("torch")
    keep = np.abs(x) <= 10
    X, T = (torch.tensor(a[keep], requires_grad=True) for a in (x, t))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(X, T, torch.tensor(w[keep]),
                                                                pos_weight=torch.tensor(pw[keep]), reduction="none")
    gX, gT = torch.autograd.grad(loss.sum(), (X, T))
    for name, a, b in zip(("loss", "dx", "dt"), (loss.detach(), gX, gT), want):
        np.testing.assert_allclose(a.numpy(), b[keep], rtol=1e-9, atol=1e-12, err_msg=f"reference {name}")
    # special values as torch's: NaN stays NaN; the loss at x = -inf is NaN (-inf + inf)
    got = ew_run(ew_harness, 3, np.array([np.nan, -np.inf, np.inf]), np.array([0.5, 1.0, 0.0]))
    assert np.isnan([v[0] for v in got]).all()
    assert np.isnan(got[0][1]) and got[1][1] == -1 and got[2][1] == np.inf
    assert got[0][2] == np.inf and got[1][2] == 1 and got[2][2] == -np.inf


def test_bce_element_follows_torch(ew_harness):
    """The CUDA element code of BCE on probabilities against torch in float64: logs clamped at
    -100 in the loss only (the target gradient used the clamped logs: 100 where torch's is inf),
    the loss -(t lp + (1 - t) l1p), a NaN probability NaN (fmaxf dropped it: a finite 100)."""
    import itertools
    torch = pytest.importorskip("torch")
    ps = [0, 1e-30, 1e-8, 1e-3, 0.3, 0.5, 0.999, 1 - 2.0 ** -24, 1]
    g = np.array(list(itertools.product(ps, [0, 0.3, 1], [1, 2.5])), dtype=np.float64)
    p, t, w = _f32(*g.T)
    got = ew_run(ew_harness, 4, p, t, w)
    P, T = (torch.tensor(a, requires_grad=True) for a in (p, t))
    loss = torch.nn.functional.binary_cross_entropy(P, T, torch.tensor(w), reduction="none")
    gP, gT = torch.autograd.grad(loss.sum(), (P, T))
    for name, a, b in zip(("loss", "dp", "dt"), got, (loss.detach(), gP, gT)):
        np.testing.assert_allclose(a, b.numpy(), rtol=2e-5, atol=1e-30, err_msg=name)
    got = ew_run(ew_harness, 4, np.array([np.nan]), np.array([0.5]))
    assert all(np.isnan(v[0]) for v in got)


@pytest.mark.parametrize("op", [0, 1, 2])
def test_mse_and_kl_elements_follow_torch(ew_harness, rng, op):
    """MSE (0) and KL with probability (1) or log (2) targets, against torch in float64."""
    torch = pytest.importorskip("torch")
    x, t = _f32(rng.standard_normal(400) * 3, rng.uniform(0, 1, 400) if op == 1 else rng.standard_normal(400))
    if op == 1:
        t[:5] = 0.0  # 0 log 0 = 0; the target gradient there is NaN, as torch's
    got = ew_run(ew_harness, op, x, t)
    X, T = (torch.tensor(a, requires_grad=True) for a in (x, t))
    F = torch.nn.functional
    loss = F.mse_loss(X, T, reduction="none") if op == 0 else F.kl_div(X, T, reduction="none", log_target=op == 2)
    gX, gT = torch.autograd.grad(loss.sum(), (X, T))
    scale = 1 + np.abs(x) + np.abs(t)  # the terms' size: the loss is their difference
    for name, a, b, s in zip(("loss", "dx", "dt"), got, (loss.detach(), gX, gT), (scale ** 2, scale, scale ** 2)):
        b = b.numpy()
        assert (np.isnan(a) == np.isnan(b)).all(), name
        ok = ~np.isnan(b)
        if op == 0:
            np.testing.assert_allclose(a[ok], b[ok], rtol=2e-5, atol=0, err_msg=name)
        else:  # a difference of terms of size s: float32 rounding of those
            np.testing.assert_array_less(np.abs(a - b)[ok], 4e-6 * s[ok] + 1e-30, err_msg=name)
