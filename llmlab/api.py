"""A small Python API for notebooks and tools: `llmlab.load(path, step=None)`.

    run = llmlab.load("runs/tiny")           # latest checkpoint
    logits_BxLxV = run.logits(tokens_BxL)     # numpy/jax int array
    run.config, run.params, run.step, run.info

Only the params are read from the checkpoint (a partial orbax restore: the
optimizer state, twice the params' size with Adam, stays on disk), and they
are verified against the checksums saved with them. The config is the one
the checkpoint was saved with (its metadata), not the workdir's config.json,
which a later run may have rewritten. Params are restored onto a 1-device
(or the given) mesh; any mesh the run was trained on works, since orbax
reshards on restore.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib


def config_from_dict(body: dict) -> ml_collections.ConfigDict:
  """A resolved config from its JSON form (config.json or checkpoint meta)."""
  body = {k: v for k, v in body.items() if k in config_lib.base().keys()}
  body["mesh"] = dict(body.get("mesh", {}))
  body["mesh"]["rules"] = tuple(
      (n, tuple(a) if isinstance(a, list) else a)
      for n, a in body["mesh"].get("rules", config_lib.DEFAULT_RULES))
  return config_lib.merge_defaults(ml_collections.ConfigDict(body))


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, config.json dict) of a run directory, with a clear error."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not an llmlab run directory "
                            "(no config.json)")
  with open(path) as f:
    raw = json.load(f)
  return config_from_dict(raw), raw


class Run:
  """A restored run: config, params and a jitted forward pass.

  `info` is the checkpoint's metadata: config, model_info (N, FLOPs/token,
  vocab_size), step, tokens, data_info.
  """

  def __init__(self, cfg, info, params, step, setup):
    self.config, self.info, self.params, self.step = cfg, info, params, step
    self._setup = setup
    self._fwd = None

  def logits(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None):
    """Next-token logits_BxLxV (float32) of int tokens_BxL."""
    import jax.numpy as jnp
    from llmlab import steps as steps_lib
    if self._fwd is None:
      self._fwd = jax.jit(lambda p, b: steps_lib.apply_fn(self._setup.model)(
          p, b, None, False))
    tokens = jnp.asarray(tokens_BxL, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"logits: tokens must be [batch, length], got shape "
                       f"{tokens.shape}")
    batch = {"tokens": tokens,
             "segment_ids": jnp.ones_like(tokens) if segment_ids_BxL is None
             else jnp.asarray(segment_ids_BxL, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1]),
                                           tokens.shape)
             if positions_BxL is None else jnp.asarray(positions_BxL, jnp.int32)}
    return self._fwd(self.params, batch)


def setup_for(cfg, raw: dict, mesh=None):
  """Model and abstract state of a saved run's `cfg` on `mesh` (default: one
  device), for tools that evaluate or transform checkpoints (sweep, studies);
  `raw` is config.json or checkpoint metadata (for model_info.vocab_size)."""
  from llmlab import sharding as shd
  from llmlab import steps as steps_lib
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if mesh is None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data = 1, 1, 1, 1
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
  return steps_lib.build(cfg, _vocab_size(raw, "run"), mesh)


_setup_for = setup_for  # the former private name


def _open(ref: str, step: int | None):
  """(manager, step, meta, config) of checkpoint `DIR[:STEP]` (or `step`)."""
  workdir, ref_step = ckpt_lib.parse_ref(ref)
  step = step if step is not None else ref_step
  if not os.path.isdir(ckpt_lib.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"{workdir}: no checkpoints directory "
                            f"({ckpt_lib.checkpoint_dir(workdir)})")
  try:
    cfg, _ = read_run_config(workdir)
  except FileNotFoundError:  # e.g. copied checkpoints; meta has the config
    cfg = config_lib.base()
  mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps,
                         read_only=True)
  steps = mgr.steps()
  if not steps:
    mgr.close()
    raise FileNotFoundError(f"{workdir}: no complete checkpoints")
  step = steps[-1] if step is None else step
  if step not in steps:
    mgr.close()
    raise FileNotFoundError(f"{workdir}: no checkpoint at step {step}; "
                            f"available: {steps}")
  meta = mgr.restore_meta(step)
  return mgr, step, meta, config_from_dict(meta.get("config", cfg.to_dict()))


def _vocab_size(meta: dict, where: str) -> int:
  vocab = meta.get("model_info", {}).get("vocab_size")
  if not vocab:
    raise ValueError(f"{where}: checkpoint metadata lacks model_info.vocab_size")
  return int(vocab)


def restore_params(ref: str, setup):
  """Params (only) of run `DIR[:STEP]`, laid out by `setup`'s shardings.

  The source run's model shape and vocabulary must equal `setup`'s;
  otherwise the error names the differing keys.
  """
  mgr, step, meta, src_cfg = _open(ref, None)
  try:
    want = config_lib.model_shape_keys(setup.cfg)
    have = config_lib.model_shape_keys(src_cfg)
    diffs = [f"{k}: {have[k]!r} (in {ref}) != {want[k]!r}"
             for k in want if have[k] != want[k]]
    vocab = _vocab_size(meta, ref)
    if vocab != setup.model_cfg.vocab_size:
      diffs.append(f"vocab_size: {vocab} (in {ref}) != "
                   f"{setup.model_cfg.vocab_size}")
    if diffs:
      raise config_lib.ConfigError(f"init_from={ref!r}: model shape differs: "
                                   + "; ".join(diffs))
    params, _ = mgr.restore_params(step, setup.abstract_state["params"])
  finally:
    mgr.close()
  return params


def load(path: str, step: int | None = None, mesh=None) -> Run:
  """Load a run directory (or `DIR:STEP`) for inspection and inference."""
  mgr, step, meta, cfg = _open(path, step)
  try:
    setup = setup_for(cfg, meta, mesh)
    params, meta = mgr.restore_params(step, setup.abstract_state["params"])
  finally:
    mgr.close()
  return Run(cfg, meta, params, step, setup)
