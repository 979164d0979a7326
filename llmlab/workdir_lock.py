"""Workdir safety: a usable directory, and one writer at a time.

`check_writable` runs before anything expensive: it creates the workdir
(like `mkdir -p`) and writes and deletes a probe file, so a read-only
mount, a missing bucket or a path through a regular file is an error at
start that names the directory and the cause, not a failed save an hour in.

`Lock` keeps two `llmlab train` processes (or two jobs) from writing the
same workdir. On local and NFS paths it is an `fcntl.flock` on
`WORKDIR/llmlab.lock`, which the kernel releases when the holder dies (even
by SIGKILL), so a lock is never stale; the file records the holder (pid,
host, start time, command) for the error message, and a holder that died
without releasing is reported when its lock is taken over. Where flock is
unavailable (object stores such as gs://, some FUSE mounts) the file itself
is the lock: the holder rewrites a heartbeat into it every
`stale_after_s / 4` seconds, and a lock whose holder is a dead local
process or whose heartbeat is older than `stale_after_s` is stale.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from llmlab import errors
from llmlab import storage

log = logging.getLogger("llmlab")

LOCK_NAME = "llmlab.lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


WorkdirError = errors.WorkdirError  # the workdir cannot be used


class WorkdirLocked(WorkdirError):
  """Another process holds the workdir's lock."""


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def check_writable(workdir: str) -> None:
  """Create `workdir` if needed and prove that files can be written there
  (and in its checkpoints/ if that exists); raise WorkdirError if not."""
  if storage.is_remote(workdir):
    _probe_remote(workdir)
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    base = _nearest_existing(workdir)
    where = (f"{base} is a file, not a directory" if not os.path.isdir(base)
             else f"its nearest existing parent is {base}")
    raise WorkdirError(
        f"cannot create workdir {workdir}: {where} ([Errno {e.errno}] "
        f"{e.strerror}: {e.filename})") from e
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} exists but is not a directory")
  for d in (workdir, os.path.join(workdir, "checkpoints")):
    if os.path.isdir(d):
      _probe_local(d)


def _probe_name() -> str:
  return f".llmlab-write-test-{socket.gethostname()}-{os.getpid()}"


def _probe_local(d: str) -> None:
  path = os.path.join(d, _probe_name())
  try:
    with open(path, "w") as f:
      f.write("llmlab write test\n")
      f.flush()
      os.fsync(f.fileno())
    os.remove(path)
  except OSError as e:
    raise WorkdirError(f"workdir {d} is not writable: [Errno {e.errno}] "
                       f"{e.strerror} (writing {path})") from e


def _probe_remote(workdir: str) -> None:
  path = epath.Path(workdir) / _probe_name()
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    path.write_text("llmlab write test\n")
    path.unlink()
  except Exception as e:  # noqa: BLE001 - any storage error: name it
    raise WorkdirError(f"workdir {workdir} is not writable: "
                       f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ the lock


def _same_file(fd: int, path: str) -> bool:
  """Whether the open file `fd` is still the file at `path`."""
  try:
    a, b = os.fstat(fd), os.stat(path)
  except FileNotFoundError:
    return False
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder_info(token: str) -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "command": " ".join(sys.argv)[:500], "token": token,
          "heartbeat": time.time()}


def describe(holder: dict) -> str:
  if not holder:
    return "an unknown process (the lock file is empty)"
  return (f"pid {holder.get('pid')} on host {holder.get('host')} (started "
          f"{holder.get('started')}: {holder.get('command')})")


def _parse(text: str) -> dict:
  try:
    out = json.loads(text) if text.strip() else {}
    return out if isinstance(out, dict) else {}
  except json.JSONDecodeError:
    return {"command": f"unreadable lock file: {text[:80]!r}"}


