"""Choose the units to keep and slice the params to the target shape.

A `Selection` lists, in the source's order, the kept layers, and for each
kept layer its kept kv heads, query heads and MLP channels, plus the kept
hidden dims (one set: the residual stream is shared by all layers). Query
heads are listed kv head by kv head, so in the pruned model query head j
still reads kv head j // G' as `model.Attention` expects. Keeping indices in
the source's order makes pruning to the source's own shape the identity.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmlab import model as model_lib
from llmlab.compress import shapes


@dataclasses.dataclass
class Selection:
  layers: np.ndarray  # [L'] kept source layers
  kv: np.ndarray  # [L', K'] kept kv heads of each kept layer
  heads: np.ndarray  # [L', H'] kept query heads, grouped by kept kv head
  mlp: np.ndarray  # [L', F'] kept channels
  hidden: np.ndarray  # [D'] kept residual dims

  def to_json(self) -> dict:
    return {k: np.asarray(v).tolist() for k, v in
            dataclasses.asdict(self).items()}


def _top(scores, k: int) -> np.ndarray:
  """Indices of the k largest scores, in ascending index order (ties go to
  the lower index, so equal scores keep the leading units)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  return np.sort(order[:k])


def select(scores: dict, src: model_lib.ModelConfig,
           tgt: model_lib.ModelConfig, group: str = "sum") -> Selection:
  """The highest-scoring units of each structure, shaped like `tgt`.

  `scores` has the keys and shapes of a mask set (`masked.mask_shapes`).
  Within each kv head the best G' query heads are candidates; kv heads are
  ranked by `group`: "sum" = kv score + their query heads' scores (additive
  importances), "product" = kv score x the sum (keep probabilities).
  """
  shapes.check_target(src, tgt)
  g_src, g_tgt = shapes.group_size(src), shapes.group_size(tgt)
  layers = _top(scores["layer"], tgt.num_layers)
  kv_rows, head_rows = [], []
  for l in layers:
    head_KxG = np.asarray(scores["head"][l], np.float64).reshape(-1, g_src)
    best_KxG = np.stack([_top(row, g_tgt) for row in head_KxG])
    within_K = np.take_along_axis(head_KxG, best_KxG, 1).sum(1)
    kv_K = np.asarray(scores["kv"][l], np.float64)
    group_K = kv_K + within_K if group == "sum" else kv_K * within_K
    kept = _top(group_K, tgt.num_kv_heads)
    kv_rows.append(kept)
    head_rows.append((best_KxG[kept] + kept[:, None] * g_src).reshape(-1))
  mlp = np.stack([_top(scores["mlp"][l], tgt.mlp_dim) for l in layers])
  return Selection(layers=layers, kv=np.stack(kv_rows),
                   heads=np.stack(head_rows), mlp=mlp,
                   hidden=_top(scores["hidden"], tgt.d_model))


def identity(cfg: model_lib.ModelConfig) -> Selection:
  """Keep everything."""
  l = cfg.num_layers
  rows = lambda n: np.tile(np.arange(n), (l, 1))
  return Selection(np.arange(l), rows(cfg.num_kv_heads), rows(cfg.num_heads),
                   rows(cfg.mlp_dim), np.arange(cfg.d_model))


def masks_of(sel: Selection, cfg: model_lib.ModelConfig) -> dict:
  """Binary masks (source shape) that keep exactly `sel`."""
  l = cfg.num_layers
  out = {"layer": np.zeros(l), "kv": np.zeros((l, cfg.num_kv_heads)),
         "head": np.zeros((l, cfg.num_heads)), "mlp": np.zeros((l, cfg.mlp_dim)),
         "hidden": np.zeros(cfg.d_model)}
  out["layer"][sel.layers] = 1
  out["hidden"][sel.hidden] = 1
  for i, layer in enumerate(sel.layers):
    out["kv"][layer, sel.kv[i]] = 1
    out["head"][layer, sel.heads[i]] = 1
    out["mlp"][layer, sel.mlp[i]] = 1
  return {k: v.astype(np.float32) for k, v in out.items()}


# Per-layer leaves (after the leading layer axis has been taken): which axis
# indexes which structure. "hidden" is shared by all layers; the others are
# per kept layer.
_LAYER_AXES = {
    ("attn", "wq"): {1: "hidden", 2: "heads"},
    ("attn", "wk"): {1: "hidden", 2: "kv"},
    ("attn", "wv"): {1: "hidden", 2: "kv"},
    ("attn", "wo"): {1: "heads", 3: "hidden"},
    ("attn", "bq"): {1: "heads"},
    ("attn", "bk"): {1: "kv"},
    ("attn", "bv"): {1: "kv"},
    ("attn", "q_norm", "scale"): {},
    ("attn", "k_norm", "scale"): {},
    ("attn_norm", "scale"): {1: "hidden"},
    ("mlp_norm", "scale"): {1: "hidden"},
    ("mlp", "w_gate"): {1: "hidden", 2: "mlp"},
    ("mlp", "w_up"): {1: "hidden", 2: "mlp"},
    ("mlp", "w_down"): {1: "mlp", 2: "hidden"},
}
_TOP_AXES = {("embedding",): {1: "hidden"}, ("final_norm", "scale"): {0: "hidden"},
             ("unembed",): {0: "hidden"}}


def _flat(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _put(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _slice_leaf(x, axes: dict, sel: Selection):
  for axis, kind in axes.items():
    idx = getattr(sel, kind)
    if kind == "hidden":
      x = np.take(x, idx, axis=axis)
    else:  # [L', n] indices, broadcast along the other axes
      shape = [1] * x.ndim
      shape[0], shape[axis] = idx.shape
      x = np.take_along_axis(x, idx.reshape(shape), axis=axis)
  return x


def slice_params(params, sel: Selection) -> dict:
  """Numpy params of the pruned model (source params on host or device)."""
  import jax
  out: dict = {}
  for path, leaf in _flat(jax.device_get(params)):
    x = np.asarray(leaf)
    if path[0] == "layers":
      axes = _LAYER_AXES.get(path[1:])
      x = np.take(x, sel.layers, axis=0)
    else:
      axes = _TOP_AXES.get(path)
    if axes is None:
      raise ValueError(f"slice_params: no pruning rule for parameter "
                       f"{'/'.join(path)} (shape {x.shape}); add it to "
                       "llmlab/compress/slicing.py")
    _put(out, path, _slice_leaf(x, axes, sel))
  return out
