"""The `llmlab` command line: one command per job, each a module in
llmlab/commands/ that defines its own flags and calls the libraries.

    llmlab --help                 the commands, one line each
    llmlab CMD --help             CMD's flags
    llmlab CMD [flags] [--debug]

Commands that take a config read it with ml_collections `config_flags`
(`--config=file.py:arg --config.train.steps=...`, as in big_vision). Bad
input ends in one line `llmlab CMD: error: ...` and exit status 2 (a
traceback with `--debug`); llmlab/cli_common.py has the contract.
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module, one-line description). Modules are imported only when
# their command runs, so `llmlab train` never pays for the others' imports.
COMMANDS = {
    "train": ("llmlab.commands.train",
              "train (or resume) a model from a config into a run directory"),
    "eval": ("llmlab.commands.eval",
             "held-out loss and bits per byte of a run's checkpoint"),
    "sample": ("llmlab.commands.sample",
               "continue a prompt with a trained run"),
    "plan": ("llmlab.commands.plan",
             "memory per device of a config's train step, and what fits"),
    "sweep": ("llmlab.commands.sweep",
              "evaluate every checkpoint of runs into a records CSV"),
    "fit": ("llmlab.commands.fit",
            "fit a scaling law to records and predict a target"),
    "backtest": ("llmlab.commands.backtest",
                 "scaling-law backtests of published families: models x "
                 "fraction x min_tokens"),
    "schedule": ("llmlab.commands.schedule",
                 "a learning-rate schedule minimising a fitted curve law"),
    "study": ("llmlab.commands.study",
              "scaling study: train, sweep, fit, predict a held-out run"),
    "overtrain": ("llmlab.commands.overtrain",
                  "study: fine-tunability along one long pretraining run"),
    "repeat-study": ("llmlab.commands.repeat_study",
                     "study: loss under repeated data, its law, a bigger "
                     "model"),
    "distill-study": ("llmlab.commands.distill_study",
                      "study: teacher, then students at equal tokens"),
    "teacher-logits": ("llmlab.commands.teacher_logits",
                       "store a teacher's top-k logits for offline "
                       "distillation"),
    "prune": ("llmlab.commands.prune",
              "a smaller run directory initialised from a trained run"),
    "compress-study": ("llmlab.commands.compress_study",
                       "study: prune then continue vs. train from scratch"),
    "continual": ("llmlab.commands.continual",
                  "study: continual learning after compression, its law, "
                  "replay vs forgetting"),
    "convert": ("llmlab.commands.convert",
                "Hugging Face checkpoint <-> llmlab run directory"),
    "tokenize": ("llmlab.commands.tokenize",
                 "write a config's data as a token store (local or gs://)"),
    "tokenizer": ("llmlab.commands.tokenizer",
                  "tokenizer train: fit a byte-level BPE tokenizer.json"),
}


def usage() -> str:
  width = max(map(len, COMMANDS)) + 2
  lines = ["usage: llmlab COMMAND [flags]   (llmlab COMMAND --help: its "
           "flags)", "", "commands:"]
  lines += [f"  {name:<{width}}{desc}" for name, (_, desc) in COMMANDS.items()]
  lines += ["", "Every command takes --debug: a traceback instead of the "
            "one-line error.", "Exit status: 0 done, 2 bad input, 130 Ctrl-C, 1 "
            "any other failure (and plan: does not fit).", "",
            "e.g. llmlab train --config=configs/tiny.py:smoke "
            "--workdir=/tmp/run --config.train.steps=50"]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  """`llmlab ARGV...` (argv excludes the program) -> exit status."""
  if not argv:
    print(usage(), file=sys.stderr)
    return 2
  cmd = argv[0]
  if cmd in ("-h", "--help", "-help", "help"):
    print(usage())
    return 0
  if cmd not in COMMANDS:
    near = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    print(f"llmlab: error: unknown command {cmd!r}{hint}; llmlab --help "
          "lists them", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[cmd][0])
  return module.main(argv[1:])


def run(argv=None) -> None:
  """The `llmlab` console script (and `python -m llmlab`)."""
  argv = list(sys.argv if argv is None else argv)
  sys.exit(main(argv[1:]))
