"""The token store: `llmlab tokenize` writes it, training reads rows of it by
random access (llmlab/data/token_store.py, token_data.py).

Local tests run by default; the GCS ones (a real fake-gcs-server, 1 and 2
training processes) are `integration`."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from llmlab import config as config_lib
from llmlab import data
from llmlab.data import corpus
from llmlab.data import documents
from llmlab.data import synthetic
from llmlab.data import token_store
from llmlab.data import tokenizer as tokenizer_lib
from llmlab.commands import tokenizer as tokenizer_cmd
from llmlab.data import tokenizer_cli
from llmlab.data.errors import DataError
from tests import helpers
from tests.helpers import ROOT

L = 32


@contextlib.contextmanager
def counted_reads():
  """Every row the token store's readers read in this process while inside:
  {"rows": [(source, split, row), ...], "tokens": n}. Wraps
  `Split.read_rows` from outside; the reader itself counts nothing."""
  reads = {"rows": [], "tokens": 0}
  real, lock = token_store.Split.read_rows, threading.Lock()

  def read_rows(self, rows, seq_len):
    batch = real(self, rows, seq_len)
    with lock:  # the loader's threads read concurrently
      reads["rows"] += [(self.source, self.split, int(r)) for r in rows]
      reads["tokens"] += len(rows) * seq_len
    return batch

  token_store.Split.read_rows = read_rows
  try:
    yield reads
  finally:
    token_store.Split.read_rows = real


def _synthetic_cfg(num_docs=600, doc_len=200, val_fraction=0.1):
  cfg = data.default_config()
  cfg.source = "synthetic"
  cfg.synthetic.num_docs = num_docs
  cfg.synthetic.doc_len = doc_len
  cfg.val_fraction = val_fraction
  return cfg


def _store_cfg(path, **kw):
  cfg = data.default_config()
  cfg.source, cfg.tokens.path, cfg.prefetch = "tokens", str(path), 2
  cfg.update(kw)
  return cfg


def _write(path, cfg=None, **kw):
  kw.setdefault("shard_mb", 0.02)  # ~6 units for the default corpus
  return token_store.write_store(cfg or _synthetic_cfg(), str(path), **kw)


def _build(path, process_index=0, process_count=1, seed=0, batch=8, **kw):
  return data.build(_store_cfg(path, **kw), seq_len=L, global_batch=batch,
                    seed=seed, process_index=process_index,
                    process_count=process_count)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  path = tmp_path_factory.mktemp("tokens") / "store"
  summary = _write(path)
  return path, summary


def _same(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _train_cfg(path, steps=3, **data_kw):
  c = config_lib.base()
  c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2,
                 mlp_dim=64)
  c.train.update(steps=steps, batch_size=4, seq_len=L, log_every=1,
                 eval_every=0, eval_tokens=4 * L)
  c.optim.warmup_steps = 1
  c.checkpoint.every_steps = 0
  c.data = _store_cfg(path, **data_kw)
  return c


# --- writing ------------------------------------------------------------------

def test_store_layout_and_manifest(store):
  path, summary = store
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["format"] == token_store.FORMAT
  assert manifest["token_dtype"] == "uint16"  # byte vocabulary: 259 ids
  assert manifest["tokenizer"]["fingerprint"] == "byte-v1"
  (src,) = manifest["sources"]
  docs = synthetic.read(_synthetic_cfg().synthetic)
  assert src["fingerprint"] == docs.fingerprint and src["weight"] == 1.0
  assert summary["units"] == summary["units_written"] > 3
  assert src["train"]["docs"] + src["val"]["docs"] == 600
  # Every document is BOS + 200 bytes + EOS.
  assert manifest["tokens_train"] == src["train"]["docs"] * 202
  assert all(len(s["sha256"]) == 64 for s in src["train"]["shards"])
  token_store.TokenStore(str(path)).verify()


def _expected_stream(split: str):
  """The split's documents, in input order, as corpus.wrap streams them."""
  cfg = _synthetic_cfg()
  docs = synthetic.read(cfg.synthetic)
  texts = [t for k, t in zip(docs.keys, docs.texts)
           if documents.is_validation(k, cfg.val_fraction) == (split == "val")]
  ids, nbytes, lengths = tokenizer_lib.ByteTokenizer().encode_docs(texts)
  return corpus.wrap(ids, nbytes, lengths, 256, 257)


