"""Memory planning: XLA's own memory analysis of the train step, before any
array exists.

    llmlab plan --config=configs/presets.py:7b_v5p128 [--devices=N]
        [--device=v5p | --hbm_gb=95] [--config.KEY=VALUE ...] [--json]

The train step (the same guarded step `llmlab train` runs) is lowered with
abstract arguments (`jax.ShapeDtypeStruct` with the mesh's shardings) and
compiled ahead of time; `compiled.memory_analysis()` gives the bytes each
device needs. Nothing is allocated, so a pod-sized config is planned on
`--devices` simulated CPU devices (`jax_num_cpu_devices`). The CPU
compiler's buffer assignment is an estimate of the accelerator's (fusion
and layouts differ); on the real hardware `llmlab train` logs the real
backend's numbers before step 1 (`preflight`).

If the step does not fit a device's memory, `plan` tries settings in the
order that adds the fewest FLOPs (`candidates`: shard parameters and
optimizer state over all data-parallel devices, two doublings of
microbatches, remat dots, remat full, then full remat with more
microbatches) and prints the first one that fits, with its flags.
"""

from __future__ import annotations

import logging
import os

import jax

from llmlab import config as config_lib
from llmlab import guard
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from llmlab.data import tokenizer

log = logging.getLogger("llmlab")

GiB = 1024 ** 3
# name -> (device_kind substrings, lower case; bytes of memory per device)
DEVICES = {
    "v4": (("tpu v4",), 32 * GiB),
    "v5e": (("tpu v5 lite", "tpu v5e", "v5litepod"), 16 * GiB),
    "v5p": (("tpu v5p", "tpu v5"), 95 * GiB),
    "v6e": (("tpu v6 lite", "tpu v6e"), 32 * GiB),
    "tpu7x": (("tpu7x",), 192 * GiB),
    "a100-40gb": (("a100-sxm4-40gb", "a100-pcie-40gb"), 40 * GiB),
    "a100": (("a100",), 80 * GiB),
    "h100": (("h100",), 80 * GiB),
    "h200": (("h200",), 141 * GiB),
    "b200": (("b200",), 180 * GiB),
    "l4": (("l4",), 24 * GiB),
    "a10g": (("a10g",), 24 * GiB),
}
REMATS = ("none", "dots", "full")


class DoesNotFit(RuntimeError):
  """The train step needs more memory than a device has."""


def fmt_bytes(n: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


# --------------------------------------------------------- device memory


def device_for_kind(kind: str) -> str | None:
  kind = kind.lower()
  for name, (subs, _) in DEVICES.items():
    if any(s in kind for s in subs):
      return name
  return None


def device_limit(device: str | None = None, hbm_bytes: float | None = None,
                 config_name: str = "") -> tuple[float | None, str]:
  """(bytes per device, where that number came from), or (None, why not).

  Order: an explicit --hbm_gb, an explicit --device name, the runtime's
  allocator limit (real accelerators), the device kind table, a device
  named in the config's name (presets: '7b_v5p128'), host RAM on CPU.
  """
  if hbm_bytes:
    return float(hbm_bytes), "--hbm_gb"
  if device:
    if device not in DEVICES:
      raise ValueError(f"--device={device!r}: unknown; known: "
                       f"{sorted(DEVICES)}")
    return float(DEVICES[device][1]), f"table ({device})"
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if stats.get("bytes_limit"):
      return float(stats["bytes_limit"]), f"runtime ({dev.device_kind})"
    name = device_for_kind(dev.device_kind)
    if name:
      return float(DEVICES[name][1]), f"table ({dev.device_kind})"
    return None, f"unknown device kind {dev.device_kind!r}"
  for name in sorted(DEVICES, key=len, reverse=True):
    if name in config_name.lower():
      return float(DEVICES[name][1]), f"table ({name}, from config name)"
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(ram), "host RAM (cpu)"
  except (ValueError, OSError):
    return None, "cpu (host RAM unknown)"


# ------------------------------------------------------- memory analysis


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def abstract_batch(cfg, setup) -> dict:
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, "int32",
                                  sharding=setup.batch_sharding)
          for k in steps_lib.BATCH_KEYS}


def compile_step(train_step, setup, carry, batch):
  """AOT-compile the guarded step on abstract arguments; an XLA
  out-of-memory at compile time becomes DoesNotFit."""
  try:
    return train_step.lower(setup.abstract_state, _abstract(carry),
                            _abstract(batch)).compile()
  except Exception as e:  # noqa: BLE001 - only OOM is translated
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
      raise DoesNotFit(f"the train step does not fit in device memory "
                       f"(XLA: {text[:400]}). Run `llmlab plan` with this "
                       "config for settings that fit.") from e
    raise


