"""Checkpoints: exact resume after kill -9 and SIGTERM, incomplete and
corrupted checkpoints, retention, cross-mesh restore, resume refusal, and
reuse (init_from, `llmlab eval`, `llmlab.load`).

One uninterrupted reference run is compared with a run that is killed,
resumed past damaged checkpoints, preempted and resumed again: metrics rows
and the final state must be identical, bit for bit.

Compiling dominates the cost on CPU; this module and its subprocesses use
the test session's persistent compilation cache (tests/conftest.py; a loaded
executable is the same code, so bitwise comparisons are unaffected).
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llmlab import api
from llmlab import runs
from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import train as train_lib
from tests import helpers
from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402

STEPS = 24
OVERRIDES = {
    "model.d_model": 32, "model.num_heads": 4, "model.num_kv_heads": 2,
    "model.mlp_dim": 64, "train.steps": STEPS, "train.seq_len": 32,
    "train.log_every": 1, "train.eval_every": 8, "train.eval_tokens": 1024,
    "checkpoint.every_steps": 4, "checkpoint.keep": 3,
}
TIMING = {"step_time_s", "tokens_per_s", "mfu", "eval_time_s"}


def _config(**extra):
  return config_lib.with_overrides(tiny.get_config("smoke"),
                                   {**OVERRIDES, **extra})


def _flags(**extra):
  return [f"--config={ROOT}/configs/tiny.py:smoke"] + [
      f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]


def _rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in helpers.rows(workdir)]


def _complete(workdir):
  d = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and
                os.path.exists(os.path.join(d, n, ckpt_lib.COMMIT_FILE)))


def _state(workdir, step):
  """Host copy of the full train state of checkpoint `step`."""
  mgr = ckpt_lib.Manager(workdir, _config().checkpoint, STEPS, read_only=True)
  meta = mgr.restore_meta(step)
  setup = runs.setup_for(runs.config_from_dict(meta["config"]), meta)
  state, _ = mgr.restore(step, setup.abstract_state)
  mgr.close()
  return jax.tree.map(np.asarray, state)


def _assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _data_files(workdir, step):
  """The files holding checkpoint `step`'s array data (orbax's OCDBT
  layout: which arrays share a file varies from save to save)."""
  d = os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step), "state")
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                if os.path.basename(r) == "d")


def _flip(paths):
  """Flip 16 bytes in the middle of each file (bit rot the storage missed)."""
  for path in paths:
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
    open(path, "wb").write(bytes(data))


def _start(workdir, sleep):
  cmd = [sys.executable, os.path.join(ROOT, "tests", "ckpt_worker.py"),
         "train", f"--workdir={workdir}", *_flags()]
  return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE,
                          env=helpers.env(CKPT_WORKER_SLEEP=str(sleep)))


def _wait_for(proc, cond, timeout=300):
  t0 = time.time()
  while not cond():
    if proc.poll() is not None:
      raise AssertionError("run ended early:\n" + proc.communicate()[1][-3000:])
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.01)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """An uninterrupted run, in process: checkpoints 12, 16, 20 (keep=3) and
  24 (final)."""
  workdir = str(tmp_path_factory.mktemp("ref"))
  helpers.llmlab("train", f"--workdir={workdir}", *_flags())
  return workdir


def test_kill9_damage_sigterm_resume_is_exact(ref, tmp_path):
  workdir = str(tmp_path / "chain")
  # 1. kill -9 as soon as a checkpoint beyond step 8 is complete.
  proc = _start(workdir, sleep=0.15)
  _wait_for(proc, lambda: any(s > 8 for s in _complete(workdir)))
  proc.kill()
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  killed_at = _complete(workdir)[-1]
  assert killed_at < STEPS

  # Damage: the latest checkpoint's data silently corrupted, a save killed
  # before its rename (orbax's tmp dir), one whose commit marker is missing.
  ckpts = ckpt_lib.checkpoint_dir(workdir)
  _flip(_data_files(workdir, killed_at))
  tmp = f"{killed_at + 1}.orbax-checkpoint-tmp-1234"
  shutil.copytree(os.path.join(ckpts, str(killed_at)), os.path.join(ckpts, tmp))
  shutil.copytree(os.path.join(ckpts, str(killed_at)),
                  os.path.join(ckpts, str(killed_at + 2)))
  os.remove(os.path.join(ckpts, str(killed_at + 2), ckpt_lib.COMMIT_FILE))
  previous = _complete(workdir)[-2]

  # 2. Same command: falls back to `previous` with warnings; SIGTERM once it
  # has saved a new checkpoint.
  proc = _start(workdir, sleep=0.15)
  set_aside = os.path.join(ckpts, f"{killed_at}.unreadable")
  _wait_for(proc, lambda: os.path.isdir(set_aside) and
            _complete(workdir)[-1] > previous)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert (f"checkpoints/{killed_at} is corrupted: checksum mismatch" in err
          or f"checkpoints/{killed_at} is unreadable" in err)
  assert "falling back to the previous checkpoint" in err
  assert f"{tmp} (a save was interrupted)" in err
  assert f"checkpoints/{killed_at + 2} (no commit_success.txt" in err
  assert f"resumed from step {previous}" in err
  assert os.path.isdir(os.path.join(ckpts, f"{killed_at + 2}.incomplete"))
  assert not os.path.exists(os.path.join(ckpts, tmp))  # orbax removed it
  # Human messages on stderr; stdout is the one JSON summary line.
  assert "SIGTERM received" in err and "re-run the same command" in err
  assert f"--workdir={workdir}" in err.split("re-run the same command")[1]
  assert len(out.strip().splitlines()) == 1
  stopped = json.loads(out)["step"]
  assert previous < stopped < STEPS
  assert stopped in _complete(workdir)

  # 3. Same command again: runs to the end.
  proc = _start(workdir, sleep=0.0)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"resumed from step {stopped}" in err

  rows = _rows(workdir)
  assert rows == _rows(ref)  # one row per logged step, identical losses
  _assert_bitwise_equal(_state(workdir, STEPS), _state(ref, STEPS))


def test_truncated_or_corrupted_files_are_a_clear_error(ref, tmp_path,
                                                        caplog):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(ref, workdir)
  for path in _data_files(workdir, 24):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
  _flip(_data_files(workdir, 20))
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"checkpoints/24 is unreadable"):
    api.load(workdir)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"checkpoints/20 is (corrupted|unreadable)"):
    api.load(workdir, step=20)
  assert api.load(workdir, step=16).step == 16
  # What resuming does: warn, set both aside, use 16.
  caplog.set_level(logging.WARNING, logger="llmlab")
  setup = runs.setup_for(_config(), runs.read_config(ref)[1])
  mgr = ckpt_lib.Manager(workdir, _config().checkpoint, STEPS)
  state, meta = mgr.restore_latest(setup.abstract_state)
  mgr.close()
  assert meta["step"] == 16 and int(state["step"]) == 16
  assert "checkpoints/24 is unreadable" in caplog.text
  assert "checkpoints/20 is" in caplog.text
  assert _complete(workdir) == [12, 16]


def test_checksums_catch_data_that_reads_fine_but_is_wrong(tmp_path):
  """Well-formed array files that are not the ones saved (orbax reads
  them without complaint) must not restore silently."""
  cfg = config_lib.base().checkpoint
  workdir = str(tmp_path / "swap")
  mgr = ckpt_lib.Manager(workdir, cfg, 10)
  a = {"step": jax.numpy.int32(1), "w": jax.numpy.arange(12.0).reshape(3, 4)}
  b = {"step": jax.numpy.int32(1), "w": a["w"].at[1, 2].set(-1.0)}
  mgr.save(1, a, {"step": 1}, force=True)
  mgr.save(2, b, {"step": 2}, force=True)
  mgr.close()
  d = ckpt_lib.checkpoint_dir(workdir)
  shutil.rmtree(os.path.join(d, "1", "state"))
  shutil.copytree(os.path.join(d, "2", "state"), os.path.join(d, "1", "state"))
  mgr = ckpt_lib.Manager(workdir, cfg, 10, read_only=True)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), a)
  restored, _ = mgr.restore(2, abstract)
  assert np.asarray(restored["w"])[1, 2] == -1.0
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"checkpoints/1 is corrupted: checksum mismatch "
                     r"for \['w'\] \(1 of 2 arrays"):
    mgr.restore(1, abstract)
  mgr.close()
  assert ckpt_lib.checksums(a) != ckpt_lib.checksums(b)


def test_resume_with_another_model_is_refused(ref, tmp_path):
  workdir = str(tmp_path / "other")
  shutil.copytree(ref, workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(config_lib.ConfigError) as e:
    train_lib.train(_config(**{"model.d_model": 48, "model.mlp_dim": 96}),
                    workdir)
  msg = str(e.value)
  assert "model.d_model: checkpoint 32 != config 48" in msg
  assert "model.mlp_dim: checkpoint 64 != config 96" in msg
  assert "num_layers" not in msg and "init_from" in msg
  distill = _config(**{"objective.name": "distill"})
  distill.objective.teacher = ref
  with pytest.raises(config_lib.ConfigError,
                     match="objective.name: checkpoint 'next_token' != "
                     "config 'distill'"):
    train_lib.train(distill, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert _complete(workdir) == [12, 16, 20, 24]


def test_retention_keeps_sweep_points_and_latest_others(tmp_path):
  cfg = config_lib.base().checkpoint
  cfg.update(every_steps=2, keep=2, sweep_points=3, sweep_min_fraction=0.1,
             keep_at_steps=(7,))
  workdir = str(tmp_path / "ret")
  mgr = ckpt_lib.Manager(workdir, cfg, 40)
  assert mgr.sweep == [4, 13, 40]
  state = {"step": jax.numpy.int32(0), "w": jax.numpy.zeros((4, 4))}
  saved = [s for s in range(1, 41) if mgr.save(s, state, {"step": s})]
  mgr.close()
  assert saved == sorted(set(range(2, 41, 2)) | {7, 13})
  # sweep + keep_at + final forever; the latest `keep`=2 of the others.
  # (orbax's LatestN(2) would count 40 among the latest, keeping only 38.)
  assert _complete(workdir) == [4, 7, 13, 36, 38, 40]
  # A longer schedule later: what was protected stays protected.
  mgr = ckpt_lib.Manager(workdir, cfg, 80)
  for s in range(41, 61):
    mgr.save(s, state, {"step": s})
  mgr.close()
  assert _complete(workdir) == [4, 7, 13, 40, 58, 60]


def test_sweep_steps_are_log_spaced():
  assert ckpt_lib.sweep_steps(1000, 4, 0.001) == [1, 10, 100, 1000]
  assert ckpt_lib.sweep_steps(1000, 0, 0.1) == [1000]
  steps = ckpt_lib.sweep_steps(10_000, 8, 0.01)
  ratios = np.diff(np.log(steps))
  assert len(steps) == 8 and np.allclose(ratios, ratios[0], rtol=0.01)


def test_cross_mesh_restore(tmp_path, devices):
  """Saved from mesh (data, fsdp, tensor) = (2,2,2) on 8 simulated devices;
  restored bitwise, in the target layout, on 1 device and on fsdp=8."""
  spec = {"workdir": str(tmp_path / "mesh"), "vocab": 64, "seq_len": 32,
          "model": {"d_model": 32, "num_heads": 4, "num_kv_heads": 2,
                    "mlp_dim": 64}}
  res = devices(8).call("tests.ckpt_worker:mesh_check", spec)
  assert res["saved_devices"] == 8
  for name, devices in (("mesh222", 8), ("one_device", 1), ("fsdp8", 8)):
    assert res["restores"][name] == {"placed": True, "devices": devices,
                                     "bitwise_equal": True}, name
  assert res["load"] == {"step": 3, "logits_shape": [2, 8, 64],
                         "finite": True, "devices": 1}


def test_init_from_restores_params_not_optimizer(ref):
  cfg = _config()
  cfg.init_from = f"{ref}:12"
  cfg, _, setup = train_lib.prepare(cfg)
  state = jax.tree.map(np.asarray, train_lib.initial_state(setup, cfg))
  _assert_bitwise_equal(state["params"], _state(ref, 12)["params"])
  assert int(state["step"]) == 0
  fresh = jax.tree.map(np.asarray, train_lib.initial_state(
      setup, _config()))  # no init_from: same seed, fresh optimizer
  _assert_bitwise_equal(state["opt_state"], fresh["opt_state"])
  saved_mu = jax.tree.leaves(_state(ref, 12)["opt_state"])
  assert any(np.any(x != 0) for x in saved_mu if x.ndim)  # it was not read
  bad = _config(**{"model.d_model": 48, "model.mlp_dim": 96})
  bad_setup = runs.setup_for(bad, runs.read_config(ref)[1])
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.d_model: 32 \(in .*\) != 48"):
    runs.restore_params(ref, bad_setup)


def test_load_api(ref):
  import llmlab
  run = llmlab.load(ref)
  assert run.step == STEPS and run.config.model.d_model == 32
  assert run.info["tokens"] == STEPS * 8 * 32
  _assert_bitwise_equal(jax.tree.map(np.asarray, run.params),
                        _state(ref, STEPS)["params"])
  tokens_BxL = np.array([[72, 101, 108, 108, 111, 32, 119, 111]] * 2)
  logits_BxLxV = np.asarray(run.logits(tokens_BxL))
  assert logits_BxLxV.shape == (2, 8, 259)
  assert np.isfinite(logits_BxLxV).all()
  assert llmlab.load(f"{ref}:12").step == 12
  assert llmlab.load(ref, step=16).step == 16
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 5"):
    llmlab.load(ref, step=5)


def test_eval_cli_prints_json(ref):
  out = helpers.llmlab("eval", f"--workdir={ref}", "--step=16")
  res = json.loads(out.stdout)
  assert res["step"] == 16 and res["tokens"] == 16 * 8 * 32
  assert 0 < res["eval_loss"] < 10 and res["eval_bpb"] > 0
  logged = [r for r in _rows(ref) if "eval_loss" in r and r["step"] == 16]
  assert logged[0]["eval_loss"] == pytest.approx(res["eval_loss"], rel=1e-5)
