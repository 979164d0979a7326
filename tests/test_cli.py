"""The command line's one idiom (llmlab/main.py, llmlab/cli_common.py,
llmlab/commands/): every command answers --help with its own flags, bad
input ends in one line and exit status 2, and `--config.key=value`
overrides reach the config of every config-taking command. All in-process,
with the library call a command makes replaced: nothing trains."""

import os
import re
import runpy
import sys

import pytest

from llmlab import cli_common
from llmlab import errors
from llmlab import experiment
from llmlab import main as llmlab_main

from tests.helpers import ROOT

TINY = f"{ROOT}/configs/tiny.py:smoke"

# command -> flags its --help must list (README's and the tests' flags).
FLAGS = {
    "train": ["config", "workdir", "coordinator", "num_processes",
              "process_id"],
    "eval": ["workdir", "step", "quantize", "coordinator"],
    "sample": ["workdir", "prompt", "max_new_tokens", "temperature", "top_k",
               "top_p", "seed", "step", "num_samples", "quantize"],
    "plan": ["config", "devices", "device", "hbm_gb", "real", "suggest",
             "max_compiles", "vocab_size", "json"],
    "sweep": ["workdir", "out", "eval_tokens"],
    "fit": ["records", "form", "target", "bootstrap", "out"],
    "schedule": ["fit", "steps", "peak_lr", "out", "warmup_steps", "params",
                 "iterations"],
    "study": ["config", "workdir"],
    "overtrain": ["config", "workdir", "pretrain_run"],
    "distill-study": ["config", "workdir"],
    "teacher-logits": ["config", "teacher", "out", "top_k", "chunk_steps",
                       "steps"],
    "prune": ["from", "to_config", "workdir", "method", "calib_rows",
              "mask_steps", "mask_lr", "lambda_lr", "mask_batch_size",
              "learning_rate", "target_warmup", "constrain_size", "seed"],
    "compress-study": ["config", "workdir"],
    "continual": ["config", "workdir"],
    "convert": ["from_hf", "to_hf", "workdir", "out", "step", "dtype", "fsdp",
                "tensor", "ignore_fields", "max_shard_gb"],
    "tokenizer": ["config", "out", "source", "paths", "text_field", "column",
                  "vocab_size", "min_frequency"],
}


class Stop(Exception):
  """Raised by a stand-in library call once it has seen its arguments."""


def _stand_in(monkeypatch, target: str):
  """Replaces `module.attr` with a function that records its arguments and
  raises Stop (not bad input, so it reaches the test)."""
  seen = []

  def record(*args, **kwargs):
    seen.append((args, kwargs))
    raise Stop
  monkeypatch.setattr(target, record)
  return seen


def _one_error_line(err: str, prog: str) -> str:
  """The single `prog: error: ...` line of stderr (and no traceback)."""
  assert "Traceback" not in err, err
  lines = [l for l in err.splitlines() if l.startswith(f"{prog}: error: ")]
  assert len(lines) == 1, err
  return lines[0]


def test_llmlab_help_lists_commands_with_descriptions(capsys):
  assert llmlab_main.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name, (_, desc) in llmlab_main.COMMANDS.items():
    assert re.search(rf"^  {re.escape(name)} +{re.escape(desc)}$", out,
                     re.M), name
  assert llmlab_main.main([]) == 2
  assert "train" in capsys.readouterr().err
  assert llmlab_main.main(["trian"]) == 2
  assert "did you mean 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", sorted(FLAGS))
def test_every_command_help_lists_its_flags(cmd, capsys):
  argv = [cmd, "train", "--help"] if cmd == "tokenizer" else [cmd, "--help"]
  assert llmlab_main.main(argv) == 0
  out = capsys.readouterr().out
  for name in FLAGS[cmd] + ["debug"]:
    assert re.search(rf"--(\[no\])?{name}\b", out), (cmd, name, out)
  assert "--flagfile" not in out and "helpfull" not in out  # absl's pile
  assert out.startswith("usage: llmlab")
  if "config" in FLAGS[cmd]:
    assert "--config.KEY=VALUE" in out


def test_tokenizer_without_subcommand(capsys):
  assert llmlab_main.main(["tokenizer", "--help"]) == 0
  assert "--vocab_size" in capsys.readouterr().out
  assert llmlab_main.main(["tokenizer"]) == 2
  _one_error_line(capsys.readouterr().err, "llmlab tokenizer")


@pytest.mark.parametrize("override, want", [
    ("--config.trian.steps=5", "--config.trian.steps=5: no key 'trian' in "
     "the config (did you mean 'train'?)"),
    ("--config.train.stesp=5", "--config.train.stesp=5: no key 'stesp' in "
     "the config (did you mean 'steps'?)"),
])
def test_misspelt_config_key_is_one_line(override, want, tmp_path, capsys):
  rc = llmlab_main.main(["train", f"--config={TINY}",
                         f"--workdir={tmp_path}/run", override])
  assert rc == 2
  line = _one_error_line(capsys.readouterr().err, "llmlab train")
  assert line == f"llmlab train: error: {want}"
  assert not os.path.exists(tmp_path / "run")


