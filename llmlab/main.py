"""The `llmlab` command line: one subcommand per job.

    llmlab train --config=configs/tiny.py[:variant] --workdir=DIR [--config.KEY=VALUE ...]
    llmlab eval  --workdir=DIR [--step=N]
    llmlab sweep --workdir=RUN [--workdir=RUN2 ...] --out=records.csv
    llmlab fit   --records=records.csv --out=DIR [...]
    llmlab study --config=configs/study_quick.py[:smoke] --workdir=DIR
    llmlab tokenizer train --source=... --out=tokenizer.json

Config-taking commands use absl flags with ml_collections `config_flags`, so
`--config=file.py:arg` variants and `--config.train.steps=...` overrides work
exactly as in big_vision. Multi-process jobs pass `--coordinator`,
`--num_processes`, `--process_id` (or set LLMLAB_* env vars; on Cloud TPU
and under SLURM nothing is needed).
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_common():
  config_flags.DEFINE_config_file("config", None, "Config file (.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory.")
  flags.DEFINE_string("coordinator", None, "jax.distributed host:port.")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_enum("quantize", None, ["int8"],
                    "eval: weight-only quantization to evaluate.")


def _setup_runtime():
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from llmlab import cli_common
  cli_common.setup_compile_cache()
  from llmlab import distributed
  distributed.initialize(FLAGS.coordinator, FLAGS.num_processes,
                         FLAGS.process_id)


def _require(name: str):
  if getattr(FLAGS, name) is None:
    raise app.UsageError(f"--{name} is required")


def _train(argv):
  del argv
  _require("config")
  _require("workdir")
  _setup_runtime()
  from llmlab import train
  summary = train.train(FLAGS.config, FLAGS.workdir)
  if train.is_primary():
    print(json.dumps({k: summary[k] for k in (
        "step", "loss", "eval_loss", "eval_bpb", "tokens_per_s", "mfu",
        "params_nonembed", "wall_s")}, default=str))


def _eval(argv):
  del argv
  _require("workdir")
  _setup_runtime()
  from llmlab import evaluate
  print(json.dumps(evaluate.evaluate_run(FLAGS.workdir, FLAGS.step,
                                         quantize=FLAGS.quantize), indent=2))


def _study(argv):
  del argv
  _require("config")
  _require("workdir")
  _setup_runtime()
  from llmlab.scaling import study
  result = study.run_study(FLAGS.config, FLAGS.workdir)
  keys = ("are", "naive_are", "skill", "wall_time_s")
  print(json.dumps({k: result.get(k) for k in keys}, default=str))


def _absl(fn):
  def run(argv):
    _define_common()
    app.run(fn, argv=argv)
    return 0
  return run


def _module(path: str):
  """A subcommand whose module owns its argparse `main(argv)`; imported
  lazily so `llmlab train` never pays for the others' imports. Every one
  gets the persistent compilation cache (sweep's eval steps, plan's AOT
  compiles and sample's decode steps are the same programs run to run)."""
  def run(argv):
    import importlib
    from llmlab import cli_common
    cli_common.setup_compile_cache()
    return importlib.import_module(path).main(argv[1:])
  return run


def _tokenizer(argv):
  if len(argv) < 2 or argv[1] != "train":
    print("usage: llmlab tokenizer train --source=... --out=tokenizer.json",
          file=sys.stderr)
    return 2
  from llmlab.data import tokenizer_cli
  return tokenizer_cli.main(argv[2:])


COMMANDS = {
    "train": _absl(_train),
    "eval": _absl(_eval),
    "study": _absl(_study),
    "sweep": _module("llmlab.scaling.sweep"),
    "fit": _module("llmlab.scaling.fit_cli"),
    "convert": _module("llmlab.convert.cli"),
    "sample": _module("llmlab.commands.sample"),
    "teacher-logits": _module("llmlab.commands.teacher_logits"),
    "distill-study": _module("llmlab.studies.distill"),
    "prune": _module("llmlab.compress.cli"),
    "compress-study": _module("llmlab.compress.experiment"),
    "plan": _module("llmlab.plan"),
    "overtrain": _module("llmlab.studies.overtrain"),
    "tokenizer": _tokenizer,
}


def run(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print("usage: llmlab {" + ",".join(COMMANDS) + "} [flags]\n"
          "  e.g. llmlab train --config=configs/tiny.py --workdir=/tmp/run",
          file=sys.stderr)
    sys.exit(2)
  cmd = argv[1]
  sys.exit(COMMANDS[cmd]([f"llmlab {cmd}"] + argv[2:]) or 0)
