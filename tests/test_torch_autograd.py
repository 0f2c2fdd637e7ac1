"""Autograd through gpuloss's torch custom operators (gpuloss.torch_ops).

Every loss and option goes through the public functions with float64 CPU
tensors (the numpy backend): the value against the float64 reference, the
gradients for a random upstream gradient against the reference's ``*_grad``,
and ``torch.autograd.gradcheck`` (finite differences) on the whole path.
Then: float32/bfloat16, every backend that takes torch tensors, repeatability,
and no host-side reads of tensor values in forward or backward.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpuloss  # noqa: E402
from gpuloss import reference as R  # noqa: E402
from gpuloss import torch_ops  # noqa: E402

from conftest import tol  # noqa: E402
from prims import no_upstream  # noqa: E402


def T(a, requires_grad: bool = False, device: str = "cpu", dtype=None):
    t = torch.from_numpy(np.array(a)).to(device)
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(requires_grad)


def _kw_torch(kw: dict, device: str = "cpu", dtype=None) -> dict:
    return {k: (T(v, device=device, dtype=dtype) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}


def _upstream(rng, shape) -> np.ndarray:
    """A random upstream gradient, never 1 (Liger shipped wrong gradients for
    grad_output != 1)."""
    return rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def check_loss(rng, gl_fn, ref_fn, ref_grad_fn, input, target, diff_target=False, **kw):
    """Value, gradients for a random upstream gradient, and gradcheck."""
    x = T(input, requires_grad=True)
    t = T(target, requires_grad=diff_target)
    kwt = _kw_torch(kw)
    out = gl_fn(x, t, **kwt)
    ref = np.asarray(ref_fn(input, target, **kw))
    assert out.dtype == torch.float64 and tuple(out.shape) == ref.shape
    np.testing.assert_allclose(out.detach().numpy(), ref, **tol("float64"))

    go = _upstream(rng, ref.shape)
    wrt = [x, t] if diff_target else [x]
    grads = torch.autograd.grad(out, wrt, T(go))
    ref_gx, ref_gt = ref_grad_fn(input, target, **kw, grad_output=go)
    np.testing.assert_allclose(grads[0].numpy(), ref_gx, **tol("float64"))
    if diff_target:
        np.testing.assert_allclose(grads[1].numpy(), ref_gt, **tol("float64"))

    if diff_target:
        assert torch.autograd.gradcheck(lambda a, b: gl_fn(a, b, **kwt), (x, t), fast_mode=True)
    else:
        assert torch.autograd.gradcheck(lambda a: gl_fn(a, t, **kwt), (x,), fast_mode=True)


# ------------------------------------------------------------------ cross-entropy

CE_OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(weight=True, ignore=True),
    dict(ignore=True, reduction="none"),
    dict(label_smoothing=0.2),
    dict(label_smoothing=0.3, weight=True, ignore=True, reduction="none"),
    dict(z_loss=0.05),
    dict(softcap=2.5),
    dict(z_loss=0.05, softcap=2.5, label_smoothing=0.1, weight=True, ignore=True),
    dict(z_loss=0.02, softcap=3.0, weight=True, ignore=True, reduction="sum"),
]


def _ce_kw(rng, C, opt):
    kw = {k: v for k, v in opt.items() if k not in ("weight", "ignore")}
    if opt.get("weight"):
        kw["weight"] = rng.uniform(0.2, 2.0, C)
    if opt.get("ignore"):
        kw["ignore_index"] = -7
    return kw


@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 6, 3)], ids=["NC", "C", "NCd"])
@pytest.mark.parametrize("opt", CE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cross_entropy_class_targets(rng, shape, opt):
    C = shape[1] if len(shape) > 1 else shape[0]
    x = rng.standard_normal(shape) * 2
    tshape = (shape[0],) + shape[2:] if len(shape) > 1 else ()
    t = rng.integers(0, C, size=tshape)
    kw = _ce_kw(rng, C, opt)
    if opt.get("ignore") and t.ndim:
        t.reshape(-1)[0] = -7  # at least one ignored row, never all
    check_loss(rng, gpuloss.cross_entropy, R.cross_entropy, R.cross_entropy_grad, x, t, **kw)


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 3)], ids=["NC", "NCd"])
@pytest.mark.parametrize("opt", [dict(), dict(reduction="sum"), dict(reduction="none"),
                                 dict(label_smoothing=0.25, weight=True),
                                 dict(z_loss=0.03, softcap=2.0, weight=True, reduction="none")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cross_entropy_probability_targets_grad_wrt_target(rng, shape, opt):
    C = shape[1]
    x = rng.standard_normal(shape) * 2
    t = rng.dirichlet(np.ones(C), size=int(np.prod(shape)) // C)  # rows sum to one
    t = np.moveaxis(t.reshape((shape[0],) + shape[2:] + (C,)), -1, 1).copy()
    kw = _ce_kw(rng, C, opt)
    check_loss(rng, gpuloss.cross_entropy, R.cross_entropy, R.cross_entropy_grad, x, t, diff_target=True, **kw)


# ------------------------------------------------------------------ NLL

@pytest.mark.parametrize("opt", [dict(), dict(reduction="sum"), dict(reduction="none"), dict(weight=True),
                                 dict(weight=True, ignore=True, reduction="none"), dict(weight=True, ignore=True)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("shape", [(5, 6), (6,), (2, 6, 3)], ids=["NC", "C", "NCd"])
def test_nll_loss(rng, shape, opt):
    C = shape[1] if len(shape) > 1 else shape[0]
    x = R.log_softmax(rng.standard_normal(shape), 1 if len(shape) > 1 else 0)
    tshape = (shape[0],) + shape[2:] if len(shape) > 1 else ()
    t = rng.integers(0, C, size=tshape)
    kw = _ce_kw(rng, C, opt)
    if opt.get("ignore") and t.ndim:
        t.reshape(-1)[0] = -7
    check_loss(rng, gpuloss.nll_loss, R.nll_loss, R.nll_loss_grad, x, t, **kw)


# ------------------------------------------------------------------ KL

@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_grad_wrt_input_and_target(rng, reduction, log_target):
    x = R.log_softmax(rng.standard_normal((4, 5)))
    t = R.softmax(rng.standard_normal((4, 5)))
    if log_target:
        t = np.log(t)
    check_loss(rng, gpuloss.kl_div, R.kl_div, R.kl_div_grad, x, t, diff_target=True, reduction=reduction,
               log_target=log_target)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("target_is_logits", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_div_with_logits(rng, reduction, target_is_logits, temperature):
    x = rng.standard_normal((2, 3, 6)) * 2
    t = rng.standard_normal((2, 3, 6)) * 2
    if not target_is_logits:
        t = R.softmax(t)
    check_loss(rng, gpuloss.kl_div_with_logits, R.kl_div_with_logits, R.kl_div_with_logits_grad, x, t,
               temperature=temperature, reduction=reduction, target_is_logits=target_is_logits)


def test_kl_div_with_logits_target_grad_is_refused(rng):
    x = T(rng.standard_normal((3, 4)), requires_grad=True)
    t = T(rng.standard_normal((3, 4)), requires_grad=True)
    with pytest.raises(NotImplementedError, match="not supported.*detach"):
        gpuloss.kl_div_with_logits(x, t)
    gpuloss.kl_div_with_logits(x, t.detach()).backward()  # the usual teacher set-up works
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ element-wise

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weights", ["none", "weight", "pos_weight", "both", "weight_full"])
def test_bce_with_logits(rng, reduction, weights):
    x = rng.standard_normal((4, 5)) * 3
    t = rng.uniform(0, 1, (4, 5))
    kw = dict(reduction=reduction)
    if weights in ("weight", "both"):
        kw["weight"] = rng.uniform(0.2, 2.0, 5)
    if weights == "weight_full":
        kw["weight"] = rng.uniform(0.2, 2.0, (4, 1))
    if weights in ("pos_weight", "both"):
        kw["pos_weight"] = rng.uniform(0.2, 3.0, 5)
    check_loss(rng, gpuloss.binary_cross_entropy_with_logits, R.binary_cross_entropy_with_logits,
               R.binary_cross_entropy_with_logits_grad, x, t, diff_target=True, **kw)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce(rng, reduction, weighted):
    p = rng.uniform(0.05, 0.95, (3, 6))
    t = rng.uniform(0, 1, (3, 6))
    kw = dict(reduction=reduction)
    if weighted:
        kw["weight"] = rng.uniform(0.2, 2.0, 6)
    check_loss(rng, gpuloss.binary_cross_entropy, R.binary_cross_entropy, R.binary_cross_entropy_grad, p, t,
               diff_target=True, **kw)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4), ()], ids=["2d", "3d", "0d"])
def test_mse(rng, reduction, shape):
    x = np.asarray(rng.standard_normal(shape))
    t = np.asarray(rng.standard_normal(shape))
    check_loss(rng, gpuloss.mse_loss, R.mse_loss, R.mse_loss_grad, x, t, diff_target=True, reduction=reduction)


# ------------------------------------------------------------------ softmax

@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape,dim", [((4, 7), -1), ((4, 7), 0), ((2, 5, 3), 1), ((6,), 0)])
def test_softmax_values_grad_and_double_backward(rng, log, shape, dim):
    x_np = rng.standard_normal(shape) * 3
    fn = gpuloss.log_softmax if log else gpuloss.softmax
    ref = (R.log_softmax if log else R.softmax)(x_np, dim)
    x = T(x_np, requires_grad=True)
    y = fn(x, dim)
    np.testing.assert_allclose(y.detach().numpy(), ref, **tol("float64"))
    dy = _upstream(rng, shape)
    (gx,) = torch.autograd.grad(y, x, T(dy))
    ref_gx = (R.log_softmax_backward if log else R.softmax_backward)(ref, dy, dim)
    np.testing.assert_allclose(gx.numpy(), ref_gx, **tol("float64"))
    assert torch.autograd.gradcheck(lambda a: fn(a, dim), (x,))
    assert torch.autograd.gradgradcheck(lambda a: fn(a, dim), (x,))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape,dim", [((0, 10), 1), ((0, 10), 0), ((10, 0), 1), ((10, 0), 0), ((0,), 0)])
def test_softmax_of_empty_input_has_torchs_double_backward(log, shape, dim):
    """An empty input's result is in autograd's graph as torch's: its gradient,
    taken with create_graph=True, is itself differentiable (an identity-like
    node gave a gradient that required no grad, and the second backward raised)."""
    fn = gpuloss.log_softmax if log else gpuloss.softmax
    ref_fn = torch.log_softmax if log else torch.softmax
    for f in (fn, ref_fn):
        x = torch.rand(shape, requires_grad=True)
        y = f(x, dim)
        assert y.shape == x.shape and y.requires_grad
        (gi,) = torch.autograd.grad(y, x, torch.rand(shape), create_graph=True)
        assert gi.shape == x.shape and gi.requires_grad, f
        gi.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("log", [False, True])
def test_softmax_backward_functions_are_differentiable(rng, log):
    x_np = rng.standard_normal((3, 6))
    y_np = (R.log_softmax if log else R.softmax)(x_np)
    dy_np = rng.standard_normal((3, 6))
    fn = gpuloss.log_softmax_backward if log else gpuloss.softmax_backward
    y, dy = T(y_np, requires_grad=True), T(dy_np, requires_grad=True)
    dx = fn(dy, y)
    ref = (R.log_softmax_backward if log else R.softmax_backward)(y_np, dy_np)
    np.testing.assert_allclose(dx.detach().numpy(), ref, **tol("float64"))
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b), (dy, y))


# ------------------------------------------------------------------ lower precision

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_low_precision_grads(rng, dtype):
    tdt = getattr(torch, dtype)
    x_np = rng.standard_normal((6, 37)) * 3
    x_np = T(x_np).to(tdt).double().numpy()  # the reference sees the rounded inputs
    t_np = rng.integers(0, 37, 6)
    # class weights in the logits' dtype, as torch requires (and the reference sees them rounded)
    w_np = T(rng.uniform(0.5, 1.5, 37)).to(tdt).double().numpy()
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    x = T(x_np, dtype=tdt, requires_grad=True)
    loss = gpuloss.cross_entropy(x, T(t_np), weight=T(w_np, dtype=tdt), **kw)
    assert loss.dtype == tdt
    go = float(rng.uniform(0.5, 2.0))
    (loss * go).backward()
    assert x.grad.dtype == tdt
    ref = R.cross_entropy(x_np, t_np, weight=w_np, **kw)
    ref_g, _ = R.cross_entropy_grad(x_np, t_np, weight=w_np, **kw, grad_output=go)
    np.testing.assert_allclose(loss.double().item(), ref, **tol(dtype))
    np.testing.assert_allclose(x.grad.double().numpy(), ref_g, **tol(dtype))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softmax_low_precision(rng, dtype):
    tdt = getattr(torch, dtype)
    x_np = T(rng.standard_normal((5, 33)) * 3).to(tdt).double().numpy()
    x = T(x_np, dtype=tdt, requires_grad=True)
    y = gpuloss.softmax(x)
    assert y.dtype == tdt
    dy = T(rng.standard_normal((5, 33))).to(tdt)
    y.backward(dy)
    ref = R.softmax(x_np)
    np.testing.assert_allclose(y.detach().double().numpy(), ref, **tol(dtype))
    ref_g = R.softmax_backward(y.detach().double().numpy(), dy.double().numpy())
    np.testing.assert_allclose(x.grad.double().numpy(), ref_g, **tol(dtype))


# ------------------------------------------------------------------ every backend

def test_autograd_on_every_backend(backend, rng):
    """The same autograd path on each backend's device (numpy and the triton
    interpreter on the CPU; triton and cupy on CUDA tensors in GPU CI)."""
    dev = backend.device
    N, C = 4, 37
    x_np = rng.standard_normal((N, C)) * 2
    t_np = rng.integers(0, C, N)
    t_np[1] = -100
    w_np = rng.uniform(0.5, 1.5, C)
    go = _upstream(rng, (N,))
    x = T(x_np, device=dev, dtype=torch.float32, requires_grad=True)
    loss = gpuloss.cross_entropy(x, T(t_np, device=dev), weight=T(w_np, device=dev, dtype=torch.float32),
                                 label_smoothing=0.1, reduction="none", backend=backend.name)
    loss.backward(T(go, device=dev, dtype=torch.float32))
    kw = dict(weight=w_np, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(loss.detach().cpu().double().numpy(), R.cross_entropy(x_np, t_np, **kw),
                               **tol("float32"))
    np.testing.assert_allclose(x.grad.cpu().double().numpy(),
                               R.cross_entropy_grad(x_np, t_np, **kw, grad_output=go)[0], **tol("float32"))

    xs = T(x_np, device=dev, dtype=torch.float32, requires_grad=True)
    y = gpuloss.log_softmax(xs, backend=backend.name)
    dy = rng.standard_normal((N, C))
    y.backward(T(dy, device=dev, dtype=torch.float32))
    np.testing.assert_allclose(xs.grad.cpu().double().numpy(),
                               R.log_softmax_backward(R.log_softmax(x_np), dy), **tol("float32"))

    p = T(rng.uniform(0.1, 0.9, (N, C)), device=dev, dtype=torch.float32, requires_grad=True)
    tt_np = rng.uniform(0, 1, (N, C))
    tt = T(tt_np, device=dev, dtype=torch.float32, requires_grad=True)
    loss = gpuloss.binary_cross_entropy(p, tt, backend=backend.name)
    (2.5 * loss).backward()
    gp, gt = R.binary_cross_entropy_grad(p.detach().cpu().double().numpy(), tt_np, grad_output=2.5)
    np.testing.assert_allclose(p.grad.cpu().double().numpy(), gp, **tol("float32"))
    np.testing.assert_allclose(tt.grad.cpu().double().numpy(), gt, **tol("float32"))


# ------------------------------------------------------------------ behaviour

def _ignored_rows_cases(t, w, reduction: str, backend: str):
    """(name, gpuloss's loss, torch's) for every class-index loss, in place and
    fused linear too (that one of (hidden, weight, bias), the others of the
    logits), for the ignored-rows tests below."""
    import torch.nn.functional as F
    kw = dict(reduction=reduction, backend=backend)
    return [
        ("cross_entropy", lambda x: gpuloss.cross_entropy(x, t, w, label_smoothing=0.1, **kw),
         lambda x: F.cross_entropy(x, t, w, label_smoothing=0.1, reduction=reduction)),
        ("in place", lambda x: gpuloss.cross_entropy(x * 1, t, inplace_backward=True, **kw),
         lambda x: F.cross_entropy(x * 1, t, reduction=reduction)),
        ("nll_loss", lambda x: gpuloss.nll_loss(x, t, w, **kw), lambda x: F.nll_loss(x, t, w, reduction=reduction)),
        ("linear", lambda x, lw, lb: gpuloss.linear_cross_entropy(x, lw, t, linear_bias=lb, **kw),
         lambda x, lw, lb: F.cross_entropy(F.linear(x, lw, lb), t, reduction=reduction)),
    ]


def test_nan_upstream_at_ignored_rows_leaves_their_gradient_zero(backend, rng):
    """reduction="none" with an upstream gradient that is NaN or inf at ignored rows (``loss / n``
    with ``n = 0`` on padding): torch's nll_loss backward skips those rows, so their gradient is
    0, not saved gradient (0) times NaN.  Every class-index loss, in place and fused linear too."""
    dev = backend.device
    N, C, H = 6, 11, 5
    x_np = rng.standard_normal((N, C))
    t_np = rng.integers(0, C, N)
    t_np[[1, 4]] = -100
    go = rng.standard_normal(N)
    go[1], go[4] = np.nan, np.inf
    t, g = T(t_np, device=dev), T(go, device=dev)
    w = T(rng.uniform(0.5, 1.5, C), device=dev)
    h_np, lw_np, lb_np = rng.standard_normal((N, H)), rng.standard_normal((C, H)), rng.standard_normal(C)
    for name, ours, theirs in _ignored_rows_cases(t, w, "none", backend.name):
        srcs = (h_np, lw_np, lb_np) if name == "linear" else (x_np,)
        a = [T(v, device=dev, requires_grad=True) for v in srcs]
        b = [T(v, device=dev, requires_grad=True) for v in srcs]
        ours(*a).backward(g)
        theirs(*b).backward(g)
        assert torch.isfinite(a[0].grad).all(), name
        np.testing.assert_allclose(a[0].grad.cpu().numpy(), b[0].grad.cpu().numpy(), rtol=1e-12, atol=1e-12,
                                   err_msg=name)


def test_inf_upstream_of_a_reduced_loss_leaves_ignored_rows_zero(backend, rng):
    """A "sum" loss divided by a count of 0 (transformers' ``num_items_in_batch``
    when every label of an optimizer step is -100): the upstream gradient is
    inf, and torch's backward leaves every ignored row 0, and so every
    gradient 0 when all rows are ignored (with saved gradient (0) times inf,
    every weight of the model became NaN).  Partly ignored: the ignored rows
    are 0.  Every class-index loss, in place and fused linear (hidden, weight
    and bias) too."""
    dev = backend.device
    N, C, H = 6, 11, 5
    x_np = rng.standard_normal((N, C))
    h_np, lw_np, lb_np = rng.standard_normal((N, H)), rng.standard_normal((C, H)), rng.standard_normal(C)
    w = T(rng.uniform(0.5, 1.5, C), device=dev)
    for ignored in ([1, 4], list(range(N))):
        t_np = rng.integers(0, C, N)
        t_np[ignored] = -100
        t = T(t_np, device=dev)
        for name, ours, theirs in _ignored_rows_cases(t, w, "sum", backend.name):
            srcs = (h_np, lw_np, lb_np) if name == "linear" else (x_np,)
            a = [T(v, device=dev, requires_grad=True) for v in srcs]
            b = [T(v, device=dev, requires_grad=True) for v in srcs]
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            (ours(*a) / zero).backward()
            (theirs(*b) / zero).backward()
            what = f"{name}, rows {ignored} ignored"
            np.testing.assert_array_equal(a[0].grad[ignored].cpu().numpy(), 0.0, err_msg=what)
            np.testing.assert_array_equal(b[0].grad[ignored].cpu().numpy(), 0.0, err_msg=what)
            if len(ignored) == N:  # every gradient 0, as torch's
                for ga, gb in zip(a, b):
                    np.testing.assert_array_equal(ga.grad.cpu().numpy(), gb.grad.cpu().numpy(), err_msg=what)


def test_repeated_runs_are_identical(rng):
    x_np = rng.standard_normal((8, 50)) * 3
    t_np = rng.integers(0, 50, 8)
    outs = []
    for _ in range(3):
        x = T(x_np, dtype=torch.float32, requires_grad=True)
        loss = gpuloss.cross_entropy(x, T(t_np), label_smoothing=0.1, z_loss=1e-3)
        loss.backward()
        y = T(x_np, dtype=torch.float32, requires_grad=True)
        gpuloss.softmax(y).backward(T(x_np, dtype=torch.float32))
        outs.append((loss.detach(), x.grad, y.grad))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_gradient_is_scaled_not_recomputed(rng, monkeypatch):
    """Backward reuses the gradient of the forward pass: the backend runs
    once per forward, never in backward."""
    from gpuloss import launch
    calls = []
    real = launch.run

    def counting(be, op, arrays, opts, want, kind):
        calls.append(op)
        return real(be, op, arrays, opts, want, kind)

    monkeypatch.setattr(launch, "run", counting)
    x = T(rng.standard_normal((4, 9)), requires_grad=True)
    loss = gpuloss.cross_entropy(x, T(rng.integers(0, 9, 4)))
    assert calls == ["cross_entropy"]
    (3.0 * loss).backward()
    assert calls == ["cross_entropy"]


def test_no_gradient_asked_when_none_needed(rng, monkeypatch):
    from gpuloss import launch
    seen = []
    real = launch.run

    def spy(be, op, arrays, opts, want, kind):
        seen.append((want.grad, want.grad_target))
        return real(be, op, arrays, opts, want, kind)

    monkeypatch.setattr(launch, "run", spy)
    x = T(rng.standard_normal((3, 5)))
    t = T(rng.standard_normal((3, 5)))
    gpuloss.mse_loss(x, t)
    with torch.no_grad():
        gpuloss.mse_loss(x.requires_grad_(), t.requires_grad_())
    gpuloss.mse_loss(x, t.detach())
    gpuloss.mse_loss(x.detach(), t)
    assert seen == [(False, False), (False, False), (True, False), (False, True)]


def test_weight_is_a_constant(rng):
    """Class weights are constants, as in torch's cross_entropy: a weight that
    requires grad is refused while grad mode is on (torch raises too, rather
    than lose the gradient asked for); a detached one is used as given."""
    x = T(rng.standard_normal((3, 4)), requires_grad=True)
    w = T(rng.uniform(0.5, 1.5, 4), requires_grad=True)
    t = T(rng.integers(0, 4, 3))
    with pytest.raises(ValueError, match="weight requires grad"):
        gpuloss.cross_entropy(x, t, weight=w)
    gpuloss.cross_entropy(x, t, weight=w.detach()).backward()
    np.testing.assert_allclose(x.grad.numpy(), R.cross_entropy_grad(x.detach().numpy(), t.numpy(),
                                                                     weight=w.detach().numpy())[0],
                               **tol("float64"))


def test_mixed_devices_raise(rng):
    x = T(rng.standard_normal((3, 4)), requires_grad=True)
    t = torch.zeros(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="mixed devices"):
        gpuloss.cross_entropy(x, t)
    with pytest.raises(ValueError, match="mixed devices"):
        gpuloss.cross_entropy(x, T(rng.integers(0, 4, 3)), weight=torch.ones(4, device="meta"))


_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def forbid_value_reads(monkeypatch):
    """Make every torch-level read of a tensor's value raise.  On a GPU each
    of these would be a host synchronisation.  The value checks (class
    indices in range, BCE probabilities in [0, 1]: deliberate, documented
    value reads, skipped on GPUs by default and under capture/compile) are
    switched off here, as on a GPU."""
    from gpuloss import _validate
    monkeypatch.setattr(_validate, "_device_values_allowed", lambda *a, **k: False)

    def boom(self, *a, **k):
        raise AssertionError("a tensor value was read on the host (a GPU sync)")

    def arm():
        for name in _SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, boom)

    return arm


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_host_reads_in_forward_or_backward(rng, forbid_value_reads, reduction):
    N, C = 5, 11
    x = T(rng.standard_normal((N, C)), dtype=torch.float32, requires_grad=True)
    xi = T(rng.standard_normal((N, C)), dtype=torch.float32).requires_grad_()
    t = T(rng.integers(0, C, N))
    w = T(rng.uniform(0.5, 1.5, C), dtype=torch.float32)
    prob = T(rng.dirichlet(np.ones(C), N), dtype=torch.float32, requires_grad=True)
    e_t = T(rng.uniform(0, 1, (N, C)), dtype=torch.float32, requires_grad=True)
    forbid_value_reads()
    losses = [
        gpuloss.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction=reduction),
        gpuloss.cross_entropy(x, prob, reduction=reduction),
        gpuloss.cross_entropy(xi * 1.0, t, inplace_backward=True, reduction=reduction),
        gpuloss.nll_loss(gpuloss.log_softmax(x), t, weight=w, reduction=reduction),
        gpuloss.kl_div_with_logits(x, prob.detach(), reduction=reduction),
        gpuloss.kl_div(gpuloss.log_softmax(x), prob, reduction=reduction),
        gpuloss.binary_cross_entropy_with_logits(x, e_t, pos_weight=w, reduction=reduction),
        gpuloss.binary_cross_entropy(torch.sigmoid(x), e_t, weight=w, reduction=reduction),
        gpuloss.mse_loss(gpuloss.softmax(x), e_t, reduction=reduction),
    ]
    total = sum(l.sum() for l in losses)
    total.backward()
    for g in (x.grad, xi.grad, prob.grad, e_t.grad):
        assert g is not None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss", "kl_div_with_logits", "mse_loss",
                                "binary_cross_entropy_with_logits", "linear_cross_entropy"])
def test_loss_may_be_modified_in_place(rng, op, reduction):
    """As with torch's losses, a model may add to the returned loss in place
    (``loss += coef * aux_loss``) and still backpropagate through it."""
    x = torch.tensor(rng.standard_normal((4, 6)), dtype=torch.float32, requires_grad=True)
    t = torch.tensor(rng.integers(0, 6, 4))
    args = {"cross_entropy": (x, t), "nll_loss": (x, t), "kl_div_with_logits": (x, x.detach().flip(0)),
            "mse_loss": (x, x.detach() * 2), "binary_cross_entropy_with_logits": (x, torch.rand(4, 6)),
            "linear_cross_entropy": (x, torch.randn(5, 6), t % 5)}[op]
    ref_loss = getattr(gpuloss, op)(*args, reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref_loss.sum(), x)
    loss = getattr(gpuloss, op)(*args, reduction=reduction)
    loss += 1.0
    (g,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(loss, ref_loss + 1.0)
    torch.testing.assert_close(g, g_ref)


# ---------------------------------------------------------------- second derivatives

def _second_order_cases(rng):
    x = torch.from_numpy(rng.standard_normal((5, 7)))
    t = torch.from_numpy(rng.integers(0, 7, 5))
    h, W = torch.from_numpy(rng.standard_normal((5, 3))), torch.from_numpy(rng.standard_normal((7, 3)))
    return {
        "cross_entropy inplace": (lambda a: gpuloss.cross_entropy(a * 1.0, t, inplace_backward=True), x),
        "linear_cross_entropy": (lambda a: gpuloss.linear_cross_entropy(a, W, t), h),
        "linear_cross_entropy none": (lambda a: gpuloss.linear_cross_entropy(a, W, t, reduction="none"), h),
    }


@pytest.mark.parametrize("case", list(_second_order_cases(np.random.default_rng(0))))
def test_second_derivatives_raise_instead_of_dropping_the_curvature(rng, case):
    """Where second derivatives are not available (the logits consumed in
    place, the fused linear CE, as torch's own chunked one), a gradient asked
    for with create_graph=True raises, naming the loss: any derivative of it
    would miss the loss's own curvature (backward scales a gradient saved by
    the forward pass).  Raising only when that gradient was differentiated
    again let autograd.grad(outer, W), which runs only the nodes on a path to
    W, come out silently first-order (a gradient penalty, a MAML outer step).
    First-order gradients are unaffected."""
    fn, x0 = _second_order_cases(rng)[case]
    x = x0.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
        torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    # the silent case: a penalty on the gradient, differentiated with respect to a parameter
    W = torch.ones(x0.shape[-1], dtype=x0.dtype, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
        loss = fn(x0 * W).sum()
        (g,) = torch.autograd.grad(loss, W, create_graph=True)
        torch.autograd.grad(loss + (g ** 2).sum(), W)
    x1 = x0.clone().requires_grad_()
    (g1,) = torch.autograd.grad(fn(x1).sum(), x1)
    ref = x0.clone().requires_grad_()
    torch.testing.assert_close(g1, torch.autograd.grad(fn(ref).sum(), ref)[0])


def _curved_cases(rng):
    """Losses with curvature: (gpuloss's call, torch's call or None, differentiate the target too)."""
    t = torch.from_numpy(rng.integers(0, 7, 5))
    t[2] = -100
    w = torch.from_numpy(rng.uniform(0.5, 2.0, 7))
    q = torch.softmax(torch.from_numpy(rng.standard_normal((5, 7))), -1)
    teacher = torch.from_numpy(rng.standard_normal((5, 7)))
    F = torch.nn.functional
    both = {  # (function of the input, or of input and target), torch's counterpart
        "cross_entropy": (lambda f, a: f.cross_entropy(a, t), False),
        "cross_entropy weight smoothing": (lambda f, a: f.cross_entropy(a, t, w, label_smoothing=0.2), False),
        "cross_entropy none": (lambda f, a: f.cross_entropy(a, t, reduction="none", label_smoothing=0.1), False),
        "cross_entropy sum k-dim": (lambda f, a: f.cross_entropy(a.reshape(5, 7, 1), t.clamp(min=0)[:, None],
                                                                 reduction="sum"), False),
        "cross_entropy probabilities": (lambda f, a, b: f.cross_entropy(a, b, w, label_smoothing=0.1), True),
        "mse_loss": (lambda f, a, b: f.mse_loss(a, b), True),
        "mse_loss none": (lambda f, a, b: f.mse_loss(a, b, reduction="none"), True),
        "bce_with_logits": (lambda f, a, b: f.binary_cross_entropy_with_logits(a, b, w, pos_weight=w + 0.5), True),
        "bce": (lambda f, a, b: f.binary_cross_entropy(torch.sigmoid(a), b, w), True),
        "kl_div target grad": (lambda f, a, b: f.kl_div(torch.log_softmax(a, -1), b, reduction="batchmean"), True),
        "kl_div log_target": (lambda f, a, b: f.kl_div(a, torch.log(b), reduction="sum", log_target=True), True),
    }
    cases = {}
    for k, (call, two) in both.items():
        cases[k] = (lambda a, b, call=call, two=two: call(gpuloss, a, b) if two else call(gpuloss, a),
                    lambda a, b, call=call, two=two: call(F, a, b) if two else call(F, a), two)
    # gpuloss's extras: against finite differences only
    cases["cross_entropy z_loss softcap"] = (
        lambda a, b: gpuloss.cross_entropy(a, t, z_loss=0.01, softcap=3.0), None, False)
    cases["kl_div_with_logits"] = (lambda a, b: gpuloss.kl_div_with_logits(a, teacher, temperature=2.0), None, False)
    return cases, q


@pytest.mark.parametrize("route", ["eager", "operator"])
@pytest.mark.parametrize("case", list(_curved_cases(np.random.default_rng(0))[0]))
def test_second_derivatives_as_torchs(rng, monkeypatch, case, route):
    """A gradient asked for with create_graph=True is formed again from the
    op's inputs with torch's operations (gpuloss._second_order), so every
    higher derivative is torch's: gradgradcheck (input and a differentiated
    target), the gradient itself, a penalty on the gradient differentiated
    with respect to a parameter, a MAML outer step, the Hessian."""
    if route == "operator":
        monkeypatch.setattr(gpuloss._call, "_eager", lambda arrays: False)
    cases, q = _curved_cases(rng)
    ours, theirs, two = cases[case]
    x0 = torch.from_numpy(rng.standard_normal((5, 7)))
    x = x0.clone().requires_grad_()
    b = q.clone().requires_grad_(two)
    assert torch.autograd.gradgradcheck(lambda a, c: ours(a, c), (x, b))
    if theirs is None:
        return
    results = []
    for fn in (ours, theirs):
        xa = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xa, q).sum(), xa, create_graph=True)
        gg = torch.autograd.grad((g ** 2).sum(), xa)[0] if g.requires_grad else None  # None: linear in xa
        W = torch.linspace(0.5, 1.5, 7, dtype=x0.dtype).requires_grad_()
        loss = fn(x0 * W, q).sum()
        (gw,) = torch.autograd.grad(loss, W, create_graph=True)
        (pen,) = torch.autograd.grad(loss + (gw ** 2).sum(), W, retain_graph=True)
        (outer,) = torch.autograd.grad(fn(x0 * (W - 0.5 * gw), q).sum(), W)
        hess = torch.autograd.functional.hessian(lambda a: fn(a, q).sum(), x0)
        results.append((g, gg, gw, pen, outer, hess))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)


def test_second_derivatives_in_16_bit():
    """bf16 logits: the gradient under create_graph=True has the logits' dtype
    and the curvature of the float32 computation."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 9, generator=g).bfloat16()
    t = torch.randint(0, 9, (6,), generator=g)
    out = []
    for fn, x in ((gpuloss.cross_entropy, x0.clone()), (torch.nn.functional.cross_entropy, x0.float())):
        x.requires_grad_()
        (gx,) = torch.autograd.grad(fn(x, t), x, create_graph=True)
        (gg,) = torch.autograd.grad((gx.float() ** 2).sum(), x)
        out.append((gx, gg))
    assert out[0][0].dtype == torch.bfloat16 and out[0][1].dtype == torch.bfloat16
    torch.testing.assert_close(out[0][0].float(), out[1][0], atol=4e-3, rtol=1e-2)
    torch.testing.assert_close(out[0][1].float(), out[1][1], atol=4e-3, rtol=2e-2)


