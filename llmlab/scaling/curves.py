"""Loss curves: whole training runs as (step, lr, loss) rows, for laws of the
whole curve such as the multi-power law (Luo et al. 2025, "A Multi-Power Law for
Loss Curve Prediction Across Learning Rate Schedules", arXiv:2503.12811).

A curves table is a dict of equal-length numpy arrays, like records.py's:
  run          : str, the training run of the row (without a `run` column, the
                 file or table is one run);
  step         : float64 holding integers >= 1: the number of optimizer updates
                 applied before the loss was measured, increasing within a run;
  lr           : float64 >= 0, the learning rate of update `step`;
  loss         : float64 > 0 (optional in a table that is only predicted);
  params       : optional, model parameters N, one value per run;
  warmup_steps : optional, one integer per run (see `per_step_lr`);
  where        : str, where the row came from ("F.csv, line 7, run 'a'"), so
                 that later checks can name it.
A table may also hold "eta": {run: eta_S}, a run's exact per-step learning
rates (eta_S[s - 1] is the rate of update s), as `curves_from_runs` reads from
llmlab's own runs; other runs' rates are interpolated from their rows.
"""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Iterable, Mapping

import numpy as np

from llmlab import optim
from llmlab import storage
from llmlab.scaling import records as records_lib
from llmlab.scaling import sweep as sweep_lib

RecordsError = records_lib.RecordsError
NEAR = 8  # drop blocks of width 1 nearest each point, then NEAR per width 2, 4, ...
LR_FLOOR = 1e-20  # log of a zero learning rate (its drop then saturates G)
_BOUNDS = {"step": "positive", "lr": "nonnegative", "loss": "positive",
           "params": "positive", "warmup_steps": "nonnegative"}


def _integer(value: float, where: str, column: str) -> float:
  if value != int(value):
    raise RecordsError(f"{where}: column {column!r}: {value!r} is not an integer")
  return value


def _parse(rows, source: str, present, need_loss: bool, display=None, eta=None) -> dict:
  """(where, run, row) triples -> validated columns (see the module docstring)."""
  display = display or {}
  missing = [c for c in _required(need_loss) if c not in present]
  if missing:
    raise RecordsError(f"{source}: missing required column(s) {missing}; "
                       f"found {sorted(present)}")
  numeric = [c for c in _BOUNDS if c in present]
  cols = {c: [] for c in numeric + ["run", "where"]}
  for where, run, row in rows:
    where = f"{where}, run {run!r}"
    for c in numeric:
      v = records_lib._number(row.get(c), where, display.get(c, c), _BOUNDS[c])
      cols[c].append(_integer(v, where, c) if c in ("step", "warmup_steps") else v)
    cols["run"].append(run)
    cols["where"].append(where)
  if not cols["run"]:
    raise RecordsError(f"{source}: no data rows")
  out = {c: np.asarray(v, dtype=object if c in ("run", "where") else np.float64)
         for c, v in cols.items()}
  if eta:
    out["eta"] = {str(k): np.asarray(v, np.float64) for k, v in eta.items()}
  _check_runs(out)
  return out


def _required(need_loss: bool) -> tuple[str, ...]:
  return ("step", "lr") + (("loss",) if need_loss else ())


def _check_runs(curves: Mapping) -> None:
  """Per run: increasing steps, one params / warmup value, and (when rates are
  interpolated from the rows) warmup <= first step."""
  for run in records_lib.run_names(curves):
    idx = np.flatnonzero(curves["run"] == run)
    steps = curves["step"][idx]
    bad = np.flatnonzero(np.diff(steps) <= 0)
    if len(bad):
      i, j = idx[bad[0]], idx[bad[0] + 1]
      raise RecordsError(f"{curves['where'][j]}: step {steps[bad[0] + 1]:g} does not "
                         f"increase on the run's previous row ({curves['where'][i]}, "
                         f"step {steps[bad[0]]:g})")
    for c in ("params", "warmup_steps"):
      if c in curves and len(set(curves[c][idx])) > 1:
        other = idx[np.flatnonzero(curves[c][idx] != curves[c][idx[0]])[0]]
        raise RecordsError(f"{curves['where'][other]}: column {c!r} differs from the "
                           f"run's first row ({curves['where'][idx[0]]})")
    exact = run in (curves.get("eta") or {})
    if "warmup_steps" in curves and not exact and curves["warmup_steps"][idx[0]] > steps[0]:
      raise RecordsError(f"{curves['where'][idx[0]]}: warmup_steps "
                         f"{curves['warmup_steps'][idx[0]]:g} exceeds the run's first "
                         f"step {steps[0]:g} (the peak rate is the first row's)")
  for run, eta in (curves.get("eta") or {}).items():
    last = curves["step"][curves["run"] == run].max()
    if len(eta) < last:
      raise RecordsError(f"run {run!r}: {len(eta)} per-step learning rates, but "
                         f"rows up to step {last:g}")


