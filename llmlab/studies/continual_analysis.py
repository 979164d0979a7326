"""Analysis of the continual-learning study (llmlab/studies/continual.py).

Records: one per eval of a continued run (metrics.jsonl rows with
eval_loss_A and eval_loss_B), with the run's design (source, target,
method, replay ratio r, seed) and sizes (N_t: the run's non-embedding
params, N_s: its source's).

Laws (llmlab/scaling/forms.py: cl_transfer, cl_p2, cl_dcpt, cl_anchor_static,
cl_anchor; the anchored forms also take the source's own final loss on the
domain, `source_loss_{A,B}` of each record) are fitted per
domain -- L_B (learning the new domain, share = 1 - r) and L_A (forgetting
the old one, share = r) -- by the project's fitter (`fit.minimize`: Huber
on log loss, L-BFGS from the form's grid of starts, vmapped in one call) on
the law grid's runs (`law_method` starts and `full` continues; cl_transfer
also sees the scratch runs, its D_T = 0 anchor) and their seed re-runs.
Held out: fit on every source but the largest, predict the largest
source's runs; ARE over each run's evals at >= `holdout_min_fraction` of
its tokens (Choshen et al.), naive = the largest fitted source's run of
the same target, method and r at the same tokens (log-interpolated),
skill = 1 - ARE / naive ARE. The law is chosen without the largest
source: with >= 4 sources, the form whose L_B + L_A ARE is smallest when
each other source is predicted from the rest (the largest left out of
every fit; `selection_are`); with fewer, the form with the smallest
held-out ARE. Each other source is held out in turn too (`holdout_each`;
naive = the nearest source's run).
"""

from __future__ import annotations

import math

import numpy as np

from llmlab import runs
from llmlab.compress import report as compress_report
from llmlab.scaling import curves as curves_lib
from llmlab.scaling import fit as fit_lib
from llmlab.scaling import forms as forms_lib
from llmlab.studies import continual_design as design

COLUMNS = ("run", "role", "source", "target", "method", "distill", "replay",
           "seed", "params", "source_params", "start", "step", "tokens",
           "loss_A", "loss_B", "loss", "source_loss_A", "source_loss_B",
           "lr_tokens")


# ---------------------------------------------------------------- records


def source_record(workdir: str) -> dict:
  """A source's size and final losses on both domains (its last eval)."""
  _, raw = runs.read_config(workdir)
  evals = [r for r in runs.metrics_rows(workdir) if "eval_loss_A" in r]
  if not evals:
    raise ValueError(f"{workdir}: no eval row with eval_loss_A (trained "
                     "without data.domains?)")
  last = max(evals, key=lambda r: r["step"])
  return {"params": float(raw["model_info"]["params_nonembed"]),
          "loss_A": float(last["eval_loss_A"]),
          "loss_B": float(last["eval_loss_B"]),
          "shift": float(last["eval_loss_B"]) - float(last["eval_loss_A"])}


def run_records(r, workdir: str, model: dict, source: dict | None) -> list:
  """One record per eval row of a finished continued run."""
  del model
  _, raw = runs.read_config(workdir)
  n_t = float(raw["model_info"]["params_nonembed"])
  lr_tokens = rate_weighted_tokens(raw, workdir)
  out = []
  for row in runs.metrics_rows(workdir):
    if "eval_loss_A" not in row or "eval_loss_B" not in row:
      continue
    step = int(row["step"])
    out.append(dict(
        run=r.name, role=r.role, source=r.source, target=r.target,
        method=r.method, distill=bool(r.distill), replay=float(r.replay),
        seed=int(r.seed), params=n_t,
        source_params=float(source["params"]) if source else n_t,
        start=0 if r.method == "scratch" else 1, step=step,
        tokens=float(row["tokens"]), loss_A=float(row["eval_loss_A"]),
        loss_B=float(row["eval_loss_B"]), loss=float(row["eval_loss"]),
        # the source's own final losses (what a start knows before it
        # continues; a scratch run's are its own size's: unused)
        source_loss_A=float(source["loss_A"]) if source else math.nan,
        source_loss_B=float(source["loss_B"]) if source else math.nan,
        lr_tokens=lr_tokens(step, float(row["tokens"]))))
  return out


