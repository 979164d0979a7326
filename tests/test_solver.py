"""The solver's layouts and preconditioners (llmlab/scaling/solver.py)."""

import numpy as np

from llmlab.scaling import forms, solver


def _family(seed=0):
  rng = np.random.default_rng(seed)
  n = np.repeat(np.geomspace(1e7, 1e9, 5), 12)
  d = np.concatenate([np.geomspace(1e8, 20 * m, 12) for m in np.geomspace(1e7, 1e9, 5)])
  loss = 1.7 + 400 / n ** 0.34 + 410 / d ** 0.28
  x = {"params": np.log(n), "tokens": np.log(d)}
  return x, np.log(loss * np.exp(0.003 * rng.standard_normal(len(n))))


def test_chinchilla_couplings_are_found():
  law = forms.get_form("chinchilla")
  x, _ = _family()
  names = law.params
  found = {(names[i], names[j], k) for i, j, k in solver.coupled(law, x)}
  assert found == {("a", "alpha", "params"), ("b", "beta", "tokens")}


def test_ragged_blocks_fit_what_dense_fits():
  """Groups using different subsets of the points (5, 23, 60 of them): packed
  into blocks, each group is fitted on its own points only, to the same
  optimum as the dense layout's weight mask."""
  law = forms.get_form("chinchilla")
  x, ll = _family()
  w = np.zeros((3, len(ll)))
  w[0, [0, 13, 26, 39, 52]] = 1.0
  w[1, :23] = 1.0
  w[2] = 2.0
  starts = law.grid_starts()[::7][:32]
  kw = dict(keep=4, fast=False)
  s = np.broadcast_to(starts, (3,) + starts.shape)
  lls = np.broadcast_to(ll, w.shape)
  _, f_dense, _, _ = solver.minimize(law, s, w, x, lls, **kw)
  th_ragged, f_ragged, _, _ = solver.minimize(law, s, w, x, lls, ragged=True, **kw)
  np.testing.assert_allclose(f_ragged.min(1), f_dense.min(1), rtol=1e-7)
  # group 2 has doubled weights on all points: its optimum is that of all
  # points once, at half the objective (started there: found at once; one
  # lane, the case minimize pads to two)
  best = th_ragged[2, np.argmin(f_ragged[2])]
  _, f_once, _, _ = solver.minimize(law, best[None, None], np.ones((1, len(ll))), x,
                                    ll[None], ragged=True, keep=1, fast=False)
  np.testing.assert_allclose(f_ragged[2].min(), 2 * f_once.min(), rtol=1e-7)


def test_centring_keeps_fixed_parameters_and_the_optimum():
  law = forms.get_form("chinchilla")
  x, ll = _family()
  w = np.ones((2, len(ll)))
  fixed = [{}, {"alpha": 0.34, "beta": 0.28}]
  plain = solver.fixing(law, fixed)
  centred = solver.centring(law, x, w, plain)
  starts = law.grid_starts()[::5][:48]
  s = np.broadcast_to(starts, (2,) + starts.shape)
  out = {}
  for name, affine in (("plain", plain), ("centred", centred)):
    th, f, _, _ = solver.minimize(law, s, w, x, np.broadcast_to(ll, w.shape), keep=4,
                                  affine=affine)
    best = np.argmin(f, axis=1)
    out[name] = th[[0, 1], best], f[[0, 1], best]
  th_c, f_c = out["centred"]
  np.testing.assert_allclose(th_c[1, 3:], [0.34, 0.28])  # held exactly
  np.testing.assert_allclose(f_c, out["plain"][1], rtol=1e-6)