def memory_report(compiled, setup) -> dict:
  """Bytes per device: params, optimizer state, other inputs (batch, guard
  carry, teacher), activations + temporaries (XLA's temp buffers: XLA does
  not split them), outputs not aliased to inputs, and the peak."""
  mem = compiled.memory_analysis()
  params = shd.bytes_per_device(setup.abstract_state["params"])
  opt = shd.bytes_per_device(setup.abstract_state["opt_state"])
  args = int(mem.argument_size_in_bytes)
  out = int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)
  temp = int(mem.temp_size_in_bytes)
  peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) or args + out + temp
  return {"params": params, "opt_state": opt,
          "other_inputs": max(args - params - opt, 0),
          "activations_and_temps": temp, "outputs": max(out, 0),
          "peak": max(peak, args + temp)}


def format_report(rep: dict, limit: float | None, source: str) -> str:
  names = (("params", "params"), ("opt_state", "optimizer state"),
           ("other_inputs", "batch + other inputs"),
           ("activations_and_temps", "activations + temporaries"),
           ("outputs", "outputs (not in place)"), ("peak", "peak"))
  lines = [f"  {label:<28}{fmt_bytes(rep[k]):>12}" for k, label in names]
  if limit:
    lines.append(f"  {'device memory':<28}{fmt_bytes(limit):>12}  "
                 f"[{source}]  {100 * rep['peak'] / limit:.0f}% used")
  else:
    lines.append(f"  device memory: {source}")
  return "\n".join(lines)


_REPORTED: set[str] = set()  # pre-flight blocks this process has logged


def preflight(cfg, setup, train_step, carry, batch) -> dict:
  """`llmlab train`'s pre-flight: compile ahead of time, log bytes per
  device before step 1, and refuse a step that cannot fit an accelerator.
  The compiled executable lands in JAX's compilation cache, so the first
  real step does not compile again."""
  compiled = compile_step(train_step, setup, carry, batch)
  rep = memory_report(compiled, setup)
  limit, source = device_limit(config_name="")
  text = format_report(rep, limit, source)
  if text in _REPORTED:  # a study's runs of one shape: the block once
    log.info("memory pre-flight: peak %s per device (as above)",
             fmt_bytes(rep["peak"]))
  else:
    _REPORTED.add(text)
    log.info("memory pre-flight, per device (XLA memory analysis):\n%s",
             text)
  on_cpu = jax.devices()[0].platform == "cpu"
  if limit and rep["peak"] > limit:
    msg = (f"the train step needs {fmt_bytes(rep['peak'])} per device but "
           f"a device has {fmt_bytes(limit)} ({source}). Run `llmlab plan "
           "--config=...` with this config for remat / fsdp / microbatch "
           "settings that fit.")
    if not on_cpu:
      raise DoesNotFit(msg)
    log.warning("memory pre-flight: %s", msg)
  return dict(rep, limit=limit, limit_source=source)


# ------------------------------------------------------------------ plan


def _vocab_size(cfg) -> int:
  return tokenizer.load(cfg.data.tokenizer).vocab_size


def measure(cfg, vocab_size: int, devices) -> dict:
  """Per-device memory of `cfg`'s train step on `devices` (abstract)."""
  config_lib.validate(cfg, len(devices))
  mesh = shd.make_mesh(cfg.mesh, devices)
  setup = steps_lib.build(cfg, vocab_size, mesh)
  step = steps_lib.make_guarded_train_step(setup)
  carry = _abstract_carry(guard.init_carry(cfg.guard), mesh)
  compiled = compile_step(step, setup, carry, abstract_batch(cfg, setup))
  return memory_report(compiled, setup)


def _abstract_carry(carry, mesh):
  repl = shd.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=repl), carry)


def _state_bytes(cfg, vocab_size: int, devices) -> int:
  mesh = shd.make_mesh(cfg.mesh, devices)
  setup = steps_lib.build(cfg, vocab_size, mesh)
  return shd.bytes_per_device(setup.abstract_state)


