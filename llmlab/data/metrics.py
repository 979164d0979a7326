"""Numpy reference for which targets count and for bits per byte.

Position t of a row predicts tokens[t+1]. The target is valid iff
segment_ids[t+1] == segment_ids[t] != 0: inside one document (fragment) and
not padding. So BOS is never a target, EOS is (it ends the document, 0
bytes), and nothing is predicted across a document or row boundary.

    bits per byte = sum_valid nll / (ln 2 * sum_valid bytes[t+1])

A tokenizer-independent measure: EOS targets add loss but no bytes.
"""

from __future__ import annotations

import math

import numpy as np


def target_mask(batch) -> np.ndarray:
  """bool [B, L-1]: prediction at t (of token t+1) is a valid target."""
  seg_BxL = np.asarray(batch["segment_ids"])
  return (seg_BxL[:, 1:] == seg_BxL[:, :-1]) & (seg_BxL[:, :-1] != 0)


def target_bytes(batch) -> np.ndarray:
  """int [B, L-1]: bytes of each valid target token, 0 where invalid."""
  return np.where(target_mask(batch), np.asarray(batch["bytes"])[:, 1:], 0)


def target_nll(logprobs_BxLxV: np.ndarray, batch) -> np.ndarray:
  """float [B, L-1]: -log p(tokens[t+1]) at valid targets, 0 elsewhere."""
  tokens_BxL = np.asarray(batch["tokens"])
  picked = np.take_along_axis(logprobs_BxLxV[:, :-1],
                              tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return np.where(target_mask(batch), -picked, 0.0)


def bits_per_byte(nll_sum: float, bytes_sum: float) -> float:
  """Summed nll (nats) over valid targets / (ln 2 * their summed bytes)."""
  if bytes_sum <= 0:
    raise ValueError(f"bits_per_byte: bytes_sum={bytes_sum} must be > 0")
  return float(nll_sum) / (math.log(2) * float(bytes_sum))
