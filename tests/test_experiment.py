"""The experiment harness (llmlab/experiment.py) with a stub run function:
skip-if-finished, Preempted, wall time across invocations, the JSON
encoder, the evaluation cache and the compilation-cache choice. No JAX
training: milliseconds."""

import json
import os

import jax
import numpy as np
import pytest

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import errors
from llmlab import experiment
from llmlab import storage


class Clock:
  """A settable time.monotonic."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def _cfg(steps=3):
  return experiment.derive(config_lib.base(), {"train": {"steps": steps}})


def _stub(calls, clock=None, seconds=0.0, preempt=False):
  """A run function that 'trains': writes config.json and, unless
  preempted, the committed final checkpoint."""
  def train(cfg, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"model_info": {"params_nonembed": 7}}, f)
    if clock is not None:
      clock.now += seconds
    if not preempt:
      final = os.path.join(ckpt_lib.checkpoint_dir(workdir),
                           str(cfg.train.steps))
      os.makedirs(final, exist_ok=True)
      open(os.path.join(final, ckpt_lib.COMMIT_FILE), "w").close()
    return {"preempted": preempt, "step": cfg.train.steps, "eval_loss": 1.5}
  return train


def test_finished_runs_are_skipped(tmp_path):
  calls = []
  ex = experiment.Experiment(str(tmp_path), _stub(calls))
  ex.start(config_lib.base(), "study_config.json")
  run = str(tmp_path / "runs" / "a")
  assert ex.train(_cfg(), run)["eval_loss"] == 1.5
  seeded = []
  assert ex.train(_cfg(), run, before=lambda: seeded.append(1)) is None
  assert calls == [run] and seeded == []  # nor is `before` called
  # Another length is another final checkpoint: not finished.
  assert ex.train(_cfg(steps=5), run) is not None and len(calls) == 2
  # A checkpoint without its commit file (a save that died) is not final.
  other = str(tmp_path / "runs" / "b")
  os.makedirs(os.path.join(ckpt_lib.checkpoint_dir(other), "3"))
  ex.train(_cfg(), other)
  assert calls[-1] == other
  s = ex.summary(_cfg(), run)
  assert s["params_nonembed"] == 7 and s["step"] == 3
  assert json.load(open(tmp_path / "study_config.json"))["train"]["steps"] > 0


def test_preempted_propagates_and_time_still_counts(tmp_path):
  clock, calls = Clock(), []
  ex = experiment.Experiment(str(tmp_path), _stub(calls, clock, 30.0, True),
                             clock=clock)
  ex.start(config_lib.base(), "c.json")
  run = str(tmp_path / "r")
  with pytest.raises(experiment.Preempted, match=str(run)):
    ex.train(_cfg(), run)
  state = json.load(open(tmp_path / experiment.STATE))
  assert state["wall_time_total_s"] == 30.0  # saved before raising
  assert ex.run_seconds(run) == 30.0
  # The resumed run (config.json exists) adds to its seconds.
  ex2 = experiment.Experiment(str(tmp_path), _stub(calls, clock, 5.0),
                              clock=clock)
  ex2.train(_cfg(), run)
  assert ex2.run_seconds(run) == 35.0 and calls == [run, run]


def test_wall_time_accumulates_across_invocations(tmp_path):
  clock = Clock()
  first = experiment.Experiment(str(tmp_path), _stub([], clock, 10.0),
                                clock=clock)
  first.start(config_lib.base(), "c.json")
  first.train(_cfg(), str(tmp_path / "r"))
  clock.now += 2.0
  assert first.wall_time() == {"wall_time_total_s": 12.0,
                               "wall_time_this_run_s": 12.0}
  clock.now += 100.0  # between invocations: not counted
  second = experiment.Experiment(str(tmp_path), _stub([], clock, 10.0),
                                 clock=clock)
  second.start(config_lib.base(), "c.json")
  assert second.train(_cfg(), str(tmp_path / "r")) is None
  clock.now += 3.0
  assert second.wall_time() == {"wall_time_total_s": 15.0,
                                "wall_time_this_run_s": 3.0}
  with second.timed("eval_s"):
    clock.now += 4.0
  assert second.timing == {"eval_s": 4.0}


def test_total_seeded_from_a_result_of_before_the_harness(tmp_path):
  (tmp_path / "compress.json").write_text(json.dumps(
      {"wall_time_total_s": 50.0}))
  clock = Clock()
  ex = experiment.Experiment(str(tmp_path), total_from="compress.json",
                             clock=clock)
  clock.now += 1.0
  assert ex.wall_time()["wall_time_total_s"] == 51.0


def test_one_json_encoder(tmp_path):
  obj = {"f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True),
         "a": np.arange(3), "other": config_lib.ConfigError("x")}
  path = str(tmp_path / "out.json")
  experiment.write_json(path, obj)
  assert json.load(open(path)) == {"f": 0.5, "i": 3, "b": True,
                                   "a": [0, 1, 2], "other": "x"}
  assert not os.path.exists(path + ".tmp")


def test_cache_is_discarded_when_its_identity_changes(tmp_path):
  path = str(tmp_path / "evals.json")
  identity = {"eval_tokens": 1024, "data": {"include": ("a", "b")}}
  cache = experiment.Cache(path, identity)
  cache.put("k", [1.0, 2.0])
  # Read back (tuples became lists on disk): the same identity.
  assert experiment.Cache(path, identity).get("k") == [1.0, 2.0]
  other = experiment.Cache(path, dict(identity, eval_tokens=2048))
  assert other.get("k") is None
  other.put("j", 1)
  assert experiment.Cache(path, identity).get("j") is None


def test_compile_cache_off_is_respected(monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("LLMLAB_COMPILE_CACHE", "off")
    assert experiment.compile_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    # A cache the process set up is used as it is.
    jax.config.update("jax_compilation_cache_dir", before)
    assert experiment.compile_cache() == before
    assert jax.config.jax_compilation_cache_dir == before
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_derive_nested_changes():
  base = config_lib.base()
  c = experiment.derive(base, {"name": "x", "model": {"d_model": 48},
                               "checkpoint": {"keep_at_steps": (2, 4)},
                               "objective": {}})
  assert (c.name, c.model.d_model, c.checkpoint.keep_at_steps) == (
      "x", 48, (2, 4))
  assert base.model.d_model != 48  # a copy
  with pytest.raises(config_lib.ConfigError, match="model.nope"):
    experiment.derive(base, {"model": {"nope": 1}})


def test_study_progress_line(tmp_path):
  clock, calls = Clock(), []
  ex = experiment.Experiment(str(tmp_path), _stub(calls, clock, 60.0),
                             clock=clock)
  ex.start(config_lib.base(), "c.json")
  runs_ = [(_cfg(steps=s), str(tmp_path / f"r{s}")) for s in (2, 4, 6)]
  ex.expect(runs_)
  per_step = 8 * 128  # base(): batch 8 x seq 128
  assert ex.progress() == ("study: 0/3 runs, 0/12.3k tokens, 0.0 min "
                           "elapsed, ETA ?")
  ex.train(*runs_[0])  # 2 steps in 60 s: 2048 tokens / min
  line = ex.progress()
  assert line.startswith(f"study: 1/3 runs, {2 * per_step / 1e3:.1f}k/12.3k")
  assert line.endswith("1.0 min elapsed, ETA 5.0 min")  # 10 steps left
  # A resumed study counts finished runs as done, not as throughput.
  again = experiment.Experiment(str(tmp_path), _stub(calls), clock=clock)
  again.expect(runs_)
  assert again.progress().startswith("study: 1/3 runs")
  assert again.progress().endswith("ETA ?")


def test_one_json_policy(tmp_path):
  """storage.dumps, which every JSON llmlab writes goes through: numpy and
  jax values as numbers and lists, NaN and inf as null, other objects as
  their str; strict JSON (no NaN literal) that reads back as written."""
  obj = {"nan": float("nan"), "inf": np.float32(np.inf), 3: (1, None),
         "a": np.arange(2), "j": jax.numpy.ones(2), "b": np.bool_(True),
         "cfg": config_lib.base().guard, "path": tmp_path}
  text = storage.dumps(obj, sort_keys=True)
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"nan": None, "inf": None, "3": [1, None],
                              "a": [0, 1], "j": [1.0, 1.0], "b": True,
                              "cfg": str(obj["cfg"]), "path": str(tmp_path)}
  experiment.write_json(str(tmp_path / "r.json"), {"loss": float("nan")})
  assert experiment.read_json(str(tmp_path / "r.json")) == {"loss": None}


def test_unreadable_json_and_missing_files_are_user_errors(tmp_path):
  bad = tmp_path / "fit.json"
  bad.write_text("{oops")
  with pytest.raises(errors.DataError, match=f"{bad}: not valid JSON"):
    storage.read_json(str(bad))
  with pytest.raises(errors.NotFound, match="no such file"):
    storage.read_text(str(tmp_path / "none.json"))
  with pytest.raises(FileNotFoundError):  # what callers caught before
    storage.read_bytes(str(tmp_path / "none.json"))


def test_train_all_packs_runs_respecting_needs_and_groups(tmp_path):
  """Two groups train side by side: a job starts only after the runs it
  needs finished, each run sees its own group's devices, and a study's
  bookkeeping (done, run seconds) is the same as one after another."""
  import threading
  import time
  from llmlab import sharding
  seen, lock, starts = {}, threading.Lock(), []
  inner = _stub([])

  def run(cfg, workdir):
    with lock:
      starts.append(os.path.basename(workdir))
      seen[os.path.basename(workdir)] = tuple(sharding.devices())
    time.sleep(0.05)
    return inner(cfg, workdir)
  ex = experiment.Experiment(str(tmp_path), run)
  ex.start(config_lib.base(), "c.json")
  d = jax.devices()[0]
  groups = [[d], [d]]  # one CPU device here: the groups are what is checked
  w = lambda n: str(tmp_path / n)  # noqa: E731
  jobs = [experiment.Job(_cfg(), w("big")),
          experiment.Job(_cfg(), w("big_branch"), needs=(w("big"),)),
          experiment.Job(_cfg(), w("small")),
          experiment.Job(_cfg(), w("small2"))]
  ex.train_all(jobs, groups)
  assert starts.index("big_branch") > starts.index("big")
  assert set(starts) == {"big", "big_branch", "small", "small2"}
  assert all(v == (d,) for v in seen.values())
  assert len(ex.done) == 4 and set(ex.state["run_seconds"]) == {
      "big", "big_branch", "small", "small2"}
  # Finished: nothing trains again.
  starts.clear()
  ex.train_all(jobs, groups)
  assert starts == []


def test_train_all_raises_the_first_error_after_the_others_finish(tmp_path):
  inner = _stub([])
  finished = []

  def run(cfg, workdir):
    if workdir.endswith("bad"):
      raise ValueError("boom")
    out = inner(cfg, workdir)
    finished.append(os.path.basename(workdir))
    return out
  ex = experiment.Experiment(str(tmp_path), run)
  ex.start(config_lib.base(), "c.json")
  d = jax.devices()[0]
  w = lambda n: str(tmp_path / n)  # noqa: E731
  jobs = [experiment.Job(_cfg(), w("bad")),
          experiment.Job(_cfg(), w("ok"), needs=(w("bad"),))]
  with pytest.raises(ValueError, match="boom"):
    ex.train_all(jobs, [[d], [d]])
  assert finished == []  # its need failed: never started
  # A preempted run surfaces as Preempted, as when trained alone.
  ex2 = experiment.Experiment(str(tmp_path / "p"), _stub([], preempt=True))
  ex2.start(config_lib.base(), "c.json")
  with pytest.raises(experiment.Preempted):
    ex2.train_all([experiment.Job(_cfg(), w("p/a")),
                   experiment.Job(_cfg(), w("p/b"))], [[d], [d]])


def test_device_groups_split_every_process_evenly():
  from llmlab import sharding

  class Dev:
    def __init__(self, i, p):
      self.id, self.process_index = i, p
  devs = [Dev(i, i // 4) for i in range(8)]  # 2 processes x 4 devices
  a, b = sharding.split_devices(devs, 2)
  assert [d.id for d in a] == [0, 1, 4, 5] and [d.id for d in b] == [2, 3, 6, 7]
  with pytest.raises(ValueError, match="3 equal parts"):
    sharding.split_devices(devs, 3)
  assert experiment.device_groups(1) is None


def test_train_all_names_jobs_whose_needs_are_not_planned(tmp_path):
  ex = experiment.Experiment(str(tmp_path), _stub([]))
  ex.start(config_lib.base(), "c.json")
  d = jax.devices()[0]
  job = experiment.Job(_cfg(), str(tmp_path / "b"), needs=(str(tmp_path / "x"),))
  with pytest.raises(RuntimeError, match="not planned"):
    ex.train_all([experiment.Job(_cfg(), str(tmp_path / "a")), job], [[d], [d]])
