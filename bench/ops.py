"""What the benchmark measures: each op's inputs, its byte floor and its check.

An :class:`Op` knows three things about one row of the benchmark table:

* how to make fresh random inputs of a shape and dtype on the benchmark's
  device (torch tensors; every implementation converts them to its own kind),
* how many bytes the op must move at the least (the floor of ``PERF.md``):
  each input read once, each output written once,
* how to check an implementation's outputs against the float64 reference
  (:mod:`gpuloss.reference` on a subset of rows, plus a float64 torch
  computation of a reduced scalar over every row).

Implementations return their outputs in one canonical form per op
(:attr:`Op.outputs`): ``"y"`` (a tensor like the input), ``"loss"`` (a
scalar), or ``"loss,grad"`` (a scalar and the gradient with respect to the
first input).  Later issues (fused linear cross-entropy, vocab-parallel
cross-entropy) add rows with :func:`register_op` and register their
implementations with :func:`gpuloss.bench.impls.register_impl_op`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: temperature of the distillation KL rows (every implementation gets it)
KL_TEMPERATURE = 2.0

# Check tolerances per storage dtype: (rtol, atol as a fraction of max|ref|).
# These are the benchmark's sanity gate, not the test-suite's table
# (tests/conftest.py): the benchmark checks a whole mean-reduced loss in
# whatever dtype the implementation returns it (torch returns a bf16 loss for
# bf16 logits: 2**-8 relative rounding), and gradients of a mean that are
# ~1/(N*V) small, so the absolute part is scaled by the reference's magnitude.
CHECK_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-6),
    "float16": (4e-3, 1e-3),
    "bfloat16": (2e-2, 4e-3),
}

#: rows of a large input checked against the float64 reference
CHECK_ROWS = 16
#: elements per chunk when a scalar reference is computed in float64 over
#: every row (bounds the float64 temporaries: 2**25 * 8 B = 256 MiB)
CHUNK_ELEMS = 1 << 25


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name."""
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}[dtype]


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"8192x32000"`` -> ``(8192, 32000)``."""
    try:
        dims = tuple(int(p) for p in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected e.g. 8192x32000") from None
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"bad shape {text!r}: every dimension must be positive")
    return dims


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


# --------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------

def compare(out: Any, ref: np.ndarray, dtype: str, what: str) -> Tuple[bool, str]:
    """Element-wise ``|out - ref| <= atol*max|ref| + rtol*|ref|``.

    Returns (ok, detail); ``detail`` names the worst element's error relative
    to ``max|ref|`` so a WRONG row says by how much."""
    rtol, atol_rel = CHECK_TOLERANCES[dtype]
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        return False, f"{what}: shape {out.shape} != expected {ref.shape}"
    if not np.all(np.isfinite(out)):
        bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
        return False, f"{what}: {bad} non-finite value(s)"
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = np.abs(out - ref)
    allowed = atol_rel * scale + rtol * np.abs(ref)
    worst = float(np.max(err / np.maximum(scale, np.finfo(np.float64).tiny))) if err.size else 0.0
    if np.all(err <= allowed):
        return True, f"{what} max err {worst:.1e} of max|ref|"
    return False, f"{what}: max err {worst:.2e} of max|ref| (rtol {rtol:g}, atol {atol_rel:g}*max|ref|)"


def compare_scalar(out: Any, ref: float, dtype: str, what: str = "loss") -> Tuple[bool, str]:
    rtol, _ = CHECK_TOLERANCES[dtype]
    if hasattr(out, "detach"):  # a (CUDA) torch tensor: np.asarray cannot read device memory
        out = out.detach().double().cpu().numpy()
    o = float(np.asarray(out, dtype=np.float64).reshape(()))
    if not math.isfinite(o):
        return False, f"{what} is {o}"
    rel = abs(o - ref) / max(abs(ref), 1e-30)
    if rel <= rtol:
        return True, f"{what} rel err {rel:.1e}"
    return False, f"{what} {o:.7g} != reference {ref:.7g} (rel err {rel:.2e} > {rtol:g})"


# --------------------------------------------------------------------------
# the op description
# --------------------------------------------------------------------------

@dataclass
class Op:
    """One benchmarked operation.

    Attributes
    ----------
    name : str
        Key used on the command line (``--ops``) and in the output files.
    title : str
        Human-readable name for the table.
    outputs : str
        Canonical output form: ``"y"``, ``"loss"`` or ``"loss,grad"``.
    floor_bytes : callable ``(shape, dtype) -> int``
        Fewest bytes the op must move (``PERF.md``).
    make_inputs : callable ``(shape, dtype, device, generator) -> dict``
        Fresh random torch tensors; never zeros.
    check : callable ``(outputs, inputs, dtype, cache) -> (ok, detail)``
        Compares canonical outputs with the float64 reference; ``cache`` is a
        dict shared by every implementation of one row (references are
        computed once per row).
    mutated : tuple of str
        Names of inputs an in-place implementation may overwrite (the runner
        hands such an implementation private clones).
    """
    name: str
    title: str
    outputs: str
    floor_bytes: Callable[[Tuple[int, ...], str], int]
    make_inputs: Callable[..., Dict[str, Any]]
    check: Callable[..., Tuple[bool, str]]
    mutated: Tuple[str, ...] = ("x",)
    shapes: Optional[Dict[str, List[str]]] = None  # per-device default shapes, None: the row-op sets
    notes: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


OPS: Dict[str, Op] = {}


def register_op(op: Op) -> Op:
    """Add (or replace) an op; the hook for later issues' rows."""
    OPS[op.name] = op
    return op


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------

