"""`config.data`: every data key with its default, and parsing of the mixture.

Keys (all in `default_config()`):
  source        'stdlib' (default, no download) | 'synthetic' | 'files' |
                'tokens'.
  mixture       '' (use `source` alone) or weighted sources, overriding
                `source`: 'stdlib:0.7,files:0.3' or a list of 'name:weight'
                strings / (name, weight) pairs. Weights are normalised.
                Each name is a source above, configured by its sub-config.
  tokenizer     'byte' (256 bytes + BOS/EOS/PAD = 259 ids) | path to a Hugging
                Face `tokenizer.json` | path to a SentencePiece `.model`.
  val_fraction  share of documents held out for evaluation, chosen by a hash
                of each document's key (path, path#line, ...), not by seed.
  decode_errors 'files' source: what to do with bytes that are not UTF-8:
                'error' (DataError naming file and line), 'replace' (U+FFFD,
                documents counted in info) or 'skip' (document dropped and
                counted). The stdlib source always skips (see stdlib.py).
  cache_dir     where tokenized streams of non-byte tokenizers are cached;
                '' means $LLMLAB_CACHE_DIR or ~/.cache/llmlab/data. Local
                only: the cache is memory-mapped.
  prefetch      batches `train_iter` keeps ready in the background.
  num_threads   grain threads producing those batches.
  stdlib.max_file_bytes   larger stdlib files are skipped (counted).
  stdlib.include, stdlib.exclude   comma-separated fnmatch patterns on
                relative paths selecting a slice of the corpus ('' = all;
                see stdlib.py, e.g. `stdlib.TEST_PATTERNS`).
  files.paths   comma-separated list (or list) of paths/globs; local or any
                URI `etils.epath` opens. Format by suffix: .txt (one document
                per file), .jsonl / .jsonl.gz (one per line, `text_field`),
                .parquet (one per row, `column`), .array_record /
                .arrayrecord (one UTF-8 record per document).
  synthetic.*   the seeded sparse Markov source (see synthetic.py).
  unique_tokens 0 (default: no limit) or U > 0: train on only the first U
                tokens of the training stream, repeated for as many epochs as
                the run needs (the data-constrained regime of Muennighoff et
                al. 2023). Each source keeps the first floor(U w / seq_len)
                rows (w its mixture weight) of its shuffled training stream,
                i.e. exactly the rows a fresh run reads first (a uniform
                sample of the corpus's rows; another seed draws another),
                and reads them again epoch after epoch, each later epoch
                in an order seeded by (seed, epoch); order stays a pure
                function of (seed, step). Evaluation is unchanged. U must
                cover at least one global batch.
  prose.include, prose.exclude   source 'prose' (docstrings and comments
                of the stdlib files, prose.py): patterns as stdlib.*.
  domains       '' (off) or 'A=stdlib,B=prose': each named source is also
                evaluated alone at every eval (its whole `eval_tokens`
                budget from its own validation split), logged as
                eval_loss_A / eval/loss_A, eval_bpb_A, ...; a domain need
                not be in the mixture (a continual run on B still measures
                what it forgets of A).
  tokens.path   source 'tokens': URI (local or gs://) of a token store written
                by `llmlab tokenize` (token_store.py); rows are read by random
                access (token_data.py). The store fixes the mixture, split and
                tokenizer; data.tokenizer must be the store's.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from llmlab import config as config_lib
from llmlab.data.errors import DataError

SOURCES = ("stdlib", "synthetic", "files", "tokens", "prose")


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` group with all keys and their defaults (owned by
  llmlab/config.py, which holds every default)."""
  return config_lib.data_defaults()


