"""What the compress-then-continue experiment reports (`experiment.py`).

Per continued run: the L(D) = E + B/D^beta law fitted to its checkpoints
(`scaling.fit.saturation`: the project's fitter, form "data", all runs in
one vmapped call), the tokens it needs to reach a reference loss (measured,
log-interpolated between checkpoints, and from its law), mask-training
tokens, the speed-up over scratch; the curves plot, compress.json,
table.md and report.md.
"""

from __future__ import annotations

import math
import os

import numpy as np

from llmlab import experiment
from llmlab import report_notes
from llmlab import storage
from llmlab.scaling import fit as fit_lib

DESIGN_NOTE = ("continued runs and scratch: equal steps, batch and data "
               "order; constant learning rate after warmup, so every "
               "checkpoint is on the same footing for L(D); D = tokens of "
               "continued training (learned masks' tokens reported apart)")


def tokens_to_reach(tokens, losses, level: float) -> float | None:
  """First token count at which the curve reaches `level`, interpolated
  linearly in log tokens between checkpoints; None if it never does."""
  order = np.argsort(tokens)
  t, l = np.asarray(tokens, float)[order], np.asarray(losses, float)[order]
  for i, (ti, li) in enumerate(zip(t, l)):
    if li <= level:
      if i == 0:
        return float(ti)
      w = (l[i - 1] - level) / (l[i - 1] - li)
      return float(math.exp(math.log(t[i - 1]) + w * (math.log(ti) -
                                                      math.log(t[i - 1]))))
  return None


def law_tokens(law: dict, level: float) -> float | None:
  """D with E + B / D^beta = level (None if level <= E: never, by the law)."""
  if level <= law["E"]:
    return None
  return float((law["B"] / (level - law["E"])) ** (1.0 / law["beta"]))


def analyse(scfg, rows: list[dict], runs: list[dict], workdir: str) -> dict:
  names = [r["name"] for r in runs]
  table = [dict(run=r["run"], params=float(r["params_nonembed"]),
                tokens=float(r["tokens"]), loss=float(r["loss"]))
           for r in rows if r["run"] in names and float(r["tokens"]) > 0]
  laws = {s["run"]: s for s in fit_lib.saturation(
      table, min_points=int(scfg.fit_min_points))}
  by_run = {n: [r for r in table if r["run"] == n] for n in names}
  final = {n: max(v, key=lambda r: r["tokens"]) for n, v in by_run.items()}
  level = (float(scfg.reach_loss) if scfg.reach_loss
           else final["scratch"]["loss"])
  at_zero = {r["run"].split("@")[0]: float(r["loss"]) for r in rows
             if r["run"].endswith("@0")}
  source = [r for r in rows if r["run"] == "source"]
  prune_tokens = _prune_tokens(scfg, workdir)
  out_runs = {}
  for r in runs:
    n = r["name"]
    pts = by_run[n]
    law = laws.get(n)
    reach = tokens_to_reach([p["tokens"] for p in pts],
                            [p["loss"] for p in pts], level)
    extra = prune_tokens.get(r["method"], 0)
    out_runs[n] = {
        "method": r["method"] or "scratch", "objective": r["objective"],
        "params_nonembed": pts[0]["params"] if pts else None,
        "loss_after_pruning": at_zero.get(r["method"]),
        "final_tokens": final[n]["tokens"], "final_loss": final[n]["loss"],
        "law": ({k: law[k] for k in ("E", "B", "beta", "objective",
                                     "converged")} if law else None),
        "tokens_to_reach": reach,
        "law_tokens_to_reach": law_tokens(law, level) if law else None,
        "prune_tokens": extra,
        "total_tokens_to_reach": None if reach is None else reach + extra,
        "points": [(p["tokens"], p["loss"]) for p in sorted(
            pts, key=lambda p: p["tokens"])]}
  scratch = out_runs["scratch"]["tokens_to_reach"]
  for v in out_runs.values():
    t = v["total_tokens_to_reach"]
    v["speedup_vs_scratch"] = (scratch / t if scratch and t else None)
  _plot(out_runs, level, workdir)
  return {"reference_loss": level,
          "reference": ("config.reach_loss" if scfg.reach_loss else
                        "scratch run's final loss"),
          "source": {"final_loss": float(source[-1]["loss"]) if source else None,
                     "params_nonembed": float(source[-1]["params_nonembed"])
                     if source else None,
                     "tokens": float(source[-1]["tokens"]) if source else None},
          "target_model": dict(scfg.target_model),
          "source_model": dict(scfg.source_model),
          "runs": out_runs, "design": DESIGN_NOTE,
          "variant": report_notes.variant(scfg)}


