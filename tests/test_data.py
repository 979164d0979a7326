"""Tests of llmlab.data: order, sharding, packing, sources, errors, metrics."""

import gzip
import hashlib
import io
import json
import math

import numpy as np
import pytest

from llmlab import data
from llmlab.commands import tokenizer as tokenizer_cmd
from llmlab.data import corpus
from llmlab.data import files
from llmlab.data import metrics
from llmlab.data import synthetic
from llmlab.data import tokenizer as tokenizer_lib
from llmlab.data.packing import PackedRows

BOS, EOS, PAD = 256, 257, 258
KEYS = ("tokens", "segment_ids", "positions", "bytes")


def _same(a, b) -> bool:
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _files_cfg(paths, **kw):
  cfg = data.default_config()
  cfg.source = "files"
  cfg.files.paths = paths
  cfg.val_fraction = kw.pop("val_fraction", 0.3)
  for k, v in kw.items():
    if k in ("text_field", "column"):
      cfg.files[k] = v
    else:
      cfg[k] = v
  return cfg


def _texts(n=40, seed=0):
  """Varied documents with some multi-byte characters."""
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "gamma", "délta", "εψιλον", "zeta", "эта", "θ",
           "\n"]
  return [" ".join(rng.choice(words, size=rng.integers(5, 60)))
          for _ in range(n)]


@pytest.fixture(scope="module")
def default_data():
  return data.build(data.default_config(), seq_len=64, global_batch=8, seed=0)


# --- the default corpus, order and sharding ----------------------------------

def test_default_build_layout_and_info(default_data):
  d = default_data
  assert d.vocab_size == d.tokenizer.vocab_size == 259
  assert (d.tokenizer.bos_id, d.tokenizer.eos_id, d.tokenizer.pad_id) == (
      BOS, EOS, PAD)
  batch = d.train_batch(0)
  assert set(batch) == set(KEYS)
  for k in KEYS:
    assert batch[k].shape == (8, 64) and batch[k].dtype == np.int32
  info = json.loads(json.dumps(d.info))
  src = info["sources"][0]
  assert src["name"] == "stdlib" and src["python_version"]
  assert len(info["fingerprint"]) == 64 and len(src["fingerprint"]) == 64
  assert info["docs_train"] > 1000 and info["docs_val"] > 5
  assert info["bytes_train"] + info["bytes_val"] == src["bytes"]
  assert info["tokens_train"] == info["bytes_train"] + 2 * info["docs_train"]
  assert src["skipped_non_utf8"]  # the stdlib's mis-encoded test fixtures


def test_same_seed_same_batches_other_seed_differs(default_data):
  again = data.build(data.default_config(), seq_len=64, global_batch=8, seed=0)
  other = data.build(data.default_config(), seq_len=64, global_batch=8, seed=1)
  for step in (0, 1, 57):
    assert _same(default_data.train_batch(step), again.train_batch(step))
    assert not np.array_equal(default_data.train_batch(step)["tokens"],
                              other.train_batch(step)["tokens"])
  assert not _same(default_data.train_batch(0), default_data.train_batch(1))


def test_process_shards_are_disjoint_and_complete(default_data):
  shards = [data.build(data.default_config(), seq_len=64, global_batch=8,
                       seed=0, process_index=p, process_count=2)
            for p in (0, 1)]
  for step in (0, 3, 10):
    parts = [s.train_batch(step) for s in shards]
    assert parts[0]["tokens"].shape == (4, 64)
    whole = {k: np.concatenate([p[k] for p in parts]) for k in KEYS}
    assert _same(whole, default_data.train_batch(step))


def test_train_iter_equals_train_batch_and_resume(default_data):
  it = default_data.train_iter(0)
  first = [next(it) for _ in range(6)]
  for step, batch in enumerate(first):
    assert _same(batch, default_data.train_batch(step))
  resumed = data.build(data.default_config(), seq_len=64, global_batch=8,
                       seed=0)  # a fresh process after a restart
  it = resumed.train_iter(3)
  for step in range(3, 6):
    assert _same(next(it), first[step])
  assert _same(next(resumed.train_iter(1000)), default_data.train_batch(1000))


