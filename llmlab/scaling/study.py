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
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys

import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import errors
from llmlab import experiment
from llmlab import report_notes
from llmlab import runs as runs_lib
from llmlab import storage
from llmlab.scaling import curves as curves_lib
from llmlab.scaling import fitting
from llmlab.scaling import forms as forms_lib
from llmlab.scaling import records as records_lib
from llmlab.scaling import sweep as sweep_lib

log = logging.getLogger("llmlab")


FIT_ON = ("branches", "curves")
SPACINGS = ("log", "linear")
# curve_fit.params_column (records.csv's names) -> the run's config.json
# model_info key the curves read N from.
PARAMS_KEYS = {"params": "params_total", "params_nonembed": "params_nonembed"}


def check(scfg) -> None:
  """Bad study settings, named before anything trains."""
  fit_on = scfg.get("fit_on", "branches")
  if fit_on not in FIT_ON:
    raise errors.ConfigError(f"study config: fit_on={fit_on!r}; known: {list(FIT_ON)}")
  spacing = scfg.get("curve_spacing", "linear")
  if spacing not in SPACINGS:
    raise errors.ConfigError(f"study config: curve_spacing={spacing!r}; known: "
                     f"{list(SPACINGS)}")
  points = int(scfg.get("curve_points", 0))
  if points < 0:
    raise errors.ConfigError(f"study config: curve_points={points}: >= 0")
  if fit_on == "curves" or points:
    form = forms_lib.get_form(scfg.curve_fit.form)  # names the known forms
    if not form.curve:
      raise errors.ConfigError(f"study config: curve_fit.form={scfg.curve_fit.form!r} "
                       "is not a law of loss curves (e.g. multipower_n)")
    if points <= len(form.params):
      raise errors.ConfigError(
          f"study config: curve_points={points}: fitting "
          f"{scfg.curve_fit.form!r} ({len(form.params)} parameters) needs "
          f"more evals along each run than that"
          + (" (0 turns them off with fit_on='branches')"
             if fit_on == "branches" else ""))
  col = scfg.get("curve_fit", {}).get("params_column", "params")
  if col not in PARAMS_KEYS:
    raise errors.ConfigError(f"study config: curve_fit.params_column={col!r}; known: "
                     f"{list(PARAMS_KEYS)}")
  if not isinstance(scfg.get("fit_seeds", False), bool):
    raise errors.ConfigError(f"study config: fit_seeds={scfg.fit_seeds!r}: True or False")
  if int(scfg.get("noise_seeds", 0)) < 0:
    raise errors.ConfigError(f"study config: noise_seeds={scfg.noise_seeds}: >= 0")
  member = scfg.get("noise_member", "")
  names = [n for n, _ in scfg.family]
  if member and member not in names:
    raise errors.ConfigError(f"study config: noise_member={member!r} is not a family "
                     f"member ({names})")


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


def _seed_branch(main_dir: str, s: int, workdir: str) -> None:
  """Copy the main run's stable checkpoint at step s into the branch's
  directory; training then resumes from it with the branch's schedule."""
  src = storage.join(ckpt_lib.checkpoint_dir(main_dir), str(s))
  dst = storage.join(ckpt_lib.checkpoint_dir(workdir), str(s))
  if not storage.exists(storage.join(dst, ckpt_lib.COMMIT_FILE)):
    storage.rmtree(workdir)  # a half-made branch: start it again
    storage.copytree(src, dst)


def noise_member(scfg) -> str | None:
  """The family member re-trained with other seeds (default the largest)."""
  if int(scfg.get("noise_seeds", 0)) <= 0:
    return None
  return scfg.get("noise_member", "") or scfg.family[-1][0]


