"""Compile every CUDA source the cupy backend uses, on the CPU (no GPU needed).

The source text (headers expanded), the defines and the flags come from
``gpuloss.backends.cupy.build`` itself, and every template instantiation the backend can
request (its name expressions) is instantiated, so a syntax error or a template error in a
rarely used instantiation fails CI.  Two compilers:

* nvcc (a cubin for sm_80 and for sm_90, ``-Xptxas -v``): the instantiations are forced by
  taking each kernel's address in host code; ptxas must then compile one entry per name
  expression, and none may spill (no stack frame, no spill stores or loads).  One nvcc
  invocation per (source, architecture) serves both checks; ``python -m
  gpuloss.bench.cuda_resources`` prints the same compile's resource table;
* NVRTC itself (the compiler CuPy uses at run time; CuPy has it build a cubin, so its own ptxas
  allocates the registers) when ``libnvrtc`` can be loaded, with the same ``addNameExpression``
  calls CuPy makes, and again no spills.  NVRTC has no toolkit headers, so this also catches an
  include that only nvcc would find.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from gpuloss.backends.cupy import build as cb_build
from gpuloss.bench import cuda_resources as cr

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
            text, names = cr.instantiation_source(source, cc)
            cu = tmp / f"{cc}_{source}"
            cu.write_text(text)
            # the intermediate files kept (-keep): test_scaled_logits_are_rounded_products reads the PTX
            keep = tmp / f"keep_{cc}_{source}"
            keep.mkdir()
            proc = subprocess.Popen(cr.nvcc_command(nvcc, cu, tmp / f"{cc}_{source}.cubin", cc)
                                    + ["-keep", "-keep-dir", str(keep)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            jobs[source, cc] = [proc, names, None, keep / (cu.stem + ".ptx")]
    yield jobs
    for proc, *_ in jobs.values():
        if proc.poll() is None:
            proc.kill()


def _finished(job):
    """(names, ptxas resources per entry) of a finished nvcc job; fails on a compile error."""
    proc, names, res, _ = job
    if res is None:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-6000:]
        job[2] = res = cr.parse_ptxas(err + out)
    return names, res


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles(source, cc, nvcc_jobs):
    names, res = _finished(nvcc_jobs[source, cc])
    assert names, f"no name expressions for {source}"
    assert len(res) == len(names), f"ptxas compiled {len(res)} entries for {len(names)} name expressions"


def _spill_report(res):
    bad = [r for r in res.values() if r.spills]
    shown = cr.demangle([r.name for r in bad])
    return "\n".join(f"{shown[r.name]}: {r.regs} registers, {r.stack} B stack, "
                     f"{r.spill_stores}/{r.spill_loads} B spilled" for r in bad)


@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_no_spills(source, cc, nvcc_jobs):
    """Zero spill stores / loads and no stack frame, in every kernel the backend can launch."""
    _, res = _finished(nvcc_jobs[source, cc])
    assert res and not any(r.spills for r in res.values()), _spill_report(res)


def test_parse_ptxas_reads_spills():
    """The parser sees a spill in both compilers' formats (a check on the check)."""
    nvcc_log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
                "ptxas info    : Function properties for _Z1kv\n"
                "    16 bytes stack frame, 20 bytes spill stores, 36 bytes spill loads\n"
                "ptxas info    : Used 32 registers, used 1 barriers, 16 bytes cumulative stack size, 672 bytes smem\n"
                "ptxas info    : Compiling entry function 'k2' for 'sm_90'\n"
                "ptxas info    : Function properties for k2\n"
                "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
                "ptxas info    : Used 12 registers\n")
    res = cr.parse_ptxas(nvcc_log)
    assert res["_Z1kv"].spills and (res["_Z1kv"].regs, res["_Z1kv"].spill_loads, res["_Z1kv"].smem) == (32, 36, 672)
    assert not res["k2"].spills and res["k2"].regs == 12 and res["k2"].smem == 0
    nvrtc_log = nvcc_log.replace("    16 bytes", "ptxas         .     16 bytes")
    assert cr.parse_ptxas(nvrtc_log)["_Z1kv"].spill_stores == 20


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
    options = cb_build.nvrtc_options(cc)
    if op == "staged":  # one module per (cluster size, dtype), as the backend builds them: the largest
        k = cb_build.staged_cluster_sizes(cc, tuple(nvrtc.getVersion()))[-1]
        options = cb_build.staged_options(cc, k, "bfloat16")
        names = [n for n in names if f"_k{k}_" in n]
    prog = nvrtc.createProgram(cb_build.read_source(source), source, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, [*options, f"--gpu-architecture=sm_{cc}", "--ptxas-options=-v"])
        except nvrtc.NVRTCError as e:
            pytest.fail(f"{e}\n{nvrtc.getProgramLog(prog)[-6000:]}")
        lowered = {nvrtc.getLoweredName(prog, n) for n in names}
        assert len(lowered) == len(names)
        res = cr.parse_ptxas(nvrtc.getProgramLog(prog))
        assert lowered <= set(res), "ptxas reported no resources for some kernels"
        assert not any(res[n].spills for n in lowered), _spill_report({n: res[n] for n in lowered})
    finally:
        nvrtc.destroyProgram(prog)


def test_sources_include_no_system_headers():
    # NVRTC ships no standard-library or CUDA toolkit headers: only our own .cuh may be included
    for p in cb_build.kernel_dir().iterdir():
        if p.suffix in (".cu", ".cuh"):
            for line in p.read_text().splitlines():
                if line.strip().startswith("#include"):
                    assert line.strip().endswith('.cuh"'), f"{p.name}: {line.strip()}"


@pytest.mark.parametrize("source", ["rows.cu", "staged.cu"])
def test_scaled_logits_are_rounded_products(source, nvcc_jobs):
    """The kernels that scale logits (softcap: z = cap tanh(x / cap); distillation: z = x / T)
    form z with an explicitly rounded multiply (``mul.rn``, which nvcc and NVRTC never fuse
    into a following add): with the default contraction, max - z_t is an fma of the unrounded
    product, the rounding error of z rather than 0 where z_t is the max (~1e22 in the loss at
    logits near 1e30; seen for Triton's kernels on an H200).  Read from the PTX of the sm_90
    compile above (the same source, options and instantiations)."""
    import re
    job = nvcc_jobs[source, 90]
    _finished(job)
    ptx = job[3]
    checked = 0
    for entry in re.split(r"\n\.visible \.entry ", ptx.read_text())[1:]:
        name = entry.split("(", 1)[0]
        if "cross_entropy" in name or "kl_div_logits" in name:
            acc = "f64" if "f64" in name else "f32"
            assert f"mul.rn.{acc}" in entry, f"{name}: z formed by a multiply the compiler may contract"
            checked += 1
    assert checked, "no cross-entropy or KL entry in the PTX"
