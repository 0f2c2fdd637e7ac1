"""The cupy backend's staged variant (kernels/cuda/staged.cu): its sizing and launch-argument
logic, on the host.  The staged kernels themselves are tested on a GPU in
tests/test_cupy_backend.py (test_gpu_staged_*), which ci/gpu.sh runs.
"""
from __future__ import annotations

import numpy as np
import pytest

from gpuloss.backends.cupy import build as cb_build, plan as cb_plan, staged as cb_staged


H100_SMEM = 227 * 1024
A100_SMEM = 163 * 1024


# ---------------------------------------------------------------------------------------------
# host code, no GPU
# ---------------------------------------------------------------------------------------------

def test_staged_is_a_variant_but_not_the_default(monkeypatch):
    assert "staged" in cb_build.VARIANTS and cb_build.VARIANTS[0] == "auto"
    monkeypatch.delenv("GPULOSS_CUPY_VARIANT", raising=False)
    assert cb_plan.selected_variant() == "auto"
    monkeypatch.setenv("GPULOSS_CUPY_VARIANT", "staged")
    assert cb_plan.selected_variant() == "staged"
    # the row kernels' planner takes "staged" as "auto" (what the staged kernels leave to it)
    a = cb_plan.plan_rows(64, 32000, 2, 8, 90, H100_SMEM, "staged")
    assert a == cb_plan.plan_rows(64, 32000, 2, 8, 90, H100_SMEM, "auto")


@pytest.mark.parametrize("C,itemsize,n_in,cc,smem,K,nbuf", [
    (32000, 2, 1, 90, H100_SMEM, 1, 3),    # bf16 8192x32000: 62.5 KB per row on one SM
    (32000, 4, 1, 90, H100_SMEM, 2, 3),    # fp32: 125 KB -> 2 x 62.5 KB
    (128256, 2, 1, 90, H100_SMEM, 4, 3),   # 250.5 KB -> 4 x 62.6 KB
    (262144, 2, 1, 90, H100_SMEM, 8, 3),   # 512 KB -> 8 x 64 KB
    (32000, 2, 2, 90, H100_SMEM, 2, 3),    # softmax backward: y and dy staged
    (32000, 2, 1, 80, A100_SMEM, 1, 2),    # sm_80: no clusters, 2 buffers fit
    (1000, 2, 1, 90, H100_SMEM, 1, 4),     # short rows: all buffers, several blocks per SM
])
def test_plan_staged_shapes(C, itemsize, n_in, cc, smem, K, nbuf):
    p = cb_plan.plan_staged(C, itemsize, n_in, cc, smem)
    assert (p.cluster, p.nbuf) == (K, nbuf)
    vec = 16 // itemsize
    assert p.chunk % vec == 0 and p.chunk * K >= C and (p.chunk - vec) * K < C  # no spare vector
    assert p.smem_bytes == p.nbuf * p.chunk * itemsize * n_in
    assert p.smem_bytes + cb_plan.STAGED_STATIC_RESERVE <= smem
    assert cb_plan.STAGED_MIN_THREADS <= p.threads <= 1024 and p.threads & (p.threads - 1) == 0
    assert p.nbuf <= cb_plan.STAGED_MAX_BUF


def test_plan_staged_refuses_and_overrides():
    assert cb_plan.plan_staged(32000, 4, 1, 80, A100_SMEM) is None        # 125 KB: no double buffer on an A100
    assert cb_plan.plan_staged(32000, 2, 1, 75, 64 * 1024) is None        # no cp.async before sm_80
    assert cb_plan.plan_staged(2_000_000, 2, 1, 90, H100_SMEM) is None    # 8 x 250 KB: too long
    assert cb_plan.plan_staged(0, 2, 1, 90, H100_SMEM) is None
    # a row that fits the preferred slice on no cluster still runs where it double-buffers
    p = cb_plan.plan_staged(300_000, 2, 1, 90, H100_SMEM)                 # 8 x 73 KB, 3 of them
    assert (p.cluster, p.nbuf) == (8, 3)
    p = cb_plan.plan_staged(600_000, 2, 1, 90, H100_SMEM)                 # 8 x 146 KB: one buffer only
    assert p is None
    p = cb_plan.plan_staged(200_000, 2, 1, 90, H100_SMEM)                 # 4 x 98 KB would double-buffer,
    assert (p.cluster, p.nbuf) == (8, 4)                              # 8 x 49 KB is within 64 KB
    p = cb_plan.plan_staged(32000, 2, 1, 90, H100_SMEM, nbuf=2, threads=256, slice_bytes=16 * 1024)
    assert (p.cluster, p.nbuf, p.threads) == (4, 2, 256)
    assert cb_plan.plan_staged(32000, 8, 1, 90, H100_SMEM, max_threads=512).threads <= 512
    assert cb_plan.plan_staged(32000, 2, 1, 90, H100_SMEM, threads=200).threads == 256  # whole warps, a power of 2


