"""Fits of scaling laws to records: best of many starts, bootstrap, prediction,
error metrics. The solver (Huber objective, lockstep L-BFGS lanes, layouts and
preconditioners) is solver.py; its names are re-exported here for callers
that fit records.
"""

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from llmlab.scaling import curves as curves_lib
from llmlab.scaling import forms as forms_lib
from llmlab.scaling import records as records_lib
from llmlab import errors
# The solver's names, for callers that fit records through this module.
from llmlab.scaling.solver import (DELTA, POLISH, SCREEN, TINY, Tol, bucket,  # noqa: F401
                                   centring, fixing, huber, identified,
                                   identified_each, minimize, objective, whitening)


def log_inputs(records: Mapping, form: forms_lib.Form) -> dict[str, np.ndarray]:
  """The natural-log inputs a form needs; compute is the `flops` column or 6 N D.
  A curve form's inputs are built from a curves table (curves.form_inputs)."""
  if form.curve:
    return curves_lib.form_inputs(records, form.inputs)
  records_lib.require(records, [k for k in form.inputs if k == "unique_tokens"],
                      "records", f"form {form.name!r}")
  cols = {"params": records["params"], "tokens": records["tokens"],
          "unique_tokens": records.get("unique_tokens")}
  if "compute" in form.inputs:
    cols["compute"] = (records["flops"] if "flops" in records else
                       6.0 * np.asarray(records["params"]) * np.asarray(records["tokens"]))
  return {k: np.log(np.asarray(cols[k], np.float64)) for k in form.inputs}


# ----------------------------------------------------------------------------
# Fits of records.


@dataclasses.dataclass
class FitResult:
  """Best start of a fit. `theta` is in the form's log space (see forms.py)."""
  form: str
  theta: np.ndarray
  objective: float
  params: dict
  n_points: int
  n_starts: int
  evals: int
  converged: bool


def _starts(form: forms_lib.Form, init) -> np.ndarray:
  """init: None (the form's grid), {name: value or list of values}, or a KxP array."""
  if init is None:
    return form.grid_starts()
  if isinstance(init, Mapping):
    missing = [k for k in form.params if k not in init]
    if missing:
      raise ValueError(f"init for form {form.name!r} lacks {missing} (log-space names "
                       f"{form.params})")
    grid = dataclasses.replace(form, grid={k: tuple(np.atleast_1d(init[k]).tolist())
                                           for k in form.params})
    return grid.grid_starts()
  starts = np.atleast_2d(np.asarray(init, np.float64))
  if starts.shape[1] != len(form.params):
    raise ValueError(f"init has {starts.shape[1]} columns; form {form.name!r} has "
                     f"params {form.params}")
  return starts


def validated(records, law: forms_lib.Form) -> dict:
  """A records table, or for a curve form a curves table, checked for `law`."""
  if not law.curve:
    return records_lib.as_records(records)
  curves = curves_lib.as_curves(records)
  curves_lib.check_rows_per_run(curves, len(law.params), law.name)
  return curves


def _data(records: Mapping, form: forms_lib.Form, groups: int):
  """Inputs (shared by all groups) and log losses tiled to `groups` data sets."""
  x = log_inputs(records, form)
  log_loss = np.log(np.asarray(records["loss"], np.float64))
  return x, np.broadcast_to(log_loss, (groups, len(log_loss)))


def fit_law(records, form: str = "chinchilla", delta: float = DELTA, init=None,
            keep: int | None = None) -> FitResult:
  """Best-of-starts Huber fit of `form` to all rows of `records` (a curves
  table for a curve form).

  keep: how many of the screened starts are polished to the tight tolerance (a
  few bad starts crawl for thousands of steps; in lockstep everyone would wait);
  default 32, 8 for curve forms, whose every evaluation sums thousands of drop
  blocks.
  """
  law = forms_lib.get_form(form)
  records = validated(records, law)
  starts = _starts(law, init)
  keep = keep or (8 if law.curve else 32)
  x, log_loss = _data(records, law, 1)
  theta, f, evals, conv = minimize(law, starts[None], np.ones_like(log_loss), x, log_loss,
                                   delta=delta, keep=keep)
  i = int(np.argmin(np.where(np.isnan(f[0]), np.inf, f[0])))
  return FitResult(form=form, theta=theta[0, i], objective=float(f[0, i]),
                   params=forms_lib.natural_params(law, theta[0, i]),
                   n_points=len(records["loss"]), n_starts=len(starts),
                   evals=int(evals[0, i]), converged=bool(conv[0, i]))


