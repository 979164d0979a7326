"""Loss records: reading the CSV, validating it, and choosing which checkpoints to fit.

A records table is a plain dict of equal-length numpy arrays ("columnar"):
  params, tokens, loss : float64, required, finite and > 0 (they are logged);
  run                  : str, the run each row belongs to. Without a `run`
                         column every row is its own run ("line<N>" / "row<i>"), so that
                         resampling runs in the bootstrap resamples points;
  family               : str, optional: the family (group of runs) a row belongs to
                         (`llmlab backtest` fits each family apart);
  step, flops          : float64, optional;
  unique_tokens        : float64, optional, > 0: the distinct tokens the run's data
                         holds (a run of D tokens saw each about D / U times; the
                         data-constrained forms need it);
  epochs               : float64, optional: the run's planned repetitions (informative).
Other CSV columns are ignored. `as_records` also accepts a list of row dicts.
"""

import csv
import io
from typing import Iterable, Mapping

import numpy as np

from llmlab import errors
from llmlab import storage

REQUIRED = ("params", "tokens", "loss")
OPTIONAL_NUMERIC = ("step", "flops", "unique_tokens", "epochs")
POSITIVE = REQUIRED + ("unique_tokens",)  # logged by the forms that read them


class RecordsError(errors.DataError):
  """Bad records input; the message names the file, line and column."""


def _number(text, where: str, column: str, bound: str | None = "positive") -> float:
  """Parses one cell; `column` is only used in messages. bound: "positive",
  "nonnegative" or None (any finite value)."""
  if text is None or (isinstance(text, str) and not text.strip()):
    raise RecordsError(f"{where}: column {column!r}: missing value")
  try:
    value = float(text)
  except (TypeError, ValueError):
    raise RecordsError(f"{where}: column {column!r}: non-numeric value {text!r}") from None
  if not np.isfinite(value):
    raise RecordsError(f"{where}: column {column!r}: non-finite value {text!r}")
  if bound == "positive" and value <= 0:
    raise RecordsError(f"{where}: column {column!r}: value {text!r} must be > 0")
  if bound == "nonnegative" and value < 0:
    raise RecordsError(f"{where}: column {column!r}: value {text!r} must be >= 0")
  return value


def _columns(rows: Iterable[tuple[str, str, Mapping]], source: str, present,
             display: Mapping[str, str] | None = None) -> dict:
  """Validates (where, label, row) triples into columns; `present` are the keys.

  `label` names the row's run when there is no run column; `display` maps keys to
  the column names shown in error messages.
  """
  display = display or {}
  missing = [c for c in REQUIRED if c not in present]
  if missing:
    raise RecordsError(f"{source}: missing required column(s) {missing}; "
                       f"found {sorted(present)}")
  numeric = REQUIRED + tuple(c for c in OPTIONAL_NUMERIC if c in present)
  cols = {c: [] for c in numeric}
  runs, families = [], []
  for where, label, row in rows:
    for c in numeric:
      cols[c].append(_number(row.get(c), where, display.get(c, c),
                             "positive" if c in POSITIVE else None))
    runs.append(str(row["run"]) if "run" in present else label)
    if "family" in present:
      families.append(_text(row.get("family"), where, "family"))
  if not runs:
    raise RecordsError(f"{source}: no data rows")
  out = {c: np.asarray(v, dtype=np.float64) for c, v in cols.items()}
  out["run"] = np.asarray(runs, dtype=object)
  if "family" in present:
    out["family"] = np.asarray(families, dtype=object)
  return out


def _text(value, where: str, column: str) -> str:
  if value is None or not str(value).strip():
    raise RecordsError(f"{where}: column {column!r}: missing value")
  return str(value).strip()


