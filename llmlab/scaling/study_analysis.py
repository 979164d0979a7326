"""The scaling study's numbers from its trained runs (study.py trains and
sweeps them, study_report.py writes them up): the law fitted on the
branch design's endpoints (`analyse`), the curve law on the main runs'
logged evals (`curve_analysis`), the seed spread that widens both designs'
intervals (`seed_noise`), their coverage, and what each design cost
(`design_times`). `planned` is always a list of `study.Run` records."""

from __future__ import annotations

import functools
import os

import numpy as np

from llmlab import experiment
from llmlab import storage
from llmlab.scaling import curves as curves_lib
from llmlab.scaling import fitting
from llmlab.scaling import records as records_lib

# curve_fit.params_column (records.csv's names) -> the run's config.json
# model_info key the curves read N from.
PARAMS_KEYS = {"params": "params_total", "params_nonembed": "params_nonembed"}

def analyse(scfg, records: list[dict], workdir: str) -> dict:
  """Fit on the family, predict the target, score against the naive
  baseline (the largest fitted model's loss at the same token counts)."""
  col = scfg.fit.params_column
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


def fold_into_endpoints(scfg, result: dict, noise: dict) -> dict:
  """The law's bootstrap intervals at the target's points widened by the
  seed spread at the same step (noise_lo/hi), and how often each covers."""
  rows = [p for p in result.get("predictions") or [] if "loss" in p]
  if not rows or rows[0].get("lo") is None:
    return {}
  step = np.array([p["tokens"] for p in rows]) / tokens_per_step(scfg)
  sigma = np.interp(step, noise["step"], noise["rel_std_smoothed"])
  lo, hi = fitting.fold_noise([p["loss_hat"] for p in rows],
                              [p["lo"] for p in rows], [p["hi"] for p in rows],
                              sigma)
  for p, a, b in zip(rows, lo, hi):
    p.update(noise_lo=float(a), noise_hi=float(b))
  late = step >= float(scfg.are_fraction) * step.max()
  return _coverages(rows, late, dict(curve=("lo", "hi"),
                                     with_seed_noise=("noise_lo", "noise_hi")))


def curve_analysis(scfg, workdir: str, planned: list, branch_dirs: list[str],
                   noise: dict | None) -> dict:
  """The curve design on the main runs' logged evals: fit the curve law
  (scfg.curve_fit.form, size-coupled) on the family's whole curves, predict
  the target's at every eval, score it as the branch design is scored (ARE
  over points >= are_fraction of final, naive = the largest fitted member's
  loss at the same step), widen its intervals by the seed spread, and, where
  branch_dirs (finished branch runs) exist, predict their endpoints
  (held-out schedules) too."""
  mains = [r for r in planned if r.kind == "main"]
  family = [r.run for r in mains if r.role == "family"]
  name = next(r.run for r in mains if r.role == "target")
  seeds = [r for r in planned if r.kind == "seed" and scfg.fit_seeds]
  fitted = family + [r.run for r in seeds]
  col = scfg.curve_fit.params_column
  read = functools.partial(curves_lib.curves_from_runs,
                           params_key=PARAMS_KEYS[col])
  curves = read([r.workdir for r in mains + seeds])
  target = curves_lib.select_runs(curves, [name])
  ends = _last_rows(read(branch_dirs)) if branch_dirs else None
  predict = _concat([target] + ([ends] if ends else []))
  sigma = (np.interp(predict["step"], noise["step"], noise["rel_std_smoothed"])
           if noise else None)
  first = float(scfg.curve_fit.min_fraction) * int(scfg.steps)
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
             points=[dict(r, tokens=r["step"] * tokens_per_step(scfg),
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
  return _take(curves, curves["step"] >= first)


def _last_rows(curves: dict) -> dict:
  """Each run's last row (a branch's final eval), its rates kept."""
  keep = np.zeros(len(curves["run"]), bool)
  for n in records_lib.run_names(curves):
    keep[np.flatnonzero(curves["run"] == n)[-1]] = True
  return _take(curves, keep)


def _take(curves: dict, keep) -> dict:
  """The rows `keep` of a curves table, every run's exact rates kept."""
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


def tokens_per_step(scfg) -> int:
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


def seed_noise(scfg, planned: list) -> dict | None:
  """Run-to-run noise: the noise member's eval loss at each eval step over
  its seeds (the main run and the re-runs): relative std (ddof 1) per step,
  and smoothed as the RMS over each step and its 2 neighbours either side
  (a std of 3 seeds alone scatters by ~50%)."""
  seeds = [r for r in planned if r.kind == "seed"]
  if not seeds:
    return None
  member = seeds[0].member
  dirs = [r.workdir for r in planned
          if r.kind == "main" and r.member == member]
  dirs += [r.workdir for r in seeds]
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


def design_times(planned: list, ex) -> dict:
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
    v = [ex.run_seconds(r.workdir, unit == "cpu") for r in planned
         if r.kind == kind and not (family_only and r.role == "target")]
    return float(sum(x for x in v if x is not None))
  for kind in ("main", "seed", "branch"):
    for unit in ("wall", "cpu"):
      out[f"{kind}_{unit}_s"] = total(kind, unit)
  out["curve_evals_wall_s"] = float(sum(
      _eval_seconds(r.workdir, r.final) for r in planned
      if r.kind == "main" and r.cfg.train.eval_at_steps))
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


