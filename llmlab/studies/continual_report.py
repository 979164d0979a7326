"""DIR/study.json, DIR/records.csv and DIR/report.md of the continual study.

Every sentence of report.md that answers a question is computed from the
result (which method is first, whether the ranking holds, where forgetting
meets the budget); nothing is written in advance.
"""

from __future__ import annotations

import csv
import io
import os

from llmlab import experiment
from llmlab.studies import continual_analysis


def _f(x, spec=".4f") -> str:
  if x is None:
    return "-"
  if isinstance(x, float) and x != x:
    return "nan"
  return format(x, spec)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def markdown(result: dict) -> str:
  d = result["domains"]
  out = ["# Continual learning after compression", "",
         f"Domain A (old): `{d['A']}`; domain B (new): `{d['B']}`. "
         "Losses in nats/token on each domain's held-out split.", "",
         "## Shift (each source: L_B - L_A)", "",
         "| source | N_s (non-embedding) | L_A | L_B | shift |",
         "| --- | ---: | ---: | ---: | ---: |"]
  for s, v in result["sources"].items():
    out.append(f"| {s} | {v['params']:,.0f} | {_f(v['loss_A'])} | "
               f"{_f(v['loss_B'])} | {_f(v['shift'])} |")
  law = result["law"]
  out += ["", "## Laws (held out: fit on the smaller sources, predict the "
          f"largest; ARE over evals at >= "
          f"{result['holdout_min_fraction']:.0%} of each run)", "",
          "| form | domain | objective | holdout ARE | naive ARE | skill |",
          "| --- | --- | ---: | ---: | ---: | ---: |"]
  for name, per in result["forms"].items():
    for dom in ("B", "A"):
      h = per[dom]["holdout"]
      out.append(f"| {name} | L_{dom} | {_f(per[dom]['objective'], '.3g')} | "
                 f"{_pct(h['are'])} | {_pct(h['naive_are'])} | "
                 f"{_f(h['skill'], '.3f')} |")
  each = sorted(next(iter(result["forms"].values()))["B"].get(
      "holdout_each", {}), key=lambda s: result["sources"][s]["params"])
  cap = lambda x: "> 1000%" if x is not None and x > 10 else _pct(x)
  if any(len(per["B"].get("holdout_each", {})) > 1
         for per in result["forms"].values()):
    out += ["", "Each source held out in turn (fit on the others; naive = "
            "the nearest fitted source's run), held-out ARE (naive ARE):", "",
            "| form | domain | " + " | ".join(
                f"{s} held out" for s in each) + " |",
            "| --- | --- |" + " ---: |" * len(each)]
    for name, per in result["forms"].items():
      for dom in ("B", "A"):
        by = per[dom].get("holdout_each", {})
        out.append(f"| {name} | L_{dom} | " + " | ".join(
            f"{cap(by[s]['are'])} ({_pct(by[s]['naive_are'])})"
            if s in by else "-" for s in each) + " |")
  sel = [s for s in each if any(s in per[d].get("selection_are", {})
                                for per in result["forms"].values() for d in "BA")]
  if sel:
    out += ["", "The choice, made without the largest source: each source "
            "predicted from the others, the largest left out of every fit "
            "(ARE; score = mean over sources, L_B + L_A):", "",
            "| form | " + " | ".join(f"{s} L_B | {s} L_A" for s in sel) +
            " | score |", "| --- |" + " ---: |" * (2 * len(sel) + 1)]
    for name, per in result["forms"].items():
      cells = [cap(per[d].get("selection_are", {}).get(s)) for s in sel
               for d in ("B", "A")]
      out.append(f"| {name} | " + " | ".join(cells) + " | "
                 f"{cap(law.get('selection_score', {}).get(name))} |")
  out += ["", f"Chosen: **{law['form']}** ({law['chosen_by']}). Parameters "
          "fitted on every law run:", ""]
  for dom in ("B", "A"):
    ps = ", ".join(f"{k}={_f(float(v), '.4g')}"
                   for k, v in law["params"][dom].items())
    out.append(f"- L_{dom}: {ps}")
  out += ["", "## Start methods (tokens to reach scratch's final L_B)", ""]
  for cell, order in result["ranking"].items():
    out += [f"At {cell} (replay r = {result['replay_default']:g}):", "",
            "| method | final L_B | final L_A | forgetting | tokens to "
            "match scratch | speed-up |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in order:
      v = result["methods"].get(name, {}).get("by_cell", {}).get(cell)
      if v is None:
        continue
      out.append(f"| {name} | {_f(v['final_loss_B'])} | "
                 f"{_f(v['final_loss_A'])} | {_f(v['forgetting'])} | "
                 f"{'<= ' if v.get('reached_at_first_eval') else ''}"
                 f"{_f(v['tokens_to_match_scratch'], ',.0f')} | "
                 f"{'>= ' if v.get('reached_at_first_eval') else ''}"
                 f"{_f(v['speedup_vs_scratch'], '.2f')} |")
    out.append("")
  holds = result["ranking_holds_across_sources"]
  if result["ranking"]:
    firsts = {c: o[0] for c, o in result["ranking"].items() if o}
    out.append("Best start by final L_B: " + ", ".join(
        f"{m} at {c}" for c, m in firsts.items()) + ". The full ranking "
        + ("is the same at every source." if holds else
           "differs between sources." if holds is False else
           "was measured at one source only."))
    m = result["methods"]
    base = [k for k in m if k.endswith("_distill")]
    for k in base:
      plain = k[:-len("_distill")]
      if plain in m:
        out.append(f"Distillation from the source: {plain} final L_B "
                   f"{_f(m[plain]['final_loss_B'])} -> "
                   f"{_f(m[k]['final_loss_B'])} with distillation.")
  sig = [v["loss_B_std"] for v in result["seeds"].values()
         if v.get("loss_B_std") is not None]
  if sig and result["ranking"]:
    out.append(f"Seed spread of the final L_B: +-{min(sig):.4f} to "
               f"+-{max(sig):.4f} (below): methods closer than about twice "
               "that are not ranked by this study.")
  if result["seeds"]:
    out += ["", "Seed re-runs (final L_B mean +- std over seeds):", ""]
    for m, v in result["seeds"].items():
      out.append(f"- {m}: {_f(v['loss_B_mean'])} +- "
                 f"{_f(v['loss_B_std'])} ({v['seeds']} seeds); L_A "
                 f"{_f(v['loss_A_mean'])} +- {_f(v['loss_A_std'])}")
  out += ["", "## Tokens saved vs scratch (law grid)", "",
          "| run | N_s/N_t | r | final L_B | scratch final L_B | tokens to "
          "match | saved | scratch catches up at |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for v in result["savings"]:
    out.append(f"| {v['run']} | {v['compression']:.2f} | {v['replay']:g} | "
               f"{_f(v['final_loss_B'])} | {_f(v['scratch_final_loss_B'])} | "
               f"{_f(v['tokens_to_match_scratch'], ',.0f')} | "
               f"{_pct(v['tokens_saved_fraction'])} | "
               f"{_f(v['crossover_tokens'], ',.0f')} |")
  rep = result["replay"]
  out += ["", "## Replay: learning vs forgetting", "",
          f"Budget: L_A - the source's L_A <= {rep['budget']:g} nats after "
          f"the continued run ({rep['source']} -> {rep['target']}). "]
  if rep.get("predicted_ratio") is not None:
    out[-1] += (f"The law predicts r = {rep['predicted_ratio']:g} "
                f"(forgetting {_f(rep.get('predicted_forgetting'))} plus a "
                f"margin of {_f(rep.get('margin'))}, the law's largest "
                f"under-prediction on this cell's trained runs"
                + (" (their seed means)" if rep.get("margin_of") == "seed means"
                   else "") + "; without it "
                f"r = {_f(rep.get('law_ratio'), 'g')}; L_B "
                f"{_f(rep.get('predicted_loss_B'))}); measured at that r: "
                f"forgetting {_f(rep.get('measured_forgetting'))}, L_B "
                f"{_f(rep.get('measured_loss_B'))}, "
                + ("within" if rep.get("within_budget") else "outside")
                + " the budget.")
  else:
    out[-1] += f"No ratio predicted: {rep.get('why_none', '')}."
  if rep.get("by_form"):
    out += ["", "Every form's prediction (the chosen one is measured): " +
            "; ".join(f"{n}: r = {_f(v.get('predicted_ratio'), 'g')} "
                      f"(forgetting {_f(v.get('predicted_forgetting'))})"
                      for n, v in rep["by_form"].items())]
  if result.get("tradeoff"):
    out += ["", "Measured trade-off (law cells at several ratios; "
            "forgetting = L_A - the source's L_A, learning = the source's "
            "L_B - L_B):", "",
            "| source | target | r | final L_B | learning | final L_A | "
            "forgetting |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for v in result["tradeoff"]:
      out.append(f"| {v['source']} | {v['target']} | {v['replay']:g} | "
                 f"{_f(v['final_loss_B'])} | {_f(v['learning'])} | "
                 f"{_f(v['final_loss_A'])} | {_f(v['forgetting'])} |")
  out += ["", "## Time", "",
          f"Wall time {result['wall_time_total_s'] / 60:.1f} min over all "
          f"invocations ({result['wall_time_this_run_s'] / 60:.1f} min this "
          "one)."]
  return "\n".join(out) + "\n"


def write_outputs(result: dict, records: list[dict], workdir: str) -> None:
  experiment.write_json(os.path.join(workdir, "study.json"), result)
  buf = io.StringIO(newline="")
  w = csv.DictWriter(buf, fieldnames=continual_analysis.COLUMNS,
                     extrasaction="ignore")
  w.writeheader()
  w.writerows(records)
  experiment.write_text(os.path.join(workdir, "records.csv"), buf.getvalue())
  experiment.write_text(os.path.join(workdir, "report.md"), markdown(result))
