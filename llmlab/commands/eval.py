"""usage: llmlab eval --workdir=DIR [--step=N] [--quantize=int8]

Held-out loss and bits per byte of a run's checkpoint (default: the
latest), as one JSON line; with --quantize=int8 also those of its int8
weight-only quantized params.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Run directory.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).",
                       flag_values=fv)
  flags.DEFINE_enum("quantize", None, ["int8"],
                    "Weight-only quantization to evaluate.", flag_values=fv)
  cli_common.define_distributed(fv)


def body(fv: flags.FlagValues) -> dict:
  cli_common.init_distributed(fv)
  from llmlab import evaluate  # noqa: PLC0415 (jax; --help stays fast)
  return evaluate.evaluate_run(fv.workdir, fv.step, quantize=fv.quantize)


def main(argv: list[str]) -> int:
  """`llmlab eval` (argv excludes the program and the command)."""
  return cli_common.run("eval", argv, define, body, doc=__doc__,
                        required=("workdir",))
