"""What the overtraining study writes: overtrain.json, CSVs, plots (PNG and
TensorBoard images plus per-checkpoint scalars) and the console table.

Figures use matplotlib's object API on the Agg canvas, rendered once
(`llmlab.scaling.plots`) for both the PNG and TensorBoard.
"""

from __future__ import annotations

from llmlab import experiment
from llmlab import report_notes
from llmlab import storage
from llmlab.scaling import sweep as sweep_lib

RUN_COLUMNS = ("run", "step", "tokens", "tokens_per_param", "learning_rate",
               "seed", "finetune_tokens", "target_loss_before", "target_loss",
               "pretrain_loss_before", "pretrain_loss_after", "forgetting",
               "best_lr", "workdir")
SENS_COLUMNS = ("step", "tokens", "gamma", "seed", "base_loss", "loss",
                "increase")


def write_outputs(result: dict, workdir: str) -> None:
  """overtrain.csv, sensitivity.csv, plots, TensorBoard, overtrain.json."""
  sweep_lib.write_csv(storage.join(workdir, "overtrain.csv"), result["runs"],
                      RUN_COLUMNS)
  sweep_lib.write_csv(storage.join(workdir, "sensitivity.csv"),
                      result["sensitivity_runs"], SENS_COLUMNS)
  result["files"] = write_plots(result, workdir)
  experiment.write_json(storage.join(workdir, "overtrain.json"), result)


def _curve_figure(title: str, ylabel: str):
  from llmlab.scaling import plots
  fig, ax = plots.figure(title)
  ax.set_xscale("log")
  ax.set_xlabel("pretraining tokens")
  ax.set_ylabel(ylabel)
  return fig, ax


def _mark_inflection(ax, result: dict) -> None:
  est = result["inflection"]["estimate"]
  if est is not None:
    ax.axvline(est["tokens"], color="tab:red", ls=":", lw=1.5,
               label="inflection")


def figures(result: dict) -> dict:
  """name -> matplotlib Figure of the study's curves."""
  ck = result["checkpoints"]
  x = [c["tokens"] for c in ck]
  lrs = [f"{lr:g}" for lr in result["finetune"]["learning_rates"]]
  out = {}
  fig, ax = _curve_figure("fine-tuned target loss vs pretraining tokens",
                          "target eval loss (nats/token)")
  for lr in lrs:
    ax.plot(x, [c["target_loss_by_lr"][lr] for c in ck], "o-", lw=0.8,
            ms=3, alpha=0.6, label=f"lr {lr}")
  ax.fill_between(x, [c["best_target_loss_90"][0] for c in ck],
                  [c["best_target_loss_90"][1] for c in ck], color="black",
                  alpha=0.15, label="best: 90% bootstrap")
  ax.plot(x, [c["best_target_loss"] for c in ck], "o-", color="black",
          lw=2, label="best over lr")
  _mark_inflection(ax, result)
  ax.legend(fontsize=8)
  out["finetune"] = fig
  fig, ax = _curve_figure("forgetting: pretraining eval loss increase",
                          "loss after fine-tuning - before (nats/token)")
  for lr in lrs:
    ax.plot(x, [c["forgetting_by_lr"][lr] for c in ck], "o-", lw=0.8, ms=3,
            label=f"lr {lr}")
  ax.plot(x, [c["forgetting_at_best_lr"] for c in ck], "o-", color="black",
          lw=2, label="at best lr")
  ax.legend(fontsize=8)
  out["forgetting"] = fig
  fig, ax = _curve_figure("sensitivity: loss increase under relative noise",
                          "pretraining eval loss increase (nats/token)")
  for g in ck[0]["sensitivity"]:
    ax.errorbar(x, [c["sensitivity"][g]["mean"] for c in ck],
                yerr=[c["sensitivity"][g]["std"] for c in ck], fmt="o-",
                ms=3, capsize=2, label=f"gamma {g}")
  if all(c["sensitivity"][g]["mean"] > 0 for c in ck for g in c["sensitivity"]):
    ax.set_yscale("log")  # gammas span orders of magnitude of increase
  ax.legend(fontsize=8)
  out["sensitivity"] = fig
  fig, ax = _curve_figure("held-out losses of the checkpoints",
                          "eval loss (nats/token)")
  ax.plot(x, [c["pretrain_loss"] for c in ck], "o-", label="pretraining data")
  ax.plot(x, [c["target_loss_zero_shot"] for c in ck], "o--",
          label="target data (zero-shot)")
  ax.plot(x, [c["best_target_loss"] for c in ck], "o-", color="black",
          label="target data, best fine-tuned")
  _mark_inflection(ax, result)
  ax.legend(fontsize=8)
  out["checkpoints"] = fig
  return out


