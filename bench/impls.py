"""The implementations the benchmark times: gpuloss's backends and their peers.

An :class:`Impl` is a name, a group (``"gpuloss"`` or ``"peer"``), an
availability probe for a device and one *builder* per op it supports.  A
builder takes the row's inputs (torch tensors on the benchmark device) and
returns a zero-argument callable that runs the op once and returns the
canonical outputs of :mod:`gpuloss.bench.ops` (``y``, ``loss`` or
``(loss, grad)``).  A builder raises :class:`NotApplicable` for a
combination that does not exist (NumPy has no bfloat16; SciPy has no softmax
backward); anything else it or its callable raises is reported as
``fails: <reason>``.

gpuloss implementations time the public API (``gpuloss.cross_entropy(...,
return_grad=True, backend=...)``), which is what users call.  Backends that
offer several kernels list them in ``variants()``; each variant is its own
implementation, selected with ``GPULOSS_<BACKEND>_VARIANT`` while it runs.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from .ops import KL_TEMPERATURE

Builder = Callable[[Dict[str, Any], "Ctx"], Callable[[], Any]]


class NotApplicable(Exception):
    """This implementation has no such op/dtype: reported as ``n/a``."""


@dataclass
class Ctx:
    """What a builder may need beyond the inputs."""
    device: Any          # timing.Device
    dtype: str
    shape: Tuple[int, ...]


@dataclass
class Impl:
    name: str
    group: str                                   # "gpuloss" | "peer"
    probe: Callable[[Any], Tuple[bool, str]]     # (device) -> (available, reason)
    builders: Dict[str, Builder] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)
    default_devices: Tuple[str, ...] = ("cuda", "cpu")  # in the default set on these devices
    mutates_inputs: bool = False                 # gets private clones of Op.mutated inputs
    notes: str = ""


#: name -> Impl, in table order; gpuloss backends are added by discover()
IMPLS: Dict[str, Impl] = {}


def register_impl(impl: Impl) -> Impl:
    IMPLS[impl.name] = impl
    return impl


def register_impl_op(impl_name: str, op_name: str, builder: Builder) -> None:
    """Hook for later issues: add an op to an existing implementation."""
    IMPLS[impl_name].builders[op_name] = builder


# --------------------------------------------------------------------------
# array conversion
# --------------------------------------------------------------------------

def to_torch(a: Any, device) -> Any:
    """A torch view (or 0-d tensor) of a NumPy/CuPy/torch result, for checking."""
    import numpy as np
    import torch
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return torch.from_numpy(np.asarray(a))
    if type(a).__module__.startswith("cupy"):
        return torch.from_dlpack(a)
    return torch.as_tensor(a)


def canonical(outputs: Any, form: str, device) -> Any:
    """Outputs of a builder's callable as torch tensors in the op's form."""
    if form == "loss,grad":
        loss, grad = outputs[0], outputs[1]
        return to_torch(loss, device), to_torch(grad, device)
    return to_torch(outputs, device)


def _no_bf16_numpy(ctx: Ctx) -> None:
    if ctx.dtype == "bfloat16":
        raise NotApplicable("NumPy has no bfloat16")


# --------------------------------------------------------------------------
# gpuloss (public API)
# --------------------------------------------------------------------------

def _gpuloss_builders(backend: str, inplace: bool = False) -> Dict[str, Builder]:
    import gpuloss

    def native(t, ctx: Ctx):
        if backend == "numpy":
            _no_bf16_numpy(ctx)
            return t.numpy()
        if backend == "cupy":
            import cupy
            return cupy.from_dlpack(t)
        return t

    def unary(fname):
        def build(inp, ctx):
            x = native(inp["x"], ctx)
            f = getattr(gpuloss, fname)
            return lambda: f(x, dim=-1, backend=backend)
        return build

    def softmax_bwd(inp, ctx):
        y, dy = native(inp["y"], ctx), native(inp["dy"], ctx)
        f = gpuloss.softmax_backward
        return lambda: f(dy, y, dim=-1, backend=backend)

    def ce_loss(inp, ctx):
        x, t = native(inp["x"], ctx), native(inp["t"], ctx)
        f = gpuloss.cross_entropy
        return lambda: f(x, t, backend=backend)

    def loss_grad(fname, **kw):
        def build(inp, ctx):
            x, t = native(inp["x"], ctx), native(inp["t"], ctx)
            f = getattr(gpuloss, fname)

            def run():
                r = f(x, t, return_grad=True, backend=backend, **kw)
                return r.loss, r.grad
            return run
        return build

    if inplace:
        return {"ce_loss_grad": loss_grad("cross_entropy", inplace_backward=True)}
    return {
        "softmax_fwd": unary("softmax"),
        "log_softmax_fwd": unary("log_softmax"),
        "softmax_bwd": softmax_bwd,
        "ce_loss": ce_loss,
        "ce_loss_grad": loss_grad("cross_entropy"),
        "bce_loss_grad": loss_grad("binary_cross_entropy_with_logits"),
        "mse_loss_grad": loss_grad("mse_loss"),
        "kl_loss_grad": loss_grad("kl_div_with_logits", temperature=KL_TEMPERATURE),
    }


#: the device kind each gpuloss backend's timings mean something on
_BACKEND_DEVICE = {"numpy": "cpu", "triton": "cuda", "cupy": "cuda"}


def _gpuloss_probe(backend: str) -> Callable[[Any], Tuple[bool, str]]:
    def probe(device) -> Tuple[bool, str]:
        want = _BACKEND_DEVICE.get(backend)
        if want == "cuda" and not device.is_gpu:
            extra = " (the Triton interpreter on the CPU is a test tool, not a benchmark)" if backend == "triton" else ""
            return False, f"needs a CUDA device{extra}"
        if want == "cpu" and device.is_gpu:
            return False, "CPU backend: run with --device cpu to time it"
        from gpuloss import dispatch
        ok, why = dispatch.backend_status().get(backend, (False, "not registered"))
        return (True, why) if ok else (False, f"backend unavailable: {why}")
    return probe


def gpuloss_impls(device) -> List[Impl]:
    """One implementation per available gpuloss backend and kernel variant,
    plus the in-place cross-entropy gradient, as ``gpuloss-<backend>[<variant>]``."""
    from gpuloss import dispatch
    out: List[Impl] = []
    for backend in dispatch.registered():
        probe = _gpuloss_probe(backend)
        default_devices = (_BACKEND_DEVICE.get(backend, "cuda"),)
        variants: List[str] = []
        ok, _ = probe(device)
        if ok:
            try:
                inst = dispatch.get_backend(backend)
                if hasattr(inst, "variants"):
                    variants = [str(v) for v in inst.variants()]
            except Exception:
                variants = []
        var_env = f"GPULOSS_{backend.upper()}_VARIANT"
        if len(variants) > 1:
            for v in variants:
                out.append(Impl(f"gpuloss-{backend}[{v}]", "gpuloss", probe, _gpuloss_builders(backend, False),
                                env={var_env: v}, default_devices=default_devices,
                                notes=f"{var_env}={v}"))
        else:
            out.append(Impl(f"gpuloss-{backend}", "gpuloss", probe, _gpuloss_builders(backend, False),
                            default_devices=default_devices))
        out.append(Impl(f"gpuloss-{backend}-inplace", "gpuloss", probe, _gpuloss_builders(backend, True),
                        default_devices=default_devices, mutates_inputs=True,
                        notes="cross_entropy(..., inplace_backward=True): gradient over the logits"))
    return out


# --------------------------------------------------------------------------
# torch eager and torch.compile
# --------------------------------------------------------------------------

def _torch_fns():
    import torch
    import torch.nn.functional as F
    T = KL_TEMPERATURE

    def kl(x, t):
        return F.kl_div(F.log_softmax(x / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)

    return {
        "softmax_fwd": lambda x: torch.softmax(x, -1),
        "log_softmax_fwd": lambda x: torch.log_softmax(x, -1),
        "softmax_bwd": lambda dy, y: torch.ops.aten._softmax_backward_data(dy, y, -1, y.dtype),
        "ce_loss": lambda x, t: F.cross_entropy(x, t),
        "ce_loss_grad": lambda x, t: F.cross_entropy(x, t),
        "bce_loss_grad": lambda x, t: F.binary_cross_entropy_with_logits(x, t),
        "mse_loss_grad": lambda x, t: F.mse_loss(x, t),
        "kl_loss_grad": kl,
    }


def _torch_builders(compiled: bool) -> Dict[str, Builder]:
    def wrap(fn):
        if not compiled:
            return fn
        import torch
        # a fresh static-shape compilation per row: dynamo's automatic dynamic
        # shapes would otherwise switch to a shape-generic kernel after the
        # second shape, and the recompile limit would end the sweep.
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)

    def make(op):
        fn = _torch_fns()[op]
        if op in ("softmax_fwd", "log_softmax_fwd"):
            def build(inp, ctx):
                f, x = wrap(fn), inp["x"]
                return lambda: f(x)
        elif op == "softmax_bwd":
            def build(inp, ctx):
                f, y, dy = wrap(fn), inp["y"], inp["dy"]
                return lambda: f(dy, y)
        elif op == "ce_loss":
            def build(inp, ctx):
                import torch
                f, x, t = wrap(fn), inp["x"], inp["t"]

                def run():
                    with torch.no_grad():
                        return f(x, t)
                return run
        else:
            def build(inp, ctx):
                import torch
                f, t = wrap(fn), inp["t"]
                x = inp["x"].detach().requires_grad_(True)

                def run():
                    loss = f(x, t)
                    (g,) = torch.autograd.grad(loss, x)
                    return loss.detach(), g
                return run
        return build

    return {op: make(op) for op in _torch_fns()}


def _torch_probe(device) -> Tuple[bool, str]:
    try:
        import torch
    except ImportError as e:
        return False, f"cannot import torch: {e}"
    return True, f"torch {torch.__version__} on {device.kind}"


def _compile_probe(device) -> Tuple[bool, str]:
    ok, why = _torch_probe(device)
    if not ok:
        return ok, why
    import torch
    if not hasattr(torch, "compile"):
        return False, "torch has no torch.compile"
    return True, "torch.compile(dynamic=False), inductor"


# --------------------------------------------------------------------------
# Liger-Kernel
# --------------------------------------------------------------------------

def _liger_probe(device) -> Tuple[bool, str]:
    if not device.is_gpu:
        return False, "needs a CUDA device"
    try:
        m = importlib.import_module("liger_kernel.ops.cross_entropy")
        importlib.import_module("liger_kernel.ops.softmax")
    except Exception as e:
        return False, f"not importable: {type(e).__name__}: {e}"
    try:
        from importlib.metadata import version
        v = version("liger-kernel")
    except Exception:
        v = "?"
    del m
    return True, f"Liger-Kernel {v}"


def _liger_builders() -> Dict[str, Builder]:
    def softmax_fwd(inp, ctx):
        from liger_kernel.ops.softmax import LigerSoftmaxFunction
        x = inp["x"]
        return lambda: LigerSoftmaxFunction.apply(x)

    def softmax_bwd(inp, ctx):
        from liger_kernel.ops.softmax import _softmax_backward
        from liger_kernel.ops.utils import calculate_settings
        y, dy = inp["y"], inp["dy"]
        # what LigerSoftmaxFunction.backward launches after its forward;
        # calculate_settings raises above V = 65536 exactly as the forward does
        block, warps = calculate_settings(y.shape[-1])
        return lambda: _softmax_backward(dy, y, block, warps, False)

    def ce_loss(inp, ctx):
        from liger_kernel.transformers.functional import liger_cross_entropy
        x, t = inp["x"], inp["t"]
        return lambda: liger_cross_entropy(x, t)

    def ce_loss_grad(inp, ctx):
        import torch
        from liger_kernel.transformers.functional import liger_cross_entropy
        # Liger writes the gradient over the logits during the forward; the
        # runner gives this implementation its own copy of x
        x = inp["x"].detach().requires_grad_(True)
        t = inp["t"]

        def run():
            loss = liger_cross_entropy(x, t)
            (g,) = torch.autograd.grad(loss, x)
            return loss.detach(), g
        return run

    return {"softmax_fwd": softmax_fwd, "softmax_bwd": softmax_bwd, "ce_loss": ce_loss,
            "ce_loss_grad": ce_loss_grad}


# --------------------------------------------------------------------------
# cupyx.scipy.special and scipy.special
# --------------------------------------------------------------------------

def _cupyx_probe(device) -> Tuple[bool, str]:
    if not device.is_gpu:
        return False, "needs a CUDA device"
    try:
        import cupy
        import cupyx.scipy.special  # noqa: F401
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return False, f"not usable: {type(e).__name__}: {e}"
    if n < 1:
        return False, "CuPy sees no CUDA device"
    return True, f"cupy {cupy.__version__}"


def _cupyx_builders() -> Dict[str, Builder]:
    def make(fname):
        def build(inp, ctx):
            import cupy
            import cupyx.scipy.special as sp
            x = cupy.from_dlpack(inp["x"])
            f = getattr(sp, fname)
            return lambda: f(x, axis=-1)
        return build
    return {"softmax_fwd": make("softmax"), "log_softmax_fwd": make("log_softmax")}


def _scipy_probe(device) -> Tuple[bool, str]:
    if device.is_gpu:
        return False, "CPU library: run with --device cpu"
    try:
        import scipy
        import scipy.special  # noqa: F401
    except Exception as e:
        return False, f"not importable: {e}"
    return True, f"scipy {scipy.__version__}"


def _scipy_builders() -> Dict[str, Builder]:
    """scipy.special-based versions of each op, as a SciPy user writes them."""
    import numpy as np

    def arrays(inp, ctx, *names):
        _no_bf16_numpy(ctx)
        return [inp[n].numpy() for n in names]

    def softmax_fwd(inp, ctx):
        from scipy.special import softmax
        (x,) = arrays(inp, ctx, "x")
        return lambda: softmax(x, axis=-1)

    def log_softmax_fwd(inp, ctx):
        from scipy.special import log_softmax
        (x,) = arrays(inp, ctx, "x")
        return lambda: log_softmax(x, axis=-1)

    def ce_loss(inp, ctx):
        from scipy.special import log_softmax
        x, t = arrays(inp, ctx, "x", "t")
        rows = np.arange(x.shape[0])
        return lambda: -log_softmax(x, axis=-1)[rows, t].mean()

    def ce_loss_grad(inp, ctx):
        from scipy.special import log_softmax
        x, t = arrays(inp, ctx, "x", "t")
        rows = np.arange(x.shape[0])

        def run():
            logp = log_softmax(x, axis=-1)
            loss = -logp[rows, t].mean()
            # d mean(-logp[t]) / dx = (softmax(x) - onehot(t)) / N
            g = np.exp(logp, out=logp)
            g[rows, t] -= 1
            g /= x.shape[0]
            return loss, g
        return run

    def bce_loss_grad(inp, ctx):
        from scipy.special import expit, log_expit
        x, t = arrays(inp, ctx, "x", "t")

        def run():
            loss = -(t * log_expit(x) + (1 - t) * log_expit(-x)).mean()
            g = (expit(x) - t) / x.size
            return loss, g
        return run

    def kl_loss_grad(inp, ctx):
        from scipy.special import log_softmax
        x, t = arrays(inp, ctx, "x", "t")
        T = KL_TEMPERATURE

        def run():
            logq = log_softmax(x / T, axis=-1)
            logd = log_softmax(t / T, axis=-1)
            d = np.exp(logd)
            loss = (d * (logd - logq)).sum() / x.shape[0]
            g = (np.exp(logq) - d) / (T * x.shape[0])
            return loss, g
        return run

    return {"softmax_fwd": softmax_fwd, "log_softmax_fwd": log_softmax_fwd, "ce_loss": ce_loss,
            "ce_loss_grad": ce_loss_grad, "bce_loss_grad": bce_loss_grad, "kl_loss_grad": kl_loss_grad}


# --------------------------------------------------------------------------
# the list
# --------------------------------------------------------------------------

def _peer_impls() -> List[Impl]:
    return [
        Impl("torch", "peer", _torch_probe, _torch_builders(False), notes="torch eager"),
        Impl("torch-compile", "peer", _compile_probe, _torch_builders(True), default_devices=("cuda",),
             notes="not in the CPU defaults: inductor's C++ compile dominates a short CPU run"),
        Impl("liger", "peer", _liger_probe, _liger_builders(), default_devices=("cuda",), mutates_inputs=True),
        Impl("cupyx", "peer", _cupyx_probe, _cupyx_builders(), default_devices=("cuda",)),
        Impl("scipy", "peer", _scipy_probe, _scipy_builders(), default_devices=("cpu",)),
    ]


def build_registry(device) -> Dict[str, Impl]:
    """Every implementation known for this device (available or not), in
    table order: gpuloss first, then peers, then anything registered by
    later issues through :func:`register_impl`."""
    reg: Dict[str, Impl] = {}
    for impl in gpuloss_impls(device) + _peer_impls():
        reg[impl.name] = impl
    for name, impl in IMPLS.items():
        reg[name] = impl
    return reg


def availability(reg: Dict[str, Impl], device) -> Dict[str, Tuple[bool, str]]:
    """(available, reason) per implementation; a probe that raises counts as
    unavailable with the exception as the reason."""
    out = {}
    for name, impl in reg.items():
        try:
            out[name] = tuple(impl.probe(device))  # type: ignore[assignment]
        except Exception as e:
            out[name] = (False, f"probe raised {type(e).__name__}: {e}")
    return out


class env_vars:
    """Set environment variables for the duration of a block (kernel variants)."""

    def __init__(self, env: Dict[str, str]):
        self.env = env
        self.saved: Dict[str, Optional[str]] = {}

    def __enter__(self):
        for k, v in self.env.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False
