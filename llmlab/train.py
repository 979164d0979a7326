"""The training loop: config -> checkpoints, metrics.jsonl, TensorBoard.

Order of events, so that mistakes surface before anything expensive:
validate config -> build mesh -> build data (bad files raise here) ->
abstract state + shardings -> write config.json -> restore or init ->
compile -> loop.

The loop dispatches step s+1 before reading step s's metrics from the device
(metrics are one step late), so the host never stalls the accelerator.
Data batches and dropout RNG are pure functions of (seed, step): resuming
from a checkpoint at step s replays exactly the run that was interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import data as data_lib
from llmlab import metrics as metrics_lib
from llmlab import model as model_lib
from llmlab import objectives
from llmlab.objectives import distill as distill_obj
from llmlab import perf
from llmlab import sharding as shd
from llmlab import steps as steps_lib

log = logging.getLogger("llmlab")

TB_TAGS = {
    "loss": "train/loss", "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "eval_loss": "eval/loss", "eval_bpb": "eval/bpb",
    "kl": "train/kl", "nll": "train/nll", "teacher_nll": "train/teacher_nll",
}


def is_primary() -> bool:
  return jax.process_index() == 0


def model_info(cfg, vocab_size: int) -> dict:
  """Sizes and FLOPs every run logs (and config.json/checkpoints record)."""
  mcfg = model_lib.ModelConfig.from_config(cfg.model, vocab_size)
  counts = model_lib.param_counts(mcfg)
  flops = model_lib.flops_per_token(mcfg, cfg.train.seq_len)
  return {"vocab_size": vocab_size, "params_total": counts["total"],
          "params_nonembed": counts["non_embedding"],
          "params_embed": counts["embedding"],
          "flops_per_token": flops["train"],
          "flops_per_token_forward": flops["forward"],
          "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len}


def prepare(cfg, workdir: str | None = None):
  """Validate, make mesh, data and the sharded setup (no compile, no alloc)."""
  cfg = config_lib.merge_defaults(cfg)
  config_lib.validate(cfg, jax.device_count())
  mesh = shd.make_mesh(cfg.mesh)
  data = data_lib.build(cfg.data, seq_len=cfg.train.seq_len,
                        global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                        process_index=jax.process_index(),
                        process_count=jax.process_count())
  setup = steps_lib.build(cfg, data.vocab_size, mesh)
  return cfg, data, setup


class _Preempted:
  """SIGTERM: finish the current step, save, exit cleanly.

  One process: a Python SIGTERM handler sets a flag. Several processes:
  JAX's preemption service (started by `jax.distributed.initialize`) owns
  SIGTERM; it tells every process the same step to stop after, so all of
  them join the same (collective) final save instead of deadlocking.
  """

  def __init__(self):
    self.flag = False
    self._old = None
    self._synced = (jax.process_count() > 1 and
                    bool(getattr(jax.config, "jax_enable_preemption_service",
                                 False)))

  def __enter__(self):
    if self._synced:
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._set)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _set(self, *_):
    self.flag = True

  def reached(self, step: int) -> bool:
    """Stop after `step`? Called once per step, with the same steps on all
    processes."""
    if self._synced:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _resume_command() -> str:
  """The command line to run again (what the scheduler should re-run)."""
  import shlex
  import sys
  argv = list(sys.argv)
  if argv and os.path.basename(argv[0]) in ("__main__.py", "main.py"):
    argv = ["python", "-m", "llmlab"] + argv[1:]
  return shlex.join(argv)


def _write_config(workdir: str, cfg, info: dict, data_info: dict, mesh) -> None:
  out = config_lib.to_dict(cfg)
  out["model_info"] = info
  out["data_info"] = data_info
  out["mesh_shape"] = dict(mesh.shape)
  out["devices"] = {"count": jax.device_count(),
                    "kind": jax.devices()[0].device_kind,
                    "processes": jax.process_count()}
  out["versions"] = {"jax": jax.__version__}
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(out, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, os.path.join(workdir, "config.json"))


def _check_resume_compatible(saved: dict, cfg, vocab_size: int) -> None:
  """Refuse to resume a checkpoint of another model shape or objective."""
  saved_cfg = saved.get("config", {})
  want = dict(config_lib.model_shape_keys(cfg),
              **{"objective.name": cfg.objective.name})
  diffs = []
  for key, value in want.items():
    group, name = key.split(".")
    # Keys added after a checkpoint was written take their default then.
    old = saved_cfg.get(group, {}).get(name, config_lib.base()[group][name])
    if old != value:
      diffs.append(f"{key}: checkpoint {old!r} != config {value!r}")
  old_vocab = saved.get("model_info", {}).get("vocab_size")
  if old_vocab is not None and old_vocab != vocab_size:
    diffs.append(f"vocab_size (data.tokenizer): checkpoint {old_vocab!r} != "
                 f"config {vocab_size!r}")
  if diffs:
    raise config_lib.ConfigError(
        f"cannot resume from step {saved.get('step')}: the workdir's "
        "checkpoint was made with a different model or objective (" +
        "; ".join(diffs) + "). Use a new --workdir, or "
        "--config.init_from=OLD_WORKDIR to start from its params.")


def _warn_if_data_changed(saved: dict, data_info: dict) -> None:
  old = saved.get("data_info", {}).get("fingerprint")
  new = data_info.get("fingerprint")
  if old and new and old != new:
    log.warning("resuming with different data (fingerprint %s, checkpoint "
                "has %s): batches after step %s differ from the interrupted "
                "run's", new, old, saved.get("step"))


def _last_rows(workdir: str) -> dict:
  """Last train and eval values of metrics.jsonl (summary of a finished run)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          out.update({k: v for k, v in json.loads(line).items() if k != "step"})
        except json.JSONDecodeError:
          continue
  return out


