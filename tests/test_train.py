"""End to end: `llmlab train` writes config.json, metrics.jsonl, TensorBoard
events and checkpoints, and the loss falls."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *overrides, check=True, cache=None):
  cmd = [sys.executable, "-m", "llmlab", "train",
         f"--config={ROOT}/configs/tiny.py:smoke", f"--workdir={workdir}",
         *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if cache:
    env["LLMLAB_COMPILE_CACHE"] = cache
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=env)
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """This module's own compilation cache, empty at the first run."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp("run"))
  out = _train(workdir, "--config.train.steps=30",
               "--config.train.eval_every=15", cache=cache)
  return workdir, out


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_outputs_and_loss_falls(run):
  workdir, out = run
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["model"]["d_model"] == 128 and cfg["train"]["steps"] == 30
  info = cfg["model_info"]
  assert info["params_nonembed"] > 0 and info["flops_per_token"] > 6 * info["params_nonembed"]
  assert cfg["data_info"]["fingerprint"]
  rows = _rows(workdir)
  train_rows = [r for r in rows if "loss" in r]
  for key in ("step", "loss", "learning_rate", "grad_norm", "tokens",
              "tokens_per_s", "mfu"):
    assert key in train_rows[-1], key
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [15, 30]
  assert evals[-1]["eval_bpb"] > 0
  assert "step 30/30" in out.stderr or "step 28/30" in out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["step"] == 30


def test_tensorboard_scalars(run):
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = run
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  acc.Reload()
  tags = acc.Tags()["scalars"]
  for tag in ("train/loss", "eval/loss", "eval/bpb", "perf/tokens_per_s",
              "perf/mfu"):
    assert tag in tags, (tag, tags)
  assert len(acc.Scalars("train/loss")) >= 10


def test_same_seed_same_losses(run, cache, tmp_path):
  """Same config + seed => same losses, whether the steps come from the
  persistent compilation cache the first run filled or from a fresh
  compile with the cache off."""
  workdir, _ = run
  assert any(f.endswith("-cache") for f in os.listdir(cache)), os.listdir(cache)
  losses = lambda d: [r["loss"] for r in _rows(d) if "loss" in r]
  for name, where in (("cached", cache), ("uncached", "off")):
    other = str(tmp_path / name)
    _train(other, "--config.train.steps=30", "--config.train.eval_every=15",
           cache=where)
    assert losses(other) == losses(workdir), name


def test_bad_config_fails_before_compile(tmp_path):
  out = _train(str(tmp_path / "bad"), "--config.model.num_heads=5", check=False)
  assert out.returncode != 0
  assert "model.num_heads=5" in out.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")
