"""PyTorch integration: every backend primitive as a ``torch.library`` custom
operator with an autograd formula.

:mod:`gpuloss.functional` calls :func:`apply` for torch tensors when no
``return_grad`` is asked for.  Each primitive becomes one operator in the
``gpuloss`` namespace (``torch.ops.gpuloss.cross_entropy`` and so on) with

* an eager implementation that converts to the backend's native arrays
  (zero-copy where the backend can), runs the fused primitive and converts
  back;
* a fake (meta) implementation giving output shapes and dtypes without
  touching data, so ``torch.compile(..., fullgraph=True)`` traces straight
  through it: no graph break, and no host synchronisation anywhere;
* an autograd formula that reuses the gradient the fused forward pass already
  computed: ``backward = saved_grad * grad_output``.  The logits are never read
  again.

Why the gradient is an *output* of the forward operator
------------------------------------------------------
A loss-only forward pass reads the ``N x C`` logits once; the fused pass reads
them once and writes ``dL/dx`` once (``PERF.md``: read N·V + write N·V), where
an unfused backward would read the logits a second time and write the
gradient.  So the forward operator returns ``(loss, grad, grad_target, lse)``;
autograd saves ``grad`` (and ``grad_target``) and backward multiplies by the
upstream gradient: a 0-d tensor for reduced losses, a per-row (``(R,)``) or
per-element (``(R, C)``) tensor for ``reduction="none"``.  The multiplication
runs on the device: no ``.item()``, no Python branch on a device value.

``grad_inplace``: the gradient written over the logits
-----------------------------------------------------
``cross_entropy(..., inplace_backward=True)`` uses a second operator,
``gpuloss::cross_entropy_inplace``, declared with ``mutates_args=("x",)``:
it writes ``dL/dx`` (computed in fp32, rounded once to the logits' dtype) over
the logits buffer, saving an ``N x C`` allocation (12 GiB at 16384 x 128256
bf16 in ``PERF.md``).  Backward scales that buffer in place by the upstream
gradient and hands it on.  The hazard: **the logits are consumed**.  After the
forward call the tensor holds the gradient, not the logits, so

* a leaf tensor that requires grad (a parameter) must not be passed, nor a
  view of one: we raise ``ValueError`` before touching it;
* the logits must not be needed by any other autograd node.  The operator
  bumps the tensor's version counter (``torch.library`` does this for
  declared mutations), so an op that saved the logits for its own backward
  raises PyTorch's "modified by an inplace operation" ``RuntimeError`` at
  backward time instead of silently using the gradient as its input; the
  common case, the op that *produced* the logits having saved its output
  (``tanh``, ``sigmoid``, ``exp``...), is detected up front and raises
  ``ValueError`` in the forward call;
* backward can run once per forward (it scales the buffer in place); a second
  backward through the same graph raises.

Mutable custom operators cannot carry a ``register_autograd`` formula, so the
in-place variant is wrapped in a ``torch.autograd.Function`` (which
``torch.compile`` also traces without a graph break).
"""
import contextlib
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .backends.base import LossResult
from .dispatch import get_backend

__all__ = ["apply", "LOSS_OPS", "SOFTMAX_OPS"]

#: primitives that return a LossResult, and the loss's per-row ("row") or
#: per-element ("elem") shape under reduction="none"
LOSS_OPS = {
    "cross_entropy": "row", "nll_loss": "row", "kl_div_logits": "row",
    "kl_div": "elem", "bce_with_logits": "elem", "bce": "elem", "mse": "elem",
}
SOFTMAX_OPS = ("softmax_forward", "softmax_backward")
#: primitives whose floating target may receive a gradient
_TARGET_GRAD_OPS = ("cross_entropy", "kl_div", "bce_with_logits", "bce", "mse")
#: primitives whose loss comes with a per-row log-sum-exp
_LSE_OPS = ("cross_entropy",)

Out4 = Tuple[Tensor, Tensor, Tensor, Tensor]
Out3 = Tuple[Tensor, Tensor, Tensor]


