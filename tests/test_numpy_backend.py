"""Tests specific to the NumPy backend: its tiling, long-row and thread-pool
paths, its scratch-memory bound, array conversion, and hypothesis properties.

The generic contract (every primitive and option against the reference) is in
``test_backend_primitives.py``; here the tiling constants are shrunk so that
the multi-block and multi-tile paths run on small shapes.
"""
from __future__ import annotations

import importlib.util
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from gpuloss import reference as ref
from gpuloss.backends.numpy import NumpyBackend
from gpuloss.backends.numpy import tiling as nb

from conftest import tol
from prims import prim

B = NumpyBackend()


def _ce(x, t, **kw):
    opts = dict(weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                reduction="mean", want_grad=True)
    opts.update(kw)
    return prim(B, "cross_entropy", x, t, **opts)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 float32 / 32 float64 elements: rows of C > 64 take the
    long-row (two-pass, online max/sum) path, and every call has many tiles."""
    monkeypatch.setattr(nb, "BLOCK_BYTES", 256)
    return 256


@pytest.fixture
def threaded(monkeypatch):
    """Use the pool for every call, with 3 threads on any machine."""
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "3")
    monkeypatch.setattr(nb, "PARALLEL_MIN_ELEMS", 0)


# --------------------------------------------------------------------------
# the long-row path and the multi-tile path against the reference
# --------------------------------------------------------------------------

CE_CASES = {
    "plain": dict(),
    "weight+smoothing": dict(weight=True, label_smoothing=0.2),
    "zloss+softcap": dict(z_loss=1e-2, softcap=4.0),
    "all": dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
}


@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("C", [300, 40])  # long rows (5 blocks) / short rows (several rows per tile)
def test_cross_entropy_tiled(small_tiles, threaded, rng, case, dtype, prob, C):
    R = 9
    kw = dict(CE_CASES[case])
    x = (rng.standard_normal((R, C)) * 3).astype(dtype)
    x[2] += 1e3  # a large common offset: partials must be merged relative to the row max
    w = rng.uniform(0.3, 2, C).astype(np.float32) if kw.pop("weight", False) else None
    if prob:
        t = rng.dirichlet(np.ones(C), R).astype(dtype)
    else:
        t = rng.integers(0, C, R)
        t[[1, 5]] = -100
    for reduction in ("none", "mean", "sum"):
        res = _ce(x, t, weight=w, reduction=reduction, want_grad_target=prob, **kw)
        rkw = dict(kw, weight=w, reduction=reduction)
        xr, tr = x.astype(np.float64), (t.astype(np.float64) if prob else t)
        k = tol("float32" if dtype == "float16" else dtype)
        np.testing.assert_allclose(res.loss, ref.cross_entropy(xr, tr, **rkw), **k)
        gi, gt = ref.cross_entropy_grad(xr, tr, **rkw)
        np.testing.assert_allclose(res.grad.astype(np.float64), gi, **tol(dtype))
        assert res.grad.dtype == x.dtype
        np.testing.assert_allclose(res.lse, ref.logsumexp(
            kw["softcap"] * np.tanh(xr / kw["softcap"]) if "softcap" in kw else xr), **tol("float32"))
        if prob:
            np.testing.assert_allclose(res.grad_target.astype(np.float64), gt, **tol(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_long_rows_with_whole_blocks_of_minus_inf(small_tiles, rng, dtype):
    """Masked classes (-inf logits) filling whole column blocks of a long row:
    each block's partials are taken relative to its max, -inf there, where
    z - max is nan.  Label smoothing and probability targets give torch's inf
    (no mass can be put on a masked class), the distillation KL its finite
    value where the teacher masks the classes too, and inf where only the
    student does."""
    R, C = 4, 300  # 5 blocks of 64 float32 (10 of 32 float64) elements per row
    x = (rng.standard_normal((R, C)) * 3).astype(dtype)
    x[:, :150] = -np.inf
    t = rng.integers(150, C, R)
    p = rng.dirichlet(np.ones(C), R).astype(dtype)
    xr = x.astype(np.float64)
    for kw, target in ((dict(label_smoothing=0.1), t), (dict(), p)):
        res = _ce(x, target, reduction="none", **kw)
        want = ref.cross_entropy(xr, target.astype(np.float64) if target is p else target, reduction="none", **kw)
        assert np.isinf(want).all()
        np.testing.assert_array_equal(res.loss, want)
    teacher = (rng.standard_normal((R, C)) * 2).astype(dtype)
    masked = teacher.copy()
    masked[:, :150] = -np.inf
    q = np.exp(masked - masked.max(1, keepdims=True))
    q = (q / q.sum(1, keepdims=True)).astype(dtype)
    for student, tg, til in ((rng.standard_normal((R, C)).astype(dtype), masked, True),  # the teacher masks
                             (x, masked, True), (x, q, False),  # both mask the same classes
                             (x, teacher, True)):  # only the student masks: inf
        res = prim(B, "kl_div_logits", student, tg, temperature=1.0, target_is_logits=til, reduction="none",
                   want_grad=True)
        sr, tr = student.astype(np.float64), tg.astype(np.float64)
        want = ref.kl_div_logits(sr, tr, 1.0, "none", til)
        assert not np.isnan(res.loss).any()
        np.testing.assert_allclose(res.loss, want, **tol(dtype))
        if np.isfinite(want).all():
            np.testing.assert_allclose(res.grad, ref.kl_div_logits_grad(sr, tr, 1.0, "none", til)[0], **tol(dtype))


@pytest.mark.parametrize("C", [300, 40])
def test_cross_entropy_tiled_inplace_and_bad_targets(small_tiles, threaded, rng, C):
    R = 6
    x = (rng.standard_normal((R, C)) * 3).astype(np.float32)
    t = rng.integers(0, C, R)
    t[1], t[4] = C + 3, -100
    x_ref = x.astype(np.float64)
    res = _ce(x, t, reduction="none", label_smoothing=0.1, grad_inplace=True)
    assert res.grad is x
    assert np.isnan(res.loss[1]) and np.isnan(x[1]).all()
    tg = t.copy()
    tg[1] = -100
    good = [0, 2, 3, 4, 5]
    np.testing.assert_allclose(res.loss[good], ref.cross_entropy(x_ref, tg, reduction="none",
                                                                 label_smoothing=0.1)[good], **tol("float32"))
    np.testing.assert_allclose(x[good], ref.cross_entropy_grad(x_ref, tg, reduction="none",
                                                               label_smoothing=0.1)[0][good], **tol("float32"))


@pytest.mark.parametrize("C", [300, 40])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_and_kl_tiled(small_tiles, threaded, rng, C, dtype):
    R = 5
    x = (rng.standard_normal((R, C)) * 3).astype(dtype)
    x[1, : C // 2] = -np.inf  # whole blocks of -inf in a long row
    x[3] += 500.0
    xr = x.astype(np.float64)
    for log in (False, True):
        y = prim(B, "softmax_forward", x, log=log)
        np.testing.assert_allclose(y, ref.log_softmax(xr) if log else ref.softmax(xr), **tol(dtype))
        dy = rng.standard_normal((R, C)).astype(dtype)
        yr = y.astype(np.float64)
        dx = prim(B, "softmax_backward", y, dy, log=log)
        exp_dx = (ref.log_softmax_backward if log else ref.softmax_backward)(yr, dy.astype(np.float64))
        np.testing.assert_allclose(dx, exp_dx, rtol=tol(dtype)["rtol"], atol=tol(dtype)["rtol"])
    xk = (rng.standard_normal((R, C)) * 3).astype(dtype)
    xk[2] -= 300.0
    for til in (True, False):
        tg = (rng.standard_normal((R, C)) * 2 + 100).astype(dtype) if til else \
            rng.dirichlet(np.ones(C), R).astype(dtype)
        tgr = tg.astype(np.float64)
        for red in ("none", "sum", "mean", "batchmean"):
            res = prim(B, "kl_div_logits", xk, tg, temperature=1.3, target_is_logits=til, reduction=red, want_grad=True)
            np.testing.assert_allclose(res.loss, ref.kl_div_logits(xk.astype(np.float64), tgr, 1.3, red, til),
                                       rtol=tol(dtype)["rtol"], atol=10 * tol(dtype)["rtol"])
            np.testing.assert_allclose(res.grad, ref.kl_div_logits_grad(xk.astype(np.float64), tgr, 1.3, red,
                                                                        til)[0], **tol(dtype))
            np.testing.assert_allclose(res.lse, ref.logsumexp(xk.astype(np.float64) / 1.3), **tol("float32"))


def test_elementwise_tiled(small_tiles, threaded, rng):
    R, C = 7, 300
    x = rng.standard_normal((R, C)).astype(np.float32)
    y = rng.uniform(0.01, 0.99, (R, C)).astype(np.float32)
    w2 = rng.uniform(0.5, 2, (R, C)).astype(np.float32)
    pw = rng.uniform(0.5, 2, C).astype(np.float32)
    xr, yr = x.astype(np.float64), y.astype(np.float64)
    for red in ("none", "mean", "sum"):
        r = prim(B, "bce_with_logits", x, y, weight=w2, pos_weight=pw, reduction=red, want_grad=True, want_grad_target=True)
        np.testing.assert_allclose(r.loss, ref.binary_cross_entropy_with_logits(xr, yr, w2, pw, red), **tol("float32"))
        for a, b in zip((r.grad, r.grad_target), ref.binary_cross_entropy_with_logits_grad(xr, yr, w2, pw, red)):
            np.testing.assert_allclose(a, b, **tol("float32"))
        r = prim(B, "mse", x, y, reduction=red, want_grad=True, want_grad_target=True)
        np.testing.assert_allclose(r.loss, ref.mse_loss(xr, yr, red), **tol("float32"))
        np.testing.assert_allclose(r.grad, ref.mse_loss_grad(xr, yr, red)[0], **tol("float32"))


# --------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------

def test_thread_pool_used_and_deterministic(monkeypatch, rng):
    """A shape with several tiles runs on the pool, and the result does not
    depend on the thread count (tiles are independent; partial sums are added
    in tile order)."""
    R, C = 64, 5000  # 320k elements: above _PARALLEL_MIN_ELEMS, 3 tiles of 26 rows
    x = rng.standard_normal((R, C)).astype(np.float32)
    t = rng.integers(0, C, R)
    t[::7] = -100
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "1")
    one = _ce(x, t, label_smoothing=0.1, z_loss=1e-3)
    seen = set()
    orig = nb.scratch

    def spy(name, shape, dtype):
        seen.add(threading.current_thread().name)
        return orig(name, shape, dtype)

    monkeypatch.setattr(nb, "scratch", spy)
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "2")
    two = _ce(x, t, label_smoothing=0.1, z_loss=1e-3)
    assert any(n.startswith("gpuloss-numpy") for n in seen), seen
    np.testing.assert_array_equal(one.grad, two.grad)
    np.testing.assert_array_equal(one.loss, two.loss)
    np.testing.assert_array_equal(one.lse, two.lse)
    xr = x.astype(np.float64)
    np.testing.assert_allclose(two.loss, ref.cross_entropy(xr, t, label_smoothing=0.1, z_loss=1e-3), **tol("float32"))
    np.testing.assert_allclose(two.grad, ref.cross_entropy_grad(xr, t, label_smoothing=0.1, z_loss=1e-3)[0],
                               **tol("float32"))


def test_thread_count_changed_by_another_thread_mid_call(monkeypatch, rng):
    """Another thread changing GPULOSS_NUM_THREADS between this call's taking the pool and its
    submitting work replaces the shared pool; the call still runs on the pool it took (it was
    shut down under it: "cannot schedule new futures after shutdown")."""
    x = rng.standard_normal((64, 5000)).astype(np.float32)
    t = rng.integers(0, 5000, 64)
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "1")
    want = _ce(x, t)
    orig = nb._get_pool

    def racing(workers):
        pool = orig(workers)
        orig(workers + 1)  # what the other thread's call does meanwhile
        return pool

    monkeypatch.setattr(nb, "_get_pool", racing)
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "2")
    got = _ce(x, t)
    np.testing.assert_array_equal(got.loss, want.loss)
    np.testing.assert_array_equal(got.grad, want.grad)


def _ce_in_child(x, t, q):
    q.put(float(_ce(x, t).loss))


def test_forked_child_runs_on_its_own_pool(monkeypatch, rng):
    """A process forked after a threaded call (a DataLoader worker, multiprocessing "fork")
    inherits the pool object without its threads: the child's call must not wait on them."""
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = rng.standard_normal((64, 5000)).astype(np.float32)
    t = rng.integers(0, 5000, 64)
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "2")
    want = float(_ce(x, t).loss)  # the pool exists now
    assert nb._pool is not None
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_ce_in_child, args=(x, t, q))
    p.start()
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("the forked child's call hung")
    assert p.exitcode == 0
    assert q.get(timeout=10) == want


