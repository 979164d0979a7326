"""The one exception type of the data package.

Every problem with the data configuration or its inputs (missing paths, bad
files, unparseable tokenizers, corpora too small for the requested shapes) is
a `DataError`, raised by `build()` before any training starts, so the train
loop can report it without a traceback through grain or numpy. It is one of
llmlab.errors' user errors (one line, exit 2).
"""

from llmlab.errors import DataError  # noqa: F401
