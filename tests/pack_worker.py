"""A check for tests/test_sharding.py, run on 8 simulated CPU devices by
the session's `devices(8)` process (`main(dir)`): a study's runs packed
side by side (llmlab/experiment.py `train_all`), as a study packs its small
members onto one TPU slice. Returns each run's per-step losses packed (two
groups of 4 devices, side by side) and alone (one group, nothing beside
it), and the mesh each run recorded."""

import json
import os

import jax

from llmlab import config as config_lib
from llmlab import experiment


def run_cfg(d_model: int, steps: int):
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=d_model, num_heads=2, num_kv_heads=2,
                 mlp_dim=2 * d_model)
  c.train.update(steps=steps, batch_size=8, seq_len=32, log_every=1,
                 eval_every=0, eval_tokens=1024, learning_rate=3e-3)
  c.optim.warmup_steps = 2
  c.checkpoint.update(every_steps=0, sweep_points=0)
  return c


def losses(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r["loss"] for r in rows if "loss" in r]


def main(out: str) -> dict:
  groups = experiment.device_groups(2)
  cfgs = {"a": run_cfg(16, 6), "b": run_cfg(32, 4)}
  result = {"groups": [[d.id for d in g] for g in groups]}
  for mode in ("packed", "alone"):
    ex = experiment.Experiment(os.path.join(out, mode))
    ex.start(config_lib.base(), "c.json")
    jobs = [experiment.Job(c, os.path.join(out, mode, n))
            for n, c in cfgs.items()]
    if mode == "packed":
      ex.train_all(jobs, groups)
    else:  # each alone on one group, nothing beside it
      for job, g in zip(jobs, groups):
        ex.train_all([job], [g])
    result[mode] = {n: losses(j.workdir) for n, j in zip(cfgs, jobs)}
    with open(os.path.join(jobs[0].workdir, "config.json")) as f:
      cfg = json.load(f)
    result[mode + "_mesh"] = [cfg["mesh_shape"], cfg["devices"]["count"]]
  result["device_count"] = jax.device_count()
  return result