def plan(scfg, workdir: str) -> list[dict]:
  """Every run of the study in training order: one main run per size (its
  evals along the curve when curve_points > 0), the noise member's seed
  re-runs, then the branches (fit_on='branches', or run_branches)."""
  check(scfg)
  steps = int(scfg.steps)
  decay = max(1, int(round(scfg.decay_fraction * steps)))
  branches = (scfg.get("fit_on", "branches") == "branches"
              or bool(scfg.get("run_branches", False)))
  at = curve_steps(steps, int(scfg.get("curve_points", 0)),
                   scfg.get("curve_spacing", "linear"),
                   int(scfg.base.optim.warmup_steps))
  train = ({"eval_at_steps": tuple(at), "eval_tokens": int(scfg.eval_tokens)}
           if at else {})
  members = [(n, dict(m), "family") for n, m in scfg.family]
  members.append((scfg.target[0], dict(scfg.target[1]), "target"))
  mains, branch_runs = [], []
  for name, model, role in members:
    main_dir = os.path.join(workdir, "runs", name)
    points = branch_points(steps, scfg.decay_fraction, scfg.points,
                           scfg.min_fraction) if branches else []
    if role == "target":  # ARE only uses its points >= are_fraction of final
      points = [s for s in points
                if s / (1 - scfg.decay_fraction) >= scfg.are_fraction * steps]
    # The main run saves and keeps its stable checkpoints at branch points.
    main = member_config(scfg, model, steps, decay, train, sweep_points=0,
                         every_steps=0, keep_at_steps=tuple(points))
    mains.append(dict(name=name, role=role, cfg=main, workdir=main_dir,
                      main=None, start=None, final=steps, kind="main"))
    for s in points:
      total = int(round(s / (1 - scfg.decay_fraction)))
      branch_runs.append(dict(
          name=name, role=role, main=main_dir, start=s, kind="branch",
          cfg=member_config(scfg, model, total, total - s, every_steps=0),
          workdir=os.path.join(workdir, "runs", f"{name}_branch{s}"),
          final=total))
  seeds = []
  member = noise_member(scfg)
  if member:
    model = dict(dict(scfg.family)[member])
    seed0 = int(scfg.base.train.seed)
    for k in range(1, int(scfg.noise_seeds) + 1):
      cfg = member_config(scfg, model, steps, decay,
                          dict(train, seed=seed0 + k), sweep_points=0,
                          every_steps=0, keep_at_steps=())
      seeds.append(dict(name=member, role="seed", cfg=cfg, main=None,
                        start=None, final=steps, kind="seed", seed=seed0 + k,
                        run=f"{member}_seed{seed0 + k}",
                        workdir=os.path.join(workdir, "runs",
                                             f"{member}_seed{seed0 + k}")))
  return mains + seeds + branch_runs


def run_study(scfg, workdir: str, train_fn=None) -> dict:
  ex = experiment.Experiment(workdir, train_fn)
  planned = plan(scfg, workdir)  # checks the settings before anything runs
  ex.start(scfg, "study_config.json")
  ex.expect([(r["cfg"], r["workdir"]) for r in planned])
  for r in planned:
    seed = None if r["main"] is None else functools.partial(
        _seed_branch, r["main"], r["start"], r["workdir"])
    ex.train(r["cfg"], r["workdir"], before=seed)
  fit_on = scfg.get("fit_on", "branches")
  noise = seed_noise(scfg, planned)  # both designs' intervals use it
  if fit_on == "branches":
    result = _branch_design(scfg, workdir, planned, ex, noise)
  else:
    result = {}
  with ex.timed("curve_fit_s"):
    curve = (curve_analysis(scfg, workdir, planned, noise)
             if _has_curves(planned) else None)
  if fit_on == "curves":
    result = dict(curve)
  elif curve is not None:
    result["curve_fit"] = curve  # the other design on the same runs
  finished = set(branch_endpoints(scfg, workdir))
  mine = {p["workdir"] for p in planned}
  result["timing"] = design_times(planned + [
      r for r in _branch_plan(scfg, workdir) if r["kind"] == "branch" and
      r["workdir"] in finished and r["workdir"] not in mine], ex)
  wall = ex.wall_time()  # saves the phase times too
  result["wall_time_s"] = wall["wall_time_this_run_s"]  # as it always was
  result.update(wall)
  result["fit_on"] = fit_on
  result["variant"] = report_notes.variant(scfg)  # a plumbing check?
  result["design"] = (DESIGN_NOTE if fit_on == "branches" else
                      CURVE_NOTE).format(f=scfg.decay_fraction)
  experiment.write_json(ex.path("study.json"), result)
  experiment.write_json(ex.path(f"study_{fit_on}.json"), result)
  write_report(result, workdir, planned, int(scfg.eval_tokens))
  return result


def _branch_design(scfg, workdir: str, planned: list[dict], ex,
                   noise: dict | None) -> dict:
  """Sweep every branch end and main run's final checkpoint, fit the
  configured law (today's design)."""
  fitted = [r for r in planned if r["kind"] != "seed" or _fit_seeds(scfg)]
  names = [f"{_run(r)}@{r['final']}" for r in fitted]
  with ex.timed("sweep_s"):
    rows = sweep_lib.sweep(
        [r["workdir"] for r in fitted], ex.path("endpoints.csv"),
        eval_tokens=int(scfg.eval_tokens), names=names,
        only_steps={r["workdir"]: [r["final"]] for r in fitted},
        log=lambda s: print(s, file=sys.stderr, flush=True))
  by_name = {f"{_run(r)}@{r['final']}": r for r in fitted}
  records = []
  for row in rows:
    r = by_name.get(row["run"])
    if r is None:
      continue
    records.append(dict(row, run=_run(r), role=r["role"]))
  sweep_lib.write_csv(ex.path("records.csv"), records)
  with ex.timed("fit_s"):
    result = analyse(scfg, records, workdir)
  truth = known_entropy(planned[0]["workdir"], result)
  if truth:
    result["known_entropy"] = truth
  if noise:
    result["seed_noise"] = noise
    result["coverage_95"] = _fold_into_endpoints(scfg, result, noise)
  return result


