"""Joining a multi-process (multi-host) JAX job, and small helpers once joined.

Every entry point calls `initialize()` first thing, before anything touches devices: JAX fixes the
set of processes when its backend starts, so joining later is impossible. Where the job's shape comes
from, first match wins:

1. explicit arguments (the CLI's --coordinator/--num_processes/--process_id), field by field falling
   back to the env vars LLMLAB_COORDINATOR, LLMLAB_NUM_PROCESSES, LLMLAB_PROCESS_ID (set by
   launch/local.py);
2. a SLURM job step with more than one task (`srun`), or a Cloud TPU VM: JAX's own cluster detection
   then fills in everything;
3. otherwise this is a single-process run and nothing is initialised.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping, Sequence

import jax
from jax.experimental import multihost_utils

from llmlab import errors

ENV_COORDINATOR = "LLMLAB_COORDINATOR"
ENV_NUM_PROCESSES = "LLMLAB_NUM_PROCESSES"
ENV_PROCESS_ID = "LLMLAB_PROCESS_ID"

# The variables jax's SlurmCluster reads; all must be present for its detection to work.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the job. Fields left None are filled in by JAX's cluster detection."""

  source: str  # "explicit", "slurm" or "tpu"
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


_NOT_CALLED = object()
_joined: Plan | None | object = _NOT_CALLED


def plan(
    coordinator: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    on_tpu_vm: bool | None = None,
) -> Plan | None:
  """Decides how to join (None: single process) and validates the inputs; touches no JAX state."""
  environ = os.environ if environ is None else environ
  explicit = _explicit_plan(coordinator, num_processes, process_id, environ)
  if explicit is not None:
    return explicit if explicit.num_processes > 1 else None
  if _in_multi_task_slurm_step(environ):
    return Plan("slurm")
  on_tpu_vm = _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm
  # GKE exports the worker list; on GCE it lives in the metadata server (jax reads it) unless jax
  # found no TPU chips and set TPU_SKIP_MDS_QUERY. A single-host slice joins as 1 process.
  if on_tpu_vm and (_tpu_worker_list(environ) or "TPU_SKIP_MDS_QUERY" not in environ):
    return Plan("tpu")
  return None


def initialize(
    coordinator: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
  """Joins the job described by the arguments/env/cluster (see module doc); idempotent.

  Raises ValueError for malformed or inconsistent inputs, RuntimeError when called again with a
  different job or after JAX's backend already started (jax's own error).
  """
  global _joined
  _check_device_ids(local_device_ids)
  wanted = plan(coordinator, num_processes, process_id)
  if _joined is not _NOT_CALLED:
    if wanted != _joined:
      raise RuntimeError(f"llmlab.distributed.initialize: already initialised as {_joined}, now asked for {wanted}")
    return
  if wanted is not None and not jax.distributed.is_initialized():
    # Multi-process CPU runs need cross-process collectives; gloo is jax 0.10's default, pinned here so
    # a changed default cannot silently break them. It only affects the CPU client. An explicit env
    # choice (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) wins.
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=wanted.coordinator,
        num_processes=wanted.num_processes,
        process_id=wanted.process_id,
        local_device_ids=local_device_ids,
        # Explicit plans must not be mixed with auto-detected values; SLURM is pinned so that jax
        # does not pick another cluster type (e.g. Open MPI variables inside srun).
        cluster_detection_method={"explicit": "deactivate", "slurm": "slurm"}.get(wanted.source),
    )
  _joined = wanted


def is_primary() -> bool:
  """Process 0 writes logs, summaries and other single-writer files."""
  return jax.process_index() == 0


def process_info() -> dict[str, int | str]:
  """What this process sees, for the first lines of a run's log."""
  return {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_device_count": jax.local_device_count(),
      "global_device_count": jax.device_count(),
      "platform": jax.default_backend(),
      "slice_count": slice_count(),
      "hostname": socket.gethostname(),
  }


