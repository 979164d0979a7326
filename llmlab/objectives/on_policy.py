"""On-policy distillation: the student writes, the teacher scores.

Each row's first `objective.prompt_len` tokens are a prompt; inside the
train step the student samples `objective.rollout_len` tokens after it (KV
cache sampler of `llmlab/decode.py`, temperature
`objective.rollout_temperature`, optional `objective.rollout_top_k`), and
the loss at every sampled position is the reverse KL(student || teacher) of
the next-token distributions, summed over the vocabulary (Agarwal et al.
2024, "On-policy distillation of language models"; Gemma 2 post-training).
Taking the full-distribution KL at the student's own positions, instead of a
single-sample estimate, gives the same expected gradient through the
student's log-probs with less variance. Sampling runs on stop_gradient'ed
params: the gradient flows only through the scoring forward pass. Positions
after a row's first EOS, and rows whose prompt ends in padding, are not
scored. The teacher is loaded exactly as for `distill` (frozen, on the
student's mesh, no gradient, not in the optimizer state).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from llmlab import config as config_lib
from llmlab import decode
from llmlab import model as model_lib
from llmlab.data import tokenizer as tokenizer_lib
from llmlab.objectives.registry import Aux, Context, register
from llmlab.objectives.distill import Teacher, dense_kl, option


@flax.struct.dataclass
class OnPolicy:
  """The frozen teacher plus what sampling needs, as one jit input."""

  teacher: Teacher
  student_cfg: model_lib.ModelConfig = flax.struct.field(pytree_node=False)
  eos_id: int = flax.struct.field(pytree_node=False)
  pad_id: int = flax.struct.field(pytree_node=False)


def rollout_batch(prompt: dict, new_BxR) -> dict:
  """Prompt + sampled tokens as one model input, continuing the prompt's
  last segment and position."""
  r = new_BxR.shape[1]
  seg_B = prompt["segment_ids"][:, -1]
  pos_B = prompt["positions"][:, -1]
  return {
      "tokens": jnp.concatenate([prompt["tokens"], new_BxR], axis=1),
      "segment_ids": jnp.concatenate(
          [prompt["segment_ids"], jnp.broadcast_to(seg_B[:, None],
                                                   new_BxR.shape)], axis=1),
      "positions": jnp.concatenate(
          [prompt["positions"], pos_B[:, None] + 1 + jnp.arange(r)], axis=1),
  }


def on_policy_distill(ctx: Context, params, batch, rng):
  """Reverse KL(student || teacher) summed over the student's samples."""
  aux: OnPolicy = ctx.aux
  p = int(option(ctx.cfg, "prompt_len"))
  r = int(option(ctx.cfg, "rollout_len"))
  prompt = {k: batch[k][:, :p] for k in ("tokens", "segment_ids",
                                         "positions")}
  out = decode.generate(
      model_lib.Transformer(aux.student_cfg), jax.lax.stop_gradient(params),
      prompt, jax.random.fold_in(rng, 1), max_new_tokens=r,
      temperature=float(option(ctx.cfg, "rollout_temperature")),
      top_k=int(option(ctx.cfg, "rollout_top_k")), eos_id=aux.eos_id,
      pad_id=aux.pad_id)
  new_BxR = jax.lax.stop_gradient(out["tokens"])
  seq = rollout_batch(prompt, new_BxR)
  scored = slice(p - 1, p + r - 1)  # positions that predict the new tokens
  s_logp = jax.nn.log_softmax(
      ctx.apply(params, seq, jax.random.fold_in(rng, 2), True)[:, scored]
      .astype(jnp.float32), axis=-1)
  t_logp = jax.nn.log_softmax(aux.teacher.logits(seq)[:, scored], axis=-1)
  valid = ((jnp.arange(r)[None, :] < out["lengths"][:, None]) &
           (prompt["segment_ids"][:, -1:] != 0)).astype(jnp.float32)
  kl = dense_kl(t_logp, s_logp, "reverse")
  pick = lambda lp: -jnp.take_along_axis(lp, new_BxR[..., None], -1)[..., 0]
  return jnp.sum(kl * valid), {
      "weight": jnp.sum(valid), "kl_sum": jnp.sum(kl * valid),
      "teacher_nll_sum": jnp.sum(pick(t_logp) * valid),
      "student_nll_sum": jnp.sum(pick(s_logp) * valid)}


def prepare(cfg, setup, load_teacher) -> Aux:
  """Checks the rollout options, loads the teacher and the special ids."""
  o = cfg.objective
  err = config_lib.ConfigError
  if str(option(o, "teacher_logits")):
    raise err("config.objective.teacher_logits is for name='distill'; "
              "on_policy_distill scores fresh samples with "
              "objective.teacher=DIR[:STEP]")
  if not str(option(o, "teacher")):
    raise err("config.objective.name='on_policy_distill' needs "
              "objective.teacher=DIR[:STEP]")
  p, r = int(option(o, "prompt_len")), int(option(o, "rollout_len"))
  if not 1 <= p < cfg.train.seq_len:
    raise err(f"config.objective.prompt_len={p}: must be in [1, "
              f"train.seq_len={cfg.train.seq_len})")
  if r < 1:
    raise err(f"config.objective.rollout_len={r}: must be >= 1")
  if float(option(o, "rollout_temperature")) < 0:
    raise err("config.objective.rollout_temperature="
              f"{option(o, 'rollout_temperature')}: must be >= 0 (0 = greedy)")
  if not 0 <= int(option(o, "rollout_top_k")) <= setup.model_cfg.vocab_size:
    raise err(f"config.objective.rollout_top_k={option(o, 'rollout_top_k')}: "
              f"must be in [0, {setup.model_cfg.vocab_size}]")
  params, shardings, tcfg, info = load_teacher(str(o.teacher), cfg, setup)
  teacher, shardings = Teacher(params, tcfg), Teacher(shardings, tcfg)
  tok = tokenizer_lib.load(str(cfg.data.tokenizer))
  static = dict(student_cfg=setup.model_cfg, eos_id=int(tok.eos_id),
                pad_id=int(tok.pad_id))
  info = dict(info, flops_per_token=_extra_flops(cfg, setup, info, p + r))
  return Aux(params=OnPolicy(teacher, **static),
             shardings=OnPolicy(shardings, **static), info=info)


def _extra_flops(cfg, setup, info: dict, rollout_tokens: int) -> float:
  """FLOPs per batch token on top of the student's usual train FLOPs.

  Per row: sampling (student forward over prompt + rollout), teacher
  forward and student train step over the rollout, minus the student train
  step over seq_len that `train.py` already counts.
  """
  seq_len = cfg.train.seq_len
  s_fwd = model_lib.flops_per_token(setup.model_cfg, seq_len)["forward"]
  per_row = (s_fwd + info["flops_per_token"] + 3 * s_fwd) * rollout_tokens
  return per_row / seq_len - 3 * s_fwd


register("on_policy_distill", prepare=prepare)(on_policy_distill)
