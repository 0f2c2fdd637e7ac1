"""The float64 reference: the executable specification of every gpuloss op.

Written for clarity, not speed.  Every function computes in float64 NumPy and
follows ``torch.nn.functional`` exactly where PyTorch has the op (the tests
check agreement to 1e-12 in float64); the gradients are derived by hand below
and checked against central finite differences.

For each loss ``f(input, target, ...)`` there is ``f_grad(..., grad_output=1.0)``
returning ``(grad_input, grad_target)``: the gradient of
``sum(grad_output * f(...))`` with respect to each input, ``grad_target`` being
``None`` where the target is not differentiable (class indices).

The lecture's notation: a network output ``Y = softmax(z)``, a desired output
``d`` (one-hot for classification).

* ``KL(d || Y) = sum_i d_i log(d_i / Y_i)``; for one-hot ``d`` this is the
  cross-entropy ``-log Y_t``, and ``dKL/dz = softmax(z) - d``.
* The L2 divergence ``1/2 ||Y - d||^2`` is ``mse_loss(Y, d, reduction="sum") / 2``;
  its gradient is ``Y - d``.  ``mse_loss`` with the default ``"mean"`` divides
  the squared error by the number of elements instead, and has no 1/2.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

Array = np.ndarray
Grads = Tuple[Array, Optional[Array]]


def _f64(a) -> Array:
    return np.asarray(a, dtype=np.float64)


def _check_reduction(reduction: str, allowed=("none", "mean", "sum")) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def _reduce(loss: Array, reduction: str, divisor=None) -> Array:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.asarray(loss.sum())
    if divisor is None:
        divisor = loss.size
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(loss.sum() / np.float64(divisor))


def _grad_scale(loss_shape, reduction: str, grad_output, divisor=None) -> Array:
    """d(reduced)/d(loss element) times the upstream gradient, shaped like loss."""
    go = _f64(grad_output)
    if reduction == "none":
        return np.broadcast_to(go, loss_shape)
    if reduction == "sum":
        return np.broadcast_to(go, loss_shape)
    if divisor is None:
        divisor = int(np.prod(loss_shape))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.broadcast_to(go / np.float64(divisor), loss_shape)


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------

def logsumexp(x, dim: int = -1) -> Array:
    x = _f64(x)
    m = np.max(x, axis=dim, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # all -inf rows: lse = -inf, not nan
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis=dim) + np.log(np.sum(np.exp(x - m), axis=dim))


def softmax(x, dim: int = -1) -> Array:
    """softmax(x)_i = exp(x_i) / sum_k exp(x_k) along ``dim``."""
    x = _f64(x)
    return np.exp(log_softmax(x, dim))


def log_softmax(x, dim: int = -1) -> Array:
    """``(x - max) - log(sum exp(x - max))``: formed relative to the row's
    maximum, not as ``x - lse``, whose ``max + log(sum)`` drops ``log(sum)``
    next to logits near 1e16 and beyond (softmax of ``[0, 1, 2] + 1e30``
    would be ``[1, 1, 1]``, its cross-entropy 0 instead of log 3)."""
    x = _f64(x)
    m = np.max(x, axis=dim, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # all -inf rows: nan, as torch's
        return (x - m) - np.log(np.sum(np.exp(x - m), axis=dim, keepdims=True))


def softmax_backward(y, dy, dim: int = -1) -> Array:
    """Given y = softmax(x) and dL/dy, dL/dx = y * (dy - sum(dy * y))."""
    y, dy = _f64(y), _f64(dy)
    return y * (dy - np.sum(dy * y, axis=dim, keepdims=True))


def log_softmax_backward(y, dy, dim: int = -1) -> Array:
    """Given y = log_softmax(x) and dL/dy, dL/dx = dy - exp(y) * sum(dy)."""
    y, dy = _f64(y), _f64(dy)
    return dy - np.exp(y) * np.sum(dy, axis=dim, keepdims=True)


# --------------------------------------------------------------------------
# layout: class dimension 1 -> rows of C
# --------------------------------------------------------------------------

def _rows(input: Array) -> Tuple[Array, tuple]:
    """(M, C) rows with the class dim last, and the shape to undo it.

    ``(C,)`` is one row; ``(N, C)`` is N rows; ``(N, C, d1, ...)`` has the
    class dimension 1, as in PyTorch."""
    if input.ndim == 1:
        return input[None, :], ("1d", input.shape)
    if input.ndim == 2:
        return input, ("2d", input.shape)
    moved = np.moveaxis(input, 1, -1)
    return moved.reshape(-1, input.shape[1]), ("nd", moved.shape)


def _unrows(rows: Array, layout) -> Array:
    kind, shape = layout
    if kind == "1d":
        return rows[0]
    if kind == "2d":
        return rows
    return np.moveaxis(rows.reshape(shape), -1, 1)


def _row_values(v: Array, layout) -> Array:
    """Per-row values (M,) back to the target's shape."""
    kind, shape = layout
    if kind == "1d":
        return v.reshape(())
    if kind == "2d":
        return v
    return v.reshape(shape[:-1])


