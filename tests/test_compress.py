"""Compression: the masked forward pass equals the pruned model's, the size
formula is exact on binary masks and the expectation on keep probabilities,
pruning to the source's own shape is the identity, bad target shapes are
refused before anything is read, int8 weight-only quantization stays
within half a step per channel, learned masks end at exactly the target
shape, and a pruned run directory trains with `init_from`, evaluates and
quantizes through the ordinary tools.
"""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import api
from llmlab import config as config_lib
from llmlab import model as model_lib
from llmlab.commands import prune as prune_cmd
from llmlab.compress import hard_concrete as hc
from llmlab.compress import importance
from llmlab.compress import learned
from llmlab.compress import masked
from llmlab.compress import prune as prune_lib
from llmlab.compress import quantize
from llmlab.compress import shapes
from llmlab.compress import slicing
from tests.helpers import ROOT

SRC = model_lib.ModelConfig(vocab_size=259, num_layers=3, d_model=32,
                            num_heads=4, num_kv_heads=2, mlp_dim=48)
TGT = dict(num_layers=2, d_model=24, num_heads=2, num_kv_heads=1, mlp_dim=20,
           head_dim=8)


# Compiled once per shape and shared by the tests (eager Flax is slow).
_masked_apply = jax.jit(masked.masked_apply, static_argnums=0)
_fold = jax.jit(masked.fold, static_argnums=2)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, batch):
  return model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                     batch["positions"])


def _params(cfg, seed=0):
  """Random params of `cfg`'s shapes (numpy: no init to compile), with norm
  scales around 1; no two units tie."""
  model = model_lib.Transformer(cfg)
  shaped = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    noise = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    if quantize._leaf_name(path) == "scale":
      return 1.0 + 0.1 * noise
    return (noise / np.sqrt(x.shape[-2] if x.ndim >= 2 else 8)).astype(
        np.float32)
  return jax.tree_util.tree_map_with_path(leaf, shaped)


