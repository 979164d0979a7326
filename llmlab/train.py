"""The training loop: config -> checkpoints, metrics.jsonl, TensorBoard.

Order of events, so that mistakes surface before anything expensive:
validate config -> workdir writable + locked -> build mesh -> build data
(bad files raise here) -> abstract state + shardings -> restore or init ->
AOT compile + memory pre-flight -> write config.json -> loop.

The loop dispatches step s+1 before reading step s's metrics from the device
(metrics are one step late), so the host never stalls the accelerator.
Data batches and dropout RNG are pure functions of (seed, step): resuming
from a checkpoint at step s replays exactly the run that was interrupted.
(After a guard rollback the data stream runs `data_offset` batches ahead
of the step; the offset is saved with every checkpoint.)

The divergence guard (llmlab/guard.py) lives inside the jitted step; the
loop reads its counters with the one-step-late metrics and before every
eval and save, and applies `guard.policy` (stop, skip, rollback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import data as data_lib
from llmlab import distributed
from llmlab import guard
from llmlab import loop as loop_lib
from llmlab import metrics as metrics_lib
from llmlab import model as model_lib
from llmlab import objectives
from llmlab import optim
from llmlab import perf
from llmlab import plan as plan_lib
from llmlab import profiling
from llmlab import runs
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from llmlab import storage
from llmlab import watchdog
from llmlab import workdir_lock

log = logging.getLogger("llmlab")

TB_TAGS = {
    "loss": "train/loss", "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "eval_loss": "eval/loss", "eval_bpb": "eval/bpb",
    "kl": "train/kl", "nll": "train/nll", "teacher_nll": "train/teacher_nll",
    "skipped_steps": "guard/skipped_steps",
    "nonfinite_steps": "guard/nonfinite_steps",
    "spike_steps": "guard/spike_steps", "rollbacks": "guard/rollbacks",
}


def _with_domain_tags(row: dict) -> dict:
  """TB_TAGS plus eval/loss_A, eval/bpb_A for `data.domains` rows."""
  extra = {k: "eval/" + k[len("eval_"):] for k in row
           if k.startswith(("eval_loss_", "eval_bpb_"))}
  return {**TB_TAGS, **extra}


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


def checked(cfg):
  """The config with every default filled in, validated (the one merge and
  validation of a run; raises ConfigError)."""
  cfg = config_lib.merge_defaults(cfg)
  config_lib.validate(cfg, len(shd.devices()))
  return cfg


def build(cfg):
  """(data, setup) of a `checked` config: mesh, data and the sharded setup
  (no compile, no alloc)."""
  mesh = shd.make_mesh(cfg.mesh)
  data = data_lib.build(cfg.data, seq_len=cfg.train.seq_len,
                        global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                        process_index=jax.process_index(),
                        process_count=jax.process_count())
  return data, steps_lib.build(cfg, data.vocab_size, mesh)


def prepare(cfg):
  """Validate, make mesh, data and the sharded setup (no compile, no alloc):
  (config, data, setup)."""
  cfg = checked(cfg)
  return (cfg, *build(cfg))


class Interrupted(KeyboardInterrupt):
  """Ctrl-C stopped the run after saving its step (`train` raises it once
  the checkpoint is written; the command line exits 130)."""


class _Preempted:
  """SIGTERM and Ctrl-C (SIGINT): finish the current step, save, stop.

  One process: Python handlers set a flag (`name` says which signal). A
  second Ctrl-C aborts at once (KeyboardInterrupt, nothing saved after the
  last checkpoint). Several processes: JAX's preemption service (started by
  `jax.distributed.initialize`) owns SIGTERM; it tells every process the
  same step to stop after, so all of them join the same (collective) final
  save instead of deadlocking; Ctrl-C keeps Python's default there.
  """

  # The handlers installed in the main thread, innermost last: a run trained
  # in another thread (a study packing runs, experiment.py) cannot install
  # its own and reads the innermost one's.
  _installed: list = []

  def __init__(self):
    self._flag = False
    self._name = None  # "SIGTERM" or "SIGINT", once received
    self._old = {}
    self._outer = None
    self._synced = (jax.process_count() > 1 and
                    bool(getattr(jax.config, "jax_enable_preemption_service",
                                 False)))

  @property
  def flag(self) -> bool:
    return self._flag or bool(self._outer and self._outer.flag)

  @property
  def name(self) -> str | None:
    return self._name or (self._outer.name if self._outer else None)

  def __enter__(self):
    if self._synced:
      return self
    if threading.current_thread() is not threading.main_thread():
      self._outer = (self._installed or [None])[-1]
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._set)
    self._installed.append(self)
    return self

  def _set(self, signum, _frame):
    self._flag = True
    self._name = self._name or signal.Signals(signum).name
    if signum == signal.SIGINT:  # the next Ctrl-C aborts at once
      signal.signal(signal.SIGINT, signal.default_int_handler)
      print("llmlab: Ctrl-C: finishing this step and saving it (Ctrl-C "
            "again aborts without saving)", file=sys.stderr, flush=True)

  def reached(self, step: int) -> bool:
    """Stop after `step`? Called once per step, with the same steps on all
    processes."""
    if self._synced:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.flag

  def __exit__(self, *exc):
    if self in self._installed:
      self._installed.remove(self)
    for sig, old in self._old.items():
      signal.signal(sig, old)


def preemption():
  """SIGTERM / Ctrl-C handling for runs trained in other threads: entered
  in the main thread around them, it is what their `reached` reads (each
  stops after its current step and saves it)."""
  return _Preempted()


def _resume_command() -> str:
  """The command line to run again (what the scheduler should re-run)."""
  import shlex
  argv = list(sys.argv)
  if argv and os.path.basename(argv[0]) in ("__main__.py", "main.py"):
    argv = ["python", "-m", "llmlab"] + argv[1:]
  return shlex.join(argv)


SCHEDULE_COPY = "lr_schedule.json"  # a file schedule's rates, kept in the run


def _keep_schedule(workdir: str, cfg, p: dict, start: int) -> dict | None:
  """A `file` schedule's rates, copied into the run directory (so the run
  stays readable if the file moves: curves.curves_from_runs reads the
  copy); a resume whose file now gives other rates for the steps both
  cover is refused, since it would not replay the run (a longer
  train.steps under the same rates is fine). Returns config.json's
  "schedule_file" record."""
  if cfg.optim.schedule != "file":
    return None
  path = storage.join(workdir, SCHEDULE_COPY)
  record = {"path": cfg.optim.schedule_file, "copy": SCHEDULE_COPY,
            "sha256": optim.schedule_fingerprint(p),
            "warmup_steps": int(p["warmup"]), "peak_lr": float(p["lr"])}
  if start > 0 and storage.exists(path):
    old = np.asarray(storage.read_json(path)["lr"], np.float32)
    n = min(len(old), len(p["table"]))  # train.steps may have grown
    bad = np.flatnonzero(old[:n] != p["table"][:n])
    if len(bad):
      raise config_lib.ConfigError(
          f"cannot resume from step {start}: config.optim.schedule_file="
          f"{cfg.optim.schedule_file!r} gives other rates than the run "
          f"started with (kept in {path}), first at update {bad[0] + 1}: "
          f"{p['table'][bad[0]]!r} != {old[bad[0]]!r}; restore the file, or "
          "point config.optim.schedule_file at that copy")
  storage.write_json(path, dict(record, lr=np.asarray(
      p["table"], np.float64).tolist()))
  return record


def write_config(workdir: str, cfg, info: dict, data_info: dict, mesh,
                 schedule_file: dict | None = None) -> None:
  out = config_lib.to_dict(cfg)
  if schedule_file:
    out["schedule_file"] = schedule_file
  out["model_info"] = info
  out["data_info"] = data_info
  out["mesh_shape"] = dict(mesh.shape)
  out["devices"] = {"count": int(mesh.size),
                    "kind": mesh.devices.flat[0].device_kind,
                    "processes": jax.process_count()}
  out["versions"] = {"jax": jax.__version__}
  storage.write_json(storage.join(workdir, "config.json"), out)


def _check_resume_compatible(saved: dict, cfg, vocab_size: int) -> None:
  """Refuse to resume a checkpoint of another model shape or objective."""
  saved_cfg = saved.get("config", {})
  want = dict(config_lib.model_shape_keys(cfg),
              **{"objective.name": cfg.objective.name})
  diffs, shape = [], False
  for key, value in want.items():
    group, name = key.split(".")
    # Keys added after a checkpoint was written take their default then.
    old = saved_cfg.get(group, {}).get(name, config_lib.base()[group][name])
    if old != value:
      diffs.append(f"{key}: checkpoint {old!r} != config {value!r}")
      shape = shape or group == "model"
  old_vocab = saved.get("model_info", {}).get("vocab_size")
  vocab = old_vocab is not None and old_vocab != vocab_size
  if vocab:
    diffs.append(f"vocab_size (data.tokenizer): checkpoint {old_vocab!r} != "
                 f"config {vocab_size!r}")
  if diffs:
    raise config_lib.ConfigError(
        f"cannot resume from step {saved.get('step')}: the workdir's "
        "checkpoint was made with a different model or objective (" +
        "; ".join(diffs) + "). " + _resume_hint(shape, vocab))


def _resume_hint(shape: bool, vocab: bool) -> str:
  """What to do instead of resuming: `init_from` only restores params of
  the same shape and vocabulary, so a new shape goes through `llmlab
  prune` (which writes a smaller model's params) first."""
  if vocab:
    return ("Train it in a new --workdir: no params carry over to another "
            "vocabulary.")
  if shape:
    return ("Train it in a new --workdir. To start a smaller model from this "
            "run's params, prune them to its shape first: `llmlab prune "
            "--from=OLD_WORKDIR --to_config=CONFIG --workdir=PRUNED`, then "
            "`llmlab train --config=CONFIG --workdir=NEW "
            "--config.init_from=PRUNED` (init_from alone needs the same "
            "shape).")
  return ("Use a new --workdir, with --config.init_from=OLD_WORKDIR to start "
          "from its params (same shape, fresh optimizer).")


def _warn_if_data_changed(saved: dict, data_info: dict) -> None:
  old = saved.get("data_info", {}).get("fingerprint")
  new = data_info.get("fingerprint")
  if old and new and old != new:
    log.warning("resuming with different data (fingerprint %s, checkpoint "
                "has %s): batches after step %s differ from the interrupted "
                "run's", new, old, saved.get("step"))


def hparams(cfg, info: dict) -> dict:
  """What a study's runs differ in, for TensorBoard's HParams dashboard."""
  t = cfg.train
  return {"name": cfg.name, "N": info["params_nonembed"],
          "params_total": info["params_total"],
          "tokens": t.steps * info["tokens_per_step"], "steps": t.steps,
          "learning_rate": t.learning_rate, "batch_size": t.batch_size,
          "seq_len": t.seq_len, "seed": t.seed,
          "num_layers": cfg.model.num_layers, "d_model": cfg.model.d_model,
          "schedule": cfg.optim.schedule, "objective": cfg.objective.name}


def _peak_flops(cfg, setup, workdir: str) -> tuple[float, str]:
  """The per-device peak MFU divides by: `train.peak_flops`, the chip
  table, or on CPU a matmul probe -- measured once per run directory and
  kept in its config.json, so a resumed run's MFU is comparable with the
  first part's (a busy machine's probe reads 30-50% lower)."""
  if not cfg.train.peak_flops:
    try:
      old = runs.read_config(workdir)[1].get("model_info", {})
    except FileNotFoundError:
      old = {}
    src = old.get("peak_flops_source")
    if src == f"cpu {setup.model_cfg.product_dtype or 'float32'} matmul probe":
      log.info("MFU peak: %.4g FLOP/s per device, probed when the run "
               "started", old["peak_flops_per_device"])
      return float(old["peak_flops_per_device"]), src
  return perf.peak_flops_per_device(cfg.train.peak_flops,
                                    setup.model_cfg.product_dtype)


def initial_state(setup, cfg):
  """Fresh params, or params from `init_from` with a fresh optimizer."""
  state = steps_lib.init_state(setup, cfg.train.seed)
  if cfg.init_from:
    params = runs.restore_params(cfg.init_from, setup)
    state = dict(state, params=params)
    log.info("initialised params from %s", cfg.init_from)
  return state


HookLike = loop_lib.Hook | Callable[[loop_lib.StepEnd], None]


def train(cfg, workdir: str, hooks: Iterable[HookLike] = ()
          ) -> dict[str, Any]:
  """Runs (or resumes) one training run; returns a summary dict.

  `hooks`: more hooks, run after the built-in ones (`Trainer`'s doc) after
  every step, in the order given: a `loop.Hook`, or a function `fn(end)`
  of a `loop.StepEnd`, run after every step (`Trainer.add_hook` takes
  `every=N`; `loop.hook(fn, every=N)` makes such a Hook to pass here)."""
  cfg = checked(cfg)  # cheap: before the workdir
  _check_schedule(cfg)
  start = workdir_lock.Start(workdir)  # what a failed start must not leave
  workdir_lock.check_writable(workdir)
  with contextlib.ExitStack() as stack:
    lock = None
    if cfg.guard.lock and distributed.is_primary():  # one lock per job
      lock = stack.enter_context(workdir_lock.Lock(workdir))
    try:
      return _train(cfg, workdir, hooks)
    except BaseException:
      if distributed.is_primary():
        start.undo(lock)  # no lock file, no empty checkpoints/ left
      raise


def _check_schedule(cfg) -> None:
  """A schedule file is read and checked before the workdir is touched
  (optim.read_schedule_file names the file and the bad entry)."""
  if cfg.optim.schedule != "file":
    return
  p = optim.schedule_params(cfg.optim, cfg.train.learning_rate,
                            cfg.train.steps)
  if not np.isclose(p["lr"], cfg.train.learning_rate, rtol=1e-6):
    log.warning("optim.schedule=file: the file's peak rate %.4g is used, not "
                "train.learning_rate=%.4g", p["lr"], cfg.train.learning_rate)


@dataclasses.dataclass
class RunContext:
  """What a `Trainer` runs: the checked config, the run directory, its data,
  the sharded setup (llmlab/steps.py), the objective's auxiliary inputs,
  `info` (model_info plus peak_flops_per_device: config.json's record),
  the checkpoint manager (its owner closes it) and the preemption signal
  (`.reached(step)`: stop after `step`?)."""
  cfg: Any
  workdir: str
  data: Any
  setup: Any
  aux: Any
  info: dict
  mgr: ckpt_lib.Manager
  preempt: Any


def _train(cfg, workdir: str, hooks: Iterable[HookLike]) -> dict[str, Any]:
  data, setup = build(cfg)
  aux = objectives.prepare(cfg, setup, runs.load_teacher)
  info = model_info(cfg, data.vocab_size)
  if aux.info:
    info["objective_aux"] = aux.info
  peak, peak_src = _peak_flops(cfg, setup, workdir)
  info.update(peak_flops_per_device=peak, peak_flops_source=peak_src)
  log.info("model: N(non-embedding)=%s total=%s FLOPs/token=%.3g mesh=%s",
           f"{info['params_nonembed']:,}", f"{info['params_total']:,}",
           info["flops_per_token"], dict(setup.mesh.shape))

  with _Preempted() as sig:  # from here on SIGTERM, Ctrl-C: "save and stop"
    mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps)
    try:
      trainer = Trainer(RunContext(cfg, workdir, data, setup, aux, info, mgr,
                                   sig))
      for hook in hooks:
        trainer.add_hook(hook)
      summary = trainer.run()
    finally:
      mgr.close()  # also on errors: let the last async save complete
  if summary["preempted"] and sig.name == "SIGINT":
    raise Interrupted(f"interrupted by Ctrl-C after saving step "
                      f"{summary['step']}; re-run the same command to resume")
  return summary


