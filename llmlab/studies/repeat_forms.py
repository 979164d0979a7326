"""The repetition laws' fit and prediction, through llmlab/scaling/fit.py.

The study calls `fit_law(records, form)` and `predict(fit, params=,
tokens=, unique_tokens=)`: the interface of `llmlab.scaling.fit` once
forms.py has its "unique_tokens" input and the `data_constrained` /
`data_repeat` forms. TEMPORARY: until those land, this module registers
stand-ins of both and fits them with `fit.minimize` directly (fit.py's
records path does not yet pass a `unique_tokens` column on); once
`"unique_tokens" in forms.INPUTS`, everything goes to fit.py unchanged and
the stand-ins are never registered.

Stand-ins (Muennighoff et al. 2023, arXiv:2305.16264, data side only; the
lead's forms add the parameter analogue N' and fit the same optimum on the
study's records: checked against its work in progress):
  data_constrained  L = E + A / N^alpha + B / D'^beta,
                    D' = U + U R* (1 - exp(-R / R*)), R = D / U - 1
  data_repeat       the same + C (N / U)^kappa R^gamma: a loss that rises
                    again under heavy repetition (overfitting), more for
                    models large next to their unique data, zero on fresh
                    data (R = 0).
U is the unique tokens seen so far (min(U, D)), so fresh data is R = 0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from llmlab.scaling import fit as fit_lib
from llmlab.scaling import forms as forms_lib

FORMS = ("chinchilla", "data_constrained", "data_repeat")

# Small grids: the stand-ins only have to find the basin; 864 / 6,912 starts.
_GRID = dict(a=(0.0, 7.5, 15.0, 22.5), b=(0.0, 7.5, 15.0, 22.5),
             e=(-1.0, 0.0, 1.0), alpha=(0.25, 0.75, 1.5),
             beta=(0.25, 0.75, 1.5), r=(0.5, 2.5))


def native() -> bool:
  """fit.py / forms.py take unique_tokens themselves (the lead's forms)."""
  return "unique_tokens" in forms_lib.INPUTS


def _log_effective_data(p, x):
  """log D' of the stand-ins; x holds log D and log U (U <= D)."""
  repeats = jnp.maximum(jnp.exp(x["tokens"] - x["unique_tokens"]) - 1.0, 0.0)
  r_star = jnp.exp(p["r"])
  return x["unique_tokens"] + jnp.log1p(-r_star * jnp.expm1(-repeats / r_star))


def _data_constrained(p, x):
  """L = E + A / N^alpha + B / D'^beta (stand-in; see the module docstring)."""
  return forms_lib._lse(p["a"] - p["alpha"] * x["params"],  # pylint: disable=protected-access
                        p["b"] - p["beta"] * _log_effective_data(p, x), p["e"])


def _data_repeat(p, x):
  """data_constrained + C (N / U)^kappa R^gamma (stand-in)."""
  repeats = jnp.maximum(jnp.exp(x["tokens"] - x["unique_tokens"]) - 1.0, 1e-12)
  overfit = (p["c"] + p["kappa"] * (x["params"] - x["unique_tokens"])
             + p["gamma"] * jnp.log(repeats))
  return forms_lib._lse(p["a"] - p["alpha"] * x["params"],  # pylint: disable=protected-access
                        p["b"] - p["beta"] * _log_effective_data(p, x), p["e"],
                        overfit)


def _register() -> None:
  """Adds the stand-ins to forms.FORMS (once; never when native)."""
  inputs = ("params", "tokens", "unique_tokens")
  specs = {
      "data_constrained": (_data_constrained, dict(_GRID)),
      "data_repeat": (_data_repeat, dict(_GRID, c=(-8.0, -4.0),
                                         kappa=(0.5, 1.5), gamma=(1.0, 2.5))),
  }
  for name, (fn, grid) in specs.items():
    if name not in forms_lib.FORMS:
      forms_lib.FORMS[name] = forms_lib.Form(
          name, fn, tuple(grid), inputs, grid, (fn.__doc__ or "").strip())


def _log_x(law, params, tokens, unique_tokens) -> dict:
  cols = {"params": params, "tokens": tokens, "unique_tokens": unique_tokens}
  return {k: np.log(np.atleast_1d(np.asarray(cols[k], np.float64)))
          for k in law.inputs}


def fit_law(records: dict, form: str) -> fit_lib.FitResult:
  """fit.fit_law(records, form); records: columns params, tokens, loss,
  unique_tokens (numpy)."""
  if native() or form == "chinchilla":
    return fit_lib.fit_law(records, form)
  _register()
  law = forms_lib.get_form(form)
  x = _log_x(law, records["params"], records["tokens"],
             records["unique_tokens"])
  log_loss = np.log(np.asarray(records["loss"], np.float64))[None]
  starts = law.grid_starts()
  theta, f, evals, conv = fit_lib.minimize(law, starts[None],
                                           np.ones_like(log_loss), x,
                                           log_loss, keep=32)
  i = int(np.argmin(np.where(np.isnan(f[0]), np.inf, f[0])))
  return fit_lib.FitResult(
      form=form, theta=theta[0, i], objective=float(f[0, i]),
      params=forms_lib.natural_params(law, theta[0, i]),
      n_points=len(log_loss[0]), n_starts=len(starts),
      evals=int(evals[0, i]), converged=bool(conv[0, i]))


def predict(result: fit_lib.FitResult, params, tokens,
            unique_tokens) -> np.ndarray:
  """fit.predict at (N, D, U); forms without unique_tokens ignore U."""
  if result.form == "chinchilla":
    return fit_lib.predict(result, params=params, tokens=tokens)
  if native():
    return fit_lib.predict(result, params=params, tokens=tokens,
                           unique_tokens=unique_tokens)
  _register()
  law = forms_lib.get_form(result.form)
  x = _log_x(law, params, tokens, unique_tokens)
  return fit_lib._evaluate(result, law, x)  # pylint: disable=protected-access
