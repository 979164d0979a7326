"""Quantised training through qwix (model.quant, llmlab/quant.py): which
products are quantised, float params, fp8 refused where there are no fp8
units, and int8 training within 2% of bf16 on a learnable stream."""

import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import config as config_lib
from llmlab import quant
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from tests import helpers

# qwix 0.1.8 on flax 0.12: a DeprecationWarning per traced product.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*'VariableState' was removed:DeprecationWarning")
VOCAB, BATCH, SEQ = 32, 8, 32


def _cfg(quant_mode="none", dtype="float32", steps=60):
  c = config_lib.base()
  c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, quant=quant_mode, dtype=dtype)
  c.train.update(steps=steps, batch_size=BATCH, seq_len=SEQ,
                 learning_rate=1e-2)
  c.optim.warmup_steps = 5
  c.mesh.data = 1
  return c


def _setup(cfg):
  config_lib.validate(cfg, 1)
  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
  return steps_lib.build(cfg, VOCAB, mesh)


def _batch(rng):
  """Rows of a fixed random bigram chain (each token picks among 2
  successors): learnable, so a broken product shows in the loss."""
  succ = np.random.default_rng(123).integers(0, VOCAB, (VOCAB, 2))
  tok = np.zeros((BATCH, SEQ), np.int32)
  tok[:, 0] = rng.integers(0, VOCAB, BATCH)
  for t in range(1, SEQ):
    tok[:, t] = succ[tok[:, t - 1], rng.integers(0, 2, BATCH)]
  return {"tokens": tok, "segment_ids": np.ones_like(tok),
          "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
          "bytes": np.ones_like(tok)}


def _dots(jaxpr, out=None):
  """{operand dtypes: count} of dot_general equations, nested jaxprs
  included (a scanned body counts once)."""
  out = {} if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      key = tuple(str(v.aval.dtype) for v in eqn.invars)
      out[key] = out.get(key, 0) + 1
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _dots(sub.jaxpr, out)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _dots(sub, out)
  return out


def _forward_dots(setup):
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                        setup.abstract_state["params"])
  b = _batch(np.random.default_rng(0))
  fn = lambda p: setup.model.apply({"params": p}, b["tokens"])
  with nn.logical_axis_rules(setup.rules):
    return _dots(jax.make_jaxpr(fn)(params).jaxpr)


def test_unknown_mode_is_named():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.quant="
                     r"'int4': must be one of none, int8, fp8"):
    config_lib.validate(_cfg("int4"), 1)


def test_int8_quantises_exactly_the_layer_weight_products():
  """Per layer: q, k, v, o and the SwiGLU's three matrices in int8; the
  attention core (scores, values) and the output projection stay float."""
  q = _forward_dots(_setup(_cfg("int8")))
  f = _forward_dots(_setup(_cfg("none")))
  assert q.get(("int8", "int8")) == 7, q  # the scanned layer body
  assert sum(v for k, v in q.items() if "int8" not in k) == 3, q
  # The float model on CPU runs q, k and v as one product (model.Attention).
  n_float = 8 if jax.default_backend() == "cpu" else 10
  assert not any("int8" in k for k in f) and sum(f.values()) == n_float, f


def test_params_and_checkpointed_state_stay_float():
  """The quantised model's params (what checkpoints hold) are the float
  model's: same tree, shapes and dtypes; no extra collections."""
  a = _setup(_cfg("int8")).abstract_state
  b = _setup(_cfg("none")).abstract_state
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert jax.tree.leaves(jax.tree.map(lambda x, y: (x.shape, x.dtype) ==
                                      (y.shape, y.dtype), a, b))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(a["params"]))


def test_quantised_forward_is_close_to_float_but_not_equal():
  qs, fs = _setup(_cfg("int8")), _setup(_cfg("none"))
  params = steps_lib.init_state(fs, 0)["params"]
  toks = _batch(np.random.default_rng(1))["tokens"]
  with nn.logical_axis_rules(fs.rules):
    lq = np.asarray(jax.jit(lambda p: qs.model.apply({"params": p}, toks))(
        params))
    lf = np.asarray(jax.jit(lambda p: fs.model.apply({"params": p}, toks))(
        params))
  rel = np.abs(lq - lf).max() / np.abs(lf).max()
  assert 1e-4 < rel < 0.05, rel