def read_curves(path, params_column: str = "params", need_loss: bool = True) -> dict:
  """Reads a curves CSV (see the module docstring); errors name file, line, run."""
  path = str(path)
  header, rows = records_lib.read_csv(path, _required(need_loss),
                                      records_lib.params_rename(params_column))
  default = os.path.splitext(os.path.basename(path))[0]
  triples = ((f"{path}, line {n}", str(row["run"]) if "run" in header else default, row)
             for n, row in rows)
  return _parse(triples, path, set(header), need_loss, {"params": params_column})


def as_curves(table, source: str = "curves", need_loss: bool = True) -> dict:
  """A curves table (columns, "eta" allowed) or a list of row dicts, validated."""
  if isinstance(table, Mapping) and "where" in table:
    return dict(table)  # already validated
  eta = table.get("eta") if isinstance(table, Mapping) else None
  if isinstance(table, Mapping):
    table = {k: v for k, v in table.items() if k != "eta"}
  present, rows = records_lib.table_rows(table, source, _required(need_loss))
  triples = ((where, str(row["run"]) if "run" in present else source, row)
             for where, _, row in rows)
  return _parse(triples, source, present, need_loss, eta=eta)


def select_runs(curves: Mapping, runs: Iterable[str] | None = None,
                max_step: float | None = None) -> dict:
  """The rows of `runs` (default all) at steps < max_step (default all)."""
  names = records_lib.run_names(curves)
  runs = names if runs is None else list(runs)
  unknown = [r for r in runs if r not in names]
  if unknown:
    raise RecordsError(f"unknown run(s) {unknown}; known: {names[:20]}")
  keep = np.isin(curves["run"], runs)
  if max_step is not None:
    keep &= curves["step"] < max_step
  if not keep.any():
    raise RecordsError("run/step selection left no curve rows to fit")
  out = records_lib.take({k: v for k, v in curves.items() if k != "eta"}, keep)
  if "eta" in curves:
    out["eta"] = {r: v for r, v in curves["eta"].items() if r in runs}
  return out


def check_rows_per_run(curves: Mapping, n_params: int, form: str) -> None:
  """A run with fewer rows than the form has parameters cannot inform a fit."""
  for run in records_lib.run_names(curves):
    idx = np.flatnonzero(curves["run"] == run)
    if len(idx) < n_params:
      raise RecordsError(f"{curves['where'][idx[-1]]}: the run has {len(idx)} rows "
                         f"(last shown), fewer than form {form!r}'s {n_params} "
                         "parameters")


# ----------------------------------------------------------------------------
# Learning rates of every step.


def warmup(curves: Mapping, run: str) -> int:
  """The run's warmup length: its warmup_steps, else its first row's step."""
  i = np.flatnonzero(curves["run"] == run)[0]
  if "warmup_steps" in curves:
    return int(curves["warmup_steps"][i])
  return int(curves["step"][i])


def per_step_lr(curves: Mapping, run: str) -> np.ndarray:
  """eta_S: the rate of updates 1..S (S = the run's last step).

  The run's exact rates when the table has them ("eta"); otherwise linear
  between rows, and before the first row linear from 0 at step 0 to the first
  row's rate at step `warmup` (then flat to the first row).
  """
  m = curves["run"] == run
  steps, lr = curves["step"][m], curves["lr"][m]
  last = int(steps[-1])
  if run in (curves.get("eta") or {}):
    return np.asarray(curves["eta"][run][:last], np.float64)
  w = warmup(curves, run)
  knots_x = np.concatenate([[0.0, w], steps])
  knots_y = np.concatenate([[0.0 if w > 0 else lr[0], lr[0]], lr])
  keep = np.concatenate([[True], np.diff(knots_x) > 0])  # w == 0 or w == first step
  return np.interp(np.arange(1, last + 1), knots_x[keep], knots_y[keep])