def test_second_derivatives_of_large_logits_are_refused(monkeypatch):
    """Beyond gpuloss._second_order.MAX_ROW_ELEMENTS the forward pass keeps no
    reference to the logits (it would keep them alive until backward), and a
    second-order backward raises, saying so; first order is unaffected."""
    from gpuloss import _second_order
    monkeypatch.setattr(_second_order, "MAX_ROW_ELEMENTS", 20)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4])
    with pytest.raises(torch_ops.SecondOrderError, match="more than the 20"):
        torch.autograd.grad(gpuloss.cross_entropy(x, t), x, create_graph=True)
    (g,) = torch.autograd.grad(gpuloss.cross_entropy(x, t), x)
    torch.testing.assert_close(g, torch.autograd.grad(torch.nn.functional.cross_entropy(x, t), x)[0])


def test_inference_mode_targets_and_weights_in_a_differentiable_call():
    """A target or class weight made under torch.inference_mode (a data pipeline's)
    next to logits that require grad: the forward pass could not read the version
    counter it keeps for second derivatives (inference tensors have none) and raised
    "Inference tensors do not track version counter"; the first-order gradient needs
    none of it (torch's, which saves the target, refuses the call), and a second-order
    backward now refuses, naming the inference tensor."""
    with torch.inference_mode():
        t = torch.tensor([0, 1, 2, 3, -100])
        w = torch.rand(7, dtype=torch.float64)
        p = torch.softmax(torch.randn(5, 7, dtype=torch.float64), 1)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    calls = [(lambda z: gpuloss.cross_entropy(z, t, weight=w, label_smoothing=0.1),
              lambda z: torch.nn.functional.cross_entropy(z, t.clone(), weight=w.clone(), label_smoothing=0.1)),
             (lambda z: gpuloss.cross_entropy(z, t, reduction="none").sum(),
              lambda z: torch.nn.functional.cross_entropy(z, t.clone(), reduction="none").sum()),
             (lambda z: gpuloss.cross_entropy(z, p), lambda z: torch.nn.functional.cross_entropy(z, p.clone())),
             (lambda z: gpuloss.binary_cross_entropy_with_logits(z, p, pos_weight=w),
              lambda z: torch.nn.functional.binary_cross_entropy_with_logits(z, p.clone(), pos_weight=w.clone()))]
    for ours, theirs in calls:
        (g,) = torch.autograd.grad(ours(x), x)
        torch.testing.assert_close(g, torch.autograd.grad(theirs(x), x)[0])
        with pytest.raises(torch_ops.SecondOrderError, match="inference tensor"):
            torch.autograd.grad(ours(x), x, create_graph=True)


