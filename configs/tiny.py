"""Tiny byte-level model on the built-in corpus: trains in about a minute on
a 2-core CPU. Variants: `configs/tiny.py:smoke` (a few steps, for tests).

    llmlab train --config=configs/tiny.py --workdir=/tmp/llmlab/tiny
"""

from llmlab.config import base


def get_config(arg: str | None = None):
  c = base()
  c.name = "tiny"
  c.model.num_layers = 2
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 512
  c.train.steps = 300
  c.train.batch_size = 8
  c.train.seq_len = 128
  c.train.learning_rate = 3e-3
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.eval_tokens = 32_768
  c.optim.warmup_steps = 20
  c.checkpoint.every_steps = 100
  if arg == "smoke":
    c.train.steps = 12
    c.train.log_every = 2
    c.train.eval_every = 6
    c.train.eval_tokens = 4096
    c.checkpoint.every_steps = 6
    c.optim.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/tiny.py: unknown variant {arg!r} (known: smoke)")
  return c
