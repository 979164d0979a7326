"""`llmlab tokenize`: write a config's data as a token store, once, in
parallel, so training reads rows by random access instead of holding the
corpus in memory (layout and checks: llmlab/data/token_store.py).

    llmlab tokenize --config=CONFIG.py[:arg] --out=DIR_OR_GS_URI \\
        [--workers=N] [--shard_mb=16] [--config.data.KEY=VALUE ...]

then train with `--config.data.source=tokens --config.data.tokens.path=URI`.
A killed run re-run with the same arguments keeps its finished units; an
`--out` that holds anything else is refused, nothing overwritten.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from llmlab import config as config_lib
from llmlab import runtime
from llmlab.data import token_store

USAGE = ("usage: llmlab tokenize --config=FILE.py[:arg] --out=URI "
         "[--workers=N] [--shard_mb=16] [--config.data.KEY=VALUE ...]")


def _flags():
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file (.py[:arg]); "
                                  "its .data is tokenized.", flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Store directory (local or gs://).",
                      flag_values=fv)
  flags.DEFINE_integer("workers", _cpus(), "Tokenizer processes.",
                       flag_values=fv)
  flags.DEFINE_float("shard_mb", 16.0, "Text per unit of work (MB).",
                     flag_values=fv)
  return fv


def _cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def main(argv) -> int:
  """`llmlab tokenize` (argv excludes the program and subcommand)."""
  fv = _flags()
  try:
    fv(["llmlab tokenize"] + list(argv))
  except flags.Error as e:
    print(f"llmlab tokenize: {e}\n{USAGE}", file=sys.stderr)
    return 2
  missing = [n for n in ("config", "out") if fv[n].value is None]
  if missing:
    print("llmlab tokenize: missing " + ", ".join(f"--{n}" for n in missing)
          + "\n" + USAGE, file=sys.stderr)
    return 2
  runtime.setup_logging()
  try:
    cfg = config_lib.merge_defaults(fv.config)
    summary = token_store.write_store(cfg.data, fv.out, workers=fv.workers,
                                      shard_mb=fv.shard_mb)
  except ValueError as e:  # DataError, ConfigError
    print(f"llmlab tokenize: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
