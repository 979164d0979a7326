"""The quick scaling study on a synthetic language with a known entropy rate.

Same pipeline and model family as `configs/study_quick.py`, trained on the
seeded sparse Markov source of `llmlab/data/synthetic.py`: an order-3 chain
over 16 symbols with 4 successors per context, i.e. 4,096 contexts whose
transition table (16k probabilities) small models cannot hold and larger ones
can. Its entropy rate h is computed exactly, so the fitted irreducible loss E
can be checked against the truth: `study.json` reports E next to h and next to
the best achievable mean loss per target (h plus the BOS/EOS edge terms).

    llmlab study --config=configs/study_synthetic.py --workdir=/tmp/llmlab/synth
"""

import importlib.util
import os


def _study_quick():
  """configs/study_quick.py, loaded by path (configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "study_quick.py")
  spec = importlib.util.spec_from_file_location("llmlab_study_quick", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  s = _study_quick().get_config(arg)
  s.base.data.source = "synthetic"
  # ~4.1M symbols: the quick study's 3M training tokens are seen about once,
  # so nothing is learned by memorising documents.
  s.base.data.synthetic.update(seed=0, order=3, num_symbols=16, branching=4,
                               num_docs=8000, doc_len=512)
  if not arg:
    s.steps = 1000
  return s
