"""Meshes and shardings: the one place that maps logical axes to devices.

The mesh has axes (data, fsdp, context, tensor). `context` splits every
sequence (context parallelism: the rules put the activations' `length` on
it, so the batch arrives sequence-sharded and attention gathers keys and
values across it, see `llmlab/attention.py`). `config.mesh.rules` maps logical
names (from `llmlab/model.py`) to mesh axes; params, optimizer state and
batches get their `NamedSharding` from it. The mesh uses `AxisType.Auto`
so XLA's sharding propagation (GSPMD) fills in everything between the
annotated inputs/outputs and the activation constraints.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmlab.config import mesh_shape  # noqa: F401  (sharding's API too)

AXES = ("data", "fsdp", "context", "tensor")

# The devices runs made in this context use (None: all of them). A context
# variable, so threads packing several runs onto one machine or slice each
# see their own (`device_scope`).
_SCOPE: contextvars.ContextVar = contextvars.ContextVar("llmlab_devices",
                                                        default=None)


def devices() -> list:
  """The devices a run started here gets: its `device_scope`'s, else all."""
  scoped = _SCOPE.get()
  return list(scoped) if scoped is not None else jax.devices()


@contextlib.contextmanager
def device_scope(devs):
  """Runs started inside train on `devs` only (their mesh's `-1` axis fills
  `devs`, not the machine), and arrays placed without a sharding land on
  `devs[0]`. Why: a study packs small members onto disjoint parts of one
  machine or slice (`split_devices`), each trained in its own thread."""
  devs = tuple(devs)
  token = _SCOPE.set(devs)
  try:
    with jax.default_device(devs[0]):
      yield
  finally:
    _SCOPE.reset(token)


def split_devices(devs, groups: int) -> list[list]:
  """`devs` cut into `groups` disjoint, equal parts. On several processes
  each part holds the same number of every process's devices, so a run on
  one part still spans every host: each process loads its share of the
  batch as it would on the whole mesh, and collectives stay SPMD."""
  devs = list(devs)
  procs = sorted({d.process_index for d in devs})
  local = {p: sorted((d for d in devs if d.process_index == p),
                     key=lambda d: d.id) for p in procs}
  counts = {len(v) for v in local.values()}
  if len(counts) != 1 or next(iter(counts)) % groups:
    raise ValueError(f"cannot split {len(devs)} devices ({sorted(counts)} per "
                     f"process) into {groups} equal parts spanning every "
                     "process")
  m = next(iter(counts)) // groups
  return [[d for p in procs for d in local[p][i * m:(i + 1) * m]]
          for i in range(groups)]


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else _scoped_devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = int(mesh_cfg.get("dcn_data", 1) or 1)
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  if dcn > 1:
    arr = _hybrid_devices((shape[0] // dcn, *shape[1:]), dcn, devices)
    return jax.sharding.Mesh(arr, AXES, axis_types=auto)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, AXES, axis_types=auto)
  return jax.sharding.Mesh(np.array(devices).reshape(shape), AXES,
                           axis_types=auto)


_scoped_devices = devices  # make_mesh's `devices` argument shadows it


def _hybrid_devices(ici: tuple, dcn: int, devices: list) -> np.ndarray:
  """Devices for a mesh whose data axis spans `dcn` slices.

  Multi-slice TPU devices know their slice (`slice_index`) and mesh_utils
  lays each slice out along its interconnect. CPU and GPU devices all report
  slice 0: there a slice is a
  group of processes (one host's devices talk fast, hosts over the network),
  so each process is a granule when there is one per slice, and otherwise
  consecutive processes form a slice (a single process simulating slices in
  tests included). Either way the data index is slice-major, so the inner
  `ici` part of the data axis never leaves its slice.
  """
  from jax.experimental import mesh_utils
  dcn_shape = (dcn,) + (1,) * (len(ici) - 1)
  if len({getattr(d, "slice_index", 0) for d in devices}) == dcn:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices)
  if len({d.process_index for d in devices}) == dcn:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn_shape, devices,
                                                process_is_granule=True)
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.array(ordered).reshape(dcn * ici[0], *ici[1:])


def check_context(mesh) -> None:
  """Each sequence's context shards must live in one process: the host
  loader hands a process whole rows (`global_batch`), so a sequence split
  across processes would need each host to load part of a row. Raised
  before anything compiles, naming the key."""
  ax = AXES.index("context")
  if mesh.shape.get("context", 1) == 1:
    return
  procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
  if not (procs == np.take(procs, [0], axis=ax)).all():
    from llmlab.config import ConfigError
    raise ConfigError(
        f"config.mesh.context={mesh.shape['context']}: the context axis "
        "spans devices of several processes; each sequence must stay within "
        "one host's devices (use a context no larger than the devices per "
        "process, and data/fsdp across hosts)")


def rules(mesh_cfg) -> tuple:
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax)
               for name, ax in mesh_cfg.rules)


def logical_sharding(mesh, rule_table, names: tuple) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(names, rule_table)
  return NamedSharding(mesh, spec)


def tree_shardings(mesh, rule_table, boxed_abstract_tree):
  """NamedShardings for a tree whose leaves are flax LogicallyPartitioned.

  A dimension that its mesh axes do not divide (e.g. the byte vocabulary of
  259 over tensor=2) is replicated instead: stored arrays must tile evenly.
  """
  specs = nn.get_partition_spec(boxed_abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rule_table)
  shapes = nn.unbox(boxed_abstract_tree)
  return jax.tree.map(lambda x, s: fit_sharding(x.shape, s), shapes, shardings)


def fit_sharding(shape, sharding: NamedSharding) -> NamedSharding:
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if shape[i] % math.prod(sharding.mesh.shape[a] for a in names):
      spec[i] = None
  return NamedSharding(sharding.mesh, P(*spec))


def batch_sharding(mesh, rule_table) -> NamedSharding:
  """Rows over `batch`'s axes, positions over `length`'s (context): each
  device gets its contiguous slice of the sequence; the model reorders
  slices for causal load balancing after the embedding lookup. With context
  inside a process, `make_array_from_process_local_data` still takes whole
  host rows (the sequence dimension is not split across processes)."""
  return logical_sharding(mesh, rule_table, ("batch", "length"))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy rows -> one global jax.Array per key."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def bytes_per_device(tree) -> int:
  """Bytes of the largest per-device shard of a tree of (abstract) arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") and x.sharding is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total