def _torch_dtype(dtype: str):
    import torch
    return getattr(torch, dtype)


def randn(shape, dtype: str, device, gen, scale: float = 2.0):
    """randn * scale, generated directly in ``dtype`` (no float32 temporary
    twice the size of a bf16 input)."""
    import torch
    t = torch.randn(tuple(shape), dtype=_torch_dtype(dtype), device=device, generator=gen)
    return t.mul_(scale)


def _logits(shape, dtype, device, gen):
    return {"x": randn(shape, dtype, device, gen)}


def _softmax_bwd_inputs(shape, dtype, device, gen):
    import torch
    x = randn(shape, dtype, device, gen)
    # y must be a real softmax output: the backward formula assumes rows of y
    # sum to one.  torch computes it in float32 and rounds once to dtype.
    y = torch.softmax(x, dim=-1)
    del x
    dy = randn(shape, dtype, device, gen, scale=1.0)
    return {"y": y, "dy": dy}


def _ce_inputs(shape, dtype, device, gen):
    import torch
    x = randn(shape, dtype, device, gen)
    t = torch.randint(0, shape[-1], (shape[0],), device=device, generator=gen, dtype=torch.int64)
    return {"x": x, "t": t}


def _bce_inputs(shape, dtype, device, gen):
    import torch
    x = randn(shape, dtype, device, gen)
    # soft labels in (0, 1): exercises both terms of the loss
    t = torch.rand(tuple(shape), dtype=_torch_dtype(dtype), device=device, generator=gen)
    return {"x": x, "t": t}


def _pair_inputs(shape, dtype, device, gen):
    return {"x": randn(shape, dtype, device, gen), "t": randn(shape, dtype, device, gen)}


# --------------------------------------------------------------------------
# byte floors (PERF.md): every input read once, every output written once
# --------------------------------------------------------------------------

def _nv(shape) -> int:
    return int(np.prod(shape))


def bytes_softmax_fwd(shape, dtype) -> int:
    # read x, write y
    return 2 * _nv(shape) * itemsize(dtype)


def bytes_softmax_bwd(shape, dtype) -> int:
    # read y and dy, write dx
    return 3 * _nv(shape) * itemsize(dtype)


def bytes_ce_loss(shape, dtype) -> int:
    # read the logits once, plus the int64 targets (O(N)); the scalar loss is 4 B
    return _nv(shape) * itemsize(dtype) + shape[0] * 8 + 4


