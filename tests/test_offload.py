"""Memory offload: optim.offload=host keeps the optimizer state in pinned
host memory between steps; model.remat=offload_dots / minimal_offloaded
offload what remat dots saves. On CPU (1 and 8 simulated devices) the
losses equal those without offload; bad settings fail before compiling.

What CPU cannot show (jax 0.10): XLA:CPU has one physical memory, and
jax lowers an in-jit `device_put` to a memory kind (the step's move of the
state to the device, remat's Offloadable) to nothing on CPU
(jax/_src/dispatch.py `_common_device_put_lowering`; only TPU and GPU emit
the placement annotations). The CPU tests check numerics and where the
arrays live between steps; the integration tests compile for a TPU slice
(libtpu), where XLA's memory analysis shows the bytes leave device memory.
"""

import types

import pytest

from llmlab import config as config_lib
from llmlab import steps as steps_lib

RUNS = [  # mesh (data, fsdp, context, tensor), optim.offload, model.remat
    ([1, 1, 1, 1], "none", "dots"),
    ([1, 1, 1, 1], "host", "offload_dots"),
    ([2, 2, 1, 2], "none", "dots"),
    ([2, 2, 1, 2], "host", "minimal_offloaded"),
]


@pytest.fixture(scope="module")
def runs(devices):
  spec = {"steps": 3,
          "runs": [{"mesh": m, "offload": o, "remat": r} for m, o, r in RUNS]}
  return devices(8).call("tests.offload_worker:main", spec)


@pytest.mark.parametrize("mesh", ["(1, 1, 1, 1)", "(2, 2, 1, 2)"])
def test_offload_losses_equal_on_device_losses(runs, mesh):
  (base, off), = [[v for k, v in runs.items() if k.startswith(mesh)]]
  assert base["losses"] == off["losses"]  # bit for bit
  assert base["losses"][-1] < base["losses"][0]
  assert base["opt_memory_kinds"] == ["device"]
  assert off["opt_memory_kinds"] == ["pinned_host"]  # between steps
  assert off["param_memory_kinds"] == ["device"]
  # The compiled step's optimizer-state buffers are in host memory (S(5)).
  assert base["hlo_host_buffers"] == 0 < off["hlo_host_buffers"]


def test_one_device_equals_eight(runs):
  one = runs["(1, 1, 1, 1) host offload_dots"]["losses"]
  eight = runs["(2, 2, 1, 2) host minimal_offloaded"]["losses"]
  assert max(abs(a - b) / abs(a) for a, b in zip(one, eight)) < 1e-5


def _cfg(**kw):
  c = config_lib.base()
  for k, v in kw.items():
    group, key = k.split("__")
    c[group][key] = v
  return c


def test_unknown_values_are_named():
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.optim\.offload='disk': must be one of "
                           "none, host"):
    config_lib.validate(_cfg(optim__offload="disk"))
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.model\.remat='offload': must be one of "
                           "none, full, dots, offload_dots, minimal_offloaded"):
    config_lib.validate(_cfg(model__remat="offload"))


NO_HOST = types.SimpleNamespace(
    platform="gpu", device_kind="Some GPU",
    addressable_memories=lambda: [types.SimpleNamespace(kind="device")])


@pytest.mark.parametrize("kw, key", [
    ({"optim__offload": "host"}, "optim.offload='host'"),
    ({"model__remat": "offload_dots"}, "model.remat='offload_dots'"),
])
def test_offload_without_pinned_host_is_refused(kw, key):
  with pytest.raises(config_lib.ConfigError) as e:
    steps_lib.check_offload(_cfg(**kw), NO_HOST)
  assert str(e.value) == (f"config.{key}: gpu device 'Some GPU' has no "
                          "pinned_host memory space to offload to")


def test_plan_compares_against_the_step_without_offload():
  from llmlab import plan
  assert plan.offload_baseline(_cfg()) == {}
  assert plan.offload_baseline(_cfg(optim__offload="host")) == {
      "optim.offload": "none"}
  assert plan.offload_baseline(_cfg(optim__offload="host",
                                    model__remat="minimal_offloaded")) == {
      "optim.offload": "none", "model.remat": "dots"}
  # An offloading remat searches on from dots: full remat is next.
  c = _cfg(model__remat="offload_dots")
  c.mesh.data = 8
  assert {"model.remat": "full"} in plan.candidates(c, 8)


def test_cpu_has_pinned_host():
  import jax
  assert steps_lib.has_pinned_host(jax.devices()[0])
  steps_lib.check_offload(_cfg(optim__offload="host"), jax.devices()[0])


def test_offloaded_state_checkpoints_and_restores_in_host_memory(tmp_path):
  """Save (checksums hash a device copy of host-memory leaves) and restore
  into pinned host memory; the values round-trip exactly."""
  import jax
  import numpy as np
  from llmlab import checkpoints as ckpt_lib
  from llmlab import sharding as shd
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                 mlp_dim=32)
  c.train.update(batch_size=2, seq_len=8)
  c.mesh.data = 1
  c.optim.offload = "host"
  setup = steps_lib.build(c, 16, shd.make_mesh(c.mesh, jax.devices()[:1]))
  state = steps_lib.init_state(setup, 0)
  mgr = ckpt_lib.Manager(str(tmp_path), c.checkpoint, 10)
  mgr.save(1, state, {"step": 1}, force=True)
  mgr.close()
  mgr = ckpt_lib.Manager(str(tmp_path), c.checkpoint, 10, read_only=True)
  restored, _ = mgr.restore(1, setup.abstract_state)  # checksums verified
  mgr.close()
  kinds = {x.sharding.memory_kind for x in
           jax.tree.leaves(restored["opt_state"])}
  assert kinds == {"pinned_host"}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.integration
def test_tpu_offload_moves_optimizer_state_out_of_hbm():
  """A v5p-8 compile (libtpu): with optim.offload=host the optimizer state
  is host memory in XLA's analysis, and the device peak falls."""
  pytest.importorskip("libtpu")
  from llmlab import plan
  c = config_lib.base()
  c.model.update(num_layers=2, d_model=512, num_heads=8, num_kv_heads=8,
                 mlp_dim=2048, scan_unroll=1)
  c.train.update(batch_size=8, seq_len=256)
  c.mesh.update(data=1, fsdp=4)
  c.optim.offload = "host"
  _, devices = plan.target_devices("v5p-8")
  rep = plan.measure(c, 1024, devices)
  assert rep["opt_state_host"] > 0 and rep["opt_state"] == 0
  assert rep["host"] >= rep["opt_state_host"]
  saving = plan.offload_saving(c, 1024, devices, rep)
  assert saving["hbm_saved"] > 0.5 * rep["opt_state_host"], saving