def rate_weighted_tokens(raw: dict, workdir: str):
  """lr_tokens(step, tokens) of a run: its tokens weighted by each update's
  rate over the peak (curves.run_schedule gives the rates its updates
  used); cl_anchor_lr reads it."""
  eta_S, _ = curves_lib.run_schedule(raw, workdir)
  area = np.concatenate([[0.0], np.cumsum(eta_S)]) / (
      float(eta_S.max(initial=0.0)) or 1.0)

  def weighted(step, tokens):
    step = min(step, len(eta_S))
    return tokens * area[step] / step if step else 0.0
  return weighted


# -------------------------------------------------------------- re-inits


def reinit(frm: str, cfg, out: str, kind: str, *, shrink: float,
           perturb: float, layers: int, seed: int) -> None:
  """Write a start directory: the params of run `frm` re-initialised by
  `kind` (shrink_perturb: shrink * theta + perturb * theta_fresh, Ash &
  Adams 2020; reinit_top / reinit_bottom: the last / first `layers` layers
  replaced by a fresh init), as prune writes its pruned runs."""
  import jax  # noqa: PLC0415
  from llmlab import api  # noqa: PLC0415
  from llmlab import steps as steps_lib  # noqa: PLC0415
  from llmlab import train  # noqa: PLC0415
  from llmlab.compress import prune as prune_lib  # noqa: PLC0415
  from llmlab.compress import slicing  # noqa: PLC0415
  params = jax.device_get(api.load(frm).params)
  cfg, data, setup = train.prepare(cfg)
  fresh = jax.device_get(steps_lib.init_state(setup, seed + 7919)["params"])
  n = int(cfg.model.num_layers)
  if kind == "shrink_perturb":
    new = jax.tree.map(lambda p, f: shrink * np.asarray(p) +
                       perturb * np.asarray(f), params, fresh)
  elif kind in ("reinit_top", "reinit_bottom"):
    idx = (np.arange(n - layers, n) if kind == "reinit_top"
           else np.arange(layers))

    def swap(path, p, f):
      p = np.array(p)
      if getattr(path[0], "key", None) == "layers":
        p[idx] = np.asarray(f)[idx]
      return p
    new = jax.tree_util.tree_map_with_path(swap, params, fresh)
  else:
    raise ValueError(f"unknown re-initialisation {kind!r}")
  info = {"source": frm, "method": kind, "shrink": shrink, "perturb": perturb,
          "layers": layers, "seed": seed, "wall_s": 0.0}
  prune_lib.write_run(out, cfg, setup, data, new, info,
                      slicing.identity(setup.model_cfg))


# ------------------------------------------------------------------ fits


def _col(rows, key):
  return np.asarray([r[key] for r in rows], np.float64)


def inputs(rows: list[dict], domain: str, form) -> dict:
  """The form's inputs (see forms.py's continual section) for `rows`."""
  share = 1.0 - _col(rows, "replay") if domain == "B" else _col(rows, "replay")
  cols = {"params": np.log(_col(rows, "params")),
          # a scratch run has no source: 0 (its start = 0 input, or its
          # absence from the fit, keeps the value out of any prediction)
          "source_loss": (np.nan_to_num(np.log(_col(rows, f"source_loss_{domain}")))
                          if "source_loss" in form.inputs else None),
          "tokens": np.log(_col(rows, "tokens")),
          "source_params": np.log(_col(rows, "source_params")),
          "share": share, "start": _col(rows, "start"),
          "lr_tokens": (np.log(_col(rows, "lr_tokens"))
                        if "lr_tokens" in form.inputs else None)}
  return {k: cols[k] for k in form.inputs}


def fit(form_name: str, rows: list[dict], domain: str) -> dict:
  """Best-of-grid fit of one form to one domain's losses of `rows`."""
  return fit_many(form_name, [(rows, domain)])[0]


