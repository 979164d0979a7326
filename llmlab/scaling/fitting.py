"""Fit a scaling law to loss records, predict a target, write fit.json: the
library behind `llmlab fit` (llmlab/commands/fit.py) and the studies.

run_fit fits a law across runs (chinchilla and the other record forms) and
predicts a held-out run or a point; run_curve_fit fits a law of whole loss
curves (multipower, multipower_n; see curves.py) and predicts other curves
into predictions.csv; summary and curve_summary are their readable reports.
"""

import csv
import io
import logging
import math
import os
import statistics
import time

import numpy as np

from llmlab import errors
from llmlab import storage
from llmlab.scaling import curves as curves_lib
from llmlab.scaling import fit as fit_lib
from llmlab.scaling import forms as forms_lib
from llmlab.scaling import records as records_lib

log = logging.getLogger("llmlab")


def parse_target(target, records):
  """A run name of the records, or "N,D" -> ("run", name) / ("point", (N, D))."""
  if target is None:
    return None
  if isinstance(target, (tuple, list)):
    return ("point", (float(target[0]), float(target[1])))
  if target in set(records["run"].tolist()):
    return ("run", target)
  parts = target.split(",")
  try:
    n, d = (float(p) for p in parts)
  except ValueError:
    runs = records_lib.run_names(records)
    raise errors.UsageError(f"--target={target!r} is neither a run of the records "
                     f"({runs[:10]}{'...' if len(runs) > 10 else ''}) nor 'N,D'") from None
  if not (n > 0 and d > 0 and math.isfinite(n) and math.isfinite(d)):
    raise errors.UsageError(f"--target={target!r}: N and D must be finite and > 0")
  return ("point", (n, d))


def _compute_grid(fit_records, extra=()) -> np.ndarray:
  """Powers of ten from the smallest fitted compute to 100x the largest."""
  c = 6.0 * fit_records["params"] * fit_records["tokens"]
  lo, hi = math.floor(math.log10(c.min())), math.ceil(math.log10(c.max())) + 2
  return np.unique(np.concatenate([10.0 ** np.arange(lo, hi + 1), np.asarray(extra, float)]))


def _interval(samples_BxM, level=0.95, skip_nan=False):
  """Percentiles over refits; skip_nan: a refit whose law is undefined at a
  point (a curve law gone negative: NaN) is left out there."""
  q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
  with np.errstate(all="ignore"):  # inf samples (diverged refits): inf - inf
    if not skip_nan:
      return np.percentile(samples_BxM, q, axis=0)
    return np.nanpercentile(samples_BxM, q, axis=0)


def _compute_optimal(fit, boot, fit_records, extra_compute):
  if fit.form != "chinchilla":
    return None
  opt = forms_lib.compute_optimal(fit.params, _compute_grid(fit_records, extra_compute))
  out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in opt.items()}
  if boot is not None:
    a_B = boot.params["beta"] / (boot.params["alpha"] + boot.params["beta"])
    out["a_interval"] = _interval(a_B).tolist()
  return out


def _at(fit, rec):
  """fit_lib.predict at every row of a table with params, tokens (and the
  flops and unique_tokens columns where it has them)."""
  return fit_lib.predict(fit, params=rec["params"], tokens=rec["tokens"],
                         compute=rec.get("flops"), unique_tokens=rec.get("unique_tokens"))


def _predictions(fit, boot, n, d, actual=None, compute=None, unique=None):
  """Rows of fit.json "predictions": point estimate and bootstrap 95% interval
  (parameter uncertainty only)."""
  rec = dict(params=n, tokens=d, flops=compute, unique_tokens=unique)
  mid = _at(fit, rec)
  lo, hi = (_interval(_at(boot, rec)) if boot is not None
            else (np.full_like(mid, np.nan),) * 2)
  rows = []
  for i in range(len(mid)):
    row = dict(params=float(n[i]), tokens=float(d[i]), loss_hat=float(mid[i]),
               lo=float(lo[i]), hi=float(hi[i]))
    if actual is not None:
      row["loss"] = float(actual[i])
    rows.append(row)
  return rows


