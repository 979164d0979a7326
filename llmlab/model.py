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
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llmlab import attention as attention_lib

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
  remat: str = "none"  # none | full | dots | offload_dots | minimal_offloaded
  scan_unroll: int = 0  # 0 = auto: all layers unrolled on CPU, 1 elsewhere
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_dtype: str = ""  # "" = dtype; "bfloat16" = bf16 operands, f32 sums
  init_std: float = 0.02
  attention: str = "auto"  # auto | xla | splash | cudnn (llmlab/attention.py)
  attention_block_q: int = 0  # splash tiles; 0 = default
  attention_block_kv: int = 0
  quant: str = "none"  # none | int8 | fp8: qwix quantised training (quant.py)

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def product_dtype(self) -> str:
    """Operand dtype of every product (`matmul_dtype`, default `dtype`)."""
    return self.matmul_dtype or self.dtype

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _product(eq, x, w, mm, x_dt, w_dt):
  """einsum(eq, x, w) with `mm` operands and float32 sums, and a hand-written
  VJP. Autodiff of the same einsum would run the backward products in the
  cotangent's dtype (float32) and round the weight gradient to `mm`; and on
  XLA:CPU the explicit backward einsums also get better layouts (the
  reference shape trains 20% faster in float32 than with autodiff)."""
  return jnp.einsum(eq, x.astype(mm), w.astype(mm),
                    preferred_element_type=jnp.float32)


def _product_fwd(eq, x, w, mm, x_dt, w_dt):
  x_lo, w_lo = x.astype(mm), w.astype(mm)
  y = jnp.einsum(eq, x_lo, w_lo, preferred_element_type=jnp.float32)
  return y, (x_lo, w_lo)


def _product_bwd(eq, mm, x_dt, w_dt, res, g):
  x_lo, w_lo = res
  ins, out = eq.split("->")
  xi, wi = ins.split(",")
  g = g.astype(mm)
  dx = jnp.einsum(f"{out},{wi}->{xi}", g, w_lo, preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{out},{xi}->{wi}", g, x_lo, preferred_element_type=jnp.float32)
  return dx.astype(x_dt), dw.astype(w_dt)


_product.defvjp(_product_fwd, _product_bwd)


def dense(eq: str, x: Array, w: Array, cfg: ModelConfig,
          out_dtype=None) -> Array:
  """Activation x weight product (einsum `eq`) -> `out_dtype` (cfg.dtype).

  Operands are in `cfg.matmul_dtype` (default: `cfg.dtype`), sums always in
  float32. `matmul_dtype="bfloat16"` with float32 params and activations is
  what a TPU does by default with float32 matmuls; on CPUs with bf16 matrix
  units (AMX, AVX512-BF16) it runs the products 3-5x faster than float32
  (XLA:CPU has no fast bf16 x bf16 -> bf16 kernel, hence float32 sums).
  Only the products' operands are rounded: params, activations, gradients
  and optimizer state keep their dtypes.
  """
  if cfg.quant != "none":
    # Quantised training (llmlab/quant.py): a plain einsum of the activation
    # and the parameter itself, which qwix's interception (installed by
    # `steps.build`) replaces with its quantised product and VJP; it finds
    # the weight operand by identity, so `w` is passed as the module's
    # param. Outside an intercepted model (decode, a teacher) this is the
    # float product. The activation joins the weight's dtype: qwix scales
    # both operands in one dtype, and they are rounded to int8/fp8 anyway.
    y = jnp.einsum(eq, x.astype(w.dtype), w,
                   preferred_element_type=jnp.float32)
  else:
    y = _product(eq, x, w, _dtype(cfg.product_dtype), x.dtype, w.dtype)
  return checkpoint_name(y.astype(out_dtype or _dtype(cfg.dtype)), "dense")


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


def rope_tables(positions_BxL: Array, head_size: int, theta: float):
  """(sin, cos) of the rotary angles, [B, L, E/2] each, float32.

  Computed once per forward pass and passed to every layer. Positions come
  from the data (they restart at every packed document), so a document sees
  the same encoding wherever it was packed.
  """
  freq_E2 = theta ** (-jnp.arange(0, head_size, 2, dtype=jnp.float32) /
                      head_size)
  ang_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * freq_E2
  tables = lambda: (jnp.sin(ang_BxLxE2), jnp.cos(ang_BxLxE2))
  if attention_lib.platform() != "cpu":  # the target's, also for `plan --target`
    return tables()
  return _materialized(tables, jnp.min(positions_BxL) >= 0)


def _materialized(fn, runtime_true: Array):
  """`fn()`, computed once into buffers of its own on XLA:CPU.

  XLA:CPU fuses a cheap elementwise producer into every consumer, so the
  rotary tables' sin/cos were recomputed in each q/k rotation of every layer,
  forward and backward, and once per head (24 fusions of the reference shape
  evaluating 6x the tables' elements each; A/B in one process: the bf16-
  product step 10% faster without them, float32 0-3%). A while
  loop's results are buffers no consumer fuses through; the trip count
  (`runtime_true`: 1 in practice) is data the compiler cannot fold, so the
  loop stays. The loop starts from `fn()` and its body computes `fn()`
  again, so the result is `fn()` whatever the trip count.
  """
  init = fn()
  return jax.lax.fori_loop(0, runtime_true.astype(jnp.int32),
                           lambda i, carry: fn(), init)


def rope(x_BxNxLxE: Array, sin_cos) -> Array:
  """Rotary embeddings, rotate-half convention (as in Llama-family exports)."""
  sin, cos = (t[:, None] for t in sin_cos)
  x1, x2 = jnp.split(x_BxNxLxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxNxLxE.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, mm, dt):
  """softmax(q k^T + bias) v with `mm` operands in all four products (see
  `dense`), scores and softmax in float32; q, k, v and their gradients in
  `dt`. With `dense`'s hand-written VJP, the reference shape trains 35%
  faster in float32 on XLA:CPU than with autodiff of the same code."""
  return _attention_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS,
                        mm, dt)[0]


