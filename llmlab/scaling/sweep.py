"""`llmlab sweep`: evaluate every saved checkpoint of runs on one held-out set.

    llmlab sweep --workdir=RUN [--workdir=RUN2 ...] --out=records.csv [--eval_tokens=N]

One CSV row per checkpoint: run, step, params (total, embeddings included:
Chinchilla's convention), params_nonembed, tokens (tokens seen), flops
(training FLOPs so far), loss (eval nats/token), bpb, plus model-shape
fields. The held-out token budget is identical for every run (the runs must
share the data config and tokenizer: their corpus fingerprints are checked),
so the losses are comparable. The sweep is incremental: rows already in the
CSV are skipped, so it can run while training continues. A checkpoint the
run itself evaluated at that step on the same held-out budget (its
metrics.jsonl) is not restored and evaluated again: the run's numbers are
the ones the sweep would compute (same batches, same parameters). Each run also gets
TensorBoard scalars `sweep/eval_loss` and `sweep/eval_bpb` in its own
TensorBoard run (`WORKDIR/tensorboard`, beside `train/*` and `eval/*`),
against the training step: one step axis per run, so TensorBoard never
mistakes a sweep's events for a restart and purges curves.
"""

from __future__ import annotations

import csv
import io
import os
import time

import jax

from llmlab import errors
from llmlab import runs
from llmlab import runtime
from llmlab import checkpoints as ckpt_lib
from llmlab import data as data_lib
from llmlab import metrics as metrics_lib
from llmlab import steps as steps_lib
from llmlab import storage

COLUMNS = ("run", "step", "params", "params_nonembed", "tokens", "flops",
           "loss", "bpb", "num_layers", "d_model", "num_heads", "num_kv_heads",
           "mlp_dim", "seq_len", "eval_tokens", "workdir")


class SweepError(errors.UserError):
  pass


def read_csv(path: str) -> list[dict]:
  if not storage.exists(path):
    return []
  return list(csv.DictReader(io.StringIO(storage.read_text(path),
                                         newline="")))


def write_csv(path: str, rows: list[dict], columns=COLUMNS) -> None:
  """Atomic rewrite (local or gs://): a kill mid-write never leaves a
  truncated table."""
  buf = io.StringIO(newline="")
  w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
  w.writeheader()
  w.writerows(rows)
  storage.write_text(path, buf.getvalue())