@dataclasses.dataclass
class BootstrapResult:
  """Refits on resampled runs. `thetas` is n x P in log space."""
  form: str
  thetas: np.ndarray
  objectives: np.ndarray
  params: dict
  unit: str  # "runs" or "points"
  converged: np.ndarray

  def intervals(self, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of every natural parameter."""
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    with np.errstate(invalid="ignore"):  # inf (a diverged refit): inf - inf
      return {k: np.percentile(v, q).tolist() for k, v in self.params.items()}


def resample_weights(records: Mapping, n: int, seed: int = 0) -> np.ndarray:
  """n x N point weights from drawing whole runs with replacement (a run drawn
  twice counts twice). Rows without a run column are their own runs."""
  runs = np.asarray(records["run"])
  names, run_of_point = np.unique(runs, return_inverse=True)
  draws = np.random.default_rng(seed).integers(0, len(names), (n, len(names)))
  counts = np.stack([np.bincount(d, minlength=len(names)) for d in draws])
  return counts[:, run_of_point].astype(np.float64)


def bootstrap(records, form: str = "chinchilla", n: int = 200, seed: int = 0,
              delta: float = DELTA, fit: FitResult | None = None,
              extra_starts: int = 0) -> BootstrapResult:
  """Refits on n resamples, all in one vmapped call; each refit starts from the
  full-data optimum (plus `extra_starts` random grid starts, screened).

  Identical resamples (with few runs many are: 3 runs have 10 distinct draws)
  are fitted once: lanes run in lockstep, and a curve form's slowest refit
  costs thousands of evaluations of every lane.
  """
  law = forms_lib.get_form(form)
  records = validated(records, law)
  fit = fit or fit_law(records, form, delta)
  if fit.form != form:
    raise ValueError(f"bootstrap of form {form!r} given a {fit.form!r} fit")
  rng = np.random.default_rng(seed + 1)
  grid = law.grid_starts()
  starts = np.stack([np.concatenate([fit.theta[None], grid[rng.choice(len(grid),
                                                                       extra_starts)]])
                     for _ in range(n)])
  weights = resample_weights(records, n, seed)
  _, first, inverse = np.unique(np.concatenate([weights, starts.reshape(n, -1)], axis=1),
                                axis=0, return_index=True, return_inverse=True)
  x, log_loss = _data(records, law, len(first))
  affine = whitening(law, fit.theta, x)
  theta, f, _, conv = minimize(law, starts[first], weights[first], x, log_loss,
                               delta=delta, keep=1, affine=affine)
  inverse = inverse.reshape(-1)
  theta, f, conv = theta[inverse], f[inverse], conv[inverse]
  unit = "runs" if len(set(records["run"])) < len(records["run"]) else "points"
  return BootstrapResult(form=form, thetas=theta[:, 0], objectives=f[:, 0],
                         params=forms_lib.natural_params(law, theta[:, 0]), unit=unit,
                         converged=conv[:, 0])


def predict(fit: FitResult | BootstrapResult, params=None, tokens=None,
            compute=None, unique_tokens=None) -> np.ndarray:
  """Predicted losses at the given N / D / C (C defaults to 6 N D) / U.

  Shape (M,) for a FitResult, (n_boot, M) for a BootstrapResult.
  """
  law = forms_lib.get_form(fit.form)
  cols = {"params": params, "tokens": tokens, "unique_tokens": unique_tokens}
  if "compute" in law.inputs and compute is None:
    if params is None or tokens is None:
      raise errors.UserError(f"form {law.name!r} needs compute, or params and tokens")
    compute = 6.0 * np.asarray(params, np.float64) * np.asarray(tokens, np.float64)
  cols["compute"] = compute
  missing = [k for k in law.inputs if cols[k] is None]
  if missing:
    raise errors.UserError(f"form {law.name!r} needs inputs {missing}")
  x = {k: np.log(np.atleast_1d(np.asarray(cols[k], np.float64))) for k in law.inputs}
  return _evaluate(fit, law, x)


def predict_curves(fit: FitResult | BootstrapResult, curves) -> np.ndarray:
  """Predicted losses at every row of a curves table (its `loss` may be absent).

  Shape (M,) for a FitResult, (n_boot, M) for a BootstrapResult.
  """
  law = forms_lib.get_form(fit.form)
  if not law.curve:
    raise ValueError(f"form {law.name!r} is not a curve form; use predict")
  curves = curves_lib.as_curves(curves, need_loss=False)
  return _evaluate(fit, law, curves_lib.form_inputs(curves, law.inputs))


def _evaluate(fit: FitResult | BootstrapResult, law: forms_lib.Form, x) -> np.ndarray:
  thetas = np.atleast_2d(fit.thetas if isinstance(fit, BootstrapResult) else fit.theta)
  with jax.enable_x64(True):
    out = np.exp(np.asarray(_predict_log(jnp.asarray(thetas), x, form_name=law.name)))
  return out if isinstance(fit, BootstrapResult) else out[0]


def predict_log(form: forms_lib.Form, thetas_BxP, x_M) -> np.ndarray:
  """log L_hat (B x M) of B log-space parameter vectors at log inputs x_M."""
  with jax.enable_x64(True):
    return np.asarray(_predict_log(jnp.asarray(thetas_BxP, jnp.float64),
                                   {k: jnp.asarray(v, jnp.float64) for k, v in x_M.items()},
                                   form_name=form.name))


@functools.partial(jax.jit, static_argnames="form_name")
def _predict_log(thetas_BxP, x_M, *, form_name: str):
  """Jitted: op-by-op dispatch of the form is slower than compiling it. Thetas
  go 64 at a time, bounding memory for curve forms (thetas x drop blocks)."""
  law = forms_lib.get_form(form_name)
  return jax.lax.map(lambda th: law.log_loss(law.named(th), x_M), thetas_BxP,
                     batch_size=64)


# ----------------------------------------------------------------------------
# Prediction error metrics.


def _late(tokens, min_fraction: float, final_only: bool) -> np.ndarray:
  tokens = np.asarray(tokens, np.float64)
  return tokens == tokens.max() if final_only else tokens >= min_fraction * tokens.max()


def are(actual, predicted, tokens, min_fraction: float = 0.7,
        final_only: bool = False) -> float:
  """Absolute relative error, mean |L - L_hat| / L over one target run's
  checkpoints at >= min_fraction of its final tokens (Choshen et al. 2024)."""
  actual, predicted = np.asarray(actual, np.float64), np.asarray(predicted, np.float64)
  m = _late(tokens, min_fraction, final_only)
  return float(np.mean(np.abs(actual[m] - predicted[m]) / actual[m]))


def naive_are(fit_records, target_records, min_fraction: float = 0.7,
              final_only: bool = False) -> float:
  """ARE of the naive forecast: the largest fitted model's loss at the same token
  count (linear interpolation in log tokens, held constant beyond its ends)."""
  fit_records = records_lib.as_records(fit_records, "fit records")
  target = records_lib.as_records(target_records, "target records")
  biggest = fit_records["params"] == fit_records["params"].max()
  run_final = records_lib.final_tokens(fit_records)
  longest = biggest & (run_final == run_final[biggest].max())
  run = fit_records["run"][longest][0]
  mine = fit_records["run"] == run
  order = np.argsort(fit_records["tokens"][mine])
  guess = np.interp(np.log(target["tokens"]), np.log(fit_records["tokens"][mine][order]),
                    fit_records["loss"][mine][order])
  return are(target["loss"], guess, target["tokens"], min_fraction, final_only)


# ----------------------------------------------------------------------------
# Saturation of single models.


def saturation(records, threshold: float = 0.01, delta: float = DELTA,
               min_points: int = 4) -> list[dict]:
  """Per run with >= min_points checkpoints: its `data` law L(D) = E + B/D^beta,
  fitted on its own checkpoints (all runs in one vmapped call), and the token
  count after which doubling D gains less than `threshold` nats."""
  records = records_lib.as_records(records)
  law = forms_lib.get_form("data")
  runs = [r for r in records_lib.run_names(records)
          if np.sum(records["run"] == r) >= min_points]
  if not runs:
    return []
  rows = [np.flatnonzero(records["run"] == r) for r in runs]
  groups, width = bucket(len(runs)), max(len(r) for r in rows)
  weight, log_d, log_loss = (np.zeros((groups, width)) for _ in range(3))
  for g, idx in enumerate(rows):
    weight[g, :len(idx)] = 1.0
    log_d[g, :len(idx)] = np.log(records["tokens"][idx])
    log_loss[g, :len(idx)] = np.log(records["loss"][idx])
  starts = np.broadcast_to(law.grid_starts(), (groups,) + law.grid_starts().shape)
  theta, f, _, conv = minimize(law, starts, weight, {"tokens": log_d}, log_loss,
                               delta=delta, keep=1)
  out = []
  for g, (r, idx) in enumerate(zip(runs, rows)):
    p = forms_lib.natural_params(law, theta[g, 0])
    sat = float(forms_lib.saturation_tokens(p["B"], p["beta"], threshold))
    final = float(records["tokens"][idx].max())
    out.append(dict(run=r, params=float(records["params"][idx][0]), final_tokens=final,
                    E=p["E"], B=p["B"], beta=p["beta"], objective=float(f[g, 0]),
                    converged=bool(conv[g, 0]), saturation_tokens=sat,
                    saturated=bool(final >= sat)))
  return out
