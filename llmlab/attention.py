"""Fused attention kernels for accelerators, and the choice between them.

`model.attention` picks the kernel of the training/eval forward pass:

- `xla`: `llmlab.model._attention`, the hand-written VJP tuned for XLA:CPU.
  It materialises float32 [B, K, G, L, S] scores (and keeps the
  probabilities for the backward pass): O(L^2) memory per head.
- `splash`: the Pallas TPU splash-attention kernel (block-sparse flash
  attention): causal mask plus `SegmentIds`, so packed documents stay
  isolated and fully masked blocks are skipped. On CPU it runs in Pallas
  interpret mode, which is for tests only (one warning says so).
- `cudnn`: cuDNN flash attention through
  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
- `auto` (default): splash on TPU, cuDNN on GPU, xla elsewhere, falling back
  to xla (and logging why) when the shape is one the kernel cannot run.

Both fused kernels run inside `jax.shard_map` over the mesh axes that the
logical rules (`mesh.rules`) give `batch` and `heads`: each device runs the
kernel on its own sequences and heads, with no collective. Nothing here names
a mesh axis. The KV-cache decode path (`Attention._cache`) always uses the
xla kernel: a single-token step has no L^2 to save.

Context parallelism (`mesh.context` > 1, the rules' `length` axis): each
device holds a slice of every sequence, and `gathered` runs attention with
the all-gather K/V strategy (MaxText's default): inside `jax.shard_map`,
keys, values, kv segment ids and kv positions are all-gathered over the
context axis, and each device attends its local queries to the whole
sequence. Explicit rather than left to GSPMD, because the propagation is
free to pick another layout for the [L, S] scores (e.g. gathering queries
instead), and because the mask needs each slot's original position. The
backward of the all-gather is a reduce-scatter of dK/dV, which autodiff
derives. Keys and values are O(L) per device, so this costs one gather of
K/V per layer (cheap next to the L^2 compute when K/V heads are few, as in
GQA). Ring attention (overlapping the gather with compute) is not built.

Causal load balancing (`context_order`): with a contiguous split, the last
device's queries see the whole sequence and the first's almost nothing. The
model therefore reorders every sequence into 2*context chunks, device i
holding chunks i and 2*context-1-i (MaxText's layout), so every device does
the same causal work. Tokens, segment ids and positions are reordered
together after the batch arrives (RoPE reads positions, so it is
unchanged), attention masks by the original positions, and the final hidden
states are put back in order before the logits, so losses see the usual
layout. The xla and splash kernels run under context parallelism (splash:
`_splash_context`); cuDNN does not.

`check` validates the choice before anything compiles (called by
`llmlab.steps.build`).
"""

from __future__ import annotations

import functools
import logging
import math

import flax.linen as nn
import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmlab.config import ConfigError

log = logging.getLogger("llmlab")

NAMES = ("auto", "xla", "splash", "cudnn")
_PREFERRED = {"tpu": "splash", "gpu": "cudnn"}
_LANES = 128  # splash tiles: sequence blocks are multiples of a TPU vreg row
_DEFAULT_BLOCK = 512  # MaxText's splash default; the largest that divides L
_WARNED: set = set()  # one interpret-mode warning per process


def _error(msg: str):
  return ConfigError(msg)


# ----------------------------------------------------------------------------
# Choosing a kernel
# ----------------------------------------------------------------------------


