"""gpuloss.linear_cross_entropy and gpuloss.nn.LinearCrossEntropyLoss as
drop-ins for torch's (torch 2.13+): same arguments, defaults and results
(probability targets, K-dimensional losses, ignore_index=None, options), the
module's state_dict both ways, and torch.compile(fullgraph=True) with no
graph break through the function, the module and a training step.

Where the installed torch has its own, results are compared with it on
float64 inputs (its reference path, ``options=None``); elsewhere with the
definition ``cross_entropy(linear(...))``.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import gpuloss  # noqa: E402
import gpuloss.nn as gnn  # noqa: E402

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyLoss")


def _theirs(input, linear_weight, target, **kw):
    """torch's function where it exists, else its definition."""
    if HAS_TORCH_LCE:
        return F.linear_cross_entropy(input, linear_weight, target, **kw)
    kw.pop("options", None)
    bias = kw.pop("linear_bias", None)
    C, out, H = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    logits = F.linear(input, linear_weight.reshape(int(np.prod((C,) + out)), H), None if bias is None else bias.reshape(-1))
    logits = logits.reshape(tuple(input.shape[:-1]) + (C,) + out)
    if kw.get("ignore_index") is None:
        kw["ignore_index"] = -100
    return F.cross_entropy(logits, target, **kw)


def _case(rng, N, H, C, out=(), bias=True, prob=False, ignore=None, unbatched=False):
    P = int(np.prod(out)) if out else 1
    x = torch.tensor(rng.standard_normal(H if unbatched else (N, H)), requires_grad=True)
    W = torch.tensor(rng.standard_normal((C,) + out + (H,)) / np.sqrt(H) * 2, requires_grad=True)
    b = torch.tensor(rng.standard_normal((C,) + out) * 0.5, requires_grad=True) if bias else None
    lead = () if unbatched else (N,)
    if prob:
        t = torch.tensor(rng.dirichlet(np.ones(C), size=lead + out if (lead + out) else None))
        t = t.movedim(-1, len(lead)) if (lead + out) else t
    else:
        t = torch.tensor(rng.integers(0, C, lead + out))
        if ignore is not None and t.dim():
            t.view(-1)[:: max(1, t.numel() // 3)] = ignore
    del P
    return x, W, b, t


def _grads(loss, params, go=None):
    return torch.autograd.grad(loss, [p for p in params if p is not None], grad_outputs=go)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", [
    dict(), dict(bias=False), dict(ignore=-100), dict(ignore=2, ignore_index=2), dict(prob=True),
    dict(out=(3,)), dict(out=(2, 3), ignore=-100), dict(out=(3,), prob=True), dict(unbatched=True),
    dict(unbatched=True, prob=True), dict(weight=True, label_smoothing=0.2), dict(weight=True, prob=True),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_matches_torch(rng, reduction, case):
    case = dict(case)
    kw = {k: case.pop(k) for k in ("ignore_index", "label_smoothing") if k in case}
    weighted = case.pop("weight", False)
    N, H, C = 7, 5, 11
    x, W, b, t = _case(rng, N, H, C, **case)
    if weighted:
        kw["weight"] = torch.tensor(rng.uniform(0.3, 2.0, C))
    theirs = _theirs(x, W, t, linear_bias=b, reduction=reduction, **kw)
    ours = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, chunk_size=3, **kw)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    go = torch.tensor(rng.standard_normal(tuple(theirs.shape)))
    for g_o, g_t in zip(_grads(ours, (x, W, b), go), _grads(theirs, (x, W, b), go)):
        torch.testing.assert_close(g_o, g_t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", [dict(), dict(out=(3,)), dict(unbatched=True), dict(label_smoothing=0.2),
                                  dict(empty=True)],
                         ids=["plain", "kdim", "unbatched", "smoothed", "empty"])
