"""Host time per call: what the public functions cost on the CPU before and
after their kernels, the part a back-to-back benchmark measures when it is
longer than the kernel (bench/RESULTS.md: CE loss+grad bf16 8192x32000 at
0.545 ms through ``gpuloss.cross_entropy`` where its kernel takes 0.381 ms).

``python -m gpuloss.bench.host [--device cuda|cpu] [--calls N] [--out DIR]``

Each case calls one public function ``--calls`` times on tiny tensors (8 rows
of 256 classes: the device work is a few microseconds) and reports the wall
time per call; on a GPU the queue is drained once at the end, so the figure
is the host's as long as the device keeps up (it does at this size).  The
same calls through ``torch.nn.functional`` (and Liger-Kernel's CE, where it
is installed) are the yardstick.

``--device cpu`` times gpuloss's Triton backend without a GPU: under
``TRITON_INTERPRET=1`` with every Triton kernel replaced by a call that does
nothing, so what is timed is the host path alone (validation, dispatch, the
launchers, allocation), less the real launch (Triton's argument binding and
the driver call, which only a GPU run times).  Torch's rows then time its
CPU kernels at this size.

Writes ``host.json`` and ``host.md`` to ``--out`` (when given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

ROWS, COLS = 8, 256


def _no_op_kernels() -> None:
    """Every Triton kernel of gpuloss launches nothing (``--device cpu``)."""
    import importlib

    class _Nop:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for mod in ("cross_entropy", "softmax", "kl_div", "elementwise", "linear_acc", "vocab_parallel"):
        m = importlib.import_module(f"gpuloss.kernels.triton.{mod}")
        for name in dir(m):
            if name.endswith("_kernel"):
                setattr(m, name, _Nop())


def cases(device: str, backend: Optional[str]) -> Dict[str, Callable[[], object]]:
    """name -> one call (forward, and backward where the name says so)."""
    import torch
    import torch.nn.functional as F

    import gpuloss
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, COLS, generator=g).to(device)
    t = torch.randint(0, COLS, (ROWS,), generator=g).to(device)
    y = torch.rand(ROWS, COLS, generator=g).to(device)
    xr = x.clone().requires_grad_()
    kw = {} if backend is None else {"backend": backend}
    out: Dict[str, Callable[[], object]] = {
        "ce loss": lambda: gpuloss.cross_entropy(x, t, **kw),
        "ce return_grad": lambda: gpuloss.cross_entropy(x, t, return_grad=True, **kw),
        "ce autograd fwd": lambda: gpuloss.cross_entropy(xr, t, **kw),
        "ce autograd fwd+bwd": lambda: gpuloss.cross_entropy(xr, t, **kw).backward(),
        "softmax fwd": lambda: gpuloss.softmax(x, dim=-1, **kw),
        "bce_with_logits fwd+bwd": lambda: gpuloss.binary_cross_entropy_with_logits(xr, y, **kw).backward(),
        "torch ce loss": lambda: F.cross_entropy(x, t),
        "torch ce autograd fwd+bwd": lambda: F.cross_entropy(xr, t).backward(),
        "torch softmax fwd": lambda: torch.softmax(x, -1),
        "torch bce_with_logits fwd+bwd": lambda: F.binary_cross_entropy_with_logits(xr, y).backward(),
    }
    if device.startswith("cuda") and backend is None and gpuloss.backend_status()["cupy"][0]:
        # the CUDA C backend's own host path (DLPack views, torch's stream and allocator for CuPy)
        out["ce return_grad (cupy)"] = lambda: gpuloss.cross_entropy(x, t, return_grad=True, backend="cupy")
        out["ce autograd fwd+bwd (cupy)"] = lambda: gpuloss.cross_entropy(xr, t, backend="cupy").backward()
    if device.startswith("cuda"):
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
            out["liger ce autograd fwd+bwd"] = lambda: liger_cross_entropy(xr, t).backward()
        except Exception:  # not installed, or not importable with this torch/triton
            pass
    return out


def time_calls(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Microseconds per call: the best of three timings of ``calls`` calls."""
    for _ in range(max(calls // 10, 3)):
        fn()
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def run(device: str, calls: int, backend: Optional[str] = None) -> List[Tuple[str, float]]:
    import torch
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        _no_op_kernels()
        backend = backend or "triton"
        sync = lambda: None  # noqa: E731
    else:
        sync = torch.cuda.synchronize
    rows = []
    for name, fn in cases(device, backend).items():
        try:
            rows.append((name, time_calls(fn, calls, sync)))
        except Exception as e:  # a peer that fails here: its row says so, the others still run
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append((name, float("nan")))
    return rows


def _table(rows: List[Tuple[str, float]], header: str) -> str:
    lines = [header, "", "| case | us per call |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" if us == us else f"| {name} | failed |" for name, us in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (no-op Triton kernels)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--backend", default=None, help="gpuloss backend (default: the dispatcher's choice)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(device, a.calls, a.backend)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU (no-op Triton kernels)"
    header = (f"Host time per call, {ROWS}x{COLS} float32, {device} ({name}), torch {torch.__version__}, "
              f"{a.calls} calls, best of 3, commit {os.environ.get('GPULOSS_COMMIT', '?')}")
    text = _table(rows, header)
    sys.stdout.write(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "host.md"), "w") as f:
            f.write(text)
        with open(os.path.join(a.out, "host.json"), "w") as f:
            json.dump({"header": header, "rows": [{"case": n, "us": us if us == us else None} for n, us in rows]},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