def _target_rows(target: Array, layout) -> Array:
    return np.asarray(target).reshape(-1)


# --------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------

def _ce_parts(input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
    x = _f64(input)
    rows, layout = _rows(x)
    M, C = rows.shape
    z = softcap * np.tanh(rows / softcap) if softcap is not None else rows
    lse = logsumexp(z, -1)
    logp = log_softmax(z, -1)  # max-relative: exact next to large offsets, where z - lse is not
    w = np.ones(C) if weight is None else _f64(weight)
    prob = np.issubdtype(np.asarray(target).dtype, np.floating)
    eps = float(label_smoothing)
    if prob:
        t_rows, _ = _rows(_f64(target))
        t_s = t_rows * (1.0 - eps) + eps / C
        loss = -(logp * t_s * w).sum(-1) + z_loss * lse ** 2
        divisor = M
        valid = np.ones(M, bool)
        return dict(rows=rows, layout=layout, z=z, lse=lse, logp=logp, w=w, prob=True, t_rows=t_rows,
                    t_s=t_s, loss=loss, divisor=divisor, valid=valid, eps=eps, C=C)
    t = _target_rows(target, layout).astype(np.int64)
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    if np.any((tt < 0) | (tt >= C)):
        raise ValueError(f"target values must be in [0, {C}) or ignore_index={ignore_index}")
    wt = w[tt] * valid
    # select, never multiply by the mask: a -inf logit must not turn an
    # ignored row (or an unused smoothing term) into 0 * inf = nan
    nll = np.where(valid, -logp[np.arange(M), tt] * wt, 0.0)
    loss = (1.0 - eps) * nll
    if eps > 0:
        loss = loss + (eps / C) * np.where(valid, -(logp * w).sum(-1), 0.0)
    if z_loss:
        loss = loss + np.where(valid, z_loss * lse ** 2, 0.0)
    return dict(rows=rows, layout=layout, z=z, lse=lse, logp=logp, w=w, prob=False, t=tt, valid=valid,
                wt=wt, loss=loss, divisor=wt.sum(), eps=eps, C=C)


def cross_entropy(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None) -> Array:
    """``torch.nn.functional.cross_entropy``, plus ``z_loss`` and ``softcap``.

    Class-index targets, per row i with p = softmax(z), w the class weights,
    eps the label smoothing, ignored rows contributing 0::

        loss_i = (1 - eps) * w[t_i] * (-log p[t_i])
                 + eps / C * sum_c w[c] * (-log p[c])
                 + z_loss * lse_i ** 2

    ``"mean"`` divides the sum by ``sum_i w[t_i]`` over non-ignored rows (so an
    all-ignored batch gives nan, as in PyTorch).  Probability targets d:
    ``loss_i = -sum_c w[c] * ((1 - eps) d_c + eps / C) * log p_c + z_loss * lse_i**2``
    and ``"mean"`` divides by the number of rows.  ``softcap`` replaces every
    logit by ``softcap * tanh(z / softcap)`` first; lse is of the capped logits.
    """
    _check_reduction(reduction)
    P = _ce_parts(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    loss = _row_values(P["loss"], P["layout"])
    return _reduce(loss, reduction, P["divisor"])


def cross_entropy_grad(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                       label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                       grad_output=1.0) -> Grads:
    """Gradients of :func:`cross_entropy`.

    With p = softmax(z), W = sum_c w[c], s_i the upstream gradient of row i
    (times 1/divisor for "mean"), for a non-ignored class-index row::

        dL/dz = s_i * [ (1 - eps) w[t] (p - onehot(t)) + eps / C (W p - w)
                        + 2 z_loss lse p ]

    for probability targets (d~ the smoothed target)::

        dL/dz = s_i * [ sum_c(w d~) p - w d~ + 2 z_loss lse p ],
        dL/dd = -s_i * (1 - eps) * w * log p

    and through the softcap ``dz/dx = 1 - tanh(x / cap)**2``.
    """
    _check_reduction(reduction)
    P = _ce_parts(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    M, C = P["rows"].shape
    loss_shape = _row_values(P["loss"], P["layout"]).shape
    s = _grad_scale(loss_shape, reduction, grad_output, P["divisor"]).reshape(-1)
    p = np.exp(P["logp"])
    w, eps, lse = P["w"], P["eps"], P["lse"]
    if P["prob"]:
        wd = w * P["t_s"]
        dz = wd.sum(-1, keepdims=True) * p - wd + 2.0 * z_loss * lse[:, None] * p
        dz = dz * s[:, None]
        dt = -(1.0 - eps) * w * P["logp"] * s[:, None]
        grad_t = _unrows(dt, _rows(_f64(target))[1])
    else:
        onehot = np.zeros((M, C))
        onehot[np.arange(M), P["t"]] = 1.0
        dz = ((1.0 - eps) * P["wt"][:, None] * (p - onehot)
              + (eps / C) * (w.sum() * p - w) * P["valid"][:, None]
              + 2.0 * z_loss * lse[:, None] * p * P["valid"][:, None])
        # ignored rows get an exact zero even when the mean divisor is 0 (PyTorch)
        with np.errstate(invalid="ignore"):
            dz = np.where(P["valid"][:, None], dz * s[:, None], 0.0)
        grad_t = None
    if softcap is not None:
        dz = dz * (1.0 - np.tanh(P["rows"] / softcap) ** 2)
    return _unrows(dz, P["layout"]), grad_t


def nll_loss(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean") -> Array:
    """``torch.nn.functional.nll_loss``: loss_i = -w[t_i] * input[i, t_i]."""
    _check_reduction(reduction)
    rows, layout = _rows(_f64(input))
    M, C = rows.shape
    t = _target_rows(target, layout).astype(np.int64)
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    if np.any((tt < 0) | (tt >= C)):
        raise ValueError(f"target values must be in [0, {C}) or ignore_index={ignore_index}")
    w = np.ones(C) if weight is None else _f64(weight)
    wt = w[tt] * valid
    loss = -rows[np.arange(M), tt] * wt
    return _reduce(_row_values(loss, layout), reduction, wt.sum())


def nll_loss_grad(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean",
                  grad_output=1.0) -> Grads:
    rows, layout = _rows(_f64(input))
    M, C = rows.shape
    t = _target_rows(target, layout).astype(np.int64)
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    w = np.ones(C) if weight is None else _f64(weight)
    wt = w[tt] * valid
    loss_shape = _row_values(np.zeros(M), layout).shape
    s = _grad_scale(loss_shape, reduction, grad_output, wt.sum()).reshape(-1)
    g = np.zeros((M, C))
    with np.errstate(invalid="ignore"):
        g[np.arange(M), tt] = np.where(valid, -wt * s, 0.0)
    return _unrows(g, layout), None


# --------------------------------------------------------------------------
# KL divergence
# --------------------------------------------------------------------------

def _xlogy(x: Array, y: Array) -> Array:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0, 0.0, x * np.log(y))


def kl_div(input, target, reduction: str = "mean", log_target: bool = False) -> Array:
    """``torch.nn.functional.kl_div``: ``input`` holds log-probabilities;
    element-wise ``target * (log target - input)`` (``0 log 0 = 0``), or with
    ``log_target`` ``exp(target) * (target - input)``.  ``"batchmean"``
    divides the sum by ``input.shape[0]``; ``"mean"`` by the element count."""
    _check_reduction(reduction, ("none", "mean", "sum", "batchmean"))
    x, t = _f64(input), _f64(target)
    loss = np.exp(t) * (t - x) if log_target else _xlogy(t, t) - t * x
    if reduction == "batchmean":
        return np.asarray(loss.sum() / (x.shape[0] if x.ndim else 1))
    return _reduce(loss, reduction)


def kl_div_grad(input, target, reduction: str = "mean", log_target: bool = False, grad_output=1.0) -> Grads:
    """dL/dinput = -target (or -exp(target)); dL/dtarget = log target + 1 - input
    (or exp(target) * (target - input + 1))."""
    x, t = _f64(input), _f64(target)
    if reduction == "batchmean":
        s = np.broadcast_to(_f64(grad_output) / (x.shape[0] if x.ndim else 1), x.shape)
    else:
        s = _grad_scale(x.shape, reduction, grad_output)
    if log_target:
        et = np.exp(t)
        return -et * s, et * (t - x + 1.0) * s
    with np.errstate(divide="ignore"):
        gt = np.where(t == 0, np.nan, np.log(t) + 1.0 - x)  # torch: xlogy's gradient at 0 is NaN
    return -t * s, gt * s


def kl_div_with_logits(input, target, temperature: float = 1.0, reduction: str = "batchmean",
                       target_is_logits: bool = True) -> Array:
    """The lecture's divergence for distillation, from logits, per row along the
    last axis::

        KL(d || q) = sum_c d_c (log d_c - log q_c),   q = softmax(input / T)

    with ``d = softmax(target / T)`` (``target_is_logits``) or the given
    probabilities.  ``"none"`` gives one value per row; ``"batchmean"`` divides
    the sum by the number of rows (all leading dims: PyTorch's batchmean for
    2-D inputs); ``"mean"`` by the element count.  Gradient in
    :func:`kl_div_with_logits_grad`: ``(sum(d) q - d) / T``, i.e. the lecture's
    ``(softmax(z / T) - d) / T`` for a normalised d.  No ``T**2`` factor is
    applied (multiply by it yourself for Hinton-style distillation)."""
    _check_reduction(reduction, ("none", "mean", "sum", "batchmean"))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x, t = _f64(input), _f64(target)
    logq = log_softmax(x / temperature, -1)
    with np.errstate(invalid="ignore"):  # 0 * -inf, dropped by _no_mass_no_term
        if target_is_logits:
            logd = log_softmax(t / temperature, -1)
            d = np.exp(logd)
            row = np.sum(_no_mass_no_term(d, d * (logd - logq)), axis=-1)
        else:
            d = t
            row = np.sum(_xlogy(d, d) - _no_mass_no_term(d, d * logq), axis=-1)
    # a student row of -inf only has no softmax: NaN (torch's log_softmax), whatever d is
    row = np.where(np.all(np.isneginf(x), axis=-1), np.nan, row)
    if reduction == "none":
        return row
    if reduction == "sum":
        return np.asarray(row.sum())
    if reduction == "batchmean":
        return np.asarray(row.sum() / max(row.size, 0)) if row.size else np.asarray(np.nan)
    return np.asarray(row.sum() / x.size) if x.size else np.asarray(np.nan)


def _no_mass_no_term(d: Array, terms: Array) -> Array:
    """KL(d || q)'s convention 0 log(0 / q) = 0: a class the target gives no
    probability adds nothing, even where the student's logit is -inf (a class
    masked in both), where 0 * -inf would make the row NaN."""
    return np.where(d == 0, 0.0, terms)


# the public name used by gpuloss.functional and the backends
kl_div_logits = kl_div_with_logits


def kl_div_with_logits_grad(input, target, temperature: float = 1.0, reduction: str = "batchmean",
                            target_is_logits: bool = True, grad_output=1.0) -> Grads:
    """dL/dx = s (sum(d) q - d) / T.  Target probabilities: dL/dd = s (log d + 1 - log q).
    Target logits: d = softmax(t / T), so dL/dt = s d (log d - log q - KL) / T."""
    x, t = _f64(input), _f64(target)
    T = float(temperature)
    logq = log_softmax(x / T, -1)
    q = np.exp(logq)
    rows_shape = x.shape[:-1]
    go = _f64(grad_output)
    if reduction == "none":
        s = np.broadcast_to(go, rows_shape)
    elif reduction == "sum":
        s = np.broadcast_to(go, rows_shape)
    elif reduction == "batchmean":
        s = np.broadcast_to(go / max(int(np.prod(rows_shape)), 1), rows_shape)
    else:
        s = np.broadcast_to(go / max(x.size, 1), rows_shape)
    s = s[..., None]
    if target_is_logits:
        logd = log_softmax(t / T, -1)
        d = np.exp(logd)
        with np.errstate(invalid="ignore"):  # 0 * -inf, dropped by _no_mass_no_term
            kl = np.sum(_no_mass_no_term(d, d * (logd - logq)), axis=-1, keepdims=True)
            gt = s * _no_mass_no_term(d, d * (logd - logq - kl)) / T
    else:
        d = t
        with np.errstate(divide="ignore"):
            gt = s * (np.log(d) + 1.0 - logq)
    gx = s * (np.sum(d, axis=-1, keepdims=True) * q - d) / T
    return gx, gt


kl_div_logits_grad = kl_div_with_logits_grad


# --------------------------------------------------------------------------
# binary cross-entropy
# --------------------------------------------------------------------------

def _bce_logits_terms(input, target, pos_weight):
    """(loss, dL/dx, dL/dt) of BCE with logits before the weight, each in the
    form that has no cancellation where its value is small (l1 = log1p(e^-|x|),
    q = sigmoid(-|x|), lw = 1 + (pw - 1) t)::

        x >= 0:  (1 - t) x + lw l1,   (1 - t) - lw q,   (pw - 1) l1 - x
        x <  0:  lw l1 - pw t x,      lw q - pw t,      (pw - 1) l1 - pw x

    torch's single formulas, (1 - t) x + lw softplus(-x) and (1 - t) -
    lw sigmoid(-x), lose all of a value of 4e-18 at x = -40 even in float64."""
    x, t = _f64(input), _f64(target)
    pw = np.float64(1.0) if pos_weight is None else _f64(pos_weight)
    e = np.exp(-np.abs(x))
    l1, q, lw, pos = np.log1p(e), e / (1.0 + e), 1.0 + (pw - 1.0) * t, x >= 0
    with np.errstate(invalid="ignore"):
        # x = -inf: NaN, as torch's -inf + inf (the x < 0 form would give the limit, +inf)
        loss = np.where(pos, (1.0 - t) * x + lw * l1, np.where(x == -np.inf, np.nan, lw * l1 - pw * t * x))
        gx = np.where(pos, (1.0 - t) - lw * q, lw * q - pw * t)
        gt = (pw - 1.0) * l1 - np.where(pos, x, pw * x)
    return loss, gx, gt


def binary_cross_entropy_with_logits(input, target, weight=None, pos_weight=None,
                                     reduction: str = "mean") -> Array:
    """``torch.nn.functional.binary_cross_entropy_with_logits``::

        lw = 1 + (pos_weight - 1) * t        (1 without pos_weight)
        loss = w * ((1 - t) * x + lw * log(1 + exp(-x)))

    evaluated per sign of x (:func:`_bce_logits_terms`), exact where torch's
    float64 evaluation of this formula cancels (t = 0, x << 0).
    (``pos_weight`` broadcasts along the last dimension, ``weight`` against
    the input, as in PyTorch.)"""
    _check_reduction(reduction)
    loss = _bce_logits_terms(input, target, pos_weight)[0]
    if weight is not None:
        loss = loss * _f64(weight)
    return _reduce(loss, reduction)


def binary_cross_entropy_with_logits_grad(input, target, weight=None, pos_weight=None,
                                          reduction: str = "mean", grad_output=1.0) -> Grads:
    """dL/dx = w * ((1 - t) - lw * sigmoid(-x))  (= w (sigmoid(x) - t) without pos_weight);
    dL/dt = w * (-x + (pos_weight - 1) * log(1 + exp(-x))); per sign of x
    (:func:`_bce_logits_terms`)."""
    x, t = _f64(input), _f64(target)
    shape = np.broadcast_shapes(x.shape, t.shape)
    s = _grad_scale(shape, reduction, grad_output)
    _, gx, gt = _bce_logits_terms(input, target, pos_weight)
    if weight is not None:
        gx = gx * _f64(weight)
        gt = gt * _f64(weight)
    return gx * s, gt * s


def binary_cross_entropy(input, target, weight=None, reduction: str = "mean") -> Array:
    """``torch.nn.functional.binary_cross_entropy`` on probabilities; each log
    is clamped at -100 as PyTorch does."""
    _check_reduction(reduction)
    p, t = _f64(input), _f64(target)
    with np.errstate(divide="ignore"):
        lp = np.maximum(np.log(p), -100.0)
        l1p = np.maximum(np.log1p(-p), -100.0)
    loss = -(t * lp + (1.0 - t) * l1p)
    if weight is not None:
        loss = loss * _f64(weight)
    return _reduce(loss, reduction)


# PyTorch's clamp in the BCE gradient is the float32 constant 1e-12.
_BCE_EPS = float(np.float32(1e-12))


def binary_cross_entropy_grad(input, target, weight=None, reduction: str = "mean", grad_output=1.0) -> Grads:
    """PyTorch's gradient: dL/dp = w (p - t) / max(p (1 - p), 1e-12 as float32);
    dL/dt = w (log(1 - p) - log p), unclamped as in PyTorch."""
    p, t = _f64(input), _f64(target)
    s = _grad_scale(np.broadcast_shapes(p.shape, t.shape), reduction, grad_output)
    gp = (p - t) / np.maximum(p * (1.0 - p), _BCE_EPS)
    with np.errstate(divide="ignore"):
        gt = np.log1p(-p) - np.log(p)  # PyTorch does not clamp here
    if weight is not None:
        gp = gp * _f64(weight)
        gt = gt * _f64(weight)
    return gp * s, gt * s


# --------------------------------------------------------------------------
# mean squared error
# --------------------------------------------------------------------------

def mse_loss(input, target, reduction: str = "mean") -> Array:
    """``torch.nn.functional.mse_loss``: (x - t)**2, element-wise.

    The lecture's L2 divergence ``1/2 ||Y - d||^2`` equals
    ``mse_loss(Y, d, reduction="sum") / 2``."""
    _check_reduction(reduction)
    x, t = _f64(input), _f64(target)
    return _reduce((x - t) ** 2, reduction)


def mse_loss_grad(input, target, reduction: str = "mean", grad_output=1.0) -> Grads:
    x, t = _f64(input), _f64(target)
    s = _grad_scale(np.broadcast_shapes(x.shape, t.shape), reduction, grad_output)
    g = 2.0 * (x - t) * s
    return g, -g
