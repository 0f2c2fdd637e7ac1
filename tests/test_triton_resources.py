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


_LOADS_AFTER_LAST_BARRIER = """
import json, sys
import triton.language as tl
from gpuloss.bench import resources as R
kernel, constexprs, num_warps = json.loads(sys.argv[1])
cons = dict(PROB_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=False,
            DIV_ON_DEVICE=False, WANT_GRAD_TARGET=False, ACC=tl.float32, **constexprs)
spec = R.Spec("test", kernel, "float32", "in place", tuple(sorted(cons.items())), num_warps, 1, 32000)
ptx = R.compile_triton(spec, 90).asm["ptx"].splitlines()
last = max(i for i, ln in enumerate(ptx) if "bar.sync" in ln or "barrier.sync" in ln)
print(json.dumps([ln.strip() for ln in ptx[last + 1:] if "ld.global" in ln]))
"""


def _compiled(script: str, *args: str, timeout: int = 300):
    """The JSON that ``script`` prints last, run in a subprocess without
    TRITON_INTERPRET (the suite may run under the interpreter, where kernels do
    not compile)."""
    import json
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _ptx_after_last_barrier(kernel: str, constexprs: dict, num_warps: int) -> list:
    """The global loads after the last barrier of ``kernel``'s sm_90 PTX."""
    import json
    return _compiled(_LOADS_AFTER_LAST_BARRIER, json.dumps([kernel, constexprs, num_warps]))


def test_in_place_cross_entropy_reads_the_target_logit_before_a_barrier():
    """In place (gradient over the logits) every thread reads the target logit x_t before a
    block-wide barrier that precedes all gradient stores: after the last barrier, the only loads
    are a thread's own pass-2 elements (two-pass) or none (one read, whole row in registers).
    Read after it, x_t could already hold another warp's gradient for column t, and the row's
    loss would be computed from it.  Compiled for sm_90 offline."""
    import re
    block, warps = 1024, 4
    loads = _ptx_after_last_barrier("cross_entropy.cross_entropy_twopass_kernel",
                                    dict(BLOCK=block, WANT_GRAD=True, REVERSE=True), warps)
    elems = sum(int((re.search(r"\.v(\d)\.", ln) or [0, 1])[1]) for ln in loads)
    assert not [ln for ln in loads if ".b64" in ln], loads  # the target index
    assert elems == block // (32 * warps), loads  # pass 2's own elements, and not x_t
    loads = _ptx_after_last_barrier("cross_entropy.cross_entropy_onchip_kernel",
                                    dict(CHUNK=8192, SPLIT=1, SPLIT_P2=1, PACKED=False), 16)
    assert loads == [], loads


_SCALED_PTX = """
import json
from gpuloss.bench import resources as R
out = []
for spec in R.default_specs(90, dtypes=("float32", "float64"), cols=(1000,)):
    if dict(spec.constexprs).get("HAS_SOFTCAP") or spec.kernel == "kl_div.kl_div_logits_kernel":
        ptx = R.compile_triton(spec, 90).asm["ptx"]
        acc = "f64" if spec.dtype == "float64" else "f32"
        out.append([spec.kernel, spec.dtype, spec.label, ptx.count("mul.rn." + acc)])
print(json.dumps(out))
"""


def test_scaled_logits_are_rounded_products():
    """Kernels that scale their logits (softcap: z = cap tanh(x / cap); distillation:
    z = x / T) and subtract the row max of those z form each z with an explicit
    ``mul.rn`` (kernels/triton/common.py: rounded_mul): a plain product is contracted
    into the following subtraction (an fma of the unrounded product), so max - z_t
    is the product's rounding error where z_t is the max: -5.6e21 for a loss of 4.77
    at logits near 1e30 on an H200.  The interpreter cannot show it (NumPy rounds
    every product), so this reads the sm_90 PTX of every such default configuration,
    fp32 and fp64."""
    rows = _compiled(_SCALED_PTX, timeout=600)
    kernels = {r[0] for r in rows}
    assert {"cross_entropy.cross_entropy_twopass_kernel", "kl_div.kl_div_logits_kernel",
            "vocab_parallel.vocab_parallel_stats_kernel", "vocab_parallel.vocab_parallel_grad_kernel"} <= kernels, rows
    assert all(n > 0 for *_, n in rows), [r for r in rows if r[3] == 0]
