"""A check of a GPU host (about two minutes) before jobs run on it: prints one table, exits 1 if any check failed.

    python scripts/gpu_smoke.py            # on the host (or in the image) that will train
    python scripts/gpu_smoke.py --quick    # 24x24 images, one epoch, the CNN only mixed, the LSTM only under XLA

Each check is a fresh `python -m trainer.task` (or, for bfloat16, a bare Keras step), so each sees the
GPUs as a job would and none holds GPU memory another needs:
  devices        TensorFlow's build (CUDA, cuDNN) and the GPUs it sees
  lstm           one epoch of the LSTM on 120 days (cuDNN's recurrent kernels on a GPU)
  lstm xla       the same with --jit_compile: the trainer must drop XLA and say so in one line
  dense xla      the dense model with --jit_compile: XLA compiles the step
  cnn b<N>       the CNN under MirroredStrategy on every GPU, float32, N images per replica (32, 256), without
                 augmentation (the GPU's speed, not the host's): steps/s
  cnn mixed      the CNN with --mixed_precision: float16 with loss scaling on GPUs (bfloat16 on CPUs)
  cnn bfloat16   GPUs only: one Keras step of the CNN in mixed_bfloat16 under MirroredStrategy
  sigterm        the dense model stopped by SIGTERM after its first checkpoint exits 143, and the command
                 (with --epochs=1) resumes from the checkpoint it saved
Without a GPU the script says so, runs the checks the CPU can (mirrored over two logical CPUs) and
exits 0 unless one of them fails.
"""

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # a check that takes longer has hung
NOT_FOR_THIS_MODEL = "--jit_compile: not for this model"


class Failed(Exception):
  """A check's failure, in one line for the table, and the output that explains it."""

  def __init__(self, line, output=""):
    super().__init__(line)
    self.output = output