def _fit_seeds(scfg) -> bool:
  return bool(scfg.get("fit_seeds", False))


def _run(r: dict) -> str:
  """A planned run's name in records and curves: the member's name, or
  "<member>_seed<k>" for a seed re-run."""
  return r.get("run", r["name"])


def _fold_into_endpoints(scfg, result: dict, noise: dict) -> dict:
  """The law's bootstrap intervals at the target's points widened by the
  seed spread at the same step (noise_lo/hi), and how often each covers."""
  rows = [p for p in result.get("predictions") or [] if "loss" in p]
  if not rows or rows[0].get("lo") is None:
    return {}
  step = np.array([p["tokens"] for p in rows]) / _tokens_per_step(scfg)
  sigma = np.interp(step, noise["step"], noise["rel_std_smoothed"])
  lo, hi = fitting.fold_noise([p["loss_hat"] for p in rows],
                              [p["lo"] for p in rows], [p["hi"] for p in rows],
                              sigma)
  for p, a, b in zip(rows, lo, hi):
    p.update(noise_lo=float(a), noise_hi=float(b))
  late = step >= float(scfg.are_fraction) * step.max()
  return _coverages(rows, late, dict(curve=("lo", "hi"),
                                     with_seed_noise=("noise_lo", "noise_hi")))


def _has_curves(planned: list[dict]) -> bool:
  return bool(planned[0]["cfg"].train.get("eval_at_steps", ()))


def curve_analysis(scfg, workdir: str, planned: list[dict],
                   noise: dict | None) -> dict:
  """The curve design on the main runs' logged evals: fit the curve law
  (scfg.curve_fit.form, size-coupled) on the family's whole curves, predict
  the target's at every eval, score it as the branch design is scored (ARE
  over points >= are_fraction of final, naive = the largest fitted member's
  loss at the same step), widen its intervals by the seed spread, and, where
  branch runs exist, predict their endpoints (held-out schedules) too."""
  mains = [r for r in planned if r["kind"] == "main"]
  family = [r["name"] for r in mains if r["role"] == "family"]
  name = next(r["name"] for r in mains if r["role"] == "target")
  seeds = [r for r in planned if r["kind"] == "seed" and _fit_seeds(scfg)]
  fitted = family + [_run(r) for r in seeds]
  col = scfg.curve_fit.get("params_column", "params")
  read = functools.partial(curves_lib.curves_from_runs,
                           params_key=PARAMS_KEYS[col])
  curves = read([r["workdir"] for r in mains + seeds])
  target = curves_lib.select_runs(curves, [name])
  branch_dirs = branch_endpoints(scfg, workdir)
  ends = _last_rows(read(branch_dirs)) if branch_dirs else None
  predict = _concat([target] + ([ends] if ends else []))
  sigma = (np.interp(predict["step"], noise["step"], noise["rel_std_smoothed"])
           if noise else None)
  first = float(scfg.curve_fit.get("min_fraction", 0.0)) * int(scfg.steps)
  fit = fitting.run_curve_fit(
      _from_step(curves, first), scfg.curve_fit.form,
      os.path.join(workdir, "curve_fit"), predict,
      fit_runs=fitted, n_bootstrap=int(scfg.curve_fit.bootstrap), noise=sigma,
      with_rows=True, source=f"{workdir}/runs/*/metrics.jsonl (eval_loss)")
  every = fit.pop("rows")
  rows = [r for r in every if r["run"] == name]
  steps = np.array([r["step"] for r in rows], np.float64)
  actual = np.array([r["loss"] for r in rows])
  guess = np.array([r["loss_hat"] for r in rows])
  biggest = curves_lib.select_runs(curves, [family[-1]])
  naive = np.interp(steps, biggest["step"], biggest["loss"])
  late = steps >= float(scfg.are_fraction) * steps.max()
  are = float(np.mean(np.abs(guess - actual)[late] / actual[late]))
  naive_are = float(np.mean(np.abs(naive - actual)[late] / actual[late]))
  n_target = float(target["params"][0])
  out = dict(fit, are=are, naive_are=naive_are,
             skill=1 - are / naive_are if naive_are > 0 else None,
             are_rule=dict(min_fraction=float(scfg.are_fraction),
                           final_only=False),
             target=dict(name=name, params=n_target,
                         ratio_to_largest_fitted=n_target / biggest["params"][0]),
             points=[dict(r, tokens=r["step"] * _tokens_per_step(scfg),
                          naive=float(n)) for r, n in zip(rows, naive)],
             coverage_95=_coverages(rows, late), seed_noise=noise,
             params_column=col)
  out["prediction"] = out["points"][-1]
  _plot_target_curve(curves, fitted, name, out["points"], workdir)
  if ends:
    out["branch_endpoints"] = _branch_scores(
        [r for r in every if r["run"] != name], family)
  return out


