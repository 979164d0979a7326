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

import jax
import jax.numpy as jnp

from llmlab import runs
from llmlab import steps as steps_lib


class Run:
  """A restored run: config, params and a jitted forward pass.

  `info` is the checkpoint's metadata: config, model_info (N, FLOPs/token,
  vocab_size), step, tokens, data_info.
  """

  def __init__(self, cfg, info, params, step, setup):
    self.config, self.info, self.params, self.step = cfg, info, params, step
    self.setup = setup
    self._fwd = None

  def logits(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None):
    """Next-token logits_BxLxV (float32) of int tokens_BxL."""
    if self._fwd is None:
      self._fwd = jax.jit(lambda p, b: steps_lib.apply_fn(self.setup.model)(
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


def load(path: str, step: int | None = None, mesh=None) -> Run:
  """Load a run directory (or `DIR:STEP`) for inspection and inference."""
  with runs.Checkpoint(path, step) as ck:
    setup = runs.setup_for(ck.config, ck.meta, mesh)
    params = ck.params(setup.abstract_state["params"])
    return Run(ck.config, ck.meta, params, ck.step, setup)
