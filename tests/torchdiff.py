"""Differential testing against PyTorch: the machinery shared by
test_differential.py and test_error_contract.py.

A :class:`Case` is one call of a public gpuloss function, described
independently of the array library: every array argument is an :class:`Arr`,
a flat float64 (or integer) buffer plus a strided view of it (shape, strides,
offset), so transposed, sliced (with NaN-poisoned padding), expanded
(stride 0), overlapping and flipped (negative stride, NumPy only) layouts are
one mechanism.  The same buffer becomes a torch tensor, a NumPy array or a
CuPy array with the same strides.

:func:`check_case` runs the case through PyTorch (the oracle: float64 on the
case's values rounded to its dtype, plus one run at the case's dtype for the
output dtype) and through every available (array kind, backend) path of
gpuloss, and returns a list of disagreements, each a sentence naming the
function, the path, the inputs and both results.  Nothing here knows the right
answer: torch does.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import gpuloss
from gpuloss import dispatch

torch = None  # imported by require_torch(): collection must not need it
F = None

#: (rtol, atol) per storage dtype: the project's table (tests/conftest.py)
from conftest import TOLERANCES  # noqa: E402

FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")

#: class-index dtypes torch refuses that gpuloss accepts by design (its
#: docstrings: "class indices, integer"; the kernels take int32 natively).
#: torch takes int64 everywhere and uint8 for (N, C) inputs only ("expected
#: scalar type Long but found Byte" for (N, C, d...)); for these the oracle
#: is torch on the targets cast to int64.
EXTENDED_INDEX_DTYPES = ("int8", "int16", "int32", "uint8")
#: for NumPy (and CuPy) arrays every integer dtype is a class index: torch
#: has no say on uint16/32/64 NumPy arrays.  torch tensors of those dtypes
#: must be refused, as torch refuses them.
NUMPY_EXTRA_INDEX_DTYPES = ("uint16", "uint32", "uint64")


def require_torch():
    global torch, F
    import pytest
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F_
    F = F_
    return torch


# ---------------------------------------------------------------------------
# arrays: a buffer and a strided view of it
# ---------------------------------------------------------------------------

def c_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    out, s = [], 1
    for n in reversed(tuple(shape)):
        out.append(s)
        s *= max(int(n), 1)
    return tuple(reversed(out))


@dataclass
class Arr:
    """An array argument: ``storage`` (1-D, float64 for floating arrays, int64
    for integer ones) viewed with ``shape``/``strides``/``offset`` (in
    elements).  ``dtype``: the storage dtype of an integer array ("int64",
    "uint8", ...); floating arrays take the case's dtype unless set.
    ``grad``: differentiate with respect to it."""
    storage: np.ndarray
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    offset: int = 0
    layout: str = "contiguous"
    grad: bool = False
    dtype: Optional[str] = None
    readonly: bool = False

    @property
    def floating(self) -> bool:
        return np.issubdtype(self.storage.dtype, np.floating) and (self.dtype is None or self.dtype in FLOAT_DTYPES)

    def logical(self) -> np.ndarray:
        """The values the view shows (float64 / int64), as a fresh array."""
        return np.array(_np_view(self.storage, self))

    def describe(self, case_dtype: str) -> str:
        dt = self.dtype or (case_dtype if self.floating else str(self.storage.dtype))
        extra = "" if self.layout == "contiguous" else f" {self.layout} strides={self.strides}"
        ro = " read-only" if self.readonly else ""
        return f"{dt}{list(self.shape)}{extra}{ro}{' grad' if self.grad else ''}"


def _np_view(buf: np.ndarray, a: Arr) -> np.ndarray:
    isz = buf.itemsize
    if not a.shape:
        return buf[a.offset:a.offset + 1].reshape(())
    return np.lib.stride_tricks.as_strided(buf[a.offset:], shape=a.shape,
                                           strides=tuple(s * isz for s in a.strides), writeable=False)


def contiguous(values, *, grad=False, dtype=None) -> Arr:
    v = np.asarray(values)
    storage = v.astype(np.float64 if np.issubdtype(v.dtype, np.floating) else np.int64).ravel().copy()
    if dtype is None and not np.issubdtype(v.dtype, np.floating) and v.dtype != np.int64:
        dtype = str(v.dtype)
    return Arr(storage, tuple(v.shape), c_strides(v.shape), 0, "contiguous", grad, dtype)


LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "overlapping", "flipped")


def with_layout(values: np.ndarray, layout: str, rng: np.random.Generator, *, grad=False, dtype=None,
                poison=None) -> Arr:
    """``values`` laid out as ``layout``.  Layouts that do not apply to the
    shape fall back to contiguous.  "expanded" keeps the first slice along a
    dimension (the logical values change: read them back with
    ``Arr.logical``); "overlapping" lets consecutive rows share elements
    (values change too); "sliced" pads with ``poison`` (NaN for floats, an
    invalid class index for integers)."""
    v = np.asarray(values)
    floating = np.issubdtype(v.dtype, np.floating)
    base = contiguous(v, grad=grad, dtype=dtype)
    shape, nd = tuple(v.shape), v.ndim
    if poison is None:
        poison = np.nan if floating else 10 ** 6 + 3
    if layout == "transposed" and nd >= 2 and sum(s > 1 for s in shape) >= 2:
        perm = tuple(reversed(range(nd))) if rng.random() < 0.5 else tuple(int(p) for p in rng.permutation(nd))
        if perm == tuple(range(nd)):
            perm = tuple(reversed(range(nd)))
        stored = np.ascontiguousarray(v.transpose(perm))
        cs = c_strides(stored.shape)
        st = [0] * nd
        for i, p in enumerate(perm):
            st[p] = cs[i]
        return replace(base, storage=stored.ravel().astype(base.storage.dtype), strides=tuple(st),
                       layout=f"transposed{perm}")
    if layout == "sliced":
        steps = [int(rng.choice([1, 2, 3])) for _ in shape]
        if nd and rng.random() < 0.6:
            steps[-1] = 1  # rows strided, unit stride inside a row: the kernels' own layout
        pad = [2 + st * max(n, 1) for st, n in zip(steps, shape)] or [3]
        buf = np.full(pad, poison, dtype=base.storage.dtype)
        idx = tuple(slice(1, 1 + st * n, st) for st, n in zip(steps, shape))
        buf[idx] = v
        ps = c_strides(pad)
        offset = sum(ps) if nd else 1
        if not nd:
            buf = np.full(3, poison, dtype=base.storage.dtype)
            buf[1] = v
        return replace(base, storage=buf.ravel(), strides=tuple(p * st for p, st in zip(ps, steps)),
                       offset=int(offset), layout=f"sliced(steps={steps}, poisoned)")
    if layout == "expanded":
        dims = [d for d in range(nd) if shape[d] > 1]
        if dims:
            d = int(rng.choice(dims))
            small = np.ascontiguousarray(v.take([0], axis=d))
            st = list(c_strides(small.shape))
            st[d] = 0
            return replace(base, storage=small.ravel().astype(base.storage.dtype), strides=tuple(st),
                           layout=f"expanded(dim {d})")
    if layout == "overlapping" and nd >= 2 and shape[-1] >= 2 and shape[-2] >= 2:
        C = shape[-1]
        row = max(1, C // 2)
        st = [0] * nd
        st[-1], st[-2] = 1, row
        for d in range(nd - 3, -1, -1):
            st[d] = st[d + 1] * shape[d + 1]
        need = 1 + sum((n - 1) * s for n, s in zip(shape, st))
        storage = np.resize(v.ravel(), need).astype(base.storage.dtype)
        return replace(base, storage=storage, strides=tuple(st), layout="overlapping rows")
    if layout == "flipped" and nd >= 1 and any(s > 1 for s in shape):
        d = int(rng.choice([d for d in range(nd) if shape[d] > 1]))
        stored = np.ascontiguousarray(np.flip(v, d))
        st = list(c_strides(shape))
        offset = (shape[d] - 1) * st[d]
        st[d] = -st[d]
        return replace(base, storage=stored.ravel().astype(base.storage.dtype), strides=tuple(st),
                       offset=int(offset), layout=f"flipped(dim {d}, NumPy only)")
    return base


# ---------------------------------------------------------------------------
# building the arrays of one library
# ---------------------------------------------------------------------------

def _torch_dtype(name: str):
    return getattr(torch, name)


def rounded_storage(a: Arr, dtype: str) -> np.ndarray:
    """The storage as float64 after rounding to ``dtype`` (what the oracle sees)."""
    if not a.floating:
        return a.storage
    dt = a.dtype or dtype
    if dt in ("bfloat16", "float16"):
        return torch.from_numpy(a.storage).to(_torch_dtype(dt)).double().numpy()
    return a.storage.astype(dt).astype(np.float64)


@dataclass
class Built:
    """One library's arguments for a case."""
    args: Dict[str, Any]
    leaves: Dict[str, Any]  # torch: name -> storage leaf that requires grad
    views: Dict[str, Any]   # name -> the array passed
    buffers: Dict[str, Any]  # name -> the storage object (to check for modification)


