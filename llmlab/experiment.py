"""The experiment harness the studies share (llmlab/scaling/study.py,
llmlab/studies/, llmlab/compress/experiment.py)."""

from __future__ import annotations


class Preempted(RuntimeError):
  """A run of a study received SIGTERM and saved its checkpoint; re-running
  the same command resumes. Raised by library code, handled once by the CLI
  (which prints the message and exits 0)."""
