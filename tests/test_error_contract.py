"""The README's promises about bad arguments and about the caller's arrays,
for every public function and every argument, on every backend that runs here:

* "Bad arguments raise TypeError or ValueError naming the argument, before
  any work": one table row per (function, argument, bad values).
* "Inputs are never modified unless you ask for inplace_backward=True":
  copies of every array argument are compared before and after each call,
  successful or raising; with inplace_backward=True only ``input`` may change.
* Nothing is read out of bounds: out-of-range class indices raise a clear
  ValueError on the CPU whatever ``gpuloss.set_value_checks`` says (on a GPU
  with checks off, the row is NaN); arrays that are strided views into a
  NaN-filled buffer give finite results equal to the contiguous call's.

Adding a function is one entry in VALID and its rows in BAD.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest

import gpuloss
import torchdiff as D
from conftest import tol

torch = D.require_torch()

# ---------------------------------------------------------------------------
# the arrays of one call, in any array library
# ---------------------------------------------------------------------------


class A:
    """An array argument given as NumPy values, made in the kind of the call
    (NumPy array, torch tensor, CuPy array).  ``dtype`` None keeps the values'
    dtype; ``other_kind``: made as a NumPy array for torch calls and as a
    torch tensor otherwise (mixed kinds); ``bad_for``: the array kinds for
    which it is a bad value (torch refuses uint16/32/64 class indices; for
    NumPy arrays every integer dtype is a class index)."""

    def __init__(self, values, dtype=None, other_kind=False, bad_for=("numpy", "torch", "cupy")):
        self.values = np.asarray(values)
        self.dtype = dtype
        self.other_kind = other_kind
        self.bad_for = bad_for

    def __repr__(self):
        kind = " of another array kind" if self.other_kind else ""
        return f"{self.dtype or self.values.dtype}{list(self.values.shape)}{kind}"

    def make(self, kind: str, device: str):
        if self.other_kind:
            kind, device = ("numpy", "cpu") if kind == "torch" else ("torch", "cpu")
        dt = self.dtype or str(self.values.dtype)
        if kind == "numpy":
            return np.array(self.values, dtype=dt)
        if kind == "torch":  # a copy: an in-place call must not write into the table
            t = torch.from_numpy(np.array(self.values))
            return t.to(device=device, dtype=getattr(torch, dt))
        import cupy
        return cupy.asarray(self.values, dtype=dt)


_rng = np.random.default_rng(7)  # the table's values; never written (A.make copies)
N, C, H = 4, 6, 3
LOGITS = _rng.standard_normal((N, C))
LOGP = LOGITS - np.log(np.exp(LOGITS).sum(1, keepdims=True))
PROBS = np.exp(LOGP)
TARGET = np.array([0, 5, 2, 1])
U01 = _rng.uniform(0.05, 0.95, (N, C))

#: every public function with arguments that make a valid call
VALID: Dict[str, Dict[str, Any]] = {
    "softmax": dict(input=A(LOGITS), dim=1),
    "log_softmax": dict(input=A(LOGITS), dim=-1),
    "softmax_backward": dict(grad_output=A(U01 - 0.5), output=A(PROBS), dim=1),
    "log_softmax_backward": dict(grad_output=A(U01 - 0.5), output=A(LOGP), dim=-1),
    "cross_entropy": dict(input=A(LOGITS), target=A(TARGET), weight=A(_rng.uniform(0.5, 2, C)), ignore_index=-100,
                          reduction="mean", label_smoothing=0.1, z_loss=1e-3, softcap=30.0, inplace_backward=False),
    # the same with the gradient written over the logits: a raising call must
    # leave them untouched too
    "cross_entropy[inplace]": dict(input=A(LOGITS), target=A(TARGET), weight=A(_rng.uniform(0.5, 2, C)),
                                   ignore_index=-100, reduction="sum", label_smoothing=0.1, inplace_backward=True),
    "nll_loss": dict(input=A(LOGP), target=A(TARGET), weight=A(_rng.uniform(0.5, 2, C)), ignore_index=-100,
                     reduction="mean"),
    "kl_div": dict(input=A(LOGP), target=A(PROBS), reduction="batchmean", log_target=False),
    "kl_div_with_logits": dict(input=A(LOGITS), target=A(LOGITS[::-1].copy()), temperature=2.0,
                               reduction="batchmean", target_is_logits=True),
    "binary_cross_entropy_with_logits": dict(input=A(LOGITS), target=A(U01), weight=A(_rng.uniform(0.5, 2, (1, C))),
                                             reduction="mean", pos_weight=A(_rng.uniform(0.5, 2, C))),
    "binary_cross_entropy": dict(input=A(U01), target=A(U01[::-1].copy()), weight=A(_rng.uniform(0.5, 2, C)),
                                 reduction="sum"),
    "mse_loss": dict(input=A(LOGITS), target=A(U01), reduction="mean"),
    "linear_cross_entropy": dict(input=A(_rng.standard_normal((N, H))), linear_weight=A(_rng.standard_normal((C, H))),
                                 target=A(TARGET), linear_bias=A(_rng.standard_normal(C)), ignore_index=-100,
                                 reduction="mean", label_smoothing=0.1, weight=A(_rng.uniform(0.5, 2, C)),
                                 z_loss=1e-3, softcap=30.0, chunk_size=2, acc_dtype=None,
                                 allow_retain_graph=False),
}


def _fn(row: str) -> Callable:
    return getattr(gpuloss, row.split("[")[0])


def _first(row: str) -> str:
    return next(iter(VALID[row]))


#: (kind, backend, device) on which the contract is checked here
def _paths() -> List[Tuple[str, str, str]]:
    out = []
    for be in ("numpy", "triton", "cupy"):
        out += D.torch_paths(be)
    return out


PATHS = _paths()
PATH_IDS = [f"{k}-{b}" for k, b, _ in PATHS]


def _build(args: Dict[str, Any], kind: str, device: str) -> Dict[str, Any]:
    return {k: (v.make(kind, device) if isinstance(v, A) else v) for k, v in args.items()}


def _snapshot(args: Dict[str, Any]) -> Dict[str, np.ndarray]:
    return {k: D.to_np(v) for k, v in args.items() if _is_array(v)}


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or isinstance(v, torch.Tensor) or type(v).__module__.startswith("cupy")


def _modified(before: Dict[str, np.ndarray], args: Dict[str, Any], allowed=()) -> List[str]:
    out = []
    for k, a in before.items():
        if k in allowed:
            continue
        b = D.to_np(args[k])
        if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
            out.append(k)
    return out


# ---------------------------------------------------------------------------
# bad values: (row, argument, [bad values])
# ---------------------------------------------------------------------------

NOT_ARRAYS = [None, [1.0, 2.0], "x", 3.0]
OPTIONAL_NOT_ARRAYS = NOT_ARRAYS[1:]  # None is the default of an optional array
BAD_IGNORE_INDEX = [2.5, True, 2 ** 64, -2 ** 64, float("nan"), "3", None, 1.0]
BAD_REDUCTION = ["avg", None, "MEAN", 1, "batchmean"]
BAD_BOOL = [1, "yes", None, 0.0]
BAD_RETURN_GRAD = ["yes", 2, None]
BAD_NONNEG = [-1.0, float("nan"), float("inf"), "0.1", None]
BAD_POSITIVE = [0.0, -1.0, float("nan"), float("inf"), "2", True]

BAD: List[Tuple[str, str, list]] = [
    ("softmax", "input", NOT_ARRAYS + [A(np.ones((2, 3), np.int64))]),
    ("softmax", "dim", [2, -3, 1.0, "1", True]),
    ("log_softmax", "input", NOT_ARRAYS + [A(np.ones((2, 3), np.int64))]),
    ("log_softmax", "dim", [2, -3, 1.0, "1", True]),
    ("softmax_backward", "grad_output", NOT_ARRAYS + [A(np.ones((N, C + 1))), A(np.ones((N, C), np.int64))]),
    ("softmax_backward", "output", NOT_ARRAYS + [A(np.ones((N, C + 1))), A(np.ones((N, C), np.int32))]),
    ("softmax_backward", "dim", [2, -3, 1.0, True]),
    ("log_softmax_backward", "grad_output", NOT_ARRAYS + [A(np.ones((N + 1, C)))]),
    ("log_softmax_backward", "output", NOT_ARRAYS + [A(np.ones((N, C), np.int64))]),
    ("log_softmax_backward", "dim", [2, "1"]),
    ("cross_entropy", "input", NOT_ARRAYS + [A(np.ones((N, C), np.int64)), A(np.array(1.0)),
                                             A(LOGITS, other_kind=True)]),
    ("cross_entropy", "target", NOT_ARRAYS + [
        A(TARGET.astype(np.float64)),             # floating class indices
        A(np.array([0, 1, 2])),                   # wrong length
        A(np.array([[0, 1, 2, 3]])),              # wrong rank
        A(np.array([0, 6, 2, 1])),                # index == C
        A(np.array([0, -1, 2, 1])),               # negative, not ignore_index
        A(np.array([0, 2 ** 40, 2, 1])),          # far out of range
        A(TARGET, dtype="bool"),
        A(TARGET, dtype="uint16", bad_for=("torch",)), A(TARGET, dtype="uint32", bad_for=("torch",)),
        A(TARGET, dtype="uint64", bad_for=("torch",)),
        A(np.ones((N, C + 1)) / (C + 1)),         # probabilities of the wrong shape
    ]),
    ("cross_entropy", "weight", OPTIONAL_NOT_ARRAYS + [A(np.ones(C + 1)), A(np.ones((1, C))), A(np.ones(C, np.int64)),
                                              A(np.ones(C), other_kind=True)]),
    ("cross_entropy", "ignore_index", BAD_IGNORE_INDEX),
    ("cross_entropy", "reduction", BAD_REDUCTION),
    ("cross_entropy", "label_smoothing", [1.5, float("inf"), "0.1", None]),
    ("cross_entropy", "z_loss", BAD_NONNEG),
    ("cross_entropy", "softcap", BAD_POSITIVE),
    ("cross_entropy", "inplace_backward", BAD_BOOL),
    ("cross_entropy", "return_grad", BAD_RETURN_GRAD),
    ("cross_entropy", "backend", ["fortran", 3]),
    ("cross_entropy[inplace]", "input", [A(np.ones((N, C), np.int64)), A(np.array(1.0))]),
    ("cross_entropy[inplace]", "target", [A(np.array([0, 6, 2, 1])), A(np.array([0, -1, 2, 1])),
                                          A(TARGET.astype(np.float64)), A(np.array([0, 1, 2])),
                                          A(TARGET, dtype="uint16", bad_for=("torch",))]),
    ("cross_entropy[inplace]", "weight", [A(np.ones(C + 1)), A(np.ones(C, np.int64))]),
    ("cross_entropy[inplace]", "ignore_index", BAD_IGNORE_INDEX),
    ("cross_entropy[inplace]", "reduction", BAD_REDUCTION),
    ("cross_entropy[inplace]", "label_smoothing", [1.5, "0.1"]),
    ("nll_loss", "input", NOT_ARRAYS + [A(np.ones((N, C), np.int64)), A(np.array(1.0))]),
    ("nll_loss", "target", NOT_ARRAYS + [A(TARGET.astype(np.float64)), A(np.array([0, 1, 2])),
                                         A(np.array([0, 6, 2, 1])), A(np.array([0, -7, 2, 1])),
                                         A(TARGET, dtype="bool"), A(TARGET, dtype="uint64", bad_for=("torch",))]),
    ("nll_loss", "weight", OPTIONAL_NOT_ARRAYS + [A(np.ones(C - 1)), A(np.ones(C, np.int32))]),
    ("nll_loss", "ignore_index", BAD_IGNORE_INDEX),
    ("nll_loss", "reduction", BAD_REDUCTION),
    ("kl_div", "input", NOT_ARRAYS + [A(np.ones((N, C), np.int64))]),
    ("kl_div", "target", NOT_ARRAYS + [A(np.ones((N, C), np.int64)), A(np.ones((N + 1, C)))]),
    ("kl_div", "reduction", ["avg", None, 1]),
    ("kl_div", "log_target", BAD_BOOL),
    ("kl_div_with_logits", "input", NOT_ARRAYS + [A(np.ones((N, C), np.int64)), A(np.array(1.0))]),
    ("kl_div_with_logits", "target", NOT_ARRAYS + [A(np.ones((N, C), np.int64)), A(np.ones((N, C + 1)))]),
    ("kl_div_with_logits", "temperature", BAD_POSITIVE),
    ("kl_div_with_logits", "reduction", ["avg", None]),
    ("kl_div_with_logits", "target_is_logits", BAD_BOOL),
    ("binary_cross_entropy_with_logits", "input", NOT_ARRAYS + [A(np.ones((N, C), np.int64))]),
    ("binary_cross_entropy_with_logits", "target", NOT_ARRAYS + [A(np.ones((N, C), np.int64)),
                                                                 A(np.ones((N, C + 1)))]),
    # integer BCE weights are taken in input's dtype, as torch takes them; a bool pos_weight is not
    ("binary_cross_entropy_with_logits", "weight", OPTIONAL_NOT_ARRAYS + [A(np.ones(C + 1)), A(np.ones((2, N, C)))]),
    ("binary_cross_entropy_with_logits", "pos_weight", OPTIONAL_NOT_ARRAYS + [A(np.ones(C + 1)), A(np.ones(C, bool))]),
    ("binary_cross_entropy_with_logits", "reduction", BAD_REDUCTION),
    ("binary_cross_entropy", "input", NOT_ARRAYS + [A(np.ones((N, C), np.int64)),
                                                    A(np.full((N, C), 1.5)), A(np.full((N, C), -0.5)),
                                                    A(np.full((N, C), np.nan))]),
    ("binary_cross_entropy", "target", NOT_ARRAYS + [A(np.ones((N, C), np.int64)), A(np.ones((N, C + 1))),
                                                     A(np.full((N, C), 2.0))]),
    ("binary_cross_entropy", "weight", OPTIONAL_NOT_ARRAYS + [A(np.ones(C + 1))]),
    ("binary_cross_entropy", "reduction", BAD_REDUCTION),
    # an integer or bool operand next to a floating one is promoted, as torch does
    ("mse_loss", "input", NOT_ARRAYS + [A(np.ones((N, C), np.complex64))]),
    ("mse_loss", "target", NOT_ARRAYS + [A(np.ones((N, C), np.complex64)), A(np.ones((N, C + 1)))]),
    ("mse_loss", "reduction", BAD_REDUCTION),
    ("mse_loss", "return_grad", BAD_RETURN_GRAD),
    ("linear_cross_entropy", "input", NOT_ARRAYS + [A(np.ones((N, H), np.int64)), A(np.ones((N, H + 1))),
                                                    A(np.array(1.0)), A(np.ones((2, N, H)))]),
    ("linear_cross_entropy", "linear_weight", NOT_ARRAYS + [A(np.ones((C, H + 1))), A(np.ones(C * H)),
                                                            A(np.ones((C, H)), dtype="float32")]),
    ("linear_cross_entropy", "target", NOT_ARRAYS + [A(TARGET.astype(np.float64)), A(np.array([0, 1, 2])),
                                                     A(np.array([0, 6, 2, 1])), A(np.array([0, -1, 2, 1])),
                                                     A(TARGET, dtype="uint32", bad_for=("torch",))]),
    ("linear_cross_entropy", "linear_bias", OPTIONAL_NOT_ARRAYS + [A(np.ones(C + 1)),
                                                                   A(np.ones(C), dtype="float32")]),
    ("linear_cross_entropy", "weight", OPTIONAL_NOT_ARRAYS + [A(np.ones(C - 1)), A(np.ones(C, np.int64))]),
    ("linear_cross_entropy", "ignore_index", [v for v in BAD_IGNORE_INDEX if v is not None]),
    ("linear_cross_entropy", "reduction", BAD_REDUCTION),
    ("linear_cross_entropy", "label_smoothing", [1.5, "0.1", None]),
    ("linear_cross_entropy", "z_loss", BAD_NONNEG),
    ("linear_cross_entropy", "softcap", BAD_POSITIVE),
    ("linear_cross_entropy", "chunk_size", [0, -1, 1.5, True, "2"]),
    ("linear_cross_entropy", "acc_dtype", ["int8", 3, "float128"]),
    ("linear_cross_entropy", "allow_retain_graph", BAD_BOOL),
    ("linear_cross_entropy", "return_grad", ["all", "yes", 2]),
]

BAD_CASES = [(row, arg, bad) for row, arg, bads in BAD for bad in bads]


def _bad_id(c) -> str:
    row, arg, bad = c
    return f"{row}-{arg}={bad!r}"


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", BAD_CASES, ids=[_bad_id(c) for c in BAD_CASES])
def test_bad_argument_raises_naming_it_and_modifies_nothing(case, path):
    row, arg, bad = case
    kind, backend, device = path
    if isinstance(bad, A) and kind not in bad.bad_for:
        pytest.skip(f"a valid argument for {kind} arrays")
    args = _build({**VALID[row], "backend": backend}, kind, device)
    if row.endswith("[inplace]"):
        args["return_grad"] = True  # the gradient would be written over the logits
    args[arg] = bad.make(kind, device) if isinstance(bad, A) else bad
    before = _snapshot(args)
    try:
        out = _fn(row)(**args)
    except (TypeError, ValueError) as e:
        assert arg in str(e), f"{row}({arg}={bad!r}) on {kind}/{backend}: the {type(e).__name__} does not name " \
                              f"{arg!r}: {e}"
        # also the RuntimeError torch raises for most bad arguments, so torch-style handlers catch it
        assert isinstance(e, RuntimeError), f"{row}({arg}={bad!r}) on {kind}/{backend}: {type(e).__name__} " \
                                            f"is not a RuntimeError: {e}"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{row}({arg}={bad!r}) on {kind}/{backend}: raised {type(e).__name__}: {e}; the README "
                    f"promises TypeError or ValueError naming {arg!r}")
    else:
        pytest.fail(f"{row}({arg}={bad!r}) on {kind}/{backend}: no error; returned {_summary(out)}")
    changed = _modified(before, args)
    assert not changed, f"{row}({arg}={bad!r}) on {kind}/{backend}: raising, it modified {changed}"


def _summary(out) -> str:
    if isinstance(out, tuple):
        return "(" + ", ".join(_summary(o) for o in out) + ")"
    a = D.to_np(out)
    return "None" if a is None else f"{a.dtype}{list(a.shape)} {np.array2string(a.ravel()[:4], precision=4)}"


# ---------------------------------------------------------------------------
# successful calls modify nothing (inplace_backward: only the logits)
# ---------------------------------------------------------------------------

ROWS = list(VALID)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("row", ROWS)
def test_valid_call_modifies_nothing_it_was_not_asked_to(row, path):
    kind, backend, device = path
    inplace = bool(VALID[row].get("inplace_backward"))
    modes = ["plain", "return_grad"] + (["autograd"] if kind == "torch" else [])
    if "softmax" in row:
        modes.remove("return_grad")
    for mode in modes:
        args = _build(VALID[row], kind, device)
        args["backend"] = backend
        first = _first(row)
        if mode == "autograd":
            for k in (first, "linear_weight", "linear_bias") if row == "linear_cross_entropy" else (first,):
                if inplace:
                    args[k] = args[k].clone().requires_grad_() * 1  # the logits of a model, not a leaf
                else:
                    args[k].requires_grad_()
        if mode == "return_grad":
            args["return_grad"] = True
        before = _snapshot(args)
        out = _fn(row)(**args)
        if mode == "autograd":
            loss = out if isinstance(out, torch.Tensor) else out[0]
            loss.sum().backward()
        allowed = (first,) if inplace and mode != "plain" else ()
        changed = _modified(before, args, allowed)
        assert not changed, f"{row} on {kind}/{backend} ({mode}): modified {changed}"


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_inplace_backward_writes_the_gradient_and_nothing_else(path):
    kind, backend, device = path
    row = "cross_entropy[inplace]"
    ref = _fn(row)(**_build({**VALID[row], "inplace_backward": False}, "numpy", "cpu"), return_grad=True)
    args = _build(VALID[row], kind, device)
    before = _snapshot(args)
    out = _fn(row)(**args, return_grad=True, backend=backend)
    assert not _modified(before, args, allowed=("input",))
    np.testing.assert_allclose(D.to_np(out.grad), ref.grad, **tol("float64"))
    np.testing.assert_allclose(D.to_np(args["input"]), ref.grad, **tol("float64"),
                               err_msg="the logits should hold their gradient")


# ---------------------------------------------------------------------------
# out-of-range class indices: a clear error on the CPU, whatever the mode
# ---------------------------------------------------------------------------

INDEX_ROWS = ["cross_entropy", "cross_entropy[inplace]", "nll_loss", "linear_cross_entropy"]
OUT_OF_RANGE = [C, C + 1, -1, -101, 2 ** 31, 2 ** 62]


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("row", INDEX_ROWS)
def test_out_of_range_class_index_raises_on_the_cpu(row, path, mode):
    kind, backend, device = path
    if device != "cpu":
        pytest.skip("GPU arrays are only checked with value_checks='always' (see the GPU test below)")
    old = gpuloss.set_value_checks(mode)
    try:
        for bad in OUT_OF_RANGE:
            t = TARGET.copy()
            t[1] = bad
            args = _build({**VALID[row], "target": A(t)}, kind, device)
            before = _snapshot(args)
            with pytest.raises(ValueError, match="target") as e:
                _fn(row)(**args, backend=backend, return_grad=True)
            assert str(bad) in str(e.value), f"the error should quote the bad index {bad}: {e.value}"
            assert not _modified(before, args), f"{row} modified its arguments while raising"
    finally:
        gpuloss.set_value_checks(old)


@pytest.mark.gpu
@pytest.mark.parametrize("row", ["cross_entropy", "nll_loss"])
def test_gpu_out_of_range_class_index_gives_nan_rows_not_garbage(row):
    """With value checks off a GPU kernel must still not read out of bounds:
    the bad row is NaN, the others are right."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    old = gpuloss.set_value_checks("never")
    try:
        for kind, backend, device in PATHS:
            if device != "cuda":
                continue
            t = TARGET.copy()
            t[1] = 10 ** 6
            args = _build({**VALID[row], "target": A(t), "reduction": "none", "weight": None}, kind, device)
            loss = D.to_np(_fn(row)(**args, backend=backend))
            good = _fn(row)(**_build({**VALID[row], "reduction": "none", "weight": None}, "numpy", "cpu"))
            assert np.isnan(loss[1])
            np.testing.assert_allclose(np.delete(loss, 1), np.delete(good, 1), rtol=1e-5)
    finally:
        gpuloss.set_value_checks(old)