def _attention_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS, mm, dt):
  q, k, v = (t.astype(mm) for t in (q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE))
  s_BxKxGxLxS = jnp.einsum("bkgle,bkse->bkgls", q, k,
                           preferred_element_type=jnp.float32)
  p_BxKxGxLxS = jax.nn.softmax(s_BxKxGxLxS + bias_BxLxS[:, None, None], -1)
  o_BxKxGxLxE = jnp.einsum("bkgls,bkse->bkgle", p_BxKxGxLxS.astype(mm), v,
                           preferred_element_type=jnp.float32)
  return o_BxKxGxLxE, (q, k, v, p_BxKxGxLxS, o_BxKxGxLxE)


def _attention_bwd(mm, dt, res, do_BxKxGxLxE):
  """Softmax backward as ds = p * (dp - rowsum(do * o)): the row sum runs
  over head_dim, not over the (longer) key axis."""
  q, k, v, p_BxKxGxLxS, o_BxKxGxLxE = res
  f32 = jnp.float32
  do = do_BxKxGxLxE.astype(mm)
  dp_BxKxGxLxS = jnp.einsum("bkgle,bkse->bkgls", do, v, preferred_element_type=f32)
  dv = jnp.einsum("bkgls,bkgle->bkse", p_BxKxGxLxS.astype(mm), do,
                  preferred_element_type=f32)
  row_BxKxGxL = jnp.sum(do_BxKxGxLxE.astype(f32) * o_BxKxGxLxE, -1)
  ds = (p_BxKxGxLxS * (dp_BxKxGxLxS - row_BxKxGxL[..., None])).astype(mm)
  dq = jnp.einsum("bkgls,bkse->bkgle", ds, k, preferred_element_type=f32)
  dk = jnp.einsum("bkgls,bkgle->bkse", ds, q, preferred_element_type=f32)
  return dq.astype(dt), dk.astype(dt), dv.astype(dt), None  # bias: no grad


_attention.defvjp(_attention_fwd, _attention_bwd)


