"""GEMM speed of the reference step's products: XLA vs numpy vs PyTorch.

The training step of the reference shape (d_model 384, mlp 1536, 8 x 256
tokens) is ~80% matrix products, so its speed on CPU is bounded by the GEMM
kernels the compiler calls. This prints GFLOP/s for each product shape of one
layer (forward, input-gradient and weight-gradient products) through XLA
(float32; bf16 operands with float32 sums, what `model.matmul_dtype=bfloat16`
runs), numpy's BLAS, and PyTorch (if installed; float32 "highest" and
"medium" precision). Compare the columns to see how much of a gap to a
PyTorch trainer is the kernels rather than the framework.

    python benchmarks/matmul_shapes.py [--repeats=20]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

# (M, K, N, lhs transposed) of a[M, K] @ b[K, N] in one layer of the
# reference step; weight gradients contract over tokens, x^T @ dy.
SHAPES = {
    "q/k/v/o fwd, x-grad  2048x384x384": (2048, 384, 384, False),
    "mlp up fwd           2048x384x1536": (2048, 384, 1536, False),
    "mlp down fwd         2048x1536x384": (2048, 1536, 384, False),
    "mlp up w-grad   (xT) 384x2048x1536": (384, 2048, 1536, True),
    "mlp down w-grad (xT) 1536x2048x384": (1536, 2048, 384, True),
    "attn w-grad     (xT) 384x2048x384": (384, 2048, 384, True),
}


def _median_seconds(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _runners(a, b, lhs_t):
  """name -> zero-arg callable computing op(a) @ b to completion, where
  op transposes `a` (stored [K, M]) when `lhs_t`."""
  op = (lambda x: x.T) if lhs_t else (lambda x: x)
  xa, xb = jnp.asarray(a), jnp.asarray(b)
  f32 = jax.jit(lambda x, y: op(x) @ y)
  bf16 = jax.jit(lambda x, y: jnp.dot(op(x).astype(jnp.bfloat16),
                                      y.astype(jnp.bfloat16),
                                      preferred_element_type=jnp.float32))
  runs = {"xla f32": lambda: f32(xa, xb).block_until_ready(),
          "xla bf16->f32": lambda: bf16(xa, xb).block_until_ready(),
          "numpy f32": lambda: op(a) @ b}
  try:
    import torch  # noqa: PLC0415 (optional reference, never a dependency)
  except ImportError:
    return runs
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)

  def torch_mm(precision):
    def run():
      torch.set_float32_matmul_precision(precision)
      return op(ta) @ tb
    return run
  runs["torch f32"] = torch_mm("highest")
  runs["torch medium"] = torch_mm("medium")
  return runs


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  header = None
  for label, (m, k, n, lhs_t) in SHAPES.items():
    a = rng.standard_normal((k, m) if lhs_t else (m, k), np.float32)
    b = rng.standard_normal((k, n), np.float32)
    runs = _runners(a, b, lhs_t)
    if header is None:
      header = f"{'GFLOP/s':36s}" + "".join(f"{r:>15s}" for r in runs)
      print(header)
    flops = 2 * m * k * n
    cells = "".join(f"{flops / _median_seconds(fn, args.repeats) / 1e9:15.1f}"
                    for fn in runs.values())
    print(f"{label:36s}{cells}")


if __name__ == "__main__":
  main()
