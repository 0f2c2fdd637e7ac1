"""gpuloss against PyTorch, differentially: random calls of every public
function, every option, shapes with 0- and 1-sized dimensions, float32 /
float64 (and bfloat16 / float16 for torch tensors), strided layouts (transposed,
sliced out of a NaN-poisoned buffer, expanded, overlapping, flipped), run on
every backend that can run here (NumPy arrays and torch tensors on the numpy
backend, torch tensors on triton; CuPy where a GPU is) and compared with the
same call in torch (float64 on the same rounded values):

* raised or not: where torch raises, gpuloss raises a TypeError, ValueError or
  RuntimeError; where torch returns, gpuloss returns;
* the value (NaN where torch has NaN), its dtype and shape, the kind of array;
* gradients: torch autograd through our torch path (with an upstream gradient
  that is not 1) against torch's autograd, on the storage of every layout;
  ``return_grad`` on NumPy arrays and torch tensors against torch's gradient
  of the (summed) loss, and the gradient's dtype;
* the arguments: none modified (only ``input`` with ``inplace_backward``).

The machinery is in ``torchdiff.py``.  Hypothesis runs a fixed number of
derandomized examples per function (no database, no shrinking), so the file
costs the same every run; each failure lists every disagreement of the
example: function, path, inputs, ours vs torch.

gpuloss's own additions have torch-only oracles: z_loss / softcap on top of
``F.cross_entropy``, ``kl_div_with_logits`` from ``F.log_softmax`` and
``F.kl_div``, ``linear_cross_entropy`` as torch's ``F.linear_cross_entropy`` (``F.linear`` + cross-entropy
with gpuloss's z_loss / softcap).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import torchdiff as D
from torchdiff import Arr, make_case, with_layout

torch = D.require_torch()

# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------

SIZES = st.sampled_from([1, 2, 3, 4, 5, 0, 1, 3])
CLASSES = st.sampled_from([1, 2, 3, 5, 7, 0, 4, 33])
DTYPES = st.sampled_from(["float64", "float32", "float32", "bfloat16", "float16"])
LAYOUTS = st.sampled_from(["contiguous", "contiguous", "transposed", "sliced", "expanded", "flipped",
                           "overlapping"])
SMALL_LAYOUTS = st.sampled_from(["contiguous", "contiguous", "sliced", "expanded"])
SPECIALS = st.sampled_from(["plain", "plain", "plain", "extreme", "nonfinite"])


def _rng(draw) -> tuple:
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return seed, np.random.default_rng(seed)


def _values(rng, shape, special: str, scale=None) -> np.ndarray:
    x = np.asarray(rng.standard_normal(shape) * (scale if scale is not None else rng.choice([1.0, 3.0])))
    if special == "extreme" and x.size:
        m = rng.random(shape) < 0.3
        x[m] = rng.choice([-1.0, 1.0], size=int(m.sum())) * rng.choice([25.0, 80.0, 1e4], size=int(m.sum()))
    elif special == "nonfinite" and x.size:
        m = rng.random(shape) < 0.2
        x[m] = rng.choice([np.nan, np.inf, -np.inf], size=int(m.sum()))
    return x


def _arr(draw, rng, values, *, grad=False, dtype=None, layouts=LAYOUTS, readonly_ok=True) -> Arr:
    a = with_layout(values, draw(layouts), rng, grad=grad, dtype=dtype)
    if readonly_ok and draw(st.integers(0, 9)) == 0:
        a.readonly = True  # NumPy arrays only
    return a


def _weights(draw, rng, C: int, dtype_grad=False):
    """None, or (C,) class weights: positive, some 0, occasionally all 0."""
    kind = draw(st.sampled_from(["none", "none", "positive", "some-zero", "all-zero"]))
    if kind == "none":
        return None
    w = rng.uniform(0.2, 2.0, C)
    if kind == "some-zero" and C:
        w[rng.random(C) < 0.4] = 0.0
    if kind == "all-zero":
        w[:] = 0.0
    grad = draw(st.integers(0, 14)) == 0  # torch refuses a weight that requires grad
    return _arr(draw, rng, w, grad=grad, layouts=SMALL_LAYOUTS)


def _reduction(draw, kl=False):
    return draw(st.sampled_from(["none", "mean", "sum", "batchmean"] if kl else ["none", "mean", "sum"]))


def _class_index_target(draw, rng, shape, C: int, ignore_index: int):
    """Class indices in [0, C), some set to ignore_index, occasionally one out
    of range (torch raises)."""
    t = rng.integers(0, max(C, 1), size=shape) if C else np.full(shape, ignore_index, np.int64)
    if draw(st.booleans()) and t.size:
        t[rng.random(shape) < 0.35] = ignore_index
    if draw(st.integers(0, 11)) == 0 and t.size:
        t.flat[int(rng.integers(0, t.size))] = draw(st.sampled_from([C, C + 3, -1]))
    dtype = draw(st.sampled_from(["int64", "int64", "int64", "uint8", "int32", "int16", "uint16", "uint64"]))
    if dtype.startswith("uint") and t.size and (t < 0).any():
        dtype = "int64"
    if dtype == "uint8" and t.size and (t > 255).any():
        dtype = "int64"
    return _arr(draw, rng, t, dtype=None if dtype == "int64" else dtype, layouts=SMALL_LAYOUTS, readonly_ok=False)


def _ignore_index(draw, C: int):
    return draw(st.sampled_from([-100, -100, -1, max(C - 1, 0), 0, 2 ** 63 - 1]))


def _case(fn, args, dtype, seed, **kw):
    return make_case(fn, args, dtype, seed, **kw)


@st.composite
def softmax_cases(draw, log: bool):
    seed, rng = _rng(draw)
    shape = tuple(draw(st.lists(SIZES, min_size=0, max_size=4)))
    dtype = draw(DTYPES)
    nd = max(len(shape), 1)
    dim = draw(st.integers(-nd, nd - 1)) if draw(st.integers(0, 14)) else draw(st.sampled_from([nd, -nd - 1]))
    x = _arr(draw, rng, _values(rng, shape, draw(SPECIALS)), grad=True)
    args = {"input": x, "dim": dim}
    if draw(st.integers(0, 5)) == 0:
        args["dtype"] = draw(st.sampled_from(["float32", "float64", "bfloat16"]))
    return _case("log_softmax" if log else "softmax", args, dtype, seed)


@st.composite
def softmax_backward_cases(draw, log: bool):
    seed, rng = _rng(draw)
    shape = tuple(draw(st.lists(SIZES, min_size=0, max_size=3)))
    dtype = draw(DTYPES)
    nd = max(len(shape), 1)
    dim = draw(st.integers(-nd, nd - 1))
    z = _values(rng, shape, "plain")
    if len(shape) and 0 not in shape:
        z = z - z.max(axis=dim % nd, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=dim % nd, keepdims=True))
        y = z - lse if log else np.exp(z - lse)
    else:
        y = np.zeros(shape) if log else np.ones(shape)
    dy = _values(rng, shape, draw(SPECIALS))
    args = {"grad_output": _arr(draw, rng, dy, grad=True), "output": _arr(draw, rng, y, grad=True), "dim": dim}
    return _case("log_softmax_backward" if log else "softmax_backward", args, dtype, seed)


def _ce_shapes(draw):
    C = draw(CLASSES)
    kind = draw(st.sampled_from(["1d", "2d", "2d", "2d", "3d", "4d"]))
    N = draw(SIZES)
    if kind == "1d":
        return C, (C,), ()
    spatial = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 0]), min_size=1 if kind == "3d" else 2,
                                  max_size=1 if kind == "3d" else 2))) if kind in ("3d", "4d") else ()
    if kind in ("3d", "4d") and C > 7:
        C = 5  # keep the interpreter fast
    return C, (N, C) + spatial, (N,) + spatial


@st.composite
def cross_entropy_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(DTYPES)
    C, xshape, tshape = _ce_shapes(draw)
    inplace = draw(st.integers(0, 6)) == 0
    x = _arr(draw, rng, _values(rng, xshape, draw(SPECIALS)), grad=True)
    ignore_index = _ignore_index(draw, C)
    prob = draw(st.integers(0, 3)) == 0
    if prob:
        ignore_index = draw(st.sampled_from([-100, -100, -100, 0]))  # torch refuses >= 0 with probabilities
        p = rng.random(xshape)
        if draw(st.booleans()) and C:
            p = p / p.sum(axis=1 if len(xshape) > 1 else 0, keepdims=True)
        target = _arr(draw, rng, p, grad=draw(st.booleans()))
    else:
        target = _class_index_target(draw, rng, tshape, C, ignore_index)
    args = {"input": x, "target": target, "weight": _weights(draw, rng, C), "ignore_index": ignore_index,
            "reduction": _reduction(draw), "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))}
    if draw(st.integers(0, 4)) == 0:
        args["z_loss"] = draw(st.sampled_from([1e-3, 0.05]))
    if draw(st.integers(0, 4)) == 0:
        args["softcap"] = draw(st.sampled_from([2.5, 30.0]))
    expect = {}
    if inplace:
        args["inplace_backward"] = True
        if x.logical().size == 0:
            pass  # nothing to overwrite
        elif "overlapping" in x.layout or "expanded" in x.layout:
            expect = {"*": ((ValueError,), "input")}
        elif x.readonly:
            expect = {"numpy": ((ValueError,), "input")}
    return _case("cross_entropy", args, dtype, seed, expect_error=expect)


@st.composite
def nll_loss_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(DTYPES)
    C, xshape, tshape = _ce_shapes(draw)
    ignore_index = _ignore_index(draw, C)
    x = _arr(draw, rng, _values(rng, xshape, draw(SPECIALS)), grad=True)
    args = {"input": x, "target": _class_index_target(draw, rng, tshape, C, ignore_index),
            "weight": _weights(draw, rng, C), "ignore_index": ignore_index, "reduction": _reduction(draw)}
    return _case("nll_loss", args, dtype, seed)


def _broadcast_pair(draw, shape):
    """(input shape, target shape): equal, or one broadcasting to the other."""
    mode = draw(st.sampled_from(["same", "same", "same", "target-smaller", "input-smaller"]))
    if mode == "same" or not shape:
        return shape, shape
    small = [1 if draw(st.booleans()) else n for n in shape]
    drop = draw(st.integers(0, len(shape)))
    small = tuple(small[drop:])
    return (shape, small) if mode == "target-smaller" else (small, shape)


@st.composite
def kl_div_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(DTYPES)
    ishape, tshape = _broadcast_pair(draw, tuple(draw(st.lists(SIZES, min_size=0, max_size=3))))
    log_target = draw(st.booleans())
    x = _arr(draw, rng, _values(rng, ishape, draw(SPECIALS)), grad=True)
    if log_target:
        t = _values(rng, tshape, "plain")
    else:
        t = np.asarray(rng.random(tshape))
        if t.size:
            t[rng.random(tshape) < 0.2] = 0.0
    args = {"input": x, "target": _arr(draw, rng, t, grad=draw(st.booleans())), "reduction": _reduction(draw, kl=True),
            "log_target": log_target}
    return _case("kl_div", args, dtype, seed)


@st.composite
def kl_div_with_logits_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(SIZES, min_size=1, max_size=3)))
    if draw(st.booleans()):
        shape = shape[:-1] + (draw(CLASSES),)
    logits = draw(st.booleans())
    x = _arr(draw, rng, _values(rng, shape, draw(SPECIALS)), grad=True)
    if logits:
        t = _values(rng, shape, "plain")
    else:
        t = rng.random(shape)
        if draw(st.booleans()) and t.size and shape[-1]:
            t = t / t.sum(-1, keepdims=True)
    args = {"input": x, "target": _arr(draw, rng, t), "temperature": draw(st.sampled_from([1.0, 0.5, 2.0, 3.7])),
            "reduction": _reduction(draw, kl=True), "target_is_logits": logits}
    return _case("kl_div_with_logits", args, dtype, seed)


def _broadcastable_weight(draw, rng, shape, lo=0.0, hi=2.0):
    if draw(st.booleans()) or not shape:
        return None
    ws = [1 if draw(st.booleans()) else n for n in shape]
    ws = tuple(ws[draw(st.integers(0, len(ws))):])
    return _arr(draw, rng, rng.uniform(lo, hi, ws), grad=draw(st.integers(0, 14)) == 0, layouts=SMALL_LAYOUTS)


@st.composite
def bce_with_logits_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(SIZES, min_size=0, max_size=3)))
    x = _arr(draw, rng, _values(rng, shape, draw(SPECIALS)), grad=True)
    t = np.asarray(rng.random(shape))
    if t.size and draw(st.booleans()):
        m = rng.random(shape) < 0.5
        t[m] = np.round(t[m])  # hard labels among soft ones
    if draw(st.integers(0, 5)) == 0:
        t = t * 3 - 1  # targets outside [0, 1]: allowed with logits
    pos_weight = None
    if draw(st.booleans()) and shape:
        pshape = draw(st.sampled_from([(shape[-1],), (1,), ()]))
        pos_weight = _arr(draw, rng, rng.uniform(0.3, 3.0, pshape), layouts=SMALL_LAYOUTS, readonly_ok=False)
    args = {"input": x, "target": _arr(draw, rng, t, grad=draw(st.booleans())),
            "weight": _broadcastable_weight(draw, rng, shape), "reduction": _reduction(draw), "pos_weight": pos_weight}
    return _case("binary_cross_entropy_with_logits", args, dtype, seed)


@st.composite
def bce_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(SIZES, min_size=0, max_size=3)))
    p = np.asarray(rng.random(shape))
    special = draw(st.sampled_from(["plain", "plain", "edges", "outside", "nan"]))
    if p.size and special != "plain":
        m = rng.random(shape) < 0.3
        if special == "edges":
            p[m] = rng.choice([0.0, 1.0], size=int(m.sum()))
        elif special == "outside":
            p.flat[int(rng.integers(0, p.size))] = draw(st.sampled_from([1.25, -0.5]))  # torch raises
        else:
            p.flat[int(rng.integers(0, p.size))] = np.nan  # torch raises
    t = np.asarray(rng.random(shape))
    if t.size and draw(st.booleans()):
        t = np.round(t)
    if t.size and draw(st.integers(0, 9)) == 0:
        t.flat[0] = 1.5  # torch raises
    args = {"input": _arr(draw, rng, p, grad=True), "target": _arr(draw, rng, t, grad=draw(st.booleans())),
            "weight": _broadcastable_weight(draw, rng, shape), "reduction": _reduction(draw)}
    return _case("binary_cross_entropy", args, dtype, seed)


@st.composite
def mse_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(DTYPES)
    ishape, tshape = _broadcast_pair(draw, tuple(draw(st.lists(SIZES, min_size=0, max_size=3))))
    args = {"input": _arr(draw, rng, _values(rng, ishape, draw(SPECIALS)), grad=True),
            "target": _arr(draw, rng, _values(rng, tshape, "plain"), grad=draw(st.booleans())),
            "reduction": _reduction(draw)}
    return _case("mse_loss", args, dtype, seed)


@st.composite
def linear_cross_entropy_cases(draw):
    seed, rng = _rng(draw)
    dtype = draw(st.sampled_from(["float64", "float32", "float32", "bfloat16"]))
    V = draw(st.sampled_from([1, 2, 5, 7, 12]))
    H = draw(st.sampled_from([1, 3, 6]))
    lead = tuple(draw(st.sampled_from([(4,), (0,), (1,), (2, 3), (5,), ()])))
    ignore_index = _ignore_index(draw, V)
    hidden = _arr(draw, rng, _values(rng, lead + (H,), "plain", 1.0), grad=True)
    weight = _arr(draw, rng, _values(rng, (V, H), "plain", 1.0), grad=True, layouts=st.sampled_from(
        ["contiguous", "transposed", "sliced"]))
    bias = _arr(draw, rng, _values(rng, (V,), "plain", 1.0), grad=True, layouts=SMALL_LAYOUTS) \
        if draw(st.booleans()) else None
    N = int(np.prod(lead)) if lead else 1
    args = {"input": hidden, "linear_weight": weight,
            "target": _class_index_target(draw, rng, lead, V, ignore_index),
            "linear_bias": bias, "ignore_index": draw(st.sampled_from([ignore_index, None])),
            "reduction": _reduction(draw),
            "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.2])),
            "weight": _weights(draw, rng, V),
            "z_loss": draw(st.sampled_from([0.0, 0.0, 1e-3])), "softcap": draw(st.sampled_from([None, None, 4.0])),
            "chunk_size": draw(st.sampled_from([None, 1, 2, max(N, 1)]))}
    return _case("linear_cross_entropy", args, dtype, seed)


STRATEGIES = {
    "softmax": softmax_cases(False),
    "log_softmax": softmax_cases(True),
    "softmax_backward": softmax_backward_cases(False),
    "log_softmax_backward": softmax_backward_cases(True),
    "cross_entropy": cross_entropy_cases(),
    "nll_loss": nll_loss_cases(),
    "kl_div": kl_div_cases(),
    "kl_div_with_logits": kl_div_with_logits_cases(),
    "binary_cross_entropy_with_logits": bce_with_logits_cases(),
    "binary_cross_entropy": bce_cases(),
    "mse_loss": mse_cases(),
    "linear_cross_entropy": linear_cross_entropy_cases(),
}

#: examples per function: the numpy backend (NumPy arrays and torch tensors)
#: is fast; the Triton interpreter is not.  The whole file stays under a
#: minute on two cores.
EXAMPLES_NUMPY = {"cross_entropy": 80, "linear_cross_entropy": 30}
EXAMPLES_TRITON = {"cross_entropy": 24, "linear_cross_entropy": 8}
DEFAULT_NUMPY, DEFAULT_TRITON = 40, 12


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate), print_blob=False,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("fn", list(STRATEGIES))
def test_matches_torch_on_the_numpy_backend(fn):
    """NumPy arrays (return_grad and plain) and CPU torch tensors (autograd
    and return_grad) on the numpy backend."""
    @_settings(EXAMPLES_NUMPY.get(fn, DEFAULT_NUMPY))
    @given(STRATEGIES[fn])
    def run(case):
        D.assert_agrees(case, backends=("numpy",))
    run()


@pytest.mark.parametrize("fn", list(STRATEGIES))
def test_matches_torch_on_triton(fn):
    """torch tensors on the triton backend (the interpreter on the CPU)."""
    if not D.torch_paths("triton"):
        pytest.skip("triton backend unavailable here")
    @_settings(EXAMPLES_TRITON.get(fn, DEFAULT_TRITON))
    @given(STRATEGIES[fn])
    def run(case):
        D.assert_agrees(case, backends=("triton",))
    run()


@pytest.mark.parametrize("fn", list(STRATEGIES))
def test_matches_torch_on_cupy(fn):
    """CuPy arrays and CUDA torch tensors on the cupy backend (GPU machines)."""
    if not D.torch_paths("cupy"):
        pytest.skip("cupy backend unavailable here")
    @_settings(EXAMPLES_TRITON.get(fn, DEFAULT_TRITON))
    @given(STRATEGIES[fn])
    def run(case):
        D.assert_agrees(case, backends=("cupy",))
    run()


# ---------------------------------------------------------------------------
# named cases, one test each: the disagreements found so far (the random
# search above finds them again, but these name them and fail one by one)
# and the edge cases next to them that agree today
# ---------------------------------------------------------------------------

_r = np.random.default_rng(20240611)


def _x(*shape, grad=True, dtype=None):
    return D.contiguous(_r.standard_normal(shape), grad=grad, dtype=dtype)


def _p(*shape, grad=False, dtype=None, lo=0.05, hi=0.95):
    return D.contiguous(_r.uniform(lo, hi, shape), grad=grad, dtype=dtype)


def _t(values, dtype=None):
    return D.contiguous(np.asarray(values, np.int64), dtype=dtype)


def _case_of(fn, case_dtype="float64", **args):
    return make_case(fn, args, case_dtype)


def _inplace(layout: str, kinds: str):
    rng = np.random.default_rng(5)
    x = with_layout(rng.standard_normal((4, 6)), layout, rng, grad=True)
    if layout == "read-only":
        x.readonly = True
    return make_case("cross_entropy", {"input": x, "target": _t([0, 5, 2, 1]), "inplace_backward": True},
                     expect_error={kinds: ((ValueError,), "input")})


REGRESSIONS = {
    # empty shapes: torch gives empty tensors, nan ("mean") or 0 ("sum")
    "softmax over a 0-sized dim": _case_of("softmax", input=_x(3, 0), dim=1),
    "log_softmax over a 0-sized dim": _case_of("log_softmax", input=_x(2, 0, 3), dim=1),
    "softmax_backward of 0 elements": _case_of("softmax_backward", grad_output=_x(0), output=_x(0), dim=-1),
    "log_softmax_backward, 0-sized dim": _case_of("log_softmax_backward", grad_output=_x(2, 0), output=_x(2, 0), dim=1),
    "cross_entropy C=0, probabilities, mean": _case_of("cross_entropy", input=_x(3, 0), target=_p(3, 0)),
    "cross_entropy C=0, probabilities, none": _case_of("cross_entropy", input=_x(3, 0), target=_p(3, 0),
                                                       reduction="none"),
    "cross_entropy C=0, N=0": _case_of("cross_entropy", input=_x(0, 0), target=_t(np.zeros(0))),
    "cross_entropy empty spatial dim": _case_of("cross_entropy", input=_x(2, 3, 0), target=_t(np.zeros((2, 0))),
                                                reduction="none"),
    "nll_loss C=0, unbatched, ignored target": _case_of("nll_loss", input=_x(0), target=_t(-100)),
    # rows of 0 classes inside a NaN-filled buffer: a kernel that reads a
    # logit of an empty row reads the poison (the triton kernel did)
    "nll_loss C=0, all ignored, rows in a NaN buffer": _case_of(
        "nll_loss", input=Arr(np.full(16, np.nan), (2, 0), (5, 1), 6, "sliced(poisoned)", grad=True),
        target=_t([-100, -100]), reduction="none"),
    "cross_entropy C=0, all ignored, rows in a NaN buffer": _case_of(
        "cross_entropy", input=Arr(np.full(16, np.nan), (2, 0), (5, 1), 6, "sliced(poisoned)", grad=True),
        target=_t([-100, -100]), reduction="none"),
    "kl_div empty last dim": _case_of("kl_div", input=_x(3, 0), target=_p(3, 0), reduction="none"),
    "kl_div_with_logits C=0": _case_of("kl_div_with_logits", input=_x(2, 0), target=_x(2, 0, grad=False),
                                       reduction="none"),
    "mse_loss of 0 elements, mean": _case_of("mse_loss", input=_x(0), target=_x(0, grad=False)),
    "binary_cross_entropy empty last dim": _case_of("binary_cross_entropy", input=_p(4, 0, grad=True),
                                                    target=_p(4, 0), reduction="sum"),
    "binary_cross_entropy_with_logits (0, 0, 0)": _case_of("binary_cross_entropy_with_logits", input=_x(0, 0, 0),
                                                           target=_p(0, 0, 0)),
    "linear_cross_entropy V=0, N=0": _case_of("linear_cross_entropy", input=_x(0, 3), linear_weight=_x(0, 3),
                                              target=_t(np.zeros(0))),
    # class weights summing to 0 under "mean": nan loss and nan gradients
    "cross_entropy all-zero weights": _case_of("cross_entropy", input=_x(3, 4), target=_t([0, 1, 3]),
                                               weight=D.contiguous(np.zeros(4))),
    "cross_entropy all-zero weights + label smoothing": _case_of(
        "cross_entropy", input=_x(3, 4), target=_t([0, 1, 3]), weight=D.contiguous(np.zeros(4)), label_smoothing=0.2),
    "cross_entropy zero weights on every target's class": _case_of(
        "cross_entropy", input=_x(3, 4), target=_t([1, 1, 2]), weight=D.contiguous(np.array([1.0, 0, 0, 2.0]))),
    "nll_loss all-zero weights": _case_of("nll_loss", input=_x(3, 4), target=_t([0, 1, 3]),
                                          weight=D.contiguous(np.zeros(4))),
    "linear_cross_entropy all-zero class weights": _case_of(
        "linear_cross_entropy", input=_x(3, 2), linear_weight=_x(4, 2), target=_t([0, 1, 3]),
        weight=D.contiguous(np.zeros(4))),
    # weights that require grad: torch refuses (or, for probability targets, differentiates)
    "cross_entropy weight requires grad": _case_of("cross_entropy", input=_x(3, 4), target=_t([0, 1, 3]),
                                                   weight=_p(4, grad=True)),
    "cross_entropy probabilities, weight requires grad (torch differentiates it)": _case_of(
        "cross_entropy", input=_x(3, 4), target=_p(3, 4), weight=_p(4, grad=True)),
    "nll_loss weight requires grad": _case_of("nll_loss", input=_x(3, 4), target=_t([0, 1, 3]),
                                              weight=_p(4, grad=True)),
    "binary_cross_entropy weight requires grad": _case_of("binary_cross_entropy", input=_p(3, 4, grad=True),
                                                          target=_p(3, 4), weight=_p(4, grad=True)),
    "bce_with_logits weight requires grad": _case_of("binary_cross_entropy_with_logits", input=_x(3, 4),
                                                     target=_p(3, 4), weight=_p(3, 4, grad=True)),
    "bce_with_logits pos_weight requires grad": _case_of("binary_cross_entropy_with_logits", input=_x(3, 4),
                                                         target=_p(3, 4), pos_weight=_p(4, grad=True)),
    "linear_cross_entropy class_weight requires grad": _case_of(
        "linear_cross_entropy", input=_x(3, 2), linear_weight=_x(4, 2), target=_t([0, 1, 3]),
        weight=_p(4, grad=True)),
    # bfloat16 torch tensors, return_grad: the gradient in the input's dtype
    "cross_entropy bf16 return_grad": _case_of("cross_entropy", "bfloat16", input=_x(3, 5), target=_t([0, 4, 2])),
    "nll_loss bf16 return_grad": _case_of("nll_loss", "bfloat16", input=_x(3, 5), target=_t([0, 4, 2])),
    "mse_loss bf16 return_grad": _case_of("mse_loss", "bfloat16", input=_x(3, 5), target=_x(3, 5, grad=True)),
    "kl_div bf16 return_grad": _case_of("kl_div", "bfloat16", input=_x(3, 5), target=_p(3, 5)),
    "bce_with_logits bf16 return_grad": _case_of("binary_cross_entropy_with_logits", "bfloat16", input=_x(3, 5),
                                                 target=_p(3, 5)),
    "kl_div_with_logits bf16 return_grad": _case_of("kl_div_with_logits", "bfloat16", input=_x(3, 5),
                                                    target=_x(3, 5, grad=False)),
    # class-index dtypes torch refuses: uint16/32/64 torch tensors must be refused clearly
    "cross_entropy uint16 targets": _case_of("cross_entropy", input=_x(3, 5), target=_t([0, 4, 2], "uint16")),
    "cross_entropy uint32 targets": _case_of("cross_entropy", input=_x(3, 5), target=_t([0, 4, 2], "uint32")),
    "cross_entropy uint64 targets": _case_of("cross_entropy", input=_x(3, 5), target=_t([0, 4, 2], "uint64")),
    "nll_loss uint16 targets": _case_of("nll_loss", input=_x(3, 5), target=_t([0, 4, 2], "uint16")),
    "linear_cross_entropy uint32 targets": _case_of("linear_cross_entropy", input=_x(3, 2), linear_weight=_x(5, 2),
                                                    target=_t([0, 4, 2], "uint32")),
    # ignore_index outside the target dtype's range must not wrap into a valid value
    "cross_entropy int16 target -1, ignore_index=2**63-1": _case_of(
        "cross_entropy", input=_x(2, 3), target=_t([-1, 0], "int16"), ignore_index=2 ** 63 - 1),
    "nll_loss int32 target -1, ignore_index=2**32-1": _case_of(
        "nll_loss", input=_x(2, 3), target=_t([-1, 0], "int32"), ignore_index=2 ** 32 - 1),
    # probability targets: torch refuses an ignore_index >= 0
    "cross_entropy probabilities with ignore_index=0": _case_of("cross_entropy", input=_x(3, 4), target=_p(3, 4),
                                                                ignore_index=0),
    # binary_cross_entropy: torch checks both inputs lie in [0, 1]
    "binary_cross_entropy input > 1": _case_of("binary_cross_entropy", input=D.contiguous([0.5, 1.5], grad=True),
                                               target=D.contiguous([1.0, 0.0])),
    "binary_cross_entropy input < 0": _case_of("binary_cross_entropy", input=D.contiguous([-0.25, 0.5], grad=True),
                                               target=D.contiguous([1.0, 0.0])),
    "binary_cross_entropy input nan": _case_of("binary_cross_entropy", input=D.contiguous([np.nan, 0.5], grad=True),
                                               target=D.contiguous([1.0, 0.0])),
    "binary_cross_entropy target > 1": _case_of("binary_cross_entropy", input=D.contiguous([0.5, 0.5], grad=True),
                                                target=D.contiguous([1.5, 0.0])),
    # broadcasting targets (mse_loss warns when the sizes differ)
    "mse_loss target broadcasts to input": _case_of("mse_loss", input=_x(3, 4), target=_x(4, grad=True)),
    "mse_loss input broadcasts to target": _case_of("mse_loss", input=_x(1, 4), target=_x(3, 4, grad=False),
                                                    reduction="none"),
    "kl_div target broadcasts to input": _case_of("kl_div", input=_x(3, 4), target=_p(1, 4, grad=True),
                                                  reduction="sum"),
    "kl_div input broadcasts to target": _case_of("kl_div", input=_x(4), target=_p(3, 4), reduction="batchmean"),
    # softmax's dtype= keyword
    "softmax dtype=float64": _case_of("softmax", "float32", input=_x(3, 4), dim=1, dtype="float64"),
    "log_softmax dtype=float32 on float64": _case_of("log_softmax", input=_x(3, 4), dim=-1, dtype="float32"),
    # mixed floating dtypes: torch promotes (or refuses)
    "mse_loss float32 input, float64 target": _case_of("mse_loss", "float32", input=_x(3, 4),
                                                       target=_x(3, 4, grad=False, dtype="float64")),
    "cross_entropy float32 logits, float64 probabilities": _case_of(
        "cross_entropy", "float32", input=_x(3, 4), target=_p(3, 4, dtype="float64")),
    "cross_entropy float32 logits, float64 weight": _case_of(
        "cross_entropy", "float32", input=_x(3, 4), target=_t([0, 1, 3]), weight=_p(4, dtype="float64")),
    "binary_cross_entropy float32 input, float64 target": _case_of(
        "binary_cross_entropy", "float32", input=_p(3, 4, grad=True), target=_p(3, 4, dtype="float64")),
    # kl_div's gradient with respect to a zero target
    "kl_div grad wrt target at target == 0": _case_of("kl_div", input=_x(3), target=D.contiguous(
        [0.0, 0.5, 0.25], grad=True), reduction="sum"),
    # inplace_backward on a layout it cannot overwrite element by element
    "inplace_backward, expanded logits": _inplace("expanded", "*"),
    "inplace_backward, overlapping rows": _inplace("overlapping", "*"),
    "inplace_backward, read-only NumPy logits": _inplace("read-only", "numpy"),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_named_case_matches_torch(name):
    D.assert_agrees(REGRESSIONS[name], backends=("numpy", "triton", "cupy"))
