"""Registers, spills and shared memory of the Triton kernels, offline.

Compiles each kernel in each configuration the launcher can choose (its
sizing helper, ``launch_config``, asked for a given architecture: no GPU
needed) for sm_80 and sm_90 with Triton's bundled ptxas, and reads the cubin
with the ``cuobjdump`` shipped beside it::

    python -m gpuloss.bench.resources                 # the default configurations
    python -m gpuloss.bench.resources --group variant # the opt-in designs tune.py sweeps
    python -m gpuloss.bench.resources --group all --json out.json

Columns: REG (registers per thread), STACK (stack frame bytes: spill slots,
or the call frame of a subroutine such as fp64 division), LOCAL (local
memory bytes), SPILL (spill stores + loads in bytes, from ``ptxas -v`` on
the same PTX, run when STACK or LOCAL is not 0), SHARED (static shared
memory) and DYN (Triton's dynamic shared memory for reductions, pipelining).
A configuration "spills" when SPILL or LOCAL is not 0.
``progs/SM`` is how many programs of that configuration fit on one SM by
registers (65536 per SM, at most 255 per thread, 2048 threads per SM).

Pointers are compiled as 16-byte aligned and row strides / C as multiples of
16, as the launcher specialises them for contiguous rows of 32000, 128256 or
262144 (vectorised 16-byte accesses: the register pressure of the real
launches).  Triton's on-disk cache makes a second run fast.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

ARCHS = (80, 90)
#: storage dtype -> (Triton pointer element, accumulation element)
DTYPES = {"float32": ("fp32", "fp32"), "bfloat16": ("bf16", "fp32"), "float16": ("fp16", "fp32"),
          "float64": ("fp64", "fp64")}
#: row lengths that change a default configuration: short rows (a single
#: block / whole row), and long ones (PERF.md's 32000, 128256, 262144)
DEFAULT_COLS = (1000, 32000, 128256)
#: rows of the tune.py sweep (PERF.md's shapes)
PERF_SHAPES = (("bfloat16", 32000), ("bfloat16", 128256), ("bfloat16", 262144), ("float32", 32000))

_FLOAT_SCALARS = {"eps", "z_loss", "softcap", "grad_scale", "inv_temp", "one_minus_eps", "eps_over_v", "scale"}
_INT_SCALARS = {"n_cols", "n_rows", "ignore_index", "n_tok", "n_v", "n_h"}
_ACC_PTRS = {"Loss_ptr", "L_ptr", "Partial_ptr", "Div_ptr", "Scratch_ptr", "Max_ptr", "Sum_ptr", "Dt_ptr",
             "Dsum_ptr", "Shift_ptr", "LogS_ptr", "Scale_ptr", "W_ptr", "PW_ptr"}
_STORAGE_PTRS = {"X_ptr", "Y_ptr", "G_ptr", "GT_ptr", "DY_ptr", "DX_ptr", "P_ptr", "DZ_ptr", "H_ptr"}
_INT16_PTRS = {"Hi_ptr", "Lo_ptr"}


class Spec(NamedTuple):
    """One compilation: kernel ``module.function``, storage dtype, what the
    configuration is (``label``), its constexprs, warps and stages."""
    group: str
    kernel: str
    dtype: str
    label: str
    constexprs: Tuple[Tuple[str, Any], ...]
    num_warps: int
    num_stages: int
    cols: int
    prob_target: bool = False
    maxnreg: Optional[int] = None


def _fn(kernel: str):
    import importlib
    mod, name = kernel.split(".")
    return getattr(importlib.import_module(f"gpuloss.kernels.triton.{mod}"), name)


def _signature(spec: Spec, fn) -> Tuple[Dict[str, str], Dict[Tuple[int], list]]:
    """Argument types and alignment hints, as the launcher's calls produce them."""
    st, acc = DTYPES[spec.dtype]
    cons = dict(spec.constexprs)
    sig: Dict[str, str] = {}
    attrs: Dict[Tuple[int], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in cons:
            sig[name] = "constexpr"
            continue
        if name in _STORAGE_PTRS:
            t = f"*{st}"
        elif name == "T_ptr":
            t = f"*{st}" if spec.prob_target else "*i64"
        elif name in _ACC_PTRS:
            t = f"*{acc}"
        elif name == "Lse_ptr":
            t = "*fp32"
        elif name == "Counter_ptr":
            t = "*i32"
        elif name == "LT_ptr":
            t = "*i64"
        elif name in _INT16_PTRS:
            t = "*i16"
        elif name.endswith("_stride") or "_stride_" in name or name in _INT_SCALARS:
            t = "i32"
        elif name in _FLOAT_SCALARS:
            t = "*fp64" if acc == "fp64" else "fp32"  # float64 launches pass scalars by pointer
        else:
            raise ValueError(f"{spec.kernel}: no type rule for argument {name!r}")
        sig[name] = t
        aligned = t.startswith("*") or ((name.endswith("_stride") or "_stride_" in name or name in ("n_cols", "n_h"))
                                        and spec.cols % 16 == 0)
        if aligned and name != "ignore_index":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _ptxas_spills(ptx: str, arch: int, maxnreg: Optional[int]) -> int:
    """Spill stores + loads (bytes) that Triton's ptxas reports for ``ptx``
    (a stack frame alone can be a call frame: fp64 division and logarithm
    are subroutine calls)."""
    import re
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(d, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))


