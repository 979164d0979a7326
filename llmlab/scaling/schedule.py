"""A learning-rate schedule chosen by a fitted law of the whole loss curve.

The multi-power law (forms.py; Luo et al. 2025, arXiv:2503.12811) predicts the
final loss of any schedule, so the schedule itself can be optimised: minimise
the law's L(S) over non-increasing rates in [0, peak] after a linear warmup,
by gradient steps (optax Adam) through the law's own evaluation
(forms.Form.log_loss on curves.final_inputs: only the last step is needed,
O(S) per evaluation, so 10^5 steps stay cheap).

Parameterisation: after the warmup, the K rates are
    eta_j = peak * (1 - w_0 - ... - w_j),  w = softmax(v) over K + 1 entries,
so every rate is in [0, peak] and never rises (each w_j > 0 is a drop), the
last entry w_K being what is left at the end; any v is feasible, so plain
unconstrained steps apply. The warmup is optim.py's (update s of W has rate
peak * (s - 1) / W), the rates train.py uses with optim.schedule="file".
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from llmlab import config as config_lib
from llmlab import errors
from llmlab import optim
from llmlab.scaling import curves as curves_lib
from llmlab.scaling import forms as forms_lib

MIX = 1e-3  # share of linear decay mixed into the start, so no drop is 0


def curve_law(fit: Mapping, where: str) -> tuple[forms_lib.Form, np.ndarray]:
  """(form, log-space parameters) of a fit.json dict; a form that is not a
  law of the whole curve cannot rank schedules."""
  name = fit.get("form")
  if name not in forms_lib.FORMS:
    raise errors.UserError(f"{where}: unknown form {name!r} (not a fit.json of llmlab fit?)")
  law = forms_lib.get_form(name)
  if not law.curve:
    curve_forms = sorted(k for k, f in forms_lib.FORMS.items() if f.curve)
    raise errors.UserError(f"{where}: form {name!r} is not a law of the loss curve; "
                     f"fit one of {curve_forms} (llmlab fit --form=multipower)")
  theta = np.array([fit["log_params"][k] for k in law.params], np.float64)
  return law, theta


def baseline(kind: str, peak: float, steps: int, warmup: int,
             final_lr_fraction: float = 0.1, decay_fraction: float = 0.2) -> np.ndarray:
  """Rates of updates 1..steps of an llmlab schedule (optim.lr_at), float64."""
  o = ConfigDict(config_lib.base().optim)
  o.update(schedule=kind, warmup_steps=warmup, final_lr_fraction=final_lr_fraction,
           decay_fraction=decay_fraction)
  rates = optim.schedule(o, peak, steps)(jnp.arange(steps, dtype=jnp.int32))
  return np.asarray(rates, np.float64)


def final_loss(law: forms_lib.Form, theta_P, eta_S, log_params=None):
  """The law's loss after the last update of eta_S (traceable)."""
  x = curves_lib.final_inputs(eta_S, log_params)
  return jnp.exp(law.log_loss(law.named(theta_P), x)[0])


def predict_final(law, theta_P, eta_S, log_params=None) -> float:
  with jax.enable_x64(True):
    return float(final_loss(law, jnp.asarray(theta_P), jnp.asarray(eta_S, jnp.float64),
                            log_params))


def _rates(v, warm_W, peak):
  """Warmup, then peak * (1 - cumsum(softmax(v)))[:-1] (module docstring)."""
  w = jax.nn.softmax(v)
  return jnp.concatenate([warm_W, peak * jnp.clip(1.0 - jnp.cumsum(w)[:-1], 0.0, 1.0)])


def _logits(eta_K, peak):
  """v whose rates are (1 - MIX) eta_K + MIX linear decay to 0 (a start)."""
  k = len(eta_K)
  drops = np.diff(np.concatenate([[peak], eta_K, [0.0]])) * -1.0 / peak
  drops = np.maximum(drops, 0.0)
  drops = drops / drops.sum()
  w = (1 - MIX) * drops + MIX / (k + 1)
  return np.log(w)


@functools.partial(jax.jit, static_argnames=("form_name", "iterations"))
def _descend(v0, warm_W, peak, theta_P, log_params, lr, *, form_name: str,
             iterations: int):
  """Adam on v for `iterations` steps; returns (best v, its loss, losses)."""
  law = forms_lib.get_form(form_name)
  loss_fn = lambda v: final_loss(law, theta_P, _rates(v, warm_W, peak), log_params)
  opt = optax.adam(lr)

  def step(carry, _):
    v, state, best_v, best = carry
    loss, g = jax.value_and_grad(loss_fn)(v)
    better = loss < best
    best_v = jnp.where(better, v, best_v)
    best = jnp.where(better, loss, best)
    updates, state = opt.update(g, state, v)
    return (optax.apply_updates(v, updates), state, best_v, best), loss

  init = (v0, opt.init(v0), v0, jnp.asarray(jnp.inf, v0.dtype))
  (v, _, best_v, best), losses = jax.lax.scan(step, init, None, length=iterations)
  last = loss_fn(v)
  best_v = jnp.where(last < best, v, best_v)
  return best_v, jnp.minimum(last, best), losses


