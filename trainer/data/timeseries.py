"""Price series for the recurrent forecasters: relative changes, a chronological split, and
windows gathered inside tf.data.

Why relative changes: the tutorial scaled prices with a MinMax scaler fitted on 2006-2016, so
the higher 2017 prices fell outside anything the network had seen and its forecasts were 8-17x
worse than repeating yesterday's close. Here the network sees each day's change relative to
the day before (standardised with statistics from the training rows only) and predicts the
next one; the forecast is the last price times (1 + predicted change). A change has the same
scale at $100 and at $1,000, so a new price level is nothing new to the network.
"""

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from trainer.data import Prepared, builtin, csv_file
from trainer.errors import UserError


def relative_changes(values):
  """(N, F) values -> (N - 1, F) changes: row i is values[i + 1] / values[i] - 1."""
  return values[1:] / values[:-1] - 1


# Windows are gathered this many at a time, then cut into batches: one gather per small batch
# spends more time in tf.data's per-element machinery than in the gather (scripts/benchmark_windows.py).
GATHER_CHUNK = 2048


def window_dataset(series, first, last, window, batch_size, shuffle_seed=None, input_context=None, units=None):
  """Batches of (series[t - window:t], series[t, 0]) for every t in [first, last): each window
  of every column, and the next value of the first column (the target) as its label; with
  `units` (one value per row of the series), (window, label, units[t]) triples.

  Only the target indices t are held, as one tensor; windows are gathered chunk by chunk from
  the one copy of the series, so memory stays that of the series however many windows there
  are. With a shuffle_seed (an int pair, e.g. (seed, epoch)) the order is a seeded permutation.
  """
  series = tf.convert_to_tensor(np.asarray(series, np.float32))
  # int32 indices: half the memory of int64, and no series that fits in memory needs more.
  offsets = tf.range(-window, 0, dtype=tf.int32)
  indices = tf.range(first, last, dtype=tf.int32)
  if shuffle_seed is not None:
    # A permutation tensor, not Dataset.shuffle: its buffer would hold every index as an element.
    indices = tf.random.experimental.stateless_shuffle(indices, tf.constant(shuffle_seed, tf.int64))
  if input_context is not None:
    indices = indices[input_context.input_pipeline_id::input_context.num_input_pipelines]
  columns = (series[:, 0],) if units is None else (series[:, 0], tf.constant(units, tf.float32))
  return (tf.data.Dataset.range(0, tf.size(indices, tf.int64), GATHER_CHUNK)
          .map(lambda i: indices[i:i + GATHER_CHUNK])
          .map(lambda t: (tf.gather(series, t[:, None] + offsets), *(tf.gather(c, t) for c in columns)),
               num_parallel_calls=tf.data.AUTOTUNE)
          .rebatch(batch_size)
          .prefetch(tf.data.AUTOTUNE))


def forecast(model, preprocessing, values, batch_size=256):
  """Next-step forecasts in the data's units from raw values (M, F), M > window.

  Entry i forecasts the target one step after values[window + i]; the last entry is the
  forecast for the step after the data. Needs only the model and the saved preprocessing.
  """
  window = preprocessing["window"]
  values = np.asarray(values, np.float64)
  changes = (relative_changes(values) - preprocessing["change_mean"]) / preprocessing["change_std"]
  # A dummy target after the last change, so the window ending at the data's end is forecast too.
  padded = np.concatenate([changes, np.zeros((1, changes.shape[1]))])
  dataset = window_dataset(padded, window, len(padded), window, batch_size)
  outputs = np.concatenate([model(x, training=False).numpy()[:, 0] for x, _ in dataset])
  change = preprocessing["change_mean"][0] + preprocessing["change_std"][0] * outputs
  return values[window:, 0] * (1 + change)


def load_series(config):
  """(frame, gaps, path, date column) from --data or the built-in series."""
  if config.data is None:
    frame = builtin.price_series(seed=0)
    return frame, {"missing_rows": 0, "missing_action": "none"}, "built-in price series", builtin.SERIES_DATE
  frame, gaps = csv_file.read_columns(config.data, config.target_column, config.feature_columns,
                                      config.date_column, fill_gaps=True)
  return frame, gaps, config.data, config.date_column


