"""Objectives, chosen by `config.objective.name` from a registry
(llmlab/objectives/registry.py documents the signature and `Aux`).

Adding an objective: write the function in a module here, decorate it with
`@register("my_name")`, import the module below.
"""

from llmlab.objectives.registry import (Aux, Context, check_chunked, get,
                                        names, prepare, register)
from llmlab.objectives import next_token  # noqa: F401  (registers)
from llmlab.objectives import distill, on_policy  # noqa: F401  (register)

__all__ = ["Aux", "Context", "check_chunked", "get", "names", "prepare",
           "register"]
