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

import logging
import os
import sys

from llmlab import config as config_lib
from llmlab import experiment
from llmlab import perf
from llmlab import runs
from llmlab import storage
from llmlab.compress import learned as learned_lib
from llmlab.compress import prune as prune_lib
from llmlab.compress import report as report_lib
from llmlab.scaling import sweep as sweep_lib

log = logging.getLogger("llmlab")


# ----------------------------------------------------------------- configs


def source_config(scfg):
  """The larger model, trained with the base config's schedule."""
  return experiment.derive(scfg.base, {
      "name": "source", "model": dict(scfg.source_model),
      "train": dict(steps=int(scfg.source_steps),
                    batch_size=int(scfg.source_batch_size),
                    seed=int(scfg.base.train.seed))})


def continued_config(scfg, name: str, init_from: str = "",
                     teacher: str = ""):
  """A target-shape run of the continual phase (equal steps, batch, data
  order and schedule for every run)."""
  objective = {}
  if teacher:
    objective = dict(scfg.distill, name="distill", teacher=teacher)
  return experiment.derive(scfg.base, {
      "name": name, "init_from": init_from, "model": dict(scfg.target_model),
      "train": dict(steps=int(scfg.continue_steps),
                    batch_size=int(scfg.base.train.batch_size),
                    seed=int(scfg.continue_seed)),
      "optim": {"schedule": "constant"},
      "checkpoint": dict(every_steps=0, sweep_points=int(scfg.sweep_points),
                         sweep_min_fraction=float(scfg.sweep_min_fraction)),
      "objective": objective})


def plan(scfg, workdir: str) -> list[dict]:
  """Every continual run: name, method (None = scratch), objective, config."""
  out = []
  for method in scfg.methods:
    pruned = os.path.join(workdir, "pruned", method)
    out.append(dict(name=method, method=method, objective="next_token",
                    cfg=continued_config(scfg, method, init_from=pruned)))
    if method in scfg.distill_methods:
      out.append(dict(name=f"{method}_distill", method=method,
                      objective="distill",
                      cfg=continued_config(scfg, f"{method}_distill",
                                           init_from=pruned,
                                           teacher=os.path.join(workdir,
                                                                "source"))))
  out.append(dict(name="scratch", method=None, objective="next_token",
                  cfg=continued_config(scfg, "scratch")))
  for r in out:
    r["workdir"] = os.path.join(workdir, "runs", r["name"])
  return out


def _check(scfg) -> None:
  """Bad settings fail here, before anything trains."""
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


def _prune(scfg, workdir: str, method: str) -> None:
  out = os.path.join(workdir, "pruned", method)
  if storage.exists(storage.join(out, "config.json")):
    return
  storage.rmtree(out)  # a pruning that died before config.json: redo
  target = continued_config(scfg, f"pruned_{method}")
  settings = learned_lib.Settings(**dict(scfg.learned))
  summary = prune_lib.prune(os.path.join(workdir, "source"), target, out,
                            method, calib_rows=int(scfg.calib_rows),
                            learned=settings if method == "learned" else None)
  log.info("pruned by %s in %.0fs: %s", method, summary["wall_s"], out)


def run(scfg, workdir: str, train_fn=None) -> dict:
  ex = experiment.Experiment(workdir, train_fn, total_from="compress.json")
  _check(scfg)
  ex.start(scfg, "compress_config.json")
  source_dir = os.path.join(workdir, "source")
  planned = plan(scfg, workdir)
  ex.expect([(source_config(scfg), source_dir)] +
            [(r["cfg"], r["workdir"]) for r in planned])
  ex.train(source_config(scfg), source_dir)
  for method in scfg.methods:
    _prune(scfg, workdir, method)
  for r in planned:
    ex.train(r["cfg"], r["workdir"])
  pruned = [(f"{m}@0", os.path.join(workdir, "pruned", m)) for m in scfg.methods]
  named = ([("source", source_dir)] + pruned +
           [(r["name"], r["workdir"]) for r in planned])
  rows = sweep_lib.sweep([w for _, w in named], ex.path("records.csv"),
                         eval_tokens=int(scfg.eval_tokens),
                         names=[n for n, _ in named],
                         log=lambda s: print(s, file=sys.stderr, flush=True))
  result = report_lib.analyse(scfg, rows, planned, workdir)
  wall = ex.wall_time()
  result["wall_time_s"] = wall["wall_time_this_run_s"]  # as it always was
  result.update(wall)
  # Median step time after the first logged row (compilation).
  result["timings"] = {
      n: {"step_time_s": runs.median_step_time(w, skip_first=True)}
      for n, w in named if not n.endswith("@0")}
  result["timings"].update(_prune_timings(scfg, workdir))
  # How busy the CPU was: step times scale with it (idle 2 cores: ~180).
  result["matmul_probe_gflops"] = perf.matmul_probe() / 1e9
  report_lib.write(result, workdir)
  return result


def _prune_timings(scfg, workdir: str) -> dict:
  out = {}
  for m in scfg.methods:
    info = report_lib.prune_info(workdir, m)
    out[f"prune_{m}"] = {"wall_s": info.get("wall_s"),
                         "mask_step_time_s": info.get("learned", {}).get(
                             "final", {}).get("step_time_s")}
  return out
