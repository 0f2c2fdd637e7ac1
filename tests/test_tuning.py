"""The design table (``gpuloss/tuning.py``, ``gpuloss/tuned/designs.json``)
and the writer in ``bench/tune.py``: no GPU needed.

A sweep's rows become table entries for the card's architecture, the fastest
configuration per (kernel, dtype, row-length class); they are used by the
lookup only when the run that wrote them is recorded as verified (the GPU
suite passed), and ``describe`` (for ``gpuloss info``) shows both kinds.
"""
from __future__ import annotations

import json

import pytest

from gpuloss import tuning


def _row(op, shape, dtype, config, ms, floor):
    return dict(op=op, shape=shape, dtype=dtype, config=config, status="ok", ms=ms, floor=floor, card="X")


ROWS = [
    _row("ce_loss_grad", "16384x128256", "bfloat16", "triton twopass", 3.0, 0.64),
    _row("ce_loss_grad", "16384x128256", "bfloat16", "triton packed", 2.4, 0.80),
    _row("ce_loss_grad", "8192x32000", "float32", "triton twopass", 0.70, 0.69),
    _row("ce_loss_grad", "8192x32000", "float32", "triton packed", 0.80, 0.60),
    _row("softmax_fwd", "8192x32000", "float32", "triton onchip whole-row", 0.50, 0.98),
    _row("softmax_fwd", "8192x32000", "float32", "triton twopass", 0.70, 0.70),
    _row("softmax_bwd", "8192x32000", "bfloat16", "cupy auto", 0.40, 0.90),
    # faster, but a variant the table cannot choose (GPULOSS_CUPY_VARIANT does)
    _row("softmax_bwd", "8192x32000", "bfloat16", "cupy staged", 0.30, 0.95),
    dict(op="ce_loss_grad", shape="4096x262144", dtype="bfloat16", config="triton packed", status="WRONG (x)"),
    _row("ce_loss", "16384x128256", "bfloat16", "triton twopass", 1.0, 0.9),  # decides no table kernel
]


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    tuning.reload()
    yield
    tuning.reload()


def test_shipped_table_is_valid_and_conservative(fresh_cache):
    """Only the looped kernels are verified (the full GPU suite at 97816fa);
    everything else in the shipped table is a candidate."""
    table = tuning.load_table()
    assert tuning.validate(table) == []
    for e in table["entries"]:
        if e.get("verified"):
            assert e["variant"] == "twopass" and e["verified"] in table["runs"]
    assert tuning.lookup(None, "cross_entropy", "bfloat16", 128256) == tuning.SAFE_DEFAULT
    assert tuning.lookup((8, 0), "softmax", "float32", 32000) == tuning.SAFE_DEFAULT


@pytest.mark.parametrize("verified", [None, "h200-test-run"])
def test_tune_writes_a_table_the_lookup_reads(tmp_path, monkeypatch, fresh_cache, verified):
    from gpuloss.bench.tune import write_table
    path = tmp_path / "designs.json"
    run = dict(card="NVIDIA H200", date="2026-12-01", commit="abc1234", suite="tests passed", record="-")
    table = write_table(ROWS, str(path), "sm_90", verified, run)
    assert tuning.validate(json.loads(path.read_text())) == []
    new = [e for e in table["entries"] if e.get("measured", {}).get("run", "").endswith(verified or "2026-12-01")]
    got = {(e["kernel"], e["dtype"], tuple(e["cols"])): (e["backend"], e["variant"], e["verified"]) for e in new}
    assert got == {("cross_entropy", "bfloat16", (32769, 131072)): ("triton", "packed", verified),
                   ("cross_entropy", "float32", (1, 32768)): ("triton", "twopass", verified),
                   ("softmax", "float32", (1, 32768)): ("triton", "onchip", verified),
                   ("softmax_backward", "bfloat16", (1, 32768)): ("cupy", "auto", verified)}
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    d = tuning.lookup((9, 0), "cross_entropy", "bfloat16", 128256)
    if verified:
        assert (d.variant, d.verified, d.source) == ("packed", verified, "table")
        assert tuning.lookup((9, 0), "softmax", "float32", 32000).config["chunk"] == 32768
        assert tuning.lookup((9, 0), "softmax_backward", "bfloat16", 32000).backend == "cupy"
        # classes the run did not measure keep the shipped entries
        assert tuning.lookup((9, 0), "cross_entropy", "bfloat16", 262144).variant == "twopass"
    else:
        # the shipped verified entries still answer; the new ones are candidates
        assert d.variant == "twopass" and d.verified != verified
    text = tuning.describe((9, 0), "NVIDIA H200")
    assert "sm_90" in text and ("packed" in text)
    if not verified:
        assert "candidates not yet verified" in text


def test_describe_without_a_device(fresh_cache):
    text = tuning.describe(None, "no CUDA device")
    assert "safe default" in text and "design table:" in text
    assert "twopass" in text


