"""llmlab: a JAX framework for studying how language models learn and scale."""

__version__ = "0.1.0"


def load(path: str, step: int | None = None, mesh=None):
  """Load a run directory (`DIR` or `DIR:STEP`); see `llmlab.api.load`."""
  from llmlab import api
  return api.load(path, step=step, mesh=mesh)
