"""Shared test fixtures. Tests run on CPU; multi-device checks run in the
session's `devices` processes (XLA_FLAGS=--xla_force_host_platform_device_count
set there before jax starts)."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests check numbers, not speed: XLA:CPU's LLVM at -O0 compiles the suite's
# many small models ~30% faster (the fitters' long loops run slower; the
# suite as a whole ~5% faster). The suite passes at either level; commands
# and checks the tests start inherit the flag; the benchmarks do not set it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
# One persistent compilation cache for the whole session (commands started
# by tests inherit it), empty at the start so every run of the suite
# compiles each program once, and nothing is written to ~/.cache.
# Every compile is kept (not only those over 0.5 s): tests re-run the same
# small steps in-process and in subprocesses. Under pytest-xdist (`-n auto`)
# the controller sets it before starting its workers, so they share it too.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "LLMLAB_COMPILE_CACHE" not in os.environ:
  os.environ["LLMLAB_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="llmlab-xla-")
  atexit.register(shutil.rmtree, os.environ["LLMLAB_COMPILE_CACHE"], True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from llmlab import runtime  # noqa: E402

runtime.setup_compile_cache()  # in-process tests share it too


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_stall_memory():
  """A storage stall a test provoked is not remembered by the next test
  (storage.stalled() makes remote calls fail at once for a while)."""
  yield
  from llmlab import storage
  storage._STALLED.clear()  # pylint: disable=protected-access


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A real GCS server (fake-gcs-server) on 127.0.0.1 for the session;
  clients in this process and in commands it starts reach it (tests/gcs.py)."""
  from tests import gcs as gcs_lib
  server = gcs_lib.Server(str(tmp_path_factory.mktemp("gcs") / "root"))
  server.start()
  yield server
  server.stop()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A finished run, trained once per session in process: `llmlab train
  --config=configs/tiny.py:smoke` for 30 steps, evals at 15 and 30 ->
  (workdir, helpers.Result). Read-only: a test that changes a run copies it."""
  from tests import helpers
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  out = helpers.llmlab("train", helpers.TINY, f"--workdir={workdir}",
                       *helpers.TINY_RUN)
  return workdir, out



@pytest.fixture(scope="session")
def devices(tmp_path_factory):
  """devices(N): the session's process with N simulated CPU devices
  (helpers.Devices), started on its first check; `devices(8).call(
  "tests.module:function", *args)` runs a check there."""
  from tests import helpers
  pool = {}
  log_dir = str(tmp_path_factory.mktemp("devices"))

  def get(n: int) -> helpers.Devices:
    if n not in pool:
      pool[n] = helpers.Devices(n, log_dir)
    return pool[n]
  yield get
  for d in pool.values():
    d.close()
