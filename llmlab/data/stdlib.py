"""The default corpus: the Python standard library's own source code.

No download: the `.py` files under `sysconfig.get_paths()["stdlib"]` of the
running interpreter. The corpus therefore follows the Python version; the
recorded fingerprint (sha256 over relative paths and contents) and
`python_version` say which one a run used.

Filter (deterministic): files ending in `.py`, walked in sorted order of
relative path; directories `site-packages`, `dist-packages` and `__pycache__`
are skipped (third-party code is not the standard library); files larger than
`data.stdlib.max_file_bytes` and empty or whitespace-only files (many
`__init__.py`) are skipped and counted; files that are not valid
UTF-8 (a few deliberately mis-encoded test fixtures) are skipped, counted and
listed. Each file is one document, keyed by its relative path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig

from llmlab.data.documents import Documents
from llmlab.data.errors import DataError

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_MEMO: dict = {}


def root() -> str:
  return sysconfig.get_paths()["stdlib"]


def list_files(base: str) -> list[tuple[str, os.stat_result]]:
  """[(relative path, stat)] of candidate files, sorted by relative path."""
  found = []
  for dirpath, dirnames, filenames in os.walk(base):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith(".py"):
        full = os.path.join(dirpath, name)
        found.append((os.path.relpath(full, base), os.stat(full)))
  found.sort(key=lambda item: item[0])
  return found


def read(cfg) -> Documents:
  """The stdlib documents; memoised in-process while no file changed."""
  base = root()
  files = list_files(base)
  if not files:
    raise DataError(f"stdlib source: no .py files under {base}")
  max_bytes = int(cfg.max_file_bytes)
  stamp = (base, max_bytes,
           tuple((rel, st.st_size, st.st_mtime_ns) for rel, st in files))
  if stamp not in _MEMO:
    _MEMO.clear()  # one interpreter has one stdlib; keep one entry
    _MEMO[stamp] = _read(base, files, max_bytes)
  return _MEMO[stamp]


def _read(base: str, files, max_bytes: int) -> Documents:
  sha = hashlib.sha256()
  keys, texts, too_big, non_utf8, empty = [], [], [], [], []
  total = 0
  for rel, st in files:
    if st.st_size > max_bytes:
      too_big.append(rel)
      continue
    with open(os.path.join(base, rel), "rb") as f:
      data = f.read()
    if not data.strip():
      empty.append(rel)
      continue
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      non_utf8.append(rel)
      continue
    sha.update(rel.encode("utf-8") + b"\0" + data + b"\0")
    keys.append(rel)
    texts.append(text)
    total += len(data)
  info = {"source": "stdlib", "root": base,
          "python_version": platform.python_version(),
          "filter": ".py files, sorted relative paths, no site-packages/"
                    f"dist-packages/__pycache__, <= {max_bytes} bytes, UTF-8",
          "files": len(texts), "bytes": total,
          "skipped_too_big": too_big, "skipped_non_utf8": non_utf8,
          "skipped_empty": len(empty)}
  return Documents("stdlib", keys, texts, sha.hexdigest(), info)
