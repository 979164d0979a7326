"""KV-cache sampling: same tokens as a full forward pass per step, filters,
EOS stop. (`llmlab sample` runs on a trained run in test_objectives.py,
which already trains one.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import model as model_lib
from llmlab import decode as sample

VOCAB = 40


@pytest.fixture(scope="module")
def model_and_params():
  cfg = model_lib.ModelConfig(vocab_size=VOCAB, num_layers=2, d_model=32,
                              num_heads=4, num_kv_heads=2, mlp_dim=64)
  model = model_lib.Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 8), jnp.int32))["params"]
  # Larger weights than the init make the distributions peaked and varied.
  params = jax.tree.map(lambda x: x * 3.0, params)
  return model, params


def _prompts():
  """Three left-padded prompts, and row 1 again padded with other ids (the
  padding must be invisible)."""
  p = sample.left_pad([[1, 5, 7, 2, 9], [3, 4], [8, 8, 8], [3, 4]], pad_id=0)
  p["tokens"][3, :3] = [11, 12, 13]
  return p


def _uncached(model, params, prompt, rng, n, **settings):
  """The oracle: a full forward pass (no cache) for every new token.

  The sequence lives in a fixed [B, P + N] buffer (one compile); causality
  makes the not-yet-sampled slots irrelevant to the logits read at step t.
  """
  b, p = prompt["tokens"].shape
  seg = np.asarray(prompt["segment_ids"])
  pos = np.asarray(prompt["positions"])
  seg = np.concatenate([seg, np.repeat(seg[:, -1:], n, 1)], axis=1)
  pos = np.concatenate([pos, pos[:, -1:] + 1 + np.arange(n)], axis=1)
  tokens = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompt["tokens"])
  fwd = jax.jit(lambda t: model.apply({"params": params}, t, seg, pos))
  for t in range(n):
    logits = fwd(tokens)[:, p - 1 + t]
    nxt = sample.sample_logits(jax.random.fold_in(rng, t), logits, **settings)
    tokens = tokens.at[:, p + t].set(nxt)
  return np.asarray(tokens[:, p:])


@pytest.fixture(scope="module")
def greedy(model_and_params):
  model, params = model_and_params
  sampler = sample.make_sampler(model, max_new_tokens=12, temperature=0.0)
  return np.asarray(sampler(params, _prompts(), jax.random.key(3))["tokens"])


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=6, top_p=0.95),
])
def test_cached_equals_full_recompute(model_and_params, greedy, settings):
  model, params = model_and_params
  rng = jax.random.key(3)
  if settings["temperature"]:
    sampler = sample.make_sampler(model, max_new_tokens=12, **settings)
    got = np.asarray(sampler(params, _prompts(), rng)["tokens"])
    assert len(np.unique(got)) > 3  # really sampling, not a constant
  else:
    got = greedy
    np.testing.assert_array_equal(got[1], got[3])  # padding is invisible
  want = _uncached(model, params, _prompts(), rng, 12, **settings)
  np.testing.assert_array_equal(got, want)


def test_eos_stops_rows_and_pads(model_and_params, greedy):
  model, params = model_and_params
  eos = int(greedy[0, 2])
  out = sample.make_sampler(model, max_new_tokens=12, temperature=0.0,
                            eos_id=eos, pad_id=39)(params, _prompts(),
                                                   jax.random.key(3))
  toks, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  for row, free_row, n in zip(toks, greedy, lengths):
    hits = np.flatnonzero(free_row == eos)
    assert n == (hits[0] + 1 if len(hits) else 12)
    np.testing.assert_array_equal(row[:n], free_row[:n])
    assert np.all(row[n:] == 39)
  assert lengths[0] <= 3


def test_filters_by_hand():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: np.flatnonzero(np.isfinite(np.asarray(x[0]))).tolist()
  assert kept(sample.filter_logits(logits, top_k=2)) == [0, 1]
  assert kept(sample.filter_logits(logits, top_p=0.5)) == [0]
  assert kept(sample.filter_logits(logits, top_p=0.7)) == [0, 1]
  assert kept(sample.filter_logits(logits, top_p=0.71)) == [0, 1, 2]
  assert kept(sample.filter_logits(logits, top_k=2, top_p=0.99)) == [0, 1]
  draws = jax.vmap(lambda k: sample.sample_logits(
      k, jnp.repeat(logits, 1, 0), top_k=3))(
          jax.random.split(jax.random.key(0), 2000))
  freq = np.bincount(np.asarray(draws).ravel(), minlength=5) / 2000
  np.testing.assert_allclose(freq[:3], np.array([0.5, 0.2, 0.15]) / 0.85,
                             atol=0.04)
  assert freq[3:].sum() == 0


def test_decode_without_cache_is_an_error(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match="without a 'cache' collection"):
    model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32),
                decode=True, mutable=["cache"])