def fit_many(form_name: str, sets: list[tuple[list[dict], str]]) -> list:
  """Fits of one form to several (rows, domain) data sets in one vmapped
  call of the fitter (one compiled program; each set padded with weight-0
  points to the longest)."""
  law = forms_lib.get_form(form_name)
  n = max(len(rows) for rows, _ in sets)
  pad = lambda a: np.pad(np.asarray(a, np.float64), (0, n - len(a)))
  xs = [inputs(rows, domain, law) for rows, domain in sets]
  x = {k: np.stack([pad(xi[k]) for xi in xs]) for k in law.inputs}
  y = np.stack([pad(np.log(_col(rows, f"loss_{domain}")))
                for rows, domain in sets])
  w = np.stack([pad(np.ones(len(rows))) for rows, _ in sets])
  starts = law.grid_starts()
  theta, f, _, conv = fit_lib.minimize(
      law, np.broadcast_to(starts, (len(sets),) + starts.shape), w, x, y,
      keep=min(8, len(starts)))
  out = []
  for g, (rows, _) in enumerate(sets):
    i = int(np.argmin(np.where(np.isnan(f[g]), np.inf, f[g])))
    out.append({"form": form_name, "theta": theta[g, i].tolist(),
                "objective": float(f[g, i]), "converged": bool(conv[g, i]),
                "params": forms_lib.natural_params(law, theta[g, i]),
                "n_points": len(rows)})
  return out


def predict(fitted: dict, rows: list[dict], domain: str) -> np.ndarray:
  law = forms_lib.get_form(fitted["form"])
  x = inputs(rows, domain, law)
  return np.exp(fit_lib.predict_log(law, np.asarray(fitted["theta"])[None],
                                    x)[0])


def _fit_rows(records, form_name: str, exclude_source: str = "",
              exclude_also: tuple = ()) -> list:
  """The law grid's rows, and the seed re-runs of its cells (the same
  start method, more measurements of the same curve: they average out
  some of one run's noise), but those of `exclude_source` and
  `exclude_also`."""
  out = set(exclude_also) | ({exclude_source} if exclude_source else set())
  law = forms_lib.get_form(form_name)
  cells = {(r["method"], r["distill"]) for r in records if r["role"] == "law"}
  return [r for r in records
          if (r["role"] == "law" or (r["role"] == "seed" and
                                     (r["method"], r["distill"]) in cells))
          and r["tokens"] > 0
          and (r["start"] == 1 or "start" in law.inputs)
          and r["source"] not in out]


def _late_mask(rows, min_fraction: float) -> np.ndarray:
  final = {}
  for r in rows:
    final[r["run"]] = max(final.get(r["run"], 0.0), r["tokens"])
  return np.asarray([r["tokens"] >= min_fraction * final[r["run"]]
                     for r in rows])


def _curve_at(rows, run: str, tokens: float, domain: str,
              loss_of=None) -> float | None:
  """`run`'s loss at `tokens`, interpolated in log tokens; `loss_of(row)`
  replaces each row's own loss (see `_seed_means`)."""
  mine = sorted((r for r in rows if r["run"] == run),
                key=lambda r: r["tokens"])
  if not mine:
    return None
  loss = [loss_of(r) for r in mine] if loss_of else _col(mine, f"loss_{domain}")
  return float(np.interp(math.log(tokens), np.log(_col(mine, "tokens")), loss))


def _cell(r) -> tuple:
  """A run's cell: everything but its seed."""
  return (r["source"], r["target"], r["method"], r["replay"], r["distill"])


def _seed_means(records, domain: str):
  """row -> its loss averaged over the seeds its cell was trained with, at
  the row's tokens (a law predicts the expected curve; one seed's carries
  its own noise)."""
  by = {}
  for o in records:
    by.setdefault((_cell(o), o["tokens"]), []).append(o[f"loss_{domain}"])
  means = {k: float(np.mean(v)) for k, v in by.items()}
  return lambda r: means[(_cell(r), r["tokens"])]


def _match(rows, r, source: str) -> str:
  """Name of the run like `r` but from `source` (the naive forecast)."""
  for o in rows:
    if (o["source"] == source and o["method"] == r["method"] and
        o["replay"] == r["replay"] and o["distill"] == r["distill"] and
        o["seed"] == r["seed"] and
        (o["target"] == r["target"] or
         (r["method"] == "full" and o["method"] == "full"))):
      return o["run"]
  return ""


