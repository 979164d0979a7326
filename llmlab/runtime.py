"""Process set-up that libraries and commands share: log lines that show,
jax's persistent compilation cache (the studies' runs and the commands
use the same one), and the C allocator's settings for XLA:CPU (nothing here
parses a command line)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import threading

_STATE = {"verbose": False, "malloc": None}
# Per thread: a study training runs side by side (experiment.train_all)
# quiets each run in its own thread and still shows its own progress.
_QUIET = threading.local()


def set_verbose(on: bool) -> None:
  """`--verbose`: show every run's detail inside studies too."""
  _STATE["verbose"] = bool(on)


@contextlib.contextmanager
def quiet_runs():
  """Inside: one run's detail -- llmlab's INFO lines (model, attention
  pick, memory pre-flight, resume) and its step and eval progress lines --
  is left out unless `--verbose`; warnings and errors always show. The
  studies train each run in it (llmlab/experiment.py) and the sweep loads
  each run in it, so a study's console shows the study's progress, not
  every run's."""
  _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
  try:
    yield
  finally:
    _QUIET.depth -= 1


def quiet() -> bool:
  """Inside `quiet_runs` (in this thread), without --verbose?"""
  return getattr(_QUIET, "depth", 0) > 0 and not _STATE["verbose"]


def _run_detail(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.WARNING or not quiet()


# On the logger itself (not a handler): in-process callers and tests get it.
logging.getLogger("llmlab").addFilter(_run_detail)


def setup_logging(absl_level: int = logging.WARNING) -> None:
  """Timestamped lines on stderr: llmlab's INFO, other libraries' warnings
  (their INFO -- jax's "Unable to initialize backend 'tpu'", gcsfs' cache
  notices -- is filtered by logger name, not by silencing everything).
  `force`, because importing orbax already gave the root logger a handler,
  which would make a plain `basicConfig` a no-op."""
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  logging.getLogger("absl").setLevel(absl_level)
  logging.getLogger("llmlab").setLevel(logging.INFO)
  logging.getLogger("gcsfs").addFilter(_harmless_gcsfs)
  logging.getLogger("absl").addFilter(_harmless_orbax)


def _harmless_orbax(record: logging.LogRecord) -> bool:
  """orbax warns "Given directory is read only" whenever llmlab opens a
  run's checkpoints read-only on purpose (eval, sweep, llmlab.load)."""
  return "Given directory is read only" not in record.getMessage()


def _harmless_gcsfs(record: logging.LogRecord) -> bool:
  """gcsfs asks for the bucket type on every new bucket and warns when the
  answer needs credentials it does not have (an emulator, or a bucket the
  account cannot inspect); it then uses the plain API, which works. Not a
  problem a researcher can act on: filtered by name, not silenced."""
  return "Could not determine bucket type" not in record.getMessage()


@contextlib.contextmanager
def simulated_cpu_devices(n: int):
  """Inside, jax's CPU backend is asked for `n` devices (XLA's
  --xla_force_host_platform_device_count, unless XLA_FLAGS sets a count
  already); XLA_FLAGS is restored on the way out, so processes started
  later do not inherit it. Takes effect only if jax starts its backends
  inside (a command does: `jax.devices()`); accelerators are not affected.
  Why: a study on a CPU packs runs side by side on devices (`parallel`),
  and every simulated device computes on all the machine's cores, so a
  lone run is as fast as before (docs/studies.md). (Turning off Eigen's
  threading inside an op as well, --xla_cpu_multi_thread_eigen=false, made
  the quick study 6.4 -> 6.0 min, but it changes some runs' losses at
  float32 rounding: packed runs would no longer match runs one after
  another. Not set.)"""
  flag = "--xla_force_host_platform_device_count"
  old = os.environ.get("XLA_FLAGS")
  if n > 1 and flag not in (old or ""):
    os.environ["XLA_FLAGS"] = f"{old or ''} {flag}={int(n)}".strip()
  try:
    yield
  finally:
    if old is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = old


def setup_compile_cache() -> str | None:
  """Turns on jax's persistent compilation cache; returns its directory.

  Why: a scaling study trains dozens of same-shaped runs, a resumed run
  compiles the very step it compiled before the crash, and on CPU compiling
  a small model's step takes longer than training it (`llmlab study
  --config=configs/study_quick.py:test`: 88 s cold, 38 s with a warm cache).
  A hit loads the executable XLA built for the same program, compile options
  and jax version, so results are bit-identical. `LLMLAB_COMPILE_CACHE`:
  a directory (local or gs://), or "off"; unset: jax's own
  `JAX_COMPILATION_CACHE_DIR` if set, else `$XDG_CACHE_HOME/llmlab/xla`
  (~/.cache/llmlab/xla). Only process 0 writes (jax's rule).
  """
  import jax  # noqa: PLC0415 (commands import jax lazily)
  path = os.environ.get("LLMLAB_COMPILE_CACHE", "")
  if path.lower() in ("off", "0", "none", "false"):
    return None
  if not path and jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR
  if not path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "llmlab", "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # Our CPU compiles of small models take 0.5-5 s; jax's default
    # threshold (1 s) would skip many of them.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


# What keep_freed_memory sets: glibc's name -> (mallopt's parameter number,
# malloc.h; value). 32 MiB is the largest mmap threshold glibc accepts.
MALLOC_SETTINGS = {"mmap_threshold": (-3, 32 << 20),
                   "trim_threshold": (-1, (1 << 31) - 1),
                   "top_pad": (-2, 64 << 20)}


def glibc_tunables() -> str:
  """MALLOC_SETTINGS as GLIBC_TUNABLES, for a process that does not import
  llmlab (benchmarks/train_throughput.py --torch_malloc=keep)."""
  return ":".join(f"glibc.malloc.{k}={v}" for k, (_, v) in MALLOC_SETTINGS.items())


def keep_freed_memory() -> bool:
  """Lets glibc keep the memory XLA:CPU frees, instead of handing it back to
  the kernel and faulting it in, zeroed, at the next step; returns whether
  it is on. `import llmlab` calls it: it must run before jax starts a
  backend (measured: called after `jax.devices()`, it changed nothing, 3.1M
  faults in 300 steps against 0.5M), when the platform is not yet known;
  on a TPU or GPU host it only changes how the host's own allocations are
  kept.

  Why: an XLA:CPU step allocates its temporaries (the YNNPACK fusions'
  scratch included) and frees them each step. glibc returns freed blocks
  above its mmap threshold, and the top of each heap above its trim
  threshold, to the kernel, so every step pays page faults and page
  clearing for the same memory again: measured on the quick study's
  largest member (n74k, 600 steps, 2-core AMD EPYC), 6.0M minor faults and
  14.1 s of system time against 34 s of user time; with these settings
  0.2M faults, 1.9 s and 18% less training time, the same losses. The cost: the
  process keeps its peak heap (the training step's temporaries) rather
  than returning it between steps. Blocks of 32 MiB and more (glibc's
  largest mmap threshold) still come and go by mmap. `LLMLAB_MALLOC=default`
  (or a `GLIBC_TUNABLES` that sets malloc) leaves glibc as it is; not glibc
  (macOS, musl): nothing to do."""
  if _STATE["malloc"] is not None:
    return _STATE["malloc"]
  on = False
  wanted = os.environ.get("LLMLAB_MALLOC", "keep").lower() != "default"
  tunables = "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
  if wanted and not tunables and sys.platform.startswith("linux"):
    try:
      libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
      mallopt = libc.mallopt
    except (OSError, AttributeError):
      mallopt = None  # not glibc
    if mallopt is not None:
      mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
      on = all([mallopt(*kv) for kv in MALLOC_SETTINGS.values()])
  _STATE["malloc"] = on
  return on