@pytest.mark.parametrize("which", ["target", "weight", "both"])
def test_probability_targets_differentiate_target_and_class_weight(rng, reduction, case, which):
    """As torch (and gpuloss.cross_entropy), the loss with probability targets
    is differentiable with respect to the probabilities and the class
    weights; they were refused (target) or silently left without a gradient
    (weight), and with no tokens the loss was not in their graph at all."""
    case = dict(case)
    kw = {k: case.pop(k) for k in ("label_smoothing",) if k in case}
    N, H, C = 0 if case.pop("empty", False) else 7, 5, 11
    x, W, b, t = _case(rng, N, H, C, prob=True, **case)
    w = torch.tensor(rng.uniform(0.3, 2.0, C))
    t.requires_grad_(which in ("target", "both"))
    w.requires_grad_(which in ("weight", "both"))
    theirs = _theirs(x, W, t, linear_bias=b, weight=w, reduction=reduction, **kw)
    ours = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction, chunk_size=3, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, equal_nan=True)  # empty "mean": NaN
    go = torch.tensor(rng.standard_normal(tuple(theirs.shape)))
    params = (x, W, b, t if t.requires_grad else None, w if w.requires_grad else None)
    for g_o, g_t in zip(_grads(ours, params, go), _grads(theirs, params, go)):
        torch.testing.assert_close(g_o, g_t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtypes", [("float32", "float64", None), ("float32", "float32", "float64"),
                                    ("bfloat16", "float32", None), ("float16", "float16", "float32")])
def test_probability_targets_promote_the_loss_dtype(rng, dtypes):
    """torch promotes the logits, probability targets and class weights to
    one dtype: float64 probabilities or weights make a float64 loss (the
    computation in float64), float32 ones next to 16-bit operands a float32
    loss.  The gradients come back in each operand's dtype."""
    op, tp, wp = (getattr(torch, d) if d else None for d in dtypes)
    x, W, b, t = _case(rng, 6, 8, 9, prob=True)
    x, W, b = (a.detach().to(op).requires_grad_() for a in (x, W, b))
    t = t.to(tp)
    w = None if wp is None else torch.tensor(rng.uniform(0.5, 2.0, 9)).to(wp)
    for reduction in ("mean", "none"):
        ours = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction)
        ref = _theirs(*(a.detach().double() for a in (x, W)), t.double(), linear_bias=b.detach().double(),
                      weight=None if w is None else w.double(), reduction=reduction)
        want = torch.promote_types(torch.promote_types(op, tp), wp or op)
        assert ours.dtype == want, (ours.dtype, want)
        if HAS_TORCH_LCE:
            assert F.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction).dtype == want
        tol = 1e-12 if want == torch.float64 and op != torch.float32 else 1e-5 if op == torch.float32 else 2e-2
        torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
        gx, gW, gb = torch.autograd.grad(ours.sum(), (x, W, b))
        assert (gx.dtype, gW.dtype, gb.dtype) == (op, op, op)


@pytest.mark.parametrize("case", [dict(), dict(bias=False), dict(out=(3,)), dict(prob=True), dict(unbatched=True)],
                         ids=["plain", "no-bias", "kdim", "prob", "unbatched"])
def test_no_input_features(rng, case):
    """in_features = 0: the logits are the bias (zeros without one), as torch
    gives them; gpuloss failed reshaping zero elements.  Loss, the bias's
    gradient, zero-size gradients for input and weight, also as NumPy
    arrays with return_grad."""
    x, W, b, t = _case(rng, 5, 0, 7, **case)
    for reduction in ("mean", "none"):
        ours = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
        theirs = _theirs(x, W, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        go = torch.tensor(rng.standard_normal(tuple(theirs.shape)))
        for g_o, g_t in zip(_grads(ours, (x, W, b), go), _grads(theirs, (x, W, b), go)):
            torch.testing.assert_close(g_o, g_t, rtol=1e-12, atol=1e-12)
    if b is not None:
        o = gpuloss.linear_cross_entropy(x.detach().numpy(), W.detach().numpy(), t.numpy(),
                                         linear_bias=b.detach().numpy(), return_grad=True)
        np.testing.assert_allclose(o.loss, _theirs(x, W, t, linear_bias=b).detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(o.grad_linear_bias, _grads(_theirs(x, W, t, linear_bias=b), (b,))[0].numpy(),
                                   rtol=1e-12, atol=1e-14)
        assert o.grad_input.shape == tuple(x.shape) and o.grad_linear_weight.shape == tuple(W.shape)


def test_ignore_index_none_means_minus_100(rng):
    """None is -100 for class indices; another ignore_index makes -100 an
    out-of-range class, refused on the CPU (value checks)."""
    x, W, b, t = _case(rng, 6, 4, 9, ignore=-100)
    a = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b)
    torch.testing.assert_close(a, gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, ignore_index=-100))
    with pytest.raises(ValueError, match="class index -100"):
        gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, ignore_index=5)