def test_packed_rows_masks_positions_segments(default_data):
  batch = default_data.train_batch(2)
  seg, pos = batch["segment_ids"], batch["positions"]
  tok, nb = batch["tokens"], batch["bytes"]
  assert (seg >= 1).all()  # training rows are full: no padding
  assert (pos[:, 0] == 0).all() and (seg[:, 0] == 1).all()
  same = seg[:, 1:] == seg[:, :-1]
  assert ((seg[:, 1:] - seg[:, :-1]) >= 0).all()
  assert np.array_equal(pos[:, 1:], np.where(same, pos[:, :-1] + 1, 0))
  starts = ~same  # a new document begins: BOS, after the previous EOS
  assert (tok[:, 1:][starts] == BOS).all()
  assert (tok[:, :-1][starts] == EOS).all()
  assert np.array_equal(nb == 0, (tok == BOS) | (tok == EOS))


def test_packing_reconstructs_documents_in_seeded_order():
  docs = [f"document number {i} " * (i % 5 + 1) for i in range(23)]
  ids, nbytes, lengths = tokenizer_lib.ByteTokenizer().encode_docs(docs)
  stream = corpus.wrap(ids, nbytes, lengths, BOS, EOS)
  rows = PackedRows(stream, 16, seed=5)
  flat = np.concatenate([rows[i]["tokens"] for i in range(len(rows))])
  order = np.random.default_rng(5).permutation(len(docs))
  expected = np.concatenate(
      [[BOS, *docs[d].encode(), EOS] for d in order]).astype(np.int32)
  assert len(rows) == len(expected) // 16
  assert np.array_equal(flat, expected[:len(flat)])
  seg = np.stack([rows[i]["segment_ids"] for i in range(len(rows))])
  assert seg.max() >= 2 and (seg[:, 0] == 1).all()
  with pytest.raises(IndexError):
    rows[len(rows)]  # pylint: disable=pointless-statement


