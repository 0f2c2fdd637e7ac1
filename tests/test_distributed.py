"""Vocabulary-parallel cross-entropy (``gpuloss.distributed``) against the
float64 reference on the concatenated logits.

Each multi-process test spawns one gloo group on localhost (2 or 3 ranks)
and runs every check in it: the spawn and ``import torch`` dominate the time,
so one group does many checks.  Every rank builds the same full logits from
the seed the parent draws, takes its slice, and compares its loss and its
gradient slice with ``gpuloss.reference``; failures and the number of checks
run travel back through one pickle file per rank.  Joins are bounded, the
process group has a 60 s timeout, and a hung group fails the test instead of
hanging CI.  One more 2-process group runs both functions under
``torch.compile(fullgraph=True)`` (``backend="aot_eager"``: tracing and the
autograd graphs, no C++ compilation) against eager.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from typing import Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from conftest import tol  # noqa: E402
from prims import no_upstream  # noqa: E402
from gpuloss import reference as R  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

JOIN_TIMEOUT_S = 120
PG_TIMEOUT = timedelta(seconds=60)
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------
# what runs inside every rank
# ---------------------------------------------------------------------------

class Checker:
    """Collects comparisons instead of stopping at the first failure, so one
    failure does not desynchronise the ranks' collectives."""

    def __init__(self, rank: int):
        self.rank = rank
        self.checks = 0
        self.failures: list[str] = []

    def close(self, name: str, got, want, dtype: str = "float64") -> None:
        self.checks += 1
        try:
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64),
                                       equal_nan=True, **tol(dtype))
        except AssertionError as e:
            self.failures.append(f"rank {self.rank}: {name}: {e}")

    def true(self, name: str, cond: bool, detail: str = "") -> None:
        self.checks += 1
        if not cond:
            self.failures.append(f"rank {self.rank}: {name} {detail}")

    def raises(self, name: str, fn, match: str, index_error: bool = False) -> None:
        """``fn`` must raise ValueError whose message contains ``match`` (and
        is an IndexError too, for a class index out of range, as torch's)."""
        self.checks += 1
        try:
            fn()
        except ValueError as e:
            if match not in str(e) or "raised on every rank" not in str(e):
                self.failures.append(f"rank {self.rank}: {name}: unexpected message {e}")
            if isinstance(e, IndexError) != index_error:
                self.failures.append(f"rank {self.rank}: {name}: {type(e).__name__} is "
                                     f"{'not ' if index_error else ''}an IndexError")
            return
        self.failures.append(f"rank {self.rank}: {name}: no ValueError")


def _np(t):
    return t.detach().to("cpu", torch.float64).numpy()


def _bounds(sizes, order=None):
    """(start, end) per rank; ``order`` lists the ranks in vocabulary order."""
    order = list(range(len(sizes))) if order is None else order
    starts, s = {}, 0
    for r in order:
        starts[r] = s
        s += sizes[r]
    return [(starts[r], starts[r] + sizes[r]) for r in range(len(sizes))]


def _targets(rng, n, V, ignore_frac=0.25, ignore_index=-100, high=None):
    t = rng.integers(0, V if high is None else high, size=n)
    t[rng.random(n) < ignore_frac] = ignore_index
    return t


def _ce_case(chk, name, X, T, rank, bounds, device, *, dtype="float64", upstream=None, class_last=True,
             validate=True, layout_kwargs=None, **opts):
    """One call of vocab_parallel_cross_entropy + backward, compared with the
    reference on the full logits ``X`` (class dim last)."""
    from gpuloss.distributed import vocab_parallel_cross_entropy
    s, e = bounds[rank]
    tdt = TORCH_DTYPES[dtype]
    # bf16: the reference sees the rounded logits (conftest's TOLERANCES rule)
    Xr = torch.from_numpy(X).to(tdt).to(torch.float64).numpy()
    x = torch.tensor(Xr[..., s:e], dtype=tdt, device=device, requires_grad=True)
    t = torch.from_numpy(T).to(device)
    kw = dict(layout_kwargs or {})
    loss = vocab_parallel_cross_entropy(x, t, validate=validate, **kw, **opts)
    go = 1.0 if upstream is None else upstream
    loss.backward(torch.as_tensor(go, dtype=loss.dtype, device=device).expand_as(loss).clone())
    # the reference puts the class dim at 1 for ndim >= 3
    Xref = Xr if Xr.ndim <= 2 else np.moveaxis(Xr, -1, 1)
    want = R.cross_entropy(Xref, T, **opts)
    gref, _ = R.cross_entropy_grad(Xref, T, **opts, grad_output=go)
    if Xr.ndim > 2:
        gref = np.moveaxis(gref, 1, -1)
    chk.true(f"{name}: loss shape", tuple(loss.shape) == np.shape(want), f"{tuple(loss.shape)} vs {np.shape(want)}")
    chk.true(f"{name}: loss dtype", loss.dtype == tdt)
    chk.close(f"{name}: loss", _np(loss), want, dtype)
    chk.close(f"{name}: grad", _np(x.grad), gref[..., s:e], dtype)
    return loss


def _linear_case(chk, name, Hd, W, B, T, rank, bounds, device, *, upstream=None, chunk_size=None, group=None,
                 **opts):
    from gpuloss.distributed import vocab_parallel_linear_cross_entropy
    s, e = bounds[rank]
    h = torch.tensor(Hd, device=device, requires_grad=True)
    w = torch.tensor(W[s:e], device=device, requires_grad=True)
    b = None if B is None else torch.tensor(B[s:e], device=device, requires_grad=True)
    t = torch.from_numpy(T).to(device)
    loss = vocab_parallel_linear_cross_entropy(h, w, t, group, local_bias=b, chunk_size=chunk_size, **opts)
    go = 1.0 if upstream is None else upstream
    loss.backward(torch.as_tensor(go, dtype=loss.dtype, device=device).expand_as(loss).clone())
    H = Hd.shape[-1]
    h2 = Hd.reshape(-1, H)
    logits = h2 @ W.T + (0.0 if B is None else B)
    want = R.cross_entropy(logits, T.reshape(-1), **opts)
    gl, _ = R.cross_entropy_grad(logits, T.reshape(-1), **opts,
                                 grad_output=np.reshape(go, -1) if np.ndim(go) else go)
    chk.close(f"{name}: loss", _np(loss).reshape(-1), np.reshape(want, -1))
    chk.close(f"{name}: grad_hidden", _np(h.grad), (gl @ W).reshape(Hd.shape))
    chk.close(f"{name}: grad_weight", _np(w.grad), (gl.T @ h2)[s:e])
    if b is not None:
        chk.close(f"{name}: grad_bias", _np(b.grad), gl.sum(0)[s:e])