def build_torch(case: "Case", dtype: str, device: str = "cpu", *, requires_grad: bool = False,
                consumable_input: bool = False, oracle: bool = False) -> Built:
    """torch tensors for every Arr of ``case``.  ``oracle``: float64 from the
    values rounded to the case dtype.  ``consumable_input``: ``input`` is a view
    of ``leaf * 1`` (not of a leaf), as inplace_backward needs."""
    args, leaves, views, bufs = {}, {}, {}, {}
    for name, v in case.args.items():
        if not isinstance(v, Arr):
            # softmax's dtype= keyword: a torch dtype for torch tensors
            args[name] = getattr(torch, v) if (name == "dtype" and isinstance(v, str)) else v
            continue
        if v.floating:
            dt = "float64" if oracle else (v.dtype or dtype)
            st = torch.from_numpy(rounded_storage(v, v.dtype or dtype) if oracle else v.storage.copy())
            st = st.to(device=device, dtype=_torch_dtype(dt))
        else:
            st = torch.from_numpy(v.storage.copy()).to(device)
            tdt = v.dtype or "int64"
            try:
                st = st.to(_torch_dtype(tdt))
            except AttributeError:
                raise AssertionError(f"torch has no dtype {tdt}")
        leaf = st
        if requires_grad and v.grad and v.floating:
            leaf = st.requires_grad_(True)
            leaves[name] = leaf
        src = leaf * 1 if (consumable_input and name == case.first) else leaf
        if any(s < 0 for s in v.strides):  # torch has no negative strides: the same values, contiguous
            t = src.as_strided(v.shape, [abs(s) for s in v.strides], v.offset - sum(
                (n - 1) * abs(s) for n, s in zip(v.shape, v.strides) if s < 0))
            t = t.flip([d for d, s in enumerate(v.strides) if s < 0])
        else:
            t = src.as_strided(v.shape, v.strides, v.offset)
        args[name] = t
        views[name] = t
        bufs[name] = st
    return Built(args, leaves, views, bufs)


