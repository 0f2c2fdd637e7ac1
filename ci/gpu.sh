#!/usr/bin/env bash
# GPU CI: the whole test suite on every available backend, then the quick benchmark.
#
#   ci/gpu.sh OUTDIR
#
# For a machine with an NVIDIA GPU and no network.  Wheels that the machine
# lacks (Liger-Kernel, a pure-Python wheel) travel in .whl/ at the repo root,
# fetched beforehand on a machine with network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform any -d .whl liger-kernel==0.8.5 \
#       expecttest==0.3.0   # torch.testing._internal imports it (tests/test_torch_opinfo.py)
# .whl/ is git-ignored: a tool that copies the working tree to the GPU machine must be told to
# carry it (else every Liger row reads "n/a", silently).  The machine has no git metadata either:
# pass GPULOSS_COMMIT=<sha> so that logs and the design table name the commit.
#
# Writes into OUTDIR: env.log (GPU and versions), install.log, tests.log,
# bench.log, bench/ (results.csv, results.json, table.md, plots, host.md: host time per call),
# summary.txt.
# An OUTDIR that already holds a run's summary.txt gets the new run in OUTDIR/run2, run3, ...
# (the logs of the first run are kept).
# Exit status: the test suite's if it failed (the benchmark still runs), else
# the benchmark's.  Time limits (seconds, environment overrides):
#   CI_TEST_TIMEOUT  whole test suite        (default 270; it took 97 s and 133+ s on two H200s before
#                    tests/test_torch_opinfo.py joined it: torch's samples, not yet timed on a GPU)
#   CI_BENCH_BUDGET  benchmark rows started  (default 120; the run is stopped 60 s later)
# Switches: CI_TESTS=0 skips the test suite, CI_BENCH=0 the quick benchmark;
# CI_TUNE=1 adds the configuration sweep (bench/tune.py, CI_TUNE_TIMEOUT default
# 240 s) and writes the design table it implies to OUTDIR/tune/designs.json, its
# entries marked verified by this run only if the test suite passed (the suite
# runs every design the sweep can file: tests/test_triton_designs.py); review it,
# then copy it over gpuloss/tuned/designs.json and log the run in bench/RESULTS.md.
# GPULOSS_COMMIT names the commit sent (the machine has no git metadata).
# CI_LCE=1 adds the fused linear CE benchmark; CI_HF=1 the transformers
# integration (its GPU tests and bench/hf_step.py: a Llama training step
# unpatched / gpuloss / Liger, into OUTDIR/hf); CI_TEST_FILES chooses the test
# files (default: those that use the GPU).  The limits keep the script under
# 6 minutes without CI_TUNE.  CI_SKIP_INSTALL=1 skips the installs (a dry run
# of the script on a machine that already has them).
# The transformers check alone (meant to take under two minutes):
#   CI_TESTS=0 CI_BENCH=0 CI_HF=1 bash ci/gpu.sh OUTDIR
# Every device check in one 15-minute session (machine start included).  Measured on an H200
# (2026-11-30): ~65 s to start a machine; the first command 209 s (tests 98 s, benchmark + sweep
# 95 s), the second 100 s; issue the second while the first's machine is still warm (30 s):
#   GPULOSS_COMMIT=<sha> CI_BENCH_BUDGET=60 CI_TUNE=1 CI_TUNE_ARGS=--quick CI_TUNE_TIMEOUT=150 \
#       bash ci/gpu.sh OUTDIR                      # tests, quick benchmark, quick sweep (verified table)
#   GPULOSS_COMMIT=<sha> CI_TESTS=0 CI_BENCH=0 CI_LCE=1 CI_HF=1 bash ci/gpu.sh OUTDIR
# OUTDIR holds more files than a device tool may return (8): write it outside, tar it into the
# returned folder even when the script is stopped, e.g.
#   timeout 470 bash ci/gpu.sh /tmp/o >/tmp/o.log 2>&1; tar czf "$OUT/o.tgz" -C /tmp o o.log
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
if [ -e "$OUT/summary.txt" ]; then  # an earlier run's: keep it, write this one beside it
    n=2
    while [ -e "$OUT/run$n" ]; do n=$((n + 1)); done
    OUT="$OUT/run$n"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
TEST_TIMEOUT=${CI_TEST_TIMEOUT:-270}
BENCH_BUDGET=${CI_BENCH_BUDGET:-120}
T0=$(date +%s)

# every backend the machine can run: no restriction, no interpreter
unset GPULOSS_TEST_BACKENDS GPULOSS_BACKEND TRITON_INTERPRET GPULOSS_TRITON_VARIANT GPULOSS_CUPY_VARIANT

{
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), commit ${GPULOSS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo '?')}"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,clocks.max.mem,power.limit \
            --format=csv
        nvidia-smi -L
    else
        echo "nvidia-smi: not found"
    fi
} 2>&1 | tee "$OUT/env.log"

