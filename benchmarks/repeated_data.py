"""Laws of repeated data on a held-out size: chinchilla vs data_constrained vs data_repeat.

    python benchmarks/repeated_data.py --records=RUNS.csv [--holdout=8.7e9] [--min_tokens=1e10]

Fits each form (the optax fitter, Huber 1e-3 on log-loss, the form's grid of
starts) on every run smaller than the held-out size at >= min_tokens, and
scores every held-out run (one per repetition budget) by ARE on its
checkpoints at >= 70% of its tokens. Prints one line per form and budget,
and the mean and worst over budgets. The records need `unique_tokens`
(e.g. the data-constrained runs of Muennighoff et al. 2023 on C4, as the
collection of Choshen et al. 2024 publishes them).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from llmlab.scaling import fit as fit_lib  # noqa: E402
from llmlab.scaling import records as records_lib  # noqa: E402

FORMS = ("chinchilla", "data_constrained", "data_repeat")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--records", required=True)
  ap.add_argument("--holdout", type=float, default=None,
                  help="held-out size (default: the largest)")
  ap.add_argument("--min_tokens", type=float, default=1e10)
  ap.add_argument("--forms", default=",".join(FORMS))
  args = ap.parse_args()
  rec = records_lib.read_records(args.records)
  holdout = args.holdout or rec["params"].max()
  big = rec["params"] >= holdout
  fit_rec = records_lib.take(rec, ~big & (rec["tokens"] >= args.min_tokens))
  print(f"fit: {len(fit_rec['loss'])} checkpoints of {len(set(fit_rec['run']))} runs; "
        f"held out: {len(set(rec['run'][big]))} runs of N >= {holdout:.3g}")
  for form in args.forms.split(","):
    t0 = time.perf_counter()
    res = fit_lib.fit_law(fit_rec, form)
    secs = time.perf_counter() - t0
    ares = {}
    for run in records_lib.run_names(records_lib.take(rec, big)):
      m = rec["run"] == run
      pred = fit_lib.predict(res, params=rec["params"][m], tokens=rec["tokens"][m],
                             unique_tokens=rec["unique_tokens"][m])
      ares[run] = fit_lib.are(rec["loss"][m], pred, rec["tokens"][m])
    params = ", ".join(f"{k} {v:.4g}" for k, v in res.params.items())
    print(f"\n{form}: objective {res.objective:.6g} ({res.n_starts} starts, "
          f"{secs:.1f} s{'' if res.converged else ', NOT converged'})\n  {params}")
    for run, a in ares.items():
      print(f"  {run:24s} ARE {100 * a:6.2f}%")
    vals = np.array(list(ares.values()))
    print(f"  mean {100 * vals.mean():.2f}%, worst {100 * vals.max():.2f}% "
          f"({max(ares, key=ares.get)})")


if __name__ == "__main__":
  main()