def candidates(cfg, n: int) -> list[dict]:
  """Overrides to try, fewest extra FLOPs first: fsdp over all data-parallel
  devices (if data > 1: no recompute, shards params and optimizer state),
  two doublings of microbatches (no recompute; smaller matmuls), remat
  dots, remat full, then full remat with every valid microbatch count."""
  data, fsdp, _ = shd.mesh_shape(cfg.mesh, n)
  meshes = [{}]
  if data > 1 and int(cfg.mesh.get("dcn_data", 1) or 1) == 1:
    meshes.append({"mesh.data": 1, "mesh.fsdp": data * fsdp})
  micros, m = [], cfg.train.microbatches * 2
  while cfg.train.batch_size % m == 0 and (
      cfg.train.batch_size // m) % (data * fsdp) == 0:
    micros.append(m)
    m *= 2
  remats = REMATS[REMATS.index(cfg.model.remat):]
  out = []
  for mesh in meshes:
    out += [mesh] if mesh else []
    out += [dict(mesh, **{"train.microbatches": m}) for m in micros[:2]]
    out += [dict(mesh, **{"model.remat": r}) for r in remats[1:]]
    out += [dict(mesh, **{"model.remat": remats[-1], "train.microbatches": m})
            for m in micros]
  unique = []
  for o in out:  # drop no-op keys (remat already full), then repeats
    o = {k: v for k, v in o.items() if k != "model.remat" or
         v != cfg.model.remat}
    if o and o not in unique:
      unique.append(o)
  return unique


def plan(cfg, devices=None, device: str | None = None,
         hbm_bytes: float | None = None, suggest: bool = True,
         vocab_size: int = 0, max_compiles: int = 6,
         accelerator_layout: bool = True) -> dict:
  """Memory per device of `cfg` on `devices` (default: all), whether it
  fits, and (if not) the first cheaper-to-run setting that does.

  `accelerator_layout`: on CPU devices standing in for accelerators, plan
  the program TPU/GPU run: the layer scan rolled (`model.scan_unroll=0`
  means unrolled on CPU, where XLA then merges remat's recomputation away
  and reports several times the accelerator's activation memory).
  """
  cfg = config_lib.merge_defaults(cfg)
  devices = list(devices if devices is not None else jax.devices())
  if (accelerator_layout and devices[0].platform == "cpu" and
      not cfg.model.scan_unroll):
    cfg.model.scan_unroll = 1
  vocab = vocab_size or _vocab_size(cfg)
  limit, source = device_limit(device, hbm_bytes, cfg.get("name", ""))
  rep = measure(cfg, vocab, devices)
  out = {"config": cfg.get("name", ""), "devices": len(devices),
         "device_kind": devices[0].device_kind,
         "mesh": dict(zip(shd.AXES, shd.mesh_shape(cfg.mesh, len(devices)))),
         "per_device": rep, "limit_bytes": limit, "limit_source": source,
         "fits": bool(limit is None or rep["peak"] <= limit),
         "suggestion": None, "tried": []}
  if out["fits"] or not suggest:
    return out
  compiles = 0
  for overrides in candidates(cfg, len(devices)):
    variant = config_lib.with_overrides(cfg, overrides)
    state = _state_bytes(variant, vocab, devices)
    tried = {"overrides": overrides, "state_bytes": state}
    out["tried"].append(tried)
    if state > limit or compiles >= max_compiles:
      continue  # params + optimizer alone do not fit: no compile needed
    compiles += 1
    tried["per_device"] = r = measure(variant, vocab, devices)
    if r["peak"] <= limit:
      out["suggestion"] = {"overrides": overrides, "per_device": r,
                           "flags": " ".join(f"--config.{k}={v}" for k, v
                                             in overrides.items())}
      break
  return out


def format_plan(res: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in res["mesh"].items())
  lines = [f"llmlab plan: {res['config'] or 'config'} on {res['devices']} "
           f"{res['device_kind']} device(s), mesh {mesh}",
           "per device (XLA memory analysis of the train step):",
           format_report(res["per_device"], res["limit_bytes"],
                         res["limit_source"])]
  if res["limit_bytes"] is None:
    lines.append("fits: unknown (pass --device=NAME or --hbm_gb=N)")
  elif res["fits"]:
    lines.append("fits: yes")
  else:
    lines.append(f"fits: NO, the peak exceeds {fmt_bytes(res['limit_bytes'])}")
    sug = res["suggestion"]
    if sug:
      lines += [f"suggestion: {sug['flags']}",
                f"  peak {fmt_bytes(sug['per_device']['peak'])} "
                f"(activations + temporaries "
                f"{fmt_bytes(sug['per_device']['activations_and_temps'])})"]
    else:
      lines.append("no remat / fsdp / microbatch setting tried fits: use more "
                   "devices, tensor parallelism (mesh.tensor), a smaller "
                   "batch or a shorter sequence")
    for t in res["tried"]:
      peak = t.get("per_device", {}).get("peak")
      lines.append(f"  tried {t['overrides']}: state "
                   f"{fmt_bytes(t['state_bytes'])}"
                   + (f", peak {fmt_bytes(peak)}" if peak else
                      ", not compiled"))
  return "\n".join(lines)
