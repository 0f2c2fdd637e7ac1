"""The benchmark runner's logic, on the CPU: byte counts, floor arithmetic,
the WRONG / fails / n/a paths, outputs, GPU implementations listed as
unavailable with a reason, and a small end-to-end run."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gpuloss.bench import impls as impls_mod  # noqa: E402
from gpuloss.bench import ops as ops_mod  # noqa: E402
from gpuloss.bench import report, runner  # noqa: E402
from gpuloss.bench.impls import Ctx, Impl, NotApplicable  # noqa: E402
from gpuloss.bench.timing import Device  # noqa: E402

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@pytest.fixture
def cpu():
    return Device("cpu", quick=True)


@pytest.fixture
def gen(rng):
    g = torch.Generator()
    g.manual_seed(int(rng.integers(0, 2**31)))
    return g


def _row_inputs(op_name, shape, gen, dtype="float32"):
    return ops_mod.OPS[op_name].make_inputs(shape, dtype, torch.device("cpu"), gen)


# --------------------------------------------------------------------------
# byte floors and derived numbers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_floor_bytes_per_op(rng, dtype):
    n, v = int(rng.integers(1, 5000)), int(rng.integers(1, 300000))
    s = BYTES[dtype]
    nv = n * v
    expected = {
        "softmax_fwd": 2 * nv * s,                 # read x, write y
        "log_softmax_fwd": 2 * nv * s,
        "softmax_bwd": 3 * nv * s,                 # read y, dy; write dx
        "ce_loss": nv * s + 8 * n + 4,             # read logits + int64 targets, write the scalar
        "ce_loss_grad": 2 * nv * s + 8 * n + 4,    # + write dlogits
        "bce_loss_grad": 3 * nv * s + 4,           # read x, t; write dx
        "mse_loss_grad": 3 * nv * s + 4,
        "kl_loss_grad": 3 * nv * s + 4,
    }
    for name, b in expected.items():
        assert ops_mod.OPS[name].floor_bytes((n, v), dtype) == b, name


def test_fraction_of_floor_and_speedups(rng):
    copy_bw = float(rng.uniform(1e9, 5e12))
    fb = int(rng.integers(1 << 20, 1 << 34))
    tg, tp, tc = (float(x) for x in rng.uniform(0.1, 50.0, size=3))
    base = {"op": "ce_loss_grad", "shape": "8x8", "dtype": "float32", "floor_bytes": fb}
    rows = [
        {**base, "impl": "gpuloss-a", "group": "gpuloss", "status": "ok", "time_ms": tg},
        {**base, "impl": "torch", "group": "peer", "status": "ok", "time_ms": tp},
        {**base, "impl": "liger", "group": "peer", "status": "ok", "time_ms": tc},
        {**base, "impl": "bad", "group": "peer", "status": "WRONG: y", "time_ms": None},
        {**base, "shape": "16x8", "impl": "other-shape", "group": "peer", "status": "ok", "time_ms": 1.0},
    ]
    runner.add_derived(rows, copy_bw)
    g = rows[0]
    assert g["gbps"] == pytest.approx(fb / (tg * 1e-3) / 1e9, rel=1e-12)
    # floor time / measured time, i.e. achieved bandwidth / copy bandwidth
    assert g["frac_floor"] == pytest.approx((fb / copy_bw) / (tg * 1e-3), rel=1e-12)
    assert g["frac_floor"] == pytest.approx(g["gbps"] * 1e9 / copy_bw, rel=1e-12)
    assert g["speedups"] == pytest.approx({"torch": tp / tg, "liger": tc / tg}, rel=1e-12)
    assert rows[3]["gbps"] is None and rows[3]["frac_floor"] is None
    assert "speedups" not in rows[1]  # peers are not compared with each other


# --------------------------------------------------------------------------
# the checks: each op's torch implementation passes, a perturbed one fails
# --------------------------------------------------------------------------

@pytest.mark.parametrize("op_name", list(ops_mod.OPS))
def test_checks_accept_torch_and_reject_perturbed(op_name, cpu, gen):
    op = ops_mod.OPS[op_name]
    shape = (7, 301)
    inputs = _row_inputs(op_name, shape, gen)
    impl = impls_mod.build_registry(cpu)["torch"]
    fn = impl.builders[op_name](inputs, Ctx(cpu, "float32", shape))
    out = impls_mod.canonical(fn(), op.outputs, cpu)
    ok, detail = op.check(out, inputs, "float32", {})
    assert ok, detail
    # 0.5% off in one place: beyond float32 tolerance, must be caught
    if op.outputs == "loss,grad":
        loss, grad = out
        bad = grad.clone()
        # away from zero: 0.5% of the element plus 1e-3 of the largest (a
        # signed sum of the two cancelled for an element near -0.2 max|grad|)
        g0 = float(grad[3, 17])
        bad[3, 17] = g0 + (1.0 if g0 >= 0 else -1.0) * (0.005 * abs(g0) + 1e-3 * float(grad.abs().max()))
        assert not op.check((loss, bad), inputs, "float32", {})[0]
        assert not op.check((loss * 1.005, grad), inputs, "float32", {})[0]
    elif op.outputs == "loss":
        assert not op.check(out * 1.005, inputs, "float32", {})[0]
    else:
        bad = out.clone()
        bad[-1, 5] += 0.01 * out.abs().max()
        assert not op.check(bad, inputs, "float32", {})[0]
        bad = out.clone()
        bad[0, 0] = float("nan")
        assert not op.check(bad, inputs, "float32", {})[0]


def test_scalar_references_match_gpuloss_reference(rng):
    from gpuloss import reference as R
    n, v = 5, 257
    # small chunks so the float64 chunked sums cross chunk boundaries
    old = ops_mod.CHUNK_ELEMS
    ops_mod.CHUNK_ELEMS = 2 * v
    try:
        x = rng.standard_normal((n, v)) * 2
        t = rng.standard_normal((n, v)) * 2
        p = rng.uniform(0.01, 0.99, (n, v))
        idx = rng.integers(0, v, n)
        X, T, P, I = (torch.from_numpy(a) for a in (x, t, p, idx))
        assert ops_mod.scalar_ce(X, I) == pytest.approx(float(R.cross_entropy(x, idx)), rel=1e-12)
        assert ops_mod.scalar_bce(X, P) == pytest.approx(float(R.binary_cross_entropy_with_logits(x, p)), rel=1e-12)
        assert ops_mod.scalar_mse(X, T) == pytest.approx(float(R.mse_loss(x, t)), rel=1e-12)
        assert ops_mod.scalar_kl(X, T, 2.0) == pytest.approx(
            float(R.kl_div_with_logits(x, t, temperature=2.0)), rel=1e-12)
    finally:
        ops_mod.CHUNK_ELEMS = old


# --------------------------------------------------------------------------
# WRONG, fails, n/a, in-place clones, variants' environment
# --------------------------------------------------------------------------

def test_wrong_result_is_reported_and_not_timed(cpu, gen):
    calls = []

    def build(inp, ctx):
        x = inp["x"]

        def run():
            calls.append(1)
            y = torch.softmax(x, -1)
            y[1] *= 1.01  # one row 1% off
            return y
        return run

    impl = Impl("wrong", "gpuloss", lambda d: (True, "test"), {"softmax_fwd": build})
    timed = []
    cpu.time_ms = lambda fn: timed.append(fn) or 1.0
    op = ops_mod.OPS["softmax_fwd"]
    inputs = _row_inputs("softmax_fwd", (4, 300), gen)
    res = runner.run_impl(op, impl, inputs, Ctx(cpu, "float32", (4, 300)), cpu, {})
    assert res["status"].startswith("WRONG: y")
    assert res["time_ms"] is None and res["mem_extra_bytes"] is None
    assert calls == [1] and timed == []


def test_failing_and_not_applicable_implementations(cpu, gen):
    def raising_call(inp, ctx):
        def run():
            raise RuntimeError("Cannot launch: n exceeds 65536\nsecond line")
        return run

    def raising_build(inp, ctx):
        raise ValueError("no such kernel")

    def not_applicable(inp, ctx):
        raise NotApplicable("NumPy has no bfloat16")

    op = ops_mod.OPS["softmax_fwd"]
    inputs = _row_inputs("softmax_fwd", (3, 100), gen)
    ctx = Ctx(cpu, "float32", (3, 100))
    for builder, expected in [(raising_call, "fails: RuntimeError: Cannot launch: n exceeds 65536"),
                              (raising_build, "fails: ValueError: no such kernel"),
                              (not_applicable, "n/a: NumPy has no bfloat16")]:
        impl = Impl("x", "peer", lambda d: (True, ""), {"softmax_fwd": builder})
        res = runner.run_impl(op, impl, inputs, ctx, cpu, {})
        assert res["status"] == expected
        assert res["time_ms"] is None


def test_numpy_backend_bf16_is_not_applicable(cpu, gen):
    reg = impls_mod.build_registry(cpu)
    op = ops_mod.OPS["ce_loss_grad"]
    inputs = _row_inputs("ce_loss_grad", (4, 64), gen, dtype="bfloat16")
    res = runner.run_impl(op, reg["gpuloss-numpy"], inputs, Ctx(cpu, "bfloat16", (4, 64)), cpu, {})
    assert res["status"] == "n/a: NumPy has no bfloat16"


def test_inplace_implementation_gets_private_copies(cpu, gen):
    """An implementation that overwrites its logits (Liger, inplace_backward)
    must not corrupt the inputs the reference check and later rows read."""
    import torch.nn.functional as F

    def build(inp, ctx):
        x, t = inp["x"], inp["t"]

        def run():
            xr = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(xr, t)
            (g,) = torch.autograd.grad(loss, xr)
            x.copy_(g)  # gradient written over the logits
            return loss.detach(), x
        return run

    impl = Impl("inplace", "peer", lambda d: (True, ""), {"ce_loss_grad": build}, mutates_inputs=True)
    cpu.time_ms = lambda fn: (fn(), 1.0)[1]
    op = ops_mod.OPS["ce_loss_grad"]
    inputs = _row_inputs("ce_loss_grad", (6, 200), gen)
    before = inputs["x"].clone()
    res = runner.run_impl(op, impl, inputs, Ctx(cpu, "float32", (6, 200)), cpu, {})
    assert res["status"] == "ok", res
    assert torch.equal(inputs["x"], before)


def test_variant_environment_is_set_during_the_call_only(cpu, gen, monkeypatch):
    monkeypatch.delenv("GPULOSS_FAKE_VARIANT", raising=False)
    seen = []

    def build(inp, ctx):
        seen.append(("build", os.environ.get("GPULOSS_FAKE_VARIANT")))
        x = inp["x"]

        def run():
            seen.append(("run", os.environ.get("GPULOSS_FAKE_VARIANT")))
            return torch.softmax(x, -1)
        return run

    impl = Impl("gpuloss-fake[v2]", "gpuloss", lambda d: (True, ""), {"softmax_fwd": build},
                env={"GPULOSS_FAKE_VARIANT": "v2"})
    cpu.time_ms = lambda fn: (fn(), 1.0)[1]
    res = runner.run_impl(ops_mod.OPS["softmax_fwd"], impl, _row_inputs("softmax_fwd", (3, 50), gen),
                          Ctx(cpu, "float32", (3, 50)), cpu, {})
    assert res["status"] == "ok"
    assert seen and all(v == "v2" for _, v in seen)
    assert "GPULOSS_FAKE_VARIANT" not in os.environ


def test_backend_variants_become_implementations(cpu, monkeypatch):
    from gpuloss import dispatch

    class Fake:
        @staticmethod
        def variants():
            return ["twopass", "onchip"]

    monkeypatch.setattr(dispatch, "registered", lambda: ["fakebk"])
    monkeypatch.setattr(dispatch, "backend_status", lambda: {"fakebk": (True, "ok")})
    monkeypatch.setattr(dispatch, "get_backend", lambda name: Fake())
    made = {i.name: i for i in impls_mod.gpuloss_impls(cpu)}
    assert set(made) == {"gpuloss-fakebk[twopass]", "gpuloss-fakebk[onchip]", "gpuloss-fakebk-inplace"}
    assert made["gpuloss-fakebk[onchip]"].env == {"GPULOSS_FAKEBK_VARIANT": "onchip"}
    assert made["gpuloss-fakebk-inplace"].mutates_inputs
    assert set(made["gpuloss-fakebk-inplace"].builders) == {"ce_loss_grad"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU view of GPU implementations")
def test_gpu_implementations_listed_unavailable_on_cpu(cpu):
    reg = impls_mod.build_registry(cpu)
    avail = impls_mod.availability(reg, cpu)
    for name in ("gpuloss-triton", "gpuloss-cupy", "liger", "cupyx"):
        matches = [n for n in reg if n == name or n.startswith(name + "[")]
        assert matches, f"{name} not registered: {list(reg)}"
        for n in matches:
            ok, why = avail[n]
            assert not ok and why, (n, why)
    assert "CUDA" in avail["gpuloss-triton" if "gpuloss-triton" in avail else
                           next(n for n in avail if n.startswith("gpuloss-triton"))][1]
    assert avail["torch"][0] and avail["gpuloss-numpy"][0] and avail["scipy"][0]
    chosen = {i.name for i in runner.select_impls(reg, avail, None, cpu)}
    assert chosen == {"gpuloss-numpy", "gpuloss-numpy-inplace", "torch", "scipy"}
    # asked for explicitly, an unavailable one is still not run
    assert {i.name for i in runner.select_impls(reg, avail, ["liger", "torch*"], cpu)} == {"torch", "torch-compile"}


def test_registration_hook_adds_rows(cpu, gen, monkeypatch):
    """A later issue's op (fused linear CE, vocab-parallel CE) registers an
    Op and a builder on an existing implementation and gets rows."""
    op = ops_mod.Op("double", "x*2", "y", lambda shape, dtype: 2 * int(np.prod(shape)) * BYTES[dtype],
                    ops_mod._logits,
                    lambda out, inp, dtype, cache: ops_mod.compare(ops_mod.host64(out), 2 * ops_mod.host64(inp["x"]),
                                                                   dtype, "y"),
                    mutated=())
    monkeypatch.setitem(ops_mod.OPS, "double", op)
    impl = Impl("doubler", "peer", lambda d: (True, ""), {})
    monkeypatch.setitem(impls_mod.IMPLS, "doubler", impl)
    impls_mod.register_impl_op("doubler", "double", lambda inp, ctx: (lambda: inp["x"] * 2))
    cpu.time_ms = lambda fn: (fn(), 2.0)[1]
    args = runner.parse_args(["--device", "cpu", "--ops", "double", "--impls", "doubler", "--shapes", "4x64"])
    cpu.copy_bandwidth = lambda: (1e10, 1 << 20)
    meta, info, rows = runner.run_benchmark(args, cpu)
    assert [(r["impl"], r["status"]) for r in rows] == [("doubler", "ok")]
    assert rows[0]["gbps"] == pytest.approx(2 * 4 * 64 * 4 / 2e-3 / 1e9)


# --------------------------------------------------------------------------
# outputs and a small end-to-end run
# --------------------------------------------------------------------------

def test_end_to_end_cpu_run_writes_outputs(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = runner.main(["--device", "cpu", "--quick", "--shapes", "24x1000,sweep", "--sweep-v", "128,512",
                      "--sweep-elems", "4096", "--ops", "softmax_fwd,ce_loss_grad",
                      "--impls", "gpuloss-numpy,torch", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| ce_loss_grad | 8x512 | float32 | torch |")  # the table is last
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    for key in ("card", "date", "git_commit", "versions", "copy_bandwidth_Bps", "memory_method", "timing"):
        assert key in meta
    assert meta["copy_bandwidth_Bps"] > 1e8
    assert "torch" in meta["versions"] and "numpy" in meta["versions"]
    rows = data["rows"]
    shapes = {r["shape"] for r in rows}
    assert shapes == {"24x1000", "32x128", "8x512"}  # N = 4096 // V
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and 0 < r["frac_floor"] and r["mem_extra_bytes"] is not None
        assert r["check"]
    g = [r for r in rows if r["impl"] == "gpuloss-numpy"]
    assert all(set(r["speedups"]) == {"torch"} for r in g)
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {c["impl"] for c in csv_rows} == {"gpuloss-numpy", "torch"}
    assert (out / "table.md").read_text().count("\n| ") == len(rows) + 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # plots are optional; test_plots_need_sweep_rows covers them where it is installed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["gbps_ce_loss_grad_float32.png", "gbps_softmax_fwd_float32.png"]
    assert all((out / p).stat().st_size > 1000 for p in pngs)


def test_plots_need_sweep_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"op": "softmax_fwd", "shape": f"{1024 // v}x{v}", "dtype": "float32", "impl": i, "tag": "sweep",
             "status": "ok", "gbps": float(g)} for v in (64, 256, 1024) for i, g in (("a", 3.0), ("b", 5.0))]
    rows.append({**rows[0], "tag": "perf"})
    written = report.write_plots(str(tmp_path), rows, 1e10, "test card")
    assert [os.path.basename(p) for p in written] == ["gbps_softmax_fwd_float32.png"]
    assert report.write_plots(str(tmp_path / "none"), [r for r in rows if r["tag"] == "perf"], 1e10, "c") == []


def test_budget_marks_rows_skipped(cpu, tmp_path):
    args = runner.parse_args(["--device", "cpu", "--ops", "mse_loss_grad", "--impls", "torch", "--shapes",
                              "4x64,8x64", "--budget-s", "0"])
    cpu.copy_bandwidth = lambda: (1e10, 1 << 20)
    meta, info, rows = runner.run_benchmark(args, cpu)
    assert [r["status"] for r in rows] == ["skipped: time budget 0 s spent"] * 2
    assert all(r["gbps"] is None for r in rows)


def test_cli_rejects_unknown_names(cpu):
    cpu.copy_bandwidth = lambda: (1e10, 1 << 20)
    for argv in (["--ops", "nope"], ["--impls", "nope*"], ["--dtypes", "int7"], ["--shapes", "0x5"]):
        with pytest.raises((SystemExit, ValueError)):
            runner.run_benchmark(runner.parse_args(["--device", "cpu"] + argv), cpu)


def test_ci_script_is_valid_bash_and_needs_an_outdir():
    import subprocess
    script = os.path.join(os.path.dirname(__file__), "..", "ci", "gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    r = subprocess.run(["bash", script], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_ci_script_keeps_earlier_runs_and_verifies_only_what_it_tested(tmp_path):
    """ci/gpu.sh with CI_TESTS=0 CI_TUNE=1 filed the design table as verified by tests it did
    not run (TESTS_RC stays 0); a second call with the same OUTDIR overwrote the first's logs.
    A dry run on the CPU: no installs, no tests, no benchmark (tune.py stops: no CUDA)."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "ci", "gpu.sh")
    env = dict(os.environ, PYTHON=sys.executable, CI_SKIP_INSTALL="1", CI_TESTS="0", CI_BENCH="0", CI_TUNE="1",
               CI_TUNE_TIMEOUT="60", GPULOSS_COMMIT="abc1234")
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out"
    for _ in range(2):
        r = subprocess.run(["bash", script, str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert "total:" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "summary.txt").exists() and (out / "run2" / "summary.txt").exists()
    tune_cmd = (out / "tune.log").read_text().splitlines()[0]
    assert "--write-table" in tune_cmd and "--verified" not in tune_cmd, tune_cmd
    assert "commit abc1234" in (out / "env.log").read_text()


def test_interrupt_keeps_measured_rows(cpu, gen, monkeypatch):
    """CI stops a long benchmark with SIGINT: rows measured so far survive."""
    calls = []

    def build(inp, ctx):
        x = inp["x"]

        def run():
            calls.append(1)
            if len(calls) > 1 and ctx.shape[0] == 8:
                raise KeyboardInterrupt
            return torch.softmax(x, -1)
        return run

    monkeypatch.setitem(impls_mod.IMPLS, "intr", Impl("intr", "peer", lambda d: (True, ""), {"softmax_fwd": build}))
    cpu.time_ms = lambda fn: (fn(), 1.0)[1]
    cpu.copy_bandwidth = lambda: (1e10, 1 << 20)
    args = runner.parse_args(["--device", "cpu", "--ops", "softmax_fwd", "--impls", "intr", "--shapes",
                              "4x64,8x64,16x64"])
    meta, info, rows = runner.run_benchmark(args, cpu)
    assert [r["status"] for r in rows] == ["ok", "skipped: interrupted", "skipped: interrupted"]
    assert meta["interrupted"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_device_refused_without_gpu(cpu):
    with pytest.raises(RuntimeError, match="no CUDA device"):
        Device("cuda")
    cpu.route_cupy_allocations()  # a no-op on the CPU: must not touch CuPy's allocator
    assert not cpu._cupy_routed


def test_quick_gpu_preset_order_and_compile_rows():
    """--quick on a GPU: bf16 at the PERF.md shape first, then the bf16 sweep
    of the plotted anchors, then fp32; torch.compile only at named shapes."""
    entries = runner.resolve_shapes(None, runner.PRESETS["cuda"]["quick"])
    assert [(e.tag, e.dtypes) for e in entries] == [("perf", ("bfloat16",))] + [("sweep", ("bfloat16",))] * 3 + [
        ("perf", ("float32",))]
    assert all(e.shape[0] * e.shape[1] == 1 << 27 for e in entries if e.tag == "sweep")
    assert set(runner.QUICK_COMPILE_OPS) <= set(ops_mod.OPS)
    full = runner.resolve_shapes(None, runner.PRESETS["cuda"]["full"])
    assert [shape_ for shape_ in (e.shape for e in full if e.tag == "perf")] == [(8192, 32000), (16384, 128256),
                                                                              (4096, 262144)]
    sweep = [e.shape[1] for e in full if e.tag == "sweep"]
    assert sweep[0] == 1024 and sweep[-1] == 262144


@pytest.mark.parametrize("impl_name", ["gpuloss-numpy", "scipy"])
@pytest.mark.parametrize("op_name", list(ops_mod.OPS))
def test_cpu_implementations_pass_their_checks(impl_name, op_name, cpu, gen):
    """Every op's CPU builders (the public gpuloss API on the NumPy backend,
    and the SciPy peers) produce results the reference check accepts."""
    impl = impls_mod.build_registry(cpu)[impl_name]
    if op_name not in impl.builders:
        pytest.skip(f"{impl_name} has no {op_name}")
    shape = (9, 1037)
    inputs = _row_inputs(op_name, shape, gen)
    cpu.time_ms = lambda fn: (fn(), 1.0)[1]
    res = runner.run_impl(ops_mod.OPS[op_name], impl, inputs, Ctx(cpu, "float32", shape), cpu, {})
    assert res["status"] == "ok", res


def test_compare_scalar_reads_tensors_without_numpy():
    """The loss check must not hand a torch tensor to NumPy (a CUDA tensor
    cannot be read that way; a tensor that requires grad stands in here)."""
    torch = pytest.importorskip("torch")
    from gpuloss.bench.ops import compare_scalar
    loss = torch.tensor(2.0, dtype=torch.float32, requires_grad=True) * 1.0
    ok, detail = compare_scalar(loss, 2.0, "float32")
    assert ok, detail
    ok, detail = compare_scalar(loss, 2.5, "float32")
    assert not ok and "reference" in detail


def test_linear_ce_bench_checks_every_row_against_torch(monkeypatch):
    """bench/linear_ce.py marks a row WRONG where its errors exceed torch eager's: torch's row
    ran fourth, after the three gpuloss rows, which were never checked (a loss x 3 read "ok").
    On the CPU with the timing Device's CPU form."""
    import gpuloss
    from gpuloss.bench import linear_ce, timing
    real_device, real_lce = timing.Device, gpuloss.linear_cross_entropy
    monkeypatch.setattr(timing, "Device", lambda kind, quick=False: real_device("cpu", quick=True))
    monkeypatch.setattr(gpuloss, "linear_cross_entropy", lambda *a, **k: real_lce(*a, **k) * 3.0)
    _, rows = linear_ce.run(64, 32, 500, "float32", ["gpuloss", "torch"])
    status = {r["impl"]: r["status"] for r in rows}
    assert status["torch"] == "ok" and status["gpuloss"].startswith("WRONG: loss"), status
    monkeypatch.setattr(gpuloss, "linear_cross_entropy", real_lce)
    _, rows = linear_ce.run(64, 32, 500, "float32", ["gpuloss", "torch"])
    assert all(r["status"] == "ok" for r in rows), rows
    # "extra" is what issue 13's memory target counts: beyond the gradient outputs (grad_hidden, grad_weight)
    outputs = (64 + 500) * 32 * 4 / 2**30
    for r in rows:
        assert r["mem_peak_gib"] - r["mem_extra_gib"] == pytest.approx(min(r["mem_peak_gib"], outputs)), r


def test_host_time_bench_runs_without_a_gpu(tmp_path):
    """bench/host.py on the CPU: gpuloss's Triton path with no-op kernels, every
    case timed (in a subprocess: it replaces the Triton kernels of its process)."""
    import json
    import subprocess
    import sys
    env = dict(os.environ, GPULOSS_COMMIT="abc1234")
    r = subprocess.run([sys.executable, "-m", "gpuloss.bench.host", "--device", "cpu", "--calls", "20", "--out",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((tmp_path / "host.json").read_text())
    cases = {row["case"]: row["us"] for row in data["rows"]}
    assert {"ce loss", "ce return_grad", "ce autograd fwd+bwd", "torch ce loss"} <= set(cases)
    assert all(us > 0 for us in cases.values()) and "commit abc1234" in data["header"]
    assert "| ce return_grad |" in (tmp_path / "host.md").read_text()
