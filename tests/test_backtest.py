"""`llmlab backtest`, the repeated-data forms and `llmlab fit --predict`.

Families are drawn from known laws (so the right answer is known), plus a
sample of a published family (tests/data/README.md).
"""

import csv
import json
import os

import numpy as np
import pytest
from absl import flags

from llmlab import main as main_lib
from llmlab.scaling import backtest
from llmlab.scaling import backtest_report
from llmlab.scaling import fit as fit_lib
from llmlab.commands import backtest as backtest_cmd
from llmlab.commands import fit as fit_cmd
from llmlab.scaling import forms, records
from tests.helpers import TESTS

SAMPLE = os.path.join(TESTS, "data", "datablations_c4_sample.csv")
LAWS = {"fam_a": dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28),
        "fam_b": dict(A=600.0, B=900.0, E=2.1, alpha=0.36, beta=0.31)}


def _family_rows(name, law, sizes=(2e7, 6e7, 2e8, 6e8, 2e9), checkpoints=8, noise=0.0,
                 seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for n in sizes:
    for d in np.geomspace(1e9, 3e10, checkpoints):
      loss = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
      rows.append(dict(family=name, run=f"{name}_n{n:.0e}", params=n, tokens=d,
                       loss=loss * np.exp(noise * rng.standard_normal())))
  return rows


def _write(path, rows, columns=None):
  columns = columns or list(rows[0])
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
  return str(path)


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
  d = tmp_path_factory.mktemp("bt")
  rows = _family_rows("fam_a", LAWS["fam_a"]) + _family_rows("fam_b", LAWS["fam_b"])
  rows += [dict(family="lonely", run="one", params=1e8, tokens=t, loss=3.0)
           for t in (1e9, 2e9)]
  path = _write(d / "runs.csv", rows)
  out = d / "out"
  assert main_lib.main(["backtest", f"--records={path}", f"--out={out}",
                        "--starts=32", "--polish_evals=400"]) == 0  # the format, not convergence
  return path, out


def test_backtest_writes_the_grid_summary_heatmaps_and_report(two_families, capsys):
  _, out = two_families
  grid = list(csv.DictReader(open(out / "grid.csv")))
  assert list(grid[0])[:10] == ["family", "target", "design", "checkpoints", "n_models",
                                "fraction", "min_tokens", "compute_fraction", "are",
                                "n_points"]
  fam_a = [r for r in grid if r["family"] == "fam_a"]
  # 5 sizes: k = 2..4 smallest and closest (x 10 fractions x (2 cuts + final))
  # and two borrowed designs (x 10 x 2).
  assert len(fam_a) == 6 * 10 * 3 + 2 * 10 * 2
  assert {r["target"] for r in fam_a} == {"fam_a_n2e+09"}
  assert {r["design"] for r in fam_a} == {"smallest", "closest", "borrow_exponents",
                                          "borrow_a_alpha"}
  # Noise-free data from the law itself: full-data cells predict the target.
  full = [float(r["are"]) for r in fam_a if r["fraction"] == "1.0"
          and r["checkpoints"] == "all" and r["design"] in ("smallest", "closest")]
  assert min(full) < 1e-3
  # Fits to the law's own noise-free points have a finite minimum: bounded.
  assert {r["bounded"] for r in fam_a if r["are"] and r["checkpoints"] == "all"
          and r["fraction"] == "1.0"} == {"1"}
  # Pinned by their points: never with 2 sizes (E + A/N^alpha seen at two N),
  # always with all 4 and every checkpoint.
  assert {r["identified"] for r in fam_a if r["are"] and r["n_models"] == "2"
          and r["design"] in ("smallest", "closest")} == {"0"}
  assert {r["identified"] for r in fam_a if r["are"] and r["n_models"] == "4"
          and r["checkpoints"] == "all"} == {"1"}
  summary = json.loads(open(out / "summary.json").read())
  assert set(summary) >= {"families", "n_fits", "seconds"}
  assert set(summary["families"]) == {"fam_a", "fam_b"}
  s = summary["families"]["fam_a"]
  assert set(s) >= {"target", "best", "cheapest", "n_fits", "fit_seconds", "n_unbounded"}
  assert s["n_unbounded"] == sum(r["are"] != "" and r["bounded"] == "0" for r in fam_a)
  assert s["n_unidentified"] == sum(r["are"] != "" and r["identified"] == "0" for r in fam_a)
  assert set(s["cheapest"]) == {"0.04", "0.10", "0.20"}
  assert s["best"]["are"] == min(float(r["are"]) for r in fam_a if r["are"])
  cheap = s["cheapest"]["0.04"]
  assert cheap["are"] <= 0.04 and cheap["compute_fraction"] == min(
      float(r["compute_fraction"]) for r in fam_a if r["are"] and float(r["are"]) <= 0.04)
  # The same answers among the fits their points pin: every 2-size cell
  # is out, so the best pinned cell is one of more sizes.
  pinned = [r for r in fam_a if r["are"] and r["identified"] == "1" and r["bounded"] == "1"]
  assert s["best_identified"]["are"] == min(float(r["are"]) for r in pinned)
  assert s["best_identified"]["identified"] == 1 and s["best_identified"]["n_models"] > 2
  for t, c in s["cheapest_identified"].items():
    ok = [float(r["compute_fraction"]) for r in pinned if float(r["are"]) <= float(t)]
    assert (c is None) == (not ok) and (c is None or c["compute_fraction"] == min(ok))
  # Borrowed exponents are the other family's (the only other one).
  b = s["borrowed"]["borrow_exponents"]
  assert abs(b["alpha"] - LAWS["fam_b"]["alpha"]) < 0.02
  assert summary["n_fits"] == sum(f["n_fits"] for f in summary["families"].values())
  assert "lonely" in " ".join(summary["skipped"])
  report = open(out / "report.md").read()
  assert "## fam_a" in report and "closest-in-scale" in report
  # each check gives the median ARE of both sides beside the means
  checks = [c for c in s["checks"].values() if c]
  assert checks and all(c["median_first"] <= max(
      float(r["are"]) for r in fam_a if r["are"]) for c in checks)
  assert report.count("median ARE") == sum(
      bool(c) for f in summary["families"].values() for c in f["checks"].values())
  assert os.path.getsize(out / "heatmap_fam_a.png") > 10_000


def _families_with(rows):
  return {f.name: f for f in backtest.families(
      records.as_records({k: [r[k] for r in rows] for k in rows[0]}))}


def _full_fit(fam, form):
  """A family's full fit, as `borrowed_values` makes it: (theta_1xP, its x)."""
  pool = backtest._pool(fam)
  cell = backtest.Cell("full", "all", len(fam.sizes), 1.0, fam.min_tokens,
                       tuple(records.run_names(pool)))
  weights = backtest.cell_weights(pool, [cell])
  theta, _, _ = backtest.fit_cells(form, pool, [cell], weights, 32, polish_evals=400)
  return theta, {k: v[weights[0] > 0] for k, v in fit_lib.log_inputs(pool, form).items()}


def test_a_fit_with_a_runaway_or_negative_exponent_is_not_lent():
  # fam_c's loss rises with training (heavy repetition, say): a Chinchilla
  # fit can only follow it with beta <= 0 or by running off, and a law that
  # borrowed that would predict losses growing with data. The others borrow
  # from fam_b alone; fam_c still borrows the others' median.
  law = LAWS["fam_a"]
  fams = _families_with(
      _family_rows("fam_a", law) + _family_rows("fam_b", LAWS["fam_b"]) +
      [dict(family="fam_c", run=f"c{n:.0e}", params=n, tokens=d,
            loss=law["E"] + law["A"] / n ** law["alpha"] + 0.05 * np.log(d / 1e9))
       for n in np.geomspace(2e7, 2e9, 5) for d in np.geomspace(1e9, 3e10, 8)])
  form = forms.get_form("chinchilla")
  theta, _ = _full_fit(fams["fam_c"], form)
  beta = theta[0][form.params.index("beta")]
  assert beta <= 0 or not backtest.bounded(form, theta)[0]  # so: not lent
  lent = backtest.borrowed_values(form, list(fams.values()), 32, fit_lib.DELTA,
                                  polish_evals=400)
  b = lent["fam_a"]["borrow_exponents"]
  assert abs(b["alpha"] - LAWS["fam_b"]["alpha"]) < 0.02  # fam_b's, no median with fam_c
  assert abs(b["beta"] - LAWS["fam_b"]["beta"]) < 0.02
  assert set(lent["fam_c"]) == {"borrow_exponents", "borrow_a_alpha"}


def test_a_fit_its_points_do_not_pin_is_not_lent():
  # fam_d: final losses, every size at the same 1e10 tokens: its points see
  # only b - beta ln D, so beta stays wherever the fit started. It stays
  # bounded with beta > 0; the Jacobian's rank is what says so.
  law = LAWS["fam_a"]
  fams = _families_with(
      _family_rows("fam_b", LAWS["fam_b"]) +
      [dict(family="fam_d", run=f"d{n:.0e}", params=n, tokens=1e10,
            loss=law["E"] + law["A"] / n ** law["alpha"] + law["B"] / 1e10 ** law["beta"])
       for n in np.geomspace(2e7, 2e9, 9)])
  form = forms.get_form("chinchilla")
  theta, x = _full_fit(fams["fam_d"], form)
  assert backtest.bounded(form, theta)[0] and not fit_lib.identified(form, theta[0], x)
  theta_b, x_b = _full_fit(fams["fam_b"], form)
  assert fit_lib.identified(form, theta_b[0], x_b)
  lent = backtest.borrowed_values(form, list(fams.values()), 32, fit_lib.DELTA,
                                  polish_evals=400)
  assert "fam_b" not in lent and set(lent["fam_d"]) == {"borrow_exponents", "borrow_a_alpha"}


def test_a_family_of_final_losses_only_says_why_nothing_was_fitted(tmp_path):
  # 5 sizes, one point each: every cell has fewer points than the law's 5
  # parameters. The report says so instead of "none reaches" a threshold.
  rows = [r for r in _family_rows("fam_a", LAWS["fam_a"]) if r["tokens"] == 3e10]
  out = tmp_path / "out"
  assert main_lib.main(["backtest", f"--records={_write(tmp_path / 'f.csv', rows)}",
                        f"--out={out}"]) == 0
  report = open(out / "report.md").read()
  assert "No cell is identified" in report and "Best:" not in report
  assert json.loads(open(out / "summary.json").read())["families"]["fam_a"]["n_fits"] == 0


def test_family_with_one_size_is_skipped_with_one_line(tmp_path, capsys):
  rows = _family_rows("fam_a", LAWS["fam_a"], sizes=(2e7, 6e7, 2e8), checkpoints=6)
  rows += [dict(family="lonely", run="one", params=1e8, tokens=t, loss=3.0)
           for t in (1e9, 2e9)]
  path = _write(tmp_path / "r.csv", rows)
  assert main_lib.main(["backtest", f"--records={path}", f"--out={tmp_path / 'o'}",
                        "--starts=16"]) == 0
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if "lonely" in l]
  assert len(lines) == 1 and "skipped" in lines[0] and "1 model size" in lines[0]


