"""The float64 reference against torch.nn.functional (1e-12) and its
gradients against central finite differences."""
from __future__ import annotations

import numpy as np
import pytest

from gpuloss import reference as R

torch = pytest.importorskip("torch")
F = torch.nn.functional

AGREE = dict(rtol=1e-12, atol=1e-12)


def T(a):
    return torch.from_numpy(np.asarray(a))


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of scalar f at x (float64)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = float(f(x))
        x[i] = old - eps
        fm = float(f(x))
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


# --------------------------------------------------------------- softmax

@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_matches_torch(rng, dim):
    x = rng.standard_normal((4, 5, 6)) * 3
    np.testing.assert_allclose(R.softmax(x, dim), F.softmax(T(x), dim).numpy(), **AGREE)
    np.testing.assert_allclose(R.log_softmax(x, dim), F.log_softmax(T(x), dim).numpy(), **AGREE)


@pytest.mark.parametrize("log", [False, True])
def test_softmax_backward_matches_autograd(rng, log):
    x = rng.standard_normal((3, 7))
    dy = rng.standard_normal((3, 7))
    xt = T(x).requires_grad_()
    y = (F.log_softmax if log else F.softmax)(xt, -1)
    y.backward(T(dy))
    ours = (R.log_softmax_backward if log else R.softmax_backward)(y.detach().numpy(), dy)
    np.testing.assert_allclose(ours, xt.grad.numpy(), **AGREE)


def test_softmax_extreme_and_masked():
    x = np.array([[1e4, -1e4, 0.0, -np.inf], [-np.inf, -np.inf, 3.0, 2.0]])
    np.testing.assert_allclose(R.softmax(x), F.softmax(T(x), -1).numpy(), **AGREE)
    assert np.all(np.isfinite(R.log_softmax(x)[:, :3][1, 2:]))


# --------------------------------------------------------------- cross-entropy

CE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(weight=True, reduction="none"),
    dict(ignore_index=2),
    dict(weight=True, ignore_index=1, label_smoothing=0.2),
    dict(label_smoothing=0.1, reduction="sum"),
    dict(label_smoothing=0.3, weight=True, reduction="none", ignore_index=0),
]


def _ce_inputs(rng, shape, C, opts):
    x = rng.standard_normal(shape) * 2
    tshape = (shape[0],) + shape[2:] if len(shape) > 1 else ()
    t = rng.integers(0, C, size=tshape)
    w = rng.uniform(0.5, 2.0, C) if opts.pop("weight", False) else None
    return x, t, w, opts


@pytest.mark.parametrize("opts", CE_CASES)
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 2, 3), (5,)])
def test_cross_entropy_matches_torch(rng, opts, shape):
    opts = dict(opts)
    C = shape[1] if len(shape) > 1 else shape[0]
    x, t, w, opts = _ce_inputs(rng, shape, C, opts)
    ours = R.cross_entropy(x, t, weight=w, **opts)
    theirs = F.cross_entropy(T(x), T(t), weight=None if w is None else T(w), **opts).numpy()
    np.testing.assert_allclose(ours, theirs, **AGREE)
    xt = T(x).requires_grad_()
    out = F.cross_entropy(xt, T(t), weight=None if w is None else T(w), **opts)
    go = rng.standard_normal(out.shape)
    out.backward(T(go))
    gi, gt = R.cross_entropy_grad(x, t, weight=w, grad_output=go, **opts)
    assert gt is None
    np.testing.assert_allclose(gi, xt.grad.numpy(), **AGREE)


@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum"), dict(reduction="none"),
                                  dict(weight=True, label_smoothing=0.25), dict(label_smoothing=0.1, reduction="none")])
def test_cross_entropy_probability_targets_match_torch(rng, opts):
    opts = dict(opts)
    w = rng.uniform(0.5, 2.0, 5) if opts.pop("weight", False) else None
    x = rng.standard_normal((4, 5, 3))
    t = R.softmax(rng.standard_normal((4, 5, 3)), 1)
    xt, tt = T(x).requires_grad_(), T(t).requires_grad_()
    out = F.cross_entropy(xt, tt, weight=None if w is None else T(w), **opts)
    np.testing.assert_allclose(R.cross_entropy(x, t, weight=w, **opts), out.detach().numpy(), **AGREE)
    go = rng.standard_normal(out.shape)
    out.backward(T(go))
    gi, gt = R.cross_entropy_grad(x, t, weight=w, grad_output=go, **opts)
    np.testing.assert_allclose(gi, xt.grad.numpy(), **AGREE)
    np.testing.assert_allclose(gt, tt.grad.numpy(), **AGREE)


