"""Host-side tests of the cupy backend (run on the CPU) and GPU-only checks (skipped here).

The generic correctness suite (tests/test_backend_primitives.py) runs on this backend through
the ``backend`` fixture whenever a GPU is present; the GPU tests below add what is specific to
this backend: long rows, strided rows, N x V > 2^31, extreme logits, every variant, and torch
tensors through DLPack without copies.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from gpuloss import reference as ref
from gpuloss.backends import cupy as cb
from gpuloss.backends.cupy import build as cb_build, common as cb_common, plan as cb_plan, staged as cb_staged

from conftest import tol
from prims import on_threads_and_streams, prim


def _gpu():
    ok, why = cb.CupyBackend().probe()
    if not ok:
        pytest.skip(f"cupy backend unavailable: {why}")
    return cb.CupyBackend()


# ---------------------------------------------------------------------------------------------
# host code, no GPU
# ---------------------------------------------------------------------------------------------

def test_probe_reason_without_gpu():
    ok, why = cb.CupyBackend().probe()
    if ok:
        pytest.skip("a GPU is present")
    assert isinstance(why, str) and why  # a reason, never an exception
    assert "cupy" in why or "CUDA" in why


def test_accepts():
    b = cb.CupyBackend()
    assert b.accepts("cupy", "cuda:0") and b.accepts("torch", "cuda:1")
    assert not b.accepts("torch", "cpu") and not b.accepts("numpy", "cpu")


def test_variants_and_env(monkeypatch):
    assert cb.CupyBackend.variants() == ("auto", "looped", "onchip", "staged")
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", "looped")
    assert cb_plan.selected_variant() == "looped"
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", "fastest")
    with pytest.raises(ValueError):
        cb_plan.selected_variant()


def test_vec_width_and_dtypes():
    assert [cb_build.vec_width(d) for d in ("float32", "float64", "float16", "bfloat16")] == [4, 2, 8, 8]
    class A:  # minimal stand-in for an array's dtype
        def __init__(self, d): self.dtype = d
    assert cb_common.storage_dtype(A("int16")) == "bfloat16"
    assert cb_common.storage_dtype(A("float16")) == "float16"
    with pytest.raises(TypeError):
        cb_common.storage_dtype(A("int32"))
    assert cb_common.index_dtype(A("int64")) == "int64"
    with pytest.raises(TypeError):
        cb_common.index_dtype(A("int8"))


H100_SMEM = 227 * 1024
A100_SMEM = 163 * 1024


def test_plan_rows_explicit_onchip_fills_the_budget():
    """variant="onchip" takes slices up to the whole shared-memory budget, over clusters of at
    most 2 (larger ones are not built: they lost on the H200)."""
    assert cb_build.CLUSTER_SIZES == (1, 2)
    p = cb_plan.plan_rows(16384, 128256, 2, 8, 90, H100_SMEM, "onchip")
    assert (p.variant, p.cluster, p.smem_bytes) == ("onchip", 2, 64128 * 2)           # 2 x 125 KB
    assert cb_plan.plan_rows(4096, 262144, 2, 8, 90, H100_SMEM, "onchip").variant == "looped"  # 2 x 256 KB
    assert cb_plan.plan_rows(64, 32000, 4, 4, 80, A100_SMEM, "onchip").cluster == 1       # 125 KB fits the A100


@pytest.mark.parametrize("R,C,itemsize,cc,smem,exp_variant,exp_k", [
    (8192, 32000, 4, 90, H100_SMEM, "onchip", 2),      # 125 KB row -> 2 x 62.5 KB
    (8192, 32000, 2, 90, H100_SMEM, "onchip", 1),      # 62.5 KB row fits one block
    (16384, 128256, 2, 90, H100_SMEM, "looped", 1),    # 250 KB row: a cluster of 4 measured slower
    (4096, 262144, 2, 90, H100_SMEM, "looped", 1),     # 512 KB: a cluster of 8 measured slower
    (4096, 262144, 2, 80, A100_SMEM, "looped", 1),     # no clusters on sm_80 and too big
    (64, 32000, 4, 80, A100_SMEM, "looped", 1),        # 125 KB on one block: only "onchip" takes it
    (4, 4_000_000, 4, 90, H100_SMEM, "looped", 1),     # too long even for 8 blocks
])
def test_plan_rows_decisions(R, C, itemsize, cc, smem, exp_variant, exp_k):
    vec = 16 // itemsize
    p = cb_plan.plan_rows(R, C, itemsize, vec, cc, smem, "auto")
    assert (p.variant, p.cluster) == (exp_variant, exp_k)
    assert p.grid == R * p.cluster and p.grid % p.cluster == 0
    assert cb_plan.MIN_THREADS <= p.threads <= cb_plan.MAX_THREADS and p.threads & (p.threads - 1) == 0
    if p.variant == "onchip":
        chunk = p.smem_bytes // itemsize
        assert chunk % vec == 0 and chunk * p.cluster >= C
        assert p.smem_bytes <= smem - cb_plan.STATIC_SMEM_RESERVE
    else:
        assert p.smem_bytes == 0
    assert cb_plan.plan_rows(R, C, itemsize, vec, cc, smem, "looped").variant == "looped"


def test_plan_rows_edges():
    assert cb_plan.plan_rows(0, 10, 4, 4, 90, H100_SMEM).grid == 0
    p = cb_plan.plan_rows(3, 1, 4, 1, 90, H100_SMEM)
    assert p.grid == 3 and p.threads == cb_plan.MIN_THREADS
    big = cb_plan.plan_rows(2 ** 31, 8, 4, 4, 90, H100_SMEM)
    assert big.grid <= cb_plan.MAX_GRID_X and big.grid % big.cluster == 0
    with pytest.raises(ValueError):
        cb_plan.plan_rows(1, 1, 4, 1, 90, H100_SMEM, "fast")
    # column indices are 32-bit inside a row (rows.cu GL_MAX_COLS)
    assert cb_plan.plan_rows(1, cb_plan.MAX_COLS, 2, 8, 90, H100_SMEM).variant == "looped"
    with pytest.raises(ValueError, match="per row"):
        cb_plan.plan_rows(1, cb_plan.MAX_COLS + 1, 2, 8, 90, H100_SMEM)
    assert "0x7fffffff - 65536" in cb_build.read_source("rows.cu") and cb_plan.MAX_COLS == 0x7FFFFFFF - 65536


def test_plan_elementwise():
    assert cb_plan.plan_elementwise(0) == (1, cb_plan.EW_THREADS)
    assert cb_plan.plan_elementwise(10**10)[0] == cb_plan.EW_MAX_BLOCKS


@pytest.mark.parametrize("cc", [80, 90])
def test_name_expressions(cc):
    for dt in cb_build.DTYPES:
        ce = cb_build.name_expressions("cross_entropy", dt, cc)
        assert len(ce) == len(set(ce))
        tag = cb_build.DTYPES[dt][0]
        assert f"gpuloss_cross_entropy<{tag}, long long, false, 1, 1, false>" in ce
        has_cluster = any(", 2, true>" in n for n in ce)
        assert not any(", 4, true>" in n or ", 8, true>" in n for n in ce)
        assert has_cluster == (cc >= 90)
    opts = cb_build.nvrtc_options(cc)
    assert ("-DGPULOSS_HAS_CLUSTER=1" in opts) == (cc >= 90)


def test_read_source_expands_headers():
    text = cb_build.read_source("rows.cu")
    assert '#include "' not in text and "struct bf16" in text


def test_dlpack_cpu_paths():
    """The conversion code paths that can run without a GPU: the bf16 <-> int16 bit view is
    exact and copies nothing (checked on CPU tensors, the same view the backend takes)."""
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 5).to(torch.bfloat16)
    bits = t.view(torch.int16)
    assert bits.data_ptr() == t.data_ptr()
    back = bits.view(torch.bfloat16)
    assert torch.equal(back, t)
    # a cupy array cannot be made here; from_dlpack on a CUDA tensor is tested on the GPU below


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------

def _poisoned_like(cupy, a):
    out = cupy.empty_like(a)
    out.fill(float("nan"))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["looped", "onchip", "staged"])
@pytest.mark.parametrize("C", [7, 1000, 32000, 262144])
def test_gpu_softmax_and_ce_long_rows(monkeypatch, rng, variant, C):
    b = _gpu()
    import cupy
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", variant)
    R = 3
    x = rng.standard_normal((R, C)) * 4
    t = rng.integers(0, C, size=R)
    xc = cupy.asarray(x, dtype=cupy.float32)
    y = prim(b, "softmax_forward", xc, log=True)
    np.testing.assert_allclose(cupy.asnumpy(y), ref.log_softmax(x.astype(np.float32)), rtol=1e-4, atol=1e-4)
    res = prim(b, "cross_entropy", xc, cupy.asarray(t), weight=None, ignore_index=-100, label_smoothing=0.1,
                          z_loss=1e-3, softcap=None, reduction="mean", want_grad=True)
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(float(res.loss), ref.cross_entropy(x32, t, label_smoothing=0.1, z_loss=1e-3), **tol("float32"))
    g, _ = ref.cross_entropy_grad(x32, t, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(cupy.asnumpy(res.grad), g, rtol=1e-4, atol=1e-7)


def _poison_allocations(monkeypatch, cupy):
    """Every cupy.empty during the test comes back filled with NaN (bf16 bits: 0x7fc0), so an
    element a kernel fails to write shows up as NaN."""
    real = cupy.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.dtype.kind == "f":
            out.fill(float("nan"))
        elif str(out.dtype) in ("int16", "uint16"):
            out.fill(0x7FC0)
        return out

    monkeypatch.setattr(cupy, "empty", empty)


def _harness():
    from conftest import BackendHarness
    return BackendHarness(name="cupy", impl=_gpu(), device="cuda")


def _round_to(x, dtype):
    torch = pytest.importorskip("torch")
    return torch.tensor(x).to(getattr(torch, dtype)).double().numpy()


def _offset_logits(rng, R, C, offset, dtype):
    """Rows of offset + N(0, 4) and rows a few ulps of ``dtype`` apart at ``offset``, rounded to
    ``dtype``; and the same rows minus their maxima (exact), for the float64 reference, which
    itself rounds lse = 1e30 + log C to 1e30.  Loss and gradient are shift invariant."""
    ulp = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7}[dtype]
    x = np.empty((R, C))
    x[: R // 2] = offset + 4 * rng.standard_normal((R // 2, C))
    x[R // 2:] = (offset or 1.0) * (1 + 4 * ulp * rng.standard_normal((R - R // 2, C)))
    x = _round_to(x, dtype)
    return x, x - x.max(1, keepdims=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [v for v in cb_build.VARIANTS if v != "auto"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 1e5, -1e5, 1e30, 1e37, -1e37])
@pytest.mark.parametrize("C", [1000, 32000, 32007])
def test_gpu_precision_at_offsets(monkeypatch, rng, variant, dtype, offset, C):
    """Cross-entropy (label smoothing, class weights, probability targets, in place) and
    distillation KL at logits sharing a large offset, against the float64 reference on the
    shifted rows; every output poisoned first.  Sums of raw logits fail this at 1e5 and give
    nan at 1e37 (tests/test_cuda_host_harness.py shows both on the CPU)."""
    h = _harness()
    import cupy
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", variant)
    _poison_allocations(monkeypatch, cupy)
    R = 6
    x, xs = _offset_logits(rng, R, C, offset, dtype)
    t = rng.integers(0, C, R)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32).astype(np.float64)
    d = rng.dirichlet(np.ones(C), R)
    d = _round_to(d, dtype)
    cases = [dict(label_smoothing=0.1), dict(label_smoothing=0.1, weight=w), dict()]
    if abs(offset) <= 1e5:
        cases.append(dict(label_smoothing=0.1, z_loss=1e-3))  # lse^2 overflows fp32 beyond ~1e19
    for kw in cases:
        for inplace in (False, True):
            res = prim(h.impl, "cross_entropy", h.asarray(x, dtype), cupy.asarray(t),
                                       weight=None if kw.get("weight") is None else cupy.asarray(w, cupy.float32),
                                       ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0),
                                       z_loss=kw.get("z_loss", 0.0), softcap=None, reduction="none",
                                       want_grad=True, grad_inplace=inplace)
            xr = xs if "z_loss" not in kw else x
            np.testing.assert_allclose(h.to_numpy(res.loss), ref.cross_entropy(xr, t, reduction="none", **kw),
                                       err_msg=f"loss {kw} inplace={inplace}", **tol("float32"))
            g = h.to_numpy(res.grad)
            assert np.isfinite(g).all()
            np.testing.assert_allclose(g, ref.cross_entropy_grad(xr, t, reduction="none", **kw)[0],
                                       err_msg=f"grad {kw}", **tol(dtype))
    res = prim(h.impl, "cross_entropy", h.asarray(x, dtype), h.asarray(d, dtype), weight=cupy.asarray(w, cupy.float32),
                               ignore_index=-100, label_smoothing=0.05, z_loss=0.0, softcap=None,
                               reduction="none", want_grad=True)
    kw = dict(weight=w, label_smoothing=0.05, reduction="none")
    np.testing.assert_allclose(h.to_numpy(res.loss), ref.cross_entropy(xs, d, **kw), err_msg="prob loss",
                               **tol("float32"))
    np.testing.assert_allclose(h.to_numpy(res.grad), ref.cross_entropy_grad(xs, d, **kw)[0], err_msg="prob grad",
                               **tol(dtype))
    y, ys = _offset_logits(rng, R, C, offset, dtype)
    for target_is_logits, tgt, tref in ((True, y, ys), (False, d, d)):
        res = prim(h.impl, "kl_div_logits", h.asarray(x, dtype), h.asarray(tgt, dtype), temperature=2.0,
                                   target_is_logits=target_is_logits, reduction="none", want_grad=True)
        kw = dict(temperature=2.0, reduction="none", target_is_logits=target_is_logits)
        np.testing.assert_allclose(h.to_numpy(res.loss), ref.kl_div_with_logits(xs, tref, **kw),
                                   err_msg=f"kl {target_is_logits}", rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(h.to_numpy(res.grad), ref.kl_div_with_logits_grad(xs, tref, **kw)[0],
                                   err_msg=f"kl grad {target_is_logits}", **tol(dtype))


@pytest.mark.gpu
def test_gpu_strided_rows_and_extremes(rng):
    b = _gpu()
    import cupy
    base = rng.standard_normal((6, 301)) * 30
    base[0, 5] = 1e4
    base[1, :] = -1e4
    xc = cupy.asarray(base, dtype=cupy.float32)[::2, 1:300]  # strided, unaligned rows
    x = cupy.asnumpy(xc).astype(np.float64)
    y = prim(b, "softmax_forward", xc, log=False)
    np.testing.assert_allclose(cupy.asnumpy(y), ref.softmax(x), rtol=1e-4, atol=1e-6)
    assert np.isfinite(cupy.asnumpy(y)).all()


@pytest.mark.gpu
def test_gpu_out_of_range_target_is_nan(rng):
    b = _gpu()
    import cupy
    x = cupy.asarray(rng.standard_normal((3, 17)), dtype=cupy.float32)
    t = cupy.asarray([1, 17, -100])
    res = prim(b, "cross_entropy", x, t, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                          reduction="none", want_grad=True)
    loss, g = cupy.asnumpy(res.loss), cupy.asnumpy(res.grad)
    assert np.isfinite(loss[0]) and np.isnan(loss[1]) and loss[2] == 0
    assert np.isnan(g[1]).all() and (g[2] == 0).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_more_than_2_31_elements(rng):
    b = _gpu()
    import cupy
    R, C = 16640, 129056  # 2.147e9 + margin elements of bf16 (4.3 GB)
    if R * C <= 2 ** 31:
        R += 1
    free = cupy.cuda.runtime.memGetInfo()[0]
    if free < 3 * R * C * 2:
        pytest.skip("not enough GPU memory")
    x = cupy.empty((R, C), dtype=cupy.int16)  # bf16 bits
    xf = cupy.random.standard_normal((R, C), dtype=cupy.float32)
    x[...] = (xf.view(cupy.int32) >> 16).astype(cupy.int16)  # truncation to bf16 is fine here
    del xf
    t = cupy.asarray(rng.integers(0, C, size=R))
    res = prim(b, "cross_entropy", x, t, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                          reduction="none", want_grad=True, grad_inplace=True)
    last = cupy.asnumpy((x[-1:].astype(cupy.int32) << 16).view(cupy.float32))
    # the last row (offset past 2^31) must hold a valid gradient: sums to ~0, one negative entry
    assert np.isfinite(cupy.asnumpy(res.loss)).all()
    assert abs(last.sum()) < 1e-2 and last[0, int(t[-1])] < 0


@pytest.mark.gpu
def test_gpu_torch_dlpack_zero_copy_inplace(rng):
    b = _gpu()
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.bfloat16):
        xt = torch.randn(5, 300, device="cuda").to(dtype)
        x_ref = xt.double().cpu().numpy()
        t = torch.randint(0, 300, (5,), device="cuda")
        xn = b.to_native(xt, "torch")
        assert xn.data.ptr == xt.data_ptr()
        res = prim(b, "cross_entropy", xn, b.to_native(t, "torch"), weight=None, ignore_index=-100, label_smoothing=0.0,
                              z_loss=0.0, softcap=None, reduction="sum", want_grad=True, grad_inplace=True)
        g = b.from_native(res.grad, "torch")
        assert g.data_ptr() == xt.data_ptr() and g.dtype == dtype
        gref, _ = ref.cross_entropy_grad(x_ref, t.cpu().numpy(), reduction="sum")
        np.testing.assert_allclose(g.double().cpu().numpy(), gref, **tol(str(dtype).replace("torch.", "")))


@pytest.mark.gpu
def test_gpu_concurrent_torch_calls_from_threads(rng):
    """Eight Python threads call the public functions on CUDA torch tensors with backend="cupy"
    at once, half of them on their own torch stream (each call runs CuPy on torch's current
    stream with torch's allocator: thread-local state): every result equals the one computed
    alone afterwards, autograd included."""
    import gpuloss
    _gpu()
    torch = pytest.importorskip("torch")
    n = 8
    inputs = []
    for i in range(n):
        R, C = 64, 1000 + 997 * i
        dt = torch.bfloat16 if i % 2 else torch.float32
        inputs.append((torch.from_numpy(rng.standard_normal((R, C)) * 3).to(dt).cuda(),
                       torch.from_numpy(rng.integers(0, C, R)).cuda()))

    def call(x, t):
        xg = x.detach().clone().requires_grad_()
        loss = gpuloss.cross_entropy(xg, t, label_smoothing=0.1, backend="cupy")
        loss.backward()
        return loss.detach(), xg.grad, gpuloss.softmax(x, -1, backend="cupy")

    results = on_threads_and_streams(n, lambda i: call(*inputs[i]))
    for i, (x, t) in enumerate(inputs):
        alone = call(x, t)
        for got in results[i]:
            assert all(torch.equal(a, b) for a, b in zip(got, alone)), i
        gref, _ = ref.cross_entropy_grad(x.double().cpu().numpy(), t.cpu().numpy(), label_smoothing=0.1)
        np.testing.assert_allclose(alone[1].double().cpu().numpy(), gref,
                                   **tol("bfloat16" if x.dtype == torch.bfloat16 else "float32"))


@pytest.mark.parametrize("cc", [80, 90])
def test_launcher_expressions_are_instantiated(cc):
    """Every expression a launcher can format from a plan is one the module instantiates
    (get_module refuses others), for every dtype, vector width and cluster size."""
    for dt, (tag, itemsize, _) in cb_build.DTYPES.items():
        for vec in (1, cb_build.vec_width(dt)):
            for C in (5, 32000, 262144):
                p = cb_plan.plan_rows(4, C, itemsize, vec, cc, H100_SMEM if cc >= 90 else A100_SMEM)
                on = "true" if p.variant == "onchip" else "false"
                fill = dict(vec=p.vec, k=p.cluster, on=on)
                exprs = {
                    "softmax_fwd": f"gpuloss_softmax_fwd<{tag}, {{vec}}, {{k}}, {{on}}>",
                    "cross_entropy": f"gpuloss_cross_entropy<{tag}, int, false, {{vec}}, {{k}}, {{on}}>",
                    "kl_div_logits": f"gpuloss_kl_div_logits<{tag}, true, {{vec}}, {{k}}, {{on}}>",
                }
                for op, fmt in exprs.items():
                    assert fmt.format(**fill) in cb_build.name_expressions(op, dt, cc)


# ---------------------------------------------------------------------------------------------
# GPU only: the staged variant (kernels/cuda/staged.cu; its host-side sizing is tested in
# tests/test_cupy_staged.py).  Every cluster size (1, 2, 4, 8 blocks per row), several rows per
# cluster so that buffers wrap and the exchange slots alternate (GPULOSS_CUPY_STAGED_CLUSTERS=2),
# 1 to 4 buffers, ragged row ends, every cross-entropy option; outputs poisoned.
# ---------------------------------------------------------------------------------------------


def _native(h, vals, dtype):
    """``vals`` (already representable in ``dtype``) on the GPU with every row start 16-byte
    aligned: a column slice of a buffer whose width is a multiple of 8 when C is not."""
    R, C = vals.shape
    width = -(-C // 8) * 8
    if width == C:
        return h.asarray(vals, dtype)
    return h.asarray(np.pad(vals, ((0, 0), (0, width - C))), dtype)[:, :C]


def _spy(monkeypatch):
    """Record every staged launch (None: the call fell back to the row kernels)."""
    calls = []
    real = cb_staged.launch

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(cb_staged, "launch", spy)
    return calls


def _rows_aligned(dtype, C):
    """Whether every row of a contiguous (R_, C) array of ``dtype`` starts 16-byte aligned: the
    outputs the launchers allocate (softmax's y and dx, a gradient not in place) are such arrays."""
    return C * cb_build.DTYPES[dtype][1] % 16 == 0


def _staged_expected(dtype, C, n_in, cc, optin, fresh_output=True):
    """Whether a staged-variant call on inputs from _native (16-byte aligned rows) runs staged on
    a device of compute capability ``cc`` with ``optin`` bytes of shared memory per block (sm_80
    has no clusters: long rows fall back).  ``fresh_output``: the call writes an array the
    launcher allocates, contiguous; the staged kernels store whole 16-byte vectors from each row
    start, so where its rows are C * itemsize bytes apart and that is no multiple of 16 (the
    ragged layouts), the launcher falls back to the row kernels (common.row_launch, aligned)."""
    if fresh_output and not _rows_aligned(dtype, C):
        return False
    return cb_plan.plan_staged(C, cb_build.DTYPES[dtype][1], n_in, cc, optin, **cb_staged.knobs(dtype)) is not None


def _expect_staged(cupy, dtype, C, n_in, fresh_output=True):
    """_staged_expected on this device."""
    dev = cupy.cuda.Device()
    optin = int(dev.attributes.get("MaxSharedMemoryPerBlockOptin", 48 * 1024))
    return _staged_expected(dtype, C, n_in, int(dev.compute_capability), optin, fresh_output)


def _setup(monkeypatch, knobs=None):
    h = _harness()
    import cupy
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", "staged")
    monkeypatch.setenv("GPULOSS_CUPY_STAGED_CLUSTERS", "2")  # 13 rows on 2 clusters: buffers wrap
    for k, v in (knobs or {}).items():
        monkeypatch.setenv(k, v)
    _poison_allocations(monkeypatch, cupy)
    return h, cupy, _spy(monkeypatch)


#: (C, dtype): cluster sizes 1, 2, 4, 8 on sm_90 at the default slice; ragged rows (C not a
#: multiple of 16 bytes) in fp32 and fp16, staged only where no output is allocated (cross-entropy
#: in place or loss only: the row ends' tail); fp64
LAYOUTS = [(1003, "float32"), (32000, "bfloat16"), (32000, "float32"), (128256, "bfloat16"),
           (262144, "bfloat16"), (4099, "float16"), (2048, "float64")]
R_ = 13


H200_OPTIN = 232448  #: MaxSharedMemoryPerBlockOptin of an H200 (227 KB), compute capability 9.0


class _RowsStub:
    """What the launchers read of a 2-D cupy array: pointer, shape, strides, dtype."""

    def __init__(self, dtype, shape, row_elems, ptr=1 << 20):  # allocations are 256-byte aligned
        self.dtype = "int16" if dtype == "bfloat16" else dtype
        self.data = types.SimpleNamespace(ptr=ptr)
        self.shape = shape
        itemsize = cb_build.DTYPES[dtype][1]
        self.strides = (row_elems * itemsize, itemsize)
        self.ndim, self.itemsize = len(shape), itemsize


@pytest.mark.parametrize("C,dtype", LAYOUTS)
def test_staged_expectation_follows_the_launcher(monkeypatch, C, dtype):
    """Host code, no GPU.  The staged GPU tests' expectation (_staged_expected) for each call
    they make, against the launcher's own decision (common.row_launch -> staged.launch, on stub
    kernels) for the arrays that call hands it, on an H200: inputs from _native (row pitch
    padded to 8 elements), outputs allocated contiguous (R_, C).  For C = 1003 fp32 and 4099
    fp16 those outputs' rows are not 16-byte aligned and the launcher falls back; an expectation
    from plan_staged alone said staged (the H200 failures of test_gpu_staged_softmax and
    test_gpu_staged_cross_entropy: all None, and None for every gradient not in place)."""
    import sys
    launched = []

    class Kernel:
        num_regs = 64

        def __call__(self, grid, block, args, shared_mem=0):
            launched.append(shared_mem)

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace())
    monkeypatch.setattr(cb_build, "device_info", lambda cupy: (0, 90, H200_OPTIN))
    monkeypatch.setattr(cb_build, "staged_kernel", lambda *a: Kernel())
    monkeypatch.setattr(cb_build, "kernel", lambda *a: Kernel())
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", "staged")
    monkeypatch.setenv("GPULOSS_CUPY_STAGED_CLUSTERS", "2")
    i64, null = np.int64, cb_common.null()
    x = _RowsStub(dtype, (R_, C), -(-C // 8) * 8)  # _native
    fresh = _RowsStub(dtype, (R_, C), C)  # cupy.empty((R, C))
    loss = _RowsStub("float64" if dtype == "float64" else "float32", (R_,), 1)

    def staged(op, args, rows):
        plan = cb_common.row_launch(op, dtype, "{vec} {k} {on}", R_, C, args, rows)
        return plan.variant == "staged"

    sm = (i64(C), i64(C), i64(R_), i64(C), np.int32(0))
    got = [staged("softmax_fwd", (x, fresh) + sm, (x, fresh)),
           staged("softmax_bwd", (x, x, fresh, i64(C)) + sm, (x, x, fresh))]
    want = [_staged_expected(dtype, C, 1, 90, H200_OPTIN), _staged_expected(dtype, C, 2, 90, H200_OPTIN)]
    t = types.SimpleNamespace(dtype="int64")
    for mode, g in (("grad", fresh), ("inplace", x), ("loss", None)):
        args = (x, t, null, null, null, null if g is None else g, loss, loss, null, i64(C), i64(0),
                i64(C if g is not None else 0), i64(R_), i64(C), i64(-100), np.float32(0.1), np.float32(0),
                np.float32(0))
        got.append(staged("cross_entropy", args, (x, g, None)))
        want.append(_staged_expected(dtype, C, 1, 90, H200_OPTIN, fresh_output=mode == "grad"))
    assert got == want
    assert len(launched) == len(got) and got[-2:] == [True, True]  # in place and loss only: staged on sm_90


@pytest.mark.gpu
@pytest.mark.parametrize("C,dtype", LAYOUTS)
@pytest.mark.parametrize("knobs", [{}, {"GPULOSS_CUPY_STAGED_NBUF": "1"},
                                   {"GPULOSS_CUPY_STAGED_NBUF": "2", "GPULOSS_CUPY_STAGED_THREADS": "256"}],
                         ids=["default", "nbuf1", "nbuf2-t256"])
def test_gpu_staged_softmax(monkeypatch, rng, C, dtype, knobs):
    h, cupy, calls = _setup(monkeypatch, knobs)
    x = _round_to(rng.standard_normal((R_, C)) * 4, dtype)
    dy = _round_to(rng.standard_normal((R_, C)), dtype)
    for log in (False, True):
        y = prim(h.impl, "softmax_forward", _native(h, x, dtype), log=log)
        yv = h.to_numpy(y)
        np.testing.assert_allclose(yv, ref.log_softmax(x) if log else ref.softmax(x), err_msg=f"fwd log={log}",
                                   **tol(dtype))
        dx = prim(h.impl, "softmax_backward", _native(h, yv, dtype), _native(h, dy, dtype), log=log)
        expect = ref.log_softmax_backward(yv, dy) if log else ref.softmax_backward(yv, dy)
        np.testing.assert_allclose(h.to_numpy(dx), expect, err_msg=f"bwd log={log}", rtol=tol(dtype)["rtol"],
                                   atol=max(tol(dtype)["atol"], 2e-5))
    ran = [c is not None for c in calls]  # which calls ran staged (not the fallback)
    assert ran == [_expect_staged(cupy, dtype, C, 1), _expect_staged(cupy, dtype, C, 2)] * 2, calls
    assert any(ran) or int(cupy.cuda.Device().compute_capability) < 90 or not _rows_aligned(dtype, C)
    print("staged plans", C, dtype, calls)


@pytest.mark.gpu
@pytest.mark.parametrize("C,dtype", LAYOUTS)
@pytest.mark.parametrize("tdtype", ["int64", "int32"])
def test_gpu_staged_cross_entropy(monkeypatch, rng, C, dtype, tdtype):
    h, cupy, calls = _setup(monkeypatch)
    x = _round_to(rng.standard_normal((R_, C)) * 4, dtype)
    t = rng.integers(0, C, R_)
    t[3] = -100
    w = rng.uniform(0.5, 2.0, C).astype(np.float32).astype(np.float64)
    wdt = "float64" if dtype == "float64" else "float32"
    cases = [dict(), dict(label_smoothing=0.1), dict(weight=w), dict(z_loss=1e-3), dict(softcap=20.0),
             dict(label_smoothing=0.1, weight=w, z_loss=1e-4, softcap=30.0)]
    expected = []
    for kw in cases:
        for reduction in ("none", "mean"):
            loss_ref = ref.cross_entropy(x, t, reduction=reduction, **kw)
            grad_ref = ref.cross_entropy_grad(x, t, reduction=reduction, **kw)[0]
            for mode in ("grad", "inplace", "loss"):
                expected.append(_expect_staged(cupy, dtype, C, 1, fresh_output=mode == "grad"))
                res = prim(h.impl, "cross_entropy", _native(h, x, dtype), cupy.asarray(t.astype(tdtype)),
                                           weight=None if kw.get("weight") is None else h.asarray(w, wdt),
                                           ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0),
                                           z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap"),
                                           reduction=reduction, want_grad=mode != "loss",
                                           grad_inplace=mode == "inplace")
                what = f"{sorted(kw)} {reduction} {mode}"
                np.testing.assert_allclose(h.to_numpy(res.loss), loss_ref, err_msg=what,
                                           **tol("float64" if dtype == "float64" else "float32"))
                if mode != "loss":
                    g = h.to_numpy(res.grad)
                    assert np.isfinite(g).all(), what
                    np.testing.assert_allclose(g, grad_ref, err_msg=what, **tol(dtype))
    assert [c is not None for c in calls] == expected, calls
    assert any(c is not None for c in calls) or int(cupy.cuda.Device().compute_capability) < 90


@pytest.mark.gpu
def test_gpu_staged_falls_back(monkeypatch, rng):
    """Ops and rows the staged kernels do not take run on the row kernels: probability targets,
    KL, NLL, unaligned rows."""
    h = _harness()
    import cupy
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", "staged")
    _poison_allocations(monkeypatch, cupy)
    R, C = 5, 301  # 301 fp32 elements per row: rows not 16-byte aligned
    x = rng.standard_normal((R, C)).astype(np.float32).astype(np.float64)
    d = rng.dirichlet(np.ones(C), R).astype(np.float32).astype(np.float64)
    res = prim(h.impl, "cross_entropy", h.asarray(x, "float32"), h.asarray(d, "float32"), weight=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="none", want_grad=True)
    np.testing.assert_allclose(h.to_numpy(res.grad), ref.cross_entropy_grad(x, d, reduction="none")[0],
                               **tol("float32"))
    y = prim(h.impl, "softmax_forward", h.asarray(x, "float32"), log=False)
    np.testing.assert_allclose(h.to_numpy(y), ref.softmax(x), **tol("float32"))
    res = prim(h.impl, "kl_div_logits", h.asarray(x, "float32"), h.asarray(x[::-1].copy(), "float32"), temperature=1.0,
                               target_is_logits=True, reduction="none", want_grad=True)
    np.testing.assert_allclose(h.to_numpy(res.loss), ref.kl_div_with_logits(x, x[::-1], reduction="none"),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
def test_gpu_staged_resident_clusters(monkeypatch):
    """The driver's cluster occupancy answer is read (not the conservative fallback) and is
    at least what the fallback would have used."""
    _gpu()
    import cupy
    if int(cupy.cuda.Device().compute_capability) < 90:
        pytest.skip("clusters need sm_90")
    monkeypatch.delenv("GPULOSS_CUPY_STAGED_CLUSTERS", raising=False)
    plan = cb_plan.plan_staged(262144, 2, 1, 90, int(cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]))
    kern = cb_build.staged_kernel("cross_entropy", "bfloat16", plan.cluster, plan.smem_bytes)
    exact = cb_staged._max_active_clusters(kern, plan)
    sms = int(cupy.cuda.Device().attributes["MultiProcessorCount"])
    print("max active clusters of", plan.cluster, "blocks:", exact, "on", sms, "SMs")
    assert exact is not None and exact >= cb_plan.conservative_clusters(sms, 1, plan.cluster)
    assert exact * plan.cluster <= sms * cb_plan.staged_blocks_per_sm(plan, kern.num_regs, 228 * 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "float32"),
                                    ("float16", "bfloat16"), ("float32", "float64")])
