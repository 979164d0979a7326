"""Which Hugging Face tensor is which llmlab parameter, and how to reshape it.

HF `nn.Linear` weights are [out, in] with heads flattened into `out`; llmlab
keeps heads as their own axis ([D, H, E] for wq, [H, E, D] for wo) and scans
layers, so every per-layer parameter has a leading layer axis. Each mapping
is "reshape the HF tensor to `split`, then transpose by `perm`", which is a
zero-copy numpy view of a memory-mapped tensor, and its exact inverse.

RoPE needs no permutation of q/k: llmlab uses the rotate-half convention of
the HF Llama code (first half of each head paired with the second half).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmlab import model as model_lib

PREFIX = "model.layers.{i}."
INV_FREQ_SUFFIX = ".self_attn.rotary_emb.inv_freq"  # old buffers, derived


@dataclasses.dataclass(frozen=True)
class Entry:
  """One llmlab parameter leaf and its HF tensor (one per layer if stacked)."""

  path: tuple[str, ...]
  hf: str  # name; "{i}" is the layer index when `stacked`
  hf_shape: tuple[int, ...]
  split: tuple[int, ...]  # hf_shape with the head axes unflattened
  perm: tuple[int, ...]  # axes of `split` in llmlab's order
  stacked: bool

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """llmlab shape of one layer's slice."""
    return tuple(self.split[p] for p in self.perm)

  def hf_name(self, layer: int | None = None) -> str:
    return self.hf.format(i=layer) if self.stacked else self.hf

  def to_llmlab(self, hf_array: np.ndarray) -> np.ndarray:
    return hf_array.reshape(self.split).transpose(self.perm)

  def to_hf(self, array: np.ndarray) -> np.ndarray:
    return np.asarray(array).transpose(np.argsort(self.perm)).reshape(
        self.hf_shape)


def entries(cfg: model_lib.ModelConfig) -> list[Entry]:
  """All parameters of `cfg`'s Transformer, in HF checkpoint order."""
  v, d, f = cfg.vocab_size, cfg.d_model, cfg.mlp_dim
  h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  keep = lambda *shape: (shape, shape, tuple(range(len(shape))))
  swap = lambda a, b: ((a, b), (a, b), (1, 0))

  def layer(path, name, shapes):
    return Entry(("layers",) + path, PREFIX + name, *shapes, stacked=True)

  out = [Entry(("embedding",), "model.embed_tokens.weight", *keep(v, d),
               stacked=False)]
  out += [
      layer(("attn_norm", "scale"), "input_layernorm.weight", keep(d)),
      layer(("attn", "wq"), "self_attn.q_proj.weight",
            ((h * e, d), (h, e, d), (2, 0, 1))),
      layer(("attn", "wk"), "self_attn.k_proj.weight",
            ((k * e, d), (k, e, d), (2, 0, 1))),
      layer(("attn", "wv"), "self_attn.v_proj.weight",
            ((k * e, d), (k, e, d), (2, 0, 1))),
      layer(("attn", "wo"), "self_attn.o_proj.weight",
            ((d, h * e), (d, h, e), (1, 2, 0))),
  ]
  if cfg.attn_bias:
    out += [
        layer(("attn", "bq"), "self_attn.q_proj.bias",
              ((h * e,), (h, e), (0, 1))),
        layer(("attn", "bk"), "self_attn.k_proj.bias",
              ((k * e,), (k, e), (0, 1))),
        layer(("attn", "bv"), "self_attn.v_proj.bias",
              ((k * e,), (k, e), (0, 1))),
    ]
  if cfg.qk_norm:
    out += [
        layer(("attn", "q_norm", "scale"), "self_attn.q_norm.weight", keep(e)),
        layer(("attn", "k_norm", "scale"), "self_attn.k_norm.weight", keep(e)),
    ]
  out += [
      layer(("mlp_norm", "scale"), "post_attention_layernorm.weight", keep(d)),
      layer(("mlp", "w_gate"), "mlp.gate_proj.weight", swap(f, d)),
      layer(("mlp", "w_up"), "mlp.up_proj.weight", swap(f, d)),
      layer(("mlp", "w_down"), "mlp.down_proj.weight", swap(d, f)),
  ]
  out.append(Entry(("final_norm", "scale"), "model.norm.weight", *keep(d),
                   stacked=False))
  if not cfg.tie_embeddings:
    out.append(Entry(("unembed",), "lm_head.weight", *swap(v, d),
                     stacked=False))
  return out
