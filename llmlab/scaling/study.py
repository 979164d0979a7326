"""`llmlab study`: train a family, sweep, fit a law, predict a bigger model.

    llmlab study --config=configs/study_quick.py[:smoke] --workdir=DIR

1. Train every family member and the held-out target (>= 3x the largest
   fitted N) on the same data with a warmup-stable-decay schedule.
2. Branch short decays off each run's stable phase at log-spaced token
   counts (design below), so every fitted point is an annealed endpoint.
3. Evaluate every branch end and final checkpoint on one held-out set
   (`llmlab sweep`), fit the law on the family only, predict the target.
4. Write DIR/study.json (fit, prediction with interval, actual, ARE,
   naive ARE, skill, wall time), DIR/records.csv, DIR/report.md and plots.

Why branches: a checkpoint taken in the middle of a cosine schedule sits
above the loss of a run that *ends* there (its learning rate has not
decayed), so fitting intermediate cosine checkpoints biases the law. With
WSD, the stable phase is shared and a decay of `decay_fraction` of the
branch's length turns any stable checkpoint into the endpoint of a
properly annealed run for a fraction of the cost of training it anew
(Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations"). A branch is made by copying the stable
checkpoint into a new run directory with a shorter schedule and resuming.

fit_on="curves" (see the README's study section for both measured): no
branches; every main run evaluates at `curve_points` steps along the way, a
law of whole loss curves across sizes (curve_fit.form, e.g. multipower_e) is
fitted to the family's logged evals and predicts the target's whole curve.
Branch runs already in the directory are then held-out schedules it is also
scored on. Either design can re-train one family member with `noise_seeds`
more seeds: the spread of its loss widens the target's intervals, and with
`fit_seeds` those runs are fitted too (the largest member decides the
extrapolation, and one run of it is ~1% off its mean: README).

Re-running resumes: finished runs and evaluated checkpoints are skipped.

The study's keys and their defaults are `llmlab.config.study_defaults()`;
`checked()` merges a config file's values over them and validates them before anything trains.
study_analysis.py makes the numbers, study_report.py writes report.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import sys

import ml_collections
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import experiment
from llmlab import model as model_lib
from llmlab import report_notes
from llmlab import runs as runs_lib
from llmlab import storage
from llmlab.scaling import forms as forms_lib
from llmlab.scaling import study_analysis as analysis
from llmlab.scaling import study_report as report
from llmlab.scaling import sweep as sweep_lib

FIT_ON = ("branches", "curves")
SPACINGS = ("log", "linear")


# ------------------------------------------------------------------ config


def checked(scfg) -> ml_collections.ConfigDict:
  """`scfg` over `config.study_defaults()`, validated: an unknown key or a
  bad value is a ConfigError naming it, before anything trains."""
  s = config_lib.merge(config_lib.study_defaults(), scfg)
  req = config_lib.require
  req(s.base is not None, "base", s.base, "a train config (llmlab.config.base())")
  pairs = list(s.family) + [s.target]
  req(len(s.family) >= 2 and all(_is_member(p) for p in pairs), "family",
      s.family, "two or more (name, model) pairs, and a (name, model) target")
  names = [p[0] for p in pairs]
  req(len(set(names)) == len(names), "family", names,
      "names (the target's too) must be distinct")
  for key in ("steps", "points", "eval_tokens"):
    req(isinstance(s[key], int) and s[key] > 0, key, s[key],
        "must be a positive integer")
  req(0.0 < s.decay_fraction < 1.0, "decay_fraction", s.decay_fraction,
      "must be in (0, 1)")
  for key in ("min_fraction", "are_fraction"):
    req(0.0 < s[key] <= 1.0, key, s[key], "must be in (0, 1]")
  req(s.fit_on in FIT_ON, "fit_on", s.fit_on, f"known: {list(FIT_ON)}")
  req(s.curve_spacing in SPACINGS, "curve_spacing", s.curve_spacing,
      f"known: {list(SPACINGS)}")
  req(isinstance(s.curve_points, int) and s.curve_points >= 0, "curve_points",
      s.curve_points, "must be an integer >= 0")
  for group in ("fit", "curve_fit"):
    g = s[group]
    req(g.form in forms_lib.FORMS, f"{group}.form", g.form,
        f"known: {sorted(forms_lib.FORMS)}")
    form = forms_lib.get_form(g.form)
    req(bool(form.curve) == (group == "curve_fit"), f"{group}.form", g.form,
        "is not a law of loss curves (e.g. multipower_n)" if group == "curve_fit"
        else "is a law of loss curves; give a law of (N, D) (e.g. chinchilla)")
    req(g.params_column in analysis.PARAMS_KEYS, f"{group}.params_column",
        g.params_column, f"known: {list(analysis.PARAMS_KEYS)}")
    req(isinstance(g.bootstrap, int) and g.bootstrap >= 0, f"{group}.bootstrap",
        g.bootstrap, "must be an integer >= 0")
  n_params = len(forms_lib.get_form(s.curve_fit.form).params)
  req(not (s.fit_on == "curves" or s.curve_points) or s.curve_points > n_params,
      "curve_points", s.curve_points,
      f"fitting {s.curve_fit.form!r} ({n_params} parameters) needs more evals "
      "along each run than that" + (" (0 turns them off with fit_on='branches')"
                                    if s.fit_on == "branches" else ""))
  req(isinstance(s.parallel, int) and s.parallel >= 1, "parallel",
      s.parallel, "must be an integer >= 1")
  for key in ("fit_seeds", "run_branches"):
    req(isinstance(s[key], bool), key, s[key], "True or False")
  req(isinstance(s.noise_seeds, int) and s.noise_seeds >= 0, "noise_seeds",
      s.noise_seeds, "must be an integer >= 0")
  req(not s.noise_member or s.noise_member in names[:-1], "noise_member",
      s.noise_member, f"is not a family member ({names[:-1]})")
  return s


def _is_member(pair) -> bool:
  return (isinstance(pair, (tuple, list)) and len(pair) == 2
          and isinstance(pair[0], str) and bool(pair[0]))


# -------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Run:
  """One planned run of the study."""
  member: str   # the family member (or target) it trains
  run: str      # its name in records and curves: member, or member_seed<k>
  role: str     # family | target | seed
  cfg: ml_collections.ConfigDict
  workdir: str
  final: int    # its last step
  main: str | None = None   # a branch: the main run it starts from ...
  start: int | None = None  # ... at this stable-phase step

  @property
  def kind(self) -> str:
    """main | seed | branch."""
    if self.start is not None:
      return "branch"
    return "seed" if self.role == "seed" else "main"


def member_config(scfg, model: dict, steps: int, decay_steps: int,
                  train: dict | None = None, **checkpoint):
  """Train config of one run: the study's base with this model, length,
  `train` overrides and `checkpoint` settings."""
  return experiment.derive(scfg.base, {
      "model": model, "train": dict(train or {}, steps=steps),
      "optim": {"schedule": "wsd", "decay_fraction": decay_steps / steps},
      "checkpoint": checkpoint})


def curve_steps(steps: int, points: int, spacing: str, first: int) -> list[int]:
  """Steps a main run evaluates at: `points` from `first` (the end of
  warmup) to the last step, evenly or log-spaced; the last step always."""
  if points <= 0:
    return []
  first = min(max(1, first), steps)
  grid = (np.geomspace(first, steps, points) if spacing == "log"
          else np.linspace(first, steps, points))
  return sorted({int(round(s)) for s in grid} | {steps})


def branch_points(steps: int, decay_fraction: float, points: int,
                  min_fraction: float) -> list[int]:
  """Stable-phase steps s whose branch (ending at s / (1 - f)) is fitted.

  Log-spaced from min_fraction to just below the main run's own decay, so
  the branch ends plus the main run's end cover [min_fraction, 1] of the
  tokens geometrically.
  """
  stable_end = int(steps * (1 - decay_fraction))
  ends = np.geomspace(min_fraction, 1.0, points + 1)[:-1] * steps
  starts = sorted({int(round(e * (1 - decay_fraction))) for e in ends})
  return [s for s in starts if 1 <= s < stable_end]

def plan(scfg, workdir: str) -> list[Run]:
  """Every run of the (checked) study in training order: one main run per
  size (its evals along the curve when curve_points > 0), the noise
  member's seed re-runs, then the branches (fit_on='branches', or
  run_branches)."""
  steps, f = int(scfg.steps), float(scfg.decay_fraction)
  decay = max(1, int(round(f * steps)))
  at = curve_steps(steps, scfg.curve_points, scfg.curve_spacing,
                   int(scfg.base.optim.warmup_steps))
  train = ({"eval_at_steps": tuple(at), "eval_tokens": int(scfg.eval_tokens)}
           if at else {})
  runs = os.path.join(workdir, "runs")
  mains, seeds, branches = [], [], []
  members = [(n, m, "family") for n, m in scfg.family]
  for name, model, role in members + [(*scfg.target, "target")]:
    points = (branch_points(steps, f, scfg.points, scfg.min_fraction)
              if scfg.fit_on == "branches" or scfg.run_branches else [])
    if role == "target":  # ARE only uses its points >= are_fraction of final
      points = [s for s in points if s / (1 - f) >= scfg.are_fraction * steps]
    # The main run saves and keeps its stable checkpoints at branch points.
    main = os.path.join(runs, name)
    mains.append(Run(name, name, role, member_config(
        scfg, dict(model), steps, decay, train, sweep_points=0, every_steps=0,
        keep_at_steps=tuple(points)), main, steps))
    for s in points:
      total = int(round(s / (1 - f)))
      branches.append(Run(
          name, name, role,
          member_config(scfg, dict(model), total, total - s, every_steps=0),
          os.path.join(runs, f"{name}_branch{s}"), total, main=main, start=s))
  if scfg.noise_seeds:
    member = scfg.noise_member or scfg.family[-1][0]
    model = dict(dict(scfg.family)[member])
    seed0 = int(scfg.base.train.seed)
    for seed in range(seed0 + 1, seed0 + scfg.noise_seeds + 1):
      cfg = member_config(scfg, model, steps, decay, dict(train, seed=seed),
                          sweep_points=0, every_steps=0, keep_at_steps=())
      name = f"{member}_seed{seed}"
      seeds.append(Run(member, name, "seed", cfg, os.path.join(runs, name),
                       steps))
  return mains + seeds + branches


def finished_branches(scfg, workdir: str) -> list[Run]:
  """Finished branch runs of this study's design in `workdir` (trained by
  fit_on='branches' or run_branches), whatever this invocation planned."""
  branched = copy.deepcopy(scfg)
  branched.fit_on = "branches"
  return [r for r in plan(branched, workdir) if r.kind == "branch"
          and runs_lib.finished(r.workdir, r.final)]


def _seed_branch(r: Run) -> None:
  """Copy the main run's stable checkpoint at the branch's start into its
  directory; training then resumes from it with the branch's schedule."""
  src = storage.join(ckpt_lib.checkpoint_dir(r.main), str(r.start))
  dst = storage.join(ckpt_lib.checkpoint_dir(r.workdir), str(r.start))
  if not storage.exists(storage.join(dst, ckpt_lib.COMMIT_FILE)):
    storage.rmtree(r.workdir)  # a half-made branch: start it again
    storage.copytree(src, dst)


