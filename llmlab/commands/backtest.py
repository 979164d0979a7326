"""usage: llmlab backtest --records=RUNS.csv[,MORE.csv] --out=DIR
       llmlab backtest --study=STUDY_DIR --out=DIR

Backtests scaling-law estimation on each family of a records table, as the
Hitchhiker's guide did (Choshen, Zhang & Andreas 2024, arXiv:2410.11840):
the family's largest size is the target; laws fitted on the k smallest or
the k closest sizes (k = 2 .. n-1), or on one size with borrowed exponents,
on each fraction p of their training (0.1 .. 1.0), with and without the
early-token cut, are scored by ARE on the target's late checkpoints.

Records: the `llmlab fit --records` schema plus a family column,
`family,run,params,tokens,loss[,unique_tokens,epochs]` (one row per
checkpoint; tokens seen at the checkpoint). `--study=DIR`: a finished
`llmlab study` workdir is one family (its records.csv) with its own target.

Writes DIR/grid.csv (family, target, design, checkpoints, n_models,
fraction, min_tokens, compute_fraction, are, n_points, runs),
DIR/summary.json (per family: target, best cell, cheapest cell per ARE
threshold 4/10/20%, n_fits, fit_seconds), heatmap_<family>.png and
report.md. Prints one JSON line (per family: best ARE and fits).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from llmlab import cli_common


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("records", None, "Records CSV(s), comma-separated "
                      "(family,run,params,tokens,loss[,unique_tokens,epochs]).",
                      flag_values=fv)
  flags.DEFINE_string("study", None, "A finished `llmlab study` workdir (one "
                      "family, its target).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (local or gs://).",
                      flag_values=fv)
  flags.DEFINE_string("form", "chinchilla", "Law to backtest (a records form: "
                      "chinchilla, data_constrained, data_repeat).", flag_values=fv)
  flags.DEFINE_string("target", None, "Target run (default: every run of each "
                      "family's largest size).", flag_values=fv)
  flags.DEFINE_integer("starts", 64, "Starts per fit, drawn from the form's "
                       "grid with a fixed seed.", flag_values=fv)
  flags.DEFINE_float("delta", 1e-3, "Huber delta on log-loss residuals.",
                     flag_values=fv)
  flags.DEFINE_integer("keep", 4, "Starts per fit polished in float64 after the "
                       "float32 screen (more find more basins of fits to few points).",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("polish_evals", 2000, "Evaluations per polished start at most "
                       "(fewer, e.g. 400, stop fits to few points that are still "
                       "crawling, ~10% sooner).", lower_bound=1,
                       flag_values=fv)


def _records(fv):
  import numpy as np  # noqa: PLC0415

  from llmlab.scaling import backtest  # noqa: PLC0415 (jax; --help stays fast)
  from llmlab.scaling import records as records_lib  # noqa: PLC0415

  if bool(fv.records) == bool(fv.study):
    raise cli_common.UsageError("give one of --records or --study")
  if fv.study:
    return backtest.study_records(fv.study), None
  tables = [records_lib.read_records(p) for p in fv.records.split(",") if p]
  keys = set.intersection(*(set(t) for t in tables))
  return {k: np.concatenate([t[k] for t in tables]) for k in keys}, fv.target


def body(fv: flags.FlagValues) -> dict:
  records, target = _records(fv)
  from llmlab.scaling import backtest  # noqa: PLC0415
  from llmlab.scaling import backtest_report  # noqa: PLC0415

  result = backtest.run(records, fv.form, target, n_starts=fv.starts, delta=fv.delta,
                        log_skip=lambda m: print(f"llmlab {m}", file=sys.stderr),
                        source=fv.records or fv.study, keep=fv.keep,
                        polish_evals=fv.polish_evals)
  files = backtest_report.write(fv.out, result)
  print(f"llmlab backtest: wrote {', '.join(os.path.join(fv.out, f) for f in files)}",
        file=sys.stderr)
  return dict(out=fv.out, form=fv.form, n_fits=result["n_fits"],
              seconds=round(result["seconds"], 2),
              families={k: dict(target=v["target"], n_fits=v["n_fits"],
                                best_are=(v["best"] or {}).get("are"))
                        for k, v in result["families"].items()},
              skipped=result["skipped"])


def main(argv: list[str]) -> int:
  """`llmlab backtest` (argv excludes the program and the command)."""
  return cli_common.run("backtest", argv, define, body, doc=__doc__,
                        required=("out",))