# ---------------------------------------------------------------------------
# eager glue: torch tensors <-> the backend's native arrays
# ---------------------------------------------------------------------------

def _loss_dtype(x: Tensor) -> torch.dtype:
    """Losses are float32 whatever the storage dtype, float64 for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _run_primitive(backend: str, op: str, arrays: Dict[str, Optional[Tensor]], opts: Dict[str, Any]) -> Any:
    """Call primitive ``op`` of ``backend`` on torch tensors; returns what the
    primitive returns, converted back to tensors.

    The tensors are detached first: the custom operator's implementation runs
    below autograd, and a backend converting with ``.numpy()`` must not see
    ``requires_grad``.  ``detach()`` shares storage and version counter, so an
    in-place write still lands in the caller's tensor."""
    be = get_backend(backend)
    # the DLPack conversions too: CuPy orders a conversion on its current
    # stream, and the legacy default stream must not wait on a capturing one
    with _native_stream(be, next(v for v in arrays.values() if v is not None)):
        native = {k: (None if v is None else be.to_native(v.detach(), "torch")) for k, v in arrays.items()}
        res = getattr(be, op)(**native, **opts)
        conv = lambda a: None if a is None else be.from_native(a, "torch")  # noqa: E731
        if isinstance(res, LossResult):
            return LossResult(conv(res.loss), conv(res.grad), conv(res.grad_target), conv(res.lse))
        return conv(res)


@contextlib.contextmanager
def _native_stream(be, like: Tensor) -> Iterator[None]:
    """Run a CuPy backend on torch's current device and stream.

    torch orders work on its current stream (a side stream while a CUDA graph
    is captured); CuPy launches on its own current stream, by default the
    legacy default stream, which would be outside the capture and unordered
    with torch's work.  Triton launches on torch's stream by itself.  CuPy's
    allocations go through torch's caching allocator for the same reasons.""" 
    if be.native != "cupy" or like.device.type != "cuda":
        yield
        return
    import cupy
    dev = like.device

    def torch_alloc(size: int):
        # CuPy's buffers from torch's caching allocator: legal inside CUDA-graph
        # capture (torch gives captured allocations a private pool; cudaMalloc
        # from CuPy's own pool is not), and ordered on torch's stream.  The
        # tensor owns the bytes; UnownedMemory keeps it alive.
        buf = torch.empty(max(int(size), 1), dtype=torch.uint8, device=dev)
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(buf.data_ptr(), size, buf, dev.index), 0)

    with cupy.cuda.Device(dev.index), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream), \
            cupy.cuda.using_allocator(torch_alloc):
        yield


def _as(t: Optional[Tensor], like: Tensor, dtype: torch.dtype, shape) -> Tensor:
    """``t`` as a fresh-layout (contiguous) tensor of ``dtype`` on ``like``'s
    device, or an empty one where the primitive gave nothing.  The fake
    implementations promise exactly these dtypes, shapes and layouts, so the
    eager results must match them (a backend may, e.g., return float32 for a
    bfloat16 input it cannot represent)."""
    if t is None:
        return like.new_empty((0,), dtype=dtype)
    t = t.to(device=like.device, dtype=dtype)
    return t.reshape(shape).contiguous()


def _loss_shape(op: str, reduction: str, x: Tensor) -> Tuple[int, ...]:
    if reduction != "none":
        return ()
    return (x.shape[0],) if LOSS_OPS[op] == "row" else tuple(x.shape)


def _eager_loss(backend: str, op: str, arrays: Dict[str, Optional[Tensor]], opts: Dict[str, Any],
                x: Tensor, target: Tensor, want_grad: bool, want_gt: bool) -> Out4:
    res = _run_primitive(backend, op, arrays, opts)
    R = x.shape[0]
    loss = _as(res.loss, x, _loss_dtype(x), _loss_shape(op, opts["reduction"], x))
    grad = _as(res.grad if want_grad else None, x, x.dtype, x.shape)
    gt = _as(res.grad_target if want_gt else None, x, target.dtype, target.shape)
    lse = _as(res.lse if op in _LSE_OPS else None, x, torch.float32, (R,))
    return loss, grad, gt, lse


