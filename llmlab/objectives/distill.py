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
  teacher's top-k (ids, log-probs) per position of every training batch; the
  train loop adds them to the batch (`make_batch_extras`). The KL is then
  taken over the stored support, the teacher renormalised on it.

On a truncated support the reverse KL is undefined (the student has mass
where the teacher has none), so there both distributions are renormalised
over the support; the forward KL keeps the student's full softmax, which
also pushes the student's mass onto the teacher's support.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from llmlab import config as config_lib
from llmlab import model as model_lib
from llmlab.objectives import Aux, Context, register
from llmlab.objectives.next_token import target_mask, token_nll

log = logging.getLogger("llmlab")

# Keys merged into `config.objective` by `llmlab/config.py`. One table for
# every objective of this package (distill and on_policy_distill).
OBJECTIVE_DEFAULTS = dict(
    teacher="",               # DIR[:STEP] of an llmlab run (online teacher)
    teacher_logits="",        # PATH of a `llmlab teacher-logits` store
    alpha=0.5,                # weight of the KL term; 1 - alpha weights CE
    temperature=1.0,          # T of both softmaxes in the KL
    kl="forward",             # forward KL(teacher||student) | reverse
    top_k=0,                  # truncate the teacher to its top k (0 = all)
    prompt_len=32,            # on_policy_distill: prompt tokens per row
    rollout_len=32,           # on_policy_distill: sampled tokens per row
    rollout_temperature=1.0,  # on_policy_distill: sampling temperature
    rollout_top_k=0,          # on_policy_distill: sample from the top k
)

KL_KINDS = ("forward", "reverse")


@flax.struct.dataclass
class Teacher:
  """A frozen model as a jit input: params are traced, the shape is static.

  Keeping `model_cfg` in the pytree's static part lets the objective rebuild
  the module inside the step without any global state; `Aux.shardings` is a
  `Teacher` of the same static part with NamedShardings as leaves.
  """

  params: Any
  model_cfg: model_lib.ModelConfig = flax.struct.field(pytree_node=False)

  def logits(self, batch) -> jax.Array:
    """[B, L, V] float32 logits, deterministic and without gradient."""
    out = model_lib.Transformer(self.model_cfg).apply(
        {"params": self.params}, batch["tokens"], batch["segment_ids"],
        batch["positions"], deterministic=True)
    return jax.lax.stop_gradient(out)


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
      "llmlab.objectives.distill.make_batch_extras(cfg)(step, batch) into "
      "each batch; with objective.teacher set, objectives.prepare() must "
      "have run")


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


def prepare(cfg, setup) -> Aux:
  """Aux for `distill`: the online teacher, or the offline store's info."""
  check_options(cfg)
  o = cfg.objective
  teacher, stored = str(option(o, "teacher")), str(option(o, "teacher_logits"))
  if bool(teacher) == bool(stored):
    raise config_lib.ConfigError(
        "config.objective.name='distill' needs exactly one of "
        f"objective.teacher=DIR[:STEP] (got {teacher!r}) and "
        f"objective.teacher_logits=PATH (got {stored!r})")
  if stored:
    from llmlab import teacher_logits
    store = teacher_logits.Store(stored)
    store.check_compatible(cfg, setup.model_cfg.vocab_size)
    info = dict(store.teacher_info(), teacher_logits=stored,
                top_k=store.top_k, flops_per_token=0.0)
    log.info("distill: offline teacher logits %s (top-%d of %s)", stored,
             store.top_k, store.teacher_info().get("teacher"))
    return Aux(info=info)
  if int(option(o, "top_k")) > setup.model_cfg.vocab_size:
    raise config_lib.ConfigError(
        f"config.objective.top_k={option(o, 'top_k')}: larger than the "
        f"vocabulary ({setup.model_cfg.vocab_size})")
  params, shardings, info = load_teacher(teacher, cfg, setup)
  return Aux(params=params, shardings=shardings, info=info)