def test_a_cell_fit_equals_fitting_its_rows_alone():
  """Masked rows in the vmapped call == the cell's rows fitted by fit_law."""
  rec = records.as_records(_family_rows("f", LAWS["fam_a"], noise=0.01, seed=3))
  fam = backtest.families(rec)[0]
  cells = [c for c in backtest.plan_cells(fam, None) if c.design == "closest" and
           c.n_models == 3 and c.fraction == 0.6 and c.checkpoints == "all"]
  pool = backtest._pool(fam)  # pylint: disable=protected-access
  w = backtest.cell_weights(pool, cells)
  law = forms.get_form("chinchilla")
  theta, obj, n = backtest.fit_cells(law, pool, cells, w, 64)
  for c, th, f, k, wg in zip(cells, theta, obj, n, w):
    rows = records.take(pool, wg > 0)
    assert k == len(rows["loss"])
    ll = np.log(rows["loss"])[None]
    _, f_alone, _, _ = fit_lib.minimize(
        law, backtest.starts(law, 64)[None], np.ones_like(ll),
        fit_lib.log_inputs(rows, law), ll, keep=2, polish=backtest.POLISH, fast=True)
    assert abs(f - f_alone.min()) <= 1e-4 * f  # the same fit, masked or alone
    best = fit_lib.fit_law(rows)  # 4,500 starts, tight polish: within 0.5%
    assert best.objective <= f <= best.objective * 1.005
  cut = [c for c in cells if c.min_tokens > 0][0]
  kept = records.take(pool, w[cells.index(cut)] > 0)
  assert kept["tokens"].min() >= fam.min_tokens


