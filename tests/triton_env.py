"""What the Triton test files share: where their kernels run (Triton's
interpreter on the CPU with ``TRITON_INTERPRET=1``, else a CUDA device), the
torch dtypes by name, and the comparison of a result with the float64
reference.  Importing it skips the importing module without torch or triton."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import tol

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRET
DEV = "cuda" if HAS_CUDA else "cpu"
#: the module mark of tests that run in the interpreter or on a GPU
RUNS_HERE = pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs a CUDA device or TRITON_INTERPRET=1")
TDT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def as_f64(t) -> np.ndarray:
    """A tensor's values as a float64 NumPy array (exact for every float dtype)."""
    return t.detach().cpu().to(torch.float64).numpy()


def close_fp32(got, want, dtype: str, what: str, grad: bool = False) -> None:
    """``got`` against the float64 ``want`` rounded to fp32 first (a z-loss of
    1e72 is inf in an fp32 loss); gradients get an absolute tolerance scaled
    by their largest finite magnitude."""
    want = np.asarray(want, dtype=np.float64).astype(np.float32).astype(np.float64)
    t = tol(dtype)
    atol = t["atol"] * (max(float(np.abs(want[np.isfinite(want)]).max(initial=0.0)), 1.0) if grad else 1.0)
    np.testing.assert_allclose(as_f64(got), want, rtol=t["rtol"], atol=atol, err_msg=what)
