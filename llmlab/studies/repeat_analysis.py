"""The repetition study's numbers (repeat.py has the design).

Per law (FORMS, llmlab/scaling/forms.py): the fit on the family's records, its
prediction of the held-out target's evals (ARE over evals >= are_fraction
of the run, naive ARE, skill), and the number of epochs R at which the
law's loss for the target's N and the runs' D is `threshold` (1%) above
fresh data: L(N, D, U=D/R) = (1 + threshold) L(N, D, U=D), solved on a
fine log grid of R. The same crossing measured on the runs (final evals
of each size: loss under R repetitions over the fresh run's, interpolated
in log R) is the check the laws answer to.
"""

from __future__ import annotations

import numpy as np

from llmlab.scaling import fit as fit_lib

# chinchilla is blind to repetition; the two others read unique_tokens
# (llmlab/scaling/forms.py).
FORMS = ("chinchilla", "data_constrained", "data_repeat")
MAX_REPETITIONS = 1e4  # the solve's search range is 1 .. this many epochs


def columns(rows: list[dict]) -> dict:
  """Records as the fitter's numpy columns (unique_tokens: the unique
  tokens seen so far, min(U, D), so epochs = D / unique >= 1)."""
  out = {k: np.array([r[k] for r in rows], np.float64)
         for k in ("params", "tokens", "loss", "unique_tokens", "epochs")}
  out["run"] = np.array([r["run"] for r in rows], dtype=object)
  return out


def _predict(result, n, d, u) -> np.ndarray:
  return np.asarray(fit_lib.predict(result, params=n, tokens=d,
                                    unique_tokens=u), np.float64)


def naive(family: list[dict], target: list[dict]) -> np.ndarray:
  """The largest family member's loss under the same repetition budget at
  each target eval's tokens (interpolated in log tokens)."""
  biggest = max(r["params"] for r in family)
  out = []
  for t in target:
    mine = sorted((r["tokens"], r["loss"]) for r in family
                  if r["params"] == biggest
                  and r["repetitions"] == t["repetitions"])
    d, loss = np.array(mine).T
    out.append(float(np.interp(np.log(t["tokens"]), np.log(d), loss)))
  return np.array(out)


def repetitions_at(result, n: float, d: float, threshold: float):
  """Epochs R where the law's loss at (N, D, U = D / R) first exceeds fresh
  data's by `threshold` (relative); None when it never does up to
  MAX_REPETITIONS (a law blind to repetition never does)."""
  reps = np.geomspace(1.0, MAX_REPETITIONS, 4001)
  loss = _predict(result, np.full_like(reps, n), np.full_like(reps, d),
                  d / reps)
  ratio = loss / loss[0] - 1.0
  above = np.flatnonzero(ratio >= threshold)
  if not len(above) or above[0] == 0:
    return None
  i = above[0]
  lo, hi = np.log(reps[i - 1]), np.log(reps[i])
  w = (threshold - ratio[i - 1]) / (ratio[i] - ratio[i - 1])
  return float(np.exp(lo + w * (hi - lo)))


def measured_repetitions(rows: list[dict], threshold: float) -> dict:
  """Per size: (R where the final loss is `threshold` above the fresh run's,
  by interpolation in log R, or None if not reached; the ratios)."""
  out = {}
  for name in dict.fromkeys(r["family"] for r in rows):
    final = {}
    for r in rows:
      if r["family"] == name and r["tokens"] >= final.get(
          r["repetitions"], (0.0,))[0]:
        final[r["repetitions"]] = (r["tokens"], r["loss"])
    if 1 not in final or len(final) < 2:
      continue
    reps = sorted(final)
    ratio = np.array([final[k][1] / final[1][1] - 1.0 for k in reps])
    above = np.flatnonzero(ratio >= threshold)
    at = None
    if len(above) and above[0] > 0:
      i = above[0]
      w = (threshold - ratio[i - 1]) / (ratio[i] - ratio[i - 1])
      at = float(np.exp(np.log(reps[i - 1]) +
                        w * (np.log(reps[i]) - np.log(reps[i - 1]))))
    out[name] = dict(repetitions_at=at, max_measured=max(reps),
                     params=rows[[r["family"] for r in rows].index(name)][
                         "params"],
                     ratio={str(k): float(v) for k, v in zip(reps, ratio)})
  return out


