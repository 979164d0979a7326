"""Read side of an offline teacher-logits store (written by
`llmlab teacher-logits`, llmlab/teacher_logits.py; layout documented there).

It is data: per-step arrays looked up by step exactly like the batches, so
the distillation objective can merge them into each batch without knowing
anything about run directories or models.
"""

from __future__ import annotations

import io

import numpy as np

from llmlab import config as config_lib
from llmlab import errors
from llmlab import storage

FORMAT = "llmlab-teacher-logits-v1"
# Data keys that change batches (the rest, e.g. prefetch, only change speed).
_SPEED_ONLY_DATA_KEYS = ("prefetch", "num_threads", "cache_dir")


def shard_name(start: int) -> str:
  return f"steps_{start:08d}.npz"


def data_identity(cfg) -> dict:
  """What determines the training batches: data config, seed and shapes."""
  data = {k: v for k, v in config_lib.to_dict(cfg)["data"].items()
          if k not in _SPEED_ONLY_DATA_KEYS}
  return {"data": data, "seed": int(cfg.train.seed),
          "seq_len": int(cfg.train.seq_len),
          "global_batch": int(cfg.train.batch_size)}


class Store:
  """Read side: validation against a training config, per-step lookup."""

  def __init__(self, path: str):
    self.path = path
    index = storage.join(path, "index.json")
    if not storage.exists(index):
      raise config_lib.ConfigError(
          f"config.objective.teacher_logits={path!r}: no {index}; write the "
          "store with `llmlab teacher-logits --teacher=... --config=... "
          f"--out={path}`")
    self.index = storage.read_json(index)
    if self.index.get("format") != FORMAT:
      raise config_lib.ConfigError(
          f"{index}: format {self.index.get('format')!r}, expected {FORMAT!r}")
    if not self.index.get("complete"):
      raise config_lib.ConfigError(
          f"{index}: the store is incomplete (its writer was interrupted); "
          "re-run the same `llmlab teacher-logits` command to finish it")
    self.top_k = int(self.index["top_k"])
    self.steps = int(self.index["steps"])
    self.chunk = int(self.index["chunk_steps"])
    self._cached = (None, None)

  def teacher_info(self) -> dict:
    return dict(self.index.get("teacher", {}))

  def check_compatible(self, cfg, vocab_size: int) -> None:
    """ConfigError unless this store covers run `cfg`'s batches."""
    where = f"config.objective.teacher_logits={self.path!r}"
    diffs = []
    if self.index["vocab_size"] != vocab_size:
      diffs.append(f"vocab_size: store {self.index['vocab_size']} != student "
                   f"{vocab_size}")
    want = data_identity(cfg)
    for key, value in want.items():
      if key == "data":
        diffs += [f"data.{k}: store {self.index['data'].get(k)!r} != config "
                  f"{v!r}" for k, v in value.items()
                  if self.index["data"].get(k) != v]
      elif self.index[key] != value:
        diffs.append(f"{key}: store {self.index[key]!r} != config {value!r}")
    if diffs:
      raise config_lib.ConfigError(
          f"{where}: stored for other batches (" + "; ".join(diffs) + ")")
    if cfg.train.steps > self.steps:
      raise config_lib.ConfigError(
          f"{where}: holds steps [0, {self.steps}) but config.train.steps="
          f"{cfg.train.steps}; write a longer store (--steps)")
    k = int(cfg.objective.get("top_k", 0))
    if k > self.top_k:
      raise config_lib.ConfigError(
          f"config.objective.top_k={k}: the store {self.path!r} holds only "
          f"the top {self.top_k}")

  def chunk_arrays(self, step: int) -> dict:
    """The shard holding `step` (kept in memory until the next shard)."""
    if not 0 <= step < self.steps:
      raise IndexError(f"{self.path}: step {step} not in [0, {self.steps})")
    start = step - step % self.chunk
    if self._cached[0] != start:
      path = storage.join(self.path, shard_name(start))
      with np.load(io.BytesIO(storage.read_bytes(path))) as z:
        self._cached = (start, {k: z[k] for k in ("ids", "logprobs",
                                                  "tokens")})
    return self._cached[1]

  def batch_extras(self, process_index: int, process_count: int):
    """extras(step, local_batch) -> {teacher_ids, teacher_logprobs} of this
    process's rows (process p owns rows [p B, (p+1) B) of the global batch,
    as in `llmlab/data/pipeline.py`)."""
    g = int(self.index["global_batch"])
    b = g // process_count
    lo = process_index * b

    def extras(step: int, local_batch: dict) -> dict:
      arrays = self.chunk_arrays(step)
      i = step % self.chunk
      tokens = arrays["tokens"][i, lo:lo + b]
      if not np.array_equal(tokens, np.asarray(local_batch["tokens"])):
        raise errors.DataError(
            f"{self.path}: the stored tokens of step {step} differ from the "
            "training batch: the store was written for another data order "
            "(data config, seed, batch size or sequence length)")
      return {"teacher_ids": arrays["ids"][i, lo:lo + b].astype(np.int32),
              "teacher_logprobs": arrays["logprobs"][i, lo:lo + b]}
    return extras