def _largest(sources: dict) -> tuple[list, str]:
  """(sources from smallest to largest, the largest)."""
  order = sorted(sources, key=lambda s: sources[s]["params"])
  return order, order[-1]


def _nearest(sources: dict, held: str) -> str:
  """The source nearest `held` in log N_s (the naive forecast's source when
  `held` is left out; the larger on a tie)."""
  others = [s for s in sources if s != held]
  gap = lambda s: (abs(math.log(sources[s]["params"] /
                                sources[held]["params"])),
                   -sources[s]["params"])
  return min(others, key=gap)


def _test_rows(records, source: str) -> list:
  """`source`'s law runs: the rows a held-out check predicts."""
  return [r for r in records if r["role"] == "law" and r["start"] == 1 and
          r["source"] == source and r["tokens"] > 0]


def holdout_rows(records, sources: dict, form_name: str, held_out: str = ""):
  """(fit rows: every source but `held_out` (default: the largest), test
  rows: its law runs)."""
  held_out = held_out or _largest(sources)[1]
  return (_fit_rows(records, form_name, exclude_source=held_out),
          _test_rows(records, held_out))


def _scored_loss(scfg, records, domain: str):
  """row -> the measured loss a prediction is scored against: its cell's
  seed mean when the study re-runs law cells (`law_seeds`), else None
  (the row's own loss)."""
  return _seed_means(records, domain) if scfg.get("law_seeds") else None


def _actual(test, domain: str, loss_of) -> np.ndarray:
  return (np.asarray([loss_of(r) for r in test]) if loss_of
          else _col(test, f"loss_{domain}"))


def late_are(scfg, records, fitted: dict, test, domain: str) -> float:
  """ARE of `fitted` on `test`'s evals at >= holdout_min_fraction of each
  run's tokens."""
  actual = _actual(test, domain, _scored_loss(scfg, records, domain))
  err = np.abs(predict(fitted, test, domain) - actual) / actual
  return float(np.mean(err[_late_mask(test, float(scfg.holdout_min_fraction))]))


def holdout(scfg, records, sources: dict, fitted: dict, domain: str,
            held_out: str = "") -> dict:
  """`fitted` on the other sources predicts `held_out`'s law runs (default:
  the largest source's, from the smaller ones; ARE, naive ARE, skill). The
  naive forecast is the nearest fitted source's run (the largest fitted
  one when the largest is held out)."""
  order, largest = _largest(sources)
  held_out = held_out or largest
  second = _nearest(sources, held_out)  # for the largest: the largest fitted
  train_rows, test = holdout_rows(records, sources, fitted["form"], held_out)
  out = {"fit_sources": [s for s in order if s != held_out],
         "predicted_source": held_out, "naive_source": second,
         "n_fit": len(train_rows), "n_test": len(test)}
  if not train_rows or not test:
    return dict(out, are=None, naive_are=None, skill=None)
  pred = predict(fitted, test, domain)
  loss_of = _scored_loss(scfg, records, domain)
  actual = _actual(test, domain, loss_of)
  late = _late_mask(test, float(scfg.holdout_min_fraction))
  err = np.abs(pred - actual) / actual
  naive = []
  for r in test:
    other = _match(records, r, second)
    naive.append(_curve_at(records, other, r["tokens"], domain, loss_of)
                 if other else None)
  have = np.asarray([v is not None for v in naive]) & late
  naive_err = (np.abs(np.asarray([v if v is not None else np.nan
                                  for v in naive]) - actual) / actual)
  are = float(np.mean(err[late]))
  naive_are = float(np.mean(naive_err[have])) if have.any() else None
  skill = (1.0 - are / naive_are) if naive_are else None
  per_run = {}
  for r, e, m in zip(test, err, late):
    if m:
      per_run.setdefault(r["run"], []).append(float(e))
  return dict(out, are=are, naive_are=naive_are, skill=skill,
              are_naive_subset=float(np.mean(err[have])) if have.any()
              else None,
              per_run={k: float(np.mean(v)) for k, v in per_run.items()},
              objective=fitted["objective"])


