"""Documents of one source and their train/validation split.

A source yields texts with stable keys (relative path, path#line, ...). The
split is by a hash of the key, so it does not depend on the training seed,
the order files were listed in, or which other documents exist: adding files
never moves an old document between train and validation.
"""

from __future__ import annotations

import dataclasses
import hashlib

from llmlab.data.errors import DataError


@dataclasses.dataclass
class Documents:
  name: str            # source name: stdlib | synthetic | files
  keys: list[str]      # one stable key per document
  texts: list[str]
  fingerprint: str     # sha256 over what the texts were made from
  info: dict           # JSON-able facts about the source (bytes, skips, ...)


def is_validation(key: str, val_fraction: float) -> bool:
  """Deterministic held-out choice: the key's sha256 as a uniform number."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def split(docs: Documents, val_fraction: float):
  """(train texts, validation texts); both must be non-empty."""
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f"data.val_fraction={val_fraction!r} must be in (0, 1)")
  train, val = [], []
  for key, text in zip(docs.keys, docs.texts):
    (val if is_validation(key, val_fraction) else train).append(text)
  where = f"source {docs.name!r} ({len(docs.texts)} documents)"
  if not val:
    raise DataError(f"{where}: validation split is empty with "
                    f"data.val_fraction={val_fraction}; raise it or add data")
  if not train:
    raise DataError(f"{where}: training split is empty with "
                    f"data.val_fraction={val_fraction}")
  return train, val
