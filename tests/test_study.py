"""`llmlab study` end to end on a tiny family: trains, branches, sweeps,
fits, predicts, writes study.json and report.md; re-running resumes."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(workdir):
  out = subprocess.run(
      [sys.executable, "-m", "llmlab", "study",
       f"--config={ROOT}/configs/study_quick.py:test", f"--workdir={workdir}"],
      capture_output=True, text=True, timeout=900, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def test_study_end_to_end_and_resume(tmp_path):
  workdir = str(tmp_path / "study")
  out = _study(workdir)
  result = json.load(open(os.path.join(workdir, "study.json")))
  for key in ("params", "intervals", "predictions", "are", "naive_are",
              "skill", "compute_optimal", "wall_time_s", "design", "prediction"):
    assert key in result, key
  assert set(result["params"]) == {"E", "A", "B", "alpha", "beta"}
  assert result["fit_runs"] == ["t1", "t2", "t3"]  # the target is held out
  assert result["target"]["ratio_to_largest_fitted"] >= 3
  assert 0 <= result["are"] < 1 and result["naive_are"] > 0
  assert result["skill"] == 1 - result["are"] / result["naive_are"]
  # Branch ends are annealed endpoints of separate runs; the target's main
  # run is among the predicted points.
  runs = sorted(os.listdir(os.path.join(workdir, "runs")))
  assert "t1" in runs and any(r.startswith("t1_branch") for r in runs)
  report = open(os.path.join(workdir, "report.md")).read()
  assert "skill" in report and ".png" in report
  # Labels follow the config that produced the numbers; tables, not JSON.
  frac = result["are_rule"]["min_fraction"]
  assert f"ARE (target, >= {100 * frac:.0f}% of final tokens)" in report
  assert "| tokens | predicted loss | 95% interval | actual | error |" in report
  assert "| compute C (FLOPs) | params N* |" in report
  branch = next(r for r in runs if r.startswith("t1_branch"))
  assert f"| t1@" in report and f"runs/{branch} |" in report
  assert "held-out tokens" in report and "{" not in report
  # Study-level progress on the console: runs and tokens done of planned.
  planned = len(runs)
  assert f"study: 0/{planned} runs" in out.stderr
  assert f"study: {planned}/{planned} runs" in out.stderr
  assert out.stderr.count("memory pre-flight, per device") < planned
  total = result["wall_time_total_s"]
  before = os.path.getmtime(os.path.join(workdir, "runs", "t1", "config.json"))
  out = _study(workdir)  # resumes: nothing is retrained or re-evaluated
  assert "trained" not in out.stderr
  assert "nothing new to evaluate" in out.stderr
  assert os.path.getmtime(os.path.join(workdir, "runs", "t1", "config.json")) == before
  again = json.load(open(os.path.join(workdir, "study.json")))
  # Wall time adds up over invocations; this one's is reported beside it.
  assert again["wall_time_total_s"] > total
  assert abs(again["wall_time_total_s"] - total -
             again["wall_time_this_run_s"]) < 1e-6
  assert again["wall_time_this_run_s"] < total
