"""A schedule chosen by the multi-power law vs cosine and WSD (issue #21, item 5).

In the quick study's setting (configs/schedule_quick.py: the family's largest
model n74k, byte-level built-in corpus, batch 16 x 128, 1464 steps, peak
3e-3, warmup 70):

  1. train n74k under constant, cosine and WSD (seed 0), evaluated every 122
     steps, and fit the multi-power law on those held-out curves
     (curves_from_runs: the exact per-step rates);
  2. `llmlab schedule` minimises the fitted law's final loss at the same
     peak, steps and warmup;
  3. train the law's schedule, cosine and WSD (decay_fraction 0.2) with seeds
     0, 1, 2 (cosine and WSD seed 0 are the runs of step 1) and print the
     final held-out loss, mean +- std over seeds, with the law's predictions.

Every run directory lives under --workdir and a finished run is not trained
again: re-running the script resumes where it stopped (an interrupted run
resumes from its checkpoint).

    python benchmarks/schedule_experiment.py --workdir=/tmp/llmlab/schedule
    python benchmarks/schedule_experiment.py --workdir=/tmp/s --smoke  # ~3 min
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmlab import storage  # noqa: E402
from llmlab.scaling import curves as curves_lib  # noqa: E402
from llmlab.scaling import fit as fit_lib  # noqa: E402
from llmlab.scaling import fitting  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "schedule_quick.py")
FIT_SCHEDULES = ("constant", "cosine", "wsd")
COMPARED = ("law", "cosine", "wsd")
SEEDS = (0, 1, 2)


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _final_eval(wd: str, steps: int) -> float | None:
  """The run's held-out loss after its last step, or None if unfinished."""
  path = os.path.join(wd, "metrics.jsonl")
  if not storage.exists(path):
    return None
  rows = [r for r in storage.jsonl_rows(path) if "eval_loss" in r]
  last = [r for r in rows if int(r["step"]) == steps]
  return float(last[-1]["eval_loss"]) if last else None


def train(args, name: str, kind: str, seed: int, schedule_file: str | None = None) -> str:
  """Trains (or resumes, or skips if finished) one run; returns its directory."""
  wd = os.path.join(args.workdir, "runs", f"{name}_s{seed}")
  if _final_eval(wd, args.steps) is not None:
    return wd
  cmd = [sys.executable, "-m", "llmlab", "train", f"--config={CONFIG}{args.variant}",
         f"--workdir={wd}", f"--config.train.seed={seed}",
         f"--config.optim.schedule={kind}"]
  if schedule_file:
    cmd.append(f"--config.optim.schedule_file={schedule_file}")
  log(f"train {name} seed {seed}")
  t0 = time.time()
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  log(f"  done in {time.time() - t0:.0f} s: eval loss {_final_eval(wd, args.steps):.4f}")
  return wd


def fit(args, wds: list[str]) -> str:
  """The multi-power law on the runs' eval curves -> FIT/fit.json."""
  out = os.path.join(args.workdir, "fit")
  path = os.path.join(out, "fit.json")
  if storage.exists(path):
    return path
  t0 = time.time()
  result = fitting.run_curve_fit(curves_lib.curves_from_runs(wds), "multipower", out,
                                 n_bootstrap=args.bootstrap, source="curves_from_runs")
  log(f"fit in {time.time() - t0:.0f} s\n{fitting.curve_summary(result)}")
  return path


def choose(args, fit_path: str) -> str:
  out = os.path.join(args.workdir, "schedule.json")
  if not storage.exists(out):
    log("llmlab schedule")
    subprocess.run([sys.executable, "-m", "llmlab", "schedule", f"--fit={fit_path}",
                    f"--steps={args.steps}", f"--peak_lr={args.peak_lr}",
                    f"--out={out}"], check=True, cwd=ROOT)
  return out


def predicted_error(fit_path: str, wds: list[str]) -> float:
  """Mean relative error of the law on the law-schedule runs' eval curves
  (schedules it was not fitted on)."""
  f = storage.read_json(fit_path)
  law = fit_lib.FitResult(f["form"], np.array(list(f["log_params"].values())), 0.0,
                          f["params"], 0, 0, 0, True)
  table = curves_lib.curves_from_runs(wds)
  hat = fit_lib.predict_curves(law, table)
  return float(np.mean(np.abs(hat / table["loss"] - 1)))


def table(args, finals: dict, sched: dict, law_error: float) -> str:
  pred = dict(law=sched["predicted_final_loss"],
              cosine=sched["baselines"]["cosine"]["predicted_final_loss"],
              wsd=sched["baselines"]["wsd"]["predicted_final_loss"])
  lines = [f"n74k, {args.steps} steps, peak {args.peak_lr:g}, warmup "
           f"{sched['warmup_steps']}, seeds {list(SEEDS)}: held-out (eval) loss after "
           "the last step",
           "", "| schedule | eval loss (mean ± std) | per seed | law's prediction |",
           "|---|---|---|---|"]
  for name in COMPARED:
    v = np.array(finals[name])
    lines.append(f"| {name} | {v.mean():.4f} ± {v.std(ddof=1):.4f} | "
                 f"{', '.join(f'{x:.4f}' for x in v)} | {pred[name]:.4f} |")
  best = min(COMPARED, key=lambda n: np.mean(finals[n]))
  lines += ["", f"lowest mean: {best}; law vs cosine "
            f"{np.mean(finals['law']) - np.mean(finals['cosine']):+.4f}, law vs wsd "
            f"{np.mean(finals['law']) - np.mean(finals['wsd']):+.4f} (nats); "
            f"law's final rate {sched['final_lr']:.3g}; mean relative error of the law "
            f"on the law-schedule eval curves {100 * law_error:.2f}%"]
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--smoke", action="store_true", help="configs/schedule_quick.py:smoke")
  ap.add_argument("--bootstrap", type=int, default=20)
  args = ap.parse_args()
  args.variant = ":smoke" if args.smoke else ""
  args.steps, args.peak_lr = (60, 3e-3) if args.smoke else (1464, 3e-3)
  t0 = time.time()
  fit_wds = [train(args, k, k, 0) for k in FIT_SCHEDULES]
  fit_path = fit(args, fit_wds)
  sched_path = choose(args, fit_path)
  sched = storage.read_json(sched_path)
  finals = {name: [] for name in COMPARED}
  law_wds = []
  for seed in SEEDS:
    for name in COMPARED:
      kind = "file" if name == "law" else name
      wd = train(args, name, kind, seed, sched_path if name == "law" else None)
      finals[name].append(_final_eval(wd, args.steps))
      if name == "law":
        law_wds.append(wd)
  text = table(args, finals, sched, predicted_error(fit_path, law_wds))
  storage.write_text(os.path.join(args.workdir, "table.md"), text + "\n")
  print(text)
  log(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
