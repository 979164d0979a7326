"""A pre-tokenized token store: `llmlab tokenize` writes it, training reads
rows of it by random access (`data.source=tokens`, llmlab/data/token_data.py).

Why: `data.source=files` reads every file whole into every host's memory;
a store is tokenized once, in parallel, and a training host reads only the
rows of its own batches, so neither memory nor start-up grows with the
corpus.

Layout under the store URI (a local directory or gs://bucket/prefix; all
I/O through tensorstore, which reaches GCS itself):

  plan.json      written first: what the store is made of (tokenizer
                 fingerprint, the data config, the input units). A re-run
                 of the same plan resumes; any other plan is refused.
  shards/SOURCE/UNIT/done.json   written after the unit's arrays: counts,
                 sha256 and the unit's input fingerprint. A resumed run
                 skips every unit that has one.
  shards/SOURCE/UNIT/{train,val}/tokens   zarr3 uint16|uint32 [N]: token
                 ids, documents as BOS ... EOS back to back in input order.
  shards/SOURCE/UNIT/{train,val}/bytes    zarr3 uint16|uint32 [N]: UTF-8
                 bytes of text per token (0 for EOS); the dtype's maximum
                 (MARK) marks each document's first token, its BOS. The
                 marker, not the BOS id, is the document boundary: some
                 tokenizers use one id for BOS and EOS.
  manifest.json  written last: format, tokenizer (with fingerprint),
                 sources (weight, fingerprint, info, per split: tokens,
                 documents, text bytes and the shard list with each shard's
                 token count and sha256) and the store fingerprint. Readers
                 need it: a store without one is unfinished.

Units: a `files` source is cut into runs of consecutive input files of
about `shard_mb` MB (a bigger file is a unit of its own); `stdlib` and
`synthetic` (in memory anyway) into runs of documents of that size. Each
unit is tokenized by one worker process and split into train/validation by
the hash of each document's key (documents.is_validation), exactly as the
in-memory sources are, so the held-out documents are the same.

Integrity: every zarr array is one object (sharding codec) of chunks of
CHUNK tokens, each chunk and the shard index with a crc32c that tensorstore
checks on every read; missing chunks are an error, not zeros
(`fill_missing_data_reads=false`); a shard's length is checked against the
manifest when it is opened. A truncated, corrupt or missing shard raises a
DataError naming it. `TokenStore.verify()` re-reads everything against the
manifest's sha256s.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
import types

import numpy as np
import tensorstore as ts
from etils import epath

from llmlab import storage  # before any GCS request: its stall timeouts
from llmlab.data import config as config_lib
from llmlab.data import corpus
from llmlab.data import documents
from llmlab.data import files
from llmlab.data import stdlib
from llmlab.data import synthetic
from llmlab.data import tokenizer as tokenizer_lib
from llmlab.data.errors import DataError

log = logging.getLogger("llmlab")

FORMAT = "llmlab-token-store-v1"
CHUNK = 16_384           # tokens per zarr chunk: one crc32c, one range read
PLAN, MANIFEST = "plan.json", "manifest.json"
SPLITS = ("train", "val")
_ENCODE_BYTES = 1 << 20  # text per encode_docs call (bounds a worker's peak)


# ----------------------------------------------------------------- locations

def base_url(uri: str) -> str:
  """tensorstore kvstore URL of a store URI, ending in '/'."""
  uri = str(uri)
  if uri.startswith("gs://"):
    if len(uri.rstrip("/")) <= len("gs://"):
      raise DataError(f"{uri}: a gs:// store needs a bucket name")
    return uri.rstrip("/") + "/"
  if "://" in uri:
    raise DataError(f"{uri}: a token store is a local path or gs:// URI")
  path = epath.Path(uri).expanduser().absolute()
  return "file://" + str(path).rstrip("/") + "/"


_CONTEXTS: dict[str, ts.Context] = {}


def _context(kind: str) -> ts.Context:
  """'probe': few quick retries, so a bad URI fails in seconds; 'write':
  patient retries, no cache (what a reader in the same process reads comes
  from the store, not from what was written); 'data': patient retries and a
  bounded cache per process (shard indexes stay cached;
  `LLMLAB_TOKEN_STORE_CACHE_MB`, default 64)."""
  if kind not in _CONTEXTS:
    retries = ({"max_retries": 3, "initial_delay": "100ms",
                "max_delay": "1s"} if kind == "probe" else
               {"max_retries": 10, "initial_delay": "200ms",
                "max_delay": "10s"})
    spec = {"gcs_request_retries": retries}
    if kind == "data":
      mb = float(os.environ.get("LLMLAB_TOKEN_STORE_CACHE_MB", "64"))
      spec["cache_pool"] = {"total_bytes_limit": int(mb * 2**20)}
    _CONTEXTS[kind] = ts.Context(spec)
  return _CONTEXTS[kind]


def _kvstore(url: str, kind: str = "probe") -> ts.KvStore:
  return ts.KvStore.open(url, context=_context(kind)).result()


def _bucket_hint(url: str) -> str:
  """' (bucket B does not exist)' when that explains a gs:// failure."""
  if not url.startswith("gs://"):
    return ""
  bucket = url[len("gs://"):].split("/")[0]
  try:
    exists = epath.Path(f"gs://{bucket}").exists()
  except Exception:  # pylint: disable=broad-except
    return ""
  return "" if exists else f" (bucket {bucket!r} does not exist)"


