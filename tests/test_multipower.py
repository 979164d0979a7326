"""The multi-power law of whole loss curves (Luo et al. 2025, arXiv:2503.12811):
its value against a direct sum, recovery of known laws, the authors' 25M split,
`llmlab fit --form=multipower`, curves from llmlab runs, bad input.

Fits share compiled programs by keeping data in one size bucket (257-512 rows,
8193-16384 drop blocks, 16 starts).
"""

import csv
import json
import os

import re

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from llmlab import config as config_lib
from llmlab import optim
from llmlab.commands import fit as fit_cmd
from llmlab.scaling import curves, fitting, forms
from llmlab.scaling import fit as fit_lib

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                    "data", "multipower")
FIT_RUNS = ("cosine_24000", "constant_24000", "wsdcon_9")  # the authors' split
TRUE = dict(L0=2.0, A=0.4, alpha=0.45, B=300.0, C=2.0, beta=0.6, gamma=0.6)


def direct_loss(p, eta_S, t_T):
  """The law summed term by term, O(T x S), independently of curves.py:
  L(t) = L0 + A P_t^-alpha - B sum_{k<=t} max(eta_{k-1} - eta_k, 0) G(eta_k^-gamma
  (P_t - P_{k-1})), P_t = eta_1 + ... + eta_t, eta_0 = 0."""
  p_S = np.concatenate([[0.0], np.cumsum(eta_S)])
  prev_S = np.concatenate([[0.0], eta_S[:-1]])
  out = []
  for t in t_T:
    k = np.arange(1, t + 1)
    drop = np.maximum(prev_S[k - 1] - eta_S[k - 1], 0.0)
    g = 1 - (1 + p["C"] * eta_S[k - 1] ** -p["gamma"] * (p_S[t] - p_S[k - 1])) ** -p["beta"]
    out.append(p["L0"] + p["A"] * p_S[t] ** -p["alpha"] - p["B"] * np.sum(drop * g))
  return np.array(out)


def schedule(kind, steps=6000, warm=300, peak=1e-3, low=1e-4):
  """Per-step rates (update s at index s - 1): linear warmup, then `kind`."""
  s = np.arange(1, steps + 1)
  cos = np.cos(np.pi * (s - warm) / (steps - warm))
  main = {"cosine": low + 0.5 * (peak - low) * (1 + cos),
          "constant": np.full(steps, peak),
          "wsd": np.where(s < 4800, peak, peak + (low - peak) * (s - 4800) / 1200),
          "step": np.where(s < 2400, peak, np.where(s < 4000, 0.3 * peak, 0.1 * peak))}[kind]
  return np.where(s <= warm, peak * s / warm, main)


def synthetic(kinds=("cosine", "constant", "wsd", "step"), p=TRUE, every=50, noise=0.0,
              seed=0, **kw):
  """Curves of the law with exact per-step rates ("eta"), logged every `every`."""
  rng = np.random.default_rng(seed)
  cols, eta = {k: [] for k in ("run", "step", "lr", "loss")}, {}
  for kind in kinds:
    eta[kind] = schedule(kind, **kw)
    t = np.arange(300, len(eta[kind]) + 1, every)
    loss = direct_loss(p, eta[kind], t) * np.exp(rng.normal(0, noise, len(t)))
    for row in zip([kind] * len(t), t, eta[kind][t - 1], loss):
      for k, v in zip(cols, row):
        cols[k].append(v)
  return dict(cols, eta=eta)


def log_params(p):
  return np.array([np.log(p["L0"]), np.log(p["A"]), p["alpha"], np.log(p["B"]),
                   np.log(p["C"]), p["beta"], p["gamma"]])


def law_at(p, table):
  return fit_lib.predict_curves(fit_lib.FitResult("multipower", log_params(p), 0.0, p, 0,
                                                  0, 0, True), table)


