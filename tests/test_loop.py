"""The train loop in-process: the core's hook order, and the real Trainer's
hooks (metrics one step late, rollback, preemption) around a stub step, so
no test here compiles a train step or starts a process."""

import json
import os
import signal

import numpy as np
import pytest

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import guard
from llmlab import loop
from llmlab import objectives
from llmlab import runs
from llmlab import train
from tests.helpers import rows as _rows


def test_core_runs_due_hooks_in_order_and_stops():
  seen = []
  step_fn = lambda s, c, b: (s + 1, c, {"m": s + 1})
  hooks = [
      loop.Hook("a", lambda e: seen.append(("a", e.step))),
      loop.Hook("b", lambda e: seen.append(("b", e.step)), due=loop.every(2)),
      loop.Hook("c", lambda e: setattr(e, "stop", e.step == 4),
                finish=lambda e: seen.append(("finish", e.step))),
  ]
  end = loop.run(step_fn, 0, None, iter(range(100)), 0, 7, hooks)
  assert end.step == 4 and end.stop and end.state == 4
  assert seen == [("a", 1), ("a", 2), ("b", 2), ("a", 3), ("a", 4), ("b", 4),
                  ("finish", 4)]
  assert loop.run(step_fn, 7, None, iter([]), 7, 7, hooks) is None
  assert [e for e in range(1, 8) if loop.every(3)(
      loop.StepEnd(e, 7, None, None, None))] == [3, 6, 7]
  assert not loop.every(0, final=False)(loop.StepEnd(7, 7, None, None, None))


class _Signal:
  def __init__(self, at=None):
    self.at = at

  def reached(self, step):
    return step == self.at


def _config(**overrides):
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                 mlp_dim=64)
  c.train.update(steps=8, batch_size=2, seq_len=16, log_every=1,
                 eval_tokens=64)
  c.data.update(source="synthetic")
  c.data.synthetic.update(num_docs=50, doc_len=64)
  c.checkpoint.update(every_steps=2, keep=10)
  c.guard.update(preflight=False, policy="rollback")
  return config_lib.with_overrides(c, overrides)


class _Recorder(train.Trainer):
  """The real Trainer with a stub step that records what happens when."""

  def __init__(self, cfg, workdir, sig, bad_data_step=None):
    cfg, data, setup = train.prepare(cfg)
    aux = objectives.prepare(cfg, setup, runs.load_teacher)
    info = dict(train.model_info(cfg, data.vocab_size),
                peak_flops_per_device=1e9)
    mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps)
    super().__init__(train.RunContext(cfg, workdir, data, setup, aux, info,
                                      mgr, sig))
    self.events, self.bad_data_step = [], bad_data_step
    self.train_step = self._stub

  def _stub(self, state, carry, batch):
    step = int(state["step"]) + 1
    self.events.append(("step", step))
    g = {k: np.int32(0) for k in guard.COUNT_KEYS}
    bad = self.bad_data_step is not None and step + self.offset == \
        self.bad_data_step
    g.update(bad_step=np.int32(step if bad else -1),
             bad_kind=np.int32(1 if bad else 0),
             bad_value=np.float32(np.nan if bad else 0), bad_median=0.0)
    metrics = {"loss": np.float32(10.0 - step), "grad_norm": np.float32(1),
               "learning_rate": np.float32(1e-3), "guard": g}
    return dict(state, step=state["step"] + 1), carry, metrics

  def open_writer(self, start):
    super().open_writer(start)
    row = self.writer.row
    self.writer.row = lambda r, tags: (
        self.events.append(("row", r["step"], "loss" in r)), row(r, tags))

  def run_eval(self, params):
    return {"eval_loss": 1.0, "eval_bpb": 1.0}


