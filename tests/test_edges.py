"""Edges where gpuloss must behave as torch does, on every backend: shared
memory under ``inplace_backward``, empty shapes, argument types, zero class
weights, the out-of-range target contract, broadcasting, ``dtype=``.

Each body runs on every backend (``backend`` fixture) through the public
functions on torch tensors of that backend's device, against torch itself;
the NumPy-array path is checked where it has its own code.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest

import gpuloss
from prims import prim

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t(backend, a, dtype=torch.float64, **kw):
    return torch.as_tensor(np.asarray(a), dtype=dtype).to(backend.device).requires_grad_(kw.get("grad", False))


def _same(ours, theirs, rtol=1e-10, atol=1e-12):
    """Equal values, equal NaN positions, equal shape and dtype."""
    assert tuple(ours.shape) == tuple(theirs.shape), (ours.shape, theirs.shape)
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    o, t = ours.detach().cpu().double(), theirs.detach().cpu().double()
    assert torch.equal(o.isnan(), t.isnan()), (o, t)
    torch.testing.assert_close(o.nan_to_num(), t.nan_to_num(), rtol=rtol, atol=atol)


# ------------------------------------------------------------ 1. shared memory

def _overlapping_views(xp_base):
    """(name, view) pairs whose elements share memory."""
    return [
        ("stride-0 rows", np.lib.stride_tricks.as_strided(xp_base, (4, 5), (0, xp_base.itemsize))),
        ("overlapping rows", np.lib.stride_tricks.as_strided(xp_base, (4, 5), (xp_base.itemsize, xp_base.itemsize))),
    ]


def test_inplace_refuses_expanded_tensor(backend, rng):
    base = torch.tensor(rng.standard_normal((1, 5)), dtype=torch.float32, device=backend.device)
    before = base.clone()
    t = torch.tensor([0, 1, 2, 3], device=backend.device)
    with pytest.raises(ValueError, match="input.*share memory"):  # return_grad form
        gpuloss.cross_entropy(base.expand(4, 5), t, inplace_backward=True, return_grad=True, backend=backend.name)
    leaf = base.clone().requires_grad_()
    with pytest.raises(ValueError, match="input.*share memory"):  # autograd form
        gpuloss.cross_entropy((leaf * 1).expand(4, 5), t, inplace_backward=True, backend=backend.name)
    assert torch.equal(base, before)
    # no gradient formed (nothing requires grad, no return_grad): nothing is written, as torch
    gpuloss.cross_entropy(base.expand(4, 5), t, inplace_backward=True, backend=backend.name)
    assert torch.equal(base, before)


@pytest.mark.parametrize("which", [0, 1])
def test_inplace_refuses_overlapping_numpy_views(rng, which):
    base = rng.standard_normal(16).astype(np.float32)
    before = base.copy()
    name, x = _overlapping_views(base)[which]
    with pytest.raises(ValueError, match="input.*share memory"):
        gpuloss.cross_entropy(x, np.array([0, 1, 2, 3]), inplace_backward=True, return_grad=True)
    np.testing.assert_array_equal(base, before)


def test_inplace_refuses_read_only_numpy(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    x.setflags(write=False)
    with pytest.raises(ValueError, match="input.*read-only"):
        gpuloss.cross_entropy(x, np.array([0, 1, 2, 3]), inplace_backward=True, return_grad=True)


def test_overlap_rule_is_exact_on_interleaved_strides():
    from gpuloss._validate import strides_overlap
    assert not strides_overlap((3, 2), (2, 3))     # offsets 0 2 4 3 5 7: distinct
    assert strides_overlap((3, 2), (1, 2))         # 0 1 2 2 3 4: 2 twice
    assert strides_overlap((4, 5), (0, 1))
    assert not strides_overlap((4, 5), (5, 1))
    assert not strides_overlap((4, 5), (1, 4))
    assert not strides_overlap((0, 5), (0, 0))


def test_inplace_writes_into_input_when_rows_are_a_copy(backend, rng):
    """Class dimension not last (3-D logits): the rows are a copy, and the
    gradient must still end up in ``input`` (return_grad form)."""
    x0 = rng.standard_normal((2, 5, 3))
    t = rng.integers(0, 5, (2, 3))
    ref = torch.tensor(x0, requires_grad=True)
    F.cross_entropy(ref, torch.tensor(t)).backward()
    x = _t(backend, x0)
    out = gpuloss.cross_entropy(x, _t(backend, t, torch.int64), inplace_backward=True, return_grad=True,
                                backend=backend.name)
    assert out.grad.data_ptr() == x.data_ptr()
    _same(x, ref.grad, rtol=1e-9)


# ------------------------------------------------------------ 3. empty shapes

CE_EMPTY = [((3, 0), (3,)), ((0, 5), (0,)), ((0,), ()), ((2, 4, 0), (2, 0)), ((0, 4, 3), (0, 3)), ((0, 0), (0,)),
            ((0, 0, 2), (0, 2))]


@pytest.mark.parametrize("shape,tshape", CE_EMPTY)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ls", [0.0, 0.25])
def test_cross_entropy_empty_shapes_follow_torch(backend, shape, tshape, reduction, ls):
    x = torch.randn(shape, dtype=torch.float64, device=backend.device, requires_grad=True)
    t = torch.full(tshape, -100, device=backend.device)
    theirs = F.cross_entropy(x, t, reduction=reduction, label_smoothing=ls)
    ours = gpuloss.cross_entropy(x, t, reduction=reduction, label_smoothing=ls, backend=backend.name)
    _same(ours, theirs)
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.shape == x.shape
    if x.numel() and len(shape) > 1 and shape[1]:  # probability targets need a class dimension
        return
    p = torch.rand(shape, dtype=torch.float64, device=backend.device)
    _same(gpuloss.cross_entropy(x, p, reduction=reduction, label_smoothing=ls, backend=backend.name),
          F.cross_entropy(x, p, reduction=reduction, label_smoothing=ls))


def test_cross_entropy_zero_classes_numpy_arrays():
    x = np.zeros((3, 0), np.float32)
    res = gpuloss.cross_entropy(x, np.full(3, -100), reduction="none", return_grad=True)
    np.testing.assert_array_equal(res.loss, np.zeros(3, np.float32))
    assert res.grad.shape == (3, 0) and res.grad.dtype == np.float32
    assert np.isnan(gpuloss.cross_entropy(x, np.full(3, -100)))
    assert gpuloss.nll_loss(x, np.full(3, -100), reduction="sum") == 0


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((3, 0), -1), ((0, 4), 1), ((2, 0, 3), 1), ((2, 3, 0), 0)])
def test_softmax_empty_dims(backend, fn, shape, dim):
    x = torch.randn(shape, device=backend.device, requires_grad=True)
    y = getattr(gpuloss, fn)(x, dim, backend=backend.name)
    _same(y, getattr(F, fn)(x, dim))
    assert y.requires_grad
    a = np.zeros(shape, np.float32)
    assert getattr(gpuloss, fn)(a, dim).shape == shape


@pytest.mark.parametrize("name", ["mse_loss", "binary_cross_entropy_with_logits", "binary_cross_entropy", "kl_div"])
@pytest.mark.parametrize("shape", [(2, 3, 0), (0, 3), (2, 0, 4)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_elementwise_empty_shapes(backend, name, shape, reduction):
    x = torch.rand(shape, dtype=torch.float64, device=backend.device, requires_grad=True)
    t = torch.rand(shape, dtype=torch.float64, device=backend.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(F, name)(x, t, reduction=reduction)
    ours = getattr(gpuloss, name)(x, t, reduction=reduction, backend=backend.name)
    _same(ours, theirs)
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.shape == x.shape


# ------------------------------------------------------------ 4, 9. argument types

@pytest.mark.parametrize("bad,exc", [(2.5, TypeError), (True, TypeError), (float("nan"), TypeError),
                                     ("3", TypeError), (None, TypeError), (2 ** 64, ValueError),
                                     (-(2 ** 63) - 1, ValueError)])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_ignore_index_must_be_an_int64(backend, bad, exc, fn):
    x = torch.randn(4, 5, device=backend.device)
    t = torch.tensor([0, 1, 2, 3], device=backend.device)
    with pytest.raises(exc, match="ignore_index"):
        getattr(gpuloss, fn)(x, t, ignore_index=bad, backend=backend.name)


@pytest.mark.parametrize("good", [np.int64(2), np.int32(2), 2])
def test_ignore_index_integer_kinds_accepted(good, rng):
    x = torch.tensor(rng.standard_normal((4, 5)))
    t = torch.tensor([0, 1, 2, 3])
    _same(gpuloss.cross_entropy(x, t, ignore_index=good), F.cross_entropy(x, t, ignore_index=2))


@pytest.mark.parametrize("fn,args", [
    ("cross_entropy", lambda x, t: (None, t)), ("cross_entropy", lambda x, t: (x, None)),
    ("nll_loss", lambda x, t: (None, t)), ("mse_loss", lambda x, t: (None, x)), ("mse_loss", lambda x, t: (x, None)),
    ("softmax", lambda x, t: (None,)), ("kl_div", lambda x, t: (x, None)),
])
def test_none_arrays_name_the_argument(fn, args):
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    a = args(x, t)
    name = "input" if a[0] is None else "target"
    with pytest.raises(TypeError, match=name):
        getattr(gpuloss, fn)(*a)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "uint16", "uint32", "uint64"])
def test_every_integer_target_dtype(backend, dtype, rng):
    """Class indices of any integer dtype in NumPy arrays; torch tensors of
    uint16/32/64 (which torch refuses, and cannot even compare) get a clear
    TypeError naming target."""
    x = torch.tensor(rng.standard_normal((4, 5)), device=backend.device)
    t = torch.tensor([0, 1, 2, 4])
    theirs = F.cross_entropy(x, t.to(backend.device))
    if dtype in ("uint16", "uint32", "uint64"):
        with pytest.raises(TypeError, match=f"target must hold class indices as int64 .*; got {dtype}"):
            gpuloss.cross_entropy(x, t.to(getattr(torch, dtype)).to(backend.device), backend=backend.name)
    else:
        ours = gpuloss.cross_entropy(x, t.to(getattr(torch, dtype)).to(backend.device), backend=backend.name)
        _same(ours, theirs, rtol=1e-9)
    if backend.name == "numpy":
        r = gpuloss.cross_entropy(x.cpu().numpy(), t.numpy().astype(dtype))
        np.testing.assert_allclose(r, theirs.item(), rtol=1e-12)


# ------------------------------------------------------------ 5. zero class weights

@pytest.mark.parametrize("ls", [0.0, 0.3])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "linear_cross_entropy"])
@pytest.mark.parametrize("zeros", ["all", "targets"])
def test_all_zero_weights_under_mean_follow_torch(backend, rng, ls, fn, zeros):
    """A zero "mean" divisor (every valid target's class weight 0) gives NaN, also where the
    other classes' weights leave a nonzero smoothing sum (it was inf: sum / 0)."""
    if fn == "nll_loss" and ls:
        pytest.skip("nll_loss has no label smoothing")
    x0 = rng.standard_normal((4, 5))
    t = torch.tensor([0, -100, 2, 3], device=backend.device)
    w = torch.zeros(5, dtype=torch.float64, device=backend.device)
    if zeros == "targets":
        w[[1, 4]] = 1.0  # classes no valid row targets
    kw = dict(label_smoothing=ls) if ls else {}
    if fn == "linear_cross_entropy":  # the identity projection: the logits are the input
        eye = torch.eye(5, dtype=torch.float64, device=backend.device)
        fn, ours_fn = "cross_entropy", lambda x, t, **k: gpuloss.linear_cross_entropy(x, eye, t, **k)
    else:
        ours_fn = getattr(gpuloss, fn)
    xr = _t(backend, x0, grad=True)
    theirs = getattr(F, fn)(xr, t, weight=w, **kw)
    (gt,) = torch.autograd.grad(theirs, xr)
    xo = _t(backend, x0, grad=True)
    ours = ours_fn(xo, t, weight=w, backend=backend.name, **kw)
    (go,) = torch.autograd.grad(ours, xo)
    assert theirs.isnan()
    _same(ours, theirs)
    _same(go, gt)  # NaN in the valid rows (CE: whole rows; NLL: the target entries), zeros in the ignored one
    assert go[1].eq(0).all() and (go[0].isnan().all() if fn == "cross_entropy" else go[0, 0].isnan())


# ------------------------------------------------------------ 6. out-of-range targets

def test_out_of_range_target_poisons_only_its_row(backend, rng):
    """The contract of gpuloss.rules on every backend's primitive (value
    checks are the public functions' job; a kernel must still never read out
    of bounds): the bad row's loss and gradient are NaN, the other rows keep
    the values they have without it, and the "mean" divisor does not count it."""
    R, C = 5, 7
    x0 = rng.standard_normal((R, C))
    t0 = np.array([1, 9, 3, -100, 6])
    w0 = rng.uniform(0.5, 2.0, C)
    for weighted in (False, True):
        x = backend.asarray(x0, "float32")
        t = backend.asarray(t0)
        w = backend.asarray(w0, "float32") if weighted else None
        res = prim(backend.impl, "cross_entropy", x, t, weight=w, ignore_index=-100, label_smoothing=0.1, z_loss=0.0,
                                         softcap=None, reduction="mean", want_grad=True)
        g = backend.to_numpy(res.grad)
        assert np.isnan(g[1]).all()
        assert np.isfinite(np.delete(g, 1, axis=0)).all()
        keep = [0, 2, 3, 4]
        ref_x = torch.tensor(x0[keep], requires_grad=True)
        F.cross_entropy(ref_x, torch.tensor(t0[keep]), weight=torch.tensor(w0) if weighted else None,
                        label_smoothing=0.1).backward()
        np.testing.assert_allclose(np.delete(g, 1, axis=0), ref_x.grad.numpy(), rtol=2e-5, atol=2e-6)
        assert np.isnan(backend.to_numpy(res.loss))


# ------------------------------------------------------------ 7. weights that require grad

@pytest.mark.parametrize("fn,kw", [
    ("cross_entropy", "weight"), ("nll_loss", "weight"),
    ("binary_cross_entropy_with_logits", "weight"), ("binary_cross_entropy_with_logits", "pos_weight"),
    ("binary_cross_entropy", "weight"),
])
def test_weight_that_requires_grad_is_refused(backend, fn, kw):
    dev = backend.device
    if fn in ("cross_entropy", "nll_loss"):
        x, t = torch.randn(4, 5, device=dev), torch.tensor([0, 1, 2, 3], device=dev)
    else:
        x, t = torch.rand(4, 5, device=dev), torch.rand(4, 5, device=dev)
    w = torch.rand(5, device=dev, requires_grad=True)
    with pytest.raises(ValueError, match=kw):
        getattr(gpuloss, fn)(x, t, **{kw: w}, backend=backend.name)
    with torch.no_grad():  # as in torch: fine without grad mode
        getattr(gpuloss, fn)(x, t, **{kw: w}, backend=backend.name)


# ------------------------------------------------------------ 8. bf16 on the numpy backend

def test_bfloat16_numpy_backend_grad_dtype_and_inplace(rng):
    x0 = torch.tensor(rng.standard_normal((4, 6)), dtype=torch.bfloat16)
    t = torch.tensor([0, 5, 2, 3])
    r = gpuloss.cross_entropy(x0, t, return_grad=True, backend="numpy")
    assert r.grad.dtype == torch.bfloat16
    x = x0.clone()
    r2 = gpuloss.cross_entropy(x, t, return_grad=True, inplace_backward=True, backend="numpy")
    assert r2.grad.data_ptr() == x.data_ptr() and r2.grad.dtype == torch.bfloat16
    assert torch.equal(x, r.grad)
    ref = (torch.softmax(x0.double(), 1) - F.one_hot(t, 6)) / 4
    torch.testing.assert_close(x.double(), ref, rtol=1.6e-2, atol=2e-3)


# ------------------------------------------------------------ 10. BCE value ranges

@pytest.mark.parametrize("which,bad", [("input", 1.5), ("input", -0.1), ("input", float("nan")),
                                       ("target", 2.0), ("target", float("nan"))])
def test_bce_values_outside_unit_interval_are_refused(which, bad):
    p = torch.tensor([0.2, 0.7, 0.5])
    t = torch.tensor([1.0, 0.0, 1.0])
    (p if which == "input" else t)[1] = bad
    with pytest.raises(RuntimeError, match=f"{which} should be between 0 and 1"):
        F.binary_cross_entropy(p, t)
    with pytest.raises(ValueError, match=f"{which} should be between 0 and 1"):
        gpuloss.binary_cross_entropy(p, t)
    with pytest.raises(ValueError, match=f"{which} should be between 0 and 1"):
        gpuloss.binary_cross_entropy(p.numpy(), t.numpy())


# ------------------------------------------------------------ 11. broadcasting

BCAST = [((3, 4), (4,)), ((4,), (3, 4)), ((3, 1), (1, 4)), ((2, 3, 4), (3, 1)), ((2, 1, 4), (5, 1))]


@pytest.mark.parametrize("si,st", BCAST)
@pytest.mark.parametrize("name,reductions", [("mse_loss", ["none", "mean", "sum"]),
                                             ("kl_div", ["none", "mean", "sum", "batchmean"])])
def test_mse_and_kl_div_broadcast_like_torch(backend, rng, si, st, name, reductions):
    x0, t0 = rng.standard_normal(si), rng.uniform(0.1, 1.0, st)
    for reduction in reductions:
        xr, tr = torch.tensor(x0, requires_grad=True), torch.tensor(t0, requires_grad=True)
        with warnings.catch_warnings(record=True) as w_theirs:
            warnings.simplefilter("always")
            theirs = getattr(F, name)(xr, tr, reduction=reduction)
        gx, gt = torch.autograd.grad(theirs.sum(), (xr, tr))
        xo, to = _t(backend, x0, grad=True), _t(backend, t0, grad=True)
        with warnings.catch_warnings(record=True) as w_ours:
            warnings.simplefilter("always")
            ours = getattr(gpuloss, name)(xo, to, reduction=reduction, backend=backend.name)
        gxo, gto = torch.autograd.grad(ours.sum(), (xo, to))
        _same(ours, theirs, rtol=1e-9)
        _same(gxo, gx, rtol=1e-9)
        _same(gto, gt, rtol=1e-9)
        size_warnings = lambda ws: sum("target size" in str(w.message) for w in ws)  # noqa: E731
        assert size_warnings(w_ours) == size_warnings(w_theirs)
        if backend.name == "numpy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = getattr(gpuloss, name)(x0, t0, reduction=reduction, return_grad="all")
            np.testing.assert_allclose(r.loss, theirs.detach().numpy(), rtol=1e-10)
            np.testing.assert_allclose(r.grad, gx.numpy(), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(r.grad_target, gt.numpy(), rtol=1e-10, atol=1e-14)


def test_bce_does_not_broadcast_like_torch():
    with pytest.raises(ValueError, match="same shape"):
        gpuloss.binary_cross_entropy_with_logits(torch.randn(3, 4), torch.rand(4))


# ------------------------------------------------------------ 12. softmax dtype=

@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_dtype_keyword(backend, rng, fn):
    x = torch.tensor(rng.standard_normal((3, 7)), dtype=torch.float32, device=backend.device)
    for dt in (torch.float64, torch.float32):
        ours = getattr(gpuloss, fn)(x, 1, dtype=dt, backend=backend.name)
        _same(ours, getattr(F, fn)(x, 1, dtype=dt), rtol=2e-6, atol=1e-7)
    with pytest.raises(TypeError, match="dtype"):
        getattr(gpuloss, fn)(x, 1, dtype=torch.int64, backend=backend.name)
    if backend.name == "numpy":
        assert getattr(gpuloss, fn)(x.cpu().numpy(), 1, dtype="float64").dtype == np.float64
    import gpuloss.nn as gnn
    mod = (gnn.Softmax if fn == "softmax" else gnn.LogSoftmax)(dim=1, dtype=torch.float64, backend=backend.name)
    assert mod(x).dtype == torch.float64


# ------------------------------------------------------------ mse_loss promotes integral operands

@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_mse_loss_promotes_an_integral_operand_as_torch(backend, rng, tdtype):
    """torch's mse_loss takes an integer or bool target (or input) next to a
    floating one, in the floating one's dtype; two integral operands are an
    error.  NumPy arrays follow torch's rule (float32, not NumPy's float64)."""
    x = _t(backend, rng.standard_normal((6, 5)), torch.float32, grad=True)
    t = torch.from_numpy(rng.integers(0, 2, (6, 5))).to(tdtype).to(backend.device)
    x_ref = x.detach().clone().requires_grad_()
    # the reference promotes by hand: torch 2.14's own backward refuses the
    # integer target its forward accepted ("Found dtype Long but expected Float")
    tf = t.to(torch.float32)
    _same(gpuloss.mse_loss(x, t, backend=backend.name), F.mse_loss(x_ref, tf), rtol=1e-6, atol=1e-7)
    gpuloss.mse_loss(x, t, reduction="sum", backend=backend.name).backward()
    F.mse_loss(x_ref, tf, reduction="sum").backward()
    _same(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    u = torch.rand(6, 5, dtype=torch.float32, device=backend.device)
    _same(gpuloss.mse_loss(t, u, backend=backend.name), F.mse_loss(tf, u), rtol=1e-6, atol=1e-7)
    if backend.name == "numpy":
        out = gpuloss.mse_loss(x.detach().numpy(), t.numpy(), return_grad="all")
        assert out.loss.dtype == np.float32 and out.grad.dtype == np.float32 and out.grad_target is None
        # the integer operand has no gradient, as input too (it had one in the promoted dtype)
        out = gpuloss.mse_loss(t.numpy(), x.detach().numpy(), return_grad="all")
        assert out.grad is None and out.grad_target.dtype == np.float32
    with pytest.raises(TypeError, match="input must be a floating"):
        gpuloss.mse_loss(t, t, backend=backend.name)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kl_div_with_logits_teacher_logits_of_minus_inf(backend, reduction):
    """A masked teacher class (logit -inf, or probability 0) adds nothing to
    the divergence, also where the student's logit is -inf too; the NumPy
    backend gave NaN (0 * -inf) for teacher logits, every backend for
    probabilities."""
    inf = float("inf")
    x = _t(backend, [[0.5, 1.0, -0.3, 2.0], [-inf, 1.0, 0.0, 2.0], [0.1, 0.2, 0.3, 0.4]], grad=True)
    t = _t(backend, [[-inf, 0.0, 1.0, 2.0], [-inf, 0.0, 1.0, -inf], [0.0, 0.0, 0.0, 0.0]])
    lp = F.log_softmax(x, -1)
    d = F.softmax(t, -1)
    per_row = torch.where(d > 0, torch.special.xlogy(d, d) - d * lp.where(d > 0, 0), 0).sum(-1)
    theirs = per_row.sum() / x.shape[0] if reduction == "batchmean" else per_row
    g = torch.randn_like(theirs)
    for target, is_logits in ((t, True), (d, False)):
        ours = gpuloss.kl_div_with_logits(x, target, reduction=reduction, target_is_logits=is_logits,
                                          backend=backend.name)
        assert torch.isfinite(ours).all(), is_logits
        _same(ours, theirs)
        _same(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g, retain_graph=True)[0])


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"reduction": "none"}, {"weight": True}],
                         ids=["plain", "smoothed", "none", "weighted"])
