"""usage: llmlab schedule --fit=DIR/fit.json --steps=S --peak_lr=LR
           --out=schedule.json [--warmup_steps=W] [--params=N]

A learning-rate schedule chosen by a fitted law of the loss curve
(`llmlab fit --form=multipower`): minimises the law's predicted final loss
over non-increasing rates in [0, peak] after optim.py's linear warmup
(llmlab/scaling/schedule.py). Writes schedule.json: every update's rate
("lr"), the predicted final loss, and the predictions for cosine and WSD at
the same peak, steps and warmup. Train with it:

    llmlab train ... --config.optim.schedule=file \\
        --config.optim.schedule_file=schedule.json

A schedule longer, with a higher peak or another warmup than the fitted
curves is extrapolation: a warning, and listed under "extrapolation".
Prints one JSON line (the predictions).
"""

from __future__ import annotations

import sys

from absl import flags

from llmlab import cli_common
from llmlab import errors
from llmlab import storage


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("fit", None, "fit.json of a curve form (llmlab fit "
                      "--form=multipower|multipower_n|multipower_e).", flag_values=fv)
  flags.DEFINE_integer("steps", None, "Training steps (updates).",
                       flag_values=fv)
  flags.DEFINE_float("peak_lr", None, "Peak learning rate (end of warmup).",
                     flag_values=fv)
  flags.DEFINE_string("out", None, "schedule.json to write.", flag_values=fv)
  flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps (default: "
                       "the fitted curves' warmup).", flag_values=fv)
  flags.DEFINE_float("params", None, "Model size N (size-coupled laws: multipower_n, multipower_e).",
                     flag_values=fv)
  flags.DEFINE_integer("iterations", 2000, "Gradient steps per start.",
                       flag_values=fv)
  flags.DEFINE_float("step_size", 0.05, "Adam learning rate on the drop "
                     "logits.", flag_values=fv)
  flags.DEFINE_float("final_lr_fraction", 0.1, "Baselines' final rate / "
                     "peak.", flag_values=fv)
  flags.DEFINE_float("decay_fraction", 0.2, "WSD baseline's decay share.",
                     flag_values=fv)


def body(fv: flags.FlagValues) -> dict:
  if not storage.exists(fv.fit):
    raise errors.NotFound(f"--fit={fv.fit}: no such file")
  fit = storage.read_json(fv.fit)
  from llmlab.scaling import schedule  # noqa: PLC0415 (jax; --help stays fast)
  out = schedule.choose(
      fit, fv.steps, fv.peak_lr, fv.warmup_steps, fv.params, fit_path=fv.fit,
      iterations=fv.iterations, lr=fv.step_size,
      final_lr_fraction=fv.final_lr_fraction, decay_fraction=fv.decay_fraction)
  if out["extrapolation"]:
    print(f"llmlab schedule: warning: this schedule is extrapolation of "
          f"{fv.fit}: {'; '.join(out['extrapolation'])}", file=sys.stderr)
  storage.write_json(fv.out, out)
  base = out["baselines"]
  return dict(out=fv.out, steps=out["steps"], peak_lr=out["peak_lr"],
              warmup_steps=out["warmup_steps"],
              predicted_final_loss=out["predicted_final_loss"],
              cosine=base["cosine"]["predicted_final_loss"],
              wsd=base["wsd"]["predicted_final_loss"],
              final_lr=out["final_lr"], extrapolation=bool(out["extrapolation"]))


def main(argv: list[str]) -> int:
  """`llmlab schedule` (argv excludes the program and the command)."""
  return cli_common.run("schedule", argv, define, body, doc=__doc__,
                        required=("fit", "steps", "peak_lr", "out"))