def devices():
  """(GPU names, the build and the GPUs in words). Physical devices only: this process takes no GPU memory."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from trainer import devices as trainer_devices
  gpus, build = trainer_devices.summary()
  return gpus, f"{build}; {len(gpus)} GPU(s){': ' if gpus else ''}{', '.join(gpus)}"


def trainer(folder, name, *flags):
  """Runs the trainer into folder/name; returns (its stderr, its report). Fails on a non-zero exit."""
  job_dir = os.path.join(folder, name)
  done = subprocess.run([sys.executable, "-m", "trainer.task", f"--job_dir={job_dir}", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  if done.returncode:
    raise Failed(f"exit {done.returncode}: {last_line(done.stderr)}", done.stderr)
  with open(os.path.join(job_dir, "report.json")) as f:
    return done.stderr, json.load(f)


def last_line(text):
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1][-200:] if lines else "(no output)"


def prices(folder):
  """120 business days of prices: a few LSTM steps."""
  rng = np.random.default_rng(0)
  path = os.path.join(folder, "prices.csv")
  pd.DataFrame({"Date": pd.bdate_range("2015-01-01", periods=120).strftime("%Y-%m-%d"),
                "Close": (50 * np.exp(np.cumsum(0.015 * rng.standard_normal(120)))).round(3)}).to_csv(path, index=False)
  return ["--model=lstm", f"--data={path}", "--target_column=Close", "--date_column=Date", "--window=5", "--epochs=1"]


def lstm(folder, jit):
  stderr, _ = trainer(folder, f"lstm-{jit}", *prices(folder), *(["--jit_compile"] if jit else []))
  dropped = [line for line in stderr.splitlines() if NOT_FOR_THIS_MODEL in line]
  if jit and len(dropped) != 1:
    raise Failed(f"expected one line saying {NOT_FOR_THIS_MODEL!r}, found {len(dropped)}", stderr)
  return "XLA dropped, in one line" if jit else "trained"


def dense_xla(folder):
  stderr, _ = trainer(folder, "dense-xla", "--model=dense", "--epochs=1", "--jit_compile")
  if "--jit_compile: not" in stderr:
    raise Failed("the trainer dropped XLA for the dense model", stderr)
  return "compiled"


def cnn(folder, gpus, size, name, per_replica, *flags):
  """size: (image size, epochs)."""
  replicas = len(gpus) or 2
  placement = [] if gpus else [f"--cpu_devices={replicas}"]  # two logical CPUs stand in for GPUs
  _, report = trainer(folder, name, "--model=cnn", "--strategy=mirrored", *placement, f"--image_size={size[0]}",
                      f"--epochs={size[1]}", f"--batch_size={per_replica * replicas}", "--noaugment", *flags)
  expected = "float32" if not flags else "mixed_float16" if gpus else "mixed_bfloat16"
  if report["precision"] != expected or report["num_replicas"] != replicas:
    raise Failed(f"ran in {report['precision']} on {report['num_replicas']} replica(s), not {expected} on {replicas}")
  return f"{report['precision']}, {replicas} replicas, {report['throughput']['steps_per_second']:g} steps/s"


def bfloat16_step():
  """--bfloat16_step: one step of the CNN in mixed_bfloat16 on every GPU; exit 1 if its loss is not finite."""
  import keras
  import tensorflow as tf
  from trainer.models import build_cnn
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  strategy = tf.distribute.MirroredStrategy()
  with strategy.scope():
    model = build_cnn((64, 64, 3), 6)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
  rng = np.random.default_rng(0)
  batch = 32 * strategy.num_replicas_in_sync
  loss = model.train_on_batch(rng.random((batch, 64, 64, 3), np.float32), rng.integers(0, 6, batch))
  print(f"mixed_bfloat16, {strategy.num_replicas_in_sync} replica(s), loss {float(loss):.4f}")
  return 0 if np.isfinite(loss) else 1


def bfloat16(folder):
  del folder
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--bfloat16_step"], cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  if done.returncode:
    raise Failed(f"exit {done.returncode}: {last_line(done.stderr)}", done.stderr)
  return last_line(done.stdout)


def sigterm(folder):
  """SIGTERM after the first checkpoint: exit 143, then the command resumes (with fewer --epochs: quicker)."""
  command = [sys.executable, "-m", "trainer.task", f"--job_dir={os.path.join(folder, 'sigterm')}", "--model=dense",
             "--checkpoint_every_steps=20"]
  process = subprocess.Popen([*command, "--epochs=20"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  lines, seen = queue.Queue(), []
  threading.Thread(target=lambda: [*map(lines.put, process.stderr), lines.put(None)], daemon=True).start()
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not seen or not re.search(r"checkpoint \S+ saved", seen[-1]):
      try:
        seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.01)))
      except queue.Empty:
        raise Failed(f"no checkpoint saved within {TIMEOUT_S} s", "".join(seen)) from None
      if seen[-1] is None:  # the job ended before its first checkpoint
        seen.pop()
        raise Failed(f"exit {process.wait()} before a checkpoint: {last_line(''.join(seen))}", "".join(seen))
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=TIMEOUT_S)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  if code != 143:
    raise Failed(f"SIGTERM: exit {code}, not 143")
  done = subprocess.run([*command, "--epochs=1"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
  resumed = [line for line in done.stderr.splitlines() if "resuming from" in line]
  if done.returncode or not resumed:
    raise Failed(f"the resume: exit {done.returncode}: {last_line(done.stderr)}", done.stderr)
  return "143, then " + resumed[0].split("resuming from ")[1].split(": ", 1)[1]


def checks(gpus, quick):
  """(name, function of the scratch folder) of each check this host can run."""
  # --quick (the test's): the CNN only with --mixed_precision and the LSTM only with --jit_compile, each of which
  # trains it too; tiny images.
  size, batches = ((24, 1), (8,)) if quick else ((150, 2), (32, 256))
  cnn_checks = [] if quick else [(f"cnn b{n}", lambda f, n=n: cnn(f, gpus, size, f"cnn-{n}", n)) for n in batches]
  cnn_checks.append(("cnn mixed", lambda f: cnn(f, gpus, size, "cnn-mixed", batches[0], "--mixed_precision")))
  if gpus:
    cnn_checks.append(("cnn bfloat16", bfloat16))
  lstms = [] if quick else [("lstm", lambda f: lstm(f, False))]
  return [*lstms, ("lstm xla", lambda f: lstm(f, True)), ("dense xla", dense_xla), *cnn_checks, ("sigterm", sigterm)]


def run(name, check, folder):
  print(f"gpu_smoke: {name} ...", file=sys.stderr, flush=True)
  started = time.monotonic()
  try:
    result, detail = "ok", check(folder)
  except Failed as e:
    result, detail = "FAIL", str(e)
    for line in e.output.splitlines()[-40:]:  # what explains it, before the table
      print(f"gpu_smoke: {name}: {line}", file=sys.stderr)
  except subprocess.TimeoutExpired:
    result, detail = "FAIL", f"no end within {TIMEOUT_S} s"
  return name, result, time.monotonic() - started, detail


def table(rows):
  width = max(len(name) for name, *_ in rows)
  lines = [f"{'check':<{width}}  result  seconds  detail"]
  lines += [f"{name:<{width}}  {result:<6}  {seconds:7.1f}  {detail}" for name, result, seconds, detail in rows]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="24x24 images, one epoch, the CNN only mixed, the LSTM only under XLA (the test's).")
  parser.add_argument("--bfloat16_step", action="store_true", help=argparse.SUPPRESS)  # a check's own process
  args = parser.parse_args(argv)
  if args.bfloat16_step:
    return bfloat16_step()
  gpus, build = devices()
  if not gpus:
    print("gpu_smoke: no GPU found: running the checks the CPU can run (two logical CPUs stand in for GPUs)",
          file=sys.stderr, flush=True)
  rows = [("devices", "ok", 0.0, build)]
  with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as folder:
    rows += [run(name, check, folder) for name, check in checks(gpus, args.quick)]
  print(table(rows), flush=True)
  failed = [name for name, result, *_ in rows if result == "FAIL"]
  print(f"gpu_smoke: {'failed: ' + ', '.join(failed) if failed else 'all checks passed'}"
        f"{'' if gpus else ' (no GPU: CPU checks only)'}", file=sys.stderr, flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
