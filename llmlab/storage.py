"""Files on any filesystem: local paths and `gs://` (any etils.epath URI).

Every file llmlab writes or reads on a user-given path goes through here
(or through tensorstore, for checkpoints and token stores). Object stores
have no append and no rename, so the writes here are whole objects:

* `write_text` / `write_json`: atomic on both -- locally a temporary file
  renamed into place, on an object store a single upload, which replaces
  the object at once (readers see the old or the new version, never half).
* `append_line`: read + rewrite on an object store (for rare events such
  as guard_events.jsonl); a true append locally.
* `Spool`: files that grow all run long (metrics.jsonl, TensorBoard
  events) are written to a local directory and uploaded whole at flush
  points (llmlab/metrics.py says which).

Deadlines (docs/reliability.md, "Hangs and storage stalls"): a bucket that stops
answering must end the run with an error naming the object, never hang
it. Both clients get a stall timeout, set here at import (before either
opens a connection): a request that moves no byte for `STALL_S` seconds
fails and the client's own bounded retries replace its connection --
gcsfs (etils.epath, every gs:// file here) through aiohttp's connect and
socket-read timeouts in fsspec's config, tensorstore (token stores,
orbax checkpoints) through libcurl's low-speed limit. On top, a
token-store read waits at most `DEADLINE_S` for all its retries
(`deadline()`), then raises `StorageTimeout` naming the object; so do
retries that ran out first (`gave_up`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, BinaryIO, Iterator

from etils import epath

from llmlab import errors

log = logging.getLogger("llmlab")


class StorageError(OSError):
  """A file or object could not be written or read; names the path."""


class StorageTimeout(StorageError):
  """The storage did not answer in time (a stalled connection or server):
  transient, so `llmlab` exits with `watchdog.EXIT_HANG` and the launchers
  run the command again, which resumes."""


def _seconds(name: str, default: float) -> float:
  value = os.environ.get(name, "")
  try:
    out = float(value) if value else default
  except ValueError:
    out = -1.0
  if not out > 0:
    raise errors.ConfigError(f"{name}={value!r}: must be a number of seconds > 0")
  return out


STALL_S = _seconds("LLMLAB_STORAGE_STALL_S", 30.0)
DEADLINE_S = _seconds("LLMLAB_STORAGE_DEADLINE_S", 180.0)


def _configure_clients() -> None:
  """The stall timeout for both clients (module doc). Explicit settings
  win: a TENSORSTORE_CURL_* variable already set, or fsspec config keys
  the user gave (FSSPEC_GS_* variables, ~/.config/fsspec)."""
  stall = str(max(1, round(STALL_S)))
  for name, value in (("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", stall),
                      ("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1"),
                      ("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", stall)):
    os.environ.setdefault(name, value)
  try:
    import aiohttp  # gcsfs's HTTP client
    import fsspec
  except ImportError:  # no gcsfs: no gs:// through epath either
    return
  timeout = aiohttp.ClientTimeout(total=None, sock_connect=STALL_S,
                                  sock_read=STALL_S)
  for proto in ("gs", "gcs"):
    fsspec.config.conf.setdefault(proto, {}).setdefault("requests_timeout",
                                                        timeout)


_configure_clients()


_STALLED: list[tuple[float, str]] = []  # (when, what) of the last stall


def stalled() -> str | None:
  """What stopped answering, if a request in this process gave up on the
  storage within the last `max(DEADLINE_S, 300)` seconds. Remote calls
  here then fail at once instead of waiting out their own retries: after
  a stall a run is ending, and its clean-up (last metrics upload, lock
  file) would otherwise add a full retry cycle each to the exit."""
  memory = max(DEADLINE_S, 300.0)
  if _STALLED and time.monotonic() - _STALLED[-1][0] < memory:
    return _STALLED[-1][1]
  return None


def _stall(error: StorageTimeout, what: str) -> StorageTimeout:
  _STALLED[:] = [(time.monotonic(), what)]
  return error


def _skip_if_stalled(path: str) -> None:
  first = stalled() if is_remote(path) else None
  if first is not None:
    raise StorageTimeout(f"{path}: not tried, the storage stopped "
                         f"answering ({first})")


def timeout_error(what: str, seconds: float) -> StorageTimeout:
  """The one-line error of a request that did not finish in time."""
  return _stall(StorageTimeout(
      f"{what}: no answer from the storage within {seconds:g} s (stalled "
      "connection or server; LLMLAB_STORAGE_DEADLINE_S). Re-run the same "
      "command to resume from the newest checkpoint."), what)


def deadline(future, what: str, until: float | None = None):
  """`future.result()` (a tensorstore or concurrent future) by monotonic
  time `until` (default: DEADLINE_S from now), else `StorageTimeout`
  naming `what`."""
  left = DEADLINE_S if until is None else max(until - time.monotonic(), 0.0)
  try:
    return future.result(timeout=left)
  except TimeoutError:
    raise timeout_error(what, DEADLINE_S) from None


def gave_up(e: BaseException) -> bool:
  """Whether tensorstore error `e` (a ValueError with a status) is its
  retries running out on a storage that did not answer (curl timeouts,
  503s), rather than something wrong with the data."""
  text = str(e)
  return any(mark in text for mark in (
      "retry attempts failed", "CURL error", "DEADLINE_EXCEEDED",
      "UNAVAILABLE"))


def _stalls_named(fn):
  """Client timeouts and dropped connections of `fn(path, ...)` become
  `StorageTimeout` naming the path (other errors, FileNotFoundError
  included, pass through unchanged)."""

  @functools.wraps(fn)
  def wrapped(path, *args, **kwargs):
    _skip_if_stalled(str(path))
    try:
      return fn(path, *args, **kwargs)
    except StorageError:
      raise
    except Exception as e:  # noqa: BLE001 - matched below
      if not _is_stall(e):
        raise
      raise _stall(StorageTimeout(
          f"{path}: the storage stopped answering ({type(e).__name__}: "
          f"{e or 'timed out'}); re-run the same command to resume from "
          "the newest checkpoint"), str(path)) from e
  return wrapped


def _is_stall(e: BaseException) -> bool:
  if isinstance(e, TimeoutError):  # asyncio's too (Python >= 3.11)
    return True
  aiohttp = sys.modules.get("aiohttp")
  return bool(aiohttp and isinstance(
      e, (aiohttp.ServerTimeoutError, aiohttp.ServerDisconnectedError,
          aiohttp.ClientConnectionError)))


def is_remote(path: str) -> bool:
  return "://" in str(path)


def join(base: str, *parts: str) -> str:
  """`os.path.join` that keeps `gs://` URIs intact."""
  return str(epath.Path(base).joinpath(*parts)) if is_remote(base) else \
      os.path.join(base, *parts)


@_stalls_named
def exists(path: str) -> bool:
  return epath.Path(path).exists()


@_stalls_named
def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


@_stalls_named
def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


@_stalls_named
def listdir(path: str) -> list[str]:
  """Names in directory `path` (empty if it does not exist)."""
  p = epath.Path(path)
  return sorted(c.name for c in p.iterdir()) if p.exists() else []


def remove(path: str) -> None:
  epath.Path(path).unlink()


def rmtree(path: str) -> None:
  p = epath.Path(path)
  if p.exists():
    p.rmtree()


def copytree(src: str, dst: str) -> None:
  """Copy directory `src` to `dst` (which must not exist) so that a crash
  never leaves a `dst` that looks complete: locally a copy renamed into
  place; on an object store (no rename) every object is copied with the
  orbax commit markers last, so `dst` counts as a checkpoint only once
  everything else is there."""
  if not is_remote(dst):
    shutil.copytree(src, dst + ".copy")
    os.replace(dst + ".copy", dst)
    return
  files = sorted(_files(epath.Path(src)),
                 key=lambda f: (f.name == "commit_success.txt", -len(f.parts)))
  for f in files:
    out = epath.Path(dst) / f.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(f.read_bytes())


def _files(d: epath.Path) -> list[epath.Path]:
  """Every file under `d` (gcsfs refuses `rglob`'s recursive `**`)."""
  out = []
  for child in d.iterdir():
    out += _files(child) if child.is_dir() else [child]
  return out


@_stalls_named
def read_bytes(path: str) -> bytes:
  try:
    return epath.Path(path).read_bytes()
  except FileNotFoundError as e:  # a path the user gave, or in their run
    raise errors.NotFound(f"{path}: no such file") from e


@_stalls_named
def write_bytes(path: str, data: bytes) -> None:
  """Whole-object write; locally via a temporary file and a rename."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


@contextlib.contextmanager
def open_write(path: str) -> Iterator[BinaryIO]:
  """A binary file to stream a large object into, complete or absent:
  locally a temporary file renamed into place on success; on an object
  store one upload (gcsfs sends it in parts) that creates the object only
  when the file closes. An exception inside the block leaves no object."""
  if is_remote(path):
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    f = p.open("wb")
    try:
      yield f
    except BaseException:
      _discard(f)
      raise
    f.close()
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _discard(f) -> None:
  """Abandon an upload in progress (gcsfs: `discard`), so no object
  appears; a client without it gets a plain close."""
  discard = getattr(f, "discard", None)
  if discard is not None:
    discard()
  else:
    f.close()


def copy_file(src: str, dst: str) -> None:
  """Copy one (small) file between any two filesystems, whole."""
  write_bytes(dst, read_bytes(src))


def local_copy(path: str, chunk: int = 64 << 20) -> str:
  """A local path holding file `path`: itself if local, else a download
  into a new temporary directory, streamed in `chunk`-byte pieces (for
  readers that need a real file, such as a memory map). The caller
  removes the directory when done (`os.path.dirname` of the result)."""
  if not is_remote(path):
    return path
  out = os.path.join(tempfile.mkdtemp(prefix="llmlab-copy-"),
                     os.path.basename(str(path)))
  try:
    with epath.Path(path).open("rb") as src, open(out, "wb") as dst:
      shutil.copyfileobj(src, dst, chunk)
  except Exception as e:  # noqa: BLE001 - any client's error: name the path
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    kind = StorageTimeout if _is_stall(e) else StorageError
    raise kind(f"{path}: cannot read ({type(e).__name__}: {e})") from e
  return out


@_stalls_named
def read_text(path: str) -> str:
  try:
    return epath.Path(path).read_text()
  except FileNotFoundError as e:  # a path the user gave, or in their run
    raise errors.NotFound(f"{path}: no such file") from e


def read_json(path: str) -> Any:
  """The JSON file at `path`; one that does not parse is a DataError."""
  try:
    return json.loads(read_text(path))
  except json.JSONDecodeError as e:
    raise errors.DataError(f"{path}: not valid JSON ({e})") from e


def write_text(path: str, text: str) -> None:
  """Atomic whole-file write (see module docstring)."""
  write_bytes(path, text.encode())


def json_safe(obj):
  """The one JSON policy of everything llmlab writes (config.json,
  metrics.jsonl, study and fit results, summary lines): numpy scalars and
  arrays as Python numbers and lists; non-finite floats (NaN, inf) as None
  (null: JSON has no NaN, and a reader in another language must not choke);
  dict keys as str; anything else that JSON cannot hold (a config, a path)
  as its str."""
  if isinstance(obj, dict):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if type(obj).__module__ == "numpy" or (hasattr(obj, "__array__") and
                                         hasattr(obj, "tolist")):
    return json_safe(obj.tolist())  # numpy (and jax) arrays and scalars
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if obj is None or isinstance(obj, (str, int)):  # bool is an int
    return obj
  return str(obj)


def dumps(obj: Any, **kw) -> str:
  """json.dumps under the one policy (`json_safe`): strict JSON, no NaN."""
  return json.dumps(json_safe(obj), allow_nan=False, **kw)


def write_json(path: str, obj: Any, **kw) -> None:
  write_text(path, dumps(obj, **{"indent": 2, "sort_keys": True, **kw}))


@_stalls_named
def append_line(path: str, line: str) -> None:
  """Append one line (a true append locally; read + rewrite remotely)."""
  if not is_remote(path):
    with open(path, "a") as f:
      f.write(line.rstrip("\n") + "\n")
    return
  p = epath.Path(path)
  old = p.read_text() if p.exists() else ""
  p.write_text(old + line.rstrip("\n") + "\n")


@_stalls_named
def jsonl_rows(path: str) -> list[dict]:
  """The JSON rows of a .jsonl file (empty if there is none); a line torn
  by a kill mid-write is skipped."""
  p = epath.Path(path)
  if not p.exists():
    return []
  rows = []
  for line in p.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def upload(local: str, remote: str) -> None:
  """Copy local file `local` to `remote` as one object."""
  _skip_if_stalled(remote)
  try:
    dst = epath.Path(remote)
    if not str(remote).startswith("gs://"):  # GCS has no directories, and
      dst.parent.mkdir(parents=True, exist_ok=True)  # gcsfs asks anyway
    dst.write_bytes(epath.Path(local).read_bytes())
  except Exception as e:  # noqa: BLE001 - any client's error: name the path
    if _is_stall(e):
      raise _stall(StorageTimeout(
          f"{remote}: cannot write, the storage stopped answering "
          f"({type(e).__name__}: {e or 'timed out'})"), remote) from e
    raise StorageError(f"{remote}: cannot write ({type(e).__name__}: {e})") \
        from e


def _stamp(path: str) -> tuple:
  st = os.stat(path)
  return (st.st_size, st.st_mtime_ns)


SPOOL_PREFIX = "llmlab-spool-"  # + the owner's pid + "-" + a random suffix
KEPT = ".llmlab-kept"  # in a spool whose last upload failed: the user's copy


def sweep_spools(tmp: str | None = None, idle_s: float = 3600) -> list[str]:
  """Removes the spools of processes that are gone (kill -9 skips `close`)
  and that nothing wrote to for `idle_s` (a process in another pid
  namespace sharing this directory looks gone, but writes), except those
  kept after a failed upload; returns what it removed. A spool whose owner
  still runs, or whose name carries no pid, is left."""
  tmp = tmp or tempfile.gettempdir()
  removed = []
  for name in os.listdir(tmp):
    pid = name[len(SPOOL_PREFIX):].split("-")[0]
    path = os.path.join(tmp, name)
    if (not name.startswith(SPOOL_PREFIX) or not pid.isdigit() or
        pid_alive(pid) or os.path.exists(os.path.join(path, KEPT)) or
        time.time() - _newest_mtime(path) < idle_s):
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path)
  return removed


def _newest_mtime(path: str) -> float:
  newest = os.path.getmtime(path)
  for root, dirs, files in os.walk(path):
    for n in dirs + files:
      with contextlib.suppress(OSError):
        newest = max(newest, os.path.getmtime(os.path.join(root, n)))
  return newest


def pid_alive(pid) -> bool:
  """Whether process `pid` of this machine may still run (another user's, or
  a pid that cannot be checked, counts as running: nothing of it is taken)."""
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True
  return True


class Spool:
  """Growing files of directory `target`, kept in a local directory.

  For a local `target` the spool *is* the target (nothing to upload). For
  a remote one, `path(name)` is a local file and `sync()` uploads every
  file whose size changed since the last sync, whole (object stores have
  no append); `fetch(name)` first copies an existing object down, so a
  resumed run continues the same file.
  """

  def __init__(self, target: str):
    self.target = target
    self.remote = is_remote(target)
    self.local = target
    if self.remote:
      sweep_spools()
      self.local = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")
    self._synced: dict[str, tuple] = {}

  def path(self, name: str) -> str:
    out = os.path.join(self.local, name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return out

  def fetch(self, name: str) -> str:
    """Local path of `name`, holding the target's current copy if any."""
    out = self.path(name)
    if self.remote and not os.path.exists(out):
      src = epath.Path(self.target) / name
      if src.exists():
        with open(out, "wb") as f:
          f.write(src.read_bytes())
        self._synced[name] = _stamp(out)
    return out

  def sync(self) -> None:
    if not self.remote:
      return
    for root, _, files in os.walk(self.local):
      for f in files:
        local = os.path.join(root, f)
        name = os.path.relpath(local, self.local)
        stamp = _stamp(local)
        if self._synced.get(name) != stamp:
          upload(local, str(epath.Path(self.target) / name))
          self._synced[name] = stamp

  def close(self) -> None:
    """Last sync; if it fails the local copy is kept (and named)."""
    try:
      self.sync()
    except StorageError as e:
      with open(os.path.join(self.local, KEPT), "w") as f:
        f.write(self.target + "\n")
      log.error("%s; the local copy stays in %s", e, self.local)
      return
    if self.remote:
      shutil.rmtree(self.local, ignore_errors=True)