def prune_info(workdir: str, method: str) -> dict:
  """What `llmlab prune` recorded in the pruned run's config.json."""
  path = storage.join(workdir, "pruned", method, "config.json")
  return storage.read_json(path).get("compress", {})


def _prune_tokens(scfg, workdir: str) -> dict:
  return {m: int(prune_info(workdir, m).get("learned", {}).get("tokens", 0))
          for m in scfg.methods}


def _plot(runs: dict, level: float, workdir: str) -> None:
  from llmlab.scaling import plots
  fig, ax = plots.figure("continued training after pruning: eval loss vs "
                          "tokens")
  for i, (name, r) in enumerate(runs.items()):
    color = f"C{i}"
    t = np.array([p[0] for p in r["points"]])
    l = np.array([p[1] for p in r["points"]])
    ax.scatter(t, l, s=12, color=color, label=name)
    if r["law"] and len(t):
      grid = np.geomspace(t.min(), t.max(), 100)
      law = r["law"]
      ax.plot(grid, law["E"] + law["B"] / grid ** law["beta"], color=color,
              lw=1, label=f"  E={law['E']:.3f} beta={law['beta']:.2f}")
  ax.axhline(level, color="gray", ls="--", lw=1, label="reference loss")
  ax.set_xscale("log")
  ax.set_xlabel("tokens of continued training")
  ax.set_ylabel("eval loss (nats/token)")
  ax.legend(fontsize=7)
  plots.save({"curves": fig}, workdir)


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def markdown_table(result: dict) -> str:
  lines = ["| run | objective | loss after pruning | final loss | "
           "L(D) = E + B/D^beta | tokens to reach ref. (measured / law) | "
           "+ pruning tokens | speed-up vs scratch |",
           "|---|---|---:|---:|---|---:|---:|---:|"]
  for name, r in result["runs"].items():
    law = r["law"]
    law_s = (f"{law['E']:.3f} + {law['B']:.3g}/D^{law['beta']:.3f}"
             if law else "-")
    lines.append(
        f"| {name} | {r['objective']} | {_fmt(r['loss_after_pruning'], '.4f')}"
        f" | {r['final_loss']:.4f} | {law_s} | "
        f"{_fmt(r['tokens_to_reach'], ',.0f')} / "
        f"{_fmt(r['law_tokens_to_reach'], ',.0f')} | "
        f"{r['prune_tokens']:,} | {_fmt(r['speedup_vs_scratch'], '.2f')} |")
  lines.append(f"\nreference loss {result['reference_loss']:.4f} "
               f"({result['reference']}); source final loss "
               f"{_fmt(result['source']['final_loss'], '.4f')}")
  return "\n".join(lines)


def write_report(result: dict, table: str, workdir: str) -> None:
  lines = ["# Compression and continual training", "",
           *report_notes.note(result),
           f"Source {result['source_model']} -> target "
           f"{result['target_model']}.", "", table, "",
           f"Wall time {result['wall_time_total_s'] / 60:.1f} min over all "
           f"invocations ({result['wall_time_s'] / 60:.1f} min this one).", "",
           "Per-step times (s): " + experiment.dumps(result["timings"]), "",
           "![curves](curves.png)"]
  experiment.write_text(os.path.join(workdir, "report.md"),
                        "\n".join(lines) + "\n")


def write(result: dict, workdir: str) -> None:
  """compress.json, table.md and report.md."""
  experiment.write_json(os.path.join(workdir, "compress.json"), result)
  table = markdown_table(result)
  experiment.write_text(os.path.join(workdir, "table.md"), table + "\n")
  write_report(result, table, workdir)
