"""Reads a CSV (a local path or gs://) into clean numeric columns, or stops with one line naming
the file and column; and `check`, which finds a job's CSV mistakes before TensorFlow starts.

No TensorFlow here: trainer.task and trainer.retrain run `check` before importing it, so a missing
column or a too-short series is one line in a second, as a flag mistake is, not after TensorFlow's
start (about 10 seconds, with CUDA's noise).
"""

import io

import numpy as np
import pandas as pd
from absl import logging

from trainer import storage
from trainer.data import budget
from trainer.errors import UserError


def read_columns(path, target_column, feature_columns=None, date_column=None, fill_gaps=False, flag="--data",
                 warn=True):
  """Returns (frame, gaps): the date column (if any), the target and the features, all numeric.

  With feature_columns None every other numeric column is a feature. Rows with missing values
  are dropped, or, with fill_gaps (a price series: a missing day keeps the last known price),
  filled forward from the previous row. `gaps` says how many rows and what was done. flag is the
  one errors name (a test set comes from --test_data). warn=False keeps what is done quiet (`check`
  reads the file before prepare() reads it again and says it).
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
    frame = _sorted_by_date(frame, date_column, path, warn)
  if feature_columns is None:
    others = [c for c in names if c not in (target_column, date_column)]
    feature_columns = [c for c in others if pd.api.types.is_numeric_dtype(frame[c])]
  columns = [target_column] + [c for c in feature_columns if c != target_column]
  for column in columns:
    frame[column] = _numeric(frame[column], column, path)
  frame = frame[([date_column] if date_column else []) + columns]
  return _without_gaps(frame, columns, fill_gaps, path, flag, warn)


def _numeric(series, column, path):
  numbers = pd.to_numeric(series, errors="coerce")
  bad = numbers.isna() & series.notna()
  if bad.any():
    row = int(bad.to_numpy().nonzero()[0][0])
    raise UserError(f"column {column!r} of {path} has {int(bad.sum())} non-numeric values "
                    f"(first at line {row + 2}: {series.iloc[row]!r}); fix the file or choose another column")
  return numbers.astype("float64")


def _sorted_by_date(frame, date_column, path, warn):
  dates = pd.to_datetime(frame[date_column], errors="coerce")
  bad = dates.isna()
  if bad.any():
    row = int(bad.to_numpy().nonzero()[0][0])
    raise UserError(f"--date_column={date_column!r} of {path} has {int(bad.sum())} values that are not dates "
                    f"(first at line {row + 2}: {frame[date_column].iloc[row]!r}); fix the file")
  frame = frame.assign(**{date_column: dates})
  if not dates.is_monotonic_increasing:
    if warn:
      logging.warning("%s: rows are not in date order; sorting them by %r", path, date_column)
    frame = frame.sort_values(date_column, kind="stable")
  return frame.reset_index(drop=True)


def _without_gaps(frame, columns, fill_gaps, path, flag, warn):
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
  if warn:
    logging.warning("%s: %d rows have missing values in %s; %s", path, count, ", ".join(columns), action)
  if len(frame) == 0:
    raise UserError(f"{flag}={path}: no row has values in every column used ({', '.join(columns)}); fix the file")
  return frame, {"missing_rows": count, "missing_action": action}


def check(config):
  """The mistakes in config's CSV files that preparing the data would stop at, found now: a file
  that is not a CSV, a missing column, non-numeric values, and for a forecast a --test_start
  outside the data or a series too short for --window, and files too large for memory (both are
  held whole). Images and built-in data: nothing to read."""
  if config.kind == "images" or config.data is None:
    return
  budget.check_table(config, [("--data", config.data), ("--test_data", config.test_data)])
  if not config.is_forecast:
    frame, _ = read_columns(config.data, config.target_column, config.feature_columns or None, config.date_column,
                            warn=False)
    if config.test_data:
      features = [c for c in frame.columns if c not in (config.target_column, config.date_column)]
      read_columns(config.test_data, config.target_column, features, config.date_column, flag="--test_data",
                   warn=False)
    return
  dates = _series_dates(config)
  check_series_rows(config.window, test_start_row(config, dates, config.data), len(dates), config.data)


def newest(config):
  """The label of a series' newest row in --data (its date, or its row number without
  --date_column): what trainer.no_new_data compares with the newest row production trained on."""
  return label(_series_dates(config).iloc[-1])


def _series_dates(config):
  """A series' dates (or row numbers), one per row as training reads them (gaps filled forward)."""
  frame, _ = read_columns(config.data, config.target_column, config.feature_columns, config.date_column,
                          fill_gaps=True, warn=False)
  return frame[config.date_column] if config.date_column else pd.Series(range(len(frame)))


def test_start_row(config, dates, source):
  """The first row of a series' test period: from --test_start, trainer.retrain's --eval_days, or
  the last --test_split of the rows."""
  if config.test_days is not None:
    # The newest test_days days, however long the series has grown (trainer.retrain's hold-out).
    start = dates.iloc[-1] - pd.Timedelta(days=config.test_days - 1)
    row = int(np.searchsorted(dates.to_numpy(), start.to_datetime64()))
    if row == 0:
      raise UserError(f"--eval_days={config.test_days} covers all of {source} ({label(dates.iloc[0])} to "
                      f"{label(dates.iloc[-1])}); hold out fewer days")
    return row
  if config.test_start is None:
    return int(len(dates) * (1 - config.test_split))
  start = pd.Timestamp(config.test_start)
  row = int(np.searchsorted(dates.to_numpy(), start.to_datetime64()))
  if row == 0 or row == len(dates):
    raise UserError(f"--test_start={config.test_start} is outside the data ({source} runs from "
                    f"{label(dates.iloc[0])} to {label(dates.iloc[-1])}); pick a date inside it")
  return row


def check_series_rows(window, test_row, rows, source):
  """A forecaster needs `window` + 3 rows before the test period (a window, and a change to learn
  and one to validate) and 2 in it."""
  needed = window + 3
  if test_row < needed or rows - test_row < 2:
    raise UserError(
        f"{source}: too short for --window={window}: it needs at least {needed} rows before the test "
        f"period and 2 in it, {needed + 2} in all (has {test_row} and {rows - test_row}); "
        "lower --window, give more data or test on fewer rows (--test_start; trainer.retrain: --eval_days)")


def label(value):
  """A date as YYYY-MM-DD, a row number as itself: how messages and plots name a row."""
  return value.date().isoformat() if isinstance(value, pd.Timestamp) else int(value)