class _RollBack(Exception):
  """Raised by a hook: restore the last good checkpoint."""

  def __init__(self, event: guard.Event):
    super().__init__(event.describe())
    self.event = event


class Trainer:
  """One run's pieces (data, compiled steps, checkpoint manager, metrics
  writer, guard policy) and the hooks that use them; `run()` is restore ->
  `loop.run` -> final save, with rollbacks. `train` owns the manager and
  SIGTERM. The built-in hooks are registered with `add_hook`, as any other
  is, in this order; after every step s they run (when due):

    0. watchdog    a heartbeat for train.hang_timeout_s (llmlab/watchdog.py)
    1. preemption  SIGTERM seen by every process at s: stop after s
    2. metrics     write the row of the previous log step (one step late,
                   so the host never waits), then apply the guard policy to
                   that row; keep step s's device metrics if s is a log step
    3. guard       (waits) the policy on step s's own report, at the points
                   below, so no eval or checkpoint ever sees a bad state
    4. eval        (waits) every train.eval_every steps, at the steps of
                   train.eval_at_steps (a loss curve's points) and at the end
    5. save        (waits) on the checkpoint schedule, at the end and on
                   preemption; first writes every pending row, so a resume
                   from that checkpoint (which drops later rows) leaves
                   exactly one row per logged step
    6. profile     train.profile_steps=A:B: a jax.profiler trace of steps
                   A..B (waits after B; llmlab/profiling.py)

  then the hooks added with `add_hook` (or `train(..., hooks=...)`), in the
  order added. "(waits)": the hook reads step s's device values, so the
  host waits for the device there.
  """

  def __init__(self, ctx: RunContext):
    cfg, setup, aux, info = ctx.cfg, ctx.setup, ctx.aux, ctx.info
    self.cfg, self.workdir, self.data, self.setup = (cfg, ctx.workdir,
                                                     ctx.data, setup)
    self.info, self.mgr, self.sig = info, ctx.mgr, ctx.preempt
    peak = info.get("peak_flops_per_device", 0.0)
    self.primary = distributed.is_primary()
    self.total = cfg.train.steps
    self.tokens_per_step = info["tokens_per_step"]
    self.flops_per_step = (info["flops_per_token"] +
                           aux.info.get("flops_per_token", 0.0)
                           ) * self.tokens_per_step
    self.peak_total = peak * int(setup.mesh.size)
    self.policy = guard.Policy(cfg.guard)
    self.offset = 0  # data step - train step (grows with each rollback)
    self.train_step = steps_lib.make_guarded_train_step(setup, aux.params,
                                                         aux.shardings)
    self.eval_step = steps_lib.make_eval_step(setup)
    self.eval_batches = None
    # Objectives that read per-step inputs (stored teacher logits) add them.
    self.extras = aux.batch_extras
    self.progress = metrics_lib.Progress(self.total, enabled=self.primary)
    self.writer = None
    self.pending = None  # (step, device metrics) of the last log step
    self.last, self.last_eval = {}, {}
    self.t_mark, self.step_mark = time.time(), 0
    self.preempted = False  # the preemption hook stopped the run
    self.hooks: list[loop_lib.Hook] = []
    self.dog = self.watchdog()
    self._add_builtin_hooks()

  # -- the hooks, in order

  def add_hook(self, fn: HookLike, every: int = 1, *, name: str | None = None,
               finish: Callable[[loop_lib.StepEnd], None] | None = None
               ) -> loop_lib.Hook:
    """Run `fn(end)` after every `every`-th step and after the last one
    (`loop.every`), after the hooks added before it; `finish(end)` once when
    the loop ends. A `loop.Hook` is added as it is. Returns the Hook."""
    hook = fn if isinstance(fn, loop_lib.Hook) else loop_lib.hook(
        fn, every, name=name, finish=finish)
    self.hooks.append(hook)
    return hook

  def _add_builtin_hooks(self) -> None:
    add, Hook = self.add_hook, loop_lib.Hook  # pylint: disable=invalid-name
    every = loop_lib.every(self.cfg.train.eval_every)
    at = {int(s) for s in self.cfg.train.get("eval_at_steps", ()) or ()}
    eval_due = lambda end: every(end) or end.step in at
    save_due = lambda end: end.stop or self.mgr.should_save(end.step)
    profile = profiling.Profile(self.cfg.train.profile_steps, self.workdir)
    add(lambda end: self.dog.beat(end.step), name="watchdog")
    add(self.preemption)
    add(self.metrics, finish=lambda end: self.flush())
    add(Hook("guard", lambda end: self.check(end.metrics["guard"]),
             due=lambda end: eval_due(end) or save_due(end)))
    add(Hook("eval", self.eval, due=eval_due))
    add(Hook("save", self.save_hook, due=save_due))
    add(Hook("profile", profile.hook, due=profile.due, finish=profile.stop))

  def preemption(self, end) -> None:
    if self.sig.reached(end.step):
      self.preempted = end.stop = True

  def metrics(self, end) -> None:
    self.flush()
    if end.step % self.cfg.train.log_every == 0 or end.final:
      self.pending = (end.step, end.metrics)

  def eval(self, end) -> None:
    t = time.time()  # eval_time_s: what evals along a curve cost a run
    self.last_eval = dict(self.run_eval(end.state["params"]), step=end.step)
    self.last_eval["eval_time_s"] = time.time() - t
    self.progress.eval(end.step, self.last_eval["eval_loss"],
                       self.last_eval["eval_bpb"],
                       int(self.last_eval.get("eval_targets", 0)))
    self.writer.row({"tokens": end.step * self.tokens_per_step,
                     **self.last_eval}, _with_domain_tags(self.last_eval))
    self.writer.flush()  # a flush point (llmlab/metrics.py)

  def save_hook(self, end) -> None:
    self.flush()
    self.writer.flush()  # the rows up to this checkpoint reach the workdir
    self.save(end.step, end.state, end.carry, force=end.stop)

  # -- state

  def restore(self, rollback: guard.Event | None = None):
    """(state, device carry) from the newest usable checkpoint, else fresh."""
    cfg = self.cfg
    state, meta = self.mgr.restore_latest(
        self.setup.abstract_state,
        check=lambda m: _check_resume_compatible(m, cfg,
                                                 self.data.vocab_size))
    if state is not None:
      _warn_if_data_changed(meta, self.data.info)
      log.info("%s step %d (%s)",
               "rolled back to" if rollback else "resumed from",
               int(state["step"]), self.mgr.path(int(state["step"])))
    else:
      state = initial_state(self.setup, cfg)
    carry, rollbacks = guard.carry_from_meta(meta, cfg.guard)
    if rollback is None:
      self.policy.rollbacks = rollbacks
    else:  # the failed stretch is gone, but its event still counts
      key = "spikes" if rollback.kind == 3 else "nonfinite"
      carry[key] = carry[key] + 1
      carry["data_offset"] = self.offset + rollback.step - int(state["step"])
    self.offset = int(carry["data_offset"])
    return state, guard.to_device(carry, shd.replicated(self.setup.mesh))

  def roll_back(self, ev: guard.Event):
    self.policy.rollbacks += 1
    self.mgr.wait()
    old_offset = self.offset
    state, carry = self.restore(rollback=ev)
    step = int(state["step"])
    log.warning(
        "guard: %s at step %d; rolled back to step %d (rollback %d of %d) "
        "and skipped data steps %d..%d", ev.describe(), ev.step, step,
        self.policy.rollbacks, self.policy.max_rollbacks, step + old_offset,
        ev.step + old_offset - 1)
    self._event({"event": "rollback", "step": ev.step, "metric": ev.metric,
                 "value": str(ev.value), "to_step": step,
                 "data_offset": self.offset})
    self.open_writer(step)
    return state, carry

  def _event(self, row: dict) -> None:
    """guard_events.jsonl: rollbacks and stops, never truncated."""
    if self.primary:
      storage.append_line(storage.join(self.workdir, "guard_events.jsonl"),
                          storage.dumps(dict(row, time=time.time())))

  def last_good(self) -> str:
    step = self.mgr.latest_step()
    return ("none (no checkpoint was written yet)" if step is None else
            f"step {step} ({self.mgr.path(step)})")

  def check(self, g) -> None:
    """Apply the policy to a step's guard report (host copy or device)."""
    try:
      ev = self.policy.check(jax.device_get(g), self.last_good())
    except guard.Diverged as e:
      self._event({"event": "stop", "message": str(e)})
      raise
    if ev is not None:
      raise _RollBack(ev)

  # -- metrics

  def open_writer(self, start: int) -> None:
    if self.writer is not None:
      self.writer.close()
    if self.primary:
      metrics_lib.truncate_after(self.workdir, start)
    self.writer = metrics_lib.Writer(
        self.workdir, enabled=self.primary, start_step=start,
        wandb=self.cfg.train.wandb, run_config=config_lib.to_dict(self.cfg))
    self.pending = None
    self.t_mark, self.step_mark = time.time(), start

  def flush(self) -> None:
    """Write the pending log row (blocks until that step's metrics exist),
    then apply the guard policy to it."""
    if self.pending is None:
      return
    pending, self.pending = self.pending, None
    row, g = _finish_row(pending, self.tokens_per_step)
    now = time.time()
    dt = (now - self.t_mark) / max(row["step"] - self.step_mark, 1)
    self.t_mark, self.step_mark = now, row["step"]
    row.update(step_time_s=dt, tokens_per_s=self.tokens_per_step / dt,
               mfu=(self.flops_per_step / dt / self.peak_total)
               if self.peak_total else 0.0)
    row.update(guard.row_counts(g, self.policy.rollbacks))
    self.writer.row(row, TB_TAGS)
    self.last = row
    self.progress.update(row["step"], row["loss"], row["tokens_per_s"],
                         row["mfu"], dt * (self.total - row["step"]))
    self.check(g)

  def run_eval(self, params):
    if self.eval_batches is None:
      self.eval_batches = self.data.eval_batches(
          self.cfg.train.eval_tokens,
          self.cfg.train.eval_batch_size or self.cfg.train.batch_size)
    out = steps_lib.evaluate(self.setup, self.eval_step, params,
                             self.eval_batches)
    return {**out, **self.domain_eval(params)}

  def domain_eval(self, params) -> dict:
    """`data.domains`: each named source alone (eval_loss_A, eval_bpb_A)."""
    batches = getattr(self.data, "domain_eval_batches", None)
    if batches is None:
      return {}
    out = {}
    for label, b in batches(self.cfg.train.eval_tokens,
                            self.cfg.train.eval_batch_size or
                            self.cfg.train.batch_size).items():
      r = steps_lib.evaluate(self.setup, self.eval_step, params, b)
      out[f"eval_loss_{label}"] = r["eval_loss"]
      out[f"eval_bpb_{label}"] = r["eval_bpb"]
    return out

  # -- saving

  def meta_for(self, step: int, carry) -> dict:
    return {"config": config_lib.to_dict(self.cfg), "model_info": self.info,
            "step": step, "tokens": step * self.tokens_per_step,
            "data_info": self.data.info,
            "guard": guard.carry_to_meta(carry, self.policy.rollbacks)}

  def save(self, step: int, state, carry, force: bool = False,
           wait: bool = False) -> None:
    """Save by schedule (or `force`), applying guard.on_save_error."""
    g = self.cfg.guard
    if not force and not self.mgr.should_save(step):
      return
    meta = self.meta_for(step, carry)
    while True:
      try:
        self.mgr.save(step, state, meta, force=force)
        if wait:
          self.mgr.wait()
        return
      except ckpt_lib.CheckpointSaveError as e:
        if g.on_save_error == "stop" or self.mgr.failures > g.save_retries:
          log.error("stopping (guard.on_save_error=%s, %d consecutive "
                    "failed save(s)); re-run the same command to resume from "
                    "the newest complete checkpoint", g.on_save_error,
                    self.mgr.failures)
          raise
        log.warning("%s Retrying (%d of guard.save_retries=%d) in %g s", e,
                    self.mgr.failures, g.save_retries, g.save_retry_wait_s)
        time.sleep(g.save_retry_wait_s)

  # -- the run

  def batches(self, start: int):
    """Local batches from train step `start` (data step start + offset)."""
    first = start + self.offset
    for i, local in enumerate(self.data.train_iter(first)):
      if self.extras is not None:
        local = {**local, **self.extras(first + i, local)}
      yield local

  def global_batches(self, local_batches):
    for local in local_batches:
      yield shd.global_batch(local, self.setup.batch_sharding)

  def run(self) -> dict[str, Any]:
    t_start = time.time()
    state, carry = self.restore()
    start = int(state["step"])
    schedule_file = (_keep_schedule(self.workdir, self.cfg,
                                    self.setup.hparams["schedule"], start)
                     if self.primary else None)
    batches = self.batches(start)
    first = next(batches, None)
    if self.cfg.guard.preflight and start < self.total:
      batch = shd.global_batch(first, self.setup.batch_sharding)
      self.info["memory_per_device"] = plan_lib.preflight(
          self.cfg, self.setup, self.train_step, carry, batch)
    if self.primary:  # only now: a refused resume must not overwrite it
      write_config(self.workdir, self.cfg, self.info, self.data.info,
                    self.setup.mesh, schedule_file)
    self.open_writer(start)
    if start == 0:
      self.writer.text("config", "```\n" + self.cfg.to_json(indent=2) +
                       "\n```")
      self.writer.text("model_info", "```\n" + storage.dumps(
          self.info, indent=2) + "\n```")
      self.writer.hparams(hparams(self.cfg, self.info),
                          ["eval/loss", "eval/bpb", "train/loss"])
    batches = itertools.chain([first], batches)
    stopped = False
    try:
      with self.dog:  # the steps and the final save (llmlab/watchdog.py)
        while True:
          try:
            end = loop_lib.run(self.train_step, state, carry,
                               self.global_batches(batches), start,
                               self.total, self.hooks)
            break
          except _RollBack as rb:
            state, carry = self.roll_back(rb.event)
            start = int(state["step"])
            batches = self.batches(start)
        if end is not None:  # a hook may have stopped it early
          state, carry, stopped = end.state, end.carry, end.stop
        final_step = int(state["step"])
        self.save(final_step, state, carry, force=stopped, wait=True)
    finally:
      self.writer.close()
    return self.summary(start, final_step, self.preempted, carry,
                        time.time() - t_start)

  def watchdog(self) -> watchdog.Watchdog:
    """train.hang_timeout_s, and SIGTERM during a hang (llmlab/watchdog.py)."""
    timeout = watchdog.timeout_for(self.cfg.train.hang_timeout_s,
                                   jax.process_count(),
                                   storage.is_remote(self.workdir))
    sigterm = lambda: getattr(self.sig, "flag", False)  # noqa: E731
    return watchdog.Watchdog(timeout, self.workdir, preempted=sigterm,
                             tag=jax.process_index())

  def summary(self, start, final_step, preempted, carry, wall) -> dict:
    last = self.last
    if start == self.total:
      log.info("nothing to do: %s already holds the final checkpoint (step "
               "%d)", self.workdir, self.total)
      last = runs.last_values(self.workdir)
    last = {**last, **{k: v for k, v in self.last_eval.items()
                       if k != "step"}}
    out = {"workdir": self.workdir, "step": final_step,
           "preempted": preempted, "wall_s": wall,
           **{k: last.get(k) for k in ("loss", "eval_loss", "eval_bpb",
                                       "tokens_per_s", "mfu")},
           "guard": guard.carry_to_meta(carry, self.policy.rollbacks),
           **self.info}
    if preempted and self.primary:
      self.mgr.wait()
      name = getattr(self.sig, "name", None) or "SIGTERM"
      print(f"llmlab: {name} received; finished step {final_step} and saved "
            f"it to {self.mgr.path(final_step)}. To resume, re-run the same "
            f"command:\n  {_resume_command()}", file=sys.stderr, flush=True)
    return out


def _finish_row(pending, tokens_per_step: int) -> tuple[dict, dict]:
  """(metrics row, guard report) of a (step, device metrics) pair."""
  step, m = pending
  vals = jax.device_get(m)
  g = vals.pop("guard")
  row = {"step": step, "tokens": step * tokens_per_step}
  row.update({k: float(np.asarray(v)) for k, v in vals.items()})
  return row, g
