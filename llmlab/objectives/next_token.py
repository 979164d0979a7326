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


def chunked_token_nll(h_BxLxD, project, tokens_BxL, chunk: int):
  """`token_nll` and the mean logit per position, from the final hidden
  states, `chunk` positions at a time: the [B, L, V] logits never exist.

  A `lax.map` over sequence chunks projects one chunk ([B, chunk, V]
  float32) and reduces it to three numbers per position; the chunk body is
  rematerialised, so the backward pass recomputes each chunk's logits
  instead of keeping all of them (one extra output projection: ~2*D*V
  FLOPs per token). `chunk` must divide L.
  """
  b, l, d = h_BxLxD.shape
  n = l // chunk
  # Position t predicts tokens[t+1]; the last position's target is a dummy.
  tgt_BxL = jnp.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, -1:]], axis=1)
  h_NxBxCxD = h_BxLxD.reshape(b, n, chunk, d).swapaxes(0, 1)
  tgt_NxBxC = tgt_BxL.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(args):
    h_BxCxD, t_BxC = args
    logits_BxCxV = project(h_BxCxD)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    tgt_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], -1)[..., 0]
    return lse_BxC - tgt_BxC, lse_BxC, jnp.mean(logits_BxCxV, axis=-1)

  outs = jax.lax.map(one, (h_NxBxCxD, tgt_NxBxC))
  nll, lse, mean = (o.swapaxes(0, 1).reshape(b, l)[:, :-1] for o in outs)
  return nll, lse, mean


def _nll_terms(ctx: Context, params, batch, rng, with_mean: bool):
  """(nll, lse, mean logit or None) per position [B, L-1], from the full
  logits or chunk by chunk (`ctx.logits_chunk`)."""
  if ctx.logits_chunk:
    h, project = ctx.hidden(params, batch, rng, True)
    return chunked_token_nll(h, project, batch["tokens"], ctx.logits_chunk)
  logits = ctx.apply(params, batch, rng, True)
  nll, lse = token_nll(logits, batch["tokens"])
  mean = (jnp.mean(logits[:, :-1].astype(jnp.float32), axis=-1)
          if with_mean else None)
  return nll, lse, mean


@register("next_token", chunked_logits=True)
def next_token(ctx: Context, params, batch, rng):
  mask = target_mask(batch).astype(jnp.float32)
  smooth = ctx.cfg.get("label_smoothing", 0.0)
  nll, lse, mean_logit = _nll_terms(ctx, params, batch, rng, bool(smooth))
  loss = nll
  if smooth:  # cross-entropy to (1-s)*one_hot + s*uniform
    loss = (1 - smooth) * nll + smooth * (lse - mean_logit)
  loss_sum = jnp.sum(loss * mask)
  z = ctx.cfg.get("z_loss", 0.0)
  if z:
    loss_sum = loss_sum + z * jnp.sum(jnp.square(lse) * mask)
  return loss_sum, {"weight": jnp.sum(mask), "nll_sum": jnp.sum(nll * mask)}
