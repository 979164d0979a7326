"""Multi-device checks for tests/test_sharding.py, run on 8 simulated CPU
devices by the session's `devices(8)` process (`main(spec)`).
Trains the same tiny model on the same random batches under several meshes
and reports per-step losses and per-device parameter bytes.
"""

import jax
import numpy as np

from llmlab import config as config_lib
from llmlab import sharding as shd
from llmlab import steps as steps_lib

VOCAB = 64


def tiny_cfg(mesh, steps, batch=8, seq=16, micro=1):
  c = config_lib.base()
  c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                 mlp_dim=64)
  c.train.update(steps=steps, batch_size=batch, seq_len=seq, microbatches=micro,
                 learning_rate=1e-2)
  c.optim.warmup_steps = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def batches(n, batch, seq):
  rng = np.random.default_rng(0)
  for _ in range(n):
    tokens = rng.integers(0, VOCAB, (batch, seq)).astype(np.int32)
    seg = np.ones((batch, seq), np.int32)
    seg[:, seq // 2:] = 2
    seg[0, -3:] = 0  # some padding
    pos = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])
    yield {"tokens": tokens, "segment_ids": seg,
           "positions": np.broadcast_to(pos, (batch, seq)).astype(np.int32),
           "bytes": np.ones((batch, seq), np.int32)}


def run(mesh, steps):
  cfg = tiny_cfg(mesh, steps)
  n = int(np.prod(mesh))
  m = shd.make_mesh(cfg.mesh, jax.devices()[:n])
  setup = steps_lib.build(cfg, VOCAB, m)
  state = steps_lib.init_state(setup, 0)
  param_bytes = shd.bytes_per_device(state["params"])
  step = steps_lib.make_train_step(setup)
  losses = []
  for b in batches(steps, 8, 16):
    state, met = step(state, shd.global_batch(b, setup.batch_sharding))
    losses.append(float(met["loss"]))
  return {"losses": losses, "param_bytes": param_bytes}


def main(spec):
  return {str(tuple(m)): run(tuple(m), spec["steps"]) for m in spec["meshes"]}