def test_rows_are_the_stream_cut_every_seq_len_with_packing(store):
  """Row r = stream tokens [r L, (r+1) L); segment ids count documents from
  1, positions restart at each BOS and at the row start, so attention
  (same segment, causal) never crosses a document boundary."""
  path, _ = store
  stream = _expected_stream("train")
  split = token_store.TokenStore(str(path)).split("synthetic", "train")
  rows = np.array([0, 1, 7, 57, split.num_rows(L) - 1])
  got = split.read_rows(rows, L)
  ends = stream.doc_starts[1:]
  for i, r in enumerate(rows):
    p = np.arange(r * L, (r + 1) * L)
    doc = np.searchsorted(ends, p, side="right")
    np.testing.assert_array_equal(got["tokens"][i], stream.tokens[p])
    np.testing.assert_array_equal(got["bytes"][i], stream.nbytes[p])
    np.testing.assert_array_equal(got["segment_ids"][i], doc - doc[0] + 1)
    np.testing.assert_array_equal(
        got["positions"][i], p - np.maximum(stream.doc_starts[doc], r * L))
    seg = got["segment_ids"][i]
    allowed = (seg[:, None] == seg[None, :]) & np.tri(L, dtype=bool)
    q, k = np.nonzero(allowed)
    doc_of = doc  # document of each position
    assert (doc_of[q] == doc_of[k]).all()


def test_batches_are_a_pure_function_of_seed_and_step(store):
  path, _ = store
  a, b = _build(path), _build(path)
  assert _same(a.train_batch(5), b.train_batch(5))
  assert not _same(a.train_batch(5), a.train_batch(6))
  assert not _same(a.train_batch(5), _build(path, seed=1).train_batch(5))
  it = a.train_iter(3)
  for step in range(3, 6):
    assert _same(next(it), a.train_batch(step))
  # Two processes: disjoint rows that together are the global batch.
  parts = [_build(path, p, 2) for p in range(2)]
  for step in (0, 4):
    whole = a.train_batch(step)
    halves = [d.train_batch(step) for d in parts]
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([h[key] for h in halves]), whole[key])
    r0, r1 = (set(d.batch_rows(step)) for d in parts)
    assert not r0 & r1 and len(r0) == len(r1) == 4
  assert a.info["fingerprint"] == token_store.TokenStore(
      str(path)).fingerprint
  assert a.info["rows_per_epoch"]["synthetic"] == a.info["tokens_train"] // L


def test_a_process_reads_only_its_rows(store):
  path, _ = store
  d = _build(path, 1, 2)
  with counted_reads() as reads:
    d.train_batch(9)
  assert [(s, r) for s, _, r in reads["rows"]] == d.batch_rows(9)
  assert reads["tokens"] == 4 * L


def test_eval_rows_are_held_out_and_shared(store):
  path, _ = store
  d = _build(path)
  evals = d.eval_batches(10 * L + 5, 4)
  assert len(evals) == 3
  assert sum((b["segment_ids"] != 0).sum() for b in evals) == 10 * L + 5
  val = _expected_stream("val")
  row0 = evals[0]["tokens"][0]
  np.testing.assert_array_equal(row0, val.tokens[:L])  # rows of the val split
  halves = [_build(path, p, 2).eval_batches(10 * L + 5, 4) for p in range(2)]
  for i, b in enumerate(evals):
    np.testing.assert_array_equal(
        np.concatenate([h[i]["tokens"] for h in halves]), b["tokens"])


def test_train_from_store_in_process(store, tmp_path):
  from llmlab import train  # pylint: disable=g-import-not-at-top
  path, _ = store
  workdir = str(tmp_path / "run")
  with counted_reads() as reads:
    summary = train.train(_train_cfg(path), workdir)
  assert summary["step"] == 3 and np.isfinite(summary["loss"])
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["data_info"]["fingerprint"] == token_store.TokenStore(
      str(path)).fingerprint
  assert saved["data_info"]["source"] == "tokens"
  d = _build(path, batch=4)
  train_rows = {(s, r) for s, split, r in reads["rows"]
                if split == "train"}
  wanted = {x for step in range(3) for x in d.batch_rows(step)}
  ahead = {x for step in range(3 + 8) for x in d.batch_rows(step)}
  assert wanted <= train_rows <= ahead  # its batches, plus prefetch


