"""Attention kernels compiled for a TPU v5p chip on this CPU host: memory and
time of one device's attention layer (forward + backward), splash vs xla.

    pip install -e ".[tpu]"   # libtpu==0.0.42: the TPU compiler, no TPU needed
    python benchmarks/attention_kernels.py [--seqs=2048,8192] [--models=1b,7b]
        [--chip=v5p] [--block_q=0 --block_kv=0]
    python benchmarks/attention_kernels.py --presets=1b_v5p32   # whole step

For the 1B and 7B presets (configs/presets.py) at each sequence length, one
device's share of a step is compiled with the real TPU compiler
(`jax.experimental.topologies.get_topology_desc`): the presets' 16 sequences
per device at 2048 tokens (1b_v5p32: 512 rows over fsdp=32; 7b_v5p128: 1024
over fsdp=64, heads split over tensor=2), and the same tokens per device at
longer lengths (4 sequences at 8192). bfloat16 q/k/v, packed-document
segment ids, GQA (32 query / 8 kv heads; 16 / 4 per device for 7B).

Only the attention core is compiled (q, k, v, segment ids -> output, and its
VJP), not the whole model: the whole 7B step takes minutes to compile on a
2-core host, and the attention core is where the kernels differ.

Reported per device:
- `temp`: XLA's memory analysis, temporaries of the fwd+bwd program (what the
  kernel needs beyond its inputs and outputs).
- `TFLOP` and `ms@peak` (those flops at the chip's dense bf16 peak: a lower
  bound, perfect MXU use, no memory stalls) for both kernels.
- xla kernel: its flops are XLA's count (the full L x S scores: no causal
  skipping); `XLA est ms` is XLA's cost model (`optimal_seconds`), which
  also charges the O(L^2) float32 traffic.
- splash: XLA's cost model cannot see inside a Pallas kernel (`XLA-seen
  TFLOP` ~0, so no `XLA est ms`). Its time is ESTIMATED as the kernel's own
  matmul flops at the chip's peak (`ms@peak`).
  The flops count every (q block, kv block) tile the causal block mask
  visits: forward 2 matmuls per tile, backward 7 (dkv kernel: s, dp, dv,
  dk; dq kernel: s, dp, dq). Segment ids skip no tiles at compile time.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Only compiling: let other processes on this host use libtpu meanwhile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llmlab import attention  # noqa: E402
from llmlab import model as model_lib  # noqa: E402
from llmlab import perf  # noqa: E402

# preset -> (query heads, kv heads, head size) on one device, sequences per
# device at 2048 tokens.
SHAPES = {"1b": (32, 8, 64, 16), "7b": (16, 4, 128, 16)}
# chip -> get_topology_desc arguments of its smallest slice, peak key.
CHIPS = {
    "v5p": (dict(topology_name="v5:2x2x1", chip_config_name="megacore",
                 chips_per_host_bounds=(2, 2, 1), num_slices=1,
                 wrap=(False, False, False)), "tpu v5p"),
    "v5e": (dict(topology_name="v5e:2x2", chip_config_name="default",
                 chips_per_host_bounds=(2, 2, 1), num_slices=1,
                 wrap=(False, False, False)), "tpu v5e"),
}
# preset slice -> its topology (one JAX device per chip; v5p: megacore).
SLICES = {
    "v5p32": dict(topology_name="v5:2x2x4", chip_config_name="megacore",
                  chips_per_host_bounds=(2, 2, 1), num_slices=1,
                  wrap=(False, False, True)),
    "v5p128": dict(topology_name="v5:4x4x4", chip_config_name="megacore",
                   chips_per_host_bounds=(2, 2, 1), num_slices=1,
                   wrap=(True, True, True)),
    "v5e8": dict(topology_name="v5e:2x4", chip_config_name="default",
                 chips_per_host_bounds=(2, 2, 1), num_slices=1,
                 wrap=(False, False, False)),
}
GiB = 2.0 ** 30


def tpu_device(chip: str):
  from jax.experimental.topologies import get_topology_desc
  try:
    devices = get_topology_desc(platform="tpu", **CHIPS[chip][0]).devices
  except Exception as e:  # noqa: BLE001 - libtpu missing or too old
    sys.exit(f"cannot compile for TPU here ({e}); install the compiler with "
             '`pip install -e ".[tpu]"` (libtpu==0.0.42)')
  return devices[0]


def xla_core(q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL):
  """The model's xla path: additive mask from segments, `_attention`."""
  b, h, l, e = q_BxHxLxE.shape
  mask = jnp.tril(jnp.ones((l, l), bool))[None] & (
      seg_BxL[:, :, None] == seg_BxL[:, None, :])
  bias_BxLxS = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
  q = q_BxHxLxE.reshape(b, k_BxKxLxE.shape[1], -1, l, e)
  o = model_lib._attention(q, k_BxKxLxE, v_BxKxLxE, bias_BxLxS,
                           jnp.bfloat16, jnp.bfloat16)
  return o.reshape(b, h, l, e).astype(jnp.bfloat16)


