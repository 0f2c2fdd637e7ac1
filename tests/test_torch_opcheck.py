"""``torch.library.opcheck`` on every gpuloss operator, as PyTorch asks of a
custom operator: its schema (no undeclared mutation or aliasing), its autograd
registration, its fake implementation against the real one, and AOTAutograd
over fake tensors with dynamic shapes, forward and backward, without
torch.compile around it.

The arguments are the ones the public functions pass: each call below runs
under a dispatch mode that records the ``gpuloss::`` operators it reaches
(forward and backward), and each distinct record is checked, with the
floating inputs requiring grad as in the call.  The in-place operators are
not differentiable themselves (torch.library refuses an autograd formula for
a mutating operator; an autograd Function wraps them): their inputs are
checked without grad.  Backends: what the dispatcher picks for CPU tensors
(NumPy), Triton in the interpreter (``TRITON_INTERPRET=1``), and on a GPU the
default, Triton and CuPy on CUDA tensors."""
from __future__ import annotations

import os
import warnings

import pytest

torch = pytest.importorskip("torch")

import gpuloss  # noqa: E402
from gpuloss import dispatch, torch_ops  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class _Record(TorchDispatchMode):
    """The ``gpuloss::`` operators a call reaches, with copies of their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "gpuloss":
            self.calls.append((func, [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args],
                               {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _calls(device, dtype):
    """(name, thunk) pairs: every operator, with the options that change its
    schema's arguments or outputs (weights, smoothing, probability targets,
    ignore_index, reductions, target gradients, the in-place gradient)."""
    torch.manual_seed(0)
    N, C, H = 5, 7, 6

    def leaf(*shape, fn=None):
        t = torch.randn(*shape, dtype=dtype, device=device)
        return (t if fn is None else fn(t)).detach().requires_grad_()

    x = leaf(N, C)
    t = torch.randint(0, C, (N,), device=device)
    t[1] = -100
    p = leaf(N, C, fn=lambda a: torch.softmax(a, -1))
    y = leaf(N, C, fn=torch.sigmoid)
    w = torch.rand(C, dtype=dtype, device=device) + 0.5
    h, W, b = leaf(N, H), leaf(C, H), leaf(C)
    return [
        ("softmax", lambda: gpuloss.softmax(x, -1)),
        ("log_softmax", lambda: gpuloss.log_softmax(x, -1)),
        ("cross_entropy", lambda: gpuloss.cross_entropy(x, t)),
        ("cross_entropy weight smoothing none",
         lambda: gpuloss.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction="none")),
        ("cross_entropy z_loss softcap sum", lambda: gpuloss.cross_entropy(x, t, z_loss=1e-3, softcap=5.0,
                                                                          reduction="sum")),
        ("cross_entropy probabilities", lambda: gpuloss.cross_entropy(x, p)),
        ("cross_entropy in place", lambda: gpuloss.cross_entropy(x * 1, t, inplace_backward=True)),
        ("nll_loss", lambda: gpuloss.nll_loss(torch.log_softmax(x, -1), t, weight=w)),
        ("kl_div", lambda: gpuloss.kl_div(torch.log_softmax(x, -1), p, reduction="batchmean")),
        ("kl_div log_target", lambda: gpuloss.kl_div(torch.log_softmax(x, -1), torch.log(p), log_target=True,
                                                     reduction="none")),
        ("kl_div_with_logits", lambda: gpuloss.kl_div_with_logits(x, x.detach().flip(0), temperature=2.0)),
        ("bce_with_logits", lambda: gpuloss.binary_cross_entropy_with_logits(x, y, pos_weight=w)),
        ("bce", lambda: gpuloss.binary_cross_entropy(torch.sigmoid(x), y, weight=w, reduction="none")),
        ("mse", lambda: gpuloss.mse_loss(x, y, reduction="sum")),
        ("linear_cross_entropy", lambda: gpuloss.linear_cross_entropy(h, W, t, linear_bias=b)),
        ("linear_cross_entropy none", lambda: gpuloss.linear_cross_entropy(h, W, t, reduction="none")),
    ]


def _recorded(device, dtype, backend):
    """The distinct operator calls (by operator, argument shapes and scalars)."""
    seen, out = set(), []
    with warnings.catch_warnings(), dispatch.use_backend(backend):
        warnings.simplefilter("ignore")
        for name, thunk in _calls(device, dtype):
            rec = _Record()
            with rec:
                loss = thunk()
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                with rec:
                    loss.backward(torch.rand_like(loss) + 0.5)
            assert rec.calls, f"{name}: no gpuloss operator ran"
            for func, args, kwargs in rec.calls:
                key = (str(func), tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
                if key not in seen:
                    seen.add(key)
                    out.append((name, func, args, kwargs))
    return out


def _with_grad(func, args):
    """The floating inputs of a differentiable operator require grad, as in
    the call; those of an operator with no autograd formula do not: the
    mutating ones (see the module docstring) and the backward of the fused
    linear CE (first order only, as torch's own)."""
    if func._schema.name.split("::")[1] not in torch_ops._EAGER:
        return args
    return [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


F32, F64 = torch.float32, torch.float64
#: (device, backend, dtype); the interpreter, slow, in float32 only
_CASES = [("cpu", None, F64), ("cpu", None, F32)]
if os.environ.get("TRITON_INTERPRET") == "1":
    _CASES.append(("cpu", "triton", F32))
if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    _CASES += [("cuda", b, d) for b in (None, "triton", "cupy") for d in (F64, F32)]


@pytest.mark.parametrize("device,backend,dtype", _CASES,
                         ids=[f"{d}-{b or 'default'}-{str(t)[6:]}" for d, b, t in _CASES])
def test_operators_pass_opcheck(device, backend, dtype):
    if backend is not None and not dispatch.backend_status()[backend][0]:
        pytest.skip(f"backend {backend!r} is not available here: {dispatch.backend_status()[backend][1]}")
    calls = _recorded(device, dtype, backend)
    ops = {str(func) for _, func, _, _ in calls}
    # every operator the public functions reach, the in-place one included
    assert {"gpuloss.cross_entropy.default", "gpuloss.cross_entropy_inplace.default",
            "gpuloss.linear_cross_entropy.default", "gpuloss.softmax_backward.default"} <= ops, ops
    failed = []
    for name, func, args, kwargs in calls:
        res = torch.library.opcheck(func, _with_grad(func, args), kwargs, raise_exception=False)
        bad = {k: v for k, v in res.items() if v != "SUCCESS"}
        if bad:
            failed.append(f"{name}: {func}: " + "; ".join(f"{k}: {str(v).splitlines()[0][:300]}"
                                                          for k, v in bad.items()))
    assert not failed, "\n".join(failed)


def test_public_functions_under_aot_autograd_without_compile():
    """AOTAutograd around the public functions, without torch.compile (fake
    tensors, dynamic shapes, the min-cut partition inductor uses): gradients
    equal eager's, the in-place gradient included (its checks read no storage
    of a fake tensor)."""
    from functorch.compile import aot_function, min_cut_rematerialization_partition, nop
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (4,))
    for name, fn, args in (("cross_entropy", lambda a, b: gpuloss.cross_entropy(a, b), (x, t)),
                           ("in place", lambda a, b: gpuloss.cross_entropy(a * 2, b, inplace_backward=True), (x, t)),
                           ("mse_loss", lambda a, b: gpuloss.mse_loss(a, b), (x, torch.ones_like(x))),
                           ("linear", lambda a, b, c: gpuloss.linear_cross_entropy(a, b, c), (x, w, t))):
        traced = aot_function(fn, fw_compiler=nop, bw_compiler=nop, dynamic=True,
                              partition_fn=min_cut_rematerialization_partition)
        diff = [a for a in args if a.requires_grad]
        torch.testing.assert_close(torch.autograd.grad(traced(*args), diff), torch.autograd.grad(fn(*args), diff),
                                   msg=lambda m: f"{name}: {m}")
