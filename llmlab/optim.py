"""Optimizer and learning-rate schedules (optax).

AdamW with decoupled weight decay masked off norm scales, global-norm
clipping, and three schedules:
- `cosine`: linear warmup then cosine decay to `final_lr_fraction`;
- `constant`: linear warmup then flat;
- `wsd` (warmup-stable-decay): flat after warmup, then a linear decay over
  the last `decay_fraction` of the steps. A stable phase lets any checkpoint
  be branched into a short decay, which is what makes intermediate
  checkpoints comparable in scaling studies;
- `file`: every update's rate read from `optim.schedule_file` (a JSON file
  as `llmlab schedule` writes one: {"lr": [rate of update 1, 2, ...],
  "warmup_steps": W}, warmup included), so a schedule found by optimising a
  law of the loss curve trains exactly as it was predicted.

A schedule is its kind (compiled in) plus a few numbers (`schedule_params`:
peak and final LR, warmup/stable/decay lengths) that the train step takes as
an argument. So runs that differ only in length or learning rate -- a
study's decay branches, an LR grid of fine-tunes -- run one compiled
program (the persistent compilation cache finds it), and the values are
bit for bit those of the optax schedules they replace (tests/test_optim.py).
Gradient accumulation lives in the train step (`llmlab/steps.py`), which
sums per-microbatch gradients before this optimizer sees them.
"""

from __future__ import annotations

from typing import Callable

import hashlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmlab import config as config_lib
from llmlab import errors
from llmlab import storage

KINDS = ("cosine", "constant", "wsd", "file")


def schedule_params(optim_cfg, learning_rate: float, steps: int) -> dict:
  """The schedule's run-time numbers as numpy scalars.

  They are the constants XLA makes of an optax schedule compiled with its
  numbers fixed: differences like `lr - final` formed in float64 and rounded
  once (optax's Python-float arithmetic), divisions by a length turned into
  float32 products with its reciprocal (XLA's algebraic simplifier). So
  `lr_at` with these numbers as arguments gives the compiled optax values
  bit for bit, and runs keep the numbers they had before.

  A `file` schedule is its rates of updates 1..steps (float32 "table") and
  the file's warmup length; its peak is the largest rate.
  """
  if optim_cfg.schedule == "file":
    table, warm = read_schedule_file(optim_cfg.schedule_file, steps)
    return {"table": table, "warmup": np.int32(warm),
            "lr": np.float32(table.max(initial=0.0))}
  warm = min(int(optim_cfg.warmup_steps), max(steps - 1, 0))
  lr = float(learning_rate)
  lo = lr * float(optim_cfg.final_lr_fraction)
  rest = max(steps - warm, 1)
  decay = max(int(round(float(optim_cfg.decay_fraction) * steps)), 1)
  alpha = float(optim_cfg.final_lr_fraction)
  f32, i32 = np.float32, np.int32
  inv = lambda n: f32(1) / f32(n)  # float32 division, as XLA folds it
  return {
      "lr": f32(lr), "warmup": i32(warm), "warmup_len": i32(max(warm, 1)),
      "warmup_inv": inv(max(warm, 1)),
      "warmup_drop": f32((0.0 if warm else lr) - lr),  # init - end of warmup
      "rest": f32(rest),                                # cosine length
      "cos_freq": f32(np.pi) / f32(rest),               # radians per step
      "cos_half_scale": f32(0.5) * f32(1.0 - alpha), "cos_floor": f32(alpha),
      "stable": i32(max(rest - decay, 0)), "decay": i32(decay),
      "decay_inv": inv(decay), "decay_drop": f32(lr - lo), "final": f32(lo),
  }


