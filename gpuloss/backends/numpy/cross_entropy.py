"""Cross-entropy (loss and gradient in one pass) and NLL on NumPy tiles.

With z the (soft-capped) logits, p = softmax(z), lse = logsumexp(z), s_i the
row's scale (1/divisor for "mean", 0 for ignored rows: :mod:`gpuloss.rules`),
the gradient of a class-index row (see :func:`gpuloss.reference.cross_entropy_grad`)::

    dL/dz_j = s_i [ a_i p_j - (1 - eps) w[t_i] [j == t_i] - eps/C w_j ]
    a_i     = (1 - eps) w[t_i] + eps/C sum(w) + 2 z_loss lse_i

so a tile computes e = exp(z - max), its row sum S, and writes ``e * (s a /
S)``, then subtracts the constant and target terms in cache.  Probability
targets (d~ = (1-eps) d + eps/C, q = w d~, Q = sum q)::

    loss_i = Q lse - sum(q z) + z_loss lse^2,
    dL/dz  = s [ (Q + 2 z_loss lse) p - q ],   dL/dd = s (1-eps) w (lse - z)

and the softcap multiplies by ``1 - (z / cap)^2`` (= 1 - tanh^2).  Every sum
over a row is taken relative to the row maximum, so precision does not depend
on where the logits sit.

Memory traffic: short rows read x once and write the gradient once; long
rows (longer than a tile) read x twice.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ... import rules
from ...ops import CrossEntropyOptions, NllOptions, Want
from ..base import LossResult
from . import tiling as T

_ERRS = dict(invalid="ignore", divide="ignore", over="ignore")


class _CrossEntropy(T.RowResults):
    """One cross-entropy call: its set-up, then the named steps of the fused
    pass (:meth:`run`)."""

    def __init__(self, x: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray],
                 opts: CrossEntropyOptions, want: Want):
        self.x, self.target, self.opts = x, target, opts
        self.R, self.C = R, C = x.shape
        self.prob = not np.issubdtype(target.dtype, np.integer)  # floating, bfloat16 (ml_dtypes) included
        self.cd = cd = T.compute_dtype(x, target if self.prob else None)
        self.ld = T.loss_dtype(cd)
        self.eps = float(opts.label_smoothing)
        self.zl = float(opts.z_loss)
        self.cap = None if opts.softcap is None else float(opts.softcap)
        self.w = None if weight is None else np.asarray(weight, dtype=cd)
        self.Wsum = float(C) if self.w is None else float(self.w.sum(dtype=np.float64))
        self.divisor = self._divisor()
        # valid rows scale by 1/divisor (inf for a zero divisor: NaN gradients,
        # as torch); ignored rows by a selected 0 (gpuloss.rules)
        self.sc = rules.mean_scale(self.divisor) if opts.reduction == "mean" else 1.0
        self.lse_out = np.empty(R, np.float32)
        self.loss_rows = np.empty(R, self.ld) if opts.reduction == "none" else None
        self.grad = None
        if want.grad:
            self.grad = x if opts.grad_inplace else np.empty((R, C), x.dtype)
        self.gt_out = np.empty(target.shape, target.dtype) if (self.prob and want.grad_target) else None
        self.tiles = T.Tiles(R, C, cd.itemsize)
        self.psum = np.zeros(self.tiles.n if self.tiles.whole else 1, np.float64)

    def _divisor(self) -> float:
        """The "mean" divisor, before any gradient is written: R for
        probability targets, else sum of w[t] over the valid rows."""
        if self.prob:
            return float(self.R)
        if self.opts.reduction != "mean":
            return 1.0
        divisor = 0.0
        ii = self.opts.ignore_index
        for r0 in range(0, self.R, T.ROW_CHUNK):
            t = self.target[r0:r0 + T.ROW_CHUNK].astype(np.int64, copy=False)
            ok = rules.valid_targets(t, ii, self.C)
            divisor += float(ok.sum()) if self.w is None else float(self.w[t[ok]].sum(dtype=np.float64))
        return divisor

    # ---- loading blocks -------------------------------------------------
    def load_z(self, r0, r1, c0, c1):
        """The logits block in the compute dtype, soft-capped: z = cap tanh(x / cap)."""
        src = self.x[r0:r1, c0:c1]
        if self.cap is None:
            return T.as_cd(src, "z", self.cd)
        z = T.scratch("z", src.shape, self.cd)
        np.divide(src, self.cap, out=z, dtype=self.cd, casting="unsafe")
        np.tanh(z, out=z)
        np.multiply(z, self.cap, out=z)
        return z

    def load_q(self, r0, r1, c0, c1):
        """Weighted smoothed probability targets q = w ((1 - eps) d + eps / C)."""
        src = self.target[r0:r1, c0:c1]
        wb = None if self.w is None else self.w[c0:c1]
        if self.eps == 0.0 and wb is None:
            return T.as_cd(src, "q", self.cd)
        q = T.scratch("q", src.shape, self.cd)
        np.multiply(src, 1.0 - self.eps, out=q, dtype=self.cd, casting="unsafe")
        if self.eps != 0.0:
            np.add(q, self.eps / self.C, out=q)
        if wb is not None:
            np.multiply(q, wb, out=q)
        return q

    # ---- per-row terms ----------------------------------------------------
    def row_terms(self, m, s, zt, wz, Q, qz, rows):
        """Per-row lse, loss, and the gradient coefficients (coef, tsub, srow).

        ``m``/``s``: the row max and sum of exp(z - m); ``wz`` = sum w (z - m)
        and ``qz`` = sum q (z - m) are taken relative to the max, and the loss
        is formed from ``log s`` and ``m - z_t`` rather than from ``lse - z``:
        no cancellation between two large numbers when the logits carry a
        large common offset.  ``rows`` is (ts, ign, bad, ok, wt) for class
        targets."""
        with np.errstate(invalid="ignore", over="ignore"):
            ls = np.log(s)
            lse = m + ls
            if self.prob:
                return (lse,) + self._prob_terms(s, ls, lse, Q, qz)
            return (lse,) + self._class_terms(s, ls, lse, m, zt, wz, rows)

    def _prob_terms(self, s, ls, lse, Q, qz):
        zl = self.zl
        loss = Q * ls - qz  # = sum_c q_c (lse - z_c)
        if zl:
            loss = loss + zl * lse * lse
        a = Q + 2.0 * zl * lse if zl else Q
        return loss, (self.sc * a) / s, None, None

    def _class_terms(self, s, ls, lse, m, zt, wz, rows):
        eps, zl, C = self.eps, self.zl, self.C
        ts, ign, bad, ok, wt = rows
        wt_ = 1.0 if wt is None else wt
        loss = (ls + (m - zt)) * wt_  # w_t (lse - z_t)
        if eps:  # sum_c w_c (lse - z_c) = W log s - sum_c w_c (z_c - m)
            loss = (1.0 - eps) * loss + (eps / C) * (self.Wsum * ls - wz)
        if zl:
            loss = loss + zl * lse * lse
        loss = np.where(ign, 0.0, loss)
        loss[bad] = np.nan
        rs = np.where(ok, self.sc, 0.0)
        rs[bad] = np.nan
        a = (1.0 - eps) * wt_ + (eps / C) * self.Wsum
        if zl:
            a = a + 2.0 * zl * lse
        # an ignored row's gradient is 0, or NaN where its softmax is (a NaN or +inf logit: s is NaN), as torch's
        coef = np.where(ign, 0.0 * s, rs * a / s)
        tsub = rs * ((1.0 - eps) * wt_)
        srow = rs * (eps / C) if eps else None
        return loss, coef.astype(self.cd, copy=False), tsub, srow

    # ---- writing gradients ----------------------------------------------------
    def emit(self, r0, r1, c0, c1, z, e, coef, tsub, srow, ts, q) -> None:
        """Write dL/dx for block [r0:r1, c0:c1] given e = exp(z - M)."""
        cd, w = self.cd, self.w
        out = self.grad[r0:r1, c0:c1]
        direct = self.cap is None and out.dtype == cd
        g = out if direct else e
        np.multiply(e, coef[:, None], out=g)
        if srow is not None:  # label smoothing: - s eps/C w_j
            if w is None:
                np.subtract(g, srow[:, None].astype(cd), out=g)
            else:
                aux = T.scratch("aux", g.shape, cd)
                np.multiply(srow[:, None], w[c0:c1], out=aux, casting="unsafe")
                np.subtract(g, aux, out=g)
        if ts is not None:  # - s (1 - eps) w[t] at the target column
            loc = ts - c0
            inb = (loc >= 0) & (loc < c1 - c0)
            ridx = np.nonzero(inb)[0]
            g[ridx, loc[inb]] -= tsub[inb].astype(cd)
        if q is not None:  # probability targets: - s q
            if self.sc == 1.0:
                np.subtract(g, q, out=g)
            else:
                aux = T.scratch("aux", g.shape, cd)
                np.multiply(q, self.sc, out=aux)
                np.subtract(g, aux, out=g)
        if self.cap is not None:  # dz/dx = 1 - tanh^2 = 1 - (z / cap)^2
            aux = T.scratch("aux", g.shape, cd)
            np.divide(z, self.cap, out=aux)
            np.square(aux, out=aux)
            np.subtract(1.0, aux, out=aux)
            np.multiply(g, aux, out=out, casting="unsafe")
        elif not direct:
            np.copyto(out, g, casting="unsafe")

    def emit_grad_target(self, r0, r1, c0, c1, z, m, ls) -> None:
        """dL/dd = s (1 - eps) w (lse - z), formed as (m - z) + log s; before
        the gradient may overwrite z."""
        aux = T.scratch("aux", z.shape, self.cd)
        np.subtract(m[:, None], z, out=aux)
        np.add(aux, ls[:, None], out=aux)
        if self.w is not None:
            np.multiply(aux, self.w[c0:c1], out=aux)
        np.multiply(aux, self.sc * (1.0 - self.eps), out=self.gt_out[r0:r1, c0:c1], casting="unsafe")

    # ---- the passes -----------------------------------------------------------
    def short_tile(self, i) -> None:
        """Short rows, one pass per tile: x read once (the max); every later
        step works on the cache-resident tile; the gradient written once."""
        r0, r1, c0, c1 = self.tiles[i]
        cd = self.cd
        z = self.load_z(r0, r1, c0, c1)
        m = z.max(axis=1)
        e = T.scratch("e", z.shape, cd)
        np.subtract(z, m[:, None], out=e)  # z - m
        zt = wz = Q = qz = rows = q = ts = None
        if self.prob:
            q = self.load_q(r0, r1, c0, c1)
            Q = T.rowsum(q)
            qz = T.rowdot(q, e, cd)
        else:
            rows = T.class_rows(self.target[r0:r1], self.C, self.opts.ignore_index, self.w)
            ts = rows[0]
            zt = z[np.arange(r1 - r0), ts]
            if self.eps:
                wz = T.rowsum(e) if self.w is None else T.rowdot(e, self.w, cd)
        np.exp(e, out=e)
        s = T.rowsum(e)
        lse, loss, coef, tsub, srow = self.row_terms(m, s, zt, wz, Q, qz, rows)
        self.record(i, r0, r1, lse, loss)
        if self.gt_out is not None:
            self.emit_grad_target(r0, r1, c0, c1, z, m, np.log(s))
        if self.grad is not None:
            self.emit(r0, r1, c0, c1, z, e, coef, tsub, srow, ts, q)

    def long_rows(self) -> None:
        """Rows longer than a tile: per-block partial statistics, merged to
        the row max, then a second pass for the gradients (x read twice)."""
        stats = _LongRowPartials(self)
        M, S, m_part = T.online_max_sum(self.x, self.tiles, self.cd, load=self.load_z, extra=stats.block)
        with np.errstate(**_ERRS):
            rows, zt, wz, Q, qz = stats.merge(M, m_part)
            lse, loss, coef, tsub, srow = self.row_terms(M, S, zt, wz, Q, qz, rows)
            LS = np.log(S)
            self.record(0, 0, self.R, lse, loss)
        if self.grad is None and self.gt_out is None:
            return

        def tile2(i):
            r0, r1, c0, c1 = self.tiles[i]
            z = self.load_z(r0, r1, c0, c1)
            if self.gt_out is not None:
                self.emit_grad_target(r0, r1, c0, c1, z, M[r0:r1], LS[r0:r1])
            if self.grad is None:
                return
            e = T.scratch("e", z.shape, self.cd)
            np.subtract(z, M[r0:r1, None], out=e)
            np.exp(e, out=e)
            q = self.load_q(r0, r1, c0, c1) if self.prob else None
            self.emit(r0, r1, c0, c1, z, e, coef[r0:r1], None if self.prob else tsub[r0:r1],
                      None if srow is None else srow[r0:r1], None if self.prob else rows[0][r0:r1], q)

        self.tiles.run(tile2)

    def run(self) -> LossResult:
        if self.tiles.whole:
            self.tiles.run(self.short_tile)
        else:
            self.long_rows()
        if self.loss_rows is not None:
            loss = self.loss_rows
        else:
            loss = T.finish_loss(self.psum.sum(), self.opts.reduction, self.divisor, self.ld)
        return LossResult(loss, self.grad, self.gt_out, self.lse_out)


class _LongRowPartials:
    """Per-block partial sums of long rows, each relative to its block max m_b
    (class targets with smoothing: sum w (z - m_b) and sum w; probability
    targets: sum q and sum q (z - m_b)), and their merge to the row max."""

    def __init__(self, ce: _CrossEntropy):
        self.ce = ce
        n = ce.tiles.n
        smooth = not ce.prob and bool(ce.eps)
        self.wz = np.zeros(n, ce.cd) if smooth else None
        self.W = np.zeros(n, ce.cd) if smooth else None
        self.Q = np.zeros(n, ce.cd) if ce.prob else None
        self.qz = np.zeros(n, ce.cd) if ce.prob else None

    def block(self, i, z, zm) -> None:
        ce = self.ce
        r0, r1, c0, c1 = ce.tiles[i]
        if self.wz is not None:
            if ce.w is None:
                self.wz[i] = T.rowsum(zm)[0]
                self.W[i] = c1 - c0
            else:
                self.wz[i] = T.rowdot(zm, ce.w[c0:c1], ce.cd)[0]
                self.W[i] = ce.w[c0:c1].sum()
        if ce.prob:
            q = ce.load_q(r0, r1, c0, c1)
            self.Q[i] = T.rowsum(q)[0]
            self.qz[i] = T.rowdot(q, zm, ce.cd)[0]

    def merge(self, M, m_part):
        """(rows, zt, wz, Q, qz) of whole rows: a block's sums move to the row
        max by adding (m_b - M) times its weight sum."""
        ce = self.ce
        R, nb = ce.R, ce.tiles.nb
        rows = zt = wz = Q = qz = None
        shift = m_part - M[:, None]
        if ce.prob:
            Qb = self.Q.reshape(R, nb)
            Q = Qb.sum(axis=1)
            qz = (self.qz.reshape(R, nb) + Qb * shift).sum(axis=1)
            return rows, zt, wz, Q, qz
        rows = T.class_rows(ce.target, ce.C, ce.opts.ignore_index, ce.w)
        zt = ce.x[np.arange(R), rows[0]].astype(ce.cd)
        if ce.cap is not None:
            zt = ce.cap * np.tanh(zt / ce.cd.type(ce.cap))
        if ce.eps:
            wz = (self.wz.reshape(R, nb) + self.W.reshape(R, nb) * shift).sum(axis=1)
        return rows, zt, wz, Q, qz


def cross_entropy(x: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray], opts: CrossEntropyOptions,
                  want: Want) -> LossResult:
    """Cross-entropy from logits ``x`` ``(R, C)``, loss and gradient in one pass."""
    return _CrossEntropy(x, target, weight, opts, want).run()


def nll_loss(logp: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray], opts: NllOptions,
             want: Want) -> LossResult:
    """loss_i = -w[t_i] logp[i, t_i]; the gradient is zero but at (i, t_i),
    where it is -s w[t_i] (s = 1/sum of w[t] over valid rows for "mean").
    Only R elements are read; the gradient is a zero-filled (calloc) array
    with R writes."""
    R, C = logp.shape
    cd = T.compute_dtype(logp)
    ld = T.loss_dtype(cd)
    w = None if weight is None else np.asarray(weight, dtype=cd)
    loss_rows = np.empty(R, ld) if opts.reduction == "none" else None
    total = divisor = 0.0
    with np.errstate(invalid="ignore"):
        for r0 in range(0, R, T.ROW_CHUNK):
            r1 = min(R, r0 + T.ROW_CHUNK)
            ts, ign, bad, ok, wt = T.class_rows(target[r0:r1], C, opts.ignore_index, w)
            wt_ = np.where(ok, np.ones(r1 - r0, cd) if wt is None else wt, 0.0)
            # ignored rows read a placeholder class: 0, not 0 * an infinite log-probability
            loss = np.where(ok, -logp[np.arange(r0, r1), ts].astype(cd) * wt_, 0.0).astype(cd, copy=False)
            loss[bad] = np.nan
            if loss_rows is not None:
                loss_rows[r0:r1] = loss
            else:
                total += loss.sum(dtype=np.float64)
            divisor += wt_.sum(dtype=np.float64)
    sc = rules.mean_scale(divisor) if opts.reduction == "mean" else 1.0
    grad = _nll_grad(logp, target, w, opts.ignore_index, sc, cd) if want.grad else None
    loss = loss_rows if loss_rows is not None else T.finish_loss(total, opts.reduction, divisor, ld)
    return LossResult(loss, grad, None, None)


def _nll_grad(logp, target, w, ignore_index: int, sc: float, cd) -> np.ndarray:
    R, C = logp.shape
    grad = np.zeros((R, C), logp.dtype)
    with np.errstate(invalid="ignore"):
        for r0 in range(0, R, T.ROW_CHUNK):
            r1 = min(R, r0 + T.ROW_CHUNK)
            ts, ign, bad, ok, wt = T.class_rows(target[r0:r1], C, ignore_index, w)
            wt_ = np.ones(r1 - r0, cd) if wt is None else wt
            grad[np.arange(r0, r1), ts] = np.where(ok, -wt_ * sc, 0.0)
            grad[r0 + np.nonzero(bad)[0]] = np.nan
    return grad
