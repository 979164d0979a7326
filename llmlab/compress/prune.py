"""`prune(source, target_config, workdir, method)`: a smaller run directory
initialised from a trained one.

Order of events, so that mistakes surface before anything expensive: method
and output directory -> source checkpoint metadata -> target config
(validated, its data built: vocabulary) -> target shape checked against the
source (`shapes.check_target`) -> params read -> scores / mask training ->
slice -> write.

The output is an ordinary run directory (config.json of the target config +
an orbax checkpoint at step 0 with a fresh optimizer state, written by the
same pieces as `llmlab convert`), so `llmlab train
--config.init_from=OUT` (any objective, e.g. distill with the source as
teacher), `llmlab eval`, `llmlab sample`, `llmlab sweep` and `llmlab.load`
all read it. What was kept is in OUT/prune_selection.json; config.json and
the checkpoint metadata carry a `compress` summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmlab import api
from llmlab import distributed
from llmlab import errors
from llmlab import runs
from llmlab import storage
from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import data as data_lib
from llmlab import model as model_lib
from llmlab import train
from llmlab.compress import importance
from llmlab.compress import learned as learned_lib
from llmlab.compress import shapes
from llmlab.compress import slicing
from llmlab.convert import hf

log = logging.getLogger("llmlab")

METHODS = ("magnitude", "activation", "learned")
SELECTION_FILE = "prune_selection.json"


def source_model(ref: str):
  """(model config, run config, step) of checkpoint `DIR[:STEP]`, from its
  metadata only (no arrays read)."""
  with runs.Checkpoint(ref) as ck:
    vocab = runs.vocab_size(ck.meta, ref)
    return (model_lib.ModelConfig.from_config(ck.config.model, vocab),
            ck.config, ck.step)


def _source_data(cfg, rows: int):
  return data_lib.build(cfg.data, seq_len=cfg.train.seq_len, global_batch=rows,
                        seed=cfg.train.seed, process_index=jax.process_index(),
                        process_count=jax.process_count())


def prune(source: str, target_cfg, workdir: str, method: str = "magnitude", *,
          calib_rows: int = 0,
          learned: learned_lib.Settings | None = None) -> dict:
  """Write the pruned run directory `workdir`; return a summary."""
  t0 = time.time()
  if method not in METHODS:
    raise errors.UsageError(f"--method={method!r}: must be one of {METHODS}")
  workdir = workdir if storage.is_remote(workdir) else os.path.abspath(workdir)
  hf.require_no_run(workdir)
  src_m, src_cfg, src_step = source_model(source)
  cfg, data, setup = train.prepare(target_cfg)
  shapes.check_target(src_m, setup.model_cfg, where=f"prune {source} -> target")
  if learned is not None:
    learned.check()
  run = api.load(source, step=src_step)
  model = run.setup.model
  rows = calib_rows or int(src_cfg.train.batch_size)
  info = {"source": os.path.abspath(ckpt_lib.parse_ref(source)[0]),
          "source_step": src_step, "method": method,
          "source_model": {k: src_cfg.model[k] for k in shapes.UNITS},
          "source_params": model_lib.param_counts(src_m)}
  if method == "learned":
    settings = learned or learned_lib.Settings()
    bs = settings.batch_size or int(src_cfg.train.batch_size)
    src_data = _source_data(src_cfg, bs)
    result = learned_lib.train_masks(
        model, run.params, setup.model_cfg,
        lambda s: src_data.train_batch(src_step + s), settings)
    params, sel = result.params, result.selection
    info["learned"] = {"settings": dataclasses.asdict(settings),
                       "batch_size": bs, "seq_len": int(src_cfg.train.seq_len),
                       "tokens": settings.steps * bs * int(src_cfg.train.seq_len),
                       "final": result.final, "history": result.history}
  else:
    batch = None
    if method == "activation":
      batch = _source_data(src_cfg, rows).train_batch(src_step)
      info["calibration"] = {"rows": rows, "seq_len": int(src_cfg.train.seq_len),
                             "data_step": src_step}
    scores = importance.scores_for(method, model, run.params, batch)
    sel = slicing.select(jax.device_get(scores), src_m, setup.model_cfg)
    params = slicing.slice_params(run.params, sel)
  info["params"] = model_lib.param_counts(setup.model_cfg)
  info["wall_s"] = time.time() - t0
  write_run(workdir, cfg, setup, data, params, info, sel)
  return {"workdir": workdir, **{k: v for k, v in info.items()
                                 if k not in ("learned",)},
          "model": {k: cfg.model[k] for k in shapes.UNITS}}


def write_run(workdir: str, cfg, setup, data, params, info: dict,
              sel: slicing.Selection) -> None:
  """Run directory holding `params` at step 0 with a fresh optimizer state
  (as `llmlab convert` writes one); the checkpoint goes first, so a crash
  leaves no config.json behind."""
  dtype = jnp.dtype(cfg.model.param_dtype)
  params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), params),
                          setup.state_shardings["params"])
  state = {"step": jax.device_put(np.int32(0), setup.state_shardings["step"]),
           "params": params,
           "opt_state": hf.fresh_opt_state(setup, params)}
  model_info = train.model_info(cfg, data.vocab_size)
  meta = {"config": config_lib.to_dict(cfg), "model_info": model_info,
          "step": 0, "tokens": 0, "data_info": data.info,
          "compress": storage.json_safe(info)}
  storage.makedirs(workdir)
  mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps)
  mgr.save(0, state, meta, force=True)
  mgr.close()
  if distributed.is_primary():
    storage.write_text(storage.join(workdir, SELECTION_FILE),
                       storage.dumps(sel.to_json()))
    train.write_config(workdir, cfg, model_info, data.info, setup.mesh)
    summary = dict(info)
    if "learned" in info:  # the per-step history stays in the checkpoint meta
      summary["learned"] = {k: v for k, v in info["learned"].items()
                            if k != "history"}
    hf.add_to_config(workdir, compress=storage.json_safe(summary))

