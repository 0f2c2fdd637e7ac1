"""The per-rank passes of vocabulary-parallel cross-entropy.

Each rank holds logits for its slice of the vocabulary.  Notation per row:
z the (soft-capped) local logits, lt the target's local index (>= 0 when
this rank owns the target, -1 when another rank does, -2 for an ignored row).

``vocab_parallel_stats_kernel`` (one read of the row): the slice's max m_r
and S_r = sum_c exp(z_c - m_r) (online), and, relative to h = m_r (0 when
m_r is -inf), h - z_t when this rank owns the target (else 0) and, for
label smoothing, sum_c (h - z_c) (kept relative to the running max).  Terms
>= 0 whatever the offset of the logits, and m_r is a logit, exact: the host
(``gpuloss.distributed._global_lse``) takes M = max_r m_r, adds (M - h) to
the relative sums, S_r exp(m_r - M) to S, and combines the ranks with two
all-reduces; lse = M + log S.

``vocab_parallel_grad_kernel`` (one read, one write): with the global lse
given as (M, log S), lse = M + log S, and the row's scale s (the reduction's
d loss / d loss_i times the upstream gradient; 0 for ignored rows)::

    dx_c = s [(1 + 2 z_loss lse) p_c - (1 - eps) [c == lt] - eps / V] sech(x_c / cap)**2

with p_c = exp((z_c - M) - log S): never exp(z_c - lse) with an lse rounded
at the size of the logits.  Ignored rows are written as exact zeros.
"""
import triton
import triton.language as tl

from .common import online_update, rescale_rel_sum, scalar_acc, softcap_grad_factor, softcap_logits


@triton.jit
def vocab_parallel_stats_kernel(
    X_ptr, X_row_stride, LT_ptr, Max_ptr, Sum_ptr, Dt_ptr, Dsum_ptr,
    n_cols, softcap,
    BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr,
):
    softcap = scalar_acc(softcap, ACC)
    row = tl.program_id(0).to(tl.int64)
    X_row = X_ptr + row * X_row_stride
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    sz = tl.zeros((), ACC)  # sum (z - max so far), rescaled as the max moves
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(X_row + cols, mask=mask, other=float("-inf")).to(ACC)
        z = tl.where(mask, softcap_logits(x, softcap, HAS_SOFTCAP), float("-inf"))
        m_old = m
        m, s = online_update(m, s, z)
        if HAS_SMOOTHING:
            shift = tl.where(m == float("-inf"), 0.0, m)
            # (start = the number of terms in sz so far)
            sz = rescale_rel_sum(sz, tl.zeros((), ACC) + start, m_old, m)
            sz += tl.sum(tl.where(mask, z - shift, 0.0), 0)
    # m = -inf, S = 0 for an all -inf slice: it then contributes 0 to S
    shift = tl.where(m == float("-inf"), 0.0, m)
    lt = tl.load(LT_ptr + row).to(tl.int64)
    owned = lt >= 0
    xt = tl.load(X_row + tl.where(owned, lt, 0), mask=owned, other=0.0).to(ACC)
    zt = softcap_logits(xt, softcap, HAS_SOFTCAP)
    tl.store(Max_ptr + row, m.to(Max_ptr.dtype.element_ty))
    tl.store(Sum_ptr + row, s.to(Sum_ptr.dtype.element_ty))
    tl.store(Dt_ptr + row, tl.where(owned, shift - zt, 0.0).to(Dt_ptr.dtype.element_ty))
    if HAS_SMOOTHING:
        # sum_c (shift - z_c): terms >= 0
        tl.store(Dsum_ptr + row, (-sz).to(Dsum_ptr.dtype.element_ty))


@triton.jit
def vocab_parallel_grad_kernel(
    X_ptr, X_row_stride, G_ptr, G_row_stride, LT_ptr, Shift_ptr, LogS_ptr, Scale_ptr,
    n_cols, one_minus_eps, eps_over_v, z_loss, softcap,
    BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, ACC: tl.constexpr,
):
    one_minus_eps = scalar_acc(one_minus_eps, ACC)
    eps_over_v = scalar_acc(eps_over_v, ACC)
    z_loss = scalar_acc(z_loss, ACC)
    softcap = scalar_acc(softcap, ACC)
    row = tl.program_id(0).to(tl.int64)
    X_row = X_ptr + row * X_row_stride
    G_row = G_ptr + row * G_row_stride
    lt = tl.load(LT_ptr + row).to(tl.int64)
    valid = lt != -2
    shift = tl.load(Shift_ptr + row).to(ACC)
    log_s = tl.load(LogS_ptr + row).to(ACC)
    s = tl.load(Scale_ptr + row).to(ACC)
    cp = s
    if HAS_Z_LOSS:
        cp = s * (1.0 + 2.0 * z_loss * (shift + log_s))
    ct = s * one_minus_eps
    cw = s * eps_over_v
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(X_row + cols, mask=mask, other=0.0).to(ACC)
        z = softcap_logits(x, softcap, HAS_SOFTCAP)
        g = cp * tl.exp((z - shift) - log_s) - tl.where(cols == lt, ct, 0.0)
        if HAS_SMOOTHING:
            g = g - cw
        if HAS_SOFTCAP:
            g = g * softcap_grad_factor(x, softcap, HAS_SOFTCAP)
        g = tl.where(valid, g, 0.0)  # ignored rows: exact zeros even for non-finite logits
        tl.store(G_row + cols, g.to(G_row.dtype.element_ty), mask=mask)
