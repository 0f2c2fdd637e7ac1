"""The built wheel carries the device code and imports in a clean venv."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("dist")
    # built from a copy: setuptools writes build/ and *.egg-info into the
    # source tree, which must stay as the caller left it (and two test runs
    # in one checkout would race there)
    src = tmp_path_factory.mktemp("src") / "gpuloss"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".hypothesis",
                                                             ".whl", ".out", "out"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (out / "build.log").write_text(r.stdout + r.stderr)
    wheels = list(out.glob("gpuloss-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_kernels_and_bench(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    cu = {n for n in names if n.startswith("gpuloss/kernels/cuda/") and n.endswith(".cu")}
    tr = {n for n in names if n.startswith("gpuloss/kernels/triton/") and n.endswith(".py")}
    src_cu = {p.name for p in (ROOT / "kernels" / "cuda").glob("*.cu")}
    src_tr = {p.name for p in (ROOT / "kernels" / "triton").glob("*.py")}
    assert {Path(n).name for n in cu} == src_cu
    assert {Path(n).name for n in tr} == src_tr
    assert "gpuloss/bench/__init__.py" in names
    assert "gpuloss/reference.py" in names and "gpuloss/cli.py" in names
    assert "gpuloss/integrations/transformers.py" in names
    assert "gpuloss/tuned/designs.json" in names  # the dispatcher's shipped design table
    assert {"gpuloss/distributed/__init__.py", "gpuloss/distributed/ops.py"} <= names
    assert not any(n.startswith(("kernels/", "bench/", "tests/")) for n in names)


def test_wheel_metadata_states_the_license_as_spdx(wheel):
    """The license is an SPDX expression (core metadata 2.4's License-Expression,
    PEP 639): setuptools deprecates the ``{ text = ... }`` table, with builds to
    fail once the deprecation runs out."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    headers = dict(line.split(": ", 1) for line in meta.split("\n\n", 1)[0].splitlines() if ": " in line)
    assert headers.get("License-Expression") == "BSD-3-Clause", meta[:800]
    assert "License" not in headers, meta[:800]


def test_wheel_builds_without_setuptools_warnings(wheel):
    """No deprecation or configuration warning from the build backend: each
    is a build that fails under a later setuptools (the license table; a
    data folder setuptools sees as a package missing from ``packages``)."""
    log = (wheel.parent / "build.log").read_text()
    assert "Warning" not in log, log[-3000:]


def test_wheel_imports_in_clean_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # numpy is the only dependency: take it from the index (or pip's cache)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True)
    if r.returncode != 0 and ("Could not find" in r.stderr or "connection" in r.stderr.lower()):
        pytest.skip(f"no package index to install numpy from: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    code = ("import sys, gpuloss, numpy as np, importlib.resources as ir;"
            "import gpuloss.kernels.cuda as kc;"
            "assert any(p.name.endswith('.cu') for p in ir.files(kc).iterdir());"
            "import gpuloss.integrations;"
            "assert not any(m in sys.modules for m in ('torch','triton','cupy','transformers'));"
            "out = gpuloss.cross_entropy(np.ones((2,3),np.float32), np.array([0,2]), return_grad=True);"
            "print(float(out.loss))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert abs(float(r.stdout.strip()) - 1.0986123) < 1e-5  # log(3): uniform logits
    r = subprocess.run([str(venv / "bin" / "gpuloss"), "info"], capture_output=True, text=True, cwd=str(tmp_path),
                       env=env)
    assert r.returncode == 0 and "numpy" in r.stdout, r.stdout + r.stderr


def test_compat_ci_covers_the_oldest_and_newest_admitted_versions():
    """ci/compat.sh tests the lower bounds of pyproject.toml's torch and
    triton extras and a newest pair inside the upper bounds, and numpy's lower
    bound beside a 2.x release: a range that admits a version CI never runs is
    a promise nobody checked."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    py = (root / "pyproject.toml").read_text()
    sh = (root / "ci" / "compat.sh").read_text()
    combos = re.search(r'GPULOSS_COMPAT_COMBOS:-"([^"]+)"', sh).group(1).split()
    pins = [dict(p.split("==") for p in c.split(",")) for c in combos]
    ver = lambda s: tuple(int(v) for v in s.split(".")[:2])  # noqa: E731
    for pkg in ("torch", "triton"):
        lo, hi = re.search(rf'"{pkg}>=([\d.]+),<([\d.]+)"', py).groups()
        tested = sorted(ver(p[pkg]) for p in pins)
        assert tested[0] == ver(lo), f"{pkg}: oldest tested {tested[0]} is not the lower bound {lo}"
        assert tested[-1] < ver(hi) and tested[-1][1] + 1 == ver(hi)[1], \
            f"{pkg}: newest tested {tested[-1]} is not the newest minor release below {hi}"
    # numpy (gpuloss's one dependency): its lower bound, a 1.x release (value-based scalar promotion), and a 2.x
    lo, hi = re.search(r'"numpy>=([\d.]+),<(\d+)"', py).groups()
    tested = sorted(ver(p["numpy"]) for p in pins if "numpy" in p)
    assert tested and tested[0] == ver(lo), f"numpy: oldest tested {tested[:1]} is not the lower bound {lo}"
    assert tested[-1][0] == int(hi) - 1, f"numpy: no {int(hi) - 1}.x release tested ({tested})"