def _fake_loss(op: str, x: Tensor, target: Tensor, reduction: str, want_grad: bool, want_gt: bool) -> Out4:
    R = x.shape[0]
    loss = x.new_empty(_loss_shape(op, reduction, x), dtype=_loss_dtype(x))
    grad = x.new_empty(tuple(x.shape)) if want_grad else x.new_empty((0,))
    gt = target.new_empty(tuple(target.shape)) if want_gt else x.new_empty((0,), dtype=target.dtype)
    lse = x.new_empty((R,) if op in _LSE_OPS else (0,), dtype=torch.float32)
    return loss, grad, gt, lse


# ---------------------------------------------------------------------------
# softmax / log_softmax
# ---------------------------------------------------------------------------

@torch.library.custom_op("gpuloss::softmax_forward", mutates_args=())
def softmax_forward(x: Tensor, backend: str, log: bool) -> Tensor:
    """softmax (``log=False``) or log_softmax over the last axis of 2-D ``x``."""
    y = _run_primitive(backend, "softmax_forward", {"x": x}, {"log": log})
    return _as(y, x, x.dtype, x.shape)


@softmax_forward.register_fake
def _(x: Tensor, backend: str, log: bool) -> Tensor:
    return x.new_empty(tuple(x.shape))


@torch.library.custom_op("gpuloss::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, dy: Tensor, backend: str, log: bool) -> Tensor:
    """dx from the forward's output ``y`` and the upstream ``dy`` (2-D rows)."""
    dx = _run_primitive(backend, "softmax_backward", {"y": y, "dy": dy}, {"log": log})
    return _as(dx, y, y.dtype, y.shape)


@softmax_backward.register_fake
def _(y: Tensor, dy: Tensor, backend: str, log: bool) -> Tensor:
    return y.new_empty(tuple(y.shape))


def _softmax_setup(ctx, inputs, output) -> None:
    _, backend, log = inputs
    ctx.backend, ctx.log = backend, log
    ctx.save_for_backward(output)


def _softmax_bwd(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    # through the same backend primitive, which is itself differentiable
    # (below), so double backward works too
    return torch.ops.gpuloss.softmax_backward(y, grad.contiguous(), ctx.backend, ctx.log), None, None


softmax_forward.register_autograd(_softmax_bwd, setup_context=_softmax_setup)


def _softmax_backward_setup(ctx, inputs, output) -> None:
    y, dy, backend, log = inputs
    ctx.backend, ctx.log = backend, log
    ctx.save_for_backward(y, dy)


def _softmax_backward_bwd(ctx, G: Tensor):
    """Derivatives of the backward formulas, for double backward.

    softmax: dx_j = y_j (dy_j - s), s = sum_k dy_k y_k.  With upstream G::

        d/d dy_k = y_k (G_k - sum_j G_j y_j)          (softmax_backward(y, G))
        d/d y_k  = G_k (dy_k - s) - dy_k sum_j G_j y_j

    log_softmax: dx_j = dy_j - exp(y_j) S, S = sum_k dy_k::

        d/d dy_k = G_k - sum_j G_j exp(y_j)
        d/d y_k  = -G_k exp(y_k) S
    """
    y, dy = ctx.saved_tensors
    G = G.contiguous()
    if ctx.log:
        ey = torch.exp(y)
        g_dy = G - (G * ey).sum(-1, keepdim=True)
        g_y = -G * ey * dy.sum(-1, keepdim=True)
    else:
        g_dy = torch.ops.gpuloss.softmax_backward(y, G, ctx.backend, False)
        gy = (G * y).sum(-1, keepdim=True)
        g_y = G * (dy - (dy * y).sum(-1, keepdim=True)) - dy * gy
    return g_y, g_dy, None, None


softmax_backward.register_autograd(_softmax_backward_bwd, setup_context=_softmax_backward_setup)


# ---------------------------------------------------------------------------
# losses: one functional operator per primitive
# ---------------------------------------------------------------------------
# Signatures put the tensors first (input, target, weights), then the backend
# name and the options.  Every operator returns (loss, grad, grad_target,
# lse), with empty tensors for what was not asked for: custom operators return
# tensors, not None.

@torch.library.custom_op("gpuloss::cross_entropy", mutates_args=())
def cross_entropy(x: Tensor, target: Tensor, weight: Optional[Tensor], backend: str, ignore_index: int,
                  label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
                  want_grad: bool, want_grad_target: bool) -> Out4:
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                reduction=reduction, want_grad=want_grad, grad_inplace=False, want_grad_target=want_grad_target)
    return _eager_loss(backend, "cross_entropy", {"x": x, "target": target, "weight": weight}, opts,
                       x, target, want_grad, want_grad_target)


@cross_entropy.register_fake
def _(x, target, weight, backend, ignore_index, label_smoothing, z_loss, softcap, reduction, want_grad,
      want_grad_target):
    return _fake_loss("cross_entropy", x, target, reduction, want_grad, want_grad_target)


@torch.library.custom_op("gpuloss::nll_loss", mutates_args=())
def nll_loss(logp: Tensor, target: Tensor, weight: Optional[Tensor], backend: str, ignore_index: int,
             reduction: str, want_grad: bool) -> Out4:
    opts = dict(ignore_index=ignore_index, reduction=reduction, want_grad=want_grad)
    return _eager_loss(backend, "nll_loss", {"logp": logp, "target": target, "weight": weight}, opts,
                       logp, target, want_grad, False)


@nll_loss.register_fake
def _(logp, target, weight, backend, ignore_index, reduction, want_grad):
    return _fake_loss("nll_loss", logp, target, reduction, want_grad, False)


@torch.library.custom_op("gpuloss::kl_div_logits", mutates_args=())
def kl_div_logits(x: Tensor, target: Tensor, backend: str, temperature: float, target_is_logits: bool,
                  reduction: str, want_grad: bool) -> Out4:
    opts = dict(temperature=temperature, target_is_logits=target_is_logits, reduction=reduction,
                want_grad=want_grad)
    return _eager_loss(backend, "kl_div_logits", {"x": x, "target": target}, opts, x, target, want_grad, False)


@kl_div_logits.register_fake
def _(x, target, backend, temperature, target_is_logits, reduction, want_grad):
    return _fake_loss("kl_div_logits", x, target, reduction, want_grad, False)


@torch.library.custom_op("gpuloss::kl_div", mutates_args=())
def kl_div(input: Tensor, target: Tensor, backend: str, log_target: bool, reduction: str, want_grad: bool,
           want_grad_target: bool) -> Out4:
    opts = dict(log_target=log_target, reduction=reduction, want_grad=want_grad,
                want_grad_target=want_grad_target)
    return _eager_loss(backend, "kl_div", {"input": input, "target": target}, opts, input, target,
                       want_grad, want_grad_target)


@kl_div.register_fake
def _(input, target, backend, log_target, reduction, want_grad, want_grad_target):
    return _fake_loss("kl_div", input, target, reduction, want_grad, want_grad_target)


@torch.library.custom_op("gpuloss::bce_with_logits", mutates_args=())
def bce_with_logits(x: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
                    backend: str, reduction: str, want_grad: bool, want_grad_target: bool) -> Out4:
    opts = dict(reduction=reduction, want_grad=want_grad, want_grad_target=want_grad_target)
    return _eager_loss(backend, "bce_with_logits",
                       {"x": x, "target": target, "weight": weight, "pos_weight": pos_weight}, opts,
                       x, target, want_grad, want_grad_target)


@bce_with_logits.register_fake
def _(x, target, weight, pos_weight, backend, reduction, want_grad, want_grad_target):
    return _fake_loss("bce_with_logits", x, target, reduction, want_grad, want_grad_target)


@torch.library.custom_op("gpuloss::bce", mutates_args=())
def bce(p: Tensor, target: Tensor, weight: Optional[Tensor], backend: str, reduction: str, want_grad: bool,
        want_grad_target: bool) -> Out4:
    opts = dict(reduction=reduction, want_grad=want_grad, want_grad_target=want_grad_target)
    return _eager_loss(backend, "bce", {"p": p, "target": target, "weight": weight}, opts, p, target,
                       want_grad, want_grad_target)


@bce.register_fake
def _(p, target, weight, backend, reduction, want_grad, want_grad_target):
    return _fake_loss("bce", p, target, reduction, want_grad, want_grad_target)


@torch.library.custom_op("gpuloss::mse", mutates_args=())
def mse(x: Tensor, target: Tensor, backend: str, reduction: str, want_grad: bool,
        want_grad_target: bool) -> Out4:
    opts = dict(reduction=reduction, want_grad=want_grad, want_grad_target=want_grad_target)
    return _eager_loss(backend, "mse", {"x": x, "target": target}, opts, x, target, want_grad, want_grad_target)


@mse.register_fake
def _(x, target, backend, reduction, want_grad, want_grad_target):
    return _fake_loss("mse", x, target, reduction, want_grad, want_grad_target)


def _upstream(g: Tensor, like: Tensor) -> Tensor:
    """The upstream gradient of the loss, shaped to broadcast over the saved
    ``(R, C)`` gradient: 0-d for reduced losses, ``(R, 1)`` for per-row losses,
    ``(R, C)`` for per-element ones.  Cast to the gradient's dtype so a
    bfloat16 gradient stays bfloat16 without an fp32 ``N x C`` temporary (one
    extra rounding of the scale, within bf16's tolerance)."""
    if g.dim() == 1:
        g = g.unsqueeze(-1)
    return g.to(like.dtype)


def _loss_setup(ctx, inputs, output) -> None:
    _, grad, gt, _ = output
    ctx.n_inputs = len(inputs)
    # inputs are 2-D rows, so an asked-for gradient is 2-D and an absent one
    # is the 1-D empty placeholder: a shape test, not a value read
    ctx.has_grad = grad.dim() == 2
    ctx.has_gt = gt.dim() == 2
    ctx.save_for_backward(grad, gt)
    ctx.mark_non_differentiable(*output[1:])


def _loss_bwd(ctx, g_loss: Tensor, *unused: Tensor):
    """dL/dx = saved_grad * grad_output, dL/dtarget likewise: no re-read of
    the logits, no host synchronisation."""
    grad, gt = ctx.saved_tensors
    gx = grad * _upstream(g_loss, grad) if ctx.needs_input_grad[0] and ctx.has_grad else None
    gtt = gt * _upstream(g_loss, gt) if ctx.needs_input_grad[1] and ctx.has_gt else None
    return (gx, gtt) + (None,) * (ctx.n_inputs - 2)


for _op in (cross_entropy, nll_loss, kl_div_logits, kl_div, bce_with_logits, bce, mse):
    _op.register_autograd(_loss_bwd, setup_context=_loss_setup)


# ---------------------------------------------------------------------------
# cross-entropy with the gradient written over the logits
# ---------------------------------------------------------------------------

@torch.library.custom_op("gpuloss::cross_entropy_inplace", mutates_args=("x",))
def cross_entropy_inplace(x: Tensor, target: Tensor, weight: Optional[Tensor], backend: str, ignore_index: int,
                          label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
                          want_grad_target: bool) -> Out3:
    """Cross-entropy whose gradient ``dL/dx`` replaces ``x`` (loss, grad_target, lse returned)."""
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                reduction=reduction, want_grad=True, grad_inplace=True, want_grad_target=want_grad_target)
    res = _run_primitive(backend, "cross_entropy", {"x": x, "target": target, "weight": weight}, opts)
    g = res.grad
    # A backend that cannot write x's storage directly (NumPy with bfloat16
    # logits computes on a float32 copy) hands back that copy: one rounding
    # copy into x.  Comparing data pointers is host metadata, not a sync.
    if g is not None and (g.device != x.device or g.data_ptr() != x.data_ptr() or g.dtype != x.dtype):
        x.copy_(g.reshape(x.shape))
    loss = _as(res.loss, x, _loss_dtype(x), _loss_shape("cross_entropy", reduction, x))
    gt = _as(res.grad_target if want_grad_target else None, x, target.dtype, target.shape)
    lse = _as(res.lse, x, torch.float32, (x.shape[0],))
    return loss, gt, lse