def test_probability_target_gradient_without_the_input_gradient(backend, rng, kw):
    """The gradient with respect to probability targets when the logits need
    none: the Triton two-pass kernel wrote the target's gradient only in the
    pass it ran for the logits' gradient, and returned an uninitialised
    buffer."""
    kw = dict(kw)
    x = _t(backend, rng.standard_normal((5, 37)))
    t = _t(backend, rng.dirichlet(np.ones(37), 5), grad=True)
    if kw.pop("weight", False):
        kw["weight"] = _t(backend, rng.uniform(0.5, 2.0, 37))
    ours = gpuloss.cross_entropy(x, t, backend=backend.name, **kw)
    theirs = F.cross_entropy(x, t, **kw)
    _same(ours, theirs)
    g = torch.randn_like(theirs) if theirs.dim() else None
    _same(torch.autograd.grad(ours, t, g)[0], torch.autograd.grad(theirs, t, g)[0])


@pytest.mark.parametrize("fn", ["bce_with_logits", "bce"])
@pytest.mark.parametrize("wdtype", [torch.int64, torch.int32, torch.bool])
def test_integer_and_bool_bce_weights_as_torch(backend, rng, fn, wdtype):
    """torch takes integer or bool BCE weights (and an integer pos_weight) in
    the input's dtype; gpuloss refused them.  A bool pos_weight is refused
    by both."""
    x = _t(backend, rng.standard_normal((4, 5)), torch.float32, grad=True)
    y = _t(backend, rng.random((4, 5)), torch.float32)
    w = _t(backend, rng.integers(0, 3, 5), wdtype)
    ours_fn = gpuloss.binary_cross_entropy_with_logits if fn == "bce_with_logits" else gpuloss.binary_cross_entropy
    theirs_fn = F.binary_cross_entropy_with_logits if fn == "bce_with_logits" else F.binary_cross_entropy
    inp = x if fn == "bce_with_logits" else torch.sigmoid(x)
    kw = {"weight": w}
    if fn == "bce_with_logits" and wdtype != torch.bool:
        kw["pos_weight"] = _t(backend, rng.integers(1, 4, 5), wdtype)
    ours = ours_fn(inp, y, backend=backend.name, **kw)
    theirs = theirs_fn(inp, y, **kw)
    _same(ours, theirs, rtol=1e-6, atol=1e-6)
    _same(torch.autograd.grad(ours, x, retain_graph=True)[0], torch.autograd.grad(theirs, x)[0], rtol=1e-6,
          atol=1e-7)
    if fn == "bce_with_logits" and wdtype == torch.bool:
        with pytest.raises((TypeError, RuntimeError)):
            theirs_fn(x, y, pos_weight=w)
        with pytest.raises(TypeError, match="pos_weight"):
            ours_fn(x, y, pos_weight=w, backend=backend.name)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_unbatched_row_takes_a_one_element_target(backend, rng, fn, reduction):
    """One unbatched row ((C,) logits, (H,) hidden) with a (1,) class-index
    target: torch takes it as the row's () target (a 0-d loss for every
    reduction); gpuloss refused it."""
    x = _t(backend, rng.standard_normal(6), grad=True)
    W = _t(backend, rng.standard_normal((6, 6)))
    t = _t(backend, [4], torch.int64)
    if fn == "linear_cross_entropy":
        ours = gpuloss.linear_cross_entropy(x, W, t, reduction=reduction, backend=backend.name)
        theirs = F.cross_entropy(x @ W.T, t[0], reduction=reduction)
    else:
        ours = getattr(gpuloss, fn)(x, t, reduction=reduction, backend=backend.name)
        _same(ours, getattr(F, fn)(x.detach(), t, reduction=reduction))
        theirs = getattr(F, fn)(x, t[0], reduction=reduction)  # torch's own backward refuses the (1,) target
    _same(ours, theirs)
    _same(torch.autograd.grad(ours, x)[0], torch.autograd.grad(theirs, x)[0])


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_infinite_class_weight_that_requires_grad(backend, rng, fn):
    """Probability targets with a class weight that requires grad and holds
    inf: the term that carries the weight's gradient adds exactly nothing to
    the loss (it was w - w.detach() = inf - inf: NaN), and the gradient is
    finite and torch's."""
    p = _t(backend, rng.dirichlet(np.ones(4), 3))
    x = _t(backend, rng.standard_normal((3, 4)))
    W = _t(backend, rng.standard_normal((4, 4)))
    w0 = [1.0, float("inf"), 2.0, 0.5]
    ours_w, theirs_w = _t(backend, w0, grad=True), _t(backend, w0, grad=True)
    if fn == "cross_entropy":
        call = lambda w: gpuloss.cross_entropy(x, p, weight=w, reduction="none", backend=backend.name)  # noqa: E731
        theirs = F.cross_entropy(x, p, weight=theirs_w, reduction="none")
    else:
        call = lambda w: gpuloss.linear_cross_entropy(x, W, p, weight=w, reduction="none",  # noqa: E731
                                                      backend=backend.name)
        theirs = F.cross_entropy(x @ W.T, p, weight=theirs_w, reduction="none")
    ours = call(ours_w)
    _same(ours, call(ours_w.detach()))
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.isfinite(ours_w.grad).all()
    _same(ours_w.grad, theirs_w.grad)