# ---------------------------------------------------------------------------
# strided views into NaN-poisoned buffers: no NaN may leak into a result
# ---------------------------------------------------------------------------

def _poisoned(a: A, kind: str, device: str):
    """``a`` as a strided view into a NaN-filled (floating) or invalid-index
    (integer) buffer: padding before, after and between rows and, for 2-D
    arrays, a row stride larger than the row."""
    v = a.make("numpy", "cpu")
    if v.ndim == 0:
        return a.make(kind, device)
    floating = np.issubdtype(v.dtype, np.floating)
    fill = np.nan if floating else 10 ** 6 + 7
    pad = [(2, 3)] + [(1, 2)] * (v.ndim - 1)
    buf = np.pad(v.astype(np.float64 if floating else np.int64), pad, constant_values=fill)
    sl = tuple(slice(p0, p0 + n) for (p0, _), n in zip(pad, v.shape))
    dt = str(v.dtype)
    if kind == "numpy":
        return buf.astype(dt)[sl]
    if kind == "torch":
        return torch.from_numpy(buf).to(device=device, dtype=getattr(torch, dt))[sl]
    import cupy
    return cupy.asarray(buf, dtype=dt)[sl]


POISON_ROWS = [r for r in ROWS if not r.endswith("[inplace]")]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("row", POISON_ROWS)
def test_nan_padding_around_strided_views_does_not_leak(row, path):
    kind, backend, device = path
    plain = _build(VALID[row], kind, device)
    views = {k: (_poisoned(v, kind, device) if isinstance(v, A) else v) for k, v in VALID[row].items()}
    for a, b in zip(plain.values(), views.values()):
        if _is_array(a):
            assert np.array_equal(D.to_np(a), D.to_np(b))  # the same values, other strides
    kw = {"backend": backend}
    if "softmax" not in row:
        kw["return_grad"] = True
    want = _fn(row)(**plain, **kw)
    got = _fn(row)(**views, **kw)
    for name, w, g in zip(("loss", "grad", "grad_x"), _tuple(want), _tuple(got)):
        if w is None:
            continue
        w, g = D.to_np(w), D.to_np(g)
        assert np.all(np.isfinite(g)), f"{row} on {kind}/{backend}: NaN/inf in {name} from the padding: {g}"
        np.testing.assert_allclose(g, w, **tol("float64"), err_msg=f"{row} on {kind}/{backend}: {name}")


