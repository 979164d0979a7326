"""What the tests share: this tree's root, a run's metrics rows, `llmlab
ARGV...` in process, and the few kinds of fresh process a test needs.

In process (`llmlab`) is the default: the same entry as the console script
(llmlab.main.main), stdout and stderr captured, the exit status as the
console would give it (a bug's exception: status 1, its traceback appended
to stderr). A fresh process (`command`) only where the process is the
point: kill -9, signals, several processes, a compile-only backend, or a
cold compilation cache. Checks on simulated devices (XLA_FLAGS must be set
before jax is imported) run in `Devices`: one process per device count for
the whole session (conftest's `devices` fixture), called like a function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import select
import subprocess
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")
TINY = f"--config={ROOT}/configs/tiny.py:smoke"
# conftest's session run `tiny_run`: the smoke config with these overrides.
TINY_RUN = ("--config.train.steps=30", "--config.train.eval_every=15")


def rows(workdir) -> list[dict]:
  """A run's metrics.jsonl, one dict a line."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@dataclasses.dataclass
class Result:
  """What a command ended with (the fields of subprocess.CompletedProcess)."""
  returncode: int
  stdout: str
  stderr: str


def llmlab(*argv: str, check: bool = True) -> Result:
  """`llmlab ARGV...` in this process -> Result. `check`: assert exit 0.
  Not for a run that meets a storage stall: llmlab ends that process at
  once (os._exit(75), cli_common.exit_now), so those tests use `command`."""
  from llmlab import main as main_lib
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      rc = main_lib.main([str(a) for a in argv])
    except SystemExit as e:  # absl's flag errors, sys.exit in a command
      rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # pylint: disable=broad-except  # a bug: exit 1
      traceback.print_exc(file=err)
      rc = 1
  _unbind_logging(err)
  res = Result(int(rc or 0), out.getvalue(), err.getvalue())
  if check:
    assert res.returncode == 0, res.stderr[-4000:]
  return res


def _unbind_logging(stream) -> None:
  """The command's logging handler was made on the captured stream; point
  it back at the real stderr so later log lines are not lost in it."""
  for handler in logging.getLogger().handlers:
    if getattr(handler, "stream", None) is stream:
      handler.setStream(sys.stderr)


def env(**extra: str) -> dict:
  """The environment for a fresh process: CPU, this tree's llmlab first."""
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  e["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  e.update(extra)
  return e


def command(argv, *, check: bool = True, timeout: float = 600,
            **extra_env: str) -> subprocess.CompletedProcess:
  """`argv` as a fresh process in ROOT (text output captured)."""
  out = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=env(**extra_env))
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def llmlab_process(*argv: str, **kw) -> subprocess.CompletedProcess:
  """`python -m llmlab ARGV...` as a fresh process."""
  return command([sys.executable, "-m", "llmlab", *argv], **kw)


class Devices:
  """A fresh process with `n` simulated CPU devices that runs checks on
  request: `call("tests.module:function", *args)` -> its JSON-able result,
  computed there. Started on the first call; a check's exception is an
  AssertionError here with its traceback; a process that dies or runs past
  `timeout` is killed and the next call starts a new one."""

  def __init__(self, n: int, log_dir: str):
    self.n, self.log = n, os.path.join(log_dir, f"devices{n}.log")
    self.proc = None

  def _start(self):
    self._log = open(self.log, "a")
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "helpers",
                                      "device_server.py"), str(self.n)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        text=True, cwd=ROOT, env=env())

  def _tail(self) -> str:
    self._log.flush()
    with open(self.log) as f:
      return f.read()[-4000:]

  def call(self, fn: str, *args, timeout: float = 600, **kwargs):
    if self.proc is None or self.proc.poll() is not None:
      self.close()  # one that died since the last call
      self._start()
    self.proc.stdin.write(json.dumps({"fn": fn, "args": args,
                                      "kwargs": kwargs}) + "\n")
    self.proc.stdin.flush()
    ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
    line = self.proc.stdout.readline() if ready else ""
    if not line:
      why = "the process died" if ready else f"no reply in {timeout} s"
      log = self._tail()
      self.close()
      raise AssertionError(f"{fn} on {self.n} devices: {why}\n{log}")
    reply = json.loads(line)
    if "error" in reply:
      raise AssertionError(f"{fn} on {self.n} devices raised:\n{reply['error']}")
    return reply["ok"]

  def close(self):
    if self.proc is not None:
      if self.proc.poll() is None:
        self.proc.kill()
      self.proc.wait()
      self.proc.stdin.close()
      self.proc.stdout.close()
      self._log.close()
      self.proc = None