TB_SCALARS = {"pretrain_loss": "overtrain/pretrain_eval_loss",
              "target_loss_zero_shot": "overtrain/target_loss_zero_shot",
              "best_target_loss": "overtrain/best_finetuned_target_loss",
              "forgetting_at_best_lr": "overtrain/forgetting_at_best_lr"}


def write_plots(result: dict, workdir: str) -> list[str]:
  """PNGs in `workdir`; the same images and per-checkpoint scalars (x =
  pretraining tokens) in workdir/tensorboard, replacing the previous
  invocation's events there."""
  from llmlab.scaling import plots  # matplotlib: only when plotting
  scalars = []
  for c in result["checkpoints"]:
    tokens = int(c["tokens"])
    scalars += [(tag, c[key], tokens) for key, tag in TB_SCALARS.items()]
    scalars += [(f"overtrain/sensitivity_gamma_{g}", v["mean"], tokens)
                for g, v in c["sensitivity"].items()]
  return plots.save(figures(result), workdir, prefix="overtrain",
                    scalars=scalars, fresh=True)


def table(result: dict) -> str:
  """The per-checkpoint summary as a markdown table, and the inflection."""
  ck = result["checkpoints"]
  gammas = list(ck[0]["sensitivity"])
  head = ("| step | tokens | tokens/param | pretrain loss | target zero-shot "
          "| best lr | best fine-tuned target [90%] | change vs previous "
          "[90%] | forgetting | " +
          " | ".join(f"sens. g={g}" for g in gammas) + " |")
  lines = [*report_notes.note(result), head,
           "|" + "---:|" * (9 + len(gammas))]
  for c in ck:
    lo, hi = c["best_target_loss_90"]
    lines.append(
        f"| {c['step']} | {c['tokens']:,} | {c['tokens_per_param']:.3g} | "
        f"{c['pretrain_loss']:.4f} | {c['target_loss_zero_shot']:.4f} | "
        f"{c['best_learning_rate']:g} | {c['best_target_loss']:.4f} "
        f"[{lo:.4f}, {hi:.4f}] | {_change(c)} | "
        f"{c['forgetting_at_best_lr']:+.4f} | " +
        " | ".join(f"{c['sensitivity'][g]['mean']:.4f}" for g in gammas) +
        " |")
  inf = result["inflection"]
  est = inf["estimate"]
  lines.append("")
  lines.append("inflection: " + (
      f"step {est['step']} ({est['tokens']:,} tokens, "
      f"{est['tokens_per_param']:.3g} tokens/param)" if est else
      "none (best fine-tuned target loss still improving at the last "
      "checkpoint)"))
  boot = inf.get("bootstrap")
  if boot:
    fmt = lambda a: f"step {a['step']}" if a else "none"
    lines.append(
        f"bootstrap ({boot['samples']} samples): P(inflection) = "
        f"{boot['p_exists']:.2f}; 90% interval [{fmt(boot['interval_90'][0])}"
        f", {fmt(boot['interval_90'][1])}]")
  return "\n".join(lines)


def _change(c: dict) -> str:
  d = c["change_vs_previous"]
  if d is None:
    return "-"
  lo, hi = d["interval_90"]
  return f"{d['best_target_loss']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
