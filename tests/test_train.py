"""End to end: `llmlab train` writes config.json, metrics.jsonl, TensorBoard
events and checkpoints, and the loss falls."""

import json
import resource
import os

from tests.helpers import TINY, TINY_RUN, llmlab, llmlab_process, rows


def test_outputs_and_loss_falls(tiny_run):
  workdir, out = tiny_run
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["model"]["d_model"] == 128 and cfg["train"]["steps"] == 30
  info = cfg["model_info"]
  assert info["params_nonembed"] > 0 and info["flops_per_token"] > 6 * info["params_nonembed"]
  assert cfg["data_info"]["fingerprint"]
  train_rows = [r for r in rows(workdir) if "loss" in r]
  for key in ("step", "loss", "learning_rate", "grad_norm", "tokens",
              "tokens_per_s", "mfu"):
    assert key in train_rows[-1], key
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
  evals = [r for r in rows(workdir) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [15, 30]
  assert evals[-1]["eval_bpb"] > 0
  assert "step 30/30" in out.stderr or "step 28/30" in out.stderr
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["step"] == 30


def test_tensorboard_scalars(tiny_run):
  from tensorboard.backend.event_processing import event_accumulator
  workdir, _ = tiny_run
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  acc.Reload()
  tags = acc.Tags()["scalars"]
  for tag in ("train/loss", "eval/loss", "eval/bpb", "perf/tokens_per_s",
              "perf/mfu"):
    assert tag in tags, (tag, tags)
  assert len(acc.Scalars("train/loss")) >= 10


def test_same_seed_same_losses(tiny_run, tmp_path):
  """Same config + seed => same losses, whether the steps come from the
  persistent compilation cache the session filled or from a fresh compile
  with the cache off (fresh processes: a cold compile is the point)."""
  workdir, _ = tiny_run
  cache = os.environ["LLMLAB_COMPILE_CACHE"]  # conftest's, for the session
  assert any(f.endswith("-cache") for f in os.listdir(cache)), os.listdir(cache)
  losses = lambda d: [r["loss"] for r in rows(d) if "loss" in r]
  for name, where in (("cached", cache), ("uncached", "off")):
    other = str(tmp_path / name)
    llmlab_process("train", TINY, f"--workdir={other}",
                   *TINY_RUN, LLMLAB_COMPILE_CACHE=where)
    assert losses(other) == losses(workdir), name


def test_bad_config_fails_before_compile(tmp_path):
  out = llmlab("train", TINY, f"--workdir={tmp_path / 'bad'}",
               "--config.model.num_heads=5", check=False)
  assert out.returncode != 0
  assert "model.num_heads=5" in out.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def test_freed_step_memory_is_kept_not_faulted_in_again(tmp_path):
  """`import llmlab` has glibc keep the memory XLA:CPU frees each step
  (runtime.keep_freed_memory): with glibc's defaults every step faults its
  temporaries in again (~6,500 page faults a step on this shape), with the
  setting the steps add almost none. The losses are the same."""
  def train(mode):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    wd = tmp_path / mode
    llmlab_process("train", TINY, f"--workdir={wd}", "--config.train.steps=60",
                   "--config.train.eval_every=0",
                   "--config.checkpoint.every_steps=0",
                   "--config.model.d_model=48", "--config.model.mlp_dim=192",
                   "--config.train.batch_size=16", LLMLAB_MALLOC=mode)
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    return faults, [r["loss"] for r in rows(wd) if "loss" in r]
  kept, kept_loss = train("keep")  # first: it compiles, the other hits the cache
  default, default_loss = train("default")
  assert kept_loss == default_loss and kept_loss
  assert kept < 0.5 * default, (kept, default)