def test_the_console_entry_point(tmp_path, monkeypatch, capsys):
  """`python -m llmlab` (llmlab/__main__.py) end to end, in process: exactly
  one stderr line, exit 2 through SystemExit."""
  monkeypatch.setattr(sys, "argv", [
      "llmlab", "train", f"--config={TINY}", f"--workdir={tmp_path}/run",
      "--config.trian.steps=5"])
  with pytest.raises(SystemExit) as e:
    runpy.run_module("llmlab", run_name="__main__", alter_sys=True)
  out = capsys.readouterr()
  assert e.value.code == 2 and out.out == ""
  assert out.err.splitlines() == [
      "llmlab train: error: --config.trian.steps=5: no key 'trian' in the "
      "config (did you mean 'train'?)"]


def test_debug_shows_the_traceback(tmp_path):
  with pytest.raises(cli_common.UsageError, match="trian"):
    llmlab_main.main(["train", f"--config={TINY}", "--debug",
                      f"--workdir={tmp_path}/run", "--config.trian.steps=5"])


@pytest.mark.parametrize("argv, prog, want", [
    (["train", "--config=/nonexistent.py", "--workdir=W"], "llmlab train",
     "--config=/nonexistent.py: no file /nonexistent.py"),
    (["train", f"--config={ROOT}/configs/tiny.py:bogus", "--workdir=W"],
     "llmlab train", "unknown variant 'bogus'"),
    (["train", f"--config={TINY}"], "llmlab train", "missing --workdir"),
    (["train", "--workdir=W", "--config.train.steps=3"], "llmlab train",
     "--config.train.steps needs --config"),
    (["train", f"--config={TINY}", "--workdri=W"], "llmlab train",
     "Did you mean: workdir"),
    (["eval", "--workdir=W", "stray"], "llmlab eval",
     "unexpected argument 'stray'"),
    (["teacher-logits"], "llmlab teacher-logits",
     "missing --config, --teacher, --out"),
    (["convert", "--workdir=W"], "llmlab convert",
     "give one of --from_hf=DIR and --to_hf"),
    (["fit", "--records=/nonexistent.csv"], "llmlab fit", "nonexistent.csv"),
    (["fit", "--form=nope", "--records=x"], "llmlab fit",
     "unknown scaling-law form 'nope'"),
    (["fit", "--records=r.csv", "--bootstrap=many"], "llmlab fit",
     "--bootstrap=many"),
    (["prune", "--from=R", f"--to_config={TINY}", "--workdir=W",
      "--method=nope"], "llmlab prune", "--method"),
])
def test_bad_command_lines_are_one_line(argv, prog, want, capsys):
  assert llmlab_main.main(argv) == 2
  assert want in _one_error_line(capsys.readouterr().err, prog)


@pytest.mark.parametrize("cmd, extra", [
    ("eval", []), ("sample", ["--prompt=x"]),
    ("sweep", ["--out=records.csv"]),
])
def test_missing_run_directory_is_one_line(cmd, extra, tmp_path, capsys):
  rc = llmlab_main.main([cmd, f"--workdir={tmp_path}/nope", *extra])
  assert rc == 2
  line = _one_error_line(capsys.readouterr().err, f"llmlab {cmd}")
  assert f"{tmp_path}/nope" in line


def test_library_errors_and_preemption():
  """Bad input (WorkdirError too) -> 2; a preempted study -> 0 with its
  message; any other failure keeps its traceback."""
  from llmlab import workdir_lock

  def ends(exc):
    def body(fv):
      raise exc
    return cli_common.run("x", [], lambda fv: None, body)
  assert ends(workdir_lock.WorkdirError("/w: not writable")) == 2
  assert ends(experiment.Preempted("preempted during /w")) == 0
  with pytest.raises(RuntimeError, match="a bug"):
    ends(RuntimeError("a bug"))


@pytest.mark.parametrize("exc", [
    errors.UserError("x"), errors.ConfigError("x"), errors.DataError("x"),
    errors.WorkdirError("x"), errors.UsageError("x"), errors.NotFound("x"),
    errors.AlreadyExists("x")])
def test_user_errors_are_one_line(exc, capsys):
  def body(fv):
    raise exc
  assert cli_common.run("x", [], lambda fv: None, body) == 2
  assert capsys.readouterr().err == "llmlab x: error: x\n"


@pytest.mark.parametrize("exc", [
    ValueError("operands could not be broadcast"),
    FileNotFoundError("/tmp/cache/x"), KeyError("k")])
