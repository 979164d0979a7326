"""The user's errors: what a command reports in one line and exit status 2.

Every problem that the person running llmlab can fix -- a flag, a config
key, a data file, a run directory, a records CSV, a checkpoint that is
missing or corrupt -- is raised as a subclass of `UserError`, and only those
end a command with one line `llmlab CMD: error: ...` and exit 2
(llmlab/cli_common.py). Anything else that escapes a command is a bug in
llmlab (or in a library it calls): exit 1 with the full traceback.

`UserError` subclasses `ValueError`, because before this class existed the
command line treated every ValueError as bad input and library callers (and
their tests) catch these errors as ValueError; that stays true, but a
ValueError that is not a `UserError` (numpy's, jax's, a bug's) is no longer
mistaken for the user's fault.

The subclasses live here so a module can raise them without importing the
module of another layer; their old homes re-export them
(`llmlab.config.ConfigError`, `llmlab.data.errors.DataError`,
`llmlab.workdir_lock.WorkdirError`, `llmlab.cli_common.UsageError`).
"""

from __future__ import annotations


class UserError(ValueError):
  """Input the user can fix; the message names the flag, key, file or
  directory, and what to do."""


class UsageError(UserError):
  """A command line that cannot work (a missing, unknown or conflicting
  flag, a flag value out of range)."""


class ConfigError(UserError):
  """A config key has a bad value; raised before any compilation."""


class DataError(UserError):
  """Bad data input or configuration; the message names the file/line/key."""


class WorkdirError(UserError, RuntimeError):
  """The workdir cannot be used (missing, not a directory, not writable,
  locked). A RuntimeError too, as it was before `UserError`."""


class NotFound(UserError, FileNotFoundError):
  """A file or directory the user named does not exist (or is not what the
  command needs: not a run directory, no such checkpoint)."""


class AlreadyExists(UserError, FileExistsError):
  """A destination the user named already holds what would be overwritten."""
