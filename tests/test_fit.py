"""Scaling-law fitter: the Chinchilla refit, recovery of known laws, ARE, CLI.

Compiled programs are shared between tests by keeping data sets in the same size
bucket (129-256 points, <= 8 runs of 17-32 checkpoints, 100 bootstrap refits).
"""

import csv
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab.scaling import fit as fit_lib
from llmlab.commands import fit as fit_cmd
from llmlab.scaling import fitting, forms, records
from tests.helpers import TESTS

# Hoffmann et al. 2022 (Figure 4) as extracted by Besiroglu et al. 2024 (Epoch AI),
# see tests/data/README.md.
CHINCHILLA = os.path.join(TESTS, "data", "chinchilla_hoffmann2022.csv")
HOFFMANN = dict(a=6.0073404, b=6.0179186, e=0.5267228, alpha=0.33917084, beta=0.2849083)
N_BOOT = 100


def _objective_np(p, rec, delta=1e-3):
  """Independent numpy evaluation of the Huber log-loss objective."""
  pred = np.log(p["E"] + p["A"] / rec["params"] ** p["alpha"] +
                p["B"] / rec["tokens"] ** p["beta"])
  r = np.abs(pred - np.log(rec["loss"]))
  return float(np.sum(np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))))


def _law(p, n, d):
  return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


@pytest.fixture(scope="module")
def chinchilla240():
  rec = records.read_records(CHINCHILLA)
  keep = np.sort(np.argsort(rec["loss"])[:-5])  # drop the 5 highest losses
  return records.take(rec, keep)


@pytest.fixture(scope="module")
def chin_fit(chinchilla240):
  return fit_lib.fit_law(chinchilla240)


@pytest.fixture(scope="module")
def chin_boot(chinchilla240, chin_fit):
  return fit_lib.bootstrap(chinchilla240, n=N_BOOT, fit=chin_fit, seed=0)


def test_chinchilla_refit_matches_epoch(chinchilla240, chin_fit):
  p = chin_fit.params
  assert len(chinchilla240["loss"]) == 240 and chin_fit.n_starts == 4500
  assert chin_fit.converged
  assert chin_fit.objective == pytest.approx(1.0183e-3, rel=2e-4)
  assert chin_fit.objective == pytest.approx(_objective_np(p, chinchilla240), rel=1e-9)
  assert p["alpha"] == pytest.approx(0.347, abs=0.005)
  assert p["beta"] == pytest.approx(0.367, abs=0.005)
  assert p["E"] == pytest.approx(1.817, abs=0.005)
  assert p["A"] == pytest.approx(478, rel=0.05)
  assert p["B"] == pytest.approx(2143, rel=0.06)


def test_hoffmann_start_reaches_optimum(chinchilla240, chin_fit):
  hoff = forms.natural_params(forms.get_form("chinchilla"), list(HOFFMANN.values()))
  # Hoffmann's published point is an early stop: clearly worse than the optimum.
  assert _objective_np(hoff, chinchilla240) > 1.02 * chin_fit.objective
  res = fit_lib.fit_law(chinchilla240, init=HOFFMANN)
  assert res.n_starts == 1 and res.converged
  assert res.objective <= chin_fit.objective * (1 + 1e-7)
  for k in ("alpha", "beta", "E"):
    assert res.params[k] == pytest.approx(chin_fit.params[k], abs=1e-4), k
  assert res.params["beta"] == pytest.approx(0.367, abs=0.005)  # not 0.285


def test_bootstrap_intervals(chin_boot):
  iv = chin_boot.intervals()
  assert chin_boot.unit == "points" and chin_boot.thetas.shape == (N_BOOT, 5)
  assert np.mean(chin_boot.converged) >= 0.95
  # Epoch's bootstrap: alpha 0.32-0.37, beta 0.33-0.42, E 1.77-1.87 (loose bounds
  # for 100 resamples).
  for name, (lo, hi), slack in (("alpha", (0.32, 0.37), 0.015), ("beta", (0.33, 0.42), 0.02),
                                ("E", (1.77, 1.87), 0.03)):
    assert iv[name][0] == pytest.approx(lo, abs=slack), name
    assert iv[name][1] == pytest.approx(hi, abs=slack), name


def _points(n_points=150, seed=0):
  """Random (N, D) pairs; 150 points share the 256-point compiled programs."""
  rng = np.random.default_rng(seed)
  n = np.exp(rng.uniform(math.log(1e7), math.log(1e10), n_points))
  d = np.exp(rng.uniform(math.log(1e8), math.log(1e11), n_points))
  return n, d


