"""Part 5 of issue 28, as an experiment: compile llmlab's train step for
one 8 x H100 node on a machine without a GPU (jax 0.10 deviceless GPU
compile), and print XLA's memory analysis per device.

Needs the CUDA PJRT plugin matching jax (no NVIDIA libraries, no driver):
    pip install --target /tmp/cudaplug --no-deps jax-cuda12-plugin==0.10.2 \
        jax-cuda12-pjrt==0.10.2
    PYTHONPATH=/tmp/cudaplug:. JAX_PLATFORMS=cpu \
        python benchmarks/gpu_deviceless.py [--preset=1b_gpu8] [--layers=N]
        [--attention=auto|xla]
The target is described by a GpuTargetConfigProto text (`H100`, the
fields of openxla/xla's backends/gpu/target_config/specs/h100_sxm.txtpb
that this jaxlib's proto knows). Results: docs/low-precision-and-offload.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000
  l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="1b_gpu8")
  ap.add_argument("--layers", type=int, default=0)
  ap.add_argument("--attention", default="auto")
  ap.add_argument("--quant", default="none")
  args = ap.parse_args()
  import jax  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415
  from llmlab import config as config_lib  # noqa: PLC0415
  from llmlab import plan  # noqa: PLC0415
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import presets  # noqa: PLC0415
  jax.config.update("jax_enable_compilation_cache", False)
  topo = topologies.get_topology_desc(platform="cuda", target_config=H100,
                                      topology="1x1x8")
  devices = topo.devices
  print(f"{len(devices)} compile-only devices: {devices[0].device_kind} "
        f"(platform {devices[0].platform})")
  cfg = config_lib.merge_defaults(presets.get_config(args.preset))
  cfg.model.scan_unroll = 1
  cfg.model.attention = args.attention
  cfg.model.quant = args.quant
  if args.layers:
    cfg.model.num_layers = args.layers
  t0 = time.perf_counter()
  try:
    compiled, setup = plan.compile_abstract(cfg, 32000, devices)
    rep = plan.memory_report(compiled, setup)
  except Exception as e:  # noqa: BLE001 - the experiment reports any error
    print(f"compile failed after {time.perf_counter() - t0:.0f} s: "
          f"{type(e).__name__}: {str(e)[:3000]}")
    traceback.print_exc(limit=8)
    return
  text = compiled.as_text() or ""
  print(f"compiled in {time.perf_counter() - t0:.0f} s; cuDNN attention "
        f"calls in the HLO: {text.count('__cudnn$fmha')}; per device:")
  print(plan.format_report(rep, 80 * plan.GiB, "H100 80 GB"))


if __name__ == "__main__":
  main()
