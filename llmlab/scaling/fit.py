"""Fitting scaling laws: Huber on log-loss, L-BFGS from many starts, in one jit.

Why this shape:
- The objective (Hoffmann et al. 2022) is sum_i w_i Huber_delta(pred_log_i - log L_i)
  with delta = 1e-3: nearly an L1 loss whose value is tiny (~1e-3), so optimisers
  with absolute stopping tolerances stop early and report the exponents of
  wherever they stopped (Besiroglu et al. 2024 found this in Hoffmann's fit).
  Stopping here is relative to the objective, with a generous evaluation cap.
- Every start is a lane of a vmapped `lax.while_loop`, all groups (data sets,
  bootstrap replicates) and starts in a single jitted call. Bootstrap replicates
  differ only by per-point weights (resample counts), so they share one program.
- Directions come from optax.lbfgs (`linesearch=None`: its L-BFGS transform);
  the linesearch is flattened into the lane's loop, one objective evaluation per
  loop step, and the lane carries its value and gradient (the job
  optax.value_and_grad_from_state does in the unflattened loop). optax.lbfgs's
  own zoom linesearch is a `while_loop` nested in each update: under vmap every
  lane waits for the slowest lane's linesearch at every iteration (on the
  Chinchilla grid 11% of iterations hit its 30-step cap) and vmapped `lax.cond`
  evaluates both branches of each step, so an iteration costs up to 60
  evaluations of the whole batch instead of ~2 here (measured: 20 iterations
  of the 4,500-start grid took 76 s that way).
- With many starts, all of them run to a loose tolerance (`SCREEN`, capped), and
  the best `keep` per group continue to the tight one (`POLISH`): the 4,500-start
  grid costs a few seconds instead of running every start to 1e-13.
- Fitting runs in float64 inside `jax.enable_x64(True)`, which restores the
  previous setting on exit: the same process trains float32 models afterwards.
"""

import dataclasses
import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmlab.scaling import curves as curves_lib
from llmlab.scaling import forms as forms_lib
from llmlab.scaling import records as records_lib
from llmlab import errors

DELTA = 1e-3
TINY = 1e-12  # floor of the objective scale, so an exact (zero-loss) fit still stops


class Tol(NamedTuple):
  """A lane stops when |grad| <= gtol * scale, or an accepted step lowered the
  objective by <= ftol * scale (scale = max(objective, TINY)), or after max_evals."""
  gtol: float
  ftol: float
  max_evals: int


SCREEN = Tol(gtol=1e-5, ftol=1e-8, max_evals=60)
POLISH = Tol(gtol=1e-9, ftol=1e-13, max_evals=5000)


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


def huber(r, delta):
  return jnp.where(jnp.abs(r) <= delta, 0.5 * r * r, delta * (jnp.abs(r) - 0.5 * delta))


def objective(form: forms_lib.Form, theta_P, x, log_loss_N, weight_N, delta):
  """Weighted sum of Huber losses of log-loss residuals (weight 0 = padding)."""
  r_N = form.log_loss(form.named(theta_P), x) - log_loss_N
  return jnp.sum(jnp.where(weight_N > 0, weight_N * huber(r_N, delta), 0.0))


# ----------------------------------------------------------------------------
# The vmapped solver.


def _lane_init(value_and_grad, opt, theta0_P):
  f, g = value_and_grad(theta0_P)
  state = opt.init(theta0_P)
  d, state = opt.update(g, state, theta0_P)
  return dict(theta=theta0_P, f=jnp.where(jnp.isfinite(f), f, jnp.inf), g=g, d=d,
              t=jnp.ones_like(f), trials=jnp.asarray(0), fresh=jnp.asarray(True),
              opt=state, evals=jnp.asarray(1), done=jnp.asarray(False),
              converged=jnp.asarray(False))