def test_second_order_refuses_an_input_changed_in_place():
    """The forward pass keeps plain references, not saved tensors: a first-order
    backward ignores a later in-place change of the logits (it uses the saved
    gradient), a second-order one refuses it rather than use changed values."""
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4])
    for create_graph in (False, True):
        z = x * 1.0
        loss = gpuloss.cross_entropy(z, t)
        ref = torch.autograd.grad(torch.nn.functional.cross_entropy(z, t), x, retain_graph=True)[0]
        with torch.no_grad():
            z.add_(1.0)
        if create_graph:
            with pytest.raises(torch_ops.SecondOrderError, match="modified in place"):
                torch.autograd.grad(loss, x, create_graph=True)
        else:
            torch.testing.assert_close(torch.autograd.grad(loss, x)[0], ref)


def _linear_cases(rng):
    """Losses linear in the input they are differentiated in: (gpuloss's, torch's) on the same arguments."""
    t = torch.from_numpy(rng.integers(0, 7, 5))
    t[1] = -100
    w = torch.from_numpy(rng.uniform(0.5, 2.0, 7))
    lp = torch.log_softmax(torch.from_numpy(rng.standard_normal((5, 7))), -1)
    F = torch.nn.functional
    cases = {}
    for red in ("mean", "sum", "none"):
        cases[f"nll_loss {red}"] = lambda fn, a, red=red: fn.nll_loss(a, t, w, reduction=red)
        cases[f"nll_loss {red} 3d"] = lambda fn, a, red=red: fn.nll_loss(a.reshape(5, 7, 1).expand(5, 7, 2),
                                                                          t[:, None].expand(5, 2), reduction=red)
    for red in ("batchmean", "sum", "none"):
        for log_t in (False, True):
            tgt = lp if log_t else lp.exp()
            cases[f"kl_div {red} log_target={log_t}"] = \
                lambda fn, a, red=red, tgt=tgt, log_t=log_t: fn.kl_div(a, tgt, reduction=red, log_target=log_t)
    return {k: (lambda a, f=f: f(gpuloss, a), lambda a, f=f: f(F, a)) for k, f in cases.items()}


