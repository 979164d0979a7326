"""usage: llmlab continual [--config=FILE.py[:ARG]] --workdir=DIR
           [--config.KEY=VALUE ...]

Continual learning after compression (llmlab/studies/continual.py): sources
trained on domain A, pruned / re-initialised / continued on domain B with a
replay ratio of A, against scratch; continual-learning laws fitted and
checked on the largest source; the replay ratio for a forgetting budget
predicted, then measured. Prints DIR/report.md (also DIR/study.json,
DIR/records.csv). Re-running resumes. Default config:
configs/continual_quick.py.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common

CONFIG = cli_common.Config(default="configs/continual_quick.py",
                           example="continue_steps=200")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Study directory.", flag_values=fv)


def body(fv: flags.FlagValues) -> None:
  from llmlab.studies import continual  # noqa: PLC0415 (jax)
  from llmlab.studies import continual_report  # noqa: PLC0415
  print(continual_report.markdown(continual.run(fv.config, fv.workdir)))


def main(argv: list[str]) -> int:
  """`llmlab continual` (argv excludes the program and the command)."""
  return cli_common.run("continual", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("workdir",))
