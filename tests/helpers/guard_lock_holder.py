"""Holds a workdir's llmlab lock the way a running `llmlab train` does, for
tests/test_guardrails.py (starts in well under a second: no JAX).

  guard_lock_holder.py WORKDIR   lock WORKDIR, print "locked PID", then wait
                                 until stdin closes (or SIGKILL)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from llmlab import workdir_lock  # noqa: E402

with workdir_lock.Lock(sys.argv[1]):
  print(f"locked {os.getpid()}", flush=True)
  sys.stdin.read()
