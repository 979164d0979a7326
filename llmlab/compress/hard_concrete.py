"""The hard-concrete distribution (Louizos, Welling & Kingma 2018), the
relaxed binary mask of L0 pruning used by CoFi and Sheared-LLaMA.

A stretched, clipped binary concrete: s = sigmoid((logit(u) + log_alpha) /
beta) for u ~ U(0, 1), stretched to (gamma, zeta) = (-0.1, 1.1) and clipped
to [0, 1]. Samples are exactly 0 or 1 with positive probability, yet
differentiable in log_alpha (reparameterised through u), and P(z != 0) has
a closed form, which makes the expected model size differentiable.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
_EPS = 1e-6


def sample(rng, log_alpha):
  """One mask sample per entry of log_alpha, in [0, 1]."""
  u = jax.random.uniform(rng, log_alpha.shape, minval=_EPS, maxval=1 - _EPS)
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
  return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _sigmoid(x, xp):
  return 1.0 / (1.0 + xp.exp(-x))


def prob_nonzero(log_alpha, xp=jnp):
  """P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)); `xp` is
  jax.numpy or numpy (host-side float64 ranking)."""
  return _sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA), xp)


def deterministic(log_alpha, xp=jnp):
  """The test-time mask: the noise-free value, clipped (u = 1/2)."""
  return xp.clip(_sigmoid(log_alpha, xp) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