def test_dispatcher_puts_the_verified_backend_first(tmp_path, monkeypatch, fresh_cache):
    """The table's ``backend`` field orders the automatic choice on a GPU of
    that architecture; elsewhere (CPU, other archs, unverified rows) the
    fixed preference stands."""
    from gpuloss import dispatch
    from gpuloss.bench.tune import write_table
    path = tmp_path / "designs.json"
    run = dict(card="NVIDIA H200", date="2026-12-01", commit="abc1234", suite="tests passed", record="-")
    write_table(ROWS, str(path), "sm_90", "h200-test-run", run)
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    monkeypatch.setattr(tuning, "device_capability", lambda device: (9, 0))
    fixed = dispatch._PREFERENCE[("torch", "cuda")]
    assert fixed[0] == "triton"
    got = dispatch._auto_order("torch", "cuda:0", "softmax_backward", "bfloat16", 32000)
    assert got[0] == "cupy" and sorted(got) == sorted(fixed)
    assert dispatch._auto_order("torch", "cuda:0", "softmax_backward", "float32", 32000) == fixed
    assert dispatch._auto_order("torch", "cuda:0", "cross_entropy", "bfloat16", 128256)[0] == "triton"
    assert dispatch._auto_order("torch", "cuda:0", None, None, None) == fixed
    assert dispatch._auto_order("numpy", "cpu", "softmax_backward", "bfloat16", 32000) == \
        dispatch._PREFERENCE[("numpy", "cpu")]
    monkeypatch.setattr(tuning, "device_capability", lambda device: (8, 0))
    assert dispatch._auto_order("torch", "cuda:0", "softmax_backward", "bfloat16", 32000) == fixed
    # the Triton launcher does not take a cupy entry's variant as its own
    from gpuloss.backends.triton import config
    assert config.auto_design("softmax_backward", "bfloat16", 32000, (9, 0)) == tuning.SAFE_DEFAULT
    assert config.auto_design("softmax", "float32", 32000, (9, 0)).variant == "onchip"


def test_sweep_checks_and_times_every_op_on_the_cpu(monkeypatch):
    """bench/tune.py's sweep, run on CPU tensors with the NumPy backend at a
    tiny shape (timing stubbed): every op's check passes, so a GPU session
    does not find the sweep itself broken; a wrong result is reported, not timed."""
    torch = pytest.importorskip("torch")
    import time
    from gpuloss.bench import tune
    monkeypatch.setattr(tune, "SHAPES", [((8, 40), "float32")])
    monkeypatch.setattr(tune, "OPS", {k: None for k in tune.OPS})
    monkeypatch.setattr(tune, "_bench", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(tune, "configs", lambda: [("numpy", "numpy", {})])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = tune._sweep(tune._args(["--ops", ",".join(tune.OPS)]), "cpu", "CPU", 1e9, time.time())
    assert {r["op"] for r in rows} == set(tune.OPS)
    assert all(r["status"] == "ok" and r["ms"] == 1.0 for r in rows), rows
    real = tune._measure
    monkeypatch.setattr(tune, "_measure", lambda *a: (real(*a)[0], 1.0))  # a check that fails
    rows = tune._sweep(tune._args(["--ops", "ce_loss"]), "cpu", "CPU", 1e9, time.time())
    assert rows and all(r["status"].startswith("WRONG") and "ms" not in r for r in rows)


def test_lookups_are_answered_once_per_key_and_follow_the_table_in_use(tmp_path, monkeypatch, fresh_cache):
    """Every CUDA call looks its design up (dispatcher and launcher): the
    answer is cached per (table, arch, kernel, dtype, C); another table
    (GPULOSS_DESIGN_TABLE) answers from its own entries, and reload() forgets
    a table that changed on disk."""
    import json
    shipped = tuning.lookup((9, 0), "cross_entropy", "bfloat16", 128256)
    assert tuning.lookup((9, 0), "cross_entropy", "bfloat16", 128256) is shipped  # cached
    table = {"format": tuning.FORMAT, "runs": {"r1": {"card": "test"}},
             "entries": [{"arch": "sm_90", "kernel": "cross_entropy", "dtype": "bfloat16", "cols": [1, None],
                          "backend": "triton", "variant": "packed", "config": {}, "verified": "r1"}]}
    path = tmp_path / "designs.json"
    path.write_text(json.dumps(table))
    assert tuning.validate(table) == []
    monkeypatch.setenv(tuning.TABLE_ENV, str(path))
    assert tuning.lookup((9, 0), "cross_entropy", "bfloat16", 128256).variant == "packed"
    table["entries"][0]["variant"] = "twopass"
    path.write_text(json.dumps(table))
    assert tuning.lookup((9, 0), "cross_entropy", "bfloat16", 128256).variant == "packed"  # as read
    tuning.reload()
    assert tuning.lookup((9, 0), "cross_entropy", "bfloat16", 128256).variant == "twopass"