def test_mixture_store_and_hf_tokenizer(tmp_path):
  """Two sources with weights, a trained BPE tokenizer (uint16 ids)."""
  texts = [" ".join(["alpha beta gamma δέλτα"] * (i % 7 + 1)) for i in range(80)]
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for i, t in enumerate(texts):
    (corpus_dir / f"{i:03d}.txt").write_text(t)
  tok = tmp_path / "tok.json"
  assert tokenizer_cmd.main(["train", "--source=files",
                             f"--paths={corpus_dir}/*.txt",
                             "--vocab_size=300", f"--out={tok}"]) == 0
  cfg = _synthetic_cfg(num_docs=200)
  cfg.mixture = "synthetic:3,files:1"
  cfg.files.paths = f"{corpus_dir}/*.txt"
  cfg.tokenizer = str(tok)
  cfg.val_fraction = 0.3
  _write(tmp_path / "mix", cfg, shard_mb=0.01)
  d = _build(tmp_path / "mix", tokenizer=str(tok))
  assert [s["name"] for s in d.info["sources"]] == ["synthetic", "files"]
  assert [s["weight"] for s in d.info["sources"]] == [0.75, 0.25]
  assert d.info["bytes_train"] + d.info["bytes_val"] == sum(
      len(t.encode()) for t in texts) + 200 * 200
  names = [s for step in range(20) for s, _ in d.batch_rows(step)]
  assert 0.6 < names.count("synthetic") / len(names) < 0.9
  b = d.train_batch(0)
  assert b["tokens"].max() < 300 and (b["bytes"] >= 0).all()


def test_stdlib_slice_store(tmp_path):
  """The default corpus (a slice of it): same documents, fingerprint and
  held-out split as the in-memory source."""
  from llmlab.data import stdlib  # pylint: disable=g-import-not-at-top
  cfg = data.default_config()
  cfg.stdlib.include = "json/*"
  cfg.val_fraction = 0.3
  _write(tmp_path / "std", cfg, shard_mb=0.05)
  d = _build(tmp_path / "std")
  mem = data.build(cfg, seq_len=L, global_batch=8, seed=0)
  (src,) = d.info["sources"]
  assert src["fingerprint"] == stdlib.read(cfg.stdlib).fingerprint
  for key in ("docs_train", "docs_val", "bytes_train", "bytes_val",
              "tokens_train", "tokens_val"):
    assert d.info[key] == mem.info[key], key
  assert d.info["fingerprint"] != mem.info["fingerprint"]  # other batches


# --- resuming a killed run ----------------------------------------------------

class _Stop(Exception):
  pass


def test_failed_run_resumes_without_redoing_finished_units(store, tmp_path):
  clean_path, clean = store
  out = tmp_path / "resumed"
  seen = []

  def stop_after_two(record):
    seen.append(record["unit"])
    if len(seen) == 2:
      raise _Stop()

  with pytest.raises(_Stop):
    _write(out, on_unit_done=stop_after_two)
  assert not (out / "manifest.json").exists()
  with pytest.raises(DataError, match="unfinished"):
    _build(out)
  done = out / f"shards/synthetic/{seen[0]:06d}/done.json"
  stamp = done.stat().st_mtime_ns
  # A finished unit whose array went missing is redone, not trusted.
  shutil.rmtree(out / f"shards/synthetic/{seen[1]:06d}/train/tokens")
  again = _write(out)
  assert again["units_skipped"] == 1
  assert again["units_written"] == clean["units"] - 1
  assert done.stat().st_mtime_ns == stamp  # not rewritten
  assert again["fingerprint"] == clean["fingerprint"]
  m1 = json.loads((clean_path / "manifest.json").read_text())
  m2 = json.loads((out / "manifest.json").read_text())
  assert m1["sources"] == m2["sources"]
  assert _write(out)["units_written"] == 0  # finished: nothing to do


