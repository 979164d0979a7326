"""The multi-power law on the loss curves of Luo et al. 2025 ("A Multi-Power Law
for Loss Curve Prediction Across Learning Rate Schedules", arXiv:2503.12811).

Data: ../shared/data/multipower/{25M,100M}/*.csv (their public repository, MIT):
9 schedules per size, warmup 2,160 steps to 3e-4. Their split: fit on
cosine_24000, constant_24000 and wsdcon_9 (steps < 24000), predict the other six.
Goal per size (single-size fit): mean relative error <= 0.2%, each schedule's
worst error averaged <= 1% (the authors report 0.11% / 0.41% for 25M and
0.14% / 0.58% for 100M: their PredE and WorstE).

Prints, per size and per way of reading the learning rates:
- rates=rows: the logged rows as `llmlab fit --form=multipower` reads a CSV
  (rates linear between rows, warmup_steps 2,160);
- rates=exact: each schedule's per-step rates rebuilt from its description in
  ../shared/README.md and checked against every logged rate (the authors fit so);
the fitted parameters, fit wall time (the first fit of a data size in a
process includes compiling, ~10 s; then a warm refit), each held-out
schedule's mean and worst relative error and the coverage of the 95%
intervals (bootstrap over the fitted runs: of the law's curve, and of an
observed loss), and that coverage again with a relative run-to-run noise
term folded in (--noise). Then a profile over gamma (how well the three curves pin C,
beta, gamma), the size-coupled law (multipower_n) fitted to both sizes at
once, and the fit time on a 10^5-step cosine curve.

    python benchmarks/multipower_fit.py [--sizes=25M,100M] [--rates=rows,exact]
        [--bootstrap=100] [--noise=0,0.001,...] [--skip_profile] [--skip_joint]
        [--skip_long]
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np

from llmlab.scaling import curves, fitting, forms
from llmlab.scaling import fit as fit_lib

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                    "data", "multipower")
FIT_RUNS = ("cosine_24000", "constant_24000", "wsdcon_9")
WARMUP, PEAK, END = 2160, 3e-4, 3e-5


def cosine(s, warmup: int, total: int):
  return END + 0.5 * (PEAK - END) * (1 + np.cos(np.pi * (s - warmup) / (total - warmup)))


def exact_rates(name: str, last: int) -> np.ndarray:
  """Rates of updates 1..last (index s - 1) of a schedule named as in the data:
  linear warmup over 2,160 steps to 3e-4, then cosine_T (to 3e-5 at T),
  constant_T, wsd_D_T (flat, exponential decay to 3e-5 from D to T), wsdld_D_T
  (linear decay), wsdcon_X (flat, X * 1e-5 from step 8,000)."""
  s = np.arange(1, last + 1, dtype=np.float64)
  kind, *nums = name.split("_")
  if kind == "cosine":
    main = cosine(s, WARMUP, int(nums[0]))
  elif kind == "constant":
    main = np.full_like(s, PEAK)
  elif kind == "wsdcon":
    main = np.where(s < 8000, PEAK, int(nums[0]) * 1e-5)
  else:
    d, t = (int(n) for n in nums)
    f = np.clip((s - d) / (t - d), 0, 1)
    main = (PEAK ** (1 - f) * END ** f if kind == "wsd" else PEAK * (1 - f) + END * f)
  return np.where(s <= WARMUP, PEAK * s / WARMUP, main)


def load(size: str, rates: str, params: bool = False) -> dict:
  """One size's nine curves as a curves table (run = schedule name)."""
  cols = {k: [] for k in ("run", "step", "lr", "loss", "warmup_steps", "params")}
  for name in sorted(os.listdir(os.path.join(DATA, size))):
    with open(os.path.join(DATA, size, name)) as f:
      for r in csv.DictReader(f):
        row = (f"{size}/{name[:-4]}" if params else name[:-4], r["step"], r["lr"],
               r["loss"], WARMUP, float(size[:-1]) * 1e6)
        for k, v in zip(cols, row):
          cols[k].append(v)
  if not params:
    del cols["params"]
  table = curves.as_curves(cols, source=size)
  if rates == "exact":
    table["eta"] = {}
    for run in curves.records_lib.run_names(table):
      m = table["run"] == run
      eta = exact_rates(run.split("/")[-1], int(table["step"][m][-1]))
      logged = eta[table["step"][m].astype(int) - 1]
      gap = np.max(np.abs(logged / table["lr"][m] - 1))
      assert gap < 1e-9, f"{size} {run}: rebuilt rates differ from the logged ones ({gap})"
      table["eta"][run] = eta
  return table


