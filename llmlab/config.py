"""The config schema: every key llmlab understands, with its default.

Config files in `configs/` are plain Python (`get_config(arg)`, big_vision
style) that start from `base()` and override values. `validate()` runs before
anything expensive (data, compile) and names the offending key and value.
Keys other tools rely on (`model.*`, `mesh.*`, `train.*`, `checkpoint.*`,
`objective.name`, `data.*`) are a stable contract: extend, never rename.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from llmlab import errors

ConfigDict = ml_collections.ConfigDict

# Logical axis name -> mesh axes, tried in order (MaxText style). A mesh axis
# is used at most once per array, so `embed` falls back to replicated on
# activations whose batch already took `fsdp`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),  # activations' sequence: context parallelism
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


# `config.objective` keys beyond the name, for every objective of
# llmlab/objectives (distill and on_policy_distill read them).
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


ConfigError = errors.ConfigError  # a config key has a bad value

# model.remat: none | full | dots, and MaxText's host-offloading names
# (llmlab/model.py `_REMAT`): what dots keeps, moved to pinned host memory.
REMATS = ("none", "full", "dots", "offload_dots", "minimal_offloaded")
OFFLOAD_REMATS = ("offload_dots", "minimal_offloaded")
QUANTS = ("none", "int8", "fp8")  # model.quant (llmlab/quant.py)
OFFLOADS = ("none", "host")  # optim.offload


def data_defaults() -> ConfigDict:
  """The `config.data` group (keys documented in llmlab/data/config.py)."""
  return ConfigDict(dict(
      source="stdlib",
      mixture="",
      tokenizer="byte",
      val_fraction=0.02,
      decode_errors="error",
      cache_dir="",
      prefetch=16,
      num_threads=2,
      unique_tokens=0,  # > 0: train on the first U tokens, repeated
      stdlib=dict(max_file_bytes=1_000_000, include="", exclude=""),
      # 'prose' source: docstrings and comments of those stdlib files
      # (llmlab/data/prose.py), further sliced by these patterns.
      prose=dict(include="", exclude=""),
      # 'A=stdlib,B=prose': also evaluate each named source alone at every
      # eval (eval_loss_A, eval/loss_A, ...); '' = off (data/config.py).
      domains="",
      files=dict(paths="", text_field="text", column="text"),
      synthetic=dict(seed=0, order=2, num_symbols=16, branching=3,
                     num_docs=1000, doc_len=256),
      tokens=dict(path=""),
  ))


def base() -> ConfigDict:
  """All keys with defaults; a config file overrides what it needs."""
  c = ConfigDict()
  c.name = ""
  c.init_from = ""  # DIR[:STEP]: initialise params (not optimizer) from a run

  c.model = ConfigDict(dict(
      num_layers=2, d_model=128, num_heads=4, num_kv_heads=4, head_dim=0,
      mlp_dim=512, rope_theta=10_000.0, tie_embeddings=False, qk_norm=False,
      attn_bias=False, dropout=0.0, norm_eps=1e-6, remat="none", scan_unroll=0,
      dtype="float32", param_dtype="float32", matmul_dtype="", init_std=0.02,
      attention="auto", attention_block_q=0, attention_block_kv=0,
      logits_chunk=0,  # >0: the loss projects this many positions at a time
      # Quantised training (qwix, llmlab/quant.py): the layers' weight
      # matmuls in int8 or fp8, forward and backward; params stay float.
      quant="none"))

  # context: devices that split each sequence (context parallelism,
  # llmlab/attention.py); must divide train.seq_len into 2*context chunks.
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1, dcn_data=1,
                           rules=DEFAULT_RULES))

  c.train = ConfigDict(dict(
      steps=100, batch_size=8, seq_len=128, microbatches=1, learning_rate=3e-3,
      seed=0, log_every=10, eval_every=0, eval_tokens=65_536,
      eval_at_steps=(),  # also evaluate after these steps (loss curves)
      eval_batch_size=0, peak_flops=0.0, max_to_host_lag=1,
      wandb="",  # "project[/entity]": also log to Weights & Biases
      profile_steps="",  # "A:B": jax.profiler trace of steps A..B
      # No step for this long: dump stacks, exit 75 (llmlab/watchdog.py).
      # -1: auto (1800 s on multi-process jobs or a remote workdir, else
      # off); 0: off.
      hang_timeout_s=-1.0))

  c.optim = ConfigDict(dict(
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      schedule="cosine", warmup_steps=10, decay_fraction=0.2,
      final_lr_fraction=0.1,
      schedule_file="",  # schedule="file": JSON of every update's rate
      # host: optimizer state lives in pinned host memory, moved to the
      # device for the update each step (llmlab/steps.py).
      offload="none"))

  c.checkpoint = ConfigDict(dict(
      every_steps=0, keep=2, sweep_points=0, sweep_min_fraction=0.1,
      keep_at_steps=(), async_save=True))

  c.objective = ConfigDict(dict(name="next_token", z_loss=0.0,
                                label_smoothing=0.0, **OBJECTIVE_DEFAULTS))

  c.data = data_defaults()

  # Guardrails for long runs (llmlab/guard.py, docs/reliability.md).
  c.guard = ConfigDict(dict(
      policy="stop",          # on divergence: stop | skip | rollback
      spike_factor=0.0,       # loss > factor x running median is a spike; 0 = off
      spike_window=32,        # losses in the running median
      max_rollbacks=3,        # policy=rollback: then stop
      on_save_error="stop",   # failed checkpoint write: stop | retry
      save_retries=3,         # on_save_error=retry: consecutive failures allowed
      save_retry_wait_s=5.0,  # pause before a retry
      lock=True,              # one writer per workdir
      preflight=True,         # AOT compile + XLA memory analysis before step 1
      debug_nan_step=0,       # debug: NaN loss on batch k (fire drill); 0 = off
      debug_spike_step=0))    # debug: loss x 100 on batch k; 0 = off
  return c


def merge_defaults(cfg: ConfigDict) -> ConfigDict:
  """Fill missing keys from `base()`; unknown keys are an error."""
  full = base()
  _merge(full, cfg, prefix="")
  return full


def with_overrides(cfg: ConfigDict, overrides: dict) -> ConfigDict:
  """`merge_defaults(cfg)` with dotted keys set, as `--config.train.steps=10`
  would set them: {"train.steps": 10, "model.d_model": 32}."""
  full = merge_defaults(cfg)
  for key, value in overrides.items():
    *groups, name = key.split(".")
    node = full
    for g in groups:
      node = node.get(g) if isinstance(node, ConfigDict) else None
    if not isinstance(node, ConfigDict) or name not in node or isinstance(
        node[name], ConfigDict):
      raise ConfigError(f"unknown config key {key!r} (value {value!r}): "
                        "give group.key")
    node[name] = value
  return full


def merge(schema: ConfigDict, cfg: ConfigDict) -> ConfigDict:
  """`cfg`'s values over `schema` (every key with its default; a study's
  own schema, e.g. llmlab/scaling/study.py); unknown keys are an error."""
  _merge(schema, cfg, prefix="")
  return schema


def _merge(dst: ConfigDict, src: ConfigDict, prefix: str) -> None:
  for key, value in src.items():
    path = f"{prefix}{key}"
    if key not in dst:
      raise ConfigError(f"unknown config key {path!r} (value {value!r}); "
                        f"known keys here: {sorted(dst.keys())}")
    if isinstance(dst[key], ConfigDict):
      if not isinstance(value, (ConfigDict, dict)):
        raise ConfigError(f"config key {path!r} must be a group, got {value!r}")
      _merge(dst[key], ConfigDict(value) if isinstance(value, dict) else value,
             prefix=path + ".")
    elif isinstance(value, ConfigDict):
      if dst[key] is None or isinstance(dst[key], (dict,)):
        dst[key] = value
      else:
        raise ConfigError(f"config key {path!r} must be a value, got a group")
    else:
      with dst.ignore_type():
        dst[key] = value


def _require(cond: bool, key: str, value: Any, why: str) -> None:
  if not cond:
    raise ConfigError(f"config.{key}={value!r}: {why}")


require = _require  # the studies' schemas check their keys the same way


def validate(cfg: ConfigDict, num_devices: int | None = None) -> None:
  """Checks that need no data and no compilation."""
  m, t, o = cfg.model, cfg.train, cfg.optim
  for key in ("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim"):
    _require(isinstance(m[key], int) and m[key] > 0, f"model.{key}", m[key],
             "must be a positive integer")
  if not m.head_dim:
    _require(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
             f"must divide model.d_model={m.d_model} (or set model.head_dim)")
  _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
           m.num_kv_heads, f"must divide model.num_heads={m.num_heads}")
  _require((m.head_dim or m.d_model // m.num_heads) % 2 == 0, "model.head_dim",
           m.head_dim, "head size must be even for RoPE")
  _require(m.remat in REMATS, "model.remat", m.remat,
           f"must be one of {', '.join(REMATS)}")
  _require(m.get("quant", "none") in QUANTS, "model.quant",
           m.get("quant", "none"), f"must be one of {', '.join(QUANTS)}")
  _require(o.get("offload", "none") in OFFLOADS, "optim.offload",
           o.get("offload", "none"), f"must be one of {', '.join(OFFLOADS)}")
  _require(m.matmul_dtype in ("", "float32", "bfloat16"), "model.matmul_dtype",
           m.matmul_dtype, 'must be "" (= model.dtype), "float32" or "bfloat16"')
  _require(m.attention in ("auto", "xla", "splash", "cudnn"), "model.attention",
           m.attention, "must be one of auto, xla, splash, cudnn")
  _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
  _require(isinstance(m.scan_unroll, int) and m.scan_unroll >= 0,
           "model.scan_unroll", m.scan_unroll,
           "must be an integer >= 0 (0 = auto: unrolled on CPU, 1 elsewhere)")
  for key in ("steps", "batch_size", "seq_len", "microbatches", "log_every"):
    _require(isinstance(t[key], int) and t[key] > 0, f"train.{key}", t[key],
             "must be a positive integer")
  chunk = m.get("logits_chunk", 0)
  _require(isinstance(chunk, int) and chunk >= 0 and
           (chunk == 0 or t.seq_len % chunk == 0), "model.logits_chunk",
           chunk, f"must be 0 (off) or a divisor of train.seq_len={t.seq_len}")
  _require(t.batch_size % t.microbatches == 0, "train.microbatches",
           t.microbatches, f"must divide train.batch_size={t.batch_size}")
  _require(profile_range(t.get("profile_steps", "")) is not None,
           "train.profile_steps", t.get("profile_steps", ""),
           'must be "" (off) or "A:B" with 2 <= A <= B (steps A..B)')
  hang = t.get("hang_timeout_s", -1.0)
  _require(isinstance(hang, (int, float)) and not isinstance(hang, bool) and
           (hang in (-1, 0) or hang >= 1), "train.hang_timeout_s", hang,
           "must be -1 (auto: 1800 s on multi-process jobs or a remote "
           "workdir, else off), 0 (off) or a number of seconds >= 1")
  _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate,
           "must be positive")
  _require(isinstance(t.seed, int) and 0 <= t.seed < 2**32, "train.seed",
           t.seed, "must be an integer in [0, 2**32)")
  _require(o.schedule in ("cosine", "constant", "wsd", "file"),
           "optim.schedule", o.schedule,
           "must be one of cosine, constant, wsd, file")
  _require(o.schedule != "file" or bool(o.get("schedule_file")),
           "optim.schedule_file", o.get("schedule_file"),
           "optim.schedule='file' needs a schedule file (llmlab schedule "
           "writes one)")
  _require(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction",
           o.decay_fraction, "must be in [0, 1]")
  _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps,
           "must be >= 0")
  _require(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps",
           cfg.checkpoint.every_steps, "must be >= 0 (0 = final only)")
  _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep,
           "must be >= 1")
  # storage.is_remote's test, written here: config imports only the errors.
  cache = str(cfg.data.get("cache_dir", "") or "")
  _require("://" not in cache, "data.cache_dir", cache,
           "must be a local directory: the token cache is memory-mapped (a "
           "corpus in a bucket is read through data.files.paths or a token store)")
  if "guard" in cfg:
    _validate_guard(cfg.guard)
  _validate_context(cfg)
  if num_devices is not None:
    shape = mesh_shape(cfg.mesh, num_devices)
    dp = shape[0] * shape[1]
    micro = t.batch_size // t.microbatches
    _require(micro % dp == 0, "train.batch_size", t.batch_size,
             f"the per-microbatch batch {micro} must be divisible by the "
             f"data-parallel size data*fsdp={dp} (mesh {shape})")


def _validate_context(cfg: ConfigDict) -> None:
  """mesh.context: each of its devices holds chunks i and 2c-1-i of every
  sequence (causal load balancing), so 2*context must divide seq_len; and
  the rules must put the activations' `length` on the axis, or it would
  only replicate work."""
  ctx, seq = cfg.mesh.get("context", 1), cfg.train.seq_len
  _require(isinstance(ctx, int) and not isinstance(ctx, bool) and ctx >= 1,
           "mesh.context", ctx, "must be a positive integer (1 = off)")
  if ctx == 1:
    return
  _require(seq % (2 * ctx) == 0, "mesh.context", ctx,
           f"2*mesh.context={2 * ctx} must divide train.seq_len={seq} (each "
           "device holds two of 2*context equal chunks of every sequence)")
  length = dict((k, v) for k, v in reversed(list(cfg.mesh.rules))).get(
      "length")
  names = length if isinstance(length, (tuple, list)) else (length,)
  _require("context" in names, "mesh.context", ctx,
           f"mesh.rules map 'length' to {length!r}: context parallelism needs "
           "('length', 'context') in mesh.rules")


def profile_range(text: str) -> tuple[int, int] | None:
  """train.profile_steps "A:B" -> (A, B); "" -> (0, 0) (off); None if
  malformed. Step 1 cannot be traced: the trace starts after step A-1."""
  if not text:
    return (0, 0)
  first, sep, last = str(text).partition(":")
  if not (sep and first.strip().isdigit() and last.strip().isdigit()):
    return None
  first, last = int(first), int(last)
  return (first, last) if 2 <= first <= last else None


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int, int]:
  """(data, fsdp, context, tensor) with -1 meaning 'all remaining devices'
  (context is never -1: it is a choice about sequences, not a remainder).

  `data` here is the total data-parallel size: dcn_data (slices, over the
  data-centre network) times the data size within a slice. Lives here, not
  in sharding.py, because validation needs it and config imports nothing.
  """
  dcn = int(mesh_cfg.get("dcn_data", 1) or 1)
  sizes = {"data": int(mesh_cfg.data), "fsdp": int(mesh_cfg.fsdp),
           "tensor": int(mesh_cfg.tensor)}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f"only one of mesh.data/fsdp/tensor may be -1, got {sizes}")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise ConfigError(f"config.mesh.{k}={v}: must be a positive int or -1")
  ctx = int(mesh_cfg.get("context", 1))
  if ctx < 1:
    raise ConfigError(f"config.mesh.context={ctx}: must be a positive int")
  fixed = math.prod(v for v in sizes.values() if v != -1) * dcn * ctx
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh {sizes} (context={ctx}, dcn_data={dcn}) cannot fill "
          f"{num_devices} devices: "
          f"{num_devices} is not divisible by {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) * dcn * ctx != num_devices:
    raise ConfigError(
        f"config.mesh data={sizes['data']} x fsdp={sizes['fsdp']} x "
        f"context={ctx} x tensor={sizes['tensor']} x dcn_data={dcn} = "
        f"{math.prod(sizes.values()) * dcn * ctx} devices, but {num_devices} "
        "are available")
  return (sizes["data"] * dcn, sizes["fsdp"], ctx, sizes["tensor"])


def _validate_guard(g: ConfigDict) -> None:
  _require(g.policy in ("stop", "skip", "rollback"), "guard.policy", g.policy,
           "must be one of stop, skip, rollback")
  _require(g.spike_factor == 0 or g.spike_factor > 1, "guard.spike_factor",
           g.spike_factor, "must be 0 (off) or > 1")
  minimum = {"spike_window": 1, "max_rollbacks": 0, "save_retries": 0,
             "debug_nan_step": 0, "debug_spike_step": 0}
  for key, low in minimum.items():
    _require(isinstance(g[key], int) and g[key] >= low, f"guard.{key}",
             g[key], f"must be an integer >= {low}")
  _require(g.on_save_error in ("stop", "retry"), "guard.on_save_error",
           g.on_save_error, "must be one of stop, retry")
  _require(g.save_retry_wait_s >= 0, "guard.save_retry_wait_s",
           g.save_retry_wait_s, "must be >= 0")


def to_dict(cfg: ConfigDict) -> dict:
  """JSON-able nested dict (tuples become lists)."""
  return json.loads(cfg.to_json_best_effort())


def model_shape_keys(cfg: ConfigDict) -> dict:
  """The keys that must match to resume or restore params."""
  m = cfg.model
  return {f"model.{k}": m[k] for k in (
      "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
      "mlp_dim", "tie_embeddings", "qk_norm", "attn_bias")}


def _law(form: str, bootstrap: int) -> ConfigDict:
  return ConfigDict(dict(
      form=form,                # a law of llmlab/scaling/forms.py
      bootstrap=bootstrap,      # resamples for its 95% intervals
      min_fraction=0.0,         # fit points from this share of a run on
      params_column="params"))  # its N: params | params_nonembed


def study_defaults() -> ConfigDict:
  """Every key of `llmlab study` (llmlab/scaling/study.py, which checks
  them), with its default; `base`, `family`, `target` and `steps` have
  none. A study config file starts from this and overrides what it needs."""
  return ConfigDict(dict(
      base=None,             # the train config every run derives from
      family=[],             # (name, model overrides) pairs, smallest first
      target=None,           # (name, model overrides): held out, predicted
      steps=0,               # per main run
      decay_fraction=0.2,    # WSD decay share of each (branch) run
      points=4,              # branch points per size
      min_fraction=0.3,      # earliest branch end, as share of tokens
      are_fraction=0.7,      # ARE over target points >= this share of final
      eval_tokens=65_536,    # held-out tokens of every fitted point
      fit=_law("chinchilla", 200),  # the law of (N, D) on the branch ends
      # What the law is fitted on: "branches" (annealed endpoints) or
      # "curves" (every eval along the main runs; no branch runs).
      fit_on="branches",
      run_branches=False,    # curves: also train branches, as held-out
      curve_points=0,        # evals along each main run (0: none)
      curve_spacing="linear",  # "linear" or "log", from warmup's end
      curve_fit=_law("multipower_e", 100),  # the law of whole loss curves
      # Run-to-run noise: the noise member ("": the largest) re-trained with
      # this many more seeds; their spread widens the target's intervals.
      noise_seeds=0,
      noise_member="",
      fit_seeds=False,       # the seed re-runs are fitted too
      # Runs trained side by side: the devices split into this many equal
      # groups, each training one run at a time, largest first (on a CPU,
      # `llmlab study` simulates this many devices; 1: one after another).
      parallel=1,
      # A plumbing variant's name ("smoke", "test"): its report says it makes
      # no scientific claim (llmlab/report_notes.py); "" for the study.
      variant=""))
