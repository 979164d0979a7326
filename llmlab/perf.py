"""Peak FLOP/s per device, for model FLOPs utilisation (MFU).

MFU = achieved model FLOPs per second / (peak FLOP/s x devices), with model
FLOPs from `llmlab.model.flops_per_token` (no remat recomputation counted).
Accelerator peaks are the vendors' dense bf16 figures; on CPU there is no
meaningful datasheet number, so a short fp32 matmul probe measures what the
machine's matmul kernels actually reach.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# device_kind substring (lower case) -> dense bf16 peak FLOP/s per device.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "tpu7x": 2307e12,
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 70e12,
}

_probe_cache: dict[str, float] = {}


def peak_for_kind(device_kind: str) -> float | None:
  """The table's peak for a device kind ('TPU v5', 'NVIDIA H100 ...'), or
  None; first match wins, so 'tpu v5 lite' is listed before 'tpu v5'."""
  kind = device_kind.lower()
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def matmul_probe(n: int = 1024, repeats: int = 5,
                 dtype: str = "float32") -> float:
  """Measured matmul FLOP/s of one device (best of `repeats`).

  `dtype` is the operand dtype; sums (and the result) are float32, as in
  `llmlab.model.dense`, so a bf16 probe measures the bf16 matrix units
  (AMX / AVX512-BF16) that `model.matmul_dtype="bfloat16"` uses.
  """
  if dtype in _probe_cache:
    return _probe_cache[dtype]
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  _probe_cache[dtype] = 2.0 * n ** 3 / best
  return _probe_cache[dtype]


def peak_flops_per_device(override: float = 0.0,
                          matmul_dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s, where the number came from).

  On CPU the peak is probed with the operand dtype the model's products use
  (`matmul_dtype`), so MFU is measured against the kernels actually run.
  """
  if override and override > 0:
    return float(override), "config train.peak_flops"
  kind = jax.devices()[0].device_kind
  if peak_for_kind(kind):
    return peak_for_kind(kind), f"table ({kind})"
  kind = kind.lower()
  if jax.devices()[0].platform == "cpu":
    dtype = matmul_dtype or "float32"
    return matmul_probe(dtype=dtype), f"cpu {dtype} matmul probe"
  return 0.0, f"unknown device kind {kind!r} (set train.peak_flops)"
