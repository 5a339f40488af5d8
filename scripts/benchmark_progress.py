"""What watching a job costs: the same training side by side without and with progress lines and
TensorBoard summaries (trainer.summaries.Watch), at their defaults and far more often.

    python scripts/benchmark_progress.py               # dense on a 100,000-row table, batch 32; ~8 minutes here

The job is assembled as trainer/train.py does (DATA["dense"].prepare on a generated table of
--rows rows, MODELS and OPTIMIZERS, optimizer.build before training) and trained by
trainer.loop.fit for --epochs epochs per run, from the same seed, in three modes:
  off        on_step and on_epoch None: no progress, no summaries (the loop as it was)
  default    Watch as trainer.train makes it at the flags' defaults: a progress line and the
             interval summaries about every 30 s, the epoch summaries at every epoch's end
  every_50   --log_every_steps=50: a line and four scalars every 50 steps (40 an epoch here),
             to show what one interval costs
Repeats rotate the order of the modes, so a change in the machine's load falls on all; read the
medians. Columns:
  training s      loop.fit's wall time (validation included)
  overhead %      against off, whole runs: on a shared machine other work moves whole runs by far
                  more than 1%, so read the next column
  hooks %         the time spent in the Watch's on_step and on_epoch (which the loop waits for:
                  they run on its thread, and reading the learning rate waits for the device),
                  over the run's training time: the cost itself, without the noise of comparing
                  two whole runs
  CPU s, CPU overhead %   the same in this process's CPU seconds (every thread) One untimed warm-up
run (watched every 50 steps) traces the step functions and summary ops first. Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging  # noqa: E402

from trainer import loop, summaries  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.models import MODELS, OPTIMIZERS  # noqa: E402
from trainer.train import DATA  # noqa: E402

MODES = {"off": None, "default": 0, "every_50": 50}


def table(path, rows):
  rng = np.random.default_rng(0)
  frame = pd.DataFrame(rng.standard_normal((rows, 5)), columns=[f"x{i}" for i in range(5)])
  frame["y"] = 100 + frame.to_numpy() @ np.array([30.0, -20.0, 10.0, 0.0, 0.0]) + 12.3 * rng.standard_normal(rows)
  frame.to_csv(path, index=False)


def run(config, prepared, every, log_dir):
  """loop.fit's (wall, CPU, in the hooks) seconds for one run; every: None without watching, else --log_every_steps."""
  keras.utils.set_random_seed(config.seed)
  model = MODELS["dense"](prepared.input_shape)
  optimizer = OPTIMIZERS["dense"](config.learning_rate)
  optimizer.build(model.trainable_variables)
  hooks, spent = {}, [0.0]
  if every is not None:
    watch = summaries.Watch(Config(**{**vars(config), "log_every_steps": every}), log_dir, optimizer, prepared.kind,
                            prepared.preprocessing, 0, summaries.steps_per_epoch(prepared, 32))
    hooks = {"on_step": timed(watch.on_step, spent), "on_epoch": timed(watch.on_epoch, spent)}
  wall, cpu = time.perf_counter(), time.process_time()
  loop.fit(model, optimizer, loop.squared_error, prepared.make_dataset, tf.distribute.get_strategy(),
           config.batch_size, config.epochs, config.patience, **hooks)
  seconds = time.perf_counter() - wall, time.process_time() - cpu, spent[0]
  if every is not None:
    watch.close()
  return seconds


def timed(hook, spent):
  def call(*args):
    started = time.perf_counter()
    hook(*args)
    spent[0] += time.perf_counter() - started
  return call


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=100_000)
  parser.add_argument("--epochs", type=int, default=4)  # over 30 s a run: the default mode logs a line
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)  # the progress lines are formatted and handed to absl either way
  with tempfile.TemporaryDirectory() as folder:
    table(os.path.join(folder, "table.csv"), args.rows)
    config = Config(model="dense", data=os.path.join(folder, "table.csv"), target_column="y", epochs=args.epochs,
                    patience=args.epochs)
    prepared = DATA["dense"].prepare(config)
    run(config, prepared, 50, os.path.join(folder, "logs-warm-up"))  # traces steps and summaries once
    times = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
      order = list(MODES)[repeat % len(MODES):] + list(MODES)[:repeat % len(MODES)]
      for mode in order:
        times[mode].append(run(config, prepared, MODES[mode], os.path.join(folder, f"logs-{mode}-{repeat}")))
        wall, cpu, hooks = times[mode][-1]
        print(f"repeat {repeat + 1} {mode:<9} {wall:7.2f} s  {cpu:7.2f} CPU s  {hooks:6.3f} s in the hooks",
              file=sys.stderr, flush=True)
  medians = {mode: [statistics.median(t[k] for t in runs) for k in (0, 1)] +
             [statistics.median(100 * t[2] / t[0] for t in runs)] for mode, runs in times.items()}
  off_wall, off_cpu, _ = medians["off"]
  print(f"{'mode':<10} {'training s':>10} {'overhead %':>10} {'hooks %':>8} {'CPU s':>8} {'CPU overhead %':>14}")
  result = {"rows": args.rows, "epochs": args.epochs, "repeats": args.repeats, "modes": {}}
  for mode, (wall, cpu, hooks) in medians.items():
    overhead, cpu_overhead = 100 * (wall / off_wall - 1), 100 * (cpu / off_cpu - 1)
    print(f"{mode:<10} {wall:>10.2f} {overhead:>10.2f} {hooks:>8.3f} {cpu:>8.2f} {cpu_overhead:>14.2f}")
    result["modes"][mode] = {"training_s": round(wall, 3), "overhead_pct": round(overhead, 2),
                             "hooks_pct": round(hooks, 3), "cpu_s": round(cpu, 3),
                             "cpu_overhead_pct": round(cpu_overhead, 2)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
