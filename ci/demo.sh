#!/usr/bin/env bash
# The main job: set up, then run the lecture's experiment (gpuloss demo).
# Extra arguments go to `gpuloss demo` (e.g. --epochs 50 --out curves.png).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/ci/setup.sh"
venv="${GPULOSS_VENV:-$root/.venv}"
exec "$venv/bin/gpuloss" demo "$@"
