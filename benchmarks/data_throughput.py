"""Tokens per second the data pipeline delivers through `train_iter`.

Default corpus (stdlib) and byte tokenizer at batch 8 x seq 256, the
reference training shape. The training step of that shape consumes about
1,500 tokens/s on a 2-core CPU (`--train_tokens_per_s` to override); the
pipeline should deliver at least 10x that so it never stalls training.

    python benchmarks/data_throughput.py [--steps=2000]
"""

from __future__ import annotations

import argparse
import json
import time

from llmlab import data


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument("--train_tokens_per_s", type=float, default=1500.0)
  args = p.parse_args()

  start = time.perf_counter()
  d = data.build(data.default_config(), seq_len=args.seq_len,
                 global_batch=args.batch, seed=0)
  build_s = time.perf_counter() - start

  it = d.train_iter(0)
  for _ in range(args.warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(args.steps):
    batch = next(it)
  elapsed = time.perf_counter() - start
  tokens_per_s = args.steps * batch["tokens"].size / elapsed
  print(json.dumps({
      "build_s": round(build_s, 3),
      "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
      "tokens_per_s": round(tokens_per_s),
      "batches_per_s": round(args.steps / elapsed, 1),
      "train_tokens_per_s": args.train_tokens_per_s,
      "ratio": round(tokens_per_s / args.train_tokens_per_s, 1),
  }))


if __name__ == "__main__":
  main()
