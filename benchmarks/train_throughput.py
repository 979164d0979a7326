"""Training throughput of the reference shape: tokens/s, MFU, matmul peak.

Reference shape (issue "llmlab core"): d_model 384, 6 layers, 6 heads,
mlp 1536, seq 256, global batch 8, byte vocabulary, float32, 1 device.
`--baseline` also runs `../shared/bench/torch_gpt_baseline.py --compile`
(the PyTorch reference; needs torch) right after, and prints the ratio: only
ratios measured back to back mean anything on a noisy machine. By default it
runs PyTorch at the same product precision as llmlab: float32 ("highest") for
float32 products, and for `--matmul_dtype=bfloat16` PyTorch's own bf16 path
for float32 matmuls (`torch.set_float32_matmul_precision("medium")`, oneDNN
on CPUs with bf16 units). `--torch_precision` overrides that.

    python benchmarks/train_throughput.py [--steps=30] [--matmul_dtype=bfloat16]
        [--baseline [--torch_precision=highest|medium]] [--remat=none]
        [--unroll=1] [--both] [--rounds=3]

`--both` measures float32 and bf16-operand products in one run (each against
PyTorch at its matched precision with `--baseline`). `--rounds=N` repeats
the llmlab and PyTorch measurements N times, interleaved (llmlab, torch,
llmlab, torch, ...), and reports the median of the per-round ratios: on a
machine shared with other jobs the load drifts within minutes, and only
measurements taken side by side compare.

`import llmlab` has glibc keep the memory XLA:CPU frees each step
(llmlab/runtime.py, `keep_freed_memory`); `LLMLAB_MALLOC=default` in the
environment measures llmlab without it. The PyTorch reference runs with
glibc's defaults, as a PyTorch user runs it; `--torch_malloc=keep` gives it
the same settings (GLIBC_TUNABLES), to see whether they help it too.

`--matmul_dtype=bfloat16` rounds the operands of every product to bf16 and
sums in float32 (`model.matmul_dtype`; what TPUs do with float32 matmuls by
default); MFU is then measured against a bf16 matmul probe.
"""

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llmlab import config as config_lib  # noqa: E402
from llmlab import perf  # noqa: E402
from llmlab import runtime  # noqa: E402
from llmlab import sharding as shd  # noqa: E402
from llmlab import steps as steps_lib  # noqa: E402
from llmlab import train as train_lib  # noqa: E402


def reference_config(remat="none", unroll=0, matmul_dtype="", dtype="float32"):
  c = config_lib.base()
  c.model.update(num_layers=6, d_model=384, num_heads=6, num_kv_heads=6,
                 mlp_dim=1536, remat=remat, scan_unroll=unroll,
                 matmul_dtype=matmul_dtype, dtype=dtype)
  c.train.update(steps=1000, batch_size=8, seq_len=256)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--remat", default="none")
  p.add_argument("--unroll", type=int, default=0, help="layers per scan iteration (0 = auto)")
  p.add_argument("--data", action="store_true",
                 help="feed real batches from the default corpus pipeline")
  p.add_argument("--matmul_dtype", default="",
                 help='"" = float32 products; "bfloat16" = bf16 operands, f32 sums')
  p.add_argument("--both", action="store_true",
                 help="measure float32 and bfloat16 products (ignores --matmul_dtype)")
  p.add_argument("--dtype", default="float32",
                 help="compute dtype of activations (params stay float32)")
  p.add_argument("--baseline", action="store_true",
                 help="then run the PyTorch reference and print the ratio")
  p.add_argument("--torch_precision", default="",
                 help='torch float32 matmul precision; "" = match llmlab')
  p.add_argument("--torch_malloc", default="default", choices=("default", "keep"),
                 help="keep: the PyTorch reference with llmlab's glibc malloc settings")
  p.add_argument("--rounds", type=int, default=1,
                 help="interleaved llmlab/torch measurements; ratio = median")
  a = p.parse_args()
  products = ["", "bfloat16"] if a.both else [a.matmul_dtype]
  runs = [_Run(a, mm) for mm in products]
  torch_tps = {run: [] for run in runs}
  for _ in range(a.rounds):
    for run in runs:
      run.measure(a.steps)
      if a.baseline:
        torch_tps[run].append(_torch_baseline(run.torch_precision, a.torch_malloc))
  for run in runs:
    run.report()
    if a.baseline:
      t = np.array(torch_tps[run])
      mine = np.array([run.b * run.l / np.median(r) for r in run.rounds])
      print(f"torch.compile  {np.median(t):,.0f} tokens/s (fp32 params, "
            f'float32_matmul_precision="{run.torch_precision}"'
            + f", glibc malloc {a.torch_malloc}"
            + (f"; rounds {', '.join(f'{v:,.0f}' for v in t)})" if a.rounds > 1
               else ")"))
      ratios = mine / t
      print(f"ratio          {np.median(ratios):.2f}x"
            + (f" (median of {a.rounds} rounds: "
               f"{', '.join(f'{r:.2f}' for r in ratios)})" if a.rounds > 1
               else ""))


