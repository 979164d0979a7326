"""Fitting scaling laws: Huber on log-loss, L-BFGS from many starts, all in one jit.

Why this shape:
- The objective (Hoffmann et al. 2022) is sum_i w_i Huber_delta(pred_log_i - log L_i)
  with delta = 1e-3. It is nearly an L1 loss with a tiny objective value (~1e-3),
  so optimisers with absolute stopping tolerances stop early and report the
  exponents of wherever they stopped (Besiroglu et al. 2024 found exactly this in
  Hoffmann's published fit). Here tolerances are relative to the objective and
  the iteration cap is generous.
- Every start (4,500 grid points, or bootstrap replicates x starts) runs as one
  lane of a vmapped `lax.while_loop` of optax.lbfgs + zoom linesearch inside a
  single jitted call; a lane that has converged is frozen by the batched loop.
  Bootstrap replicates differ only by per-point weights (resample counts), so
  they share the same compiled program.
- Fitting runs in float64 inside `jax.enable_x64(True)`, which restores the
  previous setting on exit: the same process trains float32 models afterwards.
"""

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmlab.scaling import forms as forms_lib
from llmlab.scaling import records as records_lib

DELTA = 1e-3
GTOL = 1e-9        # stop when |grad| <= GTOL * max(objective, TINY)
FTOL = 1e-13       # ... or when the objective changed by <= FTOL * max(objective, TINY)
TINY = 1e-12       # floor of the scale, so an exact (zero-loss) fit still stops
MAX_ITER = 2000


def log_inputs(records: Mapping, form: forms_lib.Form) -> dict[str, np.ndarray]:
  """The natural-log inputs a form needs; compute is the `flops` column or 6 N D."""
  cols = {"params": records["params"], "tokens": records["tokens"]}
  if "compute" in form.inputs:
    cols["compute"] = (records["flops"] if "flops" in records else
                       6.0 * records["params"] * records["tokens"])
  return {k: np.log(np.asarray(cols[k], np.float64)) for k in form.inputs}


def huber(r, delta):
  return jnp.where(jnp.abs(r) <= delta, 0.5 * r * r, delta * (jnp.abs(r) - 0.5 * delta))


def objective(form: forms_lib.Form, theta_P, x, log_loss_N, weight_N, delta):
  """Weighted sum of Huber losses of the log-loss residuals."""
  r_N = form.log_loss(form.named(theta_P), x) - log_loss_N
  return jnp.sum(weight_N * huber(r_N, delta))


def _lbfgs_one(form, theta0_P, weight_N, x, log_loss_N, delta, gtol, ftol, max_iter):
  """One start: L-BFGS until the relative gradient or relative decrease is tiny.

  Keeps the best iterate seen, since a failed linesearch may take a step uphill.
  """
  value_fn = functools.partial(objective, form, x=x, log_loss_N=log_loss_N,
                               weight_N=weight_N, delta=delta)
  opt = optax.lbfgs(memory_size=10, linesearch=optax.scale_by_zoom_linesearch(
      max_linesearch_steps=30, initial_guess_strategy="one"))
  value_and_grad = optax.value_and_grad_from_state(value_fn)
  f0, g0 = jax.value_and_grad(value_fn)(theta0_P)

  def cond(c):
    return (~c["done"]) & (c["it"] < max_iter)

  def body(c):
    f, g = value_and_grad(c["theta"], state=c["state"])
    updates, state = opt.update(g, c["state"], c["theta"], value=f, grad=g,
                                value_fn=value_fn)
    theta = optax.apply_updates(c["theta"], updates)
    f_new = optax.tree.get(state, "value")
    g_new = optax.tree.get(state, "grad")
    scale = jnp.maximum(jnp.abs(f_new), TINY)
    finite = jnp.isfinite(f_new) & jnp.all(jnp.isfinite(theta))
    small_grad = jnp.linalg.norm(g_new) <= gtol * scale
    stalled = jnp.abs(f - f_new) <= ftol * scale
    better = finite & (f_new < c["best_f"])
    return dict(theta=theta, state=state, it=c["it"] + 1,
                done=small_grad | stalled | ~finite,
                best_theta=jnp.where(better, theta, c["best_theta"]),
                best_f=jnp.where(better, f_new, c["best_f"]))

  init = dict(theta=theta0_P, state=opt.init(theta0_P), it=jnp.asarray(0),
              done=~jnp.isfinite(f0) | (jnp.linalg.norm(g0) <= gtol * jnp.maximum(f0, TINY)),
              best_theta=theta0_P, best_f=jnp.where(jnp.isfinite(f0), f0, jnp.inf))
  out = jax.lax.while_loop(cond, body, init)
  return out["best_theta"], out["best_f"], out["it"], out["done"]


@functools.partial(jax.jit, static_argnames=("form_name", "per_lane_data"))
def _solve(theta0_SxP, weight_SxN, x, log_loss_N, delta, gtol, ftol, max_iter, *,
           form_name: str, per_lane_data: bool = False):
  """All starts (lanes) at once; data are shared unless `per_lane_data`."""
  form = forms_lib.get_form(form_name)
  data_axis = 0 if per_lane_data else None
  solve = jax.vmap(
      functools.partial(_lbfgs_one, form),
      in_axes=(0, 0, data_axis, data_axis, None, None, None, None))
  return solve(theta0_SxP, weight_SxN, x, log_loss_N, delta, gtol, ftol, max_iter)


def minimize(form: forms_lib.Form, theta0_SxP, weight_SxN, x, log_loss_N, *,
             delta=DELTA, gtol=GTOL, ftol=FTOL, max_iter=MAX_ITER,
             per_lane_data=False):
  """Runs every start; returns numpy (theta_SxP, objective_S, iters_S, converged_S)."""
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    out = _solve(f64(theta0_SxP), f64(weight_SxN), jax.tree.map(f64, dict(x)),
                 f64(log_loss_N), f64(delta), f64(gtol), f64(ftol),
                 jnp.asarray(max_iter, jnp.int64), form_name=form.name,
                 per_lane_data=per_lane_data)
    return tuple(np.asarray(o) for o in out)
