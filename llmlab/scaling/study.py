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

import json
import logging
import os
import shutil
import sys
import time

import ml_collections
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab.scaling import sweep as sweep_lib

log = logging.getLogger("llmlab")


def member_config(scfg, model: dict, steps: int, decay_steps: int):
  """Train config of one run: the study's base with this model and length."""
  c = config_lib.merge_defaults(ml_collections.ConfigDict(scfg.base.to_dict()))
  c.model.update(model)
  c.train.steps = steps
  c.optim.schedule = "wsd"
  c.optim.decay_fraction = decay_steps / steps
  return c


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


def _finished(workdir: str, steps: int) -> bool:
  d = ckpt_lib.checkpoint_dir(workdir)
  return os.path.isdir(os.path.join(d, str(steps)))


def _train(cfg, workdir: str) -> None:
  from llmlab import train
  if _finished(workdir, cfg.train.steps):
    return
  t = time.time()
  summary = train.train(cfg, workdir)
  if summary["preempted"]:  # SIGTERM: the run saved; stop the whole study
    print("llmlab study: preempted (SIGTERM); the current run saved its "
          "checkpoint. Re-run the same command to resume.", file=sys.stderr)
    sys.exit(0)
  log.info("trained %s: step %d eval_loss %.4f in %.0fs", workdir,
           summary["step"], summary.get("eval_loss") or float("nan"),
           time.time() - t)


def _branch(main_dir: str, s: int, cfg, workdir: str) -> None:
  """Copy main run's stable checkpoint at step s into `workdir`, resume."""
  if _finished(workdir, cfg.train.steps):
    return
  src = os.path.join(ckpt_lib.checkpoint_dir(main_dir), str(s))
  dst = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(s))
  if not os.path.isdir(dst):
    if os.path.isdir(workdir):
      shutil.rmtree(workdir)  # a half-made branch: start it again
    shutil.copytree(src, dst + ".copy")
    os.replace(dst + ".copy", dst)
  _train(cfg, workdir)


def plan(scfg, workdir: str) -> list[dict]:
  """Every run of the study: main runs and branches, in training order."""
  runs = []
  steps = int(scfg.steps)
  decay = max(1, int(round(scfg.decay_fraction * steps)))
  members = [(n, dict(m), "family") for n, m in scfg.family]
  members.append((scfg.target[0], dict(scfg.target[1]), "target"))
  for name, model, role in members:
    main_dir = os.path.join(workdir, "runs", name)
    main = member_config(scfg, model, steps, decay)
    main.checkpoint.sweep_points = 0
    points = branch_points(steps, scfg.decay_fraction, scfg.points,
                           scfg.min_fraction)
    if role == "target":  # ARE only uses its points >= are_fraction of final
      points = [s for s in points
                if s / (1 - scfg.decay_fraction) >= scfg.are_fraction * steps]
    # The main run saves and keeps its stable checkpoints at branch points.
    main.checkpoint.every_steps = 0
    main.checkpoint.keep_at_steps = tuple(points)
    runs.append(dict(name=name, role=role, cfg=main, workdir=main_dir,
                     main=None, start=None, final=steps))
    for s in points:
      total = int(round(s / (1 - scfg.decay_fraction)))
      bcfg = member_config(scfg, model, total, total - s)
      bcfg.checkpoint.every_steps = 0
      runs.append(dict(name=name, role=role, cfg=bcfg, main=main_dir, start=s,
                       workdir=os.path.join(workdir, "runs",
                                            f"{name}_branch{s}"),
                       final=total))
  return runs


def run_study(scfg, workdir: str) -> dict:
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  _compilation_cache(os.path.join(workdir, ".jax_cache"))
  with open(os.path.join(workdir, "study_config.json"), "w") as f:
    f.write(scfg.to_json_best_effort(indent=2))
  runs = plan(scfg, workdir)
  for r in runs:
    if r["main"] is None:
      _train(r["cfg"], r["workdir"])
    else:
      _branch(r["main"], r["start"], r["cfg"], r["workdir"])
  names = [f"{r['name']}@{r['final']}" for r in runs]
  rows = sweep_lib.sweep(
      [r["workdir"] for r in runs], os.path.join(workdir, "endpoints.csv"),
      eval_tokens=int(scfg.eval_tokens), names=names,
      only_steps={r["workdir"]: [r["final"]] for r in runs},
      log=lambda s: print(s, file=sys.stderr, flush=True))
  by_name = {f"{r['name']}@{r['final']}": r for r in runs}
  records = []
  for row in rows:
    r = by_name.get(row["run"])
    if r is None:
      continue
    records.append(dict(row, run=r["name"], role=r["role"]))
  sweep_lib.write_csv(os.path.join(workdir, "records.csv"), records)
  result = analyse(scfg, records, workdir)
  truth = known_entropy(runs[0]["workdir"], result)
  if truth:
    result["known_entropy"] = truth
  result["wall_time_s"] = time.time() - t0
  result["design"] = DESIGN_NOTE.format(f=scfg.decay_fraction)
  with open(os.path.join(workdir, "study.json"), "w") as f:
    json.dump(result, f, indent=2, default=_json_default)
  write_report(result, workdir)
  return result


def _compilation_cache(path: str) -> None:
  """Persist compiled executables: the many runs of a study share eval and
  init programs, and a resumed study skips compiling them again."""
  import jax
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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
  from llmlab.scaling import fit_cli
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
    with open(os.path.join(run_dir, "config.json")) as f:
      info = json.load(f).get("data_info", {})
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


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def write_report(result: dict, workdir: str) -> None:
  """report.md: the numbers a researcher reads first, and the plots."""
  p = result.get("params", {})
  are = result.get("are")
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
      f"| ARE (target, >= 70% of final tokens) | {100 * are:.2f}% |",
      f"| naive ARE (largest fitted model's loss) | "
      f"{100 * result['naive_are']:.2f}% |",
      f"| skill = 1 - ARE/naive | {result['skill']:.3f} |",
      f"| wall time | {result['wall_time_s'] / 60:.1f} min |", ""]
  truth = result.get("known_entropy")
  if truth:
    lines += [f"Known entropy rate of the data: {truth['entropy_rate_nats']:.4f}"
              f" nats/token (best mean loss per target "
              f"{truth['floor_nats_per_target'] or float('nan'):.4f}); "
              f"fitted E = {truth['fitted_E']:.4f}.", ""]
  pred = result.get("prediction")
  if pred:
    lines += ["Target at its final tokens: " + json.dumps(
        pred, default=_json_default), ""]
  co = result.get("compute_optimal")
  if co:
    lines += ["Compute-optimal allocation:", "",
              "```", json.dumps(co, indent=2, default=_json_default), "```", ""]
  for png in sorted(f for f in os.listdir(workdir) if f.endswith(".png")):
    lines.append(f"![{png}]({png})")
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
