"""A `jax.profiler` trace of a range of train steps, for TensorBoard.

`--config.train.profile_steps=10:15` traces steps 10..15: the trace starts
once step 9 has been dispatched and stops after step 15, when the host has
waited for that step's results (dispatch runs ahead of the device, so
stopping without the wait would cut the last steps short). The trace goes
to WORKDIR/tensorboard/plugins/profile/<run>/, where TensorBoard's profile
plugin (`pip install tensorboard-plugin-profile`) finds it next to the
run's scalars. A gs:// workdir gets it through a local spool uploaded when
the trace ends. `llmlab/train.py` runs `Profile.hook` after every step.
"""

from __future__ import annotations

import logging

import jax

from llmlab import config as config_lib
from llmlab import storage

log = logging.getLogger("llmlab")


class Profile:
  """Starts and stops one trace; `hook(end)` is due every step in range."""

  def __init__(self, profile_steps: str, workdir: str):
    self.first, self.last = config_lib.profile_range(profile_steps)
    self.workdir = workdir
    self.spool = None

  def due(self, end) -> bool:
    return bool(self.last) and self.first - 1 <= end.step <= self.last

  def hook(self, end) -> None:
    """After step `end.step`: start before step `first`, stop after
    `last`. A resume inside the range starts at once."""
    if self.spool is None and end.step < self.last:
      self.spool = storage.Spool(self.workdir)
      jax.profiler.start_trace(self.spool.path("tensorboard"))
      log.info("profiling steps %d..%d", end.step + 1, self.last)
    elif self.spool is not None and end.step == self.last:
      self.stop(end)

  def stop(self, end) -> None:
    """Wait for the device, end the trace, upload it (remote workdir)."""
    if self.spool is None:
      return
    jax.block_until_ready(end.metrics)
    jax.profiler.stop_trace()
    self.spool.close()
    self.spool = None
    log.info("profile of steps up to %d written to %s", end.step,
             storage.join(self.workdir, "tensorboard", "plugins", "profile"))
