"""Backtests of scaling-law estimation on published families (`llmlab backtest`).

The questions of Choshen, Zhang & Andreas 2024 ("A Hitchhiker's Guide to
Scaling Law Estimation", arXiv:2410.11840) about one family: how many models,
how much of their training and which checkpoints does a law need to predict
the family's largest model within a given error, and at what cost?

Per family the target is every run of the largest size (or `target=RUN`). A
*cell* of the grid is one fit:
- design "smallest" / "closest": the k smallest sizes, or the k sizes just
  below the target, k = 2 .. n-1 (a size is every run of that parameter count);
- design "borrow_exponents" / "borrow_a_alpha": the single size just below the
  target, with alpha and beta (or ln A and alpha) fixed at the median of the
  values fitted on the table's other families, the rest fitted;
- x the fraction p of each fitted run's training (checkpoints with tokens <=
  p * its final tokens) x min_tokens (checkpoints below it dropped);
- checkpoints "all", or "final" (each run's last checkpoint within p: the
  guide's final-loss-only baseline, for the smallest/closest designs).
It is scored as the guide scores: mean |L - L_hat| / L over each target run's
checkpoints at >= 70% of its final tokens, averaged over the target runs.
compute_fraction is sum over fitted runs of 6 N D_used over 6 N D of the
target's whole training (the longest target run).

Speed: every cell of a family is one group of the vmapped fitter (fit.py) in
a single jitted call: the family's rows are shared inputs and a cell is a
weight mask over them; borrowed parameters are zero columns of a per-group
affine map (`fit.fixing`). Identical rows are merged into one weighted row
(the objective is a weighted sum, so the fit is unchanged).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Mapping, Sequence

import numpy as np

from llmlab.scaling import fit as fit_lib
from llmlab.scaling import forms as forms_lib
from llmlab.scaling import records as records_lib

log = logging.getLogger("llmlab")

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 11))
MIN_TOKENS = 1e10      # the guide's cut: checkpoints before ~10B tokens are noisy
REFERENCE_RUN = 3e11   # tokens of the guide's typical run (Pythia: 300B)
ARE_FRACTION = 0.7
THRESHOLDS = (0.04, 0.10, 0.20)
BORROW = {"borrow_exponents": ("alpha", "beta"), "borrow_a_alpha": ("a", "alpha")}
EXPONENTS = ("alpha", "beta")  # lent only when > 0 (`borrowed_values`)
GRID_COLUMNS = ("family", "target", "design", "checkpoints", "n_models", "fraction",
                "min_tokens", "compute_fraction", "are", "n_points", "runs", "bounded",
                "identified")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One fit of the grid: which runs, which of their checkpoints, what is fixed."""
  design: str
  checkpoints: str  # "all" | "final"
  n_models: int
  fraction: float
  min_tokens: float
  runs: tuple[str, ...]
  fixed: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass
class Family:
  """One family's records split into the fitted pool and the target."""
  name: str
  records: dict           # all rows of the family
  target_runs: list[str]
  sizes: list[float]      # distinct parameter counts below the target, ascending
  runs_by_size: dict[float, list[str]]
  min_tokens: float       # the family's cut (see `min_tokens_cut`)

  def target(self) -> dict:
    """The target's rows (every checkpoint of every target run)."""
    return records_lib.take(self.records, np.isin(self.records["run"], self.target_runs))


def min_tokens_cut(final_tokens: Sequence[float]) -> float:
  """The guide's 1e10-token cut, scaled to the family: the guide drops the
  first 1e10 of ~3e11 tokens (a thirtieth); a family whose median run is
  shorter than 3e11 drops the same share of it, median final tokens / 30
  (its token unit may even differ: revisiting_lm counts examples)."""
  return float(min(MIN_TOKENS, np.median(final_tokens) * MIN_TOKENS / REFERENCE_RUN))


