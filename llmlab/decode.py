"""Sampling with a KV cache: one prefill pass over the prompts, then one token
per step, all under `jax.jit`.

    sampler = make_sampler(model, max_new_tokens=64, temperature=0.8,
                           top_k=40, eos_id=tok.eos_id, pad_id=tok.pad_id)
    out = sampler(params, left_pad(prompts, tok.pad_id), jax.random.key(0))
    out["tokens"]   # [B, N] new tokens, pad_id after a row's EOS
    out["lengths"]  # [B] new tokens up to and including EOS

(`llmlab sample`, llmlab/commands/sample.py, is the command around it.)

Prompts are left-padded to a common length (padding has segment id 0, so no
token attends to it) and each row's positions start at 0 at its first real
token; a row's continuation extends the segment of its last prompt token.
The cache (`Attention._cache` in `llmlab/model.py`) holds prompt + new
tokens, so the cost of a step does not grow with a recomputed prefix.
`generate` is a pure function (no jit of its own) so that on-policy
distillation can run it inside the train step. Step t draws with
`fold_in(rng, t)`, so the same rng gives the same tokens however the logits
were computed (the tests compare against a full forward pass per step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmlab import model as model_lib


def init_cache(model: model_lib.Transformer, batch_size: int, max_len: int):
  """A zero KV cache for `batch_size` rows of up to `max_len` tokens."""
  def shapes():
    tokens = jnp.zeros((batch_size, max_len), jnp.int32)
    return model.init(jax.random.key(0), tokens, decode=True)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      jax.eval_shape(shapes))


def filter_logits(logits_BxV, top_k: int = 0, top_p: float = 1.0):
  """-inf outside the top-k tokens and outside the top-p nucleus.

  The nucleus is the smallest set of most likely tokens whose probability
  reaches top_p (computed after top-k, on the renormalised distribution).
  """
  neg = jnp.asarray(-jnp.inf, logits_BxV.dtype)
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][..., -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # mass of better tokens
    kept_BxV = jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf)
    cut_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cut_Bx1, neg, logits_BxV)
  return logits_BxV


def sample_logits(rng, logits_BxV, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0):
  """Next tokens [B]; temperature 0 is greedy."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV.astype(jnp.float32) / temperature,
                             top_k, top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def left_pad(prompts, pad_id: int) -> dict:
  """Token lists -> {tokens, segment_ids, positions} int32 [B, P]."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("left_pad: every prompt needs at least one token (e.g. "
                     "BOS)")
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  seg = np.zeros_like(tokens)
  pos = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
    seg[i, width - len(p):] = 1
    pos[i, width - len(p):] = np.arange(len(p))
  return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def generate(model, params, prompt: dict, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0) -> dict:
  """Continuations of a batch of prompts (jittable; settings are static).

  `prompt` holds int [B, P] `tokens`, `segment_ids`, `positions` whose last
  column is a real token. Stops early when every row has produced EOS.
  Returns {tokens [B, N], lengths [B], done [B]}.
  """
  tokens_BxP = jnp.asarray(prompt["tokens"], jnp.int32)
  seg_BxP = jnp.asarray(prompt["segment_ids"], jnp.int32)
  pos_BxP = jnp.asarray(prompt["positions"], jnp.int32)
  b, p = tokens_BxP.shape
  n = int(max_new_tokens)
  eos = -1 if eos_id is None else int(eos_id)
  draw = functools.partial(sample_logits, temperature=temperature,
                           top_k=top_k, top_p=top_p)

  def apply(cache, tok, seg, pos):
    logits, new = model.apply({"params": params, "cache": cache}, tok, seg,
                              pos, decode=True, mutable=["cache"])
    return logits[:, -1], new["cache"]

  last_BxV, cache = apply(init_cache(model, b, p + n), tokens_BxP, seg_BxP,
                          pos_BxP)
  seg_B, pos_B = seg_BxP[:, -1], pos_BxP[:, -1]
  first_B = draw(jax.random.fold_in(rng, 0), last_BxV)
  out_BxN = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first_B)

  def cond(carry):
    t, _, _, done_B, _ = carry
    return (t < n) & ~jnp.all(done_B)

  def body(carry):
    t, cache, prev_B, done_B, out_BxN = carry
    logits_BxV, cache = apply(cache, prev_B[:, None], seg_B[:, None],
                              (pos_B + t)[:, None])
    nxt_B = draw(jax.random.fold_in(rng, t), logits_BxV)
    nxt_B = jnp.where(done_B, pad_id, nxt_B)
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, nxt_B[:, None], (0, t))
    return t + 1, cache, nxt_B, done_B | (nxt_B == eos), out_BxN

  carry = (jnp.asarray(1, jnp.int32), cache, first_B, first_B == eos, out_BxN)
  _, _, _, done_B, out_BxN = jax.lax.while_loop(cond, body, carry)
  is_eos_BxN = out_BxN == eos
  lengths_B = jnp.where(jnp.any(is_eos_BxN, axis=1),
                        jnp.argmax(is_eos_BxN, axis=1) + 1, n)
  return {"tokens": out_BxN, "lengths": lengths_B.astype(jnp.int32),
          "done": done_B}


def make_sampler(model, **settings):
  """jit(generate) for one model and fixed settings: (params, prompt, rng)."""
  return jax.jit(functools.partial(generate, model, **settings))
