"""Element-wise losses with their gradients in the same pass: KL divergence
(log-probability input), BCE with logits, BCE on probabilities, MSE.

Every kernel walks ``(R, C)`` in BLOCK_R x BLOCK_C tiles (one program per
tile, 1-D grid), reads each input once, and writes in the same pass: the
gradient(s) and either the element-wise loss (``REDUCE`` false) or one
partial sum per tile (``REDUCE`` true; the launcher sums the partials with a
deterministic torch reduction, no atomics).  Bytes: read k R C (k inputs),
write R C per gradient asked for (+ R C loss for "none").

``scale`` is the host-known derivative of the reduction (1, 1/(R C) or 1/R).
Optional weights come with a row stride: 0 broadcasts a (C,) vector over the
rows, the row stride of an (R, C) array uses it element-wise.
"""
import triton
import triton.language as tl

from .common import log1p, scalar_acc


@triton.jit
def _tile(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n_ct = tl.cdiv(n_cols, BLOCK_C)
    rt = pid // n_ct
    ct = pid % n_ct
    rows = rt * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = ct * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    return pid, rows, cols, mask


@triton.jit
def _emit(loss, mask, pid, rows, cols, L_ptr, L_row_stride, Partial_ptr, REDUCE: tl.constexpr):
    if REDUCE:
        tl.store(Partial_ptr + pid, tl.sum(tl.sum(tl.where(mask, loss, 0.0), 1), 0))
    else:
        tl.store(L_ptr + rows * L_row_stride + cols, loss.to(L_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mse_kernel(
    X_ptr, X_row_stride, T_ptr, T_row_stride, L_ptr, L_row_stride, Partial_ptr,
    G_ptr, G_row_stride, GT_ptr, GT_row_stride,
    n_rows, n_cols, scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REDUCE: tl.constexpr,
    WANT_GRAD: tl.constexpr, WANT_GRAD_TARGET: tl.constexpr, ACC: tl.constexpr,
):
    """loss = (x - t)**2, dx = 2 s (x - t), dt = -dx."""
    pid, rows, cols, mask = _tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    scale = scalar_acc(scale, ACC)
    x = tl.load(X_ptr + rows * X_row_stride + cols, mask=mask, other=0.0).to(ACC)
    t = tl.load(T_ptr + rows * T_row_stride + cols, mask=mask, other=0.0).to(ACC)
    diff = x - t
    _emit(diff * diff, mask, pid, rows, cols, L_ptr, L_row_stride, Partial_ptr, REDUCE)
    g = 2.0 * scale * diff
    if WANT_GRAD:
        tl.store(G_ptr + rows * G_row_stride + cols, g.to(G_ptr.dtype.element_ty), mask=mask)
    if WANT_GRAD_TARGET:
        tl.store(GT_ptr + rows * GT_row_stride + cols, (-g).to(GT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kl_div_kernel(
    X_ptr, X_row_stride, T_ptr, T_row_stride, L_ptr, L_row_stride, Partial_ptr,
    G_ptr, G_row_stride, GT_ptr, GT_row_stride,
    n_rows, n_cols, scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REDUCE: tl.constexpr, LOG_TARGET: tl.constexpr,
    WANT_GRAD: tl.constexpr, WANT_GRAD_TARGET: tl.constexpr, ACC: tl.constexpr,
):
    """x = log-probabilities.  loss = xlogy(t, t) - t x, dx = -t, dt = log t + 1 - x;
    LOG_TARGET: loss = e^t (t - x), dx = -e^t, dt = e^t (t - x + 1)."""
    pid, rows, cols, mask = _tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    scale = scalar_acc(scale, ACC)
    x = tl.load(X_ptr + rows * X_row_stride + cols, mask=mask, other=0.0).to(ACC)
    t = tl.load(T_ptr + rows * T_row_stride + cols, mask=mask, other=1.0).to(ACC)
    if LOG_TARGET:
        et = tl.exp(t)
        loss = et * (t - x)
        gx = -et
        gt = et * (t - x + 1.0)
    else:
        logt = tl.log(t)
        loss = tl.where(t == 0.0, 0.0, t * logt) - t * x
        gx = -t
        # d xlogy(t, t)/dt: NaN at t = 0, as torch's (0 * log 0 has no derivative there)
        gt = tl.where(t == 0.0, float("nan"), logt + 1.0 - x)
    _emit(loss, mask, pid, rows, cols, L_ptr, L_row_stride, Partial_ptr, REDUCE)
    if WANT_GRAD:
        tl.store(G_ptr + rows * G_row_stride + cols, (scale * gx).to(G_ptr.dtype.element_ty), mask=mask)
    if WANT_GRAD_TARGET:
        tl.store(GT_ptr + rows * GT_row_stride + cols, (scale * gt).to(GT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bce_with_logits_kernel(
    X_ptr, X_row_stride, T_ptr, T_row_stride, W_ptr, W_row_stride, PW_ptr, PW_row_stride,
    L_ptr, L_row_stride, Partial_ptr, G_ptr, G_row_stride, GT_ptr, GT_row_stride,
    n_rows, n_cols, scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REDUCE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    WANT_GRAD: tl.constexpr, WANT_GRAD_TARGET: tl.constexpr, ACC: tl.constexpr,
):
    """lw = 1 + (pw - 1) t, l1 = log1p(e^-|x|), q = sigmoid(-|x|); for x >= 0 / x < 0:
    loss = w ((1 - t) x + lw l1) / w (lw l1 - pw t x)      (= w ((1 - t) x + lw softplus(-x)))
    dx = w ((1 - t) - lw q) / w (lw q - pw t)               (= w (lw sigmoid(x) - pw t))
    dt = w ((pw - 1) l1 - x) / w ((pw - 1) l1 - pw x)       (= w (-x + (pw - 1) softplus(-x)))
    Each branch free of cancellation where its result is small (the single formulas lost the
    loss and dx of t = 0, x << 0, and dt next to x = 0), and of inf - inf at x = +-inf."""
    pid, rows, cols, mask = _tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    scale = scalar_acc(scale, ACC)
    x = tl.load(X_ptr + rows * X_row_stride + cols, mask=mask, other=0.0).to(ACC)
    t = tl.load(T_ptr + rows * T_row_stride + cols, mask=mask, other=0.0).to(ACC)
    e = tl.exp(-tl.abs(x))
    l1 = log1p(e)
    q = e / (1.0 + e)  # sigmoid(-|x|): sigmoid(-x) for x >= 0, sigmoid(x) for x < 0
    pos = x >= 0.0
    if HAS_POS_WEIGHT:
        pw = tl.load(PW_ptr + rows * PW_row_stride + cols, mask=mask, other=1.0).to(ACC)
        lw = 1.0 + (pw - 1.0) * t
        pwt = pw * t
        gt = (pw - 1.0) * l1 - tl.where(pos, x, pw * x)
    else:
        lw = 1.0
        pwt = t
        gt = -x
    loss = tl.where(pos, (1.0 - t) * x + lw * l1, lw * l1 - pwt * x)
    loss = tl.where(x == float("-inf"), float("nan"), loss)  # torch's -inf + inf (the limit: +inf)
    gx = tl.where(pos, (1.0 - t) - lw * q, lw * q - pwt)
    if HAS_WEIGHT:
        w = tl.load(W_ptr + rows * W_row_stride + cols, mask=mask, other=0.0).to(ACC)
        loss = loss * w
        gx = gx * w
        gt = gt * w
    _emit(loss, mask, pid, rows, cols, L_ptr, L_row_stride, Partial_ptr, REDUCE)
    if WANT_GRAD:
        tl.store(G_ptr + rows * G_row_stride + cols, (scale * gx).to(G_ptr.dtype.element_ty), mask=mask)
    if WANT_GRAD_TARGET:
        tl.store(GT_ptr + rows * GT_row_stride + cols, (scale * gt).to(GT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bce_kernel(
    P_ptr, P_row_stride, T_ptr, T_row_stride, W_ptr, W_row_stride,
    L_ptr, L_row_stride, Partial_ptr, G_ptr, G_row_stride, GT_ptr, GT_row_stride,
    n_rows, n_cols, scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, REDUCE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WANT_GRAD: tl.constexpr, WANT_GRAD_TARGET: tl.constexpr, ACC: tl.constexpr,
):
    """PyTorch's BCE: logs clamped at -100 in the loss; dp = w (p - t) / max(p (1 - p), 1e-12);
    dt = w (log(1 - p) - log p), unclamped as in PyTorch (+-inf at p = 0, 1)."""
    pid, rows, cols, mask = _tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    scale = scalar_acc(scale, ACC)
    p = tl.load(P_ptr + rows * P_row_stride + cols, mask=mask, other=0.5).to(ACC)
    t = tl.load(T_ptr + rows * T_row_stride + cols, mask=mask, other=0.0).to(ACC)
    # a NaN probability stays NaN (maximum drops NaN on the GPU otherwise: a finite 100 w loss)
    lp = tl.maximum(tl.log(p), -100.0, propagate_nan=tl.PropagateNan.ALL)
    l1p = tl.maximum(log1p(-p), -100.0, propagate_nan=tl.PropagateNan.ALL)
    loss = -(t * lp + (1.0 - t) * l1p)
    # PyTorch clamps with the float32 constant 1e-12 (= 9.99999996e-13)
    gp = (p - t) / tl.maximum(p * (1.0 - p), 9.999999960041972e-13)
    gt = log1p(-p) - tl.log(p)
    if HAS_WEIGHT:
        w = tl.load(W_ptr + rows * W_row_stride + cols, mask=mask, other=0.0).to(ACC)
        loss = loss * w
        gp = gp * w
        gt = gt * w
    _emit(loss, mask, pid, rows, cols, L_ptr, L_row_stride, Partial_ptr, REDUCE)
    if WANT_GRAD:
        tl.store(G_ptr + rows * G_row_stride + cols, (scale * gp).to(G_ptr.dtype.element_ty), mask=mask)
    if WANT_GRAD_TARGET:
        tl.store(GT_ptr + rows * GT_row_stride + cols, (scale * gt).to(GT_ptr.dtype.element_ty), mask=mask)