def _batch(rows=4, length=32, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (rows, length), 0, 259)
  seg = jnp.ones_like(tokens).at[:, length // 2:].set(2)  # two documents
  pos = jnp.concatenate([jnp.arange(length // 2)] * 2)
  return {"tokens": tokens, "segment_ids": seg,
          "positions": jnp.broadcast_to(pos, tokens.shape)}


def _random_scores(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.random(s) for k, s in masked.mask_shapes(cfg).items()}


@pytest.mark.parametrize("variant", [dict(), dict(tie_embeddings=True,
                                                  qk_norm=True,
                                                  attn_bias=True)])
def test_masked_forward_equals_pruned_forward(variant):
  src = dataclasses.replace(SRC, **variant)
  tgt = dataclasses.replace(src, **TGT)
  params, batch = _params(src), _batch()
  model = model_lib.Transformer(src)
  sel = slicing.select(_random_scores(src), src, tgt)
  # Soft values on the kept units (as learned masks fold them), 0 elsewhere.
  rng = np.random.default_rng(1)
  masks = {k: v * rng.uniform(0.3, 1.5, v.shape).astype(np.float32)
           for k, v in slicing.masks_of(sel, src).items()}
  want = _masked_apply(model, params, masks, batch)
  pruned = slicing.slice_params(_fold(params, masks, src), sel)
  got = _apply(model_lib.Transformer(tgt), pruned, batch)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  if not variant:  # All-ones masks leave the model unchanged.
    full = _apply(model, params, batch)
    np.testing.assert_allclose(
        _masked_apply(model, params, masked.ones(src), batch), full,
        atol=1e-5)
    assert float(jnp.max(jnp.abs(want - full[..., :]))) > 1e-2


def test_query_heads_stay_with_their_kv_head():
  tgt = dataclasses.replace(SRC, **TGT)
  sel = slicing.select(_random_scores(SRC, 3), SRC, tgt)
  g_src, g_tgt = shapes.group_size(SRC), shapes.group_size(tgt)
  # Kept query head j of the pruned model reads kept kv head j // G'.
  heads_LxKxG = sel.heads.reshape(len(sel.layers), -1, g_tgt)
  np.testing.assert_array_equal(heads_LxKxG // g_src,
                                np.broadcast_to(sel.kv[..., None],
                                                heads_LxKxG.shape))


@pytest.mark.parametrize("variant", [dict(), dict(tie_embeddings=True,
                                                  qk_norm=True,
                                                  attn_bias=True)])
def test_size_formula(variant):
  src = dataclasses.replace(SRC, **variant)
  tgt = dataclasses.replace(src, **TGT)
  size = lambda m: {k: int(v) for k, v in shapes.size(m, src).items()}
  binary = slicing.masks_of(slicing.select(_random_scores(src), src, tgt), src)
  assert size(binary) == model_lib.param_counts(tgt)
  ones = {k: np.ones(s) for k, s in masked.mask_shapes(src).items()}
  assert size(ones) == model_lib.param_counts(src)
  # On keep probabilities it is the expected size of independent masks.
  rng = np.random.default_rng(0)
  probs = {k: rng.uniform(0.2, 0.9, s) for k, s in
           masked.mask_shapes(src).items()}
  draws = shapes.size({k: (rng.random((20_000,) + p.shape) < p).astype(float)
                       for k, p in probs.items()}, src)["total"]
  expected = float(shapes.size(probs, src)["total"])
  assert abs(draws.mean() - expected) < 4 * draws.std() / np.sqrt(draws.size)
  # (and the test can fail: the size at probability 1/2 each is not it)
  assert abs(draws.mean() - float(shapes.size(
      {k: np.full_like(p, 0.5) for k, p in probs.items()}, src)["total"])) > \
      4 * draws.std() / np.sqrt(draws.size)


def test_same_shape_is_identity():
  params, model = _params(SRC), model_lib.Transformer(SRC)
  for scores in (importance.magnitude(params, SRC),
                 importance.activation(model, params, _batch()),
                 _random_scores(SRC)):
    sel = slicing.select(jax.device_get(scores), SRC, SRC)
    out = slicing.slice_params(params, sel)
    jax.tree.map(np.testing.assert_array_equal, out, jax.device_get(params))


def test_importance_ranks_a_dead_unit_last():
  """Zeroing a unit's weights makes it least important by both scores."""
  params, model = _params(SRC), model_lib.Transformer(SRC)
  attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
  for leaf, index in ((attn["wo"], np.s_[1, 2]), (attn["wq"], np.s_[1, :, 2]),
                      (mlp["w_down"], np.s_[0, 5]), (mlp["w_up"], np.s_[0, :, 5]),
                      (mlp["w_gate"], np.s_[0, :, 5])):
    leaf[index] = 0.0  # numpy params: head 2 of layer 1, channel 5 of layer 0
  for s in (importance.magnitude(params, SRC),
            importance.activation(model, params, _batch())):
    assert int(jnp.argmin(s["head"][1])) == 2
    assert int(jnp.argmin(s["mlp"][0])) == 5


@pytest.mark.parametrize("change, message", [
    (dict(num_heads=3, num_kv_heads=2, head_dim=8),
     "config.model.num_kv_heads=2: must divide num_heads=3"),
    (dict(num_heads=4, num_kv_heads=1), "4 query heads per kv head"),
    (dict(d_model=16, num_heads=4, num_kv_heads=2),
     "config.model.head_dim=0: head size 4 != the source's 8"),
    (dict(mlp_dim=64), "config.model.mlp_dim=64: must be in [1, 48]"),
    (dict(tie_embeddings=True), "config.model.tie_embeddings=True"),
    (dict(vocab_size=300), "vocab_size (data.tokenizer)=300"),
])
def test_bad_target_shapes_are_refused(change, message):
  with pytest.raises(config_lib.ConfigError) as e:
    shapes.check_target(SRC, dataclasses.replace(SRC, **change))
  assert message in str(e.value)


def test_int8_round_trip_error_is_bounded():
  params = _params(dataclasses.replace(SRC, attn_bias=True, qk_norm=True))
  qtree, deq, _ = quantize.quantize_dequantize(params, "int8")
  n_pairs = 0
  for (path, w), q, d in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(qtree, is_leaf=quantize._is_pair),
                             jax.tree.leaves(deq)):
    name = quantize._leaf_name(path)
    if name not in quantize.INPUT_AXES:  # norms and biases stay float
      np.testing.assert_array_equal(d, w)
      continue
    n_pairs += 1
    q8, scale = q
    assert q8.dtype == jnp.int8
    err = jnp.abs(d - w)
    assert bool(jnp.all(err <= scale / 2 * (1 + 1e-5) + 1e-7)), name
    # Per output channel: the largest weight is represented exactly
    # (+-127 steps), so the scale is max|w| / 127 of that channel.
    amax = jnp.max(jnp.abs(w), axis=quantize.INPUT_AXES[name], keepdims=True)
    np.testing.assert_allclose(scale, amax / 127, rtol=1e-6)
    assert float(jnp.max(err / amax)) <= 0.5 / 127 + 1e-6
  assert n_pairs == 9
  _, report = quantize.roundtrip(params)
  assert 3.0 < report["size_reduction"] < 4.0
  with pytest.raises(ValueError, match="--quantize='int4'"):
    quantize.quantize(params, "int4")


def test_final_masks_pick_exactly_the_target():
  tgt = dataclasses.replace(SRC, **TGT)
  rng = np.random.default_rng(0)
  log_alpha = {k: jnp.asarray(rng.normal(0, 3, s), jnp.float32)
               for k, s in masked.mask_shapes(SRC).items()}
  log_alpha["hidden"] = log_alpha["hidden"].at[:].set(-10.0)  # all zero masks
  sel, values = learned.final_masks(log_alpha, SRC, tgt)
  assert sel.heads.shape == (2, 2) and sel.mlp.shape == (2, 20)
  keep = slicing.masks_of(sel, SRC)
  for k in keep:
    assert bool(jnp.all(jnp.where(keep[k] == 0, values[k] == 0, True))), k
  assert int(jnp.sum(values["hidden"] > 0)) == 24  # floored, still counted
  # Kept layers are the most probable ones.
  assert set(sel.layers) == set(np.argsort(-np.asarray(log_alpha["layer"]))[:2])
  np.testing.assert_allclose(hc.deterministic(jnp.asarray([-9.0, 9.0])),
                             [0.0, 1.0])


# ----------------------------------------------------------- on a real run


def _train_cfg(**model):
  c = config_lib.base()
  c.model.update(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2,
                 mlp_dim=48)
  c.model.update(model)
  c.train.update(steps=4, batch_size=4, seq_len=32, log_every=2,
                 eval_tokens=256, learning_rate=1e-2)
  c.optim.warmup_steps = 1
  c.checkpoint.async_save = False
  return c


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  from llmlab import train
  workdir = str(tmp_path_factory.mktemp("source"))
  train.train(_train_cfg(), workdir)
  return workdir


def test_prune_to_same_shape_writes_the_source_params(source_run, tmp_path):
  out = str(tmp_path / "same")
  prune_lib.prune(source_run, _train_cfg(), out, "magnitude")
  a, b = api.load(source_run), api.load(out)
  assert b.step == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a.params),
               jax.device_get(b.params))
  with open(os.path.join(out, "config.json")) as f:
    info = json.load(f)["compress"]
  assert info["method"] == "magnitude" and info["source_step"] == 4


def test_learned_prune_reaches_target_and_trains(source_run, tmp_path):
  from llmlab import evaluate
  from llmlab import train
  tgt = _train_cfg(**TGT)
  out = str(tmp_path / "learned")
  settings = learned.Settings(steps=12, mask_lr=0.5, lambda_lr=5.0,
                              target_warmup=0.25, log_every=4)
  summary = prune_lib.prune(source_run, tgt, out, "learned", learned=settings)
  want = model_lib.param_counts(
      model_lib.ModelConfig.from_config(tgt.model, 259))
  assert summary["params"] == want
  run = api.load(out)
  assert sum(x.size for x in jax.tree.leaves(run.params)) == want["total"]
  hist = run.info["compress"]["learned"]["history"]
  src_total = model_lib.param_counts(SRC)["total"]
  assert hist[-1]["expected_size"] < 0.9 * src_total  # the masks moved
  # The pruned directory trains with init_from and evaluates (float, int8).
  cont = _train_cfg(**TGT)
  cont.init_from = out
  cont.train.steps = 2
  res = train.train(cont, str(tmp_path / "continued"))
  assert np.isfinite(res["loss"])
  ev = evaluate.evaluate_run(out, quantize="int8")
  assert abs(ev["eval_loss_change"]) < 0.05
  assert ev["size_reduction"] > 2.5


def test_activation_prune_and_cli_errors(source_run, tmp_path, capsys):
  out = str(tmp_path / "activation")
  prune_lib.prune(source_run, _train_cfg(**TGT), out, "activation",
                  calib_rows=4)
  with open(os.path.join(out, prune_lib.SELECTION_FILE)) as f:
    sel = json.load(f)
  assert np.asarray(sel["heads"]).shape == (2, 2)
  # The same directory again, and a shape that does not divide, are refused
  # before anything is read or written.
  cfg_file = tmp_path / "bad.py"
  cfg_file.write_text(
      "from llmlab.config import base\n"
      "def get_config(arg=None):\n"
      "  c = base()\n"
      "  c.model.update(num_layers=2, d_model=24, num_heads=3,\n"
      "                 num_kv_heads=2, mlp_dim=20, head_dim=8)\n"
      "  return c\n")
  bad_out = str(tmp_path / "bad")
  assert prune_cmd.main([f"--from={source_run}", f"--to_config={cfg_file}",
                         f"--workdir={bad_out}"]) == 2
  err = capsys.readouterr().err
  assert "num_kv_heads=2" in err and "must divide" in err, err
  assert not os.path.exists(bad_out)
  assert prune_cmd.main([f"--from={source_run}", f"--to_config={cfg_file}",
                         f"--workdir={out}"]) == 2
  assert "refusing to overwrite" in capsys.readouterr().err


def test_experiment_reach_tokens_and_config_checks():
  from llmlab.compress import experiment
  from llmlab.compress import report
  from llmlab import cli_common
  tokens, losses = [100, 200, 400, 800], [3.0, 2.5, 2.0, 1.5]
  # 2.25 lies halfway between 200 and 400 tokens in log space.
  assert report.tokens_to_reach(tokens, losses, 2.25) == pytest.approx(
      200 * 2 ** 0.5)
  assert report.tokens_to_reach(tokens, losses, 3.5) == 100
  assert report.tokens_to_reach(tokens, losses, 1.0) is None
  law = {"E": 1.0, "B": 16.0, "beta": 0.5}  # L(64) = 1 + 16/8 = 3
  assert report.law_tokens(law, 3.0) == pytest.approx(64.0)
  assert report.law_tokens(law, 0.9) is None
  scfg = cli_common.load_config(os.path.join(
      ROOT, "configs", "compress_quick.py"))
  names = [r["name"] for r in experiment.plan(scfg, "/tmp/x")]
  assert names == ["magnitude", "activation", "learned", "learned_distill",
                   "scratch"]
  experiment._check(scfg)
  scfg.methods = ("magnitude", "random")
  with pytest.raises(config_lib.ConfigError, match="unknown method 'random'"):
    experiment._check(scfg)


@pytest.mark.integration  # trains a whole study: the slower tier
def test_compress_study_rerun_skips_every_run(tmp_path, monkeypatch):
  """A one-method smoke study end to end, then a re-run: nothing trains or
  prunes again, the same results, wall time adds up."""
  from llmlab import cli_common
  from llmlab import train
  from llmlab.compress import experiment
  scfg = cli_common.load_config(os.path.join(
      ROOT, "configs", "compress_quick.py:smoke"))
  scfg.methods, scfg.distill_methods = ("magnitude",), ()
  scfg.continue_steps, scfg.sweep_points = 8, 4
  workdir = str(tmp_path / "study")
  first = experiment.run(scfg, workdir)
  assert set(first["runs"]) == {"magnitude", "scratch"}
  fail = lambda *a, **k: pytest.fail("re-run trained or pruned again")
  monkeypatch.setattr(train, "train", fail)
  monkeypatch.setattr(prune_lib, "prune", fail)
  again = experiment.run(scfg, workdir)
  for key in ("runs", "reference_loss", "source", "timings"):
    assert again[key] == first[key], key
  assert again["wall_time_total_s"] == pytest.approx(
      first["wall_time_total_s"] + again["wall_time_s"])
  report = open(os.path.join(workdir, "report.md")).read()
  assert "over all invocations" in report
