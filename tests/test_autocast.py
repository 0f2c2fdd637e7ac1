"""torch.autocast: gpuloss follows torch's policy for the ops it stands in
for (gpuloss._autocast).  On the CPU every case is compared with torch's own
function under the same autocast: result dtype, value and the gradients'
dtypes and values.  The CUDA-only parts of the policy (softmax in float32,
binary_cross_entropy refused) are checked on the policy itself here and
against torch on a GPU in tests/test_torch_gpu.py."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import gpuloss  # noqa: E402
import gpuloss.nn  # noqa: E402,F401
from gpuloss import _autocast as AC  # noqa: E402

LOW = [torch.bfloat16, torch.float16]


def _tol(dtype):
    # gradients: torch rounds its float32 gradient to the input's dtype once,
    # and so does gpuloss; one ulp of that dtype apart at most
    return dict(rtol={torch.bfloat16: 1.6e-2, torch.float16: 2e-3}.get(dtype, 2e-6),
                atol={torch.bfloat16: 1e-3, torch.float16: 1e-4}.get(dtype, 1e-7))


def _leaves(arrays, grad):
    return [None if a is None else a.detach().clone().requires_grad_(i in grad) for i, a in enumerate(arrays)]


def _grads(loss, leaves):
    loss.float().sum().backward()
    return [None if a is None or not a.requires_grad else a.grad for a in leaves]


def _compare(theirs_fn, ours_fn, arrays, ac_dtype=torch.bfloat16, grad=(0, 1), grad_tol=None):
    """theirs_fn / ours_fn take the same fresh leaves (those at the indices
    ``grad`` require grad); under autocast (CPU, ``ac_dtype``) their results
    and gradients must agree in dtype and value: float32 results to float32
    rounding, 16-bit ones and the gradients to one rounding to their dtype
    (``grad_tol(theirs)``: other tolerances for the gradients)."""
    out = []
    for fn in (theirs_fn, ours_fn):
        leaves = _leaves(arrays, grad)
        with torch.autocast("cpu", dtype=ac_dtype):
            loss = fn(*leaves)
        out.append((loss, _grads(loss, leaves)))
    (lt, gt), (lo, go) = out
    assert lo.dtype == lt.dtype, (lo.dtype, lt.dtype)
    assert lo.shape == lt.shape
    torch.testing.assert_close(lo.float(), lt.float(), **(_tol(lt.dtype) if lt.dtype in LOW else dict(rtol=2e-6,
                                                                                                      atol=2e-6)))
    for a, b in zip(go, gt):
        if b is None:
            continue
        assert a is not None and a.dtype == b.dtype, (None if a is None else a.dtype, b.dtype)
        torch.testing.assert_close(a.float(), b.float(), **(grad_tol(b) if grad_tol else _tol(b.dtype)))


@pytest.fixture
def data(rng):
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    x = torch.randn(6, 9, generator=g) * 3
    t = torch.randint(0, 9, (6,), generator=g)
    t[2] = -100
    p = torch.softmax(torch.randn(6, 9, generator=g), -1)
    y = torch.rand(6, 9, generator=g)
    w = torch.rand(9, generator=g) + 0.5
    return x, t, p, y, w


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_index_targets(data, dtype, reduction):
    x, t, _, _, w = data
    kw = dict(reduction=reduction, label_smoothing=0.1)
    _compare(lambda x, w: F.cross_entropy(x, t, weight=w, **kw),
             lambda x, w: gpuloss.cross_entropy(x, t, weight=w, **kw), [x.to(dtype), w.to(dtype)], dtype, grad=(0,))


@pytest.mark.parametrize("dtype", LOW)
def test_cross_entropy_probability_targets(data, dtype):
    x, _, p, _, _ = data
    _compare(F.cross_entropy, gpuloss.cross_entropy, [x.to(dtype), p.to(dtype)], dtype)


def test_mixed_dtypes_are_cast_as_torch_casts_them(data):
    """bf16 logits with float32 class weights: torch refuses the mix outside
    autocast and computes it in float32 inside; gpuloss the same."""
    x, t, p, y, w = data
    xb = x.bfloat16()
    with pytest.raises(TypeError, match="weight"):
        gpuloss.cross_entropy(xb, t, weight=w)
    _compare(lambda x, w: F.cross_entropy(x, t, weight=w), lambda x, w: gpuloss.cross_entropy(x, t, weight=w),
             [xb, w], grad=(0,))
    _compare(F.cross_entropy, gpuloss.cross_entropy, [xb, p])  # float32 probabilities
    _compare(F.mse_loss, gpuloss.mse_loss, [xb, y])
    _compare(F.binary_cross_entropy_with_logits, gpuloss.binary_cross_entropy_with_logits, [xb, y.half()])


@pytest.mark.parametrize("dtype", LOW)
def test_nll_loss(data, dtype):
    x, t, _, _, w = data
    lp = torch.log_softmax(x, -1)
    _compare(lambda a, w: F.nll_loss(a, t, weight=w), lambda a, w: gpuloss.nll_loss(a, t, weight=w),
             [lp.to(dtype), w.to(dtype)], dtype, grad=(0,))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(data, dtype, log_target):
    x, _, p, _, _ = data
    lp = torch.log_softmax(x, -1)
    tgt = p.log() if log_target else p
    _compare(lambda a, b: F.kl_div(a, b, reduction="batchmean", log_target=log_target),
             lambda a, b: gpuloss.kl_div(a, b, reduction="batchmean", log_target=log_target),
             [lp.to(dtype), tgt.to(dtype)], dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_kl_div_with_logits(data, dtype):
    """torch's composition (log_softmax, softmax, kl_div) under autocast: the
    divergence in float32, from the 16-bit logits."""
    x, _, p, _, _ = data
    s = torch.randn_like(x)

    def theirs(a, b):
        return F.kl_div(F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1), reduction="batchmean",
                        log_target=True)
    _compare(theirs, gpuloss.kl_div_with_logits, [x.to(dtype), s.to(dtype)], dtype, grad=(0,))


@pytest.mark.parametrize("dtype", LOW)
def test_bce_with_logits(data, dtype):
    x, _, _, y, _ = data
    pw = torch.rand(9) + 0.5
    wt = torch.rand(6, 1)
    _compare(lambda a, b, w, pw: F.binary_cross_entropy_with_logits(a, b, weight=w, pos_weight=pw),
             lambda a, b, w, pw: gpuloss.binary_cross_entropy_with_logits(a, b, weight=w, pos_weight=pw),
             [x.to(dtype), y.to(dtype), wt.to(dtype), pw.to(dtype)], dtype, grad=(0, 1))


@pytest.mark.parametrize("dtype", LOW)
def test_bce_and_mse(data, dtype):
    x, _, _, y, _ = data
    _compare(F.binary_cross_entropy, gpuloss.binary_cross_entropy, [torch.sigmoid(x).to(dtype), y.to(dtype)], dtype)
    _compare(lambda a, b: F.mse_loss(a, b, reduction="none"), lambda a, b: gpuloss.mse_loss(a, b, reduction="none"),
             [x.to(dtype), y.to(dtype)], dtype)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_keeps_its_dtype_on_the_cpu(data, fn):
    """CPU autocast does not list softmax: bf16 stays bf16, as in torch.  The
    values are compared with the float64 truth (torch's CPU bf16
    log_softmax is off by up to 100% where log p is near 0; gpuloss rounds
    once from float32)."""
    x = data[0].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs, ours = getattr(F, fn)(x, -1), getattr(gpuloss, fn)(x, -1)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    truth = getattr(torch, fn)(x.double(), -1)
    torch.testing.assert_close(ours.double(), truth, rtol=2**-8, atol=1e-6)


def test_float64_and_float32_untouched(data):
    x, t, p, y, w = data
    for dt in (torch.float64, torch.float32):
        _compare(lambda a: F.cross_entropy(a, t), lambda a: gpuloss.cross_entropy(a, t), [x.to(dt)])
        _compare(F.mse_loss, gpuloss.mse_loss, [x.to(dt), y.to(dt)])


def test_empty_inputs_give_float32(data):
    e = torch.zeros(0, 9, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gpuloss.cross_entropy(e, torch.zeros(0, dtype=torch.long)).dtype == torch.float32
        assert F.cross_entropy(e, torch.zeros(0, dtype=torch.long)).dtype == torch.float32
        assert gpuloss.mse_loss(e, e).dtype == torch.float32
        assert gpuloss.nll_loss(e, torch.zeros(0, dtype=torch.long)).dtype == torch.float32


def test_modules_follow(data):
    x, t, _, _, _ = data
    _compare(lambda a: torch.nn.CrossEntropyLoss(label_smoothing=0.2)(a, t),
             lambda a: gpuloss.nn.CrossEntropyLoss(label_smoothing=0.2)(a, t), [x.bfloat16()])


def test_return_grad_gives_the_input_dtype(data):
    x, t, _, _, _ = data
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gpuloss.cross_entropy(xb, t, return_grad=True)
    assert out.loss.dtype == torch.float32 and out.grad.dtype == torch.bfloat16
    want = gpuloss.cross_entropy(xb, t, return_grad=True, loss_dtype=torch.float32)
    assert torch.equal(out.loss, want.loss) and torch.equal(out.grad, want.grad)


def test_explicit_loss_dtype_wins(data):
    x, t, _, _, _ = data
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gpuloss.cross_entropy(x.bfloat16(), t, loss_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_numpy_arrays_ignore_autocast(data):
    x, t, _, _, _ = data
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gpuloss.cross_entropy(x.numpy(), t.numpy())
    assert isinstance(got, np.ndarray) and got.dtype == np.float32


# ---------------------------------------------------------------- linear CE

@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(rng, dtype, reduction):
    """F.linear's matmul in autocast's dtype, the loss in float32: the same as
    torch's cross_entropy(linear(...)) under autocast, and gradients of the
    float32 parameters in float32.  The chunk loop's own fp32 accumulation
    must not be autocast (chunk_size=3: several chunks).  The gradients come
    from 16-bit matmuls in both (torch scales dL/dz before its matmuls,
    gpuloss after, and accumulates grad_weight over chunks in fp32): equal to
    the 16-bit matmuls' error, a few units of 2**-8 of the largest element.
    torch's logits come from the same 3-row chunks: a CPU fp16 GEMM of 3 rows
    rounds some logits one ulp apart from one of 10 (seen for 1 seed in ~50:
    2.8e-5 relative in a loss), which is not the loss's arithmetic."""
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    h = torch.randn(10, 16, generator=g)
    W = torch.randn(37, 16, generator=g) * 0.3
    b = torch.randn(37, generator=g) * 0.1
    cw = torch.rand(37, generator=g) + 0.5
    t = torch.randint(0, 37, (10,), generator=g)
    t[4] = -100
    kw = dict(reduction=reduction, label_smoothing=0.05)
    chunked = lambda h, W, b: torch.cat([F.linear(h[i:i + 3], W, b) for i in range(0, len(h), 3)])  # noqa: E731
    _compare(lambda h, W, b, cw: F.cross_entropy(chunked(h, W, b), t, weight=cw, **kw),
             lambda h, W, b, cw: gpuloss.linear_cross_entropy(h, W, t, linear_bias=b, weight=cw, chunk_size=3, **kw),
             [h, W, b, cw], dtype, grad=(0, 1, 2),
             grad_tol=lambda g: dict(rtol=0, atol=2**-6 * float(g.abs().max())))


