"""Divergence guard: detect a non-finite or spiking loss, then stop, skip or
roll back (`config.guard`, docs/reliability.md).

Detection happens inside the jitted train step, so the default path never
waits for the device: the step carries a small replicated `carry` (the
running-median window of recent losses, event counters and the first bad
event) that it updates from its own loss and gradient norm. The host reads
the carry only with the metrics it already reads one step late (log steps)
and at points that synchronise anyway (eval, checkpoint saves).

* `stop` (default): the first bad event ends the run with `Diverged`, naming
  the step and the metric. A save is always preceded by a check, so no
  checkpoint ever holds a state produced after a bad step.
* `skip`: the step drops its own update in-graph (`jnp.where` on the
  finiteness/spike flag) and counts it; nothing reaches the host.
* `rollback`: the host restores the last good checkpoint and advances the
  data stream past the batches of the failed stretch (`data_offset`),
  at most `max_rollbacks` times.

Running median: kept on device in the carry (not on the host), because the
skip decision must be made in the same step that produced the loss, and a
host-side window could only be one step late. Only accepted losses enter
the window, so a spike cannot raise its own threshold. Spike detection
starts once the window is full and needs a positive median (cross-entropy
style losses).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("llmlab")

KINDS = {1: "loss", 2: "grad_norm", 3: "loss spike"}
SPIKE_SCALE = 100.0  # debug_spike_step multiplies that batch's loss by this
COUNT_KEYS = ("skipped_steps", "nonfinite_steps", "spike_steps")


class Diverged(RuntimeError):
  """Training diverged and the policy says stop (or retries ran out)."""


# --------------------------------------------------------------- the carry


def init_carry(gcfg, data_offset: int = 0) -> dict:
  """Host (numpy) carry of a fresh run.

  The spike factor and the fire-drill steps ride in the carry as runtime
  values rather than compile-time constants, so changing them (or turning
  them off) never recompiles the step; only `guard.policy=skip` (the
  in-graph drop) and `guard.spike_window` (an array shape) change it.
  """
  return {"losses_W": np.zeros((gcfg.spike_window,), np.float32),
          "spike_factor": np.float32(gcfg.spike_factor),
          "debug_nan_step": np.int32(gcfg.debug_nan_step),
          "debug_spike_step": np.int32(gcfg.debug_spike_step),
          "seen": np.int32(0), "skipped": np.int32(0),
          "nonfinite": np.int32(0), "spikes": np.int32(0),
          "bad_step": np.int32(-1), "bad_kind": np.int32(0),
          "bad_value": np.float32(0), "bad_median": np.float32(0),
          "data_offset": np.int32(data_offset)}


def carry_to_meta(carry: dict, rollbacks: int) -> dict:
  """JSON for checkpoint metadata: what an exact resume needs. The first-bad
  fields are left out: a saved state is clean by construction."""
  c = jax.device_get(carry)
  return {"losses": [float(x) for x in np.asarray(c["losses_W"])],
          "seen": int(c["seen"]), "skipped": int(c["skipped"]),
          "nonfinite": int(c["nonfinite"]), "spikes": int(c["spikes"]),
          "data_offset": int(c["data_offset"]), "rollbacks": int(rollbacks)}


def carry_from_meta(meta: dict | None, gcfg) -> tuple[dict, int]:
  """(host carry, rollbacks) from checkpoint metadata (fresh if absent)."""
  g = (meta or {}).get("guard")
  if not g:
    return init_carry(gcfg), 0
  window = gcfg.spike_window
  carry = init_carry(gcfg, g.get("data_offset", 0))
  for key in ("skipped", "nonfinite", "spikes"):
    carry[key] = np.int32(g.get(key, 0))
  losses = np.asarray(g.get("losses", []), np.float32)
  if losses.shape == (window,):
    carry["losses_W"], carry["seen"] = losses, np.int32(g.get("seen", 0))
  else:
    log.info("guard.spike_window changed (%d -> %d): the running median "
             "starts empty", losses.size, window)
  return carry, int(g.get("rollbacks", 0))


def to_device(carry: dict, sharding) -> dict:
  """The carry as replicated global arrays (a tiny jitted constant: works
  the same on one process and many)."""
  return jax.jit(lambda: jax.tree.map(jnp.asarray, carry),
                 out_shardings=sharding)()


# ------------------------------------------------------------- in the step


def loss_scale(carry: dict, data_step):
  """Fire drills (debug keys): NaN or x100 on the loss of batch k (1-based
  data step), else 1; two scalar compares, so they cost nothing when off
  (0: data_step + 1 is never 0)."""
  hit = data_step + 1
  return jnp.where(hit == carry["debug_nan_step"], jnp.nan,
                   jnp.where(hit == carry["debug_spike_step"], SPIKE_SCALE,
                             1.0)).astype(jnp.float32)


def update(carry: dict, done, loss, grad_norm, drop: bool):
  """(ok, new carry) for the step that produced `loss` and `grad_norm`.

  `done` is that step's number (updates so far including it). `drop` says
  the policy discards bad updates, which is what `skipped` counts.
  """
  losses_W = carry["losses_W"]
  window = losses_W.shape[0]
  median = jnp.median(losses_W)
  factor = carry["spike_factor"]
  spike = ((factor > 0) & (carry["seen"] >= window) & (median > 0) &
           (loss > factor * median))
  kind = jnp.where(~jnp.isfinite(loss), 1,
                   jnp.where(~jnp.isfinite(grad_norm), 2,
                             jnp.where(spike, 3, 0)))
  bad = kind > 0
  ok = ~bad
  first = bad & (carry["bad_step"] < 0)
  new = dict(carry)
  new["losses_W"] = jnp.where(
      ok, losses_W.at[carry["seen"] % window].set(loss), losses_W)
  new["seen"] = carry["seen"] + ok.astype(jnp.int32)
  new["skipped"] = carry["skipped"] + (bad & drop).astype(jnp.int32)
  new["nonfinite"] = carry["nonfinite"] + ((kind == 1) | (kind == 2)).astype(
      jnp.int32)
  new["spikes"] = carry["spikes"] + (kind == 3).astype(jnp.int32)
  new["bad_step"] = jnp.where(first, done, carry["bad_step"]).astype(jnp.int32)
  new["bad_kind"] = jnp.where(first, kind, carry["bad_kind"]).astype(jnp.int32)
  value = jnp.where(kind == 2, grad_norm, loss).astype(jnp.float32)
  new["bad_value"] = jnp.where(first, value, carry["bad_value"])
  new["bad_median"] = jnp.where(first, median, carry["bad_median"])
  return ok, new


def keep_if(ok, new_state: dict, old_state: dict) -> dict:
  """`new_state` where ok, else the old params and optimizer state (the step
  counter always advances: the batch was consumed)."""
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o),
                      {k: v for k, v in new_state.items() if k != "step"},
                      {k: v for k, v in old_state.items() if k != "step"})
  return dict(kept, step=new_state["step"])


def report(carry: dict) -> dict:
  """What the host reads with the metrics: counters and the first event."""
  return {"skipped_steps": carry["skipped"],
          "nonfinite_steps": carry["nonfinite"],
          "spike_steps": carry["spikes"], "bad_step": carry["bad_step"],
          "bad_kind": carry["bad_kind"], "bad_value": carry["bad_value"],
          "bad_median": carry["bad_median"]}


# ------------------------------------------------------------ on the host


@dataclasses.dataclass
class Event:
  step: int
  kind: int
  value: float
  median: float
  factor: float = 0.0

  def describe(self) -> str:
    if self.kind == 3:
      return (f"loss {self.value:.4g} is above guard.spike_factor="
              f"{self.factor:g} x the running median {self.median:.4g} "
              "(loss spike)")
    return f"{KINDS[self.kind]} is {self.value}"

  @property
  def metric(self) -> str:
    return KINDS[self.kind]


def event(g: dict, factor: float = 0.0) -> Event | None:
  """The first bad event recorded in a host copy of `report(carry)`."""
  step = int(g["bad_step"])
  if step < 0:
    return None
  return Event(step, int(g["bad_kind"]), float(g["bad_value"]),
               float(g["bad_median"]), factor)


class Policy:
  """Host side of the guard: turns events into stop / skip / rollback."""

  def __init__(self, gcfg, rollbacks: int = 0):
    self.name = gcfg.policy
    self.factor = float(gcfg.spike_factor)
    self.max_rollbacks = int(gcfg.max_rollbacks)
    self.rollbacks = rollbacks
    self._counted = None

  @property
  def drops(self) -> bool:
    return self.name == "skip"

  def check(self, g: dict, last_good: str) -> Event | None:
    """None to go on; an Event to roll back from; raises `Diverged` to stop.

    `last_good` describes the newest checkpoint (for the message).
    """
    g = {k: np.asarray(v) for k, v in g.items()}
    ev = event(g, self.factor)
    if self.drops:
      self._log_skips(g, ev)
      return None
    if ev is None:
      return None
    if self.name == "stop":
      raise Diverged(
          f"training diverged at step {ev.step}: {ev.describe()} "
          f"(guard.policy=stop). No checkpoint was written after it; the "
          f"last good one is {last_good}. To continue past it, re-run with "
          "--config.guard.policy=rollback or =skip, or lower "
          "train.learning_rate.")
    if self.rollbacks >= self.max_rollbacks:
      raise Diverged(
          f"training diverged at step {ev.step}: {ev.describe()}; already "
          f"rolled back {self.rollbacks} time(s) (guard.max_rollbacks="
          f"{self.max_rollbacks}). The last good checkpoint is {last_good}.")
    return ev

  def _log_skips(self, g: dict, ev: Event | None) -> None:
    counts = tuple(int(g[k]) for k in COUNT_KEYS)
    if ev is not None and counts != self._counted and counts[0]:
      log.warning("guard: %d update(s) skipped so far (%d non-finite, %d "
                  "spikes); the first at step %d: %s", *counts, ev.step,
                  ev.describe())
    self._counted = counts


def row_counts(g: dict, rollbacks: int) -> dict:
  """The guard columns of a metrics row."""
  out = {k: int(np.asarray(g[k])) for k in COUNT_KEYS}
  out["rollbacks"] = rollbacks
  return out