def _distance_edges(max_distance: int, near: int) -> np.ndarray:
  """Edges of blocks in distance t - k: `near` blocks of width 1, `near` of
  width 2, of 4, ... until max_distance is covered."""
  widths, total, w = [], 0, 1
  while total < max_distance:
    widths += [w] * near
    total, w = total + w * near, 2 * w
  return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def drop_blocks(eta_S: np.ndarray, t_T: np.ndarray, near: int = NEAR):
  """The multi-power law's loss-drop sum at steps t_T as blocks of drop steps.

  LD(t) / B = sum_k d_k G(eta_k^-gamma S_k(t)) over the steps k <= t where the
  rate drops, d_k = eta_{k-1} - eta_k > 0, S_k(t) = eta_k + ... + eta_t. A cosine
  or WSD decay drops at every step, so the sum is T x K terms (10^5 x 10^3 for a
  10^5-step run logged every 100 steps), far too many to run at every objective
  evaluation of every start. The steps are grouped instead by their distance
  t - k: single steps for the `near` nearest, then blocks twice as wide every
  `near` blocks, so a block is at most 2/near of its distance wide (O(near log t)
  blocks per point). A block enters as one term: its summed drop D, and the
  drop-weighted means of log eta_k and of S_k(t) in G (the midpoint rule, exact
  for one step, its error ~ 1/near^2: with near = 8 within 2e-4 of LD on a
  10^5-step cosine, tests/test_multipower.py). These are data, computed once
  here; only G's parameters move during the fit.

  Returns (point_Q, drop_Q, log_lr_Q, lr_sum_Q, log_lr_sum_T): for every block
  with a drop, its point's index into t_T, D, mean log eta, mean S; and log of
  the rate sum sum_{tau <= t} eta_tau at each point.
  """
  eta_S = np.asarray(eta_S, np.float64)
  t_T = np.asarray(t_T, np.int64)
  p_S = np.concatenate([[0.0], np.cumsum(eta_S)])  # p_S[s] = sum_{tau <= s} eta_tau
  d_S = np.maximum(np.concatenate([[0.0], eta_S[:-1]]) - eta_S, 0.0)
  log_eta_S = np.log(np.maximum(eta_S, LR_FLOOR))
  cum = [np.concatenate([[0.0], np.cumsum(v)])
         for v in (d_S, d_S * p_S[:-1], d_S * log_eta_S)]
  edges = _distance_edges(int(t_T.max()), near)
  parts = [_blocks(cum, p_S, t_T[i:i + 4096], edges, i) for i in range(0, len(t_T), 4096)]
  point, drop, log_lr, lr_sum = (np.concatenate(v) for v in zip(*parts))
  return point, drop, log_lr, lr_sum, np.log(p_S[t_T])


def _blocks(cum, p_S, t_T, edges, offset):
  """drop_blocks for a chunk of points (bounded memory: T x blocks)."""
  hi = t_T[:, None] - edges[None, :-1]  # last step k of each block
  lo = np.maximum(t_T[:, None] - edges[None, 1:] + 1, 1)
  valid = hi >= 1
  hi, lo = np.where(valid, hi, 1), np.where(valid, lo, 1)
  drop, wp, wl = (np.where(valid, c[hi] - c[lo - 1], 0.0) for c in cum)
  rows, cols = np.nonzero(drop > 0)
  d = drop[rows, cols]
  return (rows + offset, d, wl[rows, cols] / d,
          p_S[t_T[rows]] - wp[rows, cols] / d)


def form_inputs(curves: Mapping, inputs: Iterable[str], near: int = NEAR) -> dict:
  """The arrays a curve form reads, points in the table's row order.

  "curve": log_lr_sum (N), and per drop block (sorted by point) drop_point,
  drop, drop_log_lr, drop_lr_sum (Q); "params": log N of each row.
  """
  check_inputs(curves, inputs)
  n = len(curves["step"])
  log_lr_sum = np.empty(n)
  parts = []
  for run in records_lib.run_names(curves):
    idx = np.flatnonzero(curves["run"] == run)
    point, drop, log_lr, lr_sum, log_lr_sum[idx] = drop_blocks(
        per_step_lr(curves, run), curves["step"][idx], near)
    parts.append((idx[point], drop, log_lr, lr_sum))
  point, drop, log_lr, lr_sum = (np.concatenate(v) for v in zip(*parts))
  order = np.argsort(point, kind="stable")
  x = dict(log_lr_sum=log_lr_sum, drop_point=point[order].astype(np.float64),
           drop=drop[order], drop_log_lr=log_lr[order], drop_lr_sum=lr_sum[order])
  if "params" in inputs:
    x["params"] = np.log(curves["params"])
  return x


