"""`llmlab overtrain`: how fine-tunability changes along one pretraining run.

    llmlab overtrain --config=configs/overtrain_quick.py[:smoke] --workdir=DIR \
        [--pretrain_run=RUN]

Springer et al. 2025 ("Overtrained Language Models Are Harder to
Fine-Tune") found that past some token count more pretraining makes the
*fine-tuned* model worse, because parameters grow more sensitive to any
modification. This study measures that on one run:

1. DIR/pretrain: train `pretrain` (a small model far past compute-optimal,
   log-spaced sweep checkpoints), or use the existing run `pretrain_run`.
2. Select checkpoints: `checkpoints` = 'sweep' (the run's kept-forever
   sweep/keep_at/final steps), 'all' (every saved one) or steps ('3,9,30'
   or a tuple: exactly those; a study that pretrains keeps them by adding
   them to checkpoint.keep_at_steps).
3. Per checkpoint: held-out loss on the pretraining distribution and on the
   target distribution (zero-shot), and the sensitivity (sensitivity.py):
   the pretraining-loss increase under relative Gaussian noise, for each
   gamma in `sensitivity.gammas` and seed in `sensitivity.seeds`.
4. Fine-tune every checkpoint on the target distribution (`target_data`, by
   default the stdlib's test files while pretraining saw the library
   code) for the same `finetune.steps` x batch tokens, at each learning
   rate and seed, through `llmlab.train.train` with
   `init_from=DIR/pretrain:STEP` (params only, fresh optimizer):
   DIR/finetune/s<step>_lr<lr>_seed<seed>.
5. Evaluate each fine-tuned model on both held-out sets: target loss, and
   forgetting = pretraining loss after minus before fine-tuning.
6. Per checkpoint the best learning rate (lowest mean target loss over
   seeds); the inflection (below) with a bootstrap over evaluation batches
   (paired across all models) and fine-tuning seeds (overtrain_analysis.py).
   Writes (overtrain_report.py)
   DIR/overtrain.json, DIR/overtrain.csv (one row per fine-tune run),
   DIR/sensitivity.csv, PNG plots and the same images plus per-checkpoint
   scalars (x = pretraining tokens) in DIR/tensorboard.

Inflection: the earliest checkpoint after which no later checkpoint's best
fine-tuned target loss is lower by more than `inflection.tolerance` nats
(tolerance 0: the argmin). If that is the last checkpoint, fine-tuned
quality was still improving: no inflection in the range.

Every run writes its own TensorBoard under DIR, so `tensorboard
--logdir=DIR` shows pretraining, every fine-tune and the study's plots
together. Re-running resumes: finished runs are not retrained and stored
evaluations (DIR/evals.json, DIR/finetune/*/overtrain_eval.json) are reused.
"""

from __future__ import annotations

import logging
import os
import time

import ml_collections
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import data as data_lib
from llmlab import experiment
from llmlab import report_notes
from llmlab import runs
from llmlab import storage
from llmlab.studies import overtrain_analysis
from llmlab.studies import overtrain_report
from llmlab.studies import sensitivity as sens_lib

log = logging.getLogger("llmlab")


# ------------------------------------------------------------------ config


def _fail(key: str, value, why: str):
  raise config_lib.ConfigError(f"config.{key}={value!r}: {why}")


def check_config(scfg) -> None:
  """Checks of the study's own keys, before anything is trained."""
  ft, sens, inf = scfg.finetune, scfg.sensitivity, scfg.inflection
  lrs = list(ft.learning_rates)
  if not lrs or any(not float(lr) > 0 for lr in lrs):
    _fail("finetune.learning_rates", lrs, "need one or more values > 0")
  if len(set(lrs)) != len(lrs):
    _fail("finetune.learning_rates", lrs, "values must be distinct")
  for key, seeds in (("finetune.seeds", ft.seeds),
                     ("sensitivity.seeds", sens.seeds)):
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(
        not isinstance(s, int) or s < 0 for s in seeds):
      _fail(key, seeds, "need one or more distinct integers >= 0")
  for key in ("steps", "batch_size"):
    if not isinstance(ft[key], int) or ft[key] < 1:
      _fail(f"finetune.{key}", ft[key], "must be a positive integer")
  gammas = list(sens.gammas)
  if not gammas or any(not float(g) >= 0 for g in gammas):
    _fail("sensitivity.gammas", gammas, "need one or more values >= 0")
  for key in ("eval_tokens", "eval_batch_size"):
    if not isinstance(scfg[key], int) or scfg[key] < 1:
      _fail(key, scfg[key], "must be a positive integer")
  if not float(inf.tolerance) >= 0:
    _fail("inflection.tolerance", inf.tolerance, "must be >= 0")
  if not isinstance(inf.bootstrap, int) or inf.bootstrap < 0:
    _fail("inflection.bootstrap", inf.bootstrap, "must be an integer >= 0")
  requested_steps(scfg.checkpoints)


