"""The config schema: every key llmlab understands, with its default.

Config files in `configs/` are plain Python (`get_config(arg)`, big_vision
style) that start from `base()` and override values. `validate()` runs before
anything expensive (data, compile) and names the offending key and value.
Keys other tools rely on (`model.*`, `mesh.*`, `train.*`, `checkpoint.*`,
`objective.name`, `data.*`) are a stable contract: extend, never rename.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Logical axis name -> mesh axes, tried in order (MaxText style). A mesh axis
# is used at most once per array, so `embed` falls back to replicated on
# activations whose batch already took `fsdp`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


class ConfigError(ValueError):
  """A config key has a bad value; raised before any compilation."""


def base() -> ConfigDict:
  """All keys with defaults; a config file overrides what it needs."""
  from llmlab import data as data_lib

  c = ConfigDict()
  c.name = ""
  c.init_from = ""  # DIR[:STEP]: initialise params (not optimizer) from a run

  c.model = ConfigDict(dict(
      num_layers=2, d_model=128, num_heads=4, num_kv_heads=4, head_dim=0,
      mlp_dim=512, rope_theta=10_000.0, tie_embeddings=False, qk_norm=False,
      attn_bias=False, dropout=0.0, norm_eps=1e-6, remat="none", scan_unroll=0,
      dtype="float32", param_dtype="float32", matmul_dtype="", init_std=0.02,
      attention="auto", attention_block_q=0, attention_block_kv=0))

  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1,
                           rules=DEFAULT_RULES))

  c.train = ConfigDict(dict(
      steps=100, batch_size=8, seq_len=128, microbatches=1, learning_rate=3e-3,
      seed=0, log_every=10, eval_every=0, eval_tokens=65_536,
      eval_batch_size=0, peak_flops=0.0, max_to_host_lag=1))

  c.optim = ConfigDict(dict(
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      schedule="cosine", warmup_steps=10, decay_fraction=0.2,
      final_lr_fraction=0.1))

  c.checkpoint = ConfigDict(dict(
      every_steps=0, keep=2, sweep_points=0, sweep_min_fraction=0.1,
      keep_at_steps=(), async_save=True))

  c.objective = ConfigDict(dict(name="next_token", z_loss=0.0,
                                label_smoothing=0.0))
  # Objective-specific keys live beside their objective.
  from llmlab.objectives import distill
  c.objective.update(distill.OBJECTIVE_DEFAULTS)

  c.data = data_lib.default_config()

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
  _require(m.remat in ("none", "full", "dots"), "model.remat", m.remat,
           "must be one of none, full, dots")
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
  _require(t.batch_size % t.microbatches == 0, "train.microbatches",
           t.microbatches, f"must divide train.batch_size={t.batch_size}")
  _require(t.learning_rate > 0, "train.learning_rate", t.learning_rate,
           "must be positive")
  _require(isinstance(t.seed, int) and 0 <= t.seed < 2**32, "train.seed",
           t.seed, "must be an integer in [0, 2**32)")
  _require(o.schedule in ("cosine", "constant", "wsd"), "optim.schedule",
           o.schedule, "must be one of cosine, constant, wsd")
  _require(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction",
           o.decay_fraction, "must be in [0, 1]")
  _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps,
           "must be >= 0")
  _require(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps",
           cfg.checkpoint.every_steps, "must be >= 0 (0 = final only)")
  _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep,
           "must be >= 1")
  if "guard" in cfg:
    _validate_guard(cfg.guard)
  if num_devices is not None:
    from llmlab import sharding
    shape = sharding.mesh_shape(cfg.mesh, num_devices)
    dp = shape[0] * shape[1]
    micro = t.batch_size // t.microbatches
    _require(micro % dp == 0, "train.batch_size", t.batch_size,
             f"the per-microbatch batch {micro} must be divisible by the "
             f"data-parallel size data*fsdp={dp} (mesh {shape})")


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