def final_inputs(eta_S, log_params=None) -> dict:
  """form_inputs of one point, the last step, as a traceable jax function of
  the rates eta_S (for gradients of the final loss with respect to the
  schedule, scaling/schedule.py). Every step is its own drop term (no
  blocks): one point costs O(S), exact, and cheap for 10^5 steps.
  Conventions as drop_blocks: eta_0 = 0, only drops count,
  S_k(t) = P_t - P_{k-1}."""
  import jax.numpy as jnp  # noqa: PLC0415 (the module is numpy otherwise)

  eta_S = jnp.asarray(eta_S)
  p_S = jnp.cumsum(eta_S)
  prev_S = jnp.concatenate([jnp.zeros(1, eta_S.dtype), eta_S[:-1]])
  x = dict(log_lr_sum=jnp.log(p_S[-1:]),
           drop_point=jnp.zeros_like(eta_S),
           drop=jnp.maximum(prev_S - eta_S, 0.0),
           drop_log_lr=jnp.log(jnp.maximum(eta_S, LR_FLOOR)),
           drop_lr_sum=p_S[-1] - p_S + eta_S)
  if log_params is not None:
    x["params"] = jnp.reshape(jnp.asarray(log_params, eta_S.dtype), (1,))
  return x


def check_inputs(curves: Mapping, inputs: Iterable[str]) -> None:
  """A form of several model sizes needs each run's size."""
  if "params" in inputs and "params" not in curves:
    raise RecordsError(f"{curves['where'][0].split(',')[0]}: this form needs each run's "
                       "model size: a `params` column (or --params_column)")


# ----------------------------------------------------------------------------
# What a prediction extrapolates.


def profiles(curves: Mapping) -> dict[str, dict]:
  """{run: its length, warmup, peak rate and size}: what a fit saw
  (fit.json "fitted_curves"), for extrapolation checks without the data."""
  return {r: _profile(curves, r) for r in records_lib.run_names(curves)}


def _profile(curves: Mapping, run: str) -> dict:
  eta = per_step_lr(curves, run)
  m = curves["run"] == run
  return dict(steps=int(curves["step"][m][-1]), warmup=warmup(curves, run),
              peak=float(eta.max()),
              params=float(curves["params"][m][0]) if "params" in curves else None)


def extrapolation(fitted: Mapping, predicted: Mapping) -> dict[str, list[str]]:
  """{predicted run: reasons it lies outside what the fit saw} (empty: none).

  A law fitted on curves of some lengths, warmups, peak rates and model sizes
  is only tested there: a longer curve, another warmup, a higher peak or a
  model outside the fitted sizes is extrapolation.
  """
  seen = [_profile(fitted, r) for r in records_lib.run_names(fitted)]
  longest = max(p["steps"] for p in seen)
  warmups = sorted({p["warmup"] for p in seen})
  peaks = [p["peak"] for p in seen]
  sizes = [p["params"] for p in seen if p["params"] is not None]
  out = {}
  for run in records_lib.run_names(predicted):
    p, why = _profile(predicted, run), []
    if p["steps"] > longest:
      why.append(f"{p['steps']} steps, longer than any fitted curve ({longest})")
    if p["warmup"] not in warmups:
      why.append(f"warmup {p['warmup']} steps, fitted curves have {warmups}")
    if not min(peaks) * (1 - 1e-6) <= p["peak"] <= max(peaks) * (1 + 1e-6):
      why.append(f"peak learning rate {p['peak']:.4g} outside the fitted "
                 f"[{min(peaks):.4g}, {max(peaks):.4g}]")
    if sizes and p["params"] is not None and not min(sizes) <= p["params"] <= max(sizes):
      why.append(f"{p['params']:.4g} params outside the fitted "
                 f"[{min(sizes):.4g}, {max(sizes):.4g}]")
    out[run] = why
  return out