def test_epochs_cover_every_row_once_and_reshuffle(tmp_path):
  for i, text in enumerate(_texts(30)):
    (tmp_path / f"d{i:02d}.txt").write_text(text)
  cfg = _files_cfg(str(tmp_path / "*.txt"))
  d = data.build(cfg, seq_len=32, global_batch=4, seed=3)
  n = d.info["rows_per_epoch"]["files"]
  steps = -(-2 * n // 4)
  rows = np.concatenate([d.train_batch(s)["tokens"] for s in range(steps)])
  packed = PackedRows(d._parts[0].train, 32,  # pylint: disable=protected-access
                      data.pipeline.derive_seed(3, "files", "documents"))
  every = sorted(packed[i]["tokens"].tobytes() for i in range(n))
  for epoch in (0, 1):
    got = sorted(r.tobytes() for r in rows[epoch * n:(epoch + 1) * n])
    assert got == every
  assert not np.array_equal(rows[:n], rows[n:2 * n])


# --- evaluation --------------------------------------------------------------

def test_eval_batches_fixed_budget_and_shares(default_data):
  evals = default_data.eval_batches(1000, 4)
  assert len(evals) == 4  # ceil(1000 / 64) = 16 rows, 4 per batch
  seg = np.concatenate([b["segment_ids"] for b in evals])
  assert (seg != 0).sum() == 1000
  other = data.build(data.default_config(), seq_len=64, global_batch=8,
                     seed=7)
  assert all(_same(a, b) for a, b in zip(evals, other.eval_batches(1000, 4)))
  shards = [data.build(data.default_config(), seq_len=64, global_batch=8,
                       seed=1, process_index=p, process_count=2)
            .eval_batches(1000, 4) for p in (0, 1)]
  for i, batch in enumerate(evals):
    whole = {k: np.concatenate([s[i][k] for s in shards]) for k in KEYS}
    assert _same(whole, batch)
  padded = default_data.eval_batches(64 * 5, 4)[-1]
  assert (padded["segment_ids"][1:] == 0).all()
  assert (padded["tokens"][1:] == PAD).all()
  with pytest.raises(data.DataError, match="validation split"):
    default_data.eval_batches(10**9, 4)


# --- metrics -----------------------------------------------------------------

def test_bits_per_byte_hand_checked():
  # Row: BOS 'a' 'é'(as one 2-byte token) EOS PAD; uniform model over V=4.
  batch = {"tokens": np.array([[BOS, 97, 300, EOS, PAD]]) % 4,
           "segment_ids": np.array([[1, 1, 1, 1, 0]]),
           "bytes": np.array([[0, 1, 2, 0, 0]])}
  mask = metrics.target_mask(batch)
  assert mask.tolist() == [[True, True, True, False]]
  logprobs = np.full((1, 5, 4), math.log(1 / 4))
  nll = metrics.target_nll(logprobs, batch)
  assert np.allclose(nll, [[math.log(4)] * 3 + [0.0]])
  nbytes = metrics.target_bytes(batch).sum()
  assert nbytes == 3  # 'a' 1 + 'é' 2 + EOS 0
  # 3 targets x 2 bits each over 3 bytes = 2 bits per byte.
  assert metrics.bits_per_byte(nll.sum(), nbytes) == pytest.approx(2.0)
  cross = {"segment_ids": np.array([[1, 1, 2, 2, 0, 0]])}
  assert metrics.target_mask(cross).tolist() == [[True, False, True, False,
                                                   False]]


# --- synthetic source --------------------------------------------------------

def test_synthetic_entropy_hand_computed():
  # Order 1 over {0, 1}: P(.|0) = (.9, .1), P(.|1) = (.5, .5).
  chain = synthetic.MarkovChain(2, 1, np.array([[0, 1], [0, 1]]),
                                np.array([[0.9, 0.1], [0.5, 0.5]]))
  # pi solves pi0 = .9 pi0 + .5 pi1  =>  pi = (5/6, 1/6).
  assert np.allclose(synthetic.stationary(chain), [5 / 6, 1 / 6])
  h_01 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
  expected = 5 / 6 * h_01 + 1 / 6 * math.log(2)
  assert synthetic.entropy_rate(chain) == pytest.approx(expected, rel=1e-12)
  assert expected == pytest.approx(0.386427, abs=1e-6)
  periodic = synthetic.MarkovChain(2, 1, np.array([[1], [0]]),
                                   np.array([[1.0], [1.0]]))
  assert not synthetic.is_ergodic(periodic) and synthetic.is_ergodic(chain)


def test_synthetic_samples_match_entropy_and_info():
  chain = synthetic.make_chain(seed=1, num_symbols=6, order=2, branching=3)
  rng = np.random.default_rng(0)
  seqs = synthetic.sample(chain, 400, 200, rng)
  ctx = seqs[:, 0] * 6 + seqs[:, 1]
  nll = []
  for t in range(2, 200):
    row = chain.successors[ctx]
    p = np.where(row == seqs[:, t][:, None], chain.probs[ctx], 0).sum(1)
    assert (p > 0).all()  # only allowed successors are sampled
    nll.append(-np.log(p))
    ctx = chain.next_context(ctx, seqs[:, t])
  assert np.mean(nll) == pytest.approx(synthetic.entropy_rate(chain), rel=0.03)
  cfg = data.default_config()
  cfg.source = "synthetic"
  d = data.build(cfg, seq_len=128, global_batch=4, seed=0)
  h = d.info["sources"][0]["entropy_rate_nats_per_symbol"]
  assert d.info["entropy_rate_nats"] == h > 0
  assert d.info["entropy_rate_bits_per_byte"] == pytest.approx(h / math.log(2))
  text = d.tokenizer.decode(d.train_batch(0)["tokens"][0])
  assert set(text) <= set(synthetic.ALPHABET[:16])


# --- files source: formats ---------------------------------------------------

def _write(tmp_path, fmt, texts):
  if fmt == "txt":
    deeper = tmp_path / "nested" / "deeper"
    deeper.mkdir(parents=True)
    for i, t in enumerate(texts):
      (deeper / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    return str(tmp_path / "**" / "*.txt")
  if fmt in ("jsonl", "jsonl.gz"):
    lines = "\n".join(json.dumps({"body": t, "id": i})
                      for i, t in enumerate(texts)) + "\n"
    path = tmp_path / f"docs.{fmt}"
    raw = lines.encode()
    path.write_bytes(gzip.compress(raw) if fmt.endswith("gz") else raw)
    return str(path)
  if fmt == "parquet":
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}),
                   str(path))
    return str(path)
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  path = tmp_path / "docs.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for t in texts:
    writer.write(t.encode("utf-8"))
  writer.close()
  return str(path)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz", "parquet",
                                 "array_record"])
