"""`llmlab tokenizer train`: fit a byte-level BPE tokenizer.json offline.

Trains on the *training* documents of the configured source (validation
documents are left out, so held-out numbers stay held out; a mixture uses
all its sources, unweighted) with the
`tokenizers` library: byte-level pre-tokenization (every string encodes, and
decoding is lossless), special tokens <pad>, <bos>, <eos> (ids 0, 1, 2) that
`llmlab.data.tokenizer` recognises. Options override `--config`'s
`config.data` (a Python file with `get_config()`), else the defaults.
"""

from __future__ import annotations

SPECIALS = ("<pad>", "<bos>", "<eos>")


def train(texts: list[str], vocab_size: int, min_frequency: int = 2):
  """A byte-level BPE `tokenizers.Tokenizer` fitted on `texts`."""
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  pre_tokenizers = hf.pre_tokenizers
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=list(SPECIALS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return tok
