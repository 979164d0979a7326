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

`llmlab plan --target=v5p-128 [--num_slices=K]` compiles for a Cloud TPU
slice instead (`plan_target`): libtpu's compiler, on any machine, for the
slice's compile-only devices (llmlab/slices.py), so the memory analysis is
the TPU's own and the chip's HBM is the limit. It also prints XLA's
estimate of the step time and the MFU that implies (`estimate`: the cost
model on loop-free programs, since it counts a loop body once). What that
estimate cannot see: communication (collectives are not costed: fsdp's
all-gathers and reduce-scatters, DCN all-reduces across slices, and
whether they overlap compute), the inside of Pallas kernels (splash
attention's custom call costs ~0: `kernel_estimate` adds its FLOPs and
prices them at the rate XLA gives the rest of the step), host time (input pipeline, dispatch,
checkpoints), and the scheduler's real overlap; XLA's per-op model is
its own guess of each fusion's speed.
"""

from __future__ import annotations

import logging
import os
import time

import jax

from llmlab import attention as attention_lib
from llmlab import config as config_lib
from llmlab import errors
from llmlab import guard
from llmlab import model as model_lib
from llmlab import perf
from llmlab import sharding as shd
from llmlab import slices
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
      raise errors.UsageError(f"--device={device!r}: unknown; known: "
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


def compile_step(train_step, setup, carry, batch, compiler_options=None):
  """AOT-compile the guarded step on abstract arguments; an XLA
  out-of-memory at compile time becomes DoesNotFit."""
  try:
    return train_step.lower(setup.abstract_state, _abstract(carry),
                            _abstract(batch)).compile(
                                compiler_options=compiler_options)
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
  # Host memory (optim.offload=host, offloading remat): TPU/GPU compilers
  # count it apart from device memory; XLA:CPU does not (one memory).
  host_args = int(getattr(mem, "host_argument_size_in_bytes", 0) or 0)
  host = host_args + int(getattr(mem, "host_temp_size_in_bytes", 0) or 0) + (
      int(getattr(mem, "host_output_size_in_bytes", 0) or 0) -
      int(getattr(mem, "host_alias_size_in_bytes", 0) or 0))
  opt_host = opt if (getattr(setup, "opt_device_shardings", None) is not None
                     and host_args >= opt) else 0
  opt_dev = opt - opt_host
  return {"params": params, "opt_state": opt_dev,
          "other_inputs": max(args - params - opt_dev, 0),
          "activations_and_temps": temp, "outputs": max(out, 0),
          "peak": max(peak, args + temp),
          "host": max(host, 0), "opt_state_host": opt_host}


def format_report(rep: dict, limit: float | None, source: str) -> str:
  names = (("params", "params"), ("opt_state", "optimizer state"),
           ("other_inputs", "batch + other inputs"),
           ("activations_and_temps", "activations + temporaries"),
           ("outputs", "outputs (not in place)"), ("peak", "peak"))
  lines = [f"  {label:<28}{fmt_bytes(rep[k]):>12}" for k, label in names]
  if rep.get("host"):
    lines.append(f"  {'host memory (pinned_host)':<28}"
                 f"{fmt_bytes(rep['host']):>12}  (not in the peak; optimizer "
                 f"state {fmt_bytes(rep.get('opt_state_host', 0))})")
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
  The run then steps with the executable compiled here (`adopt`): the
  step is traced, lowered and compiled once."""
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
  train_step.adopt(compiled)
  return dict(rep, limit=limit, limit_source=source)


# ------------------------------------------------------------------ plan


def _vocab_size(cfg) -> int:
  return tokenizer.load(cfg.data.tokenizer).vocab_size


def measure(cfg, vocab_size: int, devices) -> dict:
  """Per-device memory of `cfg`'s train step on `devices` (abstract)."""
  return memory_report(*compile_abstract(cfg, vocab_size, devices))


def compile_abstract(cfg, vocab_size: int, devices, compiler_options=None):
  """(compiled train step, setup) for `cfg` on `devices`, nothing
  allocated: the devices may be simulated CPUs or a TPU topology's."""
  config_lib.validate(cfg, len(devices))
  mesh = shd.make_mesh(cfg.mesh, devices)
  setup = steps_lib.build(cfg, vocab_size, mesh)
  step = steps_lib.make_guarded_train_step(setup)
  carry = _abstract_carry(guard.init_carry(cfg.guard), mesh)
  compiled = compile_step(step, setup, carry, abstract_batch(cfg, setup),
                          compiler_options)
  return compiled, setup


