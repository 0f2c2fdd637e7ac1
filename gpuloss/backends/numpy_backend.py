"""The NumPy backend: the CPU fallback.

Every op here is memory-bound, so the design is about touching each element of
the big ``(R, C)`` arrays as few times as possible and keeping the work in the
cache:

* **Tiles.**  The rows are cut into tiles of about ``_BLOCK_BYTES`` (512 KiB of
  compute-dtype elements: two of them fit a 1 MiB L2 together with the
  output).  A tile is a group of whole rows when ``C`` is small enough
  ("short rows"), else a column block of one row ("long rows").
* **One pass for short rows.**  Cross-entropy loss and gradient read a tile of
  ``x`` from memory once (the max), then do subtract, exp, sum, normalise,
  subtract the target and scale on the cache-resident copy, and write the
  gradient once: read N·V + write N·V, the floor of PERF.md.
* **Two passes for long rows** (a row larger than a tile, e.g. V = 10M): a first
  pass computes per-block partial statistics (max, sum of exp, dot products);
  they are merged with the online-softmax rescaling ``S = sum_b s_b exp(m_b -
  M)``; a second pass re-reads the blocks and writes the gradient.  Scratch
  stays one tile per thread whatever ``V`` is.
* **Scratch.**  Temporaries live in per-thread buffers reused across calls
  (``out=`` arguments everywhere): at most ``_SCRATCH_BUFFERS`` tiles per
  thread, and the tile shrinks when there are many threads, so the scratch is
  bounded by ``_SCRATCH_BUDGET`` (48 MiB) whatever N and V are.
* **Threads.**  NumPy releases the GIL inside ufuncs and reductions, so a thread
  pool over tiles uses every core.  The pool is created once, lazily, with
  ``os.cpu_count()`` workers (``GPULOSS_NUM_THREADS`` overrides); the calling
  thread works too.  Inputs smaller than ``_PARALLEL_MIN_ELEMS`` stay on the
  calling thread.

Arithmetic is float32 for float16/float32 inputs and float64 for float64
inputs; float16 tiles are converted into a float32 scratch tile and results are
rounded once, at the store.  NumPy has no bfloat16: a bfloat16 torch tensor is
served through a float32 copy (see :meth:`NumpyBackend.to_native`).

Inputs are never written, except ``x`` under ``grad_inplace=True``.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from .. import rules
from .base import Backend, LossResult

# --------------------------------------------------------------------------
# tuning constants (module attributes so tests can shrink them to exercise
# the multi-tile and long-row paths on small shapes)
# --------------------------------------------------------------------------

#: bytes of compute-dtype elements per tile (per scratch buffer)
_BLOCK_BYTES = 512 * 1024
#: upper bound on all per-thread scratch together
_SCRATCH_BUDGET = 48 * 1024 * 1024
#: the most tile-sized scratch buffers one tile uses at the same time (8
#: named ones in bce_with_logits, plus room for a boolean mask temporary)
_SCRATCH_BUFFERS = 10
#: below this many elements a call runs on the calling thread only
_PARALLEL_MIN_ELEMS = 1 << 18
#: rows per chunk for the O(R) work on class-index targets
_ROW_CHUNK = 1 << 16

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()
_tls = threading.local()


def num_threads() -> int:
    """Threads used per call: ``GPULOSS_NUM_THREADS`` or ``os.cpu_count()``."""
    env = os.environ.get("GPULOSS_NUM_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"GPULOSS_NUM_THREADS must be a positive integer, got {env!r}") from None
    return max(1, os.cpu_count() or 1)


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool with ``workers`` threads (re-created if the count changed)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpuloss-numpy")
            _pool_size = workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _parallel_for(n: int, fn: Callable[[int], None], elems: int) -> None:
    """Run ``fn(i)`` for i in range(n) over the pool.

    Workers pull tile indices from a shared counter (``next`` on an
    ``itertools.count`` is atomic under the GIL), so no per-tile future is
    created: a 10^10-element input is ~10^5 tiles and the bookkeeping stays
    O(threads)."""
    if n <= 0:
        return
    threads = num_threads()
    if threads <= 1 or n == 1 or elems < _PARALLEL_MIN_ELEMS:
        with np.errstate(all="ignore"):
            for i in range(n):
                fn(i)
        return
    workers = min(threads, n)
    counter = itertools.count()

    def work() -> None:
        # NaN/inf are part of the semantics (ignored rows, bad targets, -inf
        # logits); np.errstate is context-local, so each worker sets it
        with np.errstate(all="ignore"):
            while True:
                i = next(counter)
                if i >= n:
                    return
                fn(i)

    pool = _get_pool(threads - 1) if threads > 1 else None
    futures = [pool.submit(work) for _ in range(workers - 1)]
    try:
        work()  # the calling thread takes tiles too
    finally:
        for f in futures:
            f.result()


def _block_elems(itemsize: int) -> int:
    """Elements per tile: ``_BLOCK_BYTES``, shrunk so that every thread's
    ``_SCRATCH_BUFFERS`` tiles fit in ``_SCRATCH_BUDGET``."""
    per_buffer = _SCRATCH_BUDGET // (_SCRATCH_BUFFERS * (num_threads() + 1))
    return max(16, min(_BLOCK_BYTES, per_buffer) // itemsize)


def _scratch(name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
    """A per-thread scratch array, reused across calls (grown on demand; never
    larger than one tile)."""
    bufs: Dict[str, np.ndarray] = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = bufs.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[name] = np.empty(max(nbytes, 64), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


class _Tiles:
    """Tiling of an ``(R, C)`` array into ~``block``-element tiles.

    ``whole``: each tile is ``rows`` complete rows.  Otherwise each tile is a
    column block of one row, ``nb`` blocks per row of (nearly) equal width."""

    def __init__(self, R: int, C: int, block: int):
        self.R, self.C = R, C
        if C <= block:
            self.whole = True
            self.rows = max(1, block // max(C, 1))
            self.nb = 1
            self.width = C
            self.n = -(-R // self.rows)
        else:
            self.whole = False
            self.rows = 1
            self.nb = -(-C // block)
            self.width = -(-C // self.nb)
            self.n = R * self.nb

    def __getitem__(self, i: int) -> Tuple[int, int, int, int]:
        if self.whole:
            r0 = i * self.rows
            return r0, min(self.R, r0 + self.rows), 0, self.C
        r, b = divmod(i, self.nb)
        c0 = b * self.width
        return r, r + 1, c0, min(self.C, c0 + self.width)


def _compute_dtype(*arrays) -> np.dtype:
    """float64 if any floating input is float64, else float32."""
    for a in arrays:
        if a is not None and a.dtype == np.float64:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def _as_cd(src: np.ndarray, name: str, cd: np.dtype) -> np.ndarray:
    """``src`` in the compute dtype: itself when it already is, else a
    converted copy in scratch buffer ``name``."""
    if src.dtype == cd:
        return src
    buf = _scratch(name, src.shape, cd)
    np.copyto(buf, src, casting="unsafe")
    return buf


def _rowsum(a: np.ndarray) -> np.ndarray:
    # np.add.reduce over the contiguous last axis is pairwise: O(log C) error
    return np.add.reduce(a, axis=1)


def _rowdot(a: np.ndarray, b: np.ndarray, cd: np.dtype) -> np.ndarray:
    """sum(a * b, axis=1) through a scratch tile (pairwise sum, no BLAS call
    that would start its own threads inside ours)."""
    tmp = _scratch("dot", a.shape, cd)
    np.multiply(a, b, out=tmp)
    return _rowsum(tmp)


def _wslice(w: Optional[np.ndarray], r0: int, r1: int, c0: int, c1: int):
    if w is None:
        return None
    if w.ndim == 1:
        return w[c0:c1]
    return w[r0:r1, c0:c1]


def _loss_dtype(cd: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if cd == np.float64 else np.dtype(np.float32)


def _finish(total: float, reduction: str, divisor: float, ld: np.dtype) -> np.ndarray:
    """0-d loss array from a float64 sum: "sum" -> total, "mean" -> total/divisor
    (nan for a zero divisor, as PyTorch)."""
    if reduction == "sum":
        return np.array(total, dtype=ld)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.array(np.float64(total) / np.float64(divisor), dtype=ld)


def _class_rows(t: np.ndarray, C: int, ignore_index: int, w: Optional[np.ndarray]):
    """Per-row facts of class-index targets ``t`` (a slice of rows).

    Returns ``(ts, ign, bad, ok, wt)``: a safe index (0 where the row is not a
    valid class, so that gathers never go out of bounds), the ignored rows, the
    rows with an out-of-range target that is not ``ignore_index`` (their loss
    and gradient are NaN), the valid rows, and ``weight[t]`` (1 without
    weights)."""
    t = t.astype(np.int64, copy=False)
    ign = t == ignore_index
    bad = ~ign & ((t < 0) | (t >= C))
    ok = ~(ign | bad)
    ts = np.where(ok, t, 0)
    wt = w[ts] if w is not None else None
    return ts, ign, bad, ok, wt


class NumpyBackend(Backend):
    """Primitives on NumPy arrays (CPU), chunked and threaded; see the module
    docstring for the design."""

    name = "numpy"
    native = "numpy"

    # --- availability -----------------------------------------------------
    def probe(self) -> Tuple[bool, str]:
        return True, f"numpy {np.__version__}"

    def accepts(self, kind: str, device: str) -> bool:
        return kind in ("numpy", "torch") and device == "cpu"

    # --- conversion -------------------------------------------------------
    def to_native(self, a: Any, kind: str) -> np.ndarray:
        """NumPy view of ``a``.  A CPU torch tensor is shared without a copy,
        except bfloat16, which NumPy cannot represent: that becomes a float32
        copy (so a ``grad_inplace`` on it writes the copy, not the tensor)."""
        if kind == "numpy":
            return a
        if kind == "torch":
            import torch

            t = a.detach()
            if t.dtype == torch.bfloat16:
                t = t.float()
            return t.numpy()
        raise TypeError(f"numpy backend cannot take {kind} arrays")

    def from_native(self, a: Any, kind: str) -> Any:
        if a is None or kind == "numpy":
            return a
        if kind == "torch":
            import torch

            return torch.from_numpy(np.asarray(a))
        raise TypeError(f"numpy backend cannot produce {kind} arrays")

    # --- softmax ----------------------------------------------------------
    def softmax_forward(self, x: np.ndarray, *, log: bool) -> np.ndarray:
        """softmax or log_softmax over the last axis of ``(R, C)`` ``x``.

        Short rows: one read of each tile, one write.  Long rows: per-block
        (max, sum exp) merged online, then a second read to write ``y``."""
        R, C = x.shape
        cd = _compute_dtype(x)
        y = np.empty((R, C), x.dtype)
        tiles = _Tiles(R, C, _block_elems(cd.itemsize))

        def emit(r0, r1, c0, c1, zm, s, e):
            """y from zm = z - max and e = exp(zm): softmax e / s, log_softmax
            zm - log s (as (z - m) - log s, not z - lse: lse = m + log s would
            round log s away next to a large m)."""
            out = y[r0:r1, c0:c1]
            if log:
                np.subtract(zm, np.log(s)[:, None], out=out, casting="unsafe")
            else:
                np.multiply(e, (1.0 / s)[:, None], out=out, casting="unsafe")

        if tiles.whole:
            def tile(i):
                r0, r1, c0, c1 = tiles[i]
                z = _as_cd(x[r0:r1], "z", cd)
                m = z.max(axis=1)
                e = _scratch("e", z.shape, cd)
                np.subtract(z, m[:, None], out=e)
                zm = e
                if log:  # keep z - m for the output
                    zm = _scratch("aux", z.shape, cd)
                    np.copyto(zm, e)
                np.exp(e, out=e)
                emit(r0, r1, c0, c1, zm, _rowsum(e), e)

            _parallel_for(tiles.n, tile, R * C)
            return y

        M, S, _ = self._online_max_sum(x, tiles, cd)

        def tile2(i):
            r0, r1, c0, c1 = tiles[i]
            z = _as_cd(x[r0:r1, c0:c1], "z", cd)
            e = _scratch("e", z.shape, cd)
            np.subtract(z, M[r0:r1, None], out=e)
            if log:
                emit(r0, r1, c0, c1, e, S[r0:r1], None)
            else:
                np.exp(e, out=e)
                emit(r0, r1, c0, c1, None, S[r0:r1], e)

        _parallel_for(tiles.n, tile2, R * C)
        return y

    def _online_max_sum(self, x, tiles: _Tiles, cd, load=None, extra=None):
        """First pass over long rows: per-block max m_b and s_b = sum exp(z -
        m_b), merged into the row's M and S = sum_b s_b exp(m_b - M).

        ``load(r0, r1, c0, c1)`` gives the block in the compute dtype (default:
        ``x`` converted); ``extra(i, z, zm)`` may record more per-block partials
        from the block and ``zm = z - m_b`` (before the exp).  Returns
        ``(M, S, m_part)`` with ``m_part`` the ``(R, nb)`` block maxima."""
        R = tiles.R
        nb = tiles.nb
        m_part = np.empty(tiles.n, cd)
        s_part = np.empty(tiles.n, cd)

        def tile(i):
            r0, r1, c0, c1 = tiles[i]
            z = load(r0, r1, c0, c1) if load is not None else _as_cd(x[r0:r1, c0:c1], "z", cd)
            m = z.max(axis=1)
            e = _scratch("e", z.shape, cd)
            np.subtract(z, m[:, None], out=e)
            if extra is not None:
                extra(i, z, e)
            np.exp(e, out=e)
            s = _rowsum(e)
            # a block that is all -inf contributes exp(-inf) = 0, not nan
            s[m == -np.inf] = 0
            m_part[i] = m[0]
            s_part[i] = s[0]

        _parallel_for(tiles.n, tile, tiles.R * tiles.C)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            m_part = m_part.reshape(R, nb)
            s_part = s_part.reshape(R, nb)
            M = m_part.max(axis=1)
            S = (s_part * np.exp(m_part - M[:, None])).sum(axis=1)
        return M, S, m_part

    def softmax_backward(self, y: np.ndarray, dy: np.ndarray, *, log: bool) -> np.ndarray:
        """softmax:     dx = y * (dy - sum(dy * y))
        log_softmax: dx = dy - exp(y) * sum(dy)

        Short rows: one read of y and dy, one write of dx.  Long rows: a first
        pass for the row sums, a second for dx."""
        R, C = y.shape
        cd = _compute_dtype(y, dy)
        dx = np.empty((R, C), y.dtype)
        tiles = _Tiles(R, C, _block_elems(cd.itemsize))

        def rowstat(yc, dyc):
            return _rowsum(dyc) if log else _rowdot(dyc, yc, cd)

        def emit(r0, r1, c0, c1, yc, dyc, k):
            out = dx[r0:r1, c0:c1]
            tmp = _scratch("e", yc.shape, cd)
            if log:
                np.exp(yc, out=tmp)
                np.multiply(tmp, k[:, None], out=tmp)
                np.subtract(dyc, tmp, out=out, casting="unsafe")
            else:
                np.subtract(dyc, k[:, None], out=tmp)
                np.multiply(yc, tmp, out=out, casting="unsafe")

        def load(r0, r1, c0, c1):
            return _as_cd(y[r0:r1, c0:c1], "z", cd), _as_cd(dy[r0:r1, c0:c1], "q", cd)

        if tiles.whole:
            def tile(i):
                r0, r1, c0, c1 = tiles[i]
                yc, dyc = load(r0, r1, c0, c1)
                emit(r0, r1, c0, c1, yc, dyc, rowstat(yc, dyc))

            with np.errstate(invalid="ignore", over="ignore"):
                _parallel_for(tiles.n, tile, R * C)
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
            _parallel_for(tiles.n, tile1, R * C)
            K = part.reshape(R, tiles.nb).sum(axis=1)
            _parallel_for(tiles.n, tile2, R * C)
        return dx

    # --- cross-entropy ----------------------------------------------------
    def cross_entropy(self, x: np.ndarray, target: np.ndarray, *, weight: Optional[np.ndarray],
                      ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                      reduction: str, want_grad: bool, grad_inplace: bool = False,
                      want_grad_target: bool = False) -> LossResult:
        """Cross-entropy from logits ``x`` ``(R, C)``, loss and gradient in one pass.

        With z the (soft-capped) logits, p = softmax(z), lse = logsumexp(z),
        s_i the row's scale (1/divisor for "mean", 0 for ignored rows), the
        gradient of a class-index row (see :func:`gpuloss.reference.cross_entropy_grad`)::

            dL/dz_j = s_i [ a_i p_j - (1 - eps) w[t_i] [j == t_i] - eps/C w_j ]
            a_i     = (1 - eps) w[t_i] + eps/C sum(w) + 2 z_loss lse_i

        so the tile computes e = exp(z - max), its row sum S, and writes
        ``e * (s a / S)`` then subtracts the constant and target terms in cache.
        Probability targets (d~ = (1-eps) d + eps/C, q = w d~, Q = sum q)::

            loss_i = Q lse - sum(q z) + z_loss lse^2,
            dL/dz  = s [ (Q + 2 z_loss lse) p - q ],   dL/dd = s (1-eps) w (lse - z)

        and the softcap multiplies by ``1 - (z / cap)^2`` (= 1 - tanh^2).
        """
        R, C = x.shape
        prob = np.issubdtype(target.dtype, np.floating)
        cd = _compute_dtype(x, target if prob else None)
        ld = _loss_dtype(cd)
        eps = float(label_smoothing)
        zl = float(z_loss)
        cap = None if softcap is None else float(softcap)
        w = None if weight is None else np.asarray(weight, dtype=cd)
        Wsum = float(C) if w is None else float(w.sum(dtype=np.float64))

        # ---- the mean divisor, before any gradient is written ----
        if prob:
            divisor = float(R)
        elif reduction == "mean":
            divisor = 0.0
            for r0 in range(0, R, _ROW_CHUNK):
                t = target[r0:r0 + _ROW_CHUNK].astype(np.int64, copy=False)
                ok = (t != ignore_index) & (t >= 0) & (t < C)
                divisor += float(ok.sum()) if w is None else float(w[t[ok]].sum(dtype=np.float64))
        else:
            divisor = 1.0
        # valid rows scale by 1/divisor (inf for a zero divisor: NaN gradients,
        # as torch); ignored rows by a selected 0 (gpuloss.rules)
        sc = rules.mean_scale(divisor) if reduction == "mean" else 1.0

        lse_out = np.empty(R, np.float32)
        loss_rows = np.empty(R, ld) if reduction == "none" else None
        grad = None
        if want_grad:
            grad = x if grad_inplace else np.empty((R, C), x.dtype)
        gt_out = None
        if prob and want_grad_target:
            gt_out = np.empty(target.shape, target.dtype)

        tiles = _Tiles(R, C, _block_elems(cd.itemsize))
        psum = np.zeros(tiles.n if tiles.whole else 1, np.float64)

        def load_z(r0, r1, c0, c1):
            """The logits block in the compute dtype, soft-capped: z = cap tanh(x / cap)."""
            src = x[r0:r1, c0:c1]
            if cap is None:
                return _as_cd(src, "z", cd)
            z = _scratch("z", src.shape, cd)
            np.divide(src, cap, out=z, dtype=cd, casting="unsafe")
            np.tanh(z, out=z)
            np.multiply(z, cap, out=z)
            return z

        def load_q(r0, r1, c0, c1):
            """Weighted smoothed probability targets q = w ((1 - eps) d + eps / C)."""
            src = target[r0:r1, c0:c1]
            wb = None if w is None else w[c0:c1]
            if eps == 0.0 and wb is None:
                return _as_cd(src, "q", cd)
            q = _scratch("q", src.shape, cd)
            np.multiply(src, 1.0 - eps, out=q, dtype=cd, casting="unsafe")
            if eps != 0.0:
                np.add(q, eps / C, out=q)
            if wb is not None:
                np.multiply(q, wb, out=q)
            return q

        def row_terms(m, s, zt, wz, Q, qz, rows):
            """Per-row lse, loss, and the coefficients of the gradient.

            ``m``/``s``: the row max and sum of exp(z - m); ``wz`` = sum w (z - m)
            and ``qz`` = sum q (z - m) are taken relative to the max, and the
            loss is formed from ``log s`` and ``m - z_t`` rather than from
            ``lse - z``: no cancellation between two large numbers when the
            logits carry a large common offset.  ``rows`` is (ts, ign, bad,
            ok, wt) for class targets."""
            with np.errstate(invalid="ignore", over="ignore"):
                return _row_terms(m, s, zt, wz, Q, qz, rows)

        def _row_terms(m, s, zt, wz, Q, qz, rows):
            ls = np.log(s)
            lse = m + ls
            if prob:
                loss = Q * ls - qz  # = sum_c q_c (lse - z_c)
                if zl:
                    loss = loss + zl * lse * lse
                a = Q + 2.0 * zl * lse if zl else Q
                coef = (sc * a) / s
                return lse, loss, coef, None, None
            ts, ign, bad, ok, wt = rows
            wt_ = 1.0 if wt is None else wt
            loss = (ls + (m - zt)) * wt_  # w_t (lse - z_t)
            if eps:  # sum_c w_c (lse - z_c) = W log s - sum_c w_c (z_c - m)
                loss = (1.0 - eps) * loss + (eps / C) * (Wsum * ls - wz)
            if zl:
                loss = loss + zl * lse * lse
            loss = np.where(ign, 0.0, loss)
            loss[bad] = np.nan
            rs = np.where(ok, sc, 0.0)
            rs[bad] = np.nan
            a = (1.0 - eps) * wt_ + (eps / C) * Wsum
            if zl:
                a = a + 2.0 * zl * lse
            coef = np.where(ign, 0.0, rs * a / s)
            tsub = rs * ((1.0 - eps) * wt_)
            srow = rs * (eps / C) if eps else None
            return lse, loss, coef.astype(cd, copy=False), tsub, srow

        def emit(r0, r1, c0, c1, z, e, coef, tsub, srow, ts, q):
            """Write dL/dx for block [r0:r1, c0:c1] given e = exp(z - M)."""
            out = grad[r0:r1, c0:c1]
            direct = cap is None and out.dtype == cd
            g = out if direct else e
            np.multiply(e, coef[:, None], out=g)
            if srow is not None:  # label smoothing: - s eps/C w_j
                if w is None:
                    np.subtract(g, srow[:, None].astype(cd), out=g)
                else:
                    aux = _scratch("aux", g.shape, cd)
                    np.multiply(srow[:, None], w[c0:c1], out=aux, casting="unsafe")
                    np.subtract(g, aux, out=g)
            if ts is not None:  # - s (1 - eps) w[t] at the target column
                loc = ts - c0
                inb = (loc >= 0) & (loc < c1 - c0)
                ridx = np.nonzero(inb)[0]
                g[ridx, loc[inb]] -= tsub[inb].astype(cd)
            if q is not None:  # probability targets: - s q
                if sc == 1.0:
                    np.subtract(g, q, out=g)
                else:
                    aux = _scratch("aux", g.shape, cd)
                    np.multiply(q, sc, out=aux)
                    np.subtract(g, aux, out=g)
            if cap is not None:  # dz/dx = 1 - tanh^2 = 1 - (z / cap)^2
                aux = _scratch("aux", g.shape, cd)
                np.divide(z, cap, out=aux)
                np.square(aux, out=aux)
                np.subtract(1.0, aux, out=aux)
                np.multiply(g, aux, out=out, casting="unsafe")
            elif not direct:
                np.copyto(out, g, casting="unsafe")

        def emit_grad_target(r0, r1, c0, c1, z, m, ls):
            """dL/dd = s (1 - eps) w (lse - z), formed as (m - z) + log s; before
            the gradient may overwrite z."""
            aux = _scratch("aux", z.shape, cd)
            np.subtract(m[:, None], z, out=aux)
            np.add(aux, ls[:, None], out=aux)
            k = sc * (1.0 - eps)
            if w is not None:
                np.multiply(aux, w[c0:c1], out=aux)
            np.multiply(aux, k, out=gt_out[r0:r1, c0:c1], casting="unsafe")

        errs = dict(invalid="ignore", divide="ignore", over="ignore")

        if tiles.whole:
            # ---- short rows: one pass per tile ----
            # memory traffic: x read once (the max); every later step works on
            # the cache-resident tile; the gradient written once
            def tile(i):
                r0, r1, c0, c1 = tiles[i]
                z = load_z(r0, r1, c0, c1)
                m = z.max(axis=1)
                e = _scratch("e", z.shape, cd)
                np.subtract(z, m[:, None], out=e)  # z - m
                zt = wz = Q = qz = rows = q = ts = None
                if prob:
                    q = load_q(r0, r1, c0, c1)
                    Q = _rowsum(q)
                    qz = _rowdot(q, e, cd)
                else:
                    rows = _class_rows(target[r0:r1], C, ignore_index, w)
                    ts = rows[0]
                    zt = z[np.arange(r1 - r0), ts]
                    if eps:
                        wz = _rowsum(e) if w is None else _rowdot(e, w, cd)
                np.exp(e, out=e)
                s = _rowsum(e)
                lse, loss, coef, tsub, srow = row_terms(m, s, zt, wz, Q, qz, rows)
                lse_out[r0:r1] = lse
                if loss_rows is not None:
                    loss_rows[r0:r1] = loss
                else:
                    psum[i] = loss.sum(dtype=np.float64)
                if gt_out is not None:
                    emit_grad_target(r0, r1, c0, c1, z, m, np.log(s))
                if grad is not None:
                    emit(r0, r1, c0, c1, z, e, coef, tsub, srow, ts, q)

            _parallel_for(tiles.n, tile, R * C)
        else:
            # ---- long rows: partial statistics per block, merged, then a second pass ----
            # memory traffic: x read twice (the row does not fit the cache),
            # the gradient written once
            nb = tiles.nb
            # per block, relative to the block max m_b: sum w (z - m_b) and sum w
            wz_part = np.zeros(tiles.n, cd) if (not prob and eps) else None
            W_part = np.zeros(tiles.n, cd) if (not prob and eps) else None
            # probability targets: sum q and sum q (z - m_b)
            Q_part = np.zeros(tiles.n, cd) if prob else None
            qz_part = np.zeros(tiles.n, cd) if prob else None

            def extra(i, z, zm):
                r0, r1, c0, c1 = tiles[i]
                if wz_part is not None:
                    if w is None:
                        wz_part[i] = _rowsum(zm)[0]
                        W_part[i] = c1 - c0
                    else:
                        wz_part[i] = _rowdot(zm, w[c0:c1], cd)[0]
                        W_part[i] = w[c0:c1].sum()
                if prob:
                    q = load_q(r0, r1, c0, c1)
                    Q_part[i] = _rowsum(q)[0]
                    qz_part[i] = _rowdot(q, zm, cd)[0]

            M, S, m_part = self._online_max_sum(x, tiles, cd, load=load_z, extra=extra)
            with np.errstate(**errs):
                rows = zt = wz = Q = qz = None
                shift = m_part - M[:, None]  # m_b - M, to move partials to the row max
                if prob:
                    Qb = Q_part.reshape(R, nb)
                    Q = Qb.sum(axis=1)
                    qz = (qz_part.reshape(R, nb) + Qb * shift).sum(axis=1)
                else:
                    rows = _class_rows(target, C, ignore_index, w)
                    zt = x[np.arange(R), rows[0]].astype(cd)
                    if cap is not None:
                        zt = cap * np.tanh(zt / cd.type(cap))
                    if eps:
                        wz = (wz_part.reshape(R, nb) + W_part.reshape(R, nb) * shift).sum(axis=1)
                lse, loss, coef, tsub, srow = row_terms(M, S, zt, wz, Q, qz, rows)
                LS = np.log(S)
                lse_out[:] = lse
                if loss_rows is not None:
                    loss_rows[:] = loss
                else:
                    psum[0] = loss.sum(dtype=np.float64)

            if grad is not None or gt_out is not None:
                def tile2(i):
                    r0, r1, c0, c1 = tiles[i]
                    z = load_z(r0, r1, c0, c1)
                    if gt_out is not None:
                        emit_grad_target(r0, r1, c0, c1, z, M[r0:r1], LS[r0:r1])
                    if grad is None:
                        return
                    e = _scratch("e", z.shape, cd)
                    np.subtract(z, M[r0:r1, None], out=e)
                    np.exp(e, out=e)
                    q = load_q(r0, r1, c0, c1) if prob else None
                    emit(r0, r1, c0, c1, z, e, coef[r0:r1],
                         None if prob else tsub[r0:r1], None if srow is None else srow[r0:r1],
                         None if prob else rows[0][r0:r1], q)

                _parallel_for(tiles.n, tile2, R * C)

        if loss_rows is not None:
            loss = loss_rows
        else:
            loss = _finish(psum.sum(), reduction, divisor, ld)
        return LossResult(loss, grad, gt_out, lse_out)

    def nll_loss(self, logp: np.ndarray, target: np.ndarray, *, weight: Optional[np.ndarray],
                 ignore_index: int, reduction: str, want_grad: bool) -> LossResult:
        """loss_i = -w[t_i] logp[i, t_i]; the gradient is zero but at (i, t_i),
        where it is -s w[t_i] (s = 1/sum of w[t] over valid rows for "mean").
        Only R elements are read; the gradient is a zero-filled (calloc) array
        with R writes."""
        R, C = logp.shape
        cd = _compute_dtype(logp)
        ld = _loss_dtype(cd)
        w = None if weight is None else np.asarray(weight, dtype=cd)
        loss_rows = np.empty(R, ld) if reduction == "none" else None
        total = 0.0
        divisor = 0.0
        chunks = []
        with np.errstate(invalid="ignore"):
            for r0 in range(0, R, _ROW_CHUNK):
                r1 = min(R, r0 + _ROW_CHUNK)
                ts, ign, bad, ok, wt = _class_rows(target[r0:r1], C, ignore_index, w)
                wt_ = np.ones(r1 - r0, cd) if wt is None else wt
                wt_ = np.where(ok, wt_, 0.0)
                vals = logp[np.arange(r0, r1), ts].astype(cd)
                loss = -vals * wt_
                loss[bad] = np.nan
                if loss_rows is not None:
                    loss_rows[r0:r1] = loss
                else:
                    total += loss.sum(dtype=np.float64)
                divisor += wt_.sum(dtype=np.float64)
                chunks.append((r0, r1))
        sc = rules.mean_scale(divisor) if reduction == "mean" else 1.0
        grad = None
        if want_grad:
            grad = np.zeros((R, C), logp.dtype)
            with np.errstate(invalid="ignore"):
                for r0, r1 in chunks:
                    ts, ign, bad, ok, wt = _class_rows(target[r0:r1], C, ignore_index, w)
                    wt_ = np.ones(r1 - r0, cd) if wt is None else wt
                    vals = np.where(ok, -wt_ * sc, 0.0)
                    grad[np.arange(r0, r1), ts] = vals
                    grad[r0 + np.nonzero(bad)[0]] = np.nan
        loss = loss_rows if loss_rows is not None else _finish(total, reduction, divisor, ld)
        return LossResult(loss, grad, None, None)

    def kl_div_logits(self, x: np.ndarray, target: np.ndarray, *, temperature: float,
                      target_is_logits: bool, reduction: str, want_grad: bool) -> LossResult:
        """Row-wise KL(d || q), q = softmax(x / T), d = softmax(target / T) or
        the target probabilities.  With zx = x / T, zu = target / T::

            logits: KL_i = sum_c e^(zu - mu) (zu - zx) / Su - lse_u + lse_x
            probs:  KL_i = sum_c (d log d - d zx) + sum(d) lse_x
            dL/dx  = s (sum(d) q - d) / T

        (the first form keeps the target's max mu and sum Su online, so long
        rows merge per-block partials with the same rescaling as the logits).
        ``lse`` is logsumexp(x / T)."""
        R, C = x.shape
        cd = _compute_dtype(x, target)
        ld = _loss_dtype(cd)
        T = float(temperature)
        if reduction == "mean":
            sc = 1.0 / (R * C) if R * C else 0.0
        elif reduction == "batchmean":
            sc = 1.0 / R if R else 0.0
        else:
            sc = 1.0
        tiles = _Tiles(R, C, _block_elems(cd.itemsize))
        lse_out = np.empty(R, np.float32)
        loss_rows = np.empty(R, ld) if reduction == "none" else None
        grad = np.empty((R, C), x.dtype) if want_grad else None

        def load_zx(r0, r1, c0, c1):
            z = _scratch("z", (r1 - r0, c1 - c0), cd)
            np.divide(x[r0:r1, c0:c1], T, out=z, dtype=cd, casting="unsafe")
            return z

        def load_u(r0, r1, c0, c1):
            """target / T (logits) or the target in the compute dtype (probs)."""
            if target_is_logits:
                u = _scratch("u", (r1 - r0, c1 - c0), cd)
                np.divide(target[r0:r1, c0:c1], T, out=u, dtype=cd, casting="unsafe")
                return u
            return _as_cd(target[r0:r1, c0:c1], "u", cd)

        def target_stats(u, xm):
            """Per-row partials of the target, given ``xm = zx - mx`` (before exp).

            logits: mu = max u, eu = exp(u - mu) (left in scratch "q"),
            Su = sum eu, A = sum eu ((u - mu) - xm);
            probabilities d: Su = sum d, A = sum (xlogy(d, d) - d xm)."""
            aux = _scratch("aux", u.shape, cd)
            if target_is_logits:
                mu = u.max(axis=1)
                eu = _scratch("q", u.shape, cd)
                np.subtract(u, mu[:, None], out=eu)
                np.subtract(eu, xm, out=aux)
                np.exp(eu, out=eu)
                np.multiply(aux, eu, out=aux)
                Su = _rowsum(eu)
                A = _rowsum(aux)
                Su[mu == -np.inf] = 0
                A[mu == -np.inf] = 0
                return mu, Su, A, eu
            aux.fill(0)
            np.log(u, out=aux, where=u != 0)  # xlogy: 0 log 0 = 0
            np.multiply(aux, u, out=aux)
            tmp = _scratch("dot", u.shape, cd)
            np.multiply(u, xm, out=tmp)
            np.subtract(aux, tmp, out=aux)
            return None, _rowsum(u), _rowsum(aux), u

        def emit(r0, r1, c0, c1, ex, sx, d, dscale, dsum):
            """dx = (s/T) (sum(d) ex / sx - d),  d = eu * dscale (logits) or d."""
            out = grad[r0:r1, c0:c1]
            g = out if out.dtype == cd else ex
            np.multiply(ex, (dsum * (sc / T) / sx)[:, None], out=g)
            aux = _scratch("aux", d.shape, cd)
            np.multiply(d, (dscale * (sc / T))[:, None], out=aux)
            np.subtract(g, aux, out=g)
            if g is not out:
                np.copyto(out, g, casting="unsafe")

        def finish_rows(mx, sx, Su, A):
            """KL per row from partials taken relative to the maxima:
            logits: KL = A / Su - log Su + log sx  (lse_x - lse_u = mx - mu +
            log sx - log Su, and the mx - mu terms cancel against A's shift);
            probabilities: KL = A + Su log sx.  Returns (lse_x, KL, dscale, dsum)."""
            lsx = np.log(sx)
            lse_x = mx + lsx
            if target_is_logits:
                kl = A / Su - np.log(Su) + lsx
                return lse_x, kl, 1.0 / Su, np.ones_like(Su)
            return lse_x, A + Su * lsx, np.ones_like(Su), Su

        if tiles.whole:
            psum = np.zeros(tiles.n, np.float64)

            def tile(i):
                r0, r1, c0, c1 = tiles[i]
                zx = load_zx(r0, r1, c0, c1)
                mx = zx.max(axis=1)
                ex = _scratch("e", zx.shape, cd)
                np.subtract(zx, mx[:, None], out=ex)
                u = load_u(r0, r1, c0, c1)
                _, Su, A, d = target_stats(u, ex)
                np.exp(ex, out=ex)
                sx = _rowsum(ex)
                lse_x, kl, dscale, dsum = finish_rows(mx, sx, Su, A)
                lse_out[r0:r1] = lse_x
                if loss_rows is not None:
                    loss_rows[r0:r1] = kl
                else:
                    psum[i] = kl.sum(dtype=np.float64)
                if grad is not None:
                    emit(r0, r1, c0, c1, ex, sx, d, dscale, dsum)

            _parallel_for(tiles.n, tile, R * C)
        else:
            nb = tiles.nb
            mu_p = np.full(tiles.n, -np.inf, cd)
            Su_p = np.zeros(tiles.n, cd)
            A_p = np.zeros(tiles.n, cd)

            def extra(i, zx, xm):
                u = load_u(*tiles[i])
                mu, Su, A, _ = target_stats(u, xm)
                if mu is not None:
                    mu_p[i] = mu[0]
                Su_p[i] = Su[0]
                A_p[i] = A[0]

            MX, SX, mx_p = self._online_max_sum(x, tiles, cd, load=load_zx, extra=extra)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                Su_p2 = Su_p.reshape(R, nb)
                A_p2 = A_p.reshape(R, nb)
                dmx = mx_p - MX[:, None]  # mx_b - MX
                if target_is_logits:
                    # move each block's partials to the row maxima (MU, MX):
                    # (u - MU) - (zx - MX) = (u - mu_b) - (zx - mx_b) + (mu_b - MU) - (mx_b - MX)
                    mu_p2 = mu_p.reshape(R, nb)
                    MU = mu_p2.max(axis=1)
                    dmu = mu_p2 - MU[:, None]
                    k = np.exp(dmu)
                    SU = (Su_p2 * k).sum(axis=1)
                    A = (k * (A_p2 + Su_p2 * (dmu - dmx))).sum(axis=1)
                else:
                    MU, SU = None, Su_p2.sum(axis=1)
                    A = (A_p2 - Su_p2 * dmx).sum(axis=1)
                lse_x, kl, dscale, dsum = finish_rows(MX, SX, SU, A)
                lse_out[:] = lse_x
                psum = np.array([kl.sum(dtype=np.float64)]) if loss_rows is None else None
                if loss_rows is not None:
                    loss_rows[:] = kl
            if grad is not None:
                def tile2(i):
                    r0, r1, c0, c1 = tiles[i]
                    zx = load_zx(r0, r1, c0, c1)
                    ex = _scratch("e", zx.shape, cd)
                    np.subtract(zx, MX[r0:r1, None], out=ex)
                    np.exp(ex, out=ex)
                    u = load_u(r0, r1, c0, c1)
                    if target_is_logits:
                        d = _scratch("q", u.shape, cd)
                        np.subtract(u, MU[r0:r1, None], out=d)
                        np.exp(d, out=d)
                    else:
                        d = u
                    emit(r0, r1, c0, c1, ex, SX[r0:r1], d, dscale[r0:r1], dsum[r0:r1])

                _parallel_for(tiles.n, tile2, R * C)

        if loss_rows is not None:
            loss = loss_rows
        elif reduction == "sum":
            loss = np.array(psum.sum(), ld)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                div = np.float64(R * C if reduction == "mean" else R)
                loss = np.array(psum.sum() / div, ld)
        return LossResult(loss, grad, None, lse_out)

    # --- element-wise losses ----------------------------------------------
    def _elementwise(self, x: np.ndarray, target: np.ndarray, reduction: str, want_grad: bool,
                     want_grad_target: bool, body, divisor: Optional[float] = None) -> LossResult:
        """Drive an element-wise loss over tiles.

        ``body(r0, r1, c0, c1, xs, ts, sc, gx, gt)`` gets the tile of x and
        target in the compute dtype, the gradient scale and the output tiles
        (or None), writes the gradients and returns the loss tile (scratch).
        Memory traffic: read x, target (and weights) once, write each
        requested output once."""
        R, C = x.shape
        cd = _compute_dtype(x, target)
        ld = _loss_dtype(cd)
        n_el = R * C
        if divisor is None:
            divisor = float(n_el)
        sc = (1.0 / divisor if divisor else 0.0) if reduction in ("mean", "batchmean") else 1.0
        tiles = _Tiles(R, C, _block_elems(cd.itemsize))
        loss_el = np.empty((R, C), ld) if reduction == "none" else None
        gx_out = np.empty((R, C), x.dtype) if want_grad else None
        gt_out = np.empty(target.shape, target.dtype) if want_grad_target else None
        psum = np.zeros(max(tiles.n, 1), np.float64)

        def tile(i):
            r0, r1, c0, c1 = tiles[i]
            xs = _as_cd(x[r0:r1, c0:c1], "z", cd)
            ts = _as_cd(target[r0:r1, c0:c1], "u", cd)
            gx = None if gx_out is None else gx_out[r0:r1, c0:c1]
            gt = None if gt_out is None else gt_out[r0:r1, c0:c1]
            loss = body(r0, r1, c0, c1, xs, ts, sc, gx, gt)
            if loss_el is not None:
                np.copyto(loss_el[r0:r1, c0:c1], loss, casting="unsafe")
            else:
                psum[i] = np.add.reduce(loss, axis=None, dtype=np.float64)

        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            _parallel_for(tiles.n, tile, n_el)
        if loss_el is not None:
            loss = loss_el
        elif reduction == "sum":
            loss = np.array(psum.sum(), ld)
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                loss = np.array(psum.sum() / np.float64(divisor), ld)
        return LossResult(loss, gx_out, gt_out, None)

    def kl_div(self, input: np.ndarray, target: np.ndarray, *, log_target: bool, reduction: str,
               want_grad: bool, want_grad_target: bool = False) -> LossResult:
        """Element-wise PyTorch kl_div on log-probabilities ``input``::

            loss = xlogy(t, t) - t x,        dx = -t,       dt = log t + 1 - x
            log_target: loss = e^t (t - x),  dx = -e^t,     dt = e^t (t - x + 1)

        "batchmean" divides by the number of rows R."""
        R, C = input.shape
        cd = _compute_dtype(input, target)

        def body(r0, r1, c0, c1, x, t, sc, gx, gt):
            loss = _scratch("e", x.shape, cd)
            aux = _scratch("aux", x.shape, cd)
            if log_target:
                et = _scratch("q", x.shape, cd)
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
            np.multiply(t, x, out=_scratch("q", x.shape, cd))
            np.subtract(loss, _scratch("q", x.shape, cd), out=loss)
            if gx is not None:
                np.multiply(t, -sc, out=gx, casting="unsafe")
            if gt is not None:
                np.add(aux, 1.0, out=aux)
                np.subtract(aux, x, out=aux)
                np.multiply(aux, sc, out=gt, casting="unsafe")
            return loss

        divisor = float(R) if reduction == "batchmean" else None
        return self._elementwise(input, target, reduction, want_grad, want_grad_target, body, divisor)

    def bce_with_logits(self, x: np.ndarray, target: np.ndarray, *, weight: Optional[np.ndarray],
                        pos_weight: Optional[np.ndarray], reduction: str, want_grad: bool,
                        want_grad_target: bool = False) -> LossResult:
        """PyTorch's binary_cross_entropy_with_logits, with sp = log(1 + e^-x)
        computed stably as log1p(e^-|x|) + max(-x, 0), lw = 1 + (pw - 1) t::

            loss = w ((1 - t) x + lw sp)
            dx   = w ((1 - t) - lw sigmoid(-x))
            dt   = w (-x + (pw - 1) sp)
        """
        cd = _compute_dtype(x, target)

        def body(r0, r1, c0, c1, xs, t, sc, gx, gt):
            wb = _wslice(weight, r0, r1, c0, c1)
            pw = _wslice(pos_weight, r0, r1, c0, c1)
            en = _scratch("q", xs.shape, cd)  # e^-|x|
            np.abs(xs, out=en)
            np.negative(en, out=en)
            np.exp(en, out=en)
            sp = _scratch("aux", xs.shape, cd)
            np.log1p(en, out=sp)
            loss = _scratch("e", xs.shape, cd)
            np.negative(xs, out=loss)
            np.maximum(loss, 0.0, out=loss)
            np.add(sp, loss, out=sp)  # sp = softplus(-x)
            lw = None
            if pw is not None:
                lw = _scratch("lw", xs.shape, cd)
                np.subtract(pw, 1.0, out=lw, dtype=cd, casting="unsafe")
                np.multiply(lw, t, out=lw)
                np.add(lw, 1.0, out=lw)
            # loss = (1 - t) x + lw sp
            omt = _scratch("omt", xs.shape, cd)
            np.subtract(1.0, t, out=omt)
            np.multiply(omt, xs, out=loss)
            if lw is not None:
                tmp = _scratch("dot", xs.shape, cd)
                np.multiply(lw, sp, out=tmp)
                np.add(loss, tmp, out=loss)
            else:
                np.add(loss, sp, out=loss)
            if gt is not None:  # w (-x + (pw - 1) sp)
                tmp = _scratch("dot", xs.shape, cd)
                if pw is not None:
                    np.subtract(pw, 1.0, out=tmp, dtype=cd, casting="unsafe")
                    np.multiply(tmp, sp, out=tmp)
                    np.subtract(tmp, xs, out=tmp)
                else:
                    np.negative(xs, out=tmp)
                if wb is not None:
                    np.multiply(tmp, wb, out=tmp, casting="unsafe")
                np.multiply(tmp, sc, out=gt, casting="unsafe")
            if gx is not None:
                # sigmoid(-x) = e^-|x| / (1 + e^-|x|) for x >= 0, 1 / (1 + e^-|x|) for x < 0
                r = _scratch("dot", xs.shape, cd)
                np.add(en, 1.0, out=r)
                np.reciprocal(r, out=r)
                np.multiply(en, r, out=en)
                np.copyto(en, r, where=xs < 0)
                if lw is not None:
                    np.multiply(en, lw, out=en)
                np.subtract(omt, en, out=omt)
                if wb is not None:
                    np.multiply(omt, wb, out=omt, casting="unsafe")
                np.multiply(omt, sc, out=gx, casting="unsafe")
            if wb is not None:
                np.multiply(loss, wb, out=loss, casting="unsafe")
            return loss

        return self._elementwise(x, target, reduction, want_grad, want_grad_target, body)

    def bce(self, p: np.ndarray, target: np.ndarray, *, weight: Optional[np.ndarray], reduction: str,
            want_grad: bool, want_grad_target: bool = False) -> LossResult:
        """PyTorch's binary_cross_entropy on probabilities, logs clamped at -100::

            loss = -w (t max(log p, -100) + (1 - t) max(log(1 - p), -100))
            dp   = w (p - t) / max(p (1 - p), 1e-12)
            dt   = w (log(1 - p) - log p)            (unclamped, as PyTorch)
        """
        cd = _compute_dtype(p, target)
        eps = cd.type(np.float32(1e-12))

        def body(r0, r1, c0, c1, ps, t, sc, gx, gt):
            wb = _wslice(weight, r0, r1, c0, c1)
            lp = _scratch("q", ps.shape, cd)
            np.log(ps, out=lp)
            l1p = _scratch("aux", ps.shape, cd)
            np.negative(ps, out=l1p)
            np.log1p(l1p, out=l1p)
            if gt is not None:
                tmp = _scratch("dot", ps.shape, cd)
                np.subtract(l1p, lp, out=tmp)
                if wb is not None:
                    np.multiply(tmp, wb, out=tmp, casting="unsafe")
                np.multiply(tmp, sc, out=gt, casting="unsafe")
            np.maximum(lp, -100.0, out=lp)
            np.maximum(l1p, -100.0, out=l1p)
            # -(t lp + (1 - t) l1p) = (t - 1) l1p - t lp = t (l1p - lp) - l1p
            loss = _scratch("e", ps.shape, cd)
            np.subtract(l1p, lp, out=loss)
            np.multiply(loss, t, out=loss)
            np.subtract(loss, l1p, out=loss)
            if wb is not None:
                np.multiply(loss, wb, out=loss, casting="unsafe")
            if gx is not None:
                den = _scratch("dot", ps.shape, cd)
                np.subtract(1.0, ps, out=den)
                np.multiply(den, ps, out=den)
                np.maximum(den, eps, out=den)
                num = _scratch("omt", ps.shape, cd)
                np.subtract(ps, t, out=num)
                np.divide(num, den, out=num)
                if wb is not None:
                    np.multiply(num, wb, out=num, casting="unsafe")
                np.multiply(num, sc, out=gx, casting="unsafe")
            return loss

        return self._elementwise(p, target, reduction, want_grad, want_grad_target, body)

    def mse(self, x: np.ndarray, target: np.ndarray, *, reduction: str, want_grad: bool,
            want_grad_target: bool = False) -> LossResult:
        """loss = (x - t)^2, dx = 2 s (x - t), dt = -dx."""
        cd = _compute_dtype(x, target)

        def body(r0, r1, c0, c1, xs, t, sc, gx, gt):
            d = _scratch("aux", xs.shape, cd)
            np.subtract(xs, t, out=d)
            loss = _scratch("e", xs.shape, cd)
            np.square(d, out=loss)
            if gx is not None or gt is not None:
                np.multiply(d, 2.0 * sc, out=d)
                if gx is not None:
                    np.copyto(gx, d, casting="unsafe")
                if gt is not None:
                    np.negative(d, out=gt, casting="unsafe")
            return loss

        return self._elementwise(x, target, reduction, want_grad, want_grad_target, body)
