"""Launch-configuration sweep for the row kernels on one GPU, and the design
table it writes.

The runner (``bench/runner.py``) times each backend's *designs* against the
peers; this script times the *configurations* of those designs, so that one
GPU session can fill the design table (``gpuloss/tuned/designs.json``, read
by ``gpuloss.tuning``) from data:

* triton "twopass" (the looped kernels, the launcher's sizing);
* triton "onchip" with whole rows of up to 32768 in 32-warp programs (the
  fp32 candidate measured at 593cda8);
* triton "packed" (one read, 2-byte rows kept packed in registers, sized to
  not spill: ``PACKED_SIZING``);
* every cupy variant (``GPULOSS_CUPY_VARIANT``), and the staged variant's knobs.

Ops: cross-entropy loss + gradient (mean reduction; also in place at one
shape), CE loss only, softmax and log_softmax forward, softmax backward, at
PERF.md's shapes.  Each configuration is checked against torch in float32
(loss, and the gradient / output of a few rows) before it is timed; a wrong
one is reported as WRONG and not timed.  Times are
``triton.testing.do_bench`` medians with the L2 flushed; "floor" is the
fraction of the copy bandwidth measured at the start of the run (bytes read
+ written of a 2 GiB device-to-device copy).

    python -m gpuloss.bench.tune [--out DIR] [--quick] [--budget-s S]
    python -m gpuloss.bench.tune --out DIR --write-table DIR/designs.json --verified RUN_ID

``--write-table`` files the fastest configuration per (kernel, dtype, row
class) of this card into a copy of the shipped table.  ``--verified RUN_ID``
records that the GPU test suite passed in this same run, with every
configuration listed here exercised (``tests/test_triton_designs.py``); only
then does ``gpuloss.tuning`` use the entries.  ``ci/gpu.sh`` passes it only
when its test suite passed.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

SHAPES = [((8192, 32000), "float32"), ((8192, 32000), "bfloat16"),
          ((16384, 128256), "bfloat16"), ((4096, 262144), "bfloat16")]
QUICK_SHAPES = [((8192, 32000), "bfloat16"), ((16384, 128256), "bfloat16")]
#: the ops and the shapes they are timed at (None: every shape of the run)
OPS: Dict[str, Optional[List[Tuple[Tuple[int, int], str]]]] = {
    "ce_loss_grad": None,
    "softmax_fwd": None,
    "softmax_bwd": None,
    "log_softmax_fwd": [((8192, 32000), "bfloat16")],
    "ce_loss_grad_inplace": [((16384, 128256), "bfloat16")],
    "ce_loss": [((16384, 128256), "bfloat16"), ((8192, 32000), "float32")],
}
#: the ops the whole-row configuration is swept for: in cross-entropy and
#: softmax backward a 32768-element row in 1024 threads needs more than the
#: 64 registers a thread can have at that size, and spills (bench/resources.py)
WHOLE_ROW_OPS = ("softmax_fwd", "log_softmax_fwd")
#: which table kernel an op's timing decides (None: it decides none)
OP_KERNEL = {"ce_loss_grad": "cross_entropy", "softmax_fwd": "softmax", "softmax_bwd": "softmax_backward"}


@contextlib.contextmanager
def env(**kv: Optional[str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in kv}
    try:
        for k, v in kv.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def triton_configs() -> List[Tuple[str, Dict[str, str]]]:
    """(name, environment) of every Triton configuration swept: a static list
    (no GPU needed), shared with the GPU test that verifies each of them
    (tests/test_triton_designs.py) and the register report
    (``gpuloss.bench.resources --group variant``)."""
    V = "GPULOSS_TRITON_VARIANT"
    return [
        ("triton twopass", {V: "twopass"}),
        # whole rows (V <= 32768) in one program of 32 warps, as Liger's
        # single-block softmax; longer rows fall back to the looped kernels
        # (softmax forward only: WHOLE_ROW_OPS)
        ("triton onchip whole-row", {V: "onchip", "GPULOSS_TRITON_CHUNK": "32768",
                                     "GPULOSS_TRITON_MAX_CHUNK": "32768", "GPULOSS_TRITON_ONCHIP_WARPS": "32",
                                     "GPULOSS_TRITON_MAX_SPLIT": "1"}),
        # the launcher's PACKED_SIZING (per kernel and feature weight: fixed
        # sizes here would spill for class weights, softcap or fp32)
        ("triton packed", {V: "packed"}),
    ]


#: the design-table form of each Triton configuration: (variant, config)
TABLE_FORM = {
    "triton twopass": ("twopass", {}),
    "triton onchip whole-row": ("onchip", {"chunk": 32768, "num_warps": 32, "max_split": 1}),
    "triton packed": ("packed", {}),
}


def configs() -> List[Tuple[str, str, Dict[str, Optional[str]]]]:
    """(name, backend, environment) for every configuration available here."""
    import gpuloss
    out: List[Tuple[str, str, Dict[str, Optional[str]]]] = []
    st = gpuloss.backend_status()
    if st["triton"][0]:
        out += [(name, "triton", dict(kv)) for name, kv in triton_configs()]
    if st["cupy"][0]:
        be = gpuloss.get_backend("cupy")
        for v in getattr(be, "variants", lambda: [])():
            out.append((f"cupy {v}", "cupy", {"GPULOSS_CUPY_VARIANT": v}))
    out += cupy_staged_configs(st["cupy"][0])
    return out


def _table_form(name: str) -> Optional[Tuple[str, str, Dict[str, Any]]]:
    """(backend, variant, config) of a configuration, as a table entry."""
    if name in TABLE_FORM:
        variant, cfg = TABLE_FORM[name]
        return "triton", variant, dict(cfg)
    if name == "cupy auto":  # what the dispatcher runs when it picks cupy: its own variant choice
        return "cupy", "auto", {}
    return None  # other cupy variants are chosen by GPULOSS_CUPY_VARIANT, not by the table


def write_table(rows: List[Dict[str, Any]], path: str, arch: str, run_id: Optional[str],
                run: Dict[str, Any]) -> Dict[str, Any]:
    """The shipped table with this run's fastest configuration per (kernel,
    dtype, row class) of ``arch`` in place of the entries it measured;
    entries are ``verified`` by ``run_id`` only when given (the GPU suite
    passed in this run)."""
    from gpuloss import tuning
    with open(tuning.table_path()) as f:
        table = json.load(f)
    best: Dict[Tuple[str, str, Tuple[int, Optional[int]]], Dict[str, Any]] = {}
    for r in rows:
        kernel = OP_KERNEL.get(r["op"])
        if r.get("status") != "ok" or kernel is None or _table_form(r["config"]) is None:
            continue
        n = int(r["shape"].split("x")[1])
        key = (kernel, r["dtype"], tuning.row_class(n))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    rid = run_id or f"unverified-{run.get('card', '?')}-{run.get('date', '?')}"
    table["runs"] = dict(table.get("runs", {}))
    if run_id:
        table["runs"][run_id] = run
    keep = [e for e in table.get("entries", [])
            if (e["arch"], e["kernel"], e["dtype"], tuple(e["cols"])) not in
            {(arch, k, d, tuple(c)) for (k, d, c) in best}]
    for (kernel, dtype, cols), r in sorted(best.items(), key=lambda kv: str(kv[0])):
        backend, variant, cfg = _table_form(r["config"])
        keep.append(dict(arch=arch, kernel=kernel, dtype=dtype, cols=list(cols), backend=backend, variant=variant,
                         config=cfg, verified=run_id,
                         measured=dict(shape=r["shape"], floor=round(r["floor"], 3), ms=round(r["ms"], 4),
                                       run=rid, config=r["config"])))
    table["entries"] = keep
    errs = tuning.validate(table)
    if errs:
        raise ValueError("the table written would not validate: " + "; ".join(errs))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, ensure_ascii=False)
    return table


def _checks(x, t, N: int, V: int, dtname: str):
    """float32 torch references on a few rows, the exact mean loss, and the
    softmax-backward inputs."""
    import torch
    sub = torch.arange(0, N, max(N // 8, 1), device=x.device)
    xs = x[sub].float()
    ref: Dict[str, Any] = dict(sub=sub)
    ref["grad_rows"] = (torch.softmax(xs, 1) - torch.nn.functional.one_hot(t[sub], V).float()) / N
    ref["sm_rows"] = torch.softmax(xs, 1)
    ref["lsm_rows"] = torch.log_softmax(xs, 1)
    loss = 0.0
    for r0 in range(0, N, 2048):
        loss += float(torch.nn.functional.cross_entropy(x[r0:r0 + 2048].float(), t[r0:r0 + 2048], reduction="sum"))
    ref["loss"] = loss / N
    return ref


def _measure(op: str, backend: str, x, t, dy, ref, V: int) -> Tuple[Callable[[], object], float]:
    """(timed function, max relative error of its check)."""
    import torch
    import gpuloss
    sub = ref["sub"]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    if op in ("ce_loss_grad", "ce_loss_grad_inplace"):
        inplace = op.endswith("inplace")
        xx = x.clone() if inplace else x
        fn = lambda: gpuloss.cross_entropy(xx, t, return_grad=True, backend=backend,  # noqa: E731
                                           inplace_backward=inplace)
        out = fn()
        err = max(abs(float(out.loss) - ref["loss"]) / abs(ref["loss"]), rel(out.grad[sub].float(), ref["grad_rows"]))
        return fn, err
    if op == "ce_loss":
        fn = lambda: gpuloss.cross_entropy(x, t, backend=backend)  # noqa: E731
        return fn, abs(float(fn()) - ref["loss"]) / abs(ref["loss"])
    if op in ("softmax_fwd", "log_softmax_fwd"):
        log = op.startswith("log")
        f = gpuloss.log_softmax if log else gpuloss.softmax
        fn = lambda: f(x, dim=1, backend=backend)  # noqa: E731
        want = ref["lsm_rows"] if log else ref["sm_rows"]
        return fn, rel(fn()[sub].float(), want)
    if op == "softmax_bwd":
        y = torch.softmax(x.float(), 1).to(x.dtype)
        ys = y[sub].float()
        want = ys * (dy[sub].float() - (dy[sub].float() * ys).sum(1, keepdim=True))
        fn = lambda: gpuloss.softmax_backward(dy, y, dim=1, backend=backend)  # noqa: E731
        return fn, rel(fn()[sub].float(), want)
    raise ValueError(op)


def _floor_bytes(op: str, N: int, V: int, esz: int) -> int:
    if op == "ce_loss":
        return N * V * esz
    if op == "softmax_bwd":
        return 3 * N * V * esz
    return 2 * N * V * esz


def cupy_staged_configs(available: bool) -> List[Tuple[str, str, Dict[str, Optional[str]]]]:
    """The cupy staged variant's knobs (gpuloss.backends.cupy.staged.plan_staged): a smaller per-block slice
    (larger clusters, more buffers), fewer buffers in flight, fewer threads per block; "cupy
    staged" above is the default (64 KB slices, up to 4 buffers, ~4 vectors per thread)."""
    if not available:
        return []
    knobs = [("slice=16KB", {"GPULOSS_CUPY_STAGED_SLICE_KB": "16"}),
             ("slice=32KB", {"GPULOSS_CUPY_STAGED_SLICE_KB": "32"}),
             ("nbuf=2", {"GPULOSS_CUPY_STAGED_NBUF": "2"}),
             ("threads=512", {"GPULOSS_CUPY_STAGED_THREADS": "512"})]
    return [(f"cupy staged {name}", "cupy", {"GPULOSS_CUPY_VARIANT": "staged", **kv}) for name, kv in knobs]