def families(records: Mapping, target: str | None = None,
             log_skip=log.warning) -> list[Family]:
  """The table's families (column `family`; one family "all" without it),
  skipping with one line each family with fewer than 2 sizes."""
  fam_col = records.get("family", np.full(len(records["loss"]), "all", dtype=object))
  out = []
  for name in dict.fromkeys(fam_col.tolist()):
    rec = records_lib.take(records, fam_col == name)
    sizes = sorted(set(rec["params"].tolist()))
    if len(sizes) < 2:
      log_skip(f"backtest: family {name!r} skipped: it has {len(sizes)} model size "
               "(a law needs at least 2)")
      continue
    runs = records_lib.run_names(rec)
    if target is not None and target in runs:
      target_runs = [target]
    elif "is_target" in rec and rec["is_target"].any():
      target_runs = records_lib.run_names(records_lib.take(rec, rec["is_target"]))
    else:
      target_runs = [r for r in runs if rec["params"][rec["run"] == r][0] == sizes[-1]]
    n_t = rec["params"][rec["run"] == target_runs[0]][0]
    below = sorted(s for s in sizes if s < n_t)
    if not below:
      log_skip(f"backtest: family {name!r} skipped: no model smaller than its "
               f"target {target_runs[0]!r}")
      continue
    by_size = {s: [r for r in runs if rec["params"][rec["run"] == r][0] == s]
               for s in below}
    finals = [rec["tokens"][rec["run"] == r].max() for r in runs]
    out.append(Family(name, rec, target_runs, below, by_size, min_tokens_cut(finals)))
  return out


def plan_cells(fam: Family, borrowed: Mapping[str, Mapping[str, float]] | None,
               fractions=FRACTIONS) -> list[Cell]:
  """Every cell of a family's grid (module docstring). `borrowed`: design ->
  {log-space name: value}; designs missing from it are not planned."""
  n = len(fam.sizes) + 1
  cells = []
  designs = []
  for k in range(2, n):
    designs.append(("smallest", k, fam.sizes[:k]))
    designs.append(("closest", k, fam.sizes[-k:]))
  for design, names in BORROW.items():
    if borrowed and design in borrowed:
      designs.append((design, 1, fam.sizes[-1:]))
  for design, k, sizes in designs:
    runs = tuple(r for s in sizes for r in fam.runs_by_size[s])
    fixed = tuple(sorted((borrowed or {}).get(design, {}).items()))
    for p in fractions:
      for cut in (0.0, fam.min_tokens):
        cells.append(Cell(design, "all", k, p, cut, runs, fixed))
      if design in ("smallest", "closest"):
        cells.append(Cell(design, "final", k, p, 0.0, runs, fixed))
  return cells


def _pool(fam: Family) -> dict:
  """The rows a law may be fitted on: every run of the family but the target's."""
  return records_lib.take(fam.records, ~np.isin(fam.records["run"], fam.target_runs))


def _reached(pool: Mapping, final: np.ndarray, cell: Cell) -> np.ndarray:
  """Rows of the cell's runs within fraction p of their run's final tokens
  (`final`: records.final_tokens of the pool)."""
  return np.isin(pool["run"], cell.runs) & (
      pool["tokens"] <= cell.fraction * final * (1 + 1e-9))


def cell_weights(pool: Mapping, cells: Sequence[Cell]) -> np.ndarray:
  """G x N weights: 1 where a cell fits the row, else 0."""
  final = records_lib.final_tokens(pool)
  w = np.zeros((len(cells), len(pool["loss"])))
  for g, c in enumerate(cells):
    m = _reached(pool, final, c)
    if c.checkpoints == "final":
      last = np.zeros_like(m)
      for r in c.runs:
        mine = np.flatnonzero(m & (pool["run"] == r))
        if len(mine):
          last[mine[np.argmax(pool["tokens"][mine])]] = True
      m = last
    m &= pool["tokens"] >= c.min_tokens
    w[g] = m
  return w


