"""Where images become floats: on the host in tf.data (as before) or on the device in the step (as
now, trainer.steps.pixels), the CNN trained by the trainer's loop both ways, side by side in one run.

    python scripts/benchmark_pixels.py       # built-in shapes at 150x150, batch 32, 6 epochs, ~4 minutes

The built-in shapes (trainer.data.builtin: 600 images, 384 for training and 96 for validation at the
default splits) at --image_size, augmented as the trainer does, batch 32, under two strategies:
one_device (what --strategy=auto now picks on one GPU; here /cpu:0) and mirrored over 2 logical CPUs.
  host_float    the pipeline hands the loop float32 pixels (make_dataset without an input context)
  device_uint8  the pipeline hands the loop uint8 pixels, the step converts them on each replica
Each setup trains a fresh CNN; the setups take turns, one epoch each per round, so the load of other
work on a shared machine falls on all alike. An epoch is its training and validation pass; the first
(tracing) is left out, the median of the rest is shown, and the fastest; and the process's CPU
seconds per epoch (all its threads), which other work on a shared machine disturbs far less. On a CPU both ways copy
nothing over PCIe: this shows what the conversion in the step costs, not what a GPU saves (4x fewer
bytes per image copied to it). Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import distribution, loop  # noqa: E402
from trainer.cluster import Cluster  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.data import images  # noqa: E402
from trainer.models import MODELS, OPTIMIZERS  # noqa: E402
from trainer.state import TrainState  # noqa: E402


def epochs(prepared, strategy, floats, batch_size, count):
  """Yields (wall seconds, CPU seconds) of each epoch of the trainer's loop, fed floats or uint8."""
  make_dataset = prepared.make_dataset
  if floats:
    # Without an input context images.prepare hands out floats: the pipeline as it was.
    make_dataset = lambda split, size, context=None, epoch=0: prepared.make_dataset(split, size, None, epoch)
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model, optimizer = MODELS["cnn"](prepared.input_shape, prepared.num_outputs), OPTIMIZERS["cnn"](1e-3)
    optimizer.build(model.trainable_variables)
  parts = loop.Loop(model, optimizer, loop.cross_entropy, make_dataset, strategy, batch_size, steps_per_loop=10)
  state = TrainState()
  for _ in range(count):
    started, cpu = time.perf_counter(), time.process_time()
    loss, _ = parts.train_epoch(state)
    parts.end_epoch(state, loss, parts.validate(), 0.0, count)
    yield time.perf_counter() - started, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=6)
  args = parser.parse_args()
  alone = Cluster({}, "worker", 0, "none")
  # First: splitting the CPU must come before TensorFlow sets up its devices.
  strategies = {"one_device": distribution.make_strategy("one_device", alone, cpu_devices=2),
                "mirrored_2cpu": distribution.make_strategy("mirrored", alone, cpu_devices=2)}
  prepared = images.prepare(Config(model="cnn", image_size=args.image_size))
  setups = {f"{name}/{way}": epochs(prepared, strategy, way == "host_float", args.batch_size, args.epochs)
            for name, strategy in strategies.items() for way in ("host_float", "device_uint8")}
  runs = {name: [] for name in setups}
  for _ in range(args.epochs):
    for name, generator in setups.items():
      runs[name].append(next(generator))
  figures = {}
  for name, epochs_run in runs.items():
    wall, cpu = zip(*epochs_run[1:])
    figures[name] = {"median": statistics.median(wall), "fastest": min(wall), "cpu": statistics.median(cpu)}
  print(f"{'setup':28} {'epoch s (median)':>17} {'fastest':>8} {'CPU s (median)':>15}  epochs after the first")
  for name, epochs_run in runs.items():
    f = figures[name]
    print(f"{name:28} {f['median']:17.2f} {f['fastest']:8.2f} {f['cpu']:15.2f}  "
          f"{' '.join(f'{wall:.2f}' for wall, _ in epochs_run[1:])}")
  ratios = {f"{name}_uint8_over_float_{figure}":
            figures[f"{name}/device_uint8"][figure] / figures[f"{name}/host_float"][figure]
            for name in strategies for figure in ("median", "fastest", "cpu")}
  for name, value in ratios.items():
    print(f"{name:44} {value:5.2f}x")
  print(json.dumps({"image_size": args.image_size, "batch_size": args.batch_size, "epochs": figures, **ratios}))


if __name__ == "__main__":
  main()
