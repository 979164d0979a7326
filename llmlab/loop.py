"""The train loop's core: one step, then the hooks due after it, in order.

    for step in range(start, total):
      state, carry, metrics = step_fn(state, carry, next(batches))
      end = StepEnd(step + 1, ...)
      for hook in hooks:            # in list order
        if hook.due(end):
          hook.run(end)
      if end.stop: break
    for hook in hooks: hook.finish(end)   # e.g. write a pending log row

Everything else a training run does after a step -- logging, the guard
policy, evaluation, checkpointing, preemption -- is a `Hook` (Levanter's
`add_hook(fn, every=N)`, nanodo's hook list), so each one is a short
function that can be tested alone, and the loop itself is these lines.
A hook that reads a step's device values makes the host wait for the
device there; `llmlab/train.py` schedules the cheap host-side checks that
need the same values (the guard policy) at those points too. A hook raises to leave the loop early (a rollback, a divergence); it sets
`end.stop` to stop cleanly after the step (preemption).

This module knows no jax and no config: `llmlab/train.py` registers the
built-in hooks with `Trainer.add_hook(fn, every=N)`, as anyone may add one
(`train.train(cfg, workdir, hooks=[...])`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator


@dataclasses.dataclass
class StepEnd:
  """What the hooks see after a step: `step` updates are done."""

  step: int
  total: int
  state: Any
  carry: Any
  metrics: Any  # this step's device values; reading them waits for the step
  stop: bool = False  # set by a hook: stop cleanly after this step

  @property
  def final(self) -> bool:
    return self.step == self.total


def always(end: StepEnd) -> bool:
  del end
  return True


def every(n: int, final: bool = True) -> Callable[[StepEnd], bool]:
  """Due every `n` steps (n = 0: never) and, with `final`, at the last."""
  return lambda end: bool(n and end.step % n == 0) or (final and end.final)


_every = every  # for `hook`, whose argument has the name


@dataclasses.dataclass(frozen=True)
class Hook:
  """`run(end)` after every step where `due(end)`; `finish(end)` once when
  the loop ends (also after an early stop)."""

  name: str
  run: Callable[[StepEnd], None]
  due: Callable[[StepEnd], bool] = always
  finish: Callable[[StepEnd], None] | None = None


def hook(fn: Callable[[StepEnd], None], every: int = 1, *,
         name: str | None = None,
         finish: Callable[[StepEnd], None] | None = None) -> Hook:
  """A Hook running `fn(end)` every `every` steps and at the last one
  (`every(n)`), named after `fn` unless `name` is given."""
  return Hook(name or getattr(fn, "__name__", "hook"), fn,
              due=_every(every), finish=finish)


def run(step_fn: Callable, state, carry, batches: Iterator, start: int,
        total: int, hooks: list[Hook]) -> StepEnd | None:
  """Steps `start..total` (or until a hook sets `stop`); returns the last
  `StepEnd` (None if there was no step to take)."""
  end = None
  for step in range(start, total):
    state, carry, metrics = step_fn(state, carry, next(batches))
    end = StepEnd(step + 1, total, state, carry, metrics)
    for hook in hooks:
      if hook.due(end):
        hook.run(end)
    if end.stop:
      break
  if end is not None:
    for hook in hooks:
      if hook.finish is not None:
        hook.finish(end)
  return end
