"""Training batches from a token store (`data.source=tokens`,
`data.tokens.path=URI`; the store is written by `llmlab tokenize`, see
token_store.py).

Rows: each source's training split is one token stream, its shards back to
back (documents as BOS ... EOS in input order, fixed when the store was
written); row r is the stream's tokens [r L, (r+1) L), and the tail shorter
than a row is never used. The seed does not reorder documents (that would
need every document's offset in memory); it shuffles rows instead. Within
a row, segment ids count documents from 1 (the fragment a row starts with
is segment 1, without a BOS), positions restart at 0 at every document
start and at the row start, and `bytes` are the stored UTF-8 counts: the
in-memory pipeline's packing semantics (packing.py) on a fixed document
order.

Order: row ids of each source are shuffled by grain (`MapDataset.shuffle`
over `range(rows)`, reshuffled every epoch by `repeat`), sources are mixed
by the store's weights (`MapDataset.mix`), and global batch `step` is rows
[step G, (step+1) G) of that, as in pipeline.py. Process p takes rows
[p B, (p+1) B) of it and reads only those: grain orders row *ids*, and one
`map` per local batch issues all of its range reads at once. A batch is a
pure function of (seed, step) and of the store.

Evaluation: ceil(budget / L) rows spread evenly over each source's
validation stream (held-out documents), the last one cut to the budget,
batches padded with padding rows; a process reads only its share.
"""

from __future__ import annotations

import grain
import numpy as np

from llmlab.data import config as data_config
from llmlab.data import evaluation
from llmlab.data.batches import StepBatches
from llmlab.data.batches import repeat_sample
from llmlab.data import tokenizer as tokenizer_lib
from llmlab.data import token_store
from llmlab.data.errors import DataError
from llmlab.data.packing import truncate
from llmlab.data.seeds import derive_seed

PACKING = ("each source's documents as BOS..EOS in stored order, cut into "
           "rows of seq_len; rows shuffled by seed; a cut document continues "
           "in the next row with positions restarting at 0")


