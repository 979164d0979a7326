"""Bootstrap refits of the Chinchilla data: the vmapped fitter vs scipy, one by one.

Data: Hoffmann et al. 2022 (Figure 4) as extracted by Besiroglu et al. 2024
(tests/data/chinchilla_hoffmann2022.csv), 5 highest losses dropped (240 points).
Each refit is the Huber (delta 1e-3) log-loss fit on a resample of the points,
started from the full-data optimum. Ours: all refits in one jitted, vmapped call
(`llmlab.scaling.fit.bootstrap`). Baseline: `scipy.optimize.minimize(method=
"L-BFGS-B")` per refit with an analytic numpy gradient, at tight tolerances (to
reach the same optimum) and at scipy's defaults; scipy is timed on the first
--scipy_n refits and extrapolated to --n. Objectives are compared with one numpy
implementation for both. Goal: >= 20x faster at equal or lower objective.

    python benchmarks/fit_speed.py [--n=1000] [--scipy_n=100]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from scipy import optimize

from llmlab.scaling import fit as fit_lib
from llmlab.scaling import records

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                    "chinchilla_hoffmann2022.csv")
DELTA = 1e-3


def objective_and_grad(theta, log_n, log_d, log_l, w):
  """Huber log-loss objective of the chinchilla law and its gradient, in numpy."""
  a, b, e, alpha, beta = theta
  t_n, t_d, t_e = np.exp(a - alpha * log_n), np.exp(b - beta * log_d), np.exp(e)
  total = t_n + t_d + t_e
  r = np.log(total) - log_l
  abs_r = np.abs(r)
  f = np.sum(w * np.where(abs_r <= DELTA, 0.5 * r * r, DELTA * (abs_r - 0.5 * DELTA)))
  dr = w * np.clip(r, -DELTA, DELTA) / total
  g = np.array([np.sum(dr * t_n), np.sum(dr * t_d), np.sum(dr * t_e),
                -np.sum(dr * t_n * log_n), -np.sum(dr * t_d * log_d)])
  return f, g


def scipy_fits(theta0, weights, cols, options):
  start = time.perf_counter()
  thetas = [optimize.minimize(objective_and_grad, theta0, args=cols + (w,), jac=True,
                              method="L-BFGS-B", options=options).x for w in weights]
  return np.array(thetas), time.perf_counter() - start


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=1000, help="bootstrap refits")
  p.add_argument("--scipy_n", type=int, default=100, help="refits timed with scipy")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  rec = records.read_records(DATA)
  rec = records.take(rec, np.sort(np.argsort(rec["loss"])[:-5]))
  cols = (np.log(rec["params"]), np.log(rec["tokens"]), np.log(rec["loss"]))
  full = fit_lib.fit_law(rec)
  print(f"full-data fit: objective {full.objective:.6e}, params {full.params}")

  start = time.perf_counter()  # first call: compiles (same shapes, other resamples)
  fit_lib.bootstrap(rec, n=args.n, seed=args.seed + 1, fit=full)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  ours = fit_lib.bootstrap(rec, n=args.n, seed=args.seed, fit=full)
  ours_s = time.perf_counter() - start

  weights = fit_lib.resample_weights(rec, args.n, args.seed)[:args.scipy_n]
  f_of = lambda thetas: np.array([objective_and_grad(t, *cols, w)[0]
                                  for t, w in zip(thetas, weights)])
  f_ours = f_of(ours.thetas[:args.scipy_n])
  report = dict(n=args.n, scipy_n=args.scipy_n, ours_s=ours_s,
                ours_first_call_s=first_s, ours_mean_objective=float(np.mean(f_ours)),
                ours_converged=float(np.mean(ours.converged)))
  tight = dict(ftol=1e-15, gtol=1e-12, maxiter=15000, maxfun=15000)
  for name, options in (("scipy_tight", tight), ("scipy_default", {})):
    thetas, seconds = scipy_fits(full.theta, weights, cols, options)
    f_scipy = f_of(thetas)
    extrapolated = seconds * args.n / args.scipy_n
    report[name] = dict(
        seconds_for_scipy_n=seconds, extrapolated_s=extrapolated,
        speedup=extrapolated / ours_s, mean_objective=float(np.mean(f_scipy)),
        frac_ours_le_scipy=float(np.mean(f_ours <= f_scipy + 1e-12)),
        mean_alpha_abs_diff=float(np.mean(np.abs(thetas[:, 3] -
                                                 ours.thetas[:args.scipy_n, 3]))))
    print(f"{name}: {seconds:.2f}s for {args.scipy_n} fits -> {extrapolated:.1f}s for "
          f"{args.n} (extrapolated); mean objective {np.mean(f_scipy):.8e}; ours <= "
          f"scipy + 1e-12 on {100 * report[name]['frac_ours_le_scipy']:.0f}% of refits")
  print(f"ours: {ours_s:.2f}s for {args.n} refits (first call incl. compile "
        f"{first_s:.2f}s); mean objective over the same {args.scipy_n} refits "
        f"{np.mean(f_ours):.8e}; converged {100 * np.mean(ours.converged):.1f}%")
  for name in ("scipy_tight", "scipy_default"):
    print(f"speedup vs {name}: {report[name]['speedup']:.1f}x")
  print(json.dumps(report))


if __name__ == "__main__":
  main()