def platform() -> str:
  """The platform being compiled for: the current mesh's devices (so a TPU
  topology compiled on a CPU host counts as TPU), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  name = device.platform if device is not None else jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def problems(kernel: str, cfg, plat: str, seq_len: int,
             context: int = 1) -> list[str]:
  """Why `kernel` cannot run model config `cfg` at `seq_len` on `plat`
  with `context` sequence shards ([] = it can). `cfg` is a ModelConfig or
  the `model` ConfigDict."""
  if kernel == "xla":
    return []
  if context > 1 and kernel != "splash":
    return [f"{kernel} does not run with mesh.context={context} (context "
            "parallelism runs splash or xla)"]
  head = cfg.head_dim or cfg.d_model // cfg.num_heads
  dtype = cfg.matmul_dtype or cfg.dtype
  if kernel == "splash":
    chunk = seq_len // (2 * context) if context > 1 else seq_len
    out = _splash_problems(cfg, plat, chunk, dtype)
    if context > 1:  # the checks ran on one load-balanced chunk: say so
      out = [f"{w} (with mesh.context={context}: of each of the "
             f"{2 * context} chunks of {seq_len // (2 * context)} positions)"
             for w in out]
    return out
  return _cudnn_problems(plat, seq_len, head, dtype)


def _splash_problems(cfg, plat, seq_len, dtype) -> list[str]:
  out = []
  if plat not in ("tpu", "cpu"):
    out.append(f"splash is a TPU kernel (CPU: interpret mode, for tests); "
               f"this is {plat}")
  # `seq_len`: one load-balanced chunk under context parallelism, whose
  # query tiles must not straddle chunks (else no block is ever skipped).
  if seq_len % _LANES:
    out.append(f"the sequence length {seq_len} must be a multiple of {_LANES}")
  for key in ("attention_block_q", "attention_block_kv"):
    b = int(getattr(cfg, key, 0))
    if b < 0 or b % _LANES or (b and seq_len % b):
      out.append(f"model.{key}={b} must be 0 (default) or a multiple of "
                 f"{_LANES} dividing the sequence length {seq_len}")
  if dtype not in ("float32", "bfloat16"):
    out.append(f"operand dtype {dtype} (model.dtype/matmul_dtype) must be "
               "float32 or bfloat16")
  return out


def _cudnn_problems(plat, seq_len, head, dtype) -> list[str]:
  """cuDNN flash attention's limits (jax/_src/cudnn/fused_attention_stablehlo
  `check_is_flash_attention`): fp16/bf16, head size a multiple of 8 up to 256
  on Hopper (128 before), even lengths when a bias (our segment mask) is
  trained through."""
  out = []
  if plat != "gpu":
    out.append(f"cudnn needs a GPU backend; this is {plat}")
  if dtype not in ("bfloat16", "float16"):
    out.append(f"cuDNN takes bfloat16/float16 operands, not {dtype} (set "
               "model.dtype or model.matmul_dtype to bfloat16)")
  limit = 256 if plat != "gpu" or _hopper_or_later() else 128
  if head % 8 or head > limit:
    out.append(f"head size {head} must be a multiple of 8 and <= {limit}")
  if seq_len % 2:
    out.append(f"the sequence length {seq_len} must be even")
  return out


def _hopper_or_later() -> bool:
  """True where the GPU is unknown (checked again when cuDNN compiles)."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return True
  cap = getattr(gpus[0], "compute_capability", "9.0")
  return tuple(int(x) for x in str(cap).split(".")) >= (9, 0)


def resolve(cfg, plat: str, seq_len: int,
            context: int = 1) -> tuple[str, str]:
  """(kernel, why) for `cfg.attention` on `plat`: `auto` becomes the
  platform's fused kernel, or xla when that kernel cannot run the shape."""
  name = getattr(cfg, "attention", "auto")
  if name != "auto":
    return name, "set by model.attention"
  kernel = _PREFERRED.get(plat)
  if kernel is None:
    return "xla", f"no fused kernel on {plat}"
  why = problems(kernel, cfg, plat, seq_len, context)
  if why:
    return "xla", f"{kernel} cannot run this shape: {'; '.join(why)}"
  return kernel, f"the fused kernel for {plat}"


def check(model_cfg, plat: str, seq_len: int, context: int = 1) -> str:
  """Validate `model.attention` for `plat` before anything compiles; return
  the kernel that will run. Raises ConfigError naming the key, the value and
  what is supported; logs `auto`'s pick; warns once for interpret mode."""
  plat = "gpu" if plat in ("cuda", "rocm") else plat
  kernel, why = _choose(model_cfg, plat, seq_len, context)
  if getattr(model_cfg, "attention", "auto") == "auto":
    log.info("model.attention=auto: using %s on %s (%s)", kernel, plat, why)
  return kernel


def kernel_for(cfg, seq_len: int) -> str:
  """The kernel of a forward pass being traced (same rules as `check`)."""
  return _choose(cfg, platform(), seq_len, context_size(seq_len))[0]


def _choose(cfg, plat: str, seq_len: int,
            context: int = 1) -> tuple[str, str]:
  name = getattr(cfg, "attention", "auto")  # configs saved before the key
  if name not in NAMES:
    raise _error(f"config.model.attention={name!r}: must be one of "
                 f"{', '.join(NAMES)}")
  kernel, why = resolve(cfg, plat, seq_len, context)
  bad = problems(kernel, cfg, plat, seq_len, context)
  if bad:
    raise _error(f"config.model.attention={name!r}: {'; '.join(bad)}. "
                 f"Supported: {_supported()}")
  if kernel == "splash" and plat == "cpu":
    _warn_interpret()
  return kernel, why


def _supported() -> str:
  return ("xla anywhere; splash on TPU (CPU: interpret mode, tests only), "
          "sequence length a multiple of 128, float32/bfloat16; cudnn on "
          "NVIDIA GPUs, bfloat16/float16, head size a multiple of 8 up to "
          "256 (128 before Hopper), even sequence length")


def _warn_interpret() -> None:
  if "splash" not in _WARNED:
    _WARNED.add("splash")
    log.warning("model.attention=splash on CPU runs the Pallas kernel in "
                "interpret mode: for testing only, many times slower than "
                "model.attention=xla")


