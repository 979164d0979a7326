"""The held-out evaluation budget: fixed rows of the validation splits.

`eval_tokens` token positions, split over sources by mixture weight, in rows
of seq_len taken evenly across each source's validation split (documents in
a fixed order, not the run's seed, so the rows sample the whole split rather
than its first files). The last row of a source keeps only the positions
that complete its budget; the last batch is filled with padding rows
(segment 0: no targets). Identical for every run with the same data config,
tokenizer and seq_len.
"""

from __future__ import annotations

import numpy as np

from llmlab.data.corpus import TokenStream
from llmlab.data.errors import DataError
from llmlab.data.packing import PackedRows
from llmlab.data.packing import truncate

_ORDER_SEED = 0  # eval rows must not depend on the run's seed


def budgets(weights: list[float], eval_tokens: int) -> list[int]:
  """Token budget per source, proportional to weight, summing exactly."""
  cuts = np.round(np.cumsum(weights) * eval_tokens)
  per_source = np.diff(np.concatenate([[0], cuts])).astype(int)
  return [max(int(b), 1) for b in per_source]


def rows(name: str, val: TokenStream, seq_len: int, budget: int,
         pad_id: int) -> list[dict]:
  """ceil(budget / seq_len) rows spread evenly over the validation split."""
  packed = PackedRows(val, seq_len, _ORDER_SEED)
  need = -(-budget // seq_len)
  if need > len(packed):
    raise DataError(
        f"source {name!r}: validation split has {len(packed)} rows of "
        f"seq_len={seq_len} ({val.num_tokens} tokens), fewer than the "
        f"{budget} tokens asked for evaluation; lower eval_tokens or raise "
        "data.val_fraction")
  out = [packed[i] for i in np.arange(need) * len(packed) // need]
  out[-1] = truncate(out[-1], budget - (need - 1) * seq_len, pad_id)
  return out


def batches(all_rows: list[dict], batch_size: int, pad_id: int,
            process_index: int, process_count: int) -> list[dict]:
  """Global batches of `batch_size` rows; this process's slice of each."""
  if batch_size < 1 or batch_size % process_count:
    raise DataError(f"eval batch_size={batch_size} must be a positive "
                    f"multiple of process_count={process_count}")
  padding = truncate(all_rows[0], 0, pad_id)
  all_rows = all_rows + [padding] * (-len(all_rows) % batch_size)
  local = batch_size // process_count
  first = process_index * local
  return [{k: np.stack([r[k] for r in all_rows[s + first:s + first + local]])
           for k in all_rows[0]}
          for s in range(0, len(all_rows), batch_size)]
