"""The token store's figures (issue 18): tokenize throughput, memory of a
reading process against corpus size, and `train_iter` throughput from local
disk and through a GCS server.

    python benchmarks/token_store.py [--gb=0.25] [--workers=2] [--gcs_mb=256]
    python benchmarks/token_store.py --gb=2     # the issue's >= 2 GB figure

1. Generates a corpus of `--gb` GB (jsonl files of Zipf-distributed words),
   trains a byte-level BPE tokenizer on a sample, and runs the store writer
   with `--workers` processes: MB of text per second of wall time, and per
   CPU-second of the workers (the honest per-core figure on a shared
   machine).
2. Peak RSS (VmHWM) of a fresh process that builds the training data
   from a store and reads `--rss_batches` batches: the big store vs a
   10 MB one, with the default 64 MB tensorstore cache (which a big store
   fills and a 10 MB one cannot) and with `--cache_mb`. Flat means memory
   does not grow with the corpus.
3. `train_iter` tokens/s per host (one process, batch `--batch` x
   `--seq_len`) from the big store on local disk and from a `--gcs_mb` MB
   store on a local fake-gcs-server (tests/gcs.py), against the goal of
   1.5M tokens/s per host (10x what one v5p host consumes training the 1B
   preset at 50% MFU), with a `--cache_mb` tensorstore cache so chunks are
   fetched rather than reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmlab.data import token_store  # noqa: E402

GOAL_TOKENS_PER_S = 1.5e6
FILE_MB = 16


def _word_pool(mb: int, seed: int = 0) -> bytes:
  """`mb` MB of lowercase words, Zipf-distributed over 50k pseudo-words."""
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
  lengths = rng.integers(2, 11, 50_000)
  words = [letters[np.minimum(rng.geometric(0.25, n) - 1, 25)].tobytes()
           for n in lengths]
  ranks = np.minimum(rng.zipf(1.2, mb * 2**20 // 5), len(words)) - 1
  return b" ".join(words[r] for r in ranks)[:mb * 2**20]


def generate(out: str, gb: float, pool: bytes, seed: int = 1) -> float:
  """jsonl files of documents (1-8 KB slices of the pool); returns MB."""
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  total, target, i = 0, int(gb * 2**30), 0
  while total < target:
    lines, size = [], 0
    while size < min(FILE_MB * 2**20, target - total):
      n = int(rng.integers(1024, 8192))
      at = int(rng.integers(0, len(pool) - n))
      line = b'{"text": "' + pool[at:at + n] + b'"}\n'
      lines.append(line)
      size += len(line)
    with open(os.path.join(out, f"part-{i:05d}.jsonl"), "wb") as f:
      f.write(b"".join(lines))
    total, i = total + size, i + 1
  return total / 2**20


def _data_cfg(paths: str, tokenizer: str):
  from llmlab import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.data_defaults()
  cfg.source, cfg.files.paths, cfg.tokenizer = "files", paths, tokenizer
  cfg.val_fraction = 0.01
  return cfg


def tokenize(corpus_dir: str, tokenizer: str, out: str, workers: int):
  """Writes the store; (summary, worker CPU seconds)."""
  before = _cpu_seconds()
  summary = token_store.write_store(
      _data_cfg(f"{corpus_dir}/*.jsonl", tokenizer), out, workers=workers)
  return summary, _cpu_seconds() - before


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children (the workers; a
  single unit runs in this process)."""
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    use = resource.getrusage(who)
    total += use.ru_utime + use.ru_stime
  return total


