"""Seeds derived from labelled values, shared by every data pipeline (the
in-memory sources and the token store shuffle rows with the same seeds)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
  """A 32-bit seed (what grain accepts) from any labelled values."""
  text = "/".join(str(p) for p in parts).encode()
  return int.from_bytes(hashlib.sha256(text).digest()[:4], "big")
