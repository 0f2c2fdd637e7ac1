"""Distillation KL divergence from logits, row-wise, with its gradient.

Per row (reference: ``gpuloss.reference.kl_div_logits``), T the temperature,
log q = x / T - lse_x with lse_x = logsumexp(x / T), and d the target
distribution: d = softmax(t / T) (``TARGET_IS_LOGITS``) or the given
probabilities::

    KL = sum_c d_c (log d_c - log q_c)
       = sum_c d_c (t_c - x_c) / T - lse_t + lse_x          (target logits)
       = sum_c xlogy(d_c, d_c) - sum_c d_c x_c / T + D lse_x   (probabilities,
                                                              D = sum_c d_c)
    dKL/dx_c = (D q_c - d_c) / T                             (D = 1 for logits)

Pass 1 (read x and t once) gathers everything the loss needs with online
rescaling for the target-logit sum; pass 2 (read both again, write dx) writes
the gradient.  Bytes with gradient: read 4 R C, write R C.

Precision independent of where the logits sit: with the row maxima mx, mt
and Sx = sum exp(x - mx), St = sum exp(t - mt), the sums are kept relative
to the maxima, so the offsets cancel exactly instead of in floating point::

    KL = U / St + log Sx - log St,  U = sum_c exp(t_c - mt) ((t_c - mt) - (x_c - mx))
    KL = E - F + D log Sx,          F = sum_c d_c (x_c - mx)           (probabilities)
    q_c = exp((x_c - mx) - log Sx)

and U, F are rescaled whenever a running maximum moves.
"""
import triton
import triton.language as tl

from .common import online_update, rounded_mul, scalar_acc


@triton.jit
def kl_div_logits_kernel(
    X_ptr, X_row_stride, T_ptr, T_row_stride, G_ptr, G_row_stride, Loss_ptr,
    n_cols, inv_temp, grad_scale,
    BLOCK: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, WANT_GRAD: tl.constexpr, ACC: tl.constexpr,
):
    # Python floats arrive as fp32 scalars; do the arithmetic in ACC
    inv_temp = scalar_acc(inv_temp, ACC)
    grad_scale = scalar_acc(grad_scale, ACC)
    row = tl.program_id(0).to(tl.int64)
    X_row = X_ptr + row * X_row_stride
    T_row = T_ptr + row * T_row_stride
    offs = tl.arange(0, BLOCK)
    mx = tl.full((), float("-inf"), ACC)
    sx = tl.zeros((), ACC)
    mt = tl.full((), float("-inf"), ACC)
    st = tl.zeros((), ACC)
    # logits: U = sum exp(t - mt) ((t - mt) - (x - mx)), relative to both
    # running maxima and rescaled as they move (see the module docstring)
    U = tl.zeros((), ACC)
    D = tl.zeros((), ACC)   # probabilities: sum d
    E = tl.zeros((), ACC)   # probabilities: sum xlogy(d, d)
    F = tl.zeros((), ACC)   # probabilities: sum d (x - mx), rescaled as mx moves
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = rounded_mul(tl.load(X_row + cols, mask=mask, other=float("-inf")).to(ACC), inv_temp)
        mx_old = mx
        mx, sx = online_update(mx, sx, x)
        bx_old = tl.where(mx_old == float("-inf"), 0.0, mx_old)
        bx = tl.where(mx == float("-inf"), 0.0, mx)
        if TARGET_IS_LOGITS:
            t = rounded_mul(tl.load(T_row + cols, mask=mask, other=float("-inf")).to(ACC), inv_temp)
            mt_new = tl.maximum(mt, tl.max(t, 0))
            bt_old = tl.where(mt == float("-inf"), 0.0, mt)
            bt = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            # the old terms: e scales by exp(bt_old - bt), each bracket moves by
            # (bt_old - bt) - (bx_old - bx)
            U = tl.where(st == 0.0, 0.0,
                         tl.exp(bt_old - bt) * (U + ((bt_old - bt) - (bx_old - bx)) * st))
            e = tl.exp(t - bt)
            U += tl.sum(tl.where(mask & (e > 0.0), e * ((t - bt) - (x - bx)), 0.0), 0)
            mt, st = online_update(mt, st, t)
        else:
            d = tl.load(T_row + cols, mask=mask, other=0.0).to(ACC)
            F = F + tl.where(D == 0.0, 0.0, (bx_old - bx) * D)
            D += tl.sum(d, 0)
            E += tl.sum(tl.where(d == 0.0, 0.0, d * tl.log(d)), 0)
            # a class with no probability adds nothing, whatever the student's logit (-inf: 0 * -inf)
            F += tl.sum(tl.where(mask & (d != 0.0), d * (x - bx), 0.0), 0)
    bx = tl.where(mx == float("-inf"), 0.0, mx)
    log_sx = tl.log(sx)
    if TARGET_IS_LOGITS:
        bt = tl.where(mt == float("-inf"), 0.0, mt)
        log_st = tl.log(st)
        loss = U / st + (log_sx - log_st)
        D = tl.full((), 1.0, ACC)
    else:
        loss = E - F + D * log_sx
    tl.store(Loss_ptr + row, loss.to(Loss_ptr.dtype.element_ty))
    if WANT_GRAD:
        G_row = G_ptr + row * G_row_stride
        c = grad_scale * inv_temp
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            x = rounded_mul(tl.load(X_row + cols, mask=mask, other=0.0).to(ACC), inv_temp)
            q = tl.exp((x - bx) - log_sx)
            if TARGET_IS_LOGITS:
                t = rounded_mul(tl.load(T_row + cols, mask=mask, other=0.0).to(ACC), inv_temp)
                d = tl.exp((t - bt) - log_st)
            else:
                d = tl.load(T_row + cols, mask=mask, other=0.0).to(ACC)
            g = c * (D * q - d)
            tl.store(G_row + cols, g.to(G_ptr.dtype.element_ty), mask=mask)
