"""Offline teacher logits: one teacher pass that many students train from.

    llmlab teacher-logits --teacher=DIR[:STEP] --config=STUDENT_CONFIG \
        --out=PATH [--top_k=16] [--chunk_steps=100] [--steps=N]

runs the teacher over the student config's training batches 0..N-1 and
stores, for every position, the teacher's top-k token ids and their
(full-softmax, T=1) log-probs. A student then trains with
`--config.objective.name=distill --config.objective.teacher_logits=PATH`.

Layout (a directory, sharded by chunks of steps so it is a pure function
of the step, like the data):

    PATH/index.json            what was stored and for which data order
    PATH/steps_00000000.npz    steps [0, C):  ids [C, G, L, k],
                               logprobs float32 [C, G, L, k], tokens [C, G, L]
    PATH/steps_000000C0.npz    steps [C, 2C) ...

G is the global batch, L the sequence length. Each shard is written to a
temporary name and renamed, and `index.json` says `complete` only at the
end; re-running the same command skips the shards already written. The
stored tokens let the training loop check, per step, that the store
belongs to the run's data order.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from llmlab import config as config_lib

FORMAT = "llmlab-teacher-logits-v1"
# Data keys that change batches (the rest, e.g. prefetch, only change speed).
_SPEED_ONLY_DATA_KEYS = ("prefetch", "num_threads", "cache_dir")


def _shard_name(start: int) -> str:
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
    index = os.path.join(path, "index.json")
    if not os.path.exists(index):
      raise config_lib.ConfigError(
          f"config.objective.teacher_logits={path!r}: no {index}; write the "
          "store with `llmlab teacher-logits --teacher=... --config=... "
          f"--out={path}`")
    with open(index) as f:
      self.index = json.load(f)
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
      path = os.path.join(self.path, _shard_name(start))
      with np.load(path) as z:
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
        raise ValueError(
            f"{self.path}: the stored tokens of step {step} differ from the "
            "training batch: the store was written for another data order "
            "(data config, seed, batch size or sequence length)")
      return {"teacher_ids": arrays["ids"][i, lo:lo + b].astype(np.int32),
              "teacher_logprobs": arrays["logprobs"][i, lo:lo + b]}
    return extras


# ----------------------------------------------------------------------------
# Write side.
# ----------------------------------------------------------------------------


def _top_k_fn(teacher, shardings, batch_sharding, k: int):
  """Jitted (teacher, batch) -> (ids [B, L, k], log-probs [B, L, k])."""
  def fn(t, batch):
    logp = jax.nn.log_softmax(t.logits(batch), axis=-1)
    vals, ids = jax.lax.top_k(logp, k)
    return ids, vals
  return jax.jit(fn, in_shardings=(shardings, batch_sharding))


def write(teacher_ref: str, cfg, out: str, top_k: int = 16,
          chunk_steps: int = 100, steps: int = 0) -> dict:
  """Stores the teacher's top-k for batches [0, steps) of config `cfg`."""
  import flax.linen as nn
  from llmlab import data as data_lib
  from llmlab import sharding as shd
  from llmlab import steps as steps_lib
  from llmlab.data import tokenizer as tokenizer_lib
  from llmlab.objectives import distill

  if jax.process_count() > 1:
    raise RuntimeError("llmlab teacher-logits runs in one process (it uses "
                       "every local device); start it without a coordinator")
  cfg = config_lib.merge_defaults(cfg)
  config_lib.validate(cfg, jax.device_count())
  steps = int(steps or cfg.train.steps)
  for name, value in (("--top_k", top_k), ("--chunk_steps", chunk_steps),
                      ("--steps", steps)):
    if value < 1:
      raise config_lib.ConfigError(f"{name}={value}: must be >= 1")
  vocab = tokenizer_lib.load(str(cfg.data.tokenizer)).vocab_size
  if top_k > vocab:
    raise config_lib.ConfigError(f"--top_k={top_k}: larger than the "
                                 f"vocabulary ({vocab})")
  mesh = shd.make_mesh(cfg.mesh)
  setup = steps_lib.build(cfg, vocab, mesh)
  # The teacher is checked first: a bad path fails before reading the data.
  teacher, shardings, info = distill.load_teacher(teacher_ref, cfg, setup,
                                                  key="--teacher")
  data = data_lib.build(cfg.data, seq_len=cfg.train.seq_len,
                        global_batch=cfg.train.batch_size, seed=cfg.train.seed)
  index = dict(format=FORMAT, complete=False, teacher=info, top_k=top_k,
               chunk_steps=chunk_steps, steps=steps,
               vocab_size=data.vocab_size,
               data_fingerprint=data.info["fingerprint"],
               **data_identity(cfg))
  _start_index(out, index)
  fn = _top_k_fn(teacher, shardings, setup.batch_sharding, top_k)
  id_dtype = np.uint16 if data.vocab_size <= 65536 else np.int32
  t0 = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
    for start in range(0, steps, chunk_steps):
      path = os.path.join(out, _shard_name(start))
      if os.path.exists(path):
        continue
      rows = [data.train_batch(s) for s in range(start,
                                                 min(start + chunk_steps,
                                                     steps))]
      outs = [fn(teacher, shd.global_batch(r, setup.batch_sharding))
              for r in rows]
      ids, logp = zip(*jax.device_get(outs))
      _save(path, ids=np.stack(ids).astype(id_dtype),
            logprobs=np.stack(logp).astype(np.float32),
            tokens=np.stack([r["tokens"] for r in rows]))
  index["complete"] = True
  _write_json(os.path.join(out, "index.json"), index)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  return {"out": out, "steps": steps, "top_k": top_k, "bytes": size,
          "wall_s": time.time() - t0, "teacher": info["teacher"],
          "teacher_step": info["teacher_step"]}


