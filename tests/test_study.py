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
  _study(workdir)
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
  before = os.path.getmtime(os.path.join(workdir, "runs", "t1", "config.json"))
  out = _study(workdir)  # resumes: nothing is retrained or re-evaluated
  assert "trained" not in out.stderr
  assert "nothing new to evaluate" in out.stderr
  assert os.path.getmtime(os.path.join(workdir, "runs", "t1", "config.json")) == before
