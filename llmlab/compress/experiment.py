"""Continual-learning scaling after compression.

    llmlab compress-study --config=configs/compress_quick.py[:smoke] --workdir=DIR

Question: to get a small model, is it better to compress a larger trained
one and keep training, or to train the small shape from scratch, and which
compression is best? Steps (each skipped when already done, so re-running
resumes):

1. DIR/source: train the larger model (`source_model`, `source_steps`).
2. DIR/pruned/<method>: prune it to `target_model` by each method
   (`llmlab prune`; magnitude, activation, learned).
3. DIR/runs/<method>: continue training each pruned model with
   next_token (`--config.init_from`); DIR/runs/<method>_distill: the same
   with `distill` from the unpruned source as teacher (methods listed in
   `distill_methods`); DIR/runs/scratch: the target shape from random
   init. All of these see the same batches for the same steps (equal
   tokens), with a constant learning rate after warmup, and keep
   `sweep_points` log-spaced checkpoints.
4. Evaluate every checkpoint (and each pruned model before training) on one
   held-out set (`llmlab sweep`, DIR/records.csv).
5. Fit L(D) = E + B / D^beta to each run's checkpoints with the project's
   fitter (`scaling.fit.saturation`, form "data", all runs in one vmapped
   call); D counts the tokens of continued training. Report the laws, the
   tokens each run needs to reach a reference loss (default: the scratch
   run's final loss), measured (log-interpolated between checkpoints) and
   from its law, and the speed-up over scratch. The learned method also
   spent `learned.steps` x batch tokens training its masks, reported
   separately and included in its total.

Writes DIR/compress.json, DIR/table.md, DIR/report.md, DIR/curves.png (also
as a TensorBoard image); `tensorboard --logdir=DIR` overlays every run.
Why constant learning rate: a mid-cosine checkpoint sits above the loss of a
run that ends there, which would bend each run's L(D); with a constant rate
every checkpoint is on the same footing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

import ml_collections
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab.compress import report as report_lib

log = logging.getLogger("llmlab")


# ----------------------------------------------------------------- configs


def _train_config(scfg, model: dict, steps: int, batch_size: int, seed: int):
  c = config_lib.merge_defaults(ml_collections.ConfigDict(scfg.base.to_dict()))
  c.model.update(dict(model))
  c.train.update(steps=int(steps), batch_size=int(batch_size), seed=int(seed))
  return c


def source_config(scfg):
  """The larger model, trained with the base config's schedule."""
  c = _train_config(scfg, scfg.source_model, scfg.source_steps,
                    scfg.source_batch_size, scfg.base.train.seed)
  c.name = "source"
  return c


def continued_config(scfg, name: str, init_from: str = "",
                     teacher: str = ""):
  """A target-shape run of the continual phase (equal steps, batch, data
  order and schedule for every run)."""
  c = _train_config(scfg, scfg.target_model, scfg.continue_steps,
                    scfg.base.train.batch_size, scfg.continue_seed)
  c.name = name
  c.init_from = init_from
  c.optim.schedule = "constant"
  c.checkpoint.update(every_steps=0, sweep_points=int(scfg.sweep_points),
                      sweep_min_fraction=float(scfg.sweep_min_fraction))
  if teacher:
    c.objective.update(dict(scfg.distill), name="distill", teacher=teacher)
  return c


def plan(scfg, workdir: str) -> list[dict]:
  """Every continual run: name, method (None = scratch), objective, config."""
  runs = []
  for method in scfg.methods:
    pruned = os.path.join(workdir, "pruned", method)
    runs.append(dict(name=method, method=method, objective="next_token",
                     cfg=continued_config(scfg, method, init_from=pruned)))
    if method in scfg.distill_methods:
      runs.append(dict(name=f"{method}_distill", method=method,
                       objective="distill",
                       cfg=continued_config(scfg, f"{method}_distill",
                                            init_from=pruned,
                                            teacher=os.path.join(workdir,
                                                                 "source"))))
  runs.append(dict(name="scratch", method=None, objective="next_token",
                   cfg=continued_config(scfg, "scratch")))
  for r in runs:
    r["workdir"] = os.path.join(workdir, "runs", r["name"])
  return runs


def _check(scfg) -> None:
  """Bad settings fail here, before anything trains."""
  from llmlab.compress import prune as prune_lib
  for m in list(scfg.methods) + list(scfg.distill_methods):
    if m not in prune_lib.METHODS:
      raise config_lib.ConfigError(
          f"config.methods: unknown method {m!r}; known: {prune_lib.METHODS}")
  missing = [m for m in scfg.distill_methods if m not in scfg.methods]
  if missing:
    raise config_lib.ConfigError(f"config.distill_methods={missing}: not in "
                                 f"config.methods={tuple(scfg.methods)}")
  for key in ("source_steps", "continue_steps", "sweep_points"):
    if int(scfg[key]) < 1:
      raise config_lib.ConfigError(f"config.{key}={scfg[key]!r}: must be >= 1")
  for c in (source_config(scfg), continued_config(scfg, "check")):
    config_lib.validate(c)


