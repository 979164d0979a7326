"""What llmlab's commands share: log lines that show, the persistent
compilation cache, and (argparse subcommands: prune, convert, the studies)
the contract of one JSON summary line on success and one `PROG: error: ...`
line (exit 1) on bad input."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from typing import Any, Callable

from llmlab.runtime import setup_compile_cache, setup_logging


def setup(absl_level: int = logging.WARNING) -> None:
  """What every command sets up before work: logging, compilation cache."""
  setup_logging(absl_level)
  setup_compile_cache()


def load_config(spec: str):
  """`path.py[:arg]` -> the file's `get_config(arg)`, as absl's `--config`
  reads it (for the argparse commands: studies, prune, tokenizer)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config={spec!r}: no file {path}")
  mod_spec = importlib.util.spec_from_file_location("_llmlab_config", path)
  if mod_spec is None or mod_spec.loader is None:
    raise ValueError(f"--config={spec!r}: not a Python file")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise ValueError(f"--config={spec!r}: {path} defines no get_config(arg)")
  return mod.get_config(arg or None)


def print_summary(prog: str, run: Callable[[], Any]) -> int:
  """Runs `run()`; prints its result as one JSON line (exit code 0) or the
  input error it raised as one line on stderr (exit code 1)."""
  try:
    summary = run()
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary, default=str))
  return 0
