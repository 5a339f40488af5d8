"""Host overhead per step: our loop at --steps_per_loop=1 and N beside Keras `model.fit` at
steps_per_execution 1 and N, on the same model, data and batch, in one process.

    python scripts/benchmark_loop.py        # dense, 100,000-row table, batch 32, N=100, ~3 minutes

The table is the built-in regression table's generator at 100,000 rows (trainer.data.builtin),
written to a CSV and prepared as `--model=dense --data=...` prepares it (trainer.data.tabular:
64,000 training rows, 16,000 validation rows: 2,000 + 500 steps of 32), under the default strategy. Each setup trains a
fresh dense model (RMSprop, 1e-3, mean squared error) for --epochs epochs; an epoch's time is its
training pass and its validation pass (Keras: on_epoch_begin to on_epoch_end, which comes after
validation). The setups take turns, one epoch each per round, so that the load of other work on a
shared machine falls on all alike. The first epoch (tracing) is left out; the figure is the median
of the others (the minimum is printed too). Our loop is measured at the default --steps_per_loop too.
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
  """Yields the seconds of each epoch of our loop (trainer.loop: training, validation, its end)."""
  keras.utils.set_random_seed(0)
  model = MODELS["dense"](data.input_shape)
  optimizer = OPTIMIZERS["dense"](1e-3)
  optimizer.build(model.trainable_variables)
  parts = loop.Loop(model, optimizer, loop.squared_error, data.make_dataset, tf.distribute.get_strategy(),
                    batch_size, steps_per_loop=steps_per_loop)
  state = TrainState()
  for _ in range(epochs):
    started = time.perf_counter()
    loss, _ = parts.train_epoch(state)
    parts.end_epoch(state, loss, parts.validate(), 0.0, epochs)
    yield time.perf_counter() - started


class EpochTimes(keras.callbacks.Callback):
  def on_epoch_begin(self, epoch, logs=None):
    self.started = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    self.seconds = time.perf_counter() - self.started


def keras_fit(data, batch_size, epochs, steps_per_execution):
  """Yields the seconds of each epoch of `model.fit` (one fit of one epoch each: its train function is kept)."""
  keras.utils.set_random_seed(0)
  model = MODELS["dense"](data.input_shape)
  model.compile(optimizer=OPTIMIZERS["dense"](1e-3), loss="mse", steps_per_execution=steps_per_execution)
  times = EpochTimes()
  for _ in range(epochs):
    model.fit(data.make_dataset("train", batch_size), validation_data=data.make_dataset("validation", batch_size),
              epochs=1, verbose=0, callbacks=[times])
    yield times.seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=100_000)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--steps", type=int, default=100, help="N: steps per call / per execution")
  args = parser.parse_args()
  default = Config.__dataclass_fields__["steps_per_loop"].default
  with tempfile.TemporaryDirectory() as folder:
    data = prepared(args.rows, folder)
    setups = {f"ours_steps_per_loop_{n}": ours(data, args.batch_size, args.epochs, n) for n in (1, default, args.steps)}
    setups.update({f"fit_steps_per_execution_{n}": keras_fit(data, args.batch_size, args.epochs, n)
                   for n in (1, args.steps)})
    # Round by round, one epoch of each setup: the load of other work on a shared machine falls on all alike.
    runs = {name: [] for name in setups}
    for _ in range(args.epochs):
      for name, epochs in setups.items():
        runs[name].append(next(epochs))
  medians = {name: statistics.median(seconds[1:]) for name, seconds in runs.items()}
  print(f"{'setup':32} {'epoch s (median)':>17}  {'min':>6}  epochs after the first")
  for name, seconds in runs.items():
    print(f"{name:32} {medians[name]:17.2f}  {min(seconds[1:]):6.2f}  {' '.join(f'{s:.2f}' for s in seconds[1:])}")
  ours_1, fit_1 = medians["ours_steps_per_loop_1"], medians["fit_steps_per_execution_1"]
  ratios = {"ours_1_over_fit_1": ours_1 / fit_1,
            f"ours_1_over_ours_{default}": ours_1 / medians[f"ours_steps_per_loop_{default}"],
            f"ours_1_over_ours_{args.steps}": ours_1 / medians[f"ours_steps_per_loop_{args.steps}"],
            f"ours_{args.steps}_over_fit_{args.steps}": medians[f"ours_steps_per_loop_{args.steps}"]
            / medians[f"fit_steps_per_execution_{args.steps}"]}
  # The fastest epochs too: on a shared machine other work only adds time (timeit's rule).
  fastest = {name: min(seconds[1:]) for name, seconds in runs.items()}
  ratios[f"ours_{args.steps}_over_fit_{args.steps}_fastest"] = (fastest[f"ours_steps_per_loop_{args.steps}"]
                                                                / fastest[f"fit_steps_per_execution_{args.steps}"])
  for name, value in ratios.items():
    print(f"{name:32} {value:17.2f}x")
  print(json.dumps({"rows": args.rows, "batch_size": args.batch_size, "epoch_seconds": medians, **ratios}))


if __name__ == "__main__":
  main()
