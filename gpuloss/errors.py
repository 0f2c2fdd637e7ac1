"""gpuloss's exceptions for bad arguments.

Each is the Python exception the problem calls for (``ValueError``,
``TypeError``) and also a ``RuntimeError``, the class torch raises for most
bad arguments, so that code written for torch (``except RuntimeError``,
``pytest.raises(RuntimeError)``) catches gpuloss's errors too.  A class
index outside ``[0, C)`` is also an ``IndexError``, as torch's CPU kernels
raise it ("Target ... is out of bounds"), and so is a dimension out of
range (torch's "Dimension out of range").  An array that is not of a
floating dtype where one is needed is also a ``NotImplementedError``, as
torch's kernels raise it ("... not implemented for 'Long'").
"""
from __future__ import annotations

__all__ = ["ArgumentValueError", "ArgumentTypeError", "ArgumentDtypeError", "ClassIndexError", "DimensionError"]


class ArgumentValueError(ValueError, RuntimeError):
    """An argument with a bad value or shape (the message names it)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of a bad type or dtype (the message names it)."""


class ArgumentDtypeError(ArgumentTypeError, NotImplementedError):
    """An array of a dtype the operation has no kernel for (an integer, bool,
    complex or float8 array where a float16/bfloat16/float32/float64 one is
    needed)."""


class ClassIndexError(ArgumentValueError, IndexError):
    """A class-index target outside ``[0, C)`` that is not ``ignore_index``."""


class DimensionError(ArgumentValueError, IndexError):
    """A ``dim`` argument outside ``[-ndim, ndim)``."""