def test_cross_entropy_empty_and_all_ignored_match_torch():
    x = np.zeros((0, 4))
    t = np.zeros((0,), dtype=np.int64)
    for red in ("mean", "sum", "none"):
        ours = R.cross_entropy(x, t, reduction=red)
        theirs = F.cross_entropy(T(x), T(t), reduction=red).numpy()
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    x = np.random.default_rng(0).standard_normal((3, 4))
    t = np.full(3, -100)
    assert np.isnan(R.cross_entropy(x, t)) and np.isnan(F.cross_entropy(T(x), T(t)).item())
    xt = T(x).requires_grad_()
    F.cross_entropy(xt, T(t), reduction="sum").backward()
    np.testing.assert_array_equal(R.cross_entropy_grad(x, t, reduction="sum")[0], xt.grad.numpy())


def test_cross_entropy_masked_logits_match_torch():
    """A -inf logit (masked vocabulary) gives a finite loss, as in PyTorch."""
    x = np.array([[1.0, -np.inf, 0.5, 2.0], [0.0, 1.0, -np.inf, 3.0]])
    t = np.array([0, 3])
    np.testing.assert_allclose(R.cross_entropy(x, t, reduction="none"),
                               F.cross_entropy(T(x), T(t), reduction="none").numpy(), **AGREE)
    np.testing.assert_allclose(R.cross_entropy(x, np.array([-100, 3]), ignore_index=-100),
                               F.cross_entropy(T(x), T(np.array([-100, 3]))).numpy(), **AGREE)


def test_cross_entropy_out_of_range_target_raises():
    with pytest.raises(ValueError, match="target"):
        R.cross_entropy(np.zeros((2, 3)) + 1.0, np.array([0, 3]))


@pytest.mark.parametrize("opts", [
    dict(z_loss=1e-2), dict(softcap=3.0), dict(z_loss=0.1, softcap=2.0, label_smoothing=0.1, weight=True),
    dict(z_loss=0.05, reduction="none", ignore_index=1), dict(softcap=1.5, reduction="sum"),
])
def test_cross_entropy_extensions_finite_differences(rng, opts):
    opts = dict(opts)
    x, t, w, opts = _ce_inputs(rng, (4, 6), 6, opts)
    go = rng.standard_normal(R.cross_entropy(x, t, weight=w, **opts).shape)
    gi, _ = R.cross_entropy_grad(x, t, weight=w, grad_output=go, **opts)
    num = fd_grad(lambda v: np.sum(go * R.cross_entropy(v, t, weight=w, **opts)), x)
    np.testing.assert_allclose(gi, num, rtol=1e-6, atol=1e-8)


def test_cross_entropy_z_loss_and_softcap_definitions(rng):
    x = rng.standard_normal((5, 7)) * 4
    t = rng.integers(0, 7, 5)
    lse = np.log(np.exp(x).sum(1))
    np.testing.assert_allclose(R.cross_entropy(x, t, z_loss=0.3, reduction="none"),
                               R.cross_entropy(x, t, reduction="none") + 0.3 * lse ** 2, rtol=1e-13)
    capped = 2.0 * np.tanh(x / 2.0)
    np.testing.assert_allclose(R.cross_entropy(x, t, softcap=2.0), R.cross_entropy(capped, t), rtol=1e-13)


