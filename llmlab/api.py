"""A small Python API for notebooks and tools: `llmlab.load(path, step=None)`.

    run = llmlab.load("runs/tiny")           # latest checkpoint
    logits_BxLxV = run.logits(tokens_BxL)     # numpy/jax int array
    run.config, run.params, run.step, run.info

Params are restored onto a 1-device (or the given) mesh; any mesh the run
was trained on works, since orbax reshards on restore.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, config.json dict) of a run directory, with a clear error."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not an llmlab run directory "
                            "(no config.json)")
  with open(path) as f:
    raw = json.load(f)
  body = {k: v for k, v in raw.items() if k in config_lib.base().keys()}
  body["mesh"] = dict(body.get("mesh", {}))
  body["mesh"]["rules"] = tuple(
      (n, tuple(a) if isinstance(a, list) else a)
      for n, a in body["mesh"].get("rules", config_lib.DEFAULT_RULES))
  cfg = config_lib.merge_defaults(ml_collections.ConfigDict(body))
  return cfg, raw


class Run:
  """A restored run: config, params and a jitted forward pass."""

  def __init__(self, cfg, raw, params, step, setup):
    self.config, self.info, self.params, self.step = cfg, raw, params, step
    self._setup = setup
    self._fwd = None

  def logits(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None):
    import jax.numpy as jnp
    from llmlab import steps as steps_lib
    if self._fwd is None:
      self._fwd = jax.jit(lambda p, b: steps_lib.apply_fn(self._setup.model)(
          p, b, None, False))
    tokens = jnp.asarray(tokens_BxL, jnp.int32)
    batch = {"tokens": tokens,
             "segment_ids": jnp.ones_like(tokens) if segment_ids_BxL is None
             else jnp.asarray(segment_ids_BxL, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]),
                                           tokens.shape)
             if positions_BxL is None else jnp.asarray(positions_BxL, jnp.int32)}
    return self._fwd(self.params, batch)


def _setup_for(cfg, raw, mesh=None):
  from llmlab import sharding as shd
  from llmlab import steps as steps_lib
  import ml_collections as mlc
  cfg = mlc.ConfigDict(cfg.to_dict())
  if mesh is None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data = 1, 1, 1, 1
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
  vocab = raw.get("model_info", {}).get("vocab_size")
  return steps_lib.build(cfg, vocab, mesh)


def restore_params(ref: str, setup):
  """Params of run `DIR[:STEP]`, laid out by `setup`'s shardings.

  The source run's model shape must equal `setup`'s; otherwise the error
  names the differing keys.
  """
  workdir, step = ckpt_lib.parse_ref(ref)
  src_cfg, raw = read_run_config(workdir)
  want = config_lib.model_shape_keys(setup.cfg)
  have = config_lib.model_shape_keys(src_cfg)
  diffs = [f"{k}: {have[k]!r} (in {workdir}) != {want[k]!r}"
           for k in want if have[k] != want[k]]
  if raw.get("model_info", {}).get("vocab_size") != setup.model_cfg.vocab_size:
    diffs.append(f"vocab_size: {raw.get('model_info', {}).get('vocab_size')}"
                 f" != {setup.model_cfg.vocab_size}")
  if diffs:
    raise config_lib.ConfigError(f"init_from={ref!r}: model shape differs: "
                                 + "; ".join(diffs))
  src_setup = _setup_for(src_cfg, raw, setup.mesh)
  mgr = ckpt_lib.Manager(workdir, src_cfg.checkpoint, src_cfg.train.steps,
                         read_only=True)
  steps = mgr.steps()
  if not steps:
    raise FileNotFoundError(f"{workdir}: no checkpoints")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; "
                            f"available: {steps}")
  state, _ = mgr.restore(step, src_setup.abstract_state)
  mgr.close()
  return state["params"]


def load(path: str, step: int | None = None, mesh=None) -> Run:
  """Load a run directory (or `DIR:STEP`) for inspection and inference."""
  workdir, ref_step = ckpt_lib.parse_ref(path)
  step = step if step is not None else ref_step
  cfg, raw = read_run_config(workdir)
  setup = _setup_for(cfg, raw, mesh)
  mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps,
                         read_only=True)
  steps = mgr.steps()
  if not steps:
    raise FileNotFoundError(f"{workdir}: no checkpoints")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; "
                            f"available: {steps}")
  state, _ = mgr.restore(step, setup.abstract_state)
  mgr.close()
  return Run(cfg, raw, state["params"], step, setup)
