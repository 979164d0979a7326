"""The user docs (README.md, docs/*.md) against the code: every `llmlab CMD
...` they show names a real command, only flags that command has (read from
its own `--help`, so absl and argparse commands alike), and config keys
(`--config.a.b=...`) that exist in the config the line names (else the
command's default config, else `llmlab.config.base()`); every relative link
resolves to a file (and a heading, for `#anchor`). Also the README's shape,
which CI relies on: it opens with the two set-up commands, and stays short.

No jax program runs: ~2 s (the first `--help` imports jax).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import io
import os
import re
import shlex

import pytest

from llmlab import main as llmlab_main
from tests.helpers import ROOT

README = os.path.join(ROOT, "README.md")
DOCS = sorted([README, *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
MAIN_JOB = ("pip install -e . && llmlab study --config=configs/study_quick.py "
            "--workdir=/tmp/llmlab/study")
TEST_JOB = 'pip install -e ".[test]" && pytest -q -n auto'
README_MAX_LINES = 250

# Where a command line ends inside a snippet.
_SEPARATORS = {"&&", "||", ";", "|", "#"}
# A token of placeholder text, not a flag: `llmlab sample ... --quantize=int8`.
_PLACEHOLDERS = {"...", "…"}


# ------------------------------------------------------------- extraction


def _rel(path: str) -> str:
  return os.path.relpath(path, ROOT)


def _strip_fences(text: str) -> tuple[list[tuple[int, str]], str]:
  """(fenced code lines as (line number, text), the prose with fenced
  blocks blanked so inline spans never straddle a block)."""
  code, prose, fenced = [], [], False
  for i, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      fenced = not fenced
      prose.append("")
      continue
    if fenced:
      code.append((i, line))
      prose.append("")
    else:
      prose.append(line)
  return code, "\n".join(prose)


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
  out, buf, start = [], "", None
  for i, line in lines:
    if start is None:
      start = i
    if line.rstrip().endswith("\\"):
      buf += line.rstrip()[:-1] + " "
      continue
    out.append((start, buf + line))
    buf, start = "", None
  if buf:
    out.append((start, buf))
  return out


def snippets(path: str) -> list[tuple[int, str]]:
  """Every piece of code in a markdown file: fenced lines (continuations
  joined) and inline `code` spans (which may wrap across lines)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  code, prose = _strip_fences(text)
  out = _join_continuations(code)
  for m in re.finditer(r"(`+)(.+?)\1", prose, re.S):
    line = prose.count("\n", 0, m.start()) + 1
    out.append((line, " ".join(m.group(2).split())))
  return out


def _tokens(text: str) -> list[str]:
  try:
    return shlex.split(text, comments=False)
  except ValueError:  # an unbalanced quote in prose: split on blanks
    return text.split()


# `llmlab CMD` where a command starts (a snippet's start, after `&&`, `--`,
# `python -m`, a comment's `also:`, ...; not prose such as "another llmlab
# process"), not followed by ":" (an error message's `llmlab train: error`);
# or the command a launcher runs (`launch/tpu.sh ... -- train ...`).
_COMMAND = re.compile(
    r"(?:(?:^|&&|;|\||--|-m|\$|\(|:|`)\s*llmlab\s+([a-z][\w-]*)(?![\w:-])"
    r"|launch/(?:tpu|slurm)\.sh\b[^`]*?\s--\s+([a-z][\w-]*)(?![\w:-]))")


def command_lines(path: str) -> list[tuple[str, int, str, list[str]]]:
  """(file, line, command, its arguments) for every `llmlab CMD ...` in the
  file. `llmlab CMD` with CMD a placeholder (upper case) is skipped."""
  found = []
  for line, snippet in snippets(path):
    for m in _COMMAND.finditer(snippet):
      cmd = m.group(1) or m.group(2)
      rest = []
      for tok in _tokens(snippet[m.end():]):
        if tok in _SEPARATORS or tok.startswith("#"):
          break
        rest.append(tok)
      found.append((_rel(path), line, cmd, rest))
  return found


# ---------------------------------------------------------------- commands


@functools.lru_cache(maxsize=None)
def command_flags(cmd: str) -> tuple[frozenset[str], frozenset[str],
                                     frozenset[str]]:
  """(flags, boolean flags, config flags) of `llmlab CMD`, from its --help
  (absl: `--name=VALUE`, `--[no]name`, `--name.KEY=VALUE` for a config;
  argparse: `--name ...`)."""
  argv = [cmd, "train", "--help"] if cmd == "tokenizer" else [cmd, "--help"]
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    rc = llmlab_main.main(argv)
  assert rc == 0, f"llmlab {' '.join(argv)} exited {rc}"
  names, booleans, configs = set(), set(), set()
  for line in buf.getvalue().splitlines():
    m = re.match(r"^  (?:-\w, )?--(\[no\])?([\w-]+)(\.KEY)?", line)
    if not m:
      continue
    if m.group(3):
      configs.add(m.group(2))
    else:
      names.add(m.group(2))
      if m.group(1):
        booleans.add(m.group(2))
  return frozenset(names), frozenset(booleans), frozenset(configs)