@cross_entropy_inplace.register_fake
def _(x, target, weight, backend, ignore_index, label_smoothing, z_loss, softcap, reduction, want_grad_target):
    loss, _, gt, lse = _fake_loss("cross_entropy", x, target, reduction, False, want_grad_target)
    return loss, gt, lse


class _CrossEntropyInplaceFn(torch.autograd.Function):
    """Autograd for ``gpuloss::cross_entropy_inplace``: backward scales the
    logits buffer (now holding dL/dx) in place and returns it."""

    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Optional[Tensor], backend: str, ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
                want_grad_target: bool):
        loss, gt, lse = torch.ops.gpuloss.cross_entropy_inplace(
            x, target, weight, backend, ignore_index, label_smoothing, z_loss, softcap, reduction,
            want_grad_target)
        # x is saved *after* the write: its version now is the one backward
        # expects; any later in-place change to the buffer is caught on unpack.
        ctx.save_for_backward(x, gt)
        ctx.want_gt = want_grad_target
        ctx.mark_non_differentiable(gt, lse)
        return loss, gt, lse

    @staticmethod
    def backward(ctx, g_loss: Tensor, _g_gt: Tensor, _g_lse: Tensor):
        grad, gt = ctx.saved_tensors
        # scale in place: the buffer is ours now and the gradient is handed on
        # without a second N x C allocation
        gx = grad.mul_(_upstream(g_loss, grad)) if ctx.needs_input_grad[0] else None
        gtt = gt * _upstream(g_loss, gt) if (ctx.want_gt and ctx.needs_input_grad[1]) else None
        return gx, gtt, None, None, None, None, None, None, None, None


