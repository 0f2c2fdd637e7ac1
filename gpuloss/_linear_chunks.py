"""The chunk loop of the fused linear cross-entropy, on 2-D arrays of the
caller's kind (NumPy, CuPy or torch): the ``linear_cross_entropy`` and
``linear_cross_entropy_backward`` ops of :mod:`gpuloss.ops`.

For each chunk of ``n`` tokens:

1. ``Z = h_c @ W.T (+ b)``: the array library's matmul into one reused
   ``(n, V)`` buffer (the only ``O(V)``-per-token memory);
2. the backend's fused cross-entropy launcher (``grad_inplace``, reduction
   "sum") reads ``Z`` once and writes ``dL/dZ`` over it: read n·V + write n·V;
3. ``grad_hidden[c] = dZ @ W``, ``grad_weight += dZ.T @ h_c``,
   ``grad_bias += sum_rows(dZ)``: two matmuls and a column sum.

Three matmuls of ``2 N V H`` flops each, the same as the unfused ``linear +
cross_entropy`` forward and backward.

K-dimensional losses (torch's ``out_features``): the weight arrives as
``(P C, H)`` with the ``P`` positions outermost, so a token's logits are ``P``
consecutive rows of ``C`` classes and the chunk buffer is viewed as
``(n P, C)`` rows for the kernel.

Mean reduction: the chunks run with "sum"; the divisor (the sum of class
weights over valid targets, on the device: no host synchronisation) divides
the loss once at the end, and so do the gradients, after the matmuls:
scaling ``grad_hidden`` and the fp32 ``grad_weight`` accumulator touches
``(N + V) H`` elements where scaling each ``dZ`` would touch ``N V``.  torch's
NaN gradients for a zero divisor (every valid target of class weight 0) are
reproduced by scaling with NaN in that case (``0 * inf`` inside a row is NaN
in torch; here the row sums have already been formed).

Upstream gradients: "mean"/"sum" form the gradients in the forward pass (the
loss needs the logits anyway); backward scales them.  "none" forms the
per-token losses only; backward recomputes each chunk's logits (one more
matmul) and applies the per-token upstream gradient ``g`` where it is cheap:
``diag(g)`` commutes into the ``(n, H)`` operands (``grad_hidden[c] = g *
(dZ @ W)``, ``grad_weight += dZ.T @ (g * h_c)``, ``grad_bias += dZ.T @ g``),
never a pass over ``n x V`` (except for K-dimensional losses, whose ``g`` is
per position).
"""
from __future__ import annotations

import sys
import threading
from typing import Any, NamedTuple, Optional

import numpy as np

from . import launch, rules
from .ops import CrossEntropyOptions, LinearCEOptions, LinearWant, Want

#: tests set this: every buffer this module allocates with ``empty`` is
#: filled with NaN first, so an element the loop fails to write shows up
_POISON = False


class LinearOut(NamedTuple):
    loss: Any
    grad_hidden: Any = None
    grad_weight: Any = None
    grad_bias: Any = None


