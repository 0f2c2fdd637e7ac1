"""Cross-entropy from logits (loss, log-sum-exp and dlogits in one launch), the
device-side mean divisor, and NLL.

Notation per row (reference: ``gpuloss.reference.cross_entropy``): logits x,
z = softcap(x) (= cap tanh(x / cap), or x), lse = logsumexp(z),
p = exp(z - lse), w class weights (1 without), eps label smoothing, C classes,
s the gradient scale of the row (1 for "none"/"sum", 1/divisor for "mean").

Class-index target t (non-ignored, 0 <= t < C)::

    loss = (1 - eps) w_t (lse - z_t) + eps / C (lse W - A) + zl lse**2,
           W = sum_c w_c, A = sum_c w_c z_c
    dz_c = s [p_c ((1 - eps) w_t + eps / C W + 2 zl lse) - (1 - eps) w_t [c == t]
              - eps / C w_c]

Probability target d, d~ = (1 - eps) d + eps / C::

    loss = lse B - A + zl lse**2,  B = sum_c w_c d~_c,  A = sum_c w_c d~_c z_c
    dz_c = s [p_c (B + 2 zl lse) - w_c d~_c],   dd_c = -s (1 - eps) w_c (z_c - lse)

and through the softcap dx = dz sech(x / cap)**2.  So one pass over the row
gives (max, sum exp, A, B), which fix the loss and every gradient coefficient;
a second touch of the row writes the gradient.

Precision independent of where the logits sit: with m the row max and
S = sum_c exp(z_c - m), lse = m + log S, and the kernels keep A relative to
m, A' = sum_c v_c (z_c - m) = A - m B (v_c = w_c or w_c d~_c; rescaled as the
running max moves, ``rescale_rel_sum``), so that

    lse B - A = B log S - A',   lse - z_t = (m - z_t) + log S,
    z_c - lse = (z_c - m) - log S,   p_c = exp(z_c - m) / S

are sums and differences of terms of one sign: no cancellation between
quantities of the size of the logits (an offset of 1e5 would otherwise cost
1e-4 of relative precision in fp32, and V 1e37 overflows).

Ignored rows: loss 0, gradient exactly 0 (even when s is inf because every
row is ignored).  A target outside [0, C) that is not ignore_index is never
used as an address: the row's loss and gradient are NaN.

Designs: ``cross_entropy_twopass_kernel`` (any C; loss-only calls read the row
once, loss + grad read it twice: read 2 R C, write R C) and
``cross_entropy_onchip_kernel`` (the row cut into SPLIT register-resident
chunks, read R C, write R C; see ``kernels/triton/softmax.py``).  With PACKED
the on-chip kernel keeps a 2-byte chunk (and probability targets) in their
storage dtype and upcasts them afresh in each phase (``common.unpack``).
"""
import triton
import triton.language as tl

from .common import (finish_lse, online_update, pass2_block_start, rescale_rel_sum, scalar_acc,
                     softcap_grad_factor, softcap_logits, split_row_combine, split_row_id, unpack)

#: reduction codes shared with the launcher
RED_NONE = 0
RED_SUM = 1
RED_MEAN = 2


