"""The built-in prose corpus: the English of the standard library.

No download: every docstring and comment of the stdlib `.py` files that the
`stdlib` source reads (same files, same filter, stdlib.py), one document per
file holding that file's docstrings and comments in order, plus nothing of
the code. With `stdlib` as domain A (the code, as written) and `prose` as
domain B, a continual-learning study has two related but distinct
distributions from one interpreter (llmlab/studies/continual.py).

Extraction is Python's own `tokenize`: STRING tokens that stand alone as a
statement (docstrings: a string right after the start of a line and
followed by a NEWLINE) and COMMENT tokens (without the `#`). Files that do
not tokenize (a few deliberately broken test fixtures) are skipped and
counted. `data.prose.include` / `data.prose.exclude` select files by the
same fnmatch patterns as `data.stdlib.*` (applied on top of them); the
fingerprint is a sha256 over the kept keys and extracted texts.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import tokenize

from etils import epath

from llmlab.data import corpus
from llmlab.data import stdlib
from llmlab.data.documents import Documents
from llmlab.data.errors import DataError

_MEMO: dict = {}
VERSION = "prose-v1"  # bump when extraction changes


def extract(source: str) -> str:
  """Docstrings and comments of one Python file, in order ('' if the file
  does not tokenize)."""
  out = []
  try:
    toks = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type != tokenize.NL]
  except (tokenize.TokenError, SyntaxError):
    return ""
  starts = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
  prev = tokenize.NEWLINE  # the file starts a statement
  for i, tok in enumerate(toks):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip("#").strip()
      if text and not text.startswith("!"):
        out.append(text)
      continue
    if tok.type == tokenize.STRING and prev in starts:
      j = i + 1
      while j < len(toks) and toks[j].type == tokenize.COMMENT:
        j += 1
      if j == len(toks) or toks[j].type in (tokenize.NEWLINE,
                                            tokenize.ENDMARKER):
        try:
          value = ast.literal_eval(tok.string)
        except (ValueError, SyntaxError, MemoryError):
          value = None
        if isinstance(value, str) and value.strip():
          out.append(inspect.cleandoc(value))
    prev = tok.type
  return "\n".join(out)


def read(data_cfg) -> Documents:
  """Prose documents of the stdlib slice `data.stdlib` x `data.prose`."""
  code = stdlib.read(data_cfg.stdlib)
  include = str(data_cfg.prose.get("include", "") or "")
  exclude = str(data_cfg.prose.get("exclude", "") or "")
  key = (code.fingerprint, include, exclude)
  if key in _MEMO:
    return _MEMO[key]
  if include or exclude:
    code = stdlib.select(code, include, exclude)
  cache = _cache_path(data_cfg, code.fingerprint)
  if cache is not None and cache.exists():
    body = json.loads(cache.read_text())
    docs = Documents("prose", body["keys"], body["texts"], body["fingerprint"],
                     body["info"])
    _MEMO.clear()
    _MEMO[key] = docs
    return docs
  sha = hashlib.sha256()
  keys, texts, empty = [], [], 0
  total = 0
  for k, src in zip(code.keys, code.texts):
    text = extract(src)
    if not text.strip():
      empty += 1
      continue
    data = text.encode("utf-8")
    sha.update(k.encode("utf-8") + b"\0" + data + b"\0")
    keys.append(k)
    texts.append(text)
    total += len(data)
  if not keys:
    raise DataError(f"data.prose.include={include!r}, data.prose.exclude="
                    f"{exclude!r}: no docstring or comment in the "
                    f"{len(code.keys)} stdlib files selected")
  info = {"source": "prose", "from": "stdlib docstrings and comments",
          "python_version": code.info.get("python_version"),
          "include": include, "exclude": exclude, "files": len(keys),
          "bytes": total, "files_without_prose": empty,
          "stdlib_fingerprint": code.fingerprint}
  docs = Documents("prose", keys, texts, sha.hexdigest(), info)
  if cache is not None:
    _write_cache(cache, docs)
  _MEMO.clear()
  _MEMO[key] = docs
  return docs


def _cache_path(data_cfg, fingerprint: str):
  """Extraction takes ~20 s for the whole stdlib; its result is kept in the
  data cache (`data.cache_dir`), keyed by the code slice's fingerprint."""
  base = corpus.default_cache_dir(str(data_cfg.get("cache_dir", "") or ""))
  name = hashlib.sha256(f"{VERSION}|{fingerprint}".encode()).hexdigest()
  return epath.Path(base) / f"prose-{name}.json"


def _write_cache(path, docs: Documents) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"keys": docs.keys, "texts": docs.texts,
                               "fingerprint": docs.fingerprint,
                               "info": docs.info}))
    tmp.rename(path)
  except OSError:  # a read-only cache only costs the extraction next time
    pass