def compute_fraction(pool: Mapping, final: np.ndarray, cell: Cell,
                     target_flops: float) -> float:
  """FLOPs (6 N D) to train the cell's runs to their last used checkpoint,
  over the target's whole training: checkpoints dropped by min_tokens were
  still trained through, so they count; runs cut at fraction p count p."""
  reached = _reached(pool, final, cell)
  total = 0.0
  for r in cell.runs:
    mine = reached & (pool["run"] == r)
    if mine.any():
      total += 6.0 * pool["params"][mine][0] * pool["tokens"][mine].max()
  return total / target_flops


def _merge_duplicates(x: Mapping[str, np.ndarray], log_loss: np.ndarray,
                      weights_GxN: np.ndarray):
  """Identical (inputs, loss) rows become one row carrying their summed weight."""
  table = np.stack([*x.values(), log_loss], axis=1)
  _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
  merged = np.zeros((weights_GxN.shape[0], len(first)))
  np.add.at(merged.T, inverse.reshape(-1), weights_GxN.T)
  return {k: v[first] for k, v in x.items()}, log_loss[first], merged


def starts(form: forms_lib.Form, n: int, seed: int = 0) -> np.ndarray:
  """n starts drawn without replacement from the form's grid (fixed seed, so
  the same for every cell and run); the whole grid when it has <= n."""
  grid = form.grid_starts()
  if len(grid) <= n:
    return grid
  return grid[np.sort(np.random.default_rng(seed).choice(len(grid), n, replace=False))]


# The polish of a backtest's fits: tighter than scipy's L-BFGS-B defaults
# (which stop at a relative decrease of 2.2e-9), looser than fit.POLISH.
# Near the optimum of a cell of few points (final checkpoints: 6-17 points
# for 5 parameters) a Huber objective in its linear part (residuals >
# delta) makes BFGS crawl, and the cap is what stops those lanes. Against a
# scipy loop run to ftol 1e-15 from the same 64 starts
# (benchmarks/backtest_speed.py --tight, 200 cells of its grid), a cap of
# 400 left 13 of the 150 cells with a finite optimum > 1e-6 above it,
# 2,000 left 6, for +1 s on the 860-cell call compiled; the solver's small
# chunks (solver.SMALL) make the long tail cheap: it cost +3-4 s before.
POLISH = fit_lib.Tol(gtol=1e-8, ftol=1e-11, max_evals=2000)
# The float32 screen is cheaper per evaluation than the float64 polish, so it
# runs longer: starts that need more than 60 steps to leave a poor basin
# still reach their own. (100 is not enough: tests/test_backtest.py's
# borrowed exponents then come from a poorer basin of a full fit.)
SCREEN = fit_lib.Tol(gtol=1e-5, ftol=1e-8, max_evals=150)
KEEP = 4  # starts per cell polished after the screen (`llmlab backtest --keep`)


