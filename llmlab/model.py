"""The llmlab decoder-only transformer (Flax linen, functional params).

One file owns the architecture: token embedding, RoPE, pre-norm RMSNorm,
grouped-query causal self-attention (optional QK-norm), SwiGLU MLP, optional
tied embeddings, `nn.scan` over layers with a remat policy.

Every parameter is created with logical axis names (batch, length, embed,
heads, kv_heads, head_dim, mlp, vocab, layers) and the main activations are
constrained with the same names. Which mesh axis a logical name lands on is
decided only by the rules table in the config (see `llmlab/sharding.py`);
nothing here names a mesh axis.

Shape suffixes: B batch, L length (queries), S length (keys), D d_model,
H query heads, K kv heads, G = H / K query heads per kv head, E head_dim,
F mlp_dim, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture hyper-parameters (hashable, so it can key jit)."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int = 0  # 0 = d_model // num_heads
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False
  qk_norm: bool = False
  attn_bias: bool = False  # q/k/v projection biases (Qwen2-style)
  dropout: float = 0.0
  norm_eps: float = 1e-6
  remat: str = "none"  # none | full | dots
  scan_unroll: int = 0  # 0 = auto: all layers unrolled on CPU, 1 elsewhere
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in model_cfg.items() if k in fields}
    kw["vocab_size"] = vocab_size
    return cls(**kw)


def _unroll(cfg: ModelConfig) -> int:
  """Layers per scan iteration. XLA:CPU runs a rolled scan 2-3x slower than
  the same layers unrolled (measured on the study's small models: the loop
  body cannot fuse with its neighbours and stacked buffers are copied per
  iteration), while TPU/GPU compile a rolled loop to the same speed in a
  fraction of the compile time. Params are stacked either way."""
  if cfg.scan_unroll:
    return cfg.scan_unroll
  return cfg.num_layers if jax.default_backend() == "cpu" else 1


def _dtype(name: str):
  return jnp.dtype(name)


def _param(module: nn.Module, name: str, names: tuple, shape: tuple,
           std: float, cfg: ModelConfig, init: Any = None):
  """A parameter carrying logical axis names."""
  init = init or nn.initializers.normal(stddev=std)
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      _dtype(cfg.param_dtype))


def constrain(x: Array, names: tuple) -> Array:
  """Sharding constraint by logical names (no-op without rules/mesh)."""
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """Root-mean-square norm; statistics in float32 whatever the compute dtype."""

  cfg: ModelConfig
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", (self.axis_name,), (x.shape[-1],), 0.0,
                   self.cfg, init=nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) +
                              self.cfg.norm_eps)
    return (x32 * scale.astype(jnp.float32)).astype(_dtype(self.cfg.dtype))


def rope(x_BxLxNxE: Array, positions_BxL: Array, theta: float) -> Array:
  """Rotary embeddings, rotate-half convention (as in Llama-family exports).

  Positions come from the data (they restart at every packed document), so a
  document sees the same encoding wherever it was packed.
  """
  e = x_BxLxNxE.shape[-1]
  freq_E2 = theta ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  ang_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * freq_E2
  sin, cos = jnp.sin(ang_BxLxE2)[:, :, None], jnp.cos(ang_BxLxE2)[:, :, None]
  x1, x2 = jnp.split(x_BxLxNxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxE.dtype)


class Attention(nn.Module):
  """Grouped-query causal self-attention with segment isolation.

  A query attends to key s iff s <= its position in the row and both belong to
  the same packed document (segment id). In decode mode a KV cache holds the
  keys/values of earlier steps (see `llmlab/sample.py`).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, decode: bool):
    cfg = self.cfg
    d, h, k, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    dt = _dtype(cfg.dtype)
    std = d ** -0.5
    wq = _param(self, "wq", ("embed", "heads", "head_dim"), (d, h, e), std, cfg)
    wk = _param(self, "wk", ("embed", "kv_heads", "head_dim"), (d, k, e), std, cfg)
    wv = _param(self, "wv", ("embed", "kv_heads", "head_dim"), (d, k, e), std, cfg)
    wo = _param(self, "wo", ("heads", "head_dim", "embed"), (h, e, d),
                (h * e) ** -0.5 / (2 * cfg.num_layers) ** 0.5, cfg)
    q_BxLxHxE = jnp.einsum("bld,dhe->blhe", x_BxLxD, wq.astype(dt))
    k_BxLxKxE = jnp.einsum("bld,dke->blke", x_BxLxD, wk.astype(dt))
    v_BxLxKxE = jnp.einsum("bld,dke->blke", x_BxLxD, wv.astype(dt))
    if cfg.attn_bias:
      zeros = nn.initializers.zeros
      bq = _param(self, "bq", ("heads", "head_dim"), (h, e), 0.0, cfg, zeros)
      bk = _param(self, "bk", ("kv_heads", "head_dim"), (k, e), 0.0, cfg, zeros)
      bv = _param(self, "bv", ("kv_heads", "head_dim"), (k, e), 0.0, cfg, zeros)
      q_BxLxHxE = q_BxLxHxE + bq.astype(dt)
      k_BxLxKxE = k_BxLxKxE + bk.astype(dt)
      v_BxLxKxE = v_BxLxKxE + bv.astype(dt)
    q_BxLxHxE = constrain(q_BxLxHxE, ("batch", "length", "heads", "head_dim"))
    if cfg.qk_norm:
      q_BxLxHxE = RMSNorm(cfg, "head_dim", name="q_norm")(q_BxLxHxE)
      k_BxLxKxE = RMSNorm(cfg, "head_dim", name="k_norm")(k_BxLxKxE)
    q_BxLxHxE = rope(q_BxLxHxE, positions_BxL, cfg.rope_theta)
    k_BxLxKxE = rope(k_BxLxKxE, positions_BxL, cfg.rope_theta)

    b, l = x_BxLxD.shape[:2]
    if decode:
      k_BxSxKxE, v_BxSxKxE, seg_BxS, mask_BxLxS = self._cache(
          k_BxLxKxE, v_BxLxKxE, segment_ids_BxL)
    else:
      k_BxSxKxE, v_BxSxKxE = k_BxLxKxE, v_BxLxKxE
      causal_LxS = jnp.tril(jnp.ones((l, l), dtype=bool))
      same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
      mask_BxLxS = causal_LxS[None] & same_BxLxS

    g = h // k
    q_BxLxKxGxE = q_BxLxHxE.reshape(b, l, k, g, e) * jnp.asarray(e ** -0.5, dt)
    s_BxKxGxLxS = jnp.einsum("blkge,bske->bkgls", q_BxLxKxGxE, k_BxSxKxE,
                             preferred_element_type=jnp.float32)
    s_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], s_BxKxGxLxS,
                            jnp.finfo(jnp.float32).min)
    p_BxKxGxLxS = jax.nn.softmax(s_BxKxGxLxS, axis=-1).astype(dt)
    o_BxLxKxGxE = jnp.einsum("bkgls,bske->blkge", p_BxKxGxLxS, v_BxSxKxE)
    o_BxLxHxE = o_BxLxKxGxE.reshape(b, l, h, e)
    return jnp.einsum("blhe,hed->bld", o_BxLxHxE, wo.astype(dt))

  def _cache(self, k_BxLxKxE, v_BxLxKxE, segment_ids_BxL):
    """Append this call's keys/values to the cache; mask by cache slot.

    The cache is sized at `init` time (its length is the max total length).
    Slot j is visible to query i of this call iff j <= index + i and the slot
    was written (segment id != 0 marks written, non-padding slots).
    """
    is_init = not self.has_variable("cache", "k")
    b, l, kh, e = k_BxLxKxE.shape
    ck = self.variable("cache", "k", jnp.zeros, (b, l, kh, e), k_BxLxKxE.dtype)
    cv = self.variable("cache", "v", jnp.zeros, (b, l, kh, e), v_BxLxKxE.dtype)
    cs = self.variable("cache", "seg", jnp.zeros, (b, l), jnp.int32)
    idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if is_init:  # shape-only pass that allocates the cache
      if not self.is_initializing():
        raise ValueError(
            "Transformer(decode=True) was applied without a 'cache' "
            "collection: create it with model.init(..., decode=True) at the "
            "maximum total length and pass it with mutable=['cache'] "
            "(see llmlab/sample.py)")
      return k_BxLxKxE, v_BxLxKxE, segment_ids_BxL, jnp.ones((b, l, l), bool)
    i = idx.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxLxKxE, (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxLxKxE, (0, i, 0, 0))
    cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids_BxL, (0, i))
    idx.value = i + l
    s = ck.value.shape[1]
    q_pos_L = i + jnp.arange(l)
    visible_LxS = jnp.arange(s)[None, :] <= q_pos_L[:, None]
    same_BxLxS = segment_ids_BxL[:, :, None] == cs.value[:, None, :]
    mask_BxLxS = visible_LxS[None] & same_BxLxS & (cs.value[:, None, :] != 0)
    return ck.value, cv.value, cs.value, mask_BxLxS


class Mlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    dt = _dtype(cfg.dtype)
    w_gate = _param(self, "w_gate", ("embed", "mlp"), (d, f), d ** -0.5, cfg)
    w_up = _param(self, "w_up", ("embed", "mlp"), (d, f), d ** -0.5, cfg)
    w_down = _param(self, "w_down", ("mlp", "embed"), (f, d),
                    f ** -0.5 / (2 * cfg.num_layers) ** 0.5, cfg)
    gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_gate.astype(dt))
    up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, w_up.astype(dt))
    h_BxLxF = constrain(nn.silu(gate_BxLxF) * up_BxLxF,
                        ("batch", "length", "mlp"))
    return jnp.einsum("blf,fd->bld", h_BxLxF, w_down.astype(dt))


class Block(nn.Module):
  """Pre-norm residual block; scanned, so it returns (carry, None)."""

  cfg: ModelConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    h = Attention(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x_BxLxD),
                                    segment_ids_BxL, positions_BxL, self.decode)
    x_BxLxD = x_BxLxD + drop(h)
    h = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BxLxD))
    x_BxLxD = constrain(x_BxLxD + drop(h), ("batch", "length", "embed"))
    return x_BxLxD, None


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """Decoder-only LM: tokens [B, L] -> logits [B, L, V] (float32)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None,
               deterministic: bool = True, decode: bool = False):
    cfg = self.cfg
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]),
                                       tokens_BxL.shape)
    dt = _dtype(cfg.dtype)
    emb_VxD = _param(self, "embedding", ("vocab", "embed"),
                     (cfg.vocab_size, cfg.d_model), cfg.init_std, cfg)
    x_BxLxD = jnp.take(emb_VxD, tokens_BxL, axis=0).astype(dt)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT[cfg.remat], prevent_cse=False,
                       static_argnums=())
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=_unroll(cfg),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x_BxLxD, _ = stack(cfg, decode, deterministic, name="layers")(
        x_BxLxD, segment_ids_BxL, positions_BxL)
    x_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)
    if cfg.tie_embeddings:
      w_DxV = emb_VxD.T
    else:
      w_DxV = _param(self, "unembed", ("embed", "vocab"),
                     (cfg.d_model, cfg.vocab_size), cfg.d_model ** -0.5, cfg)
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV.astype(dt),
                              preferred_element_type=jnp.float32)
    return constrain(logits_BxLxV, ("batch", "length", "vocab"))


# ----------------------------------------------------------------------------
# Sizes and FLOPs: the N and C of scaling laws.
# ----------------------------------------------------------------------------


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Exact parameter counts by hand (tests check them against `init`).

  - `embedding`: the input table V*D plus, if untied, the output matrix D*V.
  - `non_embedding` (the N of Kaplan et al. 2020 / Chinchilla-style laws):
    per layer attention D*E*(H + 2K) + H*E*D, SwiGLU 3*D*F, two norms 2*D
    (+ 2*E with QK-norm, + E*(H + 2K) with attention bias); plus the final
    norm D.
  - `total` = embedding + non_embedding (Chinchilla's convention for N).
  """
  d, h, k, e, f = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_size, cfg.mlp_dim)
  per_layer = d * e * (h + 2 * k) + h * e * d + 3 * d * f + 2 * d
  per_layer += 2 * e if cfg.qk_norm else 0
  per_layer += e * (h + 2 * k) if cfg.attn_bias else 0
  non_emb = cfg.num_layers * per_layer + d
  emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return {"total": non_emb + emb, "non_embedding": non_emb, "embedding": emb}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
  """Training FLOPs per token (forward + backward = 3x forward).

  forward = 2*N (every non-embedding weight is one multiply-add)
          + 2*D*V (the output projection; tied or not, it is a matmul)
          + 2*num_layers*seq_len*H*E (QK^T and AV: 2 matmuls of 2*S*H*E per
            query, halved because causal attention sees on average half the
            keys).
  train = 3 * forward = 6N + 6DV + 6*num_layers*seq_len*H*E.
  """
  n = param_counts(cfg)["non_embedding"]
  attn = 2.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size
  fwd = 2.0 * n + 2.0 * cfg.d_model * cfg.vocab_size + attn
  return {"train": 3.0 * fwd, "forward": fwd, "six_n": 6.0 * n}