def test_more_polish_converges_more_fits():
  """--polish_evals: the default polish ends cells of few noisy points lower
  than a short one (which stops lanes still crawling), and none materially
  higher (a lane's path can fork at rounding level)."""
  rec = records.as_records(_family_rows("f", LAWS["fam_a"], noise=0.005, seed=1,
                                        sizes=np.geomspace(1e7, 3e9, 7)))
  fam = backtest.families(rec)[0]
  cells = [c for c in backtest.plan_cells(fam, None) if c.design == "closest"]
  pool = backtest._pool(fam)  # pylint: disable=protected-access
  w = backtest.cell_weights(pool, cells)
  law = forms.get_form("chinchilla")
  _, short, _ = backtest.fit_cells(law, pool, cells, w, 32, polish_evals=200)
  _, default, _ = backtest.fit_cells(law, pool, cells, w, 32)
  ok = np.isfinite(short)
  assert ok.sum() >= 100 and np.array_equal(ok, np.isfinite(default))
  assert np.sum(default[ok] < short[ok] * (1 - 1e-6)) >= 5
  assert np.all(default[ok] <= short[ok] * (1 + 1e-3)) and default[ok].sum() < short[ok].sum()
  fv = flags.FlagValues()  # the command's defaults are the library's
  backtest_cmd.define(fv)
  assert (fv["keep"].default, fv["polish_evals"].default) == (
      backtest.KEEP, backtest.POLISH.max_evals)