def fit_cells(form: forms_lib.Form, pool: Mapping, cells: Sequence[Cell],
              weights: np.ndarray, n_starts: int = 64, keep: int = KEEP,
              delta: float = fit_lib.DELTA, polish_evals: int = POLISH.max_evals):
  """Fits every cell (its row weights: `cell_weights`) in one vmapped call:
  `n_starts` starts screened in float32, the best `keep` polished in float64
  (fit.minimize's `fast` mode) for at most `polish_evals` evaluations
  (`POLISH`: more keep and evaluations converge more cells of few points
  and cost time; see docs/scaling-backtests.md's speed section).
  Returns (theta_GxP, objective_G, n_points_G); a cell with no more points
  than free parameters is not identified: its theta and objective are NaN."""
  x = fit_lib.log_inputs(pool, form)
  log_loss = np.log(pool["loss"])
  x, log_loss, weights = _merge_duplicates(x, log_loss, weights)
  n_rows = weights.sum(axis=1)
  free = np.array([len(form.params) - len(c.fixed) for c in cells])
  ok = (weights > 0).sum(axis=1) > free  # distinct points, not repeats
  theta = np.full((len(cells), len(form.params)), np.nan)
  objective = np.full(len(cells), np.nan)
  idx = np.flatnonzero(ok)
  if len(idx):
    s = starts(form, n_starts)
    affine = fit_lib.centring(form, x, weights[idx],
                              fit_lib.fixing(form, [dict(cells[i].fixed) for i in idx]))
    th, f, _, _ = fit_lib.minimize(
        form, np.broadcast_to(s, (len(idx),) + s.shape), weights[idx], x,
        np.broadcast_to(log_loss, (len(idx), len(log_loss))), delta=delta, keep=keep,
        affine=affine, screen=SCREEN, polish=POLISH._replace(max_evals=polish_evals),
        fast=True, ragged=True)
    best = np.argmin(np.where(np.isnan(f), np.inf, f), axis=1)
    theta[idx] = th[np.arange(len(idx)), best]
    objective[idx] = f[np.arange(len(idx)), best]
  return theta, objective, n_rows.astype(int)


def fit_pools(form: forms_lib.Form, jobs: Sequence[tuple], n_starts: int = 64,
              **kw) -> list[tuple]:
  """`fit_cells` of several (pool, cells, weights) jobs, e.g. one per family,
  in one call: their pools stacked, each cell weighting its own pool's rows.
  Why: each call compiles the solver for its shapes (~2-3 s on 2 cores), and a
  table's families differ in shape; one call compiles once. Cells are
  independent lanes, so a cell's fit is its fit alone. Returns one (theta,
  objective, n_points) per job."""
  if len(jobs) == 1:
    pool, cells, weights = jobs[0]
    return [fit_cells(form, pool, cells, weights, n_starts, **kw)]
  keys = [k for k in jobs[0][0] if all(k in pool for pool, _, _ in jobs)]
  stacked = {k: np.concatenate([np.asarray(pool[k]) for pool, _, _ in jobs]) for k in keys}
  rows = np.cumsum([0] + [len(pool["loss"]) for pool, _, _ in jobs])
  weights = np.zeros((sum(len(w) for _, _, w in jobs), rows[-1]))
  at = np.cumsum([0] + [len(w) for _, _, w in jobs])
  for i, (_, _, w) in enumerate(jobs):
    weights[at[i]:at[i + 1], rows[i]:rows[i + 1]] = w
  cells = [c for _, job_cells, _ in jobs for c in job_cells]
  out = fit_cells(form, stacked, cells, weights, n_starts, **kw)
  return [tuple(o[at[i]:at[i + 1]] for o in out) for i in range(len(jobs))]


def bounded(form: forms_lib.Form, theta_GxP: np.ndarray) -> np.ndarray:
  """Whether each fit lies within the form's grid of starts widened on each
  side by the grid's span on that axis (at least 1; Chinchilla: E >= e^-3,
  exponents <= 4). A fit outside has run off along a valley (E -> 0, an
  exponent -> infinity that switches a term off): its points do not
  identify that parameter, and its extrapolation can depend on where the
  optimiser stopped (docs/scaling-backtests.md)."""
  grid = form.grid_starts()
  lo, hi = grid.min(0), grid.max(0)
  margin = np.maximum(hi - lo, 1.0)
  theta_GxP = np.asarray(theta_GxP, np.float64)
  return np.all((theta_GxP >= lo - margin) & (theta_GxP <= hi + margin), axis=1)


