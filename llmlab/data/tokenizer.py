"""Tokenizers with the one extra thing bits-per-byte needs: bytes per token.

`encode_docs(texts)` returns, besides the ids, how many UTF-8 bytes of the
original text each token stands for. The counts of a document always sum to
its UTF-8 length (when it yields any token), so bits-per-byte compares models
across tokenizers honestly: a token's count is the bytes between the end of
the previous token and its own end (byte-level BPE pieces of one character
get the character's bytes on the first piece and 0 on the rest; text a
tokenizer drops, e.g. normalised whitespace, is charged to the next token;
trailing dropped text to the last token).

Special ids: the byte tokenizer has BOS=256, EOS=257, PAD=258. A tokenizer
file without BOS/EOS/PAD tokens gets them appended after its vocabulary
(`vocab_size` grows accordingly); they are never produced by `encode`.
"""

from __future__ import annotations

import hashlib

import numpy as np
from etils import epath

from llmlab.data.errors import DataError

_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class ByteTokenizer:
  """UTF-8 bytes are the tokens; needs no file and no cache."""

  kind = "byte"
  bos_id, eos_id, pad_id = 256, 257, 258
  vocab_size = 259
  fingerprint = "byte-v1"

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def encode_docs(self, texts: list[str]):
    """(ids int32 [N], bytes int32 [N], per-doc token counts int64 [D])."""
    encoded = [t.encode("utf-8") for t in texts]
    ids = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int32)
    lengths = np.fromiter((len(e) for e in encoded), np.int64, len(encoded))
    return ids, np.ones_like(ids), lengths

  def info(self) -> dict:
    return {"kind": self.kind, "vocab_size": self.vocab_size}


class _FileTokenizer:
  """Shared parts of tokenizers loaded from a file (specials, info)."""

  kind = ""

  def __init__(self, path: str, data: bytes, base_vocab: int, find_id):
    self.path = path
    self.fingerprint = hashlib.sha256(data).hexdigest()
    self._base_vocab = base_vocab
    extra = base_vocab
    ids = []
    for names in (_BOS_NAMES, _EOS_NAMES, _PAD_NAMES):
      found = next((i for i in map(find_id, names) if i is not None), None)
      if found is None:
        found, extra = extra, extra + 1
      ids.append(found)
    self.bos_id, self.eos_id, self.pad_id = ids
    self.vocab_size = extra
    self._specials = set(ids)

  def _plain(self, ids) -> list[int]:
    return [int(i) for i in ids
            if int(i) not in self._specials and 0 <= int(i) < self._base_vocab]

  def info(self) -> dict:
    return {"kind": self.kind, "path": self.path, "sha256": self.fingerprint,
            "vocab_size": self.vocab_size, "bos_id": self.bos_id,
            "eos_id": self.eos_id, "pad_id": self.pad_id}


class HFTokenizer(_FileTokenizer):
  """A Hugging Face `tokenizer.json` (any model the `tokenizers` lib loads)."""

  kind = "huggingface"

  def __init__(self, path: str, data: bytes):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"tokenizer file {path}: not a Hugging Face "
                      f"tokenizer.json ({type(e).__name__}: {e})") from None
    super().__init__(path, data, self._tok.get_vocab_size(),
                     self._tok.token_to_id)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode(self._plain(ids), skip_special_tokens=True)

  def encode_docs(self, texts: list[str], chunk: int = 256):
    ids, nbytes = [], []
    for i in range(0, len(texts), chunk):
      part = texts[i:i + chunk]
      encs = self._tok.encode_batch(part, add_special_tokens=False)
      for text, enc in zip(part, encs):
        ends = np.array([e for _, e in enc.offsets], np.int64)
        ids.append(np.array(enc.ids, np.int32))
        nbytes.append(bytes_per_token(_char_to_byte(text), ends))
    return _flatten(ids, nbytes)


class SPTokenizer(_FileTokenizer):
  """A SentencePiece `.model` file."""

  kind = "sentencepiece"

  def __init__(self, path: str, data: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"tokenizer file {path}: not a SentencePiece model "
                      f"({type(e).__name__}: {e})") from None
    named = {"<bos>": self._sp.bos_id(), "<eos>": self._sp.eos_id(),
             "<pad>": self._sp.pad_id()}
    find = lambda name: named.get(name) if named.get(name, -1) >= 0 else None
    super().__init__(path, data, self._sp.get_piece_size(), find)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids) -> str:
    return self._sp.decode(self._plain(ids))

  def encode_docs(self, texts: list[str], chunk: int = 256):
    ids, nbytes = [], []
    for i in range(0, len(texts), chunk):
      part = texts[i:i + chunk]
      for text, proto in zip(part, self._sp.encode(part, return_type="proto")):
        ends = np.array([p.end for p in proto.pieces], np.int64)  # bytes
        total = len(text.encode("utf-8"))
        ids.append(np.array([p.id for p in proto.pieces], np.int32))
        nbytes.append(bytes_per_token(np.arange(total + 1), ends))
    return _flatten(ids, nbytes)


def bytes_per_token(cum_bytes: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """Bytes each token covers, from token end offsets (see module doc).

  `cum_bytes[j]` is the UTF-8 byte offset of offset j of `ends`' unit
  (characters for HF, bytes for SentencePiece); `ends` may repeat or go back
  (overlapping pieces), so the running maximum is used.
  """
  if ends.size == 0:
    return np.zeros(0, np.int32)
  ends = np.maximum.accumulate(np.clip(ends, 0, len(cum_bytes) - 1))
  starts = np.concatenate([[0], ends[:-1]])
  counts = cum_bytes[ends] - cum_bytes[starts]
  counts[-1] += cum_bytes[-1] - cum_bytes[ends[-1]]
  return counts.astype(np.int32)


def _char_to_byte(text: str) -> np.ndarray:
  """[len(text)+1] UTF-8 byte offset of each character offset."""
  if text.isascii():
    return np.arange(len(text) + 1)
  cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
  width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
  return np.concatenate([[0], np.cumsum(width)])


def _flatten(ids: list[np.ndarray], nbytes: list[np.ndarray]):
  lengths = np.array([len(x) for x in ids], np.int64)
  if not ids:
    return np.zeros(0, np.int32), np.zeros(0, np.int32), lengths
  return np.concatenate(ids), np.concatenate(nbytes), lengths


def load(spec: str):
  """'byte', a `tokenizer.json` path or a SentencePiece `.model` path."""
  if spec == "byte":
    return ByteTokenizer()
  path = epath.Path(spec)
  if not str(spec).endswith((".json", ".model")):
    raise DataError(f"data.tokenizer={spec!r}: expected 'byte', a "
                    "tokenizer.json path or a SentencePiece .model path")
  try:
    data = path.read_bytes()
  except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as e:
    raise DataError(f"data.tokenizer: cannot read tokenizer file {spec}: "
                    f"{e}") from None
  cls = HFTokenizer if str(spec).endswith(".json") else SPTokenizer
  return cls(str(spec), data)