def _start_index(out: str, index: dict) -> None:
  """Create the store, or continue one written by the same command."""
  path = os.path.join(out, "index.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    same = {k: v for k, v in old.items() if k != "complete"} == json.loads(
        json.dumps({k: v for k, v in index.items() if k != "complete"}))
    if not same:
      raise FileExistsError(
          f"{out}: holds a teacher-logits store of another teacher, config or "
          "--top_k/--chunk_steps/--steps; use a new --out")
    return
  os.makedirs(out, exist_ok=True)
  _write_json(path, index)


def _write_json(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _save(path: str, **arrays) -> None:
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def main(argv) -> int:
  """`llmlab teacher-logits` (argv excludes the program and subcommand)."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Student config (.py[:arg])",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("teacher", None, "Teacher run DIR[:STEP].",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory of the store.",
                      flag_values=fv)
  flags.DEFINE_integer("top_k", 16, "Teacher tokens kept per position.",
                       flag_values=fv)
  flags.DEFINE_integer("chunk_steps", 100, "Steps per shard file.",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 0, "Steps to store (0 = config.train.steps).",
                       flag_values=fv)
  try:
    fv(["llmlab teacher-logits"] + list(argv))
  except flags.Error as e:
    print(f"llmlab teacher-logits: {e}", file=sys.stderr)
    return 2
  missing = [n for n in ("config", "teacher", "out") if fv[n].value is None]
  if missing:
    print("llmlab teacher-logits: missing " +
          ", ".join(f"--{n}" for n in missing) + "\nusage: llmlab "
          "teacher-logits --teacher=DIR[:STEP] --config=FILE.py[:arg] "
          "--out=PATH [--top_k=16 --chunk_steps=100 --steps=N]",
          file=sys.stderr)
    return 2
  try:
    summary = write(fv.teacher, fv.config, fv.out, fv.top_k, fv.chunk_steps,
                    fv.steps)
  except (ValueError, OSError) as e:  # ConfigError, DataError, bad paths
    print(f"llmlab teacher-logits: {e}", file=sys.stderr)
    return 1
  print(json.dumps(summary))
  return 0