def test_noise_free_recovery_and_x64_scoped():
  true = dict(E=1.7, A=400.0, B=1800.0, alpha=0.34, beta=0.28)
  n, d = _points()
  res = fit_lib.fit_law(dict(params=n, tokens=d, loss=_law(true, n, d)), init=HOFFMANN)
  for k, v in true.items():
    assert res.params[k] == pytest.approx(v, rel=1e-4), k
  assert not jax.config.jax_enable_x64
  assert jnp.ones(2).dtype == jnp.float32


def test_compute_form_recovery():
  n, d = _points(seed=1)
  res = fit_lib.fit_law(dict(params=n, tokens=d, loss=1.5 + 80.0 / (6 * n * d) ** 0.1),
                        form="compute", init=dict(a=10.0, e=0.0, alpha=0.3))  # one start
  for k, v in dict(E=1.5, A=80.0, alpha=0.1).items():
    assert res.params[k] == pytest.approx(v, rel=1e-4), k
  pred = fit_lib.predict(res, compute=np.array([1e22]))
  assert pred[0] == pytest.approx(1.5 + 80.0 / 1e22 ** 0.1, rel=1e-6)


def _runs(laws: dict, per_run=20, n_of=None):
  """Checkpoints of single models following data laws L(D) = E + B / D^beta."""
  rows = []
  for i, (name, (e, b, beta)) in enumerate(laws.items()):
    for d in np.geomspace(1e8, 1e10, per_run):
      rows.append(dict(run=name, params=(n_of or {}).get(name, 1e7 * 2 ** i), tokens=d,
                       loss=e + b / d ** beta))
  return records.as_records(rows)


def test_data_form_saturation():
  laws = {"s": (2.5, 300.0, 0.3), "m": (2.2, 500.0, 0.32), "l": (2.0, 900.0, 0.35)}
  out = fit_lib.saturation(_runs(laws), threshold=0.01)
  assert [r["run"] for r in out] == list(laws)
  for row, (e, b, beta) in zip(out, laws.values()):
    assert row["E"] == pytest.approx(e, rel=1e-4)
    assert row["B"] == pytest.approx(b, rel=1e-3)
    assert row["beta"] == pytest.approx(beta, rel=1e-4)
    d_sat = row["saturation_tokens"]
    gain = (e + b / d_sat ** beta) - (e + b / (2 * d_sat) ** beta)  # one more doubling
    assert gain == pytest.approx(0.01, rel=1e-3)
    assert not row["saturated"]


def test_read_records_errors(tmp_path):
  def write(text):
    path = tmp_path / "r.csv"
    path.write_text(text)
    return str(path)

  with pytest.raises(records.RecordsError, match=r"empty file"):
    records.read_records(write(""))
  with pytest.raises(records.RecordsError,
                     match=r"r\.csv, line 1 \(header\): missing required column.*'loss'"):
    records.read_records(write("params,tokens\n1,2\n"))
  with pytest.raises(records.RecordsError, match=r"r\.csv, line 3: column 'loss': non-numeric "
                                                 r"value 'abc'"):
    records.read_records(write("params,tokens,loss\n1,2,3\n1,2,abc\n"))
  with pytest.raises(records.RecordsError, match=r"line 2: column 'tokens': missing value"):
    records.read_records(write("params,tokens,loss\n1,,3\n"))
  with pytest.raises(records.RecordsError, match=r"line 2: column 'params'.*must be > 0"):
    records.read_records(write("params,tokens,loss\n-1,2,3\n"))
  with pytest.raises(records.RecordsError, match=r"no data rows"):
    records.read_records(write("params,tokens,loss\n"))
  with pytest.raises(records.RecordsError, match=r"line 2: column 'nonemb'.*non-numeric"):
    records.read_records(write("params,nonemb,tokens,loss\n5,x,2,3\n"), params_column="nonemb")
  rec = records.read_records(write("params,nonemb,tokens,loss,other\n5,4,2,3,zz\n"),
                             params_column="nonemb")
  assert rec["params"].tolist() == [4.0] and rec["run"].tolist() == ["line2"]
  assert "other" not in rec
  with pytest.raises(records.RecordsError, match=r"records, row 1: keys"):
    records.as_records([dict(params=1, tokens=2, loss=3), dict(params=1, tokens=2)])


def test_select():
  rec = records.as_records(dict(run=["a"] * 4 + ["b"] * 2, params=[1, 1, 1, 1, 2, 2],
                                tokens=[10, 50, 80, 100, 10, 20], loss=[5, 4, 3, 2, 5, 4]))
  assert records.select(rec, min_tokens=50)["tokens"].tolist() == [50, 80, 100]
  assert records.select(rec, min_fraction=0.5)["tokens"].tolist() == [50, 80, 100, 10, 20]
  assert records.select(rec, final_only=True)["tokens"].tolist() == [100, 20]
  assert records.select(rec, runs=["b"])["tokens"].tolist() == [10, 20]
  assert records.select(rec, exclude=["a"])["run"].tolist() == ["b", "b"]
  with pytest.raises(records.RecordsError, match="unknown run"):
    records.select(rec, runs=["zz"])