def test_cross_entropy_probability_target_grad_fd(rng):
    x = rng.standard_normal((3, 4))
    d = R.softmax(rng.standard_normal((3, 4)))
    gi, gt = R.cross_entropy_grad(x, d, z_loss=0.2, label_smoothing=0.1)
    np.testing.assert_allclose(gi, fd_grad(lambda v: R.cross_entropy(v, d, z_loss=0.2, label_smoothing=0.1), x),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gt, fd_grad(lambda v: R.cross_entropy(x, v, z_loss=0.2, label_smoothing=0.1), d),
                               rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------- nll

@pytest.mark.parametrize("opts", [dict(), dict(reduction="none"), dict(weight=True, ignore_index=2, reduction="mean")])
def test_nll_matches_torch(rng, opts):
    opts = dict(opts)
    w = rng.uniform(0.5, 2, 5) if opts.pop("weight", False) else None
    x = R.log_softmax(rng.standard_normal((6, 5)))
    t = rng.integers(0, 5, 6)
    xt = T(x).requires_grad_()
    out = F.nll_loss(xt, T(t), weight=None if w is None else T(w), **opts)
    np.testing.assert_allclose(R.nll_loss(x, t, weight=w, **opts), out.detach().numpy(), **AGREE)
    go = rng.standard_normal(out.shape)
    out.backward(T(go))
    np.testing.assert_allclose(R.nll_loss_grad(x, t, weight=w, grad_output=go, **opts)[0], xt.grad.numpy(), **AGREE)


# --------------------------------------------------------------- KL

@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_torch(rng, reduction, log_target):
    x = R.log_softmax(rng.standard_normal((4, 6)))
    t = R.softmax(rng.standard_normal((4, 6)))
    t[0, 0] = 0.0  # 0 log 0 = 0
    if log_target:
        t = np.log(t + 0.1)
    xt, tt = T(x).requires_grad_(), T(t).requires_grad_()
    out = F.kl_div(xt, tt, reduction=reduction, log_target=log_target)
    np.testing.assert_allclose(R.kl_div(x, t, reduction, log_target), out.detach().numpy(), **AGREE)
    go = rng.standard_normal(out.shape)
    out.backward(T(go))
    gi, gt = R.kl_div_grad(x, t, reduction, log_target, grad_output=go)
    np.testing.assert_allclose(gi, xt.grad.numpy(), **AGREE)
    if log_target:  # torch's grad w.r.t. a zero target is -inf*0 territory; compare where t > 0
        np.testing.assert_allclose(gt, tt.grad.numpy(), **AGREE)
    else:
        m = t > 0
        np.testing.assert_allclose(gt[m], tt.grad.numpy()[m], **AGREE)


@pytest.mark.parametrize("target_is_logits", [True, False])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_kl_div_with_logits(rng, target_is_logits, reduction):
    T_ = 2.5
    x = rng.standard_normal((3, 5))
    t = rng.standard_normal((3, 5)) if target_is_logits else R.softmax(rng.standard_normal((3, 5)))
    d = R.softmax(t / T_) if target_is_logits else t
    rows = np.sum(d * (np.log(d) - R.log_softmax(x / T_)), -1)
    expect = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / 3, "mean": rows.sum() / 15}[reduction]
    np.testing.assert_allclose(R.kl_div_with_logits(x, t, T_, reduction, target_is_logits), expect, rtol=1e-13)
    # against torch's kl_div on log-probabilities for 2-D inputs
    if reduction != "none":
        theirs = F.kl_div(F.log_softmax(T(x) / T_, -1), T(np.log(d)), reduction=reduction, log_target=True)
        np.testing.assert_allclose(R.kl_div_with_logits(x, t, T_, reduction, target_is_logits), theirs.numpy(), **AGREE)
    go = rng.standard_normal(np.shape(expect))
    gi, gt = R.kl_div_with_logits_grad(x, t, T_, reduction, target_is_logits, grad_output=go)
    f = lambda a, b: np.sum(go * R.kl_div_with_logits(a, b, T_, reduction, target_is_logits))
    np.testing.assert_allclose(gi, fd_grad(lambda v: f(v, t), x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gt, fd_grad(lambda v: f(x, v), t), rtol=1e-6, atol=1e-8)
    if reduction == "sum":  # the lecture's gradient: (softmax(z/T) - d) / T
        # an absolute floor: q - d cancels in some element, where sum(d) q - d's rounding (1e-16 of q)
        # is far above 1e-12 of the difference (seed 2548669118: 1.4e-17 on 9.8e-6)
        want = go * (R.softmax(x / T_) - d) / T_
        np.testing.assert_allclose(gi, want, rtol=1e-12, atol=1e-14 * np.abs(want).max())


# --------------------------------------------------------------- BCE, MSE

@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weights", ["none", "weight", "pos_weight", "both"])
def test_bce_with_logits_matches_torch(rng, reduction, weights):
    x = rng.standard_normal((5, 4)) * 3
    x[0, 0], x[0, 1] = 40.0, -40.0
    t = rng.uniform(0, 1, (5, 4))
    w = rng.uniform(0.5, 2, (5, 4)) if weights in ("weight", "both") else None
    pw = rng.uniform(0.5, 3, 4) if weights in ("pos_weight", "both") else None
    xt, tt = T(x).requires_grad_(), T(t).requires_grad_()
    out = F.binary_cross_entropy_with_logits(xt, tt, weight=None if w is None else T(w),
                                             pos_weight=None if pw is None else T(pw), reduction=reduction)
    np.testing.assert_allclose(R.binary_cross_entropy_with_logits(x, t, w, pw, reduction), out.detach().numpy(), **AGREE)
    go = rng.standard_normal(out.shape)
    out.backward(T(go))
    gi, gt = R.binary_cross_entropy_with_logits_grad(x, t, w, pw, reduction, grad_output=go)
    np.testing.assert_allclose(gi, xt.grad.numpy(), **AGREE)
    np.testing.assert_allclose(gt, tt.grad.numpy(), **AGREE)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_matches_torch(rng, reduction):
    p = rng.uniform(0.01, 0.99, (4, 5))
    p[0, 0], p[0, 1] = 0.0, 1.0  # the -100 clamp
    t = rng.uniform(0, 1, (4, 5))
    w = rng.uniform(0.5, 2, (4, 5))
    pt, tt = T(p).requires_grad_(), T(t).requires_grad_()
    out = F.binary_cross_entropy(pt, tt, weight=T(w), reduction=reduction)
    np.testing.assert_allclose(R.binary_cross_entropy(p, t, w, reduction), out.detach().numpy(), **AGREE)
    go = rng.standard_normal(out.shape)
    out.backward(T(go))
    gp, gt = R.binary_cross_entropy_grad(p, t, w, reduction, grad_output=go)
    np.testing.assert_allclose(gp, pt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gt, tt.grad.numpy(), **AGREE)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_matches_torch_and_lecture(rng, reduction):
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    xt, tt = T(x).requires_grad_(), T(t).requires_grad_()
    out = F.mse_loss(xt, tt, reduction=reduction)
    np.testing.assert_allclose(R.mse_loss(x, t, reduction), out.detach().numpy(), **AGREE)
    go = rng.standard_normal(out.shape)
    out.backward(T(go))
    gi, gt = R.mse_loss_grad(x, t, reduction, grad_output=go)
    np.testing.assert_allclose(gi, xt.grad.numpy(), **AGREE)
    np.testing.assert_allclose(gt, tt.grad.numpy(), **AGREE)
    # the lecture: L2 = 1/2 ||Y - d||^2 = mse(sum) / 2, gradient Y - d
    np.testing.assert_allclose(0.5 * np.sum((x - t) ** 2), R.mse_loss(x, t, "sum") / 2)
    np.testing.assert_allclose(R.mse_loss_grad(x, t, "sum")[0] / 2, x - t)


def test_lecture_gradient_softmax_minus_target(rng):
    """dKL/dz = softmax(z) - d for one-hot d (the lecture's central identity)."""
    z = rng.standard_normal((4, 6))
    t = rng.integers(0, 6, 4)
    d = np.eye(6)[t]
    gi, _ = R.cross_entropy_grad(z, t, reduction="sum")
    np.testing.assert_allclose(gi, R.softmax(z) - d, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("offset", [1e16, 1e30, -1e30])
def test_large_shared_offset_is_exact(rng, offset):
    """The reference's softmax, log_softmax and cross-entropy of logits with
    a large shared offset (exactly representable differences) equal those of
    the unshifted logits: x - lse with lse = max + log(sum) dropped log(sum)
    there (softmax of [0, 1, 2] + 1e30 was [1, 1, 1], its cross-entropy 0)."""
    x = rng.integers(-4, 5, (4, 6)).astype(np.float64)  # exact next to 1e16 (spacing 2)
    if abs(offset) > 1e20:  # spacing 1.4e14 there: rows of equal logits, softmax 1/C, loss log C
        x = np.zeros((4, 6))
    t = rng.integers(0, 6, 4)
    shifted = x + offset
    np.testing.assert_allclose(R.softmax(shifted), R.softmax(shifted - offset), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(R.log_softmax(shifted), R.log_softmax(shifted - offset), rtol=1e-12)
    np.testing.assert_allclose(R.cross_entropy(shifted, t, label_smoothing=0.1),
                               R.cross_entropy(shifted - offset, t, label_smoothing=0.1), rtol=1e-12)


def test_kl_div_with_logits_of_a_student_row_of_minus_inf_is_nan():
    """A student row of -inf only has no softmax: its KL is NaN (torch's log_softmax, and both
    backends), whatever the target; the reference's 0 log(0 / q) = 0 convention gave 0 for a
    target row of zeros."""
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.5, 1.0, -1.0]])
    d = np.array([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    row = R.kl_div_with_logits(x, d, reduction="none", target_is_logits=False)
    assert np.isnan(row[0]) and np.isfinite(row[1])