def sync(name: str) -> None:
  """Barrier across all processes (e.g. before the primary finalises a checkpoint); free when alone.

  All processes must call it with the same name, in the same order; a mismatch raises.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def slice_count() -> int:
  """Number of TPU slices (joined over the slow DCN network); 1 where devices carry no slice index."""
  return len({getattr(d, "slice_index", 0) for d in jax.devices()})


def _explicit_plan(coordinator, num_processes, process_id, environ) -> Plan | None:
  """Plan from arguments/env vars; None when none of the three is given, an error when only some are."""
  given = {}
  for key, value, env in (
      ("coordinator", coordinator, ENV_COORDINATOR),
      ("num_processes", num_processes, ENV_NUM_PROCESSES),
      ("process_id", process_id, ENV_PROCESS_ID),
  ):
    if value is not None:
      given[key] = (value, f"argument {key}")
    elif environ.get(env, "").strip():
      given[key] = (environ[env].strip(), f"env {env}")
  if not given:
    return None
  missing = [k for k in ("coordinator", "num_processes", "process_id") if k not in given]
  if missing:
    have = ", ".join(f"{k} ({src})" for k, (_, src) in given.items())
    raise errors.UsageError(
        f"llmlab.distributed: got {have} but not {', '.join(missing)}; a multi-process run needs all three "
        f"(arguments coordinator/num_processes/process_id or env {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})"
    )
  num = _as_int(*given["num_processes"], minimum=1)
  pid = _as_int(*given["process_id"], minimum=0)
  if pid >= num:
    raise errors.UsageError(
        f"llmlab.distributed: process_id {pid} ({given['process_id'][1]}) is out of range for num_processes "
        f"{num} ({given['num_processes'][1]}); expected 0 <= process_id < num_processes"
    )
  return Plan("explicit", _as_coordinator(*given["coordinator"]), num, pid)


def _as_int(value, source: str, minimum: int) -> int:
  """An int >= minimum from an int or a decimal string (env vars and CLI flags are strings)."""
  if isinstance(value, bool) or not isinstance(value, (int, str)) or (
      isinstance(value, str) and not value.strip().isdigit()
  ):
    raise errors.UsageError(f"llmlab.distributed: {source} must be an integer >= {minimum}, got {value!r}")
  number = int(value)
  if number < minimum:
    raise errors.UsageError(f"llmlab.distributed: {source} must be an integer >= {minimum}, got {value!r}")
  return number


def _as_coordinator(value, source: str) -> str:
  """'host:port' ('[v6addr]:port' too), the address of process 0's coordination service."""
  host, sep, port = str(value).strip().rpartition(":")
  if not (isinstance(value, str) and sep and host and port.isdigit() and 1 <= int(port) <= 65535):
    raise errors.UsageError(
        f"llmlab.distributed: {source} must be 'host:port' with port in 1..65535 "
        f"(e.g. '10.0.0.1:8476'), got {value!r}"
    )
  return f"{host}:{int(port)}"


def _check_device_ids(local_device_ids) -> None:
  if local_device_ids is not None and not (
      isinstance(local_device_ids, Sequence)
      and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in local_device_ids)
  ):
    raise errors.UsageError(f"llmlab.distributed: local_device_ids must be non-negative ints, got {local_device_ids!r}")


def _in_multi_task_slurm_step(environ: Mapping[str, str]) -> bool:
  """Inside a job step (`srun`) of > 1 task, with every variable jax's detection reads.

  SLURM_NTASKS alone is the allocation's size also in the batch script and in shells on allocated
  nodes, where only one process runs and waiting for the others would hang; the step's own task
  count tells them apart.
  """
  if not all(environ.get(v) for v in _SLURM_VARS):
    return False
  counts = (environ["SLURM_NTASKS"].strip(), environ.get("SLURM_STEP_NUM_TASKS", "").strip())
  return all(c.isdigit() and int(c) > 1 for c in counts)


def _tpu_worker_list(environ: Mapping[str, str]) -> str:
  return environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""


def _on_cloud_tpu_vm() -> bool:
  """JAX's own finding (TPU chips on PCI plus libtpu), which its TPU cluster detection relies on."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
