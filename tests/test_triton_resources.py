"""No register spills in the Triton kernels' default configurations, nor in
the opt-in ones the tuning sweep times, checked offline (no GPU).

``python -m gpuloss.bench.resources --preset ci`` compiles, in one
subprocess, the row kernels in the configurations the launcher picks by
default for bf16, fp32 and fp64 rows at sm_80 and sm_90 (the largest blocks:
the register-heavy cases), and every configuration ``bench/tune.py`` sweeps
at PERF.md's shapes at sm_90, with Triton's bundled ptxas; it reads each
cubin with ``cuobjdump -res-usage`` and, where there is a stack frame, the
spill counts from ``ptxas -v``.  About 50 s with a cold Triton cache on two
cores, a few seconds warm.  The whole list (every kernel, dtype and row
class): ``python -m gpuloss.bench.resources --group all``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_default_and_swept_configurations_do_not_spill():
    pytest.importorskip("triton")
    import triton
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("Triton's bundled ptxas / cuobjdump are missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        out = subprocess.run([sys.executable, "-m", "gpuloss.bench.resources", "--preset", "ci"], env=env,
                             capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("the offline compilation took over 600 s")
    report = out.stdout + out.stderr
    spilling = [ln for ln in out.stdout.splitlines() if ln.endswith("SPILLS") or "FAILS" in ln]
    assert out.returncode == 0 and not spilling, "\n".join(spilling) or report[-3000:]
    assert " 0 that spill or fail" in out.stdout, report[-3000:]
    assert "sm_80" in out.stdout and "sm_90" in out.stdout and "packed" in out.stdout