def score(form: forms_lib.Form, theta_GxP: np.ndarray, target: Mapping,
          target_runs: Sequence[str]) -> np.ndarray:
  """ARE of every cell: per target run, mean |L - L_hat| / L over its
  checkpoints at >= 70% of its final tokens; then the mean over target runs."""
  late = target["tokens"] >= ARE_FRACTION * records_lib.final_tokens(target)
  rows = records_lib.take(target, late)
  x = fit_lib.log_inputs(rows, form)
  ok = np.all(np.isfinite(theta_GxP), axis=1)
  pred = np.full((len(theta_GxP), len(rows["loss"])), np.nan)
  if ok.any():
    pred[ok] = fit_lib.predict_log(form, theta_GxP[ok], x)
  err = np.abs(rows["loss"] - np.exp(pred)) / rows["loss"]
  per_run = [np.mean(err[:, rows["run"] == r], axis=1) for r in target_runs]
  return np.mean(per_run, axis=0)


def borrowed_values(form: forms_lib.Form, fams: Sequence[Family], n_starts: int,
                    delta: float, **solver) -> dict[str, dict[str, dict[str, float]]]:
  """family -> design -> {name: value}: the median over the *other* families
  of their full fit (every size but the target, all checkpoints above the
  family's cut). A table of one family borrows nothing. A fit is lent only
  where its points pin it: `bounded` (not run off along a valley),
  `fit.identified` (no direction its points cannot see: final losses all
  at one token count leave beta wherever the fit started), and the
  exponents it lends positive (a family whose loss rises with training, as
  under heavy repetition, fits beta <= 0, and a law borrowing that predicts
  a loss that grows with data)."""
  fits = {}
  jobs = []
  for fam in fams:
    pool = _pool(fam)
    cell = Cell("full", "all", len(fam.sizes), 1.0, fam.min_tokens,
                tuple(records_lib.run_names(pool)))
    jobs.append((pool, [cell], cell_weights(pool, [cell])))
  for fam, (pool, _, weights), (theta, _, _) in zip(
      fams, jobs, fit_pools(form, jobs, n_starts, delta=delta, **solver)):
    if not (np.all(np.isfinite(theta[0])) and bounded(form, theta)[0]):
      continue
    x = {k: v[weights[0] > 0] for k, v in fit_lib.log_inputs(pool, form).items()}
    if fit_lib.identified(form, theta[0], x):
      fits[fam.name] = dict(zip(form.params, theta[0].tolist()))
  out = {}
  for fam in fams:
    lend = {}
    for design, names in BORROW.items():
      if not all(n in form.params for n in names):
        continue
      others = [v for k, v in fits.items() if k != fam.name and
                all(v[n] > 0 for n in names if n in EXPONENTS)]
      if others:
        lend[design] = {n: float(np.median([o[n] for o in others])) for n in names}
    if lend:
      out[fam.name] = lend
  return out


def grid_job(fam: Family, borrowed, fractions=FRACTIONS) -> tuple:
  """(pool, cells, weights) of a family's grid: a `fit_pools` job."""
  cells = plan_cells(fam, borrowed, fractions)
  pool = _pool(fam)
  return pool, cells, cell_weights(pool, cells)


def backtest_family(form: forms_lib.Form, fam: Family, job: tuple, fitted: tuple) -> dict:
  """The grid of one family, scored: rows of grid.csv and the family's
  summary. job: its `grid_job`; fitted: the job's (theta, objective,
  n_points) from `fit_pools` and the seconds credited to it."""
  pool, cells, weights = job
  theta, _, n_points, seconds = fitted
  target = fam.target()
  t_final = max(target["tokens"][target["run"] == r].max() for r in fam.target_runs)
  target_flops = 6.0 * target["params"][0] * t_final
  ares = score(form, theta, target, fam.target_runs)
  inside = bounded(form, theta)
  # Pinned by its points: the Jacobian of the cell's predictions has full
  # rank in its free parameters (fit.identified; e.g. never with 2 sizes).
  pinned = fit_lib.identified_each(
      form, theta, fit_lib.log_inputs(pool, form), weights,
      [[n not in dict(c.fixed) for n in form.params] for c in cells])
  final = records_lib.final_tokens(pool)
  rows = []
  for c, a, n, b, i in zip(cells, ares, n_points, inside, pinned):
    rows.append(dict(family=fam.name, target=",".join(fam.target_runs), design=c.design,
                     checkpoints=c.checkpoints, n_models=c.n_models, fraction=c.fraction,
                     min_tokens=c.min_tokens,
                     compute_fraction=float(compute_fraction(pool, final, c, target_flops)),
                     are=float(a), n_points=int(n), runs=" ".join(c.runs),
                     bounded=int(b), identified=int(i), fixed=dict(c.fixed)))
  return dict(rows=rows, fit_seconds=seconds, n_fits=int(np.sum(np.isfinite(ares))),
              n_unbounded=int(np.sum(np.isfinite(ares) & ~inside)),
              n_unidentified=int(np.sum(np.isfinite(ares) & ~pinned)), params=theta)


