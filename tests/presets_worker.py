"""Abstractly lower/compile the presets on simulated meshes -> bytes per
device (nothing is allocated). `main(variants, mode)` runs in the session's
`devices(n)` process: the mesh spans all n of its devices."""

import jax

from configs import presets
from llmlab import config as config_lib
from llmlab import sharding as shd
from llmlab import steps as steps_lib


def main(variants, mode=""):
  n = len(jax.devices())
  out = {}
  for variant in variants:
    cfg = presets.get_config(variant)
    cfg.model.scan_unroll = 1  # the rolled scan accelerators compile ("auto" unrolls on CPU)
    config_lib.validate(cfg, n)
    mesh = shd.make_mesh(cfg.mesh)
    setup = steps_lib.build(cfg, 32_000, mesh)
    state_bytes = shd.bytes_per_device(setup.abstract_state)
    param_bytes = shd.bytes_per_device(setup.abstract_state["params"])
    row = {"state_bytes_per_device": state_bytes,
           "param_bytes_per_device": param_bytes}
    if "compile" in mode:
      b, l = cfg.train.batch_size, cfg.train.seq_len
      batch = {k: jax.ShapeDtypeStruct((b, l), "int32",
                                       sharding=setup.batch_sharding)
               for k in steps_lib.BATCH_KEYS}
      step = steps_lib.make_train_step(setup)
      with jax.set_mesh(mesh):
        from flax import linen as nn
        with nn.logical_axis_rules(setup.rules):
          compiled = step.jitted.lower(setup.abstract_state, batch, None,
                                      setup.hparams).compile()
      mem = compiled.memory_analysis()
      row["temp_bytes_per_device"] = int(getattr(mem, "temp_size_in_bytes", 0))
    out[variant] = row
  return out