def build_numpy(case: "Case", dtype: str) -> Built:
    args, views, bufs = {}, {}, {}
    for name, v in case.args.items():
        if not isinstance(v, Arr):
            args[name] = v
            continue
        dt = (v.dtype or dtype) if v.floating else (v.dtype or "int64")
        buf = v.storage.astype(dt)
        isz = buf.itemsize
        if not v.shape:
            a = buf[v.offset:v.offset + 1].reshape(())
        else:
            a = np.lib.stride_tricks.as_strided(buf[v.offset:], shape=v.shape,
                                                strides=tuple(s * isz for s in v.strides))
        # stride-0 views are read-only, as np.broadcast_to makes them
        if v.readonly or any(s == 0 and n > 1 for s, n in zip(v.strides, v.shape)):
            a.flags.writeable = False
        args[name] = a
        views[name] = a
        bufs[name] = buf
    return Built(args, {}, views, bufs)


def build_cupy(case: "Case", dtype: str) -> Built:
    import cupy
    b = build_numpy(case, dtype)
    args, views, bufs = {}, {}, {}
    for name, v in case.args.items():
        if not isinstance(v, Arr):
            args[name] = v
            continue
        buf = cupy.asarray(b.buffers[name])
        isz = buf.itemsize
        if any(s < 0 for s in v.strides) or not v.shape:
            a = cupy.asarray(b.views[name])
        else:
            a = cupy.lib.stride_tricks.as_strided(buf[v.offset:], shape=v.shape,
                                                  strides=tuple(s * isz for s in v.strides))
        args[name] = views[name] = a
        bufs[name] = buf
    return Built(args, {}, views, bufs)


def to_np(a) -> Optional[np.ndarray]:
    """float64 (or integer) NumPy copy of any array; None stays None."""
    if a is None:
        return None
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach()
        if a.is_floating_point():
            a = a.double()
        return a.cpu().numpy().copy()
    if type(a).__module__.startswith("cupy"):
        import cupy
        a = cupy.asnumpy(a)
    a = np.asarray(a)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a.copy()


def dtype_of(a) -> str:
    if torch is not None and isinstance(a, torch.Tensor):
        return str(a.dtype).replace("torch.", "")
    return str(np.asarray(a).dtype) if not hasattr(a, "dtype") else str(a.dtype)


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------

@dataclass
class Case:
    """One call: ``fn`` (a public gpuloss function name), ``args`` in the
    signature's order (Arr for arrays, plain values otherwise), the floating
    ``dtype``, and ``oracle``: a function of the same arguments as torch
    tensors that computes the result with PyTorch alone."""
    fn: str
    args: Dict[str, Any]
    dtype: str = "float64"
    oracle: Optional[Callable[..., Any]] = None
    seed: int = 0
    #: where gpuloss returns (loss, grad, grad_target)-style tuples with
    #: return_grad: argument name -> field
    grad_fields: Dict[str, str] = field(default_factory=dict)
    #: errors gpuloss promises where torch has nothing to say (inplace_backward
    #: on a layout it cannot overwrite): array kind ("torch", "numpy",
    #: "cupy" or "*") -> (exception types, the argument the message names)
    expect_error: Dict[str, Tuple[Tuple[type, ...], str]] = field(default_factory=dict)

    @property
    def first(self) -> str:
        return next(iter(self.args))

    def is_loss(self) -> bool:
        return bool(self.grad_fields)

    def __repr__(self) -> str:
        return self.describe()

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints falsifying examples with this
        p.text(self.describe())

    def describe(self) -> str:
        parts = []
        for k, v in self.args.items():
            if isinstance(v, Arr):
                parts.append(f"{k}={v.describe(self.dtype)}")
            elif v is not None or k in ("dim",):
                parts.append(f"{k}={v!r}")
        return f"{self.fn}({', '.join(parts)}) [dtype {self.dtype}, seed {self.seed}]"


@dataclass
class Outcome:
    raised: Optional[BaseException] = None
    value: Optional[np.ndarray] = None
    dtype: Optional[str] = None
    shape: Optional[tuple] = None
    kind_ok: bool = True
    grads: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)  # view grads, random upstream
    sgrads: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)  # storage grads, random upstream
    vgrads: Dict[str, Optional[np.ndarray]] = field(default_factory=dict)  # view grads, upstream ones
    grad_dtypes: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


def upstream(rng_seed: int, shape) -> np.ndarray:
    """A random upstream gradient, never 1, exact in bfloat16."""
    r = np.random.default_rng(rng_seed + 7)
    return np.asarray(r.integers(1, 9, size=shape) / 4.0 * r.choice([-1.0, 1.0], size=shape), np.float64)


def _grads(y, wrt: Dict[str, Any], go) -> Dict[str, np.ndarray]:
    names = list(wrt)
    g = torch.autograd.grad(y, [wrt[n] for n in names], go, retain_graph=True, allow_unused=True)
    return {n: (np.zeros(tuple(wrt[n].shape)) if gi is None else to_np(gi)) for n, gi in zip(names, g)}


