"""torch's own test samples through gpuloss: every OpInfo sample of the
functions gpuloss replaces (``torch.testing._internal``'s ``op_db``: the
samples torch's own test suite runs, shapes, options and edges included) and
their error inputs, every ModuleInfo input of the modules (``module_db``),
and torch's ``common_nn`` loss entries, compared with torch on the same
inputs; then the samples under ``torch.compile(fullgraph=True)``, ``vmap``
and ``jvp``.

float64 must agree with torch to its test tolerances, values and gradients
(a random upstream gradient, so reductions and per-element losses are both
checked), with the class of torch's result (dtype, shape).  float32 too, or
else be as exact as torch against torch in float64 (sums in another order
can land a few units off).  bfloat16 and float16 compute in float32 inside
and round once where torch's CPU kernels round several times: always checked
against torch in float64, gpuloss's error at most twice torch's plus two
units in the last place of the result's largest value (a sum of rounded
terms, as a gradient of the fused linear CE is, can land two units off where
torch's happens to land on the right one; over many seeds the two are
equally exact).  Where torch raises, gpuloss must raise (a sample torch
refuses is not ours to accept); ``error_inputs`` must raise the class torch
raises.

Backends: what the dispatcher picks (NumPy for CPU tensors), Triton under
``TRITON_INTERPRET=1`` on the CPU (the fused linear CE's thousand samples per
dtype only through the default there), and on a GPU (ci/gpu.sh) the same
samples on CUDA tensors through the default, Triton and CuPy.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal imports it
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

import gpuloss  # noqa: E402
import gpuloss.nn as gnn  # noqa: E402
from gpuloss import dispatch  # noqa: E402

#: OpInfo name (with its variant) -> gpuloss function
FUNCTIONS = {
    "softmax": gpuloss.softmax, "softmax.with_dtype": gpuloss.softmax,
    "log_softmax": gpuloss.log_softmax, "log_softmax.with_dtype": gpuloss.log_softmax,
    "nn.functional.cross_entropy": gpuloss.cross_entropy,
    "nn.functional.nll_loss": gpuloss.nll_loss,
    "nn.functional.binary_cross_entropy_with_logits": gpuloss.binary_cross_entropy_with_logits,
    "nn.functional.binary_cross_entropy": gpuloss.binary_cross_entropy,
    "nn.functional.mse_loss": gpuloss.mse_loss,
    "nn.functional.kl_div": gpuloss.kl_div,
    "nn.functional.linear_cross_entropy": gpuloss.linear_cross_entropy,
    "nn.functional.linear_cross_entropy.chunked": gpuloss.linear_cross_entropy,
    "nn.functional.linear_cross_entropy.chunked_none": gpuloss.linear_cross_entropy,
}
MODULES = ["KLDivLoss", "MSELoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss",
           "LinearCrossEntropyLoss", "Softmax", "LogSoftmax"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
#: the unit in the last place at 1.0, for the rule against float64
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}


def _full_name(op) -> str:
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


OPINFOS = {_full_name(op): op for op in common_methods.op_db if _full_name(op) in FUNCTIONS}
MODULEINFOS = {m.module_cls.__name__: m for m in common_modules.module_db if m.module_cls.__name__ in MODULES}


def _backend_here(backend, device: str) -> bool:
    """Whether ``backend`` serves torch tensors on ``device`` here (None: the
    dispatcher's choice, always): Triton on the CPU only under its interpreter."""
    if device == "cuda" and not torch.cuda.is_available():
        return False
    if backend is None:
        return True
    if not dispatch.backend_status()[backend][0]:
        return False
    return device == "cuda" if backend == "cupy" else (device == "cpu") == (os.environ.get("TRITON_INTERPRET") == "1")


def _grad_tensors(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _as64(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().double().requires_grad_(v.requires_grad)
    if dataclasses.is_dataclass(v) and hasattr(v, "acc_dtype"):  # torch's LinearCrossEntropyOptions
        return dataclasses.replace(v, acc_dtype=None)  # float32 accumulation is refused for float64
    return v


def _max_err(a, ref) -> float:
    return float((a.double() - ref).abs().max()) if ref.numel() else 0.0


def _scale(ref) -> float:
    return float(ref.abs().max()) if ref.numel() else 0.0


def _agree(name: str, ours, theirs, dtype, ref64) -> None:
    """``ours``/``theirs``: (output, gradients) from gpuloss and torch; ``ref64()``:
    torch's in float64.  float64 must agree to torch's tolerances; float32 too,
    or else be as exact as torch against float64 (a sum in another order, with
    a class weight of 30, can land a few units off torch's); 16-bit always
    against float64."""
    (out, grads), (ref, ref_grads) = ours, theirs
    assert out.dtype == ref.dtype and out.shape == ref.shape, (name, out.dtype, ref.dtype, out.shape, ref.shape)
    if dtype in (torch.float64, torch.float32):
        try:
            torch.testing.assert_close(out, ref, equal_nan=True, msg=lambda m: f"{name}: value: {m}")
            for i, (a, b) in enumerate(zip(grads, ref_grads)):
                if a is None and b is None:
                    continue
                a = torch.zeros_like(b) if a is None else a
                b = torch.zeros_like(a) if b is None else b
                torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{name}: gradient {i}: {m}")
            return
        except AssertionError:
            if dtype == torch.float64:
                raise
    out64, grads64 = ref64()
    grads64 = list(grads64) + [None] * (len(ref_grads) - len(grads64))
    pairs = [("value", out, ref, out64)] + [(f"gradient {i}", a, b, c)
                                            for i, (a, b, c) in enumerate(zip(grads, ref_grads, grads64))]
    for what, a, b, c in pairs:
        if c is None:
            continue
        a = torch.zeros_like(c) if a is None else a
        b = torch.zeros_like(c) if b is None else b
        ours_err, torch_err = _max_err(a, c), _max_err(b, c)
        bound = 2 * torch_err + 2 * ULP[dtype] * _scale(c)
        assert ours_err <= bound or (ours_err != ours_err and torch_err != torch_err), (
            f"{name}: {what}: error {ours_err:.3g} against float64, torch's {torch_err:.3g}")


def _run(fn, args, kwargs, upstream=None, params=()):
    """``fn``'s output and its gradients with respect to the arguments that
    require grad and ``params`` (a module's), for ``upstream`` (a seeded
    random one when None), and that upstream."""
    out = fn(*args, **kwargs)
    wrt = _grad_tensors(list(args) + list(kwargs.values())) + [p for p in params if p.requires_grad]
    if not wrt or not out.requires_grad:
        return out, [], upstream
    if upstream is None:
        upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    return out, list(torch.autograd.grad(out, wrt, upstream, allow_unused=True)), upstream


def _fresh(args, kwargs):
    """Copies of the sample's tensors (a call may not see another's graph)."""
    def cp(v):
        return v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
    return [cp(a) for a in args], {k: cp(v) for k, v in kwargs.items()}


def _check(name: str, theirs, ours, args, kwargs, dtype, theirs64) -> None:
    """torch's call and ours on copies of the same arguments: both raise, or
    they agree (:func:`_agree`).  ``theirs``, ``ours``: (callable, parameters
    differentiated too); ``theirs64()``: torch's in float64, for the rule
    against float64."""
    a1, k1 = _fresh(args, kwargs)
    try:
        ref = _run(theirs[0], a1, k1, params=theirs[1])
    except Exception:  # torch refuses the sample: so must we
        a2, k2 = _fresh(args, kwargs)
        with pytest.raises(Exception):
            _run(ours[0], a2, k2, params=ours[1])
        return
    a2, k2 = _fresh(args, kwargs)
    out = _run(ours[0], a2, k2, ref[2], params=ours[1])

    def ref64():
        fn, params = theirs64()
        up = None if ref[2] is None else ref[2].double()
        return _run(fn, [_as64(a) for a in args], {k: _as64(v) for k, v in kwargs.items()}, up, params)[:2]

    _agree(name, out[:2], ref[:2], dtype, ref64)


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", [None, "triton", "cupy"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_opinfo_samples_match_torch(name, device, backend, dtype):
    if name not in OPINFOS:
        pytest.skip(f"this torch ({torch.__version__}) has no OpInfo {name!r}")
    if not _backend_here(backend, device):
        pytest.skip(f"backend {backend} does not serve {device} tensors here")
    if backend is not None and device == "cpu" and "linear_cross_entropy" in name:
        pytest.skip("the fused linear CE's thousand samples in the interpreter: through the default only")
    op = OPINFOS[name]
    if dtype not in op.supported_dtypes(device):
        pytest.skip(f"torch's {name} does not take {dtype} on {device}")
    fn = FUNCTIONS[name]
    ours = fn if backend is None else (lambda *a, **k: fn(*a, **k, backend=backend))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation warnings (size_average, kl_div's "mean")
        samples = list(op.sample_inputs(device, dtype, requires_grad=op.supports_autograd))
        assert samples
        for i, s in enumerate(samples):
            _check(f"{name} sample {i} ({s.summary() if hasattr(s, 'summary') else s})", (op.op, ()), (ours, ()),
                   [s.input, *s.args], dict(s.kwargs), dtype, lambda: (op.op, ()))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_opinfo_error_inputs_raise_torchs_class(name):
    if name not in OPINFOS:
        pytest.skip(f"this torch ({torch.__version__}) has no OpInfo {name!r}")
    op = OPINFOS[name]
    if op.error_inputs_func is None:
        pytest.skip(f"torch's OpInfo {name!r} has no error inputs")
    for ei in op.error_inputs("cpu"):
        s = ei.sample_input
        with pytest.raises(ei.error_type):
            FUNCTIONS[name](s.input, *s.args, **s.kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODULES)
def test_moduleinfo_inputs_match_torch(name, device, dtype):
    """torch's module inputs: the same constructor arguments, torch's
    state_dict loaded into ours, the same forward arguments."""
    if name not in MODULEINFOS:
        pytest.skip(f"this torch ({torch.__version__}) has no ModuleInfo {name!r}")
    if not _backend_here(None, device):
        pytest.skip(f"no {device} device")
    info = MODULEINFOS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=True)
        ran = 0
        for mi in inputs:
            if mi.forward_input is None:
                continue
            ca, ck = mi.constructor_input.args, mi.constructor_input.kwargs
            theirs = info.module_cls(*ca, **ck).to(device=device, dtype=dtype)
            ours = getattr(gnn, name)(*ca, **ck).to(device=device, dtype=dtype)
            ours.load_state_dict(theirs.state_dict())
            _check(f"{name}({ca}, {ck})", (theirs, list(theirs.parameters())), (ours, list(ours.parameters())),
                   list(mi.forward_input.args), dict(mi.forward_input.kwargs), dtype,
                   lambda m=theirs: _float64_copy(m))
            ran += 1
        assert ran


def _float64_copy(module):
    """(a float64 copy of ``module``, its parameters)."""
    m = copy.deepcopy(module).double()
    return m, list(m.parameters())


def _recompile_limit():
    """dynamo's per-code-object recompile limit (its name changed over the torch versions we admit)."""
    import torch._dynamo as dynamo
    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    return dynamo.config.patch(**{name: 10_000})


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_opinfo_samples_compile_without_graph_breaks(name):
    """Every float32 sample (every fourth of the fused linear CE's) through
    ``torch.compile(fullgraph=True)``: no graph break, and the eager result and
    gradients.  The "aot_eager" backend traces what inductor would (dynamo,
    the custom operators' fake implementations, AOTAutograd's joint graph)
    without generating code, which takes minutes per sample on this CPU.
    One compiled function serves all the samples, as in a training loop:
    a sample whose shapes or arguments the graphs so far do not cover
    recompiles (after the first change of a size, with that size dynamic),
    the others reuse a graph; each sample's result is checked either way."""
    if name not in OPINFOS:
        pytest.skip(f"this torch ({torch.__version__}) has no OpInfo {name!r}")
    import torch._dynamo as dynamo
    op, fn = OPINFOS[name], FUNCTIONS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings(), _recompile_limit():
        warnings.simplefilter("ignore")
        samples = list(op.sample_inputs("cpu", torch.float32, requires_grad=True))
        if "linear_cross_entropy" in name:
            samples = samples[::4]
        dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        ran = 0
        for i, s in enumerate(samples):
            args = [s.input, *s.args]
            try:
                eager = _run(fn, *_fresh(args, dict(s.kwargs)))
            except Exception:
                continue  # refused in eager code: the other tests check that torch refuses it too
            got = _run(compiled, *_fresh(args, dict(s.kwargs)), eager[2])
            # compiled against eager, the same kernels: torch's tolerances, with no float64 fallback
            _agree(f"{name} sample {i} compiled", got[:2], eager[:2], torch.float64, None)
            ran += 1
        assert ran


#: torch.nn.functional's names that gpuloss replaces, for torch's functional test entries
_F_NAMES = ("softmax", "log_softmax", "cross_entropy", "nll_loss", "kl_div", "mse_loss", "binary_cross_entropy",
            "binary_cross_entropy_with_logits")
_ENTRY_KEYS = ("softmax", "nllloss", "kldiv", "mseloss", "bceloss", "bcewithlogits", "crossentropy")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).replace("torch.", ""))
def test_common_nn_entries_through_gpuloss(monkeypatch, dtype):
    """torch's own module and criterion test entries (``common_nn``: the
    ``no_reduce`` functional forms with their captured targets, weights and
    ignore indices, the no-batch-dimension criteria) run once as they are and
    once with ``torch.nn.functional``'s loss and softmax functions replaced by
    gpuloss's: the same values and input gradients."""
    common_nn = pytest.importorskip("torch.testing._internal.common_nn")
    import torch.nn.functional as F
    calls = []
    entries = [t for t in common_nn.module_tests + common_nn.get_new_module_tests() + common_nn.criterion_tests
               if t.get("constructor") is not None
               and any(k in (t.get("fullname") or t.get("module_name", "")).lower() for k in _ENTRY_KEYS)]
    assert entries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in entries:
            name = t.get("fullname") or t.get("module_name")
            torch.manual_seed(0)
            x = t["input_fn"]() if "input_fn" in t else t["input"] if "input" in t else torch.randn(t["input_size"])
            tgt = t["target_fn"]() if "target_fn" in t else (torch.randn(t["target_size"]) if "target_size" in t
                                                              else None)
            x = x.to(dtype).requires_grad_() if x.is_floating_point() else x
            if tgt is not None and tgt.is_floating_point():
                tgt = tgt.to(dtype)
            inputs = (x,) if tgt is None else (x, tgt)
            module = t["constructor"](*t.get("constructor_args", ()))
            ref = module(*inputs)
            with monkeypatch.context() as m:
                for f in _F_NAMES:
                    ours = getattr(gpuloss, f)
                    m.setattr(F, f, (lambda fn, f: lambda *a, **k: calls.append(f) or fn(*a, **k))(ours, f))
                out = module(*inputs)
            torch.testing.assert_close(out, ref, msg=lambda msg: f"{name}: value: {msg}")
            if x.requires_grad and ref.requires_grad:
                up = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
                torch.testing.assert_close(torch.autograd.grad(out, x, up)[0], torch.autograd.grad(ref, x, up)[0],
                                           msg=lambda msg: f"{name}: gradient: {msg}")
    assert {"nll_loss", "kl_div", "mse_loss", "binary_cross_entropy_with_logits"} <= set(calls), set(calls)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_opinfo_samples_under_vmap_and_jvp(name):
    """torch.func on torch's float64 samples: ``vmap`` over a batch of two
    inputs gives the per-input results, and ``jvp`` with respect to the input
    gives torch's tangent.  For the fused linear CE the tangent is checked
    against torch's unchunked form: its chunked operator drops the tangent of
    an unbatched input (0 where finite differences give -0.102), which gpuloss
    does not."""
    if name not in OPINFOS:
        pytest.skip(f"this torch ({torch.__version__}) has no OpInfo {name!r}")
    from torch.func import jvp, vmap
    op, fn = OPINFOS[name], FUNCTIONS[name]
    torch.manual_seed(0)
    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, s in enumerate(op.sample_inputs("cpu", torch.float64, requires_grad=False)):
            kw = dict(s.kwargs)
            x = s.input
            batch = torch.stack([x, x * 0.5 + 0.1 if x.is_floating_point() else x])
            try:
                ref = torch.stack([op.op(b, *s.args, **kw) for b in batch])
            except Exception:
                continue  # torch refuses the sample (the other tests check that we do too)
            got = vmap(lambda b: fn(b, *s.args, **kw))(batch)
            torch.testing.assert_close(got, ref, equal_nan=True, msg=lambda m: f"{name} sample {i} vmap: {m}")
            if x.is_floating_point():
                ref_kw = {k: v for k, v in kw.items() if not (k == "options" and "linear_cross_entropy" in name)}
                tangent = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(i))
                ours = jvp(lambda a: fn(a, *s.args, **kw), (x,), (tangent,))[1]
                theirs = jvp(lambda a: op.op(a, *s.args, **ref_kw), (x,), (tangent,))[1]
                torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"{name} sample {i} jvp: {m}")
            ran += 1
    assert ran