def _measure_or_error(cfg, vocab_size: int, devices) -> tuple:
  """(memory report, None), or (None, XLA's reason) for a step the
  compiler refuses (e.g. a scoped VMEM out-of-memory on TPU)."""
  try:
    return measure(cfg, vocab_size, devices), None
  except DoesNotFit as e:
    return None, str(e.__cause__ or e)[:600]


def _abstract_carry(carry, mesh):
  repl = shd.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=repl), carry)


def _state_bytes(cfg, vocab_size: int, devices) -> int:
  mesh = shd.make_mesh(cfg.mesh, devices)
  setup = steps_lib.build(cfg, vocab_size, mesh)
  on_device = [x for x in jax.tree.leaves(setup.abstract_state)
               if getattr(x.sharding, "memory_kind", None) != "pinned_host"]
  return shd.bytes_per_device(on_device)  # optim.offload=host: not in HBM


def candidates(cfg, n: int) -> list[dict]:
  """Overrides to try, fewest extra FLOPs first: fsdp over all data-parallel
  devices (if data > 1: no recompute, shards params and optimizer state),
  two doublings of microbatches (no recompute; smaller matmuls), remat
  dots, remat full, then full remat with every valid microbatch count."""
  data, fsdp, _, _ = shd.mesh_shape(cfg.mesh, n)
  meshes = [{}]
  if data > 1 and int(cfg.mesh.get("dcn_data", 1) or 1) == 1:
    meshes.append({"mesh.data": 1, "mesh.fsdp": data * fsdp})
  micros, m = [], cfg.train.microbatches * 2
  while cfg.train.batch_size % m == 0 and (
      cfg.train.batch_size // m) % (data * fsdp) == 0:
    micros.append(m)
    m *= 2
  remat = cfg.model.remat if cfg.model.remat in REMATS else "dots"
  remats = REMATS[REMATS.index(remat):]
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
  if accelerator_layout and not cfg.model.scan_unroll:
    cfg.model.scan_unroll = 1  # "auto" follows the host's backend, not theirs
  vocab = vocab_size or _vocab_size(cfg)
  limit, source = device_limit(device, hbm_bytes, cfg.get("name", ""))
  rep, error = _measure_or_error(cfg, vocab, devices)
  out = {"config": cfg.get("name", ""), "devices": len(devices),
         "device_kind": devices[0].device_kind,
         "mesh": dict(zip(shd.AXES, shd.mesh_shape(cfg.mesh, len(devices)))),
         "per_device": rep, "compile_error": error,
         "limit_bytes": limit, "limit_source": source,
         "fits": bool(rep and (limit is None or rep["peak"] <= limit)),
         "suggestion": None, "tried": []}
  if out["fits"] or not suggest:
    return out
  compiles = 0
  for overrides in candidates(cfg, len(devices)):
    variant = config_lib.with_overrides(cfg, overrides)
    state = _state_bytes(variant, vocab, devices)
    tried = {"overrides": overrides, "state_bytes": state}
    out["tried"].append(tried)
    if (limit and state > limit) or compiles >= max_compiles:
      continue  # params + optimizer alone do not fit: no compile needed
    compiles += 1
    r, tried["compile_error"] = _measure_or_error(variant, vocab, devices)
    if r:
      tried["per_device"] = r
    if r and r["peak"] <= limit:
      out["suggestion"] = {"overrides": overrides, "per_device": r,
                           "flags": " ".join(f"--config.{k}={v}" for k, v
                                             in overrides.items())}
      break
  return out


# ------------------------------------------------------------ TPU targets

# Compiler options of the cost-estimate programs only (see `estimate`): no
# windowed einsum (collective matmul), whose loops the cost model counts
# once. The memory plan compiles with the defaults, as training does.
ESTIMATE_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}
# Custom calls that TPU's cost model books at -1 s each (no model for them):
# a step with k of them reports optimal_seconds off by exactly -k (seen
# with libtpu 0.0.42: ConcatBitcast in long-sequence steps, ZeroCrop in
# multi-slice ones). An unknown one leaves the sum negative: no estimate.
UNCOSTED_CALLS = ("ConcatBitcast", "ZeroCrop")


