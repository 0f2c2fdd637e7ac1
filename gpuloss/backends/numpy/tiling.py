"""Tiles, threads and scratch: the machinery every NumPy launcher shares.

Every op is memory-bound, so the design is about touching each element of the
big ``(R, C)`` arrays as few times as possible and keeping the work in the
cache:

* **Tiles.**  The rows are cut into tiles of about ``BLOCK_BYTES`` (512 KiB of
  compute-dtype elements: two of them fit a 1 MiB L2 together with the
  output).  A tile is a group of whole rows when ``C`` is small enough
  ("short rows"), else a column block of one row ("long rows").
* **One pass for short rows**: a tile is read from memory once and every later
  step works on the cache-resident copy (read N·V + write N·V, the floor of
  PERF.md).
* **Two passes for long rows** (a row larger than a tile, e.g. V = 10M): a first
  pass computes per-block partial statistics (max, sum of exp, dot products);
  they are merged with the online-softmax rescaling ``S = sum_b s_b exp(m_b -
  M)`` (:func:`online_max_sum`); a second pass re-reads the blocks and writes
  the output.  Scratch stays one tile per thread whatever ``V`` is.
* **Scratch.**  Temporaries live in per-thread buffers reused across calls
  (``out=`` arguments everywhere): at most ``SCRATCH_BUFFERS`` tiles per
  thread.  A tile of whole rows shrinks when there are many threads; a long
  row's blocks do not (its sums would then depend on the machine), and fewer
  of them run at once instead: the scratch stays within ``SCRATCH_BUDGET``
  (48 MiB) whatever N and V are.
* **Threads.**  NumPy releases the GIL inside ufuncs and reductions, so a thread
  pool over tiles uses every core.  The pool is created once, lazily, with
  ``os.cpu_count()`` workers (``GPULOSS_NUM_THREADS`` overrides); the calling
  thread works too.  Inputs smaller than ``PARALLEL_MIN_ELEMS`` stay on the
  calling thread.

Arithmetic is float32 for float16/float32 inputs and float64 for float64
inputs (:mod:`gpuloss.rules`); float16 tiles are converted into a float32
scratch tile and results are rounded once, at the store.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ... import rules

# --------------------------------------------------------------------------
# tuning constants (module attributes so tests can shrink them to exercise
# the multi-tile and long-row paths on small shapes)
# --------------------------------------------------------------------------

#: bytes of compute-dtype elements per tile (per scratch buffer)
BLOCK_BYTES = 512 * 1024
#: upper bound on all per-thread scratch together
SCRATCH_BUDGET = 48 * 1024 * 1024
#: the most tile-sized scratch buffers one tile uses at the same time (8
#: named ones in bce_with_logits, plus room for a boolean mask temporary)
SCRATCH_BUFFERS = 10
#: below this many elements a call runs on the calling thread only
PARALLEL_MIN_ELEMS = 1 << 18
#: rows per chunk for the O(R) work on class-index targets
ROW_CHUNK = 1 << 16

#: os.cpu_count() once: it does not change while the process runs, and asking costs microseconds per call
_CPU_COUNT = max(1, os.cpu_count() or 1)

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()
_tls = threading.local()


def num_threads() -> int:
    """Threads used per call: ``GPULOSS_NUM_THREADS`` or ``os.cpu_count()``."""
    env = os.environ.get("GPULOSS_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"GPULOSS_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    return _CPU_COUNT


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """The shared pool with ``workers`` threads (re-created if the count changed).

    A replaced pool is not shut down: a call on another thread may still be
    submitting to it (``GPULOSS_NUM_THREADS`` changed meanwhile); its threads
    exit once the last call holding it is done and it is collected."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpuloss-numpy")
            _pool_size = workers
        return _pool