def _args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m gpuloss.bench.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for tune.json")
    ap.add_argument("--quick", action="store_true", help="two bf16 shapes only")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--configs", default="*", help="glob over configuration names (e.g. 'triton packed*')")
    ap.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    ap.add_argument("--write-table", default=None, help="write the design table here")
    ap.add_argument("--verified", default=None,
                    help="run id to mark the written entries verified (only if the GPU suite passed in this run)")
    ap.add_argument("--suite", default="", help="what passed, for the table's runs record")
    return ap.parse_args(argv)


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _copy_bandwidth(dev) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    import torch
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    copy_ms = _bench(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (copy_ms * 1e-3)  # the buffers are freed on return


def _skip(op: str, name: str, V: int) -> bool:
    if op == "ce_loss" and name.startswith("triton") and name != "triton twopass":
        return True  # loss only: the looped kernel reads the row once whatever the variant
    # longer rows fall back to the looped kernels; CE and backward spill
    return name == "triton onchip whole-row" and (V > 32768 or op not in WHOLE_ROW_OPS)


def _time_config(row: Dict[str, Any], op: str, backend: str, kv, data, tol: float, copy_bw: float) -> None:
    """Check one configuration against the float32 references, then time it (fills ``row``)."""
    x, t, dy, ref = data
    N, V = x.shape
    with env(**kv):
        try:
            fn, err = _measure(op, backend, x, t, dy, ref, V)
            if not err <= tol:
                row.update(status=f"WRONG (max rel err {err:.2e})")
                return
            ms = _bench(fn)
            fb = _floor_bytes(op, N, V, x.element_size())
            row.update(status="ok", ms=ms, err=err, gbps=fb / (ms * 1e-3) / 1e9, floor=(fb / copy_bw) / (ms * 1e-3))
        except Exception as e:  # a config that cannot run is a result too
            row.update(status=f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


def _sweep(args, dev, card: str, copy_bw: float, t_start: float) -> List[Dict[str, Any]]:
    """The rows measured; an interrupt (the time limit's SIGINT) ends the sweep
    with the rows so far, so that tune.json and the table are still written."""
    rows: List[Dict[str, Any]] = []
    try:
        _sweep_rows(args, dev, card, copy_bw, t_start, rows)
    except KeyboardInterrupt:
        print(f"interrupted: {len(rows)} rows measured are kept", flush=True)
    return rows


def _sweep_rows(args, dev, card: str, copy_bw: float, t_start: float, rows: List[Dict[str, Any]]) -> None:
    import torch
    cfgs = [c for c in configs() if fnmatch.fnmatch(c[0], args.configs)]
    ops = [o for o in args.ops.split(",") if o]
    for (N, V), dtname in (QUICK_SHAPES if args.quick else SHAPES):
        torch.manual_seed(N + V)
        x = (torch.randn(N, V, device=dev) * 2).to(getattr(torch, dtname))
        t = torch.randint(0, V, (N,), device=dev)
        dy = torch.randn(N, V, device=dev).to(x.dtype) if "softmax_bwd" in ops else None
        data = (x, t, dy, _checks(x, t, N, V, dtname))
        tol = 2e-2 if dtname == "bfloat16" else 1e-4
        for op in ops:
            if OPS[op] is not None and ((N, V), dtname) not in OPS[op]:
                continue
            for name, backend, kv in cfgs:
                if _skip(op, name, V):
                    continue
                row = dict(op=op, shape=f"{N}x{V}", dtype=dtname, config=name, card=card)
                if args.budget_s is not None and time.time() - t_start > args.budget_s:
                    row.update(status="skipped: time budget")
                else:
                    _time_config(row, op, backend, kv, data, tol, copy_bw)
                rows.append(row)
                s = (f"{row['status']}" if row["status"] != "ok"
                     else f"{row['ms']:8.3f} ms  {row['gbps']:7.0f} GB/s  floor {row['floor']:.3f}")
                print(f"{op:20s} {row['shape']:>13s} {dtname:9s} {name:26s} {s}", flush=True)
                torch.cuda.empty_cache()
        del x, t, dy, data
        torch.cuda.empty_cache()


def main(argv: Optional[List[str]] = None) -> int:
    args = _args(argv)
    import torch
    if not torch.cuda.is_available():
        print("tune: needs a CUDA device", file=sys.stderr)
        return 2
    t_start = time.time()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    cap = torch.cuda.get_device_capability(dev)
    copy_bw = _copy_bandwidth(dev)
    torch.cuda.empty_cache()
    print(f"{card}: copy bandwidth {copy_bw / 1e12:.3f} TB/s", flush=True)
    rows = _sweep(args, dev, card, copy_bw, t_start)
    date = time.strftime("%Y-%m-%d")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump(dict(card=card, capability=list(cap), copy_bw=copy_bw, date=date, rows=rows), f, indent=1)
    if args.write_table:
        commit = os.environ.get("GPULOSS_COMMIT", "") or "unknown"
        run = dict(card=card, date=date, commit=commit, suite=args.suite or "-",
                   record=f"bench/RESULTS.md, tune.py run of {date} on {card}")
        table = write_table(rows, args.write_table, f"sm_{cap[0]}{cap[1]}", args.verified, run)
        print(f"design table written to {args.write_table}: {len(table['entries'])} entries, "
              f"{'verified by ' + args.verified if args.verified else 'NOT verified (no --verified run)'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