def test_options_are_honoured(rng):
    """torch's options: batch_chunk_size / chunking_method size the chunks,
    acc_policy "compact" accumulates in the weight's dtype, acc_dtype picks
    the accumulation dtype, allow_retain_graph lets backward run twice."""
    from gpuloss.linear_ce import _resolve_options
    Opt = gnn.LinearCrossEntropyOptions
    W = torch.zeros(1000, 64, dtype=torch.bfloat16)
    chunk, acc, retain = _resolve_options(Opt(batch_chunk_size=96), None, None, 4096, 64, 1000, W, "torch",
                                          "cpu", False)
    assert (chunk, acc, retain) == (96, "float32", False)
    chunk, _, _ = _resolve_options(Opt(chunking_method="aspect_ratio:2"), None, None, 4096, 64, 1000, W,
                                   "torch", "cpu", False)
    assert chunk == 128  # next_pow2(ceil(4096 / ceil(1000 / 64))) // 2
    assert _resolve_options(Opt(acc_policy="compact"), None, None, 64, 64, 1000, W, "torch", "cpu", False)[1] \
        == "weight"
    assert _resolve_options(Opt(acc_dtype=torch.bfloat16), None, None, 64, 64, 1000, W, "torch", "cpu",
                            False)[1] == "weight"
    assert _resolve_options(Opt(allow_retain_graph=True), 7, None, 64, 64, 1000, W, "torch", "cpu", False) \
        == (7, "float32", True)
    x, W2, b, t = _case(rng, 6, 4, 9)
    loss = gpuloss.linear_cross_entropy(x, W2, t, linear_bias=b, options=Opt(allow_retain_graph=True))
    g1 = torch.autograd.grad(loss, W2, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, W2)[0], g1)


def test_options_torch_refuses_are_refused(rng):
    """Where torch's chunked path takes the call, it refuses options whose batch_chunk_size
    its chunking_method contradicts (ValueError) and an acc_dtype other than the input's
    but float32 for 16-bit inputs (RuntimeError); gpuloss used batch_chunk_size / ignored
    acc_dtype.  Where torch falls back to its reference path (label smoothing) both pass.
    The options class gpuloss ships for a torch without one checks acc_dtype as torch's."""
    import warnings
    from gpuloss.linear_ce import _Options
    Opt = gnn.LinearCrossEntropyOptions
    x, W, b, t = _case(rng, 64, 8, 100)
    refused = [(Opt(batch_chunk_size=3, chunking_method="aspect_ratio"), ValueError, "give different chunk sizes"),
               (Opt(acc_dtype=torch.float32), RuntimeError, "supports float32 acc_dtype"),  # float64 input
               (Opt(acc_dtype=torch.bfloat16, acc_policy="compact"), RuntimeError, "supports float32 acc_dtype")]
    for opt, err, msg in refused:
        with pytest.raises(err, match=msg):
            gpuloss.linear_cross_entropy(x, W, t, options=opt)
        if HAS_TORCH_LCE:
            with pytest.raises(err, match=msg):
                F.linear_cross_entropy(x, W, t, options=opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "options ignored" (smoothing)
            ours = gpuloss.linear_cross_entropy(x, W, t, options=opt, label_smoothing=0.1)
            torch.testing.assert_close(ours, _theirs(x, W, t, options=opt, label_smoothing=0.1))
    agree = Opt(batch_chunk_size=8, chunking_method="aspect_ratio")  # both give 8 here: accepted
    torch.testing.assert_close(gpuloss.linear_cross_entropy(x, W, t, options=agree), _theirs(x, W, t))
    same = Opt(acc_dtype=torch.float32)  # the input's own dtype
    torch.testing.assert_close(gpuloss.linear_cross_entropy(x.float(), W.float(), t, options=same),
                               _theirs(x.float(), W.float(), t))
    with pytest.raises(ValueError, match="acc_dtype must be one of"):
        _Options(acc_dtype=torch.int32)


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="the installed torch has no nn.LinearCrossEntropyLoss")
def test_module_state_dict_loads_both_ways(rng):
    kw = dict(out_features=(2,), bias=True, dtype=torch.float64, weight=torch.rand(6, dtype=torch.float64),
              label_smoothing=0.1)
    theirs = torch.nn.LinearCrossEntropyLoss(5, 6, **kw)
    ours = gnn.LinearCrossEntropyLoss(5, 6, **kw)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.tensor(rng.standard_normal((4, 5)))
    t = torch.tensor(rng.integers(0, 6, (4, 2)))
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        ours.linear.weight.mul_(0.5)
    theirs.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-10, atol=1e-12)