def split(table):
  fit_runs = [r for r in curves.records_lib.run_names(table) if r.split("/")[-1] in FIT_RUNS]
  held = [r for r in curves.records_lib.run_names(table) if r not in fit_runs]
  return fit_runs, curves.select_runs(table, held)


def pct(v):
  return f"{100 * v:6.3f}%"


def report(res: dict, title: str, warm_s: float | None = None) -> None:
  p = ", ".join(f"{k} {v:.4g}" for k, v in res["params"].items())
  warm = f", warm refit {warm_s:.1f} s" if warm_s is not None else ""
  print(f"\n{title}: fit {res['fit_seconds']:.1f} s{warm}, "
        f"objective {res['objective']:.6g}, converged {res['converged']}")
  print(f"  {p}")
  print(f"  {'held-out schedule':28s} {'mean':>8s} {'worst':>8s} {'cover':>8s} "
        f"{'cover obs':>9s}")
  for r in res["predictions"]:
    cover = pct(r["coverage"]) if r["coverage"] is not None else "    n/a"
    print(f"  {r['run']:28s} {pct(r['mean_rel_error'])} {pct(r['worst_rel_error'])} "
          f"{cover} {pct(r['obs_coverage'])}")
  for group in sorted({r["run"].rpartition("/")[0] for r in res["predictions"]}):
    mine = [r for r in res["predictions"] if r["run"].startswith(group)]
    print(f"  {(group + ' ' if group else '') + 'all six':28s} "
          f"{pct(np.mean([r['mean_rel_error'] for r in mine]))} "
          f"{pct(np.mean([r['worst_rel_error'] for r in mine]))} (mean of worst; max "
          f"{pct(max(r['worst_rel_error'] for r in mine))})")
  curve = f"{pct(res['coverage'])} (law's curve), " if res["coverage"] is not None else ""
  print(f"  95% interval coverage of the held-out points: {curve}"
        f"{pct(res['obs_coverage'])} (observed loss)")


def single(size: str, rates: str, n_boot: int, noise=()) -> dict:
  table = load(size, rates)
  fit_runs, held = split(table)
  res = fitting.run_curve_fit(table, "multipower", predict=held, fit_runs=fit_runs,
                              max_step=24000, n_bootstrap=n_boot, with_rows=True)
  t0 = time.time()
  fit_lib.fit_law(curves.select_runs(table, fit_runs, 24000), "multipower")
  report(res, f"{size}, rates={rates}", time.time() - t0)
  if noise and n_boot > 0:
    noise_coverage(res.pop("rows"), noise)
  return res


def noise_coverage(rows: list[dict], sigmas) -> None:
  """Coverage of the 95% intervals over the held-out rows when a relative
  run-to-run noise of std sigma is folded in (fitting.fold_noise: in
  quadrature with each side's log half-width). These curves have one seed
  per schedule, so sigma is not measured here: the table shows how large a
  noise term the intervals would need, per interval and per schedule."""
  loss = np.array([r["loss"] for r in rows])
  mid = np.array([r["loss_hat"] for r in rows])
  run = np.array([r["run"] for r in rows], dtype=object)
  print("  coverage with a relative noise term sigma folded in (curve / observed; "
        "per schedule: observed)")
  for sigma in sigmas:
    parts = []
    for lo_key, hi_key in (("loss_lo", "loss_hi"), ("obs_lo", "obs_hi")):
      lo, hi = fitting.fold_noise(mid, [r[lo_key] for r in rows],
                                  [r[hi_key] for r in rows], sigma)
      parts.append((lo <= loss) & (loss <= hi))
    per = " ".join(f"{n.split('/')[-1]} {100 * parts[1][run == n].mean():.0f}%"
                   for n in dict.fromkeys(run))
    print(f"  sigma {100 * sigma:5.2f}%: {100 * parts[0].mean():5.1f}% / "
          f"{100 * parts[1].mean():5.1f}%  ({per})")


def _fixed_gamma_form(gamma: float) -> str:
  """multipower with gamma held at `gamma` (registered once per value)."""
  name = f"multipower_gamma{gamma:g}"
  if name not in forms.FORMS:
    law = forms.get_form("multipower")
    params = tuple(k for k in law.params if k != "gamma")
    forms.register_form(name, params=params, inputs=law.inputs,
                        grid={k: law.grid[k] for k in params})(
        lambda p, x: law.log_loss(dict(p, gamma=gamma), x))
  return name