def _res_usage(cubin: bytes) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if "REG:" in ln][-1]
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def compile_triton(spec: Spec, arch: int):
    """Triton's compilation of ``spec`` for sm_<arch> (``.asm`` holds ttgir, ptx, cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    fn = _fn(spec.kernel)
    sig, attrs = _signature(spec, fn)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg:
        opts["maxnreg"] = spec.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def compile_spec(spec: Spec, arch: int) -> Dict[str, Any]:
    """Compile ``spec`` for sm_<arch>; its resource use (or the error)."""
    row = dict(spec._asdict(), constexprs=dict(spec.constexprs), arch=f"sm_{arch}")
    try:
        c = compile_triton(spec, arch)
    except Exception as e:  # a configuration that does not compile is a result too
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return row
    row.update(_res_usage(c.asm["cubin"]), DYN=int(c.metadata.shared))
    row["SPILL"] = _ptxas_spills(c.asm["ptx"], arch, spec.maxnreg) if row["STACK"] or row["LOCAL"] else 0
    threads = 32 * spec.num_warps
    regs = max(row["REG"], 1)
    by_regs = 65536 // (-(-regs * 32 // 256) * 256 * spec.num_warps)  # register allocation per warp, 256-granular
    row["progs_per_sm"] = int(min(by_regs, 2048 // threads, 32))
    return row


# --- what the launcher chooses ------------------------------------------------------

def _cfg(op: str, n: int, arch: int, dtype: str, kernel: Optional[str] = None, variant: Optional[str] = None,
         heavy: bool = False):
    from gpuloss.backends.triton.config import launch_config
    itemsize = {"float64": 8, "float32": 4}.get(dtype, 2)
    return launch_config(op, n, kernel=kernel, dtype=dtype, itemsize=itemsize, capability=(arch // 10, arch % 10),
                         variant=variant, heavy=heavy)


def _cap(cfg) -> str:
    return f" cap={cfg.maxnreg}" if cfg.maxnreg else ""


def _packed_flag(kernel: str, cfg) -> bool:
    from gpuloss.backends.triton.config import packed_upcast
    return packed_upcast(kernel, cfg)


def _acc(dtype: str):
    import triton.language as tl
    return tl.float64 if dtype == "float64" else tl.float32


#: cross-entropy feature sets: (label, constexprs, probability targets)
CE_FEATURES = (
    ("class", dict(PROB_TARGET=False, HAS_WEIGHT=False, HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=False,
                   DIV_ON_DEVICE=True, WANT_GRAD_TARGET=False), False),
    ("class+all", dict(PROB_TARGET=False, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True,
                       DIV_ON_DEVICE=True, WANT_GRAD_TARGET=False), False),
    ("prob+all", dict(PROB_TARGET=True, HAS_WEIGHT=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=False,
                      DIV_ON_DEVICE=False, WANT_GRAD_TARGET=True), True),
)


def _ce_specs(group: str, arch: int, dtype: str, n: int, features=CE_FEATURES, loss_only: bool = True):
    """Cross-entropy in the launcher's configuration for each feature set
    (the "packed" sizing depends on them: ``heavy``)."""
    out = []
    acc = _acc(dtype)
    for flabel, flags, prob in features:
        heavy = flags["PROB_TARGET"] or flags["HAS_WEIGHT"] or flags["HAS_SOFTCAP"]
        cfg = _cfg("row_fused", n, arch, dtype, kernel="cross_entropy", heavy=heavy)
        base = dict(flags, ACC=acc)
        if cfg.variant == "twopass":
            for want_grad in ((True, False) if loss_only and flabel == "class" else (True,)):
                cons = dict(base, BLOCK=cfg.block, WANT_GRAD=want_grad, REVERSE=cfg.reverse)
                label = f"{flabel}{'' if want_grad else ' loss-only'} block={cfg.block}"
                out.append(Spec(group, "cross_entropy.cross_entropy_twopass_kernel", dtype, label,
                                tuple(sorted(cons.items())), cfg.num_warps, cfg.num_stages, n, prob))
        else:
            cons = dict(base, CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2,
                        PACKED=_packed_flag("cross_entropy", cfg))
            label = f"{flabel} chunk={cfg.block} split={cfg.split}{_cap(cfg)}"
            out.append(Spec(group, "cross_entropy.cross_entropy_onchip_kernel", dtype, label,
                            tuple(sorted(cons.items())), cfg.num_warps, cfg.num_stages, n, prob, cfg.maxnreg))
    return out


def _softmax_specs(group: str, arch: int, dtype: str, n: int, cfg):
    out = []
    acc = _acc(dtype)
    for log in (False, True):
        name = "log_softmax" if log else "softmax"
        if cfg.variant == "twopass":
            cons = dict(BLOCK=cfg.block, LOG=log, ACC=acc, REVERSE=cfg.reverse)
            out.append(Spec(group, "softmax.softmax_fwd_twopass_kernel", dtype, f"{name} block={cfg.block}",
                            tuple(sorted(cons.items())), cfg.num_warps, cfg.num_stages, n))
        else:
            cons = dict(CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, LOG=log, ACC=acc,
                        PACKED=_packed_flag("softmax", cfg))
            out.append(Spec(group, "softmax.softmax_fwd_onchip_kernel", dtype,
                            f"{name} chunk={cfg.block} split={cfg.split}{_cap(cfg)}",
                            tuple(sorted(cons.items())), cfg.num_warps, cfg.num_stages, n, False, cfg.maxnreg))
    return out


def _softmax_bwd_specs(group: str, arch: int, dtype: str, n: int, cfg):
    out = []
    acc = _acc(dtype)
    for log in (False, True):
        name = "log_softmax_bwd" if log else "softmax_bwd"
        if cfg.variant == "twopass":
            cons = dict(BLOCK=cfg.block, SINGLE_BLOCK=cfg.block >= n, LOG=log, ACC=acc)
            out.append(Spec(group, "softmax.softmax_bwd_kernel", dtype, f"{name} block={cfg.block}",
                            tuple(sorted(cons.items())), cfg.num_warps, cfg.num_stages, n))
        else:
            cons = dict(CHUNK=cfg.block, SPLIT=cfg.split, SPLIT_P2=cfg.split_p2, LOG=log, ACC=acc,
                        PACKED=_packed_flag("softmax_backward", cfg))
            out.append(Spec(group, "softmax.softmax_bwd_onchip_kernel", dtype,
                            f"{name} chunk={cfg.block} split={cfg.split}{_cap(cfg)}",
                            tuple(sorted(cons.items())), cfg.num_warps, cfg.num_stages, n, False, cfg.maxnreg))
    return out


def default_specs(arch: int, dtypes: Iterable[str] = tuple(DTYPES), cols: Iterable[int] = DEFAULT_COLS,
                  full: bool = True) -> List[Spec]:
    """Every kernel in the configuration the launcher picks by default (no
    knobs) on sm_<arch>, for each storage dtype and row-length class.
    ``full=False``: the row kernels only (the CI subset)."""
    specs: List[Spec] = []
    for dtype in dtypes:
        acc = _acc(dtype)
        for n in cols:
            specs += _ce_specs("default", arch, dtype, n)
            specs += _softmax_specs("default", arch, dtype, n, _cfg("row_fused", n, arch, dtype, kernel="softmax"))
            specs += _softmax_bwd_specs("default", arch, dtype, n,
                                        _cfg("row_fused", n, arch, dtype, kernel="softmax_backward"))
            row = _cfg("row", n, arch, dtype)
            for tl_ in (True, False):
                cons = dict(BLOCK=row.block, TARGET_IS_LOGITS=tl_, WANT_GRAD=True, ACC=acc)
                specs.append(Spec("default", "kl_div.kl_div_logits_kernel", dtype,
                                  f"{'logits' if tl_ else 'probs'} block={row.block}", tuple(sorted(cons.items())),
                                  row.num_warps, row.num_stages, n, not tl_))
            for sm in (True, False):
                stats = dict(BLOCK=row.block, HAS_SOFTCAP=True, HAS_SMOOTHING=sm, ACC=acc)
                specs.append(Spec("default", "vocab_parallel.vocab_parallel_stats_kernel", dtype,
                                  f"{'smoothing+softcap' if sm else 'softcap'} block={row.block}",
                                  tuple(sorted(stats.items())), row.num_warps, row.num_stages, n))
            grad = dict(BLOCK=row.block, HAS_SOFTCAP=True, HAS_SMOOTHING=True, HAS_Z_LOSS=True, ACC=acc)
            specs.append(Spec("default", "vocab_parallel.vocab_parallel_grad_kernel", dtype,
                              f"all block={row.block}", tuple(sorted(grad.items())), row.num_warps, row.num_stages, n))
            if not full:
                continue
            cons = dict(BLOCK=row.block, HAS_WEIGHT=True, DIV_ON_DEVICE=True, WANT_GRAD=True, ACC=acc)
            specs.append(Spec("default", "cross_entropy.nll_loss_kernel", dtype, f"weight block={row.block}",
                              tuple(sorted(cons.items())), row.num_warps, row.num_stages, n))
            ew = _cfg("elementwise", n, arch, dtype)
            from gpuloss.backends.triton.config import elementwise_tile
            block_r = max(1, elementwise_tile(8 if dtype == "float64" else 4) // ew.block)
            common = dict(BLOCK_R=block_r, BLOCK_C=ew.block, REDUCE=True, WANT_GRAD=True, WANT_GRAD_TARGET=True,
                          ACC=acc)
            for name, extra in (("mse_kernel", {}), ("kl_div_kernel", dict(LOG_TARGET=False)),
                                ("bce_with_logits_kernel", dict(HAS_WEIGHT=True, HAS_POS_WEIGHT=True)),
                                ("bce_kernel", dict(HAS_WEIGHT=True))):
                specs.append(Spec("default", f"elementwise.{name}", dtype, f"tile {block_r}x{ew.block}",
                                  tuple(sorted(dict(common, **extra).items())), ew.num_warps, ew.num_stages, n, True))
        if full:
            cons = dict(BLOCK=1024, HAS_WEIGHT=True, ACC=acc)
            specs.append(Spec("default", "cross_entropy.ce_mean_divisor_kernel", dtype, "weight block=1024",
                              tuple(sorted(cons.items())), 4, 1, 1024))
    return _dedupe(specs)


def linear_acc_specs(arch: int) -> List[Spec]:
    """The split float32 accumulation of the fused linear CE's weight
    gradient (``acc_dtype="float32_split"``, opt-in): its GEMM in the tiles
    the launcher uses on sm_<arch>, adding to the halves and writing them
    first, for bf16 operands with unit inner strides (what Triton's launch
    specialises a stride of 1 to)."""
    from gpuloss.backends.triton.linear_acc import TILES
    t = TILES[90 if arch >= 90 else 80]
    out = []
    for first in (False, True):
        cons = dict(FIRST=first, BLOCK_V=t["BLOCK_V"], BLOCK_H=t["BLOCK_H"], BLOCK_K=t["BLOCK_K"],
                    GROUP_V=t["GROUP_V"], UPCAST=False, dz_stride_v=1, h_stride_h=1)
        out.append(Spec("variant", "linear_acc.split_acc_matmul_kernel", "bfloat16",
                        f"{'first' if first else 'add'} {t['BLOCK_V']}x{t['BLOCK_H']}x{t['BLOCK_K']}",
                        tuple(sorted(cons.items())), t["num_warps"], t["num_stages"], 4096))
    return out


def _dedupe(specs: List[Spec]) -> List[Spec]:
    seen, out = set(), []
    for s in specs:
        key = (s.kernel, s.dtype, s.constexprs, s.num_warps, s.num_stages, s.prob_target, s.cols % 16 == 0,
               s.maxnreg)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def variant_specs(arch: int, all_ops: bool = False) -> List[Spec]:
    """The opt-in designs in the configurations ``bench/tune.py`` sweeps at
    PERF.md's shapes (``tune.triton_configs``): CE loss + gradient (in place
    or not: the same kernel), softmax / log_softmax forward and softmax
    backward.  (CE loss only is the looped kernel whatever the variant: its
    configuration is among the defaults.)  ``all_ops``: also the ops a
    configuration is not swept for (the whole-row CE and backward, which
    spill)."""
    from gpuloss.bench import tune
    specs: List[Spec] = []
    for name, kv in tune.triton_configs():
        variant = kv.get("GPULOSS_TRITON_VARIANT")
        if variant in (None, "twopass"):
            continue  # the looped kernels: their configurations are the defaults' (above)
        with tune.env(**kv):
            for dtype, n in PERF_SHAPES:
                whole_row = name == "triton onchip whole-row"
                if whole_row and n > 32768:
                    continue  # falls back to the looped kernels (tune.py skips it too)
                tag = lambda ss: [s._replace(group="variant", label=f"{name[7:]}: {s.label}") for s in ss]  # noqa
                specs += tag(_softmax_specs("variant", arch, dtype, n,
                                            _cfg("row_fused", n, arch, dtype, kernel="softmax")))
                if whole_row and not all_ops:
                    continue  # swept for softmax forward only (tune.WHOLE_ROW_OPS)
                specs += tag(_ce_specs("variant", arch, dtype, n, CE_FEATURES, False))
                specs += tag(_softmax_bwd_specs("variant", arch, dtype, n,
                                                _cfg("row_fused", n, arch, dtype, kernel="softmax_backward")))
    return _dedupe(specs)


def spills(row: Dict[str, Any]) -> bool:
    """A compiled configuration that spills registers (or failed to compile)."""
    return "error" in row or bool(row.get("SPILL") or row.get("LOCAL"))


def run(specs_by_arch: Dict[int, List[Spec]], out=sys.stdout) -> List[Dict[str, Any]]:
    rows = []
    hdr = (f"{'arch':5s} {'kernel':42s} {'dtype':8s} {'C':>6s} {'configuration':58s} {'w':>2s} {'st':>2s} "
           f"{'REG':>3s} {'STACK':>5s} {'LOCAL':>5s} {'SPILL':>5s} {'SHARED':>6s} {'DYN':>6s} {'progs/SM':>8s}")
    print(hdr, file=out, flush=True)
    for arch, specs in specs_by_arch.items():
        for spec in specs:
            r = compile_spec(spec, arch)
            rows.append(r)
            kern = spec.kernel.split(".")[1].replace("_kernel", "")
            head = f"sm_{arch} {kern:42s} {spec.dtype:8s} {spec.cols:6d} {spec.label[:58]:58s} " \
                   f"{spec.num_warps:2d} {spec.num_stages:2d}"
            if "error" in r:
                print(f"{head} FAILS: {r['error']}", file=out, flush=True)
            else:
                flag = "  SPILLS" if spills(r) else ""
                print(f"{head} {r['REG']:3d} {r['STACK']:5d} {r['LOCAL']:5d} {r['SPILL']:5d} {r['SHARED']:6d} "
                      f"{r['DYN']:6d} {r['progs_per_sm']:8d}{flag}", file=out, flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpuloss.bench.resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", choices=("default", "variant", "all"), default="default")
    ap.add_argument("--arch", default=",".join(str(a) for a in ARCHS), help="e.g. 80,90")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--cols", default=",".join(str(c) for c in DEFAULT_COLS),
                    help="row lengths of the default configurations")
    ap.add_argument("--rows-only", action="store_true", help="only the row kernels (softmax, CE, KL, vocab-parallel)")
    ap.add_argument("--preset", choices=("ci",), default=None,
                    help="ci: the CI subset (tests/test_triton_resources.py): the default row kernels at the "
                         "largest blocks for bf16 / fp32 / fp64 at sm_80 and sm_90, and every swept "
                         "opt-in configuration at sm_90")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    by_arch: Dict[int, List[Spec]] = {}
    if args.preset == "ci":
        for arch in ARCHS:
            by_arch[arch] = default_specs(arch, ("bfloat16", "float32", "float64"), cols=(32000,), full=False)
        by_arch[90] = by_arch[90] + variant_specs(90)
        for arch in ARCHS:
            by_arch[arch] = by_arch[arch] + linear_acc_specs(arch)
    else:
        cols = [int(c) for c in args.cols.split(",")]
        for arch in (int(a) for a in args.arch.split(",")):
            specs: List[Spec] = []
            if args.group in ("default", "all"):
                specs += default_specs(arch, args.dtypes.split(","), cols=cols, full=not args.rows_only)
            if args.group in ("variant", "all"):
                specs += variant_specs(arch) + linear_acc_specs(arch)
            by_arch[arch] = specs
    rows = run(by_arch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    bad = [r for r in rows if spills(r)]
    print(f"{len(rows)} configurations, {len(bad)} that spill or fail", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
