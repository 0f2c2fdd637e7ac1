"""The ``gpuloss`` command (also ``python -m gpuloss``).

  gpuloss info    versions, devices, each backend's status
  gpuloss check   every available backend against the float64 reference
  gpuloss demo    the lecture's CE-vs-L2 experiment on handwritten digits
  gpuloss bench   the benchmark suite (see bench/)
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import Callable, List, Optional, Tuple

import numpy as np

import gpuloss
from gpuloss import reference as R


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # an optional dependency that is missing or broken
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def cmd_info(args) -> int:
    print(f"gpuloss {gpuloss.__version__}")
    print(f"python  {platform.python_version()} on {platform.platform()}")
    for mod in ("numpy", "torch", "triton", "cupy"):
        print(f"{mod:7s} {_version(mod)}")
    print("devices:")
    print(f"  cpu: {os.cpu_count()} cores")
    try:
        import torch
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                print(f"  cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                      f"compute capability {p.major}.{p.minor}")
        else:
            print("  no CUDA device visible to torch")
    except Exception:
        print("  (torch not installed: CUDA devices not listed)")
    print("backends:")
    for name, (ok, why) in gpuloss.backend_status().items():
        print(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    print(f"value checks: {gpuloss.value_checks()}; GPULOSS_BACKEND={os.environ.get('GPULOSS_BACKEND', '(unset)')}")
    from gpuloss import tuning
    print(tuning.describe())  # the automatic design per kernel, dtype and row length on this device
    return 0


# ---------------------------------------------------------------- check

def _harness(name: str):
    """(to_array, to_numpy, dtypes) for running backend ``name`` through the
    public API on its own kind of arrays."""
    if name == "numpy":
        def to_np(a, dt="float32"):
            a = np.asarray(a)
            return a if a.dtype.kind in "iu" else a.astype(dt)  # class indices stay integers
        return to_np, np.asarray, ["float32", "float64"]
    if name == "triton":
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"

        def to(a, dt="float32"):
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.to(dev, getattr(torch, dt)) if t.dtype.is_floating_point else t.to(dev)

        def back(t):
            return t.detach().float().cpu().numpy() if t.dtype.is_floating_point else t.cpu().numpy()
        dts = ["float32", "bfloat16"] if dev == "cuda" else ["float32"]
        return to, back, dts
    if name == "cupy":
        import cupy
        return (lambda a, dt="float32": cupy.asarray(a, dtype=dt) if np.asarray(a).dtype.kind == "f"
                else cupy.asarray(a)), cupy.asnumpy, ["float32", "float16"]
    raise ValueError(name)


_TOL = {"float64": 1e-10, "float32": 3e-5, "float16": 3e-3, "bfloat16": 2e-2}


def _rounded(a, dt):
    if dt == "bfloat16":
        import torch
        return torch.from_numpy(np.asarray(a, np.float32)).bfloat16().float().numpy().astype(np.float64)
    return np.asarray(a, dtype=dt).astype(np.float64)


def _cases(rng) -> List[Tuple[str, Callable]]:
    """(name, fn(to, back, dt, backend) -> list of (got, want) pairs)."""
    N, C = 16, 1000

    def ce(opts):
        def run(to, back, dt, be):
            o_ = dict(opts)
            x = _rounded(rng.standard_normal((N, C)) * 3, dt)
            t = rng.integers(0, C, N)
            t[1] = -100
            w = rng.uniform(0.5, 2, C) if o_.pop("weight", False) else None
            wdt = "float64" if dt == "float64" else "float32"
            o = gpuloss.cross_entropy(to(x, dt), to(t), weight=None if w is None else to(w, wdt),
                                      return_grad=True, backend=be, **o_)
            return [(back(o.loss), R.cross_entropy(x, t, weight=w, **o_)),
                    (back(o.grad), R.cross_entropy_grad(x, t, weight=w, **o_)[0])]
        return run

    def probs(to, back, dt, be):
        x = _rounded(rng.standard_normal((N, C)), dt)
        d = _rounded(R.softmax(rng.standard_normal((N, C))), dt)
        o = gpuloss.cross_entropy(to(x, dt), to(d, dt), label_smoothing=0.1, return_grad=True, backend=be)
        return [(back(o.loss), R.cross_entropy(x, d, label_smoothing=0.1)),
                (back(o.grad), R.cross_entropy_grad(x, d, label_smoothing=0.1)[0])]

    def sm(log):
        def run(to, back, dt, be):
            x = _rounded(rng.standard_normal((N, C)) * 4, dt)
            f = gpuloss.log_softmax if log else gpuloss.softmax
            return [(back(f(to(x, dt), -1, backend=be)), (R.log_softmax if log else R.softmax)(x))]
        return run

    def elementwise(name, fn, rfn, rgrad, make_t):
        def run(to, back, dt, be):
            x = _rounded(rng.standard_normal((N, 64)), dt)
            t = _rounded(make_t((N, 64)), dt)
            o = fn(to(x, dt), to(t, dt), return_grad=True, backend=be)
            return [(back(o.loss), rfn(x, t)), (back(o.grad), rgrad(x, t)[0])]
        return run

    def kl_logits(to, back, dt, be):
        x = _rounded(rng.standard_normal((N, C)), dt)
        t = _rounded(rng.standard_normal((N, C)), dt)
        o = gpuloss.kl_div_with_logits(to(x, dt), to(t, dt), temperature=2.0, return_grad=True, backend=be)
        return [(back(o.loss), R.kl_div_with_logits(x, t, 2.0)), (back(o.grad), R.kl_div_with_logits_grad(x, t, 2.0)[0])]

    return [
        ("cross_entropy", ce({})),
        ("cross_entropy weight+smoothing", ce({"weight": True, "label_smoothing": 0.1})),
        ("cross_entropy z_loss+softcap", ce({"z_loss": 1e-3, "softcap": 15.0, "reduction": "sum"})),
        ("cross_entropy probability targets", probs),
        ("softmax", sm(False)),
        ("log_softmax", sm(True)),
        ("kl_div_with_logits", kl_logits),
        ("bce_with_logits", elementwise("bce", gpuloss.binary_cross_entropy_with_logits,
                                        R.binary_cross_entropy_with_logits, R.binary_cross_entropy_with_logits_grad,
                                        lambda s: rng.uniform(0, 1, s))),
        ("mse_loss", elementwise("mse", gpuloss.mse_loss, R.mse_loss, R.mse_loss_grad, lambda s: rng.standard_normal(s))),
    ]


def cmd_check(args) -> int:
    rng = np.random.default_rng(args.seed)
    rows = []
    failed = False
    for name, (ok, why) in gpuloss.backend_status().items():
        if not ok:
            rows.append((name, "-", "-", "skipped", why))
            continue
        try:
            to, back, dts = _harness(name)
        except Exception as e:
            rows.append((name, "-", "-", "skipped", f"{type(e).__name__}: {e}"))
            continue
        for dt in dts:
            for case, fn in _cases(rng):
                try:
                    pairs = fn(to, back, dt, name)
                    err = 0.0
                    for got, want in pairs:
                        got = np.asarray(got, np.float64)
                        scale = max(float(np.max(np.abs(want))), 1e-30)
                        err = max(err, float(np.max(np.abs(got - want))) / scale)
                    good = err <= _TOL[dt] and np.all(np.isfinite(err))
                    rows.append((name, dt, case, "pass" if good else "FAIL", f"max rel err {err:.2e}"))
                    failed |= not good
                except Exception as e:
                    rows.append((name, dt, case, "FAIL", f"{type(e).__name__}: {str(e)[:100]}"))
                    failed = True
    w = [max(len(str(r[i])) for r in rows + [("backend", "dtype", "op", "result", "detail")]) for i in range(5)]
    head = ("backend", "dtype", "op", "result", "detail")
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    for r in rows:
        print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
    print(f"\n{'FAILED' if failed else 'all checks passed'} (seed {args.seed})")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="gpuloss", description="Fused loss-function kernels: info, check, demo, bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices and backend status")
    pc = sub.add_parser("check", help="every available backend against the float64 reference")
    pc.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    sub.add_parser("demo", help="the lecture's CE-vs-L2 experiment (see gpuloss demo --help)", add_help=False)
    sub.add_parser("bench", help="the benchmark suite (see gpuloss bench --help)", add_help=False)
    if argv and argv[0] in ("demo", "bench"):
        rest = argv[1:]
        if argv[0] == "demo":
            from gpuloss.demo import main as demo_main
            return demo_main(rest)
        from gpuloss.bench.runner import main as bench_main
        return bench_main(rest)
    args = ap.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
