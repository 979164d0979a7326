"""The GPU check of `model.attention` (driver of benchmarks/gpu_check.sh).

Trains a 1B-shaped model (configs/presets.py "1b": d_model 2048, 32 query /
8 kv heads of 64, mlp 8192) with fewer layers, bfloat16 compute and float32
params, at sequence length 4096, for `--steps` steps with each kernel in
`--kernels`, and prints tokens/s and MFU against the device's dense bf16
peak (`llmlab.perf`; H100/H200: 989 TFLOP/s). Batches are packed documents
(segment ids and restarting positions), as in training.

Then it times the attention core alone (fwd+bwd, one layer's shape) through
cuDNN with and without the same-segment mask, which is what isolating
packed documents costs on this path (see `llmlab.attention._cudnn_local`).

Self-contained on purpose: it imports only llmlab.model/attention/perf (jax,
flax, optax, numpy), so it runs on an image that has a GPU jax but not the
rest of llmlab's dependencies (grain, ml_collections, tensorboard).

    python benchmarks/gpu_check.py [--layers=4 --seq=4096 --batch=4
        --steps=20 --kernels=xla,cudnn]
    JAX_PLATFORMS=cpu python benchmarks/gpu_check.py --dry   # tiny, on CPU
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from llmlab import attention  # noqa: E402
from llmlab import model as model_lib  # noqa: E402
from llmlab import perf  # noqa: E402

ONE_B = dict(d_model=2048, num_heads=32, num_kv_heads=8, mlp_dim=8192)
TINY = dict(d_model=128, num_heads=4, num_kv_heads=2, mlp_dim=256)


def packed_batch(rng, batch: int, seq: int, vocab: int, mean_doc: int):
  """Rows of documents with exponential lengths (mean `mean_doc`)."""
  seg = np.zeros((batch, seq), np.int32)
  pos = np.zeros((batch, seq), np.int32)
  for r in range(batch):
    start, doc = 0, 1
    while start < seq:
      n = int(min(seq - start, max(1, rng.exponential(mean_doc))))
      seg[r, start:start + n], pos[r, start:start + n] = doc, np.arange(n)
      start, doc = start + n, doc + 1
  tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
  return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def make_step(model, tx):
  """Next-token loss over targets inside a document; AdamW update."""
  def loss_fn(params, b):
    logits = model.apply({"params": params}, b["tokens"], b["segment_ids"],
                         b["positions"])
    seg = b["segment_ids"]
    mask = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, b["tokens"][:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def step(params, opt_state, b):
    loss, grads = jax.value_and_grad(loss_fn)(params, b)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def run_kernel(kernel: str, base: model_lib.ModelConfig, a, batch) -> dict:
  cfg = dataclasses.replace(base, attention=kernel)
  plat = attention.platform()
  attention.check(cfg, plat, a.seq)  # the same check as steps.build
  model = model_lib.Transformer(cfg)
  params = jax.jit(lambda r: nn.unbox(
      model.init(r, batch["tokens"][:1])["params"]))(jax.random.key(0))
  tx = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = tx.init(params)
  step = make_step(model, tx)
  t = time.perf_counter()
  compiled = step.lower(params, opt_state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  for _ in range(2):  # warm-up
    params, opt_state, loss = compiled(params, opt_state, batch)
  loss.block_until_ready()
  t = time.perf_counter()
  for _ in range(a.steps):
    params, opt_state, loss = compiled(params, opt_state, batch)
  loss = float(loss)  # waits for the last step
  secs = time.perf_counter() - t
  tokens = a.steps * a.batch * a.seq
  flops = model_lib.flops_per_token(cfg, a.seq)["train"] * tokens
  peak, source = perf.peak_flops_per_device(0.0, cfg.product_dtype)
  return dict(kernel=kernel, loss=loss, compile_s=compile_s,
              step_ms=secs / a.steps * 1e3, tokens_s=tokens / secs,
              mfu=flops / secs / peak if peak else float("nan"),
              temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2 ** 30,
              peak_source=source)


def attention_mask_cost(base, a, batch, implementation: str) -> dict:
  """ms per fwd+bwd of one layer's attention core, with and without the
  segment mask (cuDNN: the mask becomes a [B, 1, L, S] bias + its grad)."""
  b, l = a.batch, a.seq
  h, k, e = base.num_heads, base.num_kv_heads, base.head_size
  ks = jax.random.split(jax.random.key(1), 4)
  dt = jnp.dtype(base.product_dtype)
  q = jax.random.normal(ks[0], (b, h, l, e), dt) * e ** -0.5
  kk = jax.random.normal(ks[1], (b, k, l, e), dt)
  v = jax.random.normal(ks[2], (b, k, l, e), dt)
  seg = jnp.asarray(batch["segment_ids"])
  one = jnp.ones_like(seg)  # no packing: the mask keeps only causality
  out = {}
  for name, s in (("segment mask", seg), ("one document", one)):
    def f(q, kk, v, s=s):
      o = attention._cudnn_local(q, kk, v, s, implementation)
      return jnp.sum(o.astype(jnp.float32) ** 2)
    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    jax.block_until_ready(g(q, kk, v))
    t = time.perf_counter()
    for _ in range(a.steps):
      r = g(q, kk, v)
    jax.block_until_ready(r)
    out[name] = (time.perf_counter() - t) / a.steps * 1e3
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--mean_doc", type=int, default=1024,
                 help="mean packed-document length (tokens)")
  p.add_argument("--kernels", default="xla,cudnn")
  p.add_argument("--dry", action="store_true",
                 help="tiny shapes, 2 steps: checks this script on CPU")
  a = p.parse_args()
  shape = ONE_B
  if a.dry:
    a.layers, a.seq, a.batch, a.steps, a.vocab, a.mean_doc = 2, 256, 2, 2, 512, 64
    shape = TINY
  base = model_lib.ModelConfig(vocab_size=a.vocab, num_layers=a.layers,
                               dtype="bfloat16", param_dtype="float32",
                               rope_theta=500_000.0, **shape)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__} on {dev.platform}: {dev.device_kind}; "
        f"{'tiny (--dry)' if a.dry else '1B-shaped'} x {a.layers} layers, "
        f"seq {a.seq}, batch {a.batch}, "
        f"{a.steps} steps, bf16 compute / f32 params", flush=True)
  batch = jax.device_put(packed_batch(np.random.default_rng(0), a.batch,
                                      a.seq, a.vocab, a.mean_doc))
  print(f"{'kernel':7} {'loss':>7} {'compile s':>9} {'step ms':>8} "
        f"{'tokens/s':>10} {'MFU':>6} {'temp GiB':>8}  peak from", flush=True)
  for kernel in a.kernels.split(","):
    try:
      r = run_kernel(kernel, base, a, batch)
    except Exception as e:  # noqa: BLE001 - report and go on to the next
      print(f"{kernel:7} failed: {type(e).__name__}: {str(e)[:400]}",
            flush=True)
      continue
    print(f"{r['kernel']:7} {r['loss']:7.4f} {r['compile_s']:9.1f} "
          f"{r['step_ms']:8.1f} {r['tokens_s']:10.0f} {r['mfu']:6.1%} "
          f"{r['temp_gib']:8.2f}  {r['peak_source']}", flush=True)
  impl = "cudnn" if dev.platform == "gpu" else "xla"
  try:
    ms = attention_mask_cost(base, a, batch, impl)
    print(f"attention core fwd+bwd, one layer ({impl}): " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
  except Exception as e:  # noqa: BLE001
    print(f"attention core ({impl}) failed: {type(e).__name__}: "
          f"{str(e)[:400]}", flush=True)


if __name__ == "__main__":
  main()
