"""usage: llmlab train --config=FILE.py[:ARG] --workdir=DIR
           [--config.KEY=VALUE ...]

Trains (or resumes) the run in DIR from the config; prints the summary as
one JSON line. Multi-process jobs pass --coordinator, --num_processes,
--process_id (or set LLMLAB_* env vars; on Cloud TPU and under SLURM
nothing is needed).
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common

CONFIG = cli_common.Config(lock=True)
SUMMARY_KEYS = ("step", "loss", "eval_loss", "eval_bpb", "tokens_per_s", "mfu",
                "params_nonembed", "wall_s")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Run directory (created, or resumed).",
                      flag_values=fv)
  cli_common.define_distributed(fv)


def body(fv: flags.FlagValues) -> dict | None:
  """The summary, printed by process 0 only (one line per job)."""
  cli_common.init_distributed(fv)
  from llmlab import distributed  # noqa: PLC0415 (jax; --help stays fast)
  from llmlab import train  # noqa: PLC0415
  summary = train.train(fv.config, fv.workdir)
  if not distributed.is_primary():
    return None
  return {k: summary[k] for k in SUMMARY_KEYS}


def main(argv: list[str]) -> int:
  """`llmlab train` (argv excludes the program and the command)."""
  return cli_common.run("train", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("workdir",))
