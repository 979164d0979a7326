"""Scaling-law functional forms, kept in one registry so a new form is one function.

Every form predicts the *log* of the loss in the log-sum-exp parameterisation of
Hoffmann et al. (2022): coefficients are fitted as their logs (A = e^a, B = e^b,
E = e^e), which keeps them positive and makes the objective far better
conditioned than fitting A ~ 1e3 and alpha ~ 0.3 side by side.

Naming rule (used by `natural_params`): a single-letter parameter name is the log
of the coefficient named by its upper case (a -> A); longer names (alpha, beta)
are used as they are.

Inputs a form may use, all as natural logs: "params" (N, parameters), "tokens"
(D, training tokens) and "compute" (C, training FLOPs).
"""

import dataclasses
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

# Hoffmann et al. (2022) initialisation grid: 6 * 6 * 5 * 5 * 5 = 4,500 starts.
_COEF_GRID = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
_E_GRID = (-1.0, -0.5, 0.0, 0.5, 1.0)
_EXP_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)

INPUTS = ("params", "tokens", "compute")


@dataclasses.dataclass(frozen=True)
class Form:
  """A registered law: `log_loss(p, x)` maps named parameters and log inputs to log L."""

  name: str
  log_loss: Callable[[Mapping[str, jnp.ndarray], Mapping[str, jnp.ndarray]], jnp.ndarray]
  params: tuple[str, ...]
  inputs: tuple[str, ...]
  grid: Mapping[str, tuple[float, ...]]
  doc: str

  def grid_starts(self) -> np.ndarray:
    """Cartesian product of the grid, one row per start, columns in `self.params` order."""
    axes = [np.asarray(self.grid[k], dtype=np.float64) for k in self.params]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=-1)

  def named(self, theta_P) -> dict:
    """Vector of parameters (in `self.params` order) -> {name: scalar}."""
    return {k: theta_P[..., i] for i, k in enumerate(self.params)}


FORMS: dict[str, Form] = {}


def register_form(name: str, params: tuple[str, ...], inputs: tuple[str, ...],
                  grid: Mapping[str, tuple[float, ...]]):
  """Decorator adding `fn(p, x) -> log L` to FORMS under `name`."""
  unknown = [k for k in inputs if k not in INPUTS]
  if unknown:
    raise ValueError(f"form {name!r}: unknown inputs {unknown}; known: {INPUTS}")
  if set(grid) != set(params):
    raise ValueError(f"form {name!r}: grid keys {sorted(grid)} != params {sorted(params)}")

  def deco(fn):
    FORMS[name] = Form(name, fn, tuple(params), tuple(inputs), dict(grid),
                       (fn.__doc__ or "").strip())
    return fn

  return deco


def get_form(name: str) -> Form:
  if name not in FORMS:
    raise ValueError(f"unknown scaling-law form {name!r}; known: {sorted(FORMS)}")
  return FORMS[name]


def _lse(*terms):
  """log(sum(exp(terms))), written for speed: no max-shift (half the exps of
  jax.nn.logsumexp), and terms capped at 700 so exp stays finite in float64.
  Only absurd parameters (every term < -700, or > 700) reach the cap or log(0);
  they give an infinite objective, which the linesearch backs away from."""
  return jnp.log(sum(jnp.exp(jnp.minimum(t, 700.0)) for t in terms))


@register_form("chinchilla", params=("a", "b", "e", "alpha", "beta"),
               inputs=("params", "tokens"),
               grid=dict(a=_COEF_GRID, b=_COEF_GRID, e=_E_GRID, alpha=_EXP_GRID,
                         beta=_EXP_GRID))
def chinchilla(p, x):
  """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3)."""
  return _lse(p["a"] - p["alpha"] * x["params"], p["b"] - p["beta"] * x["tokens"],
              p["e"])


@register_form("data", params=("b", "e", "beta"), inputs=("tokens",),
               grid=dict(b=_COEF_GRID, e=_E_GRID, beta=_EXP_GRID))
def data(p, x):
  """L(D) = E + B / D^beta: one model's checkpoints."""
  return _lse(p["b"] - p["beta"] * x["tokens"], p["e"])


@register_form("compute", params=("a", "e", "alpha"), inputs=("compute",),
               grid=dict(a=_COEF_GRID, e=_E_GRID, alpha=_EXP_GRID))
def compute(p, x):
  """L(C) = E + A / C^alpha: loss of compute-optimal runs against FLOPs."""
  return _lse(p["a"] - p["alpha"] * x["compute"], p["e"])


def natural_params(form: Form, theta_P) -> dict[str, float]:
  """Log-space vector -> {"E": .., "A": .., "alpha": ..} (see the naming rule above)."""
  theta_P = np.asarray(theta_P, dtype=np.float64)
  out = {}
  for i, k in enumerate(form.params):
    out[k.upper() if len(k) == 1 else k] = (
        np.exp(theta_P[..., i]) if len(k) == 1 else theta_P[..., i])
  return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in out.items()}


def compute_optimal(params: Mapping[str, float], compute_C) -> dict:
  """Loss-minimising split of C = 6 N D for the chinchilla law.

  Setting dL/dN = 0 on L(N, C / 6N) gives N*(C) = G (C/6)^a and D*(C) = G^-1 (C/6)^b
  with a = beta / (alpha + beta), b = alpha / (alpha + beta) and
  G = (alpha A / (beta B))^(1 / (alpha + beta)).
  """
  A, B, alpha, beta = (float(params[k]) for k in ("A", "B", "alpha", "beta"))
  c6 = np.asarray(compute_C, dtype=np.float64) / 6.0
  a_exp, b_exp = beta / (alpha + beta), alpha / (alpha + beta)
  G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
  n_opt, d_opt = G * c6 ** a_exp, c6 ** b_exp / G
  return dict(a=a_exp, b=b_exp, G=G, compute=np.asarray(compute_C, np.float64),
              params=n_opt, tokens=d_opt, tokens_per_param=d_opt / n_opt)


def saturation_tokens(B, beta, threshold: float):
  """Tokens after which doubling D lowers E + B/D^beta by less than `threshold` nats.

  L(D) - L(2D) = B D^-beta (1 - 2^-beta) < threshold
  <=> D > (B (1 - 2^-beta) / threshold)^(1 / beta).
  """
  B, beta = np.asarray(B, np.float64), np.asarray(beta, np.float64)
  with np.errstate(divide="ignore", over="ignore"):
    return (B * (1.0 - 2.0 ** -beta) / threshold) ** (1.0 / beta)
