"""Reads a CSV (a local path or gs://) into clean numeric columns, or stops with one line naming
the file and column."""

import io

import pandas as pd
from absl import logging

from trainer import storage
from trainer.config import UserError


def read_columns(path, target_column, feature_columns=None, date_column=None, fill_gaps=False, flag="--data"):
  """Returns (frame, gaps): the date column (if any), the target and the features, all numeric.

  With feature_columns None every other numeric column is a feature. Rows with missing values
  are dropped, or, with fill_gaps (a price series: a missing day keeps the last known price),
  filled forward from the previous row. `gaps` says how many rows and what was done. flag is the
  one errors name (a test set comes from --test_data).
  """
  try:
    # Bytes through the storage layer, so gs:// works and a missing file is FileNotFoundError
    # either way; an unreachable bucket is storage.StorageError and is left to the caller.
    # pandas guesses compression (.gz, .zip, ...) only from a path, so it is told.
    frame = pd.read_csv(io.BytesIO(storage.read_bytes(path)),
                        compression=pd.io.common.infer_compression(path, "infer"))
  except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"{flag}={path}: cannot read it as CSV ({reason}); give a CSV file with a header row")
  names = list(frame.columns)
  for flag, column in [("target_column", target_column), ("date_column", date_column),
                       *[("feature_columns", c) for c in feature_columns or ()]]:
    if column is not None and column not in names:
      raise UserError(f"--{flag}={column!r} is not a column of {path}; its columns are: {', '.join(map(str, names))}")
  if date_column is not None:
    frame = _sorted_by_date(frame, date_column, path)
  if feature_columns is None:
    others = [c for c in names if c not in (target_column, date_column)]
    feature_columns = [c for c in others if pd.api.types.is_numeric_dtype(frame[c])]
  columns = [target_column] + [c for c in feature_columns if c != target_column]
  for column in columns:
    frame[column] = _numeric(frame[column], column, path)
  frame = frame[([date_column] if date_column else []) + columns]
  return _without_gaps(frame, columns, fill_gaps, path, flag)


def _numeric(series, column, path):
  numbers = pd.to_numeric(series, errors="coerce")
  bad = numbers.isna() & series.notna()
  if bad.any():
    row = int(bad.to_numpy().nonzero()[0][0])
    raise UserError(f"column {column!r} of {path} has {int(bad.sum())} non-numeric values "
                    f"(first at line {row + 2}: {series.iloc[row]!r}); fix the file or choose another column")
  return numbers.astype("float64")


def _sorted_by_date(frame, date_column, path):
  dates = pd.to_datetime(frame[date_column], errors="coerce")
  bad = dates.isna()
  if bad.any():
    row = int(bad.to_numpy().nonzero()[0][0])
    raise UserError(f"--date_column={date_column!r} of {path} has {int(bad.sum())} values that are not dates "
                    f"(first at line {row + 2}: {frame[date_column].iloc[row]!r}); fix the file")
  frame = frame.assign(**{date_column: dates})
  if not dates.is_monotonic_increasing:
    logging.warning("%s: rows are not in date order; sorting them by %r", path, date_column)
    frame = frame.sort_values(date_column, kind="stable")
  return frame.reset_index(drop=True)


def _without_gaps(frame, columns, fill_gaps, path, flag):
  missing = frame[columns].isna().any(axis=1)
  count = int(missing.sum())
  if not count:
    return frame, {"missing_rows": 0, "missing_action": "none"}
  if fill_gaps:
    # A gap in a price series means no new price: carry the last one; leading gaps have none.
    frame = frame.assign(**{c: frame[c].ffill() for c in columns})
    frame = frame[frame[columns].notna().all(axis=1)].reset_index(drop=True)
    action = "filled forward from the previous row (leading gaps dropped)"
  else:
    frame = frame[~missing].reset_index(drop=True)
    action = "dropped"
  logging.warning("%s: %d rows have missing values in %s; %s", path, count, ", ".join(columns), action)
  if len(frame) == 0:
    raise UserError(f"{flag}={path}: no row has values in every column used ({', '.join(columns)}); fix the file")
  return frame, {"missing_rows": count, "missing_action": action}
