"""What the repetition study writes: study.json, records.csv, report.md and
plots (PNG and TensorBoard images through llmlab.scaling.plots), every path
local or gs:// (llmlab/storage.py)."""

from __future__ import annotations

from llmlab import experiment
from llmlab import report_notes
from llmlab import storage
from llmlab.scaling import sweep as sweep_lib

COLUMNS = ("family", "run", "params", "tokens", "loss", "unique_tokens",
           "epochs", "repetitions", "step", "role")


def write_outputs(result: dict, records: list[dict], workdir: str) -> None:
  """records.csv, plots, study.json, report.md."""
  sweep_lib.write_csv(storage.join(workdir, "records.csv"), records, COLUMNS)
  result["files"] = write_plots(result, records, workdir)
  experiment.write_json(storage.join(workdir, "study.json"), result)
  experiment.write_text(storage.join(workdir, "report.md"), markdown(result))


def write_plots(result: dict, records: list[dict], workdir: str) -> list[str]:
  from llmlab.scaling import plots  # noqa: PLC0415 (matplotlib only here)
  return plots.save({"repeat_ratio": ratio_figure(result, records)}, workdir,
                    prefix="repeat", fresh=True)


def ratio_figure(result: dict, records: list[dict]):
  """Final loss over the fresh run's against epochs, measured per size
  (markers) and by the best law (lines)."""
  from matplotlib import ticker  # noqa: PLC0415 (matplotlib only here)
  from llmlab.scaling import plots  # noqa: PLC0415
  form = result["holdout"]["form"]
  fig, ax = plots.figure(
      f"loss under repetition / fresh data (lines: {form})")
  curves = result["laws"][form]["curves"]
  colors = {}
  for name, m in result["measured_repetitions_at_1pct"].items():
    reps = sorted(int(k) for k in m["ratio"])
    line = ax.plot(reps, [1 + m["ratio"][str(k)] for k in reps], "o",
                   label=f"{name} ({m['params'] / 1e3:.0f}k) measured")
    colors[f"{m['params']:.0f}"] = line[0].get_color()
  for size, ratio in curves.items():
    if size != "repetitions":
      ax.plot(curves["repetitions"], ratio, "-", lw=1,
              color=colors.get(size, "gray"))
  ax.axhline(1 + result["threshold"], color="gray", ls="--", lw=1,
             label=f"+{100 * result['threshold']:g}%")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
  ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
  ax.set_xlabel("epochs over the unique tokens (D / U)")
  ax.set_ylabel("final loss / fresh-data loss")
  ax.legend(fontsize=7)
  return fig


def _budgets(result: dict) -> list[str]:
  law = next(iter(result["laws"].values()))
  return sorted(law["holdout"]["by_repetitions"], key=int)


def _num(v, fmt: str = ".3g") -> str:
  return "-" if v is None else format(v, fmt)


def markdown(result: dict) -> str:
  lines = ["# Repetition study (data-constrained scaling)", "",
           *report_notes.note(result)]
  thin = {f: report_notes.too_few_points(dict(law, form=f))
          for f, law in result["laws"].items()}
  laws = {f: law for f, law in result["laws"].items() if not thin[f]}
  t = result["target"]
  lines += [
      "What was measured: each family size trained on fresh data and on U = "
      "D / R unique tokens of the built-in corpus repeated R times (same D "
      f"= {result['tokens']:,.0f} tokens, constant learning rate after "
      "warmup), evaluated on the held-out split along each run; laws fitted "
      f"on the family ({result['n_records']['family']} evals) predict the "
      f"held-out {t['name']} ({t['params']:,.0f} params, "
      f"{t['ratio_to_largest_fitted']:.1f}x the largest fitted) under its "
      f"budgets ({result['n_records']['target']} evals). ARE over its evals "
      f">= {result['are_fraction']:g} of the run; naive = the largest "
      "member's loss under the same budget; skill = 1 - ARE / naive ARE.",
      "", "## Laws", "",
      "| form | objective | holdout ARE | naive ARE | skill | "
      f"epochs at +{100 * result['threshold']:g}% (target N, D) |",
      "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for form, law in laws.items():
    h = law["holdout"]
    lines.append(
        f"| {form} | {law['objective']:.3g} | {100 * h['are']:.2f}% | "
        f"{100 * h['naive_are']:.2f}% | {_num(h['skill'], '.3f')} | "
        f"{_num(result['repetitions_at_1pct'][form], '.1f')} |")
  lines += [""] + [why for why in thin.values() if why]
  lines += ["", "A law blind to repetition (chinchilla) predicts no "
            "crossing (-); its ARE shows what ignoring repetition costs.", "",
            "Holdout ARE by the target's repetition budget (naive in "
            "brackets):", "", "| form | " + " | ".join(
                f"R={r}" for r in _budgets(result)) + " |",
            "| --- |" + " ---: |" * len(_budgets(result))]
  for form, law in laws.items():
    by = law["holdout"]["by_repetitions"]
    lines.append(f"| {form} | " + " | ".join(
        f"{100 * by[r]['are']:.2f}% ({100 * by[r]['naive_are']:.2f}%)"
        for r in _budgets(result)) + " |")
  lines += ["", "Fitted parameters:", ""]
  for form, law in laws.items():
    p = ", ".join(f"{k}={v:.4g}" for k, v in law["params"].items())
    lines.append(f"- {form}: {p}")
  lines += ["", f"## Epochs at +{100 * result['threshold']:g}% loss, "
            "measured (final evals)", "",
            "| size | params | measured R | largest R run | ratio to fresh "
            "by R |", "| --- | ---: | ---: | ---: | --- |"]
  for name, m in result["measured_repetitions_at_1pct"].items():
    ratio = ", ".join(f"{k}: {100 * v:+.2f}%" for k, v in m["ratio"].items())
    at = m["repetitions_at"]
    lines.append(f"| {name} | {m['params']:,.0f} | "
                 f"{_num(at, '.1f') if at else '> ' + str(m['max_measured'])}"
                 f" | {m['max_measured']} | {ratio} |")
  lines += ["", "Measured R interpolates in log R between the runs' "
            "budgets (coarse where they are far apart, e.g. 1 and 4); one "
            "run's seed noise is ~1% at this scale, the size of the "
            "threshold, so small-R ratios are noise.",
            "", f"Best law on the held-out size: **{result['holdout']['form']}"
            f"** (ARE {100 * result['holdout']['are']:.2f}%, skill "
            f"{_num(result['holdout']['skill'], '.3f')})."
            if result["holdout"]["form"] in laws else
            "No law has enough points to pick the best on the held-out size.",
            "", "![ratio](repeat_ratio.png)", "",
            f"Wall time: {result['wall_time_total_s'] / 60:.1f} min over all "
            f"invocations ({result['wall_time_this_run_s'] / 60:.1f} this one)."]
  return "\n".join(lines) + "\n"