# -------------------------------------------------------------- measures


def _final(records, run: str) -> dict | None:
  mine = [r for r in records if r["run"] == run]
  return max(mine, key=lambda r: r["tokens"]) if mine else None


def _tokens_to(records, run: str, level: float) -> float | None:
  mine = [r for r in records if r["run"] == run]
  return compress_report.tokens_to_reach(_col(mine, "tokens"),
                                         _col(mine, "loss_B"), level)


def _scratch_of(records, r) -> str:
  for o in records:
    if (o["method"] == "scratch" and not o["distill"] and
        o["target"] == r["target"] and
        o["replay"] == r["replay"] and o["seed"] == r["seed"]):
      return o["run"]
  return ""


def methods(scfg, records, sources) -> dict:
  """Per start method at each `method_at` cell: tokens to reach the
  scratch run's final L_B, speed-up, final losses and forgetting."""
  cells, ranking = {}, {}
  for cell in scfg.method_at:
    src, tgt, _ = design.parse_cell(scfg, cell, "method_at", False)
    names = {}
    for m in list(scfg.methods) + [f"{d}+distill" for d in
                                   scfg.distill_methods]:
      distill = m.endswith("+distill")
      method = m[:-len("+distill")] if distill else m
      r = design.cell_run(scfg, src, tgt, float(scfg.replay), method,
                              int(scfg.continue_seed), "method", distill)
      last = _final(records, r.name)
      if last is None:
        continue
      # One level per cell: the final L_B of the target shape from scratch
      # (next-token loss), which `full` (the source's shape) is held to too.
      scratch = design.cell_run(scfg, src, tgt, float(scfg.replay),
                                    "scratch", int(scfg.continue_seed),
                                    "method").name
      ref = _final(records, scratch)
      level = ref["loss_B"] if ref else None
      reach = _tokens_to(records, r.name, level) if level else None
      first = min(x["tokens"] for x in records if x["run"] == r.name)
      names[m.replace("+distill", "_distill")] = {
          "run": r.name, "final_loss_B": last["loss_B"],
          "final_loss_A": last["loss_A"], "tokens": last["tokens"],
          "forgetting": last["loss_A"] - sources[src]["loss_A"],
          "scratch_final_loss_B": level,
          "tokens_to_match_scratch": reach,
          # reached by the first eval: the true count is at most this
          "reached_at_first_eval": bool(reach is not None and reach <= first),
          "speedup_vs_scratch": (last["tokens"] / reach) if reach else None}
    cells[cell] = names
    ranking[cell] = sorted(names, key=lambda k: names[k]["final_loss_B"])
  first = scfg.method_at[0] if scfg.method_at else None
  out = {name: dict(v, by_cell={c: cells[c].get(name) for c in cells})
         for name, v in (cells.get(first) or {}).items()}
  orders = [ranking[c] for c in ranking]
  return {"methods": out, "ranking": ranking,
          "ranking_holds": (all(o == orders[0] for o in orders)
                            if len(orders) > 1 else None)}


def seeds(scfg, records) -> dict:
  """Seed spread at the first method cell: final L_B, L_A and tokens to
  match scratch of each method with re-runs."""
  if not scfg.method_at:
    return {}
  src, tgt, _ = design.parse_cell(scfg, scfg.method_at[0], "method_at",
                                      False)
  out = {}
  all_seeds = [int(scfg.continue_seed)] + [int(s) for s in scfg.extra_seeds]
  for m in scfg.seed_methods:
    finals = []
    for s in all_seeds:
      r = design.cell_run(scfg, src, tgt, float(scfg.replay), m, s,
                              "seed")
      last = _final(records, r.name)
      if last is not None:
        finals.append(last)
    if not finals:
      continue
    b, a = _col(finals, "loss_B"), _col(finals, "loss_A")
    out[m] = {"seeds": len(finals), "loss_B": b.tolist(), "loss_A": a.tolist(),
              "loss_B_mean": float(b.mean()),
              "loss_B_std": float(b.std(ddof=1)) if len(b) > 1 else None,
              "loss_A_mean": float(a.mean()),
              "loss_A_std": float(a.std(ddof=1)) if len(a) > 1 else None}
  return out


