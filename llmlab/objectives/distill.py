"""Distillation from a frozen teacher (Hinton et al. 2015; Gemma 2).

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE

per real target position (the same mask as next-token), where `_T` means
softmax(logits / T). `objective.kl="reverse"` uses KL(student_T ||
teacher_T) instead. The T^2 keeps the KL's gradient scale independent of T.

The teacher comes from one of two places:

- online, `objective.teacher=DIR[:STEP]`: any llmlab run with the same
  tokenizer. Its params are restored once, laid out on the student's mesh by
  the student's logical rules, and passed to every step as frozen auxiliary
  input (`Aux`): the teacher runs inside the same jitted step under
  `stop_gradient`, is never in the optimizer state, and its forward FLOPs are
  added to MFU. `objective.top_k=k` truncates the teacher to its k most
  likely tokens, renormalised.
- offline, `objective.teacher_logits=PATH`: a store written by
  `llmlab teacher-logits` (see `llmlab/teacher_logits.py`) holding the
  teacher's top-k (ids, log-probs) per position of every training batch;
  `prepare` returns them as `Aux.batch_extras`, which the train loop merges
  into each batch without knowing the objective. The KL is then taken over
  the stored support, the teacher renormalised on it.

On a truncated support the reverse KL is undefined (the student has mass
where the teacher has none), so there both distributions are renormalised
over the support; the forward KL keeps the student's full softmax, which
also pushes the student's mass onto the teacher's support.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from llmlab import config as config_lib
from llmlab import model as model_lib
from llmlab.config import OBJECTIVE_DEFAULTS
from llmlab.data import teacher_store
from llmlab.objectives.registry import Aux, Context, register
from llmlab.objectives.next_token import target_mask, token_nll

log = logging.getLogger("llmlab")

KL_KINDS = ("forward", "reverse")
Teacher = model_lib.Frozen  # the online teacher, a frozen model


def option(cfg, key: str):
  """`cfg[key]`, or its default when a hand-built config lacks it."""
  return cfg.get(key, OBJECTIVE_DEFAULTS[key])


# ----------------------------------------------------------------------------
# The loss terms (pure functions of logits; tests check them by hand).
# ----------------------------------------------------------------------------


def dense_kl(t_logp, s_logp, kind: str):
  """KL over the full vocabulary: [..., V] log-probs -> [...]."""
  if kind == "forward":
    return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return jnp.sum(jnp.exp(s_logp) * (s_logp - t_logp), axis=-1)


def sparse_kl(ids, t_logp_k, s_logp, kind: str):
  """KL over a teacher support of k ids per position.

  `t_logp_k` [..., k] must be normalised over the support; `s_logp` is the
  student's full log-softmax [..., V]. Forward: sum_k q_k (log q_k - log s_k)
  with the student's full-vocabulary log-probs. Reverse: the student is
  renormalised over the support too (see module docstring).
  """
  s_k = jnp.take_along_axis(s_logp, ids, axis=-1)
  if kind == "forward":
    return jnp.sum(jnp.exp(t_logp_k) * (t_logp_k - s_k), axis=-1)
  s_k = s_k - jax.nn.logsumexp(s_k, axis=-1, keepdims=True)
  return jnp.sum(jnp.exp(s_k) * (s_k - t_logp_k), axis=-1)


def top_k_support(logits, k: int):
  """(ids [..., k], log-probs [..., k] renormalised over those ids)."""
  vals, ids = jax.lax.top_k(logits, k)
  return ids, jax.nn.log_softmax(vals, axis=-1)


def kl_term(s_logits, teacher, cfg):
  """Per-position KL between the tempered teacher and student, [B, L]."""
  temp = float(option(cfg, "temperature"))
  kind = option(cfg, "kl")
  k = int(option(cfg, "top_k"))
  s_logp = jax.nn.log_softmax(s_logits / temp, axis=-1)
  if teacher["kind"] == "stored":
    ids, logp = teacher["ids"], teacher["logprobs"]
    if k:
      ids, logp = ids[..., :k], logp[..., :k]
    return sparse_kl(ids, jax.nn.log_softmax(logp / temp, axis=-1), s_logp,
                     kind)
  t_logits = teacher["logits"] / temp
  if k:
    ids, t_logp_k = top_k_support(t_logits, k)
    return sparse_kl(ids, t_logp_k, s_logp, kind)
  return dense_kl(jax.nn.log_softmax(t_logits, axis=-1), s_logp, kind)


def _teacher_view(ctx: Context, batch) -> dict:
  """Where the teacher's distribution comes from for this batch."""
  if "teacher_ids" in batch:
    return {"kind": "stored", "ids": batch["teacher_ids"][:, :-1],
            "logprobs": batch["teacher_logprobs"][:, :-1].astype(jnp.float32)}
  if isinstance(ctx.aux, Teacher):
    return {"kind": "logits", "logits": ctx.aux.logits(batch)[:, :-1]}
  raise ValueError(
      "objective 'distill': no teacher in this step. With "
      "objective.teacher_logits set, the train loop must merge "
      "Aux.batch_extras(step, batch) into each batch; with objective.teacher "
      "set, objectives.prepare() must have run")