def test_torch_argument_forms(backend, rng):
    """Argument forms torch takes that gpuloss refused: softmax's positional
    (input, dim, _stacklevel, dtype); label_smoothing as a bool or a 0-d
    tensor; and kl_div's dtype where one operand is 0-d (torch's 0-d rule: a
    0-d float64 does not make a float32 (n,) result float64; mse_loss, which
    broadcasts first, does promote)."""
    x = _t(backend, rng.standard_normal((3, 5)), torch.float32)
    _same(gpuloss.softmax(x, 1, 3, torch.float64, backend=backend.name), F.softmax(x, 1, 3, torch.float64))
    _same(gpuloss.log_softmax(x, 1, 3, torch.float64, backend=backend.name), F.log_softmax(x, 1, 3, torch.float64))
    t = _t(backend, [0, 4, 2], torch.int64)
    for ls in (torch.tensor(0.1), True, np.float64(0.2)):
        _same(gpuloss.cross_entropy(x, t, label_smoothing=ls, backend=backend.name),
              F.cross_entropy(x, t, label_smoothing=ls), rtol=1e-6, atol=1e-6)
    W = _t(backend, rng.standard_normal((5, 5)), torch.float32)
    _same(gpuloss.linear_cross_entropy(x, W, t, label_smoothing=torch.tensor(0.1), backend=backend.name),
          F.cross_entropy(x @ W.T, t, label_smoothing=0.1), rtol=1e-5, atol=1e-5)
    zero_d = _t(backend, -0.7, torch.float64)
    p = _t(backend, [0.2, 0.3], torch.float32)
    for a, b in ((zero_d, p), (p.log(), _t(backend, 0.3, torch.float64))):
        assert gpuloss.kl_div(a, b, reduction="sum", backend=backend.name).dtype == F.kl_div(a, b, reduction="sum").dtype
        assert gpuloss.mse_loss(a, b, backend=backend.name).dtype == F.mse_loss(a, b).dtype


