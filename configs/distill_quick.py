"""Distillation at equal student tokens on the built-in corpus (issue 5).

A byte-level teacher with ~4x the student's non-embedding parameters is
trained first (on more tokens, so that it is clearly better); then three
students of the same shape see the same batches for the same steps:
  next_token  plain cross-entropy
  distill     online distillation from the teacher checkpoint
  offline     distillation from the teacher's stored top-k log-probs
Each run's held-out loss and bits per byte are measured on the same
validation rows. `llmlab/studies/distill.py` runs it all (<= 15 min on a
2-core CPU) and writes DIR/table.md; `tensorboard --logdir=DIR` shows every
run's curves together.

    llmlab distill-study --config=configs/distill_quick.py \
        --workdir=/tmp/llmlab/distill_quick

Variants: `:smoke` (same pipeline, a few steps; a minute or two).
"""

import ml_collections

from llmlab.config import base as train_base


def get_config(arg: str | None = None):
  s = ml_collections.ConfigDict()
  student = train_base()
  student.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                       mlp_dim=256)
  student.train.update(steps=400, batch_size=8, seq_len=128,
                       learning_rate=3e-3, log_every=20, eval_every=100,
                       eval_tokens=32_768, seed=0)
  student.optim.update(warmup_steps=20)
  student.checkpoint.update(keep=1)
  s.student = student
  # 2 x 128 x 512: 4.0x the student's non-embedding parameters.
  s.teacher_model = dict(num_layers=2, d_model=128, num_heads=4,
                         num_kv_heads=2, mlp_dim=512)
  s.teacher_steps = 500
  s.teacher_batch_size = 16
  s.distill = ml_collections.ConfigDict(dict(alpha=0.5, temperature=1.0,
                                             kl="forward"))
  s.offline_top_k = 16
  s.students = ("next_token", "distill", "offline")
  s.variant = ""  # a plumbing variant's name (llmlab/report_notes.py)
  if arg == "smoke":
    s.variant = "smoke"
    s.student.train.update(steps=8, eval_every=4, log_every=2,
                           eval_tokens=2048)
    s.student.optim.warmup_steps = 2
    s.teacher_steps = 8
    s.teacher_batch_size = 8
  elif arg:
    raise ValueError(f"configs/distill_quick.py: unknown variant {arg!r} "
                     "(known: smoke)")
  return s
