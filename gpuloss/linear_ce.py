"""Fused linear + cross-entropy: the loss of ``cross_entropy(hidden @ weight.T + bias, target)``
and its gradients with respect to ``hidden``, ``weight`` and ``bias``, without ever
holding the ``N x V`` logits.

Why
---
An LLM's output layer maps ``N`` hidden states of width ``H`` to ``V``
vocabulary logits.  At N = 8192, V = 128256 the logits alone are 2 GiB in
bf16, their gradient 2 GiB more, and an eager ``F.cross_entropy`` adds its
fp32 temporaries (12 GiB in ``PERF.md``).  Here the tokens are processed in
chunks of ``n`` rows, and for each chunk:

1. ``Z = h_c @ W.T (+ b)``: the array library's matmul into one reused
   ``(n, V)`` buffer (the only ``O(V)``-per-token memory);
2. our fused cross-entropy kernel (``Backend.cross_entropy`` with
   ``grad_inplace=True``, ``reduction="sum"``) reads ``Z`` once and writes
   ``dL/dZ`` over it: read n·V + write n·V, no second buffer;
3. ``grad_hidden[c] = dZ @ W``, ``grad_weight += dZ.T @ h_c``,
   ``grad_bias += sum_rows(dZ)``: two matmuls and a column sum.

Three matmuls of ``2 N V H`` flops each, the same as the unfused
``linear + cross_entropy`` forward and backward; the memory traffic of the
loss itself is the fused kernel's floor, on ``n`` rows at a time.

Chunking over the vocabulary
----------------------------
Only tokens are chunked.  Splitting ``V`` too would bound the buffer by
``n x V_block``, but the softmax normalisation needs the whole row: a
vocab-split design must either recompute every logit block a second time (a
fourth matmul, +33% flops: what Cut Cross-Entropy does, 2x slower than the
unfused path in ``PERF.md``) or use a partial-row (max, sum) kernel plus a
rescaling pass.  With one ``n x V`` buffer of ``_CHUNK_BYTES`` (256 MiB on a
GPU) the logits memory is already bounded independently of ``N``; splitting
``V`` would only pay for vocabularies so large that a single row of logits
exceeds the budget, and then only in memory, never in time.

Memory
------
Besides the outputs (``grad_hidden`` like ``hidden``, ``grad_weight`` like
``weight``, ``grad_bias`` like ``bias``): one logits chunk ``n x V`` in the
weight's dtype, and, when there is more than one chunk, the float32
accumulators of ``grad_weight`` (``V x H x 4`` bytes) and ``grad_bias``.
With a single chunk the weight gradient is one GEMM over all tokens, whose
accumulation is already fp32 inside the GEMM, so no accumulator is
allocated.  ``accumulate_fp32=False`` accumulates in the weight's dtype
instead (``beta=1`` in the GEMM, one rounding per chunk, as Liger-Kernel
does): ``V x H x 4`` bytes less memory (2 GiB at 128256 x 4096), for a
rounding error of about ``sqrt(chunks) * 2**-9`` relative in bf16.

Mean reduction
--------------
The chunks run with ``reduction="sum"``; the global divisor
``sum(class_weight[target])`` over non-ignored tokens is computed on the
device before the loop (no host synchronisation).  The loss is divided once
at the end, and so are the gradients: scaling ``grad_hidden`` (N x H) and the
fp32 ``grad_weight`` accumulator (V x H, fused with the final cast) touches
``(N + V) H`` elements, where scaling each chunk of ``dZ`` would touch
``N V`` (33x more at H = 4096, V = 128256), and the scale is a device scalar
that cannot be passed to a GEMM as its ``alpha`` without a synchronisation.

Autograd and upstream gradients
-------------------------------
For ``"mean"``/``"sum"`` the forward pass computes the gradients (the loss
needs the logits anyway, and recomputing them in backward would cost a
fourth matmul); backward multiplies them by the 0-d upstream gradient on the
device, in place (so a second backward through the same graph raises unless
``allow_retain_graph=True``).  For
``"none"`` the per-token upstream gradient ``g`` is only known in backward,
and ``dL/dW = dZ.T diag(g) h`` cannot be formed from the unscaled sum, so
the forward pass computes the per-token losses only and backward recomputes
each chunk's logits (one more matmul) and applies ``g`` where it is cheap:
``diag(g)`` commutes into the ``(n, H)`` operands, ``grad_hidden[c] = g *
(dZ @ W)``, ``grad_weight += dZ.T @ (g * h_c)``, ``grad_bias += dZ.T @ g``,
never a pass over ``n x V``.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _validate as VAL
from ._arrays import classify, dtype_name
from .dispatch import select

__all__ = ["LinearLossGrad", "linear_cross_entropy", "default_chunk_size", "LinearCrossEntropyLoss"]

#: bytes of one logits chunk (n x V in the weight's dtype), per device type;
#: module attributes so tests can shrink them
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
#: tests set this: every buffer this module allocates with ``empty`` is
#: filled with NaN first, so an element the loop fails to write shows up
_POISON = False
#: GEMM-friendly chunk: multiples of this many rows once a chunk is at least 2x it
_CHUNK_ALIGN = 128


class LinearLossGrad(NamedTuple):
    """Loss and gradients of :func:`linear_cross_entropy` (``return_grad=True``).

    loss:        the loss (0-d, or ``hidden.shape[:-1]`` for ``reduction="none"``)
    grad_hidden: d loss / d hidden, hidden's shape and dtype (None if not asked)
    grad_weight: d loss / d weight, (V, H) in weight's dtype
    grad_bias:   d loss / d bias, (V,) in bias's dtype, or None without bias

    For ``reduction="none"`` the gradients are those of the sum of the
    per-token losses.
    """
    loss: Any
    grad_hidden: Any
    grad_weight: Any
    grad_bias: Any = None


def default_chunk_size(n_tokens: int, vocab: int, itemsize: int, device_type: str = "cuda") -> int:
    """Tokens per chunk so that one ``(chunk, vocab)`` logits buffer fits
    ``_CHUNK_BYTES[device_type]``, rounded down to a multiple of 128 rows
    (whole GEMM tiles) when that leaves at least 256, and at most ``n_tokens``.

    Larger chunks mean fewer fp32 accumulations of ``grad_weight`` (each one
    reads and writes ``V x H x 4`` bytes in the GEMM's epilogue); smaller
    chunks mean less memory.  256 MiB is 1024 tokens at V = 128256 bf16.
    """
    budget = _CHUNK_BYTES.get(device_type, _CHUNK_BYTES["cuda"])
    rows = budget // max(1, vocab * itemsize)
    if rows >= 2 * _CHUNK_ALIGN:
        rows = rows // _CHUNK_ALIGN * _CHUNK_ALIGN
    return int(max(1, min(max(n_tokens, 1), rows)))


# ---------------------------------------------------------------------------
# array-library glue: matmuls and reductions in the caller's library
# ---------------------------------------------------------------------------

class _XpOps:
    """NumPy / CuPy: ``xp.matmul`` (BLAS / cuBLAS)."""

    def __init__(self, xp):
        self.xp = xp

    def empty(self, shape, like, dtype=None):
        a = self.xp.empty(shape, dtype=like.dtype if dtype is None else dtype)
        if _POISON:
            a.fill(np.nan)
        return a

    def zeros(self, shape, like, dtype=None):
        return self.xp.zeros(shape, dtype=like.dtype if dtype is None else dtype)

    def acc_dtype(self, a):
        return self.xp.float64 if a.dtype == np.float64 else self.xp.float32

    def cast(self, a, like):
        return a if a.dtype == like.dtype else a.astype(like.dtype)

    def logits(self, h, W, b, out):
        self.xp.matmul(h, W.T, out=out)
        if b is not None:
            out += b

    def mm(self, a, b, out=None):
        return self.xp.matmul(a, b, out=out)

    def mm_acc(self, acc, a, b, slab: int):
        """acc += a @ b.  NumPy and CuPy have no GEMM with beta = 1 through
        ``matmul``, so the product goes through a temporary of ``slab`` rows of
        ``a`` at a time (at most one logits chunk of memory), converted to
        ``acc``'s dtype as it is added."""
        for r0 in range(0, a.shape[0], slab):
            acc[r0:r0 + slab] += self.xp.matmul(a[r0:r0 + slab], b)

    def colsum_acc(self, acc, dz):
        acc += dz.sum(axis=0, dtype=acc.dtype)

    def mv_acc(self, acc, dzT, g):
        acc += self.xp.matmul(dzT, g.astype(dzT.dtype))

    def rowscale(self, a, g):
        """a * g[:, None] in a's dtype."""
        return (a * g[:, None]).astype(a.dtype, copy=False)

    def mul_(self, a, s):
        a *= a.dtype.type(s) if np.isscalar(s) else s
        return a

    def zeros_scalar(self, like):
        return self.xp.zeros((), dtype=self.xp.float64)

    def divisor(self, t, cw, ignore_index: int, V: int):
        xp = self.xp
        ok = (t != ignore_index) & (t >= 0) & (t < V)
        if cw is None:
            return ok.sum(dtype=xp.float64)
        return (cw[xp.where(ok, t, 0)].astype(xp.float64) * ok).sum()

    def inv_or_zero(self, d):
        xp = self.xp
        d = xp.asarray(d, dtype=xp.float64)
        safe = xp.where(d != 0, d, 1.0)
        return xp.where(d != 0, 1.0 / safe, 0.0)


class _TorchOps:
    """torch tensors: ``torch.mm``/``addmm`` (cuBLAS or the CPU BLAS)."""

    # per device: whether aten::addmm.dtype_out accumulates a bf16/fp16
    # product into an fp32 tensor in place (checked once, see mm_acc)
    _dtype_out_ok: dict = {}
    _lock = threading.Lock()

    def __init__(self):
        import torch
        self.torch = torch

    def empty(self, shape, like, dtype=None):
        a = self.torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)
        if _POISON:
            a.fill_(float("nan"))
        return a

    def zeros(self, shape, like, dtype=None):
        return self.torch.zeros(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)

    def acc_dtype(self, a):
        return self.torch.float64 if a.dtype == self.torch.float64 else self.torch.float32

    def cast(self, a, like):
        return a if a.dtype == like.dtype else a.to(like.dtype)

    def logits(self, h, W, b, out):
        if b is None:
            self.torch.mm(h, W.t(), out=out)
        else:
            self.torch.addmm(b, h, W.t(), out=out)

    def mm(self, a, b, out=None):
        if out is None:
            return self.torch.mm(a, b)
        return self.torch.mm(a, b, out=out)

    def _fused_dtype_out(self, acc, a, b) -> bool:
        """Whether ``aten::addmm.dtype_out(acc, a, b, fp32, out=acc)`` (a bf16/fp16
        GEMM accumulated into fp32 by cuBLAS, C read and written once) works on
        this device and torch build.  Checked once per device on a tiny random
        problem against a float64 product: the GPU path cannot be tested on a
        machine without a GPU, so it verifies itself (one synchronisation per
        process), and falls back to the slab loop if the overload is missing
        or its result is wrong."""
        torch = self.torch
        key = (str(acc.device), a.dtype)
        with self._lock:
            if key in self._dtype_out_ok:
                return self._dtype_out_ok[key]
            ok = False
            if acc.device.type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype_out"):
                try:
                    g = torch.Generator(device=acc.device).manual_seed(1234)
                    x = torch.randn(37, 19, device=acc.device, generator=g).to(a.dtype)
                    y = torch.randn(19, 23, device=acc.device, generator=g).to(a.dtype)
                    c0 = torch.randn(37, 23, device=acc.device, generator=g, dtype=acc.dtype)
                    c = c0.clone()
                    torch.ops.aten.addmm.dtype_out(c, x, y, acc.dtype, out=c)
                    want = c0.double() + x.double() @ y.double()
                    ok = bool(torch.allclose(c.double(), want, rtol=1e-4, atol=1e-4))
                except (RuntimeError, TypeError, NotImplementedError):
                    ok = False
            self._dtype_out_ok[key] = ok
            return ok

    def mm_acc(self, acc, a, b, slab: int):
        """acc += a @ b with acc in fp32 (or a's dtype): in place in the GEMM
        (beta = 1) when the dtypes allow, else ``slab`` rows at a time through
        a temporary in a's dtype."""
        if acc.dtype == a.dtype:
            acc.addmm_(a, b)
            return
        if self._fused_dtype_out(acc, a, b):
            self.torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, out=acc)
            return
        for r0 in range(0, a.shape[0], slab):
            acc[r0:r0 + slab].add_(self.torch.mm(a[r0:r0 + slab], b))

    def colsum_acc(self, acc, dz):
        acc.add_(dz.sum(dim=0, dtype=acc.dtype))

    def mv_acc(self, acc, dzT, g):
        acc.add_(self.torch.mv(dzT, g.to(dzT.dtype)))

    def rowscale(self, a, g):
        return (a * g[:, None]).to(a.dtype)

    def mul_(self, a, s):
        return a.mul_(s)

    def zeros_scalar(self, like):
        return self.torch.zeros((), dtype=self.torch.float64, device=like.device)

    def divisor(self, t, cw, ignore_index: int, V: int):
        torch = self.torch
        ok = (t != ignore_index) & (t >= 0) & (t < V)
        if cw is None:
            return ok.sum(dtype=torch.float64)
        return (cw[torch.where(ok, t, torch.zeros_like(t))].double() * ok).sum()

    def inv_or_zero(self, d):
        torch = self.torch
        return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _ops_for(kind: str):
    if kind == "torch":
        return _TorchOps()
    if kind == "cupy":
        return _XpOps(sys.modules["cupy"])
    return _XpOps(np)