def mixture(data_cfg) -> list[tuple[str, float]]:
  """[(source name, normalised weight)] from `mixture`, else `source`."""
  spec = data_cfg.get("mixture", "") or ""
  if not spec:
    return [(_check_name(data_cfg.source, "data.source"), 1.0)]
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  pairs = [_parse_item(item, spec) for item in items if item != ""]
  names = [name for name, _ in pairs]
  if len(set(names)) != len(names):
    raise DataError(f"data.mixture={spec!r}: a source appears twice")
  total = sum(w for _, w in pairs)
  return [(name, w / total) for name, w in pairs]


def domains(data_cfg) -> list[tuple[str, str]]:
  """[(label, source name)] of `domains` ('A=stdlib,B=prose'): sources also
  evaluated alone at every eval, whatever the mixture trains on."""
  spec = str(data_cfg.get("domains", "") or "")
  out = []
  for item in (i.strip() for i in spec.split(",") if i.strip()):
    label, sep, name = item.partition("=")
    label, name = label.strip(), name.strip()
    if not sep or not label.isidentifier():
      raise DataError(f"data.domains={spec!r}: item {item!r} is not "
                      "label=source (label: letters, digits, _)")
    if name == "tokens":
      raise DataError(f"data.domains={spec!r}: a token store cannot be a "
                      "domain")
    out.append((label, _check_name(name, "data.domains")))
  labels = [label for label, _ in out]
  if len(set(labels)) != len(labels):
    raise DataError(f"data.domains={spec!r}: a label appears twice")
  return out


def _parse_item(item: Any, spec: Any) -> tuple[str, float]:
  if isinstance(item, str):
    name, sep, weight = item.strip().partition(":")
    if not sep:
      raise DataError(f"data.mixture={spec!r}: item {item!r} is not "
                      "name:weight")
  else:
    try:
      name, weight = item
    except (TypeError, ValueError):
      raise DataError(f"data.mixture={spec!r}: item {item!r} is not "
                      "(name, weight)") from None
  try:
    w = float(weight)
  except ValueError:
    raise DataError(f"data.mixture={spec!r}: weight {weight!r} of {name!r} "
                    "is not a number") from None
  if not w > 0:
    raise DataError(f"data.mixture={spec!r}: weight of {name!r} must be > 0")
  return _check_name(name.strip(), "data.mixture"), w


def _check_name(name: str, key: str) -> str:
  if name not in SOURCES:
    raise DataError(f"{key}: unknown source {name!r}; known: {SOURCES}")
  return name


def unique_tokens(data_cfg, seq_len: int, global_batch: int) -> int:
  """`data.unique_tokens`, checked against the batch shape (0 = no limit)."""
  u = data_cfg.get("unique_tokens", 0)
  if isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 0:
    raise DataError(f"data.unique_tokens={u!r}: must be an integer >= 0 "
                    "(0 = no limit)")
  if 0 < u < global_batch * seq_len:
    raise DataError(f"data.unique_tokens={u}: less than one global batch "
                    f"({global_batch} rows x seq_len={seq_len} = "
                    f"{global_batch * seq_len} tokens)")
  return int(u)


def unique_rows(u: int, weight: float, rows: int, seq_len: int,
                name: str) -> int:
  """How many leading rows of source `name`'s training stream (`rows` in
  all) training repeats: all of them when u == 0."""
  if not u:
    return rows
  keep = int(u * weight) // seq_len
  if keep < 1:
    raise DataError(f"data.unique_tokens={u}: source {name!r} (weight "
                    f"{weight:.3g}) gets less than one row of "
                    f"seq_len={seq_len}")
  if keep > rows:
    raise DataError(f"data.unique_tokens={u}: source {name!r} has only "
                    f"{rows * seq_len} training tokens in full rows of "
                    f"seq_len={seq_len}, fewer than its share "
                    f"{keep * seq_len}; lower data.unique_tokens or use 0 "
                    "(no limit)")
  return keep


def split_paths(paths) -> list[str]:
  """`files.paths` as a list: a comma-separated string or a sequence."""
  if isinstance(paths, str):
    return [p.strip() for p in paths.split(",") if p.strip()]
  return [str(p) for p in paths]
