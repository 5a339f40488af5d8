"""Tables for the dense regressor: a random train/test split as the tutorial made it, features
and target standardised with statistics of the training rows only."""

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from trainer.data import Prepared, builtin, csv_file
from trainer.errors import UserError


def table_dataset(features, targets, batch_size, shuffle_seed=None, input_context=None):
  """Batches of (feature rows, targets); with a shuffle_seed (an int, e.g. seed * 1000 + epoch)
  the rows come in a seeded random order."""
  dataset = tf.data.Dataset.from_tensor_slices((features.astype(np.float32), targets.astype(np.float32)))
  if input_context is not None:
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if shuffle_seed is not None:
    dataset = dataset.shuffle(len(features), seed=shuffle_seed)
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict_table(model, preprocessing, features, batch_size=1024):
  """Predictions in the target's units from raw feature rows; needs only the saved preprocessing."""
  x = (np.asarray(features, np.float64) - preprocessing["feature_mean"]) / preprocessing["feature_std"]
  outputs = np.concatenate([model(b, training=False).numpy()[:, 0]
                            for b in tf.data.Dataset.from_tensor_slices(x.astype(np.float32)).batch(batch_size)])
  return preprocessing["target_mean"] + preprocessing["target_std"] * outputs


def prepare(config):
  if config.data is None:
    frame, source = builtin.regression_table(seed=0), "built-in regression table"
    gaps = {"missing_rows": 0, "missing_action": "none"}
  else:
    frame, gaps = csv_file.read_columns(config.data, config.target_column, config.feature_columns or None,
                                        config.date_column)
    source = config.data
  target = config.target_column or builtin.TABLE_TARGET
  features = [c for c in frame.columns if c not in (target, config.date_column)]
  if not features:
    raise UserError(f"{source} has no numeric column besides {target!r} to learn from; "
                    "name the inputs with --feature_columns")
  fitted = len(frame)  # the rows of --data itself
  if config.test_data:
    # A separate test table (trainer.retrain's --eval_data): rows no candidate or production model
    # trained on, however the random split of --data falls.
    test_frame, _ = csv_file.read_columns(config.test_data, target, features, config.date_column,
                                          flag="--test_data")
    frame = pd.concat([frame, test_frame], ignore_index=True)  # its rows last: the test rows
  x, y = frame[features].to_numpy(np.float64), frame[target].to_numpy(np.float64)
  rows = len(y)
  n_test = rows - fitted if config.test_data else round(config.test_split * rows)
  # The validation rows are the tail of the training rows, as Keras' validation_split takes them.
  n_val = round(config.validation_split * (rows - n_test))
  if rows - n_test - n_val < 1 or n_test < 2 or n_val < 1:
    raise UserError(f"{source}: {rows} rows are too few to split into train, validation and test; give at least 10")
  # --data's rows in a seeded random order, then --test_data's (none without it).
  order = np.concatenate([np.random.default_rng(config.seed).permutation(fitted), np.arange(fitted, rows)])
  train, val, test = np.split(order, [rows - n_test - n_val, rows - n_test])

  x_mean, x_std = x[train].mean(axis=0), x[train].std(axis=0)
  x_std[x_std == 0] = 1  # a constant feature carries nothing; keep it at zero instead of dividing by 0
  y_mean, y_std = y[train].mean(), y[train].std() or 1.0
  xn, yn = (x - x_mean) / x_std, (y - y_mean) / y_std

  def make_dataset(split, batch_size, input_context=None, epoch=0):
    if split == "validation":
      return table_dataset(xn[val], yn[val], batch_size, input_context=input_context)
    return table_dataset(xn[train], yn[train], batch_size, shuffle_seed=config.seed * 100_003 + epoch,
                         input_context=input_context)

  preprocessing = {"kind": "table", "features": features, "target": target,
                   "feature_mean": x_mean.tolist(), "feature_std": x_std.tolist(),
                   "target_mean": float(y_mean), "target_std": float(y_std)}

  def predict(model, export_preprocessing=None):
    """Predictions of the test rows from their raw columns: the export's own features and statistics."""
    used = export_preprocessing or preprocessing
    missing = [c for c in used["features"] if c not in frame.columns]
    if missing:
      raise UserError(f"{source} has no column {missing[0]!r}, which the model needs (it was trained on "
                      f"{', '.join(used['features'])})")
    return predict_table(model, used, frame[used["features"]].to_numpy(np.float64)[test])

  logging.info("%s: %d rows, features %s; %d train, %d validation, %d test", source, rows,
               ", ".join(features), len(train), len(val), len(test))
  return Prepared(
      make_dataset=make_dataset,
      input_shape=(len(features),),
      preprocessing=preprocessing,
      predict=predict,
      test_targets=y[test],
      baseline_name="training mean",
      baseline_predictions=np.full(len(test), y[train].mean()),
      test_index=[int(i) for i in test],
      summary={"path": source, "rows": rows, "columns": [target] + features, **gaps,
               "split": {"train": {"rows": len(train)}, "validation": {"rows": len(val)},
                         "test": {"rows": len(test), **({"path": config.test_data} if config.test_data else {})},
                         "method": f"random, seed {config.seed}"}},
      kind="table")
