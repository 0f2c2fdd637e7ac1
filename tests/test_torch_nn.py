"""gpuloss.nn against torch.nn: same constructor, same values and gradients,
state_dicts that load both ways, and a 20-step training run that ends at the
same weights."""
from __future__ import annotations

import inspect
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpuloss  # noqa: E402
import gpuloss.nn as gnn  # noqa: E402
from gpuloss import reference as R  # noqa: E402

from conftest import tol  # noqa: E402

tnn = torch.nn
TF = torch.nn.functional
N, C = 6, 5


def _data(rng, kind: str):
    """(input, target) float64 tensors for a loss kind."""
    x = torch.from_numpy(rng.standard_normal((N, C)) * 2)
    if kind == "index":
        return x, torch.from_numpy(rng.integers(0, C, N))
    if kind == "logp":
        return TF.log_softmax(x, -1), torch.from_numpy(rng.integers(0, C, N))
    if kind == "prob":
        return x, torch.from_numpy(rng.dirichlet(np.ones(C), N))
    if kind == "kl":
        return TF.log_softmax(x, -1), torch.from_numpy(rng.dirichlet(np.ones(C), N))
    if kind == "binary":
        return x, torch.from_numpy(rng.uniform(0, 1, (N, C)))
    if kind == "sigmoid":
        return torch.sigmoid(x), torch.from_numpy(rng.uniform(0, 1, (N, C)))
    if kind == "real":
        return x, torch.from_numpy(rng.standard_normal((N, C)))
    raise AssertionError(kind)


def _w(seed: int, n: int = C):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0.3, 2.0, n))


# name, kind, constructor kwargs (tensors built per test)
CASES = [
    ("CrossEntropyLoss", "index", {}),
    ("CrossEntropyLoss", "index", dict(weight=1, ignore_index=2, label_smoothing=0.1)),
    ("CrossEntropyLoss", "index", dict(reduction="none")),
    ("CrossEntropyLoss", "index", dict(size_average=False)),
    ("CrossEntropyLoss", "prob", dict(weight=1, label_smoothing=0.2)),
    ("NLLLoss", "logp", dict(weight=1, ignore_index=0)),
    ("NLLLoss", "logp", dict(reduce=False)),
    ("KLDivLoss", "kl", dict(reduction="batchmean")),
    ("KLDivLoss", "kl", dict(reduction="sum", log_target=True)),
    ("BCEWithLogitsLoss", "binary", dict(weight=1, pos_weight=2)),
    ("BCEWithLogitsLoss", "binary", dict(reduction="sum")),
    ("BCELoss", "sigmoid", dict(weight=1)),
    ("BCELoss", "sigmoid", dict(reduction="none")),
    ("MSELoss", "real", {}),
    ("MSELoss", "real", dict(size_average=False, reduce=True)),
]


def _build(name, kw, seed=0):
    kw = dict(kw)
    for k in ("weight", "pos_weight"):
        if k in kw:
            kw[k] = _w(seed + kw[k])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecated size_average/reduce warn in both
        return getattr(gnn, name)(**kw), getattr(tnn, name)(**kw)


@pytest.mark.parametrize("name,kind,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_module_matches_torch(rng, name, kind, kw):
    ours, theirs = _build(name, kw)
    assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
    assert ours.reduction == theirs.reduction
    x, t = _data(rng, kind)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    diff_t = t.is_floating_point()
    t1, t2 = t.clone().requires_grad_(diff_t), t.clone().requires_grad_(diff_t)
    a, b = ours(x1, t1), theirs(x2, t2)
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, **tol("float64"))
    go = torch.from_numpy(rng.uniform(0.5, 2.0, tuple(a.shape)))
    a.backward(go)
    b.backward(go)
    torch.testing.assert_close(x1.grad, x2.grad, **tol("float64"))
    if diff_t:
        torch.testing.assert_close(t1.grad, t2.grad, **tol("float64"))