def _tuple(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def test_out_of_range_class_index_is_also_torchs_index_error():
    """torch's CPU kernels raise IndexError for a class index out of bounds;
    gpuloss's error is that too (and a ValueError, and a RuntimeError)."""
    import gpuloss
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(IndexError, match="class index 9"):
        gpuloss.cross_entropy(x, np.array([0, 9, 1]))
    with pytest.raises(gpuloss.ClassIndexError) as info:
        gpuloss.nll_loss(x, np.array([0, -3, 1]))
    assert isinstance(info.value, (ValueError)) and isinstance(info.value, RuntimeError)


def test_dim_out_of_range_is_also_torchs_index_error():
    """torch raises IndexError ("Dimension out of range") for a bad dim;
    gpuloss's error is that too (and a ValueError, and a RuntimeError)."""
    import gpuloss
    import torch
    import gpuloss.nn
    x = np.zeros((3, 4), np.float32)
    for call in (lambda: gpuloss.softmax(x, 2), lambda: gpuloss.log_softmax(x, -3),
                 lambda: gpuloss.softmax_backward(x, x, 5), lambda: gpuloss.nn.LogSoftmax(2)(torch.zeros(3, 4))):
        with pytest.raises(IndexError, match=r"out of range.*\[-2, 1\]") as info:
            call()
        assert isinstance(info.value, gpuloss.DimensionError) and isinstance(info.value, ValueError)
        assert isinstance(info.value, RuntimeError)
    with pytest.raises(IndexError, match="Dimension out of range"):
        torch.nn.LogSoftmax(2)(torch.zeros(3, 4))


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "linear_cross_entropy"])
def test_uint64_class_index_beyond_int64_is_out_of_range(fn):
    """A NumPy uint64 class index of 2**63 or more is out of range: widened to
    int64 it turned negative, even into ignore_index (-1 here), and the row
    was silently ignored."""
    import gpuloss
    x = np.zeros((2, 4), np.float32)
    t = np.array([1, 2 ** 64 - 1], np.uint64)
    call = {"cross_entropy": lambda: gpuloss.cross_entropy(x, t, ignore_index=-1),
            "nll_loss": lambda: gpuloss.nll_loss(x, t, ignore_index=-1),
            "linear_cross_entropy": lambda: gpuloss.linear_cross_entropy(x, x, t, ignore_index=-1)}[fn]
    with pytest.raises(gpuloss.ClassIndexError, match="18446744073709551615"):
        call()


