"""Continual learning after compression (llmlab/studies/continual.py): the
prose domain, per-domain evals, the replay mixture's order, the config
checks (one line naming the key, nothing trained), the continual forms, and
(integration) `llmlab continual` end to end on `:smoke`, resumed."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from llmlab import config as config_lib
from llmlab import data
from llmlab import main as main_lib
from llmlab import train as train_lib
from llmlab.data import prose
from llmlab.scaling import fit as fit_lib
from llmlab.scaling import forms as forms_lib
from llmlab.studies import continual
from llmlab.studies import continual_analysis
from tests.helpers import ROOT

SLICE = "json/*,email/*,logging/*,http/*"  # the smoke config's


def _config(arg="smoke"):
  spec = importlib.util.spec_from_file_location(
      "continual_quick", os.path.join(ROOT, "configs", "continual_quick.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# --- the prose domain and per-domain evaluation ----------------------------


def test_prose_keeps_docstrings_and_comments_not_code():
  src = ('"""Module doc."""\nimport os  # trailing note\nx = "not a doc"\n'
         'def f():\n  """Function\n  doc."""\n  # inner comment\n'
         '  return "no"\n#!shebang-like\n')
  assert prose.extract(src) == ("Module doc.\ntrailing note\nFunction\ndoc."
                                "\ninner comment")
  assert prose.extract("def broken(:\n  '''x") == ""


def _data_cfg(**kw):
  cfg = data.default_config()
  cfg.stdlib.include = SLICE
  cfg.update(kw)
  return cfg


def test_replay_mixture_order_is_a_function_of_seed_and_step():
  cfg = _data_cfg(mixture="prose:0.7,stdlib:0.3", domains="A=stdlib,B=prose")
  a = data.build(cfg, seq_len=32, global_batch=4, seed=5)
  b = data.build(cfg, seq_len=32, global_batch=4, seed=5)
  c = data.build(cfg, seq_len=32, global_batch=4, seed=6)
  for step in (0, 3, 17):
    assert np.array_equal(a.train_batch(step)["tokens"],
                          b.train_batch(step)["tokens"])
  assert not np.array_equal(a.train_batch(3)["tokens"],
                            c.train_batch(3)["tokens"])
  assert set(a.info["domains"]) == {"A", "B"}
  assert a.info["domains"]["B"]["source"] == "prose"
  evals = a.domain_eval_batches(256, 4)
  assert set(evals) == {"A", "B"}
  tokens = {k: np.concatenate([x["tokens"] for x in v]) for k, v in
            evals.items()}
  assert not np.array_equal(tokens["A"], tokens["B"])  # two distributions
  # A domain need not be trained on: B alone still evaluates A.
  only_b = data.build(_data_cfg(mixture="prose:1", domains="A=stdlib,B=prose"),
                      seq_len=32, global_batch=4, seed=5)
  assert np.array_equal(
      np.concatenate([x["tokens"] for x in
                      only_b.domain_eval_batches(256, 4)["A"]]), tokens["A"])


@pytest.mark.parametrize("spec,match", [
    ("A=stdlib,A=prose", "label appears twice"),
    ("A:stdlib", "not label=source"),
    ("A=nope", "unknown source"),
])
def test_bad_domains_name_the_key(spec, match):
  with pytest.raises(data.DataError, match=f"data.domains.*{match}"):
    data.build(_data_cfg(domains=spec), seq_len=32, global_batch=4, seed=0)


# --- config checks -----------------------------------------------------------


def _bad(**changes):
  c = _config()
  for k, v in changes.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.mark.parametrize("changes,match", [
    ({"grid": ("s1/t1/1.5",)}, r"config.grid: 's1/t1/1.5': replay ratio 1.5: "
                               r"must be in \[0, 1\]"),
    ({"replay": -0.1}, r"config.replay -0.1: must be in \[0, 1\]"),
    ({"targets": (("t1", dict(num_layers=1, d_model=8, num_heads=1,
                              num_kv_heads=1, head_dim=8, mlp_dim=16)),
                  ("t2", dict(num_layers=3, d_model=16, num_heads=2,
                              num_kv_heads=1, head_dim=8, mlp_dim=24)))},
     r"config.grid: target 't2' from source 's1' \(config.targets\['t2'\]\)"
     r": config.model.num_layers=3"),
    ({"continue_steps": 10_000},
     r"config.domain_b='prose': domain B has .* training tokens, fewer than"
     r" the 1,280,000 a run plans"),
    ({"base.data.prose.include": "json/tool.py"},
     r"config.base.data: source 'prose' \(1 documents\): validation split"),
    ({"methods": ("activation+melt",)}, r"config.methods\[0\]="),
    ({"grid": ("s9/t1/0.1",)}, r"config.grid: 's9/t1/0.1': unknown source"),
    ({"law_seeds": (2, "x")}, r"config.law_seeds\[1\]='x': must be a seed"),
])
def test_bad_input_fails_before_training(tmp_path, monkeypatch, changes,
                                         match):
  monkeypatch.setattr(train_lib, "train", lambda *a: pytest.fail("trained"))
  with pytest.raises(config_lib.ConfigError, match=match):
    continual.run(_bad(**changes), str(tmp_path / "s"))
  assert not os.path.exists(tmp_path / "s")


def test_cli_bad_replay_is_one_line(tmp_path, capsys):
  argv = ["continual", f"--config={ROOT}/configs/continual_quick.py:smoke",
          f"--workdir={tmp_path / 's'}", "--config.replay=2.0"]
  assert main_lib.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config.replay 2.0" in err[0], err
  assert not os.path.exists(tmp_path / "s")


def test_plan_is_a_design_without_duplicates():
  scfg = _config()
  planned = continual.check(scfg)
  names = [r.name for r in planned]
  assert len(names) == len(set(names))
  law = [r for r in planned if r.role == "law"]
  # >= 2 sources, >= 2 targets and full, >= 3 replay ratios in the law grid
  assert {r.source for r in law if r.source} == {"s1", "s2"}
  assert {r.replay for r in law} == {0.0, 0.1, 0.3}
  assert {r.method for r in law} == {"activation", "full", "scratch"}
  methods = {r.method + ("-distill" if r.distill else "")
             for r in planned if r.role == "method"}
  assert {"magnitude", "learned", "activation+shrink_perturb",
          "activation+reinit_top", "activation+reinit_bottom",
          "activation-distill"} <= methods
  cfg = continual.continued_config(scfg, law[0], "/w")
  assert cfg.data.mixture == "prose:0.9,stdlib:0.1"
  assert cfg.data.domains == "A=stdlib,B=prose"
  assert cfg.init_from == "/w/starts/s1-t1-activation"
  assert continual.mixture(scfg, 0.0) == "prose:1"


def test_law_seeds_rerun_every_law_cell_and_score_the_seed_mean():
  scfg = _config()
  scfg.law_seeds = (7,)
  planned = continual.check(scfg)
  law = [r for r in planned if r.role == "law" and r.method != "scratch"]
  again = {r.name for r in planned if r.role == "seed" and r.seed == 7}
  assert again == {dataclasses.replace(r, seed=7, role="seed").name for r in law}
  row = lambda seed, loss, tokens=100.0, target="t1": dict(
      source="s1", target=target, method="activation", replay=0.1, distill=False,
      seed=seed, tokens=tokens, loss_B=loss)
  records = [row(1, 2.0), row(7, 2.2), row(1, 1.8, 200.0), row(1, 3.0, target="t2")]
  loss_of = continual_analysis._seed_means(records, "B")
  assert np.allclose([loss_of(r) for r in records], [2.1, 2.1, 1.8, 3.0])


# --- forms -------------------------------------------------------------------


def test_continual_forms_fit_their_own_curves():
  """Each continual form, fitted to losses it generated on a small design
  (plus zero padding), gives them back within 0.5%."""
  rng = np.random.default_rng(0)
  rows = []
  for n_s in (2e4, 5e4, 1e5):
    for n_t in (3e3, 1e4):
      for r in (0.0, 0.1, 0.3):
        for d in (1e3, 4e3, 1.6e4, 6.4e4):
          rows.append(dict(params=n_t, source_params=n_s, replay=r,
                           tokens=d, start=1.0))
  rows += [dict(params=n_t, source_params=n_t, replay=0.1, tokens=d,
                start=0.0) for n_t in (3e3, 1e4) for d in (1e3, 1.6e4)]
  for name in ("cl_transfer", "cl_p2", "cl_dcpt"):
    law = forms_lib.get_form(name)
    theta = law.grid_starts()[int(rng.integers(len(law.grid_starts())))]
    x = continual_analysis.inputs(rows, "B", law)
    loss = np.exp(fit_lib.predict_log(law, theta[None], x)[0])
    assert np.all(np.isfinite(loss)), name
    data_rows = [dict(r, loss_B=float(v)) for r, v in zip(rows, loss)]
    fitted = continual_analysis.fit(name, data_rows, "B")
    pred = continual_analysis.predict(fitted, data_rows, "B")
    assert np.max(np.abs(pred - loss) / loss) < 5e-3, name


def _anchor_design(sources=(2e4, 5e4, 1e5)):
  """Rows of a small continual design: each source whole and pruned to two
  shapes, three replay ratios, four token counts; the source's own losses
  fall with its size."""
  rows = []
  for n_s in sources:
    l_s = {"A": 2.6 * (n_s / 1e4) ** -0.05, "B": 3.0 * (n_s / 1e4) ** -0.04}
    for n_t in (3e3, 1e4, n_s):
      for r in (0.0, 0.1, 0.3):
        for d in (2e3, 8e3, 3.2e4, 1.28e5):
          rows.append(dict(params=n_t, source_params=n_s, replay=r, tokens=d,
                           start=1.0, source_loss_A=l_s["A"],
                           source_loss_B=l_s["B"], source=f"{n_s:g}"))
  return rows


@pytest.mark.parametrize("name", ["cl_anchor", "cl_anchor_static",
                                  "cl_anchor_lr"])
def test_anchored_form_starts_at_the_source_loss(name):
  """A whole source (N_t = N_s) continued for ~0 tokens is at its own loss,
  on either domain: the anchor is the law's own curve through it."""
  law = forms_lib.get_form(name)
  rows = [r for r in _anchor_design() if r["params"] == r["source_params"]]
  rows = [dict(r, tokens=1e-9, lr_tokens=1e-9) for r in rows]
  for theta in law.grid_starts()[:: 37]:
    for domain in ("A", "B"):
      x = continual_analysis.inputs(rows, domain, law)
      loss = np.exp(fit_lib.predict_log(law, theta[None], x)[0])
      want = np.asarray([r[f"source_loss_{domain}"] for r in rows])
      floor = np.exp(forms_lib._lse(theta[0], theta[1] - np.exp(theta[2]) *
                                    (x["source_params"] -
                                     np.log(forms_lib.CL_N_REF))))
      ok = want > floor + 1e-6  # a source above the law's floor
      np.testing.assert_allclose(loss[ok], want[ok], rtol=1e-4)