def default_config(cmd: str) -> str | None:
  """The config file a command reads when the line names none."""
  module = importlib.import_module(llmlab_main.COMMANDS[cmd][0])
  return getattr(getattr(module, "CONFIG", None), "default", None)


@functools.lru_cache(maxsize=None)
def load(spec: str | None):
  """The config `FILE.py[:ARG]` names (None: `llmlab.config.base()`, the
  train config every other one starts from)."""
  if spec is None:
    from llmlab.config import base  # noqa: PLC0415
    return base()
  from llmlab import cli_common  # noqa: PLC0415
  return cli_common.load_config(os.path.join(ROOT, spec))


def _has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    try:
      if part not in node:
        return False
      node = node[part]
    except TypeError:  # a leaf reached before the key ends
      return False
  return True


def _is_real_file(spec: str) -> bool:
  """Whether a --config value names a file in the repository (not `...`,
  `FILE.py`, `my.py`)."""
  path = spec.split(":", 1)[0]
  return os.path.isfile(os.path.join(ROOT, path))


def check_line(cmd: str, args: list[str]) -> list[str]:
  """What is wrong with `llmlab CMD ARGS` ([] if nothing)."""
  if cmd not in llmlab_main.COMMANDS:
    return [f"no command {cmd!r} (llmlab --help lists them)"]
  if cmd == "tokenizer":
    if not args or args[0] != "train":
      return ["`llmlab tokenizer` needs its subcommand `train`"]
    args = args[1:]
  names, booleans, configs = command_flags(cmd)
  problems, overrides, specs = [], [], {}
  for tok in args:
    tok = tok.lstrip("[").rstrip("]")
    if not tok.startswith("--") or tok in _PLACEHOLDERS:
      continue
    name = tok[2:].split("=", 1)[0]
    if name in ("help", "helpfull", "helpshort"):
      continue
    head = name.split(".", 1)[0]
    if "." in name and head in configs:
      overrides.append((head, name.split(".", 1)[1]))
    elif name in configs:
      specs[name] = tok.split("=", 1)[1] if "=" in tok else None
    elif name in names or (name.startswith("no") and name[2:] in booleans):
      continue
    else:
      problems.append(f"--{name} is not a flag of `llmlab {cmd}`")
  for flag, spec in specs.items():
    if spec and spec.startswith("configs/") and not _is_real_file(spec):
      problems.append(f"--{flag}={spec}: no such file")
  for flag, key in overrides:
    spec = specs.get(flag)
    if spec is None and flag == "config":
      spec = default_config(cmd)
    config = load(spec if spec and _is_real_file(spec) else None)
    if not _has_key(config, key):
      where = spec if spec and _is_real_file(spec) else "llmlab.config.base()"
      problems.append(f"--{flag}.{key}: no key {key!r} in {where}")
  return problems


def all_command_lines():
  return [line for path in DOCS for line in command_lines(path)]


def test_docs_show_commands():
  lines = all_command_lines()
  cmds = {cmd for _, _, cmd, _ in lines}
  assert len(lines) > 50 and {"train", "study", "fit", "plan"} <= cmds


def test_every_command_line_is_real():
  bad = []
  for path, line, cmd, args in all_command_lines():
    for problem in check_line(cmd, args):
      bad.append(f"{path}:{line}: llmlab {cmd} ...: {problem}")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("cmd, args, wrong", [
    ("trian", ["--config=configs/tiny.py"], "no command 'trian'"),
    ("train", ["--config=configs/tiny.py", "--work_dir=x"], "--work_dir"),
    ("fit", ["--records=r.csv", "--froms=data"], "--froms"),
    ("train", ["--config=configs/tiny.py", "--config.train.stepz=5"],
     "no key 'train.stepz' in configs/tiny.py"),
    ("overtrain", ["--config.pretrian.steps=5"],
     "no key 'pretrian.steps' in configs/overtrain_quick.py"),
    ("train", ["--config=configs/nope.py"], "no such file"),
    ("tokenizer", ["--vocab_size=8"], "subcommand"),
])
def test_check_line_finds_mistakes(cmd, args, wrong):
  problems = check_line(cmd, args)
  assert any(wrong in p for p in problems), problems


def test_check_line_accepts_real_lines():
  for cmd, args in [
      ("train", ["--config=configs/tiny.py", "--workdir=/tmp/x",
                 "--config.train.steps=50", "--nodebug"]),
      ("study", ["--config=configs/study_quick.py", "--config.fit_on=curves",
                 "--workdir=DIR"]),
      ("overtrain", ["--config.pretrain.train.steps=5", "--workdir=DIR"]),
      ("prune", ["--from=a", "--to_config=configs/tiny.py",
                 "--to_config.model.num_layers=1", "--constrain_size"]),
      ("fit", ["--records=r.csv", "--form=data", "--final_only"]),
      ("tokenizer", ["train", "--source=stdlib", "--out=t.json"]),
  ]:
    assert check_line(cmd, args) == [], (cmd, args)