def requested_steps(spec) -> str | list[int]:
  """'sweep' | 'all' | sorted explicit steps (a sequence or '3,9,30')."""
  if isinstance(spec, str) and spec in ("sweep", "all"):
    return spec
  try:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    steps = [int(x) for x in items]
    exact = all(float(x) == int(x) for x in items)
  except (TypeError, ValueError):
    steps, exact = [], False
  if (not steps or not exact or len(set(steps)) != len(steps) or
      min(steps) < 1):
    _fail("checkpoints", spec, "must be 'sweep', 'all' or distinct "
          "positive steps ('3,9,30' or a tuple)")
  return sorted(steps)


def pretrain_config(scfg):
  """The pretraining run's config; explicit checkpoint steps are kept."""
  c = experiment.derive(scfg.pretrain)
  config_lib.validate(c)
  want = requested_steps(scfg.checkpoints)
  if not isinstance(want, str):
    bad = [s for s in want if s > c.train.steps]
    if bad:
      _fail("checkpoints", scfg.checkpoints,
            f"steps {bad} are past pretrain.train.steps={c.train.steps}")
    c.checkpoint.keep_at_steps = tuple(sorted(
        set(c.checkpoint.keep_at_steps) | set(want)))
  return c


def finetune_config(pre_cfg, scfg, init_from: str, lr: float, seed: int):
  """The pretraining config with the target data, a fixed token budget
  (steps x batch), this learning rate and seed, and params from
  `init_from`. Model, tokenizer, seq_len and optimizer (but its schedule)
  are the pretraining run's."""
  ft = scfg.finetune
  c = experiment.derive(pre_cfg, {
      "name": f"finetune {init_from} lr={lr:g} seed={seed}",
      "init_from": init_from,
      "train": dict(steps=int(ft.steps), batch_size=int(ft.batch_size),
                    learning_rate=float(lr), seed=int(seed),
                    log_every=min(int(ft.log_every), int(ft.steps)),
                    eval_every=0, eval_tokens=int(scfg.eval_tokens),
                    eval_batch_size=int(scfg.eval_batch_size)),
      "optim": dict(schedule=str(ft.schedule),
                    warmup_steps=int(ft.warmup_steps),
                    final_lr_fraction=float(ft.final_lr_fraction)),
      "checkpoint": dict(every_steps=0, keep=1, sweep_points=0,
                         keep_at_steps=())})
  # The whole data group is the target's (defaults for what it leaves out).
  c.data = experiment.derive(ml_collections.ConfigDict(
      {"data": scfg.target_data})).data
  if str(c.data.tokenizer) != str(pre_cfg.data.tokenizer):
    _fail("target_data.tokenizer", c.data.tokenizer,
          f"must equal the pretraining run's {pre_cfg.data.tokenizer!r}")
  config_lib.validate(c)
  return c


def run_name(step: int, lr: float, seed: int) -> str:
  return f"s{step:07d}_lr{lr:g}_seed{seed}"


# -------------------------------------------------------------- checkpoints


def run_checkpoints(workdir: str, cfg) -> tuple[list[int], list[int]]:
  """(complete checkpoint steps, steps kept forever: sweep, keep_at_steps
  and final), as the run's checkpoint manager sees them."""
  mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps,
                         read_only=True)
  try:
    return mgr.steps(), sorted(mgr.protected)
  finally:
    mgr.close()


def select_checkpoints(spec, available: list[int],
                       protected: list[int]) -> list[int]:
  """The checkpoint steps the study uses: exactly `spec`'s, all present."""
  want = requested_steps(spec)
  if want == "all":
    want = list(available)
  elif want == "sweep":
    want = list(protected)
  missing = [s for s in want if s not in available]
  if missing or not want:
    raise ckpt_lib.CheckpointError(
        f"config.checkpoints={spec!r}: no checkpoint at steps {missing} "
        f"of the pretraining run; available: {available}")
  return want