def test_num_threads_env(monkeypatch):
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "5")
    assert nb.num_threads() == 5
    for bad in ("abc", "0", "-2"):  # 0 and negatives were taken as 1
        monkeypatch.setenv("GPULOSS_NUM_THREADS", bad)
        with pytest.raises(ValueError, match="GPULOSS_NUM_THREADS must be a positive integer"):
            nb.num_threads()
    monkeypatch.delenv("GPULOSS_NUM_THREADS")
    assert nb.num_threads() >= 1


def test_worker_exception_propagates(monkeypatch, threaded):
    def boom(i):
        if i == 3:
            raise RuntimeError("tile 3")

    with pytest.raises(RuntimeError, match="tile 3"):
        nb.parallel_for(8, boom, 1 << 30)


# --------------------------------------------------------------------------
# scratch memory
# --------------------------------------------------------------------------

MiB = 1 << 20


def _nbytes(out) -> int:
    arrays = out if isinstance(out, tuple) else (out,)
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def _extra_peak(fn, monkeypatch):
    """Peak traced memory during ``fn()`` beyond what existed before it and
    the arrays it returned.

    The backend keeps per-thread scratch buffers across calls; fresh ones (a
    new thread-local store and a new pool) make every buffer this call uses
    be allocated, and counted, while tracing."""
    monkeypatch.setattr(nb, "_tls", threading.local())
    monkeypatch.setattr(nb, "_pool", None)
    monkeypatch.setattr(nb, "_pool_size", 0)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before - _nbytes(out), out


