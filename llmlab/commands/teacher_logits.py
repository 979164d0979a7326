"""usage: llmlab teacher-logits --teacher=DIR[:STEP] --config=STUDENT_CONFIG
           --out=PATH [--top_k=16] [--chunk_steps=100] [--steps=N]
           [--config.KEY=VALUE ...]

Stores a teacher's top-k for a student config's batches
(llmlab/teacher_logits.py holds the writer and the layout); prints one JSON
summary line.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common

CONFIG = cli_common.Config(lock=True, help="Student config (.py[:arg]).")


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("teacher", None, "Teacher run DIR[:STEP].",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory of the store.",
                      flag_values=fv)
  flags.DEFINE_integer("top_k", 16, "Teacher tokens kept per position.",
                       flag_values=fv)
  flags.DEFINE_integer("chunk_steps", 100, "Steps per shard file.",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 0, "Steps to store (0 = config.train.steps).",
                       flag_values=fv)


def body(fv: flags.FlagValues) -> dict:
  from llmlab.teacher_logits import write  # noqa: PLC0415 (jax)
  return write(fv.teacher, fv.config, fv.out, fv.top_k, fv.chunk_steps,
               fv.steps)


def main(argv) -> int:
  """`llmlab teacher-logits` (argv excludes the program and subcommand)."""
  return cli_common.run("teacher-logits", argv, define, body, doc=__doc__,
                        config=CONFIG, required=("teacher", "out"))