def _lane_step(value_and_grad, opt, tol: Tol, c1, max_trials, lane):
  """One objective evaluation of one lane: a linesearch trial along its direction.

  An accepted trial (Armijo) moves the lane and asks optax.lbfgs for the next
  direction; a rejected one shrinks the step by safeguarded quadratic
  interpolation. When the curvature s.y of an accepted step is not positive, or
  the linesearch fails, the L-BFGS memory is reset (scaled steepest descent); a
  lane that cannot descend even from a fresh memory is finished.
  """
  theta, f, g, d, t = lane["theta"], lane["f"], lane["g"], lane["d"], lane["t"]
  slope = jnp.vdot(g, d)
  descent = slope < 0
  theta_t = theta + t * d
  f_t, g_t = value_and_grad(theta_t)
  ok = jnp.isfinite(f_t) & jnp.all(jnp.isfinite(g_t))
  accept = ok & descent & (f_t <= f + c1 * t * slope)

  denom = 2.0 * (f_t - f - slope * t)
  t_quad = jnp.where(ok & (denom > 0), -slope * t * t / denom, 0.1 * t)
  t_shrunk = jnp.clip(t_quad, 0.1 * t, 0.5 * t)
  restart = ~accept & ((lane["trials"] + 1 >= max_trials) | ~descent)

  s_P, y_P = theta_t - theta, g_t - g
  curvature_ok = jnp.vdot(s_P, y_P) > 1e-12 * jnp.linalg.norm(s_P) * jnp.linalg.norm(y_P)
  reset = restart | (accept & ~curvature_ok)
  theta_at = jnp.where(accept, theta_t, theta)
  g_at = jnp.where(accept, g_t, g)
  state = jax.tree.map(lambda fresh, old: jnp.where(reset, fresh, old),
                       opt.init(theta_at), lane["opt"])
  d_new, state = opt.update(g_at, state, theta_at)
  moved = accept | restart

  scale = jnp.maximum(jnp.abs(f_t), TINY)
  # No descent even along the steepest direction: a minimum to working precision.
  stuck = restart & lane["fresh"]
  converged = stuck | (accept & ((jnp.linalg.norm(g_t) <= tol.gtol * scale) |
                                 (f - f_t <= tol.ftol * scale)))
  evals = lane["evals"] + 1
  return dict(
      theta=theta_at, f=jnp.where(accept, f_t, f), g=g_at,
      d=jnp.where(moved, d_new, d), t=jnp.where(moved, 1.0, t_shrunk),
      trials=jnp.where(moved, 0, lane["trials"] + 1),
      fresh=jnp.where(moved, reset, lane["fresh"]),
      opt=jax.tree.map(lambda u, v: jnp.where(moved, u, v), state, lane["opt"]),
      evals=evals, converged=converged,
      done=converged | (evals >= tol.max_evals) | ~jnp.isfinite(f))


def _run_lane(value_and_grad, opt, tol: Tol, lane, c1=1e-4, max_trials=30):
  """lax.while_loop over one lane until it stops (see `Tol`)."""
  lane = dict(lane, done=~jnp.isfinite(lane["f"]), converged=jnp.asarray(False),
              evals=jnp.zeros_like(lane["evals"]))
  step = functools.partial(_lane_step, value_and_grad, opt, tol, c1, max_trials)
  return jax.lax.while_loop(lambda c: ~c["done"], step, lane)


