"""Tokenize a split once into a flat stream of BOS ... EOS documents.

The stream (token ids, UTF-8 bytes per token, document offsets) is what
packing reads rows from. Streams of file tokenizers are cached on disk as
.npy files (memory-mapped when loaded), keyed by a sha256 of the source
fingerprint, split, tokenizer file hash and this format's version; the byte
tokenizer is fast enough to need no disk cache. Both are memoised in-process
so repeated `build()` calls (tests, sweeps) do not re-tokenize.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile

import numpy as np

from llmlab.data.errors import DataError

FORMAT_VERSION = "stream-v1"
_MEMO: dict[str, "TokenStream"] = {}
_MEMO_SIZE = 8


@dataclasses.dataclass
class TokenStream:
  tokens: np.ndarray      # uint16/int32 [N]  documents as BOS ... EOS
  nbytes: np.ndarray      # uint16/int32 [N]  UTF-8 bytes per token (0 BOS/EOS)
  doc_starts: np.ndarray  # int64 [D+1]       doc d: [starts[d], starts[d+1])
  dropped_docs: int = 0   # documents that gave no token (left out, counted)

  @property
  def num_docs(self) -> int:
    return len(self.doc_starts) - 1

  @property
  def num_tokens(self) -> int:
    return int(self.doc_starts[-1])

  def info(self) -> dict:
    return {"docs": self.num_docs, "tokens": self.num_tokens,
            "text_bytes": int(self.nbytes.sum(dtype=np.int64)),
            "docs_without_tokens": self.dropped_docs}


def wrap(ids, nbytes, lengths, bos: int, eos: int) -> TokenStream:
  """Documents' tokens back to back, each as BOS ids EOS; empty docs dropped."""
  dropped = int((lengths == 0).sum())
  lengths = lengths[lengths > 0]
  starts = np.concatenate([[0], np.cumsum(lengths + 2)]).astype(np.int64)
  total = int(starts[-1])
  vocab_max = max(int(ids.max(initial=0)), bos, eos)
  tokens = np.empty(total, np.uint16 if vocab_max < 2**16 else np.int32)
  counts = np.zeros(total, np.uint16 if nbytes.max(initial=0) < 2**16
                    else np.int32)
  body = np.ones(total, bool)
  body[starts[:-1]] = False
  body[starts[1:] - 1] = False
  tokens[~body] = eos
  tokens[starts[:-1]] = bos
  tokens[body] = ids
  counts[body] = nbytes
  return TokenStream(tokens, counts, starts, dropped)


def tokenize(texts: list[str], tokenizer, key: str,
             cache_dir: str | None) -> TokenStream:
  """The stream of `texts`; `key` must identify texts + tokenizer exactly."""
  key = hashlib.sha256(f"{FORMAT_VERSION}|{key}|{tokenizer.fingerprint}"
                       .encode()).hexdigest()
  if key in _MEMO:
    return _MEMO[key]
  use_disk = cache_dir is not None and tokenizer.kind != "byte"
  path = os.path.join(cache_dir, key) if use_disk else ""
  stream = _load(path) if use_disk else None
  if stream is None:
    ids, nbytes, lengths = tokenizer.encode_docs(texts)
    stream = wrap(ids, nbytes, lengths, tokenizer.bos_id, tokenizer.eos_id)
    if use_disk:
      _save(path, stream)
  if len(_MEMO) >= _MEMO_SIZE:
    _MEMO.pop(next(iter(_MEMO)))
  _MEMO[key] = stream
  return stream


def _load(path: str) -> TokenStream | None:
  if not os.path.isdir(path):
    return None
  arrays = [np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r")
            for name in ("tokens", "nbytes", "doc_starts", "dropped_docs")]
  return TokenStream(*arrays[:3], int(arrays[3]))


def _save(path: str, stream: TokenStream) -> None:
  """Write to a temporary directory, then rename: readers never see halves."""
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
  except OSError as e:
    raise DataError(f"data.cache_dir: cannot write the token cache under "
                    f"{parent}: {e}") from None
  for name in ("tokens", "nbytes", "doc_starts", "dropped_docs"):
    np.save(os.path.join(tmp, f"{name}.npy"), np.asarray(getattr(stream, name)))
  try:
    os.rename(tmp, path)
  except OSError:  # another process finished first; keep its copy
    shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir(configured: str) -> str:
  """The token cache's directory. Local only: the cache is memory-mapped,
  and a bucket URI here would become a local directory named "gs:"."""
  if "://" in configured:
    raise DataError(f"data.cache_dir={configured!r}: must be a local directory "
                    "(the token cache is memory-mapped); corpora may be remote, "
                    "their cache may not")
  if configured:
    return os.path.expanduser(configured)
  return os.environ.get("LLMLAB_CACHE_DIR",
                        os.path.expanduser("~/.cache/llmlab/data"))
