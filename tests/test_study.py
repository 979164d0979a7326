"""`llmlab study` end to end on a tiny family: trains, branches, sweeps,
fits, predicts, writes study.json and report.md; re-running resumes."""

import json
import os

import pytest

from tests import helpers
from tests.helpers import ROOT


def _study(workdir, *flags, ok=True):
  return helpers.llmlab("study", f"--config={ROOT}/configs/study_quick.py:test",
                        f"--workdir={workdir}", *flags, check=ok)


def test_study_end_to_end_and_resume(tmp_path):
  workdir = str(tmp_path / "study")
  out = _study(workdir, "--config.fit_on=branches")
  result = json.load(open(os.path.join(workdir, "study.json")))
  for key in ("params", "intervals", "predictions", "are", "naive_are",
              "skill", "compute_optimal", "wall_time_s", "design", "prediction"):
    assert key in result, key
  assert set(result["params"]) == {"E", "A", "B", "alpha", "beta"}
  # The target is held out; t3's seed re-run is fitted too (fit_seeds).
  assert result["fit_runs"] == ["t1", "t2", "t3", "t3_seed1"]
  assert result["target"]["ratio_to_largest_fitted"] >= 3
  records = open(os.path.join(workdir, "records.csv")).read().splitlines()
  assert sum(r.startswith("t3_seed1,20,") for r in records) == 1
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
  assert "| t1@" in report and f"runs/{branch} |" in report
  assert "held-out tokens" in report and "{" not in report
  assert "The law's 95% interval (bootstrap) covers" in report
  # Study-level progress on the console: runs and tokens done of planned.
  planned = len(runs)
  assert f"study: 0/{planned} runs" in out.stderr
  assert f"study: {planned}/{planned} runs" in out.stderr
  assert out.stderr.count("memory pre-flight, per device") < planned
  total = result["wall_time_total_s"]
  before = os.path.getmtime(os.path.join(workdir, "runs", "t1", "config.json"))
  out = _study(workdir, "--config.fit_on=branches")  # resumes: nothing is
  # retrained or re-evaluated
  assert "trained" not in out.stderr
  assert "nothing new to evaluate" in out.stderr
  assert os.path.getmtime(os.path.join(workdir, "runs", "t1", "config.json")) == before
  again = json.load(open(os.path.join(workdir, "study.json")))
  # Wall time adds up over invocations; this one's is reported beside it.
  assert again["wall_time_total_s"] > total
  assert abs(again["wall_time_total_s"] - total -
             again["wall_time_this_run_s"]) < 1e-6
  assert again["wall_time_this_run_s"] < total


def test_study_on_curves(tmp_path):
  """fit_on=curves: one run per size (no branches), the curve law fitted on
  every logged eval of the family, the target predicted along its curve;
  the seed re-runs' spread widens its intervals."""
  workdir = str(tmp_path / "study")
  _study(workdir, "--config.fit_on=curves")
  result = json.load(open(os.path.join(workdir, "study.json")))
  assert result["fit_on"] == "curves" and result["form"] == "multipower_e"
  assert result["fit_runs"] == ["t1", "t2", "t3", "t3_seed1"]  # fit_seeds
  assert result["params_column"] == "params"
  runs = sorted(os.listdir(os.path.join(workdir, "runs")))
  assert runs == ["t1", "t2", "t3", "t3_seed1", "t_target"]  # no branches
  points = result["points"]
  assert len(points) == 12 and points[-1]["step"] == 20
  assert all(p["run"] == "t_target" for p in points)
  late = [p for p in points if p["step"] >= 0.5 * 20]
  are = sum(abs(p["loss_hat"] - p["loss"]) / p["loss"] for p in late) / len(late)
  assert abs(result["are"] - are) < 1e-9 and result["naive_are"] > 0
  assert result["skill"] == 1 - result["are"] / result["naive_are"]
  noise = result["seed_noise"]
  assert noise["member"] == "t3" and noise["runs"] == ["t3", "t3_seed1"]
  assert len(noise["rel_std"]) == 12 and noise["rel_std_rms"] > 0
  for p in points:  # the seed spread only widens the observed interval
    assert p["run_lo"] <= p["obs_lo"] <= p["obs_hi"] <= p["run_hi"]
  assert set(result["coverage_95"]) == {"curve", "observed", "with_seed_noise"}
  t = result["timing"]
  assert t["branch_wall_s"] == 0 and t["seed_wall_s"] > 0
  # The curves design costs its main runs (and its fit); with the seed
  # re-runs, those too (study_analysis.design_times).
  assert t["curves_design_wall_s"] >= t["main_wall_s"]
  assert (t["curves_design_with_seeds_wall_s"] >=
          t["main_wall_s"] + t["seed_wall_s"])
  report = open(os.path.join(workdir, "report.md")).read()
  assert "along its curve" in report and "Seed noise (t3" in report
  assert "![target_curve.png](target_curve.png)" in report
  assert "| t3_seed1@20 | runs/t3_seed1 | seed |" in report
  assert "branches design" not in report  # no branch runs to time
  assert os.path.exists(os.path.join(workdir, "curve_fit", "predictions.csv"))
  # Re-analysed with N = non-embedding parameters and the seed run left
  # out of the fit: nothing trains again.
  out = _study(workdir, "--config.fit_on=curves", "--config.fit_seeds=False",
               "--config.curve_fit.params_column=params_nonembed")
  assert "trained" not in out.stderr
  again = json.load(open(os.path.join(workdir, "study.json")))
  info = json.load(open(os.path.join(workdir, "runs", "t_target",
                                     "config.json")))["model_info"]
  assert again["fit_runs"] == ["t1", "t2", "t3"]
  assert again["params_column"] == "params_nonembed"
  assert again["target"]["params"] == info["params_nonembed"] < info["params_total"]
  assert again["are"] != result["are"]