def _exact_dtype_args(args: Dict[str, Any], oracle: bool) -> Dict[str, Any]:
    """softmax's ``dtype=``: the float64 oracle computes on the input rounded
    to that dtype, in float64 (torch at that dtype is the low-precision run,
    whose own error sets the bound)."""
    dt = args.get("dtype")
    if not oracle or not isinstance(dt, torch.dtype) or not isinstance(args.get("input"), torch.Tensor):
        return args
    out = dict(args)
    out["input"], out["dtype"] = args["input"].to(dt).double(), None
    return out


def _run_torch(case: Case, dtype: str, oracle: bool, grad_names=None) -> Outcome:
    """The oracle on torch tensors: float64 on the rounded values
    (``oracle=True``) or at ``dtype``, with its gradients: random upstream
    with respect to the views (``grads``) and the storage (``sgrads``), and
    upstream ones with respect to the views (``vgrads``)."""
    out = Outcome()
    if grad_names is not None:
        case = replace(case, args={n: (replace(v, grad=False) if isinstance(v, Arr) and n not in grad_names else v)
                                   for n, v in case.args.items()})
    b = build_torch(case, dtype, requires_grad=True, oracle=oracle)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            y = case.oracle(**_exact_dtype_args(b.args, oracle))
        except Exception as e:  # noqa: BLE001 - whatever torch raises is the answer
            out.raised = e
            return out
        finally:
            out.warnings = [f"{x.category.__name__}: {x.message}" for x in w]
    out.value, out.shape, out.dtype = to_np(y), tuple(y.shape), dtype_of(y)
    if not (b.leaves and y.requires_grad):
        return out
    go = torch.from_numpy(upstream(case.seed, tuple(y.shape))).to(y.dtype)
    views = {n: b.views[n] for n in b.leaves}
    try:
        out.grads = _grads(y, views, go)
        out.sgrads = _grads(y, b.leaves, go)
        out.vgrads = _grads(y, views, torch.ones_like(y))
    except RuntimeError:
        # torch's own backward refuses some layouts (nll_loss2d: "grad_input
        # must be contiguous"): the same values, contiguous
        c = {n: (t.detach().contiguous().requires_grad_(n in b.leaves) if isinstance(t, torch.Tensor) else t)
             for n, t in b.args.items()}
        y = case.oracle(**_exact_dtype_args(c, oracle))
        cv = {n: c[n] for n in b.leaves}
        out.grads = _grads(y, cv, go)
        out.vgrads = _grads(y, cv, torch.ones_like(y))
        out.sgrads = {}
    return out


_WIDEN: Tuple[str, ...] = EXTENDED_INDEX_DTYPES


def run_oracle(case: Case, kind: str = "torch") -> Tuple[Outcome, Outcome]:
    """(float64 outcome, outcome at the case's dtype) of torch on ``case``.
    ``kind``: the array kind of the path compared, which decides the
    class-index dtypes the oracle widens to int64 (see EXTENDED_INDEX_DTYPES)."""
    require_torch()
    global _WIDEN
    old = _WIDEN
    _WIDEN = EXTENDED_INDEX_DTYPES + (() if kind == "torch" else NUMPY_EXTRA_INDEX_DTYPES)
    # NumPy and CuPy arrays have no requires_grad: only what return_grad
    # differentiates is differentiated (a "weight that requires grad" is a
    # torch-only question)
    grad_names = None if kind == "torch" or not case.grad_fields else set(case.grad_fields)
    try:
        out64 = _run_torch(case, case.dtype, oracle=True, grad_names=grad_names)
        lowp = _run_torch(case, case.dtype, oracle=False, grad_names=grad_names)
    finally:
        _WIDEN = old
    if out64.raised is None and lowp.raised is not None and not _missing_kernel(lowp.raised):
        # only the dtypes as given make torch raise (mixed float dtypes:
        # "expected scalar type Float but found Double"): that is the answer
        out64 = replace(out64, raised=lowp.raised)
    return out64, lowp


def _missing_kernel(e: BaseException) -> bool:
    """torch lacking a CPU kernel for a low-precision dtype is no verdict."""
    return isinstance(e, NotImplementedError) or "not implemented for" in str(e)


# ---------------------------------------------------------------------------
# paths: (array kind, backend, device, mode)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Path:
    kind: str       # "torch" | "numpy" | "cupy"
    backend: str    # "numpy" | "triton" | "cupy"
    device: str     # "cpu" | "cuda"
    mode: str       # "autograd" | "return_grad" | "plain"

    def __str__(self):
        return f"{self.kind} arrays on {self.device}, backend={self.backend}, {self.mode}"


def _available(name: str) -> bool:
    try:
        return dispatch.backend_status()[name][0]
    except Exception:  # noqa: BLE001
        return False


def torch_paths(backend: str) -> List[Tuple[str, str, str]]:
    """(kind, backend, device) combinations that ``backend`` can run here."""
    if not _available(backend):
        return []
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "numpy":
        return [("numpy", "numpy", "cpu"), ("torch", "numpy", "cpu")]
    if backend == "triton":
        return [("torch", "triton", "cpu")] if interp else [("torch", "triton", "cuda")]
    if backend == "cupy":
        return [("cupy", "cupy", "cuda"), ("torch", "cupy", "cuda")]
    return []


