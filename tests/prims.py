"""Calling a backend's launchers from tests in keyword form.

``prim(impl, "cross_entropy", x, t, weight=w, ignore_index=-100,
reduction="mean", want_grad=True)`` builds the op's options record and
``Want`` from the keywords (gpuloss.ops), so a test reads like the math; the
launcher itself is called exactly as gpuloss calls it."""
from __future__ import annotations

import dataclasses

from gpuloss.ops import OPS


def prim(impl, op: str, *arrays, **kw):
    spec = OPS[op]
    arrs = list(arrays) + [kw.pop(name, None) for name in spec.arrays[len(arrays):]]
    fields = {f.name for f in dataclasses.fields(spec.options)}
    opts = spec.options(**{k: kw.pop(k) for k in list(kw) if k in fields})
    if spec.want is None:
        assert not kw, f"unknown arguments {sorted(kw)} for {op}"
        return getattr(impl, op)(*arrs, opts)
    want = spec.want(**{w: kw.pop("want_" + w, False) for w in spec.want._fields})
    assert not kw, f"unknown arguments {sorted(kw)} for {op}"
    return getattr(impl, op)(*arrs, opts, want)


def on_threads_and_streams(n: int, call, repeats: int = 3, timeout: float = 300.0, streams: bool = True) -> list:
    """``call(i)`` ``repeats`` times on each of ``n`` Python threads started together (a
    barrier), the odd ones on their own CUDA stream (``streams``; False: no CUDA, threads
    only): the results, ``[thread][repeat]``.  Fails naming a thread that raised, or if one
    hangs."""
    import threading

    import torch
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def work(i):
        try:
            # torch.cuda.stream(None) is a no-op (no CUDA needed)
            stream = (torch.cuda.Stream() if i % 2 else torch.cuda.current_stream()) if streams else None
            barrier.wait(timeout=60)
            with torch.cuda.stream(stream):
                out = [call(i) for _ in range(repeats)]
            if stream is not None:
                stream.synchronize()
            results[i] = out
        except Exception as e:  # reported below, with the thread
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, "\n".join(errors)
    return results


def no_upstream(a):
    """``a`` passed on, giving it no gradient (None) in backward: what an
    upstream node that does not differentiate into a loss hands back."""
    import torch

    class NoUpstream(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    return NoUpstream.apply(a)
