#!/usr/bin/env bash
# The tests: set up, then run the whole suite on the CPU. The Triton kernels
# run in the interpreter (TRITON_INTERPRET=1); the CUDA C sources are compiled
# with nvcc when it is on the PATH; GPU-only tests are skipped with a reason.
# Extra arguments go to pytest; when one of them is a test file or directory,
# only those run (ci/test.sh tests/test_transformers.py -q), else all of tests/.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GPULOSS_VENV:-$root/.venv}"
cd "$root"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
# the venvs are installed without byte-compiling (ci/setup.sh): the first import of a
# module writes its .pyc, which the suite's many Python processes (test subprocesses,
# the distributed tests' workers, the compat suite) then share; with
# PYTHONDONTWRITEBYTECODE set, each would compile torch's modules again
unset PYTHONDONTWRITEBYTECODE
# The oldest and newest torch/triton that pyproject.toml admits (ci/compat.sh), on
# the second core while the suite runs here; on by default for a plain run (CI),
# off when pytest arguments are given, GPULOSS_COMPAT=0/1 decides otherwise.
compat=${GPULOSS_COMPAT:-$([ $# -eq 0 ] && echo 1 || echo 0)}
if [ "$compat" = 1 ]; then
  # Two suites on two cores: one thread each for torch's and BLAS's OpenMP pools
  # (OMP_NUM_THREADS, unless set).  With a pool per core in each process, idle OpenMP
  # threads spin on the core the other suite needs: 1.7x the wall time of each
  # suite measured here (tests/test_edges.py + test_torch_autograd.py twice at once:
  # 67 s, 39 s with one thread; 37 s alone either way).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  # compat builds its venv while setup.sh builds the main one (both mostly unpack
  # wheels); it skips the Triton-only test files for the combination whose triton
  # the main suite runs (the same interpreter and compiler), which it reads from
  # this file once setup.sh is done
  main_triton_file=$(mktemp)
  export GPULOSS_COMPAT_MAIN_TRITON_FILE="$main_triton_file"
  compat_log=$(mktemp)
  bash "$root/ci/compat.sh" > "$compat_log" 2>&1 &
  compat_pid=$!
fi
if ! bash "$root/ci/setup.sh"; then
  if [ "$compat" = 1 ]; then
    echo "setup failed" > "$main_triton_file"  # compat stops at its wait, if it gets there
    kill "$compat_pid" 2>/dev/null
  fi
  exit 1
fi
if [ "$compat" = 1 ]; then
  "$venv/bin/python" -c 'import triton; print(triton.__version__)' > "$main_triton_file.new" 2>/dev/null \
    || echo "none" > "$main_triton_file.new"
  mv "$main_triton_file.new" "$main_triton_file"
fi
# test paths given as arguments run alone; other arguments (-k, -x, ...) apply to tests/
targets=(tests)
for a in "$@"; do
  if [ -e "${a%%::*}" ]; then targets=(); break; fi
done
"$venv/bin/python" -m pytest "${targets[@]}" -q -rs -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ci/test.sh: pytest collected no tests (exit 5): treated as a failure" >&2
  rc=1
fi
if [ "$compat" = 1 ]; then
  wait "$compat_pid"
  crc=$?
  echo "== ci/compat.sh: the oldest and newest torch and triton (exit $crc)"
  grep -v -e "^WARNING: Location" "$compat_log"
  rm -f "$compat_log" "$main_triton_file"
  [ "$crc" -ne 0 ] && rc=1
fi
exit "$rc"
