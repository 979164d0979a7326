"""Quantisation-aware training (model.quant=int8, qwix) against bf16 on CPU.

Two runs of the tiny model (configs/tiny.py: 2 layers, d_model 128, byte
vocabulary, the built-in stdlib corpus) per seed, at equal steps and data,
both with bf16 activations and matmuls (model.dtype=bfloat16, float32
params and optimizer state, as MaxText trains):
  - bf16: float products;
  - int8: the same with model.quant=int8 (weights, activations and
    gradients of the layers' weight products in int8, llmlab/quant.py).
Printed per seed: each run's final train loss (mean of the last `--tail`
logged rows) and eval loss, the int8/bf16 ratio (goal: within 2%); then
`llmlab eval --quantize=int8` of both checkpoints (int8 weights): the QAT
model (which also evaluates with its int8 activations) against
post-training int8 of the bf16 model, both weight-only (what `eval
--quantize=int8` does to a float run) and weights + activations (the bf16
checkpoint evaluated through the same int8 forward as the QAT model). Goal:
the QAT model's loss is lower.

    python benchmarks/quant_training.py [--steps=300] [--seeds=0] [--workdir=DIR]
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


def config(steps: int, quant: str, seed: int):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny  # noqa: PLC0415
  c = tiny.get_config()
  c.name = f"quant_{quant}"
  c.model.dtype = "bfloat16"
  c.model.quant = quant
  c.train.steps = steps
  c.train.seed = seed
  c.train.eval_every = 0  # the final eval only
  c.checkpoint.every_steps = 0
  return c


def ptq_w8a8(workdir: str) -> float:
  """Eval loss of a float run's checkpoint through the int8 forward
  (model.quant=int8: weights and activations rounded), int8 weights."""
  import jax  # noqa: PLC0415
  from llmlab import api, data as data_lib, runs  # noqa: PLC0415
  from llmlab import steps as steps_lib  # noqa: PLC0415
  from llmlab.compress import quantize as quantize_lib  # noqa: PLC0415
  run = api.load(workdir)
  cfg = runs.derive(run.config, {"model.quant": "int8"})
  setup = runs.setup_for(cfg, run.info)
  data = data_lib.build(cfg.data, seq_len=cfg.train.seq_len,
                        global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                        process_index=jax.process_index(),
                        process_count=jax.process_count())
  batches = data.eval_batches(cfg.train.eval_tokens,
                              cfg.train.eval_batch_size or cfg.train.batch_size)
  params, _ = quantize_lib.roundtrip(run.params, "int8")
  return steps_lib.evaluate(setup, steps_lib.make_eval_step(setup), params,
                            batches)["eval_loss"]


def one_seed(root: str, steps: int, seed: int, tail: int) -> dict:
  from llmlab import evaluate  # noqa: PLC0415
  from llmlab import runs  # noqa: PLC0415
  from llmlab import train as train_lib  # noqa: PLC0415
  out = {}
  for quant in ("none", "int8"):
    wd = os.path.join(root, f"seed{seed}", quant)
    t0 = time.perf_counter()
    if not runs.finished(wd, steps):
      train_lib.train(config(steps, quant, seed), wd)
    rows = runs.metrics_rows(wd)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    ev = evaluate.evaluate_run(wd, quantize="int8")
    out[quant] = {"train_loss": statistics.mean(losses[-tail:]),
                  "eval_loss": evals[-1] if evals else None,
                  "eval_loss_int8": ev["eval_loss"],
                  "wall_s": time.perf_counter() - t0, "workdir": wd}
  out["none"]["eval_loss_int8_w8a8"] = ptq_w8a8(out["none"]["workdir"])
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--seeds", default="0", help="comma-separated train seeds")
  ap.add_argument("--tail", type=int, default=3,
                  help="logged train rows averaged for the final loss")
  ap.add_argument("--workdir", default="")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  root = args.workdir or tempfile.mkdtemp(prefix="quant_bench_")
  res = {int(s): one_seed(root, args.steps, int(s), args.tail)
         for s in args.seeds.split(",")}
  print(json.dumps(res, indent=1))
  print(f"tiny model, {args.steps} steps, bf16 activations; train loss = "
        f"mean of the last {args.tail} logged rows (every "
        f"{config(1, 'none', 0).train.log_every} steps)")
  for seed, out in res.items():
    bf, q = out["none"], out["int8"]
    ratio = q["train_loss"] / bf["train_loss"]
    print(f"seed {seed}: train loss bf16 {bf['train_loss']:.4f}  int8 "
          f"{q['train_loss']:.4f}  ratio {ratio:.4f} "
          f"({100 * (ratio - 1):+.2f}%; within 2%: "
          f"{'yes' if abs(ratio - 1) <= 0.02 else 'NO'})  |  eval loss bf16 "
          f"{bf['eval_loss']:.4f}  int8 {q['eval_loss']:.4f}")
    best_ptq = min(bf["eval_loss_int8"], bf["eval_loss_int8_w8a8"])
    print(f"  eval --quantize=int8: QAT {q['eval_loss_int8']:.4f}  vs  "
          f"bf16 + PTQ int8 weights {bf['eval_loss_int8']:.4f}, "
          f"weights+activations {bf['eval_loss_int8_w8a8']:.4f} -> QAT "
          f"{'beats' if q['eval_loss_int8'] < best_ptq else 'does NOT beat'}"
          f" both (margin {best_ptq - q['eval_loss_int8']:+.4f} nats)")


if __name__ == "__main__":
  main()
