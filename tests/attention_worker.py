"""The attention-kernel checks of tests/test_attention.py; `main(spec)` runs
on 8 simulated CPU devices in the session's `devices(8)` process.

For each mesh (data, fsdp, tensor) and each `model.attention`, computes the
loss and gradients of the whole model (next-token objective, GQA, packed
documents and padding) with the state laid out by the config's rules, and
reports each run's loss and its gradients' largest relative difference from
the xla kernel on one device.
"""

import flax.linen as nn
import jax
import jax.extend.core
import numpy as np

from llmlab import config as config_lib
from llmlab import objectives
from llmlab import sharding as shd
from llmlab import steps as steps_lib

VOCAB, BATCH, SEQ = 64, 8, 128


def cfg_for(mesh, attention, **model):
  c = config_lib.base()
  # scan_unroll=1: one layer body to compile (interpret-mode kernels are
  # slow to compile), two layers to run.
  c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                 mlp_dim=128, scan_unroll=1, attention=attention, **model)
  c.train.update(steps=1, batch_size=BATCH, seq_len=SEQ)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def batch():
  """Packed rows: documents of varied lengths (positions restart), one row
  ending in padding (segment 0)."""
  rng = np.random.default_rng(0)
  seg = np.zeros((BATCH, SEQ), np.int32)
  pos = np.zeros((BATCH, SEQ), np.int32)
  for r in range(BATCH):
    cuts = np.sort(rng.choice(np.arange(1, SEQ), size=r % 4, replace=False))
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, SEQ])):
      seg[r, a:b], pos[r, a:b] = i + 1, np.arange(b - a)
  seg[0, -20:], pos[0, -20:] = 0, 0
  return {"tokens": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
          "segment_ids": seg, "positions": pos,
          "bytes": np.ones((BATCH, SEQ), np.int32)}


def loss_and_grads(mesh, attention, **model):
  """(loss, grads, per-device operand shapes of each shard_map)."""
  cfg = cfg_for(mesh, attention, **model)
  devices = jax.devices()[:int(np.prod(mesh))]
  setup = steps_lib.build(cfg, VOCAB, shd.make_mesh(cfg.mesh, devices))
  params = steps_lib.init_state(setup, 0)["params"]
  ctx = objectives.Context(apply=steps_lib.apply_fn(setup.model),
                           cfg=cfg.objective)
  objective = objectives.get("next_token")

  def mean_loss(p, b):
    loss_sum, sums = objective(ctx, p, b, jax.random.key(0))
    return loss_sum / sums["weight"]

  fn = jax.jit(jax.value_and_grad(mean_loss),
               in_shardings=(setup.state_shardings["params"],
                             setup.batch_sharding),
               out_shardings=(shd.replicated(setup.mesh),
                              setup.state_shardings["params"]))
  b = shd.global_batch(batch(), setup.batch_sharding)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    loss, grads = fn(params, b)
    local = shard_map_shapes(jax.make_jaxpr(fn)(params, b).jaxpr)
  return float(loss), jax.device_get(grads), local


def shard_map_shapes(jaxpr) -> list:
  """Per-device input shapes of every shard_map in a jaxpr (recursively)."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      out.append([list(v.aval.shape) for v in eqn.params["jaxpr"].invars])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += shard_map_shapes(sub)
  return out


def max_rel(a_tree, b_tree):
  return max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
             for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


def main(spec):
  ref_loss, ref_grads, _ = loss_and_grads((1, 1, 1), "xla")
  out = {"ref_loss": ref_loss}
  for mesh in spec["meshes"]:
    for attention in spec["attention"]:
      loss, grads, local = loss_and_grads(tuple(mesh), attention)
      out[f"{tuple(mesh)} {attention}"] = {
          "loss": loss, "grad_rel": max_rel(grads, ref_grads),
          "shard_map_shapes": local}
  return out