def test_no_clusters_where_nvrtc_lacks_st_async():
    """The staged kernels' cluster exchange is ``st.async`` (PTX ISA 8.1): NVRTC 12.0
    (cupy-cuda12x with nvidia-cuda-nvrtc-cu12 12.0) fails every staged module of k > 1 for
    sm_90 ("Not a name of any known instruction: 'st.async'"); 12.1 builds them (both run
    by hand with tests/test_cuda_sources.py).  So with 12.0 the plan takes one block per
    row, or none (the row kernels) where one block cannot double-buffer the row."""
    assert cb_build.staged_cluster_sizes(90, (12, 0)) == (1,)
    assert cb_build.staged_cluster_sizes(90, (12, 1)) == (1, 2, 4, 8)
    assert cb_build.staged_cluster_sizes(90, (13, 0)) == cb_build.staged_cluster_sizes(90) == (1, 2, 4, 8)
    assert cb_build.staged_cluster_sizes(80, (13, 0)) == (1,)
    assert cb_plan.plan_staged(32000, 2, 1, 90, H100_SMEM, nvrtc=(12, 0)).cluster == 1    # 62.5 KB, 1 block
    assert cb_plan.plan_staged(32000, 4, 1, 90, H100_SMEM, nvrtc=(12, 0)) is None        # 125 KB, 2 buffers
    assert cb_plan.plan_staged(32000, 4, 1, 90, H100_SMEM, nvrtc=(12, 1)).cluster == 2
    assert cb_plan.plan_staged(128256, 2, 1, 90, H100_SMEM, nvrtc=(12, 0)) is None       # 250 KB
    assert cb_plan.plan_staged(128256, 2, 1, 90, H100_SMEM, nvrtc=(12, 1)).cluster == 4


def test_staged_grid_and_clusters():
    assert cb_plan.staged_grid(8192, 1, 132) == 132
    assert cb_plan.staged_grid(8192, 4, 32) == 128
    assert cb_plan.staged_grid(3, 8, 16) == 24      # never more clusters than rows
    assert cb_plan.staged_grid(5, 2, 0) == 2        # at least one cluster
    assert cb_plan.conservative_clusters(132, 1, 2) == 66
    assert cb_plan.conservative_clusters(132, 1, 4) == 30   # below the 32 an H100 holds: never above
    assert cb_plan.conservative_clusters(132, 1, 8) == 15
    p = cb_plan.plan_staged(32000, 2, 1, 90, H100_SMEM)
    assert cb_plan.staged_blocks_per_sm(p, regs=48, smem_per_sm=228 * 1024) == 1
    small = cb_plan.plan_staged(1000, 2, 1, 90, H100_SMEM)
    assert cb_plan.staged_blocks_per_sm(small, regs=32, smem_per_sm=228 * 1024) == 16   # by threads


def test_staged_names_and_sources():
    for cc, ks in ((80, (1,)), (90, (1, 2, 4, 8))):
        names = cb_build.name_expressions("staged", "bfloat16", cc)
        assert names == [f"gpuloss_{op}_staged_k{k}_bf16" for k in ks for op in cb_build.STAGED_OPS]
    text = cb_build.read_source("staged.cu")
    for op in cb_build.STAGED_OPS:
        assert f"gpuloss_{op}_staged_k##K##_##TAG" in text
    opts = cb_build.staged_options(90, 4, "bfloat16")
    assert "-DGPULOSS_STAGED_K=4" in opts and "-DGPULOSS_STAGED_DTYPE=4" in opts
    for dt, code in (("float32", 1), ("float64", 2), ("float16", 3)):
        assert f"GPULOSS_STAGED_DTYPE == {code}" in text and f"GL_STAGED_KERNELS(K, ATTR, {cb_build.DTYPES[dt][0]})" in text
    assert cb_plan.staged_max_threads("float64") == 512 and cb_plan.staged_max_threads("bfloat16") == 1024


def test_staged_args_translation():
    np_ = np
    null = np_.uint64(0)

    class T:  # stand-in for a cupy array
        def __init__(self, dtype):
            self.dtype = dtype

        def astype(self, d):
            return T(d)

    x, t32 = T("int16"), T("int32")
    rows = (x, t32, null, null, null, x, T("float32"), T("float32"), null,
            np_.int64(8), np_.int64(0), np_.int64(8), np_.int64(2), np_.int64(8), np_.int64(-100),
            np_.float32(0.1), np_.float32(0), np_.float32(0))
    a = cb_staged.staged_args("cross_entropy", rows)
    assert len(a) == 15 and str(a[1].dtype) == "int64" and a[0] is x and a[4] is x
    prob = (x, null, x) + rows[3:]
    assert cb_staged.staged_args("cross_entropy", prob) is None      # probability targets: row kernels
    assert cb_staged.staged_args("softmax_fwd", (1, 2, 3)) == (1, 2, 3)
    assert cb_staged.staged_args("kl_div_logits", (1,)) is None


def test_staged_knobs_from_the_environment(monkeypatch):
    """The tuning sweep's configurations set knobs that plan_staged obeys."""
    from gpuloss.bench import tune
    cfgs = tune.cupy_staged_configs(True)
    assert tune.cupy_staged_configs(False) == []
    assert cfgs and all(b == "cupy" and kv["GPULOSS_CUPY_VARIANT"] == "staged" for _, b, kv in cfgs)
    default = cb_plan.plan_staged(32000, 4, 1, 90, H100_SMEM, **cb_staged.knobs("float32"))
    seen = set()
    for name, _, kv in cfgs:
        for k in [k for k in kv if k != "GPULOSS_CUPY_VARIANT"]:
            monkeypatch.setenv(k, kv[k])
        p = cb_plan.plan_staged(32000, 4, 1, 90, H100_SMEM, **cb_staged.knobs("float32"))
        assert p != default, name
        seen.add(p)
        for k in kv:
            monkeypatch.delenv(k, raising=False)
    assert len(seen) == len(cfgs)
    assert cb_staged.knobs("float64")["max_threads"] == 512