@pytest.mark.parametrize("route", ["eager", "operator"])
@pytest.mark.parametrize("case", list(_linear_cases(np.random.default_rng(0))))
def test_linear_losses_double_backward(rng, monkeypatch, case, route):
    """nll_loss, and kl_div in its input while the target is not differentiated,
    are linear in what they differentiate: the saved gradient is the whole
    derivative, so create_graph=True works as in torch (gradgradcheck, a
    gradient penalty differentiated with respect to a parameter, a MAML outer
    step through log_softmax, the gradient's own derivative: zeros)."""
    if route == "operator":  # through the custom operator and torch.library's autograd, as under a dispatch mode
        monkeypatch.setattr(gpuloss._call, "_eager", lambda arrays: False)
    ours, theirs = _linear_cases(rng)[case]
    x0 = torch.log_softmax(torch.from_numpy(rng.standard_normal((5, 7))), -1)
    x = x0.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: ours(a), (x,))
    results = []
    for fn in (ours, theirs):
        # the gradient of the gradient with respect to the input: zeros, and the gradient stays in the graph
        xa = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xa).sum(), xa, create_graph=True)
        # torch's nll_loss gradient is in the input's graph (its derivative: zeros); its kl_div's is not
        gg = torch.autograd.grad(g.sum(), xa)[0] if g.requires_grad else None
        # a penalty on the gradient with respect to a parameter, and a MAML-style step
        W = torch.linspace(0.5, 1.5, 7, dtype=x0.dtype).requires_grad_()
        z = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 7)))
        loss = fn(torch.log_softmax(z * W, -1)).sum()
        (gw,) = torch.autograd.grad(loss, W, create_graph=True)
        (pen,) = torch.autograd.grad(loss + (gw ** 2).sum(), W, retain_graph=True)
        fast = W - 0.5 * gw
        (outer,) = torch.autograd.grad(fn(torch.log_softmax(z * fast, -1)).sum(), W)
        results.append((g, gg, gw, pen, outer))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert (results[0][1] is None) == case.startswith("kl_div")
    assert results[0][1] is None or not results[0][1].any()


