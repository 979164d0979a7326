"""The body of a `tests.helpers.Devices` process: N simulated CPU devices
(XLA_FLAGS set before jax starts) running test checks on request, so the
whole session's multi-device checks share one jax start-up.

Usage: python tests/helpers/device_server.py N
  stdin:  one JSON request a line, {"fn": "module:function", "args": [...],
          "kwargs": {...}}
  stdout: one JSON reply a line, {"ok": RESULT} or {"error": TRACEBACK}
Anything else the checks print goes to stderr (fd 1 is pointed there).
"""

import json
import os
import sys
import traceback

N = int(sys.argv[1])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={N}")
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import importlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llmlab import runtime  # noqa: E402


def _jsonable(x):
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def main():
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # prints from a check (Python or C) go to stderr
  sys.stdout = sys.stderr
  runtime.setup_compile_cache()  # the session's, as in the test process
  assert len(jax.devices()) == N, jax.devices()
  for line in sys.stdin:
    request = json.loads(line)
    try:
      module, name = request["fn"].split(":")
      fn = getattr(importlib.import_module(module), name)
      reply = {"ok": fn(*request.get("args", ()), **request.get("kwargs", {}))}
      text = json.dumps(reply, default=_jsonable)
    except Exception:  # pylint: disable=broad-except  # the test reports it
      text = json.dumps({"error": traceback.format_exc()})
    replies.write(text + "\n")
    replies.flush()


if __name__ == "__main__":
  main()