def test_unsupported_floating_dtypes_are_refused_by_name():
    """float8 (torch) and longdouble (NumPy) are floating dtypes gpuloss does
    not compute on: refused naming the argument.  The Triton backend took
    float8 and returned a float8 loss whose backward crashed in torch; the
    NumPy backend took longdouble, computed in float32 and returned float128."""
    import gpuloss
    import torch
    for x in [torch.randn(3, 5).to(dt) for dt in (torch.float8_e4m3fn, torch.float8_e5m2)] + \
            [np.ones((3, 5), np.longdouble)]:
        t = np.array([0, 4, 1]) if isinstance(x, np.ndarray) else torch.tensor([0, 4, 1])
        for backend in ("numpy", "triton", None):
            for call in (lambda: gpuloss.cross_entropy(x, t, backend=backend),
                         lambda: gpuloss.softmax(x, -1, backend=backend),
                         lambda: gpuloss.mse_loss(x, x, backend=backend)):
                with pytest.raises(TypeError, match="input must be a floating-point array.*got (float8|float128)"):
                    call()


def test_numpy_masked_arrays_and_matrices_are_refused():
    """A masked array's mask would be ignored (its masked values read as
    data) and np.matrix failed with an internal broadcasting error; both are
    refused naming the argument.  Other ndarray subclasses work."""
    import gpuloss
    x = np.random.default_rng(0).standard_normal((4, 6))
    with pytest.raises(TypeError, match="input is a NumPy masked array"):
        gpuloss.softmax(np.ma.masked_array(x, mask=x > 1), -1)
    with pytest.raises(TypeError, match="target is a NumPy masked array"):
        gpuloss.mse_loss(x, np.ma.masked_array(x))
    with pytest.raises(TypeError, match="input is a numpy.matrix"):
        gpuloss.cross_entropy(np.matrix(x), np.array([0, 1, 2, 3]))

    class Tagged(np.ndarray):
        pass

    ours = gpuloss.cross_entropy(x.view(Tagged), np.array([0, 1, 2, 3]))
    assert ours == gpuloss.cross_entropy(x, np.array([0, 1, 2, 3]))


