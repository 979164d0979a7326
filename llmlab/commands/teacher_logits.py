"""`llmlab teacher-logits`: store a teacher's top-k for a student config's
batches (llmlab/teacher_logits.py holds the writer and the layout).

    llmlab teacher-logits --teacher=DIR[:STEP] --config=STUDENT_CONFIG \\
        --out=PATH [--top_k=16] [--chunk_steps=100] [--steps=N]
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from llmlab.teacher_logits import write


def main(argv) -> int:
  """`llmlab teacher-logits` (argv excludes the program and subcommand)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Student config (.py[:arg])",
                                  flag_values=fv, lock_config=True)
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
  try:
    fv(["llmlab teacher-logits"] + list(argv))
  except flags.Error as e:
    print(f"llmlab teacher-logits: {e}", file=sys.stderr)
    return 2
  missing = [n for n in ("config", "teacher", "out") if fv[n].value is None]
  if missing:
    print("llmlab teacher-logits: missing " +
          ", ".join(f"--{n}" for n in missing) + "\nusage: llmlab "
          "teacher-logits --teacher=DIR[:STEP] --config=FILE.py[:arg] "
          "--out=PATH [--top_k=16 --chunk_steps=100 --steps=N]",
          file=sys.stderr)
    return 2
  try:
    summary = write(fv.teacher, fv.config, fv.out, fv.top_k, fv.chunk_steps,
                    fv.steps)
  except (ValueError, OSError) as e:  # ConfigError, DataError, bad paths
    print(f"llmlab teacher-logits: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary))
  return 0