def test_tiny_schedule_by_hand():
  # Rates 1, 1, 0.5 (no warmup): P_3 = 2.5; one drop of 0.5 at step 3 with
  # S_3(3) = 0.5, so with gamma = C = beta = 1: G(0.5^-1 * 0.5) = 1 - 2^-1.
  # L(3) = 1 + 1 * 2.5^-1 - 1 * 0.5 * 0.5 = 1.15.
  p = dict(L0=1.0, A=1.0, alpha=1.0, B=1.0, C=1.0, beta=1.0, gamma=1.0)
  table = dict(run=["a"] * 3, step=[1, 2, 3], lr=[1.0, 1.0, 0.5], loss=[1.0] * 3,
               warmup_steps=[0] * 3)
  assert law_at(p, table) == pytest.approx([1 + 1.0, 1 + 0.5, 1.15], rel=1e-12)


def test_value_equals_direct_sum():
  # Every drop within NEAR steps of every point: the blocks are single steps,
  # so the form is the direct sum to rounding. Rates rise (warmup), then drop
  # at 4, 6, 7, 9, 10 to different levels.
  eta = np.array([0.2, 0.4, 0.4, 0.3, 0.3, 0.25, 0.1, 0.1, 0.08, 0.05])
  p = dict(L0=1.5, A=0.7, alpha=0.4, B=2.0, C=1.7, beta=0.6, gamma=0.5)
  t = np.arange(1, 11)
  table = dict(run=["a"] * 10, step=t, lr=eta, loss=np.ones(10), eta={"a": eta})
  assert law_at(p, table) == pytest.approx(direct_loss(p, eta, t), rel=1e-12)
  # Interpolated rows give the same rates when every step is a row.
  del table["eta"]
  table["warmup_steps"] = [1] * 10
  assert law_at(p, table) == pytest.approx(direct_loss(p, eta, t), rel=1e-12)


def test_blocks_approximate_the_direct_sum_on_long_cosine():
  """Far drops are grouped into blocks: 10^5 cosine steps at a cost of
  O(NEAR log t) blocks per point, within 2e-4 of the exact loss drop."""
  eta = schedule("cosine", steps=100_000, warm=1000, peak=3e-4, low=3e-5)
  t = np.arange(1000, 100_001, 9_900)
  point, drop, log_lr, lr_sum, log_lr_sum = curves.drop_blocks(eta, t)
  assert len(drop) < 15 * curves.NEAR * len(t)  # vs ~5e5 drop steps summed directly
  p = dict(TRUE, L0=0.0, A=0.0)
  g = drop * (1 - (1 + p["C"] * np.exp(-p["gamma"] * log_lr) * lr_sum) ** -p["beta"])
  ld = p["B"] * np.bincount(point, g, minlength=len(t))
  exact = -direct_loss(p, eta, t)
  assert ld == pytest.approx(exact, rel=2e-4)
  assert log_lr_sum == pytest.approx(np.log(np.cumsum(eta)[t - 1]), rel=1e-12)


@pytest.fixture(scope="module")
def recovered():
  return fit_lib.fit_law(synthetic(), "multipower")


def test_recovery_of_known_params(recovered):
  assert recovered.converged and recovered.n_starts == 16
  assert recovered.objective < 1e-8  # noise-free: only the blocks' ~1e-5 remain
  for k in ("L0", "A", "alpha"):
    assert recovered.params[k] == pytest.approx(TRUE[k], rel=1e-3), k
  for k in ("B", "C", "beta", "gamma"):  # the drop's flat valley: looser
    assert recovered.params[k] == pytest.approx(TRUE[k], rel=2e-2), k


def _data_table(size, runs=None):
  """The shared 25M/100M curves (Luo et al. 2025), warmup 2,160 steps."""
  cols = {k: [] for k in ("run", "step", "lr", "loss", "warmup_steps")}
  for name in sorted(os.listdir(os.path.join(DATA, size))):
    run = name[:-4]
    if runs is not None and run not in runs:
      continue
    with open(os.path.join(DATA, size, name)) as f:
      for r in csv.DictReader(f):
        for k, v in zip(cols, (run, r["step"], r["lr"], r["loss"], 2160)):
          cols[k].append(v)
  return curves.as_curves(cols)