def test_rate_weighted_tokens_follow_the_runs_schedule():
  """lr_tokens counts each update's tokens at its rate over the peak: a
  20-step linear warmup then a constant rate (the quick study's continued
  runs) makes the first 15 updates worth 5.25 at the peak, and loses 10.5
  of all 300; a
  cosine decay loses more of the run's end."""
  raw = config_lib.to_dict(config_lib.base())
  raw["train"].update(steps=300, learning_rate=3e-3)
  raw["optim"].update(schedule="constant", warmup_steps=20)
  weighted = continual_analysis.rate_weighted_tokens(raw, "")
  np.testing.assert_allclose(weighted(15, 15 * 512.0), 5.25 * 512,
                             rtol=1e-6)
  np.testing.assert_allclose(weighted(300, 300 * 512.0), (300 - 10.5) * 512,
                             rtol=1e-6)
  assert weighted(0, 0.0) == 0.0
  raw["optim"]["schedule"] = "cosine"
  cosine = continual_analysis.rate_weighted_tokens(raw, "")
  assert cosine(15, 15 * 512.0) == pytest.approx(weighted(15, 15 * 512.0))
  assert cosine(300, 300 * 512.0) < 0.7 * weighted(300, 300 * 512.0)


def test_rate_weighted_anchor_is_cl_anchor_at_the_same_tokens():
  """cl_anchor_lr with lr_tokens = tokens (a constant rate, no warmup) is
  cl_anchor, parameter for parameter."""
  rows = [dict(r, lr_tokens=r["tokens"]) for r in _anchor_design()]
  plain, lr = (forms_lib.get_form(n) for n in ("cl_anchor", "cl_anchor_lr"))
  assert plain.params == lr.params
  for theta in plain.grid_starts()[:: 29]:
    for domain in ("A", "B"):
      want = fit_lib.predict_log(plain, theta[None], continual_analysis.inputs(
          rows, domain, plain))[0]
      got = fit_lib.predict_log(lr, theta[None], continual_analysis.inputs(
          rows, domain, lr))[0]
      np.testing.assert_allclose(got, want, rtol=1e-12)