@triton.jit
def ce_mean_divisor_kernel(
    T_ptr, T_stride, W_ptr, Div_ptr,
    n_rows, n_cols, ignore_index,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
):
    """Div = sum over non-ignored rows of w[t] (their count without weights),
    on the device, so "mean" never synchronises with the host.  One program;
    reads the R targets (and R weights): tiny next to the R x C logits.
    Out-of-range targets add nothing here (their row loss is NaN anyway).
    A zero divisor is stored as NaN: the "mean" (sum / Div) is then NaN as
    torch's, also where label smoothing left the sum nonzero, and the valid
    rows' scale 1 / Div is NaN (ignored rows' is selected, never multiplied)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), ACC)
    for start in range(0, n_rows, BLOCK):
        r = (start + offs).to(tl.int64)
        rmask = r < n_rows
        t = tl.load(T_ptr + r * T_stride, mask=rmask, other=ignore_index).to(tl.int64)
        ok = rmask & (t != ignore_index) & (t >= 0) & (t < n_cols)
        if HAS_WEIGHT:
            wt = tl.load(W_ptr + tl.where(ok, t, 0), mask=ok, other=0.0).to(ACC)
        else:
            wt = tl.where(ok, 1.0, 0.0)
        acc += wt
    div = tl.sum(acc, 0)
    div = tl.where(div == 0.0, float("nan"), div)
    tl.store(Div_ptr, div.to(Div_ptr.dtype.element_ty))


@triton.jit
def _row_scale(Div_ptr, grad_scale, DIV_ON_DEVICE: tl.constexpr, ACC: tl.constexpr):
    """s: 1 / (device divisor) for class-target "mean", else a host float."""
    if DIV_ON_DEVICE:
        return 1.0 / tl.load(Div_ptr).to(ACC)
    else:
        return tl.full((), grad_scale, ACC)


@triton.jit
def _block_sums(z, shift, mask, cols, W_ptr, d, eps, n_cols,
                PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                ACC: tl.constexpr):
    """This block's share of (A', B) relative to ``shift`` (the row max so
    far, 0 while it is -inf): class targets with smoothing: A' = sum w (z -
    shift), B = sum w; probability targets: A' = sum w d~ (z - shift),
    B = sum w d~.  Masked lanes (z = -inf) contribute exactly 0."""
    if HAS_WEIGHT:
        w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(ACC)
    else:
        w = tl.where(mask, 1.0, 0.0).to(ACC)
    if PROB_TARGET:
        if HAS_SMOOTHING:
            w = w * (d * (1.0 - eps) + eps / n_cols)
        else:
            w = w * d
    a = tl.sum(tl.where(mask, w * (z - shift), 0.0), 0)
    b = tl.sum(w, 0)
    return a, b


@triton.jit
def _load_target(X_row, T_row, W_ptr, n_cols, ignore_index, cap,
                 PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 ACC: tl.constexpr):
    """(t, z_t, w_t) of a class-index row: the target is read once and only
    used as an address when 0 <= t < C.  Called before any gradient of the row
    is written, so it is safe in place.  Probability targets: (-1, 0, 1)."""
    if PROB_TARGET:
        t = tl.full((), -1, tl.int64)
        z_t = tl.zeros((), ACC)
        w_t = tl.full((), 1.0, ACC)
    else:
        t = tl.load(T_row).to(tl.int64)
        ok = (t != ignore_index) & (t >= 0) & (t < n_cols)
        t_safe = tl.where(ok, t, 0)
        x_t = tl.load(X_row + t_safe, mask=ok, other=0.0).to(ACC)
        z_t = softcap_logits(x_t, cap, HAS_SOFTCAP)
        if HAS_WEIGHT:
            w_t = tl.load(W_ptr + t_safe, mask=ok, other=0.0).to(ACC)
        else:
            w_t = tl.full((), 1.0, ACC)
    return t, z_t, w_t


@triton.jit
def _row_coefs(t, z_t, w_t, m, ssum, A, B, s, n_cols, ignore_index, eps, z_loss,
               PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
               HAS_Z_LOSS: tl.constexpr, ACC: tl.constexpr):
    """Row loss and gradient coefficients: dz_c = cp p_c - ct [c == t] - cw w_c
    (class targets) or cp p_c - cw w_c d~_c (probability targets).  Returns
    (loss, cp, ct, cw).  A is relative to the max (A' in the module
    docstring): lse W - A = W log S - A'; lse - z_t is (max - z_t) + log S:
    with |max| >> log S, fp32 max + log S would lose log S."""
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(ssum)
    lse = shift + log_s
    zl_lse = tl.zeros((), ACC)
    if HAS_Z_LOSS:
        zl_lse = z_loss * lse
    if PROB_TARGET:
        loss = log_s * B - A + zl_lse * lse
        cp = s * (B + 2.0 * zl_lse)
        ct = tl.zeros((), ACC)
        cw = s
    else:
        valid = t != ignore_index
        in_range = (t >= 0) & (t < n_cols)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                W = B
            else:
                W = tl.zeros((), ACC) + n_cols
            hard = (1.0 - eps) * w_t
            loss = hard * ((shift - z_t) + log_s) + eps / n_cols * (log_s * W - A) + zl_lse * lse
            cp = hard + eps / n_cols * W + 2.0 * zl_lse
            cw = tl.zeros((), ACC) + eps / n_cols
        else:
            hard = w_t
            loss = hard * ((shift - z_t) + log_s) + zl_lse * lse
            cp = hard + 2.0 * zl_lse
            cw = tl.zeros((), ACC)
        # select, never multiply, so an ignored row stays 0 when s = inf
        cp = tl.where(valid, s * cp, 0.0)
        ct = tl.where(valid, s * hard, 0.0)
        cw = tl.where(valid, s * cw, 0.0)
        loss = tl.where(valid, loss, 0.0)
        bad = valid & (~in_range)
        loss = tl.where(bad, float("nan"), loss)
        cp = tl.where(bad, float("nan"), cp)
    return loss, cp, ct, cw


@triton.jit
def _block_grads(x, z, p, cols, mask, d, W_ptr, cp, ct, cw, t, eps, n_cols, cap, shift, log_s, s,
                 G_row, GT_row, WANT_GRAD: tl.constexpr, WANT_GRAD_TARGET: tl.constexpr,
                 PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """Write dx (WANT_GRAD) and dd (WANT_GRAD_TARGET) for one block of a
    row, in fp32/fp64, rounded at the store.  z - lse is formed as
    (z - shift) - log S (see the module docstring); the softcap factor
    sech(x / cap)**2 comes from x."""
    if WANT_GRAD:
        g = cp * p
        if PROB_TARGET or HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = tl.full((), 1.0, ACC)
            if PROB_TARGET:
                if HAS_SMOOTHING:
                    w = w * (d * (1.0 - eps) + eps / n_cols)
                else:
                    w = w * d
            g = g - cw * w
        if not PROB_TARGET:
            g = g - tl.where(cols == t, ct, 0.0)
        if HAS_SOFTCAP:
            g = g * softcap_grad_factor(x, cap, HAS_SOFTCAP)
        tl.store(G_row + cols, g.to(G_row.dtype.element_ty), mask=mask)
    if PROB_TARGET and WANT_GRAD_TARGET:
        if HAS_WEIGHT:
            wc = tl.load(W_ptr + cols, mask=mask, other=0.0).to(ACC)
        else:
            wc = tl.full((), 1.0, ACC)
        gt = -s * (1.0 - eps) * wc * ((z - shift) - log_s)
        tl.store(GT_row + cols, gt.to(GT_row.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_twopass_kernel(
    X_ptr, X_row_stride, T_ptr, T_row_stride, W_ptr, G_ptr, G_row_stride, GT_ptr, GT_row_stride,
    Loss_ptr, Lse_ptr, Div_ptr,
    n_cols, ignore_index, eps, z_loss, softcap, grad_scale,
    BLOCK: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DIV_ON_DEVICE: tl.constexpr, WANT_GRAD: tl.constexpr, WANT_GRAD_TARGET: tl.constexpr,
    ACC: tl.constexpr, REVERSE: tl.constexpr = False,
):
    """One program per row.  Pass 1 (read C): online max / sum exp and the
    row sums A, B.  Pass 2, only WANT_GRAD (read C, write C): the gradient.
    G may alias X (in place): every element is read before it is written by
    the same program, and a barrier after the read of x_t (between the
    passes, once per row) keeps every warp's gradient stores, one of which
    may be column t, after every thread's read of it (read before pass 1, it
    would stay live in registers across the loop: a spill at 16 warps).
    REVERSE walks pass 2 from the end of the row back, so it starts on the
    blocks pass 1 read last (the likeliest still in L1/L2)."""
    # Python floats arrive as fp32 scalars; do the arithmetic in ACC
    eps = scalar_acc(eps, ACC)
    z_loss = scalar_acc(z_loss, ACC)
    softcap = scalar_acc(softcap, ACC)
    grad_scale = scalar_acc(grad_scale, ACC)
    row = tl.program_id(0).to(tl.int64)
    X_row = X_ptr + row * X_row_stride
    T_row = T_ptr + row * T_row_stride
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), ACC)
    ssum = tl.zeros((), ACC)
    A = tl.zeros((), ACC)
    B = tl.zeros((), ACC)
    d = tl.zeros((BLOCK,), ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(X_row + cols, mask=mask, other=float("-inf")).to(ACC)
        z = tl.where(mask, softcap_logits(x, softcap, HAS_SOFTCAP), float("-inf"))
        m_old = m
        m, ssum = online_update(m, ssum, z)
        if PROB_TARGET:
            d = tl.load(T_row + cols, mask=mask, other=0.0).to(ACC)
        if PROB_TARGET or HAS_SMOOTHING:
            # A stays relative to the running max: rescaled as the max moves
            a, b = _block_sums(z, tl.where(m == float("-inf"), 0.0, m), mask, cols, W_ptr, d, eps, n_cols,
                               PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC)
            A = rescale_rel_sum(A, B, m_old, m) + a
            B += b
    lse = finish_lse(m, ssum)
    s = _row_scale(Div_ptr, grad_scale, DIV_ON_DEVICE, ACC)
    t, z_t, w_t = _load_target(X_row, T_row, W_ptr, n_cols, ignore_index, softcap,
                               PROB_TARGET, HAS_WEIGHT, HAS_SOFTCAP, ACC)
    loss, cp, ct, cw = _row_coefs(t, z_t, w_t, m, ssum, A, B, s, n_cols, ignore_index, eps, z_loss,
                                  PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, ACC)
    tl.store(Loss_ptr + row, loss.to(Loss_ptr.dtype.element_ty))
    tl.store(Lse_ptr + row, lse.to(Lse_ptr.dtype.element_ty))
    if WANT_GRAD or WANT_GRAD_TARGET:  # the target's gradient is written in this pass too
        # every thread has read x_t before any writes its gradient (in place, column t)
        tl.debug_barrier()
        # p from (z - max) / sum, not z - lse: fp32 lse swallows log(sum)
        # when |max| >> log(sum)
        shift = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(ssum)
        inv_s = 1.0 / ssum
        G_row = G_ptr + row * G_row_stride
        GT_row = GT_ptr + row * GT_row_stride
        n_blocks = tl.cdiv(n_cols, BLOCK)
        for i in range(0, n_blocks):
            start = pass2_block_start(i, n_blocks, BLOCK, REVERSE)
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(X_row + cols, mask=mask, other=0.0).to(ACC)
            z = softcap_logits(x, softcap, HAS_SOFTCAP)
            p = tl.exp(z - shift) * inv_s
            if PROB_TARGET:
                d = tl.load(T_row + cols, mask=mask, other=0.0).to(ACC)
            _block_grads(x, z, p, cols, mask, d, W_ptr, cp, ct, cw, t, eps, n_cols, softcap, shift, log_s, s,
                         G_row, GT_row, WANT_GRAD, WANT_GRAD_TARGET,
                         PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC)


@triton.jit
def cross_entropy_onchip_kernel(
    X_ptr, X_row_stride, T_ptr, T_row_stride, W_ptr, G_ptr, G_row_stride, GT_ptr, GT_row_stride,
    Loss_ptr, Lse_ptr, Div_ptr, Scratch_ptr, Counter_ptr,
    n_cols, ignore_index, eps, z_loss, softcap, grad_scale,
    CHUNK: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DIV_ON_DEVICE: tl.constexpr, WANT_GRAD_TARGET: tl.constexpr,
    ACC: tl.constexpr, PACKED: tl.constexpr = False,
):
    """Loss + gradient with each logit read once: program (row, part) loads
    its CHUNK of the row into registers, the SPLIT programs of the row combine
    their partials (``split_row_combine``), and each writes its chunk of the
    gradient from registers.  Read R C, write R C (+ 32 SPLIT bytes of scratch
    per row).  In place is safe: a program writes only its own chunk, and only
    after every program of the row has loaded its chunk and x_t (each reads
    x_t before it publishes), and every thread of a program reads x_t before
    the chunk's reductions (block-wide barriers), so no warp's gradient store
    can overwrite column t before another warp has read it."""
    # Python floats arrive as fp32 scalars; do the arithmetic in ACC
    eps = scalar_acc(eps, ACC)
    z_loss = scalar_acc(z_loss, ACC)
    softcap = scalar_acc(softcap, ACC)
    grad_scale = scalar_acc(grad_scale, ACC)
    row, part = split_row_id(Counter_ptr, SPLIT)
    X_row = X_ptr + row * X_row_stride
    T_row = T_ptr + row * T_row_stride
    cols = part * CHUNK + tl.arange(0, CHUNK)
    mask = cols < n_cols
    # x_t before any barrier: after the last one (SPLIT == 1: the chunk's
    # reductions; SPLIT > 1: the rendezvous) column t may be written in place
    t, z_t, w_t = _load_target(X_row, T_row, W_ptr, n_cols, ignore_index, softcap,
                               PROB_TARGET, HAS_WEIGHT, HAS_SOFTCAP, ACC)
    # the only read of the chunk: kept in registers, in its storage dtype
    # when PACKED (see ``unpack``)
    xs = tl.load(X_row + cols, mask=mask, other=float("-inf"))
    key = n_cols >> 31  # a runtime 0 for unpack
    x = unpack(xs, ACC, key, 0, PACKED)
    z = tl.where(mask, softcap_logits(x, softcap, HAS_SOFTCAP), float("-inf"))
    m = tl.max(z, 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    x = unpack(xs, ACC, key, 1, PACKED)
    z = tl.where(mask, softcap_logits(x, softcap, HAS_SOFTCAP), float("-inf"))
    ssum = tl.sum(tl.exp(z - shift), 0)
    A = tl.zeros((), ACC)
    B = tl.zeros((), ACC)
    ds = tl.zeros((CHUNK,), ACC)
    d = ds
    if PROB_TARGET:
        ds = tl.load(T_row + cols, mask=mask, other=0.0)
        d = unpack(ds, ACC, key, 1, PACKED)
    if PROB_TARGET or HAS_SMOOTHING:
        A, B = _block_sums(z, shift, mask, cols, W_ptr, d, eps, n_cols,
                           PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, ACC)
    s = _row_scale(Div_ptr, grad_scale, DIV_ON_DEVICE, ACC)
    if SPLIT > 1:
        m, ssum, A, B = split_row_combine(Scratch_ptr, Counter_ptr + 1, row, part, m, ssum, A, B,
                                          SPLIT, SPLIT_P2, 4)
    lse = finish_lse(m, ssum)
    loss, cp, ct, cw = _row_coefs(t, z_t, w_t, m, ssum, A, B, s, n_cols, ignore_index, eps, z_loss,
                                  PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_Z_LOSS, ACC)
    if part == 0:
        tl.store(Loss_ptr + row, loss.to(Loss_ptr.dtype.element_ty))
        tl.store(Lse_ptr + row, lse.to(Lse_ptr.dtype.element_ty))
    shift = tl.where(m == float("-inf"), 0.0, m)
    # z again from the chunk kept in registers (x: the softcap factor)
    x = unpack(xs, ACC, key, 2, PACKED)
    if PROB_TARGET:
        d = unpack(ds, ACC, key, 2, PACKED)
    z = softcap_logits(x, softcap, HAS_SOFTCAP)
    p = tl.exp(z - shift) / ssum
    _block_grads(x, z, p, cols, mask, d, W_ptr, cp, ct, cw, t, eps, n_cols, softcap, shift, tl.log(ssum), s,
                 G_ptr + row * G_row_stride, GT_ptr + row * GT_row_stride, True, WANT_GRAD_TARGET,
                 PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, ACC)


@triton.jit
def nll_loss_kernel(
    X_ptr, X_row_stride, T_ptr, T_stride, W_ptr, G_ptr, G_row_stride, Loss_ptr, Div_ptr,
    n_cols, ignore_index, grad_scale,
    BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, DIV_ON_DEVICE: tl.constexpr,
    WANT_GRAD: tl.constexpr, ACC: tl.constexpr,
):
    """loss = -w_t logp_t; dlogp = -s w_t at t, 0 elsewhere.  Reads one
    element per row, writes the R C gradient (zeros but one) when WANT_GRAD."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T_ptr + row * T_stride).to(tl.int64)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < n_cols)
    ok = valid & in_range
    t_safe = tl.where(ok, t, 0)
    x_t = tl.load(X_ptr + row * X_row_stride + t_safe, mask=ok, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_t = tl.load(W_ptr + t_safe, mask=ok, other=0.0).to(ACC)
    else:
        w_t = tl.full((), 1.0, ACC)
    loss = tl.where(valid, -w_t * x_t, 0.0)
    loss = tl.where(valid & (~in_range), float("nan"), loss)
    tl.store(Loss_ptr + row, loss.to(Loss_ptr.dtype.element_ty))
    if WANT_GRAD:
        s = _row_scale(Div_ptr, grad_scale, DIV_ON_DEVICE, ACC)
        gt = tl.where(valid, -w_t * s, 0.0)
        fill = tl.where(valid & (~in_range), float("nan"), 0.0)
        G_row = G_ptr + row * G_row_stride
        offs = tl.arange(0, BLOCK)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            g = tl.where(cols == t, gt, fill).to(ACC)
            tl.store(G_row + cols, g.to(G_ptr.dtype.element_ty), mask=cols < n_cols)
