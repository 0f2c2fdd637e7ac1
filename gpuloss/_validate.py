"""Argument checks, run before any work.

Every failure is a ``TypeError`` (wrong kind or dtype) or ``ValueError``
(wrong shape or value) whose message names the argument and the problem.
Checks that need device values (class-index targets inside ``[0, C)``) follow
:mod:`gpuloss.config`'s ``value_checks`` mode so the hot path of a GPU
training step need not synchronise.
"""
from __future__ import annotations

import importlib
import math
import operator
import sys
from typing import Any

import numpy as np

from . import _layout as L
from . import config
from ._arrays import FLOAT_DTYPES, dtype_name
from .errors import ArgumentDtypeError, ArgumentTypeError, ArgumentValueError, ClassIndexError, DimensionError

_REDUCTIONS = ("none", "mean", "sum")
_KL_REDUCTIONS = ("none", "mean", "sum", "batchmean")


def is_floating(a: Any, kind: str) -> bool:
    """One of the floating dtypes gpuloss computes on: float16, bfloat16,
    float32, float64 (not float8, nor NumPy's longdouble, which the kernels
    would silently compute in float32)."""
    if kind == "torch":
        import torch
        return a.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return dtype_name(a, kind) in FLOAT_DTYPES


def is_integer(a: Any, kind: str) -> bool:
    if kind == "torch":
        import torch
        return not a.dtype.is_floating_point and not a.dtype.is_complex and a.dtype != torch.bool
    return np.issubdtype(a.dtype, np.integer)


def is_integral(a: Any, kind: str) -> bool:
    """An integer or bool array (what torch promotes to a floating dtype)."""
    return is_integer(a, kind) or dtype_name(a, kind) == "bool"


def floating_result_dtype(kind: str, *arrays) -> Any:
    """torch's promoted dtype of the floating arrays among ``arrays`` (None
    and integer/bool arrays, which take a floating dtype, take no part): the
    dtype of cross-entropy with probability targets and a class weight."""
    return L.result_dtype(kind, *(a for a in arrays if a is not None and is_floating(a, kind)))


def check_floating(name: str, a: Any, kind: str) -> None:
    if not is_floating(a, kind):
        raise ArgumentDtypeError(f"{name} must be a floating-point array (float16, bfloat16, float32 or float64), "
                                f"got {dtype_name(a, kind)}")


def check_reduction(reduction: str, kl: bool = False) -> None:
    allowed = _KL_REDUCTIONS if kl else _REDUCTIONS
    if reduction not in allowed:
        raise ArgumentValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r} "
                                 f"({reduction} is not a valid value for reduction)")


def _int_like(name: str, v: Any) -> int:
    """An int argument that is not a Python int: a NumPy integer or a 0-d
    integer tensor, as torch takes them (no bool, no array, no float).

    Python ints skip this: torch.compile traces an int argument that changed
    between calls as a symbolic int, whose attributes dynamo cannot look up
    (``hasattr``, ``getattr`` with a default) but whose comparisons it guards."""
    if isinstance(v, (bool, np.bool_, np.ndarray)) or not hasattr(v, "__index__") \
            or getattr(v, "ndim", 0) != 0 or str(getattr(v, "dtype", "")) == "torch.bool":
        raise ArgumentTypeError(f"{name} must be an int, got {type(v).__name__}")
    try:
        return operator.index(v)
    except TypeError:  # a floating tensor
        raise ArgumentTypeError(f"{name} must be an int, got {type(v).__name__}") from None


def check_dim(name: str, dim: Any, ndim: int) -> int:
    """``dim`` as an int in [-ndim, ndim) (one for 0-d), as torch takes it: an
    int, a NumPy integer or a 0-d integer tensor (no bool, no array)."""
    if isinstance(dim, bool) or not isinstance(dim, int):  # (an int: also a symbolic one, see _int_like)
        dim = _int_like(name, dim)
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise DimensionError(f"{name}={dim} is out of range for an array with {ndim} dimension(s) "
                             f"(expected to be in range of [{-n}, {n - 1}])")
    return dim


