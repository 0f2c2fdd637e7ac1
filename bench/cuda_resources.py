"""Registers, spills and shared memory of every CUDA kernel the cupy backend can launch.

ptxas reports them when nvcc builds a cubin (``-Xptxas -v``); no GPU is needed.  One nvcc
invocation per (source, architecture) instantiates every name expression the backend may
request (``gpuloss.backends.cupy.build.source_name_expressions``) with the backend's own defines, the same
compile that ``tests/test_cuda_sources.py`` runs to check that nothing spills.

    python -m gpuloss.bench.cuda_resources [--arch 80,90] [--source rows.cu] [--filter TEXT]

prints one line per kernel: registers per thread, stack frame, spill stores / loads (bytes),
static shared memory (bytes; the staged and onchip kernels add their dynamic shared memory at
launch, see ``gpuloss.backends.cupy.plan.plan_rows``).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ARCHS = (80, 90)


@dataclass(frozen=True)
class Resources:
    name: str          # mangled (or extern "C") name, as ptxas prints it
    regs: int
    stack: int         # stack frame bytes
    spill_stores: int
    spill_loads: int
    smem: int          # static shared memory bytes

    @property
    def spills(self) -> bool:
        return bool(self.stack or self.spill_stores or self.spill_loads)


def instantiation_source(source: str, cc: int) -> Tuple[str, List[str]]:
    """The source text with every name expression of ``source`` on ``cc`` forced into the
    object (their addresses taken in host code), and those expressions."""
    from gpuloss.backends.cupy import build as cb
    names = cb.source_name_expressions(source, cc)
    text = cb.read_source(source)
    text += "\nvoid* gpuloss_instances[] = {\n" + ",\n".join(f"    (void*)&{n}" for n in names) + "\n};\n"
    return text, names


def nvcc_command(nvcc: str, cu: Path, cubin: Path, cc: int, source: str = "") -> List[str]:
    from gpuloss.backends.cupy import build as cb
    return [nvcc, *cb.nvrtc_options(cc), f"-arch=sm_{cc}", "-cubin", "-Xptxas", "-v", str(cu), "-o", str(cubin)]


# nvcc prints "ptxas info : ..." lines; NVRTC's program log prefixes the properties with "ptxas ."
_PROPS = re.compile(r"Function properties for (\S+)\s*\n(?:ptxas\s+\.)?\s*(\d+) bytes stack frame, "
                    r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Compiling entry function '([^']+)'.*?Used (\d+) registers(?:, used \d+ barriers)?"
                   r"(?:, \d+ bytes cumulative stack size)?(?:, (\d+) bytes smem)?", re.S)


def parse_ptxas(log: str) -> Dict[str, Resources]:
    """Per entry function: what ``ptxas -v`` says of it (device functions called by an entry
    get a properties line too; only entries are returned)."""
    props = {m.group(1): tuple(int(g) for g in m.groups()[1:]) for m in _PROPS.finditer(log)}
    out: Dict[str, Resources] = {}
    # split per entry so a missing "smem" on one entry cannot borrow the next entry's
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", log):
        m = _USED.search(block)
        if not m:
            continue
        name = m.group(1)
        stack, st, ld = props.get(name, (0, 0, 0))
        out[name] = Resources(name=name, regs=int(m.group(2)), stack=stack, spill_stores=st, spill_loads=ld,
                              smem=int(m.group(3) or 0))
    return out


def demangle(names: Sequence[str]) -> Dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return {n: re.sub(r"\(.*$", "", d) for n, d in zip(names, lines)}


def compile_resources(source: str, cc: int, workdir: Path, nvcc: Optional[str] = None) -> Dict[str, Resources]:
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not on PATH")
    text, names = instantiation_source(source, cc)
    cu = workdir / f"{cc}_{source}"
    cu.write_text(text)
    proc = subprocess.run(nvcc_command(nvcc, cu, workdir / f"{cc}_{source}.cubin", cc, source),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-6000:])
    return parse_ptxas(proc.stderr + proc.stdout)


def table(rows: Dict[Tuple[str, int], Dict[str, Resources]], flt: str = "") -> str:
    lines = [f"{'arch':>6} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}  kernel"]
    for (source, cc), res in sorted(rows.items()):
        names = demangle(list(res))
        for mangled, r in sorted(res.items(), key=lambda kv: names[kv[0]]):
            if flt and flt not in names[mangled]:
                continue
            lines.append(f"sm_{cc:<3} {r.regs:>4} {r.stack:>5} {r.spill_stores:>5}/{r.spill_loads:<5} {r.smem:>6}  "
                         f"{names[mangled]}{'   <-- SPILLS' if r.spills else ''}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    import tempfile

    from gpuloss.backends.cupy import build as cb
    ap = argparse.ArgumentParser(prog="python -m gpuloss.bench.cuda_resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)))
    ap.add_argument("--source", default=None, help="one .cu file (default: all the backend compiles)")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = ap.parse_args(argv)
    sources = [args.source] if args.source else sorted(set(cb.OP_SOURCES.values()))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            for cc in (int(a) for a in args.arch.split(",")):
                rows[source, cc] = compile_resources(source, cc, Path(tmp))
    print(table(rows, args.filter))
    spilled = sum(r.spills for res in rows.values() for r in res.values())
    print(f"{sum(len(r) for r in rows.values())} kernels, {spilled} with a stack frame or spills")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
