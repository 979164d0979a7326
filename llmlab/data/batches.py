"""What every data object serves the train loop, once: batches by step and
a memoised held-out set. A source subclasses `StepBatches` and sets
`tokenizer`, `vocab_size`, `info`, `_local` (a grain MapDataset of this
process's batches, indexed by step), `_read_options`, and implements
`_eval(eval_tokens, batch_size)` (see llmlab/data/evaluation.py)."""

from __future__ import annotations

import functools

import grain
import numpy as np

from llmlab.data.errors import DataError


class StepBatches:
  """Train batches as a pure function of the step; eval batches built once."""

  def __init__(self, tokenizer, *, seq_len: int, global_batch: int,
               process_index: int, process_count: int, read_options):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self._seq_len = seq_len
    self._local_batch = global_batch // process_count
    self._process_index = process_index
    self._process_count = process_count
    self._read_options = read_options
    self._eval_memo = {}

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`, each array [B, L]."""
    if step < 0:
      raise DataError(f"train_batch: step must be >= 0, got {step}")
    return self._local[step]

  def train_iter(self, start_step: int):
    """train_batch(start_step), train_batch(start_step + 1), ... prefetched."""
    if start_step < 0:
      raise DataError(f"train_iter: start_step must be >= 0, got {start_step}")
    return iter(self._local[start_step:].to_iter_dataset(self._read_options))

  def eval_batches(self, eval_tokens: int, batch_size: int) -> list[dict]:
    """The fixed held-out budget as batches of `batch_size` rows (global);
    this process's share of each. See evaluation.py."""
    key = (eval_tokens, batch_size)
    if key not in self._eval_memo:
      if eval_tokens < 1:
        raise DataError(f"eval_tokens={eval_tokens}: must be >= 1")
      self._eval_memo[key] = self._eval(eval_tokens, batch_size)
    return self._eval_memo[key]

  def _eval(self, eval_tokens: int, batch_size: int) -> list[dict]:
    raise NotImplementedError


def repeat_sample(sample, seed: int):
  """`sample` (a finite grain MapDataset) epoch after epoch, endlessly:
  epoch 0 in its own order, epoch e >= 1 in a permutation seeded by
  (seed, e). With `sample` the first U rows of a fresh stream
  (`data.unique_tokens`), a run sees exactly what the fresh run sees for
  its first U tokens, then those rows again, reshuffled: the two differ
  only by the repetition."""
  n = len(sample)

  @functools.lru_cache(maxsize=4)
  def order(epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)

  def row(i: int, j: int):
    epoch = i // n
    return sample[j if epoch == 0 else int(order(epoch)[j])]

  return grain.MapDataset.range(n).repeat().map_with_index(row)
