"""No silent hangs: a run that stops making progress ends, loudly.

On a pod the costliest failure is a run that neither fails nor trains (a
stalled storage connection, a stuck host, a collective waiting for a
process that died): no error, no restart, the slice billed. The watchdog
turns that into an exit with a distinct status, `EXIT_HANG`, on which the
launchers (launch/tpu.sh, launch/slurm.sbatch) run the job again, as on a
preemption; the run then resumes from its newest checkpoint.

`Watchdog` is armed around the train loop and its final save
(llmlab/train.py); the loop calls `beat(step)` after every step (the
periodic saves and evals inside the loop count towards the step they
follow). It fires when

* no step completes within `train.hang_timeout_s` (`-1`: auto, 1800 s on
  multi-process jobs and with a remote (gs://) workdir, where a stalled
  checkpoint write can wait out tensorstore's retries; off for one
  process on local disk; `0`: off), or
* SIGTERM arrived (a preemption, `timeout`, `scancel`) and no step
  completed within `SIGTERM_GRACE_S` after it: the normal SIGTERM path
  (finish the step, save, exit 0) needs a step to end, which a hung run
  never reaches. Nothing is saved then; the newest complete checkpoint
  stays the resume point (an async save in flight is left as a
  `*.orbax-checkpoint-tmp` directory, which is never used).

Firing writes every thread's Python stack to stderr and to
`WORKDIR/hang-<UTC time>.txt` (`-process<i>` added on processes i > 0),
then ends the process with
`os._exit(EXIT_HANG)`: the threads that hang (grain prefetch threads
waiting on storage, the main thread in a device wait) cannot be
interrupted, and a normal exit would wait for them.

Why a hand-written thread: `faulthandler.dump_traceback_later(t,
exit=True)` is the library's nearest tool, but it exits with status 1 (not
distinct from a crash), writes to one file descriptor only, cannot be
re-armed from SIGTERM without a signal handler of its own, and knows no
thread names. This module still uses only `sys._current_frames` and
`threading`; it has no jax and no config.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import traceback
from typing import Callable, TextIO

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to
# retry". Distinct from 0 (done or preempted and saved), 1 (an error), 2
# (bad input), and from 128+N (killed by signal N).
EXIT_HANG = 75
SIGTERM_GRACE_S = 20.0  # GCE preemption and SLURM's KillWait give 30 s
AUTO_TIMEOUT_S = 1800.0  # hang_timeout_s=-1: multi-process or remote


def timeout_for(hang_timeout_s: float, process_count: int,
                remote: bool = False) -> float:
  """Seconds without a step before firing (0: never) for the config value
  (-1: auto, 0: off, > 0: seconds)."""
  if hang_timeout_s < 0:
    return AUTO_TIMEOUT_S if process_count > 1 or remote else 0.0
  return float(hang_timeout_s)


class Watchdog:
  """Fires when no `beat` comes in time (module doc). `preempted()` says
  whether SIGTERM was seen (the train loop's Python handler sets it: a
  main thread stuck inside one C call never runs it, so there only the
  hang timeout applies); `exit`, `out` and `poll_s` are for tests."""

  def __init__(self, timeout_s: float, workdir: str | None, *,
               preempted: Callable[[], bool] = lambda: False,
               grace_s: float = SIGTERM_GRACE_S,
               poll_s: float = 0.5, out: TextIO | None = None,
               tag: int = 0,
               exit: Callable[[int], None] = os._exit):  # pylint: disable=W0622
    self.timeout_s, self.workdir, self.grace_s = timeout_s, workdir, grace_s
    self.preempted, self.poll_s, self.exit = preempted, poll_s, exit
    self.out, self.tag = out, tag
    self.step = None
    self.fired = None  # the report, once fired
    self._last = time.monotonic()
    self._term_at = None  # when SIGTERM was first seen, without a beat since
    self._term_ok = False  # a step completed after SIGTERM: it is handled
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> "Watchdog":
    self._last = time.monotonic()
    self._thread = threading.Thread(target=self._watch, daemon=True,
                                    name="llmlab-watchdog")
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def beat(self, step: int | None = None) -> None:
    """A step completed. After SIGTERM, the first one means the normal
    preemption path took over (stop, save): the grace no longer applies,
    only the hang timeout."""
    self.step, self._last, self._term_at = step, time.monotonic(), None
    if self.preempted():
      self._term_ok = True

  # -- the watching thread

  def _watch(self) -> None:
    while not self._stop.wait(self.poll_s):
      reason = self._overdue(time.monotonic())
      if reason:
        self.fire(reason)
        return

  def _overdue(self, now: float) -> str | None:
    idle = now - self._last
    if not self._term_ok and self.preempted():
      if self._term_at is None:
        self._term_at = now
      if now - self._term_at > self.grace_s:
        return (f"SIGTERM received {now - self._term_at:.0f} s ago and no "
                f"step completed since (grace {self.grace_s:g} s)")
    if self.timeout_s and idle > self.timeout_s:
      return (f"no step completed in {idle:.0f} s "
              f"(train.hang_timeout_s={self.timeout_s:g})")
    return None

  def fire(self, reason: str) -> None:
    """Report (stderr, then WORKDIR/hang-<time>.txt) and exit."""
    after = "no step yet" if self.step is None else f"last step {self.step}"
    head = (f"llmlab: hang: {reason}; {after}. Exiting with status "
            f"{EXIT_HANG} (restartable: re-run the same command to resume "
            "from the newest checkpoint).")
    self.fired = head + "\n\n" + stacks()
    out = self.out or sys.stderr
    try:
      out.write(self.fired + "\n")
      out.flush()
    except (OSError, ValueError):
      pass
    path = self._write_report()
    if path:
      try:
        out.write(f"llmlab: hang report written to {path}\n{head}\n")
        out.flush()
      except (OSError, ValueError):
        pass
    self.exit(EXIT_HANG)

  def _write_report(self, wait_s: float = 10.0) -> str | None:
    """WORKDIR/hang-<time>.txt, given at most `wait_s` (the workdir may be
    on the storage that hangs)."""
    if not self.workdir:
      return None
    from llmlab import storage  # pylint: disable=import-outside-toplevel
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")
    suffix = f"-process{self.tag}" if self.tag else ""
    path = storage.join(self.workdir, f"hang-{stamp}{suffix}.txt")
    done = []

    def write():
      try:
        storage.write_text(path, self.fired + "\n")
        done.append(path)
      except Exception as e:  # pylint: disable=broad-except
        done.append(None)
        sys.stderr.write(f"llmlab: could not write {path}: {e}\n")

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(wait_s)
    return done[0] if done else None


def stacks() -> str:
  """Every thread's Python stack, named, the current one marked."""
  names = {t.ident: t.name for t in threading.enumerate()}
  me = threading.get_ident()
  parts = []
  frames = sys._current_frames()  # pylint: disable=protected-access
  for ident, frame in frames.items():
    if ident == me:
      continue  # the watchdog itself
    parts.append(f"Thread {ident} ({names.get(ident, '?')}):\n" +
                 "".join(traceback.format_stack(frame)))
  return "\n".join(parts)