def test_files_round_trip(tmp_path, fmt):
  texts = _texts()
  cfg = _files_cfg(_write(tmp_path, fmt, texts), text_field="body",
                   column="body")
  docs = files.read(cfg.files)
  assert docs.texts == texts
  d = data.build(cfg, seq_len=512, global_batch=2, seed=0)
  total = sum(len(t.encode()) for t in texts)
  assert d.info["bytes_train"] + d.info["bytes_val"] == total
  assert d.info["docs_train"] + d.info["docs_val"] == len(texts)
  encoded = [t.encode() for t in texts]
  whole = 0
  for step in range(6):
    batch = d.train_batch(step)
    for tok, seg in zip(batch["tokens"], batch["segment_ids"]):
      for s in np.unique(seg):
        piece = tok[seg == s]
        body = bytes(piece[(piece < 256)].astype(np.uint8).tolist())
        if piece[0] == BOS and piece[-1] == EOS:
          assert body in encoded
          whole += 1
        else:  # a fragment cut at a row end
          assert any(body in e for e in encoded)
  assert whole > 0


def test_mixture_interleaves_by_weight():
  cfg = data.default_config()
  cfg.mixture = "stdlib:0.75,synthetic:0.25"
  d = data.build(cfg, seq_len=64, global_batch=8, seed=0)
  assert [s["name"] for s in d.info["sources"]] == ["stdlib", "synthetic"]
  letters = set(synthetic.ALPHABET[:16].encode()) | {BOS, EOS}
  rows = np.concatenate([d.train_batch(s)["tokens"] for s in range(4)])
  from_synthetic = [set(r.tolist()) <= letters for r in rows]
  assert sum(from_synthetic) == 8  # 32 rows x 0.25
  assert "entropy_rate_nats" not in d.info
  evals = d.eval_batches(640, 10)  # 8 stdlib rows (480 tokens) + 3 synthetic
  assert (np.concatenate([b["segment_ids"] for b in evals]) != 0).sum() == 640


# --- tokenizers --------------------------------------------------------------

def test_a_bucket_cache_dir_is_refused_before_anything_is_made(tmp_path, monkeypatch):
  # The token cache is memory-mapped: a gs:// cache_dir would otherwise
  # become a local directory named "gs:" under the working directory.
  monkeypatch.chdir(tmp_path)
  (tmp_path / "a.txt").write_text("some text " * 50)
  cfg = _files_cfg(str(tmp_path / "a.txt"), cache_dir="gs://bkt/cache")
  with pytest.raises(data.DataError, match=r"data.cache_dir='gs://bkt/cache'"):
    data.build(cfg, seq_len=32, global_batch=2, seed=0)
  assert not (tmp_path / "gs:").exists()