def _figures(fit, boot, fit_records, target_records, point, optimal, sat, threshold):
  from llmlab.scaling import plots  # matplotlib: imported only when plotting

  law = forms_lib.get_form(fit.form)
  xkey = "compute" if "compute" in law.inputs else "tokens"

  def curve(n, x):
    if xkey == "compute":
      return fit_lib.predict(fit, compute=x)
    return fit_lib.predict(fit, params=np.full_like(x, n), tokens=x)

  band = target = None
  if "unique_tokens" not in law.inputs and (target_records is not None or
                                            point is not None):
    n_t = target_records["params"][0] if target_records is not None else point[0]
    d_hi = target_records["tokens"].max() if target_records is not None else point[1]
    d_lo = (target_records["tokens"].min() if target_records is not None else
            fit_records["tokens"].min())
    d = np.geomspace(d_lo, max(d_hi, d_lo * 1.01), 60)
    n = np.full_like(d, n_t)
    x = 6.0 * n * d if xkey == "compute" else d
    band = dict(x=x, mid=fit_lib.predict(fit, params=n, tokens=d))
    band["lo"], band["hi"] = (_interval(fit_lib.predict(boot, params=n, tokens=d))
                              if boot is not None else (band["mid"], band["mid"]))
    if target_records is not None:
      t = target_records
      target = dict(x=6.0 * t["params"] * t["tokens"] if xkey == "compute" else t["tokens"],
                    loss=t["loss"])
  figs = ({} if "unique_tokens" in law.inputs else  # curves need U as well
          {"loss_curves": plots.loss_curves(fit_records, curve, target, band, xkey)})
  fitted = _at(fit, fit_records)
  t_act = t_pred = None
  if target_records is not None:
    t_act = target_records["loss"]
    t_pred = _at(fit, target_records)
  figs["predicted_vs_actual"] = plots.predicted_vs_actual(fit_records["loss"], fitted,
                                                          t_act, t_pred)
  if optimal is not None:
    figs["compute_frontier"] = plots.compute_frontier(
        {k: np.asarray(v) if isinstance(v, list) else v for k, v in optimal.items()},
        fit_records)
  if sat:
    figs["saturation"] = plots.saturation_plot(sat, threshold)
  return figs


def check_identifiable(points: int, form: str, where: str) -> None:
  """Refuse a fit with no more points than parameters (its objective is 0
  whatever the law: nothing is measured); warn below two points per
  parameter, where the intervals, not the point estimate, are the story."""
  n_params = len(forms_lib.get_form(form).params)
  if points <= n_params:
    raise records_lib.RecordsError(
        f"{where}: {points} points to fit the {n_params} parameters of form "
        f"{form!r}; a fit needs more points than parameters (add runs or "
        "checkpoints, or relax --min_tokens/--min_fraction/--final_only)")
  if points < 2 * n_params:
    log.warning("fit: only %d points for the %d parameters of form %r: the "
                "law is barely determined; read its intervals", points,
                n_params, form)