# ---------------------------------------------------------------------------
# the chunk loop
# ---------------------------------------------------------------------------

class _Opts(NamedTuple):
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    chunk: int
    accumulate_fp32: bool
    allow_retain_graph: bool = False


def _fused(kind: str, be, h, W, b, t, cw, o: _Opts, *, need_h: bool, need_w: bool, need_b: bool,
           row_grad=None, scale_mean: bool = True):
    """The chunk loop on 2-D arrays of the caller's kind.

    Parameters
    ----------
    h : (N, H) hidden states; W : (V, H); b : (V,) or None; t : (N,) int
    cw : (V,) float32/float64 class weights or None
    need_h, need_w, need_b : which gradients to form (none: loss only)
    row_grad : (N,) per-token upstream gradient (backward of ``"none"``), or None
    scale_mean : divide loss and gradients by the mean divisor (``"mean"``)

    Returns
    -------
    (loss, grad_h, grad_w, grad_b): loss 0-d float64 (``"mean"``/``"sum"``)
    or (N,) float32/float64 per token (``"none"``); gradients in the dtypes
    of h, W, b, or None.
    """
    ops = _ops_for(kind)
    N, H = h.shape
    V = W.shape[0]
    n = max(1, min(o.chunk, N)) if N else 1
    n_chunks = -(-N // n)
    want_grad = need_h or need_w or need_b
    ce_red = "none" if o.reduction == "none" else "sum"

    # one reused logits chunk, in the weight's dtype (the GEMM's output type)
    buf = ops.empty((n, V), W)
    loss_rows = ops.empty((N,), W, ops.acc_dtype(W)) if o.reduction == "none" else None
    loss_sum = None if o.reduction == "none" else ops.zeros_scalar(W)

    gh = ops.empty((N, H), h) if need_h else None
    # grad_weight: a single chunk is one GEMM over every token (fp32 inside
    # the GEMM, rounded once); several chunks accumulate in fp32 and cast once
    direct_w = need_w and n_chunks == 1
    gw_acc = None
    if need_w and not direct_w:
        gw_acc = ops.zeros((V, H), W, ops.acc_dtype(W) if o.accumulate_fp32 else None)
    gb_acc = ops.zeros((V,), W, ops.acc_dtype(W)) if (need_b and b is not None) else None
    gw_direct = None
    # slab of rows for NumPy/CuPy's accumulate-through-a-temporary: the
    # temporary is at most one logits chunk
    slab = max(1, (n * V) // max(H, 1))

    native_cw = None if cw is None else be.to_native(cw, kind)
    for c0 in range(0, N, n):
        c1 = min(N, c0 + n)
        hc = h[c0:c1]
        z = buf[:c1 - c0]
        ops.logits(hc, W, b, z)
        res = be.cross_entropy(be.to_native(z, kind), be.to_native(t[c0:c1], kind), weight=native_cw,
                               ignore_index=o.ignore_index, label_smoothing=o.label_smoothing,
                               z_loss=o.z_loss, softcap=o.softcap, reduction=ce_red,
                               want_grad=want_grad, grad_inplace=True)
        loss_c = be.from_native(res.loss, kind)
        if loss_rows is not None:
            loss_rows[c0:c1] = loss_c
        else:
            loss_sum += loss_c
        if not want_grad:
            continue
        # dZ over z (a float32 copy only where the backend could not write in
        # place, e.g. bf16 CPU tensors served by NumPy): back to W's dtype
        dz = ops.cast(be.from_native(res.grad, kind), W)
        g = None if row_grad is None else row_grad[c0:c1]
        if need_h:
            if g is None:
                ops.mm(dz, W, out=gh[c0:c1])
            else:
                gh[c0:c1] = ops.rowscale(ops.mm(dz, W), g)
        if need_w:
            hs = hc if g is None else ops.rowscale(hc, g)
            if direct_w:
                gw_direct = ops.mm(dz.T, hs)
            else:
                ops.mm_acc(gw_acc, dz.T, hs, slab)
        if gb_acc is not None:
            if g is None:
                ops.colsum_acc(gb_acc, dz)
            else:
                ops.mv_acc(gb_acc, dz.T, g)
    del buf

    scale = None
    if o.reduction == "mean" and scale_mean:
        div = ops.divisor(t, cw, o.ignore_index, V)
        scale = ops.inv_or_zero(div)
        with np.errstate(invalid="ignore", divide="ignore"):
            loss_sum = loss_sum / div  # 0/0 = nan for an all-ignored batch, as PyTorch

    def finish(acc, like):
        if acc is None:
            return None
        if scale is not None:
            ops.mul_(acc, scale)  # in fp32 for the fp32 accumulators, before the one cast
        return ops.cast(acc, like)

    if gh is not None and scale is not None:
        ops.mul_(gh, scale)
    gw = finish(gw_direct if direct_w else gw_acc, W) if need_w else None
    gb = finish(gb_acc, b) if gb_acc is not None else None
    if need_b and b is not None and gb is None:
        gb = ops.zeros((V,), b)
    loss = loss_rows if loss_rows is not None else loss_sum
    return loss, gh, gw, gb


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _prepare(hidden, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, z_loss,
             softcap, chunk_size, backend, accumulate_fp32, allow_retain_graph=False):
    kind, device = classify([("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias),
                             ("class_weight", class_weight)], optional=("bias", "class_weight"))
    VAL.check_reduction(reduction)
    VAL.check_floating("hidden", hidden, kind)
    VAL.check_floating("weight", weight, kind)
    if hidden.ndim < 1:
        raise ValueError("hidden must have at least 1 dimension (..., H), got a 0-d array")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (V, H) like nn.Linear.weight, got shape {tuple(weight.shape)}")
    V, H = int(weight.shape[0]), int(weight.shape[1])
    if int(hidden.shape[-1]) != H:
        raise ValueError(f"hidden's last dimension {hidden.shape[-1]} does not match weight's H={H} "
                         f"(weight has shape {tuple(weight.shape)})")
    if dtype_name(hidden, kind) != dtype_name(weight, kind):
        raise TypeError(f"hidden and weight must have the same dtype, got {dtype_name(hidden, kind)} and "
                        f"{dtype_name(weight, kind)}")
    if V == 0:
        raise ValueError("weight has V=0 rows: cross-entropy needs at least one class")
    if bias is not None:
        VAL.check_floating("bias", bias, kind)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape (V,) = ({V},), got {tuple(bias.shape)}")
        if dtype_name(bias, kind) != dtype_name(weight, kind):
            raise TypeError(f"bias must have weight's dtype {dtype_name(weight, kind)}, got {dtype_name(bias, kind)}")
    if not VAL.is_integer(target, kind):
        raise TypeError(f"target must hold integer class indices, got {dtype_name(target, kind)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target has shape {tuple(target.shape)} but hidden of shape {tuple(hidden.shape)} "
                         f"needs class-index targets of shape {tuple(hidden.shape[:-1])}")
    VAL.check_weight("class_weight", class_weight, kind, V)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    VAL.check_range("label_smoothing", label_smoothing, 0.0, 1.0)
    VAL.check_finite_number("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    VAL.check_positive_or_none("softcap", softcap)
    VAL.check_bool("accumulate_fp32", accumulate_fp32)
    VAL.check_bool("allow_retain_graph", allow_retain_graph)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
            raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    be = select(kind, device, backend)
    VAL.check_class_targets("target", target, kind, V, int(ignore_index))
    target = VAL.as_index_target(target, kind)
    h2 = hidden.reshape(-1, H)
    t1 = target.reshape(-1)
    N = int(h2.shape[0])
    cw = None if class_weight is None else VAL.as_float_vector(class_weight, kind, weight)
    itemsize = 2 if dtype_name(weight, kind) in ("float16", "bfloat16") else \
        (8 if dtype_name(weight, kind) == "float64" else 4)
    chunk = int(chunk_size) if chunk_size is not None else \
        default_chunk_size(N, V, itemsize, "cpu" if device == "cpu" else "cuda")
    o = _Opts(int(ignore_index), reduction, float(label_smoothing), float(z_loss),
              None if softcap is None else float(softcap), chunk, bool(accumulate_fp32), bool(allow_retain_graph))
    return kind, be, h2, t1, cw, o


def _loss_out(loss, kind, hidden, reduction):
    """The loss in hidden's dtype (PyTorch returns the input's dtype) and,
    for "none", hidden's leading shape."""
    if reduction == "none":
        loss = loss.reshape(tuple(hidden.shape[:-1]))
    if kind == "torch":
        return loss.to(hidden.dtype)
    if kind == "numpy":
        return np.asarray(loss, dtype=hidden.dtype)
    return loss.astype(hidden.dtype)


# ---------------------------------------------------------------------------
# torch autograd
# ---------------------------------------------------------------------------

_Function = None


def _function():
    """The autograd Function, defined on first use (``import gpuloss`` does
    not import torch)."""
    global _Function
    if _Function is not None:
        return _Function
    import torch

    class LinearCrossEntropyFunction(torch.autograd.Function):
        """Fused linear + cross-entropy with gradients from the chunk loop.

        forward(hidden2d (N, H), weight (V, H), bias (V,) or None, target (N,),
        class_weight (V,) or None, be, o) -> loss (0-d, or (N,) for "none"),
        float32 (float64 for float64 inputs)."""

        @staticmethod
        def forward(ctx, h, W, b, t, cw, be, o):
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            need_b = need_b and b is not None
            ctx.be, ctx.o = be, o
            ctx.consumed = False
            if o.reduction == "none":
                # the per-token upstream gradient is unknown yet: loss only
                # now, logits recomputed in backward
                loss, _, _, _ = _fused("torch", be, h, W, b, t, cw, o, need_h=False, need_w=False,
                                       need_b=False)
                ctx.save_for_backward(h, W, b, t, cw)
                ctx.needs = (need_h, need_w, need_b)
                return loss
            loss, gh, gw, gb = _fused("torch", be, h, W, b, t, cw, o, need_h=need_h, need_w=need_w,
                                      need_b=need_b)
            ctx.save_for_backward(gh, gw, gb)
            return loss.to(torch.float64 if W.dtype == torch.float64 else torch.float32)

        @staticmethod
        def backward(ctx, grad_out):
            o = ctx.o
            if o.reduction == "none":
                h, W, b, t, cw = ctx.saved_tensors
                need_h, need_w, need_b = ctx.needs
                _, gh, gw, gb = _fused("torch", ctx.be, h, W, b, t, cw, o, need_h=need_h, need_w=need_w,
                                       need_b=need_b, row_grad=grad_out.reshape(-1))
                return gh, gw, gb, None, None, None, None
            if ctx.consumed:
                raise RuntimeError("linear_cross_entropy: backward through the same graph a second time needs "
                                   "allow_retain_graph=True (by default the saved gradients are scaled in place "
                                   "by the upstream gradient, which saves one gradient-sized allocation)")
            gh, gw, gb = ctx.saved_tensors
            # dL/dparam = grad_out * (gradient of the reduced loss), on the
            # device: one pass over each saved gradient, no host sync.  In
            # place unless the graph may be walked again.
            inplace = not o.allow_retain_graph
            ctx.consumed = inplace
            outs = []
            for g in (gh, gw, gb):
                outs.append(None if g is None else (g.mul_(grad_out) if inplace else g * grad_out))
            return outs[0], outs[1], outs[2], None, None, None, None

    _Function = LinearCrossEntropyFunction
    return _Function


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, class_weight=None, z_loss: float = 0.0,
                         softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                         accumulate_fp32: bool = True, allow_retain_graph: bool = False,
                         return_grad: bool = False, backend: Optional[str] = None):
    """Cross-entropy of a linear layer's output, ``cross_entropy(hidden @ weight.T + bias, target)``,
    computed in token chunks so that the ``N x V`` logits never exist.

    Parameters
    ----------
    hidden : (..., H) floating array (NumPy, CuPy or torch); leading dims are
        flattened into N tokens
    weight : (V, H), hidden's dtype (``nn.Linear.weight`` / an LM head)
    target : (...,) integer class indices, hidden's leading shape
    bias : optional (V,), weight's dtype
    ignore_index : tokens whose target equals it contribute nothing
    reduction : "mean" (divided by ``sum(class_weight[target])`` over the
        non-ignored tokens), "sum", or "none" (one loss per token)
    label_smoothing, class_weight, z_loss, softcap : as in
        :func:`gpuloss.cross_entropy` (``class_weight`` is its ``weight``)
    chunk_size : tokens per chunk; default :func:`default_chunk_size` (one
        chunk of logits <= 256 MiB on a GPU, 64 MiB on the CPU)
    accumulate_fp32 : accumulate grad_weight/grad_bias over chunks in float32
        and cast once (default); False accumulates in weight's dtype (saves
        ``V x H x 4`` bytes; see the module docstring)
    allow_retain_graph : torch autograd, "mean"/"sum": backward scales the
        saved gradients by the upstream gradient in place, so it can run once
        per forward; True multiplies out of place (one gradient-sized
        allocation more) so that ``retain_graph=True`` / ``gradcheck`` may
        call it again (``torch.nn.LinearCrossEntropyOptions`` has the same switch)
    return_grad : NumPy/CuPy/torch: return :class:`LinearLossGrad`
        ``(loss, grad_hidden, grad_weight, grad_bias)`` (for "none", the
        gradients of the sum of the per-token losses).  Without it NumPy/CuPy
        get the loss only and torch tensors get a loss that backpropagates
        into hidden, weight and bias through autograd.
    backend : "numpy" | "triton" | "cupy" | None (automatic)

    Returns
    -------
    The loss in hidden's dtype (0-d, or hidden's leading shape for "none"),
    or a :class:`LinearLossGrad`.

    Math (z = hidden W^T + b, dz the gradient of the cross-entropy w.r.t. the
    logits, :func:`gpuloss.reference.cross_entropy_grad`)::

        grad_hidden = dz W,   grad_weight = dz^T hidden,   grad_bias = sum_rows dz
    """
    kind, be, h2, t1, cw, o = _prepare(hidden, weight, target, bias, class_weight, ignore_index, reduction,
                                       label_smoothing, z_loss, softcap, chunk_size, backend, accumulate_fp32,
                                       allow_retain_graph)
    if return_grad not in (False, True):
        raise ValueError(f"return_grad must be False or True, got {return_grad!r}")
    if kind == "torch" and not return_grad:
        import torch
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                        (bias is not None and bias.requires_grad)):
            loss = _function().apply(h2, weight, bias, t1, cw, be, o)
            return _loss_out(loss, kind, hidden, reduction)
    if not return_grad:
        if kind == "torch":
            import torch
            with torch.no_grad():
                loss = _fused(kind, be, h2.detach(), weight.detach(), None if bias is None else bias.detach(), t1,
                              cw, o, need_h=False, need_w=False, need_b=False)[0]
        else:
            loss = _fused(kind, be, h2, weight, bias, t1, cw, o, need_h=False, need_w=False, need_b=False)[0]
        return _loss_out(loss, kind, hidden, reduction)
    if kind == "torch":
        import torch
        with torch.no_grad():
            loss, gh, gw, gb = _fused(kind, be, h2.detach(), weight.detach(),
                                      None if bias is None else bias.detach(), t1, cw, o,
                                      need_h=True, need_w=True, need_b=bias is not None)
    else:
        loss, gh, gw, gb = _fused(kind, be, h2, weight, bias, t1, cw, o, need_h=True, need_w=True,
                                  need_b=bias is not None)
    return LinearLossGrad(_loss_out(loss, kind, hidden, reduction), gh.reshape(tuple(hidden.shape)), gw, gb)


def _module_class():
    import torch

    class LinearCrossEntropyLoss(torch.nn.Module):
        """Fused LM head + cross-entropy as a module.

        ``loss = module(hidden, weight, target, bias=None)``: the argument
        order of ``torch.nn.functional.linear_cross_entropy`` and Cut
        Cross-Entropy (hidden first; Liger's ``LigerFusedLinearCrossEntropyLoss``
        takes the weight first).  The module holds no weight of its own: pass
        the LM head's ``lm_head.weight`` (and ``lm_head.bias``), so tied
        embeddings and FSDP-sharded parameters work unchanged.

        Parameters
        ----------
        ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size,
        accumulate_fp32, allow_retain_graph, backend : as :func:`linear_cross_entropy`
        weight : optional (V,) class weights, kept as a buffer (moves with
            ``.to()``), passed as ``class_weight``
        """

        def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                     weight=None, z_loss: float = 0.0, softcap: Optional[float] = None,
                     chunk_size: Optional[int] = None, accumulate_fp32: bool = True,
                     allow_retain_graph: bool = False, backend: Optional[str] = None):
            super().__init__()
            VAL.check_reduction(reduction)
            self.ignore_index = ignore_index
            self.reduction = reduction
            self.label_smoothing = label_smoothing
            self.z_loss = z_loss
            self.softcap = softcap
            self.chunk_size = chunk_size
            self.accumulate_fp32 = accumulate_fp32
            self.allow_retain_graph = allow_retain_graph
            self.backend = backend
            self.register_buffer("weight", weight)

        def forward(self, hidden, weight, target, bias=None):
            return linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing,
                                        class_weight=self.weight, z_loss=self.z_loss, softcap=self.softcap,
                                        chunk_size=self.chunk_size, accumulate_fp32=self.accumulate_fp32,
                                        allow_retain_graph=self.allow_retain_graph, backend=self.backend)

        def extra_repr(self) -> str:
            return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                    f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                    f"chunk_size={self.chunk_size}")

    # pickle and torch.save find the class by this name (gpuloss.nn re-exports it)
    LinearCrossEntropyLoss.__module__ = "gpuloss.nn"
    LinearCrossEntropyLoss.__qualname__ = "LinearCrossEntropyLoss"
    return LinearCrossEntropyLoss


def __getattr__(name: str):
    # ``LinearCrossEntropyLoss`` subclasses torch.nn.Module: built on first
    # access so that importing this module does not import torch
    if name == "LinearCrossEntropyLoss":
        cls = _module_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
