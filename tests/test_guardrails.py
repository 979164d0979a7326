"""Guardrails for long runs (issue 11, docs/reliability.md): divergence
policies under injected NaNs and spikes, the memory pre-flight and
`llmlab plan`, workdir checks and locks, storage faults, malformed inputs.

Every training run here is the same tiny model, in-process, using the test
session's persistent compilation cache (tests/conftest.py: policies stop and
rollback trace the same step, so only skip compiles a second one).
"""

import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import guard
from llmlab import plan as plan_lib
from llmlab import train as train_lib
from llmlab import workdir_lock
from llmlab.commands import plan as plan_cmd
from llmlab.data import DataError
from tests.helpers import ROOT, rows as _rows

sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402

STEPS = 10
NAN_AT = 6  # checkpoints at 4, 8, 10
OVERRIDES = {
    "model.d_model": 32, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.mlp_dim": 64, "train.steps": STEPS, "train.seq_len": 32,
    "train.log_every": 1, "train.eval_every": 0, "train.eval_tokens": 512,
    "checkpoint.every_steps": 4, "guard.save_retry_wait_s": 0.0,
}


def _config(**extra):
  return config_lib.with_overrides(tiny.get_config("smoke"),
                                   {**OVERRIDES, **extra})


def _complete(workdir):
  d = ckpt_lib.checkpoint_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and
                os.path.exists(os.path.join(d, n, ckpt_lib.COMMIT_FILE)))


@functools.lru_cache(maxsize=1)
def _setup():
  return train_lib.prepare(_config())


def _restore(workdir, step):
  cfg, _, setup = _setup()
  mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, STEPS, read_only=True)
  state, meta = mgr.restore(step, setup.abstract_state)
  mgr.close()
  return jax.tree.map(np.asarray, state), meta


def _finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(x.dtype, np.floating))


# ------------------------------------------------------- the in-graph guard


def test_guard_carry_median_spikes_and_first_event():
  """Unit level: spikes need a full window, bad losses never enter it, the
  first event is remembered, counters count, keep_if drops an update."""
  update = jax.jit(guard.update, static_argnums=4)
  gcfg = config_lib.base().guard
  gcfg.update(spike_window=3, spike_factor=3.0)
  carry = jax.tree.map(jnp.asarray, guard.init_carry(gcfg))
  losses = [2.0, 2.2, 1.8, 5.9, 7.0, float("nan"), 2.1]
  oks = []
  for done, loss in enumerate(losses, start=1):
    ok, carry = update(carry, jnp.int32(done), jnp.float32(loss),
                       jnp.float32(1.0), True)
    oks.append(bool(ok))
  # 5.9 < 3 x median 2.0 (window not full before it); 7.0 > 3 x median
  # 2.2 of [5.9, 2.2, 1.8] is a spike; NaN is non-finite.
  assert oks == [True, True, True, True, False, False, True]
  g = jax.device_get(guard.report(carry))
  assert (int(g["spike_steps"]), int(g["nonfinite_steps"]),
          int(g["skipped_steps"])) == (1, 1, 2)
  ev = guard.event(g, 3.0)
  assert (ev.step, ev.metric, ev.value) == (5, "loss spike", 7.0)
  assert ev.median == pytest.approx(2.2)
  assert "above guard.spike_factor=3 x the running median 2.2" in ev.describe()
  assert np.asarray(carry["losses_W"]).tolist() == pytest.approx(
      [5.9, 2.1, 1.8])  # ring buffer of the accepted losses only

  inf_grad = update(carry, jnp.int32(8), jnp.float32(2.0),
                    jnp.float32(np.inf), False)[1]
  assert int(inf_grad["nonfinite"]) == 2 and int(inf_grad["skipped"]) == 2
  assert int(inf_grad["bad_step"]) == 5  # still the first event
  fresh = dict(jax.device_get(guard.report(inf_grad)), bad_step=8,
               bad_kind=2, bad_value=np.inf)
  assert guard.event(fresh).describe() == "grad_norm is inf"

  old = {"step": jnp.int32(4), "params": {"w": jnp.ones(3)}}
  new = {"step": jnp.int32(5), "params": {"w": jnp.full(3, jnp.nan)}}
  kept = guard.keep_if(jnp.bool_(False), new, old)
  assert int(kept["step"]) == 5 and np.all(np.asarray(kept["params"]["w"]) == 1)


