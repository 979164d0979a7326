"""Cloud TPU slices by name, as compile-only JAX devices (no TPU needed).

`devices("v5p-128")` returns the devices a v5p-128 slice shows JAX -- 64 of
them, one per chip -- built by libtpu's topology API
(`jax.experimental.topologies.get_topology_desc`), so the real TPU compiler
can compile for a slice on any machine that has `libtpu` installed
(`pip install "llmlab[tpu]"`). `llmlab plan --target=SLICE` uses them.

Slice names follow Cloud TPU's accelerator types. v4 and v5p names count
TensorCores, two per chip, and a chip runs its two cores as one JAX device
(megacore); v5e and v6e names count chips, one core each. The chip grids
(topologies) are Cloud TPU's published shapes (the same facts MaxText's
accelerator table lists); `wrap` marks the torus links that a full
dimension of 4 x 4 x 4 (3D) or 16 (2D) chips has.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

from jax.experimental.topologies import get_topology_desc

from llmlab import errors

INSTALL_HINT = 'pip install "llmlab[tpu]"'

# The TPU compiler flags of the public MaxText recipes, which launch/tpu.sh
# sets on the workers (launch/README.md says what each does;
# tests/test_launch.py keeps the two lists equal). `llmlab plan --target
# --recipe_flags` compiles with them: the program a launched run compiles,
# at a price on a CPU machine (the 7b_v5p128 step: 42 min with them, 2 min
# with libtpu's defaults, on 2 shared cores).
RECIPE_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)
# Scoped VMEM per fusion, KiB (MaxText: 80 MiB in its v5p recipes, 96 MiB
# for dense models on v5e/v6e; v4 keeps libtpu's default, 16 MiB).
SCOPED_VMEM_KIB = {"v5p": 81920, "v5e": 98304, "v6e": 98304}


@dataclasses.dataclass(frozen=True)
class Generation:
  """What a TPU generation's slice names mean."""

  topology_prefix: str      # libtpu's name: "v5:4x4x4", "v5e:16x16"
  chip_config: str          # libtpu chip config: megacore | default
  cores_per_chip: int       # how many the slice name counts per chip
  grids: dict               # chips -> grid, e.g. 64 -> (4, 4, 4)
  aliases: tuple = ()       # other spellings of the prefix (gcloud's)


def _grids_3d(*shapes) -> dict:
  return {math.prod(s): s for s in shapes}


_GRIDS_3D = _grids_3d(
    (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8),
    (4, 4, 12), (4, 8, 8), (4, 4, 20), (4, 8, 12), (4, 4, 28), (8, 8, 8),
    (4, 12, 12), (8, 8, 12), (8, 8, 16), (8, 12, 12), (8, 16, 16),
    (12, 16, 16), (16, 16, 16), (16, 16, 24))
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8),
             64: (8, 8), 128: (8, 16), 256: (16, 16)}

GENERATIONS = {
    "v4": Generation("v4", "megacore_dense", 2,
                     {c: g for c, g in _GRIDS_3D.items() if c in (
                         4, 8, 16, 32, 64, 128, 192, 256, 512, 768, 1024,
                         2048)}),
    "v5p": Generation("v5", "megacore", 2, _GRIDS_3D),
    "v5e": Generation("v5e", "default", 1, _GRIDS_2D, ("v5litepod",)),
    "v6e": Generation("v6e", "default", 1, _GRIDS_2D),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One slice type: its name, generation, chip grid and JAX devices."""

  name: str         # canonical: "v5p-128", "v5e-256"
  generation: str   # "v4" | "v5p" | "v5e" | "v6e" (plan.DEVICES' keys)
  grid: tuple       # chips per dimension

  @property
  def chips(self) -> int:
    return math.prod(self.grid)

  @property
  def devices_per_slice(self) -> int:
    """JAX devices: one per chip (megacore on v4 / v5p)."""
    return self.chips

  def topology_kwargs(self, num_slices: int = 1) -> dict:
    gen = GENERATIONS[self.generation]
    if len(self.grid) == 3:  # a torus once every dimension has 4 chips
      wrap = (min(self.grid) >= 4,) * 3
    else:  # 2D: a dimension of 16 chips wraps around
      wrap = tuple(d >= 16 for d in self.grid) + (False,)
    host = (1, 1, 1) if self.chips == 1 else (2, 2, 1)
    return dict(platform="tpu",
                topology_name=f"{gen.topology_prefix}:" +
                "x".join(map(str, self.grid)),
                chip_config_name=gen.chip_config, chips_per_host_bounds=host,
                num_slices=num_slices, wrap=wrap)


def names() -> list[str]:
  """Every known slice name, in generation and size order."""
  return [f"{g}-{c * gen.cores_per_chip}"
          for g, gen in GENERATIONS.items() for c in sorted(gen.grids)]


def known() -> str:
  """The known names, one group per generation: 'v5e-{1,4,8}; ...'."""
  return "; ".join(
      f"{g}-{{{','.join(str(c * gen.cores_per_chip) for c in sorted(gen.grids))}}}"
      for g, gen in GENERATIONS.items())


def parse(name: str) -> Slice:
  """'v5p-128' (or gcloud's 'v5litepod-16') -> Slice; ValueError listing the
  known names otherwise."""
  prefix, _, count = name.strip().lower().rpartition("-")
  for gen_name, gen in GENERATIONS.items():
    if prefix in (gen_name, *gen.aliases) and count.isdigit():
      chips, rest = divmod(int(count), gen.cores_per_chip)
      if not rest and chips in gen.grids:
        return Slice(f"{gen_name}-{count}", gen_name, gen.grids[chips])
  raise errors.UsageError(f"--target={name!r}: unknown TPU slice; known: "
                   f"{known()} (v5litepod-N = v5e-N)")


def libtpu_args(generation: str) -> str:
  """LIBTPU_INIT_ARGS of the recipes for a generation ('v5p')."""
  vmem = SCOPED_VMEM_KIB.get(generation)
  return " ".join(RECIPE_FLAGS + ((
      f"--xla_tpu_scoped_vmem_limit_kib={vmem}",) if vmem else ()))


def have_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def devices(sl: Slice, num_slices: int = 1) -> list:
  """Compile-only devices of `num_slices` slices of type `sl`.

  Needs libtpu (the TPU compiler). On a machine that is not a TPU VM, the
  TPU runtime's environment is filled in first (only where unset), so
  libtpu does not print warnings about the metadata server it cannot reach,
  and several processes may load it at once (libtpu otherwise takes a
  machine-wide lock, /tmp/libtpu_lockfile, meant for real TPU chips).
  LIBTPU_INIT_ARGS is the caller's (unset: libtpu's defaults; `llmlab plan
  --recipe_flags` sets the recipes' flags, `libtpu_args`). libtpu reads it
  once, when it loads: the first slice a process compiles for decides the
  flags of all the others.
  """
  if not have_libtpu():
    raise errors.UserError(f"compiling for a TPU slice needs libtpu: "
                     f"{INSTALL_HINT}")
  for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                     ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", sl.name)):
    os.environ.setdefault(key, value)
  return list(get_topology_desc(**sl.topology_kwargs(num_slices)).devices)