def _plot_target_curve(curves: dict, fitted: list[str], name: str,
                       points: list[dict], workdir: str) -> None:
  """target_curve.png (and a TensorBoard image): the fitted curves, the
  target's evals and its prediction with the 95% band."""
  from llmlab.scaling import plots  # noqa: PLC0415 (matplotlib only here)
  family = {}
  for run in fitted:
    m = curves["run"] == run
    family[run] = (curves["step"][m], curves["loss"][m], curves["params"][m][0])
  plots.save({"target_curve": plots.target_curve(family, name, points)},
             workdir, prefix="study")


def _from_step(curves: dict, first: float) -> dict:
  """The rows at steps >= first (curve_fit.min_fraction of the run): the
  warmup's end is where the law, fitted on log loss, is least like the
  late curve a prediction is scored on."""
  out = records_lib.take({k: v for k, v in curves.items() if k != "eta"},
                         curves["step"] >= first)
  out["eta"] = curves["eta"]
  return out


def _last_rows(curves: dict) -> dict:
  """Each run's last row (a branch's final eval), its rates kept."""
  keep = np.zeros(len(curves["run"]), bool)
  for n in records_lib.run_names(curves):
    keep[np.flatnonzero(curves["run"] == n)[-1]] = True
  out = records_lib.take({k: v for k, v in curves.items() if k != "eta"}, keep)
  out["eta"] = curves["eta"]
  return out


def _concat(tables: list[dict]) -> dict:
  """Curves tables of different runs as one (their exact rates merged)."""
  cols = [k for k in tables[0] if k != "eta" and all(k in t for t in tables)]
  out = {k: np.concatenate([t[k] for t in tables]) for k in cols}
  out["eta"] = {k: v for t in tables for k, v in t.get("eta", {}).items()}
  return out


def _branch_scores(rows: list[dict], family: list[str]) -> dict:
  """Errors and 95% coverage of the predicted branch ends, for the family's
  branches (held-out schedules) and the target's (schedule and size)."""
  def score(mine):
    if not mine:
      return None
    err = [abs(r["loss_hat"] - r["loss"]) / r["loss"] for r in mine]
    cover = {k: float(np.mean([_inside(r, lo, hi) for r in mine]))
             for k, (lo, hi) in _INTERVALS.items()
             if any(r.get(lo) is not None for r in mine)}
    return dict(n=len(mine), mean_rel_error=float(np.mean(err)),
                worst_rel_error=float(np.max(err)), coverage_95=cover)
  fam = [r for r in rows if r["run"].split("_branch")[0] in family]
  return dict(family=score(fam), target=score([r for r in rows if r not in fam]),
              rows=rows)


def _inside(row: dict, lo: str, hi: str) -> bool:
  """The row's loss lies in its interval (one undefined there: not)."""
  return (row.get(lo) is not None and row.get(hi) is not None
          and row[lo] <= row["loss"] <= row[hi])


_INTERVALS = dict(curve=("loss_lo", "loss_hi"), observed=("obs_lo", "obs_hi"),
                  with_seed_noise=("run_lo", "run_hi"))


def _tokens_per_step(scfg) -> int:
  return int(scfg.base.train.batch_size) * int(scfg.base.train.seq_len)


def _coverages(rows: list[dict], late, intervals=None) -> dict:
  """Share of the target's points inside each 95% interval (default
  `_INTERVALS`: of the law's curve (parameters), of an observed loss (+ fit
  residuals), of another run's loss (+ seed spread)); over all points and
  the scored late ones."""
  out = {}
  for name, (lo, hi) in (intervals or _INTERVALS).items():
    if all(r.get(lo) is None for r in rows):
      continue
    inside = np.array([_inside(r, lo, hi) for r in rows])
    out[name] = dict(all=float(inside.mean()),
                     late=float(inside[np.asarray(late)].mean()))
  return out


