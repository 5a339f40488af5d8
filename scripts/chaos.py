"""Chaos: the same job killed with SIGKILL at random moments, restarted each time, then let
finish; it must end exactly where an uninterrupted run ends.

    python scripts/chaos.py --kills=10 --seed=1                 # local folder and gs:// (emulator)
    python scripts/chaos.py --kills=3 --where=local -- --model=gru --window=10 --epochs=2

For each storage (a local folder; a bucket of a gcp-storage-emulator this script starts on
127.0.0.1, so nothing leaves the machine), it runs `python -m trainer.task` with the trainer
flags given after `--` (default: the dense model on the built-in table, a checkpoint every 40
steps, 4 epochs) once without interruption, then the same flags in a fresh job folder: started,
SIGKILLed a random delay after its training started (uniform up to the uninterrupted run's
training time: seeded and printed), started again, and so on `--kills` times, and then run to
the end. SIGKILL is the harshest stop: no handler, no `finally`; it may land in a step, in a
checkpoint's upload, in the pruning of old checkpoints, in an export, or after the job is done.

It checks: every restart resumes (from scratch only while no earlier run has logged a saved
checkpoint: a lost checkpoint cannot hide behind a deterministic retraining) and no run prints
a traceback; the finished job's weights checksum and test metrics equal
the uninterrupted run's exactly. Prints one line per run, then the verdict; exits 1 on any
difference.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from gcs_emulator import GcsEmulator  # noqa: E402 -- scripts/, beside this file
from trainer import storage  # noqa: E402

DEFAULT_FLAGS = ["--model=dense", "--epochs=4", "--checkpoint_every_steps=40", "--keep_checkpoints=2"]
# The line the trainer logs once its model is built: training starts right after it.
STARTED = re.compile(r"model \w+: \d+ parameters")
RESUMED = re.compile(r"resuming from (\S+): \d+ epochs done")
SAVED = re.compile(r"checkpoint \S+ saved")
FRESH = re.compile(r"no checkpoint in \S+: training from the start")


def run(flags, job_dir, log_path, kill_after=None, timeout=900):
  """Runs the trainer; with kill_after, SIGKILLs it that many seconds after its training started.
  Returns (exit code, seconds from the start of training to the exit or the kill, stderr)."""
  with open(log_path, "w") as log:
    process = subprocess.Popen([sys.executable, "-m", "trainer.task", *flags, f"--job_dir={job_dir}"],
                               stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)
  deadline = time.monotonic() + timeout
  started = None
  while process.poll() is None:
    if time.monotonic() > deadline:
      process.kill()
      raise RuntimeError(f"the trainer did not finish within {timeout} s; see {log_path}")
    if started is None and STARTED.search(_read(log_path)):
      started = time.monotonic()
    if kill_after is not None and started is not None and time.monotonic() - started >= kill_after:
      process.send_signal(signal.SIGKILL)
      process.wait()
      break
    time.sleep(0.02)
  elapsed = time.monotonic() - (started or time.monotonic())
  return process.wait(), elapsed, _read(log_path)


def _read(path):
  with open(path, errors="replace") as f:
    return f.read()


def outcome(job_dir):
  """(weights checksum, test metrics) of a finished job, from its report.json."""
  report = json.loads(storage.read_text(storage.join(job_dir, "report.json")))
  return report["weights_checksum"], {k: v for k, v in report["test"].items() if not isinstance(v, dict)}


def chaos(where, base, flags, kills, rng, scratch):
  """Runs the uninterrupted job and the chaotic one under base; returns (passed, lines)."""
  lines = []
  reference_dir = storage.join(base, "uninterrupted")
  code, training, stderr = run(flags, reference_dir, os.path.join(scratch, f"{where}-reference.log"))
  if code != 0:
    raise RuntimeError(f"{where}: the uninterrupted run exited {code}:\n{stderr[-2000:]}")
  expected = outcome(reference_dir)
  lines.append(f"{where}: uninterrupted run: {training:.1f} s of training, weights checksum {expected[0]!r}")
  job_dir = storage.join(base, "chaos")
  passed, saved = True, False
  for attempt in range(kills + 1):
    kill_after = round(rng.uniform(0, training), 2) if attempt < kills else None
    log_path = os.path.join(scratch, f"{where}-run{attempt}.log")
    code, elapsed, stderr = run(flags, job_dir, log_path, kill_after)
    resumed, fresh = RESUMED.search(stderr), FRESH.search(stderr)
    start = (f"resumed from {storage.join('...', *resumed.group(1).split('/')[-2:])}" if resumed else
             "from scratch" if fresh else "killed before it looked for a checkpoint")
    if kill_after is None:
      what = f"ran to the end (exit {code})"
    elif code == -signal.SIGKILL:
      what = f"SIGKILL {kill_after:.2f} s into training"
    else:
      what = f"finished (exit {code}) before its kill at {kill_after:.2f} s"
    problems = []
    if "Traceback" in stderr:
      problems.append("printed a traceback")
    if saved and fresh:
      problems.append("started from scratch although an earlier run had saved a checkpoint")
    saved = saved or bool(SAVED.search(stderr))
    if code not in (0, -signal.SIGKILL):
      problems.append(f"exited {code}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")
    passed &= not problems
    lines.append(f"{where}: run {attempt + 1}: {start}; {what}" + "".join(f"; FAILED: {p} ({log_path})"
                                                                          for p in problems))
  got = outcome(job_dir)
  same = got == expected
  passed &= same
  lines.append(f"{where}: finished job: weights checksum {got[0]!r}, test {got[1]}: "
               + ("identical to the uninterrupted run" if same else f"DIFFERS from the uninterrupted {expected}"))
  return passed, lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the job may finish")
  parser.add_argument("--seed", type=int, default=1, help="seed of the kill times")
  parser.add_argument("--where", choices=("local", "gcs", "both"), default="both")
  parser.add_argument("trainer_flags", nargs="*", help="after --: the trainer's flags (default: %(default)s)",
                      default=DEFAULT_FLAGS)
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  print(f"chaos: --kills={args.kills} --seed={args.seed}; trainer flags: {' '.join(args.trainer_flags)}", flush=True)
  passed = True
  with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
    for where in (("local", "gcs") if args.where == "both" else (args.where,)):
      emulator = None
      if where == "gcs":
        emulator = GcsEmulator(os.path.join(scratch, "gcs"), os.path.join(scratch, "emulator.log")).start()
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
        base = emulator.new_bucket() + "/jobs"
      else:
        base = os.path.join(scratch, "jobs")
      try:
        ok, lines = chaos(where, base, args.trainer_flags, args.kills, rng, scratch)
      finally:
        if emulator:
          emulator.stop()
          del os.environ["STORAGE_EMULATOR_HOST"]
      for line in lines:
        print(line, flush=True)
      passed &= ok
  print("chaos: PASSED" if passed else "chaos: FAILED")
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