def lr_at(kind: str, p: dict, count):
  """Learning rate at optimizer step `count` (traceable; p may be traced)."""
  def linear(c, length, inv, drop, end):  # optax.linear_schedule, begin 0
    frac = 1 - jnp.clip(c, 0, length).astype(jnp.float32) * inv
    return frac * drop + end

  if kind == "file":  # the warmup is in the table
    last = p["table"].shape[0] - 1
    return jnp.take(p["table"], jnp.clip(count, 0, last))
  c = count - p["warmup"]
  if kind == "constant":
    main = jnp.broadcast_to(p["lr"], jnp.shape(count))
  elif kind == "cosine":  # optax.cosine_decay_schedule, exponent 1
    c_main = jnp.minimum(c.astype(jnp.float32), p["rest"])
    cosine = jnp.cos(c_main * p["cos_freq"]) + 1
    main = (cosine * p["cos_half_scale"] + p["cos_floor"]) * p["lr"]
  elif kind == "wsd":
    main = jnp.where(c < p["stable"], p["lr"],
                     linear(c - p["stable"], p["decay"], p["decay_inv"],
                            p["decay_drop"], p["final"]))
  else:
    raise config_lib.ConfigError(f"config.optim.schedule={kind!r}: unknown schedule")
  warmup = linear(count, p["warmup_len"], p["warmup_inv"], p["warmup_drop"],
                  p["lr"])
  return jnp.where(count < p["warmup"], warmup, main)


def schedule(optim_cfg, learning_rate: float, steps: int) -> optax.Schedule:
  """The schedule with its numbers fixed (for host-side use and tests)."""
  p = schedule_params(optim_cfg, learning_rate, steps)
  kind = optim_cfg.schedule
  lr_at(kind, p, 0)  # unknown kinds fail here, not in the step
  return lambda count: lr_at(kind, p, count)


def read_schedule_file(path: str, steps: int) -> tuple[np.ndarray, int]:
  """(float32 rates of updates 1..steps, warmup steps) of a schedule file.

  Read and checked when the run is built, before anything compiles: a file
  too short for train.steps, or a rate that is not a finite number >= 0,
  would otherwise train with a clipped index or a NaN update. Errors name
  the file and the entry.
  """
  where = f"config.optim.schedule_file={path!r}"
  if not path:
    raise config_lib.ConfigError("config.optim.schedule='file' needs "
                                 "config.optim.schedule_file=PATH.json")
  if not storage.exists(path):
    raise errors.NotFound(f"{where}: no such file")
  try:
    obj = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f"{where}: not JSON ({e})") from None
  rates = obj.get("lr") if isinstance(obj, dict) else obj
  if not isinstance(rates, list):
    raise config_lib.ConfigError(f'{where}: expected {{"lr": [rates...]}} or a '
                                 "list of rates")
  if len(rates) < steps:
    raise config_lib.ConfigError(f"{where}: {len(rates)} rates, fewer than "
                                 f"config.train.steps={steps}")
  for i, v in enumerate(rates[:steps]):
    _check_rate(where, i, v)
  warm = obj.get("warmup_steps", 0) if isinstance(obj, dict) else 0
  if not isinstance(warm, int) or isinstance(warm, bool) or warm < 0:
    raise config_lib.ConfigError(f"{where}: warmup_steps={warm!r} is not an "
                                 "integer >= 0")
  return np.asarray(rates[:steps], np.float32), warm


def _check_rate(where: str, i: int, v) -> None:
  ok = isinstance(v, (int, float)) and not isinstance(v, bool)
  why = ("is not a number" if not ok else "is not finite"
         if not math.isfinite(v) else "is negative" if v < 0 else "")
  if why:
    raise config_lib.ConfigError(f"{where}: lr[{i}] = {v!r} (update {i + 1}) "
                                 f"{why}")


def schedule_fingerprint(p: dict) -> str:
  """sha256 of a file schedule's rates: what a resumed run must train with."""
  return hashlib.sha256(np.asarray(p["table"], np.float32).tobytes()).hexdigest()


def decay_mask(params):
  """True where weight decay applies: matrices, not norm scales or biases."""
  def keep(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return not any(n in ("scale", "bq", "bk", "bv") for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def transform(optim_cfg, lr: Callable) -> optax.GradientTransformation:
  """Clipping + AdamW around the schedule `lr`. The state's structure does
  not depend on `lr`, so the step may rebuild this with a traced schedule."""
  parts = []
  if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  parts.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2,
                           eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)


def make(optim_cfg, learning_rate: float, steps: int):
  """Returns (optax transformation, schedule) with the numbers fixed."""
  lr = schedule(optim_cfg, learning_rate, steps)
  return transform(optim_cfg, lr), lr