def _holdout(result, target: list[dict], guess_naive, are_fraction: float):
  tg = columns(target)
  guess = _predict(result, tg["params"], tg["tokens"], tg["unique_tokens"])
  are = fit_lib.are(tg["loss"], guess, tg["tokens"], are_fraction)
  naive_are = fit_lib.are(tg["loss"], guess_naive, tg["tokens"], are_fraction)
  points = [dict(run=t["run"], repetitions=t["repetitions"],
                 tokens=t["tokens"], epochs=t["epochs"], loss=t["loss"],
                 predicted=float(g), naive=float(n))
            for t, g, n in zip(target, guess, guess_naive)]
  by_r = {}
  for r in sorted({t["repetitions"] for t in target}):
    m = np.array([t["repetitions"] == r for t in target])
    a = fit_lib.are(tg["loss"][m], guess[m], tg["tokens"][m], are_fraction)
    b = fit_lib.are(tg["loss"][m], guess_naive[m], tg["tokens"][m],
                    are_fraction)
    by_r[str(r)] = dict(are=a, naive_are=b)
  return dict(are=are, naive_are=naive_are,
              skill=1.0 - are / naive_are if naive_are > 0 else None,
              by_repetitions=by_r, points=points)


def analyse(scfg, records: list[dict]) -> dict:
  """Fits every law on the family, scores it on the target (see top)."""
  family = [r for r in records if r["role"] == "family"]
  target = [r for r in records if r["role"] == "target"]
  fam = columns(family)
  n_target = target[0]["params"]
  d_run = max(r["tokens"] for r in records)
  threshold, are_fraction = float(scfg.threshold), float(scfg.are_fraction)
  guess_naive = naive(family, target)
  sizes = sorted({r["params"] for r in records})
  laws, at_1pct, by_size = {}, {}, {}
  for form in scfg.forms:
    result = fit_lib.fit_law(fam, form)
    laws[form] = dict(params=result.params, objective=result.objective,
                      converged=result.converged, n_points=result.n_points,
                      holdout=_holdout(result, target, guess_naive,
                                       are_fraction))
    at_1pct[form] = repetitions_at(result, n_target, d_run, threshold)
    by_size[form] = {f"{n:.0f}": repetitions_at(result, n, d_run, threshold)
                     for n in sizes}
    laws[form]["curves"] = _law_curves(
        result, sizes, d_run, max(r["repetitions"] for r in records))
  best = min(laws, key=lambda f: laws[f]["holdout"]["are"])
  biggest = max(r["params"] for r in family)
  return dict(
      laws=laws, repetitions_at_1pct=at_1pct,
      repetitions_at_1pct_by_size=by_size,
      measured_repetitions_at_1pct=measured_repetitions(records, threshold),
      holdout=dict(form=best, **{k: v for k, v in laws[best]["holdout"].items()
                                 if k not in ("points", "by_repetitions")}),
      threshold=threshold, are_fraction=are_fraction,
      tokens=d_run,
      target=dict(name=target[0]["family"], params=n_target,
                  ratio_to_largest_fitted=n_target / biggest),
      n_records=dict(family=len(family), target=len(target)))


def _law_curves(result, sizes, d: float, most: int) -> dict:
  """The law's loss ratio to fresh data over R in 1 .. most at D, per size
  (the plot)."""
  reps = np.geomspace(1.0, most, 41)
  out = {"repetitions": reps.tolist()}
  for n in sizes:
    loss = _predict(result, np.full_like(reps, n), np.full_like(reps, d),
                    d / reps)
    out[f"{n:.0f}"] = (loss / loss[0]).tolist()
  return out