def bytes_ce_loss_grad(shape, dtype) -> int:
    # read the logits, write dlogits, plus targets and the scalar
    return 2 * _nv(shape) * itemsize(dtype) + shape[0] * 8 + 4


def bytes_elementwise_grad(shape, dtype) -> int:
    # read input and target, write the gradient of the input (+ the scalar)
    return 3 * _nv(shape) * itemsize(dtype) + 4


# --------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------

def check_rows(n: int, cache: dict) -> np.ndarray:
    """The row subset checked against the float64 reference: first, last and
    random rows in between (fixed per row of the table through ``cache``)."""
    if "rows" not in cache:
        rng = np.random.default_rng()
        k = min(n, CHECK_ROWS)
        rows = set([0, n - 1]) if n > 0 else set()
        if n > 2 and k > 2:
            rows.update(rng.choice(np.arange(1, n - 1), size=min(k - 2, n - 2), replace=False).tolist())
        cache["rows"] = np.array(sorted(rows), dtype=np.int64)
    return cache["rows"]


def host64(t, rows=None) -> np.ndarray:
    """float64 (or int64) NumPy copy of a torch tensor or a subset of its rows."""
    import torch
    if rows is not None:
        t = t[torch.as_tensor(rows, device=t.device)]
    if t.is_floating_point():
        t = t.double()
    return t.detach().cpu().numpy()


