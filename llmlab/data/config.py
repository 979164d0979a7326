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
                '' means $LLMLAB_CACHE_DIR or ~/.cache/llmlab/data.
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
  tokens.path   source 'tokens': URI (local or gs://) of a token store written
                by `llmlab tokenize` (token_store.py); rows are read by random
                access (token_data.py). The store fixes the mixture, split and
                tokenizer; data.tokenizer must be the store's.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from llmlab import config as config_lib
from llmlab.data.errors import DataError

SOURCES = ("stdlib", "synthetic", "files", "tokens")


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


def split_paths(paths) -> list[str]:
  """`files.paths` as a list: a comma-separated string or a sequence."""
  if isinstance(paths, str):
    return [p.strip() for p in paths.split(",") if p.strip()]
  return [str(p) for p in paths]