def test_hf_tokenizer_trained_by_cli_round_trips(tmp_path):
  texts = _texts(60)
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for i, t in enumerate(texts):
    (corpus_dir / f"{i}.txt").write_text(t)
  out = tmp_path / "tok.json"
  code = tokenizer_cmd.main(["train", "--source=files",
                             f"--paths={corpus_dir}/*.txt",
                             "--vocab_size=300", f"--out={out}"])
  assert code == 0 and out.exists()
  cfg = _files_cfg(f"{corpus_dir}/*.txt", tokenizer=str(out),
                   cache_dir=str(tmp_path / "cache"))
  d = data.build(cfg, seq_len=32, global_batch=2, seed=0)
  tok = d.tokenizer
  assert tok.vocab_size == 300 and (tok.pad_id, tok.bos_id, tok.eos_id) == (
      0, 1, 2)
  for t in texts[:5] + ["ünïcödé ☃ 𝄞 text"]:
    ids = tok.encode(t)
    assert tok.decode(ids) == t
    _, nbytes, _ = tok.encode_docs([t])
    assert nbytes.sum() == len(t.encode()) and len(nbytes) == len(ids)
  assert len(tok.encode(texts[0])) < len(texts[0].encode())  # merges learnt
  total = sum(len(t.encode()) for t in texts)
  assert d.info["bytes_train"] + d.info["bytes_val"] == total
  assert d.info["tokenizer"]["sha256"] == hashlib.sha256(
      out.read_bytes()).hexdigest()
  assert list((tmp_path / "cache").iterdir())  # streams cached on disk
  corpus._MEMO.clear()  # pylint: disable=protected-access
  again = data.build(cfg, seq_len=32, global_batch=2, seed=0)  # from disk
  assert _same(again.train_batch(4), d.train_batch(4))


def test_sentencepiece_tokenizer(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = _texts(60)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=60,
      model_type="bpe", minloglevel=2)  # default: unk 0, bos 1, eos 2, no pad
  path = tmp_path / "sp.model"
  path.write_bytes(model.getvalue())
  for i, t in enumerate(texts):
    (tmp_path / f"{i}.txt").write_text(t)
  cfg = _files_cfg(f"{tmp_path}/*.txt", tokenizer=str(path),
                   cache_dir=str(tmp_path / "cache"))
  d = data.build(cfg, seq_len=32, global_batch=2, seed=0)
  assert (d.tokenizer.bos_id, d.tokenizer.eos_id) == (1, 2)
  assert d.tokenizer.pad_id == 60 and d.vocab_size == 61  # appended
  total = sum(len(t.encode()) for t in texts)
  assert d.info["bytes_train"] + d.info["bytes_val"] == total
  assert d.tokenizer.decode(d.tokenizer.encode("alpha beta")) == "alpha beta"


# --- bad input ---------------------------------------------------------------

