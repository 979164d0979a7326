"""usage: llmlab fit --records=RECORDS.csv [--form=FORM] [--target=RUN|N,D]
                  [--predict=POINTS.csv] [--out=DIR]

Fits a scaling law to loss records (llmlab/scaling/fitting.py), with
bootstrap intervals; predicts a held-out run (--target=RUN), a point
(--target=N,D) or every row of a CSV (--predict); writes DIR/fit.json, the
plots and predictions.csv. Record forms (chinchilla, ...) read
`run,params,tokens,loss` rows, one per checkpoint; curve forms (multipower,
multipower_n) read whole loss curves (`run,step,lr,loss`). Prints one JSON
line on stdout (form, parameters, ARE, files written); the readable report
goes to stderr.
"""

from __future__ import annotations

import sys

from absl import flags

from llmlab import cli_common
from llmlab import errors

RECORD_FLAGS = ("target", "min_tokens", "min_fraction", "final_only",
                "are_final_only", "saturation_threshold")
CURVE_FLAGS = ("max_step",)


def define(fv: flags.FlagValues) -> None:
  d = lambda name, default, text, kind=flags.DEFINE_string: kind(  # noqa: E731
      name, default, text, flag_values=fv)
  d("records", None, "CSV with run, params, tokens, loss (curve forms: run, "
    "step, lr, loss); local or gs://.")
  d("form", "chinchilla", "The law: a record form (chinchilla, "
    "data_constrained, data_repeat, ...) or a curve form (multipower, "
    "multipower_n); llmlab/scaling/forms.py lists them all.")
  d("params_column", "params", "The CSV column read as N, e.g. "
    "params_nonembed.")
  d("min_tokens", None, "Drop checkpoints below this many tokens (default: "
    "keep all).", flags.DEFINE_float)
  d("min_fraction", None, "Drop checkpoints below this fraction of their "
    "run's final tokens (default: keep all).", flags.DEFINE_float)
  d("fit_runs", None, "Comma-separated runs to fit on (default: all).",
    flags.DEFINE_list)
  d("final_only", False, "Fit final checkpoints only.", flags.DEFINE_bool)
  d("target", None, "A run of the records (held out of the fit) or N,D "
    "(default: none).")
  d("predict", None, "A CSV to predict every row of, written to "
    "OUT/predictions.csv with loss_hat, loss_lo, loss_hi: for curve forms a "
    "curves CSV; for the others the law's columns (params, tokens; "
    "unique_tokens for data_constrained, data_repeat).")
  d("max_step", None, "Curve forms: fit only rows at steps below this "
    "(default: all).", flags.DEFINE_float)
  d("bootstrap", 100, "Refits for the 95% intervals (0: none).",
    flags.DEFINE_integer)
  d("out", "fit_out", "Output directory (local or gs://).")
  d("delta", 1e-3, "Huber delta on log-loss residuals.", flags.DEFINE_float)
  d("seed", 0, "Seed of the bootstrap resamples.", flags.DEFINE_integer)
  d("saturation_threshold", 0.01, "Nats gained by doubling D below which a "
    "run counts as saturated.", flags.DEFINE_float)
  d("are_final_only", False, "ARE on the target's final checkpoint only.",
    flags.DEFINE_bool)


def _check_flags(fv: flags.FlagValues, curve: bool) -> None:
  """Flags of the other kind of form are mistakes, not options to ignore."""
  wrong = [f"--{n}" for n in (RECORD_FLAGS if curve else CURVE_FLAGS)
           if fv[n].present]
  if wrong:
    kind = "a curve form" if curve else "not a curve form"
    raise errors.UsageError(f"{', '.join(wrong)} not used by --form="
                            f"{fv.form} ({kind})")


def _say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def body(fv: flags.FlagValues) -> dict:
  # noqa: PLC0415 below: numpy/jax only after parsing (--help stays fast).
  from llmlab import storage  # noqa: PLC0415
  from llmlab.scaling import curves as curves_lib  # noqa: PLC0415
  from llmlab.scaling import fitting  # noqa: PLC0415
  from llmlab.scaling import forms as forms_lib  # noqa: PLC0415
  from llmlab.scaling import records as records_lib  # noqa: PLC0415

  curve = forms_lib.get_form(fv.form).curve
  _check_flags(fv, curve)
  common = dict(fit_runs=fv.fit_runs or None, n_bootstrap=fv.bootstrap,
                seed=fv.seed, delta=fv.delta, source=fv.records)
  if curve:
    curves = curves_lib.read_curves(fv.records, fv.params_column)
    target = (curves_lib.read_curves(fv.predict, fv.params_column,
                                     need_loss=False) if fv.predict else None)
    result = fitting.run_curve_fit(curves, fv.form, fv.out, target,
                                   max_step=fv.max_step,
                                   predict_source=fv.predict, **common)
    _say(fitting.curve_summary(result))
    for run, why in result.get("extrapolation", {}).items():
      _say(f"llmlab fit: warning: predicting run {run!r} is extrapolation: "
           f"{'; '.join(why)}")
    wrote = ["fit.json"] + (["predictions.csv"] if target is not None else [])
  else:
    records = records_lib.read_records(fv.records, fv.params_column)
    result = fitting.run_fit(
        records, fv.form, fv.target, fv.out, min_tokens=fv.min_tokens,
        min_fraction=fv.min_fraction, final_only=fv.final_only,
        saturation_threshold=fv.saturation_threshold,
        are_final_only=fv.are_final_only, predict=fv.predict, **common)
    _say(fitting.summary(result))
    wrote = (["fit.json"] + (["predictions.csv"] if fv.predict else []) +
             result["plots"])
  wrote = [storage.join(fv.out, w) for w in wrote]
  _say("wrote " + ", ".join(wrote))
  return {"form": result["form"], "n_points": result["n_points"],
          "converged": result["converged"], "params": result["params"],
          **{k: result.get(k) for k in ("are", "skill", "mean_rel_error",
                                        "coverage", "predict_are") if k in result},
          "out": fv.out, "wrote": wrote}


def main(argv: list[str]) -> int:
  """`llmlab fit` (argv excludes the program and the command)."""
  return cli_common.run("fit", argv, define, body, doc=__doc__,
                        required=("records",))
