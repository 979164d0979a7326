"""Orbax checkpoints under WORKDIR/checkpoints: save, retain, verify, restore.

A checkpoint at step s holds the train state after s updates (params,
optimizer state, step) and JSON metadata (resolved config, N, FLOPs/token,
tokens seen, and a checksum of every array). Nothing else is needed to
resume exactly: the data order and the per-step RNG are pure functions of
(seed, step).

Saves are asynchronous: `save` copies the arrays to host memory before it
returns (so the train step may donate and overwrite the device buffers right
after), and a background thread writes them into a temporary directory that
is renamed into place only when complete. What a crash can leave behind:

* a `<step>.orbax-checkpoint-tmp-*` directory (killed mid-save): never
  listed as a checkpoint; we warn and orbax deletes it on the next start.
* a `<step>` directory without orbax's `commit_success.txt` (a filesystem
  without atomic rename, or a copy cut short): we warn and move it aside to
  `<step>.incomplete` so it can neither be restored nor block a new save.
* a complete directory whose files were later truncated or corrupted:
  reading fails, or (orbax does not detect flipped bytes in the data files)
  the per-array checksums in the metadata do not match. Resuming falls back
  to the previous checkpoint with a warning and moves the bad one aside to
  `<step>.unreadable`; explicit restores raise `CheckpointError`.

Restores take the abstract target state with the *current* mesh's
shardings, so a checkpoint written on one mesh loads onto any other.

Retention: every sweep checkpoint (log-spaced in tokens), every
`keep_at_steps` checkpoint and the final one are kept forever (recorded in
their metadata, so they survive a later change of schedule); of the others
only the latest `checkpoint.keep`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llmlab import config as config_lib
from llmlab import distributed
from llmlab import errors

log = logging.getLogger("llmlab")

COMMIT_FILE = "commit_success.txt"  # written by orbax last, before the rename
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint is missing, incomplete, unreadable or corrupted (a user
  error: one line, exit 2; a RuntimeError too, as before)."""


class CheckpointSaveError(RuntimeError):
  """Writing checkpoint `step` failed (disk full, permissions, ...).

  What it left behind is never trusted: an orbax tmp dir is not listed, a
  step dir without the commit file is set aside on the next start, and
  checksums catch anything else.
  """

  def __init__(self, step: int, path: str, cause: BaseException,
               latest: int | None):
    self.step, self.path, self.cause = step, path, cause
    super().__init__(
        f"checkpoint save of step {step} to {path} failed: "
        f"{type(cause).__name__}: {cause}. The partial write is never used; "
        f"the newest complete checkpoint is "
        f"{'step %d' % latest if latest is not None else 'none'}.")


