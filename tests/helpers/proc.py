"""Plain-Python stand-ins for the processes of a launch/local.py job (no JAX: starts in milliseconds).

  proc.py echo          print the env wiring to stdout and a line to stderr, exit 0
  proc.py fail DIR      p0 exits 3 once p1 is ready; p1 ignores SIGTERM and sleeps forever
  proc.py sleep DIR     every process records its pid in DIR, then sleeps forever
"""

import os
import pathlib
import signal
import sys
import time

mode = sys.argv[1]
index = int(os.environ["LLMLAB_PROCESS_ID"])
if mode == "echo":
  print("coordinator", os.environ["LLMLAB_COORDINATOR"], "n", os.environ["LLMLAB_NUM_PROCESSES"])
  print("xla_flags", os.environ.get("XLA_FLAGS", ""), "platforms", os.environ.get("JAX_PLATFORMS", ""))
  print(f"to stderr from {index}", file=sys.stderr)
elif mode == "fail":
  ready = pathlib.Path(sys.argv[2]) / "p1.ready"
  if index == 0:
    while not ready.exists():
      time.sleep(0.01)
    sys.exit(3)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL can stop it
  ready.write_text(str(os.getpid()))
  time.sleep(3600)
elif mode == "sleep":
  (pathlib.Path(sys.argv[2]) / f"p{index}.pid").write_text(str(os.getpid()))
  time.sleep(3600)
else:
  sys.exit(f"unknown mode {mode!r}")