@pytest.mark.skipif(not os.path.isdir(DATA), reason="needs ../shared/data/multipower")
def test_25m_split_reaches_the_goal():
  """Fit on the authors' three curves, predict their six others: mean relative
  error <= 0.2%, each schedule's worst averaged <= 1% (their 0.11% / 0.41%)."""
  table = _data_table("25M")
  fitted = fit_lib.fit_law(curves.select_runs(table, FIT_RUNS, max_step=24000),
                           "multipower")
  held = [r for r in curves.records_lib.run_names(table) if r not in FIT_RUNS]
  target = curves.select_runs(table, held)
  err = np.abs(fit_lib.predict_curves(fitted, target) / target["loss"] - 1)
  per_run = [err[target["run"] == r] for r in held]
  assert len(held) == 6 and fitted.converged
  assert np.mean([e.mean() for e in per_run]) <= 0.002
  assert np.mean([e.max() for e in per_run]) <= 0.01


def _write_curves(path, table, warmup=300, mode="w"):
  with open(path, mode, newline="") as f:
    w = csv.writer(f)
    if mode == "w":
      w.writerow(["run", "step", "lr", "loss", "warmup_steps"])
    for row in zip(table["run"], table["step"], table["lr"], table["loss"]):
      w.writerow(list(row) + [warmup])
  return str(path)


