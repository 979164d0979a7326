"""How much of a study's error is the target's own seed: re-train the target.

A study scores its prediction against one run of the target, which is itself
one draw (at the quick study's scale seeds differ by ~1%). This trains the
target of a finished `llmlab study` again with other seeds (same config
otherwise, in DIR/runs/<target>_seed<k>; re-running skips finished runs;
times in DIR/target_seeds/experiment.json) and
scores both laws the study fitted against each seed and against their mean:
the curve law (`curve_fit` in study.json, or the study itself with
fit_on=curves) at every target eval >= are_fraction of the final step, and
the branch law (fit_on=branches) at the final step.

    python benchmarks/study_target_seeds.py --config=configs/study_quick.py \
        --workdir=DIR [--seeds=1,2]
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from llmlab import cli_common  # noqa: E402
from llmlab import experiment  # noqa: E402
from llmlab import storage  # noqa: E402
from llmlab.scaling import curves as curves_lib  # noqa: E402
from llmlab.scaling import study as study_lib  # noqa: E402


def _evals(run_dir: str) -> dict[int, float]:
  c = curves_lib.curves_from_runs([run_dir])
  return {int(s): float(v) for s, v in zip(c["step"], c["loss"])}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True, help="the study's config file[:variant]")
  p.add_argument("--workdir", required=True, help="a finished study's directory")
  p.add_argument("--seeds", default="1,2")
  a, rest = p.parse_known_args()
  scfg = cli_common.load_config(a.config, *rest)
  result = storage.read_json(storage.join(a.workdir, "study.json"))
  target = next(r for r in study_lib.plan(study_lib.checked(scfg), a.workdir)
                if r.role == "target" and r.kind == "main")
  # Its own harness file: the study's experiment.json (wall time) is left alone.
  ex = experiment.Experiment(storage.join(a.workdir, "target_seeds"))
  runs = {f"seed {scfg.base.train.seed}": _evals(target.workdir)}
  for seed in (int(s) for s in a.seeds.split(",")):
    cfg = copy.deepcopy(target.cfg)
    cfg.train.seed = seed
    wd = f"{target.workdir}_seed{seed}"
    ex.train(cfg, wd)
    runs[f"seed {seed}"] = _evals(wd)
  steps = sorted(set.intersection(*[set(r) for r in runs.values()]))
  runs["mean"] = {s: float(np.mean([r[s] for r in runs.values()])) for s in steps}
  final = max(steps)
  late = [s for s in steps if s >= float(scfg.are_fraction) * final]
  seeds_TxK = np.array([[r[s] for k, r in runs.items() if k != "mean"] for s in late])
  rel = seeds_TxK.std(axis=1, ddof=1) / seeds_TxK.mean(axis=1)
  print(f"target {target.member}: final loss per seed "
        + ", ".join(f"{k} {r[final]:.4f}" for k, r in runs.items())
        + f"; relative std {100 * np.sqrt(np.mean(rel ** 2)):.2f}% "
        f"(RMS over the {len(late)} evals >= {scfg.are_fraction:g} of the final step)")
  curve = result if result.get("fit_on") == "curves" else result.get("curve_fit")
  branch = result.get("prediction") if result.get("fit_on") == "branches" else None
  print("| against | curve law ARE | skill | final: curve law | final: branch law |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for k, r in runs.items():
    cells = ["-", "-", "-"]
    if curve:
      pts = {int(q["step"]): q for q in curve["points"]}
      are = np.mean([abs(pts[s]["loss_hat"] - r[s]) / r[s] for s in late])
      naive = np.mean([abs(pts[s]["naive"] - r[s]) / r[s] for s in late])
      cells = [f"{100 * are:.2f}%", f"{1 - are / naive:.3f}",
               f"{100 * (pts[final]['loss_hat'] / r[final] - 1):+.2f}%"]
    b = "-" if not branch else f"{100 * (branch['loss_hat'] / r[final] - 1):+.2f}%"
    print(f"| {k} | " + " | ".join(cells) + f" | {b} |")


if __name__ == "__main__":
  main()
