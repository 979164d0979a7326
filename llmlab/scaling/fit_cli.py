"""`llmlab fit`: fit a scaling law to loss records, predict a target, write fit.json.

run_fit is the Python entry point (used by `llmlab study`); main(argv) is the CLI
(argv excludes the subcommand name).
"""

import argparse
import json
import math
import os
import sys

import numpy as np

from llmlab.scaling import fit as fit_lib
from llmlab.scaling import forms as forms_lib
from llmlab.scaling import records as records_lib


def _parse_target(target, records):
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
    raise ValueError(f"--target={target!r} is neither a run of the records "
                     f"({runs[:10]}{'...' if len(runs) > 10 else ''}) nor 'N,D'") from None
  if not (n > 0 and d > 0 and math.isfinite(n) and math.isfinite(d)):
    raise ValueError(f"--target={target!r}: N and D must be finite and > 0")
  return ("point", (n, d))


def _compute_grid(fit_records, extra=()) -> np.ndarray:
  """Powers of ten from the smallest fitted compute to 100x the largest."""
  c = 6.0 * fit_records["params"] * fit_records["tokens"]
  lo, hi = math.floor(math.log10(c.min())), math.ceil(math.log10(c.max())) + 2
  return np.unique(np.concatenate([10.0 ** np.arange(lo, hi + 1), np.asarray(extra, float)]))


def _interval(samples_BxM, level=0.95):
  q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
  return np.percentile(samples_BxM, q, axis=0)


def _compute_optimal(fit, boot, fit_records, extra_compute):
  if fit.form != "chinchilla":
    return None
  opt = forms_lib.compute_optimal(fit.params, _compute_grid(fit_records, extra_compute))
  out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in opt.items()}
  if boot is not None:
    a_B = boot.params["beta"] / (boot.params["alpha"] + boot.params["beta"])
    out["a_interval"] = _interval(a_B).tolist()
  return out


def _predictions(fit, boot, n, d, actual=None, compute=None):
  """Rows of fit.json "predictions": point estimate and bootstrap 95% interval
  (parameter uncertainty only)."""
  mid = fit_lib.predict(fit, params=n, tokens=d, compute=compute)
  lo, hi = (_interval(fit_lib.predict(boot, params=n, tokens=d, compute=compute))
            if boot is not None else (np.full_like(mid, np.nan),) * 2)
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
  if target_records is not None or point is not None:
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
  figs = {"loss_curves": plots.loss_curves(fit_records, curve, target, band, xkey)}
  fitted = fit_lib.predict(fit, params=fit_records["params"], tokens=fit_records["tokens"])
  t_act = t_pred = None
  if target_records is not None:
    t_act = target_records["loss"]
    t_pred = fit_lib.predict(fit, params=target_records["params"],
                             tokens=target_records["tokens"])
  figs["predicted_vs_actual"] = plots.predicted_vs_actual(fit_records["loss"], fitted,
                                                          t_act, t_pred)
  if optimal is not None:
    figs["compute_frontier"] = plots.compute_frontier(
        {k: np.asarray(v) if isinstance(v, list) else v for k, v in optimal.items()},
        fit_records)
  if sat:
    figs["saturation"] = plots.saturation_plot(sat, threshold)
  return figs