def test_cli_fit_and_predict(tmp_path, capsys):
  fit_table = synthetic(noise=1e-3)
  fit_csv = _write_curves(tmp_path / "fit.csv", fit_table)
  # Predicted: a longer cosine (extrapolation) and a WSD with another warmup.
  other = synthetic(("cosine",), steps=9000, seed=1)
  late = synthetic(("wsd",), warm=200, seed=2)
  late["run"] = ["wsd_w200"] * len(late["run"])
  _write_curves(tmp_path / "other.csv", other)
  _write_curves(tmp_path / "other.csv", late, warmup=200, mode="a")
  out = tmp_path / "out"
  assert fit_cmd.main(["--form=multipower", f"--records={fit_csv}",
                       f"--predict={tmp_path / 'other.csv'}", f"--out={out}",
                       "--bootstrap=10"]) == 0
  text = capsys.readouterr()
  assert "predict cosine (" in text.err and "predict wsd_w200 (" in text.err
  assert json.loads(text.out)["form"] == "multipower"
  assert "warning: predicting run 'cosine' is extrapolation: 9000 steps" in text.err
  assert "warning: predicting run 'wsd_w200' is extrapolation: warmup 200 steps" in text.err
  with open(out / "fit.json") as f:
    res = json.load(f)
  assert res["form"] == "multipower" and set(res["params"]) == set(TRUE)
  assert res["bootstrap"]["unit"] == "runs" and set(res["intervals"]) == set(TRUE)
  assert sorted(res["extrapolation"]) == ["cosine", "wsd_w200"]
  assert res["fit_runs"] == ["cosine", "constant", "wsd", "step"]
  with open(out / "predictions.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(fitting.PREDICTION_COLUMNS)
  assert len(rows) == len(other["run"]) + len(late["run"])
  assert [r["step"] for r in rows[:2]] == ["300", "350"]
  loss = np.array([float(r["loss"]) for r in rows])
  hat = np.array([float(r["loss_hat"]) for r in rows])
  lo, hi = (np.array([float(r[k]) for r in rows]) for k in ("obs_lo", "obs_hi"))
  assert np.all(lo <= hat) and np.all(hat <= hi)
  assert np.mean(np.abs(hat / loss - 1)) < 0.01
  assert res["mean_rel_error"] == pytest.approx(np.mean(
      [np.mean(np.abs(hat / loss - 1)[:len(other["run"])]),
       np.mean(np.abs(hat / loss - 1)[len(other["run"]):])]))


SIZE_K = dict(k_l0=-0.08, k_a=0.1, k_alpha=-0.08, k_b=0.13)


def sized(n):
  """TRUE at N_REF, with L0, A, alpha and B scaled as (N / N_REF)^k."""
  scale = {name: (n / forms.N_REF) ** SIZE_K["k_" + name.lower()]
           for name in ("L0", "A", "alpha", "B")}
  return {name: v * scale.get(name, 1.0) for name, v in TRUE.items()}


def test_multipower_n_recovers_size_laws():
  """Two sizes, L0, A, alpha, B power laws in N, C, beta, gamma shared: from one
  start away from the truth the joint fit recovers every parameter."""
  tables = []
  for n in (25e6, 100e6):
    t = synthetic(("cosine", "constant", "step"), p=sized(n), every=100)
    t["run"] = [f"{r}_{n:.0e}" for r in t["run"]]
    t["eta"] = {f"{r}_{n:.0e}": v for r, v in t["eta"].items()}
    tables.append(dict(t, params=[n] * len(t["run"])))
  both = {c: sum((list(t[c]) for t in tables), []) for c in ("run", "step", "lr", "loss",
                                                              "params")}
  both["eta"] = {**tables[0]["eta"], **tables[1]["eta"]}
  start = dict(zip(forms.get_form("multipower").params, log_params(TRUE) * 1.1),
               k_l0=0.0, k_a=0.0, k_alpha=0.0, k_b=0.0)
  res = fit_lib.fit_law(both, "multipower_n", init=start)
  assert res.converged and res.objective < 1e-8
  for name, v in dict(TRUE, **SIZE_K).items():
    assert res.params[name] == pytest.approx(v, rel=3e-2, abs=2e-3), name
  # A bigger model's curve: predicted, and flagged as outside the fitted sizes.
  eta = schedule("cosine")
  bigger = dict(run=["big"] * 2, step=[300, 6000], lr=eta[[299, 5999]], params=[4e8] * 2,
                eta={"big": eta})
  assert fit_lib.predict_curves(res, bigger) == pytest.approx(
      direct_loss(sized(4e8), eta, np.array([300, 6000])), rel=2e-3)
  why = curves.extrapolation(curves.as_curves(both),
                             curves.as_curves(bigger, need_loss=False))
  assert why == {"big": ["4e+08 params outside the fitted [2.5e+07, 1e+08]"]}


def _run_dir(tmp_path, name="r1", schedule_kind="wsd", steps=200):
  """A run directory as llmlab train writes one: config.json, metrics.jsonl."""
  cfg = config_lib.to_dict(config_lib.base())
  cfg["train"].update(steps=steps, learning_rate=1e-3, log_every=10, eval_every=50)
  cfg["optim"].update(schedule=schedule_kind, warmup_steps=20, decay_fraction=0.3)
  cfg["model_info"] = {"params_total": 12345, "params_nonembed": 6789}
  wd = tmp_path / name
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps(cfg))
  lr = optim.schedule(ConfigDict(cfg["optim"]), 1e-3, steps)
  with open(wd / "metrics.jsonl", "w") as f:
    for s in range(10, steps + 1, 10):
      f.write(json.dumps({"step": s, "loss": 5.0 - s / 100,
                          "learning_rate": float(lr(s - 1))}) + "\n")
      if s % 50 == 0:
        f.write(json.dumps({"step": s, "eval_loss": 5.1 - s / 100}) + "\n")
  return str(wd), lr


def test_curves_from_runs_use_the_config_schedule(tmp_path):
  wd, lr = _run_dir(tmp_path)
  table = curves.curves_from_runs([wd])
  exact = np.asarray(lr(jnp.arange(200)), np.float64)  # update s uses count s - 1
  assert table["eta"]["r1"] == pytest.approx(exact, rel=1e-6, abs=0)
  assert table["step"].tolist() == [50, 100, 150, 200]
  assert table["lr"].tolist() == table["eta"]["r1"][[49, 99, 149, 199]].tolist()
  assert table["loss"].tolist() == pytest.approx([4.6, 4.1, 3.6, 3.1])
  assert table["params"].tolist() == [12345] * 4
  assert table["warmup_steps"].tolist() == [20] * 4  # config.json's, not the first row's
  train = curves.curves_from_runs([wd], loss="train", params_key="params_nonembed")
  assert train["step"].tolist() == list(range(9, 200, 10))  # measured before update s
  assert train["params"][0] == 6789
  # A logged rate the config does not give (its config was edited), a step past
  # the config's schedule: named by file and line.
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 200, "loss": 1.0, "learning_rate": 0.5}) + "\n")
  with pytest.raises(curves.RecordsError, match=r"metrics\.jsonl, line 25: learning_rate "
                                                r"0\.5 differs"):
    curves.curves_from_runs([wd], loss="train")
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 250, "eval_loss": 1.0}) + "\n")
  with pytest.raises(curves.RecordsError, match=r"line 26: step 250 is past the 200 steps"):
    curves.curves_from_runs([wd])