def paths_for(case: Case, backends: Sequence[str], modes=("autograd", "return_grad", "plain")) -> List[Path]:
    out = []
    for be in backends:
        for kind, b, dev in torch_paths(be):
            if kind == "torch":
                if "autograd" in modes:
                    out.append(Path(kind, b, dev, "autograd"))
                if "return_grad" in modes and case.is_loss():
                    out.append(Path(kind, b, dev, "return_grad"))
            else:
                if case.dtype not in ("float32", "float64"):
                    continue  # NumPy/CuPy have no bfloat16; float16 is not drawn for them
                if any(isinstance(v, Arr) and v.dtype is not None and v.dtype.startswith("uint")
                       and kind == "cupy" for v in case.args.values()):
                    continue
                if case.fn in ("softmax", "log_softmax") and case.args.get("dtype") is not None:
                    continue  # a torch dtype means nothing to NumPy
                if "return_grad" in modes and case.is_loss():
                    out.append(Path(kind, b, dev, "return_grad"))
                if "plain" in modes:
                    out.append(Path(kind, b, dev, "plain"))
    return out


class poisoned_empty:
    """torch.empty filled with NaN (integers: their maximum) while gpuloss
    runs: torch's deterministic mode does that (fill_uninitialized_memory), so
    an output a kernel never writes is NaN, not whatever the allocator had."""

    def __enter__(self):
        self.old = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.old[0], warn_only=self.old[1])


def run_ours(case: Case, path: Path) -> Tuple[Outcome, List[str]]:
    """Run gpuloss on ``path``; returns the outcome and the arguments it
    modified that it must not have modified."""
    with poisoned_empty():
        return _run_ours(case, path)


def _run_ours(case: Case, path: Path) -> Tuple[Outcome, List[str]]:
    res = Outcome()
    inplace = bool(case.args.get("inplace_backward"))
    if path.kind == "torch":
        b = build_torch(case, case.dtype, path.device, requires_grad=path.mode == "autograd",
                        consumable_input=inplace and path.mode == "autograd")
    elif path.kind == "numpy":
        b = build_numpy(case, case.dtype)
    else:
        b = build_cupy(case, case.dtype)
    before = {n: to_np(buf) for n, buf in b.buffers.items()}
    fn = getattr(gpuloss, case.fn)
    kw = dict(b.args)
    kw["backend"] = path.backend
    if path.mode == "return_grad":
        kw["return_grad"] = "all" if any(isinstance(case.args.get(n), Arr) and case.args[n].grad
                                         for n, f in case.grad_fields.items() if f == "grad_target") else True
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            out = fn(**kw)
            if path.mode == "return_grad":
                y = out[0]
                for n, fld in case.grad_fields.items():
                    if isinstance(case.args.get(n), Arr) and case.args[n].grad:
                        gv = getattr(out, fld)
                        res.vgrads[n] = to_np(gv)
                        if gv is not None:
                            res.grad_dtypes[n] = dtype_of(gv)
            else:
                y = out
            res.kind_ok = _same_kind(y, path.kind)
            res.value, res.dtype, res.shape = to_np(y), dtype_of(y), tuple(y.shape)
            if path.mode == "autograd" and b.leaves:
                if not y.requires_grad:
                    res.grads = {n: None for n in b.leaves}
                else:
                    go = torch.from_numpy(upstream(case.seed, tuple(y.shape))).to(y.device, y.dtype)
                    if inplace:
                        # the logits' view was rewritten by the in-place op: its
                        # gradient is read on the storage underneath
                        res.sgrads = _grads(y, b.leaves, go)
                    else:
                        res.grads = _grads(y, {n: b.views[n] for n in b.leaves}, go)
                    res.grad_dtypes = {n: dtype_of(b.leaves[n]) for n in b.leaves}
        except Exception as e:  # noqa: BLE001 - compared with what torch does
            res.raised = e
        res.warnings = [f"{x.category.__name__}: {x.message}" for x in w]
    modified = []
    for n, buf in b.buffers.items():
        if inplace and n == case.first and res.raised is None:
            continue  # asked for: the logits may hold their gradient now
        if not _same_values(before[n], to_np(buf)):
            modified.append(n)
    return res, modified


def _same_kind(y, kind: str) -> bool:
    if kind == "torch":
        return isinstance(y, torch.Tensor)
    if kind == "numpy":
        return isinstance(y, (np.ndarray, np.generic))
    return type(y).__module__.startswith("cupy")


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f"
                                              else a == b))


# ---------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------

#: exceptions a bad argument may raise: the README promises TypeError or
#: ValueError; RuntimeError where torch raises one for autograd reasons
ACCEPTED_ERRORS = (TypeError, ValueError, RuntimeError)


def acceptable_error(e: BaseException) -> bool:
    if isinstance(e, NotImplementedError):  # a RuntimeError, but a torch kernel missing is not a clear error
        return str(e).startswith("gpuloss")
    return isinstance(e, ACCEPTED_ERRORS)


def _fmt(a: Optional[np.ndarray], n: int = 6) -> str:
    if a is None:
        return "None"
    a = np.asarray(a)
    flat = a.ravel()
    s = np.array2string(flat[:n], precision=6, separator=", ")
    return f"{s}{'...' if flat.size > n else ''} (shape {a.shape})"


