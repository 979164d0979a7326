"""usage: llmlab convert --from_hf=DIR --workdir=OUT [--step=0]
                      [--dtype=float32] [--fsdp=N] [--tensor=N]
                      [--ignore_fields=a,b]
       llmlab convert --to_hf --workdir=RUN --out=DIR [--step=N] [--dtype=...]
                      [--max_shard_gb=5]

Converts Hugging Face Llama-family checkpoints to llmlab run directories
(--from_hf) and back (--to_hf). Prints one JSON summary line.
"""

from __future__ import annotations

from absl import flags

from llmlab import cli_common
from llmlab.convert import hf


def define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("from_hf", None, "HF model directory (local or gs://) "
                      "(config.json + *.safetensors) to import.",
                      flag_values=fv)
  flags.DEFINE_bool("to_hf", False, "Export --workdir's checkpoint to --out.",
                    flag_values=fv)
  flags.DEFINE_string("workdir", None, "Run directory to write (--from_hf) "
                      "or read (--to_hf).", flag_values=fv)
  flags.DEFINE_string("out", None, "HF directory to write (--to_hf).",
                      flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step to write (--from_hf, "
                       "default 0) or read (--to_hf, default latest).",
                       flag_values=fv)
  flags.DEFINE_enum("dtype", None, hf.DTYPES, "Param dtype (--from_hf "
                    "default float32; --to_hf default the run's "
                    "model.param_dtype).", flag_values=fv)
  flags.DEFINE_integer("fsdp", 1, "--from_hf: mesh.fsdp to shard the params "
                       "over.", flag_values=fv)
  flags.DEFINE_integer("tensor", 1, "--from_hf: mesh.tensor to shard the "
                       "params over.", flag_values=fv)
  flags.DEFINE_string("ignore_fields", "", "--from_hf: comma-separated HF "
                      "config fields known not to change the model.",
                      flag_values=fv)
  flags.DEFINE_float("max_shard_gb", 5.0, "--to_hf: largest safetensors "
                     "shard, in GiB.", flag_values=fv)


def _check(fv: flags.FlagValues) -> None:
  """Exactly one direction, with the flags that direction needs."""
  if bool(fv.from_hf) == fv.to_hf:
    raise cli_common.UsageError("give one of --from_hf=DIR and --to_hf")
  if fv.to_hf and not fv.out:
    raise cli_common.UsageError("--to_hf needs --out=DIR")
  if fv.from_hf and fv.out:
    raise cli_common.UsageError("--out is for --to_hf; --from_hf writes "
                                "--workdir")


def body(fv: flags.FlagValues) -> dict:
  _check(fv)
  if fv.to_hf:
    return hf.to_hf(fv.workdir, fv.out, step=fv.step, dtype=fv.dtype,
                    max_shard_bytes=int(fv.max_shard_gb * 2**30))
  fields = [f for f in fv.ignore_fields.split(",") if f]
  return hf.from_hf(fv.from_hf, fv.workdir, step=fv.step or 0,
                    dtype=fv.dtype or "float32", ignore_fields=fields,
                    mesh_axes={"fsdp": fv.fsdp, "tensor": fv.tensor})


def main(argv: list[str]) -> int:
  """`llmlab convert` (argv excludes the program and the command)."""
  return cli_common.run("convert", argv, define, body, doc=__doc__,
                        required=("workdir",))