def _chunked_sum(fn, *tensors) -> float:
    """sum over every row of ``fn(*row_chunks)`` computed in float64 on the
    tensors' device, a few rows at a time (a float64 copy of a 16384x128256
    input would be 17 GB)."""
    import torch
    n = tensors[0].shape[0]
    row_elems = max(1, _nv(tensors[0].shape[1:]))
    step = max(1, CHUNK_ELEMS // row_elems)
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for i in range(0, n, step):
        chunk = [t[i:i + step].double() if t.is_floating_point() else t[i:i + step] for t in tensors]
        total += fn(*chunk).sum()
    return float(total)


def scalar_ce(x, t) -> float:
    """mean over rows of logsumexp(x_i) - x_i[t_i], in float64."""
    return _chunked_sum(lambda xc, tc: xc.logsumexp(-1) - xc.gather(1, tc[:, None])[:, 0], x, t) / x.shape[0]


def scalar_bce(x, t) -> float:
    """mean of (1 - t) x + log(1 + exp(-x)), in float64."""
    import torch.nn.functional as F
    return _chunked_sum(lambda xc, tc: (1 - tc) * xc + F.softplus(-xc), x, t) / x.numel()


def scalar_mse(x, t) -> float:
    return _chunked_sum(lambda xc, tc: (xc - tc) ** 2, x, t) / x.numel()


def scalar_kl(x, t, temperature: float) -> float:
    """batchmean of KL(softmax(t/T) || softmax(x/T)), in float64."""
    def per_row(xc, tc):
        logq = (xc / temperature).log_softmax(-1)
        logd = (tc / temperature).log_softmax(-1)
        return (logd.exp() * (logd - logq)).sum(-1)
    return _chunked_sum(per_row, x, t) / x.shape[0]


def _memo(cache: dict, key: str, fn):
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def _check_rows_out(out, ref_fn, inputs, names, dtype, cache, what):
    rows = check_rows(out.shape[0], cache)
    ref = _memo(cache, "ref_" + what, lambda: ref_fn(*[host64(inputs[n], rows) for n in names]))
    return compare(host64(out, rows), ref, dtype, what)


def _check_loss_grad(outputs, inputs, dtype, cache, scalar_fn, grad_ref_fn, grad_scale):
    loss, grad = outputs
    ref = _memo(cache, "scalar", scalar_fn)
    ok, d1 = compare_scalar(loss, ref, dtype)
    if not ok:
        return ok, d1
    rows = check_rows(grad.shape[0], cache)
    gref = _memo(cache, "grad_rows", lambda: grad_ref_fn(host64(inputs["x"], rows), host64(inputs["t"], rows))
                 * grad_scale)
    ok, d2 = compare(host64(grad, rows), gref, dtype, "grad")
    return ok, (d1 + "; " + d2) if ok else d2


def _ref():
    from gpuloss import reference
    return reference


def _check_softmax_fwd(outputs, inputs, dtype, cache):
    return _check_rows_out(outputs, lambda x: _ref().softmax(x), inputs, ["x"], dtype, cache, "y")


def _check_log_softmax_fwd(outputs, inputs, dtype, cache):
    return _check_rows_out(outputs, lambda x: _ref().log_softmax(x), inputs, ["x"], dtype, cache, "y")


def _check_softmax_bwd(outputs, inputs, dtype, cache):
    return _check_rows_out(outputs, lambda y, dy: _ref().softmax_backward(y, dy), inputs, ["y", "dy"],
                           dtype, cache, "dx")


def _check_ce_loss(outputs, inputs, dtype, cache):
    ref = _memo(cache, "scalar", lambda: scalar_ce(inputs["x"], inputs["t"]))
    return compare_scalar(outputs, ref, dtype)


def _check_ce_loss_grad(outputs, inputs, dtype, cache):
    n = inputs["x"].shape[0]
    # gradient of the mean = gradient of the per-row sum / N (no ignored rows, no weights)
    return _check_loss_grad(outputs, inputs, dtype, cache, lambda: scalar_ce(inputs["x"], inputs["t"]),
                            lambda x, t: _ref().cross_entropy_grad(x, t, reduction="sum")[0], 1.0 / n)


def _check_bce_loss_grad(outputs, inputs, dtype, cache):
    return _check_loss_grad(outputs, inputs, dtype, cache, lambda: scalar_bce(inputs["x"], inputs["t"]),
                            lambda x, t: _ref().binary_cross_entropy_with_logits_grad(x, t, reduction="sum")[0],
                            1.0 / inputs["x"].numel())


def _check_mse_loss_grad(outputs, inputs, dtype, cache):
    return _check_loss_grad(outputs, inputs, dtype, cache, lambda: scalar_mse(inputs["x"], inputs["t"]),
                            lambda x, t: _ref().mse_loss_grad(x, t, reduction="sum")[0],
                            1.0 / inputs["x"].numel())


def _check_kl_loss_grad(outputs, inputs, dtype, cache):
    T = KL_TEMPERATURE
    return _check_loss_grad(
        outputs, inputs, dtype, cache, lambda: scalar_kl(inputs["x"], inputs["t"], T),
        lambda x, t: _ref().kl_div_with_logits_grad(x, t, temperature=T, reduction="sum")[0],
        1.0 / inputs["x"].shape[0])


register_op(Op("softmax_fwd", "softmax fwd", "y", bytes_softmax_fwd, _logits, _check_softmax_fwd, mutated=()))
register_op(Op("softmax_bwd", "softmax bwd", "y", bytes_softmax_bwd, _softmax_bwd_inputs, _check_softmax_bwd,
               mutated=()))
register_op(Op("log_softmax_fwd", "log_softmax fwd", "y", bytes_softmax_fwd, _logits, _check_log_softmax_fwd,
               mutated=()))
register_op(Op("ce_loss", "CE loss only", "loss", bytes_ce_loss, _ce_inputs, _check_ce_loss, mutated=()))
register_op(Op("ce_loss_grad", "CE loss+grad", "loss,grad", bytes_ce_loss_grad, _ce_inputs, _check_ce_loss_grad))
register_op(Op("bce_loss_grad", "BCE-with-logits loss+grad", "loss,grad", bytes_elementwise_grad, _bce_inputs,
               _check_bce_loss_grad))
register_op(Op("mse_loss_grad", "MSE loss+grad", "loss,grad", bytes_elementwise_grad, _pair_inputs,
               _check_mse_loss_grad))
register_op(Op("kl_loss_grad", f"KL from logits (T={KL_TEMPERATURE:g}) loss+grad", "loss,grad",
               bytes_elementwise_grad, _pair_inputs, _check_kl_loss_grad,
               notes="distillation: KL(softmax(t/T) || softmax(x/T)), batchmean, grad w.r.t. x"))
