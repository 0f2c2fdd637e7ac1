"""The PyTorch integration on CUDA tensors (GPU CI only; skipped elsewhere):
autograd through the triton and cupy backends, a training step captured in a
CUDA graph and replayed (which fails on any host synchronisation), and the
memory the in-place cross-entropy gradient saves."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gpuloss  # noqa: E402
import gpuloss.nn as gnn  # noqa: E402
from gpuloss import reference as R  # noqa: E402

from conftest import tol  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_BACKENDS = ["triton", "cupy"]


def _need(name: str) -> None:
    ok, why = gpuloss.backend_status()[name]
    if not ok:
        pytest.skip(f"backend {name} unavailable: {why}")
    if not gpuloss.get_backend(name).accepts("torch", "cuda:0"):
        pytest.skip(f"backend {name} does not take CUDA torch tensors here")


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_cross_entropy_autograd(rng, name, dtype):
    _need(name)
    tdt = getattr(torch, dtype)
    N, C = 64, 3001
    x_np = torch.from_numpy(rng.standard_normal((N, C)) * 3).to(tdt).double().numpy()
    t_np = rng.integers(0, C, N)
    t_np[::7] = -100
    go = rng.uniform(0.5, 2.0, N)
    x = torch.from_numpy(x_np).to("cuda", tdt).requires_grad_()
    kw = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, reduction="none")
    loss = gpuloss.cross_entropy(x, torch.from_numpy(t_np).cuda(), backend=name, **kw)
    loss.backward(torch.from_numpy(go).to("cuda", loss.dtype))
    np.testing.assert_allclose(loss.detach().double().cpu().numpy(), R.cross_entropy(x_np, t_np, **kw),
                               **tol(dtype))
    np.testing.assert_allclose(x.grad.double().cpu().numpy(),
                               R.cross_entropy_grad(x_np, t_np, **kw, grad_output=go)[0], **tol(dtype))


def _steps(loss_fn, model, opt, xs, ys):
    out = []
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        out.append(loss.detach().clone())
    return out


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_graph_training_step_replays_like_eager(rng, name, inplace):
    """Forward, backward and the optimizer step captured once in a CUDA graph
    and replayed on new data: any host synchronisation in gpuloss would fail
    the capture.  The replayed run ends at the eager run's weights."""
    _need(name)
    N, H, C, warm, steps = 32, 64, 1000, 3, 4
    xs = torch.from_numpy(rng.standard_normal((warm + steps, N, H))).float().cuda()
    ys = torch.from_numpy(rng.integers(0, C, (warm + steps, N))).cuda()
    torch.manual_seed(int(rng.integers(1 << 30)))
    make = lambda: torch.nn.Sequential(torch.nn.Linear(H, 128), torch.nn.GELU(),  # noqa: E731
                                       torch.nn.Linear(128, C)).cuda()
    eager_model = make()
    graph_model = make()
    graph_model.load_state_dict(eager_model.state_dict())
    loss_fn = gnn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4, inplace_backward=inplace, backend=name)

    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.1)
    eager_losses = _steps(loss_fn, eager_model, eager_opt, xs, ys)

    opt = torch.optim.SGD(graph_model.parameters(), lr=0.1)
    static_x, static_y = xs[0].clone(), ys[0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch's docs ask
        warm_losses = _steps(loss_fn, graph_model, opt, xs[:warm], ys[:warm])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # backward in the graph assigns fresh .grad tensors each replay
    with torch.cuda.graph(g):
        static_loss = loss_fn(graph_model(static_x), static_y)
        static_loss.backward()
        opt.step()
    graph_losses = []
    for i in range(warm, warm + steps):
        static_x.copy_(xs[i])
        static_y.copy_(ys[i])
        g.replay()
        graph_losses.append(static_loss.detach().clone())
    torch.cuda.synchronize()
    got = torch.stack(warm_losses + graph_losses)
    torch.testing.assert_close(got, torch.stack(eager_losses), rtol=1e-4, atol=1e-5)
    for a, b in zip(graph_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_inplace_gradient_needs_no_logits_sized_buffer(rng):
    """Triton allocates through torch's allocator, so its peak is visible:
    the out-of-place loss+grad holds an N x C gradient, the in-place one
    does not."""
    _need("triton")
    N, C = 256, 32000
    nbytes = N * C * 4
    t = torch.from_numpy(rng.integers(0, C, N)).cuda()
    base = torch.randn(N, C, device="cuda").requires_grad_()

    def run(inplace):
        logits = base * 1.0
        logits_ptr = logits.data_ptr()

        def body():
            loss = gpuloss.cross_entropy(logits, t, inplace_backward=inplace, backend="triton")
            (g,) = torch.autograd.grad(loss, logits)
            if inplace:
                assert g.data_ptr() == logits_ptr
        return _extra_bytes(body)

    out_of_place, in_place = run(False), run(True)
    assert out_of_place >= 0.9 * nbytes, out_of_place
    assert in_place < 0.1 * nbytes, (in_place, nbytes)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_autocast_follows_torch(rng, name):
    """torch.autocast("cuda", bf16): softmax/log_softmax and the losses give
    torch's float32 results from bf16 inputs, binary_cross_entropy is refused
    as torch refuses it, and the fused linear CE runs its matmuls in bf16
    with an fp32 loss (gpuloss._autocast; the CPU policy is in
    tests/test_autocast.py).

    cross_entropy is the exception: CUDA autocast has no entry for it, and
    torch's cross_entropy_loss calls log_softmax with the input's dtype, so
    torch's float32 loss is formed from bf16-rounded log-probabilities (seen on
    an H200: 3e-4 relative from the float32 loss).  gpuloss's is the float32
    loss: it must match ``F.cross_entropy(x.float())`` and be at least as
    close to float64 as torch's."""
    _need(name)
    g = torch.Generator(device="cuda").manual_seed(int(rng.integers(2**31)))
    x = (torch.randn(33, 1000, device="cuda", generator=g) * 3).bfloat16()
    t = torch.randint(0, 1000, (33,), device="cuda", generator=g)
    y = torch.rand(33, 1000, device="cuda", generator=g).bfloat16()
    F = torch.nn.functional
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for fn in ("softmax", "log_softmax"):
            ours, theirs = getattr(gpuloss, fn)(x, -1, backend=name), getattr(F, fn)(x, -1)
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        ours, theirs = gpuloss.cross_entropy(x, t, backend=name), F.cross_entropy(x, t)
        assert ours.dtype == theirs.dtype == torch.float32
        exact = F.cross_entropy(x.double(), t)
        torch.testing.assert_close(ours, F.cross_entropy(x.float(), t), rtol=1e-5, atol=1e-6)
        assert abs(ours.double() - exact) <= abs(theirs.double() - exact) + 1e-6 * abs(exact)
        for ours, theirs in [(gpuloss.mse_loss(x, y, backend=name), F.mse_loss(x, y)),
                             (gpuloss.binary_cross_entropy_with_logits(x, y, backend=name),
                              F.binary_cross_entropy_with_logits(x, y))]:
            assert ours.dtype == theirs.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            F.binary_cross_entropy(torch.sigmoid(x), y)
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            gpuloss.binary_cross_entropy(torch.sigmoid(x), y, backend=name)
        h = torch.randn(64, 128, device="cuda", generator=g, requires_grad=True)
        W = (torch.randn(1000, 128, device="cuda", generator=g) * 0.1).requires_grad_()
        tt = torch.randint(0, 1000, (64,), device="cuda", generator=g)
        ours = gpuloss.linear_cross_entropy(h, W, tt, chunk_size=16, backend=name)
        logits = F.linear(h, W)
        theirs = F.cross_entropy(logits, tt)
    assert logits.dtype == torch.bfloat16 and ours.dtype == theirs.dtype == torch.float32
    # the float32 loss of bf16 logits (a chunk's GEMM may round a logit 1 ulp apart from the whole one's)
    exact = F.cross_entropy(logits.double(), tt)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)
    assert abs(ours.double() - exact) <= abs(theirs.double() - exact) + 1e-3 * abs(exact)
    (gh, gw), (th, tw) = torch.autograd.grad(ours, (h, W)), torch.autograd.grad(theirs, (h, W))
    assert gh.dtype == th.dtype == torch.float32 and gw.dtype == tw.dtype == torch.float32
    torch.testing.assert_close(gh, th, rtol=0, atol=2**-6 * float(th.abs().max()))
    torch.testing.assert_close(gw, tw, rtol=0, atol=2**-6 * float(tw.abs().max()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_arrays_on_a_gpu_other_than_the_current_one(rng, name):
    """A model split over GPUs puts its head on the last one while the current
    device stays cuda:0: the kernels must run on the arrays' GPU."""
    _need(name)
    torch.cuda.set_device(0)
    x = torch.from_numpy(rng.standard_normal((64, 3001))).to("cuda:1", torch.float32).requires_grad_()
    t = torch.from_numpy(rng.integers(0, 3001, 64)).to("cuda:1")
    loss = gpuloss.cross_entropy(x, t, backend=name)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(x.detach().double(), t)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert x.grad.device == x.device and torch.cuda.current_device() == 0
    y = gpuloss.softmax(x.detach(), -1, backend=name)
    torch.testing.assert_close(y, torch.softmax(x.detach(), -1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_linear_ce_with_options_forms_float32_logits(rng, name, dtype):
    """With torch's options, 16-bit operands get float32 logits (torch's chunked
    path; float16 keeps float16 under the GPU's default "compact" policy):
    the weight upcast a slab at a time on the GPU, losses within an ulp of
    cross-entropy on float32 logits, gradients close to float64's."""
    _need(name)
    Opt = gnn.LinearCrossEntropyOptions
    dt = getattr(torch, dtype)
    x = torch.from_numpy(rng.standard_normal((96, 64))).to("cuda", dt).requires_grad_()
    W = torch.from_numpy(rng.standard_normal((3001, 64)) * 0.2).to("cuda", dt).requires_grad_()
    t = torch.from_numpy(rng.integers(0, 3001, 96)).cuda()
    options = Opt(batch_chunk_size=32, acc_policy="accurate")
    loss = gpuloss.linear_cross_entropy(x, W, t, reduction="none", options=options, backend=name)
    want = torch.nn.functional.cross_entropy(x.detach().double() @ W.detach().double().T, t, reduction="none")
    z32 = torch.nn.functional.cross_entropy(x.detach().float() @ W.detach().float().T, t, reduction="none")
    ulp = 2.0 ** (-8 if dtype == "bfloat16" else -11)  # the unit roundoff
    assert ((loss.detach().double() - z32.double()).abs() <= 2 * ulp * z32.double().abs() + 1e-5).all()
    go = torch.rand_like(want)
    loss.backward(go.to(loss.dtype))
    x64, W64 = x.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(x64 @ W64.T, t, reduction="none").backward(go)
    for got, ref in ((x.grad, x64.grad), (W.grad, W64.grad)):
        err = (got.double() - ref).abs().max() / ref.abs().max()
        assert err < 4 * ulp, err


@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_second_derivatives_follow_torch(rng, name, dtype):
    """create_graph=True on CUDA tensors: the gradient formed again with torch's
    operations (gpuloss._second_order) on the device, a gradient penalty's
    derivative as torch's (float32 logits for torch: the composite computes in
    float32), for cross_entropy with its options and mse_loss."""
    _need(name)
    tdt = getattr(torch, dtype)
    N, C = 16, 257
    x0 = torch.from_numpy(rng.standard_normal((N, C)) * 2).to("cuda", tdt)
    t = torch.from_numpy(rng.integers(0, C, N)).cuda()
    t[::5] = -100
    y = torch.from_numpy(rng.standard_normal((N, C))).to("cuda", tdt)
    F = torch.nn.functional
    calls = [(lambda a: gpuloss.cross_entropy(a, t, label_smoothing=0.1, backend=name),
              lambda a: F.cross_entropy(a.float(), t, label_smoothing=0.1)),
             (lambda a: gpuloss.mse_loss(a, y, backend=name), lambda a: F.mse_loss(a.float(), y.float()))]
    for ours, theirs in calls:
        res = []
        for fn in (ours, theirs):
            x = x0.clone().requires_grad_()
            (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
            (gg,) = torch.autograd.grad((g.float() ** 2).sum(), x)
            res.append((g.float(), gg.float()))
        assert res[0][0].dtype == torch.float32 and res[0][0].device.type == "cuda"
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, **({} if dtype == "float32" else dict(atol=2e-3, rtol=2e-2)))