class LinearGrads(NamedTuple):
    grad_hidden: Any = None
    grad_weight: Any = None
    grad_bias: Any = None


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

    def to_acc(self, a):
        return a.astype(self.acc_dtype(a), copy=False)

    def logits(self, h, W, b, out):
        self.xp.matmul(h, W.T, out=out)
        if b is not None:
            out += b

    def logits_acc(self, h, W, b, out, slab: int):
        """Float32 logits ``out`` of 16-bit operands: ``slab`` weight rows at a
        time upcast (no float32 copy of the whole weight)."""
        hf = h.astype(out.dtype)
        for r0 in range(0, W.shape[0], slab):
            self.xp.matmul(hf, W[r0:r0 + slab].astype(out.dtype).T, out=out[:, r0:r0 + slab])
        if b is not None:
            out += b.astype(out.dtype)

    def mm(self, a, b, out=None):
        return self.xp.matmul(a, b, out=out)

    def mm32(self, a, b, out, slab: int):
        """``out`` (float32) = a @ b of 16-bit operands, rounded once: ``slab``
        rows of ``b`` (columns of ``a``) at a time upcast."""
        out[...] = 0
        for k0 in range(0, b.shape[0], slab):
            out += self.xp.matmul(a[:, k0:k0 + slab].astype(out.dtype), b[k0:k0 + slab].astype(out.dtype))

    def mm_acc(self, acc, a, b, slab: int, first: bool = False):
        """acc += a @ b (``first``: acc = a @ b, whatever acc held).  NumPy and
        CuPy have no GEMM with beta = 1 through ``matmul``, so the product goes
        through a temporary of ``slab`` rows of ``a`` at a time (at most one
        logits chunk of memory), converted to ``acc``'s dtype as it is added."""
        for r0 in range(0, a.shape[0], slab):
            if first:
                acc[r0:r0 + slab] = self.xp.matmul(a[r0:r0 + slab], b)
            else:
                acc[r0:r0 + slab] += self.xp.matmul(a[r0:r0 + slab], b)

    def scaled_cast(self, acc, scale, like):
        """acc * scale in ``like``'s dtype (acc scaled in place, then cast)."""
        self.mul_(acc, scale)
        return self.cast(acc, like)

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

    def divisor(self, ok, t, cw):
        xp = self.xp
        if cw is None:
            return ok.sum(dtype=xp.float64)
        return (cw[xp.where(ok, t, 0)].astype(xp.float64) * ok).sum()

    def where(self, c, a, b):
        return self.xp.where(c, a, b)


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

    def to_acc(self, a):
        return a.to(self.acc_dtype(a))

    def logits(self, h, W, b, out):
        if b is None:
            self.torch.mm(h, W.t(), out=out)
        else:
            self.torch.addmm(b, h, W.t(), out=out)

    def logits_acc(self, h, W, b, out, slab: int):
        """Float32 logits ``out`` of 16-bit operands: on a GPU one GEMM on the
        16-bit operands with a float32 output (``addmm.dtype_out``, beta = 0,
        as torch's own chunked path), where it works; else ``slab`` weight rows
        at a time upcast (no float32 copy of the whole weight)."""
        if self._fused_dtype_out(out, h, W):
            self.torch.ops.aten.addmm.dtype_out(out, h, W.t(), out.dtype, beta=0, out=out)
            if b is not None:
                out.add_(b)
            return
        hf = h.to(out.dtype)
        for r0 in range(0, W.shape[0], slab):
            Ws = W[r0:r0 + slab].to(out.dtype)
            if b is None:
                self.torch.mm(hf, Ws.t(), out=out[:, r0:r0 + slab])
            else:
                self.torch.addmm(b[r0:r0 + slab].to(out.dtype), hf, Ws.t(), out=out[:, r0:r0 + slab])

    def mm(self, a, b, out=None):
        if out is None:
            return self.torch.mm(a, b)
        return self.torch.mm(a, b, out=out)

    def mm32(self, a, b, out, slab: int):
        """``out`` (float32) = a @ b of 16-bit operands, rounded once: one GEMM
        with a float32 output on a GPU (``addmm.dtype_out``, beta = 0) where it
        works; else ``slab`` rows of ``b`` (columns of ``a``) at a time upcast."""
        if self._fused_dtype_out(out, a, b):
            self.torch.ops.aten.addmm.dtype_out(out, a, b, out.dtype, beta=0, out=out)
            return
        out.zero_()
        for k0 in range(0, b.shape[0], slab):
            out.addmm_(a[:, k0:k0 + slab].to(out.dtype), b[k0:k0 + slab].to(out.dtype))

    def _fused_dtype_out(self, acc, a, b) -> bool:
        """Whether ``aten::addmm.dtype_out(acc, a, b, fp32, out=acc)`` (a bf16/fp16
        GEMM accumulated into fp32 by cuBLAS, C read and written once) works on
        this device and torch build.  Checked once per device on a tiny random
        problem against a float64 product (one synchronisation per process), and
        the slab loop is used if the overload is missing or its result is wrong."""
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

    def mm_acc(self, acc, a, b, slab: int, first: bool = False):
        """acc += a @ b with acc in fp32 (or a's dtype): in place in the GEMM
        (beta = 1) when the dtypes allow, else ``slab`` rows at a time through
        a temporary in a's dtype.  ``first``: acc = a @ b (beta = 0: whatever
        acc held, NaN included, is not read), so the accumulator needs no
        zero fill (a pass over V x H float32)."""
        if acc.dtype == a.dtype:
            if first:
                self.torch.mm(a, b, out=acc)
            else:
                acc.addmm_(a, b)
            return
        if self._fused_dtype_out(acc, a, b):
            self.torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, beta=0 if first else 1, out=acc)
            return
        for r0 in range(0, a.shape[0], slab):
            if first:
                acc[r0:r0 + slab].copy_(self.torch.mm(a[r0:r0 + slab], b))
            else:
                acc[r0:r0 + slab].add_(self.torch.mm(a[r0:r0 + slab], b))

    def scaled_cast(self, acc, scale, like):
        """acc * scale in ``like``'s dtype: one pass (read the accumulator, write
        the result), the product formed in float64 for a tensor scale (the
        divisor's dtype) or acc's dtype for a float, rounded once into
        ``like``'s dtype.  In place when the dtypes agree."""
        if acc.dtype == like.dtype:
            return self.mul_(acc, scale)
        torch = self.torch
        s = scale.reshape(1) if torch.is_tensor(scale) else scale  # a 0-d tensor would not promote
        return torch.mul(acc, s, out=torch.empty(acc.shape, dtype=like.dtype, device=acc.device))

    def colsum_acc(self, acc, dz):
        acc.add_(dz.sum(dim=0, dtype=acc.dtype))

    def mv_acc(self, acc, dzT, g):
        acc.add_(self.torch.mv(dzT, g.to(dzT.dtype)))

    def rowscale(self, a, g):
        return (a * g[:, None]).to(a.dtype)

    def mul_(self, a, s):
        """a *= s, the product in s's precision and rounded once into a's
        dtype: a 0-d tensor takes no part in type promotion and would be
        rounded to a bf16 ``a``'s dtype first, so it gets one dimension."""
        return a.mul_(s.reshape(1) if self.torch.is_tensor(s) and s.dim() == 0 else s)

    def zeros_scalar(self, like):
        return self.torch.zeros((), dtype=self.torch.float64, device=like.device)

    def divisor(self, ok, t, cw):
        torch = self.torch
        if cw is None:
            return ok.sum(dtype=torch.float64)
        return (cw[torch.where(ok, t, torch.zeros_like(t))].double() * ok).sum()

    def where(self, c, a, b):
        return self.torch.where(c, a, b)


