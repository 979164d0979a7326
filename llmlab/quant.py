"""Quantised training through qwix (`model.quant = none | int8 | fp8`).

`steps.build` wraps the model with `qwix.quantize_model(model, provider)`:
qwix intercepts the einsums inside the model's call and runs the weight
products of the decoder layers (module paths `layers/attn`, `layers/mlp`:
q, k, v, o projections and the SwiGLU's three matrices) as quantised
products with straight-through gradients (quantisation-aware training,
Jacob et al. 2018), as MaxText's `quantization=int8|fp8` does through qwix:
weights, activations and the backward pass's gradients in int8 (per
channel, absmax) or fp8 (e4m3 forward, e5m2 gradients). The embedding, the
output projection and the attention core (scores, softmax, values) stay in
float, as in MaxText.

Params, gradients and optimizer state stay float; checkpoints hold ordinary
float params, so every other command (eval, sample, convert, a float
fine-tune) reads a quantised run's checkpoints. A run's own eval uses the
quantised forward (the model it trained), built the same way.

Which targets have the units: int8 runs anywhere (TPU v5e/v5p/v6e have
int8 MXUs; CPU and GPU compute it too). fp8 needs fp8 matmul hardware:
NVIDIA compute capability >= 8.9 (Ada, Hopper, Blackwell) or TPU7x
(Ironwood); `check` refuses it elsewhere (CPU, TPU v4-v6e, A100) before
anything compiles.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp

from llmlab import config as config_lib

MODES = config_lib.QUANTS
# qwix 0.1.8 checks isinstance(x, nnx.VariableState) on every product it
# traces; flax 0.12 warns for each (thousands per compile).
warnings.filterwarnings("ignore", message=".*'VariableState' was removed",
                        category=DeprecationWarning)
# Module paths of the quantised products (regex on qwix's '/'-joined linen
# path): the scanned decoder layers, not embedding / final projection.
LAYERS = r"layers/.*"


def fp8_support(device) -> tuple[bool, str]:
  """(True, "") if `device` has fp8 matmul units, else (False, why)."""
  plat = device.platform
  kind = str(getattr(device, "device_kind", plat))
  if plat == "gpu" or plat == "cuda":
    cc = getattr(device, "compute_capability", None)
    try:
      major, minor = (int(x) for x in str(cc).split(".")[:2])
    except ValueError:
      return False, f"{kind}: unknown CUDA compute capability {cc!r}"
    if (major, minor) >= (8, 9):
      return True, ""
    return False, (f"{kind} (compute capability {cc}) has no fp8 matmuls "
                   "(needs >= 8.9: Ada, Hopper, Blackwell)")
  if plat == "tpu":
    if "tpu7" in kind.lower() or "ironwood" in kind.lower():
      return True, ""
    return False, (f"{kind} has no fp8 matrix units (TPU7x has; v4-v6e have "
                   "bf16 and int8)")
  return False, f"{plat.upper()} has no fp8 matmul units"


def check(cfg_model, device) -> None:
  """ConfigError (one line, naming model.quant) if the mesh's devices
  cannot run `model.quant`; called by `steps.build` before tracing."""
  mode = cfg_model.get("quant", "none")
  if mode not in MODES:
    raise config_lib.ConfigError(
        f"config.model.quant={mode!r}: must be one of {', '.join(MODES)}")
  if mode == "fp8":
    ok, why = fp8_support(device)
    if not ok:
      raise config_lib.ConfigError(
          f"config.model.quant='fp8': {why}; use model.quant=int8 or none "
          "on this target")


def rules(mode: str) -> list:
  """qwix rules of `mode` (MaxText's int8 and fp8 recipes)."""
  import qwix  # noqa: PLC0415 (only quantised runs import it)
  if mode == "int8":
    fwd = bwd = jnp.int8
  elif mode == "fp8":
    fwd, bwd = jnp.float8_e4m3fn, jnp.float8_e5m2
  else:
    raise ValueError(f"model.quant={mode!r}: no rules")
  return [qwix.QtRule(module_path=LAYERS, op_names=("einsum",),
                      weight_qtype=fwd, act_qtype=fwd, bwd_qtype=bwd)]


def provider(mode: str):
  """A qwix QtProvider of `mode` whose einsums quantise only products
  with a parameter operand (the layers' weight matmuls): an
  activation x activation product (attention scores and values) in the
  same module stays in float."""
  import qwix  # noqa: PLC0415
  from qwix._src.utils import flax_util  # noqa: PLC0415

  class WeightProducts(qwix.QtProvider):

    def einsum(self, einsum_str, *operands, **kwargs):
      if not any(flax_util.find_param(x) is not None for x in operands):
        return jnp.einsum(einsum_str, *operands, **kwargs)
      out_dtype = kwargs.get("preferred_element_type")
      y = super().einsum(einsum_str, *operands, **kwargs)
      # qwix's quantised einsum ignores preferred_element_type.
      return y.astype(out_dtype) if out_dtype is not None else y

  return WeightProducts(rules(mode))


def wrap(model, mode: str):
  """`model` with its products quantised by qwix (the same module if
  `mode` is none)."""
  if mode in (None, "", "none"):
    return model
  import qwix  # noqa: PLC0415
  return qwix.quantize_model(model, provider(mode))


def is_quantized(model) -> bool:
  return hasattr(type(model), "_unquantized_type")