# ---------------------------------------------------------------- upstream gradients in float32

@pytest.mark.parametrize("case", ["mean", "none", "inplace", "mse none", "linear"])
def test_float32_upstream_is_not_rounded_to_the_inputs_dtype(rng, case):
    """A float32 loss of fp16 logits (autocast, loss_dtype) scaled by
    GradScaler's initial 65536: the backward forms saved_grad * 65536 in
    float32 and rounds once, as torch's cast backward does; rounding 65536 to
    fp16 first made every gradient inf (NaN where the gradient is 0)."""
    x0 = torch.from_numpy(rng.standard_normal((6, 7))).half()
    t = torch.from_numpy(rng.integers(0, 7, 6))
    scale = 65536.0
    if case == "linear":
        W0 = torch.from_numpy(rng.standard_normal((7, 7)) * 0.3).half()
        h, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
        (gpuloss.linear_cross_entropy(h, W, t, loss_dtype=torch.float32) * scale).backward()
        h2, W2 = x0.clone().requires_grad_(), W0.clone().requires_grad_()
        (torch.nn.functional.cross_entropy((h2 @ W2.t()).float(), t) * scale).backward()
        for a, b in ((h.grad, h2.grad), (W.grad, W2.grad)):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.float(), b.float(), rtol=4e-3, atol=4e-3 * float(b.abs().max()))
        return
    x, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    F = torch.nn.functional
    with torch.autocast("cpu", dtype=torch.float16):
        if case == "mse none":
            # close to x: 2 |x - y| * 65536 stays inside fp16's range
            y = (x0.float() + 0.05 * torch.from_numpy(rng.standard_normal((6, 7))).float()).half()
            ours, theirs = gpuloss.mse_loss(x, y, reduction="none"), F.mse_loss(x2, y, reduction="none")
        else:
            kw = dict(reduction="none" if case == "none" else "mean")
            src = (x * 1.0) if case == "inplace" else x
            ours = gpuloss.cross_entropy(src, t, inplace_backward=case == "inplace", **kw)
            theirs = F.cross_entropy(x2, t, **kw)
    assert ours.dtype == theirs.dtype == torch.float32
    (ours.sum() * scale).backward()
    (theirs.sum() * scale).backward()
    assert torch.isfinite(x.grad).all(), x.grad
    torch.testing.assert_close(x.grad.float(), x2.grad.float(), rtol=2e-3, atol=1e-3)


_FUNC_CALLS = {
    "cross_entropy": lambda m, x, t, p: m.cross_entropy(x, t, weight=torch.linspace(0.5, 2, 5, dtype=x.dtype),
                                                        ignore_index=2, label_smoothing=0.1),
    "cross_entropy_prob": lambda m, x, t, p: m.cross_entropy(x, p, label_smoothing=0.2),
    "nll_loss": lambda m, x, t, p: m.nll_loss(torch.log_softmax(x, -1), t, reduction="sum"),
    "kl_div": lambda m, x, t, p: m.kl_div(torch.log_softmax(x, -1), p, reduction="batchmean"),
    "binary_cross_entropy_with_logits": lambda m, x, t, p: m.binary_cross_entropy_with_logits(
        x, p, pos_weight=torch.linspace(0.5, 2, 5, dtype=x.dtype)),
    "binary_cross_entropy": lambda m, x, t, p: m.binary_cross_entropy(torch.sigmoid(x), p),
    "mse_loss": lambda m, x, t, p: m.mse_loss(x, p, reduction="sum"),
    "softmax": lambda m, x, t, p: (m.softmax(x, -1) * p).sum(),
    "log_softmax": lambda m, x, t, p: (m.log_softmax(x, -1) * p).sum(),
}


@pytest.mark.parametrize("name", sorted(_FUNC_CALLS))
def test_torch_func_transforms_give_torchs_results(rng, name):
    """Inside torch.func transforms each function computes with torch's own
    operations: per-sample gradients (vmap over grad of functional_call),
    Jacobians and Hessians equal torch.nn.functional's (they were refused)."""
    model = torch.nn.Linear(4, 5).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    X = torch.from_numpy(rng.standard_normal((6, 4)))
    T = torch.from_numpy(rng.integers(0, 5, 6))
    P = torch.softmax(torch.from_numpy(rng.standard_normal((6, 5))), -1)
    call = _FUNC_CALLS[name]

    def per_sample(m):
        def loss(p, x, t, q):
            return call(m, torch.func.functional_call(model, p, (x,)), t, q)
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(params, X, T, P)

    ours, theirs = per_sample(gpuloss), per_sample(torch.nn.functional)
    for k in params:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-12, atol=1e-12)
    x = torch.from_numpy(rng.standard_normal((3, 5)))
    t, p = T[:3], P[:3]
    ours = torch.func.hessian(lambda z: call(gpuloss, z, t, p))(x)
    theirs = torch.func.hessian(lambda z: call(torch.nn.functional, z, t, p))(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert ours.abs().sum() > 0


@pytest.mark.parametrize("kept", [True, False], ids=["originals-kept", "replaced-before-import"])
@pytest.mark.parametrize("how", ["bound", "wrapped"])
def test_torch_functions_replaced_by_gpuloss(rng, monkeypatch, how, kept):
    """``torch.nn.functional.cross_entropy = gpuloss.cross_entropy`` (or a
    wrapper of it): a way to drop gpuloss into code that calls torch's
    functions.  Every path that computes with torch's own functions
    (torch.func transforms, meta tensors, torch.jit.trace) then called
    gpuloss's again: endless recursion.  They now use torch's functions as
    kept at import, or (the attribute replaced before gpuloss saw torch's)
    the same computation written with the operations torch's call."""
    from gpuloss import _traced
    F = torch.nn.functional
    X = torch.from_numpy(rng.standard_normal((6, 5)))
    T = torch.from_numpy(rng.integers(0, 5, 6))
    P = torch.softmax(torch.from_numpy(rng.standard_normal((6, 5))), -1)

    def results(m):
        out = {}
        for name, call in _FUNC_CALLS.items():
            out[name] = (torch.func.vmap(torch.func.grad(lambda x, t, p: call(m, x[None], t[None], p[None])))(X, T, P),
                         torch.func.jacrev(lambda x: call(m, x, T, P))(X))
        for name in _traced._FALLBACKS:  # meta tensors: shapes and dtypes
            args = (X, T) if name in ("cross_entropy", "nll_loss") else (X, P) if "softmax" not in name else (X, 1)
            args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
            if name == "binary_cross_entropy":
                args = (args[1], args[1])
            r = getattr(m, name)(*args)
            out[name + " meta"] = (r.shape, r.dtype)
        out["jit"] = torch.jit.trace(lambda x: m.cross_entropy(x, T), (X,), check_trace=False)(X)
        out["implicit dim"] = torch.func.vmap(lambda x: m.softmax(x[None]))(X)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the implicit-dim warning
        want = results(F)
    if not kept:
        monkeypatch.setattr(_traced, "_ORIGINALS", {})
    for name in _traced._FALLBACKS:
        fn = getattr(gpuloss, name)
        monkeypatch.setattr(F, name, fn if how == "bound" else (lambda f: lambda *a, **k: f(*a, **k))(fn))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpuloss's jit.trace note, the implicit-dim warning
        got = results(F)
    for key in want:
        for a, b in zip(got[key] if isinstance(got[key], tuple) else (got[key],),
                        want[key] if isinstance(want[key], tuple) else (want[key],)):
            if not isinstance(b, torch.Tensor):
                assert a == b, key
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=key)
    assert kept or not _traced._ORIGINALS  # the computations written in gpuloss._traced ran


