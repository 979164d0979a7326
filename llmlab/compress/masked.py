"""Masks over a model's structures, and the masked forward pass.

A mask set is a dict of float arrays over the *source* shape:

    layer  [L]     whole residual block (attention and MLP)
    kv     [L, K]  kv heads (a query head is alive only with its kv head)
    head   [L, H]  query heads
    mlp    [L, F]  SwiGLU channels
    hidden [D]     residual-stream dims

Masks are applied without touching `llmlab/model.py`: every mask multiplies
a unit's *output*, so it folds into the weights that write it (`fold`):
heads into rows of `wo`, channels into rows of `w_down`, a layer into both,
hidden dims into the columns of the embedding, `wo` and `w_down`. The
residual stream is then exactly zero on masked hidden dims, and the only
other effect of removing them is that RMSNorm averages over the D' dims that
remain instead of D: an interceptor on the model's RMSNorm rescales its
output by sqrt((ms_D + eps) / (sum / D' + eps)). With these two, the masked
full model computes exactly what the sliced smaller model computes (tested),
and the same masked forward serves calibration gradients (`importance`) and
hard-concrete mask training (`learned`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llmlab import model as model_lib
from llmlab.compress import shapes
from llmlab.objectives.next_token import target_mask, token_nll

KEYS = ("layer", "kv", "head", "mlp", "hidden")


def mask_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  l = cfg.num_layers
  return {"layer": (l,), "kv": (l, cfg.num_kv_heads),
          "head": (l, cfg.num_heads), "mlp": (l, cfg.mlp_dim),
          "hidden": (cfg.d_model,)}


def ones(cfg: model_lib.ModelConfig) -> dict:
  """The masks that keep everything (the masked model is the model)."""
  return {k: jnp.ones(s, jnp.float32) for k, s in mask_shapes(cfg).items()}


def fold(params, masks: dict, cfg: model_lib.ModelConfig):
  """Params with every mask multiplied into the weights writing its unit."""
  g = shapes.group_size(cfg)
  head_LxH = masks["head"] * jnp.repeat(masks["kv"], g, axis=-1)
  layer_L, hid_D = masks["layer"], masks["hidden"]
  layers = params["layers"]
  wo = layers["attn"]["wo"] * (head_LxH * layer_L[:, None])[:, :, None, None]
  w_down = layers["mlp"]["w_down"] * (masks["mlp"] * layer_L[:, None])[..., None]
  out = dict(params, embedding=params["embedding"] * hid_D)
  out["layers"] = dict(layers,
                       attn=dict(layers["attn"], wo=wo * hid_D),
                       mlp=dict(layers["mlp"], w_down=w_down * hid_D))
  return out


def _norm_interceptor(hidden_D, eps: float):
  """Make the model's residual-stream RMSNorms average over the kept dims
  (those with a non-zero mask) instead of all D."""
  kept = jnp.sum((hidden_D != 0).astype(jnp.float32))

  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if not (isinstance(module, model_lib.RMSNorm) and
            module.axis_name == "embed" and context.method_name == "__call__"):
      return out
    x32 = args[0].astype(jnp.float32)
    sq = jnp.sum(x32 * x32, -1, keepdims=True)
    ratio = jnp.sqrt((sq / x32.shape[-1] + eps) / (sq / kept + eps))
    return (out.astype(jnp.float32) * ratio).astype(out.dtype)
  return intercept


def masked_apply(model: model_lib.Transformer, params, masks: dict, batch,
                 rng=None, train: bool = False):
  """Logits [B, L, V] of the model with `masks` applied (jittable,
  differentiable in params and masks)."""
  cfg = model.cfg
  folded = fold(params, masks, cfg)
  rngs = {"dropout": rng} if (train and cfg.dropout > 0) else None
  with nn.intercept_methods(_norm_interceptor(masks["hidden"], cfg.norm_eps)):
    return model.apply({"params": folded}, batch["tokens"],
                       batch["segment_ids"], batch["positions"],
                       deterministic=not train, rngs=rngs)


def mean_nll(logits_BxLxV, batch):
  """Mean next-token NLL over real targets (the eval objective)."""
  mask = target_mask(batch).astype(jnp.float32)
  nll, _ = token_nll(logits_BxLxV, batch["tokens"])
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

