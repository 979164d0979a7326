"""Jitted, sharded computations: state init, train step, eval step.

Everything here is built from a config and a mesh. State shardings come from
the params' logical names through the rules table; the train step is
`jax.jit` with `in_shardings`/`out_shardings` and donates the old state so
params and optimizer buffers are updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmlab import attention as attention_lib
from llmlab import config as config_lib
from llmlab import guard
from llmlab import model as model_lib
from llmlab import objectives
from llmlab import optim
from llmlab import quant as quant_lib
from llmlab import sharding as shd
from llmlab.objectives.next_token import (chunked_token_nll, target_mask,
                                          token_nll)

BATCH_KEYS = ("tokens", "segment_ids", "positions", "bytes")


@dataclasses.dataclass
class Setup:
  """Everything static about a run: model, optimizer, mesh, shardings."""

  cfg: Any
  model_cfg: model_lib.ModelConfig
  model: model_lib.Transformer
  tx: optax.GradientTransformation  # for init; the step rebuilds its own
  hparams: dict  # run-time numbers of the step: schedule and seed
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: Any  # unboxed ShapeDtypeStructs with shardings
  # optim.offload=host: the optimizer state's shardings in device memory,
  # where the step moves it for the update (state_shardings hold it in
  # pinned host memory between steps); None without offload.
  opt_device_shardings: Any = None


def build(cfg, vocab_size: int, mesh: jax.sharding.Mesh) -> Setup:
  # Before anything traces: a kernel the mesh's devices cannot run is a
  # config error, not a compile failure minutes later.
  shd.check_context(mesh)
  device = mesh.devices.flat[0]
  attention_lib.check(cfg.model, device.platform,
                      cfg.train.seq_len,
                      int(mesh.shape.get("context", 1)))
  quant_lib.check(cfg.model, device)
  offload = cfg.optim.get("offload", "none")
  check_offload(cfg, device)
  mcfg = model_lib.ModelConfig.from_config(cfg.model, vocab_size)
  # model.quant: qwix intercepts the layers' weight products (quant.py);
  # the params it creates are the float model's.
  model = quant_lib.wrap(model_lib.Transformer(mcfg), mcfg.quant)
  tx, _ = optim.make(cfg.optim, cfg.train.learning_rate, cfg.train.steps)
  rules = shd.rules(cfg.mesh)
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx,
                                           cfg.train.seq_len),
                         jax.random.key(0))
  shardings = shd.tree_shardings(mesh, rules, boxed)
  opt_device = None
  if offload == "host":
    opt_device = shardings["opt_state"]
    shardings = dict(shardings, opt_state=jax.tree.map(
        lambda s: s.with_memory_kind("pinned_host"), opt_device))
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.unbox(boxed), shardings)
  return Setup(cfg, mcfg, model, tx, step_hparams(cfg), mesh, rules,
               shardings, shd.batch_sharding(mesh, rules), abstract,
               opt_device)


def has_pinned_host(device) -> bool:
  """Whether `device` (a runtime or compile-only device) has a pinned host
  memory space that jit can place arrays in."""
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # noqa: BLE001 - a device without memory spaces
    return False
  return "pinned_host" in kinds


def check_offload(cfg, device) -> None:
  """ConfigError (one line, naming the key) if optim.offload=host or a
  host-offloading remat policy is asked of a device without pinned host
  memory; called before anything traces."""
  offload = cfg.optim.get("offload", "none")
  if offload not in ("none", "host"):
    raise _config_error("optim.offload", offload,
                        "must be one of none, host")
  keys = []
  if offload == "host":
    keys.append(("optim.offload", offload))
  if cfg.model.remat in config_lib.OFFLOAD_REMATS:
    keys.append(("model.remat", cfg.model.remat))
  if keys and not has_pinned_host(device):
    key, value = keys[0]
    raise _config_error(
        key, value, f"{device.platform} device {device.device_kind!r} has "
        "no pinned_host memory space to offload to")


def _config_error(key, value, why):
  return config_lib.ConfigError(f"config.{key}={value!r}: {why}")


def to_device(setup: Setup, state):
  """`state` with an offloaded optimizer state moved into device memory
  (inside jit; the identity without offload). The step's out_shardings
  put the updated state back in pinned host memory."""
  if setup.opt_device_shardings is None:
    return state
  return dict(state, opt_state=jax.device_put(state["opt_state"],
                                              setup.opt_device_shardings))


def step_hparams(cfg) -> dict:
  """What the train step takes as data rather than compiling in: the LR
  schedule's numbers and the seed. Runs differing only in these (a study's
  decay branches, an LR grid, reseeded fine-tunes) share one executable."""
  return {"schedule": optim.schedule_params(cfg.optim, cfg.train.learning_rate,
                                            cfg.train.steps),
          "seed": np.uint32(cfg.train.seed)}


def _init_boxed(model, tx, seq_len, rng):
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(rng, tokens)["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(params)}


def init_state(setup: Setup, seed: int):
  """Fresh state, created directly in its sharded layout (never gathered)."""
  def init(rng):
    return nn.unbox(_init_boxed(setup.model, setup.tx,
                                setup.cfg.train.seq_len, rng))
  key = jax.random.key(seed)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    compiled = jax.jit(init, out_shardings=setup.state_shardings).lower(
        key).compile(compiler_options=_init_compiler_options())
    return compiled(key)


def _init_compiler_options():
  """Init runs once, so on CPU its compile time is all that matters: XLA:CPU
  spent 3-4x longer optimising the threefry of every initializer than
  unoptimised code takes to run (measured 13-19 s vs 4 s for a 4k-param
  model). Accelerators keep full optimisation: a 7B init is real work."""
  return INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def apply_fn(model: model_lib.Transformer, hidden: bool = False):
  """(params, batch, rng, train) -> logits, the model as objectives see it.

  `hidden`: -> (final hidden states, project) instead, where project(h)
  gives a chunk's logits (`Context.hidden`, config model.logits_chunk).
  """
  def apply(params, batch, rng, train):
    rngs = {"dropout": rng} if (train and model.cfg.dropout > 0) else None
    out = model.apply({"params": params}, batch["tokens"],
                      batch["segment_ids"], batch["positions"],
                      deterministic=not train, rngs=rngs, hidden=hidden)
    if not hidden:
      return out
    h_BxLxD, w_DxV = out
    return h_BxLxD, lambda h: model_lib.project(h, w_DxV, model.cfg)
  return apply


def _step_fn(setup: Setup):
  """(state, batch, aux_params, hparams, loss_scale) -> (state, metrics),
  untraced. `hparams` is `Setup.hparams` (traced, see `step_hparams`).

  `loss_scale` (None in normal runs) multiplies the objective's loss: the
  guard's fire drills use it to inject a NaN or a spike into one batch.
  """
  cfg = setup.cfg
  ctx_cfg = cfg.objective
  objective = objectives.get(cfg.objective.name)
  chunk = cfg.model.get("logits_chunk", 0)
  objectives.check_chunked(cfg.objective.name, chunk)
  apply, hidden = apply_fn(setup.model), apply_fn(setup.model, hidden=True)
  micro = cfg.train.microbatches
  kind = cfg.optim.schedule

  def step_fn(state, batch, aux_params, hparams, loss_scale=None):
    ctx = objectives.Context(apply=apply, cfg=ctx_cfg, aux=aux_params,
                             hidden=hidden, logits_chunk=chunk)
    rng = jax.random.fold_in(jax.random.key(hparams["seed"]), state["step"])
    lr = lambda count: optim.lr_at(kind, hparams["schedule"], count)

    def loss_fn(p, b, r):
      loss, sums = objective(ctx, p, b, r)
      return (loss if loss_scale is None else loss * loss_scale), sums
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(carry, xs):
      b, i = xs
      (loss, sums), grads = grad_fn(state["params"], b,
                                    jax.random.fold_in(rng, i))
      sums = dict(sums, loss_sum=loss)
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    if micro == 1:
      (grads, sums), _ = one(_zeros_like_out(grad_fn, state, batch, rng),
                             (batch, 0))
    else:
      mb = jax.tree.map(
          lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:]), batch)
      mb = jax.tree.map(lambda x: nn.with_logical_constraint(
          x, (None, "batch", "length")), mb)
      zero = _zeros_like_out(grad_fn, state, jax.tree.map(lambda x: x[0], mb),
                             rng)
      (grads, sums), _ = jax.lax.scan(one, zero, (mb, jnp.arange(micro)))
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = optim.transform(cfg.optim, lr).update(
        grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {k[:-4] if k.endswith("_sum") else k: v / weight
               for k, v in sums.items() if k != "weight"}
    metrics.update(grad_norm=optax.tree.norm(grads),
                   learning_rate=lr(state["step"]),
                   targets=sums["weight"])
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new, metrics

  return step_fn


def make_train_step(setup: Setup, aux=None, aux_shardings=None):
  """Compiled step: (state, batch, aux) -> (state, metrics).

  The batch is split into `train.microbatches` slices scanned in sequence;
  per-slice loss *sums* and gradients are added and divided once by the
  total target count, so the update equals the full-batch update.
  """
  step_fn = _step_fn(setup)
  repl = shd.replicated(setup.mesh)
  jitted = jax.jit(
      lambda state, batch, aux_params, hparams: step_fn(
          to_device(setup, state), batch, aux_params, hparams),
      in_shardings=(setup.state_shardings, setup.batch_sharding,
                    aux_shardings, repl),
      out_shardings=(setup.state_shardings, repl),
      donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return jitted(state, batch, aux, setup.hparams)
  run.jitted = jitted
  return run


def make_guarded_train_step(setup: Setup, aux=None, aux_shardings=None):
  """The train step with the divergence guard (llmlab/guard.py) inside:
  (state, carry, batch) -> (state, carry, metrics).

  The guard's flags are computed in-graph from this step's own loss and
  gradient norm; with `guard.policy=skip` a bad update is dropped by a
  `jnp.where`, with no host round trip. `metrics["guard"]` holds the
  counters the host reads with the (one step late) metrics.
  """
  step_fn = _step_fn(setup)
  drop = setup.cfg.guard.policy == "skip"

  def guarded(state, carry, batch, aux_params, hparams):
    state = to_device(setup, state)
    scale = guard.loss_scale(carry, state["step"] + carry["data_offset"])
    new, metrics = step_fn(state, batch, aux_params, hparams, scale)
    ok, carry = guard.update(carry, new["step"], metrics["loss"],
                             metrics["grad_norm"], drop)
    if drop:
      new = guard.keep_if(ok, new, state)
    return new, carry, dict(metrics, guard=guard.report(carry))

  repl = shd.replicated(setup.mesh)
  jitted = jax.jit(
      guarded,
      in_shardings=(setup.state_shardings, repl, setup.batch_sharding,
                    aux_shardings, repl),
      out_shardings=(setup.state_shardings, repl, repl),
      donate_argnums=(0,))

  fn = {"step": jitted}

  def run(state, carry, batch):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return fn["step"](state, carry, batch, aux, setup.hparams)

  def lower(state, carry, batch):
    """Ahead-of-time lowering (abstract arguments are fine)."""
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return jitted.lower(state, carry, batch, aux, setup.hparams)

  def adopt(compiled) -> None:
    """Step with `compiled` (`lower(...).compile()`, the memory
    pre-flight's) from now on: the same executable the jit would build,
    without tracing and lowering the step a second time (0.3-0.7 s of a
    short run's ~1.7 s fixed cost on a CPU, where a study trains dozens
    of short runs)."""
    fn["step"] = compiled
  run.jitted, run.lower, run.adopt = jitted, lower, adopt
  return run


def _zeros_like_out(grad_fn, state, batch, rng):
  """Zero accumulators with the structure of (grads, sums)."""
  (_, sums), grads = jax.eval_shape(grad_fn, state["params"], batch, rng)
  zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)
  return zeros(grads), dict(zeros(sums), loss_sum=jnp.zeros((), jnp.float32))


def make_eval_step(setup: Setup):
  """Compiled (params, batch) -> (nll_sum, target_count, byte_count).

  Objective-independent: evaluation is always the next-token NLL of real
  targets, and bits per byte divide by the UTF-8 bytes of those targets.
  """
  chunk = setup.cfg.model.get("logits_chunk", 0)
  apply = apply_fn(setup.model, hidden=bool(chunk))

  def eval_fn(params, batch):
    mask = target_mask(batch).astype(jnp.float32)
    if chunk:
      h, project = apply(params, batch, None, False)
      nll = chunked_token_nll(h, project, batch["tokens"], chunk)[0]
    else:
      nll, _ = token_nll(apply(params, batch, None, False), batch["tokens"])
    nbytes = batch["bytes"][:, 1:].astype(jnp.float32) * mask
    return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(nbytes)

  repl = shd.replicated(setup.mesh)
  jitted = jax.jit(eval_fn,
                   in_shardings=(setup.state_shardings["params"],
                                 setup.batch_sharding),
                   out_shardings=repl)

  def run(params, batch):
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      return jitted(params, batch)
  return run


def evaluate(setup: Setup, eval_step, params, eval_batches) -> dict:
  """Mean eval loss (nats/target token) and bits per byte over a fixed set."""
  import math
  tot = [0.0, 0.0, 0.0]
  pending = [eval_step(params, shd.global_batch(b, setup.batch_sharding))
             for b in eval_batches]
  for out in pending:
    for i, v in enumerate(out):
      tot[i] += float(v)
  nll, n, nbytes = tot
  return {"eval_loss": nll / max(n, 1.0),
          "eval_bpb": nll / (math.log(2) * max(nbytes, 1.0)),
          "eval_targets": n}
