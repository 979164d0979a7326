"""Run directories: the one place that reads what a run wrote.

A run directory (`WORKDIR`) holds `config.json`, `metrics.jsonl`,
`tensorboard/` and `checkpoints/<step>/` (see README "What a run writes").
Everything that looks into one -- `llmlab.load`, `init_from`, a frozen
distillation teacher, the sweep, the studies' "is this run finished?" --
goes through the functions here, so a change of layout is one change.

References to a checkpoint are `DIR` (the latest) or `DIR:STEP`.
Restores read params only (a partial orbax restore: the optimizer state,
twice the params' size with Adam, stays on disk), checksum-verified, laid
out by the caller's mesh and logical rules (any mesh the run was trained on
works: orbax reshards on restore).
"""

from __future__ import annotations

import logging

import ml_collections
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import errors
from llmlab import model as model_lib
from llmlab import quant as quant_lib
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from llmlab import storage
from llmlab.data import tokenizer as tokenizer_lib

log = logging.getLogger("llmlab")


# ---------------------------------------------------------------- config


def config_from_dict(body: dict) -> ml_collections.ConfigDict:
  """A resolved config from its JSON form (config.json or checkpoint meta).

  Keys other than config groups (model_info, data_info, ...) are dropped;
  keys added to llmlab after the run was written take their defaults.
  """
  body = {k: v for k, v in body.items() if k in config_lib.base().keys()}
  body["mesh"] = dict(body.get("mesh", {}))
  body["mesh"]["rules"] = tuple(
      (n, tuple(a) if isinstance(a, list) else a)
      for n, a in body["mesh"].get("rules", config_lib.DEFAULT_RULES))
  return config_lib.merge_defaults(ml_collections.ConfigDict(body))


def read_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, config.json dict) of a run directory, with a clear error."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    raise errors.NotFound(f"{path}: not an llmlab run directory "
                            "(no config.json)")
  raw = storage.read_json(path)
  return config_from_dict(raw), raw