def test_module_structure_without_torch_class(rng, monkeypatch):
    """The module's constructor, attributes and state_dict keys are torch's
    whether or not the installed torch has its own class."""
    m = gnn.LinearCrossEntropyLoss(5, 6, bias=True, weight=torch.rand(6), ignore_index=3)
    assert set(m.state_dict()) == {"weight", "linear.weight", "linear.bias"}
    assert m.linear.weight.shape == (6, 5) and m.ignore_index == 3 and m.reduction == "mean"
    x = torch.randn(4, 5)
    t = torch.tensor([0, 3, 5, 1])
    loss = m(x, t)
    loss.backward()
    assert m.linear.weight.grad is not None


def test_module_repr_attributes_and_errors_are_torchs():
    """repr lists torch's attributes (then our extras), out_features is kept
    as given, and the constructor's checks raise torch's RuntimeError,
    whether or not the installed torch has the class (the compat CI runs
    this on a torch without it)."""
    m = gnn.LinearCrossEntropyLoss(4, 7, out_features=[2, 3], bias=True, label_smoothing=0.1, z_loss=1e-3)
    assert m.out_features == [2, 3]
    assert m.extra_repr() == (
        "in_features=4, num_classes=7, out_features=[2, 3], bias=True, reduction=mean, "
        "ignore_index=None, label_smoothing=0.1, options=None, z_loss=0.001"), m.extra_repr()
    if HAS_TORCH_LCE:
        theirs = torch.nn.LinearCrossEntropyLoss(4, 7, out_features=[2, 3], bias=True, label_smoothing=0.1)
        assert m.extra_repr().startswith(theirs.extra_repr())
        assert repr(gnn.LinearCrossEntropyLoss(4, 7)) == repr(torch.nn.LinearCrossEntropyLoss(4, 7))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        gnn.LinearCrossEntropyLoss(4, 7, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="weight shape"):
        gnn.LinearCrossEntropyLoss(4, 7, weight=torch.ones(6))


def _count_breaks(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


def test_compiles_without_graph_breaks(rng):
    """The function, the module, and a training step trace with 0 graph
    breaks; the compiled results equal eager."""
    x, W, b, t = _case(rng, 8, 6, 13)
    x32, W32, b32 = (a.detach().float().requires_grad_() for a in (x, W, b))

    def fn(x, W, b, t):
        return gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1, z_loss=1e-3, chunk_size=4)

    assert _count_breaks(fn, x32, W32, b32, t) == 0
    mod = gnn.LinearCrossEntropyLoss(6, 13, bias=True, chunk_size=4)
    assert _count_breaks(mod, x32, t) == 0
    eager = fn(x32, W32, b32, t)
    ge = torch.autograd.grad(eager, (x32, W32, b32))
    torch._dynamo.reset()
    comp = torch.compile(fn, fullgraph=True, backend="aot_eager")(x32, W32, b32, t)
    gc = torch.autograd.grad(comp, (x32, W32, b32))
    torch.testing.assert_close(comp, eager)
    for a, c in zip(gc, ge):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_training_step_equals_eager(rng, reduction):
    torch.manual_seed(int(rng.integers(1 << 30)))
    X = torch.randn(3, 10, 6)
    Y = torch.randint(0, 17, (3, 10))
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        head = gnn.LinearCrossEntropyLoss(8, 17, bias=True, reduction=reduction, chunk_size=4)
        params = list(body.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.1)

        def step(x, y):
            loss = head(body(x), y)
            return loss if reduction == "mean" else loss.mean()

        f = step
        if compiled:
            torch._dynamo.reset()
            f = torch.compile(step, fullgraph=True, backend="aot_eager")
        losses = []
        for i in range(3):
            opt.zero_grad()
            loss = f(X[i], Y[i])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), [p.detach().clone() for p in params]))
    torch.testing.assert_close(runs[1][0], runs[0][0])
    for a, c in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(a, c)


