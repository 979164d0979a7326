"""usage: llmlab repeat-study [--config=FILE.py[:ARG]] --workdir=DIR
           [--config.KEY=VALUE ...]

Scaling under repeated data (llmlab/studies/repeat.py): family sizes trained
on fresh data and on U unique tokens repeated up to 32 times, repetition
laws fitted and scored on a held-out larger model. Prints the laws' table
(DIR/report.md; also DIR/study.json, DIR/records.csv). Re-running resumes.
Default config: configs/study_repeat.py.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common

CONFIG = cli_common.Config(default="configs/study_repeat.py",
                           example="steps=256")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Study directory.", flag_values=fv)


def body(fv: flags.FlagValues) -> None:
  from llmlab.studies import repeat  # noqa: PLC0415 (jax)
  from llmlab.studies import repeat_report  # noqa: PLC0415
  result = repeat.run(fv.config, fv.workdir)
  print(repeat_report.markdown(result))


def main(argv: list[str]) -> int:
  """`llmlab repeat-study` (argv excludes the program and the command)."""
  return cli_common.run("repeat-study", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("workdir",))