def test_anchored_form_predicts_a_held_out_source():
  """cl_anchor fitted to the two smaller sources of losses it generated
  predicts the largest source's runs (whole and pruned, every replay
  ratio) within 0.5% on both domains: no parameter is the source's own."""
  law = forms_lib.get_form("cl_anchor")
  truth = {"B": dict(e=0.3, a=-0.2, log_alpha=-1.5, b=2.5, log_beta=-1.3,
                     theta=1.5, log_tau=-1.0, f=9.0, log_gamma=-1.5),
           "A": dict(e=0.2, a=-0.3, log_alpha=-1.7, b=2.2, log_beta=-1.5,
                     theta=2.5, log_tau=-2.5, f=7.0, log_gamma=-1.0)}
  rows = _anchor_design()
  for domain, p in truth.items():
    theta = np.asarray([p[k] for k in law.params])
    x = continual_analysis.inputs(rows, domain, law)
    loss = np.exp(fit_lib.predict_log(law, theta[None], x)[0])
    assert np.all(np.isfinite(loss)) and np.ptp(loss) > 0.3, domain
    data_rows = [dict(r, **{f"loss_{domain}": float(v)})
                 for r, v in zip(rows, loss)]
    fit_rows = [r for r in data_rows if r["source_params"] < 1e5]
    test = [r for r in data_rows if r["source_params"] == 1e5]
    fitted = continual_analysis.fit("cl_anchor", fit_rows, domain)
    pred = continual_analysis.predict(fitted, test, domain)
    actual = np.asarray([r[f"loss_{domain}"] for r in test])
    assert np.max(np.abs(pred - actual) / actual) < 5e-3, domain


