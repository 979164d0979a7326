"""Next-token cross-entropy, the plain language-modelling objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmlab.objectives.registry import Context, register


def target_mask(batch) -> jax.Array:
  """[B, L-1] True where tokens[t+1] is a real target of position t.

  Padding (segment 0) and positions whose next token starts another packed
  document are masked: predicting across a document boundary is noise.
  """
  seg = batch["segment_ids"]
  return (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)


def token_nll(logits_BxLxV, tokens_BxL):
  """Per-position NLL of the next token and the log-normaliser (for z-loss)."""
  logits = logits_BxLxV[:, :-1].astype(jnp.float32)
  targets = tokens_BxL[:, 1:]
  lse_BxL = jax.nn.logsumexp(logits, axis=-1)
  tgt_BxL = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse_BxL - tgt_BxL, lse_BxL


@register("next_token")
def next_token(ctx: Context, params, batch, rng):
  logits = ctx.apply(params, batch, rng, True)
  mask = target_mask(batch).astype(jnp.float32)
  nll, lse = token_nll(logits, batch["tokens"])
  loss = nll
  smooth = ctx.cfg.get("label_smoothing", 0.0)
  if smooth:  # cross-entropy to (1-s)*one_hot + s*uniform
    mean_logit = jnp.mean(logits[:, :-1].astype(jnp.float32), axis=-1)
    loss = (1 - smooth) * nll + smooth * (lse - mean_logit)
  loss_sum = jnp.sum(loss * mask)
  z = ctx.cfg.get("z_loss", 0.0)
  if z:
    loss_sum = loss_sum + z * jnp.sum(jnp.square(lse) * mask)
  return loss_sum, {"weight": jnp.sum(mask), "nll_sum": jnp.sum(nll * mask)}
