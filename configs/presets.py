"""Llama-shaped presets for real hardware, each sized for the slice it names.

    llmlab train --config=configs/presets.py:7b_v5p128 --workdir=gs://BUCKET/run
    llmlab plan --config=configs/presets.py:7b_v5p128 --target=v5p-128

Variants: 125m_v5e8, 1b_v5p32, 1b_v5p32_s8192, 7b_v5p128, 7b_v5p128_s8192,
7b_v5p128_s32768, 7b_v5p128_s131072 (context parallelism: mesh.context=4,
each sequence split over 4 chips; the same 2M tokens per step as s8192)
(TPU slices: `TARGETS` names each one's slice) and 1b_gpu8, 7b_gpu8 (8-GPU
nodes). bfloat16 compute, float32 params. JAX sees one device per TPU chip:
a v5p-N or v4-N slice (N counts TensorCores, two per chip) has N/2
devices, a v5e-N or v6e-N slice N. `llmlab plan --target=SLICE` compiles a
preset with the TPU compiler on any machine (`pip install "llmlab[tpu]"`);
its figures for these presets are in benchmarks/plan_presets.py. The
vocabulary is the tokenizer's (data.tokenizer); plan with
`--vocab_size=N` for yours (the benchmark uses 32000, and 128256 to show
`model.logits_chunk`). The _s8192 variants keep the tokens per step in one
microbatch, which splash attention (`model.attention=auto` on TPU) makes
fit; with `--config.model.attention=xla` add
`--config.train.microbatches=4` (1B) or `2` (7B).
"""

from llmlab.config import base

MODELS = {
    "125m": dict(num_layers=12, d_model=768, num_heads=12, num_kv_heads=12,
                 mlp_dim=2048),
    "1b": dict(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8,
               mlp_dim=8192),
    "7b": dict(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
               mlp_dim=14336),
}
# variant -> (model, mesh (data, fsdp, context, tensor), global batch,
# seq_len, remat, microbatches). Meshes fill their slice's devices
# (TARGETS). Microbatches from `llmlab plan --target` (vocabulary 32000; README has the table): on
# TPU `model.attention=auto` is splash, and with it every preset runs its
# step in one piece at seq 8192 (7b_v5p128_s8192: 27.7 GiB per device,
# 1b_v5p32_s8192: 21.5 GiB). With XLA's attention (materialised scores)
# they need microbatches: 1b_v5p32_s8192 needs 134 GiB of temporaries in
# one step, four quarters 37.5 GiB (--config.train.microbatches=4);
# 7b_v5p128_s8192 in one step does not compile (XLA's attention-score
# fusion f32[4, 8, 4, 8192, 8192] runs out of scoped VMEM), two halves need
# 46.1 GiB. 1b_v5p32 keeps 2 microbatches: with XLA's attention one
# 512-sequence step needs 124 GiB (remat dots), two halves 63 GiB (40 GiB
# with splash). 7b_gpu8 accumulates 2 microbatches: `llmlab plan
# --device=h100` puts one 128-sequence step at 80.6 GiB per device (over an
# H100's 80 GiB), two halves at 44.9 GiB. The _s32768/_s131072 variants
# split each sequence over 4 chips (mesh.context=4, fsdp 16; splash): 29.7
# GiB per device each, est. MFU 53.9% / 46.9%; without context, seq 131072
# needs a 64-row batch (one per fsdp rank) and 102.7 GiB per device.
VARIANTS = {
    "125m_v5e8": ("125m", (8, 1, 1, 1), 64, 2048, "full", 1),
    "1b_v5p32": ("1b", (1, 16, 1, 1), 512, 2048, "dots", 2),
    "1b_v5p32_s8192": ("1b", (1, 16, 1, 1), 128, 8192, "full", 1),
    "7b_v5p128": ("7b", (1, 64, 1, 1), 1024, 2048, "full", 1),
    "7b_v5p128_s8192": ("7b", (1, 64, 1, 1), 256, 8192, "full", 1),
    "7b_v5p128_s32768": ("7b", (1, 16, 4, 1), 64, 32768, "full", 1),
    "7b_v5p128_s131072": ("7b", (1, 16, 4, 1), 16, 131072, "full", 1),
    "1b_gpu8": ("1b", (1, 8, 1, 1), 256, 2048, "dots", 1),
    "7b_gpu8": ("7b", (1, 4, 1, 2), 128, 2048, "full", 2),
}
# The Cloud TPU slice each TPU variant is sized for (`llmlab plan --target`).
TARGETS = {
    "125m_v5e8": "v5e-8",
    "1b_v5p32": "v5p-32",
    "1b_v5p32_s8192": "v5p-32",
    "7b_v5p128": "v5p-128",
    "7b_v5p128_s8192": "v5p-128",
    "7b_v5p128_s32768": "v5p-128",
    "7b_v5p128_s131072": "v5p-128",
}


def get_config(arg: str = "125m_v5e8"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/presets.py: unknown variant {arg!r}; "
                     f"known: {sorted(VARIANTS)}")
  model, (data, fsdp, context, tensor), batch, seq, remat, micro = VARIANTS[
      arg]
  c = base()
  c.name = arg
  c.model.update(MODELS[model], dtype="bfloat16", param_dtype="float32",
                 remat=remat, rope_theta=500_000.0)
  c.mesh.update(data=data, fsdp=fsdp, context=context, tensor=tensor)
  c.train.update(steps=100_000, batch_size=batch, microbatches=micro,
                 seq_len=seq,
                 learning_rate=3e-4, log_every=50, eval_every=2000)
  c.optim.update(warmup_steps=2000, schedule="wsd", decay_fraction=0.2)
  c.checkpoint.update(every_steps=1000, sweep_points=8)
  return c