def prepare(config):
  frame, gaps, source, date_column = load_series(config)
  target = config.target_column or builtin.SERIES_TARGET
  columns = [target] + [c for c in config.feature_columns if c != target]
  values = frame[columns].to_numpy(np.float64)
  for i, column in enumerate(columns):
    if (values[:, i] <= 0).any():
      raise UserError(f"column {column!r} of {source} has values <= 0; forecasts use relative changes, "
                      "so choose columns of positive values such as prices")
  dates = frame[date_column] if date_column else pd.Series(range(len(frame)))
  test_row = csv_file.test_start_row(config, dates, source)
  window, rows = config.window, len(values)
  csv_file.check_series_rows(window, test_row, rows, source)

  # Change t (row t + 1) is a target; its window is changes t - window .. t - 1.
  first, test_first = window, test_row - 1
  n_val = max(1, round(config.validation_split * (test_first - first)))
  val_first = test_first - n_val
  changes = relative_changes(values)
  # Fitted on the changes the training windows see, never on validation or test rows.
  mean, std = changes[:val_first].mean(axis=0), changes[:val_first].std(axis=0)
  if (std == 0).any():
    raise UserError(f"{source}: column {columns[int(np.argmin(std))]!r} never changes in the training rows; "
                    "there is nothing to learn from it")
  normalised = ((changes - mean) / std).astype(np.float32)

  # A forecast's price error is its error in standardised change times the price it starts from
  # times the change's std: validation batches carry that factor (trainer.steps), so the
  # validation metric is in the prices' units.
  dollars = (values[:-1, 0] * std[0]).astype(np.float32)

  def make_dataset(split, batch_size, input_context=None, epoch=0):
    if split == "train":
      return window_dataset(normalised, first, val_first, window, batch_size, shuffle_seed=(config.seed, epoch),
                            input_context=input_context)
    return window_dataset(normalised, val_first, test_first, window, batch_size, input_context=input_context,
                          units=dollars)

  preprocessing = {"kind": "forecast", "window": window, "columns": columns, "target": target,
                   "change_mean": mean.tolist(), "change_std": std.tolist(),
                   "formulation": "next relative change of the target, standardised; forecast = last * (1 + change)"}

  def predict(model, export_preprocessing=None):
    """Forecasts of the test rows, from the raw rows before them: the export's own columns and
    window, normalised with its own statistics."""
    used = export_preprocessing or preprocessing
    missing = [c for c in used["columns"] if c not in frame.columns]
    if missing:
      raise UserError(f"{source} has no column {missing[0]!r}, which the model needs (it was trained on "
                      f"{', '.join(used['columns'])}); add it with --feature_columns")
    first = test_row - 1 - used["window"]
    if first < 0:
      raise UserError(f"{source}: a model with a window of {used['window']} needs {-first} more rows "
                      "before the test period")
    return forecast(model, used, frame[used["columns"]].to_numpy(np.float64)[first:])[:-1]

  split_rows = {"train": (window + 1, val_first + 1), "validation": (val_first + 1, test_row),
                "test": (test_row, rows)}
  logging.info("%s: %d rows; windows of %d: %d train, %d validation, %d test", source, rows, window,
               val_first - first, n_val, rows - test_row)
  return Prepared(
      make_dataset=make_dataset,
      input_shape=(window, len(columns)),
      preprocessing=preprocessing,
      predict=predict,
      test_targets=values[test_row:, 0],
      baseline_name="persistence (tomorrow = today)",
      baseline_predictions=values[test_row - 1:-1, 0],
      test_index=[csv_file.label(d) for d in dates[test_row:]],
      summary={"path": source, "rows": rows, "columns": columns, "date_column": date_column,
               **gaps, "window": window,
               "split": {name: {"rows": hi - lo, "first": csv_file.label(dates[lo]),
                                "last": csv_file.label(dates[hi - 1])} for name, (lo, hi) in split_rows.items()}},
      kind="forecast")