def savings(records, sources) -> list[dict]:
  """Tokens saved vs scratch on the law grid, by compression ratio: tokens
  the start needs to reach scratch's final L_B, and the crossover (the
  first eval at which scratch's L_B is at or below the start's; None: not
  within the run)."""
  out = []
  for name in sorted({r["run"] for r in records
                      if r["role"] == "law" and r["start"] == 1}):
    last = _final(records, name)
    scratch = _scratch_of(records, last)
    if not scratch:
      continue
    ref = _final(records, scratch)
    reach = _tokens_to(records, name, ref["loss_B"])
    mine = sorted((r for r in records if r["run"] == name),
                  key=lambda r: r["tokens"])
    cross = None
    for r in mine:
      s = _curve_at(records, scratch, r["tokens"], "B")
      if s is not None and s <= r["loss_B"]:
        cross = r["tokens"]
        break
    out.append({"run": name, "source": last["source"],
                "target": last["target"], "method": last["method"],
                "replay": last["replay"],
                "compression": sources[last["source"]]["params"] /
                               last["params"],
                "tokens": last["tokens"], "final_loss_B": last["loss_B"],
                "scratch_final_loss_B": ref["loss_B"],
                "tokens_to_match_scratch": reach,
                "tokens_saved_fraction": (1 - reach / last["tokens"])
                if reach else None,
                "crossover_tokens": cross})
  return out


def tradeoff(records, sources) -> list[dict]:
  """Learning vs forgetting against the replay ratio: every law cell of a
  source and target measured at more than one ratio."""
  finals = [_final(records, n) for n in sorted(
      {r["run"] for r in records if r["role"] == "law" and r["start"] == 1})]
  cells = {}
  for f in finals:
    cells.setdefault((f["source"], f["target"]), []).append(f)
  out = []
  for (src, tgt), fs in sorted(cells.items()):
    if len({f["replay"] for f in fs}) < 2:
      continue
    for f in sorted(fs, key=lambda f: f["replay"]):
      out.append({"source": src, "target": tgt, "replay": f["replay"],
                  "final_loss_B": f["loss_B"], "final_loss_A": f["loss_A"],
                  "forgetting": f["loss_A"] - sources[src]["loss_A"],
                  "learning": sources[src]["loss_B"] - f["loss_B"]})
  return out


def predict_replay(scfg, records, sources, law_a: dict, law_b: dict) -> dict:
  """The smallest replay ratio (0.01 grid) at which the fitted L_A law keeps
  forgetting (L_A - the source's L_A) within the budget after the full
  continued run at `replay_at`; and the L_B the law expects there.

  Why a margin: a law fitted across sources can sit below one cell's
  forgetting at every r (cl_anchor did, by 0.004-0.028 nats, and its bare
  prediction missed the budget). The cell's own runs at the ratios the
  plan trained say by how much, so the budget is met by the law's
  forgetting plus the largest under-prediction at their final evals."""
  src, tgt = design.replay_cell(scfg)
  r = design.replay_check_runs(scfg, float(scfg.replay))[0]
  like = [x for x in records if x["source"] == src and
          (x["target"] == r.target) and x["method"] == r.method and
          not x["distill"]]
  budget = float(scfg.forget_budget)
  out = {"budget": budget, "source": src, "target": tgt,
         "source_loss_A": sources[src]["loss_A"], "predicted_ratio": None,
         "measured_forgetting": None}
  if not like:
    out["why_none"] = f"no law run of {src}/{tgt} to take N_t from"
    return out
  seeded = bool(scfg.get("law_seeds"))
  margin, under = _replay_margin(law_a, like,
                                 _seed_means(records, "A") if seeded else None)
  tokens = float(int(scfg.continue_steps) *
                 int(scfg.base.train.batch_size) *
                 int(scfg.base.train.seq_len))
  ratios = np.round(np.arange(0, 101) / 100.0, 2)
  # (the last eval's row: its rate-weighted tokens are the whole run's)
  end = max(like, key=lambda x: x["tokens"])
  rows = [dict(end, replay=float(q), tokens=tokens, start=1) for q in ratios]
  la = predict(law_a, rows, "A")
  lb = predict(law_b, rows, "B")
  forget = la - sources[src]["loss_A"]
  law_ok = np.flatnonzero(forget <= budget)
  ok = np.flatnonzero(forget + margin <= budget)
  out["curve"] = {"replay": ratios.tolist(), "forgetting": forget.tolist(),
                  "loss_B": lb.tolist()}
  out.update(margin=margin, margin_runs=under,
             margin_of="seed means" if seeded else "runs",
             law_ratio=float(ratios[law_ok[0]]) if len(law_ok) else None)
  if len(ok):
    i = int(ok[0])
    out.update(predicted_ratio=float(ratios[i]),
               predicted_forgetting=float(forget[i]),
               predicted_bound=float(forget[i] + margin),
               predicted_loss_B=float(lb[i]))
  else:
    out["why_none"] = ("the law's forgetting plus its margin exceeds the "
                       "budget at every r")
  return out