# ----------------------------------------------------------------------------
# Running one
# ----------------------------------------------------------------------------


def attend(kernel: str, q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, segment_ids_BxL,
           cfg, order_L=None):
  """Causal, segment-isolated GQA attention with a fused kernel.

  q is already scaled by head_size**-0.5. Operands are cast to the product
  dtype (`model.matmul_dtype`, default `model.dtype`), as in the xla path;
  the result has that dtype. Runs per device inside `jax.shard_map`.
  `order_L`: the load-balanced slot order under context parallelism.
  """
  mm = jnp.dtype(cfg.matmul_dtype or cfg.dtype)
  if order_L is not None:
    if kernel != "splash":
      raise ValueError(f"attend: {kernel} has no context-parallel form")
    return _splash_context(q_BxHxLxE.astype(mm), k_BxKxLxE.astype(mm),
                           v_BxKxLxE.astype(mm),
                           segment_ids_BxL.astype(jnp.int32), order_L, cfg)
  if kernel == "splash":
    blocks = _block_sizes(cfg, q_BxHxLxE.shape[2])
    local = functools.partial(_splash_local, blocks=blocks,
                              interpret=platform() == "cpu")
  elif kernel == "cudnn":
    local = _cudnn_local
  else:
    raise ValueError(f"attend: no fused kernel {kernel!r}")
  args = (q_BxHxLxE.astype(mm), k_BxKxLxE.astype(mm), v_BxKxLxE.astype(mm),
          segment_ids_BxL.astype(jnp.int32))
  return _per_device(local, *args)


def _per_device(local, q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL):
  """`local` on each device's sequences and heads (shard_map over the mesh
  axes of the logical names `batch` and `heads`; others replicated)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL)
  b, h = q_BxHxLxE.shape[:2]
  batch = _axes("batch", b, mesh)
  heads = _axes("heads", math.gcd(h, k_BxKxLxE.shape[1]), mesh)
  qkv = P(batch, heads, None, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch)),
                       out_specs=qkv, check_vma=False)(
                           q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL)


def _axes(logical: str, size: int, mesh):
  """Mesh axes the rules give `logical`, if they divide `size` (else None:
  replicated, as `sharding.fit_sharding` does for stored arrays). Query and
  kv heads share one split (the gcd), so each device keeps whole groups."""
  spec = nn.logical_to_mesh_axes((logical,))[0]
  if spec is None:
    return None
  names = tuple(a for a in (spec if isinstance(spec, tuple) else (spec,))
                if a in mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in names)
  if not names or size % n:
    return None
  return names if len(names) > 1 else names[0]


# ----------------------------------------------------------------------------
# Context parallelism
# ----------------------------------------------------------------------------


def context_size(seq_len: int) -> int:
  """Sequence shards of the current mesh: the size of the mesh axes the
  rules give `length`, when 2x that divides `seq_len` (else 1: no context
  parallelism, the layout `config.validate` already refuses for training)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = _axes("length", seq_len, mesh)
  if axes is None:
    return 1
  n = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple)
                                        else (axes,)))
  return n if seq_len % (2 * n) == 0 else 1


def context_order(seq_len: int) -> np.ndarray | None:
  """Original position held by each slot of the load-balanced sequence
  (None without context parallelism): the sequence cut into 2n chunks,
  shard i holding chunks i and 2n-1-i, so causal work is equal per shard."""
  n = context_size(seq_len)
  if n == 1:
    return None
  chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * n, -1)
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]])
                         for i in range(n)])


