"""usage: llmlab tokenize --config=FILE.py[:ARG] --out=DIR_OR_GS_URI
           [--workers=N] [--shard_mb=16] [--config.KEY=VALUE ...]

Writes a config's data as a token store, once, in parallel, so training
reads rows by random access instead of holding the corpus in memory
(layout and checks: llmlab/data/token_store.py); then train with
`--config.data.source=tokens --config.data.tokens.path=URI`. A killed run
re-run with the same arguments keeps its finished units; an `--out` that
holds anything else is refused, nothing overwritten. Prints one JSON
summary line.
"""

from __future__ import annotations

import os

from absl import flags

from llmlab import cli_common
from llmlab import config as config_lib

CONFIG = cli_common.Config(example="data.source=files")


def _cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("out", None, "Store directory (local or gs://).",
                      flag_values=fv)
  flags.DEFINE_integer("workers", _cpus(), "Tokenizer processes.",
                       flag_values=fv)
  flags.DEFINE_float("shard_mb", 16.0, "Text per unit of work (MB).",
                     flag_values=fv)


def body(fv: flags.FlagValues) -> dict:
  from llmlab.data import token_store  # noqa: PLC0415 (grain, tensorstore)
  cfg = config_lib.merge_defaults(fv.config)
  return token_store.write_store(cfg.data, fv.out, workers=fv.workers,
                                 shard_mb=fv.shard_mb)


def main(argv: list[str]) -> int:
  """`llmlab tokenize` (argv excludes the program and the command)."""
  return cli_common.run("tokenize", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("out",))
