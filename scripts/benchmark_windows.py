"""Windowing side by side on one long series: the tutorial's loop, Keras' helper, ours.

    python scripts/benchmark_windows.py            # 3,000,000 points, window 60, batch 32

Each method runs in a fresh process, so its peak memory is its own: the peak resident memory
above what the process held before the method started (Linux: VmHWM, reset through
/proc/self/clear_refs). An epoch is one pass over every window in shuffled batches; the
tutorial's is numpy fancy indexing on its prebuilt arrays (the cheapest possible); the two
tf.data pipelines are drained by Dataset.reduce, so no Python per-batch overhead is counted
against them either. Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = ("tutorial", "keras", "ours")


def status_mb(field):
  with open("/proc/self/status") as f:
    return int(f.read().split(f"{field}:")[1].split()[0]) / 1024


def measure(method, points, window, batch_size):
  # Imports first: only what the method itself allocates counts.
  import keras
  import numpy as np

  from trainer.data.timeseries import window_dataset

  # A price series as pandas reads it from a CSV: float64.
  series = 100 + np.cumsum(np.random.default_rng(0).standard_normal((points, 1)), axis=0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
  before = status_mb("VmRSS")
  start = time.perf_counter()
  if method == "tutorial":
    # As the tutorial did: MinMax-scale (sklearn keeps float64), a list of 60-step slices, np.array.
    scaled = (series - series.min()) / (series.max() - series.min())
    x, y = [], []
    for i in range(window, points):
      x.append(scaled[i - window:i, 0])
      y.append(scaled[i, 0])
    x, y = np.array(x), np.array(y)
    build = time.perf_counter() - start
    start = time.perf_counter()
    order = np.random.default_rng(1).permutation(len(y))
    batches = 0
    for i in range(0, len(order), batch_size):
      rows = order[i:i + batch_size]
      x[rows], y[rows]
      batches += 1
  else:
    if method == "keras":
      dataset = keras.utils.timeseries_dataset_from_array(
          series[:-1], series[window:, 0], sequence_length=window, batch_size=batch_size, shuffle=True, seed=1)
    else:
      dataset = window_dataset(series, window, points, window, batch_size, shuffle_seed=(1, 0))
    build = time.perf_counter() - start
    start = time.perf_counter()
    batches = int(dataset.reduce(0, lambda count, _: count + 1))
  epoch = time.perf_counter() - start
  return {"method": method, "build_s": round(build, 2), "epoch_s": round(epoch, 2), "batches": batches,
          "peak_mb": round(status_mb("VmHWM") - before, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=3_000_000)
  parser.add_argument("--window", type=int, default=60)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one measurement, in a child
  args = parser.parse_args()
  if args.method:
    print(json.dumps(measure(args.method, args.points, args.window, args.batch_size)))
    return
  results = {}
  for method in METHODS:
    child = subprocess.run([sys.executable, __file__, f"--method={method}", f"--points={args.points}",
                            f"--window={args.window}", f"--batch_size={args.batch_size}"],
                           capture_output=True, text=True, check=True)
    results[method] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"measured {method}", file=sys.stderr)
  print(f"{args.points:,} points, window {args.window}, batch {args.batch_size}")
  print(f"{'method':<10} {'build s':>9} {'epoch s':>9} {'batches':>9} {'peak MB':>9}")
  for r in results.values():
    print(f"{r['method']:<10} {r['build_s']:>9.2f} {r['epoch_s']:>9.2f} {r['batches']:>9,} {r['peak_mb']:>9.1f}")
  ours, tutorial = results["ours"], results["tutorial"]
  summary = {"results": list(results.values()),
             "ours_epoch_over_tutorial_build": round(ours["epoch_s"] / tutorial["build_s"], 3),
             "ours_peak_over_tutorial_peak": round(ours["peak_mb"] / tutorial["peak_mb"], 4)}
  print(f"ours: one epoch takes {summary['ours_epoch_over_tutorial_build']:.2f}x the tutorial's build alone, "
        f"with {summary['ours_peak_over_tutorial_peak']:.3f}x its peak memory")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
