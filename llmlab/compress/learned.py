"""Targeted structured pruning with learned masks (Sheared-LLaMA, Xia et al.
2023; CoFi, Xia et al. 2022).

Hard-concrete masks z on layers, kv heads, query heads, MLP channels and
hidden dims (`masked`) are trained together with the weights on the source
run's own data. The objective is a min-max game

    min over (weights, log_alpha)  max over lambda
        CE(masked model) + sum_j lambda1_j (s_j - t_j) + lambda2_j (s_j - t_j)^2

where for every constraint j, s_j is an expected count of kept units under
the masks' keep probabilities (`shapes.counts` of P(z != 0): layers, hidden
dims, and per layer kv heads, query heads and MLP channels; Sheared-LLaMA's
per-structure targets) and t_j is the target's. `constrain_size` adds
CoFi's single constraint on the expected parameter count (`shapes.size`,
always logged); with the per-structure constraints it is redundant, and
coupling it (products of layer, width and head probabilities) made the masks
oscillate in our runs, so it is off by default. Deviations are divided by
the source's count so that all constraints live on one scale. The
multipliers rise by gradient ascent while a constraint is violated, so the
penalty grows until the masks meet the target. As in Sheared-LLaMA the
targets move linearly from the source's counts to the final ones over the
first `target_warmup` of the steps.

The mask logits use Adam without momentum (b1 = 0): all units of a
structure start equal and the penalty pushes them together, so momentum
carries every mask past the target at once. In a simulation of the
compress_quick shapes (penalty plus a weak stand-in for the loss) the
expected size went 229k -> 42k -> 149k -> 52k over 150 steps for a 71k
target with b1 = 0.9, and came within 10% of it with b1 = 0. With the real
loss 200 steps do not settle every count (see the README's table); the
final selection is the exact target shape regardless.

At the end the deterministic masks pick exactly the target's units (the
top-ranked per structure, GQA groups kept together, `slicing.select`), their
values are folded into the weights (`masked.fold`) and the params are
sliced: the result has exactly the target shape and computes what the
masked model with those deterministic masks computes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmlab import errors
from llmlab import model as model_lib
from llmlab.compress import hard_concrete as hc
from llmlab.compress import masked
from llmlab.compress import shapes
from llmlab.compress import slicing

log = logging.getLogger("llmlab")

HIDDEN_FLOOR = 1e-6  # a kept hidden dim must stay non-zero (see `final`)


@dataclasses.dataclass
class Settings:
  steps: int = 200
  batch_size: int = 0  # 0 = the source run's train.batch_size
  learning_rate: float = 1e-3  # model weights (Adam)
  mask_lr: float = 0.1  # log_alpha (Adam, no momentum)
  lambda_lr: float = 0.3  # multipliers (gradient ascent)
  init_log_alpha: float = 2.0  # P(z != 0) = 0.97 at the start
  target_warmup: float = 0.5  # fraction of steps to move the targets
  constrain_size: bool = False  # also CoFi's expected-params constraint
  seed: int = 0
  log_every: int = 20

  def check(self) -> None:
    for key in ("steps", "log_every"):
      if getattr(self, key) < 1:
        raise errors.ConfigError(f"learned pruning: {key}={getattr(self, key)!r} "
                         "must be >= 1")
    for key in ("learning_rate", "mask_lr", "lambda_lr"):
      if getattr(self, key) < 0:
        raise errors.ConfigError(f"learned pruning: {key}={getattr(self, key)!r} "
                         "must be >= 0")
    if not 0.0 <= self.target_warmup <= 1.0:
      raise errors.ConfigError(f"learned pruning: target_warmup="
                       f"{self.target_warmup!r} must be in [0, 1]")


def expected(log_alpha: dict, cfg: model_lib.ModelConfig) -> dict:
  """Expected kept counts and expected total params under the masks."""
  probs = {k: hc.prob_nonzero(v) for k, v in log_alpha.items()}
  out = shapes.counts(probs, cfg)
  out["size"] = shapes.size(probs, cfg)["total"]
  return out


def _endpoints(src: model_lib.ModelConfig, tgt: model_lib.ModelConfig):
  """(source counts, target counts) of every constraint, as floats."""
  start = dict(shapes.target_counts(src), size=model_lib.param_counts(src)["total"])
  end = dict(shapes.target_counts(tgt), size=model_lib.param_counts(tgt)["total"])
  return ({k: float(v) for k, v in start.items()},
          {k: float(v) for k, v in end.items()})


def lagrangian(s: dict, start: dict, end: dict, lam: dict, ramp):
  """sum_j lambda1 * dev + lambda2 * dev^2, dev = (s - t) / source count."""
  total = 0.0
  for k in end:
    t = start[k] + (end[k] - start[k]) * ramp
    dev = (s[k] - t) / start[k]
    total = total + jnp.sum(lam[k][0] * dev + lam[k][1] * dev * dev)
  return total


@dataclasses.dataclass
class Result:
  params: dict  # pruned params (numpy, target shape)
  selection: slicing.Selection
  history: list  # logged rows
  final: dict  # expected counts/size at the end, wall time


def train_masks(model: model_lib.Transformer, params, tgt: model_lib.ModelConfig,
                batch_at: Callable[[int], dict], settings: Settings) -> Result:
  """Train masks and weights for `settings.steps`; fold and slice to `tgt`."""
  settings.check()
  src = model.cfg
  shapes.check_target(src, tgt)
  start, end = _endpoints(src, tgt)
  target_size = end["size"]
  if not settings.constrain_size:
    end.pop("size")
  # One device, no mesh: a mesh-sharded input would give outputs another
  # sharding than the fresh mask state, and a second compile.
  params = jax.tree.map(jnp.asarray, jax.device_get(params))
  log_alpha = {k: jnp.full(s, settings.init_log_alpha, jnp.float32)
               for k, s in masked.mask_shapes(src).items()}
  shaped = jax.eval_shape(lambda la: expected(la, src), log_alpha)
  lam = {k: jnp.zeros((2,) + shaped[k].shape) for k in end}
  w_opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adam(settings.learning_rate))
  m_opt = optax.adam(settings.mask_lr, b1=0.0)
  state = {"params": params, "log_alpha": log_alpha, "lam": lam,
           "w_opt": w_opt.init(params), "m_opt": m_opt.init(log_alpha)}
  warm = max(1.0, settings.target_warmup * settings.steps)

  def loss_fn(p, la, lm, batch, rng, ramp):
    r_mask, r_drop = jax.random.split(rng)
    keys = jax.random.split(r_mask, len(la))
    z = {k: hc.sample(key, la[k]) for key, k in zip(keys, sorted(la))}
    ce = masked.mean_nll(masked.masked_apply(model, p, z, batch, r_drop, True),
                         batch)
    s = expected(la, src)
    return ce + lagrangian(s, start, end, lm, ramp), (ce, s)

  @jax.jit
  def step_fn(state, batch, step):
    rng = jax.random.fold_in(jax.random.key(settings.seed), step)
    ramp = jnp.minimum(1.0, step / warm)
    grads, (ce, s) = jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        state["params"], state["log_alpha"], state["lam"], batch, rng, ramp)
    g_w, g_m, g_l = grads
    up, w_opt_state = w_opt.update(g_w, state["w_opt"], state["params"])
    mp, m_opt_state = m_opt.update(g_m, state["m_opt"])
    new = {"params": optax.apply_updates(state["params"], up),
           "log_alpha": optax.apply_updates(state["log_alpha"], mp),
           "lam": jax.tree.map(lambda l, g: l + settings.lambda_lr * g,
                               state["lam"], g_l),
           "w_opt": w_opt_state, "m_opt": m_opt_state}
    return new, {"ce": ce, **{f"expected_{k}": jnp.mean(v) for k, v in s.items()}}

  history, t0, t1 = [], time.time(), None
  for step in range(settings.steps):
    batch = {k: jnp.asarray(v) for k, v in batch_at(step).items()
             if k in ("tokens", "segment_ids", "positions")}
    state, metrics = step_fn(state, batch, step)
    if step == 0:  # step times exclude the compile of the first step
      jax.block_until_ready(metrics)
      t1 = time.time()
    if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
      row = {"step": step + 1, **{k: float(v) for k, v in
                                  jax.device_get(metrics).items()}}
      history.append(row)
      log.info("learned masks step %d/%d: ce %.4f expected size %.0f "
               "(target %.0f), layers %.2f, hidden %.1f", step + 1,
               settings.steps, row["ce"], row["expected_size"],
               target_size, row["expected_layer"], row["expected_hidden"])
  jax.block_until_ready(state)
  step_time = (time.time() - t1) / max(settings.steps - 1, 1)
  sel, values = final_masks(state["log_alpha"], src, tgt)
  folded = jax.jit(masked.fold, static_argnums=2)(state["params"], values, src)
  pruned = slicing.slice_params(folded, sel)
  s = jax.device_get(jax.jit(expected, static_argnums=1)(state["log_alpha"], src))
  info = {k: np.asarray(v).tolist() for k, v in s.items()}
  info.update(wall_s=time.time() - t0, step_time_s=step_time,
              target=dict(_endpoints(src, tgt)[1]))
  return Result(pruned, sel, history, info)


def final_masks(log_alpha: dict, src: model_lib.ModelConfig,
                tgt: model_lib.ModelConfig):
  """(selection, mask values to fold) from trained log_alphas.

  Units are ranked by keep probability (a kv head by its probability times
  its best query heads' total); the kept ones are folded with their
  deterministic mask values. A kept hidden dim whose value is exactly 0 is
  floored at HIDDEN_FLOOR: the pruned model's RMSNorm averages over all its
  D' dims, so the masked model must count it as kept too.
  """
  la = {k: np.asarray(jax.device_get(v), np.float64) for k, v in log_alpha.items()}
  probs = {k: hc.prob_nonzero(v, np) for k, v in la.items()}
  ranks = dict(probs, layer=la["layer"], hidden=la["hidden"], mlp=la["mlp"])
  sel = slicing.select(ranks, src, tgt, group="product")
  keep = slicing.masks_of(sel, src)
  det = {k: hc.deterministic(v, np) for k, v in la.items()}
  values = {k: keep[k] * det[k] for k in keep}
  values["hidden"] = np.where(keep["hidden"] > 0,
                              np.maximum(values["hidden"], HIDDEN_FLOOR), 0.0)
  return sel, {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
