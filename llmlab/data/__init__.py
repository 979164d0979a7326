"""llmlab's data: corpora, tokenizers and seeded packed batches on grain.

    data = build(config.data, seq_len=L, global_batch=G, seed=s,
                 process_index=p, process_count=P)
    batch = data.train_batch(step)          # this process's G/P rows
    for batch in data.train_iter(step): ... # same batches, prefetched
    evals = data.eval_batches(eval_tokens, batch_size)

Batch dict (numpy int32 [G/P, L]): `tokens`; `segment_ids` (0 = padding,
documents 1, 2, ... within a row); `positions` (restart at 0 at each document
start and at each row start: a document cut at a row end continues in the
next row with positions from 0 and no BOS); `bytes` (UTF-8 bytes of original
text per token, 0 for BOS/EOS/PAD). Position t predicts token t+1; the target
is valid iff segment_ids[t+1] == segment_ids[t] != 0 (see metrics.py).

Every bad input raises `DataError` in `build()`, before training starts.

`data.source=tokens` reads a token store written by `llmlab tokenize`
(token_store.py: layout and checks; token_data.py: how rows are cut and
ordered): rows by random access, nothing loaded whole.
"""

from llmlab.data.config import default_config
from llmlab.data.errors import DataError
from llmlab.data.pipeline import Data
from llmlab.data.pipeline import build

__all__ = ["Data", "DataError", "build", "default_config"]
