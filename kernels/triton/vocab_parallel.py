"""The per-rank passes of vocabulary-parallel cross-entropy.

Each rank holds logits for its slice of the vocabulary.  Notation per row:
z the (soft-capped) local logits, lt the target's local index (>= 0 when
this rank owns the target, -1 when another rank does, -2 for an ignored row).

``vocab_parallel_stats_kernel`` (one read of the row): lse_r = logsumexp of
the slice (online max / sum), z_t when owned (else 0), and sum z for label
smoothing.  The host combines the ranks' partials with two all-reduces.

``vocab_parallel_grad_kernel`` (one read, one write): with the global lse and
the row's scale s (the reduction's d loss / d loss_i times the upstream
gradient; 0 for ignored rows)::

    dx_c = s [(1 + 2 z_loss lse) p_c - (1 - eps) [c == lt] - eps / V] (1 - (z_c / cap)**2)

with p_c = exp(z_c - lse).  Ignored rows are written as exact zeros.
"""
import triton
import triton.language as tl

from .common import online_update, scalar_acc, softcap_logits


@triton.jit
def vocab_parallel_stats_kernel(
    X_ptr, X_row_stride, LT_ptr, Lse_ptr, Zt_ptr, Sz_ptr,
    n_cols, softcap,
    BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, ACC: tl.constexpr,
):
    softcap = scalar_acc(softcap, ACC)
    row = tl.program_id(0).to(tl.int64)
    X_row = X_ptr + row * X_row_stride
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    sz = tl.zeros((), ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(X_row + cols, mask=mask, other=float("-inf")).to(ACC)
        z = tl.where(mask, softcap_logits(x, softcap, HAS_SOFTCAP), float("-inf"))
        m, s = online_update(m, s, z)
        if HAS_SMOOTHING:
            sz += tl.sum(tl.where(mask, z, 0.0), 0)
    # lse_r = -inf for an empty or all -inf slice: it then contributes 0
    shift = tl.where(m == float("-inf"), 0.0, m)
    lse_r = tl.where(s > 0, shift + tl.log(s), float("-inf"))
    lt = tl.load(LT_ptr + row).to(tl.int64)
    owned = lt >= 0
    xt = tl.load(X_row + tl.where(owned, lt, 0), mask=owned, other=0.0).to(ACC)
    zt = tl.where(owned, softcap_logits(xt, softcap, HAS_SOFTCAP), 0.0)
    tl.store(Lse_ptr + row, lse_r.to(Lse_ptr.dtype.element_ty))
    tl.store(Zt_ptr + row, zt.to(Zt_ptr.dtype.element_ty))
    if HAS_SMOOTHING:
        tl.store(Sz_ptr + row, sz.to(Sz_ptr.dtype.element_ty))


@triton.jit
def vocab_parallel_grad_kernel(
    X_ptr, X_row_stride, G_ptr, G_row_stride, LT_ptr, Lse_ptr, Scale_ptr,
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
    lse = tl.load(Lse_ptr + row).to(ACC)
    s = tl.load(Scale_ptr + row).to(ACC)
    cp = s
    if HAS_Z_LOSS:
        cp = s * (1.0 + 2.0 * z_loss * lse)
    ct = s * one_minus_eps
    cw = s * eps_over_v
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(X_row + cols, mask=mask, other=0.0).to(ACC)
        z = softcap_logits(x, softcap, HAS_SOFTCAP)
        g = cp * tl.exp(z - lse) - tl.where(cols == lt, ct, 0.0)
        if HAS_SMOOTHING:
            g = g - cw
        if HAS_SOFTCAP:
            r = z / softcap
            g = g * (1.0 - r * r)
        g = tl.where(valid, g, 0.0)  # ignored rows: exact zeros even for non-finite logits
        tl.store(G_row + cols, g.to(G_row.dtype.element_ty), mask=mask)