def test_are_and_naive_are_by_hand():
  tokens, actual = [10, 50, 80, 100], [4.0, 3.0, 2.5, 2.0]
  predicted = [3.0, 3.3, 2.4, 2.2]
  # Checkpoints at >= 70% of 100 tokens: |2.5-2.4|/2.5 = 0.04 and |2-2.2|/2 = 0.1.
  assert fit_lib.are(actual, predicted, tokens) == pytest.approx(0.07)
  assert fit_lib.are(actual, predicted, tokens, final_only=True) == pytest.approx(0.1)
  fitted = dict(run=["small", "small", "big", "big"], params=[1e6, 1e6, 1e7, 1e7],
                tokens=[10, 100, 10, 100], loss=[5.0, 4.0, 4.5, 3.0])
  target = dict(run=["t"] * 4, params=[1e8] * 4, tokens=tokens, loss=actual)
  # Largest model at 80 tokens: 4.5 + (ln 8 / ln 10) * (3.0 - 4.5) = 3.145365; at 100: 3.0.
  expected = ((3.145365 - 2.5) / 2.5 + (3.0 - 2.0) / 2.0) / 2
  assert fit_lib.naive_are(fitted, target) == pytest.approx(expected, abs=1e-6)


def test_compute_optimal_is_the_minimiser():
  p = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
  opt = forms.compute_optimal(p, [1e20, 1e22, 1e24])
  assert opt["a"] == pytest.approx(0.28 / 0.62)
  for c, n_star, d_star in zip(opt["compute"], opt["params"], opt["tokens"]):
    assert 6 * n_star * d_star == pytest.approx(c)
    lo, hi = math.log(1e3), math.log(1e16)  # golden-section search of L(N, C/6N) in log N
    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):
      u1, u2 = hi - g * (hi - lo), lo + g * (hi - lo)
      l1, l2 = (_law(p, math.exp(u), c / (6 * math.exp(u))) for u in (u1, u2))
      lo, hi = (lo, u2) if l1 < l2 else (u1, hi)
    assert math.exp((lo + hi) / 2) == pytest.approx(n_star, rel=1e-5)


def test_register_form():
  @forms.register_form("test_power", params=("a", "alpha"), inputs=("params",),
                       grid=dict(a=(0.0, 1.0), alpha=(0.1, 0.2, 0.3)))
  def power(p, x):
    """L(N) = A / N^alpha."""
    return p["a"] - p["alpha"] * x["params"]

  try:
    law = forms.get_form("test_power")
    assert law.grid_starts().shape == (6, 2) and law.doc == "L(N) = A / N^alpha."
    assert forms.natural_params(law, [0.0, 0.5]) == dict(A=1.0, alpha=0.5)
  finally:
    del forms.FORMS["test_power"]
  with pytest.raises(ValueError, match="grid keys"):
    forms.register_form("bad", params=("a",), inputs=("params",), grid=dict(b=(0.0,)))
  with pytest.raises(ValueError, match="unknown scaling-law form 'nope'"):
    forms.get_form("nope")


def _write_runs_csv(path):
  """8 runs x 20 checkpoints of a known chinchilla law with 0.2% noise."""
  law = dict(E=1.9, A=300.0, B=900.0, alpha=0.33, beta=0.3)
  rng = np.random.default_rng(3)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "step", "params", "tokens", "loss", "note"])
    for i, n in enumerate([2e6, 5e6, 1e7, 2e7, 5e7, 1e8, 2e8, 4e8]):
      for j, d in enumerate(np.geomspace(n, 20 * n, 20)):
        w.writerow([f"m{i}", j, n, d, _law(law, n, d) * math.exp(rng.normal(0, 2e-3)), "x"])
  return law


