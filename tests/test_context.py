"""Context parallelism (mesh.context): on 8 simulated devices, context 2 and
4 give the losses and gradients of one device, with packed documents and
GQA; the sequence is load balanced; bad settings fail before compiling."""


import jax
import numpy as np
import pytest

from llmlab import attention as attention_lib
from llmlab import config as config_lib

MESHES = [[1, 1, 1, 1], [2, 1, 2, 2], [1, 2, 4, 1]]  # data, fsdp, context, tensor


def _worker(devices, spec: dict) -> dict:
  return devices(8).call("tests.context_worker:main", spec)


@pytest.fixture(scope="module")
def runs(devices):
  """xla kernel: losses and gradients of one batch, and 3 train steps."""
  return {k.rsplit(" ", 1)[0]: v
          for k, v in _worker(devices, {"meshes": MESHES}).items()}


def _rel(got, ref):
  got, ref = np.asarray(got), np.asarray(ref)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("mesh", ["(2, 1, 2, 2)", "(1, 2, 4, 1)"])
def test_losses_and_gradients_match_one_device(runs, mesh):
  ref, got = runs["(1, 1, 1, 1)"], runs[mesh]
  assert _rel(got["losses"], ref["losses"]) <= 1e-5
  _assert_same(got, ref, mesh)


def _assert_same(got, ref, what):
  assert _rel(got["loss"], ref["loss"]) <= 1e-5
  leaves = jax.tree_util.tree_leaves_with_path(ref["grads"],
                                               is_leaf=lambda x: isinstance(
                                                   x, list))
  assert len(leaves) == 12  # 9 stacked layer params, embed, unembed, norm
  for path, g in leaves:
    other = got["grads"]
    for k in path:
      other = other[k.key]
    assert _rel(other, g) <= 1e-5, (what, jax.tree_util.keystr(path))


def test_splash_context_matches_xla_on_one_device(devices):
  """The splash kernel (Pallas interpret mode) under context 2 with heads
  over tensor: one kernel over the whole mask, block tables and query
  positions sharded per device. 512 positions: 4 chunks of 128."""
  res = _worker(devices, {"meshes": [[1, 1, 1, 1], [2, 1, 2, 2]], "seq": 512,
                 "attention": ["xla", "splash"], "steps": 0})
  _assert_same(res["(2, 1, 2, 2) splash"], res["(1, 1, 1, 1) xla"], "splash")


def test_batch_is_sequence_sharded_and_load_balanced(runs):
  assert runs["(1, 1, 1, 1)"]["order"] is None
  for mesh, c in (("(2, 1, 2, 2)", 2), ("(1, 2, 4, 1)", 4)):
    assert runs[mesh]["batch_spec"] == "P(('data', 'fsdp'), 'context')"
    order = np.array(runs[mesh]["order"]).reshape(c, 2, -1)
    chunks = np.arange(64).reshape(2 * c, -1)
    for i in range(c):  # shard i: chunks i and 2c-1-i, equal causal work
      np.testing.assert_array_equal(order[i, 0], chunks[i])
      np.testing.assert_array_equal(order[i, 1], chunks[2 * c - 1 - i])


def _cfg(context, seq=64, devices=8):
  c = config_lib.base()
  c.train.update(seq_len=seq, batch_size=8)
  c.mesh.update(data=-1, context=context)
  return c


@pytest.mark.parametrize("context,seq,message", [
    (3, 64, r"mesh.context=3: 2\*mesh.context=6 must divide train.seq_len=64"),
    (4, 36, r"mesh.context=4: 2\*mesh.context=8 must divide train.seq_len=36"),
    (0, 64, r"mesh.context=0: must be a positive integer"),
    (16, 64, r"context=16, dcn_data=1\) cannot fill 8 devices"),
])
def test_bad_context_named_before_compiling(context, seq, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(_cfg(context, seq), 8)


def test_rules_must_put_length_on_context():
  cfg = _cfg(2)
  cfg.mesh.rules = tuple(("length", None) if k == "length" else (k, v)
                         for k, v in config_lib.DEFAULT_RULES)
  with pytest.raises(config_lib.ConfigError,
                     match=r"mesh.context=2: mesh.rules map 'length' to None"):
    config_lib.validate(cfg, 8)
  config_lib.validate(_cfg(2), 8)  # the default rules do
  assert config_lib.mesh_shape(_cfg(2).mesh, 8) == (4, 1, 2, 1)


def test_kernel_choice_under_context():
  m = config_lib.base().model
  m.attention = "splash"  # 512 / (2*4) = 64-position chunks: too small
  with pytest.raises(config_lib.ConfigError, match=(
      r"sequence length 64 must be a multiple of 128 \(with mesh.context=4")):
    attention_lib.check(m, "tpu", 512, context=4)
  assert attention_lib.check(m, "tpu", 1024, context=4) == "splash"
  m.attention = "cudnn"
  with pytest.raises(config_lib.ConfigError,
                     match="cudnn does not run with mesh.context=2"):
    attention_lib.check(m, "gpu", 1024, context=2)
  m.attention = "auto"
  assert attention_lib.check(m, "tpu", 1024, context=2) == "splash"
  assert attention_lib.check(m, "tpu", 512, context=4) == "xla"
  assert attention_lib.check(m, "gpu", 1024, context=2) == "xla"


def test_context_must_stay_within_a_process():
  """A stand-in mesh (shape and devices are all check_context reads): two
  processes of 4 devices, context 2 inside each process is fine, context
  across them is a ConfigError naming the key."""
  from types import SimpleNamespace
  from llmlab import sharding as shd
  dev = lambda p: SimpleNamespace(process_index=p)
  inside = np.array([dev(p) for p in (0, 0, 1, 1)]).reshape(2, 1, 2, 1)
  shd.check_context(SimpleNamespace(
      shape={"data": 2, "fsdp": 1, "context": 2, "tensor": 1}, devices=inside))
  across = np.array([dev(p) for p in (0, 1, 0, 1)]).reshape(2, 1, 2, 1)
  with pytest.raises(config_lib.ConfigError,
                     match=r"mesh.context=2: the context axis spans"):
    shd.check_context(SimpleNamespace(
        shape={"data": 2, "fsdp": 1, "context": 2, "tensor": 1},
        devices=across))