def check_same_shape(n1: str, a: Any, n2: str, b: Any, torch_says: str = "") -> None:
    """Equal shapes; ``torch_says``: torch's own sentence for the mismatch,
    appended (``{a}``/``{b}``: the two shapes as torch prints them), so that
    code matching torch's message matches gpuloss's too."""
    if tuple(a.shape) != tuple(b.shape):
        also = f" ({torch_says.format(a=a.shape, b=b.shape)})" if torch_says else ""
        raise ArgumentValueError(f"{n1} and {n2} must have the same shape, got {tuple(a.shape)} and "
                                 f"{tuple(b.shape)}{also}")


def check_same_dtype(n1: str, a: Any, n2: str, b: Any, kind: str) -> None:
    if dtype_name(a, kind) != dtype_name(b, kind):
        raise ArgumentTypeError(f"{n1} must have {n2}'s dtype {dtype_name(b, kind)}, got {dtype_name(a, kind)}")


def as_float_dtype(name: str, dtype: Any, kind: str):
    """A floating dtype argument (torch's ``dtype=``): a torch.dtype for torch
    tensors, a NumPy dtype or its name for NumPy and CuPy arrays; None stays
    None."""
    if dtype is None:
        return None
    if kind == "torch":
        import torch
        if not isinstance(dtype, torch.dtype):
            raise ArgumentTypeError(f"{name} must be a torch.dtype for torch.Tensor arguments, got "
                                    f"{type(dtype).__name__}")
        if not dtype.is_floating_point:  # torch: NotImplementedError ("... not implemented for 'Long'")
            raise ArgumentDtypeError(f"{name} must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            importlib.import_module("ml_dtypes")  # registers NumPy's bfloat16
        except ImportError:
            raise ArgumentTypeError(f"{name}='bfloat16' for NumPy arrays needs the ml_dtypes package") from None
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ArgumentTypeError(f"{name} must be a NumPy dtype or its name, got {dtype!r}") from None
    if dt.kind != "f" and dt.name != "bfloat16":
        raise ArgumentDtypeError(f"{name} must be a floating-point dtype, got {dt}")
    return dt


def check_bool(name: str, v: Any) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(v).__name__}")


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ArgumentTypeError(f"{name} must be a number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:  # an int beyond the float range
        raise ArgumentValueError(f"{name} must be finite, got an integer beyond the float range") from None


def _finite(f: float) -> bool:
    # comparisons, not math.isfinite: dynamo folds these on constants, while
    # math.isfinite breaks the graph under torch.compile(dynamic=True)
    return f == f and -math.inf < f < math.inf


def check_finite_number(name: str, v: Any) -> None:
    if not _finite(_number(name, v)):
        raise ArgumentValueError(f"{name} must be finite, got {v}")


def check_range(name: str, v: Any, lo: float, hi: float) -> None:
    f = _number(name, v)
    if not lo <= f <= hi:
        raise ArgumentValueError(f"{name} must be in [{lo}, {hi}], got {v}")


def check_positive(name: str, v: Any) -> None:
    f = _number(name, v)
    if not (f > 0 and _finite(f)):
        raise ArgumentValueError(f"{name} must be > 0 and finite, got {v}")


def check_positive_or_none(name: str, v: Any) -> None:
    if v is not None:
        check_positive(name, v)


def check_chunk_size(name: str, v: Any) -> None:
    """Tokens per chunk: a positive int, or None for the default."""
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ArgumentTypeError(f"{name} must be a positive int or None, got {type(v).__name__}")
    if not 1 <= v < 2 ** 63:
        raise ArgumentValueError(f"{name} must be in [1, 2**63), got {v}")


def as_number(v: Any) -> Any:
    """A float option as torch takes it: a bool (True is 1.0) or a one-element
    tensor or array is its Python float; anything else as it is (for the
    checks to name)."""
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float)):  # (also what torch.compile makes of a float under dynamic shapes)
        return v
    if getattr(v, "shape", None) is not None and getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        return float(v.item())
    return v


def check_ce_options(label_smoothing: Any, z_loss: Any, softcap: Any) -> float:
    """The cross-entropy options every CE entry point shares (cross_entropy,
    the fused linear CE, the vocabulary-parallel loss).  Returns the label
    smoothing to apply, as torch applies it: a value above 1 is refused, and
    one that is not above 0 (negative, NaN) smooths nothing."""
    label_smoothing = _number("label_smoothing", as_number(label_smoothing))
    if label_smoothing > 1.0:
        raise ArgumentValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")  # torch's
    check_finite_number("z_loss", z_loss)
    if z_loss < 0:
        raise ArgumentValueError(f"z_loss must be >= 0, got {z_loss}")
    check_positive_or_none("softcap", softcap)
    return label_smoothing if label_smoothing > 0.0 else 0.0


