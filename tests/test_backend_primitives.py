"""The backend contract, tested once for every backend.

Each test builds fresh random data in NumPy, rounds it to the storage dtype,
hands the rounded values to the float64 reference (:mod:`gpuloss.reference`)
and the backend's primitive (through the ``backend`` harness of
``conftest.py``), and compares.  Only the harness and the primitives of
:class:`gpuloss.backends.base.Backend` are used, so the numpy, triton and cupy
backends all run the same bodies.

Outputs are allocated by the backends, so instead of poisoning them the tests
check that every value expected to be finite is finite (an unwritten
``np.empty`` element shows up as a wrong value or a non-finite one).

Shapes stay small (R <= 16, C <= 300) so that the Triton interpreter runs the
suite in reasonable time; ``test_long_rows`` (C = 5000) covers the code paths
that loop over a row in several blocks.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpuloss import reference as ref

from conftest import tol
from prims import prim

DTYPES = ["float32", "float64", "float16", "bfloat16"]
REDUCTIONS = ["none", "mean", "sum"]
LOWP = ("float16", "bfloat16")

R_, C_ = 6, 263  # non-power-of-two class count


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 copy of ``a`` rounded to the storage ``dtype`` (what the
    backend will actually see)."""
    a = np.asarray(a, dtype=np.float64)
    if dtype == "bfloat16":
        # round to nearest even on the upper 16 bits of the float32 pattern
        u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    return a.astype(dtype).astype(np.float64)


def _dtype_name(a) -> str:
    name = str(a.dtype).replace("torch.", "")
    if type(a).__module__.startswith("cupy") and name == "int16":
        return "bfloat16"  # the cupy backend carries bf16 as its 16 bits in int16 (cupy has no bf16)
    return name


def _loss_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _np(backend, a) -> np.ndarray:
    out = backend.to_numpy(a)
    return None if out is None else np.asarray(out, dtype=np.float64)


def _check(backend, actual, expected, dtype: str, what: str = "", finite: bool = True) -> None:
    """``actual`` (native) against the float64 ``expected``."""
    assert actual is not None, f"{what}: backend returned None"
    a = _np(backend, actual)
    assert a.shape == np.shape(expected), f"{what}: shape {a.shape} != {np.shape(expected)}"
    if finite:
        assert np.isfinite(a).all(), f"{what}: non-finite values where finite ones are expected"
    np.testing.assert_allclose(a, expected, err_msg=what, **tol(dtype))


def _check_loss(backend, res_loss, expected, dtype: str, reduction: str, what: str = "loss",
                finite: bool = True) -> None:
    """Losses are float32 (float64 for float64 inputs) whatever the storage
    dtype: arithmetic is float32, so the float32 tolerance applies."""
    ld = _loss_dtype(dtype)
    assert _dtype_name(res_loss) == ld, f"{what}: dtype {_dtype_name(res_loss)}, expected {ld}"
    if reduction != "none":
        assert tuple(res_loss.shape) == (), f"{what}: reduced loss must be 0-d, got {tuple(res_loss.shape)}"
    _check(backend, res_loss, expected, ld, what, finite)


def _weight(backend, w: np.ndarray, dtype: str):
    """Class weights as the public API hands them: float32 (float64 for float64 inputs)."""
    wd = "float64" if dtype == "float64" else "float32"
    return backend.asarray(w, wd), _round(w, wd)


def _ce(backend, x, t, *, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
        reduction="mean", want_grad=True, grad_inplace=False, want_grad_target=False):
    return prim(backend.impl, "cross_entropy", 
        x, t, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, reduction=reduction, want_grad=want_grad, grad_inplace=grad_inplace,
        want_grad_target=want_grad_target)


def _class_targets(rng, R, C, n_ignored=1, ignore_index=-100):
    t = rng.integers(0, C, R)
    if n_ignored:
        t[rng.choice(R, n_ignored, replace=False)] = ignore_index
    return t


