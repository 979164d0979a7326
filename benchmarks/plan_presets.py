"""Every TPU preset compiled for its own slice by the TPU compiler (libtpu),
on this machine: per-device temporaries and peak against the chip's HBM,
and XLA's estimated step time and MFU (`llmlab plan --target`, see
llmlab/plan.py for how the estimate counts loops).

    pip install "llmlab[tpu]"
    python benchmarks/plan_presets.py [--presets=7b_v5p128,7b_v5p128_s8192]
        [--vocab_size=32000] [--chunk_vocab=128256] [--out=plan.jsonl]
        [--rows='1b_v5p32,model.attention=splash;7b_v5p128']

Rows: each preset of configs/presets.py:TARGETS with XLA's attention
(model.attention=xla, materialised scores) and with splash (the Pallas
kernel that `auto` picks on TPU); the seq-8192 presets also
in one microbatch; then the --chunk_preset with a --chunk_vocab vocabulary
with and without `model.logits_chunk`.
A step XLA refuses to compile (scoped VMEM or HBM out of memory) is a row
with its reason. Each row is one `llmlab plan --target --json` process,
compiled with libtpu's default flags (or the environment's
LIBTPU_INIT_ARGS; `--recipe_flags` for launch/tpu.sh's, ~20x slower to
compile). A row compiles 3 programs (the step, then 2 and 3 layers
unrolled for the cost model; `estimate=false` rows only the step): minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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


def row(preset: str, overrides: dict, vocab: int, estimate=True) -> dict:
  """`llmlab plan --target --json` of a preset, in its own process: libtpu
  reads its flags (LIBTPU_INIT_ARGS) once per process. No search: the figures are the point."""
  from configs import presets
  cmd = [sys.executable, "-m", "llmlab", "plan", "--json",
         f"--config={ROOT}/configs/presets.py:{preset}",
         f"--target={presets.TARGETS[preset]}", f"--vocab_size={vocab}",
         "--nosuggest", f"--estimate={estimate}"] + [
             f"--config.{k}={v}" for k, v in overrides.items()]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if out.returncode not in (0, 1):
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  res = json.loads(out.stdout)
  return {"preset": preset, "overrides": overrides, "vocab": vocab,
          "target": res["target"], "fits": res["fits"],
          "temp_gib": _gib(res["temp_bytes"]),
          "peak_gib": _gib(res["bytes_per_device"]),
          "hbm_gib": _gib(res["hbm_bytes"]),
          "step_s": res["estimated_step_s"], "mfu": res["estimated_mfu"],
          "flops_per_step": res["flops_per_step"],
          "model_flops_per_step": res["model_flops_per_step"],
          "compile_error": res["compile_error"], "hints": res["hints"],
          "libtpu_init_args": res["libtpu_init_args"],
          "step_compile_s": res["compile_s"],
          "estimate_compile_s": (res["estimate"] or {}).get("compile_s"),
          "kernel_s": ((res["estimate"] or {}).get("kernel") or {}).get(
              "seconds"),
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
            + (f"step {r['step_s']:.3f} s" if r["step_s"] else "no estimate")
            + (f" (splash {r['kernel_s']:.3f} s)" if r.get("kernel_s") else "")
            + f"  MFU {100 * (r['mfu'] or 0):.1f}%")
  est = r["estimate_compile_s"]
  return (f"{r['preset']:<17} {r['target']:<8} V={r['vocab']:<6} {over:<26} "
          f"{what}  [compile: step {r['step_compile_s']:.0f} s"
          + (f", estimate {est:.0f} s]" if est else "]"))


def main() -> None:
  from configs import presets
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", default=",".join(presets.TARGETS))
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--chunk_preset", default="1b_v5p32")
  p.add_argument("--chunk_vocab", type=int, default=128256)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--rows", default="", help="Only these rows, ';'-separated"
                 ": 'PRESET[,key=value...][,vocab=V][,estimate=false]' (e.g. "
                 "'1b_v5p32,model.attention=splash;7b_v5p128').")
  p.add_argument("--out", default="", help="JSON lines, one per row, "
                 "appended as each row finishes.")
  args = p.parse_args()
  rows = []
  plan = []
  for spec in filter(None, args.rows.split(";")):
    name, *kv = spec.split(",")
    vocab = int(next((x.split("=")[1] for x in kv if x.startswith("vocab=")),
                     args.vocab_size))
    plan.append((name, dict(x.split("=", 1) for x in kv
                            if x.split("=")[0] not in ("vocab", "estimate")),
                 vocab, "estimate=false" not in kv))
  for name in filter(None, [] if plan else args.presets.split(",")):
    for a in attentions():
      over = {"model.attention": a} if a != "xla" else {}
      plan.append((name, over, args.vocab_size, True))
      if presets.get_config(name).train.microbatches > 1 and "_s" in name:
        # The step in one piece: what the microbatches are for (xla) or
        # whether they are needed at all (splash).
        plan.append((name, dict(over, **{"train.microbatches": 1}),
                     args.vocab_size, True))
  if args.chunk_preset and not args.rows:
    plan += [(args.chunk_preset, {}, args.chunk_vocab, False),
             (args.chunk_preset, {"model.logits_chunk": args.chunk},
              args.chunk_vocab, False)]
  for name, overrides, vocab, estimate in plan:
    rows.append(row(name, overrides, vocab, estimate))
    print(show(rows[-1]), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(rows[-1]) + "\n")


if __name__ == "__main__":
  main()