def check_ignore_index(name: str, v: Any) -> int:
    """An integer class index that fits in int64 (Python int, NumPy integer,
    or anything with ``__index__``, as torch accepts); bools, floats, strings
    and None are refused as torch refuses them."""
    if isinstance(v, int) and not isinstance(v, bool):  # (also a symbolic int: see _int_like)
        i = v
    elif isinstance(v, (bool, np.bool_)) or getattr(v, "dtype", None) is not None and "bool" in str(v.dtype):
        raise ArgumentTypeError(f"{name} must be an int, got bool")
    else:
        try:
            i = operator.index(v)
        except TypeError:
            raise ArgumentTypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if not -(2 ** 63) <= i < 2 ** 63:
        raise ArgumentValueError(f"{name}={i} is outside the int64 range")
    return i


# ---------------------------------------------------------------- targets

def _ce_target_shape(input: Any) -> tuple:
    if input.ndim == 1:
        return ()
    return (input.shape[0],) + tuple(input.shape[2:])


def unbatched_index_target(target: Any, kind: str, input_ndim: int) -> Any:
    """torch takes a (1,) class-index target next to one unbatched row (input
    (C,), or (H,) for the linear cross-entropy) as the row's (); so do we."""
    if input_ndim == 1 and tuple(target.shape) == (1,) and is_integer(target, kind):
        return target.reshape(())
    return target


def check_float_target_batch(name: str, target: Any, input: Any) -> None:
    """torch's first check of a floating (probability) target next to batched
    logits, with its error class (ValueError): the same batch size."""
    if input.ndim >= 2 and target.ndim >= 1 and target.shape[0] != input.shape[0]:
        raise ArgumentValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                                 f"({target.shape[0]}): {name} of shape {tuple(target.shape)} for input of "
                                 f"shape {tuple(input.shape)}")


def check_ce_target(name: str, target: Any, kind: str, input: Any, ignore_index: int = -100) -> bool:
    """True for probability targets, False for class indices; raises otherwise
    (probability targets take no ignore_index >= 0, as in torch)."""
    if is_floating(target, kind):
        if tuple(target.shape) != tuple(input.shape):
            check_float_target_batch(name, target, input)
            raise ArgumentTypeError(
                f"{name} is floating-point ({dtype_name(target, kind)}) with shape {tuple(target.shape)}: "
                f"class-index targets must be integers of shape {_ce_target_shape(input)}, probability "
                f"targets must have input's shape {tuple(input.shape)}")
        if ignore_index >= 0:
            raise ArgumentValueError(f"ignore_index is not supported for floating point target: ignore_index="
                                     f"{ignore_index} with probability (floating-point) targets, as in torch")
        return True
    check_index_target(name, target, kind, input)
    return False


def check_index_target(name: str, target: Any, kind: str, input: Any, probabilities: bool = True) -> None:
    """Class indices of the shape ``input`` needs; ``probabilities``: the
    function also takes class probabilities (cross_entropy, not nll_loss)."""
    if not is_integer(target, kind):
        raise ArgumentTypeError(f"{name} must hold integer class indices, got {dtype_name(target, kind)}")
    want = _ce_target_shape(input)
    if tuple(target.shape) != want:
        if probabilities and tuple(target.shape) == tuple(input.shape):  # torch: class probabilities
            raise ArgumentTypeError(f"{name} has input's shape {tuple(input.shape)}, which makes it class "
                                    f"probabilities, but holds {dtype_name(target, kind)}: probabilities must be "
                                    f"floating point; class indices have shape {want}")
        raise ArgumentValueError(f"{name} has shape {tuple(target.shape)} but input of shape {tuple(input.shape)} "
                                 f"needs class-index targets of shape {want}{_torch_target_shape_words(target, want)}")


def _torch_target_shape_words(target: Any, want: tuple) -> str:
    """torch's sentence for a class-index target of the wrong shape, where it has one."""
    if len(want) == 1 and target.ndim > 1:
        return " (0D or 1D target tensor expected, multi-target not supported)"
    if len(want) >= 1 and target.ndim == len(want) and target.shape[0] != want[0]:
        return f" (Expected input batch_size ({want[0]}) to match target batch_size ({target.shape[0]}).)"
    if len(want) >= 2 and target.ndim == len(want):
        return f" (Expected target size {list(want)}, got {list(target.shape)})"
    return ""


