"""The scaling study's report.md (study.py runs it, study_analysis.py makes
its numbers): the numbers a researcher reads first, then tables and plots.
Every label comes from the settings that produced its number."""

from __future__ import annotations

import os

from llmlab import experiment
from llmlab import report_notes
from llmlab import storage

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


def write_report(result: dict, workdir: str, planned=(),
                 eval_tokens: int | None = None) -> None:
  """DIR/report.md from study.json's `result` and the planned runs
  (`study.Run` records)."""
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


def _runs_table(planned, eval_tokens: int | None,
               curves: bool = False) -> list[str]:
  """Where each point of the report was trained (run directories are named
  by size and branch step; the report names a point size@final_step)."""
  if not planned:
    return []
  out = ["## Runs", "",
         "| report name | run directory | role | steps | branched at |",
         "| --- | --- | --- | ---: | ---: |"]
  for r in planned:
    where = os.path.relpath(r.workdir, os.path.dirname(os.path.dirname(r.workdir)))
    out.append(f"| {r.run}@{r.final} | {where} | {r.role} | {r.final} | "
               f"{r.start or '-'} |")
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
