"""Repetition on our own data: `data.unique_tokens` (the first U tokens,
repeated, order a pure function of (seed, step), resume exact, bad values
refused) and `llmlab repeat-study` end to end on its `:smoke` config."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from llmlab import config as config_lib
from llmlab import data
from llmlab import main as main_lib
from llmlab import storage
from llmlab import train as train_lib
from llmlab.checkpoints import checkpoint_dir
from llmlab.studies import repeat
from llmlab.studies import repeat_analysis
from llmlab.scaling import fit as fit_lib
from tests.helpers import ROOT

L, G = 64, 8


def _same(a, b) -> bool:
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _limited(u, seed=0, **kw):
  cfg = data.default_config()
  cfg.unique_tokens = u
  return data.build(cfg, seq_len=L, global_batch=G, seed=seed, **kw)


def _study_config(arg="smoke"):
  spec = importlib.util.spec_from_file_location(
      "study_repeat", os.path.join(ROOT, "configs", "study_repeat.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# --- data.unique_tokens ----------------------------------------------------


def _epochs(d, rows, n):
  """The first n epochs' rows (token arrays) of a limited run."""
  seen = np.concatenate([d.train_batch(s)["tokens"]
                         for s in range(n * rows // G)])
  return [seen[e * rows:(e + 1) * rows] for e in range(n)]


def _check_repeats(limited, fresh, rows):
  """Epoch 0 is the fresh run's first U tokens, in its order; every later
  epoch is those rows again, in another order each time."""
  epochs = _epochs(limited, rows, 3)
  first = np.concatenate([fresh.train_batch(s)["tokens"]
                          for s in range(rows // G)])
  assert np.array_equal(epochs[0], first)
  for e in epochs[1:]:
    assert sorted(r.tobytes() for r in e) == sorted(r.tobytes() for r in first)
  assert not np.array_equal(epochs[1], epochs[0])
  assert not np.array_equal(epochs[2], epochs[1])


def test_first_u_tokens_repeat_reshuffled_each_epoch():
  rows = 5 * G  # 5 steps per epoch
  d = _limited(rows * L, seed=3)
  assert d.info["rows_per_epoch"] == {"stdlib": rows}
  assert d.info["unique_tokens"] == rows * L
  fresh = data.build(data.default_config(), seq_len=L, global_batch=G, seed=3)
  assert fresh.info["rows_per_epoch"]["stdlib"] > 1000 * rows
  assert "unique_tokens" not in fresh.info
  _check_repeats(d, fresh, rows)


def test_token_store_repeats_the_same_way(tmp_path):
  from llmlab.data import token_store  # noqa: PLC0415
  src = data.default_config()
  src.source = "synthetic"
  src.synthetic.update(num_docs=200, doc_len=100)
  path = str(tmp_path / "store")
  token_store.write_store(src, path, shard_mb=0.02)
  cfg = data.default_config()
  cfg.source, cfg.tokens.path, cfg.prefetch = "tokens", path, 2
  fresh = data.build(cfg, seq_len=L, global_batch=G, seed=2)
  cfg.unique_tokens = 3 * G * L
  limited = data.build(cfg, seq_len=L, global_batch=G, seed=2)
  assert limited.info["unique_tokens"] == 3 * G * L
  _check_repeats(limited, fresh, 3 * G)
  assert _same(next(limited.train_iter(7)), limited.train_batch(7))


def test_order_is_a_pure_function_of_seed_and_step_and_resume_is_exact():
  u = 7 * G * L
  d = _limited(u)
  again, other = _limited(u), _limited(u, seed=1)
  for step in (0, 6, 7, 50):
    assert _same(d.train_batch(step), again.train_batch(step))
  assert not np.array_equal(d.train_batch(0)["tokens"],
                            other.train_batch(0)["tokens"])
  it = again.train_iter(9)  # a fresh process resuming at step 9
  for step in range(9, 16):
    assert _same(next(it), d.train_batch(step))
  shards = [_limited(u, process_index=p, process_count=2) for p in (0, 1)]
  whole = {k: np.concatenate([s.train_batch(12)[k] for s in shards])
           for k in d.train_batch(12)}
  assert _same(whole, d.train_batch(12))


def test_bad_unique_tokens_are_refused_naming_the_key():
  for bad, why in ((-1, "integer >= 0"), (L * G - 1, "one global batch"),
                   (10**12, "training tokens"), (True, "integer >= 0")):
    with pytest.raises(data.DataError, match=f"data.unique_tokens=.*{why}"):
      _limited(bad)
  cfg = data.default_config()
  cfg.mixture = "stdlib:0.999,synthetic:0.001"
  cfg.unique_tokens = 2 * G * L  # synthetic's share is under one row
  with pytest.raises(data.DataError, match="'synthetic'.*less than one row"):
    data.build(cfg, seq_len=L, global_batch=G, seed=0)


def _tiny(steps, **checkpoint):
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                 mlp_dim=32)
  c.train.update(steps=steps, batch_size=4, seq_len=32, log_every=1,
                 eval_tokens=1024)
  c.optim.update(schedule="constant", warmup_steps=2)
  c.checkpoint.update(every_steps=0, keep=1, async_save=False, **checkpoint)
  c.data.unique_tokens = 3 * 4 * 32  # 3 steps per epoch: 4 epochs in 12
  return c


def _train_rows(workdir):
  return [(r["step"], r["loss"]) for r in storage.jsonl_rows(
      os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def test_training_resumed_mid_epoch_is_exact(tmp_path):
  whole = str(tmp_path / "whole")
  train_lib.train(_tiny(12, keep_at_steps=(7,)), whole)
  resumed = str(tmp_path / "resumed")  # its step-7 checkpoint, resumed
  storage.copytree(os.path.join(checkpoint_dir(whole), "7"),
                   os.path.join(checkpoint_dir(resumed), "7"))
  summary = train_lib.train(_tiny(12), resumed)
  assert summary["step"] == 12
  mine = [r for r in _train_rows(resumed) if r[0] > 7]
  assert mine and mine == [r for r in _train_rows(whole) if r[0] > 7]


def test_train_refuses_bad_unique_tokens_before_compiling(tmp_path):
  cfg = _tiny(4)
  cfg.data.unique_tokens = 100  # less than one batch of 4 x 32
  with pytest.raises(data.DataError, match="data.unique_tokens=100"):
    train_lib.train(cfg, str(tmp_path / "bad"))
  assert not os.path.exists(checkpoint_dir(str(tmp_path / "bad")))


# --- the study -------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("repeat"))
  return workdir, repeat.run(_study_config(), workdir)


def test_smoke_study_outputs(smoke):
  workdir, result = smoke
  saved = json.load(open(os.path.join(workdir, "study.json")))
  for key in ("laws", "repetitions_at_1pct", "holdout", "wall_time_total_s",
              "wall_time_this_run_s", "measured_repetitions_at_1pct"):
    assert key in saved, key
  assert set(saved["laws"]) == set(repeat_analysis.FORMS)
  for law in saved["laws"].values():
    assert {"params", "objective", "holdout"} <= set(law)
    assert {"are", "naive_are", "skill"} <= set(law["holdout"])
    assert law["holdout"]["are"] >= 0
  assert saved["repetitions_at_1pct"]["chinchilla"] is None  # blind to R
  assert saved["holdout"]["form"] in saved["laws"]
  with open(os.path.join(workdir, "records.csv")) as f:
    rows = list(csv.DictReader(f))
  assert {"family", "run", "params", "tokens", "loss", "unique_tokens",
          "epochs"} <= set(rows[0])
  for r in rows:
    assert float(r["epochs"]) == pytest.approx(
        float(r["tokens"]) / float(r["unique_tokens"]))
  heavy = [r for r in rows if r["run"] == "s1_r8"]
  assert float(heavy[-1]["epochs"]) == pytest.approx(8.0)
  assert float(heavy[-1]["unique_tokens"]) == 64 * 8 * 32 / 8
  assert all(float(r["epochs"]) == 1.0 for r in rows
             if r["run"].endswith("_fresh"))
  report = open(os.path.join(workdir, "report.md")).read()
  assert "`:smoke`" in report.splitlines()[2]
  assert "no scientific claim" in report
  assert os.path.exists(os.path.join(workdir, "repeat_ratio.png"))


def test_rerun_does_not_retrain(smoke, monkeypatch):
  workdir, before = smoke
  monkeypatch.setattr(train_lib, "train",
                      lambda *a: pytest.fail("retrained a finished run"))
  after = repeat.run(_study_config(), workdir)
  for form in repeat_analysis.FORMS:  # the same records, the same fit
    assert after["laws"][form]["holdout"]["are"] == pytest.approx(
        before["laws"][form]["holdout"]["are"], rel=1e-6)
  assert after["runs"] == before["runs"]
  assert after["wall_time_total_s"] > before["wall_time_total_s"]


def test_changed_study_is_refused_not_resumed(smoke, monkeypatch):
  workdir, _ = smoke
  monkeypatch.setattr(train_lib, "train", lambda *a: pytest.fail("trained"))
  with pytest.raises(config_lib.ConfigError,
                     match=r"s1_fresh was trained with other settings "
                     r"\(train.steps: 64 there, 32 now"):
    repeat.run(_bad(steps=32), workdir)


def _bad(**changes):
  scfg = _study_config()
  for key, value in changes.items():
    scfg[key] = value
  return scfg


@pytest.mark.parametrize("key,value,match", [
    ("repetitions", (2, 8), "must include 1"),
    ("repetitions", (1, 1), "distinct"),
    ("repetitions", (1, 3, 8), "not whole rows"),
    ("repetitions", (1, 8, 256), "one global batch"),
    ("target_repetitions", (1, 4), "among repetitions"),
    ("steps", 0, "positive integer"),
    ("threshold", 1.5, r"\(0, 1\)"),
    ("forms", ("chinchilla", "nope"), "known"),
    ("family", [("a", {"d_model": 16})], "two or more"),
])
def test_bad_study_keys_fail_before_training(tmp_path, monkeypatch, key,
                                             value, match):
  monkeypatch.setattr(train_lib, "train", lambda *a: pytest.fail("trained"))
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}=.*{match}"):
    repeat.run(_bad(**{key: value}), str(tmp_path / "s"))
  assert not os.path.exists(tmp_path / "s")


def test_cli_bad_keys_are_one_line_errors(tmp_path, capsys):
  base = ["repeat-study", f"--config={ROOT}/configs/study_repeat.py:smoke",
          f"--workdir={tmp_path / 's'}"]
  assert main_lib.main(base + ["--config.no_such_key=1"]) == 2
  assert main_lib.main(base + ["--config.threshold=2.0"]) == 2
  err = capsys.readouterr().err
  assert "no_such_key" in err and "config.threshold=2.0" in err
  assert main_lib.main(["repeat-study", "--config=configs/study_repeat.py:x",
                        f"--workdir={tmp_path / 's'}"]) != 0


def test_law_solve_and_measured_crossing(monkeypatch):
  """repetitions_at on a law with a known answer; the measured crossing is
  interpolated in log R."""
  # L = 1 + 0.01 (R - 1) / 3: +1% at R = 4.
  monkeypatch.setattr(fit_lib, "predict", lambda res, params, tokens,
                      unique_tokens: 1 + 0.01 * (tokens / unique_tokens - 1) / 3)
  assert repeat_analysis.repetitions_at(None, 1e5, 1e6, 0.01) == (
      pytest.approx(4.0, rel=1e-3))
  monkeypatch.setattr(fit_lib, "predict",
                      lambda res, params, tokens, unique_tokens: 0 * tokens + 2)
  assert repeat_analysis.repetitions_at(None, 1e5, 1e6, 0.01) is None
  rows = [dict(family="m", params=1.0, tokens=10.0, repetitions=r, loss=v)
          for r, v in ((1, 2.0), (2, 2.01), (8, 2.06))]
  got = repeat_analysis.measured_repetitions(rows, 0.01)["m"]
  assert got["repetitions_at"] == pytest.approx(2 * 4 ** 0.2)
  assert got["ratio"]["8"] == pytest.approx(0.03)