def _peak_rss_mb() -> float:
  """This process image's peak RSS (VmHWM). ru_maxrss would do, but Linux
  carries it across fork+exec, so a child started by a big parent reports
  the parent's peak."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args) -> None:
  """--child=STORE: build the data, read batches, print RSS and speed."""
  from llmlab import data  # pylint: disable=g-import-not-at-top
  cfg = _data_cfg("", args.tokenizer)
  cfg.source, cfg.tokens.path = "tokens", args.child
  cfg.prefetch, cfg.num_threads = args.prefetch, args.threads
  d = data.build(cfg, seq_len=args.seq_len, global_batch=args.batch, seed=0)
  it = d.train_iter(0)
  for _ in range(args.warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  print(json.dumps({
      "store": args.child, "tokens_per_s": round(
          args.batches * batch["tokens"].size / seconds),
      "batches": args.batches, "batch": args.batch, "seq_len": args.seq_len,
      "max_rss_mb": round(_peak_rss_mb(), 1),
      "ru_maxrss_mb": round(resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def read_in_child(store: str, args, batches: int, env=None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={store}",
         f"--tokenizer={args.tokenizer}", f"--batch={args.batch}",
         f"--seq_len={args.seq_len}", f"--batches={batches}",
         f"--warmup={args.warmup}", f"--prefetch={args.prefetch}",
         f"--threads={args.threads}"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def _corpus_and_tokenizer(work: str, args):
  from llmlab.data import tokenizer_cli  # pylint: disable=g-import-not-at-top
  pool = _word_pool(64)
  tok = os.path.join(work, "tokenizer.json")
  if not os.path.exists(tok):
    sample = [pool[i:i + 4096].decode() for i in range(0, 4 << 20, 4096)]
    tokenizer_cli.train(sample, args.vocab).save(tok)
  sizes = {}
  for seed, (name, gb) in enumerate((("big", args.gb),
                                     ("small", 10 / 1024),
                                     ("gcs", args.gcs_mb / 1024))):
    path = os.path.join(work, f"corpus-{name}")
    if not os.path.isdir(path):
      generate(path, gb, pool, seed=seed)
    sizes[name] = sum(os.path.getsize(os.path.join(path, f))
                      for f in os.listdir(path)) / 2**20
  return tok, sizes


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gb", type=float, default=0.25)
  p.add_argument("--gcs_mb", type=float, default=256)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--rss_batches", type=int, default=100)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--prefetch", type=int, default=4)
  p.add_argument("--threads", type=int, default=2,
                 help="data.num_threads of the readers (the default config)")
  p.add_argument("--gcs_threads", type=int, default=8,
                 help="also read from GCS with this many grain threads")
  p.add_argument("--cache_mb", type=float, default=4,
                 help="tensorstore cache of the throughput readers: small, "
                 "so chunks are fetched, not reused (shard indexes fit)")
  p.add_argument("--workdir", default="")
  p.add_argument("--keep", action="store_true")
  p.add_argument("--skip_gcs", action="store_true")
  p.add_argument("--child", default="")
  p.add_argument("--tokenizer", default="")
  args = p.parse_args()
  if args.child:
    return _child(args)
  work = args.workdir or tempfile.mkdtemp(prefix="token-store-bench-")
  os.makedirs(work, exist_ok=True)
  try:
    _run(work, args)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


def _run(work: str, args) -> None:
  t0 = time.perf_counter()
  args.tokenizer, sizes = _corpus_and_tokenizer(work, args)
  print(json.dumps({"generated_mb": {k: round(v, 1) for k, v in
                                     sizes.items()},
                    "seconds": round(time.perf_counter() - t0, 1)}),
        flush=True)
  stores = {}
  for name in ("big", "small"):
    stores[name] = os.path.join(work, f"store-{name}")
    summary, cpu = tokenize(os.path.join(work, f"corpus-{name}"),
                            args.tokenizer, stores[name], args.workers)
    mb = summary["text_bytes"] / 2**20
    print(json.dumps({
        "tokenize": name, "text_mb": round(mb, 1),
        "tokens": summary["tokens_train"] + summary["tokens_val"],
        "workers": args.workers, "wall_s": summary["seconds"],
        "mb_per_s": round(mb / summary["seconds"], 2),
        "mb_per_s_per_worker": round(mb / summary["seconds"] / args.workers,
                                     2),
        "worker_cpu_s": round(cpu, 1),
        "mb_per_cpu_s": round(mb / cpu, 2) if cpu else None}), flush=True)
  for cache in ("64", str(args.cache_mb)):  # the default cache, then small
    env = {"LLMLAB_TOKEN_STORE_CACHE_MB": cache}
    rss = {name: read_in_child(stores[name], args, args.rss_batches, env)
           for name in ("big", "small")}
    print(json.dumps({
        "peak_rss_mb": {k: v["max_rss_mb"] for k, v in rss.items()},
        "cache_mb": float(cache),
        "ru_maxrss_mb (inherited from this parent)": {
            k: v["ru_maxrss_mb"] for k, v in rss.items()},
        "store_tokens": {k: _tokens(stores[k]) for k in stores},
        "batches_read": args.rss_batches}), flush=True)
  cold = {"LLMLAB_TOKEN_STORE_CACHE_MB": str(args.cache_mb)}
  local = read_in_child(stores["big"], args, args.batches, env=cold)
  print(json.dumps({"train_iter": "local disk", **_speed(local),
                    "cache_mb": args.cache_mb}), flush=True)
  if not args.skip_gcs:
    for row in _gcs(work, args):
      print(json.dumps({"train_iter": "gcs server", **row}), flush=True)
  print(json.dumps({"total_s": round(time.perf_counter() - t0, 1)}))


def _tokens(store: str) -> int:
  m = json.load(open(os.path.join(store, "manifest.json")))
  return m["tokens_train"] + m["tokens_val"]


def _speed(result: dict) -> dict:
  return {"tokens_per_s_per_host": result["tokens_per_s"],
          "goal": GOAL_TOKENS_PER_S,
          "of_goal": round(result["tokens_per_s"] / GOAL_TOKENS_PER_S, 3),
          "batch": result["batch"], "seq_len": result["seq_len"],
          "batches": result["batches"]}


def _gcs(work: str, args) -> dict:
  from tests import gcs as gcs_lib  # pylint: disable=g-import-not-at-top
  server = gcs_lib.Server(os.path.join(work, "gcs-root"))
  server.start()
  try:
    uri = server.bucket("bench") + "/store"
    summary, _ = tokenize(os.path.join(work, "corpus-gcs"), args.tokenizer,
                          uri, args.workers)
    env = dict(server.env(), LLMLAB_TOKEN_STORE_CACHE_MB=str(args.cache_mb))
    out = []
    for threads in sorted({args.threads, args.gcs_threads}):
      got = read_in_child(uri, argparse.Namespace(**{**vars(args),
                                                     "threads": threads}),
                          args.batches, env=env)
      out.append({**_speed(got), "data.num_threads": threads,
                  "cache_mb": args.cache_mb,
                  "store_tokens": summary["tokens_train"] +
                  summary["tokens_val"],
                  "tokenize_to_gcs_s": summary["seconds"]})
    return out
  finally:
    server.stop()


if __name__ == "__main__":
  main()