def summarise(rows: Sequence[dict], thresholds=THRESHOLDS) -> dict:
  """best: the lowest-ARE cell; cheapest[t]: the lowest compute_fraction cell
  with ARE <= t (None where no cell reaches t). best_identified and
  cheapest_identified: the same among the cells whose fits their points pin
  (`identified` and `bounded`): a fit that is not pinned lands anywhere in
  a flat valley, and its ARE can be luck (docs/scaling-backtests.md,
  "fragile cells"), so the robust answer is the pinned one."""
  scored = [r for r in rows if math.isfinite(r["are"])]
  cell = lambda r: {k: r[k] for k in GRID_COLUMNS if k not in ("family", "target")}

  def pick(pool):
    best = min(pool, key=lambda r: r["are"]) if pool else None
    cheapest = {}
    for t in thresholds:
      ok = [r for r in pool if r["are"] <= t]
      cheapest[f"{t:.2f}"] = cell(min(ok, key=lambda r: (r["compute_fraction"], r["are"]))) \
          if ok else None
    return (cell(best) if best else None), cheapest

  best, cheapest = pick(scored)
  best_pinned, cheapest_pinned = pick([r for r in scored
                                       if r["identified"] and r["bounded"]])
  return dict(best=best, cheapest=cheapest, best_identified=best_pinned,
              cheapest_identified=cheapest_pinned)


def checks(rows: Sequence[dict]) -> dict:
  """The guide's three questions on matched pairs of cells (same design, k,
  fraction; both scored): do intermediate checkpoints beat final-only? does
  dropping early tokens help? does closest-in-scale beat smallest-k?"""
  key = lambda r: (r["design"], r["checkpoints"], r["n_models"], r["fraction"],
                   r["min_tokens"] > 0)
  by = {key(r): r["are"] for r in rows if math.isfinite(r["are"])}
  runs = {key(r): r["runs"] for r in rows}

  def compare(pairs):
    diffs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not diffs:
      return None
    d = np.array([a - b for a, b in diffs])
    return dict(pairs=len(d), wins=int(np.sum(d < 0)), median_diff=float(np.median(d)),
                mean_first=float(np.mean([a for a, _ in diffs])),
                mean_second=float(np.mean([b for _, b in diffs])),
                median_first=float(np.median([a for a, _ in diffs])),
                median_second=float(np.median([b for _, b in diffs])))

  def pairs(fn):
    out = []
    for (design, ckpt, k, p, cut), a in by.items():
      other = fn(design, ckpt, k, p, cut)
      if other is not None:
        out.append((a, by.get(other)))
    return out

  return dict(
      intermediate_vs_final=compare(pairs(
          lambda d, c, k, p, cut: (d, "final", k, p, False)
          if c == "all" and not cut and d in ("smallest", "closest") else None)),
      drop_early_vs_keep=compare(pairs(
          lambda d, c, k, p, cut: (d, c, k, p, False) if c == "all" and cut else None)),
      closest_vs_smallest=compare(pairs(
          lambda d, c, k, p, cut: ("smallest", c, k, p, cut)  # k = n-1: the same runs
          if d == "closest" and c == "all" and runs.get(("smallest", c, k, p, cut))
          != runs[(d, c, k, p, cut)] else None)))