def target_devices(target: str, num_slices: int = 1):
  """(Slice, compile-only devices) of `num_slices` slices named `target`."""
  if num_slices < 1:
    raise errors.UsageError(f"--num_slices={num_slices}: must be >= 1")
  sl = slices.parse(target)
  return sl, slices.devices(sl, num_slices)


def check_mesh(cfg, sl, num_slices: int = 1) -> None:
  """ConfigError naming the slice's device count and a mesh that fills it,
  before anything compiles."""
  n = sl.devices_per_slice * num_slices
  dcn = int(cfg.mesh.get("dcn_data", 1) or 1)
  per = f"{sl.name} has {sl.devices_per_slice} devices (one per chip)"
  if dcn != num_slices:
    raise config_lib.ConfigError(
        f"config.mesh.dcn_data={dcn} but --num_slices={num_slices}: the "
        f"data axis across slices must span them; add "
        f"--config.mesh.dcn_data={num_slices}")
  try:
    config_lib.mesh_shape(cfg.mesh, n)
  except config_lib.ConfigError as e:
    slices_txt = f" x {num_slices} slices = {n}" if num_slices > 1 else ""
    raise config_lib.ConfigError(
        f"{per}{slices_txt}; {e}. Try {suggest_mesh(cfg.mesh, n)}") from e


