"""What the training call's per-step synchronisation costs: where its loss sums are reduced, and the
partial-batch handling of a finite dataset, side by side in one run.

    python scripts/benchmark_sync.py                    # mirrored over 2 logical CPUs, ~2 minutes
    python scripts/benchmark_sync.py --setup=workers    # 2 worker processes on 127.0.0.1, ~3 minutes

The dense network (trainer.models) on a synthetic table of 5 features, global batch 32, 100 steps
per call (--steps), each setup with a fresh model, taking turns call by call so the load of other
work on a shared machine falls on all alike. Per-step milliseconds are a call's wall time (the call
and the read of its result) over its steps; the first calls (tracing) are left out, the median of
the rest is shown, and the fastest call too.
  host        trainer.steps.Steps as it is: each step's [loss sum, count, stop] reduced with
              strategy.reduce, which lands them on the host's CPU (device_util.current() or
              /device:CPU:0 in tensorflow/python/distribute), the running total added there
  device      the same sums all-reduced inside the replica function and the first local replica's
              copy kept: on a GPU the running total would stay on GPU 0 until the call returns
  no_partial  `host` over a repeated (infinite) dataset: iterator.get_next_as_optional then skips
              its partial-batch handling (a cond on how many replicas got data, and under
              multi-worker a cross-worker all-reduce of that count, tensorflow/python/distribute/
              input_lib.py _calculate_replicas_with_values); the upper bound of what dropping the
              final partial batch could save, if the loop also knew each epoch's steps in advance
On CPUs the devices share the host's memory: no figure here includes a PCIe round trip.
Prints a table, then one line of JSON (worker 0's, for --setup=workers).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import distribution, loop, steps  # noqa: E402
from trainer.cluster import Cluster  # noqa: E402
from trainer.models import MODELS, OPTIMIZERS  # noqa: E402

FEATURES = 5


class DeviceSums(steps.Steps):
  """Steps whose per-step sums are all-reduced in the replica function and kept on a device."""

  def _summed_step(self, inputs, targets, stop_flag):
    return tf.distribute.get_replica_context().all_reduce("SUM", self._train_step(inputs, targets, stop_flag))

  def _train(self, iterator, total, stop_flag):
    before, step, count, finite = total, tf.zeros([3]), tf.constant(0.0), tf.constant(0.0)
    for _ in tf.range(self.steps_per_loop):
      batch = iterator.get_next_as_optional()
      if not batch.has_value():
        break
      inputs, targets = batch.get_value()
      step = self.strategy.experimental_local_results(
          self.strategy.run(self._summed_step, (inputs, targets, stop_flag)))[0]
      total += step[:2]
      count += 1
      finite += tf.cast(tf.math.is_finite(total[0]), tf.float32)
    return total, tf.concat([total - before, [step[2], count, tf.where(finite < count, finite + 1, 0.0)]], 0)


def dataset(batches, global_batch, repeat):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batches * global_batch, FEATURES)).astype(np.float32)
  y = x.sum(axis=1).astype(np.float32)

  def make(context):
    examples = tf.data.Dataset.from_tensor_slices((x, y)).shard(context.num_input_pipelines, context.input_pipeline_id)
    examples = examples.batch(context.get_per_replica_batch_size(global_batch))
    return examples.repeat() if repeat else examples
  return make


class Setup:
  """One variant: a fresh model and its Steps, called one epoch (or, repeated, `steps` steps) at a time."""

  def __init__(self, strategy, kind, steps_per_loop, global_batch):
    with strategy.scope():
      self.model = MODELS["dense"]((FEATURES,))
      self.optimizer = OPTIMIZERS["dense"](1e-3)
      self.optimizer.build(self.model.trainable_variables)
    self.strategy, self.repeat = strategy, kind == "no_partial"
    make = dataset(steps_per_loop, global_batch, self.repeat)
    self.data = strategy.distribute_datasets_from_function(make)
    self.steps = (DeviceSums if kind == "device" else steps.Steps)(
        self.model, self.optimizer, loop.squared_error, strategy, steps_per_loop)
    self.iterator = iter(self.data) if self.repeat else None
    self.flag = tf.constant(0.0)

  def call(self):
    """Seconds per step of one call of steps_per_loop steps, its result read."""
    iterator = self.iterator or iter(self.data)
    started = time.perf_counter()
    total, sums = self.steps.train(iterator, tf.zeros([2]), self.flag)
    result = sums.numpy()
    seconds = time.perf_counter() - started
    assert int(result[steps.STEPS]) == self.steps.steps_per_loop, result
    return seconds / self.steps.steps_per_loop


def measure(strategy, calls, steps_per_loop, global_batch):
  setups = {kind: Setup(strategy, kind, steps_per_loop, global_batch) for kind in ("host", "device", "no_partial")}
  runs = {kind: [] for kind in setups}
  for _ in range(calls):
    for kind, setup in setups.items():
      runs[kind].append(setup.call() * 1000)
  return {kind: ms[2:] for kind, ms in runs.items()}  # the first two: tracing and warm-up


def report(setup, runs, args):
  medians = {kind: statistics.median(ms) for kind, ms in runs.items()}
  print(f"{setup}: dense, global batch {args.batch_size}, {args.steps} steps per call, {len(runs['host'])} calls")
  print(f"{'variant':12} {'ms/step (median)':>17} {'fastest':>8} {'vs host':>8}")
  for kind, ms in runs.items():
    print(f"{kind:12} {medians[kind]:17.3f} {min(ms):8.3f} {medians[kind] / medians['host']:7.2f}x")
  print(json.dumps({"setup": setup, "ms_per_step": medians, "fastest": {k: min(v) for k, v in runs.items()}}))


def free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setup", choices=("mirrored", "workers"), default="mirrored")
  parser.add_argument("--calls", type=int, default=30)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set for the worker processes
  args = parser.parse_args()
  if args.setup == "workers" and args.worker is None:
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = [subprocess.Popen([sys.executable, *sys.argv, f"--worker={i}"], env={
        **os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
        stdout=None if i == 0 else subprocess.DEVNULL) for i in range(2)]
    sys.exit(max(worker.wait() for worker in workers))
  if args.setup == "workers":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
  else:
    strategy = distribution.make_strategy("mirrored", Cluster({}, "worker", 0, "none"), cpu_devices=2)
  runs = measure(strategy, args.calls, args.steps, args.batch_size)
  if not args.worker:
    report("2 workers on 127.0.0.1" if args.setup == "workers" else "mirrored, 2 logical CPUs", runs, args)


if __name__ == "__main__":
  main()
