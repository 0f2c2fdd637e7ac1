"""Benchmark of the fused linear + cross-entropy (``gpuloss.linear_ce``) on one GPU.

``python -m gpuloss.bench.linear_ce --out DIR`` (well under a minute on an H100/H200)::

    hidden (N, H) @ weight (V, H).T -> cross-entropy, loss + grad_hidden + grad_weight
    default N=8192, H=4096, V=128256, bfloat16 (PERF.md's row)

Implementations (each one checked before it is timed):

* ``gpuloss`` / ``gpuloss-acc-bf16``: :func:`gpuloss.linear_ce.linear_cross_entropy`
  through autograd, fp32 (default) or in-GEMM bf16 accumulation of grad_weight;
* ``torch``: ``F.cross_entropy(F.linear(h, W), t)`` eager, and ``torch-compile`` of it;
* ``torch-chunked``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  where the installed torch has it;
* ``liger``: ``LigerFusedLinearCrossEntropyFunction`` when Liger-Kernel is installed.

Check: loss and both gradients against a float32 computation on the same
bf16 inputs; an implementation passes when its max error is at most 2x
torch eager's bf16 error plus 1e-3 of max|ref| (STYLE.md's rule).
Time: ``triton.testing.do_bench`` median (L2 flushed).  Memory: peak
``torch.cuda.max_memory_allocated`` during one call minus what was
allocated before it (outputs included).  Targets (PERF.md): time <= torch
eager's in the same run, extra memory <= 1.5 GiB.

Writes ``linear_ce.json`` and ``linear_ce.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

GIB = float(1 << 30)


def _impls(dtype) -> Dict[str, Callable[[], Optional[Callable]]]:
    """name -> factory returning fn(h, W, t) -> loss (or None if unavailable)."""
    import torch
    import torch.nn.functional as F

    def gpuloss_fn(acc32: bool):
        def make():
            from gpuloss.linear_ce import linear_cross_entropy
            return lambda h, W, t: linear_cross_entropy(h, W, t, accumulate_fp32=acc32)
        return make

    def torch_eager():
        return lambda h, W, t: F.cross_entropy(F.linear(h, W), t)

    def torch_compile():
        torch._dynamo.reset()
        return torch.compile(lambda h, W, t: F.cross_entropy(F.linear(h, W), t), dynamic=False)

    def torch_chunked():
        if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return None
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, W, t: F.linear_cross_entropy(h, W, t, options=opts)

    def liger():
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        except Exception:
            return None
        # Liger's argument order: (input, weight, target, ...)
        return lambda h, W, t: LigerFusedLinearCrossEntropyFunction.apply(h, W, t)

    return {"gpuloss": gpuloss_fn(True), "gpuloss-acc-bf16": gpuloss_fn(False), "torch": torch_eager,
            "torch-compile": torch_compile, "torch-chunked": torch_chunked, "liger": liger}


def _loss_and_grads(fn, h, W, t):
    import torch
    hh = h.detach().requires_grad_(True)
    ww = W.detach().requires_grad_(True)
    out = fn(hh, ww, t)
    loss = out[0] if isinstance(out, tuple) else out
    gh, gw = torch.autograd.grad(loss, (hh, ww))
    return loss.detach(), gh, gw


def _max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def run(N: int, H: int, V: int, dtype_name: str, only: Optional[List[str]] = None) -> Tuple[dict, List[dict]]:
    import torch
    from .timing import Device
    dev = Device("cuda")
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=dev.torch_device).manual_seed(int.from_bytes(os.urandom(4), "little"))
    h = torch.randn(N, H, device=dev.torch_device, generator=g).to(dtype)
    W = (torch.randn(V, H, device=dev.torch_device, generator=g) / H ** 0.5 * 2).to(dtype)
    t = torch.randint(0, V, (N,), device=dev.torch_device, generator=g)

    # float32 reference on the same (rounded) inputs
    ref = _loss_and_grads(lambda a, b, c: torch.nn.functional.cross_entropy(a @ b.t(), c), h.float(), W.float(), t)
    dev.free()
    scales = [float(r.abs().max()) for r in ref]
    rows: List[dict] = []
    torch_err = None
    for name, make in _impls(dtype).items():
        if only and name not in only:
            continue
        row: Dict[str, Any] = {"impl": name}
        try:
            fn = make()
            if fn is None:
                row["status"] = "n/a: not installed / not in this torch"
                rows.append(row)
                continue
            out = _loss_and_grads(fn, h, W, t)
            dev.sync()
            errs = [_max_err(o, r) for o, r in zip(out, ref)]
            del out
            row["max_err"] = errs
            if name == "torch":
                torch_err = errs
            row["status"] = "ok"
            if torch_err is not None:
                bad = [k for k, (e, te, s) in enumerate(zip(errs, torch_err, scales)) if e > 2 * te + 1e-3 * s]
                if bad:
                    row["status"] = "WRONG: " + ", ".join(("loss", "grad_hidden", "grad_weight")[k] for k in bad)
            if row["status"] == "ok":
                call = lambda: _loss_and_grads(fn, h, W, t)  # noqa: E731
                row["mem_extra_gib"] = dev.peak_extra_bytes(call) / GIB
                row["time_ms"] = dev.time_ms(call)
        except Exception as e:  # one failing implementation must not lose the others
            row["status"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        dev.free()
    tt = next((r.get("time_ms") for r in rows if r["impl"] == "torch"), None)
    for r in rows:
        if r["impl"].startswith("gpuloss") and r.get("time_ms") and tt:
            r["target_time"] = r["time_ms"] <= tt
            r["target_mem"] = r["mem_extra_gib"] <= 1.5
    meta = {**dev.describe(), "shape": f"N={N} H={H} V={V}", "dtype": dtype_name,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "torch": torch.__version__, "flops_3_matmuls": 6 * N * H * V}
    return meta, rows


def _table(meta: dict, rows: List[dict]) -> str:
    lines = [f"# fused linear + CE: {meta['shape']} {meta['dtype']}, {meta.get('card')} ({meta['date']})", "",
             "| impl | median ms | TFLOP/s (3 matmuls) | extra GiB | max err loss / gh / gw | status |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("time_ms")
        tf = f"{meta['flops_3_matmuls'] / (t * 1e-3) / 1e12:.0f}" if t else ""
        err = " / ".join(f"{e:.1e}" for e in r.get("max_err", []))
        mem = f"{r['mem_extra_gib']:.2f}" if r.get("mem_extra_gib") is not None else ""
        status = r["status"]
        if "target_time" in r:
            status += f" (time target {'met' if r['target_time'] else 'MISSED'}, " \
                      f"memory target {'met' if r['target_mem'] else 'MISSED'})"
        lines.append(f"| {r['impl']} | {t:.2f} | {tf} | {mem} | {err} | {status} |" if t else
                     f"| {r['impl']} |  |  | {mem} | {err} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuloss.bench.linear_ce", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8192x4096x128256", help="NxHxV (default 8192x4096x128256)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impls", help="comma list (default: all)")
    p.add_argument("--out", default=None, help="output folder (default bench/out/linear_ce-<date>)")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("linear_ce bench: needs a CUDA device", file=sys.stderr)
        return 2
    N, H, V = (int(x) for x in args.shape.lower().split("x"))
    meta, rows = run(N, H, V, args.dtype, args.impls.split(",") if args.impls else None)
    out = args.out or os.path.join("bench", "out", "linear_ce-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "linear_ce.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    table = _table(meta, rows)
    with open(os.path.join(out, "linear_ce.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
