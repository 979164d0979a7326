"""usage: llmlab overtrain [--config=FILE.py[:ARG]] --workdir=DIR
           [--pretrain_run=RUN] [--config.KEY=VALUE ...]

How fine-tunability changes along one pretraining run (Springer et al.
2025; llmlab/studies/overtrain.py has the method). Prints the per-checkpoint
table and the time spent; DIR/overtrain.json holds everything. Re-running
resumes. Default config: configs/overtrain_quick.py.
"""

from __future__ import annotations

import logging

from absl import flags

from llmlab import cli_common

CONFIG = cli_common.Config(default="configs/overtrain_quick.py",
                           example="finetune.steps=64")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Study directory.", flag_values=fv)
  flags.DEFINE_string("pretrain_run", None, "An existing run with sweep "
                      "checkpoints (instead of training the config's "
                      "`pretrain`); the same as --config.pretrain_run.",
                      flag_values=fv)


def body(fv: flags.FlagValues) -> None:
  from llmlab.studies import overtrain  # noqa: PLC0415 (jax)
  from llmlab.studies import overtrain_report  # noqa: PLC0415
  scfg = fv.config
  if fv.pretrain_run:
    scfg.pretrain_run = fv.pretrain_run
  result = overtrain.run(scfg, fv.workdir)
  print(overtrain_report.table(result))
  print(_timing(result["timing_this_invocation"]))


def _timing(t: dict) -> str:
  return (f"\ntime: {t['total_s']:.0f} s (pretrain {t['pretrain_s']:.0f}, "
          f"fine-tune {t['finetune_s']:.0f}, eval {t['eval_s']:.0f}, "
          f"sensitivity {t['sensitivity_s']:.0f}); per step: pretrain "
          f"{t['pretrain_step_s'] or float('nan'):.4f} s, fine-tune "
          f"{t['finetune_step_s'] or float('nan'):.4f} s")


def main(argv: list[str]) -> int:
  """`llmlab overtrain` (argv excludes the program and the command). Its
  absl logging is quieter: orbax warns through absl each time a checkpoint
  is opened read-only."""
  return cli_common.run("overtrain", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("workdir",),
                        absl_level=logging.ERROR)