def jobs(planned: list[Run], packed: bool) -> list[experiment.Job]:
  """The plan as `Experiment.train_all` jobs; a branch needs its main run.
  `packed` (runs side by side): biggest first (steps trained x tokens per
  step x non-embedding parameters; plan order among equals), so the
  longest run starts at once and the small ones fill the other groups
  around it. Otherwise the plan's own order."""
  def cost(r: Run) -> float:
    n = model_lib.param_counts(model_lib.ModelConfig.from_config(
        r.cfg.model, 1))["non_embedding"]
    return (r.final - (r.start or 0)) * r.cfg.train.batch_size * \
        r.cfg.train.seq_len * n
  order = range(len(planned))
  if packed:
    order = sorted(order, key=lambda i: (-cost(planned[i]), i))
  return [experiment.Job(
      r.cfg, r.workdir,
      before=functools.partial(_seed_branch, r) if r.kind == "branch" else None,
      needs=(r.main,) if r.main else ()) for r in (planned[i] for i in order)]


# --------------------------------------------------------------------- run


def run_study(scfg, workdir: str, train_fn=None) -> dict:
  scfg = checked(scfg)
  ex = experiment.Experiment(workdir, train_fn)
  planned = plan(scfg, workdir)
  ex.start(scfg, "study_config.json")
  ex.expect([(r.cfg, r.workdir) for r in planned])
  groups = experiment.device_groups(scfg.parallel)
  ex.train_all(jobs(planned, packed=bool(groups)), groups)
  noise = analysis.seed_noise(scfg, planned)  # both designs' intervals use it
  result = (_branch_design(scfg, workdir, planned, ex, noise)
            if scfg.fit_on == "branches" else {})
  ended = finished_branches(scfg, workdir)
  with ex.timed("curve_fit_s"):
    curve = (analysis.curve_analysis(scfg, workdir, planned,
                                     [r.workdir for r in ended], noise)
             if scfg.curve_points else None)
  if scfg.fit_on == "curves":
    result = dict(curve)
  elif curve is not None:
    result["curve_fit"] = curve  # the other design on the same runs
  mine = {r.workdir for r in planned}
  result["timing"] = analysis.design_times(
      planned + [r for r in ended if r.workdir not in mine], ex)
  wall = ex.wall_time()  # saves the phase times too
  result["wall_time_s"] = wall["wall_time_this_run_s"]  # as it always was
  result.update(wall)
  result["fit_on"] = scfg.fit_on
  result["variant"] = report_notes.variant(scfg)  # a plumbing check?
  result["design"] = (report.DESIGN_NOTE if scfg.fit_on == "branches" else
                      report.CURVE_NOTE).format(f=scfg.decay_fraction)
  experiment.write_json(ex.path("study.json"), result)
  report.write_report(result, workdir, planned, int(scfg.eval_tokens))
  return result


