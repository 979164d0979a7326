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

Re-running resumes: finished runs and evaluated checkpoints are skipped.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import experiment
from llmlab import storage
from llmlab.scaling import fit_cli
from llmlab.scaling import sweep as sweep_lib

log = logging.getLogger("llmlab")


def member_config(scfg, model: dict, steps: int, decay_steps: int,
                  **checkpoint):
  """Train config of one run: the study's base with this model, length and
  `checkpoint` settings."""
  return experiment.derive(scfg.base, {
      "model": model, "train": {"steps": steps},
      "optim": {"schedule": "wsd", "decay_fraction": decay_steps / steps},
      "checkpoint": checkpoint})


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


def plan(scfg, workdir: str) -> list[dict]:
  """Every run of the study: main runs and branches, in training order."""
  out = []
  steps = int(scfg.steps)
  decay = max(1, int(round(scfg.decay_fraction * steps)))
  members = [(n, dict(m), "family") for n, m in scfg.family]
  members.append((scfg.target[0], dict(scfg.target[1]), "target"))
  for name, model, role in members:
    main_dir = os.path.join(workdir, "runs", name)
    points = branch_points(steps, scfg.decay_fraction, scfg.points,
                           scfg.min_fraction)
    if role == "target":  # ARE only uses its points >= are_fraction of final
      points = [s for s in points
                if s / (1 - scfg.decay_fraction) >= scfg.are_fraction * steps]
    # The main run saves and keeps its stable checkpoints at branch points.
    main = member_config(scfg, model, steps, decay, sweep_points=0,
                         every_steps=0, keep_at_steps=tuple(points))
    out.append(dict(name=name, role=role, cfg=main, workdir=main_dir,
                    main=None, start=None, final=steps))
    for s in points:
      total = int(round(s / (1 - scfg.decay_fraction)))
      out.append(dict(name=name, role=role, main=main_dir, start=s,
                      cfg=member_config(scfg, model, total, total - s,
                                        every_steps=0),
                      workdir=os.path.join(workdir, "runs",
                                           f"{name}_branch{s}"),
                      final=total))
  return out


def run_study(scfg, workdir: str, train_fn=None) -> dict:
  ex = experiment.Experiment(workdir, train_fn)
  ex.start(scfg, "study_config.json")
  planned = plan(scfg, workdir)
  ex.expect([(r["cfg"], r["workdir"]) for r in planned])
  for r in planned:
    seed = None if r["main"] is None else functools.partial(
        _seed_branch, r["main"], r["start"], r["workdir"])
    ex.train(r["cfg"], r["workdir"], before=seed)
  names = [f"{r['name']}@{r['final']}" for r in planned]
  rows = sweep_lib.sweep(
      [r["workdir"] for r in planned], ex.path("endpoints.csv"),
      eval_tokens=int(scfg.eval_tokens), names=names,
      only_steps={r["workdir"]: [r["final"]] for r in planned},
      log=lambda s: print(s, file=sys.stderr, flush=True))
  by_name = {f"{r['name']}@{r['final']}": r for r in planned}
  records = []
  for row in rows:
    r = by_name.get(row["run"])
    if r is None:
      continue
    records.append(dict(row, run=r["name"], role=r["role"]))
  sweep_lib.write_csv(ex.path("records.csv"), records)
  result = analyse(scfg, records, workdir)
  truth = known_entropy(planned[0]["workdir"], result)
  if truth:
    result["known_entropy"] = truth
  wall = ex.wall_time()
  result["wall_time_s"] = wall["wall_time_this_run_s"]  # as it always was
  result.update(wall)
  result["design"] = DESIGN_NOTE.format(f=scfg.decay_fraction)
  experiment.write_json(ex.path("study.json"), result)
  write_report(result, workdir, planned, int(scfg.eval_tokens))
  return result


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
  out = fit_cli.run_fit(table, form=scfg.fit.form, target=target,
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
  p = result.get("params", {})
  rule = result.get("are_rule", {})
  lines = [
      "# Scaling study", "",
      f"Design: {result['design']}", "",
      "| quantity | value |", "| --- | --- |",
      f"| fitted law | L(N,D) = {p.get('E', float('nan')):.4f} + "
      f"{p.get('A', float('nan')):.4g}/N^{p.get('alpha', float('nan')):.4f} + "
      f"{p.get('B', float('nan')):.4g}/D^{p.get('beta', float('nan')):.4f} |",
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
  lines += _prediction_table(result.get("predictions") or [],
                             result.get("prediction"))
  lines += _optimal_table(result.get("compute_optimal"))
  lines += _runs_table(planned, eval_tokens)
  for png in [f for f in storage.listdir(workdir) if f.endswith(".png")]:
    lines.append(f"![{png}]({png})")
  experiment.write_text(os.path.join(workdir, "report.md"),
                        "\n".join(lines) + "\n")


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


def _runs_table(planned: list[dict], eval_tokens: int | None) -> list[str]:
  """Where each point of the report was trained (run directories are named
  by size and branch step; the report names a point size@final_step)."""
  if not planned:
    return []
  out = ["## Runs", "",
         "| report name | run directory | role | steps | branched at |",
         "| --- | --- | --- | ---: | ---: |"]
  for r in planned:
    out.append(f"| {r['name']}@{r['final']} | "
               f"{os.path.relpath(r['workdir'], os.path.dirname(os.path.dirname(r['workdir'])))} | "
               f"{r['role']} | {r['final']} | {r['start'] or '-'} |")
  if eval_tokens:
    out += ["", f"Every fitted point is the sweep's eval of the run's final "
            f"checkpoint on {eval_tokens:,} held-out tokens (study "
            "`eval_tokens`); the eval logged during training uses the run's "
            "own `train.eval_tokens` budget, so the two differ slightly."]
  return out + [""]
