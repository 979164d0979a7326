"""Sharded training: mesh equivalence on 8 simulated devices, FSDP memory,
gradient accumulation, config errors raised before compilation."""

import jax
import numpy as np
import pytest

from llmlab import config as config_lib
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from tests.mesh_worker import VOCAB, batches, tiny_cfg


@pytest.fixture(scope="module")
def mesh_runs(devices):
  spec = {"steps": 20, "meshes": [[1, 1, 1], [8, 1, 1], [1, 8, 1],
                                  [2, 2, 2], [1, 4, 2]]}
  return devices(8).call("tests.mesh_worker:main", spec)


def test_losses_match_single_device(mesh_runs):
  ref = np.array(mesh_runs["(1, 1, 1)"]["losses"])
  assert ref[-1] < ref[0]
  for mesh, run in mesh_runs.items():
    got = np.array(run["losses"])
    rel = np.max(np.abs(got - ref) / np.abs(ref))
    assert rel <= 1e-4, (mesh, rel)


def test_runs_packed_on_sub_meshes_match_running_alone(devices, tmp_path):
  """A study packing runs side by side (two groups of 4 of 8 devices, as
  on a slice): every run's losses bit-identical to the same run alone on
  its group, each on a 4-device data mesh."""
  out = devices(8).call("tests.pack_worker:main", str(tmp_path))
  assert out["device_count"] == 8
  assert out["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert out["packed"] == out["alone"] and len(out["packed"]["a"]) == 6
  assert out["packed_mesh"] == out["alone_mesh"] == [
      {"context": 1, "data": 4, "fsdp": 1, "tensor": 1}, 4]


def test_param_bytes_shrink_with_fsdp_and_tensor(mesh_runs):
  full = mesh_runs["(1, 1, 1)"]["param_bytes"]
  assert mesh_runs["(8, 1, 1)"]["param_bytes"] == full  # pure data parallel
  # Norm scales are tiny and replicated; the bulk must shrink ~ fsdp*tensor.
  for mesh, factor in (("(1, 8, 1)", 8), ("(2, 2, 2)", 4), ("(1, 4, 2)", 8)):
    got = mesh_runs[mesh]["param_bytes"]
    assert full / factor <= got <= 1.1 * full / factor, (mesh, got, full)


def _tiny(**train):
  return tiny_cfg((1, 1, 1), **train)


def test_grad_accumulation_equals_full_batch():
  outs = []
  for micro in (1, 4):
    cfg = _tiny(steps=3, micro=micro)
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    setup = steps_lib.build(cfg, VOCAB, mesh)
    state = steps_lib.init_state(setup, 0)
    step = steps_lib.make_train_step(setup)
    for b in batches(3, 8, 16):
      state, m = step(state, shd.global_batch(b, setup.batch_sharding))
    outs.append((float(m["loss"]), jax.device_get(state["params"])))
  assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("key,value,message", [
    ("model.num_heads", 3, "model.num_heads=3"),
    ("model.num_kv_heads", 3, "model.num_kv_heads=3"),
    ("train.microbatches", 3, "train.microbatches=3"),
    ("optim.schedule", "linear", "optim.schedule='linear'"),
    ("model.remat", "some", "model.remat='some'"),
    ("train.seed", -1, "train.seed=-1"),
])
def test_bad_values_name_key_and_value(key, value, message):
  cfg = config_lib.with_overrides(_tiny(steps=1), {key: value})
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
    config_lib.validate(cfg, 1)


def test_unknown_key_and_mesh_errors():
  cfg = _tiny(steps=1)
  bad = config_lib.ConfigDict({"model": {"num_layer": 2}})
  with pytest.raises(config_lib.ConfigError, match="model.num_layer"):
    config_lib.merge_defaults(bad)
  for key in ("model.num_layer", "train", "nothing.steps", "train.steps.x"):
    with pytest.raises(config_lib.ConfigError, match=f"unknown.*{key!r}"):
      config_lib.with_overrides(cfg, {key: 1})
  cfg.mesh.data = 3
  with pytest.raises(config_lib.ConfigError, match="3 devices, but 8|but 1"):
    config_lib.validate(cfg, 1)
  cfg.mesh.data = 1
  cfg.mesh.fsdp = 4
  with pytest.raises(config_lib.ConfigError):
    config_lib.validate(cfg, 8)  # 4 != 8 devices
  cfg.mesh.fsdp = -1
  cfg.train.batch_size = 6
  with pytest.raises(config_lib.ConfigError, match="train.batch_size=6"):
    config_lib.validate(cfg, 8)  # 6 rows over 8 data-parallel shards