def test_metrics_are_read_one_step_late(tmp_path, capsys):
  t = _Recorder(_config(**{"checkpoint.every_steps": 4}), str(tmp_path),
                _Signal())
  try:
    summary = t.run()
  finally:
    t.mgr.close()
  assert summary["step"] == 8 and not summary["preempted"]
  at = lambda event: t.events.index(event)
  for step in (1, 2, 3, 5, 6, 7):
    # Row s is written after step s + 1 was dispatched, never before ...
    assert at(("step", step + 1)) < at(("row", step, True))
  for step in (4, 8):
    # ... except at a save, which writes every row up to its step first.
    assert at(("step", step)) < at(("row", step, True))
    if step < 8:
      assert at(("row", step, True)) < at(("step", step + 1))
  assert [r["step"] for r in _rows(str(tmp_path)) if "loss" in r] == list(
      range(1, 9))
  assert t.mgr.steps() == [4, 8]
  # The eval row reaches the console as it happens, with its budget.
  assert "step 8/8  eval loss 1.0000  bpb 1.0000" in capsys.readouterr().err


def test_rollback_restores_and_skips_the_bad_batch(tmp_path):
  t = _Recorder(_config(), str(tmp_path), _Signal(), bad_data_step=5)
  try:
    summary = t.run()
  finally:
    t.mgr.close()
  assert summary["step"] == 8 and summary["guard"]["rollbacks"] == 1
  steps = [e[1] for e in t.events if e[0] == "step"]
  # Bad at 5, seen with row 5 after step 6 (a save point): back to 4.
  assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]
  assert summary["guard"]["data_offset"] == 1
  rows = [r["step"] for r in _rows(str(tmp_path)) if "loss" in r]
  assert rows == list(range(1, 9))  # one row per step, none doubled
  with open(tmp_path / "guard_events.jsonl") as f:
    event = json.loads(f.readline())
  assert event["event"] == "rollback" and event["to_step"] == 4


def test_preemption_saves_and_stops(tmp_path, capsys):
  t = _Recorder(_config(), str(tmp_path), _Signal(at=3))
  try:
    summary = t.run()
  finally:
    t.mgr.close()
  assert summary["preempted"] and summary["step"] == 3
  assert [e[1] for e in t.events if e[0] == "step"] == [1, 2, 3]
  assert t.mgr.steps() == [2, 3]
  out = capsys.readouterr()
  assert "SIGTERM received; finished step 3" in out.err and not out.out


def test_stop_policy_raises_before_the_save(tmp_path):
  t = _Recorder(_config(**{"guard.policy": "stop"}), str(tmp_path),
                _Signal(), bad_data_step=3)
  try:
    with pytest.raises(guard.Diverged, match="step 3"):
      t.run()
  finally:
    t.mgr.close()
  assert t.mgr.steps() == [2]  # nothing saved after the bad step


def test_hooks_added_from_outside_run_in_order_after_the_builtins(tmp_path):
  """`add_hook(fn, every=N)`: due every N steps and at the last; after the
  built-in hooks (the save at step 4 precedes the hook at 4), in the order
  added; `finish` once at the end; a hook can stop the run cleanly."""
  t = _Recorder(_config(**{"checkpoint.every_steps": 4}), str(tmp_path),
                _Signal())
  assert [h.name for h in t.hooks] == ["watchdog", "preemption", "metrics",
                                       "guard", "eval", "save", "profile"]
  t.add_hook(lambda end: t.events.append(("every3", end.step)),
             every=3, finish=lambda end: t.events.append(("finish", end.step)))
  t.add_hook(loop.Hook("stop", lambda end: setattr(end, "stop", True),
                       due=lambda end: end.step == 6))
  try:
    summary = t.run()
  finally:
    t.mgr.close()
  ours = [e for e in t.events if e[0] in ("every3", "finish")]
  assert ours == [("every3", 3), ("every3", 6), ("finish", 6)]
  at = t.events.index
  for step in (3, 6):  # after the metrics hook wrote the previous row
    assert at(("row", step - 1, True)) < at(("every3", step))
  # Stopped by the hook after step 6: a clean early stop that saves the
  # step (no preemption).
  assert summary["step"] == 6 and not summary["preempted"]
  assert t.mgr.steps() == [4, 6]
  assert [e[1] for e in t.events if e[0] == "step"] == [1, 2, 3, 4, 5, 6]


