"""LR schedules: hand-checked shapes, bit-equality with the optax schedules
they are written as, and one compiled step for runs that differ only in
length, learning rate or seed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmlab import config as config_lib
from llmlab import optim
from llmlab import sharding as shd
from llmlab import steps as steps_lib


def _optim_cfg(kind, warmup, final=0.1, decay=0.2):
  c = config_lib.base().optim
  c.update(schedule=kind, warmup_steps=warmup, final_lr_fraction=final,
           decay_fraction=decay)
  return c


def _optax_reference(o, lr, steps):
  """The same schedules composed from optax's own (the former optim.py)."""
  warm = min(int(o.warmup_steps), max(steps - 1, 0))
  lo = lr * o.final_lr_fraction
  warmup = optax.linear_schedule(0.0 if warm else lr, lr, max(warm, 1))
  rest = max(steps - warm, 1)
  if o.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif o.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, rest, alpha=o.final_lr_fraction)
  else:
    decay = max(int(round(o.decay_fraction * steps)), 1)
    main = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, lo, decay)],
        [max(rest - decay, 0)])
  return optax.join_schedules([warmup, main], [warm])


CASES = [(kind, warm, steps, lr, final, decay)
         for kind in ("cosine", "constant", "wsd")
         for warm, steps in ((0, 1), (0, 37), (5, 37), (70, 1464), (50, 20))
         for lr, final, decay in ((3e-3, 0.1, 0.2), (7.3e-4, 0.0, 0.37))]


@pytest.mark.parametrize("kind,warm,steps,lr,final,decay", CASES)
def test_bit_equal_to_optax(kind, warm, steps, lr, final, decay):
  o = _optim_cfg(kind, warm, final, decay)
  count = jnp.arange(steps + 3, dtype=jnp.int32)
  ref = np.asarray(jax.jit(_optax_reference(o, lr, steps))(count))
  p = optim.schedule_params(o, lr, steps)
  # Traced numbers (as the train step sees them) and fixed ones alike;
  # compiled, as in the step (op-by-op dispatch rounds differently).
  traced = jax.jit(lambda p, c: optim.lr_at(kind, p, c))(p, count)
  fixed = jax.jit(optim.schedule(o, lr, steps))(count)
  np.testing.assert_array_equal(np.asarray(traced), ref)
  np.testing.assert_array_equal(np.asarray(fixed), ref)


def test_shapes_by_hand():
  lr, steps = 1e-2, 100
  wsd = optim.schedule(_optim_cfg("wsd", 10, final=0.1, decay=0.2), lr, steps)
  at = lambda s, i: float(s(jnp.int32(i)))
  assert at(wsd, 0) == 0.0
  assert at(wsd, 5) == pytest.approx(lr / 2, rel=1e-6)
  assert at(wsd, 10) == pytest.approx(lr, rel=1e-6)
  assert at(wsd, 79) == pytest.approx(lr, rel=1e-6)  # stable to step 80
  assert at(wsd, 90) == pytest.approx((lr + lr * 0.1) / 2, rel=1e-6)
  assert at(wsd, 100) == pytest.approx(lr * 0.1, rel=1e-6)
  cos = optim.schedule(_optim_cfg("cosine", 10, final=0.0), lr, steps)
  assert at(cos, 55) == pytest.approx(lr / 2, rel=1e-5)  # half of 90 steps
  assert at(cos, 100) == pytest.approx(0.0, abs=1e-9)
  const = optim.schedule(_optim_cfg("constant", 0), lr, steps)
  assert at(const, 0) == at(const, 99) == pytest.approx(lr, rel=1e-6)


def _setup(**train):
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                 mlp_dim=32)
  c.train.update(batch_size=2, seq_len=16, **train)
  c.optim.update(schedule="wsd", warmup_steps=2)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = shd.make_mesh(c.mesh, jax.devices()[:1])
  return steps_lib.build(c, 64, mesh)


def test_runs_differing_in_length_lr_seed_share_one_program():
  """A study's branches and an LR grid must hit the compilation cache: the
  lowered step may not depend on steps, learning rate or seed."""
  a = _setup(steps=40, learning_rate=1e-3, seed=0)
  b = _setup(steps=17, learning_rate=3e-2, seed=5)
  batch = {k: jnp.zeros((2, 16), jnp.int32) for k in steps_lib.BATCH_KEYS}
  text = [steps_lib.make_train_step(s).jitted.lower(
      s.abstract_state, batch, None, s.hparams).as_text() for s in (a, b)]
  assert text[0] == text[1]


def test_step_uses_its_runs_schedule_and_seed():
  b = _setup(steps=6, learning_rate=3e-2, seed=5, microbatches=1)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 64, (2, 16), dtype=np.int32),
           "segment_ids": np.ones((2, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           "bytes": np.ones((2, 16), np.int32)}
  batch = shd.global_batch(batch, b.batch_sharding)
  step = steps_lib.make_train_step(b)
  state = steps_lib.init_state(b, 5)
  lr = optim.schedule(b.cfg.optim, 3e-2, 6)
  for i in range(4):
    state, m = step(state, batch)
    assert float(m["learning_rate"]) == float(
        jax.jit(lr)(jnp.int32(i)))
  assert float(m["learning_rate"]) == pytest.approx(3e-2, rel=1e-6)
