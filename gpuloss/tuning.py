"""Kernel designs per (architecture, kernel, dtype, row length), from a table
shipped with the package.

The automatic choice of a design (the looped "twopass" kernels, the
register-resident "onchip" ones, ...) and of its launch configuration is
data, not code: ``gpuloss/tuned/designs.json``, written by
``python -m gpuloss.bench.tune --write-table`` from a sweep on a GPU (each
configuration checked against the float64 reference before it is timed)
and recorded in ``bench/RESULTS.md``.  The rule of the project holds in the
lookup: **a design that has not passed the GPU test suite is never chosen
automatically**.  An entry is used only if its ``verified`` field names a run
listed in the table's ``runs`` (a run of ``ci/gpu.sh`` whose test suite
passed, with every design the table can pick exercised); anything else is a
candidate, shown by :func:`describe` and ignored by :func:`lookup`.  Cards
the table does not cover get :data:`SAFE_DEFAULT`.

Table format (``"format": 1``)::

    {"format": 1,
     "runs": {"<run id>": {"card": ..., "date": ..., "commit": ...,
                            "suite": "<what passed>", "record": "<RESULTS.md entry>"}},
     "entries": [{"arch": "sm_90", "kernel": "cross_entropy", "dtype": "bfloat16",
                  "cols": [1, null],                  # row-length class, inclusive; null: no limit
                  "backend": "triton", "variant": "twopass",
                  "config": {"block": 4096, "reverse": true},
                  "verified": "<run id>" | null,
                  "measured": {"shape": "16384x128256", "floor": 0.64, "run": "<run id>"}}]}

``kernel`` is one of :data:`KERNELS`; ``dtype`` a storage dtype name;
``config`` holds launch knobs the Triton launcher understands
(``block``, ``reverse``, ``num_warps``, ``chunk``, ``max_split``, ``maxnreg``).  Where
several verified entries match, the narrowest row-length class wins.

Overrides, strongest first: a backend's ``variant=`` argument and
``GPULOSS_TRITON_VARIANT`` (and the other ``GPULOSS_TRITON_*`` knobs) for
the design; ``backend=`` / ``GPULOSS_BACKEND`` for the backend.  The
dispatcher (``gpuloss.dispatch``) reads a verified entry's ``backend`` field
to put that backend first in its automatic order for CUDA arrays.
``GPULOSS_DESIGN_TABLE=/path/to/designs.json`` replaces the shipped table
(for a GPU run that checks a freshly written one).

Nothing here imports torch or touches a GPU; the table is read on first use.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

#: the kernels whose design the table chooses
KERNELS = ("cross_entropy", "softmax", "softmax_backward")
#: row-length classes ``tune.py --write-table`` files a measured shape under
#: (inclusive bounds; None: no limit): whole rows of fp32 fit one program
#: up to 32768, 16 chunks of 8192 up to 131072
ROW_CLASSES: Tuple[Tuple[int, Optional[int]], ...] = ((1, 32768), (32769, 131072), (131073, None))
FORMAT = 1
#: launch knobs an entry's ``config`` may hold
CONFIG_KEYS = ("block", "reverse", "num_warps", "chunk", "max_split", "maxnreg")
TABLE_ENV = "GPULOSS_DESIGN_TABLE"


class Design(NamedTuple):
    """The automatic choice for one call: ``backend`` (None: the dispatcher's
    own order), ``variant`` of the Triton row kernels, launch ``config``
    knobs, the run that ``verified`` it (None for the safe default), and
    where it came from ("table" or "default")."""
    backend: Optional[str]
    variant: str
    config: Dict[str, Any]
    verified: Optional[str]
    source: str


#: the choice where the table has no verified entry: the looped kernels with
#: the launcher's built-in sizing (they passed the whole GPU suite on an H200
#: at commit 97816fa; no register-resident design is default anywhere
#: without a verified entry)
SAFE_DEFAULT = Design(backend=None, variant="twopass", config={}, verified=None, source="default")


@functools.lru_cache(maxsize=None)
def device_capability(device: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of the CUDA device ``device`` ("cuda" or "cuda:N"),
    through whichever of torch and CuPy the caller has already imported
    (None if neither sees it); read once per device."""
    import sys
    index = int(device.split(":")[1]) if ":" in device else 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return tuple(torch.cuda.get_device_capability(index))
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cc = int(cupy.cuda.Device(index).compute_capability)
        return cc // 10, cc % 10
    return None