class _Run:
  """One llmlab configuration of the reference shape, compiled and warm;
  `measure` appends one round of per-step times."""

  def __init__(self, a, matmul_dtype):
    cfg = reference_config(a.remat, a.unroll, matmul_dtype, a.dtype)
    self.cfg = cfg
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    setup = steps_lib.build(cfg, 259, mesh)
    self.state = steps_lib.init_state(setup, 0)
    self.step = steps_lib.make_train_step(setup)
    self.mm = setup.model_cfg.product_dtype
    self.torch_precision = a.torch_precision or (
        "highest" if self.mm == "float32" else "medium")
    self.b, self.l = b, l = cfg.train.batch_size, cfg.train.seq_len
    if a.data:
      from llmlab import data as data_lib
      data = data_lib.build(cfg.data, seq_len=l, global_batch=b, seed=0)
      it = data.train_iter(0)
      self.next_batch = lambda: shd.global_batch(next(it),
                                                 setup.batch_sharding)
    else:
      rng = np.random.default_rng(0)
      fixed = shd.global_batch({
          "tokens": rng.integers(0, 256, (b, l)).astype(np.int32),
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.broadcast_to(np.arange(l), (b, l)).astype(np.int32),
          "bytes": np.ones((b, l), np.int32)}, setup.batch_sharding)
      self.next_batch = lambda: fixed
    for _ in range(a.warmup):
      self.state, m = self.step(self.state, self.next_batch())
    jax.block_until_ready(m)
    self.rounds = []

  def measure(self, steps):
    times = []
    for _ in range(steps):  # per-step times: the median shrugs off noise
      t = time.perf_counter()
      self.state, m = self.step(self.state, self.next_batch())
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    self.rounds.append(times)

  def report(self):
    times = [t for r in self.rounds for t in r]
    dt = float(np.median(times))
    info = train_lib.model_info(self.cfg, 259)
    peak = perf.matmul_probe(dtype=self.mm)
    tps = self.b * self.l / dt
    achieved = info["flops_per_token"] * tps
    print(f"== products: {self.mm}")
    print(f"reference shape: N(non-embedding)={info['params_nonembed']:,} "
          f"FLOPs/token={info['flops_per_token']:.4g}")
    print(f"step time      {dt * 1e3:.1f} ms (median of {len(times)}; "
          f"min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"tokens/s       {tps:,.0f}")
    print(f"model FLOP/s   {achieved / 1e9:.1f} GFLOP/s")
    print(f"{self.mm} matmul peak (measured, f32 sums) {peak / 1e9:.1f} GFLOP/s")
    print(f"MFU            {100 * achieved / peak:.1f}%")


def _torch_baseline(precision: str, malloc: str = "default") -> float:
  """tokens/s of the PyTorch reference trainer, run in a fresh process with
  `torch.set_float32_matmul_precision(precision)`; malloc="keep": with the
  glibc settings `import llmlab` makes (runtime.keep_freed_memory), set
  the only way a process that does not import llmlab can take them."""
  here = os.path.dirname(os.path.abspath(__file__))
  script = os.path.join(here, "..", "..", "shared", "bench",
                        "torch_gpt_baseline.py")
  if not os.path.exists(script):
    raise SystemExit(f"--baseline: {script} not found (expects ../shared)")
  run = ("import runpy, sys, torch; "
         f"torch.set_float32_matmul_precision({precision!r}); "
         f"sys.argv = [{script!r}, '--compile']; "
         f"runpy.run_path({script!r}, run_name='__main__')")
  env = dict(os.environ)
  if malloc == "keep":
    env["GLIBC_TUNABLES"] = runtime.glibc_tunables()
  out = subprocess.run([sys.executable, "-c", run], check=True, env=env,
                       capture_output=True, text=True).stdout
  match = re.search(r"tokens_per_s=(\d+)", out)
  if not match:
    raise SystemExit(f"--baseline: no tokens_per_s in its output:\n{out}")
  return float(match.group(1))


if __name__ == "__main__":
  main()