# --- install: offline wheels first (Liger-Kernel), then gpuloss itself -------
if [ "${CI_SKIP_INSTALL:-0}" = 1 ]; then
    echo "== installs skipped (CI_SKIP_INSTALL=1)" | tee "$OUT/install.log"
else {
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "== installing .whl/*.whl into /tmp/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && echo "ok: $(ls .whl)"
    fi
    # pyproject.toml needs setuptools >= 77 (the license as an SPDX expression); the
    # machine's own builds it, or a newer one carried in .whl (on the path first here:
    # this block runs in the pipe's subshell, the export below serves the rest)
    [ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "== pip install -e . (setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>&1))"
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . && echo ok \
        || echo "INSTALL FAILED: gpuloss.kernels and gpuloss.bench will not import (setuptools < 77? carry a wheel in .whl)"
} 2>&1 | tee "$OUT/install.log"
fi
if [ -d /tmp/site ]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.log"
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "scipy", "torch", "triton", "cupy", "liger_kernel", "transformers", "accelerate", "pytest",
             "expecttest", "gpuloss"):
    try:
        m = importlib.import_module(name)
        print(f"{name:13s}", getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:
        print(f"{name:13s} not importable: {type(e).__name__}: {e}")
try:
    import torch
    print("torch.cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    import gpuloss
    for k, v in gpuloss.backend_status().items():
        print(f"backend {k:8s}", "available" if v[0] else "UNAVAILABLE", "-", v[1])
except Exception as e:
    print("probe failed:", type(e).__name__, e)
EOF

# --- the test suite ----------------------------------------------------------
# The files that exercise a GPU; the CPU-only ones (reference, NumPy backend,
# packaging, nvcc/NVRTC compiles, the CPU benchmark, torch.compile on CPU)
# are CPU CI's job.  CI_TEST_FILES="tests" runs everything.
TEST_FILES=${CI_TEST_FILES:-"tests/test_api.py tests/test_backend_primitives.py tests/test_triton_backend.py tests/test_triton_offsets.py tests/test_triton_packed.py tests/test_triton_designs.py tests/test_cupy_backend.py tests/test_torch_autograd.py tests/test_torch_opcheck.py tests/test_torch_gpu.py tests/test_linear_ce.py tests/test_linear_acc.py tests/test_distributed.py tests/test_torch_opinfo.py"}
read -r -a FILES <<< "$TEST_FILES"
PYTEST_ARGS=("${FILES[@]}" -q -rs -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PYTEST_ARGS+=(--timeout=120)
fi
if "$PY" -c "import xdist" 2>/dev/null; then
    # kernels compile once per process (Triton's on-disk cache is shared): 8 workers
    PYTEST_ARGS+=(-n "${CI_TEST_WORKERS:-8}")
fi
T1=$(date +%s)
if [ "${CI_TESTS:-1}" = 1 ]; then
    echo "== pytest ${PYTEST_ARGS[*]} (limit ${TEST_TIMEOUT}s)" | tee "$OUT/tests.log"
    timeout --signal=INT --kill-after=15 "$TEST_TIMEOUT" "$PY" -m pytest "${PYTEST_ARGS[@]}" 2>&1 | tee -a "$OUT/tests.log"
    TESTS_RC=${PIPESTATUS[0]}
else
    echo "== test suite skipped (CI_TESTS=0)" | tee "$OUT/tests.log"
    TESTS_RC=0
fi
T2=$(date +%s)
if [ "$TESTS_RC" -eq 124 ] || [ "$TESTS_RC" -eq 137 ]; then
    echo "== tests stopped at the ${TEST_TIMEOUT}s limit" | tee -a "$OUT/tests.log"
fi

# --- the quick benchmark (runs whatever the tests said) ----------------------
BENCH_RC=0
if [ "${CI_BENCH:-1}" = 1 ]; then
    echo "== python -m gpuloss.bench --quick --budget-s $BENCH_BUDGET --out $OUT/bench" | tee "$OUT/bench.log"
    timeout --signal=INT --kill-after=15 $((BENCH_BUDGET + 60)) \
        "$PY" -m gpuloss.bench --quick --budget-s "$BENCH_BUDGET" --out "$OUT/bench" ${CI_BENCH_ARGS:-} 2>&1 \
        | tee -a "$OUT/bench.log"
    BENCH_RC=${PIPESTATUS[0]}
    # host time per call of the public functions against torch's (tiny tensors, ~10 s)
    echo "== python -m gpuloss.bench.host --calls 1000 --out $OUT/bench" | tee -a "$OUT/bench.log"
    GPULOSS_COMMIT=${GPULOSS_COMMIT:-} timeout --signal=INT --kill-after=15 "${CI_HOST_TIMEOUT:-60}" \
        "$PY" -m gpuloss.bench.host --calls 1000 --out "$OUT/bench" 2>&1 | tee -a "$OUT/bench.log"
fi
# optional: the launch-configuration sweep and the fused linear CE benchmark
if [ "${CI_TUNE:-0}" = 1 ]; then
    TUNE_TIMEOUT=${CI_TUNE_TIMEOUT:-240}
    COMMIT=${GPULOSS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
    CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo unknown-gpu)
    PASSED=$(grep -E "[0-9]+ passed" "$OUT/tests.log" | tail -1 | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//')
    TABLE_ARGS=(--write-table "$OUT/tune/designs.json" --suite "ci/gpu.sh tests on $CARD: ${PASSED:-?}")
    # verified only if this invocation ran the suite, it passed, and it ran every design the
    # sweep can file (CI_TESTS=0 leaves TESTS_RC 0 with nothing run)
    case " $TEST_FILES " in
        *test_triton_designs.py*|" tests "|" tests/ ") DESIGNS_RAN=1 ;;
        *) DESIGNS_RAN=0 ;;
    esac
    if [ "${CI_TESTS:-1}" = 1 ] && [ "$TESTS_RC" -eq 0 ] && [ "$DESIGNS_RAN" = 1 ]; then
        RUN_ID="$(echo "$CARD" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')-$(date -u +%Y-%m-%d)-$COMMIT"
        TABLE_ARGS+=(--verified "$RUN_ID")
    fi
    # rows stop starting 30 s before the limit, so that the table is written
    echo "== GPULOSS_COMMIT=$COMMIT python -m gpuloss.bench.tune --out $OUT/tune --budget-s $((TUNE_TIMEOUT - 30)) ${TABLE_ARGS[*]} ${CI_TUNE_ARGS:-}" | tee "$OUT/tune.log"
    GPULOSS_COMMIT=$COMMIT timeout --signal=INT --kill-after=15 "$TUNE_TIMEOUT" \
        "$PY" -m gpuloss.bench.tune --out "$OUT/tune" --budget-s $((TUNE_TIMEOUT - 30)) "${TABLE_ARGS[@]}" \
        ${CI_TUNE_ARGS:-} 2>&1 | tee -a "$OUT/tune.log"
fi
if [ "${CI_LCE:-0}" = 1 ]; then
    # the issue-13 shapes (8192x4096x128256, 16384x4096x262144) and the time budget of each part
    echo "== python -m gpuloss.bench.linear_ce --budget --out $OUT/lce" | tee "$OUT/lce.log"
    timeout --signal=INT --kill-after=15 "${CI_LCE_TIMEOUT:-180}" \
        "$PY" -m gpuloss.bench.linear_ce --budget --out "$OUT/lce" ${CI_LCE_ARGS:-} 2>&1 | tee -a "$OUT/lce.log"
fi
if [ "${CI_HF:-0}" = 1 ]; then
    echo "== transformers: pytest tests/test_transformers.py -m gpu; python -m gpuloss.bench.hf_step --out $OUT/hf" \
        | tee "$OUT/hf.log"
    timeout --signal=INT --kill-after=15 "${CI_HF_TEST_TIMEOUT:-60}" \
        "$PY" -m pytest tests/test_transformers.py -m gpu -q -rs -p no:cacheprovider 2>&1 | tee -a "$OUT/hf.log"
    HF_RC=${PIPESTATUS[0]}
    timeout --signal=INT --kill-after=15 "${CI_HF_TIMEOUT:-100}" \
        "$PY" -m gpuloss.bench.hf_step --out "$OUT/hf" ${CI_HF_ARGS:-} 2>&1 | tee -a "$OUT/hf.log"
    HF_BENCH_RC=${PIPESTATUS[0]}
    echo "== transformers: tests rc=$HF_RC, bench rc=$HF_BENCH_RC" | tee -a "$OUT/hf.log"
    if [ "$TESTS_RC" -eq 0 ] && [ "$HF_RC" -ne 0 ]; then
        TESTS_RC=$HF_RC
    fi
fi
T3=$(date +%s)

{
    echo "tests: rc=$TESTS_RC in $((T2 - T1)) s"
    echo "bench: rc=$BENCH_RC in $((T3 - T2)) s"
    if [ "${CI_HF:-0}" = 1 ]; then echo "transformers: tests rc=$HF_RC, bench rc=$HF_BENCH_RC"; fi
    echo "total: $((T3 - T0)) s"
    grep -E "[0-9]+ (passed|failed|error)" "$OUT/tests.log" | tail -1
} | tee "$OUT/summary.txt"

if [ "$TESTS_RC" -ne 0 ]; then
    exit "$TESTS_RC"
fi
exit "$BENCH_RC"
