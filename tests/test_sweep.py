"""`llmlab sweep`: every checkpoint evaluated once, incrementally, on one
held-out set; rows carry sizes, tokens and FLOPs."""

import csv
import os

import pytest

from tests.helpers import TINY, llmlab as _llmlab


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("sweep")
  dirs = []
  for name, d in (("small", 32), ("big", 64)):
    w = str(base / name)
    _llmlab("train", TINY, f"--workdir={w}",
            f"--config.model.d_model={d}", "--config.train.eval_every=0",
            "--config.checkpoint.keep=5")
    dirs.append(w)
  return base, dirs


def test_sweep_rows_and_incremental(runs):
  base, dirs = runs
  out = str(base / "records.csv")
  res = _llmlab("sweep", *[f"--workdir={w}" for w in dirs], f"--out={out}",
                "--eval_tokens=2048")
  rows = list(csv.DictReader(open(out)))
  assert sorted((r["run"], int(r["step"])) for r in rows) == [
      ("big", 6), ("big", 12), ("small", 6), ("small", 12)]
  for r in rows:
    for key in ("params", "params_nonembed", "tokens", "flops", "loss", "bpb"):
      assert float(r[key]) > 0, key
    assert int(r["tokens"]) == int(r["step"]) * 8 * 128
    assert float(r["params"]) > float(r["params_nonembed"])
  big = {int(r["step"]): float(r["loss"]) for r in rows if r["run"] == "big"}
  assert big[12] < big[6]
  assert "sweep" in res.stderr
  # Second pass: nothing new, the table is unchanged.
  res = _llmlab("sweep", *[f"--workdir={w}" for w in dirs], f"--out={out}",
                "--eval_tokens=2048")
  assert "nothing new" in res.stderr
  assert list(csv.DictReader(open(out))) == rows


def test_sweep_reads_a_runs_own_eval_instead_of_evaluating_again(runs):
  from llmlab.scaling import sweep as sweep_lib
  _, dirs = runs
  ev = sweep_lib.RunEvaluator(dirs[1], 4096)  # TINY's train.eval_tokens
  logged = ev.logged(12)  # the run evaluated at its end, not at step 6
  assert logged is not None and ev.logged(6) is None
  assert ev.evaluate(12)["loss"] == logged["eval_loss"]
  ev.logged = lambda step: None  # restore the checkpoint and evaluate it
  assert ev.evaluate(12)["loss"] == logged["eval_loss"]
  ev.close()
  other = sweep_lib.RunEvaluator(dirs[1], 2048)  # another budget: evaluated
  assert other.logged(12) is None
  other.close()


def test_sweep_tensorboard(runs):
  from tensorboard.backend.event_processing import event_accumulator
  _, dirs = runs
  # One TensorBoard run per model: the sweep's tags beside training's.
  assert not os.path.exists(os.path.join(dirs[0], "tensorboard", "sweep"))
  acc = event_accumulator.EventAccumulator(
      os.path.join(dirs[0], "tensorboard"))
  acc.Reload()
  steps = [e.step for e in acc.Scalars("sweep/eval_loss")]
  assert sorted(steps) == [6, 12]
  assert "train/loss" in acc.Tags()["scalars"]
  # Hyper-parameters for the HParams dashboard, in the same run.
  from tensorboard.plugins.hparams import plugin_data_pb2
  content = acc.PluginTagToContent("hparams")
  start = plugin_data_pb2.HParamsPluginData.FromString(
      content["_hparams_/session_start_info"]).session_start_info
  assert start.hparams["N"].number_value > 0
  assert start.hparams["learning_rate"].number_value > 0
  assert start.hparams["tokens"].number_value == 12 * 1024


def test_sweep_bad_workdir(tmp_path):
  res = _llmlab("sweep", f"--workdir={tmp_path}/nope",
                f"--out={tmp_path}/r.csv", check=False)
  assert res.returncode == 2 and "not a run directory" in res.stderr