def test_each_source_held_out_against_its_nearest():
  """holdout(held_out=s): fitted without s, scored on s's law runs against
  the nearest other source's runs (the naive forecast)."""
  law = forms_lib.get_form("cl_anchor")
  p = dict(e=0.3, a=-0.2, log_alpha=-1.5, b=2.5, log_beta=-1.3, theta=1.5,
           log_tau=-1.0, f=9.0, log_gamma=-1.5)
  rows = _anchor_design()
  x = continual_analysis.inputs(rows, "B", law)
  loss = np.exp(fit_lib.predict_log(
      law, np.asarray([p[k] for k in law.params])[None], x)[0])
  names = {2e4: "s1", 5e4: "s2", 1e5: "s3"}
  records = []
  for r, v in zip(rows, loss):
    full = r["params"] == r["source_params"]
    target = names[r["source_params"]] if full else f"t{r['params']:g}"
    src = names[r["source_params"]]
    records.append(dict(
        r, loss_B=float(v), source=src, target=target, role="law",
        method="full" if full else "activation", distill=False, seed=1,
        run=f"{src}-{target}-r{r['replay']:g}"))
  sources = {names[n]: {"params": n} for n in names}
  scfg = _config()
  held = {s: continual_analysis.holdout_rows(records, sources, "cl_anchor",
                                             s)[0] for s in sources}
  fits = continual_analysis.fit_many("cl_anchor",
                                     [(held[s], "B") for s in sources])
  for (s, nearest), fitted in zip((("s1", "s2"), ("s2", "s3"), ("s3", "s2")),
                                  fits):
    h = continual_analysis.holdout(scfg, records, sources, fitted, "B", s)
    assert h["predicted_source"] == s and h["naive_source"] == nearest
    assert s not in h["fit_sources"] and h["n_test"] == len(rows) // 3
    assert h["are"] < 5e-3 < h["naive_are"], (s, h["are"], h["naive_are"])