def test_label_smoothing_values_as_torch(backend, rng):
    """torch refuses only a label smoothing above 1 (inf included); a
    negative or NaN one smooths nothing.  gpuloss refused those, so code that
    runs on torch broke: now the same on every CE entry point (function,
    module, fused linear CE, vocabulary-parallel checks)."""
    import gpuloss.nn
    from gpuloss.distributed.layout import check_options
    x = _t(backend, rng.standard_normal((4, 5)), grad=True)
    t = _t(backend, [0, 4, 2, -100], torch.int64)
    p = _t(backend, rng.dirichlet(np.ones(5), 4))
    W = _t(backend, rng.standard_normal((5, 5)))
    for ls in (-0.1, -math.inf, math.nan, 1.0, torch.tensor(-2.0)):
        for target in (t, p):
            _same(gpuloss.cross_entropy(x, target, label_smoothing=ls, backend=backend.name),
                  F.cross_entropy(x, target, label_smoothing=float(ls)))
            _same(gpuloss.nn.CrossEntropyLoss(label_smoothing=ls)(x, target),
                  torch.nn.CrossEntropyLoss(label_smoothing=float(ls))(x, target))
        _same(gpuloss.linear_cross_entropy(x, W, t, label_smoothing=ls, backend=backend.name),
              F.cross_entropy(x @ W.T, t, label_smoothing=float(ls)))
        assert check_options(-100, "mean", ls, 0.0, None) == (-100, float(ls) if float(ls) > 0 else 0.0)
    g_ours, = torch.autograd.grad(gpuloss.cross_entropy(x, t, label_smoothing=-0.5, backend=backend.name), x)
    g_torch, = torch.autograd.grad(F.cross_entropy(x, t), x)
    _same(g_ours, g_torch)
    for ls in (1.5, math.inf):
        with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
            F.cross_entropy(x, t, label_smoothing=ls)
        with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
            gpuloss.cross_entropy(x, t, label_smoothing=ls, backend=backend.name)
        with pytest.raises(ValueError, match="label_smoothing"):
            gpuloss.linear_cross_entropy(x, W, t, label_smoothing=ls, backend=backend.name)
        with pytest.raises(ValueError, match="label_smoothing"):
            check_options(-100, "mean", ls, 0.0, None)
    # torch checks label_smoothing before the target's shape (its message, word for word): so does gpuloss
    for bad_target in (torch.arange(x.shape[0] + 1), torch.ones(2, 5)):
        for f in (F.cross_entropy, lambda *a, **k: gpuloss.cross_entropy(*a, **k, backend=backend.name)):
            with pytest.raises(RuntimeError, match=r"^label_smoothing must be between 0\.0 and 1\.0\. Got: 1\.5$"):
                f(x, bad_target.to(x.device), label_smoothing=1.5)


