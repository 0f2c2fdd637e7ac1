#!/usr/bin/env bash
# The oldest and the newest torch and triton that pyproject.toml admits, on the
# tests whose outcome depends on their versions: the torch integration (custom
# ops, autograd, torch.compile, nn, the vocabulary-parallel operators over gloo),
# the Triton kernels in the interpreter and compiled ahead of time for
# sm_80/sm_90, the edge cases against torch; and the oldest and newest numpy
# (gpuloss's one dependency) on the NumPy-facing API tests.
#
#   ci/compat.sh [pytest args]
#
# One extra venv (GPULOSS_COMPAT_VENV, default .venv-compat) holds the CUDA
# runtime libraries that torch's Linux wheels import (they are never used on a
# CPU); each combination then swaps in its torch and triton wheels and runs the
# test files.  GPULOSS_COMPAT_COMBOS overrides the combinations
# ("torch==A,triton==B[,numpy==C] ..."), GPULOSS_COMPAT_TESTS the test files.  Under ci/test.sh,
# a combination with the main suite's triton skips the Triton-only files, which the
# main suite runs (GPULOSS_COMPAT_MAIN_TRITON_FILE: where ci/test.sh writes the main
# venv's triton version once its setup is done; waited for before the first run).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GPULOSS_COMPAT_VENV:-$root/.venv-compat}"
py="${PYTHON:-python3}"
# newest first (installed with its dependencies), then the oldest; keep in step with the
# torch and triton extras and the numpy dependency of pyproject.toml (numpy: optional
# third field; NumPy 1.x promotes scalars by value, 2.x does not)
combos=${GPULOSS_COMPAT_COMBOS:-"torch==2.14.1,triton==3.9.0,numpy==2.4.6 torch==2.11.0,triton==3.6.0,numpy==1.26.4"}
triton_only="tests/test_triton_backend.py tests/test_triton_offsets.py tests/test_triton_packed.py tests/test_triton_resources.py"
tests=${GPULOSS_COMPAT_TESTS:-"$triton_only tests/test_torch_compile.py tests/test_torch_opcheck.py tests/test_torch_autograd.py tests/test_torch_nn.py tests/test_torch_inplace.py tests/test_edges.py tests/test_linear_ce.py tests/test_linear_ce_torch_api.py tests/test_distributed.py tests/test_autocast.py tests/test_linear_acc.py tests/test_torch_opinfo.py tests/test_api.py tests/test_numpy_backend.py tests/test_error_contract.py tests/test_reference.py"}
# as in ci/test.sh: imports write the .pyc that pip, installing with --no-compile as in
# ci/setup.sh (each combination's torch and triton would be byte-compiled whole), did not
unset PYTHONDONTWRITEBYTECODE
pip_q() { "$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" ; return "${PIPESTATUS[0]}"; }

stamp="$venv/.gpuloss-compat-v1"
if [ ! -f "$stamp" ]; then
  echo "compat: creating $venv"
  rm -rf "$venv"
  "$py" -m venv "$venv" || exit 1
  pip_q --upgrade "pip>=23" "setuptools>=77,<82" wheel || exit 1
  # the newest torch with its dependencies (its CUDA runtime libraries, which the
  # older torch wheels load as well); the others are swapped in without theirs
  first_torch=${combos%%,*}
  pip_q "$first_torch" "numpy>=1.26,<3" scipy "pytest>=7" "hypothesis>=6" || exit 1
  touch "$stamp"
fi

"$venv/bin/python" -c "import expecttest" 2>/dev/null || pip_q "expecttest>=0.2" || exit 1

main_triton=""
if [ -n "${GPULOSS_COMPAT_MAIN_TRITON_FILE:-}" ]; then
  waited=0
  while [ ! -s "$GPULOSS_COMPAT_MAIN_TRITON_FILE" ] && [ "$waited" -lt 1800 ]; do
    sleep 2
    waited=$((waited + 2))
  done
  main_triton=$(cat "$GPULOSS_COMPAT_MAIN_TRITON_FILE" 2>/dev/null)
  if [ "$main_triton" = "setup failed" ]; then
    echo "compat: the main setup failed; not running" >&2
    exit 1
  fi
fi

rc=0
for combo in $combos; do
  IFS=, read -r want_torch want_triton want_numpy <<< "$combo"
  echo "compat: $want_torch $want_triton $want_numpy"
  # shellcheck disable=SC2086
  pip_q --no-deps "$want_torch" "$want_triton" $want_numpy || { echo "compat: cannot install $combo" >&2; rc=1; continue; }
  if ! pip_q --no-build-isolation --no-deps -e "$root" > "$venv/install.log" 2>&1; then
    cat "$venv/install.log" >&2
    rc=1
    continue
  fi
  got=$("$venv/bin/python" -c 'import torch, triton; print(torch.__version__.split("+")[0], triton.__version__)')
  echo "compat: running with torch ${got% *}, triton ${got#* }, numpy $("$venv/bin/python" -c 'import numpy; print(numpy.__version__)')"
  run_tests=$tests
  if [ "$main_triton" = "${got#* }" ] && [ -z "${GPULOSS_COMPAT_TESTS:-}" ]; then
    # ci/test.sh's main suite runs the Triton-only files with this triton already
    run_tests=$(for f in $tests; do case " $triton_only " in *" $f "*) ;; *) printf '%s ' "$f" ;; esac; done)
    echo "compat: the Triton-only files run in the main suite with triton ${got#* }: not again here"
  fi
  # shellcheck disable=SC2086
  (cd "$root" && TRITON_INTERPRET=1 "$venv/bin/python" -m pytest $run_tests -q -p no:cacheprovider "$@")
  r=$?
  if [ "$r" -eq 5 ]; then
    echo "compat: pytest collected no tests (exit 5) with $combo" >&2
    r=1
  fi
  [ "$r" -ne 0 ] && rc=1
done
exit "$rc"