# --------------------------------------------------------------- execution


def _finished(workdir: str, steps: int) -> bool:
  return os.path.isdir(os.path.join(ckpt_lib.checkpoint_dir(workdir),
                                    str(steps)))


def _train(cfg, workdir: str) -> dict | None:
  from llmlab import train
  if _finished(workdir, cfg.train.steps):
    return None
  summary = train.train(cfg, workdir)
  if summary["preempted"]:
    print("llmlab compress-study: preempted (SIGTERM); the current run saved "
          "its checkpoint. Re-run the same command to resume.",
          file=sys.stderr)
    sys.exit(0)
  return summary


def _prune(scfg, workdir: str, method: str) -> None:
  from llmlab.compress import learned as learned_lib
  from llmlab.compress import prune as prune_lib
  out = os.path.join(workdir, "pruned", method)
  if os.path.exists(os.path.join(out, "config.json")):
    return
  if os.path.isdir(out):  # a pruning that died before config.json: redo
    shutil.rmtree(out)
  target = continued_config(scfg, f"pruned_{method}")
  settings = learned_lib.Settings(**dict(scfg.learned))
  summary = prune_lib.prune(os.path.join(workdir, "source"), target, out,
                            method, calib_rows=int(scfg.calib_rows),
                            learned=settings if method == "learned" else None)
  log.info("pruned by %s in %.0fs: %s", method, summary["wall_s"], out)


def _timings(workdir: str) -> dict:
  """Mean step time (s) of a run's logged rows after the first (compile)."""
  path = os.path.join(workdir, "metrics.jsonl")
  times = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        if "step_time_s" in row:
          times.append(row["step_time_s"])
  return {"step_time_s": float(np.median(times[1:])) if len(times) > 1
          else (times[0] if times else None)}


def run(scfg, workdir: str) -> dict:
  from llmlab.scaling import study as study_lib
  from llmlab.scaling import sweep as sweep_lib
  t0 = time.time()
  _check(scfg)
  os.makedirs(workdir, exist_ok=True)
  study_lib._compilation_cache(os.path.join(workdir, ".jax_cache"))  # pylint: disable=protected-access
  with open(os.path.join(workdir, "compress_config.json"), "w") as f:
    f.write(scfg.to_json_best_effort(indent=2))
  source_dir = os.path.join(workdir, "source")
  _train(source_config(scfg), source_dir)
  for method in scfg.methods:
    _prune(scfg, workdir, method)
  runs = plan(scfg, workdir)
  for r in runs:
    _train(r["cfg"], r["workdir"])
  pruned = [(f"{m}@0", os.path.join(workdir, "pruned", m)) for m in scfg.methods]
  named = ([("source", source_dir)] + pruned +
           [(r["name"], r["workdir"]) for r in runs])
  rows = sweep_lib.sweep([w for _, w in named],
                         os.path.join(workdir, "records.csv"),
                         eval_tokens=int(scfg.eval_tokens),
                         names=[n for n, _ in named],
                         log=lambda s: print(s, file=sys.stderr, flush=True))
  result = report_lib.analyse(scfg, rows, runs, workdir)
  result["wall_time_s"] = time.time() - t0  # this invocation
  result["wall_time_total_s"] = result["wall_time_s"] + _previous_total(workdir)
  result["timings"] = {n: _timings(w) for n, w in named
                       if not n.endswith("@0")}
  result["timings"].update(_prune_timings(scfg, workdir))
  from llmlab import perf
  # How busy the CPU was: step times scale with it (idle 2 cores: ~180).
  result["matmul_probe_gflops"] = perf.matmul_probe() / 1e9
  report_lib.write(result, workdir)
  return result


def _previous_total(workdir: str) -> float:
  """Wall time of earlier invocations (a resumed study adds up)."""
  path = os.path.join(workdir, "compress.json")
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    return float(json.load(f).get("wall_time_total_s", 0.0))


def _prune_timings(scfg, workdir: str) -> dict:
  out = {}
  for m in scfg.methods:
    path = os.path.join(workdir, "pruned", m, "config.json")
    with open(path) as f:
      info = json.load(f).get("compress", {})
    out[f"prune_{m}"] = {"wall_s": info.get("wall_s"),
                         "mask_step_time_s": info.get("learned", {}).get(
                             "final", {}).get("step_time_s")}
  return out
