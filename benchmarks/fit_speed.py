"""Bootstrap refits of the Chinchilla data: the vmapped fitter vs scipy, one by one.

Data: Hoffmann et al. 2022 (Figure 4) as extracted by Besiroglu et al. 2024
(tests/data/chinchilla_hoffmann2022.csv), 5 highest losses dropped (240 points).
Each refit is the Huber (delta 1e-3) log-loss fit on a resample of the points,
started from the full-data optimum. Ours: all refits in one jitted, vmapped call
(`llmlab.scaling.fit.bootstrap`, which searches in coordinates whitened by the
Gauss-Newton matrix of the full-data fit). Baseline: `scipy.optimize.minimize(
method="L-BFGS-B")` per refit with an analytic numpy gradient, at tight
tolerances (to reach the same optimum), at scipy's defaults, and tight in our
whitened coordinates (to separate batching from preconditioning); scipy is timed
on the first --scipy_n refits and extrapolated to --n. Objectives are compared with one numpy
implementation for both. Goal: >= 20x faster at equal or lower objective.

    python benchmarks/fit_speed.py [--n=1000] [--scipy_n=100]
"""

from __future__ import annotations

import os

# scipy's L-BFGS-B calls BLAS on 5-vectors: a multi-threaded OpenBLAS spends far
# longer synchronising its threads than computing (15-40x slower measured on a
# busy 2-core machine), which would flatter us. Single-threaded BLAS is the fair
# baseline; set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy import optimize  # noqa: E402

from llmlab.scaling import fit as fit_lib  # noqa: E402
from llmlab.scaling import forms  # noqa: E402
from llmlab.scaling import records  # noqa: E402

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


def timed(fn):
  """fn() with its wall and process-CPU seconds: CPU time is the steadier
  measure on a shared machine, wall time what a user waits."""
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - wall, time.process_time() - cpu


def scipy_fits(theta0, weights, cols, options, affine=None):
  """One L-BFGS-B fit per weight vector; with affine = (shift, S) in the same
  whitened coordinates theta = shift + S u that our bootstrap uses."""
  shift, scale = affine if affine is not None else (np.zeros(5), np.eye(5))

  def fun(u, w):
    f, g = objective_and_grad(shift + scale @ u, *cols, w)
    return f, scale.T @ g

  u0 = np.linalg.solve(scale, theta0 - shift)
  return np.array([shift + scale @ optimize.minimize(fun, u0, args=(w,), jac=True,
                                                     method="L-BFGS-B", options=options).x
                   for w in weights])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=1000, help="bootstrap refits")
  p.add_argument("--scipy_n", type=int, default=100, help="refits timed with scipy")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3, help="timings of ours (median kept)")
  args = p.parse_args()

  rec = records.read_records(DATA)
  rec = records.take(rec, np.sort(np.argsort(rec["loss"])[:-5]))
  cols = (np.log(rec["params"]), np.log(rec["tokens"]), np.log(rec["loss"]))
  full = fit_lib.fit_law(rec)
  print(f"full-data fit: objective {full.objective:.6e}, params {full.params}")

  boot = lambda seed: lambda: fit_lib.bootstrap(rec, n=args.n, seed=seed, fit=full)
  _, first_wall, _ = timed(boot(args.seed + 1))  # compiles (same shapes, other draws)
  runs = [timed(boot(args.seed)) for _ in range(args.repeats)]
  ours = runs[0][0]
  ours_wall = float(np.median([r[1] for r in runs]))
  ours_cpu = float(np.median([r[2] for r in runs]))

  weights = fit_lib.resample_weights(rec, args.n, args.seed)[:args.scipy_n]
  f_of = lambda thetas: np.array([objective_and_grad(t, *cols, w)[0]
                                  for t, w in zip(thetas, weights)])
  f_ours = f_of(ours.thetas[:args.scipy_n])
  report = dict(n=args.n, scipy_n=args.scipy_n, ours_wall_s=ours_wall, ours_cpu_s=ours_cpu,
                ours_first_call_wall_s=first_wall,
                ours_mean_objective=float(np.mean(f_ours)),
                ours_converged=float(np.mean(ours.converged)))
  print(f"ours: {ours_wall:.2f}s wall, {ours_cpu:.2f}s CPU for {args.n} refits (median of "
        f"{args.repeats}; first call incl. compile {first_wall:.2f}s wall); mean "
        f"objective over the first {args.scipy_n} refits {np.mean(f_ours):.8e}; "
        f"converged {100 * np.mean(ours.converged):.1f}%")
  tight = dict(ftol=1e-15, gtol=1e-12, maxiter=15000, maxfun=15000)
  whiten = fit_lib.whitening(forms.get_form("chinchilla"), full.theta,
                             {"params": cols[0], "tokens": cols[1]})
  for name, options, affine in (("scipy_tight", tight, None), ("scipy_default", {}, None),
                                ("scipy_tight_whitened", tight, whiten)):
    thetas, wall, cpu = timed(lambda: scipy_fits(full.theta, weights, cols, options, affine))
    f_scipy = f_of(thetas)
    scale = args.n / args.scipy_n
    report[name] = dict(
        wall_s_for_scipy_n=wall, cpu_s_for_scipy_n=cpu, extrapolated_wall_s=wall * scale,
        extrapolated_cpu_s=cpu * scale, speedup_wall=wall * scale / ours_wall,
        speedup_cpu=cpu * scale / ours_cpu, mean_objective=float(np.mean(f_scipy)),
        frac_ours_le_scipy=float(np.mean(f_ours <= f_scipy + 1e-12)),
        mean_alpha_abs_diff=float(np.mean(np.abs(thetas[:, 3] -
                                                 ours.thetas[:args.scipy_n, 3]))))
    r = report[name]
    print(f"{name}: {wall:.2f}s wall, {cpu:.2f}s CPU for {args.scipy_n} fits -> "
          f"{r['extrapolated_wall_s']:.1f}s wall, {r['extrapolated_cpu_s']:.1f}s CPU for "
          f"{args.n} (extrapolated); mean objective {np.mean(f_scipy):.8e}; ours <= "
          f"scipy + 1e-12 on {100 * r['frac_ours_le_scipy']:.0f}% of refits; speedup "
          f"{r['speedup_wall']:.1f}x wall, {r['speedup_cpu']:.1f}x CPU")
  print(json.dumps(report))


if __name__ == "__main__":
  main()