def suggest_mesh(mesh_cfg, n: int) -> str:
  """Flags for a mesh of `n` devices: the config's data and tensor sizes
  where they divide `n`, fsdp taking the rest."""
  dcn = int(mesh_cfg.get("dcn_data", 1) or 1)
  per_slice = n // dcn
  tensor = max(int(mesh_cfg.tensor), 1)
  tensor = tensor if per_slice % tensor == 0 else 1
  ctx = max(int(mesh_cfg.get("context", 1)), 1)
  ctx = ctx if (per_slice // tensor) % ctx == 0 else 1
  data = max(int(mesh_cfg.data), 1)
  data = data if (per_slice // (tensor * ctx)) % data == 0 else 1
  fsdp = per_slice // (tensor * ctx * data)
  return (f"--config.mesh.data={data} --config.mesh.fsdp={fsdp} "
          + (f"--config.mesh.context={ctx} " if ctx > 1 else "")
          + f"--config.mesh.tensor={tensor}")


def xla_cost(compiled) -> dict:
  """Per-device FLOPs, bytes and seconds from XLA's cost model of one
  compiled program, the -1 s sentinels of `UNCOSTED_CALLS` added back, and
  how many while loops it holds (each of them counted once)."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  text = compiled.as_text()
  uncosted = sum(text.count(f'custom_call_target="{c}"')
                 for c in UNCOSTED_CALLS)
  return {"flops": float(ca.get("flops", 0.0)),
          "bytes": float(ca.get("bytes accessed", 0.0)),
          "seconds": float(ca.get("optimal_seconds", 0.0)) + uncosted,
          "loops": text.count(" while(")}


def estimate(cfg, vocab_size: int, devices) -> dict:
  """XLA's estimate of one step's FLOPs and time per device, every loop
  counted.

  `cost_analysis()` counts a while loop's body once, and a step has three
  kinds: the layer scan, the microbatch scan and the windowed-einsum loops
  XLA adds around fsdp's all-gathers (and the chunked loss's loop). So the
  cost model runs on loop-free programs instead: one microbatch, layers
  unrolled, windowed einsum off, the loss in one chunk, with 2 and 3
  layers. From the second layer on a layer adds the same FLOPs (the first
  differs), so a step costs
  microbatches x (c2 + (num_layers - 2) x (c3 - c2)). Left out: the
  optimizer update is counted once per microbatch (tiny next to the
  matmuls); with remat the last layer's recomputation, which XLA merges
  with its forward in unrolled code but not in the scanned loop. Checked
  against a 6-layer unrolled program (v5p, fsdp 4, remat full): FLOPs
  within 0.01%, XLA's time within 11% (its per-layer time varies by that
  much with buffer assignment).
  """
  micro, layers = cfg.train.microbatches, cfg.model.num_layers
  options = ESTIMATE_OPTIONS if devices[0].platform == "tpu" else None
  points = (layers,) if layers <= 3 else (2, 3)
  costs = []
  for depth in points:
    variant = config_lib.with_overrides(cfg, {
        "model.num_layers": depth, "model.scan_unroll": depth,
        "train.microbatches": 1,
        "train.batch_size": cfg.train.batch_size // micro})
    if variant.model.get("logits_chunk", 0):  # one chunk: no loop, same FLOPs
      variant.model.logits_chunk = variant.train.seq_len
    costs.append(xla_cost(compile_abstract(variant, vocab_size, devices,
                                           options)[0]))
  first, last = costs[0], costs[-1]
  extra = layers - points[0]
  out = {k: micro * (first[k] + extra * (last[k] - first[k]))
         for k in ("flops", "bytes", "seconds")}
  out["loops_left"] = sum(c["loops"] for c in costs)
  out["method"] = (f"loop-free programs ({' and '.join(map(str, points))} "
                   "layers unrolled, one microbatch, windowed einsum off), "
                   f"extrapolated to {layers} layers x {micro} "
                   "microbatch(es)")
  return out


def hints(cfg, vocab_size: int, n_devices: int, error: str | None) -> list:
  """What else would shrink the step, with the bytes it would save:
  attention scores and full logits (beyond what `candidates` searches)."""
  out = []
  data, fsdp, context, tensor = shd.mesh_shape(cfg.mesh, n_devices)
  rows = max(cfg.train.batch_size // cfg.train.microbatches // (data * fsdp),
             1)
  seq = cfg.train.seq_len
  attention = cfg.model.get("attention", "xla")  # the key may not exist yet
  vmem = bool(error and "vmem" in error.lower())
  if (attention == "xla" and seq >= 4096) or (attention != "splash" and
                                              vmem):
    scores = rows * cfg.model.num_heads // tensor * seq // context * seq * 4
    have = "attention" in cfg.model
    out.append(
        f"attention: the xla attention materialises float32 scores "
        f"[{rows}, {cfg.model.num_heads // tensor}, {seq // context}, {seq}] "
        "per device "
        f"and layer ({fmt_bytes(scores)}, kept for the backward too); "
        "Pallas splash attention never does: --config.model.attention=splash"
        + ("" if have else " (not in this llmlab yet)"))
  if vocab_size >= 65536 and not cfg.model.get("logits_chunk", 0):
    logits = rows * seq // context * -(-vocab_size // tensor) * 4
    out.append(f"logits: [{rows}, {seq // context}, {vocab_size}] float32 logits are "
               f"{fmt_bytes(logits)} per device (and their gradient as much); "
               "--config.model.logits_chunk=1024 computes the loss a chunk of "
               "positions at a time")
  return out


def plan_target(cfg, target: str, num_slices: int = 1, vocab_size: int = 0,
                suggest: bool = True, max_compiles: int = 6,
                with_estimate: bool = True) -> dict:
  """`plan` for a Cloud TPU slice by name, compiled by libtpu's TPU
  compiler on this machine: memory per device against the chip's HBM,
  XLA's estimated step time and the MFU it implies."""
  cfg = config_lib.merge_defaults(cfg)
  sl = slices.parse(target)
  check_mesh(cfg, sl, num_slices)
  if not slices.have_libtpu():
    raise errors.UsageError(f"--target={target}: compiling for a TPU slice needs "
                     f"libtpu: {slices.INSTALL_HINT}")
  # Compile-only TPU executables cannot be loaded back from JAX's persistent
  # cache: every compile would warn and write big files for nothing.
  jax.config.update("jax_enable_compilation_cache", False)
  _, devices = target_devices(target, num_slices)
  vocab = vocab_size or _vocab_size(cfg)
  t0 = time.perf_counter()
  res = plan(cfg, devices, device=sl.generation, vocab_size=vocab,
             suggest=suggest, max_compiles=max_compiles)
  res["compile_s"] = time.perf_counter() - t0
  cfg = config_lib.with_overrides(cfg, {"model.scan_unroll":
                                        cfg.model.scan_unroll or 1})
  rep = res["per_device"] or {}
  res.update(target=sl.name, num_slices=num_slices, vocab_size=vocab,
             libtpu_init_args=os.environ.get("LIBTPU_INIT_ARGS", ""),
             hbm_bytes=res["limit_bytes"], bytes_per_device=rep.get("peak"),
             temp_bytes=rep.get("activations_and_temps"),
             hints=hints(cfg, vocab, len(devices), res["compile_error"]))
  res.update(_step_figures(cfg, vocab, devices, with_estimate and bool(rep)))
  res["offload"] = offload_saving(cfg, vocab, devices, rep)
  return res