def test_deprecated_arguments_warn_and_map_like_torch():
    for kw, red in [(dict(size_average=False), "sum"), (dict(reduce=False), "none"),
                    (dict(size_average=True, reduce=True), "mean")]:
        with pytest.warns(UserWarning, match="deprecated"):
            m = gnn.MSELoss(**kw)
        assert m.reduction == red


@pytest.mark.parametrize("cls,dim", [("Softmax", 1), ("LogSoftmax", 0), ("Softmax", -1)])
def test_softmax_modules(rng, cls, dim):
    x = torch.from_numpy(rng.standard_normal((3, 4, 5)))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = getattr(gnn, cls)(dim=dim), getattr(tnn, cls)(dim=dim)
    assert repr(ours) == repr(theirs)
    a, b = ours(x1), theirs(x2)
    torch.testing.assert_close(a, b, **tol("float64"))
    go = torch.from_numpy(rng.standard_normal(a.shape))
    a.backward(go)
    b.backward(go)
    torch.testing.assert_close(x1.grad, x2.grad, **tol("float64"))


def test_softmax_implicit_dim_follows_torch(rng):
    x = torch.from_numpy(rng.standard_normal((3, 4, 5)))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        a = gnn.Softmax()(x)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        b = tnn.Softmax()(x)
    torch.testing.assert_close(a, b, **tol("float64"))


def _warned_at(fn) -> tuple:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    assert len(seen) == 1, [str(w.message) for w in seen]
    return seen[0].filename, seen[0].lineno


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_implicit_dim_warning_at_torchs_stack_level(name):
    """The implicit-dim warning names the frame torch's names: the caller for
    the default ``_stacklevel``, the caller's caller for 4, and the module call
    for ``nn.Softmax``/``nn.LogSoftmax``."""
    ours, theirs = getattr(gpuloss, name), getattr(TF, name)

    def through(fn, level, x):  # the line of this call is the caller's caller for level 4
        return fn(x, None, level)

    for x in (torch.randn(3, 4), torch.empty(3, 4, device="meta")):  # meta: torch's operations compute it
        for level in (3, 4):
            (f_ours, l_ours), (f_torch, l_torch) = [_warned_at(lambda: through(fn, level, x)) for fn in (ours, theirs)]
            assert f_ours == f_torch == __file__, (level, x.device)
            assert l_ours == l_torch, (level, x.device)
    x = torch.randn(3, 4)
    cls = "Softmax" if name == "softmax" else "LogSoftmax"
    ours_at, torch_at = [_warned_at(lambda: getattr(mod, cls)()(x)) for mod in (gnn, tnn)]
    assert ours_at == torch_at


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("target_is_logits", [True, False])
def test_kl_div_with_logits_module(rng, reduction, target_is_logits):
    T = 2.0
    x_np, t_np = rng.standard_normal((N, C)) * 2, rng.standard_normal((N, C)) * 2
    if not target_is_logits:
        t_np = R.softmax(t_np)
    x = torch.from_numpy(x_np).requires_grad_()
    m = gnn.KLDivWithLogitsLoss(temperature=T, reduction=reduction, target_is_logits=target_is_logits)
    loss = m(x, torch.from_numpy(t_np))
    kw = dict(temperature=T, reduction=reduction, target_is_logits=target_is_logits)
    np.testing.assert_allclose(loss.detach().numpy(), R.kl_div_with_logits(x_np, t_np, **kw), **tol("float64"))
    loss.sum().backward()
    go = np.ones(np.shape(loss))
    np.testing.assert_allclose(x.grad.numpy(), R.kl_div_with_logits_grad(x_np, t_np, **kw, grad_output=go)[0],
                               **tol("float64"))
    if reduction == "batchmean" and target_is_logits:  # the usual distillation form in plain torch
        want = TF.kl_div(TF.log_softmax(x.detach() / T, -1), TF.log_softmax(torch.from_numpy(t_np) / T, -1),
                         reduction="batchmean", log_target=True)
        torch.testing.assert_close(loss.detach(), want, **tol("float64"))


