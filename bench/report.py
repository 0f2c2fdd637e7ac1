"""Outputs of a benchmark run: the table, CSV, JSON and the GB/s-vs-V plots."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional

CSV_FIELDS = ["op", "shape", "dtype", "impl", "group", "tag", "status", "time_ms", "gbps", "frac_floor",
              "floor_bytes", "mem_extra_bytes", "check", "speedups"]


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def speedup_text(row: Dict[str, Any]) -> str:
    sp = row.get("speedups") or {}
    return ", ".join(f"{v:.2f}x vs {k}" for k, v in sp.items())


def format_table(rows: List[Dict[str, Any]], copy_bw: float, meta: Dict[str, Any]) -> str:
    """A Markdown table (pasteable into bench/RESULTS.md), one line per
    implementation, grouped by op, shape and dtype."""
    lines = [f"{meta.get('card', '?')} | {meta.get('date', '?')} | commit {meta.get('git_commit', '?')}"
             f" | copy bandwidth {copy_bw / 1e9:.1f} GB/s (read+write)",
             "",
             "| op | shape | dtype | impl | median ms | GB/s | floor | extra MiB | status / speedup |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"]
        if status == "ok":
            status = speedup_text(r) or "ok"
        mem = r.get("mem_extra_bytes")
        lines.append("| {op} | {shape} | {dtype} | {impl} | {ms} | {gbps} | {frac} | {mem} | {st} |".format(
            op=r["op"], shape=r["shape"], dtype=r["dtype"], impl=r["impl"],
            ms=_fmt(r.get("time_ms"), ".3f"), gbps=_fmt(r.get("gbps"), ".1f"),
            frac=_fmt(r.get("frac_floor"), ".2f"),
            mem="-" if mem is None else f"{mem / 2**20:.0f}", st=status.replace("|", "/")))
    return "\n".join(lines)


def write_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r2 = dict(r)
            r2["speedups"] = ";".join(f"{k}={v:.4f}" for k, v in (r.get("speedups") or {}).items())
            w.writerow(r2)


def write_json(path: str, meta: Dict[str, Any], impls: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "implementations": impls, "rows": rows}, f, indent=1, default=str)


def write_plots(out_dir: str, rows: List[Dict[str, Any]], copy_bw: float, card: str) -> List[str]:
    """GB/s against V for each implementation over the sweep rows, one PNG
    per (op, dtype), with the copy bandwidth as a horizontal line.  Returns
    the files written; raises ImportError when matplotlib is missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: List[str] = []
    groups: Dict[tuple, Dict[str, List[tuple]]] = {}
    for r in rows:
        if r.get("tag") != "sweep" or r["status"] != "ok" or r.get("gbps") is None:
            continue
        v = int(r["shape"].split("x")[-1])
        groups.setdefault((r["op"], r["dtype"]), {}).setdefault(r["impl"], []).append((v, r["gbps"]))
    for (op, dtype), by_impl in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl, pts in by_impl.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.axhline(copy_bw / 1e9, color="k", linestyle="--", linewidth=1,
                   label=f"device copy {copy_bw / 1e9:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("V (row length); N*V fixed")
        ax.set_ylabel("GB/s (floor bytes / median time)")
        ax.set_title(f"{op} {dtype} on {card}", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"gbps_{op}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