def test_kl_div_with_logits_of_mixed_dtypes(dtypes):
    """A bf16 student with a float32 teacher (and the other mixes): the
    launcher ``astype``d the teacher to the student's storage dtype, reading
    float32 values as bf16 bits' integers and back: a garbage teacher.  Both
    are now converted to the promoted dtype, as the other backends compute."""
    _gpu()
    torch = pytest.importorskip("torch")
    import gpuloss
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g).to(getattr(torch, dtypes[0]))
    t = (torch.randn(64, 1000, generator=g) * 3).to(getattr(torch, dtypes[1]))
    want = gpuloss.kl_div_with_logits(x, t, temperature=2.0, reduction="none", backend="numpy", return_grad=True)
    got = gpuloss.kl_div_with_logits(x.cuda(), t.cuda(), temperature=2.0, reduction="none", backend="cupy",
                                     return_grad=True)
    assert got.grad.dtype == x.dtype
    torch.testing.assert_close(got.loss.cpu().double(), want.loss.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.grad.cpu().double(), want.grad.double(), rtol=2e-2, atol=1e-5)


def test_device_attributes_are_read_once_per_device(monkeypatch):
    """CuPy's Device().attributes asks the driver for every attribute each
    time; launches read it two or three times (a cost per launch beyond a
    small kernel's): now once per device."""
    import types
    asked = []

    class Device:
        def __init__(self):
            self.id, self.compute_capability = 0, "90"

        @property
        def attributes(self):
            asked.append(self.id)
            return {"MaxSharedMemoryPerBlockOptin": 232448, "MultiProcessorCount": 132,
                    "MaxSharedMemoryPerMultiprocessor": 233472}

    stub = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device))
    monkeypatch.setattr(cb_build, "_device_attrs", {}, raising=False)
    for _ in range(5):
        assert cb_build.device_info(stub) == (0, 90, 232448)
    assert cb_build.device_attrs(stub)["MultiProcessorCount"] == 132
    assert asked == [0]