def fwd_bwd(core):
  def f(q, k, v, seg, do):
    out, vjp = jax.vjp(lambda q, k, v: core(q, k, v, seg), q, k, v)
    return out, vjp(do)
  return f


def splash_flops(b, h, l, e, blocks) -> float:
  """Matmul flops of the tiles the causal block mask visits (fwd + bwd)."""
  def tiles(bq, bkv):
    q_end = (np.arange(l // bq) + 1) * bq - 1
    return int(np.sum(q_end[:, None] >= np.arange(l // bkv)[None] * bkv))
  per = lambda bq, bkv, mm: tiles(bq, bkv) * mm * 2.0 * bq * bkv * e
  fwd = per(blocks.block_q, blocks.block_kv, 2)
  dkv = per(blocks.block_q_dkv, blocks.block_kv_dkv, 4)
  dq = per(blocks.block_q_dq, blocks.block_kv_dq, 3)
  return b * h * (fwd + dkv + dq)


def compile_core(core, device, shapes):
  mesh = jax.sharding.Mesh(np.array([device]), ("x",))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = [jax.ShapeDtypeStruct(s, d, sharding=repl) for s, d in shapes]
  t = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(fwd_bwd(core)).lower(*args).compile()
  return compiled, time.perf_counter() - t


def measure(name, seq, device, peak, block_q, block_kv):
  h, k, e, b2048 = SHAPES[name]
  b = max(1, b2048 * 2048 // seq)
  bf = jnp.bfloat16
  shapes = [((b, h, seq, e), bf), ((b, k, seq, e), bf), ((b, k, seq, e), bf),
            ((b, seq), jnp.int32), ((b, h, seq, e), bf)]
  cfg = model_lib.ModelConfig(vocab_size=8, num_layers=1, d_model=h * e,
                              num_heads=h, num_kv_heads=k, mlp_dim=8,
                              dtype="bfloat16", attention="splash",
                              attention_block_q=block_q,
                              attention_block_kv=block_kv)
  splash = lambda q, kk, v, s: attention.attend("splash", q, kk, v, s, cfg)
  rows = []
  for kernel, core in (("xla", xla_core), ("splash", splash)):
    try:
      compiled, secs = compile_core(core, device, shapes)
    except jax.errors.JaxRuntimeError as err:  # e.g. the compiler's OOMs
      rows.append(dict(model=name, seq=seq, batch=b, kernel=kernel,
                       error=str(err).splitlines()[0][:160]))
      continue
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    if kernel == "splash":
      flops = splash_flops(b, h, seq, e, attention._block_sizes(cfg, seq))
      xla_ms = float("nan")  # the cost model is blind inside the kernel
    else:
      flops, xla_ms = cost["flops"], cost["optimal_seconds"] * 1e3
    rows.append(dict(model=name, seq=seq, batch=b, kernel=kernel,
                     temp=mem.temp_size_in_bytes / GiB,
                     args=mem.argument_size_in_bytes / GiB, flops=flops,
                     peak_ms=flops / peak * 1e3, xla_ms=xla_ms,
                     xla_flops=cost.get("flops", 0.0), compile_s=secs))
  return rows


def preset_step(preset: str, kernel: str) -> dict:
  """Per-device memory of a preset's whole train step (`llmlab.plan`) on its
  TPU slice with `model.attention=kernel`. The slice has one device per
  chip, so fsdp takes what data and tensor leave (the presets count
  TensorCores: 1b_v5p32 asks for 32 devices, a v5p-32 has 16 chips)."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
  import presets
  from jax.experimental.topologies import get_topology_desc
  from llmlab import plan
  devices = get_topology_desc(platform="tpu",
                              **SLICES[preset.split("_")[1]]).devices
  cfg = presets.get_config(preset)
  cfg.mesh.fsdp = len(devices) // (cfg.mesh.data * cfg.mesh.tensor)
  cfg.model.update(scan_unroll=1, attention=kernel)
  t = time.perf_counter()
  rep = plan.measure(cfg, 32_000, devices)
  return dict(rep, compile_s=time.perf_counter() - t, devices=len(devices),
              mesh=(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))


def main_presets(names: str) -> None:
  print("whole train step per device (llmlab.plan on the TPU compiler), "
        "vocab 32000, scan_unroll=1")
  for preset in names.split(","):
    for kernel in ("splash", "xla"):
      try:
        r = preset_step(preset, kernel)
      except jax.errors.JaxRuntimeError as err:
        print(f"{preset} {kernel}: does not compile: "
              f"{str(err).splitlines()[0][:160]}", flush=True)
        continue
      print(f"{preset} {kernel:6} {r['devices']} devices mesh {r['mesh']}: "
            f"activations+temps {r['activations_and_temps'] / GiB:.2f} GiB, "
            f"peak {r['peak'] / GiB:.2f} GiB (compiled in "
            f"{r['compile_s']:.0f} s)", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="1b,7b")
  p.add_argument("--seqs", default="2048,8192")
  p.add_argument("--chip", default="v5p", choices=sorted(CHIPS))
  p.add_argument("--block_q", type=int, default=0)
  p.add_argument("--block_kv", type=int, default=0)
  p.add_argument("--presets", default="",
                 help="instead: compile these presets' whole train steps, "
                      "e.g. 1b_v5p32 (minutes each on 2 cores)")
  a = p.parse_args()
  device = tpu_device(a.chip)
  if a.presets:
    return main_presets(a.presets)
  peak = perf.PEAK_FLOPS[CHIPS[a.chip][1]]
  print(f"device: {device.device_kind} ({a.chip}), dense bf16 peak "
        f"{peak / 1e12:.0f} TFLOP/s; one device's attention core, fwd+bwd")
  print(f"{'model':5} {'seq':>5} {'B':>3} {'kernel':7} {'temp GiB':>9} "
        f"{'in GiB':>7} {'TFLOP':>6} {'ms@peak':>8} {'XLA est ms':>10} "
        f"{'XLA-seen TFLOP':>14} {'compile s':>9}")
  for name in a.models.split(","):
    for seq in (int(s) for s in a.seqs.split(",")):
      for r in measure(name, seq, device, peak, a.block_q, a.block_kv):
        if "error" in r:
          print(f"{r['model']:5} {r['seq']:5d} {r['batch']:3d} {r['kernel']:7} "
                f"does not compile: {r['error']}", flush=True)
          continue
        print(f"{r['model']:5} {r['seq']:5d} {r['batch']:3d} {r['kernel']:7} "
              f"{r['temp']:9.2f} {r['args']:7.2f} {r['flops'] / 1e12:6.2f} "
              f"{r['peak_ms']:8.2f} {r['xla_ms']:10.2f} "
              f"{r['xla_flops'] / 1e12:14.3f} {r['compile_s']:9.1f}",
              flush=True)

if __name__ == "__main__":
  main()
