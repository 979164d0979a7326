"""Compress a trained model: structured pruning and int8 quantization.

- `shapes`: which target shapes a source can be pruned to, and the
  parameter count of a (masked, possibly fractional) model.
- `masked`: masks over layers, kv heads, query heads, MLP channels and
  hidden dims, folded into the params; the masked forward pass.
- `importance`: magnitude and activation (calibration-batch) scores.
- `slicing`: pick the units to keep (GQA-aware) and slice the params.
- `hard_concrete`, `learned`: Sheared-LLaMA's targeted structured pruning
  (hard-concrete masks, Lagrangian towards the target shape).
- `prune`: `llmlab prune` end to end, writing a run directory.
- `quantize`: int8 weight-only per-channel quantization.
- `experiment`: the continual-learning scaling experiment.
"""