def test_train_takes_hooks(tmp_path):
  """`train(cfg, workdir, hooks=...)`, the public way in, on a real run:
  a plain function sees every step, a `loop.hook(fn, every=2)` every other
  one and the last, with the step's device metrics."""
  seen, losses = [], []
  cfg = _config(**{"train.steps": 3, "checkpoint.every_steps": 0,
                   "train.eval_every": 0})
  summary = train.train(cfg, str(tmp_path), hooks=[
      lambda end: seen.append(end.step),
      loop.hook(lambda end: losses.append(
          (end.step, float(end.metrics["loss"]))), every=2)])
  assert summary["step"] == 3 and seen == [1, 2, 3]
  assert [s for s, _ in losses] == [2, 3]
  rows = {r["step"]: r["loss"] for r in _rows(str(tmp_path)) if "loss" in r}
  assert all(np.isclose(rows[s], loss) for s, loss in losses)


def test_ctrl_c_once_stops_cleanly_twice_aborts(capsys):
  """The first SIGINT only sets the flag (with a note on stderr); the
  second raises KeyboardInterrupt at once; the old handlers come back."""
  before = signal.getsignal(signal.SIGINT)
  with train._Preempted() as sig:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)
    assert sig.reached(1) and sig.name == "SIGINT"
    assert "Ctrl-C again aborts" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_saves_the_step_and_says_how_to_resume(tmp_path, capsys):
  """A real run, Ctrl-C'd from a hook after step 2: it finishes step 3,
  saves it, prints the resume command on stderr and raises Interrupted
  (the command line's exit 130); a re-run resumes from step 3."""
  cfg = _config(**{"train.steps": 6, "checkpoint.every_steps": 0,
                   "train.eval_every": 0})
  ctrl_c = lambda end: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
  with pytest.raises(train.Interrupted, match="after saving step 3"):
    train.train(cfg, str(tmp_path), hooks=[
        loop.Hook("ctrl-c", ctrl_c, due=lambda end: end.step == 2)])
  err = capsys.readouterr().err
  assert "SIGINT received; finished step 3 and saved it" in err
  assert "To resume, re-run the same command" in err
  mgr = ckpt_lib.Manager(str(tmp_path), cfg.checkpoint, 6, read_only=True)
  try:
    assert mgr.steps() == [3]
  finally:
    mgr.close()
  summary = train.train(cfg, str(tmp_path))
  assert summary["step"] == 6 and not summary["preempted"]
  rows = [r["step"] for r in _rows(str(tmp_path)) if "loss" in r]
  assert rows == list(range(1, 7))


def test_cpu_peak_is_measured_once_per_run_directory(tmp_path):
  cfg, _, setup = train.prepare(_config())
  workdir = str(tmp_path)
  first, src = train._peak_flops(cfg, setup, workdir)  # pylint: disable=protected-access
  assert src == "cpu float32 matmul probe" and first > 0
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"model_info": {"peak_flops_per_device": 123.0,
                              "peak_flops_source": src}}, f)
  assert train._peak_flops(cfg, setup, workdir) == (123.0, src)  # pylint: disable=protected-access
  given = config_lib.with_overrides(cfg, {"train.peak_flops": 7.0})
  assert train._peak_flops(given, setup, workdir)[0] == 7.0  # pylint: disable=protected-access


def test_wandb_offline_run_directory(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  t = _Recorder(_config(**{"train.wandb": "llmlab-test", "train.steps": 4}),
                str(tmp_path), _Signal())
  try:
    t.run()
  finally:
    t.mgr.close()
  runs_dir = tmp_path / "wandb"
  offline = [d for d in os.listdir(runs_dir) if d.startswith("offline-run-")]
  assert len(offline) == 1, os.listdir(runs_dir)
  files = os.listdir(runs_dir / offline[0])
  assert any(f.endswith(".wandb") for f in files), files
