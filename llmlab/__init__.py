"""llmlab: a JAX framework for studying how language models learn and scale."""

from llmlab import runtime as _runtime

__version__ = "0.1.0"

# Before jax starts a backend: XLA:CPU's freed step memory stays in the
# process instead of being faulted in again each step (runtime.py says
# what it saves).
_runtime.keep_freed_memory()


def load(path: str, step: int | None = None, mesh=None):
  """Load a run directory (`DIR` or `DIR:STEP`); see `llmlab.api.load`."""
  from llmlab import api
  return api.load(path, step=step, mesh=mesh)