def test_sparse_and_mkldnn_tensors_are_refused_by_name():
    """Non-strided layouts failed deep inside with errors naming neither the argument nor the
    layout ("unsupported memory format option", "can't convert Mkldnn layout tensor")."""
    torch = pytest.importorskip("torch")
    x, p, t = torch.randn(4, 6), torch.rand(4, 6), torch.tensor([0, 1, 2, 3])
    calls = [
        ("input", "sparse_coo", lambda: gpuloss.kl_div(x.to_sparse(), p, reduction="sum")),
        ("input", "sparse_coo", lambda: gpuloss.cross_entropy(x.to_sparse(), t)),
        ("target", "sparse_coo", lambda: gpuloss.mse_loss(x, p.to_sparse())),
        ("input", "sparse_csr", lambda: gpuloss.linear_cross_entropy(x.to_sparse_csr(), torch.eye(6), t)),
        ("linear_weight", "sparse_coo", lambda: gpuloss.linear_cross_entropy(x, torch.eye(6).to_sparse(), t)),
        ("input", "_mkldnn", lambda: gpuloss.softmax(x.to_mkldnn(), 1)),
    ]
    for name, layout, call in calls:
        with pytest.raises(TypeError, match=f"{name} is a tensor of layout torch.{layout}"):
            call()