class Lock:
  """Exclusive lock on a workdir; use as a context manager or acquire/release."""

  def __init__(self, workdir: str, stale_after_s: float = 300.0,
               use_flock: bool | None = None):
    self.workdir = workdir
    self.path = (f"{workdir.rstrip('/')}/{LOCK_NAME}" if storage.is_remote(workdir)
                 else os.path.join(workdir, LOCK_NAME))
    self.stale_after_s = stale_after_s
    self.use_flock = (not storage.is_remote(workdir)) if use_flock is None else use_flock
    self.token = uuid.uuid4().hex
    self._fd = None
    self._beat = None
    self._stop = threading.Event()

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def _locked_error(self, holder: dict, extra: str = "") -> WorkdirLocked:
    return WorkdirLocked(
        f"workdir {self.workdir} is in use by another llmlab process: "
        f"{describe(holder)}{extra}. Two runs must not write one workdir: "
        "wait for it to finish, stop it, or use another --workdir.")

  def acquire(self) -> None:
    if self.use_flock:
      try:
        self._acquire_flock()
        return
      except OSError as e:
        if e.errno not in NO_FLOCK:
          raise
        log.info("%s: no flock on this filesystem (%s); using a heartbeat "
                 "lock file", self.path, e.strerror)
    self._acquire_file()

  def _acquire_flock(self) -> None:
    import fcntl
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(os.pread(fd, 65536, 0).decode(errors="replace"))
      os.close(fd)
      raise self._locked_error(holder) from None
    except OSError:
      os.close(fd)
      raise
    if not _same_file(fd, self.path):  # its holder removed it (`discard`)
      os.close(fd)
      return self._acquire_flock()
    previous = _parse(os.pread(fd, 65536, 0).decode(errors="replace"))
    if previous:
      log.warning("workdir %s: taking over a stale lock of %s (that process "
                  "is gone)", self.workdir, describe(previous))
    self._fd = fd
    self._write_fd(_holder_info(self.token))

  def discard(self) -> None:
    """Remove the lock file while still holding the lock (a start that
    failed leaves none behind). Safe against a racing locker: whoever
    locks the removed file sees it is no longer at the path and locks the
    new one (`_same_file`). A heartbeat lock file goes in `release`."""
    if self._fd is not None:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass

  def _write_fd(self, info: dict) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)
    os.fsync(self._fd)

  # -- heartbeat lock file (no flock)

  def _read(self) -> dict | None:
    p = epath.Path(self.path)
    return _parse(p.read_text()) if p.exists() else None

  def _is_stale(self, holder: dict) -> str | None:
    """Why `holder` no longer holds the lock, or None if it may."""
    if not holder:
      return "the lock file is empty"
    if holder.get("host") == socket.gethostname() and not storage.pid_alive(
        holder.get("pid")):
      return "that process is gone"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after_s:
      return f"no heartbeat for {age:.0f} s > {self.stale_after_s:.0f} s"
    return None

  def _acquire_file(self) -> None:
    holder = self._read()
    if holder is not None:
      why = self._is_stale(holder)
      if why is None:
        age = time.time() - float(holder.get("heartbeat", 0))
        raise self._locked_error(
            holder, f", last heartbeat {age:.0f} s ago; it counts as stale "
            f"after {self.stale_after_s:.0f} s")
      log.warning("workdir %s: taking over a stale lock of %s (%s)",
                  self.workdir, describe(holder), why)
    epath.Path(self.path).write_text(json.dumps(_holder_info(self.token)))
    time.sleep(min(1.0, self.stale_after_s / 100))  # let a racing writer land
    now = self._read() or {}
    if now.get("token") != self.token:
      raise self._locked_error(now, " (it took the lock at the same moment)")
    self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                  name="llmlab-lock-heartbeat")
    self._beat.start()

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.stale_after_s / 4):
      try:
        now = self._read() or {}
        if now.get("token") != self.token:
          log.error("workdir %s: lock taken over by %s", self.workdir,
                    describe(now))
          return
        epath.Path(self.path).write_text(
            json.dumps(dict(now, heartbeat=time.time())))
      except Exception as e:  # noqa: BLE001 - keep beating through blips
        log.warning("workdir %s: lock heartbeat failed: %s", self.workdir, e)

  def release(self) -> None:
    if self._fd is not None:
      try:  # emptied, not deleted: unlinking a flock file races new lockers
        os.ftruncate(self._fd, 0)
      finally:
        os.close(self._fd)  # closing releases the flock
        self._fd = None
    if self._beat is not None:
      self._stop.set()
      down = storage.stalled() if storage.is_remote(self.workdir) else None
      if down:  # a heartbeat may be mid-request; the file counts as stale
        log.warning("workdir %s: lock file %s left in place: the storage "
                    "stopped answering (%s); a re-run on this host takes it "
                    "over at once, elsewhere after %.0f s", self.workdir,
                    self.path, down, self.stale_after_s)
        return
      self._beat.join()
      self._beat = None
      try:
        if (self._read() or {}).get("token") == self.token:
          epath.Path(self.path).unlink()
      except Exception as e:  # noqa: BLE001
        log.warning("workdir %s: could not remove lock file: %s",
                    self.workdir, e)


class Start:
  """What a run's start adds to a local workdir before it writes
  config.json: the directory itself, its lock file and an empty
  checkpoints/. Made before `check_writable`; `undo(lock)` after a start
  that failed (config.json not written) removes what it added, so the
  workdir looks as it did (gs:// workdirs are left as they are)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.local = not storage.is_remote(workdir)
    self.had = {name: os.path.exists(os.path.join(workdir, name))
                for name in ("", LOCK_NAME, "checkpoints")
                } if self.local else {}
    self.config = self._config_stamp()

  def _config_stamp(self):
    try:
      st = os.stat(os.path.join(self.workdir, "config.json"))
    except OSError:
      return None
    return (st.st_ino, st.st_mtime_ns)

  def failed(self) -> bool:
    """Did the run stop before it wrote config.json (so wrote nothing)?"""
    return self.local and self._config_stamp() == self.config

  def undo(self, lock: Lock | None) -> None:
    """Remove what this failed start added (call while holding `lock`)."""
    if not self.failed():
      return
    if lock is not None and not self.had[LOCK_NAME]:
      lock.discard()
    for name in ("checkpoints", ""):
      if not self.had[name]:
        try:  # only if empty: a failed start saved nothing
          os.rmdir(os.path.join(self.workdir, name))
        except OSError:
          pass
