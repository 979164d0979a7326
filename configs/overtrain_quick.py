"""Overtraining study on the built-in corpus (issue 10; llmlab/studies/overtrain.py).

A byte-level model with 49.5k parameters (33k non-embedding) is pretrained
on the standard library's *library* code for 10.2M tokens, about 207
tokens per parameter (10x Chinchilla's compute-optimal 20), at a constant
learning rate after warmup, so checkpoints differ in tokens seen and not in
where they sit on a decaying schedule. Eight log-spaced checkpoints (from 1%
of the run) are each fine-tuned on the library's *test suites* (a related
but distinct distribution, held out from pretraining) for the same 262,144
tokens at three learning rates, and probed with relative Gaussian noise at
four magnitudes and three seeds.

    llmlab overtrain --config=configs/overtrain_quick.py --workdir=/tmp/llmlab/overtrain

Variants: `:smoke` (same pipeline, tiny budgets, a few minutes), `:test` (for
tests/test_overtrain.py).
"""

import ml_collections

from llmlab.config import base as train_base
from llmlab.data import stdlib


def get_config(arg: str | None = None):
  s = ml_collections.ConfigDict()
  p = train_base()
  p.name = "overtrain_pretrain"
  p.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2,
                 mlp_dim=128)
  p.train.update(steps=5000, batch_size=16, seq_len=128, learning_rate=3e-3,
                 log_every=100, eval_every=1000, eval_tokens=32_768, seed=0)
  p.optim.update(schedule="constant", warmup_steps=100)
  p.data.stdlib.exclude = stdlib.TEST_PATTERNS   # library code only
  p.checkpoint.update(every_steps=0, keep=1, sweep_points=8,
                      sweep_min_fraction=0.01)
  s.pretrain = p
  s.pretrain_run = ""          # or an existing run directory to study
  s.checkpoints = "sweep"      # 'sweep' | 'all' | '3,9,30' (steps)

  target = train_base().data
  target.stdlib.include = stdlib.TEST_PATTERNS   # the stdlib's test suites
  s.target_data = target

  s.finetune = ml_collections.ConfigDict(dict(
      steps=128, batch_size=16, learning_rates=(1e-3, 3e-3, 1e-2),
      seeds=(0,), schedule="cosine", warmup_steps=12, final_lr_fraction=0.1,
      log_every=32))
  s.sensitivity = ml_collections.ConfigDict(dict(
      gammas=(0.03, 0.1, 0.2, 0.3), seeds=(0, 1, 2)))
  s.eval_tokens = 32_768       # both held-out sets: 256 rows of 128
  s.eval_batch_size = 8        # 32 batches each, resampled by the bootstrap
  s.inflection = ml_collections.ConfigDict(dict(tolerance=0.0,
                                                bootstrap=1000, seed=0))
  s.variant = ""  # a plumbing variant's name (llmlab/report_notes.py)
  if arg == "smoke":
    s.variant = "smoke"
    s.pretrain.train.update(steps=300, eval_every=0, log_every=50)
    s.pretrain.checkpoint.sweep_points = 4
    s.pretrain.checkpoint.sweep_min_fraction = 0.1
    s.finetune.update(steps=20, warmup_steps=2, log_every=10,
                      learning_rates=(3e-3, 1e-2))
    s.sensitivity.seeds = (0, 1)
    s.eval_tokens = 8192
  elif arg == "test":
    s.variant = "test"
    s.pretrain.model.update(num_layers=1, d_model=16, num_heads=2,
                            num_kv_heads=2, mlp_dim=64)
    s.pretrain.train.update(steps=30, batch_size=4, seq_len=32, eval_every=0,
                            log_every=10, eval_tokens=1024)
    s.pretrain.optim.warmup_steps = 3
    s.pretrain.checkpoint.update(sweep_points=3, sweep_min_fraction=0.1)
    s.finetune.update(steps=4, batch_size=4, warmup_steps=1, log_every=2,
                      learning_rates=(1e-3, 1e-2))
    s.sensitivity.update(gammas=(0.0, 0.3, 1.0), seeds=(0, 1))
    s.eval_tokens = 1024
    s.eval_batch_size = 4
    s.inflection.bootstrap = 50
  elif arg:
    raise ValueError(f"configs/overtrain_quick.py: unknown variant {arg!r} "
                     "(known: smoke, test)")
  return s
