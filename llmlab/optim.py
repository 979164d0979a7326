"""Optimizer and learning-rate schedules (optax).

AdamW with decoupled weight decay masked off norm scales, global-norm
clipping, and three schedules:
- `cosine`: linear warmup then cosine decay to `final_lr_fraction`;
- `constant`: linear warmup then flat;
- `wsd` (warmup-stable-decay): flat after warmup, then a linear decay over
  the last `decay_fraction` of the steps. A stable phase lets any checkpoint
  be branched into a short decay, which is what makes intermediate
  checkpoints comparable in scaling studies.
Gradient accumulation lives in the train step (`llmlab/train.py`), which
sums per-microbatch gradients before this optimizer sees them.
"""

from __future__ import annotations

import jax
import optax


def schedule(optim_cfg, learning_rate: float, steps: int) -> optax.Schedule:
  warm = min(int(optim_cfg.warmup_steps), max(steps - 1, 0))
  lo = learning_rate * optim_cfg.final_lr_fraction
  warmup = optax.linear_schedule(0.0 if warm else learning_rate,
                                 learning_rate, max(warm, 1))
  rest = max(steps - warm, 1)
  kind = optim_cfg.schedule
  if kind == "constant":
    main = optax.constant_schedule(learning_rate)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(learning_rate, rest,
                                       alpha=optim_cfg.final_lr_fraction)
  elif kind == "wsd":
    decay = max(int(round(optim_cfg.decay_fraction * steps)), 1)
    stable = max(rest - decay, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(learning_rate),
         optax.linear_schedule(learning_rate, lo, decay)], [stable])
  else:
    raise ValueError(f"config.optim.schedule={kind!r}: unknown schedule")
  return optax.join_schedules([warmup, main], [warm])


def decay_mask(params):
  """True where weight decay applies: matrices, not norm scales or biases."""
  def keep(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return not any(n in ("scale", "bq", "bk", "bv") for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def make(optim_cfg, learning_rate: float, steps: int):
  """Returns (optax transformation, schedule)."""
  lr = schedule(optim_cfg, learning_rate, steps)
  parts = []
  if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  parts.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2,
                           eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), lr
