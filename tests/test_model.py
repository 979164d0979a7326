"""Model: shapes, causality, segment isolation, counts, FLOPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import model as model_lib

CFG = model_lib.ModelConfig(vocab_size=61, num_layers=2, d_model=32,
                            num_heads=4, num_kv_heads=2, mlp_dim=64)


def _init(cfg, length=12):
  m = model_lib.Transformer(cfg)
  tokens = jnp.zeros((2, length), jnp.int32)
  params = jax.jit(lambda r: nn.unbox(m.init(r, tokens)["params"]))(
      jax.random.key(0))
  return m, params


def _logits(m, params, tokens, seg=None, pos=None):
  fn = jax.jit(lambda p, t, s, q: m.apply({"params": p}, t, s, q))
  return fn(params, jnp.asarray(tokens), seg, pos)


def test_shapes_and_logical_names():
  m = model_lib.Transformer(CFG)
  boxed = jax.eval_shape(m.init, jax.random.key(0),
                         jnp.zeros((2, 8), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["layers"]["attn"]["wq"]) == ("layers", "embed", "heads", "head_dim")
  assert tuple(specs["layers"]["attn"]["wk"]) == ("layers", "embed", "kv_heads", "head_dim")
  assert tuple(specs["layers"]["mlp"]["w_up"]) == ("layers", "embed", "mlp")
  assert tuple(specs["embedding"]) == ("vocab", "embed")
  _, params = _init(CFG, 8)
  out = _logits(m, params, np.zeros((2, 8), np.int32))
  assert out.shape == (2, 8, 61) and out.dtype == jnp.float32


@pytest.mark.parametrize("qk_norm,tie", [(False, False), (True, True)])
def test_param_counts_match_init(qk_norm, tie):
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "qk_norm": qk_norm,
                                 "tie_embeddings": tie})
  _, params = _init(cfg)
  n = sum(x.size for x in jax.tree.leaves(params))
  counts = model_lib.param_counts(cfg)
  assert counts["total"] == n
  emb = params["embedding"].size + (0 if tie else params["unembed"].size)
  assert counts["embedding"] == emb
  assert counts["non_embedding"] == n - emb


def test_counts_and_flops_by_hand():
  # d=32, H=4, K=2, E=8, F=64, 2 layers, V=61, untied.
  per_layer = 32 * 8 * 4 + 2 * 32 * 8 * 2 + 4 * 8 * 32 + 3 * 32 * 64 + 2 * 32
  n = 2 * per_layer + 32
  assert model_lib.param_counts(CFG)["non_embedding"] == n
  f = model_lib.flops_per_token(CFG, seq_len=100)
  attn_fwd = 2 * 2 * 100 * 4 * 8  # layers * seq * heads * head_dim, causal half
  assert f["forward"] == pytest.approx(2 * n + 2 * 32 * 61 + attn_fwd)
  assert f["train"] == pytest.approx(3 * f["forward"])
  assert f["six_n"] == 6 * n


def test_causality():
  m, params = _init(CFG)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 61, (2, 12))
  b = a.copy()
  b[:, 7:] = rng.integers(0, 61, (2, 5))
  la, lb = _logits(m, params, a), _logits(m, params, b)
  np.testing.assert_allclose(la[:, :7], lb[:, :7], atol=1e-6)
  assert not np.allclose(la[:, 7:], lb[:, 7:])


def test_segment_isolation_and_position_restart():
  """A packed second document sees exactly what it sees alone."""
  m, params = _init(CFG)
  rng = np.random.default_rng(1)
  doc1, doc2 = rng.integers(0, 61, 5), rng.integers(0, 61, 7)
  packed = np.concatenate([doc1, doc2])[None]
  seg = np.array([[1] * 5 + [2] * 7])
  pos = np.array([list(range(5)) + list(range(7))])
  lp = _logits(m, params, packed, jnp.asarray(seg), jnp.asarray(pos))
  alone = _logits(m, params, doc2[None])
  np.testing.assert_allclose(lp[0, 5:], alone[0], atol=1e-5)
  # Changing the first document never changes the second's logits.
  other = packed.copy()
  other[0, :5] = (other[0, :5] + 1) % 61
  lo = _logits(m, params, other, jnp.asarray(seg), jnp.asarray(pos))
  np.testing.assert_allclose(lo[0, 5:], lp[0, 5:], atol=1e-6)


def test_remat_and_unroll_do_not_change_outputs():
  m, params = _init(CFG)
  tokens = np.random.default_rng(2).integers(0, 61, (2, 12))
  ref = _logits(m, params, tokens)
  for kw in ({"remat": "full"}, {"remat": "dots"}, {"scan_unroll": 2}):
    cfg = model_lib.ModelConfig(**{**CFG.__dict__, **kw})
    out = jax.jit(model_lib.Transformer(cfg).apply)({"params": params},
                                                    jnp.asarray(tokens))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_dropout_only_in_training():
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "dropout": 0.5})
  m, params = _init(cfg)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 12)))
  fwd = jax.jit(lambda p, t: m.apply({"params": p}, t, deterministic=True))
  a, b = fwd(params, tokens), fwd(params, tokens)
  np.testing.assert_array_equal(a, b)
  c = jax.jit(lambda p, t: m.apply({"params": p}, t, deterministic=False,
                                   rngs={"dropout": jax.random.key(1)}))(
                                       params, tokens)
  assert not np.allclose(a, c)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def test_hand_written_vjps_equal_autodiff():
  """The VJPs of `dense`'s product and of attention equal autodiff of the
  plain float32 computation."""
  ks = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(ks[0], (2, 5, 8))
  w = jax.random.normal(ks[1], (8, 3, 4))
  f32 = jnp.float32
  prod = lambda x, w: model_lib._product("bld,dhe->bhle", x, w, f32, f32, f32)
  ref = lambda x, w: jnp.einsum("bld,dhe->bhle", x, w)
  g = jax.random.normal(ks[2], (2, 3, 5, 4))
  grads = jax.jit(lambda f, *a: jax.vjp(f, *a[:-1])[1](a[-1]), static_argnums=0)
  for a, b in zip(grads(prod, x, w, g), grads(ref, x, w, g)):
    assert _rel(a, b) < 1e-5
  q = jax.random.normal(ks[3], (2, 2, 3, 7, 4))  # B K G L E (GQA)
  k, v = jax.random.normal(ks[4], (2, 2, 7, 4)), jax.random.normal(ks[5], (2, 2, 7, 4))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1] * 7])
  mask = jnp.tril(jnp.ones((7, 7), bool))[None] & (seg[:, :, None] == seg[:, None])
  bias = jnp.where(mask, 0.0, jnp.finfo(f32).min)

  def hi(q, k, v):
    s = jnp.einsum("bkgle,bkse->bkgls", q, k) + bias[:, None, None]
    return jnp.einsum("bkgls,bkse->bkgle", jax.nn.softmax(s, -1), v)

  lo = lambda q, k, v: model_lib._attention(q, k, v, bias, f32, f32)
  out_lo, out_hi = jax.jit(lo)(q, k, v), jax.jit(hi)(q, k, v)
  assert _rel(out_lo, out_hi) < 1e-5
  do = jax.random.normal(ks[0], out_hi.shape)
  for a, b in zip(grads(lo, q, k, v, do), grads(hi, q, k, v, do)):
    assert _rel(a, b) < 1e-5


def test_bf16_matmuls_track_float32():
  """`matmul_dtype=bfloat16`: float32 params and gradients, values within
  bf16 rounding of the float32 model, same causality; remat=dots saves the
  custom-VJP products by name."""
  cfg = model_lib.ModelConfig(**{**CFG.__dict__, "matmul_dtype": "bfloat16",
                                 "remat": "dots"})
  m32, params = _init(CFG)
  m16 = model_lib.Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 12)))
  loss = lambda m: lambda p: jnp.mean(
      jax.nn.log_softmax(m.apply({"params": p}, tokens)) ** 2)
  l32, g32 = jax.jit(jax.value_and_grad(loss(m32)))(params)
  l16, g16 = jax.jit(jax.value_and_grad(loss(m16)))(params)
  assert abs(float(l16 - l32)) < 2e-2 * abs(float(l32))
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    assert a.dtype == jnp.float32 and _rel(a, b) < 0.1
  t2 = tokens.at[:, 8:].set(0)
  a, b = _logits(m16, params, tokens), _logits(m16, params, t2)
  np.testing.assert_array_equal(np.asarray(a[:, :8]), np.asarray(b[:, :8]))
