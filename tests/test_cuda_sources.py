"""Compile every CUDA source the cupy backend uses, on the CPU (no GPU needed).

The source text (headers expanded), the defines and the flags come from
``gpuloss.backends.cupy.build`` itself, and every template instantiation the backend can
request (its name expressions) is instantiated, so a syntax error or a template error in a
rarely used instantiation fails CI.  Two compilers:

* nvcc (``--ptx`` for sm_80 and sm_90): the instantiations are forced by taking each kernel's
  address in host code; the PTX must then hold one ``.entry`` per name expression;
* NVRTC itself (the compiler CuPy uses at run time) when ``libnvrtc`` can be loaded, with the
  same ``addNameExpression`` calls CuPy makes.  NVRTC has no toolkit headers, so this also
  catches an include that only nvcc would find.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gpuloss.backends.cupy import build as cb_build

SOURCES = sorted(p.name for p in cb_build.kernel_dir().glob("*.cu"))
ARCHS = (80, 90)


def test_every_source_is_used():
    # a .cu file the backend never compiles would go untested on the GPU
    assert set(SOURCES) == set(cb_build.OP_SOURCES.values())


@pytest.fixture(scope="module")
def nvcc_jobs(tmp_path_factory):
    """Every (source, arch) compile started at once: nvcc is single-threaded
    and rows.cu instantiates a few hundred kernels, so running them side by
    side keeps this file to the time of the longest compile."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    tmp = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for source in SOURCES:
        for cc in ARCHS:
            names = cb_build.source_name_expressions(source, cc)
            text = cb_build.read_source(source)
            text += "\nvoid* gpuloss_instances[] = {\n" + ",\n".join(f"    (void*)&{n}" for n in names) + "\n};\n"
            cu = tmp / f"{cc}_{source}"
            cu.write_text(text)
            ptx = tmp / f"{cc}_{source}.ptx"
            proc = subprocess.Popen([nvcc, *cb_build.nvrtc_options(cc), f"-arch=sm_{cc}", "--ptx", str(cu), "-o", str(ptx)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            jobs[source, cc] = (proc, names, ptx)
    yield jobs
    for proc, _, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles(source, cc, nvcc_jobs):
    proc, names, ptx = nvcc_jobs[source, cc]
    assert names, f"no name expressions for {source}"
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-6000:]
    assert ptx.read_text().count(".entry ") == len(names)


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"NVRTC not loadable here ({type(e).__name__}); install nvidia-cuda-nvrtc to run this")


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("op", sorted(cb_build.OP_SOURCES))
def test_nvrtc_compiles(op, cc):
    nvrtc = _nvrtc()
    source = cb_build.OP_SOURCES[op]
    # one dtype per run keeps it short; every dtype is covered by the nvcc test above
    names = cb_build.name_expressions(op, "bfloat16", cc)
    prog = nvrtc.createProgram(cb_build.read_source(source), source, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, [*cb_build.nvrtc_options(cc), f"--gpu-architecture=sm_{cc}"])
        except nvrtc.NVRTCError as e:
            pytest.fail(f"{e}\n{nvrtc.getProgramLog(prog)[-6000:]}")
        lowered = {nvrtc.getLoweredName(prog, n) for n in names}
        assert len(lowered) == len(names)
    finally:
        nvrtc.destroyProgram(prog)


def test_sources_include_no_system_headers():
    # NVRTC ships no standard-library or CUDA toolkit headers: only our own .cuh may be included
    for p in cb_build.kernel_dir().iterdir():
        if p.suffix in (".cu", ".cuh"):
            for line in p.read_text().splitlines():
                if line.strip().startswith("#include"):
                    assert line.strip().endswith('.cuh"'), f"{p.name}: {line.strip()}"