def load_teacher(ref: str, cfg, setup, key: str = "config.objective.teacher"):
  """(Teacher, its shardings, info) of run `ref` on the student's mesh.

  Every failure (no such run, no checkpoint, other vocabulary or tokenizer)
  raises a ConfigError naming `key` (the config key or flag) and `ref`,
  before anything compiles.
  """
  from llmlab import api
  from llmlab import checkpoints as ckpt_lib
  from llmlab import steps as steps_lib

  workdir, step = ckpt_lib.parse_ref(ref)
  err = config_lib.ConfigError
  try:
    tcfg, raw = api.read_run_config(workdir)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise err(f"{key}={ref!r}: cannot read the teacher run ({e})") \
        from None
  vocab = raw.get("model_info", {}).get("vocab_size")
  if vocab != setup.model_cfg.vocab_size:
    raise err(f"{key}={ref!r}: the teacher's vocabulary has {vocab} "
              f"ids, the student's {setup.model_cfg.vocab_size}; distillation "
              "needs the same tokenizer")
  _check_tokenizer(raw, cfg, key, ref)
  tcfg = ml_collections.ConfigDict(tcfg.to_dict())
  tcfg.mesh = ml_collections.ConfigDict(cfg.mesh.to_dict())  # student rules
  tsetup = steps_lib.build(tcfg, vocab, setup.mesh)
  abstract = tsetup.abstract_state["params"]
  params, step = restore_params(workdir, tcfg, abstract, step, key, ref)
  shardings = tsetup.state_shardings["params"]
  counts = model_lib.param_counts(tsetup.model_cfg)
  flops = model_lib.flops_per_token(tsetup.model_cfg, cfg.train.seq_len)
  info = {"teacher": workdir, "teacher_step": step,
          "teacher_params_total": counts["total"],
          "teacher_params_nonembed": counts["non_embedding"],
          "flops_per_token": flops["forward"]}
  log.info("teacher %s step %d: N(non-embedding)=%s total=%s, forward "
           "FLOPs/token=%.3g", workdir, step, f"{counts['non_embedding']:,}",
           f"{counts['total']:,}", flops["forward"])
  return (Teacher(params, tsetup.model_cfg),
          Teacher(shardings, tsetup.model_cfg), info)


def _check_tokenizer(raw: dict, cfg, key: str, ref: str) -> None:
  """Same vocabulary size is not enough: the ids must mean the same."""
  from llmlab.data import tokenizer as tokenizer_lib
  have = raw.get("data_info", {}).get("tokenizer")
  if not have:
    return
  want = tokenizer_lib.load(str(cfg.data.tokenizer)).info()
  fields = ("kind", "vocab_size", "sha256")
  diffs = [f"{f}: teacher {have.get(f)!r} != student {want.get(f)!r}"
           for f in fields if have.get(f) != want.get(f)]
  if diffs:
    raise config_lib.ConfigError(
        f"{key}={ref!r}: the teacher was trained with another "
        "tokenizer (" + "; ".join(diffs) + ")")


def restore_params(workdir, tcfg, abstract_params, step, key, ref):
  """(params, step): only the params of a checkpoint, never its optimizer."""
  from llmlab import checkpoints as ckpt_lib

  mgr = ckpt_lib.Manager(workdir, tcfg.checkpoint, tcfg.train.steps,
                         read_only=True)
  try:
    steps = mgr.steps()
    if not steps:
      raise config_lib.ConfigError(
          f"{key}={ref!r}: {ckpt_lib.checkpoint_dir(workdir)} holds "
          "no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise config_lib.ConfigError(
          f"{key}={ref!r}: no checkpoint at step {step}; available: "
          f"{steps}")
    # Params only, checksum-verified, laid out by the student's mesh/rules.
    params, _ = mgr.restore_params(step, abstract_params)
  finally:
    mgr.close()
  return params, step


register("distill", prepare=prepare)(distill)


# ----------------------------------------------------------------------------
# Offline teacher logits: the train loop's per-step batch hook.
# ----------------------------------------------------------------------------


def make_batch_extras(cfg, process_index: int | None = None,
                      process_count: int | None = None):
  """`extras(step, local_batch) -> dict` of arrays to merge into the batch,
  or None when the objective reads no stored teacher logits.

  The stored rows are looked up by step, exactly like the data, so resuming
  at step s needs nothing else; the hook checks that the stored tokens are
  the batch's tokens (else the store belongs to another data order).
  """
  if cfg.objective.name != "distill" or not str(
      option(cfg.objective, "teacher_logits")):
    return None
  from llmlab import teacher_logits
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  store = teacher_logits.Store(str(cfg.objective.teacher_logits))
  return store.batch_extras(pi, pc)