# ----------------------------------------------------------------------------
# llmlab's own runs.


def _metric_rows(path: str, key: str) -> list[dict]:
  """Rows of metrics.jsonl holding `key`, the last one per step."""
  rows = {}
  with io.StringIO(storage.read_text(path)) as f:
    for n, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill mid-write
      if key in row and "step" in row:
        rows[int(row["step"])] = dict(row, _line=n)
  return [rows[s] for s in sorted(rows)]


def run_schedule(cfg: dict, wd: str | None = None) -> tuple[np.ndarray, int]:
  """(rates of updates 1..steps, warmup steps), the rates as the train step
  computes them: update s uses optax's count s - 1, and the schedule's numbers
  are traced arguments of a compiled function (evaluated op by op, a rate can
  differ in its last bit). A `file` schedule is read from the copy the run
  keeps in its directory (config.json's "schedule_file"), when there is one."""
  import jax.numpy as jnp
  from ml_collections import ConfigDict

  steps = int(cfg["train"]["steps"])
  optim_cfg = ConfigDict(cfg["optim"])
  copy = (cfg.get("schedule_file") or {}).get("copy")
  if optim_cfg.schedule == "file" and wd is not None and copy:
    optim_cfg.schedule_file = storage.join(wd, copy)
  p = optim.schedule_params(optim_cfg, cfg["train"]["learning_rate"], steps)
  eta_S = np.asarray(_rates()(cfg["optim"]["schedule"], p,
                              jnp.arange(steps, dtype=jnp.int32)), np.float64)
  return eta_S, int(p["warmup"])


@functools.cache
def _rates():
  """optim.lr_at compiled once per schedule kind and run length (a fresh
  jit per run traced and compiled again: ~40 ms a run, 5 s of a
  134-run study's analysis)."""
  import jax
  return jax.jit(optim.lr_at, static_argnums=0)


def curves_from_runs(workdirs: Iterable[str], loss: str = "eval",
                     params_key: str = "params_total") -> dict:
  """A curves table of llmlab run directories, with their exact per-step rates.

  loss="eval": `eval_loss` rows (measured after `step` updates); "train":
  training `loss` rows (a row at step s is measured before update s, so after
  s - 1 updates; the row at step 1, before any update, is dropped). Learning
  rates come from each run's config.json (llmlab.optim.lr_at with
  optim.schedule_params), not from interpolating logged rows; logged
  learning_rate values must agree with them. params: config.json's
  model_info[params_key].
  """
  if loss not in ("eval", "train"):
    raise ValueError(f"loss={loss!r}: 'eval' or 'train'")

  rows, eta = [], {}
  for wd in workdirs:
    run = sweep_lib.run_name(wd)
    cfg = storage.read_json(storage.join(wd, "config.json"))
    eta[run], warmup_steps = run_schedule(cfg, wd)
    rows += [dict(r, params=cfg["model_info"][params_key], warmup_steps=warmup_steps)
             for r in _run_rows(wd, run, eta[run], loss)]
  table = {k: [r[k] for r in rows] for k in rows[0]}
  return as_curves(dict(table, eta=eta), source="runs")


def _run_rows(wd, run, eta_S, loss) -> list[dict]:
  path = storage.join(wd, "metrics.jsonl")
  key, shift = ("eval_loss", 0) if loss == "eval" else ("loss", 1)
  out = []
  for row in _metric_rows(path, key):
    t = int(row["step"]) - shift
    if t < 1:
      continue
    if int(row["step"]) > len(eta_S):
      raise RecordsError(f"{path}, line {row['_line']}: step {row['step']} is past the "
                         f"{len(eta_S)} steps of config.json's schedule")
    logged = row.get("learning_rate")
    if loss == "train" and logged is not None and not np.isclose(
        logged, eta_S[t], rtol=1e-6, atol=0):
      raise RecordsError(f"{path}, line {row['_line']}: learning_rate {logged!r} "
                         f"differs from {eta_S[t]!r}, the rate config.json's schedule "
                         f"gives update {t + 1}")
    out.append(dict(run=run, step=t, lr=eta_S[t - 1], loss=row[key]))
  if not out:
    raise RecordsError(f"{path}: no {key!r} rows")
  return out
