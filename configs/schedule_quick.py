"""One model of the quick study's family under several learning-rate
schedules, for the law-chosen schedule experiment
(benchmarks/schedule_experiment.py).

The quick study's setting (configs/study_quick.py: byte-level built-in
corpus, batch 16 x 128, 1464 steps, peak 3e-3, warmup 70) and its largest
family member n74k (d_model 48, 2 layers, 2 heads, mlp 192), evaluated along
the run so each curve has held-out losses to fit the multi-power law on.

    llmlab train --config=configs/schedule_quick.py --workdir=/tmp/run \
        --config.optim.schedule=wsd
"""

from llmlab.config import base


def get_config(arg: str | None = None):
  c = base()
  c.name = "n74k"
  c.model.update(d_model=48, num_layers=2, num_heads=2, num_kv_heads=2,
                 mlp_dim=192)
  c.train.update(steps=1464, batch_size=16, seq_len=128, learning_rate=3e-3,
                 log_every=61, eval_every=122, eval_tokens=65_536, seed=0)
  c.optim.update(warmup_steps=70, final_lr_fraction=0.1, weight_decay=0.1,
                 decay_fraction=0.2)
  c.checkpoint.update(keep=1, async_save=True)
  if arg == "smoke":  # the pipeline in a minute (tests, dry runs)
    c.train.update(steps=60, batch_size=8, seq_len=64, log_every=5,
                   eval_every=5, eval_tokens=4096)  # 12 evals >= 7 params
    c.optim.warmup_steps = 5
  elif arg:
    raise ValueError(f"configs/schedule_quick.py: unknown variant {arg!r} "
                     "(known: smoke)")
  return c