def _read_json(kv: ts.KvStore, key: str, where: str) -> dict | None:
  return _json_of(kv.read(key), key, where)


def _json_of(future, key: str, where: str) -> dict | None:
  """The JSON of a kvstore read future; None if the key is missing."""
  try:
    got = storage.deadline(future, f"{where}: {key}")
  except ValueError as e:
    if storage.gave_up(e):
      raise storage.StorageTimeout(f"{where}: cannot read {key}, the "
                                   f"storage did not answer ({e})") from None
    raise DataError(f"{where}: cannot read {key} ({e})") from None
  if got.state != "value":
    return None
  try:
    return json.loads(got.value)
  except ValueError as e:
    raise DataError(f"{where}: {key} is not valid JSON ({e})") from None


def _write_json(kv: ts.KvStore, key: str, obj, where: str) -> None:
  try:
    kv.write(key, json.dumps(obj, indent=1, sort_keys=True)).result()
  except ValueError as e:
    raise DataError(f"{where}: cannot write {key} ({e})"
                    f"{_bucket_hint(where)}") from None


# -------------------------------------------------------------------- arrays

def _array_spec(url: str, n: int | None = None, dtype: str | None = None):
  """zarr3 spec: one shard object of crc32c-checked CHUNK-token chunks."""
  spec = {"driver": "zarr3", "kvstore": url,
          "recheck_cached_data": False, "recheck_cached_metadata": False}
  if n is None:
    spec["fill_missing_data_reads"] = False
    return spec
  checked = [{"name": "bytes", "configuration": {"endian": "little"}},
             {"name": "crc32c"}]
  spec["store_data_equal_to_fill_value"] = True  # zero chunks exist too
  spec["metadata"] = {
      "shape": [n], "data_type": dtype,
      "chunk_grid": {"name": "regular", "configuration": {
          "chunk_shape": [-(-n // CHUNK) * CHUNK]}},
      "codecs": [{"name": "sharding_indexed", "configuration": {
          "chunk_shape": [CHUNK], "codecs": checked,
          "index_codecs": checked}}]}
  return spec


def _write_array(url: str, array: np.ndarray) -> None:
  store = ts.open(_array_spec(url, len(array), array.dtype.name), create=True,
                  delete_existing=True, context=_context("write")).result()
  store.write(array).result()


def _content_sha(tokens: np.ndarray, marks: np.ndarray) -> str:
  """sha256 of a shard's logical content (little-endian arrays)."""
  h = hashlib.sha256(tokens.astype(tokens.dtype.newbyteorder("<")).tobytes())
  h.update(marks.astype(marks.dtype.newbyteorder("<")).tobytes())
  return h.hexdigest()


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def encode_split(texts: list[str], tokenizer, dtype: str):
  """(tokens [N], marks [N], docs, docs without tokens): the documents as
  BOS ... EOS, and bytes per token with MARK at each BOS (see the module
  doc). Encoded in batches of ~1 MB of text to bound memory."""
  toks, counts, docs, dropped = [], [], 0, 0
  batch, size = [], 0
  for text in texts + [None]:
    if text is not None:
      batch.append(text)
      size += len(text)
      if size < _ENCODE_BYTES:
        continue
    if batch:
      ids, nbytes, lengths = tokenizer.encode_docs(batch)
      stream = corpus.wrap(ids, nbytes, lengths, tokenizer.bos_id,
                           tokenizer.eos_id)
      toks.append(stream.tokens.astype(dtype))
      count = stream.nbytes.astype(np.uint32)
      count[stream.doc_starts[:-1]] = np.iinfo(np.uint32).max
      counts.append(count)
      docs += stream.num_docs
      dropped += stream.dropped_docs
    batch, size = [], 0
  tokens = np.concatenate(toks) if toks else np.zeros(0, dtype)
  marks = np.concatenate(counts) if counts else np.zeros(0, np.uint32)
  is_bos = marks == np.iinfo(np.uint32).max
  small = np.iinfo(np.uint16).max
  if not (marks[~is_bos] >= small).any():
    marks = np.where(is_bos, small, marks).astype(np.uint16)
  return tokens, marks, docs, dropped


def mark_value(dtype) -> int:
  """The document-start marker of a `bytes` array of `dtype`."""
  return int(np.iinfo(np.dtype(dtype)).max)


# ------------------------------------------------------------------ planning

@dataclasses.dataclass
class _Source:
  """One source of the mixture and its units of work."""
  name: str
  weight: float
  units: list[dict]                 # JSON-able descriptors (in plan.json)
  docs: documents.Documents | None  # in-memory sources only


def _plan_sources(data_cfg, shard_bytes: int) -> list[_Source]:
  out = []
  for name, weight in config_lib.mixture(data_cfg):
    if name == "tokens":
      raise DataError("data.source=tokens is a token store already; give "
                      "`llmlab tokenize` the documents' source")
    if name == "files":
      out.append(_Source(name, weight, _file_units(data_cfg, shard_bytes),
                         None))
    else:
      docs = (stdlib.read(data_cfg.stdlib) if name == "stdlib"
              else synthetic.read(data_cfg.synthetic))
      out.append(_Source(name, weight, _doc_units(docs, shard_bytes), docs))
  return out


def _group(sizes: list[int], shard_bytes: int) -> list[tuple[int, int]]:
  """[lo, hi) runs of consecutive items of about `shard_bytes` each."""
  runs, lo, total = [], 0, 0
  for i, size in enumerate(sizes):
    if total and total + size > shard_bytes:
      runs.append((lo, i))
      lo, total = i, 0
    total += size
  if lo < len(sizes):
    runs.append((lo, len(sizes)))
  return runs


def _file_units(data_cfg, shard_bytes: int) -> list[dict]:
  patterns = config_lib.split_paths(data_cfg.files.paths)
  if not patterns:
    raise DataError("data.files.paths is empty; give paths or globs")
  found = []
  for path, key in files.expand(patterns):
    if not str(path).endswith(files.SUFFIXES):
      raise DataError(f"{path}: unknown file type; expected one of "
                      f"{', '.join(files.SUFFIXES)}")
    stat = path.stat()
    found.append([str(path), key, int(stat.length), int(stat.mtime or 0)])
  return [{"files": found[lo:hi]}
          for lo, hi in _group([f[2] for f in found], shard_bytes)]


def _doc_units(docs: documents.Documents, shard_bytes: int) -> list[dict]:
  sizes = [len(t.encode("utf-8")) for t in docs.texts]
  return [{"docs": [lo, hi], "bytes": sum(sizes[lo:hi])}
          for lo, hi in _group(sizes, shard_bytes)]


def _plan(data_cfg, tokenizer, sources: list[_Source], shard_mb) -> dict:
  """What decides the store's content; equal plans mean a resumable run."""
  names = [s.name for s in sources]
  data = {"tokenizer": tokenizer.fingerprint,
          "val_fraction": float(data_cfg.val_fraction),
          "mixture": [[s.name, s.weight] for s in sources]}
  for name in names:
    data[name] = data_cfg[name].to_dict()
  if "files" in names:
    data["decode_errors"] = str(data_cfg.decode_errors)
  return json.loads(json.dumps({
      "format": FORMAT, "data": data, "shard_mb": float(shard_mb),
      "chunk_tokens": CHUNK,
      "sources": [{"name": s.name, "units": s.units,
                   "fingerprint": s.docs.fingerprint if s.docs else None}
                  for s in sources]}))


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Keys whose values differ between two plans (for the refusal)."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}")
  return out


def _check_out(kv: ts.KvStore, out: str, plan: dict) -> str:
  """'fresh', 'resume' or 'complete'; refuses any other non-empty place
  before anything is written there."""
  try:
    keys = kv.list().result()
  except ValueError as e:
    raise DataError(f"--out={out}: cannot list it ({e})") from None
  if not keys:
    return "fresh"
  old = _read_json(kv, PLAN, f"--out={out}")
  if old is None:
    raise DataError(f"--out={out} is not empty and is not a token store "
                    f"(no {PLAN}); refusing to write there. Give an empty "
                    "or new directory.")
  if old != plan:
    raise DataError(
        f"--out={out} holds a token store of another config (differs in: "
        f"{', '.join(_diff(old, plan)[:8])}); refusing to overwrite it. Give "
        "a new directory, or the config it was written with to resume it.")
  return "complete" if MANIFEST.encode() in keys else "resume"


# -------------------------------------------------------------------- writer

def _unit_dir(source: str, unit: int) -> str:
  return f"shards/{source}/{unit:06d}"


def write_store(data_cfg, out: str, *, workers: int = 1,
                shard_mb: float = 16.0, on_unit_done=None) -> dict:
  """Tokenizes `data_cfg`'s sources into a store at `out`; resumes a killed
  run of the same config (finished units are kept). `on_unit_done(record)`
  runs in this process after each unit (progress; tests). Returns a
  summary."""
  start = time.perf_counter()
  if shard_mb <= 0 or workers < 1:
    raise DataError(f"shard_mb={shard_mb} and workers={workers} must be > 0")
  tokenizer = tokenizer_lib.load(str(data_cfg.tokenizer))
  val_fraction = float(data_cfg.val_fraction)
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f"data.val_fraction={val_fraction!r} must be in (0, 1)")
  base = base_url(out)
  sources = _plan_sources(data_cfg, int(shard_mb * 2**20))
  plan = _plan(data_cfg, tokenizer, sources, shard_mb)
  kv = _kvstore(base)
  state = _check_out(kv, out, plan)
  if state == "complete":
    manifest = _read_json(kv, MANIFEST, out)
    return _summary(out, manifest, 0, _num_units(sources), start, workers)
  if state == "fresh":
    _write_json(kv, PLAN, plan, out)
  done = _finished_units(kv, base, sources, out)
  jobs = [_job(base, s, i, unit, data_cfg, tokenizer, val_fraction)
          for s in sources for i, unit in enumerate(s.units)
          if (s.name, i) not in done]
  log.info("tokenize %s: %d units, %d done before, %d to do on %d workers",
           out, _num_units(sources), len(done), len(jobs), workers)
  done.update(_run_jobs(jobs, workers, on_unit_done))
  manifest = _manifest(plan, sources, done, tokenizer, val_fraction)
  _write_json(kv, MANIFEST, manifest, out)
  return _summary(out, manifest, len(jobs), _num_units(sources), start,
                  workers)


def _num_units(sources) -> int:
  return sum(len(s.units) for s in sources)


def _finished_units(kv, base: str, sources, out: str) -> dict:
  """{(source, unit): record} of units a previous run finished and whose
  arrays still open with the recorded length (else they are redone). All
  reads are issued at once: a big store on GCS has thousands of units."""
  keys = [(s.name, i) for s in sources for i in range(len(s.units))]
  reads = [kv.read(f"{_unit_dir(*key)}/done.json") for key in keys]
  records = {}
  for key, future in zip(keys, reads):
    record = _json_of(future, f"{_unit_dir(*key)}/done.json", out)
    if record is not None:
      records[key] = record
  fresh = {"recheck_cached_metadata": True, "recheck_cached_data": True}
  opens = [(key, entry["tokens"],
            ts.open({**_array_spec(f"{base}{entry['path']}/{name}/"),
                     **fresh}, context=_context("probe")))
           for key, record in records.items()
           for entry in (record[split] for split in SPLITS) if entry["tokens"]
           for name in ("tokens", "bytes")]
  broken = set()
  for key, length, future in opens:
    try:
      if future.result().shape != (length,):
        broken.add(key)
    except ValueError:
      broken.add(key)
  return {k: r for k, r in records.items() if k not in broken}


def _job(base, source: _Source, unit: int, desc: dict, data_cfg, tokenizer,
         val_fraction: float) -> dict:
  job = {"base": base, "source": source.name, "unit": unit,
         "tokenizer": str(data_cfg.tokenizer),
         "tokenizer_fingerprint": tokenizer.fingerprint,
         "token_dtype": token_dtype(tokenizer.vocab_size),
         "val_fraction": val_fraction}
  if "files" in desc:
    job["files"] = desc["files"]
    job["files_cfg"] = {"text_field": str(data_cfg.files.text_field),
                        "column": str(data_cfg.files.column),
                        "decode_errors": str(data_cfg.decode_errors)}
  else:
    lo, hi = desc["docs"]
    job["keys"] = source.docs.keys[lo:hi]
    job["texts"] = source.docs.texts[lo:hi]
  return job


def _run_jobs(jobs: list[dict], workers: int, on_unit_done) -> dict:
  """Units in worker processes (spawned: the parent may hold jax threads);
  one failure cancels the rest and is raised."""
  done = {}

  def finish(record):
    done[(record["source"], record["unit"])] = record
    if on_unit_done is not None:
      on_unit_done(record)

  if workers == 1 or len(jobs) <= 1:
    for job in jobs:
      finish(run_unit(job))
    return done
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                              mp_context=ctx) as pool:
    futures = [pool.submit(run_unit, job) for job in jobs]
    try:
      for future in concurrent.futures.as_completed(futures):
        finish(future.result())
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
  return done


_TOKENIZERS: dict[str, object] = {}


def _worker_tokenizer(spec: str, fingerprint: str):
  if spec not in _TOKENIZERS:
    _TOKENIZERS[spec] = tokenizer_lib.load(spec)
  tok = _TOKENIZERS[spec]
  if tok.fingerprint != fingerprint:
    raise DataError(f"data.tokenizer={spec} changed while tokenizing")
  return tok


def _unit_documents(job: dict):
  """(keys, texts, input fingerprint or None, info counts) of one unit."""
  if "files" not in job:
    return job["keys"], job["texts"], None, {}
  c = job["files_cfg"]
  reader = files.Reader(
      types.SimpleNamespace(text_field=c["text_field"], column=c["column"]),
      c["decode_errors"], [])
  for path, key, _, _ in job["files"]:
    reader.read_file(epath.Path(path), key)
  docs = reader.documents()
  return docs.keys, docs.texts, docs.fingerprint, dict(reader.counts)


def run_unit(job: dict) -> dict:
  """Tokenizes one unit, writes its arrays, then its done.json; returns
  the record. Runs in a worker process."""
  tok = _worker_tokenizer(job["tokenizer"], job["tokenizer_fingerprint"])
  keys, texts, fingerprint, info = _unit_documents(job)
  parts = {"train": [], "val": []}
  for key, text in zip(keys, texts):
    val = documents.is_validation(key, job["val_fraction"])
    parts["val" if val else "train"].append(text)
  where = _unit_dir(job["source"], job["unit"])
  record = {"source": job["source"], "unit": job["unit"],
            "fingerprint": fingerprint, "info": info,
            "text_bytes": sum(len(t.encode("utf-8")) for t in texts)}
  for split in SPLITS:
    tokens, marks, docs, dropped = encode_split(parts[split], tok,
                                                job["token_dtype"])
    path = f"{where}/{split}"
    if len(tokens):
      _write_array(f"{job['base']}{path}/tokens/", tokens)
      _write_array(f"{job['base']}{path}/bytes/", marks)
    body = marks != mark_value(marks.dtype)
    record[split] = {
        "path": path, "tokens": int(len(tokens)), "docs": docs,
        "docs_without_tokens": dropped, "bytes_dtype": marks.dtype.name,
        "text_bytes": int(marks[body].sum(dtype=np.int64)),
        "sha256": _content_sha(tokens, marks)}
  _write_json(_kvstore(job["base"]), f"{where}/done.json", record,
              job["base"])
  return record


def _manifest(plan, sources, done: dict, tokenizer, val_fraction) -> dict:
  out_sources = []
  for s in sources:
    records = [done[(s.name, i)] for i in range(len(s.units))]
    if s.docs is not None:
      fingerprint, info = s.docs.fingerprint, dict(s.docs.info)
    else:
      fingerprint = hashlib.sha256("|".join(
          r["fingerprint"] for r in records).encode()).hexdigest()
      info = _files_info(records)
    entry = {"name": s.name, "weight": s.weight, "fingerprint": fingerprint,
             "info": info}
    for split in SPLITS:
      rows = [r[split] for r in records]
      entry[split] = {
          "tokens": sum(r["tokens"] for r in rows),
          "docs": sum(r["docs"] for r in rows),
          "text_bytes": sum(r["text_bytes"] for r in rows),
          "docs_without_tokens": sum(r["docs_without_tokens"] for r in rows),
          "shards": [{k: r[k] for k in ("path", "tokens", "docs",
                                        "bytes_dtype", "sha256")}
                     for r in rows if r["tokens"]]}
      if not entry[split]["docs"]:
        log.warning("tokenize: source %r has no %s documents (val_fraction="
                    "%s); training from this store will refuse it", s.name,
                    split, val_fraction)
    out_sources.append(entry)
  identity = {"format": FORMAT, "tokenizer": tokenizer.fingerprint,
              "val_fraction": val_fraction,
              "sources": [(e["name"], e["weight"], e["fingerprint"])
                          for e in out_sources]}
  return {
      "format": FORMAT, "complete": True,
      "fingerprint": hashlib.sha256(json.dumps(
          identity, sort_keys=True).encode()).hexdigest(),
      "plan_sha256": hashlib.sha256(json.dumps(
          plan, sort_keys=True).encode()).hexdigest(),
      "tokenizer": {**tokenizer.info(), "fingerprint": tokenizer.fingerprint},
      "token_dtype": token_dtype(tokenizer.vocab_size),
      "val_fraction": val_fraction, "chunk_tokens": CHUNK,
      "sources": out_sources,
      "tokens_train": sum(e["train"]["tokens"] for e in out_sources),
      "tokens_val": sum(e["val"]["tokens"] for e in out_sources),
      "text_bytes": sum(r["text_bytes"] for r in done.values()),
  }


def _files_info(records: list[dict]) -> dict:
  info = {"source": "files"}
  for r in records:
    for k, v in r["info"].items():
      info[k] = info.get(k, 0) + v
  return info


def _summary(out, manifest, written: int, units: int, start: float,
             workers: int) -> dict:
  seconds = time.perf_counter() - start
  return {"out": out, "fingerprint": manifest["fingerprint"],
          "units": units, "units_written": written,
          "units_skipped": units - written, "workers": workers,
          "tokens_train": manifest["tokens_train"],
          "tokens_val": manifest["tokens_val"],
          "text_bytes": manifest["text_bytes"], "seconds": round(seconds, 3)}


# -------------------------------------------------------------------- reader

@dataclasses.dataclass
class _Opened:
  tokens: ts.TensorStore
  marks: ts.TensorStore
  mark: int  # the document-start marker of `marks`


class Split:
  """One source's train or validation stream: its shards back to back, read
  by token range; rows of `seq_len` are ranges [r L, (r+1) L)."""

  def __init__(self, store: "TokenStore", source: str, split: str,
               entry: dict):
    self.store, self.source, self.split = store, source, split
    self.shards = entry["shards"]
    self.num_tokens = int(entry["tokens"])
    self.offsets = np.concatenate(
        [[0], np.cumsum([s["tokens"] for s in self.shards])]).astype(np.int64)
    self._opened: dict[int, _Opened] = {}
    self._lock = threading.Lock()

  def num_rows(self, seq_len: int) -> int:
    return self.num_tokens // seq_len

  def _open(self, i: int) -> _Opened:
    """Shard i's arrays, opened once; its length checked against the
    manifest."""
    with self._lock:
      if i in self._opened:
        return self._opened[i]
      shard = self.shards[i]
      url = f"{self.store.base}{shard['path']}"
      futures = [ts.open(_array_spec(f"{url}/{name}/"),
                         context=_context("data"))
                 for name in ("tokens", "bytes")]
      try:
        tokens, marks = [storage.deadline(f, f"{url}/{name}")
                         for f, name in zip(futures, ("tokens", "bytes"))]
      except ValueError as e:
        raise self._error(i, e) from None
      for arr in (tokens, marks):
        if arr.shape != (shard["tokens"],):
          raise DataError(
              f"token store {self.store.uri}: shard {shard['path']} has "
              f"{arr.shape[0]} tokens, the manifest says {shard['tokens']} "
              "(truncated or replaced); write the store again")
      opened = _Opened(tokens, marks, mark_value(marks.dtype.numpy_dtype))
      self._opened[i] = opened
      return opened

  def _object(self, i: int, name: str) -> str:
    """The URI of shard i's array `name` (what a storage error names)."""
    return f"{self.store.base}{self.shards[i]['path']}/{name}"

  def _error(self, i: int, e: Exception) -> Exception:
    if storage.gave_up(e):  # the storage, not the shard
      return storage.StorageTimeout(
          f"{self.store.base}{self.shards[i]['path']}: the storage did not "
          f"answer ({e}); re-run the same command to resume from the newest "
          "checkpoint")
    return DataError(
        f"token store {self.store.uri}: shard {self.shards[i]['path']} is "
        f"missing, truncated or corrupt ({e}); write the store again")

  def _pieces(self, lo: int, hi: int):
    """(shard, start in shard, start in range, end in range) covering
    [lo, hi) of the stream."""
    s = int(np.searchsorted(self.offsets, lo, side="right")) - 1
    pos = lo
    while pos < hi:
      end = min(hi, int(self.offsets[s + 1]))
      yield s, pos - int(self.offsets[s]), pos - lo, end - lo
      pos, s = end, s + 1

  def read_rows(self, rows, seq_len: int) -> dict[str, np.ndarray]:
    """Rows `rows` as the batch arrays (int32 [n, seq_len]; see the data
    package doc). All reads are issued before any is awaited."""
    rows = np.asarray(rows, np.int64)
    n, nrows = len(rows), self.num_rows(seq_len)
    if n and (rows.min() < 0 or rows.max() >= nrows):
      raise IndexError(f"rows out of range [0, {nrows}) in "
                       f"{self.source}/{self.split}")
    tokens = np.empty((n, seq_len), np.int32)
    nbytes = np.empty((n, seq_len), np.int32)
    starts = np.empty((n, seq_len), bool)
    pending = []
    for i, r in enumerate(rows):
      lo = int(r) * seq_len
      for s, a, c0, c1 in self._pieces(lo, lo + seq_len):
        arr = self._open(s)
        pending.append((i, s, c0, c1, arr.mark,
                        arr.tokens[a:a + c1 - c0].read(),
                        arr.marks[a:a + c1 - c0].read()))
    end = time.monotonic() + storage.DEADLINE_S  # one deadline per batch
    for i, s, c0, c1, mark, ft, fm in pending:
      try:
        t, m = [storage.deadline(f, self._object(s, name), end)
                for f, name in ((ft, "tokens"), (fm, "bytes"))]
      except ValueError as e:
        raise self._error(s, e) from None
      tokens[i, c0:c1] = t
      starts[i, c0:c1] = m == mark
      nbytes[i, c0:c1] = np.where(m == mark, 0, m)
    segment_ids, positions = segments(starts)
    return {"tokens": tokens, "segment_ids": segment_ids,
            "positions": positions, "bytes": nbytes}

  def verify(self) -> None:
    """Reads every shard whole; DataError unless it matches its sha256."""
    for i, shard in enumerate(self.shards):
      arr = self._open(i)
      try:
        t, m = arr.tokens.read().result(), arr.marks.read().result()
      except ValueError as e:
        raise self._error(i, e) from None
      if _content_sha(t, m) != shard["sha256"]:
        raise DataError(f"token store {self.store.uri}: shard "
                        f"{shard['path']} does not match its sha256 in the "
                        "manifest; write the store again")


def segments(starts: np.ndarray):
  """(segment_ids, positions), int32 [n, L], from document-start flags
  bool [n, L]: a row's first fragment is segment 1 even without a BOS;
  positions restart at each document start and at the row start."""
  idx = np.arange(starts.shape[1])
  seg = np.cumsum(starts, axis=1) + (~starts[:, :1])
  last = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return seg.astype(np.int32), (idx - last).astype(np.int32)


class TokenStore:
  """A finished store, opened from its manifest (nothing else is read
  until rows are)."""

  def __init__(self, uri: str):
    self.uri = str(uri)
    self.base = base_url(self.uri)
    where = f"data.tokens.path={self.uri}"
    try:
      kv = _kvstore(self.base)
    except ValueError as e:
      raise DataError(f"{where}: cannot open ({e})") from None
    manifest = _read_json(kv, MANIFEST, where)
    if manifest is None:
      raise DataError(self._missing(kv, where))
    if manifest.get("format") != FORMAT:
      raise DataError(f"{where}: {MANIFEST} has format "
                      f"{manifest.get('format')!r}, expected {FORMAT!r}")
    self.manifest = manifest
    self.fingerprint = manifest["fingerprint"]
    self.sources = manifest["sources"]

  def _missing(self, kv, where: str) -> str:
    if _read_json(kv, PLAN, where) is not None:
      return (f"{where}: the store is unfinished (no {MANIFEST}); re-run "
              "the same `llmlab tokenize` command to finish it")
    return (f"{where}: no token store there (no {MANIFEST})"
            f"{_bucket_hint(self.base)}; write one with `llmlab tokenize "
            f"--config=... --out={self.uri}`")

  def check_tokenizer(self, tokenizer, spec: str) -> None:
    """Refuses a config whose tokenizer is not the store's."""
    have = self.manifest["tokenizer"]
    if have["fingerprint"] != tokenizer.fingerprint:
      raise DataError(
          f"data.tokens.path={self.uri} was tokenized with tokenizer "
          f"{have.get('kind')} fingerprint {have['fingerprint']}, but "
          f"data.tokenizer={spec} has fingerprint {tokenizer.fingerprint}; "
          "set data.tokenizer to the store's tokenizer or tokenize again")

  def split(self, source: str, split: str) -> Split:
    entry = next(s for s in self.sources if s["name"] == source)
    return Split(self, source, split, entry[split])

  def verify(self) -> None:
    for s in self.sources:
      for split in SPLITS:
        self.split(s["name"], split).verify()
