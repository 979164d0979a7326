"""Continual learning after compression: the Bloom questions, with a law.

    llmlab continual --config=configs/continual_quick.py[:smoke] --workdir=DIR

Domain A (old) and domain B (new) are two built-in sources (default: the
standard library's Python code, `stdlib`, and its English, `prose`:
docstrings and comments; llmlab/data/prose.py). Every run evaluates both at
every eval (`data.domains`: eval/loss_A, eval/loss_B in metrics.jsonl and
TensorBoard). Steps, each skipped when done, so a re-run resumes:

1. DIR/sources/<s>: each source size trained on A.
2. DIR/starts/<s>-<t>-<method>: the start of a continued run of target
   shape t: structured pruning of source s (llmlab/compress/prune.py:
   magnitude, activation, learned), optionally re-initialised
   (`+shrink_perturb`: Ash & Adams 2020, lambda theta + sigma theta_fresh;
   `+reinit_top` / `+reinit_bottom`: the top / bottom k layers fresh). The
   method `full` continues the source itself (target = the source's shape),
   `scratch` starts from random init.
3. DIR/runs/<name>: every planned continued run, on B mixed with a replay
   ratio r of A (`data.mixture`; order a pure function of (seed, step)),
   constant learning rate after warmup, evals at log-spaced steps; with
   next-token loss or distilling from the source (`objective.teacher`).
   The plan (`plan`) is a design, not a full factorial: the law grid
   (`grid`: source/target/replay triples with `law_method`, plus scratch of
   each target), the start methods at `method_at`, seed re-runs, and last
   the replay ratio the law predicts for the forgetting budget (planned
   after the law is fitted: DIR/runs/replay-check-*).
4. Laws (llmlab/scaling/forms.py: cl_transfer, cl_p2, cl_dcpt) fitted per
   domain by the project's fitter; held-out checks; DIR/study.json,
   DIR/records.csv, DIR/report.md (continual_analysis.py,
   continual_report.py).

Bad input (a replay ratio outside [0, 1], a target that is not a pruning of
its source, a domain with too little text for the planned tokens, unknown
names) is one ConfigError naming the key, raised before anything trains.
"""

from __future__ import annotations

import logging
import os

from llmlab import config as config_lib
from llmlab import experiment
from llmlab import storage
from llmlab.compress import learned as learned_lib
from llmlab.compress import prune as prune_lib
from llmlab.studies import continual_analysis
from llmlab.studies import continual_design as design
from llmlab.studies import continual_report
from llmlab.studies import repeat as repeat_lib

log = logging.getLogger("llmlab")


def mixture(scfg, replay: float) -> str:
  """B with a replay ratio r of A (weights must be > 0: r = 0 is B alone)."""
  a, b = str(scfg.domain_a), str(scfg.domain_b)
  if replay <= 0:
    return f"{b}:1"
  if replay >= 1:
    return f"{a}:1"
  return f"{b}:{1 - replay:g},{a}:{replay:g}"


def domains(scfg) -> str:
  return f"A={scfg.domain_a},B={scfg.domain_b}"


# ---------------------------------------------------------------- configs


def source_config(scfg, name: str):
  return experiment.derive(scfg.base, {
      "name": f"source-{name}", "model": design.models(scfg, "sources")[name],
      "train": dict(steps=int(scfg.source_steps),
                    seed=int(scfg.base.train.seed),
                    eval_at_steps=()),
      "data": dict(mixture=f"{scfg.domain_a}:1", domains=domains(scfg))})


def eval_at(scfg) -> tuple:
  return repeat_lib.eval_steps(int(scfg.continue_steps),
                               int(scfg.eval_points),
                               float(scfg.first_eval_fraction))


def continued_config(scfg, r: design.Run, workdir: str):
  init_from = ""
  if r.method == "full":
    init_from = source_dir(workdir, r.source)
  elif r.start:
    init_from = os.path.join(workdir, "starts", r.start)
  objective = {}
  if r.distill:
    objective = dict(scfg.distill, name="distill",
                     teacher=source_dir(workdir, r.source))
  return experiment.derive(scfg.base, {
      "name": r.name, "init_from": init_from, "model": design.target_model(scfg, r),
      "train": dict(steps=int(scfg.continue_steps), seed=int(r.seed),
                    eval_at_steps=eval_at(scfg)),
      "optim": {"schedule": "constant"},
      "checkpoint": dict(every_steps=0),
      "data": dict(mixture=mixture(scfg, r.replay), domains=domains(scfg)),
      "objective": objective})


def source_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "sources", name)


def run_dir(workdir: str, r: design.Run) -> str:
  return os.path.join(workdir, "runs", r.name)


# ----------------------------------------------------------------- checks


