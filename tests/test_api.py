"""The public API: argument validation, layouts, array kinds, the dispatcher.

Numerical agreement of every primitive on every backend is in
test_backend_primitives.py; here the functions are exercised end to end on
the arrays a user passes."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gpuloss
from gpuloss import dispatch
from gpuloss import reference as R

T32 = dict(rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ import

def test_import_is_light():
    """import gpuloss imports no torch, triton, cupy or transformers and touches no GPU;
    neither does import gpuloss.integrations (each integration is its own module)."""
    code = ("import sys, gpuloss, gpuloss.integrations; "
            "bad=[m for m in ('torch','triton','cupy','transformers') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_submodules_load_on_attribute_access():
    """After a plain ``import gpuloss`` (torch not imported), ``gpuloss.nn.X`` and
    ``gpuloss.distributed.Y`` work as ``torch.nn.X`` after ``import torch``: the
    submodule is imported on first access; unknown names still raise AttributeError."""
    pytest.importorskip("torch")
    code = ("import sys, gpuloss\n"
            "assert 'torch' not in sys.modules and 'gpuloss.nn' not in sys.modules\n"
            "assert 'nn' in dir(gpuloss)\n"
            "import torch\n"
            "loss = gpuloss.nn.CrossEntropyLoss()(torch.zeros(2, 3), torch.tensor([0, 2]))\n"
            "assert abs(loss.item() - float(torch.log(torch.tensor(3.0)))) < 1e-6\n"
            "assert callable(gpuloss.distributed.vocab_parallel_cross_entropy)\n"
            "try:\n    gpuloss.no_such_thing\nexcept AttributeError as e:\n    assert 'no_such_thing' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------ layouts

@pytest.mark.parametrize("shape", [(7,), (6, 7), (3, 7, 2, 4)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_layouts_numpy(rng, shape, reduction):
    x = rng.standard_normal(shape).astype(np.float32)
    C = shape[1] if len(shape) > 1 else shape[0]
    tshape = (shape[0],) + shape[2:] if len(shape) > 1 else ()
    t = rng.integers(0, C, tshape)
    x0 = x.copy()
    out = gpuloss.cross_entropy(x, t, reduction=reduction, return_grad=True)
    assert isinstance(out, gpuloss.LossGrad)
    assert out.loss.dtype == np.float32 and out.grad.dtype == np.float32
    assert out.loss.shape == R.cross_entropy(x, t, reduction=reduction).shape
    assert out.grad.shape == x.shape
    np.testing.assert_allclose(out.loss, R.cross_entropy(x, t, reduction=reduction), **T32)
    np.testing.assert_allclose(out.grad, R.cross_entropy_grad(x, t, reduction=reduction)[0], **T32)
    np.testing.assert_array_equal(x, x0)  # inputs never modified
    plain = gpuloss.cross_entropy(x, t, reduction=reduction)
    np.testing.assert_allclose(plain, out.loss, rtol=1e-6)


def test_probability_targets_and_grad_target(rng):
    x = rng.standard_normal((4, 6, 3))
    d = R.softmax(rng.standard_normal((4, 6, 3)), 1)
    out = gpuloss.cross_entropy(x, d, label_smoothing=0.2, return_grad="all")
    gi, gt = R.cross_entropy_grad(x, d, label_smoothing=0.2)
    np.testing.assert_allclose(out.loss, R.cross_entropy(x, d, label_smoothing=0.2), rtol=1e-10)
    np.testing.assert_allclose(out.grad, gi, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out.grad_target, gt, rtol=1e-10, atol=1e-13)
    assert gpuloss.cross_entropy(x, d, return_grad=True).grad_target is None


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_any_dim_and_backward(rng, dim):
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    y = gpuloss.softmax(x, dim=dim)
    np.testing.assert_allclose(y, R.softmax(x, dim), **T32)
    ly = gpuloss.log_softmax(x, dim=dim)
    np.testing.assert_allclose(ly, R.log_softmax(x, dim), rtol=2e-5, atol=2e-5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(gpuloss.softmax_backward(dy, y, dim=dim), R.softmax_backward(y, dy, dim), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(gpuloss.log_softmax_backward(dy, ly, dim=dim), R.log_softmax_backward(ly, dy, dim),
                               rtol=1e-4, atol=1e-5)


def test_elementwise_losses_match_reference(rng):
    x = rng.standard_normal((5, 7))
    t = rng.uniform(0, 1, (5, 7))
    w = rng.uniform(0.5, 2, (5, 1))
    pw = rng.uniform(0.5, 2, 7)
    o = gpuloss.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw, reduction="none", return_grad="all")
    np.testing.assert_allclose(o.loss, R.binary_cross_entropy_with_logits(x, t, w, pw, "none"), rtol=1e-10)
    gi, gt = R.binary_cross_entropy_with_logits_grad(x, t, w, pw, "none")
    np.testing.assert_allclose(o.grad, gi, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(o.grad_target, gt, rtol=1e-10, atol=1e-13)
    p = R.softmax(x)
    o = gpuloss.binary_cross_entropy(p, t, return_grad=True)
    np.testing.assert_allclose(o.loss, R.binary_cross_entropy(p, t), rtol=1e-10)
    o = gpuloss.mse_loss(x, t, reduction="sum", return_grad="all")
    np.testing.assert_allclose(o.loss, R.mse_loss(x, t, "sum"), rtol=1e-12)
    np.testing.assert_allclose(o.grad_target, -o.grad)
    lp = R.log_softmax(x)
    o = gpuloss.kl_div(lp, p, reduction="batchmean", return_grad=True)
    np.testing.assert_allclose(o.loss, R.kl_div(lp, p, "batchmean"), rtol=1e-10)
    np.testing.assert_allclose(o.grad, R.kl_div_grad(lp, p, "batchmean")[0], rtol=1e-10)
    o = gpuloss.kl_div_with_logits(x, t * 3, temperature=2.0, return_grad=True)
    np.testing.assert_allclose(o.loss, R.kl_div_with_logits(x, t * 3, 2.0), rtol=1e-10)
    np.testing.assert_allclose(o.grad, R.kl_div_with_logits_grad(x, t * 3, 2.0)[0], rtol=1e-9, atol=1e-14)
    o = gpuloss.nll_loss(lp, rng.integers(0, 7, 5), return_grad=True)
    assert o.grad.shape == lp.shape


def test_torch_cpu_tensors_come_back_as_tensors(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((4, 9)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 9, 4))
    out = gpuloss.cross_entropy(x, t, return_grad=True)
    assert isinstance(out.loss, torch.Tensor) and isinstance(out.grad, torch.Tensor)
    np.testing.assert_allclose(out.loss.numpy(), R.cross_entropy(x.numpy(), t.numpy()), **T32)
    y = gpuloss.softmax(x, dim=1, backend="numpy")
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(y.numpy(), R.softmax(x.numpy(), 1), **T32)


def test_inplace_backward_numpy(rng):
    x = rng.standard_normal((5, 11)).astype(np.float32)
    t = rng.integers(0, 11, 5)
    want = R.cross_entropy_grad(x, t)[0]
    out = gpuloss.cross_entropy(x, t, inplace_backward=True, return_grad=True)
    np.testing.assert_allclose(out.grad, want, **T32)
    np.testing.assert_allclose(x, want, **T32)  # asked for: the logits now hold the gradient


def test_empty_and_all_ignored_like_pytorch(rng):
    x = np.zeros((0, 5), np.float32)
    t = np.zeros((0,), np.int64)
    assert np.isnan(gpuloss.cross_entropy(x, t))
    assert gpuloss.cross_entropy(x, t, reduction="sum") == 0
    assert gpuloss.cross_entropy(x, t, reduction="none").shape == (0,)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    t = np.full(3, -100)
    out = gpuloss.cross_entropy(x, t, return_grad=True)
    assert np.isnan(out.loss)
    np.testing.assert_array_equal(out.grad, 0)


def test_nan_and_inf_propagate_without_error(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    x[0, 1] = np.nan
    x[1, 2] = np.inf
    t = np.array([0, 1, 2])
    loss = gpuloss.cross_entropy(x, t, reduction="none")
    assert np.isnan(loss[0]) and np.isnan(loss[1]) and np.isfinite(loss[2])


# ------------------------------------------------------------------ bad input

BAD = [
    ("integer logits", lambda: gpuloss.cross_entropy(np.ones((2, 3), np.int64), np.array([0, 1])), TypeError, "input"),
    ("float class targets", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([0.0, 1.0])), TypeError, "target"),
    ("target shape", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([0, 1, 2])), ValueError, "target"),
    ("target out of range", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([0, 3])), ValueError, "target"),
    ("negative target", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([-1, 0])), ValueError, "target"),
    ("weight length", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([0, 1]), weight=np.ones(4)),
     ValueError, "weight"),
    ("reduction", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([0, 1]), reduction="avg"),
     ValueError, "reduction"),
    ("label_smoothing", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([0, 1]), label_smoothing=1.5),
     ValueError, "label_smoothing"),
    ("softcap", lambda: gpuloss.cross_entropy(np.ones((2, 3)), np.array([0, 1]), softcap=0.0), ValueError, "softcap"),
    ("temperature", lambda: gpuloss.kl_div_with_logits(np.ones((2, 3)), np.ones((2, 3)), temperature=-1.0),
     ValueError, "temperature"),
    ("0-d logits", lambda: gpuloss.cross_entropy(np.array(1.0), np.array(0)), ValueError, "input"),
    ("mse shapes", lambda: gpuloss.mse_loss(np.ones((2, 3)), np.ones((3, 2))), ValueError, "does not broadcast"),
    ("bce weight", lambda: gpuloss.binary_cross_entropy_with_logits(np.ones((2, 3)), np.ones((2, 3)),
                                                                    weight=np.ones(4)), ValueError, "weight"),
    ("softmax dim", lambda: gpuloss.softmax(np.ones((2, 3)), dim=2), ValueError, "dim"),
    ("not an array", lambda: gpuloss.softmax([1.0, 2.0]), TypeError, "input"),
    ("unknown backend", lambda: gpuloss.softmax(np.ones(3), backend="fortran"), ValueError, "fortran"),
    ("return_grad", lambda: gpuloss.mse_loss(np.ones(3), np.ones(3), return_grad="yes"), ValueError, "return_grad"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(case):
    _, fn, exc, word = case
    with pytest.raises(exc, match=word):
        fn()


def test_mixed_kinds_raise():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="mixed array kinds"):
        gpuloss.cross_entropy(np.ones((2, 3), np.float32), torch.tensor([0, 1]))


def test_mixed_devices_raise():
    torch = pytest.importorskip("torch")
    x = torch.ones(2, 3)
    t = torch.tensor([0, 1], device="meta")
    with pytest.raises(ValueError, match="mixed devices"):
        gpuloss.cross_entropy(x, t)


def test_bad_target_value_leaves_input_untouched(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    x0 = x.copy()
    with pytest.raises(ValueError):
        gpuloss.cross_entropy(x, np.array([0, 5]), inplace_backward=True, return_grad=True)
    np.testing.assert_array_equal(x, x0)


# ------------------------------------------------------------------ dispatcher

def test_backend_status_reports_every_backend():
    st = gpuloss.backend_status()
    assert set(st) >= {"numpy", "triton", "cupy"}
    assert st["numpy"][0] is True
    for name, (ok, why) in st.items():
        assert isinstance(why, str) and why


def test_automatic_choice_for_cpu_arrays_is_numpy():
    assert dispatch.select("numpy", "cpu").name == "numpy"
    assert dispatch.select("torch", "cpu").name == "numpy"


def test_override_precedence(monkeypatch):
    monkeypatch.setenv("GPULOSS_BACKEND", "numpy")
    assert dispatch.select("numpy", "cpu").name == "numpy"
    monkeypatch.setenv("GPULOSS_BACKEND", "fortran")
    with pytest.raises(ValueError, match="GPULOSS_BACKEND"):
        dispatch.select("numpy", "cpu")
    with gpuloss.use_backend("numpy"):  # the context manager beats the environment
        assert dispatch.select("numpy", "cpu").name == "numpy"
    assert dispatch.select("numpy", "cpu", backend="numpy").name == "numpy"  # the argument beats both


def test_explicit_unavailable_backend_says_what_is_missing():
    ok, why = gpuloss.backend_status()["cupy"]
    if ok:
        pytest.skip("cupy is available here")
    with pytest.raises(gpuloss.BackendUnavailableError, match="cupy"):
        gpuloss.softmax(np.ones((2, 3), np.float32), backend="cupy")


def test_explicit_backend_that_cannot_take_the_arrays():
    if not gpuloss.backend_status()["triton"][0] or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs triton on a GPU")
    with pytest.raises(gpuloss.BackendUnavailableError, match="cannot take numpy"):
        gpuloss.softmax(np.ones((2, 3), np.float32), backend="triton")


def test_use_backend_is_scoped():
    with gpuloss.use_backend("numpy"):
        assert dispatch._override.get() == "numpy"
    assert dispatch._override.get() is None
    with pytest.raises(ValueError):
        with gpuloss.use_backend("nope"):
            pass


def test_register_plugin_backend():
    dispatch.register("fake", "gpuloss.backends.base:Backend")
    try:
        ok, why = gpuloss.backend_status()["fake"]
        assert not ok and "NotImplementedError" in why
        with pytest.raises(gpuloss.BackendUnavailableError, match="fake"):
            gpuloss.get_backend("fake")
    finally:
        dispatch._REGISTRY.pop("fake")
        dispatch._status.pop("fake", None)


def test_value_checks_mode(rng):
    old = gpuloss.set_value_checks("never")
    try:
        # CPU arrays are still checked: it costs no synchronisation
        with pytest.raises(ValueError, match="class index"):
            gpuloss.cross_entropy(np.ones((2, 3), np.float32), np.array([0, 9]))
    finally:
        gpuloss.set_value_checks(old)
    with pytest.raises(ValueError):
        gpuloss.set_value_checks("sometimes")


@pytest.mark.gpu
def test_gpu_value_checks_off_the_hot_path_by_default():
    """On CUDA tensors the default does not read the targets (no host sync):
    a bad target gives a NaN row; "always" raises the clear error instead."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(3, 5, device="cuda")
    t = torch.tensor([0, 7, 2], device="cuda")
    loss = gpuloss.cross_entropy(x, t, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and torch.isfinite(loss[2])
    old = gpuloss.set_value_checks("always")
    try:
        with pytest.raises(ValueError, match="class index 7"):
            gpuloss.cross_entropy(x, t)
    finally:
        gpuloss.set_value_checks(old)


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_loss_dtype_keeps_the_accumulated_loss(rng, fn):
    """``loss_dtype=torch.float32`` on bf16 operands: the loss as accumulated
    in fp32 (not rounded to bf16 first), the gradients unchanged; a
    non-floating or wrong-kind dtype is a TypeError naming the argument."""
    torch = pytest.importorskip("torch")
    h = torch.tensor(rng.standard_normal((16, 8)), dtype=torch.bfloat16)
    W = torch.tensor(rng.standard_normal((40, 8)), dtype=torch.bfloat16)
    t = torch.tensor(rng.integers(0, 40, 16))
    z = h @ W.T  # the bf16 logits both functions see (linear CE forms them chunk by chunk)
    ref = float(torch.nn.functional.cross_entropy(z.double(), t))
    if fn == "cross_entropy":
        args = lambda: (z.clone().requires_grad_(),)  # noqa: E731
    else:
        args = lambda: (h.clone().requires_grad_(), W)  # noqa: E731
    f = getattr(gpuloss, fn)
    a32, a16 = args(), args()
    l32 = f(*a32, t, loss_dtype=torch.float32)
    l16 = f(*a16, t)
    assert l32.dtype == torch.float32 and l16.dtype == torch.bfloat16
    assert abs(float(l32) - ref) < 1e-4 * abs(ref)
    assert float(l32) != float(l16)  # bf16 rounding is ~0.4%; fp32 keeps the digits
    l32.backward(), l16.backward()
    torch.testing.assert_close(a32[0].grad, a16[0].grad, rtol=0, atol=0)
    none = f(*args(), t, reduction="none", loss_dtype=torch.float64)
    assert none.dtype == torch.float64 and none.shape == (16,)
    assert f(*args(), t, return_grad=True, loss_dtype=torch.float32).loss.dtype == torch.float32
    with pytest.raises(TypeError, match="loss_dtype"):
        f(*args(), t, loss_dtype=torch.int64)
    with pytest.raises(TypeError, match="loss_dtype"):
        f(*args(), t, loss_dtype="float32")
    x = np.asarray(rng.standard_normal((4, 5)), dtype=np.float32)
    if fn == "cross_entropy":
        assert gpuloss.cross_entropy(x, np.array([0, 1, 2, 3]), loss_dtype="float64").dtype == np.float64
        empty = gpuloss.cross_entropy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), loss_dtype=torch.float64)
        assert empty.dtype == torch.float64


