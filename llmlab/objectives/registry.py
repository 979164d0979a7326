"""Objectives, chosen by `config.objective.name` from a registry.

Every objective has one signature:

    fn(ctx: Context, params, batch, rng) -> (loss_sum, sums)

`loss_sum` is the loss *summed* over the batch's weighted positions and
`sums` a dict of summed metrics that must include `weight` (the number of
positions the loss averages over). Summing rather than averaging is what
makes gradient accumulation exact: the train step adds microbatch sums and
divides once by the total weight. The train loop never looks at the name.

Adding an objective: write the function in a module here, decorate it with
`@register("my_name")`, import the module below.

An objective that needs frozen auxiliary models (a distillation teacher)
or per-step inputs registers a `prepare(cfg, setup, load_teacher) -> Aux`
too. It runs once before compilation (so a bad teacher path fails early).
`load_teacher(ref, cfg, setup)` -> (params, shardings, model_cfg, info) is
supplied by the caller (llmlab/runs.py), so objectives stay pure losses that
never read run directories. `Aux.params` are passed to every step as a
separate, non-donated, non-differentiated input laid out by
`Aux.shardings`; `Aux.batch_extras(step, local_batch) -> dict`, if set, adds
arrays to every batch (stored teacher logits); `Aux.info` is logged (e.g.
the teacher's size) and may add `flops_per_token` that MFU counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from llmlab.config import ConfigError

_REGISTRY: dict[str, Callable] = {}
_PREPARE: dict[str, Callable] = {}
_CHUNKED: set[str] = set()  # objectives that support Context.logits_chunk


@dataclasses.dataclass
class Aux:
  params: Any = None
  shardings: Any = None
  info: dict = dataclasses.field(default_factory=dict)
  batch_extras: Callable | None = None  # (data step, local batch) -> dict


@dataclasses.dataclass(frozen=True)
class Context:
  """What an objective may use besides params/batch/rng.

  `apply` runs the student model: apply(params, batch, rng, train) -> logits.
  `aux` holds frozen auxiliary models/params (e.g. a distillation teacher);
  they are inputs of the jitted step, never differentiated or optimized.
  `logits_chunk` (config model.logits_chunk; 0 = off) asks for the loss a
  chunk of positions at a time, never the whole [B, L, V] logits: then
  `hidden(params, batch, rng, train)` -> (hidden states [B, L, D],
  project) where project(h_BxCxD) -> float32 logits [B, C, V]. Only
  objectives registered with `chunked_logits=True` are given it.
  """

  apply: Callable
  cfg: Any  # config.objective
  aux: Any = None
  hidden: Callable | None = None
  logits_chunk: int = 0


def register(name: str, prepare: Callable | None = None,
             chunked_logits: bool = False):
  def deco(fn):
    if name in _REGISTRY:
      raise ValueError(f"objective {name!r} registered twice")
    _REGISTRY[name] = fn
    if prepare is not None:
      _PREPARE[name] = prepare
    if chunked_logits:
      _CHUNKED.add(name)
    return fn
  return deco


def check_chunked(name: str, logits_chunk: int) -> None:
  """ConfigError unless objective `name` can take its loss a chunk of
  positions at a time (config model.logits_chunk > 0)."""
  if logits_chunk and name not in _CHUNKED:
    raise ConfigError(
        f"config.model.logits_chunk={logits_chunk}: objective {name!r} needs "
        "the full logits (only "
        f"{', '.join(sorted(_CHUNKED)) or 'none'} can chunk them); set "
        "--config.model.logits_chunk=0")


def prepare(cfg, setup, load_teacher: Callable | None = None) -> Aux:
  """Auxiliary inputs of objective `cfg.objective.name` (maybe none)."""
  get(cfg.objective.name)
  fn = _PREPARE.get(cfg.objective.name)
  return fn(cfg, setup, load_teacher) if fn is not None else Aux()


def get(name: str) -> Callable:
  if name not in _REGISTRY:
    raise KeyError(f"config.objective.name={name!r}: unknown objective; "
                   f"registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)
