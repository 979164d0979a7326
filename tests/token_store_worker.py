"""Subprocess body: one process of a multi-process run (launch/local.py)
training from a token store; writes the rows this process read.

Usage: python tests/token_store_worker.py JSON_SPEC
  spec: {"store": URI, "steps": N, "workdir": DIR, "out": DIR}
Writes OUT/reads-{process_index}.json: {"rows": [[source, split, row]...],
"tokens": n, "summary": {...}}.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmlab import distributed  # noqa: E402

distributed.initialize()  # from LLMLAB_* set by launch/local.py

import jax  # noqa: E402

from llmlab import train  # noqa: E402
from tests.test_token_store import _train_cfg, counted_reads  # noqa: E402


def main():
  spec = json.loads(sys.argv[1])
  cfg = _train_cfg(spec["store"], steps=spec["steps"])
  with counted_reads() as reads:
    summary = train.train(cfg, spec["workdir"])
  out = dict(reads, summary={"step": summary["step"], "loss": summary["loss"]})
  path = os.path.join(spec["out"], f"reads-{jax.process_index()}.json")
  with open(path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