_LEAF_MSG = ("inplace_backward=True would overwrite the logits with their gradient, but they are (a view of) "
             "a leaf tensor that requires grad, e.g. a parameter; pass the output of an operation (the logits "
             "of a model) or use inplace_backward=False")


def _check_inplace_target(x: Tensor) -> None:
    """Refuse to overwrite logits that autograd still needs (see the module
    docstring).  Host-side metadata only."""
    if torch.compiler.is_compiling():
        # Under torch.compile the mutation is functionalized (no other node
        # can observe it) and dynamo cannot inspect grad_fn: only the leaf
        # rule applies.
        if x.is_leaf and x.requires_grad:
            raise ValueError(_LEAF_MSG)
        return
    t: Optional[Tensor] = x
    while t is not None:
        if t.is_leaf and t.requires_grad:
            raise ValueError(_LEAF_MSG)
        t = t._base
    fn = x.grad_fn
    if fn is None:
        return
    storage = x.untyped_storage().data_ptr()
    for name in dir(fn):
        if not name.startswith("_saved_"):
            continue
        try:
            v = getattr(fn, name)
        except RuntimeError:
            continue
        if isinstance(v, Tensor) and v.untyped_storage().data_ptr() == storage:
            raise ValueError(
                f"inplace_backward=True would overwrite the logits, but {fn.name()} (the operation that "
                f"produced them) saved them for its own backward; its gradient would be computed from the "
                f"overwritten values.  Use inplace_backward=False here")