def _forget_pool_after_fork() -> None:
    """In a forked child (a DataLoader worker, multiprocessing's "fork"):
    the parent's pool object came along without its threads, so work submitted
    to it would never run; the child starts its own on first use."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def parallel_for(n: int, fn: Callable[[int], None], elems: int, cap: Optional[int] = None) -> None:
    """Run ``fn(i)`` for i in range(n) over the pool, at most ``cap`` at a
    time (:attr:`Tiles.workers`: the scratch budget).

    Workers pull tile indices from a shared counter (``next`` on an
    ``itertools.count`` is atomic under the GIL), so no per-tile future is
    created: a 10^10-element input is ~10^5 tiles and the bookkeeping stays
    O(threads)."""
    if n <= 0:
        return
    threads = num_threads()
    workers = min(threads, n, cap or threads)
    if workers <= 1 or elems < PARALLEL_MIN_ELEMS:
        with np.errstate(all="ignore"):
            for i in range(n):
                fn(i)
        return
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


def block_elems(itemsize: int) -> int:
    """Elements per tile of whole rows: ``BLOCK_BYTES``, shrunk so that every
    thread's ``SCRATCH_BUFFERS`` tiles fit in ``SCRATCH_BUDGET``."""
    per_buffer = SCRATCH_BUDGET // (SCRATCH_BUFFERS * (num_threads() + 1))
    return max(16, min(BLOCK_BYTES, per_buffer) // itemsize)


def scratch(name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
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


class RowResults:
    """What a row loss's tiles write (cross-entropy, the KL from logits):
    ``lse_out`` per row, and the per-row losses into ``loss_rows`` for
    "none", else their sum into tile ``i``'s slot of ``psum`` (summed in
    float64 when the tiles are done)."""
    lse_out: np.ndarray
    loss_rows: "np.ndarray | None"
    psum: np.ndarray

    def record(self, i, r0, r1, lse, loss) -> None:
        self.lse_out[r0:r1] = lse
        if self.loss_rows is not None:
            self.loss_rows[r0:r1] = loss
        else:
            self.psum[i] = loss.sum(dtype=np.float64)


class Tiles:
    """Tiling of an ``(R, C)`` array of ``itemsize``-byte compute elements.

    ``whole``: each tile is ``rows`` complete rows (as many as the thread's
    share of the scratch budget holds, :func:`block_elems`; at least one).
    Otherwise (``C`` beyond ``BLOCK_BYTES``) each tile is a column block of
    one row, ``nb`` blocks per row of (nearly) equal width.  Which of the
    two, and the blocks of a long row, depend on ``C`` and the dtype only:
    a long row's partial sums add up in the same order on any machine and
    thread count.  The thread count only groups whole rows into tiles (each
    row's results are its own; a reduction's float64 partial sums are per
    tile).  ``workers``: how many tiles may run at once within
    ``SCRATCH_BUDGET``."""

    def __init__(self, R: int, C: int, itemsize: int):
        self.R, self.C = R, C
        base = max(16, BLOCK_BYTES // itemsize)
        if C <= base:
            self.whole = True
            self.rows = max(1, block_elems(itemsize) // max(C, 1))
            self.nb = 1
            self.width = C
            self.n = -(-R // self.rows)
            tile = self.rows * C
        else:
            self.whole = False
            self.rows = 1
            self.nb = -(-C // base)
            self.width = -(-C // self.nb)
            self.n = R * self.nb
            tile = self.width
        self.workers = max(1, SCRATCH_BUDGET // (SCRATCH_BUFFERS * max(1, tile * itemsize)) - 1)

    def run(self, fn: Callable[[int], None]) -> None:
        """``fn(i)`` for every tile, over the pool, at most :attr:`workers` at a time."""
        parallel_for(self.n, fn, self.R * self.C, self.workers)

    def __getitem__(self, i: int) -> Tuple[int, int, int, int]:
        if self.whole:
            r0 = i * self.rows
            return r0, min(self.R, r0 + self.rows), 0, self.C
        r, b = divmod(i, self.nb)
        c0 = b * self.width
        return r, r + 1, c0, min(self.C, c0 + self.width)


def compute_dtype(*arrays) -> np.dtype:
    """The accumulation dtype (:func:`gpuloss.rules.acc_dtype_name`): float64
    if any floating input is float64, else float32."""
    wide = any(a is not None and a.dtype == np.float64 for a in arrays)
    return np.dtype(rules.acc_dtype_name("float64" if wide else "float32"))


def as_cd(src: np.ndarray, name: str, cd: np.dtype) -> np.ndarray:
    """``src`` in the compute dtype: itself when it already is, else a
    converted copy in scratch buffer ``name``."""
    if src.dtype == cd:
        return src
    buf = scratch(name, src.shape, cd)
    np.copyto(buf, src, casting="unsafe")
    return buf


def rowsum(a: np.ndarray) -> np.ndarray:
    # np.add.reduce over the contiguous last axis is pairwise: O(log C) error
    return np.add.reduce(a, axis=1)


def rowdot(a: np.ndarray, b: np.ndarray, cd: np.dtype) -> np.ndarray:
    """sum(a * b, axis=1) through a scratch tile (pairwise sum, no BLAS call
    that would start its own threads inside ours)."""
    tmp = scratch("dot", a.shape, cd)
    np.multiply(a, b, out=tmp)
    return rowsum(tmp)


def wslice(w: Optional[np.ndarray], r0: int, r1: int, c0: int, c1: int):
    if w is None:
        return None
    if w.ndim == 1:
        return w[c0:c1]
    return w[r0:r1, c0:c1]


def loss_dtype(cd: np.dtype) -> np.dtype:
    return np.dtype(rules.acc_dtype_name(str(cd)))


def finish_loss(total: float, reduction: str, divisor: float, ld: np.dtype) -> np.ndarray:
    """0-d loss array from a float64 sum: "sum" -> total, "mean" -> total/divisor
    (nan for a zero divisor, as PyTorch, also where label smoothing left the
    sum nonzero: see :mod:`gpuloss.rules`)."""
    if reduction == "sum":
        return np.array(total, dtype=ld)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.array(np.float64(total) / np.float64(divisor) if divisor != 0 else np.nan, dtype=ld)


def class_rows(t: np.ndarray, C: int, ignore_index: int, w: Optional[np.ndarray]):
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


def online_max_sum(x, tiles: Tiles, cd, load=None, extra=None):
    """First pass over long rows: per-block max m_b and s_b = sum exp(z -
    m_b), merged into the row's M and S = sum_b s_b exp(m_b - M).

    ``load(r0, r1, c0, c1)`` gives the block in the compute dtype (default:
    ``x`` converted); ``extra(i, z, zm)`` may record more per-block partials
    from the block and ``zm = z - m_b`` (before the exp; ``z`` itself, all
    -inf, for a block that is all -inf, whose ``z - m_b`` would be nan).
    Returns ``(M, S, m_part)`` with ``m_part`` the ``(R, nb)`` block maxima."""
    R = tiles.R
    nb = tiles.nb
    m_part = np.empty(tiles.n, cd)
    s_part = np.empty(tiles.n, cd)

    def tile(i):
        r0, r1, c0, c1 = tiles[i]
        z = load(r0, r1, c0, c1) if load is not None else as_cd(x[r0:r1, c0:c1], "z", cd)
        m = z.max(axis=1)
        e = scratch("e", z.shape, cd)
        # a block that is all -inf: z - 0 = -inf (not -inf - -inf = nan), which contributes exp(-inf) = 0
        np.subtract(z, np.where(m == -np.inf, 0, m)[:, None], out=e)
        if extra is not None:
            extra(i, z, e)
        np.exp(e, out=e)
        s = rowsum(e)
        m_part[i] = m[0]
        s_part[i] = s[0]

    tiles.run(tile)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m_part = m_part.reshape(R, nb)
        s_part = s_part.reshape(R, nb)
        M = m_part.max(axis=1)
        S = (s_part * np.exp(m_part - M[:, None])).sum(axis=1)
    return M, S, m_part