def offload_baseline(cfg) -> dict:
  """The overrides that keep in device memory what `cfg` offloads to the
  host ({} if it offloads nothing): optim.offload=none, and remat dots
  for a host-offloading remat (the same saved values, kept on device)."""
  out = {}
  if cfg.optim.get("offload", "none") != "none":
    out["optim.offload"] = "none"
  if cfg.model.remat in config_lib.OFFLOAD_REMATS:
    out["model.remat"] = "dots"
  return out


def offload_saving(cfg, vocab_size: int, devices, rep: dict) -> dict | None:
  """Device memory that offloading saves: the peak of `cfg`'s step against
  the same step with everything kept on the device (one more compile);
  None if `cfg` offloads nothing."""
  base = offload_baseline(cfg)
  if not base or not rep:
    return None
  base_rep, error = _measure_or_error(config_lib.with_overrides(cfg, base),
                                      vocab_size, devices)
  out = {"baseline_overrides": base, "baseline_peak": None,
         "hbm_saved": None, "host_bytes": rep.get("host", 0),
         "baseline_error": error}
  if base_rep:
    out.update(baseline_peak=base_rep["peak"],
               hbm_saved=base_rep["peak"] - rep["peak"])
  return out


def _step_figures(cfg, vocab_size: int, devices, run: bool) -> dict:
  """flops_per_step, estimated_step_s, estimated_mfu (None when the step
  was not estimated) and the model FLOPs MFU divides by."""
  mcfg = model_lib.ModelConfig.from_config(cfg.model, vocab_size)
  tokens = cfg.train.batch_size * cfg.train.seq_len
  model_flops = model_lib.flops_per_token(mcfg, cfg.train.seq_len)[
      "train"] * tokens
  peak = perf.peak_for_kind(devices[0].device_kind)
  out = {"model_flops_per_step": model_flops, "peak_flops_per_chip": peak,
         "flops_per_step": None, "estimated_step_s": None,
         "estimated_mfu": None, "estimate": None}
  if not run:
    return out
  t0 = time.perf_counter()
  est = estimate(cfg, vocab_size, devices)
  est["compile_s"] = time.perf_counter() - t0
  if est["seconds"] > 0:
    est["kernel"] = kernel_estimate(cfg, mcfg, devices, est)
  flops, seconds = est["flops"], est["seconds"]
  if est.get("kernel"):
    flops += est["kernel"]["flops"]
    seconds += est["kernel"]["seconds"]
  out.update(estimate=est, flops_per_step=flops * len(devices))
  if seconds > 0:
    out["estimated_step_s"] = seconds
    if peak:
      out["estimated_mfu"] = model_flops / (seconds * peak * len(devices))
  return out


# Matmuls of one attention layer's training step in units of its forward
# pass (QK^T and PV): the backward of splash (jax.experimental.pallas.ops.
# tpu.splash_attention) recomputes the scores in both of its kernels, dq
# (QK^T, dO V^T, dS K) and dkv (QK^T, P^T dO, dO V^T, dS^T Q): 7 matmuls,
# 3.5 forwards; remat full adds one more forward.
SPLASH_PASSES = {"none": 4.5, "dots": 4.5, "full": 5.5}


def kernel_estimate(cfg, mcfg, devices, est: dict) -> dict | None:
  """Splash attention's share of the step, which XLA's cost model cannot
  see (a Pallas kernel is one custom call it books at ~0 FLOPs and ~0 s).

  FLOPs: the causal attention matmuls (half the score square; the kernel
  skips fully masked blocks) times SPLASH_PASSES, per device. Time: those
  FLOPs at the rate XLA's cost model gives the rest of the step (its
  FLOPs / its seconds) -- the assumption that the kernel is as efficient
  as the matmuls around it, since nothing on this machine can time it.
  Under context parallelism the load-balanced layout gives every device
  the same causal share, so the per-device FLOPs are the same total / n.
  None when the step does not use splash."""
  plat = devices[0].platform
  context = shd.mesh_shape(cfg.mesh, len(devices))[2]
  kernel, _ = attention_lib.resolve(mcfg, plat, cfg.train.seq_len, context)
  if kernel != "splash":
    return None
  tokens = cfg.train.batch_size * cfg.train.seq_len
  forward = (2.0 * mcfg.num_layers * cfg.train.seq_len * mcfg.num_heads *
             mcfg.head_size * tokens)
  flops = forward * SPLASH_PASSES.get(cfg.model.remat, 4.5) / len(devices)
  rate = est["flops"] / est["seconds"]
  return {"name": "splash", "flops": flops, "seconds": flops / rate,
          "rate_flops_per_s": rate,
          "method": "causal attention FLOPs x "
                    f"{SPLASH_PASSES.get(cfg.model.remat, 4.5)} passes at "
                    "the cost model's FLOP rate for the rest of the step"}


