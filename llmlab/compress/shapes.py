"""Which target shapes a source model can be pruned to, and model sizes.

Structured pruning keeps a subset of layers, of kv heads (with a subset of
each kept kv head's query heads), of MLP channels and of hidden dims. Head
size never changes: RoPE rotates dimension i with i + E/2 at frequencies set
by E, so slicing head dims would change every attention score. A kept kv
head keeps G' = H'/K' of its G = H/K query heads, so G' <= G.

`size(masks, cfg)` is `model.param_counts` written over masks: with binary
masks it is the exact parameter count of the pruned model; with each mask
replaced by its probability of being non-zero it is the *expected* count
(the formula is multilinear in independent masks, so the expectation of each
product is the product of the expectations).
"""

from __future__ import annotations

from llmlab import config as config_lib
from llmlab import model as model_lib

UNITS = ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim")
SAME = ("tie_embeddings", "qk_norm", "attn_bias", "rope_theta", "norm_eps")


def check_target(src: model_lib.ModelConfig, tgt: model_lib.ModelConfig,
                 where: str = "target") -> None:
  """Raise ConfigError (naming key and value) unless `tgt` is a pruning of
  `src`; checked before any param is read."""
  def fail(key, value, why):
    raise config_lib.ConfigError(f"{where}: config.model.{key}={value!r}: {why}")
  if tgt.vocab_size != src.vocab_size:
    fail("vocab_size (data.tokenizer)", tgt.vocab_size,
         f"must equal the source's {src.vocab_size}: pruning keeps the "
         "vocabulary")
  for key in SAME:
    if getattr(tgt, key) != getattr(src, key):
      fail(key, getattr(tgt, key), f"must equal the source's "
           f"{getattr(src, key)!r}: pruning cannot change it")
  for key in UNITS:
    if not 1 <= getattr(tgt, key) <= getattr(src, key):
      fail(key, getattr(tgt, key), f"must be in [1, {getattr(src, key)}] "
           "(the source's value): pruning only removes units")
  if tgt.head_size != src.head_size:
    fail("head_dim", tgt.head_dim, f"head size {tgt.head_size} != the "
         f"source's {src.head_size}: pruning removes heads, never head dims "
         f"(RoPE); set model.head_dim={src.head_size} in the target")
  if tgt.num_heads % tgt.num_kv_heads:
    fail("num_kv_heads", tgt.num_kv_heads, f"must divide num_heads="
         f"{tgt.num_heads}: every kv head keeps the same number of query "
         "heads")
  g_src = src.num_heads // src.num_kv_heads
  g_tgt = tgt.num_heads // tgt.num_kv_heads
  if g_tgt > g_src:
    fail("num_heads", tgt.num_heads, f"{g_tgt} query heads per kv head "
         f"(num_heads/num_kv_heads = {tgt.num_heads}/{tgt.num_kv_heads}) "
         f"but the source's kv heads have only {g_src} "
         f"({src.num_heads}/{src.num_kv_heads}); query heads stay with their "
         "kv head")


def group_size(cfg: model_lib.ModelConfig) -> int:
  """G: query heads per kv head."""
  return cfg.num_heads // cfg.num_kv_heads


def counts(masks: dict, cfg: model_lib.ModelConfig) -> dict:
  """Kept units per structure: layers, hidden dims, and per layer kv heads,
  effective query heads (alive only with their kv head), MLP channels.

  Written with array methods over the last axes, so it takes numpy or jax
  arrays, with any leading batch axes (e.g. many sampled mask sets)."""
  kv_LxH = masks["kv"].repeat(group_size(cfg), axis=-1)
  return {"layer": masks["layer"].sum(-1),
          "hidden": masks["hidden"].sum(-1),
          "kv": masks["kv"].sum(-1),
          "head": (masks["head"] * kv_LxH).sum(-1),
          "mlp": masks["mlp"].sum(-1)}


def size(masks: dict, cfg: model_lib.ModelConfig) -> dict:
  """Parameter count of the model `masks` keep (see the module docstring);
  same keys as `model.param_counts`."""
  c = counts(masks, cfg)
  d, h_L, k_L, f_L, e = (c["hidden"], c["head"], c["kv"], c["mlp"],
                         cfg.head_size)
  d_1 = d[..., None]  # broadcasts against the per-layer counts
  per_L = d_1 * e * (h_L + 2 * k_L) + h_L * e * d_1 + 3 * d_1 * f_L + 2 * d_1
  if cfg.qk_norm:
    per_L = per_L + 2 * e
  if cfg.attn_bias:
    per_L = per_L + e * (h_L + 2 * k_L)
  non_emb = (masks["layer"] * per_L).sum(-1) + d
  emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return {"total": non_emb + emb, "non_embedding": non_emb, "embedding": emb}


def target_counts(tgt: model_lib.ModelConfig) -> dict:
  """The `counts` a pruning to `tgt` must reach (per-layer ones per layer)."""
  return {"layer": tgt.num_layers, "hidden": tgt.d_model,
          "kv": tgt.num_kv_heads, "head": tgt.num_heads, "mlp": tgt.mlp_dim}