def arch_name(capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """(9, 0) -> "sm_90"; None -> None."""
    if capability is None:
        return None
    return f"sm_{int(capability[0])}{int(capability[1])}"


def row_class(n_cols: int) -> Tuple[int, Optional[int]]:
    """The class of :data:`ROW_CLASSES` that holds a row of ``n_cols``."""
    for lo, hi in ROW_CLASSES:
        if n_cols >= lo and (hi is None or n_cols <= hi):
            return lo, hi
    return ROW_CLASSES[0]


_SHIPPED_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned", "designs.json")


def table_path() -> str:
    """The table in use: ``GPULOSS_DESIGN_TABLE`` or the shipped one."""
    env = os.environ.get(TABLE_ENV, "").strip()
    return env or _SHIPPED_TABLE


def validate(table: Dict[str, Any]) -> List[str]:
    """Problems with a table (empty list: fine).  The loader refuses a table
    with problems (the safe default is used everywhere instead)."""
    errs: List[str] = []
    if table.get("format") != FORMAT:
        errs.append(f"format must be {FORMAT}, got {table.get('format')!r}")
    runs = table.get("runs")
    if not isinstance(runs, dict):
        errs.append("runs must be an object")
        runs = {}
    entries = table.get("entries")
    if not isinstance(entries, list):
        return errs + ["entries must be a list"]
    for i, e in enumerate(entries):
        where = f"entry {i}"
        for key in ("arch", "kernel", "dtype", "cols", "backend", "variant", "config"):
            if key not in e:
                errs.append(f"{where}: missing {key!r}")
        if errs:
            continue
        if e["kernel"] not in KERNELS:
            errs.append(f"{where}: unknown kernel {e['kernel']!r}")
        cols = e["cols"]
        if not (isinstance(cols, list) and len(cols) == 2 and isinstance(cols[0], int)
                and (cols[1] is None or (isinstance(cols[1], int) and cols[1] >= cols[0]))):
            errs.append(f"{where}: cols must be [lo, hi or null], got {cols!r}")
        bad = set(e["config"]) - set(CONFIG_KEYS)
        if bad:
            errs.append(f"{where}: unknown config keys {sorted(bad)}")
        v = e.get("verified")
        if v is not None and v not in runs:
            errs.append(f"{where}: verified by {v!r}, which is not in runs")
    return errs


@functools.lru_cache(maxsize=4)
def _load(path: str) -> Tuple[Dict[str, Any], Optional[str]]:
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        return {"format": FORMAT, "runs": {}, "entries": []}, f"cannot read {path}: {e}"
    errs = validate(table)
    if errs:
        return {"format": FORMAT, "runs": {}, "entries": []}, f"{path} rejected: " + "; ".join(errs[:3])
    return table, None


def reload() -> None:
    """Forget the tables read and the answers given (a table file changed on
    disk; the cache is per path, so pointing ``GPULOSS_DESIGN_TABLE``
    elsewhere needs no reload)."""
    _load.cache_clear()
    _lookup_in_use.cache_clear()


def load_table() -> Dict[str, Any]:
    """The table in use (an empty one if it cannot be read or is invalid:
    then every lookup gives the safe default, and :func:`describe` says why)."""
    return _load(table_path())[0]


def _matches(e: Dict[str, Any], arch: str, kernel: str, dtype: str, n_cols: int) -> bool:
    lo, hi = e["cols"]
    return (e["arch"] == arch and e["kernel"] == kernel and e["dtype"] == dtype
            and n_cols >= lo and (hi is None or n_cols <= hi))


def lookup(capability: Optional[Tuple[int, int]], kernel: str, dtype: str, n_cols: int,
           table: Optional[Dict[str, Any]] = None) -> Design:
    """The design for a row kernel on a device of compute ``capability``
    ((major, minor); None: unknown, e.g. Triton's interpreter), storage
    ``dtype`` ("float32", "bfloat16", ...) and rows of ``n_cols``: the
    narrowest verified table entry that matches, else :data:`SAFE_DEFAULT`."""
    arch = arch_name(capability)
    if arch is None:
        return SAFE_DEFAULT
    if table is None:  # every CUDA call asks (the dispatcher, then the launcher): answered once per key
        return _lookup_in_use(table_path(), arch, kernel, dtype, n_cols)
    return _lookup(table, arch, kernel, dtype, n_cols)


@functools.lru_cache(maxsize=4096)
def _lookup_in_use(path: str, arch: str, kernel: str, dtype: str, n_cols: int) -> Design:
    """:func:`_lookup` in the table at ``path`` (read once, see :func:`_load`)."""
    return _lookup(_load(path)[0], arch, kernel, dtype, n_cols)


def _lookup(table: Dict[str, Any], arch: str, kernel: str, dtype: str, n_cols: int) -> Design:
    runs = table.get("runs", {})
    best = None
    for e in table.get("entries", []):
        if e.get("verified") not in runs or not _matches(e, arch, kernel, dtype, n_cols):
            continue
        width = (e["cols"][1] if e["cols"][1] is not None else 1 << 62) - e["cols"][0]
        if best is None or width < best[0]:
            best = (width, e)
    if best is None:
        return SAFE_DEFAULT
    e = best[1]
    return Design(backend=e["backend"], variant=e["variant"], config=dict(e["config"]),
                  verified=e["verified"], source="table")


def _fmt_cols(cols: Iterable[Optional[int]]) -> str:
    lo, hi = cols
    return f"C {lo}..{hi}" if hi is not None else f"C >= {lo}"


def _fmt_design(d: Design) -> str:
    cfg = " ".join(f"{k}={v}" for k, v in sorted(d.config.items()))
    if d.verified:
        return f"{d.backend} {d.variant}{(' ' + cfg) if cfg else ''} (verified by {d.verified})"
    return f"{d.variant} (safe default)"


def _current_capability() -> Tuple[Optional[Tuple[int, int]], str]:
    """(capability, name) of CUDA device 0 if torch sees one (only called by
    :func:`describe`, never at import)."""
    try:
        import torch
        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability(0)), torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None, "no CUDA device"