def _branch_design(scfg, workdir: str, planned: list[Run], ex,
                   noise: dict | None) -> dict:
  """Sweep every branch end and main run's final checkpoint, fit the
  configured law on the family, predict the target."""
  fitted = [r for r in planned if r.kind != "seed" or scfg.fit_seeds]
  by_name = {f"{r.run}@{r.final}": r for r in fitted}
  with ex.timed("sweep_s"):
    rows = sweep_lib.sweep(
        [r.workdir for r in fitted], ex.path("endpoints.csv"),
        eval_tokens=int(scfg.eval_tokens), names=list(by_name),
        only_steps={r.workdir: [r.final] for r in fitted},
        log=lambda s: print(s, file=sys.stderr, flush=True))
  records = [dict(row, run=by_name[row["run"]].run, role=by_name[row["run"]].role)
             for row in rows if row["run"] in by_name]
  sweep_lib.write_csv(ex.path("records.csv"), records)
  with ex.timed("fit_s"):
    result = analysis.analyse(scfg, records, workdir)
  truth = analysis.known_entropy(planned[0].workdir, result)
  if truth:
    result["known_entropy"] = truth
  if noise:
    result["seed_noise"] = noise
    result["coverage_95"] = analysis.fold_into_endpoints(scfg, result, noise)
  return result