def _gathered_attention(q_BxHxLxE, k_BxKxSxE, v_BxKxSxE, seg_BxL, seg_BxS,
                        order_L, order_S, *, mm, dt):
  """One device's share of context-parallel attention
  (`attention_lib.gathered`): its queries against the whole sequence's
  keys/values, masked by the slots' original positions (the sequence is
  load-balanced, so slot order is not position order) and segment ids."""
  b, h, l, e = q_BxHxLxE.shape
  kh = k_BxKxSxE.shape[1]
  causal_LxS = order_S[None, :] <= order_L[:, None]
  same_BxLxS = seg_BxL[:, :, None] == seg_BxS[:, None, :]
  bias_BxLxS = jnp.where(causal_LxS[None] & same_BxLxS, 0.0,
                         jnp.finfo(jnp.float32).min)
  o_BxKxGxLxE = _attention(q_BxHxLxE.reshape(b, kh, h // kh, l, e),
                           k_BxKxSxE, v_BxKxSxE, bias_BxLxS, mm, dt)
  return o_BxKxGxLxE.reshape(b, h, l, e)


class Attention(nn.Module):
  """Grouped-query causal self-attention with segment isolation.

  A query attends to key s iff s <= its position in the row and both belong to
  the same packed document (segment id). In decode mode a KV cache holds the
  keys/values of earlier steps (see `llmlab/decode.py`). `model.attention`
  picks the kernel of full-sequence passes (`llmlab/attention.py`: fused
  splash/cuDNN kernels on accelerators); decode steps always use `_attention`.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, sin_cos, decode: bool):
    cfg = self.cfg
    d, h, k, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    dt = _dtype(cfg.dtype)
    std = d ** -0.5
    wq = _param(self, "wq", ("embed", "heads", "head_dim"), (d, h, e), std, cfg)
    wk = _param(self, "wk", ("embed", "kv_heads", "head_dim"), (d, k, e), std, cfg)
    wv = _param(self, "wv", ("embed", "kv_heads", "head_dim"), (d, k, e), std, cfg)
    wo = _param(self, "wo", ("heads", "head_dim", "embed"), (h, e, d),
                (h * e) ** -0.5 / (2 * cfg.num_layers) ** 0.5, cfg)
    # Heads-major layout: the score and value products are then plain
    # batched matmuls over (batch, kv head) with no transposes around them
    # (2x faster fwd+bwd on XLA:CPU than length-major).
    if cfg.quant == "none" and attention_lib.platform() == "cpu":
      # One product for q, k and v: on XLA:CPU the step of the reference
      # shape ran 7-17% faster (A/B in one process, float32) than with three
      # products. Elsewhere three: concatenating weights sharded by
      # heads would move them between devices. (qwix finds a weight by
      # identity, so quantised training keeps three products.)
      qkv_BxNxLxE = dense("bld,dhe->bhle", x_BxLxD,
                          jnp.concatenate([wq, wk, wv], axis=1), cfg)
      q_BxHxLxE, k_BxKxLxE, v_BxKxLxE = jnp.split(qkv_BxNxLxE, [h, h + k],
                                                  axis=1)
    else:
      q_BxHxLxE = dense("bld,dhe->bhle", x_BxLxD, wq, cfg)
      k_BxKxLxE = dense("bld,dke->bkle", x_BxLxD, wk, cfg)
      v_BxKxLxE = dense("bld,dke->bkle", x_BxLxD, wv, cfg)
    if cfg.attn_bias:
      zeros = nn.initializers.zeros
      bq = _param(self, "bq", ("heads", "head_dim"), (h, e), 0.0, cfg, zeros)
      bk = _param(self, "bk", ("kv_heads", "head_dim"), (k, e), 0.0, cfg, zeros)
      bv = _param(self, "bv", ("kv_heads", "head_dim"), (k, e), 0.0, cfg, zeros)
      q_BxHxLxE = q_BxHxLxE + bq[:, None].astype(dt)
      k_BxKxLxE = k_BxKxLxE + bk[:, None].astype(dt)
      v_BxKxLxE = v_BxKxLxE + bv[:, None].astype(dt)
    q_BxHxLxE = constrain(q_BxHxLxE, ("batch", "heads", "length", "head_dim"))
    if cfg.qk_norm:
      q_BxHxLxE = RMSNorm(cfg, "head_dim", name="q_norm")(q_BxHxLxE)
      k_BxKxLxE = RMSNorm(cfg, "head_dim", name="k_norm")(k_BxKxLxE)
    q_BxHxLxE = rope(q_BxHxLxE, sin_cos)
    k_BxKxLxE = rope(k_BxKxLxE, sin_cos)

    b, l = x_BxLxD.shape[:2]
    q_BxHxLxE = q_BxHxLxE * jnp.asarray(e ** -0.5, dt)
    kernel = "xla" if decode else attention_lib.kernel_for(cfg, l)
    # Under context parallelism the sequence arrives in load-balanced slot
    # order (`Transformer`); `order_L` is each slot's position, static.
    order_L = None if decode else attention_lib.context_order(l)
    if order_L is not None and kernel != "xla":
      o_BxHxLxE = attention_lib.attend(kernel, q_BxHxLxE, k_BxKxLxE,
                                       v_BxKxLxE, segment_ids_BxL, cfg,
                                       order_L)
      return dense("bhle,hed->bld", o_BxHxLxE.astype(dt), wo, cfg)
    if order_L is not None:  # xla: the all-gather K/V path
      local = functools.partial(_gathered_attention,
                                mm=_dtype(cfg.product_dtype), dt=dt)
      o_BxHxLxE = attention_lib.gathered(local, q_BxHxLxE, k_BxKxLxE,
                                         v_BxKxLxE, segment_ids_BxL,
                                         jnp.asarray(order_L))
      return dense("bhle,hed->bld", o_BxHxLxE.astype(dt), wo, cfg)
    if kernel != "xla":
      o_BxHxLxE = attention_lib.attend(kernel, q_BxHxLxE, k_BxKxLxE,
                                       v_BxKxLxE, segment_ids_BxL, cfg)
      return dense("bhle,hed->bld", o_BxHxLxE.astype(dt), wo, cfg)
    if decode:
      k_BxKxSxE, v_BxKxSxE, mask_BxLxS = self._cache(
          k_BxKxLxE, v_BxKxLxE, segment_ids_BxL)
    else:
      k_BxKxSxE, v_BxKxSxE = k_BxKxLxE, v_BxKxLxE
      causal_LxS = jnp.tril(jnp.ones((l, l), dtype=bool))
      same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
      mask_BxLxS = causal_LxS[None] & same_BxLxS
    # Additive mask: one add fused into the softmax (a select is slower on
    # XLA:CPU). Every query sees at least itself, so no row is all -inf.
    bias_BxLxS = jnp.where(mask_BxLxS, 0.0, jnp.finfo(jnp.float32).min)

    g = h // k
    q_BxKxGxLxE = q_BxHxLxE.reshape(b, k, g, l, e)
    o_BxKxGxLxE = _attention(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, bias_BxLxS,
                             _dtype(cfg.product_dtype), dt)
    o_BxHxLxE = o_BxKxGxLxE.reshape(b, h, l, e).astype(dt)
    return dense("bhle,hed->bld", o_BxHxLxE, wo, cfg)

  def _cache(self, k_BxKxLxE, v_BxKxLxE, segment_ids_BxL):
    """Append this call's keys/values to the cache; mask by cache slot.

    The cache is sized at `init` time (its length is the max total length).
    Slot j is visible to query i of this call iff j <= index + i and the slot
    was written (segment id != 0 marks written, non-padding slots).
    """
    is_init = not self.has_variable("cache", "k")
    b, kh, l, e = k_BxKxLxE.shape
    ck = self.variable("cache", "k", jnp.zeros, (b, kh, l, e), k_BxKxLxE.dtype)
    cv = self.variable("cache", "v", jnp.zeros, (b, kh, l, e), v_BxKxLxE.dtype)
    cs = self.variable("cache", "seg", jnp.zeros, (b, l), jnp.int32)
    idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if is_init:  # shape-only pass that allocates the cache
      if not self.is_initializing():
        raise ValueError(
            "Transformer(decode=True) was applied without a 'cache' "
            "collection: create it with model.init(..., decode=True) at the "
            "maximum total length and pass it with mutable=['cache'] "
            "(see llmlab/decode.py)")
      return k_BxKxLxE, v_BxKxLxE, jnp.ones((b, l, l), bool)
    i = idx.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxKxLxE, (0, 0, i, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxKxLxE, (0, 0, i, 0))
    cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids_BxL, (0, i))
    idx.value = i + l
    s = ck.value.shape[2]
    q_pos_L = i + jnp.arange(l)
    visible_LxS = jnp.arange(s)[None, :] <= q_pos_L[:, None]
    same_BxLxS = segment_ids_BxL[:, :, None] == cs.value[:, None, :]
    mask_BxLxS = visible_LxS[None] & same_BxLxS & (cs.value[:, None, :] != 0)
    return ck.value, cv.value, mask_BxLxS


class Mlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    w_gate = _param(self, "w_gate", ("embed", "mlp"), (d, f), d ** -0.5, cfg)
    w_up = _param(self, "w_up", ("embed", "mlp"), (d, f), d ** -0.5, cfg)
    w_down = _param(self, "w_down", ("mlp", "embed"), (f, d),
                    f ** -0.5 / (2 * cfg.num_layers) ** 0.5, cfg)
    gate_BxLxF = dense("bld,df->blf", x_BxLxD, w_gate, cfg)
    up_BxLxF = dense("bld,df->blf", x_BxLxD, w_up, cfg)
    h_BxLxF = constrain(nn.silu(gate_BxLxF) * up_BxLxF,
                        ("batch", "length", "mlp"))
    return dense("blf,fd->bld", h_BxLxF, w_down, cfg)


class Block(nn.Module):
  """Pre-norm residual block; scanned, so it returns (carry, None)."""

  cfg: ModelConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, segment_ids_BxL, sin_cos):
    """`sin_cos`: the rotary tables of `rope_tables`, shared by all layers."""
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    h = Attention(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x_BxLxD),
                                    segment_ids_BxL, sin_cos, self.decode)
    x_BxLxD = x_BxLxD + drop(h)
    h = Mlp(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BxLxD))
    x_BxLxD = constrain(x_BxLxD + drop(h), ("batch", "length", "embed"))
    return x_BxLxD, None


def _offload_dots_policy(prim, *_, **params):
  """What `dots` saves, offloaded to pinned host memory instead of kept in
  device memory (MaxText's `minimal_offloaded`: checkpoint_dots with
  offload): the named weight products and any dot without batch dims are
  copied to the host in the forward pass and back for the backward; the
  rest is recomputed."""
  from jax._src.interpreters import partial_eval as pe  # noqa: PLC0415
  from jax._src import ad_checkpoint  # noqa: PLC0415
  offload = pe.Offloadable(src="device", dst="pinned_host")
  if prim is ad_checkpoint.name_p and params["name"] == "dense":
    return offload
  if prim is jax.lax.dot_general_p:
    (_, _), (lhs_b, rhs_b) = params["dimension_numbers"]
    if not lhs_b and not rhs_b:
      return offload
  return pe.Recompute


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Weight products (`dense`) are custom-VJP calls the dots policy cannot
    # see; they are saved by name instead.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names("dense")),
    "offload_dots": _offload_dots_policy,
    "minimal_offloaded": _offload_dots_policy,  # MaxText's name for it
}


class Transformer(nn.Module):
  """Decoder-only LM: tokens [B, L] -> logits [B, L, V] (float32)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None,
               deterministic: bool = True, decode: bool = False,
               hidden: bool = False):
    """Logits; with `hidden`, (final hidden states [B, L, D], output matrix
    [D, V]) instead, for a loss that projects a chunk at a time (`project`).
    """
    cfg = self.cfg
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]),
                                       tokens_BxL.shape)
    # Context parallelism: every sequence in load-balanced slot order (the
    # ids are reordered, not activations: a cheap int gather); restored
    # before the logits.
    order_L = None if decode else attention_lib.context_order(
        tokens_BxL.shape[1])
    if order_L is not None:
      tokens_BxL, segment_ids_BxL, positions_BxL = (
          t[:, order_L] for t in (tokens_BxL, segment_ids_BxL, positions_BxL))
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
        x_BxLxD, segment_ids_BxL,
        rope_tables(positions_BxL, cfg.head_size, cfg.rope_theta))
    if order_L is not None:
      x_BxLxD = constrain(x_BxLxD[:, np.argsort(order_L)],
                          ("batch", "length", "embed"))
    x_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)
    if cfg.tie_embeddings:
      w_DxV = emb_VxD.T
    else:
      w_DxV = _param(self, "unembed", ("embed", "vocab"),
                     (cfg.d_model, cfg.vocab_size), cfg.d_model ** -0.5, cfg)
    if hidden:
      return x_BxLxD, w_DxV
    return project(x_BxLxD, w_DxV, cfg)


def project(x_BxLxD: Array, w_DxV: Array, cfg: ModelConfig) -> Array:
  """The output projection: float32 logits [B, L, V] (L may be a chunk)."""
  logits_BxLxV = dense("bld,dv->blv", x_BxLxD, w_DxV, cfg,
                       out_dtype=jnp.float32)
  return constrain(logits_BxLxV, ("batch", "length", "vocab"))


# ----------------------------------------------------------------------------
# Sizes and FLOPs: the N and C of scaling laws.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class Frozen:
  """A frozen model as a jit input (a distillation teacher): params are
  traced, the shape is static. Keeping `model_cfg` in the pytree's static
  part lets a step rebuild the module without any global state; a `Frozen`
  with NamedShardings as leaves describes its layout."""

  params: Any
  model_cfg: ModelConfig = flax.struct.field(pytree_node=False)

  def logits(self, batch) -> Array:
    """[B, L, V] float32 logits, deterministic and without gradient."""
    out = Transformer(self.model_cfg).apply(
        {"params": self.params}, batch["tokens"], batch["segment_ids"],
        batch["positions"], deterministic=True)
    return jax.lax.stop_gradient(out)


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