def test_cli_end_to_end(tmp_path, capsys):
  from tensorboard.backend.event_processing import event_accumulator

  path = str(tmp_path / "runs.csv")
  law = _write_runs_csv(path)
  out = str(tmp_path / "out")
  assert fit_cmd.main([f"--records={path}", "--target=m7", f"--bootstrap={N_BOOT}",
                       f"--out={out}"]) == 0
  text = capsys.readouterr()
  assert "target m7: ARE" in text.err and "compute-optimal" in text.err
  with open(os.path.join(out, "fit.json")) as f:
    res = json.load(f)
  line = json.loads(text.out)  # stdout: the one JSON summary line
  assert text.out.count("\n") == 1
  assert line["form"] == "chinchilla" and line["are"] == res["are"]
  assert line["params"] == res["params"]
  assert os.path.join(out, "fit.json") in line["wrote"]
  for key in ("form", "params", "objective", "intervals", "predictions", "are",
              "compute_optimal", "saturation", "n_points", "fit_runs"):
    assert key in res, key
  assert set(res["params"]) == {"E", "A", "B", "alpha", "beta"}
  assert "m7" not in res["fit_runs"] and res["n_points"] == 140
  assert res["params"]["alpha"] == pytest.approx(law["alpha"], abs=0.03)
  lo, hi = res["intervals"]["beta"]
  assert lo < res["params"]["beta"] < hi
  assert len(res["predictions"]) == 20
  assert all(p["lo"] <= p["loss_hat"] <= p["hi"] for p in res["predictions"])
  assert res["are"] < 0.01 and res["skill"] > 0.5
  assert res["compute_optimal"]["a"] == pytest.approx(
      res["params"]["beta"] / (res["params"]["alpha"] + res["params"]["beta"]))
  assert len(res["saturation"]["runs"]) == 7
  for name in ("loss_curves", "predicted_vs_actual", "compute_frontier", "saturation"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000
  acc = event_accumulator.EventAccumulator(os.path.join(out, "tensorboard"))
  acc.Reload()
  assert set(acc.Tags()["images"]) == {"fit/loss_curves", "fit/predicted_vs_actual",
                                       "fit/compute_frontier", "fit/saturation"}


def test_cli_errors(tmp_path, capsys):
  bad = tmp_path / "bad.csv"
  bad.write_text("params,tokens,loss\n1e6,1e9,2.5\n1e6,oops,2.4\n")
  assert fit_cmd.main([f"--records={bad}", f"--out={tmp_path / 'o'}"]) == 2
  err = capsys.readouterr().err
  assert "bad.csv, line 3: column 'tokens': non-numeric value 'oops'" in err
  rec = records.as_records(dict(run=["a", "b"], params=[1, 2], tokens=[3, 4], loss=[5, 6]))
  assert fitting.parse_target("b", rec) == ("run", "b")
  assert fitting.parse_target("1e9,2e10", rec) == ("point", (1e9, 2e10))
  with pytest.raises(ValueError, match="neither a run"):
    fitting.parse_target("zz", rec)


def test_fit_refuses_too_few_points_and_warns_near(tmp_path, capsys, caplog):
  rows = [(1e6 * (i + 1), 1e9 * (i + 1), 3.0 - 0.1 * i) for i in range(7)]
  two = tmp_path / "two.csv"
  two.write_text("params,tokens,loss\n" + "".join(
      f"{n},{d},{l}\n" for n, d, l in rows[:2]))
  seven = records.as_records(dict(params=[r[0] for r in rows],
                                  tokens=[r[1] for r in rows],
                                  loss=[r[2] for r in rows]))
  with caplog.at_level("WARNING", logger="llmlab"):
    fitting.check_identifiable(len(seven["loss"]), "chinchilla", "seven")
  assert "only 7 points for the 5 parameters" in caplog.text
  # (The command sets up logging, which removes caplog's handler: last.)
  assert fit_cmd.main([f"--records={two}", f"--out={tmp_path / 'o'}"]) == 2
  err = capsys.readouterr().err
  assert "2 points to fit the 5 parameters of form 'chinchilla'" in err
  assert not (tmp_path / "o" / "fit.json").exists()


def test_target_curve_plot_leaves_gaps_for_points_without_interval(tmp_path):
  """The curve design's plot: a point whose interval is missing (a NaN
  bootstrap quantile becomes None in study.json) is a gap in the band."""
  from llmlab.scaling import plots
  points = [dict(step=s, loss=3.0 - 0.1 * i, loss_hat=3.01 - 0.1 * i,
                 run_lo=None if i == 2 else 2.9 - 0.1 * i,
                 run_hi=None if i == 2 else 3.1 - 0.1 * i)
            for i, s in enumerate((10, 20, 30, 40))]
  family = {"a": (np.array([10, 20, 30, 40]), np.array([3.5, 3.3, 3.2, 3.1]), 1e4),
            "a_seed1": (np.array([10, 20, 30, 40]), np.array([3.5, 3.3, 3.2, 3.1]), 1e4)}
  fig = plots.target_curve(family, "t", points)
  paths = plots.save({"target_curve": fig}, str(tmp_path), prefix="study")
  assert paths == [str(tmp_path / "target_curve.png")]
  assert (tmp_path / "target_curve.png").stat().st_size > 1000