def test_fp8_support_table():
  gpu = lambda cc: types.SimpleNamespace(platform="gpu", compute_capability=cc,
                                         device_kind="NVIDIA")
  tpu = lambda kind: types.SimpleNamespace(platform="tpu", device_kind=kind)
  assert quant.fp8_support(gpu("9.0"))[0]
  assert quant.fp8_support(gpu("8.9"))[0]
  assert not quant.fp8_support(gpu("8.0"))[0]
  assert quant.fp8_support(tpu("TPU7x"))[0]
  assert not quant.fp8_support(tpu("TPU v5"))[0]
  assert not quant.fp8_support(tpu("TPU v6 lite"))[0]
  assert not quant.fp8_support(jax.devices("cpu")[0])[0]


def test_fp8_refused_on_cpu_before_tracing(monkeypatch):
  from llmlab import model as model_lib
  monkeypatch.setattr(model_lib.Transformer, "init", lambda *a, **k: 1 / 0)
  with pytest.raises(config_lib.ConfigError) as e:
    _setup(_cfg("fp8"))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("config.model.quant='fp8': CPU "
                                            "has no fp8 matmul units")


def test_an_fp8_run_loads_in_float_where_there_is_no_fp8():
  """Checkpoints are float: `runs.setup_for` (eval, sample, api.load)
  builds an fp8 run's model without quantisation on a CPU."""
  from llmlab import runs
  setup = runs.setup_for(_cfg("fp8"), {"model_info": {"vocab_size": VOCAB}})
  assert setup.model_cfg.quant == "none" and not quant.is_quantized(
      setup.model)
  assert quant.is_quantized(runs.setup_for(
      _cfg("int8"), {"model_info": {"vocab_size": VOCAB}}).model)


def test_fp8_on_cpu_is_one_line_from_the_cli(tmp_path):
  out = helpers.llmlab("train", helpers.TINY, f"--workdir={tmp_path}/w",
                       "--config.model.quant=fp8", check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if "error" in l.lower()]
  assert errors == ["llmlab train: error: config.model.quant='fp8': CPU has "
                    "no fp8 matmul units; use model.quant=int8 or none on "
                    "this target"], out.stderr[-2000:]


def _losses(cfg):
  setup = _setup(cfg)
  state = steps_lib.init_state(setup, 0)
  step = steps_lib.make_train_step(setup)
  rng, out = np.random.default_rng(0), []
  for _ in range(cfg.train.steps):
    state, met = step(state, shd.global_batch(_batch(rng),
                                              setup.batch_sharding))
    out.append(float(met["loss"]))
  return np.asarray(out)


def test_int8_training_loss_within_2_percent_of_bf16():
  """Equal steps, data and seed; bf16 activations in both (as MaxText
  trains); the int8 run's loss (mean of the last 10 steps) within 2% of
  bf16's, on a stream the model learns (the loss halves)."""
  bf16 = _losses(_cfg("none", "bfloat16"))
  int8 = _losses(_cfg("int8", "bfloat16"))
  assert bf16[-10:].mean() < 0.6 * bf16[:3].mean()  # it learns
  assert not np.array_equal(bf16, int8)  # quantisation is on
  ratio = int8[-10:].mean() / bf16[-10:].mean()
  assert abs(ratio - 1) <= 0.02, (ratio, bf16[-10:], int8[-10:])


@pytest.mark.integration
def test_tpu_int8_step_compiles_with_int8_products():
  """A v5p-8 compile (libtpu): the int8 step compiles for the TPU with s8
  products in it, and fp8 is refused there (v5p has no fp8 units)."""
  pytest.importorskip("libtpu")
  from llmlab import plan
  c = _cfg("int8")
  c.model.update(d_model=256, num_heads=4, num_kv_heads=4, mlp_dim=1024,
                 scan_unroll=1, dtype="bfloat16")
  c.train.seq_len = 128
  c.mesh.update(data=1, fsdp=4)
  _, devices = plan.target_devices("v5p-8")
  compiled, _ = plan.compile_abstract(c, 1024, devices)
  products = [l for l in compiled.as_text().splitlines()
              if re.search(r"= \S+\[.*\b(dot|convolution)\(", l)]
  # int8 x int8 products accumulate in s32: the layer body's 7 weight
  # products, forward and their two backward products each; the output
  # projection's three stay float (attention is splash, a custom call).
  int8 = [l for l in products if re.search(r"= s32\[", l)]
  assert len(int8) == 21 and len(products) - len(int8) == 3, products
  c.model.quant = "fp8"
  with pytest.raises(config_lib.ConfigError, match="TPU v5 has no fp8"):
    plan.compile_abstract(c, 1024, devices)
