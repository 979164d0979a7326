"""Offload checks of tests/test_offload.py; `main(spec)` runs in the
session's `devices(8)` process (8 simulated CPU devices) and returns,
for each run (mesh, optim.offload, model.remat) the losses of a few train
steps, the memory kind the optimizer state lives in between steps, and the
optimizer state's bytes per device in each memory space of the compiled
step.
"""

import jax
import numpy as np

from llmlab import config as config_lib
from llmlab import sharding as shd
from llmlab import steps as steps_lib

VOCAB, BATCH, SEQ = 64, 8, 32


def cfg_for(mesh, offload, remat, steps):
  c = config_lib.base()
  c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, remat=remat)
  c.train.update(steps=steps, batch_size=BATCH, seq_len=SEQ,
                 learning_rate=1e-2)
  c.optim.update(warmup_steps=1, offload=offload)
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = mesh
  return c


def batches(n):
  rng = np.random.default_rng(0)
  for _ in range(n):
    yield {"tokens": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
           "segment_ids": np.ones((BATCH, SEQ), np.int32),
           "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
           "bytes": np.ones((BATCH, SEQ), np.int32)}


def _abstract_batch(setup):
  return {k: jax.ShapeDtypeStruct((BATCH, SEQ), np.int32,
                                  sharding=setup.batch_sharding)
          for k in steps_lib.BATCH_KEYS}


def run(mesh, offload, remat, steps):
  n = int(np.prod(mesh))
  cfg = cfg_for(mesh, offload, remat, steps)
  config_lib.validate(cfg, n)
  m = shd.make_mesh(cfg.mesh, jax.devices()[:n])
  setup = steps_lib.build(cfg, VOCAB, m)
  state = steps_lib.init_state(setup, 0)
  step = steps_lib.make_train_step(setup)
  with jax.set_mesh(m):
    compiled = step.jitted.lower(
        setup.abstract_state, _abstract_batch(setup), None,
        setup.hparams).compile()
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  losses = []
  with jax.set_mesh(m):  # the step as compiled above (one compile)
    for b in batches(steps):
      state, met = compiled(state, shd.global_batch(b, setup.batch_sharding),
                            None, setup.hparams)
      losses.append(float(met["loss"]))
  kinds = sorted({x.sharding.memory_kind
                  for x in jax.tree.leaves(state["opt_state"])})
  return {"losses": losses, "opt_memory_kinds": kinds,
          "host_argument_bytes": int(mem.host_argument_size_in_bytes),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "host_temp_bytes": int(mem.host_temp_size_in_bytes),
          "opt_state_bytes": shd.bytes_per_device(
              setup.abstract_state["opt_state"]),
          # host memory space in the compiled HLO: S(5) layouts
          "hlo_host_buffers": text.count("S(5)"),
          "param_memory_kinds": sorted({x.sharding.memory_kind for x in
                                        jax.tree.leaves(state["params"])})}


def main(spec):
  return {
      f"{tuple(r['mesh'])} {r['offload']} {r['remat']}":
          run(tuple(r["mesh"]), r["offload"], r["remat"], spec.get("steps", 3))
      for r in spec["runs"]}