def derive(cfg, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """A fresh, complete copy of `cfg` with dotted-key `overrides` applied
  (what the studies do to make each run's config from a base)."""
  copy = ml_collections.ConfigDict(cfg.to_dict())
  return config_lib.with_overrides(copy, overrides or {})


def vocab_size(meta: dict, where: str) -> int:
  vocab = meta.get("model_info", {}).get("vocab_size")
  if not vocab:
    raise errors.WorkdirError(f"{where}: checkpoint metadata lacks model_info.vocab_size")
  return int(vocab)


def setup_for(cfg, raw: dict, mesh=None):
  """Model and abstract state of a saved run's `cfg` on `mesh` (default: one
  device), for tools that evaluate or transform checkpoints (sweep, studies);
  `raw` is config.json or checkpoint metadata (for model_info.vocab_size)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  # The kernel is this machine's choice, not the run's: a run trained with
  # splash on a TPU loads on a laptop (params do not depend on it).
  cfg.model.attention = "auto"
  if mesh is None:
    mesh_devices = shd.devices()[:1]
  else:
    mesh_devices = list(mesh.devices.flat)
  # Likewise quantised training's fp8 products: checkpoints hold float
  # params, so a run trained in fp8 evaluates in float where the devices
  # have no fp8 units (int8 runs everywhere).
  if cfg.model.get("quant", "none") == "fp8" and not quant_lib.fp8_support(
      mesh_devices[0])[0]:
    cfg.model.quant = "none"
  if mesh is None:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data = 1, 1, 1, 1
    cfg.mesh.context = 1
    mesh = shd.make_mesh(cfg.mesh, mesh_devices)
  return steps_lib.build(cfg, vocab_size(raw, "run"), mesh)


# ----------------------------------------------------------- checkpoints


def finished(workdir: str, steps: int) -> bool:
  """Has the run saved its final checkpoint (step `steps`), committed?

  Cheap (one stat, no orbax): the studies ask it of every planned run.
  """
  path = storage.join(ckpt_lib.checkpoint_dir(workdir), str(steps))
  return storage.exists(storage.join(path, ckpt_lib.COMMIT_FILE))


class Checkpoint:
  """One saved step of a run, opened read-only: `step`, `meta` (config,
  model_info, tokens, data_info, checksums), `config` (the one the
  checkpoint was saved with, not config.json, which a later run may have
  rewritten). Use as a context manager, or call `close()`."""

  def __init__(self, ref: str, step: int | None = None,
               key: str | None = None):
    self.workdir, ref_step = ckpt_lib.parse_ref(ref)
    step = step if step is not None else ref_step
    fail = _failure(key, ref)
    if not storage.isdir(ckpt_lib.checkpoint_dir(self.workdir)):
      raise fail(f"{self.workdir}: no checkpoints directory "
                 f"({ckpt_lib.checkpoint_dir(self.workdir)})")
    try:
      cfg, _ = read_config(self.workdir)
    except FileNotFoundError:  # e.g. copied checkpoints; meta has the config
      cfg = config_lib.base()
    self.mgr = ckpt_lib.Manager(self.workdir, cfg.checkpoint, cfg.train.steps,
                                read_only=True)
    steps = self.mgr.steps()
    if not steps:
      self.close()
      raise fail(f"{self.workdir}: no complete checkpoints")
    self.step = steps[-1] if step is None else step
    if self.step not in steps:
      self.close()
      raise fail(f"{self.workdir}: no checkpoint at step {self.step}; "
                 f"available: {steps}")
    self.meta = self.mgr.restore_meta(self.step)
    self.config = config_from_dict(self.meta.get("config", cfg.to_dict()))

  def params(self, abstract_params):
    """Params only, checksum-verified, laid out like `abstract_params`."""
    params, _ = self.mgr.restore_params(self.step, abstract_params)
    return params

  def close(self) -> None:
    self.mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _failure(key: str | None, ref: str):
  """Errors about a checkpoint named by a config key are ConfigErrors
  naming the key; plain lookups are FileNotFoundErrors."""
  if key is None:
    return errors.NotFound
  return lambda msg: config_lib.ConfigError(f"{key}={ref!r}: {msg}")


def restore_params(ref: str, setup, key: str = "config.init_from"):
  """Params (only) of run `DIR[:STEP]`, laid out by `setup`'s shardings.

  The source run's model shape and vocabulary must equal `setup`'s;
  otherwise a ConfigError names `key` and the differing keys.
  """
  with Checkpoint(ref, key=key) as ck:
    want = config_lib.model_shape_keys(setup.cfg)
    have = config_lib.model_shape_keys(ck.config)
    diffs = [f"{k}: {have[k]!r} (in {ref}) != {want[k]!r}"
             for k in want if have[k] != want[k]]
    vocab = vocab_size(ck.meta, ref)
    hint = ("; params load only into the same shape: `llmlab prune "
            f"--from={ref} --to_config=CONFIG --workdir=PRUNED` writes them "
            f"in a smaller one, then {key}=PRUNED")
    if vocab != setup.model_cfg.vocab_size:
      diffs.append(f"vocab_size: {vocab} (in {ref}) != "
                   f"{setup.model_cfg.vocab_size}")
      hint = "; no params carry over to another vocabulary"
    if diffs:
      raise config_lib.ConfigError(
          f"{key}={ref!r}: model shape differs: " + "; ".join(diffs) + hint)
    return ck.params(setup.abstract_state["params"])


def load_teacher(ref: str, cfg, setup, key: str = "config.objective.teacher"):
  """A frozen model of run `ref` on the student's mesh, for distillation.

  Returns (params, their shardings, the teacher's ModelConfig, info). Every
  failure (no such run, no checkpoint, other vocabulary or tokenizer)
  raises a ConfigError naming `key` and `ref`, before anything compiles.
  """
  workdir, step = ckpt_lib.parse_ref(ref)
  err = config_lib.ConfigError
  try:
    tcfg, raw = read_config(workdir)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise err(f"{key}={ref!r}: cannot read the teacher run ({e})") from None
  vocab = raw.get("model_info", {}).get("vocab_size")
  if vocab != setup.model_cfg.vocab_size:
    raise err(f"{key}={ref!r}: the teacher's vocabulary has {vocab} "
              f"ids, the student's {setup.model_cfg.vocab_size}; distillation "
              "needs the same tokenizer")
  _check_tokenizer(raw, cfg, key, ref)
  tcfg = ml_collections.ConfigDict(tcfg.to_dict())
  tcfg.mesh = ml_collections.ConfigDict(cfg.mesh.to_dict())  # student rules
  tsetup = steps_lib.build(tcfg, vocab, setup.mesh)
  with Checkpoint(ref, key=key) as ck:
    params = ck.params(tsetup.abstract_state["params"])
    step = ck.step
  counts = model_lib.param_counts(tsetup.model_cfg)
  flops = model_lib.flops_per_token(tsetup.model_cfg, cfg.train.seq_len)
  info = {"teacher": workdir, "teacher_step": step,
          "teacher_params_total": counts["total"],
          "teacher_params_nonembed": counts["non_embedding"],
          "flops_per_token": flops["forward"]}
  log.info("teacher %s step %d: N(non-embedding)=%s total=%s, forward "
           "FLOPs/token=%.3g", workdir, step, f"{counts['non_embedding']:,}",
           f"{counts['total']:,}", flops["forward"])
  return (params, tsetup.state_shardings["params"], tsetup.model_cfg, info)


def _check_tokenizer(raw: dict, cfg, key: str, ref: str) -> None:
  """Same vocabulary size is not enough: the ids must mean the same."""
  have = raw.get("data_info", {}).get("tokenizer")
  if not have:
    return
  want = tokenizer_lib.load(str(cfg.data.tokenizer)).info()
  fields = ("kind", "vocab_size", "sha256")
  diffs = [f"{f}: teacher {have.get(f)!r} != student {want.get(f)!r}"
           for f in fields if have.get(f) != want.get(f)]
  if diffs:
    raise config_lib.ConfigError(
        f"{key}={ref!r}: the teacher was trained with another "
        "tokenizer (" + "; ".join(diffs) + ")")


# --------------------------------------------------------------- metrics


def metrics_rows(workdir: str) -> list[dict]:
  """The rows of `metrics.jsonl` (empty if none); a torn last line of a
  killed run is skipped."""
  return storage.jsonl_rows(storage.join(workdir, "metrics.jsonl"))


def last_values(workdir: str) -> dict:
  """Last train and eval values of metrics.jsonl (summary of a finished run)."""
  out = {}
  for row in metrics_rows(workdir):
    out.update({k: v for k, v in row.items() if k != "step"})
  return out


def step_times(workdir: str) -> list[float]:
  """Seconds per step of each logged row, in order (the first includes
  compilation when the run started from scratch)."""
  return [r["step_time_s"] for r in metrics_rows(workdir)
          if "step_time_s" in r]


def median_step_time(workdir: str, skip_first: bool = False) -> float | None:
  """Median seconds per step of a run's logged rows (None if none);
  `skip_first` drops the first row (compile) when there are others."""
  times = step_times(workdir)
  if skip_first and len(times) > 1:
    times = times[1:]
  return float(np.median(times)) if times else None
