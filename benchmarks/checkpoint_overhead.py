"""Step time with a checkpoint every 10 steps versus no checkpoints.

The reference training shape (d_model 384, 6 layers, 6 heads, MLP 1536,
seq 256, global batch 8, byte vocabulary, the built-in stdlib corpus). One
process compiles the train step once, then trains in alternating chunks of
`--chunk` steps: without saves, and with an async `Manager.save` every 10
steps (at chunk steps 5, 15, 25, ... so each save's background write ends
inside its own chunk). Each iteration does what `llmlab.train` does: dispatch
the step, read the previous step's metrics, and before a save read the
current step's (which is how the loop orders rows and checkpoints).

Alternating chunks make slow drifts of a shared machine's load hit both
settings alike. Reported: mean wall time per step of each setting (compile
excluded), the overhead, process CPU time per step (insensitive to other
processes), and how long each `save` call blocked the loop. Goal: <= 5%.

    python benchmarks/checkpoint_overhead.py [--rounds=2] [--chunk=30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def reference_config(steps: int, every: int):
  from llmlab import config as config_lib
  c = config_lib.base()
  c.name = "checkpoint_overhead"
  c.model.update(num_layers=6, d_model=384, num_heads=6, num_kv_heads=6,
                 mlp_dim=1536)
  c.train.update(steps=steps, batch_size=8, seq_len=256, log_every=1)
  c.checkpoint.update(every_steps=every, keep=2)
  return c


class Trainer:
  """The train loop's per-step work, with optional saves."""

  def __init__(self, cfg, workdir: str):
    import jax
    from llmlab import checkpoints as ckpt_lib
    from llmlab import config as config_lib
    from llmlab import sharding as shd
    from llmlab import steps as steps_lib
    from llmlab import train
    self.jax, self.shd = jax, shd
    cfg, self.data, self.setup = train.prepare(cfg, workdir)
    self.state = train.initial_state(self.setup, cfg)
    self.step_fn = steps_lib.make_train_step(self.setup)
    self.it = self.data.train_iter(0)
    self.mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps)
    self.meta = {"config": config_lib.to_dict(cfg),
                 "model_info": train.model_info(cfg, self.data.vocab_size)}
    self.step = 0
    self.pending = None
    self.save_blocking_s = []

  def one(self, save: bool) -> None:
    batch = self.shd.global_batch(next(self.it), self.setup.batch_sharding)
    self.state, m = self.step_fn(self.state, batch)
    self.step += 1
    if self.pending is not None:
      self.jax.device_get(self.pending)
    self.pending = m
    if save:
      self.jax.device_get(self.pending)
      self.pending = None
      t = time.perf_counter()
      self.mgr.save(self.step, self.state, dict(self.meta, step=self.step),
                    force=True)
      self.save_blocking_s.append(time.perf_counter() - t)

  def chunk(self, n: int, every: int) -> tuple[float, float]:
    """(wall s, process CPU s) of n steps; saves at steps 5, 15, ... mod
    `every` when every > 0; ends when all work (and writes) is done."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
      self.one(save=every > 0 and i % every == every // 2)
    self.jax.block_until_ready(self.state)
    self.mgr.wait()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--chunk", type=int, default=30)
  p.add_argument("--every", type=int, default=10)
  args = p.parse_args()
  logging.basicConfig(level=logging.WARNING)
  workdir = tempfile.mkdtemp(prefix="ckpt_overhead_")
  total = 2 + 2 * args.rounds * args.chunk
  t = Trainer(reference_config(total, args.every), workdir)
  t0 = time.perf_counter()
  t.chunk(2, 0)  # compile + first steps
  compile_s = time.perf_counter() - t0
  wall = {0: [], args.every: []}
  cpu = {0: [], args.every: []}
  for _ in range(args.rounds):
    for every in (0, args.every):
      w, c = t.chunk(args.chunk, every)
      wall[every].append(w / args.chunk)
      cpu[every].append(c / args.chunk)
      print(json.dumps({"every": every, "wall_step_s": round(w / args.chunk, 4),
                        "cpu_step_s": round(c / args.chunk, 4)}),
            file=sys.stderr, flush=True)
  t.mgr.close()
  ckpt = os.path.join(workdir, "checkpoints", str(t.mgr.latest_step()))
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(ckpt) for f in fs)
  base, saving = statistics.mean(wall[0]), statistics.mean(wall[args.every])
  cbase, csaving = statistics.mean(cpu[0]), statistics.mean(cpu[args.every])
  print(json.dumps({
      "shape": "d384 L6 H6 mlp1536 seq256 batch8 byte vocab",
      "steps_per_setting": args.rounds * args.chunk,
      "saves": len(t.save_blocking_s), "checkpoint_mb": round(size / 2**20, 1),
      "compile_s": round(compile_s, 1),
      "mean_step_s_no_saves": round(base, 4),
      f"mean_step_s_save_every_{args.every}": round(saving, 4),
      "overhead_pct": round(100 * (saving / base - 1), 2),
      "cpu_step_s_no_saves": round(cbase, 4),
      f"cpu_step_s_save_every_{args.every}": round(csaving, 4),
      "cpu_overhead_pct": round(100 * (csaving / cbase - 1), 2),
      "save_blocking_s_mean": round(statistics.mean(t.save_blocking_s), 3),
      "save_blocking_s": [round(s, 3) for s in t.save_blocking_s],
      "per_chunk_wall_step_s": {str(k): [round(v, 4) for v in vs]
                                for k, vs in wall.items()},
      "goal_pct": 5.0,
  }))


if __name__ == "__main__":
  main()