def gathered(local, q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL, order_L):
  """All-gather K/V attention across sequence shards.

  `local(q, k, v, seg_q, seg_kv, order_q, order_kv)` runs on one device:
  its query slice [b, h, l/c, e] against the whole sequence's keys and
  values [b, k, l, e]; `order_*` are the slots' original positions (the
  causal mask), `seg_*` their segment ids. Batch and heads are split as in
  `_per_device`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  b, h, l = q_BxHxLxE.shape[:3]
  batch = _axes("batch", b, mesh)
  heads = _axes("heads", math.gcd(h, k_BxKxLxE.shape[1]), mesh)
  ctx = _axes("length", l, mesh)
  qkv = P(batch, heads, ctx, None)

  def per_device(q, k, v, seg, order):
    gather = lambda x, axis: jax.lax.all_gather(x, ctx, axis=axis, tiled=True)
    return local(q, gather(k, 2), gather(v, 2), seg, gather(seg, 1), order,
                 gather(order, 0))
  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(qkv, qkv, qkv, P(batch, ctx), P(ctx)),
                       out_specs=qkv, check_vma=False)(
                           q_BxHxLxE, k_BxKxLxE, v_BxKxLxE,
                           seg_BxL.astype(jnp.int32), order_L)


def _splash_context(q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL, order_L, cfg):
  """Splash under context parallelism, all-gather K/V as in `gathered`.

  The gathered keys/values are put back in position order (a local
  permutation), so the kernel's mask is a plain causal mask over key
  positions whose query rows are the slots' positions (`q_sequence` =
  `order_L`, MaxText's load-balanced causal mask). One kernel covers the
  whole [L, L] mask with `q_seq_shards` = context; it is a pytree, and
  `manual_sharding_spec` hands each device the block tables and
  `q_sequence` of its own query rows, so fully masked blocks are still
  skipped per device.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  mesh = jax.sharding.get_abstract_mesh()
  b, h, l, _ = q_BxHxLxE.shape
  batch = _axes("batch", b, mesh)
  heads = _axes("heads", math.gcd(h, k_BxKxLxE.shape[1]), mesh)
  ctx = _axes("length", l, mesh)
  size = lambda a: math.prod(mesh.shape[x] for x in (
      () if a is None else a if isinstance(a, tuple) else (a,)))
  c = size(ctx)
  mask = sa.CausalMask((l, l))
  mask.q_sequence = np.asarray(order_L, np.int32)
  kern = sa.make_splash_mha(
      sa.MultiHeadMask([mask] * (h // size(heads))),
      block_sizes=_block_sizes(cfg, l // (2 * c)), head_shards=1,
      q_seq_shards=c, interpret=platform() == "cpu")
  kspec = kern.manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, P(None, ctx)))
  inv_L = np.argsort(order_L)  # position -> slot
  qkv = P(batch, heads, ctx, None)

  def per_device(kern, q, k, v, seg):
    gather = lambda x, axis: jax.lax.all_gather(x, ctx, axis=axis, tiled=True)
    k, v = gather(k, 2)[:, :, inv_L], gather(v, 2)[:, :, inv_L]
    seg_kv = gather(seg, 1)[:, inv_L]
    one = lambda q, k, v, sq, skv: kern(
        q, k, v, segment_ids=sa.SegmentIds(q=sq, kv=skv))
    return jax.vmap(one)(q, k, v, seg, seg_kv)
  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(kspec, qkv, qkv, qkv, P(batch, ctx)),
                       out_specs=qkv, check_vma=False)(
                           kern, q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL)


def _block_sizes(cfg, seq_len: int):
  """Splash tiles: `model.attention_block_q/kv`, 0 = the largest of
  512/256/128 that divides the sequence (512 is MaxText's default; bigger
  tiles amortise the per-block overhead, and every preset's 2048 divides)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  default = next(b for b in (_DEFAULT_BLOCK, 256, _LANES) if seq_len % b == 0)
  bq = cfg.attention_block_q or default
  bkv = cfg.attention_block_kv or default
  return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                       block_q_dkv=bq, block_kv_dkv=bkv,
                       block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def splash_kernel(num_heads: int, seq_len: int, blocks, interpret: bool):
  """One device's splash kernel: causal mask for each of its query heads.
  Built per trace (its block tables become that trace's constants; the host
  work behind them is cached by jax's `_process_mask`)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len))] * num_heads)
  return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def _splash_local(q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL, *, blocks,
                  interpret):
  """The kernel takes one sequence ([H, L, E] queries, [K, L, E] keys and
  values, query head h reading kv head h // (H/K)): vmap over the batch."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  _, h, l, _ = q_BxHxLxE.shape
  kern = splash_kernel(h, l, blocks, interpret)
  one = lambda q, k, v, s: kern(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))
  return jax.vmap(one)(q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL)


def _cudnn_local(q_BxHxLxE, k_BxKxLxE, v_BxKxLxE, seg_BxL,
                 implementation: str = "cudnn"):
  """cuDNN flash attention, causal, GQA native. Documents are isolated by a
  boolean same-segment mask: jax turns it into a [B, 1, L, S] additive bias
  in the operand dtype (2*L^2 bytes per sequence: 32 MiB at L=4096 in bf16),
  which the kernel reads in the forward and backward passes, and the
  backward also writes its gradient (jax always asks cuDNN for dbias). The
  L^2 scores themselves are never materialised. `implementation="xla"`
  runs the same call through XLA (how the tests check this wrapper on CPU)."""
  t = lambda x: jnp.swapaxes(x, 1, 2)  # heads-major <-> cuDNN's BTNH
  same_Bx1xLxS = (seg_BxL[:, None, :, None] == seg_BxL[:, None, None, :])
  o_BxLxHxE = jax.nn.dot_product_attention(
      t(q_BxHxLxE), t(k_BxKxLxE), t(v_BxKxLxE), mask=same_Bx1xLxS, scale=1.0,
      is_causal=True, implementation=implementation)
  return t(o_BxLxHxE)