def close(ours: np.ndarray, ref: np.ndarray, dtype: str, scale: float = 1.0,
          torch_lowp: Optional[np.ndarray] = None, nan_ok: bool = False) -> Tuple[bool, str]:
    """``ours`` against the float64 ``ref`` at ``dtype``'s tolerance; NaN must
    match NaN and infinities must match in sign.

    ``torch_lowp``, torch's own result at the case's dtype, widens the bound to
    twice torch's own error (the rule of flash-attention's tests: we need not
    beat torch), and a NaN or infinity torch itself gives at that dtype (an
    overflow in float16) is accepted.  ``nan_ok``: a finite value where torch
    has NaN is accepted (gradients of rows whose inputs hold NaN/inf, see
    compare)."""
    rtol, atol = TOLERANCES[dtype]
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return False, f"shape {ours.shape} vs torch {ref.shape}"
    low = None
    if torch_lowp is not None and np.shape(torch_lowp) == ref.shape:
        low = np.asarray(torch_lowp, np.float64)
    # positions where ours reproduces torch's own non-finite low-precision result
    same_as_low = np.zeros(ref.shape, bool) if low is None else \
        (~np.isfinite(low) & ((ours == low) | (np.isnan(ours) & np.isnan(low))))
    nan_o, nan_r = np.isnan(ours), np.isnan(ref)
    bad = (nan_o != nan_r) & ~same_as_low
    if nan_ok:
        bad &= ~(nan_r & ~nan_o)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        return False, f"NaN pattern differs at {i}: ours {ours[i]}, torch {ref[i]}"
    inf_bad = (np.isinf(ours) | np.isinf(ref)) & (ours != ref) & ~nan_o & ~nan_r & ~same_as_low
    if inf_bad.any():
        i = tuple(np.argwhere(inf_bad)[0])
        return False, f"inf differs at {i}: ours {ours[i]}, torch {ref[i]}"
    fin = np.isfinite(ref) & np.isfinite(ours)
    err = np.abs(ours[fin] - ref[fin])
    bound = atol * scale + rtol * np.abs(ref[fin])
    if low is not None:
        tl = low[fin]
        own = np.where(np.isfinite(tl), np.abs(tl - ref[fin]), 0.0)
        bound = np.maximum(bound, 2.0 * own + atol * scale)
    if np.all(err <= bound):
        return True, ""
    if low is not None and dtype in ("bfloat16", "float16"):
        # low precision: no worse than twice torch's own worst error at this
        # dtype (per element, rounding luck would make torch look exact)
        tl = low[fin]
        own = np.abs(tl - ref[fin])[np.isfinite(tl)]
        if own.size and err.max() <= 2.0 * own.max() + atol * scale:
            return True, ""
    j = int(np.argmax(err - bound))
    idx = tuple(int(k) for k in np.argwhere(fin)[j])
    return False, (f"max excess at {idx}: ours {ours[idx]!r}, torch {ref[idx]!r}, |diff| {err[j]:.3g} > "
                   f"{bound[j]:.3g} (rtol {rtol}, atol {atol}*{scale:.3g})")


def has_nonfinite(case: Case) -> bool:
    return any(isinstance(v, Arr) and v.floating and not np.all(np.isfinite(v.logical()))
               for v in case.args.values())


def magnitude(case: Case) -> float:
    """A scale for absolute tolerances: the largest finite input magnitude
    (sums of float32 terms of size M carry errors of order eps * M)."""
    m = 1.0
    for v in case.args.values():
        if isinstance(v, Arr) and v.floating:
            x = np.abs(v.logical())
            x = x[np.isfinite(x)]
            if x.size:
                m = max(m, float(x.max()))
    return min(m, 1e4)


def check_case(case: Case, backends: Sequence[str] = ("numpy", "triton", "cupy"),
               modes=("autograd", "return_grad", "plain")) -> List[str]:
    """Every disagreement between gpuloss and torch on ``case``, one sentence each."""
    oracles: Dict[str, Tuple[Outcome, Outcome]] = {}
    problems: List[str] = []
    what = case.describe()
    for path in paths_for(case, backends, modes):
        okind = "torch" if path.kind == "torch" else "numpy"
        if okind not in oracles:
            oracles[okind] = run_oracle(case, okind)
        ref, lowp = oracles[okind]
        # GPU arrays: class indices are only read with value checks "always"
        # (otherwise a bad one gives a NaN row, by design); torch raises
        old = gpuloss.set_value_checks("always") if path.device == "cuda" else None
        try:
            ours, modified = run_ours(case, path)
        finally:
            if old is not None:
                gpuloss.set_value_checks(old)
        problems += compare(case, path, ref, lowp, ours, modified, what)
    return problems


