"""Importance scores of layers, kv heads, query heads, MLP channels and
hidden dims (shaped like a mask set, `masked.mask_shapes`).

- `magnitude`: the squared norm of the weights that exist only because of a
  unit, i.e. exactly the weights that pruning it removes (group-lasso
  norms). Needs no data; a baseline.
- `activation`: first-order estimate of how much the calibration loss rises
  when a unit is removed: with masks z = 1 multiplying every unit's output,
  dL/dz_i is the inner product of the unit's activations with the loss
  gradient reaching them, so removing the unit (z_i: 1 -> 0) changes the
  loss by about -dL/dz_i. The score is the mean over calibration rows of
  |dL_row/dz_i| (Michel et al. 2019 for heads; Molchanov et al. 2019 for
  channels). The calibration rows come from the source run's own data
  pipeline; one forward/backward pass of the masked model gives every score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmlab import model as model_lib
from llmlab.compress import masked


def _sq(x, keep_axes):
  """Sum of squares over all axes but `keep_axes`."""
  axes = tuple(a for a in range(x.ndim) if a not in keep_axes)
  return jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)


@functools.partial(jax.jit, static_argnums=1)
def magnitude(params, cfg: model_lib.ModelConfig) -> dict:
  """Squared norms of each unit's own weights (no data needed)."""
  lay = params["layers"]
  attn, mlp = lay["attn"], lay["mlp"]
  head = _sq(attn["wq"], (0, 2)) + _sq(attn["wo"], (0, 1))
  kv = _sq(attn["wk"], (0, 2)) + _sq(attn["wv"], (0, 2))
  if cfg.attn_bias:
    head = head + _sq(attn["bq"], (0, 1))
    kv = kv + _sq(attn["bk"], (0, 1)) + _sq(attn["bv"], (0, 1))
  channel = (_sq(mlp["w_gate"], (0, 2)) + _sq(mlp["w_up"], (0, 2)) +
             _sq(mlp["w_down"], (0, 1)))
  hidden = (_sq(params["embedding"], (1,)) +
            _sq(attn["wq"], (1,)) + _sq(attn["wk"], (1,)) +
            _sq(attn["wv"], (1,)) + _sq(attn["wo"], (3,)) +
            _sq(mlp["w_gate"], (1,)) + _sq(mlp["w_up"], (1,)) +
            _sq(mlp["w_down"], (2,)))
  if not cfg.tie_embeddings:
    hidden = hidden + _sq(params["unembed"], (0,))
  layer = sum(_sq(x, (0,)) for x in jax.tree.leaves(lay))
  return {"layer": layer, "kv": kv, "head": head, "mlp": channel,
          "hidden": hidden}


def activation(model: model_lib.Transformer, params, batch) -> dict:
  """Mean |dL_row/dz| over the calibration rows of `batch` at z = 1."""
  return _activation(model, params, {k: jnp.asarray(batch[k]) for k in
                                     ("tokens", "segment_ids", "positions")})


@functools.partial(jax.jit, static_argnums=0)
def _activation(model, params, batch):
  ones = masked.ones(model.cfg)

  def row_loss(z, row):
    one = jax.tree.map(lambda x: x[None], row)
    return masked.mean_nll(masked.masked_apply(model, params, z, one), one)

  grads = jax.vmap(jax.grad(row_loss), in_axes=(None, 0))(ones, batch)
  return jax.tree.map(lambda g: jnp.mean(jnp.abs(g), axis=0), grads)


def scores_for(method: str, model, params, batch=None) -> dict:
  if method == "magnitude":
    return magnitude(params, model.cfg)
  if method == "activation":
    if batch is None:
      raise ValueError("activation importance needs a calibration batch")
    return activation(model, params, batch)
  raise ValueError(f"unknown importance method {method!r} (known: magnitude, "
                   "activation)")