def _clean(obj):
  """JSON-safe: numpy -> python, non-finite floats -> None."""
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, np.ndarray)):
    return [_clean(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def run_fit(records, form: str = "chinchilla", target=None, out_dir: str | None = None, *,
            min_tokens: float | None = None, min_fraction: float | None = None,
            fit_runs=None, final_only: bool = False, n_bootstrap: int = 100, seed: int = 0,
            delta: float = fit_lib.DELTA, saturation_threshold: float = 0.01,
            are_min_fraction: float = 0.7, are_final_only: bool = False,
            source: str | None = None) -> dict:
  """Fits, bootstraps, predicts the target, writes out_dir/fit.json and plots.

  records: a records table (see records.py) or list of row dicts; target: a run
  name (excluded from the fit), an "N,D" string or an (N, D) pair, or None.
  Returns the fit.json dict.
  """
  records = records_lib.as_records(records)
  forms_lib.get_form(form)
  tgt = _parse_target(target, records)
  target_run = tgt[1] if tgt and tgt[0] == "run" else None
  fit_records = records_lib.select(
      records, min_tokens=min_tokens, min_fraction=min_fraction, final_only=final_only,
      runs=fit_runs, exclude=[target_run] if target_run else [])
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
                               target_records.get("flops"))
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
      form=form, records=source, params=fit.params,
      log_params=dict(zip(forms_lib.get_form(form).params, fit.theta.tolist())),
      objective=fit.objective, converged=fit.converged, delta=delta,
      n_points=fit.n_points, n_starts=fit.n_starts,
      fit_runs=records_lib.run_names(fit_records),
      selection=dict(min_tokens=min_tokens, min_fraction=min_fraction,
                     final_only=final_only),
      intervals=boot.intervals() if boot is not None else {},
      bootstrap=(dict(n=n_bootstrap, unit=boot.unit, seed=seed,
                      converged_fraction=float(np.mean(boot.converged)))
                 if boot is not None else None),
      target=(dict(run=target_run) if target_run else
              dict(params=point[0], tokens=point[1]) if point else None),
      predictions=predictions, are=are.get("are"), naive_are=are.get("naive_are"),
      skill=are.get("skill"),
      are_rule=dict(min_fraction=are_min_fraction, final_only=are_final_only),
      compute_optimal=optimal,
      saturation=dict(threshold=saturation_threshold, runs=sat),
  )
  if out_dir is not None:
    from llmlab.scaling import plots

    figs = _figures(fit, boot, fit_records, target_records, point, optimal, sat,
                    saturation_threshold)
    result["plots"] = [os.path.basename(p) for p in plots.save(figs, out_dir)]
    with open(os.path.join(out_dir, "fit.json"), "w") as f:
      json.dump(_clean(result), f, indent=2)
  return _clean(result)


def _fmt_param(name, value, intervals):
  iv = intervals.get(name)
  return f"{name} {value:.4g}" + (f" [{iv[0]:.4g}, {iv[1]:.4g}]" if iv else "")


def summary(result: dict) -> str:
  """Readable multi-line report of a run_fit result."""
  lines = [f"form {result['form']}: {result['n_points']} points from "
           f"{len(result['fit_runs'])} runs, {result['n_starts']} starts, "
           f"objective {result['objective']:.6g}"
           f"{'' if result['converged'] else ' (NOT converged)'}"]
  iv = result["intervals"]
  lines.append("  " + ", ".join(_fmt_param(k, v, iv) for k, v in result["params"].items()))
  if result["bootstrap"]:
    b = result["bootstrap"]
    lines.append(f"  95% intervals from {b['n']} bootstrap refits over {b['unit']}")
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
  for s in result["saturation"]["runs"]:
    lines.append(f"  saturation {s['run']} (N {s['params']:.3g}): "
                 f"{s['saturation_tokens']:.3g} tokens"
                 f"{' (reached)' if s['saturated'] else ''}")
  return "\n".join(lines)


def _parser():
  p = argparse.ArgumentParser(prog="llmlab fit", description=__doc__.splitlines()[0])
  p.add_argument("--records", required=True, help="CSV with params, tokens, loss")
  p.add_argument("--form", default="chinchilla", choices=sorted(forms_lib.FORMS))
  p.add_argument("--params_column", default="params")
  p.add_argument("--min_tokens", type=float)
  p.add_argument("--min_fraction", type=float,
                 help="drop checkpoints below this fraction of their run's final tokens")
  p.add_argument("--fit_runs", help="comma-separated runs to fit on (default all)")
  p.add_argument("--final_only", action="store_true", help="fit final checkpoints only")
  p.add_argument("--target", help="a run name (held out) or N,D")
  p.add_argument("--bootstrap", type=int, default=100, help="refits for intervals (0: none)")
  p.add_argument("--out", default="fit_out", help="output directory")
  p.add_argument("--delta", type=float, default=fit_lib.DELTA, help="Huber delta")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--saturation_threshold", type=float, default=0.01)
  p.add_argument("--are_final_only", action="store_true",
                 help="ARE on the target's final checkpoint only")
  return p


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  try:
    records = records_lib.read_records(args.records, args.params_column)
    result = run_fit(
        records, args.form, args.target, args.out, min_tokens=args.min_tokens,
        min_fraction=args.min_fraction,
        fit_runs=args.fit_runs.split(",") if args.fit_runs else None,
        final_only=args.final_only, n_bootstrap=args.bootstrap, seed=args.seed,
        delta=args.delta, saturation_threshold=args.saturation_threshold,
        are_final_only=args.are_final_only, source=args.records)
  except ValueError as e:  # includes RecordsError
    print(f"llmlab fit: error: {e}", file=sys.stderr)
    return 2
  print(summary(result))
  print(f"wrote {os.path.join(args.out, 'fit.json')} and {len(result['plots'])} plots "
        f"(+ TensorBoard images in {os.path.join(args.out, 'tensorboard')})")
  return 0
