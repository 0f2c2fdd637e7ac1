"""Benchmark of the fused linear + cross-entropy (``gpuloss.linear_cross_entropy``) on one GPU.

``python -m gpuloss.bench.linear_ce --out DIR`` (about a minute per shape on an H100/H200)::

    input (N, H) @ linear_weight (V, H).T -> cross-entropy, loss + grad_input + grad_weight
    default shapes: N=8192 H=4096 V=128256 and N=16384 H=4096 V=262144, bfloat16

Implementations (each one checked before it is timed):

* ``gpuloss`` / ``gpuloss-acc-bf16`` / ``gpuloss-acc-split``: :func:`gpuloss.linear_cross_entropy`
  through autograd, fp32 (default), in-GEMM bf16, or the split float32 accumulation
  (``acc_dtype="float32_split"``: the bf16 gradient plus a V x H int16 buffer, the
  Triton GEMM of ``kernels/triton/linear_acc.py``) of grad_weight;
* ``torch``: ``F.cross_entropy(F.linear(h, W), t)`` eager, and ``torch-compile`` of it;
* ``torch-lce`` / ``torch-lce-chunked``: torch's own ``F.linear_cross_entropy``,
  unchunked (``options=None``) and chunked (``LinearCrossEntropyOptions()``), where the
  installed torch has it;
* ``liger``: ``LigerFusedLinearCrossEntropyFunction`` when Liger-Kernel is installed.

The floor is the three matmuls (``6 N H V`` flops) at the bf16 GEMM rate measured in
the same run (an ``(N, H) @ (H, V)`` product); each row reports its fraction of it.
``--budget`` also times the parts of one gpuloss call (logits GEMM, CE kernel,
grad_input GEMM, grad_weight GEMM with its accumulation) over the same chunks.

Check: loss and both gradients against a float32 computation on the same
bf16 inputs; an implementation passes when its max error is at most 2x
torch eager's bf16 error plus 1e-3 of max|ref| (STYLE.md's rule).
Time: ``triton.testing.do_bench`` median (L2 flushed).  Memory: peak
``torch.cuda.max_memory_allocated`` during one call minus what was
allocated before it, minus the gradient outputs (grad_hidden and
grad_weight in the operands' dtype): "extra GiB", what issue 13's target
counts; "peak GiB" keeps the outputs in.  Targets (PERF.md): time <= torch
eager's in the same run, extra memory <= 1.5 GiB.  ``--profile`` lists the
device time of one call by kernel (torch.profiler): GEMMs, the CE kernel,
the rest.

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

    def gpuloss_fn(acc: str):
        def make():
            from gpuloss import linear_cross_entropy
            if acc == "split" and dtype != torch.bfloat16:  # the split halves are bf16's
                return None
            return lambda h, W, t: linear_cross_entropy(
                h, W, t, acc_dtype={"fp32": None, "bf16": W.dtype, "split": "float32_split"}[acc])
        return make

    def torch_eager():
        return lambda h, W, t: F.cross_entropy(F.linear(h, W), t)

    def torch_compile():
        torch._dynamo.reset()
        return torch.compile(lambda h, W, t: F.cross_entropy(F.linear(h, W), t), dynamic=False)

    def torch_lce(chunked: bool):
        def make():
            if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
                return None
            opts = torch.nn.LinearCrossEntropyOptions() if chunked else None
            return lambda h, W, t: F.linear_cross_entropy(h, W, t, options=opts)
        return make

    def liger():
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        except Exception:
            return None
        # Liger's argument order: (input, weight, target, ...)
        return lambda h, W, t: LigerFusedLinearCrossEntropyFunction.apply(h, W, t)

    return {"gpuloss": gpuloss_fn("fp32"), "gpuloss-acc-bf16": gpuloss_fn("bf16"),
            "gpuloss-acc-split": gpuloss_fn("split"), "torch": torch_eager,
            "torch-compile": torch_compile, "torch-lce": torch_lce(False), "torch-lce-chunked": torch_lce(True),
            "liger": liger}


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
    # torch eager first: its errors are the bar every other row's are checked against
    for name, make in sorted(_impls(dtype).items(), key=lambda kv: kv[0] != "torch"):
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
                peak = dev.peak_extra_bytes(call)
                outputs = (N + V) * H * torch.empty((), dtype=dtype).element_size()  # grad_hidden, grad_weight
                row["mem_peak_gib"] = peak / GIB
                row["mem_extra_gib"] = max(0, peak - outputs) / GIB
                row["time_ms"] = dev.time_ms(call)
        except Exception as e:  # one failing implementation must not lose the others
            row["status"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
        dev.free()
    gemm_ms = dev.time_ms(lambda: h @ W.t())
    rate = 2 * N * H * V / (gemm_ms * 1e-3)  # flop/s of the bf16 GEMM, this run
    floor_ms = 6 * N * H * V / rate * 1e3
    peers = [r["time_ms"] for r in rows if not r["impl"].startswith("gpuloss") and r.get("time_ms")]
    best_peer = min(peers) if peers else None
    for r in rows:
        if r.get("time_ms"):
            r["floor_fraction"] = floor_ms / r["time_ms"]
        if r["impl"].startswith("gpuloss") and r.get("time_ms"):
            r["target_time"] = best_peer is None or r["time_ms"] <= 0.95 * best_peer
            r["target_floor"] = r["floor_fraction"] >= 0.85
            r["target_mem"] = r["mem_extra_gib"] <= 1.5
    meta = {**dev.describe(), "shape": f"N={N} H={H} V={V}", "dtype": dtype_name,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "torch": torch.__version__, "flops_3_matmuls": 6 * N * H * V,
            "gemm_tflops": rate / 1e12, "floor_ms": floor_ms, "best_peer_ms": best_peer}
    return meta, rows


def budget(N: int, H: int, V: int, dtype_name: str, chunk: Optional[int] = None) -> List[dict]:
    """Where one gpuloss call's time goes: each part timed alone over the
    same chunks as the call (logits GEMM, the CE kernel in place, the
    grad_input GEMM, the grad_weight GEMM accumulated in fp32)."""
    import torch
    import gpuloss
    from gpuloss._linear_chunks import default_chunk_size
    from .timing import Device
    dev = Device("cuda")
    dtype = getattr(torch, dtype_name)
    n = chunk or default_chunk_size(N, V, torch.empty((), dtype=dtype).element_size(), "cuda")
    chunks = -(-N // n)
    h = torch.randn(n, H, device="cuda").to(dtype)
    W = (torch.randn(V, H, device="cuda") / H ** 0.5).to(dtype)
    t = torch.randint(0, V, (n,), device="cuda")
    z = torch.empty(n, V, device="cuda", dtype=dtype)
    acc = torch.zeros(V, H, device="cuda", dtype=torch.float32)
    gh = torch.empty(n, H, device="cuda", dtype=dtype)
    torch.mm(h, W.t(), out=z)
    parts = {
        "logits GEMM": lambda: torch.mm(h, W.t(), out=z),
        "CE kernel (in place)": lambda: gpuloss.cross_entropy(z, t, reduction="sum", inplace_backward=True,
                                                               return_grad=True),
        "grad_input GEMM": lambda: torch.mm(z, W, out=gh),
        "grad_weight GEMM + fp32 accumulate": lambda: acc.add_(torch.mm(z.t(), h)),
    }
    if hasattr(torch.ops.aten.addmm, "dtype_out"):
        parts["grad_weight GEMM, fp32 epilogue (dtype_out)"] = \
            lambda: torch.ops.aten.addmm.dtype_out(acc, z.t(), h, torch.float32, out=acc)
    if dtype == torch.bfloat16:  # acc_dtype="float32_split": the Triton GEMM adding to the two halves
        from gpuloss.backends.triton.linear_acc import split_acc_matmul
        hi, lo = torch.zeros(V, H, device="cuda", dtype=dtype), torch.zeros(V, H, device="cuda", dtype=torch.int16)
        parts["grad_weight GEMM + split fp32 accumulate (Triton)"] = lambda: split_acc_matmul(z, h, hi, lo, False)
    rows = [{"part": k, "ms_per_chunk": dev.time_ms(f), "chunks": chunks} for k, f in parts.items()]
    for r in rows:
        r["ms_total"] = r["ms_per_chunk"] * chunks
    return rows


#: kernel-name fragments -> the part of a call they belong to (first match wins)
_KERNEL_PARTS = (("split_acc", "grad_weight split GEMM (Triton)"), ("cross_entropy", "CE kernel"),
                 ("gemm", "GEMM"), ("nvjet", "GEMM"), ("xmma", "GEMM"), ("cutlass", "GEMM"),
                 ("triton", "other Triton"), ("", "other (copies, casts, reductions)"))


def profile(N: int, H: int, V: int, dtype_name: str, impls=("gpuloss", "gpuloss-acc-split", "torch-compile")) -> str:
    """Device time of one call of each of ``impls`` by kernel (torch.profiler,
    after one warm-up call): the parts of the call as they really run, where
    ``budget`` times each part alone."""
    import torch
    from torch.profiler import ProfilerActivity
    dtype = getattr(torch, dtype_name)
    h = torch.randn(N, H, device="cuda").to(dtype)
    W = (torch.randn(V, H, device="cuda") / H ** 0.5 * 2).to(dtype)
    t = torch.randint(0, V, (N,), device="cuda")
    out = [f"# one call by kernel: N={N} H={H} V={V} {dtype_name} (torch.profiler, device time)", ""]
    table = _impls(dtype)
    for name in impls:
        fn = table[name]()
        if fn is None:
            continue
        _loss_and_grads(fn, h, W, t)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
            _loss_and_grads(fn, h, W, t)
            torch.cuda.synchronize()
        parts: Dict[str, float] = {}
        top = []
        for e in prof.key_averages():
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue  # CPU-side ops and runtime calls: their kernels are listed under their own names
            us = float(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0) or 0.0)
            part = next(p for frag, p in _KERNEL_PARTS if frag in e.key.lower())
            parts[part] = parts.get(part, 0.0) + us / 1e3
            top.append((us / 1e3, e.count, e.key[:90]))
        out.append(f"## {name}: {sum(parts.values()):.2f} ms of kernels")
        out += [f"- {p}: {ms:.2f} ms" for p, ms in sorted(parts.items(), key=lambda kv: -kv[1])]
        out += [f"  - {ms:.2f} ms, {n} launches: {k}" for ms, n, k in sorted(top, reverse=True)[:8]]
        out.append("")
        del fn
        torch.cuda.empty_cache()
    return "\n".join(out)


def _table(meta: dict, rows: List[dict]) -> str:
    lines = [f"# fused linear + CE: {meta['shape']} {meta['dtype']}, {meta.get('card')} ({meta['date']})", "",
             f"bf16 GEMM {meta['gemm_tflops']:.0f} TFLOP/s in this run: three-matmul floor "
             f"{meta['floor_ms']:.2f} ms; fastest peer {meta['best_peer_ms'] or float('nan'):.2f} ms", "",
             "| impl | median ms | of floor | extra GiB | peak GiB | max err loss / gh / gw | status |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("time_ms")
        fl = f"{r['floor_fraction']:.2f}" if r.get("floor_fraction") else ""
        err = " / ".join(f"{e:.1e}" for e in r.get("max_err", []))
        mem = f"{r['mem_extra_gib']:.2f} | {r['mem_peak_gib']:.2f}" if r.get("mem_extra_gib") is not None else " | "
        status = r["status"]
        if "target_time" in r:
            met = lambda k: "met" if r[k] else "MISSED"  # noqa: E731
            status += f" (time <= 0.95 x best peer {met('target_time')}, >= 0.85 of floor " \
                      f"{met('target_floor')}, <= 1.5 GiB {met('target_mem')})"
        lines.append(f"| {r['impl']} | {t:.2f} | {fl} | {mem} | {err} | {status} |" if t else
                     f"| {r['impl']} |  |  | {mem} | {err} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuloss.bench.linear_ce", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8192x4096x128256,16384x4096x262144",
                   help="comma list of NxHxV (default: 8192x4096x128256,16384x4096x262144)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impls", help="comma list (default: all)")
    p.add_argument("--budget", action="store_true", help="also time the parts of one gpuloss call")
    p.add_argument("--profile", action="store_true",
                   help="also list one call's device time by kernel (first shape only)")
    p.add_argument("--out", default=None, help="output folder (default bench/out/linear_ce-<date>)")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("linear_ce bench: needs a CUDA device", file=sys.stderr)
        return 2
    out = args.out or os.path.join("bench", "out", "linear_ce-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    results, tables = [], []

    def write():  # after every shape, and on an interrupt: a time limit keeps what was measured
        with open(os.path.join(out, "linear_ce.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out, "linear_ce.md"), "w") as f:
            f.write("\n".join(tables))

    try:
        for shape in args.shapes.split(","):
            N, H, V = (int(x) for x in shape.lower().split("x"))
            meta, rows = run(N, H, V, args.dtype, args.impls.split(",") if args.impls else None)
            entry = {"meta": meta, "rows": rows}
            results.append(entry)
            tables.append(_table(meta, rows))
            print(tables[-1], flush=True)
            write()
            if args.budget:
                try:
                    entry["budget"] = budget(N, H, V, args.dtype)
                    tables.append("\n".join(f"- {b['part']}: {b['ms_per_chunk']:.3f} ms x {b['chunks']} chunks = "
                                             f"{b['ms_total']:.2f} ms" for b in entry["budget"]) + "\n")
                except Exception as e:  # the measured rows stay
                    why = str(e).splitlines()[0][:160] if str(e) else ""
                    tables.append(f"- budget fails: {type(e).__name__}: {why}\n")
                print(tables[-1], flush=True)
                write()
            if args.profile and len(results) == 1:
                try:
                    tables.append(profile(N, H, V, args.dtype))
                except Exception as e:  # the measured rows stay
                    why = str(e).splitlines()[0][:160] if str(e) else ""
                    tables.append(f"- profile fails: {type(e).__name__}: {why}\n")
                print(tables[-1], flush=True)
                write()
    except KeyboardInterrupt:
        tables.append("- stopped (interrupted: the time limit); the shapes above are complete\n")
        write()
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