def run_fit(records, form: str = "chinchilla", target=None, out_dir: str | None = None, *,
            min_tokens: float | None = None, min_fraction: float | None = None,
            fit_runs=None, final_only: bool = False, n_bootstrap: int = 100, seed: int = 0,
            delta: float = fit_lib.DELTA, saturation_threshold: float = 0.01,
            are_min_fraction: float = 0.7, are_final_only: bool = False,
            source: str | None = None, predict: str | None = None) -> dict:
  """Fits, bootstraps, predicts the target, writes out_dir/fit.json and plots.

  records: a records table (see records.py) or list of row dicts; target: a run
  name (excluded from the fit), an "N,D" string or an (N, D) pair, or None.
  predict: a CSV of points (the law's input columns: params, tokens, and
  unique_tokens for the data-constrained forms; any others are kept), each
  row written to out_dir/predictions.csv with loss_hat, loss_lo, loss_hi.
  Returns the fit.json dict.
  """
  records = records_lib.as_records(records)
  law = forms_lib.get_form(form)
  records_lib.require(records, [k for k in law.inputs if k == "unique_tokens"],
                      source or "records", f"--form={form}")
  points = (records_lib.read_points(predict, _point_columns(law), optional=("loss",))
            if predict is not None else None)
  tgt = parse_target(target, records)
  target_run = tgt[1] if tgt and tgt[0] == "run" else None
  fit_records = records_lib.select(
      records, min_tokens=min_tokens, min_fraction=min_fraction, final_only=final_only,
      runs=fit_runs, exclude=[target_run] if target_run else [])
  check_identifiable(len(fit_records["loss"]), form, source or "records")
  fit = fit_lib.fit_law(fit_records, form, delta)
  boot = (fit_lib.bootstrap(fit_records, form, n_bootstrap, seed, delta, fit)
          if n_bootstrap > 0 else None)

  target_records = point = None
  predictions, are = [], {}
  if target_run is not None:
    t = records_lib.take(records, records["run"] == target_run)
    target_records = records_lib.take(t, np.argsort(t["tokens"], kind="stable"))
    predictions = _predictions(fit, boot, target_records["params"],
                               target_records["tokens"], target_records["loss"],
                               target_records.get("flops"),
                               target_records.get("unique_tokens"))
    loss_hat = np.array([p["loss_hat"] for p in predictions])
    are["are"] = fit_lib.are(target_records["loss"], loss_hat, target_records["tokens"],
                             are_min_fraction, are_final_only)
    are["naive_are"] = fit_lib.naive_are(fit_records, target_records, are_min_fraction,
                                         are_final_only)
    are["skill"] = 1.0 - are["are"] / are["naive_are"] if are["naive_are"] > 0 else None
  elif tgt is not None:
    point = tgt[1]
    predictions = _predictions(fit, boot, np.array([point[0]]), np.array([point[1]]))

  extra_c = ([6.0 * target_records["params"][-1] * target_records["tokens"][-1]]
             if target_records is not None else
             [6.0 * point[0] * point[1]] if point is not None else [])
  optimal = _compute_optimal(fit, boot, fit_records, extra_c)
  sat = fit_lib.saturation(fit_records, saturation_threshold, delta)
  result = dict(
      _fit_fields(fit, boot, fit_records, source, delta, n_bootstrap, seed),
      selection=dict(min_tokens=min_tokens, min_fraction=min_fraction,
                     final_only=final_only),
      target=(dict(run=target_run) if target_run else
              dict(params=point[0], tokens=point[1]) if point else None),
      predictions=predictions, are=are.get("are"), naive_are=are.get("naive_are"),
      skill=are.get("skill"),
      are_rule=dict(min_fraction=are_min_fraction, final_only=are_final_only),
      compute_optimal=optimal,
      saturation=dict(threshold=saturation_threshold, runs=sat),
  )
  if points is not None:
    result["predict"] = predict
    result["n_predicted"] = len(points[1])
    scored = _predict_are(fit, points, are_min_fraction, are_final_only)
    if scored is not None:
      result["predict_are"] = scored
  if out_dir is not None:
    from llmlab.scaling import plots

    if points is not None:
      _write_point_predictions(out_dir, fit, boot, *points)
    figs = _figures(fit, boot, fit_records, target_records, point, optimal, sat,
                    saturation_threshold)
    result["plots"] = [os.path.basename(p) for p in plots.save(figs, out_dir)]
    storage.write_text(storage.join(out_dir, "fit.json"),
                       storage.dumps(result, indent=2))
  return storage.json_safe(result)


def _predict_are(fit, points, min_fraction, final_only) -> dict | None:
  """ARE of each run of a --predict file that has `run` and `loss` columns
  (held-out runs: each scored on its checkpoints at >= min_fraction of its
  final tokens, as a target is), their mean and the worst; None without them."""
  header, rows, cols = points
  if "loss" not in cols or "run" not in header:
    return None
  mid = _at(fit, cols)
  run = np.array([r["run"] for r in rows])
  known = np.isfinite(cols["loss"])  # rows with a blank loss are points to predict
  runs = {}
  for name in dict.fromkeys(run[known].tolist()):
    m = known & (run == name)
    runs[name] = fit_lib.are(cols["loss"][m], mid[m], cols["tokens"][m],
                             min_fraction, final_only)
  if not runs:
    return None
  worst = max(runs, key=runs.get)
  return dict(runs=runs, mean=float(np.mean(list(runs.values()))), worst=runs[worst],
              worst_run=worst, rule=dict(min_fraction=min_fraction, final_only=final_only))


def _point_columns(law) -> tuple[str, ...]:
  """The CSV columns a law predicts from (compute: from params and tokens)."""
  cols = [k for k in law.inputs if k != "compute"]
  if "compute" in law.inputs:
    cols += [c for c in ("params", "tokens") if c not in cols]
  return tuple(cols)


def _write_point_predictions(out_dir, fit, boot, header, rows, cols) -> None:
  """predictions.csv: every row of the --predict file, its columns as read,
  plus loss_hat and the bootstrap 95% interval (loss_lo, loss_hi)."""
  mid = _at(fit, cols)
  lo, hi = (_interval(_at(boot, cols)) if boot is not None
            else (np.full_like(mid, np.nan),) * 2)
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  extra = ("loss_hat", "loss_lo", "loss_hi")
  w.writerow([h for h in header if h not in extra] + list(extra))
  for row, m, a, b in zip(rows, mid, lo, hi):
    w.writerow([row[h] for h in header if h not in extra] +
               ["" if not math.isfinite(v) else repr(float(v)) for v in (m, a, b)])
  storage.write_text(storage.join(out_dir, "predictions.csv"), buf.getvalue())


