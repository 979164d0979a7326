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

import io
import json
import time

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from llmlab import config as config_lib
from llmlab import data as data_lib
from llmlab import errors
from llmlab import model as model_lib
from llmlab import runs
from llmlab import sharding as shd
from llmlab import steps as steps_lib
from llmlab import storage
from llmlab.data import tokenizer as tokenizer_lib

from llmlab.data.teacher_store import FORMAT, data_identity, shard_name


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
  params, shardings, tcfg, info = runs.load_teacher(teacher_ref, cfg, setup,
                                                    key="--teacher")
  teacher = model_lib.Frozen(params, tcfg)
  shardings = model_lib.Frozen(shardings, tcfg)
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
      path = storage.join(out, shard_name(start))
      if storage.exists(path):
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
  storage.write_json(storage.join(out, "index.json"), index)
  size = sum(epath.Path(out, f).stat().length for f in storage.listdir(out))
  return {"out": out, "steps": steps, "top_k": top_k, "bytes": size,
          "wall_s": time.time() - t0, "teacher": info["teacher"],
          "teacher_step": info["teacher_step"]}


def _start_index(out: str, index: dict) -> None:
  """Create the store, or continue one written by the same command."""
  path = storage.join(out, "index.json")
  if storage.exists(path):
    old = storage.read_json(path)
    same = {k: v for k, v in old.items() if k != "complete"} == json.loads(
        json.dumps({k: v for k, v in index.items() if k != "complete"}))
    if not same:
      raise errors.AlreadyExists(
          f"{out}: holds a teacher-logits store of another teacher, config or "
          "--top_k/--chunk_steps/--steps; use a new --out")
    return
  storage.makedirs(out)
  storage.write_json(path, index)


def _save(path: str, **arrays) -> None:
  """One shard, written whole (local or gs://): a killed writer leaves no
  half shard that a re-run would skip."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  storage.write_bytes(path, buf.getvalue())