def test_policy_decisions_on_the_host():
  g = {"skipped_steps": 0, "nonfinite_steps": 1, "spike_steps": 0,
       "bad_step": 7, "bad_kind": 1, "bad_value": np.nan, "bad_median": 0.0}
  base = config_lib.base().guard
  with pytest.raises(guard.Diverged, match=r"diverged at step 7: loss is nan "
                     r"\(guard.policy=stop\).* last good one is step 4"):
    guard.Policy(base).check(g, "step 4")
  base.policy = "rollback"
  p = guard.Policy(base, rollbacks=2)
  assert p.check(g, "step 4").step == 7
  p.rollbacks = 3
  with pytest.raises(guard.Diverged, match=r"already rolled back 3 time\(s\) "
                     r"\(guard.max_rollbacks=3\)"):
    p.check(g, "step 4")
  base.policy = "skip"
  assert guard.Policy(base).check(g, "step 4") is None
  assert guard.Policy(base).check(dict(g, bad_step=-1), "x") is None


# -------------------------------------------------- injected NaN, 3 policies


def test_nan_stop_names_step_and_metric_and_saves_nothing_after(
    tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="llmlab")
  workdir = str(tmp_path / "stop")
  with pytest.raises(guard.Diverged,
                     match=rf"diverged at step {NAN_AT}: loss is nan "
                     r"\(guard.policy=stop\)\. No checkpoint was written after "
                     rf"it; the last good one is step 4 \({workdir}"):
    train_lib.train(_config(**{"guard.debug_nan_step": NAN_AT}), workdir)
  assert _complete(workdir) == [4]  # detection ran before the save at 8
  state, _ = _restore(workdir, 4)
  assert _finite(state)
  rows = _rows(workdir)
  assert rows[NAN_AT - 1]["loss"] is None  # NaN -> null
  assert rows[-1]["step"] <= NAN_AT + 1
  events = [json.loads(x) for x in open(tmp_path / "stop" /
                                        "guard_events.jsonl")]
  assert events[-1]["event"] == "stop"
  # Memory pre-flight ran before step 1 and is in config.json (in process,
  # a shape another test already compiled logs its one-line form).
  assert re.search(r"memory pre-flight(, per device|: peak .* per device \(as above\))",
                   caplog.text)
  mem = json.load(open(tmp_path / "stop" / "config.json"))["model_info"][
      "memory_per_device"]
  assert mem["params"] > 0 and mem["opt_state"] == pytest.approx(
      2 * mem["params"], rel=0.01)
  assert mem["peak"] >= mem["params"] + mem["opt_state"] + mem[
      "activations_and_temps"]
  # The lock is released (emptied) even though training raised.
  assert open(tmp_path / "stop" / workdir_lock.LOCK_NAME).read() == ""