def _replay_margin(law_a: dict, like: list[dict], loss_of=None) -> tuple[float, dict]:
  """The largest under-prediction of L_A (measured - law, >= 0) over the
  replay cell's trained runs, each at its final eval; and each run's.
  With seed re-runs (`loss_of`: `_seed_means`), one entry per trained
  ratio, its seed mean: the law predicts the expected curve, and the
  worst single seed would make the margin one run's noise (the quick
  study's s5 whole at r = 0: 0.019, 0.106, 0.014 nats under by seed)."""
  final = [x for x, last in zip(like, _late_mask(like, 1.0)) if last]
  if loss_of:  # one run per ratio (its lowest seed) stands for its cell
    by_cell = {}
    for x in final:
      by_cell.setdefault(_cell(x), []).append(x)
    final = [min(runs, key=lambda x: x["seed"]) for runs in by_cell.values()]
  la = predict(law_a, final, "A")
  under = {x["run"]: float((loss_of(x) if loss_of else x["loss_A"]) - v)
           for x, v in zip(final, la)}
  return max([0.0, *under.values()]), under


def measure_replay(result: dict, measured: list[dict], sources) -> None:
  rep = result["replay"]
  if not measured:
    return
  last = max(measured, key=lambda r: r["tokens"])
  forget = last["loss_A"] - sources[last["source"]]["loss_A"]
  for v in rep.get("by_form", {}).values():
    if v.get("predicted_ratio") == rep.get("predicted_ratio"):
      v["measured_forgetting"] = forget
  rep.update(measured_run=last["run"], measured_forgetting=forget,
             measured_loss_B=last["loss_B"],
             within_budget=bool(forget <= rep["budget"]),
             forgetting_error=(forget - rep["predicted_forgetting"]))


# ---------------------------------------------------------------- analyse


def selection_sources(sources: dict) -> list:
  """The sources the form is chosen on: every one but the largest, when
  there are >= 3 of them (each is predicted from >= 2 others); else none
  (the choice falls back to the held-out check)."""
  order, largest = _largest(sources)
  others = [s for s in order if s != largest]
  return others if len(others) >= 3 else []


def fit_groups(records, sources: dict, name: str) -> dict:
  """The row sets form `name` is fitted to, keyed: "" = every source; a
  source s = every source but s (the held-out checks: the largest, and
  each other in turn, `holdout_each`, so that a form is not judged on one
  source alone); "select:s" = every source but s and the largest (the
  form's choice, `selection_sources`: the held-out check then scores a law
  its source did not help choose)."""
  order, largest = _largest(sources)
  groups = {"": _fit_rows(records, name)}
  for s in [largest] + ([s for s in order if s != largest] if len(order) > 2 else []):
    rows = holdout_rows(records, sources, name, s)[0]
    if rows:
      groups[s] = rows
  for s in selection_sources(sources):
    groups["select:" + s] = _fit_rows(records, name, s, (largest,))
  return groups