def initial_state(setup, cfg):
  """Fresh params, or params from `init_from` with a fresh optimizer."""
  state = steps_lib.init_state(setup, cfg.train.seed)
  if cfg.init_from:
    from llmlab import api
    params = api.restore_params(cfg.init_from, setup)
    state = dict(state, params=params)
    log.info("initialised params from %s", cfg.init_from)
  return state


def train(cfg, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) one training run; returns a summary dict."""
  cfg, data, setup = prepare(cfg, workdir)
  primary = is_primary()
  if primary:
    os.makedirs(workdir, exist_ok=True)
  aux = objectives.prepare(cfg, setup)
  info = model_info(cfg, data.vocab_size)
  if aux.info:
    info["objective_aux"] = aux.info
  peak, peak_src = perf.peak_flops_per_device(cfg.train.peak_flops)
  info.update(peak_flops_per_device=peak, peak_flops_source=peak_src)
  log.info("model: N(non-embedding)=%s total=%s FLOPs/token=%.3g mesh=%s",
           f"{info['params_nonembed']:,}", f"{info['params_total']:,}",
           info["flops_per_token"], dict(setup.mesh.shape))

  with _Preempted() as sig:  # from here on, SIGTERM means "save and stop"
    mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps)
    try:
      return _run(cfg, workdir, data, setup, aux, info, peak, mgr, sig)
    finally:
      mgr.close()  # also on errors: let the last async save complete


def _run(cfg, workdir, data, setup, aux, info, peak, mgr, sig):
  """Restore or init, then the loop; `train` owns the manager and SIGTERM."""
  primary = is_primary()
  state, meta = mgr.restore_latest(
      setup.abstract_state,
      check=lambda m: _check_resume_compatible(m, cfg, data.vocab_size))
  if state is not None:
    _warn_if_data_changed(meta, data.info)
    log.info("resumed from step %d (%s)", int(state["step"]),
             mgr.path(int(state["step"])))
  else:
    state = initial_state(setup, cfg)
  start = int(state["step"])
  if primary:  # only now: a refused resume must not overwrite config.json
    _write_config(workdir, cfg, info, data.info, setup.mesh)
    metrics_lib.truncate_after(workdir, start)

  writer = metrics_lib.Writer(workdir, enabled=primary, start_step=start)
  if start == 0:
    writer.text("config", "```\n" + cfg.to_json(indent=2) + "\n```")
    writer.text("model_info", "```\n" + json.dumps(info, indent=2) + "\n```")
  train_step = steps_lib.make_train_step(setup, aux.params, aux.shardings)
  eval_step = steps_lib.make_eval_step(setup)
  eval_batches = None
  tokens_per_step = info["tokens_per_step"]
  flops_per_step = (info["flops_per_token"] +
                    aux.info.get("flops_per_token", 0.0)) * tokens_per_step
  peak_total = peak * jax.device_count()
  progress = metrics_lib.Progress(cfg.train.steps, enabled=primary)
  total = cfg.train.steps

  def meta_for(step):
    return {"config": config_lib.to_dict(cfg), "model_info": info,
            "step": step, "tokens": step * tokens_per_step,
            "data_info": data.info}

  def run_eval(params):
    nonlocal eval_batches
    if eval_batches is None:
      eval_batches = data.eval_batches(cfg.train.eval_tokens,
                                       cfg.train.eval_batch_size or
                                       cfg.train.batch_size)
    return steps_lib.evaluate(setup, eval_step, params, eval_batches)

  last = {}
  last_eval = {}
  pending = None  # (step, device metrics) read one step late
  t_mark, step_mark = time.time(), start
  t_start = time.time()

  def write_pending():
    """Write the row of `pending` (blocks until that step's metrics exist)."""
    nonlocal last, t_mark, step_mark
    row = _finish_row(pending, tokens_per_step)
    now = time.time()
    dt = (now - t_mark) / max(row["step"] - step_mark, 1)
    t_mark, step_mark = now, row["step"]
    row.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
               mfu=(flops_per_step / dt / peak_total) if peak_total else 0.0)
    writer.row(row, TB_TAGS)
    last = row
    progress.update(row["step"], row["loss"], row["tokens_per_s"],
                    row["mfu"], dt * (total - row["step"]))

  preempted = False
  data_iter = data.train_iter(start)
  # Objectives that read per-step inputs (stored teacher logits) add them.
  extras = distill_obj.make_batch_extras(cfg)
  for step in range(start, total):
    local = next(data_iter)
    if extras is not None:
      local = {**local, **extras(step, local)}
    batch = shd.global_batch(local, setup.batch_sharding)
    state, m = train_step(state, batch)
    done = step + 1
    if pending is not None:
      write_pending()
    log_now = done % cfg.train.log_every == 0 or done == total
    pending = (done, m) if log_now else None
    if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or (
        done == total):
      last_eval = dict(run_eval(state["params"]), step=done)
      writer.row({"tokens": done * tokens_per_step, **last_eval}, TB_TAGS)
    preempted = sig.reached(done)
    if preempted or mgr.should_save(done):
      # Every row up to `done` is written before checkpoint `done` can
      # exist, so a resume from it (which drops later rows) leaves exactly
      # one row per logged step.
      if pending is not None:
        write_pending()
        pending = None
      mgr.save(done, state, meta_for(done), force=preempted)
    if preempted:
      break
  if pending is not None:
    write_pending()
  final_step = int(state["step"])
  mgr.save(final_step, state, meta_for(final_step), force=preempted)
  writer.close()
  if start == total:
    log.info("nothing to do: %s already holds the final checkpoint (step "
             "%d)", workdir, total)
    last = _last_rows(workdir)
  last = {**last, **{k: v for k, v in last_eval.items() if k != "step"}}
  wall = time.time() - t_start
  summary = {"workdir": workdir, "step": final_step, "preempted": preempted,
             "wall_s": wall, **{k: last.get(k) for k in (
                 "loss", "eval_loss", "eval_bpb", "tokens_per_s", "mfu")},
             **info}
  if preempted and primary:
    mgr.wait()
    print(f"llmlab: SIGTERM received; finished step {final_step} and saved "
          f"it to {mgr.path(final_step)}. To resume, re-run the same "
          f"command:\n  {_resume_command()}", flush=True)
  return summary


def _finish_row(pending, tokens_per_step: int) -> dict | None:
  step, m = pending
  vals = jax.device_get(m)
  row = {"step": step, "tokens": step * tokens_per_step}
  row.update({k: float(np.asarray(v)) for k, v in vals.items()})
  return row