def _fit_fields(fit, boot, fit_records, source, delta, n_bootstrap, seed) -> dict:
  """The fit.json fields every form writes: the fit, its intervals, the data."""
  return dict(
      form=fit.form, records=source, params=fit.params,
      log_params=dict(zip(forms_lib.get_form(fit.form).params, fit.theta.tolist())),
      objective=fit.objective, converged=fit.converged, delta=delta,
      n_points=fit.n_points, n_starts=fit.n_starts,
      fit_runs=records_lib.run_names(fit_records),
      intervals=boot.intervals() if boot is not None else {},
      bootstrap=(dict(n=n_bootstrap, unit=boot.unit, seed=seed,
                      converged_fraction=float(np.mean(boot.converged)))
                 if boot is not None else None))


# ----------------------------------------------------------------------------
# Laws of whole loss curves.

PREDICTION_COLUMNS = ("run", "step", "loss", "loss_hat", "loss_lo", "loss_hi", "obs_lo",
                      "obs_hi")


def run_curve_fit(curves, form: str = "multipower", out_dir: str | None = None,
                  predict=None, *, fit_runs=None, max_step: float | None = None,
                  n_bootstrap: int = 100, seed: int = 0, delta: float = fit_lib.DELTA,
                  source: str | None = None, predict_source: str | None = None,
                  noise=None, with_rows: bool = False) -> dict:
  """Fits a curve form to whole loss curves, bootstraps over runs, predicts every
  row of `predict`; writes out_dir/fit.json and out_dir/predictions.csv.

  curves, predict: curves tables (curves.py) or lists of row dicts; fit_runs and
  max_step (rows at steps < max_step) select what is fitted. Input errors are
  raised (RecordsError naming file, run and row) before fitting. A predicted run
  outside what the fit saw is listed under "extrapolation". `noise`: the
  relative run-to-run std of a loss (a scalar or one per predicted row, e.g.
  the spread over seeds), folded into the observed interval as run_lo/run_hi
  (`fold_noise`). with_rows: the result also holds every predicted row
  ("rows"). Returns the fit.json dict.
  """
  law = forms_lib.get_form(form)
  if not law.curve:
    raise ValueError(f"form {form!r} is not a curve form; use run_fit")
  fit_curves = fit_lib.validated(
      curves_lib.select_runs(curves_lib.as_curves(curves), fit_runs, max_step), law)
  target = None
  if predict is not None:
    target = curves_lib.as_curves(predict, "predict", need_loss=False)
    curves_lib.check_inputs(target, law.inputs)
  t0 = time.time()
  fit = fit_lib.fit_law(fit_curves, form, delta)
  seconds = time.time() - t0
  boot = (fit_lib.bootstrap(fit_curves, form, n_bootstrap, seed, delta, fit)
          if n_bootstrap > 0 else None)
  result = dict(_fit_fields(fit, boot, fit_curves, source, delta, n_bootstrap, seed),
                fit_seconds=seconds, bootstrap_seconds=time.time() - t0 - seconds,
                max_step=max_step, predict=predict_source,
                fitted_curves=curves_lib.profiles(fit_curves))
  rows = []
  if target is not None:
    resid = np.log(fit_curves["loss"] / fit_lib.predict_curves(fit, fit_curves))
    rows, result["predictions"] = _curve_predictions(fit, boot, target, resid, noise)
    result.update(_prediction_errors(rows))
    why = curves_lib.extrapolation(fit_curves, target)
    result["extrapolation"] = {r: w for r, w in why.items() if w}
    for p in result["predictions"]:
      p["extrapolation"] = why[p["run"]]
  if out_dir is not None:
    _write_curve_outputs(out_dir, result, rows if target is not None else None)
  if with_rows:
    result["rows"] = rows
  return storage.json_safe(result)