def test_torch_func_linear_and_distillation(rng):
    """The fused linear cross-entropy (gradient of the projection weight) and
    the distillation loss (gradient of the student logits and the teacher's)
    under torch.func: torch's definitions, and the extras torch has no
    operation for refused naming them."""
    X = torch.from_numpy(rng.standard_normal((6, 4)))
    W = torch.from_numpy(rng.standard_normal((5, 4)))
    T = torch.from_numpy(rng.integers(0, 5, 6))
    ours = torch.func.grad(lambda w: gpuloss.linear_cross_entropy(X, w, T, reduction="sum"))(W)
    theirs = torch.func.grad(lambda w: torch.nn.functional.cross_entropy(X @ w.T, T, reduction="sum"))(W)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    s, tch = torch.from_numpy(rng.standard_normal((2, 3, 5))).unbind(0)

    def kd_torch(a, b):  # KL(softmax(b / T) || softmax(a / T)), "batchmean"
        ld = torch.log_softmax(b / 2, -1)
        return (ld.exp() * (ld - torch.log_softmax(a / 2, -1))).sum(-1).mean()

    ours = torch.func.grad(lambda a, b: gpuloss.kl_div_with_logits(a, b, temperature=2.0), argnums=(0, 1))(s, tch)
    for a, b in zip(ours, torch.func.grad(kd_torch, argnums=(0, 1))(s, tch)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="torch.func.*z_loss"):
        torch.func.grad(lambda z: gpuloss.cross_entropy(z, T, z_loss=1e-4))(X @ W.T)
    with pytest.raises(ValueError, match="torch.func.*return_grad"):
        torch.func.grad(lambda z: gpuloss.mse_loss(z, z.detach(), return_grad=True).loss)(X)


@pytest.mark.parametrize("which", ["cross_entropy", "softmax", "mse_target", "linear_cross_entropy",
                                   "softmax_backward"])
def test_forward_mode_ad_gives_torchs_tangent(rng, which):
    """A forward-mode tangent on any argument (torch.autograd.forward_ad,
    torch.func.jvp) gets torch's tangent: the custom operators have no
    forward-mode formula, and torch returned the loss with no tangent at all
    (a silent zero directional derivative) before gpuloss refused it; now
    torch's own operations compute such calls."""
    import torch.autograd.forward_ad as fwAD
    F = torch.nn.functional
    x = torch.from_numpy(rng.standard_normal((3, 5)))
    t = torch.from_numpy(rng.integers(0, 5, 3))
    w = torch.from_numpy(rng.standard_normal((5, 5)))
    y = torch.softmax(x, -1)
    calls = {"cross_entropy": (lambda m: lambda d: m.cross_entropy(d, t)),
             "softmax": (lambda m: lambda d: m.softmax(d, -1)),
             "mse_target": (lambda m: lambda d: m.mse_loss(x, d)),
             "linear_cross_entropy": (lambda m: lambda d: m.cross_entropy(x @ d.T, t) if m is F
                                      else m.linear_cross_entropy(x, d, t)),
             "softmax_backward": (lambda m: lambda d: m.softmax_backward(d, y, -1) if m is gpuloss
                                  else torch._softmax_backward_data(d, y, -1, y.dtype))}
    arg = w if which == "linear_cross_entropy" else x
    tangent = torch.from_numpy(rng.standard_normal(arg.shape))
    ours, theirs = calls[which](gpuloss), calls[which](F)
    with fwAD.dual_level():
        ours(arg)  # no tangent anywhere: runs as usual
        got = fwAD.unpack_dual(ours(fwAD.make_dual(arg, tangent)))
        want = fwAD.unpack_dual(theirs(fwAD.make_dual(arg, tangent)))
    assert got.tangent is not None
    torch.testing.assert_close(got.primal, want.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.tangent, want.tangent, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.func.jvp(ours, (arg,), (tangent,)), torch.func.jvp(theirs, (arg,), (tangent,))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- float16 "mean": the division after the op

def _fp16_cases(rng):
    F = torch.nn.functional
    N, C = 512, 300
    x = torch.from_numpy(rng.standard_normal((N, C)) * 3).half()
    t = torch.from_numpy(rng.integers(0, C, N))
    t[::7] = -100
    w = torch.from_numpy(rng.uniform(0.5, 2.0, C)).half()
    p = torch.softmax(torch.from_numpy(rng.standard_normal((N, C))), -1).half()
    y = torch.from_numpy(rng.random((N, C))).half()
    lp = torch.log_softmax(x.float(), -1).half()
    s = torch.from_numpy(rng.standard_normal((N, C)) * 3).half()  # teacher logits
    return {
        "ce": (lambda a: gpuloss.cross_entropy(a, t, weight=w, label_smoothing=0.1),
               lambda a: F.cross_entropy(a.float(), t, weight=w.float(), label_smoothing=0.1), x),
        "ce prob": (lambda a: gpuloss.cross_entropy(a, p),
                    lambda a: F.cross_entropy(a.float(), p.float()), x),
        "mse": (lambda a: gpuloss.mse_loss(a, y), lambda a: F.mse_loss(a.float(), y.float()), x),
        "bce_with_logits": (lambda a: gpuloss.binary_cross_entropy_with_logits(a, y),
                            lambda a: F.binary_cross_entropy_with_logits(a.float(), y.float()), x),
        "kl_div": (lambda a: gpuloss.kl_div(a, p, reduction="mean"),
                   lambda a: F.kl_div(a.float(), p.float(), reduction="mean"), lp),
        "kl_div_with_logits": (lambda a: gpuloss.kl_div_with_logits(a, s, reduction="mean"),
                               lambda a: F.kl_div(F.log_softmax(a.float(), -1), F.log_softmax(s.float(), -1),
                                                  reduction="sum", log_target=True) / x.numel(), x),
    }


@pytest.mark.parametrize("case", list(_fp16_cases(np.random.default_rng(0))))
def test_float16_mean_gradients_survive_a_grad_scaler(rng, case):
    """fp16 inputs, "mean", a GradScaler-sized upstream gradient (65536): the
    gradient keeps what torch's float32 computation rounded once to fp16
    keeps.  Divided by the mean's divisor before being saved in fp16, most of
    it used to flush to zero first (at N=8192, C=1000 four elements in five,
    and the column sums that grad_weight sees 8% off)."""
    ours_fn, theirs_fn, x0 = _fp16_cases(rng)[case]
    a, b = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):  # as under GradScaler: the loss in float32
        lo = ours_fn(a)
    lt = theirs_fn(b)
    assert lo.dtype == torch.float32
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
    (lo * 65536.0).backward()
    (lt * 65536.0).backward()
    ga, gb = a.grad.float(), b.grad.float()
    assert torch.isfinite(ga).all()
    lost = int(((ga == 0) & (gb != 0)).sum())
    assert lost <= 0.05 * gb.numel(), lost  # elements below fp16's smallest subnormal before the scale
    torch.testing.assert_close(ga, gb, rtol=2e-3, atol=2e-3 * float(gb.abs().max()))


def test_float16_mean_edges_follow_torch():
    """The division after the op keeps the "mean" contract: all rows ignored
    gives a NaN loss and zero gradients; every valid row of class weight 0 a
    NaN loss, NaN gradients in the valid rows and zeros in the ignored ones
    (torch: NaN from nll_loss's target entry, spread over the row by
    log_softmax's backward)."""
    x = torch.randn(4, 5).half()
    t = torch.tensor([1, -100, 3, -100])
    a = x.clone().requires_grad_()
    loss = gpuloss.cross_entropy(a, torch.full((4,), -100))
    loss.backward()
    assert loss.isnan() and torch.equal(a.grad, torch.zeros_like(a.grad))
    w = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]).half()
    a = x.clone().requires_grad_()
    loss = gpuloss.cross_entropy(a, t, weight=w)
    loss.backward()
    assert loss.isnan()
    assert a.grad[[0, 2]].isnan().all() and torch.equal(a.grad[[1, 3]], torch.zeros(2, 5).half())