def check(scfg) -> list[design.Run]:
  """Every check before anything trains; returns the plan."""
  for key in ("source_steps", "continue_steps", "eval_points"):
    if int(scfg[key]) < 1:
      raise config_lib.ConfigError(f"config.{key}={scfg[key]!r}: must be >= 1")
  design.check_ratio(float(scfg.replay), "config.replay")
  budget = float(scfg.forget_budget)
  if not budget > 0:
    raise config_lib.ConfigError(f"config.forget_budget={budget!r}: must be "
                                 "> 0 (nats of domain-A loss)")
  for key, known in (("methods", None), ("distill_methods", None),
                     ("seed_methods", None), ("law_method", None)):
    names = [scfg[key]] if isinstance(scfg[key], str) else list(scfg[key])
    for i, m in enumerate(names):
      _check_method(m, f"config.{key}" + ("" if key == "law_method"
                                          else f"[{i}]"))
  for key in ("extra_seeds", "law_seeds"):
    for i, seed in enumerate(scfg.get(key, ())):
      if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise config_lib.ConfigError(f"config.{key}[{i}]={seed!r}: must be a "
                                     "seed, an integer >= 0")
  if len(design.source_names(scfg)) < 2:
    raise config_lib.ConfigError(
        f"config.sources: {len(design.source_names(scfg))} source(s); the held-out "
        "check fits on the smaller sources and predicts the largest: need "
        ">= 2")
  for form in scfg.forms:
    from llmlab.scaling import forms as forms_lib  # noqa: PLC0415
    if form not in forms_lib.FORMS:
      raise config_lib.ConfigError(f"config.forms: unknown form {form!r}")
  planned = design.plan(scfg)
  design.replay_cell(scfg)
  _check_shapes(scfg, planned)
  for name in design.source_names(scfg):
    config_lib.validate(config_lib.merge_defaults(source_config(scfg, name)))
  for r in planned[:1]:
    config_lib.validate(config_lib.merge_defaults(
        continued_config(scfg, r, "/nonexistent")))
  _check_text(scfg, planned)
  return planned


def _check_method(m: str, key: str) -> None:
  base, _, reinit = str(m).partition("+")
  if base not in design.STARTS + ("scratch",) or (reinit and reinit not in design.REINIT) \
      or (reinit and base == "scratch"):
    raise config_lib.ConfigError(
        f"{key}={m!r}: unknown start method; known: {design.STARTS + ('scratch',)}, "
        f"optionally +{'|+'.join(design.REINIT)} (not on scratch)")


def _model_cfg(scfg, model: dict):
  from llmlab import model as model_lib  # noqa: PLC0415 (jax)
  cfg = config_lib.merge_defaults(experiment.derive(scfg.base,
                                                    {"model": model}))
  return model_lib.ModelConfig.from_config(cfg.model, 259)


def _check_shapes(scfg, planned: list[design.Run]) -> None:
  """A target must be a pruning of each source it is cut from."""
  from llmlab.compress import shapes  # noqa: PLC0415
  sources, targets = design.models(scfg, "sources"), design.models(scfg, "targets")
  for r in planned:
    if r.prune not in design.PRUNE:
      continue
    key = "grid" if r.role == "law" else "method_at"
    shapes.check_target(
        _model_cfg(scfg, sources[r.source]), _model_cfg(scfg, targets[r.target]),
        where=f"config.{key}: target {r.target!r} from source {r.source!r} "
              f"(config.targets[{r.target!r}])")
  layers = int(scfg.reinit_layers)
  for r in planned:
    if r.reinit in ("reinit_top", "reinit_bottom"):
      n = design.target_model(scfg, r)["num_layers"]
      if not 1 <= layers < n:
        raise config_lib.ConfigError(
            f"config.reinit_layers={layers}: must be in [1, {n - 1}] for "
            f"{r.name} ({n} layers): re-initialising every layer is scratch")


def _check_text(scfg, planned: list[design.Run]) -> None:
  """Each domain must hold the tokens a run plans to read from it, once."""
  from llmlab import data as data_lib  # noqa: PLC0415
  base = config_lib.merge_defaults(scfg.base)
  cfg = experiment.derive(base, {"data": dict(
      mixture=f"{scfg.domain_b}:0.5,{scfg.domain_a}:0.5",
      domains=domains(scfg))})
  try:
    d = data_lib.build(cfg.data, seq_len=int(base.train.seq_len),
                       global_batch=int(base.train.batch_size), seed=0)
  except data_lib.DataError as e:
    raise config_lib.ConfigError(f"config.base.data: {e}") from None
  have = {label: info["tokens_train"]
          for label, info in d.info["domains"].items()}
  per_step = int(base.train.batch_size) * int(base.train.seq_len)
  need_a = int(scfg.source_steps) * per_step
  need = {"A": need_a, "B": 0}
  for r in planned:
    need["B"] = max(need["B"], int(scfg.continue_steps * per_step *
                                   (1 - r.replay)))
    need["A"] = max(need["A"], int(scfg.continue_steps * per_step * r.replay))
  for label, key in (("A", "domain_a"), ("B", "domain_b")):
    if need[label] > have[label]:
      raise config_lib.ConfigError(
          f"config.{key}={scfg[key]!r}: domain {label} has {have[label]:,} "
          f"training tokens, fewer than the {need[label]:,} a run plans to "
          "read (steps x batch x seq_len x its share): it would repeat; "
          "lower the steps or widen the domain (config.base.data.*)")