def seed_noise(scfg, planned: list[dict]) -> dict | None:
  """Run-to-run noise: the noise member's eval loss at each eval step over
  its seeds (the main run and the re-runs): relative std (ddof 1) per step,
  and smoothed as the RMS over each step and its 2 neighbours either side
  (a std of 3 seeds alone scatters by ~50%)."""
  member = noise_member(scfg)
  if not member:
    return None
  dirs = [r["workdir"] for r in planned
          if r["kind"] == "main" and r["name"] == member]
  dirs += [r["workdir"] for r in planned if r["kind"] == "seed"]
  curves = curves_lib.curves_from_runs(dirs)
  names = records_lib.run_names(curves)
  common = sorted(set.intersection(*[
      set(curves["step"][curves["run"] == n].tolist()) for n in names]))
  loss_KxT = np.array([[curves["loss"][(curves["run"] == n) &
                                       (curves["step"] == s)][0]
                        for s in common] for n in names])
  rel_T = loss_KxT.std(axis=0, ddof=1) / loss_KxT.mean(axis=0)
  smooth_T = np.array([np.sqrt(np.mean(rel_T[max(0, i - 2):i + 3] ** 2))
                       for i in range(len(rel_T))])
  late = np.asarray(common) >= float(scfg.are_fraction) * max(common)
  return dict(member=member, runs=names, step=common,
              loss=loss_KxT.tolist(), rel_std=rel_T.tolist(),
              rel_std_smoothed=smooth_T.tolist(),
              rel_std_rms_late=float(np.sqrt(np.mean(rel_T[late] ** 2))),
              rel_std_rms=float(np.sqrt(np.mean(rel_T ** 2))))


def _branch_plan(scfg, workdir: str) -> list[dict]:
  """The plan of this study with fit_on='branches'."""
  branched = copy.deepcopy(scfg)
  if "fit_on" in branched:
    branched.fit_on = "branches"
  return plan(branched, workdir)


def branch_endpoints(scfg, workdir: str) -> list[str]:
  """Finished branch runs of this study's design in `workdir` (trained by
  fit_on='branches' or run_branches), whatever this invocation planned."""
  out = []
  for r in _branch_plan(scfg, workdir):
    if r["kind"] == "branch" and runs_lib.finished(r["workdir"],
                                                   r["cfg"].train.steps):
      out.append(r["workdir"])
  return out


def design_times(planned: list[dict], ex) -> dict:
  """Seconds of each design, from the harness's per-run wall and CPU times
  over all invocations, and the analysis phases (the longest invocation's: a
  re-run reuses the sweep's cached evals).

  branches = main + branch runs + sweep + fit; curves = main runs + curve
  fit, and `_with_seeds` adding the noise member's re-runs. `_family`: the
  same without the target's runs, which a study trains only to score its
  prediction (what a prediction costs). The main runs are the same runs in
  both designs; `curve_evals_wall_s` is what their evals along the curve
  cost (the branch design alone would not make them).
  """
  phases = ex.state.setdefault("phase_seconds", {})
  now = dict(ex.timing, **{k + "_cpu": v for k, v in ex.cpu_timing.items()})
  for k, v in now.items():
    phases[k] = max(v, phases.get(k, 0.0))
  out = {}
  def total(kind, unit, family_only=False):
    v = [ex.run_seconds(r["workdir"], unit == "cpu") for r in planned
         if r["kind"] == kind and not (family_only and r["role"] == "target")]
    return float(sum(x for x in v if x is not None))
  for kind in ("main", "seed", "branch"):
    for unit in ("wall", "cpu"):
      out[f"{kind}_{unit}_s"] = total(kind, unit)
  out["curve_evals_wall_s"] = float(sum(
      _eval_seconds(r["workdir"], r["final"]) for r in planned
      if r["kind"] == "main" and r["cfg"].train.get("eval_at_steps")))
  out.update(phases)
  for unit, suffix in (("wall", ""), ("cpu", "_cpu")):
    for tag, fam in (("", False), ("_family", True)):
      main = total("main", unit, fam)
      out[f"branches_design{tag}_{unit}_s"] = (
          main + total("branch", unit, fam) + phases.get(f"sweep_s{suffix}", 0.0)
          + phases.get(f"fit_s{suffix}", 0.0))
      out[f"curves_design{tag}_{unit}_s"] = (
          main + phases.get(f"curve_fit_s{suffix}", 0.0))
      out[f"curves_design{tag}_with_seeds_{unit}_s"] = (
          out[f"curves_design{tag}_{unit}_s"] + total("seed", unit))
  return out


def _eval_seconds(run_dir: str, final: int) -> float:
  """Seconds a run spent in its logged evals before the final one."""
  return float(sum(
      float(row["eval_time_s"])
      for row in storage.jsonl_rows(storage.join(run_dir, "metrics.jsonl"))
      if "eval_time_s" in row and int(row.get("step", final)) != final))


