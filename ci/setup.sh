#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs gpuloss
# with everything the demo, the tests and the CPU benchmark need.
#   GPULOSS_VENV   where the venv lives (default: .venv in the repo root)
# torch is pinned to the CPU build 2.13.0 (the extras admit 2.11-2.14) and
# triton to 3.6.0, the version on our GPU machines, so that the interpreter
# tests here run the same Triton as the GPU suite there; transformers likewise
# (5.17, the GPU machines' version) with accelerate for its Trainer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GPULOSS_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$py" -m venv "$venv"
fi
# --no-compile: pip byte-compiles every module of every package it installs (torch,
# transformers, scipy, ...: a minute of CPU here, of which the tests import a small
# part); Python compiles what is imported, on first import (ci/test.sh lets it keep those)
pip_q() { "$venv/bin/python" -m pip install -q --no-compile --disable-pip-version-check "$@"; }
stamp="$venv/.gpuloss-setup-v4"
if [ ! -f "$stamp" ]; then
  echo "setup: installing dependencies (first run only)"
  pip_q --upgrade "pip>=23" "setuptools>=77" wheel
  pip_q "torch==2.13.0"
  # ml_dtypes: NumPy bfloat16 arrays, which gpuloss takes as NumPy arrays (tests/test_numpy_backend.py)
  pip_q "triton==3.6.0" "numpy>=1.26,<3" scipy "pytest>=7" "hypothesis>=6" "scikit-learn>=1.3" \
        "matplotlib>=3.7" tqdm build ml_dtypes
  # gpuloss[transformers]: the integration's tests (tests/test_transformers.py)
  pip_q "transformers==5.17.*" "accelerate==1.15.*"
  # CuPy imports without a GPU: its host code (DLPack paths, compile options) is tested
  # here, and NVRTC compiles the CUDA sources exactly as CuPy will on the GPU
  pip_q "cupy-cuda13x>=14" "nvidia-cuda-nvrtc==13.0.*" \
    || echo "setup: cupy-cuda13x / NVRTC not installed; their host-code and compile tests will skip"
  touch "$stamp"
fi
# torch's own test samples (tests/test_torch_opinfo.py): torch.testing._internal imports expecttest
"$venv/bin/python" -c "import expecttest" 2>/dev/null || pip_q "expecttest>=0.2"
pip_q --no-build-isolation --no-deps -e "$root"
echo "setup: ready ($("$venv/bin/python" -c 'import gpuloss, numpy; print("gpuloss", gpuloss.__version__, "numpy", numpy.__version__)'))"