def _autocast_case(chk, X, T, rank, bounds, device) -> None:
    """Under torch.autocast (bf16): bf16 logits give the loss in float32,
    unrounded, as torch's cross_entropy does; the linear form runs its
    projection in bf16 (as F.linear would) from float32 operands, the loss in
    float32 and the gradients in the operands' float32."""
    from gpuloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    s, e = bounds[rank]
    dev_type = torch.device(device).type
    Xr = torch.from_numpy(X).to(torch.bfloat16)
    x = Xr[..., s:e].to(device).clone().requires_grad_()
    t = torch.from_numpy(T).to(device)
    with torch.autocast(dev_type, dtype=torch.bfloat16):
        loss = vocab_parallel_cross_entropy(x, t, label_smoothing=0.1)
    loss.backward()
    chk.true("autocast: loss dtype float32", loss.dtype == torch.float32, str(loss.dtype))
    chk.true("autocast: grad dtype bf16", x.grad.dtype == torch.bfloat16, str(x.grad.dtype))
    Xd = Xr.double().numpy()
    chk.close("autocast: loss", _np(loss), R.cross_entropy(Xd, T, label_smoothing=0.1), "float32")
    chk.close("autocast: grad", _np(x.grad), R.cross_entropy_grad(Xd, T, label_smoothing=0.1)[0][:, s:e], "bfloat16")
    H = 8
    g = torch.Generator().manual_seed(7)  # the same on every rank
    Hd = torch.randn(X.shape[0], H, generator=g)
    W = torch.randn(X.shape[1], H, generator=g) * 0.3
    h, w = Hd.to(device).clone().requires_grad_(), W[s:e].to(device).clone().requires_grad_()
    with torch.autocast(dev_type, dtype=torch.bfloat16):
        loss = vocab_parallel_linear_cross_entropy(h, w, t, chunk_size=4)
    loss.backward()
    chk.true("autocast linear: loss dtype float32", loss.dtype == torch.float32, str(loss.dtype))
    chk.true("autocast linear: grad dtypes float32", h.grad.dtype == w.grad.dtype == torch.float32)
    hb, Wb = Hd.bfloat16().double().numpy(), W.bfloat16().double().numpy()
    logits = torch.from_numpy(hb @ Wb.T).bfloat16().double().numpy()  # F.linear's bf16 output
    chk.close("autocast linear: loss", _np(loss), R.cross_entropy(logits, T), "float32")
    gl = R.cross_entropy_grad(logits, T)[0]
    chk.close("autocast linear: grad_hidden", _np(h.grad), gl @ Wb, "bfloat16")
    chk.close("autocast linear: grad_weight", _np(w.grad), (gl.T @ hb)[s:e], "bfloat16")
    # loss_dtype, as gpuloss.cross_entropy's: bf16 operands, the loss as accumulated (not rounded to bf16)
    loss = vocab_parallel_cross_entropy(x.detach(), t, label_smoothing=0.1, loss_dtype=torch.float32)
    chk.true("loss_dtype: float32", loss.dtype == torch.float32, str(loss.dtype))
    chk.close("loss_dtype: loss", _np(loss), R.cross_entropy(Xd, T, label_smoothing=0.1), "float32")
    hb16, wb16 = Hd.bfloat16().to(device), W[s:e].bfloat16().to(device)
    loss = vocab_parallel_linear_cross_entropy(hb16, wb16, t, chunk_size=4, loss_dtype=torch.float32)
    chk.true("loss_dtype linear: float32", loss.dtype == torch.float32, str(loss.dtype))
    chk.close("loss_dtype linear: loss", _np(loss), R.cross_entropy(logits, T), "float32")


def _float16_scaled_case(chk, T, rank, bounds, device, V) -> None:
    """float16 logits, "mean", a GradScaler-sized upstream (65536): the
    gradient is saved in float32 until backward multiplies the scale in.
    With one logit 20 above the rest, p = e**-20 / 9 rows is ~2e-10, below
    fp16's smallest subnormal; times 65536 it is ~1.6e-5 (representable)."""
    from gpuloss.distributed import vocab_parallel_cross_entropy
    s, e = bounds[rank]
    N = len(T)
    X = np.zeros((N, V))
    X[np.arange(N), (np.where(T >= 0, T, 0) + 1) % V] = 20.0  # never the target (1 - p_t would round in fp32)
    x = torch.tensor(X[:, s:e], dtype=torch.float16, device=device, requires_grad=True)
    t = torch.from_numpy(T).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.float16):  # the loss in float32
        loss = vocab_parallel_cross_entropy(x, t)
    chk.true("float16 scaled: loss float32", loss.dtype == torch.float32, str(loss.dtype))
    (loss * 65536.0).backward()
    g, _ = R.cross_entropy_grad(X, T, grad_output=65536.0)
    want = torch.from_numpy(g[:, s:e]).to(torch.float16)
    got = x.grad.cpu()
    chk.true("float16 scaled: dtype", got.dtype == torch.float16)
    chk.true("float16 scaled: nothing flushed", int(((got == 0) & (want != 0)).sum()) == 0,
             f"{int(((got == 0) & (want != 0)).sum())} of {int((want != 0).sum())} zero")
    chk.close("float16 scaled: grad", got.double().numpy(), want.double().numpy(), "float16")


def _second_order_case(chk, X, T, rank, bounds, device) -> None:
    """A gradient asked for with create_graph=True raises (any derivative of
    it would miss the loss's curvature); no collective runs in backward."""
    from gpuloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    s, e = bounds[rank]
    t = torch.from_numpy(T).to(device)
    x = torch.tensor(X[:, s:e], device=device, requires_grad=True)
    h = torch.tensor(X[:, :4], device=device, requires_grad=True)
    w = torch.tensor(X[:4, s:e].T.copy(), device=device, requires_grad=True)
    for name, loss, wrt in (("vocab_parallel_cross_entropy", vocab_parallel_cross_entropy(x, t), x),
                            ("vocab_parallel_linear_cross_entropy", vocab_parallel_linear_cross_entropy(h, w, t), h)):
        try:
            torch.autograd.grad(loss, wrt, create_graph=True)
            chk.true(f"{name}: second derivative raises", False, "no error")
        except RuntimeError as err:
            chk.true(f"{name}: second derivative raises", "second derivatives are not implemented" in str(err),
                     str(err))


