"""Hugging Face Llama-family checkpoints <-> llmlab run directories.

`load(hf_dir, mesh=...)` places an HF checkpoint's params on a mesh;
`from_hf(hf_dir, workdir)` writes a run directory that every llmlab tool
takes as its own: `config.json` (written by `train.write_config`, with
`model.*` from the HF config and `data.tokenizer` pointing at the copied
tokenizer) and an orbax checkpoint holding the params and a freshly
initialised optimizer state. Tensors are read one (slice) at a time from
memory-mapped safetensors files and placed straight into their target
sharding with `jax.make_array_from_callback`: each device reads only its
own shard, and besides the device buffers the host holds one param's slice
at a time, so a checkpoint larger than half the RAM still converts.

`to_hf(workdir, out_dir)` is the inverse: safetensors shards and a
config.json that `transformers` loads as Llama (or Qwen2 with q/k/v biases,
Qwen3 with QK-norm), written one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from llmlab import api
from llmlab import distributed
from llmlab import errors
from llmlab import runs
from llmlab import checkpoints as ckpt_lib
from llmlab import config as config_lib
from llmlab import sharding as shd
from llmlab import storage
from llmlab import steps as steps_lib
from llmlab import train
from llmlab.convert import hf_config
from llmlab.data import tokenizer as tok_lib
from llmlab.convert import layout
from llmlab.convert import safetensors_io as st

log = logging.getLogger("llmlab")

DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # in preference order
DEFAULT_SHARD_BYTES = 5 * 2**30


class ConvertError(errors.UserError):
  """The checkpoint's tensors do not match its config or llmlab's model."""


@dataclasses.dataclass
class Loaded:
  """An HF checkpoint placed on a mesh: config, setup and params."""

  cfg: Any  # full llmlab ConfigDict (model.* from the HF config)
  setup: steps_lib.Setup
  params: Any
  spec: hf_config.HFModel


def load(hf_dir: str, *, dtype: str = "float32",
         mesh: jax.sharding.Mesh | None = None, ignore_fields=(),
         mesh_axes: dict | None = None) -> Loaded:
  """Read a local HF directory straight into sharded llmlab params.

  `mesh` defaults to every device laid out by `mesh_axes` (e.g.
  {"fsdp": 2, "tensor": 2}); each param is built with its NamedSharding
  from `steps.build`, each device reading only its own slice.
  """
  if dtype not in DTYPES:
    raise errors.UsageError(f"dtype={dtype!r}: must be one of {DTYPES}")
  spec = hf_config.read(hf_dir, ignore_fields)
  ckpt = st.Checkpoint(hf_dir)
  cfg = _run_config(spec, hf_dir, dtype, mesh_axes or {})
  if mesh is None:
    mesh = shd.make_mesh(cfg.mesh)
  setup = steps_lib.build(cfg, spec.model["vocab_size"], mesh)
  entries = layout.entries(setup.model_cfg)
  _check_tensors(ckpt, entries, setup.model_cfg)
  return Loaded(cfg, setup, _load_params(ckpt, entries, setup), spec)


def from_hf(hf_dir: str, workdir: str, *, step: int = 0,
            dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
            ignore_fields=(), mesh_axes: dict | None = None) -> dict:
  """Convert an HF directory (local or gs://) into an llmlab run directory.

  Params are placed as in `load`, then written by `write_run`. Returns a
  summary with the model sizes and any warnings (e.g. a tokenizer whose size
  differs from the model's).
  """
  require_no_run(workdir)
  got = load(hf_dir, dtype=dtype, mesh=mesh, ignore_fields=ignore_fields,
             mesh_axes=mesh_axes)
  return write_run(got, workdir, step=step)


def write_run(got: Loaded, workdir: str, step: int = 0) -> dict:
  """Run directory from loaded HF params, with a fresh optimizer state.

  The checkpoint is written before config.json, so a conversion that dies
  midway leaves no run directory behind (just orbax temporaries).
  """
  workdir = _absolute(workdir)
  require_no_run(workdir)
  cfg, setup, spec = got.cfg, got.setup, got.spec
  vocab = setup.model_cfg.vocab_size
  state = {"step": jax.device_put(np.int32(step),
                                  setup.state_shardings["step"]),
           "params": got.params,
           "opt_state": fresh_opt_state(setup, got.params)}
  storage.makedirs(workdir)
  warnings = []
  data_info = _copy_tokenizer(spec.directory, workdir, cfg, vocab, warnings)
  info = train.model_info(cfg, vocab)
  source = {"dir": _absolute(spec.directory),
            "architecture": spec.architecture, "extras": spec.extras,
            "config": spec.raw}
  meta = {"config": config_lib.to_dict(cfg), "model_info": info, "step": step,
          "tokens": 0, "data_info": data_info, "hf_source": source}
  mgr = ckpt_lib.Manager(workdir, cfg.checkpoint, cfg.train.steps)
  mgr.save(step, state, meta, force=True)
  mgr.close()
  if distributed.is_primary():
    write_config = train.write_config
    write_config(workdir, cfg, info, data_info, setup.mesh)
    add_to_config(workdir, hf_source=source)
  for w in warnings:
    log.warning("%s", w)
  return {"workdir": workdir, "step": step, "architecture": spec.architecture,
          "model": dict(cfg.model.items()), "tokenizer": cfg.data.tokenizer,
          "warnings": warnings, **info}


def _absolute(path: str) -> str:
  """Orbax wants absolute paths; a URI already is one."""
  return path if storage.is_remote(path) else os.path.abspath(path)


def _require_empty(path: str, names) -> None:
  clash = [n for n in names if storage.exists(storage.join(path, n))]
  if clash:
    raise errors.AlreadyExists(f"{path}: already holds {clash}; refusing "
                               "to overwrite (choose an empty directory)")


def require_no_run(workdir: str) -> None:
  """No config.json and no finished checkpoint (temporaries are fine)."""
  ckpts = ckpt_lib.checkpoint_dir(workdir)
  steps = [n for n in storage.listdir(ckpts) if n.isdigit()]
  _require_empty(workdir, ["config.json"] + [f"checkpoints/{n}"
                                             for n in steps])


def _run_config(spec: hf_config.HFModel, hf_dir: str, dtype: str,
                mesh_axes: dict):
  cfg = config_lib.base()
  cfg.name = os.path.basename(os.path.normpath(str(hf_dir).rstrip("/")))
  cfg.model.update({k: v for k, v in spec.model.items() if k != "vocab_size"})
  cfg.model.update(dtype=dtype, param_dtype=dtype)
  for axis, size in mesh_axes.items():
    cfg.mesh[axis] = size
  config_lib.validate(cfg)
  return cfg


def _check_tensors(ckpt: st.Checkpoint, entries, mcfg) -> None:
  """Every tensor present with the right shape; nothing left unused."""
  where = ckpt.directory
  expected = set()
  for e in entries:
    for i in range(mcfg.num_layers) if e.stacked else [None]:
      name = e.hf_name(i)
      expected.add(name)
      if name not in ckpt:
        raise ConvertError(f"{where}: tensor {name!r} is missing (the "
                           "config.json describes a model that has it)")
      code, shape = ckpt.info(name)
      if shape != e.hf_shape:
        raise ConvertError(f"{ckpt.path_of(name)}: tensor {name!r} has shape "
                           f"{list(shape)}, but config.json implies "
                           f"{list(e.hf_shape)}")
      if code not in ("F32", "F16", "BF16", "F64"):
        raise ConvertError(f"{ckpt.path_of(name)}: tensor {name!r} has dtype "
                           f"{code}; only unquantized float checkpoints "
                           "convert")
  extra = sorted(n for n in ckpt.names() if n not in expected and
                 not n.endswith(layout.INV_FREQ_SUFFIX))
  if mcfg.tie_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")
    _check_tied(ckpt)
  if extra:
    raise ConvertError(
        f"{where}: {len(extra)} tensor(s) llmlab's model has no place for, "
        f"e.g. {extra[:5]} (in {ckpt.path_of(extra[0])}); they would be "
        "dropped, so the converted model would differ")


def _check_tied(ckpt: st.Checkpoint, rows: int = 4096) -> None:
  """A tied checkpoint may still store lm_head; it must equal the table."""
  emb, head = ckpt.get("model.embed_tokens.weight"), ckpt.get("lm_head.weight")
  if emb.shape != head.shape:
    raise ConvertError(f"{ckpt.path_of('lm_head.weight')}: lm_head.weight "
                       f"shape {list(head.shape)} != embed_tokens "
                       f"{list(emb.shape)} with tie_word_embeddings=true")
  for r in range(0, emb.shape[0], rows):
    if not np.array_equal(emb[r:r + rows], head[r:r + rows]):
      raise ConvertError(
          f"{ckpt.path_of('lm_head.weight')}: tie_word_embeddings=true but "
          f"lm_head.weight differs from model.embed_tokens.weight (row >= "
          f"{r}); set tie_word_embeddings=false to keep both")


def _paths(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(k.key) for k in path): leaf for path, leaf in flat}


def _load_params(ckpt: st.Checkpoint, entries, setup):
  """Params tree built leaf by leaf in its target sharding."""
  abstract = _paths(setup.abstract_state["params"])
  by_path = {e.path: e for e in entries}
  if set(abstract) != set(by_path):
    raise ConvertError(
        "llmlab/convert/layout.py is out of date with llmlab/model.py: "
        f"params without a mapping {sorted(set(abstract) - set(by_path))}, "
        f"mappings without a param {sorted(set(by_path) - set(abstract))}")
  flat = {}
  for path, spec in abstract.items():
    entry = by_path[path]
    if (spec.shape[1:] if entry.stacked else spec.shape) != entry.layer_shape:
      raise ConvertError(f"param {'/'.join(path)}: shape {spec.shape} does "
                         f"not match the mapping's {entry.layer_shape}")
    flat[path] = _load_leaf(ckpt, entry, spec)
  return _unflatten(flat)


def _load_leaf(ckpt: st.Checkpoint, entry: layout.Entry, spec) -> jax.Array:
  """One param; the callback reads just the slice each device holds."""
  cache = {}

  def read(index):
    index = index or tuple(slice(None) for _ in spec.shape)
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:
      cache[key] = _read_slice(ckpt, entry, index, spec)
    return cache[key]

  return jax.make_array_from_callback(spec.shape, spec.sharding, read)


def _read_slice(ckpt, entry: layout.Entry, index, spec) -> np.ndarray:
  if not entry.stacked:
    view = entry.to_llmlab(ckpt.get(entry.hf_name()))
    return np.array(view[index], dtype=spec.dtype)
  layers = range(spec.shape[0])[index[0]]
  first = entry.to_llmlab(ckpt.get(entry.hf_name(layers[0])))[index[1:]]
  out = np.empty((len(layers),) + first.shape, spec.dtype)
  for j, i in enumerate(layers):
    out[j] = entry.to_llmlab(ckpt.get(entry.hf_name(i)))[index[1:]]
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def fresh_opt_state(setup, params):
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    return jax.jit(setup.tx.init,
                   out_shardings=setup.state_shardings["opt_state"])(params)


def _copy_tokenizer(hf_dir, workdir, cfg, vocab: int, warnings: list) -> dict:
  """Copy the HF tokenizer next to the run; point `data.tokenizer` at it."""
  name = next((n for n in TOKENIZER_FILES
               if storage.exists(storage.join(hf_dir, n))), None)
  if name is None:
    warnings.append(f"{hf_dir}: no {' or '.join(TOKENIZER_FILES)}; "
                    "data.tokenizer stays 'byte', which does not match the "
                    "model's vocabulary")
    return {"tokenizer": tok_lib.ByteTokenizer().info()}
  src, dst = storage.join(hf_dir, name), storage.join(workdir, name)
  if distributed.is_primary():
    storage.copy_file(src, dst)
  cfg.data.tokenizer = dst
  try:
    tok = tok_lib.load(src)  # the source: other processes may be copying
  except Exception as e:  # noqa: BLE001 - record, let `eval` fail loudly later
    warnings.append(f"{src}: llmlab cannot load this tokenizer "
                    f"({type(e).__name__}: {e})")
    return {"tokenizer": {"path": dst}}
  if tok.vocab_size != vocab:
    warnings.append(
        f"{src}: tokenizer vocabulary {tok.vocab_size} != model vocab_size "
        f"{vocab}" + (" (its ids beyond the embedding table would be invalid)"
                      if tok.vocab_size > vocab else
                      " (`llmlab train --config.init_from` needs them equal)"))
  return {"tokenizer": dict(tok.info(), path=dst)}


def add_to_config(workdir: str, **keys) -> None:
  path = storage.join(workdir, "config.json")
  out = storage.read_json(path)
  out.update(keys)
  storage.write_json(path, out)


# ----------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------


def to_hf(workdir: str, out_dir: str, *, step: int | None = None,
          dtype: str | None = None,
          max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
  """Write run `workdir`'s checkpoint as a Hugging Face model directory."""
  workdir = _absolute(workdir)
  cfg, raw = runs.read_config(workdir)
  dtype = dtype or cfg.model.param_dtype
  if dtype not in DTYPES:
    raise errors.UsageError(f"dtype={dtype!r}: must be one of {DTYPES}")
  source = raw.get("hf_source", {})
  preferred = hf_config.ARCHITECTURES.get(source.get("architecture"))
  family = hf_config.family_for(cfg.model, preferred)
  _require_empty(out_dir, ("config.json", st.SINGLE_NAME, st.INDEX_NAME))
  run = api.load(workdir, step=step)
  mcfg = run.setup.model_cfg
  params = _paths(run.params)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  tensors = []
  for e in layout.entries(mcfg):
    leaf = params[e.path]
    for i in range(mcfg.num_layers) if e.stacked else [None]:
      get = (lambda leaf=leaf, i=i, e=e:
             e.to_hf(jax.device_get(leaf if i is None else leaf[i]))
             .astype(np_dtype))
      tensors.append((e.hf_name(i), e.hf_shape, np_dtype, get))
  storage.makedirs(out_dir)
  files = st.write_checkpoint(out_dir, tensors, max_shard_bytes,
                              metadata={"format": "pt"})
  extras = _export_extras(cfg, raw, source)
  hf_cfg = hf_config.to_hf(cfg.model, mcfg.vocab_size, family, extras, dtype)
  storage.write_json(storage.join(out_dir, "config.json"), hf_cfg)
  tok = str(cfg.data.tokenizer)
  copied = {".json": "tokenizer.json", ".model": "tokenizer.model"}.get(
      os.path.splitext(tok)[1])
  if copied:
    storage.copy_file(tok, storage.join(out_dir, copied))
  return {"out": out_dir, "step": run.step, "architecture":
          hf_cfg["architectures"][0], "files": files, "tokenizer": copied,
          "dtype": dtype}


def _export_extras(cfg, raw: dict, source: dict) -> dict:
  """Token ids and context length: from the HF source, else the run."""
  extras = dict(source.get("extras", {}))
  extras.setdefault("max_position_embeddings", int(cfg.train.seq_len))
  tok = raw.get("data_info", {}).get("tokenizer", {})
  for name in ("bos", "eos", "pad"):
    if extras.get(f"{name}_token_id") is None and f"{name}_id" in tok:
      extras[f"{name}_token_id"] = tok[f"{name}_id"]
  return extras
