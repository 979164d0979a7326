"""What every study report says before its numbers.

A study config's `variant` key names a plumbing variant ("smoke", "test":
configs/*_quick.py, configs/study_*.py): tiny models and budgets that run
the whole pipeline in a minute or two. Their fits come out with negative
skill, compute-optimal allocations at a few thousandths of a token per
parameter and intervals that miss their own points; that is what such
budgets give, not a broken study. Each report writer (scaling/study.py,
studies/*_report.py, studies/distill.py, compress/report.py) puts `note()`
first, and leaves out a law that has fewer points than parameters
(`too_few_points`), whatever the variant.
"""

from __future__ import annotations

NOTE = ("**This is the `:{v}` variant: it checks the pipeline end to end "
        "with tiny budgets and makes no scientific claim.** Its skill, "
        "intervals and allocations say nothing about scaling; run the "
        "config without `:{v}` for results.")


def variant(source) -> str:
  """The `variant` of a study config (a ConfigDict) or of a result dict
  that recorded it; "" for the full study."""
  get = getattr(source, "get", None)
  return str((get("variant", "") if get else "") or "")


def note(source) -> list[str]:
  """The lines a report starts with (after its title): the plumbing note
  and a blank line, or nothing for the full study. `source`: the study
  config, a result dict with "variant", or the variant itself."""
  v = source if isinstance(source, str) else variant(source)
  return [NOTE.format(v=v), ""] if v else []


def too_few_points(fit: dict | None) -> str | None:
  """Why a fitted law cannot be reported (fewer points than parameters:
  any curve through them fits, so its predictions, skill, intervals and
  allocation are arbitrary), or None when it can. `fit`: a result with
  "n_points" and "params" (llmlab.scaling.fitting, the studies' laws)."""
  if not fit or "n_points" not in fit or not fit.get("params"):
    return None
  n, p = int(fit["n_points"]), len(fit["params"])
  if n >= p:
    return None
  return (f"The {fit.get('form') or 'law'} fit has {n} points for {p} "
          "parameters: the data do not determine it, so this report leaves "
          "out its law, predictions, skill, intervals and allocation.")
