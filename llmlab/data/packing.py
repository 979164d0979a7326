"""Rows of a token stream: documents in a seeded order, cut every seq_len.

Row i covers positions [i L, (i+1) L) of the concatenation of the stream's
documents (each BOS ... EOS) in the order `permutation(seed)`. A document cut
at a row end continues in the next row *without* a new BOS and with positions
restarting at 0: every row is self-contained and positions stay below
seq_len, so position tables of size seq_len suffice, at the price of the
continuation's first targets lacking their earlier context.

Row arrays (int32 [L]):
  tokens       token ids
  segment_ids  1, 2, ... per document (fragment) in the row; 0 = padding
  positions    0, 1, ... within each segment
  bytes        UTF-8 bytes the token stands for (0 for BOS/EOS/PAD)

Rows are computed on demand from the flat stream (a searchsorted and a
gather), so building a dataset costs O(documents), never O(tokens).
"""

from __future__ import annotations

import numpy as np

from llmlab.data.corpus import TokenStream


class PackedRows:
  """Random access to rows; a grain data source (`__len__`, `__getitem__`)."""

  def __init__(self, stream: TokenStream, seq_len: int, seed):
    """Full rows only: the tail of the ordered stream shorter than a row is
    dropped (a different tail for each seed)."""
    self._stream = stream
    self._seq_len = seq_len
    order = np.random.default_rng(seed).permutation(stream.num_docs)
    lengths = np.diff(stream.doc_starts)[order]
    self._end = np.cumsum(lengths)             # end of each doc in the order
    self._start = self._end - lengths
    self._source = stream.doc_starts[:-1][order]  # where it is in the stream
    self._rows = (int(self._end[-1]) if len(lengths) else 0) // seq_len

  def __len__(self) -> int:
    return self._rows

  def __getitem__(self, i) -> dict[str, np.ndarray]:
    i = int(i)
    if not 0 <= i < self._rows:
      raise IndexError(f"row {i} out of range [0, {self._rows})")
    row_start = i * self._seq_len
    p = np.arange(row_start, row_start + self._seq_len)
    doc = np.searchsorted(self._end, p, side="right")
    src = self._source[doc] + (p - self._start[doc])
    return {
        "tokens": self._stream.tokens[src].astype(np.int32),
        "segment_ids": (doc - doc[0] + 1).astype(np.int32),
        "positions": (p - np.maximum(self._start[doc], row_start)
                      ).astype(np.int32),
        "bytes": self._stream.nbytes[src].astype(np.int32),
    }


def truncate(row: dict[str, np.ndarray], keep: int, pad_id: int):
  """The row with positions >= keep turned into padding."""
  out = {k: v.copy() for k, v in row.items()}
  for k, v in out.items():
    v[keep:] = pad_id if k == "tokens" else 0
  return out