def test_softmax_dim_and_dtype_arguments_as_torchs():
    """dim as a 0-d integer tensor (torch takes it) worked only as an int or NumPy integer; a
    non-floating dtype= raised a TypeError that is not torch's NotImplementedError; an object
    with __torch_function__ that is no tensor raised AttributeError ('is_meta')."""
    torch = pytest.importorskip("torch")
    x = torch.randn(3, 4)
    for fn, tfn in ((gpuloss.softmax, torch.nn.functional.softmax),
                    (gpuloss.log_softmax, torch.nn.functional.log_softmax)):
        torch.testing.assert_close(fn(x, torch.tensor(0)), tfn(x, torch.tensor(0)))
        assert fn(x.numpy(), np.int64(-1)).shape == (3, 4)
        for bad in (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor(True), np.array(1), torch.tensor(1.0)):
            with pytest.raises(TypeError, match="dim must be an int"):  # torch refuses these too
                fn(x, bad)
        for dt in (torch.int64, torch.complex64):
            with pytest.raises(NotImplementedError, match="dtype must be a floating-point dtype"):
                fn(x, 1, dtype=dt)
        with pytest.raises(NotImplementedError):
            fn(x.numpy(), 1, dtype="int32")

    class Wrapped:  # a tensor-like of another class: torch dispatches to it, gpuloss names it
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return "dispatched"

    with pytest.raises(TypeError, match="input must be a NumPy array, CuPy array or torch.Tensor, got Wrapped"):
        gpuloss.softmax(Wrapped(), 1)
    with pytest.raises(TypeError, match="input must be a NumPy array, CuPy array or torch.Tensor, got Wrapped"):
        gpuloss.mse_loss(Wrapped(), x)