@pytest.mark.parametrize("text, message", [
    ("run,step,loss\na,1,3\n", r"c\.csv, line 1 \(header\): missing required column\(s\) "
                               r"\['lr'\]"),
    ("run,step,lr,loss\na,1,1e-3,3\na,3,1e-3,2.9\na,2,1e-3,2.8\n",
     r"c\.csv, line 4, run 'a': step 2 does not increase on the run's previous row "
     r"\(.*c\.csv, line 3, run 'a', step 3\)"),
    ("run,step,lr,loss\na,1,1e-3,3\nb,2,-1e-3,2.9\n",
     r"c\.csv, line 3, run 'b': column 'lr': value '-1e-3' must be >= 0"),
    ("run,step,lr,loss\na,1,inf,3\n", r"c\.csv, line 2, run 'a': column 'lr': non-finite"),
    ("run,step,lr,loss\na,1,1e-3,nan\n",
     r"c\.csv, line 2, run 'a': column 'loss': non-finite"),
    ("run,step,lr,loss\na,1,1e-3,-3\n", r"c\.csv, line 2, run 'a': column 'loss': value "
                                        r"'-3' must be > 0"),
    ("run,step,lr,loss\n" + "".join(f"a,{s},1e-3,3\n" for s in range(1, 9)) +
     "b,1,1e-3,3\nb,2,1e-3,3\nb,3,1e-3,3\n",
     r"c\.csv, line 12, run 'b': the run has 3 rows \(last shown\), fewer than form "
     r"'multipower''s 7 parameters"),
])
def test_bad_curves_fail_before_fitting(tmp_path, capsys, text, message):
  path = tmp_path / "c.csv"
  path.write_text(text)
  assert fit_cmd.main(["--form=multipower", f"--records={path}",
                       f"--out={tmp_path / 'o'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("llmlab fit: error: ") and len(err.splitlines()) == 1
  assert re.search(message, err), err
  assert not (tmp_path / "o").exists()


def test_bad_predict_file_and_flags_fail_before_fitting(tmp_path, capsys):
  good = _write_curves(tmp_path / "fit.csv", synthetic(("constant",), every=500))
  bad = tmp_path / "p.csv"
  bad.write_text("run,step,lr\nx,5,1e-3\nx,5,1e-3\n")
  assert fit_cmd.main(["--form=multipower", f"--records={good}", f"--predict={bad}"]) == 2
  assert "p.csv, line 3, run 'x': step 5 does not increase" in capsys.readouterr().err
  assert fit_cmd.main(["--form=multipower_n", f"--records={good}"]) == 2
  assert "needs each run's model size: a `params` column" in capsys.readouterr().err
  assert fit_cmd.main(["--form=multipower", f"--records={good}", "--target=a"]) == 2
  assert "--target not used by --form=multipower" in capsys.readouterr().err
  # --predict works for every form; a records form needs its own columns.
  assert fit_cmd.main(["--form=chinchilla", f"--records={good}", f"--predict={bad}"]) == 2
  assert "missing required column(s) ['params', 'tokens']" in capsys.readouterr().err
  assert fit_cmd.main(["--form=chinchilla", f"--records={good}", "--max_step=5"]) == 2
  assert "--max_step not used by --form=chinchilla" in capsys.readouterr().err