def choose_form(forms: dict) -> tuple[str, dict]:
  """(the chosen form, each form's score): the smallest L_B + L_A ARE,
  averaged over the selection sources where there are any, else the
  held-out ARE on the largest source. A form with a missing or non-finite
  ARE scores inf."""
  def score(per):
    if any(per[d].get("selection_are") for d in ("B", "A")):
      h = [np.mean(list(per[d]["selection_are"].values())) for d in ("B", "A")]
    else:
      h = [per[d]["holdout"]["are"] for d in ("B", "A")]
    ok = all(v is not None and np.isfinite(v) for v in h)
    return float(sum(h)) if ok else math.inf
  scores = {n: score(per) for n, per in forms.items()}
  return min(scores, key=scores.get), scores


def analyse(scfg, records: list[dict], sources: dict) -> dict:
  forms = {}
  largest = _largest(sources)[1]
  inner = selection_sources(sources)
  for name in scfg.forms:
    groups = fit_groups(records, sources, name)
    keys = [(g, d) for g in groups for d in ("B", "A")]
    fits = dict(zip(keys, fit_many(name, [(groups[g], d) for g, d in keys])))
    per = {}
    for domain in ("B", "A"):
      by = {s: holdout(scfg, records, sources, fits[s, domain], domain, s)
            for s in groups if s and not s.startswith("select:")}
      h = by.get(largest, {"are": None, "naive_are": None, "skill": None})
      select = {s: late_are(scfg, records, fits["select:" + s, domain],
                            _test_rows(records, s), domain) for s in inner}
      per[domain] = {"fit": fits["", domain], "holdout": h,
                     "holdout_each": {s: _short(v) for s, v in by.items()},
                     "selection_are": select}
    forms[name] = per
  chosen, scores = choose_form(forms)
  law = {"form": chosen,
         "chosen_by": (f"smallest ARE over L_B + L_A, each of {', '.join(inner)} "
                       f"predicted from the others ({largest} left out of "
                       "every fit), averaged" if inner else
                       "smallest held-out ARE, L_B + L_A"),
         "selection_score": scores,
         "params": {"B": forms[chosen]["B"]["fit"]["params"],
                    "A": forms[chosen]["A"]["fit"]["params"]},
         "theta": {"B": forms[chosen]["B"]["fit"]["theta"],
                   "A": forms[chosen]["A"]["fit"]["theta"]}}
  m = methods(scfg, records, sources)
  return {
      "domains": {"A": str(scfg.domain_a), "B": str(scfg.domain_b)},
      "shift": {s: v["shift"] for s, v in sources.items()},
      "sources": sources,
      "forms": {n: {d: {"params": forms[n][d]["fit"]["params"],
                        "objective": forms[n][d]["fit"]["objective"],
                        "converged": forms[n][d]["fit"]["converged"],
                        "n_points": forms[n][d]["fit"]["n_points"],
                        "holdout": forms[n][d]["holdout"],
                        "holdout_each": forms[n][d]["holdout_each"],
                        "selection_are": forms[n][d]["selection_are"]}
                    for d in ("B", "A")} for n in forms},
      "law": law,
      "holdout": _short(forms[chosen]["B"]["holdout"]),
      "forgetting_holdout": _short(forms[chosen]["A"]["holdout"]),
      "methods": m["methods"], "ranking": m["ranking"],
      "ranking_holds_across_sources": m["ranking_holds"],
      "seeds": seeds(scfg, records),
      "savings": savings(records, sources),
      "tradeoff": tradeoff(records, sources),
      "replay": dict(predict_replay(
          scfg, records, sources,
          {"form": chosen, "theta": law["theta"]["A"]},
          {"form": chosen, "theta": law["theta"]["B"]}), form=chosen,
          by_form={n: {k: v for k, v in predict_replay(
              scfg, records, sources,
              {"form": n, "theta": forms[n]["A"]["fit"]["theta"]},
              {"form": n, "theta": forms[n]["B"]["fit"]["theta"]}).items()
                       if k.startswith("predicted")}
                   for n in forms}),
      "holdout_min_fraction": float(scfg.holdout_min_fraction),
      "replay_default": float(scfg.replay),
  }


def _short(h: dict) -> dict:
  return {k: h.get(k) for k in ("are", "naive_are", "skill", "n_fit",
                                "n_test", "fit_sources", "predicted_source",
                                "naive_source", "per_run")}