CURVE_NOTE = ("loss curves: one run per size with a warmup-stable-decay "
              "schedule, evaluated along the way; the multi-power law "
              "across sizes (curve_fit.form) is fitted to every logged "
              "eval of the family and predicts the target's whole curve (no "
              "branch runs; the decay is the last {f:.0%} of each run).")


DESIGN_NOTE = ("warmup-stable-decay: one long run per size with a constant "
               "learning rate after warmup; at log-spaced stable checkpoints "
               "a branch decays the learning rate linearly to 10% over the "
               "last {f:.0%} of its length. Every fitted point is the end of "
               "a fully annealed run, so points at different token counts "
               "are comparable (a mid-cosine checkpoint would sit above the "
               "loss of a run that ends there).")


def analyse(scfg, records: list[dict], workdir: str) -> dict:
  """Fit on the family, predict the target, score against the naive
  baseline (the largest fitted model's loss at the same token counts)."""
  col = scfg.fit.get("params_column", "params")
  table = [{"run": r["run"], "step": r["step"], "params": r[col],
            "tokens": r["tokens"], "loss": r["loss"], "flops": r["flops"]}
           for r in records]
  target = scfg.target[0]
  out = fitting.run_fit(table, form=scfg.fit.form, target=target,
                        out_dir=workdir, n_bootstrap=int(scfg.fit.bootstrap),
                        min_fraction=float(scfg.fit.min_fraction) or None,
                        are_min_fraction=float(scfg.are_fraction),
                        source=os.path.join(workdir, "records.csv"))
  fam = [float(r[col]) for r in records if r["role"] == "family"]
  tgt = [float(r[col]) for r in records if r["role"] == "target"]
  out["params_column"] = col
  out["target"] = {"name": target, "params": tgt[0] if tgt else None,
                   "ratio_to_largest_fitted": tgt[0] / max(fam) if tgt else None}
  final = [p for p in out["predictions"]
           if p.get("tokens") == max(q.get("tokens") for q in out["predictions"])]
  out["prediction"] = final[0] if final else None
  return out


def known_entropy(run_dir: str, result: dict) -> dict | None:
  """The fitted E next to the true floor, when the data has one.

  On the synthetic language the entropy rate h is exact; the best mean loss
  per target is slightly above h (document starts cost H(pi), EOS is free),
  recorded by the source as `doc_entropy_nats_per_target`. A law whose E
  lands near it has found the real irreducible loss, not a fitting artefact.
  """
  try:
    info = experiment.read_json(os.path.join(run_dir, "config.json"), {})
    info = info.get("data_info", {})
  except (OSError, ValueError):
    return None
  h = info.get("entropy_rate_nats")
  if h is None:
    return None
  floor = next((src.get("doc_entropy_nats_per_target")
                for src in info.get("sources", [])
                if "doc_entropy_nats_per_target" in src), None)
  e = result.get("params", {}).get("E")
  out = {"entropy_rate_nats": h, "floor_nats_per_target": floor,
         "fitted_E": e}
  if e is not None:
    out["E_minus_entropy_rate"] = e - h
    out["E_relative_error"] = abs(e - h) / h
  return out


def write_report(result: dict, workdir: str, planned: list[dict] = (),
                 eval_tokens: int | None = None) -> None:
  """report.md: the numbers a researcher reads first, and the plots. Every
  label comes from the settings that produced its number."""
  thin = report_notes.too_few_points(result)
  lines = ["# Scaling study", "", *report_notes.note(result),
           f"Design: {result['design']}", ""]
  lines += [thin, ""] if thin else _law_section(result)
  curve = result.get("curve_fit") or result
  thin_curve = report_notes.too_few_points(curve)
  if not thin_curve:
    lines += _curve_lines(curve)
  elif curve is not result:  # the other design's law
    lines += [thin_curve, ""]
  lines += _timing_table(result.get("timing"))
  lines += [] if thin else _optimal_table(result.get("compute_optimal"))
  lines += _runs_table(planned, eval_tokens, result.get("fit_on") == "curves")
  for png in [f for f in storage.listdir(workdir) if f.endswith(".png")]:
    lines.append(f"![{png}]({png})")
  experiment.write_text(os.path.join(workdir, "report.md"),
                        "\n".join(lines) + "\n")


