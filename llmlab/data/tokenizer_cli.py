"""`llmlab tokenizer train`: fit a byte-level BPE tokenizer.json offline.

Trains on the *training* documents of the configured source (validation
documents are left out, so held-out numbers stay held out; a mixture uses
all its sources, unweighted) with the
`tokenizers` library: byte-level pre-tokenization (every string encodes, and
decoding is lossless), special tokens <pad>, <bos>, <eos> (ids 0, 1, 2) that
`llmlab.data.tokenizer` recognises. Options override `--config`'s
`config.data` (a Python file with `get_config()`), else the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmlab.data import config as config_lib
from llmlab.data import documents
from llmlab.data import pipeline
from llmlab.data.errors import DataError

SPECIALS = ("<pad>", "<bos>", "<eos>")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="llmlab tokenizer train",
                              description=__doc__.splitlines()[0])
  p.add_argument("--config", default="",
                 help="FILE.py[:ARG], a config with get_config(ARG); uses "
                      "its .data")
  p.add_argument("--source", choices=config_lib.SOURCES, default=None)
  p.add_argument("--paths", default=None, help="files source: paths/globs")
  p.add_argument("--text_field", default=None)
  p.add_argument("--column", default=None)
  p.add_argument("--vocab_size", type=int, default=4096)
  p.add_argument("--min_frequency", type=int, default=2)
  p.add_argument("--out", required=True, help="where to write tokenizer.json")
  return p


def _data_config(args):
  cfg = config_lib.default_config()
  if args.config:
    loaded = _load_config(args.config)
    cfg.update(loaded.data if "data" in loaded else loaded)
  if args.source:
    cfg.source, cfg.mixture = args.source, ""
  if args.paths is not None:
    cfg.files.paths = args.paths
  if args.text_field is not None:
    cfg.files.text_field = args.text_field
  if args.column is not None:
    cfg.files.column = args.column
  return cfg


def _load_config(flag: str):
  from llmlab import cli_common
  try:
    return cli_common.load_config(flag)
  except (FileNotFoundError, ValueError) as e:
    raise DataError(str(e)) from None


def train(texts: list[str], vocab_size: int, min_frequency: int = 2):
  """A byte-level BPE `tokenizers.Tokenizer` fitted on `texts`."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  pre_tokenizers = hf.pre_tokenizers
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=list(SPECIALS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return tok


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  try:
    cfg = _data_config(args)
    if args.vocab_size < 256 + len(SPECIALS):
      raise DataError(f"--vocab_size={args.vocab_size}: need at least "
                      f"{256 + len(SPECIALS)} (bytes + specials)")
    texts, sources = [], {}
    for name, _ in config_lib.mixture(cfg):
      docs = pipeline.read_source(name, cfg)
      texts += documents.split(docs, float(cfg.val_fraction))[0]
      sources[name] = docs.fingerprint
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tok = train(texts, args.vocab_size, args.min_frequency)
  tok.save(args.out)
  print(json.dumps({"out": args.out, "sources": sources,
                    "train_docs": len(texts),
                    "vocab_size": tok.get_vocab_size()}))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
