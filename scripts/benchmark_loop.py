"""Host overhead per step: our loop at --steps_per_loop=1 and N beside Keras `model.fit` at
steps_per_execution 1 and N, on the same model, data and batch, in one process.

    python scripts/benchmark_loop.py        # dense, 100,000-row table, batch 32, N=100, ~2 minutes

The table is the built-in regression table's generator at 100,000 rows (trainer.data.builtin),
written to a CSV and prepared as `--model=dense --data=...` prepares it (trainer.data.tabular: 64,000 training rows, 16,000
validation rows: 2,000 + 500 steps of 32), under the default strategy. Each setup trains a
fresh dense model (RMSprop, 1e-3, mean squared error) for --epochs epochs; an epoch's time is its
training pass and its validation pass (Keras: on_epoch_begin to on_epoch_end, which comes after
validation). The first epoch (tracing) is left out; the figure is the median of the others.
Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import loop  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.data import builtin, tabular  # noqa: E402
from trainer.models import MODELS, OPTIMIZERS  # noqa: E402
from trainer.state import TrainState  # noqa: E402


def prepared(rows, folder):
  """The dense model's data as the trainer prepares a CSV of `rows` rows of the built-in table."""
  path = os.path.join(folder, "table.csv")
  builtin.regression_table(rows=rows).to_csv(path, index=False)
  return tabular.prepare(Config(model="dense", data=path, target_column=builtin.TABLE_TARGET))


def ours(data, batch_size, epochs, steps_per_loop):
  keras.utils.set_random_seed(0)
  model = MODELS["dense"](data.input_shape)
  optimizer = OPTIMIZERS["dense"](1e-3)
  optimizer.build(model.trainable_variables)
  parts = loop.Loop(model, optimizer, loop.squared_error, data.make_dataset, tf.distribute.get_strategy(),
                    batch_size, steps_per_loop=steps_per_loop)
  state, seconds = TrainState(), []
  for _ in range(epochs):
    started = time.perf_counter()
    loss, _ = parts.train_epoch(state)
    parts.end_epoch(state, loss, parts.validate(), 0.0, epochs)
    seconds.append(time.perf_counter() - started)
  return seconds


class EpochTimes(keras.callbacks.Callback):
  def __init__(self):
    super().__init__()
    self.seconds = []

  def on_epoch_begin(self, epoch, logs=None):
    self.started = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds.append(time.perf_counter() - self.started)


def keras_fit(data, batch_size, epochs, steps_per_execution):
  keras.utils.set_random_seed(0)
  model = MODELS["dense"](data.input_shape)
  model.compile(optimizer=OPTIMIZERS["dense"](1e-3), loss="mse", steps_per_execution=steps_per_execution)
  times = EpochTimes()
  model.fit(data.make_dataset("train", batch_size), validation_data=data.make_dataset("validation", batch_size),
            epochs=epochs, verbose=0, callbacks=[times])
  return times.seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=100_000)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--steps", type=int, default=100, help="N: steps per call / per execution")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    data = prepared(args.rows, folder)
  runs = {}
  for n in (1, args.steps):
    runs[f"ours_steps_per_loop_{n}"] = ours(data, args.batch_size, args.epochs, n)
    runs[f"fit_steps_per_execution_{n}"] = keras_fit(data, args.batch_size, args.epochs, n)
  medians = {name: statistics.median(seconds[1:]) for name, seconds in runs.items()}
  print(f"{'setup':32} {'epoch s (median)':>17}  epochs after the first")
  for name, seconds in runs.items():
    print(f"{name:32} {medians[name]:17.2f}  {' '.join(f'{s:.2f}' for s in seconds[1:])}")
  ours_1, fit_1 = medians["ours_steps_per_loop_1"], medians["fit_steps_per_execution_1"]
  ratios = {"ours_1_over_fit_1": ours_1 / fit_1,
            f"ours_1_over_ours_{args.steps}": ours_1 / medians[f"ours_steps_per_loop_{args.steps}"],
            f"ours_{args.steps}_over_fit_{args.steps}": medians[f"ours_steps_per_loop_{args.steps}"]
            / medians[f"fit_steps_per_execution_{args.steps}"]}
  for name, value in ratios.items():
    print(f"{name:32} {value:17.2f}x")
  print(json.dumps({"rows": args.rows, "batch_size": args.batch_size, "epoch_seconds": medians, **ratios}))


if __name__ == "__main__":
  main()