def distill(ctx: Context, params, batch, rng):
  """alpha * T^2 * KL + (1 - alpha) * CE, summed over real targets.

  Logged per target: `kl` (the tempered KL, without the T^2) and `nll` (the
  plain cross-entropy, comparable with next_token's loss).
  """
  logits = ctx.apply(params, batch, rng, True)
  mask = target_mask(batch).astype(jnp.float32)
  nll, _ = token_nll(logits, batch["tokens"])
  kl = kl_term(logits[:, :-1].astype(jnp.float32), _teacher_view(ctx, batch),
               ctx.cfg)
  kl = jnp.where(mask > 0, kl, 0.0)  # padding rows of a store may be junk
  alpha = float(option(ctx.cfg, "alpha"))
  temp = float(option(ctx.cfg, "temperature"))
  per_pos = alpha * temp * temp * kl + (1.0 - alpha) * nll
  return jnp.sum(per_pos * mask), {"weight": jnp.sum(mask),
                                   "nll_sum": jnp.sum(nll * mask),
                                   "kl_sum": jnp.sum(kl)}


# ----------------------------------------------------------------------------
# Before training: validate options, load the teacher.
# ----------------------------------------------------------------------------


def check_options(cfg) -> None:
  """ConfigError naming the key for any bad distillation option."""
  o = cfg.objective
  err = config_lib.ConfigError
  if option(o, "kl") not in KL_KINDS:
    raise err(f"config.objective.kl={option(o, 'kl')!r}: must be one of "
              f"{KL_KINDS}")
  if not 0.0 <= float(option(o, "alpha")) <= 1.0:
    raise err(f"config.objective.alpha={option(o, 'alpha')!r}: must be in "
              "[0, 1]")
  if not float(option(o, "temperature")) > 0:
    raise err(f"config.objective.temperature={option(o, 'temperature')!r}: "
              "must be > 0")
  if int(option(o, "top_k")) < 0:
    raise err(f"config.objective.top_k={option(o, 'top_k')!r}: must be >= 0 "
              "(0 = the full vocabulary)")


def prepare(cfg, setup, load_teacher) -> Aux:
  """Aux for `distill`: the online teacher, or the offline store's rows."""
  check_options(cfg)
  o = cfg.objective
  teacher, stored = str(option(o, "teacher")), str(option(o, "teacher_logits"))
  if bool(teacher) == bool(stored):
    raise config_lib.ConfigError(
        "config.objective.name='distill' needs exactly one of "
        f"objective.teacher=DIR[:STEP] (got {teacher!r}) and "
        f"objective.teacher_logits=PATH (got {stored!r})")
  if stored:
    store = teacher_store.Store(stored)
    store.check_compatible(cfg, setup.model_cfg.vocab_size)
    info = dict(store.teacher_info(), teacher_logits=stored,
                top_k=store.top_k, flops_per_token=0.0)
    log.info("distill: offline teacher logits %s (top-%d of %s)", stored,
             store.top_k, store.teacher_info().get("teacher"))
    return Aux(info=info, batch_extras=store.batch_extras(
        jax.process_index(), jax.process_count()))
  if int(option(o, "top_k")) > setup.model_cfg.vocab_size:
    raise config_lib.ConfigError(
        f"config.objective.top_k={option(o, 'top_k')}: larger than the "
        f"vocabulary ({setup.model_cfg.vocab_size})")
  params, shardings, tcfg, info = load_teacher(teacher, cfg, setup)
  return Aux(params=Teacher(params, tcfg), shardings=Teacher(shardings, tcfg),
             info=info)


register("distill", prepare=prepare)(distill)
