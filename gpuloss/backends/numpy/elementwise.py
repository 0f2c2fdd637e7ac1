"""The element-wise losses on NumPy tiles: kl_div, binary_cross_entropy
(with logits and on probabilities) and mse_loss.

One driver (:func:`_drive`) walks the tiles; each loss gives the body that
turns a tile of input and target (in the compute dtype) into the loss tile and
writes the requested gradients.  Memory traffic: read input, target (and
weights) once, write each requested output once.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ...ops import KlDivOptions, ReductionOptions, Want
from ..base import LossResult
from . import tiling as T


def _drive(x: np.ndarray, target: np.ndarray, reduction: str, want: Want, body,
           divisor: Optional[float] = None, grad_scale: float = 1.0) -> LossResult:
    """Drive an element-wise loss over tiles.

    ``body(r0, r1, c0, c1, xs, ts, sc, gx, gt)`` gets the tile of x and
    target in the compute dtype, the gradient scale and the output tiles
    (or None), writes the gradients and returns the loss tile (scratch).
    Memory traffic: read x, target (and weights) once, write each
    requested output once."""
    R, C = x.shape
    cd = T.compute_dtype(x, target)
    ld = T.loss_dtype(cd)
    n_el = R * C
    if divisor is None:
        divisor = float(n_el)
    sc = grad_scale * ((1.0 / divisor if divisor else 0.0) if reduction in ("mean", "batchmean") else 1.0)
    tiles = T.Tiles(R, C, cd.itemsize)
    loss_el = np.empty((R, C), ld) if reduction == "none" else None
    gx_out = np.empty((R, C), x.dtype) if want.grad else None
    gt_out = np.empty(target.shape, target.dtype) if want.grad_target else None
    psum = np.zeros(max(tiles.n, 1), np.float64)

    def tile(i):
        r0, r1, c0, c1 = tiles[i]
        xs = T.as_cd(x[r0:r1, c0:c1], "z", cd)
        ts = T.as_cd(target[r0:r1, c0:c1], "u", cd)
        gx = None if gx_out is None else gx_out[r0:r1, c0:c1]
        gt = None if gt_out is None else gt_out[r0:r1, c0:c1]
        loss = body(r0, r1, c0, c1, xs, ts, sc, gx, gt)
        if loss_el is not None:
            np.copyto(loss_el[r0:r1, c0:c1], loss, casting="unsafe")
        else:
            psum[i] = np.add.reduce(loss, axis=None, dtype=np.float64)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        tiles.run(tile)
    if loss_el is not None:
        loss = loss_el
    elif reduction == "sum":
        loss = np.array(psum.sum(), ld)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.array(psum.sum() / np.float64(divisor), ld)
    return LossResult(loss, gx_out, gt_out, None)


def kl_div(input: np.ndarray, target: np.ndarray, opts: KlDivOptions, want: Want) -> LossResult:
    """Element-wise PyTorch kl_div on log-probabilities ``input``::

        loss = xlogy(t, t) - t x,        dx = -t,       dt = log t + 1 - x
        log_target: loss = e^t (t - x),  dx = -e^t,     dt = e^t (t - x + 1)

    "batchmean" divides by the number of rows R."""
    R, C = input.shape
    cd = T.compute_dtype(input, target)
    log_target = opts.log_target

    def body(r0, r1, c0, c1, x, t, sc, gx, gt):
        loss = T.scratch("e", x.shape, cd)
        aux = T.scratch("aux", x.shape, cd)
        if log_target:
            et = T.scratch("q", x.shape, cd)
            np.exp(t, out=et)
            np.subtract(t, x, out=aux)  # t - x
            np.multiply(et, aux, out=loss)
            if gx is not None:
                np.multiply(et, -sc, out=gx, casting="unsafe")
            if gt is not None:
                np.add(aux, 1.0, out=aux)
                np.multiply(aux, et, out=aux)
                np.multiply(aux, sc, out=gt, casting="unsafe")
            return loss
        np.log(t, out=aux)  # log t (-inf at 0, as the reference's gradient)
        np.multiply(t, aux, out=loss)
        loss[t == 0] = 0.0  # xlogy: 0 log 0 = 0
        np.multiply(t, x, out=T.scratch("q", x.shape, cd))
        np.subtract(loss, T.scratch("q", x.shape, cd), out=loss)
        if gx is not None:
            np.multiply(t, -sc, out=gx, casting="unsafe")
        if gt is not None:  # log t + 1 - x; NaN at t = 0, as torch's xlogy gradient
            np.add(aux, 1.0, out=aux)
            np.subtract(aux, x, out=aux)
            aux[t == 0] = np.nan
            np.multiply(aux, sc, out=gt, casting="unsafe")
        return loss

    divisor = float(R) if opts.reduction == "batchmean" else None
    return _drive(input, target, opts.reduction, want, body, divisor)


def bce_with_logits(x: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray],
                    pos_weight: Optional[np.ndarray], opts: ReductionOptions, want: Want) -> LossResult:
    """PyTorch's binary_cross_entropy_with_logits, lw = 1 + (pw - 1) t, l1 =
    log1p(e^-|x|), q = sigmoid(-|x|)::

        loss = w ((1 - t) x + lw l1)     x >= 0      (= w ((1 - t) x + lw softplus(-x)))
               w (lw l1 - pw t x)        x < 0
        dx   = w ((1 - t) - lw q)        x >= 0      (= w (lw sigmoid(x) - pw t))
               w (lw q - pw t)           x < 0
        dt   = w ((pw - 1) l1 - x)       x >= 0      (= w (-x + (pw - 1) softplus(-x)))
               w ((pw - 1) l1 - pw x)    x < 0

    Each branch adds terms of one sign, or subtracts only where the result is
    not small: the single formulas cancel (the loss and dx of t = 0, x << 0
    came out 0, torch's dx is exact there; dt next to x = 0 lost its digits)."""
    cd = T.compute_dtype(x, target)

    def body(r0, r1, c0, c1, xs, t, sc, gx, gt):
        wb = T.wslice(weight, r0, r1, c0, c1)
        pw = T.wslice(pos_weight, r0, r1, c0, c1)
        neg = xs < 0
        en = T.scratch("q", xs.shape, cd)  # e^-|x|
        np.abs(xs, out=en)
        np.negative(en, out=en)
        np.exp(en, out=en)
        l1 = T.scratch("aux", xs.shape, cd)
        np.log1p(en, out=l1)
        lw, pwt = None, t
        if pw is not None:
            lw = T.scratch("lw", xs.shape, cd)
            np.subtract(pw, 1.0, out=lw, dtype=cd, casting="unsafe")
            np.multiply(lw, t, out=lw)
            np.add(lw, 1.0, out=lw)
            pwt = T.scratch("pwt", xs.shape, cd)
            np.multiply(pw, t, out=pwt, dtype=cd, casting="unsafe")
        lwl1 = T.scratch("dot", xs.shape, cd)
        if lw is not None:
            np.multiply(l1, lw, out=lwl1)
        else:
            np.copyto(lwl1, l1)
        omt = T.scratch("omt", xs.shape, cd)
        np.subtract(1.0, t, out=omt)
        loss = T.scratch("e", xs.shape, cd)
        np.multiply(omt, xs, out=loss)
        np.add(loss, lwl1, out=loss)
        tmp = T.scratch("t2", xs.shape, cd)
        np.multiply(pwt, xs, out=tmp)
        np.subtract(lwl1, tmp, out=loss, where=neg)
        np.copyto(loss, np.nan, where=np.isneginf(xs))  # torch's -inf + inf (the limit would be +inf)
        if gt is not None:
            if pw is not None:  # (pw - 1) l1 - c x, c = pw where x < 0, else 1
                np.copyto(lwl1, xs)
                np.multiply(lwl1, pw, out=lwl1, where=neg, casting="unsafe")
                np.subtract(pw, 1.0, out=tmp, dtype=cd, casting="unsafe")
                np.multiply(tmp, l1, out=tmp)
                np.subtract(tmp, lwl1, out=tmp)
            else:
                np.negative(xs, out=tmp)
            if wb is not None:
                np.multiply(tmp, wb, out=tmp, casting="unsafe")
            np.multiply(tmp, sc, out=gt, casting="unsafe")
        if gx is not None:
            np.add(en, 1.0, out=tmp)
            np.divide(en, tmp, out=en)  # q
            if lw is not None:
                np.multiply(en, lw, out=en)
            np.subtract(omt, en, out=omt)
            np.subtract(en, pwt, out=omt, where=neg)
            if wb is not None:
                np.multiply(omt, wb, out=omt, casting="unsafe")
            np.multiply(omt, sc, out=gx, casting="unsafe")
        if wb is not None:
            np.multiply(loss, wb, out=loss, casting="unsafe")
        return loss

    return _drive(x, target, opts.reduction, want, body, grad_scale=opts.grad_scale)


def bce(p: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray], opts: ReductionOptions,
        want: Want) -> LossResult:
    """PyTorch's binary_cross_entropy on probabilities, logs clamped at -100::

        loss = -w (t max(log p, -100) + (1 - t) max(log(1 - p), -100))
        dp   = w (p - t) / max(p (1 - p), 1e-12)
        dt   = w (log(1 - p) - log p)            (unclamped, as PyTorch)
    """
    cd = T.compute_dtype(p, target)
    eps = cd.type(np.float32(1e-12))

    def body(r0, r1, c0, c1, ps, t, sc, gx, gt):
        wb = T.wslice(weight, r0, r1, c0, c1)
        lp = T.scratch("q", ps.shape, cd)
        np.log(ps, out=lp)
        l1p = T.scratch("aux", ps.shape, cd)
        np.negative(ps, out=l1p)
        np.log1p(l1p, out=l1p)
        if gt is not None:
            tmp = T.scratch("dot", ps.shape, cd)
            np.subtract(l1p, lp, out=tmp)
            if wb is not None:
                np.multiply(tmp, wb, out=tmp, casting="unsafe")
            np.multiply(tmp, sc, out=gt, casting="unsafe")
        np.maximum(lp, -100.0, out=lp)
        np.maximum(l1p, -100.0, out=l1p)
        # -(t lp + (1 - t) l1p), as torch (t (l1p - lp) - l1p cancels for t = 1 and p near 1)
        loss = T.scratch("e", ps.shape, cd)
        np.multiply(t, lp, out=loss)
        np.subtract(1.0, t, out=lp)
        np.multiply(lp, l1p, out=lp)
        np.add(loss, lp, out=loss)
        np.negative(loss, out=loss)
        if wb is not None:
            np.multiply(loss, wb, out=loss, casting="unsafe")
        if gx is not None:
            den = T.scratch("dot", ps.shape, cd)
            np.subtract(1.0, ps, out=den)
            np.multiply(den, ps, out=den)
            np.maximum(den, eps, out=den)
            num = T.scratch("omt", ps.shape, cd)
            np.subtract(ps, t, out=num)
            np.divide(num, den, out=num)
            if wb is not None:
                np.multiply(num, wb, out=num, casting="unsafe")
            np.multiply(num, sc, out=gx, casting="unsafe")
        return loss

    return _drive(p, target, opts.reduction, want, body, grad_scale=opts.grad_scale)


def mse(x: np.ndarray, target: np.ndarray, opts: ReductionOptions, want: Want) -> LossResult:
    """loss = (x - t)^2, dx = 2 s (x - t), dt = -dx."""
    cd = T.compute_dtype(x, target)

    def body(r0, r1, c0, c1, xs, t, sc, gx, gt):
        d = T.scratch("aux", xs.shape, cd)
        np.subtract(xs, t, out=d)
        loss = T.scratch("e", xs.shape, cd)
        np.square(d, out=loss)
        if gx is not None or gt is not None:
            np.multiply(d, 2.0 * sc, out=d)
            if gx is not None:
                np.copyto(gx, d, casting="unsafe")
            if gt is not None:
                np.negative(d, out=gt, casting="unsafe")
        return loss

    return _drive(x, target, opts.reduction, want, body, grad_scale=opts.grad_scale)