def test_integer_class_weight_with_probability_targets(backend, rng):
    """torch promotes an integer or bool class weight with probability targets
    (the loss keeps the logits' floating dtype; class-index targets still need
    the input's dtype, as torch); gpuloss refused it as not floating."""
    import gpuloss.nn
    x = _t(backend, rng.standard_normal((4, 5)), grad=True)
    p = _t(backend, rng.dirichlet(np.ones(5), 4))
    W = _t(backend, rng.standard_normal((5, 5)))
    for w in ([1, 2, 0, 1, 3], [True, False, True, True, True]):
        for dt in ((torch.int64, torch.uint8, torch.int32) if w[1] is not False else (torch.bool,)):
            wt = torch.tensor(w, dtype=dt, device=x.device)
            for red in ("mean", "none"):
                ours = gpuloss.cross_entropy(x, p, weight=wt, reduction=red, label_smoothing=0.1, backend=backend.name)
                theirs = F.cross_entropy(x, p, weight=wt, reduction=red, label_smoothing=0.1)
                _same(ours, theirs)
                _same(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0])
            _same(gpuloss.nn.CrossEntropyLoss(weight=wt)(x, p), torch.nn.CrossEntropyLoss(weight=wt)(x, p))
            _same(gpuloss.linear_cross_entropy(x, W, p, weight=wt, backend=backend.name),
                  F.cross_entropy(x @ W.T, p, weight=wt))
    t = _t(backend, [0, 4, 2, 1], torch.int64)
    with pytest.raises(TypeError, match="weight"):  # class indices: torch refuses it too
        gpuloss.cross_entropy(x, t, weight=torch.tensor([1, 2, 0, 1, 3], device=x.device), backend=backend.name)