def test_linear_cross_entropy_matches_torchs_own(rng):
    own = getattr(F, "linear_cross_entropy", None)
    if own is None:
        pytest.skip("this torch has no F.linear_cross_entropy")
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    h, W = torch.randn(8, 16, generator=g), torch.randn(29, 16, generator=g) * 0.3
    t = torch.randint(0, 29, (8,), generator=g)
    _compare(lambda h, W: own(h, W, t), lambda h, W: gpuloss.linear_cross_entropy(h, W, t), [h, W])


# ---------------------------------------------------------------- compile

def test_compiles_without_graph_breaks_under_autocast(data):
    x, t, _, _, _ = data

    def step(a, h, W):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return gpuloss.cross_entropy(a, t) + gpuloss.linear_cross_entropy(h, W, t.clamp(min=0))

    h, W = torch.randn(6, 8), torch.randn(9, 8)
    explained = torch._dynamo.explain(step)(x.bfloat16(), h, W)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x.bfloat16(), h, W)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, step(x.bfloat16(), h, W))


# ---------------------------------------------------------------- the CUDA policy

def test_cuda_policy(monkeypatch):
    """What CUDA autocast does differently (checked on the policy: this
    machine has no CUDA autocast to compare against): softmax and
    log_softmax in float32, binary_cross_entropy refused with torch's error."""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert AC.softmax_dtype("torch", "cuda:0", x, None) == torch.float32
    assert AC.softmax_dtype("torch", "cuda:0", x, torch.bfloat16) == torch.bfloat16
    assert AC.softmax_dtype("torch", "cuda:0", x.double(), None) is None
    assert AC.softmax_dtype("torch", "cpu", x, None) is None
    with pytest.raises(RuntimeError, match="unsafe to autocast"):
        AC.fp32_op("bce", "torch", "cuda:0", {"input": x, "target": x})
    assert AC.fp32_op("bce", "torch", "cpu", {"input": x, "target": x})[1] is None  # CPU autocast is off here
    args, out = AC.fp32_op("cross_entropy", "torch", "cuda:1", {"input": x, "target": None})
    assert out == torch.float32 and args["input"] is x