def read_csv(path, required, rename: Mapping[str, str] | None = None):
  """(header, [(line number, row dict)]) of a CSV, header names after `rename`.

  Errors name the file and line; a missing `required` column (named as in the
  file) fails here, before any row is read.
  """
  path, rename = str(path), dict(rename or {})
  try:
    text = storage.read_bytes(path).decode("utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise RecordsError(f"{path}: cannot open records file: {e}") from None
  with io.StringIO(text, newline="") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames:
      raise RecordsError(f"{path}: empty file (no header line)")
    original = [h.strip() for h in reader.fieldnames]
    header = [rename.get(h, h) for h in original]
    reader.fieldnames = header
    shown = {v: k for k, v in rename.items()}
    missing = [shown.get(c, c) for c in required if c not in header]
    if missing:
      raise RecordsError(f"{path}, line 1 (header): missing required column(s) "
                         f"{missing}; found {original}")
    return header, [(reader.line_num, row) for row in reader]


def params_rename(params_column: str) -> dict:
  """Reads `params_column` as "params" (and ignores a "params" column then)."""
  if params_column == "params":
    return {}
  return {params_column: "params", "params": "_ignored_params"}


def read_records(path, params_column: str = "params") -> dict:
  """Reads a records CSV (see the module docstring).

  params_column: the CSV column used as N (e.g. non-embedding parameters); it is
  stored under "params".
  """
  header, rows = read_csv(path, REQUIRED, params_rename(params_column))
  where = ((f"{path}, line {n}", f"line{n}", row) for n, row in rows)
  return _columns(where, str(path), set(header), {"params": params_column})


def read_points(path, columns, optional=()) -> tuple[list[str], list[dict], dict]:
  """Points to predict at: (header, rows as read, {column: float64 array})
  for the numeric `columns` a law needs (params, tokens, ...) and those of
  `optional` the file has (a held-out run's loss; a blank cell is NaN);
  every other column is kept as it is. Errors name the file, line, column."""
  header, rows = read_csv(path, tuple(columns))
  if not rows:
    raise RecordsError(f"{path}: no data rows")
  cols = {c: np.array([_number(row.get(c), f"{path}, line {n}", c,
                               "positive" if c in POSITIVE else None)
                       for n, row in rows]) for c in columns}
  for c in (c for c in optional if c in header):  # blank: not known (NaN)
    cols[c] = np.array([np.nan if not str(row.get(c) or "").strip() else
                        _number(row[c], f"{path}, line {n}", c,
                                "positive" if c in POSITIVE else None)
                        for n, row in rows])
  return header, [row for _, row in rows], cols


def table_rows(records, source: str, required=REQUIRED):
  """(column names, (where, label, row dict) triples) of a dict of equal-length
  columns or of a list of row dicts with the same keys."""
  if isinstance(records, Mapping):
    cols = {k: np.atleast_1d(v) for k, v in records.items()}
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
      raise RecordsError(f"{source}: columns have different lengths {lengths}")
    n = next(iter(lengths.values()), 0)
    return set(cols), ((f"{source}, row {i}", f"row{i}", {k: v[i] for k, v in cols.items()})
                       for i in range(n))
  records = list(records)
  present = set(records[0]) if records else set(required)
  for i, r in enumerate(records):
    if set(r) != present:
      raise RecordsError(f"{source}, row {i}: keys {sorted(r)} differ from row 0's "
                         f"{sorted(present)}")
  return present, ((f"{source}, row {i}", f"row{i}", r) for i, r in enumerate(records))


def as_records(records, source: str = "records") -> dict:
  """Normalises a list of row dicts or a dict of columns into a validated table."""
  present, rows = table_rows(records, source)
  return _columns(rows, source, present)


def require(records: Mapping, columns, source: str, why: str) -> None:
  """A column a computation needs (e.g. a form's unique_tokens), named with
  the file it is missing from."""
  missing = [c for c in columns if c not in records]
  if missing:
    raise RecordsError(f"{source}: missing column(s) {missing}, needed by {why}")


def take(records: Mapping, mask_or_index) -> dict:
  """Rows of every column selected by a boolean mask or an index array."""
  return {k: np.asarray(v)[mask_or_index] for k, v in records.items()}


def run_names(records: Mapping) -> list[str]:
  """Distinct runs in order of first appearance."""
  return list(dict.fromkeys(records["run"].tolist()))


def final_tokens(records: Mapping) -> np.ndarray:
  """For each row, the largest token count of its run."""
  out = np.empty_like(records["tokens"])
  for r in run_names(records):
    m = records["run"] == r
    out[m] = records["tokens"][m].max()
  return out


def select(records: Mapping, *, min_tokens: float | None = None,
           min_fraction: float | None = None, final_only: bool = False,
           runs: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict:
  """Checkpoints to fit: early ones (few tokens) are dropped because they follow
  the warm-up/decay transient, not the law.

  min_fraction is relative to each run's final token count; final_only keeps each
  run's last checkpoint; runs/exclude pick runs by name.
  """
  names = set(run_names(records))
  wanted = list(runs) if runs is not None else list(names)
  unknown = [r for r in list(wanted) + list(exclude) if r not in names]
  if unknown:
    raise RecordsError(f"unknown run(s) {unknown}; known: {sorted(names)[:20]}")
  keep = np.isin(records["run"], wanted) & ~np.isin(records["run"], list(exclude))
  final = final_tokens(records)
  if min_tokens is not None:
    keep &= records["tokens"] >= min_tokens
  if min_fraction is not None:
    keep &= records["tokens"] >= min_fraction * final
  if final_only:
    keep &= records["tokens"] == final
  if not keep.any():
    raise RecordsError("checkpoint selection left no records to fit")
  return take(records, keep)
