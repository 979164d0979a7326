"""A schedule chosen by a fitted curve law (`llmlab schedule`) and training
with a schedule file (`optim.schedule=file`): the law's schedule is
monotone after optim.py's warmup and beats cosine and WSD under the law;
bad fits and bad schedule files fail with one line naming what is wrong; a
run trains with exactly the file's rates, keeps them, and refuses a resume
under changed ones."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from llmlab import config as config_lib
from llmlab import main as main_lib
from llmlab import optim
from llmlab.scaling import curves, fitting
from llmlab.scaling import fit as fit_lib
from tests.helpers import TINY, llmlab

TRUE = dict(L0=2.0, A=0.4, alpha=0.45, B=300.0, C=2.0, beta=0.6, gamma=0.6)
STEPS, WARM, PEAK = 800, 40, 1e-3


def _rates(kind):
  o = config_lib.base().optim
  o.update(schedule=kind, warmup_steps=WARM, decay_fraction=0.3)
  return np.asarray(optim.schedule(o, PEAK, STEPS)(jnp.arange(STEPS)), np.float64)


def _law(p, table):
  theta = np.array([np.log(p["L0"]), np.log(p["A"]), p["alpha"], np.log(p["B"]),
                    np.log(p["C"]), p["beta"], p["gamma"]])
  return fit_lib.predict_curves(fit_lib.FitResult("multipower", theta, 0.0, p, 0, 0, 0,
                                                  True), table)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """fit.json of the multi-power law fitted on three tiny synthetic curves."""
  cols, eta = {k: [] for k in ("run", "step", "lr", "loss", "warmup_steps")}, {}
  for kind in ("constant", "cosine", "wsd"):
    eta[kind] = _rates(kind)
    t = np.arange(WARM, STEPS + 1, 40)
    table = dict(run=[kind] * len(t), step=t, lr=eta[kind][t - 1], loss=np.ones(len(t)),
                 eta={kind: eta[kind]}, warmup_steps=[WARM] * len(t))
    for k, v in dict(table, loss=_law(TRUE, table)).items():
      if k != "eta":
        cols[k] += list(v)
  out = tmp_path_factory.mktemp("fit")
  fitting.run_curve_fit(dict(cols, eta=eta), "multipower", str(out), n_bootstrap=0)
  return str(out / "fit.json")


def test_schedule_command(fitted, tmp_path, capsys):
  out = tmp_path / "schedule.json"
  assert main_lib.main(["schedule", f"--fit={fitted}", f"--steps={STEPS}",
                        f"--peak_lr={PEAK}", f"--out={out}", "--iterations=300"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  s = json.loads(out.read_text())
  lr = np.array(s["lr"])
  assert len(lr) == STEPS and s["warmup_steps"] == WARM  # the fitted curves' warmup
  assert lr[:WARM] == pytest.approx(_rates("constant")[:WARM], rel=1e-6)  # optim's warmup
  assert np.all(np.diff(lr[WARM:]) <= 0) and lr[WARM] <= PEAK and lr.min() >= 0
  cos, wsd = (s["baselines"][k]["predicted_final_loss"] for k in ("cosine", "wsd"))
  assert s["predicted_final_loss"] <= min(cos, wsd)
  assert summary["predicted_final_loss"] == s["predicted_final_loss"]
  assert s["extrapolation"] == [] and s["fit"] == fitted
  # The exact one-point sum the descent uses agrees with the fitter's blocks.
  fit = json.loads(open(fitted).read())
  table = dict(run=["x"], step=[STEPS], lr=[lr[-1]], eta={"x": lr})
  res = fit_lib.FitResult("multipower", np.array(list(fit["log_params"].values())), 0.0,
                          fit["params"], 0, 0, 0, True)
  assert fit_lib.predict_curves(res, table)[0] == pytest.approx(
      s["predicted_final_loss"], rel=1e-4)
  assert fit_lib.predict_curves(res, dict(table, eta={"x": _rates("cosine")}))[0] == \
      pytest.approx(cos, rel=1e-4)


def test_schedule_extrapolation_and_bad_fits(fitted, tmp_path, capsys):
  out = tmp_path / "s.json"
  assert main_lib.main(["schedule", f"--fit={fitted}", f"--steps={2 * STEPS}",
                        f"--peak_lr={2 * PEAK}", f"--out={out}", "--iterations=5"]) == 0
  err = capsys.readouterr().err
  assert "warning: this schedule is extrapolation" in err
  assert "1600 steps, longer than any fitted curve (800)" in err
  assert "peak learning rate 0.002 outside the fitted" in err
  assert len(json.loads(out.read_text())["extrapolation"]) == 2
  chin = tmp_path / "chin.json"
  chin.write_text(json.dumps(dict(form="chinchilla", log_params={})))
  for args, message in [
      ([f"--fit={chin}"], "form 'chinchilla' is not a law of the loss curve"),
      ([f"--fit={tmp_path / 'none.json'}"], "no such file"),
      ([f"--fit={fitted}", "--warmup_steps=900"], "--warmup_steps=900: must be in"),
      ([f"--fit={fitted}", "--params=1e6"], "is one model's law")]:
    argv = ["schedule", f"--steps={STEPS}", f"--peak_lr={PEAK}", f"--out={out}", *args]
    assert main_lib.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmlab schedule: error: ") and message in err, err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    ('{"lr": [0.1, 0.1]}', "2 rates, fewer than config.train.steps=3"),
    ('{"lr": [0.1, NaN, 0.1]}', r"lr[1] = nan (update 2) is not finite"),
    ('{"lr": [0.1, 0.1, -1e-3]}', r"lr[2] = -0.001 (update 3) is negative"),
    ('{"lr": [0.1, "x", 0.1]}', r"lr[1] = 'x' (update 2) is not a number"),
    ('{"rates": []}', 'expected {"lr": [rates...]}'),
    ('[0.1, 0.1, 0.1', "not JSON"),
])
def test_bad_schedule_files_name_file_and_entry(tmp_path, content, message):
  path = tmp_path / "sched.json"
  path.write_text(content)
  o = ConfigDict(dict(config_lib.base().optim, schedule="file", schedule_file=str(path)))
  with pytest.raises(config_lib.ConfigError) as e:
    optim.schedule_params(o, 1e-3, 3)
  assert str(path) in str(e.value) and message in str(e.value)


def _train(workdir, *overrides):
  return llmlab("train", TINY, f"--workdir={workdir}", "--config.optim.schedule=file",
                *overrides, check=False)


def test_train_with_a_schedule_file(tmp_path):
  rates = [0.0, 1e-3, 3e-3, 2.5e-3, 2e-3, 2e-3, 1.5e-3, 1e-3, 7e-4, 4e-4, 2e-4, 1e-4, 5e-5]
  path = tmp_path / "sched.json"
  path.write_text(json.dumps(dict(lr=rates, warmup_steps=2)))
  wd = tmp_path / "run"
  # A bad entry fails before the run directory is touched: one line, exit 2.
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(dict(lr=rates[:5] + [float("inf")] + rates[6:])))
  out = _train(tmp_path / "never", f"--config.optim.schedule_file={bad}")
  assert out.returncode == 2, out.stderr[-2000:]
  assert f"{bad}" in out.stderr and "lr[5] = inf (update 6) is not finite" in out.stderr
  assert not (tmp_path / "never").exists()

  # Half the run, then resumed to its end (the checkpoint at step 6).
  out = _train(wd, f"--config.optim.schedule_file={path}", "--config.train.steps=6")
  assert out.returncode == 0, out.stderr[-4000:]
  out = _train(wd, f"--config.optim.schedule_file={path}")
  assert out.returncode == 0, out.stderr[-4000:]
  assert "resumed from step 6" in out.stderr, out.stderr[-4000:]
  rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  logged = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}
  assert sorted(logged) == list(range(2, 13, 2)) and all(v == np.float32(rates[s - 1]) for s, v in logged.items())
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["optim"]["schedule_file"] == str(path)
  assert cfg["schedule_file"]["warmup_steps"] == 2 and cfg["schedule_file"]["peak_lr"] == \
      pytest.approx(3e-3)
  # The run keeps its rates: curves read the copy even when the file is gone.
  os.rename(path, tmp_path / "moved.json")
  table = curves.curves_from_runs([str(wd)])
  assert table["eta"]["run"] == pytest.approx(np.float32(rates[:12]), rel=0, abs=0)
  assert table["warmup_steps"][0] == 2
  # A resume under other rates would not replay the run: refused.
  path.write_text(json.dumps(dict(lr=[r * 2 for r in rates], warmup_steps=2)))
  out = _train(wd, f"--config.optim.schedule_file={path}")
  assert out.returncode == 2 and "gives other rates than the run started with" in \
      out.stderr and "first at update 2" in out.stderr, out.stderr[-2000:]