def test_float16_mean_binary_cross_entropy_gradient_stays_finite(rng):
    """BCE on fp16 probabilities near 0 or 1: the gradient (p - y) / (p (1 - p))
    is unbounded, ~-7e4 at p = 7.7e-6, past fp16's 65504.  Saved undivided (the
    fp16 "mean" path of the other losses) it was -inf where torch's, divided by
    the element count first, is finite (a CI seed of tests/test_autocast.py hit
    it); BCE keeps the division in the kernel."""
    F = torch.nn.functional
    p = torch.from_numpy(rng.uniform(0.05, 0.95, (6, 9))).half()
    p[2, 3], p[4, 1] = 7.689e-06, 1.0 - 2.0 ** -11  # p (1 - p) ~ 7.7e-6 and ~4.9e-4
    y = torch.from_numpy(rng.random((6, 9))).half()
    y[2, 3] = 0.568
    a, b = p.clone().requires_grad_(), p.clone().requires_grad_()
    gpuloss.binary_cross_entropy(a, y).backward()
    F.binary_cross_entropy(b.float(), y.float()).backward()
    assert torch.isfinite(a.grad).all(), a.grad
    torch.testing.assert_close(a.grad.float(), b.grad.half().float(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_float16_mean_mse_gradient_of_far_apart_values_stays_finite(backend):
    """fp16 mse_loss "mean" with autograd saves its gradient undivided (the
    fp16 "mean" path): 2 (x - y) overflowed fp16 wherever |x - y| > 32752,
    inf where torch's 2 (x - y) / N is finite.  The saved gradient is now
    x - y (exact for nearby values, overflowing only past 65504), its factor 2
    joining the upstream gradient in float32."""
    import os
    from gpuloss import dispatch
    if backend == "triton" and not (os.environ.get("TRITON_INTERPRET") == "1"
                                     and dispatch.backend_status()["triton"][0]):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    F = torch.nn.functional
    x = torch.tensor([[30000.0, -30000.0, 1.0, 2.5e-3], [0.5, 0.50048828125, -7.0, 6e-6]]).half()
    y = torch.tensor([[-30000.0, 30000.0, 0.0, -1e-3], [0.5, 0.5, 11.0, -3e-6]]).half()
    for upstream in (1.0, 1024.0):  # plain, and a loss scale (the far-apart elements' overflow then, as torch's)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        (gpuloss.mse_loss(a, y, backend=backend).float() * upstream).backward()
        (F.mse_loss(b, y).float() * upstream).backward()
        assert torch.isfinite(a.grad).all() or upstream != 1.0, a.grad
        assert torch.equal(torch.isfinite(a.grad), torch.isfinite(b.grad))
        # against the exact gradient rounded once (torch's own is 0.7% off at the subnormal pair in the last column)
        exact = (2.0 * (x.double() - y.double()) * upstream / x.numel()).half()
        torch.testing.assert_close(a.grad, exact, rtol=2.0 ** -10, atol=2.0 ** -24)


@pytest.mark.parametrize("case", ["cross_entropy", "inplace", "mse_loss", "kl_div_with_logits", "linear_sum",
                                  "linear_none"])
def test_backward_fills_no_zero_gradients_for_the_saved_outputs(case):
    """The operators' extra outputs (the saved gradient, lse) are never
    differentiated, but autograd materialised a zero upstream gradient for
    each in every backward: an N x C (linear CE: V x H) allocation and fill."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(64, 300, requires_grad=True)
    t = torch.randint(0, 300, (64,))
    W = torch.randn(300, 16, requires_grad=True)
    h = torch.randn(64, 16, requires_grad=True)
    loss = {
        "cross_entropy": lambda: gpuloss.cross_entropy(x, t, label_smoothing=0.1),
        "inplace": lambda: gpuloss.cross_entropy(x * 1.0, t, inplace_backward=True),
        "mse_loss": lambda: gpuloss.mse_loss(x, torch.randn(64, 300)),
        "kl_div_with_logits": lambda: gpuloss.kl_div_with_logits(x, torch.randn(64, 300)),
        "linear_sum": lambda: gpuloss.linear_cross_entropy(h, W, t, reduction="sum", chunk_size=16),
        "linear_none": lambda: gpuloss.linear_cross_entropy(h, W, t, reduction="none").sum(),  # one chunk
    }[case]()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    zeroed = [(e.name, e.input_shapes) for e in prof.events() if e.name in ("aten::zero_", "aten::zeros_like")]
    assert not zeroed, zeroed
    assert (x.grad if x.grad is not None else W.grad).abs().sum() > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("inplace", [False, True])
def test_scaled_grad_rounds_once_on_the_cpu_a_block_at_a_time(monkeypatch, dtype, inplace):
    """The saved 16-bit gradient times a float32 upstream gradient, rounded
    once: torch's CPU kernels formed the mixed-dtype product through float32
    copies of the whole (N, C) operands (1.25 GB for a 4096 x 32000 bf16
    gradient); a 0-d CPU scale is now a scalar to them, anything else runs
    a block of rows at a time."""
    monkeypatch.setattr(torch_ops, "_CPU_MIXED_BLOCK", 64)
    dt = getattr(torch, dtype)
    saved = torch.randn(37, 50).to(dt)
    for g in (torch.tensor(1 / 4096 * 1.2345), torch.tensor(65536.0 if dtype == "bfloat16" else 3.0),
              torch.rand(37), torch.rand(37, 50)):
        want = (saved.float() * (g[:, None] if g.dim() == 1 else g)).to(dt)
        s = saved.clone()
        got = torch_ops.scaled_grad(s, g, inplace=inplace)
        assert got.dtype == dt and torch.equal(got, want), g.shape
        assert (got.data_ptr() == s.data_ptr()) == inplace


def test_scaled_grad_has_no_float32_copy_of_the_gradient_on_the_cpu(monkeypatch):
    """No allocation beyond the result itself: the CPU's mixed-dtype product
    made a float32 copy of the bf16 operand and a float32 result (2x and 2x
    the gradient's bytes)."""
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.setattr(torch_ops, "_CPU_MIXED_BLOCK", 4096)
    saved = torch.randn(256, 1024).to(torch.bfloat16)
    for g in (torch.tensor(0.25), torch.rand(256), torch.rand(256, 1024)):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            torch_ops.scaled_grad(saved, g)
        biggest = max(e.cpu_memory_usage for e in prof.events())
        assert biggest <= saved.numel() * saved.element_size(), (g.shape, biggest)


@pytest.mark.parametrize("case", ["cross_entropy", "inplace", "linear_sum", "linear_none"])
def test_loss_without_upstream_gradient_gives_zero_gradients(case):
    """An upstream node that gives the loss no gradient (None): the inputs get
    zero gradients, as autograd's materialised zeros gave them (DDP expects a
    gradient for every used parameter), not None."""

    x = torch.randn(8, 30, requires_grad=True)
    h = torch.randn(8, 4, requires_grad=True)
    W = torch.randn(30, 4, requires_grad=True)
    t = torch.randint(0, 30, (8,))
    loss = {
        "cross_entropy": lambda: gpuloss.cross_entropy(x, t),
        "inplace": lambda: gpuloss.cross_entropy(x * 1.0, t, inplace_backward=True),
        "linear_sum": lambda: gpuloss.linear_cross_entropy(h, W, t, reduction="sum"),
        "linear_none": lambda: gpuloss.linear_cross_entropy(h, W, t, reduction="none"),
    }[case]()
    no_upstream(loss).sum().backward()
    for a in ((h, W) if case.startswith("linear") else (x,)):
        assert a.grad is not None and not a.grad.any()


def test_return_grad_in_eager_code_skips_the_dispatcher(rng, monkeypatch):
    """``return_grad`` on plain tensors in eager code runs the operator's body
    directly (torch's dispatcher and the custom-op wrappers cost ~150 us a call
    on the CPU, which on a GPU is more than a 32000-class row kernel: the
    benchmark measured the host, 0.545 ms where the kernel takes 0.381 ms on an
    H200); under a dispatch mode (make_fx, export, FakeTensor, a user's mode) the
    operator itself runs, and both give the same results, in place too."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    real_call = torch_ops.call
    monkeypatch.setattr(torch_ops, "call", lambda *a, **k: seen.append("op") or real_call(*a, **k))
    x = torch.from_numpy(rng.standard_normal((6, 11)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 11, 6))
    import os
    from gpuloss import dispatch
    triton_here = os.environ.get("TRITON_INTERPRET") == "1" and dispatch.backend_status()["triton"][0]
    for backend in ("numpy",) + (("triton",) if triton_here else ()):
        for inplace in (False, True):
            seen.clear()
            xe = x.clone()
            eager = gpuloss.cross_entropy(xe, t, label_smoothing=0.1, return_grad=True, inplace_backward=inplace,
                                          backend=backend)
            assert "op" not in seen and not seen, seen
            xm = x.clone()
            with Recorder():
                moded = gpuloss.cross_entropy(xm, t, label_smoothing=0.1, return_grad=True,
                                              inplace_backward=inplace, backend=backend)
            assert "op" in seen and any("gpuloss." in s for s in seen), seen
            torch.testing.assert_close(eager.loss, moded.loss, rtol=0, atol=0)
            torch.testing.assert_close(eager.grad, moded.grad, rtol=0, atol=0)
            if inplace:
                assert eager.grad is xe and moded.grad is xm


@pytest.mark.parametrize("case", ["ce", "ce_inplace", "ce_prob", "nll", "bce_logits", "mse", "kl_logits", "softmax",
                                  "log_softmax"])
def test_autograd_in_eager_code_skips_the_dispatcher(rng, case):
    """Differentiable calls on plain tensors in eager code run the operator's
    autograd formula around its body (torch_ops.call_differentiable), not the
    operator: torch's dispatcher and torch.library's autograd wrapper cost
    ~100 us a call on the CPU.  Under a dispatch mode (make_fx, export,
    FakeTensor, a user's mode) the operator runs.  Both give the same values
    and gradients, for an input that requires grad and for one that does not."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x0 = torch.from_numpy(rng.standard_normal((5, 7)))
    t = torch.from_numpy(rng.integers(0, 7, 5))
    p = torch.softmax(torch.from_numpy(rng.standard_normal((5, 7))), -1)
    go = torch.from_numpy(_upstream(rng, (5, 7)))
    fn = {
        "ce": lambda x: gpuloss.cross_entropy(x, t, label_smoothing=0.1, reduction="none"),
        "ce_inplace": lambda x: gpuloss.cross_entropy(x * 1.0, t, inplace_backward=True),
        "ce_prob": lambda x: gpuloss.cross_entropy(x, p, reduction="sum"),
        "nll": lambda x: gpuloss.nll_loss(x, t),
        "bce_logits": lambda x: gpuloss.binary_cross_entropy_with_logits(x, p, reduction="none"),
        "mse": lambda x: gpuloss.mse_loss(x, p),
        "kl_logits": lambda x: gpuloss.kl_div_with_logits(x, x0 * 0.5),
        "softmax": lambda x: gpuloss.softmax(x, dim=-1),
        "log_softmax": lambda x: gpuloss.log_softmax(x, dim=0),
    }[case]

    def run(mode: bool, requires_grad: bool):
        seen.clear()
        x = x0.clone().requires_grad_(requires_grad)
        if mode:
            with Recorder():
                out = fn(x)
        else:
            out = fn(x)
        ops = [s for s in seen if "gpuloss." in s]
        if not requires_grad:
            assert out.grad_fn is None
            return out, None, ops
        nodes, todo = [], [out.grad_fn]
        while todo:
            node = todo.pop()
            if node is not None:
                nodes.append(type(node).__name__)
                todo += [n for n, _ in node.next_functions]
        name = " ".join(nodes)
        (g,) = torch.autograd.grad(out, x, go.reshape(-1)[:out.numel()].reshape(out.shape))
        return out, (g, name), ops

    for requires_grad in (True, False):
        eager, eg, eager_ops = run(False, requires_grad)
        moded, mg, moded_ops = run(True, requires_grad)
        assert not eager_ops and moded_ops, (eager_ops, moded_ops)
        torch.testing.assert_close(eager, moded, rtol=0, atol=0)
        if requires_grad:
            torch.testing.assert_close(eg[0], mg[0], rtol=0, atol=0)
            if case == "ce_inplace":  # one autograd Function either way; what it runs is the operator or not
                assert "_InplaceFn" in eg[1] and "_InplaceFn" in mg[1], (eg[1], mg[1])
            else:
                assert "EagerFor_gpuloss_" in eg[1] and "GeneratedBackwardFor_" not in eg[1], eg[1]
                assert "GeneratedBackwardFor_" in mg[1], mg[1]


def test_kept_inputs_are_released_by_backward_as_saved_tensors_are():
    """The references kept for second derivatives go when a backward that does
    not retain the graph has run, as autograd's saved tensors do: a loss kept
    for logging (losses.append(loss)) must not keep every step's logits alive."""
    import gc
    import weakref
    t = torch.tensor([0, 1, 2])
    for fn in (lambda z: gpuloss.cross_entropy(z, t), lambda z: gpuloss.mse_loss(z, torch.zeros(3, 5))):
        for retain in (False, True):
            x = torch.randn(3, 5, requires_grad=True)
            z = x * 2.0
            alive = weakref.ref(z)
            loss = fn(z)
            del z
            loss.backward(retain_graph=retain)
            gc.collect()
            assert (alive() is None) == (not retain)


def test_second_derivatives_through_a_differentiated_class_weight_raise():
    """Probability targets with a class weight that requires grad: the weight's
    gradient is formed from -log p as a constant (a term added to the loss), so
    under create_graph=True it raises rather than miss its dependence on the
    logits; the logits' own second derivatives, and first order, are torch's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    p = torch.softmax(torch.randn(4, 5, dtype=torch.float64, generator=g), 1)
    w = torch.rand(5, dtype=torch.float64, generator=g, requires_grad=True)
    with pytest.raises(torch_ops.SecondOrderError, match="class weight"):
        torch.autograd.grad(gpuloss.cross_entropy(x, p, w), [x, w], create_graph=True)
    (gx,) = torch.autograd.grad(gpuloss.cross_entropy(x, p, w), x, create_graph=True)
    (ref,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x, p, w), x, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gx.pow(2).sum(), x)[0],
                               torch.autograd.grad(ref.pow(2).sum(), x)[0])
    ours = torch.autograd.grad(gpuloss.cross_entropy(x, p, w), [x, w])
    torch.testing.assert_close(ours, torch.autograd.grad(torch.nn.functional.cross_entropy(x, p, w), [x, w]))


def _more_second_order_forms():
    """(gpuloss's call, torch's call, inputs) of forms beyond torch's OpInfo samples."""
    g = torch.Generator().manual_seed(3)
    D = torch.float64
    F = torch.nn.functional
    x3 = torch.randn(3, 5, 4, dtype=D, generator=g)
    p3 = torch.softmax(torch.randn(3, 5, 4, dtype=D, generator=g), 1)
    t3 = torch.randint(0, 5, (3, 4), generator=g)
    t3[0, 1] = -100
    w = torch.rand(5, dtype=D, generator=g)
    x = torch.randn(4, 6, dtype=D, generator=g)
    tb = torch.randn(6, dtype=D, generator=g)
    pt = torch.softmax(torch.randn(6, dtype=D, generator=g), 0)
    tt = torch.rand(4, 6, dtype=D, generator=g)
    w1, pw = torch.rand(4, 1, dtype=D, generator=g), torch.rand(6, dtype=D, generator=g) * 3
    mw = torch.rand(4, 6, dtype=D, generator=g)
    forms = {}
    for red in ("mean", "sum", "none"):
        forms[f"cross_entropy k-dim probabilities weight {red}"] = (
            lambda f, a, b, red=red: f.cross_entropy(a, b, w, reduction=red, label_smoothing=0.1), (x3, p3))
        forms[f"cross_entropy k-dim indices weight {red}"] = (
            lambda f, a, red=red: f.cross_entropy(a, t3, w, reduction=red, label_smoothing=0.2), (x3,))
        forms[f"mse_loss broadcast target {red}"] = (lambda f, a, b, red=red: f.mse_loss(a, b, reduction=red), (x, tb))
        forms[f"kl_div broadcast target {red}"] = (lambda f, a, b, red=red: f.kl_div(a, b, reduction=red), (x, pt))
        forms[f"bce_with_logits broadcast weights {red}"] = (
            lambda f, a, b, red=red: f.binary_cross_entropy_with_logits(a, b, w1, reduction=red, pos_weight=pw),
            (x, tt))
        forms[f"mse_loss weight {red}"] = (lambda f, a, b, red=red: f.mse_loss(a, b, reduction=red, weight=mw), (x, tt))
    return {k: (lambda *a, fn=fn: fn(gpuloss, *a), lambda *a, fn=fn: fn(F, *a), ins) for k, (fn, ins) in forms.items()}


@pytest.mark.parametrize("case", list(_more_second_order_forms()))
def test_second_derivatives_in_more_forms(case):
    """K-dimensional inputs with class weights and either target kind,
    targets that broadcast and are differentiated, broadcast BCE weights,
    mse_loss's weight: the gradients with create_graph=True and the gradient of
    their product with a fixed tensor, with respect to every input, as torch's."""
    ours, theirs, inputs = _more_second_order_forms()[case]
    res = []
    for fn in (ours, theirs):
        xs = [i.clone().requires_grad_() for i in inputs]
        out = fn(*xs)
        up = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        gs = torch.autograd.grad(out, xs, up, create_graph=True)
        gen = torch.Generator().manual_seed(2)
        inner = sum((gi * torch.randn(gi.shape, dtype=gi.dtype, generator=gen)).sum()
                    for gi in gs if gi.requires_grad)
        res.append([out, *gs, *torch.autograd.grad(inner, xs, allow_unused=True)])
    for a, b in zip(*res):
        if a is None or b is None:
            assert (a if b is None else b) is None or not (a if b is None else b).any()
            continue
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("how", ["loss_dtype", "autocast"])
def test_second_derivatives_of_16_bit_logits_with_a_float32_loss(dtype, how):
    """A float32 loss of 16-bit logits (loss_dtype=float32, or CPU autocast):
    the second-order gradients equal torch's cross-entropy of the float32 logits."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(8, 33, generator=g).to(dtype)
    t = torch.randint(0, 33, (8,), generator=g)
    res = []
    for fn in (gpuloss.cross_entropy, torch.nn.functional.cross_entropy):
        x = x0.clone().requires_grad_()
        if how == "autocast":
            with torch.autocast("cpu", dtype=dtype):
                loss = fn(x, t)
        else:
            loss = fn(x, t, loss_dtype=torch.float32) if fn is gpuloss.cross_entropy else fn(x.float(), t)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        res.append((loss, gx, torch.autograd.grad(gx.float().pow(2).sum(), x)[0]))
    for a, b in zip(*res):
        torch.testing.assert_close(a.float(), b.float())


@pytest.mark.parametrize("name", ["cross_entropy", "bce_with_logits", "mse_loss", "kl_div_with_logits"])
def test_backward_scales_the_saved_gradient_in_place(rng, name):
    """A backward that frees the graph scales the gradient the forward pass
    saved in place and hands that buffer on: no second gradient-sized tensor
    at the peak of backward (4 GiB at 16384 x 128256 bf16; on this CPU, CE
    autograd 4096 x 32000 fp32 0.46 -> 0.27 s a step).  It allocated the
    product anew.  A backward that keeps the graph leaves the saved gradient
    as it was: a second backward gives the same gradients."""
    x0 = torch.from_numpy(rng.standard_normal((16, 9)))
    t = torch.from_numpy(rng.integers(0, 9, 16))
    p = torch.softmax(torch.from_numpy(rng.standard_normal((16, 9))), -1)
    call = {"cross_entropy": lambda x: gpuloss.cross_entropy(x, t, label_smoothing=0.1),
            "bce_with_logits": lambda x: gpuloss.binary_cross_entropy_with_logits(x, p),
            "mse_loss": lambda x: gpuloss.mse_loss(x, p),
            "kl_div_with_logits": lambda x: gpuloss.kl_div_with_logits(x, p, target_is_logits=False)}[name]
    ref = {"cross_entropy": lambda x: torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1),
           "bce_with_logits": lambda x: torch.nn.functional.binary_cross_entropy_with_logits(x, p),
           "mse_loss": lambda x: torch.nn.functional.mse_loss(x, p),
           "kl_div_with_logits": lambda x: (p * (p.log() - torch.log_softmax(x, -1))).sum(-1).mean()}[name]
    xr = x0.clone().requires_grad_()
    (ref(xr) * 3.0).backward()
    saved = []

    def pack(s):
        saved.append(s.data_ptr())
        return s

    x = x0.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        loss = call(x) * 3.0
    loss.backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert x.grad.data_ptr() in saved  # the saved buffer itself, scaled
    x2 = x0.clone().requires_grad_()
    loss = call(x2) * 3.0
    g1, = torch.autograd.grad(loss, x2, retain_graph=True)
    g2, = torch.autograd.grad(loss, x2)
    torch.testing.assert_close(g1, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, xr.grad, rtol=1e-12, atol=1e-12)


def test_parameters_take_the_eager_path(rng, monkeypatch):
    """An ``nn.Parameter`` passed as a loss's input (a regulariser, a
    learned embedding scored directly) is a plain tensor to every operator;
    it went through torch's dispatcher as a tensor subclass would (on this CPU
    mse_loss forward+backward 372 -> 277 us a call).  The results and the
    gradients in ``param.grad`` are torch's."""
    from gpuloss import torch_ops

    def dispatched(*args, **kwargs):
        raise AssertionError("went through torch's dispatcher")

    x0 = torch.from_numpy(rng.standard_normal((6, 5)))
    t = torch.from_numpy(rng.integers(0, 5, 6))
    y = torch.from_numpy(rng.random((6, 5)))
    calls = {"cross_entropy": (lambda m, a: m.cross_entropy(a, t)),
             "mse_loss": (lambda m, a: m.mse_loss(a, y)),
             "bce_with_logits": (lambda m, a: m.binary_cross_entropy_with_logits(a, y)),
             "softmax": (lambda m, a: (m.softmax(a, -1) * y).sum())}
    for name, call in calls.items():
        want_p = torch.nn.Parameter(x0.clone())
        want = call(torch.nn.functional, want_p)
        want.backward()
        p = torch.nn.Parameter(x0.clone())
        with monkeypatch.context() as m:
            m.setattr(torch_ops, "call", dispatched)
            got = call(gpuloss, p)
            got.backward()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(p.grad, want_p.grad, rtol=1e-12, atol=1e-12, msg=name)