@pytest.mark.parametrize("shape", [(2048, 8192), (2, 10_000_000)], ids=["short-rows", "V=10M"])
def test_scratch_memory_bounded(rng, monkeypatch, shape):
    """Loss + grad (and softmax) of a 64-80 MiB input: naive code makes
    several input-sized temporaries (x - max, exp, p - onehot); the backend's
    scratch stays under 64 MiB beyond inputs and outputs."""
    R, C = shape
    x = rng.standard_normal((R, C), dtype=np.float32)
    t = rng.integers(0, C, R)
    assert x.nbytes >= 64 * MiB
    extra, res = _extra_peak(lambda: _ce(x, t, label_smoothing=0.1, softcap=30.0), monkeypatch)
    assert extra < 64 * MiB, f"{extra / MiB:.1f} MiB of scratch"
    assert np.isfinite(res.grad[:, :1000]).all() and np.isfinite(res.loss)
    # spot-check values on two rows against the reference
    rows = [0, R - 1]
    xr = x[rows].astype(np.float64)
    np.testing.assert_allclose(res.lse[rows], ref.logsumexp(30.0 * np.tanh(xr / 30.0)), **tol("float32"))
    extra, y = _extra_peak(lambda: prim(B, "softmax_forward", x, log=True), monkeypatch)
    assert extra < 64 * MiB, f"{extra / MiB:.1f} MiB of scratch"
    np.testing.assert_allclose(y[rows, :1000], ref.log_softmax(xr)[:, :1000], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# conversion and availability
# --------------------------------------------------------------------------

def test_probe_and_accepts():
    ok, why = B.probe()
    assert ok and why == f"numpy {np.__version__}"
    assert B.accepts("numpy", "cpu") and B.accepts("torch", "cpu")
    assert not B.accepts("torch", "cuda:0") and not B.accepts("cupy", "cuda:0")


def test_torch_conversion_zero_copy():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 6)
    a = B.to_native(t, "torch")
    assert isinstance(a, np.ndarray) and np.shares_memory(a, t.numpy())
    back = B.from_native(a, "torch")
    assert isinstance(back, torch.Tensor) and back.data_ptr() == t.data_ptr()
    g = torch.randn(3, 5, requires_grad=True)
    np.testing.assert_array_equal(B.to_native(g, "torch"), g.detach().numpy())
    b = torch.randn(3, 5).to(torch.bfloat16)
    ab = B.to_native(b, "torch")  # ml_dtypes' bfloat16 view where installed, else a float32 copy
    assert ab.dtype == (np.float32 if importlib.util.find_spec("ml_dtypes") is None else "bfloat16")
    np.testing.assert_array_equal(ab.astype(np.float32), b.float().numpy())
    x = np.ones(3)
    assert B.to_native(x, "numpy") is x


