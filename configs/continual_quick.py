"""Continual learning after compression (issue 27): the Bloom questions.

Domain A (old): the standard library's Python code (`stdlib`); domain B
(new): its English, the docstrings and comments (`prose`,
llmlab/data/prose.py). Five byte-level sources trained on A; three target
shapes pruned from them (activation pruning for the law grid), the sources
continued whole (`full`), and every target from scratch, all continued on B
with a replay ratio r of A; start methods (three prunings, shrink-and-
perturb, re-initialised top / bottom layer, full, scratch, distillation)
at two sources; seed re-runs; laws fitted per domain and checked on the
largest source; the replay ratio for a forgetting budget predicted and then
measured. `llmlab/studies/continual.py` runs it all (resumable).

    llmlab continual --config=configs/continual_quick.py --workdir=/tmp/llmlab/continual

Variants: `:smoke` (the whole pipeline on tiny models and a slice of the
corpus, for tests).
"""

import ml_collections

from llmlab.config import base as train_base


def _m(layers, d, heads, mlp):
  """kv heads 1, head size 16: every smaller shape is a pruning."""
  return dict(num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=1,
              head_dim=16, mlp_dim=mlp)


def get_config(arg: str | None = None):
  s = ml_collections.ConfigDict()
  b = train_base()
  b.train.update(batch_size=8, seq_len=64, learning_rate=3e-3, log_every=50,
                 eval_every=0, eval_tokens=8192, seed=0)
  b.optim.update(warmup_steps=20)
  b.checkpoint.update(keep=1)
  s.base = b
  s.variant = arg or ""
  s.domain_a = "stdlib"
  s.domain_b = "prose"
  # Five sources, 9k-238k non-embedding params. The largest is held out;
  # the law is fitted on the other four. With three sources (the first
  # design: today's s3-s5) the fit could not pin the compression exponent
  # theta or the rate tau of the other domain's tokens, and the held-out
  # error was their bias (docs/continual.md).
  s.sources = (("s1", _m(1, 24, 2, 96)), ("s2", _m(2, 24, 2, 96)),
               ("s3", _m(2, 32, 2, 128)), ("s4", _m(3, 48, 3, 192)),
               ("s5", _m(4, 64, 4, 256)))
  s.source_steps = 600
  s.targets = (("t1", _m(1, 16, 1, 64)), ("t2", _m(2, 24, 1, 96)),
               ("t3", _m(3, 40, 2, 160)))
  s.continue_steps = 300
  s.continue_seed = 1  # another data order than the sources'
  s.eval_points = 6
  s.first_eval_fraction = 0.05
  s.replay = 0.1  # r of the method runs and of most of the grid
  # The law grid (source/target/replay; target 'full' = the source itself):
  # every source x target that is a pruning at r = 0.1, the replay ratios
  # 0 / 0.1 / 0.3 at t2 of every source with two layers or more (t1 of s1),
  # and every source continued whole at each ratio.
  s.grid = ("s1/t1/0.1", "s2/t1/0.1", "s2/t2/0.1", "s3/t1/0.1", "s3/t2/0.1",
            "s4/t1/0.1", "s4/t2/0.1", "s4/t3/0.1",
            "s5/t1/0.1", "s5/t2/0.1", "s5/t3/0.1",
            "s1/t1/0", "s1/t1/0.3", "s2/t2/0", "s2/t2/0.3",
            "s3/t2/0", "s3/t2/0.3", "s4/t2/0", "s4/t2/0.3", "s5/t2/0",
            "s5/t2/0.3") + tuple(
                f"s{i}/full/{r}" for i in range(1, 6) for r in (0, 0.1, 0.3))
  s.law_method = "activation"
  s.methods = ("full", "magnitude", "activation", "learned",
               "activation+shrink_perturb", "activation+reinit_top",
               "activation+reinit_bottom", "scratch")
  s.method_at = ("s4/t2", "s5/t2")
  s.distill_methods = ("activation",)
  s.distill = ml_collections.ConfigDict(dict(alpha=0.5, temperature=1.0,
                                             kl="forward"))
  s.extra_seeds = (2, 3)
  s.seed_methods = ("activation", "scratch")
  # Seeds every law cell is trained with again (fitted as more points of the
  # same curve; held-out checks then score the seed-mean curves). On one
  # seed the held-out source's noise moved its score by up to 0.4 points
  # (docs/continual.md): the study's headline is the seed-mean score.
  s.law_seeds = (2, 3)
  s.shrink = 0.6  # shrink-and-perturb: shrink * theta + perturb * fresh
  s.perturb = 0.1
  s.reinit_layers = 1
  s.calib_rows = 16
  s.learned = ml_collections.ConfigDict(dict(
      steps=100, batch_size=8, learning_rate=1e-3, mask_lr=0.1,
      lambda_lr=0.5, init_log_alpha=2.0, target_warmup=0.5, seed=0,
      log_every=25))
  s.forms = ("cl_transfer", "cl_p2", "cl_dcpt", "cl_anchor_static", "cl_anchor",
             "cl_anchor_lr")
  s.holdout_min_fraction = 0.5
  # The replay check: the smallest r whose predicted forgetting (L_A - the
  # source's L_A after the continued run) is within the budget, for the
  # largest source continued whole (a pruned start has lost more of A to
  # the pruning than any budget of forgetting would allow).
  s.forget_budget = 0.07
  s.replay_at = "s5/full"
  if arg == "smoke":
    s.base.train.update(batch_size=4, seq_len=32, eval_tokens=512,
                        log_every=5)
    s.base.optim.warmup_steps = 2
    s.base.guard.preflight = False
    # A slice of the corpus: prose extraction of the whole stdlib takes
    # ~20 s (cached afterwards).
    s.base.data.stdlib.include = "json/*,email/*,logging/*,http/*"
    sm = lambda l, d, h, f: dict(num_layers=l, d_model=d, num_heads=h,
                                 num_kv_heads=1, head_dim=8, mlp_dim=f)
    s.sources = (("s1", sm(2, 16, 2, 32)), ("s2", sm(2, 24, 3, 48)))
    s.targets = (("t1", sm(1, 8, 1, 16)), ("t2", sm(2, 16, 2, 24)))
    s.source_steps = 20
    s.continue_steps = 16
    s.eval_points = 4
    s.first_eval_fraction = 0.25
    s.grid = ("s1/t1/0.1", "s1/t2/0.1", "s2/t1/0.1", "s2/t2/0.1",
              "s1/t2/0", "s2/t2/0.3", "s1/full/0.1", "s1/full/0.3",
              "s2/full/0", "s2/full/0.1")
    s.method_at = ("s2/t2",)
    s.extra_seeds = (2,)
    s.law_seeds = ()
    s.calib_rows = 4
    s.learned.update(steps=6, batch_size=4, log_every=3)
    s.replay_at = "s2/full"
    s.forget_budget = 0.5
  elif arg:
    raise ValueError(f"configs/continual_quick.py: unknown variant {arg!r} "
                     "(known: smoke)")
  return s
