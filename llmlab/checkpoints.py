"""Orbax checkpoints under WORKDIR/checkpoints: save, retain, restore.

A checkpoint at step s holds the train state after s updates (params,
optimizer state, step) and JSON metadata (resolved config, N, FLOPs/token,
tokens seen). Nothing else is needed to resume exactly: the data order and
the per-step RNG are pure functions of (seed, step).

Saves are asynchronous (orbax writes in a background thread into a temporary
directory and renames it when complete), so a kill mid-save leaves a
temporary directory that is never mistaken for a checkpoint. Restores take
the abstract target state with the *current* mesh's shardings, so a
checkpoint written on one mesh loads onto any other.

Retention: every sweep checkpoint (log-spaced in tokens) and the final one
are kept forever; of the others only the latest `checkpoint.keep`.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger("llmlab")


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
  return os.path.join(workdir, "checkpoints")


class Manager:
  """Thin policy layer over `ocp.CheckpointManager`."""

  def __init__(self, workdir: str, ckpt_cfg, total_steps: int,
               read_only: bool = False):
    self.every = int(ckpt_cfg.every_steps)
    self.keep_steps = sweep_steps(total_steps, int(ckpt_cfg.sweep_points),
                                  float(ckpt_cfg.sweep_min_fraction))
    self.total = total_steps
    policy = ocm.preservation_policy.AnyPreservationPolicy([
        ocm.preservation_policy.LatestN(n=int(ckpt_cfg.keep)),
        ocm.preservation_policy.CustomSteps(steps=self.keep_steps),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=bool(ckpt_cfg.async_save) and not read_only,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    self.mgr = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

  def should_save(self, step: int) -> bool:
    return (step == self.total or step in self.keep_steps or
            (self.every > 0 and step % self.every == 0))

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    if not force and not self.should_save(step):
      return False
    if step in self.mgr.all_steps():
      return False
    return self.mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def steps(self) -> list[int]:
    return sorted(self.mgr.all_steps())

  def restore(self, step: int, abstract_state):
    out = self.mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    out = self.mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return out["meta"]

  def restore_latest(self, abstract_state):
    """Newest checkpoint that restores cleanly, else (None, None).

    A checkpoint that fails to read (truncated or corrupted files) is
    skipped with a warning naming it and the error; older ones are tried.
    """
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        _check_finite(state, step)
        return state, meta
      except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
        log.warning("checkpoint %s at step %d is unreadable (%s: %s); "
                    "falling back to an earlier one",
                    checkpoint_dir(""), step, type(e).__name__, str(e)[:300])
    return None, None

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


def _check_finite(state, step: int) -> None:
  """A restored state with NaN/inf params is treated as corrupt."""
  leaves = jax.tree.leaves(state["params"])
  bad = [x for x in leaves if not bool(jax.numpy.isfinite(x).all())]
  if bad:
    raise ValueError(f"step {step}: restored params contain non-finite values")


def parse_ref(ref: str) -> tuple[str, int | None]:
  """'DIR[:STEP]' -> (DIR, STEP or None). Paths may contain ':' (gs://)."""
  head, sep, tail = ref.rpartition(":")
  if sep and tail.isdigit() and head:
    return head, int(tail)
  return ref, None
