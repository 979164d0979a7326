"""Checkpoint conversion between Hugging Face Llama-family models and llmlab.

    from llmlab.convert import from_hf, load, to_hf
    from_hf("Llama-3.2-1B/", "runs/llama1b")        # HF dir -> run directory
    to_hf("runs/llama1b", "export/")                # run directory -> HF dir
    load("Llama-3.2-1B/", mesh=mesh).params         # HF dir -> sharded params

Command line: `llmlab convert --from_hf=DIR --workdir=OUT` and
`llmlab convert --to_hf --workdir=RUN --out=DIR` (see `cli.py`).
"""

from llmlab.convert.hf import from_hf, load, to_hf

__all__ = ["from_hf", "load", "to_hf"]