# ------------------------------------------------------------------ state_dict

@pytest.mark.parametrize("name,kw", [("CrossEntropyLoss", dict(weight=1)), ("NLLLoss", dict(weight=1)),
                                     ("BCEWithLogitsLoss", dict(weight=1, pos_weight=2)),
                                     ("BCELoss", dict(weight=1))])
def test_state_dict_round_trip(name, kw):
    ours, theirs = _build(name, kw, seed=10)
    fresh_ours, fresh_theirs = _build(name, kw, seed=20)  # different buffers
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    fresh_ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(fresh_ours.state_dict()[k], v)
    fresh_theirs.load_state_dict(fresh_ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(fresh_theirs.state_dict()[k], v)
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()


def test_buffers_follow_the_module():
    m = gnn.BCEWithLogitsLoss(weight=_w(1), pos_weight=_w(2)).to(torch.float32)
    assert m.weight.dtype == torch.float32 and m.pos_weight.dtype == torch.float32


def test_mixed_devices_raise_through_modules(rng):
    x, t = _data(rng, "index")
    with pytest.raises(ValueError, match="mixed devices"):
        gnn.CrossEntropyLoss(weight=torch.ones(C, device="meta"))(x.requires_grad_(), t)
    xb, tb = _data(rng, "binary")
    with pytest.raises(ValueError, match="mixed devices"):
        gnn.BCEWithLogitsLoss(pos_weight=torch.ones(C, device="meta"))(xb, tb)
    with pytest.raises(ValueError, match="mixed devices"):
        gnn.MSELoss()(xb, tb.to("meta"))


# ------------------------------------------------------------------ training

def _mlp(seed: int, out: int, dtype=torch.float64):
    torch.manual_seed(seed)
    return tnn.Sequential(tnn.Linear(7, 16), tnn.Tanh(), tnn.Linear(16, out)).to(dtype)


TRAIN = {
    "ce": (lambda: gnn.CrossEntropyLoss(weight=_w(3), label_smoothing=0.1),
           lambda: tnn.CrossEntropyLoss(weight=_w(3), label_smoothing=0.1), "index", None),
    "ce_inplace": (lambda: gnn.CrossEntropyLoss(inplace_backward=True),
                   lambda: tnn.CrossEntropyLoss(), "index", None),
    "nll": (lambda: gnn.NLLLoss(), lambda: tnn.NLLLoss(), "index", "logsoftmax"),
    "kl": (lambda: gnn.KLDivLoss(reduction="batchmean"), lambda: tnn.KLDivLoss(reduction="batchmean"),
           "prob", "logsoftmax"),
    "bce_logits": (lambda: gnn.BCEWithLogitsLoss(weight=_w(4), pos_weight=_w(5)),
                   lambda: tnn.BCEWithLogitsLoss(weight=_w(4), pos_weight=_w(5)), "binary", None),
    "bce": (lambda: gnn.BCELoss(), lambda: tnn.BCELoss(), "binary", "sigmoid"),
    "mse": (lambda: gnn.MSELoss(), lambda: tnn.MSELoss(), "real", "softmax"),
}


@pytest.mark.parametrize("case", list(TRAIN))
def test_training_run_matches_torch(rng, case):
    """20 SGD steps of a small MLP with our loss and with torch's: the same
    weights at the end (float64, so any gradient error would show)."""
    make_ours, make_theirs, kind, head = TRAIN[case]
    X = torch.from_numpy(rng.standard_normal((32, 7)))
    if kind == "index":
        Y = torch.from_numpy(rng.integers(0, C, 32))
    elif kind == "prob":
        Y = torch.from_numpy(rng.dirichlet(np.ones(C), 32))
    elif kind == "binary":
        Y = torch.from_numpy(rng.uniform(0, 1, (32, C)))
    else:
        Y = torch.from_numpy(rng.dirichlet(np.ones(C), 32))
    seed = int(rng.integers(1 << 30))
    finals = []
    for make, heads in ((make_ours, gnn), (make_theirs, tnn)):
        model = _mlp(seed, C)
        loss_fn = make()
        head_fn = {None: (lambda z: z), "logsoftmax": heads.LogSoftmax(dim=1), "softmax": heads.Softmax(dim=1),
                   "sigmoid": torch.sigmoid}[head]
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        losses = []
        for step in range(20):
            idx = slice((step % 4) * 8, (step % 4) * 8 + 8)
            opt.zero_grad()
            loss = loss_fn(head_fn(model(X[idx])), Y[idx])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        finals.append(([p.detach().clone() for p in model.parameters()], torch.stack(losses)))
    (p_ours, l_ours), (p_theirs, l_theirs) = finals
    torch.testing.assert_close(l_ours, l_theirs, rtol=1e-9, atol=1e-11)
    for a, b in zip(p_ours, p_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert not torch.equal(p_ours[0], _mlp(seed, C)[0].weight.detach())  # it did train


@pytest.mark.parametrize("name", ["NLLLoss", "KLDivLoss", "BCEWithLogitsLoss", "BCELoss", "MSELoss",
                                  "CrossEntropyLoss"])
def test_module_signature_is_torchs_plus_extras(name):
    """inspect.signature (help(), config tools that check arguments) shows
    torch's constructor parameters, in torch's order with torch's defaults,
    then gpuloss's keyword-only extras; it showed (*args, backend, **kwargs)."""
    import inspect
    ours = list(inspect.signature(getattr(gnn, name)).parameters.values())
    theirs = list(inspect.signature(getattr(torch.nn, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[:len(theirs)]] == \
        [(p.name, p.kind, p.default) for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])
    assert ours[-1].name == "backend"
    m = getattr(gnn, name)(backend="numpy")
    assert m.backend == "numpy" and type(m).__init__.__qualname__ == f"{name}.__init__"


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "cross_entropy", "nll_loss", "kl_div",
                                  "binary_cross_entropy", "binary_cross_entropy_with_logits", "mse_loss"])
def test_function_signature_is_torchs_plus_extras(name):
    """Every parameter of the installed torch's function, in order, with its kind and default,
    then gpuloss's keyword-only extras: torch 2.13's mse_loss has a sixth, ``weight``, that
    gpuloss lacked (a TypeError, also positionally)."""
    import torch.nn.functional as F
    ours = list(inspect.signature(getattr(gpuloss, name)).parameters.values())
    theirs = list(inspect.signature(getattr(F, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[:len(theirs)]] == \
        [(p.name, p.kind, p.default) for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_weighted_mse_is_torchs(backend, monkeypatch):
    """torch's weighted mse_loss: weight * (x - t)**2, "mean" over weight.sum(); gradients of
    input, target and weight; weight of input's shape or torch's ValueError; NumPy arrays with
    return_grad too."""
    import torch.nn.functional as F
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on the CPU under TRITON_INTERPRET=1 only")
    rng = np.random.default_rng(0)
    x0, t0, w0 = rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), rng.uniform(0, 2, (4, 5))
    for reduction in ("none", "sum", "mean"):
        ours = [torch.tensor(a, requires_grad=True) for a in (x0, t0, w0)]
        theirs = [torch.tensor(a, requires_grad=True) for a in (x0, t0, w0)]
        lo = gpuloss.mse_loss(*ours[:2], None, None, reduction, ours[2], backend=backend)  # positional, as torch
        lt = F.mse_loss(*theirs[:2], reduction=reduction, weight=theirs[2])
        torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
        go = torch.tensor(rng.standard_normal(lt.shape))
        lo.backward(go)
        lt.backward(go)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
        r = gpuloss.mse_loss(x0, t0, reduction=reduction, weight=w0, return_grad="all")  # NumPy arrays
        if reduction == "none":  # the gradient of the sum of the weighted per-element losses
            np.testing.assert_allclose(r.loss, w0 * (x0 - t0) ** 2, rtol=1e-12)
            np.testing.assert_allclose(r.grad, 2 * w0 * (x0 - t0), rtol=1e-12)
            np.testing.assert_allclose(r.grad_target, -2 * w0 * (x0 - t0), rtol=1e-12)
        else:
            s = F.mse_loss(*[torch.tensor(a, requires_grad=True) for a in (x0, t0)], reduction=reduction,
                           weight=torch.tensor(w0))
            np.testing.assert_allclose(r.loss, s.item(), rtol=1e-12)
            assert isinstance(r.loss, np.ndarray) and r.loss.shape == ()
            np.testing.assert_allclose(r.grad, theirs[0].grad.numpy() / go.item(), rtol=1e-12)
            np.testing.assert_allclose(r.grad_target, theirs[1].grad.numpy() / go.item(), rtol=1e-12)
    with pytest.raises(ValueError, match="Weights and input must have the same size"):
        gpuloss.mse_loss(torch.tensor(x0), torch.tensor(t0), weight=torch.ones(5))
    with warnings.catch_warnings(record=True) as seen:  # the broadcast warning names the caller's line
        warnings.simplefilter("always")
        gpuloss.mse_loss(torch.tensor(x0), torch.tensor(t0[:1]), weight=torch.tensor(w0), backend=backend)
    assert [w.filename for w in seen if "target size" in str(w.message)] == [__file__]


@pytest.mark.parametrize("name", [n for n in gnn.__all__ if n != "LinearCrossEntropyOptions"])
def test_jit_script_says_it_cannot_compile_the_module(name):
    """TorchScript compiles Python source and cannot call gpuloss's kernels: it
    failed deep in its compiler (keyword-only arguments, getattr), and a second
    attempt with "Can't redefine method".  Now a clear error, every time, and a
    model holding the module keeps it."""
    kw = {"LinearCrossEntropyLoss": dict(in_features=4, num_classes=5), "Softmax": dict(dim=1),
          "LogSoftmax": dict(dim=1)}.get(name, {})
    module = getattr(gnn, name)(**kw)
    model = torch.nn.Sequential(torch.nn.Identity(), module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation
        for target in (module, module, model):
            with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile gpuloss.nn.{name}: TorchScript"):
                torch.jit.script(target)
    assert model[1] is module


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "NLLLoss", "KLDivLoss", "BCELoss", "BCEWithLogitsLoss",
                                  "MSELoss"])
def test_a_subclass_keeps_its_own_constructor(rng, name):
    """A user's subclass with its own __init__ (fixed arguments, extra attributes)
    runs it, as a subclass of torch's module does: the generated constructor that
    shows torch's signature must not replace it (a silently different reduction)."""
    ours_base, torch_base = getattr(gnn, name), getattr(torch.nn, name)

    def subclass(base):
        class Custom(base):
            def __init__(self, scale):
                super().__init__(reduction="sum")
                self.scale = scale

            def forward(self, input, target):
                return super().forward(input, target) * self.scale
        return Custom

    x = torch.from_numpy(rng.standard_normal((4, 5)))
    if name in ("CrossEntropyLoss", "NLLLoss"):
        t = torch.from_numpy(rng.integers(0, 5, 4))
    else:
        t = torch.from_numpy(rng.uniform(0.05, 0.95, (4, 5)))
    if name == "BCELoss":
        x = torch.sigmoid(x)
    ours, theirs = subclass(ours_base)(2.0), subclass(torch_base)(2.0)
    assert ours.reduction == theirs.reduction == "sum" and ours.scale == 2.0
    torch.testing.assert_close(ours(x, t), theirs(x, t))
