"""The command layer: each `llmlab CMD` is a module here that parses its
flags and calls the libraries below it (nothing below imports this package)."""