def profile(size: str, rates: str, free: dict) -> None:
  """Refits with gamma held fixed: a flat objective means the curves do not pin
  gamma (nor the C and beta that trade off with it)."""
  table = load(size, rates)
  fit_runs, held = split(table)
  print(f"\n{size}, rates={rates}: profile over gamma (others refitted)")
  print(f"  {'gamma':>8s} {'objective':>12s} {'mean':>8s} {'worst':>8s}  C, beta")
  print(f"  {free['params']['gamma']:8.3f} {free['objective']:12.6g} "
        f"{pct(free['mean_rel_error'])} {pct(free['mean_worst_rel_error'])}  "
        f"{free['params']['C']:.3g}, {free['params']['beta']:.3g} (free)")
  for gamma in (0.65, 1.0, 2.0):
    res = fitting.run_curve_fit(table, _fixed_gamma_form(gamma), predict=held,
                                fit_runs=fit_runs, max_step=24000, n_bootstrap=0)
    print(f"  {gamma:8.3f} {res['objective']:12.6g} {pct(res['mean_rel_error'])} "
          f"{pct(res['mean_worst_rel_error'])}  {res['params']['C']:.3g}, "
          f"{res['params']['beta']:.3g}")


def joint(sizes, rates: str) -> None:
  """multipower_n on every size's three fitted curves at once."""
  tables = [load(s, rates, params=True) for s in sizes]
  both = {k: np.concatenate([t[k] for t in tables]) for k in tables[0] if k != "eta"}
  if rates == "exact":
    both["eta"] = {k: v for t in tables for k, v in t["eta"].items()}
  fit_runs, held = split(both)
  res = fitting.run_curve_fit(both, "multipower_n", predict=held, fit_runs=fit_runs,
                              max_step=24000, n_bootstrap=0)
  report(res, f"multipower_n on {'+'.join(sizes)}, rates={rates}")


def long_cosine(steps: int = 100_000, every: int = 100) -> None:
  """Fit time on one 10^5-step cosine curve logged every 100 steps (the law at
  the 25M fit's parameters, 0.1% noise)."""
  s = np.arange(1, steps + 1)
  eta = np.where(s <= 1000, PEAK * s / 1000, cosine(s, 1000, steps))
  t = np.arange(1000, steps + 1, every)
  true = dict(L0=3.0, A=0.5, alpha=0.5, B=400.0, C=2.0, beta=0.6, gamma=0.65)
  point, drop, log_lr, lr_sum, log_lr_sum = curves.drop_blocks(eta, t)
  u = np.exp(-true["gamma"] * log_lr) * lr_sum
  g = drop * (1 - (1 + true["C"] * u) ** -true["beta"])
  loss = (true["L0"] + true["A"] * np.exp(-true["alpha"] * log_lr_sum) -
          true["B"] * np.bincount(point, g, minlength=len(t)))
  loss *= np.exp(np.random.default_rng(0).normal(0, 1e-3, len(t)))
  table = dict(run=["cosine"] * len(t), step=t, lr=eta[t - 1], loss=loss,
               eta={"cosine": eta})
  pairs = np.cumsum(np.diff(eta, prepend=0.0) < 0)[t - 1].sum()
  times = []
  for _ in range(2):
    t0 = time.time()
    res = fit_lib.fit_law(table, "multipower")
    times.append(time.time() - t0)
  print(f"\n10^5-step cosine ({steps} steps, {len(t)} logged points): {len(drop)} drop "
        f"blocks instead of {pairs:.3g} (point, drop step) pairs; fit {times[0]:.1f} s "
        f"(compiling included), {times[1]:.1f} s warm, {res.evals} evaluations, converged "
        f"{res.converged}")
  print("  " + ", ".join(f"{k} {v:.4g}" for k, v in res.params.items()) +
        f" (generated with {true})")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="25M,100M")
  p.add_argument("--rates", default="rows,exact")
  p.add_argument("--bootstrap", type=int, default=100)
  p.add_argument("--skip_profile", action="store_true")
  p.add_argument("--skip_joint", action="store_true")
  p.add_argument("--skip_long", action="store_true")
  p.add_argument("--noise", default="0,0.001,0.002,0.003,0.005",
                 help="relative noise stds to fold into the intervals ('' none)")
  args = p.parse_args()
  sizes, modes = args.sizes.split(","), args.rates.split(",")
  noise = [float(v) for v in args.noise.split(",") if v]
  for size in sizes:
    for rates in modes:
      res = single(size, rates, args.bootstrap, noise)
      if rates == modes[0] and not args.skip_profile:
        profile(size, rates, res)
  if not args.skip_joint and len(sizes) > 1:
    for rates in modes:
      joint(sizes, rates)
  if not args.skip_long:
    long_cosine()


if __name__ == "__main__":
  main()