def _solve_group(form, screen: Tol, polish: Tol, keep: int, fast: bool, u0_KxP,
                 weight_N, x, log_loss_N, delta, shift_P, scale_PxP):
  """One data set: K starts screened, the best `keep` polished.

  Lanes move in coordinates u with theta = shift + scale @ u (see `whitening`).
  fast: the screen runs in float32 (~8x faster on CPU, where float64 exp and
  log do not vectorise) in three parts, each keeping the better half of the
  lanes; the polish continues the screened lanes (their L-BFGS memory too)
  in float64, which decides the result.
  """
  opt = optax.lbfgs(memory_size=10, linesearch=None)

  def value_and_grad(shift, scale, dtype=u0_KxP.dtype):
    x_, loss_, w_, d_ = jax.tree.map(lambda a: a.astype(dtype),
                                     (x, log_loss_N, weight_N, delta))
    shift, scale = shift.astype(dtype), scale.astype(dtype)
    return jax.value_and_grad(lambda u_P: objective(form, shift + scale @ u_P, x_, loss_,
                                                    w_, d_))

  run = lambda vg, tol, lanes: jax.vmap(functools.partial(_run_lane, vg, opt, tol))(lanes)
  precise = value_and_grad(shift_P, scale_PxP)
  vg = value_and_grad(shift_P, scale_PxP, jnp.float32) if fast else precise
  lanes = jax.vmap(functools.partial(_lane_init, vg, opt))(
      u0_KxP.astype(jnp.float32) if fast else u0_KxP)
  best_of = lambda lanes, k: jax.tree.map(
      lambda a: a[jax.lax.top_k(-jnp.where(jnp.isnan(lanes["f"]), jnp.inf, lanes["f"]),
                                k)[1]], lanes)
  if keep < u0_KxP.shape[0] and fast:
    # Successive halving (Jamieson & Talwalkar 2016): lanes run in lockstep,
    # so after each third of the screen the worse half of the starts stops
    # paying for the evaluations the better half still needs.
    part = screen._replace(max_evals=max(1, screen.max_evals // 3))
    for _ in range(2):
      lanes = run(vg, part, lanes)
      lanes = best_of(lanes, max(keep, lanes["f"].shape[0] // 2))
    lanes = best_of(run(vg, part, lanes), keep)
  elif keep < u0_KxP.shape[0]:
    lanes = best_of(run(vg, screen, lanes), keep)
  if fast:  # the screened lanes, memory and all, continue in float64
    lanes = jax.tree.map(lambda a: a.astype(u0_KxP.dtype)
                         if a.dtype == jnp.float32 else a, lanes)
    f, g = jax.vmap(precise)(lanes["theta"])
    lanes = dict(lanes, f=jnp.where(jnp.isfinite(f), f, jnp.inf), g=g)
  lanes = run(precise, polish, lanes)
  theta_KxP = shift_P + lanes["theta"] @ scale_PxP.T
  return theta_KxP, lanes["f"], lanes["evals"], lanes["converged"]


@functools.partial(jax.jit, static_argnames=("form_name", "screen", "polish", "keep",
                                             "fast"))
def _solve(u0_GxKxP, weight_GxN, x, log_loss_GxN, delta, shift_P, scale_PxP, *,
           form_name: str, screen: Tol, polish: Tol, keep: int, fast: bool):
  """Every group and start in one vmapped call. x: one set of inputs shared by
  all groups (1-D arrays), or one per group (G x N)."""
  solve = functools.partial(_solve_group, forms_lib.get_form(form_name), screen, polish,
                            keep, fast)
  x_axis = None if all(v.ndim == 1 for v in x.values()) else 0
  affine_axis = None if shift_P.ndim == 1 else 0
  return jax.vmap(solve, in_axes=(0, 0, x_axis, 0, None, affine_axis, affine_axis))(
      u0_GxKxP, weight_GxN, x, log_loss_GxN, delta, shift_P, scale_PxP)


def _bucket(n: int) -> int:
  """Padded size (next power of two, >= 8; above 256 the next multiple of
  64, where doubling would double the work): data sets of similar size
  share a compiled program instead of each paying for compilation."""
  if n > 256:
    return -(-int(n) // 64) * 64
  return max(8, 1 << (int(n) - 1).bit_length())


def _pad(a) -> np.ndarray:
  """Zeros appended along the last axis up to its bucket. Forms read zero
  inputs safely (log inputs: N = 1; curve drop blocks: no drop)."""
  a = np.asarray(a, np.float64)
  n = a.shape[-1]
  return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, _bucket(n) - n)])


def minimize(form: forms_lib.Form, theta0_GxKxP, weight_GxN, x, log_loss_GxN, *,
             delta=DELTA, keep: int = 32, screen: Tol = SCREEN, polish: Tol = POLISH,
             affine=None, fast: bool = False):
  """Fits G data sets from K starts each (points padded to a bucket with weight 0).

  x: the form's inputs, shared by all groups ({name: 1-D array}) or per group
  ({name: G x N}); each array is padded to its own bucket.

  affine: optional (shift_P, scale_PxP), or one per group (shift_GxP,
  scale_GxPxP); the search runs in u, theta = shift + scale @ u (a
  preconditioner, see `whitening`; a zero column holds a parameter at its
  shift, see `fixing`). Returns numpy (theta_GxkxP, objective_Gxk, evals_Gxk,
  converged_Gxk) for the k = min(keep, K) polished starts of each group.
  fast: a float32 screen by successive halving, then a float64 polish (see
  `_solve_group`).
  """
  theta0_GxKxP = np.asarray(theta0_GxKxP, np.float64)
  p = theta0_GxKxP.shape[-1]
  shift_P, scale_PxP = (np.zeros(p), np.eye(p)) if affine is None else affine
  shift_P, scale_PxP = np.asarray(shift_P, np.float64), np.asarray(scale_PxP, np.float64)
  per_group = shift_P.ndim == 2
  inv = np.linalg.pinv(scale_PxP)
  centred = theta0_GxKxP - (shift_P[:, None] if per_group else shift_P)
  u0_GxKxP = np.einsum("gpq,gkq->gkp" if per_group else "pq,gkq->gkp", inv, centred)
  keep = min(int(keep), theta0_GxKxP.shape[1])
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    out = _solve(f64(u0_GxKxP), f64(_pad(weight_GxN)),
                 {k: f64(_pad(v)) for k, v in x.items()}, f64(_pad(log_loss_GxN)),
                 f64(delta), f64(shift_P), f64(scale_PxP), form_name=form.name,
                 screen=screen, polish=polish, keep=keep, fast=fast)
    return tuple(np.asarray(o) for o in out)


def fixing(form: forms_lib.Form, fixed_G: list[Mapping[str, float]]):
  """Per-group affine maps (see `minimize`) that hold each group's `fixed`
  parameters ({log-space name: value}) at their values and leave the others
  free: a parameter borrowed from another fit is a zero column of the map, so
  its gradient in u is 0 and every lane of the group keeps it."""
  g, p = len(fixed_G), len(form.params)
  shift_GxP, scale_GxPxP = np.zeros((g, p)), np.tile(np.eye(p), (g, 1, 1))
  for i, fixed in enumerate(fixed_G):
    for name, value in fixed.items():
      j = form.params.index(name)
      shift_GxP[i, j], scale_GxPxP[i, j, j] = value, 0.0
  return shift_GxP, scale_GxPxP


def whitening(form: forms_lib.Form, theta_P, x_N) -> tuple[np.ndarray, np.ndarray]:
  """(theta, S) with S^T J^T J S = I for J = d log L_hat / d theta at theta.

  The Gauss-Newton matrix J^T J carries the strong correlations of the law's
  parameters (ln A with alpha through ln N ~ 20, ...); refits started near theta
  run in u = S^-1 (theta' - theta), where those are gone: bootstrap refits then
  need ~15 instead of ~70 evaluations. Tiny eigenvalues are floored.
  """
  with jax.enable_x64(True):
    jac = jax.jacfwd(lambda th: form.log_loss(form.named(th), x_N))
    j_NxP = np.asarray(jac(jnp.asarray(theta_P, jnp.float64)))
  eig, vec = np.linalg.eigh(j_NxP.T @ j_NxP)
  eig = np.maximum(eig, max(eig.max(), TINY) * 1e-12)
  return np.asarray(theta_P, np.float64), vec / np.sqrt(eig)


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
  groups, width = _bucket(len(runs)), max(len(r) for r in rows)
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
