"""The overtraining study (`llmlab overtrain`) on a tiny pretraining run:
fine-tuning goes through the train loop, exactly the requested checkpoints
are studied, the noise probe behaves, and a re-run resumes."""

import json
import os
import shutil

import numpy as np
import pytest

from llmlab import api
from llmlab import runs
from llmlab import cli_common
from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import train as train_mod
from llmlab.data import default_config
from llmlab.data import stdlib
from llmlab.studies import overtrain
from llmlab.studies import overtrain_analysis
from llmlab.studies import sensitivity
from tests.helpers import ROOT

REQUESTED = (9, 30)  # of the test pretraining's sweep steps 3, 9, 30


def _config(**overrides):
  scfg = cli_common.load_config(f"{ROOT}/configs/overtrain_quick.py:test")
  scfg.checkpoints = ",".join(map(str, REQUESTED))
  scfg.update(overrides)
  return scfg


def _run_spied(scfg, workdir):
  """overtrain.run with llmlab.train.train wrapped: (result, calls)."""
  calls = []
  real = train_mod.train

  def spy(cfg, wd):
    calls.append((cfg, wd))
    return real(cfg, wd)

  mp = pytest.MonkeyPatch()
  mp.setattr(train_mod, "train", spy)
  try:
    return overtrain.run(scfg, workdir), calls
  finally:
    mp.undo()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("overtrain"))
  result, calls = _run_spied(_config(), workdir)
  return workdir, result, calls


def test_finetuning_goes_through_the_train_loop(study):
  workdir, result, calls = study
  pre_dir = os.path.join(workdir, "pretrain")
  assert calls[0][1] == pre_dir and calls[0][0].init_from == ""
  assert calls[0][0].data.stdlib.exclude == stdlib.TEST_PATTERNS
  lrs = (1e-3, 1e-2)
  want = {(f"{pre_dir}:{s}", lr) for s in REQUESTED for lr in lrs}
  got = {(c.init_from, c.train.learning_rate) for c, _ in calls[1:]}
  assert got == want and len(calls) == 1 + len(want)
  for cfg, wd in calls[1:]:
    assert cfg.data.stdlib.include == stdlib.TEST_PATTERNS
    assert cfg.train.steps == 4 and wd.startswith(
        os.path.join(workdir, "finetune"))
  for r in result["runs"]:  # the fine-tuned params moved
    assert r["target_loss"] != r["target_loss_before"]
    assert r["forgetting"] == pytest.approx(
        r["pretrain_loss_after"] - r["pretrain_loss_before"])
  best = {c["step"]: c["best_target_loss"] for c in result["checkpoints"]}
  for r in result["runs"]:
    assert r["target_loss"] >= best[r["step"]] - 1e-12
  for name in ("overtrain.json", "overtrain.csv", "sensitivity.csv",
               "finetune.png", "forgetting.png", "sensitivity.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(workdir,
                                                        "tensorboard"))
  acc.Reload()
  assert "overtrain/finetune" in acc.Tags()["images"]
  assert len(acc.Scalars("overtrain/best_finetuned_target_loss")) == 2


def test_selected_checkpoints_are_exactly_the_requested_ones(study):
  workdir, result, _ = study
  pre_dir = os.path.join(workdir, "pretrain")
  pre_cfg, _ = runs.read_config(pre_dir)
  available, protected = overtrain.run_checkpoints(pre_dir, pre_cfg)
  assert available == protected == [3, 9, 30]  # 3 exists, not requested
  assert [c["step"] for c in result["checkpoints"]] == list(REQUESTED)
  scfg = _config()  # changed fine-tune settings are refused, not resumed
  scfg.finetune.steps = 5
  with pytest.raises(config_lib.ConfigError, match="train.steps: 4 there"):
    overtrain.run(scfg, workdir)
  assert {r["step"] for r in result["sensitivity_runs"]} == set(REQUESTED)
  assert sorted(os.listdir(os.path.join(workdir, "finetune"))) == sorted(
      overtrain.run_name(s, lr, 0) for s in REQUESTED for lr in (1e-3, 1e-2))
  select = lambda spec: overtrain.select_checkpoints(spec, available,
                                                     protected[1:])
  assert select("sweep") == [9, 30] and select("all") == [3, 9, 30]
  assert select((30, 3)) == select("3,30") == [3, 30]


def test_bad_requests_fail_before_training(study, tmp_path, monkeypatch):
  workdir, _, _ = study
  monkeypatch.setattr(train_mod, "train",
                      lambda *a: pytest.fail("trained despite a bad request"))
  with pytest.raises(config_lib.ConfigError, match="past pretrain"):
    overtrain.run(_config(checkpoints="31"), str(tmp_path / "a"))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"steps \[7\]"):
    overtrain.run(_config(checkpoints="7", pretrain_run=os.path.join(
        workdir, "pretrain")), str(tmp_path / "b"))
  for key, value in (("checkpoints", "9,9"), ("checkpoints", "x")):
    with pytest.raises(config_lib.ConfigError, match="config.checkpoints"):
      overtrain.run(_config(**{key: value}), str(tmp_path / "c"))
  scfg = _config()
  scfg.finetune.learning_rates = (1e-3, -1.0)
  with pytest.raises(config_lib.ConfigError,
                     match="finetune.learning_rates"):
    overtrain.run(scfg, str(tmp_path / "c"))
  scfg = _config()
  scfg.target_data.stdlib.include = "no_such_dir/*"
  with pytest.raises(ValueError, match="no_such_dir"):
    overtrain.run(scfg, str(tmp_path / "c"))


