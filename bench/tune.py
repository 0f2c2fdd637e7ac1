"""Launch-configuration sweep for the fused row kernels on one GPU.

The runner (``bench/runner.py``) times each backend's *designs* against the
peers; this script times the *configurations* of those designs, so that one
GPU session can pick the sizing helper's defaults from data:

* triton "twopass";
* triton "onchip" with the preferred chunk (``GPULOSS_TRITON_CHUNK``) at
  several sizes and the split cap (``GPULOSS_TRITON_MAX_SPLIT``) raised, so
  that long rows are cut into many small register-resident chunks;
* every cupy variant (``GPULOSS_CUPY_VARIANT``), and the staged variant's knobs.

For cross-entropy loss + gradient (``return_grad=True``, mean reduction) and
softmax forward at PERF.md's shapes.  Each configuration is checked against
torch in float32 (loss, and the gradient / output of a few rows) before it is
timed; a wrong one is reported as WRONG and not timed.  Times are
``triton.testing.do_bench`` medians with the L2 flushed; "floor" is the
fraction of the copy bandwidth measured at the start of the run (bytes read +
written of a 2 GiB device-to-device copy).

    python -m gpuloss.bench.tune [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

SHAPES = [((8192, 32000), "float32"), ((8192, 32000), "bfloat16"),
          ((16384, 128256), "bfloat16"), ((4096, 262144), "bfloat16")]
QUICK_SHAPES = [((8192, 32000), "bfloat16"), ((16384, 128256), "bfloat16")]


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


def configs() -> List[Tuple[str, str, Dict[str, Optional[str]]]]:
    """(name, backend, environment) for every configuration available here."""
    import gpuloss
    out: List[Tuple[str, str, Dict[str, Optional[str]]]] = []
    st = gpuloss.backend_status()
    if st["triton"][0]:
        out.append(("triton twopass", "triton", {"GPULOSS_TRITON_VARIANT": "twopass"}))
        for block in (2048, 4096, 8192):
            out.append((f"triton twopass reverse block={block}", "triton",
                        {"GPULOSS_TRITON_VARIANT": "twopass", "GPULOSS_TRITON_REVERSE": "1",
                         "GPULOSS_TRITON_ROWLOOP_BLOCK": str(block)}))
        out.append(("triton onchip default", "triton", {"GPULOSS_TRITON_VARIANT": "onchip"}))
        # whole rows (or large chunks) in one program of 32 warps, as
        # Liger's single-block softmax does for V <= 65536
        for chunk in (16384, 32768):
            out.append((f"triton onchip big chunk={chunk} warps=32", "triton",
                        {"GPULOSS_TRITON_VARIANT": "onchip", "GPULOSS_TRITON_CHUNK": str(chunk),
                         "GPULOSS_TRITON_MAX_CHUNK": str(chunk), "GPULOSS_TRITON_ONCHIP_WARPS": "32",
                         "GPULOSS_TRITON_MAX_SPLIT": "16"}))
        for chunk in (2048, 4096, 8192):
            out.append((f"triton onchip chunk={chunk} split<=128", "triton",
                        {"GPULOSS_TRITON_VARIANT": "onchip", "GPULOSS_TRITON_CHUNK": str(chunk),
                         "GPULOSS_TRITON_MAX_SPLIT": "128"}))
    if st["cupy"][0]:
        be = gpuloss.get_backend("cupy")
        for v in getattr(be, "variants", lambda: [])():
            out.append((f"cupy {v}", "cupy", {"GPULOSS_CUPY_VARIANT": v}))
    out += cupy_staged_configs(st["cupy"][0])
    return out


def cupy_staged_configs(available: bool) -> List[Tuple[str, str, Dict[str, Optional[str]]]]:
    """The cupy staged variant's knobs (cupy_backend.plan_staged): a smaller per-block slice
    (larger clusters, more buffers), fewer buffers in flight, fewer threads per block; "cupy
    staged" above is the default (64 KB slices, up to 4 buffers, ~4 vectors per thread)."""
    if not available:
        return []
    knobs = [("slice=16KB", {"GPULOSS_CUPY_STAGED_SLICE_KB": "16"}),
             ("slice=32KB", {"GPULOSS_CUPY_STAGED_SLICE_KB": "32"}),
             ("nbuf=2", {"GPULOSS_CUPY_STAGED_NBUF": "2"}),
             ("threads=512", {"GPULOSS_CUPY_STAGED_THREADS": "512"})]
    return [(f"cupy staged {name}", "cupy", {"GPULOSS_CUPY_VARIANT": "staged", **kv}) for name, kv in knobs]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpuloss.bench.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for tune.json")
    ap.add_argument("--quick", action="store_true", help="two bf16 shapes only")
    ap.add_argument("--ops", default="ce_loss_grad,softmax_fwd")
    ap.add_argument("--configs", default="*", help="glob over configuration names (e.g. 'triton twopass*')")
    args = ap.parse_args(argv)

    import torch
    import triton.testing

    import gpuloss

    if not torch.cuda.is_available():
        print("tune: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)

    def bench(fn: Callable[[], object]) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()  # 1 GiB, read + write = 2 GiB
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() / (copy_ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    print(f"{card}: copy bandwidth {copy_bw / 1e12:.3f} TB/s", flush=True)

    rows: List[Dict[str, object]] = []
    import fnmatch
    cfgs = [c for c in configs() if fnmatch.fnmatch(c[0], args.configs)]
    ops = args.ops.split(",")
    for (N, V), dtname in (QUICK_SHAPES if args.quick else SHAPES):
        dt = getattr(torch, dtname)
        torch.manual_seed(N + V)
        x = (torch.randn(N, V, device=dev) * 2).to(dt)
        t = torch.randint(0, V, (N,), device=dev)
        esz = x.element_size()
        floor_bytes = 2 * N * V * esz  # read N V + write N V (+ O(N))
        # torch float32 references on a few rows, and the exact mean loss
        sub = torch.arange(0, N, max(N // 8, 1), device=dev)
        xs = x[sub].float()
        ref_grad_rows = (torch.softmax(xs, 1) - torch.nn.functional.one_hot(t[sub], V).float()) / N
        ref_sm_rows = torch.softmax(xs, 1)
        ref_loss = 0.0
        for r0 in range(0, N, 2048):
            ref_loss += float(torch.nn.functional.cross_entropy(x[r0:r0 + 2048].float(), t[r0:r0 + 2048],
                                                                reduction="sum"))
        ref_loss /= N
        tol = 2e-2 if dtname == "bfloat16" else 1e-4
        for op in ops:
            for name, backend, kv in cfgs:
                row = dict(op=op, shape=f"{N}x{V}", dtype=dtname, config=name, card=card)
                with env(**kv):
                    try:
                        if op == "ce_loss_grad":
                            fn = lambda: gpuloss.cross_entropy(x, t, return_grad=True, backend=backend)  # noqa: E731
                            out = fn()
                            g = out.grad[sub].float()
                            err_l = abs(float(out.loss) - ref_loss) / abs(ref_loss)
                            err_g = float((g - ref_grad_rows).abs().max() / ref_grad_rows.abs().max())
                            err = max(err_l, err_g)
                        else:
                            fn = lambda: gpuloss.softmax(x, dim=1, backend=backend)  # noqa: E731
                            out = fn()
                            err = float((out[sub].float() - ref_sm_rows).abs().max() / ref_sm_rows.abs().max())
                        del out
                        if not err <= tol:
                            row.update(status=f"WRONG (max rel err {err:.2e})")
                        else:
                            ms = bench(fn)
                            row.update(status="ok", ms=ms, err=err, gbps=floor_bytes / (ms * 1e-3) / 1e9,
                                       floor=(floor_bytes / copy_bw) / (ms * 1e-3))
                    except Exception as e:  # a config that cannot run is a result too
                        row.update(status=f"fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                rows.append(row)
                s = (f"{row['status']}" if row["status"] != "ok"
                     else f"{row['ms']:8.3f} ms  {row['gbps']:7.0f} GB/s  floor {row['floor']:.3f}")
                print(f"{op:13s} {row['shape']:>13s} {dtname:9s} {name:36s} {s}", flush=True)
                torch.cuda.empty_cache()
        del x, t
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune.json"), "w") as f:
            json.dump(dict(card=card, copy_bw=copy_bw, date=time.strftime("%Y-%m-%d"), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
