"""TFRecord shards on gs://: streamed a few at a time (the trainer's way) against downloaded whole first.

    python scripts/benchmark_streaming.py     # 5,000 150x150 JPEGs in 1 MiB shards, 50 ms a request, ~3 minutes

Cloud Storage is simulated: the storage emulator on 127.0.0.1 (scripts/gcs_emulator.py) behind a
proxy that adds --latency_ms to every request (scripts/latency_proxy.py), as the real service's
round trip would; its bandwidth is the loopback's, not the service's. The shards are written from
generated JPEGs (scripts/benchmark_input.py's) with trainer/data/image_tfrecords.py and uploaded.
Each way then reads every image once, decoded and resized to 150x150 as the trainer's first pass
does (trainer/data/images.py), and reports images per second (from the first request to the last
image, a download included) and the peak local disk it used:
  streamed        image_tfrecords.read on the gs:// folder: each shard downloaded ahead by a thread,
                  at most three on disk, each removed once read (trainer/transfer.py streamed); the
                  peak is measured after every download
  download_first  every shard downloaded into a local folder (trainer/transfer.py download_dir),
                  then read from there: what the trainer did before; the peak is the whole set
The two alternate --rounds times; the table gives the medians. Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

import benchmark_input  # noqa: E402
from gcs_emulator import GcsEmulator  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402
from trainer import storage, transfer  # noqa: E402
from trainer.data import image_folder, image_tfrecords, images  # noqa: E402


def folder_bytes(folder):
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def read_all(location, size):
  """Images read from a shard folder, decoded and resized, batch by batch."""
  dataset = images.resized(image_tfrecords.read(location)[0], size).batch(64).prefetch(tf.data.AUTOTUNE)
  return sum(len(labels) for _, labels in dataset)


def streamed(remote, size):
  peak = [0]
  original = transfer._downloaded

  def measured(folder):  # after each download: the most the stream's folder holds
    peak[0] = max(peak[0], folder_bytes(folder))
    original(folder)

  transfer._downloaded = measured
  try:
    start = time.perf_counter()
    count = read_all(remote, size)
    return count / (time.perf_counter() - start), peak[0]
  finally:
    transfer._downloaded = original


def download_first(remote, size, scratch):
  local = os.path.join(scratch, "downloaded")
  start = time.perf_counter()
  transfer.download_dir(remote, local)
  count = read_all(local, size)
  rate, peak = count / (time.perf_counter() - start), folder_bytes(local)
  shutil.rmtree(local)
  return rate, peak


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=5000)
  parser.add_argument("--image_size", type=int, default=150)
  parser.add_argument("--shard_mb", type=float, default=1.0, help="target shard size")
  parser.add_argument("--latency_ms", type=float, default=50.0, help="added to every storage request")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as scratch:
    folder = os.path.join(scratch, "jpegs")
    benchmark_input.write_images(folder, args.images, args.image_size, seed=0)
    metadata = image_tfrecords.write_shards(image_folder.scan(folder), os.path.join(scratch, "shards"),
                                            shard_bytes=args.shard_mb * 2**20)
    emulator = GcsEmulator(os.path.join(scratch, "gcs"), os.path.join(scratch, "emulator.log")).start()
    proxy = LatencyProxy(emulator.host, args.latency_ms / 1000)
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    remote = emulator.new_bucket() + "/shards"
    for name in os.listdir(os.path.join(scratch, "shards")):
      storage.upload_file(os.path.join(scratch, "shards", name), storage.join(remote, name))
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.host
    total = folder_bytes(os.path.join(scratch, "shards"))
    results = {"streamed": [], "download_first": []}
    try:
      for _ in range(args.rounds):
        results["streamed"].append(streamed(remote, args.image_size))
        results["download_first"].append(download_first(remote, args.image_size, scratch))
    finally:
      proxy.stop()
      emulator.stop()

  rates = {way: statistics.median(rate for rate, _ in rows) for way, rows in results.items()}
  peaks = {way: max(peak for _, peak in rows) for way, rows in results.items()}
  shards = len(metadata["shards"])
  print(f"{args.images:,} JPEGs of {args.image_size}x{args.image_size}, {shards} shards, {total / 2**20:.1f} MiB in "
        f"all; {args.latency_ms:g} ms a storage request; median of {args.rounds} rounds; {os.cpu_count()} CPUs")
  print(f"{'way':<15} {'img/s':>8} {'peak disk MiB':>14}")
  for way in results:
    print(f"{way:<15} {rates[way]:>8,.0f} {peaks[way] / 2**20:>14.1f}")
  print(f"streamed vs download_first: {rates['streamed'] / rates['download_first']:.2f}x the images per second, "
        f"{peaks['streamed'] / peaks['download_first']:.2f}x the peak disk")
  print(json.dumps({"images": args.images, "image_size": args.image_size, "shards": shards,
                    "total_mib": round(total / 2**20, 1), "latency_ms": args.latency_ms, "rounds": args.rounds,
                    "img_per_s": {way: round(rate, 1) for way, rate in rates.items()},
                    "peak_disk_mib": {way: round(peak / 2**20, 1) for way, peak in peaks.items()}}))


if __name__ == "__main__":
  main()
