"""Fused attention (`model.attention`): splash in Pallas interpret mode equals
the xla kernel (whole-model loss and gradients, packed documents, GQA, on one
device and on an 8-device mesh with heads sharded); the cuDNN wrapper's
layout and masks; config checks before compile; decoding on every setting."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import attention
from llmlab import config as config_lib
from llmlab import model as model_lib
from llmlab import decode as sample
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from tests import attention_worker

F32 = jnp.float32


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


@pytest.fixture(scope="module")
def xla_one_device():
  return attention_worker.loss_and_grads((1, 1, 1), "xla")


def test_splash_equals_xla_on_one_device(xla_one_device, caplog):
  """Whole model, remat=dots, packed rows; the interpret-mode warning is
  logged once for the build and all the traces after it."""
  attention._WARNED.clear()
  with caplog.at_level(logging.WARNING, logger="llmlab"):
    loss, grads, local = attention_worker.loss_and_grads((1, 1, 1), "splash",
                                                         remat="dots")
  ref_loss, ref_grads, _ = xla_one_device
  assert loss == pytest.approx(ref_loss, rel=1e-6)
  assert attention_worker.max_rel(grads, ref_grads) < 1e-5
  assert local == []  # one device: no shard_map
  warned = [r for r in caplog.records if "interpret mode" in r.getMessage()]
  assert len(warned) == 1 and "testing" in warned[0].getMessage()


def test_splash_equals_xla_on_8_devices_heads_sharded(devices):
  spec = {"meshes": [[2, 2, 2]], "attention": ["splash"]}
  res = devices(8).call("tests.attention_worker:main", spec, timeout=300)
  run = res["(2, 2, 2) splash"]
  assert run["loss"] == pytest.approx(res["ref_loss"], rel=1e-6)
  assert run["grad_rel"] < 1e-5
  # Batch 8 over data*fsdp = 4 and 4 query / 2 kv heads over tensor = 2:
  # each device's kernel sees 2 rows, 2 query heads and 1 kv head.
  shapes = [s for m in run["shard_map_shapes"] for s in m]
  assert [2, 2, 128, 16] in shapes and [2, 1, 128, 16] in shapes
  assert not any(s[:2] in ([8, 4], [8, 2]) for s in shapes if len(s) == 4)


def _qkv(b=2, h=4, k=2, l=256, e=16):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, h, l, e)) * e ** -0.5
  kk, v = (jax.random.normal(x, (b, k, l, e)) for x in ks[1:3])
  seg = np.ones((b, l), np.int32)
  seg[0, 90:], seg[0, 200:] = 2, 3
  seg[1, 230:] = 0  # padding
  return q, kk, v, jnp.asarray(seg)


def _xla(q, k, v, seg):
  """model._attention with the model's mask: the reference."""
  b, h, l, e = q.shape
  mask = jnp.tril(jnp.ones((l, l), bool))[None] & (seg[:, :, None] ==
                                                   seg[:, None])
  bias = jnp.where(mask, 0.0, jnp.finfo(F32).min)
  o = model_lib._attention(q.reshape(b, k.shape[1], -1, l, e), k, v, bias,
                           F32, F32)
  return o.reshape(b, h, l, e)


def _grads(f, q, k, v, seg):
  do = jax.random.normal(jax.random.key(9), q.shape)
  out, vjp = jax.vjp(lambda *a: f(*a, seg), q, k, v)
  return (out, *vjp(do))


def test_splash_kernel_block_sizes():
  """Configured tiles (`model.attention_block_q/kv`; the whole-model tests
  use the default) give the xla kernel's values and grads."""
  q, k, v, seg = _qkv()
  ref = jax.jit(_grads, static_argnums=0)(_xla, q, k, v, seg)
  for bq, bkv in ((128, 256),):
    cfg = model_lib.ModelConfig(vocab_size=8, num_layers=1, d_model=64,
                                num_heads=4, num_kv_heads=2, mlp_dim=8,
                                attention_block_q=bq, attention_block_kv=bkv)
    splash = lambda q, k, v, s: attention.attend("splash", q, k, v, s, cfg)
    got = jax.jit(_grads, static_argnums=0)(splash, q, k, v, seg)
    for a, b in zip(got, ref):
      assert _rel(a, b) < 1e-5, (bq, bkv)


def test_cudnn_wrapper_layout_and_masks():
  """The cuDNN call's layout, GQA, scale, causal flag and segment mask,
  run through jax's XLA implementation of the same function (cuDNN itself
  cannot run without a GPU)."""
  q, k, v, seg = _qkv(l=64)
  wrapped = lambda q, k, v, s: attention._cudnn_local(q, k, v, s, "xla")
  got = jax.jit(_grads, static_argnums=0)(wrapped, q, k, v, seg)
  ref = jax.jit(_grads, static_argnums=0)(_xla, q, k, v, seg)
  for a, b in zip(got, ref):
    assert _rel(a, b) < 1e-5


def test_cudnn_lowering_needs_cudnn():
  """What a GPU-less machine can say about the cuDNN call: jax refuses to
  trace it without cuDNN; where cuDNN is present it must lower to cuDNN's
  fused-attention custom call."""
  x = jax.ShapeDtypeStruct((1, 4, 128, 64), jnp.bfloat16)
  s = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  try:
    traced = jax.jit(attention._cudnn_local).trace(x, x, x, s)
  except RuntimeError as e:
    assert "cuDNN is not detected" in str(e)
    return
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "__cudnn$fmha" in text


