"""Compress-then-continue versus training from scratch (issue 9).

A byte-level source model (4 x 128, ~0.8M non-embedding params) is trained
on the built-in corpus, pruned to a 2 x 96 target (~5x fewer non-embedding
params) by magnitude, activation and learned (Sheared-LLaMA) pruning; each
pruned model continues training (and the learned one also with distillation
from the source), and the target shape is trained from scratch, all at equal
tokens. Every checkpoint is evaluated and each run gets its own fitted
L(D) = E + B/D^beta. `llmlab/compress/experiment.py` runs it all (resumable)
and writes DIR/compress.json, DIR/table.md, DIR/report.md and the curves.

    llmlab compress-study --config=configs/compress_quick.py --workdir=/tmp/llmlab/compress

Variants: `:smoke` (same pipeline, a few steps each; a few minutes).
"""

import ml_collections

from llmlab.config import base as train_base


def get_config(arg: str | None = None):
  s = ml_collections.ConfigDict()
  b = train_base()
  b.train.update(batch_size=16, seq_len=128, learning_rate=3e-3, log_every=25,
                 eval_every=0, eval_tokens=32_768, seed=0)
  b.optim.update(warmup_steps=20)
  b.checkpoint.update(keep=1)
  s.base = b
  s.source_model = dict(num_layers=4, d_model=64, num_heads=4, num_kv_heads=2,
                        mlp_dim=256)
  s.source_steps = 600
  s.source_batch_size = 16
  # head_dim stays 16 (RoPE): 48 = 3 x 16 would need 3 heads, which 2 kv
  # heads do not divide; 2 heads on 1 kv head keep the 2:1 grouping.
  s.target_model = dict(num_layers=2, d_model=48, num_heads=2, num_kv_heads=1,
                        mlp_dim=128, head_dim=16)
  s.methods = ("magnitude", "activation", "learned")
  s.distill_methods = ("learned",)
  s.distill = ml_collections.ConfigDict(dict(alpha=0.5, temperature=1.0,
                                             kl="forward"))
  s.calib_rows = 32  # activation: calibration rows of the source's data
  s.learned = ml_collections.ConfigDict(dict(
      steps=200, batch_size=16, learning_rate=1e-3, mask_lr=0.1,
      lambda_lr=0.5, init_log_alpha=2.0, target_warmup=0.5, seed=0,
      log_every=25))
  s.continue_steps = 800
  s.continue_seed = 1  # another data order than the source's
  s.sweep_points = 8
  s.sweep_min_fraction = 0.05
  s.eval_tokens = 32_768
  s.fit_min_points = 4
  s.reach_loss = 0.0  # 0 = the scratch run's final loss
  s.variant = ""  # a plumbing variant's name (llmlab/report_notes.py)
  if arg == "smoke":
    s.variant = "smoke"
    s.base.train.update(batch_size=4, seq_len=32, eval_tokens=1024,
                        log_every=5)
    s.base.optim.warmup_steps = 2
    s.source_model = dict(num_layers=2, d_model=32, num_heads=4,
                          num_kv_heads=2, mlp_dim=64)
    s.target_model = dict(num_layers=1, d_model=24, num_heads=2,
                          num_kv_heads=1, mlp_dim=32, head_dim=8)
    s.source_steps = 20
    s.source_batch_size = 4
    s.calib_rows = 4
    s.learned.update(steps=10, batch_size=4, log_every=5)
    s.continue_steps = 16
    s.sweep_points = 5
    s.sweep_min_fraction = 0.2
    s.eval_tokens = 1024
  elif arg:
    raise ValueError(f"configs/compress_quick.py: unknown variant {arg!r} "
                     "(known: smoke)")
  return s
