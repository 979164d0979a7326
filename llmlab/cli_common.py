"""The one way llmlab's commands read a command line and end.

Every `llmlab CMD` (a module in llmlab/commands/) defines its flags in its
own `absl.flags.FlagValues`, so `llmlab CMD --help` lists that command's
flags and no one else's; a command that takes a config gets it through
ml_collections `config_flags` (`--config=file.py:arg --config.key=value`).
`run` then parses, sets up logging and the compilation cache, calls the
command and applies one exit contract:

  - success: the command's summary as one JSON line on stdout (if it
    returns a dict; commands that print a table print it themselves), exit 0;
  - bad input, i.e. an `llmlab.errors.UserError` (a bad flag or config
    key, a config file that does not exist, ConfigError, DataError,
    WorkdirError, a missing run directory, a corrupt checkpoint, ...) or
    absl's flags.Error: one line `llmlab CMD: error: ...` on stderr, exit 2,
    no traceback unless `--debug`;
  - storage that failed during the run (`storage.StorageError`, a failed
    checkpoint save): one line naming the path, exit 1;
  - storage that stopped answering (`storage.StorageTimeout`: a request
    past its deadline): one line naming the object, exit 75
    (`watchdog.EXIT_HANG`, restartable: the launchers run the job again);
    a hung run ended by llmlab/watchdog.py exits 75 too;
  - a study preempted by SIGTERM (`llmlab.experiment.Preempted`): its
    message on stderr, exit 0 (re-running the command resumes);
  - Ctrl-C (KeyboardInterrupt): one line on stderr, exit 130. A training
    run takes the first Ctrl-C as a preemption (finishes the step, saves
    it, prints the resume command); a second one aborts at once;
  - anything else is a bug (in llmlab or a library it calls; a plain
    ValueError from numpy or jax too): one line on stderr saying so, then
    the exception propagates, so the process exits 1 with its traceback.

Libraries never import this module (they raise; the command line decides
how that ends).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import textwrap
from typing import Any, Callable

from absl import flags
from ml_collections import config_flags

from llmlab import errors
from llmlab import experiment
from llmlab import storage
from llmlab import watchdog
from llmlab.runtime import set_verbose, setup_compile_cache, setup_logging

HELP_ARGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")
DEBUG_HELP = ("On bad input, raise with the full traceback (default: one "
              "line).")
VERBOSE_HELP = ("Also show each run's progress and INFO lines inside studies "
                "(default: the study's own progress, and warnings).")
PREEMPTED = ("preempted (SIGTERM); the current run saved its checkpoint. "
             "Re-run the same command to resume.")
INTERRUPTED = ("interrupted (Ctrl-C): aborted; steps after the last "
               "checkpoint are lost. Re-run the same command to resume.")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


UsageError = errors.UsageError  # a command line that cannot work


@dataclasses.dataclass(frozen=True)
class Config:
  """How a command takes its config file (an ml_collections config flag).

  `default`: the file used when the command line names none (the studies
  ship a quick config); `lock`: whether the loaded ConfigDict is locked
  (train/study/teacher-logits, as before; the studies assign keys)."""
  name: str = "config"
  default: str | None = None
  required: bool = True
  lock: bool = False
  help: str = "Config file, FILE.py[:ARG] (its get_config(ARG))."
  example: str = "train.steps=500"  # an override, for --help


def setup(absl_level: int = logging.WARNING) -> None:
  """What every command sets up before work: logging, compilation cache."""
  setup_logging(absl_level)
  setup_compile_cache()


# ------------------------------------------------------------------- runner


Define = Callable[[flags.FlagValues], None]  # defines a command's flags
Body = Callable[[flags.FlagValues], Any]  # the command's work


def run(name: str, argv: list[str], define: Define, body: Body, *,
        doc: str = "", config: Config | None = None,
        required: tuple[str, ...] = (),
        absl_level: int = logging.WARNING) -> int:
  """`llmlab NAME ARGV...`: parse, set up, call `body(flags)`, end by the
  contract in the module doc; returns the exit status. `body` returns a
  summary dict (printed as one JSON line), an exit status, or None."""
  prog = f"llmlab {name}"
  argv = [prog, *_with_default_config(list(argv), config)]
  fv = _flag_values(argv, define, config)
  if any(a in HELP_ARGS for a in argv[1:]):
    print(help_text(prog, doc, fv, config, required))
    return 0
  return guarded(prog, _wants_debug(argv), lambda: _parse_and_call(
      fv, argv, body, config, required, absl_level))


def guarded(prog: str, debug: bool, call: Callable[[], Any]) -> int:
  """Runs `call()` under the exit contract (module doc)."""
  try:
    return finish(call())
  except experiment.Preempted as e:
    print(f"{prog}: {str(e) or PREEMPTED}", file=sys.stderr)
    return 0
  except KeyboardInterrupt as e:
    print(f"{prog}: {str(e) or INTERRUPTED}", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    if debug:
      raise
    if is_bad_input(e):
      print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
      return 2
    if is_storage_failure(e):
      print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
      if is_storage_stall(e):
        exit_now(watchdog.EXIT_HANG)
      return 1
    print(f"{prog}: internal error ({type(e).__name__}): this is a bug, not "
          f"a problem with your input; please report it with the traceback "
          f"below.", file=sys.stderr, flush=True)
    raise


def is_storage_stall(e: BaseException) -> bool:
  """A storage failure because the storage stopped answering (also a
  checkpoint save that failed while it did): transient, exit 75."""
  storage = sys.modules.get("llmlab.storage")
  return bool(storage and (isinstance(e, storage.StorageTimeout) or
                           storage.stalled()))


def exit_now(status: int) -> None:
  """Flush and end the process now. After a storage stall other threads
  (grain's prefetch threads, mid-read on the same storage) are still
  waiting for it, and a normal exit joins them: each would wait out its
  own deadline first."""
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(status)  # pylint: disable=protected-access


def finish(result: Any) -> int:
  """A body's result -> exit status (a dict is the summary: one JSON line)."""
  if isinstance(result, dict):
    print(storage.dumps(result))  # NaN -> null (storage.json_safe)
    return 0
  return int(result or 0)


def _parse_and_call(fv, argv, body, config, required, absl_level):
  _check_config_file(argv, config)
  _parse(fv, argv, config)
  missing = [n for n in (*_config_required(config), *required)
             if fv[n].value is None]
  if missing:
    raise UsageError("missing " + ", ".join(f"--{n}" for n in missing))
  setup(absl_level)
  set_verbose(fv.verbose)
  return body(fv)


def _flag_values(argv, define, config) -> flags.FlagValues:
  """The command's own flags (plus --debug and its config flag)."""
  fv = flags.FlagValues()
  flags.DEFINE_bool("debug", False, DEBUG_HELP, flag_values=fv)
  flags.DEFINE_bool("verbose", False, VERBOSE_HELP, flag_values=fv)
  if config:
    # sys_argv: the config flag finds its --config.KEY overrides in this
    # command line, not in sys.argv (in-process callers, tests).
    config_flags.DEFINE_config_file(config.name, None, config.help,
                                    flag_values=fv, lock_config=config.lock,
                                    sys_argv=argv)
  define(fv)
  return fv


def _wants_debug(argv) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=1") for a in argv)


def _config_required(config: Config | None) -> tuple[str, ...]:
  return (config.name,) if config and config.required else ()


# ------------------------------------------------------------ config flag


def _config_value(argv, name: str) -> str | None:
  """The value of `--NAME=V` / `--NAME V` in argv (the last one), or None."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      value = a.split("=", 1)[1]
    elif a == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _with_default_config(argv, config) -> list[str]:
  """argv with `--config=DEFAULT` in front when it names no config file, so
  `--config.KEY=VALUE` overrides apply to the default file too."""
  if config is None or config.default is None:
    return argv
  if _config_value(argv, config.name) is not None:
    return argv
  return [f"--{config.name}={config.default}", *argv]


def _check_config_file(argv, config) -> None:
  """A config file that does not exist, or overrides without a config file,
  are bad input (ml_collections would fail later, at first use, or call the
  overrides unknown flags)."""
  if config is None:
    return
  spec = _config_value(argv, config.name)
  if spec is None:
    keys = [a.split("=")[0] for a in argv if a.startswith(f"--{config.name}.")]
    if keys:
      raise UsageError(f"{keys[0]} needs --{config.name}=FILE.py[:ARG]")
    return
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise errors.NotFound(f"--{config.name}={spec}: no file {path}")


def _parse(fv, argv, config) -> None:
  """fv(argv), with a misspelt config key and a config file whose
  get_config raised turned into one-line usage errors; a stray positional
  argument is one too (absl would silently ignore it)."""
  try:
    rest = fv(argv)[1:]
  except (KeyError, AttributeError) as e:
    if config is None:
      raise
    raise UsageError(_key_error(e, argv, config.name)) from e
  except flags.IllegalFlagValueError as e:
    raise UsageError(_flag_value_error(str(e))) from e
  if rest:
    raise UsageError(f"unexpected argument {rest[0]!r}")


def _key_error(e: Exception, argv, name: str) -> str:
  """ml_collections' `KeyError("'trian'\\nDid you mean "train"...")` ->
  `--config.trian.steps=5: no key 'trian' in the config (did you mean
  'train'?)`."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  # A leaf key's AttributeError carries the KeyError's repr: match, not split.
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  key = hint.group(2) if hint else text.strip("'\"\\ ")
  arg = next((a for a in argv if a.startswith(f"--{name}.") and
              key in a.split("=", 1)[0].split(".")), f"--{name}")
  msg = f"{arg}: no key {key!r} in the config"
  return msg + (f" (did you mean {hint.group(1)!r}?)" if hint else "")


def _flag_value_error(text: str) -> str:
  """absl's `flag --NAME=VALUE: why`, without "flag "; for a config file
  whose get_config raised, `why` is the whole traceback: keep its last
  line (the exception's own)."""
  text = text.removeprefix("flag ")
  if "Error whilst parsing config file" not in text:
    return text
  last = [l for l in text.splitlines() if l.strip()][-1]
  return f"{text.split(': ', 1)[0]}: {last}"


def load_config(spec: str, *overrides: str, name: str = "config"):
  """`FILE.py[:arg]` plus `--config.key=value` overrides -> the config,
  read exactly as a command's config flag reads it (for tests and
  notebooks)."""
  argv = ["load_config", f"--{name}={spec}", *overrides]
  config = Config(name=name)
  fv = _flag_values(argv, lambda fv: None, config)
  _check_config_file(argv, config)
  _parse(fv, argv, config)
  return fv[name].value


# -------------------------------------------------------------- bad input


def is_bad_input(e: BaseException) -> bool:
  """Whether `e` is the user's input being wrong (one line, exit 2) rather
  than a failure of the program or the machine (traceback)."""
  return isinstance(e, (errors.UserError, flags.Error))


def is_storage_failure(e: BaseException) -> bool:
  """A write the storage refused (a bucket gone, a full disk) after the run
  started: not the input's fault (exit 1), but its message names the path
  and what is intact, so it is one line too."""
  storage = sys.modules.get("llmlab.storage")
  ckpt = sys.modules.get("llmlab.checkpoints")
  return bool((storage and isinstance(e, storage.StorageError)) or
              (ckpt and isinstance(e, ckpt.CheckpointSaveError)))


def one_line(e: BaseException) -> str:
  """The exception's message on one line (KeyError's without its quotes)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(l.strip() for l in str(text).splitlines() if l.strip())


# ------------------------------------------------------------------- help


def help_text(prog: str, doc: str, fv: flags.FlagValues,
              config: Config | None, required=()) -> str:
  """The command's doc, then its flags (definition order, --debug last)."""
  names = [n for n in dict.fromkeys(fv) if n != "debug"] + ["debug"]
  required = set(required) | set(_config_required(config))
  lines = [textwrap.dedent(doc).strip() or f"usage: {prog} [flags]", "",
           "flags:"]
  for n in names:
    lines += _flag_help(fv[n], n in required)
    if config and n == config.name:
      lines += _wrap(f"--{n}.KEY=VALUE", f"Override any key of the config, "
                     f"e.g. --{n}.{config.example} (repeatable).")
  return "\n".join(lines)


def _flag_help(flag, required: bool) -> list[str]:
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}=VALUE"
  text = flag.help or ""
  if isinstance(flag, flags.MultiFlag):
    text += " Repeatable."
  if required:
    text += " Required."
  elif flag.default not in (None, "", [], False):
    text += f" (default: {flag.default_as_str})"
  return _wrap(name, text)


def _wrap(name: str, text: str) -> list[str]:
  return ["  " + name] + textwrap.wrap(text, 76, initial_indent="      ",
                                       subsequent_indent="      ")


# ------------------------------------------------------------ distributed


def define_distributed(fv: flags.FlagValues) -> None:
  """--coordinator --num_processes --process_id (train, eval, study)."""
  flags.DEFINE_string("coordinator", None, "jax.distributed host:port.",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes.",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index.",
                       flag_values=fv)


def init_distributed(fv: flags.FlagValues) -> None:
  """Joins the job the flags (or LLMLAB_* env vars, Cloud TPU, SLURM)
  describe; a no-op for one process."""
  from llmlab import distributed  # noqa: PLC0415 (imports jax)
  distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