def test_form_is_chosen_without_the_largest_source():
  """With >= 4 sources the form is chosen on the others alone: each is
  predicted from the rest with the largest left out of every fit, so the
  held-out check on the largest scores a law it did not help choose (a
  form best on the largest but worse elsewhere is not chosen)."""
  sizes = (1e4, 2e4, 5e4, 1e5, 2e5)
  names = {n: f"s{i + 1}" for i, n in enumerate(sizes)}
  records = [dict(r, source=names[r["source_params"]], role="law", seed=1,
                  loss_B=3.0, loss_A=2.5, method="activation", distill=False)
             for r in _anchor_design(sources=sizes)]
  sources = {names[n]: {"params": n} for n in sizes}
  assert continual_analysis.selection_sources(sources) == ["s1", "s2", "s3", "s4"]
  groups = continual_analysis.fit_groups(records, sources, "cl_anchor")
  used = {k: {r["source"] for r in rows} for k, rows in groups.items()}
  assert used[""] == set(sources)
  for s in sources:
    assert used[s] == set(sources) - {s}
  for s in ("s1", "s2", "s3", "s4"):
    assert used["select:" + s] == set(sources) - {s, "s5"}
  assert "select:s5" not in used

  def per(largest, inside):
    return {d: {"holdout": {"are": largest},
                "selection_are": {s: inside for s in ("s1", "s2", "s3", "s4")}}
            for d in ("B", "A")}
  forms = {"best_on_largest": per(0.001, 0.05), "best_inside": per(0.02, 0.01)}
  chosen, scores = continual_analysis.choose_form(forms)
  assert chosen == "best_inside" and scores["best_inside"] == pytest.approx(0.02)
  for p in forms.values():  # fewer sources: the held-out check decides
    for d in ("B", "A"):
      p[d]["selection_are"] = {}
  assert continual_analysis.choose_form(forms)[0] == "best_on_largest"
  assert continual_analysis.selection_sources(
      {k: v for k, v in sources.items() if k in ("s1", "s2", "s3")}) == []


def test_replay_prediction_adds_the_cells_under_prediction():
  """The replay ratio is chosen for the law's forgetting plus the largest
  amount by which the law sat below the cell's own trained runs (at their
  final evals): a law biased low at that cell then still meets the budget."""
  law = forms_lib.get_form("cl_anchor")
  truth = dict(e=0.2, a=-0.3, log_alpha=-1.7, b=2.2, log_beta=-1.5,
               theta=2.5, log_tau=-2.5, f=7.0, log_gamma=-1.0)
  theta = np.asarray([truth[k] for k in law.params])
  rows = _anchor_design(sources=(2e4, 5e4))
  x = continual_analysis.inputs(rows, "A", law)
  loss = np.exp(fit_lib.predict_log(law, theta[None], x)[0])
  names, bias = {2e4: "s1", 5e4: "s2"}, {0.0: 0.02, 0.1: 0.012, 0.3: -0.01}
  records, sources = [], {}
  for r, v in zip(rows, loss):
    src = names[r["source_params"]]
    sources[src] = {"params": r["source_params"],
                    "loss_A": r["source_loss_A"]}
    full = r["params"] == r["source_params"]
    if src == "s2" and full and r["tokens"] == 1.28e5:
      v += bias[r["replay"]]  # the law sits low at this cell's final evals
    target = src if full else f"t{r['params']:g}"
    records.append(dict(
        r, loss_A=float(v), source=src, target=target, role="law",
        method="full" if full else "activation", distill=False, seed=1,
        run=f"{src}-{target}-r{r['replay']:g}"))
  scfg = _config()
  scfg.replay_at = "s2/full"
  fitted = {"form": "cl_anchor", "theta": theta}
  curve = continual_analysis.predict_replay(scfg, records, sources, fitted,
                                            fitted)["curve"]
  assert np.all(np.diff(curve["forgetting"]) < 0)  # replay cuts forgetting
  scfg.forget_budget = float(curve["forgetting"][20])  # the bare law: r = 0.2
  rep = continual_analysis.predict_replay(scfg, records, sources, fitted,
                                          fitted)
  assert rep["law_ratio"] == 0.2
  np.testing.assert_allclose(rep["margin"], 0.02, atol=1e-9)
  assert rep["predicted_ratio"] > 0.2
  assert rep["predicted_bound"] <= scfg.forget_budget
  np.testing.assert_allclose(
      rep["predicted_bound"] - rep["predicted_forgetting"], 0.02, atol=1e-9)
  # With seed re-runs (law_seeds) each ratio counts by its seed mean, not
  # by its worst seed: a second seed 0.1 nats higher at r = 0 moves the
  # margin to (0.02 + 0.12) / 2, where the worst run alone says 0.12.
  cell = [r for r in records if r["source"] == "s2" and r["target"] == "s2"
          and r["replay"] == 0.0]
  last = max(r["tokens"] for r in cell)
  records += [dict(r, seed=2, role="seed", run=r["run"] + "-seed2",
                   loss_A=r["loss_A"] + (0.1 if r["tokens"] == last else 0.0))
              for r in cell]
  margin = lambda: continual_analysis.predict_replay(
      scfg, records, sources, fitted, fitted)["margin"]
  scfg.law_seeds = ()
  np.testing.assert_allclose(margin(), 0.12, atol=1e-9)
  scfg.law_seeds = (2,)
  np.testing.assert_allclose(margin(), 0.07, atol=1e-9)