def fold_noise(mid, lo, hi, rel_std, level: float = 0.95):
  """An interval [lo, hi] around mid widened by a relative noise of std
  rel_std (independent of what made the interval): each side's log
  half-width and z * rel_std added in quadrature. A loss a new training run
  will show is the law's curve, plus that run's own offset from the curve
  (init and data order: the spread over seeds), which no refit of the same
  runs sees."""
  z = statistics.NormalDist().inv_cdf((1 + level) / 2)
  mid, lo, hi = (np.asarray(v, np.float64) for v in (mid, lo, hi))
  extra = (z * np.asarray(rel_std, np.float64)) ** 2
  return (mid * np.exp(-np.sqrt(np.log(mid / lo) ** 2 + extra)),
          mid * np.exp(np.sqrt(np.log(hi / mid) ** 2 + extra)))


def _curve_predictions(fit, boot, target, resid_R, noise=None):
  """(rows of predictions.csv, per-run summaries) for every row of `target`.

  loss_lo/hi: 95% interval of the law's curve (bootstrap over runs: parameter
  uncertainty only); obs_lo/hi: of an observed loss, adding the spread of the
  fit's log residuals resid_R (a logged loss is the curve plus batch noise);
  run_lo/hi (with `noise`): the observed interval widened by run-to-run noise.
  """
  mid = fit_lib.predict_curves(fit, target)
  boot_BxM = fit_lib.predict_curves(boot, target) if boot is not None else mid[None]
  lo, hi = (_interval(boot_BxM, skip_nan=True) if boot is not None
            else (np.full_like(mid, np.nan),) * 2)
  obs_lo, obs_hi = _observed_interval(boot_BxM, resid_R)
  loss = target.get("loss", np.full_like(mid, np.nan))
  rows = [dict(zip(PREDICTION_COLUMNS, (r, int(s), *v))) for r, s, *v in zip(
      target["run"], target["step"], loss, mid, lo, hi, obs_lo, obs_hi)]
  if noise is not None:
    run_lo, run_hi = fold_noise(mid, obs_lo, obs_hi,
                                np.broadcast_to(noise, mid.shape))
    for row, a, b in zip(rows, run_lo, run_hi):
      row.update(run_lo=float(a), run_hi=float(b))
  runs = []
  for run in records_lib.run_names(target):
    mine = [r for r in rows if r["run"] == run]
    runs.append(dict(run=run, rows=len(mine), last_step=mine[-1]["step"],
                     **_prediction_errors(mine)))
  return rows, runs


def _observed_interval(pred_BxM, resid_R, level=0.95, chunk=1024):
  """Percentiles of prediction x exp(residual) over bootstrap predictions and 50
  quantiles of the residuals (in chunks of points: B x 50 x chunk samples)."""
  r_Q = np.quantile(resid_R, np.linspace(0.01, 0.99, 50))
  parts = []
  for i in range(0, pred_BxM.shape[1], chunk):
    log_BxQxM = np.log(pred_BxM[:, None, i:i + chunk]) + r_Q[None, :, None]
    parts.append(_interval(np.exp(log_BxQxM.reshape(-1, log_BxQxM.shape[-1])), level,
                           skip_nan=True))
  return np.concatenate(parts, axis=1)


def _prediction_errors(rows) -> dict:
  """Relative errors |loss_hat - loss| / loss and interval coverage of rows with
  a loss: mean and worst over rows, and the mean of each run's worst (the
  figure Luo et al. report as WorstE)."""
  rows = [r for r in rows if np.isfinite(r["loss"])]
  if not rows:
    return dict(mean_rel_error=None, worst_rel_error=None, mean_worst_rel_error=None,
                coverage=None, obs_coverage=None, run_coverage=None)
  err = np.array([abs(r["loss_hat"] - r["loss"]) / r["loss"] for r in rows])
  runs = np.array([r["run"] for r in rows], dtype=object)
  per_run = [(err[runs == r].mean(), err[runs == r].max()) for r in dict.fromkeys(runs)]
  def inside(lo, hi):  # None without an interval (no bootstrap, no noise)
    if lo not in rows[0] or not np.isfinite(rows[0][lo]):
      return None
    return float(np.mean([r[lo] <= r["loss"] <= r[hi] for r in rows]))

  return dict(mean_rel_error=float(np.mean([m for m, _ in per_run])),
              worst_rel_error=float(err.max()),
              mean_worst_rel_error=float(np.mean([w for _, w in per_run])),
              coverage=inside("loss_lo", "loss_hi"), obs_coverage=inside("obs_lo", "obs_hi"),
              run_coverage=inside("run_lo", "run_hi"))