def _all_checks(rank: int, world: int, sizes, seed: int, chk: Checker, device: str) -> None:
    """Every check, run on every rank of one group (also at world size 1)."""
    import gpuloss.distributed as D

    rng = np.random.default_rng(seed)  # the same stream on every rank
    V = sum(sizes)
    bounds = _bounds(sizes)
    N = 9
    X = rng.standard_normal((N, V)) * 3.0

    # --- every option, every reduction, float64 ----------------------------
    for reduction in ("none", "mean", "sum"):
        for eps in (0.0, 0.1):
            for z_loss in (0.0, 1e-2):
                for softcap in (None, 2.5):
                    T = _targets(rng, N, V)
                    up = rng.standard_normal(N) if reduction == "none" else float(rng.uniform(0.5, 2.0))
                    _ce_case(chk, f"{reduction} eps={eps} z={z_loss} cap={softcap}", X, T, rank, bounds, device,
                             upstream=up, reduction=reduction, label_smoothing=eps, z_loss=z_loss, softcap=softcap)

    # --- ignore_index inside the vocabulary, (B, S, V_local) logits ---------
    T = _targets(rng, N, V, ignore_index=3)
    _ce_case(chk, "ignore_index=3", X, T, rank, bounds, device, ignore_index=3, label_smoothing=0.2,
             upstream=1.7)
    X3 = rng.standard_normal((2, 3, V)) * 2.0
    T3 = _targets(rng, 6, V).reshape(2, 3)
    _ce_case(chk, "3-d none", X3, T3, rank, bounds, device, reduction="none", upstream=rng.standard_normal((2, 3)),
             z_loss=1e-3)
    _ce_case(chk, "3-d mean", X3, T3, rank, bounds, device, label_smoothing=0.05, softcap=4.0)

    # --- "none": NaN upstream at ignored rows leaves their gradient 0 --------
    # (torch's nll_loss backward skips them; e.g. loss / n with n = 0 on padding)
    T = _targets(rng, N, V)
    T[[1, 5]] = -100
    up = rng.standard_normal(N)
    up[T == -100] = np.nan
    s, e = bounds[rank]
    x = torch.tensor(X[:, s:e], device=device, requires_grad=True)
    D.vocab_parallel_cross_entropy(x, torch.from_numpy(T).to(device), reduction="none", label_smoothing=0.1) \
        .backward(torch.from_numpy(up).to(device))
    gref = R.cross_entropy_grad(X, T, reduction="none", label_smoothing=0.1, grad_output=np.where(T == -100, 0, up))[0]
    chk.close("none, NaN upstream at ignored rows: grad", _np(x.grad), gref[:, s:e], "float64")

    # --- targets all in the first slice: the other ranks own none ----------
    T = rng.integers(0, sizes[0], size=N)
    _ce_case(chk, "targets in slice 0 only", X, T, rank, bounds, device, label_smoothing=0.1, z_loss=1e-2)

    # --- all targets ignored: mean is nan, gradients zero (PyTorch) --------
    T = np.full(N, -100)
    loss = _ce_case(chk, "all ignored mean", X, T, rank, bounds, device, label_smoothing=0.1)
    chk.true("all ignored mean is nan", bool(torch.isnan(loss)))
    _ce_case(chk, "all ignored sum", X, T, rank, bounds, device, reduction="sum", z_loss=1e-2)
    # ... divided by a count of 0 (transformers' num_items_in_batch of a step with no scored token): the
    # upstream gradient is inf, every gradient 0 (torch's nll_loss backward skips ignored rows), not NaN
    s, e = bounds[rank]
    x = torch.tensor(X[:, s:e], device=device, requires_grad=True)
    t = torch.from_numpy(T).to(device)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    (D.vocab_parallel_cross_entropy(x, t, reduction="sum", label_smoothing=0.1) / zero).backward()
    chk.true("all ignored, sum / 0: grad 0", not x.grad.any().item(), str(x.grad))
    g = torch.Generator().manual_seed(11)  # the same on every rank
    h = torch.randn(N, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64)[s:e]).to(device).requires_grad_()
    b = torch.randn(sum(sizes), generator=g, dtype=torch.float64)[s:e].to(device).requires_grad_()
    (D.vocab_parallel_linear_cross_entropy(h, w, t, local_bias=b, reduction="sum") / zero).backward()
    chk.true("linear, all ignored, sum / 0: grads 0", not (h.grad.any() or w.grad.any() or b.grad.any()).item())

    # --- float32 and bfloat16 storage ----------------------------------------
    T = _targets(rng, N, V)
    _ce_case(chk, "float32", X, T, rank, bounds, device, dtype="float32", label_smoothing=0.1, z_loss=1e-3,
             softcap=5.0, upstream=0.75)
    _ce_case(chk, "bfloat16", X, T, rank, bounds, device, dtype="bfloat16", reduction="sum", label_smoothing=0.1)
    _autocast_case(chk, X, T, rank, bounds, device)
    _second_order_case(chk, X, T, rank, bounds, device)
    _float16_scaled_case(chk, T, rank, bounds, device, sum(sizes))

    # --- small chunks: the row loops run several times ----------------------
    saved = D._CHUNK_ELEMENTS
    D._CHUNK_ELEMENTS = 2 * max(sizes)  # two rows per chunk on the widest slice
    try:
        _ce_case(chk, "row chunks", X, T, rank, bounds, device, reduction="none", upstream=rng.standard_normal(N),
                 label_smoothing=0.3, z_loss=1e-2, softcap=3.0)
    finally:
        D._CHUNK_ELEMENTS = saved

    # --- the stated layout, the hot path, slices in non-rank order ----------
    T = _targets(rng, N, V)
    _ce_case(chk, "vocab_sizes + vocab_size", X, T, rank, bounds, device,
             layout_kwargs=dict(vocab_sizes=list(sizes), vocab_size=V))
    _ce_case(chk, "validate=False + vocab_sizes", X, T, rank, bounds, device, validate=False,
             layout_kwargs=dict(vocab_sizes=list(sizes)), label_smoothing=0.1)
    _ce_case(chk, "validate=False from cache", X, T, rank, bounds, device, validate=False, reduction="sum")
    order = list(reversed(range(world)))
    pb = _bounds(sizes, order)
    _ce_case(chk, "vocab_start, reversed order", X, T, rank, pb, device, label_smoothing=0.1,
             layout_kwargs=dict(vocab_start=pb[rank][0]))
    _ce_case(chk, "validate=False, vocab_start + vocab_sizes", X, T, rank, pb, device, validate=False,
             reduction="sum", layout_kwargs=dict(vocab_start=pb[rank][0], vocab_sizes=list(sizes)))

    # --- no grad: the loss alone --------------------------------------------
    s, e = bounds[rank]
    with torch.no_grad():
        x = torch.tensor(X[:, s:e], device=device, requires_grad=True)
        loss = D.vocab_parallel_cross_entropy(x, torch.from_numpy(T).to(device), z_loss=1e-2)
    chk.close("no_grad loss", _np(loss), R.cross_entropy(X, T, z_loss=1e-2))
    chk.true("no_grad: no graph", loss.grad_fn is None)

    # --- bad layouts and bad targets raise on every rank, and the group ------
    # --- stays usable afterwards ---------------------------------------------
    x = torch.tensor(X[:, s:e], device=device)
    t = torch.from_numpy(_targets(rng, N, V)).to(device)
    f = D.vocab_parallel_cross_entropy
    wrong = list(sizes)
    wrong[-1] += 1
    chk.raises("vocab_sizes wrong", lambda: f(x, t, vocab_sizes=wrong), "vocab_sizes=")
    chk.raises("vocab_sizes length", lambda: f(x, t, vocab_sizes=list(sizes) + [1]), "one entry per rank")
    chk.raises("vocab_size wrong", lambda: f(x, t, vocab_size=V + 1), f"vocab_size={V + 1}")
    tb = t.clone()
    tb[2] = V
    chk.raises("target == V", lambda: f(x, tb, reduction="sum"), f"class index {V}", index_error=True)
    tb = t.clone()
    tb[0] = -5
    chk.raises("target < 0", lambda: f(x, tb), "class index -5", index_error=True)
    tb = torch.full_like(t, -1)  # every valid target negative (padding as -1, ignore_index -100)
    tb[0] = -100
    chk.raises("all targets < 0", lambda: f(x, tb), "class index -1", index_error=True)
    chk.raises("float target", lambda: f(x, t.double()), "integer class indices")
    try:  # a local argument error: before any collective, so raised alone
        f(x, t, group="x")
        chk.true("group of a bad type", False, "no error")
    except TypeError as e:
        chk.true("group of a bad type", "group must be a torch.distributed ProcessGroup" in str(e), str(e))
    if world > 1:
        tb = t.clone()
        if rank == 1:
            tb[1] = (int(t[1]) + 1) % V
        chk.raises("targets differ between ranks", lambda: f(x, tb), "targets differ")
        tb = t.clone()
        tb[:3] = torch.tensor([3, 0, 3] if rank == 1 else [2, 2, 2])  # offsets +1 -2 +1: the same plain sum
        chk.raises("targets differ by offsetting rows", lambda: f(x, tb), "targets differ")
        tshape = t if rank != 1 else t[:-1]
        chk.raises("target shape on one rank", lambda: f(x, tshape), "rank 1: target's shape")
        chk.raises("vocab_start on one rank", lambda: f(x, t, vocab_start=0 if rank == 0 else None),
                   "every rank or on none")
        if min(sizes) > 0:
            chk.raises("overlapping slices", lambda: f(x, t, vocab_start=0), "do not tile")
        # a dtype or options that differ between ranks: collectives of different sizes (a process abort in
        # gloo) or different losses on each rank, before validation compared them
        chk.raises("dtype on one rank", lambda: f(x.float() if rank == 1 else x, t), "rank 1's tensors are float32")
        for name, opt in (("label_smoothing", dict(label_smoothing=0.1)), ("ignore_index", dict(ignore_index=3)),
                          ("reduction", dict(reduction="sum"))):
            chk.raises(f"{name} on one rank", lambda: f(x, t, **(opt if rank == 1 else {})),
                       "rank 1 was given other options")
        hd = torch.tensor(rng.standard_normal((4, 3)), device=device)
        wd = torch.randn(sizes[rank], 3, dtype=torch.float64, device=device)
        chk.raises("linear: chunk_size on one rank", lambda: D.vocab_parallel_linear_cross_entropy(
            hd, wd, t[:4], chunk_size=2 if rank == 1 else 3), "rank 1 was given other options")
    chk.raises("a gap before the first slice", lambda: f(x, t, vocab_start=1 + sum(sizes[:rank])), "do not tile")
    # linear: weight of the wrong width on one rank
    Hd0 = rng.standard_normal((4, 3))
    w_bad = torch.randn(sizes[rank], 3 if rank != world - 1 else 2, dtype=torch.float64, device=device)
    chk.raises("linear: weight shape", lambda: D.vocab_parallel_linear_cross_entropy(
        torch.tensor(Hd0, device=device), w_bad, t[:4]), f"rank {world - 1}: local_weight")
    T = _targets(rng, N, V)
    _ce_case(chk, "after the errors", X, T, rank, bounds, device, reduction="sum", label_smoothing=0.1)

    # --- vocab-parallel linear cross-entropy --------------------------------
    Hdim = 5
    Hd = rng.standard_normal((N, Hdim))
    W = rng.standard_normal((V, Hdim))
    B = rng.standard_normal(V) * 0.5
    T = _targets(rng, N, V)
    _linear_case(chk, "linear mean", Hd, W, B, T, rank, bounds, device, chunk_size=4, upstream=1.3,
                 label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    _linear_case(chk, "linear sum, no bias", Hd, W, None, T, rank, bounds, device, chunk_size=2, reduction="sum")
    _linear_case(chk, "linear none", Hd, W, B, T, rank, bounds, device, chunk_size=4, reduction="none",
                 upstream=rng.standard_normal(N), label_smoothing=0.2, z_loss=1e-3, softcap=2.0)
    _linear_case(chk, "linear none, default chunk", Hd, W, B, T, rank, bounds, device, reduction="none",
                 upstream=rng.standard_normal(N))
    _linear_case(chk, "linear all ignored sum", Hd, W, B, np.full(N, -100), rank, bounds, device, chunk_size=4,
                 reduction="sum")
    Hd3 = rng.standard_normal((2, 3, Hdim))
    T3 = _targets(rng, 6, V).reshape(2, 3)
    _linear_case(chk, "linear 3-d hidden", Hd3, W, B, T3, rank, bounds, device, chunk_size=5, label_smoothing=0.1)


def _empty_slice_checks(rank: int, world: int, sizes, seed: int, chk: Checker, device: str) -> None:
    """Rank 1 holds no classes (V_local = 0): it still takes part in every
    collective and gets an empty gradient; the others' results are exact."""
    rng = np.random.default_rng(seed + 1)
    sizes = list(sizes)
    sizes[1] = 0
    V = sum(sizes)
    bounds = _bounds(sizes)
    N = 7
    X = rng.standard_normal((N, V)) * 3.0
    for reduction in ("none", "mean"):
        T = _targets(rng, N, V)
        up = rng.standard_normal(N) if reduction == "none" else 1.4
        _ce_case(chk, f"empty slice {reduction}", X, T, rank, bounds, device, reduction=reduction, upstream=up,
                 label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    _ce_case(chk, "empty slice, validate=False", X, T, rank, bounds, device, validate=False,
             layout_kwargs=dict(vocab_sizes=sizes), reduction="sum")
    Hd = rng.standard_normal((N, 4))
    W = rng.standard_normal((V, 4))
    _linear_case(chk, "empty slice linear", Hd, W, rng.standard_normal(V), T, rank, bounds, device, chunk_size=3,
                 label_smoothing=0.1)


def _subgroup_checks(rank: int, world: int, sizes, seed: int, chk: Checker, device: str) -> None:
    """Process groups that are not the world: ranks {0, 2} and {1} of a
    3-rank world, each rank in its own (global rank 2 is rank 1 of its
    group).  Every rank creates both groups, runs the same checks in its
    own, and the two groups run at the same time."""
    import gpuloss.distributed as D
    members = [[0, 2], [1]]
    groups = [dist.new_group(m) for m in members]
    mine = next(i for i, m in enumerate(members) if rank in m)
    group, grank = groups[mine], members[mine].index(rank)
    gsizes = [sizes[r] for r in members[mine]]
    rng = np.random.default_rng(seed + 2 + mine)  # the same stream within a group
    V, bounds, N = sum(gsizes), _bounds(gsizes), 6
    X = rng.standard_normal((N, V)) * 2.0
    T = _targets(rng, N, V)
    g = dict(group=group)
    _ce_case(chk, "subgroup mean", X, T, grank, bounds, device, layout_kwargs=g, label_smoothing=0.1, z_loss=1e-2)
    _ce_case(chk, "subgroup none", X, T, grank, bounds, device, layout_kwargs=g, reduction="none",
             upstream=rng.standard_normal(N), softcap=3.0)
    _ce_case(chk, "subgroup validate=False from cache", X, T, grank, bounds, device, validate=False,
             layout_kwargs=g, reduction="sum")
    _ce_case(chk, "subgroup validate=False + vocab_sizes", X, T, grank, bounds, device, validate=False,
             layout_kwargs=dict(group=group, vocab_sizes=gsizes), label_smoothing=0.2)
    Hd, W, B = rng.standard_normal((N, 4)), rng.standard_normal((V, 4)), rng.standard_normal(V)
    _linear_case(chk, "subgroup linear mean", Hd, W, B, T, grank, bounds, device, chunk_size=4, group=group,
                 label_smoothing=0.1)
    _linear_case(chk, "subgroup linear none", Hd, W, B, T, grank, bounds, device, chunk_size=4, group=group,
                 reduction="none", upstream=rng.standard_normal(N))
    s, e = bounds[grank]
    tb = T.copy()
    tb[1] = V
    chk.raises("subgroup: target == V", lambda: D.vocab_parallel_cross_entropy(
        torch.tensor(X[:, s:e], device=device), torch.from_numpy(tb).to(device), group), f"class index {V}",
        index_error=True)
    other = groups[1 - mine]  # new_group's placeholder on the ranks it leaves out: named, before any collective
    try:
        D.vocab_parallel_cross_entropy(torch.tensor(X[:, s:e], device=device), torch.from_numpy(T).to(device), other)
        chk.true("not a member of the group", False, "no error")
    except ValueError as ex:
        chk.true("not a member of the group", "is not a member of group" in str(ex), str(ex))
    _ce_case(chk, "subgroup NumPy-integer vocab_sizes", X, T, grank, bounds, device,
             layout_kwargs=dict(group=group, vocab_sizes=[np.int64(v) for v in gsizes], vocab_size=np.int32(V)))


def _compare_compiled(chk: Checker, name: str, fn, arrays, rest, explain: bool, backend: str) -> None:
    """``fn(*leaves, *rest)`` and its gradients, eager and under
    ``torch.compile(fullgraph=True)`` (which raises at a graph break), must
    agree; ``explain``: also count the graphs and breaks with dynamo's
    explain."""
    results = []
    for compiled in (False, True):
        leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
        f = torch.compile(fn, fullgraph=True, backend=backend) if compiled else fn
        loss = f(*leaves, *rest)
        loss.backward()
        results.append([loss] + [x.grad for x in leaves])
    for i, (got, want) in enumerate(zip(results[1], results[0])):
        chk.close(f"{name}: compiled {'loss' if i == 0 else f'grad {i - 1}'}", _np(got), _np(want))
    if explain:
        ex = torch._dynamo.explain(fn)(*[torch.tensor(a, requires_grad=True) for a in arrays], *rest)
        chk.true(f"{name}: one graph, no break", ex.graph_count == 1 and ex.graph_break_count == 0,
                 f"{ex.graph_count} graphs, breaks: {ex.break_reasons}")


def _train(step, params, X, Y, group, backend: Optional[str]):
    """Three SGD steps (compiled with ``backend`` unless None); the losses
    and the parameters after them."""
    opt = torch.optim.SGD(params, lr=0.5)
    f = torch.compile(step, fullgraph=True, backend=backend) if backend else step
    losses = []
    for x, y in zip(X, Y):
        opt.zero_grad()
        loss = f(torch.from_numpy(x), torch.from_numpy(y), group)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in params]


def _compile_checks(rank: int, world: int, sizes, seed: int, chk: Checker, device: str,
                    backend: str = "aot_eager") -> None:
    """Both public functions under torch.compile(fullgraph=True), forward and
    backward, on the world group and on another group object over the same
    ranks (which the compiled code must pass on: a recompilation guarded on
    the group), the operators through opcheck, and a compiled training
    step: compiled == eager."""
    sub = dist.new_group(list(range(world)))
    rng = np.random.default_rng(seed)
    _compiled_function_checks(rank, sizes, rng, chk, sub, backend)
    _opcheck_checks(rank, world, sizes, seed, chk, sub)
    _train_step_checks(rank, sizes, rng, seed, chk, sub, backend)


def _compiled_function_checks(rank: int, sizes, rng, chk: Checker, sub, backend: str) -> None:
    import gpuloss.distributed as D
    from gpuloss.distributed import layout
    V, (s, e), N, H = sum(sizes), _bounds(sizes)[rank], 6, 5
    X, Hd = rng.standard_normal((N, V)) * 2.0, rng.standard_normal((N, H))
    W, B = rng.standard_normal((V, H)), rng.standard_normal(V)
    t = torch.from_numpy(_targets(rng, N, V))
    up = torch.from_numpy(rng.standard_normal(N))

    def ce_mean(x, t, group):
        return D.vocab_parallel_cross_entropy(x, t, group, label_smoothing=0.1, z_loss=1e-2, softcap=3.0)

    def ce_none(x, t, group):
        return (D.vocab_parallel_cross_entropy(x, t, group, reduction="none", validate=False) * up).sum()

    def linear_sum(h, w, b, t, group):
        return D.vocab_parallel_linear_cross_entropy(h, w, t, group, local_bias=b, reduction="sum", chunk_size=4,
                                                     label_smoothing=0.1, z_loss=1e-3)

    def linear_none(h, w, b, t, group):
        loss = D.vocab_parallel_linear_cross_entropy(h, w, t, group, local_bias=b, reduction="none", chunk_size=4,
                                                     softcap=2.0)
        return (loss * up).sum()

    cases = [("ce mean", ce_mean, [X[:, s:e]]), ("ce none", ce_none, [X[:, s:e]]),
             ("linear sum", linear_sum, [Hd, W[s:e], B[s:e]]), ("linear none", linear_none, [Hd, W[s:e], B[s:e]])]
    torch._dynamo.reset()
    for group, gname in ((None, "world"), (sub, "subgroup")):
        for name, fn, arrays in cases:
            _compare_compiled(chk, f"{name}, {gname}", fn, arrays, (t, group), group is None, backend)
    # one compiled function, called with each group: the operator must get each one's name (the validating
    # call files its layout in the cache under the name it was given)
    layout._LAYOUT_CACHE.clear()
    f = torch.compile(ce_mean, fullgraph=True, backend=backend)
    for group in (None, sub, None):
        f(torch.tensor(X[:, s:e]), t, group)
    names = sorted({k[0] for k in layout._LAYOUT_CACHE})
    chk.true("compiled calls pass each group's name", names == sorted({dist.group.WORLD.group_name,
                                                                       sub.group_name}), str(names))


def _train_step_checks(rank: int, sizes, rng, seed: int, chk: Checker, sub, backend: str) -> None:
    """Three SGD steps of a replicated body, this rank's rows of the output
    layer and both losses, eager and compiled, on either group."""
    import gpuloss.distributed as D
    V, (s, e), N, H = sum(sizes), _bounds(sizes)[rank], 6, 5
    Xs = rng.standard_normal((3, N, 3))
    Ys = [_targets(rng, N, V) for _ in range(3)]
    W0, B0 = rng.standard_normal((V, H)) * 0.5, rng.standard_normal(V) * 0.1
    for group, gname in ((None, "world"), (sub, "subgroup")):
        runs = []
        for compiled in (False, True):
            torch.manual_seed(seed)  # the same body on every rank and in both runs
            body = torch.nn.Sequential(torch.nn.Linear(3, H), torch.nn.Tanh()).double()
            w, b = torch.nn.Parameter(torch.tensor(W0[s:e])), torch.nn.Parameter(torch.tensor(B0[s:e]))

            def step(x, y, group):
                h = body(x)
                return (D.vocab_parallel_linear_cross_entropy(h, w, y, group, local_bias=b, label_smoothing=0.1)
                        + D.vocab_parallel_cross_entropy(h @ w.t(), y, group, z_loss=1e-2, validate=False))

            torch._dynamo.reset()
            runs.append(_train(step, [*body.parameters(), w, b], Xs, Ys, group, backend if compiled else None))
        (l0, p0), (l1, p1) = runs
        chk.close(f"training step, {gname}: compiled losses", _np(l1), _np(l0))
        for i, (a, c) in enumerate(zip(p1, p0)):
            chk.close(f"training step, {gname}: compiled parameter {i}", _np(a), _np(c))


def _layout_change_checks(rank: int, world: int, seed: int, chk: Checker) -> None:
    """validate=False without vocab_sizes, every rank's V_local changing at each
    step (the documented rule): the layout cache served an older layout of
    the same V_local (rank 0's 4 at the last step came from (4, 6), rank 1's
    from (6, 4)): a wrong loss, or ranks out of step in their collectives."""
    import gpuloss.distributed as D
    rng = np.random.default_rng(seed + 7)
    for sizes in [(4, 6), (6, 4), (7, 7), (4, 4)] if world == 2 else []:
        V = sum(sizes)
        X = rng.standard_normal((5, V))
        T = _targets(rng, 5, V)
        lo = sum(sizes[:rank])
        loss = D.vocab_parallel_cross_entropy(torch.from_numpy(X[:, lo:lo + sizes[rank]]), torch.from_numpy(T),
                                              validate=False)
        chk.close(f"layout change to {sizes}, validate=False", loss.item(), R.cross_entropy(X, T))


def _no_upstream_checks(rank: int, world: int, seed: int, chk: Checker) -> None:
    """The linear loss with reduction="none" all-reduces grad_hidden in
    backward; a rank whose loss gets no upstream gradient (None, autograd no
    longer materialising zeros) must still join, or the others wait forever."""
    import gpuloss.distributed as D
    if world != 2:
        return
    rng = np.random.default_rng(seed + 11)
    sizes, H, N = (3, 5), 4, 6
    lo = sum(sizes[:rank])
    h = torch.from_numpy(rng.standard_normal((N, H))).requires_grad_()
    W = torch.from_numpy(rng.standard_normal((sum(sizes), H)))
    w = W[lo:lo + sizes[rank]].clone().requires_grad_()
    t = torch.from_numpy(_targets(rng, N, sum(sizes)))
    loss = D.vocab_parallel_linear_cross_entropy(h, w, t, reduction="none", chunk_size=4)
    (no_upstream(loss) if rank == 1 else loss).sum().backward()
    chk.true("no upstream gradient on one rank: backward returns on every rank", h.grad is not None)


def _value_checks(rank: int, world: int, sizes, seed: int, chk: Checker, device: str) -> None:
    _all_checks(rank, world, sizes, seed, chk, device)
    _empty_slice_checks(rank, world, sizes, seed, chk, device)
    _layout_change_checks(rank, world, seed, chk)
    _no_upstream_checks(rank, world, seed, chk)
    if world == 3:
        _subgroup_checks(rank, world, sizes, seed, chk, device)


def _opcheck(chk: Checker, name: str, op, args) -> None:
    """torch.library.opcheck: the schema, the autograd registration, the fake
    implementation against the real one (shapes, dtypes, strides) and an
    AOT-dispatch run with dynamic shapes.  Every rank makes the same calls,
    so the operators' collectives stay in step."""
    chk.checks += 1
    try:
        res = torch.library.opcheck(op, args)
    except Exception as e:  # noqa: BLE001 - recorded, the other ranks go on alike
        chk.failures.append(f"rank {chk.rank}: {name}: {e}")
        return
    if any(v != "SUCCESS" for v in res.values()):
        chk.failures.append(f"rank {chk.rank}: {name}: {res}")


def _opcheck_checks(rank: int, world: int, sizes, seed: int, chk: Checker, group) -> None:
    """The three operators through opcheck, as the public functions call them
    (and with a gradient not asked for)."""
    ops = torch.ops.gpuloss
    rng = np.random.default_rng(seed + 4)
    V, (s, e) = sum(sizes), _bounds(sizes)[rank]
    name = group.group_name
    t = torch.from_numpy(_targets(rng, 6, V)).reshape(2, 3)
    x = torch.tensor(rng.standard_normal((2, 3, V))[..., s:e], requires_grad=True)
    h = torch.tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    w = torch.tensor(rng.standard_normal((V, 4))[s:e], requires_grad=True)
    b = torch.tensor(rng.standard_normal(V)[s:e], requires_grad=True)
    layout = (name, None, list(sizes), None)
    for reduction, want in (("mean", True), ("none", True), ("sum", False)):
        _opcheck(chk, f"opcheck ce {reduction} want_grad={want}", ops.vocab_parallel_cross_entropy,
                 (x, t, *layout, True, -100, reduction, 0.1, 1e-2, 3.0, 1 << 24, want))
    for reduction in ("sum", "none"):
        _opcheck(chk, f"opcheck linear {reduction}", ops.vocab_parallel_linear_cross_entropy,
                 (h, w, b, t, *layout, True, -100, reduction, 0.1, 0.0, None, 4, 1 << 24, True, True, True))
    lse = torch.from_numpy(rng.standard_normal(6) + 3.0)
    go = torch.from_numpy(rng.standard_normal((2, 3)))
    _opcheck(chk, "opcheck linear backward", ops.vocab_parallel_linear_cross_entropy_backward,
             (h.detach(), w.detach(), b.detach(), t, lse, go, *layout, -100, "none", 0.1, 0.0, None, 4, 1 << 24,
              True, True, False))


def _dtensor_checks(rank: int, world: int, sizes, seed: int, chk: Checker, device: str) -> None:
    """Every public function on DTensor inputs, replicated and sharded along
    the batch, against torch's functions on the full tensors: the loss and
    each gradient, a DTensor."""
    import torch.nn.functional as F
    import gpuloss
    import gpuloss.torch_ops as T
    chk.true("not registered before DTensor is loaded", not T._DTENSOR_SHARDING)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh(device, (world,))
    g = torch.Generator().manual_seed(seed)
    N, C, H = 4 * world, 7, 5
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (N,), generator=g)
    t[1] = -100
    p = torch.rand(N, C, generator=g, dtype=torch.float64).softmax(-1)
    y = (torch.rand(N, C, generator=g) > 0.5).double()
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    W = torch.randn(C, H, generator=g, dtype=torch.float64)
    calls = {  # name: (function of (gpuloss or F, x, target, class weight), target)
        "cross_entropy": (lambda M, a, b, w: M.cross_entropy(a, b, w, label_smoothing=0.1), t),
        "cross_entropy none": (lambda M, a, b, w: M.cross_entropy(a, b, reduction="none"), t),
        "cross_entropy probs": (lambda M, a, b, w: M.cross_entropy(a, b), p),
        "nll_loss": (lambda M, a, b, w: M.nll_loss(a.log_softmax(-1), b, w), t),
        "softmax": (lambda M, a, b, w: M.softmax(a, -1) * b, p),
        "log_softmax dim 0": (lambda M, a, b, w: M.log_softmax(a, 0) * b, p),
        "kl_div": (lambda M, a, b, w: M.kl_div(a.log_softmax(-1), b, reduction="batchmean"), p),
        "bce_with_logits": (lambda M, a, b, w: M.binary_cross_entropy_with_logits(a, b, pos_weight=w), y),
        "bce": (lambda M, a, b, w: M.binary_cross_entropy(a.sigmoid(), b), y),
        "mse_loss none": (lambda M, a, b, w: M.mse_loss(a, b, reduction="none"), p),
    }
    wd = distribute_tensor(w, mesh, [Replicate()])
    for placement in (Replicate(), Shard(0)):
        for name, (fn, target) in calls.items():
            what = f"{name} {placement}"
            xd = distribute_tensor(x, mesh, [placement]).requires_grad_()
            td = distribute_tensor(target, mesh, [placement])
            ours = fn(gpuloss, xd, td, wd)  # every tensor argument a DTensor, as DTensor requires
            xw = x.clone().requires_grad_()
            want = fn(F, xw, target, w)
            chk.true(f"{what}: a DTensor", isinstance(ours, DTensor), type(ours).__name__)
            chk.close(f"{what}: loss", ours.full_tensor().detach(), want.detach())
            up = torch.randn(want.shape, generator=g, dtype=torch.float64)
            ours.backward(distribute_tensor(up, mesh, [Replicate()]) if ours.dim() else None)
            want.backward(up if want.dim() else None)
            chk.close(f"{what}: grad", xd.grad.full_tensor(), xw.grad)
        # the fused linear cross-entropy: hidden states by placement, the weight replicated
        hd = distribute_tensor(h, mesh, [placement]).requires_grad_()
        Wd = distribute_tensor(W, mesh, [Replicate()]).requires_grad_()
        ours = gpuloss.linear_cross_entropy(hd, Wd, distribute_tensor(t, mesh, [placement]), chunk_size=3)
        hw, Ww = h.clone().requires_grad_(), W.clone().requires_grad_()
        want = F.cross_entropy(hw @ Ww.T, t)
        chk.close(f"linear_cross_entropy {placement}: loss", ours.full_tensor().detach(), want.detach())
        ours.backward()
        want.backward()
        chk.close(f"linear_cross_entropy {placement}: grad_input", hd.grad.full_tensor(), hw.grad)
        chk.close(f"linear_cross_entropy {placement}: grad_weight", Wd.grad.full_tensor(), Ww.grad)
    # (N, C, d) logits sharded unevenly along the batch: gathered before the layout steps (moving the class
    # dimension, flattening rows), which DTensor refuses on uneven shards
    N3 = 2 * world + 1
    x3 = torch.randn(N3, C, 3, generator=g, dtype=torch.float64)
    t3 = torch.randint(0, C, (N3, 3), generator=g)
    p3 = torch.rand(N3, C, 3, generator=g, dtype=torch.float64)
    calls3 = {
        "cross_entropy": (lambda M, a, b: M.cross_entropy(a, b, label_smoothing=0.1, reduction="sum"), t3),
        "nll_loss": (lambda M, a, b: M.nll_loss(a, b), t3),
        "log_softmax dim 1": (lambda M, a, b: (M.log_softmax(a, 1) * b).sum(), p3),
        "kl_div": (lambda M, a, b: M.kl_div(a, b, reduction="batchmean"), p3),
        "bce_with_logits": (lambda M, a, b: M.binary_cross_entropy_with_logits(a, b), p3),
        "mse_loss": (lambda M, a, b: M.mse_loss(a, b, reduction="sum"), p3),
    }
    for name, (fn, target) in calls3.items():
        what = f"{name} (N, C, d) uneven Shard(0)"
        xd = distribute_tensor(x3, mesh, [Shard(0)]).requires_grad_()
        try:
            ours = fn(gpuloss, xd, distribute_tensor(target, mesh, [Shard(0)]) if name != "log_softmax dim 1"
                      else distribute_tensor(target, mesh, [Replicate()]))
            ours.backward()
        except RuntimeError as e:
            chk.true(f"{what}: computes", False, str(e)[:300])
            continue
        xw = x3.clone().requires_grad_()
        want = fn(F if name != "log_softmax dim 1" else torch, xw, target)
        want.backward()
        chk.close(f"{what}: loss", ours.full_tensor().detach(), want.detach())
        chk.close(f"{what}: grad", xd.grad.full_tensor(), xw.grad)
    chk.true("registered", T._DTENSOR_SHARDING)
    # logits sharded along the classes (tensor parallelism, torch's loss_parallel): the vocabulary-parallel
    # loss on each rank's shard, never gathered; the gradient keeps the logits' sharding
    for C_ in (C, 2 * world - 1, world + 1):  # DTensor's shards of C_ classes: even, uneven, one short or empty
        xs = torch.randn(N, C_, generator=g, dtype=torch.float64)
        ts = torch.randint(0, C_, (N,), generator=g)
        ts[0] = -100
        for kw in (dict(), dict(label_smoothing=0.2, reduction="sum"), dict(reduction="none", ignore_index=1),
                   dict(z_loss=1e-2, softcap=2.0)):
            ii = kw.get("ignore_index", -100)
            tt = torch.where(ts == -100, ii, ts)  # row 0 ignored whatever the ignore_index
            for target_kind in ("replicated", "plain"):
                what = f"class-sharded C={C_} {kw} {target_kind}"
                xd = distribute_tensor(xs, mesh, [Shard(1)]).requires_grad_()
                td = distribute_tensor(tt, mesh, [Replicate()]) if target_kind == "replicated" else tt
                ours = gpuloss.cross_entropy(xd, td, **kw)
                xw = xs.clone().requires_grad_()
                want = gpuloss.cross_entropy(xw, tt, **kw)  # plain tensors (checked against torch elsewhere)
                chk.true(f"{what}: replicated", isinstance(ours, DTensor) and ours.placements == (Replicate(),))
                chk.close(f"{what}: loss", ours.full_tensor().detach(), want.detach())
                up = torch.randn(want.shape, generator=g, dtype=torch.float64)
                # the gradient as the loss gives it (torch 2.11's AccumulateGrad replicates an unevenly sharded
                # leaf's .grad; later versions keep the sharding)
                gx, = torch.autograd.grad(ours, xd, distribute_tensor(up, mesh, [Replicate()]) if ours.dim() else None)
                want.backward(up if want.dim() else None)
                chk.true(f"{what}: grad sharded as the logits", gx.placements == (Shard(1),))
                chk.close(f"{what}: grad", gx.full_tensor(), xw.grad)
    # the projection weight (and bias) sharded along the classes: the vocabulary-parallel linear loss
    for C_ in (C, 2 * world - 1):
        Ws = torch.randn(C_, H, generator=g, dtype=torch.float64)
        bs = torch.randn(C_, generator=g, dtype=torch.float64)
        ts = torch.randint(0, C_, (N,), generator=g)
        ts[1] = -100
        for kw, with_bias, h_kind in ((dict(), False, "plain"), (dict(label_smoothing=0.1, reduction="sum"), True,
                                                                "replicated"),
                                      (dict(reduction="none", chunk_size=3, z_loss=1e-2), True, "plain")):
            what = f"weight-sharded C={C_} {kw} bias={with_bias} hidden {h_kind}"
            Wd = distribute_tensor(Ws, mesh, [Shard(0)]).requires_grad_()
            bd = distribute_tensor(bs, mesh, [Shard(0)]).requires_grad_() if with_bias else None
            hp = h.clone().requires_grad_()
            hd = distribute_tensor(hp.detach(), mesh, [Replicate()]).requires_grad_() if h_kind == "replicated" else hp
            ours = gpuloss.linear_cross_entropy(hd, Wd, ts, linear_bias=bd, **kw)
            hw, Ww, bw = h.clone().requires_grad_(), Ws.clone().requires_grad_(), bs.clone().requires_grad_()
            want = gpuloss.linear_cross_entropy(hw, Ww, ts, linear_bias=bw if with_bias else None, **kw)
            chk.true(f"{what}: replicated", isinstance(ours, DTensor) and ours.placements == (Replicate(),))
            chk.close(f"{what}: loss", ours.full_tensor().detach(), want.detach())
            up = torch.randn(want.shape, generator=g, dtype=torch.float64)
            wrt = (hd, Wd) + ((bd,) if with_bias else ())
            grads = torch.autograd.grad(ours, wrt, distribute_tensor(up, mesh, [Replicate()]) if ours.dim() else None)
            want.backward(up if want.dim() else None)
            chk.true(f"{what}: grad_weight sharded", grads[1].placements == (Shard(0),))
            chk.close(f"{what}: grad_weight", grads[1].full_tensor(), Ww.grad)
            gh = grads[0].full_tensor() if h_kind == "replicated" else grads[0]
            chk.close(f"{what}: grad_input", gh, hw.grad)
            if with_bias:
                chk.close(f"{what}: grad_bias", grads[2].full_tensor(), bw.grad)
    sharded_step = torch.compile(lambda a, b: gpuloss.cross_entropy(a, b, label_smoothing=0.1), backend="aot_eager",
                                 fullgraph=True)
    xd = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    ours = sharded_step(xd, distribute_tensor(t, mesh, [Replicate()]))
    xw = x.clone().requires_grad_()
    want = F.cross_entropy(xw, t, label_smoothing=0.1)
    chk.close("class-sharded compiled: loss", ours.full_tensor().detach(), want.detach())
    gx, = torch.autograd.grad(ours, xd)
    want.backward()
    chk.true("class-sharded compiled: grad sharded as the logits", gx.placements == (Shard(1),))
    chk.close("class-sharded compiled: grad", gx.full_tensor(), xw.grad)
    bad = t.clone()
    bad[2] = C + 3
    try:
        gpuloss.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]), bad)
        chk.true("class-sharded: an out-of-range target raises", False)
    except ValueError as e:
        chk.true("class-sharded: an out-of-range target raises", "raised on every rank" in str(e), str(e)[:200])
        chk.true("class-sharded: an out-of-range target raises an IndexError, as torch's", isinstance(e, IndexError))
    # compiled (fullgraph): the CPU targets' value checks, assertions inside the graph, take DTensors too
    step = torch.compile(lambda a, b, q: gpuloss.cross_entropy(a, b, label_smoothing=0.1)
                         + gpuloss.binary_cross_entropy(a.sigmoid(), q), backend="aot_eager", fullgraph=True)
    xd = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    ours = step(xd, distribute_tensor(t, mesh, [Shard(0)]), distribute_tensor(y, mesh, [Shard(0)]))
    xw = x.clone().requires_grad_()
    want = F.cross_entropy(xw, t, label_smoothing=0.1) + F.binary_cross_entropy(xw.sigmoid(), y)
    chk.close("compiled: loss", ours.full_tensor().detach(), want.detach())
    ours.backward()
    want.backward()
    chk.close("compiled: grad", xd.grad.full_tensor(), xw.grad)
    bad = t.clone()
    bad[-1] = C  # on the last rank's shard only: every rank's assertion fails
    try:
        step(xd, distribute_tensor(bad, mesh, [Shard(0)]), distribute_tensor(y, mesh, [Shard(0)]))
        chk.true("compiled: a class index out of range raises", False)
    except RuntimeError as e:
        chk.true("compiled: a class index out of range raises", "class index outside" in str(e), str(e)[:200])


