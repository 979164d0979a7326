"""usage: llmlab sweep --workdir=RUN [--workdir=RUN2 ...] --out=records.csv
           [--eval_tokens=N]

Evaluates every saved checkpoint of the runs on one held-out set: one CSV
row per checkpoint (run, step, params, params_nonembed, tokens, flops,
loss, bpb, model shape; llmlab/scaling/sweep.py). Incremental: rows
already in the CSV are skipped, so it can run while training continues.
Prints the number of rows.
"""

from __future__ import annotations

import sys

from absl import flags

from llmlab import cli_common
from llmlab import errors
from llmlab import storage


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_multi_string("workdir", None, "Run directory (repeat for "
                            "several runs).", flag_values=fv)
  flags.DEFINE_string("out", None, "Records CSV (appended).", flag_values=fv)
  flags.DEFINE_integer("eval_tokens", None, "Held-out tokens per checkpoint "
                       "(default: the first run's train.eval_tokens).",
                       flag_values=fv)


def body(fv: flags.FlagValues) -> None:
  for w in fv.workdir:
    if not storage.exists(storage.join(w, "config.json")):
      raise errors.NotFound(f"{w}: not a run directory (no config.json)")
  from llmlab.scaling import sweep  # noqa: PLC0415 (jax; --help stays fast)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  rows = sweep.sweep(fv.workdir, fv.out, fv.eval_tokens, log=log)
  print(f"{len(rows)} rows in {fv.out}")


def main(argv: list[str]) -> int:
  """`llmlab sweep` (argv excludes the program and the command)."""
  return cli_common.run("sweep", argv, define, body, doc=__doc__,
                        required=("workdir", "out"))
