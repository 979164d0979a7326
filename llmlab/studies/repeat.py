"""`llmlab repeat-study`: loss under repeated data, its law, a held-out size.

    llmlab repeat-study --config=configs/study_repeat.py[:smoke] --workdir=DIR

How much worse is a model trained for D tokens when only U = D / R of them
are unique (the rest repeats)? Muennighoff et al. 2023 (arXiv:2305.16264)
fitted a law of that (effective data D' < D) and found up to ~4 epochs
nearly as good as fresh data. This study measures it on the built-in corpus:

1. For each family size, one run on fresh data (`data.unique_tokens=0`)
   and one per repetition budget R > 1 on the first U = D / R tokens of the
   training stream (`data.unique_tokens=U`, reshuffled every epoch; order a
   pure function of (seed, step)), all with the same D, batch and a
   constant learning rate after warmup, each evaluated on the held-out split
   at `eval_points` log-spaced steps (`train.eval_at_steps`).
2. Records: every eval is (N, tokens D seen, unique tokens seen
   min(U, D), loss); epochs = D / unique.
3. Fit `chinchilla` (blind to repetition), `data_constrained` and
   `data_repeat` on the family (repeat_analysis.py), predict a held-out
   larger model trained under `target_repetitions`: ARE over its evals >=
   `are_fraction` of the run, naive ARE (the largest family member's loss
   at the same U and tokens), skill = 1 - ARE / naive ARE; and the number
   of epochs at which each law's loss is 1% worse than fresh data (same
   N, same D), beside the one measured on the runs.
4. DIR/study.json, DIR/records.csv, DIR/report.md, DIR/repeat_*.png
   (repeat_report.py).

Why a constant learning rate: points along a run are then comparable with
each other and with the target's (a cosine run's mid-way checkpoints sit
above what a run ending there reaches); every point, fitted or predicted,
is measured the same way. Re-running resumes (experiment.py).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from llmlab import config as config_lib
from llmlab import experiment
from llmlab import runs
from llmlab import storage
from llmlab.data import config as data_config
from llmlab.data.errors import DataError
from llmlab.studies import repeat_analysis
from llmlab.studies import repeat_report

log = logging.getLogger("llmlab")

# ------------------------------------------------------------------ config


def _fail(key: str, value, why: str):
  raise config_lib.ConfigError(f"config.{key}={value!r}: {why}")


def _positive_int(scfg, key: str) -> int:
  value = scfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    _fail(key, value, "must be a positive integer")
  return value


def _repetitions(scfg, key: str) -> list[int]:
  """Distinct integers >= 1 (1 = fresh data, no limit)."""
  reps = list(scfg[key])
  if not reps or len(set(reps)) != len(reps) or any(
      isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in reps):
    _fail(key, reps, "need one or more distinct integers >= 1 (1 = fresh)")
  return sorted(reps)


def _models(scfg) -> None:
  names = [n for n, _ in scfg.family] + [scfg.target[0]]
  if len(scfg.family) < 2:
    _fail("family", scfg.family, "need two or more (name, model) sizes")
  if len(set(names)) != len(names):
    _fail("family", names, "names (and the target's) must be distinct")


def check_config(scfg) -> None:
  """Every study key, before anything trains (each error names its key)."""
  _models(scfg)
  for key in ("steps", "eval_points", "eval_tokens"):
    _positive_int(scfg, key)
  reps = _repetitions(scfg, "repetitions")
  target = _repetitions(scfg, "target_repetitions")
  if 1 not in reps:
    _fail("repetitions", reps, "must include 1 (the fresh-data run)")
  if not set(target) <= set(reps):
    _fail("target_repetitions", target, f"must be among repetitions={reps} "
          "(the naive forecast is the largest member's run with the same U)")
  if not 0.0 < float(scfg.are_fraction) <= 1.0:
    _fail("are_fraction", scfg.are_fraction, "must be in (0, 1]")
  if not 0.0 < float(scfg.threshold) < 1.0:
    _fail("threshold", scfg.threshold, "must be in (0, 1), e.g. 0.01 = 1%")
  if not 0.0 < float(scfg.first_eval_fraction) < 1.0:
    _fail("first_eval_fraction", scfg.first_eval_fraction,
          "must be in (0, 1)")
  forms = list(scfg.forms)
  unknown = [f for f in forms if f not in repeat_analysis.FORMS]
  if not forms or unknown:
    _fail("forms", forms, f"known: {list(repeat_analysis.FORMS)}")
  cfg = experiment.derive(scfg.base, {"train": {"steps": scfg.steps}})
  config_lib.validate(cfg)
  if cfg.data.get("unique_tokens", 0):
    _fail("base.data.unique_tokens", cfg.data.unique_tokens,
          "is set by the study (repetitions); leave it 0")
  for r in reps:
    unique_tokens(scfg, r)


def tokens_per_run(scfg) -> int:
  b = scfg.base.train
  return int(scfg.steps) * int(b.batch_size) * int(b.seq_len)


def unique_tokens(scfg, repetitions: int) -> int:
  """U of a run that sees its D tokens `repetitions` times (0 = fresh)."""
  if repetitions == 1:
    return 0
  d, b = tokens_per_run(scfg), scfg.base.train
  u = d // repetitions
  if d % (repetitions * int(b.seq_len)):
    _fail("repetitions", repetitions, f"D={d} tokens per run (steps x "
          f"batch x seq_len) / {repetitions} is not whole rows of "
          f"seq_len={b.seq_len}")
  try:
    data_config.unique_tokens({"unique_tokens": u}, int(b.seq_len),
                              int(b.batch_size))
  except DataError as e:
    _fail("repetitions", repetitions, str(e))
  return u


# ------------------------------------------------------------------- plan


def eval_steps(steps: int, points: int, first_fraction: float) -> tuple:
  """`points` log-spaced steps from first_fraction * steps to the end."""
  first = max(1, int(round(first_fraction * steps)))
  at = np.unique(np.round(np.geomspace(first, steps, points)).astype(int))
  return tuple(int(s) for s in at)


def run_name(name: str, repetitions: int) -> str:
  return f"{name}_fresh" if repetitions == 1 else f"{name}_r{repetitions}"


def member_config(scfg, name: str, model: dict, repetitions: int):
  at = eval_steps(int(scfg.steps), int(scfg.eval_points),
                  float(scfg.first_eval_fraction))
  return experiment.derive(scfg.base, {
      "name": run_name(name, repetitions), "model": dict(model),
      "train": {"steps": int(scfg.steps), "eval_at_steps": at,
                "eval_tokens": int(scfg.eval_tokens)},
      "data": {"unique_tokens": unique_tokens(scfg, repetitions)}})


def plan(scfg, workdir: str) -> list[dict]:
  """Every run in training order: each family size under every budget,
  then the target under its budgets."""
  check_config(scfg)
  members = [(n, m, "family", scfg.repetitions) for n, m in scfg.family]
  members.append((scfg.target[0], scfg.target[1], "target",
                  scfg.target_repetitions))
  out = []
  for name, model, role, reps in members:
    for r in sorted(reps):
      out.append(dict(family=name, role=role, repetitions=r,
                      run=run_name(name, r),
                      cfg=member_config(scfg, name, dict(model), r),
                      workdir=os.path.join(workdir, "runs", run_name(name, r))))
  return out


# Keys a run directory's name does not carry; another value there means the
# study changed under it.
RUN_KEYS = ("train.steps", "train.batch_size", "train.seq_len", "train.seed",
            "data.unique_tokens", "model.d_model", "model.num_layers")


def check_same_run(r: dict) -> None:
  """A run directory made with other settings is refused, not resumed."""
  if not storage.exists(storage.join(r["workdir"], "config.json")):
    return
  old, _ = runs.read_config(r["workdir"])
  get = lambda c, key: c[key.split(".")[0]].get(key.split(".")[1], 0)
  diffs = [f"{k}: {get(old, k)!r} there, {get(r['cfg'], k)!r} now"
           for k in RUN_KEYS if get(old, k) != get(r["cfg"], k)]
  if diffs:
    raise config_lib.ConfigError(
        f"{r['workdir']} was trained with other settings ({'; '.join(diffs)})"
        "; use a new --workdir for the changed study")


# ---------------------------------------------------------------- records


def run_records(r: dict) -> list[dict]:
  """One record per held-out eval of a finished run (metrics.jsonl)."""
  _, raw = runs.read_config(r["workdir"])
  params = float(raw["model_info"]["params_total"])
  info = raw.get("data_info", {})
  limit = float(info.get("unique_tokens") or info["tokens_train"])
  out = []
  for row in runs.metrics_rows(r["workdir"]):
    if "eval_loss" not in row:
      continue
    tokens = float(row["tokens"])
    unique = min(limit, tokens)
    loss = row["eval_loss"]  # null: a NaN loss (storage.json_safe)
    out.append(dict(family=r["family"], run=r["run"], params=params,
                    tokens=tokens, loss=float("nan" if loss is None else loss),
                    unique_tokens=unique, epochs=tokens / unique,
                    repetitions=r["repetitions"], step=int(row["step"]),
                    role=r["role"]))
  return out


# -------------------------------------------------------------------- run


def run(scfg, workdir: str, train_fn=None) -> dict:
  """Trains what is missing, fits, predicts, writes DIR's outputs."""
  planned = plan(scfg, workdir)  # every check before anything trains
  for r in planned:
    check_same_run(r)
  ex = experiment.Experiment(workdir, train_fn)
  ex.start(scfg, "repeat_config.json")
  ex.expect([(r["cfg"], r["workdir"]) for r in planned])
  for r in planned:
    with ex.timed(f"train_{r['role']}_s"):
      ex.train(r["cfg"], r["workdir"])
  records = [row for r in planned for row in run_records(r)]
  with ex.timed("fit_s"):
    result = repeat_analysis.analyse(scfg, records)
  result["timing_s"] = dict(ex.timing)
  result["runs"] = [dict(run=r["run"], role=r["role"], family=r["family"],
                         repetitions=r["repetitions"],
                         unique_tokens=r["cfg"].data.unique_tokens,
                         wall_s=ex.run_seconds(r["workdir"]))
                    for r in planned]
  result["tokens_per_run"] = tokens_per_run(scfg)
  result["variant"] = str(scfg.get("variant", ""))
  result.update(ex.wall_time())
  repeat_report.write_outputs(result, records, workdir)
  return result
