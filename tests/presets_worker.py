"""Subprocess: abstractly lower/compile the presets on simulated meshes and
print bytes per device (nothing is allocated)."""

import json
import os
import sys

n = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import presets  # noqa: E402
from llmlab import config as config_lib  # noqa: E402
from llmlab import sharding as shd  # noqa: E402
from llmlab import steps as steps_lib  # noqa: E402

out = {}
for variant in sys.argv[2:]:
  cfg = presets.get_config(variant)
  cfg.model.scan_unroll = 1  # the rolled scan accelerators compile ("auto" unrolls on CPU)
  config_lib.validate(cfg, n)
  mesh = shd.make_mesh(cfg.mesh)
  setup = steps_lib.build(cfg, 32_000, mesh)
  state_bytes = shd.bytes_per_device(setup.abstract_state)
  param_bytes = shd.bytes_per_device(setup.abstract_state["params"])
  row = {"state_bytes_per_device": state_bytes,
         "param_bytes_per_device": param_bytes}
  if "compile" in os.environ.get("PRESET_MODE", ""):
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
print(json.dumps(out))