# -------------------------------------------------------------- execution


def _train_source(ex, scfg, workdir: str, name: str) -> None:
  with ex.timed("train_sources_s"):
    ex.train(source_config(scfg, name), source_dir(workdir, name))


def _make_start(scfg, workdir: str, r: design.Run, cfg) -> None:
  out = os.path.join(workdir, "starts", r.start)
  if storage.exists(storage.join(out, "config.json")):
    return
  storage.rmtree(out)  # died before config.json: redo
  if not r.reinit:
    settings = learned_lib.Settings(**dict(scfg.learned))
    summary = prune_lib.prune(source_dir(workdir, r.source), cfg, out,
                              r.prune, calib_rows=int(scfg.calib_rows),
                              learned=settings if r.prune == "learned"
                              else None)
    log.info("pruned %s by %s in %.0fs", r.source, r.prune, summary["wall_s"])
    return
  base = design.Run(r.source, r.target, r.prune, r.replay, r.seed)
  if r.prune == "full":
    frm = source_dir(workdir, r.source)
  else:
    _make_start(scfg, workdir, base, cfg)
    frm = os.path.join(workdir, "starts", base.start)
  continual_analysis.reinit(frm, cfg, out, r.reinit,
                            shrink=float(scfg.shrink),
                            perturb=float(scfg.perturb),
                            layers=int(scfg.reinit_layers),
                            seed=int(scfg.continue_seed))


def train_run(ex, scfg, workdir: str, r: design.Run) -> None:
  cfg = continued_config(scfg, r, workdir)
  wd = run_dir(workdir, r)
  before = (lambda: _make_start(scfg, workdir, r, cfg)) if r.start else None
  with ex.timed(f"train_{r.role}_s"):
    ex.train(cfg, wd, before=before)


def run(scfg, workdir: str, train_fn=None) -> dict:
  planned = check(scfg)  # every check before anything trains
  # A run directory trained with other settings is refused, not resumed.
  for s in design.source_names(scfg):
    repeat_lib.check_same_run({"cfg": source_config(scfg, s),
                               "workdir": source_dir(workdir, s)})
  for r in planned:
    repeat_lib.check_same_run({"cfg": continued_config(scfg, r, workdir),
                               "workdir": run_dir(workdir, r)})
  ex = experiment.Experiment(workdir, train_fn)
  ex.start(scfg, "continual_config.json")
  ex.expect([(source_config(scfg, s), source_dir(workdir, s))
             for s in design.source_names(scfg)] +
            [(continued_config(scfg, r, workdir), run_dir(workdir, r))
             for r in planned])
  for s in design.source_names(scfg):
    _train_source(ex, scfg, workdir, s)
  for r in planned:
    train_run(ex, scfg, workdir, r)
  sources = {s: continual_analysis.source_record(source_dir(workdir, s))
             for s in design.source_names(scfg)}
  records = [row for r in planned
             for row in continual_analysis.run_records(
                 r, run_dir(workdir, r), design.target_model(scfg, r),
                 sources.get(r.source))]
  with ex.timed("fit_s"):
    result = continual_analysis.analyse(scfg, records, sources)
  # The held-out replay check: predicted by the law, then measured.
  ratio = result["replay"]["predicted_ratio"]
  if ratio is not None:
    check_runs = design.replay_check_runs(scfg, ratio)
    for r in check_runs:
      train_run(ex, scfg, workdir, r)
    measured = [row for r in check_runs
                for row in continual_analysis.run_records(
                    r, run_dir(workdir, r), design.target_model(scfg, r),
                    sources.get(r.source))]
    continual_analysis.measure_replay(result, measured, sources)
    names = {r.name for r in planned}  # a planned run measured again: once
    records += [row for row in measured if row["run"] not in names]
  result["runs"] = [dict(name=r.name, role=r.role, source=r.source,
                         target=r.target, method=r.method, replay=r.replay,
                         seed=r.seed, distill=r.distill,
                         wall_s=ex.run_seconds(run_dir(workdir, r)))
                    for r in planned]
  result["timing_s"] = dict(ex.timing)
  result["variant"] = str(scfg.get("variant", ""))
  result.update(ex.wall_time())
  continual_report.write_outputs(result, records, workdir)
  return result