# ------------------------------------------------------------------ links


def slug(heading: str) -> str:
  """GitHub's anchor for a heading."""
  text = re.sub(r"[`*]|\[|\]\([^)]*\)", "", heading.strip().lower())
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: str) -> frozenset[str]:
  with open(path, encoding="utf-8") as f:
    _, prose = _strip_fences(f.read())
  seen, out = {}, set()
  for m in re.finditer(r"^#{1,6}\s+(.*)$", prose, re.M):
    s = slug(m.group(1))
    n = seen.get(s, 0)
    out.add(s if n == 0 else f"{s}-{n}")
    seen[s] = n + 1
  return frozenset(out)


def links(path: str) -> list[tuple[int, str]]:
  with open(path, encoding="utf-8") as f:
    _, prose = _strip_fences(f.read())
  prose = re.sub(r"(`+).+?\1", lambda m: " " * len(m.group(0)), prose,
                 flags=re.S)
  return [(prose.count("\n", 0, m.start()) + 1, m.group(1))
          for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)",
                               prose)]


def check_link(path: str, target: str) -> str | None:
  """What is wrong with a link from the markdown file `path` (None: fine)."""
  if re.match(r"^[a-z][\w+.-]*:", target):  # https:, mailto:
    return None
  file_part, _, anchor = target.partition("#")
  dest = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
          if file_part else path)
  if not os.path.exists(dest):
    return f"{target}: no file {_rel(dest)}"
  if anchor and dest.endswith(".md") and anchor not in anchors(dest):
    return f"{target}: no heading #{anchor} in {_rel(dest)}"
  return None


def test_every_relative_link_resolves():
  bad = []
  for path in DOCS:
    for line, target in links(path):
      problem = check_link(path, target)
      if problem:
        bad.append(f"{_rel(path)}:{line}: {problem}")
  assert not bad, "\n".join(bad)


def test_check_link_finds_mistakes():
  assert check_link(README, "docs/README.md") is None
  assert "no file" in check_link(README, "docs/nope.md")
  assert "no heading" in check_link(README, "docs/README.md#no-such-heading")
  assert slug("Scaling laws: `llmlab fit`") == "scaling-laws-llmlab-fit"


# Paths the docs name on purpose that are not in the repository.
NOT_IN_REPO = {
    "llmlab/objectives/entropy_bonus.py": "the objective a reader adds",
    "configs/tpu/v5p": "MaxText's directory of v5p recipes",
}
_REPO_PATH = re.compile(r"^(?:llmlab|configs|benchmarks|launch|tests|docs)/"
                        r"[\w./-]*[\w/]$")


def missing_paths(path: str) -> list[tuple[int, str]]:
  """Repository paths named in `code` (`llmlab/plan.py`, `configs/tiny.py`,
  `launch/tpu.sh`) that do not exist; `configs/x.py:arg` counts as
  `configs/x.py`, a glob or placeholder (`*`, upper case) is skipped."""
  out = []
  for line, snippet in snippets(path):
    for tok in snippet.split():
      tok = tok.strip("`'\"(),;").split(":", 1)[0]
      if (not _REPO_PATH.match(tok) or "*" in tok or
          re.search(r"[A-Z]{2,}", tok)):
        continue
      if tok not in NOT_IN_REPO and not os.path.exists(os.path.join(ROOT,
                                                                     tok)):
        out.append((line, tok))
  return out


def test_every_repository_path_exists():
  bad = [f"{_rel(path)}:{line}: {tok}" for path in DOCS
         for line, tok in missing_paths(path)]
  assert not bad, "\n".join(bad)


def test_docs_index_lists_every_page():
  index = os.path.join(ROOT, "docs", "README.md")
  listed = {os.path.normpath(os.path.join(os.path.dirname(index), t.split(
      "#")[0])) for _, t in links(index)}
  pages = set(glob.glob(os.path.join(ROOT, "docs", "*.md"))) - {index}
  missing = sorted(_rel(p) for p in pages - listed)
  assert not missing, f"docs/README.md does not link {missing}"


# ------------------------------------------------------------- the README


def test_readme_opens_with_the_two_setup_commands():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  code, _ = _strip_fences(text)
  blocks = [l.strip() for _, l in code if l.strip()]
  assert blocks[:2] == [MAIN_JOB, TEST_JOB], blocks[:2]
  # The CI script runs exactly the README's test command.
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    assert TEST_JOB in f.read()


def test_readme_is_short():
  with open(README, encoding="utf-8") as f:
    n = len(f.read().splitlines())
  assert n <= README_MAX_LINES, f"README.md has {n} lines"


def test_user_docs_do_not_point_at_the_dev_machine():
  bad = []
  for path in DOCS:
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if "../shared" in line or re.search(r"\bthis (\d+-core )?(CPU )?"
                                            r"(machine|host|CPU)\b", line, re.I):
          bad.append(f"{_rel(path)}:{i}: {line.strip()}")
  assert not bad, "\n".join(bad)