def as_index_target(name: str, target: Any, kind: str) -> Any:
    """int32/int64 pass through; int8, int16 and uint8 become int64.  torch
    tensors of uint16/32/64 are refused, as torch refuses them (it has no
    kernels to compare them); NumPy and CuPy arrays of those become int64,
    after a uint64 value beyond int64's range (which would turn negative,
    even into ignore_index) is reported as out of range, wherever values are
    checked."""
    dt = dtype_name(target, kind)
    if dt in ("int32", "int64"):
        return target
    if kind == "torch":
        import torch
        if dt in ("uint16", "uint32", "uint64"):
            raise ArgumentTypeError(f"{name} must hold class indices as int64 (torch's dtype for them) or uint8, "
                                    f"int8, int16 or int32; got {dt}, which torch has no kernels to compare")
        return target.to(torch.int64)
    if dt == "uint64" and target.size and _device_values_allowed(target, kind):
        top = int(target.max())
        if top > np.iinfo(np.int64).max:
            raise ClassIndexError(f"{name} contains class index {top}, beyond int64 and so outside any class "
                                  f"range")
    return target.astype("int64")


def _device_values_allowed(target: Any, kind: str) -> bool:
    """Whether reading ``target``'s values on the host is allowed now
    (gpuloss.config).  Not while torch.compile traces: there a CPU tensor's
    check goes into the graph instead (:func:`_traced_check`); nor under a
    fake mode (FakeTensorMode shape and memory estimation, make_fx and
    AOTAutograd tracing), whose tensors have no values to read."""
    if kind == "numpy":
        return True
    if kind == "torch":
        import torch
        if torch.compiler.is_compiling():
            return False  # a data-dependent check would break the graph
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
            return False
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
            return False  # make_fx records operations: a host read of a value is none
        if target.device.type == "cpu":
            return True
        return config.value_checks() == "always" and not torch.cuda.is_current_stream_capturing()
    if kind == "cupy":
        cupy = sys.modules["cupy"]
        return config.value_checks() == "always" and not cupy.cuda.get_current_stream().is_capturing()
    return True


def check_class_targets(name: str, target: Any, kind: str, C: int, ignore_index: int) -> None:
    """Every class index in [0, C) or equal to ignore_index (value check)."""
    n = target.numel() if kind == "torch" else target.size
    if n == 0:
        return
    traced = _traced_check(target, kind)
    if not traced and not _device_values_allowed(target, kind):
        return
    if dtype_name(target, kind) != "int64":  # compare in int64: an ignore_index beyond int32 must not wrap
        target = target.long() if kind == "torch" else target.astype("int64")
    bad = ((target < 0) | (target >= C)) & (target != ignore_index)
    if traced:
        import torch  # a tensor: imported already (no sys.modules lookup while dynamo traces)
        # neither C nor ignore_index is formatted into the message: that would specialise the graph on the
        # class count, and a symbolic ignore_index (an int that varied between calls) cannot be formatted
        torch._assert_async(_plain(~bad.any()), f"{name} contains a class index outside [0, C) (C: the number "
                                                "of classes) and not ignore_index")
        return
    if bool(bad.any()):
        first = target[bad].reshape(-1)[0]
        first = int(first.item()) if hasattr(first, "item") else int(first)
        raise ClassIndexError(f"{name} contains class index {first}, outside [0, {C}) and not "
                              f"ignore_index={ignore_index} (Target {first} is out of bounds.)")


def _traced_check(a: Any, kind: str) -> bool:
    """A CPU tensor while torch.compile or make_fx (real tensors) traces: its
    value check becomes an assertion inside the graph (``torch._assert_async``,
    a RuntimeError at run time), as torch's own kernels check CPU targets in
    compiled code.
    Never on a GPU: a failed device-side assertion kills the CUDA context."""
    if kind != "torch" or a.device.type != "cpu":
        return False
    return L.torch_tracing(a, "compile") or _real_tensor_tracing()


def _plain(cond: Any) -> Any:
    """An in-graph assertion's condition as a plain tensor: a DTensor's
    (DTensor has no rule for ``_assert_async``) reduced over every rank, so
    that all ranks assert alike."""
    return cond.full_tensor() if type(cond).__name__ == "DTensor" else cond


