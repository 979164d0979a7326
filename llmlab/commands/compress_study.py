"""usage: llmlab compress-study [--config=FILE.py[:ARG]] --workdir=DIR
           [--config.KEY=VALUE ...]

Continual-learning scaling after compression (llmlab/compress/experiment.py):
prune a trained model by each method, keep training, compare with training
the small shape from scratch. Prints the table (DIR/table.md; also
DIR/compress.json, DIR/report.md). Re-running resumes. Default config:
configs/compress_quick.py.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common

CONFIG = cli_common.Config(default="configs/compress_quick.py",
                           example="learned.steps=100")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Study directory.", flag_values=fv)


def body(fv: flags.FlagValues) -> None:
  from llmlab.compress import experiment  # noqa: PLC0415 (jax)
  from llmlab.compress import report  # noqa: PLC0415
  print(report.markdown_table(experiment.run(fv.config, fv.workdir)))


def main(argv: list[str]) -> int:
  """`llmlab compress-study` (argv excludes the program and the command)."""
  return cli_common.run("compress-study", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("workdir",))
