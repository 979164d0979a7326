"""Analysis of the overtraining study: best fine-tuned loss, forgetting,
sensitivity and the inflection, with a bootstrap.

Inputs are per-batch held-out sums (NLL and target counts) of every model,
so one resample of the evaluation batches applies to all models at once
(paired): differences between checkpoints then carry only the uncertainty
of the differences, not of each level.

Inflection: the earliest checkpoint after which no later checkpoint's best
fine-tuned target loss is lower by more than `tolerance` nats (0: the
argmin); none if that is the last checkpoint (still improving).
"""

from __future__ import annotations

import numpy as np

from llmlab.studies.sensitivity import mean_loss

CHINCHILLA_TOKENS_PER_PARAM = 20.0


def inflection_index(curves_BxK: np.ndarray, tolerance: float) -> np.ndarray:
  """Per row: earliest k with curve[k] - min(curve[k+1:]) <= tolerance
  (the last index when the curve is still improving at its end)."""
  c = np.asarray(curves_BxK, float)
  later_min = np.minimum.accumulate(c[:, ::-1], axis=1)[:, ::-1]
  later_min = np.concatenate([later_min[:, 1:],
                              np.full((len(c), 1), np.inf)], axis=1)
  return np.argmax(c - later_min <= tolerance, axis=1)


def _stack(rows: list[dict], part: str) -> tuple[np.ndarray, np.ndarray]:
  """(nll [..., batches], targets [batches]) of one held-out set."""
  nll = np.array([r[part]["nll"] for r in rows], float)
  return nll, np.asarray(rows[0][part]["targets"], float)


def _losses(nll, targets, counts_BxN):
  """Mean loss under resampled batch multiplicities: [B, ...]."""
  return (np.einsum("...n,bn->b...", nll, counts_BxN) /
          (counts_BxN @ targets).reshape((-1,) + (1,) * (nll.ndim - 1)))


def _resample(rng, n: int, draws: int) -> np.ndarray:
  """Row 0: the data as is; rows 1..draws: bootstrap multiplicities."""
  counts = rng.multinomial(n, np.full(n, 1.0 / n), size=draws)
  return np.concatenate([np.ones((1, n)), counts]).astype(float)


def _interval(values_B: np.ndarray, draws: int) -> tuple[float, float]:
  """5th and 95th percentile of the bootstrap rows (1..); row 0 if none."""
  if not draws:
    return float(values_B[0]), float(values_B[0])
  lo, hi = np.percentile(values_B[1:], [5, 95])
  return float(lo), float(hi)


def _bootstrap_target(nll_KxRxSxN, targets_N, draws: int, seed: int):
  """Target loss [1 + draws, K, R], averaged over fine-tuning seeds. Row 0
  is the data as is; each later row resamples the held-out batches (the
  same resample for every model: paired) and the seeds."""
  S = nll_KxRxSxN.shape[2]
  rng = np.random.default_rng(seed)
  counts = _resample(rng, len(targets_N), draws)
  seed_idx = np.concatenate([np.arange(S)[None],
                             rng.integers(0, S, (draws, S))])
  loss_BxKxRxS = _losses(nll_KxRxSxN, targets_N, counts)
  return np.take_along_axis(loss_BxKxRxS, seed_idx[:, None, None, :],
                            axis=3).mean(axis=3)


def _sensitivity_summary(rows: list[dict]) -> dict:
  """{gamma: mean, std and count of the loss increase over seeds}."""
  out = {}
  for g in sorted({r["gamma"] for r in rows}):
    inc = [r["increase"] for r in rows if r["gamma"] == g]
    out[f"{g:g}"] = {"mean": float(np.mean(inc)), "std": float(np.std(inc)),
                     "seeds": len(inc)}
  return out