#: what a spawned group runs, by name (the name travels to the ranks)
_SUITES = {"checks": _value_checks, "compile": _compile_checks, "dtensor": _dtensor_checks,
           "compile-inductor": functools.partial(_compile_checks, backend="inductor")}


def _worker(rank: int, world: int, port: int, sizes, seed: int, outdir: str, suite: str = "checks") -> None:
    result = {"checks": 0, "failures": [], "error": None}
    chk = Checker(rank)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=PG_TIMEOUT)
        try:
            _SUITES[suite](rank, world, sizes, seed, chk, "cpu")
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        result["error"] = traceback.format_exc()
    result["checks"], result["failures"] = chk.checks, chk.failures
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)


# ---------------------------------------------------------------------------
# the parent side
# ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mp_context():
    """A fork server that imports torch once: each rank is then forked from a
    process with no threads and torch loaded (``spawn`` would import torch
    again in every rank, which dominates this file's time on a loaded CI
    machine)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "numpy", "gpuloss.distributed", "gpuloss.reference",
                                __name__])
    return ctx


def _run_group(sizes, seed: int, outdir, suite: str = "checks") -> list:
    world = len(sizes)
    ctx = _mp_context()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, tuple(sizes), seed, str(outdir), suite), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s"
    results = []
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.pkl")
        assert os.path.exists(path), f"rank {r} wrote no result (exit code {procs[r].exitcode})"
        with open(path, "rb") as fh:
            results.append(pickle.load(fh))
    return results


def _assert_results(results, min_checks: int = 100) -> None:
    for r, res in enumerate(results):
        assert res["error"] is None, f"rank {r} raised:\n{res['error']}"
    failures = [f for res in results for f in res["failures"]]
    assert not failures, "\n".join(failures)
    counts = [res["checks"] for res in results]
    assert len(set(counts)) == 1 and counts[0] > min_checks, f"checks run per rank: {counts}"


@pytest.mark.parametrize("sizes", [(6, 4), (7, 3, 5)], ids=["world2", "world3-uneven"])
def test_vocab_parallel_gloo(sizes, rng, tmp_path):
    """Loss and gradient slices equal the float64 reference for every option,
    uneven slices, a rank with an empty slice, ranks without targets,
    all-ignored batches, errors raised on every rank, the vocab-parallel
    linear cross-entropy, and (3 ranks) groups that are not the world."""
    seed = int(rng.integers(2**31))
    _assert_results(_run_group(sizes, seed, tmp_path))


@pytest.mark.parametrize("backend", [
    "aot_eager",
    pytest.param("inductor", marks=[pytest.mark.slow, pytest.mark.skipif(
        os.environ.get("GPULOSS_SLOW_TESTS") != "1", reason="inductor compile: set GPULOSS_SLOW_TESTS=1")]),
])
def test_vocab_parallel_compile_gloo(rng, tmp_path, backend):
    """torch.compile(fullgraph=True) on a 2-process gloo group: both public
    functions, forward and backward, one graph and no break, on the world
    group and on a non-default group, and a compiled training step; every
    compiled result equal to eager.  ``aot_eager`` checks tracing and the
    autograd graphs; inductor (opt-in: minutes of C++ compilation on two
    cores) also the generated code around the operators."""
    seed = int(rng.integers(2**31))
    suite = "compile" if backend == "aot_eager" else "compile-inductor"
    _assert_results(_run_group((5, 4), seed, tmp_path, suite=suite), min_checks=40)


def test_dtensor_inputs_gloo(rng, tmp_path):
    """DTensor inputs (tensor parallelism's outputs with
    ``use_local_output=False``, replicated or batch-sharded tensors) raised
    DTensor's "does not have a sharding strategy registered" for every
    gpuloss operator.  Each operator now has DTensor's sharding rule
    (``gpuloss.torch_ops.dtensor_sharding``, registered once DTensor is
    loaded): the inputs are replicated, the results are those on the full
    tensors (2-process gloo group).  Logits sharded along the classes
    (torch's ``loss_parallel`` layout) take the vocabulary-parallel loss on
    each shard instead, eager and compiled: never gathered, the gradient
    sharded as the logits."""
    _assert_results(_run_group((4, 4), int(rng.integers(2**31)), tmp_path, suite="dtensor"), min_checks=40)


def _in_process(backend: str, device: str, rng) -> None:
    port = _free_port()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=PG_TIMEOUT)
    chk = Checker(0)
    try:
        _all_checks(0, 1, (11,), int(rng.integers(2**31)), chk, device)
    finally:
        dist.destroy_process_group()
    assert not chk.failures, "\n".join(chk.failures)
    assert chk.checks > 100


def test_vocab_parallel_world_size_1_gloo(rng):
    """At world size 1 the function is plain cross-entropy, in this process."""
    _in_process("gloo", "cpu", rng)


@pytest.mark.gpu
@pytest.mark.parametrize("per_rank", ["torch", "triton"])
def test_vocab_parallel_world_size_1_nccl(rng, monkeypatch, per_rank):
    """Both per-rank implementations on CUDA tensors: the chunked torch
    operations (the default) and the fused Triton kernels."""
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs a CUDA device and NCCL")
    monkeypatch.setenv("GPULOSS_VOCAB_PARALLEL_KERNEL", per_rank)
    torch.cuda.set_device(0)
    _in_process("nccl", "cuda", rng)


def test_not_initialised_is_an_error():
    from gpuloss.distributed import vocab_parallel_cross_entropy
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2]))


def test_transforms_are_refused_before_any_collective():
    """torch.func transforms and forward-mode tangents are refused by name (no
    process group needed): torch raised about an internal autograd.Function
    under torch.func, and a dual tensor gave the loss with no tangent at all."""
    import torch.autograd.forward_ad as fwAD
    from gpuloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    x = torch.randn(3, 4, dtype=torch.float64)
    W = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    calls = {"vocab_parallel_cross_entropy": lambda a: vocab_parallel_cross_entropy(a, t),
             "vocab_parallel_linear_cross_entropy": lambda a: vocab_parallel_linear_cross_entropy(a, W, t)}
    for name, call in calls.items():
        with pytest.raises(NotImplementedError, match=f"{name} does not support torch.func"):
            torch.func.grad(call)(x)
        with pytest.raises(NotImplementedError, match=f"{name} does not support torch.func"):
            torch.func.vmap(call)(x[None])
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                call(fwAD.make_dual(x, torch.ones_like(x)))


def test_bad_options_raise_before_any_collective():
    """Option errors are raised before the process group is even needed."""
    from gpuloss.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        vocab_parallel_cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(TypeError, match="loss_dtype must be"):
        vocab_parallel_cross_entropy(x, t, loss_dtype=torch.int64)
    with pytest.raises(TypeError, match="loss_dtype must be"):
        vocab_parallel_linear_cross_entropy(x, x, t, loss_dtype="float32")
    with pytest.raises(ValueError, match="softcap"):
        vocab_parallel_cross_entropy(x, t, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_linear_cross_entropy(x, torch.randn(5, 4, dtype=torch.float64), t, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):  # as the linear cross-entropy's own check
        vocab_parallel_linear_cross_entropy(x, torch.randn(5, 4, dtype=torch.float64), t, chunk_size=1.5)


def test_vocab_parallel_fused_kernels_world_size_1(rng, monkeypatch):
    """The per-rank passes as the fused Triton kernels (kernels/triton/
    vocab_parallel.py): every check of the world-size-1 run, in Triton's
    interpreter on the CPU (on CUDA tensors they run when asked for)."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in Triton's interpreter (TRITON_INTERPRET=1, as CI sets)")
    import gpuloss
    if not gpuloss.backend_status()["triton"][0]:
        pytest.skip("triton backend unavailable")
    monkeypatch.setenv("GPULOSS_VOCAB_PARALLEL_KERNEL", "triton")
    _in_process("gloo", "cpu", rng)