def _real_tensor_tracing() -> bool:
    """make_fx with ``tracing_mode="real"``: a proxy mode records operations on
    real tensors, and a value read on the host (``.item()``) cannot be recorded;
    the check goes into the graph as under torch.compile."""
    import torch
    mode = torch._C._get_dispatch_mode
    keys = torch._C._TorchDispatchModeKey
    return mode(keys.PROXY) is not None and mode(keys.FAKE) is None


def check_unit_interval(name: str, a: Any, kind: str) -> None:
    """Every value of ``a`` in [0, 1] (binary_cross_entropy's probabilities
    and targets, as torch checks them; NaN fails).  A value check: it follows
    ``gpuloss.config``'s mode on a GPU."""
    n = a.numel() if kind == "torch" else a.size
    traced = n > 0 and _traced_check(a, kind)
    if n == 0 or not (traced or _device_values_allowed(a, kind)):
        return
    ok = (a >= 0) & (a <= 1)
    if traced:
        import torch  # a tensor: imported already
        torch._assert_async(_plain(ok.all()), f"all elements of {name} should be between 0 and 1")
        return
    if not bool(ok.all()):
        raise ArgumentValueError(f"all elements of {name} should be between 0 and 1")


# ---------------------------------------------------------------- weights

def check_no_grad(name: str, a: Any, kind: str, what: str) -> None:
    """torch: ``a`` must not require grad while grad mode is on (the loss is
    not differentiable with respect to it, and silently detaching it would
    lose the gradient the caller asked for)."""
    if kind != "torch" or a is None or not a.requires_grad:
        return
    import torch
    if torch.is_grad_enabled():
        raise ArgumentValueError(f"{name} requires grad, but {what} is not differentiable with respect to {name} "
                                 f"(as in torch); pass {name}.detach()")


def check_weight(name: str, weight: Any, kind: str, C: int, input: Any = None, prob: bool = False,
                 any_dtype: bool = False) -> None:
    """Class weights: floating, (C,), and (class-index targets, as torch)
    of ``input``'s dtype and not requiring grad.  With probability targets
    torch promotes their dtype (an integer or bool weight too: it takes the
    logits' floating dtype) and differentiates them.  ``any_dtype``: any
    floating, integer or bool dtype, requiring grad or not (torch's chunked
    linear cross-entropy)."""
    if weight is None:
        return
    if not ((prob or any_dtype) and is_integral(weight, kind)):
        check_floating(name, weight, kind)
    if weight.ndim != 1 or weight.shape[0] != C:
        raise ArgumentValueError(f"{name} must be a 1-D array of length C={C} (one weight per class), "
                                 f"got shape {tuple(weight.shape)} ({name} tensor should be defined either for all "
                                 f"{C} classes or no classes but got {name} tensor of shape: {list(weight.shape)})")
    if prob:
        return
    if any_dtype:  # torch's chunked operator converts it, and takes one that requires grad (its grad left None)
        return
    check_no_grad(name, weight, kind, "the loss")
    if input is not None and dtype_name(weight, kind) != dtype_name(input, kind):
        raise ArgumentTypeError(f"{name} must have input's dtype {dtype_name(input, kind)}, got "
                                f"{dtype_name(weight, kind)}")


def _compute_dtype(input: Any, kind: str):
    return "float64" if dtype_name(input, kind) == "float64" else "float32"


def as_float_vector(w: Any, kind: str, input: Any) -> Any:
    """A contiguous float32 (float64 for float64 input) copy or view of ``w``."""
    dt = _compute_dtype(input, kind)
    if kind == "torch":
        import torch
        return w.detach().to(getattr(torch, dt)).contiguous()
    xp = np if kind == "numpy" else sys.modules["cupy"]
    return xp.ascontiguousarray(w, dtype=dt)


def broadcasts_to(shape: tuple, target: tuple) -> bool:
    """Whether ``shape`` broadcasts to ``target``, dimension by dimension, so
    that a symbolic size (torch.export, make_fx) is only compared, never
    turned into a number (``np.broadcast_shapes`` would specialise it)."""
    if len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))


