"""model.logits_chunk: the next-token loss a chunk of positions at a time
equals the full-logits loss (values and gradients, float32), through the
objective and through the real train and eval steps; the [B, L, V] logits
are never allocated; objectives that need full logits refuse it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import config as config_lib
from llmlab import objectives
from llmlab import sharding as shd
from llmlab import steps as steps_lib

VOCAB = 300


def _cfg(**overrides):
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                 mlp_dim=64)
  c.train.update(batch_size=2, seq_len=32)
  c.objective.update(label_smoothing=0.1, z_loss=1e-3)
  return config_lib.with_overrides(c, overrides)


def _setup(cfg, vocab=VOCAB):
  return steps_lib.build(cfg, vocab, shd.make_mesh(cfg.mesh,
                                                   jax.devices()[:1]))


def _batch(cfg, vocab=VOCAB, seed=0):
  b, l = cfg.train.batch_size, cfg.train.seq_len
  rng = np.random.default_rng(seed)
  seg = np.ones((b, l), np.int32)
  seg[0, l // 2:] = 2  # two packed documents in row 0
  seg[1, -3:] = 0  # padding at the end of row 1
  pos = np.concatenate([np.arange(l // 2), np.arange(l - l // 2)])
  return {"tokens": jnp.asarray(rng.integers(0, vocab, (b, l)), jnp.int32),
          "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(np.stack([pos, np.arange(l)]), jnp.int32),
          "bytes": jnp.ones((b, l), jnp.int32)}


def _close(a, b, tol=2e-6):
  """Equal to float32 rounding: summation order differs (chunks), so the
  error is relative to the array's scale, not to each element."""
  a, b = np.asarray(a), np.asarray(b)
  scale = max(float(np.abs(b).max()), 1e-30)
  assert float(np.abs(a - b).max()) <= tol * scale, (np.abs(a - b).max(),
                                                      scale)


def _loss_and_grads(cfg, setup, params, batch, chunk):
  ctx = objectives.Context(
      apply=steps_lib.apply_fn(setup.model), cfg=cfg.objective,
      hidden=steps_lib.apply_fn(setup.model, hidden=True), logits_chunk=chunk)
  fn = lambda p: objectives.get("next_token")(ctx, p, batch, None)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


def test_chunked_loss_and_gradients_equal_full_logits():
  cfg = _cfg()
  setup = _setup(cfg)
  params = steps_lib.init_state(setup, 0)["params"]
  batch = _batch(cfg)
  (loss, sums), grads = _loss_and_grads(cfg, setup, params, batch, 0)
  for chunk in (8, 32):
    (c_loss, c_sums), c_grads = _loss_and_grads(cfg, setup, params, batch,
                                                chunk)
    _close(c_loss, loss)
    for k in sums:
      _close(c_sums[k], sums[k])
    jax.tree.map(_close, c_grads, grads)


def test_train_and_eval_steps_equal_with_chunks():
  batch = _batch(_cfg())
  out = {}
  for chunk in (0, 8):
    cfg = config_lib.merge_defaults(_cfg(**{"model.logits_chunk": chunk}))
    setup = _setup(cfg)
    state = steps_lib.init_state(setup, 0)
    state, metrics = steps_lib.make_train_step(setup)(state, batch)
    evals = steps_lib.make_eval_step(setup)(state["params"], batch)
    out[chunk] = jax.device_get((state["params"], metrics, evals))
  jax.tree.map(lambda a, b: _close(a, b, 1e-5), out[8], out[0])


def test_chunked_loss_never_allocates_the_logits():
  """XLA's memory analysis of the gradient: the full-logits loss holds the
  B*L*V*4 bytes of the logits; the chunked one needs less than half of
  that in all (a chunk's logits are B*chunk*V*4 bytes)."""
  cfg = _cfg(**{"train.seq_len": 512, "objective.label_smoothing": 0.0})
  vocab = 16384
  setup = _setup(cfg, vocab)
  params = setup.abstract_state["params"]
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       _batch(cfg, vocab))
  logits_bytes = cfg.train.batch_size * 512 * vocab * 4
  temps = {}
  for chunk in (0, 64):
    ctx = objectives.Context(
        apply=steps_lib.apply_fn(setup.model), cfg=cfg.objective,
        hidden=steps_lib.apply_fn(setup.model, hidden=True),
        logits_chunk=chunk)
    fn = lambda p, b, ctx=ctx: objectives.get("next_token")(ctx, p, b,
                                                            None)[0]
    compiled = jax.jit(jax.grad(fn)).lower(params, batch).compile()
    temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
  assert temps[0] >= logits_bytes
  assert temps[64] < logits_bytes / 2, temps


def test_objectives_that_need_full_logits_refuse_chunks():
  cfg = config_lib.merge_defaults(_cfg(**{"model.logits_chunk": 8,
                                          "objective.name": "distill"}))
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.logits_chunk=8: objective 'distill'"):
    steps_lib.make_train_step(_setup(cfg))
  bad = config_lib.merge_defaults(_cfg(**{"model.logits_chunk": 5}))
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.logits_chunk=5.*divisor of train.seq_len"):
    config_lib.validate(bad)