def describe(capability: Optional[Tuple[int, int]] = None, device_name: Optional[str] = None) -> str:
    """Text for ``gpuloss info``: the table in use, the GPU runs that verified
    its entries, the automatic choice per (kernel, dtype, row-length class) on
    this machine's GPU (or on ``capability``), and the unverified candidates."""
    if capability is None and device_name is None:
        capability, device_name = _current_capability()
    path = table_path()
    table, problem = _load(path)
    runs = table.get("runs", {})
    entries = table.get("entries", [])
    n_ver = sum(1 for e in entries if e.get("verified") in runs)
    lines = [f"design table: {path} (format {table.get('format')}, {len(entries)} entries, {n_ver} verified)"]
    if problem:
        lines.append(f"  {problem}: safe default everywhere")
    for rid, r in runs.items():
        lines.append(f"  run {rid}: {r.get('card', '?')}, {r.get('date', '?')}, commit {r.get('commit', '?')}: "
                     f"{r.get('suite', '?')}")
    arch = arch_name(capability)
    lines.append(f"automatic choice on {device_name or '?'} ({arch or 'architecture unknown'}):")
    dtypes = sorted({e["dtype"] for e in entries} | {"float32", "bfloat16"})
    for kernel in KERNELS:
        for dtype in dtypes:
            # consecutive row-length classes with the same choice share a line
            groups: List[List[Any]] = []
            for lo, hi in ROW_CLASSES:
                d = lookup(capability, kernel, dtype, lo, table)
                if groups and groups[-1][2] == d:
                    groups[-1][1] = hi
                else:
                    groups.append([lo, hi, d])
            for lo, hi, d in groups:
                lines.append(f"  {kernel:16s} {dtype:9s} {_fmt_cols((lo, hi)):16s} -> {_fmt_design(d)}")
    cands = [e for e in entries if e.get("verified") not in runs]
    if cands:
        lines.append("candidates not yet verified on a GPU (never chosen automatically):")
        for e in cands:
            m = e.get("measured") or {}
            meas = f", measured floor {m['floor']} at {m.get('shape', '?')}" if "floor" in m else ""
            cfg = " ".join(f"{k}={v}" for k, v in sorted(e["config"].items()))
            lines.append(f"  {e['arch']} {e['kernel']} {e['dtype']} {_fmt_cols(e['cols'])}: "
                         f"{e['backend']} {e['variant']} {cfg}{meas}")
    return "\n".join(lines)
