"""The experiment harness the studies share (llmlab/scaling/study.py,
llmlab/studies/, llmlab/compress/experiment.py).

A study is a plan -- runs whose configs are derived from the study's base
(`derive`) -- an analysis and a report:

    ex = experiment.Experiment(workdir)
    ex.start(scfg, "mystudy_config.json")
    for r in plan(scfg, workdir):  # [{"cfg": ..., "workdir": ...}, ...]
      ex.train(r["cfg"], r["workdir"])
    result = dict(analyse(...), **ex.wall_time())
    experiment.write_json(ex.path("mystudy.json"), result)

Everything else is here, once:

- `Experiment.train` trains (or resumes) one planned run through a run
  function (default `llmlab.train.train`; tests pass a stub) unless its
  final checkpoint is committed (`runs.finished`: one stat, nothing is
  rebuilt), and raises `Preempted` when the run stopped on SIGTERM;
- `Cache`: evaluations kept on disk, dropped when what they depend on
  (their identity) changed;
- wall time that survives resumes: DIR/experiment.json adds up every
  invocation (a preempted one too) and each run's training time, because a
  study preempted twice should report what it cost, not its last part;
- `write_json` under the package's one JSON policy (`storage.json_safe`:
  NaN -> null), `write_text` (both atomic);
- a study-level progress line before and after every run: runs done of
  planned, tokens done of planned, elapsed, and an ETA from the tokens per
  second this invocation has trained (`expect` registers the plan; a run
  trained without being expected joins it).

Library code never exits the process: `Preempted` propagates to the
command, which says how to resume and exits 0.

Compilation cache: a study's runs use the process's persistent cache
(`runtime.setup_compile_cache`, which the commands call); a library caller
that set none up gets the same default, and `LLMLAB_COMPILE_CACHE=off`
means none. (Studies used to turn on a DIR/.jax_cache whenever the process
had no cache, `off` included; such directories are no longer read.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time

from llmlab import runs
from llmlab import runtime
from llmlab import storage

log = logging.getLogger("llmlab")

STATE = "experiment.json"


class Preempted(RuntimeError):
  """A run of a study received SIGTERM and saved its checkpoint; re-running
  the same command resumes. Raised by library code, handled once by the CLI
  (which prints the message and exits 0)."""


# ------------------------------------------------------------------ files


dumps = storage.dumps  # the one JSON policy (NaN -> null; storage.json_safe)


def write_text(path: str, text: str) -> None:
  """Written whole or not at all: a killed study leaves the old file
  (local or gs://, llmlab/storage.py)."""
  storage.write_text(path, text)


def write_json(path: str, obj, indent: int | None = 2) -> None:
  write_text(path, dumps(obj, indent=indent))


def read_json(path: str, default=None):
  if not storage.exists(path):
    return default
  return storage.read_json(path)


# ---------------------------------------------------------------- configs


def derive(cfg, changes: dict | None = None):
  """`runs.derive` with nested changes, as the studies write them:
  derive(base, {"name": "x", "model": {"d_model": 64}, "train": {...}})."""
  return runs.derive(cfg, dict(_dotted(changes or {})))


def _dotted(changes, prefix: str = ""):
  for key, value in changes.items():
    if isinstance(value, dict) or hasattr(value, "to_dict"):
      yield from _dotted(dict(value), f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def compile_cache() -> str | None:
  """The process's compilation cache if it has one, else the commands'
  default; None (nothing turned on) under LLMLAB_COMPILE_CACHE=off."""
  import jax  # noqa: PLC0415 (a study module imports without jax set up)
  return jax.config.jax_compilation_cache_dir or runtime.setup_compile_cache()


def device_groups(n: int) -> list[list] | None:
  """The devices cut into `n` equal groups for `Experiment.train_all`
  (`sharding.split_devices`); None for n = 1. Devices that cannot be cut
  so (one GPU; a CPU process whose jax started before the command could
  ask for simulated devices): a warning and None, the runs train one after
  another, as a config written for a laptop should still run anywhere."""
  if n <= 1:
    return None
  import jax  # noqa: PLC0415
  from llmlab import sharding  # noqa: PLC0415
  devs = jax.devices()
  try:
    return sharding.split_devices(devs, n)
  except ValueError as e:
    log.warning("parallel=%d: %s (%d %s devices); the runs train one after "
                "another", n, e, len(devs), devs[0].platform)
    return None


# ------------------------------------------------------------------ cache


class Cache:
  """A JSON dict on disk, rewritten atomically after every new entry;
  discarded when its `identity` (what the values depend on) changed, so a
  study re-run with other evaluation settings recomputes instead of mixing."""

  def __init__(self, path: str, identity: dict):
    self.path = path
    self.identity = json.loads(dumps(identity))  # as it reads back
    body = read_json(path, {})
    self.values = body.get("values", {})
    if body and body.get("identity") != self.identity:
      log.warning("%s was made with other settings; recomputing", path)
      self.values = {}

  def get(self, key: str):
    return self.values.get(key)

  def put(self, key: str, value) -> None:
    self.values[key] = value
    write_json(self.path, {"identity": self.identity, "values": self.values},
               indent=None)


# ------------------------------------------------------------- experiment


def _train(cfg, workdir: str) -> dict:
  from llmlab import train  # noqa: PLC0415 (looked up per call: tests patch it)
  return train.train(cfg, workdir)


def _tokens(cfg) -> int:
  return int(cfg.train.steps) * int(cfg.train.batch_size) * int(
      cfg.train.seq_len)


def _human(n: float) -> str:
  for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.1f}{unit}"
  return f"{n:.0f}"


@dataclasses.dataclass(frozen=True)
class Job:
  """One run for `Experiment.train_all`: its config and directory,
  `before()` to call just before it trains (a branch copying its start
  checkpoint), and the run directories it needs finished first."""
  cfg: object
  workdir: str
  before: object = None
  needs: tuple = ()


class Experiment:
  """One study directory: trains its planned runs, keeps its wall time.

  `train_fn(cfg, workdir) -> summary` (with "preempted") trains one run;
  `total_from` names a result file whose `wall_time_total_s` seeds the
  total of a directory made before DIR/experiment.json existed.
  """

  def __init__(self, workdir: str, train_fn=None, total_from: str = "",
               clock=time.monotonic):
    self.workdir, self.clock = workdir, clock
    self.train_fn = train_fn or _train
    self.started = clock()
    self.cpu_started = time.process_time()
    self.timing = {}  # this invocation's seconds by `timed` key
    self.cpu_timing = {}  # and its CPU seconds
    self.state = read_json(self.path(STATE))
    if self.state is None:
      old = read_json(self.path(total_from), {}) if total_from else {}
      self.state = {"wall_time_total_s": old.get("wall_time_total_s", 0.0),
                    "run_seconds": {}}
    # CPU seconds of this process (all threads) per run: on a shared CPU the
    # wall clock also counts other jobs' time, the CPU time does not.
    self.state.setdefault("run_cpu_seconds", {})
    self.before = self.state["wall_time_total_s"]
    self.planned = {}  # workdir -> tokens, in plan order
    self.done = set()
    self.trained_tokens, self.trained_s = 0, 0.0
    self._lock = threading.RLock()  # runs trained side by side (train_all)
    self._active, self._busy_from = 0, 0.0

  def expect(self, planned) -> None:
    """Register (cfg, workdir) pairs the study will train, for progress."""
    with self._lock:
      for cfg, workdir in planned:
        self.planned.setdefault(workdir, _tokens(cfg))
        if runs.finished(workdir, cfg.train.steps):
          self.done.add(workdir)

  def progress(self, note: str = "") -> str:
    """'study: 3/30 runs, 1.2M/4.6M tokens, 2.1 min elapsed, ETA 7.9 min'."""
    total = sum(self.planned.values())
    done = sum(t for w, t in self.planned.items() if w in self.done)
    busy = self.trained_s + (self.clock() - self._busy_from
                             if self._active else 0.0)
    rate = self.trained_tokens / busy if busy else 0.0
    eta = f"{(total - done) / rate / 60:.1f} min" if rate else "?"
    line = (f"study: {len(self.done)}/{len(self.planned)} runs, "
            f"{_human(done)}/{_human(total)} tokens, "
            f"{(self.clock() - self.started) / 60:.1f} min elapsed, ETA {eta}")
    line += f" -- {note}" if note else ""
    log.info(line)
    return line

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def start(self, scfg, config_name: str) -> None:
    """Make DIR, record the study's config in it, pick the compile cache."""
    storage.makedirs(self.workdir)
    compile_cache()
    write_text(self.path(config_name), scfg.to_json_best_effort(indent=2))

  def train(self, cfg, workdir: str, before=None) -> dict | None:
    """Trains (or resumes) run `workdir` unless it is finished; returns the
    run function's summary, None for a finished run. `before()` (a branch
    copying its start checkpoint) runs only when the run will train."""
    self.expect([(cfg, workdir)])
    if runs.finished(workdir, cfg.train.steps):
      return None
    key = self._begin(workdir, before)
    t, c = self.clock(), time.process_time()
    summary = None
    try:
      with runtime.quiet_runs():  # the study's progress, not the run's
        summary = self.train_fn(cfg, workdir)
    finally:
      self._end(workdir, key, t, c, summary)
    if summary["preempted"]:
      raise Preempted(f"preempted (SIGTERM) during {workdir}; it saved its "
                      "checkpoint. Re-run the same command to resume.")
    log.info("trained %s: step %d eval_loss %.4f in %.0f s", workdir,
             summary["step"], summary.get("eval_loss") or float("nan"),
             self.clock() - t)
    return summary

  def _begin(self, workdir: str, before) -> str:
    with self._lock:
      key = os.path.relpath(workdir, self.workdir)
      self.progress(f"training {key}")
      if before is not None:
        before()
      seconds, cpu = self.state["run_seconds"], self.state["run_cpu_seconds"]
      if not storage.exists(storage.join(workdir, "config.json")):
        seconds[key] = cpu[key] = 0.0  # a fresh start, not a resume
      if not self._active:
        self._busy_from = self.clock()
      self._active += 1
      return key

  def _end(self, workdir: str, key: str, t: float, c: float, summary) -> None:
    with self._lock:
      now = self.clock()
      seconds, cpu = self.state["run_seconds"], self.state["run_cpu_seconds"]
      seconds[key] = seconds.get(key, 0.0) + now - t
      cpu[key] = cpu.get(key, 0.0) + time.process_time() - c
      self._active -= 1
      if not self._active:  # the time any run trained, overlaps once
        self.trained_s += now - self._busy_from
      self._save()
      if summary is not None and not summary["preempted"]:
        self.done.add(workdir)
        self.trained_tokens += self.planned[workdir]
        self.progress(f"finished {key}")

  def train_all(self, jobs, groups=None) -> None:
    """Trains `jobs` (`Job`s, in the order to start them), on `groups`:
    disjoint device lists (`sharding.split_devices`), one run at a time on
    each, started in its own thread as soon as a group is free and the
    job's `needs` have finished. None or one group: one after another, in
    the calling thread. Why: a small model cannot fill a machine or slice,
    so a study packs its small members side by side; a run's losses do not
    depend on what trains beside it (tests/test_sharding.py).

    A failure stops new starts; the runs already going finish (a SIGTERM
    or Ctrl-C reaches all of them: each saves its step), then the first
    error is raised."""
    from llmlab import sharding  # noqa: PLC0415 (imports jax)
    if not groups or len(groups) == 1:
      with (sharding.device_scope(groups[0]) if groups
            else contextlib.nullcontext()):
        for job in jobs:
          self.train(job.cfg, job.workdir, before=job.before)
      return
    from llmlab import train as train_lib  # noqa: PLC0415
    self.expect([(j.cfg, j.workdir) for j in jobs])
    pending, running, errors = list(jobs), set(), []
    cond = threading.Condition()
    done = {j.workdir for j in jobs if runs.finished(j.workdir, j.cfg.train.steps)}

    def ready():
      for j in pending:
        if all(n in done for n in j.needs):
          return j
      return None

    def worker(devs):
      while True:
        with cond:
          # Nothing ready and nothing running: nothing ever will be.
          cond.wait_for(lambda: errors or not pending or not running
                        or ready() is not None)
          job = None if errors or not pending else ready()
          if job is None:
            return
          pending.remove(job)
          running.add(job.workdir)
        try:
          with sharding.device_scope(devs):
            self.train(job.cfg, job.workdir, before=job.before)
        except BaseException as e:  # pylint: disable=broad-except
          with cond:
            errors.append(e)
            cond.notify_all()
          return
        with cond:
          running.discard(job.workdir)
          done.add(job.workdir)
          cond.notify_all()

    with train_lib.preemption():  # signals land here, every run reads them
      threads = [threading.Thread(target=worker, args=(list(g),), daemon=True,
                                  name=f"llmlab-study-{i}")
                 for i, g in enumerate(groups)]
      for t in threads:
        t.start()
      for t in threads:
        while t.is_alive():  # a timeout keeps the main thread answering
          t.join(0.5)        # signals (Python runs handlers only there)
    if errors:
      raise next((e for e in errors if isinstance(e, Preempted)), errors[0])
    if pending:  # needs that no job provides
      raise RuntimeError("jobs wait on runs that are not planned: "
                         f"{[(j.workdir, j.needs) for j in pending]}")

  def run_seconds(self, workdir: str, cpu: bool = False) -> float | None:
    """Seconds this study spent training run `workdir`, over all its
    invocations (None: trained before the harness counted); `cpu`: the
    process's CPU seconds instead of wall seconds."""
    key = "run_cpu_seconds" if cpu else "run_seconds"
    return self.state[key].get(os.path.relpath(workdir, self.workdir))

  def summary(self, cfg, workdir: str) -> dict:
    """A finished run's summary read back from its directory (model_info
    of config.json, the last logged values), the same whether it trained
    now or in an earlier invocation; `wall_s` is `run_seconds`."""
    _, raw = runs.read_config(workdir)
    return {"workdir": workdir, "step": int(cfg.train.steps),
            **raw.get("model_info", {}), **runs.last_values(workdir),
            "wall_s": self.run_seconds(workdir)}

  @contextlib.contextmanager
  def timed(self, key: str):
    """Adds the block's seconds to `timing[key]` and its CPU seconds to
    `cpu_timing[key]` (this invocation)."""
    t, c = self.clock(), time.process_time()
    try:
      yield
    finally:
      self.timing[key] = self.timing.get(key, 0.0) + self.clock() - t
      self.cpu_timing[key] = (self.cpu_timing.get(key, 0.0) +
                              time.process_time() - c)

  def wall_time(self) -> dict:
    """All invocations' seconds and this one's (saved now too)."""
    total = self._save()
    return {"wall_time_total_s": total,
            "wall_time_this_run_s": total - self.before}

  def _save(self) -> float:
    total = self.before + self.clock() - self.started
    self.state["wall_time_total_s"] = total
    write_json(self.path(STATE), self.state)
    return total