def _law_section(result: dict) -> list[str]:
  """The fitted law, the target's prediction and its score."""
  rule = result.get("are_rule", {})
  lines = [
      "| quantity | value |", "| --- | --- |",
      f"| fitted law | {_law(result)} |",
      f"| target | {result['target']['name']} "
      f"({result['target']['params']:,.0f} params, "
      f"{result['target']['ratio_to_largest_fitted']:.1f}x the largest fitted) |",
      f"| ARE (target, {_are_rule(rule)}) | {100 * result['are']:.2f}% |",
      f"| naive ARE (largest fitted model's loss) | "
      f"{100 * result['naive_are']:.2f}% |",
      f"| skill = 1 - ARE/naive | {result['skill']:.3f} |",
      f"| wall time | {result['wall_time_total_s'] / 60:.1f} min over all "
      f"invocations ({result['wall_time_s'] / 60:.1f} min this one) |", ""]
  truth = result.get("known_entropy")
  if truth:
    lines += [f"Known entropy rate of the data: {truth['entropy_rate_nats']:.4f}"
              f" nats/token (best mean loss per target "
              f"{truth['floor_nats_per_target'] or float('nan'):.4f}); "
              f"fitted E = {truth['fitted_E']:.4f}.", ""]
  if result.get("fit_on") == "curves":
    lines += _curve_table(result)
  else:
    lines += _prediction_table(result.get("predictions") or [],
                               result.get("prediction"))
    lines += [f"The law's 95% interval ({'bootstrap' if name == 'curve' else name}"
              f") covers {100 * c['all']:.0f}% of the target's points."
              for name, c in (result.get("coverage_95") or {}).items()]
    lines += [""] if result.get("coverage_95") else []
  return lines


def _law(result: dict) -> str:
  """The fitted law in one line, for either design."""
  p = result.get("params", {})
  if result.get("fit_on") != "curves":
    return (f"L(N,D) = {p.get('E', float('nan')):.4f} + "
            f"{p.get('A', float('nan')):.4g}/N^{p.get('alpha', float('nan')):.4f} + "
            f"{p.get('B', float('nan')):.4g}/D^{p.get('beta', float('nan')):.4f}")
  return f"{result['form']}: " + ", ".join(f"{k} {v:.4g}" for k, v in p.items())


def _curve_table(result: dict) -> list[str]:
  """The target's curve: predicted at every logged eval against what it
  reached, with the law's and the run-to-run 95% intervals."""
  out = ["## Target: predicted vs actual along its curve", "",
         "| step | tokens | predicted | 95% (law) | 95% (+ residuals, seeds) "
         "| actual | error |", "| ---: | ---: | ---: | --- | --- | ---: | ---: |"]
  for r in result["points"]:
    law = ("-" if r.get("loss_lo") is None else
           f"[{r['loss_lo']:.4f}, {r['loss_hi']:.4f}]")
    lo, hi = (("run_lo", "run_hi") if r.get("run_lo") is not None
              else ("obs_lo", "obs_hi"))
    obs = "-" if r.get(lo) is None else f"[{r[lo]:.4f}, {r[hi]:.4f}]"
    out.append(f"| {r['step']} | {r['tokens']:.3g} | {r['loss_hat']:.4f} | "
               f"{law} | {obs} | {r['loss']:.4f} | "
               f"{100 * (r['loss_hat'] - r['loss']) / r['loss']:+.2f}% |")
  return out + ["", "Losses in nats/token: each run's own evals during "
                "training (study `eval_tokens`).", ""]


def _curve_lines(curve: dict) -> list[str]:
  """Seed noise, interval coverage and held-out branch schedules."""
  out = []
  if curve.get("are") is not None and "points" in curve:
    out.append(f"Curve law ({curve['form']}) on the main runs' evals: ARE "
               f"{100 * curve['are']:.2f}%, naive {100 * curve['naive_are']:.2f}%"
               f", skill {curve['skill']:.3f}.")
  noise = curve.get("seed_noise")
  if noise:
    out.append(f"Seed noise ({noise['member']}, {len(noise['runs'])} seeds): "
               f"relative std {100 * noise['rel_std_rms']:.2f}% RMS over its "
               f"evals, {100 * noise['rel_std_rms_late']:.2f}% over the late "
               "ones.")
  for name, c in (curve.get("coverage_95") or {}).items():
    out.append(f"The curve law's 95% interval ({name}) covers "
               f"{100 * c['all']:.0f}% of the target's points "
               f"({100 * c['late']:.0f}% of the scored ones).")
  br = curve.get("branch_endpoints") or {}
  for who in ("family", "target"):
    b = br.get(who)
    if b:
      cov = ", ".join(f"{k} {100 * v:.0f}%" for k, v in b["coverage_95"].items())
      out.append(f"Branch endpoints ({who}, {b['n']} held-out schedules): mean "
                 f"error {100 * b['mean_rel_error']:.2f}%, worst "
                 f"{100 * b['worst_rel_error']:.2f}%; 95% coverage {cov}.")
  return out + [""] if out else []


