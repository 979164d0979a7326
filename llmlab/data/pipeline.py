"""`build()` and `Data`: seeded, resumable batches on grain.

Training order is a pure function of (seed, step), Levanter-style: for each
source, rows of its packed training stream (document order seeded by `seed`)
are shuffled by grain (`MapDataset.shuffle`, reshuffled every epoch by
`repeat`), sources are interleaved by weight (`MapDataset.mix`, a fixed
deterministic pattern), and global batch `step` is mixed rows
[step G, (step+1) G). Process p owns rows [step G + p B, step G + (p+1) B) with
B = G / process_count, i.e. element `step P + p` of the rows batched by B.
Resuming at step s is `train_iter(s)`: nothing to checkpoint but the step.
With `data.unique_tokens=U` each source keeps the first floor(U w / seq_len)
rows of that shuffled stream (data/config.py) and repeats them, reshuffled
every later epoch (`batches.repeat_sample`): order still a pure function of
(seed, step), and identical to the fresh run's for the first U tokens.
"""

from __future__ import annotations

import hashlib
import json

import grain

from llmlab.data import config as config_lib
from llmlab.data.batches import StepBatches
from llmlab.data.batches import repeat_sample
from llmlab.data import corpus
from llmlab.data import documents
from llmlab.data import evaluation
from llmlab.data import files
from llmlab.data import prose
from llmlab.data import stdlib
from llmlab.data import synthetic
from llmlab.data import token_data
from llmlab.data import tokenizer as tokenizer_lib
from llmlab.data.errors import DataError
from llmlab.data.packing import PackedRows
from llmlab.data.seeds import derive_seed

_READERS = {
    "stdlib": lambda cfg: stdlib.read(cfg.stdlib),
    "synthetic": lambda cfg: synthetic.read(cfg.synthetic),
    "files": lambda cfg: files.read(cfg.files, cfg.decode_errors),
    "prose": lambda cfg: prose.read(cfg),
}


def read_source(name: str, data_cfg):
  """The Documents of source `name` as configured in `data_cfg`."""
  if name not in _READERS:
    raise DataError(f"source {name!r} holds token ids, not documents")
  return _READERS[name](data_cfg)


class _Part:
  """One source of the mixture: its weight and tokenized splits."""

  def __init__(self, name, weight, docs, train, val):
    self.name, self.weight, self.docs = name, weight, docs
    self.train, self.val = train, val

  def info(self) -> dict:
    return {"name": self.name, "weight": self.weight,
            "fingerprint": self.docs.fingerprint, **self.docs.info,
            "train": self.train.info(), "val": self.val.info()}


class Data(StepBatches):
  """Batches for the train loop; see the package docstring for the layout."""

  def __init__(self, tokenizer, parts: list[_Part], *, seq_len: int,
               global_batch: int, seed: int, process_index: int,
               process_count: int, info: dict, read_options,
               unique_tokens: int = 0, domains=()):
    self._domains = list(domains)  # [(label, _Part)], evaluated alone
    super().__init__(tokenizer, seq_len=seq_len, global_batch=global_batch,
                     process_index=process_index, process_count=process_count,
                     read_options=read_options)
    self._parts = parts
    self._local, rows_per_epoch = self._train_dataset(seed, unique_tokens)
    self.info = {**info, "rows_per_epoch": rows_per_epoch}
    if unique_tokens:
      self.info["unique_tokens"] = self._seq_len * sum(rows_per_epoch.values())

  def _train_dataset(self, seed: int, unique_tokens: int):
    """(this process's batches as a grain MapDataset, rows per source)."""
    rows, rows_per_epoch = [], {}
    for part in self._parts:
      packed = PackedRows(part.train, self._seq_len,
                          derive_seed(seed, part.name, "documents"))
      keep = config_lib.unique_rows(unique_tokens, part.weight, len(packed),
                                    self._seq_len, part.name)
      rows_per_epoch[part.name] = keep
      fresh = grain.MapDataset.source(packed).shuffle(
          seed=derive_seed(seed, part.name, "rows"))
      rows.append(fresh.repeat() if keep == len(packed) else repeat_sample(
          fresh[:keep], derive_seed(seed, part.name, "epochs")))
    mixed = rows[0] if len(rows) == 1 else grain.MapDataset.mix(
        rows, [p.weight for p in self._parts])
    batched = mixed.batch(self._local_batch, drop_remainder=True)
    return (batched[self._process_index::self._process_count],
            rows_per_epoch)

  def _eval(self, eval_tokens: int, batch_size: int) -> list[dict]:
    weights = [p.weight for p in self._parts]
    rows = []
    for part, budget in zip(self._parts,
                            evaluation.budgets(weights, eval_tokens)):
      rows += evaluation.rows(part.name, part.val, self._seq_len, budget,
                              self.tokenizer.pad_id)
    return evaluation.batches(rows, batch_size, self.tokenizer.pad_id,
                              self._process_index, self._process_count)


  def domain_eval_batches(self, eval_tokens: int,
                          batch_size: int) -> dict[str, list[dict]]:
    """{label: batches} of each `data.domains` source alone: its own
    `eval_tokens` budget (evaluation.py), the same for every run."""
    out = {}
    for label, part in self._domains:
      key = ("domain", label, eval_tokens, batch_size)
      if key not in self._eval_memo:
        rows = evaluation.rows(part.name, part.val, self._seq_len,
                               eval_tokens, self.tokenizer.pad_id)
        self._eval_memo[key] = evaluation.batches(
            rows, batch_size, self.tokenizer.pad_id, self._process_index,
            self._process_count)
      out[label] = self._eval_memo[key]
    return out


