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