def test_accuracy_float32_at_torch_level(rng):
    """float32 against the float64 definition: our error at most torch's own
    float32 error (x2) plus a small atol, for loss and every gradient."""
    x, W, b, t = _case(rng, 64, 32, 301, ignore=-100)
    ref = _theirs(x, W, t, linear_bias=b)
    gref = _grads(ref, (x, W, b))
    x32, W32, b32 = (a.detach().float().requires_grad_() for a in (x, W, b))
    theirs = F.cross_entropy(F.linear(x32, W32, b32), t)
    ours = gpuloss.linear_cross_entropy(x32, W32, t, linear_bias=b32, chunk_size=16)
    for o, th, r in zip([ours] + list(_grads(ours, (x32, W32, b32))), [theirs] + list(_grads(theirs, (x32, W32, b32))),
                        [ref] + list(gref)):
        e_o = (o.double() - r).abs().max().item()
        e_t = (th.double() - r).abs().max().item()
        assert e_o <= 2 * e_t + 1e-6 * r.abs().max().item(), (e_o, e_t)


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="the installed torch has no linear_cross_entropy")
def test_options_take_a_class_weight_of_any_dtype_as_torchs_chunked_path():
    """With ``options``, torch's chunked operator takes a class weight of any
    dtype (float64 or int64 next to float32 operands) and converts it; its
    reference path (no options, or label smoothing) refuses one that is not
    the input's dtype.  gpuloss refused both, and a weight that requires grad
    (torch's chunked operator takes it and leaves its gradient None)."""
    import warnings
    x = torch.randn(5, 4, dtype=torch.float32, requires_grad=True)
    W = torch.randn(6, 4, dtype=torch.float32, requires_grad=True)
    t = torch.tensor([0, 5, 2, -100, 3])
    opts = torch.nn.LinearCrossEntropyOptions()
    for w in (torch.rand(6, dtype=torch.float64), torch.tensor([1, 2, 3, 1, 0, 1]), torch.ones(6, dtype=torch.bool)):
        for reduction in ("mean", "sum", "none"):
            ours = gpuloss.linear_cross_entropy(x, W, t, weight=w, reduction=reduction, options=opts)
            theirs = F.linear_cross_entropy(x, W, t, weight=w, reduction=reduction, options=opts)
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs)
            for a, b in zip(torch.autograd.grad(ours.sum(), (x, W)), torch.autograd.grad(theirs.sum(), (x, W))):
                torch.testing.assert_close(a, b)
        assert gnn.LinearCrossEntropyLoss(4, 6, weight=w, options=opts)(x, t).dtype == torch.float32
        if w.is_floating_point():  # one that requires grad: taken, its grad left None (torch's chunked op)
            wg = w.clone().requires_grad_()
            for fn in (gpuloss.linear_cross_entropy, F.linear_cross_entropy):
                fn(x, W, t, weight=wg, options=opts).backward()
            assert wg.grad is None
        for kw in (dict(), dict(options=opts, label_smoothing=0.1)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(RuntimeError):
                    F.linear_cross_entropy(x, W, t, weight=w, **kw)
                with pytest.raises(TypeError, match="weight"):
                    gpuloss.linear_cross_entropy(x, W, t, weight=w, **kw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_options_form_float32_logits_from_16bit_operands(rng, dtype, monkeypatch):
    """With ``options`` torch's chunked path forms the logits in its float32
    acc_dtype; gpuloss rounded them to the operands' 16-bit dtype first (as
    ``F.linear`` does without options): losses several ulps from torch's.
    float16 under a memory-saving acc_policy keeps float16 logits, as torch."""
    dt = getattr(torch, dtype)
    x = torch.from_numpy(rng.standard_normal((64, 16))).to(dt)
    W = torch.from_numpy(rng.standard_normal((48, 16))).to(dt)
    b = torch.from_numpy(rng.standard_normal(48)).to(dt)
    t = torch.from_numpy(rng.integers(0, 48, 64))
    Opt = gnn.LinearCrossEntropyOptions

    def ce(logits):
        return F.cross_entropy(logits.float(), t, reduction="none").double()

    z32 = F.linear(x.float(), W.float(), b.float())
    ulp = 2.0 ** (-8 if dtype == "bfloat16" else -11)
    for options, logits in [(Opt(batch_chunk_size=16), z32), (None, F.linear(x, W, b))]:
        ours = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, reduction="none", options=options,
                                            chunk_size=None if options else 16)
        want = ce(logits)
        assert ((ours.double() - want).abs() <= ulp * want.abs() + 1e-6).all(), (options, ours.double() - want)
        if HAS_TORCH_LCE and options is not None:
            theirs = F.linear_cross_entropy(x, W, t, linear_bias=b, reduction="none", options=options)
            torch.testing.assert_close(ours.double(), theirs.double(), rtol=ulp, atol=1e-6)
    # hidden wider than a chunk's logits: the weight is upcast a few rows at a time
    monkeypatch.setattr(gpuloss._linear_chunks, "SLAB_MIN_ROWS", 1)
    xw = torch.from_numpy(rng.standard_normal((32, 128))).to(dt)
    Ww = torch.from_numpy(rng.standard_normal((48, 128)) * 0.3).to(dt)
    tw = torch.from_numpy(rng.integers(0, 48, 32))
    ours = gpuloss.linear_cross_entropy(xw, Ww, tw, linear_bias=b, reduction="none", options=Opt(batch_chunk_size=8))
    want = F.cross_entropy(F.linear(xw.float(), Ww.float(), b.float()), tw, reduction="none").double()
    assert ((ours.double() - want).abs() <= ulp * want.abs() + 1e-6).all()
    from gpuloss.linear_ce import _chunked_logits
    if dtype == "float16":
        assert _chunked_logits(Opt(acc_policy="compact"), True, dtype, None, "cuda") == "input"
        assert _chunked_logits(Opt(), True, dtype, None, "cuda") == "input"  # auto: compact on a GPU
        assert _chunked_logits(Opt(), True, dtype, None, "cpu") == "float32"  # auto: accurate on the CPU
    assert _chunked_logits(Opt(acc_dtype=dt), True, dtype, None, "cpu") == "input"
    # torch: acc_dtype None is float32 only under acc_policy="auto"; an explicit policy keeps the input's dtype
    assert _chunked_logits(Opt(acc_policy="accurate"), True, dtype, None, "cpu") == "input"
    assert _chunked_logits(Opt(acc_policy="accurate", acc_dtype=torch.float32), True, dtype, None, "cpu") == "float32"
    ours = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, reduction="none", options=Opt(acc_policy="accurate"))
    want = ce(F.linear(x, W, b))  # 16-bit logits (torch also rounds its intermediates to them there; we do not)
    assert ((ours.double() - want).abs() <= ulp * want.abs() + 1e-6).all()
    if HAS_TORCH_LCE:
        options = Opt(acc_policy="accurate", acc_dtype=torch.float32)
        ours = gpuloss.linear_cross_entropy(x, W, t, linear_bias=b, reduction="none", options=options)
        theirs = F.linear_cross_entropy(x, W, t, linear_bias=b, reduction="none", options=options)
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=2 * ulp, atol=1e-5)
    assert _chunked_logits(Opt(), True, "float32", None, "cpu") == "input"