def test_bounded_flags_fits_that_ran_off_the_grid_of_starts():
  """A fit with E -> 0 (e ~ -100) or an exponent of 13 lies outside the form's
  grid of starts widened by its span; Hoffmann et al.'s values lie inside.
  An axis the grid holds at one value (data_repeat's kappa) is widened by 1."""
  law = forms.get_form("chinchilla")
  hoffmann = [np.log(406.4), np.log(410.7), np.log(1.69), 0.34, 0.28]
  theta = np.array([hoffmann, [5.7, 6.2, -95.0, 0.3, 0.3], [5.7, 256.7, 0.3, 0.26, 13.6],
                    [np.nan] * 5])
  assert backtest.bounded(law, theta).tolist() == [True, False, False, False]
  repeat = forms.get_form("data_repeat")
  mid = repeat.grid_starts().mean(0)
  kappa = repeat.params.index("kappa")
  assert backtest.bounded(repeat, np.stack([mid, mid + 0.9 * np.eye(len(mid))[kappa],
                                            mid + 2 * np.eye(len(mid))[kappa]])
                          ).tolist() == [True, True, False]
  cell = dict(design="closest", n_models=2, fraction=0.5, min_tokens=0.0,
              checkpoints="final", are=0.3, compute_fraction=0.01)
  assert "not identified" in backtest_report._cell_line(dict(cell, bounded=0))
  assert "not identified" not in backtest_report._cell_line(dict(cell, bounded=1))


def test_min_tokens_is_scaled_to_short_families():
  assert backtest.min_tokens_cut([3e11, 3e11]) == 1e10
  assert backtest.min_tokens_cut([3e12]) == 1e10
  assert backtest.min_tokens_cut([3e9, 6e9, 9e9]) == pytest.approx(6e9 / 30)


def test_fixing_holds_borrowed_parameters():
  law = forms.get_form("chinchilla")
  rec = records.as_records(_family_rows("f", LAWS["fam_b"], noise=0.0))
  x = fit_lib.log_inputs(rec, law)
  ll = np.log(rec["loss"])[None]
  fixed = [{"alpha": 0.2, "beta": 0.5}, {}]
  starts = np.broadcast_to(law.grid_starts()[:64], (2, 64, 5))
  th, _, _, _ = fit_lib.minimize(law, starts, np.ones((2, len(ll[0]))), x,
                                 np.repeat(ll, 2, 0), keep=2,
                                 affine=fit_lib.fixing(law, fixed))
  p = dict(zip(law.params, th[0, 0]))
  assert p["alpha"] == 0.2 and p["beta"] == 0.5
  free = dict(zip(law.params, th[1, 0]))
  assert abs(free["alpha"] - LAWS["fam_b"]["alpha"]) < 1e-3


