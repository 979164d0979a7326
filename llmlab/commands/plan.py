"""usage: llmlab plan --config=FILE.py[:ARG] [--config.KEY=VALUE ...]
           [--target=SLICE [--num_slices=K] | --devices=N
            [--device=NAME | --hbm_gb=GIB] [--real]] [--json]

XLA's memory analysis of the config's train step per device and whether it
fits the device; if not, the first fsdp / microbatch / remat setting that
does (llmlab/plan.py). With --target=SLICE (v5p-128, v5e-256, v4-32,
v6e-8, ...) the TPU compiler (libtpu: pip install "llmlab[tpu]") compiles
the step for that slice on this machine and XLA's cost model estimates the
step time and MFU; otherwise the step is compiled for simulated CPU devices.
Exit status 0 if the step fits, 1 if not, 2 for bad input.
"""

from __future__ import annotations

import os
import math

from absl import flags

from llmlab import cli_common

# Unlocked, as before (plan derives its candidate variants from it).
CONFIG = cli_common.Config(example="train.microbatches=2")


def define(fv: flags.FlagValues) -> None:
  from llmlab.plan import DEVICES  # noqa: PLC0415 (imports jax)
  flags.DEFINE_string("target", None, "A Cloud TPU slice (v5p-128, v5e-256, "
                      "v4-32, v6e-8, ...): compile for it with libtpu.",
                      flag_values=fv)
  flags.DEFINE_integer("num_slices", 1, "With --target: slices joined by "
                       "the data-centre network (mesh.dcn_data).",
                       flag_values=fv)
  flags.DEFINE_integer("devices", 0, "Devices (default: the mesh's product).",
                       flag_values=fv)
  flags.DEFINE_string("device", None, f"Memory of: {sorted(DEVICES)}.",
                      flag_values=fv)
  flags.DEFINE_float("hbm_gb", 0.0, "Device memory in GiB (overrides).",
                     flag_values=fv)
  flags.DEFINE_bool("real", False, "Use this machine's devices, not "
                    "simulated CPU devices.", flag_values=fv)
  flags.DEFINE_bool("suggest", True, "Search settings that fit.",
                    flag_values=fv)
  flags.DEFINE_integer("max_compiles", 6, "Compiles the search may use.",
                       flag_values=fv)
  flags.DEFINE_integer("vocab_size", 0, "Vocabulary (default: the "
                       "tokenizer's).", flag_values=fv)
  flags.DEFINE_bool("estimate", True, "--target: also estimate the step "
                    "time (two more compiles, of 2 and 3 layers unrolled).",
                    flag_values=fv)
  flags.DEFINE_bool("recipe_flags", False, "--target: compile with the "
                    "TPU flags launch/tpu.sh sets (MaxText's recipes) unless "
                    "LIBTPU_INIT_ARGS is set; ~20x slower compiles on a CPU "
                    "machine.", flag_values=fv)
  flags.DEFINE_bool("json", False, "Print JSON.", flag_values=fv)


def _mesh_devices(mesh_cfg) -> int:
  """Devices a mesh names when no axis is -1 (else 0: take --devices)."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if -1 in sizes:
    return 0
  return math.prod(sizes) * int(mesh_cfg.get("dcn_data", 1) or 1)


def _simulate(n: int) -> None:
  """n CPU devices; only possible before JAX starts its backends."""
  import jax  # noqa: PLC0415
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # backends already up (a library call): use what exists
  if jax.device_count() < n:
    raise RuntimeError(f"llmlab plan needs {n} devices but JAX already "
                       f"started with {jax.device_count()}; run `llmlab plan` "
                       "as its own process")


def body(fv: flags.FlagValues) -> int:
  """Prints the plan; 0 if the step fits, 1 if not."""
  import jax  # noqa: PLC0415
  from llmlab import plan  # noqa: PLC0415
  if fv.target:
    if fv.devices or fv.real or fv.device or fv.hbm_gb:
      raise cli_common.UsageError("--target names the devices and their "
                                  "memory: drop --devices/--real/--device/"
                                  "--hbm_gb")
    if fv.recipe_flags:
      from llmlab import slices  # noqa: PLC0415
      os.environ.setdefault("LIBTPU_INIT_ARGS", slices.libtpu_args(
          slices.parse(fv.target).generation))
    res = plan.plan_target(fv.config, fv.target, fv.num_slices,
                           fv.vocab_size, fv.suggest, fv.max_compiles,
                           with_estimate=fv.estimate)
    return _show(res, fv.json)
  n = fv.devices or _mesh_devices(fv.config.mesh) or 1
  if not fv.real:
    _simulate(n)
  res = plan.plan(fv.config, jax.devices()[:n], fv.device,
                  fv.hbm_gb * plan.GiB if fv.hbm_gb else None, fv.suggest,
                  fv.vocab_size, fv.max_compiles,
                  accelerator_layout=not fv.real)
  return _show(res, fv.json)


def _show(res: dict, as_json: bool) -> int:
  from llmlab import plan  # noqa: PLC0415
  from llmlab import storage  # noqa: PLC0415
  print(storage.dumps(res, indent=2) if as_json
        else plan.format_plan(res))
  return 0 if res["fits"] else 1


def main(argv: list[str]) -> int:
  """`llmlab plan` (argv excludes the program and the command)."""
  return cli_common.run("plan", argv, define, body, doc=__doc__,
                        config=CONFIG)