_AOT_VP = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from gpuloss.kernels.triton import vocab_parallel as K
def build(fn, sig, cons):
    sig = dict(sig); sig.update({k: "constexpr" for k in cons})
    c = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cons),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
    assert c.asm["cubin"]
for x, acc in (("*bf16", tl.float32), ("*fp32", tl.float32)):
    build(K.vocab_parallel_stats_kernel,
          {"X_ptr": x, "X_row_stride": "i64", "LT_ptr": "*i64", "Max_ptr": "*fp32", "Sum_ptr": "*fp32",
           "Dt_ptr": "*fp32", "Dsum_ptr": "*fp32", "n_cols": "i32", "softcap": "fp32"},
          dict(BLOCK=4096, HAS_SOFTCAP=True, HAS_SMOOTHING=True, ACC=acc))
    build(K.vocab_parallel_grad_kernel,
          {"X_ptr": x, "X_row_stride": "i64", "G_ptr": x, "G_row_stride": "i64", "LT_ptr": "*i64",
           "Shift_ptr": "*fp32", "LogS_ptr": "*fp32", "Scale_ptr": "*fp32", "n_cols": "i32", "one_minus_eps": "fp32",
           "eps_over_v": "fp32", "z_loss": "fp32", "softcap": "fp32"},
          dict(BLOCK=4096, HAS_SOFTCAP=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, ACC=acc))
print("ok")
"""


def test_vocab_parallel_kernels_compile_for_sm90():
    """The fused per-rank kernels compile for sm_90 (no GPU needed)."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AOT_VP], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("no ptxas for ahead-of-time compilation")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