def test_killed_tokenize_command_resumes(tmp_path):
  """`llmlab tokenize` killed with SIGKILL after some units; the same
  command then finishes the rest."""
  out = tmp_path / "killed"
  cmd = [sys.executable, "-m", "llmlab", "tokenize",
         f"--config={ROOT}/configs/tiny.py", f"--out={out}", "--workers=1",
         "--shard_mb=0.02", "--config.data.source=synthetic",
         "--config.data.synthetic.num_docs=8000",
         "--config.data.synthetic.doc_len=64"]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=helpers.env())
  deadline = time.time() + 120
  markers = []
  while time.time() < deadline and proc.poll() is None:
    markers = list(out.glob("shards/synthetic/*/done.json"))
    if len(markers) >= 2:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  markers = list(out.glob("shards/synthetic/*/done.json"))
  assert len(markers) >= 2
  assert not (out / "manifest.json").exists(), "finished before the kill"
  rerun = helpers.llmlab(*cmd[3:])  # the same command, in process
  summary = json.loads(rerun.stdout.strip().splitlines()[-1])
  assert summary["units_skipped"] >= len(markers)
  assert summary["units_written"] == summary["units"] - summary[
      "units_skipped"] > 0
  token_store.TokenStore(str(out)).verify()


# --- bad input ----------------------------------------------------------------

def test_out_that_is_not_this_store_is_refused(store, tmp_path):
  path, _ = store
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="not a token store"):
    _write(other)
  assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
  before = (path / "manifest.json").read_bytes()
  with pytest.raises(DataError, match="another config.*val_fraction"):
    _write(path, _synthetic_cfg(val_fraction=0.2))
  assert (path / "manifest.json").read_bytes() == before


def test_store_of_another_tokenizer_is_refused(store, tmp_path):
  path, _ = store
  tok = tmp_path / "tok.json"
  tokenizer_cli.train(["a few words to learn merges"] * 20, 270).save(str(tok))
  fp = tokenizer_lib.load(str(tok)).fingerprint
  with pytest.raises(DataError) as e:
    _build(path, tokenizer=str(tok))
  assert "byte-v1" in str(e.value) and fp in str(e.value)


def _corrupt_copy(store, tmp_path, how):
  src, _ = store
  dst = tmp_path / how
  shutil.copytree(src, dst)
  shard = dst / "shards/synthetic/000001/train/tokens/c/0"
  raw = shard.read_bytes()
  if how == "truncated":
    shard.write_bytes(raw[:len(raw) // 2])
  elif how == "flipped":
    shard.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])
  else:
    shard.unlink()
  return dst


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
def test_corrupt_shard_names_the_shard(store, tmp_path, how):
  dst = _corrupt_copy(store, tmp_path, how)
  split = token_store.TokenStore(str(dst)).split("synthetic", "train")
  first = int(split.offsets[1]) // L + 1  # a row inside shard 1
  split.read_rows([0], L)  # shard 0 is fine
  with pytest.raises(DataError, match="shard shards/synthetic/000001/train"):
    split.read_rows([first], L)
  with pytest.raises(DataError, match="000001/train"):
    token_store.TokenStore(str(dst)).verify()