def analyse(scfg, pre_cfg, info: dict, steps: list[int], pre_evals: list,
            finetunes: list[dict]) -> dict:
  """Best fine-tuned loss, forgetting, sensitivity and the inflection."""
  lrs = [float(x) for x in scfg.finetune.learning_rates]
  seeds = [int(x) for x in scfg.finetune.seeds]
  K, R, S = len(steps), len(lrs), len(seeds)
  by_key = {(f["step"], f["learning_rate"], f["seed"]): f for f in finetunes}
  grid = [by_key[(s, lr, sd)] for s in steps for lr in lrs for sd in seeds]
  tnll, tn = _stack(grid, "target")
  pnll, pn = _stack(grid, "pretrain")
  tnll, pnll = tnll.reshape(K, R, S, -1), pnll.reshape(K, R, S, -1)
  p0nll, _ = _stack(pre_evals, "pretrain")

  inf_cfg = scfg.inflection
  draws = int(inf_cfg.bootstrap)
  target_BxKxR = _bootstrap_target(tnll, tn, draws, int(inf_cfg.seed))
  best_BxK = target_BxKxR.min(axis=2)
  best_r = target_BxKxR[0].argmin(axis=1)
  idx_B = inflection_index(best_BxK, float(inf_cfg.tolerance))

  tokens_per_step = info["tokens_per_step"]
  n_total, n_nonemb = info["params_total"], info["params_nonembed"]
  tokens = [s * tokens_per_step for s in steps]
  ones = np.ones((1, len(pn)))
  pre_loss = _losses(p0nll, pn, ones)[0]                      # [K]
  after = _losses(pnll, pn, ones)[0].mean(axis=2)             # [K, R]
  forgetting = after - pre_loss[:, None]
  rows = []
  for k, step in enumerate(steps):
    entry = pre_evals[k]
    lo, hi = _interval(best_BxK[:, k], draws)
    # Paired: every model is resampled with the same batches, so this is
    # the uncertainty of the *change*, much tighter than of each level.
    delta = (best_BxK[:, k] - best_BxK[:, k - 1]) if k else None
    rows.append({
        "step": step, "tokens": tokens[k],
        "tokens_per_param": tokens[k] / n_total,
        "chinchilla_multiple": tokens[k] / (CHINCHILLA_TOKENS_PER_PARAM *
                                            n_total),
        "pretrain_loss": float(pre_loss[k]),
        "target_loss_zero_shot": mean_loss(entry["target"]),
        "best_learning_rate": lrs[best_r[k]],
        "best_target_loss": float(best_BxK[0, k]),
        "best_target_loss_90": [float(lo), float(hi)],
        "change_vs_previous": None if delta is None else {
            "best_target_loss": float(delta[0]),
            "interval_90": [float(v) for v in _interval(delta, draws)]},
        "forgetting_at_best_lr": float(forgetting[k, best_r[k]]),
        "target_loss_by_lr": {f"{lr:g}": float(target_BxKxR[0, k, r])
                              for r, lr in enumerate(lrs)},
        "forgetting_by_lr": {f"{lr:g}": float(forgetting[k, r])
                             for r, lr in enumerate(lrs)},
        "sensitivity": _sensitivity_summary(entry["sensitivity"])})
  runs = []
  for f in finetunes:
    k, r = steps.index(f["step"]), lrs.index(f["learning_rate"])
    runs.append({
        "run": f["run"], "step": f["step"], "tokens": tokens[k],
        "tokens_per_param": tokens[k] / n_total,
        "learning_rate": f["learning_rate"], "seed": f["seed"],
        "finetune_tokens": int(scfg.finetune.steps) *
                           int(scfg.finetune.batch_size) *
                           int(pre_cfg.train.seq_len),
        "target_loss_before": rows[k]["target_loss_zero_shot"],
        "target_loss": mean_loss(f["target"]),
        "pretrain_loss_before": rows[k]["pretrain_loss"],
        "pretrain_loss_after": mean_loss(f["pretrain"]),
        "forgetting": mean_loss(f["pretrain"]) - rows[k]["pretrain_loss"],
        "best_lr": bool(r == best_r[k]), "workdir": f["workdir"]})
  return {
      "pretrain": {"params_total": n_total, "params_nonembed": n_nonemb,
                   "tokens_per_step": tokens_per_step,
                   "final_tokens": int(pre_cfg.train.steps) * tokens_per_step,
                   "chinchilla_optimal_tokens":
                       CHINCHILLA_TOKENS_PER_PARAM * n_total,
                   "schedule": str(pre_cfg.optim.schedule),
                   "learning_rate": float(pre_cfg.train.learning_rate)},
      "finetune": {"learning_rates": lrs, "seeds": seeds,
                   "steps": int(scfg.finetune.steps),
                   "tokens": runs[0]["finetune_tokens"]},
      "sensitivity_definition": (
          "pretraining eval loss after adding gamma * RMS(W) * N(0, I) to "
          "every weight tensor W (each layer separately) minus before; mean "
          "and std over seeds"),
      "checkpoints": rows,
      "runs": runs,
      "sensitivity_runs": [
          dict(r, step=s, tokens=tokens[k])
          for k, s in enumerate(steps) for r in pre_evals[k]["sensitivity"]],
      "inflection": _inflection_summary(idx_B, steps, tokens, n_total,
                                        float(inf_cfg.tolerance), draws),
  }


def _inflection_summary(idx_B, steps, tokens, n_total, tol, draws) -> dict:
  """Point estimate (row 0) and bootstrap distribution (rows 1..)."""
  K = len(steps)
  point = int(idx_B[0])

  def at(k):
    if k >= K - 1:
      return None
    return {"step": steps[k], "tokens": tokens[k],
            "tokens_per_param": tokens[k] / n_total}

  out = {"definition": (
      "earliest checkpoint after which no later checkpoint's best "
      f"fine-tuned target loss is lower by more than {tol:g} nats; none if "
      "that is the last checkpoint (still improving)"),
      "tolerance": tol, "estimate": at(point), "exists": point < K - 1}
  if draws:
    boot = idx_B[1:]
    lo, hi = np.percentile(boot, [5, 95], method="nearest")
    out["bootstrap"] = {
        "samples": draws, "p_exists": float(np.mean(boot < K - 1)),
        "fraction_by_checkpoint": [
            {"step": s, "tokens": tokens[k],
             "fraction": float(np.mean(boot == k))}
            for k, s in enumerate(steps)],
        "interval_90": [at(int(lo)), at(int(hi))],
        "resampled": "held-out target batches (paired across all models) "
                     "and fine-tuning seeds"}
  return out