class _Evaluators:
  """The two held-out sets, built on first use (a resumed study that needs
  no evaluation never builds them)."""

  def __init__(self, pre_dir: str, target_data, scfg):
    self.pre_dir, self.target_data, self.scfg = pre_dir, target_data, scfg
    self._built = None

  def _build(self):
    if self._built is None:
      cfg, raw = runs.read_config(self.pre_dir)
      setup = runs.setup_for(cfg, raw)
      kw = dict(seq_len=int(cfg.train.seq_len),
                eval_tokens=int(self.scfg.eval_tokens),
                batch_size=int(self.scfg.eval_batch_size))
      self._built = {
          "setup": setup,
          "pretrain": sens_lib.Evaluator(setup, cfg.data, **kw),
          "target": sens_lib.Evaluator(setup, self.target_data, **kw)}
    return self._built

  def params(self, workdir: str, step: int):
    with runs.Checkpoint(workdir, step) as ck:
      return ck.params(self["setup"].abstract_state["params"])

  def __getitem__(self, name: str):
    return self._build()[name]


# -------------------------------------------------------------------- study


FINETUNE_KEYS = ("init_from", "train.steps", "train.batch_size",
                 "train.learning_rate", "train.seed", "optim.schedule",
                 "optim.warmup_steps", "optim.final_lr_fraction")


def _check_same_run(cfg, run_dir: str) -> None:
  """A fine-tune directory made with other settings is refused (its name
  only carries step, learning rate and seed), not silently resumed."""
  if not storage.exists(storage.join(run_dir, "config.json")):
    return
  old, _ = runs.read_config(run_dir)
  get = lambda c, key: c[key] if "." not in key else c[key.split(".")[0]][
      key.split(".")[1]]
  diffs = [f"{k}: {get(old, k)!r} there, {get(cfg, k)!r} now"
           for k in FINETUNE_KEYS if get(old, k) != get(cfg, k)]
  if diffs:
    raise config_lib.ConfigError(
        f"{run_dir} was fine-tuned with other settings ({'; '.join(diffs)}); "
        "use a new --workdir for the changed study")


def _check_data(pre_cfg, target_data, scfg) -> None:
  """Build both data configs and their held-out sets now, so bad data
  fails before pretraining (the builds are memoised for later)."""
  import jax
  for data_cfg, batch in ((pre_cfg.data, pre_cfg.train.batch_size),
                          (target_data, scfg.finetune.batch_size)):
    data = data_lib.build(data_cfg, seq_len=int(pre_cfg.train.seq_len),
                          global_batch=int(batch), seed=0,
                          process_index=jax.process_index(),
                          process_count=jax.process_count())
    data.eval_batches(int(scfg.eval_tokens), int(scfg.eval_batch_size))


TIMING = ("pretrain_s", "finetune_s", "eval_s", "sensitivity_s")