def test_nan_and_spike_skip_drop_updates_in_graph(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  workdir = str(tmp_path / "skip")
  summary = train_lib.train(_config(**{
      "guard.policy": "skip", "guard.debug_nan_step": NAN_AT,
      "guard.debug_spike_step": 9, "guard.spike_factor": 3.0,
      "guard.spike_window": 3}), workdir)
  g = summary["guard"]
  assert (g["skipped"], g["nonfinite"], g["spikes"]) == (2, 1, 1)
  rows = [r for r in _rows(workdir) if "loss" in r]
  assert [r["skipped_steps"] for r in rows] == [0] * 5 + [1] * 3 + [2] * 2
  assert rows[8]["spike_steps"] == 1 and rows[8]["loss"] > 100
  assert _complete(workdir) == [4, 8, 10]
  state, meta = _restore(workdir, 10)
  assert _finite(state) and int(state["step"]) == STEPS
  assert meta["guard"]["skipped"] == 2
  acc = event_accumulator.EventAccumulator(os.path.join(workdir,
                                                        "tensorboard"))
  acc.Reload()
  assert [e.value for e in acc.Scalars("guard/skipped_steps")][-1] == 2


def test_nan_rollback_skips_the_data_window_and_resumes_exactly(tmp_path):
  workdir = str(tmp_path / "rollback")
  summary = train_lib.train(_config(**{"guard.policy": "rollback",
                                       "guard.debug_nan_step": NAN_AT}),
                            workdir)
  # NaN at step 6, checkpoint 4: batches 4 and 5 (0-based) are skipped.
  assert summary["guard"]["rollbacks"] == 1
  assert summary["guard"]["data_offset"] == NAN_AT - 4
  rows = [r for r in _rows(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert [r["rollbacks"] for r in rows] == [0] * 4 + [1] * 6
  assert rows[-1]["nonfinite_steps"] == 1
  event = json.loads(open(tmp_path / "rollback" /
                          "guard_events.jsonl").readline())
  assert event == dict(event, event="rollback", step=NAN_AT, metric="loss",
                       to_step=4, data_offset=2)
  final, _ = _restore(workdir, STEPS)
  _, meta8 = _restore(workdir, 8)
  assert meta8["guard"]["data_offset"] == 2 and meta8["guard"]["rollbacks"] == 1

  # Resuming from checkpoint 8 continues with the offset: same final state.
  again = str(tmp_path / "resumed")
  shutil.copytree(workdir, again)
  shutil.rmtree(os.path.join(ckpt_lib.checkpoint_dir(again), str(STEPS)))
  train_lib.train(_config(**{"guard.policy": "rollback",
                             "guard.debug_nan_step": NAN_AT}), again)
  for a, b in zip(jax.tree.leaves(final),
                  jax.tree.leaves(_restore(again, STEPS)[0])):
    assert a.tobytes() == b.tobytes()
  # (Bounded retries, guard.max_rollbacks: test_policy_decisions_on_the_host.)


# ------------------------------------------------------------ storage faults


def _failing_json_writer(monkeypatch, fail_steps, calls):
  """Patch orbax's JSON writer (the checkpoint metadata, written in the
  background commit after the arrays) to fail like a full disk."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
  real = jch.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    step = int(os.path.basename(str(directory.parent)).split(".")[0])
    calls.append(step)
    if step in fail_steps and calls.count(step) == 1:
      raise OSError(errno.ENOSPC, "No space left on device",
                    str(directory / "metadata"))
    return await real(self, x, directory)
  monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save_fn)


def test_failed_checkpoint_write_stops_or_retries_by_policy(
    tmp_path, monkeypatch, caplog):
  workdir = str(tmp_path / "full_disk")
  calls = []
  _failing_json_writer(monkeypatch, {8}, calls)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    train_lib.train(_config(), workdir)  # guard.on_save_error=stop
  msg = str(e.value)
  assert f"checkpoint save of step 8 to {workdir}/checkpoints/8 failed" in msg
  assert "OSError: [Errno 28] No space left on device" in msg
  assert "newest complete checkpoint is step 4" in msg
  assert _complete(workdir) == [4]  # the previous one is intact
  leftovers = os.listdir(ckpt_lib.checkpoint_dir(workdir))
  assert any(n.startswith("8.orbax-checkpoint-tmp") for n in leftovers)

  # Same command, now retrying: the half-written 8 is ignored (resume from
  # 4), step 8 fails once more, the retry saves 10 and training finishes.
  calls.clear()
  caplog.set_level(logging.INFO, logger="llmlab")
  out = train_lib.train(_config(**{"guard.on_save_error": "retry"}), workdir)
  assert out["step"] == STEPS and "resumed from step 4" in caplog.text
  assert "Retrying (1 of guard.save_retries=3)" in caplog.text
  assert _complete(workdir) == [4, 10]
  assert [r["step"] for r in _rows(workdir) if "loss" in r] == list(
      range(1, STEPS + 1))


# ------------------------------------------------------------- the workdir


def test_second_process_on_a_workdir_is_refused_with_the_holder(tmp_path,
                                                               caplog):
  workdir = str(tmp_path / "shared")
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "helpers",
                                    "guard_lock_holder.py"), workdir],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == f"locked {holder.pid}"
    with pytest.raises(workdir_lock.WorkdirLocked,
                       match=rf"in use by another llmlab process: pid "
                       rf"{holder.pid} on host {socket.gethostname()} "
                       r"\(started .*guard_lock_holder.py"):
      train_lib.train(_config(), workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  finally:
    holder.kill()  # SIGKILL: no chance to release
    holder.wait()
  assert holder.returncode == -signal.SIGKILL
  caplog.set_level(logging.WARNING, logger="llmlab")
  with workdir_lock.Lock(workdir):  # the kernel dropped the dead flock
    pass
  assert f"taking over a stale lock of pid {holder.pid}" in caplog.text


def test_heartbeat_lock_where_flock_is_missing(tmp_path, caplog):
  workdir = str(tmp_path)
  path = tmp_path / workdir_lock.LOCK_NAME

  def held_by(host, pid, age):
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "then",
                                "command": "llmlab train", "token": "x",
                                "heartbeat": time.time() - age}))

  held_by("other-host", 1234, age=1)
  with pytest.raises(workdir_lock.WorkdirLocked,
                     match=r"pid 1234 on host other-host .* last heartbeat "
                     r"1 s ago; it counts as stale after 60 s"):
    workdir_lock.Lock(workdir, stale_after_s=60, use_flock=False).acquire()
  caplog.set_level(logging.WARNING, logger="llmlab")
  held_by("other-host", 1234, age=61)
  with workdir_lock.Lock(workdir, stale_after_s=60, use_flock=False) as lock:
    assert json.loads(path.read_text())["token"] == lock.token
  assert "no heartbeat for 61 s > 60 s" in caplog.text
  assert not path.exists()  # released
  dead = subprocess.Popen(["true"])
  dead.wait()
  held_by(socket.gethostname(), dead.pid, age=0)
  with workdir_lock.Lock(workdir, stale_after_s=60, use_flock=False):
    pass
  assert "that process is gone" in caplog.text


def test_unusable_workdir_is_an_error_at_start(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("x")
  with pytest.raises(workdir_lock.WorkdirError,
                     match=rf"cannot create workdir {tmp_path}/file/run: "
                     rf"{tmp_path}/file is a file, not a directory"):
    train_lib.train(_config(), str(tmp_path / "file" / "run"))

  def read_only(path, *a, **k):
    raise OSError(errno.EROFS, "Read-only file system", path)
  monkeypatch.setattr(workdir_lock, "open", read_only, raising=False)
  with pytest.raises(workdir_lock.WorkdirError,
                     match=rf"workdir {tmp_path}/ro is not writable: "
                     r"\[Errno 30\] Read-only file system"):
    train_lib.train(_config(), str(tmp_path / "ro"))


# --------------------------------------------------- bad configs and data


def _bad_files(d):
  (d / "bad.txt").write_bytes(b"hello \xff\xfe world\n")
  (d / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  (d / "broken.jsonl").write_text('{"text": "a"\n')
  (d / "fake.jsonl.gz").write_bytes(b"not gzip")
  (d / "empty.txt").write_bytes(b"")
  (d / "data.csv").write_text("x")
  (d / "tok.json").write_text('{"foo": 1')


BAD_INPUTS = [  # (overrides, exception, expected text); D = the tmp dir
    ({"guard.policy": "explode"}, config_lib.ConfigError,
     "config.guard.policy='explode': must be one of stop, skip, rollback"),
    ({"guard.spike_factor": 0.5}, config_lib.ConfigError,
     "config.guard.spike_factor=0.5: must be 0 (off) or > 1"),
    ({"guard.on_save_error": "ignore"}, config_lib.ConfigError,
     "config.guard.on_save_error='ignore': must be one of stop, retry"),
    ({"guard.spike_window": 0}, config_lib.ConfigError,
     "config.guard.spike_window=0: must be an integer >= 1"),
    ({"train.hang_timeout_s": 0.5}, config_lib.ConfigError,
     "config.train.hang_timeout_s=0.5: must be -1 (auto: 1800 s on "
     "multi-process jobs or a remote workdir, else off), 0 (off) or a "
     "number of seconds >= 1"),
    ({"data.cache_dir": "gs://bucket/cache"}, config_lib.ConfigError,
     "config.data.cache_dir='gs://bucket/cache': must be a local directory"),
    ({"model.num_heads": 5}, config_lib.ConfigError,
     "config.model.num_heads=5: must divide model.d_model=32"),
    ({"train.microbatches": 3}, config_lib.ConfigError,
     "config.train.microbatches=3: must divide train.batch_size=8"),
    ({"mesh.data": 2}, config_lib.ConfigError,
     "config.mesh data=2 x fsdp=1 x context=1 x tensor=1 x dcn_data=1 = 2 devices, but "
     "1 are available"),
    ({"data.files.paths": "D/missing.txt"}, DataError,
     "data.files.paths: D/missing.txt does not exist"),
    ({"data.files.paths": "D/*.nothing"}, DataError,
     "data.files.paths: glob D/*.nothing matches no file"),
    ({"data.files.paths": "D/bad.txt"}, DataError,
     "D/bad.txt line 1: not valid UTF-8 (invalid start byte at byte 6)"),
    ({"data.files.paths": "D/nofield.jsonl"}, DataError,
     "D/nofield.jsonl line 2: no field 'text' (data.files.text_field); "
     "found ['body']"),
    ({"data.files.paths": "D/broken.jsonl"}, DataError,
     "D/broken.jsonl line 1: invalid JSON"),
    ({"data.files.paths": "D/fake.jsonl.gz"}, DataError,
     "D/fake.jsonl.gz: not a valid gzip file"),
    ({"data.files.paths": "D/empty.txt"}, DataError, "D/empty.txt: empty file"),
    ({"data.files.paths": "D/data.csv"}, DataError,
     "D/data.csv: unknown file type"),
    ({"data.tokenizer": "D/tok.json"}, DataError,
     "tokenizer file D/tok.json: not a Hugging Face tokenizer.json"),
    ({"data.mixture": "stdlib:0.5,web:0.5"}, DataError,
     "data.mixture: unknown source 'web'"),
]


def test_malformed_configs_and_data_fail_before_compiling(tmp_path):
  _bad_files(tmp_path)
  for i, (overrides, exc, text) in enumerate(BAD_INPUTS):
    cfg = _config()
    for key, value in overrides.items():
      value = value.replace("D/", f"{tmp_path}/") if isinstance(
          value, str) else value
      if key.startswith("data.files."):
        cfg.data.source = "files"
        cfg.data.files[key.split(".")[-1]] = value
      else:
        group, name = key.split(".")
        cfg[group][name] = value
    workdir = tmp_path / f"run_{i}"
    with pytest.raises(exc) as e:
      train_lib.train(cfg, str(workdir))
    assert text.replace("D/", f"{tmp_path}/") in str(e.value), str(e.value)
    assert not (workdir / "checkpoints").exists()
  unknown = _config()
  unknown.guard.unlock()
  unknown.guard.polcy = "skip"
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown config key 'guard.polcy'"):
    train_lib.train(unknown, str(tmp_path / "typo"))


# ---------------------------------------------------------------- llmlab plan


def test_plan_reports_bytes_and_suggests_a_setting_that_fits(capsys):
  cfg = _config()  # the step the training tests compiled: a cache hit
  res = plan_lib.plan(cfg, hbm_bytes=1e12, accelerator_layout=False)
  rep = res["per_device"]
  assert res["fits"] and res["suggestion"] is None
  info = train_lib.model_info(config_lib.merge_defaults(cfg), 259)
  assert rep["params"] == 4 * info["params_total"]
  assert rep["peak"] > rep["params"] + rep["opt_state"]
  # A device just too small for this step: two microbatches must fit.
  limit = rep["peak"] - rep["activations_and_temps"] // 3
  res = plan_lib.plan(cfg, hbm_bytes=limit, max_compiles=1,
                      accelerator_layout=False)
  assert not res["fits"]
  sug = res["suggestion"]
  assert sug["overrides"] == {"train.microbatches": 2}
  assert sug["per_device"]["peak"] <= limit < rep["peak"]
  text = plan_lib.format_plan(res)
  assert "fits: NO" in text and f"suggestion: {sug['flags']}" in text
  # The command line (this process's 1 CPU device as it is).
  flags = [f"--config={ROOT}/configs/tiny.py:smoke", "--hbm_gb=1", "--real",
           "--json"] + [
               f"--config.{k}={OVERRIDES[k]}" for k in (
                   "model.d_model", "model.mlp_dim", "train.seq_len",
                   "train.steps")]
  assert plan_cmd.main(flags) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["fits"] and out["per_device"] == rep
  assert plan_cmd.main(["--config=/nonexistent.py"]) == 2
  assert "nonexistent.py" in capsys.readouterr().err