# --- end to end --------------------------------------------------------------


@pytest.mark.integration
def test_smoke_end_to_end_and_resume(tmp_path):
  wd = str(tmp_path / "s")
  scfg = _config()
  result = continual.run(scfg, wd)
  body = json.load(open(os.path.join(wd, "study.json")))
  for key in ("are", "naive_are", "skill"):
    assert key in body["holdout"] and key in body["forgetting_holdout"]
  assert body["law"]["form"] in scfg.forms and body["law"]["params"]["B"]
  assert set(body["forms"]) == set(scfg.forms)
  m = body["methods"]
  assert {"activation", "scratch", "learned", "activation_distill",
          "activation+shrink_perturb"} <= set(m)
  assert all("tokens_to_match_scratch" in v for v in m.values())
  assert m["scratch"]["tokens_to_match_scratch"] == m["scratch"]["tokens"]
  rep = body["replay"]
  assert {"predicted_ratio", "measured_forgetting", "budget"} <= set(rep)
  assert rep["budget"] == scfg.forget_budget
  if rep["predicted_ratio"] is not None:
    assert rep["measured_forgetting"] is not None
  for key in ("wall_time_total_s", "wall_time_this_run_s", "timing_s"):
    assert key in body
  assert set(body["shift"]) == {"s1", "s2"}
  run = os.path.join(wd, "runs", "s1-t1-activation-r0.1-seed1")
  rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  evals = [r for r in rows if "eval_loss_A" in r]
  assert len(evals) == len(continual.eval_at(scfg))
  assert all("eval_loss_B" in r for r in evals)
  from tensorboard.backend.event_processing import event_accumulator  # noqa
  acc = event_accumulator.EventAccumulator(os.path.join(run, "tensorboard"))
  acc.Reload()
  assert {"eval/loss_A", "eval/loss_B"} <= set(acc.Tags()["scalars"])
  report = open(os.path.join(wd, "report.md")).read()
  assert "Chosen: **" in report
  # A changed study in the same directory is refused, not mixed in.
  with pytest.raises(config_lib.ConfigError, match="trained with other"):
    continual.run(_bad(continue_steps=int(scfg.continue_steps) + 1), wd)
  # A re-run trains nothing and gives the same answers.
  again = continual.run(scfg, wd, train_fn=lambda *a: pytest.fail("trained"))
  assert again["holdout"] == result["holdout"]
  assert again["law"]["form"] == result["law"]["form"]