def sweep_steps(total_steps: int, points: int, min_fraction: float) -> list[int]:
  """`points` steps log-spaced from min_fraction*total to total (in tokens,
  which are proportional to steps), plus the final step."""
  if points <= 0:
    return [total_steps]
  lo = max(1, int(round(min_fraction * total_steps)))
  raw = np.geomspace(lo, total_steps, points) if points > 1 else [total_steps]
  steps = sorted({int(round(s)) for s in raw} | {total_steps})
  return [s for s in steps if 1 <= s <= total_steps]


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute for local paths (orbax requires it)."""
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return os.path.join(workdir, "checkpoints")


def parse_ref(ref: str) -> tuple[str, int | None]:
  """'DIR[:STEP]' -> (DIR, STEP or None). Paths may contain ':' (gs://)."""
  head, sep, tail = ref.rpartition(":")
  if sep and tail.isdigit() and head:
    return head, int(tail)
  return ref, None


# ----------------------------------------------------------------- checksums


def _fmix32(h):
  """murmur3's finaliser: every input bit flips about half the output bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_hash(x):
  """uint32 hash of an array's exact bits and positions.

  A wrapping sum of per-element hashes: integer addition is associative, so
  the result is the same on every mesh and sharding.
  """
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
    u = x.astype(jnp.uint8).astype(jnp.uint32)
  elif x.dtype.itemsize in (2, 4):
    u = jax.lax.bitcast_convert_type(
        x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  else:
    raise TypeError(f"cannot checksum dtype {x.dtype}")
  i = jax.lax.iota(jnp.uint32, u.size)
  return jnp.sum(_fmix32(u * jnp.uint32(0x9E3779B1) + i), dtype=jnp.uint32)


def _on_device(x):
  sharding = getattr(x, "sharding", None)
  kind = getattr(sharding, "memory_kind", None)
  if kind in (None, "device"):
    return x
  return jax.device_put(x, sharding.with_memory_kind("device"))


@jax.jit
def _tree_hash(tree):
  return jax.tree.map(_leaf_hash, tree)


def checksums(tree) -> dict[str, int]:
  """{path: uint32} for every array leaf; computed on device, mesh-agnostic.
  Leaves in host memory (optim.offload=host) are hashed from a device copy:
  jit does not mix memory spaces in one op."""
  tree = jax.tree.map(_on_device, tree)
  hashes = jax.device_get(_tree_hash(tree))
  flat, _ = jax.tree_util.tree_flatten_with_path(hashes)
  return {jax.tree_util.keystr(path): int(h) for path, h in flat}


def verify(tree, expected: dict | None, where: str) -> None:
  """Raise CheckpointError if any leaf's checksum differs from `expected`."""
  if expected is None:
    log.warning("%s has no checksums (written by an older llmlab); "
                "its contents cannot be verified", where)
    return
  got = checksums(tree)
  missing = sorted(set(got) - set(expected))
  bad = sorted(k for k in got if k in expected and expected[k] != got[k])
  if missing or bad:
    raise CheckpointError(
        f"{where} is corrupted: checksum mismatch for "
        f"{', '.join((bad + missing)[:5])}"
        f"{' ...' if len(bad + missing) > 5 else ''} "
        f"({len(bad)} of {len(got)} arrays differ from what was saved)")


# ----------------------------------------------------------------- retention


class KeepProtectedAndLatest:
  """orbax preservation policy: every protected step, plus the latest `n`
  unprotected ones.

  orbax's own `LatestN` counts *all* checkpoints, so combined with
  `CustomSteps` it would keep fewer than `n` regular checkpoints whenever
  sweep checkpoints are among the newest.
  """

  def __init__(self, n: int, protected: set[int]):
    self.n, self.protected = n, protected  # `protected` is shared, mutable

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
    del context
    others = sorted(c.step for c in checkpoints if c.step not in self.protected)
    recent = set(others[-self.n:]) if self.n > 0 else set()
    return [c.step in self.protected or c.step in recent for c in checkpoints]


# ------------------------------------------------------------------- manager


def _sync(name: str) -> None:
  distributed.sync(name)


def _all_true(ok: bool) -> bool:
  """True iff `ok` on every process (restores must agree on one step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


# Orbax numbers each async save with a process-global operation id and its
# background threads read "the current id" (orbax/checkpoint/_src/futures/
# synchronization.py, OperationIdGenerator): two managers of one process
# saving at once (runs packed on sub-meshes in threads) can wait on each
# other's id and time out after 300 s. So a save starts only when no other
# manager of this process has one in flight.
_SAVES = threading.Lock()
_MANAGERS: "weakref.WeakSet" = weakref.WeakSet()


@contextlib.contextmanager
def _one_save_at_a_time(mgr):
  with _SAVES:
    for other in list(_MANAGERS):
      while other is not mgr and other.is_saving_in_progress():
        time.sleep(0.01)
    _MANAGERS.add(mgr)
    yield


class Manager:
  """Checkpoint policy and integrity over one `ocp.CheckpointManager`."""

  def __init__(self, workdir: str, ckpt_cfg, total_steps: int,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    self.total = total_steps
    self.every = int(ckpt_cfg.every_steps)
    points = int(ckpt_cfg.get("sweep_points", 0))
    lo = float(ckpt_cfg.get("sweep_min_fraction", 0.1))
    if points < 0:
      raise config_lib.ConfigError(
          f"config.checkpoint.sweep_points={points!r}: must be >= 0")
    if not 0.0 < lo <= 1.0:
      raise config_lib.ConfigError(
          f"config.checkpoint.sweep_min_fraction={lo!r}: must be in (0, 1]")
    self.sweep = sweep_steps(total_steps, points, lo)
    # Explicit steps to save and keep forever (e.g. a study's branch points).
    extra = [int(s) for s in ckpt_cfg.get("keep_at_steps", ()) or ()]
    self.keep_steps = sorted(set(self.sweep) |
                             {s for s in extra if 1 <= s <= total_steps})
    self.protected = set(self.keep_steps) | {total_steps}
    self.incomplete = self._find_incomplete()
    if not read_only:
      _sync("llmlab_ckpt_listed")  # every process listed before any rename
      self._set_aside(self.incomplete, "incomplete")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=KeepProtectedAndLatest(int(ckpt_cfg.keep),
                                                   self.protected),
        enable_async_checkpointing=(bool(ckpt_cfg.get("async_save", True))
                                    and not read_only),
        create=not read_only,
        read_only=read_only,
        # What orbax sets itself for a read-only manager (and logs each time).
        save_interval_steps=0 if read_only else 1,
        cleanup_tmp_directories=not read_only,
    )
    self.mgr = ocp.CheckpointManager(self.directory, options=options)
    self._async = options.enable_async_checkpointing
    self._unconfirmed = None  # step of an async save not yet known to be done
    self.failures = 0  # consecutive failed saves (reset by a confirmed one)
    if not read_only:
      self._protect_saved()

  # -- what is on disk

  def _find_incomplete(self) -> list[int]:
    """Warn about interrupted saves; return steps whose dir lacks the commit
    file (tmp dirs need no action: orbax never lists them, and deletes them)."""
    root = epath.Path(self.directory)
    if not root.exists():
      return []
    steps = []
    for path in sorted(root.iterdir(), key=lambda p: p.name):
      if TMP_MARK in path.name:
        log.warning("ignoring incomplete checkpoint %s (a save was "
                    "interrupted)%s", path,
                    "" if self.read_only else "; orbax removes it")
      elif path.name.isdigit() and not (path / COMMIT_FILE).exists():
        log.warning("ignoring incomplete checkpoint %s (no %s: the save "
                    "never finished)", path, COMMIT_FILE)
        steps.append(int(path.name))
    return steps

  def _set_aside(self, steps: list[int], why: str) -> None:
    """Rename bad step dirs to `<step>.<why>` so orbax no longer lists them
    (kept, not deleted, for inspection)."""
    if not steps:
      return
    if distributed.is_primary():
      root = epath.Path(self.directory)
      for step in steps:
        dest = root / f"{step}.{why}"
        if dest.exists():
          dest = root / f"{step}.{why}-{time.time_ns()}"
        (root / str(step)).rename(dest)
        log.warning("moved checkpoint %s aside to %s", root / str(step), dest)
    _sync(f"llmlab_ckpt_set_aside_{why}_{'_'.join(map(str, steps))}")

  def _protect_saved(self) -> None:
    """Checkpoints saved as protected stay protected under a new schedule."""
    for step in self.steps():
      try:
        if self.restore_meta(step).get("keep_forever"):
          self.protected.add(step)
      except Exception:  # noqa: BLE001 - unreadable: never delete it either
        self.protected.add(step)

  def steps(self) -> list[int]:
    bad = set(self.incomplete)
    return sorted(s for s in self.mgr.all_steps() if s not in bad)

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- save

  def should_save(self, step: int) -> bool:
    return (step == self.total or step in self.keep_steps or
            (self.every > 0 and step % self.every == 0))

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Start an async save of `state` at `step` (if the schedule says so,
    or `force`). Returns once the arrays are in host memory.

    Raises CheckpointSaveError if this save, or the previous asynchronous
    one (whose failure only surfaces now), could not be written.
    """
    if not force and not self.should_save(step):
      return False
    self._confirm()
    if step in self.mgr.all_steps():
      return False
    meta = dict(meta, checksums=checksums(state),
                keep_forever=step in self.protected)
    try:
      with _one_save_at_a_time(self.mgr):
        saved = self.mgr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # noqa: BLE001 - any storage error: name it
      self._failed(step, e)
    self._unconfirmed = step if saved and self._async else None
    if saved and not self._async:
      self.failures = 0
    return saved

  def _confirm(self) -> None:
    """Wait for the in-flight async save; raise if it failed."""
    step, self._unconfirmed = self._unconfirmed, None
    try:
      self.mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      if step is None:
        raise
      self._failed(step, e)
    if step is not None:
      self.failures = 0

  def _failed(self, step: int, cause: BaseException) -> None:
    self.failures += 1
    self.mgr.reload()  # orbax may still list the step: re-read the disk
    log.error("checkpoint save of step %d to %s failed: %s: %s", step,
              self.path(step), type(cause).__name__, cause)
    raise CheckpointSaveError(step, self.path(step), cause,
                              self.latest_step()) from cause

  # -- restore

  def _check_step(self, step: int) -> None:
    steps = self.steps()
    if step not in steps:
      raise CheckpointError(
          f"{self.directory}: no complete checkpoint at step {step}; "
          f"available: {steps or 'none'}")

  def restore_meta(self, step: int) -> dict:
    out = self.mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return out["meta"]

  def _restore_tree(self, step: int, abstract, partial: bool,
                    meta: dict | None = None):
    """Read `abstract`'s arrays of checkpoint `step`; any failure (and a
    checksum mismatch) becomes a CheckpointError naming the directory."""
    where = f"checkpoint {self.path(step)}"
    try:
      meta = self.restore_meta(step) if meta is None else meta
      out = self.mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract),
              partial_restore=partial)))
    except Exception as e:  # noqa: BLE001 - any read failure: unusable
      raise CheckpointError(f"{where} is unreadable: {type(e).__name__}: "
                            f"{str(e)[:600]}") from e
    tree = out["state"]
    sums = meta.get("checksums")
    if sums is not None and partial:
      prefixes = tuple(f"[{k!r}]" for k in abstract)
      sums = {k: v for k, v in sums.items() if k.startswith(prefixes)}
    verify(tree, sums, where)
    return tree, meta

  def restore(self, step: int, abstract_state):
    """(state, meta) of checkpoint `step`, laid out as `abstract_state`."""
    self._check_step(step)
    return self._restore_tree(step, abstract_state, partial=False)

  def restore_params(self, step: int, abstract_params):
    """(params, meta): only the params are read, not the optimizer state."""
    self._check_step(step)
    tree, meta = self._restore_tree(step, {"params": abstract_params},
                                    partial=True)
    return tree["params"], meta

  def _try_restore(self, step: int, abstract_state, check):
    """(state, meta, None) or (None, None, CheckpointError)."""
    try:
      meta = self.restore_meta(step)
    except Exception as e:  # noqa: BLE001
      return None, None, CheckpointError(
          f"checkpoint {self.path(step)}: metadata unreadable: "
          f"{type(e).__name__}: {str(e)[:300]}")
    if check is not None:
      check(meta)  # a refusal is not a corrupt checkpoint: let it raise
    try:
      state, meta = self._restore_tree(step, abstract_state, False, meta)
    except CheckpointError as e:
      return None, None, e
    return state, meta, None

  def restore_latest(self, abstract_state, check=None):
    """(state, meta) of the newest usable checkpoint, or (None, None) if
    there are none.

    `check(meta)` runs before any array is read and may raise to refuse the
    checkpoint (e.g. a different model shape); its exceptions propagate.
    An unreadable or corrupted checkpoint is skipped with a warning and
    moved aside, and the previous one is tried; if none is usable, raises.
    """
    failures = []
    for step in reversed(self.steps()):
      state, meta, err = self._try_restore(step, abstract_state, check)
      if _all_true(err is None):
        if failures and not self.read_only:
          self._set_aside(failures, "unreadable")
          self.mgr.reload()
        return state, meta
      log.warning("%s; falling back to the previous checkpoint",
                  err or f"checkpoint {self.path(step)} failed on another "
                  "process")
      failures.append(step)
    if failures:
      raise CheckpointError(
          f"{self.directory}: none of the checkpoints {sorted(failures)} is "
          "usable (see the warnings above). Move them away to start from "
          "scratch, or use a new --workdir.")
    return None, None

  def wait(self) -> None:
    """Block until the last save is written; CheckpointSaveError if not."""
    self._confirm()

  def close(self) -> None:
    try:
      self._confirm()
    finally:
      self.mgr.close()
