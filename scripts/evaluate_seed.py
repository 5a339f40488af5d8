"""The tutorial's results table, reproduced on a prices CSV: its formulation, ours, persistence.

    python scripts/evaluate_seed.py GOOGL_2006-01-01_to_2018-01-01.csv
    python scripts/evaluate_seed.py stocks.csv --filter=Ticker=AAPL --target_column="Adj Close" \\
        --test_start=2012-01-01 --formulations=ours

The tutorial's formulation: a MinMax scaler fitted on the training years, 60-step windows of
scaled prices predicting the next scaled price, up to 500 epochs with early stopping (patience
50 for GRU, 60 for LSTM) on the last 20% of the training windows. (Our loop keeps the best
epoch's weights, which can only flatter the tutorial.) Ours: the trainer as
`python -m trainer.task --model=M --data=PATH ...` runs it. Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

from trainer import loop, report, train  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.data.timeseries import window_dataset  # noqa: E402
from trainer.models import MODELS  # noqa: E402

TUTORIAL_PATIENCE = {"gru": 50, "lstm": 60}


def tutorial_forecast(model_name, prices, test_row, window, epochs, seed):
  """Test-period forecasts (in price units) of the tutorial's MinMax-scaled formulation."""
  keras.utils.set_random_seed(seed)
  lo, hi = prices[:test_row].min(), prices[:test_row].max()
  scaled = ((prices - lo) / (hi - lo)).astype(np.float32)[:, None]
  # Keras' validation_split=0.2 takes the last 20% of the training windows.
  val_first = window + int((test_row - window) * 0.8)

  def make_dataset(split, batch_size, input_context=None, epoch=0):
    first, last = (window, val_first) if split == "train" else (val_first, test_row)
    return window_dataset(scaled, first, last, window, batch_size,
                          shuffle_seed=(seed, epoch) if split == "train" else None, input_context=input_context)

  model = MODELS[model_name]((window, 1))
  optimizer = keras.optimizers.Adam(1e-3)
  history = loop.fit(model, optimizer, loop.squared_error, make_dataset, tf.distribute.get_strategy(), 32,
                     epochs, TUTORIAL_PATIENCE[model_name])
  test = window_dataset(scaled, test_row, len(prices), window, 256)
  outputs = np.concatenate([model(x, training=False).numpy()[:, 0] for x, _ in test])
  return lo + (hi - lo) * outputs, len(history["loss"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path")
  parser.add_argument("--target_column", default="Close")
  parser.add_argument("--date_column", default="Date")
  parser.add_argument("--test_start", default="2017-01-01")
  parser.add_argument("--filter", help="COLUMN=VALUE: keep only these rows (one ticker of a multi-ticker file)")
  parser.add_argument("--models", default="gru,lstm")
  parser.add_argument("--formulations", default="tutorial,ours")
  parser.add_argument("--window", type=int, default=60)
  parser.add_argument("--tutorial_epochs", type=int, default=500)
  parser.add_argument("--epochs", type=int, default=60, help="ours")
  parser.add_argument("--seed", type=int, default=42)
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)  # a line per epoch: these runs take minutes

  frame = pd.read_csv(args.path)
  label = os.path.basename(args.path)
  if args.filter:
    column, value = args.filter.split("=", 1)
    frame, label = frame[frame[column].astype(str) == value], f"{label} [{args.filter}]"
  frame = frame.sort_values(args.date_column).reset_index(drop=True)
  workdir = tempfile.mkdtemp(prefix="evaluate_seed-")
  csv = os.path.join(workdir, "series.csv")
  frame.to_csv(csv, index=False)
  prices = frame[args.target_column].to_numpy(np.float64)
  test_row = int(np.searchsorted(pd.to_datetime(frame[args.date_column]).to_numpy(),
                                 np.datetime64(args.test_start)))
  actual = prices[test_row:]

  rows = []
  for model_name in args.models.split(","):
    if "tutorial" in args.formulations:
      predictions, epochs = tutorial_forecast(model_name, prices, test_row, args.window, args.tutorial_epochs,
                                              args.seed)
      rows.append({"model": model_name, "formulation": "tutorial (MinMax price)", "epochs": epochs,
                   **report.metrics(actual, predictions)})
    if "ours" in args.formulations:
      config = Config(model=model_name, data=csv, target_column=args.target_column, date_column=args.date_column,
                      test_start=args.test_start, window=args.window, epochs=args.epochs, seed=args.seed)
      result = train.train_and_evaluate(config, os.path.join(workdir, model_name))
      rows.append({"model": model_name, "formulation": "ours (relative change)", "epochs": result["epochs_run"],
                   **result["test"]})
  rows.append({"model": "-", "formulation": "persistence", "epochs": 0,
               **report.metrics(actual, prices[test_row - 1:-1])})
  persistence = rows[-1]["rmse"]

  print(f"{label}: {args.target_column}, test from {args.test_start} ({len(actual)} days), window {args.window}")
  print(f"{'model':<6} {'formulation':<24} {'epochs':>6} {'RMSE':>9} {'MAE':>9} {'R2':>7} {'RMSE/persistence':>17}")
  for r in rows:
    r["rmse_over_persistence"] = round(r["rmse"] / persistence, 3)
    print(f"{r['model']:<6} {r['formulation']:<24} {r['epochs']:>6} {r['rmse']:>9.2f} {r['mae']:>9.2f} "
          f"{r['r2']:>7.3f} {r['rmse_over_persistence']:>16.3f}x")
  print(json.dumps({"data": label, "target": args.target_column, "test_start": args.test_start, "rows": rows}))


if __name__ == "__main__":
  main()
