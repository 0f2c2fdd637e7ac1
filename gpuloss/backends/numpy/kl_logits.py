"""Row-wise KL divergence from logits (distillation) on NumPy tiles.

``KL(d || q)``, q = softmax(x / T), d = softmax(target / T) or the target
probabilities.  With zx = x / T, zu = target / T::

    logits: KL_i = sum_c e^(zu - mu) (zu - zx) / Su - lse_u + lse_x
    probs:  KL_i = sum_c (d log d - d zx) + sum(d) lse_x
    dL/dx  = s (sum(d) q - d) / T

The first form keeps the target's max mu and sum Su online, so long rows merge
per-block partials with the same rescaling as the logits.  ``lse`` is
logsumexp(x / T).
"""
from __future__ import annotations

import numpy as np

from ...ops import KlDivLogitsOptions, Want
from ..base import LossResult
from . import tiling as T


class _KlLogits(T.RowResults):
    """One kl_div_logits call: set-up, then the named steps of the pass."""

    def __init__(self, x: np.ndarray, target: np.ndarray, opts: KlDivLogitsOptions, want: Want):
        self.x, self.target, self.opts = x, target, opts
        self.R, self.C = R, C = x.shape
        self.cd = T.compute_dtype(x, target)
        self.ld = T.loss_dtype(self.cd)
        self.T = float(opts.temperature)
        self.logits = bool(opts.target_is_logits)
        red = opts.reduction
        n = R * C if red == "mean" else R if red == "batchmean" else 0
        self.sc = (1.0 / n if n else 0.0) if red in ("mean", "batchmean") else 1.0
        self.tiles = T.Tiles(R, C, self.cd.itemsize)
        self.lse_out = np.empty(R, np.float32)
        self.loss_rows = np.empty(R, self.ld) if red == "none" else None
        self.grad = np.empty((R, C), x.dtype) if want.grad else None
        self.psum = np.zeros(max(self.tiles.n, 1), np.float64)

    def load_zx(self, r0, r1, c0, c1):
        z = T.scratch("z", (r1 - r0, c1 - c0), self.cd)
        np.divide(self.x[r0:r1, c0:c1], self.T, out=z, dtype=self.cd, casting="unsafe")
        return z

    def load_u(self, r0, r1, c0, c1):
        """target / T (logits) or the target in the compute dtype (probs)."""
        if self.logits:
            u = T.scratch("u", (r1 - r0, c1 - c0), self.cd)
            np.divide(self.target[r0:r1, c0:c1], self.T, out=u, dtype=self.cd, casting="unsafe")
            return u
        return T.as_cd(self.target[r0:r1, c0:c1], "u", self.cd)

    def target_stats(self, u, xm):
        """Per-row partials of the target, given ``xm = zx - mx`` (before exp).

        logits: mu = max u, eu = exp(u - mu) (left in scratch "q"),
        Su = sum eu, A = sum eu ((u - mu) - xm);
        probabilities d: Su = sum d, A = sum (xlogy(d, d) - d xm)."""
        cd = self.cd
        aux = T.scratch("aux", u.shape, cd)
        if self.logits:
            mu = u.max(axis=1)
            eu = T.scratch("q", u.shape, cd)
            np.subtract(u, mu[:, None], out=eu)
            np.subtract(eu, xm, out=aux)
            np.exp(eu, out=eu)
            np.multiply(aux, eu, out=aux)
            # a class the teacher gives no mass (logit -inf) adds nothing: 0 * -inf would be NaN
            np.copyto(aux, 0, where=eu == 0)
            Su = T.rowsum(eu)
            A = T.rowsum(aux)
            Su[mu == -np.inf] = 0
            A[mu == -np.inf] = 0
            return mu, Su, A, eu
        aux.fill(0)
        np.log(u, out=aux, where=u != 0)  # xlogy: 0 log 0 = 0
        np.multiply(aux, u, out=aux)
        tmp = T.scratch("dot", u.shape, cd)
        np.multiply(u, xm, out=tmp)
        np.copyto(tmp, 0, where=u == 0)  # no probability, no term, whatever the student's logit (-inf)
        np.subtract(aux, tmp, out=aux)
        return None, T.rowsum(u), T.rowsum(aux), u

    def emit(self, r0, r1, c0, c1, ex, sx, d, dscale, dsum) -> None:
        """dx = (s/T) (sum(d) ex / sx - d),  d = eu * dscale (logits) or d."""
        cd, k = self.cd, self.sc / self.T
        out = self.grad[r0:r1, c0:c1]
        g = out if out.dtype == cd else ex
        np.multiply(ex, (dsum * k / sx)[:, None], out=g)
        aux = T.scratch("aux", d.shape, cd)
        np.multiply(d, (dscale * k)[:, None], out=aux)
        np.subtract(g, aux, out=g)
        if g is not out:
            np.copyto(out, g, casting="unsafe")

    def finish_rows(self, mx, sx, Su, A):
        """KL per row from partials taken relative to the maxima:
        logits: KL = A / Su - log Su + log sx  (lse_x - lse_u = mx - mu +
        log sx - log Su, and the mx - mu terms cancel against A's shift);
        probabilities: KL = A + Su log sx.  Returns (lse_x, KL, dscale, dsum)."""
        lsx = np.log(sx)
        lse_x = mx + lsx
        if self.logits:
            return lse_x, A / Su - np.log(Su) + lsx, 1.0 / Su, np.ones_like(Su)
        return lse_x, A + Su * lsx, np.ones_like(Su), Su

    def short_tile(self, i) -> None:
        r0, r1, c0, c1 = self.tiles[i]
        zx = self.load_zx(r0, r1, c0, c1)
        mx = zx.max(axis=1)
        ex = T.scratch("e", zx.shape, self.cd)
        np.subtract(zx, mx[:, None], out=ex)
        _, Su, A, d = self.target_stats(self.load_u(r0, r1, c0, c1), ex)
        np.exp(ex, out=ex)
        sx = T.rowsum(ex)
        lse_x, kl, dscale, dsum = self.finish_rows(mx, sx, Su, A)
        self.record(i, r0, r1, lse_x, kl)
        if self.grad is not None:
            self.emit(r0, r1, c0, c1, ex, sx, d, dscale, dsum)

    def long_rows(self) -> None:
        R, nb, n = self.R, self.tiles.nb, self.tiles.n
        mu_p = np.full(n, -np.inf, self.cd)
        Su_p = np.zeros(n, self.cd)
        A_p = np.zeros(n, self.cd)

        def extra(i, zx, xm):
            mu, Su, A, _ = self.target_stats(self.load_u(*self.tiles[i]), xm)
            if mu is not None:
                mu_p[i] = mu[0]
            Su_p[i] = Su[0]
            A_p[i] = A[0]

        MX, SX, mx_p = T.online_max_sum(self.x, self.tiles, self.cd, load=self.load_zx, extra=extra)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            Su_p2, A_p2 = Su_p.reshape(R, nb), A_p.reshape(R, nb)
            dmx = mx_p - MX[:, None]  # mx_b - MX
            MU = None
            if self.logits:
                # move each block's partials to the row maxima (MU, MX):
                # (u - MU) - (zx - MX) = (u - mu_b) - (zx - mx_b) + (mu_b - MU) - (mx_b - MX)
                mu_p2 = mu_p.reshape(R, nb)
                MU = mu_p2.max(axis=1)
                dmu = mu_p2 - MU[:, None]
                k = np.exp(dmu)
                SU = (Su_p2 * k).sum(axis=1)
                moved = k * (A_p2 + Su_p2 * (dmu - dmx))
            else:
                SU = Su_p2.sum(axis=1)
                moved = A_p2 - Su_p2 * dmx
            # a block the teacher gives no mass adds nothing, whatever the shifts
            # (-inf - -inf where a block of either is all -inf: 0 * nan)
            A = np.where(Su_p2 == 0, 0, moved).sum(axis=1)
            lse_x, kl, dscale, dsum = self.finish_rows(MX, SX, SU, A)
            self.record(0, 0, R, lse_x, kl)
        if self.grad is not None:
            self.tiles.run(lambda i: self._long_grad_tile(i, MX, SX, MU, dscale, dsum))

    def _long_grad_tile(self, i, MX, SX, MU, dscale, dsum) -> None:
        r0, r1, c0, c1 = self.tiles[i]
        zx = self.load_zx(r0, r1, c0, c1)
        ex = T.scratch("e", zx.shape, self.cd)
        np.subtract(zx, MX[r0:r1, None], out=ex)
        np.exp(ex, out=ex)
        u = self.load_u(r0, r1, c0, c1)
        d = u
        if self.logits:
            d = T.scratch("q", u.shape, self.cd)
            np.subtract(u, MU[r0:r1, None], out=d)
            np.exp(d, out=d)
        self.emit(r0, r1, c0, c1, ex, SX[r0:r1], d, dscale[r0:r1], dsum[r0:r1])

    def run(self) -> LossResult:
        if self.tiles.whole:
            self.tiles.run(self.short_tile)
        else:
            self.long_rows()
        red = self.opts.reduction
        if self.loss_rows is not None:
            loss = self.loss_rows
        elif red == "sum":
            loss = np.array(self.psum.sum(), self.ld)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                div = np.float64(self.R * self.C if red == "mean" else self.R)
                loss = np.array(self.psum.sum() / div, self.ld)
        return LossResult(loss, self.grad, None, self.lse_out)


def kl_div_logits(x: np.ndarray, target: np.ndarray, opts: KlDivLogitsOptions, want: Want) -> LossResult:
    return _KlLogits(x, target, opts, want).run()