def test_bad_cells_fail_with_file_line_column_and_write_nothing(tmp_path, capsys):
  rows = _family_rows("f", LAWS["fam_a"], sizes=(2e7, 6e7, 2e8), checkpoints=4)
  for bad, text in (("nan", "non-finite value 'nan'"), ("-2", "must be > 0"),
                    ("abc", "non-numeric value 'abc'")):
    rows[5]["loss"] = bad
    path = _write(tmp_path / "bad.csv", rows)
    out = tmp_path / "o"
    assert main_lib.main(["backtest", f"--records={path}", f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 7" in err and "'loss'" in err, err
    assert text in err and str(path) in err
    assert not out.exists()


def test_data_constrained_without_unique_tokens_names_file_and_column(tmp_path, capsys):
  path = _write(tmp_path / "r.csv", _family_rows("f", LAWS["fam_a"], checkpoints=4))
  for argv in (["fit", "--form=data_constrained", f"--records={path}"],
               ["backtest", "--form=data_repeat", f"--records={path}"]):
    assert main_lib.main(argv + [f"--out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "unique_tokens" in err
    assert not (tmp_path / "o").exists()


def test_study_workdir_is_one_family_with_its_target(tmp_path):
  rows = _family_rows("x", LAWS["fam_a"], sizes=(2e7, 6e7, 2e8, 6e8), checkpoints=5)
  for r in rows:
    r.pop("family")
    r["role"] = "target" if r["params"] == 2e8 else "family"
  study = tmp_path / "mystudy"
  study.mkdir()
  _write(study / "records.csv", rows)
  rec = backtest.study_records(str(study))
  fam = backtest.families(rec)[0]
  assert fam.name == "mystudy" and fam.target_runs == ["x_n2e+08"]
  assert fam.sizes == [2e7, 6e7]  # below the target only
  assert main_lib.main(["backtest", f"--study={study}", f"--out={tmp_path / 'o'}",
                        "--starts=16"]) == 0
  assert (tmp_path / "o" / "grid.csv").exists()


# ----------------------------------------------------------------------------
# Repeated data.


def _dc_rows(law, p, sizes=(1e8, 3e8, 1e9), budgets=(1, 2, 4, 8, 16, 40)):
  rows = []
  for n in sizes:
    d_total = 20 * n
    for ep in budgets:
      u = d_total / ep
      for d in np.geomspace(d_total / 20, d_total, 10):
        rows.append(dict(run=f"n{n:.0e}_ep{ep}", params=n, tokens=d, unique_tokens=u,
                         epochs=ep))
  rec = {k: np.array([r[k] for r in rows]) for k in rows[0]}
  theta = np.array([p[k] for k in law.params])
  rec["loss"] = np.exp(fit_lib.predict_log(law, theta[None], fit_lib.log_inputs(
      rec, law))[0])
  return rec


def test_data_constrained_is_chinchilla_without_repetition():
  law = forms.get_form("data_constrained")
  p = dict(a=6.0, b=6.0, e=0.5, alpha=0.34, beta=0.28, log_r_d=np.log(15.0),
           log_r_n=np.log(5.0))
  n, d = np.array([1e7, 1e8]), np.array([2e9, 1e10])  # N below N*(D): 7.7e7, 2.8e8
  x = {"params": np.log(n), "tokens": np.log(d), "unique_tokens": np.log(d)}
  chin = np.exp(6.0) / n ** 0.34 + np.exp(6.0) / d ** 0.28 + np.exp(0.5)
  # U = D: D' = D; N below N*(U): N' = N.
  got = np.exp(fit_lib.predict_log(law, np.array([[p[k] for k in law.params]]), x)[0])
  np.testing.assert_allclose(got, chin, rtol=1e-12)
  # Repeating the same D over fewer unique tokens can only raise the loss.
  x["unique_tokens"] = np.log(d / 8)
  worse = np.exp(fit_lib.predict_log(law, np.array([[p[k] for k in law.params]]), x)[0])
  assert np.all(worse > chin)


def test_data_repeat_recovers_a_law_whose_loss_rises_under_repetition():
  law = forms.get_form("data_repeat")
  p = dict(a=6.0, b=6.5, e=0.5, alpha=0.34, beta=0.28, log_r_d=np.log(15.0),
           log_r_n=np.log(5.0), c=-7.0, kappa=0.5, gamma=1.5)
  rec = _dc_rows(law, p)
  ep40 = (rec["epochs"] == 40) & (rec["params"] == 1e9)
  assert rec["loss"][ep40][-1] > rec["loss"][ep40].min()  # it does rise
  res = fit_lib.fit_law(rec, "data_repeat")
  held = records.as_records(_dc_rows(law, p, sizes=(3e9,)))
  pred = fit_lib.predict(res, params=held["params"], tokens=held["tokens"],
                         unique_tokens=held["unique_tokens"])
  assert np.max(np.abs(pred - held["loss"]) / held["loss"]) < 2e-3
  # data_constrained cannot follow the rise: its worst held-out error is larger.
  dc = fit_lib.fit_law(rec, "data_constrained")
  dc_pred = fit_lib.predict(dc, params=held["params"], tokens=held["tokens"],
                            unique_tokens=held["unique_tokens"])
  assert np.max(np.abs(dc_pred - held["loss"]) / held["loss"]) > 0.01


def test_repeated_data_forms_on_a_published_family():
  """Muennighoff et al.'s C4 runs (sample): fitted on 2.8B and 4.2B, the
  8.7B 44-epoch run -- whose loss rises after ~17 epochs -- is predicted far
  better by data_repeat than by a law that ignores repetition."""
  rec = records.read_records(SAMPLE)
  small = records.take(rec, (rec["params"] < 8e9) & (rec["tokens"] >= 1e10))
  m = rec["run"] == "8.7B_U4.05B_44ep"
  errs = {}
  for form in ("chinchilla", "data_repeat"):
    res = fit_lib.fit_law(small, form)
    pred = fit_lib.predict(res, params=rec["params"][m], tokens=rec["tokens"][m],
                           unique_tokens=rec["unique_tokens"][m])
    errs[form] = fit_lib.are(rec["loss"][m], pred, rec["tokens"][m])
  assert errs["data_repeat"] < 0.05 < errs["chinchilla"], errs


# ----------------------------------------------------------------------------
# llmlab fit --predict for every form.


def test_fit_predict_writes_every_row_for_records_forms(tmp_path):
  rows = _family_rows("f", LAWS["fam_a"], noise=0.002, checkpoints=6)
  fit_csv = _write(tmp_path / "fit.csv", rows)
  pts = [dict(name="p1", params=1e10, tokens=2e11, note="x"),
         dict(name="p2", params=3e10, tokens=6e11, note="y")]
  pred_csv = _write(tmp_path / "pred.csv", pts)
  out = tmp_path / "out"
  assert fit_cmd.main([f"--records={fit_csv}", f"--predict={pred_csv}", f"--out={out}",
                       "--bootstrap=20"]) == 0
  got = list(csv.DictReader(open(out / "predictions.csv")))
  assert [r["name"] for r in got] == ["p1", "p2"] and got[0]["note"] == "x"
  fit = json.loads(open(out / "fit.json").read())
  law = LAWS["fam_a"]
  for r in got:
    n, d = float(r["params"]), float(r["tokens"])
    truth = law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]
    assert abs(float(r["loss_hat"]) - truth) / truth < 0.01
    assert float(r["loss_lo"]) <= float(r["loss_hat"]) <= float(r["loss_hi"])
  assert fit["n_predicted"] == 2


def test_fit_predict_scores_held_out_runs_that_have_losses(tmp_path):
  # Held-out runs with their losses: each scored as a target is (checkpoints
  # at >= 70% of its tokens), with the mean and the worst over runs.
  law = LAWS["fam_a"]
  rows = _family_rows("f", law, sizes=(2e7, 6e7, 2e8), checkpoints=6)
  held = [dict(r, loss=r["loss"] * (1.02 if r["params"] == 6e9 else 1.0))
          for r in _family_rows("f", law, sizes=(2e9, 6e9), checkpoints=5)]
  held.append(dict(held[-1], run="not_yet_run", loss=""))  # a point to predict only
  out = tmp_path / "out"
  assert fit_cmd.main([f"--records={_write(tmp_path / 'fit.csv', rows)}",
                       f"--predict={_write(tmp_path / 'held.csv', held)}", f"--out={out}",
                       "--bootstrap=0"]) == 0
  pa = json.loads(open(out / "fit.json").read())["predict_are"]
  assert set(pa["runs"]) == {"f_n2e+09", "f_n6e+09"}  # not the run without a loss
  assert pa["runs"]["f_n2e+09"] < 1e-3  # the law's own points
  assert abs(pa["runs"]["f_n6e+09"] - 0.02 / 1.02) < 2e-3  # 2% above the law
  assert pa["worst_run"] == "f_n6e+09" and pa["mean"] == pytest.approx(
      np.mean(list(pa["runs"].values())))
  got = list(csv.DictReader(open(out / "predictions.csv")))
  assert got[-1]["run"] == "not_yet_run" and float(got[-1]["loss_hat"]) > 0
  late = [r for r in got if r["run"] == "f_n6e+09" and float(r["tokens"]) >= 0.7 * 3e10]
  assert pa["runs"]["f_n6e+09"] == pytest.approx(np.mean(
      [abs(float(r["loss"]) - float(r["loss_hat"])) / float(r["loss"]) for r in late]))


def test_fit_predict_data_constrained_needs_unique_tokens_in_the_predict_file(tmp_path,
                                                                              capsys):
  rec = records.read_records(SAMPLE)
  keep = rec["params"] < 8e9
  rows = [dict(run=r, params=n, tokens=t, loss=l, unique_tokens=u) for r, n, t, l, u in
          zip(rec["run"][keep], rec["params"][keep], rec["tokens"][keep],
              rec["loss"][keep], rec["unique_tokens"][keep])]
  fit_csv = _write(tmp_path / "fit.csv", rows)
  bad = _write(tmp_path / "p.csv", [dict(params=8.7e9, tokens=1e11)])
  assert fit_cmd.main(["--form=data_constrained", f"--records={fit_csv}",
                       f"--predict={bad}", f"--out={tmp_path / 'o'}"]) == 2
  err = capsys.readouterr().err
  assert "p.csv" in err and "unique_tokens" in err
  good = _write(tmp_path / "q.csv", [dict(params=8.7e9, tokens=1e11, unique_tokens=4e9),
                                     dict(params=8.7e9, tokens=1e11, unique_tokens=1e11)])
  assert fit_cmd.main(["--form=data_constrained", f"--records={fit_csv}",
                       f"--predict={good}", f"--out={tmp_path / 'o'}",
                       "--bootstrap=0"]) == 0
  got = list(csv.DictReader(open(tmp_path / "o" / "predictions.csv")))
  # 25 repetitions of 4e9 tokens predict a higher loss than 1e11 fresh tokens.
  assert float(got[0]["loss_hat"]) > float(got[1]["loss_hat"])


def test_families_fitted_in_one_call_fit_as_alone():
  """fit_pools stacks the families' pools (one compile for a table): each
  cell weights its own family's rows only, so its fit is the fit of the
  family alone; the pinned cells land on the same optimum."""
  law = forms.get_form("chinchilla")
  jobs = []
  for name, seed in (("fam_a", 3), ("fam_b", 4)):
    fam = backtest.families(records.as_records(
        _family_rows(name, LAWS[name], noise=0.005, seed=seed)))[0]
    cells = [c for c in backtest.plan_cells(fam, None) if c.design == "closest"
             and c.checkpoints == "all" and c.fraction in (0.5, 1.0)]
    pool = backtest._pool(fam)  # pylint: disable=protected-access
    jobs.append((pool, cells, backtest.cell_weights(pool, cells)))
  together = backtest.fit_pools(law, jobs, 32)
  for job, (theta, obj, n) in zip(jobs, together):
    alone_theta, alone_obj, alone_n = backtest.fit_cells(law, *job, 32)
    np.testing.assert_array_equal(n, alone_n)
    pinned = np.isfinite(alone_obj) & backtest.bounded(law, alone_theta)
    assert pinned.sum() >= 4
    np.testing.assert_allclose(obj[pinned], alone_obj[pinned], rtol=1e-6)
    # (theta itself may slide along a flat direction at equal objective)
    assert np.all(np.isfinite(theta[pinned]))
