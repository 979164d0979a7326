"""usage: llmlab tokenizer train --out=tokenizer.json [--config=FILE.py[:ARG]]
           [--config.KEY=VALUE ...] [--source=stdlib|synthetic|files]
           [--paths=GLOBS] [--text_field=F] [--column=C] [--vocab_size=4096]
           [--min_frequency=2]

Fits a byte-level BPE tokenizer.json offline on the *training* documents
of the configured source (llmlab/data/tokenizer_cli.py). The data config
is --config's `config.data` (or the config itself if it has no `data`),
else the defaults; --source, --paths, --text_field and --column override
it. Prints one JSON summary line.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common
from llmlab.data import config as data_config
from llmlab.data.errors import DataError

CONFIG = cli_common.Config(required=False, help="A config with "
                           "get_config(ARG), FILE.py[:ARG]; uses its .data.",
                           example="data.source=files")
SUBCOMMANDS = ("train",)


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_enum("source", None, data_config.SOURCES, "Data source.",
                    flag_values=fv)
  flags.DEFINE_string("paths", None, "files source: paths/globs.",
                      flag_values=fv)
  flags.DEFINE_string("text_field", None, "files source: JSONL text field.",
                      flag_values=fv)
  flags.DEFINE_string("column", None, "files source: Parquet column.",
                      flag_values=fv)
  flags.DEFINE_integer("vocab_size", 4096, "Tokens in the vocabulary.",
                       flag_values=fv)
  flags.DEFINE_integer("min_frequency", 2, "Fewest occurrences of a merge.",
                       flag_values=fv)
  flags.DEFINE_string("out", None, "Where to write tokenizer.json.",
                      flag_values=fv)


def data_config_of(fv: flags.FlagValues):
  """The data config: defaults, updated by --config's, then the flags."""
  cfg = data_config.default_config()
  if fv.config is not None:
    cfg.update(fv.config.data if "data" in fv.config else fv.config)
  if fv.source:
    cfg.source, cfg.mixture = fv.source, ""
  if fv.paths is not None:
    cfg.files.paths = fv.paths
  if fv.text_field is not None:
    cfg.files.text_field = fv.text_field
  if fv.column is not None:
    cfg.files.column = fv.column
  return cfg


def train(fv: flags.FlagValues) -> dict:
  """`llmlab tokenizer train`: the tokenizer, written to --out."""
  from llmlab.data import documents  # noqa: PLC0415
  from llmlab.data import pipeline  # noqa: PLC0415
  from llmlab.data import tokenizer_cli  # noqa: PLC0415
  cfg = data_config_of(fv)
  minimum = 256 + len(tokenizer_cli.SPECIALS)
  if fv.vocab_size < minimum:
    raise DataError(f"--vocab_size={fv.vocab_size}: need at least "
                    f"{minimum} (bytes + specials)")
  texts, sources = [], {}
  for name, _ in data_config.mixture(cfg):
    docs = pipeline.read_source(name, cfg)
    texts += documents.split(docs, float(cfg.val_fraction))[0]
    sources[name] = docs.fingerprint
  tok = tokenizer_cli.train(texts, fv.vocab_size, fv.min_frequency)
  tok.save(fv.out)
  return {"out": fv.out, "sources": sources, "train_docs": len(texts),
          "vocab_size": tok.get_vocab_size()}


def main(argv: list[str]) -> int:
  """`llmlab tokenizer SUBCOMMAND` (argv excludes the program and the
  command); `train` is the only subcommand."""
  argv = list(argv)
  if argv and argv[0] in SUBCOMMANDS:
    return cli_common.run("tokenizer train", argv[1:], define, train,
                          doc=__doc__, config=CONFIG, required=("out",))
  if argv and argv[0] in cli_common.HELP_ARGS:
    return main(["train", "--help"])
  what = f"unknown subcommand {argv[0]!r}" if argv else "missing subcommand"
  return cli_common.guarded("llmlab tokenizer", False, lambda: _usage(what))


def _usage(what: str):
  raise cli_common.UsageError(f"{what}; usage: llmlab tokenizer train "
                              "--out=tokenizer.json [flags] (llmlab "
                              "tokenizer train --help)")
