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

Slices (`data.stdlib.include` / `data.stdlib.exclude`, comma-separated
`fnmatch` patterns on the relative path, '' = no filter): keep the files
matching any `include` pattern (all if empty), then drop those matching any
`exclude` pattern. `TEST_PATTERNS` names the standard library's own test
suites, so `exclude=TEST_PATTERNS` is the library code and
`include=TEST_PATTERNS` its tests: two related but distinct distributions
from the same corpus (the overtraining study fine-tunes on one after
pretraining on the other). A slice's fingerprint is the same sha256 over the
files it keeps; with no filter the documents (and fingerprint) are exactly
the unfiltered corpus's.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import platform
import sysconfig

from llmlab.data.documents import Documents
from llmlab.data.errors import DataError

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_MEMO: dict = {}
_SLICES: dict = {}  # (stamp, include, exclude) -> Documents of that slice

# The stdlib's test suites (`fnmatch`: `*` also matches `/`).
TEST_PATTERNS = "test/*,*/test/*,*/tests/*,*/idle_test/*"


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
    _SLICES.clear()
    _MEMO[stamp] = _read(base, files, max_bytes)
  include = str(cfg.get("include", "") or "")
  exclude = str(cfg.get("exclude", "") or "")
  if not include and not exclude:
    return _MEMO[stamp]
  key = (stamp, include, exclude)
  if key not in _SLICES:
    _SLICES[key] = select(_MEMO[stamp], include, exclude)
  return _SLICES[key]


def _patterns(spec: str) -> list[str]:
  return [p.strip() for p in spec.split(",") if p.strip()]


def select(docs: Documents, include: str, exclude: str) -> Documents:
  """The documents whose relative path matches `include` and not `exclude`
  (comma-separated fnmatch patterns; empty `include` keeps everything)."""
  inc, exc = _patterns(include), _patterns(exclude)
  keep = [i for i, key in enumerate(docs.keys)
          if (not inc or any(fnmatch.fnmatchcase(key, p) for p in inc))
          and not any(fnmatch.fnmatchcase(key, p) for p in exc)]
  if not keep:
    raise DataError(f"data.stdlib.include={include!r}, "
                    f"data.stdlib.exclude={exclude!r}: no file of the "
                    f"{len(docs.keys)} stdlib files is left")
  sha = hashlib.sha256()
  total = 0
  for i in keep:  # the fingerprint of _read, over the kept files only
    data = docs.texts[i].encode("utf-8")
    sha.update(docs.keys[i].encode("utf-8") + b"\0" + data + b"\0")
    total += len(data)
  info = dict(docs.info, include=include, exclude=exclude, files=len(keep),
              bytes=total, files_before_slice=len(docs.keys))
  return Documents(docs.name, [docs.keys[i] for i in keep],
                   [docs.texts[i] for i in keep], sha.hexdigest(), info)


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
