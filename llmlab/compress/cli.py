"""`llmlab prune`: a smaller run directory initialised from a trained run.

    llmlab prune --from=RUN[:STEP] --to_config=configs/target.py[:variant] \
        --workdir=OUT [--method=magnitude|activation|learned]
        [--calib_rows=N]                                   (activation)
        [--mask_steps=200 --mask_lr=0.1 --lambda_lr=0.3 --constrain_size
         --mask_batch_size=0 --learning_rate=1e-3 --target_warmup=0.5]
                                                           (learned)

The target config is a full training config (its model block gives the
target shape; `llmlab train --config=<it> --config.init_from=OUT` continues
training). Prints one JSON summary; bad input exits 1 with the message.
"""

from __future__ import annotations

import argparse
import sys

from llmlab import cli_common
from llmlab.compress import learned as learned_lib
from llmlab.compress import prune as prune_lib


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="llmlab prune", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from", dest="source", required=True,
                 help="trained run directory, DIR or DIR:STEP")
  p.add_argument("--to_config", required=True,
                 help="target training config, FILE.py[:arg]")
  p.add_argument("--workdir", required=True, help="run directory to write")
  p.add_argument("--method", default="magnitude", choices=prune_lib.METHODS)
  p.add_argument("--calib_rows", type=int, default=0,
                 help="activation: calibration rows (0 = the source's "
                      "train.batch_size)")
  d = learned_lib.Settings()
  p.add_argument("--mask_steps", type=int, default=d.steps)
  p.add_argument("--mask_lr", type=float, default=d.mask_lr)
  p.add_argument("--lambda_lr", type=float, default=d.lambda_lr)
  p.add_argument("--mask_batch_size", type=int, default=d.batch_size,
                 help="0 = the source's train.batch_size")
  p.add_argument("--learning_rate", type=float, default=d.learning_rate,
                 help="learned: weights' learning rate while masks train")
  p.add_argument("--target_warmup", type=float, default=d.target_warmup)
  p.add_argument("--constrain_size", action="store_true",
                 help="learned: also constrain the expected param count")
  p.add_argument("--seed", type=int, default=d.seed)
  return p


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  cli_common.setup()
  settings = learned_lib.Settings(
      steps=args.mask_steps, batch_size=args.mask_batch_size,
      learning_rate=args.learning_rate, mask_lr=args.mask_lr,
      lambda_lr=args.lambda_lr, target_warmup=args.target_warmup,
      constrain_size=args.constrain_size, seed=args.seed)
  return cli_common.print_summary("llmlab prune", lambda: prune_lib.prune(
      args.source, cli_common.load_config(args.to_config), args.workdir,
      args.method, calib_rows=args.calib_rows,
      learned=settings if args.method == "learned" else None))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