def _timing_table(t: dict | None) -> list[str]:
  """Seconds per kind of run and per design (wall and this process's CPU
  time; the CPU is shared, so wall time also counts other jobs)."""
  if not t:
    return []
  out = ["## Time", "", "| part | wall s | CPU s |", "| --- | ---: | ---: |"]
  designs = ("branches_design",) if t.get("branch_wall_s") else ()
  for d in designs + ("curves_design", "curves_design_with_seeds"):
    for tag in ("", "_family"):
      key = d.replace("_design", "_design" + tag)
      if f"{key}_wall_s" in t:
        out.append(f"| {d.replace('_', ' ')}{' (family only)' if tag else ''} "
                   f"| {t[key + '_wall_s']:.0f} | {t[key + '_cpu_s']:.0f} |")
  for kind in ("main", "seed", "branch"):
    out.append(f"| {kind} runs | {t.get(kind + '_wall_s', 0):.0f} | "
               f"{t.get(kind + '_cpu_s', 0):.0f} |")
  for key in ("sweep_s", "fit_s", "curve_fit_s"):
    if key in t:
      out.append(f"| {key[:-2].replace('_', ' ')} | {t[key]:.0f} | "
                 f"{t.get(key[:-2] + '_s_cpu', 0):.0f} |")
  return out + [""]


def _are_rule(rule: dict) -> str:
  """The ARE's selection of target points, as study.json's are_rule says."""
  if rule.get("final_only"):
    return "final checkpoint only"
  frac = rule.get("min_fraction")
  return (f">= {100 * frac:.0f}% of final tokens" if frac
          else "all checkpoints")


def _prediction_table(rows: list[dict], final: dict | None) -> list[str]:
  """The target's predicted losses with their 95% intervals (parameter
  uncertainty from the bootstrap) against what it reached."""
  rows = [r for r in rows if "loss" in r] or ([final] if final else [])
  if not rows:
    return []
  out = ["## Target: predicted vs actual", "",
         "| tokens | predicted loss | 95% interval | actual | error |",
         "| ---: | ---: | --- | ---: | ---: |"]
  for r in rows:
    ci = ("-" if r.get("lo") is None or r["lo"] != r["lo"] else
          f"[{r['lo']:.4f}, {r['hi']:.4f}]")
    actual = r.get("loss")
    err = ("-" if actual is None else
           f"{100 * (r['loss_hat'] - actual) / actual:+.2f}%")
    out.append(f"| {r['tokens']:.3g} | {r['loss_hat']:.4f} | {ci} | "
               f"{'-' if actual is None else f'{actual:.4f}'} | {err} |")
  return out + ["", "Losses in nats/token on the sweep's held-out set.", ""]


def _optimal_table(co: dict | None) -> list[str]:
  if not co:
    return []
  a_ci = co.get("a_interval")
  head = (f"N* = {co['G']:.3g} (C/6)^{co['a']:.3f}"
          + (f" (95% interval of the exponent [{a_ci[0]:.3f}, {a_ci[1]:.3f}])"
             if a_ci else "") + f", D* = (C/6)^{co['b']:.3f} / {co['G']:.3g}")
  out = ["## Compute-optimal allocation", "", head, "",
         "| compute C (FLOPs) | params N* | tokens D* | tokens per param |",
         "| ---: | ---: | ---: | ---: |"]
  for c, n, d, r in zip(co["compute"], co["params"], co["tokens"],
                        co["tokens_per_param"]):
    out.append(f"| {c:.1e} | {n:.3g} | {d:.3g} | {r:.3g} |")
  return out + [""]


def _runs_table(planned: list[dict], eval_tokens: int | None,
               curves: bool = False) -> list[str]:
  """Where each point of the report was trained (run directories are named
  by size and branch step; the report names a point size@final_step)."""
  if not planned:
    return []
  out = ["## Runs", "",
         "| report name | run directory | role | steps | branched at |",
         "| --- | --- | --- | ---: | ---: |"]
  for r in planned:
    out.append(f"| {_run(r)}@{r['final']} | "
               f"{os.path.relpath(r['workdir'], os.path.dirname(os.path.dirname(r['workdir'])))} | "
               f"{r['role']} | {r['final']} | {r['start'] or '-'} |")
  if eval_tokens and not curves:
    out += ["", f"Every fitted point is the sweep's eval of the run's final "
            f"checkpoint on {eval_tokens:,} held-out tokens (study "
            "`eval_tokens`); the eval logged during training uses the run's "
            "own `train.eval_tokens` budget, so the two differ slightly."]
  elif eval_tokens:
    out += ["", f"Every fitted point is an eval logged during training "
            f"(`train.eval_at_steps`) on {eval_tokens:,} held-out tokens "
            "(study `eval_tokens`)."]
  return out + [""]
