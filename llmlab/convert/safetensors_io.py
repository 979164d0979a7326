"""Reading and writing the safetensors format without the `safetensors` package.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (`{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`), then the raw little-endian tensor bytes, offsets
counted from the end of the header. Reading memory-maps the file and hands
out zero-copy numpy views, so a checkpoint larger than RAM converts one
tensor (or one slice of one) at a time. Writing computes the header from
the tensors' shapes first and then streams each tensor as it is produced.

A sharded checkpoint is several such files plus `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`), the
layout Hugging Face `save_pretrained` writes.

Directories may be `gs://` (any etils.epath URI): a remote file is first
copied to a local temporary directory (a memory map needs a local file;
the copy needs that much local disk and is removed with the Checkpoint),
and a remote write streams one upload per file (llmlab/storage.py).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import weakref
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from llmlab import errors
from llmlab import storage

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U64": np.dtype("<u8"), "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
CODES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 2**20  # the reference implementation's limit


class SafetensorsError(errors.UserError):
  """A file is not valid safetensors; the message names file and tensor."""


class File:
  """One memory-mapped local .safetensors file: names(), info(name),
  get(name). `path` names it in errors (the URI it was copied from)."""

  def __init__(self, local: str, path: str | None = None):
    self.path = path = path or local
    with open(local, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      if size < 8:
        raise SafetensorsError(f"{path}: {size} bytes, too short for a "
                               "safetensors header")
      (n,) = struct.unpack("<Q", f.read(8))
      if n > min(_MAX_HEADER, size - 8):
        raise SafetensorsError(f"{path}: header length {n} exceeds the file "
                               f"({size} bytes) or the {_MAX_HEADER} limit")
      try:
        header = json.loads(f.read(n).decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not JSON: {e}") from None
      self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if not isinstance(header, dict):
      raise SafetensorsError(f"{path}: header is not a JSON object")
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._entries = {name: self._check(name, e, size - self._start)
                     for name, e in header.items()}

  def _check(self, name: str, entry, data_size: int):
    where = f"{self.path}: tensor {name!r}"
    try:
      dtype, shape = entry["dtype"], [int(s) for s in entry["shape"]]
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(
          f"{where}: malformed header entry {entry!r}") from None
    if dtype not in DTYPES:
      raise SafetensorsError(f"{where}: unsupported dtype {dtype!r}; "
                             f"known: {sorted(DTYPES)}")
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if not 0 <= begin <= end <= data_size or end - begin != want:
      raise SafetensorsError(
          f"{where}: data_offsets [{begin}, {end}] do not hold a {dtype} "
          f"tensor of shape {shape} ({want} bytes) within the {data_size} "
          "data bytes (truncated file?)")
    return dtype, tuple(shape), begin

  def names(self) -> list[str]:
    return list(self._entries)

  def info(self, name: str) -> tuple[str, tuple[int, ...]]:
    """(dtype code, shape) of a tensor, without reading it."""
    dtype, shape, _ = self._entries[name]
    return dtype, shape

  def get(self, name: str) -> np.ndarray:
    """A read-only zero-copy view; pages are read only when touched."""
    dtype, shape, begin = self._entries[name]
    count = math.prod(shape)
    return np.frombuffer(self._mm, DTYPES[dtype], count,
                         self._start + begin).reshape(shape)


class Checkpoint:
  """All tensors of a Hugging Face directory, single-file or sharded."""

  def __init__(self, directory: str):
    self.directory = directory
    self._where: dict[str, File] = {}
    self._files: dict[str, File] = {}
    self._copies: list[str] = []  # local copies of remote files
    weakref.finalize(self, _remove_all, self._copies)
    index = storage.join(directory, INDEX_NAME)
    if storage.exists(index):
      for name, fname in _read_index(index).items():
        self._where[name] = self._open(fname)
      for name, f in self._where.items():
        if name not in f.names():
          raise SafetensorsError(f"{index}: maps {name!r} to {f.path}, which "
                                 "has no such tensor")
    else:
      files = sorted(n for n in storage.listdir(directory)
                     if n.endswith(".safetensors"))
      if not files:
        raise errors.NotFound(f"{directory}: no *.safetensors files (and no "
                                f"{INDEX_NAME})")
      if len(files) > 1:
        raise SafetensorsError(f"{directory}: {len(files)} .safetensors files "
                               f"({files[:3]}...) but no {INDEX_NAME} saying "
                               "which tensor is where")
      f = self._open(files[0])
      self._where = {name: f for name in f.names()}

  def _open(self, fname: str) -> File:
    path = storage.join(self.directory, fname)
    if path not in self._files:
      if not storage.exists(path):
        raise errors.NotFound(f"{path}: listed in {INDEX_NAME} but missing")
      local = storage.local_copy(path)
      if local != path:
        self._copies.append(os.path.dirname(local))
      self._files[path] = File(local, path)
    return self._files[path]

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def path_of(self, name: str) -> str:
    return self._where[name].path

  def info(self, name: str) -> tuple[str, tuple[int, ...]]:
    return self._where[name].info(name)

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f"{self.directory}: no tensor {name!r}")
    return self._where[name].get(name)


def _remove_all(dirs: list[str]) -> None:
  for d in dirs:
    shutil.rmtree(d, ignore_errors=True)


def _read_index(path: str) -> dict[str, str]:
  try:
    index = storage.read_json(path)
    weight_map = index["weight_map"]
  except (errors.DataError, KeyError, TypeError) as e:  # DataError: no JSON
    raise SafetensorsError(f"{path}: not a safetensors index "
                           f"(need a 'weight_map' object): "
                           f"{e.__cause__ or e}") from None
  if not isinstance(weight_map, dict):
    raise SafetensorsError(f"{path}: 'weight_map' is not an object")
  return weight_map


# ----------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------

# (name, shape, dtype, produce) where produce() returns the array to write.
Tensor = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_file(path: str, tensors: list[Tensor],
               metadata: dict[str, str] | None = None) -> int:
  """Write tensors in the given order; returns the data bytes written.

  Each `produce()` is called once, just before its bytes are written, so
  only one tensor is in host memory at a time.
  """
  header: dict = {"__metadata__": dict(metadata or {})}
  offset = 0
  for name, shape, dtype, _ in tensors:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    if np.dtype(dtype) not in CODES:
      raise ValueError(f"{path}: tensor {name!r}: dtype {dtype} has no "
                       "safetensors code")
    header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + n]}
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
  with storage.open_write(path) as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype, produce in tensors:
      arr = np.asarray(produce(), DTYPES[CODES[np.dtype(dtype)]])
      if arr.shape != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} produced shape {arr.shape}, "
                         f"declared {tuple(shape)}")
      f.write(np.ascontiguousarray(arr.reshape(-1)).view(np.uint8))
  return offset


def write_checkpoint(directory: str, tensors: Iterable[Tensor],
                     max_shard_bytes: int,
                     metadata: dict[str, str] | None = None) -> list[str]:
  """Hugging Face layout: one `model.safetensors`, or shards + index.

  Tensors are packed in order into shards of at most `max_shard_bytes`
  (a single larger tensor gets a shard of its own). Returns the file names.
  """
  shards: list[list[Tensor]] = [[]]
  size = 0
  for t in tensors:
    n = math.prod(t[1]) * np.dtype(t[2]).itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += n
  if len(shards) == 1:
    names = [SINGLE_NAME]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
             for i in range(len(shards))]
  total = 0
  weight_map = {}
  for fname, shard in zip(names, shards):
    total += write_file(storage.join(directory, fname), shard, metadata)
    weight_map.update({t[0]: fname for t in shard})
  if len(names) > 1:
    storage.write_json(storage.join(directory, INDEX_NAME),
                       {"metadata": {"total_size": total},
                        "weight_map": weight_map})
  return names