# ---------------------------------------------------------------------------
# the entry point used by gpuloss.functional
# ---------------------------------------------------------------------------

def _requires_grad(t: Optional[Tensor]) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def apply(backend: str, op: str, arrays: Dict[str, Optional[Tensor]], opts: Dict[str, Any]) -> Any:
    """Run primitive ``op`` of ``backend`` on 2-D torch tensors, differentiably.

    Parameters
    ----------
    backend : the backend's registry name
    op : a :class:`gpuloss.backends.base.Backend` primitive name
    arrays : the primitive's array arguments by name (``x``/``logp``/``input``/
        ``p``, ``target``, ``weight``, ``pos_weight``, ``y``, ``dy``), 2-D
        ``(R, C)`` rows, 1-D class indices or ``(C,)`` weights, or None
    opts : the primitive's other keyword arguments, without ``want_grad`` /
        ``want_grad_target`` (derived here from ``requires_grad`` and
        ``torch.is_grad_enabled()``)

    Returns
    -------
    softmax ops: the output tensor, differentiable through the backend's
    ``softmax_backward``.  Losses: ``LossResult(loss, None, None, lse)`` whose
    ``loss`` backpropagates into the input and, where the primitive gives
    that gradient, into a floating target (``lse`` is None except for
    cross-entropy, and is not differentiable).
    """
    if op == "softmax_forward":
        return torch.ops.gpuloss.softmax_forward(arrays["x"], backend, bool(opts["log"]))
    if op == "softmax_backward":
        return torch.ops.gpuloss.softmax_backward(arrays["y"], arrays["dy"], backend, bool(opts["log"]))
    if op not in LOSS_OPS:
        raise ValueError(f"unknown primitive {op!r}")

    first = "logp" if op == "nll_loss" else "input" if op == "kl_div" else "p" if op == "bce" else "x"
    x, target = arrays[first], arrays["target"]
    want_grad = _requires_grad(x)
    want_gt = _requires_grad(target) and target.is_floating_point()
    if want_gt and op not in _TARGET_GRAD_OPS:
        what = "teacher logits / target probabilities" if op == "kl_div_logits" else "target"
        raise NotImplementedError(
            f"gpuloss {op}: the gradient with respect to the {what} is not supported; detach the target "
            f"(target.detach()) or use an op that differentiates it")
    for name in ("weight", "pos_weight"):
        w = arrays.get(name)
        if w is not None and w.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"gpuloss {op}: the gradient with respect to {name} is not supported")
    reduction = opts["reduction"]

    if op == "cross_entropy":
        o = opts
        common = (o["ignore_index"], float(o["label_smoothing"]), float(o["z_loss"]),
                  None if o["softcap"] is None else float(o["softcap"]), reduction)
        if o.get("grad_inplace") and want_grad:
            _check_inplace_target(x)
            loss, _, lse = _CrossEntropyInplaceFn.apply(x, target, arrays["weight"], backend, *common, want_gt)
            return LossResult(loss, None, None, lse)
        loss, _, _, lse = torch.ops.gpuloss.cross_entropy(x, target, arrays["weight"], backend, *common,
                                                         want_grad, want_gt)
        return LossResult(loss, None, None, lse)
    if op == "nll_loss":
        loss, *_ = torch.ops.gpuloss.nll_loss(x, target, arrays["weight"], backend, opts["ignore_index"],
                                             reduction, want_grad)
    elif op == "kl_div_logits":
        loss, *_ = torch.ops.gpuloss.kl_div_logits(x, target, backend, float(opts["temperature"]),
                                                  bool(opts["target_is_logits"]), reduction, want_grad)
    elif op == "kl_div":
        loss, *_ = torch.ops.gpuloss.kl_div(x, target, backend, bool(opts["log_target"]), reduction,
                                           want_grad, want_gt)
    elif op == "bce_with_logits":
        loss, *_ = torch.ops.gpuloss.bce_with_logits(x, target, arrays.get("weight"), arrays.get("pos_weight"),
                                                    backend, reduction, want_grad, want_gt)
    elif op == "bce":
        loss, *_ = torch.ops.gpuloss.bce(x, target, arrays.get("weight"), backend, reduction, want_grad, want_gt)
    else:
        loss, *_ = torch.ops.gpuloss.mse(x, target, backend, reduction, want_grad, want_gt)
    return LossResult(loss, None, None, None)