def test_kernels_run_on_the_arrays_gpu(monkeypatch):
    """launch.on_device makes the arrays' GPU current for the launch (Triton
    and CuPy launch on the current device): checked on its wiring here; on
    two GPUs in tests/test_torch_gpu.py."""
    torch = pytest.importorskip("torch")
    import contextlib
    import types
    from gpuloss import launch
    entered = []

    @contextlib.contextmanager
    def fake_device(d):
        entered.append(("torch", str(torch.device("cuda", d) if isinstance(d, int) else d)))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with launch.on_device("torch", types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    with launch.on_device("torch", torch.zeros(1)):  # a CPU tensor: nothing to switch
        pass

    class CupyDevice:
        id = 2

        def __enter__(self):
            entered.append(("cupy", self.id))

        def __exit__(self, *exc):
            return False

    with launch.on_device("cupy", types.SimpleNamespace(device=CupyDevice()), torch_too=True):
        pass
    with launch.on_device("numpy", np.zeros(1)):
        pass
    assert entered == [("torch", "cuda:1"), ("cupy", 2), ("torch", "cuda:2")]


def test_torch_launch_context_switches_device_and_grad_mode_and_restores_them(monkeypatch):
    """launch.run's context for torch tensors on a backend that launches on
    torch's stream (launch._TorchNative, the path without an ExitStack): the
    tensors' GPU current and grad mode off inside; both restored after, also
    when the launch raises.  A CPU tensor switches no device."""
    torch = pytest.importorskip("torch")
    import types
    from gpuloss import dispatch, launch
    calls = []
    monkeypatch.setattr(torch.cuda, "_exchange_device", lambda i: calls.append(("exchange", i)) or 0)
    monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", lambda i: calls.append(("restore", i)) or 1)
    be = dispatch.get_backend("numpy")  # native "numpy": not CuPy, so no stream or allocator to set up
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    with launch._native_context(be, "torch", on_gpu1):
        assert not torch.is_grad_enabled() and calls == [("exchange", 1)]
    assert torch.is_grad_enabled() and calls == [("exchange", 1), ("restore", 0)]
    calls.clear()
    with pytest.raises(KeyError):
        with launch._native_context(be, "torch", on_gpu1):
            raise KeyError("launch failed")
    assert torch.is_grad_enabled() and calls == [("exchange", 1), ("restore", 0)]
    calls.clear()
    with torch.no_grad():
        with launch._native_context(be, "torch", torch.zeros(1)):
            assert not torch.is_grad_enabled()
        assert not torch.is_grad_enabled()
    assert calls == []


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_numpy_losses_come_back_as_arrays(rng, reduction, dtype):
    """Arrays in, arrays out: every loss of NumPy arrays is an ndarray (0-d
    when reduced), with or without its gradient; batchmean and float16 means
    rescale a 0-d result, which NumPy's arithmetic turns into a scalar."""
    lp = np.log(rng.dirichlet(np.ones(5), 4)).astype(dtype)
    p = rng.dirichlet(np.ones(5), 4).astype(dtype)
    x = rng.standard_normal((4, 5)).astype(dtype)
    t = rng.integers(0, 5, 4)
    calls = [lambda **k: gpuloss.kl_div(lp, p, reduction=reduction, **k),
             lambda **k: gpuloss.kl_div_with_logits(x, x[::-1].copy(), reduction=reduction, **k)]
    if reduction != "batchmean":
        calls += [lambda **k: gpuloss.cross_entropy(x, t, reduction=reduction, **k),
                  lambda **k: gpuloss.cross_entropy(x, p, reduction=reduction, **k),
                  lambda **k: gpuloss.nll_loss(lp, t, reduction=reduction, **k),
                  lambda **k: gpuloss.mse_loss(x, p, reduction=reduction, **k),
                  lambda **k: gpuloss.binary_cross_entropy_with_logits(x, p, reduction=reduction, **k),
                  lambda **k: gpuloss.binary_cross_entropy(p, p[::-1].copy(), reduction=reduction, **k)]
    e = np.zeros((0, 5), dtype)
    calls += [lambda **k: gpuloss.kl_div_with_logits(e, e, reduction=reduction, **k),  # no rows
              lambda **k: gpuloss.kl_div(e, e, reduction=reduction, **k)]
    for call in calls:
        for out in (call(), call(return_grad=True).loss):
            assert isinstance(out, np.ndarray), type(out)
            assert out.dtype == dtype and (out.ndim > 0) == (reduction == "none")


def test_return_grad_all_where_the_target_has_no_gradient(rng):
    """kl_div_with_logits gives no gradient for its target (teacher logits or
    probabilities): return_grad="all" says so, as autograd does for torch
    tensors, instead of a silent grad_target=None."""
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with pytest.raises(NotImplementedError, match="teacher logits"):
        gpuloss.kl_div_with_logits(x, x[::-1].copy(), return_grad="all")
    assert gpuloss.kl_div_with_logits(x, x[::-1].copy(), return_grad=True).grad_target is None
    # floating targets of ops that have the gradient still get it
    assert gpuloss.mse_loss(x, x[::-1].copy(), return_grad="all").grad_target is not None