def format_plan(res: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in res["mesh"].items())
  where = (f"{res['target']}" + (f" x {res['num_slices']} slices"
                                 if res.get("num_slices", 1) > 1 else "") +
           f" ({res['devices']} {res['device_kind']} devices, compiled by "
           "libtpu)" if res.get("target") else
           f"{res['devices']} {res['device_kind']} device(s)")
  lines = [f"llmlab plan: {res['config'] or 'config'} on {where}, mesh {mesh}"]
  if res.get("target"):
    lines.append("LIBTPU_INIT_ARGS: " + (res["libtpu_init_args"] or
                                         "(libtpu's defaults)"))
  if res["per_device"]:
    lines += ["per device (XLA memory analysis of the train step):",
              format_report(res["per_device"], res["limit_bytes"],
                            res["limit_source"])]
  else:
    lines.append(f"the train step does not compile: {res['compile_error']}")
  lines += _format_estimate(res)
  off = res.get("offload")
  if off and off.get("hbm_saved") is not None:
    flags = " ".join(f"--config.{k}={v}" for k, v in
                     off["baseline_overrides"].items())
    lines.append(f"offload: {fmt_bytes(off['hbm_saved'])} of device memory "
                 f"saved per device (peak {fmt_bytes(off['baseline_peak'])} "
                 f"with {flags}); {fmt_bytes(off['host_bytes'])} in host "
                 "memory")
  elif off:
    lines.append(f"offload: baseline did not compile: {off['baseline_error']}")
  if res["limit_bytes"] is None and res["per_device"]:
    lines.append("fits: unknown (pass --device=NAME or --hbm_gb=N)")
  elif res["fits"]:
    lines.append("fits: yes")
  else:
    lines.append(f"fits: NO, the peak exceeds {fmt_bytes(res['limit_bytes'])}"
                 if res["per_device"] else "fits: NO (does not compile)")
    lines += _format_search(res)
  lines += [f"hint: {h}" for h in res.get("hints", [])]
  return "\n".join(lines)


def _format_estimate(res: dict) -> list[str]:
  if not res.get("target"):
    return []
  est = res.get("estimate")
  if not est:
    return ["step time: not estimated"]
  lines = [f"XLA cost model, per step: {res['flops_per_step']:.3g} FLOPs "
           f"(all devices, remat included; model FLOPs "
           f"{res['model_flops_per_step']:.3g})"]
  if res["estimated_step_s"]:
    mfu = res["estimated_mfu"]
    t = res["estimated_step_s"]
    lines.append("estimated step time " +
                 (f"{t:.3f} s" if t >= 0.1 else f"{t * 1e3:.3f} ms")
                 + (f" -> MFU {100 * mfu:.1f}% of "
                    f"{res['peak_flops_per_chip']:.3g} FLOP/s per chip"
                    if mfu else ""))
  else:
    lines.append("estimated step time: XLA's cost model gave none")
  if est.get("kernel"):
    k = est["kernel"]
    lines.append(f"  of which {k['name']} attention {k['seconds']:.3g} s, "
                 f"{k['flops'] * res['devices']:.3g} FLOPs, estimated apart "
                 f"({k['method']})")
  lines.append(f"  ({est['method']}; collectives are not costed: "
               "llmlab/plan.py)")
  return lines


def _format_search(res: dict) -> list[str]:
  lines = []
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
    what = (f", peak {fmt_bytes(peak)}" if peak else
            ", does not compile" if t.get("compile_error") else
            ", not compiled")
    lines.append(f"  tried {t['overrides']}: state "
                 f"{fmt_bytes(t['state_bytes'])}{what}")
  return lines