def build(data_cfg, *, seq_len: int, global_batch: int, seed: int,
          process_index: int = 0, process_count: int = 1) -> Data:
  """Reads, splits and tokenizes the configured data; all checks happen here."""
  _check_shapes(seq_len, global_batch, process_index, process_count)
  unique = config_lib.unique_tokens(data_cfg, seq_len, global_batch)
  if _uses_store(data_cfg):  # rows read from a token store: token_data.py
    if config_lib.domains(data_cfg):
      raise DataError(f"data.domains={data_cfg.domains!r}: not supported "
                      "with a token store (data.source=tokens)")
    return token_data.build(data_cfg, seq_len=seq_len,
                            global_batch=global_batch, seed=seed,
                            process_index=process_index,
                            process_count=process_count,
                            read_options=_read_options(data_cfg),
                            unique_tokens=unique)
  cache_dir = corpus.default_cache_dir(str(data_cfg.cache_dir or ""))
  tokenizer = tokenizer_lib.load(str(data_cfg.tokenizer))
  val_fraction = float(data_cfg.val_fraction)
  parts = [_build_part(name, weight, data_cfg, tokenizer, val_fraction,
                       cache_dir, seq_len)
           for name, weight in config_lib.mixture(data_cfg)]
  info = _info(parts, tokenizer, val_fraction, seq_len)
  by_name = {p.name: p for p in parts}
  domains = [(label, by_name.get(name) or _build_part(
      name, 0.0, data_cfg, tokenizer, val_fraction, cache_dir, seq_len))
             for label, name in config_lib.domains(data_cfg)]
  if domains:
    info["domains"] = {label: {"source": p.name,
                               "fingerprint": p.docs.fingerprint,
                               "tokens_train": p.train.num_tokens,
                               "tokens_val": p.val.num_tokens}
                       for label, p in domains}
  read_options = _read_options(data_cfg)
  return Data(tokenizer, parts, seq_len=seq_len, global_batch=global_batch,
              seed=seed, process_index=process_index,
              process_count=process_count, info=info,
              read_options=read_options, unique_tokens=unique,
              domains=domains)


def _read_options(data_cfg) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(data_cfg.num_threads),
                           prefetch_buffer_size=int(data_cfg.prefetch))


def _uses_store(data_cfg) -> bool:
  """`data.source=tokens`: a token store, which carries its own mixture."""
  names = [name for name, _ in config_lib.mixture(data_cfg)]
  if "tokens" in names and len(names) > 1:
    raise DataError(f"data.mixture={data_cfg.mixture!r}: a token store "
                    "cannot be mixed with other sources; tokenize the "
                    "mixture into one store")
  return names == ["tokens"]


def _check_shapes(seq_len, global_batch, process_index, process_count):
  if seq_len < 2:
    raise DataError(f"seq_len={seq_len}: need at least 2 tokens per row")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in "
                    f"[0, process_count={process_count})")
  if global_batch < 1 or global_batch % process_count:
    raise DataError(f"global_batch={global_batch} must be a positive "
                    f"multiple of process_count={process_count}")


def _build_part(name, weight, data_cfg, tokenizer, val_fraction, cache_dir,
                seq_len) -> _Part:
  docs = read_source(name, data_cfg)
  train_texts, val_texts = documents.split(docs, val_fraction)
  key = f"{docs.fingerprint}|{val_fraction}"
  train = corpus.tokenize(train_texts, tokenizer, key + "|train", cache_dir)
  val = corpus.tokenize(val_texts, tokenizer, key + "|val", cache_dir)
  if train.num_tokens < seq_len:
    raise DataError(f"source {name!r}: training split has {train.num_tokens} "
                    f"tokens, less than one row of seq_len={seq_len}")
  if val.num_docs == 0:
    raise DataError(f"source {name!r}: every validation document is empty "
                    "after tokenization")
  return _Part(name, weight, docs, train, val)


def _info(parts: list[_Part], tokenizer, val_fraction, seq_len) -> dict:
  """JSON-able record of what the run trains and evaluates on."""
  sources = [p.info() for p in parts]
  identity = {"sources": [(p.name, p.weight, p.docs.fingerprint)
                          for p in parts],
              "tokenizer": tokenizer.fingerprint, "val_fraction": val_fraction}
  info = {
      "sources": sources,
      "fingerprint": hashlib.sha256(
          json.dumps(identity, sort_keys=True).encode()).hexdigest(),
      "tokenizer": tokenizer.info(),
      "val_fraction": val_fraction,
      "seq_len": seq_len,
      "docs_train": sum(p.train.num_docs for p in parts),
      "docs_val": sum(p.val.num_docs for p in parts),
      "bytes_train": sum(s["train"]["text_bytes"] for s in sources),
      "bytes_val": sum(s["val"]["text_bytes"] for s in sources),
      "tokens_train": sum(p.train.num_tokens for p in parts),
      "tokens_val": sum(p.val.num_tokens for p in parts),
      "packing": "documents as BOS..EOS in a seeded order cut into rows of "
                 "seq_len; a cut document continues in the next row with "
                 "positions restarting at 0",
  }
  if len(parts) == 1 and parts[0].name == "synthetic":
    per_symbol = parts[0].docs.info["entropy_rate_nats_per_symbol"]
    info["entropy_rate_nats"] = (per_symbol if tokenizer.kind == "byte"
                                 else None)
    info["entropy_rate_bits_per_byte"] = (
        parts[0].docs.info["entropy_rate_bits_per_byte"])
  return info