def test_legacy_reduction_warnings_name_the_callers_line():
    """torch's deprecation warnings for size_average/reduce and reduction="elementwise_mean"
    name the line that called the loss; cross_entropy's and nll_loss's named
    gpuloss/functional.py (one frame too shallow), so a warnings filter on the caller's module
    missed them."""
    import warnings
    torch = pytest.importorskip("torch")
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    calls = [lambda: gpuloss.cross_entropy(x, t, size_average=False), lambda: gpuloss.nll_loss(x, t, reduce=False),
             lambda: gpuloss.cross_entropy(x, t, reduction="elementwise_mean"),
             lambda: gpuloss.nll_loss(x, t, reduction="elementwise_mean"),
             lambda: gpuloss.mse_loss(x, x, size_average=True), lambda: gpuloss.kl_div(x, x, reduce=False)]
    for call in calls:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in seen] == [__file__], [(str(w.message), w.filename) for w in seen]


def test_option_errors_name_the_option_on_every_path():
    """Option values that failed inside (a torch schema error for chunk_size=2**70, "Boolean
    value of Tensor is ambiguous" for return_grad, OverflowError for a huge int temperature or
    z_loss, a TypeError deep in the dispatcher after register(1, 2)) or that were accepted
    without a check on meta tensors (z_loss=-1, softcap=0, temperature=0, chunk_size=0), or
    accepted as a typo (return_grad=1), are refused naming the option."""
    torch = pytest.importorskip("torch")
    from gpuloss import dispatch
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    h, W = torch.randn(4, 3), torch.randn(5, 3)
    xm, tm, hm, Wm = (a.to("meta") for a in (x, t, h, W))
    cases = [
        (ValueError, "chunk_size", lambda: gpuloss.linear_cross_entropy(h, W, t, chunk_size=2 ** 70)),
        (TypeError, "return_grad", lambda: gpuloss.cross_entropy(x, t, return_grad=torch.tensor([True, False]))),
        (TypeError, "return_grad", lambda: gpuloss.cross_entropy(x, t, return_grad=1)),
        (TypeError, "return_grad", lambda: gpuloss.linear_cross_entropy(h, W, t, return_grad=1.0)),
        (ValueError, "temperature", lambda: gpuloss.kl_div_with_logits(x, x, temperature=2 ** 2000)),
        (ValueError, "z_loss", lambda: gpuloss.cross_entropy(x, t, z_loss=10 ** 400)),
        (ValueError, "z_loss", lambda: gpuloss.cross_entropy(xm, tm, z_loss=-1)),
        (ValueError, "softcap", lambda: gpuloss.cross_entropy(xm, tm, softcap=0)),
        (TypeError, "inplace_backward", lambda: gpuloss.cross_entropy(xm, tm, inplace_backward="x")),
        (ValueError, "temperature", lambda: gpuloss.kl_div_with_logits(xm, xm, temperature=0)),
        (ValueError, "chunk_size", lambda: gpuloss.linear_cross_entropy(hm, Wm, tm, chunk_size=0)),
        (TypeError, "backend name", lambda: dispatch.register(1, "x:Y")),
        (ValueError, "module:Class", lambda: dispatch.register("zz", 5)),
    ]
    for err, what, call in cases:
        with pytest.raises(err, match=what):
            call()
    assert gpuloss.cross_entropy(x, t, return_grad=np.bool_(True)).grad.shape == x.shape
    assert "zz" not in dispatch.registered()


def test_transformers_loss_names_bad_arguments():
    """transformers-style ForCausalLMLoss: None logits or labels failed with AttributeError or
    inside torch's pad(); a float ignore_index was truncated (1.5 ignored the labels equal to 1)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from gpuloss.integrations.transformers import ForCausalLMLoss
    logits, labels = torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4))
    cases = [(TypeError, "logits must be a torch.Tensor", lambda: ForCausalLMLoss(None, labels, 5)),
             (TypeError, "labels .or shift_labels. must be given", lambda: ForCausalLMLoss(logits, None, 5)),
             (TypeError, "labels must be a torch.Tensor", lambda: ForCausalLMLoss(logits, labels.numpy(), 5)),
             (TypeError, "num_items_in_batch", lambda: ForCausalLMLoss(logits, labels, 5, num_items_in_batch="a")),
             (TypeError, "ignore_index must be an int", lambda: ForCausalLMLoss(logits, labels, 5, ignore_index=1.5))]
    for err, what, call in cases:
        with pytest.raises(err, match=what):
            call()
    torch.testing.assert_close(ForCausalLMLoss(logits, labels, 5, num_items_in_batch=torch.tensor(3)),
                               ForCausalLMLoss(logits, labels, 5, num_items_in_batch=3))


def test_floating_target_batch_mismatch_is_torchs_value_error():
    """A floating target whose batch size differs from the input's: torch
    raises ValueError ("Expected input batch_size ... to match target
    batch_size"); gpuloss raised a TypeError (about the target's dtype)."""
    import gpuloss
    import torch
    for t in (torch.rand(3), torch.rand(3, 5)):
        with pytest.raises(ValueError, match="Expected input batch_size"):
            torch.nn.functional.cross_entropy(torch.randn(2, 5), t)
        with pytest.raises(ValueError, match=r"Expected input batch_size \(2\) to match target batch_size \(3\)"):
            gpuloss.cross_entropy(torch.randn(2, 5), t)
    with pytest.raises(TypeError, match="probability targets must have input's shape"):
        gpuloss.cross_entropy(torch.randn(2, 5), torch.rand(2, 4))  # same batch: torch's message is about shape
    # the fused linear CE too (it raised a TypeError), also K-dimensional
    for W, t in ((torch.randn(5, 4), torch.rand(3, 5)), (torch.randn(5, 2, 4), torch.rand(3, 5, 2))):
        with pytest.raises(ValueError, match=r"Expected input batch_size \(2\) to match target batch_size \(3\)"):
            gpuloss.linear_cross_entropy(torch.randn(2, 4), W, t)


def test_integer_target_of_the_logits_shape_is_said_to_need_floats():
    """An integer target of the logits' shape is class probabilities to torch
    ("Expected floating point type for target with class probabilities");
    gpuloss said only that class indices need another shape."""
    import gpuloss
    import torch
    t = torch.randint(0, 5, (3, 5))
    with pytest.raises(RuntimeError, match="Expected floating point type for target with class probabilities"):
        torch.nn.functional.cross_entropy(torch.randn(3, 5), t)
    with pytest.raises(TypeError, match=r"input's shape \(3, 5\), which makes it class probabilities, but holds "
                                        r"int64: probabilities must be floating point; class indices have shape"):
        gpuloss.cross_entropy(torch.randn(3, 5), t)
    with pytest.raises(TypeError, match=r"the logits' shape \(3, 5\), which makes it class probabilities, but "
                                        r"holds int64"):
        gpuloss.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t)
    with pytest.raises(ValueError, match=r"target has shape \(3, 5\) but input of shape \(3, 5\) needs class-index "
                                         r"targets of shape \(3,\)"):  # nll_loss takes no probabilities
        gpuloss.nll_loss(torch.randn(3, 5), t)


