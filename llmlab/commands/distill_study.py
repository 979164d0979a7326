"""usage: llmlab distill-study [--config=FILE.py[:ARG]] --workdir=DIR
           [--config.KEY=VALUE ...]

The distillation experiment (llmlab/studies/distill.py): a teacher, then
students at equal tokens (next-token, online and offline distillation).
Prints the results table (also DIR/table.md; DIR/results.json). Re-running
resumes. Default config: configs/distill_quick.py.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common

CONFIG = cli_common.Config(default="configs/distill_quick.py",
                           example="student.train.steps=200")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Study directory.", flag_values=fv)


def body(fv: flags.FlagValues) -> None:
  from llmlab.studies import distill  # noqa: PLC0415 (jax)
  results = distill.run(fv.config, fv.workdir)
  print(distill.markdown_table(results, fv.config))


def main(argv: list[str]) -> int:
  """`llmlab distill-study` (argv excludes the program and the command)."""
  return cli_common.run("distill-study", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("workdir",))
