"""Context-parallel checks of tests/test_context.py; `main(spec)` runs on 8
simulated CPU devices in the session's `devices(8)` process.

For each mesh (data, fsdp, context, tensor): the loss and gradients of one
batch of packed documents (GQA model), the losses of a few train steps,
and the load-balanced slot order the model used.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmlab import attention as attention_lib
from llmlab import config as config_lib
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from llmlab.objectives.next_token import target_mask, token_nll

VOCAB = 64
BATCH, SEQ = 4, 64  # SEQ: spec["seq"] (main sets it)


def tiny_cfg(mesh, steps=3, attention="xla"):
  c = config_lib.base()
  # splash (interpret mode) is slow to compile: one layer body, run twice.
  c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, attention=attention,
                 scan_unroll=1 if attention == "splash" else 0)
  c.train.update(steps=steps, batch_size=BATCH, seq_len=SEQ,
                 learning_rate=1e-2)
  c.optim.warmup_steps = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = mesh
  return c


def packed_batches(n):
  """Rows of several documents of random lengths (boundaries fall inside
  and across sequence shards), positions restarting per document, padding
  (segment 0) at the end of some rows."""
  rng = np.random.default_rng(0)
  for _ in range(n):
    seg = np.zeros((BATCH, SEQ), np.int32)
    pos = np.zeros((BATCH, SEQ), np.int32)
    for r in range(BATCH):
      cuts = np.sort(rng.choice(np.arange(1, SEQ), 4, replace=False))
      for d, (a, z) in enumerate(zip([0, *cuts], [*cuts, SEQ])):
        seg[r, a:z], pos[r, a:z] = d + 1, np.arange(z - a)
    seg[1, -5:], pos[1, -5:] = 0, 0
    yield {"tokens": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
           "segment_ids": seg, "positions": pos,
           "bytes": np.ones((BATCH, SEQ), np.int32)}


def run(mesh, steps, attention):
  cfg = tiny_cfg(mesh, max(steps, 1), attention)
  config_lib.validate(cfg, int(np.prod(mesh)))
  m = shd.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh))])
  setup = steps_lib.build(cfg, VOCAB, m)
  state = steps_lib.init_state(setup, 0)
  batch = shd.global_batch(next(packed_batches(1)), setup.batch_sharding)

  def loss_fn(params, b):
    logits = setup.model.apply({"params": params}, b["tokens"],
                               b["segment_ids"], b["positions"])
    mask = target_mask(b).astype(jnp.float32)
    return jnp.sum(token_nll(logits, b["tokens"])[0] * mask) / jnp.sum(mask)

  with jax.set_mesh(m), nn.logical_axis_rules(setup.rules):
    order = attention_lib.context_order(SEQ)
    loss, grads = jax.jit(
        jax.value_and_grad(loss_fn),
        in_shardings=(setup.state_shardings["params"], setup.batch_sharding),
        out_shardings=(shd.replicated(m), setup.state_shardings["params"]))(
            state["params"], batch)
  grads = jax.tree.map(lambda g: np.asarray(g).ravel().tolist(),
                       jax.device_get(grads))
  step = steps_lib.make_train_step(setup)
  losses = []
  for b in packed_batches(steps):
    state, met = step(state, shd.global_batch(b, setup.batch_sharding))
    losses.append(float(met["loss"]))
  return {"loss": float(loss), "grads": grads, "losses": losses,
          "order": None if order is None else order.tolist(),
          "batch_spec": str(setup.batch_sharding.spec)}


def main(spec):
  global SEQ
  SEQ = spec.get("seq", 64)
  return {
      f"{tuple(m)} {a}": run(tuple(m), spec.get("steps", 3), a)
      for m, a in zip(spec["meshes"], spec.get("attention",
                                                ["xla"] * len(spec["meshes"])))
  }
