"""Every TPU preset compiled for its own slice by the TPU compiler (libtpu),
on this machine: per-device temporaries and peak against the chip's HBM,
and XLA's estimated step time and MFU (`llmlab plan --target`, see
llmlab/plan.py for how the estimate counts loops).

    pip install "llmlab[tpu]"
    python benchmarks/plan_presets.py [--presets=7b_v5p128,7b_v5p128_s8192]
        [--vocab_size=32000] [--chunk_vocab=128256] [--out=plan.json]

Rows: each preset of configs/presets.py:TARGETS with today's attention
(model.attention=xla, the only one before splash attention lands) and, once
llmlab has `model.attention`, with splash too; then the --chunk_preset
with a --chunk_vocab vocabulary with and without `model.logits_chunk`.
A step XLA refuses to compile (scoped VMEM out of memory) is a row with
its reason. Every preset compiles 3 programs (the step, then 2 and 3
layers unrolled for the cost model): minutes each on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

GiB = 1024 ** 3


def attentions() -> list[str]:
  """xla, plus splash once this llmlab's config has model.attention."""
  from llmlab import config as config_lib
  return ["xla", "splash"] if "attention" in config_lib.base().model else [
      "xla"]


def row(preset: str, overrides: dict, vocab: int) -> dict:
  """One `plan_target` of a preset (no search: the figures are the point)."""
  from configs import presets
  from llmlab import config as config_lib
  from llmlab import plan
  cfg = config_lib.with_overrides(presets.get_config(preset), overrides)
  t0 = time.perf_counter()
  res = plan.plan_target(cfg, presets.TARGETS[preset], vocab_size=vocab,
                         suggest=False)
  return {"preset": preset, "overrides": overrides, "vocab": vocab,
          "target": res["target"], "fits": res["fits"],
          "temp_gib": _gib(res["temp_bytes"]),
          "peak_gib": _gib(res["bytes_per_device"]),
          "hbm_gib": _gib(res["hbm_bytes"]),
          "step_s": res["estimated_step_s"], "mfu": res["estimated_mfu"],
          "flops_per_step": res["flops_per_step"],
          "model_flops_per_step": res["model_flops_per_step"],
          "compile_error": res["compile_error"], "hints": res["hints"],
          "wall_s": time.perf_counter() - t0}


def _gib(n):
  return None if n is None else n / GiB


def show(r: dict) -> str:
  over = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
  if r["compile_error"]:
    what = f"does not compile: {r['compile_error'][:160]}"
  else:
    what = (f"temp {r['temp_gib']:7.2f} GiB  peak {r['peak_gib']:7.2f} / "
            f"{r['hbm_gib']:.0f} GiB {'fits' if r['fits'] else 'NO'}  "
            f"step {r['step_s']:.3f} s  MFU {100 * (r['mfu'] or 0):.1f}%")
  return (f"{r['preset']:<17} {r['target']:<8} V={r['vocab']:<6} {over:<34} "
          f"{what}  [{r['wall_s']:.0f} s]")


def main() -> None:
  from configs import presets
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", default=",".join(presets.TARGETS))
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--chunk_preset", default="1b_v5p32")
  p.add_argument("--chunk_vocab", type=int, default=128256)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--out", default="")
  args = p.parse_args()
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  plan = [(name, {"model.attention": a} if a != "xla" else {},
           args.vocab_size)
          for name in filter(None, args.presets.split(","))
          for a in attentions()]
  if args.chunk_preset:
    plan += [(args.chunk_preset, {}, args.chunk_vocab),
             (args.chunk_preset, {"model.logits_chunk": args.chunk},
              args.chunk_vocab)]
  for name, overrides, vocab in plan:
    rows.append(row(name, overrides, vocab))
    print(show(rows[-1]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
