"""The benchmark runner: ops x shapes x dtypes x implementations.

Usage (``gpuloss bench ...`` calls :func:`main` with the same arguments)::

    python -m gpuloss.bench                    # defaults for this machine
    python -m gpuloss.bench --quick --out DIR  # < 3 minutes on one GPU (CI)
    python -m gpuloss.bench --ops ce_loss_grad --shapes 8192x32000,sweep --dtypes bfloat16
    python -m gpuloss.bench --list             # ops, implementations, availability

For each row: every implementation is run once and its result checked
against the float64 reference (``WRONG: ...`` rows are not timed; an
implementation that raises is ``fails: <reason>``), then its peak extra
memory is measured over one call (on the CPU: the checked call itself), then
its median time.  GB/s counts the
op's floor bytes (``PERF.md``), and "floor" is the fraction of the copy
bandwidth measured at the start of the same run.  Every gpuloss row is
compared with every peer row of the same op, shape and dtype (speedup =
peer time / gpuloss time).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import ops as ops_mod
from .impls import Ctx, Impl, NotApplicable, availability, build_registry, canonical, env_vars
from .ops import OPS, parse_shape, shape_str

# --------------------------------------------------------------------------
# default shapes (PERF.md)
# --------------------------------------------------------------------------

_POW2_V = [1 << k for k in range(10, 19)]  # 1024 .. 262144

#: device -> preset -> (fixed shapes [(shape, ops or None)], sweep V list, sweep N*V, dtypes, budget s)
PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "cuda": {
        # PERF.md's shapes, and a sweep over V at N*V = 2**28 (1 GiB of fp32
        # logits: ~18x the H200's 60 MB L2, so every row streams from HBM)
        "full": dict(shapes=[("8192x32000", None), ("16384x128256", None), ("4096x262144", None)],
                     sweep_v=_POW2_V, sweep_elems=1 << 28, dtypes=["float32", "bfloat16"], budget_s=None),
        # one PERF.md shape, every op, both dtypes; then a three-point bf16
        # sweep at N*V = 2**27 (256 MiB bf16) of the two plotted anchors.
        # Stops starting new rows after budget_s so it ends within 3 minutes
        # whatever the compile times are (120 s of rows + start-up and copy
        # bandwidth ~15 s + the last row's compile <= 30 s + plots ~5 s).
        # Order is priority: bf16 at the PERF.md shape, the sweep, then fp32.
        "quick": dict(shapes=[("8192x32000", None, ("bfloat16",))], sweep_v=[4096, 32768, 131072],
                      sweep_elems=1 << 27, sweep_ops=("ce_loss_grad", "softmax_fwd"), sweep_dtypes=("bfloat16",),
                      after_sweep=[("8192x32000", None, ("float32",))],
                      dtypes=["bfloat16", "float32"], budget_s=120.0),
    },
    "cpu": {
        # PERF.md's CPU target (CE, 4096x32000 fp32) and a smaller sweep that
        # still exceeds the last-level cache (2**23 fp32 = 32 MiB)
        "full": dict(shapes=[("4096x32000", ("ce_loss", "ce_loss_grad")), ("1024x32000", None)],
                     sweep_v=[1024, 8192, 65536], sweep_elems=1 << 23, dtypes=["float32"], budget_s=None),
        "quick": dict(shapes=[("512x32000", None)], sweep_v=[1024, 16384], sweep_elems=1 << 22,
                      dtypes=["float32"], budget_s=60.0),
    },
}

#: torch.compile rows kept in --quick on a GPU (the PERF.md anchors, at the
#: named shapes only, not in the sweep): each compiled row costs seconds to
#: tens of seconds of inductor time
QUICK_COMPILE_OPS = ("ce_loss_grad", "softmax_fwd")


@dataclass
class ShapeEntry:
    shape: Tuple[int, ...]
    tag: str                                   # "perf" (a named shape) or "sweep"
    ops: Optional[Tuple[str, ...]] = None      # preset only: restrict to these ops
    dtypes: Optional[Tuple[str, ...]] = None   # preset only: restrict to these dtypes


def sweep_shapes(vs: Sequence[int], total: int, ops: Optional[Tuple[str, ...]] = None,
                 dtypes: Optional[Tuple[str, ...]] = None) -> List[ShapeEntry]:
    """Rows of length V at a fixed element count N*V (N = total // V, >= 1)."""
    return [ShapeEntry((max(1, total // v), v), "sweep", ops, dtypes) for v in vs]


def resolve_shapes(tokens: Optional[List[str]], preset: Dict[str, Any]) -> List[ShapeEntry]:
    """``--shapes`` tokens (``NxV`` or ``sweep``) or the preset's shapes (with
    the preset's op/dtype restrictions, which explicit ``--shapes`` drop)."""
    if not tokens:
        def fixed(entries):
            return [ShapeEntry(parse_shape(e[0]), "perf", e[1], e[2] if len(e) > 2 else None) for e in entries]
        return (fixed(preset["shapes"])
                + sweep_shapes(preset["sweep_v"], preset["sweep_elems"], preset.get("sweep_ops"),
                               preset.get("sweep_dtypes"))
                + fixed(preset.get("after_sweep", [])))
    out: List[ShapeEntry] = []
    for tok in tokens:
        if tok == "sweep":
            out += sweep_shapes(preset["sweep_v"], preset["sweep_elems"])
        else:
            out.append(ShapeEntry(parse_shape(tok), "perf"))
    return out


def _csv(s: Optional[str]) -> Optional[List[str]]:
    if s is None:
        return None
    return [p.strip() for p in s.split(",") if p.strip()]


_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                  "half": "float16", "fp64": "float64", "f64": "float64"}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpuloss bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run: < 3 minutes on one GPU")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--ops", help=f"comma list of ops (default all): {', '.join(OPS)}")
    p.add_argument("--shapes", help="comma list of NxV shapes and/or 'sweep' (default: the device's preset)")
    p.add_argument("--sweep-v", help="comma list of V for 'sweep' (default: the preset's)")
    p.add_argument("--sweep-elems", type=int, help="N*V of each sweep row (default: the preset's)")
    p.add_argument("--dtypes", help="comma list: float32, bfloat16, float16, float64 (default: the preset's)")
    p.add_argument("--impls", help="comma list of implementation names or globs (gpuloss-*, torch, liger, ...); "
                                   "default: every available one meant for this device")
    p.add_argument("--out", help="output folder (default bench/out/<date>-<host>)")
    p.add_argument("--budget-s", type=float, help="start no new row after this many seconds "
                                                   "(default: 120 with --quick on a GPU, 60 on the CPU, else none)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list ops and implementations with availability, then exit")
    return p.parse_args(argv)


# --------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------

def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for dist in ("gpuloss", "numpy", "scipy", "torch", "triton", "cupy-cuda13x", "cupy-cuda12x", "cupy",
                 "liger-kernel"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------
# running one row
# --------------------------------------------------------------------------

def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text[:200]


def run_impl(op, impl: Impl, inputs: Dict[str, Any], ctx: Ctx, device, cache: dict) -> Dict[str, Any]:
    """Run, check, measure and time one implementation on one row.

    Returns the row's result fields: ``status`` ("ok", "WRONG: ...",
    "fails: ...", "n/a: ..."), ``check``, ``time_ms``, ``mem_extra_bytes``.
    A wrong result is never timed."""
    res: Dict[str, Any] = {"status": "ok", "check": "", "time_ms": None, "mem_extra_bytes": None}
    with env_vars(impl.env):
        own = dict(inputs)
        if impl.mutates_inputs:
            # private copies of whatever the implementation may overwrite (the
            # reference checks read the pristine originals)
            for name in op.mutated:
                if name in own:
                    own[name] = own[name].clone()
        fn = out = None
        first_mem = None
        try:
            fn = impl.builders[op.name](own, ctx)
            if device.is_gpu:
                out = fn()  # first call: compiles, autotunes (its allocations are not the op's)
            else:
                # on the CPU the first call's memory is the op's: measure it
                # there and save a call (a 4096x32000 CE call takes seconds)
                kept: Dict[str, Any] = {}
                first_mem = device.peak_extra_bytes(lambda: kept.setdefault("out", fn()))
                out = kept["out"]
            device.sync()
            can = canonical(out, op.outputs, device)
        except NotApplicable as e:
            res["status"] = f"n/a: {e}"
            return res
        except Exception as e:
            res["status"] = f"fails: {_reason(e)}"
            return res
        try:
            ok, detail = op.check(can, inputs, ctx.dtype, cache)
        except Exception as e:
            ok, detail = False, f"check raised {_reason(e)}"
        del can, out
        res["check"] = detail
        if not ok:
            res["status"] = f"WRONG: {detail}"
            return res
        try:
            res["mem_extra_bytes"] = first_mem if first_mem is not None else device.peak_extra_bytes(fn)
            res["time_ms"] = device.time_ms(fn)
        except Exception as e:
            res["status"] = f"fails: {_reason(e)}"
            res["time_ms"] = None
        return res


def add_derived(rows: List[Dict[str, Any]], copy_bw: float) -> None:
    """GB/s (floor bytes / time), fraction of floor (floor time / time) and
    each gpuloss row's speedup against every peer row of its group."""
    for r in rows:
        t = r.get("time_ms")
        if r["status"] == "ok" and t:
            r["gbps"] = r["floor_bytes"] / (t * 1e-3) / 1e9
            r["frac_floor"] = (r["floor_bytes"] / copy_bw) / (t * 1e-3)
        else:
            r["gbps"] = r["frac_floor"] = None
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    for grp in groups.values():
        peers = [p for p in grp if p["group"] == "peer" and p.get("gbps")]
        for g in grp:
            if g["group"] == "gpuloss" and g.get("gbps"):
                g["speedups"] = {p["impl"]: p["time_ms"] / g["time_ms"] for p in peers}


class _Progress:
    def __init__(self, total: int):
        self.total, self.n = total, 0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
        except ImportError:
            self.bar = None

    def step(self, text: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_description_str(text[:60])
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def select_impls(reg: Dict[str, Impl], avail: Dict[str, Tuple[bool, str]], patterns: Optional[List[str]],
                 device) -> List[Impl]:
    """The implementations to run: matching ``--impls`` globs, else every
    available one whose defaults include this device."""
    chosen = []
    for name, impl in reg.items():
        if patterns:
            if not any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                continue
        elif device.kind not in impl.default_devices:
            continue
        if avail[name][0]:
            chosen.append(impl)
    return chosen


def _check_impl_patterns(patterns: Optional[List[str]], reg: Dict[str, Impl]) -> Optional[str]:
    for pat in patterns or ():
        if not any(fnmatch.fnmatchcase(n, pat) for n in reg):
            return f"--impls {pat!r} matches no implementation; known: {', '.join(reg)}"
    return None


def _plan_axes(args: argparse.Namespace, device):
    """(shapes, dtypes, op names, time budget) the arguments and the device's preset ask for."""
    preset = dict(PRESETS[device.kind]["quick" if args.quick else "full"])
    if args.sweep_v:
        preset["sweep_v"] = [int(v) for v in _csv(args.sweep_v)]
    if args.sweep_elems:
        preset["sweep_elems"] = args.sweep_elems
    shapes = resolve_shapes(_csv(args.shapes), preset)
    dtypes = [_DTYPE_ALIASES.get(d, d) for d in (_csv(args.dtypes) or preset["dtypes"])]
    for d in dtypes:
        if d not in ops_mod.CHECK_TOLERANCES:
            raise SystemExit(f"unknown dtype {d!r}")
    op_names = _csv(args.ops) or list(OPS)
    for o in op_names:
        if o not in OPS:
            raise SystemExit(f"unknown op {o!r}; known: {', '.join(OPS)}")
    budget = args.budget_s if args.budget_s is not None else preset["budget_s"]
    return shapes, dtypes, op_names, budget


def _plan(shapes, dtypes, op_names, impls, quick: bool, device) -> list:
    """(shape entry, dtype, op, implementations) for every measurement to make."""
    plan = []
    for se in shapes:
        for dtype in dtypes:
            for op_name in op_names:
                if (se.ops is not None and op_name not in se.ops) or (se.dtypes is not None and dtype not in se.dtypes):
                    continue
                todo = [i for i in impls if op_name in i.builders and not (
                    quick and device.is_gpu and i.name == "torch-compile"
                    and (op_name not in QUICK_COMPILE_OPS or se.tag == "sweep"))]
                if todo:
                    plan.append((se, dtype, OPS[op_name], todo))
    return plan


class _Measure:
    """The rows of a plan, measured in order within a time budget; an
    interrupt (Ctrl-C, CI's time limit) keeps what was measured."""

    def __init__(self, device, budget: Optional[float], total: int):
        import torch
        self.device, self.budget = device, budget
        self.gen = torch.Generator(device=device.torch_device)
        self.gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
        self.rows: List[Dict[str, Any]] = []
        self.progress = _Progress(total)
        self.t_start = time.monotonic()
        self.interrupted = False

    def spent(self) -> bool:
        return self.budget is not None and time.monotonic() - self.t_start > self.budget

    def entry(self, se, dtype: str, op, todo) -> None:
        """Every implementation of one (op, shape, dtype) on one set of inputs."""
        base = {"op": op.name, "shape": shape_str(se.shape), "dtype": dtype, "tag": se.tag,
                "floor_bytes": int(op.floor_bytes(se.shape, dtype))}
        inputs = None
        if not (self.interrupted or self.spent()):
            try:
                inputs = op.make_inputs(se.shape, dtype, self.device.torch_device, self.gen)
            except Exception as e:  # e.g. out of memory at the largest shapes
                for impl in todo:
                    self.rows.append({**base, "impl": impl.name, "group": impl.group,
                                      "status": f"fails: making inputs: {_reason(e)}"})
                    self.progress.step(f"{op.name} {base['shape']} {dtype} {impl.name}")
                self.device.free()
                return
        cache: dict = {}
        ctx = Ctx(device=self.device, dtype=dtype, shape=se.shape)
        for impl in todo:
            self.progress.step(f"{op.name} {base['shape']} {dtype} {impl.name}")
            row = {**base, "impl": impl.name, "group": impl.group}
            row.update(self._one(op, impl, inputs, ctx, cache))
            self.rows.append(row)
        del inputs, cache
        self.device.free()

    def _one(self, op, impl, inputs, ctx, cache) -> Dict[str, Any]:
        if self.interrupted:
            return {"status": "skipped: interrupted"}
        if inputs is None or self.spent():
            return {"status": f"skipped: time budget {self.budget:g} s spent"}
        try:
            return run_impl(op, impl, inputs, ctx, self.device, cache)
        except KeyboardInterrupt:
            self.interrupted = True
            print("interrupted: writing the rows measured so far", file=sys.stderr)
            return {"status": "skipped: interrupted"}
        except Exception as e:  # a runner bug must not lose the other rows
            traceback.print_exc(file=sys.stderr)
            return {"status": f"fails: runner error {_reason(e)}"}

    def run(self, plan) -> None:
        try:
            for se, dtype, op, todo in plan:
                self.entry(se, dtype, op, todo)
        except KeyboardInterrupt:
            self.interrupted = True
            print("interrupted: writing the rows measured so far", file=sys.stderr)
        finally:
            self.progress.close()


def run_benchmark(args: argparse.Namespace, device) -> Tuple[Dict[str, Any], Dict[str, Any], List[Dict[str, Any]]]:
    """Run the plan; returns (meta, implementations, rows)."""
    shapes, dtypes, op_names, budget = _plan_axes(args, device)
    reg = build_registry(device)
    patterns = _csv(args.impls)
    err = _check_impl_patterns(patterns, reg)
    if err:
        raise SystemExit(err)
    avail = availability(reg, device)
    impls = select_impls(reg, avail, patterns, device)
    if device.is_gpu and any(i.name.startswith("gpuloss-cupy") or i.name == "cupyx" for i in impls):
        device.route_cupy_allocations()

    print(f"device: {device.name()}", file=sys.stderr)
    copy_bw, copy_bytes = device.copy_bandwidth()
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s (copy of {copy_bytes / 2**20:.0f} MiB, read+write)",
          file=sys.stderr)
    plan = _plan(shapes, dtypes, op_names, impls, bool(args.quick), device)
    m = _Measure(device, budget, sum(len(t) for *_, t in plan))
    m.run(plan)
    add_derived(m.rows, copy_bw)

    meta = {
        **device.describe(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "git_commit": _git_commit(),
        "versions": _versions(),
        "copy_bandwidth_Bps": copy_bw,
        "copy_bytes": copy_bytes,
        "timing": ("triton.testing.do_bench median, L2 flushed before each call" if device.is_gpu
                   else "time.perf_counter median of repeated calls after one warm-up"),
        "memory_method": device.mem_method,
        "quick": bool(args.quick),
        "interrupted": m.interrupted,
        "budget_s": budget,
        "elapsed_s": round(time.monotonic() - m.t_start, 1),
        "args": vars(args),
        "check_tolerances": ops_mod.CHECK_TOLERANCES,
    }
    impl_info = {name: {"available": ok, "reason": why, "group": reg[name].group, "notes": reg[name].notes,
                        "selected": any(i.name == name for i in impls)}
                 for name, (ok, why) in avail.items()}
    return meta, impl_info, m.rows


def default_out_dir() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("bench", "out", f"{stamp}-{socket.gethostname()}")


def _list(device) -> int:
    reg = build_registry(device)
    avail = availability(reg, device)
    print("ops:")
    for op in OPS.values():
        print(f"  {op.name:16s} {op.title}")
    print(f"implementations on {device.kind}:")
    for name, (ok, why) in avail.items():
        default = "default" if device.kind in reg[name].default_devices else "on request"
        print(f"  {name:28s} {'available' if ok else 'unavailable':11s} {default:10s} {why}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the benchmark; returns the process exit status (0 unless the run
    itself could not happen; WRONG and failing rows are reported, not fatal)."""
    args = parse_args(argv)
    from .timing import Device
    import torch
    kind = args.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    device = Device(kind, quick=args.quick)
    if args.list:
        return _list(device)

    out_dir = args.out or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    meta, impl_info, rows = run_benchmark(args, device)

    from . import report
    copy_bw = meta["copy_bandwidth_Bps"]
    report.write_csv(os.path.join(out_dir, "results.csv"), rows)
    report.write_json(os.path.join(out_dir, "results.json"), meta, impl_info, rows)
    table = report.format_table(rows, copy_bw, meta)
    unavailable = [f"  {n}: {i['reason']}" for n, i in impl_info.items() if not i["available"]]
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plots:
        try:
            plots = report.write_plots(out_dir, rows, copy_bw, meta["card"])
            print(f"plots: {len(plots)} written" if plots else "plots: no sweep rows to plot", file=sys.stderr)
        except ImportError as e:
            print(f"plots skipped: matplotlib missing ({e})", file=sys.stderr)
    if unavailable:
        print("unavailable implementations:\n" + "\n".join(unavailable))
    print(f"results in {out_dir} (results.csv, results.json, table.md)")
    print()
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
