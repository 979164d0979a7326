"""Repetition on our own data (issue 30; llmlab/studies/repeat.py).

Three byte-level family sizes (21.7k-98.8k params), each trained for the
same D = 1.05M tokens (512 steps of 16 x 128) on fresh data and on U = D / R
unique tokens of the standard library corpus repeated R = 2, 4, 8, 16, 32
times (`data.unique_tokens`), every run evaluated at 8 log-spaced steps on
the held-out split. chinchilla, data_constrained and data_repeat are fitted
on the family and predict a held-out larger model (4 layers, d 64: 296k
params, 3.0x the largest fitted) trained fresh and under 4 and 32
repetitions; the report gives each law's ARE, skill and the epochs at which
loss is 1% above fresh data. ~10.5 min on 2 shared CPU cores (README).

    llmlab repeat-study --config=configs/study_repeat.py --workdir=/tmp/llmlab/repeat

Variants: `:smoke` (the whole pipeline with tiny budgets, ~1 min, for
tests/test_repeat.py; no scientific claim).
"""

import ml_collections

from llmlab.config import base as train_base


def _model(d, layers, heads):
  return dict(d_model=d, num_layers=layers, num_heads=heads,
              num_kv_heads=heads, mlp_dim=4 * d)


def get_config(arg: str | None = None):
  s = ml_collections.ConfigDict()
  b = train_base()
  b.train.update(batch_size=16, seq_len=128, learning_rate=3e-3,
                 log_every=128, eval_every=0, seed=0)
  # Constant after warmup: evals along a run are comparable (repeat.py).
  b.optim.update(schedule="constant", warmup_steps=32, weight_decay=0.1)
  b.checkpoint.update(every_steps=0, keep=1, async_save=True)
  s.base = b
  s.family = [("n22k", _model(24, 1, 2)), ("n50k", _model(32, 2, 2)),
              ("n99k", _model(48, 2, 2))]
  s.target = ("n296k", _model(64, 4, 4))
  s.steps = 512                   # D = 512 x 16 x 128 = 1,048,576 tokens/run
  s.repetitions = (1, 2, 4, 8, 16, 32)   # 1 = fresh data; U = D / R
  s.target_repetitions = (1, 4, 32)
  s.eval_points = 8               # log-spaced evals per run ...
  s.first_eval_fraction = 0.0625  # ... from 1/16 of the run to its end
  s.eval_tokens = 65_536
  s.are_fraction = 0.5            # target evals >= half the run are scored
  s.threshold = 0.01              # epochs at which loss is 1% above fresh
  s.forms = ("chinchilla", "data_constrained", "data_repeat")
  s.variant = ""
  if arg == "smoke":
    s.variant = "smoke"
    s.family = [("s1", _model(16, 1, 2)), ("s2", _model(24, 1, 2))]
    s.target = ("s_target", _model(32, 1, 2))
    s.base.train.update(batch_size=8, seq_len=32, log_every=16)
    s.base.optim.warmup_steps = 4
    s.steps = 64                  # D = 16,384 tokens; U >= 2,048
    s.repetitions = (1, 2, 8)
    s.target_repetitions = (1, 8)
    s.eval_points = 4
    s.first_eval_fraction = 0.25
    s.eval_tokens = 2048
  elif arg:
    raise ValueError(f"configs/study_repeat.py: unknown variant {arg!r} "
                     "(known: smoke)")
  return s