class StoreData(StepBatches):
  """The `Data` interface (pipeline.py) over a token store."""

  def __init__(self, tokenizer, store: token_store.TokenStore, *,
               seq_len: int, global_batch: int, seed: int,
               process_index: int, process_count: int, read_options,
               unique_tokens: int = 0):
    super().__init__(tokenizer, seq_len=seq_len, global_batch=global_batch,
                     process_index=process_index, process_count=process_count,
                     read_options=read_options)
    self.store = store
    self._names = [s["name"] for s in store.sources]
    self._weights = [float(s["weight"]) for s in store.sources]
    self._train = [store.split(n, "train") for n in self._names]
    self._val = [store.split(n, "val") for n in self._names]
    self._check_sizes()
    self._rows = [data_config.unique_rows(
        unique_tokens, w, t.num_rows(seq_len), seq_len, n)
                  for n, w, t in zip(self._names, self._weights, self._train)]
    self._ids = self._row_ids(seed)
    self._local = self._ids.map(self._read_batch)
    self.info = _info(store, tokenizer, seq_len, self._train)
    if unique_tokens:
      self.info["rows_per_epoch"] = dict(zip(self._names, self._rows))
      self.info["unique_tokens"] = seq_len * sum(self._rows)

  def _check_sizes(self) -> None:
    for name, train, val in zip(self._names, self._train, self._val):
      where = f"token store {self.store.uri}: source {name!r}"
      if train.num_rows(self._seq_len) < 1:
        raise DataError(f"{where}: training split has {train.num_tokens} "
                        f"tokens, less than one row of seq_len="
                        f"{self._seq_len}")
      if val.num_tokens == 0:
        raise DataError(f"{where}: the validation split is empty; tokenize "
                        "again with a larger data.val_fraction")

  def _row_ids(self, seed: int):
    """This process's batches of (source ids [B], row ids [B]) as a grain
    MapDataset; `_local` maps them to the rows' arrays."""
    ids = []
    for k, (name, split) in enumerate(zip(self._names, self._train)):
      total, keep = split.num_rows(self._seq_len), self._rows[k]
      fresh = grain.MapDataset.range(total).shuffle(
          seed=derive_seed(seed, name, "rows"))
      rows = fresh.repeat() if keep == total else repeat_sample(
          fresh[:keep], derive_seed(seed, name, "epochs"))  # unique_tokens
      ids.append(rows.map(lambda r, k=k: (k, r)))
    mixed = ids[0] if len(ids) == 1 else grain.MapDataset.mix(
        ids, self._weights)
    batched = mixed.batch(self._local_batch, drop_remainder=True)
    return batched[self._process_index::self._process_count]

  def batch_rows(self, step: int) -> list[tuple[str, int]]:
    """[(source, row)] that train_batch(step) reads, without reading them
    (tests and tools check what a process reads)."""
    sources, rows = self._ids[step]
    return [(self._names[k], int(r)) for k, r in zip(sources, rows)]

  def _read_batch(self, ids) -> dict[str, np.ndarray]:
    """(source ids [B], row ids [B]) -> the batch arrays int32 [B, L]."""
    sources, rows = (np.asarray(x) for x in ids)
    out = {}
    for k in np.unique(sources):
      where = np.flatnonzero(sources == k)
      got = self._train[k].read_rows(rows[where], self._seq_len)
      for key, value in got.items():
        if key not in out:
          out[key] = np.empty((len(rows), self._seq_len), value.dtype)
        out[key][where] = value
    return out

  def _eval(self, eval_tokens: int, batch_size: int) -> list[dict]:
    if batch_size < 1 or batch_size % self._process_count:
      raise DataError(f"eval batch_size={batch_size} must be a positive "
                      f"multiple of process_count={self._process_count}")
    rows = []  # (source, row, tokens kept)
    for k, budget in enumerate(evaluation.budgets(self._weights,
                                                  eval_tokens)):
      rows += self._eval_rows(k, budget)
    rows += [None] * (-len(rows) % batch_size)
    local = batch_size // self._process_count
    first = self._process_index * local
    return [self._eval_batch(rows[s + first:s + first + local])
            for s in range(0, len(rows), batch_size)]

  def _eval_rows(self, k: int, budget: int) -> list[tuple]:
    split, seq_len = self._val[k], self._seq_len
    have, need = split.num_rows(seq_len), -(-budget // seq_len)
    if need > have:
      raise DataError(
          f"source {self._names[k]!r}: validation split has {have} rows of "
          f"seq_len={seq_len} ({split.num_tokens} tokens), fewer than the "
          f"{budget} tokens asked for evaluation; lower eval_tokens or "
          "tokenize with a larger data.val_fraction")
    rows = [(k, int(r), seq_len) for r in np.arange(need) * have // need]
    rows[-1] = (k, rows[-1][1], budget - (need - 1) * seq_len)
    return rows

  def _eval_batch(self, rows: list) -> dict[str, np.ndarray]:
    out = []
    for row in rows:
      if row is None:
        out.append(None)
        continue
      k, r, keep = row
      got = self._val[k].read_rows([r], self._seq_len)
      got = {key: v[0] for key, v in got.items()}
      out.append(got if keep == self._seq_len else
                 truncate(got, keep, self.tokenizer.pad_id))
    like = next((r for r in out if r is not None), None)
    if like is None:  # only padding in this process's share
      like = {k: np.zeros(self._seq_len, np.int32) for k in
              ("tokens", "segment_ids", "positions", "bytes")}
    pad = truncate(like, 0, self.tokenizer.pad_id)
    out = [pad if r is None else r for r in out]
    return {key: np.stack([r[key] for r in out]) for key in pad}


def build(data_cfg, *, seq_len: int, global_batch: int, seed: int,
          process_index: int, process_count: int, read_options,
          unique_tokens: int = 0) -> StoreData:
  """Opens and checks the store (manifest and tokenizer only)."""
  uri = str(data_cfg.tokens.path or "")
  if not uri:
    raise DataError("data.source=tokens needs data.tokens.path=URI of a "
                    "store written by `llmlab tokenize`")
  tokenizer = tokenizer_lib.load(str(data_cfg.tokenizer))
  store = token_store.TokenStore(uri)
  store.check_tokenizer(tokenizer, str(data_cfg.tokenizer))
  return StoreData(tokenizer, store, seq_len=seq_len,
                   global_batch=global_batch, seed=seed,
                   process_index=process_index, process_count=process_count,
                   read_options=read_options, unique_tokens=unique_tokens)


def _info(store, tokenizer, seq_len: int, train: list) -> dict:
  """JSON-able record of the run's data: pipeline.py's keys, from the
  manifest, with the store's fingerprint."""
  m = store.manifest
  sources = [{"name": s["name"], "weight": s["weight"],
              "fingerprint": s["fingerprint"], **s["info"],
              "train": _split_info(s["train"]), "val": _split_info(s["val"])}
             for s in m["sources"]]
  info = {
      "source": "tokens", "path": store.uri, "sources": sources,
      "fingerprint": store.fingerprint,
      "tokenizer": tokenizer.info(),
      "val_fraction": m["val_fraction"], "seq_len": seq_len,
      "docs_train": sum(s["train"]["docs"] for s in sources),
      "docs_val": sum(s["val"]["docs"] for s in sources),
      "bytes_train": sum(s["train"]["text_bytes"] for s in sources),
      "bytes_val": sum(s["val"]["text_bytes"] for s in sources),
      "tokens_train": m["tokens_train"], "tokens_val": m["tokens_val"],
      "packing": PACKING,
      "rows_per_epoch": {s["name"]: t.num_rows(seq_len)
                         for s, t in zip(sources, train)},
  }
  if len(sources) == 1 and sources[0]["name"] == "synthetic":
    info["entropy_rate_nats"] = (sources[0]["entropy_rate_nats_per_symbol"]
                                 if tokenizer.kind == "byte" else None)
    info["entropy_rate_bits_per_byte"] = (
        sources[0]["entropy_rate_bits_per_byte"])
  return info


def _split_info(entry: dict) -> dict:
  return {"docs": entry["docs"], "tokens": entry["tokens"],
          "text_bytes": entry["text_bytes"],
          "docs_without_tokens": entry["docs_without_tokens"],
          "shards": len(entry["shards"])}
