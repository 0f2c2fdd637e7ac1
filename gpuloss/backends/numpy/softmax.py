"""softmax / log_softmax and their backward on NumPy tiles.

Forward, short rows: each tile is read once and ``y`` written once (read N·V +
write N·V).  Long rows: per-block (max, sum exp) merged online, then a second
read to write ``y``.  Backward: one read of ``y`` and ``dy`` and one write of
``dx`` per tile for short rows; a first pass for the row sums for long rows.
"""
from __future__ import annotations

import numpy as np

from ...ops import SoftmaxOptions
from . import tiling as T


def _emit_forward(y, log: bool, r0, r1, c0, c1, zm, s, e) -> None:
    """y from zm = z - max and e = exp(zm): softmax e / s, log_softmax zm -
    log s (as (z - m) - log s, not z - lse: lse = m + log s would round log s
    away next to a large m)."""
    out = y[r0:r1, c0:c1]
    if log:
        np.subtract(zm, np.log(s)[:, None], out=out, casting="unsafe")
    else:
        np.multiply(e, (1.0 / s)[:, None], out=out, casting="unsafe")


def softmax_forward(x: np.ndarray, opts: SoftmaxOptions) -> np.ndarray:
    """softmax or log_softmax over the last axis of ``(R, C)`` ``x``."""
    R, C = x.shape
    log = opts.log
    cd = T.compute_dtype(x)
    y = np.empty((R, C), x.dtype)
    tiles = T.Tiles(R, C, cd.itemsize)

    if tiles.whole:
        def tile(i):
            r0, r1, c0, c1 = tiles[i]
            z = T.as_cd(x[r0:r1], "z", cd)
            m = z.max(axis=1)
            e = T.scratch("e", z.shape, cd)
            np.subtract(z, m[:, None], out=e)
            zm = e
            if log:  # keep z - m for the output
                zm = T.scratch("aux", z.shape, cd)
                np.copyto(zm, e)
            np.exp(e, out=e)
            _emit_forward(y, log, r0, r1, c0, c1, zm, T.rowsum(e), e)

        tiles.run(tile)
        return y

    M, S, _ = T.online_max_sum(x, tiles, cd)

    def tile2(i):
        r0, r1, c0, c1 = tiles[i]
        z = T.as_cd(x[r0:r1, c0:c1], "z", cd)
        e = T.scratch("e", z.shape, cd)
        np.subtract(z, M[r0:r1, None], out=e)
        if log:
            _emit_forward(y, log, r0, r1, c0, c1, e, S[r0:r1], None)
        else:
            np.exp(e, out=e)
            _emit_forward(y, log, r0, r1, c0, c1, None, S[r0:r1], e)

    tiles.run(tile2)
    return y


def softmax_backward(y: np.ndarray, dy: np.ndarray, opts: SoftmaxOptions) -> np.ndarray:
    """softmax:     dx = y * (dy - sum(dy * y))
    log_softmax: dx = dy - exp(y) * sum(dy)"""
    R, C = y.shape
    log = opts.log
    cd = T.compute_dtype(y, dy)
    dx = np.empty((R, C), y.dtype)
    tiles = T.Tiles(R, C, cd.itemsize)

    def rowstat(yc, dyc):
        return T.rowsum(dyc) if log else T.rowdot(dyc, yc, cd)

    def emit(r0, r1, c0, c1, yc, dyc, k):
        out = dx[r0:r1, c0:c1]
        tmp = T.scratch("e", yc.shape, cd)
        if log:
            np.exp(yc, out=tmp)
            np.multiply(tmp, k[:, None], out=tmp)
            np.subtract(dyc, tmp, out=out, casting="unsafe")
        else:
            np.subtract(dyc, k[:, None], out=tmp)
            np.multiply(yc, tmp, out=out, casting="unsafe")

    def load(r0, r1, c0, c1):
        return T.as_cd(y[r0:r1, c0:c1], "z", cd), T.as_cd(dy[r0:r1, c0:c1], "q", cd)

    if tiles.whole:
        def tile(i):
            r0, r1, c0, c1 = tiles[i]
            yc, dyc = load(r0, r1, c0, c1)
            emit(r0, r1, c0, c1, yc, dyc, rowstat(yc, dyc))

        with np.errstate(invalid="ignore", over="ignore"):
            tiles.run(tile)
        return dx

    part = np.empty(tiles.n, cd)

    def tile1(i):
        yc, dyc = load(*tiles[i])
        part[i] = rowstat(yc, dyc)[0]

    def tile2(i):
        r0, r1, c0, c1 = tiles[i]
        yc, dyc = load(r0, r1, c0, c1)
        emit(r0, r1, c0, c1, yc, dyc, K[r0:r1])

    with np.errstate(invalid="ignore", over="ignore"):
        tiles.run(tile1)
        K = part.reshape(R, tiles.nb).sum(axis=1)
        tiles.run(tile2)
    return dx