def _model_cfg(**kw):
  c = config_lib.base()
  c.model.update({**dict(num_layers=1, d_model=64, num_heads=4,
                         num_kv_heads=2, mlp_dim=64), **kw})
  return c.model


@pytest.mark.parametrize("kw,plat,seq,message", [
    (dict(attention="cudnn", dtype="bfloat16"), "cpu", 128,
     "attention='cudnn': cudnn needs a GPU backend; this is cpu"),
    (dict(attention="cudnn"), "gpu", 128,
     "bfloat16/float16 operands, not float32"),
    (dict(attention="cudnn", matmul_dtype="bfloat16", d_model=48), "gpu", 128,
     "head size 12 must be a multiple of 8"),
    (dict(attention="cudnn", dtype="bfloat16"), "gpu", 127,
     "length 127 must be even"),
    (dict(attention="splash"), "cpu", 100, "length 100 must be a multiple of 128"),
    (dict(attention="splash", attention_block_q=192), "tpu", 384,
     "attention_block_q=192 must be 0"),
    (dict(attention="splash", attention_block_kv=256), "tpu", 128,
     "attention_block_kv=256 must be 0"),
    (dict(attention="splash"), "gpu", 128, "splash is a TPU kernel"),
    (dict(attention="flash"), "tpu", 128, "must be one of auto, xla"),
])
def test_check_rejects_what_a_kernel_cannot_run(kw, plat, seq, message):
  with pytest.raises(config_lib.ConfigError, match="model.attention") as e:
    attention.check(_model_cfg(**kw), plat, seq)
  assert message in str(e.value)
  assert "Supported:" in str(e.value) or "must be one of" in str(e.value)


@pytest.mark.parametrize("kw,plat,seq,kernel,why", [
    ({}, "cpu", 128, "xla", "no fused kernel on cpu"),
    ({}, "tpu", 256, "splash", "the fused kernel for tpu"),
    ({}, "tpu", 200, "xla", "splash cannot run this shape"),
    ({}, "gpu", 128, "xla", "cudnn cannot run this shape: cuDNN takes bfloat16"),
    (dict(dtype="bfloat16"), "gpu", 128, "cudnn", "the fused kernel for gpu"),
])
def test_auto_logs_its_pick(kw, plat, seq, kernel, why, caplog):
  with caplog.at_level(logging.INFO, logger="llmlab"):
    assert attention.check(_model_cfg(**kw), plat, seq) == kernel
  msgs = [r.getMessage() for r in caplog.records]
  assert any(f"model.attention=auto: using {kernel} on {plat}" in m and
             why in m for m in msgs), msgs


def test_validate_and_build_fail_before_compiling():
  c = config_lib.with_overrides(config_lib.base(),
                                {"model.attention": "flash"})
  with pytest.raises(config_lib.ConfigError, match="model.attention='flash'"):
    config_lib.validate(c, 1)
  c = config_lib.with_overrides(config_lib.base(), {
      "model.attention": "cudnn", "model.dtype": "bfloat16"})
  config_lib.validate(c, 1)  # a valid name; the platform decides
  mesh = shd.make_mesh(c.mesh, jax.devices()[:1])
  with pytest.raises(config_lib.ConfigError, match="needs a GPU backend"):
    steps_lib.build(c, 64, mesh)


def test_cudnn_forward_on_cpu_is_a_config_error():
  """A model built without `steps.build` (e.g. by hand) still fails with the
  config error, not jax's 'cuDNN is not detected'."""
  cfg = model_lib.ModelConfig(vocab_size=8, num_layers=1, d_model=32,
                              num_heads=4, num_kv_heads=2, mlp_dim=8,
                              attention="cudnn", dtype="bfloat16")
  tokens = jnp.zeros((1, 16), jnp.int32)
  with pytest.raises(config_lib.ConfigError, match="model.attention='cudnn'"):
    jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0), tokens)


def test_decoding_works_on_every_setting():
  """KV-cache decoding (prefill and steps) runs the xla kernel whatever
  `model.attention` says, so every setting samples the same tokens, on CPU
  too (cuDNN included), at prompt lengths no fused kernel takes."""
  base = model_lib.ModelConfig(vocab_size=40, num_layers=1, d_model=32,
                               num_heads=4, num_kv_heads=2, mlp_dim=64)
  params = jax.jit(model_lib.Transformer(base).init)(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x * 3.0, params)
  prompts = sample.left_pad([[1, 5, 7, 2, 9], [3, 4], [8, 8, 8]], pad_id=0)
  outs = {}
  for name in attention.NAMES:
    model = model_lib.Transformer(dataclasses.replace(base, attention=name))
    sampler = sample.make_sampler(model, max_new_tokens=4, temperature=0.0)
    outs[name] = np.asarray(sampler(params, prompts,
                                    jax.random.key(0))["tokens"])
  for name, toks in outs.items():
    np.testing.assert_array_equal(toks, outs["xla"], err_msg=name)
