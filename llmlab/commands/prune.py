"""usage: llmlab prune --from=RUN[:STEP] --to_config=FILE.py[:ARG] --workdir=OUT
        [--method=magnitude|activation|learned] [--to_config.KEY=VALUE ...]
        [--calib_rows=N]                                   (activation)
        [--mask_steps=200 --mask_lr=0.1 --lambda_lr=0.3 --constrain_size
         --mask_batch_size=0 --learning_rate=1e-3 --target_warmup=0.5]
                                                           (learned)

A smaller run directory initialised from a trained run. The target config
is a full training config (its model block gives the target shape;
`llmlab train --config=<it> --config.init_from=OUT` continues training).
Prints one JSON summary line.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common
from llmlab.compress import learned as learned_lib
from llmlab.compress import prune as prune_lib

CONFIG = cli_common.Config(name="to_config",
                           help="Target training config, FILE.py[:ARG].")


def define(fv: flags.FlagValues) -> None:
  d = learned_lib.Settings()
  flags.DEFINE_string("from", None, "Trained run directory, DIR or DIR:STEP.",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory to write.",
                      flag_values=fv)
  flags.DEFINE_enum("method", "magnitude", prune_lib.METHODS,
                    "What decides which units go.", flag_values=fv)
  flags.DEFINE_integer("calib_rows", 0, "activation: calibration rows (0 = "
                       "the source's train.batch_size).", flag_values=fv)
  flags.DEFINE_integer("mask_steps", d.steps, "learned: mask training steps.",
                       flag_values=fv)
  flags.DEFINE_float("mask_lr", d.mask_lr, "learned: masks' learning rate.",
                     flag_values=fv)
  flags.DEFINE_float("lambda_lr", d.lambda_lr, "learned: multipliers' "
                     "learning rate.", flag_values=fv)
  flags.DEFINE_integer("mask_batch_size", d.batch_size, "learned: 0 = the "
                       "source's train.batch_size.", flag_values=fv)
  flags.DEFINE_float("learning_rate", d.learning_rate, "learned: weights' "
                     "learning rate while masks train.", flag_values=fv)
  flags.DEFINE_float("target_warmup", d.target_warmup, "learned: fraction of "
                     "steps to move the targets.", flag_values=fv)
  flags.DEFINE_bool("constrain_size", False, "learned: also constrain the "
                    "expected param count.", flag_values=fv)
  flags.DEFINE_integer("seed", d.seed, "learned: seed.", flag_values=fv)


def settings(fv: flags.FlagValues) -> learned_lib.Settings:
  """The learned method's settings from the flags."""
  return learned_lib.Settings(
      steps=fv.mask_steps, batch_size=fv.mask_batch_size,
      learning_rate=fv.learning_rate, mask_lr=fv.mask_lr,
      lambda_lr=fv.lambda_lr, target_warmup=fv.target_warmup,
      constrain_size=fv.constrain_size, seed=fv.seed)


def body(fv: flags.FlagValues) -> dict:
  return prune_lib.prune(
      fv["from"].value, fv.to_config, fv.workdir, fv.method,
      calib_rows=fv.calib_rows,
      learned=settings(fv) if fv.method == "learned" else None)


def main(argv: list[str]) -> int:
  """`llmlab prune` (argv excludes the program and the command)."""
  return cli_common.run("prune", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("from", "workdir"))
