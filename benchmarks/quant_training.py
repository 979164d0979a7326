"""Quantisation-aware training (model.quant=int8, qwix) against bf16 on CPU.

Two runs of the tiny model (configs/tiny.py: 2 layers, d_model 128, byte
vocabulary, the built-in stdlib corpus) at equal steps, data and seed, both
with bf16 activations and matmuls (model.dtype=bfloat16, float32 params and
optimizer state, as MaxText trains):
  - bf16: float products;
  - int8: the same with model.quant=int8 (weights, activations and
    gradients of the layers' weight products in int8, llmlab/quant.py).
Printed: each run's final train loss (mean of the last `--tail` logged
rows) and eval loss, the int8/bf16 ratio (goal: within 2%), then
`llmlab eval --quantize=int8` of both checkpoints: the QAT model evaluated
with int8 weights (its own quantised forward) against post-training int8
weights of the bf16 model (goal: the QAT model's loss is lower).

    python benchmarks/quant_training.py [--steps=300] [--workdir=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def config(steps: int, quant: str):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny  # noqa: PLC0415
  c = tiny.get_config()
  c.name = f"quant_{quant}"
  c.model.dtype = "bfloat16"
  c.model.quant = quant
  c.train.steps = steps
  c.train.eval_every = 0  # the final eval only
  c.checkpoint.every_steps = 0
  return c


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--tail", type=int, default=3,
                  help="logged train rows averaged for the final loss")
  ap.add_argument("--workdir", default="")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from llmlab import evaluate  # noqa: PLC0415
  from llmlab import runs  # noqa: PLC0415
  from llmlab import train as train_lib  # noqa: PLC0415

  root = args.workdir or tempfile.mkdtemp(prefix="quant_bench_")
  out = {}
  for quant in ("none", "int8"):
    wd = os.path.join(root, quant)
    t0 = time.perf_counter()
    train_lib.train(config(args.steps, quant), wd)
    rows = runs.metrics_rows(wd)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    ev = evaluate.evaluate_run(wd, quantize="int8")
    out[quant] = {"train_loss": statistics.mean(losses[-args.tail:]),
                  "eval_loss": evals[-1] if evals else None,
                  "eval_loss_int8": ev["eval_loss"],
                  "eval_loss_unrounded_weights": ev["float_eval_loss"],
                  "wall_s": time.perf_counter() - t0, "workdir": wd}
  bf, q = out["none"], out["int8"]
  ratio = q["train_loss"] / bf["train_loss"]
  print(json.dumps(out, indent=1))
  print(f"steps {args.steps}, tiny model, bf16 activations; train loss = "
        f"mean of the last {args.tail} logged rows")
  print(f"train loss  bf16 {bf['train_loss']:.4f}  int8 QAT "
        f"{q['train_loss']:.4f}  ratio {ratio:.4f} "
        f"({100 * (ratio - 1):+.2f}%, goal within 2%: "
        f"{'yes' if abs(ratio - 1) <= 0.02 else 'NO'})")
  print(f"eval loss   bf16 {bf['eval_loss']:.4f}  int8 QAT "
        f"{q['eval_loss']:.4f}")
  print(f"eval --quantize=int8: bf16 model (post-training int8) "
        f"{bf['eval_loss_int8']:.4f}  QAT model {q['eval_loss_int8']:.4f} "
        f"-> QAT {'beats' if q['eval_loss_int8'] < bf['eval_loss_int8'] else 'does NOT beat'}"
        f" PTQ by {bf['eval_loss_int8'] - q['eval_loss_int8']:+.4f} nats")


if __name__ == "__main__":
  main()