def _bad_jsonl(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  return _files_cfg(str(p)), r"bad\.jsonl line 2: no field 'text'"


def _bad_json(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"text": "fine"}\n\n{"text": oops}\n')
  return _files_cfg(str(p)), r"bad\.jsonl line 3: invalid JSON"


def _non_utf8(tmp_path):
  p = tmp_path / "latin1.txt"
  p.write_bytes("line one\ncaf\u00e9\n".encode("latin-1"))
  return _files_cfg(str(p)), r"latin1\.txt line 2: not valid UTF-8"


def _parquet_no_column(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  p = tmp_path / "t.parquet"
  pq.write_table(pa.table({"content": ["a", "b"]}), str(p))
  return _files_cfg(str(p)), r"t\.parquet: no column 'text'.*content"


def _empty_file(tmp_path):
  (tmp_path / "a.txt").write_text("some text")
  (tmp_path / "empty.txt").write_text("")
  return _files_cfg(str(tmp_path / "*.txt")), r"empty\.txt: empty file"


def _missing_path(tmp_path):
  return _files_cfg(str(tmp_path / "nope.txt")), "nope.txt does not exist"


def _empty_glob(tmp_path):
  return _files_cfg(str(tmp_path / "*.jsonl")), "matches no file"


def _bad_tokenizer_json(tmp_path):
  (tmp_path / "a.txt").write_text("text " * 50)
  tok = tmp_path / "tok.json"
  tok.write_text('{"not": "a tokenizer"}')
  return (_files_cfg(str(tmp_path / "a.txt"), tokenizer=str(tok)),
          r"tok\.json: not a Hugging Face tokenizer")


def _bad_sentencepiece(tmp_path):
  (tmp_path / "a.txt").write_text("text " * 50)
  tok = tmp_path / "x.model"
  tok.write_bytes(b"\x00garbage")
  return (_files_cfg(str(tmp_path / "a.txt"), tokenizer=str(tok)),
          r"x\.model: not a SentencePiece model")


def _missing_tokenizer(tmp_path):
  cfg = data.default_config()
  cfg.tokenizer = str(tmp_path / "none.json")
  return cfg, "cannot read tokenizer file"


def _empty_validation(tmp_path):
  for name in "abc":
    (tmp_path / f"{name}.txt").write_text("a document " * 20)
  return (_files_cfg(str(tmp_path / "*.txt"), val_fraction=0.001),
          "validation split is empty")


def _too_small(tmp_path):
  for i in range(20):  # about 10 training documents of 3 tokens
    (tmp_path / f"{i}.txt").write_text("x")
  return (_files_cfg(str(tmp_path / "*.txt"), val_fraction=0.5),
          "less than one row")


def _bad_mixture(tmp_path):
  del tmp_path
  cfg = data.default_config()
  cfg.mixture = "stdlib:0.5,web:0.5"
  return cfg, "unknown source 'web'"


@pytest.mark.parametrize("case", [
    _bad_jsonl, _bad_json, _non_utf8, _parquet_no_column, _empty_file,
    _missing_path, _empty_glob, _bad_tokenizer_json, _bad_sentencepiece,
    _missing_tokenizer, _empty_validation, _too_small, _bad_mixture])
def test_bad_input_raises_data_error(tmp_path, case):
  cfg, message = case(tmp_path)
  with pytest.raises(data.DataError, match=message):
    data.build(cfg, seq_len=64, global_batch=2, seed=0)


def test_bad_shapes_raise_data_error():
  cfg = data.default_config()
  with pytest.raises(data.DataError, match="multiple of process_count"):
    data.build(cfg, seq_len=64, global_batch=3, seed=0, process_count=2)
  with pytest.raises(data.DataError, match="seq_len"):
    data.build(cfg, seq_len=1, global_batch=2, seed=0)


def test_non_utf8_replace_and_skip_are_counted(tmp_path):
  (tmp_path / "a.jsonl").write_bytes(
      b'{"text": "good one"}\n{"text": "caf\xe9"}\n{"text": ""}\n')
  cfg = _files_cfg(str(tmp_path / "a.jsonl"), decode_errors="replace")
  docs = files.read(cfg.files, "replace")
  assert docs.texts == ["good one", "caf\ufffd"]
  assert docs.info["docs_replaced_non_utf8"] == 1
  assert docs.info["docs_skipped_empty"] == 1
  docs = files.read(cfg.files, "skip")
  assert docs.texts == ["good one"] and docs.info["docs_skipped_non_utf8"] == 1


def test_tokenizer_cli_reports_bad_input(tmp_path, capsys):
  code = tokenizer_cmd.main(["train", "--source=files",
                             f"--paths={tmp_path}/*.txt",
                             f"--out={tmp_path / 'tok.json'}"])
  assert code == 2 and "matches no file" in capsys.readouterr().err
  assert not (tmp_path / "tok.json").exists()
