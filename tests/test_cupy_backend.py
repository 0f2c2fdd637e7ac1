"""Host-side tests of the cupy backend (run on the CPU) and GPU-only checks (skipped here).

The generic correctness suite (tests/test_backend_primitives.py) runs on this backend through
the ``backend`` fixture whenever a GPU is present; the GPU tests below add what is specific to
this backend: long rows, strided rows, N x V > 2^31, extreme logits, every variant, and torch
tensors through DLPack without copies.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpuloss import reference as ref
from gpuloss.backends import cupy as cb
from gpuloss.backends.cupy import build as cb_build, common as cb_common, plan as cb_plan

from conftest import tol
from prims import prim


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
    assert cb.CupyBackend.variants() == ("auto", "looped", "onchip")
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


def test_plan_rows_explicit_onchip_uses_large_clusters():
    """variant="onchip" still splits long rows over clusters of 4 and 8."""
    assert cb_plan.plan_rows(16384, 128256, 2, 8, 90, H100_SMEM, "onchip").cluster == 4   # 4 x 62.6 KB
    assert cb_plan.plan_rows(4096, 262144, 2, 8, 90, H100_SMEM, "onchip").cluster == 8    # 8 x 64 KB
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
        has_cluster = any(", 8, true>" in n for n in ce)
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
@pytest.mark.parametrize("variant", ["looped", "onchip"])
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