def run(records: Mapping, form: str = "chinchilla", target: str | None = None,
        n_starts: int = 64, delta: float = fit_lib.DELTA, fractions=FRACTIONS,
        log_skip=log.warning, source: str = "records", **solver) -> dict:
  """Backtests every family of a records table (records.py, with `family`);
  `solver`: fit_cells' keep and polish_evals.
  Returns {"rows": grid rows, "families": {F: summary}, "n_fits", "seconds",
  "skipped"}."""
  law = forms_lib.get_form(form)
  if law.curve:
    raise records_lib.RecordsError(f"backtest: form {form!r} is a curve form; use a "
                                   "form of (N, D) records such as chinchilla")
  records_lib.require(records, [k for k in law.inputs if k == "unique_tokens"], source,
                      f"--form={form}")
  if target is not None and target not in set(records["run"].tolist()):
    raise records_lib.RecordsError(f"--target={target!r} is not a run of the records")
  skipped = []

  def skip(msg):
    skipped.append(msg)
    log_skip(msg)

  t0 = time.perf_counter()
  fams = families(records, target, skip)
  borrowed = borrowed_values(law, fams, n_starts, delta, **solver) if len(fams) > 1 else {}
  # Every family's grid in one solver call (one compile); each family is
  # credited the call's seconds in proportion to its cells.
  jobs = [grid_job(fam, borrowed.get(fam.name), fractions) for fam in fams]
  t_fit = time.perf_counter()
  fitted = fit_pools(law, jobs, n_starts, delta=delta, **solver) if jobs else []
  t_fit = time.perf_counter() - t_fit
  n_cells = max(1, sum(len(cells) for _, cells, _ in jobs))
  out_rows, summary = [], {}
  for fam, job, fit in zip(fams, jobs, fitted):
    res = backtest_family(law, fam, job, (*fit, t_fit * len(job[1]) / n_cells))
    out_rows += res["rows"]
    summary[fam.name] = dict(
        target=",".join(fam.target_runs), sizes=len(fam.sizes) + 1,
        min_tokens_cut=fam.min_tokens, borrowed=borrowed.get(fam.name),
        n_fits=res["n_fits"], n_unbounded=res["n_unbounded"],
        n_unidentified=res["n_unidentified"],
        fit_seconds=res["fit_seconds"],
        **summarise(res["rows"]), checks=checks(res["rows"]))
  return dict(form=form, rows=out_rows, families=summary,
              n_fits=sum(s["n_fits"] for s in summary.values()),
              seconds=time.perf_counter() - t0, skipped=skipped)


def study_records(study_dir: str) -> dict:
  """A finished `llmlab study` workdir as one family: its records.csv (the
  fitted members' evaluations and the target's, column `role`), family named
  after the directory, the study's target marked by a `target` column."""
  from llmlab import storage  # noqa: PLC0415

  path = storage.join(study_dir, "records.csv")
  if not storage.exists(path):
    raise records_lib.RecordsError(f"--study={study_dir}: no records.csv (is it a "
                                   "finished `llmlab study` workdir?)")
  _, rows = records_lib.read_csv(path, records_lib.REQUIRED + ("run", "role"))
  rec = records_lib.read_records(path)
  targets = {row["run"] for _, row in rows if row["role"] == "target"}
  if not targets:
    raise records_lib.RecordsError(f"{path}: no row with role 'target'")
  name = str(study_dir).rstrip("/").rsplit("/", 1)[-1] or "study"
  rec["family"] = np.full(len(rec["loss"]), name, dtype=object)
  rec["is_target"] = np.isin(rec["run"], sorted(targets))
  return rec