class RunEvaluator:
  """Evaluates checkpoints of one run with one compiled eval step."""

  def __init__(self, workdir: str, eval_tokens: int, mesh=None):
    self.workdir = workdir
    self.cfg, self.raw = runs.read_config(workdir)
    self.setup = runs.setup_for(self.cfg, self.raw, mesh)
    self.mgr = ckpt_lib.Manager(workdir, self.cfg.checkpoint,
                                self.cfg.train.steps, read_only=True)
    self.eval_step = steps_lib.make_eval_step(self.setup)
    self.eval_tokens = eval_tokens
    self._batches = None
    self._tb = None
    self._logged = None

  def fingerprint(self) -> str:
    info = self.raw.get("data_info", {})
    return f"{info.get('fingerprint')}|{info.get('tokenizer')}"

  def batches(self):
    if self._batches is None:
      c = self.cfg
      data = data_lib.build(c.data, seq_len=c.train.seq_len,
                            global_batch=c.train.batch_size, seed=c.train.seed,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
      self._batches = data.eval_batches(
          self.eval_tokens, c.train.eval_batch_size or c.train.batch_size)
    return self._batches

  def steps(self) -> list[int]:
    return self.mgr.steps()

  def logged(self, step: int) -> dict | None:
    """The run's own eval at `step`, if it used this sweep's held-out budget
    and every eval row of that step agrees (a guard's rollback may have
    re-trained the step differently: then the checkpoint is evaluated)."""
    if int(self.cfg.train.eval_tokens) != int(self.eval_tokens):
      return None
    if self._logged is None:
      self._logged = {}
      for r in runs.metrics_rows(self.workdir):
        if "eval_loss" in r and "eval_bpb" in r:
          self._logged.setdefault(int(r["step"]), set()).add(
              (r["eval_loss"], r["eval_bpb"]))
    seen = self._logged.get(step, set())
    if len(seen) != 1:
      return None
    loss, bpb = next(iter(seen))
    return {"eval_loss": loss, "eval_bpb": bpb}

  def evaluate(self, step: int) -> dict:
    out = self.logged(step)
    if out is None:
      params, _ = self.mgr.restore_params(step,
                                          self.setup.abstract_state["params"])
      out = steps_lib.evaluate(self.setup, self.eval_step, params,
                               self.batches())
    info = self.raw["model_info"]
    m = self.cfg.model
    tokens = step * info["tokens_per_step"]
    return {"step": step, "params": info["params_total"],
            "params_nonembed": info["params_nonembed"], "tokens": tokens,
            "flops": info["flops_per_token"] * tokens,
            "loss": out["eval_loss"], "bpb": out["eval_bpb"],
            "num_layers": m.num_layers, "d_model": m.d_model,
            "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
            "mlp_dim": m.mlp_dim, "seq_len": self.cfg.train.seq_len,
            "eval_tokens": self.eval_tokens, "workdir": self.workdir}

  def tensorboard(self, row: dict) -> None:
    """The sweep's eval of a checkpoint in the run's own TensorBoard run
    (tags `sweep/*`, against the training step like `train/*`)."""
    if self._tb is None:
      self._spool = storage.Spool(self.workdir)
      self._tb = metrics_lib.tensorboard_writer(self._spool)
    for key in ("loss", "bpb"):
      self._tb.add_scalar(f"sweep/eval_{key}", row[key],
                          global_step=int(row["step"]))

  def close(self):
    self.mgr.close()
    if self._tb is not None:
      self._tb.close()
      self._spool.close()


def run_name(workdir: str) -> str:
  return os.path.basename(os.path.normpath(workdir))


def sweep(workdirs: list[str], out: str, eval_tokens: int | None = None,
          names: list[str] | None = None, only_steps: dict | None = None,
          tensorboard: bool = True, log=print) -> list[dict]:
  """Evaluate the not-yet-evaluated checkpoints of `workdirs` into `out`.

  `only_steps` maps a workdir to the steps to evaluate (default: all).
  Returns all rows of `out` after the sweep.
  """
  names = names or [run_name(w) for w in workdirs]
  if len(set(names)) != len(names):
    raise SweepError(f"run names must be unique, got {names}")
  rows = read_csv(out)
  done = {(r["run"], int(float(r["step"]))) for r in rows}
  fingerprint = None
  todo = []
  evaluators = {}
  for w, name in zip(workdirs, names):
    with runtime.quiet_runs():  # its INFO lines (attention pick) are detail
      ev = RunEvaluator(w, eval_tokens or _default_eval_tokens(w))
    eval_tokens = eval_tokens or ev.eval_tokens
    if fingerprint is None:
      fingerprint = ev.fingerprint()
    elif ev.fingerprint() != fingerprint:
      raise SweepError(
          f"{w}: its held-out data ({ev.fingerprint()}) differs from the "
          f"first run's ({fingerprint}); a sweep compares runs on one "
          "held-out set, so they must share data config and tokenizer")
    steps = ev.steps() if not only_steps else only_steps.get(w, ev.steps())
    todo += [(name, ev, s) for s in steps if (name, s) not in done]
    evaluators[name] = ev
  t0 = time.time()
  for i, (name, ev, step) in enumerate(todo):
    row = dict(run=name, **ev.evaluate(step))
    rows.append(row)
    write_csv(out, rows)
    if tensorboard:
      ev.tensorboard(row)
    eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
    log(f"[sweep {_bar(i + 1, len(todo))} {i + 1}/{len(todo)} ETA {eta:.0f}s] "
        f"{name} step {step}: loss {row['loss']:.4f} bpb {row['bpb']:.4f}")
  for ev in evaluators.values():
    ev.close()
  if not todo:
    log(f"[sweep] nothing new to evaluate ({len(rows)} rows in {out})")
  return rows


def _default_eval_tokens(workdir: str) -> int:
  cfg, _ = runs.read_config(workdir)
  return int(cfg.train.eval_tokens)


def _bar(i: int, n: int, width: int = 20) -> str:
  k = int(width * i / max(n, 1))
  return "#" * k + "." * (width - k)
