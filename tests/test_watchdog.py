"""The step watchdog (llmlab/watchdog.py), in process: the real train loop
(llmlab/loop.py) with a stub step that blocks, a fake exit, a tmp workdir;
and the storage deadline of a read that never answers (llmlab/storage.py)."""

import io
import threading
import time

import pytest

from llmlab import config as config_lib
from llmlab import loop as loop_lib
from llmlab import storage
from llmlab import watchdog


class _Released(Exception):
  """The blocked stub step, released by the fake exit."""


def _run_loop(dog, step_fn, total=5, after=lambda: None):
  """As llmlab/train.py: the loop, then `after` (the final save), armed."""
  hooks = [loop_lib.Hook("watchdog", lambda end: dog.beat(end.step))]
  with dog:
    try:
      end = loop_lib.run(step_fn, {}, {}, iter(range(total)), 0, total,
                         hooks)
    except _Released:
      return None
    after()
    return end


def _blocking_steps(released: threading.Event, ok_steps: int):
  calls = []

  def blocking_step(state, carry, batch):
    calls.append(batch)
    if len(calls) > ok_steps:
      released.wait(30)  # the hang: a read or a collective that never ends
      raise _Released()
    return state, carry, {}
  return blocking_step


def _dog(tmp_path, released, codes, **kw):
  def fake_exit(code):
    codes.append(code)
    released.set()
  out = io.StringIO()
  return watchdog.Watchdog(workdir=str(tmp_path), out=out, exit=fake_exit,
                           poll_s=0.05, **kw), out


def test_fires_when_no_step_completes(tmp_path):
  released, codes = threading.Event(), []
  dog, out = _dog(tmp_path, released, codes, timeout_s=1.0)
  t = time.monotonic()
  _run_loop(dog, _blocking_steps(released, ok_steps=2))
  took = time.monotonic() - t
  assert codes == [watchdog.EXIT_HANG] == [75]
  assert 1.0 <= took < 10, took
  text = out.getvalue()
  assert "llmlab: hang: no step completed in 1 s (train.hang_timeout_s=1)" \
      in text and "last step 2" in text
  assert "in blocking_step" in text and "MainThread" in text
  assert text.strip().splitlines()[-1].startswith("llmlab: hang: ")
  reports = sorted(tmp_path.glob("hang-*.txt"))
  assert len(reports) == 1, reports
  report = reports[0].read_text()
  assert "in blocking_step" in report and "released.wait(30)" in report
  assert f"hang report written to {reports[0]}" in text


def test_sigterm_during_a_hang_exits_after_the_grace(tmp_path):
  """Off (timeout 0) it never fires on its own; SIGTERM without a step
  after it fires after the grace period, saving nothing."""
  released, codes = threading.Event(), []
  term = threading.Event()
  dog, out = _dog(tmp_path, released, codes, timeout_s=0.0,
                  preempted=term.is_set, grace_s=0.5)
  threading.Timer(1.5, term.set).start()
  t = time.monotonic()
  _run_loop(dog, _blocking_steps(released, ok_steps=1))
  took = time.monotonic() - t
  assert codes == [75]
  assert 2.0 <= took < 10, took
  assert "SIGTERM received 1 s ago and no step completed since (grace " \
      "0.5 s); last step 1" in out.getvalue()


def test_steps_keep_it_quiet(tmp_path):
  """Steps shorter than the timeout, and a step completing within the
  SIGTERM grace (the normal preemption path), never fire it."""
  codes = []
  term = threading.Event()

  def step(state, carry, batch):
    time.sleep(0.1)
    if batch == 10:
      term.set()
    return state, carry, {}

  dog = watchdog.Watchdog(1.5, str(tmp_path), preempted=term.is_set,
                          grace_s=0.5, poll_s=0.02, exit=codes.append)
  # the final save after SIGTERM: longer than the grace
  end = _run_loop(dog, step, total=14, after=lambda: time.sleep(1.0))
  assert end.step == 14 and codes == [] and dog.fired is None
  assert not list(tmp_path.glob("hang-*"))


def test_timeout_for():
  assert watchdog.timeout_for(-1, 1) == 0  # auto: off on one process
  assert watchdog.timeout_for(-1, 1, remote=True) == 1800  # gs:// workdir
  assert watchdog.timeout_for(-1, 4) == watchdog.AUTO_TIMEOUT_S == 1800
  assert watchdog.timeout_for(0, 4) == 0
  assert watchdog.timeout_for(90, 1) == 90


@pytest.mark.parametrize("value", [0.5, -2.0, -0.5])
def test_hang_timeout_is_validated(value):
  cfg = config_lib.merge_defaults(config_lib.base())
  cfg.train.unlock()
  cfg.train["hang_timeout_s"] = value
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.train\.hang_timeout_s=.*must be -1 "
                           r"\(auto: 1800 s on multi-process jobs or a "
                           r"remote workdir, else off\)"):
    config_lib.validate(cfg)


def test_a_read_past_its_deadline_names_the_object():
  never = __import__("concurrent.futures").futures.Future()
  t = time.monotonic()
  with pytest.raises(storage.StorageTimeout,
                     match=r"^gs://b/tok/shards/x/tokens: no answer from the "
                           r"storage within 180 s"):
    storage.deadline(never, "gs://b/tok/shards/x/tokens",
                     until=time.monotonic() + 0.2)
  assert time.monotonic() - t < 5


def test_tensorstore_retries_running_out_are_a_stall_not_bad_data():
  assert storage.gave_up(ValueError(
      "ABORTED: All 1 retry attempts failed: CURL error Timeout was reached: "
      "Operation too slow. Less than 1 bytes/sec transferred the last 2 "
      "seconds [curl_code='28']"))
  assert not storage.gave_up(ValueError(
      "DATA_LOSS: Error reading shard index: crc32c mismatch"))


def test_after_a_stall_remote_calls_fail_at_once(monkeypatch):
  """The clean-up of a run that lost its storage (last metrics upload, the
  lock file) does not wait out one retry cycle per call."""
  monkeypatch.setattr(storage, "_STALLED", [])
  with pytest.raises(storage.StorageTimeout):
    storage.deadline(__import__("concurrent.futures").futures.Future(),
                     "gs://b/x", until=time.monotonic())
  assert storage.stalled() == "gs://b/x"
  t = time.monotonic()
  with pytest.raises(storage.StorageTimeout,
                     match=r"gs://b/run/metrics.jsonl: not tried, the storage "
                           r"stopped answering \(gs://b/x\)"):
    storage.upload(__file__, "gs://b/run/metrics.jsonl")
  with pytest.raises(storage.StorageTimeout, match="not tried"):
    storage.exists("gs://b/run/config.json")
  assert time.monotonic() - t < 1
  assert storage.exists(__file__)  # local paths are not affected
  monkeypatch.setattr(storage, "_STALLED", [(time.monotonic() - 1e4, "old")])
  assert storage.stalled() is None  # only for a while after the stall