def test_integer_input_is_also_torchs_not_implemented_error():
    """torch's kernels raise NotImplementedError ("... not implemented for
    'Long'") for integer input; gpuloss's dtype error is that too (and a
    TypeError, and a RuntimeError)."""
    import gpuloss
    import torch
    import torch.nn.functional as F
    xi = torch.ones(3, 5, dtype=torch.int64)
    t = torch.tensor([0, 1, 2])
    for name, args in (("softmax", (xi, -1)), ("log_softmax", (xi, -1)), ("cross_entropy", (xi, t)),
                       ("nll_loss", (xi, t)), ("mse_loss", (xi, xi)), ("binary_cross_entropy_with_logits", (xi, xi))):
        with pytest.raises(NotImplementedError):
            getattr(F, name)(*args)
        with pytest.raises(NotImplementedError, match="must be a floating-point array") as info:
            getattr(gpuloss, name)(*args)
        assert isinstance(info.value, gpuloss.ArgumentDtypeError) and isinstance(info.value, TypeError)
        assert isinstance(info.value, RuntimeError)


def test_unavailable_backend_says_when_it_was_probed(monkeypatch):
    """Availability is probed once per process: an environment variable set
    afterwards (TRITON_INTERPRET=1) does not count, while the reason still
    said to set it."""
    from gpuloss import dispatch
    monkeypatch.setitem(dispatch._status, "numpy", (False, "no CUDA device (set TRITON_INTERPRET=1 ...)"))
    with pytest.raises(dispatch.BackendUnavailableError, match=r"found at its first use in this process, for the "
                                                               r"whole process; TRITON_INTERPRET=1 must be set before"):
        dispatch.get_backend("numpy")


def _torch_worded_cases():
    T = torch.tensor
    return {
        "bce size": lambda f: f.binary_cross_entropy(torch.rand(3), torch.rand(4)),
        "bce size 2-d": lambda f: f.binary_cross_entropy(torch.rand(3, 1), torch.rand(3)),
        "bce_with_logits size": lambda f: f.binary_cross_entropy_with_logits(torch.rand(3), torch.rand(4)),
        "nll batch": lambda f: f.nll_loss(torch.randn(3, 5), T([1, 2])),
        "cross_entropy batch": lambda f: f.cross_entropy(torch.randn(3, 5), T([1, 2])),
        "nll target dims": lambda f: f.nll_loss(torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.long)),
        "cross_entropy k-dim target": lambda f: f.cross_entropy(torch.randn(3, 5, 2),
                                                                torch.zeros(3, 3, dtype=torch.long)),
        "nll weight": lambda f: f.nll_loss(torch.randn(3, 3), T([0, 1, 2]), weight=torch.rand(4)),
        "cross_entropy weight": lambda f: f.cross_entropy(torch.randn(3, 3), T([0, 1, 2]), weight=torch.rand(4)),
        "cross_entropy class index": lambda f: f.cross_entropy(torch.randn(3, 3), T([0, 1, 5])),
        "nll class index": lambda f: f.nll_loss(torch.randn(3, 3), T([0, 7, 1])),
        "reduction": lambda f: f.cross_entropy(torch.randn(3, 3), T([0, 1, 2]), reduction="foo"),
        "probabilities with ignore_index": lambda f: f.cross_entropy(torch.randn(3, 3), torch.rand(3, 3),
                                                                     ignore_index=1),
        "mse broadcast": lambda f: f.mse_loss(torch.randn(2, 3), torch.randn(4, 1, 4)),
        "nll 0-d input": lambda f: f.nll_loss(torch.tensor(1.0), T(0)),
    }


@pytest.mark.parametrize("case", list(_torch_worded_cases()))
def test_errors_carry_torchs_own_sentence(case):
    """Code written against torch matches its error messages (pytest.raises(match=...),
    assertRaisesRegex, as in torch's own test_nn): gpuloss's message names the
    argument in its own words and carries torch's sentence, verbatim, and the
    exception is an instance of torch's class."""
    call = _torch_worded_cases()[case]
    with pytest.raises(Exception) as theirs:
        call(torch.nn.functional)
    with pytest.raises(type(theirs.value)) as ours:
        call(gpuloss)
    assert str(theirs.value) in str(ours.value), (str(theirs.value), str(ours.value))
