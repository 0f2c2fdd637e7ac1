"""cross_entropy(..., inplace_backward=True): the gradient written over the
logits, its aliasing, and the errors that protect autograd from it."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpuloss  # noqa: E402
from gpuloss import reference as R  # noqa: E402

from conftest import tol  # noqa: E402

N, H, C = 6, 5, 23


def _setup(rng, dtype=torch.float64):
    h = torch.from_numpy(rng.standard_normal((N, H))).to(dtype)
    W = torch.from_numpy(rng.standard_normal((C, H))).to(dtype).requires_grad_()
    t = torch.from_numpy(rng.integers(0, C, N))
    return h, W, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0, ignore_index=3)],
                         ids=["plain", "all-options"])
def test_gradient_overwrites_logits_and_flows_upstream(rng, reduction, opts):
    h, W, t = _setup(rng)
    w_np = rng.uniform(0.5, 1.5, C)
    logits = torch.nn.functional.linear(h, W)
    z = logits.detach().numpy().copy()
    ptr = logits.data_ptr()
    seen = {}
    logits.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    loss = gpuloss.cross_entropy(logits, t, weight=torch.from_numpy(w_np), reduction=reduction,
                                 inplace_backward=True, **opts)
    kw = dict(weight=w_np, reduction=reduction, **opts)
    np.testing.assert_allclose(loss.detach().numpy(), R.cross_entropy(z, t.numpy(), **kw), **tol("float64"))
    # the forward pass left dL/dlogits (upstream 1) in the logits buffer
    g1, _ = R.cross_entropy_grad(z, t.numpy(), **kw)
    np.testing.assert_allclose(logits.detach().numpy(), g1, **tol("float64"))
    go = rng.uniform(0.5, 2.0, np.shape(loss)) * rng.choice([-1, 1], np.shape(loss))
    loss.backward(torch.from_numpy(np.asarray(go)))
    g, _ = R.cross_entropy_grad(z, t.numpy(), **kw, grad_output=go)
    np.testing.assert_allclose(W.grad.numpy(), g.T @ h.numpy(), **tol("float64"))
    # the gradient handed upstream is the logits buffer itself, scaled in place
    assert seen["ptr"] == ptr
    np.testing.assert_allclose(logits.detach().numpy(), g, **tol("float64"))


def test_probability_targets_get_their_gradient_too(rng):
    h, W, _ = _setup(rng)
    d_np = rng.dirichlet(np.ones(C), N)
    d = torch.from_numpy(d_np).requires_grad_()
    logits = torch.nn.functional.linear(h, W)
    z = logits.detach().numpy().copy()
    loss = gpuloss.cross_entropy(logits, d, label_smoothing=0.2, inplace_backward=True)
    (1.7 * loss).backward()
    gx, gd = R.cross_entropy_grad(z, d_np, label_smoothing=0.2, grad_output=1.7)
    np.testing.assert_allclose(W.grad.numpy(), gx.T @ h.numpy(), **tol("float64"))
    np.testing.assert_allclose(d.grad.numpy(), gd, **tol("float64"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_gradient_rounded_once_into_the_logits(rng, dtype):
    tdt = getattr(torch, dtype)
    h, W, t = _setup(rng, tdt)
    W32 = W.detach().clone()
    logits = torch.nn.functional.linear(h, W)
    z = logits.detach().double().numpy().copy()
    ptr = logits.data_ptr()
    loss = gpuloss.cross_entropy(logits, t, inplace_backward=True)
    assert logits.data_ptr() == ptr and logits.dtype == tdt
    g, _ = R.cross_entropy_grad(z, t.numpy())
    np.testing.assert_allclose(logits.detach().double().numpy(), g, **tol(dtype))
    loss.backward()
    assert W.grad.dtype == tdt
    np.testing.assert_allclose(W.grad.double().numpy(), g.T @ h.double().numpy(), rtol=tol(dtype)["rtol"] * 4,
                               atol=tol(dtype)["atol"] * 4)
    assert torch.equal(W.detach(), W32)  # parameters untouched


def test_same_result_as_out_of_place(rng):
    h, W, t = _setup(rng, torch.float32)
    W2 = W.detach().clone().requires_grad_()
    l1 = gpuloss.cross_entropy(torch.nn.functional.linear(h, W), t, label_smoothing=0.1)
    l2 = gpuloss.cross_entropy(torch.nn.functional.linear(h, W2), t, label_smoothing=0.1, inplace_backward=True)
    (l1 * 0.3).backward()
    (l2 * 0.3).backward()
    assert torch.equal(l1.detach(), l2.detach())
    torch.testing.assert_close(W.grad, W2.grad, rtol=0, atol=0)


def test_leaf_that_requires_grad_is_refused(rng):
    x = torch.from_numpy(rng.standard_normal((N, C))).requires_grad_()
    before = x.detach().clone()
    t = torch.from_numpy(rng.integers(0, C, N))
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        gpuloss.cross_entropy(x, t, inplace_backward=True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        gpuloss.cross_entropy(x.view(N, C), t, inplace_backward=True)  # a view of the leaf
    assert torch.equal(x.detach(), before)


def test_inference_tensor_outside_inference_mode_is_refused(rng):
    """torch allows no in-place update of an inference tensor outside inference_mode."""
    with torch.inference_mode():
        x = torch.from_numpy(rng.standard_normal((N, C)))
    before = x.clone()
    t = torch.from_numpy(rng.integers(0, C, N))
    with pytest.raises(RuntimeError):
        x.mul_(1.0)
    with pytest.raises(ValueError, match="inference tensor"):
        gpuloss.cross_entropy(x, t, inplace_backward=True, return_grad=True)
    assert torch.equal(x, before)
    with torch.inference_mode():  # inside it, as torch's own in-place operations
        res = gpuloss.cross_entropy(x, t, inplace_backward=True, return_grad=True)
        assert res.grad.data_ptr() == x.data_ptr()


def test_logits_saved_by_their_producer_are_refused(rng):
    h, W, t = _setup(rng)
    logits = torch.tanh(torch.nn.functional.linear(h, W))  # tanh saves its output for backward
    before = logits.detach().clone()
    with pytest.raises(ValueError, match="saved them for its own backward"):
        gpuloss.cross_entropy(logits, t, inplace_backward=True)
    assert torch.equal(logits.detach(), before)


def test_logits_saved_by_another_consumer_fail_loudly(rng):
    """An op that saved the logits before they were overwritten would compute
    its gradient from the gradient: the version counter catches it."""
    h, W, t = _setup(rng)
    logits = torch.nn.functional.linear(h, W)
    aux = (logits * logits).sum()  # mul saves logits
    loss = gpuloss.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + 1e-3 * aux).backward()


def test_modifying_the_buffer_before_backward_fails_loudly(rng):
    h, W, t = _setup(rng)
    logits = torch.nn.functional.linear(h, W)
    loss = gpuloss.cross_entropy(logits, t, inplace_backward=True)
    with torch.no_grad():
        logits.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_second_backward_fails_loudly(rng):
    h, W, t = _setup(rng)
    loss = gpuloss.cross_entropy(torch.nn.functional.linear(h, W), t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_nothing_written_when_no_gradient_is_needed(rng):
    h, W, t = _setup(rng)
    logits = torch.nn.functional.linear(h, W.detach())
    before = logits.clone()
    loss = gpuloss.cross_entropy(logits, t, inplace_backward=True)
    assert torch.equal(logits, before)
    with torch.no_grad():
        logits2 = torch.nn.functional.linear(h, W)
        before2 = logits2.clone()
        loss2 = gpuloss.cross_entropy(logits2, t, inplace_backward=True)
    assert torch.equal(logits2, before2)
    np.testing.assert_allclose(loss.numpy(), R.cross_entropy(before.numpy(), t.numpy()), **tol("float64"))
    np.testing.assert_allclose(loss2.numpy(), loss.numpy(), rtol=0, atol=0)


def _transposed(x):
    return x.t().contiguous().t()  # (N, C) with strides (1, N)


def _strided_columns(x):
    return x.repeat_interleave(2, 1)[:, ::2]  # (N, C) with strides (2C, 2)


def _class_dim_1(x):
    return x.reshape(2, N // 2, C).transpose(1, 2).contiguous()  # (2, C, N/2): the class dimension not last


def _autocast_bf16(x):
    return x.bfloat16()  # with float32 class weights: cast to float32 under torch.autocast, as torch casts it


@pytest.mark.parametrize("layout", [_transposed, _strided_columns, _class_dim_1, _autocast_bf16],
                         ids=lambda f: f.__name__[1:])
def test_logits_the_op_copies_keep_their_values_and_get_the_exact_gradient(backend, rng, layout):
    """Where the op works on a copy of the logits (not row-major rows in their
    dtype), the copy takes the gradient and the logits keep their values (no
    second logits-sized buffer kept until backward); the gradient reaching
    the logits' producer is exact."""
    h, W, t = _setup(rng, torch.float32)
    h, W, t = h.to(backend.device), W.detach().to(backend.device).requires_grad_(), t.to(backend.device)
    logits = layout(torch.nn.functional.linear(h, W))
    before = logits.detach().clone()

    def as_rows(x):
        return (x if x.ndim == 2 else x.transpose(1, 2).reshape(N, C)).detach().cpu().double().numpy()

    z, t_np = as_rows(logits), t.cpu().numpy()
    opts = dict(label_smoothing=0.1, z_loss=1e-2, ignore_index=int(t_np[0]))
    autocast = layout is _autocast_bf16
    weight = torch.ones(C, device=backend.device) if autocast else None
    with torch.autocast(backend.device, dtype=torch.bfloat16, enabled=autocast):
        loss = gpuloss.cross_entropy(logits, t if logits.ndim == 2 else t.reshape(2, N // 2), weight,
                                     inplace_backward=True, backend=backend.name, **opts)
    assert torch.equal(logits.detach(), before)
    loss.backward(torch.tensor(1.7, device=backend.device))
    g, _ = R.cross_entropy_grad(z, t_np, **opts, grad_output=1.7)
    dt = "bfloat16" if autocast else "float32"
    np.testing.assert_allclose(W.grad.cpu().double().numpy(), g.T @ h.cpu().double().numpy(), **tol(dt))
    assert torch.equal(logits.detach(), before)


def test_return_grad_in_place_bumps_the_version_counter(rng):
    """``return_grad`` with ``inplace_backward`` overwrites the logits outside
    autograd; a node that saved them for its backward must still see the
    write (the version counter), in eager code as through the operator,
    whose schema marks the logits mutated."""
    h, W, t = _setup(rng)
    logits = torch.nn.functional.linear(h, W)
    aux = (logits * logits).sum()  # mul saves logits
    before = logits._version
    res = gpuloss.cross_entropy(logits.detach(), t, inplace_backward=True, return_grad=True)
    assert res.grad.data_ptr() == logits.data_ptr() and logits._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        aux.backward()