def _ops_for(kind: str):
    if kind == "torch":
        return _TorchOps()
    if kind == "cupy":
        return _XpOps(sys.modules["cupy"])
    return _XpOps(np)


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------

class _Loop:
    """One pass over the token chunks: buffers, accumulators, per-chunk steps."""

    def __init__(self, be, kind: str, arrays, opts: LinearCEOptions, want: LinearWant, row_grad=None):
        self.be, self.kind, self.opts = be, kind, opts
        self.h, self.W, self.b, self.t, self.cw = arrays
        self.ops = ops = _ops_for(kind)
        self.N, self.H = self.h.shape
        self.VT = self.W.shape[0]
        self.C = opts.num_classes
        self.P = self.VT // self.C
        self.n = max(1, min(opts.chunk_size, self.N))
        self.row_grad = row_grad
        self.need_h, self.need_w = want.grad_hidden, want.grad_weight
        self.need_b = want.grad_bias and self.b is not None
        self.want_grad = self.need_h or self.need_w or self.need_b
        self.prob = self.t.ndim == 2
        # the one reused logits chunk: float32 for torch's chunked path over 16-bit operands
        self.logits32 = opts.logits == "float32" and ops.acc_dtype(self.W) != self.W.dtype
        self.buf = ops.empty((self.n, self.VT), self.W, ops.acc_dtype(self.W) if self.logits32 else None)
        self.loss_rows = ops.empty((self.N * self.P,), self.W, ops.acc_dtype(self.W)) \
            if opts.reduction == "none" else None
        self.loss_sum = None if opts.reduction == "none" else ops.zeros_scalar(self.W)
        # gradients formed here and scaled by backward: float32 for float16
        # operands until then (rules.saved_grad_dtype_name)
        wname = str(self.W.dtype).replace("torch.", "")
        self.keep32 = row_grad is None and rules.saved_grad_dtype_name(wname) != wname
        # grad_hidden: float32 for 16-bit operands, its product rounded once (rules.saved_grad_hidden_dtype_name)
        hname = str(self.h.dtype).replace("torch.", "")
        self.gh32 = row_grad is None and rules.saved_grad_hidden_dtype_name(hname) != hname
        self.gh = ops.empty((self.N, self.H), self.h, ops.acc_dtype(self.h) if self.gh32 else None) \
            if self.need_h else None
        # grad_weight: a single chunk is one GEMM over every token (fp32 inside
        # the GEMM, rounded once); several chunks accumulate in an fp32 buffer
        # ("float32") or in the weight's dtype inside the GEMM ("weight")
        self.direct_w = self.need_w and 0 < self.N <= self.n
        self.gw = self.lo = None
        self.first_w = True  # the first chunk's grad_weight GEMM writes the accumulator instead of adding to it
        self.split = self.need_w and not self.direct_w and opts.accumulate == "split" and _split_ok(kind, be, self.W)
        if self.split:  # float32 sums as two halves: gw (bf16, the upper ones) and lo
            self.gw = ops.empty((self.VT, self.H), self.W)
            self.lo = self.ops.torch.empty((self.VT, self.H), dtype=self.ops.torch.int16, device=self.W.device)
        elif self.need_w and not self.direct_w:
            acc = ops.acc_dtype(self.W) if opts.accumulate in ("float32", "split") else None
            # written by the first chunk's GEMM (beta = 0), zeros if no chunk runs
            self.gw = (ops.empty if self.N else ops.zeros)((self.VT, self.H), self.W, acc)
        self.gb = ops.zeros((self.VT,), self.W, ops.acc_dtype(self.W)) if self.need_b else None
        # rows of the slab temporary of NumPy/CuPy's accumulate: at most one logits chunk
        self.slab = max(1, (self.n * self.VT) // max(self.H, 1))
        # weight rows upcast at a time for float32 logits (where the GPU's float32-output GEMM is missing): about
        # a logits chunk's elements, and at least 1024 rows (a chunk of one token would make thousands of slabs)
        self.slab_w = max(self.slab, SLAB_MIN_ROWS)

    def ce_options(self) -> CrossEntropyOptions:
        o = self.opts
        return CrossEntropyOptions(o.ignore_index, "none" if o.reduction == "none" else "sum", o.label_smoothing,
                                   o.z_loss, o.softcap, True)

    def chunk(self, c0: int, c1: int, ce_opts: CrossEntropyOptions) -> None:
        ops, m, P, C = self.ops, c1 - c0, self.P, self.C
        hc = self.h[c0:c1]
        z = self.buf[:m]
        if self.logits32:
            ops.logits_acc(hc, self.W, self.b, z, self.slab_w)
        else:
            ops.logits(hc, self.W, self.b, z)
        zin = z.reshape(m * P, C)
        if self.gb is not None and self.be.name == "numpy":
            # on the CPU the bias gradient's column sum takes dZ before its rounding to 16 bits (below):
            # the CE writes dZ into a float32 copy of 16-bit logits (a GPU backend writes them in place)
            zin = ops.to_acc(zin)
        res = launch.run(self.be, "cross_entropy", [zin, self.t[c0 * P:c1 * P], self.cw],
                         ce_opts, Want(self.want_grad, False), self.kind)
        if self.loss_rows is not None:
            self.loss_rows[c0 * P:c1 * P] = res.loss
        else:
            self.loss_sum += res.loss
        if not self.want_grad:
            return
        # dZ over z (a float32 copy only where the backend could not write in
        # place, or for the bias gradient on the CPU, above): back to W's dtype
        dz = ops.cast(res.grad, self.W).reshape(m, self.VT)
        # the bias gradient is a column sum: from the float32 dZ where there is one, not from dZ rounded to
        # a 16-bit W's dtype (the matmuls' operand), whose per-element roundings it would add up
        dz_b = res.grad.reshape(m, self.VT) if self.gb is not None and res.grad.dtype != dz.dtype else None
        g = None if self.row_grad is None else self.row_grad[c0 * P:c1 * P]
        if g is not None and P > 1:  # per-position upstream gradient: scale dZ itself
            dz = ops.rowscale(dz.reshape(m * P, C), g).reshape(m, self.VT)
            g, dz_b = None, None
        self.contract(c0, c1, hc, dz, g, dz_b)

    def contract(self, c0: int, c1: int, hc, dz, g, dz_b=None) -> None:
        """The chunk's share of the three gradients from dZ (``dz_b``: a
        higher-precision dZ for the bias gradient, when there is one)."""
        ops = self.ops
        if self.need_h:
            if self.gh32:
                ops.mm32(dz, self.W, self.gh[c0:c1], self.slab_w)  # float32, unscaled: scaled in fp32 later
            elif g is None:
                ops.mm(dz, self.W, out=self.gh[c0:c1])
            else:
                self.gh[c0:c1] = ops.rowscale(ops.mm(dz, self.W), g)
        if self.need_w:
            hs = hc if g is None else ops.rowscale(hc, g)
            if self.direct_w:
                self.gw = ops.mm(dz.T, hs)
            elif self.split:
                from .backends.triton.linear_acc import split_acc_matmul
                split_acc_matmul(dz, hs, self.gw, self.lo, self.first_w)
            else:
                ops.mm_acc(self.gw, dz.T, hs, self.slab, first=self.first_w)
            self.first_w = False
        if self.gb is not None:
            db = dz if dz_b is None else dz_b
            if g is None:
                ops.colsum_acc(self.gb, db)
            else:
                ops.mv_acc(self.gb, db.T, g)

    def run(self) -> LinearOut:
        ce_opts = self.ce_options()
        for c0 in range(0, self.N, self.n):
            self.chunk(c0, min(self.N, c0 + self.n), ce_opts)
        del self.buf
        scale, tok_scale = self.mean_scales() if (self.opts.reduction == "mean" and self.row_grad is None) \
            else (None, None)
        return self.finish(scale, tok_scale)

    def mean_scales(self):
        """(scale of the weight/bias gradients, per-token scale of the hidden
        gradient) for "mean", and the loss divided: see the module docstring."""
        ops = self.ops
        if self.prob:
            div = float(self.N * self.P)
            self.loss_sum = self.loss_sum / div
            return 1.0 / div, 1.0 / div
        ok = rules.valid_targets(self.t, self.opts.ignore_index, self.C)
        div = ops.divisor(ok, self.t, self.cw)
        with np.errstate(invalid="ignore", divide="ignore"):
            # nan for a zero divisor (all ignored, or zero weights), as torch (gpuloss.rules)
            self.loss_sum = ops.where(div != 0, self.loss_sum / div, float("nan"))
            n_valid = ok.sum()
            inv = 1.0 / ops.where(div != 0, div, 1.0)
            scale = ops.where(div != 0, inv, ops.where(n_valid > 0, float("nan"), 0.0))
        tok_ok = ok.reshape(self.N, self.P).any(1) if self.kind == "torch" else ok.reshape(self.N, self.P).any(axis=1)
        return scale, ops.where(tok_ok, scale, 0.0)

    def finish(self, scale, tok_scale) -> LinearOut:
        ops = self.ops
        if self.gh is not None and tok_scale is not None:
            if isinstance(tok_scale, float):
                ops.mul_(self.gh, tok_scale)
            else:
                ops.mul_(self.gh, tok_scale[:, None])  # per token, rounded once into gh's dtype

        def done(acc, like):
            if acc is None:
                return None
            if self.keep32:
                acc = ops.to_acc(acc)
                return acc if scale is None else ops.mul_(acc, scale)
            if scale is None:
                return ops.cast(acc, like)
            return ops.scaled_cast(acc, scale, like)  # one pass over the fp32 accumulator, rounded once

        if self.split:
            from .backends.triton.linear_acc import split_acc_finish
            gw = split_acc_finish(self.gw, self.lo, scale)
            self.lo = None
        else:
            gw = done(self.gw, self.W) if self.need_w else None
        gb = done(self.gb, self.b) if self.need_b else None
        loss = self.loss_rows if self.loss_rows is not None else self.loss_sum
        return LinearOut(loss, self.gh, gw, gb)


def _split_ok(kind: str, be, W) -> bool:
    """Whether the split float32 accumulation can run: bf16 torch weights
    whose chunks the Triton backend serves (on a GPU, or on the CPU in
    Triton's interpreter)."""
    if kind != "torch" or getattr(be, "name", None) != "triton":
        return False
    import torch
    return W.dtype == torch.bfloat16


def _run(loop: _Loop) -> LinearOut:
    """The loop with torch's autocast off on the arrays' device: its matmuls
    run in the operands' dtypes and accumulate into fp32 as written (the
    public function has already applied autocast's policy to the operands,
    :mod:`gpuloss._autocast`)."""
    if loop.kind != "torch":
        return loop.run()
    from ._autocast import disabled
    with disabled(loop.W.device):
        return loop.run()


def forward(be, kind: str, arrays, opts: LinearCEOptions, want: LinearWant) -> LinearOut:
    """The ``linear_cross_entropy`` op: loss (0-d float64, or per token-position
    row for "none"), and the gradients asked for."""
    return _run(_Loop(be, kind, arrays, opts, want))


def backward(be, kind: str, arrays, opts: LinearCEOptions, want: LinearWant) -> LinearGrads:
    """The ``linear_cross_entropy_backward`` op ("none"): the gradients of
    ``sum(row_grad * loss_rows)``, recomputing each chunk's logits."""
    *inputs, row_grad = arrays
    out = _run(_Loop(be, kind, inputs, opts, want, row_grad=row_grad))
    return LinearGrads(out.grad_hidden, out.grad_weight, out.grad_bias)


def default_chunk_size(n_tokens: int, vocab: int, itemsize: int, device_type: str = "cuda",
                       budget_bytes: Optional[int] = None) -> int:
    """Tokens per chunk so that one ``(chunk, vocab)`` logits buffer fits the
    budget (256 MiB on a GPU, 64 MiB on the CPU), rounded down to a multiple
    of 128 rows (whole GEMM tiles) when that leaves at least 256, and at most
    ``n_tokens``.

    Larger chunks mean fewer accumulations of ``grad_weight`` (each one reads
    and writes ``V x H`` accumulator elements in the GEMM's epilogue); smaller
    chunks mean less memory.  256 MiB is 1024 tokens at V = 128256 bf16."""
    return int(max(1, min(max(n_tokens, 1), chunk_rows(vocab, itemsize, device_type, budget_bytes))))


def chunk_rows(vocab: int, itemsize: int, device_type: str = "cuda", budget_bytes: Optional[int] = None) -> int:
    """:func:`default_chunk_size` before the bound by the token count: what
    the public function passes to the op, which bounds it by the tokens it
    is given.  Not bounding it there keeps the token count out of the
    options, so torch.compile does not specialise a graph (and export a
    program) on the number of tokens."""
    budget = budget_bytes if budget_bytes is not None else CHUNK_BYTES.get(device_type, CHUNK_BYTES["cuda"])
    rows = budget // max(1, vocab * itemsize)
    if rows >= 2 * CHUNK_ALIGN:
        rows = rows // CHUNK_ALIGN * CHUNK_ALIGN
    return int(max(1, rows))


#: bytes of one logits chunk (n x V in the weight's dtype), per device type;
#: module attributes so tests can shrink them
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
#: GEMM-friendly chunk: multiples of this many rows once a chunk is at least 2x it
CHUNK_ALIGN = 128
#: the fewest weight rows upcast at a time for float32 logits (see _Loop.slab_w)
SLAB_MIN_ROWS = 1024
