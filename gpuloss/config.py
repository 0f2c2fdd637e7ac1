"""Process-wide settings.

``value_checks`` decides whether argument checks that need the *values* of a
device array (class-index targets inside ``[0, C)``) run before a launch:

* ``"auto"`` (default): CPU arrays are always checked (free: no device to
  wait for); GPU arrays are not, because reading a device value forces a
  host synchronisation on the hot path of a training step (and is impossible
  while a CUDA graph is captured or ``torch.compile`` traces).  The kernels
  never read out of bounds for a bad target: that row's loss and gradient are
  NaN, which a training loop sees in its loss.
* ``"always"``: GPU arrays are checked too (one small reduction and a host
  read per call), except while a CUDA graph is captured or torch.compile
  traces: use it while debugging.
* ``"never"``: never read device values; CPU arrays are still checked, since
  that costs no synchronisation.

Set with :func:`set_value_checks` or the ``GPULOSS_VALUE_CHECKS`` environment
variable.
"""
from __future__ import annotations

import os

_MODES = ("auto", "always", "never")
_value_checks = os.environ.get("GPULOSS_VALUE_CHECKS", "auto").strip() or "auto"
if _value_checks not in _MODES:
    raise ValueError(f"GPULOSS_VALUE_CHECKS must be one of {_MODES}, got {_value_checks!r}")


def set_value_checks(mode: str) -> str:
    """Set the value-check mode; returns the previous one."""
    global _value_checks
    if mode not in _MODES:
        raise ValueError(f"value_checks must be one of {_MODES}, got {mode!r}")
    old, _value_checks = _value_checks, mode
    return old


def value_checks() -> str:
    return _value_checks