def test_meta_tensors_give_torchs_shapes():
    """Meta tensors (device="meta" models, shape inference) get torch's
    result shapes and dtypes, forward and backward, from every function and
    module; no backend serves "meta", and gpuloss raised."""
    import gpuloss.nn
    m = dict(device="meta")
    x = torch.empty(4, 6, 3, requires_grad=True, **m)
    t = torch.empty(4, 3, dtype=torch.int64, **m)
    p = torch.empty(4, 6, 3, **m)
    h, W = torch.empty(4, 8, requires_grad=True, **m), torch.empty(6, 8, requires_grad=True, **m)
    w = torch.empty(6, **m)
    calls = [
        (lambda g: g.cross_entropy(x, t, weight=w, reduction="none"), {}),
        (lambda g: g.cross_entropy(x, p, label_smoothing=0.1), {}),
        (lambda g: g.cross_entropy(x.bfloat16(), t, z_loss=1e-4, softcap=30.0) if g is gpuloss
         else g.cross_entropy(x.bfloat16(), t), {}),
        (lambda g: g.nll_loss(x, t, reduction="sum"), {}),
        (lambda g: g.kl_div(x, p, reduction="batchmean"), {}),
        (lambda g: g.binary_cross_entropy_with_logits(x, p, pos_weight=torch.empty(3, **m)), {}),
        (lambda g: g.binary_cross_entropy(x, p, reduction="none"), {}),
        (lambda g: g.mse_loss(x, p[:1]), {}),
        (lambda g: g.softmax(x, 1, dtype=torch.float64), {}),
        (lambda g: g.log_softmax(x.half(), -1), {}),
        (lambda g: g.linear_cross_entropy(h, W, t[:, 0]) if g is gpuloss else g.cross_entropy(h @ W.T, t[:, 0]), {}),
    ]
    for call, _ in calls:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, theirs = call(gpuloss), call(F)
        assert ours.device.type == "meta" and ours.shape == theirs.shape and ours.dtype == theirs.dtype
    loss = gpuloss.kl_div_with_logits(x.flatten(1), p.flatten(1), temperature=2.0)
    assert loss.is_meta and loss.shape == ()
    y = torch.empty(4, 6, **m)
    assert gpuloss.softmax_backward(y, y, 1).shape == (4, 6)
    gx, gW = torch.autograd.grad(gpuloss.linear_cross_entropy(h, W, t[:, 0], label_smoothing=0.1), (h, W))
    assert gx.is_meta and gx.shape == h.shape and gW.shape == W.shape
    mod = gpuloss.nn.LinearCrossEntropyLoss(8, 6, bias=True, device="meta")
    assert mod(h, t[:, 0]).is_meta
    assert gpuloss.nn.CrossEntropyLoss(weight=w)(x, t).is_meta
    with pytest.raises(ValueError, match="return_grad.*meta"):
        gpuloss.cross_entropy(x, t, return_grad=True)


