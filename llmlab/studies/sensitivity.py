"""Held-out loss per batch, and its increase under relative Gaussian noise.

Sensitivity of params theta at noise level gamma (Springer et al. 2025's
"progressive sensitivity" probe):

    S(theta, gamma) = L(theta + delta) - L(theta),
    delta_W = gamma * ||W||_F / sqrt(numel W) * eps_W,   eps_W ~ N(0, I)

for every weight tensor W independently (each layer of the scanned stack
is its own tensor), so each element's noise has standard deviation
gamma * RMS(W) and E||delta_W||^2 = gamma^2 ||W||^2: "relative magnitude
gamma", comparable across tensors of different scale and across
checkpoints whose weights have grown. Every tensor is perturbed, norm
scales included. L is the held-out next-token loss of a fixed evaluation
set. The noise of (seed, tensor) is the same for every checkpoint (common
random numbers), so differences between checkpoints are not seed noise;
gamma = 0 leaves the params bit for bit unchanged.

Losses are kept per evaluation batch (summed NLL and target counts), so the
study can bootstrap over batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmlab import data as data_lib
from llmlab import sharding as shd
from llmlab import steps as steps_lib

STACKED_SCOPE = "layers"  # model.py's nn.scan scope: axis 0 is the layer


class Evaluator:
  """Per-batch held-out NLL of params of one model shape on one data config.

  One compiled eval step (`steps.make_eval_step`) serves every checkpoint
  and perturbation of that shape.
  """

  def __init__(self, setup, data_cfg, *, seq_len: int, eval_tokens: int,
               batch_size: int, seed: int = 0):
    data = data_lib.build(data_cfg, seq_len=seq_len, global_batch=batch_size,
                          seed=seed, process_index=jax.process_index(),
                          process_count=jax.process_count())
    self.setup = setup
    self.batches = [shd.global_batch(b, setup.batch_sharding)
                    for b in data.eval_batches(eval_tokens, batch_size)]
    self.eval_step = steps_lib.make_eval_step(setup)
    # Noisy params come out laid out as the eval step expects them.
    self.perturb = jax.jit(perturb,
                           out_shardings=setup.state_shardings["params"])

  def per_batch(self, params) -> dict[str, list[float]]:
    """{'nll': summed NLL per batch, 'targets': target count per batch}."""
    outs = jax.device_get([self.eval_step(params, b) for b in self.batches])
    return {"nll": [float(o[0]) for o in outs],
            "targets": [float(o[1]) for o in outs]}


def mean_loss(per_batch: dict) -> float:
  """Mean NLL per target token over all batches."""
  return float(np.sum(per_batch["nll"]) / max(np.sum(per_batch["targets"]),
                                               1.0))


def _is_stacked(path) -> bool:
  return bool(path) and getattr(path[0], "key", None) == STACKED_SCOPE


def _noise(w, key, gamma, stacked: bool):
  """gamma * RMS(W) * N(0, I) per tensor (per layer slice if stacked)."""
  axes = tuple(range(1 if stacked else 0, w.ndim))
  rms = jnp.sqrt(jnp.mean(jnp.square(w.astype(jnp.float32)), axis=axes,
                          keepdims=True))
  eps = jax.random.normal(key, w.shape, jnp.float32)
  return (gamma * rms * eps).astype(w.dtype)


def perturb(params, seed, gamma):
  """params + relative Gaussian noise of magnitude `gamma` (module doc).

  The key of each tensor depends only on (seed, position in the tree), so
  the same seed gives the same noise direction for every checkpoint.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  out = [w + _noise(w, k, gamma, _is_stacked(path))
         for (path, w), k in zip(flat, keys)]
  return jax.tree_util.tree_unflatten(treedef, out)


def sensitivity(evaluator: Evaluator, params, gammas, seeds,
                base: dict | None = None) -> list[dict]:
  """Rows {gamma, seed, loss, base_loss, increase} for every pair.

  `base` is `evaluator.per_batch(params)` if already known.
  """
  base = base or evaluator.per_batch(params)
  base_loss = mean_loss(base)
  rows = []
  for gamma in gammas:
    for seed in seeds:
      noisy = evaluator.perturb(params, jnp.uint32(seed), jnp.float32(gamma))
      loss = mean_loss(evaluator.per_batch(noisy))
      rows.append({"gamma": float(gamma), "seed": int(seed), "loss": loss,
                   "base_loss": base_loss, "increase": loss - base_loss})
  return rows
