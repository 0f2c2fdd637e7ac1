"""One training step of a transformers Llama with and without gpuloss: peak memory and time.

``python -m gpuloss.bench.hf_step --out DIR`` (well under two minutes on an H100/H200)::

    LlamaForCausalLM, Llama-3.2-1B's widths (hidden 2048, MLP 8192, 32 heads, 8 KV
    heads, tied embeddings) and vocabulary (128256), 4 layers instead of 16 so
    that the output layer dominates; bf16 weights; 2 x 8192 tokens

Variants, each on a fresh model with the same weights and batch:

* ``unpatched``: transformers' own forward and loss (fp32 copy of the logits);
* ``gpuloss``: ``apply_gpuloss(model)`` (fused linear + cross-entropy, no logits);
* ``gpuloss-ce``: ``apply_gpuloss(model, fused_linear=False)`` (logits kept,
  gpuloss's cross-entropy on them);
* ``liger``: Liger-Kernel's fused linear cross-entropy for this instance only
  (``apply_liger_kernel_to_llama(model=..., fused_linear_cross_entropy=True)``,
  its other kernels off so that only the loss differs), when installed; run
  last, in case its patch reaches beyond the instance.

A step is forward + backward (no optimizer: it is the same for every variant).
Time: median of ``--steps`` timed steps after one warm-up (CUDA events).
Memory: ``torch.cuda.max_memory_allocated`` during a step, in all and above the
allocation before it (the weights; gradients are freed between steps).
Check: each variant's loss and the norm of its weight gradients against
``unpatched`` (bf16: agreement to a few 1e-3 relative is expected).

``--device cpu --tiny`` runs the same code on a tiny config on the CPU (no
memory column): a dry run of everything but the GPU.
Writes ``hf_step.json`` and ``hf_step.md`` to ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

GIB = float(1 << 30)
VARIANTS = ("unpatched", "gpuloss", "gpuloss-ce", "liger")


def _config(tiny: bool, layers: int):
    import transformers
    if tiny:
        return transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True)
    return transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                    tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 500000.0})


def _patch(name: str, model) -> Optional[str]:
    """Apply variant ``name`` to ``model``; returns why it cannot run, or None."""
    if name == "unpatched":
        return None
    if name in ("gpuloss", "gpuloss-ce"):
        from gpuloss.integrations.transformers import apply_gpuloss
        apply_gpuloss(model, fused_linear=(name == "gpuloss"))
        return None
    if name == "liger":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
        except Exception as e:  # not installed, or not for this transformers
            return f"n/a: liger_kernel not importable ({type(e).__name__}: {str(e)[:120]})"
        apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True,
                                    rms_norm=False, swiglu=False, model=model)
        return None
    raise ValueError(f"unknown variant {name!r}")


class _Clock:
    """CUDA events on a GPU, perf_counter on the CPU; peak memory on a GPU only."""

    def __init__(self, device):
        import torch
        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def peak(self, fn: Callable[[], Any]):
        """(peak bytes allocated during fn, bytes allocated before it), or Nones on the CPU."""
        if not self.cuda:
            fn()
            return None, None
        self.sync()
        before = self.torch.cuda.memory_allocated(self.device)
        self.torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return self.torch.cuda.max_memory_allocated(self.device), before


def _measure(model, ids, labels, clock: "_Clock", steps: int) -> Dict[str, Any]:
    """Median step time, peak memory, loss and gradient norm of training steps."""
    import torch
    model.train()
    out: Dict[str, Any] = {}

    def step():
        # the previous step's gradients are freed first (set_to_none is
        # host-only); nothing of a step outlives it but the loss
        model.zero_grad(set_to_none=True)
        o = model(input_ids=ids, labels=labels)
        o.loss.backward()
        out["loss"], out["logits_none"] = o.loss.detach(), o.logits is None

    step()  # warm-up: kernels compiled, allocator primed
    model.zero_grad(set_to_none=True)
    peak, before = clock.peak(step)
    times = [clock.time_ms(step) for _ in range(steps)]
    gnorm = float(torch.linalg.vector_norm(
        torch.stack([p.grad.float().norm() for p in model.parameters() if p.grad is not None])))
    row = dict(status="ok", time_ms=statistics.median(times), loss=float(out["loss"].float()), grad_norm=gnorm,
               logits="none" if out["logits_none"] else "kept")
    if peak is not None:
        row.update(peak_gib=peak / GIB, peak_over_weights_gib=(peak - before) / GIB)
    return row


def _meta(device_name: str, tiny: bool, batch: int, seq: int, steps: int, cfg, dtype) -> Dict[str, Any]:
    import torch
    import transformers
    card = torch.cuda.get_device_name(torch.device(device_name)) if device_name.startswith("cuda") else "cpu"
    meta = {"device": device_name, "card": card, "tiny": tiny, "batch": batch, "seq": seq,
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "dtype": str(dtype).replace("torch.", ""), "steps": steps,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        meta["liger_kernel"] = version("liger-kernel")
    except Exception:
        meta["liger_kernel"] = None
    return meta


def run(device_name: str, tiny: bool, batch: int, seq: int, layers: int, steps: int,
        variants: List[str]) -> Dict[str, Any]:
    import torch
    import transformers
    device = torch.device(device_name)
    dtype = torch.float32 if (tiny and device.type == "cpu") else torch.bfloat16
    cfg = _config(tiny, layers)
    clock = _Clock(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 16] = -100  # a prompt that is not scored
    state = None  # the first model's weights, loaded into every later one
    rows: List[Dict[str, Any]] = []
    ref = None  # the unpatched model's row
    for name in variants:
        row: Dict[str, Any] = {"variant": name}
        model = None
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                                      attn_implementation="sdpa")
            if state is None:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                model.load_state_dict(state)
            why = _patch(name, model)
            row.update({"status": why} if why is not None else _measure(model, ids, labels, clock, steps))
            if name == "unpatched" and why is None:
                ref = row
            elif ref is not None and why is None:
                row["loss_rel_diff"] = abs(row["loss"] - ref["loss"]) / abs(ref["loss"])
                row["grad_norm_rel_diff"] = abs(row["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
        except Exception as e:  # one failing variant must not lose the others
            row["status"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        except KeyboardInterrupt:  # the time limit: the variants measured so far are written
            row["status"] = "stopped: interrupted (time limit)"
            rows.append(row)
            break
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return {"meta": _meta(device_name, tiny, batch, seq, steps, cfg, dtype), "rows": rows}


def table(result: Dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# transformers training step (forward + backward): Llama {m['layers']} layers, hidden {m['hidden']}, "
             f"vocab {m['vocab']}, {m['dtype']}, {m['batch']} x {m['seq']} tokens, {m['card']} ({m['date']}; "
             f"torch {m['torch']}, transformers {m['transformers']}, liger-kernel {m['liger_kernel']})", "",
             "| variant | median ms | peak GiB | peak above weights GiB | logits | loss | rel. diff loss / grad norm "
             "| status |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        diff = f"{r['loss_rel_diff']:.1e} / {r['grad_norm_rel_diff']:.1e}" if "loss_rel_diff" in r else ""
        lines.append(f"| {r['variant']} | {f('time_ms', '{:.1f}')} | {f('peak_gib', '{:.2f}')} | "
                     f"{f('peak_over_weights_gib', '{:.2f}')} | {r.get('logits', '')} | {f('loss', '{:.4f}')} | "
                     f"{diff} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuloss.bench.hf_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny config (a dry run of the script)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 2; tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 8192; tiny: 64)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list (default {','.join(VARIANTS)})")
    p.add_argument("--out", default=None, help="output folder (default bench/out/hf_step-<date>)")
    args = p.parse_args(argv)
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("hf_step bench: needs a CUDA device (or --device cpu --tiny)", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    batch = args.batch or 2
    seq = args.seq or (64 if args.tiny else 8192)
    result = run(args.device, args.tiny, batch, seq, args.layers, args.steps, variants)
    out = args.out or os.path.join("bench", "out", "hf_step-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "hf_step.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = table(result)
    with open(os.path.join(out, "hf_step.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("n/a") for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
