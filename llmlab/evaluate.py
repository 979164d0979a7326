"""`llmlab eval`: held-out loss and bits per byte of one checkpoint.

The held-out set is the run's own data config's validation documents, cut to
`train.eval_tokens` tokens: identical for every run sharing that data config
and tokenizer, so numbers compare across runs (and across tokenizers, in
bits per byte).
"""

from __future__ import annotations

import jax

from llmlab import api
from llmlab import data as data_lib
from llmlab import steps as steps_lib
from llmlab.compress import quantize as quantize_lib


def evaluate_run(workdir: str, step: int | None = None,
                 eval_tokens: int | None = None, mesh=None,
                 quantize: str | None = None) -> dict:
  """Eval loss/bpb; with `quantize="int8"` the loss of the int8 weight-only
  model (`llmlab/compress/quantize.py`) next to the float one, the change,
  and the sizes."""
  run = api.load(workdir, step=step, mesh=mesh)
  cfg = run.config
  data = data_lib.build(cfg.data, seq_len=cfg.train.seq_len,
                        global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                        process_index=jax.process_index(),
                        process_count=jax.process_count())
  setup = run.setup
  eval_step = steps_lib.make_eval_step(setup)
  batches = data.eval_batches(eval_tokens or cfg.train.eval_tokens,
                              cfg.train.eval_batch_size or cfg.train.batch_size)
  out = steps_lib.evaluate(setup, eval_step, run.params, batches)
  if quantize:
    params, report = quantize_lib.roundtrip(run.params, quantize)
    base = out
    out = steps_lib.evaluate(setup, eval_step, params, batches)
    out.update(report, float_eval_loss=base["eval_loss"],
               float_eval_bpb=base["eval_bpb"],
               eval_loss_change=out["eval_loss"] - base["eval_loss"])
  info = run.info.get("model_info", {})
  tokens = run.info.get("tokens", run.step * info.get("tokens_per_step", 0))
  return {"workdir": workdir, "step": run.step, "tokens": tokens,
          "params": info.get("params_total"),
          "params_nonembed": info.get("params_nonembed"), **out}