# --------------------------------------------------------------------------
# properties (hypothesis), float64 so that the bounds are tight
# --------------------------------------------------------------------------

_logits = hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 40)),
                     elements=st.floats(-30, 30, allow_nan=False))


@settings(max_examples=40, deadline=None)
@given(x=_logits, shift=st.floats(-1e3, 1e3), seed=st.integers(0, 2**32 - 1))
def test_shift_invariance(x, shift, seed):
    """softmax and cross-entropy do not change when a constant is added to a row."""
    rng = np.random.default_rng(seed)
    R, C = x.shape
    t = rng.integers(0, C, R)
    a = _ce(x, t, reduction="none", label_smoothing=0.1)
    b = _ce(x + shift, t, reduction="none", label_smoothing=0.1)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(prim(B, "softmax_forward", x, log=False), prim(B, "softmax_forward", x + shift, log=False),
                               rtol=1e-9, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(x=_logits)
def test_rows_sum_to_one(x):
    y = prim(B, "softmax_forward", x, log=False)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert (y >= 0).all()
    np.testing.assert_allclose(np.exp(prim(B, "softmax_forward", x, log=True)), y, rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(x=_logits, seed=st.integers(0, 2**32 - 1))
def test_grad_is_softmax_minus_onehot(x, seed):
    """No smoothing, mean over N rows: dL/dx = (softmax(x) - onehot(t)) / N."""
    rng = np.random.default_rng(seed)
    R, C = x.shape
    t = rng.integers(0, C, R)
    res = _ce(x, t)
    onehot = np.zeros_like(x)
    onehot[np.arange(R), t] = 1.0
    np.testing.assert_allclose(res.grad, (prim(B, "softmax_forward", x, log=False) - onehot) / R, rtol=1e-10, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(x=_logits, seed=st.integers(0, 2**32 - 1), T=st.floats(0.25, 8.0))
def test_kl_nonnegative(x, seed, T):
    rng = np.random.default_rng(seed)
    tg = x + rng.standard_normal(x.shape) * rng.uniform(0, 5)
    res = prim(B, "kl_div_logits", x, tg, temperature=T, target_is_logits=True, reduction="none", want_grad=False)
    assert (res.loss >= -1e-12).all()
    probs = ref.softmax(tg / T)
    res2 = prim(B, "kl_div_logits", x, probs, temperature=T, target_is_logits=False, reduction="none", want_grad=False)
    np.testing.assert_allclose(res2.loss, res.loss, rtol=1e-9, atol=1e-12)


def test_bfloat16_numpy_arrays(rng):
    """NumPy bfloat16 arrays (ml_dtypes) are NumPy arrays: probability
    targets were taken for class indices (bfloat16 is not np.floating) and
    failed inside the kernel; dtype='bfloat16' was refused as not floating."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import gpuloss as gpuloss_pkg
    bf = ml_dtypes.bfloat16
    x = rng.standard_normal((5, 7)).astype(np.float32)
    p = rng.dirichlet(np.ones(7), 5).astype(np.float32)
    xb, pb = x.astype(bf), p.astype(bf)
    xr, pr = xb.astype(np.float64), pb.astype(np.float64)
    out = gpuloss_pkg.cross_entropy(xb, pb, label_smoothing=0.1, return_grad=True)
    assert out.loss.dtype == bf and out.grad.dtype == bf
    np.testing.assert_allclose(out.loss.astype(np.float64), ref.cross_entropy(xr, pr, label_smoothing=0.1), rtol=1e-2)
    np.testing.assert_allclose(out.grad.astype(np.float64), ref.cross_entropy_grad(xr, pr, label_smoothing=0.1)[0],
                               rtol=2e-2, atol=2e-3)
    h, W = x[:, :4].astype(bf), rng.standard_normal((7, 4)).astype(bf)
    lce = gpuloss_pkg.linear_cross_entropy(h, W, pb)
    want = ref.cross_entropy(h.astype(np.float64) @ W.astype(np.float64).T, pr)
    np.testing.assert_allclose(np.float64(lce.astype(np.float64)), want, rtol=2e-2)
    y = gpuloss_pkg.softmax(x, 1, dtype="bfloat16")
    assert y.dtype == bf
    np.testing.assert_allclose(y.astype(np.float64), ref.softmax(xr), rtol=1e-2, atol=1e-3)


def test_results_do_not_depend_on_the_thread_count(monkeypatch, rng):
    """The thread count shrank the tile (its share of the scratch budget), and
    so cut a row into other column blocks, or sent it down the long-row path:
    other partial sums, other bits, on a machine with more cores.  Now only
    the grouping of whole rows depends on it."""
    monkeypatch.setattr(nb, "BLOCK_BYTES", 256)  # long rows beyond 64 float32 elements
    monkeypatch.setattr(nb, "SCRATCH_BUDGET", 10 * 256 * 3)  # 2+ threads shrink a tile's share
    monkeypatch.setattr(nb, "PARALLEL_MIN_ELEMS", 0)
    x = (rng.standard_normal((5, 100)) * 3).astype(np.float32)
    u = (rng.standard_normal((5, 100)) * 3).astype(np.float32)
    t = rng.integers(0, 100, 5)
    calls = {
        "cross_entropy": lambda: _ce(x, t, label_smoothing=0.1, reduction="none"),
        "kl_div_logits": lambda: prim(B, "kl_div_logits", x, u, temperature=2.0, target_is_logits=True,
                                      reduction="none", want_grad=True),
        "softmax": lambda: prim(B, "softmax_forward", x, log=True),
    }
    for name, call in calls.items():
        got = {}
        for threads in ("1", "3", "8"):
            monkeypatch.setenv("GPULOSS_NUM_THREADS", threads)
            res = call()
            got[threads] = [np.asarray(a).tobytes() for a in (res if isinstance(res, tuple) else (res,))
                            if a is not None]
        assert got["1"] == got["3"] == got["8"], name
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "8")
    assert nb.Tiles(5, 60, 4).whole and not nb.Tiles(5, 100, 4).whole and nb.Tiles(5, 100, 4).workers == 2


def test_thread_count_is_not_asked_of_the_os_per_call(monkeypatch):
    """os.cpu_count() was called twice per loss call (~2.5 us each, a tenth of
    a tiny call's NumPy work); the count is read once."""
    import os

    def asked():
        raise AssertionError("os.cpu_count() called per call")

    monkeypatch.delenv("GPULOSS_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", asked)
    assert nb.num_threads() >= 1
    _ce(np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32), np.arange(4))


_BYTE_ORDER_CALLS = {
    "softmax": lambda G, x, t, p, y, w: G.softmax(x, dim=1),
    "log_softmax": lambda G, x, t, p, y, w: G.log_softmax(x, dim=0),
    "softmax_backward": lambda G, x, t, p, y, w: G.softmax_backward(p, G.softmax(x, dim=1), dim=1),
    "log_softmax_backward": lambda G, x, t, p, y, w: G.log_softmax_backward(p, G.log_softmax(x, dim=1), dim=1),
    "cross_entropy": lambda G, x, t, p, y, w: G.cross_entropy(x, t, w, label_smoothing=0.1, return_grad=True),
    "cross_entropy probs": lambda G, x, t, p, y, w: G.cross_entropy(x, p, w, reduction="none", return_grad="all"),
    "nll_loss": lambda G, x, t, p, y, w: G.nll_loss(x, t, w, return_grad=True),
    "kl_div": lambda G, x, t, p, y, w: G.kl_div(x, p, reduction="batchmean", return_grad="all"),
    "kl_div_with_logits": lambda G, x, t, p, y, w: G.kl_div_with_logits(x, p, return_grad=True),
    "bce_with_logits": lambda G, x, t, p, y, w: G.binary_cross_entropy_with_logits(x, y, p, pos_weight=w,
                                                                                   return_grad="all"),
    "bce": lambda G, x, t, p, y, w: G.binary_cross_entropy(p, y, p, return_grad="all"),
    "mse_loss": lambda G, x, t, p, y, w: G.mse_loss(x, p, reduction="none", return_grad="all"),
    "linear_cross_entropy": lambda G, x, t, p, y, w: G.linear_cross_entropy(x[:, :5], p.T[:, :5], t, linear_bias=w,
                                                                            return_grad=True),
}


@pytest.mark.parametrize("name", sorted(_BYTE_ORDER_CALLS))
@pytest.mark.parametrize("dtype", ["f2", "f4", "f8"])
def test_arrays_of_the_other_byte_order(rng, name, dtype):
    """NumPy arrays of non-native byte order (``'>f4'`` on a little-endian
    machine: FITS files, arrays read from big-endian formats) hold the same
    values, and NumPy's functions take them as such.  They were refused as
    "not floating-point"; now every function gives the native arrays' results,
    bit for bit, in native dtypes, as NumPy's ufuncs do."""
    import gpuloss as G
    other = ">" if np.little_endian else "<"
    x = rng.standard_normal((6, 9))
    t = rng.integers(0, 9, 6)
    p = rng.random((6, 9))
    p /= p.sum(1, keepdims=True)
    y = (rng.random((6, 9)) > 0.5).astype(np.float64)
    w = rng.random(9) + 0.5
    native = [a.astype(dtype) if a.dtype.kind == "f" else a for a in (x, t, p, y, w)]
    swapped = [a.astype(a.dtype.newbyteorder(other)) if a.dtype.kind == "f" else a.astype(other + "i4")
               for a in native]
    assert not any(a.dtype.isnative for a in swapped)
    want = _BYTE_ORDER_CALLS[name](G, *native)
    got = _BYTE_ORDER_CALLS[name](G, *swapped)
    want, got = (tuple(r) if isinstance(r, tuple) else (r,) for r in (want, got))
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert b.dtype == a.dtype and b.dtype.isnative, (a.dtype, b.dtype)
            np.testing.assert_array_equal(b, a)


def test_inplace_backward_into_an_array_of_the_other_byte_order(rng):
    """``inplace_backward`` writes the gradient into the caller's own array,
    whatever its byte order."""
    import gpuloss as G
    other = ">" if np.little_endian else "<"
    x = rng.standard_normal((5, 7)).astype(np.float32)
    t = rng.integers(0, 7, 5)
    want = G.cross_entropy(x, t, return_grad=True)
    xs = x.astype(other + "f4")
    got = G.cross_entropy(xs, t, inplace_backward=True, return_grad=True)
    assert got.grad is xs and got.loss.dtype == np.float32
    np.testing.assert_array_equal(xs, want.grad)
    assert got.loss == want.loss


def test_bfloat16_torch_tensors_are_shared_not_copied(monkeypatch, rng):
    """A bfloat16 CPU tensor reaches the NumPy backend as ml_dtypes' bfloat16 view of
    its memory (tiles upcast one at a time, a gradient written straight into it),
    not as a whole float32 copy (2x the tensor's memory, and the CPU bf16 cross-entropy
    1.7x slower than torch's).  The results are the float32-copy path's, bit for bit,
    and that path still serves where ml_dtypes is missing."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    import gpuloss
    import gpuloss.backends.numpy as gnb
    x = torch.from_numpy(rng.standard_normal((9, 300)) * 4).bfloat16()[:, 5:290]  # a strided view
    t = torch.from_numpy(rng.integers(0, 285, 9))
    view = B.to_native(x, "torch")
    assert view.dtype.name == "bfloat16" and view.ctypes.data == x.data_ptr()
    assert B.from_native(view, "torch").view(torch.int16).equal(x.view(torch.int16))

    def results():
        out = []
        xg = x.clone().requires_grad_()
        loss = gpuloss.cross_entropy(xg, t, label_smoothing=0.1, backend="numpy")
        loss.backward()
        xi = x.clone()
        r = gpuloss.cross_entropy(xi, t, reduction="sum", inplace_backward=True, return_grad=True, backend="numpy")
        p = torch.softmax(x.float() / 3, 1).bfloat16()
        out += [loss, xg.grad, r.loss, xi, gpuloss.softmax(x, 1, backend="numpy"),
                gpuloss.log_softmax(x, 1, backend="numpy"),
                gpuloss.kl_div_with_logits(x, x.flip(1), temperature=2.0, backend="numpy"),
                gpuloss.binary_cross_entropy_with_logits(x, p, reduction="none", backend="numpy"),
                gpuloss.mse_loss(x, p, reduction="none", backend="numpy")]
        return out

    shared = results()
    monkeypatch.setattr(gnb, "_numpy_bfloat16", lambda: None)
    copied = results()
    for i, (a, b) in enumerate(zip(shared, copied)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert a.view(torch.int16).equal(b.view(torch.int16)) if a.dtype == torch.bfloat16 else a.equal(b), i
