"""Optimizer and learning-rate schedules (optax).

AdamW with decoupled weight decay masked off norm scales, global-norm
clipping, and three schedules:
- `cosine`: linear warmup then cosine decay to `final_lr_fraction`;
- `constant`: linear warmup then flat;
- `wsd` (warmup-stable-decay): flat after warmup, then a linear decay over
  the last `decay_fraction` of the steps. A stable phase lets any checkpoint
  be branched into a short decay, which is what makes intermediate
  checkpoints comparable in scaling studies.

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

import jax
import jax.numpy as jnp
import numpy as np
import optax


def schedule_params(optim_cfg, learning_rate: float, steps: int) -> dict:
  """The schedule's run-time numbers as numpy scalars.

  They are the constants XLA makes of an optax schedule compiled with its
  numbers fixed: differences like `lr - final` formed in float64 and rounded
  once (optax's Python-float arithmetic), divisions by a length turned into
  float32 products with its reciprocal (XLA's algebraic simplifier). So
  `lr_at` with these numbers as arguments gives the compiled optax values
  bit for bit, and runs keep the numbers they had before.
  """
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
    raise ValueError(f"config.optim.schedule={kind!r}: unknown schedule")
  warmup = linear(count, p["warmup_len"], p["warmup_inv"], p["warmup_drop"],
                  p["lr"])
  return jnp.where(count < p["warmup"], warmup, main)


def schedule(optim_cfg, learning_rate: float, steps: int) -> optax.Schedule:
  """The schedule with its numbers fixed (for host-side use and tests)."""
  p = schedule_params(optim_cfg, learning_rate, steps)
  kind = optim_cfg.schedule
  lr_at(kind, p, 0)  # unknown kinds fail here, not in the step
  return lambda count: lr_at(kind, p, count)


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