def run(scfg, workdir: str, train_fn=None) -> dict:
  """The whole study (module doc); returns what overtrain.json holds."""
  ex = experiment.Experiment(workdir, train_fn)
  check_config(scfg)
  pre_dir = str(scfg.pretrain_run or os.path.join(workdir, "pretrain"))
  if not scfg.pretrain_run:
    pre_cfg = pretrain_config(scfg)
  else:
    pre_cfg, _ = runs.read_config(pre_dir)
  # Fails on a bad target config (or tokenizer) before any training.
  target_data = finetune_config(pre_cfg, scfg, pre_dir, 1.0, 0).data
  _check_data(pre_cfg, target_data, scfg)
  ex.start(scfg, "overtrain_config.json")

  if not scfg.pretrain_run:
    with ex.timed("pretrain_s"):
      ex.train(pre_cfg, pre_dir)
  pre_cfg, pre_raw = runs.read_config(pre_dir)
  steps = select_checkpoints(scfg.checkpoints,
                             *run_checkpoints(pre_dir, pre_cfg))
  info = pre_raw["model_info"]
  log.info("overtrain: checkpoints %s of %s", steps, pre_dir)

  ev = _Evaluators(pre_dir, target_data, scfg)
  identity = {"pretrain": pre_dir if storage.is_remote(pre_dir) else
              os.path.abspath(pre_dir),
              "eval_tokens": int(scfg.eval_tokens),
              "eval_batch_size": int(scfg.eval_batch_size),
              "target_data": config_lib.to_dict(target_data)}
  cache = experiment.Cache(ex.path("evals.json"), identity)
  gammas = [float(g) for g in scfg.sensitivity.gammas]
  sens_seeds = [int(s) for s in scfg.sensitivity.seeds]
  pre_evals = []
  for step in steps:
    t = time.time()
    pre_evals.append(_checkpoint_evals(ex, ev, cache, pre_dir, step, gammas,
                                       sens_seeds))
    log.info("overtrain: checkpoint %d: pretrain loss %.4f, target loss "
             "%.4f (%.0f s)", step, sens_lib.mean_loss(
                 pre_evals[-1]["pretrain"]), sens_lib.mean_loss(
                     pre_evals[-1]["target"]), time.time() - t)

  planned = [dict(run=run_name(step, float(lr), int(seed)), step=step,
                  learning_rate=float(lr), seed=int(seed),
                  cfg=finetune_config(pre_cfg, scfg, f"{pre_dir}:{step}",
                                      float(lr), int(seed)))
             for step in steps for lr in scfg.finetune.learning_rates
             for seed in scfg.finetune.seeds]
  for r in planned:
    r["workdir"] = os.path.join(workdir, "finetune", r["run"])
    _check_same_run(r["cfg"], r["workdir"])
  ex.expect([(r["cfg"], r["workdir"]) for r in planned])
  finetunes = []
  for r in planned:
    cfg = r.pop("cfg")
    with ex.timed("finetune_s"):
      ex.train(cfg, r["workdir"])
    with ex.timed("eval_s"):
      evals = _finetune_evals(ev, r["workdir"], cfg, identity)
    finetunes.append(dict(r, **evals))

  result = overtrain_analysis.analyse(scfg, pre_cfg, info, steps, pre_evals,
                                      finetunes)
  wall = ex.wall_time()
  result["timing_this_invocation"] = _timing(ex, wall, pre_dir, finetunes)
  result["pretrain_run"] = pre_dir
  result["variant"] = report_notes.variant(scfg)
  result.update(wall)
  overtrain_report.write_outputs(result, workdir)
  return result


def _timing(ex, wall: dict, pre_dir: str, finetunes: list[dict]) -> dict:
  """Where this invocation's time went, and the runs' median step times."""
  timing = {k: ex.timing.get(k, 0.0) for k in TIMING}
  timing["total_s"] = wall["wall_time_this_run_s"]
  timing["pretrain_step_s"] = runs.median_step_time(pre_dir)
  ft_times = [runs.median_step_time(f["workdir"]) for f in finetunes]
  ft_times = [x for x in ft_times if x is not None]
  timing["finetune_step_s"] = float(np.median(ft_times)) if ft_times else None
  return timing


def _checkpoint_evals(ex, ev, cache, pre_dir: str, step: int, gammas,
                      seeds) -> dict:
  """Held-out losses of pretraining checkpoint `step` on both sets, and its
  sensitivity rows for every (gamma, seed); each computed once, cached."""
  params = None
  key = f"pretrain/{step}"
  if cache.get(key) is None:
    with ex.timed("eval_s"):
      params = ev.params(pre_dir, step)
      cache.put(key, {"pretrain": ev["pretrain"].per_batch(params),
                      "target": ev["target"].per_batch(params)})
  entry = dict(cache.get(key), sensitivity=[])
  for gamma in gammas:
    for seed in seeds:
      skey = f"sensitivity/{step}/{gamma!r}/{seed}"
      if cache.get(skey) is None:
        with ex.timed("sensitivity_s"):
          if params is None:
            params = ev.params(pre_dir, step)
          cache.put(skey, sens_lib.sensitivity(
              ev["pretrain"], params, [gamma], [seed],
              base=entry["pretrain"])[0])
      entry["sensitivity"].append(cache.get(skey))
  return entry


def _finetune_evals(ev, run_dir: str, cfg, identity: dict) -> dict:
  """Per-batch target and pretraining losses of a finished fine-tune run
  (stored beside the run, so a retrained run is re-evaluated)."""
  cache = experiment.Cache(os.path.join(run_dir, "overtrain_eval.json"),
                           identity)
  if cache.get("final") is None:
    params = ev.params(run_dir, int(cfg.train.steps))
    cache.put("final", {"target": ev["target"].per_batch(params),
                        "pretrain": ev["pretrain"].per_batch(params)})
  return cache.get("final")
