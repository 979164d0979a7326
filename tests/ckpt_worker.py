"""Bodies for tests/test_checkpoints.py.

  ckpt_worker.py train FLAGS...   `llmlab train FLAGS...`, but each batch is
                                  delayed by $CKPT_WORKER_SLEEP seconds so a
                                  test can kill the run mid-way reliably (the
                                  delay changes no number).
  mesh_check(spec)                on 8 simulated devices (the session's
                                  `devices(8)` process): save a state sharded
                                  over mesh (2,2,2), restore it on 1 device
                                  and on fsdp=8, `llmlab.load` it.
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["JAX_PLATFORMS"] = "cpu"


def slow_train(argv):
  from llmlab import data as data_lib
  from llmlab import main
  delay = float(os.environ.get("CKPT_WORKER_SLEEP", "0"))
  build = data_lib.build

  def slow_build(*args, **kwargs):
    data = build(*args, **kwargs)
    train_iter = data.train_iter

    def slow_iter(start_step):
      for batch in train_iter(start_step):
        time.sleep(delay)
        yield batch
    data.train_iter = slow_iter
    return data

  data_lib.build = slow_build
  sys.argv = ["llmlab", "train", *argv]  # what the resume message echoes
  main.run()


def _config(spec, mesh):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import tiny
  c = tiny.get_config("smoke")
  c.model.update(spec["model"])
  c.train.update(seq_len=spec["seq_len"])
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def mesh_check(spec):
  """Save a (2,2,2)-sharded state; restore it on other meshes, bitwise."""
  import jax
  import numpy as np
  from llmlab import api
  from llmlab import checkpoints as ckpt_lib
  from llmlab import config as config_lib
  from llmlab import sharding as shd
  from llmlab import steps as steps_lib

  workdir, vocab, step = spec["workdir"], spec["vocab"], 3

  def setup_on(mesh, devices):
    cfg = _config(spec, mesh)
    return cfg, steps_lib.build(cfg, vocab, shd.make_mesh(cfg.mesh, devices))

  cfg, setup = setup_on((2, 2, 2), jax.devices())
  # Distinct random values in every leaf (Adam's moments would be zeros),
  # placed straight into the (2,2,2) layout: nothing to compile.
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda a: jax.device_put(
          rng.standard_normal(a.shape).astype(a.dtype), a.sharding),
      setup.abstract_state)
  saved = [np.asarray(x) for x in jax.tree.leaves(state)]
  mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps)
  mgr.save(step, state, {"config": config_lib.to_dict(cfg), "step": step,
                         "model_info": {"vocab_size": vocab}}, force=True)
  mgr.close()
  out = {"saved_devices": len(jax.tree.leaves(state)[1].sharding.device_set),
         "restores": {}}
  for name, mesh, devices in (("mesh222", (2, 2, 2), jax.devices()),
                              ("one_device", (1, 1, 1), jax.devices()[:1]),
                              ("fsdp8", (1, 8, 1), jax.devices())):
    cfg, setup = setup_on(mesh, devices)
    mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps,
                           read_only=True)
    restored, _ = mgr.restore(step, setup.abstract_state)
    mgr.close()
    leaves = jax.tree.leaves(restored)
    out["restores"][name] = {
        "placed": all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
            leaves, jax.tree.leaves(setup.state_shardings))),
        "devices": len({d.id for x in leaves for d in x.sharding.device_set}),
        "bitwise_equal": all(
            a.dtype == b.dtype and a.shape == b.shape and
            a.tobytes() == np.asarray(b).tobytes()
            for a, b in zip(saved, leaves))}
  run = api.load(workdir)  # params only, 1 device
  tokens_BxL = np.arange(2 * 8).reshape(2, 8) % vocab
  logits = np.asarray(run.logits(tokens_BxL))
  out["load"] = {"step": run.step, "logits_shape": list(logits.shape),
                 "finite": bool(np.isfinite(logits).all()),
                 "devices": len({d.id for x in jax.tree.leaves(run.params)
                                 for d in x.sharding.device_set})}
  return out


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "train":
    slow_train(sys.argv[2:])
  else:
    sys.exit(f"unknown mode {mode!r}")