def test_fake_tensor_mode_gives_torchs_shapes():
    """Under a FakeTensorMode (shape and memory estimation, outside torch.compile) the calls
    that read target values for their checks raised DataDependentOutputException; fake tensors
    have no values to check, so they now run (torch's shapes and dtypes, forward and backward)."""
    import gpuloss.nn
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(4, 6, requires_grad=True)
        t = torch.zeros(4, dtype=torch.int64)
        h, W = torch.empty(4, 8, requires_grad=True), torch.empty(6, 8, requires_grad=True)
        for ours, theirs in (
                (gpuloss.cross_entropy(x, t, label_smoothing=0.1, reduction="none"),
                 F.cross_entropy(x, t, label_smoothing=0.1, reduction="none")),
                (gpuloss.nll_loss(x, t), F.nll_loss(x, t)),
                (gpuloss.nn.CrossEntropyLoss()(x.bfloat16(), t), F.cross_entropy(x.bfloat16(), t)),
                (gpuloss.linear_cross_entropy(h, W, t), F.cross_entropy(h @ W.T, t)),
                (gpuloss.nn.LinearCrossEntropyLoss(8, 6)(h, t), F.cross_entropy(h @ W.T, t))):
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        gx, gW = torch.autograd.grad(gpuloss.linear_cross_entropy(h, W, t), (h, W))
        assert gx.shape == h.shape and gW.shape == W.shape
        # gpuloss's operators run on fake tensors (their fake implementations): the extras too
        assert gpuloss.cross_entropy(x, t, z_loss=1e-4, softcap=30.0).shape == ()
        res = gpuloss.mse_loss(x.detach(), x.detach() * 2, return_grad=True)
        assert res.grad.shape == x.shape
    # make_fx with fake tensors records gpuloss's operators, class-index targets included
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(lambda a, b: gpuloss.cross_entropy(a, b), tracing_mode="fake")(torch.randn(4, 6),
                                                                             torch.tensor([0, 1, 2, 3]))
    assert any("gpuloss" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def test_bce_with_logits_gradient_keeps_the_logits_precision(backend, rng):
    """BCE with logits gives its loss in the target's dtype (torch's), but
    torch's gradient of float32/float64 logits next to a 16-bit (or float32)
    target is exact to the logits' precision; gpuloss cast the logits down to
    the target's dtype first (relative error 3e-4 with a float16 target).
    (With a 16-bit pos_weight torch's own gradient is not: gpuloss's is.)"""
    x0 = rng.standard_normal((4, 6)) * 3
    t0 = rng.uniform(0, 1, (4, 6))
    for xd, td in ((torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.float64, torch.float32)):
        x = _t(backend, x0, xd, grad=True)
        t = _t(backend, t0, td)
        xe = x.detach().double().requires_grad_()
        for pw in (None, torch.full((6,), 0.7, dtype=td, device=x.device)):
            ours = gpuloss.binary_cross_entropy_with_logits(x, t, pos_weight=pw, backend=backend.name)
            theirs = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
            assert ours.dtype == theirs.dtype == td
            g_ours, = torch.autograd.grad(ours, x)
            g_theirs, = torch.autograd.grad(theirs, x)
            exact, = torch.autograd.grad(F.binary_cross_entropy_with_logits(
                xe, t.double(), pos_weight=None if pw is None else pw.double()), xe)
            assert g_ours.dtype == g_theirs.dtype == xd
            eps = torch.finfo(xd).eps
            for g in (g_ours,) if pw is not None else (g_ours, g_theirs):
                torch.testing.assert_close(g.double(), exact, rtol=16 * eps, atol=16 * eps * float(exact.abs().max()))


def test_softmax_along_a_leading_dim_is_contiguous(backend, rng):
    """Along a dimension other than the last, softmax, log_softmax and their
    backward returned a permuted view of the row-major result; torch's is
    always contiguous, and code calls .view on it."""
    for shape, dim, perm in (((4, 6), 0, None), ((3, 4, 5, 2), 1, None), ((3, 4, 5), -2, None),
                             ((4, 6), 0, (1, 0)), ((3, 4, 5, 2), 1, (0, 2, 3, 1)), ((3, 4, 5), 0, (2, 0, 1))):
        x = _t(backend, rng.standard_normal(shape))
        if perm is not None:  # torch's result is contiguous whatever the input's layout
            x = x.permute(perm)
        for name in ("softmax", "log_softmax"):
            ours = getattr(gpuloss, name)(x, dim, backend=backend.name)
            assert ours.is_contiguous() and ours.stride() == getattr(F, name)(x, dim).stride()
            ours.view(-1)
            back = getattr(gpuloss, name + "_backward")(x, ours, dim, backend=backend.name)
            assert back.is_contiguous()
        a = rng.standard_normal(shape) if perm is None else rng.standard_normal(shape).transpose(perm)
        got = gpuloss.softmax(a, dim, backend=backend.name if backend.name == "numpy" else None)
        assert got.flags.c_contiguous


def test_return_grad_all_gives_grad_target_in_the_targets_dtype(backend, rng):
    """cross_entropy(return_grad="all") with probabilities of a dtype other
    than the logits' gave grad_target in the promoted dtype; autograd's
    target.grad (and every other loss's grad_target) is in the target's."""
    for xd, td in ((torch.float64, torch.float32), (torch.float32, torch.float16)):
        x = _t(backend, rng.standard_normal((3, 5)), xd)
        p = _t(backend, rng.dirichlet(np.ones(5), 3), td, grad=True)
        out = gpuloss.cross_entropy(x, p, return_grad="all", backend=backend.name)
        assert out.grad.dtype == xd and out.grad_target.dtype == td
        F.cross_entropy(x, p).backward()
        torch.testing.assert_close(out.grad_target, p.grad, rtol=1e-3, atol=1e-4)
    a = rng.standard_normal((3, 5))
    out = gpuloss.cross_entropy(a, rng.dirichlet(np.ones(5), 3).astype(np.float32), return_grad="all")
    assert out.grad.dtype == np.float64 and out.grad_target.dtype == np.float32


def test_nll_loss_ignored_rows_with_non_finite_values(backend):
    """An ignored row contributes 0 whatever its values: the NumPy backend
    read a placeholder class of such a row and formed 0 * inf = NaN, which
    spoiled "sum" and "mean" (also with an in-range ignore_index)."""
    inf, nan = math.inf, math.nan
    x = _t(backend, [[-inf, -1.9, -1.0], [-0.5, -1.0, -2.0], [nan, -1.0, -inf]])
    w = _t(backend, [1.0, 0.5, 2.0])
    for t, ii in (([-100, 0, -100], -100), ([0, 1, 0], 0)):
        t = _t(backend, t, torch.int64)
        for reduction in ("none", "sum", "mean"):
            for weight in (None, w):
                _same(gpuloss.nll_loss(x, t, weight=weight, ignore_index=ii, reduction=reduction,
                                       backend=backend.name),
                      F.nll_loss(x, t, weight=weight, ignore_index=ii, reduction=reduction))


def test_probability_target_gradients_keep_infinite_and_nan_slopes(backend):
    """The class weight's and the probabilities' gradients with probability
    targets were clamped to finite numbers (nan_to_num, to keep the loss's
    value free of 0 * inf): a -inf logit gave the largest float where torch
    gives inf, a NaN row finite numbers where torch gives NaN."""
    inf, nan = math.inf, math.nan
    for rows in ([[-inf, 1.0, 2.0], [nan, 0.1, 0.2]], [[-inf, 1.0, 2.0], [0.0, 0.1, 0.2]]):
        x = _t(backend, rows)
        for reduction in ("sum", "mean", "none"):
            got = []
            for fn in (F.cross_entropy, functools.partial(gpuloss.cross_entropy, backend=backend.name)):
                w = _t(backend, [0.5, 1.0, 1.5], grad=True)
                p = _t(backend, [[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]], grad=True)
                loss = fn(x, p, weight=w, reduction=reduction, label_smoothing=0.1)
                loss.sum().backward()
                got.append((loss, w.grad, p.grad))
            for a, b in zip(got[1], got[0]):
                _same(a, b)
            assert not torch.isfinite(got[1][1]).all()


def test_bce_with_logits_target_gradient_at_infinite_logits(backend):
    """With pos_weight the target's gradient is pw sp(-x) - sp(x); formed as
    -x + (pw - 1) sp(-x) it was inf - inf = NaN at x = -inf, where torch
    gives +inf (and pw < 1)."""
    inf = math.inf
    x = _t(backend, [[-inf, -50.0, -1.0, 0.0, 3.0, inf]], grad=True)
    for pw in (0.86, 2.5):
        got = []
        for fn in (F.binary_cross_entropy_with_logits,
                   functools.partial(gpuloss.binary_cross_entropy_with_logits, backend=backend.name)):
            t = _t(backend, [[0.94, 0.1, 0.5, 1.0, 0.0, 0.2]], grad=True)
            loss = fn(x, t, pos_weight=_t(backend, [pw] * 6), reduction="sum")
            got.append(torch.autograd.grad(loss, t)[0])
        _same(got[1], got[0])
        assert got[1][0, 0] == inf


def test_ignored_row_gradient_with_inf_or_nan_logits(backend):
    """torch's gradient of an ignored row is 0, or NaN across the row where
    its softmax is NaN (a NaN or +inf logit, or every logit -inf); the NumPy
    backend gave NaN only at the +inf entries and 0 elsewhere."""
    inf, nan = math.inf, math.nan
    for row in ([inf, 3.95, 1.0], [inf, inf, 1.0], [nan, 1.0, 2.0], [-inf, 1.0, 2.0], [-inf, -inf, -inf]):
        for ls in (0.0, 0.1):
            got = []
            for fn in (F.cross_entropy, functools.partial(gpuloss.cross_entropy, backend=backend.name)):
                x = _t(backend, [row, [1.0, 2.0, 0.0]], grad=True)
                fn(x, _t(backend, [-100, 0], torch.int64), reduction="sum", label_smoothing=ls).backward()
                got.append(x.grad)
            _same(got[1], got[0], rtol=1e-6, atol=1e-7)


def test_empty_probability_targets_keep_the_class_weight_in_the_graph(backend):
    """An empty batch with probability targets and a class weight that
    requires grad: torch's loss backpropagates (zero gradients); gpuloss's
    loss was cut off from the weight (and did not require grad without other
    inputs that do), so backward() raised."""
    for reduction in ("mean", "sum", "none"):
        w = _t(backend, [1.0, 2.0, 3.0], grad=True)
        loss = gpuloss.cross_entropy(_t(backend, np.zeros((0, 3))), _t(backend, np.zeros((0, 3))), weight=w,
                                     reduction=reduction, backend=backend.name)
        theirs = F.cross_entropy(_t(backend, np.zeros((0, 3))), _t(backend, np.zeros((0, 3))), weight=w,
                                 reduction=reduction)
        assert loss.requires_grad and theirs.requires_grad
        _same(loss, theirs)
        loss.sum().backward()
        _same(w.grad, torch.zeros_like(w))


def _random_layout(gen, shape, device):
    """A float64 tensor of ``shape`` in a random layout: dimensions permuted
    in memory, and sometimes a slice with gaps."""
    nd = len(shape)
    order = [int(i) for i in torch.randperm(nd, generator=gen)]
    if nd and torch.rand((), generator=gen) < 0.3:  # a gap along one dimension
        d = int(torch.randint(nd, (), generator=gen))
        big = [n * (2 if order[i] == d else 1) for i, n in enumerate([shape[k] for k in order])]
        base = torch.randn(big, generator=gen, dtype=torch.float64)
        base = base[tuple(slice(None, None, 2) if order[i] == d else slice(None) for i in range(nd))]
    else:
        base = torch.randn([shape[k] for k in order], generator=gen, dtype=torch.float64)
    return base.permute([order.index(i) for i in range(nd)]).to(device)


@pytest.mark.parametrize("op", ["mse_loss", "kl_div", "bce_with_logits", "bce"])
def test_elementwise_none_loss_has_torchs_layout(backend, op):
    """reduction="none" of an element-wise loss comes back in the layout
    torch's own has: a transposed or channels_last input gave a row-major
    loss (and its inputs were copied to run the op), where torch's
    TensorIterator keeps the operands' memory order (``loss.view(-1)`` then
    fails on both, ``.stride()`` is the same).  Values and gradients as
    torch's, on random layouts, gaps and broadcast operands."""
    gen = torch.Generator().manual_seed(7)
    F_op = {"mse_loss": F.mse_loss, "kl_div": F.kl_div, "bce": F.binary_cross_entropy,
            "bce_with_logits": F.binary_cross_entropy_with_logits}[op]
    g_op = {"mse_loss": gpuloss.mse_loss, "kl_div": gpuloss.kl_div, "bce": gpuloss.binary_cross_entropy,
            "bce_with_logits": gpuloss.binary_cross_entropy_with_logits}[op]
    warnings.filterwarnings("ignore", "(Using a target size|reduction: 'mean')", UserWarning)
    for trial in range(40):
        nd = int(torch.randint(2, 5, (), generator=gen))
        shape = [int(n) for n in torch.randint(1, 5, (nd,), generator=gen)]
        x = _random_layout(gen, shape, backend.device)
        t = _random_layout(gen, shape, backend.device)
        if op in ("mse_loss", "kl_div") and trial % 3 == 0:  # a broadcast target
            t = t.narrow(0, 0, 1) if shape[0] > 1 else t
        kw = {}
        if op in ("bce", "bce_with_logits"):
            t = t.sigmoid()
            if op == "bce":
                x = x.sigmoid()
            elif trial % 2:
                kw["pos_weight"] = torch.rand(shape[-1], generator=gen, dtype=torch.float64).to(backend.device)
        x.requires_grad_()
        theirs = F_op(x, t, reduction="none", **kw)
        ours = g_op(x, t, reduction="none", backend=backend.name, **kw)
        big = [i for i, n in enumerate(theirs.shape) if n > 1]
        assert [ours.stride(i) for i in big] == [theirs.stride(i) for i in big], (shape, x.stride(), t.stride())
        _same(ours, theirs)
        up = torch.randn(theirs.shape, generator=gen, dtype=torch.float64).to(backend.device)
        g_theirs, = torch.autograd.grad(theirs, x, up)
        g_ours, = torch.autograd.grad(ours, x, up)
        _same(g_ours, g_theirs)
        for red in ("sum", "mean"):
            _same(g_op(x, t, reduction=red, backend=backend.name, **kw), F_op(x, t, reduction=red, **kw))
    # the NumPy form: the loss and gradient in the input's memory order, as NumPy's ufuncs
    xa = np.asfortranarray(np.random.default_rng(0).standard_normal((5, 6)))
    if backend.name == "numpy":
        res = gpuloss.mse_loss(xa, np.zeros((5, 6)).T.copy().T, reduction="none", return_grad=True)
        assert res.loss.flags.f_contiguous and res.grad.flags.f_contiguous
        np.testing.assert_allclose(res.loss, xa ** 2)
