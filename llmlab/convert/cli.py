"""`llmlab convert`: Hugging Face directory <-> llmlab run directory.

    llmlab convert --from_hf=DIR --workdir=OUT [--step=0] [--dtype=float32]
                   [--fsdp=N] [--tensor=N] [--ignore_fields=a,b]
    llmlab convert --to_hf --workdir=RUN --out=DIR [--step=N] [--dtype=...]
                   [--max_shard_gb=5]

Prints one JSON summary line; a bad input exits 1 with the error message.
"""

from __future__ import annotations

import argparse
import sys

from llmlab import cli_common
from llmlab.convert import hf


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="llmlab convert",
      description="Convert Hugging Face Llama-family checkpoints to llmlab "
      "run directories (--from_hf) and back (--to_hf).")
  mode = p.add_mutually_exclusive_group(required=True)
  mode.add_argument("--from_hf", metavar="DIR",
                    help="local HF model directory (config.json + "
                    "*.safetensors) to import")
  mode.add_argument("--to_hf", action="store_true",
                    help="export --workdir's checkpoint to --out")
  p.add_argument("--workdir", required=True,
                 help="run directory to write (--from_hf) or read (--to_hf)")
  p.add_argument("--out", help="HF directory to write (--to_hf)")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step to write (--from_hf, default 0) or "
                 "read (--to_hf, default latest)")
  p.add_argument("--dtype", choices=hf.DTYPES, default=None,
                 help="param dtype (--from_hf default float32; --to_hf "
                 "default the run's model.param_dtype)")
  p.add_argument("--fsdp", type=int, default=1,
                 help="--from_hf: mesh.fsdp to shard the params over")
  p.add_argument("--tensor", type=int, default=1,
                 help="--from_hf: mesh.tensor to shard the params over")
  p.add_argument("--ignore_fields", default="",
                 help="--from_hf: comma-separated HF config fields known not "
                 "to change the model")
  p.add_argument("--max_shard_gb", type=float, default=5.0,
                 help="--to_hf: largest safetensors shard, in GiB")
  return p


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)
  cli_common.setup()
  if args.to_hf and not args.out:
    print("llmlab convert: --to_hf needs --out=DIR", file=sys.stderr)
    return 2
  if args.from_hf and args.out:
    print("llmlab convert: --out is for --to_hf; --from_hf writes --workdir",
          file=sys.stderr)
    return 2
  if args.to_hf:
    return cli_common.print_summary("llmlab convert", lambda: hf.to_hf(
        args.workdir, args.out, step=args.step, dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 2**30)))
  fields = [f for f in args.ignore_fields.split(",") if f]
  return cli_common.print_summary("llmlab convert", lambda: hf.from_hf(
      args.from_hf, args.workdir, step=args.step or 0,
      dtype=args.dtype or "float32", ignore_fields=fields,
      mesh_axes={"fsdp": args.fsdp, "tensor": args.tensor}))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