def optimise(law: forms_lib.Form, theta_P, steps: int, peak: float, warmup: int,
             log_params=None, iterations: int = 2000, lr: float = 0.05,
             starts: Mapping[str, np.ndarray] | None = None) -> dict:
  """The schedule minimising the law's final loss, from each start (rates of
  updates 1..steps, e.g. the baselines); the best one wins.

  Returns dict(lr=rates (float64), loss=predicted final loss, start=name of
  the start it came from, trace=losses along the descent).
  """
  warm = baseline("constant", peak, steps, warmup)[:min(warmup, steps - 1)]
  if starts is None:
    starts = {"linear": np.concatenate([warm, peak * (1 - np.arange(1, steps - len(warm) + 1)
                                                      / (steps - len(warm) + 1))])}
  best = None
  with jax.enable_x64(True):
    for name, eta in starts.items():
      v0 = jnp.asarray(_logits(np.asarray(eta, np.float64)[len(warm):], peak))
      v, loss, trace = _descend(
          v0, jnp.asarray(warm), jnp.asarray(peak, jnp.float64), jnp.asarray(theta_P),
          None if log_params is None else jnp.asarray(log_params, jnp.float64),
          jnp.asarray(lr, jnp.float64), form_name=law.name, iterations=iterations)
      if best is None or float(loss) < best["loss"]:
        rates = np.asarray(_rates(v, jnp.asarray(warm), jnp.asarray(peak, jnp.float64)))
        best = dict(lr=rates, loss=float(loss), start=name,
                    trace=np.asarray(trace))
  return best


def extrapolation(fit: Mapping, steps: int, peak: float, warmup: int,
                  params: float | None) -> list[str]:
  """Why a schedule of this length, peak and warmup lies outside the curves
  the law was fitted on (empty: inside). The law is only tested there: a
  longer run, a higher peak, another warmup or another model size is
  extrapolation, and the chosen schedule may exploit the law's error there."""
  seen = list((fit.get("fitted_curves") or {}).values())
  if not seen:
    return ["fit.json does not record the fitted curves (an older llmlab fit): "
            "cannot tell whether this is extrapolation"]
  why = []
  longest = max(p["steps"] for p in seen)
  warmups = sorted({p["warmup"] for p in seen})
  peaks = [p["peak"] for p in seen]
  sizes = [p["params"] for p in seen if p.get("params") is not None]
  if steps > longest:
    why.append(f"{steps} steps, longer than any fitted curve ({longest})")
  if warmup not in warmups:
    why.append(f"warmup {warmup} steps, fitted curves have {warmups}")
  if not min(peaks) * (1 - 1e-6) <= peak <= max(peaks) * (1 + 1e-6):
    why.append(f"peak learning rate {peak:.4g} outside the fitted "
               f"[{min(peaks):.4g}, {max(peaks):.4g}]")
  if sizes and params is not None and not min(sizes) <= params <= max(sizes):
    why.append(f"{params:.4g} params outside the fitted [{min(sizes):.4g}, "
               f"{max(sizes):.4g}]")
  return why


def choose(fit: Mapping, steps: int, peak: float, warmup: int | None = None,
           params: float | None = None, *, fit_path: str = "fit.json",
           iterations: int = 2000, lr: float = 0.05, final_lr_fraction: float = 0.1,
           decay_fraction: float = 0.2) -> dict:
  """schedule.json's contents: the law's schedule (per-step "lr"), its
  predicted final loss, and the cosine and WSD baselines' at the same peak,
  steps and warmup (the starts of the descent)."""
  law, theta = curve_law(fit, fit_path)
  _check_numbers(steps, peak, warmup)
  warmup = _default_warmup(fit, fit_path) if warmup is None else int(warmup)
  if "params" in law.inputs and params is None:
    raise errors.UserError(f"{fit_path}: form {law.name!r} is a law across model sizes: "
                     "give the model's size (--params)")
  if "params" not in law.inputs and params is not None:
    raise errors.UserError(f"--params: form {law.name!r} of {fit_path} is one model's law")
  log_n = None if params is None else math.log(params)
  base = {k: baseline(k, peak, steps, warmup, final_lr_fraction, decay_fraction)
          for k in ("cosine", "wsd")}
  found = optimise(law, theta, steps, peak, warmup, log_n, iterations, lr, starts=base)
  predicted = {k: predict_final(law, theta, v, log_n) for k, v in base.items()}
  return dict(
      lr=found["lr"].tolist(), steps=steps, peak_lr=peak, warmup_steps=warmup,
      fit=fit_path, form=law.name, params=params,
      predicted_final_loss=predict_final(law, theta, found["lr"], log_n),
      baselines=dict(cosine=dict(predicted_final_loss=predicted["cosine"],
                                 final_lr_fraction=final_lr_fraction),
                     wsd=dict(predicted_final_loss=predicted["wsd"],
                              decay_fraction=decay_fraction,
                              final_lr_fraction=final_lr_fraction)),
      final_lr=float(found["lr"][-1]),
      optimiser=dict(method="adam on softmax drop logits", iterations=iterations,
                     learning_rate=lr, start=found["start"],
                     first_loss=float(found["trace"][0]),
                     last_loss=float(found["trace"][-1])),
      extrapolation=extrapolation(fit, steps, peak, warmup, params))


def _check_numbers(steps, peak, warmup) -> None:
  if not (isinstance(steps, (int, np.integer)) and steps >= 2):
    raise errors.UserError(f"--steps={steps!r}: must be an integer >= 2")
  if not (math.isfinite(peak) and peak > 0):
    raise errors.UserError(f"--peak_lr={peak!r}: must be finite and > 0")
  if warmup is not None and not 0 <= warmup < steps:
    raise errors.UserError(f"--warmup_steps={warmup!r}: must be in [0, steps)")


def _default_warmup(fit: Mapping, where: str) -> int:
  """The fitted curves' warmup, when they share one."""
  warmups = {p["warmup"] for p in (fit.get("fitted_curves") or {}).values()}
  if len(warmups) != 1:
    raise errors.UserError(f"{where}: the fitted curves have warmups {sorted(warmups) or '?'}: "
                     "give --warmup_steps")
  return int(warmups.pop())
