"""One training job under four distribution setups, side by side: steps per second and time per epoch.

    python scripts/benchmark_distribution.py     # gru, window 60, built-in series, batch 32, 8 epochs, ~3 minutes

The same job (model, data, seed, global --batch_size, --epochs with --patience equal to it, so no
early stop) runs as a real trainer process, started fresh each time, in four setups:
  one_device     python -m trainer.task ... --strategy=default
  mirrored_2cpu  python -m trainer.task ... --strategy=mirrored --cpu_devices=2   (2 logical CPUs)
  workers_1      python scripts/local_cluster.py --workers=1 -- ... --strategy=multi_worker_mirrored
  workers_2      python scripts/local_cluster.py --workers=2 -- ... --strategy=multi_worker_mirrored
Epoch seconds are the trainer's own (its `epoch N/E ... (S s, R replicas)` log lines, worker 0's in a
cluster; one decimal, so about +-1 ms per step at 59 steps): the training pass and the validation pass, as the
trainer times them. The first epoch (tracing) is left out of the mean, and of the median and
standard deviation, shown because two processes on shared cores are noisy. Steps per epoch are
the training rows (report.json, data.split.train.rows) over the global batch, rounded up; steps/s
and examples/s are training steps and rows per second of epoch time. The collective-op overhead
estimate is (two-worker epoch - one-worker epoch) / steps per epoch: the cost per step of
all-reducing gradients and loss sums between two processes over loopback, with the same per-step
compute in total. On a CPU with fewer cores than replicas, the replicas share cores: read the
speedups with that in mind. Prints a table, then one line of JSON.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
# name: (how it runs, the command before the trainer's flags, flags of its own).
SETUPS = {
    "one_device": ("1 device, default strategy", [sys.executable, "-m", "trainer.task"], ["--strategy=default"]),
    "mirrored_2cpu": ("mirrored, 2 logical CPUs", [sys.executable, "-m", "trainer.task"],
                      ["--strategy=mirrored", "--cpu_devices=2"]),
    "workers_1": ("1 local worker, multi-worker", [sys.executable, os.path.join(SCRIPTS, "local_cluster.py"),
                                                   "--workers=1", "--"], ["--strategy=multi_worker_mirrored"]),
    "workers_2": ("2 local workers, multi-worker", [sys.executable, os.path.join(SCRIPTS, "local_cluster.py"),
                                                    "--workers=2", "--"], ["--strategy=multi_worker_mirrored"]),
}
# "[worker 0] I1128 ... loop.py:96] epoch 3/10  loss 0.9778  val_loss 0.8465  (2.7 s, 2 replicas)"
EPOCH_LINE = re.compile(r"^(?:\[(?:worker|chief) ?(\d*)\] )?.*\bepoch (\d+)/(\d+)  loss .*"
                        r"\(([\d.]+) s, (\d+) replicas?\)$")


def epoch_seconds(stderr):
  """{epoch: seconds} from the trainer's log, worker 0's (or the chief's) lines in a cluster."""
  seconds = {}
  for line in stderr.splitlines():
    match = EPOCH_LINE.match(line.strip())
    if match and match.group(1) in (None, "", "0"):
      seconds[int(match.group(2))] = float(match.group(4))
  return seconds


def measure(name, trainer_flags, epochs):
  label, command, own_flags = SETUPS[name]
  with tempfile.TemporaryDirectory(prefix=f"benchmark-{name}-") as tmp:
    job_dir = os.path.join(tmp, "job")
    argv = command + trainer_flags + own_flags + [f"--job_dir={job_dir}"]
    start = time.perf_counter()
    child = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if child.returncode:
      sys.stderr.write(child.stderr[-4000:])
      sys.exit(f"benchmark_distribution: {name} exited with code {child.returncode}: {' '.join(argv)}")
    with open(os.path.join(job_dir, "report.json")) as f:
      report = json.load(f)
  seconds = epoch_seconds(child.stderr)
  if sorted(seconds) != list(range(1, epochs + 1)):
    sys.exit(f"benchmark_distribution: {name}: found epochs {sorted(seconds)} in the log, expected 1..{epochs}")
  timed = [seconds[e] for e in range(2, epochs + 1)]  # epoch 1 traces the step functions
  batch = report["global_batch_size"]
  rows = report["data"]["split"]["train"]["rows"]
  steps = math.ceil(rows / batch)
  epoch = statistics.mean(timed)
  return {"setup": name, "label": label, "strategy": report["strategy"], "workers": report["num_workers"],
          "replicas": report["num_replicas"], "global_batch": batch,
          "per_replica_batch": report["per_replica_batch_size"], "train_rows": rows, "steps_per_epoch": steps,
          "first_epoch_s": seconds[1], "epoch_s": round(epoch, 3), "epoch_s_median": round(statistics.median(timed), 3),
          "epoch_s_sd": round(statistics.stdev(timed), 3), "epochs_s": [seconds[e] for e in sorted(seconds)],
          "steps_per_s": round(steps / epoch, 2), "examples_per_s": round(rows / epoch, 1),
          "ms_per_step": round(1000 * epoch / steps, 2), "process_s": round(wall, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("gru", "lstm", "dense"), default="gru")
  parser.add_argument("--window", type=int, default=60, help="gru, lstm: time steps per window.")
  parser.add_argument("--batch_size", type=int, default=32, help="Global batch, the same in every setup.")
  parser.add_argument("--epochs", type=int, default=8, help="Epochs per setup; the first is not averaged.")
  parser.add_argument("--setups", default=",".join(SETUPS), help=argparse.SUPPRESS)  # a subset, for a quick look
  args = parser.parse_args()
  if args.epochs < 3:
    parser.error("--epochs must be at least 3: the first is left out and a spread needs two more")
  if args.batch_size % 2:
    parser.error("--batch_size must be even: two replicas split it")
  names = args.setups.split(",")
  unknown = [n for n in names if n not in SETUPS]
  if unknown:
    parser.error(f"unknown setups {unknown}; choose from {list(SETUPS)}")
  trainer_flags = [f"--model={args.model}", f"--batch_size={args.batch_size}", f"--epochs={args.epochs}",
                   f"--patience={args.epochs}"]
  if args.model != "dense":
    trainer_flags.append(f"--window={args.window}")

  results = {}
  for name in names:
    results[name] = measure(name, trainer_flags, args.epochs)
    r = results[name]
    print(f"measured {name}: {r['epoch_s']:.2f} s/epoch over epochs 2-{args.epochs} "
          f"(epoch 1: {r['first_epoch_s']:.1f} s), process {r['process_s']:.0f} s", file=sys.stderr)
  base = results.get("one_device")
  for r in results.values():
    r["speedup_vs_one_device"] = round(base["epoch_s"] / r["epoch_s"], 3) if base else None

  first = next(iter(results.values()))
  print(f"{' '.join(trainer_flags)}: {first['train_rows']:,} training rows, global batch {first['global_batch']}, "
        f"{first['steps_per_epoch']} steps per epoch; mean of epochs 2-{args.epochs}")
  print(f"{'setup':<14} {'replicas':>8} {'epoch s':>8} {'sd':>6} {'median':>7} {'steps/s':>8} {'examples/s':>11} "
        f"{'ms/step':>8} {'vs 1 dev':>9}")
  for r in results.values():
    ratio = f"{r['speedup_vs_one_device']:.2f}x" if base else "-"
    print(f"{r['setup']:<14} {r['replicas']:>8} {r['epoch_s']:>8.2f} {r['epoch_s_sd']:>6.2f} "
          f"{r['epoch_s_median']:>7.2f} {r['steps_per_s']:>8.1f} {r['examples_per_s']:>11,.0f} "
          f"{r['ms_per_step']:>8.1f} {ratio:>9}")
  summary = {"job": trainer_flags, "epochs_averaged": args.epochs - 1, "results": list(results.values())}
  if "workers_1" in results and "workers_2" in results:
    one, two = results["workers_1"], results["workers_2"]
    overhead = 1000 * (two["epoch_s"] - one["epoch_s"]) / two["steps_per_epoch"]
    from_medians = 1000 * (two["epoch_s_median"] - one["epoch_s_median"]) / two["steps_per_epoch"]
    summary["collective_overhead_ms_per_step"] = round(overhead, 2)
    summary["collective_overhead_ms_per_step_from_medians"] = round(from_medians, 2)
    print(f"collective-op overhead estimate: ({two['epoch_s']:.2f} - {one['epoch_s']:.2f} s) / "
          f"{two['steps_per_epoch']} steps = {overhead:.1f} ms per step (two workers over one, same global batch); "
          f"from the medians {from_medians:.1f} ms")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