@pytest.mark.parametrize("name", sorted(n for n in FUNCTIONS if "linear_cross_entropy" not in n))
def test_opinfo_samples_second_derivatives(name):
    """torch's float64 samples (every argument form: class weights, ignore_index,
    label smoothing, probability targets, K-dimensional inputs, reductions),
    differentiated twice: the gradients taken with create_graph=True, then the
    gradient of their product with a fixed random tensor, with respect to every
    argument that requires grad; torch's values, to float64 tolerances.  (The
    fused linear CE raises, as torch's chunked one.)"""
    if name not in OPINFOS:
        pytest.skip(f"this torch ({torch.__version__}) has no OpInfo {name!r}")
    op, fn = OPINFOS[name], FUNCTIONS[name]
    torch.manual_seed(0)

    def twice(f, args, kwargs):
        out = f(*args, **kwargs)
        wrt = _grad_tensors(list(args) + list(kwargs.values()))
        up = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        g = torch.autograd.grad(out, wrt, up, create_graph=True, allow_unused=True)
        gen = torch.Generator().manual_seed(2)
        inner = sum((gi * torch.randn(gi.shape, dtype=gi.dtype, generator=gen)).sum()
                    for gi in g if gi is not None and gi.requires_grad)
        gg = torch.autograd.grad(inner, wrt, allow_unused=True) if torch.is_tensor(inner) else ()
        return [out, *g, *gg]

    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, s in enumerate(op.sample_inputs("cpu", torch.float64, requires_grad=True)):
            args, kwargs = [s.input, *s.args], dict(s.kwargs)
            a1, k1 = _fresh(args, kwargs)
            try:
                ref = twice(op.op, a1, k1)
            except Exception:
                continue  # torch refuses the sample (test_opinfo_samples_match_torch: so do we)
            a2, k2 = _fresh(args, kwargs)
            got = twice(fn, a2, k2)
            assert len(got) == len(ref), f"{name} sample {i}"
            for j, (x, y) in enumerate(zip(got, ref)):
                if y is None:
                    assert x is None or not x.any(), f"{name} sample {i} result {j}"
                    continue
                torch.testing.assert_close(x, y, equal_nan=True, msg=lambda m: f"{name} sample {i} result {j}: {m}")
            ran += 1
    assert ran