def compare(case: Case, path: Path, ref: Outcome, lowp: Outcome, ours: Outcome, modified: List[str],
            what: str) -> List[str]:
    problems: List[str] = []
    pre = f"{case.fn} [{path}] on {what}:"
    for n in modified:
        problems.append(f"{pre} modified its argument {n!r}" + (
            f" (while raising {type(ours.raised).__name__}: {_short(ours.raised)})" if ours.raised else ""))
    expect = case.expect_error.get(path.kind, case.expect_error.get("*"))
    if expect is not None and ref.raised is None and path.mode != "plain":
        types, word = expect
        names = "/".join(t.__name__ for t in types)
        if ours.raised is None:
            problems.append(f"{pre} did not raise; gpuloss promises {names} naming {word!r}")
        elif not isinstance(ours.raised, types) or word not in str(ours.raised):
            problems.append(f"{pre} raised {type(ours.raised).__name__}: {_short(ours.raised)}; gpuloss promises "
                            f"{names} naming {word!r}")
        return problems
    if ref.raised is not None and path.mode != "autograd" and "not differentiable with respect to" in str(
            ref.raised):
        # torch refused an argument that requires grad; off the autograd path
        # nothing requires grad (the arrays are built without it), so the call
        # is valid there and torch's refusal says nothing about it
        return problems
    if ref.raised is not None:
        if ours.raised is None:
            problems.append(f"{pre} torch raises {type(ref.raised).__name__}: {_short(ref.raised)}; "
                            f"gpuloss returned {_fmt(ours.value)}")
        elif not acceptable_error(ours.raised):
            problems.append(f"{pre} torch raises {type(ref.raised).__name__}: {_short(ref.raised)}; gpuloss "
                            f"raised {type(ours.raised).__name__}: {_short(ours.raised)} (not a clear "
                            f"TypeError/ValueError)")
        return problems
    if ours.raised is not None:
        problems.append(f"{pre} torch returns {_fmt(ref.value)}; gpuloss raised "
                        f"{type(ours.raised).__name__}: {_short(ours.raised)}")
        return problems
    if not ours.kind_ok:
        problems.append(f"{pre} returned a {type(ours.value).__name__}, not a {path.kind} array")
    if lowp.raised is None and ours.dtype != lowp.dtype:
        problems.append(f"{pre} output dtype {ours.dtype}, torch {lowp.dtype}")
    if ours.shape != ref.shape:
        problems.append(f"{pre} output shape {ours.shape}, torch {ref.shape}")
        return problems
    scale = magnitude(case)
    # torch's gradient of a row whose logits hold NaN/inf is NaN even where
    # the row is ignored (log_softmax's backward multiplies exp(NaN) by 0);
    # gpuloss documents zero gradients for ignored rows.  Values stay strict.
    nan_ok = has_nonfinite(case)
    ok, why = close(ours.value, ref.value, _tol_dtype(case, ours.dtype), scale, lowp.value)
    if not ok:
        problems.append(f"{pre} value differs: {why}; ours {_fmt(ours.value)}, torch {_fmt(ref.value)}")
    for n, dt in ours.grad_dtypes.items():
        want = case.args[n].dtype or case.dtype
        if dt != want:
            problems.append(f"{pre} gradient for {n!r} has dtype {dt}, torch {want}")
    if path.mode == "autograd":
        theirs, mine_all, where = (ref.sgrads, ours.sgrads, "storage of ") if ours.sgrads else \
            (ref.grads, ours.grads, "")
        for n, g in theirs.items():
            mine = mine_all.get(n)
            if mine is None:
                problems.append(f"{pre} no gradient reaches {where}{n!r} (torch: {_fmt(g)})")
                continue
            low = (lowp.sgrads if ours.sgrads else lowp.grads).get(n)
            ok, why = close(mine, g, _tol_dtype(case, ours.grad_dtypes.get(n)), scale, low, nan_ok)
            if not ok:
                problems.append(f"{pre} gradient for {where}{n!r} (upstream != 1) differs: {why}; ours {_fmt(mine)}, "
                                f"torch {_fmt(g)}")
    elif path.mode == "return_grad":
        for n, g in ref.vgrads.items():
            if n not in case.grad_fields:
                continue
            mine = ours.vgrads.get(n)
            if mine is None:
                problems.append(f"{pre} return_grad gave no {case.grad_fields[n]} for {n!r} (torch: {_fmt(g)})")
                continue
            ok, why = close(mine, g, _tol_dtype(case, ours.grad_dtypes.get(n)), scale, lowp.vgrads.get(n), nan_ok)
            if not ok:
                problems.append(f"{pre} return_grad {case.grad_fields[n]} differs: {why}; ours {_fmt(mine)}, "
                                f"torch {_fmt(g)}")
    tw = [m for m in ref.warnings if "target size" in m]
    if tw and not any("target size" in m for m in ours.warnings):
        problems.append(f"{pre} torch warns ({tw[0][:120]}); gpuloss does not")
    return problems


def _tol_dtype(case: Case, dt: Optional[str]) -> str:
    """The coarsest of the case dtype, ``dt`` (an output in another dtype)
    and a ``dtype=`` the call computes in (softmax's)."""
    order = ["float64", "float32", "float16", "bfloat16"]
    cands = [d for d in (case.dtype, dt, case.args.get("dtype")) if d in order]
    return max(cands, key=order.index) if cands else "float64"


def _short(e: BaseException, n: int = 160) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[:n] + "..."