def check_broadcastable(name: str, w: Any, kind: str, input: Any) -> None:
    if w is None:
        return
    check_floating(name, w, kind)
    if not broadcasts_to(tuple(w.shape), tuple(input.shape)):
        raise ArgumentValueError(f"{name} of shape {tuple(w.shape)} does not broadcast to input's shape "
                                 f"{tuple(input.shape)}")


def as_row_broadcast(w: Any, kind: str, input: Any, rows: Any) -> Any:
    """A per-class (C,) vector when ``w`` only varies along the last
    dimension, else ``w`` broadcast to the (R, C) rows, materialised."""
    C = rows.shape[-1]
    shape = tuple(w.shape)
    dt = _compute_dtype(input, kind)
    lead_ones = all(s == 1 for s in shape[:-1])
    if kind == "torch":
        import torch
        w = w.detach().to(getattr(torch, dt))
        if lead_ones:
            return w.reshape(-1).expand(C).contiguous() if (len(shape) == 0 or shape[-1] == 1) \
                else w.reshape(C).contiguous()
        return w.expand(tuple(input.shape)).reshape(rows.shape).contiguous()
    xp = np if kind == "numpy" else sys.modules["cupy"]
    w = xp.asarray(w, dtype=dt)
    if lead_ones:
        v = w.reshape(-1)
        return xp.ascontiguousarray(xp.broadcast_to(v, (C,)))
    return xp.ascontiguousarray(xp.broadcast_to(w, tuple(input.shape)).reshape(rows.shape))


# ---------------------------------------------------------------- in-place

def strides_overlap(shape: tuple, strides: tuple) -> bool:
    """Whether two different indices of an array with these ``shape`` and
    element ``strides`` address the same element.

    Dimensions sorted by stride: when each stride is larger than the span of
    the smaller ones, no two indices meet (the common case, decided in
    O(ndim)).  Otherwise the offsets are enumerated (up to 2**22 elements);
    a larger layout that the first test cannot decide counts as overlapping."""
    if any(n == 0 for n in shape):
        return False
    dims = L.sorted_pairs((abs(st), n) for n, st in zip(shape, strides) if n > 1)
    span = 0
    for st, n in dims:
        if st <= span:
            break
        span += st * (n - 1)
    else:
        return False
    total = math.prod(n for _, n in dims)
    if total > 1 << 22:
        return True
    offs = np.zeros(1, dtype=np.int64)
    for st, n in dims:
        offs = (offs[:, None] + st * np.arange(n, dtype=np.int64)[None, :]).reshape(-1)
    return np.unique(offs).size != offs.size


def check_inplace_ok(name: str, input: Any, kind: str, return_grad: Any) -> None:
    """``inplace_backward`` overwrites the logits with their gradient: they
    must be writable, and no two elements may share memory (an ``expand``ed
    tensor, a stride-0 or overlapping ``as_strided`` view), as for torch's
    own in-place operations.  Metadata only: nothing is read or written."""
    if kind == "numpy" and not input.flags.writeable:
        raise ArgumentValueError(f"inplace_backward=True writes the gradient over {name}, but {name} is a read-only "
                                 f"array")
    if kind == "torch":
        import torch
        if return_grad and input.requires_grad:
            raise ArgumentValueError(f"inplace_backward=True with return_grad would overwrite {name}, which requires "
                                     f"grad; call it on a tensor that does not require grad, or use autograd "
                                     f"(drop return_grad)")
        if torch.compiler.is_compiling():
            return  # traced: the mutation is functionalized, and dynamo cannot trace the overlap query
        if input.is_inference() and not torch.is_inference_mode_enabled():
            raise ArgumentValueError(f"inplace_backward=True writes the gradient over {name}, but {name} is an "
                                     f"inference tensor (made under torch.inference_mode), which torch allows no "
                                     f"in-place update outside inference mode; pass a clone or use "
                                     f"inplace_backward=False")
        verdict = torch._debug_has_internal_overlap(input) if hasattr(torch, "_debug_has_internal_overlap") \
            else 2
        overlap = verdict == 1 or (verdict == 2 and strides_overlap(tuple(input.shape), L.elem_strides(input, kind)))
    else:
        overlap = strides_overlap(tuple(input.shape), L.elem_strides(input, kind))
    if overlap:
        raise ArgumentValueError(f"inplace_backward=True writes the gradient over {name}, but elements of {name} share "
                                 f"memory (an expanded, stride-0 or overlapping view); pass a contiguous copy "
                                 f"or use inplace_backward=False")