def test_corruption_is_seen_by_a_reader_in_the_writing_process(tmp_path):
  """What the writer wrote is not served from a cache: a shard truncated
  after writing fails to read in the same process."""
  _write(tmp_path / "s")
  shard = tmp_path / "s/shards/synthetic/000001/train/tokens/c/0"
  shard.write_bytes(shard.read_bytes()[:100])
  split = token_store.TokenStore(str(tmp_path / "s")).split("synthetic",
                                                            "train")
  with pytest.raises(DataError, match="000001/train is missing, truncated"):
    split.read_rows([int(split.offsets[1]) // L + 1], L)


def test_missing_store_and_bad_config(tmp_path, store):
  path, _ = store
  with pytest.raises(DataError, match="no token store"):
    _build(tmp_path / "nothing")
  with pytest.raises(DataError, match="tokens.path"):
    _build("")
  cfg = _store_cfg(path)
  cfg.mixture = "tokens:1,stdlib:1"
  with pytest.raises(DataError, match="cannot be mixed"):
    data.build(cfg, seq_len=L, global_batch=2, seed=0)
  with pytest.raises(DataError, match="token store already"):
    _write(tmp_path / "x", _store_cfg(path))
  with pytest.raises(DataError, match="less than one row"):
    data.build(_store_cfg(path), seq_len=10**7, global_batch=2, seed=0)


# --- GCS (integration) --------------------------------------------------------

@pytest.fixture(scope="module")
def gcs_store(gcs):
  uri = gcs.bucket("tokens") + "/store"
  summary = _write(uri, workers=2)
  return gcs, uri, summary


@pytest.mark.integration
def test_gcs_store_objects_and_rows(gcs_store, store):
  gcs, uri, summary = gcs_store
  names = gcs.objects("tokens", "store/")
  assert "store/manifest.json" in names and "store/plan.json" in names
  assert sum(n.endswith("done.json") for n in names) == summary["units"]
  local, _ = store
  a, b = _build(uri), _build(local)  # same config, same content
  assert a.info["fingerprint"] == b.info["fingerprint"]
  assert _same(a.train_batch(3), b.train_batch(3))


@pytest.mark.integration
def test_gcs_train_one_process(gcs_store, tmp_path):
  from llmlab import train  # pylint: disable=g-import-not-at-top
  _, uri, _ = gcs_store
  with counted_reads() as reads:
    summary = train.train(_train_cfg(uri), str(tmp_path / "run"))
  assert summary["step"] == 3
  d = _build(uri, batch=4)
  read = {(s, r) for s, split, r in reads["rows"] if split == "train"}
  wanted = {x for step in range(3) for x in d.batch_rows(step)}
  assert wanted <= read <= {x for s in range(11) for x in d.batch_rows(s)}


@pytest.mark.integration
def test_gcs_train_two_processes_read_only_their_rows(gcs_store, tmp_path):
  _, uri, _ = gcs_store
  steps = 4
  spec = {"store": uri, "steps": steps, "workdir": str(tmp_path / "run"),
          "out": str(tmp_path)}
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, f"{ROOT}/launch/local.py", "-n", "2",
       "--devices_per_process=1", "--timeout=500", "--", sys.executable,
       f"{ROOT}/tests/token_store_worker.py", json.dumps(spec)],
      capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  reads = [json.load(open(tmp_path / f"reads-{p}.json")) for p in range(2)]
  got = [{(s, r) for s, split, r in x["rows"] if split == "train"}
         for x in reads]
  assert not got[0] & got[1]
  for p in range(2):
    d = _build(uri, p, 2, batch=4)
    mine = {x for step in range(steps) for x in d.batch_rows(step)}
    ahead = {x for step in range(steps + 8) for x in d.batch_rows(step)}
    assert mine <= got[p] <= ahead
    assert reads[p]["tokens"] == len(reads[p]["rows"]) * L
    assert reads[p]["summary"]["step"] == steps


@pytest.mark.integration
def test_gcs_bad_bucket_and_unreachable_server(gcs_store, monkeypatch,
                                               tmp_path):
  from llmlab import train  # pylint: disable=g-import-not-at-top
  from tests import gcs as gcs_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match="gs://no-such-bucket/store.*does not "
                     "exist"):
    train.train(_train_cfg("gs://no-such-bucket/store"), str(tmp_path / "r"))
  with pytest.raises(DataError, match="gs://no-such-bucket/out"):
    _write("gs://no-such-bucket/out")
  _, uri, _ = gcs_store
  dead = f"http://127.0.0.1:{gcs_lib._free_port()}"  # pylint: disable=protected-access
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", dead)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
  start = time.time()
  # A server that does not answer once tensorstore's retries run out is a
  # storage failure (restartable, exit 75), not bad data: it names the store.
  from llmlab import storage  # pylint: disable=g-import-not-at-top
  with pytest.raises(storage.StorageTimeout, match=uri):
    _build(uri)
  assert time.time() - start < 30
