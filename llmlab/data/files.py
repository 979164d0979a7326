"""The `files` source: local or remote text files in a few common formats.

`data.files.paths` lists paths and globs: local ones via `glob` (`**`
recurses), URIs via `etils.epath` (`gs://...` where its backend is
installed; `*` only). The format comes from the suffix:

  .txt                  one document per file
  .jsonl, .jsonl.gz     one document per line: the string field `text_field`
                        (blank lines are ignored)
  .parquet              one document per row: the string column `column`
                        (null rows skipped and counted)
  .array_record,        one document per record, UTF-8 text (needs the
  .arrayrecord          `array_record` package)

Errors (DataError naming file and line/row): a path that does not exist, a
glob matching nothing, an unknown suffix, an empty file (or one without any
document), invalid JSON, a line without the field or with a non-string
value, a parquet file without the column, and bytes that are not UTF-8 when
`data.decode_errors='error'` ('replace' and 'skip' count instead). Empty
documents ("" values) are skipped and counted. Files are read whole into
memory: this source is for corpora that fit in RAM.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import zlib

from etils import epath

from llmlab.data.config import split_paths
from llmlab.data.documents import Documents
from llmlab.data.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet", ".array_record",
             ".arrayrecord")


def read(files_cfg, decode_errors: str = "error") -> Documents:
  if decode_errors not in ("error", "replace", "skip"):
    raise DataError(f"data.decode_errors={decode_errors!r}: expected "
                    "'error', 'replace' or 'skip'")
  patterns = split_paths(files_cfg.paths)
  if not patterns:
    raise DataError("data.files.paths is empty; give paths or globs of "
                    f"{', '.join(SUFFIXES)} files")
  reader = Reader(files_cfg, decode_errors, patterns)
  for path, key in expand(patterns):
    reader.read_file(path, key)
  return reader.documents()


def expand(patterns: list[str]) -> list[tuple[epath.Path, str]]:
  """[(path, key)] for all patterns, in order, without duplicates."""
  seen, out = set(), []
  for pattern in patterns:
    for path, key in _expand_one(pattern):
      if str(path) not in seen:
        seen.add(str(path))
        out.append((path, key))
  return out


def _expand_one(pattern: str):
  pattern = os.path.expanduser(pattern)
  parts = pattern.split("/")
  wild = [i for i, p in enumerate(parts) if any(c in p for c in "*?[")]
  if not wild:
    path = epath.Path(pattern)
    if not path.exists():
      raise DataError(f"data.files.paths: {pattern} does not exist")
    if path.is_dir():
      raise DataError(f"data.files.paths: {pattern} is a directory; use a "
                      f"glob such as {pattern.rstrip('/')}/*.txt")
    return [(path, path.name)]
  base = "/".join(parts[:wild[0]]) or ("/" if pattern.startswith("/") else ".")
  rest = "/".join(parts[wild[0]:])
  if "://" in pattern:  # remote: epath (no `**` there, by design)
    found = epath.Path(base).glob(rest)
  else:  # local: the glob module, which also understands `**`
    found = map(epath.Path, glob.glob(pattern, recursive=True))
  matches = sorted((p for p in found if p.is_file()), key=str)
  if not matches:
    raise DataError(f"data.files.paths: glob {pattern} matches no file")
  return [(p, os.path.relpath(str(p), base)) for p in matches]


class Reader:
  """Accumulates documents, the fingerprint and counts over files."""

  def __init__(self, files_cfg, decode_errors: str, patterns: list[str]):
    self.text_field = files_cfg.text_field
    self.column = files_cfg.column
    self.policy = decode_errors
    self.keys, self.texts = [], []
    self.sha = hashlib.sha256()
    self.counts = {"files": 0, "bytes": 0, "docs_replaced_non_utf8": 0,
                   "docs_skipped_non_utf8": 0, "docs_skipped_empty": 0,
                   "rows_skipped_null": 0}
    self.patterns = patterns

  def read_file(self, path: epath.Path, key: str) -> None:
    name = str(path)
    if not name.endswith(SUFFIXES):
      raise DataError(f"{name}: unknown file type; expected one of "
                      f"{', '.join(SUFFIXES)}")
    data = path.read_bytes()
    if not data:
      raise DataError(f"{name}: empty file")
    self.sha.update(key.encode("utf-8") + b"\0" + data + b"\0")
    before = len(self.texts)
    if name.endswith(".txt"):
      self._add(key, self._decode(data, name, data))
    elif name.endswith((".jsonl", ".jsonl.gz")):
      self._read_jsonl(name, key, data)
    elif name.endswith(".parquet"):
      self._read_parquet(name, key, data)
    else:
      self._read_array_record(name, key)
    if len(self.texts) == before:
      raise DataError(f"{name}: contains no non-empty document")
    self.counts["files"] += 1
    self.counts["bytes"] += len(data)

  def _add(self, key: str, text: str | None) -> None:
    if text is None:
      return
    if not text:
      self.counts["docs_skipped_empty"] += 1
      return
    self.keys.append(key)
    self.texts.append(text)

  def _decode(self, raw: bytes, where: str, whole: bytes | None = None,
              line: int | None = None) -> str | None:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      if self.policy == "replace":
        self.counts["docs_replaced_non_utf8"] += 1
        return raw.decode("utf-8", errors="replace")
      if self.policy == "skip":
        self.counts["docs_skipped_non_utf8"] += 1
        return None
      if line is None and whole is not None:
        line = whole.count(b"\n", 0, e.start) + 1
      at = f" line {line}" if line is not None else ""
      raise DataError(f"{where}{at}: not valid UTF-8 ({e.reason} at byte "
                      f"{e.start}); set data.decode_errors='replace' or "
                      "'skip' to accept it") from None

  def _read_jsonl(self, name: str, key: str, data: bytes) -> None:
    if name.endswith(".gz"):
      try:
        data = gzip.decompress(data)
      except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: not a valid gzip file ({e})") from None
      if not data:
        raise DataError(f"{name}: empty file (after gunzip)")
    for i, raw in enumerate(data.split(b"\n"), start=1):
      if not raw.strip():
        continue
      line = self._decode(raw, name, line=i)
      if line is None:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{name} line {i}: invalid JSON ({e.msg})") from None
      if not isinstance(record, dict) or self.text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record)
        raise DataError(f"{name} line {i}: no field {self.text_field!r} "
                        f"(data.files.text_field); found {fields}")
      text = record[self.text_field]
      if not isinstance(text, str):
        raise DataError(f"{name} line {i}: field {self.text_field!r} is "
                        f"{type(text).__name__}, expected a string")
      self._add(f"{key}#{i}", text)

  def _read_parquet(self, name: str, key: str, data: bytes) -> None:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
      pfile = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
      raise DataError(f"{name}: not a parquet file ({e})") from None
    schema = pfile.schema_arrow
    if self.column not in schema.names:
      raise DataError(f"{name}: no column {self.column!r} "
                      f"(data.files.column); columns: {schema.names}")
    kind = schema.field(self.column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or
            pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
      raise DataError(f"{name}: column {self.column!r} has type {kind}, "
                      "expected string or binary")
    values = pfile.read(columns=[self.column]).column(self.column).to_pylist()
    for row, value in enumerate(values):
      if value is None:
        self.counts["rows_skipped_null"] += 1
        continue
      if isinstance(value, bytes):
        value = self._decode(value, f"{name} row {row}")
      self._add(f"{key}#{row}", value)

  def _read_array_record(self, name: str, key: str) -> None:
    try:
      # pylint: disable-next=g-import-not-at-top
      from array_record.python import array_record_module
    except ImportError:
      raise DataError(f"{name}: reading ArrayRecord files needs the "
                      "array_record package: pip install array_record"
                      ) from None
    reader = array_record_module.ArrayRecordReader(name)
    try:
      records = reader.read_all()
    finally:
      reader.close()
    for i, record in enumerate(records):
      self._add(f"{key}#{i}", self._decode(record, f"{name} record {i}"))

  def documents(self) -> Documents:
    """The documents; the fingerprint covers file keys, contents and the
    settings that decide what text is taken from them."""
    settings = [self.text_field, self.column, self.policy]
    self.sha.update(json.dumps(settings).encode())
    info = {"source": "files", "paths": self.patterns,
            "text_field": self.text_field, "column": self.column,
            "decode_errors": self.policy, **self.counts}
    return Documents("files", self.keys, self.texts, self.sha.hexdigest(),
                     info)