def test_noise_probe_zero_at_gamma_zero_and_grows_with_gamma(study):
  workdir, result, _ = study
  zero = [r for r in result["sensitivity_runs"] if r["gamma"] == 0.0]
  assert zero and all(r["increase"] == 0.0 for r in zero)
  run = api.load(os.path.join(workdir, "pretrain"))
  ev = sensitivity.Evaluator(run.setup, run.config.data, seq_len=32,
                             eval_tokens=1024, batch_size=4)
  same = ev.perturb(run.params, np.uint32(3), np.float32(0.0))
  assert all(np.array_equal(a, b) for a, b in zip(
      jax_leaves(same), jax_leaves(run.params)))
  rows = sensitivity.sensitivity(ev, run.params, [0.0, 0.1, 0.3, 1.0], [3])
  inc = [r["increase"] for r in rows]
  assert inc[0] == 0.0 and inc[1] > 0 and inc[1] < inc[2] < inc[3], inc
  # Relative magnitude: ||delta_W|| ~ gamma ||W|| per layer slice.
  noisy = ev.perturb(run.params, np.uint32(3), np.float32(0.5))
  w = np.asarray(run.params["layers"]["mlp"]["w_up"][0])
  d = np.asarray(noisy["layers"]["mlp"]["w_up"][0]) - w
  assert np.linalg.norm(d) / np.linalg.norm(w) == pytest.approx(0.5, rel=0.15)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_rerun_resumes_without_retraining(study, monkeypatch):
  workdir, before, _ = study
  evals = []
  real = sensitivity.Evaluator.per_batch
  monkeypatch.setattr(sensitivity.Evaluator, "per_batch",
                      lambda self, p: evals.append(1) or real(self, p))
  result, calls = _run_spied(_config(), workdir)
  assert calls == [] and evals == []
  strip = lambda r: {k: v for k, v in r.items()
                     if k not in ("timing_this_invocation", "files",
                                  "wall_time_total_s", "wall_time_this_run_s")}
  assert json.dumps(strip(result)) == json.dumps(strip(before))
  assert result["wall_time_total_s"] == pytest.approx(
      before["wall_time_total_s"] + result["wall_time_this_run_s"])
  # A lost fine-tune run is retrained (and re-evaluated), nothing else.
  name = overtrain.run_name(9, 1e-2, 0)
  shutil.rmtree(os.path.join(workdir, "finetune", name))
  result, calls = _run_spied(_config(), workdir)
  assert [wd for _, wd in calls] == [os.path.join(workdir, "finetune", name)]
  assert len(evals) == 2  # its target and pretraining held-out sets
  assert [c["step"] for c in result["checkpoints"]] == list(REQUESTED)
  scfg = _config()  # changed fine-tune settings are refused, not resumed
  scfg.finetune.steps = 5
  with pytest.raises(config_lib.ConfigError, match="train.steps: 4 there"):
    overtrain.run(scfg, workdir)


def test_inflection_index():
  curves = np.array([[5.0, 4.0, 3.5, 3.0],    # still improving: none
                     [5.0, 4.0, 4.5, 4.6],    # declines after index 1
                     [5.0, 4.0, 4.5, 3.9]])   # dips again at the end
  assert overtrain_analysis.inflection_index(curves, 0.0).tolist() == [3, 1, 3]
  assert overtrain_analysis.inflection_index(curves, 0.2).tolist() == [3, 1, 1]


def test_stdlib_slices_partition_the_corpus_and_default_is_unchanged():
  cfg = default_config().stdlib
  full = stdlib.read(cfg)
  assert stdlib.read(cfg) is full  # no filter: the unfiltered documents
  assert stdlib.select(full, "", "").fingerprint == full.fingerprint
  cfg.include = stdlib.TEST_PATTERNS
  tests = stdlib.read(cfg)
  cfg.include, cfg.exclude = "", stdlib.TEST_PATTERNS
  library = stdlib.read(cfg)
  assert set(tests.keys).isdisjoint(library.keys)
  assert sorted(tests.keys + library.keys) == sorted(full.keys)
  assert len({full.fingerprint, tests.fingerprint, library.fingerprint}) == 3
  assert all(k.startswith("test/") or "/test" in k or "idle_test" in k
             for k in tests.keys)
  with pytest.raises(ValueError, match="no file"):
    stdlib.select(full, "no_such_dir/*", "")