def test_study_bad_fit_on(tmp_path):
  """A fit_on or curve setting the study does not know: one line naming
  the key and value, before anything trains."""
  workdir = tmp_path / "study"
  for flag, msg in (("--config.fit_on=endpoints", "fit_on='endpoints'"),
                    ("--config.curve_spacing=cubic", "curve_spacing='cubic'"),
                    ("--config.curve_points=5", "curve_points=5"),
                    ("--config.curve_fit.params_column=width",
                     "curve_fit.params_column='width'"),
                    ("--config.parallel=0", "parallel=0")):
    out = _study(str(workdir), "--config.fit_on=curves", flag, ok=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert msg in out.stderr and "Traceback" not in out.stderr
    assert not (workdir / "runs").exists()


def _checked(*overrides, drop=(), **values):
  from llmlab import cli_common  # noqa: PLC0415
  from llmlab.scaling import study  # noqa: PLC0415
  scfg = cli_common.load_config(f"{ROOT}/configs/study_quick.py:test",
                                *overrides)
  scfg.unlock()
  for key in drop:
    del scfg[key]
  for key, value in values.items():  # as a config file may set them
    if key in scfg:
      del scfg[key]
    scfg[key] = value
  return study.checked(scfg)


def test_study_schema_defaults_and_errors():
  """Every study key has one default (a config may leave any out) and a bad
  or unknown one is a ConfigError naming it, in process."""
  import pytest  # noqa: PLC0415

  from llmlab import config, errors  # noqa: PLC0415
  s = _checked(drop=("fit_on", "curve_spacing", "noise_member", "fit_seeds",
                     "run_branches"))
  d = config.study_defaults()
  assert (s.fit_on, s.curve_spacing, s.fit_seeds) == ("branches", "linear", False)
  assert s.noise_member == d.noise_member == "" and s.steps == 20
  assert s.fit.params_column == s.curve_fit.params_column == "params"
  for flag, msg in (("--config.decay_fraction=1.0", "decay_fraction=1.0"),
                    ("--config.steps=0", "steps=0"),
                    ("--config.noise_member=t_target", "noise_member='t_target'"),
                    ("--config.fit.form=multipower_e", "fit.form='multipower_e'"),
                    ("--config.curve_fit.form=chinchilla",
                     "curve_fit.form='chinchilla'"),
                    ("--config.fit.form=nope", "fit.form='nope'")):
    with pytest.raises(errors.ConfigError, match=msg.replace(".", r"\.")):
      _checked(flag)
  with pytest.raises(errors.ConfigError, match="fit_seeds=1"):
    _checked(fit_seeds=1)
  with pytest.raises(errors.ConfigError, match="family="):
    _checked(family=[("t1", {})])
  with pytest.raises(errors.ConfigError, match="unknown config key 'unknown_key'"):
    _checked(unknown_key=1)


def test_study_plan_records():
  """The plan is one Run record per run, its kind from its role and start."""
  from llmlab.scaling import study  # noqa: PLC0415
  s = _checked("--config.fit_on=branches")
  planned = study.plan(s, "/w")
  kinds = [r.kind for r in planned]
  assert kinds == ["main"] * 4 + ["seed"] + ["branch"] * (len(kinds) - 5)
  seed = planned[4]
  assert (seed.member, seed.run, seed.role) == ("t3", "t3_seed1", "seed")
  assert seed.workdir == "/w/runs/t3_seed1" and seed.cfg.train.seed == 1
  branch = planned[5]
  assert branch.main == f"/w/runs/{branch.member}" and branch.start >= 1
  assert branch.workdir == f"/w/runs/{branch.member}_branch{branch.start}"
  assert branch.final == branch.cfg.train.steps > branch.start
  curves = study.plan(_checked("--config.fit_on=curves"), "/w")
  assert "branch" not in [r.kind for r in curves]
  assert curves[0].cfg.train.eval_at_steps[-1] == 20


@pytest.mark.integration  # two whole studies: the slower tier
def test_study_packed_side_by_side_matches_one_after_another(tmp_path):
  """`parallel=2`: the command simulates 2 CPU devices and trains runs two
  at a time, biggest first; every record is the same as one after another."""
  loss = {}
  for p in (1, 2):  # a fresh process: jax starts with the devices asked for
    workdir = str(tmp_path / f"p{p}")
    out = helpers.llmlab_process(
        "study", f"--config={ROOT}/configs/study_quick.py:test",
        f"--workdir={workdir}", f"--config.parallel={p}")
    assert "train one after another" not in out.stderr
    rows = open(os.path.join(workdir, "records.csv")).read().splitlines()
    head = rows[0].split(",")
    loss[p] = sorted((r.split(",")[head.index("run")],
                      r.split(",")[head.index("tokens")],
                      r.split(",")[head.index("loss")]) for r in rows[1:])
    assert len(loss[p]) == 8
  assert loss[1] == loss[2]
