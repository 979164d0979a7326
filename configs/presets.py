"""Llama-shaped presets for real hardware (validated abstractly in tests).

    llmlab train --config=configs/presets.py:125m_v5e8 --workdir=gs://BUCKET/run
Variants: 125m_v5e8, 1b_v5p32, 7b_v5p128, 1b_gpu8, 7b_gpu8 (model + mesh for
TPU v5e/v5p slices and 8-GPU nodes). bfloat16 compute, float32 params.
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
# variant -> (model, devices, mesh (data, fsdp, tensor), global batch, remat,
# microbatches). 7b_gpu8 accumulates 2 microbatches: `llmlab plan --device=h100`
# puts one 128-sequence step at 80.6 GiB per device (over an H100's 80 GiB),
# two halves at 44.9 GiB.
VARIANTS = {
    "125m_v5e8": ("125m", 8, (8, 1, 1), 64, "full", 1),
    "1b_v5p32": ("1b", 32, (1, 32, 1), 512, "dots", 1),
    "7b_v5p128": ("7b", 128, (1, 64, 2), 1024, "full", 1),
    "1b_gpu8": ("1b", 8, (1, 8, 1), 256, "dots", 1),
    "7b_gpu8": ("7b", 8, (1, 4, 2), 128, "full", 2),
}


def get_config(arg: str = "125m_v5e8"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/presets.py: unknown variant {arg!r}; "
                     f"known: {sorted(VARIANTS)}")
  model, _, (data, fsdp, tensor), batch, remat, micro = VARIANTS[arg]
  c = base()
  c.name = arg
  c.model.update(MODELS[model], dtype="bfloat16", param_dtype="float32",
                 remat=remat, rope_theta=500_000.0)
  c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  c.train.update(steps=100_000, batch_size=batch, microbatches=micro,
                 seq_len=2048,
                 learning_rate=3e-4, log_every=50, eval_every=2000)
  c.optim.update(warmup_steps=2000, schedule="wsd", decay_fraction=0.2)
  c.checkpoint.update(every_steps=1000, sweep_points=8)
  return c