def assert_agrees(case: Case, **kw) -> None:
    problems = check_case(case, **kw)
    if problems:
        raise AssertionError(f"{len(problems)} disagreement(s) with torch:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------
# the oracles: each public function computed by PyTorch alone
# ---------------------------------------------------------------------------
# The functions torch has are called as they are.  gpuloss's additions are
# written with torch operations: z_loss and softcap on top of
# F.cross_entropy, kl_div_with_logits from F.log_softmax and F.kl_div,
# linear_cross_entropy as F.linear then cross-entropy.

def _index_target(t):
    if not t.is_floating_point() and str(t.dtype).replace("torch.", "") in _WIDEN:
        return t.long()
    return t


def _softmax_oracle(log: bool):
    def oracle(input, dim, dtype=None):
        f = F.log_softmax if log else F.softmax
        return f(input, dim, dtype=dtype) if dtype is not None else f(input, dim)
    return oracle


def _softmax_backward_oracle(log: bool):
    def oracle(grad_output, output, dim=-1):
        f = torch._log_softmax_backward_data if log else torch._softmax_backward_data
        return f(grad_output, output, dim, output.dtype)
    return oracle


def cross_entropy_oracle(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None, inplace_backward=False):
    target = _index_target(target)
    z = input if softcap is None else softcap * torch.tanh(input / softcap)
    ce = lambda red: F.cross_entropy(z, target, weight=weight, ignore_index=ignore_index, reduction=red,  # noqa: E731
                                     label_smoothing=label_smoothing)
    if not z_loss:
        return ce(reduction)
    cd = 1 if input.dim() >= 2 else 0
    lse = torch.logsumexp(z, dim=cd)
    if target.is_floating_point():
        valid = torch.ones_like(lse, dtype=torch.bool)
        divisor = lse.new_tensor(float(lse.numel()))
    else:
        valid = target != ignore_index
        C = input.shape[cd]
        wt = weight[target.clamp(0, C - 1)] if weight is not None else torch.ones_like(lse)
        divisor = (wt * valid).sum()
    per = ce("none") + torch.where(valid, z_loss * lse ** 2, torch.zeros_like(lse))
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / divisor


def nll_loss_oracle(input, target, weight=None, ignore_index=-100, reduction="mean"):
    return F.nll_loss(input, _index_target(target), weight=weight, ignore_index=ignore_index, reduction=reduction)


def kl_div_oracle(input, target, reduction="mean", log_target=False):
    return F.kl_div(input, target, reduction=reduction, log_target=log_target)


def kl_div_with_logits_oracle(input, target, temperature=1.0, reduction="batchmean", target_is_logits=True):
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension")
    if input.shape != target.shape:
        raise ValueError("input and target must have the same shape")
    logq = F.log_softmax(input / temperature, -1)
    if target_is_logits:
        row = F.kl_div(logq, F.log_softmax(target / temperature, -1), reduction="none", log_target=True).sum(-1)
    else:
        row = F.kl_div(logq, target, reduction="none").sum(-1)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    if reduction == "batchmean":
        return row.sum() / row.numel()
    if reduction == "mean":
        return row.sum() / input.numel()
    raise ValueError(f"reduction {reduction!r}")


def bce_with_logits_oracle(input, target, weight=None, reduction="mean", pos_weight=None):
    return F.binary_cross_entropy_with_logits(input, target, weight=weight, reduction=reduction, pos_weight=pos_weight)


def bce_oracle(input, target, weight=None, reduction="mean"):
    return F.binary_cross_entropy(input, target, weight=weight, reduction=reduction)


def mse_oracle(input, target, reduction="mean"):
    return F.mse_loss(input, target, reduction=reduction)


def linear_cross_entropy_oracle(input, linear_weight, target, linear_bias=None, weight=None, reduction="mean",
                                ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0, softcap=None,
                                chunk_size=None, acc_dtype=None, allow_retain_graph=False):
    """torch's own F.linear_cross_entropy where there is nothing of ours to
    add; with z_loss / softcap, the definition: linear, then cross-entropy."""
    target = _index_target(target)
    if not z_loss and softcap is None and hasattr(F, "linear_cross_entropy"):
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=weight,
                                      reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing)
    if input.dim() not in (1, 2):
        raise ValueError("input must be 1-D or 2-D")
    z = F.linear(input, linear_weight, linear_bias)
    return cross_entropy_oracle(z, target, weight, -100 if ignore_index is None else ignore_index, reduction,
                                label_smoothing, z_loss, softcap)


def _lazy(name: str, *a):
    def call(**kw):
        require_torch()
        f = globals()[name]
        return (f(*a) if a else f)(**kw)
    return call


ORACLES = {
    "softmax": _lazy("_softmax_oracle", False),
    "log_softmax": _lazy("_softmax_oracle", True),
    "softmax_backward": _lazy("_softmax_backward_oracle", False),
    "log_softmax_backward": _lazy("_softmax_backward_oracle", True),
    "cross_entropy": _lazy("cross_entropy_oracle"),
    "nll_loss": _lazy("nll_loss_oracle"),
    "kl_div": _lazy("kl_div_oracle"),
    "kl_div_with_logits": _lazy("kl_div_with_logits_oracle"),
    "binary_cross_entropy_with_logits": _lazy("bce_with_logits_oracle"),
    "binary_cross_entropy": _lazy("bce_oracle"),
    "mse_loss": _lazy("mse_oracle"),
    "linear_cross_entropy": _lazy("linear_cross_entropy_oracle"),
}

#: return_grad fields per function: argument -> LossGrad / LinearLossGrad field
GRAD_FIELDS = {
    "cross_entropy": {"input": "grad", "target": "grad_target"},
    "nll_loss": {"input": "grad"},
    "kl_div": {"input": "grad", "target": "grad_target"},
    "kl_div_with_logits": {"input": "grad"},
    "binary_cross_entropy_with_logits": {"input": "grad", "target": "grad_target"},
    "binary_cross_entropy": {"input": "grad", "target": "grad_target"},
    "mse_loss": {"input": "grad", "target": "grad_target"},
    "linear_cross_entropy": {"input": "grad_input", "linear_weight": "grad_linear_weight",
                             "linear_bias": "grad_linear_bias"},
}


def make_case(fn: str, args: Dict[str, Any], dtype: str = "float64", seed: int = 0, **kw) -> Case:
    """A Case with the function's oracle and return_grad fields; NumPy arrays
    in ``args`` become contiguous Arrs (floating ones differentiable when
    they are the first argument)."""
    out = {}
    for i, (k, v) in enumerate(args.items()):
        if isinstance(v, np.ndarray):
            v = contiguous(v, grad=(i == 0 and np.issubdtype(v.dtype, np.floating)))
        out[k] = v
    return Case(fn, out, dtype, ORACLES[fn], seed, dict(GRAD_FIELDS.get(fn, {})), **kw)
