"""The package's layers only import downward (docs/architecture.md).

Every `import llmlab...` is read with `ast`, at any depth (inside functions
too), so an import written inside a function to dodge a cycle still counts.
"""

import ast
import pathlib

LLMLAB = pathlib.Path(__file__).resolve().parent.parent / "llmlab"

CORE = ("llmlab.model", "llmlab.sharding", "llmlab.optim", "llmlab.data",
        "llmlab.guard", "llmlab.metrics", "llmlab.perf", "llmlab.distributed",
        "llmlab.workdir_lock", "llmlab.decode", "llmlab.runtime",
        "llmlab.loop", "llmlab.attention", "llmlab.storage", "llmlab.slices",
        "llmlab.profiling")
STUDIES = ("llmlab.scaling.study", "llmlab.scaling.study_analysis",
           "llmlab.scaling.study_report", "llmlab.studies", "llmlab.compress.experiment",
           "llmlab.experiment")
CLI = ("llmlab.main", "llmlab.__main__", "llmlab.cli_common", "llmlab.commands")

LEAF = ("llmlab.errors",)  # every layer may raise the user's errors

# (importer prefixes, forbidden import prefixes, why)
RULES = [
    (("llmlab.errors",), ("llmlab.",), "the error classes are the leaf"),
    (("llmlab.config",), ("llmlab.",), "config is above only the errors"),
    (CORE, ("llmlab.objectives", "llmlab.steps", "llmlab.runs",
            "llmlab.train", "llmlab.checkpoints"), "the core is below the step"),
    (("llmlab.objectives",), ("llmlab.steps", "llmlab.checkpoints",
                              "llmlab.api", "llmlab.runs",
                              "llmlab.commands", "llmlab.teacher_logits"),
     "objectives are pure losses"),
    (("llmlab.steps",), ("llmlab.runs", "llmlab.train"),
     "the step knows no run directories"),
    (("llmlab.runs",), ("llmlab.train", "llmlab.loop") + STUDIES,
     "runs read directories, never run"),
    (("llmlab.train", "llmlab.loop"), STUDIES, "the loop runs one run"),
]


def _module(path: pathlib.Path) -> str:
  rel = path.relative_to(LLMLAB.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """Every llmlab module `path` imports, at any depth (`from a import b`
  counts as `a.b` where that is a module, else as `a`)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("llmlab")}
    elif isinstance(node, ast.ImportFrom) and node.module and \
        node.module.startswith("llmlab"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return out


def _graph() -> dict[str, set[str]]:
  paths = {_module(p): p for p in LLMLAB.rglob("*.py")}
  return {m: _imports(p, set(paths)) for m, p in paths.items()}


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p.rstrip(".") + ".")
             or (p.endswith(".") and name.startswith(p)) for p in prefixes)


def test_layers_only_import_downward():
  broken = []
  for importer, imported in _graph().items():
    for owners, forbidden, why in RULES:
      if _under(importer, owners):
        bad = sorted(i for i in imported if _under(i, forbidden)
                     and not _under(i, owners + LEAF))
        broken += [f"{importer} imports {b} ({why})" for b in bad]
  assert not broken, "\n".join(broken)


def test_no_library_module_imports_the_cli():
  broken = [f"{m} imports {i}" for m, imps in _graph().items()
            if not _under(m, CLI) for i in sorted(imps) if _under(i, CLI)]
  assert not broken, "\n".join(broken)


def test_no_import_cycle():
  graph = _graph()
  modules = set(graph)
  edges = {m: {i for i in imps if i in modules and i != m}
           for m, imps in graph.items()}
  state = {}

  def visit(m, path):
    state[m] = "open"
    for n in sorted(edges[m]):
      if state.get(n) == "open":
        raise AssertionError("import cycle: " + " -> ".join(
            path[path.index(n):] + [n]))
      if n not in state:
        visit(n, path + [n])
    state[m] = "done"

  for m in sorted(modules):
    if m not in state:
      visit(m, [m])