def _write_curve_outputs(out_dir: str, result: dict, rows) -> None:
  storage.write_text(storage.join(out_dir, "fit.json"),
                     storage.dumps(result, indent=2))
  if rows is None:
    return
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  cols = PREDICTION_COLUMNS + (("run_lo", "run_hi") if rows and "run_lo" in rows[0]
                               else ())
  w.writerow(cols)
  for r in rows:
    w.writerow(["" if isinstance(r[c], float) and not math.isfinite(r[c]) else r[c]
                for c in cols])
  storage.write_text(storage.join(out_dir, "predictions.csv"), buf.getvalue())


def curve_summary(result: dict) -> str:
  """Readable multi-line report of a run_curve_fit result."""
  lines = _fit_lines(result, f", fit {result['fit_seconds']:.1f} s")
  pct = lambda v: "n/a" if v is None else f"{100 * v:.3f}%"
  for p in result.get("predictions", []):
    lines.append(f"  predict {p['run']} ({p['rows']} rows to step {p['last_step']}): "
                 f"mean error {pct(p['mean_rel_error'])}, worst {pct(p['worst_rel_error'])}"
                 f", 95% intervals cover {pct(p['coverage'])} (curve) "
                 f"{pct(p['obs_coverage'])} (observed)")
  if result.get("mean_rel_error") is not None:
    lines.append(f"  all predicted runs: mean error {pct(result['mean_rel_error'])}, "
                 f"worst {pct(result['worst_rel_error'])} (mean of runs' worst "
                 f"{pct(result['mean_worst_rel_error'])}), coverage "
                 f"{pct(result['coverage'])} (curve) {pct(result['obs_coverage'])} "
                 "(observed)")
  return "\n".join(lines)


def _fmt_param(name, value, intervals):
  iv = intervals.get(name)
  return f"{name} {value:.4g}" + (f" [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else "")


def _fit_lines(result: dict, extra: str = "") -> list[str]:
  """The lines every summary opens with: data, objective, parameters, intervals."""
  lines = [f"form {result['form']}: {result['n_points']} points from "
           f"{len(result['fit_runs'])} runs, {result['n_starts']} starts, "
           f"objective {result['objective']:.6g}"
           f"{'' if result['converged'] else ' (NOT converged)'}{extra}"]
  iv = result["intervals"]
  lines.append("  " + ", ".join(_fmt_param(k, v, iv) for k, v in result["params"].items()))
  if result["bootstrap"]:
    b = result["bootstrap"]
    lines.append(f"  95% intervals from {b['n']} bootstrap refits over {b['unit']}")
  return lines


def summary(result: dict) -> str:
  """Readable multi-line report of a run_fit result."""
  lines = _fit_lines(result)
  opt = result["compute_optimal"]
  if opt:
    lines.append(f"  compute-optimal: N* ~ C^{opt['a']:.3f}, D* ~ C^{opt['b']:.3f}" +
                 (f" (a in [{opt['a_interval'][0]:.3f}, {opt['a_interval'][1]:.3f}])"
                  if "a_interval" in opt else ""))
    for c, n, d, r in list(zip(opt["compute"], opt["params"], opt["tokens"],
                               opt["tokens_per_param"]))[::2]:
      lines.append(f"    C {c:.2e}: N* {n:.3g}, D* {d:.3g}, {r:.1f} tokens/param")
  for p in result["predictions"][-5:]:
    actual = f", actual {p['loss']:.4f}" if "loss" in p else ""
    band = f" [{p['lo']:.4f}, {p['hi']:.4f}]" if p["lo"] is not None else ""
    lines.append(f"  predict N {p['params']:.3g}, D {p['tokens']:.3g}: "
                 f"{p['loss_hat']:.4f}{band}{actual}")
  if result["are"] is not None:
    skill = f", skill {result['skill']:.3f}" if result["skill"] is not None else ""
    lines.append(f"  target {result['target']['run']}: ARE {result['are']:.4f} "
                 f"(naive {result['naive_are']:.4f}{skill})")
  if result.get("predict_are"):
    pa = result["predict_are"]
    lines.append(f"  predicted runs ({result['predict']}): mean ARE {pa['mean']:.4f} over "
                 f"{len(pa['runs'])} runs, worst {pa['worst']:.4f} ({pa['worst_run']})")
  for s in result["saturation"]["runs"]:
    sat = s["saturation_tokens"]  # None: the run's L(D) never saturates
    lines.append(f"  saturation {s['run']} (N {s['params']:.3g}): "
                 f"{'never' if sat is None else f'{sat:.3g} tokens'}"
                 f"{' (reached)' if s['saturated'] else ''}")
  return "\n".join(lines)
