#!/usr/bin/env bash
# The tests: set up, then run the whole suite on the CPU. The Triton kernels
# run in the interpreter (TRITON_INTERPRET=1); the CUDA C sources are compiled
# with nvcc when it is on the PATH; GPU-only tests are skipped with a reason.
# Extra arguments go to pytest; when one of them is a test file or directory,
# only those run (ci/test.sh tests/test_transformers.py -q), else all of tests/.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/ci/setup.sh" || exit 1
venv="${GPULOSS_VENV:-$root/.venv}"
cd "$root"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
targets=(tests)
for a in "$@"; do
  if [ -e "${a%%::*}" ]; then targets=(); break; fi
done
"$venv/bin/python" -m pytest "${targets[@]}" -q -rs -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "ci/test.sh: pytest collected no tests (exit 5): treated as a failure" >&2
  exit 1
fi
exit "$rc"
