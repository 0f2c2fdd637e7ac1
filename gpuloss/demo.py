"""The lecture's experiment: cross-entropy (KL to a one-hot target) against
the L2 divergence for classification, on real data.

A small MLP (64 -> hidden -> 10, tanh) is trained on scikit-learn's bundled
handwritten digits (8x8 images, 1797 samples; no download) twice from the
same initial weights with the same plain SGD:

* with ``gpuloss.cross_entropy(z, t, return_grad=True)``: the loss and
  ``dDiv/dz = softmax(z) - d`` come from one fused pass;
* with the L2 divergence on the softmax output, ``1/2 ||Y - d||^2`` with
  ``Y = softmax(z)``: ``gpuloss.mse_loss(Y, d, reduction="sum", return_grad=True)``
  gives ``2 (Y - d)`` (halved below), and ``gpuloss.softmax_backward`` carries
  it back through the softmax.

The model code is written once against an array module ``xp`` (NumPy here,
CuPy on a GPU), using gpuloss's fused gradients for the losses.  It prints the
loss and test accuracy per epoch and saves a PNG of both curves.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import numpy as np

import gpuloss


def _array_module(name: str):
    if name == "numpy":
        return np
    if name == "cupy":
        import cupy
        return cupy
    raise ValueError(f"unknown array module {name!r}")


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(X))
    n_test = int(len(X) * test_fraction)
    te, tr = idx[:n_test], idx[n_test:]
    return X[tr], y[tr].astype(np.int64), X[te], y[te].astype(np.int64)


def init_params(xp, n_in: int, n_hidden: int, n_out: int, seed: int) -> Dict[str, object]:
    rng = np.random.default_rng(seed)
    p = {
        "W1": rng.standard_normal((n_in, n_hidden)) / np.sqrt(n_in),
        "b1": np.zeros(n_hidden),
        "W2": rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden),
        "b2": np.zeros(n_out),
    }
    return {k: xp.asarray(v, dtype=xp.float32) for k, v in p.items()}


def forward(xp, p, X):
    h = xp.tanh(X @ p["W1"] + p["b1"])
    z = h @ p["W2"] + p["b2"]
    return h, z


def loss_and_dz(xp, loss: str, z, t, d):
    """The loss (mean over the batch) and its gradient w.r.t. the logits z."""
    n = z.shape[0]
    if loss == "ce":
        # KL(d || softmax(z)) for one-hot d is the cross-entropy; one fused pass
        out = gpuloss.cross_entropy(z, t, return_grad=True)
        return float(out.loss), out.grad
    Y = gpuloss.softmax(z, dim=1)
    out = gpuloss.mse_loss(Y, d, reduction="sum", return_grad=True)
    L = 0.5 * float(out.loss) / n                 # 1/2 ||Y - d||^2, batch mean
    dY = 0.5 * out.grad / n                       # = (Y - d) / n
    return L, gpuloss.softmax_backward(dY, Y, dim=1)


def sgd_step(xp, p, X, h, dz, lr):
    dW2 = h.T @ dz
    db2 = dz.sum(0)
    dh = (dz @ p["W2"].T) * (1 - h * h)
    dW1 = X.T @ dh
    db1 = dh.sum(0)
    for k, g in (("W1", dW1), ("b1", db1), ("W2", dW2), ("b2", db2)):
        p[k] -= lr * g


def train(xp, loss: str, data, epochs: int, lr: float, batch: int, hidden: int, seed: int, progress=None):
    Xtr, ytr, Xte, yte = (xp.asarray(a) for a in data)
    p = init_params(xp, Xtr.shape[1], hidden, 10, seed)
    eye = xp.eye(10, dtype=xp.float32)
    rng = np.random.default_rng(seed + 1)
    hist: Dict[str, List[float]] = {"loss": [], "test_acc": [], "train_acc": []}
    n = Xtr.shape[0]
    for epoch in range(epochs):
        order = xp.asarray(rng.permutation(n))
        total = 0.0
        for s in range(0, n, batch):
            ix = order[s:s + batch]
            X, t = Xtr[ix], ytr[ix]
            h, z = forward(xp, p, X)
            L, dz = loss_and_dz(xp, loss, z, t, eye[t])
            total += L * X.shape[0]
            sgd_step(xp, p, X, h, dz, lr)
        hist["loss"].append(total / n)
        hist["test_acc"].append(float((forward(xp, p, Xte)[1].argmax(1) == yte).mean()))
        hist["train_acc"].append(float((forward(xp, p, Xtr)[1].argmax(1) == ytr).mean()))
        if progress:
            progress(loss, epoch, hist)
    return hist


def _bar(done: int, total: int, width: int = 24) -> str:
    k = int(width * done / total)
    return "[" + "#" * k + "." * (width - k) + f"] {done}/{total}"


def plot(histories: Dict[str, Dict[str, List[float]]], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'gpuloss[demo]')")
        return False
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"ce": "cross-entropy (KL to one-hot)", "l2": "L2 on softmax output"}
    for name, h in histories.items():
        ep = np.arange(1, len(h["loss"]) + 1)
        ax[0].plot(ep, h["test_acc"], label=labels[name])
        ax[1].plot(ep, h["loss"], label=labels[name])
    ax[0].set(xlabel="epoch", ylabel="test accuracy", title="Digits MLP: test accuracy")
    ax[1].set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss (each its own divergence)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _verdict(ce_epochs, l2_epochs, level: float) -> str:
    """What the epochs each loss took to reach ``level`` (None: never) say
    about the lecture's claim."""
    if ce_epochs is None and l2_epochs is None:
        return f"neither reached {level:.0%} test accuracy: train longer (--epochs) to test the lecture's claim"
    if ce_epochs is not None and (l2_epochs is None or ce_epochs < l2_epochs):
        return "supports the lecture: cross-entropy (KL) converges faster than L2 here"
    if ce_epochs == l2_epochs:
        return "a tie at this level: the lecture's claim is not shown here"
    return "does NOT support the lecture's claim here: L2 got there first"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpuloss demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--xp", choices=["auto", "numpy", "cupy"], default="auto",
                    help="array module (auto: CuPy when a GPU backend serves it, else NumPy)")
    ap.add_argument("--out", default="gpuloss-demo.png", help="PNG of the curves")
    args = ap.parse_args(argv)

    name = args.xp
    if name == "auto":
        name = "numpy"
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0 and gpuloss.backend_status()["cupy"][0]:
                name = "cupy"
        except Exception:
            pass
    xp = _array_module(name)
    data = load_digits_split(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, 8x8, 10 classes; array module: {name}; "
          f"MLP 64-{args.hidden}-10, SGD lr={args.lr}, batch {args.batch}, {args.epochs} epochs")

    tty = sys.stdout.isatty()

    def progress(loss, epoch, hist):
        line = (f"  {loss:>2} {_bar(epoch + 1, args.epochs)}  loss {hist['loss'][-1]:.4f}  "
                f"test acc {hist['test_acc'][-1]:.3f}")
        if tty:  # redraw one line in a terminal; a log gets every tenth epoch
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
        elif (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(line, end="" if epoch + 1 == args.epochs else "\n")

    histories = {}
    for loss in ("ce", "l2"):
        t0 = time.perf_counter()
        histories[loss] = train(xp, loss, data, args.epochs, args.lr, args.batch, args.hidden, args.seed, progress)
        print(f"  ({time.perf_counter() - t0:.1f} s)")

    print("\nepoch | CE loss  CE test acc | L2 loss  L2 test acc")
    for e in range(args.epochs):
        c, l = histories["ce"], histories["l2"]
        print(f"{e + 1:5d} | {c['loss'][e]:.4f}   {c['test_acc'][e]:.3f}      | {l['loss'][e]:.4f}   "
              f"{l['test_acc'][e]:.3f}")

    def first_reaching(h, level):
        return next((i + 1 for i, a in enumerate(h["test_acc"]) if a >= level), None)

    level = 0.9
    ce_e, l2_e = first_reaching(histories["ce"], level), first_reaching(histories["l2"], level)
    print(f"\nepochs to reach {level:.0%} test accuracy: cross-entropy {ce_e or 'never'}, L2 {l2_e or 'never'}")
    verdict = _verdict(ce_e, l2_e, level)
    print(f"final test accuracy: cross-entropy {histories['ce']['test_acc'][-1]:.3f}, "
          f"L2 {histories['l2']['test_acc'][-1]:.3f}\nverdict: {verdict}")
    if plot(histories, args.out):
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
