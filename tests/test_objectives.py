"""Distillation objectives: the loss terms by hand, the frozen teacher, the
offline top-k store, on-policy distillation, errors before training, the
same loss on an 8-device mesh as on one device, and `llmlab sample` on the
trained teacher run.

`_mesh_losses` runs in the session's `devices(8)` process (8 simulated CPU
devices).
"""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmlab import config as config_lib
from llmlab import objectives
from llmlab import runs
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from llmlab.data import teacher_store
from llmlab.objectives import distill as distill_lib
from tests.helpers import ROOT


def _cfg(**objective):
  """Tiny student on the default corpus (byte tokenizer)."""
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                 mlp_dim=64)
  c.train.update(steps=3, batch_size=4, seq_len=32, log_every=1,
                 eval_tokens=64, learning_rate=1e-2)
  c.optim.warmup_steps = 1
  c.objective.update(objective)
  return c


def _setup(cfg, vocab=259, devices=1):
  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:devices])
  return steps_lib.build(cfg, vocab, mesh)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A teacher 4x wider than the student, trained for a few steps."""
  from llmlab import train
  c = _cfg()
  c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                 mlp_dim=128)
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train(c, workdir)
  return workdir


@pytest.fixture(scope="module")
def batch():
  from llmlab import data as data_lib
  c = _cfg()
  data = data_lib.build(c.data, seq_len=32, global_batch=4, seed=0)
  return {k: jnp.asarray(v) for k, v in data.train_batch(0).items()}


def _loss_fn(cfg, setup, name=None):
  """jit((aux, params, batch, rng) -> (loss_sum, sums)) of a frozen copy of
  `cfg.objective` (eager flax is slow; a copy keeps the trace honest when
  the test changes the config afterwards)."""
  import ml_collections
  ocfg = ml_collections.ConfigDict(cfg.objective.to_dict())
  fn = objectives.get(name or ocfg.name)
  apply = steps_lib.apply_fn(setup.model)
  return jax.jit(lambda aux, params, batch, rng: fn(
      objectives.Context(apply=apply, cfg=ocfg, aux=aux), params, batch, rng))


@pytest.fixture(scope="module")
def student():
  """(setup, host copy of a fresh state) of the student, built once: every
  objective shares the model, and each compile costs seconds on CPU."""
  setup = _setup(_cfg())
  return setup, jax.device_get(steps_lib.init_state(setup, 1))


def _for(setup, cfg):
  """The shared student setup, training objective `cfg.objective`."""
  return dataclasses.replace(setup, cfg=cfg)


def _state(setup, host_state):
  """A device copy of `host_state` (train steps donate their input)."""
  return jax.device_put(host_state, setup.state_shardings)


# ---------------------------------------------------------------------------
# Loss terms.
# ---------------------------------------------------------------------------


def _np_logp(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_terms_by_hand_and_zero_for_equal_distributions():
  rng = np.random.default_rng(0)
  t, s = (rng.normal(size=(3, 5, 11)) * 2 for _ in range(2))
  tl, sl = _np_logp(t), _np_logp(s)
  fwd = (np.exp(tl) * (tl - sl)).sum(-1)
  rev = (np.exp(sl) * (sl - tl)).sum(-1)
  np.testing.assert_allclose(distill_lib.dense_kl(tl, sl, "forward"), fwd,
                             rtol=1e-5)
  np.testing.assert_allclose(distill_lib.dense_kl(tl, sl, "reverse"), rev,
                             rtol=1e-5)
  assert fwd.min() > 0.01 and not np.allclose(fwd, rev)
  for kind in ("forward", "reverse"):
    np.testing.assert_allclose(distill_lib.dense_kl(sl, sl, kind), 0.0,
                               atol=1e-6)


def test_top_k_renormalisation_by_hand():
  rng = np.random.default_rng(1)
  t, s = rng.normal(size=(2, 4, 9)), rng.normal(size=(2, 4, 9))
  k = 3
  ids, logp = distill_lib.top_k_support(jnp.asarray(t), k)
  want_ids = np.argsort(-t, axis=-1)[..., :k]
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  top = np.take_along_axis(t, want_ids, -1)
  q = np.exp(top) / np.exp(top).sum(-1, keepdims=True)  # renormalised
  np.testing.assert_allclose(np.exp(logp), q, rtol=1e-5)
  sl = _np_logp(s)
  s_k = np.take_along_axis(sl, want_ids, -1)
  fwd = (q * (np.log(q) - s_k)).sum(-1)
  r = np.exp(s_k) / np.exp(s_k).sum(-1, keepdims=True)
  rev = (r * (np.log(r) - np.log(q))).sum(-1)
  np.testing.assert_allclose(distill_lib.sparse_kl(ids, logp, sl, "forward"),
                             fwd, rtol=1e-5)
  np.testing.assert_allclose(distill_lib.sparse_kl(ids, logp, sl, "reverse"),
                             rev, rtol=1e-5)
  # The same truncation through the objective's kl_term, at temperature 2:
  # stored T=1 log-probs are re-tempered and renormalised on the support.
  cfg = config_lib.base().objective
  cfg.update(temperature=2.0, top_k=k, kl="forward")
  online = distill_lib.kl_term(jnp.asarray(s), {"kind": "logits",
                                                "logits": jnp.asarray(t)},
                               cfg)
  full_ids = np.argsort(-t, axis=-1)[..., :5]
  stored = distill_lib.kl_term(
      jnp.asarray(s), {"kind": "stored", "ids": jnp.asarray(full_ids),
                       "logprobs": jnp.asarray(
                           np.take_along_axis(_np_logp(t), full_ids, -1))},
      cfg)
  np.testing.assert_allclose(online, stored, rtol=1e-5)
  q2 = np.exp(top / 2) / np.exp(top / 2).sum(-1, keepdims=True)
  s2 = np.take_along_axis(_np_logp(s / 2), want_ids, -1)
  np.testing.assert_allclose(online, (q2 * (np.log(q2) - s2)).sum(-1),
                             rtol=1e-5)


def test_kl_zero_when_teacher_is_the_student(batch, student):
  cfg = _cfg(name="distill", alpha=1.0, temperature=2.0, kl="reverse")
  setup, host = student
  params = _state(setup, host)["params"]
  teacher = distill_lib.Teacher(params, setup.model_cfg)
  loss, sums = _loss_fn(cfg, setup)(teacher, params, batch, jax.random.key(0))
  assert abs(float(loss)) < 1e-4 and abs(float(sums["kl_sum"])) < 1e-4
  assert float(sums["nll_sum"]) > 1.0


def test_one_hot_teacher_equals_next_token_loss(batch, student):
  cfg = _cfg(name="distill", alpha=0.5)
  setup, host = student
  params = _state(setup, host)["params"]
  want, want_sums = _loss_fn(cfg, setup, "next_token")(None, params, batch,
                                                       None)
  nxt = jnp.concatenate([batch["tokens"][:, 1:], batch["tokens"][:, :1]], 1)
  one_hot = dict(batch, teacher_ids=nxt[..., None],
                 teacher_logprobs=jnp.zeros(nxt.shape + (1,)))
  got, sums = _loss_fn(cfg, setup)(None, params, one_hot, None)
  # alpha * KL(one-hot || s) + (1 - alpha) * CE = alpha * CE + (1 - alpha) * CE
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(sums["kl_sum"]), float(want), rtol=1e-5)
  assert float(sums["weight"]) == float(want_sums["weight"]) > 0


# ---------------------------------------------------------------------------
# The frozen teacher.
# ---------------------------------------------------------------------------


def test_teacher_frozen_not_optimized_and_counted(teacher_run, batch,
                                                  student):
  from llmlab import model as model_lib
  cfg = _cfg(name="distill", teacher=teacher_run, alpha=0.7, temperature=2.0)
  setup, host = student
  aux = objectives.prepare(cfg, setup, runs.load_teacher)
  teacher = aux.params
  assert teacher.model_cfg.d_model == 64
  counts = model_lib.param_counts(teacher.model_cfg)
  assert aux.info["teacher_params_total"] == counts["total"]
  assert aux.info["teacher_step"] == 3
  assert aux.info["flops_per_token"] == model_lib.flops_per_token(
      teacher.model_cfg, 32)["forward"]
  before = jax.device_get(teacher.params)
  state = _state(setup, host)
  step = steps_lib.make_train_step(_for(setup, cfg), aux.params, aux.shardings)
  losses = []
  for _ in range(3):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    assert float(m["kl"]) > 0
  assert losses[-1] < losses[0]
  # The optimizer state is the student's alone, leaf for leaf.
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  assert shapes(state["opt_state"]) == shapes(setup.abstract_state["opt_state"])
  leaf_shapes = lambda t: {tuple(x.shape) for x in jax.tree.leaves(t)}
  assert not leaf_shapes(teacher.params) & leaf_shapes(state["opt_state"])
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.device_get(teacher.params))
  # No gradient reaches the teacher.
  loss = _loss_fn(cfg, setup)
  grads = jax.jit(jax.grad(lambda tp: loss(
      distill_lib.Teacher(tp, teacher.model_cfg), state["params"], batch,
      None)[0]))(teacher.params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_offline_store_matches_online_top_k(teacher_run, batch, student,
                                            tmp_path):
  from llmlab import teacher_logits
  out = str(tmp_path / "store")
  cfg = _cfg(name="distill", top_k=4, kl="reverse", temperature=1.5)
  summary = teacher_logits.write(teacher_run, cfg, out, top_k=6,
                                 chunk_steps=2, steps=3)
  assert summary["steps"] == 3 and sorted(os.listdir(out)) == [
      "index.json", "steps_00000000.npz", "steps_00000002.npz"]
  setup, host = student
  params = _state(setup, host)["params"]
  online_cfg = _cfg(**cfg.objective.to_dict())
  online_cfg.objective.teacher = teacher_run
  aux = objectives.prepare(online_cfg, setup, runs.load_teacher)
  want, _ = _loss_fn(online_cfg, setup)(aux.params, params, batch, None)
  cfg.objective.teacher_logits = out
  offline_aux = objectives.prepare(cfg, setup, runs.load_teacher)
  assert offline_aux.params is None and offline_aux.info["top_k"] == 6
  extras = offline_aux.batch_extras
  local = jax.device_get(batch)
  got, _ = _loss_fn(cfg, setup)(None, params,
                                dict(batch, **extras(0, local)), None)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-4)
  # Process 1 of 2 gets the second half of the rows.
  half = teacher_store.Store(out).batch_extras(1, 2)(
      0, {k: v[2:] for k, v in local.items()})
  np.testing.assert_array_equal(half["teacher_ids"],
                                extras(0, local)["teacher_ids"][2:])
  with pytest.raises(ValueError, match="stored tokens of step 1 differ"):
    extras(1, local)
  for key, value, message in (("train.seed", 1, "seed: store 0 != config 1"),
                              ("train.steps", 5, "holds steps \\[0, 3\\)"),
                              ("objective.top_k", 7, "holds only the top 6")):
    bad = config_lib.with_overrides(_cfg(**cfg.objective.to_dict()),
                                    {key: value})
    with pytest.raises(config_lib.ConfigError, match=message):
      objectives.prepare(bad, setup, runs.load_teacher)


# ---------------------------------------------------------------------------
# On-policy distillation.
# ---------------------------------------------------------------------------


def test_on_policy_distill(teacher_run, batch, student):
  cfg = _cfg(name="on_policy_distill", teacher=teacher_run, prompt_len=8,
             rollout_len=6, rollout_temperature=1.0)
  setup, host = student
  aux = objectives.prepare(cfg, setup, runs.load_teacher)
  assert aux.info["flops_per_token"] > 0
  assert aux.params.teacher.model_cfg.d_model == 64
  state = _state(setup, host)
  step = steps_lib.make_train_step(_for(setup, cfg), aux.params, aux.shardings)
  kls = []
  for _ in range(3):
    state, m = step(state, batch)
    kls.append(float(m["kl"]))
    # Scored: the sampled positions up to each row's EOS, at most B x R.
    assert 0 < float(m["targets"]) <= 4 * 6
    assert float(m["grad_norm"]) > 0 and np.isfinite(float(m["teacher_nll"]))
  assert kls[-1] < kls[0]


# ---------------------------------------------------------------------------
# Errors before training.
# ---------------------------------------------------------------------------


def test_bad_teacher_fails_before_training(teacher_run, student, tmp_path):
  from llmlab import train
  setup, _ = student
  bad_path = str(tmp_path / "no_such_run")
  cases = [(dict(teacher=bad_path), "no_such_run"),
           (dict(), "needs exactly one of"),
           (dict(teacher=teacher_run, kl="sideways"), "objective.kl"),
           (dict(teacher=teacher_run + ":2"), "no checkpoint at step 2")]
  other = str(tmp_path / "other_vocab")
  shutil.copytree(teacher_run, other)
  with open(os.path.join(other, "config.json")) as f:
    raw = json.load(f)
  raw["model_info"]["vocab_size"] = 300
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump(raw, f)
  cases.append((dict(teacher=other), "vocabulary has 300 ids, the student's "
                                     "259"))
  for objective, message in cases:
    with pytest.raises(config_lib.ConfigError, match=message):
      objectives.prepare(_cfg(name="distill", **objective), setup,
                         runs.load_teacher)
  with pytest.raises(config_lib.ConfigError, match="needs objective.teacher"):
    objectives.prepare(_cfg(name="on_policy_distill"), setup,
                         runs.load_teacher)
  workdir = str(tmp_path / "student")
  with pytest.raises(config_lib.ConfigError, match="no_such_run"):
    train.train(_cfg(name="distill", teacher=bad_path), workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_teacher_logits_command_errors(tmp_path, capsys):
  from llmlab.commands import teacher_logits
  assert teacher_logits.main([]) == 2
  assert "missing --config, --teacher, --out" in capsys.readouterr().err
  rc = teacher_logits.main([f"--config={ROOT}/configs/tiny.py:smoke",
                            f"--teacher={tmp_path}/none",
                            f"--out={tmp_path}/store"])
  assert rc == 2 and f"--teacher='{tmp_path}/none'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "store")


def test_distill_quick_experiment_configs(tmp_path):
  from llmlab import model as model_lib
  from llmlab import cli_common
  from llmlab.studies import distill as study
  scfg = cli_common.load_config(f"{ROOT}/configs/distill_quick.py")
  n = lambda c: model_lib.param_counts(model_lib.ModelConfig.from_config(
      c.model, 259))["non_embedding"]
  teacher = study.teacher_config(scfg)
  runs = {k: study.student_config(scfg, k, str(tmp_path))
          for k in scfg.students}
  assert 3.5 < n(teacher) / n(runs["next_token"]) < 4.5
  assert (teacher.train.steps * teacher.train.batch_size >
          runs["next_token"].train.steps * runs["next_token"].train.batch_size)
  for kind, c in runs.items():
    diff = {k for k, v in c.to_dict().items()
            if v != runs["next_token"].to_dict()[k]}
    assert diff <= {"name", "objective"}, (kind, diff)
  assert runs["distill"].objective.teacher == str(tmp_path / "teacher")
  assert runs["offline"].objective.teacher_logits == str(
      tmp_path / "teacher_logits")
  with pytest.raises(config_lib.ConfigError, match="unknown student"):
    study.student_config(scfg, "nope", str(tmp_path))


@pytest.mark.integration  # trains a whole study: the slower tier
def test_distill_study_rerun_skips_every_run(tmp_path, monkeypatch):
  """The whole smoke study, then a re-run: nothing trains, the summaries
  (read back from the runs) are the same, wall time adds up."""
  from llmlab import cli_common
  from llmlab import train
  from llmlab.studies import distill as study
  scfg = cli_common.load_config(f"{ROOT}/configs/distill_quick.py:smoke")
  scfg.student.train.update(seq_len=32, eval_tokens=512)
  workdir = str(tmp_path / "study")
  first = study.run(scfg, workdir)
  monkeypatch.setattr(train, "train",
                      lambda *a: pytest.fail("re-run trained a finished run"))
  again = study.run(scfg, workdir)
  for name in ("teacher", *scfg.students):
    assert again[name] == first[name], name
    assert first[name]["eval_loss"] > 0 and first[name]["wall_s"] > 0
  assert again["wall_time_total_s"] == pytest.approx(
      first["wall_time_total_s"] + again["wall_time_this_run_s"])
  assert "over all invocations" in open(os.path.join(workdir,
                                                     "table.md")).read()


def test_sample_command_on_a_run(teacher_run, tmp_path, capsys):
  from llmlab.commands import sample
  rc = sample.main([f"--workdir={teacher_run}", "--prompt=def ",
                    "--max_new_tokens=20", "--num_samples=2", "--seed=1"])
  out = capsys.readouterr().out
  assert rc == 0 and out.count("def ") >= 2 and "--- sample 1" in out
  assert sample.main([f"--workdir={tmp_path}/nope", "--prompt=x"]) == 2
  assert f"{tmp_path}/nope" in capsys.readouterr().err
  assert sample.main([f"--workdir={teacher_run}", "--top_p=0"]) == 2
  assert "--top_p=0.0: must be in (0, 1]" in capsys.readouterr().err
  # The teacher trained on 32-token rows: 4 + 40 tokens run past them.
  assert sample.main([f"--workdir={teacher_run}", "--prompt=def ",
                      "--max_new_tokens=40"]) == 0
  assert "sampling past the trained context" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# 8 simulated devices.
# ---------------------------------------------------------------------------

VOCAB = 64


def _mesh_losses(meshes, objective: dict, steps=3) -> dict:
  """Student losses with a random teacher, both sharded on each mesh."""
  cfg = _cfg(name="distill", **objective)
  cfg.train.update(batch_size=8, seq_len=16)
  tcfg = _cfg()
  tcfg.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                    mlp_dim=128)
  host = jax.device_get(steps_lib.init_state(_setup(cfg, VOCAB), 0))
  t_model = _setup(tcfg, VOCAB).model
  t_host = jax.device_get(nn.unbox(jax.jit(t_model.init)(
      jax.random.key(7), jnp.zeros((1, 16), jnp.int32))["params"]))
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(steps):
    tokens = rng.integers(0, VOCAB, (8, 16)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[:, 10:] = 2
    seg[0, -3:] = 0
    pos = np.concatenate([np.arange(10), np.arange(6)])
    batches.append({"tokens": tokens, "segment_ids": seg,
                    "positions": np.broadcast_to(pos, (8, 16)).astype(np.int32),
                    "bytes": np.ones_like(tokens)})
  out = {}
  for mesh in meshes:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    tcfg.mesh = cfg.mesh
    n = int(np.prod(mesh))
    setup, tsetup = _setup(cfg, VOCAB, n), _setup(tcfg, VOCAB, n)
    tparams = jax.device_put(t_host, tsetup.state_shardings["params"])
    step = steps_lib.make_train_step(
        setup, distill_lib.Teacher(tparams, tsetup.model_cfg),
        distill_lib.Teacher(tsetup.state_shardings["params"],
                            tsetup.model_cfg))
    state = _state(setup, host)
    losses = []
    for b in batches:
      state, m = step(state, shd.global_batch(b, setup.batch_sharding))
      losses.append(float(m["loss"]))
    w_up = tparams["layers"]["mlp"]["w_up"]
    out[str(list(mesh))] = {"losses": losses,
                            "teacher_w_up_shard": list(
                                w_up.sharding.shard_shape(w_up.shape))}
  return out


def test_distill_on_8_devices_matches_1_device(devices):
  res = devices(8).call("tests.test_objectives:_mesh_losses",
                        [[1, 1, 1], [2, 2, 2]],
                        dict(alpha=0.5, temperature=2.0, top_k=8, kl="reverse"))
  one, eight = res["[1, 1, 1]"], res["[2, 2, 2]"]
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-4)
  assert one["losses"][-1] < one["losses"][0]
  # The teacher is sharded too: w_up [layers, embed, mlp] over fsdp, tensor.
  assert one["teacher_w_up_shard"] == [2, 64, 128]
  assert eight["teacher_w_up_shard"] == [2, 32, 64]


def test_label_smoothing_and_z_loss_by_hand():
  """next_token's extras against a numpy computation on fixed logits."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
  seg = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]], np.int32)
  batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg)}
  objective = objectives.get("next_token")

  def run(**cfg):
    ctx = objectives.Context(apply=lambda p, b, r, t: jnp.asarray(logits),
                             cfg=dict(cfg), aux=None)
    loss_sum, sums = objective(ctx, None, batch, None)
    return float(loss_sum), {k: float(v) for k, v in sums.items()}

  logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
  lse = np.log(np.exp(logits[:, :-1]).sum(-1))
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  assert mask.sum() == 6  # the boundary 1->2 and the padding are masked
  plain, sums = run()
  np.testing.assert_allclose(plain, nll[mask].sum(), rtol=1e-5)
  assert sums["weight"] == 6
  s, z = 0.1, 1e-2
  smoothed, sums = run(label_smoothing=s)
  uniform_ce = -logp.mean(-1)
  np.testing.assert_allclose(
      smoothed, ((1 - s) * nll + s * uniform_ce)[mask].sum(), rtol=1e-5)
  np.testing.assert_allclose(sums["nll_sum"], nll[mask].sum(), rtol=1e-5)
  with_z, _ = run(z_loss=z)
  np.testing.assert_allclose(with_z, nll[mask].sum() + z * (lse[mask] ** 2).sum(),
                             rtol=1e-5)
