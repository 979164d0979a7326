"""The continual study's design (llmlab/studies/continual.py): run names,
the plan's cells and their parsing; no jax, no training."""

from __future__ import annotations

import dataclasses

import numpy as np

from llmlab import config as config_lib

PRUNE = ("magnitude", "activation", "learned")  # llmlab/compress/prune.py
REINIT = ("shrink_perturb", "reinit_top", "reinit_bottom")
STARTS = ("full",) + PRUNE


# ------------------------------------------------------------------ names


@dataclasses.dataclass(frozen=True)
class Run:
  """One continued run of the plan."""
  source: str  # source name ('' for scratch)
  target: str  # target name, or the source's name for `full`
  method: str  # full | magnitude | activation | learned | scratch, +reinit
  replay: float
  seed: int
  distill: bool = False
  role: str = "law"  # law | method | seed | replay_check

  @property
  def name(self) -> str:
    src = f"{self.source}-" if self.source else ""
    d = "-distill" if self.distill else ""
    return (f"{src}{self.target}-{self.method}{d}-r{self.replay:g}"
            f"-seed{self.seed}")

  @property
  def prune(self) -> str:
    return self.method.split("+")[0]

  @property
  def reinit(self) -> str:
    return self.method.split("+")[1] if "+" in self.method else ""

  @property
  def start(self) -> str:
    """The start directory's name under DIR/starts ('' = none needed)."""
    if self.method == "scratch" or self.method == "full":
      return ""
    return f"{self.source}-{self.target}-{self.method}"


def models(scfg, key: str) -> dict:
  return {name: dict(model) for name, model in scfg[key]}


def source_names(scfg) -> list[str]:
  return [name for name, _ in scfg.sources]


def target_model(scfg, r: Run) -> dict:
  if r.method.split("+")[0] == "full":
    return models(scfg, "sources")[r.source]
  return models(scfg, "targets")[r.target]


# ------------------------------------------------------------------- plan


def parse_cell(scfg, cell: str, key: str, with_replay: bool):
  parts = str(cell).split("/")
  if len(parts) != (3 if with_replay else 2):
    form = "source/target/replay" if with_replay else "source/target"
    raise config_lib.ConfigError(f"config.{key}: {cell!r} is not {form}")
  src, tgt = parts[0], parts[1]
  if src not in source_names(scfg):
    raise config_lib.ConfigError(f"config.{key}: {cell!r}: unknown source "
                                 f"{src!r}; known: {source_names(scfg)}")
  if tgt != "full" and tgt not in models(scfg, "targets"):
    raise config_lib.ConfigError(
        f"config.{key}: {cell!r}: unknown target {tgt!r}; known: "
        f"{sorted(models(scfg, 'targets'))} or 'full'")
  replay = float(scfg.replay)
  if with_replay:
    try:
      replay = float(parts[2])
    except ValueError:
      raise config_lib.ConfigError(f"config.{key}: {cell!r}: replay "
                                   f"{parts[2]!r} is not a number") from None
    check_ratio(replay, f"config.{key}: {cell!r}: replay ratio")
  return src, tgt, replay


def check_ratio(r: float, where: str) -> None:
  if not 0.0 <= r <= 1.0 or not np.isfinite(r):
    raise config_lib.ConfigError(f"{where} {r!r}: must be in [0, 1]")


def cell_run(scfg, src, tgt, replay, method, seed, role, distill=False):
  """A cell's run; scratch keeps its source only as a teacher."""
  del scfg
  if tgt == "full":
    method = "full"
  if method.split("+")[0] == "full":
    return Run(src, src, method, replay, seed, distill, role)
  if method == "scratch":
    return Run(src if distill else "", tgt, "scratch", replay, seed, distill,
               role)
  return Run(src, tgt, method, replay, seed, distill, role)


def plan(scfg) -> list[Run]:
  """Every continued run but the replay check, in training order, without
  duplicates (a cell of two designs trains once, with its first role)."""
  seed = int(scfg.continue_seed)
  out: list[Run] = []
  for cell in scfg.grid:
    src, tgt, r = parse_cell(scfg, cell, "grid", True)
    out.append(cell_run(scfg, src, tgt, r, str(scfg.law_method), seed, "law"))
    if tgt != "full":
      out.append(cell_run(scfg, src, tgt, r, "scratch", seed, "law"))
  for cell in scfg.method_at:
    src, tgt, _ = parse_cell(scfg, cell, "method_at", False)
    for m in scfg.methods:
      out.append(cell_run(scfg, src, tgt, float(scfg.replay), m, seed,
                           "method"))
    for m in scfg.distill_methods:
      out.append(cell_run(scfg, src, tgt, float(scfg.replay), m, seed,
                           "method", distill=True))
  for s in scfg.get("law_seeds", ()):  # every law cell's start method again
    for cell in scfg.grid:
      src, tgt, r = parse_cell(scfg, cell, "grid", True)
      out.append(cell_run(scfg, src, tgt, r, str(scfg.law_method), int(s), "seed"))
  if scfg.method_at:
    src, tgt, _ = parse_cell(scfg, scfg.method_at[0], "method_at", False)
    for s in scfg.extra_seeds:
      for m in scfg.seed_methods:
        out.append(cell_run(scfg, src, tgt, float(scfg.replay), m, int(s),
                             "seed"))
  seen, unique = set(), []
  for r in out:
    if r.name not in seen:
      seen.add(r.name)
      unique.append(r)
  return unique


def replay_check_runs(scfg, ratio: float) -> list[Run]:
  """The held-out replay measurement: the largest source, `replay_at`'s
  target, the law method, at the predicted ratio."""
  src, tgt = replay_cell(scfg)
  return [dataclasses.replace(
      cell_run(scfg, src, tgt, ratio, str(scfg.law_method),
                int(scfg.continue_seed), "replay_check"))]


def replay_cell(scfg):
  src, tgt, _ = parse_cell(scfg, scfg.replay_at, "replay_at", False)
  return src, tgt


