"""The split float32 accumulation of the fused linear CE's weight gradient
(kernels/triton/linear_acc.py, ``acc_dtype="float32_split"``): the bf16
gradient buffer holds the upper halves of float32 sums, an int16 buffer the
lower halves.  Runs in Triton's interpreter on the CPU or on a GPU."""
from __future__ import annotations

import pytest

from triton_env import DEV, RUNS_HERE, torch

import gpuloss  # noqa: E402
from gpuloss.backends.triton.linear_acc import split_acc_finish, split_acc_matmul  # noqa: E402

pytestmark = RUNS_HERE


def _bits_rne(x64: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 -> bfloat16, each rounded to nearest even (torch's casts)."""
    return x64.to(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(37, 21, (5, 19, 3)), (16, 48, (16,)), (70, 33, (1, 40))])
def test_sums_are_float32_sums_rounded_once(rng, shape):
    """(hi, lo) hold the float32 sum of the chunks' float32 products exactly:
    the bf16 result is that sum (times the scale) rounded once."""
    from triton_env import INTERPRET
    from gpuloss.backends.triton import config
    if INTERPRET:
        config.interpreter_patches()
    V, H, chunks = shape
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    hi = torch.empty(V, H, dtype=torch.bfloat16, device=DEV)
    lo = torch.empty(V, H, dtype=torch.int16, device=DEV)
    exact = torch.zeros(V, H, dtype=torch.float64)
    mag = torch.zeros(V, H, dtype=torch.float64)  # sum of |terms|: what bounds a float32 sum's error
    for i, n in enumerate(chunks):
        dz = torch.randn(n, V, generator=g).bfloat16()
        h = (torch.randn(n, H, generator=g) * 3).bfloat16()
        split_acc_matmul(dz.to(DEV), h.to(DEV), hi, lo, first=(i == 0))
        exact += dz.double().T @ h.double()
        mag += dz.double().abs().T @ h.double().abs()
    scale = torch.tensor(0.125, dtype=torch.float64, device=DEV)
    got = split_acc_finish(hi, lo, scale).cpu().double()
    want, mag = exact * 0.125, mag * 0.125
    # a float32 sum (in whatever order the tiles add) rounded once to bf16:
    # half a bf16 ulp of the sum, plus the float32 additions' error, at most
    # 2**-24 of the sum of |terms| per addition
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want).exponent - 8)  # bf16's spacing at want
    bound = 0.5 * ulp + mag * sum(chunks) * 2.0**-24 + 1e-30
    err = (got - want).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


def test_finish_rounds_to_nearest_even_and_keeps_specials():
    x = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-20, float("nan"), float("inf"),
                      -float("inf"), 3.4028234663852886e38, -0.0, 1e-40, -2.5], dtype=torch.float32)
    bits = x.view(torch.int32)
    hi = (bits >> 16).to(torch.int16).view(torch.bfloat16).clone().to(DEV)
    lo = (bits & 0xFFFF).to(torch.int16).to(DEV)
    got = split_acc_finish(hi, lo, None).cpu()
    want = x.to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16)[3:4].abs() > 0, torch.tensor([True]))  # a NaN
    assert got[3].isnan()
    keep = torch.arange(len(x)) != 3
    assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16)), (got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_float32_split(rng, reduction, monkeypatch):
    """Through the public function (bf16, several chunks, Triton backend):
    grad_weight within a few bf16 roundings of the float64 gradient, as the
    float32 accumulator's; loss and the other gradients identical to the
    float32 accumulator's."""
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    N, H, V = 11, 24, 40
    h = torch.randn(N, H, generator=g).bfloat16().to(DEV)
    W = (torch.randn(V, H, generator=g) * 0.3).bfloat16().to(DEV)
    b = (torch.randn(V, generator=g) * 0.1).bfloat16().to(DEV)
    t = torch.randint(0, V, (N,), generator=g).to(DEV)
    t[3] = -100
    up = torch.rand(N, generator=g).to(DEV) if reduction == "none" else None
    from gpuloss.backends.triton import linear_acc
    calls = []
    real = linear_acc.split_acc_matmul
    monkeypatch.setattr(linear_acc, "split_acc_matmul", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    outs = {}
    for acc in ("float32", "float32_split"):
        hh, WW, bb = (a.clone().requires_grad_() for a in (h, W, b))
        loss = gpuloss.linear_cross_entropy(hh, WW, t, linear_bias=bb, reduction=reduction, chunk_size=4,
                                            acc_dtype=acc, backend="triton")
        loss.backward(up.to(loss.dtype) if up is not None else None)
        outs[acc] = (loss.detach(), hh.grad, WW.grad, bb.grad)
    assert len(calls) == 3  # one launch per chunk of 4 tokens, the split path only
    h64, W64, b64 = (a.double().requires_grad_() for a in (h, W, b))
    ref = torch.nn.functional.cross_entropy(h64 @ W64.T + b64, t, reduction=reduction)
    ref.backward(up.double() if up is not None else None)
    split, f32 = outs["float32_split"], outs["float32"]
    assert split[2].dtype == torch.bfloat16
    for i in (0, 1, 3):
        torch.testing.assert_close(split[i], f32[i], rtol=0, atol=0)
    gw, gw32, want = split[2].double(), f32[2].double(), W64.grad
    scale = float(want.abs().max())
    err_split = float((gw - want).abs().max())
    err_f32 = float((gw32 - want).abs().max())
    # dL/dz (and, for "none", h times the upstream) is rounded to bf16 before
    # the matmul in both accumulations: a few bf16 roundings from the float64
    # gradient either way, so the two are compared with it, not with each
    # other (which one lands closer is chance: seeds 3874652996, 3912950916);
    # the split sums themselves are exact float32 sums (the test above)
    # (over 40 seeds the largest was 0.31 of this bound; a wrong sum is O(scale))
    assert err_split <= 2.0**-5 * scale, (err_split, scale)
    assert err_f32 <= 2.0**-5 * scale, (err_f32, scale)


def test_other_backends_take_it_as_float32(rng):
    """Where the Triton kernels do not run (the NumPy backend, fp32 weights)
    "float32_split" is the float32 accumulation: identical results."""
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    h, W = torch.randn(9, 8, generator=g), torch.randn(13, 8, generator=g)
    t = torch.randint(0, 13, (9,), generator=g)
    for backend, dt in (("numpy", torch.bfloat16), ("numpy", torch.float32), ("triton", torch.float32)):
        if backend == "triton" and DEV != "cpu":
            h, W, t = h.to(DEV), W.to(DEV), t.to(DEV)
        res = [gpuloss.linear_cross_entropy(h.to(dt), W.to(dt), t, chunk_size=2, acc_dtype=a, return_grad=True,
                                            backend=backend) for a in ("float32", "float32_split")]
        for x, y in zip(res[0], res[1]):
            assert (x is None and y is None) or torch.equal(x, y)
    with pytest.raises(ValueError, match="acc_dtype"):
        gpuloss.linear_cross_entropy(h, W, t, acc_dtype="float16_split")