def _lse_ref(x, softcap=None):
    z = softcap * np.tanh(x / softcap) if softcap is not None else x
    return ref.logsumexp(z, -1)


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_forward(backend, rng, dtype, log):
    x = _round(rng.standard_normal((R_, C_)) * 4, dtype)
    y = prim(backend.impl, "softmax_forward", backend.asarray(x, dtype), log=log)
    assert _dtype_name(y) == dtype
    expected = ref.log_softmax(x) if log else ref.softmax(x)
    _check(backend, y, expected, dtype, "log_softmax" if log else "softmax")
    if not log:  # rows sum to one
        np.testing.assert_allclose(_np(backend, y).sum(-1), 1.0, rtol=0, atol=C_ * tol(dtype)["rtol"] / 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_backward(backend, rng, dtype, log):
    x = rng.standard_normal((R_, C_)) * 3
    y = _round(ref.log_softmax(x) if log else ref.softmax(x), dtype)
    dy = _round(rng.standard_normal((R_, C_)), dtype)
    dx = prim(backend.impl, "softmax_backward", backend.asarray(y, dtype), backend.asarray(dy, dtype), log=log)
    assert _dtype_name(dx) == dtype
    expected = (ref.log_softmax_backward if log else ref.softmax_backward)(y, dy)
    # dx is a difference of O(1) terms: compare with an atol relative to |dy|
    rtol, atol = tol(dtype)["rtol"], tol(dtype)["atol"]
    np.testing.assert_allclose(_np(backend, dx), expected, rtol=rtol, atol=max(atol, rtol))


@pytest.mark.parametrize("log", [False, True])
def test_softmax_extreme_and_one_row(backend, rng, log):
    x = rng.standard_normal((1, 257)) * 3
    x[0, :5] = [1e4, -1e4, -np.inf, 9990.0, -np.inf]
    y = prim(backend.impl, "softmax_forward", backend.asarray(x, "float32"), log=log)
    x32 = _round(x, "float32")
    expected = ref.log_softmax(x32) if log else ref.softmax(x32)
    a = _np(backend, y)
    assert a.shape == (1, 257)
    np.testing.assert_allclose(a, expected, **tol("float32"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("C", [301, 40000])
def test_nan_logits_propagate(backend, rng, dtype, C):
    """A NaN logit makes its row's loss and every output of the row NaN (torch's), wherever it
    sits: column 0, a first 16-byte vector of NaN (the first thing a GPU thread folds, while its
    running max is still -inf: fmaxf(-inf, NaN) = -inf dropped it in the CUDA kernels), or
    among -inf.  Rows 1 and 3 are finite and stay so.  The teacher logits of the KL too."""
    R = 4
    x = rng.standard_normal((R, C))
    x[0, 0] = np.nan
    x[2, :8] = np.nan
    x[2, 8:C // 2] = -np.inf
    nan_rows = np.array([True, False, True, False])
    xa = backend.asarray(x, dtype)
    t = backend.asarray(np.array([5, 6, 7, -100]))

    def rows_nan(a, what):
        a = _np(backend, a).reshape(R, -1)
        assert np.isnan(a[nan_rows]).all(), f"{what}: a NaN row has non-NaN values"
        assert np.isfinite(a[~nan_rows]).all(), f"{what}: a finite row has non-finite values"

    for log in (False, True):
        rows_nan(prim(backend.impl, "softmax_forward", xa, log=log), f"softmax log={log}")
    for ls in (0.0, 0.1):
        res = _ce(backend, xa, t, label_smoothing=ls, reduction="none")
        rows_nan(res.loss, f"CE loss ls={ls}")
        rows_nan(res.grad, f"CE grad ls={ls}")
    y = rng.standard_normal((R, C))
    res = prim(backend.impl, "kl_div_logits", xa, backend.asarray(y, dtype), temperature=1.0,
               target_is_logits=True, reduction="none", want_grad=True)
    rows_nan(res.loss, "KL loss")
    rows_nan(res.grad, "KL grad")
    xf = np.where(np.isnan(x), 0.0, x)  # finite student, NaN teacher rows
    res = prim(backend.impl, "kl_div_logits", backend.asarray(xf, dtype), xa, temperature=2.0,
               target_is_logits=True, reduction="none", want_grad=True)
    rows_nan(res.loss, "KL loss, NaN teacher")
    rows_nan(res.grad, "KL grad, NaN teacher")


def test_softmax_empty(backend):
    for log in (False, True):
        y = prim(backend.impl, "softmax_forward", backend.asarray(np.empty((0, 7)), "float32"), log=log)
        assert tuple(y.shape) == (0, 7)
        dx = prim(backend.impl, "softmax_backward", backend.asarray(np.empty((0, 7)), "float32"),
                                           backend.asarray(np.empty((0, 7)), "float32"), log=log)
        assert tuple(dx.shape) == (0, 7)


# --------------------------------------------------------------------------
# cross-entropy, class-index targets
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tdtype", ["int64", "int32"])
def test_cross_entropy_class_targets(backend, rng, dtype, reduction, tdtype):
    R, C = 11, 263
    x = _round(rng.standard_normal((R, C)) * 3, dtype)
    t = _class_targets(rng, R, C, n_ignored=2)
    res = _ce(backend, backend.asarray(x, dtype), backend.asarray(t, tdtype), reduction=reduction)
    _check_loss(backend, res.loss, ref.cross_entropy(x, t, reduction=reduction), dtype, reduction)
    assert _dtype_name(res.grad) == dtype
    _check(backend, res.grad, ref.cross_entropy_grad(x, t, reduction=reduction)[0], dtype, "grad")
    assert res.grad_target is None
    _check(backend, res.lse, _lse_ref(x), "float32", "lse")
    # float32; float64 inputs may carry their lse in float64 (base.py)
    assert _dtype_name(res.lse) in (("float32", "float64") if dtype == "float64" else ("float32",))


OPTIONS = {
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "weight+smoothing": dict(weight=True, label_smoothing=0.25),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "ignore_index=3": dict(ignore_index=3),
    "all": dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
}


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_options(backend, rng, opt, reduction, dtype):
    R, C = 9, 200
    kw = dict(OPTIONS[opt])
    x = _round(rng.standard_normal((R, C)) * 4, dtype)
    ignore_index = kw.pop("ignore_index", -100)
    t = _class_targets(rng, R, C, n_ignored=2, ignore_index=ignore_index)
    w_nat = w_ref = None
    if kw.pop("weight", False):
        w_nat, w_ref = _weight(backend, rng.uniform(0.2, 3.0, C), dtype)
    rkw = dict(kw, weight=w_ref, ignore_index=ignore_index, reduction=reduction)
    res = _ce(backend, backend.asarray(x, dtype), backend.asarray(t), **dict(rkw, weight=w_nat))
    _check_loss(backend, res.loss, ref.cross_entropy(x, t, **rkw), dtype, reduction)
    _check(backend, res.grad, ref.cross_entropy_grad(x, t, **rkw)[0], dtype, "grad")
    _check(backend, res.lse, _lse_ref(x, kw.get("softcap")), "float32", "lse")


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_options_low_precision(backend, rng, dtype, reduction):
    R, C = 7, 300
    x = _round(rng.standard_normal((R, C)) * 4, dtype)
    t = _class_targets(rng, R, C, n_ignored=1)
    w_nat, w_ref = _weight(backend, rng.uniform(0.2, 3.0, C), dtype)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction=reduction)
    res = _ce(backend, backend.asarray(x, dtype), backend.asarray(t), weight=w_nat, **kw)
    _check_loss(backend, res.loss, ref.cross_entropy(x, t, weight=w_ref, **kw), dtype, reduction)
    assert _dtype_name(res.grad) == dtype
    _check(backend, res.grad, ref.cross_entropy_grad(x, t, weight=w_ref, **kw)[0], dtype, "grad")


def test_cross_entropy_loss_only(backend, rng):
    x = _round(rng.standard_normal((5, 129)), "float32")
    t = _class_targets(rng, 5, 129, 0)
    res = _ce(backend, backend.asarray(x, "float32"), backend.asarray(t), want_grad=False)
    assert res.grad is None
    _check_loss(backend, res.loss, ref.cross_entropy(x, t), "float32", "mean")


def test_cross_entropy_one_row(backend, rng):
    x = _round(rng.standard_normal((1, 37)), "float32")
    t = np.array([rng.integers(37)])
    for reduction in REDUCTIONS:
        res = _ce(backend, backend.asarray(x, "float32"), backend.asarray(t), reduction=reduction,
                  label_smoothing=0.05)
        _check_loss(backend, res.loss, ref.cross_entropy(x, t, reduction=reduction, label_smoothing=0.05),
                    "float32", reduction)
        _check(backend, res.grad,
               ref.cross_entropy_grad(x, t, reduction=reduction, label_smoothing=0.05)[0], "float32", "grad")


@pytest.mark.parametrize("prob", [False, True])
def test_cross_entropy_empty(backend, prob):
    """R = 0 behaves as PyTorch: mean -> nan, sum -> 0, empty grads."""
    C = 10
    x = backend.asarray(np.empty((0, C)), "float32")
    t = backend.asarray(np.empty((0, C)), "float32") if prob else backend.asarray(np.empty(0, np.int64))
    for reduction, expected in (("mean", np.nan), ("sum", 0.0)):
        res = _ce(backend, x, t, reduction=reduction, want_grad_target=prob)
        val = _np(backend, res.loss)
        assert val.shape == ()
        np.testing.assert_equal(val, expected)
        assert tuple(res.grad.shape) == (0, C)
    res = _ce(backend, x, t, reduction="none")
    assert tuple(res.loss.shape) == (0,)


def test_cross_entropy_all_ignored(backend, rng):
    """Every row ignored: mean -> nan (0/0), sum -> 0, none -> zeros, grads zero."""
    R, C = 4, 50
    x = rng.standard_normal((R, C))
    t = np.full(R, -100)
    w_nat, _ = _weight(backend, rng.uniform(0.5, 2, C), "float32")
    for reduction in REDUCTIONS:
        for extra in (dict(), dict(weight=w_nat, label_smoothing=0.1, z_loss=1e-2)):
            res = _ce(backend, backend.asarray(x, "float32"), backend.asarray(t), reduction=reduction, **extra)
            val = _np(backend, res.loss)
            if reduction == "mean":
                assert np.isnan(val)
            else:
                np.testing.assert_array_equal(val, np.zeros(R) if reduction == "none" else 0.0)
            np.testing.assert_array_equal(_np(backend, res.grad), np.zeros((R, C)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cross_entropy_extreme_logits(backend, rng, dtype):
    """+-1e4 logits and -inf entries (in rows that are not all -inf)."""
    R, C = 6, 120
    x = rng.standard_normal((R, C))
    x[0, :3] = [1e4, -1e4, 9990.0]
    x[1, 5:9] = -np.inf
    x[2, :] -= 1e4          # a large common offset
    x[3, ::3] = -np.inf
    x[4, 7] = 1e4
    x = _round(x, dtype)
    t = rng.integers(0, C, R)
    t[1], t[3] = 2, 1       # targets on finite logits
    t[4] = 7                # target on the huge logit: loss ~ 0
    # The reference adds its label-smoothing term as 0 * (-sum log p) even when
    # label_smoothing = 0, which is 0 * inf = nan for a row with a -inf logit;
    # PyTorch skips the term.  -1e300 gives the reference the same softmax
    # (exp underflows to exactly 0) without the inf.
    x_ref = np.where(np.isneginf(x), -1e300, x)
    for kw in (dict(), dict(z_loss=1e-4)):
        for reduction in REDUCTIONS:
            res = _ce(backend, backend.asarray(x, dtype), backend.asarray(t), reduction=reduction, **kw)
            _check_loss(backend, res.loss, ref.cross_entropy(x_ref, t, reduction=reduction, **kw), dtype,
                        reduction)
            _check(backend, res.grad, ref.cross_entropy_grad(x_ref, t, reduction=reduction, **kw)[0], dtype,
                   "grad")
    # with label smoothing a -inf logit makes the loss +inf (as PyTorch), the gradient stays finite
    res = _ce(backend, backend.asarray(x, dtype), backend.asarray(t), reduction="none", label_smoothing=0.1)
    loss = _np(backend, res.loss)
    assert np.isposinf(loss[[1, 3]]).all() and np.isfinite(loss[[0, 2, 4, 5]]).all()
    _check(backend, res.grad, ref.cross_entropy_grad(x, t, reduction="none", label_smoothing=0.1)[0], dtype, "grad")


def test_zero_mean_divisor_with_z_loss_gives_nan_gradients(backend, rng):
    """Every valid target's class weight 0 ("mean" divides by 0): the loss and the valid rows'
    gradients are NaN as torch's, also with z_loss, whose nonzero term the NumPy backend scaled
    by 1/0 = inf into +-inf; the ignored row stays 0."""
    x = _round(rng.standard_normal((3, 5)), "float32")
    t = np.array([2, -100, 1])
    w = np.array([0.7, 0.0, 0.0, 1.0, 1.0])
    for z_loss in (0.0, 0.1):
        res = _ce(backend, backend.asarray(x, "float32"), backend.asarray(t), weight=backend.asarray(w, "float32"),
                  z_loss=z_loss, reduction="mean")
        g = _np(backend, res.grad)
        assert np.isnan(_np(backend, res.loss)), z_loss
        assert np.isnan(g[[0, 2]]).all() and (g[1] == 0).all(), (z_loss, g)


def test_cross_entropy_strided_rows(backend, rng):
    """x is a column slice of a wider buffer: rows are strided."""
    R, C, extra = 7, 150, 37
    big = _round(rng.standard_normal((R, C + extra)) * 3, "float32")
    xb = backend.asarray(big, "float32")
    x = xb[:, :C]
    t = _class_targets(rng, R, C, 1)
    tp = rng.dirichlet(np.ones(C), R)
    for reduction in REDUCTIONS:
        res = _ce(backend, x, backend.asarray(t), reduction=reduction, label_smoothing=0.1)
        xr = big[:, :C]
        _check_loss(backend, res.loss, ref.cross_entropy(xr, t, reduction=reduction, label_smoothing=0.1),
                    "float32", reduction)
        _check(backend, res.grad, ref.cross_entropy_grad(xr, t, reduction=reduction, label_smoothing=0.1)[0],
               "float32", "grad")
        # probability targets, themselves a strided slice
        tbig = np.concatenate([tp, rng.uniform(size=(R, 5))], axis=1)
        tn = backend.asarray(tbig, "float32")[:, :C]
        tp32 = _round(tp, "float32")
        res = _ce(backend, x, tn, reduction=reduction, want_grad_target=True)
        _check_loss(backend, res.loss, ref.cross_entropy(xr, tp32, reduction=reduction), "float32", reduction)
        gi, gt = ref.cross_entropy_grad(xr, tp32, reduction=reduction)
        _check(backend, res.grad, gi, "float32", "grad")
        _check(backend, res.grad_target, gt, "float32", "grad_target")
    # the wider buffer is untouched
    np.testing.assert_array_equal(_np(backend, xb), big)


def test_class_targets_strided(backend, rng):
    """Class-index targets that are a column of a wider integer array (``labels[:, 0]``): every
    row reads its own target, and "mean" divides by the weights of those targets."""
    R, C = 9, 40
    x = _round(rng.standard_normal((R, C)) * 2, "float32")
    t = _class_targets(rng, R, C, 2)
    other = rng.integers(0, C, R)
    other[t == -100] = 3  # the neighbours differ: reading them gives another loss
    wide = np.stack([t, other, -100 + 0 * other], axis=1)
    for tdtype in ("int64", "int32"):
        ts = backend.asarray(wide.astype(tdtype))[:, 0]
        w_nat, w_ref = _weight(backend, rng.uniform(0.2, 3, C), "float32")
        for reduction in REDUCTIONS:
            res = _ce(backend, backend.asarray(x, "float32"), ts, weight=w_nat, reduction=reduction)
            _check_loss(backend, res.loss, ref.cross_entropy(x, t, w_ref, reduction=reduction), "float32",
                        reduction)
            _check(backend, res.grad, ref.cross_entropy_grad(x, t, w_ref, reduction=reduction)[0], "float32",
                   "grad")
            logp = _round(ref.log_softmax(x), "float32")
            res = prim(backend.impl, "nll_loss", backend.asarray(logp, "float32"), ts, weight=w_nat,
                       ignore_index=-100, reduction=reduction, want_grad=True)
            _check_loss(backend, res.loss, ref.nll_loss(logp, t, w_ref, reduction=reduction), "float32", reduction)
            _check(backend, res.grad, ref.nll_loss_grad(logp, t, w_ref, reduction=reduction)[0], "float32", "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prob", [False, True])
def test_cross_entropy_grad_inplace(backend, rng, dtype, prob):
    R, C = 5, 190
    x = _round(rng.standard_normal((R, C)) * 3, dtype)
    if prob:
        t_np = _round(rng.dirichlet(np.ones(C), R), dtype)
        t = backend.asarray(t_np, dtype)
    else:
        t_np = _class_targets(rng, R, C, 1)
        t = backend.asarray(t_np)
    kw = dict(label_smoothing=0.1, softcap=4.0, reduction="mean")
    xn = backend.asarray(x, dtype)
    res = _ce(backend, xn, t, grad_inplace=True, **kw)
    expected = ref.cross_entropy_grad(x, t_np, **kw)[0]
    _check(backend, res.grad, expected, dtype, "grad")
    _check(backend, xn, expected, dtype, "x after grad_inplace")
    _check_loss(backend, res.loss, ref.cross_entropy(x, t_np, **kw), dtype, "mean")


def test_cross_entropy_out_of_range_target(backend, rng):
    """A target outside [0, C) that is not ignore_index gives a NaN loss and a
    NaN gradient row, never a crash or an out-of-bounds read."""
    R, C = 6, 40
    x = _round(rng.standard_normal((R, C)), "float32")
    t = rng.integers(0, C, R)
    t[1], t[3], t[5] = C, -5, -100
    res = _ce(backend, backend.asarray(x, "float32"), backend.asarray(t), reduction="none")
    loss, grad = _np(backend, res.loss), _np(backend, res.grad)
    assert np.isnan(loss[[1, 3]]).all()
    assert np.isnan(grad[[1, 3]]).all()
    good = [0, 2, 4, 5]
    tg = t.copy()
    tg[[1, 3]] = -100
    np.testing.assert_allclose(loss[good], ref.cross_entropy(x, tg, reduction="none")[good], **tol("float32"))
    np.testing.assert_allclose(grad[good], ref.cross_entropy_grad(x, tg, reduction="none")[0][good],
                               **tol("float32"))
    for reduction in ("mean", "sum"):
        res = _ce(backend, backend.asarray(x, "float32"), backend.asarray(t), reduction=reduction)
        assert np.isnan(_np(backend, res.loss))


# --------------------------------------------------------------------------
# cross-entropy, probability targets
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_prob_targets(backend, rng, dtype, reduction):
    R, C = 8, 230
    x = _round(rng.standard_normal((R, C)) * 3, dtype)
    tp = _round(rng.dirichlet(np.ones(C) * 0.5, R), dtype)
    res = _ce(backend, backend.asarray(x, dtype), backend.asarray(tp, dtype), reduction=reduction,
              want_grad_target=True)
    _check_loss(backend, res.loss, ref.cross_entropy(x, tp, reduction=reduction), dtype, reduction)
    gi, gt = ref.cross_entropy_grad(x, tp, reduction=reduction)
    assert _dtype_name(res.grad) == dtype and _dtype_name(res.grad_target) == dtype
    _check(backend, res.grad, gi, dtype, "grad")
    _check(backend, res.grad_target, gt, dtype, "grad_target")
    _check(backend, res.lse, _lse_ref(x), "float32", "lse")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_prob_targets_options(backend, rng, reduction, dtype):
    R, C = 6, 171
    x = _round(rng.standard_normal((R, C)) * 3, dtype)
    tp = _round(rng.dirichlet(np.ones(C), R), dtype)
    w_nat, w_ref = _weight(backend, rng.uniform(0.2, 3.0, C), dtype)
    kw = dict(label_smoothing=0.2, z_loss=1e-2, softcap=4.0, reduction=reduction)
    res = _ce(backend, backend.asarray(x, dtype), backend.asarray(tp, dtype), weight=w_nat,
              want_grad_target=True, **kw)
    _check_loss(backend, res.loss, ref.cross_entropy(x, tp, weight=w_ref, **kw), dtype, reduction)
    gi, gt = ref.cross_entropy_grad(x, tp, weight=w_ref, **kw)
    _check(backend, res.grad, gi, dtype, "grad")
    _check(backend, res.grad_target, gt, dtype, "grad_target")
    res = _ce(backend, backend.asarray(x, dtype), backend.asarray(tp, dtype), weight=w_nat, **kw)
    assert res.grad_target is None


# --------------------------------------------------------------------------
# nll_loss, kl_div_logits
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss(backend, rng, dtype, reduction, weighted):
    R, C = 10, 77
    logp = _round(ref.log_softmax(rng.standard_normal((R, C)) * 2), dtype)
    t = _class_targets(rng, R, C, 2)
    w_nat, w_ref = _weight(backend, rng.uniform(0.2, 3, C), dtype) if weighted else (None, None)
    res = prim(backend.impl, "nll_loss", backend.asarray(logp, dtype), backend.asarray(t), weight=w_nat,
                                ignore_index=-100, reduction=reduction, want_grad=True)
    _check_loss(backend, res.loss, ref.nll_loss(logp, t, w_ref, reduction=reduction), dtype, reduction)
    assert _dtype_name(res.grad) == dtype
    _check(backend, res.grad, ref.nll_loss_grad(logp, t, w_ref, reduction=reduction)[0], dtype, "grad")


def test_nll_loss_edge_cases(backend, rng):
    C = 20
    logp = _round(ref.log_softmax(rng.standard_normal((4, C))), "float32")
    # out-of-range target -> NaN row; all ignored -> mean nan, zero grad
    t = np.array([3, C + 2, -100, 0])
    res = prim(backend.impl, "nll_loss", backend.asarray(logp, "float32"), backend.asarray(t), weight=None,
                                ignore_index=-100, reduction="none", want_grad=True)
    loss, grad = _np(backend, res.loss), _np(backend, res.grad)
    assert np.isnan(loss[1]) and np.isnan(grad[1]).all()
    np.testing.assert_allclose(loss[[0, 2, 3]], [-logp[0, 3], 0.0, -logp[3, 0]], **tol("float32"))
    res = prim(backend.impl, "nll_loss", backend.asarray(logp, "float32"), backend.asarray(np.full(4, -100)),
                                weight=None, ignore_index=-100, reduction="mean", want_grad=True)
    assert np.isnan(_np(backend, res.loss))
    np.testing.assert_array_equal(_np(backend, res.grad), 0.0)
    res = prim(backend.impl, "nll_loss", backend.asarray(np.empty((0, C)), "float32"),
                                backend.asarray(np.empty(0, np.int64)), weight=None, ignore_index=-100,
                                reduction="sum", want_grad=True)
    np.testing.assert_equal(_np(backend, res.loss), 0.0)
    assert tuple(res.grad.shape) == (0, C)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("target_is_logits", [True, False])
def test_kl_div_logits(backend, rng, dtype, reduction, target_is_logits):
    R, C, T = 7, 211, 1.7
    x = _round(rng.standard_normal((R, C)) * 3, dtype)
    if target_is_logits:
        tg = _round(rng.standard_normal((R, C)) * 3, dtype)
    else:
        tg = rng.dirichlet(np.ones(C), R)
        tg[0, :10] = 0.0  # 0 log 0 = 0
        tg = _round(tg, dtype)
    res = prim(backend.impl, "kl_div_logits", backend.asarray(x, dtype), backend.asarray(tg, dtype), temperature=T,
                                     target_is_logits=target_is_logits, reduction=reduction, want_grad=True)
    expected = ref.kl_div_logits(x, tg, T, reduction, target_is_logits)
    # KL is a difference of O(log C) terms: an atol scaled to them
    ld = _loss_dtype(dtype)
    a = _np(backend, res.loss)
    assert _dtype_name(res.loss) == ld and a.shape == np.shape(expected)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, expected, rtol=tol(ld)["rtol"], atol=10 * tol(ld)["rtol"])
    assert _dtype_name(res.grad) == dtype
    _check(backend, res.grad, ref.kl_div_logits_grad(x, tg, T, reduction, target_is_logits)[0], dtype, "grad")
    if res.lse is not None:
        _check(backend, res.lse, ref.logsumexp(x / T), "float32", "lse of x / T")


def test_kl_div_logits_nonnegative_and_zero_at_equal(backend, rng):
    x = _round(rng.standard_normal((5, 64)) * 2, "float32")
    res = prim(backend.impl, "kl_div_logits", backend.asarray(x, "float32"), backend.asarray(x, "float32"),
                                     temperature=2.0, target_is_logits=True, reduction="none", want_grad=True)
    np.testing.assert_allclose(_np(backend, res.loss), 0.0, atol=1e-5)
    np.testing.assert_allclose(_np(backend, res.grad), 0.0, atol=1e-6)


# --------------------------------------------------------------------------
# element-wise losses
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(backend, rng, dtype, reduction, log_target):
    R, C = 6, 150
    logp = _round(ref.log_softmax(rng.standard_normal((R, C)) * 2), dtype)
    if log_target:
        tg = _round(ref.log_softmax(rng.standard_normal((R, C)) * 2), dtype)
    else:
        tg = rng.dirichlet(np.ones(C), R)
        tg[1, :4] = 0.0
        tg = _round(tg, dtype)
    res = prim(backend.impl, "kl_div", backend.asarray(logp, dtype), backend.asarray(tg, dtype), log_target=log_target,
                              reduction=reduction, want_grad=True, want_grad_target=True)
    ld = _loss_dtype(dtype)
    exp_loss = ref.kl_div(logp, tg, reduction, log_target)
    a = _np(backend, res.loss)
    assert a.shape == np.shape(exp_loss)
    np.testing.assert_allclose(a, exp_loss, rtol=tol(ld)["rtol"], atol=10 * tol(ld)["atol"])
    gi, gt = ref.kl_div_grad(logp, tg, reduction, log_target)
    _check(backend, res.grad, gi, dtype, "grad")
    # log(0) = -inf in the target gradient where the target is 0 (as the reference)
    _check(backend, res.grad_target, gt, dtype, "grad_target", finite=log_target)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", ["none", "weight(C)", "weight(R,C)+pos_weight", "pos_weight"])
def test_bce_with_logits(backend, rng, dtype, reduction, weights):
    R, C = 6, 131
    x = rng.standard_normal((R, C)) * 4
    x[0, :4] = [30.0, -30.0, 80.0, -80.0]
    x = _round(x, dtype)
    y = _round(rng.uniform(0, 1, (R, C)), dtype)
    wd = "float64" if dtype == "float64" else "float32"
    w = pw = None
    if weights == "weight(C)":
        w = _round(rng.uniform(0.2, 2, C), wd)
    if weights == "weight(R,C)+pos_weight":
        w = _round(rng.uniform(0.2, 2, (R, C)), wd)
    if "pos_weight" in weights:
        pw = _round(rng.uniform(0.5, 4, C), wd)
    res = prim(backend.impl, "bce_with_logits", 
        backend.asarray(x, dtype), backend.asarray(y, dtype),
        weight=None if w is None else backend.asarray(w, wd),
        pos_weight=None if pw is None else backend.asarray(pw, wd),
        reduction=reduction, want_grad=True, want_grad_target=True)
    _check_loss(backend, res.loss, ref.binary_cross_entropy_with_logits(x, y, w, pw, reduction), dtype, reduction)
    gi, gt = ref.binary_cross_entropy_with_logits_grad(x, y, w, pw, reduction)
    _check(backend, res.grad, gi, dtype, "grad")
    _check(backend, res.grad_target, gt, dtype, "grad_target")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_bce(backend, rng, dtype, reduction, weighted):
    R, C = 6, 97
    p = _round(rng.uniform(0.02, 0.98, (R, C)), dtype)
    y = _round(rng.uniform(0, 1, (R, C)), dtype)
    wd = "float64" if dtype == "float64" else "float32"
    w = _round(rng.uniform(0.2, 2, C), wd) if weighted else None
    res = prim(backend.impl, "bce", backend.asarray(p, dtype), backend.asarray(y, dtype),
                           weight=None if w is None else backend.asarray(w, wd), reduction=reduction,
                           want_grad=True, want_grad_target=True)
    _check_loss(backend, res.loss, ref.binary_cross_entropy(p, y, w, reduction), dtype, reduction)
    gi, gt = ref.binary_cross_entropy_grad(p, y, w, reduction)
    _check(backend, res.grad, gi, dtype, "grad")
    _check(backend, res.grad_target, gt, dtype, "grad_target")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bce_with_logits_in_both_tails(backend, dtype):
    """BCE with logits formed loss (1 - t) x + lw softplus(-x), dx (1 - t) - lw sigmoid(-x) and
    dt -x + (pw - 1) softplus(-x) everywhere: the loss and dx of t = 0, x << 0 came out 0 (fp32
    x = -20: values 2e-9; torch's dx is exact there) and dt lost digits next to x = 0 with
    pos_weight.  Each is now formed per sign of x; every element within rounding, relatively,
    of the float64 reference (itself per sign of x), with and without pos_weight."""
    xs = np.array([-80.0, -40.0, -30.0, -20.0, -15.0, -10.0, -5.0, -1e-3, 1e-3, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0])
    x = _round(np.stack([xs, xs]), dtype)
    y = np.stack([np.zeros_like(xs), np.ones_like(xs)])  # (a soft t cancels near dx = 0 in any form)
    for pw in (None, _round(np.full(xs.size, 3.0), dtype)):
        res = prim(backend.impl, "bce_with_logits", backend.asarray(x, dtype), backend.asarray(y, dtype),
                   weight=None, pos_weight=None if pw is None else backend.asarray(pw, dtype), reduction="none",
                   want_grad=True, want_grad_target=True)
        want = (ref.binary_cross_entropy_with_logits(x, y, None, pw, "none"),
                *ref.binary_cross_entropy_with_logits_grad(x, y, None, pw, "none"))
        for what, got, w in zip(("loss", "grad", "grad_target"), (res.loss, res.grad, res.grad_target), want):
            np.testing.assert_allclose(_np(backend, got), w, rtol=4 * tol(dtype)["rtol"] if dtype == "float32"
                                       else 1e-12, atol=0, err_msg=f"{what}, pos_weight={pw is not None}")


def test_bce_target_gradient_unclamped_and_nan_probabilities(backend):
    """binary_cross_entropy: the target's gradient log(1 - p) - log p is unclamped, as torch's
    (+-inf at p = 0, 1; the CUDA kernel used the -100-clamped logs: 100 and -100); a NaN
    probability gives a NaN loss (a max that drops NaN turned it into a finite 100); the loss
    -log p at t = 1 keeps its precision next to p = 1 (t (l1p - lp) - l1p cancelled it)."""
    p = np.array([[0.0, 1.0, 1e-30, 0.5, np.nan, 1 - 2.0 ** -24]])
    y = np.array([[0.5, 0.5, 0.5, 0.5, 0.5, 1.0]])
    res = prim(backend.impl, "bce", backend.asarray(p, "float32"), backend.asarray(y, "float32"), weight=None,
               reduction="none", want_grad=True, want_grad_target=True)
    gt, loss = _np(backend, res.grad_target)[0], _np(backend, res.loss)[0]
    assert gt[0] == np.inf and gt[1] == -np.inf, gt
    np.testing.assert_allclose(gt[2:4], [np.log1p(-1e-30) - np.log(np.float32(1e-30)), 0.0], rtol=1e-6, atol=1e-6)
    assert np.isnan(loss[4]) and np.isnan(gt[4]) and np.isfinite(loss[[0, 1, 2, 3, 5]]).all(), loss
    np.testing.assert_allclose(loss[5], -np.log1p(-2.0 ** -24), rtol=1e-6)


def test_bce_log_clamp(backend):
    """p = 0 and p = 1: each log is clamped at -100 (PyTorch), the loss stays finite."""
    p = np.array([[0.0, 1.0, 0.0, 1.0, 0.5]])
    y = np.array([[1.0, 0.0, 0.0, 1.0, 0.25]])
    res = prim(backend.impl, "bce", backend.asarray(p, "float32"), backend.asarray(y, "float32"), weight=None,
                           reduction="none", want_grad=False)
    _check(backend, res.loss, ref.binary_cross_entropy(p, y, reduction="none"), "float32", "loss")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse(backend, rng, dtype, reduction):
    R, C = 5, 121
    x = _round(rng.standard_normal((R, C)) * 2, dtype)
    y = _round(rng.standard_normal((R, C)), dtype)
    res = prim(backend.impl, "mse", backend.asarray(x, dtype), backend.asarray(y, dtype), reduction=reduction,
                           want_grad=True, want_grad_target=True)
    _check_loss(backend, res.loss, ref.mse_loss(x, y, reduction), dtype, reduction)
    gi, gt = ref.mse_loss_grad(x, y, reduction)
    _check(backend, res.grad, gi, dtype, "grad")
    _check(backend, res.grad_target, gt, dtype, "grad_target")
    res = prim(backend.impl, "mse", backend.asarray(x, dtype), backend.asarray(y, dtype), reduction=reduction,
                           want_grad=False)
    assert res.grad is None and res.grad_target is None


def test_elementwise_empty(backend):
    e = backend.asarray(np.empty((0, 5)), "float32")
    for call in (lambda r: prim(backend.impl, "mse", e, e, reduction=r, want_grad=True),
                 lambda r: prim(backend.impl, "bce_with_logits", e, e, weight=None, pos_weight=None, reduction=r,
                                                        want_grad=True),
                 lambda r: prim(backend.impl, "kl_div", e, e, log_target=False, reduction=r, want_grad=True)):
        assert np.isnan(_np(backend, call("mean").loss))
        np.testing.assert_equal(_np(backend, call("sum").loss), 0.0)
        assert tuple(call("none").grad.shape) == (0, 5)


# --------------------------------------------------------------------------
# inputs are never written (except x under grad_inplace)
# --------------------------------------------------------------------------

def test_inputs_unchanged(backend, rng):
    R, C = 5, 140
    x_np = _round(rng.standard_normal((R, C)) * 3, "float32")
    tp_np = _round(rng.dirichlet(np.ones(C), R), "float32")
    t_np = _class_targets(rng, R, C, 1)
    w_np = _round(rng.uniform(0.5, 2, C), "float32")
    x, tp, t, w = (backend.asarray(x_np, "float32"), backend.asarray(tp_np, "float32"),
                   backend.asarray(t_np), backend.asarray(w_np, "float32"))
    impl = backend.impl
    prim(impl, "softmax_forward", x, log=False)
    prim(impl, "softmax_backward", tp, x, log=True)
    prim(impl, "softmax_backward", tp, x, log=False)
    for prob_t in (t, tp):
        _ce(backend, x, prob_t, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
            want_grad_target=prob_t is tp)
    prim(impl, "nll_loss", x, t, weight=w, ignore_index=-100, reduction="mean", want_grad=True)
    prim(impl, "kl_div_logits", x, tp, temperature=2.0, target_is_logits=True, reduction="sum", want_grad=True)
    prim(impl, "kl_div_logits", x, tp, temperature=2.0, target_is_logits=False, reduction="sum", want_grad=True)
    prim(impl, "kl_div", x, tp, log_target=False, reduction="sum", want_grad=True, want_grad_target=True)
    prim(impl, "bce_with_logits", x, tp, weight=w, pos_weight=w, reduction="sum", want_grad=True, want_grad_target=True)
    prim(impl, "bce", tp, tp, weight=w, reduction="sum", want_grad=True, want_grad_target=True)
    prim(impl, "mse", x, tp, reduction="sum", want_grad=True, want_grad_target=True)
    np.testing.assert_array_equal(_np(backend, x), x_np)
    np.testing.assert_array_equal(_np(backend, tp), tp_np)
    np.testing.assert_array_equal(backend.to_numpy(t), t_np)
    np.testing.assert_array_equal(_np(backend, w), w_np)


# --------------------------------------------------------------------------
# rows longer than one block
# --------------------------------------------------------------------------

def test_long_rows(backend, rng):
    """C = 5000: more than one block per row for block-looping kernels."""
    R, C = 3, 5000
    x = _round(rng.standard_normal((R, C)) * 3, "float32")
    x[1, 4000:4100] = -50.0
    t = np.array([17, 4999, 2500])
    tp = _round(rng.dirichlet(np.ones(C), R), "float32")
    w_nat, w_ref = _weight(backend, rng.uniform(0.5, 2, C), "float32")
    xn = backend.asarray(x, "float32")
    kw = dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    res = _ce(backend, xn, backend.asarray(t), weight=w_nat, **kw)
    _check_loss(backend, res.loss, ref.cross_entropy(x, t, weight=w_ref, **kw), "float32", "sum")
    _check(backend, res.grad, ref.cross_entropy_grad(x, t, weight=w_ref, **kw)[0], "float32", "grad")
    _check(backend, res.lse, _lse_ref(x), "float32", "lse")
    xs = x
    res = _ce(backend, backend.asarray(xs, "float32"), backend.asarray(tp, "float32"), softcap=6.0,
              want_grad_target=True, reduction="mean")
    gi, gt = ref.cross_entropy_grad(xs, tp, softcap=6.0)
    _check_loss(backend, res.loss, ref.cross_entropy(xs, tp, softcap=6.0), "float32", "mean")
    _check(backend, res.grad, gi, "float32", "grad")
    _check(backend, res.grad_target, gt, "float32", "grad_target")
    x[1, 4000:4100] = -np.inf  # a -inf run inside a long row
    xn = backend.asarray(x, "float32")
    for log in (False, True):
        y = prim(backend.impl, "softmax_forward", xn, log=log)
        _check(backend, y, ref.log_softmax(x) if log else ref.softmax(x), "float32", "softmax", finite=False)
        dy = _round(rng.standard_normal((R, C)), "float32")
        y64 = _round(_np(backend, y), "float32")
        dx = prim(backend.impl, "softmax_backward", backend.asarray(y64, "float32"), backend.asarray(dy, "float32"), log=log)
        exp_dx = (ref.log_softmax_backward if log else ref.softmax_backward)(y64, dy)
        np.testing.assert_allclose(_np(backend, dx), exp_dx, rtol=2e-5, atol=1e-5)
    xk = _round(rng.standard_normal((R, C)) * 3, "float32")
    tk = _round(rng.standard_normal((R, C)) * 3, "float32")
    res = prim(backend.impl, "kl_div_logits", backend.asarray(xk, "float32"), backend.asarray(tk, "float32"),
                                     temperature=1.5, target_is_logits=True, reduction="none", want_grad=True)
    np.testing.assert_allclose(_np(backend, res.loss), ref.kl_div_logits(xk, tk, 1.5, "none"), rtol=2e-5, atol=1e-4)
    _check(backend, res.grad, ref.kl_div_logits_grad(xk, tk, 1.5, "none")[0], "float32", "grad")


@pytest.mark.parametrize("op", ["mse", "bce_with_logits", "bce"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_elementwise_grad_scale_scales_the_gradients_only(backend, rng, op, reduction):
    """``ReductionOptions.grad_scale`` multiplies the gradients (both of them)
    and leaves the loss as it is (mse_loss's fp16 "mean" path saves x - y
    with 0.5): exactly, a power of two, on every backend."""
    R, C = 5, 37
    x = _round(rng.uniform(0.05, 0.95, (R, C)), "float32")
    y = _round(rng.uniform(0, 1, (R, C)), "float32")
    args = [backend.asarray(x, "float32"), backend.asarray(y, "float32")]
    kw = dict(reduction=reduction, want_grad=True, want_grad_target=True)
    full = prim(backend.impl, op, *args, **kw)
    half = prim(backend.impl, op, *args, grad_scale=0.5, **kw)
    np.testing.assert_array_equal(_np(backend, half.loss), _np(backend, full.loss))
    np.testing.assert_array_equal(_np(backend, half.grad), 0.5 * _np(backend, full.grad))
    np.testing.assert_array_equal(_np(backend, half.grad_target), 0.5 * _np(backend, full.grad_target))