def test_other_errors_are_bugs_with_a_traceback(exc, capsys):
  """A ValueError (numpy's, jax's) or an OSError that is no UserError is not
  the user's fault: it propagates (exit 1, traceback), after a line that
  says it is a bug."""
  def body(fv):
    raise exc
  with pytest.raises(type(exc)):
    cli_common.run("x", [], lambda fv: None, body)
  err = capsys.readouterr().err
  assert err.startswith(f"llmlab x: internal error ({type(exc).__name__}): "
                        "this is a bug")



def test_ctrl_c_is_one_line_and_exit_130(capsys):
  def interrupted(message):
    def body(fv):
      raise KeyboardInterrupt(*message)
    return body
  assert cli_common.run("x", [], lambda fv: None, interrupted(
      ["interrupted by Ctrl-C after saving step 3"])) == 130
  assert capsys.readouterr().err == ("llmlab x: interrupted by Ctrl-C after "
                                     "saving step 3\n")
  assert cli_common.run("x", [], lambda fv: None, interrupted([])) == 130
  err = capsys.readouterr().err
  assert err.startswith("llmlab x: interrupted (Ctrl-C): aborted")
  assert len(err.splitlines()) == 1


def test_preempted_message_and_summary_line(capsys):
  def preempted(fv):
    raise experiment.Preempted("preempted (SIGTERM) during /w/run")
  assert cli_common.run("x", [], lambda fv: None, preempted) == 0
  assert capsys.readouterr().err == "llmlab x: preempted (SIGTERM) during " \
      "/w/run\n"
  assert cli_common.run("x", [], lambda fv: None, lambda fv: {"a": 1}) == 0
  assert capsys.readouterr().out == '{"a": 1}\n'


# --------------------------------------------- overrides reach the config


def test_overtrain_overrides(monkeypatch, tmp_path):
  monkeypatch.chdir(ROOT)  # the default config is configs/overtrain_quick.py
  seen = _stand_in(monkeypatch, "llmlab.studies.overtrain.run")
  with pytest.raises(Stop):
    llmlab_main.main(["overtrain", f"--workdir={tmp_path}",
                      "--config.finetune.steps=7", "--pretrain_run=P"])
  (scfg, workdir), _ = seen[0]
  assert scfg.finetune.steps == 7 and scfg.pretrain_run == "P"
  assert workdir == str(tmp_path)


def test_distill_study_overrides(monkeypatch, tmp_path):
  seen = _stand_in(monkeypatch, "llmlab.studies.distill.run")
  with pytest.raises(Stop):
    llmlab_main.main(["distill-study", f"--config={ROOT}/configs/"
                      "distill_quick.py", f"--workdir={tmp_path}",
                      "--config.student.train.steps=11",
                      "--config.offline_top_k=4"])
  (scfg, _), _ = seen[0]
  assert scfg.student.train.steps == 11 and scfg.offline_top_k == 4


def test_compress_study_overrides(monkeypatch, tmp_path):
  monkeypatch.chdir(ROOT)
  seen = _stand_in(monkeypatch, "llmlab.compress.experiment.run")
  with pytest.raises(Stop):
    llmlab_main.main(["compress-study", f"--workdir={tmp_path}",
                      "--config.learned.steps=3"])
  (scfg, _), _ = seen[0]
  assert scfg.learned.steps == 3


def test_prune_overrides(monkeypatch, tmp_path):
  seen = _stand_in(monkeypatch, "llmlab.compress.prune.prune")
  with pytest.raises(Stop):
    llmlab_main.main(["prune", "--from=RUN:5", f"--to_config={TINY}",
                      f"--workdir={tmp_path}", "--method=learned",
                      "--to_config.model.d_model=48", "--mask_steps=9",
                      "--constrain_size"])
  (source, cfg, workdir, method), kwargs = seen[0]
  assert (source, workdir, method) == ("RUN:5", str(tmp_path), "learned")
  assert cfg.model.d_model == 48
  assert kwargs["learned"].steps == 9 and kwargs["learned"].constrain_size


def test_tokenizer_overrides(monkeypatch, tmp_path):
  seen = _stand_in(monkeypatch, "llmlab.data.pipeline.read_source")
  with pytest.raises(Stop):
    llmlab_main.main(["tokenizer", "train", f"--config={TINY}",
                      "--config.data.source=synthetic",
                      f"--out={tmp_path}/tok.json"])
  (name, cfg), _ = seen[0]
  assert name == "synthetic" and cfg.source == "synthetic"


def test_load_config_reads_like_the_flag():
  cfg = cli_common.load_config(TINY, "--config.train.steps=3")
  assert cfg.train.steps == 3
  with pytest.raises(cli_common.UsageError, match="did you mean 'train'"):
    cli_common.load_config(TINY, "--config.trian.steps=3")
