"""Shared fixtures: one test body, every backend.

``backend`` is parametrized over every registered backend and skipped, with
the reason, where one cannot run.  It yields a :class:`BackendHarness` that
turns NumPy arrays into the backend's native arrays on the backend's device
and back, so a test can be written once in NumPy terms:

    def test_x(backend):
        x = backend.asarray(np_x)             # native array, poisoned copy
        res = backend.impl.cross_entropy(x, ...)
        np.testing.assert_allclose(backend.to_numpy(res.loss), ref, **tol("float32"))

Set ``GPULOSS_TEST_BACKENDS=numpy,triton`` to restrict the list.  The triton
backend runs on the CPU when ``TRITON_INTERPRET=1`` (CI does this at small
shapes) and on CUDA otherwise.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from gpuloss import dispatch

# One tolerance table for every test: (rtol, atol) per storage dtype, for
# comparisons against the float64 reference.  bf16/fp16: rounding of inputs is
# done in the test (the reference sees the rounded inputs), so what is left is
# the rounding of the output, which these bounds cover.
TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (2e-5, 2e-6),
    "float16": (2e-3, 2e-4),
    "bfloat16": (1.6e-2, 2e-3),
}


def tol(dtype: str) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


@dataclass
class BackendHarness:
    name: str
    impl: Any
    device: str  # "cpu" or "cuda"

    @property
    def native(self) -> str:
        return self.impl.native

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """Native copy of NumPy array ``a`` (optionally cast to ``dtype``,
        which may be "bfloat16")."""
        a = np.asarray(a)
        dtype = dtype or str(a.dtype)
        if self.native == "numpy":
            if dtype == "bfloat16":
                pytest.skip("numpy backend has no bfloat16")
            return np.array(a, dtype=dtype)
        if self.native == "torch":
            import torch
            # a copy, never a view of the caller's NumPy array: in-place
            # kernels must not overwrite the test's own input
            return torch.tensor(np.ascontiguousarray(a), dtype=getattr(torch, dtype), device=self.device)
        if self.native == "cupy":
            import cupy
            if dtype == "bfloat16":
                # CuPy has no bfloat16 dtype: the cupy backend takes bf16 as
                # its raw 16 bits in an int16 array (see gpuloss.backends.cupy)
                import torch
                t = torch.from_numpy(np.ascontiguousarray(a)).to(device="cuda", dtype=torch.bfloat16)
                return cupy.from_dlpack(t.view(torch.int16))
            return cupy.asarray(a, dtype=dtype)
        raise AssertionError(self.native)

    def to_numpy(self, a: Any) -> np.ndarray:
        """float64 (or integer) NumPy copy of a native array."""
        if a is None:
            return None
        if self.native == "numpy":
            return np.asarray(a)
        if self.native == "torch":
            import torch
            if a.dtype in (torch.bfloat16, torch.float16):
                a = a.float()
            return a.detach().cpu().numpy()
        if self.native == "cupy":
            import cupy
            if str(a.dtype) in ("int16", "uint16"):  # bf16 bits (the tests use no int16 targets)
                import torch
                return torch.from_dlpack(a).view(torch.bfloat16).float().cpu().numpy()
            return cupy.asnumpy(a)
        raise AssertionError(self.native)


def _wanted_backends():
    env = os.environ.get("GPULOSS_TEST_BACKENDS")
    names = dispatch.registered()
    if env:
        names = [n for n in names if n in env.split(",")]
    return names


def _device_for(name: str) -> str:
    if name == "numpy":
        return "cpu"
    if name == "triton":
        return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    return "cuda"


@pytest.fixture(params=_wanted_backends())
def backend(request) -> BackendHarness:
    name = request.param
    ok, why = dispatch.backend_status()[name]
    if not ok:
        pytest.skip(f"backend {name} unavailable: {why}")
    impl = dispatch.get_backend(name)
    dev = _device_for(name)
    if not impl.accepts("torch" if impl.native == "torch" else impl.native, dev if dev == "cpu" else "cuda:0"):
        pytest.skip(f"backend {name} cannot run on {dev} here")
    return BackendHarness(name=name, impl=impl, device=dev)


@pytest.fixture
def rng(request):
    """Fresh random data every run; the seed is printed on failure, and
    GPULOSS_TEST_SEED=<seed> replays it."""
    fixed = os.environ.get("GPULOSS_TEST_SEED")
    seed = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
