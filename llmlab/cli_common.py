"""What the argparse subcommands (prune, convert, the studies) share: log
lines that show, and the contract of one JSON summary line on success and
one `PROG: error: ...` line (exit 1) on bad input."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable


def setup_logging(absl_level: int = logging.WARNING) -> None:
  """Timestamped INFO lines on stderr. `force`, because importing orbax
  already gave the root logger a WARNING handler, which would make a plain
  `basicConfig` a no-op and silence every progress line."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  logging.getLogger("absl").setLevel(absl_level)
  logging.getLogger("llmlab").setLevel(logging.INFO)


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
