"""int8 weight-only quantization with per-output-channel scales.

Every matrix is stored as int8 q = round(w / s) in [-127, 127] with one
float32 scale s = max|w| / 127 per output channel, the max taken over the
matrix's input axes; so |w - s q| <= s / 2 elementwise. Norm scales and
biases (a negligible share of the bytes) stay in float. Activations are not
quantized: the forward pass runs on the dequantized weights, which is what
weight-only int8 inference computes (the saving is memory and bandwidth).
Symmetric, round-to-nearest, no calibration data.

Input axes per parameter (arrays have a leading layers axis when scanned):
wq/wk/wv [L, D, N, E] and w_gate/w_up [L, D, F] read D; wo [L, H, E, D]
reads (H, E); w_down [L, F, D] reads F; unembed [D, V] reads D; the
embedding [V, D] is a table of rows, one scale per token (also right for a
tied output layer, whose output channels are those tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmlab import errors

MODES = ("int8",)

# Leaf name -> input axes, counted from the end (so the layers axis is free).
INPUT_AXES = {"wq": (-3,), "wk": (-3,), "wv": (-3,), "wo": (-3, -2),
              "w_gate": (-2,), "w_up": (-2,), "w_down": (-2,),
              "unembed": (-2,), "embedding": (-1,)}


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def quantize_leaf(w, axes):
  """(int8 q, float32 scale broadcastable to w)."""
  w = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_leaf(q, scale, dtype):
  return (q.astype(jnp.float32) * scale).astype(dtype)


def quantize(params, mode: str = "int8"):
  """{path: (q, scale) or float leaf} as a pytree of the same structure."""
  if mode not in MODES:
    raise errors.UsageError(f"--quantize={mode!r}: must be one of {MODES}")
  def one(path, w):
    axes = INPUT_AXES.get(_leaf_name(path))
    return quantize_leaf(w, axes) if axes and w.ndim >= 2 else w
  return jax.tree_util.tree_map_with_path(one, params)


def _is_pair(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2


def dequantize(qtree, like):
  """Float params of `like`'s dtypes from `quantize`'s output."""
  return jax.tree.map(lambda q, w: dequantize_leaf(*q, w.dtype) if _is_pair(q)
                      else q, qtree, like, is_leaf=_is_pair)


def nbytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * x.size
                 for x in jax.tree.leaves(tree)))


@functools.partial(jax.jit, static_argnums=1)
def quantize_dequantize(params, mode: str = "int8"):
  """(quantized tree, dequantized params, max |error| per leaf), compiled
  once per model shape."""
  qtree = quantize(params, mode)
  deq = dequantize(qtree, params)
  err = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a.astype(jnp.float32) -
                                                  b.astype(jnp.float32))),
                     deq, params)
  return qtree, deq, err


def roundtrip(params, mode: str = "int8"):
  """(dequantized params, report): the params a weight-only int8 model
  computes with, and its storage against the float checkpoint's."""
  if mode not in MODES:
    raise errors.UsageError(f"--quantize={mode!r}: must be one of {MODES}")
  qtree, deq, err = quantize_dequantize(params, mode)
  pairs = [x for x in jax.tree.leaves(qtree, is_leaf=_is_pair) if _is_pair(x)]
  float_bytes, q_bytes = nbytes(params), nbytes(qtree)
  report = {"quantize": mode, "bytes_float": float_bytes,
            "bytes_quantized": q_bytes,
            "size_reduction": float_bytes / q_bytes,
            "quantized_arrays": len(pairs),
            "max_abs_weight_error": float(max(jax.device_get(
                jax.tree.leaves(err)) or [0.0]))}
  return deq, report
