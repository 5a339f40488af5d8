"""Images beyond memory: the CNN's training input under each --cache policy, on two set sizes.

    python scripts/benchmark_cache.py          # 5,000 and 20,000 150x150 JPEGs, ~15 minutes on 2 cores

Writes two folders of JPEGs (scripts/benchmark_input.py's random shapes), then, for each set and each
policy (memory, disk, none), starts a fresh process that prepares the data as the trainer does
(trainer/data/images.py, with the tutorial's augmentations) and reads the training batches of
--epochs epochs as the training loop would, batch by batch. It reports the images per second of
each epoch and the process's peak resident memory (ru_maxrss: what a container's memory limit
counts), and the tutorial's ImageDataGenerator on the smaller set for scale. Set sizes stand in
for sets larger than memory: --memory_budget_mb makes the larger set "too big" for `auto`, which
then picks the disk cache (shown by the auto row). A fresh process per row, so no row inherits
another's memory. Prints a table, the issue's three checks, then one line of JSON.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZES = (5_000, 20_000)
POLICIES = ("memory", "disk", "none")


def measure(args):
  """In the child: prepare, then time each epoch's batches; prints one JSON line."""
  import tensorflow as tf
  from absl import logging

  from trainer import train
  from trainer.config import Config
  logging.set_verbosity(logging.WARNING)
  config = Config(model="cnn", data=args.folder, cache=args.cache, memory_budget_mb=args.memory_budget_mb,
                  image_size=args.image_size, batch_size=args.batch_size)
  start = time.perf_counter()
  prepared = train.DATA["cnn"].prepare(config)
  prepare_s = time.perf_counter() - start
  rates = []
  for epoch in range(args.epochs):
    count, start = 0, time.perf_counter()
    # With an input context, as the training loop asks: uint8 batches, converted on the device.
    for pixels, _ in prepared.make_dataset("train", args.batch_size, tf.distribute.InputContext(), epoch):
      count += len(pixels)
    rates.append(count / (time.perf_counter() - start))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  print(json.dumps({"prepare_s": prepare_s, "img_per_s": rates, "peak_rss_mib": peak,
                    "cache": prepared.summary.get("cache")}))


def child(folder, cache, args, budget=0):
  command = [sys.executable, os.path.abspath(__file__), "--measure", f"--folder={folder}", f"--cache={cache}",
             f"--memory_budget_mb={budget}", f"--epochs={args.epochs}", f"--image_size={args.image_size}",
             f"--batch_size={args.batch_size}"]
  done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  if done.returncode:
    raise SystemExit(f"{cache} on {folder}: exit {done.returncode}\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="image counts of the two sets")
  parser.add_argument("--image_size", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--epochs", type=int, default=3, help="epochs read per row; the first fills a cache")
  parser.add_argument("--memory_budget_mb", type=int, default=1000,
                      help="the auto row's budget: between the two sets' decoded sizes")
  parser.add_argument("--folder", help="(child) the image folder")
  parser.add_argument("--cache", default="auto", help="(child) the policy")
  parser.add_argument("--measure", action="store_true", help="(child) measure one policy on --folder")
  args = parser.parse_args()
  if args.measure:
    return measure(args)

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import benchmark_input
  sizes = [int(n) for n in args.sizes.split(",")]
  rows = {}
  with tempfile.TemporaryDirectory() as root:
    folders = {}
    for n in sizes:
      folders[n] = os.path.join(root, str(n))
      start = time.perf_counter()
      benchmark_input.write_images(folders[n], n, args.image_size, seed=n)
      print(f"wrote {n:,} JPEGs in {time.perf_counter() - start:.0f} s", flush=True)
    idg, _ = benchmark_input.measure_imagedatagenerator(
        folders[sizes[0]], argparse.Namespace(image_size=args.image_size, batch_size=args.batch_size, seed=0,
                                              batches=100))
    for n in sizes:
      for cache in POLICIES:
        rows[(n, cache)] = child(folders[n], cache, args)
        print(f"{n:,} images, {cache}: {rows[(n, cache)]}", flush=True)
    rows[(sizes[-1], "auto")] = child(folders[sizes[-1]], "auto", args, budget=args.memory_budget_mb)

  print(f"\n{args.image_size}x{args.image_size} JPEGs, batch {args.batch_size}, the tutorial's augmentations, "
        f"{args.epochs} epochs a row, {os.cpu_count()} CPUs; ImageDataGenerator: {idg:,.0f} img/s")
  print(f"{'images':>7} {'cache':<14} {'prepare s':>9} {'epoch 1':>8} {'later':>8} {'x IDG':>6} {'peak MiB':>9}")
  for (n, cache), row in rows.items():
    later = min(row["img_per_s"][1:] or row["img_per_s"])
    name = cache if cache != "auto" else f"auto->{row['cache']}"
    print(f"{n:>7,} {name:<14} {row['prepare_s']:>9.1f} {row['img_per_s'][0]:>8,.0f} {later:>8,.0f} "
          f"{later / idg:>6.1f} {row['peak_rss_mib']:>9,.0f}")
  small, large = sizes[0], sizes[-1]
  growth = {c: rows[(large, c)]["peak_rss_mib"] / rows[(small, c)]["peak_rss_mib"] - 1 for c in POLICIES}
  later = {key: min(row["img_per_s"][1:] or row["img_per_s"]) for key, row in rows.items()}
  disk_vs_memory = min(later[(n, "disk")] / later[(n, "memory")] for n in sizes)
  worst_vs_idg = min(later.values()) / idg
  print(f"peak memory growth {small:,} -> {large:,} images: "
        + ", ".join(f"{c} {100 * g:+.0f}%" for c, g in growth.items()) + " (target: disk and none < +10%)")
  print(f"disk vs memory from the second epoch on: {disk_vs_memory:.2f}x (target >= 0.5)")
  print(f"slowest policy vs ImageDataGenerator: {worst_vs_idg:.1f}x (target >= 4)")
  print(json.dumps({"image_size": args.image_size, "batch_size": args.batch_size, "epochs": args.epochs,
                    "cpus": os.cpu_count(), "imagedatagenerator_img_per_s": round(idg, 1),
                    "rows": {f"{n}/{c}": row for (n, c), row in rows.items()},
                    "peak_growth": {c: round(g, 3) for c, g in growth.items()},
                    "disk_vs_memory": round(disk_vs_memory, 2), "slowest_vs_idg": round(worst_vs_idg, 1)}))


if __name__ == "__main__":
  main()
